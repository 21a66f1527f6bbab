"""Second-order gradients through fused_bn (gradient penalties, Hessian-vector
products) against a plain-TF composite in float64, the stock op and
finite differences.

The composite computes the batch variance as mean((x - mean(x))^2) without a
stop_gradient: `tf.nn.moments` (and so `keras.layers.BatchNormalization`)
stops the gradient at the mean inside the variance, which leaves first
derivatives right but second derivatives wrong in training mode
(test_tf_nn_moments_second_derivative_is_wrong shows it).
"""
import numpy as np
import pytest
import tensorflow as tf

import fused_bn
import reference as ref

EPS = float(np.float32(1e-3))


def _composite(x, training, scale, offset, mean, var, axis):
    """Plain-TF batch norm, differentiable to any order."""
    rank = x.shape.rank
    axes = [a for a in range(rank) if a != axis % rank]
    shape = [1] * rank
    shape[axis % rank] = -1
    if training:
        mean = tf.reduce_mean(x, axes, keepdims=True)
        var = tf.reduce_mean(tf.square(x - mean), axes, keepdims=True)
    else:
        mean, var = tf.reshape(mean, shape), tf.reshape(var, shape)
    return tf.nn.batch_normalization(x, mean, var, tf.reshape(offset, shape),
                                     tf.reshape(scale, shape), EPS)


def _fused(x, training, scale, offset, mean, var, axis):
    # momentum 1: the moving statistics stay put across the calls.
    return fused_bn.batch_norm(x, training, scale, offset, mean, var,
                               axis=axis, momentum=1.0, epsilon=EPS)


def _stock(x, training, scale, offset, mean, var, axis):
    """tf.compat.v1.nn.fused_batch_norm (FusedBatchNormV3) on rank-4 x."""
    fmt = "NHWC" if axis == -1 else "NCHW"
    if axis == 1 and not training:
        # The stock CPU kernel has no NCHW inference: transpose around it.
        x = tf.transpose(x, [0, 2, 3, 1])
        fmt = "NHWC"
    y = tf.compat.v1.nn.fused_batch_norm(
        x, scale, offset, None if training else tf.convert_to_tensor(mean),
        None if training else tf.convert_to_tensor(var), epsilon=EPS,
        is_training=training, data_format=fmt)[0]
    if axis == 1 and not training:
        y = tf.transpose(y, [0, 3, 1, 2])
    return y


def _params(c, u, seed):
    rng = np.random.default_rng(seed)
    return (tf.Variable(tf.constant(rng.uniform(0.5, 1.5, c), u)),
            tf.Variable(tf.constant(rng.normal(0, 1, c), u)),
            tf.Variable(tf.constant(rng.normal(0, 0.5, c), u)),
            tf.Variable(tf.constant(rng.uniform(0.5, 2.0, c), u)))


def _dense(x, w, axis):
    """A dense layer over the channel axis (a 1x1 convolution)."""
    if axis == -1:
        return tf.einsum("nhwc,cd->nhwd", x, w)
    return tf.einsum("nchw,cd->ndhw", x, w)


def _penalty_grads(bn, x, w, params, training, axis):
    """WGAN-GP: d/d(w, scale, offset) of ||d critic / d x||^2."""
    scale, offset, mean, var = params
    with tf.GradientTape() as outer:
        with tf.GradientTape() as inner:
            inner.watch(x)
            h = _dense(x, w, axis)
            y = bn(h, training, scale, offset, mean, var, axis)
            critic = tf.reduce_sum(tf.tanh(y) * tf.cos(h))
        gx = inner.gradient(critic, x)
        penalty = tf.reduce_sum(tf.square(gx))
    return outer.gradient(penalty, [w, scale, offset])


def _assert_close(actual, expected, rtol, what=""):
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a is not None, f"{what}[{i}]: gradient is None"
        a, e = ref.to64(a), ref.to64(e)
        err = np.abs(a - e).max() / max(1.0, np.abs(e).max())
        assert err <= rtol, f"{what}[{i}]: relative error {err:.3g} > {rtol:.3g}"


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "function"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "frozen"])
@pytest.mark.parametrize("axis", [-1, 1])
def test_gradient_penalty_matches_composite_float64(axis, training, graph):
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(0.3, 1.5, (3, 4, 5, 6)))
    c = 6 if axis == -1 else 4
    w = tf.Variable(rng.normal(0, 1, (x.shape[axis], c)))
    params = _params(c, tf.float64, 1)

    def run(bn):
        return _penalty_grads(bn, x, w, params, training, axis)

    ours = tf.function(lambda: run(_fused))() if graph else run(_fused)
    _assert_close(ours, run(_composite), 1e-10, "penalty grads")


