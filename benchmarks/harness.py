"""Interleaved timing of training configurations: what a user pays, per optimizer step.

Every configuration trains the *same* model on the same data stream in one process, taking
turns (one step each on a CPU, blocks of steps with a device sync at block boundaries on a
GPU), so all of them share the machine's drifts. Each configuration sees its *own* step
numbers 0, 1, 2, ... (a trainer proxy in Lightning), so graddiag's periodic work (logging
every ``log_every_n_steps``, activation and parameter statistics every 50 steps, the figure)
falls on each configuration exactly as in a run of its own; Lightning's own logging (the
module's ``train_loss``) is decided on the same own step numbers (see :func:`log_on_own_steps`).
A step's time is the wall time from one batch start to the next: every hook, the logging and
the figure included.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import grad_norm
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from graddiag import GradientDiagnostics, GradientMonitor


# ----------------------------------------------------------------------------- models
def mlp(depth: int = 20, width: int = 256, in_features: int = 256) -> nn.Module:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(in_features if i == 0 else width, width), nn.ReLU()]
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


class Transformer(nn.Module):
    def __init__(self, layers: int = 16, d_model: int = 64, in_features: int = 256,
                 tokens: int = 8) -> None:
        super().__init__()
        self.tokens = tokens
        self.embed = nn.Linear(in_features // tokens, d_model)
        block = nn.TransformerEncoderLayer(d_model, 4, 2 * d_model, batch_first=True, dropout=0.0)
        self.encoder = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x.reshape(x.shape[0], self.tokens, -1))
        return self.head(self.encoder(tokens).mean(1))


def tensor_count(model_fn: Callable[[], nn.Module]) -> int:
    return sum(1 for _ in model_fn().parameters())


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
def floor_step(params: Any, read: bool = False) -> None:
    """The floor's work on one step: one fused norm over all gradients; with ``read``, those
    norms also copied to the host (on a GPU: a sync a step must wait for)."""
    norms = torch._foreach_norm([p.grad for p in params if p.grad is not None])
    if read:
        torch.stack(norms).cpu()


class Floor(pl.Callback):
    """The floor: one fused norm over all gradients per step (``read``: and one host read)."""

    def __init__(self, read: bool = False) -> None:
        self.read = read

    def on_before_optimizer_step(self, trainer: Any, module: pl.LightningModule,
                                 optimizer: Any) -> None:
        floor_step(module.parameters(), self.read)


class LightningRecipe(pl.Callback):
    """Lightning's documented recipe: ``log_dict(grad_norm(module, 2))`` before each step."""

    def on_before_optimizer_step(self, trainer: Any, module: pl.LightningModule,
                                 optimizer: Any) -> None:
        module.log_dict(grad_norm(module, norm_type=2))


class HistogramHooks(pl.Callback):
    """The watch-style recipe: per-parameter gradient hooks logging histograms to TensorBoard."""

    def __init__(self, every_n_steps: int) -> None:
        self.every = every_n_steps
        self.handles: list[Any] = []
        self.active = False
        self.step = 0

    def on_train_start(self, trainer: Any, module: pl.LightningModule) -> None:
        writer = trainer.logger.experiment
        for name, p in module.named_parameters():
            def hook(grad: torch.Tensor, name: str = name) -> None:
                if self.active and self.step % self.every == 0:
                    writer.add_histogram(f"grad/{name}", grad, self.step)
            self.handles.append(p.register_hook(hook))

    def on_train_batch_start(self, trainer: Any, *args: Any) -> None:
        self.step = trainer.global_step

    def on_train_end(self, *args: Any) -> None:
        for h in self.handles:
            h.remove()


def _diagnostics(**options: Any) -> Callable[[], list[pl.Callback]]:
    return lambda: [GradientDiagnostics(print_summary=False, **options)]


PLAIN, AA, FLOOR = "plain", "plain again (A/A control)", "floor: one _foreach_norm per step"
FLOOR_READ = "floor + one host read per step"
DEFAULTS, EVERY10 = "graddiag defaults", "graddiag every_n_steps=10"
LIGHTNING_CONFIGS: dict[str, Callable[[], list[pl.Callback]]] = {
    PLAIN: lambda: [],
    AA: lambda: [],
    FLOOR: lambda: [Floor()],
    FLOOR_READ: lambda: [Floor(read=True)],
    DEFAULTS: _diagnostics(),
    EVERY10: _diagnostics(every_n_steps=10),
    "graddiag, figure only at the end": _diagnostics(figure_every_n_steps=0),
    "graddiag, activations and parameters off": _diagnostics(activation_every_n_steps=0,
                                                             param_every_n_steps=0),
    "graddiag, replay_nonfinite=False": _diagnostics(replay_nonfinite=False),
    "graddiag everything every step": _diagnostics(activation_every_n_steps=1,
                                                   param_every_n_steps=1),
    "Lightning grad_norm + log_dict every step": lambda: [LightningRecipe()],
    "histogram hooks -> TensorBoard, every 10 steps": lambda: [HistogramHooks(10)],
    "histogram hooks -> TensorBoard, every step": lambda: [HistogramHooks(1)],
}

