// Test driver for the framework-free CPU kernels (csrc/kernels/bn_cpu.cc),
// built with AddressSanitizer and UBSan by scripts/sanitize.sh.
//
// Every launcher is checked against a double-precision reference computed
// from the same (rounded) inputs, for all dtypes, both layouts and awkward
// shapes (C = 1, 3, 63, > the channel tile; count = 2; counts that are not
// powers of two; several reduction blocks / chunks). Results with a
// multi-threaded ParallelFor must be bitwise identical to the serial ones.
// Exits non-zero on any failure.
#include <algorithm>
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "bn.h"

namespace {

using fused_bn::DType;
using fused_bn::Shape;
namespace cpu = fused_bn::cpu;

int g_failures = 0;
int g_checks = 0;

void fail(const std::string& what) {
  if (++g_failures <= 40) std::fprintf(stderr, "FAIL: %s\n", what.c_str());
}

// Element storage, independent of the kernels' own conversions.
uint16_t bf16_from_double(double d) {
  const float f = static_cast<float>(d);
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t lsb = (u >> 16) & 1u;
  return static_cast<uint16_t>((u + 0x7fffu + lsb) >> 16);  // finite inputs only
}
double bf16_to_double(uint16_t b) {
  const uint32_t u = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

const char* dtype_name(DType t) {
  switch (t) {
    case DType::kFloat16: return "f16";
    case DType::kBFloat16: return "bf16";
    case DType::kFloat32: return "f32";
    case DType::kFloat64: return "f64";
  }
  return "?";
}

// A tensor of dtype t: raw bytes plus the double value of every element.
struct Buf {
  DType t;
  std::vector<unsigned char> bytes;
  std::vector<double> ref;

  Buf(DType dt, int64_t n) : t(dt), bytes(n * fused_bn::element_bytes(dt)), ref(n) {}
  void* data() { return bytes.data(); }
  int64_t size() const { return static_cast<int64_t>(ref.size()); }
  void set(int64_t i, double v) {
    switch (t) {
      case DType::kFloat16: {
        const _Float16 h = static_cast<_Float16>(v);
        std::memcpy(&bytes[i * 2], &h, 2);
        ref[i] = static_cast<double>(h);
        break;
      }
      case DType::kBFloat16: {
        const uint16_t b = bf16_from_double(v);
        std::memcpy(&bytes[i * 2], &b, 2);
        ref[i] = bf16_to_double(b);
        break;
      }
      case DType::kFloat32: {
        const float f = static_cast<float>(v);
        std::memcpy(&bytes[i * 4], &f, 4);
        ref[i] = f;
        break;
      }
      case DType::kFloat64:
        std::memcpy(&bytes[i * 8], &v, 8);
        ref[i] = v;
        break;
    }
  }
  double get(int64_t i) const {
    switch (t) {
      case DType::kFloat16: {
        _Float16 h;
        std::memcpy(&h, &bytes[i * 2], 2);
        return static_cast<double>(h);
      }
      case DType::kBFloat16: {
        uint16_t b;
        std::memcpy(&b, &bytes[i * 2], 2);
        return bf16_to_double(b);
      }
      case DType::kFloat32: {
        float f;
        std::memcpy(&f, &bytes[i * 4], 4);
        return f;
      }
      case DType::kFloat64: {
        double d;
        std::memcpy(&d, &bytes[i * 8], 8);
        return d;
      }
    }
    return 0;
  }
};

// [C] statistics of type U (double for f64 x, float otherwise).
struct Stat {
  bool dbl;
  std::vector<float> f;
  std::vector<double> d;
  Stat(DType t, int64_t c) : dbl(t == DType::kFloat64), f(dbl ? 0 : c), d(dbl ? c : 0) {}
  void* data() { return dbl ? static_cast<void*>(d.data()) : static_cast<void*>(f.data()); }
  double get(int64_t i) const { return dbl ? d[i] : f[i]; }
  // Stores v and returns the value actually stored.
  double set(int64_t i, double v) {
    if (dbl) return d[i] = v;
    return f[i] = static_cast<float>(v);
  }
  bool operator==(const Stat& o) const {
    return dbl ? std::memcmp(d.data(), o.d.data(), d.size() * 8) == 0
               : std::memcmp(f.data(), o.f.data(), f.size() * 4) == 0;
  }
};

// Splits [0, n) into uneven pieces run on separate threads.
cpu::ParallelFor Threaded(int pieces) {
  return [pieces](int64_t n, int64_t, const std::function<void(int64_t, int64_t)>& fn) {
    if (n <= 0) return;
    std::vector<std::thread> threads;
    int64_t begin = 0;
    for (int k = 0; k < pieces && begin < n; ++k) {
      const int64_t left = n - begin;
      const int64_t len = k == pieces - 1 ? left : std::max<int64_t>(1, left / 2 + k);
      const int64_t end = std::min(n, begin + len);
      threads.emplace_back([&fn, begin, end] { fn(begin, end); });
      begin = end;
    }
    for (auto& t : threads) t.join();
  };
}

// Relative precision of storing a value in dtype t, and of accumulating.
double store_eps(DType t) {
  switch (t) {
    case DType::kFloat16: return 1.0 / 1024;
    case DType::kBFloat16: return 1.0 / 128;
    case DType::kFloat32: return 1.2e-7;
    case DType::kFloat64: return 2.3e-16;
  }
  return 0;
}
double acc_eps(DType t) { return t == DType::kFloat64 ? 2.3e-16 : 1.2e-7; }

// Error growth of a sum of n terms: blocks of up to 16384 values are summed
// in the accumulation type (random-walk growth), then merged in double.
double acc_growth(int64_t n) {
  return 16 + 4 * std::sqrt(static_cast<double>(std::min<int64_t>(n, 16384)));
}

void check_close(const std::string& what, double got, double want, double tol) {
  ++g_checks;
  if (!(std::fabs(got - want) <= tol)) {  // also catches NaN
    char buf[256];
    std::snprintf(buf, sizeof(buf), " got %.10g want %.10g (|diff| %.3g > tol %.3g)", got,
                  want, std::fabs(got - want), tol);
    fail(what + buf);
  }
}

void check(const std::string& what, bool ok) {
  ++g_checks;
  if (!ok) fail(what);
}

struct Case {
  DType t;
  Shape s;
  double mu, sigma;
  std::string name;
};

// Index of element (o, c, i) of x viewed as [outer, C, inner].
inline int64_t at(const Shape& s, int64_t o, int64_t c, int64_t i) {
  return (o * s.channels + c) * s.inner + i;
}

void run_case(const Case& k, uint64_t seed) {
  const Shape& s = k.s;
  const int64_t C = s.channels, n = s.count(), size = s.size();
  const DType t = k.t;
  const std::string tag = k.name;
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal(0.0, 1.0);

  Buf x(t, size), dy(t, size);
  std::vector<double> chan_mu(C);
  for (int64_t c = 0; c < C; ++c) chan_mu[c] = k.mu * (1.0 + 0.01 * c);
  for (int64_t o = 0; o < s.outer; ++o)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t i = 0; i < s.inner; ++i) {
        x.set(at(s, o, c, i), chan_mu[c] + k.sigma * normal(rng));
        dy.set(at(s, o, c, i), normal(rng) + 0.5);
      }
  Stat scale(t, C), offset(t, C);
  std::vector<double> scale_d(C), offset_d(C);
  for (int64_t c = 0; c < C; ++c) {
    scale_d[c] = scale.set(c, 0.5 + 0.1 * (c % 7));
    offset_d[c] = offset.set(c, -0.25 + 0.05 * (c % 5));
  }

  // Double reference moments of the stored values.
  std::vector<double> mean(C, 0.0), var(C, 0.0);
  for (int64_t c = 0; c < C; ++c) {
    double sum = 0;
    for (int64_t o = 0; o < s.outer; ++o)
      for (int64_t i = 0; i < s.inner; ++i) sum += x.ref[at(s, o, c, i)];
    mean[c] = sum / n;
    double m2 = 0;
    for (int64_t o = 0; o < s.outer; ++o)
      for (int64_t i = 0; i < s.inner; ++i) {
        const double d = x.ref[at(s, o, c, i)] - mean[c];
        m2 += d * d;
      }
    var[c] = m2 / n;
  }
  const double ea = acc_eps(t), es = store_eps(t), g = acc_growth(n);
  const double epsilon = 1e-3;

  // moments
  {
    Stat m(t, C), v(t, C), m2(t, C), v2(t, C);
    fused_bn::MomentsParams p;
    p.dtype = t;
    p.shape = s;
    p.x = x.data();
    p.mean = m.data();
    p.var = v.data();
    check(tag + " moments status", cpu::moments(p, cpu::Serial()).ok());
    p.mean = m2.data();
    p.var = v2.data();
    check(tag + " moments threaded status", cpu::moments(p, Threaded(3)).ok());
    check(tag + " moments bitwise serial == threaded", m == m2 && v == v2);
    for (int64_t c = 0; c < C; ++c) {
      const double sd = std::sqrt(var[c]);
      const double scale_m = std::fabs(mean[c]) + sd;
      check_close(tag + " moments mean c=" + std::to_string(c), m.get(c), mean[c],
                  g * ea * scale_m + 1e-30);
      check_close(tag + " moments var c=" + std::to_string(c), v.get(c), var[c],
                  g * ea * (var[c] + std::fabs(mean[c]) * sd) + 1e-30);
      check(tag + " moments var >= 0", v.get(c) >= 0);
    }
  }

  // forward, training, with moving statistics and a counter at t = 3
  const double momentum = 0.9;
  Stat saved_mean(t, C), saved_inv(t, C);
  {
    Buf y(t, size), y2(t, size);
    Stat mm(t, C), mv(t, C), sm2(t, C), si2(t, C), mm2(t, C), mv2(t, C);
    std::vector<double> mm0(C), mv0(C);
    for (int64_t c = 0; c < C; ++c) {
      mm0[c] = mm.set(c, 0.1 * c);
      mv0[c] = mv.set(c, 1.0 + 0.2 * c);
      mm2.set(c, mm0[c]);
      mv2.set(c, mv0[c]);
    }
    int64_t counter = 3, counter2 = 3;
    fused_bn::ForwardParams p;
    p.dtype = t;
    p.shape = s;
    p.x = x.data();
    p.y = y.data();
    p.scale = scale.data();
    p.offset = offset.data();
    p.epsilon = epsilon;
    p.training = true;
    p.moving_mean = mm.data();
    p.moving_var = mv.data();
    p.num_updates = &counter;
    p.momentum = momentum;
    p.unbiased_variance = true;
    p.saved_mean = saved_mean.data();
    p.saved_inv_std = saved_inv.data();
    check(tag + " forward status", cpu::forward(p, cpu::Serial()).ok());
    p.y = y2.data();
    p.moving_mean = mm2.data();
    p.moving_var = mv2.data();
    p.num_updates = &counter2;
    p.saved_mean = sm2.data();
    p.saved_inv_std = si2.data();
    check(tag + " forward threaded status", cpu::forward(p, Threaded(4)).ok());
    check(tag + " forward bitwise serial == threaded",
          y.bytes == y2.bytes && saved_mean == sm2 && saved_inv == si2 && mm == mm2 &&
              mv == mv2 && counter2 == counter);
    check(tag + " counter incremented", counter == 4);
    const double m = std::min(momentum, 3.0 / 4.0);
    for (int64_t c = 0; c < C; ++c) {
      const double sd = std::sqrt(var[c]);
      const double inv = 1.0 / std::sqrt(var[c] + epsilon);
      const std::string cs = " c=" + std::to_string(c);
      check_close(tag + " saved_mean" + cs, saved_mean.get(c), mean[c],
                  g * ea * (std::fabs(mean[c]) + sd) + 1e-30);
      check_close(tag + " saved_inv_std" + cs, saved_inv.get(c), inv,
                  g * ea * inv * (1 + std::fabs(mean[c]) / (sd + 1e-30)));
      check_close(tag + " moving_mean" + cs, mm.get(c), mm0[c] * m + mean[c] * (1 - m),
                  g * ea * (std::fabs(mean[c]) + sd + std::fabs(mm0[c])));
      const double ub = var[c] * n / (n - 1.0);
      check_close(tag + " moving_var" + cs, mv.get(c), mv0[c] * m + ub * (1 - m),
                  g * ea * (ub + mv0[c] + std::fabs(mean[c]) * sd));
      check(tag + " moving_var >= 0" + cs, mv.get(c) >= 0);
    }
    for (int64_t o = 0; o < s.outer; ++o)
      for (int64_t c = 0; c < C; ++c)
        for (int64_t i = 0; i < s.inner; ++i) {
          const int64_t j = at(s, o, c, i);
          const double inv = 1.0 / std::sqrt(var[c] + epsilon);
          const double want = (x.ref[j] - mean[c]) * inv * scale_d[c] + offset_d[c];
          // Output rounding, plus the statistics' accumulation error times
          // the size of the normalized value (large at big offsets).
          const double tol = 2 * es * (std::fabs(want) + 1e-3) +
                             g * ea * (1 + std::fabs(x.ref[j]) * inv) * scale_d[c];
          if (std::fabs(y.get(j) - want) > tol || std::isnan(y.get(j))) {
            check_close(tag + " forward y[" + std::to_string(j) + "]", y.get(j), want, tol);
            o = s.outer;  // one report per case
            c = C;
            break;
          }
          ++g_checks;
        }
  }

  // forward, training, no moving statistics (plain batch norm)
  {
    Buf y(t, size);
    Stat sm(t, C), si(t, C);
    fused_bn::ForwardParams p;
    p.dtype = t;
    p.shape = s;
    p.x = x.data();
    p.y = y.data();
    p.epsilon = epsilon;
    p.training = true;
    p.saved_mean = sm.data();
    p.saved_inv_std = si.data();
    check(tag + " forward (no stats, no scale) status", cpu::forward(p, Threaded(2)).ok());
    check(tag + " forward (no stats) saved stats match", sm == saved_mean && si == saved_inv);
  }

  // forward, inference
  {
    Buf y(t, size);
    Stat mm(t, C), mv(t, C), sm(t, C), si(t, C);
    std::vector<double> mmd(C), mvd(C);
    for (int64_t c = 0; c < C; ++c) {
      mmd[c] = mm.set(c, chan_mu[c] + 0.3);
      mvd[c] = mv.set(c, 0.5 + 0.01 * c);
    }
    Stat mm_before = mm, mv_before = mv;
    int64_t counter = 5;
    fused_bn::ForwardParams p;
    p.dtype = t;
    p.shape = s;
    p.x = x.data();
    p.y = y.data();
    p.scale = scale.data();
    p.offset = offset.data();
    p.epsilon = epsilon;
    p.training = false;
    p.moving_mean = mm.data();
    p.moving_var = mv.data();
    p.num_updates = &counter;
    p.saved_mean = sm.data();
    p.saved_inv_std = si.data();
    check(tag + " inference status", cpu::forward(p, Threaded(3)).ok());
    check(tag + " inference leaves statistics and counter",
          mm == mm_before && mv == mv_before && counter == 5);
    check(tag + " inference saved_mean == moving_mean", sm == mm);
    for (int64_t j = 0; j < size; ++j) {
      const int64_t c = (j / s.inner) % C;
      const double inv = 1.0 / std::sqrt(mvd[c] + epsilon);
      const double want = (x.ref[j] - mmd[c]) * inv * scale_d[c] + offset_d[c];
      const double tol = 2 * es * (std::fabs(want) + 1e-3) +
                         8 * ea * (1 + std::fabs(x.ref[j]) * inv) * scale_d[c];
      if (std::fabs(y.get(j) - want) > tol || std::isnan(y.get(j))) {
        check_close(tag + " inference y[" + std::to_string(j) + "]", y.get(j), want, tol);
        break;
      }
      ++g_checks;
    }
    p.moving_mean = nullptr;
    p.moving_var = nullptr;
    check(tag + " inference without statistics is an error", !cpu::forward(p, Threaded(2)).ok());
  }

  // normalize with the reference statistics
  {
    Buf y(t, size), y2(t, size);
    Stat m(t, C), v(t, C);
    std::vector<double> md(C), vd(C);
    for (int64_t c = 0; c < C; ++c) {
      md[c] = m.set(c, mean[c]);
      vd[c] = v.set(c, var[c]);
    }
    fused_bn::NormalizeParams p;
    p.dtype = t;
    p.shape = s;
    p.x = x.data();
    p.y = y.data();
    p.mean = m.data();
    p.var = v.data();
    p.scale = scale.data();
    p.offset = offset.data();
    p.epsilon = epsilon;
    check(tag + " normalize status", cpu::normalize(p, cpu::Serial()).ok());
    p.y = y2.data();
    check(tag + " normalize threaded status", cpu::normalize(p, Threaded(3)).ok());
    check(tag + " normalize bitwise serial == threaded", y.bytes == y2.bytes);
    for (int64_t j = 0; j < size; ++j) {
      const int64_t c = (j / s.inner) % C;
      const double inv = 1.0 / std::sqrt(vd[c] + epsilon);
      const double want = (x.ref[j] - md[c]) * inv * scale_d[c] + offset_d[c];
      const double tol = 2 * es * (std::fabs(want) + 1e-3) +
                         8 * ea * (1 + std::fabs(x.ref[j]) * inv) * scale_d[c];
      if (std::fabs(y.get(j) - want) > tol || std::isnan(y.get(j))) {
        check_close(tag + " normalize y[" + std::to_string(j) + "]", y.get(j), want, tol);
        break;
      }
      ++g_checks;
    }
  }

  // normalize with the epilogue: y = relu(bn(x) + side), and its backward:
  // dy masked by y > 0 (the masked dy written to dside), serial == threaded.
  {
    Buf side(t, size), y(t, size), y2(t, size);
    for (int64_t j = 0; j < size; ++j) side.set(j, 1.5 * normal(rng) - 0.3);
    Stat m(t, C), v(t, C);
    std::vector<double> md(C), vd(C), sid(C);
    for (int64_t c = 0; c < C; ++c) {
      md[c] = m.set(c, mean[c]);
      vd[c] = v.set(c, var[c]);
    }
    fused_bn::NormalizeParams p;
    p.dtype = t;
    p.shape = s;
    p.x = x.data();
    p.y = y.data();
    p.mean = m.data();
    p.var = v.data();
    p.scale = scale.data();
    p.offset = offset.data();
    p.epsilon = epsilon;
    p.side_input = side.data();
    p.relu = true;
    check(tag + " epilogue normalize status", cpu::normalize(p, cpu::Serial()).ok());
    p.y = y2.data();
    check(tag + " epilogue normalize threaded status", cpu::normalize(p, Threaded(3)).ok());
    check(tag + " epilogue normalize bitwise serial == threaded", y.bytes == y2.bytes);
    for (int64_t j = 0; j < size; ++j) {
      const int64_t c = (j / s.inner) % C;
      const double inv = 1.0 / std::sqrt(vd[c] + epsilon);
      const double v0 = (x.ref[j] - md[c]) * inv * scale_d[c] + offset_d[c] + side.ref[j];
      const double want = std::max(v0, 0.0);
      const double tol = 2 * es * (std::fabs(v0) + std::fabs(side.ref[j]) + 1e-3) +
                         8 * ea * (1 + std::fabs(x.ref[j]) * inv) * scale_d[c];
      if (std::fabs(y.get(j) - want) > tol || std::isnan(y.get(j)) || y.get(j) < 0) {
        check_close(tag + " epilogue normalize y[" + std::to_string(j) + "]", y.get(j), want,
                    tol);
        break;
      }
      ++g_checks;
    }
    Stat si(t, C), dscale(t, C), doffset(t, C), ds2(t, C), do2(t, C);
    for (int64_t c = 0; c < C; ++c) sid[c] = si.set(c, 1.0 / std::sqrt(var[c] + epsilon));
    Buf dx(t, size), dx2(t, size), dside(t, size), dside2(t, size);
    fused_bn::BackwardParams b;
    b.dtype = t;
    b.shape = s;
    b.dy = dy.data();
    b.x = x.data();
    b.scale = scale.data();
    b.saved_mean = m.data();
    b.saved_inv_std = si.data();
    b.training = true;
    b.dx = dx.data();
    b.dscale = dscale.data();
    b.doffset = doffset.data();
    b.y = y.data();
    b.relu = true;
    b.dside = dside.data();
    check(tag + " epilogue backward status", cpu::backward(b, cpu::Serial()).ok());
    b.dx = dx2.data();
    b.dscale = ds2.data();
    b.doffset = do2.data();
    b.dside = dside2.data();
    check(tag + " epilogue backward threaded status", cpu::backward(b, Threaded(4)).ok());
    check(tag + " epilogue backward bitwise serial == threaded",
          dx.bytes == dx2.bytes && dside.bytes == dside2.bytes && dscale == ds2 &&
              doffset == do2);
    std::vector<double> gm(size);
    for (int64_t j = 0; j < size; ++j) gm[j] = y.get(j) > 0 ? dy.ref[j] : 0.0;
    bool exact = true;
    for (int64_t j = 0; j < size; ++j) exact &= dside.get(j) == gm[j];
    check(tag + " epilogue dside == masked dy", exact);
    for (int64_t c = 0; c < C; ++c) {
      double sg = 0, sgx = 0, ag = 0, agx = 0;
      for (int64_t o = 0; o < s.outer; ++o)
        for (int64_t i = 0; i < s.inner; ++i) {
          const int64_t j = at(s, o, c, i);
          const double xh = (x.ref[j] - md[c]) * sid[c];
          sg += gm[j];
          sgx += gm[j] * xh;
          ag += std::fabs(gm[j]);
          agx += std::fabs(gm[j] * xh);
        }
      const std::string cs = " c=" + std::to_string(c);
      const double xscale = 1 + std::fabs(md[c]) * sid[c];
      check_close(tag + " epilogue doffset" + cs, doffset.get(c), sg, g * ea * ag + 1e-30);
      check_close(tag + " epilogue dscale" + cs, dscale.get(c), sgx,
                  g * ea * ag * xscale + 1e-30);
      const double kd = scale_d[c] * sid[c];
      for (int64_t o = 0, done = 0; o < s.outer && !done; ++o)
        for (int64_t i = 0; i < s.inner; ++i) {
          const int64_t j = at(s, o, c, i);
          const double xh = (x.ref[j] - md[c]) * sid[c];
          const double want = kd * (gm[j] - sg / n - xh * sgx / n);
          const double mag = kd * (std::fabs(gm[j]) + ag / n + std::fabs(xh) * agx / n);
          const double tol = 2 * es * (std::fabs(want) + 1e-3 * kd) + g * ea * mag * xscale;
          if (std::fabs(dx.get(j) - want) > tol || std::isnan(dx.get(j))) {
            check_close(tag + " epilogue dx[" + std::to_string(j) + "]", dx.get(j), want, tol);
            done = 1;
            break;
          }
          ++g_checks;
        }
    }
  }

  // backward, training and frozen, from the reference statistics
  for (bool training : {true, false}) {
    const std::string bt = tag + (training ? " backward(train)" : " backward(frozen)");
    Stat sm(t, C), si(t, C), dscale(t, C), doffset(t, C), ds2(t, C), do2(t, C);
    std::vector<double> smd(C), sid(C);
    for (int64_t c = 0; c < C; ++c) {
      smd[c] = sm.set(c, mean[c]);
      sid[c] = si.set(c, 1.0 / std::sqrt(var[c] + epsilon));
    }
    Buf dx(t, size), dx2(t, size);
    fused_bn::BackwardParams p;
    p.dtype = t;
    p.shape = s;
    p.dy = dy.data();
    p.x = x.data();
    p.scale = scale.data();
    p.saved_mean = sm.data();
    p.saved_inv_std = si.data();
    p.training = training;
    p.dx = dx.data();
    p.dscale = dscale.data();
    p.doffset = doffset.data();
    check(bt + " status", cpu::backward(p, cpu::Serial()).ok());
    p.dx = dx2.data();
    p.dscale = ds2.data();
    p.doffset = do2.data();
    check(bt + " threaded status", cpu::backward(p, Threaded(4)).ok());
    check(bt + " bitwise serial == threaded",
          dx.bytes == dx2.bytes && dscale == ds2 && doffset == do2);
    // Given sums (sync BN's dx pass) with the sums just reduced and count n:
    // the same dx, to the sums' rounding to U.
    Buf dx3(t, size);
    if (training) {
      fused_bn::BackwardParams q = p;
      q.dx = dx3.data();
      q.dscale = q.doffset = nullptr;
      q.sum_dy = doffset.data();
      q.sum_dy_xhat = dscale.data();
      q.count = n;
      check(bt + " given sums status", cpu::backward(q, Threaded(3)).ok());
      q.count = 0;
      check(bt + " given sums count 0 fails", !cpu::backward(q, cpu::Serial()).ok());
    }
    for (int64_t c = 0; c < C; ++c) {
      double sdy = 0, sdyx = 0, adyx = 0, ady = 0;
      for (int64_t o = 0; o < s.outer; ++o)
        for (int64_t i = 0; i < s.inner; ++i) {
          const int64_t j = at(s, o, c, i);
          const double xh = (x.ref[j] - smd[c]) * sid[c];
          sdy += dy.ref[j];
          sdyx += dy.ref[j] * xh;
          ady += std::fabs(dy.ref[j]);
          adyx += std::fabs(dy.ref[j] * xh);
        }
      const std::string cs = " c=" + std::to_string(c);
      const double xscale = 1 + std::fabs(smd[c]) * sid[c];  // size of x * inv_std
      check_close(bt + " doffset" + cs, doffset.get(c), sdy, g * ea * ady + 1e-30);
      check_close(bt + " dscale" + cs, dscale.get(c), sdyx, g * ea * ady * xscale + 1e-30);
      const double kd = scale_d[c] * sid[c];
      bool reported = false;
      for (int64_t o = 0; o < s.outer && !reported; ++o)
        for (int64_t i = 0; i < s.inner; ++i) {
          const int64_t j = at(s, o, c, i);
          const double xh = (x.ref[j] - smd[c]) * sid[c];
          const double want = training ? kd * (dy.ref[j] - sdy / n - xh * sdyx / n)
                                       : kd * dy.ref[j];
          const double mag = kd * (std::fabs(dy.ref[j]) + ady / n + std::fabs(xh) * adyx / n);
          const double tol = 2 * es * (std::fabs(want) + 1e-3 * kd) + g * ea * mag * xscale;
          if (std::fabs(dx.get(j) - want) > tol || std::isnan(dx.get(j))) {
            check_close(bt + " dx[" + std::to_string(j) + "]", dx.get(j), want, tol);
            reported = true;
            break;
          }
          if (training && (std::fabs(dx3.get(j) - want) > tol || std::isnan(dx3.get(j)))) {
            check_close(bt + " given sums dx[" + std::to_string(j) + "]", dx3.get(j), want, tol);
            reported = true;
            break;
          }
          ++g_checks;
        }
    }
    // dx == nullptr: only the parameter gradients.
    Stat ds3(t, C), do3(t, C);
    p.dx = nullptr;
    p.dscale = ds3.data();
    p.doffset = do3.data();
    check(bt + " without dx status", cpu::backward(p, Threaded(2)).ok());
    check(bt + " without dx matches", ds3 == dscale && do3 == doffset);
  }

  // update_moving_stats: plain EMA, biased and unbiased, and the warm-up.
  for (int variant = 0; variant < 3; ++variant) {
    Stat m(t, C), v(t, C), mm(t, C), mv(t, C);
    std::vector<double> md(C), vd(C), mm0(C), mv0(C);
    for (int64_t c = 0; c < C; ++c) {
      md[c] = m.set(c, mean[c]);
      vd[c] = v.set(c, var[c]);
      mm0[c] = mm.set(c, -0.5 + 0.1 * c);
      mv0[c] = mv.set(c, 2.0 + 0.1 * c);
    }
    int64_t counter = 0;
    fused_bn::UpdateParams p;
    p.dtype = t;
    p.channels = C;
    p.mean = m.data();
    p.var = v.data();
    p.count = n;
    p.moving_mean = mm.data();
    p.moving_var = mv.data();
    p.momentum = 0.8;
    p.unbiased_variance = variant != 1;
    p.num_updates = variant == 2 ? &counter : nullptr;
    check(tag + " update status", cpu::update_moving_stats(p).ok());
    const double mo = variant == 2 ? 0.0 : 0.8;  // min(0.8, 0 / 1) at t = 0
    const double bessel = p.unbiased_variance ? n / (n - 1.0) : 1.0;
    for (int64_t c = 0; c < C; ++c) {
      const std::string cs = " variant " + std::to_string(variant) + " c=" + std::to_string(c);
      check_close(tag + " update mean" + cs, mm.get(c), mm0[c] * mo + md[c] * (1 - mo),
                  4 * ea * (std::fabs(mm0[c]) + std::fabs(md[c])) + 1e-300);
      check_close(tag + " update var" + cs, mv.get(c), mv0[c] * mo + vd[c] * bessel * (1 - mo),
                  4 * ea * (mv0[c] + vd[c] * bessel) + 1e-300);
    }
    if (variant == 2) check(tag + " update counter", counter == 1);
  }
}

}  // namespace

