"""fused_bn.export.strip: Keras models without fused_bn layers, same outputs.

The reference is the original model's inference output (`training=False`,
the fused op); the stripped model runs stock Keras layers only. Artefacts
that must load without fused_bn are in test_export_artifacts.py.
"""
import inspect

import keras
import numpy as np
import pytest
import tensorflow as tf

import fused_bn
from fused_bn.export import strip

HAS_EPILOGUE = "activation" in inspect.signature(
    fused_bn.BatchNormalization.__init__).parameters
needs_epilogue = pytest.mark.skipif(not HAS_EPILOGUE, reason="needs the epilogue")


def randomize_bn(model, seed=0):
    """Non-trivial gamma, beta and moving statistics for every fused BN."""
    rng = np.random.RandomState(seed)
    for layer in model._flatten_layers():
        if isinstance(layer, fused_bn.BatchNormalization) and layer.built:
            c = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.randn(c))
            layer.moving_variance.assign(rng.uniform(0.3, 3.0, c))
            if layer.gamma is not None:
                layer.gamma.assign(rng.uniform(0.5, 2.0, c))
            if layer.beta is not None:
                layer.beta.assign(rng.randn(c))
    return model


def cnn(data_format="channels_last"):
    """A CNN with a residual branch, a depthwise conv and a dense BN.

    Channels-first uses depthwise convs and pooling only: TF's CPU Conv2D
    has no NCHW kernel (Keras' DepthwiseConv2D transposes); its projection
    BN follows a pooling layer and is not folded.
    """
    keras.utils.set_random_seed(0)
    first = data_format == "channels_first"
    axis = 1 if first else -1
    inputs = keras.Input((3, 8, 8) if first else (8, 8, 3))
    if first:
        h = keras.layers.DepthwiseConv2D(3, padding="same", depth_multiplier=4,
                                         use_bias=False, data_format=data_format)(inputs)
    else:
        h = keras.layers.Conv2D(12, 3, padding="same", use_bias=False)(inputs)
    h = fused_bn.BatchNormalization(axis=axis, name="bn_stem")(h)
    h = keras.layers.ReLU()(h)
    r = keras.layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2,
                                     data_format=data_format)(h)
    r = fused_bn.BatchNormalization(axis=axis, name="bn_dw")(r)
    r = keras.layers.ReLU()(r)
    if first:
        r = keras.layers.AveragePooling2D(1, data_format=data_format)(r)
        r = keras.layers.Reshape((12, 2, 8, 8))(r)
        r = keras.layers.AveragePooling3D((2, 1, 1), data_format="channels_last")(r)
        r = keras.layers.Reshape((12, 8, 8))(r)
    else:
        r = keras.layers.Conv2D(12, 1)(r)
    r = fused_bn.BatchNormalization(axis=axis, name="bn_project")(r)
    h = keras.layers.ReLU()(keras.layers.Add()([h, r]))
    h = keras.layers.GlobalAveragePooling2D(data_format=data_format)(h)
    h = keras.layers.Dense(5, use_bias=False)(h)
    h = fused_bn.BatchNormalization(name="bn_dense")(h)
    outputs = keras.layers.Dense(3)(h)
    return randomize_bn(keras.Model(inputs, outputs, name="cnn"))


def images(shape, seed=1, n=6):
    return (np.random.RandomState(seed).randn(n, *shape) * 2 + 0.5).astype("float32")


def infer(model, x):
    """model(x, training=False) in a tf.function (NCHW convs need graph mode)."""
    return tf.function(lambda t: model(t, training=False))(x).numpy()


def layer_types(model):
    return [type(layer) for layer in model._flatten_layers(include_self=False)]


def snapshot(model):
    return ([w.numpy().copy() for w in model.weights],
            [(layer, len(layer._inbound_nodes))
             for layer in model._flatten_layers()])


