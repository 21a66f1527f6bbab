// cuda_runtime.h of the CPU emulator of the fused_bn CUDA kernels: a
// test-only backend that compiles csrc/kernels/bn_cuda.cu unmodified as C++
// (g++, this folder first on the include path, NVIDIA's headers from the
// toolkit next to nvcc for the types and for half/bfloat16) and runs its
// kernels on the CPU, so that CI checks every CUDA change without a GPU.
//
// Model
// - Each CUDA thread is a fiber (csrc/emu/emu.cc: a small x86-64 context
//   switch, ucontext elsewhere) with its own threadIdx/blockIdx. A launch
//   runs its blocks one after another; the fibers of a block run one at a
//   time, each until it reaches a collective, then the next one.
// - __syncthreads() is a real barrier: every live thread of the block must
//   reach the same call site (file:line), threads that exited are excused.
// - Warp collectives (__shfl_*_sync, __syncwarp, __ballot_sync, __any_sync,
//   __all_sync) complete when every lane named in the mask is at the same
//   call site with the same mask; lane, width and out-of-range rules are
//   CUDA's (warpSize 32).
// - __shared__ variables are `static thread_local`: one copy for the block
//   being run (the kernels' module must define no other thread_local). They
//   are filled with 0xff bytes (NaN) before every block, as is the dynamic
//   shared memory (FUSED_BN_DYNAMIC_SHARED, cuda_launch.h), an exact-size
//   heap buffer so that AddressSanitizer sees overruns.
// - Cooperative launches (launch_cooperative, cooperative_groups.h) keep
//   every block alive; this_grid().sync() is a grid barrier. The grid may
//   have at most occupancy x SMs blocks, as on the GPU; FUSED_BN_EMU_SMS
//   shrinks the emulated SM count (default 132, an H200) to bound memory.
// - The run order of blocks and of threads within a round is chosen by
//   FUSED_BN_EMU_ORDER=forward|reverse|random[:seed] (default forward;
//   random reshuffles the threads at every round, seed default 1).
// - Misuse is a launch error (cudaGetLastError, then the launcher's Status)
//   whose message names the kernel, block, thread and source line: threads
//   at different __syncthreads(), a warp collective whose lanes are not all
//   at it, a lane named in a mask that has exited or does not exist, a
//   thread reading a shuffle lane outside the mask, a bad width, deadlock,
//   grid.sync() outside a cooperative launch, launch limits (block > 1024
//   threads or dims over CUDA's, grid dims over CUDA's or zero, dynamic
//   shared memory over the kernel's limit, a cooperative grid over
//   occupancy x SMs), __trap().
// - Fiber stacks are 64 KB (512 KB under ASan), FUSED_BN_EMU_STACK_KB to
//   change; FUSED_BN_EMU_STACK_STATS=1 prints the deepest use at exit. A
//   fault inside a kernel names the kernel, block and thread.
// - Device memory is host memory (cudaMalloc: 256-byte aligned, exact size);
//   streams are a no-op handle and every launch runs to completion at once.
//   The device (cudaDeviceGetAttribute, occupancy) is an H200: 132 SMs,
//   2048 threads, 32 blocks and 228 KB shared memory per SM, 48 KB per block
//   (227 KB opt-in).
// Limits: arithmetic is exact IEEE on the CPU (nvcc's FMA contraction, and
// the approximate divisions, rsqrt and flushed denormals of --use_fast_math,
// which the kernels are not built with, are not reproduced); registers,
// __launch_bounds__, static shared memory in occupancy, memory fences,
// inter-block spin waits (they hang), timing and races between blocks are
// not modelled.
#pragma once

#ifdef __CUDACC__
#error "csrc/emu/include is the CPU emulator's: nvcc uses the real headers"
#endif

#include <cuda_runtime_api.h>  // NVIDIA's types and C API (defined by emu.cc)
#include <math.h>

#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#undef __shared__
#define __shared__ static thread_local
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

