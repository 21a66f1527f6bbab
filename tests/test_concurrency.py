"""Concurrency: Python threads run training steps on the same variables at
once (eager and tf.function); every update is atomic under the variables'
locks, the counter equals the number of steps, and tf.data pipelines with
parallel map calls run the op without crashing."""
import threading

import numpy as np
import pytest
import tensorflow as tf

import fused_bn

C = 16
THREADS = 4
STEPS = 25


def _batch(seed, shape=(32, 6, 6, C)):
    return tf.constant(np.random.default_rng(seed).normal(2.0, 1.5, shape), tf.float32)


def _run_threads(fn):
    errors = []
    barrier = threading.Barrier(THREADS)

    def worker(i):
        try:
            barrier.wait()
            for k in range(STEPS):
                fn(i, k)
        except Exception as e:  # reported in the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


@pytest.mark.parametrize("mode", ["eager", "tf.function"])
def test_concurrent_steps_count_and_no_torn_updates(mode):
    """momentum 0 and one fixed batch per thread: after every step the moving
    statistics are exactly one batch's statistics, never a mix of two (a torn
    update would mix channels of different batches)."""
    mm, mv = tf.Variable(tf.zeros([C])), tf.Variable(tf.ones([C]))
    n = tf.Variable(tf.constant(0, tf.int64))
    gamma = tf.Variable(tf.ones([C]))
    batches = [_batch(i) for i in range(THREADS)]
    # Each thread's batch statistics, from the op alone on private variables.
    expected = []
    for b in batches:
        pm, pv = tf.Variable(tf.zeros([C])), tf.Variable(tf.ones([C]))
        fused_bn.batch_norm(b, True, moving_mean=pm, moving_variance=pv, momentum=0.0)
        expected.append((pm.numpy(), pv.numpy()))
        x64 = b.numpy().astype(np.float64).reshape(-1, C)
        np.testing.assert_allclose(pm.numpy(), x64.mean(0), rtol=1e-5)
        np.testing.assert_allclose(pv.numpy(), x64.var(0, ddof=1), rtol=1e-4)

    def step(x):
        with tf.GradientTape() as tape:
            y = fused_bn.batch_norm(x, True, gamma, None, mm, mv, momentum=0.0, num_updates=n)
            loss = tf.reduce_sum(y * y)
        return tape.gradient(loss, gamma)

    if mode == "tf.function":
        step = tf.function(step)
    # Inference on a probe reads both statistics under the op's lock: a
    # consistent (mean, var) pair. Separate reads of mm and mv are not.
    probe = tf.ones([2, C])
    allowed = [(1.0 - m) / np.sqrt(v.astype(np.float64) + np.float32(1e-3)) for m, v in expected]
    seen = []

    def body(i, k):
        step(batches[i])
        seen.append((mm.read_value().numpy(), mv.read_value().numpy(),
                     fused_bn.batch_norm(probe, False, None, None, mm, mv).numpy()[0]))

    _run_threads(body)
    assert n.numpy() == THREADS * STEPS
    for m, v, y in seen:
        assert any(np.array_equal(m, em) for em, _ in expected), "torn moving_mean"
        assert any(np.array_equal(v, ev) for _, ev in expected), "torn moving_variance"
        assert any(np.allclose(y, a, rtol=1e-6, atol=1e-6) for a in allowed), \
            "inference saw a (mean, var) pair of two different batches"
    assert any(np.array_equal(mm.numpy(), em) and np.array_equal(mv.numpy(), ev)
               for em, ev in expected)


def test_concurrent_ema_matches_some_serial_order():
    """With momentum 0.5 and identical batches in every thread, every order
    of the steps gives the same result: it must equal the serial run."""
    x = _batch(7)
    mm, mv = tf.Variable(tf.zeros([C])), tf.Variable(tf.ones([C]))
    n = tf.Variable(tf.constant(0, tf.int64))
    step = tf.function(lambda: fused_bn.batch_norm(x, True, None, None, mm, mv,
                                                   momentum=0.5, num_updates=n))
    _run_threads(lambda i, k: step())
    total = THREADS * STEPS
    assert n.numpy() == total
    sm, sv = tf.Variable(tf.zeros([C])), tf.Variable(tf.ones([C]))
    sn = tf.Variable(tf.constant(0, tf.int64))
    for _ in range(total):
        fused_bn.batch_norm(x, True, None, None, sm, sv, momentum=0.5, num_updates=sn)
    np.testing.assert_array_equal(mm.numpy(), sm.numpy())
    np.testing.assert_array_equal(mv.numpy(), sv.numpy())


