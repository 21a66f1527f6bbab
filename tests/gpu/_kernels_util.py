"""Shared helpers for testing `fused_bn._kernels` without TensorFlow.

- `load_kernels()` imports the built extension without running
  `fused_bn/__init__.py` (which imports TensorFlow): it loads
  `_kernels*.so` by file path from $FUSED_BN_KERNELS_DIR or `<repo>/fused_bn`.
- `NumpyBuffers` / `TorchBuffers` / `EmuBuffers` give the kernels raw
  pointers to host, CUDA, or emulated CUDA memory (the CPU emulator of the
  CUDA kernels, csrc/emu) behind one small interface, so the same checks run
  on all of them.
- `check_*` run one operation and compare it with a float64 NumPy reference.
"""
import glob
import importlib.machinery
import importlib.util
import os
import sys

import numpy as np

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

try:
    import ml_dtypes

    BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # bfloat16 tests are skipped
    BFLOAT16 = None

NP_DTYPES = {"float16": np.dtype(np.float16), "bfloat16": BFLOAT16,
             "float32": np.dtype(np.float32), "float64": np.dtype(np.float64)}
# Relative accuracy of an output rounded to the dtype, with float32 math.
OUT_TOL = {"float16": 2e-3, "bfloat16": 1.6e-2, "float32": 3e-5, "float64": 1e-11}
# Accumulated statistics (float32 unless float64), relative to their scale.
STAT_TOL = {"float16": 1e-4, "bfloat16": 1e-4, "float32": 1e-4, "float64": 1e-11}

_MODULE = None


def kernels_path():
    """The `_kernels` extension file to load, or None."""
    dirs = [os.environ.get("FUSED_BN_KERNELS_DIR"), os.path.join(REPO, "fused_bn")]
    # An installed fused_bn (e.g. from a wheel), found without importing it.
    spec = importlib.util.find_spec("fused_bn")
    if spec is not None and spec.submodule_search_locations:
        dirs += list(spec.submodule_search_locations)
    for d in filter(None, dirs):
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            hits = sorted(glob.glob(os.path.join(d, "_kernels" + suffix)))
            if hits:
                return hits[0]
    return None


def load_kernels():
    """Returns the `_kernels` module, or None if it is not built."""
    global _MODULE
    if _MODULE is None:
        if "fused_bn._kernels" in sys.modules:
            _MODULE = sys.modules["fused_bn._kernels"]
        else:
            path = kernels_path()
            if path is None:
                return None
            spec = importlib.util.spec_from_file_location("_kernels", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            _MODULE = module
    return _MODULE


def emulated(k):
    """Whether module k runs its CUDA kernels on the CPU emulator."""
    return bool(getattr(k, "cuda_emulated", lambda: False)())


def run_emulated(body, **env):
    """Runs `body` (Python source) in a fresh process with `k`
    (load_kernels()), `b` (EmuBuffers(k)), `ku` and `np` defined and the
    environment variables env set (e.g. FUSED_BN_EMU_ORDER: settings the
    emulator reads once per process); asserts it succeeded, returns its
    stdout."""
    import subprocess
    import textwrap
    code = textwrap.dedent(f"""
        import sys
        import numpy as np
        sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
        import _kernels_util as ku
        k = ku.load_kernels()
        b = ku.EmuBuffers(k)
        """) + textwrap.dedent(body)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True,
                         text=True, timeout=900, env=dict(os.environ, **env))
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout


def kernels_or_skip():
    import pytest

    k = load_kernels()
    if k is None:
        pytest.skip("fused_bn._kernels is not built (set FUSED_BN_KERNELS_DIR "
                    "or build it into fused_bn/)")
    return k


def np_dtype_or_skip(dtype):
    import pytest

    if NP_DTYPES[dtype] is None:
        pytest.skip("ml_dtypes is not installed: no NumPy bfloat16")
    return NP_DTYPES[dtype]


def bf16_round(a):
    """float32 array of the bfloat16 values nearest to a (ties to even)."""
    u = np.ascontiguousarray(a, np.float32).view(np.uint32)
    r = ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) & np.uint32(0xFFFF0000))
    return r.view(np.float32)


def quantize(a, dtype):
    """a rounded to dtype: a NumPy array of that dtype, or, for bfloat16
    without ml_dtypes, a float32 array of bfloat16 values (buffers that know
    the dtype, like TorchBuffers, take it)."""
    if dtype == "bfloat16" and BFLOAT16 is None:
        return bf16_round(a)
    return np.asarray(a).astype(NP_DTYPES[dtype])


