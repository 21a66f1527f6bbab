"""The AVX2 kernels, which machines without AVX-512 run, pass the same tests.

On an AVX-512 machine the AVX-512 kernels run by default; FUSED_BN_CPU_ISA=avx2
forces the other build of the same code.
"""
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


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
