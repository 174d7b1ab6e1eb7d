"""What the README says about fixing the deep sigmoid config, checked on real runs.

The ReLU + Kaiming override of ``configs/deep_sigmoid.yaml`` keeps its SGD learning rate of 0.1;
graddiag then reports ``dead_relu``. These are no false alarms: recomputed with plain forward
passes over the whole training set, most units of the flagged sites output zero for every
sample. With the learning rate lowered to 0.01 the same net trains without any finding.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from graddiag.lightning.fit import diagnostics_of, run_cli

ROOT = Path(__file__).resolve().parents[1]
RELU = ["--model.activation", "relu", "--model.init", "kaiming"]
QUIET = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
         "--trainer.enable_model_summary", "false", "--diagnostics.print_summary", "false",
         "--trainer.max_epochs", "3"]


def _fit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *extra: str):  # noqa: ANN202
    monkeypatch.chdir(tmp_path)
    return run_cli(["fit", "--config", str(ROOT / "configs/deep_sigmoid.yaml"), *RELU, *extra,
                    *QUIET])


def _dead_over_the_training_set(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Per ReLU module: the fraction of units that output zero for every training sample."""
    outputs: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, name=name: outputs.__setitem__(name, o))
             for name, m in model.named_modules() if isinstance(m, nn.ReLU)]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    return {name: float((out <= 0).all(dim=0).double().mean()) for name, out in outputs.items()}


@pytest.mark.slow
def test_relu_override_at_lr_0_1_really_kills_units_and_lr_0_01_fixes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cli = _fit(tmp_path, monkeypatch)
    dead = {f.layer for f in diagnostics_of(cli).findings if f.kind == "dead_relu"}
    assert dead
    datamodule = cli.datamodule
    x = torch.cat([batch[0] for batch in datamodule.train_dataloader()])
    measured = _dead_over_the_training_set(cli.model, x)
    # a unit dead for the whole training set is dead for every batch: the alarm is real
    assert [site for site in dead if measured[site] < 0.5] == []
    assert sum(measured.values()) / len(measured) > 0.4
    fixed = _fit(tmp_path, monkeypatch, "--model.lr", "0.01")
    assert diagnostics_of(fixed).findings == []
    assert float(fixed.trainer.callback_metrics["val_acc"]) > float(
        cli.trainer.callback_metrics["val_acc"]) + 0.3
