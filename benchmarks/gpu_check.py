"""GPU checks that CPU CI cannot run: fp16 AMP on CUDA, Lightning's FSDP strategy, host syncs.

    python benchmarks/gpu_check.py        # exits 0 with "skipped" when no CUDA device is present

Checks, each printed as PASS/FAIL:
1. fp16 AMP (16-mixed, CUDA GradScaler): recorded norms equal an fp32 reference on step 0
   within 2 %, never x loss scale; overflow steps are AMP overflow, not alarms.
2. Fused Adam under fp16 AMP: gradients still scaled at on_before_optimizer_step are unscaled
   on device (norms within 2 % of the reference).
3. Host syncs: a step measured in full performs exactly one device-to-host copy
   (``torch.cuda.set_sync_debug_mode`` counts synchronising calls).
4. Lightning FSDP (2 GPUs if present, else 1): a run records finite per-layer norms.
5. Plain steps kept in blocks on the GPU, read on the step or (the default with warn-only
   actions) sent to the host a block at a time, record the norms and findings of every step
   measured in full, equal to a float64 recomputation, with no sync on a kept step;
   ``on_nonfinite="skip"`` still decides on the step itself.

A check that raises is reported as FAIL with its error, and the others still run.

Then the overhead table (as ``benchmarks/overhead.py`` on a CPU: mean step time over plain
training's, configurations interleaved in blocks of 20 steps with a device sync at block
boundaries, A/A control): hand-written loop and Lightning, a launch-bound small model (MLP
20x256, batch 64) and a compute-bound Transformer (12 layers, d=512, batch 64 x 64 tokens),
fp32 and bf16. Target on the launch-bound model: graddiag defaults <= floor + 0.03. A second
floor reads the norms on the host every step, as any tool deciding on the step itself must.

    python benchmarks/gpu_check.py --no-overhead   # the checks only
    python benchmarks/gpu_check.py --json gpu.json # also write the table's numbers
    python benchmarks/gpu_check.py --table gpu.json  # that run as the README's markdown table
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from graddiag import GradientDiagnostics, GradientMonitor  # noqa: E402
from graddiag.demos.data import DigitsDataModule  # noqa: E402
from graddiag.demos.models import DeepMLP  # noqa: E402

FAILURES: list[str] = []


def check(name: str, ok: bool, detail: str = "") -> None:
    print(f"{'PASS' if ok else 'FAIL'}  {name}  {detail}")
    if not ok:
        FAILURES.append(name)


def first_step_norms(precision: str, fused: bool = False) -> list[float]:
    class Model(DeepMLP):
        def configure_optimizers(self):  # noqa: ANN201
            return torch.optim.Adam(self.parameters(), lr=1e-3, fused=fused)

    pl.seed_everything(0, verbose=False)
    cb = GradientDiagnostics(print_summary=False, progress_bar=False)
    trainer = pl.Trainer(accelerator="cuda", devices=1, precision=precision, max_steps=3,
                         callbacks=[cb], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Model(depth=4, width=64), DigitsDataModule(batch_size=64))
    h = cb.history
    return h[h.step == 0].grad_norm.tolist()


def sync_count(deferred: bool) -> tuple[int, int]:
    """Host copies and synchronising calls in one recorded step (after a warm-up step)."""
    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(8)]).cuda()
    monitor = GradientMonitor(model, reporters=[], activation_every_n_steps=0,
                              param_every_n_steps=0, evaluate_every_n_records=1)
    monitor.deferred_host_read = deferred
    model(torch.randn(32, 64, device="cuda")).sum().backward()
    monitor.step()  # warm-up: index tensors, first layout
    model(torch.randn(32, 64, device="cuda")).sum().backward()
    torch.cuda.synchronize()
    import graddiag.measure.transfer as transfer

    copies = []
    name = "_start_copy_to_host" if deferred else "_copy_to_host"
    real = getattr(transfer, name)
    setattr(transfer, name, lambda t: copies.append(1) or real(t))
    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor.step()
    torch.cuda.set_sync_debug_mode(0)
    setattr(transfer, name, real)
    monitor.close()
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    return len(copies), len(syncs)


def fsdp_norms(devices: int) -> list[float]:
    pl.seed_everything(0, verbose=False)
    reference = DeepMLP(depth=3, width=64)
    cb = GradientDiagnostics(print_summary=False, progress_bar=False)
    trainer = pl.Trainer(accelerator="cuda", devices=devices, strategy="fsdp", max_steps=1,
                         callbacks=[cb], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    model = DeepMLP(depth=3, width=64)
    model.load_state_dict(reference.state_dict())
    trainer.fit(model, DigitsDataModule(batch_size=64))
    return cb.history.grad_norm.tolist()


def _backward_with_nan(model: nn.Module, step: int, nan_step: int = 2,
                       missing: tuple[int, ...] = ()) -> None:
    """One training step's backward pass on CUDA; ``nan_step`` gets a NaN in the second
    layer; on the ``missing`` steps the last layer's bias gets no gradient."""
    model.zero_grad()
    g = torch.Generator(device="cuda").manual_seed(step)
    model(torch.randn(32, 64, device="cuda", generator=g)).square().mean().backward()
    if step == nan_step:
        model[2].weight.grad[0, 0] = float("nan")
    if step in missing:
        model[4].bias.grad = None


