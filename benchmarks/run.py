"""fused_bn against the stock op, Keras and the manual pattern, in one run.

    python -m benchmarks.run --device cpu --out benchmarks/results
    python -m benchmarks.run --quick --out /tmp/bn        # CI smoke run

Every case (shape x dtype x layout x mode) builds one tf.function per
implementation (jit_compile=False), warms each up, then times them
interleaved: repetition r runs the implementations in an order rotated by r,
so drift of the machine hits all of them alike. A "copy" of x, timed in the
same rotation on the same device and thread pool, gives the bandwidth that
the effective GB/s are compared with.

Implementations:
  fused_bn  fused_bn.batch_norm (a Keras layer for keras_step)
  stock     tf.compat.v1.nn.fused_batch_norm (FusedBatchNormV3), with the
            moving-average assigns a user writes
  keras     keras.layers.BatchNormalization
  manual    tf.nn.moments + tf.nn.batch_normalization + assign_moving_average
Modes:
  infer          y from the moving statistics
  train_fwd      batch statistics, y, moving-average update
  train_fwd_bwd  train_fwd plus dx, dscale, doffset for a given dy
  keras_step     Keras layer training step: forward, gradients for a given
                 dy, SGD update of gamma and beta (fused_bn vs keras only)
  epilogue_fwd_bwd  a ResNet block's tail relu(bn(x) + side) and its
                 gradients w.r.t. x, side, scale, offset for a given dy:
                 fused_bn's epilogue (side_input=, activation="relu") against
                 each baseline followed by tf.add and tf.nn.relu
Minimum bytes moved, in units of x's size: infer 2 (read x, write y),
train_fwd 3 (read x twice, write y), train_fwd_bwd and keras_step 8 (the
backward reads x and dy twice and writes dx), epilogue_fwd_bwd 11 (the
forward also reads side; the backward reads dy, y, x, writes the masked dy
as d(side), reads it and x again and writes dx).
"""
import argparse
import datetime
import json
import math
import os
import platform
import sys
import time

import numpy as np

MODES = ("infer", "train_fwd", "train_fwd_bwd", "keras_step", "epilogue_fwd_bwd")
IMPLS = ("fused_bn", "stock", "keras", "manual")
BASELINES = ("stock", "keras", "manual")
GRAD_MODES = ("train_fwd_bwd", "epilogue_fwd_bwd")
PASSES = {"infer": 2, "train_fwd": 3, "train_fwd_bwd": 8, "keras_step": 8,
          "epilogue_fwd_bwd": 11}
MOMENTUM, EPSILON = 0.99, 1e-3

RESNET50 = ["112x112x64", "56x56x64", "56x56x256", "28x28x128", "28x28x512",
            "14x14x256", "14x14x1024", "7x7x512", "7x7x2048"]
SHAPE_SETS = {
    "cpu": [f"32x{s}" for s in RESNET50] + ["256x1024", "4096x1024"],
    "gpu": [f"256x{s}" for s in RESNET50] + ["256x1024", "4096x1024",
                                              "16384x1024"],
    "targets": ["32x56x56x64", "32x28x28x128", "32x14x14x256", "256x1024"],
    "epilogue": ["32x56x56x64", "32x28x28x128", "32x14x14x256"],
    "quick": ["4x8x8x16", "64x32"],
}
COPY_METHOD = ("tf.function(x * s), s a scalar tf.Variable: one elementwise "
               "kernel on the same device and intra-op pool, reading and "
               "writing x's size once each")