# ---------------------------------------------------------------- buffers

class NumpyBuffers:
    """Host buffers: the CPU kernels."""

    device = "cpu"
    stream = 0

    def __init__(self, threads=1):
        self.threads = threads

    def put(self, a, offset=0, dtype=None):
        """A copy of NumPy array `a` (as `dtype`, a name) starting `offset`
        elements into a 64-byte aligned buffer (as TensorFlow's are)."""
        a = np.asarray(a)
        if dtype is not None:
            a = a.astype(np_dtype_or_skip(dtype))
        pad = 64 // a.itemsize
        flat = np.empty(a.size + offset + pad, a.dtype)
        start = (-flat.ctypes.data % 64) // a.itemsize + offset
        view = flat[start:start + a.size].reshape(a.shape)
        view[...] = a
        return view

    def get(self, buf):
        return np.array(buf)

    def ptr(self, buf):
        return 0 if buf is None else buf.ctypes.data

    def workspace(self, nbytes):
        return None

    def extra(self):
        return {"threads": self.threads}

    def sync(self):
        pass


class TorchBuffers:
    """CUDA buffers from PyTorch: the CUDA kernels, on torch's current stream."""

    device = "cuda"
    emulated = False

    def __init__(self):
        import torch

        self.torch = torch
        self.stream = torch.cuda.current_stream().cuda_stream
        self._keep = []

    def _tdtype(self, dtype):
        t = self.torch
        return {"float16": t.float16, "bfloat16": t.bfloat16, "float32": t.float32,
                "float64": t.float64, "int64": t.int64}[dtype]

    def put(self, a, offset=0, dtype=None):
        t = self.torch
        name = dtype or ("bfloat16" if a.dtype == BFLOAT16 else a.dtype.name)
        src = a.astype(np.float32) if name == "bfloat16" else a.astype(name)
        flat = t.empty(a.size + offset, dtype=self._tdtype(name), device="cuda")
        view = flat[offset:].view(a.shape)
        view.copy_(t.from_numpy(np.ascontiguousarray(src)).view(a.shape))
        return view

    def get(self, buf):
        t = self.torch
        if buf.dtype == t.bfloat16:
            f = buf.float().cpu().numpy()
            return f if BFLOAT16 is None else f.astype(BFLOAT16)
        return buf.cpu().numpy()

    def ptr(self, buf):
        return 0 if buf is None else buf.data_ptr()

    def workspace(self, nbytes):
        if nbytes == 0:
            return None
        return self.torch.empty(nbytes, dtype=self.torch.uint8, device="cuda")

    def extra(self):
        return {"stream": self.stream}

    def sync(self):
        self.torch.cuda.synchronize()

    def full(self, n, value, dtype="float32"):
        """A buffer of n values (dtype name) equal to value."""
        return self.torch.full((n,), value, dtype=self._tdtype(dtype), device="cuda")

    def host(self, buf, n):
        """The first n values of buf as float32 on the host."""
        self.sync()
        return buf[:n].float().cpu().numpy()


class EmuBuffers:
    """Emulated CUDA buffers for the CPU emulator of the CUDA kernels: host
    memory from the module's cudaMalloc (256-byte aligned, exactly as large as
    asked, so AddressSanitizer sees any access past the data), as NumPy
    arrays. Launches run to completion at once (stream 0)."""

    device = "cuda"
    stream = 0
    emulated = True

    def __init__(self, k):
        self.k = k

    def _empty(self, n, dtype):
        return self.k.emu_device_alloc(n * dtype.itemsize).view(dtype)

    def put(self, a, offset=0, dtype=None):
        """A copy of `a` (as `dtype`, a name) starting `offset` elements into
        a buffer of exactly offset + a.size elements."""
        a = np.asarray(a)
        if dtype is not None:
            a = a.astype(np_dtype_or_skip(dtype))
        view = self._empty(a.size + offset, a.dtype)[offset:].reshape(a.shape)
        view[...] = a
        return view

    def get(self, buf):
        return np.array(buf)

    def ptr(self, buf):
        return 0 if buf is None else buf.ctypes.data

    def workspace(self, nbytes):
        return None if nbytes == 0 else self.k.emu_device_alloc(nbytes)

    def extra(self):
        return {"stream": self.stream}

    def sync(self):
        pass

    def full(self, n, value, dtype="float32"):
        buf = self._empty(n, np_dtype_or_skip(dtype))
        buf[...] = value
        return buf

    def host(self, buf, n):
        return np.asarray(buf[:n], np.float32)


