"""The bench script's entry point loads and documents itself (the bench never runs in tests)."""

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "run.py"


def test_bench_help():
    result = subprocess.run([sys.executable, str(BENCH), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    for option in ("--quick", "--runs", "--size-mb", "--sessions", "--pool-size"):
        assert option in result.stdout
