"""Numerics: large offsets, the accuracy bar relative to the stock op, NaN/Inf
propagation, non-negative moving variance. Truth is float64 NumPy of the same
(rounded) inputs; the stock op is tf.compat.v1.nn.fused_batch_norm."""
import numpy as np
import pytest
import tensorflow as tf

import fused_bn
import reference as ref

EPS = float(np.float32(1e-3))  # the float32 epsilon attr, as both ops see it


def _x(shape, dtype, axis, mu, sigma, seed=0):
    """x ~ N(mu_c, sigma_c) per channel, rounded to dtype; and its float64 value."""
    rng = np.random.default_rng(seed)
    c = shape[axis]
    mus = ref.bcast(np.asarray(mu, np.float64) * rng.uniform(0.9, 1.1, c), np.empty(shape), axis)
    sigmas = ref.bcast(np.asarray(sigma, np.float64) * rng.uniform(0.5, 2.0, c), np.empty(shape), axis)
    x = tf.cast(mus + sigmas * rng.standard_normal(shape), dtype)
    return x, ref.to64(x)


# (shape, axis, std) for the offset tests: NHWC, NCHW with more than one
# channels-first chunk, a tall [N, C], a 5-D tensor.
OFFSET_SHAPES = [
    ((64, 16, 16, 8), -1),
    ((4, 8, 96, 96), 1),
    ((65536, 3), -1),
    ((4, 6, 8, 8, 5), -1),
]


@pytest.mark.parametrize("shape,axis", OFFSET_SHAPES, ids=str)
@pytest.mark.parametrize("mu,rtol", [(1e4, 1e-4), (1e6, 5e-3)], ids=["mean 1e4", "mean 1e6"])
def test_float32_variance_with_large_mean(shape, axis, mu, rtol):
    """std 1 around 1e4 / 1e6: E[x^2] - E[x]^2 in float32 would lose every digit."""
    x, x64 = _x(shape, tf.float32, axis, mu, 1.0)
    r = ref.reduce_axes(x64, axis)
    true_mean = x64.mean(axis=r)
    true_var = ((x64 - ref.bcast(true_mean, x64, axis)) ** 2).mean(axis=r)
    mean, var = fused_bn.moments(x, axis=axis)
    np.testing.assert_allclose(var.numpy(), true_var, rtol=rtol)
    np.testing.assert_allclose(mean.numpy(), true_mean, rtol=1e-7, atol=0)
    # The same statistics reach the moving variance and the output.
    c = shape[axis]
    mm, mv = tf.Variable(tf.zeros([c])), tf.Variable(tf.zeros([c]))
    y = fused_bn.batch_norm(x, True, moving_mean=mm, moving_variance=mv, momentum=0.0,
                            unbiased_variance=False, axis=axis, epsilon=1e-3)
    np.testing.assert_allclose(mv.numpy(), true_var, rtol=rtol)
    y64, _, _ = ref.forward(x64, axis, np.ones(c), np.zeros(c), EPS)
    # A float32 mean is off by up to half an ulp of mu: y by that / std.
    ulp = float(np.spacing(np.float32(np.abs(true_mean).max())))
    np.testing.assert_allclose(ref.to64(y), y64,
                               atol=2 * ulp / np.sqrt(true_var.min() + EPS) + 1e-5)


@pytest.mark.parametrize("shape,axis", OFFSET_SHAPES[:3], ids=str)
@pytest.mark.parametrize("mu,sigma", [(1e4, 1.0), (1e6, 1.0), (1e4, 300.0), (1e6, 3e4)],
                         ids=["1e4 std 1", "1e6 std 1", "1e4 std 300", "1e6 std 3e4"])
def test_bfloat16_variance_with_large_mean(shape, axis, mu, sigma):
    """bfloat16 has 8 significant bits: std 1 at 1e4 rounds to a few values
    (the truth is the variance of those); std mu/30 keeps a real spread."""
    x, x64 = _x(shape, tf.bfloat16, axis, mu, sigma)
    r = ref.reduce_axes(x64, axis)
    true_mean = x64.mean(axis=r)
    true_var = ((x64 - ref.bcast(true_mean, x64, axis)) ** 2).mean(axis=r)
    mean, var = fused_bn.moments(x, axis=axis)
    np.testing.assert_allclose(var.numpy(), true_var, rtol=1e-4, atol=1e-6 * sigma ** 2)
    np.testing.assert_allclose(mean.numpy(), true_mean, rtol=1e-7)
    assert np.all(var.numpy() >= 0)


