"""Fixtures for the CUDA kernel tests: skip cleanly without torch, a CUDA
device, or a CUDA build of fused_bn._kernels."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _kernels_util as ku  # noqa: E402


@pytest.fixture(scope="session")
def k():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    mod = ku.kernels_or_skip()
    if not mod.has_cuda():
        pytest.skip("fused_bn._kernels was built without CUDA")
    return mod


@pytest.fixture
def buf(k):
    return ku.TorchBuffers()
