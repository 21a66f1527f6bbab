"""CPU kernels through the pybind11 module `fused_bn._kernels`, against float64
NumPy references. Skipped when the module is not built."""
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu"))
import _kernels_util as ku  # noqa: E402

DTYPES = ["float16", "bfloat16", "float32", "float64"]
# [outer, C, inner]: inner == 1 is channels-last, inner > 1 channels-first.
SHAPES = [
    (2, 1, 1), (2, 3, 1), (37, 63, 1), (100, 64, 1), (33, 1100, 1),
    (1, 1, 2), (2, 3, 5), (3, 63, 7), (4, 64, 49), (2, 8, 20000),
]
IDS = [f"{o}x{c}x{i}" for o, c, i in SHAPES]


@pytest.fixture(scope="module")
def k():
    return ku.kernels_or_skip()


@pytest.fixture(params=[1, 3], ids=["serial", "threads3"])
def buffers(request):
    return ku.NumpyBuffers(threads=request.param)


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_moments(k, buffers, dtype, shape):
    ku.check_moments(k, buffers, dtype, shape)


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", [True, False])
def test_normalize(k, dtype, shape, affine):
    ku.check_normalize(k, ku.NumpyBuffers(), dtype, shape, affine=affine)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("warmup_t", [None, 0, 1, 5, 1000])
@pytest.mark.parametrize("unbiased", [True, False])
def test_update(k, dtype, warmup_t, unbiased):
    ku.check_update(k, ku.NumpyBuffers(), dtype, 5, 7, warmup_t, unbiased)


def test_update_count_one_has_no_bessel(k):
    ku.check_update(k, ku.NumpyBuffers(), "float32", 3, 1, None, False)


@pytest.mark.parametrize("inner", [1, 7])
def test_zero_channels_keep_the_counter(k, inner):
    ku.check_zero_channels_keep_the_counter(k, ku.NumpyBuffers(), inner)


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
def test_forward(k, buffers, dtype, shape, training):
    ku.check_forward(k, buffers, dtype, shape, training)


@pytest.mark.parametrize("warmup_t", [None, 0, 2])
@pytest.mark.parametrize("unbiased", [True, False])
def test_forward_update_semantics(k, warmup_t, unbiased):
    ku.check_forward(k, ku.NumpyBuffers(), "float32", (6, 5, 3), True,
                     warmup_t=warmup_t, unbiased=unbiased)


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "frozen"])
def test_backward(k, buffers, dtype, shape, training):
    ku.check_backward(k, buffers, dtype, shape, training)


def test_backward_without_dx(k):
    ku.check_backward(k, ku.NumpyBuffers(), "float32", (5, 7, 3), True, with_dx=False)


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_apply_from_given_sums(k, buffers, dtype, shape):
    ku.check_backward_apply(k, buffers, dtype, shape)


def test_backward_apply_checks_its_arguments(k):
    b = ku.NumpyBuffers()
    v = b.put(np.ones(3, np.float32))
    x = b.put(np.ones((4, 3, 1), np.float32))
    with pytest.raises(ValueError, match="count must be >= 1"):
        k.backward_apply("float32", 4, 3, 1, b.ptr(x), b.ptr(x), b.ptr(v), b.ptr(v),
                         b.ptr(v), b.ptr(v), 0, b.ptr(x))
    with pytest.raises(ValueError, match="sum_dy_xhat must not be 0"):
        k.backward_apply("float32", 4, 3, 1, b.ptr(x), b.ptr(x), b.ptr(v), b.ptr(v),
                         b.ptr(v), 0, 5, b.ptr(x))


# Outputs of 4 MB and more whose rows are whole 64-byte lines are written
# with non-temporal stores (bn_cpu.cc, kStreamBytes).
STREAMED = [(2048, 1024, 1), (8, 64, 4096)]
STREAMED_IDS = ["nhwc", "nchw"]


@pytest.mark.parametrize("shape", STREAMED, ids=STREAMED_IDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
def test_streamed_outputs(k, dtype, shape, training):
    ku.check_forward(k, ku.NumpyBuffers(2), dtype, shape, training)
    ku.check_backward(k, ku.NumpyBuffers(2), dtype, shape, training)


@pytest.mark.parametrize("shape", STREAMED, ids=STREAMED_IDS)
def test_streamed_normalize(k, shape):
    ku.check_normalize(k, ku.NumpyBuffers(2), "bfloat16", shape)


@pytest.mark.parametrize("shape", STREAMED, ids=STREAMED_IDS)
def test_outputs_in_place(k, shape):
    # y over x and dx over dy (as the TF ops do for temporaries) are not
    # streamed; they equal the results into separate buffers.
    b = ku.NumpyBuffers(2)
    c = shape[1]
    rng = np.random.default_rng(7)
    x = b.put(rng.normal(2.0, 3.0, shape).astype(np.float32))
    dy = b.put(rng.normal(0.0, 1.0, shape).astype(np.float32))
    stats = [b.put(v) for v in (np.full(c, 1.5, np.float32), np.full(c, 2.0, np.float32),
                                rng.uniform(0.5, 1.5, c).astype(np.float32))]
    mean, var, scale = (b.ptr(v) for v in stats)
    y = b.put(np.zeros(shape, np.float32))
    k.normalize("float32", *shape, b.ptr(x), b.ptr(y), mean, var, scale, threads=2)
    dx = b.put(np.zeros(shape, np.float32))
    ds = [b.put(np.zeros(c, np.float32)) for _ in range(2)]
    k.backward("float32", *shape, b.ptr(dy), b.ptr(x), mean, var, scale=scale, dx=b.ptr(dx),
               dscale=b.ptr(ds[0]), doffset=b.ptr(ds[1]), threads=2)
    dx_separate = dx.copy()
    k.backward("float32", *shape, b.ptr(dy), b.ptr(x), mean, var, scale=scale, dx=b.ptr(dy),
               dscale=b.ptr(ds[0]), doffset=b.ptr(ds[1]), threads=2)
    np.testing.assert_allclose(dy, dx_separate, rtol=1e-6, atol=1e-6)
    k.normalize("float32", *shape, b.ptr(x), b.ptr(x), mean, var, scale, threads=2)
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)
    assert np.std(y) > 0.1


