"""The activation study: measured evidence of the vanishing-gradient effect.

Trains sigmoid, tanh and ReLU MLPs (PyTorch's default initialisation, Adam) at several depths on
the digits data and records, per network, the median over training of the first layer's
gradient norm divided by the last layer's, and the validation accuracy reached.

    graddiag study [--depths 2 4 8 16] [--steps 300] [--out docs]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from graddiag.demos.data import digits_tensors
from graddiag.demos.models import build_mlp
from graddiag.pipeline.monitor import GradientMonitor

ACTIVATIONS = ("sigmoid", "tanh", "relu")


def run_study(depths: list[int], steps: int, seed: int = 0, width: int = 64,
              batch_size: int = 64, lr: float = 1e-3) -> pd.DataFrame:
    """One row per (activation, depth): gradient ratio first/last layer, accuracy, findings."""
    x, y = digits_tensors()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    val, train = order[:360], order[360:]
    rows = []
    for activation in ACTIVATIONS:
        for depth in depths:
            torch.manual_seed(seed)
            model = build_mlp(64, 10, depth=depth, width=width, activation=activation)
            optimizer = torch.optim.Adam(model.parameters(), lr=lr)
            g = torch.Generator().manual_seed(seed)
            with GradientMonitor(model, reporters=[], activation_every_n_steps=0,
                                 param_every_n_steps=0) as monitor:
                for _ in range(steps):
                    idx = train[torch.randint(0, len(train), (batch_size,), generator=g)]
                    loss = F.cross_entropy(model(x[idx]), y[idx])
                    optimizer.zero_grad()
                    loss.backward()
                    monitor.step()
                    optimizer.step()
            h = monitor.history
            wide = h.pivot(index="step", columns="position", values="grad_norm")
            ratio = (wide.iloc[:, 0] / wide.iloc[:, -1]).median()
            with torch.no_grad():
                accuracy = (model(x[val]).argmax(-1) == y[val]).float().mean().item()
            rows.append({
                "activation": activation,
                "depth": depth,
                "first_to_last_grad_ratio": float(ratio),
                "val_accuracy": accuracy,
                "findings": ", ".join(sorted({f.kind for f in monitor.findings})) or "none",
            })
    return pd.DataFrame(rows)


def study_figure(table: pd.DataFrame) -> Figure:
    """Ratio (log scale) and accuracy against depth, one line per activation."""
    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    ratio_ax, acc_ax = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for activation, group in table.groupby("activation", sort=False):
        ratio_ax.plot(group.depth, group.first_to_last_grad_ratio, "-o", label=activation)
        acc_ax.plot(group.depth, group.val_accuracy, "-o", label=activation)
    ratio_ax.set_yscale("log")
    ratio_ax.set_xscale("log", base=2)
    acc_ax.set_xscale("log", base=2)
    ratio_ax.set_xlabel("hidden layers")
    acc_ax.set_xlabel("hidden layers")
    ratio_ax.set_ylabel("first / last layer gradient norm (median)")
    acc_ax.set_ylabel("validation accuracy")
    ratio_ax.set_title("Gradient reaching the first layer")
    acc_ax.set_title("Accuracy reached")
    for ax in (ratio_ax, acc_ax):
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="graddiag study", description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 4, 8, 16])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path("docs"))
    args = parser.parse_args(argv)
    if any(d < 1 for d in args.depths) or args.steps < 1:
        parser.error(f"--depths and --steps must be >= 1, got {args.depths} and {args.steps}")
    table = run_study(args.depths, args.steps)
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "activation_study.csv", index=False)
    study_figure(table).savefig(args.out / "activation_study.png")
    with pd.option_context("display.float_format", "{:.3g}".format, "display.width", 120):
        print(table.to_string(index=False))
    print(f"\nWrote {args.out / 'activation_study.csv'} and {args.out / 'activation_study.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())



