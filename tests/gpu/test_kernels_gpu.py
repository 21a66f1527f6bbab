"""CUDA kernels through fused_bn._kernels on torch CUDA buffers, against
float64 NumPy references: every op, dtype and layout, awkward and unaligned
shapes, multi-block merges, determinism, moving statistics and the counter."""
import json

import numpy as np
import pytest

import _kernels_util as ku

pytestmark = pytest.mark.gpu

DTYPES = ["float16", "bfloat16", "float32"]
# [outer, C, inner]: inner == 1 is channels-last, inner > 1 channels-first.
# Small shapes take the single-launch reduction; the last of each layout has
# more than 2^20 elements and takes the partials + finalize path.
SHAPES = [
    (2, 1, 1), (2, 3, 1), (37, 63, 1), (100, 64, 1), (1568, 512, 1), (33, 1100, 1),
    (20011, 72, 1),
    (1, 1, 2), (2, 3, 5), (3, 63, 7), (4, 64, 49), (5, 24, 196), (2, 8, 20000),
    (67, 33, 531),
]
IDS = [f"{o}x{c}x{i}" for o, c, i in SHAPES]
OFFSETS = [0, 1, 3]  # elements: 16-byte aligned and not


@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_moments(k, buf, dtype, shape, offset):
    ku.check_moments(k, buf, dtype, shape, offset)


@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", [True, False])
def test_normalize(k, buf, dtype, shape, offset, affine):
    ku.check_normalize(k, buf, dtype, shape, offset, affine)


@pytest.mark.parametrize("warmup_t", [None, 0, 1, 5, 1000])
@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("channels", [1, 5, 300, 2049])
def test_update(k, buf, warmup_t, unbiased, channels):
    ku.check_update(k, buf, "float32", channels, 7, warmup_t, unbiased)


@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
def test_forward(k, buf, dtype, shape, training, offset):
    ku.check_forward(k, buf, dtype, shape, training, offset)


@pytest.mark.parametrize("shape", [(6, 5, 3), (40000, 40, 1)], ids=["small", "multiblock"])
@pytest.mark.parametrize("warmup_t", [None, 0, 2])
@pytest.mark.parametrize("unbiased", [True, False])
def test_forward_update_semantics(k, buf, shape, warmup_t, unbiased):
    ku.check_forward(k, buf, "float32", shape, True, warmup_t=warmup_t,
                     unbiased=unbiased)


@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "frozen"])
def test_backward(k, buf, dtype, shape, training, offset):
    ku.check_backward(k, buf, dtype, shape, training, offset)


def test_backward_without_dx(k, buf):
    ku.check_backward(k, buf, "float32", (5000, 300, 1), True, with_dx=False)


def test_float64_is_an_error(k, buf):
    x = buf.put(np.zeros((4, 3, 1)))
    m = buf.put(np.zeros(3))
    with pytest.raises(RuntimeError, match="float64 is not supported on GPU"):
        k.moments("float64", 4, 3, 1, buf.ptr(x), buf.ptr(m), buf.ptr(m),
                  device="cuda", stream=buf.stream)


@pytest.mark.parametrize("shape", [(1568, 512, 1), (300000, 64, 1), (32, 512, 49),
                                   (64, 64, 3136)])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_bitwise_deterministic(k, buf, dtype, shape):
    x = ku.make_x(shape, dtype, seed=5)
    rng = np.random.default_rng(6)
    dy = ku.quantize(rng.standard_normal(shape), dtype)
    f = [ku.run_forward(k, buf, dtype, shape, x, True)[0] for _ in range(2)]
    for name in ("y", "saved_mean", "saved_inv_std", "moving_mean", "moving_var"):
        assert f[0][name].tobytes() == f[1][name].tobytes(), name
    g = [ku.run_backward(k, buf, dtype, shape, x, dy, True)[0] for _ in range(2)]
    for name in ("dx", "dscale", "doffset"):
        assert g[0][name].tobytes() == g[1][name].tobytes(), name


ORDER_SHAPES = [("float16", (40000, 40, 1)), ("float32", (16, 64, 3136))]


