// CPU kernels for bn.h.
//
// Work is split into blocks whose bounds depend only on the shape:
//   channels-last  [M, C]:     a block is kBlockElems / C rows (at least
//                              kMinRows) x a channel tile; inner loops run
//                              over contiguous channels.
//   channels-first [N, C, S]:  a block is one (n, c) row chunk of <= kChunk
//                              contiguous values; inner loops run over S.
// Each block writes its own partial (mean and M2 from one pass around a
// pilot mean, see block_moments, or plain sums for the backward); partials
// are merged per channel in block order, in double. Results therefore do
// not depend on the thread count.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include <immintrin.h>

#include "bn.h"
#include "bn_math.h"

#ifndef FUSED_BN_CPU_ISA
#define FUSED_BN_CPU_ISA avx2
#endif

namespace fused_bn {
namespace cpu {
// This file is compiled once per instruction set (see bn_cpu_dispatch.cc).
namespace FUSED_BN_CPU_ISA {
namespace {

constexpr int64_t kTileChannels = 1024;  // channels-last tile width
constexpr int64_t kBlockElems = 65536;   // values per channels-last block
constexpr int64_t kMinRows = 256;        // rows per channels-last block, min
constexpr int64_t kChunk = 16384;        // channels-first chunk of one row
constexpr int64_t kMergeTile = 256;      // channels per merge work item
constexpr int64_t kSubRows = 32;         // rows per float sub-sum
constexpr int64_t kSubChunk = 512;       // values per float sub-sum
constexpr int64_t kPilot = 8;            // moments: rows (values) of the pilot
// Channels-last loops walk a group of rows (contiguous, in L1) one vector of
// channels at a time, so per-channel sums live in registers meanwhile. Each
// channel still sees its rows in order, as in a row-by-row loop.
constexpr int64_t kGroup = 8;
// Merges of fewer partial values than this run on the calling thread.
constexpr int64_t kSerialMerge = int64_t(1) << 18;

struct bf16 {
  uint16_t bits;
};
using half = _Float16;

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

inline float load(half v) { return static_cast<float>(v); }
inline float load(float v) { return v; }
inline double load(double v) { return v; }
inline float load(bf16 v) {
  uint32_t u = uint32_t(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

template <typename T>
inline T store(typename AccOf<T>::type v) {
  return static_cast<T>(v);
}
// Round to nearest even; NaN stays NaN (quiet bit set).
template <>
inline bf16 store<bf16>(float v) {
  return bf16{math::bf16_bits(v)};
}

// One 32-byte vector of accumulator type A (GCC/Clang vector extensions):
// the channels-last loops below are written with it so that per-channel
// values stay in registers, whatever the auto-vectorizer decides.
typedef float V8f __attribute__((vector_size(32)));
typedef double V4d __attribute__((vector_size(32)));
template <typename A>
struct Vec {
  using type = V8f;
  static constexpr int64_t lanes = 8;
};
template <>
struct Vec<double> {
  using type = V4d;
  static constexpr int64_t lanes = 4;
};
template <typename T>
using VecOf = typename Vec<typename AccOf<T>::type>::type;
template <typename T>
constexpr int64_t kLanesOf = Vec<typename AccOf<T>::type>::lanes;

// Channels-last loops keep kUnroll vectors of channels in registers at a
// time, so the per-row additions form kUnroll independent dependency chains
// rather than one (a single chain is bound by the add latency, not by
// memory). for_columns calls body(c, std::integral_constant<int, K>) for
// channel groups [c, c + K * lanes) with K = kUnroll, then K = 1, covering
// the whole vectors of [0, w); it returns where the scalar tail starts. Each
// channel still sees its rows in order, so the unroll changes no result.
constexpr int kUnroll = 4;
#define FUSED_BN_UNROLL _Pragma("GCC unroll 4")
template <typename T, typename Body>
inline int64_t for_columns(int64_t w, Body&& body) {
  constexpr int64_t L = kLanesOf<T>;
  int64_t c = 0;
  for (; c + kUnroll * L <= w; c += kUnroll * L) {
    body(c, std::integral_constant<int, kUnroll>());
  }
  for (; c + L <= w; c += L) body(c, std::integral_constant<int, 1>());
  return c;
}

template <typename V>
inline V vload_acc(const void* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename V>
inline void vstore_acc(void* p, V v) {
  std::memcpy(p, &v, sizeof(v));
}
// Loads kLanesOf<T> values of T as a vector of A.
template <typename T>
inline VecOf<T> vload(const T* p) {
  return vload_acc<VecOf<T>>(p);
}
template <>
inline VecOf<half> vload(const half* p) {
  using H = half __attribute__((vector_size(16)));
  return __builtin_convertvector(vload_acc<H>(p), VecOf<half>);
}
template <>
inline VecOf<bf16> vload(const bf16* p) {
  using U16 = uint16_t __attribute__((vector_size(16)));
  using U32 = uint32_t __attribute__((vector_size(32)));
  const U32 u = __builtin_convertvector(vload_acc<U16>(p), U32) << 16;
  VecOf<bf16> f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
// A vector of A rounded to T (as store<T>), as T's bits: 32 bytes for float
// and double, 16 for half and bfloat16.
template <typename T>
inline auto pack(VecOf<T> v) {
  if constexpr (std::is_same_v<T, half>) {
    using H = half __attribute__((vector_size(16)));
    return __builtin_convertvector(v, H);
  } else if constexpr (std::is_same_v<T, bf16>) {
    using U16 = uint16_t __attribute__((vector_size(16)));
    using U32 = uint32_t __attribute__((vector_size(32)));
    U32 u;
    std::memcpy(&u, &v, sizeof(u));
    return __builtin_convertvector(math::bf16_round_bits(u), U16);
  } else {
    return v;
  }
}

// Pairwise sum of the lanes of a vector.
template <typename V>
inline auto hsum(V v) {
  using E = std::remove_reference_t<decltype(v[0])>;
  constexpr int n = sizeof(V) / sizeof(E);
  E t[n];
  std::memcpy(t, &v, sizeof(v));
  for (int w = n / 2; w > 0; w /= 2) {
    for (int i = 0; i < w; ++i) t[i] += t[i + w];
  }
  return t[0];
}
// Sums over a contiguous range [i0, i1) for the channels-first loops:
// vec(i, acc) adds the values at i .. i + lanes - 1 to the vector
// accumulators acc[0..K), two interleaved sets of them (two independent
// add chains); tail(i, out) adds the value at i to out[0..K) directly.
// out[k] receives the pairwise horizontal sum of set k, then the tail.
// (GCC's `omp simd` reductions finished with a serial sum of the lanes
// from memory, longer than the loop itself for a 7x7 row.)
template <typename T, int K, typename Vec, typename Tail>
inline void row_sums(int64_t i0, int64_t i1, Vec&& vec, Tail&& tail,
                     typename AccOf<T>::type* out) {
  using V = VecOf<T>;
  constexpr int64_t L = kLanesOf<T>;
  V a[K] = {}, b[K] = {};
  int64_t i = i0;
  for (; i + 2 * L <= i1; i += 2 * L) {
    vec(i, a);
    vec(i + L, b);
  }
  if (i + L <= i1) {
    vec(i, a);
    i += L;
  }
  for (int k = 0; k < K; ++k) out[k] = hsum(a[k] + b[k]);
  for (; i < i1; ++i) tail(i, out);
}

// Outputs of at least kStreamBytes (y, dx) whose rows are whole 64-byte
// lines are written with non-temporal stores. They would not stay in the
// private caches anyway (a few MB per core), and a normal store first reads
// the line it overwrites. On the benchmark VM this made fused_bn's 25 MB
// forward+backward about 10% faster, and the whole training step of three
// conv + BN + ReLU blocks at 32x56x56x64 2-3% faster; below a few MB it
// made no difference.
constexpr int64_t kStreamBytes = int64_t(4) << 20;
// Not when the output reuses an input's buffer: there the line is in cache
// already, and a non-temporal store would evict it before the rest is read.
template <typename T>
inline bool streamable(const T* out, int64_t row, int64_t total,
                       const T* in0, const T* in1 = nullptr) {
  return total * int64_t(sizeof(T)) >= kStreamBytes &&
         row * int64_t(sizeof(T)) % 64 == 0 &&
         reinterpret_cast<uintptr_t>(out) % 64 == 0 && out != in0 &&
         out != in1;
}
// Non-temporal store of kLanesOf<T> values; p is aligned to their size.
template <typename T>
inline void vstream(T* p, VecOf<T> v) {
  const auto bits = pack<T>(v);
  if constexpr (sizeof(bits) == 32) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), (__m256i)bits);
  } else {
    _mm_stream_si128(reinterpret_cast<__m128i*>(p), (__m128i)bits);
  }
}
// The writer of one row of an elementwise pass: vec(i) gives the values
// i .. i + lanes - 1 as a vector, at(i) value i.
template <typename Vec, typename At>
struct RowWriter {
  Vec vec;
  At at;
};
template <typename Vec, typename At>
inline RowWriter<Vec, At> row_writer(Vec vec, At at) {
  return {vec, at};
}

// An elementwise pass (y, dx) over the rows of x: channels-last rows of C
// values, sharded kBlockElems values at a time, or channels-first rows of
// S = inner values, one (n, c) row an item. row(r) returns the RowWriter of
// row r, with the row's constants (a channels-first row's channel factors)
// captured once. A streamable output (streamable(), given the inputs it
// might share a buffer with) is written a vector at a time with
// non-temporal stores; otherwise by a plain loop over at(i), vectorized.
template <typename T, typename Row>
void elementwise_pass(const Shape& s, T* out, const T* in0,
                      const std::common_type_t<T>* in1,
                      const ParallelFor& pf, Row&& row) {
  const bool last = s.inner == 1;
  const int64_t n = last ? s.channels : s.inner;
  const int64_t rows = last ? s.outer : s.outer * s.channels;
  const int64_t rows_per = last ? std::max<int64_t>(1, kBlockElems / n) : 1;
  const bool stream = streamable(out, n, s.size(), in0, in1);
  pf((rows + rows_per - 1) / rows_per, rows_per * n * int64_t(sizeof(T)),
     [&](int64_t b0, int64_t b1) {
       const int64_t r1 = std::min(rows, b1 * rows_per);
       for (int64_t r = b0 * rows_per; r < r1; ++r) {
         const auto w = row(r);
         T* o = out + r * n;
         if (stream) {
           for (int64_t i = 0; i < n; i += kLanesOf<T>) vstream(o + i, w.vec(i));
         } else {
#pragma omp simd
           for (int64_t i = 0; i < n; ++i) o[i] = store<T>(w.at(i));
         }
       }
       if (stream) _mm_sfence();
     });
}

// Geometry of the reduction blocks of one shape.
struct Blocks {
  bool channels_last;
  int64_t rows_per_block = 0;  // channels-last
  int64_t tile = 0;            // channels-last
  int64_t tiles = 0;           // channels-last
  int64_t chunks = 0;          // channels-first: chunks per row
  int64_t row_blocks = 0;      // partial sets: blocks along the reduced axes

  explicit Blocks(const Shape& s) : channels_last(s.inner == 1) {
    if (channels_last) {
      tile = std::min<int64_t>(s.channels, kTileChannels);
      tiles = (s.channels + tile - 1) / tile;
      rows_per_block = std::max<int64_t>(kMinRows, kBlockElems / tile);
      row_blocks = (s.outer + rows_per_block - 1) / rows_per_block;
    } else {
      chunks = (s.inner + kChunk - 1) / kChunk;
      row_blocks = s.outer * chunks;
    }
  }
  int64_t units(const Shape& s) const {
    return channels_last ? row_blocks * tiles : row_blocks * s.channels;
  }
  // Number of values block b reduces per channel.
  int64_t count(const Shape& s, int64_t b) const {
    if (channels_last) {
      return std::min(rows_per_block, s.outer - b * rows_per_block);
    }
    const int64_t k = b % chunks;
    return std::min(kChunk, s.inner - k * kChunk);
  }
};

// Unit u of a shape's blocks. For channels-last it covers rows
// [begin, end) and channels [c0, c1) of block `block`; for channels-first
// it covers values [begin, end) of row (o, c0), with c1 == c0 + 1.
struct Unit {
  int64_t block, c0, c1, begin, end, o;
};
inline Unit unit_of(const Shape& s, const Blocks& g, int64_t u) {
  Unit r;
  if (g.channels_last) {
    r.block = u / g.tiles;
    const int64_t t = u % g.tiles;
    r.c0 = t * g.tile;
    r.c1 = std::min(s.channels, r.c0 + g.tile);
    r.begin = r.block * g.rows_per_block;
    r.end = std::min(s.outer, r.begin + g.rows_per_block);
    r.o = 0;
  } else {
    r.block = u / s.channels;  // = o * chunks + k
    r.c0 = u % s.channels;
    r.c1 = r.c0 + 1;
    r.o = r.block / g.chunks;
    const int64_t k = r.block % g.chunks;
    r.begin = k * kChunk;
    r.end = std::min(s.inner, r.begin + kChunk);
  }
  return r;
}

// Calls fn(unit) for units [u0, u1), stepping from one to the next without
// the four 64-bit divisions of unit_of (channels-first units can be rows of
// 49 values; the divisions were a few percent of those).
template <typename F>
inline void for_units(const Shape& s, const Blocks& g, int64_t u0, int64_t u1,
                      F&& fn) {
  if (u0 >= u1) return;
  Unit r = unit_of(s, g, u0);
  for (int64_t u = u0;;) {
    fn(static_cast<const Unit&>(r));
    if (++u == u1) return;
    if (g.channels_last) {
      if (r.c1 < s.channels) {
        r.c0 = r.c1;
        r.c1 = std::min(s.channels, r.c0 + g.tile);
      } else {
        r = unit_of(s, g, u);  // next row block
      }
    } else if (r.c1 < s.channels) {
      r.c0 = r.c1++;
    } else {
      r = unit_of(s, g, u);  // next row or chunk
    }
  }
}

// Two per-channel sums over rows [begin, end) of a channels-last block of
// w channels, added in double to out0[0, w) and out1[0, w):
// vec(r, c, mu, a, b) adds the terms of row r, channels [c, c + lanes) to
// vectors a and b, tail(r, c, mu, a, b) those of one channel; mu is the
// center, center[c]. Sub-sums of kSubRows rows are kept in the accumulation
// type. Rows go in groups of kGroup, a group one vector of channels at a
// time (for_columns), so the sums stay in registers over the group; each
// channel still sees its rows in order.
template <typename T, typename Vec, typename Tail>
inline void column_sums(int64_t begin, int64_t end, int64_t w,
                        const typename AccOf<T>::type* center,
                        double* __restrict out0, double* __restrict out1,
                        Vec&& vec, Tail&& tail) {
  using A = typename AccOf<T>::type;
  using V = VecOf<T>;
  constexpr int64_t L = kLanesOf<T>;
  A s0[kTileChannels], s1[kTileChannels];
  for (int64_t r0 = begin; r0 < end; r0 += kSubRows) {
    const int64_t r1 = std::min(end, r0 + kSubRows);
    for (int64_t c = 0; c < w; ++c) s0[c] = s1[c] = A(0);
    for (int64_t g0 = r0; g0 < r1; g0 += kGroup) {
      const int64_t g1 = std::min(r1, g0 + kGroup);
      const int64_t c = for_columns<T>(w, [&](int64_t c, auto k) {
        constexpr int K = decltype(k)::value;
        V mu[K], a[K], b[K];
        FUSED_BN_UNROLL
        for (int j = 0; j < K; ++j) {
          mu[j] = vload_acc<V>(center + c + j * L);
          a[j] = vload_acc<V>(s0 + c + j * L);
          b[j] = vload_acc<V>(s1 + c + j * L);
        }
        for (int64_t r = g0; r < g1; ++r) {
          FUSED_BN_UNROLL
          for (int j = 0; j < K; ++j) vec(r, c + j * L, mu[j], a[j], b[j]);
        }
        FUSED_BN_UNROLL
        for (int j = 0; j < K; ++j) {
          vstore_acc(s0 + c + j * L, a[j]);
          vstore_acc(s1 + c + j * L, b[j]);
        }
      });
      for (int64_t cc = c; cc < w; ++cc) {
        for (int64_t r = g0; r < g1; ++r) tail(r, cc, center[cc], s0[cc], s1[cc]);
      }
    }
    for (int64_t c = 0; c < w; ++c) {
      out0[c] += double(s0[c]);
      out1[c] += double(s1[c]);
    }
  }
}

// Whether the sums around a pilot mean K cancel so much that M2 would lose
// more than 3 bits: sum(d)^2 / n, the part of sum(d * d) due to K's offset
// from the block mean, is over 7/8 of it (the rounding errors of the sums,
// relative to M2, grow as 1 / (1 - that fraction)). Then the block is summed
// again around the mean the first pass found. For data without outliers
// this never happens: the offset of a mean of kPilot values is about
// sigma / sqrt(kPilot), and 7/8 needs sqrt(7) sigma; a lower bar would
// be crossed by chance by some channel of a wide tile nearly every block.
inline bool far_from_pilot(double dsum, double sq, double inv_n) {
  return dsum * dsum * inv_n > 0.875 * sq;
}

// M2 = sum(d * d) - sum(d)^2 / n, clamped at 0 against rounding; NaN stays
// NaN (std::max would make it 0): a block holding an Inf gives Inf - Inf,
// and its channel's statistics must come out NaN, as the stock op's do.
inline double block_m2(double sq, double dsum, double inv_n) {
  const double m2 = sq - dsum * dsum * inv_n;
  return m2 < 0.0 ? 0.0 : m2;
}

// Per-block mean and M2 in one pass over memory. A pilot mean K, the mean of
// the block's first kPilot rows (channels-last) or values, comes first;
// the pass then sums d = x - K and d * d, and the block mean is
// K + sum(d) / n and M2 = sum(d * d) - sum(d)^2 / n, in double. K is an
// average of the block's own values, so it usually lies within a standard
// deviation of the block mean, and large offsets cancel exactly (x - K is
// exact near K). Where it does not (the pilot rows hold outliers, or the
// values drift along the rows), far_from_pilot() sends the block through
// the sums once more, around the mean found: the result is then as
// accurate as a two-pass. The pilot values are read a second time from L1,
// the rest once: a full second pass, even from L2, made the moments half
// again slower than a read of x. Sums of d run over sub-blocks (kSubRows
// rows, kSubChunk values) in the accumulation type and are added in double,
// so the error does not grow with the block length.
template <typename T>
void block_moments(const Shape& s, const Unit& u, const T* __restrict x,
                   double* __restrict pmean, double* __restrict pm2) {
  using A = typename AccOf<T>::type;
  if (s.inner == 1) {
    using V = VecOf<T>;
    const int64_t C = s.channels, w = u.c1 - u.c0;
    const double inv_n = 1.0 / double(u.end - u.begin);
    double* __restrict mean_out = pmean + u.block * C + u.c0;
    double* __restrict m2_out = pm2 + u.block * C + u.c0;
    // The pilot's own sums are shifted by the block's first row.
    const int64_t pilot_end = std::min(u.end, u.begin + kPilot);
    A shift[kTileChannels], mean[kTileChannels];
    double dsum_d[kTileChannels];
    const T* __restrict x0 = x + u.begin * C + u.c0;
    for (int64_t c = 0; c < w; ++c) {
      shift[c] = load(x0[c]);
      mean[c] = A(0);
      dsum_d[c] = m2_out[c] = 0.0;
    }
    const T* __restrict xb = x + u.c0;
    for (int64_t r0 = u.begin; r0 < pilot_end; r0 += kGroup) {
      const int64_t r1 = std::min(pilot_end, r0 + kGroup);
      const int64_t c = for_columns<T>(w, [&](int64_t c, auto k) {
        constexpr int K = decltype(k)::value;
        V acc[K], sh[K];
        FUSED_BN_UNROLL
        for (int j = 0; j < K; ++j) {
          acc[j] = vload_acc<V>(mean + c + j * kLanesOf<T>);
          sh[j] = vload_acc<V>(shift + c + j * kLanesOf<T>);
        }
        for (int64_t r = r0; r < r1; ++r) {
          const T* __restrict xr = xb + r * C + c;
          FUSED_BN_UNROLL
          for (int j = 0; j < K; ++j) acc[j] += vload(xr + j * kLanesOf<T>) - sh[j];
        }
        FUSED_BN_UNROLL
        for (int j = 0; j < K; ++j) vstore_acc(mean + c + j * kLanesOf<T>, acc[j]);
      });
      for (int64_t cc = c; cc < w; ++cc) {
        for (int64_t r = r0; r < r1; ++r) mean[cc] += load(xb[r * C + cc]) - shift[cc];
      }
    }
    const A pilot_n = A(pilot_end - u.begin);
    for (int64_t c = 0; c < w; ++c) mean[c] = shift[c] + mean[c] / pilot_n;
    for (int pass = 0;; ++pass) {
      column_sums<T>(u.begin, u.end, w, mean, dsum_d, m2_out,
                     [&](int64_t r, int64_t c, V mu, V& a, V& b) {
                       const V d = vload(xb + r * C + c) - mu;
                       a += d;
                       b += d * d;
                     },
                     [&](int64_t r, int64_t c, A mu, A& a, A& b) {
                       const A d = load(xb[r * C + c]) - mu;
                       a += d;
                       b += d * d;
                     });
      bool recenter = false;
      for (int64_t c = 0; c < w; ++c) recenter |= far_from_pilot(dsum_d[c], m2_out[c], inv_n);
      if (pass > 0 || !recenter) break;
      for (int64_t c = 0; c < w; ++c) {
        mean[c] = A(double(mean[c]) + dsum_d[c] * inv_n);
        dsum_d[c] = m2_out[c] = 0.0;
      }
    }
    for (int64_t c = 0; c < w; ++c) {
      m2_out[c] = block_m2(m2_out[c], dsum_d[c], inv_n);
      mean_out[c] = double(mean[c]) + dsum_d[c] * inv_n;
    }
  } else {
    const T* __restrict xr = x + (u.o * s.channels + u.c0) * s.inner;
    const A shift = load(xr[u.begin]);
    const double inv_n = 1.0 / double(u.end - u.begin);
    const int64_t pilot_end = std::min(u.end, u.begin + kPilot);
    A sum = 0;
    for (int64_t i = u.begin; i < pilot_end; ++i) sum += load(xr[i]) - shift;
    A mean = shift + sum / A(pilot_end - u.begin);
    double m2_d = 0.0, dsum_d = 0.0;
    for (int pass = 0;; ++pass) {
      for (int64_t i0 = u.begin; i0 < u.end; i0 += kSubChunk) {
        const int64_t i1 = std::min(u.end, i0 + kSubChunk);
        A sums[2] = {0, 0};  // sum(d), sum(d * d)
        row_sums<T, 2>(i0, i1, [&](int64_t i, auto& acc) {
          const auto d = vload(xr + i) - mean;
          acc[0] += d;
          acc[1] += d * d;
        }, [&](int64_t i, A* acc) {
          const A d = load(xr[i]) - mean;
          acc[0] += d;
          acc[1] += d * d;
        }, sums);
        dsum_d += double(sums[0]);
        m2_d += double(sums[1]);
      }
      if (pass > 0 || !far_from_pilot(dsum_d, m2_d, inv_n)) break;
      mean = A(double(mean) + dsum_d * inv_n);
      dsum_d = m2_d = 0.0;
    }
    pmean[u.block * s.channels + u.c0] = double(mean) + dsum_d * inv_n;
    pm2[u.block * s.channels + u.c0] = block_m2(m2_d, dsum_d, inv_n);
  }
}

// Chan's merge of per-block (mean, M2) in block order; writes biased mean
// and variance of type U.
template <typename U>
void merge_moments(const Shape& s, const Blocks& g, const double* pmean,
                   const double* pm2, U* mean, U* var, const ParallelFor& pf) {
  const int64_t C = s.channels;
  const int64_t tiles = (C + kMergeTile - 1) / kMergeTile;
  const ParallelFor& run = g.row_blocks * C < kSerialMerge ? Serial() : pf;
  run(tiles, g.row_blocks * kMergeTile * 16, [&](int64_t t0, int64_t t1) {
    math::Moments<double> acc[kMergeTile];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t c0 = t * kMergeTile, w = std::min(kMergeTile, C - c0);
      for (int64_t c = 0; c < w; ++c) acc[c] = {0.0, 0.0, 0.0};
      for (int64_t b = 0; b < g.row_blocks; ++b) {
        const double nb = double(g.count(s, b));
        const double* __restrict bm = pmean + b * C + c0;
        const double* __restrict bq = pm2 + b * C + c0;
        for (int64_t c = 0; c < w; ++c) {
          acc[c] = math::chan_merge(acc[c], {nb, bm[c], bq[c]});
        }
      }
      for (int64_t c = 0; c < w; ++c) {
        mean[c0 + c] = U(acc[c].mean);
        var[c0 + c] = U(acc[c].m2 / acc[c].n);
      }
    }
  });
}

template <typename T, typename U>
void moments_impl(const Shape& s, const T* x, U* mean, U* var,
                  const ParallelFor& pf) {
  const Blocks g(s);
  std::vector<double> pmean(g.row_blocks * s.channels), pm2(pmean.size());
  const int64_t units = g.units(s);
  const int64_t per_unit = s.size() / std::max<int64_t>(units, 1);
  pf(units, per_unit * sizeof(T), [&](int64_t u0, int64_t u1) {
    for_units(s, g, u0, u1, [&](const Unit& u) {
      block_moments(s, u, x, pmean.data(), pm2.data());
    });
  });
  merge_moments(s, g, pmean.data(), pm2.data(), mean, var, pf);
}

// The normalize pass's epilogue on a vector or a value v of the
// accumulation type: relu(v) = 0 for v < 0, else v (NaN stays NaN).
template <bool kRelu, typename V>
inline V activate(V v) {
  if constexpr (kRelu) {
    return v < 0 ? V{} : v;
  } else {
    return v;
  }
}

// y = activation((x - mean) * a + offset + side), per channel, rounded once;
// kSide: side (x's layout) is added.
template <bool kSide, bool kRelu, typename T, typename U>
void apply_impl(const Shape& s, const T* x, const T* side, T* y, const U* mean,
                const U* a, const U* offset, const ParallelFor& pf) {
  using A = typename AccOf<T>::type;
  using V = VecOf<T>;
  const int64_t C = s.channels;
  if (s.inner == 1) {
    std::vector<A> m(C), k(C), b(C);
    for (int64_t c = 0; c < C; ++c) {
      m[c] = A(mean[c]);
      k[c] = A(a[c]);
      b[c] = offset ? A(offset[c]) : A(0);
    }
    const A* mm = m.data();
    const A* kk = k.data();
    const A* bb = b.data();
    elementwise_pass(s, y, x, side, pf, [&](int64_t r) {
      const T* xr = x + r * C;
      const T* sr = kSide ? side + r * C : nullptr;
      return row_writer(
          [=](int64_t c) {
            V v = (vload(xr + c) - vload_acc<V>(mm + c)) * vload_acc<V>(kk + c) +
                  vload_acc<V>(bb + c);
            if constexpr (kSide) v += vload(sr + c);
            return activate<kRelu>(v);
          },
          [=](int64_t c) {
            A v = (load(xr[c]) - mm[c]) * kk[c] + bb[c];
            if constexpr (kSide) v += load(sr[c]);
            return activate<kRelu>(v);
          });
    });
  } else {
    const int64_t S = s.inner;
    elementwise_pass(s, y, x, side, pf, [&](int64_t r) {
      const int64_t c = r % C;
      const A mm = A(mean[c]), kk = A(a[c]);
      const A bb = offset ? A(offset[c]) : A(0);
      const T* xr = x + r * S;
      const T* sr = kSide ? side + r * S : nullptr;
      return row_writer(
          [=](int64_t i) {
            V v = (vload(xr + i) - mm) * kk + bb;
            if constexpr (kSide) v += vload(sr + i);
            return activate<kRelu>(v);
          },
          [=](int64_t i) {
            A v = (load(xr[i]) - mm) * kk + bb;
            if constexpr (kSide) v += load(sr[i]);
            return activate<kRelu>(v);
          });
    });
  }
}

// apply_impl for a run-time epilogue (side == nullptr: none).
template <typename T, typename U>
void apply(const Shape& s, const T* x, const T* side, bool relu, T* y,
           const U* mean, const U* a, const U* offset, const ParallelFor& pf) {
  if (side) {
    if (relu) {
      apply_impl<true, true>(s, x, side, y, mean, a, offset, pf);
    } else {
      apply_impl<true, false>(s, x, side, y, mean, a, offset, pf);
    }
  } else if (relu) {
    apply_impl<false, true>(s, x, side, y, mean, a, offset, pf);
  } else {
    apply_impl<false, false>(s, x, side, y, mean, a, offset, pf);
  }
}

template <typename U>
void scale_factor(int64_t C, const U* var, const U* scale, double epsilon,
                  U* inv_std, U* a) {
  for (int64_t c = 0; c < C; ++c) {
    const double r = math::inv_std(double(var[c]), epsilon);
    if (inv_std) inv_std[c] = U(r);
    a[c] = U(scale ? double(scale[c]) * r : r);
  }
}

// With no channels nothing changes, the counter included (bn.h).
template <typename U>
void update_impl(const UpdateParams& p) {
  if (p.channels == 0) return;
  const double m = math::ema_momentum(p.momentum, p.num_updates != nullptr,
                                      p.num_updates ? *p.num_updates : 0);
  if (p.num_updates) *p.num_updates += 1;
  const double bessel = math::bessel_factor(p.unbiased_variance, p.count);
  const U* mean = static_cast<const U*>(p.mean);
  const U* var = static_cast<const U*>(p.var);
  U* mm = static_cast<U*>(p.moving_mean);
  U* mv = static_cast<U*>(p.moving_var);
  for (int64_t c = 0; c < p.channels; ++c) {
    mm[c] = U(math::ema(double(mm[c]), double(mean[c]), m));
    mv[c] = U(math::ema(double(mv[c]),
                        math::batch_variance(double(var[c]), bessel), m));
  }
}

template <typename T, typename U>
Status forward_impl(const ForwardParams& p, const ParallelFor& pf) {
  const Shape& s = p.shape;
  const int64_t C = s.channels;
  const T* x = static_cast<const T*>(p.x);
  U* mean = static_cast<U*>(p.saved_mean);
  U* inv_std = static_cast<U*>(p.saved_inv_std);
  std::vector<U> var(C), a(C);
  if (p.training) {
    moments_impl(s, x, mean, var.data(), pf);
    if (p.moving_mean) {
      UpdateParams up;
      up.dtype = p.dtype;
      up.channels = C;
      up.mean = mean;
      up.var = var.data();
      up.count = s.count();
      up.moving_mean = p.moving_mean;
      up.moving_var = p.moving_var;
      up.num_updates = p.num_updates;
      up.momentum = p.momentum;
      up.unbiased_variance = p.unbiased_variance;
      update_impl<U>(up);
    }
  } else {
    if (!p.moving_mean || !p.moving_var) {
      return Status::Error("inference needs moving_mean and moving_variance");
    }
    std::memcpy(mean, p.moving_mean, C * sizeof(U));
    std::memcpy(var.data(), p.moving_var, C * sizeof(U));
  }
  scale_factor(C, var.data(), static_cast<const U*>(p.scale), p.epsilon,
               inv_std, a.data());
  apply(s, x, static_cast<const T*>(p.side_input), p.relu,
        static_cast<T*>(p.y), mean, a.data(), static_cast<const U*>(p.offset),
        pf);
  return Status::Ok();
}

// The gradient that reaches the batch norm through the epilogue: dy where
// the forward's y > 0, else 0 (kMask), or dy itself. d is exact in T.
template <bool kMask, typename V>
inline V masked(V d, V y) {
  if constexpr (kMask) {
    return y > V{} ? d : V{};
  } else {
    return d;
  }
}

// Stores kLanesOf<T> values rounded to T (a plain store, any alignment).
template <typename T>
inline void vstore(T* p, VecOf<T> v) {
  const auto bits = pack<T>(v);
  std::memcpy(p, &bits, sizeof(bits));
}

// Per-block sums of g and g * (x - mean), in double, with g = dy masked by
// y > 0 (kMask) or dy; kWrite: g is also written to gout, with
// non-temporal stores when `stream` (see streamable(); gout is then not
// dy's buffer, else the pass reads dy[i] before it writes gout[i]). Each
// sub-block of kSubRows rows (channels-last) or kSubChunk values
// (channels-first) is summed in the accumulation type, then added in
// double, so the error does not grow with the block length.
template <bool kMask, bool kWrite, typename T, typename U>
void block_grad_sums(const Shape& s, const Unit& u, const T* dy,
                     const T* __restrict x, const T* __restrict y, T* gout,
                     bool stream, const U* mean, double* __restrict pdy,
                     double* __restrict pdyx) {
  using A = typename AccOf<T>::type;
  using V = VecOf<T>;
  const auto put = [stream](T* p, V v) {
    if (stream) {
      vstream(p, v);
    } else {
      vstore(p, v);
    }
  };
  if (s.inner == 1) {
    const int64_t C = s.channels, w = u.c1 - u.c0;
    double* __restrict sd_out = pdy + u.block * C + u.c0;
    double* __restrict sx_out = pdyx + u.block * C + u.c0;
    A m[kTileChannels];
    for (int64_t c = 0; c < w; ++c) {
      sd_out[c] = sx_out[c] = 0.0;
      m[c] = A(mean[u.c0 + c]);
    }
    const T* __restrict xb = x + u.c0;
    const T* db = dy + u.c0;
    const T* __restrict yb = kMask ? y + u.c0 : nullptr;
    T* gb = kWrite ? gout + u.c0 : nullptr;
    column_sums<T>(u.begin, u.end, w, m, sd_out, sx_out,
                   [&](int64_t r, int64_t c, V mu, V& a, V& b) {
                     const int64_t i = r * C + c;
                     V d = vload(db + i);
                     if constexpr (kMask) d = masked<kMask>(d, vload(yb + i));
                     if constexpr (kWrite) put(gb + i, d);
                     a += d;
                     b += d * (vload(xb + i) - mu);
                   },
                   [&](int64_t r, int64_t c, A mu, A& a, A& b) {
                     const int64_t i = r * C + c;
                     A d = load(db[i]);
                     if constexpr (kMask) d = masked<kMask>(d, load(yb[i]));
                     if constexpr (kWrite) gb[i] = store<T>(d);
                     a += d;
                     b += d * (load(xb[i]) - mu);
                   });
  } else {
    const int64_t off = (u.o * s.channels + u.c0) * s.inner;
    const T* __restrict xr = x + off;
    const T* dr = dy + off;
    const T* __restrict yr = kMask ? y + off : nullptr;
    T* gr = kWrite ? gout + off : nullptr;
    const A m = A(mean[u.c0]);
    double sd_acc = 0.0, sx_acc = 0.0;
    for (int64_t i0 = u.begin; i0 < u.end; i0 += kSubChunk) {
      const int64_t i1 = std::min(u.end, i0 + kSubChunk);
      A sums[2] = {0, 0};  // sum(g), sum(g * (x - mean))
      row_sums<T, 2>(i0, i1, [&](int64_t i, auto& acc) {
        V d = vload(dr + i);
        if constexpr (kMask) d = masked<kMask>(d, vload(yr + i));
        if constexpr (kWrite) put(gr + i, d);
        acc[0] += d;
        acc[1] += d * (vload(xr + i) - m);
      }, [&](int64_t i, A* acc) {
        A d = load(dr[i]);
        if constexpr (kMask) d = masked<kMask>(d, load(yr[i]));
        if constexpr (kWrite) gr[i] = store<T>(d);
        acc[0] += d;
        acc[1] += d * (load(xr[i]) - m);
      }, sums);
      sd_acc += double(sums[0]);
      sx_acc += double(sums[1]);
    }
    pdy[u.block * s.channels + u.c0] = sd_acc;
    pdyx[u.block * s.channels + u.c0] = sx_acc;
  }
}

// The reduction pass of the backward: per-block partial sums (block_grad_sums
// for a run-time epilogue: y masks, gout receives g).
template <typename T, typename U>
void grad_sums_pass(const Shape& s, const Blocks& g, const T* dy, const T* x,
                    const T* y, T* gout, const U* mean, double* pdy,
                    double* pdyx, const ParallelFor& pf) {
  const int64_t n = s.inner == 1 ? s.channels : s.inner;
  const bool stream = gout && streamable(gout, n, s.size(), dy, x);
  const int64_t units = g.units(s);
  const int64_t per_unit = s.size() / std::max<int64_t>(units, 1);
  const auto run = [&](auto mask, auto write) {
    pf(units, per_unit * sizeof(T), [&](int64_t u0, int64_t u1) {
      for_units(s, g, u0, u1, [&](const Unit& u) {
        block_grad_sums<decltype(mask)::value, decltype(write)::value>(
            s, u, dy, x, y, gout, stream, mean, pdy, pdyx);
      });
      if (stream) _mm_sfence();
    });
  };
  using Yes = std::true_type;
  using No = std::false_type;
  if (y) {
    if (gout) {
      run(Yes(), Yes());
    } else {
      run(Yes(), No());
    }
  } else if (gout) {
    run(No(), Yes());
  } else {
    run(No(), No());
  }
}

// dx = k_dy * dy + k_x * (x - mean) + k_0 per channel.
template <typename T, typename A>
void dx_pass(const Shape& s, const T* dy, const T* x, T* dx, const A* k_dy,
             const A* k_x, const A* k_0, const A* m, const ParallelFor& pf) {
  using V = VecOf<T>;
  const int64_t C = s.channels;
  if (s.inner == 1) {
    elementwise_pass(s, dx, x, dy, pf, [&](int64_t r) {
      const T* xr = x + r * C;
      const T* dr = dy + r * C;
      return row_writer(
          [=](int64_t c) {
            return vload_acc<V>(k_dy + c) * vload(dr + c) +
                   vload_acc<V>(k_x + c) * (vload(xr + c) - vload_acc<V>(m + c)) +
                   vload_acc<V>(k_0 + c);
          },
          [=](int64_t c) {
            return k_dy[c] * load(dr[c]) + k_x[c] * (load(xr[c]) - m[c]) + k_0[c];
          });
    });
  } else {
    const int64_t S = s.inner;
    elementwise_pass(s, dx, x, dy, pf, [&](int64_t r) {
      const int64_t c = r % C;
      const A kd = k_dy[c], kx = k_x[c], k0 = k_0[c], mm = m[c];
      const T* xr = x + r * S;
      const T* dr = dy + r * S;
      return row_writer(
          [=](int64_t i) { return kd * vload(dr + i) + kx * (vload(xr + i) - mm) + k0; },
          [=](int64_t i) { return kd * load(dr[i]) + kx * (load(xr[i]) - mm) + k0; });
    });
  }
}

// The epilogue (relu: y given): the reduction pass writes g (dy masked by
// y > 0) to dside, or to dx's buffer when dside is not wanted, and the dx
// pass reads g for dy (see BackwardParams for why).
template <typename T, typename U>
Status backward_impl(const BackwardParams& p, const ParallelFor& pf) {
  using A = typename AccOf<T>::type;
  const Shape& s = p.shape;
  const int64_t C = s.channels;
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.dy);
  const T* y = p.relu ? static_cast<const T*>(p.y) : nullptr;
  T* gout = static_cast<T*>(p.dside);
  if (!gout && y) gout = static_cast<T*>(p.dx);
  const U* mean = static_cast<const U*>(p.saved_mean);
  const U* inv_std = static_cast<const U*>(p.saved_inv_std);
  const U* scale = static_cast<const U*>(p.scale);
  const U* given_dy = static_cast<const U*>(p.sum_dy);
  const U* given_dyxh = static_cast<const U*>(p.sum_dy_xhat);
  std::vector<double> sum_dy(C, 0.0), sum_dyx(C, 0.0);
  if (!given_dy) {
    const Blocks g(s);
    std::vector<double> pdy(g.row_blocks * C), pdyx(pdy.size());
    grad_sums_pass(s, g, dy, x, y, gout, mean, pdy.data(), pdyx.data(), pf);
    // Sum the block partials in block order, in double.
    const ParallelFor& run = g.row_blocks * C < kSerialMerge ? Serial() : pf;
    run((C + kMergeTile - 1) / kMergeTile, g.row_blocks * kMergeTile * 16,
       [&](int64_t t0, int64_t t1) {
         for (int64_t t = t0; t < t1; ++t) {
           const int64_t c0 = t * kMergeTile, c1 = std::min(C, c0 + kMergeTile);
           for (int64_t b = 0; b < g.row_blocks; ++b) {
             for (int64_t c = c0; c < c1; ++c) {
               sum_dy[c] += pdy[b * C + c];
               sum_dyx[c] += pdyx[b * C + c];
             }
           }
         }
       });
  }
  U* dscale = given_dy ? nullptr : static_cast<U*>(p.dscale);
  U* doffset = given_dy ? nullptr : static_cast<U*>(p.doffset);
  // dx = k_dy * g + k_x * (x - mean) + k_0 per channel.
  std::vector<A> k_dy(C), k_x(C), k_0(C), m(C);
  const double n = double(given_dy ? p.count : s.count());
  for (int64_t c = 0; c < C; ++c) {
    const double r = double(inv_std[c]);
    if (given_dy) sum_dy[c] = double(given_dy[c]);
    const double ds = given_dy ? double(given_dyxh[c])
                               : math::sum_dy_xhat(sum_dyx[c], r);
    if (dscale) dscale[c] = U(ds);
    if (doffset) doffset[c] = U(sum_dy[c]);
    const math::GradCoefs k = math::grad_coefs(
        scale ? double(scale[c]) : 1.0, r, sum_dy[c], ds, n, p.training);
    k_dy[c] = A(k.k_dy);
    k_x[c] = A(k.k_x);
    k_0[c] = A(k.k_0);
    m[c] = A(mean[c]);
  }
  if (!p.dx) return Status::Ok();
  T* dx = static_cast<T*>(p.dx);
  dx_pass(s, gout ? gout : dy, x, dx, k_dy.data(), k_x.data(), k_0.data(),
          m.data(), pf);
  return Status::Ok();
}

// The one runtime-dtype -> template dispatch.
template <typename F>
Status dispatch(DType t, F&& f) {
  switch (t) {
    case DType::kFloat16:
      return f(half(), float());
    case DType::kBFloat16:
      return f(bf16(), float());
    case DType::kFloat32:
      return f(float(), float());
    case DType::kFloat64:
      return f(double(), double());
  }
  return Status::Error("unsupported dtype");
}

}  // namespace

Status moments(const MomentsParams& p, const ParallelFor& pf) {
  if (p.shape.channels == 0) return Status::Ok();  // nothing to do
  return dispatch(p.dtype, [&](auto t, auto u) {
    using T = decltype(t);
    using U = decltype(u);
    moments_impl(p.shape, static_cast<const T*>(p.x), static_cast<U*>(p.mean),
                 static_cast<U*>(p.var), pf);
    return Status::Ok();
  });
}

Status normalize(const NormalizeParams& p, const ParallelFor& pf) {
  if (p.shape.channels == 0) return Status::Ok();  // nothing to do
  return dispatch(p.dtype, [&](auto t, auto u) {
    using T = decltype(t);
    using U = decltype(u);
    const int64_t C = p.shape.channels;
    std::vector<U> a(C);
    scale_factor(C, static_cast<const U*>(p.var),
                 static_cast<const U*>(p.scale), p.epsilon,
                 static_cast<U*>(nullptr), a.data());
    apply(p.shape, static_cast<const T*>(p.x),
          static_cast<const T*>(p.side_input), p.relu, static_cast<T*>(p.y),
          static_cast<const U*>(p.mean), a.data(),
          static_cast<const U*>(p.offset), pf);
    return Status::Ok();
  });
}

Status update_moving_stats(const UpdateParams& p) {
  if (p.dtype == DType::kFloat64) {
    update_impl<double>(p);
  } else {
    update_impl<float>(p);
  }
  return Status::Ok();
}

Status forward(const ForwardParams& p, const ParallelFor& pf) {
  if (p.shape.channels == 0) return Status::Ok();  // nothing to do
  return dispatch(p.dtype, [&](auto t, auto u) {
    return forward_impl<decltype(t), decltype(u)>(p, pf);
  });
}

Status backward(const BackwardParams& p, const ParallelFor& pf) {
  if (p.shape.channels == 0) return Status::Ok();  // nothing to do
  if (p.relu && !p.y && p.shape.size() > 0) {
    return Status::Error("backward: relu needs y");
  }
  Status st = check_given_sums(p);
  if (!st.ok()) return st;
  return dispatch(p.dtype, [&](auto t, auto u) {
    return backward_impl<decltype(t), decltype(u)>(p, pf);
  });
}

}  // namespace FUSED_BN_CPU_ISA
}  // namespace cpu
}  // namespace fused_bn
