"""Bad input (SPEC section 4): every misuse raises an error naming the
argument, at trace time when the shape is static and in the C++ kernel at run
time otherwise, and never changes the moving statistics or the counter."""
import numpy as np
import pytest
import tensorflow as tf

import fused_bn
from fused_bn._loader import ops as raw_ops

C = 5
INVALID = tf.errors.InvalidArgumentError


class State:
    """Moving statistics and counter with distinctive values."""

    def __init__(self, c=C, dtype=tf.float32):
        self.mm = tf.Variable(tf.range(c, dtype=dtype) * 0.5 - 1.0, name="mm")
        self.mv = tf.Variable(tf.range(c, dtype=dtype) + 2.0, name="mv")
        self.n = tf.Variable(tf.constant(7, tf.int64), name="n")
        self.saved = self.snapshot()

    def snapshot(self):
        return [v.numpy().copy() for v in (self.mm, self.mv, self.n)]

    def assert_unchanged(self):
        for before, after in zip(self.saved, self.snapshot()):
            np.testing.assert_array_equal(before, after)

    def kw(self):
        return dict(moving_mean=self.mm, moving_variance=self.mv, num_updates=self.n)


def _x(shape=(4, 3, 3, C), dtype=tf.float32):
    return tf.random.stateless_normal(shape, [1, 2], dtype=dtype)


def check_raises(fn, exc, *words):
    with pytest.raises(exc) as info:
        fn()
    msg = str(info.value)
    for w in words:
        assert w in msg, f"{w!r} not in error message: {msg}"
    return msg


