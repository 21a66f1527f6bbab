#!/usr/bin/env bash
# Builds the framework-free CPU kernels (both instruction-set builds, as the
# package has them) with the C++ test driver tests/cpp/kernels_test.cc under
# AddressSanitizer and UBSan, through CMake's FUSED_BN_SANITIZE option, and
# runs the driver on each. Exits non-zero on a build error, a sanitizer report
# or a wrong result. No TensorFlow needed.
#   CXX=clang++ scripts/sanitize.sh       # another compiler
#   FUSED_BN_CPU_ARCH=x86-64 scripts/sanitize.sh
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${FUSED_BN_SANITIZE_DIR:-$root/build/sanitize}"
gen=()
command -v ninja > /dev/null && gen=(-G Ninja)
cmake -S "$root" -B "$out" "${gen[@]}" -DCMAKE_BUILD_TYPE=Debug \
  -DFUSED_BN_SANITIZE=ON -DFUSED_BN_CPP_TESTS=ON -DFUSED_BN_TF=OFF \
  -DFUSED_BN_PYBIND=OFF -DFUSED_BN_CUDA=0 -DFUSED_BN_OUTPUT_DIR="$out/fused_bn" \
  -DFUSED_BN_CPU_ARCH="${FUSED_BN_CPU_ARCH:-x86-64-v3}" \
  -DPython_EXECUTABLE="$(command -v python3)" > "$out.cmake.log" 2>&1 ||
  { cat "$out.cmake.log"; exit 1; }
cmake --build "$out" --target kernels_test
# Run both: the AVX-512 kernels only where the processor has them.
for isa in avx512 avx2; do
  if [[ $isa == avx512 ]] && ! grep -q avx512f /proc/cpuinfo; then continue; fi
  echo "sanitize: $isa kernels"
  FUSED_BN_CPU_ISA=$isa \
  ASAN_OPTIONS="detect_leaks=1:abort_on_error=1:${ASAN_OPTIONS:-}" \
  UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:${UBSAN_OPTIONS:-}" \
    "$out/kernels_test"
done
