"""Whole-model training steps with fused_bn's layer, Keras 3's and tf_keras'.

    python -m benchmarks.models --out benchmarks/results
    python -m benchmarks.models --quick --out /tmp/bn        # CI smoke run

A training step (forward in training mode, softmax cross-entropy, gradients,
SGD with momentum) of two models on 32x32x3 images, batch 64, float32
channels-last, reported as images/s:
  resnet20  ResNet-20 (He et al. 2016, CIFAR): conv3x3(16), three stages of
            three basic blocks (16, 32, 64 filters; a 1x1 stride-2 conv
            shortcut where the shape changes), global average pool, dense.
            19 batch norms; 9 of them end a block with add + relu.
  mlp       flatten, three dense(512, no bias) + batch norm + relu, dense.
Variants (the same architecture and initial weights' shapes):
  fused_bn           fused_bn.BatchNormalization, with the epilogue where
                     the block allows it: activation="relu" for BN + relu,
                     and side_input=shortcut for a block's add + relu tail
  fused_bn_plain     fused_bn.BatchNormalization followed by Add and ReLU
                     layers (what the epilogue saves)
  keras              keras.layers.BatchNormalization (Keras 3), Add, ReLU
  tf_keras           tf_keras.layers.BatchNormalization(fused=True) (the
                     stock FusedBatchNormV3; the MLP's [N, C] goes in as
                     [N, 1, 1, C]), Add, ReLU, in a tf_keras model
  no_bn              no batch norm at all (Add and ReLU kept): the step
                     time the rest of the model takes, so how much of a step
                     batch norm is (not a baseline)
Every variant's step is one tf.function (jit_compile=False, as Keras 3 fit
does on a CPU-only machine). Samples are interleaved: repetition r runs the
variants in an order rotated by r, each for --steps steps.
tf_keras must be installed without its dependencies, or it pulls in the
`tensorflow` distribution beside `tensorflow-cpu`:
    pip install --no-deps "tf_keras==2.21.*"
"""
import argparse
import datetime
import json
import os
import sys
import time

import numpy as np

MODELS = ("resnet20", "mlp")
VARIANTS = ("fused_bn", "fused_bn_plain", "keras", "tf_keras", "no_bn")
BASELINES = ("keras", "tf_keras", "fused_bn_plain")
TF_KERAS_HINT = 'pip install --no-deps "tf_keras==2.21.*"'


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--batch", type=int, default=None, help="default 64 (8 with --quick)")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps per timed sample (default 10)")
    p.add_argument("--reps", type=int, default=None,
                   help="timed samples per variant (default 11)")
    p.add_argument("--blocks", type=int, default=None,
                   help="basic blocks per ResNet stage (default 3: ResNet-20)")
    p.add_argument("--threads", type=int, default=0,
                   help="TensorFlow intra-op threads (0: TF's default)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: batch 8, one block per stage, 2 samples of 2 steps")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--name", default=None, help="output file stem (default: cpu-models-DATE)")
    p.add_argument("--no-plot", action="store_true")
    a = p.parse_args(argv)
    quick = {"batch": 8, "steps": 2, "reps": 2, "blocks": 1}
    full = {"batch": 64, "steps": 10, "reps": 11, "blocks": 3}
    for k, v in (quick if a.quick else full).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    for name, allowed in (("models", MODELS), ("variants", VARIANTS)):
        items = [v.strip() for v in getattr(a, name).split(",") if v.strip()]
        bad = [v for v in items if v not in allowed]
        if bad:
            raise SystemExit(f"--{name}: {bad} not in {allowed}")
        setattr(a, name, items)
    return a


# --------------------------------------------------------------------------
# Models. `lib` is keras (Keras 3) or tf_keras; `bn(h, side, relu)` returns
# the block's normalization tail relu?(BN(h) + side?) in the variant's way.

def bn_tail(variant, lib):
    import fused_bn

    def fused(h, side=None, relu=True):
        layer = fused_bn.BatchNormalization(activation="relu" if relu else None)
        return layer(h, side_input=side) if side is not None else layer(h)

    def layers(h, side=None, relu=True):
        if variant == "fused_bn_plain":
            h = fused_bn.BatchNormalization()(h)
        elif variant == "no_bn":
            pass
        elif variant == "keras":
            h = lib.layers.BatchNormalization()(h)
        elif h.shape.rank == 2:  # tf_keras' fused op takes 4-D tensors only
            c = h.shape[-1]
            h = lib.layers.Reshape((1, 1, c))(h)
            h = lib.layers.BatchNormalization(fused=True)(h)
            h = lib.layers.Reshape((c,))(h)
        else:
            h = lib.layers.BatchNormalization(fused=True)(h)
        if side is not None:
            h = lib.layers.Add()([h, side])
        return lib.layers.ReLU()(h) if relu else h
    return fused if variant == "fused_bn" else layers


