"""fused_bn.compat.v1.inference_graph_def: frozen TF1 graphs without fused_bn.

The frozen graph is imported into a new graph here and compared with the
session's `training=False` outputs and with float64 NumPy; the same graph
is run in a process without fused_bn in test_export_artifacts.py.
"""
import inspect

import numpy as np
import pytest
import tensorflow as tf

import fused_bn

v1 = tf.compat.v1
inference_graph_def = fused_bn.compat.v1.inference_graph_def
HAS_EPILOGUE = "side_input" in inspect.signature(fused_bn.batch_norm).parameters

# Outputs of the test graph: the CNN, and one batch norm per replacement kind.
OUTPUTS = ["cnn", "nchw", "volume", "sequence", "half", "double", "normalized"]
# name -> (scope, input node, channel axis) for the single batch-norm outputs.
SINGLE = {"nchw": ("bn_nchw", "nchw_in", 1), "volume": ("bn_volume", "volume_in", 1),
          "sequence": ("bn_sequence", "sequence_in", -1),
          "half": ("bn_half", "half_in", -1), "double": ("bn_double", "double_in", -1)}


def build_graph():
    """A TF1 CNN (residual branch, depthwise conv, dense BN) and single BNs.

    Returns (graph, session, x placeholder, training placeholder) after
    three training-mode steps (moving statistics updated by the op) and
    random gamma/beta.
    """
    rng = np.random.RandomState(0)
    graph = tf.Graph()
    with graph.as_default():
        x = v1.placeholder(tf.float32, [None, 8, 8, 3], name="x")
        training = v1.placeholder(tf.bool, [], name="training")
        bn = fused_bn.compat.v1.batch_norm
        h = tf.nn.conv2d(x, v1.get_variable("kernel", [3, 3, 3, 8]), 1, "SAME")
        h = tf.nn.relu(bn(h, training, scope="bn_stem"))
        r = tf.nn.depthwise_conv2d(h, v1.get_variable("depthwise", [3, 3, 8, 1]),
                                   [1, 1, 1, 1], "SAME")
        h = tf.nn.relu(h + bn(r, training, scope="bn_depthwise"))
        dense = tf.matmul(tf.reduce_mean(h, [1, 2]), v1.get_variable("dense", [8, 5]))
        tf.identity(bn(dense, training, scope="bn_dense"), name="cnn")
        inputs = {
            "nchw": tf.transpose(h, [0, 3, 1, 2]),
            "volume": tf.reshape(tf.transpose(h, [0, 3, 1, 2]), [-1, 8, 2, 4, 8]),
            "sequence": tf.reshape(h, [-1, 64, 8]),
            "half": tf.cast(dense, tf.float16),
            "double": tf.cast(h, tf.float64),
        }
        for name, (scope, input_name, axis) in SINGLE.items():
            t = tf.identity(inputs[name], name=input_name)
            tf.identity(bn(t, training, scope=scope, axis=axis), name=name)
        mean, variance = fused_bn.moments(h)
        tf.identity(fused_bn.normalize(h, mean, variance, epsilon=1e-3), name="normalized")
        sess = v1.Session(graph=graph)
        sess.run(v1.global_variables_initializer())
        for var in v1.trainable_variables():
            if var.op.name.endswith(("gamma", "beta")):
                value = (rng.uniform(0.5, 2.0, var.shape) if var.op.name.endswith("gamma")
                         else rng.randn(*var.shape))
                sess.run(var.assign(value.astype(var.dtype.as_numpy_dtype)))
        outputs = [graph.get_tensor_by_name(n + ":0") for n in OUTPUTS]
        for _ in range(3):
            sess.run(outputs, {x: rng.randn(16, 8, 8, 3) * 2 + 1, training: True})
    return graph, sess, x, training


def sample(seed=5):
    return (np.random.RandomState(seed).randn(5, 8, 8, 3) * 2 + 1).astype("float32")


def run_graph_def(graph_def, names, feeds):
    with tf.Graph().as_default() as graph:
        tf.graph_util.import_graph_def(graph_def, name="")
        with v1.Session(graph=graph) as sess:
            return sess.run([n + ":0" for n in names], feeds)


@pytest.fixture(scope="module")
def frozen():
    graph, sess, x, training = build_graph()
    data = sample()
    names = OUTPUTS + [input_name for _, input_name, _ in SINGLE.values()]
    want = sess.run([n + ":0" for n in names], {x: data, training: False})
    stats = {}
    for name, (scope, _, _) in SINGLE.items():
        stats[name] = [sess.run(graph.get_tensor_by_name(f"{scope}/{v}/Read/ReadVariableOp:0"))
                       for v in ("gamma", "beta", "moving_mean", "moving_variance")]
    graph_def = inference_graph_def(sess, OUTPUTS)
    sess.close()
    return graph_def, data, dict(zip(names, want)), stats


def test_frozen_graph_has_only_stock_ops_and_constants(frozen):
    graph_def = frozen[0]
    ops = {n.op for n in graph_def.node}
    assert not [op for op in ops if op.startswith("FusedBn>")]
    assert not ops & {"VarHandleOp", "ReadVariableOp", "VariableV2"}
    assert [n.name for n in graph_def.node if n.op == "Placeholder"] == ["x"]
    fused = {n.attr["data_format"].s.decode() for n in graph_def.node
             if n.op == "FusedBatchNormV3"}
    assert fused == {"NHWC", "NCHW", "NCDHW"}
    assert all(not n.attr["is_training"].b for n in graph_def.node
               if n.op == "FusedBatchNormV3")
    # Rank 2 and 3, and float64, have no stock fused op: x * a + b.
    assert {tf.as_dtype(n.attr["T"].type) for n in graph_def.node if n.op == "Mul"} >= {
        tf.float32, tf.float64}
    assert not graph_def.library.function


