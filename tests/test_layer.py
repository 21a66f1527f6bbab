"""fused_bn.BatchNormalization against keras.layers.BatchNormalization and a
float64 NumPy reference."""
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import fused_bn

RNG = np.random.RandomState(0)


def batches(shape, n, seed=0):
    rng = np.random.RandomState(seed)
    return [(rng.randn(*shape) * rng.uniform(0.5, 3) + rng.uniform(-2, 2))
            .astype("float32") for _ in range(n)]


def stats(layer):
    return layer.moving_mean.numpy(), layer.moving_variance.numpy()


def numpy_moving_stats(xs, axis, momentum, warmup, unbiased, mean0=0.0, var0=1.0):
    """float64 moving statistics after training on each batch of xs."""
    rank = xs[0].ndim
    axes = tuple(a for a in range(rank) if a != axis % rank)
    c = xs[0].shape[axis]
    mean = np.full(c, mean0, np.float64)
    var = np.full(c, var0, np.float64)
    for t, x in enumerate(xs):
        x = x.astype(np.float64)
        n = x.size // c
        bm = x.mean(axis=axes)
        bv = x.var(axis=axes) * (n / (n - 1) if unbiased else 1.0)
        m = min(momentum, t / (t + 1)) if warmup else momentum
        mean = mean * m + bm * (1 - m)
        var = var * m + bv * (1 - m)
    return mean, var


def close(actual, desired, eps=4e-6):
    """Equal within float32 round-off relative to the tensor's scale."""
    desired = np.asarray(desired)
    scale = max(1.0, float(np.abs(desired).max()))
    np.testing.assert_allclose(actual, desired, rtol=eps, atol=eps * scale)


def numpy_bn(x, mean, var, gamma, beta, eps, axis):
    shape = [1] * x.ndim
    shape[axis] = -1
    x = x.astype(np.float64)
    r = lambda v: np.asarray(v, np.float64).reshape(shape)
    return (x - r(mean)) / np.sqrt(r(var) + eps) * r(gamma) + r(beta)


@pytest.mark.parametrize("shape,axis", [
    ((8, 6, 6, 5), -1), ((8, 5, 6, 6), 1), ((16, 7), -1), ((4, 3, 9), 1),
    ((3, 4, 4, 4, 6), -1), ((6, 3, 5, 7), 3)])
def test_parity_with_keras_over_many_steps(shape, axis):
    ours = fused_bn.BatchNormalization(axis=axis, momentum=0.9, warmup=False,
                                       unbiased_variance=False)
    theirs = keras.layers.BatchNormalization(axis=axis, momentum=0.9)
    xs = batches(shape, 40)
    ours.build(shape)
    theirs.build(shape)
    c = shape[axis]
    gamma = RNG.uniform(0.5, 2, c).astype("float32")
    beta = RNG.randn(c).astype("float32")
    for layer in (ours, theirs):
        layer.gamma.assign(gamma)
        layer.beta.assign(beta)
    opt = [keras.optimizers.SGD(0.05), keras.optimizers.SGD(0.05)]
    dy = RNG.randn(*shape).astype("float32")
    for x in xs:
        ys = []
        for layer, o in zip((ours, theirs), opt):
            with tf.GradientTape() as tape:
                y = layer(x, training=True)
                loss = tf.reduce_sum(y * dy)
            grads = tape.gradient(loss, layer.trainable_variables)
            o.apply_gradients(zip(grads, layer.trainable_variables))
            ys.append(y.numpy())
        close(ys[0], ys[1])
    for a, b in zip(stats(ours) + (ours.gamma.numpy(), ours.beta.numpy()),
                    stats(theirs) + (theirs.gamma.numpy(), theirs.beta.numpy())):
        close(a, b)
    x = xs[0] * 1.5
    close(ours(x, training=False), theirs(x, training=False))
    close(ours(x), theirs(x))


@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("axis", [-1, 1])
def test_warmup_matches_float64_reference(unbiased, axis):
    shape = (6, 4, 3, 3)
    layer = fused_bn.BatchNormalization(axis=axis, momentum=0.95,
                                        unbiased_variance=unbiased)
    xs = batches(shape, 30, seed=1)
    for t, x in enumerate(xs):
        layer(x, training=True)
        if t in (0, 1, 4, 29):
            want = numpy_moving_stats(xs[:t + 1], axis, 0.95, True, unbiased)
            for got, ref in zip(stats(layer), want):
                np.testing.assert_allclose(got, ref, rtol=2e-6, atol=1e-6)
    assert layer.num_updates.dtype == "int64"
    assert int(layer.num_updates.numpy()) == 30
    mean, var = numpy_moving_stats(xs, axis, 0.95, True, unbiased)
    x, c = xs[3], shape[axis]
    np.testing.assert_allclose(
        layer(x, training=False),
        numpy_bn(x, mean, var, np.ones(c), np.zeros(c), 1e-3, axis),
        rtol=1e-5, atol=1e-5)


