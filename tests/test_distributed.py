"""Two CPU processes with gloo: DDP (spawn and subprocess launchers) and FSDP2 ``fully_shard``."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _run(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(HERE.parent), "MASTER_PORT": _free_port(),
           "FSDP_PORT": _free_port(), "MASTER_ADDR": "127.0.0.1"}
    return subprocess.run([sys.executable, str(HERE / "distributed" / script), *args],
                          capture_output=True, text=True, timeout=300, env=env,
                          cwd=HERE.parent)


def _same(a: object, b: object) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # NaN-safe


@pytest.mark.parametrize(("strategy", "nan_rank", "action"),
                         [("ddp_spawn", 1, "skip"), ("ddp", 0, "stop")])
def test_ddp_ranks_agree_and_only_rank_zero_writes(tmp_path: Path, strategy: str, nan_rank: int,
                                                   action: str) -> None:
    result = _run("run_ddp.py", "--strategy", strategy, "--out", str(tmp_path),
                  "--nan-rank", str(nan_rank), "--action", action)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for key in ("findings", "activations", "grad_norms", "param_sum", "global_step"):
        assert _same(ranks[0][key], ranks[1][key]), key
    kinds = [f[0] for f in ranks[0]["findings"]]
    assert "saturated" in kinds and "nonfinite" in kinds  # activation and gradient findings
    assert all(r["params_finite"] for r in ranks)  # the NaN step applied nothing on any rank
    if action == "stop":
        assert ranks[0]["global_step"] == ranks[1]["global_step"] == 4
    else:
        assert ranks[0]["global_step"] == 8
    assert ranks[0]["reporters"] == ["ConsoleReporter", "TensorBoardReporter"]
    assert ranks[1]["reporters"] == []
    assert len(list(tmp_path.rglob("events.out.tfevents.*"))) == 1
    assert len(list(tmp_path.rglob("gradient_flow.png"))) == 1
    assert result.stderr.count("[nonfinite]") == 1  # warned once, by rank zero


def test_fsdp2_fully_shard_norms_equal_unsharded_reference(tmp_path: Path) -> None:
    out = tmp_path / "fsdp.json"
    result = _run("run_fsdp.py", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["grad_is_dtensor"]
    for p in ("2.0", "1.0", "inf"):
        ref, shard = data[p]["reference"], data[p]["sharded"]
        assert ref["layers"] == shard["layers"] == ["0", "2", "4"]
        for key in ("grad_norm", "param_norm"):
            for a, b in zip(ref[key], shard[key]):
                assert math.isclose(a, b, rel_tol=1e-5), (p, key, a, b)
        for ref_row, shard_row in zip(ref["histogram"], shard["histogram"]):
            assert ref_row[:-2] == shard_row[:-2]  # every element counted once, in the same bin
            assert math.isclose(ref_row[-1], shard_row[-1], rel_tol=1e-5)  # sum of squares