def _layer_norms(model: nn.Module) -> list[float]:
    """Each Linear layer's gradient 2-norm, in float64, computed here independently."""
    return [float(torch.linalg.vector_norm(torch.cat([p.grad.double().flatten()
                                                      for p in m.parameters()
                                                      if p.grad is not None])))
            for m in model if isinstance(m, nn.Linear)]


def device_reads_match_reference() -> tuple[bool, str]:
    """Three identical models and batch streams: every step read in full on the step, plain
    steps kept in blocks read on the step (``deferred_host_read=False``), and the CUDA default
    (blocks sent to the host in one copy, a step late). Equal norms, equal to a float64
    recomputation, the same finding; no sync on the default's kept steps, also where a
    gradient goes missing (steps 4-5)."""
    models = []
    for _ in range(3):
        torch.manual_seed(0)
        models.append(nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                                    nn.Linear(64, 8)).cuda())
    monitors = [GradientMonitor(m, reporters=[], early_steps=0, activation_every_n_steps=0,
                                evaluate_every_n_records=n) for m, n in zip(models, (1, 8, 8))]
    monitors[0].deferred_host_read = monitors[1].deferred_host_read = False
    reference, syncs = [], 0
    for step in range(20):
        for model in models:
            _backward_with_nan(model, step, nan_step=10, missing=(4, 5))
        reference.append(_layer_norms(models[0]))
        monitors[0].step()
        monitors[1].step()
        quiet = 2 <= step <= 9  # kept steps of the first block, its sending and its reading
        if quiet:
            torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            monitors[2].step()
        torch.cuda.set_sync_debug_mode(0)
        syncs += sum("synchroniz" in str(w.message).lower() for w in caught) if quiet else 0
    records = [m.records for m in monitors]
    found = [[(f.kind, f.step) for f in m.findings] for m in monitors]
    for m in monitors:
        m.close()
    same = all(len(r) == 20 for r in records) and all(
        np.allclose(a.grad_norm, b.grad_norm, rtol=1e-6, equal_nan=True)
        and a.missing == b.missing for other in records[1:] for a, b in zip(records[0], other))
    same = same and records[2][4].missing == {2: ["bias"]}
    worst = max(abs(a - b) / b for record, ref in zip(records[2], reference)
                for a, b in zip(record.grad_norm, ref) if b == b and a == a)
    ok = (same and worst < 1e-5 and found[0] == found[1] == found[2]
          and ("nonfinite", 10) in found[0] and syncs == 0)
    return ok, (f"records equal: {same}; max rel err to float64 {worst:.1e}; findings "
                f"{found[0]} / {found[1]} / {found[2]}; syncs on kept steps {syncs}")


def skip_decides_on_the_step() -> tuple[bool, str]:
    """``on_nonfinite="skip"`` on CUDA: the NaN step's own report says skip."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 8)).cuda()
    monitor = GradientMonitor(model, reporters=[], on_nonfinite="skip", early_steps=0,
                              activation_every_n_steps=0)
    actions = []
    for step in range(4):
        _backward_with_nan(model, step)
        actions.append(monitor.step().action)
    monitor.close()
    return actions == ["continue", "continue", "skip", "continue"], f"actions {actions}"


def run_check(name: str, fn: Callable[[], tuple[bool, str]]) -> None:
    """``check`` on ``fn``'s verdict; an error is a failure with its message, not the end."""
    try:
        ok, detail = fn()
    except Exception as error:  # noqa: BLE001 - report, do not hide
        traceback.print_exc()
        ok, detail = False, repr(error)
    check(name, ok, detail)


def _transformer() -> nn.Module:
    from benchmarks.harness import Transformer

    return Transformer(layers=12, d_model=512, in_features=64 * 64, tokens=64)


