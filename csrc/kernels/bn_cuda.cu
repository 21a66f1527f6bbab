// CUDA kernels for bn_cuda.h.
//
// Every operation is a reduction stage and/or an elementwise stage:
//   reduce:   per-thread Welford (or plain sums for the backward) over a slab
//             of the reduced axes, merged over the block in a fixed tree
//             order. With one block-row (gy == 1, small tensors) the block
//             finalises its channels itself; otherwise it writes partials
//             [gy, C] to the workspace, and the last block of each block
//             column (a counter per column) merges them per channel in
//             block order (Chan, in double), in the same launch. No float
//             atomics: results are bitwise identical run to run.
//   apply:    y = (x - mean) * k + b, or the dx formula, with per-channel
//             coefficients computed once per channel into the workspace
//             ([2, C] k = scale * inv_std, b = offset; [3, C] for dx) by the
//             reduction's finalisation, or by a small per-channel launch
//             when there is no reduction (inference, normalize): the apply
//             threads do no per-channel math (no double sqrt or division).
// The epilogue: the normalize apply adds a side input and applies relu in
// float before its one rounding; the backward's reduction masks dy by the
// forward's y > 0 and writes the masked dy (to dside, or to dx's buffer),
// which its dx apply then reads in place of dy.
// Finalising a training forward updates the moving statistics in the same
// launch; the warm-up counter is read there and incremented once by the
// following apply launch of the same forward (every block of the finalising
// launch must read the old value first).
// Loads are 16-byte vectors where the layout and pointers allow (channels-last:
// C a multiple of the vector width and 16-byte aligned pointers; channels-
// first: equal pointer misalignment, each row then has a scalar head, an
// aligned vector body and a scalar tail); otherwise scalar.
// Arithmetic is IEEE (CMakeLists.txt builds without --use_fast_math): the
// Welford and Chan divisions are correctly rounded, float32 denormals are
// kept, and the per-channel math (bn_math.h) is double, as on the CPU and
// in the emulator, which can then check the numerics too (up to nvcc's
// contraction of a * b + c into FMAs). Fast math would save a few
// instructions per 16-byte vector (one float division in a pack's Welford
// merge) in kernels bound by memory bandwidth, at the price of divisions
// off by up to 2 ulp and of flushing inputs below 1.2e-38 to zero.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <initializer_list>
#include <string>

#include "bn_cuda.h"
#include "bn_math.h"
#include "cuda_launch.h"

namespace fused_bn {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kVecBytes = 16;
constexpr int64_t kSmallElems = int64_t(1) << 20;  // single block-row below
constexpr int64_t kMinRowsPerThread = 4;      // channels-last reduce slab
constexpr int64_t kMinSlabElems = 16384;      // channels-first reduce slab
constexpr int64_t kMaxGridY = 65535;
// Channels-first rows are cut into chunks of kChunk values (the last one
// shorter), the work items of a warp: a long row is spread over many warps
// and blocks, and a lane's float sums never span more than kChunk / 32
// values. A multiple of 32 lanes x 16 bytes, so every chunk of a row has
// the row's 16-byte misalignment.
constexpr int64_t kChunk = 16384;

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// Chunks of a channels-first row of S values (one for an empty row).
__host__ __device__ inline int64_t chunks_of(int64_t S) {
  return S > kChunk ? ceil_div(S, kChunk) : 1;
}

// Values of one channel in its first i work items (chunks, row-major over
// the outer axis, `chunks` per row of S values).
__host__ __device__ inline int64_t values_before(int64_t i, int64_t chunks,
                                                 int64_t S) {
  const int64_t k = (i % chunks) * kChunk;
  return (i / chunks) * S + (k < S ? k : S);
}

enum class Kind { kMoments, kForward, kGrad };

// ---------------------------------------------------------------- elements

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __ushort_as_bfloat16(math::bf16_bits(v));
}

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// M raw 16-byte vectors (x, dy, ...) of one loop iteration, loaded ahead
// of their use (see strided()).
template <typename T, int N, int M>
struct Packs {
  Pack<T, N> v[M];
};

template <int N, typename T>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}
template <int N, typename T>
__device__ __forceinline__ void unpack(const Pack<T, N>& pk, float (&out)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = to_float(pk.v[i]);
}
template <int N, typename T>
__device__ __forceinline__ void store(T* p, const float (&in)[N]) {
  Pack<T, N> pk;
#pragma unroll
  for (int i = 0; i < N; ++i) pk.v[i] = from_float<T>(in[i]);
  *reinterpret_cast<Pack<T, N>*>(p) = pk;
}

// Loads in flight per thread in the vector loops: strided() issues the
// loads of kInFlight iterations back to back (no bounds check between
// them), then uses them in order, so a thread waits on one memory latency
// per kInFlight 16-byte vectors of each stream, not per vector (before: a
// bounds branch before every load kept one in flight, two in the
// backward). Expected on a GPU: closer to peak bandwidth at the occupancy
// the register use leaves; not measurable here (no GPU).
constexpr int kInFlight = 4;

// use(i, load(i)) for i = begin, begin + step, ... < end, in that order: an
// unguarded main body of kInFlight iterations at a time, then a guarded
// tail. load(i) returns raw vectors; use(i, v) converts, computes, stores.
template <typename FL, typename FU>
__device__ __forceinline__ void strided(int64_t begin, int64_t end,
                                        int64_t step, FL&& load, FU&& use) {
  using L = decltype(load(begin));
  int64_t i = begin;
  for (; i + (kInFlight - 1) * step < end; i += kInFlight * step) {
    L v[kInFlight];
#pragma unroll
    for (int u = 0; u < kInFlight; ++u) v[u] = load(i + u * step);
#pragma unroll
    for (int u = 0; u < kInFlight; ++u) use(i + u * step, v[u]);
  }
  for (; i < end; i += step) use(i, load(i));
}

// Over [0, n) of a row that starts at p: scalar(i) on a scalar head up to
// the first 16-byte boundary and on a scalar tail, use(i, load(i)) on the
// aligned vectors between (VEC values from i on; see strided()). Lane
// `lane` of `width` takes every width-th item.
template <int VEC, typename T, typename FS, typename FL, typename FU>
__device__ __forceinline__ void for_row(const T* p, int64_t n, int lane,
                                        int width, FS&& scalar, FL&& load,
                                        FU&& use) {
  if (VEC == 1) {
    for (int64_t i = lane; i < n; i += width) scalar(i);
    return;
  }
  const int64_t mis = reinterpret_cast<uintptr_t>(p) % kVecBytes;
  const int64_t head =
      min(n, int64_t((kVecBytes - mis) % kVecBytes) / int64_t(sizeof(T)));
  const int64_t body = (n - head) / VEC;
  if (lane < head) scalar(lane);
  strided(
      lane, body, width, [&](int64_t j) { return load(head + j * VEC); },
      [&](int64_t j, const auto& v) { use(head + j * VEC, v); });
  for (int64_t i = head + body * VEC + lane; i < n; i += width) scalar(i);
}