# ---------------------------------------------------------------- references

def make_x(shape, dtype, seed=0, loc=3.0, spread=2.0):
    """Random x of [outer, C, inner] in dtype, per-channel offsets."""
    rng = np.random.default_rng(seed)
    outer, c, inner = shape
    chan = loc + np.linspace(-1.0, 1.0, c).reshape(1, c, 1)
    x = chan + spread * rng.standard_normal((outer, c, inner))
    return quantize(x, dtype)


def ref_moments(x):
    x = np.asarray(x, np.float64)
    return x.mean(axis=(0, 2)), x.var(axis=(0, 2))


def ref_normalize(x, mean, var, scale, offset, eps):
    x = np.asarray(x, np.float64)
    k = (1.0 if scale is None else scale) / np.sqrt(np.asarray(var, np.float64) + eps)
    b = 0.0 if offset is None else offset
    return (x - mean[None, :, None]) * np.broadcast_to(k, mean.shape)[None, :, None] + \
        np.broadcast_to(b, mean.shape)[None, :, None]


def ref_update(mm, mv, mean, var, count, momentum, unbiased, t):
    m = momentum if t is None else min(momentum, t / (t + 1.0))
    bessel = count / (count - 1.0) if unbiased and count > 1 else 1.0
    return mm * m + mean * (1 - m), mv * m + var * bessel * (1 - m)


def ref_backward(dy, x, mean, inv_std, scale, training):
    dy = np.asarray(dy, np.float64)
    x = np.asarray(x, np.float64)
    m = x.shape[0] * x.shape[2]
    mean = np.asarray(mean, np.float64)[None, :, None]
    inv = np.asarray(inv_std, np.float64)[None, :, None]
    xhat = (x - mean) * inv
    doffset = dy.sum(axis=(0, 2))
    dscale = (dy * xhat).sum(axis=(0, 2))
    k = (1.0 if scale is None else np.asarray(scale, np.float64)[None, :, None]) * inv
    if training:
        dx = k * (dy - doffset[None, :, None] / m - xhat * dscale[None, :, None] / m)
    else:
        dx = k * dy
    return dx, dscale, doffset


def assert_out(got, ref, dtype, what):
    got = np.asarray(got, np.float64)
    scale = max(1.0, float(np.max(np.abs(ref))) if ref.size else 1.0)
    np.testing.assert_allclose(got, ref, rtol=OUT_TOL[dtype],
                               atol=OUT_TOL[dtype] * scale, err_msg=what)


def assert_stat(got, ref, dtype, what, scale=None):
    got = np.asarray(got, np.float64)
    s = float(np.max(np.abs(ref))) if scale is None else scale
    np.testing.assert_allclose(got, ref, rtol=STAT_TOL[dtype],
                               atol=STAT_TOL[dtype] * max(s, 1e-30), err_msg=what)


def stat_dtype(dtype):
    return np.float64 if dtype == "float64" else np.float32


# ---------------------------------------------------------------- checks

def run_moments(k, b, dtype, shape, x_buf):
    u = stat_dtype(dtype)
    c = shape[1]
    mean = b.put(np.zeros(c, u))
    var = b.put(np.zeros(c, u))
    ws = b.workspace(k.moments_workspace_bytes(dtype, *shape))
    k.moments(dtype, *shape, b.ptr(x_buf), b.ptr(mean), b.ptr(var), device=b.device,
              workspace=b.ptr(ws), **b.extra())
    return b.get(mean), b.get(var)


def check_moments(k, b, dtype, shape, offset=0, seed=0):
    x = make_x(shape, dtype, seed)
    mean, var = run_moments(k, b, dtype, shape, b.put(x, offset, dtype))
    rm, rv = ref_moments(x)
    assert_stat(mean, rm, dtype, "mean", scale=np.max(np.abs(rm)) + 1.0)
    assert_stat(var, rv, dtype, "var")


