"""Serving without fused_bn: `strip` rebuilds a Keras model with stock layers.

    served = fused_bn.export.strip(model)            # no fused_bn layers left
    served.export("/tmp/served")                      # SavedModel, plain TF
    folded = fused_bn.export.strip(model, fold=True)  # BN folded into convs

The stripped model holds copies of the weights: the original model, its
layers and its variables are left as they are.
"""
import inspect

import keras
import numpy as np
import tensorflow as tf
from keras.src.saving import serialization_lib

from .layers import BatchNormalization

__all__ = ["strip"]

# Layers a following batch norm can be folded into: the output channel is the
# kernel's last axis (depthwise: the last two, [in, multiplier], flattened).
_FOLDABLE = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D,
             keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D,
             keras.layers.Dense)
_DEPTHWISE = (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)


def strip(model, fold=False):
    """A copy of `model` without fused_bn layers, for serving without fused_bn.

    Each `fused_bn.BatchNormalization` becomes a
    `keras.layers.BatchNormalization` with its weights, `axis`, `epsilon`,
    `momentum`, `center`/`scale`, dtype policy, `trainable` and name (the
    warm-up counter is dropped). A layer with `activation="relu"` is followed
    by a `keras.layers.ReLU`; a call `bn(x, side_input=s)` becomes
    `ReLU(Add([BN(x), s]))` (or `Add` alone without the activation). Every
    other layer is a copy with the same weights. The result predicts what
    `model(x, training=False)` does, and has only stock Keras layers, so
    `.export()`, `.save()` and the TFLite converter work without fused_bn.

    Args:
      model: a built Keras model: Sequential, Functional (nested models
        included), or subclassed. A subclassed model (and a custom layer that
        owns fused_bn layers) is rebuilt from its `get_config()`, then the
        fused_bn layers it keeps as attributes (directly, or in lists, tuples
        and dicts) are swapped for stock ones; in there, a batch norm called
        with `side_input` cannot be swapped and is an error.
      fold: also fold each batch norm whose only input is the output of a
        `Conv1D`, `Conv2D`, `Conv3D`, `DepthwiseConv1D`, `DepthwiseConv2D` or
        `Dense` (with no activation, called once, its output used by that
        batch norm alone, on the batch norm's channel axis) into that layer's
        kernel and bias (a bias is added where there was none). Other batch
        norms, and all of them in subclassed models, stay stock layers.

    Returns:
      A new built `keras.Model` (Sequential for a Sequential model).

    Raises:
      TypeError: `model` is not a Keras model or `fold` not a bool.
      ValueError: `model` is not built (or, subclassed, never called), or a
        layer cannot be stripped: it calls a fused_bn op itself, cannot be
        rebuilt from its config, or (subclassed model, custom layer) calls a
        fused_bn layer with `side_input`. The message names the layer.
    """
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"model must be a keras.Model, got {type(model).__name__}")
    if not isinstance(fold, bool):
        raise TypeError(f"fold must be a bool, got {fold!r}")
    if not model.built:
        raise ValueError(
            f"model {model.name!r} must be built (give it an Input or call "
            "it once) before it can be stripped")
    stripper = _Stripper(fold)
    stripped = stripper.model(model)
    stripper.copy_weights()
    _check_no_fused_ops(stripped, _input_specs(model))
    return stripped


def _is_graph_model(layer):
    return isinstance(layer, (keras.Sequential, keras.src.models.Functional))


def _has_fused_bn(layer):
    return any(isinstance(sub, BatchNormalization)
               for sub in layer._flatten_layers(include_self=True))


def _epilogue_activation(bn):
    """None or "relu": the activation a fused_bn layer applies after the BN.

    Read from the layer's config; a layer without the argument has none.
    """
    activation = bn.get_config().get("activation")
    if activation in (None, "linear"):
        return None
    if activation == "relu":
        return "relu"
    raise ValueError(
        f"layer {bn.name!r}: activation {activation!r} has no stock "
        "equivalent in strip (expected None or 'relu')")


def _bn_weights(bn):
    """(gamma, beta, mean, variance) of a fused_bn layer as float64 arrays."""
    mean = np.asarray(bn.moving_mean.numpy(), np.float64)
    gamma = (np.asarray(bn.gamma.numpy(), np.float64) if bn.gamma is not None
             else np.ones_like(mean))
    beta = (np.asarray(bn.beta.numpy(), np.float64) if bn.beta is not None
            else np.zeros_like(mean))
    return gamma, beta, mean, np.asarray(bn.moving_variance.numpy(), np.float64)


