"""Where graddiag's time goes: per-step costs by part, the scalar write path, scaling with layers.

Timers wrap graddiag's own functions during a Lightning run with the defaults (found with
cProfile first; timers are used for the table because they add ~1 us per call, not the 2x of a
profiler on Python code). Periodic work is reported per occurrence and per step.
"""

from __future__ import annotations

import functools
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader

from benchmarks.harness import Classifier, _data
from graddiag import GradientDiagnostics, GradientMonitor
from graddiag.measure.activations.watch import ActivationWatch
from graddiag.measure.norms import GradientProbe
from graddiag.measure.parameters import ParameterProbe
from graddiag.measure.rows import NormRows
from graddiag.measure.transfer import HostCopy
from graddiag.pipeline.activation_scope import ActivationScope
from graddiag.pipeline.history import History
from graddiag.reporters.budget import DEFAULT_FIGURE_EVERY, FIGURE_TIME_SHARE
from graddiag.reporters.checksums import CChecksums
from graddiag.reporters.events import write_scalars
from graddiag.reporters.figures import flow_profile
from graddiag.reporters.scalars import event_metrics
from graddiag.reporters.tensorboard import TensorBoardReporter
from graddiag.rules.ruleset import RuleSet

# (label, owner, attribute): every call of owner.attribute is timed under label
PARTS = [
    ("fused read (GradientProbe.read)", GradientProbe, "read"),
    ("kept plain step: fused read into its row (GradientProbe.read_row)", GradientProbe,
     "read_row"),
    ("kept plain steps: per-layer norms and records (NormRows.take)", NormRows, "take"),
    ("host copy (HostCopy)", HostCopy, "__init__"),
    ("host copy (HostCopy)", HostCopy, "result"),
    ("rules (RuleSet.update)", RuleSet, "update"),
    ("history append", History, "append"),
    ("scalar writing (one event per logging step)", TensorBoardReporter, "_scalars"),
    ("activation statistics (install the watch, pack)", ActivationWatch, "_install"),
    ("activation statistics (install the watch, pack)", ActivationScope, "take"),
    ("parameter norms and update ratios", ParameterProbe, "norms"),
    ("parameter norms and update ratios", ParameterProbe, "snapshot"),
    ("parameter norms and update ratios", ParameterProbe, "update_norms"),
    ("all of graddiag's callback hooks", GradientDiagnostics, "on_before_optimizer_step"),
    ("all of graddiag's callback hooks", GradientDiagnostics, "on_train_batch_start"),
    ("all of graddiag's callback hooks", GradientDiagnostics, "on_before_backward"),
]


