// The CPU emulator's runtime: fibers, the scheduler of a launch, the checks
// of collectives and launch limits, and the CUDA runtime C API it needs.
// The model and its limits are described in include/cuda_runtime.h.
//
// A launch runs under one process-wide mutex on the calling OS thread. Its
// blocks run one after another (all at once, round by round, when it is
// cooperative). A block's fibers are started in the run order; a round runs
// every runnable fiber until it blocks on a collective or exits. A warp
// collective completes as soon as its last lane arrives (that lane carries
// on, the others become runnable). When no fiber is runnable, the waiting
// ones must all be at one __syncthreads() (released), or, in a cooperative
// launch, at one grid sync; anything else is divergence or deadlock.
//
// This file defines no thread_local: the TLS block of the kernels' module is
// their __shared__ memory.
#include <dlfcn.h>
#include <signal.h>
#include <link.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <random>
#include <string>
#include <vector>

#include "cuda_runtime.h"
#include "emu_host.h"

#if defined(__x86_64__) && !defined(FUSED_BN_EMU_UCONTEXT)
#define FUSED_BN_EMU_ASM_SWITCH 1
#else
#include <ucontext.h>
#endif

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define FUSED_BN_EMU_ASAN 1
#endif

namespace fused_bn_emu {

const ThreadCtx* g_ctx = nullptr;

namespace {

// ---------------------------------------------------------------- device

constexpr int kSms = 132;
constexpr int kThreadsPerSm = 2048;
constexpr int kBlocksPerSm = 32;
constexpr int kSharedPerSm = 228 * 1024;
constexpr int kSharedPerBlock = 48 * 1024;
constexpr int kSharedPerBlockOptin = 227 * 1024;
constexpr int kSharedReservedPerBlock = 1024;
constexpr int kMaxFibers = 30000;  // cooperative grids (two mappings each)

int sm_count() {
  const char* e = std::getenv("FUSED_BN_EMU_SMS");
  if (!e || !*e) return kSms;
  const int n = std::atoi(e);
  return n >= 1 && n <= kSms ? n : kSms;
}

// ---------------------------------------------------------------- errors

std::mutex g_error_mu;
cudaError_t g_last_error = cudaSuccess;
std::string g_error_message;  // of the last error with a message

void set_error(cudaError_t e, const std::string& message) {
  std::lock_guard<std::mutex> lock(g_error_mu);
  g_last_error = e;
  g_error_message = message;
}

std::string format(const char* fmt, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof(buf), fmt, ap);
  va_end(ap);
  return buf;
}

const char* base_name(const char* path) {
  const char* s = std::strrchr(path, '/');
  return s ? s + 1 : path;
}

std::string dim_str(const uint3& d) { return format("(%u,%u,%u)", d.x, d.y, d.z); }
std::string dim_str(const dim3& d) { return format("(%u,%u,%u)", d.x, d.y, d.z); }

const char* op_name(Op op) {
  switch (op) {
    case Op::kSyncThreads: return "__syncthreads()";
    case Op::kSyncThreadsCount: return "__syncthreads_count()";
    case Op::kSyncThreadsAnd: return "__syncthreads_and()";
    case Op::kSyncThreadsOr: return "__syncthreads_or()";
    case Op::kShflIdx: return "__shfl_sync()";
    case Op::kShflUp: return "__shfl_up_sync()";
    case Op::kShflDown: return "__shfl_down_sync()";
    case Op::kShflXor: return "__shfl_xor_sync()";
    case Op::kSyncWarp: return "__syncwarp()";
    case Op::kBallot: return "__ballot_sync()";
    case Op::kAny: return "__any_sync()";
    case Op::kAll: return "__all_sync()";
    case Op::kGridSync: return "this_grid().sync()";
  }
  return "?";
}

bool is_shuffle(Op op) { return op >= Op::kShflIdx && op <= Op::kShflXor; }

// ---------------------------------------------------------------- order

enum class Order { kForward, kReverse, kRandom };

struct OrderSpec {
  Order order = Order::kForward;
  uint64_t seed = 1;
  std::string text = "forward";
  bool ok = true;
};

OrderSpec order_from_env() {
  OrderSpec o;
  const char* e = std::getenv("FUSED_BN_EMU_ORDER");
  if (!e || !*e) return o;
  const std::string s = e;
  o.text = s;
  if (s == "forward") return o;
  if (s == "reverse") {
    o.order = Order::kReverse;
    return o;
  }
  if (s.rfind("random", 0) == 0) {
    o.order = Order::kRandom;
    if (s.size() == 6) return o;
    char* end = nullptr;
    if (s[6] == ':' && s.size() > 7) {
      o.seed = std::strtoull(s.c_str() + 7, &end, 10);
      if (*end == '\0') return o;
    }
  }
  o.ok = false;
  return o;
}

// ---------------------------------------------------------------- fibers

#ifdef FUSED_BN_EMU_ASM_SWITCH
extern "C" void fbn_emu_switch(void** save_sp, void* new_sp);
extern "C" void fbn_emu_trampoline();
// Saves the callee-saved registers, MXCSR and the x87 control word on the
// current stack, stores the stack pointer in *save_sp, continues on new_sp.
// A new fiber's stack holds the same frame with the trampoline as return
// address, r12 = argument, r13 = function.
asm(R"(
  .text
  .globl fbn_emu_switch
  .hidden fbn_emu_switch
  .type fbn_emu_switch, @function
fbn_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size fbn_emu_switch, .-fbn_emu_switch

  .globl fbn_emu_trampoline
  .hidden fbn_emu_trampoline
  .type fbn_emu_trampoline, @function
fbn_emu_trampoline:
  .cfi_startproc
  .cfi_undefined rip
  movq %r12, %rdi
  callq *%r13
  ud2
  .cfi_endproc
  .size fbn_emu_trampoline, .-fbn_emu_trampoline
)");
#endif

enum class St : uint8_t { kRunnable, kBlockOp, kWarpOp, kGrid, kDone };

struct Block;

struct Fiber {
#ifdef FUSED_BN_EMU_ASM_SWITCH
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
  char* stack = nullptr;
  size_t stack_size = 0;
  void* asan_fake = nullptr;
  bool filled = false;  // FUSED_BN_EMU_STACK_STATS
  ThreadCtx ctx;
  Block* block = nullptr;
  unsigned linear = 0, lane = 0, warp = 0;
  St st = St::kDone;
  // The collective it waits at.
  Op op = Op::kSyncThreads;
  const char* file = "";
  int line = 0;
  unsigned mask = 0;
  int width = 32;
  int64_t arg = 0;
  uint64_t value = 0;
  uint64_t result = 0;
};

struct Block {
  std::vector<Fiber*> f;
  unsigned n = 0;
  uint3 idx;
  char* dyn = nullptr;            // dynamic shared memory
  std::vector<char> shared_save;  // cooperative: its __shared__ while parked
};

size_t page_size() {
  static const size_t p = size_t(sysconf(_SC_PAGESIZE));
  return p;
}

// FUSED_BN_EMU_STACK_STATS=1: fibers start on stacks filled with a pattern;
// the deepest use is printed at exit (to size stack_bytes()).
constexpr unsigned char kStackFill = 0xa5;
bool g_stack_stats = false;
size_t g_stack_max_use = 0;

void print_stack_stats() {
  std::fprintf(stderr, "fused_bn CUDA emulator: deepest fiber stack use %zu bytes\n",
               g_stack_max_use);
}

void measure_stack(const Fiber& f) {
  size_t unused = 0;
  while (unused < f.stack_size &&
         static_cast<unsigned char>(f.stack[unused]) == kStackFill) {
    ++unused;
  }
  g_stack_max_use = std::max(g_stack_max_use, f.stack_size - unused);
}

size_t stack_bytes() {
#ifdef FUSED_BN_EMU_ASAN
  size_t kb = 512;
#else
  size_t kb = 64;
#endif
  if (const char* e = std::getenv("FUSED_BN_EMU_STACK_STATS"); e && *e == '1') {
    g_stack_stats = true;
    std::atexit(print_stack_stats);
  }
  if (const char* e = std::getenv("FUSED_BN_EMU_STACK_KB")) {
    const long v = std::atol(e);
    if (v >= 16) kb = size_t(v);
  }
  return kb * 1024;
}

// Stacks with a PROT_NONE guard page below each, reused across launches.
struct StackPool {
  std::vector<Fiber*> fibers;
  size_t size = 0;

