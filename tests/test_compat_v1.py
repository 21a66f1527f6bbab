"""fused_bn.compat.v1.batch_norm in TF1 graph mode with Sessions."""
import numpy as np
import pytest
import tensorflow as tf

import fused_bn

v1 = tf.compat.v1
SHAPE = (8, 3, 3, 4)


def batches(n, seed=0):
    rng = np.random.RandomState(seed)
    return [(rng.randn(*SHAPE) * rng.uniform(0.5, 3) + rng.uniform(-2, 2))
            .astype("float32") for _ in range(n)]


def numpy_moving_stats(xs, momentum, warmup=True, unbiased=True):
    mean, var = np.zeros(SHAPE[-1]), np.ones(SHAPE[-1])
    for t, x in enumerate(xs):
        x = x.reshape(-1, SHAPE[-1]).astype(np.float64)
        bm, bv = x.mean(0), x.var(0, ddof=1 if unbiased else 0)
        m = min(momentum, t / (t + 1)) if warmup else momentum
        mean, var = mean * m + bm * (1 - m), var * m + bv * (1 - m)
    return mean, var


def numpy_bn(x, mean, var, eps=1e-3):
    return (x.astype(np.float64) - mean) / np.sqrt(var + eps)


def var_named(name, collection=v1.GraphKeys.GLOBAL_VARIABLES):
    [v] = [v for v in v1.get_collection(collection) if v.op.name == name]
    return v


@pytest.mark.parametrize("warmup", [True, False])
def test_one_graph_with_a_bool_placeholder(warmup):
    xs = batches(6)
    with tf.Graph().as_default(), v1.Session() as sess:
        x = v1.placeholder(tf.float32, [None, 3, 3, 4])
        is_training = v1.placeholder(tf.bool, [])
        y = fused_bn.compat.v1.batch_norm(x, is_training, scope="bn",
                                          warmup=warmup, momentum=0.9)
        assert not v1.get_collection(v1.GraphKeys.UPDATE_OPS)
        sess.run(v1.global_variables_initializer())
        mm, mv = var_named("bn/moving_mean"), var_named("bn/moving_variance")
        for t, xb in enumerate(xs):
            out = sess.run(y, {x: xb, is_training: True})
            xd = xb.reshape(-1, 4).astype(np.float64)
            np.testing.assert_allclose(
                out, numpy_bn(xb, xd.mean(0), xd.var(0)), rtol=1e-5, atol=1e-5)
        want = numpy_moving_stats(xs, 0.9, warmup)
        got = sess.run([mm, mv])
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
        if warmup:
            assert sess.run(var_named("bn/num_updates")) == len(xs)
        test = batches(1, seed=9)[0]
        out = sess.run(y, {x: test, is_training: False})
        np.testing.assert_allclose(out, numpy_bn(test, *want), rtol=1e-5, atol=1e-5)
        for g, w in zip(sess.run([mm, mv]), got):
            np.testing.assert_array_equal(g, w)


def test_train_and_eval_graphs_share_variables_by_scope():
    xs = batches(5)
    with tf.Graph().as_default(), v1.Session() as sess:
        x = v1.placeholder(tf.float32, [None, 3, 3, 4])
        with v1.variable_scope("net"):
            y_train = fused_bn.compat.v1.batch_norm(x, True, scope="bn")
        with v1.variable_scope("net", reuse=True):
            y_eval = fused_bn.compat.v1.batch_norm(x, False, scope="bn")
        names = sorted(v.op.name for v in v1.global_variables())
        assert names == ["net/bn/beta", "net/bn/gamma", "net/bn/moving_mean",
                         "net/bn/moving_variance", "net/bn/num_updates"]
        stats = {"net/bn/moving_mean", "net/bn/moving_variance", "net/bn/num_updates"}
        assert {v.op.name for v in v1.get_collection(
            v1.GraphKeys.MODEL_VARIABLES)} == stats
        assert {v.op.name for v in v1.trainable_variables()} == {
            "net/bn/beta", "net/bn/gamma"}
        assert not v1.get_collection(v1.GraphKeys.UPDATE_OPS)
        sess.run(v1.global_variables_initializer())
        for xb in xs:
            sess.run(y_train, {x: xb})
        test = batches(1, seed=9)[0]
        np.testing.assert_allclose(
            sess.run(y_eval, {x: test}),
            numpy_bn(test, *numpy_moving_stats(xs, 0.99)), rtol=1e-5, atol=1e-5)


def test_saver_round_trip_into_a_fresh_graph(tmp_path):
    xs = batches(7)
    path = str(tmp_path / "model.ckpt")

    def build():
        x = v1.placeholder(tf.float32, [None, 3, 3, 4])
        training = v1.placeholder_with_default(False, [])
        kernel = v1.get_variable("dense", [4, 4],
                                 initializer=v1.initializers.identity(),
                                 use_resource=True)
        h = tf.einsum("nhwc,cd->nhwd", x, kernel)
        return x, training, fused_bn.compat.v1.batch_norm(h, training, scope="bn",
                                                          momentum=0.95)

    with tf.Graph().as_default(), v1.Session() as sess:
        x, training, y = build()
        sess.run(v1.global_variables_initializer())
        for xb in xs:
            sess.run(y, {x: xb, training: True})
        saved = sess.run(v1.global_variables())
        v1.train.Saver().save(sess, path)
    with tf.Graph().as_default(), v1.Session() as sess:
        x, training, y = build()
        v1.train.Saver().restore(sess, path)
        restored = sess.run(v1.global_variables())
        for a, b in zip(restored, saved):
            np.testing.assert_array_equal(a, b)
        assert sess.run(var_named("bn/num_updates")) == len(xs)
        want = numpy_moving_stats(xs, 0.95)
        got = sess.run([var_named("bn/moving_mean"), var_named("bn/moving_variance")])
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
        test = batches(1, seed=9)[0]
        np.testing.assert_allclose(sess.run(y, {x: test}), numpy_bn(test, *want),
                                   rtol=1e-4, atol=1e-4)


def test_train_op_with_optimizer_needs_no_update_ops():
    xs = batches(4)
    with tf.Graph().as_default(), v1.Session() as sess:
        x = v1.placeholder(tf.float32, [None, 3, 3, 4])
        y = fused_bn.compat.v1.batch_norm(x, True, scope="bn", momentum=0.5)
        train = v1.train.GradientDescentOptimizer(0.1).minimize(
            tf.reduce_mean(tf.square(y - 1.0)))
        sess.run(v1.global_variables_initializer())
        for xb in xs:
            sess.run(train, {x: xb})
        got = sess.run([var_named("bn/moving_mean"), var_named("bn/moving_variance")])
        for g, w in zip(got, numpy_moving_stats(xs, 0.5)):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
        assert sess.run(var_named("bn/num_updates")) == len(xs)