@pytest.mark.parametrize("shape", [(1000, 63, 1), (16, 5, 3000)], ids=["nhwc", "nchw"])
def test_thread_count_does_not_change_results(k, shape):
    x = ku.make_x(shape, "float32")
    runs = [ku.run_forward(k, ku.NumpyBuffers(t), "float32", shape, x, True)[0]
            for t in (1, 2, 5)]
    for r in runs[1:]:
        for name in ("y", "saved_mean", "saved_inv_std", "moving_mean", "moving_var"):
            assert r[name].tobytes() == runs[0][name].tobytes(), name


def test_large_mean_variance_is_accurate(k):
    # E[x^2] - E[x]^2 would lose every digit here in float32.
    shape = (4096, 4, 1)
    rng = np.random.default_rng(0)
    x = (1e4 + rng.standard_normal(shape)).astype(np.float32)
    b = ku.NumpyBuffers()
    mean, var = ku.run_moments(k, b, "float32", shape, b.put(x))
    _, rv = ku.ref_moments(x)
    np.testing.assert_allclose(var, rv, rtol=1e-3)


# The moments are one pass over x around a pilot mean (the mean of a block's
# first rows), and a second one where that pilot is far from the block mean:
# such data must keep full float32 accuracy.
def _hard_moments_cases():
    rng = np.random.default_rng(3)
    n = 65536
    outlier = np.zeros((n, 8), np.float64)
    outlier[0] = 1e6  # the first row of every block of the first channels
    outlier[1:, 4:] = rng.standard_normal((n - 1, 4))
    trend = np.sort(rng.standard_normal((n, 8)), axis=0) + np.linspace(1e4, 1e4 + 100, n)[:, None]
    steps = np.repeat(rng.standard_normal((64, 8)) * 1e3, n // 64, axis=0) + 1e4
    pilot = rng.standard_normal((n, 8))
    pilot[:32] = 1e6  # the pilot rows of the first block, and more
    return {"outlier": outlier, "trend": trend, "pilot": pilot,
            "steps": steps + rng.standard_normal((n, 8))}


@pytest.mark.parametrize("case", ["outlier", "trend", "steps", "pilot"])
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_moments_of_hard_data(k, case, layout):
    x = _hard_moments_cases()[case].astype(np.float32)
    if layout == "nchw":  # [N, C, S]: rows of 4096 values
        x = np.ascontiguousarray(x.reshape(16, 4096, 8).transpose(0, 2, 1))
    else:
        x = x[:, :, None]
    shape = x.shape
    b = ku.NumpyBuffers(2)
    mean, var = ku.run_moments(k, b, "float32", shape, b.put(x))
    rm, rv = ku.ref_moments(x)
    np.testing.assert_allclose(mean, rm, rtol=2e-6, atol=1e-6 * np.abs(x).max())
    np.testing.assert_allclose(var, rv, rtol=2e-6)


def test_errors(k):
    x = np.zeros((4, 3), np.float32)
    m = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="dtype"):
        k.moments("int8", 4, 3, 1, x.ctypes.data, m.ctypes.data, m.ctypes.data)
    with pytest.raises(ValueError, match="shape"):
        k.moments("float32", 4, 3, 0, x.ctypes.data, m.ctypes.data, m.ctypes.data)
    with pytest.raises(ValueError, match="x must not be 0"):
        k.moments("float32", 4, 3, 1, 0, m.ctypes.data, m.ctypes.data)
    with pytest.raises(ValueError, match="inference needs"):
        k.forward("float32", 4, 3, 1, x.ctypes.data, x.ctypes.data, m.ctypes.data,
                  m.ctypes.data, training=False)
    with pytest.raises(ValueError, match="device"):
        k.moments("float32", 4, 3, 1, x.ctypes.data, m.ctypes.data, m.ctypes.data,
                  device="tpu")
    if not k.has_cuda():
        with pytest.raises(ValueError, match="no CUDA"):
            k.moments("float32", 4, 3, 1, x.ctypes.data, m.ctypes.data,
                      m.ctypes.data, device="cuda")