# (id, call(s) -> y, exception, words the message must contain)
STATIC_CASES = [
    ("rank1", lambda s: fused_bn.batch_norm(tf.zeros([C]), True, **s.kw()),
     ValueError, ["x", "rank 2 to 5"]),
    ("rank6", lambda s: fused_bn.batch_norm(tf.zeros([2, 1, 1, 1, 1, C]), True, **s.kw()),
     ValueError, ["x", "rank 2 to 5"]),
    ("axis=2", lambda s: fused_bn.batch_norm(_x(), True, axis=2, **s.kw()),
     ValueError, ["axis", "-1", "1"]),
    ("axis=0", lambda s: fused_bn.batch_norm(_x(), True, axis=0, **s.kw()),
     ValueError, ["axis"]),
    ("axis=-4", lambda s: fused_bn.batch_norm(_x(), True, axis=-4, **s.kw()),
     ValueError, ["axis"]),
    ("axis=1.0", lambda s: fused_bn.batch_norm(_x(), True, axis=1.0, **s.kw()),
     TypeError, ["axis"]),
    ("axis=True", lambda s: fused_bn.batch_norm(_x(), True, axis=True, **s.kw()),
     TypeError, ["axis"]),
    ("scale C", lambda s: fused_bn.batch_norm(_x(), True, scale=tf.ones([C - 1]), **s.kw()),
     ValueError, ["scale", f"[{C}]"]),
    ("offset C", lambda s: fused_bn.batch_norm(_x(), True, offset=tf.ones([C + 1]), **s.kw()),
     ValueError, ["offset", f"[{C}]"]),
    ("scale rank 2", lambda s: fused_bn.batch_norm(_x(), True, scale=tf.ones([1, C]), **s.kw()),
     ValueError, ["scale"]),
    ("offset scalar", lambda s: fused_bn.batch_norm(_x(), True, offset=tf.zeros([]), **s.kw()),
     ValueError, ["offset"]),
    ("scale float64", lambda s: fused_bn.batch_norm(_x(), True, scale=tf.ones([C], tf.float64), **s.kw()),
     TypeError, ["scale", "float32"]),
    ("moving_mean C", lambda s: fused_bn.batch_norm(
        _x(), True, moving_mean=tf.Variable(tf.zeros([C - 1])), moving_variance=s.mv, num_updates=s.n),
     ValueError, ["moving_mean", f"[{C}]"]),
    ("moving_variance C", lambda s: fused_bn.batch_norm(
        _x(), True, moving_mean=s.mm, moving_variance=tf.Variable(tf.ones([C + 3])), num_updates=s.n),
     ValueError, ["moving_variance", f"[{C}]"]),
    ("moving_mean rank 2", lambda s: fused_bn.batch_norm(
        _x(), True, moving_mean=tf.Variable(tf.zeros([1, C])), moving_variance=s.mv, num_updates=s.n),
     ValueError, ["moving_mean"]),
    ("moving_mean float64", lambda s: fused_bn.batch_norm(
        _x(), True, moving_mean=tf.Variable(tf.zeros([C], tf.float64)), moving_variance=s.mv,
        num_updates=s.n),
     TypeError, ["moving_mean", "float32"]),
    ("moving_variance not a variable", lambda s: fused_bn.batch_norm(
        _x(), True, moving_mean=s.mm, moving_variance=tf.ones([C]), num_updates=s.n),
     TypeError, ["moving_variance", "Variable"]),
    ("x int32", lambda s: fused_bn.batch_norm(tf.zeros([4, C], tf.int32), True, **s.kw()),
     TypeError, ["x", "float"]),
    ("x int64", lambda s: fused_bn.batch_norm(tf.zeros([4, C], tf.int64), True, **s.kw()),
     TypeError, ["x", "int64"]),
    ("x uint8", lambda s: fused_bn.batch_norm(tf.zeros([4, C], tf.uint8), True, **s.kw()),
     TypeError, ["x", "uint8"]),
    ("x complex64", lambda s: fused_bn.batch_norm(tf.zeros([4, C], tf.complex64), True, **s.kw()),
     TypeError, ["x", "complex64"]),
    ("x complex128", lambda s: fused_bn.batch_norm(tf.zeros([4, C], tf.complex128), True, **s.kw()),
     TypeError, ["x", "complex128"]),
    ("x bool", lambda s: fused_bn.batch_norm(tf.zeros([4, C], tf.bool), True, **s.kw()),
     TypeError, ["x", "bool"]),
    ("x numpy int", lambda s: fused_bn.batch_norm(np.zeros([4, C], np.int32), True, **s.kw()),
     TypeError, ["x"]),
    ("training vector", lambda s: fused_bn.batch_norm(_x(), tf.constant([True, False]), **s.kw()),
     ValueError, ["training", "scalar"]),
    ("training int tensor", lambda s: fused_bn.batch_norm(_x(), tf.constant(1), **s.kw()),
     TypeError, ["training", "bool"]),
    ("training float tensor", lambda s: fused_bn.batch_norm(_x(), tf.constant(1.0), **s.kw()),
     TypeError, ["training", "bool"]),
    ("training int", lambda s: fused_bn.batch_norm(_x(), 1, **s.kw()),
     TypeError, ["training", "bool"]),
    ("training 0.0", lambda s: fused_bn.batch_norm(_x(), 0.0, **s.kw()),
     TypeError, ["training", "bool"]),
    ("training None", lambda s: fused_bn.batch_norm(_x(), None, **s.kw()),
     TypeError, ["training", "bool"]),
    ("training str", lambda s: fused_bn.batch_norm(_x(), "yes", **s.kw()),
     TypeError, ["training", "bool"]),
    ("momentum 1.5", lambda s: fused_bn.batch_norm(_x(), True, momentum=1.5, **s.kw()),
     ValueError, ["momentum", "[0, 1]"]),
    ("momentum -0.1", lambda s: fused_bn.batch_norm(_x(), True, momentum=-0.1, **s.kw()),
     ValueError, ["momentum", "[0, 1]"]),
    ("momentum nan", lambda s: fused_bn.batch_norm(_x(), True, momentum=float("nan"), **s.kw()),
     ValueError, ["momentum"]),
    ("momentum inf", lambda s: fused_bn.batch_norm(_x(), True, momentum=float("inf"), **s.kw()),
     ValueError, ["momentum"]),
    ("momentum tensor", lambda s: fused_bn.batch_norm(_x(), True, momentum=tf.constant(0.9), **s.kw()),
     ValueError, ["momentum"]),
    ("epsilon 0", lambda s: fused_bn.batch_norm(_x(), True, epsilon=0, **s.kw()),
     ValueError, ["epsilon", "> 0"]),
    ("epsilon -1e-3", lambda s: fused_bn.batch_norm(_x(), True, epsilon=-1e-3, **s.kw()),
     ValueError, ["epsilon", "> 0"]),
    ("epsilon nan", lambda s: fused_bn.batch_norm(_x(), True, epsilon=float("nan"), **s.kw()),
     ValueError, ["epsilon"]),
    ("epsilon inf", lambda s: fused_bn.batch_norm(_x(), True, epsilon=float("inf"), **s.kw()),
     ValueError, ["epsilon"]),
    ("epsilon 1e-50 (0 in float32)", lambda s: fused_bn.batch_norm(_x(), True, epsilon=1e-50, **s.kw()),
     ValueError, ["epsilon"]),
    ("epsilon 1e39 (inf in float32)", lambda s: fused_bn.batch_norm(_x(), True, epsilon=1e39, **s.kw()),
     ValueError, ["epsilon"]),
    ("inference without moving stats", lambda s: fused_bn.batch_norm(_x(), False),
     ValueError, ["moving_mean", "moving_variance"]),
    ("tensor False without moving stats", lambda s: fused_bn.batch_norm(_x(), tf.constant(False)),
     ValueError, ["moving_mean", "moving_variance"]),
    ("bool variable without moving stats", lambda s: fused_bn.batch_norm(_x(), tf.Variable(True)),
     ValueError, ["moving_mean", "moving_variance"]),
    ("only moving_mean", lambda s: fused_bn.batch_norm(_x(), True, moving_mean=s.mm),
     ValueError, ["moving_variance"]),
    ("only moving_variance", lambda s: fused_bn.batch_norm(_x(), False, moving_variance=s.mv),
     ValueError, ["moving_mean"]),
    ("num_updates without moving stats", lambda s: fused_bn.batch_norm(_x(), True, num_updates=s.n),
     ValueError, ["num_updates"]),
    ("count 1 channels-last", lambda s: fused_bn.batch_norm(tf.ones([1, C]), True, **s.kw()),
     ValueError, ["training", "at least 2 values"]),
    ("count 1 NHWC", lambda s: fused_bn.batch_norm(tf.ones([1, 1, 1, C]), True, **s.kw()),
     ValueError, ["training", "at least 2 values"]),
    ("count 1 NCHW", lambda s: fused_bn.batch_norm(tf.ones([1, C, 1, 1]), True, axis=1, **s.kw()),
     ValueError, ["training", "at least 2 values"]),
    ("count 0", lambda s: fused_bn.batch_norm(tf.ones([0, C]), True, **s.kw()),
     ValueError, ["training", "at least 2 values"]),
    ("count 1 no moving stats", lambda s: fused_bn.batch_norm(tf.ones([1, 1, C]), True),
     ValueError, ["training", "at least 2 values"]),
    ("num_updates int32", lambda s: fused_bn.batch_norm(
        _x(), True, moving_mean=s.mm, moving_variance=s.mv, num_updates=tf.Variable(0)),
     TypeError, ["num_updates", "int64"]),
    ("num_updates float", lambda s: fused_bn.batch_norm(
        _x(), True, moving_mean=s.mm, moving_variance=s.mv, num_updates=tf.Variable(0.0)),
     TypeError, ["num_updates", "int64"]),
    ("num_updates vector", lambda s: fused_bn.batch_norm(
        _x(), True, moving_mean=s.mm, moving_variance=s.mv,
        num_updates=tf.Variable(tf.zeros([1], tf.int64))),
     ValueError, ["num_updates", "scalar"]),
    ("num_updates not a variable", lambda s: fused_bn.batch_norm(
        _x(), True, moving_mean=s.mm, moving_variance=s.mv, num_updates=tf.constant(0, tf.int64)),
     TypeError, ["num_updates"]),
]


