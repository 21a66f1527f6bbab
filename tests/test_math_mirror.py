"""fused_bn/reference.py's mirror of csrc/kernels/bn_math.h (the per-channel
math of the kernels) against float64 NumPy written here from the
definitions: moments of concatenated data, the dx formula of bn.h, ml_dtypes'
bfloat16 rounding. The kernels themselves are checked against the same kind
of references in test_kernels_cpu.py and tests/gpu."""
import numpy as np
import pytest
import tensorflow as tf

from fused_bn import reference as r

try:
    import ml_dtypes
except ImportError:
    ml_dtypes = None


def _np(t):
    return np.asarray(t.numpy() if hasattr(t, "numpy") else t)


@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.9, 0.99, 1.0])
def test_ema_momentum(momentum):
    ts = np.array([0, 1, 2, 5, 98, 99, 100, 1000, 2**40], np.int64)
    got = _np(r.ema_momentum(momentum, True, tf.constant(ts)))
    want = np.array([min(momentum, t / (t + 1.0)) for t in ts.astype(np.float64)])
    np.testing.assert_array_equal(got, want)
    assert float(_np(r.ema_momentum(momentum, False, tf.constant(5, tf.int64)))) == momentum
    assert _np(r.ema_momentum(0.9, True, tf.constant(0, tf.int64))) == 0.0  # first: the batch


def test_bessel_factor():
    counts = np.array([0, 1, 2, 3, 7, 2**31 + 5], np.int64)
    got = _np(r.bessel_factor(True, tf.constant(counts)))
    np.testing.assert_array_equal(got, [1.0, 1.0, 2.0, 1.5, 7 / 6, (2**31 + 5) / (2**31 + 4)])
    np.testing.assert_array_equal(_np(r.bessel_factor(False, tf.constant(counts))), 1.0)


def test_moving_average_step():
    rng = np.random.default_rng(0)
    moving, mean, var = rng.standard_normal((3, 6))
    var = np.abs(var)
    m, n = 0.75, 9
    got_mean = _np(r.ema(moving, mean, m))
    got_var = _np(r.ema(moving, r.batch_variance(var, r.bessel_factor(True, n)), m))
    # The moving average of a sample variance made unbiased: var * n / (n - 1).
    np.testing.assert_allclose(got_mean, 0.75 * moving + 0.25 * mean, rtol=1e-15)
    np.testing.assert_allclose(got_var, 0.75 * moving + 0.25 * var * 9 / 8, rtol=1e-15)


def _moments(x):
    f = lambda v: tf.constant(v, tf.float64)  # noqa: E731
    if not x.size:
        return r.Moments(f(0.0), f(0.0), f(0.0))
    return r.Moments(f(x.size), f(x.mean()), f(((x - x.mean()) ** 2).sum()))


@pytest.mark.parametrize("sizes", [(1, 1), (1, 40), (37, 5), (1000, 3), (0, 8), (8, 0),
                                   (0, 0)])
def test_chan_merge_gives_the_moments_of_the_union(sizes):
    rng = np.random.default_rng(sum(sizes))
    a = 1e3 + rng.standard_normal(sizes[0])
    b = 1e3 + 0.5 + 2 * rng.standard_normal(sizes[1])
    got = r.chan_merge(_moments(a), _moments(b))
    both = np.concatenate([a, b])
    assert float(got.n) == both.size
    if both.size:
        np.testing.assert_allclose(float(got.mean), both.mean(), rtol=1e-14)
        np.testing.assert_allclose(float(got.m2), ((both - both.mean()) ** 2).sum(),
                                   rtol=1e-9, atol=1e-9)
    else:
        assert float(got.mean) == 0.0 and float(got.m2) == 0.0


def test_chan_merge_of_single_values_is_welford():
    x = np.random.default_rng(1).standard_normal(50) * 3 + 7
    f = lambda v: tf.constant(v, tf.float64)  # noqa: E731
    acc = r.Moments(f(0.0), f(0.0), f(0.0))
    for v in x:
        acc = r.chan_merge(acc, r.Moments(f(1.0), f(v), f(0.0)))
    np.testing.assert_allclose(float(acc.mean), x.mean(), rtol=1e-14)
    np.testing.assert_allclose(float(acc.m2) / x.size, x.var(), rtol=1e-12)