// ---------------------------------------------------------------- Welford

using Welford = math::Moments<float>;
__device__ __forceinline__ Welford merge(const Welford& a, const Welford& b) {
  return math::chan_merge(a, b);
}
__device__ __forceinline__ void push(Welford& w, float x) {
  w = merge(w, Welford{1.f, x, 0.f});
}
template <int N>
__device__ __forceinline__ void push_pack(Welford& w, const float (&x)[N]) {
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < N; ++i) s += x[i];
  const float m = s * (1.f / N);
  float q = 0.f;
#pragma unroll
  for (int i = 0; i < N; ++i) q += (x[i] - m) * (x[i] - m);
  w = merge(w, Welford{float(N), m, q});
}

// The warp's lanes' (n, mean, M2) merged in a fixed shuffle tree (Chan; plain
// sums of mean and m2 for the backward's (unused, sum dy, sum dy*(x-mean))):
// lane 0 gets the warp's.
template <bool kSums>
__device__ __forceinline__ Welford warp_merge(Welford w) {
  for (int off = 16; off > 0; off /= 2) {
    const Welford o{__shfl_down_sync(0xffffffffu, w.n, off),
                    __shfl_down_sync(0xffffffffu, w.mean, off),
                    __shfl_down_sync(0xffffffffu, w.m2, off)};
    if (kSums) {
      w.mean += o.mean;
      w.m2 += o.m2;
    } else {
      w = merge(w, o);
    }
  }
  return w;
}

// ---------------------------------------------------------------- finalise

// What happens to a channel once its statistics over all `count` values are
// known. kMoments/kForward get (mean, M2); kGrad gets (sum dy, sum dy*(x-mean)).
struct Final {
  int64_t C = 0;
  int64_t count = 0;
  // kMoments
  float* mean = nullptr;
  float* var = nullptr;
  // kForward
  float* saved_mean = nullptr;
  float* saved_inv_std = nullptr;
  double epsilon = 0;
  const float* offset = nullptr;  // and scale (below): the affine parameters
  float* norm = nullptr;  // [2, C]: k, b for the normalize pass
  const float* given_mean = nullptr;  // norm_coef_kernel's statistics
  const float* given_var = nullptr;
  float* moving_mean = nullptr;
  float* moving_var = nullptr;
  const int64_t* num_updates = nullptr;
  double momentum = 0;
  bool unbiased = true;
  // kGrad
  const float* grad_mean = nullptr;     // the forward's saved_mean
  const float* grad_inv_std = nullptr;  // the forward's saved_inv_std
  const float* scale = nullptr;  // kForward too
  bool training = true;
  float* dscale = nullptr;
  float* doffset = nullptr;
  float* coef = nullptr;  // [3, C]: k_dy, k_x, k_0 for the dx pass
};

// The backward's per-channel outputs from sum(dy) = sd and
// sum(dy * x_hat) = ds over f.count values.
__device__ void grad_coef(const Final& f, int64_t c, double sd, double ds) {
  if (f.dscale) f.dscale[c] = float(ds);
  if (f.doffset) f.doffset[c] = float(sd);
  const math::GradCoefs k =
      math::grad_coefs(f.scale ? double(f.scale[c]) : 1.0,
                       double(f.grad_inv_std[c]), sd, ds, double(f.count),
                       f.training);
  f.coef[c] = float(k.k_dy);
  f.coef[f.C + c] = float(k.k_x);
  f.coef[2 * f.C + c] = float(k.k_0);
}

// The normalize pass's coefficients of channel c, normalized with
// inv_std: k = scale * inv_std, b = offset (y = (x - mean) * k + b).
__device__ void norm_coef(const Final& f, int64_t c, double inv_std) {
  f.norm[c] = float(f.scale ? double(f.scale[c]) * inv_std : inv_std);
  f.norm[f.C + c] = f.offset ? f.offset[c] : 0.f;
}

template <Kind K>
__device__ void finalize(const Final& f, int64_t c, double a, double b) {
  const double n = double(f.count);
  if (K == Kind::kMoments) {
    f.mean[c] = float(a);
    f.var[c] = float(b / n);
  } else if (K == Kind::kForward) {
    const double var = b / n;
    const double inv = math::inv_std(var, f.epsilon);
    f.saved_mean[c] = float(a);
    f.saved_inv_std[c] = float(inv);
    norm_coef(f, c, inv);
    if (f.moving_mean) {
      const double m = math::ema_momentum(f.momentum, f.num_updates != nullptr,
                                          f.num_updates ? *f.num_updates : 0);
      const double bessel = math::bessel_factor(f.unbiased, f.count);
      f.moving_mean[c] = float(math::ema(f.moving_mean[c], a, m));
      f.moving_var[c] = float(
          math::ema(f.moving_var[c], math::batch_variance(var, bessel), m));
    }
  } else {
    grad_coef(f, c, a, math::sum_dy_xhat(b, double(f.grad_inv_std[c])));
  }
}

// The normalize pass's coefficients from given statistics (inference
// forward, normalize; no reduction): thread c of the grid handles channel
// c. f.given_mean/given_var hold the statistics; saved_mean and
// saved_inv_std are written when given.
__global__ void __launch_bounds__(kThreads) norm_coef_kernel(const Final f) {
  const int64_t c = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (c >= f.C) return;
  const double inv = math::inv_std(f.given_var[c], f.epsilon);
  if (f.saved_mean) {
    f.saved_mean[c] = f.given_mean[c];
    f.saved_inv_std[c] = float(inv);
  }
  norm_coef(f, c, inv);
}

// The backward's coefficients from given global sums (no reduction): thread
// c of the grid handles channel c.
__global__ void __launch_bounds__(kThreads)
    given_sums_kernel(const Final f, const float* sum_dy,
                      const float* sum_dy_xhat) {
  const int64_t c = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (c < f.C) grad_coef(f, c, sum_dy[c], sum_dy_xhat[c]);
}

// ---------------------------------------------------------------- reduce

struct ReduceArgs {
  const void* x = nullptr;
  const void* dy = nullptr;
  const void* y = nullptr;  // kGrad with relu: dy is masked by y > 0
  void* g = nullptr;        // kGrad: the (masked) dy is written here
  int64_t outer = 0, C = 0, inner = 1;
  int tx = 1;        // channels-last: threads across channel vectors
  int64_t per = 0;   // rows (channels-last) or work items (channels-first)
                     // per block-row
  int64_t chunks = 1;  // channels-first: chunks per row (kChunk values each)
  int64_t items = 0;   // channels-first: work items per channel
  float* part_a = nullptr;  // [gy, C] partial mean / sum dy
  float* part_b = nullptr;  // [gy, C] partial M2 / sum dy*(x-mean)
  unsigned* done = nullptr;  // [gx] block-rows done per block column, from 0
  Final f;
};

