"""The benchmark harness runs and writes its reports (no speed is asserted)."""
import json

import pytest

pytest.importorskip("matplotlib")
# The harness lives in the source tree, not in the wheel.
run = pytest.importorskip("benchmarks.run")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    argv = ["--quick", "--shapes", "2x4x4x8,16x8", "--dtype", "float32",
            "--layout", "NHWC,NCHW", "--out", str(out), "--name", "smoke"]
    run.main(argv)
    return out


def test_writes_json_md_png(report):
    for ext in ("json", "md", "png"):
        path = report / f"smoke.{ext}"
        assert path.exists() and path.stat().st_size > 0, path
    assert (report / "smoke.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_json_schema(report):
    data = json.loads((report / "smoke.json").read_text())
    meta = data["meta"]
    for key in ("date", "command", "device", "intra_op_threads", "tensorflow",
                "keras", "copy_method", "passes", "reps"):
        assert key in meta, key
    cases = data["cases"]
    # 2x4x4x8 in both layouts, 16x8 in one, each in every mode.
    assert len(cases) == 3 * len(run.MODES)
    assert {c["mode"] for c in cases} == set(run.MODES)
    for c in cases:
        assert c["copy"]["gbps"] > 0
        assert "fused_bn" in c["results"], c["unsupported"]
        expected = {"fused_bn", "keras"} if c["mode"] == "keras_step" else \
            set(run.IMPLS)
        assert set(c["results"]) | set(c["unsupported"]) >= expected
        for name, r in c["results"].items():
            for key in ("median_ms", "min_ms", "spread", "gbps",
                        "fraction_of_copy"):
                assert r[key] >= 0, (name, key)
            assert r["min_ms"] <= r["median_ms"]
            assert r["samples"] == meta["reps"]
        for b, v in c["speedup"].items():
            assert b in run.BASELINES and v > 0
        assert c["min_bytes"] == run.PASSES[c["mode"]] * c["bytes_x"]


def test_markdown_table(report):
    md = (report / "smoke.md").read_text()
    header = [l for l in md.splitlines() if l.startswith("| shape")]
    assert len(header) == 1
    rows = [l for l in md.splitlines() if l.startswith("| 2x") or
            l.startswith("| 16x")]
    assert len(rows) == 3 * len(run.MODES)
    assert all(l.count("|") == header[0].count("|") for l in rows)


def test_nchw_uses_channels_first_tensors(report):
    data = json.loads((report / "smoke.json").read_text())
    nchw = [c for c in data["cases"] if c["layout"] == "NCHW"]
    assert nchw and all(c["tensor_shape"] == [2, 8, 4, 4] for c in nchw)


models = pytest.importorskip("benchmarks.models")


def test_models_smoke(tmp_path):
    """The whole-model mode runs every variant (tf_keras reported as not run
    when it is not installed) and writes its reports."""
    report = models.main(["--quick", "--models", "mlp", "--out", str(tmp_path),
                          "--name", "models"])
    for ext in ("json", "md", "png"):
        assert (tmp_path / f"models.{ext}").stat().st_size > 0
    (case,) = report["cases"]
    assert set(case["results"]) | set(case["unsupported"]) == set(models.VARIANTS)
    assert {"fused_bn", "fused_bn_plain", "keras", "no_bn"} <= set(case["results"])
    for r in case["results"].values():
        assert r["images_per_s"] > 0 and r["samples"] == report["meta"]["reps"]
    # Same architecture in every variant (no_bn lacks the BN parameters).
    assert len({r["trainable_params"] for v, r in case["results"].items()
                if v != "no_bn"}) == 1
    for b, v in case["speedup"].items():
        assert b in models.BASELINES and v > 0
    md = (tmp_path / "models.md").read_text()
    assert md.count("| mlp |") == len(models.VARIANTS)