  // Fibers [0, n), or false when n is beyond the emulator's limit.
  bool reserve(size_t n) {
    if (size == 0) size = stack_bytes();
    if (n > size_t(kMaxFibers) && n > fibers.size()) return false;
    while (fibers.size() < n) {
      const size_t guard = page_size();
      void* m = mmap(nullptr, size + guard, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (m == MAP_FAILED) return false;
      mprotect(m, guard, PROT_NONE);
      Fiber* f = new Fiber;
      f->stack = static_cast<char*>(m) + guard;
      f->stack_size = size;
      fibers.push_back(f);
    }
    return true;
  }
};

// ---------------------------------------------------------------- a launch

struct Run {
  const LaunchSpec* spec = nullptr;
  std::string kernel;
  OrderSpec order;
  std::mt19937_64 rng;
  bool cooperative = false;
  unsigned threads = 0;  // per block
  char* shared = nullptr;  // the module's TLS block: __shared__ variables
  size_t shared_size = 0;
  bool failed = false;
  std::string error;
#ifdef FUSED_BN_EMU_ASM_SWITCH
  void* sched_sp = nullptr;
#else
  ucontext_t sched_uc;
#endif
  const void* sched_stack = nullptr;  // for ASan
  size_t sched_stack_size = 0;
};

std::mutex g_launch_mu;
StackPool g_pool;
Run* g_run = nullptr;
Fiber* g_fiber = nullptr;
uint64_t g_launch_count = 0;
bool g_aborted_fibers = false;  // a failed launch left frames on stacks

std::string where(const Fiber& f) {
  return format("kernel %s, block %s, thread %s", g_run->kernel.c_str(),
                dim_str(f.block->idx).c_str(), dim_str(f.ctx.thread_idx).c_str());
}

std::string site(const Fiber& f) {
  return format("%s at %s:%d", op_name(f.op), base_name(f.file), f.line);
}

std::string order_note() {
  return format(" [FUSED_BN_EMU_ORDER=%s, launch %llu]", g_run->order.text.c_str(),
                static_cast<unsigned long long>(g_launch_count));
}

void fail_run(const std::string& what) {
  if (g_run->failed) return;
  g_run->failed = true;
  g_run->error = "fused_bn CUDA emulator: " + what + order_note();
}

// Switches from the scheduler to fiber f until it blocks or exits.
void resume(Fiber& f) {
  g_fiber = &f;
  g_ctx = &f.ctx;
#ifdef FUSED_BN_EMU_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, f.stack, f.stack_size);
#endif
#ifdef FUSED_BN_EMU_ASM_SWITCH
  fbn_emu_switch(&g_run->sched_sp, f.sp);
#else
  swapcontext(&g_run->sched_uc, &f.uc);
#endif
#ifdef FUSED_BN_EMU_ASAN
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
  g_fiber = nullptr;
}

// From the running fiber back to the scheduler; returns when resumed.
void suspend(Fiber& f, bool dying = false) {
#ifdef FUSED_BN_EMU_ASAN
  __sanitizer_start_switch_fiber(dying ? nullptr : &f.asan_fake,
                                 g_run->sched_stack, g_run->sched_stack_size);
#else
  (void)dying;
#endif
#ifdef FUSED_BN_EMU_ASM_SWITCH
  fbn_emu_switch(&f.sp, g_run->sched_sp);
#else
  swapcontext(&f.uc, &g_run->sched_uc);
#endif
#ifdef FUSED_BN_EMU_ASAN
  __sanitizer_finish_switch_fiber(f.asan_fake, &g_run->sched_stack,
                                  &g_run->sched_stack_size);
#endif
}

// Reports misuse from inside fiber f and never returns to it.
[[noreturn]] void fail_in_fiber(Fiber& f, const std::string& what) {
  fail_run(where(f) + ": " + what);
  f.st = St::kDone;
  suspend(f, true);
  std::abort();  // never resumed
}

void fiber_exited(Fiber& f);

void fiber_main(Fiber* f) {
#ifdef FUSED_BN_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &g_run->sched_stack,
                                  &g_run->sched_stack_size);
#endif
  g_run->spec->entry(g_run->spec->args);
  fiber_exited(*f);
  f->st = St::kDone;
  suspend(*f, true);
  std::abort();  // never resumed
}

#ifndef FUSED_BN_EMU_ASM_SWITCH
void ucontext_entry(int hi, int lo) {
  fiber_main(reinterpret_cast<Fiber*>(uintptr_t(unsigned(hi)) << 32 | unsigned(lo)));
}
#endif

void start_fiber(Fiber& f) {
  if (g_stack_stats) {
    if (f.filled) measure_stack(f);
    std::memset(f.stack, kStackFill, f.stack_size);
    f.filled = true;
  }
#ifdef FUSED_BN_EMU_ASAN
  if (g_aborted_fibers) __asan_unpoison_memory_region(f.stack, f.stack_size);
#endif
#ifdef FUSED_BN_EMU_ASM_SWITCH
  uintptr_t top = (reinterpret_cast<uintptr_t>(f.stack) + f.stack_size) & ~uintptr_t(15);
  uint64_t* sp = reinterpret_cast<uint64_t*>(top) - 8;
  uint32_t csr[2];
  asm volatile("stmxcsr %0" : "=m"(csr[0]));
  asm volatile("fnstcw %0" : "=m"(*reinterpret_cast<uint16_t*>(&csr[1])));
  std::memcpy(&sp[0], csr, 8);
  sp[1] = 0;                                              // r15
  sp[2] = 0;                                              // r14
  sp[3] = reinterpret_cast<uint64_t>(&fiber_main);        // r13
  sp[4] = reinterpret_cast<uint64_t>(&f);                 // r12
  sp[5] = 0;                                              // rbx
  sp[6] = 0;                                              // rbp
  sp[7] = reinterpret_cast<uint64_t>(&fbn_emu_trampoline);
  f.sp = sp;
#else
  getcontext(&f.uc);
  f.uc.uc_stack.ss_sp = f.stack;
  f.uc.uc_stack.ss_size = f.stack_size;
  f.uc.uc_link = nullptr;
  const uintptr_t p = reinterpret_cast<uintptr_t>(&f);
  makecontext(&f.uc, reinterpret_cast<void (*)()>(ucontext_entry), 2,
              int(unsigned(p >> 32)), int(unsigned(p)));
#endif
  f.st = St::kRunnable;
}

// ---------------------------------------------------------------- collectives

Fiber& current(const char* what) {
  if (!g_fiber) {
    std::fprintf(stderr, "fused_bn CUDA emulator: %s called outside a kernel\n", what);
    std::abort();
  }
  return *g_fiber;
}

bool same_site(const Fiber& a, const Fiber& b) {
  return a.op == b.op && a.line == b.line &&
         (a.file == b.file || std::strcmp(a.file, b.file) == 0);
}

// The lane fiber `lane` of f's warp, or nullptr if the block has no such thread.
Fiber* lane_fiber(const Fiber& f, unsigned lane) {
  const unsigned i = f.warp * 32 + lane;
  return i < f.block->n ? f.block->f[i] : nullptr;
}

// All lanes of f's mask wait at f's collective: computes every result.
void complete_warp_op(Fiber& f) {
  for (unsigned l = 0; l < 32; ++l) {
    if (!(f.mask >> l & 1)) continue;
    Fiber& o = *lane_fiber(f, l);
    uint64_t r = o.value;
    if (is_shuffle(o.op)) {
      const int64_t w = o.width, seg = o.lane & ~unsigned(w - 1);
      int64_t src = -1;  // -1: the caller's own value
      switch (o.op) {
        case Op::kShflIdx: src = seg + (o.arg & (w - 1)); break;
        case Op::kShflUp:
          if (int64_t(o.lane) - o.arg >= seg) src = int64_t(o.lane) - o.arg;
          break;
        case Op::kShflDown:
          if (int64_t(o.lane) + o.arg < seg + w) src = int64_t(o.lane) + o.arg;
          break;
        default: {
          const int64_t j = int64_t(o.lane ^ uint32_t(o.arg));
          if (j < seg + w) src = j;
        }
      }
      if (src >= 0) {
        if (!(o.mask >> src & 1)) {
          fail_in_fiber(f, format("lane %u reads lane %lld in %s, which the mask 0x%08x "
                                  "does not name (an undefined value on a GPU)",
                                  o.lane, static_cast<long long>(src), site(o).c_str(),
                                  o.mask));
        }
        r = lane_fiber(f, unsigned(src))->value;
      }
    } else if (o.op == Op::kBallot || o.op == Op::kAny || o.op == Op::kAll) {
      uint32_t ballot = 0;
      for (unsigned k = 0; k < 32; ++k) {
        if (o.mask >> k & 1) ballot |= uint32_t(lane_fiber(f, k)->value != 0) << k;
      }
      r = o.op == Op::kBallot ? ballot
          : o.op == Op::kAny  ? uint64_t(ballot != 0)
                              : uint64_t(ballot == o.mask);
    }
    o.result = r;
  }
  for (unsigned l = 0; l < 32; ++l) {
    if (f.mask >> l & 1) lane_fiber(f, l)->st = St::kRunnable;
  }
}

// A lane exits: a lane waiting for it can never complete.
void fiber_exited(Fiber& f) {
  for (unsigned l = 0; l < 32; ++l) {
    Fiber* o = lane_fiber(f, l);
    if (o && o != &f && o->st == St::kWarpOp && (o->mask >> f.lane & 1)) {
      fail_in_fiber(f, format("exited while lane %u (thread %s) waits for it in %s "
                              "with mask 0x%08x",
                              o->lane, dim_str(o->ctx.thread_idx).c_str(),
                              site(*o).c_str(), o->mask));
    }
  }
}

}  // namespace

