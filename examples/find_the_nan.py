"""Find the operation and the line that produced the first NaN.

Two classic ways for training to turn NaN, and what graddiag says about each:

1. A plain PyTorch loop: a classifier whose softmax is written by hand (``exp / sum``) trains
   with a learning rate that is too high. Its logits grow until ``exp`` overflows to inf, and
   ``inf / inf`` is NaN. ``monitor.step(replay=...)`` gets the step's loss as a closure; when
   the ``nonfinite`` finding begins, graddiag re-runs that step under checks and names
   ``torch.exp`` and the line below.
2. Lightning: one batch of the data holds a NaN pixel. The callback keeps each batch and
   replays ``training_step`` by itself; the finding says the NaN is in the data, not in the
   model.

    python examples/find_the_nan.py [--steps N]
"""

from __future__ import annotations

import argparse
import logging

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from graddiag import GradientDiagnostics, GradientMonitor
from graddiag.demos.data import digits_tensors
from graddiag.demos.models import build_mlp


def softmax(logits: torch.Tensor) -> torch.Tensor:
    """A softmax written by hand, without subtracting the maximum first."""
    e = torch.exp(logits)
    return e / e.sum(dim=1, keepdim=True)


def plain_loop(steps: int) -> GradientMonitor:
    """Train until the hand-written softmax overflows; stop at the first non-finite gradient."""
    torch.manual_seed(0)
    x, y = digits_tensors()
    model = build_mlp(64, 10, depth=3, width=64, activation="relu", init="kaiming")
    optimizer = torch.optim.SGD(model.parameters(), lr=2.0)
    with GradientMonitor(model, reporters=[], on_nonfinite="stop") as monitor:
        for _ in range(steps):
            idx = torch.randint(0, len(x), (64,))
            xb, yb = x[idx], y[idx]

            def loss_fn() -> torch.Tensor:
                return F.nll_loss(torch.log(softmax(model(xb))), yb)  # noqa: B023 - this step

            optimizer.zero_grad()
            loss_fn().backward()
            report = monitor.step(replay=loss_fn)  # loss_fn runs again only on a NaN onset
            if report.should_stop:
                break
            optimizer.step()
    return monitor


class DigitsClassifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = build_mlp(64, 10, depth=2, width=32, activation="relu", init="kaiming")

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def lightning_run(steps: int) -> GradientDiagnostics:
    """Train on digits where one image of the fourth batch has a missing (NaN) pixel."""
    pl.seed_everything(0, verbose=False)
    x, y = digits_tensors()
    x = x.clone()
    x[3 * 32 + 5, 17] = float("nan")  # batch 3, image 5
    loader = DataLoader(TensorDataset(x, y), batch_size=32)
    diagnostics = GradientDiagnostics(on_nonfinite="skip", print_summary=False,
                                      progress_bar=False)
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[diagnostics])
    trainer.fit(DigitsClassifier(), loader)
    return diagnostics


def main(argv: list[str] | None = None) -> dict[str, list]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args(argv)
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    monitor = plain_loop(args.steps)
    diagnostics = lightning_run(min(args.steps, 8))
    results = {"plain": monitor.findings, "lightning": diagnostics.findings}
    for name, findings in results.items():
        print(f"--- {name}")
        for finding in findings:
            if finding.kind == "nonfinite":
                print(finding)
    return results


if __name__ == "__main__":
    main()
