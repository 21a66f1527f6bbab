"""Builds fused_bn with CMake + Ninja.

TensorFlow must already be installed (its flags and version are read by
CMake), so build with `pip install --no-build-isolation .`. Environment:
FUSED_BN_CUDA=auto|0|1, FUSED_BN_CUDA_ARCHS="80-real;90-real;90-virtual",
FUSED_BN_BUILD_DIR (default build/cmake), FUSED_BN_TF_DIST (the pinned
TensorFlow distribution), FUSED_BN_LOCAL_VERSION (e.g. "+cu130").
"""
import os
import re
import shutil
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def tf_requirement():
    """Pins the TensorFlow distribution and minor version this build is for.

    The distribution is the installed one (tensorflow or tensorflow-cpu)
    unless FUSED_BN_TF_DIST names another.
    """
    try:
        import tensorflow as tf
        from importlib.metadata import packages_distributions
    except ImportError:
        return "tensorflow>=2.21,<2.22"
    dists = [d for d in packages_distributions().get("tensorflow", []) if d.startswith("tensorflow")]
    dist = os.environ.get("FUSED_BN_TF_DIST") or (dists[0] if dists else "tensorflow")
    dist = dist.replace("_", "-")
    major, minor = re.match(r"(\d+)\.(\d+)", tf.__version__).groups()
    return f"{dist}>={major}.{minor},<{major}.{int(minor) + 1}"


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        target = os.path.abspath(self.get_ext_fullpath(ext.name))
        out_dir = os.path.dirname(target)
        editable = getattr(self, "editable_mode", False)
        if editable:  # all libraries next to the sources they are imported with
            out_dir = os.path.join(os.path.abspath(os.path.dirname(__file__)), "fused_bn")
        build_dir = os.environ.get("FUSED_BN_BUILD_DIR", os.path.join("build", "cmake"))
        os.makedirs(build_dir, exist_ok=True)
        args = [
            "-G", "Ninja",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DFUSED_BN_OUTPUT_DIR={out_dir}",
            f"-DFUSED_BN_CUDA={os.environ.get('FUSED_BN_CUDA', 'auto')}",
        ]
        if "FUSED_BN_CUDA_ARCHS" in os.environ:
            args.append(f"-DFUSED_BN_CUDA_ARCHS={os.environ['FUSED_BN_CUDA_ARCHS']}")
        src = os.path.abspath(os.path.dirname(__file__))
        subprocess.check_call(["cmake", src, *args], cwd=build_dir)
        subprocess.check_call(["cmake", "--build", ".", "-j", str(os.cpu_count() or 2)],
                              cwd=build_dir)
        if editable:  # setuptools expects the extension where it asked for it
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copy2(os.path.join(out_dir, os.path.basename(target)), target)


setup(
    name="fused_bn",
    version="0.1.0" + os.environ.get("FUSED_BN_LOCAL_VERSION", ""),
    description="Fast, misuse-proof batch normalization ops for TensorFlow",
    packages=["fused_bn", "fused_bn.compat"],
    python_requires=">=3.9",
    install_requires=[tf_requirement(), "numpy"],
    extras_require={
        "test": ["pytest", "hypothesis", "scikit-learn", "matplotlib"],
        "demo": ["scikit-learn", "matplotlib"],
    },
    ext_modules=[CMakeExtension("fused_bn._kernels")],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
