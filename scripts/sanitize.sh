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
"${CXX:-g++}" -std=c++17 -O2 -g -fno-omit-frame-pointer \
  -fsanitize=address,undefined -fno-sanitize-recover=all \
  -fopenmp-simd -march="${FUSED_BN_CPU_ARCH:-x86-64-v3}" -Wall -Wextra -pthread \
  -I"$root/csrc/kernels" \
  "$root/csrc/kernels/bn_cpu.cc" "$root/tests/cpp/kernels_test.cc" \
  -o "$out/kernels_test"
ASAN_OPTIONS="detect_leaks=1:abort_on_error=1:${ASAN_OPTIONS:-}" \
UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:${UBSAN_OPTIONS:-}" \
  "$out/kernels_test"