@pytest.mark.parametrize("training", [True, False], ids=["train", "frozen"])
def test_gradient_penalty_through_conv_matches_stock_and_composite(training):
    rng = np.random.default_rng(2)
    x = tf.constant(rng.normal(0, 1, (2, 6, 6, 3)), tf.float32)
    k = tf.Variable(tf.constant(rng.normal(0, 0.5, (3, 3, 3, 5)), tf.float32))
    params = _params(5, tf.float32, 3)

    def run(bn, dtype):
        scale, offset, mean, var = [tf.cast(p, dtype) for p in params]
        xd = tf.cast(x, dtype)
        with tf.GradientTape() as outer:
            outer.watch([k, scale, offset])
            with tf.GradientTape() as inner:
                inner.watch(xd)
                h = tf.nn.conv2d(xd, tf.cast(k, dtype), 1, "SAME")
                y = bn(h, training, scale, offset, mean, var, -1)
                critic = tf.reduce_sum(tf.nn.softplus(y) * tf.sin(h))
            penalty = tf.reduce_sum(tf.square(inner.gradient(critic, xd)))
        return outer.gradient(penalty, [k, scale, offset])

    truth = run(_composite, tf.float64)
    ours = tf.function(lambda: run(_fused, tf.float32))()
    stock = run(_stock, tf.float32)
    _assert_close(stock, truth, 1e-3, "stock vs truth")
    _assert_close(ours, truth, 1e-4, "ours vs truth")


# The epilogue relu(bn(x) + side_input): (side_input given, activation).
EPILOGUES = [(True, None), (False, "relu"), (True, "relu")]
EPILOGUE_IDS = ["side", "relu", "side+relu"]


def _with_epilogue(impl, side, activation):
    """activation(bn(x) + s) as a bn function of _penalty_grads' form plus s:
    impl "fused" (batch_norm's epilogue), "blocks" (moments + normalize, the
    layer's masked path) or "composite" (then tf.add and tf.nn.relu)."""
    def f(x, training, scale, offset, mean, var, axis, s):
        s = s if side else None
        if impl == "fused":
            return fused_bn.batch_norm(x, training, scale, offset, mean, var, axis=axis,
                                       momentum=1.0, epsilon=EPS, side_input=s,
                                       activation=activation)
        if impl == "blocks":
            if training:
                mean, var = fused_bn.moments(x, axis=axis)
            return fused_bn.normalize(x, mean, var, scale, offset, EPS, axis=axis,
                                      side_input=s, activation=activation)
        y = _composite(x, training, scale, offset, mean, var, axis)
        y = y + s if side else y
        return tf.nn.relu(y) if activation == "relu" else y
    return f


@pytest.mark.parametrize("side,activation", EPILOGUES, ids=EPILOGUE_IDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "frozen"])
@pytest.mark.parametrize("axis", [-1, 1])
def test_gradient_penalty_through_the_epilogue_matches_composite_float64(
        axis, training, side, activation):
    """WGAN-GP through activation(bn(h) + s) with h and s both functions of
    the critic's input: d(penalty)/d(w, w_side, scale, offset)."""
    rng = np.random.default_rng(30)
    x = tf.constant(rng.normal(0.3, 1.5, (3, 4, 5, 6)))
    c = 6 if axis == -1 else 4
    w = tf.Variable(rng.normal(0, 1, (x.shape[axis], c)))
    w_side = tf.Variable(rng.normal(0, 1, (x.shape[axis], c)))
    scale, offset, mean, var = _params(c, tf.float64, 31)

    def run(impl):
        bn = _with_epilogue(impl, side, activation)
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                inner.watch(x)
                h = _dense(x, w, axis)
                y = bn(h, training, scale, offset, mean, var, axis,
                       _dense(tf.sin(x), w_side, axis))
                critic = tf.reduce_sum(tf.tanh(y) * tf.cos(h))
            penalty = tf.reduce_sum(tf.square(inner.gradient(critic, x)))
        return outer.gradient(penalty, [w, w_side, scale, offset],
                              unconnected_gradients=tf.UnconnectedGradients.ZERO)

    ours, want = run("fused"), run("composite")
    _assert_close(ours, want, 1e-10, "penalty grads")
    assert side or np.abs(ref.to64(want[1])).max() == 0
    assert np.abs(ref.to64(want[0])).max() > 1e-2


