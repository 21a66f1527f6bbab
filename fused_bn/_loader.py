"""The one place that loads the op library and checks what it was built for.

The wheels require no TensorFlow distribution (pip would install a second
one beside the one a machine has), so this check is the guard: TensorFlow
must be installed, and of the minor version the op library was compiled
against (custom-op ABI is per TensorFlow minor version).
"""
import os
import re

try:
    import tensorflow as tf
except ModuleNotFoundError as e:
    if e.name != "tensorflow":
        raise
    tf = None

_DIR = os.path.dirname(os.path.abspath(__file__))


def _minor(version):
    m = re.match(r"(\d+)\.(\d+)", version)
    return ".".join(m.groups()) if m else version


def _load():
    try:
        from . import _build_info
    except ImportError:
        raise ImportError(
            "fused_bn's op library is not built: install the package with "
            "`pip install .`, or `pip install --no-build-isolation -e .` "
            "for development"
        ) from None
    built = _minor(_build_info.TF_VERSION)
    install = (f"pip install 'tensorflow-cpu=={built}.*' (CPU only) or "
               f"'tensorflow[and-cuda]=={built}.*' (NVIDIA GPUs), or install "
               "fused_bn with the extra [cpu] or [and-cuda]")
    if tf is None:
        raise ImportError(
            f"fused_bn needs TensorFlow {built} (it was built for "
            f"{_build_info.TF_VERSION}) and none is installed: {install}")
    if built != _minor(tf.__version__):
        raise ImportError(
            f"fused_bn was built for TensorFlow {_build_info.TF_VERSION} but "
            f"TensorFlow {tf.__version__} is installed; custom-op ABI is per "
            f"TensorFlow minor version: install the fused_bn wheel built for "
            f"TensorFlow {_minor(tf.__version__)} (version tag "
            f"+tf{_minor(tf.__version__).replace('.', '')}), build fused_bn "
            f"from source against this TensorFlow, or install TensorFlow "
            f"{built} of the distribution you have (tensorflow-cpu=={built}.* "
            f"or tensorflow[and-cuda]=={built}.*)"
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
