"""Overhead of graddiag against plain Lightning training, and against common recipes.

Trains one model with one data stream and seed, switching between configurations every few
optimizer steps inside a single Trainer run (so all configurations see the same process and
machine state), times the steady state after a warm-up cycle and prints median (and mean)
step-time ratios against plain training. Usage::

    python benchmarks/overhead.py                 # full run (about 10 minutes on 2 CPU cores)
    python benchmarks/overhead.py --quick         # one tiny cycle, to check it still works
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
from contextlib import nullcontext
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
from graddiag import GradientDiagnostics, GradientMonitor  # noqa: E402


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
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)  # as every real run does
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-4)


# ----------------------------------------------------------------------------- configurations
class Floor(pl.Callback):
    """The floor: one fused norm over all gradients per step, nothing else."""

    def on_before_optimizer_step(self, trainer: pl.Trainer, module: pl.LightningModule,
                                 optimizer: Any) -> None:
        torch._foreach_norm([p.grad for p in module.parameters() if p.grad is not None])


class LightningRecipe(pl.Callback):
    """Lightning's documented recipe: ``log_dict(grad_norm(module, 2))`` before each step."""

    def on_before_optimizer_step(self, trainer: pl.Trainer, module: pl.LightningModule,
                                 optimizer: Any) -> None:
        module.log_dict(grad_norm(module, norm_type=2))


class HistogramHooks(pl.Callback):
    """The watch-style recipe: per-parameter gradient hooks logging histograms to TensorBoard."""

    def __init__(self, every_n_steps: int) -> None:
        self.every = every_n_steps
        self.handles: list[Any] = []
        self.active = False

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        writer = trainer.logger.experiment  # type: ignore[union-attr]
        for name, p in module.named_parameters():
            def hook(grad: torch.Tensor, name: str = name) -> None:
                if self.active and trainer.global_step % self.every == 0:
                    writer.add_histogram(f"grad/{name}", grad, trainer.global_step)
            self.handles.append(p.register_hook(hook))

    def on_train_end(self, *args: Any) -> None:
        for h in self.handles:
            h.remove()


CONFIGS: dict[str, Callable[[], list[pl.Callback]]] = {
    "plain": lambda: [],
    "plain again (A/A control: the noise)": lambda: [],
    "floor (one _foreach_norm)": lambda: [Floor()],
    "graddiag defaults": lambda: [GradientDiagnostics(print_summary=False)],
    "graddiag every_n_steps=10": lambda: [GradientDiagnostics(every_n_steps=10,
                                                              print_summary=False)],
    "graddiag defaults, replay_nonfinite off": lambda: [GradientDiagnostics(
        replay_nonfinite=False, print_summary=False)],
    "graddiag, activations off": lambda: [GradientDiagnostics(activation_every_n_steps=0,
                                                              print_summary=False)],
    "graddiag all on (acts+params every step)": lambda: [GradientDiagnostics(
        activation_every_n_steps=1, param_every_n_steps=1, print_summary=False)],
    "graddiag defaults + histograms every 10 steps": lambda: [GradientDiagnostics(
        histogram_every_n_steps=10, print_summary=False)],
    "Lightning grad_norm + log_dict": lambda: [LightningRecipe()],
    "histogram hooks -> TB, every 10 steps": lambda: [HistogramHooks(every_n_steps=10)],
    "histogram hooks -> TB, every step": lambda: [HistogramHooks(every_n_steps=1)],
}

ALWAYS = ("setup", "on_fit_start", "on_train_start", "on_train_end", "on_fit_end", "teardown",
          "on_exception", "state_dict", "on_save_checkpoint")
PER_STEP = ("on_train_batch_start", "on_before_backward", "on_after_backward",
            "on_before_optimizer_step", "on_before_zero_grad", "on_train_batch_end")


