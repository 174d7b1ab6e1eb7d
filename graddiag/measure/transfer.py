"""Moving measurements to the host: everything a recorded step measured travels in one copy."""

from __future__ import annotations

import numpy as np
import torch


def _copy_to_host(flat: torch.Tensor) -> np.ndarray:
    """The single device-to-host copy of a recorded step (tests count calls to this)."""
    # A numpy-owned copy: a view would keep a torch tensor (and ~24 KB of allocator block) alive
    # for every record kept in the history.
    host = flat.detach()
    if host.device.type != "cpu":
        host = host.cpu()
    return host.numpy().astype(np.float64)


def to_host(chunks: list[torch.Tensor]) -> list[np.ndarray]:
    """Concatenate device tensors, copy them to the host once, and split them again.

    Args:
        chunks: Small tensors, possibly on different devices (they are first gathered on the
            device of the first one, device-to-device, without a host sync).

    Returns:
        One float64 numpy array per chunk, flattened.
    """
    return HostCopy(chunks).result()


class HostCopy:
    """One device-to-host copy (a recorded step's, or a block of kept steps'), read now or
    one step later.

    ``deferred=False`` (and always on a CPU) copies at once: :meth:`result` just returns it.
    ``deferred=True`` on a CUDA device starts a non-blocking copy into pinned host memory and
    records an event; :meth:`result`, called a step later, waits only for that event, which has
    long completed by then, so the training loop never stalls on the device.
    """

    def __init__(self, chunks: list[torch.Tensor], deferred: bool = False) -> None:
        self.sizes = [c.numel() for c in chunks]
        self.deferred = deferred
        self._host: np.ndarray | None = None
        self._pinned: torch.Tensor | None = None
        self._event: torch.cuda.Event | None = None
        if not chunks:
            self._host = np.zeros(0)
            return
        flat = _flatten(chunks)
        if deferred and flat.device.type == "cuda":
            self._pinned = _start_copy_to_host(flat)
            self._event = torch.cuda.Event()
            self._event.record()
        elif deferred:  # nothing to overlap on a CPU: keep a copy to read later
            self._pinned = flat.detach().clone()
        else:
            self._host = _copy_to_host(flat)

    def result(self) -> list[np.ndarray]:
        """One float64 numpy array per chunk, flattened (waits for a deferred copy if needed)."""
        if self._host is None:
            assert self._pinned is not None
            if self._event is not None:
                self._event.synchronize()
            self._host = self._pinned.numpy().astype(np.float64)
            self._pinned = self._event = None
        parts, start = [], 0
        for size in self.sizes:
            parts.append(self._host[start:start + size])
            start += size
        return parts


def _flatten(chunks: list[torch.Tensor]) -> torch.Tensor:
    """The chunks as one vector on the first one's device: float32, or float64 when some chunk
    is (the norms of float64 gradients keep their range)."""
    home = chunks[0].device
    if len(chunks) == 1:
        return chunks[0].detach().reshape(-1)
    dtype = torch.float64 if any(c.dtype == torch.float64 for c in chunks) else torch.float32
    return torch.cat([c.detach().reshape(-1).to(home, dtype) for c in chunks])


def _start_copy_to_host(flat: torch.Tensor) -> torch.Tensor:
    """The single device-to-host copy of a recorded step, without waiting (tests count calls)."""
    pinned = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
    pinned.copy_(flat, non_blocking=True)
    return pinned