def _stock_bn(bn):
    """An unbuilt keras.layers.BatchNormalization configured like `bn`."""
    config = bn.get_config()
    keep = ("name", "trainable", "dtype", "axis", "momentum", "epsilon",
            "center", "scale", "beta_initializer", "gamma_initializer",
            "moving_mean_initializer", "moving_variance_initializer",
            "beta_regularizer", "gamma_regularizer", "beta_constraint",
            "gamma_constraint")
    return keras.layers.BatchNormalization.from_config(
        {k: config[k] for k in keep if k in config})


def _assign_bn(stock, bn):
    """Copies gamma, beta and the moving statistics of `bn` into `stock`."""
    if not (bn.built and stock.built):
        return  # never called: nothing to copy, nothing used
    for name in ("gamma", "beta", "moving_mean", "moving_variance"):
        source = getattr(bn, name)
        if source is not None:
            getattr(stock, name).assign(source.numpy())


def _fold_into(layer, bn):
    """[kernel, bias] of `layer` with the inference batch norm `bn` folded in.

    y = gamma * (layer(x) - mean) / sqrt(variance + epsilon) + beta, per
    output channel: kernel * a and (bias - mean) * a + beta, with
    a = gamma / sqrt(variance + epsilon), computed in float64.
    """
    gamma, beta, mean, variance = _bn_weights(bn)
    a = gamma / np.sqrt(variance + bn.epsilon)
    weights = layer.get_weights()
    kernel = np.asarray(weights[0], np.float64)
    bias = (np.asarray(weights[1], np.float64) if len(weights) > 1
            else np.zeros_like(mean))
    if isinstance(layer, _DEPTHWISE):
        kernel = kernel * a.reshape(kernel.shape[-2:])
    else:
        kernel = kernel * a
    dtype = weights[0].dtype
    return [kernel.astype(dtype), ((bias - mean) * a + beta).astype(dtype)]


def _foldable(layer, bn, rank):
    """Whether `bn` (input rank `rank`) can be folded into `layer`'s output."""
    if type(layer) not in _FOLDABLE:
        return False
    config = layer.get_config()
    if config.get("activation") not in (None, "linear"):
        return False
    if getattr(layer, "lora_enabled", False) or getattr(
            layer, "quantization_mode", None) is not None:
        return False
    if len(layer.get_weights()) != (2 if config.get("use_bias") else 1):
        return False
    if isinstance(layer, keras.layers.Dense):
        channel_axis = rank - 1
    else:
        channel_axis = (rank - 1 if config.get("data_format", "channels_last")
                        == "channels_last" else 1)
    return bn.axis % rank == channel_axis