@pytest.mark.parametrize("call,exc,words", [c[1:] for c in STATIC_CASES],
                         ids=[c[0] for c in STATIC_CASES])
def test_batch_norm_trace_time(call, exc, words):
    s = State()
    check_raises(lambda: call(s), exc, *words)
    s.assert_unchanged()


@pytest.mark.parametrize("call,exc,words", [c[1:] for c in STATIC_CASES],
                         ids=[c[0] for c in STATIC_CASES])
def test_batch_norm_trace_time_in_tf_function(call, exc, words):
    """The same checks fire while tracing a tf.function (static shapes)."""
    s = State()
    check_raises(tf.function(lambda: call(s)), exc, *words)
    s.assert_unchanged()


def test_valid_call_changes_state():
    """Sanity check of the fixture: a valid training call does update it."""
    s = State()
    fused_bn.batch_norm(_x(), True, **s.kw())
    assert s.n.numpy() == 8
    assert not np.array_equal(s.mm.numpy(), s.saved[0])


def _dynamic(fn, *specs):
    """fn as a tf.function whose inputs have unknown shape: checks run in C++."""
    return tf.function(fn, input_signature=[tf.TensorSpec(shape, dtype) for shape, dtype in specs])


F32_ANY = (None, tf.float32)
F32_2D = ([None, None], tf.float32)
BOOL_ANY = (None, tf.bool)


def _with_var(value, make_fn, **kwargs):
    """make_fn(v) for a variable created outside the tf.function."""
    return make_fn(tf.Variable(value, **kwargs))