def test_first_update_is_the_batch_statistics():
    layer = fused_bn.BatchNormalization(momentum=0.999)
    x = batches((32, 5), 1)[0]
    layer(x, training=True)
    np.testing.assert_allclose(layer.moving_mean.numpy(),
                               x.astype(np.float64).mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.moving_variance.numpy(),
                               x.astype(np.float64).var(0, ddof=1), rtol=1e-5)


def test_weights_like_keras():
    layer = fused_bn.BatchNormalization()
    layer.build((None, 4))
    ref = keras.layers.BatchNormalization()
    ref.build((None, 4))
    names = [w.name for w in layer.weights]
    assert names == [w.name for w in ref.weights] + ["num_updates"]
    assert [w.name for w in layer.trainable_weights] == ["gamma", "beta"]
    assert [w.name for w in layer.non_trainable_weights] == [
        "moving_mean", "moving_variance", "num_updates"]
    assert layer.num_updates.dtype == "int64"
    no_affine = fused_bn.BatchNormalization(center=False, scale=False)
    no_affine.build((None, 4))
    assert no_affine.gamma is None and no_affine.beta is None
    assert not no_affine.trainable_weights


@pytest.mark.filterwarnings("ignore:The model does not have any trainable")
def test_trainable_false_freezes_like_keras():
    shape = (8, 4, 4, 3)
    ours = fused_bn.BatchNormalization()
    theirs = keras.layers.BatchNormalization()
    x = batches(shape, 1)[0]
    ours(x, training=True)
    theirs(x, training=True)
    ours.trainable = theirs.trainable = False
    before = [w.numpy().copy() for w in ours.weights]
    ys = ours(x * 2, training=True)
    for w, b in zip(ours.weights, before):
        np.testing.assert_array_equal(w.numpy(), b)
    np.testing.assert_allclose(ys, ours(x * 2, training=False), rtol=0, atol=0)
    mean, var = stats(ours)
    np.testing.assert_allclose(
        ys, numpy_bn(x * 2, mean, var, ours.gamma.numpy(), ours.beta.numpy(),
                     1e-3, -1), rtol=1e-5, atol=1e-5)
    assert not ours.trainable_weights
    inputs = keras.Input(shape[1:])
    model = keras.Model(inputs, ours(inputs))
    model.compile("sgd", "mse")
    model.fit(x, x, epochs=2, verbose=0)
    for w, b in zip(ours.weights, before):
        np.testing.assert_array_equal(w.numpy(), b)


def test_training_flag_semantics_in_fit_evaluate_predict():
    shape = (32, 6)
    x = batches(shape, 1)[0]
    layer = fused_bn.BatchNormalization(momentum=0.5)
    model = keras.Sequential([keras.Input(shape[1:]), layer])
    model.compile("sgd", "mse")
    assert not model.jit_compile
    layer(x)
    assert int(layer.num_updates.numpy()) == 0
    np.testing.assert_array_equal(layer.moving_mean.numpy(), np.zeros(6))
    model.fit(x, x, batch_size=8, epochs=1, shuffle=False, verbose=0)
    assert int(layer.num_updates.numpy()) == 4
    want = numpy_moving_stats([x[i:i + 8] for i in range(0, 32, 8)], -1, 0.5,
                              True, True)
    for got, ref in zip(stats(layer), want):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    frozen = [w.numpy().copy() for w in layer.weights]
    model.evaluate(x, x, batch_size=8, verbose=0)
    pred = model.predict(x, batch_size=8, verbose=0)
    for w, b in zip(layer.weights, frozen):
        np.testing.assert_array_equal(w.numpy(), b)
    np.testing.assert_allclose(
        pred, numpy_bn(x, *want, layer.gamma.numpy(), layer.beta.numpy(),
                       1e-3, -1), rtol=1e-5, atol=1e-5)


def test_training_as_a_bool_tensor():
    layer = fused_bn.BatchNormalization(momentum=0.5)
    x = batches((16, 3), 1)[0]
    phase = tf.Variable(False)

    @tf.function
    def step(x):
        return layer(x, training=phase)

    step(x)
    assert int(layer.num_updates.numpy()) == 0
    phase.assign(True)
    y = step(x)
    assert int(layer.num_updates.numpy()) == 1
    xd = x.astype(np.float64)
    np.testing.assert_allclose(y, (xd - xd.mean(0)) / np.sqrt(xd.var(0) + 1e-3),
                               rtol=1e-5, atol=1e-5)


def test_no_assign_ops_in_the_graph():
    layer = fused_bn.BatchNormalization()
    x = tf.TensorSpec((8, 4, 4, 3), tf.float32)
    graph = tf.function(lambda x: layer(x, training=True)).get_concrete_function(x).graph
    types = {op.type for op in graph.get_operations()}
    assert "FusedBn>Forward" in types
    assert not types & {"AssignVariableOp", "AssignAddVariableOp",
                        "AssignSubVariableOp"}
    assert not layer.losses


@pytest.mark.parametrize("policy,dtype", [("mixed_float16", "float16"),
                                          ("mixed_bfloat16", "bfloat16")])