int main() {
  const DType dtypes[] = {DType::kFloat16, DType::kBFloat16, DType::kFloat32, DType::kFloat64};
  struct Geo {
    int64_t outer, channels, inner;
  };
  // inner == 1: channels-last [outer, C]; inner > 1: channels-first [N, C, S].
  const Geo geos[] = {
      {2, 1, 1},     {2, 3, 1},     {2, 63, 1},    {3, 1, 1},    {17, 3, 1},
      {17, 63, 1},   {129, 63, 1},  {1000, 3, 1},  {37, 1025, 1}, {5000, 7, 1},
      {1, 1, 2},     {1, 3, 2},     {1, 63, 2},    {2, 3, 5},    {3, 63, 7},
      {4, 63, 49},   {1, 1, 16385}, {2, 3, 20000}, {5, 1, 33},   {2, 130, 9},
  };
  struct Dist {
    double mu, sigma;
  };
  const Dist dists[] = {{0.0, 1.0}, {3.0, 0.5}};
  uint64_t seed = 1;
  for (DType t : dtypes) {
    for (const Geo& g : geos) {
      for (const Dist& d : dists) {
        Case k;
        k.t = t;
        k.s.outer = g.outer;
        k.s.channels = g.channels;
        k.s.inner = g.inner;
        k.mu = d.mu;
        k.sigma = d.sigma;
        char name[128];
        std::snprintf(name, sizeof(name), "[%s %s outer=%" PRId64 " C=%" PRId64 " inner=%" PRId64
                      " mu=%g]", dtype_name(t), g.inner == 1 ? "NC" : "NCS", g.outer,
                      g.channels, g.inner, d.mu);
        k.name = name;
        run_case(k, seed++);
      }
    }
  }
  // Large offsets: variance must not cancel (float32 and float64 inputs).
  for (DType t : {DType::kFloat32, DType::kFloat64}) {
    for (double mu : {1e4, 1e6}) {
      for (const Geo& g : {Geo{5000, 7, 1}, Geo{3, 3, 20000}}) {
        Case k;
        k.t = t;
        k.s.outer = g.outer;
        k.s.channels = g.channels;
        k.s.inner = g.inner;
        k.mu = mu;
        k.sigma = 1.0;
        char name[128];
        std::snprintf(name, sizeof(name), "[%s big offset %g C=%" PRId64 " inner=%" PRId64 "]",
                      dtype_name(t), mu, g.channels, g.inner);
        k.name = name;
        run_case(k, seed++);
      }
    }
  }
  std::printf("%d checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