def _stock(x, scale, offset, training, mean, var, axis):
    """The stock op (4-D only): [N, C] and 5-D tensors are reshaped to 4-D."""
    shape = x.shape
    if axis == -1:
        x4 = tf.reshape(x, [shape[0], -1, 1, shape[-1]])
        fmt = "NHWC"
    else:
        x4 = tf.reshape(x, [shape[0], shape[1], -1, 1])
        fmt = "NCHW"
    if training:
        y, _, _ = tf.compat.v1.nn.fused_batch_norm(x4, scale, offset, epsilon=EPS,
                                                   data_format=fmt, is_training=True)
    else:
        y, _, _ = tf.compat.v1.nn.fused_batch_norm(x4, scale, offset, mean, var, epsilon=EPS,
                                                   data_format=fmt, is_training=False)
    return tf.reshape(y, shape)


def _errors(run, x, dy, scale, offset):
    with tf.GradientTape() as tape:
        tape.watch([x, scale, offset])
        y = run(x, scale, offset)
    grads = tape.gradient(y, [x, scale, offset], output_gradients=dy)
    return [ref.to64(t) for t in [y] + grads]


ACCURACY_SHAPES = [
    ((8, 12, 12, 32), -1),
    ((8, 32, 12, 12), 1),
    ((512, 63), -1),
    ((3, 7, 5, 9, 3), -1),
    ((2, 3, 40, 50), 1),
]


@pytest.mark.parametrize("dtype", [tf.float32, tf.float16, tf.bfloat16], ids=lambda d: d.name)
@pytest.mark.parametrize("shape,axis", ACCURACY_SHAPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["training", "inference"])
@pytest.mark.parametrize("mu", [0.5, 40.0], ids=["mean 0.5", "mean 40"])
def test_accuracy_at_most_twice_stock_error(dtype, shape, axis, training, mu):
    """Flash-attention's rule: our max error vs float64 truth <= 2x the stock
    op's at the same precision, for y, dx, dscale, doffset."""
    if dtype == tf.float16 and mu > 10 and training:
        mu = 10.0  # keep x^2 sums of the stock op's float16 path meaningful
    x, x64 = _x(shape, dtype, axis, mu, 1.5)
    dy, dy64 = _x(shape, dtype, axis, 0.2, 1.0, seed=3)
    c = shape[axis]
    rng = np.random.default_rng(4)
    scale = tf.constant(rng.uniform(0.5, 2.0, c), tf.float32)
    offset = tf.constant(rng.normal(0.0, 1.0, c), tf.float32)
    s64, o64 = ref.to64(scale), ref.to64(offset)
    mean = tf.constant(x64.mean(axis=ref.reduce_axes(x64, axis)) + 0.1, tf.float32)
    var = tf.constant(x64.var(axis=ref.reduce_axes(x64, axis)) * 1.2, tf.float32)
    m64, v64 = ref.to64(mean), ref.to64(var)
    if training:
        y64, _, _ = ref.forward(x64, axis, s64, o64, EPS)
        truth = [y64, *ref.backward(x64, dy64, axis, s64, EPS, True)]
    else:
        y64, _, _ = ref.forward(x64, axis, s64, o64, EPS, m64, v64)
        truth = [y64, *ref.backward(x64, dy64, axis, s64, EPS, False, m64, v64)]
    mm, mv = tf.Variable(mean), tf.Variable(var)
    ours = _errors(lambda a, s, o: fused_bn.batch_norm(a, training, s, o, mm, mv, axis=axis,
                                                       epsilon=1e-3), x, dy, scale, offset)
    stock = _errors(lambda a, s, o: _stock(a, s, o, training, mean, var, axis),
                    x, dy, scale, offset)
    # dscale = sum(dy * x_hat) moves by sum|dy| * |mean| * inv_std times the
    # float32 rounding of the saved statistics, which both ops keep in float32.
    r = ref.reduce_axes(x64, axis)
    mu = np.abs(x64.mean(axis=r)) if training else np.abs(m64)
    inv = 1.0 / np.sqrt((x64.var(axis=r) if training else v64) + EPS)
    stat_floor = 2.0 ** -24 * float((np.abs(dy64).sum(axis=r) * (1 + mu * inv)).max())
    report = []
    for name, t, a, b in zip(["y", "dx", "dscale", "doffset"], truth, ours, stock):
        ea = float(np.abs(a - t).max())
        eb = float(np.abs(b - t).max())
        # Floor: a float32 rounding of the largest value (both ops' outputs
        # may be exact when the stock op's error is 0).
        floor = 2.0 ** -23 * float(np.abs(t).max()) + (stat_floor if name == "dscale" else 0)
        report.append(f"{name}: ours {ea:.3g} stock {eb:.3g}")
        assert ea <= 2 * eb + floor, "; ".join(report)


@pytest.mark.parametrize("dtype", [tf.float32, tf.float16, tf.bfloat16, tf.float64],
                         ids=lambda d: d.name)
@pytest.mark.parametrize("shape,axis", [((6, 4, 4, 3), -1), ((6, 3, 4, 4), 1), ((40, 3), -1)],
                         ids=str)