def test_chan_merge_in_float32_stays_float32():
    m = r.Moments(tf.constant(2.0), tf.constant(1.0), tf.constant(0.5))
    got = r.chan_merge(m, m)
    assert all(t.dtype == tf.float32 for t in got)
    assert (float(got.n), float(got.mean), float(got.m2)) == (4.0, 1.0, 1.0)


def test_pooled_m2_term():
    rng = np.random.default_rng(2)
    parts = [5 + rng.standard_normal(n) * s for n, s in [(3, 1.0), (50, 2.0), (7, 0.1)]]
    n = np.array([p.size for p in parts], np.float64)
    means = np.array([p.mean() for p in parts])
    m2 = np.array([((p - p.mean()) ** 2).sum() for p in parts])
    pooled = (n * means).sum() / n.sum()
    got = _np(r.pooled_m2_term(n, means, m2, pooled)).sum()
    both = np.concatenate(parts)
    np.testing.assert_allclose(pooled, both.mean(), rtol=1e-14)
    np.testing.assert_allclose(got, ((both - both.mean()) ** 2).sum(), rtol=1e-12)


def test_inv_std():
    var = np.array([0.0, 1e-8, 0.25, 4.0, 1e6])
    np.testing.assert_allclose(_np(r.inv_std(var, 1e-3)), 1 / np.sqrt(var + 1e-3),
                               rtol=1e-15)


@pytest.mark.parametrize("training", [True, False])
def test_grad_coefs_give_the_batch_norm_dx(training):
    """k_dy * dy + k_x * (x - mean) + k_0 is bn.h's dx, computed here from
    x_hat, dy and the reduction's sums."""
    rng = np.random.default_rng(3)
    m, c = 40, 3
    x = 2 + 3 * rng.standard_normal((m, c))
    dy = rng.standard_normal((m, c))
    scale = np.array([0.5, -1.0, 2.0])
    mean, inv = x.mean(0), 1 / np.sqrt(x.var(0) + 1e-3)
    xhat = (x - mean) * inv
    sum_dy, sum_dy_xhat = dy.sum(0), (dy * xhat).sum(0)
    if training:
        want = scale * inv * (dy - sum_dy / m - xhat * sum_dy_xhat / m)
    else:
        want = scale * inv * dy
    got_sum = _np(r.sum_dy_xhat((dy * (x - mean)).sum(0), inv))
    np.testing.assert_allclose(got_sum, sum_dy_xhat, rtol=1e-12)
    k_dy, k_x, k_0 = (_np(t) for t in r.grad_coefs(scale, inv, sum_dy, got_sum, m, training))
    np.testing.assert_allclose(k_dy * dy + k_x * (x - mean) + k_0, want, rtol=1e-10,
                               atol=1e-12)


@pytest.mark.skipif(ml_dtypes is None, reason="ml_dtypes is not installed")
def test_bf16_bits_rounds_to_nearest_even():
    rng = np.random.default_rng(4)
    u = rng.integers(0, 2**32, 20000, dtype=np.uint64).astype(np.uint32)
    # Ties and near-ties, both parities, around 1, and the largest finite values.
    edges = np.array([0x3F808000, 0x3F818000, 0x3F807FFF, 0x3F808001, 0x7F7FFFFF,
                      0x7F7F8000, 0xFF7F8000, 0x00000001, 0x80008000, 0x7F800000,
                      0xFF800000, 0], np.uint32)
    u = np.concatenate([u, edges])
    v = u.view(np.float32)
    got = _np(r.bf16_bits(v)).astype(np.uint16)
    finite = ~np.isnan(v)
    want = v[finite].astype(ml_dtypes.bfloat16).view(np.uint16)
    np.testing.assert_array_equal(got[finite], want)
    # NaN stays NaN, its payload's high bits kept and the quiet bit set.
    nan = ~finite
    assert nan.any()
    assert np.all(got[nan] == ((u[nan] >> 16) | 0x40))
    assert np.all(np.isnan(got[nan].view(ml_dtypes.bfloat16).astype(np.float32)))