uint64_t warp_op(Op op, unsigned mask, uint64_t value, int64_t arg, int width,
                 const char* file, int line) {
  Fiber& f = current(op_name(op));
  f.op = op;
  f.file = file;
  f.line = line;
  f.mask = mask;
  f.value = value;
  f.arg = arg;
  f.width = width;
  if (!(mask >> f.lane & 1)) {
    fail_in_fiber(f, format("%s: the mask 0x%08x does not name the calling lane %u",
                            site(f).c_str(), mask, f.lane));
  }
  if (is_shuffle(op) && (width < 1 || width > 32 || (width & (width - 1)))) {
    fail_in_fiber(f, format("%s: width %d is not a power of 2 in [1, 32]",
                            site(f).c_str(), width));
  }
  for (unsigned l = 0; l < 32; ++l) {
    if (!(mask >> l & 1)) continue;
    const Fiber* o = lane_fiber(f, l);
    if (!o) {
      fail_in_fiber(f, format("%s: the mask 0x%08x names lane %u, which does not "
                              "exist (the block has %u threads)",
                              site(f).c_str(), mask, l, f.block->n));
    }
    if (o->st == St::kDone) {
      fail_in_fiber(f, format("%s: the mask 0x%08x names lane %u, which has exited",
                              site(f).c_str(), mask, l));
    }
  }
  f.st = St::kWarpOp;
  bool all = true;
  for (unsigned l = 0; l < 32 && all; ++l) {
    if (!(mask >> l & 1)) continue;
    const Fiber& o = *lane_fiber(f, l);
    all = o.st == St::kWarpOp && same_site(o, f) && o.mask == mask;
  }
  if (all) {
    complete_warp_op(f);
  } else {
    suspend(f);
  }
  return f.result;
}