def test_workspace_bytes(k):
    for fn in (k.moments_workspace_bytes, k.normalize_workspace_bytes,
               k.forward_workspace_bytes, k.backward_workspace_bytes):
        n = fn("float16", 256 * 56 * 56, 64, 1)
        assert n >= 0 and (n % 256 == 0)
        if not k.has_cuda():
            assert n == 0


# The epilogue y = relu(bn(x) + side_input): (side input, relu) combinations.
EPILOGUES = [(True, False), (False, True), (True, True)]
EPILOGUE_IDS = ["side", "relu", "side+relu"]


@pytest.mark.parametrize("side,relu", EPILOGUES, ids=EPILOGUE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_normalize_epilogue(k, dtype, shape, side, relu):
    ku.check_normalize_epilogue(k, ku.NumpyBuffers(), dtype, shape, relu, side)


@pytest.mark.parametrize("side,relu", EPILOGUES, ids=EPILOGUE_IDS)
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
def test_forward_epilogue(k, buffers, dtype, shape, training, side, relu):
    ku.check_forward_epilogue(k, buffers, dtype, shape, training, relu, side)


@pytest.mark.parametrize("relu,with_dside", [(True, True), (True, False), (False, True)],
                         ids=["relu+dside", "relu", "dside"])
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "frozen"])
def test_backward_epilogue(k, buffers, dtype, shape, training, relu, with_dside):
    ku.check_backward_epilogue(k, buffers, dtype, shape, training, relu, with_dside)


@pytest.mark.parametrize("with_dside", [True, False], ids=["dside", "no-dside"])
def test_backward_epilogue_without_dx(k, with_dside):
    ku.check_backward_epilogue(k, ku.NumpyBuffers(), "float32", (37, 63, 1), True, True,
                               with_dside, with_dx=False)


@pytest.mark.parametrize("shape", STREAMED, ids=STREAMED_IDS)
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_streamed_epilogue(k, dtype, shape):
    ku.check_forward_epilogue(k, ku.NumpyBuffers(2), dtype, shape, True, True)
    # The masked dy is streamed to dside, or to dx's buffer without dside.
    for with_dside in (True, False):
        ku.check_backward_epilogue(k, ku.NumpyBuffers(2), dtype, shape, True, True,
                                   with_dside)


def test_relu_without_y_is_an_error(k):
    x = np.zeros((4, 3), np.float32)
    m = np.ones(3, np.float32)
    with pytest.raises(ValueError, match="y"):
        k.backward("float32", 4, 3, 1, x.ctypes.data, x.ctypes.data, m.ctypes.data,
                   m.ctypes.data, relu=True)


@pytest.mark.parametrize("shape", STREAMED, ids=STREAMED_IDS)
def test_epilogue_outputs_in_place(k, shape):
    # As the TF ops may: y over the side input's buffer, and, with relu and no
    # dside, dx over dy's buffer (the reduction pass then writes the masked
    # dy there and the dx pass reads it back in place).
    b = ku.NumpyBuffers(2)
    c = shape[1]
    rng = np.random.default_rng(8)
    x = b.put(rng.normal(2.0, 3.0, shape).astype(np.float32))
    side = b.put(rng.normal(0.0, 1.0, shape).astype(np.float32))
    dy = b.put(rng.normal(0.0, 1.0, shape).astype(np.float32))
    stats = [b.put(v) for v in (np.full(c, 1.5, np.float32), np.full(c, 2.0, np.float32),
                                rng.uniform(0.5, 1.5, c).astype(np.float32))]
    mean, var, scale = (b.ptr(v) for v in stats)
    y = b.put(np.zeros(shape, np.float32))
    k.normalize("float32", *shape, b.ptr(x), b.ptr(y), mean, var, scale,
                side_input=b.ptr(side), relu=True, threads=2)
    assert np.mean(y == 0) > 0.2
    dx = b.put(np.zeros(shape, np.float32))
    ds = [b.put(np.zeros(c, np.float32)) for _ in range(2)]
    k.backward("float32", *shape, b.ptr(dy), b.ptr(x), mean, var, scale=scale, dx=b.ptr(dx),
               dscale=b.ptr(ds[0]), doffset=b.ptr(ds[1]), y=b.ptr(y), relu=True, threads=2)
    dx_separate = dx.copy()
    k.backward("float32", *shape, b.ptr(dy), b.ptr(x), mean, var, scale=scale, dx=b.ptr(dy),
               dscale=b.ptr(ds[0]), doffset=b.ptr(ds[1]), y=b.ptr(y), relu=True, threads=2)
    np.testing.assert_allclose(dy, dx_separate, rtol=1e-6, atol=1e-6)
    k.normalize("float32", *shape, b.ptr(x), b.ptr(side), mean, var, scale,
                side_input=b.ptr(side), relu=True, threads=2)
    np.testing.assert_allclose(side, y, rtol=1e-6, atol=1e-6)
