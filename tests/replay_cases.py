"""Real sources of NaN/Inf, written the way users write them, for the replay tests.

Each culprit line is found by the tests with ``inspect`` (never by a hard-coded number).
"""

from __future__ import annotations

import inspect

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
