// Tests of the CPU emulator of the CUDA kernels (csrc/emu): warp collectives
// against CUDA's lane rules computed here, barriers, shared memory, atomics,
// cooperative grids, run orders, the device model, and every misuse it must
// report (with the kernel, block, thread and source line in the message).
// Run by scripts/gpu_emu_check.sh: emu_test [name-substring].
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <initializer_list>
#include <string>
#include <vector>

#include "cuda_launch.h"

using fused_bn::cuda::launch;
using fused_bn::cuda::launch_cooperative;

namespace {

int g_failed = 0;
int g_checks_failed = 0;

#define CHECK(cond)                                                   \
  do {                                                                \
    if (!(cond)) {                                                    \
      std::printf("  CHECK failed at line %d: %s\n", __LINE__, #cond); \
      ++g_checks_failed;                                              \
    }                                                                 \
  } while (0)

// The launch error and its message; clears it.
std::string launch_error() {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? "" : cudaGetErrorString(e);
}

bool contains(const std::string& s, const std::string& part) {
  return s.find(part) != std::string::npos;
}

#define CHECK_ERROR(msg, ...)                                               \
  do {                                                                      \
    const std::string m_ = (msg);                                           \
    for (const std::string& part : std::initializer_list<std::string>{     \
             __VA_ARGS__}) {                                                \
      if (!contains(m_, part)) {                                            \
        std::printf("  line %d: error lacks '%s': '%s'\n", __LINE__,        \
                    part.c_str(), m_.c_str());                              \
        ++g_checks_failed;                                                  \
      }                                                                     \
    }                                                                       \
  } while (0)

std::string line_str(int line) { return "emu_test.cc:" + std::to_string(line); }

template <typename T>
T* dalloc(size_t n) {
  void* p = nullptr;
  cudaMalloc(&p, n * sizeof(T));
  std::memset(p, 0, n * sizeof(T));
  return static_cast<T*>(p);
}

// ---------------------------------------------------------------- shuffles

enum Mode { kIdx, kUp, kDown, kXor };

// CUDA's rule for the source lane, or -1 for the caller's own value.
int ref_src(Mode m, int lane, int arg, int width) {
  const int seg = lane & ~(width - 1);
  switch (m) {
    case kIdx: return seg + (arg & (width - 1));
    case kUp: return lane - arg >= seg ? lane - arg : -1;
    case kDown: return lane + arg < seg + width ? lane + arg : -1;
    case kXor: return (lane ^ arg) < seg + width ? lane ^ arg : -1;
  }
  return -1;
}

__global__ void shfl_kernel(Mode m, int arg, int width, float* outf, double* outd,
                            __half* outh, int* outi) {
  const int t = threadIdx.x;
  const float vf = 100.f + t;
  const double vd = 1000.0 + t;
  const __half vh = __float2half_rn(float(t));
  const int vi = -t;
  switch (m) {
    case kIdx:
      outf[t] = __shfl_sync(0xffffffffu, vf, arg, width);
      outd[t] = __shfl_sync(0xffffffffu, vd, arg, width);
      outh[t] = __shfl_sync(0xffffffffu, vh, arg, width);
      outi[t] = __shfl_sync(0xffffffffu, vi, arg, width);
      break;
    case kUp:
      outf[t] = __shfl_up_sync(0xffffffffu, vf, arg, width);
      outd[t] = __shfl_up_sync(0xffffffffu, vd, arg, width);
      outh[t] = __shfl_up_sync(0xffffffffu, vh, arg, width);
      outi[t] = __shfl_up_sync(0xffffffffu, vi, arg, width);
      break;
    case kDown:
      outf[t] = __shfl_down_sync(0xffffffffu, vf, arg, width);
      outd[t] = __shfl_down_sync(0xffffffffu, vd, arg, width);
      outh[t] = __shfl_down_sync(0xffffffffu, vh, arg, width);
      outi[t] = __shfl_down_sync(0xffffffffu, vi, arg, width);
      break;
    case kXor:
      outf[t] = __shfl_xor_sync(0xffffffffu, vf, arg, width);
      outd[t] = __shfl_xor_sync(0xffffffffu, vd, arg, width);
      outh[t] = __shfl_xor_sync(0xffffffffu, vh, arg, width);
      outi[t] = __shfl_xor_sync(0xffffffffu, vi, arg, width);
      break;
  }
}

void test_shuffles() {
  const int n = 64;  // two warps
  float* f = dalloc<float>(n);
  double* d = dalloc<double>(n);
  __half* h = dalloc<__half>(n);
  int* i = dalloc<int>(n);
  for (Mode m : {kIdx, kUp, kDown, kXor}) {
    for (int width : {32, 16, 8, 4, 2, 1}) {
      for (int arg : {0, 1, 3, 5, 16, 31, 33, -1}) {
        if (arg < 0 && (m == kUp || m == kDown)) continue;
        launch<shfl_kernel>(1, n, 0, nullptr, m, arg, width, f, d, h, i);
        CHECK(launch_error().empty());
        for (int t = 0; t < n; ++t) {
          const int lane = t % 32;
          const int s = ref_src(m, lane, arg, width);
          const int src = s < 0 ? t : t - lane + s;
          if (f[t] != 100.f + src || d[t] != 1000.0 + src ||
              __half2float(h[t]) != float(src) || i[t] != -src) {
            std::printf("  mode %d width %d arg %d thread %d: got %g, want %d\n", m,
                        width, arg, t, double(f[t]) - 100, src);
            ++g_checks_failed;
            break;
          }
        }
      }
    }
  }
  cudaFree(f), cudaFree(d), cudaFree(h), cudaFree(i);
}

__global__ void vote_kernel(unsigned* ballot, int* any, int* all, int* cnt, int* and_,
                            int* or_) {
  const int t = threadIdx.x;
  ballot[t] = __ballot_sync(0xffffffffu, t % 3 == 0);
  any[t] = __any_sync(0xffffffffu, t == 40);
  all[t] = __all_sync(0xffffffffu, t < 48);
  cnt[t] = __syncthreads_count(t % 5 == 0);
  and_[t] = __syncthreads_and(t < 64);
  or_[t] = __syncthreads_or(t == 63);
}

void test_votes() {
  unsigned* b = dalloc<unsigned>(64);
  int *any = dalloc<int>(64), *all = dalloc<int>(64), *cnt = dalloc<int>(64),
      *and_ = dalloc<int>(64), *or_ = dalloc<int>(64);
  launch<vote_kernel>(1, 64, 0, nullptr, b, any, all, cnt, and_, or_);
  CHECK(launch_error().empty());
  unsigned want = 0;
  for (int l = 0; l < 32; ++l) want |= unsigned(l % 3 == 0) << l;
  const unsigned want1 = [] {
    unsigned w = 0;
    for (int l = 0; l < 32; ++l) w |= unsigned((32 + l) % 3 == 0) << l;
    return w;
  }();
  CHECK(b[0] == want && b[31] == want && b[32] == want1);
  CHECK(any[0] == 0 && any[33] == 1);
  CHECK(all[0] == 1 && all[32] == 0);
  CHECK(cnt[0] == 13 && cnt[63] == 13);
  CHECK(and_[5] == 1 && or_[5] == 1);
  cudaFree(b), cudaFree(any), cudaFree(all), cudaFree(cnt), cudaFree(and_), cudaFree(or_);
}

// ---------------------------------------------------------------- blocks

// A shared-memory tree sum over a 3-D block; result per block.
__global__ void tree_kernel(const float* x, float* out, bool barriers) {
  __shared__ float sh[256];
  const unsigned t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const unsigned n = blockDim.x * blockDim.y * blockDim.z;
  const unsigned b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  sh[t] = x[b * n + t];
  for (unsigned s = n / 2; s > 0; s /= 2) {
    if (barriers) __syncthreads();
    if (t < s) sh[t] += sh[t + s];
  }
  if (t == 0) out[b] = sh[0];
}

void test_blocks_and_orders() {
  const dim3 grid(3, 2, 2), block(4, 8, 8);
  const int blocks = 12, n = 256;
  float* x = dalloc<float>(blocks * n);
  float* out = dalloc<float>(blocks);
  for (int i = 0; i < blocks * n; ++i) x[i] = float(i % 97);
  for (const char* order : {"forward", "reverse", "random", "random:7"}) {
    setenv("FUSED_BN_EMU_ORDER", order, 1);
    launch<tree_kernel>(grid, block, 0, nullptr, x, out, true);
    CHECK(launch_error().empty());
    for (int b = 0; b < blocks; ++b) {
      float want = 0;
      for (int t = 0; t < n; ++t) want += x[b * n + t];
      CHECK(out[b] == want);
    }
  }
  // Without barriers the forward order reads partner slots before they are
  // written (poisoned with NaN): the result is wrong, not an error.
  setenv("FUSED_BN_EMU_ORDER", "forward", 1);
  launch<tree_kernel>(grid, block, 0, nullptr, x, out, false);
  CHECK(launch_error().empty());
  CHECK(std::isnan(out[0]));
  setenv("FUSED_BN_EMU_ORDER", "sideways", 1);
  launch<tree_kernel>(grid, block, 0, nullptr, x, out, true);
  CHECK_ERROR(launch_error(), "FUSED_BN_EMU_ORDER", "sideways");
  unsetenv("FUSED_BN_EMU_ORDER");
  cudaFree(x), cudaFree(out);
}

// Records the order in which threads first run.
__global__ void order_kernel(int* seq, int* pos) {
  const int t = threadIdx.x + blockIdx.x * blockDim.x;
  seq[atomicAdd(pos, 1)] = t;
}

void test_order_switch() {
  int* seq = dalloc<int>(128);
  int* pos = dalloc<int>(1);
  auto run = [&](const char* order) {
    setenv("FUSED_BN_EMU_ORDER", order, 1);
    *pos = 0;
    launch<order_kernel>(2, 64, 0, nullptr, seq, pos);
    CHECK(launch_error().empty() && *pos == 128);
    return std::vector<int>(seq, seq + 128);
  };
  const std::vector<int> fwd = run("forward"), rev = run("reverse"), rnd = run("random:3");
  for (int i = 0; i < 128; ++i) {
    CHECK(fwd[i] == i);
    CHECK(rev[i] == 127 - i);
  }
  CHECK(rnd != fwd && rnd != rev);
  unsetenv("FUSED_BN_EMU_ORDER");
  cudaFree(seq), cudaFree(pos);
}

// Dynamic shared memory, poisoned before each block; one copy per block.
__global__ void dyn_kernel(float* out) {
  FUSED_BN_DYNAMIC_SHARED(float, sh);
  const int t = threadIdx.x;
  out[blockIdx.x * 2] = sh[t];  // never written: NaN
  sh[t] = float(blockIdx.x);
  __syncthreads();
  if (t == 0) {
    float s = 0;
    for (int i = 0; i < int(blockDim.x); ++i) s += sh[i];
    out[blockIdx.x * 2 + 1] = s;
  }
}

void test_dynamic_shared() {
  float* out = dalloc<float>(8);
  launch<dyn_kernel>(4, 32, 32 * sizeof(float), nullptr, out);
  CHECK(launch_error().empty());
  for (int b = 0; b < 4; ++b) CHECK(std::isnan(out[2 * b]) && out[2 * b + 1] == 32.f * b);
  launch<dyn_kernel>(1, 32, 64 * 1024, nullptr, out);
  CHECK_ERROR(launch_error(), "dyn_kernel", "65536 bytes of dynamic shared memory",
              "49152");
  CHECK(cudaFuncSetAttribute(dyn_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             100 * 1024) == cudaSuccess);
  launch<dyn_kernel>(1, 32, 64 * 1024, nullptr, out);
  CHECK(launch_error().empty());
  CHECK(cudaFuncSetAttribute(dyn_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             228 * 1024) == cudaErrorInvalidValue);
  CHECK(cudaGetLastError() == cudaErrorInvalidValue);
  cudaFree(out);
}

// The last block to finish sums the per-block partials (fence + counter).
__global__ void last_block_kernel(const float* x, float* partial, unsigned* counter,
                                  float* total) {
  __shared__ bool is_last;
  __shared__ float sh[64];
  const int t = threadIdx.x;
  sh[t] = x[blockIdx.x * 64 + t];
  __syncthreads();
  if (t == 0) {
    float s = 0;
    for (int i = 0; i < 64; ++i) s += sh[i];
    partial[blockIdx.x] = s;
    __threadfence();
    is_last = atomicInc(counter, gridDim.x - 1) == gridDim.x - 1;
  }
  __syncthreads();
  if (is_last && t == 0) {
    float s = 0;
    for (unsigned b = 0; b < gridDim.x; ++b) s += partial[b];
    *total = s;
  }
}

void test_last_block_done() {
  float* x = dalloc<float>(64 * 10);
  float* partial = dalloc<float>(10);
  unsigned* counter = dalloc<unsigned>(1);
  float* total = dalloc<float>(1);
  for (int i = 0; i < 640; ++i) x[i] = float(i % 13);
  float want = 0;
  for (int i = 0; i < 640; ++i) want += x[i];
  for (const char* order : {"forward", "reverse", "random:5"}) {
    setenv("FUSED_BN_EMU_ORDER", order, 1);
    *total = -1;
    launch<last_block_kernel>(10, 64, 0, nullptr, x, partial, counter, total);
    CHECK(launch_error().empty());
    CHECK(*total == want && *counter == 0);  // atomicInc wraps to 0
  }
  unsetenv("FUSED_BN_EMU_ORDER");
  cudaFree(x), cudaFree(partial), cudaFree(counter), cudaFree(total);
}

// ---------------------------------------------------------------- cooperative

// Each block keeps its sum in static shared memory across the grid sync;
// then every block reads all partials.
__global__ void coop_kernel(const float* x, float* partial, float* out) {
  __shared__ float mine;
  auto grid = cooperative_groups::this_grid();
  const int t = threadIdx.x;
  if (t == 0) {
    float s = 0;
    for (unsigned i = 0; i < blockDim.x; ++i) s += x[blockIdx.x * blockDim.x + i];
    mine = s;
    partial[blockIdx.x] = s;
  }
  grid.sync();
  if (t == 0) {
    float s = 0;
    for (unsigned b = 0; b < gridDim.x; ++b) s += partial[b];
    out[blockIdx.x * 2] = s;
    out[blockIdx.x * 2 + 1] = mine;
  }
}

void test_cooperative() {
  int sms = 0, per_sm = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, coop_kernel, 128, 0);
  CHECK(per_sm == 16);
  setenv("FUSED_BN_EMU_SMS", "2", 1);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  CHECK(sms == 2);
  const int blocks = 32, n = 128;
  float* x = dalloc<float>(blocks * n);
  float* partial = dalloc<float>(blocks);
  float* out = dalloc<float>(2 * blocks);
  for (int i = 0; i < blocks * n; ++i) x[i] = float(i % 7);
  for (const char* order : {"forward", "reverse", "random:9"}) {
    setenv("FUSED_BN_EMU_ORDER", order, 1);
    CHECK(launch_cooperative<coop_kernel>(blocks, n, 0, nullptr, x, partial, out) ==
          cudaSuccess);
    CHECK(launch_error().empty());
    float total = 0;
    for (int i = 0; i < blocks * n; ++i) total += x[i];
    for (int b = 0; b < blocks; ++b) {
      float s = 0;
      for (int i = 0; i < n; ++i) s += x[b * n + i];
      CHECK(out[2 * b] == total && out[2 * b + 1] == s);
    }
  }
  unsetenv("FUSED_BN_EMU_ORDER");
  CHECK(launch_cooperative<coop_kernel>(blocks + 1, n, 0, nullptr, x, partial, out) ==
        cudaErrorCooperativeLaunchTooLarge);
  CHECK_ERROR(launch_error(), "cooperative grid of 33 blocks", "16 per SM x 2 SMs");
  launch<coop_kernel>(2, n, 0, nullptr, x, partial, out);
  CHECK_ERROR(launch_error(), "this_grid().sync()", "not launched cooperatively",
              "coop_kernel");
  unsetenv("FUSED_BN_EMU_SMS");
  cudaFree(x), cudaFree(partial), cudaFree(out);
}

// ---------------------------------------------------------------- misuse

// The collectives' lines, which the messages must name.
constexpr int kDivergentA = __LINE__ + 3, kDivergentB = __LINE__ + 5;
__global__ void divergent_barrier_kernel(int* out) {
  if (threadIdx.x < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

constexpr int kBranchShuffle = __LINE__ + 3;
__global__ void branch_shuffle_kernel(float* out) {
  float v = float(threadIdx.x);
  if (threadIdx.x % 32 < 16) v += __shfl_down_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

constexpr int kExitedLane = __LINE__ + 3;
__global__ void exited_lane_kernel(float* out) {
  if (threadIdx.x == 5) return;
  out[threadIdx.x] = __shfl_sync(0xffffffffu, 1.f, 0);
}

constexpr int kPartialWarp = __LINE__ + 2;
__global__ void partial_warp_kernel(float* out) {
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.f, 1);
}

constexpr int kBarrierVsShuffleA = __LINE__ + 4, kBarrierVsShuffleB = __LINE__ + 6;
__global__ void barrier_vs_shuffle_kernel(float* out) {
  float v = 1.f;
  if (threadIdx.x == 0) {
    __syncthreads();
  } else {
    v = __shfl_sync(0xffffffffu, v, 0);
  }
  out[threadIdx.x] = v;
}

__global__ void mask_without_self_kernel(float* out) {
  out[threadIdx.x] = __shfl_sync(0x1u, 1.f, 0);
}

__global__ void outside_mask_kernel(float* out) {
  out[threadIdx.x] = __shfl_sync(0x0000ffffu, 1.f, 20);
}

__global__ void bad_width_kernel(float* out) {
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, 1.f, 1, 12);
}

__global__ void trap_kernel(float* out) {
  if (blockIdx.x == 1 && threadIdx.x == 3) __trap();
  out[threadIdx.x] = 0;
}

__global__ void nothing_kernel(float*) {}

void test_misuse() {
  int* oi = dalloc<int>(1024);
  float* o = dalloc<float>(1024);
  std::string e;

  launch<divergent_barrier_kernel>(dim3(2, 3), 64, 0, nullptr, oi);
  e = launch_error();
  CHECK_ERROR(e, "divergent_barrier_kernel", "block (0,0,0)", "different barriers",
              "thread (0,0,0)", "thread (32,0,0)", line_str(kDivergentA).c_str(),
              line_str(kDivergentB).c_str());
  CHECK(launch_error().empty());  // cleared by the read

  launch<branch_shuffle_kernel>(1, 32, 0, nullptr, o);
  e = launch_error();
  CHECK_ERROR(e, "branch_shuffle_kernel", "__shfl_down_sync()",
              line_str(kBranchShuffle).c_str(), "thread (16,0,0)", "exited");

  launch<exited_lane_kernel>(1, 32, 0, nullptr, o);
  e = launch_error();
  CHECK_ERROR(e, "exited_lane_kernel", "thread (5,0,0)", "exited", line_str(kExitedLane).c_str());

  launch<partial_warp_kernel>(1, 48, 0, nullptr, o);
  e = launch_error();
  CHECK_ERROR(e, "partial_warp_kernel", "thread (32,0,0)", "lane 16", "does not exist",
              "48 threads", line_str(kPartialWarp).c_str());

  launch<barrier_vs_shuffle_kernel>(1, 32, 0, nullptr, o);
  e = launch_error();
  CHECK_ERROR(e, "barrier_vs_shuffle_kernel", "waits forever",
              line_str(kBarrierVsShuffleB).c_str(), "lane 0", "__syncthreads()",
              line_str(kBarrierVsShuffleA).c_str(), "divergent");

  launch<mask_without_self_kernel>(1, 32, 0, nullptr, o);
  e = launch_error();
  CHECK_ERROR(e, "thread (1,0,0)", "does not name the calling lane 1");

  launch<outside_mask_kernel>(1, 16, 0, nullptr, o);
  e = launch_error();
  CHECK_ERROR(e, "reads lane 20", "does not name");

  launch<bad_width_kernel>(1, 32, 0, nullptr, o);
  e = launch_error();
  CHECK_ERROR(e, "width 12 is not a power of 2");

  launch<trap_kernel>(4, 32, 0, nullptr, o);
  e = launch_error();
  CHECK_ERROR(e, "trap_kernel", "block (1,0,0)", "thread (3,0,0)", "__trap()");

  const struct {
    dim3 grid, block;
    const char* what;
  } bad[] = {
      {dim3(1), dim3(1025), "block (1025,1,1)"},
      {dim3(1), dim3(32, 32, 2), "block (32,32,2)"},
      {dim3(1), dim3(1, 1, 65), "block (1,1,65)"},
      {dim3(1), dim3(0), "block (0,1,1)"},
      {dim3(0), dim3(32), "grid (0,1,1)"},
      {dim3(1, 65536), dim3(32), "grid (1,65536,1)"},
      {dim3(1, 1, 65536), dim3(32), "grid (1,1,65536)"},
  };
  for (const auto& b : bad) {
    launch<nothing_kernel>(b.grid, b.block, 0, nullptr, o);
    CHECK(cudaPeekAtLastError() == cudaErrorInvalidConfiguration);
    e = launch_error();
    CHECK_ERROR(e, "nothing_kernel", b.what);
  }
  cudaFree(oi), cudaFree(o);
}

void test_device_model() {
  int v = 0, n = 0;
  cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, 0);
  CHECK(v == 132);
  cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerMultiprocessor, 0);
  CHECK(v == 228 * 1024);
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, nothing_kernel, 256, 0);
  CHECK(n == 8);
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, nothing_kernel, 1024, 0);
  CHECK(n == 2);
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, nothing_kernel, 32, 0);
  CHECK(n == 32);
  cudaFuncSetAttribute(nothing_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                       200 * 1024);
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, nothing_kernel, 256, 100 * 1024);
  CHECK(n == 2);
  CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrClockRate, 0) == cudaErrorInvalidValue);
  CHECK_ERROR(launch_error(), "not modelled");
  int dev = -1;
  CHECK(cudaGetDevice(&dev) == cudaSuccess && dev == 0);
}

}  // namespace

int main(int argc, char** argv) {
  const std::string only = argc > 1 ? argv[1] : "";
  const std::vector<std::pair<const char*, std::function<void()>>> tests = {
      {"shuffles", test_shuffles},
      {"votes", test_votes},
      {"blocks_and_orders", test_blocks_and_orders},
      {"order_switch", test_order_switch},
      {"dynamic_shared", test_dynamic_shared},
      {"last_block_done", test_last_block_done},
      {"cooperative", test_cooperative},
      {"misuse", test_misuse},
      {"device_model", test_device_model},
  };
  int passed = 0;
  for (const auto& [name, fn] : tests) {
    if (!only.empty() && std::string(name).find(only) == std::string::npos) continue;
    g_checks_failed = 0;
    fn();
    std::printf("emu_test %s: %s\n", name, g_checks_failed ? "FAILED" : "ok");
    g_checks_failed ? ++g_failed : ++passed;
  }
  std::printf("%d passed, %d failed\n", passed, g_failed);
  return g_failed ? 1 : 0;
}
