"""Models written the way people write them, and references computed without graddiag.

Each model reproduces one layout that real architectures use: parameters owned by the top
module (ViT's ``cls_token``/``pos_embed``, CLIP's ``logit_scale``), ``nn.TransformerEncoder``
(``MultiheadAttention.out_proj`` never runs its own ``forward``), activation checkpointing,
modules defined in another order than they run, sparse embeddings, float64 and complex
parameters, ``Conv1d`` feature maps, an activation module reused across widths (torchvision's
``self.relu``), LayerScale, and an output sigmoid under ``BCELoss``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

NAN = float("nan")


# --------------------------------------------------------------------------- references
def float64_layer_norms(model: nn.Module) -> dict[str, float]:
    """Per-module 2-norm of the gradients it directly owns, in float64, from ``.grad`` alone.

    Sparse gradients are made dense and complex ones taken by magnitude; modules are named as
    users name them (the top module by its class name).
    """
    norms = {}
    for name, module in model.named_modules():
        total, seen = 0.0, False
        for param in module.parameters(recurse=False):
            grad = param.grad
            if grad is None or not param.requires_grad:
                continue
            if grad.is_sparse:
                grad = grad.to_dense()
            total += float(grad.detach().abs().double().pow(2).sum())
            seen = True
        if seen:
            norms[name or type(model).__name__] = math.sqrt(total)
    return norms


def nan_gradient_at(module: nn.Module) -> Callable[[], None]:
    """Make the gradient arriving at ``module``'s output NaN on the next forward pass only.

    Returns a function that removes the hook. ``module``'s own parameters and everything on
    its input side then get NaN gradients; everything between it and the loss stays finite.
    """
    armed = [True]

    def hook(mod: nn.Module, args: object, output: torch.Tensor) -> None:
        if armed[0] and output.requires_grad:
            armed[0] = False
            output.register_hook(lambda grad: torch.full_like(grad, NAN))

    handle = module.register_forward_hook(hook)
    return handle.remove


def digits(n_classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    from graddiag.demos.data import digits_tensors

    x, y = digits_tensors()
    return x, y % n_classes


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int = 64,
            seed: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    while True:
        idx = torch.randint(0, len(x), (batch_size,), generator=g)
        yield x[idx], y[idx]


# --------------------------------------------------------------------------- layouts
class ViTLike(nn.Module):
    """Patch embedding, ``cls_token`` and ``pos_embed`` owned by the top module,
    ``nn.TransformerEncoder`` blocks (``MultiheadAttention``), a norm and a head."""

    def __init__(self, dim: int = 16, depth: int = 2, patch: int = 4, classes: int = 10,
                 checkpointed: bool = False) -> None:
        super().__init__()
        self.head = nn.Linear(dim, classes)  # defined first, runs last
        self.patch = patch
        self.patch_embed = nn.Linear(patch * patch, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, (8 // patch) ** 2 + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, 2, dim * 2, dropout=0.0, batch_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.checkpointed = checkpointed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        p = self.patch
        patches = x.reshape(b, 8 // p, p, 8 // p, p).permute(0, 1, 3, 2, 4).reshape(b, -1, p * p)
        h = torch.cat([self.cls_token.expand(b, -1, -1), self.patch_embed(patches)], dim=1)
        h = h + self.pos_embed
        for block in self.blocks.layers:
            h = checkpoint(block, h, use_reentrant=False) if self.checkpointed else block(h)
        return self.head(self.norm(h[:, 0]))


class ScaledCosine(nn.Module):
    """CLIP-style head: a learned temperature ``logit_scale`` owned by the top module, used last."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.encoder = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
        self.prototypes = nn.Linear(16, classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.normalize(self.encoder(x), dim=-1)
        w = F.normalize(self.prototypes.weight, dim=-1)
        return self.logit_scale.exp() * z @ w.t()


class CheckpointedMLP(nn.Module):
    """Residual MLP blocks run under ``checkpoint(use_reentrant=False)``: recomputed in backward."""

    def __init__(self, depth: int = 4, width: int = 32) -> None:
        super().__init__()
        self.stem = nn.Linear(64, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))
            for _ in range(depth)
        )
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for block in self.blocks:
            h = h + checkpoint(block, h, use_reentrant=False)
        return self.head(h)


class HeadBeforeStem(nn.Module):
    """A deep sigmoid MLP whose modules are defined in another order than they run."""

    def __init__(self, depth: int = 10, width: int = 32) -> None:
        super().__init__()
        self.head = nn.Linear(width, 10)
        self.body = nn.Sequential(*[m for _ in range(depth - 1)
                                    for m in (nn.Linear(width, width), nn.Sigmoid())])
        self.act = nn.Sigmoid()
        self.stem = nn.Linear(64, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.act(self.stem(x))))


