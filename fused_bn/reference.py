"""Pure-TensorFlow batch_norm with the custom op's semantics.

The path used where the custom op cannot run (XLA: a `tf.function` with
`jit_compile=True`): the same arguments and variables as
`fused_bn.batch_norm`, the same warm-up momentum and Bessel correction, a
two-pass variance accumulated in float32 for half inputs, the epilogue
(side input, relu) in float32 before one rounding, and the moving
statistics and counter updated with assigns.

It also mirrors `csrc/kernels/bn_math.h`, the per-channel math of the CPU
and CUDA kernels: the functions below `ema_momentum` carry that header's
names, arguments and formula order, computed in float64 as the header's
are (`chan_merge` in its inputs' dtype, the header's accumulation type), so
that this path updates the moving statistics and normalizes as the kernels
do. Change one, change the other.
"""
import collections

import tensorflow as tf

from . import _distribute
from .ops import (_broadcast_stat, _check_activation, _check_epsilon,
                  _check_momentum, _check_moving_args, _check_side_input,
                  _check_training, _check_x, _data_format, _stat_dtype)

__all__ = ["batch_norm", "check_mask", "in_xla_context", "masked_moments",
           "ema_momentum", "bessel_factor", "ema", "batch_variance", "Moments",
           "chan_merge", "pooled_m2_term", "inv_std", "sum_dy_xhat",
           "grad_coefs", "bf16_round_bits", "bf16_bits"]


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
                count = (tf.size(xu, out_type=tf.int64)
                         // tf.maximum(tf.size(mean, out_type=tf.int64), 1))
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
            if moving_mean.shape.rank == 1 and moving_mean.shape[0] == 0:
                return  # no channels: nothing changes, the counter included
            t = None if num_updates is None else tf.convert_to_tensor(num_updates)
            # momentum and epsilon as the op's float32 attributes hold them.
            m = ema_momentum(tf.constant(momentum, tf.float32), num_updates is not None, t)
            bessel = bessel_factor(unbiased_variance, count)
            batch_var = batch_variance(tf.stop_gradient(variance), bessel)
            moving_mean.assign(tf.cast(
                ema(_read(moving_mean, u), tf.stop_gradient(mean), m), u))
            moving_variance.assign(tf.cast(
                ema(_read(moving_variance, u), batch_var, m), u))
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
        # The kernels' factor: scale * inv_std in float64, rounded once.
        factor = inv_std(variance, tf.constant(epsilon, tf.float32))
        if scale is not None:
            factor = tf.cast(_read(scale, u), tf.float64) * factor
        y = (xu - per_channel(mean)) * per_channel(tf.cast(factor, u))
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


# ---------------------------------------------------------------- bn_math.h
# The mirror of csrc/kernels/bn_math.h (see the module docstring): same
# names, same formula order, float64 (IEEE double, as the header's).

def _f64(v):
    if isinstance(v, (int, float)):  # exact: not through a float32 constant
        return tf.constant(v, tf.float64)
    return tf.cast(v, tf.float64)


def ema_momentum(momentum, warmup, t):
    """The momentum of moving-average update number t (the counter's value
    before it): momentum, or with warm-up (Python bool) min(momentum,
    t / (t + 1)), so that the first updates average all batches so far."""
    momentum = _f64(momentum)
    if not warmup:
        return momentum
    td = _f64(t)
    w = td / (td + 1.0)
    return tf.where(w < momentum, w, momentum)


def bessel_factor(unbiased, count):
    """count / (count - 1) (unbiased, a Python bool, and count > 1), else 1;
    count may be a [C] vector."""
    c = _f64(count)
    if not unbiased:
        return tf.ones_like(c)
    return tf.where(c > 1.0, c / (c - 1.0), tf.ones_like(c))


def ema(moving, batch, m):
    """One moving-average step: moving * m + batch * (1 - m)."""
    m = _f64(m)
    return _f64(moving) * m + _f64(batch) * (1.0 - m)


def batch_variance(var, bessel):
    """The moving variance's batch term: the biased variance times the
    Bessel factor."""
    return _f64(var) * _f64(bessel)


Moments = collections.namedtuple("Moments", ["n", "mean", "m2"])
Moments.__doc__ = """Count, mean and M2 (sum of squared deviations from
the mean) of a set of values, tensors of one dtype (the accumulation type)."""


def chan_merge(a, b):
    """Chan et al.'s merge of the Moments of two disjoint sets, in their
    dtype; an empty set (n == 0) leaves the other unchanged. A single value
    x is Moments(1, x, 0): merged into a it is Welford's update."""
    n = a.n + b.n
    fb = b.n / n
    d = b.mean - a.mean
    merged = Moments(n, a.mean + d * fb, a.m2 + b.m2 + d * d * (a.n * fb))
    zero = tf.zeros_like(a.n)
    return Moments(*(tf.where(b.n == zero, x, tf.where(a.n == zero, y, z))
                     for x, y, z in zip(a, b, merged)))


def pooled_m2_term(n, mean, m2, pooled_mean):
    """One set's term of the M2 of k sets merged at once: their pooled mean
    is sum(n_i * mean_i) / n, their M2 the sum of these terms."""
    d = _f64(mean) - _f64(pooled_mean)
    return _f64(m2) + _f64(n) * d * d


def inv_std(var, epsilon):
    """1 / sqrt(var + epsilon): the normalization's inverse standard
    deviation."""
    return 1.0 / tf.sqrt(_f64(var) + _f64(epsilon))


def sum_dy_xhat(sum_dy_xmu, inv_std_):
    """sum(dy * x_hat) from sum(dy * (x - mean)): x_hat = (x - mean) * inv_std."""
    return _f64(sum_dy_xmu) * _f64(inv_std_)


def grad_coefs(scale, inv_std_, sum_dy, sum_dy_xhat_, count, training):
    """(k_dy, k_x, k_0) with dx = k_dy * dy + k_x * (x - mean) + k_0:
    scale * inv_std * (dy - sum_dy / count - x_hat * sum_dy_xhat / count)
    when training (a Python bool), scale * inv_std * dy when frozen."""
    k_dy = _f64(scale) * _f64(inv_std_)
    if not training:
        zero = tf.zeros_like(k_dy)
        return k_dy, zero, zero
    count = _f64(count)
    return (k_dy, -k_dy * _f64(inv_std_) * _f64(sum_dy_xhat_) / count,
            -k_dy * _f64(sum_dy) / count)


def bf16_round_bits(u):
    """The bfloat16 nearest to the float32 with bits u (uint32; ties to
    even) as its bits in the low 16 bits (uint32); a NaN stays NaN (quiet
    bit set)."""
    u = tf.cast(u, tf.uint32)

    def c(v):
        return tf.constant(v, tf.uint32)

    rs = tf.bitwise.right_shift
    rounded = rs(u + c(0x7FFF) + tf.bitwise.bitwise_and(rs(u, c(16)), c(1)), c(16))
    quiet = tf.bitwise.bitwise_or(rs(u, c(16)), c(0x40))
    return tf.where(tf.bitwise.bitwise_and(u, c(0x7FFFFFFF)) > c(0x7F800000),
                    quiet, rounded)


def bf16_bits(v):
    """The bits (uint16) of the bfloat16 nearest to float32 v (ties to even,
    NaN stays NaN)."""
    u = tf.bitcast(tf.cast(v, tf.float32), tf.uint32)
    return tf.cast(bf16_round_bits(u), tf.uint16)