ALWAYS = ("setup", "on_fit_start", "on_train_start", "on_train_end", "on_fit_end", "teardown",
          "on_exception", "state_dict", "on_save_checkpoint")
PER_STEP = ("on_before_backward", "on_after_backward", "on_before_optimizer_step",
            "on_before_zero_grad", "on_train_batch_end")


class OwnSteps:
    """The trainer as one configuration sees it: its own step counter, everything else shared."""

    def __init__(self, trainer: pl.Trainer, step: int) -> None:
        object.__setattr__(self, "_trainer", trainer)
        object.__setattr__(self, "global_step", step)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._trainer, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._trainer, name, value)


def turn(names: list[str], block: int, index: int) -> tuple[str, int]:
    """Who runs the ``index``-th step of an interleaved run, and its number in that one's run.

    Every cycle runs each configuration for ``block`` steps; the order rotates by one place per
    cycle, so that no configuration always follows the same other one. (Rotation alone does
    not spread work that comes every so many *global* steps: with 5 configurations, a write
    every 50 global steps would fall on one configuration only; see :func:`log_on_own_steps`.)
    """
    cycle, within = divmod(index, block * len(names))
    name = names[(within // block + cycle) % len(names)]
    return name, cycle * block + within % block


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def log_on_own_steps(trainer: pl.Trainer, switch: Interleave) -> None:
    """Make Lightning decide whether to write the module's logged metrics on the own step of the
    configuration whose turn it is (every ``log_every_n_steps`` of its own steps, as in a run of
    its own) instead of on the shared global step."""
    connector = trainer._logger_connector

    class OwnStepLogging(type(connector)):  # type: ignore[misc]
        @property
        def should_update_logs(self) -> bool:
            every = self.trainer.log_every_n_steps
            return bool(every) and (switch.own_step + 1) % every == 0

    connector.__class__ = OwnStepLogging


class Interleave(pl.Callback):
    """Runs every configuration's callbacks in one Trainer, taking turns every ``block`` steps."""

    def __init__(self, configs: dict[str, list[pl.Callback]], block: int, warmup: int,
                 device: torch.device) -> None:
        self.configs = configs
        self.names = list(configs)
        self.block = block
        self.warmup = warmup
        self.device = device
        self.times: dict[str, list[float]] = {n: [] for n in self.names}
        self._started: float | None = None
        self._current: str | None = None
        self._own_step = 0
        for hook in ALWAYS:
            setattr(self, hook, self._fan_out(hook, always=True))
        for hook in PER_STEP:
            setattr(self, hook, self._fan_out(hook, always=False))

    @property
    def own_step(self) -> int:
        """The step number, in its own run, of the configuration whose turn it is."""
        return self._own_step

    def turn(self, global_step: int) -> tuple[str, int]:
        """The configuration that runs ``global_step``, and that step's number in its own run."""
        return turn(self.names, self.block, global_step)

    def _fan_out(self, hook: str, always: bool) -> Callable[..., Any]:
        def call(trainer: pl.Trainer, *args: Any, **kwargs: Any) -> Any:
            if always:
                for name in self.names:
                    for cb in self.configs[name]:
                        getattr(cb, hook)(trainer, *args, **kwargs)
                return {} if hook == "state_dict" else None
            view = OwnSteps(trainer, self._own_step)
            for cb in self.configs[self._current or PLAIN]:
                getattr(cb, hook)(view, *args, **kwargs)
            return None

        return call

    def on_train_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        name, own = self.turn(trainer.global_step)
        if own % self.block == 0:
            _sync(self.device)
        now = time.perf_counter()
        if self._started is not None and self._current and self._own_step >= self.warmup:
            self.times[self._current].append(now - self._started)
        self._current, self._own_step = name, own
        for cb in self.configs[name]:
            if isinstance(cb, HistogramHooks):
                cb.active = True
        for other in self.names:
            if other != name:
                for cb in self.configs[other]:
                    if isinstance(cb, HistogramHooks):
                        cb.active = False
        view = OwnSteps(trainer, own)
        for cb in self.configs[name]:
            cb.on_train_batch_start(view, module, batch, batch_idx)
        self._started = now


def _data(n: int = 4096, features: int = 256) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, features, generator=g),
                         torch.randint(0, 10, (n,), generator=g))


