"""Functional API: batch_norm and its building blocks, with their gradients.

Layouts: `axis=-1` is channels-last ([N, C], NHWC, NDHWC), `axis=1` is
channels-first (NCHW, NCDHW). Statistics are per channel, over every other
axis. x is float16, bfloat16, float32 or float64; statistics, scale and
offset are float32 (float64 when x is float64).
"""
import math
import numbers

import numpy as np
import tensorflow as tf
from tensorflow.python.framework import op_def_registry

from . import _distribute
from ._loader import ops as _ops

_X_DTYPES = (tf.float16, tf.bfloat16, tf.float32, tf.float64)

__all__ = ["batch_norm", "moments", "normalize", "update_moving_stats"]


def _stat_dtype(x_dtype):
    return tf.float64 if x_dtype == tf.float64 else tf.float32


def _check_x(x):
    x = tf.convert_to_tensor(x)
    if x.dtype not in _X_DTYPES:
        raise TypeError(
            "x must be float16, bfloat16, float32 or float64, got "
            f"{x.dtype.name}")
    rank = x.shape.rank
    if rank is not None and not 2 <= rank <= 5:
        raise ValueError(f"x must have rank 2 to 5, got shape {x.shape}")
    return x


def _data_format(x, axis):
    """'channels_last' or 'channels_first' for an axis of x."""
    rank = x.shape.rank
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"axis must be an int (-1 or 1), got {axis!r}")
    if axis == -1 or (rank is not None and axis == rank - 1):
        return "channels_last"
    if axis == 1 or (rank is not None and axis == 1 - rank):
        return "channels_first"
    raise ValueError(
        "axis must be -1 (channels-last) or 1 (channels-first), got "
        f"{axis} for x of shape {x.shape}")


def _channel_axis(x, data_format):
    return x.shape.rank - 1 if data_format == "channels_last" else 1


def _channels(x, data_format):
    """C as a Python int when static, else a scalar tensor."""
    if x.shape.rank is None:
        shape = tf.shape(x)
        return shape[-1] if data_format == "channels_last" else shape[1]
    c = x.shape[_channel_axis(x, data_format)]
    if c is None:
        return tf.shape(x)[_channel_axis(x, data_format)]
    return c


def _static_count(x, data_format):
    """Values per channel when the shape is fully static, else None."""
    if not x.shape.is_fully_defined():
        return None
    dims = x.shape.as_list()
    del dims[_channel_axis(x, data_format)]
    return int(np.prod(dims))


def _check_param(value, name, dtype, channels):
    """A [C] float parameter (scale, offset, mean, variance) as a tensor."""
    if hasattr(value, "dtype") and tf.as_dtype(value.dtype) != dtype:
        raise TypeError(
            f"{name} must be {dtype.name} (x is "
            f"{'float64' if dtype == tf.float64 else 'a float type'}), got "
            f"{tf.as_dtype(value.dtype).name}")
    t = tf.convert_to_tensor(value, dtype=dtype)
    if t.shape.rank is not None and t.shape.rank != 1:
        raise ValueError(f"{name} must have shape [C], got shape {t.shape}")
    if (isinstance(channels, int) and t.shape.rank == 1
            and t.shape[0] is not None and t.shape[0] != channels):
        raise ValueError(
            f"{name} must have shape [{channels}] (x's channel count), got "
            f"shape {t.shape}")
    return t


def _variable(var, name, dtype, shape):
    """The resource tf.Variable of a tf.Variable or Keras variable, checked.

    Distributed (tf.distribute) variables are returned whole: their handle
    depends on the context (`_distribute.handles`).
    """
    inner = var
    if not isinstance(inner, tf.Variable) and hasattr(inner, "value"):
        inner = inner.value
    if not isinstance(inner, tf.distribute.DistributedValues) and not isinstance(
            getattr(inner, "handle", None), tf.Tensor):
        raise TypeError(
            f"{name} must be a resource tf.Variable (updated in place), got "
            f"{type(var).__name__}")
    if tf.as_dtype(inner.dtype) != dtype:
        raise TypeError(
            f"{name} must be a variable of dtype {dtype.name}, got "
            f"{tf.as_dtype(inner.dtype).name}")
    vshape = inner.shape
    if shape is not None and vshape.rank is not None:
        if vshape.rank != len(shape) or (
                shape and shape[0] is not None and vshape[0] is not None
                and vshape[0] != shape[0]):
            want = "a scalar" if not shape else f"shape [{shape[0]}]"
            raise ValueError(f"{name} must have {want}, got shape {vshape}")
    return inner


