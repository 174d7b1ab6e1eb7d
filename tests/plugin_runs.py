"""Real runs for the graddiag tab's tests: hostile names, a pathology, reference norms in float64."""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from graddiag import GradientDiagnostics, GradientMonitor
from graddiag.demos.data import DigitsDataModule
from graddiag.reporters.tensorboard import TensorBoardReporter
from tests.helpers import quiet_trainer

HOSTILE_RUN_DIR = "<img src=x onerror=alert(1)>"
HOSTILE_RUN = f"{HOSTILE_RUN_DIR}/version_0"
HOSTILE_LAYER = "<img src=y onerror=alert(2)>"
DEPTH = 8
STEPS = 12


class PathologicalNet(pl.LightningModule):
    """A deep sigmoid stack whose input layer has an HTML name (its gradient vanishes), a layer
    whose output is multiplied by zero (its gradient is exactly 0) and one that is never called
    (it gets no gradient). Keeps its own float64 gradient norm per layer and step."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        blocks: OrderedDict[str, nn.Module] = OrderedDict()
        blocks[HOSTILE_LAYER] = nn.Linear(64, width)
        blocks["act0"] = nn.Sigmoid()
        for i in range(1, DEPTH):
            blocks[f"fc{i}"] = nn.Linear(width, width)
            blocks[f"act{i}"] = nn.Sigmoid()
        self.body = nn.Sequential(blocks)
        self.head = nn.Linear(width, 10)
        self.muted = nn.Linear(width, 10)
        self.unused = nn.Linear(width, 10)
        self.reference: dict[int, dict[str, float | None]] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        return self.head(h) + 0.0 * self.muted(h)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        norms: dict[str, float | None] = {}
        for name, module in self.named_modules():
            grads = [p.grad for p in module.parameters(recurse=False) if p.grad is not None]
            if any(True for _ in module.parameters(recurse=False)):
                norms[name] = (math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))
                               if grads else None)
        self.reference[self.global_step] = norms


@dataclass
class PluginLogs:
    """A log directory with a pathological run (hostile names), a healthy run, and a run
    outside the log directory (for path-traversal attempts)."""

    root: Path
    outside: Path
    module: PathologicalNet
    callback: Any


def _plain_run(logdir: Path, steps: int, seed: int) -> None:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    writer = SummaryWriter(str(logdir))
    reporter = TensorBoardReporter(writer, scalars_every_n_steps=1, figure_every_n_steps=0,
                                   save_png=False)
    with GradientMonitor(model, reporters=[reporter], activation_every_n_steps=2) as monitor:
        for _ in range(steps):
            x = torch.randn(16, 8)
            loss = F.cross_entropy(model(x), (x[:, 0] > 0).long())
            opt.zero_grad()
            loss.backward()
            monitor.step()
            opt.step()
    writer.close()


def write_plugin_logs(base: Path) -> PluginLogs:
    """Train the pathological net with Lightning and the healthy one in a plain loop."""
    root = base / "logs"
    callback = GradientDiagnostics(activation_every_n_steps=4, print_summary=False,
                                   progress_bar=False, figure_every_n_steps=0)
    logger = TensorBoardLogger(str(root), name=HOSTILE_RUN_DIR, version=0)
    pl.seed_everything(0, verbose=False)
    module = PathologicalNet()
    quiet_trainer(max_steps=STEPS, callbacks=[callback], logger=logger,
                  log_every_n_steps=1).fit(module, DigitsDataModule(batch_size=32))
    _plain_run(root / "healthy", steps=4, seed=1)
    _plain_run(base / "outside", steps=4, seed=2)
    return PluginLogs(root=root, outside=base / "outside", module=module, callback=callback)