// Channel c's partials of all gridDim.y block-rows, merged by one warp and
// finalised: lane l merges block-rows b = l, l + 32, ... in order, then the
// lanes merge in a fixed shuffle tree (Chan for moments, plain sums for the
// backward, in double); lane 0 finalises. The order does not depend on
// which block came last: results are bitwise the same run to run. Block-row
// b covers min(per, outer - b * per) rows (channels-last) or the values of
// work items [b * per, (b + 1) * per) (channels-first). The partials were
// written by other blocks: volatile reads, past this SM's L1.
template <Kind K>
__device__ void merge_partials(const ReduceArgs& a, int64_t c, int lane) {
  const int64_t gy = gridDim.y;
  const volatile float* pa = a.part_a;
  const volatile float* pb = a.part_b;
  math::Moments<double> w{0.0, 0.0, 0.0};
  for (int64_t b = lane; b < gy; b += 32) {
    const double bm = pa[b * a.C + c], bq = pb[b * a.C + c];
    if (K == Kind::kGrad) {
      w.mean += bm;
      w.m2 += bq;
    } else {
      const double nb = double(
          a.inner == 1 ? min(a.per, a.outer - b * a.per)
                       : values_before(min(a.items, (b + 1) * a.per), a.chunks,
                                       a.inner) -
                             values_before(b * a.per, a.chunks, a.inner));
      w = math::chan_merge(w, {nb, bm, bq});
    }
  }
  for (int off = 16; off > 0; off /= 2) {
    const math::Moments<double> o{__shfl_down_sync(0xffffffffu, w.n, off),
                                  __shfl_down_sync(0xffffffffu, w.mean, off),
                                  __shfl_down_sync(0xffffffffu, w.m2, off)};
    if (K == Kind::kGrad) {
      w.mean += o.mean;
      w.m2 += o.m2;
    } else {
      w = math::chan_merge(w, o);
    }
  }
  if (lane == 0) finalize<K>(a.f, c, w.mean, w.m2);
}

// Called by every thread of a block after it wrote its partials: true in
// the last block of its column (blockIdx.x) to get here, which then sees
// every partial of the column (threadfence + counter, as in CUDA's
// threadFenceReduction sample). Replaces a finalize launch.
__device__ bool last_block_of_column(const ReduceArgs& a) {
  __shared__ bool last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    last = atomicAdd(a.done + blockIdx.x, 1u) == gridDim.y - 1;
  }
  __syncthreads();
  if (last) __threadfence();
  return last;
}

// Channels-last [M, C] reduction. Thread (tx, ty) = (tid % TX, tid / TX)
// owns channels [VEC * (blockIdx.x * TX + tx), +VEC) and rows
// r0 + ty, r0 + ty + TY, ... of block-row blockIdx.y's slab [r0, r0 + per).
// The TY partials of a channel are merged in shared memory in a fixed tree.
template <typename T, int VEC, Kind K>
__global__ void __launch_bounds__(kThreads)
    reduce_cl_kernel(const ReduceArgs a) {
  __shared__ float sh_a[kThreads * VEC], sh_b[kThreads * VEC], sh_n[kThreads];
  const int tid = threadIdx.x, TX = a.tx, TY = kThreads / a.tx;
  const int tx = tid % TX, ty = tid / TX;
  const int64_t C = a.C;
  const int64_t c0 = (int64_t(blockIdx.x) * TX + tx) * VEC;
  const bool active = c0 < C;
  const int64_t r0 = int64_t(blockIdx.y) * a.per;
  const int64_t r1 = min(a.outer, r0 + a.per);
  const T* x = static_cast<const T*>(a.x);
  const T* dy = static_cast<const T*>(a.dy);
  const T* ym = static_cast<const T*>(a.y);
  T* g = static_cast<T*>(a.g);
  float sa[VEC], sb[VEC], mc[VEC], n = 0.f;
#pragma unroll
  for (int v = 0; v < VEC; ++v) sa[v] = sb[v] = mc[v] = 0.f;
  if (active) {
    if (K == Kind::kGrad) {
#pragma unroll
      for (int v = 0; v < VEC; ++v) mc[v] = a.f.grad_mean[c0 + v];
    }
    // x; kGrad: x, dy and y (when given).
    constexpr int M = K == Kind::kGrad ? 3 : 1;
    strided(
        r0 + ty, r1, TY,
        [&](int64_t r) {
          Packs<T, VEC, M> p{};
          p.v[0] = load_pack<VEC>(x + r * C + c0);
          if (K == Kind::kGrad) {
            p.v[M - 2] = load_pack<VEC>(dy + r * C + c0);
            if (ym) p.v[M - 1] = load_pack<VEC>(ym + r * C + c0);
          }
          return p;
        },
        [&](int64_t r, const Packs<T, VEC, M>& p) {
          float xv[VEC];
          unpack(p.v[0], xv);
          if (K == Kind::kGrad) {
            float dv[VEC];
            unpack(p.v[M - 2], dv);
            if (ym) {
              float yv[VEC];
              unpack(p.v[M - 1], yv);
#pragma unroll
              for (int v = 0; v < VEC; ++v) dv[v] = yv[v] > 0.f ? dv[v] : 0.f;
            }
            if (g) store<VEC>(g + r * C + c0, dv);
#pragma unroll
            for (int v = 0; v < VEC; ++v) {
              sa[v] += dv[v];
              sb[v] += dv[v] * (xv[v] - mc[v]);
            }
          } else {
            n += 1.f;
            const float inv = 1.f / n;
#pragma unroll
            for (int v = 0; v < VEC; ++v) {
              const float d = xv[v] - sa[v];
              sa[v] += d * inv;
              sb[v] += d * (xv[v] - sa[v]);
            }
          }
        });
  }
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    sh_a[tid * VEC + v] = sa[v];
    sh_b[tid * VEC + v] = sb[v];
  }
  sh_n[tid] = n;
  for (int stride = TY / 2; stride > 0; stride /= 2) {
    __syncthreads();
    if (ty < stride) {
      const int o = tid + stride * TX;
      const float no = sh_n[o];
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        if (K == Kind::kGrad) {
          sa[v] += sh_a[o * VEC + v];
          sb[v] += sh_b[o * VEC + v];
        } else {
          const Welford w =
              merge({n, sa[v], sb[v]}, {no, sh_a[o * VEC + v], sh_b[o * VEC + v]});
          sa[v] = w.mean;
          sb[v] = w.m2;
        }
        sh_a[tid * VEC + v] = sa[v];
        sh_b[tid * VEC + v] = sb[v];
      }
      n += no;
      sh_n[tid] = n;
    }
  }
  const bool owner = ty == 0 && active;
  if (gridDim.y == 1) {
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      if (owner) finalize<K>(a.f, c0 + v, sa[v], sb[v]);
    }
    return;
  }
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    if (owner) {
      a.part_a[blockIdx.y * C + c0 + v] = sa[v];
      a.part_b[blockIdx.y * C + c0 + v] = sb[v];
    }
  }
  if (!last_block_of_column(a)) return;
  // The last block merges its column's channels, a warp per channel.
  const int64_t base = int64_t(blockIdx.x) * TX * VEC;
  const int64_t width = min(int64_t(TX) * VEC, C - base);
  for (int64_t j = tid / 32; j < width; j += kWarps) {
    merge_partials<K>(a, base + j, tid % 32);
  }
}

