"""The fused epilogue y = activation(bn(x) + side_input): forward and
gradients against float64 NumPy and against the stock op followed by
tf.add and tf.nn.relu; moving statistics as without the epilogue; the
layer; errors.

The side input is built so that bn(x) + side_input stays at least MARGIN
away from 0: which side of relu's kink a value falls on then does not
depend on rounding, and the float64 mask is the true one for every dtype."""
import numpy as np
import pytest
import tensorflow as tf

import fused_bn
import reference as ref

EPS = float(np.float32(1e-3))
MARGIN = 0.25
DTYPES = [tf.float32, tf.float16, tf.bfloat16, tf.float64]
# (shape, axis): both layouts, C = 1, 3, 63, counts that are not powers of 2.
SHAPES = [
    ((7, 3), -1),
    ((5, 1), 1),
    ((3, 63, 5, 7), 1),
    ((2, 5, 5, 3), -1),
    ((2, 3, 4, 5, 6), -1),
    ((33, 9, 11, 63), -1),
    ((2, 63, 41, 43), 1),
]
# (side_input given, activation)
EPILOGUES = [(True, None), (False, "relu"), (True, "relu")]
EPILOGUE_IDS = ["side", "relu", "side+relu"]


def _u(dtype):
    return tf.float64 if dtype == tf.float64 else tf.float32


def _case(shape, axis, dtype, training, with_side, seed=0):
    """x, scale, offset, moving statistics, the side input and dy (as
    tensors of dtype, and their float64 values), and bn(x) in float64."""
    rng = np.random.default_rng(seed)
    c = shape[axis]
    u = _u(dtype)
    x = tf.cast(rng.normal(0.5, 2.0, shape), dtype)
    x64 = ref.to64(x)
    scale = tf.constant(rng.uniform(0.5, 1.5, c), u)
    offset = tf.constant(rng.normal(0.0, 1.0, c), u)
    mm0 = tf.constant(rng.normal(0.5, 1.0, c), u)
    mv0 = tf.constant(rng.uniform(1.0, 5.0, c), u)
    stats = {} if training else {"mean": ref.to64(mm0), "var": ref.to64(mv0)}
    bn64, _, _ = ref.forward(x64, axis, ref.to64(scale), ref.to64(offset), EPS, *stats.values())
    # Target values of bn(x) + side at least MARGIN from 0, about half negative.
    target = np.where(rng.random(shape) < 0.5, -1.0, 1.0) * (MARGIN + rng.exponential(1.0, shape))
    side = tf.cast(target - bn64, dtype) if with_side else None
    if not with_side:  # keep bn(x) itself off the kink: dy is 0 near it
        target = bn64
    dy64 = rng.normal(0.0, 1.0, shape) * (np.abs(target) >= MARGIN)
    dy = tf.cast(dy64, dtype)
    return dict(x=x, x64=x64, scale=scale, offset=offset, mm0=mm0, mv0=mv0, side=side,
                side64=None if side is None else ref.to64(side), dy=dy, dy64=ref.to64(dy),
                stats=stats, c=c, u=u)


def _truth(k, axis, training, activation):
    """float64 y and (dx, dscale, doffset, dside) for one shared dy."""
    s64, o64 = ref.to64(k["scale"]), ref.to64(k["offset"])
    bn64, _, _ = ref.forward(k["x64"], axis, s64, o64, EPS, *k["stats"].values())
    v = bn64 + (0.0 if k["side64"] is None else k["side64"])
    y = np.maximum(v, 0.0) if activation == "relu" else v
    g = k["dy64"] * (v > 0) if activation == "relu" else k["dy64"]
    dx, dscale, doffset = ref.backward(k["x64"], g, axis, s64, EPS, training,
                                       *k["stats"].values())
    return y, [dx, dscale, doffset, g]


def _vars(k, counter=True):
    return (tf.Variable(k["mm0"]), tf.Variable(k["mv0"]),
            tf.Variable(tf.constant(3, tf.int64)) if counter else None)