namespace fused_bn_emu {

// What a kernel sees as threadIdx, blockIdx, blockDim, gridDim.
struct ThreadCtx {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
};
extern const ThreadCtx* g_ctx;  // the running fiber's

enum class Op : int {
  kSyncThreads, kSyncThreadsCount, kSyncThreadsAnd, kSyncThreadsOr,
  kShflIdx, kShflUp, kShflDown, kShflXor, kSyncWarp, kBallot, kAny, kAll,
  kGridSync,
};

// Collectives (the calling fiber waits until its partners arrive).
uint64_t block_op(Op op, int pred, const char* file, int line);
uint64_t warp_op(Op op, unsigned mask, uint64_t value, int64_t arg, int width,
                 const char* file, int line);
void grid_sync(const char* file, int line);
[[noreturn]] void trap(const char* file, int line);
void yield();
void* dynamic_shared_ptr();

template <typename T>
T* dynamic_shared() {
  return static_cast<T*>(dynamic_shared_ptr());
}

// One launch: `entry(args)` runs the kernel body of one thread.
struct LaunchSpec {
  const void* key;   // the kernel function
  const char* name;  // __PRETTY_FUNCTION__ of launch<Kernel>
  dim3 grid, block;
  size_t smem;
  bool cooperative;
  void (*entry)(void* args);
  void* args;
  const void* tls_anchor;  // a thread_local of the kernel's module
};
void launch_impl(const LaunchSpec& spec);

template <typename F>
struct KernelParams;
template <typename... P>
struct KernelParams<void (*)(P...)> {
  using type = std::tuple<std::remove_cv_t<P>...>;
};

// Touching it allocates this thread's TLS block of the kernel's module (the
// __shared__ variables) before emu.cc looks it up.
[[maybe_unused]] static thread_local char tls_anchor;

template <auto Kernel, typename... Args>
void launch(dim3 grid, dim3 block, size_t smem, cudaStream_t, bool cooperative,
            Args&&... args) {
  using Params = typename KernelParams<decltype(Kernel)>::type;
  Params params(std::forward<Args>(args)...);
  LaunchSpec s{reinterpret_cast<const void*>(Kernel),
               __PRETTY_FUNCTION__,
               grid,
               block,
               smem,
               cooperative,
               [](void* p) { std::apply(Kernel, *static_cast<Params*>(p)); },
               &params,
               &tls_anchor};
  launch_impl(s);
}

template <typename T>
uint64_t to_bits(const T& v) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8,
                "the emulator shuffles trivially copyable types of <= 8 bytes");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <typename T>
T from_bits(uint64_t b) {
  T v;
  std::memcpy(static_cast<void*>(&v), &b, sizeof(T));
  return v;
}

}  // namespace fused_bn_emu

#define threadIdx (::fused_bn_emu::g_ctx->thread_idx)
#define blockIdx (::fused_bn_emu::g_ctx->block_idx)
#define blockDim (::fused_bn_emu::g_ctx->block_dim)
#define gridDim (::fused_bn_emu::g_ctx->grid_dim)
constexpr int warpSize = 32;

// ---------------------------------------------------------------- collectives
// The call site (file:line of the caller) identifies a collective.

inline void __syncthreads(const char* file = __builtin_FILE(),
                          int line = __builtin_LINE()) {
  ::fused_bn_emu::block_op(::fused_bn_emu::Op::kSyncThreads, 0, file, line);
}
inline int __syncthreads_count(int pred, const char* file = __builtin_FILE(),
                               int line = __builtin_LINE()) {
  return int(::fused_bn_emu::block_op(::fused_bn_emu::Op::kSyncThreadsCount,
                                      pred, file, line));
}
inline int __syncthreads_and(int pred, const char* file = __builtin_FILE(),
                             int line = __builtin_LINE()) {
  return int(::fused_bn_emu::block_op(::fused_bn_emu::Op::kSyncThreadsAnd,
                                      pred, file, line));
}
inline int __syncthreads_or(int pred, const char* file = __builtin_FILE(),
                            int line = __builtin_LINE()) {
  return int(::fused_bn_emu::block_op(::fused_bn_emu::Op::kSyncThreadsOr,
                                      pred, file, line));
}

inline void __syncwarp(unsigned mask = 0xffffffffu,
                       const char* file = __builtin_FILE(),
                       int line = __builtin_LINE()) {
  ::fused_bn_emu::warp_op(::fused_bn_emu::Op::kSyncWarp, mask, 0, 0, 32, file,
                          line);
}
inline unsigned __ballot_sync(unsigned mask, int pred,
                              const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
  return unsigned(::fused_bn_emu::warp_op(::fused_bn_emu::Op::kBallot, mask,
                                          pred != 0, 0, 32, file, line));
}
inline int __any_sync(unsigned mask, int pred,
                      const char* file = __builtin_FILE(),
                      int line = __builtin_LINE()) {
  return int(::fused_bn_emu::warp_op(::fused_bn_emu::Op::kAny, mask, pred != 0,
                                     0, 32, file, line));
}
inline int __all_sync(unsigned mask, int pred,
                      const char* file = __builtin_FILE(),
                      int line = __builtin_LINE()) {
  return int(::fused_bn_emu::warp_op(::fused_bn_emu::Op::kAll, mask, pred != 0,
                                     0, 32, file, line));
}

