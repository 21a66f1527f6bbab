"""The built package: op registrations, build info, the TF-version guard."""
import os
import subprocess
import sys
import textwrap

import pytest
import tensorflow as tf
from tensorflow.python.framework import kernels

import fused_bn
from fused_bn import _kernels

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
    other = "2.20.1" if tf.__version__.startswith("2.19.") else "2.19.1"
    code = textwrap.dedent(f"""
        import importlib.util, os, sys, types
        import tensorflow as tf
        spec = importlib.util.find_spec("fused_bn")
        pkg_dir = os.path.dirname(spec.origin)
        info = types.ModuleType("fused_bn._build_info")
        info.TF_VERSION, info.CUDA_VERSION, info.CUDA_ARCHS = "{other}", "", ""
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
    assert other in msg and tf.__version__ in msg, msg
    here = "".join(tf.__version__.split(".")[:2])
    assert f"+tf{here}" in msg and f"tensorflow-cpu=={other[:4]}.*" in msg, msg


def test_import_without_tensorflow_names_the_version_to_install():
    # The wheels require no TensorFlow distribution; the loader says which.
    code = "import sys; sys.modules['tensorflow'] = None\n" \
           "try:\n    import fused_bn\nexcept ImportError as e:\n    print('ImportError:', e)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(fused_bn.__file__)))
    msg = r.stdout
    minor = ".".join(tf.__version__.split(".")[:2])
    assert "ImportError: fused_bn needs TensorFlow " + minor in msg, msg + r.stderr[-2000:]
    assert f"tensorflow-cpu=={minor}.*" in msg and f"tensorflow[and-cuda]=={minor}.*" in msg, msg


# NVIDIA's minimum drivers: CUDA 13.x runs on R580+ (13.0 = 580.65.06), 12.x
# on R525+; cudaDriverGetVersion() reports the CUDA version a driver supports.
@pytest.mark.parametrize("driver", [0, 11080, 12000, 12040, 12090])
def test_cuda13_kernels_on_an_older_driver_raise_a_clear_error(driver):
    msg = _kernels.cuda_driver_check(driver, 13000)
    assert msg.startswith("fused_bn's CUDA kernels were built with CUDA 13.0 "), msg
    assert "CUDA 13.0 or newer" in msg and "R580" in msg and "580.65.06" in msg, msg
    have = "no NVIDIA driver was found" if driver == 0 else \
        f"driver supports CUDA {driver // 1000}.{driver % 1000 // 10} at most"
    assert have in msg and "Update the NVIDIA driver" in msg and "/CPU:0" in msg, msg


@pytest.mark.parametrize("driver, runtime", [(13000, 13000), (13000, 13020), (13080, 13000),
                                             (14000, 13000), (12020, 12080), (13000, 12040)])
def test_cuda_driver_of_the_runtime_major_or_newer_passes(driver, runtime):
    # Minor-version compatibility: any 13.x toolkit's runtime on a 13.0 driver.
    assert _kernels.cuda_driver_check(driver, runtime) == ""


def test_cuda12_build_on_a_cuda11_driver_names_r525():
    msg = _kernels.cuda_driver_check(11080, 12040)
    assert "built with CUDA 12.4" in msg and "CUDA 12.0 or newer" in msg and "R525" in msg, msg


def test_driver_message_of_this_build():
    cuda = fused_bn.build_info()["cuda"]
    if not cuda:
        pytest.skip("CPU-only build")
    major, minor = (int(v) for v in cuda.split(".")[:2])
    msg = _kernels.cuda_driver_check((major - 1) * 1000 + 80, major * 1000 + minor * 10)
    assert f"built with CUDA {major}.{minor} " in msg, msg