def _variable_handle(var, name, dtype, shape):
    """The resource handle the op reads var through, checked (in a replica
    context: the replica's own component)."""
    return _distribute.handles(_variable(var, name, dtype, shape), name,
                               write=False)[0]


def _update_handles(var, name, dtype, shape):
    """The resource handles of every copy of var an in-place update writes."""
    return _distribute.handles(_variable(var, name, dtype, shape), name,
                               write=True)


def _check_momentum(momentum):
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real) \
            or not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(f"momentum must be a number in [0, 1], got {momentum!r}")
    return float(momentum)


_F32_MAX = float(np.finfo(np.float32).max)


def _check_epsilon(epsilon):
    if isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real) \
            or not math.isfinite(epsilon) or not float(epsilon) > 0.0 \
            or not (float(epsilon) <= _F32_MAX and np.float32(epsilon) > 0.0):
        # The op's attr is float32: 1e-50 or 1e39 would reach it as 0 or inf.
        raise ValueError(
            f"epsilon must be a finite number > 0 (as float32), got {epsilon!r}")
    return float(epsilon)


def _check_training(training):
    """(tensor, python_value_or_None) for a bool or scalar bool tensor."""
    if isinstance(training, (bool, np.bool_)):
        return tf.constant(bool(training)), bool(training)
    if training is None or isinstance(training, numbers.Number):
        raise TypeError(f"training must be a bool or a scalar bool tensor, got {training!r}")
    t = tf.convert_to_tensor(training)
    if t.dtype != tf.bool:
        raise TypeError(
            f"training must be a bool or a scalar bool tensor, got a "
            f"{t.dtype.name} tensor")
    if t.shape.rank is not None and t.shape.rank != 0:
        raise ValueError(
            f"training must be a scalar bool, got shape {t.shape}")
    value = tf.get_static_value(t) if not isinstance(training, tf.Variable) else None
    return t, (bool(value) if value is not None else None)


def _check_moving_args(moving_mean, moving_variance, num_updates, training_value):
    """Which of the moving statistics and counter may be given together."""
    if (moving_mean is None) != (moving_variance is None):
        raise ValueError(
            "moving_mean and moving_variance must both be given or both be None")
    if num_updates is not None and moving_mean is None:
        raise ValueError("num_updates needs moving_mean and moving_variance")
    if moving_mean is None and training_value is not True:
        raise ValueError(
            "moving_mean and moving_variance are required unless training "
            "is the Python value True (inference normalizes with them)")


def _check_activation(activation):
    """The ops' activation attr ('none' or 'relu') for None or "relu"."""
    if not (activation is None or (isinstance(activation, str) and activation == "relu")):
        raise ValueError(f"activation must be None or 'relu', got {activation!r}")
    return "relu" if activation == "relu" else "none"


def _check_side_input(side_input, x):
    """The ops' side_input list: [] for None, else [a tensor like x]."""
    if side_input is None:
        return []
    if hasattr(side_input, "dtype") and tf.as_dtype(side_input.dtype) != x.dtype:
        raise TypeError(
            f"side_input must have x's dtype {x.dtype.name}, got "
            f"{tf.as_dtype(side_input.dtype).name}")
    side = tf.convert_to_tensor(side_input, dtype=x.dtype)
    if not side.shape.is_compatible_with(x.shape):
        raise ValueError(
            f"side_input must have x's shape {x.shape}, got shape {side.shape}")
    return [side]


