"""The one place that loads the op library and checks what it was built for."""
import os
import re

import tensorflow as tf

_DIR = os.path.dirname(os.path.abspath(__file__))


def _minor(version):
    m = re.match(r"(\d+)\.(\d+)", version)
    return m.groups() if m else (version,)


def _load():
    try:
        from . import _build_info
    except ImportError:
        raise ImportError(
            "fused_bn's op library is not built: install the package with "
            "`pip install --no-build-isolation .` (or -e . for development)"
        ) from None
    if _minor(_build_info.TF_VERSION) != _minor(tf.__version__):
        raise ImportError(
            f"fused_bn was built for TensorFlow {_build_info.TF_VERSION} but "
            f"TensorFlow {tf.__version__} is installed; custom-op ABI is per "
            "TensorFlow minor version: reinstall fused_bn against this "
            "TensorFlow, or install TensorFlow "
            f"{'.'.join(_minor(_build_info.TF_VERSION))}.x"
        )
    path = os.path.join(_DIR, "_fused_bn_ops.so")
    if not os.path.exists(path):
        raise ImportError(f"fused_bn's op library is missing: {path}")
    return tf.load_op_library(path), _build_info


ops, build = _load()


def build_info():
    """What this build of fused_bn was compiled for and with."""
    # CMake's "90-real" is SASS for sm_90, "90-virtual" PTX for compute_90.
    archs = [("compute_" if a.endswith("-virtual") else "sm_") + a.split("-")[0]
             for a in build.CUDA_ARCHS.split(",") if a]
    return {
        "tensorflow": build.TF_VERSION,
        "cuda": build.CUDA_VERSION or None,
        "cuda_archs": archs,
    }