@pytest.mark.parametrize("mode", ["double_tape", "forward_over_backward", "blocks"])
@pytest.mark.parametrize("side,activation", EPILOGUES, ids=EPILOGUE_IDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "frozen"])
@pytest.mark.parametrize("shape,axis", [((4, 3, 5), -1), ((2, 3, 2, 5), 1)])
def test_hessian_vector_product_through_the_epilogue_float64(shape, axis, training,
                                                             side, activation, mode):
    """H v for f(x) = sum(sin(activation(bn(x) + s(x))) * x), s(x) = cos(x)
    (so the side input's own second-order path counts), against the
    composite: batch_norm (double tape, forward over backward) and moments
    + normalize ("blocks", double tape)."""
    rng = np.random.default_rng(32)
    x = tf.constant(rng.normal(0.5, 2.0, shape))
    v = tf.constant(rng.normal(0, 1, shape))
    params = _params(shape[axis], tf.float64, 33)

    def hvp(impl):
        bn = _with_epilogue(impl, side, activation)
        f_of = lambda x: tf.reduce_sum(  # noqa: E731
            tf.sin(bn(x, training, *params, axis, tf.cos(x))) * x)
        if mode == "forward_over_backward":
            with tf.autodiff.ForwardAccumulator(x, v) as acc:
                with tf.GradientTape() as tape:
                    tape.watch(x)
                    f = f_of(x)
                g = tape.gradient(f, x)
            return acc.jvp(g), g
        with tf.GradientTape() as outer:
            outer.watch(x)
            with tf.GradientTape() as inner:
                inner.watch(x)
                f = f_of(x)
            g = inner.gradient(f, x)
        return outer.gradient(g, x, output_gradients=v), g

    h_ours, g_ours = hvp("blocks" if mode == "blocks" else "fused")
    h_ref, g_ref = hvp("composite")
    _assert_close([g_ours, h_ours], [g_ref, h_ref], 1e-10, "grad, hvp")


def _hvp_double_tape(bn, x, v, params, training, axis):
    """H v for f(x) = sum(sin(bn(x)) * x), and the gradient of f."""
    scale, offset, mean, var = params
    with tf.GradientTape() as outer:
        outer.watch(x)
        with tf.GradientTape() as inner:
            inner.watch(x)
            f = tf.reduce_sum(tf.sin(bn(x, training, scale, offset, mean, var, axis)) * x)
        g = inner.gradient(f, x)
    return outer.gradient(g, x, output_gradients=v), g


def _hvp_forward_over_backward(bn, x, v, params, training, axis):
    scale, offset, mean, var = params
    with tf.autodiff.ForwardAccumulator(x, v) as acc:
        with tf.GradientTape() as tape:
            tape.watch(x)
            f = tf.reduce_sum(tf.sin(bn(x, training, scale, offset, mean, var, axis)) * x)
        g = tape.gradient(f, x)
    return acc.jvp(g), g


HVP_CASES = [(shape, axis, mode)
             for (shape, axis) in [((4, 3, 5), -1), ((4, 3, 5), 1),
                                   ((2, 3, 2, 5), 1), ((5, 2), -1)]
             for mode in ["double_tape", "forward_over_backward"]
             if mode == "double_tape" or (shape, axis) == ((4, 3, 5), 1)]


@pytest.mark.parametrize("training", [True, False], ids=["train", "frozen"])
@pytest.mark.parametrize("shape,axis,mode", HVP_CASES)
def test_hessian_vector_product_matches_composite_float64(shape, axis, mode, training):
    rng = np.random.default_rng(4)
    x = tf.constant(rng.normal(0.5, 2.0, shape))
    v = tf.constant(rng.normal(0, 1, shape))
    params = _params(shape[axis], tf.float64, 5)
    hvp = (_hvp_double_tape if mode == "double_tape"
           else _hvp_forward_over_backward)
    h_ours, g_ours = hvp(_fused, x, v, params, training, axis)
    h_ref, g_ref = hvp(_composite, x, v, params, training, axis)
    _assert_close([g_ours, h_ours], [g_ref, h_ref], 1e-10, "grad, hvp")