def batch_norm(x, training, scale=None, offset=None, moving_mean=None,
               moving_variance=None, *, momentum=0.99, epsilon=1e-3, axis=-1,
               unbiased_variance=True, num_updates=None, synchronized=False,
               side_input=None, activation=None, name=None):
    """Batch normalization, train and test in one call.

    Args:
      x: [N, ..., C] (axis=-1) or [N, C, ...] (axis=1), rank 2 to 5;
        float16, bfloat16, float32 or float64.
      training: Python bool or scalar bool tensor (placeholder, variable,
        Keras learning phase). When it is False at run time no batch
        moments are computed.
      scale, offset: [C] float32 (float64 for float64 x); None means 1 / 0.
      moving_mean, moving_variance: [C] float32 (float64) tf.Variables.
        Training: updated in place by the op,
        `moving = moving * m + batch * (1 - m)`. Inference: the statistics
        used. Both or neither; required for inference.
      momentum: m in [0, 1].
      epsilon: > 0, added to the variance.
      axis: the channel axis, -1 or 1.
      unbiased_variance: the moving variance gets the Bessel-corrected batch
        variance count / (count - 1) * var (normalization always uses the
        biased one).
      num_updates: optional int64 scalar variable: warm-up counter. When
        given, m = min(momentum, t / (t + 1)) at update t (its value before
        the update), and it is incremented in place.
      synchronized: in a tf.distribute replica context, normalize with the
        statistics of the global batch (all replicas and workers) instead
        of this replica's. Either way the moving statistics are updated
        with the global batch's, identically on every replica (see
        `fused_bn/_distribute.py`). Outside a replica context, or with one
        replica, it changes nothing.
      side_input: optional tensor of x's shape and dtype (e.g. a residual
        branch), added to the normalized x.
      activation: None or "relu", applied after side_input. The epilogue
        `y = activation(bn(x) + side_input)` runs inside the normalize pass
        (accumulation type, one rounding); the statistics are x's alone.
      name: op name.

    Returns:
      y, with x's shape and dtype; differentiable w.r.t. x, scale, offset
      and side_input.
    """
    with tf.name_scope(name or "batch_norm"):
        _distribute.check_strategy()
        x = _check_x(x)
        data_format = _data_format(x, axis)
        u = _stat_dtype(x.dtype)
        c = _channels(x, data_format)
        momentum = _check_momentum(momentum)
        epsilon = _check_epsilon(epsilon)
        training_t, training_value = _check_training(training)
        _check_moving_args(moving_mean, moving_variance, num_updates, training_value)
        if not isinstance(synchronized, (bool, np.bool_)):
            raise TypeError(f"synchronized must be a bool, got {synchronized!r}")
        side = _check_side_input(side_input, x)
        activation = _check_activation(activation)
        cs = c if isinstance(c, int) else None
        if training_value is not False:
            variables = None
            if moving_mean is not None:
                variables = (
                    _variable(moving_mean, "moving_mean", u, [cs]),
                    _variable(moving_variance, "moving_variance", u, [cs]),
                    None if num_updates is None else
                    _variable(num_updates, "num_updates", tf.int64, []))
            if _distribute.replica_context() is not None or (
                    variables and len(_distribute.handles(
                        variables[0], "moving_mean", write=True)) > 1):
                return _distribute.batch_norm(
                    x, True if training_value else training_t,
                    tf.ones([c], u) if scale is None
                    else _check_param(scale, "scale", u, c),
                    tf.zeros([c], u) if offset is None
                    else _check_param(offset, "offset", u, c),
                    variables, u=u, c=c, data_format=data_format,
                    momentum=momentum, epsilon=epsilon,
                    unbiased_variance=bool(unbiased_variance),
                    synchronized=bool(synchronized), side=side,
                    activation=activation)
        count = _static_count(x, data_format)
        if training_value is True and count is not None and count < 2:
            raise ValueError(
                "training needs at least 2 values per channel to compute batch "
                f"statistics, got {count} for x of shape {x.shape}")
        scale = (tf.ones([c], u) if scale is None
                 else _check_param(scale, "scale", u, c))
        offset = (tf.zeros([c], u) if offset is None
                  else _check_param(offset, "offset", u, c))
        moving = []
        if moving_mean is not None:
            moving = [_variable_handle(moving_mean, "moving_mean", u, [cs]),
                      _variable_handle(moving_variance, "moving_variance", u, [cs])]
        counters = []
        if num_updates is not None:
            counters = [_variable_handle(num_updates, "num_updates", tf.int64, [])]
        y, _, _ = _ops.fused_bn_forward(
            x=x, scale=scale, offset=offset,
            moving_mean=moving[:1], moving_variance=moving[1:],
            num_updates=counters, side_input=side, training=training_t,
            epsilon=epsilon, momentum=momentum,
            unbiased_variance=bool(unbiased_variance), data_format=data_format,
            activation=activation)
        return y


