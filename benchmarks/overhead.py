"""Overhead of graddiag against plain Lightning training, and against common recipes.

Trains the same model with the same data and seed under each configuration, alternating
configurations round by round in one process, times the steady state (after warm-up) and prints
median step-time ratios against plain training. Usage::

    python benchmarks/overhead.py                 # full run (a few minutes on 2 CPU cores)
    python benchmarks/overhead.py --quick         # one tiny round, to check it still works
    python benchmarks/overhead.py --json out.json # also write the numbers
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import grad_norm
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from graddiag import GradientDiagnostics  # noqa: E402


# ----------------------------------------------------------------------------- models
def mlp(depth: int = 20, width: int = 256, in_features: int = 256) -> nn.Module:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(in_features if i == 0 else width, width), nn.ReLU()]
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


class Transformer(nn.Module):
    def __init__(self, layers: int = 16, d_model: int = 64, in_features: int = 256) -> None:
        super().__init__()
        self.embed = nn.Linear(in_features // 8, d_model)
        block = nn.TransformerEncoderLayer(d_model, 4, 2 * d_model, batch_first=True, dropout=0.0)
        self.encoder = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x.reshape(x.shape[0], 8, -1))
        return self.head(self.encoder(tokens).mean(1))


class Classifier(pl.LightningModule):
    def __init__(self, net: nn.Module, recipe: str = "") -> None:
        super().__init__()
        self.net = net
        self.recipe = recipe

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.recipe == "lightning":  # Lightning's documented recipe
            self.log_dict(grad_norm(self, norm_type=2))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-4)


# ----------------------------------------------------------------------------- configurations
class StepTimer(pl.Callback):
    """Wall time between consecutive batch starts: covers every hook, logging included."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def on_train_batch_start(self, *args: Any) -> None:
        self.stamps.append(time.perf_counter())

    def step_times(self, warmup: int) -> list[float]:
        return [b - a for a, b in zip(self.stamps[warmup:], self.stamps[warmup + 1:])]


class Floor(pl.Callback):
    """The floor: one fused norm over all gradients per step, nothing else."""

    def on_before_optimizer_step(self, trainer: pl.Trainer, module: pl.LightningModule,
                                 optimizer: Any) -> None:
        torch._foreach_norm([p.grad for p in module.parameters() if p.grad is not None])


class HistogramHooks(pl.Callback):
    """The watch-style recipe: per-parameter gradient hooks logging histograms to TensorBoard."""

    def __init__(self, every_n_steps: int) -> None:
        self.every = every_n_steps
        self.handles: list[Any] = []

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        writer = trainer.logger.experiment  # type: ignore[union-attr]
        for name, p in module.named_parameters():
            def hook(grad: torch.Tensor, name: str = name) -> None:
                if trainer.global_step % self.every == 0:
                    writer.add_histogram(f"grad/{name}", grad, trainer.global_step)
            self.handles.append(p.register_hook(hook))

    def on_train_end(self, *args: Any) -> None:
        for h in self.handles:
            h.remove()


CONFIGS: dict[str, Callable[[], tuple[list[pl.Callback], str]]] = {
    "plain": lambda: ([], ""),
    "floor (one _foreach_norm)": lambda: ([Floor()], ""),
    "graddiag defaults": lambda: ([GradientDiagnostics(reporters=[])], ""),
    "graddiag every_n_steps=10": lambda: ([GradientDiagnostics(every_n_steps=10, reporters=[])], ""),
    "graddiag defaults, activations off": lambda: (
        [GradientDiagnostics(activation_every_n_steps=0, reporters=[])], ""),
    "graddiag all on (acts every step, TB)": lambda: (
        [GradientDiagnostics(activation_every_n_steps=1, param_every_n_steps=1)], ""),
    "Lightning grad_norm + log_dict": lambda: ([], "lightning"),
    "histogram hooks -> TensorBoard": lambda: ([HistogramHooks(every_n_steps=10)], ""),
}


def _run(model_fn: Callable[[], nn.Module], config: str, steps: int, warmup: int,
         data: TensorDataset, logdir: str) -> list[float]:
    callbacks, recipe = CONFIGS[config]()
    timer = StepTimer()
    pl.seed_everything(0, verbose=False)
    model = Classifier(model_fn(), recipe)
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", devices=1,
        logger=TensorBoardLogger(logdir, name=config.split()[0]),
        callbacks=[timer, *callbacks], enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, log_every_n_steps=10, num_sanity_val_steps=0,
    )
    trainer.fit(model, DataLoader(data, batch_size=64, shuffle=True))
    gc.collect()
    return timer.step_times(warmup)


def measure(model_fn: Callable[[], nn.Module], configs: list[str], rounds: int, steps: int,
            warmup: int) -> dict[str, float]:
    """Median step time per configuration over all rounds (alternating configurations)."""
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(4096, 256, generator=g), torch.randint(0, 10, (4096,), generator=g))
    times: dict[str, list[float]] = {c: [] for c in configs}
    with tempfile.TemporaryDirectory() as logdir:
        for r in range(rounds):
            order = configs if r % 2 == 0 else list(reversed(configs))
            for config in order:
                times[config].extend(_run(model_fn, config, steps, warmup, data, logdir))
    return {c: statistics.median(v) for c, v in times.items()}


def _tensor_count(model_fn: Callable[[], nn.Module]) -> int:
    return sum(1 for _ in model_fn().parameters())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="graddiag overhead benchmark")
    parser.add_argument("--quick", action="store_true", help="one tiny round (smoke test)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=70)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("graddiag").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(max(1, (os.cpu_count() or 2)))
    rounds, steps, warmup = (1, 8, 2) if args.quick else (args.rounds, args.steps, args.warmup)

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{rounds} rounds x {steps - warmup} timed steps per configuration")
    results: dict[str, Any] = {"models": {}, "scaling": []}
    models = {"MLP 20x256": mlp, "Transformer 16 layers": Transformer}
    configs = list(CONFIGS)
    for name, fn in models.items():
        medians = measure(fn, configs, rounds, steps, warmup)
        base = medians["plain"]
        print(f"\n{name} ({_tensor_count(fn)} parameter tensors), plain step {base * 1e3:.2f} ms")
        print(f"  {'configuration':<40} {'ratio to plain':>14}")
        for config in configs:
            print(f"  {config:<40} {medians[config] / base:>14.3f}")
        results["models"][name] = {c: medians[c] / base for c in configs}

    print("\nScaling with the number of parameter tensors (narrow MLPs, ratio to plain):")
    print(f"  {'tensors':>8} {'floor':>8} {'graddiag defaults':>18}")
    sweep = [4, 49, 499] if not args.quick else [4]
    for depth in sweep:
        fn = (lambda d=depth: mlp(depth=d, width=16))
        medians = measure(fn, ["plain", "floor (one _foreach_norm)", "graddiag defaults"],
                          rounds, steps, warmup)
        base = medians["plain"]
        row = {"tensors": _tensor_count(fn), "floor": medians["floor (one _foreach_norm)"] / base,
               "graddiag": medians["graddiag defaults"] / base}
        results["scaling"].append(row)
        print(f"  {row['tensors']:>8} {row['floor']:>8.3f} {row['graddiag']:>18.3f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
