"""Masks in fused_bn.BatchNormalization against keras.layers.BatchNormalization
and a float64 NumPy reference of the masked statistics."""
import keras
import numpy as np
import pytest
import tensorflow as tf

import fused_bn

EPS = float(np.float32(1e-3))  # the ops take epsilon as float32


def _data(shape, seed, loc=0.5, scale=2.0, keep=0.6):
    rng = np.random.default_rng(seed)
    x = rng.normal(loc, scale, shape).astype("float32")
    mask = rng.random(shape[:-1]) < keep
    return x, mask


def _numpy_moments(x, mask, axis):
    """float64 per-channel mean, biased variance and count over the
    unmasked positions (mask broadcast along x's last axis)."""
    x = x.astype(np.float64)
    w = np.broadcast_to(mask[..., None], x.shape).astype(np.float64)
    axes = tuple(a for a in range(x.ndim) if a != axis % x.ndim)
    shape = [1] * x.ndim
    shape[axis] = -1
    n = w.sum(axis=axes)
    mean = (w * x).sum(axis=axes) / np.maximum(n, 1)
    var = (w * (x - mean.reshape(shape)) ** 2).sum(axis=axes) / np.maximum(n, 1)
    return mean, var, n


def _numpy_bn(x, mean, var, gamma, beta, axis):
    shape = [1] * x.ndim
    shape[axis] = -1
    r = lambda v: np.asarray(v, np.float64).reshape(shape)
    return (x.astype(np.float64) - r(mean)) / np.sqrt(r(var) + EPS) * r(gamma) + r(beta)


def _close(actual, desired, tol=4e-6):
    desired = np.asarray(desired, np.float64)
    scale = max(1.0, float(np.abs(desired).max()))
    np.testing.assert_allclose(np.asarray(actual, np.float64), desired,
                               rtol=tol, atol=tol * scale)


def _stats(layer):
    return layer.moving_mean.numpy(), layer.moving_variance.numpy()


def _pair(axis=-1, momentum=0.8, **kwargs):
    ours = fused_bn.BatchNormalization(axis=axis, momentum=momentum, warmup=False,
                                       unbiased_variance=False, **kwargs)
    theirs = keras.layers.BatchNormalization(axis=axis, momentum=momentum, **kwargs)
    return ours, theirs


def _randomize(ours, theirs, c, seed=9):
    """Same non-trivial gamma/beta in both layers (built on first call)."""
    rng = np.random.default_rng(seed)
    gamma, beta = rng.uniform(0.5, 1.5, c), rng.normal(0, 1, c)
    for layer in (ours, theirs):
        layer.gamma.assign(gamma.astype("float32"))
        layer.beta.assign(beta.astype("float32"))


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "function"])
@pytest.mark.parametrize("shape,axis", [
    ((16, 5), -1), ((4, 9, 6), -1), ((3, 5, 4, 7), -1), ((2, 3, 4, 5, 3), -1),
    ((4, 6, 9), 1), ((3, 4, 5, 6), 1)])
def test_matches_keras_layer(shape, axis, graph):
    """Outputs in training and inference, moving statistics after several
    masked steps (warmup=False, unbiased_variance=False), mask passed on."""
    ours, theirs = _pair(axis)
    c = shape[axis]
    call = tf.function(lambda layer, x, m, t: layer(x, training=t, mask=m)) \
        if graph else (lambda layer, x, m, t: layer(x, training=t, mask=m))
    x, mask = _data(shape, 0)
    ours(x), theirs(x)
    _randomize(ours, theirs, c)
    for step in range(4):
        x, mask = _data(shape, step + 1)
        _close(call(ours, x, mask, True), call(theirs, x, mask, True))
    for a, b in zip(_stats(ours), _stats(theirs)):
        _close(a, b)
    assert int(ours.num_updates.numpy()) == 0  # warmup=False: no counter update
    _close(call(ours, x, mask, False), call(theirs, x, mask, False))
    np.testing.assert_array_equal(ours.compute_mask(x, mask), mask)


