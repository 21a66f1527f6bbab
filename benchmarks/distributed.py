"""Training-step time of a small conv net under tf.distribute.MirroredStrategy
on logical CPU devices: fused_bn and Keras' BatchNormalization, each
synchronized (global-batch statistics) and not.

    python -m benchmarks.distributed --out benchmarks/results
    python -m benchmarks.distributed --quick --out /tmp/bn   # CI smoke run

On CPU this measures overhead, not speed: the logical devices share the
machine's cores and the all-reduces are in-process copies, so the ratio of
synchronized to non-synchronized step time is what the extra all-reduces
(and, for Keras, the extra E[x^2] pass) cost per step, and the fused_bn
vs Keras ratio is the layers' difference inside a whole step. The machine's
load average is recorded before and after: rerun on a quiet machine.

One step: strategy.run of forward, softmax cross-entropy, gradients and an
SGD update, in one tf.function, on a fixed per-replica batch. Steps are
timed interleaved (benchmarks.run.time_interleaved): repetition r runs the
four models in an order rotated by r.
"""
import argparse
import datetime
import os
import sys

IMPLS = ("fused_bn", "keras")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--batch", type=int, default=64, help="global batch")
    p.add_argument("--image", type=int, default=32, help="input H = W")
    p.add_argument("--channels", type=int, default=32,
                   help="channels of the first conv (doubled per stage)")
    p.add_argument("--reps", type=int, default=41,
                   help="timed samples per model (the VM is noisy)")
    p.add_argument("--min-time", type=float, default=0.2,
                   help="seconds per timed sample (steps are repeated)")
    p.add_argument("--quick", action="store_true",
                   help="tiny net and few repetitions: checks the harness")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--name", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.image, args.channels = 8, 8, 8
        args.reps, args.min_time = 3, 0.01
    return args


def build_model(keras, fused_bn, impl, sync, args):
    """3 stages of conv-BN-ReLU (the last two strided), pooling, dense."""
    keras.utils.set_random_seed(0)

    def bn():
        if impl == "fused_bn":
            return fused_bn.BatchNormalization(synchronized=sync)
        return keras.layers.BatchNormalization(synchronized=sync)

    inputs = keras.Input((args.image, args.image, 3))
    h = inputs
    for stage in range(3):
        h = keras.layers.Conv2D(args.channels * 2 ** stage, 3,
                                strides=1 if stage == 0 else 2,
                                padding="same", use_bias=False)(h)
        h = bn()(h)
        h = keras.layers.ReLU()(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    return keras.Model(inputs, keras.layers.Dense(10)(h))


def make_step(tf, keras, strategy, model, optimizer, x, y, global_batch):
    loss_fn = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction="sum")

    def replica_step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True)) / global_batch
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    @tf.function
    def step():
        return strategy.run(replica_step, args=(x, y))

    return step


def load():
    one, five, fifteen = os.getloadavg()
    return {"1min": one, "5min": five, "15min": fifteen}