def test_concurrent_layer_steps():
    layer_cls = getattr(fused_bn, "BatchNormalization", None)
    if layer_cls is None:
        pytest.skip("fused_bn.BatchNormalization not available")
    layer = layer_cls(momentum=0.0)
    layer(_batch(0), training=True)
    counter = [w for w in layer.weights if "num_updates" in w.name]
    start = int(counter[0].numpy()) if counter else None
    step = tf.function(lambda x: layer(x, training=True))
    batches = [_batch(i) for i in range(THREADS)]
    _run_threads(lambda i, k: step(batches[i]))
    if counter:
        assert int(counter[0].numpy()) == start + THREADS * STEPS


def test_readers_see_consistent_values_while_writers_update():
    """Inference readers run concurrently with training writers: each
    inference output is normalized with one consistent (mean, var) pair."""
    mm, mv = tf.Variable(tf.zeros([C])), tf.Variable(tf.ones([C]))
    batches = [_batch(10 + i) for i in range(2)]
    probe = tf.ones([2, C])
    train = tf.function(lambda x: fused_bn.batch_norm(x, True, None, None, mm, mv, momentum=0.0))
    infer = tf.function(lambda: fused_bn.batch_norm(probe, False, None, None, mm, mv))
    stats = []
    for b in batches:
        train(b)
        stats.append((mm.numpy().astype(np.float64), mv.numpy().astype(np.float64)))
    allowed = [(1.0 - m) / np.sqrt(v + np.float32(1e-3)) for m, v in stats]
    outputs = []

    def body(i, k):
        if i % 2:
            train(batches[k % 2])
        else:
            outputs.append(infer().numpy()[0])

    _run_threads(body)
    for y in outputs:
        assert any(np.allclose(y, a, rtol=1e-5, atol=1e-6) for a in allowed), y


@pytest.mark.parametrize("deterministic", [True, False])
def test_tf_data_parallel_map_and_prefetch(deterministic):
    """The op inside tf.data map functions with parallel calls (inference and
    stateless training) and in a training loop fed by prefetch."""
    mm, mv = tf.Variable(tf.zeros([C])), tf.Variable(tf.ones([C]))
    n = tf.Variable(tf.constant(0, tf.int64))
    data = np.random.default_rng(0).normal(1.0, 2.0, (64, 8, 5, C)).astype(np.float32)

    def preprocess(x):
        y = fused_bn.batch_norm(x, True)  # batch statistics, no variables
        z = fused_bn.batch_norm(x, False, None, None, mm, mv)
        return y, z, x

    ds = (tf.data.Dataset.from_tensor_slices(data)
          .map(preprocess, num_parallel_calls=4, deterministic=deterministic)
          .batch(4).prefetch(tf.data.AUTOTUNE))

    @tf.function
    def train(x):
        return fused_bn.batch_norm(x, True, None, None, mm, mv, momentum=0.9, num_updates=n)

    steps = 0
    for y, z, x in ds:
        x64 = x.numpy().astype(np.float64)
        r = x64.reshape(x64.shape[0], -1, C)
        want = (r - r.mean(1, keepdims=True)) / np.sqrt(r.var(1, keepdims=True) + np.float32(1e-3))
        np.testing.assert_allclose(y.numpy().reshape(r.shape), want, atol=2e-5)
        assert np.all(np.isfinite(z.numpy()))
        train(tf.reshape(x, [-1, 5, C]))
        steps += 1
    assert steps == 16 and n.numpy() == 16
    assert np.all(mv.numpy() > 0)