def assert_untouched(model, before):
    weights, layers = before
    assert len(model.weights) == len(weights)
    for w, value in zip(model.weights, weights):
        np.testing.assert_array_equal(w.numpy(), value)
    assert [(layer, len(layer._inbound_nodes))
            for layer in model._flatten_layers()] == layers


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_cnn_strip_and_fold(data_format):
    model = cnn(data_format)
    x = images(model.input_shape[1:])
    want = infer(model, x)
    before = snapshot(model)

    stripped = strip(model)
    assert fused_bn.BatchNormalization not in layer_types(stripped)
    assert layer_types(stripped).count(keras.layers.BatchNormalization) == 4
    np.testing.assert_allclose(infer(stripped, x), want, rtol=1e-5, atol=1e-5)
    for name in ("bn_stem", "bn_dw", "bn_project", "bn_dense"):
        bn, stock = model.get_layer(name), stripped.get_layer(name)
        rank = len(bn.input.shape)
        assert (stock.axis % rank, stock.epsilon, stock.momentum) == (
            bn.axis % rank, bn.epsilon, bn.momentum)
        for attr in ("gamma", "beta", "moving_mean", "moving_variance"):
            np.testing.assert_array_equal(getattr(stock, attr).numpy(),
                                          getattr(bn, attr).numpy())

    folded = strip(model, fold=True)
    types = layer_types(folded)
    # bn_stem and bn_dw follow a conv; bn_project follows a conv (channels-
    # last) or a Lambda (channels-first); bn_dense follows a Dense.
    assert types.count(keras.layers.BatchNormalization) == (
        0 if data_format == "channels_last" else 1)
    assert fused_bn.BatchNormalization not in types
    np.testing.assert_allclose(infer(folded, x), want, rtol=1e-4, atol=1e-4)
    assert_untouched(model, before)


def test_fold_adds_the_bias_and_folds_the_depthwise_multiplier_layout():
    inputs = keras.Input((5, 5, 3))
    h = keras.layers.DepthwiseConv2D(3, depth_multiplier=4, use_bias=False,
                                     name="dw")(inputs)
    outputs = fused_bn.BatchNormalization(name="bn")(h)
    model = randomize_bn(keras.Model(inputs, outputs), seed=3)
    folded = strip(model, fold=True)
    assert [type(l) for l in folded.layers] == [keras.layers.InputLayer,
                                                keras.layers.DepthwiseConv2D]
    kernel, bias = folded.get_layer("dw").get_weights()
    assert kernel.shape == (3, 3, 3, 4) and bias.shape == (12,)
    bn = model.get_layer("bn")
    a = bn.gamma.numpy() / np.sqrt(bn.moving_variance.numpy() + bn.epsilon)
    np.testing.assert_allclose(
        kernel, model.get_layer("dw").get_weights()[0] * a.reshape(3, 4), rtol=1e-6)
    x = images((5, 5, 3))
    np.testing.assert_allclose(folded(x), model(x), rtol=1e-4, atol=1e-4)


def test_what_is_not_folded_stays_a_stock_batch_norm():
    inputs = keras.Input((6, 4))
    relu_conv = keras.layers.Conv1D(4, 3, activation="relu", name="relu_conv")(inputs)
    a = fused_bn.BatchNormalization(name="after_activation")(relu_conv)
    conv = keras.layers.Conv1D(4, 3, name="conv_used_twice")(inputs)
    b = fused_bn.BatchNormalization(name="after_shared_output")(conv)
    c = keras.layers.Add()([a, b, conv])
    shared = fused_bn.BatchNormalization(name="called_twice")
    d = keras.layers.Dense(4, use_bias=False, name="dense")(c)
    outputs = keras.layers.Add()([shared(d), shared(c)])
    model = randomize_bn(keras.Model(inputs, outputs), seed=4)
    folded = strip(model, fold=True)
    assert {l.name for l in folded.layers
            if isinstance(l, keras.layers.BatchNormalization)} == {
                "after_activation", "after_shared_output", "called_twice"}
    assert not folded.get_layer("dense").use_bias
    x = images((6, 4))
    np.testing.assert_allclose(folded(x), model(x), rtol=1e-5, atol=1e-5)


