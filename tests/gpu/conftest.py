"""Fixtures for the CUDA kernel tests. They run on a CUDA device (torch
buffers) with a CUDA build of fused_bn._kernels, or on the CPU emulator of the
CUDA kernels (csrc/emu; host buffers) with an emulator build, as
scripts/gpu_emu_check.sh makes; otherwise they skip."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _kernels_util as ku  # noqa: E402


@pytest.fixture(scope="session")
def k():
    mod = ku.kernels_or_skip()
    if not mod.has_cuda():
        pytest.skip("fused_bn._kernels was built without CUDA")
    if ku.emulated(mod):
        return mod
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device (scripts/gpu_emu_check.sh runs these tests "
                    "on the CPU emulator of the CUDA kernels)")
    return mod


@pytest.fixture
def buf(k):
    return ku.EmuBuffers(k) if ku.emulated(k) else ku.TorchBuffers()
