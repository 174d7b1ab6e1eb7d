"""The monitored model's module tree, handed to the rules floor as plain data."""

from __future__ import annotations

from torch import nn

from graddiag.data.names import clean_name
from graddiag.data.tree import ModuleTree


def module_tree(root: nn.Module) -> ModuleTree:
    """Module names of ``root`` in definition order, as the explainer and figures need them."""
    return ModuleTree(tuple(clean_name(n) for n, _ in root.named_modules()), type(root).__name__)