@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("shape,axis", [((6, 7, 5), -1), ((5, 4, 3, 6), 1)])
def test_float64_matches_numpy_masked_statistics(shape, axis, unbiased):
    """float64 inputs, warm-up and Bessel factor with the unmasked count
    (per channel for channels-first, whose masks include the channel axis)."""
    layer = fused_bn.BatchNormalization(axis=axis, momentum=0.6, dtype="float64",
                                        unbiased_variance=unbiased)
    c = shape[axis]
    mm, mv = np.zeros(c), np.ones(c)
    for t in range(5):
        x, mask = _data(shape, 20 + t, keep=0.5)
        x = x.astype(np.float64) * (1 + t)
        y = layer(x, training=True, mask=mask)
        mean, var, n = _numpy_moments(x, mask, axis)
        _close(y, _numpy_bn(x, mean, var, layer.gamma.numpy(), layer.beta.numpy(), axis), 1e-12)
        m = min(float(np.float32(0.6)), t / (t + 1))  # the momentum attr is float32
        mm = mm * m + mean * (1 - m)
        mv = mv * m + var * (n / (n - 1) if unbiased else 1) * (1 - m)
        for a, b in zip(_stats(layer), (mm, mv)):
            _close(a, b, 1e-12)
    assert int(layer.num_updates.numpy()) == 5


@pytest.mark.parametrize("dtype,policy", [("float32", "float32"),
                                          ("float16", "mixed_float16"),
                                          ("bfloat16", "mixed_bfloat16")])
def test_statistics_without_cancellation(dtype, policy):
    """A large mean and a small spread: E[x^2] - E[x]^2 in float32 would
    lose the variance; ours is accumulated in float32 from a two-pass."""
    rng = np.random.default_rng(30)
    base = {"float32": 1000.0, "float16": 100.0, "bfloat16": 100.0}[dtype]
    x = tf.cast(base + rng.normal(0, 1, (64, 9, 4)), dtype)
    mask = rng.random((64, 9)) < 0.7
    layer = fused_bn.BatchNormalization(momentum=0.0, warmup=False,
                                        unbiased_variance=False, dtype=policy)
    layer(x, training=True, mask=mask)
    mean, var, _ = _numpy_moments(tf.cast(x, tf.float64).numpy(), mask, -1)
    np.testing.assert_allclose(layer.moving_mean.numpy(), mean, rtol=1e-6)
    np.testing.assert_allclose(layer.moving_variance.numpy(), var, rtol=1e-4)


def test_gradients_match_plain_tf_and_keras():
    """d(loss)/d(inputs, gamma, beta) through the masked statistics in
    float64: against plain TF ops (two-pass masked moments), and against
    Keras (whose mean divides by count + 1e-7: close, not exact)."""
    shape = (5, 6, 4)
    x, mask = _data(shape, 40)
    x = tf.constant(x.astype(np.float64))
    w = tf.constant(np.random.default_rng(41).normal(0, 1, shape))
    ours = fused_bn.BatchNormalization(warmup=False, unbiased_variance=False, dtype="float64")
    theirs = keras.layers.BatchNormalization(dtype="float64")
    ours(x), theirs(x)
    _randomize(ours, theirs, 4)

    def plain(x, training, mask):
        del training
        keep = tf.cast(mask[..., None], tf.float64)
        n = tf.reduce_sum(keep * tf.ones_like(x), [0, 1])
        mean = tf.reduce_sum(keep * x, [0, 1]) / n
        var = tf.reduce_sum(keep * tf.square(x - mean), [0, 1]) / n
        return tf.nn.batch_normalization(x, mean, var, ours.beta, ours.gamma, EPS)

    grads = []
    for layer in (ours, plain, theirs):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.sin(layer(x, training=True, mask=mask)) * w)
        weights = theirs if layer is theirs else ours
        grads.append(tape.gradient(loss, [x, weights.gamma, weights.beta]))
    for a, b, c in zip(*grads):
        _close(a, b, 1e-12)
        _close(a, c, 1e-6)
    # Masked positions get the direct normalization gradient only.
    assert np.abs(grads[0][0].numpy()[~mask]).max() > 0


def _sequences(n=32, t=7, f=3, seed=50):
    """Zero-padded sequences of random lengths."""
    rng = np.random.default_rng(seed)
    x = rng.normal(1.0, 2.0, (n, t, f)).astype("float32")
    lengths = rng.integers(1, t + 1, n)
    x[np.arange(t)[None, :] >= lengths[:, None]] = 0.0
    return x, rng.normal(0, 1, (n, 1)).astype("float32")


def _sequence_model(bn, embedding):
    keras.utils.set_random_seed(51)
    if embedding:
        inputs = keras.Input((7,), dtype="int32")
        h = keras.layers.Embedding(10, 5, mask_zero=True)(inputs)
    else:
        inputs = keras.Input((7, 3))
        h = keras.layers.Masking(0.0)(inputs)
    h = keras.layers.Dense(6)(h)
    h = bn(h)
    h = keras.layers.GlobalAveragePooling1D()(h)  # uses the mask it receives
    return keras.Model(inputs, keras.layers.Dense(1)(h))