def write_markdown(path, report):
    m = report["meta"]
    r = report["results"]
    lines = [
        f"# fused_bn under MirroredStrategy: training step, {m['replicas']} "
        f"logical CPU devices ({m['date']})",
        "",
        f"Device: {m['device']['cpu_model']} ({m['device']['cpus']} cores, "
        f"shared by the {m['replicas']} logical devices); TensorFlow "
        f"{m['tensorflow']}, Keras {m['keras']}.",
        f"Model: {m['model']}; global batch {m['batch']}, "
        f"{m['batch'] // m['replicas']} per replica.",
        f"Load average (1/5/15 min) before: "
        f"{'/'.join(f'{v:.2f}' for v in m['load_before'].values())}, after: "
        f"{'/'.join(f'{v:.2f}' for v in m['load_after'].values())}.",
        f"Command: `{m['command']}`",
        "",
        "A CPU overhead measurement, not a speed claim: the logical devices "
        "share the cores and the all-reduces are in-process copies.",
        "",
        "Step times in ms: median and minimum of the samples, and the "
        "interquartile spread relative to the median (a large spread means "
        "a busy machine: compare the minima then).",
        "",
        "| layer | non-sync median / min | spread | sync median / min | spread "
        "| sync / non-sync (median, min) |",
        "|---|---|---|---|---|---|",
    ]
    for impl in IMPLS:
        a, b = r[impl]["local"], r[impl]["sync"]
        lines.append(
            f"| {impl} | {a['median_ms']:.1f} / {a['min_ms']:.1f} | "
            f"{100 * a['spread']:.0f}% | {b['median_ms']:.1f} / {b['min_ms']:.1f} | "
            f"{100 * b['spread']:.0f}% | {b['median_ms'] / a['median_ms']:.2f}x, "
            f"{b['min_ms'] / a['min_ms']:.2f}x |")
    lines.append("")
    for mode in ("local", "sync"):
        k, f = r["keras"][mode], r["fused_bn"][mode]
        lines.append(f"{'Sync' if mode == 'sync' else 'Non-sync'}: Keras step / "
                     f"fused_bn step = {k['median_ms'] / f['median_ms']:.2f}x "
                     f"(medians), {k['min_ms'] / f['min_ms']:.2f}x (minima).")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np
    import tensorflow as tf
    tf.get_logger().setLevel("ERROR")
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * args.replicas)
    import keras
    import fused_bn
    from benchmarks.run import (device_info, make_sync, summarize,
                                time_interleaved, write_report)

    strategy = tf.distribute.MirroredStrategy(
        [f"/cpu:{i}" for i in range(args.replicas)])
    per = args.batch // args.replicas
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((per, args.image, args.image, 3)).astype("float32")
          for _ in range(args.replicas)]
    ys = [rng.integers(0, 10, per) for _ in range(args.replicas)]
    x = strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(xs[ctx.replica_id_in_sync_group]))
    y = strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(ys[ctx.replica_id_in_sync_group]))
    steps = {}
    for impl in IMPLS:
        for mode in ("local", "sync"):
            with strategy.scope():
                model = build_model(keras, fused_bn, impl, mode == "sync", args)
                optimizer = keras.optimizers.SGD(0.01)
            steps[f"{impl}/{mode}"] = make_step(tf, keras, strategy, model,
                                                optimizer, x, y, args.batch)
    load_before = load()
    samples = time_interleaved(steps, args.reps, args.min_time, make_sync(tf, "cpu"))
    load_after = load()
    results = {impl: {} for impl in IMPLS}
    for name, t in samples.items():
        impl, mode = name.split("/")
        results[impl][mode] = summarize(t)
    date = datetime.date.today().isoformat()
    command = " ".join(["python -m benchmarks.distributed"] +
                       (sys.argv[1:] if argv is None else list(argv)))
    report = {"meta": {
        "date": date, "command": command, "device": device_info(tf, "cpu"),
        "replicas": args.replicas, "batch": args.batch,
        "model": f"{args.image}x{args.image}x3 input, 3x (conv3x3 "
                 f"{args.channels}/{2 * args.channels}/{4 * args.channels} "
                 "channels, BN, ReLU), global average pool, dense 10; SGD",
        "reps": args.reps, "min_time_s": args.min_time,
        "tensorflow": tf.__version__, "keras": keras.__version__,
        "load_before": load_before, "load_after": load_after},
        "results": results,
        "sync_overhead": {impl: results[impl]["sync"]["median_ms"] /
                          results[impl]["local"]["median_ms"] for impl in IMPLS}}
    stem = os.path.join(args.out, args.name or f"cpu-distributed-{date}")
    write_report(stem, report, write_markdown)
    with open(stem + ".md") as f:
        print(f.read())
    return report


if __name__ == "__main__":
    main()
