#!/usr/bin/env bash
# The CUDA kernel tests (tests/gpu) without a GPU, on the CPU emulator of the
# CUDA kernels (csrc/emu, see its include/cuda_runtime.h):
#   1. builds fused_bn._kernels against the emulator (build/emu) and again
#      with AddressSanitizer + UBSan (build/emu-asan), in parallel;
#   2. runs the emulator's own tests (emu_test);
#   3. runs the whole GPU suite in forward and in reverse run order (two
#      processes in parallel), then once more on the sanitized build in a
#      random order (Python with libasan preloaded, leaks not checked; UBSan's
#      alignment check is what catches misaligned vector loads).
# Exits non-zero if anything fails. The last line is a pytest summary: the
# sanitized run's, or that of a run that failed.
#   bash scripts/gpu_emu_check.sh
# Environment (optional): PYTHON (python3), FUSED_BN_EMU_SEED (seed of the
# random order, default 1), SKIP_BUILD=1, PYTEST_ARGS (extra pytest arguments,
# e.g. "-k moments").
# For a real GPU, scripts/gpu_check.sh is the one command.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
SEED="${FUSED_BN_EMU_SEED:-1}"
EMU="$REPO/build/emu"
ASAN="$REPO/build/emu-asan"
status=0
failed_log=""

log() { echo "[gpu_emu_check] $*"; }
now() { date +%s; }
phase_start=$(now)
phase() {  # phase NAME: prints the time of the phase that ended
  local t
  t=$(now)
  log "$1: $((t - phase_start)) s"
  phase_start=$t
}

# 1. Builds (TensorFlow off, AVX-512 CPU kernels off: not what is tested).
configure() {  # configure DIR EXTRA_ARGS...
  local dir=$1
  shift
  local gen=()
  command -v ninja > /dev/null && gen=(-G Ninja)
  cmake -S "$REPO" -B "$dir" "${gen[@]}" -DFUSED_BN_CUDA=emu -DFUSED_BN_TF=OFF \
    -DFUSED_BN_CPU_AVX512=OFF -DFUSED_BN_OUTPUT_DIR="$dir/fused_bn" \
    -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" \
    -DPython_EXECUTABLE="$(command -v "$PY")" "$@" > "$dir.cmake.log" 2>&1 &&
    cmake --build "$dir" -j 1 >> "$dir.cmake.log" 2>&1
}
if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
  mkdir -p "$REPO/build"
  configure "$EMU" -DCMAKE_BUILD_TYPE=Release &
  pid_emu=$!
  configure "$ASAN" -DCMAKE_BUILD_TYPE=Debug -DFUSED_BN_SANITIZE=ON &
  pid_asan=$!
  for b in "emu:$pid_emu" "emu-asan:$pid_asan"; do
    if ! wait "${b#*:}"; then
      log "build ${b%%:*}: FAILED"
      tail -40 "$REPO/build/${b%%:*}.cmake.log"
      exit 1
    fi
  done
  phase "build (build/emu, build/emu-asan)"
fi

# 2. The emulator's own tests.
if ! "$EMU/emu_test" || ! ASAN_OPTIONS="detect_leaks=0:abort_on_error=1" \
    UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" "$ASAN/emu_test" > /dev/null; then
  log "emu_test: FAILED"
  status=1
fi
phase "emulator tests"

# 3. The GPU suite.
pytest_gpu() {  # pytest_gpu KERNELS_DIR ORDER LOG
  (cd "$REPO" && FUSED_BN_KERNELS_DIR="$1" FUSED_BN_EMU_ORDER="$2" \
    timeout 1800 "$PY" -m pytest -q -rfs -p no:cacheprovider \
      --confcutdir="$REPO/tests/gpu" ${PYTEST_ARGS:-} tests/gpu) > "$3" 2>&1
}
summary() { tail -1 "$1"; }
pytest_gpu "$EMU/fused_bn" forward "$EMU/pytest-forward.log" &
pid_fwd=$!
pytest_gpu "$EMU/fused_bn" reverse "$EMU/pytest-reverse.log" &
pid_rev=$!
for run in "forward:$pid_fwd" "reverse:$pid_rev"; do
  order=${run%%:*}
  if wait "${run#*:}"; then
    log "order $order: $(summary "$EMU/pytest-$order.log")"
  else
    status=1
    failed_log="$EMU/pytest-$order.log"
    log "order $order: FAILED"
    grep -E "^(FAILED|ERROR) |RuntimeError: fused_bn|runtime error:|ERROR: AddressSanitizer" \
      "$failed_log" | head -20
  fi
done
phase "GPU suite, forward and reverse order"

# Python is not a C++ program: libstdc++ is preloaded too, or ASan cannot
# intercept C++ throws. No output capture (-s): a sanitizer report ends the
# process inside a test and would be lost with the test's captured output.
preload="$(${CXX:-g++} -print-file-name=libasan.so) $(${CXX:-g++} -print-file-name=libstdc++.so)"
log "order random:$SEED, ASan + UBSan"
(cd "$REPO" && LD_PRELOAD="$preload" ASAN_OPTIONS="detect_leaks=0:abort_on_error=1" \
  UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" \
  FUSED_BN_KERNELS_DIR="$ASAN/fused_bn" FUSED_BN_EMU_ORDER="random:$SEED" \
  timeout 2400 "$PY" -m pytest -q -s -rfs -p no:cacheprovider \
    --confcutdir="$REPO/tests/gpu" ${PYTEST_ARGS:-} tests/gpu) 2>&1 |
  tee "$ASAN/pytest-asan.log" | grep -vE '^[.sxFE]+ +\[ *[0-9]+%\]$'
if [[ ${PIPESTATUS[0]} != 0 ]]; then
  status=1
  [[ -z "$failed_log" ]] && failed_log="$ASAN/pytest-asan.log"
fi
phase "GPU suite, random order, ASan + UBSan"
log "status $status; the summary of the ${failed_log:+failed }run:"
summary "${failed_log:-$ASAN/pytest-asan.log}"
exit $status
