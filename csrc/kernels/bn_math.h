// The per-channel math of batch norm, in one place: the CPU kernels
// (bn_cpu.cc), the CUDA kernels (bn_cuda.cu) and, through bn_cuda.cu, the
// CPU emulator of the CUDA kernels (csrc/emu) all call these functions, and
// fused_bn/reference.py mirrors them (same names, same formula order) for
// the pure-TensorFlow path and the tests.
//
// Every function is FUSED_BN_MATH: static inline (each translation unit its
// own copy: bn_cpu.cc is compiled once per instruction set, and a shared
// out-of-line copy could run AVX-512 code on an AVX2 machine), and
// __host__ __device__ under nvcc and the emulator.
//
// Arithmetic: each function is IEEE double (or A, the caller's accumulation
// type), rounded per operation. Compilers may contract a * b + c into a
// fused multiply-add (nvcc does by default, g++ with -mfma), so results can
// differ from the mirror by one rounding of the double; once rounded to
// float32 that is at most one ulp, and usually none. Sums, products,
// quotients and square roots without a product-add (inv_std) are bitwise
// the same everywhere.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#define FUSED_BN_MATH static inline __host__ __device__
#elif defined(FUSED_BN_CUDA_EMU)
#include <cuda_runtime.h>  // the emulator's: __host__ and __device__ are empty
#define FUSED_BN_MATH static inline __host__ __device__
#else
#define FUSED_BN_MATH static inline
#endif

namespace fused_bn {
namespace math {

// ---------------------------------------------------------------- moving stats

// The momentum of the moving-average update number t (t = the counter's
// value before it): momentum, or with warm-up min(momentum, t / (t + 1)),
// so that the first updates average all batches so far.
FUSED_BN_MATH double ema_momentum(double momentum, bool warmup, int64_t t) {
  if (!warmup) return momentum;
  const double td = double(t);
  const double w = td / (td + 1.0);
  return w < momentum ? w : momentum;
}

// The Bessel factor count / (count - 1) that makes a biased variance of
// `count` values unbiased (1 when not wanted or count < 2).
FUSED_BN_MATH double bessel_factor(bool unbiased, int64_t count) {
  return unbiased && count > 1 ? double(count) / double(count - 1) : 1.0;
}

// One moving-average step: moving * m + batch * (1 - m).
FUSED_BN_MATH double ema(double moving, double batch, double m) {
  return moving * m + batch * (1.0 - m);
}

// The moving variance's batch term: the biased batch variance times the
// Bessel factor.
FUSED_BN_MATH double batch_variance(double var, double bessel) {
  return var * bessel;
}

// ---------------------------------------------------------------- statistics

// Count, mean and M2 (sum of squared deviations from the mean) of a set of
// values, in the accumulation type A.
template <typename A>
struct Moments {
  A n, mean, m2;
};

// Chan et al.'s parallel merge of the moments of two disjoint sets (an
// empty set, n == 0, leaves the other unchanged). A single value x is
// {1, x, 0}: merged into a it is Welford's update.
template <typename A>
FUSED_BN_MATH Moments<A> chan_merge(const Moments<A>& a, const Moments<A>& b) {
  if (b.n == A(0)) return a;
  if (a.n == A(0)) return b;
  const A n = a.n + b.n;
  const A fb = b.n / n;
  const A d = b.mean - a.mean;
  return {n, a.mean + d * fb, a.m2 + b.m2 + d * d * (a.n * fb)};
}

// Merging k sets at once (the same result as k - 1 Chan merges, with one
// division instead of k - 1): their pooled mean is sum(n_i * mean_i) / n,
// and their M2 is the sum of pooled_m2_term(n_i, mean_i, m2_i, pooled mean).
FUSED_BN_MATH double pooled_m2_term(double n, double mean, double m2,
                                    double pooled_mean) {
  const double d = mean - pooled_mean;
  return m2 + n * d * d;
}

// 1 / sqrt(var + epsilon): the normalization's inverse standard deviation.
FUSED_BN_MATH double inv_std(double var, double epsilon) {
  return 1.0 / sqrt(var + epsilon);
}

// ---------------------------------------------------------------- backward

// The backward's dx per channel is k_dy * dy + k_x * (x - mean) + k_0.
struct GradCoefs {
  double k_dy, k_x, k_0;
};

// sum(dy * x_hat) from sum(dy * (x - mean)), which is what a reduction over
// x and dy gives: x_hat = (x - mean) * inv_std.
FUSED_BN_MATH double sum_dy_xhat(double sum_dy_xmu, double inv_std) {
  return sum_dy_xmu * inv_std;
}

// dx = scale * inv_std * (dy - sum_dy / count - x_hat * sum_dy_xhat / count)
// when training (frozen: scale * inv_std * dy), as coefficients. The sums
// are the reduction's own (count = its values per channel) or given ones
// spanning more values than x (sync BN: the global batch's sums and count).
FUSED_BN_MATH GradCoefs grad_coefs(double scale, double inv_std, double sum_dy,
                                   double sum_dy_xhat, double count,
                                   bool training) {
  const double k_dy = scale * inv_std;
  if (!training) return {k_dy, 0.0, 0.0};
  return {k_dy, -k_dy * inv_std * sum_dy_xhat / count, -k_dy * sum_dy / count};
}

// ---------------------------------------------------------------- bfloat16

// The bfloat16 nearest to the float32 with bits u (ties to even) as the
// high 16 bits' value, u >> 16; a NaN stays NaN (quiet bit set). U is
// uint32_t or a vector of it (GCC vector extensions: the CPU kernels'
// vector stores).
template <typename U>
FUSED_BN_MATH U bf16_round_bits(U u) {
  const U rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const U quiet = (u >> 16) | 0x40u;
  return (u & 0x7fffffffu) > 0x7f800000u ? quiet : rounded;
}

// The bits of the bfloat16 nearest to v (ties to even, NaN stays NaN).
// Devices with a bfloat16 conversion (sm_80 on) use it: the same rounding
// in one instruction, except that any NaN becomes the canonical one.
FUSED_BN_MATH uint16_t bf16_bits(float v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  return __bfloat16_as_ushort(__float2bfloat16_rn(v));
#else
  uint32_t u;
  memcpy(&u, &v, sizeof(u));
  return uint16_t(bf16_round_bits(u));
#endif
}

}  // namespace math
}  // namespace fused_bn