uint64_t block_op(Op op, int pred, const char* file, int line) {
  Fiber& f = current(op_name(op));
  f.op = op;
  f.file = file;
  f.line = line;
  f.value = uint64_t(pred != 0);
  f.st = St::kBlockOp;
  suspend(f);
  return f.result;
}

void grid_sync(const char* file, int line) {
  Fiber& f = current("this_grid().sync()");
  f.op = Op::kGridSync;
  f.file = file;
  f.line = line;
  if (!g_run->cooperative) {
    fail_in_fiber(f, format("%s in a kernel not launched cooperatively "
                            "(launch_cooperative / cudaLaunchCooperativeKernel)",
                            site(f).c_str()));
  }
  f.st = St::kGrid;
  suspend(f);
}

void trap(const char* file, int line) {
  Fiber& f = current("__trap()");
  fail_in_fiber(f, format("__trap() at %s:%d", base_name(file), line));
}

void yield() {
  Fiber& f = current("__nanosleep()");
  f.st = St::kRunnable;
  suspend(f);
}

namespace {
char* g_dynamic_shared = nullptr;
}

void* dynamic_shared_ptr() { return g_dynamic_shared; }

namespace {

// ---------------------------------------------------------------- scheduler

// The thread order of one round.
void round_order(std::vector<unsigned>& order, unsigned n) {
  order.resize(n);
  for (unsigned i = 0; i < n; ++i) order[i] = i;
  if (g_run->order.order == Order::kReverse) {
    std::reverse(order.begin(), order.end());
  } else if (g_run->order.order == Order::kRandom) {
    std::shuffle(order.begin(), order.end(), g_run->rng);
  }
}

// Why the waiting fiber f can never go on (no fiber is runnable).
std::string stuck_reason(const Fiber& f) {
  for (unsigned l = 0; l < 32; ++l) {
    if (!(f.mask >> l & 1)) continue;
    const Fiber& o = *lane_fiber(f, l);
    if (&o == &f) continue;
    if (o.st == St::kDone) {
      return format("lane %u named in the mask has exited", l);
    }
    if (o.st != St::kWarpOp || !same_site(o, f)) {
      return format("lane %u named in the mask waits at %s instead "
                    "(divergent collectives)", l, site(o).c_str());
    }
    if (o.mask != f.mask) {
      return format("lane %u is there with mask 0x%08x", l, o.mask);
    }
  }
  return "deadlock";
}

enum class End { kDone, kGrid, kFailed };

// Runs block b until all its fibers exit (or, cooperative, all live ones
// wait at a grid sync).
End run_block(Block& b) {
  std::vector<unsigned> order;
  for (;;) {
    round_order(order, b.n);
    bool ran = false;
    for (unsigned i : order) {
      Fiber& f = *b.f[i];
      if (f.st != St::kRunnable) continue;
      resume(f);
      ran = true;
      if (g_run->failed) return End::kFailed;
    }
    if (ran) continue;
    const Fiber* bar = nullptr;
    const Fiber* grid = nullptr;
    unsigned live = 0, at_bar = 0, at_grid = 0;
    for (Fiber* f : b.f) {
      if (f->st == St::kDone) continue;
      ++live;
      if (f->st == St::kWarpOp) {
        fail_run(where(*f) + ": waits forever at " + site(*f) + " with mask " +
                 format("0x%08x: ", f->mask) + stuck_reason(*f));
        return End::kFailed;
      }
      if (f->st == St::kBlockOp) {
        ++at_bar;
        if (!bar) {
          bar = f;
        } else if (!same_site(*f, *bar)) {
          fail_run(format("kernel %s, block %s: threads wait at different barriers: "
                          "thread %s at %s, thread %s at %s",
                          g_run->kernel.c_str(), dim_str(b.idx).c_str(),
                          dim_str(bar->ctx.thread_idx).c_str(), site(*bar).c_str(),
                          dim_str(f->ctx.thread_idx).c_str(), site(*f).c_str()));
          return End::kFailed;
        }
      }
      if (f->st == St::kGrid) {
        ++at_grid;
        if (!grid) grid = f;
      }
    }
    if (live == 0) return End::kDone;
    if (at_bar && at_grid) {
      fail_run(format("kernel %s, block %s: thread %s waits at %s while thread %s "
                      "waits at %s",
                      g_run->kernel.c_str(), dim_str(b.idx).c_str(),
                      dim_str(bar->ctx.thread_idx).c_str(), site(*bar).c_str(),
                      dim_str(grid->ctx.thread_idx).c_str(), site(*grid).c_str()));
      return End::kFailed;
    }
    if (at_grid) return End::kGrid;
    uint64_t count = 0;
    for (Fiber* f : b.f) count += f->st == St::kBlockOp && f->value;
    uint64_t r = 0;
    switch (bar->op) {
      case Op::kSyncThreadsCount: r = count; break;
      case Op::kSyncThreadsAnd: r = count == at_bar; break;
      case Op::kSyncThreadsOr: r = count != 0; break;
      default: break;
    }
    for (Fiber* f : b.f) {
      if (f->st == St::kBlockOp) {
        f->result = r;
        f->st = St::kRunnable;
      }
    }
  }
}

void init_block(Block& b, unsigned linear, Fiber* const* fibers) {
  const LaunchSpec& s = *g_run->spec;
  b.idx = uint3{linear % s.grid.x, (linear / s.grid.x) % s.grid.y,
                linear / (s.grid.x * s.grid.y)};
  b.n = g_run->threads;
  b.f.assign(fibers, fibers + b.n);
  for (unsigned i = 0; i < b.n; ++i) {
    Fiber& f = *b.f[i];
    f.ctx.thread_idx = uint3{i % s.block.x, (i / s.block.x) % s.block.y,
                             i / (s.block.x * s.block.y)};
    f.ctx.block_idx = b.idx;
    f.ctx.block_dim = s.block;
    f.ctx.grid_dim = s.grid;
    f.block = &b;
    f.linear = i;
    f.lane = i % 32;
    f.warp = i / 32;
    start_fiber(f);
  }
}

void poison_shared(char* dyn) {
  if (g_run->shared) std::memset(g_run->shared, 0xff, g_run->shared_size);
  if (dyn) std::memset(dyn, 0xff, g_run->spec->smem);
}

std::vector<uint64_t> block_order(uint64_t blocks) {
  std::vector<uint64_t> order(blocks);
  for (uint64_t i = 0; i < blocks; ++i) order[i] = i;
  if (g_run->order.order == Order::kReverse) {
    std::reverse(order.begin(), order.end());
  } else if (g_run->order.order == Order::kRandom) {
    std::shuffle(order.begin(), order.end(), g_run->rng);
  }
  return order;
}

char* alloc_smem(size_t n) {
  if (n == 0) return nullptr;
  void* p = nullptr;
  return posix_memalign(&p, 256, n) == 0 ? static_cast<char*>(p) : nullptr;
}

void run_grid(uint64_t blocks) {
  const std::vector<uint64_t> order = block_order(blocks);
  if (!g_run->cooperative) {
    if (!g_pool.reserve(g_run->threads)) {
      fail_run("cannot allocate fiber stacks");
      return;
    }
    Block b;
    b.dyn = alloc_smem(g_run->spec->smem);
    for (uint64_t linear : order) {
      g_dynamic_shared = b.dyn;
      poison_shared(b.dyn);
      init_block(b, unsigned(linear), g_pool.fibers.data());
      if (run_block(b) != End::kDone) break;  // kGrid is impossible here
    }
    std::free(b.dyn);
    return;
  }
  // Cooperative: every block alive; each parks at the grid sync in turn.
  const uint64_t fibers = blocks * g_run->threads;
  if (!g_pool.reserve(fibers)) {
    fail_run(format("kernel %s: a cooperative grid of %llu threads is too large "
                    "for the emulator (at most %d): set FUSED_BN_EMU_SMS to a "
                    "smaller SM count",
                    g_run->kernel.c_str(), static_cast<unsigned long long>(fibers),
                    kMaxFibers));
    return;
  }
  std::vector<Block> grid(blocks);
  for (uint64_t i = 0; i < blocks; ++i) {
    Block& b = grid[i];
    b.dyn = alloc_smem(g_run->spec->smem);
    g_dynamic_shared = b.dyn;
    poison_shared(b.dyn);
    b.shared_save.assign(g_run->shared, g_run->shared + g_run->shared_size);
    init_block(b, unsigned(i), g_pool.fibers.data() + i * g_run->threads);
  }
  for (;;) {
    bool any_live = false;
    const Fiber* first = nullptr;
    for (uint64_t linear : order) {
      Block& b = grid[linear];
      bool live = false;
      for (Fiber* f : b.f) live |= f->st != St::kDone;
      if (!live) continue;
      g_dynamic_shared = b.dyn;
      if (g_run->shared) std::memcpy(g_run->shared, b.shared_save.data(), g_run->shared_size);
      const End e = run_block(b);
      if (e == End::kFailed) break;
      if (g_run->shared) std::memcpy(b.shared_save.data(), g_run->shared, g_run->shared_size);
      if (e == End::kDone) continue;
      any_live = true;
      for (Fiber* f : b.f) {
        if (f->st != St::kGrid) continue;
        if (!first) {
          first = f;
        } else if (!same_site(*f, *first)) {
          fail_run(format("kernel %s: grid syncs differ: block %s thread %s at %s, "
                          "block %s thread %s at %s",
                          g_run->kernel.c_str(), dim_str(first->block->idx).c_str(),
                          dim_str(first->ctx.thread_idx).c_str(), site(*first).c_str(),
                          dim_str(b.idx).c_str(), dim_str(f->ctx.thread_idx).c_str(),
                          site(*f).c_str()));
          break;
        }
      }
      if (g_run->failed) break;
    }
    if (g_run->failed || !any_live) break;
    for (Block& b : grid) {
      for (Fiber* f : b.f) {
        if (f->st == St::kGrid) f->st = St::kRunnable;
      }
    }
  }
  for (Block& b : grid) std::free(b.dyn);
}

// ---------------------------------------------------------------- faults

#ifndef FUSED_BN_EMU_ASAN
// A fault inside a kernel (ASan builds have ASan's report instead): names the
// emulated thread, then lets the fault repeat under the previous handler
// (Python's faulthandler, or the default).
struct sigaction g_old_segv, g_old_bus;

void on_fault(int sig, siginfo_t* info, void*) {
  const Fiber* f = g_fiber;
  if (f && g_run) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(info->si_addr);
    const uintptr_t lo = reinterpret_cast<uintptr_t>(f->stack);
    const bool overflow = a < lo && a + page_size() >= lo;
    char buf[1024];
    const int n = std::snprintf(
        buf, sizeof(buf),
        "fused_bn CUDA emulator: %s in kernel %s, block (%u,%u,%u), thread "
        "(%u,%u,%u): %s\n",
        sig == SIGBUS ? "bus error" : "segmentation fault", g_run->kernel.c_str(),
        f->block->idx.x, f->block->idx.y, f->block->idx.z, f->ctx.thread_idx.x,
        f->ctx.thread_idx.y, f->ctx.thread_idx.z,
        overflow ? "stack overflow of the emulated thread (FUSED_BN_EMU_STACK_KB)"
                 : "an invalid or misaligned access (on a GPU: an illegal or "
                   "misaligned address error)");
    if (n > 0) (void)!write(2, buf, size_t(std::min(n, int(sizeof(buf)) - 1)));
  }
  sigaction(sig, sig == SIGBUS ? &g_old_bus : &g_old_segv, nullptr);
}

