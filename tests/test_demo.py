"""The demo runs end to end (quick mode) in a fresh process."""
import os
import subprocess
import sys

import pytest

import fused_bn

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")


def test_demo_quick(tmp_path):
    parent = os.path.dirname(os.path.dirname(os.path.abspath(fused_bn.__file__)))
    env = dict(os.environ, PYTHONPATH=parent, TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run(
        [sys.executable, "-m", "fused_bn.demo", "--quick", "--out", str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "reloaded predictions identical: True" in done.stdout
    assert "accuracy with training=False: train" in done.stdout
    assert "fused_bn" in done.stdout.splitlines()[-2]
    png = tmp_path / "demo.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "demo_model.keras").exists()
