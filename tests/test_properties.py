"""Property tests (hypothesis): random shapes (rank 2 to 5), layouts, dtypes,
momenta, epsilons, counters and Bessel settings against float64 NumPy for
the forward, the moving statistics and the gradients."""
import numpy as np
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fused_bn
import reference as ref

DTYPES = [tf.float32, tf.float16, tf.bfloat16, tf.float64]
SETTINGS = settings(max_examples=300, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


@st.composite
def cases(draw):
    rank = draw(st.integers(2, 5))
    axis = draw(st.sampled_from([-1, 1]))
    dims = draw(st.lists(st.integers(1, 16), min_size=rank, max_size=rank))
    dims[0] = draw(st.integers(1, 300 if rank == 2 else 8))
    dims[axis] = draw(st.sampled_from([1, 2, 3, 5, 8, 17, 63, 64, 130]))
    count = int(np.prod(dims)) // dims[axis]
    if count < 2:
        dims[0] += 2 - count  # training needs 2 values per channel
    return dict(
        shape=tuple(dims), axis=axis,
        dtype=draw(st.sampled_from(DTYPES)),
        momentum=draw(st.sampled_from([0.0, 0.1, 0.5, 0.9, 0.99, 1.0])),
        epsilon=draw(st.sampled_from([1e-5, 1e-3, 0.1, 1.0])),
        counter=draw(st.none() | st.integers(0, 50)),
        unbiased=draw(st.booleans()),
        loc=draw(st.sampled_from([0.0, 1.0, -30.0, 500.0])),
        spread=draw(st.sampled_from([0.01, 1.0, 20.0])),
        seed=draw(st.integers(0, 2 ** 16)),
        steps=draw(st.integers(1, 3)),
    )


def _tol(dtype, loc, spread):
    """Relative tolerance of y / dx for inputs rounded to dtype: large offsets
    relative to the spread amplify the rounding of the float32 statistics."""
    base = ref.TOL[dtype]
    if dtype in (tf.float32, tf.float16, tf.bfloat16):
        base = max(base, 2 ** -22 * (1 + abs(loc) / spread) * 8)
    return base


@SETTINGS
@given(cases())
def test_training_steps_match_float64(case):
    shape, axis, dtype = case["shape"], case["axis"], case["dtype"]
    rng = np.random.default_rng(case["seed"])
    c = shape[axis]
    u = tf.float64 if dtype == tf.float64 else tf.float32
    eps64 = float(np.float32(case["epsilon"]))
    mm = tf.Variable(rng.normal(0, 1, c), dtype=u)
    mv = tf.Variable(rng.uniform(0.5, 2, c), dtype=u)
    mm64, mv64 = ref.to64(mm), ref.to64(mv)
    n = None if case["counter"] is None else tf.Variable(case["counter"], dtype=tf.int64)
    scale = tf.constant(rng.uniform(0.5, 2.0, c), u)
    offset = tf.constant(rng.normal(0, 1, c), u)
    s64, o64 = ref.to64(scale), ref.to64(offset)
    loc = ref.bcast(case["loc"] + rng.normal(0, 1, c), np.empty(shape), axis)
    for step in range(case["steps"]):
        x = tf.cast(loc + case["spread"] * rng.standard_normal(shape), dtype)
        dy = tf.cast(rng.normal(0.1, 1.0, shape), dtype)
        x64, dy64 = ref.to64(x), ref.to64(dy)
        with tf.GradientTape() as tape:
            tape.watch([x, scale, offset])
            y = fused_bn.batch_norm(x, True, scale, offset, mm, mv, axis=axis,
                                    momentum=case["momentum"], epsilon=case["epsilon"],
                                    unbiased_variance=case["unbiased"], num_updates=n)
        dx, ds, do = tape.gradient(y, [x, scale, offset], output_gradients=dy)
        # Reference forward and moving statistics.
        y64, mean, var = ref.forward(x64, axis, s64, o64, eps64)
        m = float(np.float32(case["momentum"]))  # the op's attr is float32
        if n is not None:
            t = case["counter"] + step
            m = min(m, t / (t + 1.0))
        count = x64.size / c
        bvar = var * count / (count - 1) if case["unbiased"] else var
        mm64 = mm64 * m + mean * (1 - m)
        mv64 = mv64 * m + bvar * (1 - m)
        tol = _tol(dtype, case["loc"], case["spread"])
        ref.close(ref.to64(y), y64, dtype,
                  scale=max(1.0, float(np.abs(y64).max())) * tol / ref.TOL[dtype])
        stat_tol = 1e-10 if dtype == tf.float64 else 1e-5
        scale_m = np.abs(mean) + np.sqrt(var) + np.abs(mm64) + 1e-30
        np.testing.assert_array_less(np.abs(ref.to64(mm) - mm64), stat_tol * scale_m * 4 + 1e-300)
        np.testing.assert_allclose(ref.to64(mv), mv64, rtol=stat_tol * 4 * (1 + (case["loc"] / case["spread"]) ** 2 * 1e-3), atol=1e-30)
        assert np.all(ref.to64(mv) >= 0)
        if n is not None:
            assert n.numpy() == case["counter"] + step + 1
        # Gradients.
        rdx, rds, rdo = ref.backward(x64, dy64, axis, s64, eps64, True)
        ref.close(ref.to64(dx), rdx, dtype,
                  scale=max(1.0, float(np.abs(rdx).max())) * tol / ref.TOL[dtype])
        gscale = max(1.0, float(np.abs(dy64).sum(axis=ref.reduce_axes(x64, axis)).max()))
        ref.close(ref.to64(ds), rds, dtype, scale=gscale * tol / ref.TOL[dtype])
        ref.close(ref.to64(do), rdo, dtype, scale=gscale)


@SETTINGS
@given(cases())
def test_inference_and_building_blocks_match_float64(case):
    shape, axis, dtype = case["shape"], case["axis"], case["dtype"]
    rng = np.random.default_rng(case["seed"])
    c = shape[axis]
    u = tf.float64 if dtype == tf.float64 else tf.float32
    eps64 = float(np.float32(case["epsilon"]))
    loc = ref.bcast(case["loc"] + rng.normal(0, 1, c), np.empty(shape), axis)
    x = tf.cast(loc + case["spread"] * rng.standard_normal(shape), dtype)
    dy = tf.cast(rng.normal(0.1, 1.0, shape), dtype)
    x64, dy64 = ref.to64(x), ref.to64(dy)
    r = ref.reduce_axes(x64, axis)
    tol = _tol(dtype, case["loc"], case["spread"])
    # moments
    mean, var = fused_bn.moments(x, axis=axis)
    tm = x64.mean(axis=r)
    tv = ((x64 - ref.bcast(tm, x64, axis)) ** 2).mean(axis=r)
    stat_tol = 1e-10 if dtype == tf.float64 else 1e-5
    np.testing.assert_array_less(np.abs(ref.to64(mean) - tm),
                                 stat_tol * (np.abs(tm) + np.sqrt(tv)) + 1e-300)
    np.testing.assert_allclose(ref.to64(var), tv, rtol=stat_tol * 10, atol=1e-30)
    # inference with given statistics: frozen batch norm with its gradient
    mm64 = tm + rng.normal(0, 0.1, c) * np.sqrt(tv + 1)
    mv64 = tv * rng.uniform(0.8, 1.25, c) + 0.01
    mm, mv = tf.Variable(mm64, dtype=u), tf.Variable(mv64, dtype=u)
    mm64, mv64 = ref.to64(mm), ref.to64(mv)
    n = tf.Variable(tf.constant(3, tf.int64))
    scale = tf.constant(rng.uniform(0.5, 2.0, c), u)
    offset = tf.constant(rng.normal(0, 1, c), u)
    s64, o64 = ref.to64(scale), ref.to64(offset)
    with tf.GradientTape() as tape:
        tape.watch([x, scale, offset])
        y = fused_bn.batch_norm(x, False, scale, offset, mm, mv, axis=axis,
                                epsilon=case["epsilon"], num_updates=n)
    dx, ds, do = tape.gradient(y, [x, scale, offset], output_gradients=dy)
    y64, _, _ = ref.forward(x64, axis, s64, o64, eps64, mm64, mv64)
    big = max(1.0, float(np.abs(y64).max()))
    ref.close(ref.to64(y), y64, dtype, scale=big * tol / ref.TOL[dtype])
    rdx, rds, rdo = ref.backward(x64, dy64, axis, s64, eps64, False, mm64, mv64)
    ref.close(ref.to64(dx), rdx, dtype)
    gscale = max(1.0, float(np.abs(dy64).sum(axis=r).max()))
    ref.close(ref.to64(ds), rds, dtype, scale=gscale * tol / ref.TOL[dtype])
    ref.close(ref.to64(do), rdo, dtype, scale=gscale)
    np.testing.assert_array_equal(ref.to64(mm), mm64)  # inference leaves them
    assert n.numpy() == 3
    # normalize == inference batch norm
    yn = fused_bn.normalize(x, mm.read_value(), mv.read_value(), scale, offset,
                            epsilon=case["epsilon"], axis=axis)
    np.testing.assert_array_equal(ref.to64(yn), ref.to64(y))