class Recommender(nn.Module):
    """Dense features first, then sparse user/item embeddings (``sparse=True``)."""

    def __init__(self, users: int = 50, items: int = 40, dim: int = 8) -> None:
        super().__init__()
        self.features = nn.Linear(4, dim)
        self.users = nn.Embedding(users, dim, sparse=True)
        self.items = nn.Embedding(items, dim, sparse=True)
        self.out = nn.Linear(dim, 1)

    def forward(self, user: torch.Tensor, item: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        h = self.features(feats) + self.users(user) * self.items(item)
        return self.out(torch.relu(h)).squeeze(-1)


def physics_net() -> nn.Sequential:
    """The float64 net of scientific ML: ``Linear(1, 32) - Tanh - Linear(32, 32) - Tanh -
    Linear(32, 1)`` in double precision."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                         nn.Linear(32, 1)).double()


class ComplexLinear(nn.Module):
    """A complex-valued layer (signal processing): complex weights, real loss."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Linear(8, 8, dtype=torch.complex64)
        self.read = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.read(self.mix(x).abs())


class Conv1dNet(nn.Module):
    """Two ``Conv1d`` + ReLU stages on ``(batch, channels, length)`` sequences and a head."""

    def __init__(self, channels: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(1, channels, 3, padding=1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv1d(channels, 8, 3, padding=1)
        self.act2 = nn.ReLU()
        self.head = nn.Linear(8 * 64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act2(self.conv2(self.act1(self.conv1(x.reshape(-1, 1, 64)))))
        return self.head(h.flatten(1))


class ReusedReLU(nn.Module):
    """torchvision style: one ``self.relu`` applied after convolutions of different widths."""

    def __init__(self, wide: int = 16, narrow: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, wide, 3, padding=1)
        self.conv2 = nn.Conv2d(wide, narrow, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(narrow * 64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.conv1(x.reshape(-1, 1, 8, 8)))
        h = self.relu(self.conv2(h))
        return self.fc(h.flatten(1))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float = 1e-6) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class LayerScaleBlock(nn.Module):
    """A CaiT/DeiT-III block: pre-norm attention and MLP branches scaled by LayerScale (1e-6)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.ls2 = LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.ls1(self.attn(h, h, h, need_weights=False)[0])
        return x + self.ls2(self.mlp(self.norm2(x)))


class LayerScaleViT(nn.Module):
    """Patch embedding, ``cls_token``/``pos_embed``, LayerScale blocks, a norm and a head."""

    def __init__(self, dim: int = 32, depth: int = 3, patch: int = 2) -> None:
        super().__init__()
        self.patch = patch
        n = (8 // patch) ** 2
        self.patch_embed = nn.Linear(patch * patch, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[LayerScaleBlock(dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, p = x.shape[0], self.patch
        patches = x.reshape(b, 8 // p, p, 8 // p, p).permute(0, 1, 3, 2, 4).reshape(b, -1, p * p)
        h = torch.cat([self.cls_token.expand(b, -1, -1), self.patch_embed(patches)], dim=1)
        h = self.blocks(h + self.pos_embed)
        return self.head(self.norm(h[:, 0]))


class SigmoidClassifier(nn.Module):
    """Binary classifier ending in ``nn.Sigmoid`` (trained with ``nn.BCELoss``)."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                 nn.ReLU(), nn.Linear(hidden, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


class LoRALinear(nn.Module):
    """peft's layout: a frozen base layer plus ``lora_A`` (random) and ``lora_B`` (zeros)."""

    def __init__(self, features: int, rank: int = 4) -> None:
        super().__init__()
        self.base = nn.Linear(features, features)
        self.base.requires_grad_(False)
        self.lora_A = nn.Linear(features, rank, bias=False)
        self.lora_B = nn.Linear(rank, features, bias=False)
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + 2.0 * self.lora_B(self.lora_A(x))


class ReZeroBlock(nn.Module):
    """A residual branch gated by a learned scalar initialised at zero (ReZero)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.alpha = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.alpha * self.fc2(F.gelu(self.fc1(x)))


def adapted_mlp() -> nn.Module:
    """Three LoRA-adapted frozen layers and a trainable head."""
    return nn.Sequential(LoRALinear(64), nn.ReLU(), LoRALinear(64), nn.ReLU(), LoRALinear(64),
                         nn.ReLU(), nn.Linear(64, 10))


def rezero_mlp(depth: int = 6, dim: int = 32) -> nn.Module:
    return nn.Sequential(nn.Linear(64, dim), *[ReZeroBlock(dim) for _ in range(depth)],
                         nn.Linear(dim, 10))
