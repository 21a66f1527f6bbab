"""Core behaviour of fused_bn's ops against float64 NumPy and the stock op."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

import fused_bn
import reference as ref

# The epsilon attr is float32, as in the stock op: references use that value.
EPS = float(np.float32(1e-3))

DTYPES = [tf.float32, tf.float16, tf.bfloat16, tf.float64]
# (shape, axis): ranks 2 to 5, both layouts, C = 1, 3, 63, count = 2, odd sizes.
SHAPES = [
    ((2, 3), -1),
    ((7, 63), -1),
    ((5, 1), 1),
    ((3, 5, 7), -1),
    ((2, 3, 17), 1),
    ((2, 5, 5, 3), -1),
    ((3, 63, 5, 7), 1),
    ((2, 1, 1, 1), 1),
    ((2, 3, 4, 5, 6), -1),
    ((2, 3, 4, 5, 6), 1),
    ((33, 9, 11, 70), -1),
    ((2, 70, 41, 43), 1),
]


def _data(shape, dtype, seed=0, loc=0.5, scale=2.0):
    rng = np.random.default_rng(seed)
    x = tf.cast(rng.normal(loc, scale, shape), dtype)
    return x, ref.to64(x)


def _params(c, dtype, seed=1):
    rng = np.random.default_rng(seed)
    u = tf.float64 if dtype == tf.float64 else tf.float32
    scale = tf.constant(rng.uniform(0.5, 1.5, c), u)
    offset = tf.constant(rng.normal(0, 1, c), u)
    return scale, offset, ref.to64(scale), ref.to64(offset)


def _vars(c, dtype, counter=True):
    u = tf.float64 if dtype == tf.float64 else tf.float32
    mm = tf.Variable(tf.zeros([c], u))
    mv = tf.Variable(tf.ones([c], u))
    n = tf.Variable(tf.constant(0, tf.int64)) if counter else None
    return mm, mv, n


def _y_tol(y64, dtype):
    """Output tolerance: rounding of y in dtype (plus the input's)."""
    return max(1.0, float(np.abs(y64).max()))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("shape,axis", SHAPES)
def test_training_forward_backward_matches_float64(shape, axis, dtype):
    x, x64 = _data(shape, dtype)
    c = shape[axis]
    scale, offset, s64, o64 = _params(c, dtype)
    mm, mv, n = _vars(c, dtype)
    dy, dy64 = _data(shape, dtype, seed=7, loc=0.0, scale=1.0)
    with tf.GradientTape() as tape:
        tape.watch([x, scale, offset])
        y = fused_bn.batch_norm(x, True, scale, offset, mm, mv, axis=axis,
                                num_updates=n, momentum=0.9, epsilon=1e-3)
    dx, ds, do = tape.gradient(y, [x, scale, offset], output_gradients=dy)
    assert y.dtype == dtype and y.shape == x.shape and dx.dtype == dtype
    y64, mean, var = ref.forward(x64, axis, s64, o64, EPS)
    ref.close(ref.to64(y), y64, dtype)
    rdx, rds, rdo = ref.backward(x64, dy64, axis, s64, EPS, True)
    ref.close(ref.to64(dx), rdx, dtype)
    ref.close(ref.to64(ds), rds, dtype)
    ref.close(ref.to64(do), rdo, dtype)
    # First update with warm-up: the moving statistics are the batch's.
    count = x64.size / c
    ref.close(mm.numpy(), mean, dtype)
    ref.close(mv.numpy(), var * count / (count - 1), dtype)
    assert n.numpy() == 1


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("shape,axis", SHAPES[::2])
def test_inference_forward_backward_matches_float64(shape, axis, dtype):
    x, x64 = _data(shape, dtype)
    c = shape[axis]
    scale, offset, s64, o64 = _params(c, dtype)
    u = tf.float64 if dtype == tf.float64 else tf.float32
    rng = np.random.default_rng(3)
    mm = tf.Variable(tf.constant(rng.normal(0.5, 1, c), u))
    mv = tf.Variable(tf.constant(rng.uniform(1, 5, c), u))
    n = tf.Variable(tf.constant(4, tf.int64))
    before = (mm.numpy().copy(), mv.numpy().copy())
    dy, dy64 = _data(shape, dtype, seed=7, loc=0.0, scale=1.0)
    with tf.GradientTape() as tape:
        tape.watch([x, scale, offset])
        y = fused_bn.batch_norm(x, False, scale, offset, mm, mv, axis=axis,
                                num_updates=n)
    dx, ds, do = tape.gradient(y, [x, scale, offset], output_gradients=dy)
    y64, _, _ = ref.forward(x64, axis, s64, o64, EPS, ref.to64(mm), ref.to64(mv))
    ref.close(ref.to64(y), y64, dtype)
    rdx, rds, rdo = ref.backward(x64, dy64, axis, s64, EPS, False,
                                 ref.to64(mm), ref.to64(mv))
    ref.close(ref.to64(dx), rdx, dtype)
    ref.close(ref.to64(ds), rds, dtype)
    ref.close(ref.to64(do), rdo, dtype)
    np.testing.assert_array_equal(mm.numpy(), before[0])
    np.testing.assert_array_equal(mv.numpy(), before[1])
    assert n.numpy() == 4


@pytest.mark.parametrize("dtype", [tf.float32, tf.float16, tf.bfloat16], ids=lambda d: d.name)
@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
@pytest.mark.parametrize("training", [True, False])
def test_matches_stock_fused_batch_norm(dtype, layout, training):
    shape = (4, 9, 11, 24) if layout == "NHWC" else (4, 24, 9, 11)
    axis = -1 if layout == "NHWC" else 1
    x, _ = _data(shape, dtype)
    scale, offset, _, _ = _params(24, dtype)
    mean = tf.constant(np.linspace(-0.5, 1.0, 24), tf.float32)
    var = tf.constant(np.linspace(0.5, 3.0, 24), tf.float32)
    mm, mv = tf.Variable(mean), tf.Variable(var)
    dy, _ = _data(shape, dtype, seed=5, loc=0.0, scale=1.0)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([x, scale, offset])
        ours = fused_bn.batch_norm(x, training, scale, offset, mm, mv,
                                   axis=axis, momentum=0.0, epsilon=1e-3)
        if training:
            stock, bmean, bvar = tf.compat.v1.nn.fused_batch_norm(
                x, scale, offset, epsilon=1e-3, data_format=layout, is_training=True)
        else:
            stock, bmean, bvar = tf.compat.v1.nn.fused_batch_norm(
                x, scale, offset, mean, var, epsilon=1e-3, data_format=layout,
                is_training=False)
    g_ours = tape.gradient(ours, [x, scale, offset], output_gradients=dy)
    g_stock = tape.gradient(stock, [x, scale, offset], output_gradients=dy)
    tol = ref.TOL[dtype] * 4
    np.testing.assert_allclose(ref.to64(ours), ref.to64(stock), atol=tol * 4, rtol=tol)
    for a, b in zip(g_ours, g_stock):
        a, b = ref.to64(a), ref.to64(b)
        np.testing.assert_allclose(a, b, atol=tol * max(1, np.abs(b).max()), rtol=tol)
    if training:
        # momentum 0: moving stats are the batch's, Bessel-corrected as stock's.
        np.testing.assert_allclose(mm.numpy(), bmean.numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(mv.numpy(), bvar.numpy(), rtol=1e-4, atol=1e-4)


def test_training_tensor_false_then_true_in_one_traced_function():
    x, x64 = _data((6, 4, 4, 5), tf.float32)
    mm, mv, n = _vars(5, tf.float32)
    mm.assign(np.arange(5.0))
    mv.assign(np.arange(1.0, 6.0))

    @tf.function
    def step(training):
        return fused_bn.batch_norm(x, training, moving_mean=mm, moving_variance=mv,
                                   num_updates=n, momentum=0.5)

    y = step(tf.constant(False))
    expected, _, _ = ref.forward(x64, -1, np.ones(5), np.zeros(5), EPS,
                                 np.arange(5.0), np.arange(1.0, 6.0))
    ref.close(y.numpy(), expected, tf.float32)
    np.testing.assert_array_equal(mm.numpy(), np.arange(5.0))
    assert n.numpy() == 0
    y = step(tf.constant(True))
    expected, mean, var = ref.forward(x64, -1, np.ones(5), np.zeros(5), EPS)
    ref.close(y.numpy(), expected, tf.float32)
    ref.close(mm.numpy(), mean, tf.float32)  # warm-up: t=0 takes the batch
    assert n.numpy() == 1
    assert len(step.get_concrete_function(tf.TensorSpec([], tf.bool)).graph.get_operations()) > 0
    assert step.experimental_get_tracing_count() == 1


def test_training_as_variable():
    x, x64 = _data((8, 6), tf.float32)
    mm, mv, n = _vars(6, tf.float32)
    flag = tf.Variable(True)

    @tf.function
    def step():
        return fused_bn.batch_norm(x, flag, moving_mean=mm, moving_variance=mv, num_updates=n)

    step()
    assert n.numpy() == 1
    flag.assign(False)
    before = mm.numpy().copy()
    y = step()
    np.testing.assert_array_equal(mm.numpy(), before)
    expected, _, _ = ref.forward(x64, -1, np.ones(6), np.zeros(6), EPS, ref.to64(mm), ref.to64(mv))
    ref.close(y.numpy(), expected, tf.float32)
    assert n.numpy() == 1


@pytest.mark.parametrize("warmup", [True, False])
@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("axis", [-1, 1])
def test_moving_statistics_after_k_steps(warmup, unbiased, axis):
    rng = np.random.default_rng(11)
    batches = [rng.normal(i * 0.3, 1 + 0.1 * i, (4, 3, 5, 6)) for i in range(7)]
    c = batches[0].shape[axis]
    mm, mv, n = _vars(c, tf.float64, counter=warmup)

    @tf.function
    def step(x):
        return fused_bn.batch_norm(x, True, moving_mean=mm, moving_variance=mv, axis=axis,
                                   momentum=0.8, num_updates=n, unbiased_variance=unbiased)

    for b in batches:
        step(tf.constant(b))
    emm, emv = ref.moving(batches, axis, float(np.float32(0.8)), warmup, unbiased)
    np.testing.assert_allclose(mm.numpy(), emm, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(mv.numpy(), emv, rtol=1e-12, atol=1e-12)
    if warmup:
        assert n.numpy() == len(batches)


def test_warmup_momentum_schedule_exact():
    # With a counter, update t uses min(momentum, t / (t + 1)): the moving mean
    # is the running average of all batch means until the horizon.
    mm, mv, n = _vars(1, tf.float64)
    means = [3.0, -1.0, 5.0, 2.0]
    for m in means:
        x = tf.constant([[m - 1.0], [m + 1.0]], tf.float64)
        fused_bn.batch_norm(x, True, moving_mean=mm, moving_variance=mv, num_updates=n,
                            momentum=0.99, unbiased_variance=False)
    np.testing.assert_allclose(mm.numpy(), [np.mean(means)], rtol=1e-14)
    np.testing.assert_allclose(mv.numpy(), [1.0], rtol=1e-14)


def test_tf1_graph_session_forward_and_gradient():
    g = tf.Graph()
    rng = np.random.default_rng(2)
    xv = rng.normal(1, 2, (5, 4, 3, 7))
    dyv = rng.normal(0, 1, xv.shape)
    with g.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 4, 3, 7])
        is_training = tf.compat.v1.placeholder(tf.bool, [])
        mm = tf.compat.v1.get_variable("mm", [7], initializer=tf.compat.v1.zeros_initializer(),
                                       use_resource=True, trainable=False)
        mv = tf.compat.v1.get_variable("mv", [7], initializer=tf.compat.v1.ones_initializer(),
                                       use_resource=True, trainable=False)
        y = fused_bn.batch_norm(x, is_training, moving_mean=mm, moving_variance=mv,
                                momentum=0.0)
        dy = tf.compat.v1.placeholder(tf.float32, xv.shape)
        (dx,) = tf.gradients(y, [x], grad_ys=dy)
        init = tf.compat.v1.global_variables_initializer()
    with tf.compat.v1.Session(graph=g) as sess:
        sess.run(init)
        yt, dxt = sess.run([y, dx], {x: xv, dy: dyv, is_training: True})
        x64 = xv.astype(np.float32).astype(np.float64)
        y64, mean, var = ref.forward(x64, -1, np.ones(7), np.zeros(7), EPS)
        ref.close(yt, y64, tf.float32)
        ref.close(dxt, ref.backward(x64, dyv, -1, np.ones(7), EPS, True)[0], tf.float32)
        ref.close(sess.run(mm), mean, tf.float32)
        count = x64.size / 7
        ref.close(sess.run(mv), var * count / (count - 1), tf.float32)
        ye = sess.run(y, {x: xv, is_training: False})
        ref.close(ye, ref.forward(x64, -1, np.ones(7), np.zeros(7), EPS, sess.run(mm),
                                  sess.run(mv))[0], tf.float32)


def test_numeric_gradient_float64():
    rng = np.random.default_rng(4)
    x = tf.constant(rng.normal(0, 1, (3, 2, 2, 3)))
    scale = tf.constant(rng.uniform(0.5, 1.5, 3))
    offset = tf.constant(rng.normal(0, 1, 3))
    w = tf.constant(rng.normal(0, 1, x.shape))
    for training in (True, False):
        mm = tf.Variable(tf.constant(rng.normal(0, 1, 3)))
        mv = tf.Variable(tf.constant(rng.uniform(1, 2, 3)))

        def f(x, scale, offset):
            return tf.reduce_sum(w * fused_bn.batch_norm(
                x, training, scale, offset, mm, mv, momentum=1.0) ** 2)

        theo, num = tf.test.compute_gradient(f, [x, scale, offset])
        for a, b in zip(theo, num):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_building_blocks_compose_to_batch_norm_with_gradients():
    rng = np.random.default_rng(5)
    x = tf.constant(rng.normal(2, 3, (4, 5, 3, 3)))
    scale = tf.constant(rng.uniform(0.5, 1.5, 5))
    offset = tf.constant(rng.normal(0, 1, 5))
    w = tf.constant(rng.normal(0, 1, x.shape))

    def f(x, scale, offset):
        mean, var = fused_bn.moments(x, axis=1)
        return tf.reduce_sum(w * fused_bn.normalize(x, mean, var, scale, offset, 1e-3, axis=1) ** 2)

    theo, num = tf.test.compute_gradient(f, [x, scale, offset])
    for a, b in zip(theo, num):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    mean, var = fused_bn.moments(x, axis=1)
    np.testing.assert_allclose(mean.numpy(), x.numpy().mean((0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(var.numpy(), x.numpy().var((0, 2, 3)), rtol=1e-12)
    # Composition equals the fused op, gradients included.
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        a = fused_bn.normalize(x, *fused_bn.moments(x, axis=1), scale, offset, 1e-3, axis=1)
        b = fused_bn.batch_norm(x, True, scale, offset, axis=1)
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(tape.gradient(a, x, w).numpy(), tape.gradient(b, x, w).numpy(),
                               rtol=1e-9, atol=1e-9)


def test_update_moving_stats_block():
    mm, mv, n = _vars(3, tf.float32)
    mean = tf.constant([1.0, 2.0, 3.0])
    var = tf.constant([4.0, 5.0, 6.0])
    fused_bn.update_moving_stats(mm, mv, mean, var, 5, momentum=0.9, num_updates=n)
    np.testing.assert_allclose(mm.numpy(), [1, 2, 3], rtol=1e-6)  # t=0: batch
    np.testing.assert_allclose(mv.numpy(), np.array([4, 5, 6]) * 5 / 4, rtol=1e-6)
    fused_bn.update_moving_stats(mm, mv, tf.zeros(3), tf.zeros(3), 5, momentum=0.9,
                                 num_updates=n)
    np.testing.assert_allclose(mm.numpy(), np.array([1, 2, 3]) * 0.5, rtol=1e-6)  # t=1: 1/2
    mm2, mv2, _ = _vars(3, tf.float32)
    fused_bn.update_moving_stats(mm2, mv2, mean, var, 5, momentum=0.9, unbiased_variance=False)
    np.testing.assert_allclose(mm2.numpy(), 0.1 * np.array([1, 2, 3]), rtol=1e-6)
    np.testing.assert_allclose(mv2.numpy(), 0.9 + 0.1 * np.array([4, 5, 6]), rtol=1e-6)
    assert n.numpy() == 2


@pytest.mark.parametrize("path", ["op", "xla"])
@pytest.mark.parametrize("shape,axis", [((4, 0), -1), ((4, 0, 3), 1)], ids=str)
def test_zero_channels_change_nothing(path, shape, axis):
    """No channels: a training step leaves the warm-up counter as it was, in
    the op and in the pure-TF path that the layer runs under XLA (bn.h: with
    channels == 0 nothing changes, the counter included)."""
    mm, mv, n = _vars(0, tf.float32)
    n.assign(4)
    fn = fused_bn.reference.batch_norm if path == "xla" else fused_bn.batch_norm

    def step(x):
        return fn(x, True, moving_mean=mm, moving_variance=mv, num_updates=n, axis=axis)

    if path == "xla":
        step = tf.function(step, jit_compile=True)
    assert step(tf.ones(shape)).shape == shape
    assert n.numpy() == 4
    if path == "op":
        fused_bn.update_moving_stats(mm, mv, tf.zeros([0]), tf.zeros([0]), 5,
                                     num_updates=n)
        assert n.numpy() == 4


def test_read_value_is_not_changed_by_in_place_update():
    mm, mv, _ = _vars(2, tf.float32)
    held = mm.read_value()
    held_np = held.numpy().copy()
    fused_bn.batch_norm(tf.constant([[1.0, 2.0], [3.0, 6.0]]), True, moving_mean=mm,
                        moving_variance=mv, momentum=0.0)
    np.testing.assert_array_equal(held.numpy(), held_np)
    np.testing.assert_allclose(mm.numpy(), [2.0, 4.0])


@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16], ids=lambda d: d.name)
def test_variance_with_large_mean(dtype):
    rng = np.random.default_rng(6)
    x = tf.cast(rng.normal(1e4, 1.0, (64, 8, 8, 4)), dtype)
    x64 = ref.to64(x)
    mean, var = fused_bn.moments(x)
    true_var = x64.var(axis=(0, 1, 2))
    np.testing.assert_allclose(var.numpy(), true_var, rtol=1e-3)
    np.testing.assert_allclose(mean.numpy(), x64.mean(axis=(0, 1, 2)), rtol=2e-7)


_DETERMINISM = textwrap.dedent("""
    import sys, json, numpy as np, tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(int(sys.argv[1]))
    import fused_bn
    rng = np.random.default_rng(0)
    out = {}
    for axis, shape in ((-1, (16, 40, 40, 64)), (1, (16, 64, 40, 40)), (-1, (4096, 300))):
        x = tf.constant(rng.normal(1, 2, shape), tf.float32)
        dy = tf.constant(rng.normal(0, 1, shape), tf.float32)
        c = shape[axis]
        mm, mv = tf.Variable(tf.zeros(c)), tf.Variable(tf.ones(c))
        scale = tf.ones(c)
        with tf.GradientTape() as t:
            t.watch([x, scale])
            y = fused_bn.batch_norm(x, True, scale, None, mm, mv, axis=axis)
        dx, ds = t.gradient(y, [x, scale], dy)
        h = [hash(a.numpy().tobytes()) for a in (y, dx, ds, mm, mv)]
        out[str(axis) + str(shape)] = h
    print(json.dumps(out))
""")


def test_bitwise_deterministic_across_runs_and_thread_counts():
    runs = []
    for threads in (1, 2, 2):
        r = subprocess.run([sys.executable, "-c", _DETERMINISM, str(threads)],
                           capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"},
                           cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        assert r.returncode == 0, r.stderr[-2000:]
        runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
    assert runs[0] == runs[1] == runs[2]


@pytest.mark.parametrize("axis", [-1, 1])
def test_outputs_that_reuse_a_temporary_input_buffer_are_correct(axis):
    # x and dy are temporaries inside the function, so the ops may write y
    # and dx into their buffers: results must still be exact.
    rng = np.random.default_rng(9)
    a = tf.constant(rng.normal(0, 1, (8, 6, 5, 7)), tf.float32)
    c = a.shape[axis]
    mm = tf.Variable(tf.constant(rng.normal(0, 1, c), tf.float32))
    mv = tf.Variable(tf.constant(rng.uniform(1, 2, c), tf.float32))

    @tf.function
    def f(a, training):
        x = a * 2.0 + 1.0
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = fused_bn.batch_norm(x, training, moving_mean=mm, moving_variance=mv,
                                    axis=axis, momentum=1.0)
            dy_source = tf.sin(y)
        dx = tape.gradient(y, x, output_gradients=tf.cos(y) + 0.5)
        return y, dx, dy_source

    x64 = ref.to64(a * 2.0 + 1.0)
    for training in (False, True):
        y, dx, _ = f(a, tf.constant(training))
        if training:
            y64 = ref.forward(x64, axis, np.ones(c), np.zeros(c), EPS)[0]
        else:
            y64 = ref.forward(x64, axis, np.ones(c), np.zeros(c), EPS, ref.to64(mm), ref.to64(mv))[0]
        ref.close(ref.to64(y), y64, tf.float32)
        dy64 = np.cos(ref.to64(y)) + 0.5
        if training:
            rdx = ref.backward(x64, dy64, axis, np.ones(c), EPS, True)[0]
        else:
            rdx = ref.backward(x64, dy64, axis, np.ones(c), EPS, False, ref.to64(mm), ref.to64(mv))[0]
        ref.close(ref.to64(dx), rdx, tf.float32)
