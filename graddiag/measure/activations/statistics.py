"""Running activation statistics of one site during one step, reduced on device.

Units: a dead unit is one that passes no gradient for any sample. Which dimension holds the
units follows what produced the activation's input, read off the autograd graph: channels
(dimension 1) after a convolution, batch/group norm or pooling of any rank (``Conv1d`` feature
maps ``(batch, channels, length)`` included); the last dimension after a linear layer,
attention, layer norm or embedding. Where the graph does not say (no gradient, a transpose on
the way), 4-D/5-D tensors use dimension 1 and others the last one.

A site called several times in one forward pass (torchvision's reused ``self.relu``) has
different units on each call, even of the same width: each call position keeps its own units,
and the same call position of another forward pass (another micro-batch) adds its samples. A
recurrent cell unrolled over time steps (one functional call site fed by the same weights) has
the same units on every call: a unit is dead only if it is dead on every one.
"""

from __future__ import annotations

import logging
import math

import torch

from graddiag.measure.activations.specs import ActivationSpec
from graddiag.measure.order import in_backward

log = logging.getLogger("graddiag")

#: Autograd node names (substrings) after which units are channels (dimension 1) ...
_CHANNELS_FIRST = ("Convolution", "BatchNorm", "GroupNorm", "Pool", "Upsample", "PixelShuffle")
#: ... or the last dimension.
_CHANNELS_LAST = ("Addmm", "Mm", "Matmul", "Linear", "LayerNorm", "Embedding", "Attention",
                  "Softmax")
_REARRANGING = ("Permute", "Transpose", "Unfold", "Flatten")
_MAX_HOPS = 16


def producer_layout(tensor: torch.Tensor) -> str | None:
    """``"channels"``, ``"last"`` or ``None``: where units sit, from what produced ``tensor``.

    Walks the autograd graph back through element-wise operations (the activation itself,
    residual additions, dropout, scaling) to the first operation that fixes the layout.
    """
    node = tensor.grad_fn
    for _ in range(_MAX_HOPS):
        if node is None:
            return None
        name = node.name()
        if any(key in name for key in _CHANNELS_FIRST):
            return "channels"
        if any(key in name for key in _CHANNELS_LAST):
            return "last"
        if any(key in name for key in _REARRANGING):
            return None
        node = next((n for n, _ in node.next_functions
                     if n is not None and n.name() != "torch::autograd::AccumulateGrad"), None)
    return None


def unit_dim(tensor: torch.Tensor) -> int:
    """The dimension of ``tensor`` (an activation's output) that holds its units."""
    layout = producer_layout(tensor) if tensor.ndim > 2 else None
    if layout == "channels":
        return 1
    if layout == "last":
        return tensor.ndim - 1
    return 1 if tensor.ndim in (4, 5) else tensor.ndim - 1


def below_count(values: torch.Tensor, floor: float) -> torch.Tensor:
    """How many of ``values`` are below ``floor`` (NaN: not), a float32 scalar on their device.

    Counted with float operations: on a CPU a comparison into booleans and the sum of those cost
    several times more (about 45 against 20 us for 65,000 elements)."""
    flags = (floor - values).sign_()  # 1 below, 0 at the floor, -1 above, NaN for NaN
    return flags.clamp_(min=0.0).nan_to_num_(0.0).sum(dtype=torch.float32)