def _mlp() -> nn.Module:
    from benchmarks.harness import mlp

    return mlp()


#: name -> (model builder, batch size, input features)
MODELS: dict[str, tuple[Callable[[], nn.Module], int, int]] = {
    "launch-bound MLP 20x256, batch 64": (_mlp, 64, 256),
    "compute-bound Transformer 12 x d512, batch 64": (_transformer, 64, 64 * 64),
}


def chosen_models(words: str) -> dict[str, Any]:
    """The models of :data:`MODELS` whose names contain one of the comma-separated ``words``
    (``--models``); a word that names none is an error."""
    chosen = [word.strip().lower() for word in words.split(",") if word.strip()]
    unknown = [word for word in chosen if not any(word in name.lower() for name in MODELS)]
    if unknown or not chosen:
        raise SystemExit(f"gpu_check.py: error: --models {words!r}: {unknown or 'nothing'} "
                         "names no model; allowed: mlp, transformer")
    return {name: spec for name, spec in MODELS.items()
            if any(word in name.lower() for word in chosen)}


def overhead_table(steps: int, models: dict[str, Any],
                   json_path: Path | None = None) -> dict[str, Any]:
    """The overhead table on this GPU (see the module docstring); each group's numbers are
    also written to ``json_path`` as soon as they are measured."""
    from benchmarks.harness import (
        AA,
        DEFAULTS,
        EVERY10,
        FLOOR,
        FLOOR_READ,
        PLAIN,
        measure_lightning,
        measure_loop,
        ratios,
    )

    for name in ("pytorch_lightning", "lightning.pytorch", "graddiag"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    loop_configs = [PLAIN, AA, FLOOR, FLOOR_READ, DEFAULTS, EVERY10]
    lightning_configs = [PLAIN, AA, FLOOR, FLOOR_READ, DEFAULTS, EVERY10,
                         "graddiag, figure only at the end",
                         "graddiag, activations and parameters off",
                         "graddiag, replay_nonfinite=False",
                         "Lightning grad_norm + log_dict every step"]
    device = "cuda"
    card = torch.cuda.get_device_name()
    results: dict[str, Any] = {"device": card, "torch": torch.__version__, "steps": steps,
                               "groups": {}}
    print(f"\nOverhead on {card} (torch {torch.__version__}); mean step time over plain's, "
          f"{steps} timed steps per configuration, blocks of 20 steps interleaved, device sync "
          "at block boundaries")
    for model_name, (fn, batch, features) in models.items():
        for dtype_name, autocast, precision in (("fp32", None, "32-true"),
                                                ("bf16", torch.bfloat16, "bf16-mixed")):
            groups = {
                "hand-written loop": functools.partial(
                    measure_loop, fn, steps, block=20, device=device, autocast=autocast,
                    configs=loop_configs, batch_size=batch, features=features),
                "Lightning, log_every_n_steps=10": functools.partial(
                    measure_lightning, fn, lightning_configs, steps, block=20,
                    accelerator=device, precision=precision, batch_size=batch,
                    features=features),
            }
            for group, run in groups.items():
                title = f"{model_name}, {dtype_name}, {group}"
                began = time.perf_counter()
                try:
                    stats = run()
                except Exception as error:  # noqa: BLE001 - one group's failure, not the table's
                    traceback.print_exc()
                    print(f"  -- {title}: FAILED {error!r}")
                    results["groups"][title] = {"error": repr(error)}
                    continue
                rows = ratios(stats)
                print(f"  -- {title} (plain {stats[PLAIN]['mean'] * 1e3:.2f} ms/step; measured "
                      f"in {time.perf_counter() - began:.0f} s)")
                for config, row in rows.items():
                    print(f"  {config:<52} mean {row['mean']:.3f}  median {row['median']:.3f}")
                if "launch-bound" in model_name:
                    floor, got = rows[FLOOR]["mean"], rows[DEFAULTS]["mean"]
                    print(f"  target: defaults {got:.3f} <= floor {floor:.3f} + 0.03 -> "
                          f"{'met' if got <= floor + 0.03 else 'MISSED'}; every_n_steps=10 "
                          f"{rows[EVERY10]['mean']:.3f}; A/A {rows[AA]['mean']:.3f}")
                results["groups"][title] = {"plain_ms": stats[PLAIN]["mean"] * 1e3,
                                            "ratios": rows}
                if json_path is not None:
                    json_path.write_text(json.dumps(results, indent=2))
    return results


#: The table's columns: (heading, configuration name in the results)
TABLE_COLUMNS = [
    ("A/A", "plain again (A/A control)"),
    ("floor", "floor: one _foreach_norm per step"),
    ("floor + host read", "floor + one host read per step"),
    ("defaults", "graddiag defaults"),
    ("`every_n_steps=10`", "graddiag every_n_steps=10"),
    ("figure only at end", "graddiag, figure only at the end"),
    ("act./param. off", "graddiag, activations and parameters off"),
    ("`replay_nonfinite=False`", "graddiag, replay_nonfinite=False"),
    ("Lightning `grad_norm`", "Lightning grad_norm + log_dict every step"),
]


def markdown_table(results: dict[str, Any]) -> str:
    """The overhead table of a ``--json`` output as the README's markdown: one row per model,
    dtype and loop (mean ratios, plain ms/step in the first column), defaults in bold."""
    lines = ["| mean ratio (plain ms/step) | " + " | ".join(h for h, _ in TABLE_COLUMNS) + " |",
             "|---|" + "---|" * len(TABLE_COLUMNS)]
    for title, group in results["groups"].items():  # "<model>, <dtype>, <loop>"
        dtype = next(d for d in ("fp32", "bf16") if f", {d}, " in title)
        model, loop = title.split(f", {dtype}, ", 1)
        label = (f"{model.split()[1]} {dtype}, "
                 f"{'loop' if loop.startswith('hand-written') else 'Lightning'}")
        if "error" in group:
            lines.append(f"| {label} | failed: {group['error']} |")
            continue
        cells = []
        for _, name in TABLE_COLUMNS:
            row = group["ratios"].get(name)
            value = "" if row is None else f"{row['mean']:.3f}"
            cells.append(f"**{value}**" if value and name == "graddiag defaults" else value)
        lines.append(f"| {label} ({group['plain_ms']:.2f}) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="graddiag GPU checks and overhead table")
    parser.add_argument("--no-overhead", action="store_true", help="skip the overhead table")
    parser.add_argument("--steps", type=int, default=200,
                        help="timed steps per configuration in the overhead table")
    parser.add_argument("--json", type=Path, default=None,
                        help="write the overhead table's numbers to this file")
    parser.add_argument("--models", default="mlp,transformer",
                        help="the overhead table's models, comma-separated: mlp, transformer")
    parser.add_argument("--table", type=Path, default=None,
                        help="print the README's markdown table of a --json output and exit "
                             "(no GPU needed)")
    args = parser.parse_args(argv)
    if args.table is not None:
        print(markdown_table(json.loads(args.table.read_text())), end="")
        return 0
    if not torch.cuda.is_available():
        print("no CUDA device: GPU checks and overhead table skipped")
        return 0
    print(f"GPU checks on {torch.cuda.get_device_name()} (torch {torch.__version__}, "
          f"Lightning {pl.__version__})")
    fp32 = first_step_norms("32-true")

    def unscaled(fused: bool) -> tuple[bool, str]:
        norms = first_step_norms("16-mixed", fused=fused)
        rel = max(abs(a - b) / b for a, b in zip(norms, fp32))
        return len(norms) == len(fp32) > 0 and rel < 0.02, f"max rel err {rel:.2e}"

    run_check("fp16 AMP norms equal fp32 reference (unscaled)", lambda: unscaled(False))
    run_check("fused Adam under fp16 AMP is unscaled on device", lambda: unscaled(True))

    def syncs(deferred: bool) -> tuple[bool, str]:
        copies, calls = sync_count(deferred=deferred)
        return copies == 1 and calls <= 1, f"copies={copies} synchronising calls={calls}"

    run_check("one device-to-host copy and no other sync per recorded step",
              lambda: syncs(False))
    run_check("deferred read (default on CUDA, warn-only): one non-blocking copy per step, at "
              "most the wait on the previous step's copy event", lambda: syncs(True))

    def fsdp() -> tuple[bool, str]:
        norms = fsdp_norms(min(2, torch.cuda.device_count()))
        return len(norms) > 0 and all(n == n and n < float("inf") for n in norms), \
            f"{len(norms)} rows"

    run_check("Lightning FSDP run records finite per-layer norms", fsdp)
    run_check("kept steps on the GPU (read on the step, or sent in blocks): same norms and "
              "findings as every step read in full", device_reads_match_reference)
    run_check("on_nonfinite='skip' decides on the step itself", skip_decides_on_the_step)
    print("FAILED: " + ", ".join(FAILURES) if FAILURES else "all GPU checks passed")
    if not args.no_overhead:
        overhead_table(args.steps, chosen_models(args.models), json_path=args.json)
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