class _Stripper:
    """Rebuilds models and layers; weight copies run once everything is built."""

    def __init__(self, fold):
        self.fold = fold
        self.clones = {}       # id(original layer) -> its replacement
        self.copies = []       # callables, run by copy_weights()
        self.names = set()     # layer names in use

    def copy_weights(self):
        for copy in self.copies:
            copy()

    def _unique(self, name):
        candidate, i = name, 1
        while candidate in self.names:
            candidate, i = f"{name}_{i}", i + 1
        self.names.add(candidate)
        return candidate

    # Models -----------------------------------------------------------------

    def model(self, model):
        self.names.update(l.name for l in model._flatten_layers())
        if isinstance(model, keras.Sequential):
            return self._sequential(model)
        if isinstance(model, keras.src.models.Functional):
            return self._functional(model)
        return self._subclassed(model)

    def _sequential(self, model):
        if not model.inputs:
            raise ValueError(
                f"Sequential model {model.name!r} must be built with a known "
                "input (keras.Input or a first call) before it can be stripped")
        originals = model.layers
        folded = set()
        if self.fold:
            for source, bn in zip(originals, originals[1:]):
                if (isinstance(bn, BatchNormalization)
                        and self._single_use(source, bn)
                        and _foldable(source, bn, bn.input_spec.ndim)):
                    folded.add(id(bn))
        layers = []
        for i, layer in enumerate(originals):
            if i + 1 < len(originals) and id(originals[i + 1]) in folded:
                continue  # the next batch norm is folded into it
            if id(layer) in folded:
                layers.append(self._folded(originals[i - 1], layer))
            elif isinstance(layer, BatchNormalization):
                layers.append(self._bn(layer))
            else:
                layers.append(self.layer(layer))
            if (isinstance(layer, BatchNormalization)
                    and _epilogue_activation(layer) == "relu"):
                layers.append(keras.layers.ReLU(
                    name=self._unique(f"{layer.name}_relu"),
                    dtype=layer.dtype_policy))
        x = model.inputs[0]
        inputs = keras.Input(batch_shape=x.shape, dtype=x.dtype, name=x.name)
        return keras.Sequential([inputs] + layers, name=model.name,
                                trainable=model.trainable)

    def _functional(self, model):
        fold_into = self._fold_plan(model) if self.fold else {}
        folded = {id(bn) for bn, _ in fold_into.values()}

        def call(layer, *args, **kwargs):
            if isinstance(layer, BatchNormalization):
                return self._call_bn(layer, id(layer) in folded, args, kwargs)
            if id(layer) in fold_into:
                bn = fold_into[id(layer)][0]
                if id(layer) not in self.clones:
                    self.clones[id(layer)] = self._folded(layer, bn)
                return self.clones[id(layer)](*args, **kwargs)
            return self.layer(layer, args, kwargs)(*args, **kwargs)

        inputs = keras.tree.map_structure(
            lambda x: keras.Input(batch_shape=x.shape, dtype=x.dtype,
                                  name=x.name), model.input)
        outputs = model._run_through_graph(
            inputs, operation_fn=lambda layer: layer, call_fn=call)
        return keras.Model(inputs, outputs, name=model.name,
                           trainable=model.trainable)

    def _fold_plan(self, model):
        """{id(conv): (bn, conv)} for each foldable pair of a Functional."""
        plan = {}
        outputs = {id(t) for t in keras.tree.flatten(model.outputs)}
        for bn in model.layers:
            if not isinstance(bn, BatchNormalization) \
                    or len(bn._inbound_nodes) != 1:
                continue
            node = bn._inbound_nodes[0]
            x = node.arguments.args[0] if node.arguments.args else None
            history = getattr(x, "_keras_history", None)
            if (history is None or id(x) in outputs
                    or sum(t is x for t in node.input_tensors) != 1):
                continue  # e.g. also the side input: it must stay unfolded
            source = history[0]
            if (self._single_use(source, bn)
                    and _foldable(source, bn, len(x.shape))):
                plan[id(source)] = (bn, source)
        return plan

    @staticmethod
    def _single_use(source, bn):
        """`source` is called once and its output feeds `bn` alone."""
        return (len(source._inbound_nodes) == 1
                and len(source._outbound_nodes) == 1
                and source._outbound_nodes[0].operation is bn)

    def _subclassed(self, model):
        args = [keras.KerasTensor(spec.shape, spec.dtype.name)
                for spec in _input_specs(model)]
        clone = self._rebuilt(model, args, {})
        clone(*args)  # builds the stock layers swapped in
        return clone

    # Layers -----------------------------------------------------------------

    def layer(self, layer, args=None, kwargs=None):
        """The replacement for a layer that is not a fused_bn layer.

        `args`, `kwargs`: what it is called with (KerasTensors), needed to
        rebuild a custom layer owning fused_bn layers; by default those of
        its first call in the original model.
        """
        if id(layer) in self.clones:
            return self.clones[id(layer)]
        if _is_graph_model(layer):
            clone = self.model(layer)
        elif _has_fused_bn(layer):
            if args is None:
                arguments = layer._inbound_nodes[0].arguments
                args, kwargs = arguments.args, arguments.kwargs
            clone = self._rebuilt(layer, args, kwargs)
        else:
            clone = self._from_config(layer)
            self.copies.append(lambda: clone.set_weights(layer.get_weights()))
        self.clones[id(layer)] = clone
        return clone

    def _bn(self, bn):
        """The stock batch norm standing in for a fused_bn layer (shared)."""
        if id(bn) not in self.clones:
            stock = _stock_bn(bn)
            self.clones[id(bn)] = stock
            self.copies.append(lambda: _assign_bn(stock, bn))
        return self.clones[id(bn)]

    def _folded(self, layer, bn):
        """A copy of conv/dense `layer` with `bn` folded into it."""
        config = layer.get_config()
        config["use_bias"] = True
        clone = type(layer).from_config(config)
        self.copies.append(lambda: clone.set_weights(_fold_into(layer, bn)))
        return clone

    def _call_bn(self, bn, folded, args, kwargs):
        """The stock layers for one call of a fused_bn layer in a graph."""
        bound = inspect.signature(bn.call).bind(*args, **kwargs).arguments
        y = bound["inputs"] if folded else self._bn(bn)(bound["inputs"])
        side_input = bound.get("side_input")
        if side_input is not None:
            y = keras.layers.Add(name=self._unique(f"{bn.name}_add"),
                                 dtype=bn.dtype_policy)([y, side_input])
        if _epilogue_activation(bn) == "relu":
            y = keras.layers.ReLU(name=self._unique(f"{bn.name}_relu"),
                                  dtype=bn.dtype_policy)(y)
        return y

    def _from_config(self, layer):
        # The config comes from this process's own layer, not from a file:
        # a Lambda's Python function may be rebuilt from it.
        try:
            with serialization_lib.SafeModeScope(False):
                return type(layer).from_config(layer.get_config())
        except Exception as e:
            raise ValueError(
                f"layer {layer.name!r} ({type(layer).__name__}) cannot be "
                f"rebuilt from its get_config() for strip: {e}. Give it a "
                "get_config() that returns its constructor arguments") from e

    def _rebuilt(self, layer, args, kwargs):
        """A copy of a custom layer or subclassed model, fused_bn swapped out.

        The copy comes from `get_config()` and is built by tracing it on
        `args`, `kwargs` (recording which of its fused_bn layers get a side
        input); then its sublayers are matched to the original's in tracking
        order and each fused_bn layer is swapped for a stock one. The caller
        calls the copy again, which builds the stock layers.
        """
        clone = self._from_config(layer)
        with_side_input = _trace(clone, args, kwargs)
        self._swap_tree(layer, clone, with_side_input)
        return clone

    def _swap_tree(self, original, clone, with_side_input):
        self.copies.append(lambda: _copy_own_variables(original, clone))
        subs, clone_subs = list(original._layers), list(clone._layers)
        if [type(s) for s in subs] != [type(s) for s in clone_subs]:
            raise ValueError(
                f"layer {original.name!r} ({type(original).__name__}) cannot "
                "be stripped: rebuilt from its get_config() and called, it "
                "does not have the same sublayers "
                f"({[type(s).__name__ for s in subs]} != "
                f"{[type(s).__name__ for s in clone_subs]})")
        for sub, clone_sub in zip(subs, clone_subs):
            if isinstance(sub, BatchNormalization):
                if id(clone_sub) in with_side_input:
                    raise ValueError(
                        f"layer {original.name!r} calls its fused_bn layer "
                        f"{sub.name!r} with side_input: strip swaps it for a "
                        "stock batch norm, which takes no side input. Build "
                        "the model as a Functional model (strip adds an Add "
                        "layer there), or add the side input in call()")
                _swap(clone, clone_sub, self._swapped_bn(sub))
            elif _is_graph_model(sub) and _has_fused_bn(sub):
                _swap(clone, clone_sub, self.layer(sub))
            elif _has_fused_bn(sub):
                self._swap_tree(sub, clone_sub, with_side_input)
            else:
                self.copies.append(
                    lambda c=clone_sub, s=sub: c.set_weights(s.get_weights()))

    def _swapped_bn(self, bn):
        """One stock layer doing what a fused_bn layer does (side input aside)."""
        stock = self._bn(bn)
        if _epilogue_activation(bn) != "relu":
            return stock
        key = ("relu", id(bn))
        if key not in self.clones:
            self.clones[key] = keras.Sequential(
                [stock, keras.layers.ReLU(dtype=bn.dtype_policy)],
                name=self._unique(f"{bn.name}_relu"))
        return self.clones[key]