def test_nan_inf_propagate(dtype, shape, axis):
    """NaN in channel 0 and +Inf in channel 1 of x: no crash; training gives
    NaN for those channels only (as the stock op), inference only at those
    elements; the clean channel and its statistics stay exact."""
    x64 = np.random.default_rng(0).normal(1.0, 2.0, shape)
    x64 = ref.to64(tf.cast(x64, dtype))
    idx0 = [1] * len(shape)
    idx1 = [2] * len(shape)
    idx0[axis] = 0
    idx1[axis] = 1
    x64[tuple(idx0)] = np.nan
    x64[tuple(idx1)] = np.inf
    x = tf.cast(x64, dtype)
    u = tf.float64 if dtype == tf.float64 else tf.float32
    c = shape[axis]
    mm, mv = tf.Variable(tf.zeros([c], u)), tf.Variable(tf.ones([c], u))
    n = tf.Variable(tf.constant(0, tf.int64))
    scale = tf.ones([c], u)
    with tf.GradientTape() as tape:
        tape.watch([x, scale])
        y = fused_bn.batch_norm(x, True, scale, None, mm, mv, axis=axis, num_updates=n)
    dx, ds = tape.gradient(y, [x, scale])
    y = ref.to64(y)
    chan = lambda a, k: np.take(a, k, axis=axis)  # noqa: E731
    assert np.all(np.isnan(chan(y, 0))) and np.all(np.isnan(chan(y, 1)))
    y64, mean, var = ref.forward(chan(x64, [2]), axis, np.ones(1), np.zeros(1), EPS)
    ref.close(chan(y, [2]), y64, dtype)
    assert not np.any(np.isfinite(mm.numpy()[:2])) and np.all(np.isfinite(mm.numpy()[2:]))
    assert np.all(np.isfinite(mv.numpy()[2:])) and np.all(mv.numpy()[2:] >= 0)
    assert n.numpy() == 1
    assert np.all(np.isnan(ref.to64(dx)[tuple(idx0)]))
    assert np.all(np.isfinite(chan(ref.to64(dx), 2)))
    assert np.isfinite(ds.numpy()[2])

    # Inference: only the NaN / Inf elements are non-finite (+Inf stays +Inf).
    mm.assign(tf.zeros([c], u))
    mv.assign(tf.ones([c], u))
    y = ref.to64(fused_bn.batch_norm(x, False, None, None, mm, mv, axis=axis))
    assert np.isnan(y[tuple(idx0)]) and y[tuple(idx1)] == np.inf
    finite = np.isfinite(x64)
    np.testing.assert_array_equal(np.isfinite(y), finite)
    ref.close(y[finite], (x64[finite]) / np.sqrt(1.0 + EPS), dtype)
    # Building blocks too.
    mean, var = fused_bn.moments(x, axis=axis)
    assert np.isnan(mean.numpy()[0]) and np.isfinite(mean.numpy()[2])
    yn = ref.to64(fused_bn.normalize(x, tf.zeros([c], u), tf.ones([c], u), axis=axis))
    np.testing.assert_array_equal(np.isfinite(yn), finite)


@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16, tf.float16], ids=lambda d: d.name)
@pytest.mark.parametrize("axis", [-1, 1])
def test_moving_variance_never_negative(dtype, axis):
    """Constant channels, tiny spread at large offsets, many EMA steps with
    various momenta: batch and moving variances stay >= 0 (and exact 0 for
    constant channels)."""
    c = 6
    rng = np.random.default_rng(5)
    shape = (16, c, 9, 7) if axis == 1 else (16, 9, 7, c)
    mm, mv = tf.Variable(tf.zeros([c])), tf.Variable(tf.zeros([c]))
    n = tf.Variable(tf.constant(0, tf.int64))
    offsets = np.array([0.0, 1.0, 1e3, 3e4, -2e4, 7.0])
    spread = np.array([0.0, 0.0, 1e-3, 1e-2, 0.5, 1e-7])
    for i, momentum in enumerate([0.0, 0.5, 0.9, 0.99, 1.0, 0.3, 0.0]):
        x64 = ref.bcast(offsets, np.empty(shape), axis) + \
            ref.bcast(spread, np.empty(shape), axis) * rng.standard_normal(shape)
        x = tf.cast(x64, dtype)
        fused_bn.batch_norm(x, True, None, None, mm, mv, axis=axis, momentum=momentum,
                            num_updates=n if i % 2 else None)
        mean, var = fused_bn.moments(x, axis=axis)
        assert np.all(var.numpy() >= 0), var.numpy()
        assert np.all(mv.numpy() >= 0), mv.numpy()
        assert var.numpy()[0] == 0 and var.numpy()[1] == 0
    xs = ref.to64(x)
    true_var = xs.var(axis=ref.reduce_axes(xs, axis))
    np.testing.assert_allclose(var.numpy(), true_var, rtol=1e-3, atol=1e-9)
