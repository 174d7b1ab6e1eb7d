"""Layers follow requires_grad and module changes: gradual unfreezing, Lightning's
BackboneFinetuning, a head replaced mid-run."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import BackboneFinetuning
from torch import nn

from graddiag import GradientDiagnostics
from graddiag.demos.data import DigitsDataModule
from tests.helpers import quiet_trainer
from tests.real_models.layouts import batches, digits, float64_layer_norms
from tests.real_models.training import train


class Finetuned(pl.LightningModule):
    """A backbone and a head, as ``BackboneFinetuning`` expects."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(filter(lambda p: p.requires_grad, self.parameters()), lr=1e-3)


BACKBONE = ["backbone.0", "backbone.2"]


def test_a_layer_frozen_at_the_start_is_monitored_once_unfrozen() -> None:
    torch.manual_seed(0)
    model = Finetuned()
    model.backbone.requires_grad_(False)
    optimizer = torch.optim.Adam(model.head.parameters(), lr=1e-3)
    data = batches(*digits(), batch_size=32)

    def unfreeze(step: int) -> None:
        if step == 6:  # gradual unfreezing: the backbone joins with a smaller learning rate
            model.backbone.requires_grad_(True)
            optimizer.add_param_group({"params": list(model.backbone.parameters()), "lr": 1e-4})

    def loss(step: int) -> torch.Tensor:
        x, y = next(data)
        return F.cross_entropy(model(x), y)

    run = train(model, loss, 12, optimizers=[optimizer], before_step=unfreeze,
                activation_every_n_steps=3)
    layers = [r.layers for r in run.monitor.records]
    assert layers[:6] == [["head"]] * 6
    assert layers[6:] == [BACKBONE + ["head"]] * 6  # in the order the forward pass runs them
    assert run.assert_norms_match_reference(rtol=1e-5) == 6 + 6 * 3
    assert run.findings == []
    # the activation sites inside the backbone are placed between trainable layers now
    last = run.monitor.records[9].activations
    assert last is not None and list(last.position) == [0.5, 1.5]


class Float64Norms(pl.Callback):
    """Placed after GradientDiagnostics: per-module float64 norms at the same moment."""

    def __init__(self) -> None:
        self.norms: list[dict[str, float]] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, module: pl.LightningModule,
                                 optimizer: Any) -> None:
        self.norms.append(float64_layer_norms(module))


def test_backbone_finetuning_callback_unfreezes_and_graddiag_follows() -> None:
    pl.seed_everything(0, verbose=False)
    cb, seen = GradientDiagnostics(print_summary=False, progress_bar=False), Float64Norms()
    finetune = BackboneFinetuning(unfreeze_backbone_at_epoch=1, backbone_initial_ratio_lr=0.1)
    trainer = quiet_trainer(max_epochs=3, limit_train_batches=4,
                            callbacks=[finetune, cb, seen])
    trainer.fit(Finetuned(), DigitsDataModule(batch_size=32))
    h = cb.history
    per_step = h.groupby("step").layer.apply(list).to_dict()
    assert [per_step[s] for s in range(4)] == [["head"]] * 4  # epoch 0: backbone frozen
    assert [per_step[s] for s in range(4, 12)] == [BACKBONE + ["head"]] * 8
    expected = [seen.norms[s][layer] for s, layer in zip(h.step, h.layer)]
    assert h.grad_norm.tolist() == [
        __import__("pytest").approx(v, rel=1e-5) for v in expected]
    assert cb.findings == []


def test_a_replaced_head_is_followed() -> None:
    torch.manual_seed(0)
    model = Finetuned()
    data = batches(*digits(), batch_size=32)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def replace_head(step: int) -> None:
        if step == 3:
            model.head = nn.Sequential(nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 10))
            optimizer.add_param_group({"params": list(model.head.parameters())})

    def loss(step: int) -> torch.Tensor:
        x, y = next(data)
        return F.cross_entropy(model(x), y)

    # parameters of the old head stop receiving gradients: the module tree is walked next step
    run = train(model, loss, 8, optimizers=[optimizer], before_step=replace_head,
                activation_every_n_steps=2)
    layers = [r.layers for r in run.monitor.records]
    assert layers[:4] == [BACKBONE + ["head"]] * 4
    assert layers[4:] == [BACKBONE + ["head.0", "head.2"]] * 4
    assert run.findings == []  # the old head is gone, not "without gradient"
    assert run.assert_norms_match_reference(rtol=1e-5) == 4 * 3 + 4 * 4 - 1  # step 3: old head
    sites = run.monitor.records[6].activations  # the sites are found again from step 4 on
    assert sites is not None and sites.sites == ["backbone.1", "backbone.3", "head.1"]
    assert list(sites.position) == [0.5, 1.5, 2.5]
