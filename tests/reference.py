"""Float64 NumPy references for batch norm, independent of fused_bn."""
import numpy as np
import tensorflow as tf

# Tolerance per x dtype, relative to the magnitude of the compared values.
TOL = {tf.float64: 1e-10, tf.float32: 2e-5, tf.float16: 4e-3, tf.bfloat16: 3e-2}


def reduce_axes(x, axis):
    axis = axis % x.ndim
    return tuple(i for i in range(x.ndim) if i != axis)


def bcast(v, x, axis):
    shape = [1] * x.ndim
    shape[axis % x.ndim] = -1
    return np.reshape(v, shape)


def to64(t):
    """A tensor (any float dtype) as float64 NumPy, exactly."""
    return tf.cast(t, tf.float64).numpy()


def forward(x, axis, scale, offset, eps, mean=None, var=None):
    """y, batch mean, biased batch variance (or the given statistics)."""
    r = reduce_axes(x, axis)
    if mean is None:
        mean = x.mean(axis=r)
        var = ((x - bcast(mean, x, axis)) ** 2).mean(axis=r)
    y = (x - bcast(mean, x, axis)) / np.sqrt(bcast(var, x, axis) + eps)
    return y * bcast(scale, x, axis) + bcast(offset, x, axis), mean, var


def backward(x, dy, axis, scale, eps, training, mean=None, var=None):
    """dx, dscale, doffset of forward() given dy."""
    r = reduce_axes(x, axis)
    m = x.size / x.shape[axis % x.ndim]
    if training:
        mean = x.mean(axis=r)
        var = ((x - bcast(mean, x, axis)) ** 2).mean(axis=r)
    inv = 1.0 / np.sqrt(var + eps)
    xhat = (x - bcast(mean, x, axis)) * bcast(inv, x, axis)
    doffset = dy.sum(axis=r)
    dscale = (dy * xhat).sum(axis=r)
    k = bcast(scale * inv, x, axis)
    if training:
        dx = k * (dy - bcast(doffset / m, x, axis) - xhat * bcast(dscale / m, x, axis))
    else:
        dx = k * dy
    return dx, dscale, doffset


def moving(batches, axis, momentum, warmup, unbiased, mean0=0.0, var0=1.0):
    """Moving mean/variance after training on each batch in turn."""
    mm = mv = None
    for t, x in enumerate(batches):
        r = reduce_axes(x, axis)
        mean = x.mean(axis=r)
        var = ((x - bcast(mean, x, axis)) ** 2).mean(axis=r)
        if mm is None:
            mm = np.full_like(mean, mean0)
            mv = np.full_like(var, var0)
        n = x.size / x.shape[axis % x.ndim]
        if unbiased:
            var = var * n / (n - 1)
        m = min(momentum, t / (t + 1.0)) if warmup else momentum
        mm = mm * m + mean * (1 - m)
        mv = mv * m + var * (1 - m)
    return mm, mv


def close(actual, expected, dtype, scale=None):
    """Max error relative to the expected values' magnitude."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    mag = scale if scale is not None else max(1.0, float(np.abs(expected).max(initial=0)))
    err = float(np.abs(actual - expected).max(initial=0)) / mag
    assert err <= TOL[dtype], f"error {err:.3g} > {TOL[dtype]:.3g} for {dtype.name}"
