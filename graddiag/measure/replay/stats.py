"""Finiteness checks and small statistics of one tensor, for the replay of a step."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch


def checkable(value: Any) -> bool:
    """Whether ``value`` is a tensor whose values can be NaN or infinite (floating or complex)."""
    return (
        isinstance(value, torch.Tensor)
        and (value.is_floating_point() or value.is_complex())
        and value.layout == torch.strided
        and value.device.type != "meta"
    )


def flags(tensor: torch.Tensor) -> tuple[bool, bool]:
    """``(has_nan, has_inf)`` of a checkable tensor; one host sync, two only if non-finite."""
    with torch.no_grad():
        if bool(torch.isfinite(tensor).all()):
            return False, False
        return bool(torch.isnan(tensor).any()), bool(torch.isinf(tensor).any())


def nonfinite_word(tensor: torch.Tensor) -> str:
    """``"nan"``, ``"inf"`` or ``"-inf"``: the kind of non-finite value ``tensor`` holds first."""
    with torch.no_grad():
        if bool(torch.isnan(tensor).any()):
            return "nan"
        if tensor.is_complex():
            return "inf"
        return "-inf" if bool((tensor == -math.inf).any()) else "inf"


def tensor_stats(tensor: torch.Tensor, role: str) -> dict[str, Any]:
    """Statistics a reader needs to see why an operation overflowed or divided by zero.

    ``min``/``max``/``max_abs`` are over the finite values (``nan`` when there are none);
    ``zeros``, ``negatives``, ``nan`` and ``inf`` are element counts.
    """
    with torch.no_grad():
        t = tensor.detach()
        stats: dict[str, Any] = {
            "role": role,
            "dtype": str(t.dtype).replace("torch.", ""),
            "shape": list(t.shape),
            "numel": int(t.numel()),
        }
        if t.is_complex():
            t = t.abs()
        t = t.to(torch.float64) if t.is_floating_point() else t.double()
        finite = torch.isfinite(t)
        values = t[finite]
        counts = torch.stack([
            torch.isnan(t).sum(), torch.isinf(t).sum(), (t == 0).sum(), (t < 0).sum(),
        ]).tolist()
        stats.update(nan=int(counts[0]), inf=int(counts[1]), zeros=int(counts[2]),
                     negatives=int(counts[3]))
        if values.numel():
            low, high, top = torch.stack([values.min(), values.max(), values.abs().max()]).tolist()
        else:
            low = high = top = math.nan
        stats.update(min=float(low), max=float(high), max_abs=float(top))
        return stats


def _leaves(value: Any, levels: int) -> Iterator[Any]:
    """The items inside tuples, lists and dict values, down to ``levels`` containers deep."""
    if levels and isinstance(value, (tuple, list)):
        for item in value:
            yield from _leaves(item, levels - 1)
    elif levels and isinstance(value, dict):
        for item in value.values():
            yield from _leaves(item, levels - 1)
    else:
        yield value


def tensors_in(value: Any) -> Iterator[torch.Tensor]:
    """Tensors inside arguments or results: tensors, tuples, lists and dict values, 3 levels deep."""
    return (v for v in _leaves(value, 3) if isinstance(v, torch.Tensor))


def nonfinite_numbers(value: Any) -> Iterator[float]:
    """Non-finite Python numbers among arguments (``x * float("nan")``, ``masked_fill(m, -inf)``)."""
    return (v for v in _leaves(value, 2) if isinstance(v, float) and not math.isfinite(v))