def test_hessian_vector_product_in_function_with_unknown_shape_and_tensor_training():
    """Unknown rank, and training a bool variable read at run time."""
    rng = np.random.default_rng(6)
    x = tf.constant(rng.normal(0, 1, (3, 4, 2, 5)))
    v = tf.constant(rng.normal(0, 1, x.shape))
    params = _params(4, tf.float64, 7)
    training = tf.Variable(True)
    f = tf.function(
        lambda x, v: _hvp_double_tape(_fused, x, v, params, training, 1),
        input_signature=[tf.TensorSpec(None, tf.float64)] * 2)
    for value in (True, False):
        training.assign(value)
        h_ours, g_ours = f(x, v)
        h_ref, g_ref = _hvp_double_tape(_composite, x, v, params, value, 1)
        _assert_close([g_ours, h_ours], [g_ref, h_ref], 1e-10, f"training={value}")


@pytest.mark.parametrize("training", [True, False], ids=["train", "frozen"])
def test_moving_statistics_gradients_and_forward_mode(training):
    """Inference normalizes with the moving statistics: their gradient (for
    a watched variable) matches the composite; training does not read them
    (zero). Forward mode (a JVP) works with moving statistics and counter."""
    rng = np.random.default_rng(20)
    x = tf.constant(rng.normal(0, 1, (6, 4)))
    dy = tf.constant(rng.normal(0, 1, (6, 4)))
    scale, offset, mean, var = _params(4, tf.float64, 21)
    counter = tf.Variable(tf.constant(0, tf.int64))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([mean, var])
        ours = fused_bn.batch_norm(x, training, scale, offset, mean, var,
                                   momentum=1.0, epsilon=EPS, num_updates=counter)
        theirs = _composite(x, training, scale, offset, mean, var, -1)
    g_ours = tape.gradient(ours, [mean, var], output_gradients=dy)
    g_ref = tape.gradient(theirs, [mean, var], output_gradients=dy,
                          unconnected_gradients=tf.UnconnectedGradients.ZERO)
    _assert_close(g_ours, g_ref, 1e-12, "moving statistics")
    assert training or np.abs(g_ref[0].numpy()).max() > 0.1

    v = tf.constant(rng.normal(0, 1, x.shape))
    with tf.autodiff.ForwardAccumulator(x, v) as acc:
        ours = fused_bn.batch_norm(x, training, scale, offset, mean, var,
                                   momentum=1.0, epsilon=EPS, num_updates=counter)
        theirs = _composite(x, training, scale, offset, mean, var, -1)
    _assert_close([acc.jvp(ours)], [acc.jvp(theirs)], 1e-12, "jvp")


def _rel_err(actual, expected):
    actual, expected = ref.to64(actual), ref.to64(expected)
    return np.abs(actual - expected).max() / max(1.0, np.abs(expected).max())


@pytest.mark.parametrize("dtype", [tf.float32, tf.float16, tf.bfloat16], ids=lambda d: d.name)
@pytest.mark.parametrize("training", [True, False], ids=["train", "frozen"])
@pytest.mark.parametrize("axis", [-1, 1])
def test_hessian_vector_product_low_precision(axis, training, dtype):
    """H v in x's dtype against the float64 truth (on the same rounded x):
    within the project's tolerance per dtype, and for NHWC (where the stock
    CPU kernel runs every dtype) at most twice the stock op's error."""
    rng = np.random.default_rng(8)
    shape = (4, 3, 5, 6)
    x = tf.cast(rng.normal(0.5, 1.0, shape), dtype)
    v = tf.cast(rng.normal(0, 1, shape), dtype)
    params = _params(shape[axis], tf.float32, 9)
    params64 = [tf.cast(p, tf.float64) for p in params]
    h_ours, g_ours = _hvp_double_tape(_fused, x, v, params, training, axis)
    assert h_ours.dtype == dtype and g_ours.dtype == dtype
    h_ref, g_ref = _hvp_double_tape(_composite, tf.cast(x, tf.float64),
                                    tf.cast(v, tf.float64), params64, training, axis)
    errors = [_rel_err(h_ours, h_ref), _rel_err(g_ours, g_ref)]
    assert max(errors) <= ref.TOL[dtype], errors
    if axis == -1:
        h_stock, g_stock = _hvp_double_tape(_stock, x, v, params, training, axis)
        stock = [_rel_err(h_stock, h_ref), _rel_err(g_stock, g_ref)]
        for ours, theirs in zip(errors, stock):
            assert ours <= max(2 * theirs, 1e-6), (errors, stock)