def moments(x, axis=-1, name=None):
    """Biased per-channel (mean, variance) of x, float32 (float64 for float64 x).

    Welford/Chan merges in float32 or better, no E[x^2] - E[x]^2 cancellation.
    """
    with tf.name_scope(name or "moments"):
        x = _check_x(x)
        data_format = _data_format(x, axis)
        count = _static_count(x, data_format)
        if count is not None and count < 1:
            raise ValueError(f"moments need at least 1 value per channel, x has shape {x.shape}")
        return _ops.fused_bn_moments(x=x, U=_stat_dtype(x.dtype),
                                     data_format=data_format)


def normalize(x, mean, variance, scale=None, offset=None, epsilon=1e-3,
              axis=-1, name=None, *, side_input=None, activation=None):
    """y = (x - mean) * scale / sqrt(variance + epsilon) + offset per channel.

    With the epilogue, y = activation(that + side_input): side_input has x's
    shape and dtype, activation is None or "relu" (as in batch_norm).
    Differentiable w.r.t. x, mean, variance, scale, offset and side_input.
    """
    with tf.name_scope(name or "normalize"):
        x = _check_x(x)
        data_format = _data_format(x, axis)
        u = _stat_dtype(x.dtype)
        c = _channels(x, data_format)
        epsilon = _check_epsilon(epsilon)
        mean = _check_param(mean, "mean", u, c)
        variance = _check_param(variance, "variance", u, c)
        scale = tf.ones([c], u) if scale is None else _check_param(scale, "scale", u, c)
        offset = tf.zeros([c], u) if offset is None else _check_param(offset, "offset", u, c)
        side = _check_side_input(side_input, x)
        activation = _check_activation(activation)
        return _ops.fused_bn_normalize(x=x, mean=mean, variance=variance,
                                       scale=scale, offset=offset,
                                       side_input=side, epsilon=epsilon,
                                       data_format=data_format,
                                       activation=activation)