def _trace(layer, args, kwargs):
    """Builds `layer` by a symbolic call; ids of its fused_bn layers that got
    a side input (traced again if building created more of them)."""
    with_side_input, hooked = set(), []

    def recording(bn, call):
        def call_and_record(*a, **k):
            bound = inspect.signature(call).bind(*a, **k).arguments
            if bound.get("side_input") is not None:
                with_side_input.add(id(bn))
            return call(*a, **k)
        return call_and_record

    try:
        while True:
            new = [l for l in layer._flatten_layers()
                   if isinstance(l, BatchNormalization)
                   and not any(l is h for h in hooked)]
            if hooked and not new:
                return with_side_input
            for bn in new:
                bn.call = recording(bn, bn.call)
                hooked.append(bn)
            keras.src.backend.compute_output_spec(layer, *args, **kwargs)
    finally:
        for bn in hooked:
            del bn.call


def _copy_own_variables(original, clone):
    """Copies the variables a layer owns itself (not its sublayers')."""
    def own(layer):
        return layer._trainable_variables + layer._non_trainable_variables
    for source, target in zip(own(original), own(clone)):
        target.assign(source)


# Attributes of Keras and TensorFlow bookkeeping that hold sublayers.
_INTERNAL = ("_layers", "_tracker", "_self_")