def _largest(values: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per unit of ``y``, the largest of ``values`` (an element's |f'|, or 1.0/0.0 where it
    passes) over the samples: a unit is dead when this is below the floor (NaN: alive). Kept as
    a float, so that the comparison with the floor is made once for every site of the step."""
    if values.ndim <= 1:
        return values
    dim = unit_dim(y) if y.ndim == values.ndim else values.ndim - 1
    if values.numel() == 0:  # no samples: every unit, as before
        return values.new_full((values.shape[dim],), -math.inf)
    return values.amax(dim=tuple(i for i in range(values.ndim) if i != dim))


class _Site:
    """Running statistics of one activation site during one step (device scalars)."""

    def __init__(self, name: str, spec: ActivationSpec) -> None:
        self.name = name
        self.spec = spec
        self.calls = 0
        self.elements = 0
        self.floor = 0.0
        self.gain: torch.Tensor | None = None
        # elements below the floor; None where |f'| is 1 or 0, so they are elements - gain
        self._below: torch.Tensor | None = None
        # per call position within a forward pass, and its width: each unit's largest |f'|
        self._slots: dict[tuple[int, int], torch.Tensor] = {}
        self._pass = -1
        self._next = 0  # the next new call position in this forward pass
        self._latest = 0  # the latest call position with units of its own

    @property
    def below(self) -> torch.Tensor | None:
        """Elements whose |f'| is below the floor (a float32 device scalar; ``None`` before
        the first call)."""
        if self._below is not None or self.gain is None:
            return self._below
        return self.elements - self.gain

    @property
    def counts_below(self) -> bool:
        """Whether :attr:`below` is counted on the device rather than ``elements - gain``."""
        return self._below is not None

    @property
    def largest(self) -> list[torch.Tensor]:
        """Each call position's largest |f'| per unit (below the floor: dead), in call order."""
        return list(self._slots.values())

    @property
    def alive(self) -> torch.Tensor | None:
        """Alive flags of every unit of every call position, one vector (``None`` if none)."""
        if not self._slots:
            return None
        slots = self.largest
        return ~((slots[0] if len(slots) == 1 else torch.cat(slots)) < self.floor)

    @property
    def units(self) -> int:
        """Units over every call position (0 before the first call)."""
        return sum(self.widths)

    @property
    def widths(self) -> tuple[int, ...]:
        """Units of each call position, in call order (see :attr:`largest`)."""
        return tuple(int(a.numel()) for a in self._slots.values())

    def add(self, x: torch.Tensor | None, y: torch.Tensor, params: dict[str, float],
            floor: float, *, forward_pass: int = 0, skipped: set[str] | None = None,
            same_units: bool = False, position: int | None = None) -> None:
        """Add one call's statistics (``forward_pass`` numbers the outermost forward calls).

        Each call position within a forward pass keeps units of its own. ``position``: this
        call's, where the caller knows it (a module's calls, numbered by
        :class:`~graddiag.measure.activations.call_sites.CallSites`: calls on the same units, a
        recurrent cell's time steps, share one). Otherwise a call starts a new position, or,
        ``same_units``, acts on the units of the latest one (the next time step of the cell
        that began there), so a unit is dead only if it is dead on every such call.
        """
        if in_backward():  # re-run by activation checkpointing: the forward already counted
            return
        if not y.is_floating_point():
            if skipped is not None and self.name not in skipped:
                skipped.add(self.name)
                log.warning("graddiag: activation site %r has %s outputs; its statistics are "
                            "skipped, training goes on.", self.name, y.dtype)
            return
        self.floor = floor
        # called under no_grad: no graph is built, float32 inputs are used as they are
        y32 = y if y.dtype == torch.float32 else y.float()
        x32 = None
        if x is not None and x.is_floating_point():
            x32 = x if x.dtype == torch.float32 else x.float()
        passes = self.spec.passes
        below_sum: torch.Tensor | None = None
        if passes is not None and 0.0 < floor <= 1.0:  # |f'| is 1 or 0: count where it is 1
            d = y32.reshape(1) if y32.ndim == 0 else y32
            ones = passes(d, params)  # where |f'| is 1: bool, or 1.0/0.0 (the built-ins')
            if not ones.is_floating_point():  # a user's spec: bool (or integer) flags
                ones = ones.float()
            gain_sum = ones.sum(dtype=torch.float32)  # the sum of |f'|; below: the rest
            largest = _largest(ones, y)
        else:
            d = self.spec.derivative(x32, y32, params).abs()
            if d.ndim == 0:
                d = d.reshape(1)
            below_sum = below_count(d, floor)
            gain_sum = d.sum(dtype=torch.float32)
            largest = _largest(d, y)
        if forward_pass != self._pass:
            self._pass, self._next, self._latest = forward_pass, 0, 0
        if position is None:  # a new position, or the units of the latest one
            if not same_units:
                self._latest, self._next = self._next, self._next + 1
            position = self._latest
        key = (position, int(largest.numel()))
        previous = self._slots.get(key)
        self._slots[key] = largest if previous is None else torch.maximum(previous, largest)
        if self.gain is None:
            self.gain, self._below = gain_sum, below_sum
        else:
            self.gain = self.gain + gain_sum
            if below_sum is not None:
                self._below = below_sum if self._below is None else self._below + below_sum
        self.calls += 1
        self.elements += d.numel()

    def sums(self, device: torch.device) -> torch.Tensor:
        """``[saturated elements, sum of |f'|, elements]`` on ``device``."""
        assert self.below is not None and self.gain is not None
        elements = torch.tensor(float(self.elements), device=device)
        return torch.stack([self.below.to(device), self.gain.to(device), elements])