def update_moving_stats(moving_mean, moving_variance, mean, variance, count,
                        momentum=0.99, *, unbiased_variance=True,
                        num_updates=None, name=None):
    """In-place moving-average update of the moving statistics.

    `count` is the number of values each channel's statistics were reduced
    over (for the Bessel factor count / (count - 1)). Returns the op (None
    in eager mode).

    In a tf.distribute replica context each replica updates its own
    component with the statistics it is given: give statistics that are
    equal on every replica (e.g. all-reduced), or the components diverge.
    In a cross-replica context every local component is updated.
    """
    with tf.name_scope(name or "update_moving_stats"):
        _distribute.check_strategy()
        momentum = _check_momentum(momentum)
        mean = tf.convert_to_tensor(mean)
        u = mean.dtype
        if u not in (tf.float32, tf.float64):
            raise TypeError(f"mean must be float32 or float64, got {u.name}")
        c = mean.shape[0] if mean.shape.rank == 1 else None
        mean = _check_param(mean, "mean", u, c)
        variance = _check_param(variance, "variance", u, c)
        if isinstance(count, bool) or (
                not isinstance(count, numbers.Integral)
                and not (hasattr(count, "dtype") and tf.as_dtype(count.dtype).is_integer)):
            raise TypeError(f"count must be an integer (values per channel), got {count!r}")
        if isinstance(count, numbers.Integral) and count < (2 if unbiased_variance else 1):
            raise ValueError(
                f"count must be >= {2 if unbiased_variance else 1}, got {count}")
        count = tf.cast(count, tf.int64)
        means = _update_handles(moving_mean, "moving_mean", u, [c])
        variances = _update_handles(moving_variance, "moving_variance", u, [c])
        counters = [[]] * len(means)
        if num_updates is not None:
            counters = [[h] for h in _update_handles(
                num_updates, "num_updates", tf.int64, [])]
        if not len(means) == len(variances) == len(counters):
            raise ValueError(
                "moving_mean, moving_variance and num_updates must be created "
                "under the same strategy")
        updates = [
            _ops.fused_bn_update_moving_stats(
                moving_mean=mh, moving_variance=vh, num_updates=ch, mean=mean,
                variance=variance, count=count, momentum=momentum,
                unbiased_variance=bool(unbiased_variance))
            for mh, vh, ch in zip(means, variances, counters)]
        return updates[0] if len(updates) == 1 else tf.group(*updates)


def _broadcast_stat(v, x, data_format):
    """Reshapes a [C] vector to broadcast against x (data_format: str, or
    bytes as graph-mode `op.get_attr` gives it)."""
    if data_format in ("channels_last", b"channels_last"):
        return v
    return tf.reshape(v, tf.concat([[-1], tf.ones([tf.rank(x) - 2], tf.int32)], 0))


# The epilogue y = activation(bn(x) + side_input) of Forward and Normalize,
# in their gradients: ForwardGrad masks dy by y > 0 when the activation was
# relu (given y) and returns the masked dy as dside when a side input was
# given; without relu, d(side_input) is dy itself.
def _relu(op):
    return op.get_attr("activation") in (b"relu", "relu")


def _epilogue_grad_args(op):
    """ForwardGrad's y and num_dside for the gradient of op."""
    relu = _relu(op)
    return {"y": [op.outputs[0]] if relu else [],
            "num_dside": op.get_attr("num_side") if relu else 0}


def _side_input_grad(op, dy, dside):
    """[d(side_input)] for op's side_input list ([] without one)."""
    if op.get_attr("num_side") == 0:
        return []
    return list(dside) if _relu(op) else [dy]


@tf.RegisterGradient("FusedBn>Forward")
def _forward_grad(op, dy, dmean, dinv_std):
    x, scale = op.inputs[0], op.inputs[1]
    saved_mean, saved_inv_std = op.outputs[1], op.outputs[2]
    training = _named_input(op, "training")
    data_format = _format_attr(op)
    dx, dscale, doffset, dside = _ops.fused_bn_forward_grad(
        dy=dy, x=x, scale=scale, saved_mean=saved_mean,
        saved_inv_std=saved_inv_std, training=training,
        data_format=data_format, **_epilogue_grad_args(op))
    dx = _add_saved_stats_grad(dx, x, saved_mean, saved_inv_std, training,
                               dmean, dinv_std, data_format)
    grads = [dx, dscale, doffset] + [None] * (len(op.inputs) - 3)
    for index, grad in _variable_grads(op, saved_inv_std, dscale, doffset).items():
        grads[index] = grad
    for index, grad in zip(_input_indices(op, "side_input"),
                           _side_input_grad(op, dy, dside)):
        grads[index] = grad
    return grads


