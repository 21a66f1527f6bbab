#!/usr/bin/env bash
# Installs a built wheel into a fresh venv and runs the test suite against it
# from a folder outside the source tree. Also checks the wheel's TensorFlow
# pin and, for a CUDA wheel, that SASS for sm_90 is inside.
# Usage: scripts/test_wheel.sh WHEEL [pytest args...]
set -euo pipefail
whl=$(realpath "$1"); shift
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
python -m venv "$work/venv"
py="$work/venv/bin/python"
"$py" -m pip install -q --disable-pip-version-check tensorflow-cpu==2.21.0 \
  pytest hypothesis scikit-learn matplotlib nvidia-cuda-cuobjdump
# --no-deps: a CUDA wheel pins `tensorflow`, a CPU wheel `tensorflow-cpu`;
# both provide the same module, tensorflow-cpu is what this machine has.
"$py" -m pip install -q --no-deps "$whl"
cp -r "$repo/tests" "$work/tests"
cp "$repo/pyproject.toml" "$work/"
cd "$work"
"$py" - "$whl" <<'PY'
import importlib.metadata as md, os, re, subprocess, sys, sysconfig
import tensorflow as tf
import fused_bn
site = sysconfig.get_paths()["purelib"]
assert fused_bn.__file__.startswith(site), f"fused_bn imported from {fused_bn.__file__}"
from packaging.requirements import Requirement
major, minor = (int(v) for v in tf.__version__.split(".")[:2])
pins = [Requirement(r) for r in md.requires("fused_bn") if r.startswith("tensorflow")]
assert len(pins) == 1, pins
spec = {(s.operator, s.version) for s in pins[0].specifier}
assert spec == {(">=", f"{major}.{minor}"), ("<", f"{major}.{minor + 1}")}, pins[0]
info = fused_bn.build_info()
print("wheel:", os.path.basename(sys.argv[1]), "pin:", pins[0], "build_info:", info)
if info["cuda"]:
    cuobjdump = os.path.join(site, "nvidia", "cu13", "bin", "cuobjdump")
    lib = os.path.join(os.path.dirname(fused_bn.__file__), "_fused_bn_ops.so")
    elfs = subprocess.run([cuobjdump, "--list-elf", lib], capture_output=True, text=True, check=True).stdout
    ptx = subprocess.run([cuobjdump, "--list-ptx", lib], capture_output=True, text=True, check=True).stdout
    assert "sm_90" in elfs and "sm_80" in elfs, elfs
    print("cubins:", sorted(set(re.findall(r"sm_\d+", elfs))), "ptx:", sorted(set(re.findall(r"sm_\d+", ptx))))
PY
"$py" -m pytest -q -rs -p no:cacheprovider tests "$@"