def _ours(k, axis, training, activation, mm, mv, n):
    """y and (dx, dscale, doffset, dside) of fused_bn.batch_norm."""
    watched = [k["x"], k["scale"], k["offset"]] + ([k["side"]] if k["side"] is not None else [])
    with tf.GradientTape() as tape:
        tape.watch(watched)
        y = fused_bn.batch_norm(k["x"], training, k["scale"], k["offset"], mm, mv,
                                momentum=0.9, axis=axis, num_updates=n,
                                side_input=k["side"], activation=activation)
    grads = tape.gradient(y, watched, output_gradients=k["dy"])
    return y, grads + [None] * (4 - len(grads))


def _stock(k, axis, training, activation):
    """The stock op (x reshaped to 4-D), then tf.add and tf.nn.relu."""
    x, shape = k["x"], k["x"].shape
    if axis == -1:
        to4, fmt = [shape[0], -1, 1, shape[-1]], "NHWC"
    else:
        to4, fmt = [shape[0], shape[1], -1, 1], "NCHW"
    watched = [x, k["scale"], k["offset"]] + ([k["side"]] if k["side"] is not None else [])
    with tf.GradientTape() as tape:
        tape.watch(watched)
        stats = {} if training else {"mean": k["mm0"], "variance": k["mv0"]}
        y, _, _ = tf.compat.v1.nn.fused_batch_norm(
            tf.reshape(x, to4), k["scale"], k["offset"], epsilon=EPS, data_format=fmt,
            is_training=training, **stats)
        y = tf.reshape(y, shape)
        if k["side"] is not None:
            y = tf.add(y, k["side"])
        if activation == "relu":
            y = tf.nn.relu(y)
    grads = tape.gradient(y, watched, output_gradients=k["dy"])
    return y, grads + [None] * (4 - len(grads))