def resnet(lib, bn, blocks, classes=10):
    conv = lambda f, k, s=1: lib.layers.Conv2D(  # noqa: E731
        f, k, strides=s, padding="same", use_bias=False)
    inp = lib.Input((32, 32, 3))
    h = bn(conv(16, 3)(inp))
    for stage, filters in enumerate((16, 32, 64)):
        for b in range(blocks):
            stride = 2 if stage > 0 and b == 0 else 1
            shortcut = h if stride == 1 else conv(filters, 1, stride)(h)
            r = bn(conv(filters, 3, stride)(h))
            h = bn(conv(filters, 3)(r), side=shortcut)
    h = lib.layers.GlobalAveragePooling2D()(h)
    return lib.Model(inp, lib.layers.Dense(classes)(h))


def mlp(lib, bn, classes=10):
    inp = lib.Input((32, 32, 3))
    h = lib.layers.Flatten()(inp)
    for _ in range(3):
        h = bn(lib.layers.Dense(512, use_bias=False)(h))
    return lib.Model(inp, lib.layers.Dense(classes)(h))


class Missing(Exception):
    """A variant cannot run here (reported, not fatal)."""


def build_model(model_name, variant, blocks):
    """The model of one variant and its optimizer."""
    if variant == "tf_keras":
        try:
            import tf_keras as lib
        except ImportError:
            raise Missing(f"tf_keras is not installed ({TF_KERAS_HINT})") from None
    else:
        import keras as lib
    bn = bn_tail(variant, lib)
    model = resnet(lib, bn, blocks) if model_name == "resnet20" else mlp(lib, bn)
    opt = lib.optimizers.SGD(learning_rate=0.01, momentum=0.9)
    return model, opt


def make_step(tf, model, opt, x, labels):
    variables = model.trainable_variables

    @tf.function(jit_compile=False)
    def step():
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            loss = tf.reduce_mean(
                tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))
        grads = tape.gradient(loss, variables)
        opt.apply_gradients(zip(grads, variables))
        return loss
    return step


def time_interleaved(steps_fns, steps, reps):
    """{name: [seconds per step]} over `reps` rotated rounds."""
    names = list(steps_fns)
    for name in names:  # trace, warm up, fault in the heap
        for _ in range(max(2, steps)):
            loss = steps_fns[name]()
        loss.numpy()
    samples = {name: [] for name in names}
    for r in range(reps):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            t0 = time.perf_counter()
            for _ in range(steps):
                loss = steps_fns[name]()
            loss.numpy()
            samples[name].append((time.perf_counter() - t0) / steps)
    return samples


def run_model(tf, args, model_name):
    rng = np.random.default_rng(0)
    x = tf.constant(rng.standard_normal((args.batch, 32, 32, 3), dtype=np.float32))
    labels = tf.constant(rng.integers(0, 10, args.batch), tf.int32)
    fns, missing, params = {}, {}, {}
    for variant in args.variants:
        try:
            model, opt = build_model(model_name, variant, args.blocks)
        except Missing as e:
            missing[variant] = str(e)
            print(f"  {model_name}: {variant} skipped: {e}", flush=True)
            continue
        fns[variant] = make_step(tf, model, opt, x, labels)
        params[variant] = int(sum(np.prod(v.shape) for v in model.trainable_variables))
    samples = time_interleaved(fns, args.steps, args.reps)
    results = {}
    for name, t in samples.items():
        t = np.asarray(t)
        med = float(np.median(t))
        q25, q75 = np.percentile(t, [25, 75])
        results[name] = {"step_ms": med * 1e3, "min_step_ms": float(t.min()) * 1e3,
                         "spread": float((q75 - q25) / med),
                         "images_per_s": args.batch / med, "samples": len(t),
                         "trainable_params": params[name]}
    speedup = {}
    if "fused_bn" in results:
        for b in BASELINES:
            if b in results:
                speedup[b] = results[b]["step_ms"] / results["fused_bn"]["step_ms"]
    return {"model": model_name, "batch": args.batch, "results": results,
            "speedup": speedup, "unsupported": missing}


