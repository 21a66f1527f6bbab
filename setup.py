"""Builds fused_bn with CMake + Ninja.

Two routes, both compiling against a TensorFlow of one minor version (its
custom-op ABI):
- `pip wheel .` / `python -m build`: isolated; build_backend/ installs
  tensorflow-cpu==$FUSED_BN_TF.* (default 2.21) into the build environment.
- `pip install --no-build-isolation .`: the installed TensorFlow.
The metadata requires no TensorFlow distribution (a second one would
overwrite the first): the extras `cpu` and `and-cuda` name tensorflow-cpu or
tensorflow[and-cuda] of the built minor version, and the import checks it.
The version says what a wheel is for: 0.1.0+tf219.cpu, 0.1.0+tf221.cu130.
Environment: FUSED_BN_TF=2.X, FUSED_BN_CUDA=auto|0|1 (auto: CUDA when nvcc is
on PATH or in CUDACXX), FUSED_BN_CUDA_ARCHS (CMake syntax),
FUSED_BN_BUILD_DIR (default build/cmake).
"""
import os
import re
import shutil
import subprocess
import sys
from importlib import metadata

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.abspath(os.path.dirname(__file__))
sys.path.insert(0, os.path.join(HERE, "build_backend"))
from fused_bn_backend import tf_minor  # noqa: E402

TF_DISTS = ("tensorflow", "tensorflow-cpu", "tf-nightly", "tf-nightly-cpu")


def build_tf_minor():
    """The TensorFlow minor version ("2.X") this build compiles against.

    The installed TensorFlow's when there is one (it is what CMake compiles
    against); else FUSED_BN_TF's (an sdist, or metadata before the build
    requirements are installed).
    """
    installed = {}
    for dist in TF_DISTS:
        try:
            installed[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    if len(installed) > 1:
        raise RuntimeError(
            f"more than one TensorFlow distribution is installed ({installed}); "
            "they overwrite each other's files: uninstall all but one")
    if not installed:
        return tf_minor()
    (dist, version), = installed.items()
    minor = ".".join(version.split(".")[:2])
    if os.environ.get("FUSED_BN_TF") and tf_minor() != minor:
        raise RuntimeError(
            f"FUSED_BN_TF={os.environ['FUSED_BN_TF']} but the build environment "
            f"has {dist} {version}: unset FUSED_BN_TF or install TensorFlow "
            f"{tf_minor()}")
    return minor


def cuda_compiler():
    """The nvcc to build the CUDA kernels with, or None (FUSED_BN_CUDA)."""
    mode = os.environ.get("FUSED_BN_CUDA", "auto")
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"FUSED_BN_CUDA must be auto, 0 or 1; got {mode!r}")
    if mode == "0":
        return None
    nvcc = os.environ.get("CUDACXX") or shutil.which("nvcc")
    if nvcc is None and mode == "1":
        raise RuntimeError("FUSED_BN_CUDA=1 but no nvcc: put it on PATH or set CUDACXX")
    return nvcc


def local_version(tf, nvcc):
    """`tf219.cpu` or `tf221.cu130`: the TensorFlow minor and CUDA version."""
    variant = "cpu"
    if nvcc:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True,
                             check=True).stdout
        variant = "cu" + "".join(re.search(r"release (\d+)\.(\d+)", out).groups())
    return f"tf{tf.replace('.', '')}.{variant}"


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        target = os.path.abspath(self.get_ext_fullpath(ext.name))
        out_dir = os.path.dirname(target)
        editable = getattr(self, "editable_mode", False)
        if editable:  # all libraries next to the sources they are imported with
            out_dir = os.path.join(HERE, "fused_bn")
        build_dir = os.environ.get("FUSED_BN_BUILD_DIR", os.path.join("build", "cmake"))
        os.makedirs(build_dir, exist_ok=True)
        nvcc = cuda_compiler()
        args = [
            "-G", "Ninja",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DFUSED_BN_OUTPUT_DIR={out_dir}",
            f"-DFUSED_BN_CUDA={1 if nvcc else 0}",
        ]
        if nvcc:
            args.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
        if "FUSED_BN_CUDA_ARCHS" in os.environ:
            args.append(f"-DFUSED_BN_CUDA_ARCHS={os.environ['FUSED_BN_CUDA_ARCHS']}")
        subprocess.check_call(["cmake", HERE, *args], cwd=build_dir)
        subprocess.check_call(["cmake", "--build", ".", "-j", str(os.cpu_count() or 2)],
                              cwd=build_dir)
        if editable:  # setuptools expects the extension where it asked for it
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copy2(os.path.join(out_dir, os.path.basename(target)), target)


TF = build_tf_minor()

setup(
    name="fused_bn",
    version="0.1.0+" + local_version(TF, cuda_compiler()),
    description="Fast, misuse-proof batch normalization ops for TensorFlow",
    packages=["fused_bn", "fused_bn.compat"],
    python_requires=">=3.9",
    install_requires=["numpy"],
    extras_require={
        "cpu": [f"tensorflow-cpu=={TF}.*"],
        "and-cuda": [f"tensorflow[and-cuda]=={TF}.*"],
        "test": ["pytest", "hypothesis", "scikit-learn", "matplotlib"],
        "demo": ["scikit-learn", "matplotlib"],
    },
    ext_modules=[CMakeExtension("fused_bn._kernels")],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