@pytest.mark.parametrize("side,activation", EPILOGUES, ids=EPILOGUE_IDS)
@pytest.mark.parametrize("training", [True, False], ids=["training", "inference"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("shape,axis", SHAPES, ids=str)
def test_matches_float64(shape, axis, dtype, training, side, activation):
    k = _case(shape, axis, dtype, training, side)
    mm, mv, n = _vars(k)
    y, grads = _ours(k, axis, training, activation, mm, mv, n)
    assert y.dtype == dtype and y.shape == k["x"].shape
    y64, truth = _truth(k, axis, training, activation)
    ref.close(ref.to64(y), y64, dtype)
    if activation == "relu":
        clipped = (y64 == 0) & (k["dy64"] != 0)  # clipped, off the kink
        assert np.all(ref.to64(y) >= 0) and np.all(ref.to64(y)[clipped] == 0)
    for name, got, want in zip(["dx", "dscale", "doffset", "dside"], grads, truth):
        if name == "dside" and not side:
            assert got is None
            continue
        assert got.dtype == (dtype if name in ("dx", "dside") else k["u"]), name
        ref.close(ref.to64(got), want, dtype)
    if side:
        # d(side_input) is the masked dy itself, exactly.
        np.testing.assert_array_equal(ref.to64(grads[3]), truth[3])


@pytest.mark.parametrize("side,activation", EPILOGUES, ids=EPILOGUE_IDS)
@pytest.mark.parametrize("training", [True, False], ids=["training", "inference"])
@pytest.mark.parametrize("dtype", [tf.float32, tf.float16, tf.bfloat16], ids=lambda d: d.name)
@pytest.mark.parametrize("shape,axis", [((8, 12, 12, 32), -1), ((8, 32, 12, 12), 1),
                                        ((512, 63), -1), ((3, 7, 5, 9, 3), -1)], ids=str)
def test_accuracy_at_most_twice_the_stock_composite(shape, axis, dtype, training, side,
                                                    activation):
    """Flash-attention's rule against the stock op + tf.add + tf.nn.relu:
    our max error vs the float64 truth is at most 2x theirs (plus a float32
    rounding of the largest value), for y, dx, dscale, doffset, dside."""
    k = _case(shape, axis, dtype, training, side, seed=1)
    mm, mv, n = _vars(k)
    ours = _ours(k, axis, training, activation, mm, mv, n)
    stock = _stock(k, axis, training, activation)
    y64, truth = _truth(k, axis, training, activation)
    report = []
    for name, t, a, b in zip(["y", "dx", "dscale", "doffset", "dside"], [y64] + truth,
                             [ours[0]] + ours[1], [stock[0]] + stock[1]):
        if a is None:
            assert b is None and name == "dside"
            continue
        ea = float(np.abs(ref.to64(a) - t).max())
        eb = float(np.abs(ref.to64(b) - t).max())
        report.append(f"{name}: ours {ea:.3g} stock {eb:.3g}")
        floor = 2.0 ** -23 * float(np.abs(t).max()) * (64 if name == "dscale" else 1)
        assert ea <= 2 * eb + floor, "; ".join(report)


@pytest.mark.parametrize("side,activation", EPILOGUES, ids=EPILOGUE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("shape,axis", [((33, 9, 11, 63), -1), ((2, 63, 41, 43), 1)],
                         ids=str)
def test_moving_statistics_as_without_the_epilogue(shape, axis, dtype, side, activation):
    """Three training steps and one inference step with and without the
    epilogue: moving statistics and counter bitwise equal."""
    k = _case(shape, axis, dtype, True, side)
    with_epilogue, without = _vars(k), _vars(k)
    for step in range(4):
        training = step < 3
        x = k["x"] * tf.cast(1.0 + step, dtype)
        fused_bn.batch_norm(x, training, k["scale"], k["offset"], *with_epilogue[:2],
                            num_updates=with_epilogue[2], axis=axis,
                            side_input=k["side"], activation=activation)
        fused_bn.batch_norm(x, training, k["scale"], k["offset"], *without[:2],
                            num_updates=without[2], axis=axis)
    for a, b in zip(with_epilogue, without):
        assert a.numpy().tobytes() == b.numpy().tobytes()
    assert with_epilogue[2].numpy() == 6


@pytest.mark.parametrize("side,activation", EPILOGUES, ids=EPILOGUE_IDS)
@pytest.mark.parametrize("axis", [-1, 1])
def test_numeric_gradient_float64(axis, side, activation):
    shape = (4, 3, 5, 2) if axis == 1 else (4, 5, 2, 3)
    k = _case(shape, axis, tf.float64, True, side, seed=3)
    mm, mv, _ = _vars(k, counter=False)

    def f(x, scale, offset, *side_input):
        return fused_bn.batch_norm(x, True, scale, offset, mm, mv, axis=axis,
                                   side_input=side_input[0] if side_input else None,
                                   activation=activation)
    args = [k["x"], k["scale"], k["offset"]] + ([k["side"]] if side else [])
    theoretical, numerical = tf.test.compute_gradient(f, args, delta=1e-6)
    for t, nu in zip(theoretical, numerical):
        np.testing.assert_allclose(t, nu, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("side,activation", EPILOGUES, ids=EPILOGUE_IDS)
@pytest.mark.parametrize("axis", [-1, 1])
def test_normalize_matches_the_plain_tf_composite(axis, side, activation):
    """fused_bn.normalize with the epilogue (the op the synchronized path
    normalizes with) against plain TF ops in float64: y and the gradients
    w.r.t. x, mean, variance, scale, offset and side_input."""
    shape = (6, 4, 5, 7) if axis == 1 else (6, 5, 7, 4)
    k = _case(shape, axis, tf.float64, False, side, seed=4)
    mean, var = k["mm0"], k["mv0"]
    stat_shape = [1, -1, 1, 1] if axis == 1 else [-1]

    def composite(x, mean, var, scale, offset, *s):
        b = lambda v: tf.reshape(v, stat_shape)  # noqa: E731
        y = (x - b(mean)) * b(scale) * tf.math.rsqrt(b(var) + EPS) + b(offset)
        y = y + s[0] if s else y
        return tf.nn.relu(y) if activation == "relu" else y

    def fused(x, mean, var, scale, offset, *s):
        return fused_bn.normalize(x, mean, var, scale, offset, epsilon=1e-3, axis=axis,
                                  side_input=s[0] if s else None, activation=activation)
    args = [k["x"], mean, var, k["scale"], k["offset"]] + ([k["side"]] if side else [])
    results = []
    for fn in (fused, composite):
        with tf.GradientTape() as tape:
            tape.watch(args)
            y = fn(*args)
        results.append([y] + tape.gradient(y, args, output_gradients=k["dy"]))
    for a, b in zip(*results):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-10, atol=1e-10)


def test_tensor_training_flag_and_tf_function():
    k = _case((6, 4, 4, 5), -1, tf.float32, True, True)
    mm, mv, n = _vars(k)

    @tf.function
    def f(x, side, training):
        return fused_bn.batch_norm(x, training, k["scale"], k["offset"], mm, mv,
                                   num_updates=n, side_input=side, activation="relu")
    spec = tf.TensorSpec([None, 4, 4, 5])
    g = f.get_concrete_function(spec, spec, tf.TensorSpec([], tf.bool))
    y_train = g(k["x"], k["side"], tf.constant(True))
    y64, _ = _truth(k, -1, True, "relu")
    ref.close(ref.to64(y_train), y64, tf.float32)
    assert n.numpy() == 4
    y_infer = g(k["x"], k["side"], tf.constant(False))
    bn_infer = fused_bn.batch_norm(k["x"], False, k["scale"], k["offset"], mm, mv)
    np.testing.assert_allclose(y_infer.numpy(), tf.nn.relu(bn_infer + k["side"]).numpy(),
                               rtol=1e-6, atol=1e-6)
    assert n.numpy() == 4


def test_graphs_without_the_new_attrs_still_load():
    """A GraphDef written before the epilogue (no num_side / activation attrs)
    imports and runs with the defaults."""
    x = tf.constant(np.random.default_rng(0).normal(size=(4, 3)), tf.float32)
    f = tf.function(lambda a: fused_bn.normalize(a, tf.zeros([3]), tf.ones([3])))
    graph_def = f.get_concrete_function(tf.TensorSpec([4, 3])).graph.as_graph_def()
    nodes = [nd for nd in graph_def.node if nd.op == "FusedBn>Normalize"]
    assert nodes
    for nd in nodes:
        del nd.attr["num_side"]
        del nd.attr["activation"]
    out = nodes[0].name + ":0"
    inp = [nd.name for nd in graph_def.node if nd.op == "Placeholder"][0] + ":0"
    imported = tf.compat.v1.wrap_function(
        lambda: tf.graph_util.import_graph_def(graph_def, name=""), [])
    run = imported.prune(imported.graph.get_tensor_by_name(inp),
                         imported.graph.get_tensor_by_name(out))
    np.testing.assert_allclose(run(x).numpy(), x.numpy() / np.sqrt(1 + EPS), rtol=1e-6)


# ---------------------------------------------------------------- the layer

def _block(activation, side):
    """conv -> BN (epilogue) as a functional model with a residual input."""
    import keras
    inp = keras.Input((6, 6, 4))
    res = keras.Input((6, 6, 8))
    h = keras.layers.Conv2D(8, 3, padding="same", use_bias=False)(inp)
    bn = fused_bn.BatchNormalization(activation=activation, warmup=False)
    y = bn(h, side_input=res) if side else bn(h)
    return keras.Model([inp, res], y), bn


@pytest.mark.parametrize("side,activation", EPILOGUES, ids=EPILOGUE_IDS)
def test_layer_side_input_in_a_functional_model(side, activation):
    """The layer's output is activation(bn(h) + side_input) with bn its own
    weights: checked against keras.layers.BatchNormalization + Add + ReLU on
    a copy of the weights, in training and inference, and after fit."""
    import keras
    model, bn = _block(activation, side)
    keras_bn = keras.layers.BatchNormalization(momentum=bn.momentum, epsilon=bn.epsilon)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 6, 6, 4)).astype("float32")
    r = rng.normal(size=(5, 6, 6, 8)).astype("float32")
    h = model.layers[1](x)
    keras_bn.build(h.shape)
    for training in (True, False):
        keras_bn.set_weights([w.numpy() for w in (bn.gamma, bn.beta, bn.moving_mean,
                                                  bn.moving_variance)])
        y = model([x, r], training=training)
        want = keras_bn(h, training=training) + (r if side else 0)
        want = tf.nn.relu(want) if activation == "relu" else want
        np.testing.assert_allclose(y.numpy(), want.numpy(), rtol=1e-5, atol=1e-5)
    model.compile("sgd", "mse")
    model.fit([x, r], np.zeros((5, 6, 6, 8), "float32"), epochs=2, verbose=0)
    assert np.all(np.isfinite(model([x, r]).numpy()))


def test_layer_activation_is_serialized(tmp_path):
    import keras
    layer = fused_bn.BatchNormalization(activation="relu")
    config = layer.get_config()
    assert config["activation"] == "relu"
    assert fused_bn.BatchNormalization.from_config(config).activation == "relu"
    assert fused_bn.BatchNormalization().get_config()["activation"] is None
    model, _ = _block("relu", True)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 6, 6, 4)).astype("float32")
    r = rng.normal(size=(3, 6, 6, 8)).astype("float32")
    model([x, r], training=True)
    path = str(tmp_path / "block.keras")
    model.save(path)
    restored = keras.models.load_model(path)
    assert restored.layers[-1].activation == "relu"
    np.testing.assert_array_equal(restored([x, r]).numpy(), model([x, r]).numpy())


