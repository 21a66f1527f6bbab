"""CUDA kernel edge cases the main GPU tests do not reach: empty tensors
(outer == 0), zero channels, buffers whose 16-byte misalignments differ (the
launchers must fall back to scalar access, never issue a misaligned vector
load), tensors of more than 2^31 elements (64-bit indexing), a long
channels-first row (accumulation accuracy), and grids sized from the
device's occupancy."""

import numpy as np
import pytest

import _kernels_util as ku

pytestmark = pytest.mark.gpu

EPS = 1e-3
LAYOUTS = {"channels_last": 1, "channels_first": 7}


def _filled(buf, n, value, dtype="float32"):
    """A CUDA buffer of n values (at least one element, so never a null
    pointer) filled with value."""
    return buf.full(max(n, 1), value, dtype)


def _host(buf, t, n):
    return buf.host(t, n)


# ---------------------------------------------------------------- empty tensors

@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_empty_batch_inference_writes_saved_stats(k, buf, dtype, layout):
    """Inference on x of shape [0, C, ...]: y is empty, but saved_mean and
    saved_inv_std are written (the backward reads them)."""
    c, inner = 5, LAYOUTS[layout]
    rng = np.random.default_rng(0)
    mm = (3 + rng.standard_normal(c)).astype(np.float32)
    mv = (0.5 + rng.random(c)).astype(np.float32)
    x, y = _filled(buf, 0, 0.0, dtype), _filled(buf, 0, 0.0, dtype)
    mmb, mvb = buf.put(mm), buf.put(mv)
    sm, sr = _filled(buf, c, float("nan")), _filled(buf, c, float("nan"))
    counter = buf.put(np.array([4], np.int64))
    ws = buf.workspace(k.forward_workspace_bytes(dtype, 0, c, inner))
    k.forward(dtype, 0, c, inner, buf.ptr(x), buf.ptr(y), buf.ptr(sm), buf.ptr(sr),
              epsilon=EPS, training=False, moving_mean=buf.ptr(mmb),
              moving_var=buf.ptr(mvb), num_updates=buf.ptr(counter),
              device="cuda", stream=buf.stream, workspace=buf.ptr(ws))
    np.testing.assert_array_equal(_host(buf, sm, c), mm)
    np.testing.assert_allclose(_host(buf, sr, c), 1 / np.sqrt(mv.astype(np.float64) + EPS),
                               rtol=1e-6)
    assert int(buf.get(counter)[0]) == 4


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("training", [True, False], ids=["train", "frozen"])
def test_empty_batch_backward_gives_zero_sums(k, buf, layout, training):
    c, inner = 6, LAYOUTS[layout]
    dy, x, dx = (_filled(buf, 0, 0.0) for _ in range(3))
    sm, sr, scale = buf.put(np.zeros(c, np.float32)), buf.put(np.ones(c, np.float32)), \
        buf.put(np.ones(c, np.float32))
    ds, do = _filled(buf, c, float("nan")), _filled(buf, c, float("nan"))
    ws = buf.workspace(k.backward_workspace_bytes("float32", 0, c, inner))
    k.backward("float32", 0, c, inner, buf.ptr(dy), buf.ptr(x), buf.ptr(sm), buf.ptr(sr),
               scale=buf.ptr(scale), training=training, dx=buf.ptr(dx),
               dscale=buf.ptr(ds), doffset=buf.ptr(do), device="cuda",
               stream=buf.stream, workspace=buf.ptr(ws))
    np.testing.assert_array_equal(_host(buf, ds, c), np.zeros(c, np.float32))
    np.testing.assert_array_equal(_host(buf, do, c), np.zeros(c, np.float32))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_empty_batch_normalize(k, buf, layout):
    c, inner = 5, LAYOUTS[layout]
    x, y = _filled(buf, 0, 0.0), _filled(buf, 0, 0.0)
    m, v = buf.put(np.zeros(c, np.float32)), buf.put(np.ones(c, np.float32))
    ws = buf.workspace(k.normalize_workspace_bytes("float32", 0, c, inner))
    k.normalize("float32", 0, c, inner, buf.ptr(x), buf.ptr(y), buf.ptr(m), buf.ptr(v),
                epsilon=EPS, device="cuda", stream=buf.stream, workspace=buf.ptr(ws))
    buf.sync()