@pytest.mark.parametrize("embedding", [False, True], ids=["Masking", "Embedding"])
def test_padded_sequence_model_fit_matches_keras(embedding):
    x, y = _sequences()
    if embedding:
        rng = np.random.default_rng(52)
        lengths = (x[..., 0] != 0).sum(axis=1)
        x = rng.integers(1, 10, (32, 7))
        x[np.arange(7)[None, :] >= lengths[:, None]] = 0
    ours, theirs = _pair(momentum=0.9)
    m1, m2 = _sequence_model(ours, embedding), _sequence_model(theirs, embedding)
    for m in (m1, m2):
        m.compile(keras.optimizers.SGD(0.05), "mse", jit_compile=False)
        m.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    for a, b in zip(_stats(ours), _stats(theirs)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(m1.trainable_weights, m2.trainable_weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(m1.predict(x, verbose=0), m2.predict(x, verbose=0),
                               rtol=1e-5, atol=1e-5)


def test_mask_propagates_to_the_next_layer():
    """GlobalAveragePooling1D after the layer averages the unmasked steps
    only: it received the mask."""
    x, _ = _sequences(n=8)
    keep = np.any(x != 0, axis=-1)
    inputs = keras.Input((7, 3))
    bn = fused_bn.BatchNormalization()
    y = bn(keras.layers.Masking(0.0)(inputs))
    model = keras.Model(inputs, [y, keras.layers.GlobalAveragePooling1D()(y)])
    y, pooled = model(x, training=False)
    want = (y.numpy() * keep[..., None]).sum(axis=1) / keep.sum(axis=1)[:, None]
    _close(pooled, want)
    assert not np.allclose(want, y.numpy().mean(axis=1))
    np.testing.assert_array_equal(bn.compute_mask(x, tf.constant(keep)).numpy(), keep)


@pytest.mark.parametrize("axis", [-1, 1])
def test_batch_with_fewer_than_two_unmasked_values(axis):
    """All padding (or one value): outputs finite and as Keras computes them
    (mean and variance of what is there, 0 if nothing), gradients finite,
    moving statistics and counter unchanged."""
    shape = (3, 4, 5) if axis == -1 else (3, 5, 4)
    x, _ = _data(shape, 60)
    ours = fused_bn.BatchNormalization(axis=axis)
    theirs = keras.layers.BatchNormalization(axis=axis)
    ours(x), theirs(x)
    _randomize(ours, theirs, 5)
    one = np.zeros(shape[:-1], bool)
    one[1, 2] = True  # channels-last: one value; channels-first: channel 2 gets 4
    for mask in (np.zeros(shape[:-1], bool), one):
        before = _stats(ours)
        with tf.GradientTape() as tape:
            xt = tf.constant(x)
            tape.watch(xt)
            y = ours(xt, training=True, mask=mask)
        dx = tape.gradient(y, xt)
        assert np.all(np.isfinite(y.numpy())) and np.all(np.isfinite(dx.numpy()))
        _close(y, theirs(x, training=True, mask=mask))
        for a, b in zip(_stats(ours), before):
            np.testing.assert_array_equal(a, b)
        assert int(ours.num_updates.numpy()) == 0
    f = tf.function(lambda x, m: ours(x, training=True, mask=m))
    f(x, np.zeros(shape[:-1], bool))
    assert int(ours.num_updates.numpy()) == 0
    f(x, np.ones(shape[:-1], bool))
    assert int(ours.num_updates.numpy()) == 1


def test_bad_masks_are_clear_errors():
    layer = fused_bn.BatchNormalization()
    x = np.ones((4, 5, 3), "float32")
    layer(x)
    with pytest.raises(ValueError, match="mask must have the inputs' shape"):
        layer(x, training=True, mask=np.ones((4, 5, 3), bool))
    with pytest.raises(ValueError, match="mask must have the inputs' shape"):
        layer(x, training=False, mask=np.ones((4,), bool))
    with pytest.raises(ValueError, match=r"mask .*\(4, 5\).*got shape \(4, 6\)"):
        layer(x, training=True, mask=np.ones((4, 6), bool))
    with pytest.raises(TypeError, match="mask must be bool or numeric"):
        layer(x, training=True, mask=tf.fill([4, 5], "a"))

    spec = [tf.TensorSpec([None, None, 3]), tf.TensorSpec([None, None], tf.bool)]
    f = tf.function(lambda x, m: layer(x, training=True, mask=m), input_signature=spec)
    with pytest.raises(tf.errors.InvalidArgumentError, match="mask must have"):
        f(x, np.ones((4, 6), bool))
    assert int(layer.num_updates.numpy()) == 0
    np.testing.assert_array_equal(layer.moving_mean.numpy(), np.zeros(3))
    f(x, np.ones((4, 1), bool))  # broadcasts, as in Keras
    assert int(layer.num_updates.numpy()) == 1


def test_numeric_and_broadcast_masks_match_keras():
    x, mask = _data((6, 5, 4), 70)
    ours, theirs = _pair()
    ours(x), theirs(x)
    for m in (mask.astype("float32"), mask.astype("int32"), mask[:, :1]):
        _close(ours(x, training=True, mask=m), theirs(x, training=True, mask=m))
    for a, b in zip(_stats(ours), _stats(theirs)):
        _close(a, b)


def test_xla_with_a_mask_matches_the_fused_path():
    """jit_compile=True runs the pure-TF reference with the mask."""
    xs = [_data((6, 5, 4), 80 + i) for i in range(4)]
    plain = fused_bn.BatchNormalization(momentum=0.7)
    xla = fused_bn.BatchNormalization(momentum=0.7)
    f_plain = tf.function(lambda x, m: plain(x, training=True, mask=m))
    f_xla = tf.function(lambda x, m: xla(x, training=True, mask=m), jit_compile=True)
    empty = np.zeros((6, 5), bool)
    for x, mask in xs + [(xs[0][0], empty)]:
        _close(f_xla(x, mask), f_plain(x, mask))
    for a, b in zip(_stats(xla), _stats(plain)):
        _close(a, b)
    assert int(xla.num_updates.numpy()) == int(plain.num_updates.numpy()) == 4


def test_stateless_scope_with_a_mask():
    """Keras traces call() in a StatelessScope (e.g. a subclassed model's
    first call): the masked path runs there and only records its updates."""
    layer = fused_bn.BatchNormalization(momentum=0.5)
    x, mask = _data((6, 5, 4), 85)
    layer(x)
    with keras.StatelessScope() as scope:
        y = layer(x, training=True, mask=mask)
    mean, var, _ = _numpy_moments(x, mask, -1)
    _close(y, _numpy_bn(x, mean, var, np.ones(4), np.zeros(4), -1))
    np.testing.assert_array_equal(layer.moving_mean.numpy(), np.zeros(4))
    _close(scope.get_current_value(layer.moving_mean), mean)  # warm-up: t = 0


def test_training_as_a_bool_tensor_with_a_mask():
    ours, theirs = _pair()
    x, mask = _data((6, 5, 4), 90)
    ours(x), theirs(x)
    training = tf.Variable(True)
    f = tf.function(lambda x, m: ours(x, training=training, mask=m))
    for value in (True, False, True):
        training.assign(value)
        _close(f(x, mask), theirs(x, training=value, mask=mask))
    for a, b in zip(_stats(ours), _stats(theirs)):
        _close(a, b)


def test_mixed_precision_with_a_mask():
    x, mask = _data((16, 6, 4), 95)
    keras.mixed_precision.set_dtype_policy("mixed_float16")
    try:
        ours, theirs = _pair()
        inputs = keras.Input((6, 4))
        masked = keras.Input((6,), dtype="bool")
        model = keras.Model([inputs, masked], [ours(inputs, mask=masked),
                                               theirs(inputs, mask=masked)])
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    for _ in range(3):
        y, ref = model([x, mask], training=True)
        assert y.dtype == "float16"
        np.testing.assert_allclose(tf.cast(y, tf.float32), tf.cast(ref, tf.float32),
                                   rtol=2e-3, atol=8e-3)
    for a, b in zip(_stats(ours), _stats(theirs)):
        np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-3)


def test_unmasked_and_inference_calls_stay_one_fused_op():
    layer = fused_bn.BatchNormalization()
    x, mask = _data((6, 5, 4), 99)
    layer(x)

    def op_types(fn):
        graph = tf.function(fn).get_concrete_function().graph
        return {op.type for op in graph.get_operations() if op.type.startswith("FusedBn")}

    assert op_types(lambda: layer(x, training=True)) == {"FusedBn>Forward"}
    assert op_types(lambda: layer(x, training=False, mask=mask)) == {"FusedBn>Forward"}
    # (the moving update is inside a tf.cond branch: at least 2 values)
    assert op_types(lambda: layer(x, training=True, mask=mask)) == {"FusedBn>Normalize"}


def _residual_model(bn, activation, side_masked, fused):
    """Masking -> Dense, plus a residual branch from a second input (masked
    by its own Masking layer, or not), joined by the batch norm's epilogue
    (fused) or by BatchNormalization + Add + ReLU (Keras), then
    GlobalAveragePooling1D: with the mask it receives when both branches
    are masked, else with the inputs' (Add drops a mask that only one of
    its inputs has; fused_bn's layer keeps the inputs'). Returns the model
    and its Dense layers."""
    inputs, residual = keras.Input((7, 3)), keras.Input((7, 3))
    dense = [keras.layers.Dense(6), keras.layers.Dense(6), keras.layers.Dense(1)]
    h = dense[0](keras.layers.Masking(0.0)(inputs))
    s = dense[1](keras.layers.Masking(0.0)(residual) if side_masked else residual)
    if fused:
        y = bn(h, side_input=s)
    else:
        y = keras.layers.Add()([bn(h), s])
        y = keras.layers.ReLU()(y) if activation == "relu" else y
    pool = keras.layers.GlobalAveragePooling1D()
    if side_masked:
        pooled = pool(y)
    else:
        pooled = pool(y, mask=keras.ops.any(keras.ops.not_equal(inputs, 0.0), axis=-1))
    return keras.Model([inputs, residual], dense[2](pooled)), dense


@pytest.mark.parametrize("side_masked", [False, True], ids=["side", "masked_side"])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_side_input_keeps_the_mask_and_matches_keras(activation, side_masked):
    """With side_input, Keras does not pass the inputs' mask to call() (two
    tensor arguments): the layer reads it. Against
    keras.layers.BatchNormalization + Add (+ ReLU): moving statistics of the
    unmasked positions, weights after fit, predictions (the output's mask
    reaches the pooling: both branches padded alike, as in a residual
    block)."""
    x, y = _sequences(seed=54)
    r, _ = _sequences(seed=55)
    if side_masked:
        r[np.all(x == 0, axis=-1)] = 0.0  # the same padding
    else:
        r = r + 0.5
    ours = fused_bn.BatchNormalization(momentum=0.9, warmup=False,
                                       unbiased_variance=False, activation=activation)
    theirs = keras.layers.BatchNormalization(momentum=0.9)
    m1, dense1 = _residual_model(ours, activation, side_masked, True)
    m2, dense2 = _residual_model(theirs, activation, side_masked, False)
    for a, b in zip(dense1, dense2):
        b.set_weights(a.get_weights())
    for m in (m1, m2):
        m.compile(keras.optimizers.SGD(0.05), "mse", jit_compile=False)
        m.fit([x, r], y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    for a, b in zip(_stats(ours), _stats(theirs)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(dense1 + [ours], dense2 + [theirs]):
        for u, v in zip(a.trainable_weights, b.trainable_weights):
            np.testing.assert_allclose(u.numpy(), v.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(m1.predict([x, r], verbose=0), m2.predict([x, r], verbose=0),
                               rtol=1e-5, atol=1e-5)


def test_side_input_uses_the_inputs_mask():
    """Eager calls: the statistics use the mask attached to the inputs (or
    an explicit `mask=`), never side_input's; the output carries the
    inputs' mask whatever side_input carries."""
    from fused_bn.layers import _keras_mask
    x, mask = _data((6, 5, 4), 100)
    s, side_mask = _data((6, 5, 4), 101)
    layer = fused_bn.BatchNormalization(momentum=0.0, warmup=False, unbiased_variance=False)
    layer(x)

    def tagged(t, m):
        t = tf.identity(t)
        if m is not None:
            keras.src.backend.set_keras_mask(t, tf.constant(m))
        return t

    for x_mask, s_mask in [(mask, side_mask), (mask, None), (None, side_mask)]:
        y = layer(tagged(x, x_mask), training=True, side_input=tagged(s, s_mask))
        keep = np.ones(x.shape[:-1], bool) if x_mask is None else x_mask
        _close(layer.moving_mean.numpy(), _numpy_moments(x, keep, -1)[0])
        if x_mask is None:
            assert _keras_mask(y) is None
        else:
            np.testing.assert_array_equal(_keras_mask(y).numpy(), x_mask)
    layer(tagged(x, mask), training=True, mask=side_mask, side_input=tagged(s, None))
    _close(layer.moving_mean.numpy(), _numpy_moments(x, side_mask, -1)[0])
