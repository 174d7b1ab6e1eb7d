"""Real sources of NaN/Inf, written the way users write them, for the replay tests.

Each culprit line is found by the tests with ``inspect`` (never by a hard-coded number).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def line_of(obj: object, text: str) -> tuple[str, int]:
    """``(file, line)`` of the only line of ``obj``'s source that contains ``text``."""
    lines, start = inspect.getsourcelines(obj)  # type: ignore[arg-type]
    hits = [start + i for i, line in enumerate(lines) if text in line]
    assert len(hits) == 1, f"{text!r} found on lines {hits}"
    return inspect.getsourcefile(obj), hits[0]  # type: ignore[arg-type,return-value]


# --------------------------------------------------------------------------- log(0)
def bce_by_hand(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    p = torch.sigmoid(logits)
    return -(target * torch.log(p) + (1 - target) * torch.log1p(-p)).mean()


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).squeeze(-1)


# --------------------------------------------------------------------------- sqrt at 0
def euclidean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(((a - b) ** 2).sum(-1))


class Prototypes(nn.Module):
    """Distances from embeddings to learned prototypes (a prototype network's head)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 3)
        self.centres = nn.Parameter(torch.zeros(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.embed(x)
        return euclidean(z[:, None, :], self.centres[None])


# --------------------------------------------------------------------------- exp overflow
def softmax_by_hand(logits: torch.Tensor) -> torch.Tensor:
    e = torch.exp(logits)
    return e / e.sum(-1, keepdim=True)


class SoftmaxHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return softmax_by_hand(self.fc(x))


# --------------------------------------------------------------------------- 0 / 0
def normalise(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True)


class Encoder(nn.Module):
    """Features projected onto the unit sphere; a zero padding row has norm 0."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 8, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return normalise(self.fc(x))


# --------------------------------------------------------------------------- custom backward
class SafeInverse(torch.autograd.Function):
    """1/x with a guarded forward, but a backward that forgot the guard: inf at x = 0."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(x)
        return 1.0 / x.clamp_min(1e-3)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        (x,) = ctx.saved_tensors
        return -grad / x**2


class InverseFeatures(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        return SafeInverse.apply(h)


# --------------------------------------------------------------------------- fp16 attention
class Attention(nn.Module):
    """Single-head attention without the 1/sqrt(d) scale: logits overflow in float16."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q(x), self.k(x), self.v(x)
        logits = q @ k.transpose(-2, -1)
        return torch.softmax(logits, dim=-1) @ v


class MaskedAttention(nn.Module):
    """Attention over padded sequences; a sequence that is all padding has no softmax."""

    def __init__(self, dim: int = 4) -> None:
        super().__init__()
        self.q = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        scores = self.q(x) @ x.transpose(-2, -1)
        scores = scores.masked_fill(padding[:, None, :], float("-inf"))
        return torch.softmax(scores, dim=-1) @ self.v(x)


def attention_loss(model: Attention, x: torch.Tensor) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.float16):
        return model(x).float().pow(2).mean()


# --------------------------------------------------------------------------- plain MLP
class MLP(nn.Module):
    def __init__(self, dropout: float = 0.0, batchnorm: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.norm = nn.BatchNorm1d(8) if batchnorm else nn.Identity()
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(self.drop(torch.relu(self.norm(h))))


def cross_entropy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


# --------------------------------------------------------------------------- the table
@dataclass
class Source:
    """A real source of NaN/Inf: a model, one batch, the loss, and where the culprit is."""

    model: nn.Module
    batch: tuple[torch.Tensor, ...]
    loss: Callable[[nn.Module, tuple[torch.Tensor, ...]], torch.Tensor]
    culprit: object
    text: str
    op: str
    phase: str


def _log_of_zero() -> Source:
    model = Classifier()
    with torch.no_grad():
        model.fc.bias.fill_(-200.0)
    batch = (torch.randn(16, 4), (torch.arange(16) % 2).float())
    return Source(model, batch, lambda m, b: bce_by_hand(m(b[0]), b[1]), bce_by_hand,
                  "torch.log(", "torch.log", "forward")


def _sqrt_at_zero() -> Source:
    model = Prototypes()
    with torch.no_grad():
        model.embed.weight.zero_()
        model.embed.bias.zero_()
    return Source(model, (torch.randn(5, 4),), lambda m, b: m(b[0]).mean(), euclidean,
                  "torch.sqrt(", "torch.sqrt", "backward")


def _exp_overflow() -> Source:
    model = SoftmaxHead()
    with torch.no_grad():
        model.fc.weight.mul_(100.0)
    return Source(model, (torch.randn(8, 4), torch.rand(8, 3)),
                  lambda m, b: (m(b[0]) - b[1]).pow(2).mean(), softmax_by_hand, "torch.exp(",
                  "torch.exp", "forward")


def _zero_norm() -> Source:
    x = torch.randn(6, 4)
    x[2] = 0.0
    return Source(Encoder(), (x,), lambda m, b: m(b[0]).sum(-1).mean(), normalise, "v / v.norm",
                  "Tensor.div", "forward")


def _custom_backward() -> Source:
    x = torch.randn(4, 4)
    x[1] = 0.0
    return Source(InverseFeatures(), (x,), lambda m, b: m(b[0]).mean(), InverseFeatures.forward,
                  "SafeInverse.apply(", "SafeInverse.apply", "backward")


def _half_attention() -> Source:
    model = Attention(16)
    with torch.no_grad():
        for layer in (model.q, model.k):
            layer.weight.copy_(torch.eye(16) * 10)
    return Source(model, (torch.full((2, 3, 16), 10.0),),
                  lambda m, b: attention_loss(m, b[0]), Attention.forward, "logits = q @ k",
                  "Tensor.matmul", "forward")


def _nan_in_batch() -> Source:
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    x[3, 1] = math.nan
    return Source(MLP(), (x, y), lambda m, b: cross_entropy(m, b[0], b[1]), MLP.forward,
                  "self.fc1(x)", "F.linear", "data")


SOURCES: dict[str, Callable[[], Source]] = {
    "log(0) in a loss": _log_of_zero,
    "sqrt at 0 in a distance": _sqrt_at_zero,
    "exp overflow in a softmax": _exp_overflow,
    "0/0 in a normalisation": _zero_norm,
    "custom Function backward": _custom_backward,
    "fp16 attention logits": _half_attention,
    "NaN in the batch": _nan_in_batch,
}