def check_normalize(k, b, dtype, shape, offset=0, affine=True, seed=0):
    x = make_x(shape, dtype, seed)
    c = shape[1]
    u = stat_dtype(dtype)
    rng = np.random.default_rng(seed + 1)
    mean = (3 + rng.standard_normal(c)).astype(u)
    var = (0.5 + rng.random(c)).astype(u)
    scale = (1 + 0.5 * rng.standard_normal(c)).astype(u) if affine else None
    off = rng.standard_normal(c).astype(u) if affine else None
    xb = b.put(x, offset, dtype)
    yb = b.put(np.zeros_like(x), offset, dtype)
    bufs = [b.put(a) if a is not None else None for a in (mean, var, scale, off)]
    ws = b.workspace(k.normalize_workspace_bytes(dtype, *shape))
    k.normalize(dtype, *shape, b.ptr(xb), b.ptr(yb), *[b.ptr(t) for t in bufs],
                epsilon=1e-3, device=b.device, workspace=b.ptr(ws), **b.extra())
    ref = ref_normalize(x, mean.astype(np.float64), var, None if scale is None else
                        scale.astype(np.float64), None if off is None else
                        off.astype(np.float64), 1e-3)
    assert_out(b.get(yb), ref, dtype, "y")


def check_update(k, b, dtype, channels, count, warmup_t, unbiased, momentum=0.9):
    u = stat_dtype(dtype)
    rng = np.random.default_rng(7)
    mean, var = rng.standard_normal(channels).astype(u), rng.random(channels).astype(u)
    mm, mv = rng.standard_normal(channels).astype(u), rng.random(channels).astype(u)
    bufs = [b.put(a) for a in (mean, var, mm, mv)]
    counter = None if warmup_t is None else b.put(np.array([warmup_t], np.int64))
    k.update_moving_stats(dtype, channels, b.ptr(bufs[0]), b.ptr(bufs[1]), count,
                          b.ptr(bufs[2]), b.ptr(bufs[3]), num_updates=b.ptr(counter),
                          momentum=momentum, unbiased_variance=unbiased,
                          device=b.device, stream=b.stream)
    rm, rv = ref_update(mm.astype(np.float64), mv.astype(np.float64), mean, var,
                        count, momentum, unbiased, warmup_t)
    assert_stat(b.get(bufs[2]), rm, dtype, "moving_mean")
    assert_stat(b.get(bufs[3]), rv, dtype, "moving_var")
    if counter is not None:
        assert int(b.get(counter)[0]) == warmup_t + 1


def check_zero_channels_keep_the_counter(k, b, inner):
    """C == 0 (bn.h: every launcher does nothing, the counter included):
    update_moving_stats and a training forward with moving statistics leave
    the warm-up counter and every buffer as they were."""
    s = b.put(np.array([5.0], np.float32))
    x = b.put(np.array([1.0], np.float32))
    counter = b.put(np.array([3], np.int64))
    p = b.ptr
    k.update_moving_stats("float32", 0, p(s), p(s), 7, p(s), p(s),
                          num_updates=p(counter), momentum=0.9,
                          unbiased_variance=True, device=b.device, stream=b.stream)
    assert int(b.get(counter)[0]) == 3, "update_moving_stats with C == 0"
    k.forward("float32", 4, 0, inner, p(x), p(x), p(s), p(s), epsilon=1e-3,
              training=True, moving_mean=p(s), moving_var=p(s),
              num_updates=p(counter), momentum=0.9, device=b.device, **b.extra())
    assert int(b.get(counter)[0]) == 3, "training forward with C == 0"
    assert float(b.get(s)[0]) == 5.0 and float(b.get(x)[0]) == 1.0


