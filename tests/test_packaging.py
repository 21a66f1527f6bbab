"""Packaging: no TensorFlow distribution in the wheels' requirements, the
extras and the build requirement pinned to one TensorFlow minor version, and
the version tag saying what a build is for."""
import importlib.metadata as md
import json
import os
import subprocess
import sys

import pytest
import tensorflow as tf

import fused_bn
from packaging_checks import check_metadata, tensorflow_requirements

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TF_MINOR = ".".join(tf.__version__.split(".")[:2])
source_tree = pytest.mark.skipif(
    not os.path.exists(os.path.join(ROOT, "build_backend", "fused_bn_backend.py")),
    reason="needs the source tree (tests run from an installed wheel)")


def backend(code, **env):
    """Runs `code` with the build backend imported as `b`, from the source
    tree, under os.environ updated by env (None unsets); returns its JSON."""
    environ = {k: v for k, v in os.environ.items() if k not in env}
    environ.update({k: v for k, v in env.items() if v is not None})
    prog = ("import json, sys; sys.path.insert(0, 'build_backend'); "
            "import fused_bn_backend as b; " + code)
    r = subprocess.run([sys.executable, "-c", prog], cwd=ROOT, env=environ,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def installed():
    """fused_bn's installed distribution: its metadata on sys.path outside
    the source tree. A build in the tree (the backend tests below, `pip
    wheel .`) leaves a fused_bn.egg-info there, which importlib.metadata
    would find first when the tree is the working directory."""
    path = [p for p in sys.path if os.path.abspath(p or os.curdir) != ROOT]
    dists = list(md.distributions(name="fused_bn", path=path))
    assert dists, "fused_bn is not installed"
    return dists[0]


def test_installed_metadata_pulls_no_second_tensorflow():
    meta = installed().read_text("METADATA")
    assert tensorflow_requirements(meta) == []
    check_metadata(meta, TF_MINOR)


def test_version_tag_names_tensorflow_minor_and_cuda():
    version = installed().version
    info = fused_bn.build_info()
    variant = "cu" + "".join(info["cuda"].split(".")[:2]) if info["cuda"] else "cpu"
    assert version == f"0.1.0+tf{TF_MINOR.replace('.', '')}.{variant}", (version, info)


@source_tree
@pytest.mark.parametrize("value, want", [(None, "2.21"), ("2.16", "2.16"),
                                         (" 2.19 ", "2.19"), ("2.22", "2.22")])
def test_isolated_build_requires_tensorflow_cpu_of_fused_bn_tf(value, want):
    got = backend("print(json.dumps(b.tf_build_requirement()))", FUSED_BN_TF=value)
    assert got == f"tensorflow-cpu=={want}.*"


@source_tree
@pytest.mark.parametrize("value", ["2.15", "2", "2.19.1", "tf2.19", "3"])
def test_bad_fused_bn_tf_is_a_clear_error(value):
    r = subprocess.run(
        [sys.executable, "-c",
         "import sys; sys.path.insert(0, 'build_backend'); import fused_bn_backend as b; "
         "b.tf_build_requirement()"],
        cwd=ROOT, env={**os.environ, "FUSED_BN_TF": value}, capture_output=True, text=True)
    assert r.returncode != 0
    assert "ValueError: FUSED_BN_TF must be" in r.stderr and repr(value) in r.stderr, r.stderr


@source_tree
def test_wheel_build_hook_adds_tensorflow_to_setuptools_requirements():
    reqs = backend("print(json.dumps(b.get_requires_for_build_wheel()))",
                   FUSED_BN_TF=TF_MINOR, FUSED_BN_CUDA="0")
    assert f"tensorflow-cpu=={TF_MINOR}.*" in reqs, reqs
    assert backend("print(json.dumps(b.get_requires_for_build_sdist()))", FUSED_BN_CUDA="0") \
        == [], "an sdist needs no TensorFlow"


@source_tree
def test_fused_bn_tf_other_than_the_installed_tensorflow_is_an_error():
    other = "2.16" if TF_MINOR != "2.16" else "2.17"
    r = subprocess.run(
        [sys.executable, "-c",
         "import sys; sys.path.insert(0, 'build_backend'); import fused_bn_backend as b; "
         "b.get_requires_for_build_wheel()"],
        cwd=ROOT, env={**os.environ, "FUSED_BN_TF": other, "FUSED_BN_CUDA": "0"},
        capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert f"FUSED_BN_TF={other}" in r.stderr and tf.__version__ in r.stderr, r.stderr[-2000:]


@source_tree
def test_built_metadata_pins_only_the_extras(tmp_path):
    name = backend(f"print(json.dumps(b.prepare_metadata_for_build_wheel({str(tmp_path)!r})))",
                   FUSED_BN_CUDA="0")
    meta = (tmp_path / name / "METADATA").read_text()
    check_metadata(meta, TF_MINOR)
    assert f"Version: 0.1.0+tf{TF_MINOR.replace('.', '')}.cpu\n" in meta