def summarise(times: dict[str, list[float]]) -> dict[str, dict[str, Any]]:
    """Mean (= total wall time / steps) and median step time per configuration, and the step
    times themselves (seconds; the i-th of every configuration from the same round of turns)."""
    return {name: {"mean": statistics.fmean(t), "median": statistics.median(t), "n": len(t),
                   "total": sum(t), "times": list(t)} for name, t in times.items() if t}


def bootstrap_interval(times: dict[str, list[float]],
                       statistic: Callable[[dict[str, float]], float],
                       resamples: int = 4000, seed: int = 0,
                       period: int = 50) -> tuple[float, float]:
    """The 95 % interval of ``statistic`` (a function of every configuration's mean step time)
    over ``resamples`` resamplings of the timed rounds: the same rounds, drawn with
    replacement, for every configuration, so that what they share (the machine's drifts, the
    data) stays paired; and drawn within the rounds' classes modulo ``period`` (graddiag's
    activation and parameter steps come every 50 steps, its logging every 10 or 50), so that a
    resample holds as many of each periodic step as a run does (a window shorter than two
    periods is drawn in classes of at least two rounds)."""
    arrays = {name: np.asarray(t, dtype=float) for name, t in times.items()}
    lengths = {len(a) for a in arrays.values()}
    if len(lengths) != 1:
        raise ValueError(f"every configuration needs as many timed rounds, got {sorted(lengths)}")
    (rounds,) = lengths
    period = max(1, min(period, rounds // 2))  # at least two rounds in each class to draw from
    rng = np.random.default_rng(seed)
    picks = np.empty((resamples, rounds), dtype=np.int64)
    column = 0
    for phase in range(min(period, rounds)):
        members = np.arange(phase, rounds, period)
        picks[:, column:column + len(members)] = rng.choice(members, (resamples, len(members)))
        column += len(members)
    means = {name: a[picks].mean(axis=1) for name, a in arrays.items()}
    values = np.array([statistic({name: float(m[i]) for name, m in means.items()})
                       for i in range(resamples)])
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def measure_lightning(model_fn: Callable[[], nn.Module], configs: list[str], steps: int, *,
                      log_every_n_steps: int = 10, warmup: int = 10, block: int = 1,
                      accelerator: str = "cpu", precision: str = "32-true",
                      batch_size: int = 64, features: int = 256) -> dict[str, dict[str, float]]:
    """Time ``steps`` own steps (after ``warmup``) of each configuration inside one Trainer run
    with a ``TensorBoardLogger``."""
    device = torch.device("cuda" if accelerator == "cuda" else "cpu")
    built = {name: LIGHTNING_CONFIGS[name]() for name in configs}
    switch = Interleave(built, block, warmup, device)
    own_steps = warmup + steps
    rounds = -(-own_steps // block)
    total = rounds * block * len(configs) + 1
    pl.seed_everything(0, verbose=False)
    with tempfile.TemporaryDirectory() as logdir:
        trainer = pl.Trainer(
            max_steps=total, accelerator=accelerator, devices=1, precision=precision,
            logger=TensorBoardLogger(logdir, name="bench"), callbacks=[switch],
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            log_every_n_steps=log_every_n_steps, num_sanity_val_steps=0,
        )
        log_on_own_steps(trainer, switch)
        trainer.fit(Classifier(model_fn()),
                    DataLoader(_data(features=features), batch_size=batch_size, shuffle=True,
                               drop_last=True))
    return summarise({n: t[:steps] for n, t in switch.times.items()})


LOOP_CONFIGS = [PLAIN, AA, FLOOR, DEFAULTS, EVERY10]


def measure_loop(model_fn: Callable[[], nn.Module], steps: int, *, warmup: int = 10,
                 block: int = 1, device: str = "cpu", autocast: torch.dtype | None = None,
                 configs: list[str] = LOOP_CONFIGS, batch_size: int = 64,
                 features: int = 256) -> dict[str, dict[str, float]]:
    """The same comparison in a hand-written loop (``GradientMonitor`` with its defaults: findings
    on the console), configurations taking turns, each with its own step numbers."""
    torch.manual_seed(0)
    dev = torch.device(device)
    model = model_fn().to(dev)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    data = _data(features=features)
    x_all, y_all = data.tensors[0].to(dev), data.tensors[1].to(dev)
    # several monitors on one model: each watches only its own steps' forward passes (watch=None
    # and watch_activations below), as a lone monitor's forward wrapper would
    monitors: dict[str, GradientMonitor] = {}
    if DEFAULTS in configs:
        monitors[DEFAULTS] = GradientMonitor(model, watch=None)
    if EVERY10 in configs:
        monitors[EVERY10] = GradientMonitor(model, every_n_steps=10, watch=None)
    times: dict[str, list[float]] = {name: [] for name in configs}
    own_steps = warmup + steps
    rounds = -(-own_steps // block)
    started: float | None = None
    previous: tuple[str, int] | None = None
    batches = len(x_all) // batch_size
    for i in range(rounds * block * len(configs) + 1):
        name, own = turn(configs, block, i)
        if own % block == 0:
            _sync(dev)
        now = time.perf_counter()
        if started is not None and previous is not None and previous[1] >= warmup:
            times[previous[0]].append(now - started)
        started, previous = now, (name, own)
        if i == rounds * block * len(configs):
            break
        monitor = monitors.get(name)
        b = i % batches
        x, y = x_all[b * batch_size:(b + 1) * batch_size], y_all[b * batch_size:(b + 1) * batch_size]
        precision = (torch.autocast(dev.type, dtype=autocast) if autocast is not None
                     else nullcontext())
        with (monitor.watch_activations(own) if monitor is not None else nullcontext()), precision:
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        if name in (FLOOR, FLOOR_READ):
            floor_step(model.parameters(), read=name == FLOOR_READ)
        elif monitor is not None:
            monitor.step(own)
        optimizer.step()
    for monitor in monitors.values():
        monitor.close()
    return summarise({n: t[:steps] for n, t in times.items()})


def ratios(stats: dict[str, dict[str, Any]], base: str = PLAIN) -> dict[str, dict[str, float]]:
    """Each configuration's mean and median step time over the baseline's."""
    b = stats[base]
    return {name: {"mean": s["mean"] / b["mean"], "median": s["median"] / b["median"],
                   "ms": s["mean"] * 1e3, "n": s["n"]}
            for name, s in stats.items() if name != base}


def variant_arguments(description: str, argv: list[str] | None,
                      steps: int) -> argparse.Namespace:
    """``--steps``, ``--threads`` and ``--quick`` of a script comparing Lightning variants;
    also quiets Lightning's and graddiag's logs and sets torch's thread count."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--steps", type=int, default=steps, help="timed steps per configuration")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="a few tiny steps (smoke test)")
    args = parser.parse_args(argv)
    for name in ("pytorch_lightning", "lightning.pytorch", "graddiag"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    return args


def loop_arguments(description: str, argv: list[str] | None,
                   steps: int) -> argparse.Namespace:
    """``--steps``, ``--depth``, ``--width``, ``--threads`` and ``--json`` of a script timing a
    hand-written loop on an MLP; also quiets graddiag's log and sets torch's thread count."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--steps", type=int, default=steps, help="timed steps per configuration")
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.getLogger("graddiag").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    return args


def measure_variants(args: argparse.Namespace, configs: list[str],
                     variants: dict[str, dict[str, Any]]) -> tuple[dict[str, dict[str, float]], str]:
    """Measure ``configs`` and graddiag's callback with each variant's options (by name) inside
    Lightning on the MLP 20x256 (``--quick``: an MLP 4x64, 6 steps). Returns the statistics and
    a line saying what ran."""
    for name, options in variants.items():
        LIGHTNING_CONFIGS[name] = _diagnostics(**options)
    steps, model, label = ((6, lambda: mlp(depth=4, width=64), "MLP 4x64") if args.quick
                           else (args.steps, mlp, "MLP 20x256"))
    stats = measure_lightning(model, [*configs, *variants], steps, warmup=2 if args.quick else 10)
    return stats, (f"{label}, {steps} timed steps per configuration, taking turns every step "
                   f"(plain {stats[PLAIN]['mean'] * 1e3:.2f} ms)")


def print_ratios(stats: dict[str, dict[str, float]], width: int = 46) -> None:
    """One line per configuration: mean and median step time over plain training's."""
    print(f"  {'configuration':<{width}} {'mean ratio':>10} {'median ratio':>12}")
    for name, row in ratios(stats).items():
        print(f"  {name:<{width}} {row['mean']:>10.3f} {row['median']:>12.3f}")