def _run_time_cases():
    """(id, build(s) -> (tf.function, args), words)."""
    return [
        ("rank1", lambda s: (_dynamic(lambda x: fused_bn.batch_norm(x, True, **s.kw()), F32_ANY),
                             [tf.zeros([C])]), ["x", "rank 2 to 5"]),
        ("rank6", lambda s: (_dynamic(lambda x: fused_bn.batch_norm(x, True, **s.kw()), F32_ANY),
                             [tf.zeros([1, 1, 1, 1, 2, C])]), ["x", "rank 2 to 5"]),
        ("rank1 inference", lambda s: (
            _dynamic(lambda x: fused_bn.batch_norm(x, False, **s.kw()), F32_ANY),
            [tf.zeros([C])]), ["x", "rank 2 to 5"]),
        ("moving stats C (unknown rank)", lambda s: (
            _dynamic(lambda x: fused_bn.batch_norm(x, True, **s.kw()), F32_ANY),
            [tf.zeros([4, C - 1])]), ["moving_mean", f"[{C - 1}]"]),
        ("moving stats C (unknown dims)", lambda s: (
            _dynamic(lambda x: fused_bn.batch_norm(x, True, **s.kw()), F32_2D),
            [tf.zeros([4, C + 1])]), ["moving_mean", f"[{C + 1}]"]),
        ("moving stats C inference", lambda s: (
            _dynamic(lambda x: fused_bn.batch_norm(x, False, **s.kw()), F32_2D),
            [tf.zeros([4, C + 1])]), ["moving_mean", f"[{C + 1}]"]),
        ("moving stats C axis=1", lambda s: (
            _dynamic(lambda x: fused_bn.batch_norm(x, True, axis=1, **s.kw()), F32_ANY),
            [tf.zeros([2, C - 1, 3])]), ["moving_mean", f"[{C - 1}]"]),
        ("moving_variance C", lambda s: (
            _with_var(tf.ones([C + 2]), lambda v: _dynamic(lambda x: fused_bn.batch_norm(
                x, True, moving_mean=s.mm, moving_variance=v, num_updates=s.n), F32_2D)),
            [tf.zeros([4, C])]), ["moving_variance", f"[{C}]"]),
        ("scale C", lambda s: (
            _dynamic(lambda x, g: fused_bn.batch_norm(x, True, scale=g, **s.kw()), F32_2D, F32_ANY),
            [tf.zeros([4, C]), tf.ones([C - 1])]), ["scale", f"[{C}]"]),
        ("offset C", lambda s: (
            _dynamic(lambda x, b: fused_bn.batch_norm(x, True, offset=b, **s.kw()), F32_2D, F32_ANY),
            [tf.zeros([4, C]), tf.ones([C + 1])]), ["offset", f"[{C}]"]),
        ("scale rank 2", lambda s: (
            _dynamic(lambda x, g: fused_bn.batch_norm(x, False, scale=g, **s.kw()), F32_ANY, F32_ANY),
            [tf.zeros([4, C]), tf.ones([1, C])]), ["scale"]),
        ("training vector", lambda s: (
            _dynamic(lambda x, t: fused_bn.batch_norm(x, t, **s.kw()), F32_2D, BOOL_ANY),
            [tf.zeros([4, C]), tf.constant([True, True])]), ["training", "scalar"]),
        ("count 1 (training tensor True)", lambda s: (
            _dynamic(lambda x, t: fused_bn.batch_norm(x, t, **s.kw()), F32_2D, BOOL_ANY),
            [tf.zeros([1, C]), tf.constant(True)]), ["training", "at least 2 values"]),
        ("count 1 NHWC", lambda s: (
            _dynamic(lambda x: fused_bn.batch_norm(x, True, **s.kw()), F32_ANY),
            [tf.zeros([1, 1, 1, C])]), ["training", "at least 2 values"]),
        ("count 1 NCDHW", lambda s: (
            _dynamic(lambda x: fused_bn.batch_norm(x, True, axis=1, **s.kw()), F32_ANY),
            [tf.zeros([1, C, 1, 1, 1])]), ["training", "at least 2 values"]),
        ("count 0", lambda s: (
            _dynamic(lambda x: fused_bn.batch_norm(x, True, **s.kw()), F32_ANY),
            [tf.zeros([0, C])]), ["training", "at least 2 values"]),
        ("count 1 without moving stats", lambda s: (
            _dynamic(lambda x: fused_bn.batch_norm(x, True), F32_ANY),
            [tf.zeros([1, C])]), ["training", "at least 2 values"]),
        ("moving_mean of unknown static shape", lambda s: (
            _with_var(tf.zeros([C + 1]), lambda v: _dynamic(lambda x: fused_bn.batch_norm(
                x, True, moving_mean=v, moving_variance=s.mv, num_updates=s.n), F32_2D),
                shape=tf.TensorShape(None)),
            [tf.zeros([4, C])]), ["moving_mean", f"[{C}]"]),
        ("num_updates of unknown static shape", lambda s: (
            _with_var(tf.zeros([2], tf.int64), lambda v: _dynamic(lambda x: fused_bn.batch_norm(
                x, True, moving_mean=s.mm, moving_variance=s.mv, num_updates=v), F32_2D),
                shape=tf.TensorShape(None)),
            [tf.zeros([4, C])]), ["num_updates", "int64"]),
    ]


