"""Pure-TensorFlow batch_norm with the custom op's semantics.

The path used where the custom op cannot run (XLA: a `tf.function` with
`jit_compile=True`): the same arguments and variables as
`fused_bn.batch_norm`, the same warm-up momentum and Bessel correction, a
two-pass variance accumulated in float32 for half inputs, the epilogue
(side input, relu) in float32 before one rounding, and the moving
statistics and counter updated with assigns.
"""
import tensorflow as tf

from . import _distribute
from .ops import (_broadcast_stat, _check_activation, _check_epsilon,
                  _check_momentum, _check_moving_args, _check_side_input,
                  _check_training, _check_x, _data_format, _stat_dtype)

__all__ = ["batch_norm", "check_mask", "in_xla_context", "masked_moments"]


def in_xla_context():
    """Whether ops built now will be compiled by XLA (jit_compile=True)."""
    from tensorflow.python.ops import control_flow_util
    graph = tf.compat.v1.get_default_graph()
    return control_flow_util.GraphOrParentsInXlaContext(graph)


def _read(var, dtype):
    return tf.cast(tf.convert_to_tensor(var), dtype)


def batch_norm(x, training, scale=None, offset=None, moving_mean=None,
               moving_variance=None, *, momentum=0.99, epsilon=1e-3, axis=-1,
               unbiased_variance=True, num_updates=None, synchronized=False,
               side_input=None, activation=None, name=None, mask=None):
    """`fused_bn.batch_norm` in plain TensorFlow ops (see its docstring).

    mask: optional, as `fused_bn.BatchNormalization` takes it (see
    `masked_moments`): training uses the statistics of the unmasked
    positions; a batch with fewer than 2 of them in a channel leaves the
    moving statistics and counter unchanged. Inference ignores it.

    It has no tf.distribute path: training under XLA in a replica context
    with more than one replica raises (compile without XLA there).
    """
    with tf.name_scope(name or "batch_norm_reference"):
        _distribute.check_strategy()
        x = _check_x(x)
        data_format = _data_format(x, axis)
        if mask is not None:
            mask = check_mask(mask, x)
        momentum = _check_momentum(momentum)
        epsilon = _check_epsilon(epsilon)
        training_t, training_value = _check_training(training)
        _check_moving_args(moving_mean, moving_variance, num_updates, training_value)
        if (training_value is not False and in_xla_context()
                and _distribute.replica_context() is not None):
            raise ValueError(
                "fused_bn under XLA (jit_compile=True) does not train in a "
                "tf.distribute replica context with more than one replica "
                f"(synchronized={synchronized!r}); compile the step without "
                "XLA")
        side = _check_side_input(side_input, x)
        relu = _check_activation(activation) == "relu"
        u = _stat_dtype(x.dtype)
        rank = x.shape.rank
        channel_axis = rank - 1 if data_format == "channels_last" else 1
        axes = [a for a in range(rank) if a != channel_axis]
        stat_shape = [1] * rank
        stat_shape[channel_axis] = -1
        xu = tf.cast(x, u)

        def per_channel(v):
            return tf.reshape(v, stat_shape)

        def batch_stats():
            if mask is None:
                mean = tf.reduce_mean(xu, axes)
                variance = tf.reduce_mean(
                    tf.square(xu - per_channel(mean)), axes)
                count = tf.cast(tf.size(xu), u) / tf.cast(tf.size(mean), u)
                if moving_mean is not None:
                    _update(mean, variance, count)
                return mean, variance
            mean, variance, count = masked_moments(x, mask, axis)
            count = tf.cast(count, u)
            if moving_mean is not None:
                tf.cond(tf.reduce_min(count) >= 2,
                        lambda: _update(mean, variance, count), lambda: None)
            return mean, variance

        def _update(mean, variance, count):
            m = tf.constant(momentum, u)
            if num_updates is not None:
                t = tf.cast(tf.convert_to_tensor(num_updates), u)
                m = tf.minimum(m, t / (t + 1))
            batch_var = variance
            if unbiased_variance:
                batch_var = variance * count / (count - 1)
            new_mean = _read(moving_mean, u) * m + tf.stop_gradient(mean) * (1 - m)
            new_var = (_read(moving_variance, u) * m
                       + tf.stop_gradient(batch_var) * (1 - m))
            moving_mean.assign(new_mean)
            moving_variance.assign(new_var)
            if num_updates is not None:
                num_updates.assign_add(tf.constant(1, tf.int64))

        def moving_stats():
            return (tf.stop_gradient(_read(moving_mean, u)),
                    tf.stop_gradient(_read(moving_variance, u)))

        if training_value is True:
            mean, variance = batch_stats()
        elif training_value is False:
            mean, variance = moving_stats()
        else:
            mean, variance = tf.cond(training_t, batch_stats, moving_stats)
        inv_std = tf.math.rsqrt(variance + tf.constant(epsilon, u))
        if scale is not None:
            inv_std = inv_std * _read(scale, u)
        y = (xu - per_channel(mean)) * per_channel(inv_std)
        if offset is not None:
            y = y + per_channel(_read(offset, u))
        if side:  # the epilogue, in u like the op's, rounded once
            y = y + tf.cast(side[0], u)
        if relu:
            y = tf.nn.relu(y)
        return tf.cast(y, x.dtype)