def test_layer_under_xla_matches_the_op():
    """Under jit_compile=True the layer runs the reference; same result and
    the same moving statistics as the op."""
    rng = np.random.default_rng(2)
    x = tf.constant(rng.normal(size=(8, 5, 5, 6)), tf.float32)
    s = tf.constant(rng.normal(size=(8, 5, 5, 6)), tf.float32)
    results = []
    for jit in (False, True):
        layer = fused_bn.BatchNormalization(activation="relu")
        layer.build(x.shape)
        f = tf.function(lambda a, b: layer(a, training=True, side_input=b), jit_compile=jit)
        with tf.GradientTape() as tape:
            tape.watch([x, s])
            y = f(x, s)
        grads = tape.gradient(y, [x, s] + layer.trainable_variables)
        results.append([y] + grads + [layer.moving_mean, layer.moving_variance])
    for a, b in zip(*results):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_layer_mixed_precision_casts_the_side_input():
    import keras
    layer = fused_bn.BatchNormalization(activation="relu", dtype="mixed_bfloat16")
    x = tf.random.normal([4, 3, 3, 5])
    y = layer(x, training=True, side_input=tf.ones([4, 3, 3, 5]))
    assert y.dtype == tf.bfloat16 and keras.backend.standardize_dtype(layer.gamma.dtype) == \
        "float32"
    assert np.all(ref.to64(y) >= 0)