def run_forward(k, b, dtype, shape, x, training, offset=0, warmup_t=3,
                momentum=0.9, unbiased=True, seed=0, side=None, relu=False):
    """Runs forward (with the epilogue: side input array `side`, `relu`);
    returns dict of host results and the inputs used."""
    c = shape[1]
    u = stat_dtype(dtype)
    rng = np.random.default_rng(seed + 2)
    scale = (1 + 0.5 * rng.standard_normal(c)).astype(u)
    off = rng.standard_normal(c).astype(u)
    mm = (3 + rng.standard_normal(c)).astype(u)
    mv = (0.5 + rng.random(c)).astype(u)
    xb = b.put(x, offset, dtype)
    yb = b.put(np.zeros_like(x), offset, dtype)
    sb, ob, mmb, mvb = (b.put(a) for a in (scale, off, mm, mv))
    saved_m, saved_r = b.put(np.zeros(c, u)), b.put(np.zeros(c, u))
    counter = None if warmup_t is None else b.put(np.array([warmup_t], np.int64))
    ws = b.workspace(k.forward_workspace_bytes(dtype, *shape))
    sideb = None if side is None else b.put(side, offset, dtype)
    k.forward(dtype, *shape, b.ptr(xb), b.ptr(yb), b.ptr(saved_m), b.ptr(saved_r),
              scale=b.ptr(sb), offset=b.ptr(ob), epsilon=1e-3, training=training,
              moving_mean=b.ptr(mmb), moving_var=b.ptr(mvb),
              num_updates=b.ptr(counter), momentum=momentum,
              unbiased_variance=unbiased, device=b.device, workspace=b.ptr(ws),
              side_input=b.ptr(sideb), relu=relu, **b.extra())
    out = {"y": b.get(yb), "saved_mean": b.get(saved_m), "saved_inv_std": b.get(saved_r),
           "moving_mean": b.get(mmb), "moving_var": b.get(mvb),
           "counter": None if counter is None else int(b.get(counter)[0])}
    inputs = {"scale": scale, "offset": off, "mm": mm, "mv": mv}
    return out, inputs


def check_forward(k, b, dtype, shape, training, offset=0, warmup_t=3, unbiased=True,
                  seed=0):
    x = make_x(shape, dtype, seed)
    out, inp = run_forward(k, b, dtype, shape, x, training, offset, warmup_t,
                           unbiased=unbiased, seed=seed)
    f64 = {n: a.astype(np.float64) for n, a in inp.items()}
    count = shape[0] * shape[2]
    if training:
        mean, var = ref_moments(x)
        rm, rv = ref_update(f64["mm"], f64["mv"], mean, var, count, 0.9, unbiased,
                            warmup_t)
        assert_stat(out["moving_mean"], rm, dtype, "moving_mean")
        assert_stat(out["moving_var"], rv, dtype, "moving_var")
        if warmup_t is not None:
            assert out["counter"] == warmup_t + 1
    else:
        mean, var = f64["mm"], f64["mv"]
        np.testing.assert_array_equal(out["moving_mean"], inp["mm"])
        np.testing.assert_array_equal(out["moving_var"], inp["mv"])
        if warmup_t is not None:
            assert out["counter"] == warmup_t
    assert_stat(out["saved_mean"], mean, dtype, "saved_mean",
                scale=np.max(np.abs(mean)) + 1.0)
    assert_stat(out["saved_inv_std"], 1 / np.sqrt(var + 1e-3), dtype, "saved_inv_std")
    assert_out(out["y"], ref_normalize(x, mean, var, f64["scale"], f64["offset"], 1e-3),
               dtype, "y")


def run_backward(k, b, dtype, shape, x, dy, training, offset=0, with_dx=True,
                 seed=0, y=None, relu=False, with_dside=False):
    """Runs backward (relu: dy masked by y > 0; with_dside: the masked dy
    written to a dside buffer, returned as out["dside"])."""
    c = shape[1]
    u = stat_dtype(dtype)
    mean, var = ref_moments(x)
    rng = np.random.default_rng(seed + 3)
    saved_m = mean.astype(u)
    saved_r = (1 / np.sqrt(var + 1e-3)).astype(u)
    scale = (1 + 0.5 * rng.standard_normal(c)).astype(u)
    xb, dyb = b.put(x, offset, dtype), b.put(dy, offset, dtype)
    dxb = b.put(np.zeros_like(x), offset, dtype) if with_dx else None
    smb, srb, scb = b.put(saved_m), b.put(saved_r), b.put(scale)
    dsb, dob = b.put(np.zeros(c, u)), b.put(np.zeros(c, u))
    ws = b.workspace(k.backward_workspace_bytes(dtype, *shape))
    yb = None if y is None else b.put(y, offset, dtype)
    dsideb = b.put(np.zeros_like(x), offset, dtype) if with_dside else None
    k.backward(dtype, *shape, b.ptr(dyb), b.ptr(xb), b.ptr(smb), b.ptr(srb),
               scale=b.ptr(scb), training=training, dx=b.ptr(dxb), dscale=b.ptr(dsb),
               doffset=b.ptr(dob), device=b.device, workspace=b.ptr(ws),
               y=b.ptr(yb), relu=relu, dside=b.ptr(dsideb), **b.extra())
    out = {"dx": b.get(dxb) if with_dx else None, "dscale": b.get(dsb),
           "doffset": b.get(dob), "dside": b.get(dsideb) if with_dside else None}
    return out, (saved_m, saved_r, scale)