RUN_TIME_CASES = _run_time_cases()


@pytest.mark.parametrize("build,words", [c[1:] for c in RUN_TIME_CASES],
                         ids=[c[0] for c in RUN_TIME_CASES])
def test_batch_norm_run_time(build, words):
    s = State()
    fn, args = build(s)
    check_raises(lambda: fn(*args), INVALID, *words)
    s.assert_unchanged()


def test_run_time_inference_with_one_value_is_fine():
    """count < 2 is only an error when training is True at run time."""
    s = State()
    fn = _dynamic(lambda x, t: fused_bn.batch_norm(x, t, **s.kw()), F32_2D, BOOL_ANY)
    y = fn(tf.ones([1, C]), tf.constant(False))
    expected = (1.0 - s.saved[0]) / np.sqrt(s.saved[1] + 1e-3)
    np.testing.assert_allclose(y.numpy()[0], expected, rtol=1e-6)
    s.assert_unchanged()


def test_tensor_training_without_moving_stats_fails_at_trace():
    """A training tensor that may be False at run time needs the statistics."""
    fn = _dynamic(lambda x, t: fused_bn.batch_norm(x, t), F32_2D, BOOL_ANY)
    check_raises(lambda: fn(tf.ones([4, C]), tf.constant(False)), ValueError,
                 "moving_mean", "moving_variance")


def test_unknown_static_shape_variables_ok_when_right():
    """Variables with unknown static shape are checked at run time only."""
    mm = tf.Variable(tf.zeros([C]), shape=tf.TensorShape(None))
    mv = tf.Variable(tf.ones([C]), shape=tf.TensorShape(None))
    fused_bn.batch_norm(_x(), True, moving_mean=mm, moving_variance=mv, momentum=0.0)
    assert mm.numpy().shape == (C,)
    assert np.all(mv.numpy() > 0)


# The C++ kernel's own checks, reached by calling the raw op directly (the
# Python wrapper rejects these before they get there).
def _raw_forward(s, x=None, training=True, moving=True, counters=None, **attrs):
    x = _x() if x is None else x
    c = x.shape[-1]
    attrs.setdefault("epsilon", 1e-3)
    attrs.setdefault("momentum", 0.9)
    return raw_ops.fused_bn_forward(
        x=x, scale=tf.ones([c]), offset=tf.zeros([c]),
        moving_mean=[s.mm.handle] if moving else [],
        moving_variance=[s.mv.handle] if moving else [],
        num_updates=[s.n.handle] if counters is None else counters,
        side_input=attrs.pop("side_input", []), training=tf.constant(training), **attrs)


RAW_CASES = [
    ("momentum nan", lambda s: _raw_forward(s, momentum=float("nan")), ["momentum", "[0, 1]"]),
    ("momentum 1.01", lambda s: _raw_forward(s, momentum=1.01), ["momentum", "[0, 1]"]),
    ("momentum -1", lambda s: _raw_forward(s, momentum=-1.0), ["momentum", "[0, 1]"]),
    ("epsilon 0", lambda s: _raw_forward(s, epsilon=0.0), ["epsilon", "> 0"]),
    ("epsilon -1", lambda s: _raw_forward(s, epsilon=-1.0), ["epsilon", "> 0"]),
    ("epsilon nan", lambda s: _raw_forward(s, epsilon=float("nan")), ["epsilon"]),
    ("epsilon inf", lambda s: _raw_forward(s, epsilon=float("inf")), ["epsilon"]),
    ("inference without moving stats",
     lambda s: _raw_forward(s, training=False, moving=False, counters=[]),
     ["moving_mean", "moving_variance", "training"]),
    ("num_updates without moving stats", lambda s: _raw_forward(s, moving=False),
     ["num_updates"]),
    ("num_updates int32", lambda s: _raw_forward(s, counters=[tf.Variable(0).handle]),
     ["num_updates", "int64", "int32"]),
    ("num_updates vector", lambda s: _raw_forward(
        s, counters=[tf.Variable(tf.zeros([3], tf.int64)).handle]), ["num_updates", "int64"]),
    ("count 1", lambda s: _raw_forward(s, x=tf.ones([1, C])), ["training", "at least 2 values"]),
    ("moving_mean float64", lambda s: raw_ops.fused_bn_forward(
        x=_x(), scale=tf.ones([C]), offset=tf.zeros([C]),
        moving_mean=[tf.Variable(tf.zeros([C], tf.float64)).handle], moving_variance=[s.mv.handle],
        num_updates=[s.n.handle], side_input=[], training=tf.constant(True), epsilon=1e-3,
        momentum=0.9),
     ["moving_mean", "float", "double"]),
    ("moving_variance uninitialized", lambda s: raw_ops.fused_bn_forward(
        x=_x(), scale=tf.ones([C]), offset=tf.zeros([C]), moving_mean=[s.mm.handle],
        moving_variance=[tf.raw_ops.VarHandleOp(dtype=tf.float32, shape=[C], shared_name="nope")],
        num_updates=[s.n.handle], side_input=[], training=tf.constant(True), epsilon=1e-3,
        momentum=0.9),
     ["moving_variance"]),
    ("side_input shape", lambda s: _raw_forward(s, side_input=[tf.ones([4, C + 1])]),
     ["side_input", "x's shape"]),
    ("side_input two tensors", lambda s: _raw_forward(s, side_input=[_x(), _x()]),
     ["side_input", "at most one"]),
    ("activation name", lambda s: _raw_forward(s, activation="gelu"), ["activation"]),
]


