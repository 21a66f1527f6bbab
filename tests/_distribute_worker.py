"""Runs fused_bn under tf.distribute in a fresh process, for test_distribute.py.

    python _distribute_worker.py --replicas R --out results.npz [--multiworker]

Makes R logical CPU devices (before TensorFlow starts its devices, hence the
fresh process), builds a MirroredStrategy over them, or with --multiworker a
MultiWorkerMirroredStrategy from TF_CONFIG, runs every scenario below and
saves what it computed (inputs, outputs of each local replica, every local
component of every variable) to an .npz. It computes no expected values:
test_distribute.py checks the arrays against float64 NumPy, Keras' own
layer and single-device runs.

Keys are "scenario:name" for global arrays and "scenario:name:r" for replica
r's (r is the global replica id; a worker saves its local replicas only).
"""
import argparse
import os
import sys
import tempfile
import time
import traceback
import zlib

import numpy as np

C = 5
EPS = 1e-3
MOMENTUM = 0.9
COUNTER0 = 2  # warm-up counter before the step: momentum min(0.9, 2/3)


def shapes(layout, n):
    return {"nc": (n, C), "nhwc": (n, 2, 3, C), "nchw": (n, C, 3, 2)}[layout]


def _bn64(x, mask, params, axis):
    """float64 gamma * (x - mean) / sqrt(var + EPS) + beta with the batch
    statistics of x's unmasked positions (mask broadcast along the last
    axis; None: all). Only places a scenario's side input."""
    keep = np.ones(x.shape[:-1], bool) if mask is None else mask
    keep = np.broadcast_to(keep[..., None], x.shape)
    axes = tuple(a for a in range(x.ndim) if a != axis % x.ndim)
    shape = [1] * x.ndim
    shape[axis] = -1
    n = np.maximum(keep.sum(axes), 1)
    mean = (keep * x).sum(axes).reshape(shape) / n.reshape(shape)
    var = (keep * (x - mean) ** 2).sum(axes).reshape(shape) / n.reshape(shape)
    return ((x - mean) / np.sqrt(var + EPS) * params["gamma"].reshape(shape)
            + params["beta"].reshape(shape))


def gradient_penalty(tf, bn, x, w, variable):
    """pen = |d/dx sum(w * bn(x)^2)|^2 by a double tape, and its gradients
    w.r.t. x and variable: (pen, dpen/dx, dpen/dvariable)."""
    with tf.GradientTape() as outer:
        outer.watch(x)
        with tf.GradientTape() as inner:
            inner.watch(x)
            y = bn(x)
            loss = tf.reduce_sum(w * y * y)
        dx = inner.gradient(loss, x)
        pen = tf.reduce_sum(dx * dx)
    return (pen,) + tuple(outer.gradient(pen, [x, variable]))


