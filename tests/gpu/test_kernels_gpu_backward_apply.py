"""The CUDA backward from given sums (sync BN's dx pass) through
fused_bn._kernels on torch CUDA buffers, against float64 NumPy and against
the reducing backward with the same sums."""
import pytest

import _kernels_util as ku

pytestmark = pytest.mark.gpu

# Single block-row and multi-block reductions, both layouts, awkward C.
SHAPES = [(2, 3, 1), (37, 63, 1), (20011, 72, 1), (2, 3, 5), (5, 24, 196),
          (67, 33, 531)]
IDS = [f"{o}x{c}x{i}" for o, c, i in SHAPES]


@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_backward_apply_from_given_sums(k, buf, dtype, shape, offset):
    ku.check_backward_apply(k, buf, dtype, shape, offset)