void install_fault_handler() {
  static bool done = false;
  if (done) return;
  done = true;
  struct sigaction sa;
  std::memset(&sa, 0, sizeof(sa));
  sa.sa_sigaction = on_fault;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGSEGV, &sa, &g_old_segv);
  sigaction(SIGBUS, &sa, &g_old_bus);
}
#else
void install_fault_handler() {}
#endif

// ---------------------------------------------------------------- launch

// "kernel<...>" from "... [with auto Kernel = kernel<...>; Args = ...]".
std::string kernel_name(const char* pretty) {
  std::string s = pretty;
  const size_t at = s.find("Kernel = ");
  if (at == std::string::npos) return s;
  size_t i = at + 9;
  int depth = 0;
  std::string out;
  for (; i < s.size(); ++i) {
    const char c = s[i];
    if (depth == 0 && (c == ';' || c == ']')) break;
    depth += c == '<' ? 1 : c == '>' ? -1 : 0;
    out += c;
  }
  for (const std::string junk : {"{anonymous}::", "<unnamed>::", "fused_bn::cuda::"}) {
    for (size_t p; (p = out.find(junk)) != std::string::npos;) out.erase(p, junk.size());
  }
  return out;
}

std::map<const void*, int> g_max_dynamic_smem;  // cudaFuncSetAttribute

