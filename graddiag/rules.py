"""Rules turn step records into findings. Pure: no I/O, no torch hooks, no Lightning.

Each rule keeps a little state (streaks, running medians) so that a condition is reported once
when it begins (after its patience), not on every step it lasts. ``active`` says whether the
condition holds on the current step, which is what actions such as ``skip`` act on.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import numpy as np

from graddiag import remedies
from graddiag.config import MonitorConfig
from graddiag.findings import Finding
from graddiag.records import StepRecord


class Rule(Protocol):
    kind: str

    def update(self, record: StepRecord) -> list[Finding]: ...

    @property
    def active(self) -> bool: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Onsets:
    """Counts consecutive steps a condition holds per key; says when it has just begun."""

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.streak: dict[str, int] = {}
        self.reported: set[str] = set()

    def observe(self, key: str, condition: bool) -> bool:
        """Record one step; True exactly when ``key`` has held for ``patience`` steps anew."""
        if not condition:
            self.streak.pop(key, None)
            self.reported.discard(key)
            return False
        count = self.streak[key] = self.streak.get(key, 0) + 1
        if count >= self.patience and key not in self.reported:
            self.reported.add(key)
            return True
        return False

    def confirmed(self, key: str) -> bool:
        """Whether ``key`` holds now and has held for at least ``patience`` steps."""
        return self.streak.get(key, 0) >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"streak": dict(self.streak), "reported": sorted(self.reported)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.streak = dict(state["streak"])
        self.reported = set(state["reported"])


def _fmt(x: float) -> str:
    return f"{x:.3g}"


class _OnsetRule:
    kind = ""

    def __init__(self, patience: int) -> None:
        self.onsets = Onsets(patience)
        self._active = False

    @property
    def active(self) -> bool:
        return self._active

    def state_dict(self) -> dict[str, Any]:
        return {"onsets": self.onsets.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.onsets.load_state_dict(state["onsets"])


class VanishingRule(_OnsetRule):
    """A layer's gradient norm is below ``abs_floor`` or below ``rel_floor`` x the largest layer's."""

    kind = "vanishing"

    def __init__(self, abs_floor: float, rel_floor: float, patience: int) -> None:
        super().__init__(patience)
        self.abs_floor = abs_floor
        self.rel_floor = rel_floor

    def update(self, record: StepRecord) -> list[Finding]:
        norms = record.grad_norm
        usable = record.has_grad & np.isfinite(norms)
        if record.amp_overflow or not usable.any():
            self._active = False
            return []
        top_pos = int(np.argmax(np.where(usable, norms, -np.inf)))
        top = float(norms[top_pos])
        rel_threshold = self.rel_floor * top
        findings = []
        self._active = False
        for i, name in enumerate(record.layers):
            value = float(norms[i])
            below_abs = usable[i] and value < self.abs_floor
            below_rel = usable[i] and value < rel_threshold
            if self.onsets.observe(name, bool(below_abs or below_rel)):
                threshold = self.abs_floor if below_abs else rel_threshold
                ratio = value / top if top > 0 else 0.0
                evidence = (
                    f"gradient norm {_fmt(value)} is {_fmt(ratio)} x the largest layer's "
                    f"('{record.layers[top_pos]}', {_fmt(top)})"
                    if not below_abs
                    else f"gradient norm {_fmt(value)} is below the floor {_fmt(self.abs_floor)}"
                )
                findings.append(
                    Finding(
                        kind=self.kind,
                        layer=name,
                        step=record.step,
                        value=value,
                        threshold=threshold,
                        message=(
                            f"Vanishing gradient: {evidence} for {self.onsets.patience} "
                            "recorded steps; this layer barely learns."
                        ),
                        remedy=remedies.VANISHING,
                        details={"ratio_to_largest": ratio, "largest_layer": record.layers[top_pos],
                                 "largest_norm": top},
                    )
                )
            self._active |= self.onsets.confirmed(name)
        return findings


class ExplodingRule(_OnsetRule):
    """A layer's gradient norm exceeds ``abs_ceiling`` or ``factor`` x its own running median."""

    kind = "exploding"
    min_history = 5

    def __init__(self, abs_ceiling: float, factor: float, window: int, patience: int) -> None:
        super().__init__(patience)
        self.abs_ceiling = abs_ceiling
        self.factor = factor
        self.window = window
        self.recent: dict[str, list[float]] = {}

    def update(self, record: StepRecord) -> list[Finding]:
        findings = []
        self._active = False
        if record.amp_overflow:
            return []
        for i, name in enumerate(record.layers):
            value = float(record.grad_norm[i])
            if not record.has_grad[i] or i in record.nonfinite or math.isnan(value):
                self.onsets.observe(name, False)
                continue
            recent = self.recent.setdefault(name, [])
            median = float(np.median(recent)) if len(recent) >= self.min_history else math.nan
            jump = median > 0 and value > self.factor * median
            above = value > self.abs_ceiling
            if self.onsets.observe(name, bool(above or jump)):
                if above:
                    evidence = f"gradient norm {_fmt(value)} exceeds the ceiling {_fmt(self.abs_ceiling)}"
                    threshold = self.abs_ceiling
                else:
                    evidence = (
                        f"gradient norm {_fmt(value)} is {_fmt(value / median)} x its recent "
                        f"median {_fmt(median)}"
                    )
                    threshold = self.factor * median
                findings.append(
                    Finding(
                        kind=self.kind,
                        layer=name,
                        step=record.step,
                        value=value,
                        threshold=threshold,
                        message=f"Exploding gradient: {evidence}; updates this large destabilise training.",
                        remedy=remedies.EXPLODING,
                        details={"recent_median": median},
                    )
                )
            self._active |= self.onsets.confirmed(name)
            if math.isfinite(value):
                recent.append(value)
                if len(recent) > self.window:
                    del recent[0]
        return findings

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "recent": {k: list(v) for k, v in self.recent.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.recent = {k: list(v) for k, v in state["recent"].items()}


class NonfiniteRule(_OnsetRule):
    """Some gradient holds NaN or Inf; names the origin: the affected layer nearest the loss."""

    kind = "nonfinite"
    key = "model"
    #: Consecutive AMP-overflow records after which the overflow is not a loss-scale problem.
    amp_overflow_limit = 10

    def __init__(self) -> None:
        super().__init__(patience=1)
        self.amp_overflows = 0

    def update(self, record: StepRecord) -> list[Finding]:
        self.amp_overflows = self.amp_overflows + 1 if record.amp_overflow else 0
        if self.amp_overflows >= self.amp_overflow_limit:
            return self._persistent_overflow(record)
        bad = sorted(record.nonfinite) if not record.amp_overflow else []
        self._active = bool(bad)
        if not self.onsets.observe(self.key, bool(bad)):
            return []
        origin = bad[-1]  # layers are in forward order: the last is nearest the loss
        name = record.layers[origin]
        counts = record.nonfinite[origin]
        upstream = len(bad) - 1
        where = ", ".join(f"{p}: {n} element(s)" for p, n in counts.items())
        everywhere = len(bad) == len(record.layers) and len(bad) > 1
        hint = (
            " Every layer is affected, so the loss or the forward pass probably produced it "
            "(inputs, log/division, an overflowing activation)."
            if everywhere
            else f" It arose in the backward pass at or before '{name}'."
        )
        return [
            Finding(
                kind=self.kind,
                layer=name,
                step=record.step,
                value=float(record.grad_norm[origin]),
                threshold=math.inf,
                message=(
                    f"Non-finite gradient (NaN/Inf) originating at '{name}' ({where}); "
                    f"{upstream} layer(s) upstream are affected too.{hint}"
                ),
                remedy=remedies.NONFINITE,
                details={"affected_layers": [record.layers[i] for i in bad],
                         "upstream_affected": upstream},
            )
        ]


    def _persistent_overflow(self, record: StepRecord) -> list[Finding]:
        self._active = True
        if not self.onsets.observe(self.key, True):
            return []
        bad = [i for i in range(len(record.layers)) if not math.isfinite(record.grad_norm[i])]
        origin = bad[-1] if bad else len(record.layers) - 1
        return [
            Finding(
                kind=self.kind,
                layer=record.layers[origin],
                step=record.step,
                value=float(record.grad_norm[origin]),
                threshold=math.inf,
                message=(
                    f"Non-finite gradients on {self.amp_overflows} consecutive AMP steps: the "
                    "grad scaler keeps lowering the loss scale and skipping steps, so this is "
                    "not an fp16 overflow but NaN/Inf produced by the model or the loss."
                ),
                remedy=remedies.NONFINITE,
                details={"amp_overflows": self.amp_overflows},
            )
        ]

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "amp_overflows": self.amp_overflows}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.amp_overflows = int(state.get("amp_overflows", 0))


