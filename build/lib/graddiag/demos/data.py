"""Bundled data: scikit-learn's digits (shipped with scikit-learn, no download) and synthetic sets."""

from __future__ import annotations

from typing import Literal

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset


def digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1,797 8x8 digit images as ``(x, y)``: x in [0, 1] with 64 features, y in 0..9."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y, dtype=torch.long)


def _split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * val_fraction))
    return order[n_val:], order[:n_val]


class _TensorDataModule(pl.LightningDataModule):
    def __init__(self, batch_size: int, val_fraction: float, seed: int) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.seed = seed
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def _tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        x, y = self._tensors()
        train, val = _split(len(x), self.val_fraction, self.seed)
        self.train_set = TensorDataset(x[train], y[train])
        self.val_set = TensorDataset(x[val], y[val])

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True,
                          generator=generator)

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None
        return DataLoader(self.val_set, batch_size=max(self.batch_size, 256))


class DigitsDataModule(_TensorDataModule):
    """scikit-learn's bundled digits, split into train/validation with a fixed seed.

    Args:
        batch_size: Training batch size.
        val_fraction: Fraction of the 1,797 images held out for validation.
        seed: Seed of the split and the shuffling.
    """

    def __init__(self, batch_size: int = 64, val_fraction: float = 0.2, seed: int = 0) -> None:
        super().__init__(batch_size, val_fraction, seed)

    def _tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return digits_tensors()


class SyntheticDataModule(_TensorDataModule):
    """Random Gaussian inputs with a fixed random linear teacher.

    Args:
        task: ``classification`` (argmax of the teacher) or ``regression`` (its output).
        samples: Number of samples.
        in_features: Input size.
        num_classes: Classes (classification) or outputs (regression).
        batch_size: Training batch size.
        val_fraction: Held-out fraction.
        seed: Seed of the data, the split and the shuffling.
    """

    def __init__(
        self,
        task: Literal["classification", "regression"] = "classification",
        samples: int = 1024,
        in_features: int = 64,
        num_classes: int = 10,
        batch_size: int = 64,
        val_fraction: float = 0.2,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, val_fraction, seed)
        if task not in ("classification", "regression"):
            raise ValueError(f"task must be 'classification' or 'regression', got {task!r}")
        self.task = task
        self.samples = samples
        self.in_features = in_features
        self.num_classes = num_classes

    def _tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed)
        x = torch.randn(self.samples, self.in_features, generator=g)
        teacher = torch.randn(self.in_features, self.num_classes, generator=g)
        out = x @ teacher
        return (x, out.argmax(-1)) if self.task == "classification" else (x, out)