def write_markdown(path, report):
    m = report["meta"]
    lines = [
        f"# fused_bn whole-model training steps: {m['cpu_model']} "
        f"({m['intra_op_threads']} threads), {m['date']}", "",
        f"TensorFlow {m['tensorflow']}, Keras {m['keras']}, tf_keras "
        f"{m['tf_keras'] or 'not installed'}. Load average before the run: "
        f"{m['load_before']}. Command: `{m['command']}`", "",
        f"Medians of {m['reps']} interleaved samples of {m['steps']} training "
        "steps (min and interquartile spread of the step time beside them). "
        "Speedup = baseline step time / fused_bn step time.", "",
        "| model | batch | variant | images/s | step ms (min, spread) | fused_bn speedup |",
        "|---|---|---|---|---|---|",
    ]
    for c in report["cases"]:
        for v in VARIANTS:
            r = c["results"].get(v)
            if r is None:
                if v in c["unsupported"]:
                    lines.append(f"| {c['model']} | {c['batch']} | {v} | not run | "
                                 f"{c['unsupported'][v]} | |")
                continue
            s = c["speedup"].get(v)
            lines.append(
                f"| {c['model']} | {c['batch']} | {v} | {r['images_per_s']:.0f} | "
                f"{r['step_ms']:.2f} ({r['min_step_ms']:.2f}, {100 * r['spread']:.0f}%) | "
                f"{'' if s is None else f'{s:.2f}x'} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def write_plot(path, report):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cases = report["cases"]
    fig, axes = plt.subplots(1, len(cases), squeeze=False, figsize=(4.5 * len(cases), 3.5))
    for ax, c in zip(axes[0], cases):
        names = [v for v in VARIANTS if v in c["results"]]
        ax.bar(names, [c["results"][v]["images_per_s"] for v in names],
               color=["C0" if v.startswith("fused_bn") else "C7" for v in names])
        ax.set_title(f"{c['model']}, batch {c['batch']}", fontsize=9)
        ax.set_ylabel("images/s (training)")
        ax.tick_params(axis="x", labelsize=7, rotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    tf.get_logger().setLevel("ERROR")
    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    import keras
    try:
        import tf_keras
        tf_keras_version = tf_keras.__version__
    except ImportError:
        tf_keras_version = None
        if "tf_keras" in args.variants:
            print(f"NOTE: tf_keras is not installed, so its variant is skipped; "
                  f"install it with: {TF_KERAS_HINT}", flush=True)
    import fused_bn
    keras.utils.set_random_seed(0)
    date = datetime.date.today().isoformat()
    cpu_model = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu_model = next((line.split(":", 1)[1].strip() for line in f
                              if line.startswith("model name")), "")
    except OSError:
        pass
    threads = args.threads or tf.config.threading.get_intra_op_parallelism_threads() \
        or os.cpu_count()
    command = " ".join(["python -m benchmarks.models"] +
                       (sys.argv[1:] if argv is None else list(argv)))
    report = {"meta": {
        "date": date, "command": command, "cpu_model": cpu_model, "cpus": os.cpu_count(),
        "intra_op_threads": threads, "load_before": " ".join(
            f"{v:.2f}" for v in os.getloadavg()),
        "tensorflow": tf.__version__, "keras": keras.__version__,
        "tf_keras": tf_keras_version, "fused_bn": fused_bn.build_info(),
        "batch": args.batch, "steps": args.steps, "reps": args.reps,
        "resnet_blocks_per_stage": args.blocks, "variants": {
            "fused_bn": "fused_bn.BatchNormalization with the epilogue "
                        "(activation='relu', side_input=shortcut)",
            "fused_bn_plain": "fused_bn.BatchNormalization + Add + ReLU",
            "keras": "keras.layers.BatchNormalization + Add + ReLU (Keras 3)",
            "tf_keras": "tf_keras.layers.BatchNormalization(fused=True) + Add + ReLU",
            "no_bn": "no batch norm (Add + ReLU): the rest of the step"}},
        "cases": []}
    t_start = time.time()
    with tf.device("/CPU:0"):
        for model_name in args.models:
            c = run_model(tf, args, model_name)
            report["cases"].append(c)
            ips = " ".join(f"{v} {r['images_per_s']:.0f}" for v, r in c["results"].items())
            ratios = " ".join(f"vs {b} {s:.2f}x" for b, s in c["speedup"].items())
            print(f"{model_name} batch {args.batch}: images/s {ips} | fused_bn {ratios} "
                  f"({time.time() - t_start:.0f}s)", flush=True)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, args.name or f"cpu-models-{date}")
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=1)
    write_markdown(stem + ".md", report)
    written = [stem + ".json", stem + ".md"]
    if not args.no_plot:
        write_plot(stem + ".png", report)
        written.append(stem + ".png")
    print("wrote " + ", ".join(written))
    return report


if __name__ == "__main__":
    main()
