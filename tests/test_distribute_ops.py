"""In-process parts of the tf.distribute support: the split backward ops
(`FusedBn>BackwardReduce`, `FusedBn>BackwardApply`) against float64 NumPy,
their composite gradients against numerical ones, the `synchronized`
argument outside replica contexts, and the single-device path's graph.
The strategies themselves run in tests/test_distribute.py (fresh processes)."""
import keras
import numpy as np
import pytest
import tensorflow as tf

import fused_bn
import reference as ref
from fused_bn._loader import ops as _ops

EPS = float(np.float32(1e-3))
INVALID = tf.errors.InvalidArgumentError
CASES = [((6, 5), -1), ((3, 4, 2, 7), -1), ((3, 7, 4, 2), 1), ((2, 3, 5), 1)]
DTYPES = [tf.float32, tf.float16, tf.bfloat16, tf.float64]


def _stats(x64, axis):
    r = ref.reduce_axes(x64, axis)
    mean = x64.mean(axis=r)
    return mean, 1.0 / np.sqrt(x64.var(axis=r) + EPS)


def _case(shape, axis, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = tf.cast(rng.normal(1.5, 2.0, shape), dtype)
    dy = tf.cast(rng.normal(0.0, 1.0, shape), dtype)
    u = tf.float64 if dtype == tf.float64 else tf.float32
    x64, dy64 = ref.to64(x), ref.to64(dy)
    mean, inv_std = _stats(x64, axis)
    c = shape[axis]
    scale = (1 + 0.3 * rng.standard_normal(c))
    return dict(x=x, dy=dy, x64=x64, dy64=dy64, u=u, mean=mean, inv_std=inv_std,
                scale=scale, fmt="channels_last" if axis == -1 else "channels_first",
                rng=rng)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("shape,axis", CASES)
def test_backward_reduce_is_the_local_sums(shape, axis, dtype):
    k = _case(shape, axis, dtype)
    sum_dy, sum_dy_xhat = _ops.fused_bn_backward_reduce(
        dy=k["dy"], x=k["x"], mean=tf.constant(k["mean"], k["u"]),
        inv_std=tf.constant(k["inv_std"], k["u"]), data_format=k["fmt"])
    r = ref.reduce_axes(k["x64"], axis)
    xhat = (k["x64"] - ref.bcast(k["mean"], k["x64"], axis)) * ref.bcast(
        k["inv_std"], k["x64"], axis)
    mag = np.abs(k["dy64"]).sum(axis=r).max()
    ref.close(sum_dy.numpy(), k["dy64"].sum(axis=r), dtype, scale=mag)
    ref.close(sum_dy_xhat.numpy(), (k["dy64"] * xhat).sum(axis=r), dtype,
              scale=(np.abs(k["dy64"] * xhat)).sum(axis=r).max())


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("shape,axis", CASES)
def test_backward_apply_uses_the_given_sums_and_count(shape, axis, dtype):
    """dx of a batch whose statistics span more values than x: the sums and
    count are those of a bigger (global) batch."""
    k = _case(shape, axis, dtype)
    c = shape[axis]
    count = 3 * (k["x64"].size // c) + 1
    sum_dy = k["rng"].normal(0, 5, c)
    sum_dy_xhat = k["rng"].normal(0, 5, c)
    u = k["u"]
    dx = _ops.fused_bn_backward_apply(
        dy=k["dy"], x=k["x"], scale=tf.constant(k["scale"], u),
        mean=tf.constant(k["mean"], u), inv_std=tf.constant(k["inv_std"], u),
        sum_dy=tf.constant(sum_dy, u), sum_dy_xhat=tf.constant(sum_dy_xhat, u),
        count=tf.constant(count, tf.int64), data_format=k["fmt"])
    assert dx.dtype == dtype and dx.shape == k["x"].shape
    b = lambda v: ref.bcast(v, k["x64"], axis)  # noqa: E731
    mean, inv = (np.asarray(v, np.float64) for v in (
        tf.constant(k["mean"], u), tf.constant(k["inv_std"], u)))
    xhat = (k["x64"] - b(mean)) * b(inv)
    want = b(k["scale"] * inv) * (k["dy64"] - b(sum_dy / count)
                                  - xhat * b(sum_dy_xhat / count))
    ref.close(dx.numpy(), want, dtype)


def test_backward_apply_with_the_local_sums_is_the_single_device_backward():
    x = tf.random.stateless_normal([8, 3, 3, 4], [1, 2]) * 3 + 1
    dy = tf.random.stateless_normal([8, 3, 3, 4], [3, 4])
    scale = tf.constant([1.0, 2.0, 0.5, -1.0])
    mean, var = fused_bn.moments(x)
    inv_std = tf.math.rsqrt(var + EPS)
    sums = _ops.fused_bn_backward_reduce(dy=dy, x=x, mean=mean, inv_std=inv_std)
    dx = _ops.fused_bn_backward_apply(
        dy=dy, x=x, scale=scale, mean=mean, inv_std=inv_std, sum_dy=sums[0],
        sum_dy_xhat=sums[1], count=tf.constant(72, tf.int64))
    want_dx, want_ds, want_do = ref.backward(
        ref.to64(x), ref.to64(dy), -1, scale.numpy().astype(np.float64), EPS, True)
    ref.close(dx.numpy(), want_dx, tf.float32)
    ref.close(sums[1].numpy(), want_ds, tf.float32)
    ref.close(sums[0].numpy(), want_do, tf.float32)


@pytest.mark.parametrize("shape,axis", [((4, 3), -1), ((2, 3, 2, 2), 1)])
def test_split_backward_gradients_match_numerical(shape, axis):
    """The composite gradients (used for second order) in float64."""
    k = _case(shape, axis, tf.float64)
    c = shape[axis]
    fmt = k["fmt"]
    mean = tf.constant(k["mean"])
    inv_std = tf.constant(k["inv_std"])
    scale = tf.constant(k["scale"])
    s1 = tf.constant(k["rng"].normal(0, 2, c))
    s2 = tf.constant(k["rng"].normal(0, 2, c))

    def reduce(dy, x, m, r):
        a, b = _ops.fused_bn_backward_reduce(dy=dy, x=x, mean=m, inv_std=r,
                                             data_format=fmt)
        return a * tf.range(1.0, c + 1, dtype=tf.float64) + b * b

    def apply(dy, x, g, m, r, a, b):
        return _ops.fused_bn_backward_apply(
            dy=dy, x=x, scale=g, mean=m, inv_std=r, sum_dy=a, sum_dy_xhat=b,
            count=tf.constant(7, tf.int64), data_format=fmt)

    for fn, args in [(reduce, [k["dy"], k["x"], mean, inv_std]),
                     (apply, [k["dy"], k["x"], scale, mean, inv_std, s1, s2])]:
        theoretical, numerical = tf.test.compute_gradient(fn, args)
        for t, n in zip(theoretical, numerical):
            np.testing.assert_allclose(t, n, rtol=1e-6, atol=1e-6)


def test_backward_apply_errors_name_the_argument():
    x = tf.ones([4, 3])
    v = tf.ones([3])
    with pytest.raises(INVALID, match="count must be >= 1"):
        _ops.fused_bn_backward_apply(dy=x, x=x, scale=v, mean=v, inv_std=v,
                                     sum_dy=v, sum_dy_xhat=v,
                                     count=tf.constant(0, tf.int64))
    with pytest.raises((INVALID, ValueError), match="sum_dy_xhat"):
        _ops.fused_bn_backward_apply(dy=x, x=x, scale=v, mean=v, inv_std=v,
                                     sum_dy=v, sum_dy_xhat=tf.ones([4]),
                                     count=tf.constant(4, tf.int64))
    with pytest.raises((INVALID, ValueError), match="dy"):
        _ops.fused_bn_backward_reduce(dy=tf.ones([5, 3]), x=x, mean=v, inv_std=v)


# ---------------------------------------------------------------- the API

def test_synchronized_without_a_strategy_is_the_plain_op():
    x = tf.random.stateless_normal([6, 4, 4, 3], [5, 6]) * 2 + 1
    got, want = [], []
    for sync, out in ((True, got), (False, want)):
        mm = tf.Variable(tf.zeros([3]))
        mv = tf.Variable(tf.ones([3]))
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = fused_bn.batch_norm(x, True, None, None, mm, mv, synchronized=sync)
        out += [y, tape.gradient(y, x, output_gradients=x), mm.value(), mv.value()]
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def _op_types(fn, *specs):
    graph = tf.function(fn).get_concrete_function(*specs).graph
    types = [op.type for op in graph.get_operations()]
    for f in graph._functions.values():  # the replica function's body
        types += [n.op for n in f.cached_definition.node_def]
    return types


@pytest.mark.parametrize("where", ["no strategy", "OneDeviceStrategy",
                                   "MirroredStrategy, 1 replica"])
def test_single_device_path_is_one_fused_op(where):
    """Training with one replica: the one FusedBn>Forward op, no moments,
    normalize or collective ops."""
    strategy = {"no strategy": None,
                "OneDeviceStrategy": tf.distribute.OneDeviceStrategy("/cpu:0"),
                "MirroredStrategy, 1 replica": tf.distribute.MirroredStrategy(
                    ["/cpu:0"])}[where]
    scope = strategy.scope() if strategy else tf.name_scope("none")
    with scope:
        mm = tf.Variable(tf.zeros([3]), trainable=False)
        mv = tf.Variable(tf.ones([3]), trainable=False)

    def bn(x):
        return fused_bn.batch_norm(x, True, None, None, mm, mv, synchronized=True)

    fn = (lambda x: strategy.run(bn, args=(x,))) if strategy else bn
    types = _op_types(fn, tf.TensorSpec([None, 3]))
    assert types.count("FusedBn>Forward") == 1, types
    assert not [t for t in types if t.startswith("FusedBn>") and t != "FusedBn>Forward"]
    assert not [t for t in types if "Collective" in t or "Nccl" in t]


def test_synchronized_must_be_a_bool():
    with pytest.raises(TypeError, match="synchronized must be a bool"):
        fused_bn.batch_norm(tf.ones([4, 3]), True, synchronized="yes")


def test_layer_accepts_and_serializes_synchronized():
    layer = fused_bn.BatchNormalization(synchronized=True)
    config = layer.get_config()
    assert config["synchronized"] is True
    assert fused_bn.BatchNormalization.from_config(config).synchronized is True
    keras_config = keras.layers.BatchNormalization(synchronized=True).get_config()
    assert fused_bn.BatchNormalization.from_config(keras_config).synchronized is True
    assert fused_bn.BatchNormalization().get_config()["synchronized"] is False
    x = tf.random.stateless_normal([8, 3], [7, 8])
    np.testing.assert_array_equal(layer(x, training=True).numpy(),
                                  fused_bn.BatchNormalization()(x, training=True).numpy())


def test_compat_v1_accepts_synchronized():
    with tf.Graph().as_default(), tf.compat.v1.Session() as sess:
        x = tf.compat.v1.placeholder(tf.float32, [None, 3])
        y = fused_bn.compat.v1.batch_norm(x, True, scope="bn", synchronized=True)
        sess.run(tf.compat.v1.global_variables_initializer())
        xv = np.random.default_rng(0).normal(size=(6, 3)).astype("float32")
        out = sess.run(y, {x: xv})
    ref.close(out, ref.forward(xv.astype(np.float64), -1, 1.0, 0.0, EPS)[0], tf.float32)


def test_moments_gradient_in_a_function_channels_last():
    """The Moments gradient reads data_format from the op (bytes in a graph)."""
    x = tf.random.stateless_normal([3, 2, 2, 5], [9, 9])
    w = tf.range(5.0)

    def grads(moments):
        with tf.GradientTape() as tape:
            tape.watch(x)
            mean, var = moments(x)
            loss = tf.reduce_sum(mean * w) + tf.reduce_sum(var * w * w)
        return tape.gradient(loss, x)

    got = tf.function(lambda: grads(fused_bn.moments))()
    want = grads(lambda x: tf.nn.moments(x, [0, 1, 2]))
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-6)
