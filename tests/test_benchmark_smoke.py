"""The overhead benchmark still runs (a few tiny steps) and the GPU check skips cleanly without
CUDA. No timings are asserted: benchmarks are not tests; only that every configuration produced
a finite ratio and every section its rows."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


@pytest.mark.slow
def test_benchmark_quick_round(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "overhead.py"), "--quick",
                             "--json", str(out)], capture_output=True, text=True, timeout=600,
                            env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    (groups,) = data["models"].values()
    sizes = {label: len(group["rows"]) for label, group in groups.items()}
    assert sizes == {"hand-written loop, GradientMonitor": 4,
                     "Lightning, TensorBoardLogger, log_every_n_steps=10": 4,
                     "Lightning, TensorBoardLogger, log_every_n_steps=50": 4,
                     "Lightning recipes, log_every_n_steps=10": 2,
                     "Lightning histogram recipes, log_every_n_steps=10": 2}
    for group in groups.values():
        for row in group["rows"].values():
            assert math.isfinite(row["mean"]) and row["mean"] > 0 and row["n"] in (4, 6)
    (costs,) = data["costs"].values()
    assert costs["figure_ms"] > 0
    assert {"fused read (GradientProbe.read)", "rules (RuleSet.update)",
            "scalar writing (one event per logging step)"} <= set(costs["parts"])
    (write,) = data["scalar_write"].values()
    assert write["one event"] > 0 and write["add_scalar per key"] > 0
    # the event of a logging step with parameter and activation statistics, MLP 4x64 (5 linear
    # layers, 4 ReLU sites), counted by hand: grad_norm, param_norm, update_ratio 5 each, gain
    # and dead 4 each, 3 run-wide values, the layer-norm margins 3; log10 of the 5 + 1 + 3 + 5
    # gradient-norm, global-norm, margin and update-ratio values
    assert write["values"] == 5 * 3 + 4 * 2 + 3 + 3 + (5 + 1 + 3 + 5)
    assert data["scaling"] and data["scaling_training"] and data["memory"]["graddiag_peak_mib"] > 0
    assert "Targets" in result.stdout
    from benchmarks.overhead import FIGURE_TIME_SHARE

    checked = 0
    for label, group in groups.items():  # each verdict from the rows, inside its interval
        rows = group["rows"]
        if "graddiag defaults" not in rows:
            continue
        figure = 1.0 - FIGURE_TIME_SHARE if label.startswith("Lightning") else 1.0
        defaults = rows["graddiag defaults"]["mean"] / figure
        above = defaults - rows["floor: one _foreach_norm per step"]["mean"]
        assert group["above_floor"] == pytest.approx(above, abs=1e-12), label
        every = rows["graddiag every_n_steps=10"]["mean"] / figure
        assert group["every10_with_figure"] == pytest.approx(every, abs=1e-12), label
        for value, (low, high) in ((above, group["above_floor_interval"]),
                                   (every, group["every10_interval"])):
            # six rounds in classes of two: the interval has a width, the estimate inside it
            assert low < high and low <= value + 1e-9 and value - 1e-9 <= high, label
        checked += 1
    assert checked == 3


def test_bootstrap_intervals_resample_rounds_paired_and_by_phase() -> None:
    """Rounds are drawn with replacement, the same for every configuration: a configuration
    taking exactly twice as long as another on every round is twice as slow on every
    resample. Unstratified (``period=1``), one alternating 1 s and 3 s has a mean of 1 s with
    probability (1/2)^4 = 6.25 % in four rounds (more than the 2.5 % tail), so its interval is
    exactly 1 to 3; drawn within the rounds' classes modulo 2, every resample keeps two 1 s and
    two 3 s rounds: exactly 2."""
    from benchmarks.harness import bootstrap_interval

    paired = {"a": [1.0, 2.0, 1.0, 2.0], "b": [2.0, 4.0, 2.0, 4.0]}
    assert bootstrap_interval(paired, lambda m: m["b"] / m["a"], period=1) == (2.0, 2.0)
    alternating = {"a": [1.0, 3.0, 1.0, 3.0]}
    assert bootstrap_interval(alternating, lambda m: m["a"], period=1) == (1.0, 3.0)
    assert bootstrap_interval(alternating, lambda m: m["a"], period=2) == (2.0, 2.0)
    # six rounds are drawn in classes of two (not one class per round, which would never vary):
    # each of the 6 draws is 1 or 3 alike, so the mean is 1 + 2k/6 with k ~ Binomial(6, 1/2);
    # P(k = 0) = 1/64 < 2.5 % < P(k <= 1) = 7/64, so the interval is 4/3 to 8/3
    mixed = {"a": [1.0, 3.0, 1.0, 3.0, 1.0, 3.0]}
    assert bootstrap_interval(mixed, lambda m: m["a"]) == (pytest.approx(4 / 3),
                                                            pytest.approx(8 / 3))
    with pytest.raises(ValueError, match="as many timed rounds"):
        bootstrap_interval({"a": [1.0, 2.0], "b": [1.0]}, lambda m: m["a"])


@pytest.mark.parametrize("every", [10, 50])
def test_lightning_writes_each_configuration_s_metrics_on_its_own_steps(every: int) -> None:
    """Five configurations taking turns: Lightning writes the module's metrics for each one
    every ``every`` of its own steps (at own steps every - 1, 2 * every - 1, ...), as in a run
    of its own, not every ``every`` global steps (which at 50 would all fall on one)."""
    import pytorch_lightning as pl
    from pytorch_lightning.loggers.logger import Logger
    from torch.utils.data import DataLoader

    from benchmarks.harness import Classifier, Interleave, _data, log_on_own_steps, mlp

    names = ["a", "b", "c", "d", "e"]
    switch = Interleave({n: [] for n in names}, block=1, warmup=0, device=torch.device("cpu"))
    written: list[tuple[str, int]] = []

    class Recorder(Logger):
        name, version = "recorder", 0

        def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
            if "train_loss" in metrics:
                written.append((switch._current or "", switch.own_step))

        def log_hyperparams(self, *args: object, **kwargs: object) -> None:
            pass

    own_steps = 100
    trainer = pl.Trainer(max_steps=own_steps * len(names), accelerator="cpu",
                         logger=Recorder(), callbacks=[switch], enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         log_every_n_steps=every, num_sanity_val_steps=0)
    log_on_own_steps(trainer, switch)
    trainer.fit(Classifier(mlp(depth=1, width=8, in_features=256)),
                DataLoader(_data(512), batch_size=64, shuffle=True, drop_last=True))
    expected = list(range(every - 1, own_steps, every))
    for name in names:
        assert sorted(s for n, s in written if n == name) == expected, name



def test_gpu_check_skips_without_cuda() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py")],
                            capture_output=True, text=True, timeout=300,
                            env={**ENV, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipped" in result.stdout


def test_gpu_table_renders_a_saved_run(tmp_path: Path) -> None:
    """``gpu_check.py --table`` turns a run's ``--json`` output into the README's rows, without
    a GPU: ratios to three places, plain ms/step in the label, defaults in bold, blanks where a
    configuration was not run, and a failed group said as such."""
    run = {"device": "X", "torch": "2", "steps": 10, "groups": {
        "launch-bound MLP 20x256, batch 64, fp32, hand-written loop": {
            "plain_ms": 5.5, "ratios": {"plain again (A/A control)": {"mean": 0.9554},
                                        "graddiag defaults": {"mean": 1.07449}}},
        "compute-bound Transformer 12 x d512, batch 64, bf16, Lightning, log_every_n_steps=10":
            {"error": "RuntimeError('boom')"},
    }}
    saved = tmp_path / "gpu.json"
    saved.write_text(json.dumps(run))
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"),
                             "--table", str(saved)], capture_output=True, text=True, timeout=300,
                            env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[2] == "| MLP fp32, loop (5.50) | 0.955 |  |  | **1.074** |  |  |  |  |  |"
    assert lines[3] == "| Transformer bf16, Lightning | failed: RuntimeError('boom') |"
    assert len(lines) == 4 and lines[0].count("|") == lines[1].count("|") == lines[2].count("|")


def _loop_script_json(script: str, steps: int, tmp_path: Path) -> dict:
    """Runs a loop benchmark script on a 2x16 MLP and returns what it wrote with ``--json``."""
    out = tmp_path / "out.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--steps",
                             str(steps), "--depth", "2", "--width", "16", "--json", str(out)],
                            capture_output=True, text=True, timeout=300, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_early_steps_benchmark_runs(tmp_path: Path) -> None:
    data = _loop_script_json("early_steps.py", 8, tmp_path)
    assert {"plain", "graddiag defaults", "graddiag early_steps=0"} <= set(data)
    assert all(math.isfinite(v["ratio"]) and v["ratio"] > 0 for k, v in data.items() if "ratio" in v)


@pytest.mark.slow
def test_activation_steps_benchmark_runs(tmp_path: Path) -> None:
    data = _loop_script_json("activation_steps.py", 6, tmp_path)
    only = data["gradients only"]
    for name in ("activation statistics every step", "parameter statistics every step"):
        row, extra = data[name], data[f"extra: {name}"]
        assert set(row) == set(extra) == {"forward", "backward", "monitor.step()", "whole step"}
        for part, value in row.items():  # what the step adds: its mean less gradients-only's
            assert value > 0 and extra[part] == pytest.approx(value - only[part])
        # the whole step holds its parts (and the optimizer step)
        assert row["whole step"] > row["forward"] + row["backward"] + row["monitor.step()"]
    # plain training has no monitor: its "monitor.step()" is two clock reads, far below a step's
    assert data["plain"]["monitor.step()"] < only["monitor.step()"]


@pytest.mark.slow
def test_replay_benchmark_runs() -> None:
    replay = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "replay_overhead.py"),
                             "--quick"], capture_output=True, text=True, timeout=300, env=ENV)
    assert replay.returncode == 0, replay.stderr[-3000:]
    rows = [line.split() for line in replay.stdout.splitlines() if "graddiag defaults" in line]
    assert len(rows) == 2 and all(float(row[-2]) > 0 for row in rows)
    assert "RngState.capture()" in replay.stdout


@pytest.mark.slow
def test_cold_calls_benchmark_runs() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cold_calls.py")],
                            capture_output=True, text=True, timeout=600, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    parts = result.stdout.split("part by part")[-1].splitlines()[1:]
    assert len(parts) == 6 and all(line.split()[-1].lstrip("-").isdigit() for line in parts)


@pytest.mark.slow
def test_blocks_benchmark_runs() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "blocks.py"), "--quick"],
                            capture_output=True, text=True, timeout=300, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split() for line in result.stdout.splitlines() if "graddiag" in line]
    assert len(rows) == 4 and all(float(row[-2]) > 0 for row in rows)


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--no-replay"]])
def test_lightning_hooks_benchmark_runs(extra: list[str]) -> None:
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "lightning_hooks.py"),
                             "--steps", "330", *extra], capture_output=True, text=True,
                            timeout=300, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert ("replay_nonfinite=False" in lines[0]) == bool(extra)
    hooks = [line.split() for line in lines if line.startswith("  on_")]
    assert len(hooks) == 5 and all(float(row[-1]) > 0 for row in hooks)
    assert any(line.startswith("the same calls warm") for line in lines)
    assert any(line.startswith("findings: ") for line in lines)


def test_gpu_check_rejects_a_model_name_it_does_not_have() -> None:
    from benchmarks.gpu_check import chosen_models

    assert [name.split()[1] for name in chosen_models("mlp")] == ["MLP"]
    with pytest.raises(SystemExit, match="'mpl'.*names no model; allowed: mlp, transformer"):
        chosen_models("mlp,mpl")
