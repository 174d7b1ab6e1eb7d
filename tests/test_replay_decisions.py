"""When a step is replayed, on which rank, and what is said when it is not (no processes needed)."""

from __future__ import annotations

import ast
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from graddiag import GradientMonitor
from graddiag.data.replay import ReplayOutcome, combine_rank_outcomes
from graddiag.lightning.replay import LightningStepReplay, batch_tensor_names
from graddiag.measure.replay import ReplayUnavailable, communicating_module
from graddiag.measure.replay import plan as plan_module
from graddiag.rules.replay import describe
from tests.replay_cases import MLP, cross_entropy

ROOT = Path(__file__).resolve().parents[1]


def test_rank_outcomes_combine_to_the_lowest_rank_that_located_the_value() -> None:
    finite = ReplayOutcome(status="finite", random_state=True)
    located = ReplayOutcome(status="located", op="torch.log", line=12)
    failed = ReplayOutcome(status="failed", reason="error", reason_detail="OOM")
    combined = combine_rank_outcomes([finite, located, located])
    assert (combined.status, combined.rank, combined.world_size, combined.op) == (
        "located", 1, 3, "torch.log")
    assert combine_rank_outcomes([finite, failed]).rank == 1
    everywhere = combine_rank_outcomes([finite, finite])
    assert (everywhere.status, everywhere.rank, everywhere.world_size) == ("finite", None, 2)
    assert "on all 2 ranks" in describe(everywhere, 5)
    with pytest.raises(ValueError, match="one outcome per rank"):
        combine_rank_outcomes([])


def test_outcomes_travel_as_plain_dicts() -> None:
    outcome = ReplayOutcome(status="located", op="torch.exp", inputs=[{"max_abs": 93.1}],
                            constant=math.inf)
    assert ReplayOutcome.from_dict(outcome.to_dict()) == outcome


def test_models_that_communicate_across_ranks_are_recognised() -> None:
    assert communicating_module(MLP(batchnorm=True)) is None
    synced = nn.Sequential(nn.Linear(2, 2), nn.SyncBatchNorm(2))
    assert communicating_module(synced) == "SyncBatchNorm '1'"


def _fake_trainer(world_size: int) -> SimpleNamespace:
    return SimpleNamespace(world_size=world_size, accumulate_grad_batches=1)


def _fake_module(model: nn.Module) -> nn.Module:
    model.automatic_optimization = True  # type: ignore[assignment]
    model.training_step = lambda batch, batch_idx: model(batch).sum()  # type: ignore[assignment]
    return model


def test_a_communicating_model_is_replayed_on_no_rank() -> None:
    model = _fake_module(nn.Sequential(nn.Linear(2, 2), nn.SyncBatchNorm(2)))
    kept = LightningStepReplay()
    kept.keep(_fake_trainer(2), model, torch.ones(3, 2), 0)  # type: ignore[arg-type]
    with pytest.raises(ReplayUnavailable) as missing:
        kept.runs()
    assert missing.value.reason == "communicating_model"
    single = LightningStepReplay()
    single.keep(_fake_trainer(1), model, torch.ones(3, 2), 0)  # type: ignore[arg-type]
    assert len(single.runs()) == 1  # one process: nothing to wait for


def test_a_single_process_never_communicates_to_share_an_outcome() -> None:
    kept = LightningStepReplay()
    kept.keep(_fake_trainer(1), _fake_module(nn.Linear(2, 2)), torch.ones(1, 2), 0)  # type: ignore[arg-type]
    outcome = ReplayOutcome(status="finite")
    assert kept.share(outcome) is outcome


def test_the_kept_batches_are_only_those_of_the_current_optimizer_step() -> None:
    model = _fake_module(nn.Linear(2, 2))
    kept = LightningStepReplay()
    trainer = SimpleNamespace(world_size=1, accumulate_grad_batches=2)
    batches = [torch.full((1, 2), float(i)) for i in range(3)]
    for i, batch in enumerate(batches):
        kept.keep(trainer, model, batch, i)  # type: ignore[arg-type]
    assert [run.inputs for run in kept.runs()] == [{id(batches[1]): "batch"},
                                                   {id(batches[2]): "batch"}]
    kept.clear()
    with pytest.raises(ReplayUnavailable, match="no_batch"):
        kept.runs()


def test_batch_tensors_are_named_as_indexed() -> None:
    x, y = torch.ones(2), torch.zeros(2)
    names = batch_tensor_names({"x": x, "pair": (y, 3)})
    assert names == {id(x): "batch['x']", id(y): "batch['pair'][0]"}


def test_a_plain_closure_is_not_run_under_torch_distributed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plan_module, "distributed_world", lambda: 2)
    model = MLP()
    x, y = torch.randn(4, 4), torch.randint(0, 3, (4,))
    x[0, 0] = math.nan
    calls = []

    def closure() -> torch.Tensor:
        calls.append(1)
        return cross_entropy(model, x, y)

    with GradientMonitor(model, reporters=[]) as monitor:
        closure().backward()
        finding = monitor.step(replay=closure).findings[0]
    assert calls == [1]  # the real step only
    assert finding.details["replay_reason"] == "distributed_closure"
    assert "2 ranks" in finding.message and "layer-level origin above stands" in finding.message


@pytest.mark.parametrize("reason", ["already_replayed", "manual_optimization", "dataloader_iter",
                                    "no_batch", "no_loss", "loss_without_grad",
                                    "communicating_model", "distributed_closure"])
def test_every_reason_not_to_replay_is_worded(reason: str) -> None:
    text = describe(ReplayOutcome.skipped(reason, "x"), 4)
    assert text.startswith(("Not replayed", "Step 4 was already replayed"))
    assert "layer-level origin above stands" in text


@pytest.mark.parametrize("path", ["graddiag/data/replay.py", "graddiag/rules/replay.py"])
def test_data_and_rules_of_the_replay_do_not_import_torch(path: str) -> None:
    tree = ast.parse((ROOT / path).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.Import) for alias in node.names}
    imported |= {(node.module or "").split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom)}
    assert "torch" not in imported and "pytorch_lightning" not in imported
