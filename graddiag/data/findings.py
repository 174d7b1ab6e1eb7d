"""The data graddiag reports: one :class:`Finding` per onset of a gradient condition."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args

FindingKind = Literal[
    "vanishing",
    "exploding",
    "nonfinite",
    "no_gradient",
    "saturated",
    "dead_relu",
    "stalled",
    "unstable_update",
    "not_in_optimizer",
]
FINDING_KINDS: tuple[str, ...] = get_args(FindingKind)


@dataclass(frozen=True)
class Finding:
    """One gradient condition that began at ``step`` in ``layer``.

    A condition is reported once when it begins, not on every step it lasts; it may be
    reported again after it has ended and begun anew.

    Attributes:
        kind: What was detected (one of :data:`FINDING_KINDS`).
        layer: Qualified module name relative to the monitored module (``"net.0"``); for
            activation findings the activation module or the module that called the function.
        step: Optimizer step at which the condition was confirmed (after its patience).
        value: The statistic that crossed the threshold (a gradient norm, a ratio or a fraction).
        threshold: The threshold it crossed.
        message: What happened, with the evidence, in one or two sentences.
        remedy: What to try, most promising first.
        details: Further numbers behind the message (names differ per kind).
    """

    kind: str
    layer: str
    step: int
    value: float
    threshold: float
    message: str
    remedy: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        text = f"[{self.kind}] step {self.step}, layer '{self.layer}': {self.message}"
        return f"{text} Try: {self.remedy}" if self.remedy else text

    def to_dict(self) -> dict[str, Any]:
        """The finding as a plain dict (for tables, JSON and checkpoints)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Finding:
        """Rebuild a finding saved with :meth:`to_dict`."""
        return cls(**data)