template <typename T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize,
              const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  using namespace ::fused_bn_emu;
  return from_bits<T>(warp_op(Op::kShflIdx, mask, to_bits(var), src_lane,
                              width, file, line));
}
template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                 const char* file = __builtin_FILE(),
                 int line = __builtin_LINE()) {
  using namespace ::fused_bn_emu;
  return from_bits<T>(
      warp_op(Op::kShflUp, mask, to_bits(var), delta, width, file, line));
}
template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize,
                   const char* file = __builtin_FILE(),
                   int line = __builtin_LINE()) {
  using namespace ::fused_bn_emu;
  return from_bits<T>(
      warp_op(Op::kShflDown, mask, to_bits(var), delta, width, file, line));
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize,
                  const char* file = __builtin_FILE(),
                  int line = __builtin_LINE()) {
  using namespace ::fused_bn_emu;
  return from_bits<T>(
      warp_op(Op::kShflXor, mask, to_bits(var), lane_mask, width, file, line));
}

[[noreturn]] inline void __trap(const char* file = __builtin_FILE(),
                                int line = __builtin_LINE()) {
  ::fused_bn_emu::trap(file, line);
}
// A yield point: lets other threads of the block run (spin waits).
inline void __nanosleep(unsigned) { ::fused_bn_emu::yield(); }

// ---------------------------------------------------------------- memory
// One OS thread runs a launch, so fences are compiler barriers and atomics
// are plain read-modify-writes (done atomically all the same).

inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_system() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

template <typename T>
T __ldg(const T* p) {
  return *p;
}

#define FUSED_BN_EMU_ATOMIC_INT(T)                                           \
  inline T atomicAdd(T* p, T v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }     \
  inline T atomicSub(T* p, T v) { return __atomic_fetch_sub(p, v, __ATOMIC_SEQ_CST); }     \
  inline T atomicExch(T* p, T v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }   \
  inline T atomicAnd(T* p, T v) { return __atomic_fetch_and(p, v, __ATOMIC_SEQ_CST); }     \
  inline T atomicOr(T* p, T v) { return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST); }       \
  inline T atomicXor(T* p, T v) { return __atomic_fetch_xor(p, v, __ATOMIC_SEQ_CST); }     \
  inline T atomicMin(T* p, T v) {                                            \
    T old = *p;                                                              \
    if (v < old) *p = v;                                                     \
    return old;                                                              \
  }                                                                          \
  inline T atomicMax(T* p, T v) {                                            \
    T old = *p;                                                              \
    if (v > old) *p = v;                                                     \
    return old;                                                              \
  }                                                                          \
  inline T atomicCAS(T* p, T compare, T v) {                                 \
    __atomic_compare_exchange_n(p, &compare, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                \
    return compare;                                                          \
  }
FUSED_BN_EMU_ATOMIC_INT(int)
FUSED_BN_EMU_ATOMIC_INT(unsigned int)
FUSED_BN_EMU_ATOMIC_INT(unsigned long long)
#undef FUSED_BN_EMU_ATOMIC_INT

inline float atomicAdd(float* p, float v) {
  const float old = *p;
  *p = old + v;
  return old;
}
inline double atomicAdd(double* p, double v) {
  const double old = *p;
  *p = old + v;
  return old;
}
inline unsigned atomicInc(unsigned* p, unsigned limit) {
  const unsigned old = *p;
  *p = old >= limit ? 0u : old + 1u;
  return old;
}
inline unsigned atomicDec(unsigned* p, unsigned limit) {
  const unsigned old = *p;
  *p = old == 0u || old > limit ? limit : old - 1u;
  return old;
}

// ---------------------------------------------------------------- math
// Exact versions of the device intrinsics (nvcc's are approximate).

inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __saturatef(float x) { return x < 0.f ? 0.f : x > 1.f ? 1.f : x; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(unsigned(x)); }

#define FUSED_BN_EMU_MINMAX(T)                          \
  inline T min(T a, T b) { return b < a ? b : a; }       \
  inline T max(T a, T b) { return a < b ? b : a; }
FUSED_BN_EMU_MINMAX(int)
FUSED_BN_EMU_MINMAX(unsigned int)
FUSED_BN_EMU_MINMAX(long)
FUSED_BN_EMU_MINMAX(unsigned long)
FUSED_BN_EMU_MINMAX(long long)
FUSED_BN_EMU_MINMAX(unsigned long long)
#undef FUSED_BN_EMU_MINMAX
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
inline double min(float a, double b) { return fmin(a, b); }
inline double max(float a, double b) { return fmax(a, b); }
inline double min(double a, float b) { return fmin(a, b); }
inline double max(double a, float b) { return fmax(a, b); }

// ---------------------------------------------------------------- host API
// The runtime's C++ templates over the C API of cuda_runtime_api.h.

template <typename T>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(
    int* num_blocks, T func, int block_size, size_t dynamic_smem) {
  return ::cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      num_blocks, reinterpret_cast<const void*>(func), block_size,
      dynamic_smem);
}
template <typename T>
cudaError_t cudaFuncSetAttribute(T* func, cudaFuncAttribute attr, int value) {
  return ::cudaFuncSetAttribute(reinterpret_cast<const void*>(func), attr,
                                value);
}
