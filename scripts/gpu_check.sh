#!/usr/bin/env bash
# One command for a lent GPU machine (no TensorFlow needed): builds
# fused_bn._kernels with CUDA, runs the kernel tests (CPU + GPU), runs the GPU
# benchmark, and writes logs and JSON to an output folder.
#
#   bash scripts/gpu_check.sh [OUT_DIR]      # default: $OUT, else ./out
#
# Environment (all optional):
#   FUSED_BN_CUDA=auto|0|1        build the CUDA kernels (default auto: if nvcc)
#   FUSED_BN_CUDA_ARCHS=90-real   CUDA architectures for this build
#   FUSED_BN_KERNELS_OUT=DIR      where _kernels*.so goes (default: inside the
#                                 build dir, so fused_bn/ in the source tree
#                                 is never overwritten)
#   PYTHON=python3  QUICK=1 (benchmark --quick)  BENCH_ARGS="..."
#   SKIP_BUILD=1 SKIP_TESTS=1 SKIP_BENCH=1  TEST_TIMEOUT=420 BENCH_TIMEOUT=480
# Without torch + a CUDA device the GPU tests skip and the benchmark runs in
# --dry-run mode on the CPU kernels (it still writes the JSON).
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${1:-${OUT:-$REPO/out}}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
PY="${PYTHON:-python3}"
BUILD="${FUSED_BN_BUILD_DIR:-$REPO/build/gpu-check}"
KDIR="${FUSED_BN_KERNELS_OUT:-$BUILD/fused_bn}"
SUMMARY="$OUT_DIR/summary.txt"
status=0

log() { echo "[gpu_check] $*" | tee -a "$SUMMARY"; }
: > "$SUMMARY"
log "repo $REPO, out $OUT_DIR, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
(cd "$REPO" && git rev-parse HEAD 2>/dev/null | sed 's/^/commit /') | tee -a "$SUMMARY"
{ nvidia-smi 2>&1 || echo "no nvidia-smi"; nvcc --version 2>&1 || echo "no nvcc"
  "$PY" -c "import sys, numpy; print(sys.version); print('numpy', numpy.__version__)"
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
 'cudnn', torch.backends.cudnn.version(), 'device', torch.cuda.is_available()
 and torch.cuda.get_device_name(0))" 2>&1; } > "$OUT_DIR/environment.txt"

# 1. Build _kernels without TensorFlow.
if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
  gen=()
  command -v ninja > /dev/null && gen=(-G Ninja)
  pybind_dir="$("$PY" -m pybind11 --cmakedir 2>/dev/null)"
  if cmake -S "$REPO" -B "$BUILD" "${gen[@]}" \
      -DFUSED_BN_TF=OFF -DFUSED_BN_PYBIND=ON \
      -DFUSED_BN_CUDA="${FUSED_BN_CUDA:-auto}" \
      -DFUSED_BN_CUDA_ARCHS="${FUSED_BN_CUDA_ARCHS:-90-real}" \
      -DFUSED_BN_OUTPUT_DIR="$KDIR" -Dpybind11_DIR="$pybind_dir" \
      -DPython_EXECUTABLE="$(command -v "$PY")" > "$OUT_DIR/build.log" 2>&1 &&
    cmake --build "$BUILD" -j "$(nproc)" >> "$OUT_DIR/build.log" 2>&1; then
    log "build: ok ($(ls "$KDIR"/_kernels*.so 2>/dev/null | xargs -n1 basename))"
  else
    log "build: FAILED (see build.log)"
    tail -30 "$OUT_DIR/build.log"
    exit 1
  fi
fi
export FUSED_BN_KERNELS_DIR="$KDIR"
has_cuda="$("$PY" -c "
import sys; sys.path.insert(0, '$REPO/tests/gpu'); import _kernels_util as ku
k = ku.load_kernels(); print(int(bool(k and k.has_cuda())))")"
gpu="$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)"
log "kernels built with CUDA: $has_cuda; torch sees a CUDA device: $gpu"

# 2. Tests: CPU kernels always, CUDA kernels when a device is there.
if [[ "${SKIP_TESTS:-0}" != 1 ]]; then
  (cd "$REPO" && timeout "${TEST_TIMEOUT:-420}" "$PY" -m pytest -q -rfs \
      -p no:cacheprovider --confcutdir="$REPO/tests/gpu" \
      --junitxml="$OUT_DIR/pytest.xml" \
      tests/test_kernels_cpu.py tests/gpu) > "$OUT_DIR/pytest.log" 2>&1
  rc=$?
  log "tests: $( [[ $rc == 0 ]] && echo ok || echo "FAILED (rc $rc)") - $(tail -1 "$OUT_DIR/pytest.log")"
  [[ $rc == 0 ]] || status=1
fi

# 3. Benchmark.
if [[ "${SKIP_BENCH:-0}" != 1 ]]; then
  args=(${BENCH_ARGS:-})
  [[ "${QUICK:-0}" == 1 ]] && args+=(--quick)
  if [[ "$has_cuda" == 1 && "$gpu" == 1 ]]; then
    json="$OUT_DIR/gpu_bench.json"
  else
    json="$OUT_DIR/gpu_bench_dry_run.json"
    args+=(--dry-run)
  fi
  (cd "$REPO" && timeout "${BENCH_TIMEOUT:-480}" "$PY" benchmarks/gpu_bench.py \
      "${args[@]}" --out "$json") 2>&1 | tee "$OUT_DIR/bench.log"
  rc=${PIPESTATUS[0]}
  if [[ $rc == 0 ]]; then
    name="$("$PY" -c "
import json, re; d = json.load(open('$json'))
print(re.sub(r'[^A-Za-z0-9]+', '-', d['device']).strip('-').lower() + '-' + d['date'])")"
    cp "$json" "$OUT_DIR/$name.json"
    log "benchmark: ok -> $(basename "$json"), $name.json"
  else
    log "benchmark: FAILED (rc $rc, see bench.log)"
    status=1
  fi
fi
log "done, status $status"
exit $status