@tf.RegisterGradient("FusedBn>Normalize")
def _normalize_grad(op, dy):
    x, mean, variance, scale = op.inputs[:4]
    inv_std = tf.math.rsqrt(variance + tf.cast(op.get_attr("epsilon"), variance.dtype))
    dx, dscale, doffset, dside = _ops.fused_bn_forward_grad(
        dy=dy, x=x, scale=scale, saved_mean=mean, saved_inv_std=inv_std,
        training=tf.constant(False), data_format=op.get_attr("data_format"),
        **_epilogue_grad_args(op))
    # y = scale * (x - mean) * inv_std + offset; dscale = sum(g * x_hat),
    # doffset = sum(g) for the masked dy g.
    dmean = -scale * inv_std * doffset
    dvariance = -0.5 * scale * inv_std * inv_std * dscale
    return [dx, dmean, dvariance, dscale, doffset] + _side_input_grad(op, dy, dside)


@tf.RegisterGradient("FusedBn>Moments")
def _moments_grad(op, dmean, dvariance):
    x = op.inputs[0]
    mean = op.outputs[0]
    data_format = _format_attr(op)
    u = mean.dtype
    count = tf.cast(tf.size(x, out_type=tf.int64), u) / tf.cast(tf.size(mean), u)
    xu = tf.cast(x, u)
    dx = tf.zeros_like(xu)
    if dmean is not None:
        dx += _broadcast_stat(dmean / count, x, data_format)
    if dvariance is not None:
        centered = xu - _broadcast_stat(mean, x, data_format)
        dx += _broadcast_stat(2.0 * dvariance / count, x, data_format) * centered
    return [tf.cast(dx, x.dtype)]


tf.no_gradient("FusedBn>UpdateMovingStats")


# Second order. The backward op's own gradient (below) treats saved_mean and
# saved_inv_std as inputs in their own right; in training mode they are x's
# batch statistics, so the Forward gradient sends their cotangents back to x
# (_add_saved_stats_grad). Both are plain TF ops, differentiable again.

def _reduce_axes(x, data_format):
    """The axes of x that are reduced per channel (all but the channel axis)."""
    if x.shape.rank is None:
        rank = tf.rank(x)
        if data_format == "channels_last":
            return tf.range(rank - 1)
        return tf.concat([[0], tf.range(2, rank)], 0)
    channel_axis = _channel_axis(x, data_format)
    return [a for a in range(x.shape.rank) if a != channel_axis]


def _count(x, stat):
    """Values per channel of x, as a scalar of stat's dtype."""
    return (tf.cast(tf.size(x, out_type=tf.int64), stat.dtype)
            / tf.cast(tf.size(stat), stat.dtype))


def _is_zero(t):
    """Whether a cotangent is None or all zeros.

    TF hands a gradient function zeros (an eager tensor, or a Const, Fill or
    ZerosLike in a graph) for outputs nothing was differentiated through:
    the saved statistics in every first-order gradient. Skipping them keeps
    the first-order backward one fused op.
    """
    if t is None:
        return True
    if tf.is_symbolic_tensor(t):
        if t.op.type == "ZerosLike":
            return True
        if t.op.type == "Fill":
            t = t.op.inputs[1]  # the fill value: no array of the full shape
        value = tf.get_static_value(t)
        return value is not None and not np.any(value)
    return not np.any(t.numpy())


def _batch_terms(training, *terms, mode=True):
    """terms where training == mode, else zeros (training: a bool tensor)."""
    value = tf.get_static_value(training)
    if value is not None:
        return terms if bool(value) == mode else tuple(tf.zeros_like(t) for t in terms)
    if mode:
        return tuple(tf.where(training, t, tf.zeros_like(t)) for t in terms)
    return tuple(tf.where(training, tf.zeros_like(t), t) for t in terms)


