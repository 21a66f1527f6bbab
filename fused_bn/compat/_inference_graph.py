"""A frozen inference GraphDef of a TF1 session graph, without fused_bn ops.

Each fused_bn op reachable from the outputs is replaced by stock ops in
inference mode (moving statistics, whatever the training input), then the
variables are frozen into constants by TensorFlow's own converter: the
replacements read the moving statistics through ReadVariableOp, which the
converter knows, where the fused op read them through resource handles,
which it does not.
"""
import tensorflow as tf
from tensorflow.core.framework import graph_pb2, node_def_pb2
from tensorflow.python.framework import convert_to_constants, op_def_registry
from tensorflow.python.framework.graph_util_impl import extract_sub_graph
from tensorflow.python.util import deprecation

__all__ = ["inference_graph_def"]

_v1 = tf.compat.v1
_PREFIX = "FusedBn>"
# Ops that change state or compute gradients: not part of an inference graph.
_TRAINING_ONLY = {
    "FusedBn>UpdateMovingStats": "updates the moving statistics in place",
    "FusedBn>ForwardGrad": "is the batch-norm gradient",
}
_FUSED_BATCH_NORM_FORMATS = {
    (4, "channels_last"): "NHWC", (4, "channels_first"): "NCHW",
    (5, "channels_last"): "NDHWC", (5, "channels_first"): "NCDHW",
}


def inference_graph_def(sess, output_node_names):
    """A frozen GraphDef computing `output_node_names` in inference mode.

    Every fused_bn op the outputs depend on is replaced by stock TensorFlow
    ops: `FusedBn>Forward` (whatever its `training` input: the placeholder
    is not needed any more) by the inference batch norm with its moving
    statistics, `FusedBn>Normalize` by the same with its given statistics,
    `FusedBn>Moments` by a mean and a variance over the non-channel axes.
    The stock op is `FusedBatchNormV3` (is_training=False) for rank 4 and 5
    inputs of half, bfloat16 or float32 in either layout; rank 2 and 3, and
    float64, get `x * a + b` in the statistics' dtype. A side input and a
    ReLU epilogue (`activation` attr) become an AddV2 and a Relu. Then the
    variables, moving statistics included, are turned into constants with
    their values in `sess`. The result imports and runs in a process
    without fused_bn (`tf.compat.v1.import_graph_def`).

    Args:
      sess: the `tf.compat.v1.Session` holding the variables' values.
      output_node_names: list of node (op) names to keep, e.g. `[y.op.name]`.

    Returns:
      A `GraphDef` with the outputs under their original names.

    Raises:
      TypeError: `output_node_names` is not a list of strings.
      ValueError: a name is not a node of `sess.graph`, or an output depends
        on an op that has no inference form: `FusedBn>UpdateMovingStats`
        (an in-place update), `FusedBn>ForwardGrad` (a gradient), a
        `FusedBn>Forward` without moving statistics, or a fused_bn op inside
        a function (tf.function, cond_v2/while_v2 branch). The message
        names the node.
    """
    if isinstance(output_node_names, str) or not all(
            isinstance(n, str) for n in output_node_names):
        raise TypeError(
            "output_node_names must be a list of node names (str), got "
            f"{output_node_names!r}")
    output_node_names = list(output_node_names)
    if not output_node_names:
        raise ValueError("output_node_names must name at least one node")
    graph = sess.graph
    for name in output_node_names:
        if ":" in name:
            raise ValueError(
                f"output_node_names must be node names, got the tensor name "
                f"{name!r} (use {name.split(':')[0]!r})")
        try:
            graph.get_operation_by_name(name)
        except KeyError:
            raise ValueError(
                f"output node {name!r} is not in the session's graph") from None
    # extract_sub_graph is the converter's own pruning (it calls it too), only
    # marked deprecated for TF2 users.
    with deprecation.silence():
        graph_def = extract_sub_graph(graph.as_graph_def(), output_node_names)
        _check_functions(graph_def)
        graph_def = _replace_fused_ops(graph_def, graph)
        frozen = convert_to_constants.convert_variables_to_constants_from_session_graph(
            sess, graph_def, output_node_names)
    return _prune_library(frozen)