class Interleave(pl.Callback):
    """Runs every configuration in one Trainer, switching configuration every ``block`` steps.

    Each optimizer step belongs to exactly one configuration (only its callbacks run), so all
    configurations share the same process, model, data stream and machine state, and slow drifts
    of the machine affect them alike. With ``block=1`` the periodic costs of the run (logging
    every 10 steps, epoch ends) fall on every configuration alike. Step time is the wall time
    between consecutive batch starts: every hook and the logging of that step included.
    """

    def __init__(self, configs: dict[str, list[pl.Callback]], block: int, warmup_cycles: int) -> None:
        self.configs = configs
        self.names = list(configs)
        self.block = block
        self.warmup_steps = warmup_cycles * block * len(self.names)
        self.times: dict[str, list[float]] = {n: [] for n in self.names}
        self.cpu: dict[str, list[float]] = {n: [] for n in self.names}
        self._started: float | None = None
        self._started_cpu = 0.0
        self._current: str | None = None
        for hook in ALWAYS:
            setattr(self, hook, self._fan_out(hook, always=True))
        for hook in PER_STEP[1:]:
            setattr(self, hook, self._fan_out(hook, always=False))

    def active(self, step: int) -> str:
        return self.names[(step // self.block) % len(self.names)]

    def _fan_out(self, hook: str, always: bool) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            names = self.names if always else [self._current]
            for name in names:
                for cb in self.configs[name or "plain"]:
                    getattr(cb, hook)(*args, **kwargs)
            return {} if hook == "state_dict" else None

        return call

    def on_train_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        now, now_cpu = time.perf_counter(), time.process_time()
        step = trainer.global_step
        if self._started is not None and step > self.warmup_steps and self._current:
            self.times[self._current].append(now - self._started)
            self.cpu[self._current].append(now_cpu - self._started_cpu)
        self._current = self.active(step)
        for configs in self.configs.values():
            for cb in configs:
                if isinstance(cb, HistogramHooks):
                    cb.active = False
        for cb in self.configs[self._current]:
            if isinstance(cb, HistogramHooks):
                cb.active = True
            cb.on_train_batch_start(trainer, module, batch, batch_idx)
        self._started, self._started_cpu = now, now_cpu


def measure(model_fn: Callable[[], nn.Module], configs: list[str], cycles: int, block: int,
            warmup_cycles: int = 1) -> dict[str, dict[str, float]]:
    """Median and mean step time per configuration, interleaved in one training run."""
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(4096, 256, generator=g), torch.randint(0, 10, (4096,), generator=g))
    built = {name: CONFIGS[name]() for name in configs}
    switch = Interleave(built, block, warmup_cycles)
    steps = (cycles + warmup_cycles) * block * len(configs) + 1
    pl.seed_everything(0, verbose=False)
    with tempfile.TemporaryDirectory() as logdir:
        trainer = pl.Trainer(
            max_steps=steps, accelerator="cpu", devices=1,
            logger=TensorBoardLogger(logdir, name="bench"), callbacks=[switch],
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            log_every_n_steps=10, num_sanity_val_steps=0,
        )
        trainer.fit(Classifier(model_fn()), DataLoader(data, batch_size=64, shuffle=True))
    gc.collect()
    return _summaries(switch.times, switch.cpu)


def _summaries(wall: dict[str, list[float]], cpu: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    return {n: {"median": statistics.median(t), "mean": statistics.fmean(t), "n": len(t),
                "cpu_median": statistics.median(cpu[n])} for n, t in wall.items()}


LOOP_CONFIGS = ["plain", "plain again (A/A control: the noise)", "floor (one _foreach_norm)",
                "graddiag defaults", "graddiag every_n_steps=10", "graddiag, activations off",
                "graddiag defaults + replay closure"]


def measure_loop(model_fn: Callable[[], nn.Module], cycles: int) -> dict[str, dict[str, float]]:
    """The same comparison in a hand-written PyTorch loop (``GradientMonitor``, the code path the
    callback uses), interleaving configurations every step: no framework noise."""
    torch.manual_seed(0)
    model = model_fn()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 256, generator=g), torch.randint(0, 10, (64,), generator=g)
    # three monitors on one model: each watches only its own steps' forward passes (watch=None
    # and watch_activations below), as a lone monitor's forward wrapper would
    monitors = {
        "graddiag defaults": GradientMonitor(model, reporters=[], watch=None),
        "graddiag every_n_steps=10": GradientMonitor(model, reporters=[], every_n_steps=10,
                                                     watch=None),
        "graddiag, activations off": GradientMonitor(model, reporters=[],
                                                     activation_every_n_steps=0, watch=None),
        "graddiag defaults + replay closure": GradientMonitor(model, reporters=[], watch=None),
    }
    calls = {name: 0 for name in monitors}
    times: dict[str, list[float]] = {name: [] for name in LOOP_CONFIGS}
    cpu: dict[str, list[float]] = {name: [] for name in LOOP_CONFIGS}
    for i in range((cycles + 1) * len(LOOP_CONFIGS)):
        name = LOOP_CONFIGS[i % len(LOOP_CONFIGS)]
        monitor = monitors.get(name)
        start, start_cpu = time.perf_counter(), time.process_time()
        with monitor.watch_activations(calls[name]) if monitor is not None else nullcontext():
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        if name == "floor (one _foreach_norm)":
            torch._foreach_norm([p.grad for p in model.parameters() if p.grad is not None])
        elif monitor is not None:
            replay = (lambda: F.cross_entropy(model(x), y)) if "replay" in name else None
            monitor.step(calls[name], replay=replay)
            calls[name] += 1
        optimizer.step()
        if i >= len(LOOP_CONFIGS):
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    for monitor in monitors.values():
        monitor.close()
    return _summaries(times, cpu)


def _print_ratios(title: str, stats: dict[str, dict[str, float]],
                  configs: list[str]) -> dict[str, dict[str, float]]:
    """Print each configuration's ratios to the first (plain) one; return them."""
    base = stats[configs[0]]
    print(f"  -- {title} (plain step {base['median'] * 1e3:.2f} ms, "
          f"{base['n']} steps per configuration)")
    rows = {}
    for config in configs[1:]:
        rows[config] = row = {k: stats[config][k] / base[k]
                              for k in ("median", "mean", "cpu_median")}
        print(f"  {config:<46} {row['median']:>12.3f} {row['mean']:>11.3f} "
              f"{row['cpu_median']:>9.3f}")
    return rows


def _tensor_count(model_fn: Callable[[], nn.Module]) -> int:
    return sum(1 for _ in model_fn().parameters())


# Each group has a number of configurations coprime with 10 and 50, so that with one-step
# interleaving every configuration gets its share of the logging steps (every 10) and of
# graddiag's parameter/activation steps (every 50).
GROUPS = {
    "graddiag and the floor": ["plain", "plain again (A/A control: the noise)",
                               "floor (one _foreach_norm)", "graddiag defaults",
                               "graddiag every_n_steps=10", "graddiag, activations off",
                               "graddiag all on (acts+params every step)",
                               "graddiag defaults + histograms every 10 steps",
                               "Lightning grad_norm + log_dict"],
    # Histogram hooks queue work on TensorBoard's writer thread, which would run during the
    # other configurations' steps: they are timed against plain training on their own.
    "histogram recipes": ["plain", "histogram hooks -> TB, every 10 steps",
                          "histogram hooks -> TB, every step"],
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="graddiag overhead benchmark")
    parser.add_argument("--quick", action="store_true", help="a few tiny cycles (smoke test)")
    parser.add_argument("--cycles", type=int, default=120,
                        help="timed cycles; each runs every configuration for --block steps")
    parser.add_argument("--block", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 keeps timings steady on a small machine)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("graddiag").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    cycles, block = (3, 1) if args.quick else (args.cycles, args.block)

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); configurations "
          f"interleaved every {block} step(s) in one Trainer run, {cycles} timed cycles after "
          "one warm-up cycle")
    results: dict[str, Any] = {"models": {}, "scaling": [], "memory": {}}
    models: dict[str, Callable[[], nn.Module]] = {"MLP 20x256": mlp,
                                                   "Transformer 16 layers": Transformer}
    if args.quick:
        models = {"MLP 4x64": lambda: mlp(depth=4, width=64)}
    for name, fn in models.items():
        print(f"\n{name} ({_tensor_count(fn)} parameter tensors)")
        print(f"  {'configuration':<46} {'median ratio':>12} {'mean ratio':>11} {'CPU-time':>9}")
        rows = _print_ratios("hand-written loop, GradientMonitor",
                             measure_loop(fn, cycles * 3), LOOP_CONFIGS)
        results.setdefault("loop", {})[name] = rows
        for group, configs in GROUPS.items():
            group_cycles = cycles if group != "histogram recipes" else max(3, cycles // 4)
            rows = _print_ratios(f"Lightning, {group}",
                                 measure(fn, configs, group_cycles, block), configs)
            results["models"].setdefault(name, {}).update(rows)

    print("\nScaling with the number of parameter tensors (narrow MLPs, hand-written loop, "
          "median ratio to plain):")
    print(f"  {'tensors':>8} {'plain ms':>9} {'A/A':>6} {'floor':>8} {'graddiag defaults':>18}")
    for depth in ([4] if args.quick else [4, 49, 499]):
        fn = (lambda d=depth: mlp(depth=d, width=16))
        stats = measure_loop(fn, cycles * 3)
        base = stats["plain"]["median"]
        row = {"tensors": _tensor_count(fn), "plain_ms": base * 1e3,
               "aa": stats["plain again (A/A control: the noise)"]["median"] / base,
               "floor": stats["floor (one _foreach_norm)"]["median"] / base,
               "graddiag": stats["graddiag defaults"]["median"] / base}
        results["scaling"].append(row)
        print(f"  {row['tensors']:>8} {row['plain_ms']:>9.2f} {row['aa']:>6.3f} {row['floor']:>8.3f} "
              f"{row['graddiag']:>18.3f}")
    results["memory"] = memory_report(quick=args.quick)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


MEMORY_CHILD = """
import resource, sys, torch, torch.nn.functional as F
sys.path.insert(0, {root!r})
from benchmarks.overhead import mlp
from graddiag import GradientMonitor
torch.manual_seed(0)
model, steps, mode = mlp(), {steps}, {mode!r}
opt = torch.optim.Adam(model.parameters(), 1e-4)
x, y = torch.randn(64, 256), torch.randint(0, 10, (64,))
monitor = GradientMonitor(model, reporters=[]) if mode != "plain" else None
marks = []
for step in range(steps):
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(); loss.backward()
    if monitor is not None: monitor.step()
    opt.step()
    if step in (steps // 10, steps - 1):
        marks.append(open("/proc/self/statm").read().split()[1])
page = resource.getpagesize()
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, *(int(m) * page for m in marks))
"""


def memory_report(quick: bool) -> dict[str, float]:
    """Peak resident memory of plain training and graddiag defaults (separate processes), and
    graddiag's resident-memory growth between 10 % and 100 % of the run."""
    import subprocess

    steps = 200 if quick else 3000
    root = str(Path(__file__).resolve().parents[1])
    out: dict[str, float] = {}
    for mode in ("plain", "graddiag"):
        code = MEMORY_CHILD.format(root=root, steps=steps, mode=mode)
        text = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              check=True).stdout.split()
        peak, early, late = (int(v) for v in text[-3:])
        out[f"{mode}_peak_mib"] = peak / 2**20
        out[f"{mode}_growth_mib"] = (late - early) / 2**20
    print(f"\nMemory (MLP 20x256, {steps} steps, separate processes):")
    print(f"  peak RSS plain {out['plain_peak_mib']:.0f} MiB, graddiag defaults "
          f"{out['graddiag_peak_mib']:.0f} MiB (+{out['graddiag_peak_mib'] - out['plain_peak_mib']:.1f} MiB)")
    print(f"  RSS growth from 10 % to 100 % of the run: plain {out['plain_growth_mib']:.1f} MiB, "
          f"graddiag {out['graddiag_growth_mib']:.1f} MiB")
    return out


if __name__ == "__main__":
    raise SystemExit(main())