def test_bitwise_deterministic_in_any_block_order(k, buf):
    """Multi-block reductions (the last block of a column merges the
    partials) give bitwise the same outputs whichever block finishes last:
    the emulator runs blocks and threads in forward, reverse and random
    order, one process each."""
    if not buf.emulated:
        pytest.skip("the block order is the emulator's (FUSED_BN_EMU_ORDER)")
    body = f"""
        import hashlib, json
        out = {{}}
        for d, s in {ORDER_SHAPES!r}:
            x = ku.make_x(s, d, seed=5)
            dy = ku.quantize(np.random.default_rng(6).standard_normal(s), d)
            f = ku.run_forward(k, b, d, s, x, True)[0]
            g = ku.run_backward(k, b, d, s, x, dy, True)[0]
            for name, v in list(f.items()) + list(g.items()):
                if v is not None and name != "counter":
                    out[f"{{d}}{{s}}{{name}}"] = hashlib.sha256(
                        np.asarray(v).tobytes()).hexdigest()
        print(json.dumps(out))
        """
    runs = {}
    for order in ["forward", "reverse", "random:7"]:
        stdout = ku.run_emulated(body, FUSED_BN_EMU_ORDER=order)
        runs[order] = json.loads(stdout.splitlines()[-1])
    assert len(runs["forward"]) == 2 * 8  # y, 4 statistics, dx, dscale, doffset
    assert runs["forward"] == runs["reverse"] == runs["random:7"]


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(1 << 22, 4, 1), (8, 4, 1 << 20)], ids=["nhwc", "nchw"])
def test_large_count(k, buf, shape):
    ku.check_forward(k, buf, "float32", shape, True)
    ku.check_backward(k, buf, "float16", shape, True)


def test_large_mean_variance_is_accurate(k, buf):
    shape = (1 << 16, 8, 1)
    rng = np.random.default_rng(0)
    x = (1e4 + rng.standard_normal(shape)).astype(np.float32)
    mean, var = ku.run_moments(k, buf, "float32", shape, buf.put(x))
    _, rv = ku.ref_moments(x)
    np.testing.assert_allclose(var, rv, rtol=1e-3)


def test_counter_increments_once_per_training_forward(k, buf):
    shape = (40000, 40, 1)  # multi-block path: several finalising blocks
    x = ku.make_x(shape, "float32")
    out, _ = ku.run_forward(k, buf, "float32", shape, x, True, warmup_t=0)
    assert out["counter"] == 1


# The epilogue y = relu(bn(x) + side_input) and its backward (dy masked by
# the forward's y > 0, the masked dy as d(side_input)).
EPILOGUES = [(True, False), (False, True), (True, True)]
EPILOGUE_IDS = ["side", "relu", "side+relu"]


@pytest.mark.parametrize("side,relu", EPILOGUES, ids=EPILOGUE_IDS)
@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_normalize_epilogue(k, buf, dtype, shape, offset, side, relu):
    ku.check_normalize_epilogue(k, buf, dtype, shape, relu, side, offset)


@pytest.mark.parametrize("side,relu", EPILOGUES, ids=EPILOGUE_IDS)
@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
def test_forward_epilogue(k, buf, dtype, shape, training, offset, side, relu):
    ku.check_forward_epilogue(k, buf, dtype, shape, training, relu, side, offset)


@pytest.mark.parametrize("relu,with_dside", [(True, True), (True, False), (False, True)],
                         ids=["relu+dside", "relu", "dside"])
@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "frozen"])
def test_backward_epilogue(k, buf, dtype, shape, training, offset, relu, with_dside):
    ku.check_backward_epilogue(k, buf, dtype, shape, training, relu, with_dside,
                               offset=offset)


@pytest.mark.parametrize("with_dside", [True, False], ids=["dside", "no-dside"])
def test_backward_epilogue_without_dx(k, buf, with_dside):
    ku.check_backward_epilogue(k, buf, "float32", (5000, 300, 1), True, True, with_dside,
                               with_dx=False)