def _add_saved_stats_grad(dx, x, mean, inv_std, training, dmean, dinv_std,
                          data_format):
    """dx plus the gradient through Forward's saved_mean and saved_inv_std.

    Training: mean = E[x] and inv_std = (Var[x] + eps)^-1/2 over each channel,
    so d/dx = dmean / count - dinv_std * inv_std^3 * (x - mean) / count.
    Inference: they are the moving statistics, constant in x.
    """
    inference = tf.get_static_value(training) is not None and \
        not tf.get_static_value(training)
    if inference or (_is_zero(dmean) and _is_zero(dinv_std)):
        return dx
    u = mean.dtype
    dmean = tf.zeros_like(mean) if dmean is None else dmean
    dinv_std = tf.zeros_like(inv_std) if dinv_std is None else dinv_std
    count = _count(x, mean)
    a, b = _batch_terms(training, dmean / count,
                        -dinv_std * inv_std * inv_std * inv_std / count)
    centered = tf.cast(x, u) - _broadcast_stat(mean, x, data_format)
    extra = (_broadcast_stat(a, x, data_format)
             + centered * _broadcast_stat(b, x, data_format))
    return tf.cast(tf.cast(dx, u) + extra, dx.dtype)


def _format_attr(op):
    """op's data_format attr as str (eager gradients see it as bytes)."""
    data_format = op.get_attr("data_format")
    return data_format.decode() if isinstance(data_format, bytes) else data_format


def _input_indices(op, name):
    """The positions in op.inputs of op's input (or input list) `name`."""
    index = 0
    for arg in op_def_registry.get(op.type).input_arg:
        if arg.number_attr:
            n = op.get_attr(arg.number_attr)
        elif arg.type_list_attr:
            n = len(op.get_attr(arg.type_list_attr))
        else:
            n = 1
        if arg.name == name:
            return range(index, index + n)
        index += n
    raise ValueError(f"{op.type} has no input {name!r}")


def _named_input(op, name):
    """The single input `name` of op."""
    return op.inputs[_input_indices(op, name)[0]]


def _variable_grads(op, inv_std, dscale, doffset):
    """{input index: gradient} for Forward's resource inputs.

    The moving statistics are what inference normalizes with:
    y = scale * (x - mean) * inv_std + offset, inv_std = (var + eps)^-1/2, so
    d mean = -scale * inv_std * doffset and d var = -scale * inv_std^2 *
    dscale / 2; training does not read them (zero). The counter gets an
    int64 zero: forward mode (tf.autodiff.ForwardAccumulator) transposes this
    gradient and needs a tensor for every resource input.
    """
    if not op.get_attr("num_moving") and not op.get_attr("num_counters"):
        return {}
    scale = op.inputs[1]
    dmean, dvariance = _batch_terms(
        _named_input(op, "training"), -scale * inv_std * doffset,
        -0.5 * scale * inv_std * inv_std * dscale, mode=False)
    # Identity passes a None cotangent on as None, which the forward-mode
    # transposition feeds here (resource inputs have no tangent).
    grads = {i: tf.identity(dmean) for i in _input_indices(op, "moving_mean")}
    grads.update({i: tf.identity(dvariance)
                  for i in _input_indices(op, "moving_variance")})
    grads.update({i: tf.zeros([], tf.int64)
                  for i in _input_indices(op, "num_updates")})
    return grads