def test_sequential_and_nested_models():
    inner = keras.Sequential([keras.Input((4,)), keras.layers.Dense(6),
                              fused_bn.BatchNormalization(name="inner_bn")],
                             name="inner")
    inputs = keras.Input((4,))
    h = inner(keras.layers.Lambda(lambda t: 2.0 * t)(inputs))
    h = keras.layers.Dense(3)(h)
    model = randomize_bn(keras.Model(inputs, fused_bn.BatchNormalization()(h)))
    x = images((4,))
    for fold in (False, True):
        stripped = strip(model, fold=fold)
        assert fused_bn.BatchNormalization not in layer_types(stripped)
        assert isinstance(stripped.get_layer("inner"), keras.Sequential)
        np.testing.assert_allclose(stripped(x), model(x), rtol=1e-4, atol=1e-4)
    seq = randomize_bn(keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(5), fused_bn.BatchNormalization(),
         keras.layers.Dense(2, use_bias=False), fused_bn.BatchNormalization()]))
    folded = strip(seq, fold=True)
    assert isinstance(folded, keras.Sequential)
    assert [type(l) for l in folded.layers] == [keras.layers.Dense] * 2
    np.testing.assert_allclose(folded(x), seq(x), rtol=1e-4, atol=1e-4)


@keras.saving.register_keras_serializable(package="test_export")
class Block(keras.layers.Layer):
    """A custom layer owning fused_bn layers (an attribute and a list)."""

    def __init__(self, filters, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.conv = keras.layers.Conv2D(filters, 3, padding="same")
        self.bn = fused_bn.BatchNormalization()
        self.head = [keras.layers.Dense(filters), fused_bn.BatchNormalization()]

    def build(self, input_shape):
        self.gain = self.add_weight(shape=(), initializer="ones")

    def call(self, x, training=None):
        h = self.bn(self.conv(x), training=training)
        return x + self.gain * self.head[1](self.head[0](h), training=training)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters}


