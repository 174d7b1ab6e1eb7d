"""Rules on activation statistics: ``saturated`` sigmoid/tanh sites and ``dead_relu`` sites.

Only records that carry activation statistics advance these rules; other records leave their
streaks untouched, so ``patience`` counts activation steps.

Both mean "this site blocks gradient that trainable layers before it need", so a site is judged
only where it sits between trainable layers, by the order gradients arrived:

* a site with no trainable layer on its input side (applied to the inputs, inside a frozen
  backbone, or with no gradient through it) blocks nothing;
* a site after the last trainable layer feeds the loss directly, and the loss sets its gradient:
  ``BCELoss`` after a sigmoid gives ``(p - y) / N`` at the sigmoid's input whatever ``p(1-p)``
  is (so does NLL after ``log_softmax``), so a confident output that is right is no saturation
  problem; a starving model behind it still shows as ``vanishing``.

Where the order is unknown (``position`` NaN), every site of the family is judged. A step whose
gradients hold NaN/Inf (an fp16 AMP overflow included) is not judged: its forward pass may have
been NaN throughout (weights an earlier update poisoned), and NaN units pass no gradient without
being dead or saturated.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from graddiag.data.findings import Finding
from graddiag.data.records import StepRecord
from graddiag.rules import wording as remedies
from graddiag.rules.onsets import OnsetRule


def between_trainable_layers(position: np.ndarray | None, n_sites: int, n_layers: int) -> np.ndarray:
    """Sites with a trainable layer on each side (or an unknown position)."""
    if position is None:
        return np.ones(n_sites, dtype=bool)
    with np.errstate(invalid="ignore"):
        return np.isnan(position) | ((position > 0) & (position < n_layers - 1))


class _FractionRule(OnsetRule):
    family = ""
    kind = ""
    remedy = ""
    #: Judge a site called at several places of a forward pass (a shared module) wherever its
    #: one place is: only where its fraction is its calls' own (see :class:`DeadReluRule`).
    judges_shared_sites = False

    def __init__(self, fraction: float, patience: int) -> None:
        super().__init__(patience)
        self.fraction = fraction

    def _message(self, kind: str, value: float, gain: float) -> str:
        raise NotImplementedError

    def _finding(self, record: StepRecord, i: int, value: float) -> Finding:
        a = record.activations
        assert a is not None
        gain = float(a.gain[i])
        return Finding(
            kind=self.kind, layer=a.sites[i], step=record.step, value=value,
            threshold=self.fraction, message=self._message(a.kinds[i], value, gain),
            remedy=self.remedy, details={"activation": a.kinds[i], "gain": gain},
        )

    def update(self, record: StepRecord) -> list[Finding]:
        acts = record.activations
        if acts is None or record.nonfinite or record.amp_overflow:  # a poisoned forward pass
            return []
        values = acts.saturated if self.family == "saturating" else acts.dead
        family = np.array([f == self.family for f in acts.families], dtype=bool)
        judged = between_trainable_layers(acts.position, len(acts.sites), len(record.layers))
        if self.judges_shared_sites and acts.call_positions is not None:
            judged = judged | (np.asarray(acts.call_positions) > 1)
        judged &= family
        with np.errstate(invalid="ignore"):
            condition = judged & (values > self.fraction)
        onsets = self.onsets.observe_all(acts.sites, condition, evaluated=family)
        self._active = self.onsets.any_confirmed()
        return [self._finding(record, int(i), float(values[i])) for i in onsets]


class SaturatedRule(_FractionRule):
    """More than ``fraction`` of a sigmoid/tanh-like site's units are in the flat region."""

    kind = "saturated"
    family = "saturating"
    remedy = remedies.SATURATED

    def _message(self, kind: str, value: float, gain: float) -> str:
        return (f"Saturated {kind}: {value:.0%} of its units sit in the flat region (local "
                f"derivative below the floor), mean derivative {gain:.3g}; they pass almost no "
                "gradient back, so the layers before it starve.")


class DeadReluRule(_FractionRule):
    """More than ``fraction`` of a ReLU-like site's units pass no gradient for any sample."""

    kind = "dead_relu"
    family = "rectifier"
    remedy = remedies.DEAD_RELU
    # a shared site's place is its call nearest the loss, which may come after the last
    # trainable layer while another call, the dead one, sits between layers
    judges_shared_sites = True

    def _message(self, kind: str, value: float, gain: float) -> str:
        return (f"Dead {kind} units: {value:.0%} of its units output zero (no gradient) for every "
                f"sample of the batch, mean derivative {gain:.3g}; dead units rarely recover, so "
                "this capacity is lost.")

    def _finding(self, record: StepRecord, i: int, value: float) -> Finding:
        """A module called at several places of a forward pass (a shared ``self.relu``) has
        units of its own at each: the finding names the calls whose units are this dead."""
        finding = super()._finding(record, i, value)
        acts = record.activations
        assert acts is not None
        counts, fractions = acts.call_positions, acts.dead_by_call
        if counts is None or fractions is None or counts[i] < 2:
            return finding
        start = int(np.sum(counts[:i]))
        own = fractions[start:start + int(counts[i])]
        with np.errstate(invalid="ignore"):
            calls = [int(k) + 1 for k in np.flatnonzero(own > self.fraction)]
        if not calls:  # not expected: the worst position is over the fraction
            return finding
        n = len(own)
        if len(calls) == n:
            which = f"the units of every call are over {self.fraction:.0%} dead"
        else:
            listed = ", ".join(str(k) for k in calls[:-1]) + (" and " if len(calls) > 1 else "")
            which = (f"the dead units are those of its call{'s' if len(calls) > 1 else ''} "
                     f"{listed}{calls[-1]}")
        return replace(
            finding,
            message=(f"{finding.message} It is called at {n} places in each forward pass, each "
                     f"on units of its own, and {which} (the fraction above is the worst "
                     "call's, the mean derivative all calls')."),
            details={**finding.details, "calls": calls, "call_positions": n})