// Channels-first [N, C, S] reduction of channel blockIdx.x. Its rows
// (n, c) are cut into chunks of kChunk values, the work items (row-major
// over n); block-row blockIdx.y takes items [i0, i0 + per), warp w the items
// i0 + w, i0 + w + 8, ..., its lanes striding over the item's values. An
// item's lane sums (float, at most kChunk / 32 values) are merged by
// shuffles in a fixed tree and then into the warp's double accumulator, so
// accuracy does not depend on the row length; warps merge in order.
template <typename T, int VEC, Kind K>
__global__ void __launch_bounds__(kThreads)
    reduce_cf_kernel(const ReduceArgs a) {
  __shared__ math::Moments<double> sh[kWarps];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t c = blockIdx.x, C = a.C, S = a.inner;
  const int64_t i0 = int64_t(blockIdx.y) * a.per;
  const int64_t i1 = min(a.items, i0 + a.per);
  const T* x = static_cast<const T*>(a.x);
  const T* dy = static_cast<const T*>(a.dy);
  const T* ym = static_cast<const T*>(a.y);
  T* g = static_cast<T*>(a.g);
  const float mc = K == Kind::kGrad ? a.f.grad_mean[c] : 0.f;
  // Moments: (n, mean, m2). Grad: (unused, sum dy, sum dy*(x-mean)).
  math::Moments<double> acc{0.0, 0.0, 0.0};
  for (int64_t i = i0 + warp; i < i1; i += kWarps) {
    const int64_t k0 = (i % a.chunks) * kChunk;
    const int64_t len = min(kChunk, S - k0);
    const int64_t off = ((i / a.chunks) * C + c) * S + k0;
    const T* xr = x + off;
    Welford w{0.f, 0.f, 0.f};
    if (K == Kind::kGrad) {
      const T* dr = dy + off;
      const T* yr = ym ? ym + off : nullptr;
      T* gr = g ? g + off : nullptr;
      for_row<VEC>(
          xr, len, lane, 32,
          [&](int64_t i) {
            float d = to_float(dr[i]);
            if (yr && !(to_float(yr[i]) > 0.f)) d = 0.f;
            if (gr) gr[i] = from_float<T>(d);
            w.mean += d;
            w.m2 += d * (to_float(xr[i]) - mc);
          },
          [&](int64_t i) {
            Packs<T, VEC, 3> p{};
            p.v[0] = load_pack<VEC>(xr + i);
            p.v[1] = load_pack<VEC>(dr + i);
            if (yr) p.v[2] = load_pack<VEC>(yr + i);
            return p;
          },
          [&](int64_t i, const Packs<T, VEC, 3>& p) {
            float xv[VEC], dv[VEC];
            unpack(p.v[0], xv);
            unpack(p.v[1], dv);
            if (yr) {
              float yv[VEC];
              unpack(p.v[2], yv);
#pragma unroll
              for (int v = 0; v < VEC; ++v) dv[v] = yv[v] > 0.f ? dv[v] : 0.f;
            }
            if (gr) store<VEC>(gr + i, dv);
#pragma unroll
            for (int v = 0; v < VEC; ++v) {
              w.mean += dv[v];
              w.m2 += dv[v] * (xv[v] - mc);
            }
          });
      w = warp_merge<true>(w);
      acc.mean += w.mean;
      acc.m2 += w.m2;
    } else {
      for_row<VEC>(
          xr, len, lane, 32, [&](int64_t i) { push(w, to_float(xr[i])); },
          [&](int64_t i) { return load_pack<VEC>(xr + i); },
          [&](int64_t, const Pack<T, VEC>& p) {
            float xv[VEC];
            unpack(p, xv);
            push_pack(w, xv);
          });
      w = warp_merge<false>(w);
      acc = math::chan_merge(acc, {w.n, w.mean, w.m2});
    }
  }
  if (lane == 0) sh[warp] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int i = 1; i < kWarps; ++i) {
      if (K == Kind::kGrad) {
        acc.mean += sh[i].mean;
        acc.m2 += sh[i].m2;
      } else {
        acc = math::chan_merge(acc, sh[i]);
      }
    }
    if (gridDim.y == 1) {
      finalize<K>(a.f, c, acc.mean, acc.m2);
    } else {
      a.part_a[blockIdx.y * C + c] = float(acc.mean);
      a.part_b[blockIdx.y * C + c] = float(acc.m2);
    }
  }
  if (gridDim.y == 1 || !last_block_of_column(a)) return;
  if (warp == 0) merge_partials<K>(a, c, lane);
}

// ---------------------------------------------------------------- apply

struct ApplyArgs {
  const void* x = nullptr;
  const void* dy = nullptr;  // backward only
  void* out = nullptr;       // y or dx
  const void* side = nullptr;  // normalize epilogue: added before relu
  bool relu = false;
  int64_t outer = 0, C = 0, inner = 1;
  int tx = 1;
  int64_t chunks = 1;  // channels-first: chunks per row (kChunk values each)
  const float* mean = nullptr;
  // Normalize: [2, C] k, b: y = (x - mean) * k + b (norm_coef).
  // Backward: [3, C] k_dy, k_x, k_0: dx = k_dy*dy + k_x*(x-mean) + k_0.
  const float* coef = nullptr;
  int64_t* increment = nullptr;    // ++*increment once (training forward)
};

struct Coef {
  float m, k, b, kx;
};

template <bool kGrad>
__device__ __forceinline__ Coef coef_of(const ApplyArgs& a, int64_t c) {
  Coef r;
  r.m = a.mean[c];
  r.k = a.coef[c];
  r.kx = kGrad ? a.coef[a.C + c] : 0.f;
  r.b = a.coef[(kGrad ? 2 : 1) * a.C + c];
  return r;
}

template <bool kGrad>
__device__ __forceinline__ float apply1(const Coef& k, float x, float d) {
  return kGrad ? k.k * d + k.kx * (x - k.m) + k.b : (x - k.m) * k.k + k.b;
}

// The normalize epilogue on a value v: + side, then relu (v < 0 -> 0; NaN
// stays NaN).
__device__ __forceinline__ float epilogue(float v, float side, bool relu) {
  v += side;
  return relu && v < 0.f ? 0.f : v;
}