class Net(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.stem = keras.Sequential([keras.layers.Dense(3),
                                      fused_bn.BatchNormalization()])
        self.block = Block(3)
        self.dense = keras.layers.Dense(4)
        self.bn = fused_bn.BatchNormalization(axis=1)

    def call(self, x, training=None):
        h = self.block(self.stem(x, training=training), training=training)
        h = keras.ops.mean(h, axis=(1, 2))
        return self.bn(self.dense(h), training=training)


def test_subclassed_model_and_custom_layer():
    x = images((5, 5, 3))
    model = Net()
    model(x)
    randomize_bn(model)
    model.block.gain.assign(1.7)
    before = snapshot(model)
    stripped = strip(model)
    assert type(stripped) is Net
    assert fused_bn.BatchNormalization not in layer_types(stripped)
    assert len(stripped.weights) == len(model.weights) - 4  # the counters
    np.testing.assert_allclose(stripped(x), model(x), rtol=1e-5, atol=1e-5)
    assert_untouched(model, before)

    inputs = keras.Input((5, 5, 3))
    h = Block(3, name="block")(inputs)
    functional = keras.Model(inputs, BuildsItsBatchNorm(name="late")(h))
    randomize_bn(functional, seed=2)
    functional.get_layer("block").gain.assign(0.4)
    stripped = strip(functional, fold=True)
    assert fused_bn.BatchNormalization not in layer_types(stripped)
    np.testing.assert_allclose(stripped(x), functional(x), rtol=1e-5, atol=1e-5)


class DirectOp(keras.layers.Layer):
    def build(self, input_shape):
        self.mean = self.add_weight(shape=input_shape[-1:], initializer="zeros",
                                    trainable=False)
        self.variance = self.add_weight(shape=input_shape[-1:], initializer="ones",
                                        trainable=False)

    def call(self, x):
        return fused_bn.batch_norm(x, False, moving_mean=self.mean,
                                   moving_variance=self.variance)


@keras.saving.register_keras_serializable(package="test_export")
class BuildsItsBatchNorm(keras.layers.Layer):
    def build(self, input_shape):
        self.bn = fused_bn.BatchNormalization()

    def call(self, x):
        return self.bn(x)


class Opaque:
    pass


class NeedsAnObject(keras.Model):
    def __init__(self, thing, **kwargs):
        super().__init__(**kwargs)
        self.thing = thing
        self.bn = fused_bn.BatchNormalization()

    def call(self, x):
        return self.bn(x)


def test_errors_name_the_layer():
    inputs = keras.Input((4, 3))
    direct = keras.Model(inputs, keras.layers.Dense(2)(DirectOp(name="direct_bn")(inputs)))
    with pytest.raises(ValueError, match="'direct_bn'.*call directly"):
        strip(direct)
    opaque = NeedsAnObject(Opaque(), name="opaque")
    opaque(np.zeros((2, 3), "float32"))
    with pytest.raises(ValueError, match="'opaque'.*cannot be rebuilt from its get_config"):
        strip(opaque)
    with pytest.raises(ValueError, match="must be built"):
        strip(keras.Sequential([keras.layers.Dense(2), fused_bn.BatchNormalization()]))
    with pytest.raises(TypeError, match="model must be a keras.Model"):
        strip(fused_bn.BatchNormalization())
    with pytest.raises(TypeError, match="fold must be a bool"):
        strip(direct, fold="yes")


@needs_epilogue
def test_epilogue_becomes_add_and_relu():
    inputs = keras.Input((6, 6, 4))
    shortcut = keras.layers.Conv2D(4, 1, name="shortcut")(inputs)
    h = keras.layers.Conv2D(4, 3, padding="same", use_bias=False, name="conv")(inputs)
    h = fused_bn.BatchNormalization(activation="relu", name="bn_add_relu")(
        h, side_input=shortcut)
    h = fused_bn.BatchNormalization(activation="relu", name="bn_relu")(h)
    model = randomize_bn(keras.Model(inputs, h))
    x = images((6, 6, 4))
    want = infer(model, x)
    for fold, bns in ((False, 2), (True, 1)):
        stripped = strip(model, fold=fold)
        types = layer_types(stripped)
        assert types.count(keras.layers.BatchNormalization) == bns
        assert types.count(keras.layers.Add) == 1
        assert types.count(keras.layers.ReLU) == 2
        np.testing.assert_allclose(infer(stripped, x), want, rtol=1e-4, atol=1e-4)
    seq = randomize_bn(keras.Sequential([
        keras.Input((4,)), keras.layers.Dense(3),
        fused_bn.BatchNormalization(activation="relu")]))
    stripped = strip(seq)
    assert [type(l) for l in stripped.layers] == [
        keras.layers.Dense, keras.layers.BatchNormalization, keras.layers.ReLU]
    np.testing.assert_allclose(stripped(x[:, 0, 0]), seq(x[:, 0, 0]), rtol=1e-5, atol=1e-5)


class SideInputNet(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.bn = fused_bn.BatchNormalization(activation="relu")

    def call(self, x):
        return self.bn(x, side_input=x)


class ReluNet(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.bn = fused_bn.BatchNormalization(activation="relu")

    def call(self, x):
        return self.bn(x)


@needs_epilogue
def test_epilogue_in_subclassed_models():
    x = images((3,))
    relu = ReluNet()
    relu(x)
    randomize_bn(relu)
    stripped = strip(relu)
    assert keras.layers.ReLU in layer_types(stripped)
    np.testing.assert_allclose(stripped(x), relu(x), rtol=1e-5, atol=1e-5)
    side = SideInputNet(name="side")
    side(x)
    with pytest.raises(ValueError, match="'side'.*side_input"):
        strip(side)