int max_dynamic_smem(const void* func) {
  const auto it = g_max_dynamic_smem.find(func);
  return it == g_max_dynamic_smem.end() ? kSharedPerBlock : it->second;
}

// Blocks of `threads` threads and `smem` dynamic bytes per SM.
int occupancy(int threads, size_t smem) {
  const int warps = (threads + 31) / 32;
  int n = std::min(kBlocksPerSm, kThreadsPerSm / 32 / warps);
  if (smem > 0) {
    n = std::min<int>(n, int(kSharedPerSm / (smem + kSharedReservedPerBlock)));
  }
  return n;
}

// The calling thread's TLS block of the module holding `code`.
struct TlsLookup {
  uintptr_t code;
  char* data = nullptr;
  size_t size = 0;
};

int find_tls(dl_phdr_info* info, size_t, void* arg) {
  TlsLookup& t = *static_cast<TlsLookup*>(arg);
  bool here = false;
  size_t tls = 0;
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    const ElfW(Phdr)& p = info->dlpi_phdr[i];
    const uintptr_t lo = info->dlpi_addr + p.p_vaddr;
    if (p.p_type == PT_LOAD && t.code >= lo && t.code < lo + p.p_memsz) here = true;
    if (p.p_type == PT_TLS) tls = p.p_memsz;
  }
  if (!here) return 0;
  t.data = static_cast<char*>(info->dlpi_tls_data);
  t.size = t.data ? tls : 0;
  return 1;
}

