"""64-bit indexing: a bfloat16 tensor of more than 2^31 elements (4.4 GB) on
the CPU, both layouts: training and inference forward, backward, moments.
Each channel of x alternates two known values, so every statistic and output
has a closed form (float64 arithmetic here, never our own results). About
30 s per layout on 2 cores, peak RSS about 14 GB."""
import gc

import numpy as np
import pytest
import tensorflow as tf

import fused_bn

C = 64
N = 34_000_000  # values per channel: N * C = 2.176e9 > 2^31 elements
S = 2000  # channels-first: [N // S, C, S]
EPS = float(np.float32(1e-3))


def _bf16(v):
    return tf.cast(tf.constant(v, tf.float64), tf.bfloat16)


@pytest.mark.slow
@pytest.mark.parametrize("axis", [-1, 1], ids=["channels_last", "channels_first"])
def test_more_than_2_31_elements_bfloat16(axis):
    assert N * C > 2 ** 31
    c = np.arange(C, dtype=np.float64)
    a = c / 8.0 + 1.0  # even values of each channel
    b = -c / 4.0 - 2.0  # odd values; both exact in bfloat16
    if axis == -1:
        x = tf.tile(tf.stack([_bf16(a), _bf16(b)]), [N // 2, 1])
        # (index, parity) of a few values; the last lie past element 2^31.
        at = [((r,), r % 2) for r in (0, 1, N // 2, N - 2, N - 1)]
    else:
        x = tf.tile(tf.reshape(tf.stack([_bf16(a), _bf16(b)], axis=1), [1, C, 2]),
                    [N // S, 1, S // 2])
        at = [((i, slice(None), j), j % 2) for i, j in
              ((0, 0), (0, 1), (N // S // 2, 7), (N // S - 1, S - 2), (N // S - 1, S - 1))]
    mean = (a + b) / 2
    var = ((a - b) / 2) ** 2
    inv = 1.0 / np.sqrt(var + EPS)

    def check_y(y):
        for index, odd in at:
            want = ((b if odd else a) - mean) * inv
            got = tf.cast(y[index], tf.float64).numpy()
            np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2)

    mm, mv = tf.Variable(tf.zeros([C])), tf.Variable(tf.ones([C]))
    n = tf.Variable(tf.constant(0, tf.int64))
    y = fused_bn.batch_norm(x, True, moving_mean=mm, moving_variance=mv, momentum=0.5,
                            num_updates=n, axis=axis)
    # Warm-up at t = 0: momentum 0, the moving statistics are the batch's.
    np.testing.assert_allclose(mm.numpy(), mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(mv.numpy(), var * (N / (N - 1)), rtol=1e-5)
    assert n.numpy() == 1
    check_y(y)
    del y
    gc.collect()

    # Backward with dy = x: dx = inv * (x - mean(x) - x_hat * mean(x * x_hat)),
    # dscale = sum(x * x_hat), doffset = sum(x).
    scale = tf.ones([C])
    with tf.GradientTape() as tape:
        tape.watch(scale)
        y = fused_bn.batch_norm(x, True, scale, axis=axis)
    dscale = tape.gradient(y, scale, output_gradients=x)
    del y
    gc.collect()
    # x * x_hat per row: a * (a - mean) * inv and b * (b - mean) * inv.
    want_dscale = N / 2 * (a * (a - mean) + b * (b - mean)) * inv
    np.testing.assert_allclose(dscale.numpy(), want_dscale, rtol=1e-4)

    # Inference with the moving statistics just learnt.
    mm.assign(mean)
    mv.assign(var)
    y = fused_bn.batch_norm(x, False, moving_mean=mm, moving_variance=mv, num_updates=n,
                            axis=axis)
    check_y(y)
    assert n.numpy() == 1
    del y
    # Moments of the same tensor.
    m, v = fused_bn.moments(x, axis=axis)
    np.testing.assert_allclose(m.numpy(), mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(v.numpy(), var, rtol=1e-5)