def _assert_numerical(jacobians):
    """Theoretical vs finite-difference Jacobians (central differences in
    float64: error ~1e-6 of the magnitude)."""
    for theo, num in zip(*jacobians):
        err = np.abs(theo - num).max() / max(1.0, np.abs(num).max())
        assert err < 2e-5, f"relative error {err:.3g}"
        assert np.abs(num).max() > 0.1


@pytest.mark.parametrize("axis,training", [(-1, True), (1, True), (-1, False)])
def test_numerical_second_derivative_float64(axis, training):
    """The first-order gradient (dx, dscale, doffset) is differentiated
    numerically by tf.test.compute_gradient."""
    rng = np.random.default_rng(10)
    shape = (2, 2, 3)
    x = tf.constant(rng.normal(0, 1, shape))
    c = shape[axis]
    scale = tf.constant(rng.uniform(0.5, 1.5, c))
    offset = tf.constant(rng.normal(0, 1, c))
    mean = tf.Variable(tf.constant(rng.normal(0, 0.5, c)))
    var = tf.Variable(tf.constant(rng.uniform(0.5, 2.0, c)))
    w = tf.constant(rng.normal(0, 1, shape))

    def first_order(x, scale, offset):
        with tf.GradientTape() as tape:
            tape.watch([x, scale, offset])
            y = _fused(x, training, scale, offset, mean, var, axis)
            f = tf.reduce_sum(tf.sin(y) * w)
        dx, ds, do = tape.gradient(f, [x, scale, offset])
        return tf.concat([tf.reshape(dx, [-1]), ds, do], 0)

    _assert_numerical(tf.test.compute_gradient(first_order, [x, scale, offset]))


def test_numerical_second_derivative_of_building_blocks_float64():
    """moments -> normalize, differentiated twice (numerically once)."""
    rng = np.random.default_rng(11)
    x = tf.constant(rng.normal(0, 1, (2, 3, 2)))
    scale = tf.constant(rng.uniform(0.5, 1.5, 3))
    w = tf.constant(rng.normal(0, 1, x.shape))

    def first_order(x, scale):
        with tf.GradientTape() as tape:
            tape.watch([x, scale])
            mean, var = fused_bn.moments(x, axis=1)
            y = fused_bn.normalize(x, mean, var, scale, None, EPS, axis=1)
            f = tf.reduce_sum(tf.sin(y) * w)
        dx, ds = tape.gradient(f, [x, scale])
        return tf.concat([tf.reshape(dx, [-1]), ds], 0)

    _assert_numerical(tf.test.compute_gradient(first_order, [x, scale]))


@pytest.mark.parametrize("dtype", [tf.float64, tf.float32], ids=lambda d: d.name)
def test_building_blocks_hessian_vector_product(dtype):
    """moments + normalize (mean and variance as normalize inputs) and the
    inference normalize with given statistics, against the composite."""
    rng = np.random.default_rng(12)
    shape = (6, 5, 4)
    x = tf.cast(rng.normal(1.0, 2.0, shape), dtype)
    v = tf.cast(rng.normal(0, 1, shape), dtype)
    u = tf.float64 if dtype == tf.float64 else tf.float32
    scale, offset, mean, var = _params(4, u, 13)

    def blocks(x, training, scale, offset, mm, mv, axis):
        if training:
            mm, mv = fused_bn.moments(x, axis=axis)
        return fused_bn.normalize(x, mm, mv, scale, offset, EPS, axis=axis)

    x64 = tf.cast(x, tf.float64)
    p64 = [tf.cast(p, tf.float64) for p in (scale, offset, mean, var)]
    tol = 1e-10 if dtype == tf.float64 else 1e-4
    for training in (True, False):
        h, g = _hvp_double_tape(blocks, x, v, (scale, offset, mean, var), training, -1)
        h_ref, g_ref = _hvp_double_tape(_composite, x64, tf.cast(v, tf.float64), p64, training, -1)
        _assert_close([g, h], [g_ref, h_ref], tol, f"training={training}")