def check_backward(k, b, dtype, shape, training, offset=0, with_dx=True, seed=0):
    x = make_x(shape, dtype, seed)
    rng = np.random.default_rng(seed + 4)
    dy = quantize(rng.standard_normal(shape), dtype)
    out, (sm, sr, scale) = run_backward(k, b, dtype, shape, x, dy, training, offset,
                                        with_dx, seed)
    dx, dscale, doffset = ref_backward(dy, x, sm, sr, scale, training)
    dyf = np.asarray(dy, np.float64)
    # Sums: error relative to the sum of magnitudes of their terms.
    mag = np.abs(dyf).sum(axis=(0, 2))
    xh = np.abs((np.asarray(x, np.float64) - sm.astype(np.float64)[None, :, None])
                * sr.astype(np.float64)[None, :, None])
    assert_stat(out["doffset"], doffset, dtype, "doffset", scale=float(mag.max()))
    assert_stat(out["dscale"], dscale, dtype, "dscale",
                scale=float((np.abs(dyf) * xh).sum(axis=(0, 2)).max()))
    if with_dx:
        assert_out(out["dx"], dx, dtype, "dx")


def check_backward_apply(k, b, dtype, shape, offset=0, seed=0):
    """dx from given sums over a count bigger than x's (sync BN's global
    sums), against float64; and backward_apply with backward()'s own sums
    and count gives backward()'s dx."""
    x = make_x(shape, dtype, seed)
    rng = np.random.default_rng(seed + 5)
    dy = quantize(rng.standard_normal(shape), dtype)
    c = shape[1]
    u = stat_dtype(dtype)
    local = shape[0] * shape[2]
    count = 4 * local + 3
    sums = [(rng.standard_normal(c) * count ** 0.5).astype(u) for _ in range(2)]
    (local_out, (sm, sr, scale)) = run_backward(k, b, dtype, shape, x, dy, True,
                                                offset, True, seed)
    xb, dyb = b.put(x, offset, dtype), b.put(dy, offset, dtype)
    smb, srb, scb = b.put(sm), b.put(sr), b.put(scale)
    ws = b.workspace(k.backward_workspace_bytes(dtype, *shape))
    for s_dy, s_dyxh, n, want in [
            (sums[0], sums[1], count, None),
            (local_out["doffset"], local_out["dscale"], local, local_out["dx"])]:
        dxb = b.put(np.zeros_like(x), offset, dtype)
        sdb, sxb = b.put(np.asarray(s_dy, u)), b.put(np.asarray(s_dyxh, u))
        k.backward_apply(dtype, *shape, b.ptr(dyb), b.ptr(xb), b.ptr(smb), b.ptr(srb),
                         b.ptr(sdb), b.ptr(sxb), n, b.ptr(dxb), scale=b.ptr(scb),
                         device=b.device, workspace=b.ptr(ws), **b.extra())
        got = b.get(dxb)
        if want is not None:
            # backward()'s own sums (rounded to U) and count: its dx.
            assert_out(got, np.asarray(want, np.float64), dtype, "dx from local sums")
            continue
        f = lambda a: np.asarray(a, np.float64)  # noqa: E731
        inv = f(sr)[None, :, None]
        xhat = (f(x) - f(sm)[None, :, None]) * inv
        ref = (f(scale)[None, :, None] * inv
               * (f(dy) - f(s_dy)[None, :, None] / n - xhat * f(s_dyxh)[None, :, None] / n))
        assert_out(got, ref, dtype, "dx from given sums")


# ---------------------------------------------------------------- epilogue
# y = relu(bn(x) + side_input) in the normalize pass; the backward masks dy
# by the forward's y > 0 and returns the masked dy as d(side_input).

def ref_epilogue(y, side, relu):
    """float64 activation(y + side) (side None: none)."""
    v = np.asarray(y, np.float64)
    if side is not None:
        v = v + np.asarray(side, np.float64)
    return np.maximum(v, 0.0) if relu else v


def make_side(shape, dtype, seed=0):
    """A side input of x's scale, so that relu clips about half the values."""
    rng = np.random.default_rng(seed + 10)
    return quantize(rng.standard_normal(shape) * 1.5 - 0.3, dtype)


