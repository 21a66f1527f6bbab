#!/usr/bin/env python
"""GPU benchmark of the fused_bn CUDA kernels (through `fused_bn._kernels`, no
TensorFlow) against `torch.nn.functional.batch_norm` (cuDNN) on the same
tensors, in both memory formats, with the copy bandwidth measured in the same
run.

Modes: infer (read x, write y), train_fwd (read x twice, write y: moments +
moving update + normalize), train_bwd (read x and dy twice, write dx). These
minimum traffics define `gbps`; `bound_fraction` = gbps / copy_gbps. L2 is
flushed before every timed call of a tensor that could stay in it.

    python benchmarks/gpu_bench.py [--quick] [--out results.json]
    python benchmarks/gpu_bench.py --dry-run   # CPU kernels, tests the writer

Output JSON: {"device", "date", "copy_gbps", "records": [{"impl", "mode",
"dtype", "layout", "shape", "time_us", "gbps", "bound_fraction"}], "summary"}.
"""
import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                "tests", "gpu"))
import _kernels_util as ku  # noqa: E402

MODES = ("infer", "train_fwd", "train_bwd")
PASSES = {"infer": 2, "train_fwd": 3, "train_bwd": 5}
# ResNet-50's batch-norm inputs (H, W, C); torchvision v1.5 strides.
RESNET50 = [(112, 112, 64), (56, 56, 64), (56, 56, 256), (56, 56, 128),
            (28, 28, 128), (28, 28, 512), (28, 28, 256), (14, 14, 256),
            (14, 14, 1024), (14, 14, 512), (7, 7, 512), (7, 7, 2048)]
DENSE = [(16384, 4096), (262144, 256), (32768, 1000)]
EPS = 1e-3
FLUSH_BYTES = 256 << 20  # > 4x the 50 MB L2 of an H100


def cases(quick):
    """(layout, shape) pairs: 4-D shapes are NHWC-ordered [N, H, W, C]."""
    out = []
    batches = (256,) if quick else (256, 32)
    convs = RESNET50[::3] if quick else RESNET50
    for n in batches:
        for h, w, c in convs:
            for layout in ("nhwc", "nchw"):
                out.append((layout, (n, h, w, c)))
    if quick:
        out.append(("nhwc", (32, 7, 7, 512)))
    for shape in (DENSE[:1] if quick else DENSE):
        out.append(("nhwc", shape))
    return out


def kernel_shape(layout, shape):
    """[outer, C, inner] the kernels see."""
    if len(shape) == 2:
        return shape[0], shape[1], 1
    n, h, w, c = shape
    return (n * h * w, c, 1) if layout == "nhwc" else (n, c, h * w)


def geomean(xs):
    xs = [x for x in xs if x > 0]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else float("nan")


# ---------------------------------------------------------------- GPU

