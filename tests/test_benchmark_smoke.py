"""The overhead benchmark still runs (one tiny round). It asserts no timings: benchmarks are
not tests; only that every configuration produced a finite ratio."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_benchmark_quick_round(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "overhead.py"), "--quick",
                             "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert len(data["models"]) == 1
    for ratios in data["models"].values():
        assert len(ratios) == 10  # every configuration but the baseline
        assert all(math.isfinite(r[k]) and r[k] > 0 for r in ratios.values() for k in r)
    assert data["scaling"] and data["memory"]["graddiag_peak_mib"] > 0
    assert len(data["loop"]["MLP 4x64"]) == 6