def check_normalize_epilogue(k, b, dtype, shape, relu, side=True, offset=0, seed=0):
    x = make_x(shape, dtype, seed)
    c = shape[1]
    u = stat_dtype(dtype)
    rng = np.random.default_rng(seed + 1)
    mean = (3 + rng.standard_normal(c)).astype(u)
    var = (0.5 + rng.random(c)).astype(u)
    scale = (1 + 0.5 * rng.standard_normal(c)).astype(u)
    off = rng.standard_normal(c).astype(u)
    s = make_side(shape, dtype, seed) if side else None
    xb = b.put(x, offset, dtype)
    yb = b.put(np.zeros_like(x), offset, dtype)
    sideb = None if s is None else b.put(s, offset, dtype)
    bufs = [b.put(a) for a in (mean, var, scale, off)]
    ws = b.workspace(k.normalize_workspace_bytes(dtype, *shape))
    k.normalize(dtype, *shape, b.ptr(xb), b.ptr(yb), *[b.ptr(t) for t in bufs],
                epsilon=1e-3, device=b.device, side_input=b.ptr(sideb), relu=relu,
                workspace=b.ptr(ws), **b.extra())
    ref = ref_epilogue(ref_normalize(x, mean.astype(np.float64), var,
                                     scale.astype(np.float64), off.astype(np.float64),
                                     1e-3), s, relu)
    got = b.get(yb)
    assert_out(got, ref, dtype, "y")
    if relu:
        assert np.all(np.asarray(got, np.float64) >= 0) and np.any(ref == 0)


def check_forward_epilogue(k, b, dtype, shape, training, relu, side=True, offset=0,
                           seed=0):
    """y against float64; every other output bitwise equal to the forward
    without the epilogue (moving statistics, counter, saved statistics)."""
    x = make_x(shape, dtype, seed)
    s = make_side(shape, dtype, seed) if side else None
    out, inp = run_forward(k, b, dtype, shape, x, training, offset, seed=seed,
                           side=s, relu=relu)
    plain, _ = run_forward(k, b, dtype, shape, x, training, offset, seed=seed)
    for name in ("saved_mean", "saved_inv_std", "moving_mean", "moving_var"):
        assert out[name].tobytes() == plain[name].tobytes(), name
    assert out["counter"] == plain["counter"]
    f64 = {n: a.astype(np.float64) for n, a in inp.items()}
    if training:
        mean, var = ref_moments(x)
    else:
        mean, var = f64["mm"], f64["mv"]
    ref = ref_epilogue(ref_normalize(x, mean, var, f64["scale"], f64["offset"], 1e-3),
                       s, relu)
    assert_out(out["y"], ref, dtype, "y")


def check_backward_epilogue(k, b, dtype, shape, training, relu, with_dside=True,
                            with_dx=True, offset=0, seed=0):
    """dx, dscale, doffset against float64 given the masked dy; dside equal
    to the masked dy exactly."""
    x = make_x(shape, dtype, seed)
    rng = np.random.default_rng(seed + 4)
    dy = quantize(rng.standard_normal(shape), dtype)
    # The forward's y: about half of it <= 0, some exact zeros.
    y = np.asarray(rng.standard_normal(shape))
    y[rng.random(shape) < 0.1] = 0.0
    y = quantize(np.maximum(y, -0.5) if relu else y, dtype)
    out, (sm, sr, scale) = run_backward(k, b, dtype, shape, x, dy, training, offset,
                                        with_dx, seed, y=y, relu=relu,
                                        with_dside=with_dside)
    g = np.where(np.asarray(y, np.float64) > 0, np.asarray(dy, np.float64), 0.0) \
        if relu else np.asarray(dy, np.float64)
    if with_dside:
        np.testing.assert_array_equal(np.asarray(out["dside"], np.float64), g)
    dx, dscale, doffset = ref_backward(g, x, sm, sr, scale, training)
    mag = np.abs(g).sum(axis=(0, 2))
    xh = np.abs((np.asarray(x, np.float64) - sm.astype(np.float64)[None, :, None])
                * sr.astype(np.float64)[None, :, None])
    assert_stat(out["doffset"], doffset, dtype, "doffset", scale=float(mag.max()) + 1e-30)
    assert_stat(out["dscale"], dscale, dtype, "dscale",
                scale=float((np.abs(g) * xh).sum(axis=(0, 2)).max()) + 1e-30)
    if with_dx:
        assert_out(out["dx"], dx, dtype, "dx")
