"""The AVX2 kernels, which machines without AVX-512 run, pass the same tests.

On an AVX-512 machine the AVX-512 kernels run by default; FUSED_BN_CPU_ISA=avx2
forces the other build of the same code.
"""
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "gpu"))
import _kernels_util  # noqa: E402


def test_environment_forces_the_avx2_kernels():
    if _kernels_util.kernels_path() is None:
        pytest.skip("fused_bn._kernels is not built")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import _kernels_util as k; "
            "print(k.load_kernels().cpu_isa())")
    isa = {}
    for forced in ("", "avx2"):
        r = subprocess.run([sys.executable, "-c", code, os.path.join(HERE, "gpu")],
                           capture_output=True, text=True,
                           env={**os.environ, "FUSED_BN_CPU_ISA": forced})
        assert r.returncode == 0, r.stderr[-2000:]
        isa[forced] = r.stdout.strip()
    assert isa["avx2"] == "avx2"
    flags = set(open("/proc/cpuinfo").read().split())
    has_avx512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags
    assert isa[""] == ("avx512" if has_avx512 else "avx2")


def test_avx2_kernels_match_references():
    tests = [os.path.join(HERE, "test_core.py"), os.path.join(HERE, "test_numerics.py"),
             os.path.join(HERE, "test_kernels_cpu.py")]
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
         "-k", "not deterministic", *tests],
        capture_output=True, text=True, env={**os.environ, "FUSED_BN_CPU_ISA": "avx2"},
        cwd=os.path.dirname(HERE))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in r.stdout