class NoGradientRule(_OnsetRule):
    """A trainable parameter (``requires_grad=True``) received no gradient at all."""

    kind = "no_gradient"

    def update(self, record: StepRecord) -> list[Finding]:
        findings = []
        self._active = False
        for i, name in enumerate(record.layers):
            params = record.missing.get(i, [])
            if self.onsets.observe(name, bool(params)):
                findings.append(
                    Finding(
                        kind=self.kind,
                        layer=name,
                        step=record.step,
                        value=float(len(params)),
                        threshold=0.0,
                        message=(
                            f"No gradient: trainable parameter(s) {params} of '{name}' got no "
                            f"gradient (.grad is None) for {self.onsets.patience} recorded steps, "
                            "so the optimizer never updates them. Nothing between them and the "
                            f"loss is differentiable, or they are unused."
                        ),
                        remedy=remedies.NO_GRADIENT,
                        details={"parameters": list(params)},
                    )
                )
            self._active |= self.onsets.confirmed(name)
        return findings


class RuleSet:
    """The rules selected by a :class:`~graddiag.config.MonitorConfig`, applied in order."""

    def __init__(self, config: MonitorConfig, extra: list[Rule] | None = None) -> None:
        rules: list[Rule] = [
            NonfiniteRule(),
            ExplodingRule(
                config.exploding_abs,
                config.exploding_factor,
                config.exploding_window,
                config.exploding_patience,
            ),
            VanishingRule(config.vanishing_abs, config.vanishing_rel, config.vanishing_patience),
            NoGradientRule(config.no_gradient_patience),
            *(extra or []),
        ]
        self.rules = [r for r in rules if r.kind not in config.ignore]

    def update(self, record: StepRecord) -> list[Finding]:
        """Findings that begin at this record."""
        return [finding for rule in self.rules for finding in rule.update(record)]

    def active(self, kind: str) -> bool:
        """Whether a condition of ``kind`` holds on the latest record (after its patience)."""
        return any(rule.active for rule in self.rules if rule.kind == kind)

    def active_count(self) -> int:
        """Reported conditions that still hold, over all rules."""
        return sum(len(rule.onsets.reported) for rule in self.rules)  # type: ignore[attr-defined]

    def state_dict(self) -> dict[str, Any]:
        return {rule.kind: rule.state_dict() for rule in self.rules}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for rule in self.rules:
            if rule.kind in state:
                rule.load_state_dict(state[rule.kind])
