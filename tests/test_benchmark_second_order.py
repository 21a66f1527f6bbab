"""The second-order/mask benchmark runs (no speed is asserted)."""
import pytest

# The benchmarks live in the source tree, not in the wheel.
bench = pytest.importorskip("benchmarks.second_order_and_masks")


def test_quick_run_prints_every_implementation(capsys):
    bench.main(["--quick"])
    out = capsys.readouterr().out
    for name in ("fused_bn", "stock", "composite", "fused_bn first order",
                 "fused_bn masked", "keras masked"):
        assert f"\n{name} " in out, name
