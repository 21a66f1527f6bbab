"""Pure-TensorFlow batch_norm with the custom op's semantics.

The path used where the custom op cannot run (XLA: a `tf.function` with
`jit_compile=True`): the same arguments and variables as
`fused_bn.batch_norm`, the same warm-up momentum and Bessel correction, a
two-pass variance accumulated in float32 for half inputs, the epilogue
(side input, relu) in float32 before one rounding, and the moving
statistics and counter updated with assigns.
"""
import tensorflow as tf

from .ops import (_check_activation, _check_epsilon, _check_momentum,
                  _check_moving_args, _check_side_input, _check_training,
                  _check_x, _data_format, _stat_dtype)

__all__ = ["batch_norm", "in_xla_context"]


def in_xla_context():
    """Whether ops built now will be compiled by XLA (jit_compile=True)."""
    from tensorflow.python.ops import control_flow_util
    graph = tf.compat.v1.get_default_graph()
    return control_flow_util.GraphOrParentsInXlaContext(graph)


def _read(var, dtype):
    return tf.cast(tf.convert_to_tensor(var), dtype)


def batch_norm(x, training, scale=None, offset=None, moving_mean=None,
               moving_variance=None, *, momentum=0.99, epsilon=1e-3, axis=-1,
               unbiased_variance=True, num_updates=None, side_input=None,
               activation=None, name=None):
    """`fused_bn.batch_norm` in plain TensorFlow ops (see its docstring)."""
    with tf.name_scope(name or "batch_norm_reference"):
        x = _check_x(x)
        data_format = _data_format(x, axis)
        momentum = _check_momentum(momentum)
        epsilon = _check_epsilon(epsilon)
        training_t, training_value = _check_training(training)
        _check_moving_args(moving_mean, moving_variance, num_updates, training_value)
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
            mean = tf.reduce_mean(xu, axes)
            variance = tf.reduce_mean(
                tf.square(xu - per_channel(mean)), axes)
            if moving_mean is not None:
                _update(mean, variance)
            return mean, variance

        def _update(mean, variance):
            m = tf.constant(momentum, u)
            if num_updates is not None:
                t = tf.cast(tf.convert_to_tensor(num_updates), u)
                m = tf.minimum(m, t / (t + 1))
            batch_var = variance
            if unbiased_variance:
                count = tf.cast(tf.size(xu), u) / tf.cast(tf.size(mean), u)
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
