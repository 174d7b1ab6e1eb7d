"""Module names as users write them."""

from __future__ import annotations

COMPILE_PART = "_orig_mod"


def clean_name(name: str) -> str:
    """A module name without ``torch.compile``'s ``_orig_mod`` parts (``net._orig_mod.0`` -> ``net.0``)."""
    return ".".join(part for part in name.split(".") if part != COMPILE_PART)