std::string check_config(const LaunchSpec& s, const std::string& kernel) {
  const dim3 g = s.grid, b = s.block;
  const uint64_t threads = uint64_t(b.x) * b.y * b.z;
  if (b.x == 0 || b.y == 0 || b.z == 0 || b.x > 1024 || b.y > 1024 || b.z > 64 ||
      threads > 1024) {
    return format("kernel %s: block %s is not a valid block (each dim >= 1, x, y <= "
                  "1024, z <= 64, at most 1024 threads)",
                  kernel.c_str(), dim_str(b).c_str());
  }
  if (g.x == 0 || g.y == 0 || g.z == 0 || g.x > 0x7fffffffu || g.y > 65535 ||
      g.z > 65535) {
    return format("kernel %s: grid %s is not a valid grid (each dim >= 1, x < 2^31, "
                  "y, z <= 65535)",
                  kernel.c_str(), dim_str(g).c_str());
  }
  return "";
}

}  // namespace

void launch_impl(const LaunchSpec& spec) {
  std::lock_guard<std::mutex> lock(g_launch_mu);
  install_fault_handler();
  if (g_run) {
    std::fprintf(stderr, "fused_bn CUDA emulator: a kernel launched a kernel\n");
    std::abort();
  }
  Run run;
  run.spec = &spec;
  run.kernel = kernel_name(spec.name);
  run.order = order_from_env();
  run.cooperative = spec.cooperative;
  ++g_launch_count;
  run.rng.seed(run.order.seed * 0x9E3779B97F4A7C15ull + g_launch_count);
  g_run = &run;
  std::string config = check_config(spec, run.kernel);
  cudaError_t code = cudaErrorInvalidConfiguration;
  const int smem_limit = max_dynamic_smem(spec.key);
  const uint64_t blocks = uint64_t(spec.grid.x) * spec.grid.y * spec.grid.z;
  run.threads = spec.block.x * spec.block.y * spec.block.z;
  if (!run.order.ok) {
    config = "FUSED_BN_EMU_ORDER must be forward, reverse or random[:seed]; got '" +
             run.order.text + "'";
    code = cudaErrorInvalidValue;
  } else if (config.empty() && spec.smem > size_t(smem_limit)) {
    config = format("kernel %s: %zu bytes of dynamic shared memory, over the "
                    "kernel's limit of %d (cudaFuncSetAttribute raises it to %d)",
                    run.kernel.c_str(), spec.smem, smem_limit, kSharedPerBlockOptin);
    code = cudaErrorInvalidValue;
  } else if (config.empty() && spec.cooperative &&
             blocks > uint64_t(occupancy(int(run.threads), spec.smem)) * sm_count()) {
    config = format("kernel %s: cooperative grid of %llu blocks, over the %d resident "
                    "blocks (%d per SM x %d SMs)",
                    run.kernel.c_str(), static_cast<unsigned long long>(blocks),
                    occupancy(int(run.threads), spec.smem) * sm_count(),
                    occupancy(int(run.threads), spec.smem), sm_count());
    code = cudaErrorCooperativeLaunchTooLarge;
  }
  if (!config.empty()) {
    g_run = nullptr;
    set_error(code, "fused_bn CUDA emulator: " + config);
    return;
  }
  TlsLookup tls{reinterpret_cast<uintptr_t>(spec.entry)};
  dl_iterate_phdr(find_tls, &tls);
  run.shared = tls.data;
  run.shared_size = tls.size;
  run_grid(blocks);
  g_run = nullptr;
  g_ctx = nullptr;
  if (run.failed) {
    g_aborted_fibers = true;
    set_error(cudaErrorLaunchFailure, run.error);
  }
}

}  // namespace fused_bn_emu

