#!/usr/bin/env bash
# Tests a built wheel from outside the source tree, in a fresh venv with
# tensorflow-cpu of the wheel's TensorFlow minor (its +tf2XY tag):
#  - metadata: no TensorFlow requirement outside the extras; [cpu] and
#    [and-cuda] name tensorflow-cpu / tensorflow[and-cuda] of that minor;
#  - pip's resolver (--dry-run --report) installs no second TensorFlow: for
#    the wheel and wheel[cpu] in that venv (tensorflow-cpu), and for the wheel
#    and wheel[and-cuda] in a venv whose installed `tensorflow` is a
#    metadata-only stand-in (the real one is 600 MB; pip reads only metadata);
#  - the installed package is the wheel's, built for this TensorFlow; a CUDA
#    wheel carries SASS for sm_75, sm_80, sm_90 (cuobjdump from
#    nvidia-cuda-cuobjdump);
#  - then pytest on tests/ with the given arguments.
# FUSED_BN_TEST_VENV=DIR uses (and keeps) that venv instead of a temporary one.
# Usage: scripts/test_wheel.sh WHEEL [pytest args (default: all of tests/)...]
set -euo pipefail
whl=$(realpath "$1"); shift
repo=$(cd "$(dirname "$0")/.." && pwd)
tag=$(basename "$whl" | sed -n 's/^fused_bn-[^+]*+tf\([0-9]\)\([0-9]*\)\..*/\1.\2/p')
[[ -n $tag ]] || { echo "test_wheel: no +tf2XY tag in $(basename "$whl")" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
venv=${FUSED_BN_TEST_VENV:-$work/venv}
[[ -x $venv/bin/python ]] || python -m venv "$venv"
py="$venv/bin/python"
pipq=("$py" -m pip --disable-pip-version-check -q)
"${pipq[@]}" install "tensorflow-cpu==$tag.*" pytest hypothesis scikit-learn matplotlib \
  nvidia-cuda-cuobjdump
cp -r "$repo/tests" "$work/tests"
cp "$repo/pyproject.toml" "$work/"
cd "$work"

echo "== test_wheel: metadata and pip's resolver ($(basename "$whl"), TensorFlow $tag)"
"${pipq[@]}" install --dry-run --report report-cpu.json "$whl"
"${pipq[@]}" install --dry-run --report report-cpu-extra.json "fused_bn[cpu] @ file://$whl"
python -m venv stub
site=$(stub/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
mkdir "$site/tensorflow-$tag.0.dist-info"
printf 'Metadata-Version: 2.1\nName: tensorflow\nVersion: %s.0\n' "$tag" \
  > "$site/tensorflow-$tag.0.dist-info/METADATA"
: > "$site/tensorflow-$tag.0.dist-info/RECORD"
stub/bin/python -m pip --disable-pip-version-check -q install --dry-run \
  --report report-gpu.json "$whl"
stub/bin/python -m pip --disable-pip-version-check -q install --dry-run \
  --report report-gpu-extra.json "fused_bn[and-cuda] @ file://$whl"
"$py" - "$whl" "$tag" <<'PY'
import json, sys, zipfile
sys.path.insert(0, "tests")
from packaging_checks import check_metadata, tensorflow_installs
whl, tag = sys.argv[1:]
with zipfile.ZipFile(whl) as z:
    meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
check_metadata(meta, tag)
for name, has in [("report-cpu", "tensorflow-cpu"), ("report-cpu-extra", "tensorflow-cpu"),
                  ("report-gpu", "tensorflow"), ("report-gpu-extra", "tensorflow")]:
    installs = tensorflow_installs(json.load(open(name + ".json")))
    assert set(installs) <= {has}, f"{name}: with {has} installed pip would add {installs}"
print("metadata: no TensorFlow without an extra; [cpu], [and-cuda] pin", tag,
      "| pip --dry-run: no second TensorFlow (tensorflow-cpu venv: wheel, wheel[cpu];"
      " tensorflow venv: wheel, wheel[and-cuda])")
PY

"${pipq[@]}" install --no-deps --force-reinstall "$whl"
"$py" - "$whl" <<'PY'
import os, re, subprocess, sys, sysconfig
import tensorflow as tf
import fused_bn
site = sysconfig.get_paths()["purelib"]
assert fused_bn.__file__.startswith(site), f"fused_bn imported from {fused_bn.__file__}"
info = fused_bn.build_info()
assert info["tensorflow"].split(".")[:2] == tf.__version__.split(".")[:2], (info, tf.__version__)
print("wheel:", os.path.basename(sys.argv[1]), "tensorflow:", tf.__version__, "build_info:", info)
if info["cuda"]:
    cuobjdump = os.path.join(site, "nvidia", "cu13", "bin", "cuobjdump")
    for lib in ["_fused_bn_ops.so", "_kernels" + sysconfig.get_config_var("EXT_SUFFIX")]:
        path = os.path.join(os.path.dirname(fused_bn.__file__), lib)
        run = lambda flag: subprocess.run([cuobjdump, flag, path], capture_output=True,
                                          text=True, check=True).stdout
        sass = sorted(set(re.findall(r"sm_\d+", run("--list-elf"))), key=lambda a: int(a[3:]))
        ptx = sorted(set(re.findall(r"sm_\d+", run("--list-ptx"))), key=lambda a: int(a[3:]))
        assert {"sm_75", "sm_80", "sm_90"} <= set(sass), (lib, sass)
        print(f"{lib}: SASS {sass}, PTX {ptx}")
PY
"$py" -m pytest -q -rs -p no:cacheprovider "$@"  # no path: tests/ (testpaths)