// Channels-last [M, C] elementwise pass. Thread (tx, ty) owns channels
// [VEC * (blockIdx.x * TX + tx), +VEC) (coefficients in registers) and rows
// blockIdx.y * TY + ty + k * gridDim.y * TY.
template <typename T, int VEC, bool kGrad>
__global__ void __launch_bounds__(kThreads) apply_cl_kernel(const ApplyArgs a) {
  const int TX = a.tx, TY = kThreads / a.tx;
  const int tx = threadIdx.x % TX, ty = threadIdx.x / TX;
  const int64_t C = a.C;
  const int64_t c0 = (int64_t(blockIdx.x) * TX + tx) * VEC;
  if (!kGrad && a.increment && blockIdx.x == 0 && blockIdx.y == 0 &&
      threadIdx.x == 0) {
    *a.increment += 1;
  }
  if (c0 >= C) return;
  Coef k[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) k[v] = coef_of<kGrad>(a, c0 + v);
  const T* x = static_cast<const T*>(a.x);
  const T* dy = static_cast<const T*>(a.dy);
  const T* side = static_cast<const T*>(a.side);
  T* out = static_cast<T*>(a.out);
  const int64_t step = int64_t(gridDim.y) * TY;
  // x, then dy (backward) or the side input (when given).
  strided(
      int64_t(blockIdx.y) * TY + ty, a.outer, step,
      [&](int64_t r) {
        Packs<T, VEC, 2> p{};
        p.v[0] = load_pack<VEC>(x + r * C + c0);
        if (kGrad) p.v[1] = load_pack<VEC>(dy + r * C + c0);
        if (!kGrad && side) p.v[1] = load_pack<VEC>(side + r * C + c0);
        return p;
      },
      [&](int64_t r, const Packs<T, VEC, 2>& p) {
        float xv[VEC], dv[VEC], ov[VEC];
        unpack(p.v[0], xv);
        if (kGrad || side) unpack(p.v[1], dv);
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          ov[v] = apply1<kGrad>(k[v], xv[v], kGrad ? dv[v] : 0.f);
          if (!kGrad) ov[v] = epilogue(ov[v], side ? dv[v] : 0.f, a.relu);
        }
        store<VEC>(out + r * C + c0, ov);
      });
}

// Channels-first [N, C, S] elementwise pass over the work items of
// reduce_cf_kernel: chunk j of row (n, c) = r is item r * chunks + j, so a
// long row is spread over many warps. Warp w of block b handles items
// b * 8 + w, stepping by gridDim.x * 8; lane 0 reads the channel's
// coefficients and broadcasts them; lanes stride over the item's values.
template <typename T, int VEC, bool kGrad>
__global__ void __launch_bounds__(kThreads) apply_cf_kernel(const ApplyArgs a) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (!kGrad && a.increment && blockIdx.x == 0 && threadIdx.x == 0) {
    *a.increment += 1;
  }
  const int64_t rows = a.outer * a.C, S = a.inner;
  const T* x = static_cast<const T*>(a.x);
  const T* dy = static_cast<const T*>(a.dy);
  const T* side = static_cast<const T*>(a.side);
  T* out = static_cast<T*>(a.out);
  for (int64_t item = int64_t(blockIdx.x) * kWarps + warp;
       item < rows * a.chunks; item += int64_t(gridDim.x) * kWarps) {
    const int64_t r = item / a.chunks, c = r % a.C;
    const int64_t k0 = (item % a.chunks) * kChunk;
    Coef k{0.f, 0.f, 0.f, 0.f};
    if (lane == 0) k = coef_of<kGrad>(a, c);
    k.m = __shfl_sync(0xffffffffu, k.m, 0);
    k.k = __shfl_sync(0xffffffffu, k.k, 0);
    k.b = __shfl_sync(0xffffffffu, k.b, 0);
    k.kx = __shfl_sync(0xffffffffu, k.kx, 0);
    const int64_t off = r * S + k0;
    const T* xr = x + off;
    const T* dr = kGrad ? dy + off : nullptr;
    const T* sr = !kGrad && side ? side + off : nullptr;
    T* orow = out + off;
    for_row<VEC>(
        xr, min(kChunk, S - k0), lane, 32,
        [&](int64_t i) {
          const float d = kGrad ? to_float(dr[i]) : 0.f;
          float o = apply1<kGrad>(k, to_float(xr[i]), d);
          if (!kGrad) o = epilogue(o, sr ? to_float(sr[i]) : 0.f, a.relu);
          orow[i] = from_float<T>(o);
        },
        [&](int64_t i) {
          Packs<T, VEC, 2> p{};
          p.v[0] = load_pack<VEC>(xr + i);
          if (kGrad) p.v[1] = load_pack<VEC>(dr + i);
          if (sr) p.v[1] = load_pack<VEC>(sr + i);
          return p;
        },
        [&](int64_t i, const Packs<T, VEC, 2>& p) {
          float xv[VEC], dv[VEC], ov[VEC];
          unpack(p.v[0], xv);
          if (kGrad || sr) unpack(p.v[1], dv);
#pragma unroll
          for (int v = 0; v < VEC; ++v) {
            ov[v] = apply1<kGrad>(k, xv[v], kGrad ? dv[v] : 0.f);
            if (!kGrad) ov[v] = epilogue(ov[v], sr ? dv[v] : 0.f, a.relu);
          }
          store<VEC>(orow + i, ov);
        });
  }
}

// ---------------------------------------------------------------- update

// One block: every thread reads the counter, then updates channels
// tid, tid + 256, ...; thread 0 increments the counter after a barrier.
__global__ void __launch_bounds__(kThreads)
    update_kernel(const float* mean, const float* var, int64_t C,
                  int64_t count, float* mm, float* mv, int64_t* num_updates,
                  double momentum, bool unbiased) {
  const double m = math::ema_momentum(momentum, num_updates != nullptr,
                                      num_updates ? *num_updates : 0);
  const double bessel = math::bessel_factor(unbiased, count);
  for (int64_t c = threadIdx.x; c < C; c += kThreads) {
    mm[c] = float(math::ema(mm[c], mean[c], m));
    mv[c] = float(math::ema(mv[c], math::batch_variance(var[c], bessel), m));
  }
  __syncthreads();
  if (num_updates && threadIdx.x == 0) *num_updates += 1;
}

// ---------------------------------------------------------------- host side

size_t align256(size_t n) { return (n + 255) / 256 * 256; }

int vec_width(DType t) { return kVecBytes / int(element_bytes(t)); }

// Threads across channel vectors in a channels-last block.
int cl_tx(int64_t vectors) {
  int tx = 1;
  while (tx < 32 && tx < vectors) tx *= 2;
  return tx;
}

// Grid of a reduction: gx blocks across channels, gy block-rows of `per`
// rows (channels-last) or work items (channels-first), about `target`
// blocks in all when the tensor is big enough (gy never falls as target
// grows, so a larger target bounds the partials' size).
struct ReduceGeo {
  int tx = 1;
  int64_t gx = 1, gy = 1, per = 1;
  int64_t chunks = 1, items = 0;  // channels-first work items (ReduceArgs)
};