def _backward_vjp(dy, x, scale, mean, inv_std, training, data_format,
                  g_dx, g_dscale, g_doffset):
    """Vector-Jacobian product of the batch-norm backward.

    The backward (ForwardGrad), with x_hat = (x - mean) * inv_std, k = scale
    * inv_std and count values per channel:
      doffset = sum(dy), dscale = sum(dy * x_hat),
      dx = k * (dy - doffset / count - x_hat * dscale / count)  (training),
      dx = k * dy                                              (inference).
    Given the cotangents g_dx (x's shape), g_dscale, g_doffset ([C]; None or
    zeros when unused), returns the cotangents of (dy, x, scale, mean,
    inv_std), mean and inv_std taken as independent inputs:
      d_dy = k * g_dx + c2 * x_hat + b,  d_x = inv_std * (c1 * g_dx + c2 * dy)
    with per-channel c1, c2, b; the per-channel cotangents come from five
    channel sums. dy's and x's are in x's dtype, computed in scale's dtype
    (float32 for half x).
    """
    g_dx, g_dscale, g_doffset = (None if _is_zero(g) else g
                                 for g in (g_dx, g_dscale, g_doffset))
    if g_dx is None and g_dscale is None:
        if g_doffset is None:
            return None, None, None, None, None
        d_dy = tf.zeros_like(dy) + tf.cast(
            _broadcast_stat(g_doffset, x, data_format), dy.dtype)
        return d_dy, None, None, None, None
    u = scale.dtype
    axes = _reduce_axes(x, data_format)

    def per_channel(v):
        return _broadcast_stat(v, x, data_format)

    dyu = tf.cast(dy, u)
    centered = tf.cast(x, u) - per_channel(mean)
    count = _count(x, mean)
    k = scale * inv_std
    zeros = tf.zeros_like(scale)
    g_dscale = zeros if g_dscale is None else g_dscale
    g_doffset = zeros if g_doffset is None else g_doffset
    sum_dy = tf.reduce_sum(dyu, axes)
    sum_dy_c = tf.reduce_sum(dyu * centered, axes)
    # Training: dx subtracts the means of dy and dy * x_hat (zero otherwise).
    mean_dy, mean_dy_x_hat = _batch_terms(
        training, sum_dy / count, inv_std * sum_dy_c / count)
    if g_dx is None:
        sum_g = sum_g_c = d_k = c1 = zeros
        c2, b = g_dscale, g_doffset
    else:
        gx = tf.cast(g_dx, u)
        sum_g = tf.reduce_sum(gx, axes)
        sum_g_c = tf.reduce_sum(gx * centered, axes)
        mean_g, mean_g_x_hat = _batch_terms(
            training, sum_g / count, inv_std * sum_g_c / count)
        # dL/dk = sum(g_dx * dx) / k
        d_k = tf.reduce_sum(gx * dyu, axes) - count * (
            mean_g * mean_dy + mean_g_x_hat * mean_dy_x_hat)
        c1 = -k * mean_dy_x_hat
        c2 = g_dscale - k * mean_g_x_hat
        b = g_doffset - k * mean_g
    d_dy = per_channel(c2 * inv_std) * centered + per_channel(b)
    d_x = per_channel(c2 * inv_std) * dyu
    if g_dx is not None:
        d_dy += per_channel(k) * gx
        d_x += per_channel(c1 * inv_std) * gx
    # d_x_hat = c1 * g_dx + c2 * dy, summed (and times x - mean) per channel.
    d_mean = -inv_std * (c1 * sum_g + c2 * sum_dy)
    d_inv_std = scale * d_k + c1 * sum_g_c + c2 * sum_dy_c
    d_scale = inv_std * d_k
    return (tf.cast(d_dy, dy.dtype), tf.cast(d_x, x.dtype), d_scale, d_mean,
            d_inv_std)


@tf.RegisterGradient("FusedBn>ForwardGrad")
def _forward_grad_grad(op, g_dx, g_dscale, g_doffset, *g_dside):
    """With the relu epilogue (y given) the backward is the plain one applied
    to g = dy * [y > 0], and dside = g: the mask is piecewise constant in y
    (y gets no gradient), so dy's cotangent is the plain one, plus dside's,
    masked."""
    dy, x, scale, mean, inv_std = op.inputs[:5]
    ys = [op.inputs[i] for i in _input_indices(op, "y")]
    keep = tf.cast(ys[0] > 0, dy.dtype) if ys else None
    grads = list(_backward_vjp(
        dy if keep is None else dy * keep, x, scale, mean, inv_std,
        _named_input(op, "training"), _format_attr(op), g_dx, g_dscale,
        g_doffset))
    d_dy = grads[0]
    if g_dside and not _is_zero(g_dside[0]):
        g_side = tf.cast(g_dside[0], dy.dtype)
        d_dy = g_side if d_dy is None else d_dy + g_side
    if keep is not None and d_dy is not None:
        d_dy = d_dy * keep
    grads[0] = d_dy
    return grads + [None] * (len(op.inputs) - 5)