@pytest.mark.parametrize("call,words", [c[1:] for c in RAW_CASES], ids=[c[0] for c in RAW_CASES])
def test_kernel_checks(call, words):
    s = State()
    check_raises(lambda: call(s), INVALID, *words)
    s.assert_unchanged()


# Building blocks.
def test_moments_errors():
    check_raises(lambda: fused_bn.moments(tf.zeros([C])), ValueError, "x", "rank 2 to 5")
    check_raises(lambda: fused_bn.moments(tf.zeros([4, C], tf.int32)), TypeError, "x")
    check_raises(lambda: fused_bn.moments(tf.zeros([4, C], tf.complex64)), TypeError, "x")
    check_raises(lambda: fused_bn.moments(_x(), axis=2), ValueError, "axis")
    check_raises(lambda: fused_bn.moments(tf.zeros([0, C])), ValueError, "at least 1 value")
    fn = _dynamic(fused_bn.moments, F32_ANY)
    check_raises(lambda: fn(tf.zeros([0, C])), INVALID, "at least 1 value")
    check_raises(lambda: fn(tf.zeros([C])), INVALID, "x", "rank 2 to 5")
    check_raises(lambda: fn(tf.zeros([1, 1, 1, 1, 1, C])), INVALID, "x", "rank 2 to 5")


NORMALIZE_CASES = [
    ("mean C", lambda x: fused_bn.normalize(x, tf.zeros([C - 1]), tf.ones([C])), ValueError, ["mean"]),
    ("variance C", lambda x: fused_bn.normalize(x, tf.zeros([C]), tf.ones([C + 1])), ValueError,
     ["variance"]),
    ("scale C", lambda x: fused_bn.normalize(x, tf.zeros([C]), tf.ones([C]), tf.ones([2])), ValueError,
     ["scale"]),
    ("offset C", lambda x: fused_bn.normalize(x, tf.zeros([C]), tf.ones([C]), None, tf.ones([2])),
     ValueError, ["offset"]),
    ("mean float64", lambda x: fused_bn.normalize(x, tf.zeros([C], tf.float64), tf.ones([C])),
     TypeError, ["mean", "float32"]),
    ("epsilon 0", lambda x: fused_bn.normalize(x, tf.zeros([C]), tf.ones([C]), epsilon=0.0),
     ValueError, ["epsilon"]),
    ("epsilon nan", lambda x: fused_bn.normalize(x, tf.zeros([C]), tf.ones([C]), epsilon=float("nan")),
     ValueError, ["epsilon"]),
    ("x int", lambda x: fused_bn.normalize(tf.cast(x, tf.int32), tf.zeros([C]), tf.ones([C])),
     TypeError, ["x"]),
    ("x rank 1", lambda x: fused_bn.normalize(x[0, 0, 0], tf.zeros([C]), tf.ones([C])),
     ValueError, ["x", "rank"]),
    ("axis", lambda x: fused_bn.normalize(x, tf.zeros([C]), tf.ones([C]), axis=3.5),
     TypeError, ["axis"]),
]


@pytest.mark.parametrize("call,exc,words", [c[1:] for c in NORMALIZE_CASES],
                         ids=[c[0] for c in NORMALIZE_CASES])
def test_normalize_errors(call, exc, words):
    check_raises(lambda: call(_x()), exc, *words)


@pytest.mark.parametrize("name,arg", [("mean", 1), ("variance", 2), ("scale", 3), ("offset", 4)])
def test_normalize_run_time(name, arg):
    fn = _dynamic(fused_bn.normalize, *[F32_ANY] * 5)
    args = [tf.zeros([4, C]), tf.zeros([C]), tf.ones([C]), tf.ones([C]), tf.zeros([C])]
    args[arg] = tf.ones([C - 1])
    check_raises(lambda: fn(*args), INVALID, name, f"[{C}]")
    args[arg] = tf.ones([1, C])
    check_raises(lambda: fn(*args), INVALID, name)