def test_moments_second_derivative_matches_composite():
    rng = np.random.default_rng(14)
    x = tf.constant(rng.normal(0, 1, (5, 2, 3)))
    v = tf.constant(rng.normal(0, 1, x.shape))
    wm, wv = tf.constant(rng.normal(0, 1, 2)), tf.constant(rng.normal(0, 1, 2))

    def hvp(moments):
        with tf.GradientTape() as outer:
            outer.watch(x)
            with tf.GradientTape() as inner:
                inner.watch(x)
                mean, var = moments(x)
                f = tf.reduce_sum(tf.exp(mean) * wm + tf.square(var) * wv)
            g = inner.gradient(f, x)
        return outer.gradient(g, x, output_gradients=v)

    def composite(x):
        mean = tf.reduce_mean(x, [0, 2])
        return mean, tf.reduce_mean(tf.square(x - mean[:, None]), [0, 2])

    _assert_close([hvp(lambda x: fused_bn.moments(x, axis=1))], [hvp(composite)],
                  1e-10, "moments hvp")


def test_tf_nn_moments_second_derivative_is_wrong():
    """Why the composite above does not use tf.nn.moments: its stop_gradient
    at the mean breaks the second derivative (not ours)."""
    rng = np.random.default_rng(15)
    x = tf.constant(rng.normal(0, 1, (6, 3)))
    v = tf.constant(rng.normal(0, 1, x.shape))

    def tf_nn_moments_bn(x, training, scale, offset, mean, var, axis):
        mean, var = tf.nn.moments(x, [0])
        return tf.nn.batch_normalization(x, mean, var, offset, scale, EPS)

    params = _params(3, tf.float64, 16)
    h_tf, _ = _hvp_double_tape(tf_nn_moments_bn, x, v, params, True, -1)
    h_ref, _ = _hvp_double_tape(_composite, x, v, params, True, -1)
    h_ours, _ = _hvp_double_tape(_fused, x, v, params, True, -1)
    assert np.abs(ref.to64(h_tf) - ref.to64(h_ref)).max() > 1e-2
    _assert_close([h_ours], [h_ref], 1e-10, "hvp")


def test_tf1_graph_gradient_penalty():
    """tf.gradients of tf.gradients in a TF1 graph, through
    fused_bn.compat.v1.batch_norm with a placeholder training flag."""
    rng = np.random.default_rng(22)
    x_value = rng.normal(0, 1, (6, 2, 3)).astype("float32")
    w_value = rng.normal(0, 1, (3, 3)).astype("float32")
    results = {}
    for impl in ("fused", "composite"):
        graph = tf.Graph()
        with graph.as_default():
            x = tf.compat.v1.placeholder(tf.float32, [None, 2, 3])
            training = tf.compat.v1.placeholder(tf.bool, [])
            w = tf.compat.v1.get_variable("w", initializer=w_value)
            h = tf.einsum("abc,cd->abd", x, w)
            if impl == "fused":
                y = fused_bn.compat.v1.batch_norm(h, training, scope="bn", warmup=False,
                                                  momentum=1.0, epsilon=EPS)
            else:
                y = tf.cond(training, lambda: _composite(h, True, tf.ones([3]), tf.zeros([3]),
                                                          None, None, -1),
                            lambda: _composite(h, False, tf.ones([3]), tf.zeros([3]),
                                               tf.zeros([3]), tf.ones([3]), -1))
            (gx,) = tf.compat.v1.gradients(tf.reduce_sum(tf.tanh(y) * h), [x])
            (gw,) = tf.compat.v1.gradients(tf.reduce_sum(tf.square(gx)), [w])
            with tf.compat.v1.Session(graph=graph) as sess:
                sess.run(tf.compat.v1.global_variables_initializer())
                results[impl] = [sess.run(gw, {x: x_value, training: t}) for t in (True, False)]
    for ours, theirs in zip(results["fused"], results["composite"]):
        assert _rel_err(ours, theirs) < 1e-5


