"""Moving measurements to the host: everything a recorded step measured travels in one copy."""

from __future__ import annotations

import numpy as np
import torch


def _copy_to_host(flat: torch.Tensor) -> np.ndarray:
    """The single device-to-host copy of a recorded step (tests count calls to this)."""
    # A numpy-owned copy: a view would keep a torch tensor (and ~24 KB of allocator block) alive
    # for every record kept in the history.
    return flat.detach().cpu().numpy().astype(np.float64)


def to_host(chunks: list[torch.Tensor]) -> list[np.ndarray]:
    """Concatenate device tensors, copy them to the host once, and split them again.

    Args:
        chunks: Small tensors, possibly on different devices (they are first gathered on the
            device of the first one, device-to-device, without a host sync).

    Returns:
        One float64 numpy array per chunk, flattened.
    """
    if not chunks:
        return []
    home = chunks[0].device
    if len(chunks) == 1:
        flat = chunks[0].detach().reshape(-1)
    else:
        flat = torch.cat([c.detach().reshape(-1).to(home, torch.float32) for c in chunks])
    host = _copy_to_host(flat)
    parts, start = [], 0
    for chunk in chunks:
        end = start + chunk.numel()
        parts.append(host[start:end])
        start = end
    return parts