class Timers:
    """Wall-clock timers around functions, while wrapped: seconds and calls per label, and the
    seconds per label on each step (``step``: set by the caller before each step)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.per_step: dict[str, dict[int, float]] = defaultdict(lambda: defaultdict(float))
        self.step = 0
        self._saved: list[tuple[Any, str, Any]] = []
        self.enabled = True  # off once training ends (the final figure and summary are not steps)

    def wrap(self, label: str, owner: Any, name: str) -> None:
        original = getattr(owner, name)
        self._saved.append((owner, name, original))

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if not self.enabled:
                return original(*args, **kwargs)
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                self.seconds[label] += elapsed
                self.calls[label] += 1
                self.per_step[label][self.step] += elapsed

        setattr(owner, name, timed)

    def restore(self) -> None:
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)
        self._saved.clear()


class _StepClock(pl.Callback):
    """Wall time of every step (batch start to batch start)."""

    def __init__(self, timers: Timers) -> None:
        self.times: list[float] = []
        self._last: float | None = None
        self._timers = timers

    def on_train_end(self, *args: Any) -> None:
        self._timers.enabled = False

    def on_train_batch_start(self, *args: Any) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self.times.append(now - self._last)
        self._last = now


def part_costs(model_fn: Callable[[], nn.Module], steps: int,
               log_every_n_steps: int = 10) -> dict[str, Any]:
    """Milliseconds per step of each part of graddiag, in a Lightning run with its defaults.

    The progress-bar entry is timed around ``LightningModule.log`` calls made for it; the
    activation steps' extra forward work (hooks, the function interceptor) is the excess of
    activation steps over ordinary logging steps, net of the parts timed there.
    """
    timers = Timers()
    for label, owner, name in PARTS:
        timers.wrap(label, owner, name)
    progress = {"seconds": 0.0, "calls": 0}
    real_log = pl.LightningModule.log

    def log(module: pl.LightningModule, name: str, *args: Any, **kwargs: Any) -> Any:
        if name != "graddiag":
            return real_log(module, name, *args, **kwargs)
        start = time.perf_counter()
        try:
            return real_log(module, name, *args, **kwargs)
        finally:
            progress["seconds"] += time.perf_counter() - start
            progress["calls"] += 1

    clock = _StepClock(timers)
    diagnostics = GradientDiagnostics(print_summary=False)
    pl.LightningModule.log = log  # type: ignore[method-assign]
    try:
        pl.seed_everything(0, verbose=False)
        with tempfile.TemporaryDirectory() as logdir:
            trainer = pl.Trainer(
                max_steps=steps + 1, accelerator="cpu", devices=1,
                logger=TensorBoardLogger(logdir, name="costs"),
                callbacks=[clock, diagnostics],
                enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, log_every_n_steps=log_every_n_steps,
                num_sanity_val_steps=0)
            trainer.fit(Classifier(model_fn()), DataLoader(_data(), batch_size=64, shuffle=True,
                                                          drop_last=True))
    finally:
        pl.LightningModule.log = real_log  # type: ignore[method-assign]
        timers.restore()
    n = len(clock.times)
    parts = {label: {"ms_per_step": s / n * 1e3, "calls": timers.calls[label],
                     "ms_per_call": s / max(1, timers.calls[label]) * 1e3}
             for label, s in timers.seconds.items()}
    parts["progress bar (only when the count changes)"] = {
        "ms_per_step": progress["seconds"] / n * 1e3, "calls": progress["calls"],
        "ms_per_call": progress["seconds"] / max(1, progress["calls"]) * 1e3}
    times = clock.times  # times[i] is step i (batch start i to batch start i + 1)
    logging_steps = [times[s] for s in range(n) if s % log_every_n_steps == 0 and s % 50]
    activation_steps = [times[s] for s in range(50, n, 50) if s % 500]
    if logging_steps and activation_steps:
        extra = statistics.fmean(activation_steps) - statistics.fmean(logging_steps)
        # what was timed on an activation step (also a parameter step): the watch installed
        # and the statistics packed (two timed calls), the parameter norms and the update norms
        # (two more; the weight copy falls on the step before)
        packing = parts.get("activation statistics (install the watch, pack)", {})
        timed = (2 * packing.get("ms_per_call", 0.0)
                 + 2 * parts.get("parameter norms and update ratios", {}).get("ms_per_call", 0))
        parts["activation steps: hooks in the forward pass (excess, net)"] = {
            "ms_per_step": max(0.0, extra * 1e3 - timed) / 50, "calls": len(activation_steps),
            "ms_per_call": max(0.0, extra * 1e3 - timed)}
    figure_ms = figure_cost(diagnostics.monitor)
    step_ms = statistics.fmean(times) * 1e3
    # at most one per DEFAULT_FIGURE_EVERY steps, and within FIGURE_TIME_SHARE of the wall time
    bound = min(figure_ms / DEFAULT_FIGURE_EVERY, step_ms * FIGURE_TIME_SHARE / (1 - FIGURE_TIME_SHARE))
    parts["gradient-flow figure (its bound: 0.25 % of the time, one per 500 steps)"] = {
        "ms_per_step": bound, "calls": 1, "ms_per_call": figure_ms}
    return {"steps": n, "step_ms": step_ms, "parts": parts, "figure_ms": figure_ms}


def figure_cost(monitor: GradientMonitor | None) -> float:
    """Milliseconds to draw and write one gradient-flow figure of ``monitor``'s records (best of
    two), as the TensorBoard reporter does every ``figure_every_n_steps``."""
    from torch.utils.tensorboard import SummaryWriter

    assert monitor is not None
    rows = [(r.grad_norm, r.has_grad) for r in monitor.records]
    best = float("inf")
    with tempfile.TemporaryDirectory() as logdir:
        writer = SummaryWriter(logdir)
        reporter = TensorBoardReporter(writer, save_png=False)
        for _ in range(2):
            start = time.perf_counter()
            profile = flow_profile([r[0] for r in rows], [r[1] for r in rows])
            reporter._figure(profile, monitor.records[-1].layers, len(rows), "benchmark")
            best = min(best, time.perf_counter() - start)
        writer.close()
    return best * 1e3


def scalar_write_cost(model_fn: Callable[[], nn.Module], repeats: int = 200) -> dict[str, float]:
    """Milliseconds to write one logging step's scalars (flushed to disk): one ``add_scalar`` per
    key (the former write path) against one event carrying every value, with TensorBoard's own
    (pure-Python) checksums and with graddiag's in C (what graddiag's writes cost)."""
    from torch.utils.tensorboard import SummaryWriter

    torch.manual_seed(0)
    model = model_fn()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)  # the weights move: update ratios
    monitor = GradientMonitor(model, reporters=[], activation_every_n_steps=1,
                              param_every_n_steps=1)
    for _ in range(2):
        optimizer.zero_grad()
        F.cross_entropy(model(torch.randn(64, 256)), torch.randint(0, 10, (64,))).backward()
        monitor.step()
        optimizer.step()
    monitor.close()
    # what a logging step that also carries parameter and activation statistics writes
    metrics = event_metrics(monitor.records[-1], "graddiag/", 0)
    out: dict[str, float] = {"values": float(len(metrics))}
    with tempfile.TemporaryDirectory() as logdir:
        labels: tuple[str, ...] = ("add_scalar per key", "one event")
        if CChecksums().available:  # without a compiled google-crc32c there is no C path
            labels += ("one event, checksums in C",)
        for run, label in enumerate(labels + labels):
            writer = SummaryWriter(f"{logdir}/{run}")
            checksums = CChecksums()
            if label.endswith("in C"):
                checksums.cover(writer)
            start = time.perf_counter()
            for step in range(repeats):
                if label.startswith("one"):
                    write_scalars(writer, metrics, step)
                else:
                    for tag, value in metrics.items():
                        writer.add_scalar(tag, value, step)
            writer.flush()  # the writer thread's checksums and writes count too
            seconds = time.perf_counter() - start
            checksums.undo()
            writer.close()
            out[label] = min(out.get(label, float("inf")), seconds / repeats * 1e3)
    return out


class Parallel(nn.Module):
    """``n`` linear layers side by side, summed: many tensors with healthy, alike gradients (a
    deep narrow net would also exercise the rules' findings, which is not what is timed here)."""

    def __init__(self, n: int, width: int = 16) -> None:
        super().__init__()
        self.branches = nn.ModuleList(nn.Linear(width, width) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([branch(x) for branch in self.branches]).sum(0)


def host_work_scaling(layers: list[int], repeats: int = 300) -> list[dict[str, float]]:
    """Host time of ``monitor.step()`` on an ordinary step (no logging, no activations) against
    the fused read alone (the ``.grad`` list, one ``_foreach_norm``, its results stacked into one
    tensor), for models with more and more parameter tensors (:class:`Parallel`)."""
    rows = []
    for n in layers:
        torch.manual_seed(0)
        model = Parallel(n)
        F.cross_entropy(model(torch.randn(64, 16)), torch.randint(0, 16, (64,))).backward()
        params = list(model.parameters())
        monitor = GradientMonitor(model, reporters=[], activation_every_n_steps=0,
                                  param_every_n_steps=0)
        for _ in range(5):
            monitor.step()

        def best(fn: Callable[[], Any]) -> float:
            samples = []
            for _ in range(5):
                start = time.perf_counter()
                for _ in range(repeats):
                    fn()
                samples.append((time.perf_counter() - start) / repeats)
            return min(samples) * 1e6

        def fused_read(params: list[nn.Parameter] = params) -> torch.Tensor:
            # what any per-layer reading needs: the .grad list, one fused norm, one tensor
            return torch.stack(torch._foreach_norm([p.grad for p in params]))

        fused = best(fused_read)
        step = best(monitor.step)
        monitor.close()
        rows.append({"tensors": float(len(params)), "fused_read_us": fused, "step_us": step,
                     "beyond_us": step - fused})
    return rows
