#!/usr/bin/env bash
# Builds the framework-free CPU kernels (csrc/kernels/bn_cpu.cc) with the C++
# test driver tests/cpp/kernels_test.cc under AddressSanitizer and UBSan, and
# runs it. Exits non-zero on a build error, a sanitizer report or a wrong
# result. No TensorFlow needed.
#   CXX=clang++ scripts/sanitize.sh       # another compiler
#   FUSED_BN_CPU_ARCH=x86-64 scripts/sanitize.sh
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${FUSED_BN_SANITIZE_DIR:-$root/build/sanitize}"
mkdir -p "$out"
flags=(-std=c++17 -O2 -g -fno-omit-frame-pointer
  -fsanitize=address,undefined -fno-sanitize-recover=all
  -fopenmp-simd -Wall -Wextra -pthread -I"$root/csrc/kernels")
cxx="${CXX:-g++}"
# The kernels once per instruction set, as CMake builds them.
"$cxx" "${flags[@]}" -march="${FUSED_BN_CPU_ARCH:-x86-64-v3}" \
  -DFUSED_BN_CPU_ISA=avx2 -c "$root/csrc/kernels/bn_cpu.cc" -o "$out/bn_cpu_avx2.o"
"$cxx" "${flags[@]}" -march=x86-64-v4 -mprefer-vector-width=512 \
  -DFUSED_BN_CPU_ISA=avx512 -c "$root/csrc/kernels/bn_cpu.cc" -o "$out/bn_cpu_avx512.o"
"$cxx" "${flags[@]}" -march="${FUSED_BN_CPU_ARCH:-x86-64-v3}" -DFUSED_BN_WITH_AVX512=1 \
  "$root/csrc/kernels/bn_cpu_dispatch.cc" "$out/bn_cpu_avx2.o" "$out/bn_cpu_avx512.o" \
  "$root/tests/cpp/kernels_test.cc" -o "$out/kernels_test"
# Run both: the AVX-512 kernels only where the processor has AVX-512.
for isa in avx512 avx2; do
  if [[ $isa == avx512 ]] && ! grep -q avx512f /proc/cpuinfo; then continue; fi
  echo "sanitize: $isa kernels"
  FUSED_BN_CPU_ISA=$isa \
  ASAN_OPTIONS="detect_leaks=1:abort_on_error=1:${ASAN_OPTIONS:-}" \
  UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:${UBSAN_OPTIONS:-}" \
    "$out/kernels_test"
done
