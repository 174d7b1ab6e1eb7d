"""Explanations: why a layer's gradient vanished, and which remedy fits the evidence best.

The explainer remembers the latest activation statistics and the graph-cutting operations seen
in the forward pass, and adds them to findings: for a vanishing layer, the activation sites
between it and the loss, their measured mean derivative and the attenuation that predicts.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter

import numpy as np

from graddiag.data.findings import Finding
from graddiag.data.records import ActivationRecord, StepRecord
from graddiag.data.tree import ModuleTree
from graddiag.rules import wording as remedies
from graddiag.rules.attention import ScoreProjection, score_projection, scores_note

#: Below this share of the shrink (in orders of magnitude) the sigmoid/tanh sites between a
#: vanishing layer and the loss are not what to change first: a single tanh of gain 0.9 in front
#: of a 1e-6 shrink (a Hugging Face pooler) explains under 1 % of it.
ACTIVATIONS_EXPLAIN = 0.25
#: A vanishing layer whose last update ratio is at least this share of the median layer's still
#: learns: an optimizer that normalises each weight's step by its gradient's running size (Adam)
#: moves it ...
STILL_MOVING_SHARE = 0.1
#: ... when that ratio is at least this (below it a step changes the weights by nothing that
#: matters: the ``stalled_ratio`` default) ...
MOVING_FLOOR = 1e-6
#: ... and the layer's gradient then was at most this many times its vanishing value now (the
#: ratio was measured in the same small-gradient regime, not before the gradient died).
SAME_REGIME = 10.0
#: A site where at least this share of the units passed no gradient (dead, or saturated) blocks
#: it: named when a layer behind it has a gradient of exactly 0.
BLOCKING_SHARE = 0.99
#: An attention query or key projection's small gradient is explained by the attention scores
#: only where its value projection's is at least this many times larger on the same step.
VALUE_ABOVE_SCORES = 10.0


def _remedy_behind(acts: ActivationRecord, between: list[int], measured: float) -> str:
    """The ranked remedies for a layer whose gradient shrank by ``measured`` (its ratio to the
    largest layer) behind the activation sites ``between`` it and the loss."""
    saturating = [float(acts.gain[i]) for i in between if acts.families[i] == "saturating"]
    if not saturating:
        dead = [float(acts.dead[i]) for i in between if acts.families[i] == "rectifier"]
        if dead and max(dead) > 0.5:
            return remedies.DEAD_RELU + "; then " + remedies.DEEPER
        return remedies.VANISHING_BEHIND_RECTIFIERS
    if _share_of_shrink(math.prod(saturating), measured) < ACTIVATIONS_EXPLAIN:
        return remedies.VANISHING_FROM_WEIGHTS
    return remedies.replace_saturating(len(saturating))


def _share_of_shrink(expected: float, measured: float) -> float:
    """The part of the measured shrink (ratio to the largest layer) that the activations'
    expected shrink accounts for, in orders of magnitude: log(expected) / log(measured); 1 where
    that is not defined (no shrink measured, or activations that amplify)."""
    if not (0.0 < measured < 1.0 and 0.0 < expected <= 1.0):
        return 1.0
    return math.log(expected) / math.log(measured)


class Explainer:
    """Adds causes and ranked remedies to findings, from what the probes have seen.

    Args:
        tree: The monitored model's module names (plain data: no torch needed here).
    """

    def __init__(self, tree: ModuleTree) -> None:
        self.tree = tree
        self.activations: ActivationRecord | None = None
        self.activation_layers: list[str] = []  # the layers of the record that carried them
        self.cut_ops: dict[str, list[str]] = {}
        #: each layer's last finite update ratio: (step, ratio, its gradient norm on that step)
        self.updates: dict[str, tuple[int, float, float]] = {}

    def observe(self, record: StepRecord) -> None:
        """Remember the latest activation statistics, cut operations and update ratios."""
        if record.update_ratio is not None:  # per layer: several optimizers read in turns
            finite = np.isfinite(record.update_ratio) & record.has_grad
            for i in np.flatnonzero(finite).tolist():
                self.updates[record.layers[i]] = (record.step, float(record.update_ratio[i]),
                                                  float(record.grad_norm[i]))
        if record.activations is not None and not (record.nonfinite or record.amp_overflow):
            self.activations = record.activations  # a poisoned step's units say nothing
            self.activation_layers = record.layers
            if record.activations.cut_ops:
                self.cut_ops = record.activations.cut_ops

    def sites_after(self, layer: str) -> list[int] | None:
        """Sites that ran between ``layer`` and the loss, by the measured order (indices into
        the latest activation record); ``None`` where that order is unknown."""
        acts = self.activations
        if acts is None or acts.position is None or layer not in self.activation_layers:
            return None
        if not any(math.isfinite(p) for p in acts.position):
            return None
        k = self.activation_layers.index(layer)
        return [i for i, p in enumerate(acts.position) if p > k]

    def still_moving(self, layer: str, norm: float) -> tuple[int, float, float] | None:
        """``(step, update ratio, median layer's ratio)`` when ``layer``'s last update ratio
        says its weights still move although its gradient norm is ``norm``: at least
        :data:`MOVING_FLOOR` and :data:`STILL_MOVING_SHARE` x the median of every layer's last
        ratio, measured while its gradient was already at most :data:`SAME_REGIME` x ``norm``;
        ``None`` otherwise, or when that is not known."""
        last = self.updates.get(layer)
        if last is None or not norm > 0.0 or len(self.updates) < 2:
            return None
        step, mine, grad = last
        median = float(np.median([ratio for _, ratio, _ in self.updates.values()]))
        if not (MOVING_FLOOR <= mine < math.inf and mine >= STILL_MOVING_SHARE * median
                and grad <= SAME_REGIME * norm):
            return None
        return step, mine, median

    def explain(self, finding: Finding, record: StepRecord,
                exploding: frozenset[str] = frozenset()) -> Finding:
        """``finding`` with its cause and ranked remedies; ``exploding``: the layers whose
        exploding gradient was reported and holds on this record (findings next to them say
        so)."""
        if finding.kind == "vanishing":
            return self._vanishing(finding, record, exploding)
        if finding.kind == "stalled":
            return self._stalled(finding, record, exploding)
        if finding.kind == "no_gradient" and self.cut_ops:
            seen = "; ".join(f"'{m}' called {', '.join(ops)}" for m, ops in self.cut_ops.items())
            return dataclasses.replace(
                finding,
                message=f"{finding.message} Graph-cutting operations seen in the forward pass: {seen}.",
                details={**finding.details, "cut_ops": dict(self.cut_ops)},
            )
        return finding

    def _stalled(self, finding: Finding, record: StepRecord,
                 exploding: frozenset[str]) -> Finding:
        """A stalled layer next to an explosion: its own gradient exploded (the optimizer's state
        overflows), or global-norm clipping shrank its update because another layer's did."""
        cause = finding.details.get("cause")
        if not isinstance(cause, str) or cause not in finding.message \
                or finding.details.get("cause_kind") == "learning_rate":
            return finding  # a learning rate too small is the cause, explosion or not
        largest = finding.details.get("largest_grad_layer")
        small_only_next_to_it = (largest in exploding and largest != finding.layer
                                 and not finding.details.get("grad_below_abs"))
        if finding.details.get("cause_kind") == "gradient" and finding.layer not in exploding:
            if small_only_next_to_it and not record.clipped:
                return dataclasses.replace(
                    finding,
                    message=(f"{finding.message} The largest layer, '{largest}', is itself "
                             "exploding: this layer's gradient is small only next to it; treat "
                             "that explosion first."),
                    remedy=f"{remedies.BEHIND_AN_EXPLOSION} ('{largest}')")
            if not small_only_next_to_it:
                return self._stalled_by_its_gradient(finding)
        i = record.layers.index(finding.layer) if finding.layer in record.layers else None
        own = float(record.grad_norm[i]) if i is not None else float("nan")
        if finding.layer in exploding or own == math.inf:
            new = (f"Its own gradient has exploded (norm {own:.3g}): an update from a gradient "
                   "this large overflows the optimizer's state (Adam's running second moment "
                   "turns inf and its step becomes 0) or is clipped to nothing.")
            remedy = remedies.EXPLODING
        elif small_only_next_to_it and record.clipped:  # not one that vanished alone
            total = float(np.sqrt(np.nansum(np.where(record.has_grad, record.grad_norm, 0.0) ** 2)))
            new = (f"Gradient clipping by the global norm clipped this step: the total gradient "
                   f"norm is {total:.3g}, nearly all of it from the exploding layer '{largest}', "
                   "so every layer's update is scaled down by the same factor and one with an "
                   "ordinary gradient barely moves.")
            remedy = f"{remedies.BEHIND_AN_EXPLOSION} ('{largest}'); then " + remedies.STALLED
        else:
            return finding
        return dataclasses.replace(finding, message=finding.message.replace(cause, new),
                                   remedy=remedy, details={**finding.details, "cause": new})

    def _stalled_by_its_gradient(self, finding: Finding) -> Finding:
        """A layer stalled because its gradient vanished: the remedies ranked by what sits
        between it and the loss, as for a ``vanishing`` finding; for a gradient of exactly 0,
        the sites that pass none named."""
        between = self.between(finding.layer)
        if between is None:
            return finding
        acts = self.activations
        assert acts is not None
        ratio = float(finding.details.get("grad_ratio_to_largest", float("nan")))
        ranked = (_remedy_behind(acts, between, ratio) if between
                  else remedies.VANISHING_WITHOUT_ACTIVATIONS)
        blocked = self.blocking(between)
        message = finding.message
        if blocked and finding.details.get("grad_zero"):
            message = f"{message} Sites passing no gradient on the way: {blocked}."
        return dataclasses.replace(finding, message=message, remedy=ranked)

    def _attention(self, finding: Finding, record: StepRecord
                   ) -> tuple[ScoreProjection, float] | None:
        """The finding's layer as an attention query or key projection whose value projection
        is not vanishing (above the vanishing rule's floor on this record) and gets at least
        :data:`VALUE_ABOVE_SCORES` x its gradient, with that ratio; ``None`` otherwise (a value
        projection as small says the cause lies elsewhere)."""
        if not finding.value > 0.0:
            return None
        projection = score_projection(finding.layer, self.tree)
        if projection is None or projection.value not in record.layers:
            return None
        i = record.layers.index(projection.value)
        value = float(record.grad_norm[i])
        floor = finding.details.get("vanishing_floor")
        if not isinstance(floor, float):  # without the rule's floor, not judged
            return None
        measured = record.measured is None or bool(record.measured[i])  # this optimizer's
        if not (measured and record.has_grad[i] and math.isfinite(value)) or value <= floor \
                or value < VALUE_ABOVE_SCORES * finding.value:
            return None
        return projection, value / finding.value

    def between(self, layer: str) -> list[int] | None:
        """The activation sites (indices into the latest activation record) between ``layer``
        and the loss; ``None`` when no activation statistics or no position are known."""
        acts = self.activations
        layer_pos = self.tree.position(layer)
        after = self.sites_after(layer)
        if acts is None or (layer_pos is None and after is None) or not len(acts.sites):
            return None
        if after is not None:
            return after
        return [i for i, s in enumerate(acts.sites)
                if layer_pos is not None and self.tree.site_position(s) > layer_pos]

    def blocking(self, sites: list[int]) -> str:
        """Of ``sites``, those where at least :data:`BLOCKING_SHARE` of the units passed no
        gradient (dead) or almost none (saturated) on the latest activation step, as text
        (``""``: none)."""
        acts = self.activations
        if acts is None:
            return ""
        named = []
        for i in sites:
            share = float(acts.dead[i] if acts.families[i] == "rectifier" else acts.saturated[i])
            if share >= BLOCKING_SHARE:
                what = "dead" if acts.families[i] == "rectifier" else "saturated"
                named.append(f"'{acts.sites[i]}' ({share:.0%} {what})")
        return ", ".join(named)

    def _vanishing(self, finding: Finding, record: StepRecord,
                   exploding: frozenset[str]) -> Finding:
        notes: list[str] = []
        details = dict(finding.details)
        ranked = remedies.VANISHING
        largest = details.get("largest_layer")
        if largest in exploding and largest != finding.layer and finding.value > 0.0 \
                and not details.get("below_abs"):  # small on its own too: vanished for real
            return dataclasses.replace(
                finding,
                message=(f"{finding.message} The largest layer, '{largest}', is itself "
                         "exploding: this layer is small only next to it; treat that explosion "
                         "first."),
                remedy=f"{remedies.BEHIND_AN_EXPLOSION} ('{largest}')",
                details={**details, "largest_exploding": True})
        acts = self.activations
        between = self.between(finding.layer)
        attention = self._attention(finding, record)  # a query/key projection, far below its value
        if finding.value == 0.0:
            zero_ops = {m: ops for m, ops in self.cut_ops.items()
                        if any("zero derivative" in op for op in ops)}
            blocked = self.blocking(between or [])
            notes.append(
                "The gradient is exactly zero: "
                + (f"sites between this layer and the loss pass none: {blocked}." if blocked
                   else "an operation with zero derivative (round, floor, sign, a step "
                        "function) or a layer of dead units lies between this layer and the "
                        "loss.")
                + (f" Seen: {zero_ops}." if zero_ops else "")
            )
        if acts is not None and between is not None:
            if between:
                kinds = Counter(acts.kinds[i] for i in between)
                gains = [float(acts.gain[i]) for i in between]
                expected = math.prod(gains)
                mean_gain = sum(gains) / len(gains)
                measured = float(details.get("ratio_to_largest", float("nan")))
                kinds_text = ", ".join(f"{n} {k}" for k, n in kinds.most_common())
                rest = (" (the rest comes from the weights' scale, i.e. initialisation)"
                        if measured > 0.0 else "")
                notes.append(
                    f"Between this layer and the loss: {kinds_text} site(s), mean derivative "
                    f"{mean_gain:.3g}: expected shrink from the activations alone "
                    f"~{expected:.2g}, measured {measured:.2g}{rest}."
                )
                details.update(sites_between=len(between), mean_gain=mean_gain,
                               expected_shrink=expected, activation_kinds=dict(kinds))
                if attention is None:
                    ranked = _remedy_behind(acts, between, measured)
            else:
                notes.append(
                    "No activation sits between this layer and the loss: the shrink comes from "
                    "the weights (initialisation scale too small) or the loss itself."
                )
                ranked = remedies.VANISHING_WITHOUT_ACTIVATIONS
        message = finding.message
        moving = self.still_moving(finding.layer, finding.value)
        if attention is not None:
            projection, value_ratio = attention
            notes.append(scores_note(finding.layer, projection, value_ratio))
            details.update(attention_projection=projection.role,
                           value_projection=projection.value, value_ratio=value_ratio)
            # waiting is advice only where the weights still move
            ranked = (remedies.ATTENTION_SCORES if moving is None
                      else remedies.ATTENTION_SCORES_MOVING)
        if moving is not None:
            step, ratio, median = moving
            message = message.replace(remedies.BARELY_LEARNS, ".")
            notes.append(
                f"Its weights still move, though: at step {step} one optimizer step changed them "
                f"by {ratio:.2g} of their norm (the median layer: {median:.2g}), with a gradient "
                "already this small; an optimizer that normalises each weight's step by its "
                "gradient's running size (Adam, RMSprop) keeps such a layer learning, so this is "
                "a warning sign rather than a stall yet."
            )
            details.update(update_ratio=ratio, median_update_ratio=median)
        if not notes:
            return finding
        return dataclasses.replace(
            finding, message=f"{message} {' '.join(notes)}", remedy=ranked, details=details
        )
