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
import torch

from tests.distributed import run_ddp
from tests.distributed.run_sites import STEPS, Branchy, batch, reused_inputs
from tests.replay_cases import line_of

HERE = Path(__file__).resolve().parent


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


#: What a spawned rank prints when torch's C++ teardown destroys a thread still running, after
#: the script's work and its destroy_process_group() are done (seen once in about 15 FSDP runs).
_TEARDOWN_CRASH = "terminate called without an active exception"


def _run(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(HERE.parent), "MASTER_PORT": _free_port(),
           "MASTER_ADDR": "127.0.0.1"}
    return subprocess.run([sys.executable, str(HERE / "distributed" / script), *args],
                          capture_output=True, text=True, timeout=300, env=env,
                          cwd=HERE.parent)


def _same(a: object, b: object) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # NaN-safe


@pytest.mark.slow
@pytest.mark.parametrize(("strategy", "nan_rank", "action"),
                         [("ddp_spawn", 1, "skip"), ("ddp", 0, "stop")])
def test_ddp_ranks_agree_and_only_rank_zero_writes(tmp_path: Path, strategy: str, nan_rank: int,
                                                   action: str) -> None:
    result = _run("run_ddp.py", "--strategy", strategy, "--out", str(tmp_path),
                  "--nan-rank", str(nan_rank), "--action", action)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for key in ("findings", "activations", "grad_norms", "param_sum", "global_step", "replay",
                "message"):
        assert _same(ranks[0][key], ranks[1][key]), key
    # every rank replayed its own batch; the rank whose batch made the NaN names the line
    culprit = line_of(run_ddp.Model.training_step, 'float("nan")')
    replay = ranks[0]["replay"]
    assert (replay["file"], replay["line"]) == culprit
    assert (replay["replay"], replay["phase"], replay["rank"], replay["world_size"]) == (
        "located", "forward", nan_rank, 2)
    assert math.isnan(replay["constant"])
    assert f"rank {nan_rank}'s batch" in ranks[0]["message"]
    sites = {row[1] for row in ranks[0]["activations"]}
    assert "Model:tanh" in sites and "net.1" in sites  # rank 1's own site, agreed by both
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


@pytest.mark.slow
def test_fsdp2_fully_shard_norms_equal_unsharded_reference(tmp_path: Path) -> None:
    out = tmp_path / "fsdp.json"
    result = _run("run_fsdp.py", str(out))
    if result.returncode != 0 and _TEARDOWN_CRASH in result.stderr:  # torch's, rare: once more
        out = tmp_path / "fsdp_again.json"  # a fresh rendezvous file too
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


def _site_statistics(derivatives: list[torch.Tensor], floor: float = 0.01,
                     positions: int = 1) -> dict[str, object]:
    """Saturated/dead fractions, gain and calls of one site from its local derivatives (float64),
    given call by call; a site called at ``positions`` positions per forward pass has units of
    its own at each, and its dead fraction is its worst position's."""
    flat = torch.cat([d.reshape(-1) for d in derivatives])
    widths = {d.shape[-1] for d in derivatives}
    dead, each = None, []
    if len(widths) == 1:
        each = [torch.cat([(d < floor) for d in derivatives[k::positions]]).all(dim=0)
                .double().mean().item() for k in range(positions)]
        dead = max(each)
    return {"saturated_fraction": (flat < floor).double().mean().item(), "dead_fraction": dead,
            "gain": flat.mean().item(), "calls": float(len(derivatives)), "by_call": each}


def _expected_sites(step: int, ranks: tuple[int, ...]) -> dict[str, dict[str, object]]:
    """Every site's statistics over the given ranks' batches, by hand in float64."""
    model = Branchy().double()
    sig = lambda z: torch.sigmoid(z) * (1 - torch.sigmoid(z))  # noqa: E731
    relu = lambda z: (z > 0).double()  # noqa: E731
    sites: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad():
        for rank in ranks:
            x = batch(rank, step).double()
            z = model.shared(x)
            sites.setdefault("shared_act", []).append(sig(z))
            if rank == 0:
                sites.setdefault("only0.1", []).append(relu(model.only0[0](torch.sigmoid(z))))
            else:
                t = torch.tanh(model.only1[0](torch.sigmoid(z)))
                sites.setdefault("only1.1", []).append(1 - t * t)
                sites.setdefault("Branchy:relu", []).append(relu(t))
            sites.setdefault("varying", []).append(relu(x[:, : 2 + rank]))
            sites.setdefault("reused", []).extend(relu(z) for z in reused_inputs(x, rank))
    return {name: _site_statistics(ds, positions=3 if name == "reused" else 1)
            for name, ds in sites.items()}


def _check(table: list[list[object]], ranks: tuple[int, ...]) -> None:
    seen = set()
    for step, site, _kind, saturated, dead, gain, calls, by_call in table:
        expected = _expected_sites(int(step), ranks)[site]
        assert by_call == pytest.approx(expected["by_call"], abs=1e-9), site
        assert saturated == pytest.approx(expected["saturated_fraction"], abs=1e-6), site
        assert gain == pytest.approx(expected["gain"], rel=1e-5), site
        assert calls == expected["calls"], site
        if expected["dead_fraction"] is None:
            assert dead is None, site  # unit counts differ between ranks: no dead fraction
        else:
            assert dead == pytest.approx(expected["dead_fraction"], abs=1e-9), site
        seen.add((step, site))
    assert seen == {(s, name) for s in range(STEPS) for name in _expected_sites(s, ranks)}


@pytest.mark.slow
def test_ranks_with_different_sites_agree_on_correct_statistics(tmp_path: Path) -> None:
    result = _run("run_sites.py", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"sites{r}.json").read_text()) for r in (0, 1)]
    assert _same(ranks[0]["agreed"], ranks[1]["agreed"])  # identical on both ranks
    _check(ranks[0]["agreed"], (0, 1))  # and equal to both ranks' batches pooled
    # a monitor on rank 0 alone, without a process group, finished: it never communicated
    _check(ranks[0]["alone"], (0,))
    # the shared ReLU's calls, each on its own units: pooled over the ranks only the third has
    # a dead unit (one of two); on rank 0 alone the second is dead too (it fires on rank 1)
    assert [row[-1] for row in ranks[0]["agreed"] if row[1] == "reused"] == [[0.0, 0.0, 0.5]] * 3
    assert [row[-1] for row in ranks[0]["alone"] if row[1] == "reused"] == [[0.0, 1.0, 0.5]] * 3


def test_a_plain_monitor_never_communicates_unless_handed_a_process_group(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import torch.distributed as dist
    from torch import nn

    from graddiag import GradientMonitor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        def forbidden(*args: object, **kwargs: object) -> None:
            raise AssertionError("a plain GradientMonitor communicated")

        for name in ("all_reduce", "all_gather", "all_gather_object", "broadcast", "barrier"):
            monkeypatch.setattr(dist, name, forbidden)
        model = nn.Sequential(nn.Linear(3, 3), nn.Sigmoid(), nn.Linear(3, 1))
        with GradientMonitor(model, reporters=[], activation_every_n_steps=1) as monitor:
            for _ in range(2):
                model(torch.randn(4, 3)).sum().backward()
                monitor.step()
        assert list(monitor.activation_history.step) == [0, 1]
        with pytest.raises(ValueError, match="process_group must be None, a RankReducer or a "
                                             "process group"):
            GradientMonitor(model, reporters=[], process_group="world")
    finally:
        dist.destroy_process_group()