def _inputs_by_arg(node):
    """{input arg name: [input strings]} of a node, from its op's OpDef."""
    op_def = op_def_registry.get(node.op)
    data = [i for i in node.input if not i.startswith("^")]
    args, start = {}, 0
    for arg in op_def.input_arg:
        if arg.number_attr:
            count = node.attr[arg.number_attr].i
        elif arg.type_list_attr:
            count = len(node.attr[arg.type_list_attr].list.type)
        else:
            count = 1
        args[arg.name] = data[start:start + count]
        start += count
    return args


def _check_known_inputs(node, args, known):
    """An input this module does not know would be dropped: an error."""
    unknown = [a for a, inputs in args.items()
               if inputs and a not in known and not a.startswith("side_input")]
    if unknown:
        raise ValueError(
            f"node {node.name!r} ({node.op}) has inputs {unknown} that "
            "inference_graph_def does not know how to replace")


def _activation(node):
    """'none' or 'relu', the epilogue of a Forward/Normalize node."""
    activation = (node.attr["activation"].s.decode()
                  if "activation" in node.attr else "none")
    if activation not in ("none", "relu"):
        raise ValueError(
            f"node {node.name!r} ({node.op}) has activation {activation!r}; "
            "inference_graph_def knows 'none' and 'relu'")
    return activation


def _batch_norm(x, mean, variance, scale, offset, epsilon, data_format,
                node_name):
    """Stock inference batch norm of x with [C] statistics in their dtype."""
    rank = x.shape.rank
    fmt = _FUSED_BATCH_NORM_FORMATS.get((rank, data_format))
    if fmt is not None and x.dtype != tf.float64:
        return tf.raw_ops.FusedBatchNormV3(
            x=x, scale=scale, offset=offset, mean=mean, variance=variance,
            epsilon=epsilon, exponential_avg_factor=1.0, data_format=fmt,
            is_training=False).y
    a = scale * tf.math.rsqrt(variance + tf.constant(epsilon, variance.dtype))
    b = offset - mean * a
    if data_format == "channels_first":
        if rank is None:
            raise ValueError(
                f"node {node_name!r}: the rank of its channels-first input "
                "must be known to freeze it")
        a = tf.reshape(a, [-1] + [1] * (rank - 2))
        b = tf.reshape(b, [-1] + [1] * (rank - 2))
    return tf.cast(tf.cast(x, a.dtype) * a + b, x.dtype)


def _epilogue(y, side_inputs, activation):
    for s in side_inputs:
        y = y + s
    return tf.nn.relu(y) if activation == "relu" else y


def _replace_fused_ops(graph_def, graph):
    """graph_def with each fused_bn node replaced by stock nodes."""
    out = graph_pb2.GraphDef()
    out.versions.CopyFrom(graph_def.versions)
    out.library.CopyFrom(graph_def.library)
    renamed = {}  # "node:k" -> "replacement:i" for outputs k > 0
    for node in graph_def.node:
        if not node.op.startswith(_PREFIX):
            out.node.add().CopyFrom(node)
            continue
        if node.op in _TRAINING_ONLY:
            raise ValueError(
                f"node {node.name!r} ({node.op}) {_TRAINING_ONLY[node.op]}: "
                "it has no inference form, and the outputs "
                f"depend on it. Freeze a graph built for inference (e.g. "
                "without the update or gradient), or other outputs")
        replace = _REPLACEMENTS.get(node.op)
        if replace is None:
            raise ValueError(
                f"node {node.name!r} ({node.op}) is not an inference op: "
                "inference_graph_def cannot replace it")
        nodes, outputs = replace(node, graph.get_operation_by_name(node.name))
        out.node.extend(nodes)
        for k, tensor in enumerate(outputs[1:], start=1):
            renamed[f"{node.name}:{k}"] = tensor
    for node in out.node:
        node.input[:] = [_renamed_input(i, renamed) for i in node.input]
    return out