@pytest.mark.parametrize("inner", [1, 7])
def test_zero_channels_is_a_no_op(k, buf, inner):
    """C == 0: every launcher returns without launching anything."""
    x, y, s = _filled(buf, 0, 0.0), _filled(buf, 0, 0.0), _filled(buf, 1, 0.0)
    p = buf.ptr
    for training in (True, False):
        k.forward("float32", 4, 0, inner, p(x), p(y), p(s), p(s), training=training,
                  moving_mean=p(s), moving_var=p(s), device="cuda", stream=buf.stream)
    k.moments("float32", 4, 0, inner, p(x), p(s), p(s), device="cuda", stream=buf.stream)
    k.normalize("float32", 4, 0, inner, p(x), p(y), p(s), p(s), device="cuda",
                stream=buf.stream)
    k.backward("float32", 4, 0, inner, p(x), p(x), p(s), p(s), dx=p(y), dscale=p(s),
               doffset=p(s), device="cuda", stream=buf.stream, workspace=p(s))
    buf.sync()


@pytest.mark.parametrize("inner", [1, 7])
def test_zero_channels_keep_the_counter(k, buf, inner):
    ku.check_zero_channels_keep_the_counter(k, buf, inner)


@pytest.mark.parametrize("inner", [1, 7])
def test_missing_workspace_is_an_error(k, buf, inner):
    """Forward (both modes), normalize and backward keep their per-channel
    coefficients in the workspace: without one they say so and launch
    nothing (y keeps its sentinel, the statistics their values)."""
    c, n = 3, 4
    x = buf.put(np.arange(n * c * inner, dtype=np.float32))
    y = _filled(buf, n * c * inner, 7.0)
    s = buf.put(np.ones(c, np.float32))
    sm, sr = _filled(buf, c, 5.0), _filled(buf, c, 5.0)
    p = buf.ptr
    for training in (True, False):
        with pytest.raises(RuntimeError, match="forward: workspace is required"):
            k.forward("float32", n, c, inner, p(x), p(y), p(sm), p(sr),
                      training=training, moving_mean=p(s), moving_var=p(s),
                      device="cuda", stream=buf.stream)
    with pytest.raises(RuntimeError, match="normalize: workspace is required"):
        k.normalize("float32", n, c, inner, p(x), p(y), p(s), p(s), device="cuda",
                    stream=buf.stream)
    with pytest.raises(RuntimeError, match="backward: workspace is required"):
        k.backward("float32", n, c, inner, p(x), p(x), p(sm), p(sr), dx=p(y),
                   device="cuda", stream=buf.stream)
    buf.sync()
    np.testing.assert_array_equal(_host(buf, y, n * c * inner), 7.0)
    np.testing.assert_array_equal(_host(buf, sm, c), 5.0)
    np.testing.assert_array_equal(_host(buf, s, c), 1.0)


# ---------------------------------------------------------------- alignment

SHAPES = [(37, 64, 1), (20011, 72, 1), (4, 64, 49), (67, 33, 531)]
IDS = [f"{o}x{c}x{i}" for o, c, i in SHAPES]
# (x, y or dx, dy) offsets in elements: 16-byte alignments that differ.
OFFSETS = [(0, 1, 0), (1, 0, 2), (0, 0, 3)]


@pytest.mark.parametrize("offsets", OFFSETS, ids=lambda o: "-".join(map(str, o)))
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
def test_forward_mixed_alignment(k, buf, dtype, shape, training, offsets):
    c = shape[1]
    x = ku.make_x(shape, dtype)
    rng = np.random.default_rng(2)
    scale = (1 + 0.5 * rng.standard_normal(c)).astype(np.float32)
    off = rng.standard_normal(c).astype(np.float32)
    mm = (3 + rng.standard_normal(c)).astype(np.float32)
    mv = (0.5 + rng.random(c)).astype(np.float32)
    xb = buf.put(x, offsets[0], dtype)
    yb = buf.put(np.zeros_like(x), offsets[1], dtype)
    sb, ob, mmb, mvb = (buf.put(a) for a in (scale, off, mm, mv))
    sm, sr = buf.put(np.zeros(c, np.float32)), buf.put(np.zeros(c, np.float32))
    ws = buf.workspace(k.forward_workspace_bytes(dtype, *shape))
    k.forward(dtype, *shape, buf.ptr(xb), buf.ptr(yb), buf.ptr(sm), buf.ptr(sr),
              scale=buf.ptr(sb), offset=buf.ptr(ob), epsilon=EPS, training=training,
              moving_mean=buf.ptr(mmb), moving_var=buf.ptr(mvb), momentum=0.9,
              device="cuda", stream=buf.stream, workspace=buf.ptr(ws))
    if training:
        mean, var = ku.ref_moments(x)
    else:
        mean, var = mm.astype(np.float64), mv.astype(np.float64)
    ref = ku.ref_normalize(x, mean, var, scale.astype(np.float64),
                           off.astype(np.float64), EPS)
    ku.assert_out(buf.get(yb), ref, dtype, "y")