def test_mixed_precision(policy, dtype):
    shape = (16, 5, 5, 4)
    xs = batches(shape, 10, seed=3)
    keras.mixed_precision.set_dtype_policy(policy)
    try:
        ours = fused_bn.BatchNormalization(momentum=0.8, warmup=False,
                                           unbiased_variance=False)
        theirs = keras.layers.BatchNormalization(momentum=0.8)
        inputs = keras.Input(shape[1:])
        model = keras.Model(inputs, [ours(inputs), theirs(inputs)])
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    for w in ours.weights[:4]:
        assert w.dtype == "float32"
    tol = 2e-2 if dtype == "bfloat16" else 2e-3
    for x in xs:
        y, ref = model(x, training=True)
        assert y.dtype == dtype
        np.testing.assert_allclose(tf.cast(y, tf.float32), tf.cast(ref, tf.float32),
                                   rtol=tol, atol=tol * 4)
    for a, b in zip(stats(ours), stats(theirs)):
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol)
    y, ref = model(xs[0], training=False)
    np.testing.assert_allclose(tf.cast(y, tf.float32), tf.cast(ref, tf.float32),
                               rtol=tol, atol=tol * 4)


def _twin_models(seed=0):
    def make(bn):
        keras.utils.set_random_seed(seed)
        inputs = keras.Input((8, 8, 1))
        h = keras.layers.Conv2D(4, 3)(inputs)
        h = bn(h)
        h = keras.layers.ReLU()(h)
        h = keras.layers.GlobalAveragePooling2D()(h)
        return keras.Model(inputs, keras.layers.Dense(3)(h))
    ours = fused_bn.BatchNormalization(momentum=0.9, warmup=False,
                                       unbiased_variance=False)
    theirs = keras.layers.BatchNormalization(momentum=0.9)
    return make(ours), ours, make(theirs), theirs


def _fit_pair(jit_compile, force_xla=False):
    rng = np.random.RandomState(4)
    x = rng.randn(64, 8, 8, 1).astype("float32")
    y = rng.randint(0, 3, 64)
    m1, ours, m2, theirs = _twin_models()
    if force_xla:
        ours.supports_jit = True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for m in (m1, m2):
            m.compile(keras.optimizers.SGD(0.1),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      jit_compile=jit_compile)
    for m in (m1, m2):
        m.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    for a, b in zip(stats(ours), stats(theirs)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(m1.predict(x, verbose=0), m2.predict(x, verbose=0),
                               rtol=1e-4, atol=1e-4)
    return m1, [str(w.message) for w in caught]


@pytest.mark.parametrize("jit_compile", [False, "auto"])
def test_fit_without_xla(jit_compile):
    model, _ = _fit_pair(jit_compile)
    assert model.jit_compile is False


def test_fit_jit_compile_true_falls_back_to_no_xla():
    model, messages = _fit_pair(True)
    assert model.jit_compile is False
    assert any("jit_compile" in m for m in messages)


def test_fit_under_xla_uses_the_reference_path():
    model, _ = _fit_pair(True, force_xla=True)
    assert model.jit_compile is True


def test_jit_compiled_function_uses_same_variables():
    layer = fused_bn.BatchNormalization(momentum=0.7)
    xs = batches((12, 4, 4, 3), 6, seed=5)
    xla = tf.function(lambda x: layer(x, training=True), jit_compile=True)
    plain = tf.function(lambda x: layer(x, training=True))
    for i, x in enumerate(xs):
        (xla if i % 2 else plain)(x)
    assert int(layer.num_updates.numpy()) == 6
    want = numpy_moving_stats(xs, -1, 0.7, True, True)
    for got, ref in zip(stats(layer), want):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    infer = tf.function(lambda x: layer(x, training=False), jit_compile=True)
    np.testing.assert_allclose(infer(xs[0]), layer(xs[0], training=False),
                               rtol=1e-5, atol=1e-5)


def test_get_config_round_trip():
    layer = fused_bn.BatchNormalization(
        axis=1, momentum=0.9, epsilon=1e-4, center=False,
        gamma_initializer="random_normal", gamma_regularizer="l2",
        beta_constraint="non_neg", warmup=False, unbiased_variance=False,
        name="bn")
    config = layer.get_config()
    clone = fused_bn.BatchNormalization.from_config(config)
    assert clone.get_config() == config
    restored = keras.layers.deserialize(keras.layers.serialize(layer))
    assert type(restored) is fused_bn.BatchNormalization
    assert restored.get_config() == config
    assert keras.saving.get_registered_name(fused_bn.BatchNormalization) == \
        "fused_bn>BatchNormalization"


def test_accepts_a_keras_config():
    config = keras.layers.BatchNormalization(momentum=0.8, name="k").get_config()
    layer = fused_bn.BatchNormalization.from_config(config)
    assert layer.momentum == 0.8 and layer.name == "k"


def test_unsupported_options_are_clear_errors():
    with pytest.raises(ValueError, match="renorm"):
        fused_bn.BatchNormalization(renorm=True)
    with pytest.raises(ValueError, match="axis"):
        fused_bn.BatchNormalization(axis=2).build((4, 5, 6, 7))
    with pytest.raises(ValueError, match="rank 2 to 5"):
        fused_bn.BatchNormalization().build((4,))