class GpuBench:
    def __init__(self, k, iters):
        import torch

        self.torch = torch
        self.k = k
        self.iters = iters
        self.stream = torch.cuda.current_stream().cuda_stream
        self.flush_buf = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device="cuda")

    def time_us(self, fn, nbytes):
        """Median of per-call CUDA-event times; L2 flushed before each call of
        a tensor that fits in it (the flush also hides the host launch cost)."""
        torch = self.torch
        flush = nbytes < 4 * FLUSH_BYTES
        for _ in range(3):
            fn()
        events = []
        for _ in range(self.iters):
            if flush:
                self.flush_buf.zero_()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            events.append((s, e))
        torch.cuda.synchronize()
        return 1e3 * statistics.median(s.elapsed_time(e) for s, e in events)

    def copy_gbps(self):
        torch = self.torch
        x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
        y = torch.empty_like(x)
        t = self.time_us(lambda: y.copy_(x), 2 * x.numel())
        return 2 * x.numel() / t / 1e3

    def tensors(self, dtype, layout, shape):
        torch = self.torch
        tdt = {"float16": torch.float16, "bfloat16": torch.bfloat16,
               "float32": torch.float32}[dtype]
        if len(shape) == 2:
            nchw = shape
            fmt = torch.contiguous_format
        else:
            n, h, w, c = shape
            nchw = (n, c, h, w)
            fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
        x = torch.randn(nchw, device="cuda", dtype=tdt).mul_(2).add_(3)
        x = x.contiguous(memory_format=fmt)
        c = nchw[1]
        f32 = dict(device="cuda", dtype=torch.float32)
        t = {"x": x, "dy": torch.randn_like(x), "y": torch.empty_like(x),
             "scale": torch.rand(c, **f32) + 0.5, "offset": torch.randn(c, **f32),
             "mm": torch.zeros(c, **f32), "mv": torch.ones(c, **f32),
             "sm": torch.zeros(c, **f32), "sr": torch.ones(c, **f32),
             "counter": torch.zeros(1, device="cuda", dtype=torch.int64)}
        return t

    def fused(self, mode, dtype, kshape, t):
        k, p = self.k, lambda name: t[name].data_ptr()
        if mode == "train_bwd":
            n = k.backward_workspace_bytes(dtype, *kshape)
            ws = self.torch.empty(max(n, 1), dtype=self.torch.uint8, device="cuda")
            return lambda: k.backward(
                dtype, *kshape, p("dy"), p("x"), p("sm"), p("sr"), scale=p("scale"),
                training=True, dx=p("y"), dscale=p("mm"), doffset=p("mv"),
                device="cuda", stream=self.stream, workspace=ws.data_ptr())
        n = k.forward_workspace_bytes(dtype, *kshape)
        ws = self.torch.empty(max(n, 1), dtype=self.torch.uint8, device="cuda")
        training = mode == "train_fwd"
        return lambda: k.forward(
            dtype, *kshape, p("x"), p("y"), p("sm"), p("sr"), scale=p("scale"),
            offset=p("offset"), epsilon=EPS, training=training, moving_mean=p("mm"),
            moving_var=p("mv"), num_updates=p("counter") if training else 0,
            momentum=0.99, device="cuda", stream=self.stream,
            workspace=ws.data_ptr())

    def baseline(self, mode, t):
        F = self.torch.nn.functional
        x, w, b = t["x"], t["scale"], t["offset"]
        rm, rv = t["mm"].clone(), t["mv"].clone()
        if mode == "infer":
            return lambda: F.batch_norm(x, rm, rv, w, b, False, 0.01, EPS)
        if mode == "train_fwd":
            return lambda: F.batch_norm(x, rm, rv, w, b, True, 0.01, EPS)
        xg = x.detach().requires_grad_(True)
        wg, bg = w.detach().requires_grad_(True), b.detach().requires_grad_(True)
        y = F.batch_norm(xg, rm, rv, wg, bg, True, 0.01, EPS)
        dy = t["dy"]
        grad = self.torch.autograd.grad
        return lambda: grad(y, (xg, wg, bg), dy, retain_graph=True)

    def count_launches(self, dtype="float16"):
        """Kernels launched by one fused train_fwd at 32x7x7x512 (NHWC)."""
        try:
            from torch.profiler import ProfilerActivity, profile
        except ImportError:
            return None
        shape = (32, 7, 7, 512)
        t = self.tensors(dtype, "nhwc", shape)
        fn = self.fused("train_fwd", dtype, kernel_shape("nhwc", shape), t)
        fn()
        self.torch.cuda.synchronize()
        try:
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                fn()
                self.torch.cuda.synchronize()
        except Exception as e:  # profiler unavailable (no CUPTI)
            print(f"  (launch count unavailable: {e})", flush=True)
            return None
        names = [e.name for e in prof.events()
                 if str(getattr(e, "device_type", "")).endswith("CUDA")]
        return {"count": len(names), "kernels": names}


def run_gpu(args, k):
    import torch

    bench = GpuBench(k, args.iters)
    props = torch.cuda.get_device_properties(0)
    print(f"device: {props.name}, {props.multi_processor_count} SMs", flush=True)
    copy = bench.copy_gbps()
    print(f"copy bandwidth: {copy:.0f} GB/s", flush=True)
    records = []
    todo = cases(args.quick)
    dtypes = args.dtypes.split(",")
    modes = args.modes.split(",")
    total = len(todo) * len(dtypes)
    i = 0
    t0 = time.time()
    for layout, shape in todo:
        kshape = kernel_shape(layout, shape)
        for dtype in dtypes:
            i += 1
            t = bench.tensors(dtype, layout, shape)
            size = t["x"].numel() * t["x"].element_size()
            line = []
            for mode in modes:
                nbytes = PASSES[mode] * size
                for impl, make in (("fused_bn", lambda: bench.fused(mode, dtype, kshape, t)),
                                   ("torch_cudnn", lambda: bench.baseline(mode, t))):
                    try:
                        us = bench.time_us(make(), nbytes)
                    except Exception as e:  # a baseline that cannot run a case
                        print(f"  {impl} {mode} failed: {e}", flush=True)
                        continue
                    gbps = nbytes / us / 1e3
                    records.append({"impl": impl, "mode": mode, "dtype": dtype,
                                    "layout": layout, "shape": list(shape),
                                    "time_us": round(us, 2), "gbps": round(gbps, 1),
                                    "bound_fraction": round(gbps / copy, 4)})
                    line.append(f"{impl[:5]}/{mode} {us:8.1f}us {gbps / copy:5.2f}")
            print(f"[{i}/{total} {time.time() - t0:5.0f}s] {layout} "
                  f"{'x'.join(map(str, shape))} {dtype}: " + " | ".join(line), flush=True)
            del t
            torch.cuda.empty_cache()
    launches = bench.count_launches()
    return {"device": props.name, "copy_gbps": round(copy, 1), "records": records,
            "launches_32x7x7x512_train_fwd": launches}


# ---------------------------------------------------------------- dry run