@pytest.mark.parametrize("offsets", OFFSETS, ids=lambda o: "-".join(map(str, o)))
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_backward_mixed_alignment(k, buf, dtype, shape, offsets):
    c = shape[1]
    x = ku.make_x(shape, dtype)
    rng = np.random.default_rng(4)
    dy = ku.quantize(rng.standard_normal(shape), dtype)
    mean, var = ku.ref_moments(x)
    sm_h = mean.astype(np.float32)
    sr_h = (1 / np.sqrt(var + EPS)).astype(np.float32)
    scale = (1 + 0.5 * rng.standard_normal(c)).astype(np.float32)
    xb = buf.put(x, offsets[0], dtype)
    dxb = buf.put(np.zeros_like(x), offsets[1], dtype)
    dyb = buf.put(dy, offsets[2], dtype)
    smb, srb, scb = buf.put(sm_h), buf.put(sr_h), buf.put(scale)
    dsb, dob = buf.put(np.zeros(c, np.float32)), buf.put(np.zeros(c, np.float32))
    ws = buf.workspace(k.backward_workspace_bytes(dtype, *shape))
    k.backward(dtype, *shape, buf.ptr(dyb), buf.ptr(xb), buf.ptr(smb), buf.ptr(srb),
               scale=buf.ptr(scb), training=True, dx=buf.ptr(dxb), dscale=buf.ptr(dsb),
               doffset=buf.ptr(dob), device="cuda", stream=buf.stream,
               workspace=buf.ptr(ws))
    dx, dscale, doffset = ku.ref_backward(dy, x, sm_h, sr_h, scale, True)
    dyf = np.asarray(dy, np.float64)
    ku.assert_stat(buf.get(dob), doffset, dtype, "doffset",
                   scale=float(np.abs(dyf).sum(axis=(0, 2)).max()))
    xh = np.abs((np.asarray(x, np.float64) - sm_h[None, :, None]) * sr_h[None, :, None])
    ku.assert_stat(buf.get(dsb), dscale, dtype, "dscale",
                   scale=float((np.abs(dyf) * xh).sum(axis=(0, 2)).max()))
    ku.assert_out(buf.get(dxb), dx, dtype, "dx")


# ---------------------------------------------------------------- > 2^31 elements

# x[o, c, i] = j - 3 + c with j = (row index along the reduced axes) % 7 and
# whole periods of 7: mean_c = c and var_c = 4 exactly. dy = 1 where j == 0.
BIG = {
    # channels-last, C a multiple of the half vector width: vector path.
    "nhwc_vec": (7 * 38347923, 8, 1),
    # channels-last, C = 3: scalar path.
    "nhwc_scalar": (7 * 102261127, 3, 1),
    # channels-first, odd S: rows with scalar heads/tails and vector bodies.
    "nchw": (2, 2, 7 * 76695845),
}