def check_mask(mask, x):
    """A Keras batch-norm mask, checked: bool, broadcast to x's shape without
    its last axis.

    As `keras.layers.BatchNormalization` takes it: rank(x) - 1 dimensions,
    each x's or 1; nonzero means "counts". It is broadcast along x's last
    axis, which is the channel axis for channels-last x.
    """
    mask = tf.convert_to_tensor(mask)
    if not (mask.dtype.is_bool or mask.dtype.is_integer or mask.dtype.is_floating):
        raise TypeError(f"mask must be bool or numeric, got {mask.dtype.name}")
    rank = x.shape.rank
    if rank is None:
        raise ValueError("a mask needs inputs of known rank")
    want = x.shape[:-1]
    message = (f"mask must have the inputs' shape without the last axis, {want} "
               "(or 1 in a dimension, to broadcast)")
    if mask.shape.rank != rank - 1 or any(
            m is not None and d is not None and m not in (1, d)
            for m, d in zip(mask.shape, want)):
        raise ValueError(f"{message}, got shape {mask.shape}")
    if mask.dtype != tf.bool:
        mask = tf.not_equal(mask, tf.zeros([], mask.dtype))
    target = tf.shape(x)[:-1]
    if not (mask.shape.is_fully_defined() and want.is_fully_defined()):
        shape = tf.shape(mask)
        fits = tf.reduce_all(tf.logical_or(tf.equal(shape, 1),
                                           tf.equal(shape, target)))
        check = tf.debugging.Assert(fits, [message + ", got shape", shape])
        with tf.control_dependencies([check]):
            mask = tf.identity(mask)
    return tf.broadcast_to(mask, target)


def masked_moments(x, mask, axis=-1):
    """Per-channel mean, biased variance and count over the unmasked positions.

    Args:
      x: as for `fused_bn.batch_norm` (rank known).
      mask: x's shape without the last axis (see `check_mask`), broadcast
        along x's last axis, as Keras' batch norm does: for channels-last x
        every channel counts the same positions; for channels-first x the
        channel axis is in the mask and the counts are per channel.
      axis: the channel axis, -1 or 1.

    Returns:
      mean and variance ([C], float32; float64 for float64 x) and count
      ([C] int64, the unmasked values per channel). Two passes in that
      precision (the mean, then the mean squared deviation from it: no
      E[x^2] - E[x]^2 cancellation). A channel with no unmasked value gets
      mean 0 and variance 0, as in Keras.
    """
    x = _check_x(x)
    data_format = _data_format(x, axis)
    mask = check_mask(mask, x)
    u = _stat_dtype(x.dtype)
    rank = x.shape.rank
    channel_axis = rank - 1 if data_format == "channels_last" else 1
    axes = [a for a in range(rank) if a != channel_axis]
    count = tf.reduce_sum(tf.cast(mask, tf.int64),
                          [a for a in range(rank - 1) if a != channel_axis])
    if data_format == "channels_first":
        count *= tf.cast(tf.shape(x)[-1], tf.int64)
    count = tf.broadcast_to(count, tf.shape(x)[channel_axis:channel_axis + 1])
    n = tf.cast(tf.maximum(count, 1), u)
    keep = mask[..., None]
    xu = tf.cast(x, u)
    zero = tf.zeros([], u)
    mean = tf.reduce_sum(tf.where(keep, xu, zero), axes) / n
    centered = tf.where(keep, xu - _broadcast_stat(mean, x, data_format), zero)
    variance = tf.reduce_sum(tf.square(centered), axes) / n
    return mean, variance, count