class Unsupported(Exception):
    """The implementation cannot run this case (reported, not fatal)."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--dtype", default=None,
                   help="comma list: float32,bfloat16,float16 (default: "
                        "float32,bfloat16 on cpu, float32,float16 on gpu)")
    p.add_argument("--layout", default=None,
                   help="NHWC,NCHW (default: both; NHWC with --quick)")
    p.add_argument("--shapes", default=None,
                   help="comma list of NxHxWxC / NxC shapes or set names "
                        f"({', '.join(SHAPE_SETS)}); default: the device's set")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--reps", type=int, default=None,
                   help="timed repetitions per implementation (default 15)")
    p.add_argument("--min-time", type=float, default=None,
                   help="seconds per timed sample; short calls are repeated "
                        "to reach it (default 0.02)")
    p.add_argument("--threads", type=int, default=0,
                   help="TensorFlow intra-op threads (0: TF's default)")
    p.add_argument("--quick", action="store_true",
                   help="sub-minute smoke run on tiny shapes")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--name", default=None,
                   help="output file stem (default: DEVICE-DATE)")
    p.add_argument("--no-plot", action="store_true")
    a = p.parse_args(argv)
    if a.dtype is None:
        a.dtype = "float32" if a.quick else (
            "float32,bfloat16" if a.device == "cpu" else "float32,float16")
    if a.quick:
        a.shapes = a.shapes or "quick"
        a.layout = a.layout or "NHWC"
        a.reps = a.reps or 3
        a.min_time = a.min_time or 0.001
    a.shapes = a.shapes or a.device
    a.layout = a.layout or "NHWC,NCHW"
    a.reps = a.reps or 15
    a.min_time = a.min_time or 0.02
    return a


def split(s):
    return [v.strip() for v in s.split(",") if v.strip()]


def expand_shapes(spec):
    shapes = []
    for item in split(spec):
        for s in SHAPE_SETS.get(item, [item]):
            dims = tuple(int(d) for d in s.split("x"))
            if len(dims) not in (2, 4):
                raise SystemExit(f"shape {s}: want NxC or NxHxWxC")
            if dims not in shapes:
                shapes.append(dims)
    return shapes


def cases(args):
    out = []
    for shape in expand_shapes(args.shapes):
        for layout in split(args.layout):
            if layout not in ("NHWC", "NCHW"):
                raise SystemExit(f"layout {layout}: want NHWC or NCHW")
            if len(shape) == 2 and layout == "NCHW":
                continue  # [N, C] has one layout
            for dtype in split(args.dtype):
                for mode in split(args.modes):
                    if mode not in MODES:
                        raise SystemExit(f"mode {mode}: want one of {MODES}")
                    out.append((shape, layout, dtype, mode))
    return out


# --------------------------------------------------------------------------
# Implementations. Each builder returns a no-argument tf.function.

class Case:
    """Tensors and variables shared by the implementations of one case."""

    def __init__(self, tf, shape, layout, dtype, mode):
        self.shape, self.layout, self.mode = shape, layout, mode
        self.dtype = tf.as_dtype(dtype)
        self.c = shape[-1]
        dims = shape if layout == "NHWC" else (shape[0], shape[3]) + shape[1:3]
        self.dims = dims
        self.axis = -1 if layout == "NHWC" else 1
        self.reduce_axes = [i for i in range(len(dims))
                            if i != (len(dims) - 1 if self.axis == -1 else 1)]
        rng = np.random.default_rng(0)
        x = rng.standard_normal(dims, dtype=np.float32) * 2.0 + 0.5
        dy = rng.standard_normal(dims, dtype=np.float32)
        self.x = tf.cast(tf.constant(x), self.dtype)
        self.dy = tf.cast(tf.constant(dy), self.dtype)
        self.side = None
        if mode == "epilogue_fwd_bwd":  # a residual branch: relu clips ~half
            side = rng.standard_normal(dims, dtype=np.float32) * 1.5 - 0.5
            self.side = tf.cast(tf.constant(side), self.dtype)
        self.n = int(np.prod(dims))
        self.bytes = self.n * self.dtype.size
        c = self.c
        self.scale = tf.Variable(rng.uniform(0.5, 1.5, c).astype(np.float32))
        self.offset = tf.Variable(rng.uniform(-0.5, 0.5, c).astype(np.float32))
        self.mm = tf.Variable(np.zeros(c, np.float32))
        self.mv = tf.Variable(np.ones(c, np.float32))

    def stat_shape(self):
        """Shape [C] statistics broadcast to, for the manual pattern."""
        if self.axis == -1:
            return [self.c]
        return [1, self.c] + [1] * (len(self.dims) - 2)


def with_grad(tf, case, forward, variables):
    """tf.function: forward() and its gradients w.r.t. x and variables (and
    the side input in epilogue_fwd_bwd)."""
    x, dy = case.x, case.dy
    inputs = [x] if case.side is None else [x, case.side]

    @tf.function(jit_compile=False)
    def step():
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            y = forward(x)
        return tape.gradient(y, inputs + list(variables), output_gradients=dy)
    return step


def with_epilogue(tf, case, forward):
    """forward followed by tf.add(., side) and tf.nn.relu in epilogue_fwd_bwd."""
    if case.mode != "epilogue_fwd_bwd":
        return forward
    return lambda x: tf.nn.relu(tf.add(forward(x), case.side))



def build_fused(tf, case):
    import fused_bn
    if case.mode == "keras_step":
        return keras_step(tf, case, fused_layer(case))
    training = case.mode != "infer"

    epilogue = case.mode == "epilogue_fwd_bwd"

    def forward(x):
        return fused_bn.batch_norm(
            x, training, case.scale, case.offset, case.mm, case.mv,
            momentum=MOMENTUM, epsilon=EPSILON, axis=case.axis,
            side_input=case.side, activation="relu" if epilogue else None)
    if case.mode in GRAD_MODES:
        return with_grad(tf, case, forward, [case.scale, case.offset])
    return tf.function(lambda: forward(case.x), jit_compile=False)


def build_stock(tf, case):
    if case.mode == "keras_step":
        raise Unsupported("keras_step compares Keras layers only")
    if case.dtype == tf.float64:
        raise Unsupported("FusedBatchNormV3 has no float64 kernel")
    data_format = case.layout
    four_d = len(case.dims) == 2  # [N, C] goes in as [N, 1, 1, C]
    training = case.mode != "infer"
    if case.layout == "NCHW" and tf.config.list_logical_devices("GPU") == []:
        try:  # the CPU kernel may reject NCHW: find out before timing
            tf.compat.v1.nn.fused_batch_norm(
                case.x[:1], case.scale, case.offset, epsilon=EPSILON,
                data_format="NCHW", is_training=True)
        except Exception as e:  # noqa: BLE001: any rejection means "cannot"
            raise Unsupported(f"NCHW on CPU: {type(e).__name__}") from None

    def forward(x):
        xin = tf.reshape(x, [-1, 1, 1, case.c]) if four_d else x
        if not training:
            y, _, _ = tf.compat.v1.nn.fused_batch_norm(
                xin, case.scale, case.offset, mean=case.mm,
                variance=case.mv, epsilon=EPSILON, data_format=data_format,
                is_training=False)
        else:
            y, mean, var = tf.compat.v1.nn.fused_batch_norm(
                xin, case.scale, case.offset, epsilon=EPSILON,
                data_format=data_format, is_training=True)
            case.mm.assign_sub((case.mm - mean) * (1.0 - MOMENTUM))
            case.mv.assign_sub((case.mv - var) * (1.0 - MOMENTUM))
        return tf.reshape(y, tf.shape(x)) if four_d else y
    forward = with_epilogue(tf, case, forward)
    if case.mode in GRAD_MODES:
        return with_grad(tf, case, forward, [case.scale, case.offset])
    return tf.function(lambda: forward(case.x), jit_compile=False)


def keras_layer(case):
    import keras
    layer = keras.layers.BatchNormalization(
        axis=case.axis, momentum=MOMENTUM, epsilon=EPSILON,
        dtype=keras_policy(case))
    layer.build(case.x.shape)
    return layer


def keras_policy(case):
    name = case.dtype.name
    return "float32" if name == "float32" else f"mixed_{name}"


def fused_layer(case):
    """fused_bn.BatchNormalization, or a minimal layer until it exists."""
    import fused_bn
    if hasattr(fused_bn, "BatchNormalization"):
        layer = fused_bn.BatchNormalization(
            axis=case.axis, momentum=MOMENTUM, epsilon=EPSILON,
            dtype=keras_policy(case))
    else:
        layer = _minimal_fused_layer(case)
    layer.build(case.x.shape)
    return layer


def _minimal_fused_layer(case):
    import keras

    import fused_bn

    class FusedBN(keras.layers.Layer):
        def __init__(self, axis, **kw):
            super().__init__(autocast=False, **kw)
            self.axis = axis

        def build(self, shape):
            c = shape[self.axis]
            self.gamma = self.add_weight(shape=(c,), initializer="ones")
            self.beta = self.add_weight(shape=(c,), initializer="zeros")
            self.moving_mean = self.add_weight(
                shape=(c,), initializer="zeros", trainable=False)
            self.moving_variance = self.add_weight(
                shape=(c,), initializer="ones", trainable=False)

        def call(self, x, training=False):
            return fused_bn.batch_norm(
                x, training, self.gamma, self.beta, self.moving_mean,
                self.moving_variance, momentum=MOMENTUM, epsilon=EPSILON,
                axis=self.axis)
    return FusedBN(case.axis, dtype=keras_policy(case))


def keras_step(tf, case, layer):
    import keras
    opt = keras.optimizers.SGD(learning_rate=1e-3)
    opt.build(layer.trainable_variables)
    x, dy = case.x, case.dy

    @tf.function(jit_compile=False)
    def step():
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
        grads = tape.gradient(y, [x] + layer.trainable_variables,
                              output_gradients=dy)
        opt.apply_gradients(zip(grads[1:], layer.trainable_variables))
        return grads[0]
    return step


def build_keras(tf, case):
    layer = keras_layer(case)
    if case.mode == "keras_step":
        return keras_step(tf, case, layer)
    training = case.mode != "infer"

    def forward(x):
        return layer(x, training=training)
    forward = with_epilogue(tf, case, forward)
    if case.mode in GRAD_MODES:
        return with_grad(tf, case, forward, layer.trainable_variables)
    return tf.function(lambda: forward(case.x), jit_compile=False)


def build_manual(tf, case):
    if case.mode == "keras_step":
        raise Unsupported("keras_step compares Keras layers only")
    from tensorflow.python.training.moving_averages import \
        assign_moving_average
    training = case.mode != "infer"
    shape = case.stat_shape()

    def bcast(v, dtype):
        return tf.reshape(tf.cast(v, dtype), shape)

    def forward(x):
        dt = x.dtype
        if training:
            mean, var = tf.nn.moments(x, case.reduce_axes, keepdims=True)
            assign_moving_average(case.mm, tf.cast(tf.reshape(mean, [-1]),
                                                   tf.float32),
                                  MOMENTUM, zero_debias=False)
            assign_moving_average(case.mv, tf.cast(tf.reshape(var, [-1]),
                                                   tf.float32),
                                  MOMENTUM, zero_debias=False)
        else:
            mean, var = bcast(case.mm, dt), bcast(case.mv, dt)
        return tf.nn.batch_normalization(
            x, mean, var, bcast(case.offset, dt), bcast(case.scale, dt),
            EPSILON)
    forward = with_epilogue(tf, case, forward)
    if case.mode in GRAD_MODES:
        return with_grad(tf, case, forward, [case.scale, case.offset])
    return tf.function(lambda: forward(case.x), jit_compile=False)


def build_copy(tf, case):
    s = tf.Variable(1.0, dtype=case.dtype)
    return tf.function(lambda: case.x * s, jit_compile=False)


BUILDERS = {"fused_bn": build_fused, "stock": build_stock,
            "keras": build_keras, "manual": build_manual, "copy": build_copy}


# --------------------------------------------------------------------------
# Timing.

def make_sync(tf, device):
    if device == "cpu":
        return lambda out: None  # CPU kernels finish before the call returns

    def sync(out):
        t = out[0] if isinstance(out, (list, tuple)) else out
        tf.reshape(t, [-1])[:1].numpy()
    return sync


def time_interleaved(fns, reps, min_time, sync):
    """{name: [seconds per call]}: warmed up, calls per sample calibrated."""
    calls = {}
    for name, fn in fns.items():
        sync(fn())  # trace and warm up
        t0 = time.perf_counter()
        sync(fn())
        once = max(time.perf_counter() - t0, 1e-6)
        calls[name] = max(1, math.ceil(min_time / once))
    names = list(fns)
    # One untimed round: the first rounds of a process still grow the
    # allocator's heap (page faults on fresh memory), whichever runs first.
    for name in names:
        for _ in range(calls[name]):
            out = fns[name]()
        sync(out)
    samples = {name: [] for name in names}
    for r in range(reps):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            fn, n = fns[name], calls[name]
            t0 = time.perf_counter()
            for _ in range(n):
                out = fn()
            sync(out)
            samples[name].append((time.perf_counter() - t0) / n)
    return samples


def summarize(times):
    t = np.asarray(times)
    med = float(np.median(t))
    q25, q75 = np.percentile(t, [25, 75])
    return {"median_ms": med * 1e3, "min_ms": float(t.min()) * 1e3,
            "spread": float((q75 - q25) / med), "samples": len(t)}


def run_case(tf, args, shape, layout, dtype, mode, sync):
    case = Case(tf, shape, layout, dtype, mode)
    impls = [i for i in split(args.impls) if i in IMPLS]
    if mode == "keras_step":
        impls = [i for i in impls if i in ("fused_bn", "keras")]
    fns, unsupported = {}, {}
    for name in impls + ["copy"]:
        try:
            fns[name] = BUILDERS[name](tf, case)
            fns[name]()  # surfaces trace-time and run-time rejections
        except Unsupported as e:
            unsupported[name] = str(e)
            fns.pop(name, None)
        except Exception as e:  # noqa: BLE001: report, keep benchmarking
            unsupported[name] = f"{type(e).__name__}: {str(e)[:200]}"
            fns.pop(name, None)
    samples = time_interleaved(fns, args.reps, args.min_time, sync)
    copy = summarize(samples.pop("copy"))
    copy_gbps = 2 * case.bytes / (copy["median_ms"] * 1e-3) / 1e9
    min_bytes = PASSES[mode] * case.bytes
    results = {}
    for name, t in samples.items():
        s = summarize(t)
        s["gbps"] = min_bytes / (s["median_ms"] * 1e-3) / 1e9
        s["fraction_of_copy"] = s["gbps"] / copy_gbps
        results[name] = s
    speedup = {}
    if "fused_bn" in results:
        for b in BASELINES:
            if b in results:
                speedup[b] = results[b]["median_ms"] / results["fused_bn"]["median_ms"]
    return {"shape": list(shape), "tensor_shape": list(case.dims),
            "layout": layout, "dtype": dtype, "mode": mode,
            "bytes_x": case.bytes, "min_bytes": min_bytes,
            "copy": dict(copy, gbps=copy_gbps), "results": results,
            "speedup": speedup, "unsupported": unsupported}


# --------------------------------------------------------------------------
# Reports.

def device_info(tf, device):
    info = {"kind": device, "platform": platform.platform(),
            "cpus": os.cpu_count(), "cpu_model": platform.processor()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if device == "gpu":
        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            info["gpu"] = tf.config.experimental.get_device_details(gpus[0]).get(
                "device_name", gpus[0].name)
    return info


def shape_str(c):
    return "x".join(map(str, c["tensor_shape"]))


def write_markdown(path, report):
    m = report["meta"]
    lines = [
        f"# fused_bn benchmark: {m['device'].get('gpu', m['device']['cpu_model'])}"
        f" ({m['device']['kind']}, {m['intra_op_threads']} threads), {m['date']}",
        "",
        f"TensorFlow {m['tensorflow']}, Keras {m['keras']}. Load average "
        f"before the run: {m.get('load_before', 'not recorded')}. Command: "
        f"`{m['command']}`",
        "",
        f"Times are medians of {m['reps']} interleaved samples (min and the "
        "interquartile spread beside them). GB/s counts the minimum bytes of "
        "the mode (infer 2, train_fwd 3, train_fwd_bwd and keras_step 8, "
        "epilogue_fwd_bwd 11 passes over x's size); copy is " + m["copy_method"] + ". Speedup = "
        "baseline median / fused_bn median.",
        "",
        "| shape | layout | dtype | mode | fused_bn ms (min, spread) | GB/s "
        "| of copy | vs stock | vs keras | vs manual |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in report["cases"]:
        f = c["results"].get("fused_bn")
        if f is None:
            cells = ["n/a"] * 3
        else:
            cells = [f"{f['median_ms']:.3f} ({f['min_ms']:.3f}, "
                     f"{100 * f['spread']:.0f}%)", f"{f['gbps']:.3g}",
                     f"{100 * f['fraction_of_copy']:.0f}%"]
        for b in BASELINES:
            if b in c["speedup"]:
                cells.append(f"{c['speedup'][b]:.2f}x")
            elif b in c["unsupported"] and c["mode"] != "keras_step":
                cells.append("unsupported")
            else:
                cells.append("")
        lines.append(f"| {shape_str(c)} | {c['layout']} | {c['dtype']} | "
                     f"{c['mode']} | " + " | ".join(cells) + " |")
    notes = sorted({f"{b}: {why}" for c in report["cases"]
                    for b, why in c["unsupported"].items()
                    if c["mode"] != "keras_step" or b == "fused_bn"
                    or b == "keras"})
    if notes:
        lines += ["", "Not run:"] + [f"- {n}" for n in notes]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def write_plot(path, report):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    modes = [m for m in MODES if any(c["mode"] == m for c in report["cases"])]
    fig, axes = plt.subplots(len(modes), 1, squeeze=False,
                             figsize=(max(8, 0.5 * len(report["cases"])),
                                      3.2 * len(modes)))
    for ax, mode in zip(axes[:, 0], modes):
        cs = [c for c in report["cases"] if c["mode"] == mode]
        labels = [f"{shape_str(c)}\n{c['layout']} {c['dtype']}" for c in cs]
        bases = [b for b in BASELINES if any(b in c["speedup"] for c in cs)]
        width = 0.8 / max(1, len(bases))
        for i, b in enumerate(bases):
            xs = [j + (i - (len(bases) - 1) / 2) * width for j in range(len(cs))]
            ax.bar(xs, [c["speedup"].get(b, 0.0) for c in cs], width,
                   label=f"vs {b}")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(cs)))
        ax.set_xticklabels(labels, fontsize=6, rotation=90)
        ax.set_ylabel("speedup (x)")
        ax.set_title(f"fused_bn speedup: {mode}", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "-1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    tf.get_logger().setLevel("ERROR")  # one tf.function per case retraces
    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    if args.device == "gpu" and not tf.config.list_physical_devices("GPU"):
        raise SystemExit("--device gpu: TensorFlow sees no GPU")
    import keras
    import fused_bn
    todo = cases(args)
    sync = make_sync(tf, args.device)
    date = datetime.date.today().isoformat()
    threads = args.threads or tf.config.threading.get_intra_op_parallelism_threads() \
        or os.cpu_count()
    report = {"meta": {
        "date": date, "command": " ".join(["python -m benchmarks.run"] +
                                          sys.argv[1:] if argv is None else
                                          ["python -m benchmarks.run"] + argv),
        "device": device_info(tf, args.device), "intra_op_threads": threads,
        "load_before": " ".join(f"{v:.2f}" for v in os.getloadavg()),
        "tensorflow": tf.__version__, "keras": keras.__version__,
        "fused_bn": fused_bn.build_info(), "reps": args.reps,
        "min_time_s": args.min_time, "copy_method": COPY_METHOD,
        "passes": PASSES, "impls": {
            "fused_bn": "fused_bn.batch_norm; keras_step: fused_bn "
                        "BatchNormalization layer; epilogue_fwd_bwd: "
                        "side_input=, activation='relu'",
            "stock": "tf.compat.v1.nn.fused_batch_norm + assign_sub moving "
                     "averages",
            "keras": "keras.layers.BatchNormalization",
            "manual": "tf.nn.moments + tf.nn.batch_normalization + "
                      "assign_moving_average",
            "epilogue_fwd_bwd baselines": "followed by tf.add and tf.nn.relu"}},
        "cases": []}
    t_start = time.time()
    with tf.device("/GPU:0" if args.device == "gpu" else "/CPU:0"):
        for i, (shape, layout, dtype, mode) in enumerate(todo):
            c = run_case(tf, args, shape, layout, dtype, mode, sync)
            report["cases"].append(c)
            f = c["results"].get("fused_bn", {})
            ratios = " ".join(f"{b} {v:.2f}x" for b, v in c["speedup"].items())
            print(f"[{i + 1}/{len(todo)}] {shape_str(c):>16} {layout} "
                  f"{dtype:8} {mode:13} fused_bn "
                  f"{f.get('median_ms', float('nan')):8.3f} ms "
                  f"{100 * f.get('fraction_of_copy', float('nan')):4.0f}% of "
                  f"copy | {ratios} ({time.time() - t_start:.0f}s)",
                  flush=True)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, args.name or f"{args.device}-{date}")
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
