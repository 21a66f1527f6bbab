"""The built package: op registrations, build info, the TF-version guard."""
import os
import subprocess
import sys
import textwrap

import tensorflow as tf
from tensorflow.python.framework import kernels

import fused_bn

OPS = ["FusedBn>Forward", "FusedBn>ForwardGrad", "FusedBn>Moments",
       "FusedBn>Normalize", "FusedBn>UpdateMovingStats"]


def test_build_info_names_this_tensorflow():
    info = fused_bn.build_info()
    assert info["tensorflow"] == tf.__version__
    if info["cuda"]:
        assert "sm_90" in info["cuda_archs"], info
    else:
        assert info["cuda_archs"] == []


def test_every_op_has_kernels_for_each_built_device():
    want = {"CPU", "GPU"} if fused_bn.build_info()["cuda"] else {"CPU"}
    for op in OPS:
        devices = {k.device_type for k in kernels.get_registered_kernels_for_op(op).kernel}
        assert devices == want, (op, devices)


def test_import_under_other_tensorflow_minor_fails_naming_both_versions():
    # fused_bn/__init__ imports the loader; importing the submodule first runs
    # __init__, so load the build-info module standalone instead.
    code = textwrap.dedent("""
        import importlib.util, os, sys, types
        import tensorflow as tf
        spec = importlib.util.find_spec("fused_bn")
        pkg_dir = os.path.dirname(spec.origin)
        info = types.ModuleType("fused_bn._build_info")
        info.TF_VERSION, info.CUDA_VERSION, info.CUDA_ARCHS = "2.19.1", "", ""
        sys.modules["fused_bn._build_info"] = info
        try:
            import fused_bn
        except ImportError as e:
            print("ImportError:", e)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(fused_bn.__file__)))
    assert "ImportError:" in r.stdout, r.stdout + r.stderr[-2000:]
    msg = r.stdout
    assert "2.19.1" in msg and tf.__version__ in msg, msg