def _swap(parent, old, new):
    """Replaces sublayer `old` of `parent` by `new` wherever parent holds it."""
    holders = {}
    for name, value in vars(parent).items():
        if not name.startswith(_INTERNAL):
            replaced = _replace_in(value, old, new)
            if replaced is not None:
                holders[name] = replaced
    if holders:
        # Keeps the sublayer order (and so the weight order) of `parent`.
        parent._tracker.replace_tracked_value("layers", old, new)
    for name, replaced in holders.items():
        setattr(parent, name, replaced)
    if not holders:
        raise ValueError(
            f"layer {parent.name!r}: its fused_bn sublayer {old.name!r} is "
            "not held in an attribute (or a list, tuple or dict attribute), "
            "so strip cannot swap it")


def _replace_in(value, old, new):
    """`value` with `old` replaced by `new` (lists in place), or None."""
    if value is old:
        return new
    if isinstance(value, list):
        hits = [i for i, v in enumerate(value) if v is old]
        for i in hits:
            value[i] = new
        return value if hits else None
    if isinstance(value, tuple) and any(v is old for v in value):
        return type(value)(new if v is old else v for v in value)
    if isinstance(value, dict):
        keys = [k for k, v in value.items() if v is old]
        for k in keys:
            value[k] = new
        return value if keys else None
    return None


def _input_specs(model):
    """The model's positional inputs as tf.TensorSpecs (batch size free)."""
    if isinstance(model, keras.Sequential):
        x = model.inputs[0]
        return [tf.TensorSpec(x.shape, x.dtype)]
    if _is_graph_model(model):
        return [keras.tree.map_structure(
            lambda x: tf.TensorSpec(x.shape, x.dtype), model.input)]
    shapes = getattr(model, "_build_shapes_dict", None)
    if not shapes:
        raise ValueError(
            f"model {model.name!r} has not been called: call it once on an "
            "input before stripping it (strip rebuilds it with that input "
            "shape)")
    return [tf.TensorSpec((None,) + tuple(s)[1:], model.input_dtype)
            for s in shapes.values()]


def _check_no_fused_ops(model, specs):
    """Traces `model` in inference mode; a fused_bn op left is an error."""
    fn = tf.function(lambda *xs: model(*xs, training=False))
    graph_def = fn.get_concrete_function(*specs).graph.as_graph_def()
    nodes = list(graph_def.node)
    for function in graph_def.library.function:
        nodes.extend(function.node_def)
    fused = sorted({n.name for n in nodes if n.op.startswith("FusedBn>")})
    if not fused:
        return
    names = {l.name for l in model._flatten_layers()}
    layers = []
    for node in fused:
        for part in node.split("/"):
            base = part.rsplit("_", 1)[0] if part.rsplit("_", 1)[-1].isdigit() else part
            hit = part if part in names else base if base in names else None
            if hit is not None and hit != model.name:
                layers.append(hit)
    raise ValueError(
        "strip cannot remove the fused_bn ops that layer(s) "
        f"{sorted(set(layers)) or '?'} call directly (ops: {fused}): only "
        "fused_bn.BatchNormalization layers are replaced. Give the layer a "
        "stock equivalent (e.g. keras.layers.BatchNormalization) before "
        "stripping")
