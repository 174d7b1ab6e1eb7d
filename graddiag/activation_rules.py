"""Rules on activation statistics: ``saturated`` sigmoid/tanh sites and ``dead_relu`` sites.

Only records that carry activation statistics advance these rules; other records leave their
streaks untouched, so ``patience`` counts activation steps.
"""

from __future__ import annotations

from graddiag import remedies
from graddiag.findings import Finding
from graddiag.records import StepRecord
from graddiag.rules import _OnsetRule


class _FractionRule(_OnsetRule):
    family = ""
    kind = ""

    def __init__(self, fraction: float, patience: int) -> None:
        super().__init__(patience)
        self.fraction = fraction

    def _value(self, record: StepRecord, i: int) -> float:
        raise NotImplementedError

    def _finding(self, record: StepRecord, i: int, value: float) -> Finding:
        raise NotImplementedError

    def update(self, record: StepRecord) -> list[Finding]:
        acts = record.activations
        if acts is None:
            return []
        findings = []
        self._active = False
        for i, site in enumerate(acts.sites):
            if acts.families[i] != self.family:
                continue
            value = self._value(record, i)
            if self.onsets.observe(site, bool(value > self.fraction)):
                findings.append(self._finding(record, i, value))
            self._active |= self.onsets.confirmed(site)
        return findings


class SaturatedRule(_FractionRule):
    """More than ``fraction`` of a sigmoid/tanh-like site's units are in the flat region."""

    kind = "saturated"
    family = "saturating"

    def _value(self, record: StepRecord, i: int) -> float:
        assert record.activations is not None
        return float(record.activations.saturated[i])

    def _finding(self, record: StepRecord, i: int, value: float) -> Finding:
        a = record.activations
        assert a is not None
        return Finding(
            kind=self.kind,
            layer=a.sites[i],
            step=record.step,
            value=value,
            threshold=self.fraction,
            message=(
                f"Saturated {a.kinds[i]}: {value:.0%} of its units sit in the flat region "
                f"(local derivative below the floor), mean derivative {a.gain[i]:.3g}; they pass "
                "almost no gradient back, so the layers before it starve."
            ),
            remedy=remedies.SATURATED,
            details={"activation": a.kinds[i], "gain": float(a.gain[i])},
        )


class DeadReluRule(_FractionRule):
    """More than ``fraction`` of a ReLU-like site's units pass no gradient for any sample."""

    kind = "dead_relu"
    family = "rectifier"

    def _value(self, record: StepRecord, i: int) -> float:
        assert record.activations is not None
        return float(record.activations.dead[i])

    def _finding(self, record: StepRecord, i: int, value: float) -> Finding:
        a = record.activations
        assert a is not None
        return Finding(
            kind=self.kind,
            layer=a.sites[i],
            step=record.step,
            value=value,
            threshold=self.fraction,
            message=(
                f"Dead {a.kinds[i]} units: {value:.0%} of its units output zero (no gradient) for "
                f"every sample of the batch, mean derivative {a.gain[i]:.3g}; dead units rarely "
                "recover, so this capacity is lost."
            ),
            remedy=remedies.DEAD_RELU,
            details={"activation": a.kinds[i], "gain": float(a.gain[i])},
        )