ReduceGeo reduce_geo(const Shape& s, int vec, int64_t target) {
  ReduceGeo g;
  const bool small = s.size() <= kSmallElems;
  if (s.inner == 1) {
    const int64_t vectors = ceil_div(s.channels, vec);
    g.tx = cl_tx(vectors);
    // Small tensors: one block-row; narrow the channel tiles for more blocks.
    while (small && g.tx > 4 && ceil_div(vectors, g.tx) < 64) g.tx /= 2;
    g.gx = ceil_div(vectors, g.tx);
    const int64_t ty = kThreads / g.tx;
    g.gy = small ? 1
                 : std::min({ceil_div(target, g.gx),
                             ceil_div(s.outer, ty * kMinRowsPerThread),
                             kMaxGridY});
    g.gy = std::max<int64_t>(g.gy, 1);
    g.per = std::max<int64_t>(ceil_div(s.outer, g.gy), 1);
    g.gy = std::max<int64_t>(ceil_div(s.outer, g.per), 1);
  } else {
    // At least a work item per warp and kMinSlabElems values per block-row.
    g.gx = s.channels;
    g.chunks = chunks_of(s.inner);
    g.items = s.outer * g.chunks;
    g.gy = small ? 1
                 : std::min({ceil_div(target, s.channels),
                             ceil_div(g.items, kWarps),
                             ceil_div(s.count(), kMinSlabElems), kMaxGridY});
    g.gy = std::max<int64_t>(g.gy, 1);
    g.per = std::max<int64_t>(ceil_div(g.items, g.gy), 1);
    g.gy = std::max<int64_t>(ceil_div(g.items, g.per), 1);
  }
  return g;
}

// ---------------------------------------------------------------- occupancy
// Grids are one wave: the blocks of a kernel the current device holds at
// once (cudaOccupancyMaxActiveBlocksPerMultiprocessor x SMs), cached per
// device. A reduction's partials then come from blocks that all run
// concurrently (a fixed 1024 was 1.55 waves at 5 blocks per SM on 132
// SMs: the last 0.55 ran at half occupancy), and the grid-stride
// elementwise passes have no tail wave. 0 means the runtime could not say
// (its error is cleared here and reported by the caller).

constexpr int kMaxDevices = 64;

// The current device and its SM count; false if the runtime cannot say.
bool current_device(int* device, int* sms) {
  if (cudaGetDevice(device) != cudaSuccess || *device < 0 ||
      *device >= kMaxDevices ||
      cudaDeviceGetAttribute(sms, cudaDevAttrMultiProcessorCount, *device) !=
          cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return true;
}

// cache[device] for the current device, computed by compute(device, sms)
// the first time (0, a failure, is returned and not cached).
template <typename F>
int64_t per_device(std::atomic<int64_t>* cache, F&& compute) {
  int device = 0, sms = 0;
  if (!current_device(&device, &sms)) return 0;
  int64_t v = cache[device].load(std::memory_order_relaxed);
  if (v > 0) return v;
  v = compute(device, sms);
  if (v > 0) cache[device].store(v, std::memory_order_relaxed);
  return v;
}

// Blocks of kThreads threads that any kernel can have resident on the
// current device: SMs x (threads per SM / kThreads). Bounds every
// reduction's target, so that the workspace sized from it suffices.
int64_t max_resident_blocks() {
  static std::atomic<int64_t> cache[kMaxDevices];
  return per_device(cache, [](int device, int sms) -> int64_t {
    int threads = 0;
    if (cudaDeviceGetAttribute(&threads,
                               cudaDevAttrMaxThreadsPerMultiProcessor,
                               device) != cudaSuccess) {
      cudaGetLastError();
      return 0;
    }
    return std::max<int64_t>(1, int64_t(sms) * (threads / kThreads));
  });
}

// Kernel's resident blocks of kThreads threads (no dynamic shared memory)
// on the current device, at most max_resident_blocks().
template <auto Kernel>
int64_t resident_blocks() {
  static std::atomic<int64_t> cache[kMaxDevices];
  return per_device(cache, [](int, int sms) -> int64_t {
    int per_sm = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, Kernel,
                                                      kThreads, 0) !=
        cudaSuccess) {
      cudaGetLastError();
      return 0;
    }
    return std::min(std::max<int64_t>(1, int64_t(sms) * per_sm),
                    max_resident_blocks());
  });
}

Status no_occupancy(const char* what) {
  return Status::Error(std::string("fused_bn: cannot size the grid of ") +
                       what + ": the CUDA runtime gives no device occupancy");
}

size_t partials_bytes(int64_t gy, int64_t channels) {
  return align256(2 * gy * channels * sizeof(float));
}

// Bytes of the [gy, C] x 2 partials and the [gx] column counters for any
// reduction kernel and vector width (their targets are at most
// max_resident_blocks()).
size_t partial_bytes(const Shape& s, DType t) {
  const int64_t target = max_resident_blocks();
  const ReduceGeo v = reduce_geo(s, vec_width(t), target);
  const ReduceGeo one = reduce_geo(s, 1, target);
  const int64_t gy = std::max(v.gy, one.gy), gx = std::max(v.gx, one.gx);
  return gy > 1 ? partials_bytes(gy, s.channels) +
                      align256(gx * sizeof(unsigned))
                : 0;
}

bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % kVecBytes == 0;
}

// The vector width the pointers of a launch allow (nullptrs ignored).
int pick_vec(const Shape& s, DType t, std::initializer_list<const void*> ptrs) {
  const int v = vec_width(t);
  const void* first = *ptrs.begin();
  for (const void* p : ptrs) {
    if (!p) continue;
    if (s.inner == 1 ? !aligned16(p)
                     : reinterpret_cast<uintptr_t>(p) % kVecBytes !=
                           reinterpret_cast<uintptr_t>(first) % kVecBytes) {
      return 1;
    }
  }
  return s.inner == 1 && s.channels % v != 0 ? 1 : v;
}

Status check_launch(const char* what) {
  const cudaError_t e = cudaGetLastError();
  if (e == cudaSuccess) return Status::Ok();
  return Status::Error(std::string("fused_bn: CUDA launch of ") + what +
                       " failed: " + cudaGetErrorString(e));
}

template <typename T>
struct Tag {
  using type = T;
};

// The one runtime-dtype -> template dispatch.
template <typename F>
Status dispatch(DType t, F&& f) {
  switch (t) {
    case DType::kFloat16:
      return f(Tag<__half>());
    case DType::kBFloat16:
      return f(Tag<__nv_bfloat16>());
    case DType::kFloat32:
      return f(Tag<float>());
    case DType::kFloat64:
      return Status::Error("float64 is not supported on GPU");
  }
  return Status::Error("unsupported dtype");
}

// inner == 0 is a channels-first tensor with an empty spatial axis (TF's
// ShapeOf gives it for NCHW x with H == 0): an empty tensor, like outer == 0.
// Element pointers of an empty tensor may be null (TF gives null data() for
// zero elements); the kernels never dereference them then.
Status check_shape(const Shape& s) {
  if (s.outer < 0 || s.channels < 0 || s.inner < 0) {
    return Status::Error("fused_bn: bad shape (outer=" +
                         std::to_string(s.outer) + ", channels=" +
                         std::to_string(s.channels) + ", inner=" +
                         std::to_string(s.inner) + ")");
  }
  return Status::Ok();
}

