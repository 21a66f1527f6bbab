// Picks the CPU kernels for this processor: bn_cpu.cc is compiled once for
// AVX2 (x86-64-v3) and once for AVX-512 (x86-64-v4, 512-bit vectors, whose
// full-line stores make the write passes cheaper). FUSED_BN_CPU_ISA=avx2 in
// the environment forces the AVX2 kernels (for tests and comparisons).
#include <cstdlib>
#include <cstring>

#include "bn.h"

namespace fused_bn {
namespace cpu {

#define FUSED_BN_DECLARE_ISA(ISA)                                      \
  namespace ISA {                                                      \
  Status moments(const MomentsParams& p, const ParallelFor& pf);       \
  Status normalize(const NormalizeParams& p, const ParallelFor& pf);   \
  Status update_moving_stats(const UpdateParams& p);                   \
  Status forward(const ForwardParams& p, const ParallelFor& pf);       \
  Status backward(const BackwardParams& p, const ParallelFor& pf);     \
  }
FUSED_BN_DECLARE_ISA(avx2)
#ifdef FUSED_BN_WITH_AVX512
FUSED_BN_DECLARE_ISA(avx512)
#endif
#undef FUSED_BN_DECLARE_ISA

namespace {

bool UseAvx512() {
#ifdef FUSED_BN_WITH_AVX512
  static const bool use = [] {
    const char* forced = std::getenv("FUSED_BN_CPU_ISA");
    if (forced && std::strcmp(forced, "avx2") == 0) return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  }();
  return use;
#else
  return false;
#endif
}

}  // namespace

const char* isa() { return UseAvx512() ? "avx512" : "avx2"; }

ParallelFor Serial() {
  return [](int64_t n, int64_t, const std::function<void(int64_t, int64_t)>& fn) {
    if (n > 0) fn(0, n);
  };
}

#ifdef FUSED_BN_WITH_AVX512
#define FUSED_BN_PICK(CALL) return UseAvx512() ? avx512::CALL : avx2::CALL
#else
#define FUSED_BN_PICK(CALL) return avx2::CALL
#endif

Status moments(const MomentsParams& p, const ParallelFor& pf) {
  FUSED_BN_PICK(moments(p, pf));
}
Status normalize(const NormalizeParams& p, const ParallelFor& pf) {
  FUSED_BN_PICK(normalize(p, pf));
}
Status update_moving_stats(const UpdateParams& p) {
  FUSED_BN_PICK(update_moving_stats(p));
}
Status forward(const ForwardParams& p, const ParallelFor& pf) {
  FUSED_BN_PICK(forward(p, pf));
}
Status backward(const BackwardParams& p, const ParallelFor& pf) {
  FUSED_BN_PICK(backward(p, pf));
}
#undef FUSED_BN_PICK

}  // namespace cpu
}  // namespace fused_bn