# ---------------------------------------------------------------- errors

def _fresh():
    mm, mv = tf.Variable(tf.zeros([3])), tf.Variable(tf.ones([3]))
    n = tf.Variable(tf.constant(0, tf.int64))
    return mm, mv, n


def _unchanged(mm, mv, n):
    assert np.all(mm.numpy() == 0) and np.all(mv.numpy() == 1) and n.numpy() == 0


@pytest.mark.parametrize("activation", ["gelu", "RELU", "linear", 1, "none"])
def test_bad_activation_names_the_argument(activation):
    mm, mv, n = _fresh()
    x = tf.zeros([4, 3])
    with pytest.raises(ValueError, match="activation must be None or 'relu'"):
        fused_bn.batch_norm(x, True, None, None, mm, mv, num_updates=n, activation=activation)
    with pytest.raises(ValueError, match="activation"):
        fused_bn.normalize(x, tf.zeros([3]), tf.ones([3]), activation=activation)
    with pytest.raises(ValueError, match="activation"):
        fused_bn.BatchNormalization(activation=activation)
    with pytest.raises(ValueError, match="activation"):
        fused_bn.reference.batch_norm(x, True, activation=activation)
    _unchanged(mm, mv, n)


def test_side_input_dtype_and_shape_errors_at_trace_time():
    mm, mv, n = _fresh()
    x = tf.zeros([4, 5, 3])
    with pytest.raises(TypeError, match="side_input must have x's dtype float32, got float16"):
        fused_bn.batch_norm(x, True, None, None, mm, mv, num_updates=n,
                            side_input=tf.zeros([4, 5, 3], tf.float16))
    with pytest.raises(ValueError, match=r"side_input must have x's shape \(4, 5, 3\)"):
        fused_bn.batch_norm(x, True, None, None, mm, mv, num_updates=n,
                            side_input=tf.zeros([4, 5, 1]))
    with pytest.raises(ValueError, match="side_input must have x's shape"):
        fused_bn.normalize(x, tf.zeros([3]), tf.ones([3]), side_input=tf.zeros([5, 3]))
    layer = fused_bn.BatchNormalization()
    with pytest.raises(ValueError, match="side_input"):
        layer(x, training=True, side_input=tf.zeros([4, 5, 2]))
    _unchanged(mm, mv, n)