// A reduction by Kernel with the given vector width; finalises into a.f
// (one launch, after a memset of the column counters when gy > 1).
template <auto Kernel, Kind K>
Status reduce_with(const Shape& s, int vec, ReduceArgs a, void* workspace,
                   cudaStream_t stream) {
  const int64_t target = resident_blocks<Kernel>();
  if (target == 0) return no_occupancy("reduce");
  const ReduceGeo g = reduce_geo(s, vec, target);
  a.outer = s.outer;
  a.C = s.channels;
  a.inner = s.inner;
  a.tx = g.tx;
  a.per = g.per;
  a.chunks = g.chunks;
  a.items = g.items;
  a.f.C = s.channels;
  a.f.count = s.count();
  if (g.gy > 1) {
    if (!workspace) return Status::Error("fused_bn: workspace is required");
    a.part_a = static_cast<float*>(workspace);
    a.part_b = a.part_a + g.gy * s.channels;
    a.done = reinterpret_cast<unsigned*>(
        static_cast<char*>(workspace) + partials_bytes(g.gy, s.channels));
    if (cudaMemsetAsync(a.done, 0, g.gx * sizeof(unsigned), stream) !=
        cudaSuccess) {
      return check_launch("reduce (counters)");
    }
  }
  launch<Kernel>(dim3{unsigned(g.gx), unsigned(g.gy)}, kThreads, 0, stream, a);
  return check_launch("reduce");
}

// Reduction stage of kind K: picks the kernel for the layout and vector width.
template <typename T, Kind K>
Status run_reduce(const Shape& s, DType t, ReduceArgs a, void* workspace,
                  cudaStream_t stream) {
  constexpr int V = kVecBytes / sizeof(T);
  const int vec = pick_vec(s, t, {a.x, a.dy, a.y, a.g});
  if (s.inner == 1 && vec == V) {
    return reduce_with<reduce_cl_kernel<T, V, K>, K>(s, vec, a, workspace,
                                                     stream);
  }
  if (s.inner == 1) {
    return reduce_with<reduce_cl_kernel<T, 1, K>, K>(s, vec, a, workspace,
                                                     stream);
  }
  if (vec == V) {
    return reduce_with<reduce_cf_kernel<T, V, K>, K>(s, vec, a, workspace,
                                                     stream);
  }
  return reduce_with<reduce_cf_kernel<T, 1, K>, K>(s, vec, a, workspace,
                                                   stream);
}

// An elementwise pass by Kernel (one launch): one wave of blocks, or fewer
// when the tensor has less work (grid-stride loops cover the rest).
template <auto Kernel, bool kGrad>
Status apply_with(const Shape& s, int vec, ApplyArgs a, cudaStream_t stream) {
  const int64_t wave = resident_blocks<Kernel>();
  if (wave == 0) return no_occupancy(kGrad ? "backward dx" : "normalize");
  dim3 grid;
  if (s.inner == 1) {
    const int64_t vectors = ceil_div(s.channels, vec);
    a.tx = cl_tx(vectors);
    const int64_t gx = ceil_div(vectors, a.tx);
    const int64_t gy = std::max<int64_t>(
        1, std::min({ceil_div(s.outer, kThreads / a.tx), ceil_div(wave, gx),
                     kMaxGridY}));
    grid = dim3{unsigned(gx), unsigned(gy)};
  } else {
    a.chunks = chunks_of(s.inner);
    grid = dim3{unsigned(std::max<int64_t>(
        1, std::min(ceil_div(s.outer * s.channels * a.chunks, kWarps), wave)))};
  }
  launch<Kernel>(grid, kThreads, 0, stream, a);
  return check_launch(kGrad ? "backward dx" : "normalize");
}

// Elementwise stage: picks the kernel for the layout and vector width.
template <typename T, bool kGrad>
Status run_apply(const Shape& s, DType t, ApplyArgs a, cudaStream_t stream) {
  constexpr int V = kVecBytes / sizeof(T);
  const int vec = pick_vec(s, t, {a.x, a.out, a.dy, a.side});
  a.outer = s.outer;
  a.C = s.channels;
  a.inner = s.inner;
  if (s.inner == 1 && vec == V) {
    return apply_with<apply_cl_kernel<T, V, kGrad>, kGrad>(s, vec, a, stream);
  }
  if (s.inner == 1) {
    return apply_with<apply_cl_kernel<T, 1, kGrad>, kGrad>(s, vec, a, stream);
  }
  if (vec == V) {
    return apply_with<apply_cf_kernel<T, V, kGrad>, kGrad>(s, vec, a, stream);
  }
  return apply_with<apply_cf_kernel<T, 1, kGrad>, kGrad>(s, vec, a, stream);
}

// The normalize pass's coefficients from given statistics (one small
// launch; saved_mean/saved_inv_std written when given).
Status run_norm_coef(int64_t C, const void* mean, const void* var,
                     double epsilon, const void* scale, const void* offset,
                     void* saved_mean, void* saved_inv_std, float* coef,
                     cudaStream_t stream) {
  Final f;
  f.C = C;
  f.given_mean = static_cast<const float*>(mean);
  f.given_var = static_cast<const float*>(var);
  f.epsilon = epsilon;
  f.scale = static_cast<const float*>(scale);
  f.offset = static_cast<const float*>(offset);
  f.saved_mean = static_cast<float*>(saved_mean);
  f.saved_inv_std = static_cast<float*>(saved_inv_std);
  f.norm = coef;
  launch<norm_coef_kernel>(unsigned(ceil_div(C, kThreads)), kThreads, 0,
                           stream, f);
  return check_launch("normalize coefficients");
}

// Per-channel coefficients of an apply pass, [rows, C] floats at the
// front of a workspace: kNormRows (k, b: norm_coef) for normalize and
// forward, kGradRows (k_dy, k_x, k_0: grad_coef) for backward.
constexpr int kNormRows = 2, kGradRows = 3;
size_t coef_bytes(int rows, const Shape& shape) {
  return align256(rows * shape.channels * sizeof(float));
}

}  // namespace

size_t moments_workspace_bytes(const Shape& shape, DType dtype) {
  return partial_bytes(shape, dtype);
}

size_t normalize_workspace_bytes(const Shape& shape, DType) {
  return coef_bytes(kNormRows, shape);
}

size_t forward_workspace_bytes(const Shape& shape, DType dtype) {
  return coef_bytes(kNormRows, shape) + partial_bytes(shape, dtype);
}

size_t backward_workspace_bytes(const Shape& shape, DType dtype) {
  return coef_bytes(kGradRows, shape) + partial_bytes(shape, dtype);
}

Status moments(const MomentsParams& p, cudaStream_t stream) {
  Status st = check_shape(p.shape);
  if (!st.ok() || p.shape.channels == 0) return st;
  if ((!p.x && p.shape.size() > 0) || !p.mean || !p.var) {
    return Status::Error("moments: x, mean and var are required");
  }
  return dispatch(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    ReduceArgs a;
    a.x = p.x;
    a.f.mean = static_cast<float*>(p.mean);
    a.f.var = static_cast<float*>(p.var);
    return run_reduce<T, Kind::kMoments>(p.shape, p.dtype, a, p.workspace,
                                         stream);
  });
}

