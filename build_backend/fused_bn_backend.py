"""PEP 517 build backend: setuptools, plus the TensorFlow to build against.

The op library is compiled against TensorFlow's headers and
libtensorflow_framework, and custom-op ABI is per TensorFlow minor version,
so an isolated build (`pip wheel .`, `python -m build`) needs TensorFlow in
its build environment, pinned to the minor version the wheel is for:
FUSED_BN_TF=2.X (default 2.21). The build installs `tensorflow-cpu` for
that: the same headers and framework library as `tensorflow`, without the
GPU kernels. The wheel's own metadata requires no TensorFlow (see setup.py).

With --no-build-isolation nothing is installed: the build uses the
TensorFlow of the running environment (and setup.py checks that it matches
FUSED_BN_TF when that is set).
"""
import os
import re

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F401,F403 (the PEP 517 hooks)

DEFAULT_TF = "2.21"
OLDEST_TF = (2, 16)


def tf_minor():
    """The TensorFlow minor version to build for, from FUSED_BN_TF ("2.X")."""
    value = os.environ.get("FUSED_BN_TF", "").strip() or DEFAULT_TF
    m = re.fullmatch(r"(\d+)\.(\d+)", value)
    if not m or (int(m[1]), int(m[2])) < OLDEST_TF:
        raise ValueError(
            f"FUSED_BN_TF must be a TensorFlow minor version MAJOR.MINOR, "
            f"2.{OLDEST_TF[1]} or newer (e.g. 2.19); got {value!r}")
    return f"{int(m[1])}.{int(m[2])}"


def tf_build_requirement():
    """The TensorFlow distribution an isolated build compiles against."""
    return f"tensorflow-cpu=={tf_minor()}.*"


def get_requires_for_build_wheel(config_settings=None):
    return [*_setuptools.get_requires_for_build_wheel(config_settings),
            tf_build_requirement()]


def get_requires_for_build_editable(config_settings=None):
    return [*_setuptools.get_requires_for_build_editable(config_settings),
            tf_build_requirement()]