def _renamed_input(name, renamed):
    if name.startswith("^"):
        return name
    if ":" not in name:
        name += ":0"
    target = renamed.get(name)
    if target is None:
        return name[:-2] if name.endswith(":0") else name
    return target


def _splice(node, op, build):
    """Stock nodes standing in for a fused_bn `node`.

    `build(*placeholders)` makes the stock ops in a scratch graph, from one
    placeholder per data input of `op` (the live tf.Operation, for dtypes and
    shapes), and returns the tensors for the node's outputs. Those become
    nodes named `<node>/inference/...`; output 0 is an Identity named like
    the node, so the outputs keep their names. Returns (nodes, the tensor
    names now standing for the node's outputs 0, 1, ...).
    """
    prefix = f"{node.name}/inference"
    data = [i for i in node.input if not i.startswith("^")]
    control = [i for i in node.input if i.startswith("^")]
    scratch = tf.Graph()
    with scratch.as_default():
        placeholders = [
            _v1.placeholder(t.dtype, t.shape, name=f"input_{i}")
            for i, t in enumerate(op.inputs)]
        outputs = build(*placeholders)
    feeds = {p.op.name: data[i] for i, p in enumerate(placeholders)}
    nodes = []
    for scratch_node in scratch.as_graph_def().node:
        if scratch_node.name in feeds:
            continue
        new = node_def_pb2.NodeDef()
        new.CopyFrom(scratch_node)
        new.name = f"{prefix}/{scratch_node.name}"
        new.device = node.device
        new.input[:] = [_scratch_input(i, feeds, prefix)
                        for i in scratch_node.input]
        nodes.append(new)
    identity = node_def_pb2.NodeDef(name=node.name, op="Identity",
                                    device=node.device)
    identity.input.append(f"{prefix}/{outputs[0].name}")
    identity.input.extend(control)
    identity.attr["T"].type = outputs[0].dtype.as_datatype_enum
    nodes.append(identity)
    return nodes, [node.name] + [f"{prefix}/{t.name}" for t in outputs[1:]]


def _scratch_input(name, feeds, prefix):
    control = name.startswith("^")
    base = name.lstrip("^").split(":")[0]
    if base in feeds:
        fed = feeds[base]
        return "^" + fed.split(":")[0] if control else fed
    return ("^" if control else "") + f"{prefix}/{name.lstrip('^')}"


def _replace_forward(node, op):
    """FusedBn>Forward: the inference batch norm with the moving statistics."""
    args = _inputs_by_arg(node)
    _check_known_inputs(node, args, {
        "x", "scale", "offset", "moving_mean", "moving_variance",
        "num_updates", "training"})
    if not args["moving_mean"]:
        raise ValueError(
            f"node {node.name!r} ({node.op}) has no moving statistics (it was "
            "built with training=True and no moving_mean/moving_variance): "
            "it has no inference form")
    positions = _positions(node, args)
    epsilon = node.attr["epsilon"].f
    data_format = node.attr["data_format"].s.decode()
    activation = _activation(node)
    u = tf.as_dtype(node.attr["U"].type)

    def build(*inputs):
        x, scale, offset = (inputs[positions[a][0]]
                            for a in ("x", "scale", "offset"))
        mean = tf.raw_ops.ReadVariableOp(
            resource=inputs[positions["moving_mean"][0]], dtype=u)
        variance = tf.raw_ops.ReadVariableOp(
            resource=inputs[positions["moving_variance"][0]], dtype=u)
        y = _batch_norm(x, mean, variance, scale, offset, epsilon,
                        data_format, node.name)
        sides = [inputs[i] for a, idx in positions.items()
                 if a.startswith("side_input") for i in idx]
        inv_std = tf.math.rsqrt(variance + tf.constant(epsilon, u))
        return [_epilogue(y, sides, activation), tf.identity(mean), inv_std]

    return _splice(node, op, build)