namespace fused_bn_emu {
void* device_malloc(size_t bytes) {
  void* p = nullptr;
  return posix_memalign(&p, 256, bytes) == 0 ? p : nullptr;
}
void device_free(void* p) { std::free(p); }
}  // namespace fused_bn_emu

// ---------------------------------------------------------------- C API

using fused_bn_emu::set_error;

extern "C" {

cudaError_t cudaGetLastError(void) {
  std::lock_guard<std::mutex> lock(fused_bn_emu::g_error_mu);
  const cudaError_t e = fused_bn_emu::g_last_error;
  fused_bn_emu::g_last_error = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError(void) {
  std::lock_guard<std::mutex> lock(fused_bn_emu::g_error_mu);
  return fused_bn_emu::g_last_error;
}

const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    case cudaErrorCooperativeLaunchTooLarge: return "cudaErrorCooperativeLaunchTooLarge";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    default: return "cudaErrorUnknown";
  }
}

// The emulator's message for the last error with one, else the error's name.
const char* cudaGetErrorString(cudaError_t e) {
  std::lock_guard<std::mutex> lock(fused_bn_emu::g_error_mu);
  if (e != cudaSuccess && !fused_bn_emu::g_error_message.empty()) {
    return fused_bn_emu::g_error_message.c_str();
  }
  return cudaGetErrorName(e);
}

cudaError_t cudaMalloc(void** p, size_t bytes) {
  *p = fused_bn_emu::device_malloc(bytes);
  if (*p) return cudaSuccess;
  set_error(cudaErrorMemoryAllocation, "");
  return cudaErrorMemoryAllocation;
}

cudaError_t cudaFree(void* p) {
  std::free(p);
  return cudaSuccess;
}

cudaError_t cudaMemcpy(void* dst, const void* src, size_t n, cudaMemcpyKind) {
  if (n) std::memmove(dst, src, n);
  return cudaSuccess;
}

cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t n, cudaMemcpyKind k,
                            cudaStream_t) {
  return cudaMemcpy(dst, src, n, k);
}

cudaError_t cudaMemset(void* p, int v, size_t n) {
  if (n) std::memset(p, v, n);
  return cudaSuccess;
}

cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t) {
  return cudaMemset(p, v, n);
}

cudaError_t cudaDeviceSynchronize(void) { return cudaSuccess; }
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }

cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}

cudaError_t cudaSetDevice(int d) {
  if (d == 0) return cudaSuccess;
  set_error(cudaErrorInvalidDevice, "");
  return cudaErrorInvalidDevice;
}

cudaError_t cudaGetDeviceCount(int* n) {
  *n = 1;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr attr, int device) {
  using namespace fused_bn_emu;
  if (device != 0) {
    set_error(cudaErrorInvalidDevice, "");
    return cudaErrorInvalidDevice;
  }
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *v = sm_count(); break;
    case cudaDevAttrMaxThreadsPerBlock: *v = 1024; break;
    case cudaDevAttrMaxThreadsPerMultiProcessor: *v = kThreadsPerSm; break;
    case cudaDevAttrMaxBlocksPerMultiprocessor: *v = kBlocksPerSm; break;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *v = kSharedPerSm; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *v = kSharedPerBlock; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *v = kSharedPerBlockOptin; break;
    case cudaDevAttrReservedSharedMemoryPerBlock: *v = kSharedReservedPerBlock; break;
    case cudaDevAttrWarpSize: *v = 32; break;
    case cudaDevAttrMaxBlockDimX: case cudaDevAttrMaxBlockDimY: *v = 1024; break;
    case cudaDevAttrMaxBlockDimZ: *v = 64; break;
    case cudaDevAttrMaxGridDimX: *v = 0x7fffffff; break;
    case cudaDevAttrMaxGridDimY: case cudaDevAttrMaxGridDimZ: *v = 65535; break;
    case cudaDevAttrComputeCapabilityMajor: *v = 9; break;
    case cudaDevAttrComputeCapabilityMinor: *v = 0; break;
    case cudaDevAttrCooperativeLaunch: *v = 1; break;
    case cudaDevAttrL2CacheSize: *v = 50 * 1024 * 1024; break;
    case cudaDevAttrMaxRegistersPerBlock: *v = 65536; break;
    default:
      set_error(cudaErrorInvalidValue,
                format("fused_bn CUDA emulator: device attribute %d is not modelled",
                       int(attr)));
      return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}

cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
  using namespace fused_bn_emu;
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize && value >= 0 &&
      value <= kSharedPerBlockOptin) {
    std::lock_guard<std::mutex> lock(g_launch_mu);
    g_max_dynamic_smem[func] = value;
    return cudaSuccess;
  }
  if (attr == cudaFuncAttributePreferredSharedMemoryCarveout) return cudaSuccess;
  set_error(cudaErrorInvalidValue,
            format("fused_bn CUDA emulator: cudaFuncSetAttribute(%d, %d) is not valid",
                   int(attr), value));
  return cudaErrorInvalidValue;
}

cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, const void* func,
                                                          int block_size, size_t smem) {
  using namespace fused_bn_emu;
  if (block_size < 1 || block_size > 1024 || smem > size_t(max_dynamic_smem(func))) {
    *n = 0;
    if (block_size < 1 || block_size > 1024) {
      set_error(cudaErrorInvalidValue,
                format("fused_bn CUDA emulator: occupancy of blocks of %d threads",
                       block_size));
      return cudaErrorInvalidValue;
    }
    return cudaSuccess;
  }
  *n = occupancy(block_size, smem);
  return cudaSuccess;
}

}  // extern "C"