def _big_pattern(torch, shape, what):
    outer, c, inner = shape
    j = torch.arange(7, device="cuda", dtype=torch.float32)
    per = (j - 3) if what == "x" else (j == 0).float()
    chan = torch.arange(c, device="cuda", dtype=torch.float32)
    if what != "x":
        chan = torch.zeros_like(chan)
    if inner == 1:  # period along rows: block [7, c]
        block = per[:, None] + chan[None, :]
        return block.half().repeat(outer // 7, 1).view(outer, c, 1)
    block = chan[:, None] + per[None, :]  # [c, 7], period along each row
    return block.half().repeat(outer, 1, inner // 7).view(outer, c, inner)


def _periodic(torch, t, shape):
    """t (of shape) equals its first period everywhere."""
    outer, c, inner = shape
    if inner == 1:
        v = t.view(outer // 7, 7, c)
        first = v[:1]
    else:
        v = t.view(outer, c, inner // 7, 7)
        first = v[:, :, :1]
    return bool(torch.equal(v, first.expand_as(v)))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BIG))
def test_more_than_2_31_elements(k, buf, name):
    if buf.emulated:
        pytest.skip("too big to emulate: more than 2^31 elements (20 GB) on the "
                    "CPU emulator of the CUDA kernels (test_long_channels_first_row "
                    "stands in for them there)")
    torch = buf.torch
    shape = BIG[name]
    outer, c, inner = shape
    assert outer * c * inner > 2**31
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs about 20 GiB of device memory")
    m = outer * inner
    x = _big_pattern(torch, shape, "x")
    y = torch.full_like(x, float("nan"))
    scale = torch.linspace(0.5, 1.5, c, device="cuda")
    off = torch.linspace(-1, 1, c, device="cuda")
    mm, mv = torch.zeros(c, device="cuda"), torch.ones(c, device="cuda")
    sm, sr = torch.zeros(c, device="cuda"), torch.zeros(c, device="cuda")
    ws = buf.workspace(k.forward_workspace_bytes("float16", *shape))
    k.forward("float16", *shape, x.data_ptr(), y.data_ptr(), sm.data_ptr(), sr.data_ptr(),
              scale=scale.data_ptr(), offset=off.data_ptr(), epsilon=EPS, training=True,
              moving_mean=mm.data_ptr(), moving_var=mv.data_ptr(), momentum=0.5,
              device="cuda", stream=buf.stream, workspace=buf.ptr(ws))
    buf.sync()
    cs = np.arange(c, dtype=np.float64)
    inv = 1 / np.sqrt(4 + EPS)
    np.testing.assert_allclose(sm.cpu().numpy(), cs, atol=1e-4)
    np.testing.assert_allclose(sr.cpu().numpy(), inv, rtol=1e-4)
    np.testing.assert_allclose(mm.cpu().numpy(), 0.5 * cs, atol=1e-4)
    np.testing.assert_allclose(mv.cpu().numpy(), 0.5 + 0.5 * 4 * m / (m - 1), rtol=1e-4)
    assert _periodic(torch, y, shape), "y differs between periods (unwritten or misindexed)"
    jj = np.arange(7) - 3.0
    sc, of = scale.cpu().numpy().astype(np.float64), off.cpu().numpy().astype(np.float64)
    if inner == 1:
        got = y[-7:, :, 0].float().cpu().numpy()           # [7, c], last period
        ref = (jj[:, None]) * inv * sc[None, :] + of[None, :]
    else:
        got = y[-1, :, -7:].float().cpu().numpy().T        # [7, c]
        ref = (jj[:, None]) * inv * sc[None, :] + of[None, :]
    np.testing.assert_allclose(got, ref, rtol=2e-3, atol=2e-3)
    del y

    dy = _big_pattern(torch, shape, "dy")
    dx = torch.full_like(x, float("nan"))
    ds, do = torch.zeros(c, device="cuda"), torch.zeros(c, device="cuda")
    sm_ref = torch.arange(c, device="cuda", dtype=torch.float32)
    sr_ref = torch.full((c,), inv, device="cuda", dtype=torch.float32)
    ws = buf.workspace(k.backward_workspace_bytes("float16", *shape))
    k.backward("float16", *shape, dy.data_ptr(), x.data_ptr(), sm_ref.data_ptr(),
               sr_ref.data_ptr(), scale=scale.data_ptr(), training=True,
               dx=dx.data_ptr(), dscale=ds.data_ptr(), doffset=do.data_ptr(),
               device="cuda", stream=buf.stream, workspace=buf.ptr(ws))
    buf.sync()
    periods = m // 7
    r = float(sr_ref[0].item())
    np.testing.assert_allclose(do.cpu().numpy(), periods, rtol=1e-6)
    np.testing.assert_allclose(ds.cpu().numpy(), -3 * r * periods, rtol=1e-5)
    assert _periodic(torch, dx, shape), "dx differs between periods"
    # dx = scale * r * (dy - 1/7 - xhat * dscale / m), xhat = (j - 3) * r.
    dyp = (np.arange(7) == 0).astype(np.float64)
    ref = sc[None, :] * r * (dyp[:, None] - 1 / 7 + (jj * r)[:, None] * 3 * r / 7)
    if inner == 1:
        got = dx[-7:, :, 0].float().cpu().numpy()
    else:
        got = dx[-1, :, -7:].float().cpu().numpy().T
    np.testing.assert_allclose(got, ref, rtol=2e-3, atol=2e-3)


# ---------------------------------------------------------------- a long row

# One channels-first row of 7 * 76695844 = 536870908 float16 values (1 GiB):
# x = i % 7 - 3, whole periods, so mean 0 and variance 4 exactly. What the
# >2^31 tests check about accumulation, at a size the emulator can hold.
# With one warp per row and every lane's Welford in float (before rows were
# cut into chunks) the emulated variance was 3.964286 (-0.89%).
LONG_ROW = (1, 1, 7 * 76695844)


@pytest.mark.slow
def test_long_channels_first_row(k, buf):
    shape = LONG_ROW
    n = shape[2]
    period = np.arange(7, dtype=np.float64) - 3
    pattern = np.tile(period.astype(np.float16), n // 7).reshape(shape)
    x = buf.put(pattern)
    del pattern
    mean, var = ku.run_moments(k, buf, "float16", shape, x)
    ref_mean, ref_var = period.mean(), period.var()  # float64: 0 and 4
    np.testing.assert_allclose(mean, [ref_mean], atol=1e-6)
    np.testing.assert_allclose(var, [ref_var], rtol=1e-6)

    y = buf.full(n, np.nan, "float16")
    sm, sr = buf.put(np.zeros(1, np.float32)), buf.put(np.zeros(1, np.float32))
    mm, mv = buf.put(np.zeros(1, np.float32)), buf.put(np.ones(1, np.float32))
    ws = buf.workspace(k.forward_workspace_bytes("float16", *shape))
    k.forward("float16", *shape, buf.ptr(x), buf.ptr(y), buf.ptr(sm), buf.ptr(sr),
              epsilon=EPS, training=True, moving_mean=buf.ptr(mm), moving_var=buf.ptr(mv),
              momentum=0.5, device="cuda", stream=buf.stream, workspace=buf.ptr(ws))
    inv = 1 / np.sqrt(ref_var + EPS)
    np.testing.assert_allclose(buf.host(sm, 1), [ref_mean], atol=1e-6)
    np.testing.assert_allclose(buf.host(sr, 1), [inv], rtol=1e-6)
    np.testing.assert_allclose(buf.host(mv, 1), [0.5 + 0.5 * ref_var * n / (n - 1)],
                               rtol=1e-6)
    del x
    got = buf.get(y).reshape(-1, 7)
    ku.assert_out(got[:1], (period * inv)[None, :], "float16", "y")
    assert np.array_equal(got, np.broadcast_to(got[:1], got.shape)), \
        "y differs between periods (unwritten or misindexed)"


# ---------------------------------------------------------------- occupancy

GRID_SHAPES = [("float32", (300000, 64, 1)), ("float16", (64, 64, 3136))]


def test_grids_follow_the_sm_count(k, buf):
    """Grids are sized from occupancy x SMs: on an emulated GPU of 5 SMs (a
    fresh process: the sizes are cached per device) a reduction has fewer
    block-rows, so a smaller workspace, and the same results against float64."""
    if not buf.emulated:
        pytest.skip("the SM count is the emulator's (FUSED_BN_EMU_SMS)")
    stdout = ku.run_emulated(f"""
        shapes = {GRID_SHAPES!r}
        print(*[k.forward_workspace_bytes(d, *s) for d, s in shapes])
        for d, s in shapes:
            ku.check_forward(k, b, d, s, True)
            ku.check_backward(k, b, d, s, True)
        """, FUSED_BN_EMU_SMS="5")
    small = [int(v) for v in stdout.split()]
    full = [k.forward_workspace_bytes(d, *s) for d, s in GRID_SHAPES]
    assert all(a < b for a, b in zip(small, full)), (small, full)