def test_frozen_graph_matches_inference_mode(frozen):
    graph_def, data, want, stats = frozen
    got = dict(zip(OUTPUTS, run_graph_def(graph_def, OUTPUTS, {"x:0": data})))
    for name in OUTPUTS:
        tol = 1e-2 if name == "half" else 1e-5
        np.testing.assert_allclose(got[name], want[name], rtol=tol, atol=tol, err_msg=name)
    for name, (_, input_name, axis) in SINGLE.items():
        x = want[input_name].astype(np.float64)
        shape = [1] * x.ndim
        shape[axis] = -1
        gamma, beta, mean, variance = (np.reshape(v, shape).astype(np.float64)
                                       for v in stats[name])
        expected = (x - mean) / np.sqrt(variance + 1e-3) * gamma + beta
        tol = 1e-2 if name == "half" else 1e-5
        np.testing.assert_allclose(got[name], expected, rtol=tol, atol=tol, err_msg=name)


def test_normalize_with_moments_is_plain_batch_statistics(frozen):
    graph_def, data, want, _ = frozen
    [normalized] = run_graph_def(graph_def, ["normalized"], {"x:0": data})
    np.testing.assert_allclose(normalized, want["normalized"], rtol=1e-5, atol=1e-5)
    h = want["nchw_in"].transpose(0, 2, 3, 1).astype(np.float64)
    mean, variance = h.mean((0, 1, 2)), h.var((0, 1, 2))
    np.testing.assert_allclose(normalized, (h - mean) / np.sqrt(variance + 1e-3),
                               rtol=1e-5, atol=1e-5)


def test_errors_name_the_node():
    with tf.Graph().as_default() as graph, v1.Session(graph=graph) as sess:
        x = v1.placeholder(tf.float32, [4, 3], name="x")
        mm = v1.get_variable("mm", [3], initializer=v1.zeros_initializer(),
                             use_resource=True, trainable=False)
        mv = v1.get_variable("mv", [3], initializer=v1.ones_initializer(),
                             use_resource=True, trainable=False)
        mean, variance = fused_bn.moments(x)
        update = fused_bn.update_moving_stats(mm, mv, mean, variance, 4,
                                              name="update")
        with tf.control_dependencies([update]):
            tf.identity(fused_bn.normalize(x, mean, variance), name="updating")
        y = fused_bn.batch_norm(x, False, moving_mean=mm, moving_variance=mv, name="bn")
        tf.identity(tf.gradients(y, x)[0], name="gradient")
        tf.identity(fused_bn.batch_norm(x, True, name="batch_only"), name="batch_only_out")

        @tf.function
        def wrapped(t):
            return fused_bn.batch_norm(t, False, moving_mean=mm, moving_variance=mv)

        tf.identity(wrapped(x), name="in_function")
        sess.run(v1.global_variables_initializer())
        with pytest.raises(ValueError, match="'update/FusedBn>UpdateMovingStats'.*in place"):
            inference_graph_def(sess, ["updating"])
        with pytest.raises(ValueError, match="FusedBn>ForwardGrad.*gradient"):
            inference_graph_def(sess, ["gradient"])
        with pytest.raises(ValueError, match="'batch_only/.*no moving statistics"):
            inference_graph_def(sess, ["batch_only_out"])
        with pytest.raises(ValueError, match="FusedBn>Forward.*inside function"):
            inference_graph_def(sess, ["in_function"])
        with pytest.raises(ValueError, match="'nowhere' is not in the session's graph"):
            inference_graph_def(sess, ["nowhere"])
        with pytest.raises(ValueError, match="node names.*'updating:0'"):
            inference_graph_def(sess, ["updating:0"])
        with pytest.raises(TypeError, match="output_node_names must be a list"):
            inference_graph_def(sess, "updating")


@pytest.mark.skipif(not HAS_EPILOGUE, reason="needs the epilogue")
def test_epilogue_becomes_add_and_relu():
    rng = np.random.RandomState(2)
    with tf.Graph().as_default() as graph, v1.Session(graph=graph) as sess:
        x = v1.placeholder(tf.float32, [None, 4, 4, 3], name="x")
        side = v1.placeholder(tf.float32, [None, 4, 4, 3], name="side")
        training = v1.placeholder(tf.bool, [], name="training")
        variables = [v1.get_variable(name, [3], use_resource=True,
                                     initializer=v1.constant_initializer(value))
                     for name, value in (("gamma", rng.uniform(0.5, 2, 3)),
                                         ("beta", rng.randn(3)),
                                         ("mean", rng.randn(3)),
                                         ("variance", rng.uniform(0.5, 2, 3)))]
        y = fused_bn.batch_norm(x, training, *variables, side_input=side,
                                activation="relu")
        tf.identity(y, name="y")
        sess.run(v1.global_variables_initializer())
        feeds = {x: rng.randn(2, 4, 4, 3), side: rng.randn(2, 4, 4, 3)}
        want = sess.run(y, {**feeds, training: False})
        graph_def = inference_graph_def(sess, ["y"])
    ops = {n.op for n in graph_def.node}
    assert {"FusedBatchNormV3", "AddV2", "Relu"} <= ops
    assert not [op for op in ops if op.startswith("FusedBn>")]
    [got] = run_graph_def(graph_def, ["y"], {"x:0": feeds[x], "side:0": feeds[side]})
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert (got == 0).any()