def _replace_normalize(node, op):
    """FusedBn>Normalize: the inference batch norm with its statistics."""
    args = _inputs_by_arg(node)
    _check_known_inputs(node, args, {"x", "mean", "variance", "scale", "offset"})
    positions = _positions(node, args)
    epsilon = node.attr["epsilon"].f
    data_format = node.attr["data_format"].s.decode()
    activation = _activation(node)

    def build(*inputs):
        x, mean, variance, scale, offset = (
            inputs[positions[a][0]]
            for a in ("x", "mean", "variance", "scale", "offset"))
        y = _batch_norm(x, mean, variance, scale, offset, epsilon,
                        data_format, node.name)
        sides = [inputs[i] for a, idx in positions.items()
                 if a.startswith("side_input") for i in idx]
        return [_epilogue(y, sides, activation)]

    return _splice(node, op, build)


def _replace_moments(node, op):
    """FusedBn>Moments: biased mean and variance over the non-channel axes."""
    data_format = node.attr["data_format"].s.decode()
    u = tf.as_dtype(node.attr["U"].type)

    def build(x):
        rank = x.shape.rank
        if rank is None:
            raise ValueError(
                f"node {node.name!r} ({node.op}): the rank of its input must "
                "be known to freeze it")
        channel = rank - 1 if data_format == "channels_last" else 1
        axes = [a for a in range(rank) if a != channel]
        xu = tf.cast(x, u)
        mean = tf.reduce_mean(xu, axes, keepdims=True)
        variance = tf.reduce_mean(tf.math.squared_difference(xu, mean), axes)
        return [tf.reshape(mean, [-1]), variance]

    return _splice(node, op, build)


def _positions(node, args):
    """{input arg name: [indices into the node's data inputs]}."""
    positions, start = {}, 0
    for name, inputs in args.items():
        positions[name] = list(range(start, start + len(inputs)))
        start += len(inputs)
    return positions


_REPLACEMENTS = {
    "FusedBn>Forward": _replace_forward,
    "FusedBn>Normalize": _replace_normalize,
    "FusedBn>Moments": _replace_moments,
}


def _used_functions(graph_def):
    """{name: FunctionDef} of the library functions the nodes call."""
    functions = {f.signature.name: f for f in graph_def.library.function}
    used, pending = {}, list(graph_def.node)
    while pending:
        node = pending.pop()
        for name in _called_functions(node):
            if name in functions and name not in used:
                used[name] = functions[name]
                pending.extend(functions[name].node_def)
    return used


def _check_functions(graph_def):
    """A fused_bn op inside a called function cannot be replaced: an error."""
    for name, function in sorted(_used_functions(graph_def).items()):
        for node in function.node_def:
            if node.op.startswith(_PREFIX):
                raise ValueError(
                    f"node {node.name!r} ({node.op}) is inside function "
                    f"{name!r} (a tf.function or a v2 cond/while branch): "
                    "inference_graph_def replaces fused_bn ops in the "
                    "session's graph only; build the graph without "
                    "wrapping them in functions")


def _prune_library(graph_def):
    """graph_def without the library functions its nodes do not call."""
    used = _used_functions(graph_def)
    out = graph_pb2.GraphDef()
    out.CopyFrom(graph_def)
    del out.library.function[:]
    out.library.function.extend(used[n] for n in sorted(used))
    kept = [g for g in graph_def.library.gradient if g.function_name in used]
    del out.library.gradient[:]
    out.library.gradient.extend(kept)
    return out


def _called_functions(node):
    for value in node.attr.values():
        if value.HasField("func"):
            yield value.func.name
        for func in value.list.func:
            yield func.name