class Run:
    def __init__(self, strategy, multiworker):
        import tensorflow as tf

        self.tf = tf
        self.strategy = strategy
        self.multiworker = multiworker
        self.out = {}
        ids = strategy.run(
            lambda: tf.distribute.get_replica_context().replica_id_in_sync_group)
        self.replica_ids = [int(t) for t in self.local(ids)]

    def local(self, value):
        return [np.asarray(t) for t in self.strategy.experimental_local_results(value)]

    def save(self, scenario, name, value):
        self.out[f"{scenario}:{name}"] = np.asarray(value)

    def save_replicas(self, scenario, name, per_replica):
        for rid, v in zip(self.replica_ids, self.local(per_replica)):
            self.out[f"{scenario}:{name}:{rid}"] = v

    def save_components(self, scenario, name, variable):
        v = variable if isinstance(variable, self.tf.Variable) else variable.value
        self.save(scenario, name, np.stack(self.local(v)))

    def error(self, scenario, fn):
        """Runs fn; saves the message of the exception it raises ('' if none)."""
        try:
            fn()
            msg = ""
        except Exception as e:  # noqa: BLE001 - the test checks the message
            msg = f"{type(e).__name__}: {e}"
        self.save(scenario, "error", msg)

    def shards(self, key, sizes, layout, dtype="float32"):
        """Global x, dy and parameters for a scenario (seeded by its key), and
        per-replica x and dy values."""
        tf = self.tf
        rng = np.random.default_rng(zlib.crc32(key.encode()))
        n = sum(sizes)
        shape = shapes(layout, n)
        axis = 1 if layout == "nchw" else -1
        loc = np.linspace(-2.0, 3.0, C)
        bshape = [1] * len(shape)
        bshape[axis] = C
        x = (rng.standard_normal(shape) * 2.0 + loc.reshape(bshape)).astype(dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        params = {
            "gamma": (1 + 0.3 * rng.standard_normal(C)).astype("float32"),
            "beta": (0.5 * rng.standard_normal(C)).astype("float32"),
            "mm0": (0.3 * rng.standard_normal(C)).astype("float32"),
            "mv0": (1 + rng.random(C)).astype("float32"),
        }
        for name, v in {"x": x, "dy": dy, **params}.items():
            self.save(key, name, v)
        return self.per_replica(x, sizes), self.per_replica(dy, sizes), params, axis

    def per_replica(self, a, sizes):
        """Replica r's rows of a global array (shard sizes `sizes`)."""
        tf = self.tf
        offs = np.concatenate([[0], np.cumsum(sizes)])

        def fn(ctx):
            r = ctx.replica_id_in_sync_group
            return tf.constant(a[offs[r]:offs[r + 1]])
        return self.strategy.experimental_distribute_values_from_function(fn)

    def extras(self, key, sizes, layout, params, *, masked, epilogue, sync):
        """A Keras mask (replica 1's shard all masked) and a side input for a
        scenario's saved x, saved; per-replica values (None when not asked).

        The side input puts bn(x) + side at least 0.25 from relu's kink with
        the statistics the scenario normalizes with (the global batch's for
        sync, each shard's otherwise), so that the float64 references see
        the same relu mask."""
        rng = np.random.default_rng(zlib.crc32(key.encode()) + 1)
        x = self.out[f"{key}:x"].astype(np.float64)
        axis = 1 if layout == "nchw" else -1
        offs = np.concatenate([[0], np.cumsum(sizes)])
        mask = side = None
        if masked:
            mask = rng.random(x.shape[:-1]) < 0.6
            mask[offs[1]:offs[2]] = False
            self.save(key, "mask", mask)
        if epilogue:
            parts = [(0, len(x))] if sync else list(zip(offs[:-1], offs[1:]))
            bn = np.concatenate([_bn64(x[a:b], None if mask is None else mask[a:b],
                                       params, axis) for a, b in parts])
            target = (np.where(rng.random(x.shape) < 0.5, -1.0, 1.0)
                      * (0.25 + rng.exponential(1.0, x.shape)))
            side = (target - bn).astype("float32")
            self.save(key, "side", side)
        return tuple(None if a is None else self.per_replica(a, sizes)
                     for a in (mask, side))

    def functional(self, key, sizes, layout, sync, *, dtype="float32",
                   training="python", eager=False, steps=1, epilogue=False):
        """fused_bn.batch_norm on uneven shards: y, dx, summed dgamma/dbeta
        and every component of the moving statistics and counter; with the
        epilogue relu(bn(x) + side_input), also d(side_input)."""
        import fused_bn
        tf = self.tf
        xs, dys, p, axis = self.shards(key, sizes, layout, dtype)
        _, sides = self.extras(key, sizes, layout, p, masked=False,
                               epilogue=epilogue, sync=sync)
        with self.strategy.scope():
            gamma = tf.Variable(p["gamma"])
            beta = tf.Variable(p["beta"])
            mm = tf.Variable(p["mm0"], trainable=False)
            mv = tf.Variable(p["mv0"], trainable=False)
            counter = tf.Variable(COUNTER0, dtype=tf.int64, trainable=False)

        def replica_fn(x, dy, t, *side):
            with tf.GradientTape() as tape:
                tape.watch([x, *side])
                y = fused_bn.batch_norm(
                    x, t if training == "tensor" else True, gamma, beta, mm, mv,
                    momentum=MOMENTUM, epsilon=EPS, axis=axis,
                    num_updates=counter, synchronized=sync,
                    side_input=side[0] if side else None,
                    activation="relu" if side else None)
            dx, dg, db, *dside = tape.gradient(y, [x, gamma, beta, *side],
                                               output_gradients=dy)
            return (y, dx, dg, db, *dside)

        def step(x, dy, t):
            args = (x, dy, t) + ((sides,) if epilogue else ())
            y, dx, dg, db, *dside = self.strategy.run(replica_fn, args=args)
            reduce = self.strategy.reduce
            return (y, dx, reduce(tf.distribute.ReduceOp.SUM, dg, axis=None),
                    reduce(tf.distribute.ReduceOp.SUM, db, axis=None), *dside)

        if not eager:
            step = tf.function(step)
        phases = [("", True)] * steps
        if training == "tensor":
            phases = [("frozen_", False), ("", True)]
        for i, (prefix, value) in enumerate(phases):
            if steps > 1:
                prefix = f"step{i}_"
            y, dx, dg, db, *dside = step(xs, dys, tf.constant(value))
            self.save_replicas(key, prefix + "y", y)
            self.save_replicas(key, prefix + "dx", dx)
            if dside:
                self.save_replicas(key, prefix + "dside", dside[0])
            self.save(key, prefix + "dgamma", dg)
            self.save(key, prefix + "dbeta", db)
            self.save_components(key, prefix + "moving_mean", mm)
            self.save_components(key, prefix + "moving_variance", mv)
            self.save_components(key, prefix + "num_updates", counter)

    def masked(self, key, sizes, layout, sync, *, epilogue=False, training="python"):
        """fused_bn.BatchNormalization with a mask (replica 1's shard all
        masked; sizes may include an empty shard), and with the epilogue
        relu(bn(x) + side_input): y, dx, summed dgamma/dbeta, d(side_input),
        every component of the moving statistics and counter; then a step
        whose global batch is all masked (prefix "none_"). training
        "tensor": a frozen step first (prefix "frozen_"), as a bool tensor."""
        import fused_bn
        tf = self.tf
        xs, dys, p, axis = self.shards(key, sizes, layout)
        masks, sides = self.extras(key, sizes, layout, p, masked=True,
                                   epilogue=epilogue, sync=sync)
        shape = self.out[f"{key}:x"].shape
        with self.strategy.scope():
            layer = fused_bn.BatchNormalization(
                axis=axis, momentum=MOMENTUM, epsilon=EPS, synchronized=sync,
                activation="relu" if epilogue else None)
            layer.build((None,) + shape[1:])
            for name in ("gamma", "beta"):
                getattr(layer, name).assign(p[name])
            layer.moving_mean.assign(p["mm0"])
            layer.moving_variance.assign(p["mv0"])
            layer.num_updates.assign(COUNTER0)

        def replica_fn(x, dy, m, t, *side):
            with tf.GradientTape() as tape:
                tape.watch([x, *side])
                y = layer(x, training=t if training == "tensor" else True, mask=m,
                          side_input=side[0] if side else None)
            grads = tape.gradient(y, [x, layer.gamma, layer.beta, *side],
                                  output_gradients=dy)
            return (y, *grads)

        @tf.function
        def step(x, dy, m, t):
            args = (x, dy, m, t) + ((sides,) if epilogue else ())
            y, dx, dg, db, *dside = self.strategy.run(replica_fn, args=args)
            reduce = self.strategy.reduce
            return (y, dx, reduce(tf.distribute.ReduceOp.SUM, dg, axis=None),
                    reduce(tf.distribute.ReduceOp.SUM, db, axis=None), *dside)

        none = self.per_replica(np.zeros(shape[:-1], bool), sizes)
        phases = [("", masks, True), ("none_", none, True)]
        if training == "tensor":
            phases.insert(0, ("frozen_", masks, False))
        for prefix, m, value in phases:
            y, dx, dg, db, *dside = step(xs, dys, m, tf.constant(value))
            self.save_replicas(key, prefix + "y", y)
            self.save_replicas(key, prefix + "dx", dx)
            self.save(key, prefix + "dgamma", dg)
            self.save(key, prefix + "dbeta", db)
            if dside:
                self.save_replicas(key, prefix + "dside", dside[0])
            self.save_components(key, prefix + "moving_mean", layer.moving_mean)
            self.save_components(key, prefix + "moving_variance", layer.moving_variance)
            self.save_components(key, prefix + "num_updates", layer.num_updates)

    def update_moving_stats(self, key):
        """update_moving_stats in a replica context with all-reduced
        statistics, and in the cross-replica context."""
        import fused_bn
        tf = self.tf
        with self.strategy.scope():
            mm = tf.Variable(tf.zeros([C]), trainable=False)
            mv = tf.Variable(tf.ones([C]), trainable=False)

        def replica_fn():
            ctx = tf.distribute.get_replica_context()
            r = tf.cast(ctx.replica_id_in_sync_group, tf.float32)
            mean = ctx.all_reduce(tf.distribute.ReduceOp.MEAN, tf.fill([C], r))
            fused_bn.update_moving_stats(mm, mv, mean, mean + 1.0, 4,
                                         momentum=0.5)

        tf.function(lambda: self.strategy.run(replica_fn))()
        self.save_components(key, "replica_mean", mm)
        self.save_components(key, "replica_variance", mv)
        with self.strategy.scope():
            fused_bn.update_moving_stats(mm, mv, tf.fill([C], 7.0),
                                         tf.fill([C], 3.0), 4, momentum=0.0,
                                         unbiased_variance=False)
        self.save_components(key, "cross_mean", mm)
        self.save_components(key, "cross_variance", mv)

    def save_penalty(self, key, replica_fn, args):
        """Runs replica_fn (penalty, d/dx, d/dgamma per replica) under the
        strategy; saves the summed penalty and d/dgamma, and each replica's
        d/dx."""
        tf = self.tf

        @tf.function
        def step(*args):
            pen, dx, dg = self.strategy.run(replica_fn, args=args)
            return (self.strategy.reduce(tf.distribute.ReduceOp.SUM, pen, None),
                    dx, self.strategy.reduce(tf.distribute.ReduceOp.SUM, dg, None))

        pen, dx, dg = step(*args)
        self.save(key, "penalty", pen)
        self.save_replicas(key, "dpen_dx", dx)
        self.save(key, "dpen_dgamma", dg)

    def second_order(self, key, sizes):
        """A gradient penalty through sync BN, and the same on the global
        batch with the pure-TF reference in float64, on one device."""
        import fused_bn
        tf = self.tf
        xs, dys, p, axis = self.shards(key, sizes, "nhwc")
        with self.strategy.scope():
            gamma = tf.Variable(p["gamma"])

        def replica_fn(x, w):
            return gradient_penalty(tf, lambda x: fused_bn.batch_norm(
                x, True, gamma, epsilon=EPS, synchronized=True), x, w, gamma)

        self.save_penalty(key, replica_fn, (xs, dys))
        x64 = tf.constant(self.out[f"{key}:x"], tf.float64)
        w64 = tf.constant(self.out[f"{key}:dy"], tf.float64)
        gamma64 = tf.Variable(p["gamma"].astype("float64"))
        ref = gradient_penalty(tf, lambda x: fused_bn.reference.batch_norm(
            x, True, gamma64, epsilon=EPS), x64, w64, gamma64)
        for name, v in zip(("penalty", "dpen_dx", "dpen_dgamma"), ref):
            self.save(key, "ref_" + name, v)

    def second_order_epilogue(self, key, sizes, masked):
        """A gradient penalty through SyncBN with the epilogue
        relu(bn(x) + sin(x)): fused_bn.batch_norm, or (masked) the layer
        with a mask. Saves the penalty and its gradients w.r.t. x and gamma
        (test_distribute.py computes the reference on the global batch)."""
        import fused_bn
        tf = self.tf
        xs, dys, p, axis = self.shards(key, sizes, "nhwc")
        masks, _ = self.extras(key, sizes, "nhwc", p, masked=masked,
                               epilogue=False, sync=True)
        with self.strategy.scope():
            if masked:
                layer = fused_bn.BatchNormalization(
                    epsilon=EPS, center=False, synchronized=True, activation="relu")
                layer.build((None,) + self.out[f"{key}:x"].shape[1:])
                layer.gamma.assign(p["gamma"])
                gamma = layer.gamma
            else:
                gamma = tf.Variable(p["gamma"])

        def bn(x, m):
            if masked:
                return layer(x, training=True, mask=m, side_input=tf.sin(x))
            return fused_bn.batch_norm(x, True, gamma, epsilon=EPS, synchronized=True,
                                       side_input=tf.sin(x), activation="relu")

        def replica_fn(x, w, *m):
            return gradient_penalty(
                tf, lambda x: bn(x, m[0] if m else None), x, w, gamma)

        self.save_penalty(key, replica_fn, (xs, dys) + ((masks,) if masked else ()))

    # ------------------------------------------------------------ Keras

    def model(self, bn):
        import keras
        keras.utils.set_random_seed(3)
        inputs = keras.Input((6, 6, 2))
        h = keras.layers.Conv2D(4, 3, padding="same", use_bias=False)(inputs)
        h = bn(h)
        h = keras.layers.ReLU()(h)
        h = keras.layers.GlobalAveragePooling2D()(h)
        model = keras.Model(inputs, keras.layers.Dense(3)(h))
        model.compile(keras.optimizers.SGD(0.1),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return model

    def fit_data(self):
        rng = np.random.default_rng(11)
        x = (rng.standard_normal((32, 6, 6, 2)) * 2 + 0.5).astype("float32")
        return x, rng.integers(0, 3, 32)

    def save_model(self, key, model):
        for i, w in enumerate(model.weights):
            self.save_components(key, f"{i}_{w.name}", w)

    def custom_fit(self, model, x, y, batch=8):
        """One epoch of SGD steps in a strategy.run loop: Keras 3's fit does
        not run under MultiWorkerMirroredStrategy (keras-team/keras#20585:
        its symbolic build reduces the first batch and fails, with or
        without fused_bn)."""
        import keras
        tf = self.tf
        loss_fn = keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction="sum")
        data = self.strategy.experimental_distribute_dataset(
            tf.data.Dataset.from_tensor_slices((x, y)).batch(batch))

        def replica_step(xb, yb):
            with tf.GradientTape() as tape:
                loss = loss_fn(yb, model(xb, training=True)) / batch
            grads = tape.gradient(loss, model.trainable_variables)
            model.optimizer.apply_gradients(zip(grads, model.trainable_variables))

        step = tf.function(lambda xb, yb: self.strategy.run(replica_step, args=(xb, yb)))
        for xb, yb in data:
            step(xb, yb)

    def keras_fit(self, key, sync):
        """fused_bn's layer (warmup=False, unbiased_variance=False) and
        Keras' under the same strategy: 4 steps of fit, evaluate, predict
        (MultiWorkerMirroredStrategy: 4 steps of a strategy.run loop)."""
        import fused_bn
        import keras
        x, y = self.fit_data()
        models = {}
        for name, bn in [
                ("fused", lambda: fused_bn.BatchNormalization(
                    momentum=MOMENTUM, warmup=False, unbiased_variance=False,
                    synchronized=sync, name="bn")),
                ("keras", lambda: keras.layers.BatchNormalization(
                    momentum=MOMENTUM, synchronized=sync, name="bn"))]:
            with self.strategy.scope():
                model = self.model(bn())
            if self.multiworker:
                self.custom_fit(model, x, y)
            else:
                model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
                self.save(f"{key}:{name}", "evaluate", model.evaluate(x, y, verbose=0))
                self.save(f"{key}:{name}", "predict", model.predict(x, verbose=0))
            self.save_model(f"{key}:{name}", model)
            models[name] = model
        return models["fused"]

    def checkpoints(self, key, trained):
        """A checkpoint written under the strategy read into a single-device
        model, and the reverse."""
        import fused_bn
        import keras
        tf = self.tf
        tmp = tempfile.mkdtemp()
        path = tf.train.Checkpoint(model=trained).write(os.path.join(tmp, "dist"))
        single = self.model(fused_bn.BatchNormalization(name="bn"))
        tf.train.Checkpoint(model=single).read(path).assert_consumed()
        self.save_model(f"{key}:to_single", single)
        x, y = self.fit_data()
        self.save(f"{key}:to_single", "predict", single.predict(x, verbose=0))
        if not self.multiworker:
            h5 = os.path.join(tmp, "dist.weights.h5")
            trained.save_weights(h5)
            single = self.model(fused_bn.BatchNormalization(name="bn"))
            single.load_weights(h5)
            self.save_model(f"{key}:h5_to_single", single)
        source = self.model(fused_bn.BatchNormalization(momentum=0.5, name="bn"))
        with tf.distribute.OneDeviceStrategy("/cpu:0").scope():
            source.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        self.save_model(f"{key}:single", source)
        path = tf.train.Checkpoint(model=source).write(os.path.join(tmp, "single"))
        with self.strategy.scope():
            target = self.model(fused_bn.BatchNormalization(name="bn"))
            tf.train.Checkpoint(model=target).read(path).assert_consumed()
        self.save_model(f"{key}:to_dist", target)
        keras.backend.clear_session()

    # ------------------------------------------------------------ errors

    def errors(self, key):
        """What unsupported strategies and variables raise."""
        import fused_bn
        tf = self.tf
        x = tf.ones([4, C])
        central = tf.distribute.experimental.CentralStorageStrategy(
            ["/cpu:0", "/cpu:1"], parameter_device="/cpu:0")

        def under_central():
            with central.scope():
                layer = fused_bn.BatchNormalization()
                layer(x, training=True)

        self.error(f"{key}:central_storage", under_central)
        plain_mm = tf.Variable(tf.zeros([C]), trainable=False)
        plain_mv = tf.Variable(tf.ones([C]), trainable=False)
        self.error(f"{key}:plain_variable", lambda: tf.function(
            lambda: self.strategy.run(lambda: fused_bn.batch_norm(
                x, True, moving_mean=plain_mm, moving_variance=plain_mv)))())
        self.save(f"{key}:plain_variable", "moving_mean", plain_mm.numpy())
        with self.strategy.scope():
            summed = tf.Variable(tf.zeros([C]), trainable=False,
                                 synchronization=tf.VariableSynchronization.ON_READ,
                                 aggregation=tf.VariableAggregation.SUM)
            averaged = tf.Variable(tf.zeros([C]), trainable=False,
                                   synchronization=tf.VariableSynchronization.ON_READ,
                                   aggregation=tf.VariableAggregation.MEAN)
            mv = tf.Variable(tf.ones([C]), trainable=False)
        self.error(f"{key}:sync_on_read_sum", lambda: tf.function(
            lambda: self.strategy.run(lambda: fused_bn.batch_norm(
                x, True, moving_mean=summed, moving_variance=mv)))())
        self.error(f"{key}:sync_on_read_mean", lambda: tf.function(
            lambda: self.strategy.run(lambda: fused_bn.batch_norm(
                x + tf.cast(tf.distribute.get_replica_context()
                            .replica_id_in_sync_group, tf.float32),
                True, moving_mean=averaged, moving_variance=mv,
                momentum=0.0)))())
        self.save_components(f"{key}:sync_on_read_mean", "moving_mean", averaged)
        one = self.strategy.experimental_distribute_values_from_function(
            lambda ctx: tf.ones([1 - tf.minimum(ctx.replica_id_in_sync_group, 1), C]))
        for sync in (True, False):
            with self.strategy.scope():
                mm = tf.Variable(tf.fill([C], 0.5), trainable=False)
                mv = tf.Variable(tf.ones([C]), trainable=False)
                counter = tf.Variable(COUNTER0, dtype=tf.int64, trainable=False)
            self.error(f"{key}:one_value_{sync}", lambda: tf.function(
                lambda x: self.strategy.run(lambda x: fused_bn.batch_norm(
                    x, True, moving_mean=mm, moving_variance=mv,
                    num_updates=counter, synchronized=sync), args=(x,)))(one))
            self.save_components(f"{key}:one_value_{sync}", "moving_mean", mm)
            self.save_components(f"{key}:one_value_{sync}", "moving_variance", mv)
            self.save_components(f"{key}:one_value_{sync}", "num_updates", counter)
        with self.strategy.scope():
            layer = fused_bn.BatchNormalization(synchronized=True)
            layer.build(x.shape)
        xla = tf.function(lambda x: layer(x, training=True), jit_compile=True)
        self.error(f"{key}:xla", lambda: tf.function(
            lambda: self.strategy.run(xla, args=(x,)))())
        xla_masked = tf.function(
            lambda x: layer(x, training=True, mask=tf.ones([4], tf.bool)),
            jit_compile=True)
        self.error(f"{key}:xla_masked", lambda: tf.function(
            lambda: self.strategy.run(xla_masked, args=(x,)))())

    def parameter_server(self, key):
        """ParameterServerStrategy over an in-process cluster (last: it
        connects this process to the cluster)."""
        import socket
        import fused_bn
        tf = self.tf

        def port():
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                return s.getsockname()[1]

        spec = tf.train.ClusterSpec({
            "worker": [f"localhost:{port()}"], "ps": [f"localhost:{port()}"],
            "chief": [f"localhost:{port()}"]})
        servers = [tf.distribute.Server(spec, job_name=job, task_index=0,
                                        protocol="grpc", start=True)
                   for job in ("worker", "ps")]
        strategy = tf.distribute.experimental.ParameterServerStrategy(
            tf.distribute.cluster_resolver.SimpleClusterResolver(
                spec, rpc_layer="grpc", task_type="chief", task_id=0))

        def under_ps():
            with strategy.scope():
                layer = fused_bn.BatchNormalization()
                layer(tf.ones([4, C]), training=True)

        self.error(key, under_ps)
        del servers

    # ------------------------------------------------------------ TF1

    def compat_v1(self, key, sync):
        """fused_bn.compat.v1.batch_norm in a TF1 graph under the TF1
        MirroredStrategy (variables created per replica by variable scope)."""
        import fused_bn
        tf = self.tf
        v1 = tf.compat.v1
        rng = np.random.default_rng(5)
        x = (rng.standard_normal((5, 3, C)) * 2 + 1).astype("float32")
        self.save(key, "x", x)
        with tf.Graph().as_default(), v1.Session() as sess:
            strategy = v1.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
            shards = [x[:3], x[3:]]
            training = v1.placeholder(tf.bool, [])

            def fn():
                r = tf.get_static_value(
                    v1.distribute.get_replica_context().replica_id_in_sync_group)
                xr = v1.placeholder_with_default(shards[r], [None, 3, C])
                return fused_bn.compat.v1.batch_norm(
                    xr, training, scope="bn", warmup=False, momentum=0.0,
                    synchronized=sync)

            with strategy.scope():
                ys = strategy.experimental_local_results(strategy.run(fn))
            sess.run(v1.global_variables_initializer())
            out = sess.run(list(ys), {training: True})
            for r, y in enumerate(out):
                self.save(key, f"y:{r}", y)
            moving = [v for v in v1.global_variables()
                      if "moving_mean" in v.name]
            self.save(key, "moving_mean_components",
                      np.stack(sess.run(strategy.experimental_local_results(
                          moving[0]))))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--multiworker", action="store_true")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")  # each scenario retraces its functions

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * args.replicas)
    if args.multiworker:
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    else:
        strategy = tf.distribute.MirroredStrategy(
            [f"/cpu:{i}" for i in range(args.replicas)])
    run = Run(strategy, args.multiworker)
    n = strategy.num_replicas_in_sync
    uneven = [3, 2] if n == 2 else [3, 2, 0, 4]
    empty = [5, 0] if n == 2 else [0, 4, 1, 2]
    full = n == 2 and not args.multiworker  # every scenario; the others less
    scenarios = []
    for sync in (True, False):
        tag = "sync" if sync else "local"
        scenarios += [
            (run.functional, f"{tag}_nhwc", uneven, "nhwc", sync),
            (run.functional, f"{tag}_empty", empty, "nc", sync),
            (run.functional, f"{tag}_epilogue", uneven, "nhwc", sync,
             {"epilogue": True}),
            (run.masked, f"masked_{tag}", uneven, "nhwc", sync, {"epilogue": True})]
        if full or args.multiworker:
            scenarios += [
                (run.functional, f"{tag}_nchw", uneven, "nchw", sync),
                (run.functional, f"{tag}_tensor", uneven, "nhwc", sync,
                 {"training": "tensor"})]
        if full:
            scenarios += [(run.masked, f"masked_{tag}_nchw", empty, "nchw", sync)]
    scenarios += [(run.keras_fit, "fit_sync", True)]
    if full or args.multiworker:
        scenarios += [(run.keras_fit, "fit_local", False)]
    if not args.multiworker:
        scenarios += [(run.second_order, "second_order", uneven),
                      (run.second_order_epilogue, "second_order_epilogue", uneven, False),
                      (run.second_order_epilogue, "second_order_masked", uneven, True)]
    if full:
        scenarios += [
            (run.functional, "sync_eager", uneven, "nc", True, {"eager": True}),
            (run.functional, "sync_half", uneven, "nchw", True, {"dtype": "float16"}),
            (run.functional, "local_steps", uneven, "nc", False, {"steps": 3}),
            (run.masked, "masked_sync_tensor", uneven, "nhwc", True,
             {"training": "tensor"}),
            (run.update_moving_stats, "update"),
            (run.compat_v1, "v1_sync", True),
            (run.compat_v1, "v1_local", False),
            (run.errors, "errors"),
            (run.parameter_server, "errors:parameter_server")]
    try:
        for fn, *fn_args in scenarios:
            kwargs = fn_args.pop() if isinstance(fn_args[-1], dict) else {}
            t0 = time.time()
            result = fn(*fn_args, **kwargs)
            if fn == run.keras_fit and fn_args[0] == "fit_sync":
                run.checkpoints("ckpt", result)
            print(f"{fn_args[0]}: {time.time() - t0:.1f} s", flush=True)
    except Exception:
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    np.savez(args.out, **run.out)
    sys.stdout.flush()
    sys.stderr.flush()
    # A MultiWorkerMirroredStrategy process can take a minute to shut its
    # collectives down after the other worker left; the results are saved.
    os._exit(0)


if __name__ == "__main__":
    main()