UPDATE_CASES = [
    ("mean C", lambda s: fused_bn.update_moving_stats(s.mm, s.mv, tf.zeros([C - 1]), tf.ones([C - 1]), 10),
     ValueError, ["moving_mean"]),
    ("variance C", lambda s: fused_bn.update_moving_stats(s.mm, s.mv, tf.zeros([C]), tf.ones([C - 1]), 10),
     ValueError, ["variance"]),
    ("mean scalar", lambda s: fused_bn.update_moving_stats(s.mm, s.mv, tf.zeros([]), tf.ones([C]), 10),
     ValueError, ["mean"]),
    ("mean int", lambda s: fused_bn.update_moving_stats(s.mm, s.mv, tf.zeros([C], tf.int32), tf.ones([C]), 10),
     TypeError, ["mean"]),
    ("mean float64 vs float32 variables", lambda s: fused_bn.update_moving_stats(
        s.mm, s.mv, tf.zeros([C], tf.float64), tf.ones([C], tf.float64), 10),
     TypeError, ["moving_mean", "float64"]),
    ("momentum 2", lambda s: fused_bn.update_moving_stats(s.mm, s.mv, tf.zeros([C]), tf.ones([C]), 10, 2.0),
     ValueError, ["momentum"]),
    ("momentum nan", lambda s: fused_bn.update_moving_stats(
        s.mm, s.mv, tf.zeros([C]), tf.ones([C]), 10, float("nan")), ValueError, ["momentum"]),
    ("count 1", lambda s: fused_bn.update_moving_stats(s.mm, s.mv, tf.zeros([C]), tf.ones([C]), 1),
     ValueError, ["count", ">= 2"]),
    ("count 0 biased", lambda s: fused_bn.update_moving_stats(
        s.mm, s.mv, tf.zeros([C]), tf.ones([C]), 0, unbiased_variance=False),
     ValueError, ["count", ">= 1"]),
    ("count 2.5", lambda s: fused_bn.update_moving_stats(s.mm, s.mv, tf.zeros([C]), tf.ones([C]), 2.5),
     TypeError, ["count", "integer"]),
    ("count float tensor", lambda s: fused_bn.update_moving_stats(
        s.mm, s.mv, tf.zeros([C]), tf.ones([C]), tf.constant(8.0)), TypeError, ["count", "integer"]),
    ("count tensor 1", lambda s: fused_bn.update_moving_stats(
        s.mm, s.mv, tf.zeros([C]), tf.ones([C]), tf.constant(1)), INVALID, ["count", ">= 2"]),
    ("count vector", lambda s: fused_bn.update_moving_stats(
        s.mm, s.mv, tf.zeros([C]), tf.ones([C]), tf.constant([4, 4])), INVALID, ["count", "scalar"]),
    ("num_updates int32", lambda s: fused_bn.update_moving_stats(
        s.mm, s.mv, tf.zeros([C]), tf.ones([C]), 10, num_updates=tf.Variable(0)),
     TypeError, ["num_updates", "int64"]),
    ("moving_mean not a variable", lambda s: fused_bn.update_moving_stats(
        tf.zeros([C]), s.mv, tf.zeros([C]), tf.ones([C]), 10), TypeError, ["moving_mean"]),
    ("moving_variance wrong shape", lambda s: fused_bn.update_moving_stats(
        s.mm, tf.Variable(tf.ones([C, 1])), tf.zeros([C]), tf.ones([C]), 10),
     ValueError, ["moving_variance"]),
]


@pytest.mark.parametrize("call,exc,words", [c[1:] for c in UPDATE_CASES],
                         ids=[c[0] for c in UPDATE_CASES])
def test_update_moving_stats_errors(call, exc, words):
    s = State()
    check_raises(lambda: call(s), exc, *words)
    s.assert_unchanged()


@pytest.mark.parametrize("mean,var,count,words", [
    ([C - 1], [C - 1], 10, ["moving_mean", f"[{C - 1}]"]),
    ([C], [C + 1], 10, ["variance", f"[{C}]"]),
    ([1, C], [C], 10, ["mean", "vector"]),
    ([C], [C], 1, ["count", ">= 2"]),
    ([C], [C], [2], ["count", "scalar"]),
], ids=["mean C", "variance C", "mean rank 2", "count 1", "count vector"])
def test_update_moving_stats_run_time(mean, var, count, words):
    s = State()

    def body(m, v, n):
        fused_bn.update_moving_stats(s.mm, s.mv, m, v, n, num_updates=s.n)

    fn = _dynamic(body, F32_ANY, F32_ANY, (None, tf.int64))
    check_raises(lambda: fn(tf.zeros(mean), tf.ones(var), tf.constant(count, tf.int64)),
                 INVALID, *words)
    s.assert_unchanged()