Status normalize(const NormalizeParams& p, cudaStream_t stream) {
  Status st = check_shape(p.shape);
  if (!st.ok() || p.shape.channels == 0) return st;
  if (((!p.x || !p.y) && p.shape.size() > 0) || !p.mean || !p.var) {
    return Status::Error("normalize: x, y, mean and var are required");
  }
  if (!p.workspace) return Status::Error("normalize: workspace is required");
  return dispatch(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    float* coef = static_cast<float*>(p.workspace);
    Status s = run_norm_coef(p.shape.channels, p.mean, p.var, p.epsilon,
                             p.scale, p.offset, nullptr, nullptr, coef, stream);
    if (!s.ok()) return s;
    ApplyArgs a;
    a.x = p.x;
    a.out = p.y;
    a.mean = static_cast<const float*>(p.mean);
    a.coef = coef;
    a.side = p.side_input;
    a.relu = p.relu;
    return run_apply<T, false>(p.shape, p.dtype, a, stream);
  });
}

Status update_moving_stats(const UpdateParams& p, cudaStream_t stream) {
  if (p.channels < 0) return Status::Error("update: channels < 0");
  if (p.channels == 0) return Status::Ok();  // nothing changes (bn.h)
  if (p.dtype == DType::kFloat64) {
    return Status::Error("float64 is not supported on GPU");
  }
  if (!p.mean || !p.var || !p.moving_mean || !p.moving_var) {
    return Status::Error(
        "update: mean, var, moving_mean and moving_var are required");
  }
  launch<update_kernel>(1, kThreads, 0, stream,
      static_cast<const float*>(p.mean), static_cast<const float*>(p.var),
      p.channels, p.count, static_cast<float*>(p.moving_mean),
      static_cast<float*>(p.moving_var), p.num_updates, p.momentum,
      p.unbiased_variance);
  return check_launch("update");
}

Status forward(const ForwardParams& p, cudaStream_t stream) {
  Status st = check_shape(p.shape);
  if (!st.ok() || p.shape.channels == 0) return st;
  if (((!p.x || !p.y) && p.shape.size() > 0) || !p.saved_mean ||
      !p.saved_inv_std) {
    return Status::Error(
        "forward: x, y, saved_mean and saved_inv_std are required");
  }
  if (!p.training && (!p.moving_mean || !p.moving_var)) {
    return Status::Error("inference needs moving_mean and moving_variance");
  }
  if (p.training && (p.moving_mean != nullptr) != (p.moving_var != nullptr)) {
    return Status::Error("forward: give both moving_mean and moving_var");
  }
  if (!p.workspace) return Status::Error("forward: workspace is required");
  return dispatch(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    float* coef = static_cast<float*>(p.workspace);
    ApplyArgs a;
    a.x = p.x;
    a.out = p.y;
    a.mean = static_cast<const float*>(p.saved_mean);
    a.coef = coef;
    a.side = p.side_input;
    a.relu = p.relu;
    Status s;
    if (p.training) {
      ReduceArgs r;
      r.x = p.x;
      r.f.saved_mean = static_cast<float*>(p.saved_mean);
      r.f.saved_inv_std = static_cast<float*>(p.saved_inv_std);
      r.f.epsilon = p.epsilon;
      r.f.scale = static_cast<const float*>(p.scale);
      r.f.offset = static_cast<const float*>(p.offset);
      r.f.norm = coef;
      r.f.moving_mean = static_cast<float*>(p.moving_mean);
      r.f.moving_var = static_cast<float*>(p.moving_var);
      r.f.num_updates = p.num_updates;
      r.f.momentum = p.momentum;
      r.f.unbiased = p.unbiased_variance;
      s = run_reduce<T, Kind::kForward>(
          p.shape, p.dtype, r,
          static_cast<char*>(p.workspace) + coef_bytes(kNormRows, p.shape),
          stream);
      a.increment = p.moving_mean ? p.num_updates : nullptr;
    } else {
      s = run_norm_coef(p.shape.channels, p.moving_mean, p.moving_var,
                        p.epsilon, p.scale, p.offset, p.saved_mean,
                        p.saved_inv_std, coef, stream);
    }
    if (!s.ok()) return s;
    return run_apply<T, false>(p.shape, p.dtype, a, stream);
  });
}

Status backward(const BackwardParams& p, cudaStream_t stream) {
  Status st = check_shape(p.shape);
  if (!st.ok() || p.shape.channels == 0) return st;
  if (((!p.x || !p.dy) && p.shape.size() > 0) || !p.saved_mean ||
      !p.saved_inv_std) {
    return Status::Error(
        "backward: dy, x, saved_mean and saved_inv_std are required");
  }
  if (!p.workspace) return Status::Error("backward: workspace is required");
  if (p.relu && !p.y && p.shape.size() > 0) {
    return Status::Error("backward: relu needs y");
  }
  st = check_given_sums(p);
  if (!st.ok()) return st;
  return dispatch(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    float* coef = static_cast<float*>(p.workspace);
    ReduceArgs r;
    r.x = p.x;
    r.dy = p.dy;
    r.f.grad_mean = static_cast<const float*>(p.saved_mean);
    r.f.grad_inv_std = static_cast<const float*>(p.saved_inv_std);
    r.f.scale = static_cast<const float*>(p.scale);
    r.f.training = p.training;
    r.f.coef = coef;
    r.y = p.relu ? p.y : nullptr;
    r.g = p.dside ? p.dside : (p.relu ? p.dx : nullptr);
    Status s;
    if (p.sum_dy) {
      // Given sums: one small launch for the coefficients, then the dx pass.
      if (!p.dx) return s;
      r.f.C = p.shape.channels;
      r.f.count = p.count;
      launch<given_sums_kernel>(
          unsigned(ceil_div(p.shape.channels, kThreads)), kThreads, 0, stream,
          r.f, static_cast<const float*>(p.sum_dy),
          static_cast<const float*>(p.sum_dy_xhat));
      s = check_launch("backward coefficients");
    } else {
      r.f.dscale = static_cast<float*>(p.dscale);
      r.f.doffset = static_cast<float*>(p.doffset);
      char* partials = static_cast<char*>(p.workspace) +
                       coef_bytes(kGradRows, p.shape);
      s = run_reduce<T, Kind::kGrad>(p.shape, p.dtype, r, partials, stream);
    }
    if (!s.ok() || !p.dx) return s;
    ApplyArgs a;
    a.x = p.x;
    a.dy = r.g ? r.g : p.dy;
    a.out = p.dx;
    a.mean = static_cast<const float*>(p.saved_mean);
    a.coef = coef;
    return run_apply<T, true>(p.shape, p.dtype, a, stream);
  });
}

}  // namespace cuda
}  // namespace fused_bn