def run_dry(args, k):
    """CPU kernels on small shapes: exercises the loop, records and writer."""
    b = ku.NumpyBuffers(threads=os.cpu_count() or 1)
    src = np.ones(1 << 24, np.float32)
    dst = np.empty_like(src)
    t = min(_cpu_time(lambda: np.copyto(dst, src)) for _ in range(3))
    copy = 2 * src.nbytes / t / 1e9
    records = []
    for layout, shape in [("nhwc", (8, 14, 14, 64)), ("nchw", (8, 14, 14, 64)),
                          ("nhwc", (4096, 256))]:
        kshape = kernel_shape(layout, shape)
        for dtype in ("float32", "float16"):
            x = ku.make_x(kshape, dtype)
            xb, yb = b.put(x), b.put(np.zeros_like(x))
            c = kshape[1]
            st = {n: b.put(np.full(c, v, np.float32)) for n, v in
                  (("sm", 0), ("sr", 1), ("mm", 0), ("mv", 1), ("g", 1), ("o", 0))}
            p = b.ptr
            fns = {
                "infer": lambda: k.forward(dtype, *kshape, p(xb), p(yb), p(st["sm"]),
                                           p(st["sr"]), training=False,
                                           moving_mean=p(st["mm"]),
                                           moving_var=p(st["mv"]), threads=b.threads),
                "train_fwd": lambda: k.forward(dtype, *kshape, p(xb), p(yb),
                                               p(st["sm"]), p(st["sr"]),
                                               moving_mean=p(st["mm"]),
                                               moving_var=p(st["mv"]),
                                               threads=b.threads),
                "train_bwd": lambda: k.backward(dtype, *kshape, p(xb), p(xb),
                                                p(st["sm"]), p(st["sr"]), dx=p(yb),
                                                dscale=p(st["g"]), doffset=p(st["o"]),
                                                threads=b.threads),
            }
            for mode, fn in fns.items():
                sec = min(_cpu_time(fn) for _ in range(3))
                nbytes = PASSES[mode] * x.nbytes
                gbps = nbytes / sec / 1e9
                records.append({"impl": "fused_bn", "mode": mode, "dtype": dtype,
                                "layout": layout, "shape": list(shape),
                                "time_us": round(sec * 1e6, 2), "gbps": round(gbps, 2),
                                "bound_fraction": round(gbps / copy, 4)})
            print(f"dry-run {layout} {shape} {dtype}: ok", flush=True)
    return {"device": "cpu (dry run)", "copy_gbps": round(copy, 2), "records": records,
            "launches_32x7x7x512_train_fwd": None}


def _cpu_time(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# ---------------------------------------------------------------- summary

def summarize(result):
    recs = result["records"]
    by = {(r["impl"], r["mode"], r["dtype"], r["layout"], tuple(r["shape"])): r
          for r in recs}
    summary = {}
    for mode in MODES:
        mine = [r for r in recs if r["impl"] == "fused_bn" and r["mode"] == mode]
        if not mine:
            continue
        speedups = []
        for r in mine:
            other = by.get(("torch_cudnn", mode, r["dtype"], r["layout"],
                            tuple(r["shape"])))
            if other:
                speedups.append(other["time_us"] / r["time_us"])
        fr = [r["bound_fraction"] for r in mine]
        base = [r["bound_fraction"] for r in recs
                if r["impl"] == "torch_cudnn" and r["mode"] == mode]
        summary[mode] = {
            "cases": len(mine),
            "geomean_speedup_vs_cudnn": round(geomean(speedups), 3) if speedups else None,
            "fused_bound_fraction_median": round(statistics.median(fr), 3),
            "fused_bound_fraction_min": round(min(fr), 3),
            "cudnn_bound_fraction_median": round(statistics.median(base), 3) if base else None,
        }
    result["summary"] = summary
    print("\nsummary (bound fraction = achieved GB/s over copy GB/s "
          f"{result['copy_gbps']}):")
    for mode, s in summary.items():
        print(f"  {mode:9s} speedup vs cuDNN (geomean) {s['geomean_speedup_vs_cudnn']}"
              f"  fused bound fraction median {s['fused_bound_fraction_median']}"
              f" min {s['fused_bound_fraction_min']}"
              f"  cuDNN median {s['cudnn_bound_fraction_median']}")
    launches = result.get("launches_32x7x7x512_train_fwd")
    if launches:
        print(f"  launches per train_fwd at 32x7x7x512: {launches['count']} "
              f"({', '.join(launches['kernels'])})")
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer shapes")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU kernels only, no torch: tests the loop and the writer")
    ap.add_argument("--out", default=None, help="JSON path (default: print only)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--dtypes", default="float32,float16,bfloat16")
    ap.add_argument("--modes", default=",".join(MODES))
    args = ap.parse_args()

    k = ku.load_kernels()
    if k is None:
        sys.exit("fused_bn._kernels is not built (set FUSED_BN_KERNELS_DIR)")
    if args.dry_run:
        result = run_dry(args, k)
    else:
        if not k.has_cuda():
            sys.exit("fused_bn._kernels was built without CUDA (use --dry-run)")
        result = run_gpu(args, k)
    result = {"device": result.pop("device"),
              "date": datetime.date.today().isoformat(), **result}
    summarize(result)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