def test_side_input_shape_error_at_run_time_changes_nothing():
    mm, mv, n = _fresh()

    @tf.function(input_signature=[tf.TensorSpec([None, 3]), tf.TensorSpec([None, 3])])
    def f(x, side):
        return fused_bn.batch_norm(x, True, None, None, mm, mv, num_updates=n,
                                   side_input=side, activation="relu")
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"side_input must have x's shape \[4,3\], got \[5,3\]"):
        f(tf.ones([4, 3]), tf.ones([5, 3]))
    _unchanged(mm, mv, n)

    @tf.function(input_signature=[tf.TensorSpec([None, 3]), tf.TensorSpec([None, 3])])
    def g(x, side):
        return fused_bn.normalize(x, tf.zeros([3]), tf.ones([3]), side_input=side)
    with pytest.raises(tf.errors.InvalidArgumentError, match="side_input must have x's shape"):
        g(tf.ones([4, 3]), tf.ones([2, 3]))


def test_forward_grad_checks_y():
    from fused_bn._loader import ops
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match="y must have x's shape"):
        ops.fused_bn_forward_grad(dy=tf.ones([4, 3]), x=tf.ones([4, 3]), scale=tf.ones([3]),
                                  saved_mean=tf.zeros([3]), saved_inv_std=tf.ones([3]),
                                  training=True, y=[tf.ones([2, 3])], num_dside=1)


@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("axis", [-1, 1])
def test_gradients_with_a_temporary_upstream_gradient(axis, activation):
    """When dy is a temporary, the ops may write dside (the masked dy) or dx
    over its buffer: the gradients equal those from a dy held elsewhere."""
    shape = (64, 32, 24, 8) if axis == -1 else (64, 8, 32, 24)
    k = _case(shape, axis, tf.float32, True, True, seed=6)
    mm, mv, _ = _vars(k, counter=False)

    @tf.function
    def grads(temporary):
        with tf.GradientTape() as tape:
            tape.watch([k["x"], k["side"]])
            y = fused_bn.batch_norm(k["x"], True, k["scale"], k["offset"], mm, mv,
                                    axis=axis, momentum=1.0, side_input=k["side"],
                                    activation=activation)
            loss = tf.reduce_sum(y * k["dy"]) if temporary else y
        return tape.gradient(loss, [k["x"], k["side"]],
                             output_gradients=None if temporary else k["dy"])
    for a, b in zip(grads(True), grads(False)):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    _, truth = _truth(k, axis, True, activation)
    ref.close(ref.to64(grads(True)[1]), truth[3], tf.float32)
