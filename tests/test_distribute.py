"""fused_bn under tf.distribute: MirroredStrategy over 2 and 4 logical CPU
devices and MultiWorkerMirroredStrategy with 2 worker processes on
127.0.0.1, in fresh processes (tests/_distribute_worker.py; logical devices
must be set before TensorFlow starts). Checked here against float64 NumPy on
the global batch, Keras' own layer under the same strategy, and
single-device models.

Semantics checked: synchronized=True equals single-device batch norm on the
concatenated global batch (y, dx, summed dgamma/dbeta, moving statistics);
synchronized=False normalizes each replica with its own statistics and
updates the moving statistics with the pooled statistics of the global
batch; every replica's component ends bitwise equal. The same with the
epilogue relu(bn(x) + side_input), and with the layer's masks (statistics
of the unmasked positions, against single-device masked batch norm).
"""
import json
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import reference as ref

# slow: minutes of spawned processes; the wheel test (-m "not slow") leaves
# them to the source-tree run (test_distribute_ops.py covers the ops there).
pytestmark = [pytest.mark.distributed, pytest.mark.slow]

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "_distribute_worker.py")
C, EPS, MOMENTUM, COUNTER0 = 5, 1e-3, 0.9, 2
TIMEOUT = 900


def _env():
    import fused_bn
    parent = os.path.dirname(os.path.dirname(os.path.abspath(fused_bn.__file__)))
    path = parent + os.pathsep + os.environ.get("PYTHONPATH", "")
    return dict(os.environ, PYTHONPATH=path, TF_CPP_MIN_LOG_LEVEL="2")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp, name, replicas, multiworker=False, env=None):
    out = os.path.join(tmp, f"{name}.npz")
    cmd = [sys.executable, WORKER, "--replicas", str(replicas), "--out", out]
    if multiworker:
        cmd.append("--multiworker")
    proc = subprocess.Popen(cmd, env=env or _env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    return proc, out


def _wait(procs):
    arrays = []
    for proc, out in procs:
        try:
            log, _ = proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            for p, _ in procs:
                p.kill()
            pytest.fail(f"distributed worker timed out after {TIMEOUT} s")
        assert proc.returncode == 0, log[-6000:]
        with np.load(out) as f:
            arrays.append(dict(f))
    return Results(arrays)


class Results:
    """A worker's arrays (one dict per worker process)."""

    def __init__(self, arrays):
        self.arrays = arrays

    def has(self, key):
        return key in self.arrays[0]

    def get(self, scenario, name):
        """A global array (the same in every worker)."""
        return self.arrays[0][f"{scenario}:{name}"]

    def components(self, scenario, name):
        """Every component of a variable, over all workers: [R, ...]."""
        return np.concatenate([a[f"{scenario}:{name}"] for a in self.arrays])

    def replicas(self, scenario, name):
        """Replica r's output for r = 0, 1, ...."""
        merged = {}
        for a in self.arrays:
            merged.update(a)
        out, r = [], 0
        while f"{scenario}:{name}:{r}" in merged:
            out.append(merged[f"{scenario}:{name}:{r}"])
            r += 1
        return out


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """Starts every worker at once (they trace mostly on one core each)."""
    tmp = str(tmp_path_factory.mktemp("distribute"))
    runs = {"mirrored2": [_launch(tmp, "mirrored2", 2)],
            "mirrored4": [_launch(tmp, "mirrored4", 4)]}
    ports = [_free_port(), _free_port()]
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    runs["multiworker"] = [
        _launch(tmp, f"multiworker{i}", 1, multiworker=True, env=dict(
            _env(), TF_CONFIG=json.dumps(
                {"cluster": cluster, "task": {"type": "worker", "index": i}})))
        for i in range(2)]
    yield runs
    for procs in runs.values():
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()


_RESULTS = {}


@pytest.fixture(scope="module", params=["mirrored2", "mirrored4", "multiworker"])
def results(request, launched):
    if request.param not in _RESULTS:
        _RESULTS[request.param] = _wait(launched[request.param])
    return _RESULTS[request.param]


@pytest.fixture(scope="module", params=["mirrored2", "mirrored4"])
def mirrored(request, launched):
    """MirroredStrategy only: the scenarios the multi-worker run leaves out."""
    if request.param not in _RESULTS:
        _RESULTS[request.param] = _wait(launched[request.param])
    return _RESULTS[request.param]


def _ran(res, scenario):
    """Skips a scenario the run left out (MirroredStrategy over 2 devices runs
    them all; see _distribute_worker.main)."""
    if not any(k.startswith(scenario + ":") for k in res.arrays[0]):
        pytest.skip(f"{scenario}: not run in this configuration (MirroredStrategy "
                    "over 2 devices runs every scenario)")


def _mirrored2(launched):
    if "mirrored2" not in _RESULTS:
        _RESULTS["mirrored2"] = _wait(launched["mirrored2"])
    return _RESULTS["mirrored2"]


# ---------------------------------------------------------------- helpers

def _axis(res, key):
    return 1 if "nchw" in key else -1


def _inputs(res, key):
    x = res.get(key, "x").astype(np.float64)
    dy = res.get(key, "dy").astype(np.float64)
    p = {n: res.get(key, n).astype(np.float64) for n in ("gamma", "beta", "mm0", "mv0")}
    return x, dy, p


def _split(a, parts):
    sizes = [len(p) for p in parts]
    return np.split(a, np.cumsum(sizes)[:-1])


def _moving_after(p, batch, axis, t=COUNTER0):
    """Moving statistics after one warm-up update with the batch's statistics."""
    r = ref.reduce_axes(batch, axis)
    mean, var = batch.mean(axis=r), batch.var(axis=r)
    n = batch.size / batch.shape[axis % batch.ndim]
    m = min(MOMENTUM, t / (t + 1.0))
    return (p["mm0"] * m + mean * (1 - m),
            p["mv0"] * m + var * n / (n - 1) * (1 - m))


def _check_moving(res, key, want_mean, want_var, prefix="", counter=COUNTER0 + 1):
    mm = res.components(key, prefix + "moving_mean")
    mv = res.components(key, prefix + "moving_variance")
    for comps in (mm, mv):
        for c in comps[1:]:
            np.testing.assert_array_equal(c, comps[0])  # every replica alike
    ref.close(mm[0], want_mean, tf.float32)
    ref.close(mv[0], want_var, tf.float32)
    assert list(res.components(key, prefix + "num_updates")) == [counter] * len(mm)


# ---------------------------------------------------------------- functional

@pytest.mark.parametrize("key", ["sync_nhwc", "sync_nchw", "sync_empty"])
def test_sync_equals_single_device_on_the_global_batch(results, key):
    """Uneven shards (3 + 2 on 2 replicas; 3, 2, 0, 4 on 4) and an empty shard."""
    _ran(results, key)
    x, dy, p = _inputs(results, key)
    axis = _axis(results, key)
    y = np.concatenate(results.replicas(key, "y"))
    dx = np.concatenate(results.replicas(key, "dx"))
    assert y.shape == x.shape
    want_y, _, _ = ref.forward(x, axis, p["gamma"], p["beta"], EPS)
    want_dx, want_dg, want_db = ref.backward(x, dy, axis, p["gamma"], EPS, True)
    ref.close(y, want_y, tf.float32)
    ref.close(dx, want_dx, tf.float32)
    ref.close(results.get(key, "dgamma"), want_dg, tf.float32)
    ref.close(results.get(key, "dbeta"), want_db, tf.float32)
    _check_moving(results, key, *_moving_after(p, x, axis))


@pytest.mark.parametrize("key", ["local_nhwc", "local_nchw", "local_empty"])
def test_local_normalizes_per_replica_and_pools_moving_statistics(results, key):
    _ran(results, key)
    x, dy, p = _inputs(results, key)
    axis = _axis(results, key)
    ys = results.replicas(key, "y")
    xs, dys = _split(x, ys), _split(dy, ys)
    dgamma = np.zeros(C)
    dbeta = np.zeros(C)
    for xr, dyr, yr, dxr in zip(xs, dys, ys, results.replicas(key, "dx")):
        if len(xr) == 0:
            assert yr.shape == xr.shape and dxr.shape == xr.shape
            continue
        ref.close(yr, ref.forward(xr, axis, p["gamma"], p["beta"], EPS)[0], tf.float32)
        want_dx, dg, db = ref.backward(xr, dyr, axis, p["gamma"], EPS, True)
        ref.close(dxr, want_dx, tf.float32)
        dgamma += dg
        dbeta += db
    ref.close(results.get(key, "dgamma"), dgamma, tf.float32)
    ref.close(results.get(key, "dbeta"), dbeta, tf.float32)
    # The moving statistics get the pooled statistics of the global batch.
    _check_moving(results, key, *_moving_after(p, x, axis))


@pytest.mark.parametrize("sync", [True, False], ids=["sync", "local"])
def test_training_as_a_bool_tensor(results, sync):
    key = ("sync" if sync else "local") + "_tensor"
    _ran(results, key)
    x, dy, p = _inputs(results, key)
    ys = results.replicas(key, "frozen_y")
    want_y, _, _ = ref.forward(x, -1, p["gamma"], p["beta"], EPS, p["mm0"], p["mv0"])
    want_dx, _, _ = ref.backward(x, dy, -1, p["gamma"], EPS, False, p["mm0"], p["mv0"])
    ref.close(np.concatenate(ys), want_y, tf.float32)
    ref.close(np.concatenate(results.replicas(key, "frozen_dx")), want_dx, tf.float32)
    _check_moving(results, key, p["mm0"], p["mv0"], prefix="frozen_", counter=COUNTER0)
    if sync:
        want_y, _, _ = ref.forward(x, -1, p["gamma"], p["beta"], EPS)
        ref.close(np.concatenate(results.replicas(key, "y")), want_y, tf.float32)
    _check_moving(results, key, *_moving_after(p, x, -1))


def test_eager_strategy_run(launched):
    res = _mirrored2(launched)
    x, dy, p = _inputs(res, "sync_eager")
    ref.close(np.concatenate(res.replicas("sync_eager", "y")),
              ref.forward(x, -1, p["gamma"], p["beta"], EPS)[0], tf.float32)
    ref.close(np.concatenate(res.replicas("sync_eager", "dx")),
              ref.backward(x, dy, -1, p["gamma"], EPS, True)[0], tf.float32)
    _check_moving(res, "sync_eager", *_moving_after(p, x, -1))


def test_sync_float16(launched):
    res = _mirrored2(launched)
    x, dy, p = _inputs(res, "sync_half")
    ref.close(np.concatenate(res.replicas("sync_half", "y")),
              ref.forward(x, 1, p["gamma"], p["beta"], EPS)[0], tf.float16)
    ref.close(np.concatenate(res.replicas("sync_half", "dx")),
              ref.backward(x, dy, 1, p["gamma"], EPS, True)[0], tf.float16)
    _check_moving(res, "sync_half", *_moving_after(p, x, 1))


def test_local_moving_statistics_over_steps(launched):
    """Three non-synchronized steps: warm-up momentum and pooled statistics."""
    res = _mirrored2(launched)
    x, _, p = _inputs(res, "local_steps")
    mean, var = p["mm0"], p["mv0"]
    for t in range(3):
        q = dict(p, mm0=mean, mv0=var)
        mean, var = _moving_after(q, x, -1, t=COUNTER0 + t)
        _check_moving(res, "local_steps", mean, var, prefix=f"step{t}_",
                      counter=COUNTER0 + t + 1)


def test_update_moving_stats_in_both_contexts(launched):
    res = _mirrored2(launched)
    n = len(res.components("update", "replica_mean"))
    mean = np.full(C, (n - 1) / 2.0)  # the all-reduced mean of replica ids
    for c in res.components("update", "replica_mean"):
        np.testing.assert_allclose(c, 0.5 * mean, rtol=1e-6)
    for c in res.components("update", "replica_variance"):
        np.testing.assert_allclose(c, 0.5 + 0.5 * (mean + 1) * 4 / 3, rtol=1e-6)
    for c in res.components("update", "cross_mean"):
        np.testing.assert_array_equal(c, np.full(C, 7.0))
    for c in res.components("update", "cross_variance"):
        np.testing.assert_array_equal(c, np.full(C, 3.0))


def test_second_order_through_sync_bn(mirrored):
    """A gradient penalty: d(sum(dL/dx ** 2)) / d(x, gamma) equals the
    float64 pure-TF reference's on the global batch."""
    ref.close(mirrored.get("second_order", "penalty"),
              mirrored.get("second_order", "ref_penalty"), tf.float32,
              scale=float(mirrored.get("second_order", "ref_penalty")))
    ref.close(np.concatenate(mirrored.replicas("second_order", "dpen_dx")),
              mirrored.get("second_order", "ref_dpen_dx"), tf.float32)
    ref.close(mirrored.get("second_order", "dpen_dgamma"),
              mirrored.get("second_order", "ref_dpen_dgamma"), tf.float32)


# ---------------------------------------------------------------- epilogue

def _epilogue64(x, dy, side, p, axis):
    """float64 relu(bn(x) + side) with x's batch statistics: y, and dx,
    dgamma, dbeta, dside for dy (dy masked by the relu)."""
    y, _, _ = ref.forward(x, axis, p["gamma"], p["beta"], EPS)
    v = y + side
    g = dy * (v > 0)
    return np.maximum(v, 0.0), (*ref.backward(x, g, axis, p["gamma"], EPS, True), g)


def test_epilogue_sync_equals_single_device_on_the_global_batch(results):
    """side_input and relu under SyncBN: y, dx, dside, summed dgamma/dbeta
    and the moving statistics against float64 NumPy on the global batch."""
    key = "sync_epilogue"
    _ran(results, key)
    x, dy, p = _inputs(results, key)
    y64, (dx, dg, db, dside) = _epilogue64(x, dy, results.get(key, "side"), p, -1)
    assert (y64 == 0).any() and (y64 > 0).any()
    ref.close(np.concatenate(results.replicas(key, "y")), y64, tf.float32)
    ref.close(np.concatenate(results.replicas(key, "dx")), dx, tf.float32)
    ref.close(np.concatenate(results.replicas(key, "dside")), dside, tf.float32)
    ref.close(results.get(key, "dgamma"), dg, tf.float32)
    ref.close(results.get(key, "dbeta"), db, tf.float32)
    _check_moving(results, key, *_moving_after(p, x, -1))


def test_epilogue_local_equals_single_device_per_replica(results):
    key = "local_epilogue"
    _ran(results, key)
    x, dy, p = _inputs(results, key)
    ys = results.replicas(key, "y")
    parts = [_split(a, ys) for a in (x, dy, results.get(key, "side"))]
    dgamma, dbeta = np.zeros(C), np.zeros(C)
    for xr, dyr, sr, yr, dxr, dsr in zip(*parts, ys, results.replicas(key, "dx"),
                                         results.replicas(key, "dside")):
        if len(xr) == 0:
            continue
        y64, (dx, dg, db, dside) = _epilogue64(xr, dyr, sr, p, -1)
        ref.close(yr, y64, tf.float32)
        ref.close(dxr, dx, tf.float32)
        ref.close(dsr, dside, tf.float32)
        dgamma += dg
        dbeta += db
    ref.close(results.get(key, "dgamma"), dgamma, tf.float32)
    ref.close(results.get(key, "dbeta"), dbeta, tf.float32)
    _check_moving(results, key, *_moving_after(p, x, -1))


# ---------------------------------------------------------------- masks

def _masked64(x, mask, dy, p, axis, side=None):
    """Single-device masked batch norm in plain TF float64 ops (Keras'
    semantics: statistics of the unmasked positions, every position
    normalized), then relu(. + side) when side is given: y, and the
    gradients (dx, dgamma, dbeta[, dside]) for dy."""
    x = tf.constant(x, tf.float64)
    gamma, beta = tf.constant(p["gamma"]), tf.constant(p["beta"])
    watched = [x, gamma, beta] + ([tf.constant(side, tf.float64)] if side is not None else [])
    keep = tf.cast(tf.broadcast_to(mask[..., None], x.shape), tf.float64)
    axes = ref.reduce_axes(np.empty(x.shape), axis)
    shape = [1] * len(x.shape)
    shape[axis] = -1

    def r(v):
        return tf.reshape(v, shape)

    with tf.GradientTape() as tape:
        tape.watch(watched)
        n = tf.maximum(tf.reduce_sum(keep, axes), 1.0)
        mean = tf.reduce_sum(keep * x, axes) / n
        var = tf.reduce_sum(keep * tf.square(x - r(mean)), axes) / n
        y = (x - r(mean)) * tf.math.rsqrt(r(var) + EPS) * r(gamma) + r(beta)
        if side is not None:
            y = tf.nn.relu(y + watched[3])
    grads = tape.gradient(y, watched, output_gradients=tf.constant(dy, tf.float64))
    return y.numpy(), [g.numpy() for g in grads]


def _masked_moving_after(p, x, mask, axis, t=COUNTER0):
    """Moving statistics after one warm-up update with the statistics of the
    unmasked positions of x (Bessel factor with each channel's count)."""
    keep = np.broadcast_to(mask[..., None], x.shape)
    axes = ref.reduce_axes(x, axis)
    n = keep.sum(axis=axes)
    mean = (keep * x).sum(axis=axes) / n
    var = (keep * (x - ref.bcast(mean, x, axis)) ** 2).sum(axis=axes) / n
    m = min(MOMENTUM, t / (t + 1.0))
    return p["mm0"] * m + mean * (1 - m), p["mv0"] * m + var * n / (n - 1) * (1 - m)


def _check_masked_step(res, key, x, dy, p, axis, side, sync, prefix=""):
    """One masked training step's y, dx, dgamma, dbeta (and dside) against
    _masked64: on the global batch (sync) or per replica."""
    mask = res.get(key, "mask") if not prefix.startswith("none") \
        else np.zeros(x.shape[:-1], bool)
    ys = res.replicas(key, prefix + "y")
    outs = [ys, res.replicas(key, prefix + "dx")]
    if side is not None:
        outs.append(res.replicas(key, prefix + "dside"))
    if sync:
        y64, grads = _masked64(x, mask, dy, p, axis, side)
        ref.close(np.concatenate(ys), y64, tf.float32)
        ref.close(np.concatenate(outs[1]), grads[0], tf.float32)
        if side is not None:
            ref.close(np.concatenate(outs[2]), grads[3], tf.float32)
        dgamma, dbeta = grads[1:3]
    else:
        dgamma, dbeta = np.zeros(C), np.zeros(C)
        parts = [_split(a, ys) for a in (x, mask, dy)]
        sides = _split(side, ys) if side is not None else [None] * len(ys)
        for xr, mr, dyr, sr, *got in zip(*parts, sides, *outs):
            assert got[0].shape == xr.shape and got[1].shape == xr.shape
            if len(xr) == 0:
                continue
            y64, grads = _masked64(xr, mr, dyr, p, axis, sr)
            ref.close(got[0], y64, tf.float32)
            ref.close(got[1], grads[0], tf.float32)
            if sr is not None:
                ref.close(got[2], grads[3], tf.float32)
            dgamma += grads[1]
            dbeta += grads[2]
    ref.close(res.get(key, prefix + "dgamma"), dgamma, tf.float32)
    ref.close(res.get(key, prefix + "dbeta"), dbeta, tf.float32)


@pytest.mark.parametrize("key", ["masked_sync", "masked_local", "masked_sync_nchw",
                                 "masked_local_nchw"])
def test_masked_layer_against_single_device_masked_batch_norm(results, key):
    """The layer with a mask (one replica's shard all masked, or empty; with
    the epilogue for NHWC). Sync: single-device masked batch norm on the
    concatenated global batch and mask. Non-sync: single-device per replica.
    Both: the moving statistics are those of the global batch's unmasked
    positions, bitwise alike on every replica; then a step whose global
    batch is all masked normalizes as single-device does and leaves them
    (and the counter) unchanged."""
    _ran(results, key)
    x, dy, p = _inputs(results, key)
    axis = _axis(results, key)
    side = results.get(key, "side").astype(np.float64) if "nchw" not in key else None
    sync = "sync" in key
    _check_masked_step(results, key, x, dy, p, axis, side, sync)
    moving = _masked_moving_after(p, x, results.get(key, "mask"), axis)
    _check_moving(results, key, *moving)
    _check_masked_step(results, key, x, dy, p, axis, side, sync, prefix="none_")
    for name, want in zip(("moving_mean", "moving_variance"), moving):
        np.testing.assert_array_equal(results.components(key, "none_" + name),
                                      results.components(key, name))
    assert list(results.components(key, "none_num_updates")) == \
        list(results.components(key, "num_updates"))


def test_masked_layer_training_as_a_bool_tensor(launched):
    """Frozen (training a False tensor): the moving statistics, no update,
    whatever the mask; then training (a True tensor) as synchronized."""
    res = _mirrored2(launched)
    key = "masked_sync_tensor"
    x, dy, p = _inputs(res, key)
    want_y, _, _ = ref.forward(x, -1, p["gamma"], p["beta"], EPS, p["mm0"], p["mv0"])
    want_dx, want_dg, want_db = ref.backward(x, dy, -1, p["gamma"], EPS, False,
                                             p["mm0"], p["mv0"])
    ref.close(np.concatenate(res.replicas(key, "frozen_y")), want_y, tf.float32)
    ref.close(np.concatenate(res.replicas(key, "frozen_dx")), want_dx, tf.float32)
    ref.close(res.get(key, "frozen_dgamma"), want_dg, tf.float32)
    ref.close(res.get(key, "frozen_dbeta"), want_db, tf.float32)
    _check_moving(res, key, p["mm0"], p["mv0"], prefix="frozen_", counter=COUNTER0)
    _check_masked_step(res, key, x, dy, p, -1, None, True)
    _check_moving(res, key, *_masked_moving_after(p, x, res.get(key, "mask"), -1))


@pytest.mark.parametrize("key", ["second_order_epilogue", "second_order_masked"])
def test_second_order_through_sync_bn_with_the_epilogue(mirrored, key):
    """The gradient penalty through relu(bn(x) + sin(x)) under SyncBN
    (batch_norm; the layer with a mask, one shard all masked) equals plain
    TF float64 ops on the global batch (two-pass moments without
    tf.nn.moments' stop_gradient; masked: over the unmasked positions)."""
    x = tf.constant(mirrored.get(key, "x"), tf.float64)
    w = tf.constant(mirrored.get(key, "dy"), tf.float64)
    gamma = tf.constant(mirrored.get(key, "gamma"), tf.float64)
    mask = mirrored.get(key, "mask") if key.endswith("masked") else np.ones(x.shape[:-1], bool)
    keep = tf.cast(tf.broadcast_to(mask[..., None], x.shape), tf.float64)
    axes = [0, 1, 2]

    def bn(x, gamma):
        n = tf.reduce_sum(keep, axes)
        mean = tf.reduce_sum(keep * x, axes) / n
        var = tf.reduce_sum(keep * tf.square(x - mean), axes) / n
        return tf.nn.relu((x - mean) * tf.math.rsqrt(var + EPS) * gamma + tf.sin(x))

    with tf.GradientTape() as outer:
        outer.watch([x, gamma])
        with tf.GradientTape() as inner:
            inner.watch(x)
            y = bn(x, gamma)
            loss = tf.reduce_sum(w * y * y)
        pen = tf.reduce_sum(tf.square(inner.gradient(loss, x)))
    dx, dgamma = outer.gradient(pen, [x, gamma])
    ref.close(mirrored.get(key, "penalty"), pen.numpy(), tf.float32, scale=float(pen))
    ref.close(np.concatenate(mirrored.replicas(key, "dpen_dx")), dx.numpy(), tf.float32)
    ref.close(mirrored.get(key, "dpen_dgamma"), dgamma.numpy(), tf.float32)


# ---------------------------------------------------------------- Keras

def _weights(res, key):
    """[(weight name, components)] of a saved model, in model.weights order."""
    found = {}
    for k in res.arrays[0]:
        m = re.fullmatch(re.escape(key) + r":(\d+)_([^:]+)", k)
        if m:
            found[int(m.group(1))] = (m.group(2), res.components(key, f"{m.group(1)}_{m.group(2)}"))
    assert found, f"no weights saved for {key}"
    return [found[i] for i in sorted(found)]


def test_fit_synchronized_matches_keras(results):
    """4 steps of fit next to keras.layers.BatchNormalization(synchronized=True)."""
    fused = [(n, v) for n, v in _weights(results, "fit_sync:fused") if n != "num_updates"]
    keras_w = _weights(results, "fit_sync:keras")
    assert [n for n, _ in fused] == [n for n, _ in keras_w]
    for (name, a), (_, b) in zip(fused, keras_w):
        for comp in a[1:]:
            np.testing.assert_array_equal(comp, a[0], err_msg=name)
        np.testing.assert_allclose(a[0], b[0], rtol=2e-4, atol=2e-5, err_msg=name)
    if results.has("fit_sync:fused:evaluate"):  # Keras' fit: not under MWMS
        np.testing.assert_allclose(results.get("fit_sync:fused", "evaluate"),
                                   results.get("fit_sync:keras", "evaluate"), rtol=1e-4)
        np.testing.assert_allclose(results.get("fit_sync:fused", "predict"),
                                   results.get("fit_sync:keras", "predict"),
                                   rtol=1e-4, atol=1e-4)


def test_fit_local_keeps_replicas_alike_where_keras_diverges(results):
    _ran(results, "fit_local")
    fused = [(n, v) for n, v in _weights(results, "fit_local:fused")
             if n != "num_updates"]
    keras_w = _weights(results, "fit_local:keras")
    assert [n for n, _ in fused] == [n for n, _ in keras_w]
    for (name, a), (_, b) in zip(fused, keras_w):
        for comp in a[1:]:
            np.testing.assert_array_equal(comp, a[0], err_msg=name)
        if not name.startswith("moving"):
            np.testing.assert_allclose(a[0], b[0], rtol=2e-4, atol=2e-5, err_msg=name)
            continue
        # Keras' components drift apart: each replica keeps its own batches'.
        assert np.abs(b - b[0]).max() > 1e-3, name
        if name == "moving_mean":
            # Equal shards and a linear update: the pooled mean is the mean of
            # the replicas' means, so this is the mean of Keras' copies.
            np.testing.assert_allclose(a[0], b.mean(axis=0), rtol=1e-4, atol=1e-5)


def test_checkpoints_between_strategy_and_single_device(results):
    trained = _weights(results, "fit_sync:fused")
    for key in ("ckpt:to_single", "ckpt:h5_to_single"):
        if not results.has(f"{key}:0_{trained[0][0]}"):
            assert key == "ckpt:h5_to_single"  # written under MirroredStrategy only
            continue
        restored = _weights(results, key)
        assert [n for n, _ in restored] == [n for n, _ in trained]
        for (name, a), (_, b) in zip(trained, restored):
            np.testing.assert_array_equal(b[0], a[0], err_msg=f"{key} {name}")
    if results.has("fit_sync:fused:predict"):
        np.testing.assert_allclose(results.get("ckpt:to_single", "predict"),
                                   results.get("fit_sync:fused", "predict"),
                                   rtol=1e-5, atol=1e-6)
    source = _weights(results, "ckpt:single")
    restored = _weights(results, "ckpt:to_dist")
    assert int(dict(source)["num_updates"][0]) == 4
    for (name, a), (_, b) in zip(source, restored):
        for comp in b:
            np.testing.assert_array_equal(comp, a[0], err_msg=name)


# ---------------------------------------------------------------- decisions

def test_unsupported_strategies_and_variables_raise(launched):
    res = _mirrored2(launched)
    for key in ("errors:central_storage", "errors:parameter_server"):
        msg = str(res.get(key, "error"))
        assert msg.startswith("ValueError") and "MirroredStrategy" in msg, msg
    assert "CentralStorageStrategy" in str(res.get("errors:central_storage", "error"))
    assert "ParameterServerStrategy" in str(res.get("errors:parameter_server", "error"))
    msg = str(res.get("errors:plain_variable", "error"))
    assert "moving_mean must be created under the strategy's scope" in msg, msg
    np.testing.assert_array_equal(res.get("errors:plain_variable", "moving_mean"),
                                  np.zeros(C))
    msg = str(res.get("errors:sync_on_read_sum", "error"))
    assert "aggregation SUM" in msg, msg
    assert str(res.get("errors:sync_on_read_mean", "error")) == ""
    comps = res.components("errors:sync_on_read_mean", "moving_mean")
    np.testing.assert_array_equal(comps[1], comps[0])
    np.testing.assert_allclose(comps[0], np.full(C, 1.5))  # mean of 1 and 2
    for sync in (True, False):  # a global batch of 1 value: 1 + 0 on 2 replicas
        key = f"errors:one_value_{sync}"
        msg = str(res.get(key, "error"))
        assert msg.startswith("InvalidArgumentError") and "at least 2 values" in msg, msg
        assert (res.components(key, "moving_mean") == 0.5).all()
        assert (res.components(key, "moving_variance") == 1.0).all()
        assert (res.components(key, "num_updates") == COUNTER0).all()
    for key in ("errors:xla", "errors:xla_masked"):
        msg = str(res.get(key, "error"))
        assert "XLA" in msg and "replica context" in msg, msg


@pytest.mark.parametrize("sync", [True, False], ids=["sync", "local"])
def test_compat_v1_graph_mode_mirrored(launched, sync):
    res = _mirrored2(launched)
    key = "v1_sync" if sync else "v1_local"
    x = res.get(key, "x").astype(np.float64)
    ys = [res.get(key, f"y:{r}") for r in range(2)]
    if sync:
        ref.close(np.concatenate(ys), ref.forward(x, -1, 1.0, 0.0, EPS)[0], tf.float32)
    else:
        for yr, xr in zip(ys, (x[:3], x[3:])):
            ref.close(yr, ref.forward(xr, -1, 1.0, 0.0, EPS)[0], tf.float32)
    comps = res.get(key, "moving_mean_components")
    np.testing.assert_array_equal(comps[1], comps[0])
    ref.close(comps[0], x.reshape(-1, C).mean(0), tf.float32)


def test_the_full_run_has_every_scenario(launched):
    """Guards the skips above: MirroredStrategy over 2 devices runs them all."""
    res = _mirrored2(launched)
    for scenario in ("sync_nhwc", "sync_nchw", "sync_empty", "sync_tensor",
                     "local_nhwc", "local_nchw", "local_empty", "local_tensor",
                     "fit_sync", "fit_local", "ckpt", "second_order", "sync_eager",
                     "sync_half", "local_steps", "update", "v1_sync", "v1_local",
                     "errors", "sync_epilogue", "local_epilogue", "masked_sync",
                     "masked_local", "masked_sync_nchw", "masked_local_nchw",
                     "masked_sync_tensor", "second_order_epilogue",
                     "second_order_masked"):
        assert any(k.startswith(scenario + ":") for k in res.arrays[0]), scenario