def test_first_order_gradient_stays_one_fused_op():
    """The saved statistics' cotangents are zero in a first-order gradient:
    nothing but the two fused ops touches an x-shaped tensor."""
    x = tf.random.normal([4, 5, 3])
    mean, var = tf.Variable(tf.zeros([3])), tf.Variable(tf.ones([3]))

    @tf.function
    def grad(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = fused_bn.batch_norm(x, True, None, None, mean, var)
        return tape.gradient(y, x, output_gradients=tf.ones_like(y))

    graph = grad.get_concrete_function(x).graph
    big = {op.type for op in graph.get_operations()
           if any(o.shape == x.shape for o in op.outputs)}
    assert big <= {"FusedBn>Forward", "FusedBn>ForwardGrad", "Placeholder",
                   "Identity", "Const"}, big


def test_moments_gradient_rank3_channels_last_eager():
    """Eager gradients see data_format as bytes; the moments gradient
    broadcasts per channel for both layouts."""
    rng = np.random.default_rng(19)
    x = tf.constant(rng.normal(0, 1, (3, 4, 5)))
    w = tf.constant(rng.normal(0, 1, 5))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        mean, var = fused_bn.moments(x)
        ours = tf.reduce_sum((mean + var) * w)
        m = tf.reduce_mean(x, [0, 1])
        theirs = tf.reduce_sum((m + tf.reduce_mean(tf.square(x - m), [0, 1])) * w)
    _assert_close([tape.gradient(ours, x)], [tape.gradient(theirs, x)], 1e-12)


def _critic(axis_units=6, **bn_kwargs):
    import keras
    keras.utils.set_random_seed(17)
    return keras.Sequential([
        keras.Input((5,)),
        keras.layers.Dense(axis_units),
        fused_bn.BatchNormalization(**bn_kwargs),
        keras.layers.Activation("tanh"),
        keras.layers.Dense(1),
    ])


def _critic_reference(model, x, training):
    """The critic in plain TF ops on the model's weights (float64)."""
    d1, bn, _, d2 = model.layers
    c = lambda v: tf.cast(tf.convert_to_tensor(v), tf.float64)
    h = tf.matmul(x, c(d1.kernel)) + c(d1.bias)
    y = _composite(h, training, c(bn.gamma), c(bn.beta), c(bn.moving_mean),
                   c(bn.moving_variance), -1)
    return tf.matmul(tf.tanh(y), c(d2.kernel)) + c(d2.bias)


@pytest.mark.parametrize("training", [True, False], ids=["train", "frozen"])
def test_keras_layer_wgan_gp_step(training):
    """A WGAN-GP critic step (interpolates, penalty on ||grad||, optimizer
    update) in tf.function; the penalty's gradients w.r.t. every weight
    match the plain-TF critic in float64."""
    import keras
    model = _critic(momentum=0.9, epsilon=EPS)
    rng = np.random.default_rng(18)
    real = tf.constant(rng.normal(1, 1, (8, 5)), tf.float32)
    fake = tf.constant(rng.normal(0, 1, (8, 5)), tf.float32)
    alpha = tf.constant(rng.uniform(0, 1, (8, 1)), tf.float32)
    opt = keras.optimizers.SGD(0.01)

    def penalty_grads(critic, cast):
        xi = cast(alpha * real + (1 - alpha) * fake)
        with tf.GradientTape() as outer:
            with tf.GradientTape() as inner:
                inner.watch(xi)
                score = critic(xi)
            g = inner.gradient(score, xi)
            gp = tf.reduce_mean(tf.square(tf.norm(g, axis=1) - 1.0))
        return gp, outer.gradient(gp, model.trainable_variables)

    # Reference first (momentum 0.9: our call moves the statistics).
    gp_ref, g_ref = penalty_grads(lambda x: _critic_reference(model, x, training),
                                  lambda t: tf.cast(t, tf.float64))
    before = [w.numpy() for w in model.trainable_variables]

    @tf.function
    def step():
        gp, grads = penalty_grads(lambda x: model(x, training=training), tf.identity)
        opt.apply_gradients(zip(grads[:5], model.trainable_variables[:5]))
        return gp, grads

    gp, grads = step()
    # The output bias does not move the critic's input gradient: None in
    # both; every other weight has a gradient.
    assert [g is None for g in grads] == [g is None for g in g_ref] \
        == [False] * 5 + [True]
    np.testing.assert_allclose(gp.numpy(), gp_ref.numpy(), rtol=1e-5)
    _assert_close(grads[:5], g_ref[:5], 1e-5, "critic grads")
    for b, g, w in zip(before, grads[:5], model.trainable_variables):
        np.testing.assert_allclose(w.numpy(), b - 0.01 * g.numpy(), rtol=1e-6, atol=1e-7)
