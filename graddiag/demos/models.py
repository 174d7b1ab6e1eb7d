"""Bundled models for demos, configs and tests: a configurable deep MLP."""

from __future__ import annotations

import math
from typing import Literal

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

ActivationName = Literal["sigmoid", "tanh", "relu", "leaky_relu", "elu", "gelu", "silu"]
InitName = Literal["default", "xavier", "kaiming", "normal"]
OptimizerName = Literal["sgd", "adam"]

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
}
_GAIN_NONLINEARITY = {"sigmoid": "sigmoid", "tanh": "tanh", "relu": "relu",
                      "leaky_relu": "leaky_relu"}


def _choice(option: str, value: str, allowed: object) -> None:
    if value not in allowed:  # type: ignore[operator]
        raise ValueError(f"{option} must be one of {sorted(allowed)}, got {value!r}")  # type: ignore[call-overload]


def build_mlp(
    in_features: int,
    out_features: int,
    *,
    depth: int,
    width: int,
    activation: str = "relu",
    init: str = "default",
    init_std: float = 1.0,
    bias_init: float = 0.0,
) -> nn.Sequential:
    """``depth`` hidden ``Linear + activation`` blocks and a linear head.

    Args:
        init: ``default`` (PyTorch's), ``xavier`` (normal, gain for the activation),
            ``kaiming`` (normal, fan-in) or ``normal`` (N(0, init_std^2)).
        init_std: Standard deviation for ``init="normal"``.
        bias_init: Constant bias of the hidden layers (PyTorch's default bias is kept when this
            is 0 and ``init="default"``).
    """
    _choice("activation", activation, ACTIVATIONS)
    _choice("init", init, {"default", "xavier", "kaiming", "normal"})
    if depth < 1 or width < 1:
        raise ValueError(f"depth and width must be >= 1, got depth={depth!r}, width={width!r}")
    layers: list[nn.Module] = []
    features = in_features
    for _ in range(depth):
        linear = nn.Linear(features, width)
        _initialise(linear, init, activation, init_std)
        if bias_init or init != "default":
            nn.init.constant_(linear.bias, bias_init)
        layers += [linear, ACTIVATIONS[activation]()]
        features = width
    head = nn.Linear(features, out_features)
    if init != "default":
        _initialise(head, init, "linear", init_std)
        nn.init.zeros_(head.bias)
    layers.append(head)
    return nn.Sequential(*layers)


def _initialise(linear: nn.Linear, init: str, activation: str, std: float) -> None:
    if init == "xavier":
        gain = nn.init.calculate_gain(_GAIN_NONLINEARITY.get(activation, "linear"))  # type: ignore[arg-type]
        nn.init.xavier_normal_(linear.weight, gain=gain)
    elif init == "kaiming":
        nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
    elif init == "normal":
        nn.init.normal_(linear.weight, std=std)


class Classifier(pl.LightningModule):
    """Cross-entropy training and validation shared by the bundled models."""

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(-1) == y).float().mean(), prog_bar=True)


class DeepMLP(Classifier):
    """A classifier MLP whose depth, activation and initialisation are options.

    Args:
        in_features: Input size (64 for the digits data).
        num_classes: Number of classes.
        depth: Hidden layers.
        width: Units per hidden layer.
        activation: Hidden activation.
        init: Weight initialisation (``default``, ``xavier``, ``kaiming``, ``normal``).
        init_std: Weight standard deviation for ``init="normal"``.
        bias_init: Constant bias of the hidden layers.
        optimizer: ``sgd`` or ``adam``.
        lr: Learning rate.
    """

    def __init__(
        self,
        in_features: int = 64,
        num_classes: int = 10,
        depth: int = 4,
        width: int = 64,
        activation: ActivationName = "relu",
        init: InitName = "default",
        init_std: float = 1.0,
        bias_init: float = 0.0,
        optimizer: OptimizerName = "adam",
        lr: float = 1e-3,
    ) -> None:
        super().__init__()
        _choice("optimizer", optimizer, {"sgd", "adam"})
        if not (lr > 0 and math.isfinite(lr)):
            raise ValueError(f"lr must be a positive number, got {lr!r}")
        self.save_hyperparameters()
        self.net = build_mlp(in_features, num_classes, depth=depth, width=width,
                             activation=activation, init=init, init_std=init_std,
                             bias_init=bias_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.hparams["optimizer"] == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.hparams["lr"], momentum=0.9)
        return torch.optim.Adam(self.parameters(), lr=self.hparams["lr"])


EstimatorName = Literal["argmax", "straight_through", "gumbel"]


class RoutedMLP(Classifier):
    """An MLP whose hidden features are gated by a hard, discrete choice made by a ``router``.

    With ``estimator="argmax"`` the router's choice goes through ``argmax``, which has no
    gradient: the router never learns (graddiag reports ``no_gradient``). ``straight_through``
    uses the hard one-hot choice forward and the softmax's gradient backward;
    ``gumbel`` uses ``F.gumbel_softmax(hard=True)``. Both let the router learn.

    Args:
        in_features: Input size.
        num_classes: Classes.
        width: Hidden units.
        groups: Number of feature groups the router chooses between.
        estimator: How the discrete choice is made differentiable (or not).
        lr: Adam learning rate.
    """

    def __init__(
        self,
        in_features: int = 64,
        num_classes: int = 10,
        width: int = 64,
        groups: int = 4,
        estimator: EstimatorName = "argmax",
        lr: float = 1e-3,
    ) -> None:
        super().__init__()
        _choice("estimator", estimator, {"argmax", "straight_through", "gumbel"})
        if width % groups:
            raise ValueError(f"width must be divisible by groups, got width={width}, groups={groups}")
        self.save_hyperparameters()
        self.encoder = nn.Linear(in_features, width)
        self.router = nn.Linear(in_features, groups)
        self.head = nn.Linear(width, num_classes)

    def choice(self, x: torch.Tensor) -> torch.Tensor:
        """One-hot group choice per sample, ``(batch, groups)``."""
        logits = self.router(x)
        if self.hparams["estimator"] == "gumbel":
            return F.gumbel_softmax(logits, tau=1.0, hard=True)
        hard = F.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)
        if self.hparams["estimator"] == "straight_through":
            soft = logits.softmax(-1)
            return soft + (hard - soft).detach()  # forward: hard; backward: softmax's gradient
        return hard

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.encoder(x))
        groups = self.hparams["groups"]
        gate = self.choice(x).repeat_interleave(h.shape[-1] // groups, dim=-1)
        return self.head(h * (0.5 + gate))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams["lr"])