# TF1 helper.
def _v1_values(sess, scope):
    v1 = tf.compat.v1
    return {v.name: sess.run(v) for v in v1.global_variables() if v.name.startswith(scope + "/")}


def test_v1_trace_time_errors():
    v1 = tf.compat.v1
    bn = fused_bn.compat.v1.batch_norm
    with tf.Graph().as_default():
        x = v1.placeholder(tf.float32, [None, C])
        check_raises(lambda: bn(v1.placeholder(tf.float32, [C]), True, scope="a"),
                     ValueError, "x", "rank")
        check_raises(lambda: bn(v1.placeholder(tf.float32, [4, None]), True, scope="b"),
                     ValueError, "channel")
        check_raises(lambda: bn(v1.placeholder(tf.int32, [4, C]), True, scope="c"), TypeError, "x")
        check_raises(lambda: bn(v1.placeholder(tf.complex64, [4, C]), True, scope="c2"),
                     TypeError, "x")
        check_raises(lambda: bn(x, True, scope="d", axis=0), ValueError, "axis")
        check_raises(lambda: bn(x, True, scope="e", momentum=1.1), ValueError, "momentum")
        check_raises(lambda: bn(x, True, scope="f", epsilon=0.0), ValueError, "epsilon")
        check_raises(lambda: bn(x, v1.placeholder(tf.bool, [2]), scope="g"), ValueError, "training")
        check_raises(lambda: bn(x, v1.placeholder(tf.int32, []), scope="h"), TypeError, "training")
        check_raises(lambda: bn(v1.placeholder(tf.float32, [1, 1, C]), True, scope="i"),
                     ValueError, "at least 2 values")
        bn(x, True, scope="bn")
        check_raises(lambda: bn(v1.placeholder(tf.float32, [None, C + 1]), True, scope="bn"),
                     ValueError, "bn/", "shape")
        names = {v.name for v in v1.global_variables()}
        # Checks on x run before any variable is created.
        assert not any(n.startswith(("a/", "b/", "c/", "c2/", "d/")) for n in names)


def test_v1_run_time_errors_leave_variables_unchanged():
    v1 = tf.compat.v1
    with tf.Graph().as_default():
        x = v1.placeholder(tf.float32, [None, None, C])
        t = v1.placeholder(tf.bool, [])
        y = fused_bn.compat.v1.batch_norm(x, t, scope="bn")
        with v1.variable_scope("bn", reuse=True):
            mm = v1.get_variable("moving_mean")
            n = v1.get_variable("num_updates", dtype=tf.int64)
        with v1.Session() as sess:
            sess.run(v1.global_variables_initializer())
            sess.run([mm.assign(tf.range(C, dtype=tf.float32)), n.assign(3)])
            before = _v1_values(sess, "bn")
            for bad in (np.ones([1, 1, C]), np.ones([0, 4, C])):
                check_raises(lambda: sess.run(y, {x: bad, t: True}), INVALID,
                             "training", "at least 2 values")
            after = _v1_values(sess, "bn")
            assert before.keys() == after.keys()
            for k in before:
                np.testing.assert_array_equal(before[k], after[k], err_msg=k)
            sess.run(y, {x: np.ones([1, 1, C]), t: False})  # inference is fine
            sess.run(y, {x: np.ones([2, 1, C]), t: True})
            assert sess.run(n) == 4


def test_keras_layer_errors_leave_weights_unchanged():
    layer_cls = getattr(fused_bn, "BatchNormalization", None)
    if layer_cls is None:
        pytest.skip("fused_bn.BatchNormalization not available")
    layer = layer_cls()
    layer(tf.ones([4, C]), training=True)
    before = [w.numpy().copy() for w in layer.weights]
    with pytest.raises((ValueError, INVALID)):
        layer(tf.ones([4, C + 1]), training=True)
    with pytest.raises((ValueError, INVALID)) as info:
        layer(tf.ones([1, C]), training=True)
    assert "at least 2 values" in str(info.value)
    fn = tf.function(lambda x: layer(x, training=True),
                     input_signature=[tf.TensorSpec([None, C], tf.float32)])
    with pytest.raises(INVALID) as info:
        fn(tf.ones([1, C]))
    assert "at least 2 values" in str(info.value)
    for b, w in zip(before, layer.weights):
        np.testing.assert_array_equal(b, w.numpy(), err_msg=w.name)


def test_update_moving_stats_without_a_variable_names_it():
    v = tf.Variable(tf.ones([3]))
    with pytest.raises(TypeError, match="moving_mean must be a resource tf.Variable"):
        fused_bn.update_moving_stats(None, v, tf.zeros(3), tf.zeros(3), 5)
    np.testing.assert_array_equal(v.numpy(), np.ones(3))
