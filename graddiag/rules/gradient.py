"""Rules turn step records into findings. Pure: no I/O, no torch hooks, no Lightning.

Each rule keeps a little state (streaks, running levels) so that a condition is reported once
when it begins (after its patience), not on every step it lasts. ``active`` says whether the
condition holds on the current step, which is what actions such as ``skip`` act on.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from graddiag.data.findings import Finding
from graddiag.data.records import StepRecord
from graddiag.rules import wording as remedies
from graddiag.rules.early import EarlyConfirmation
from graddiag.rules.onsets import OnsetRule, _fmt


class VanishingRule(OnsetRule):
    """A layer's gradient norm is below ``abs_floor`` or below ``rel_floor`` x the largest layer's.

    Below ``early_rel`` x the largest layer's (overwhelming evidence) it is reported after
    ``early_patience`` recorded steps instead of ``patience``.
    """

    kind = "vanishing"

    def __init__(self, abs_floor: float, rel_floor: float, patience: int,
                 early_rel: float = 0.0, early_patience: int = 1) -> None:
        super().__init__(patience)
        self.abs_floor = abs_floor
        self.rel_floor = rel_floor
        self.early_rel = early_rel  # --- early report on overwhelming evidence (rules/early.py)
        self.early = EarlyConfirmation(early_patience)

    def update(self, record: StepRecord) -> list[Finding]:
        norms = record.grad_norm
        healthy = record.healthy_range
        if healthy is not None:  # every layer finite and positive: whole-array comparisons
            low, top = healthy
            threshold = max(self.abs_floor, self.rel_floor * top)
            if low >= threshold and self.onsets.idle and self.early.onsets.idle:
                self._active = False  # no layer below either floor: nothing begins or ends
                return []
            return self._judge(record, top, None, norms < threshold,
                               norms < min(self.early_rel * top, threshold), None)
        usable = record.has_grad & np.isfinite(norms)
        if record.measured is not None:
            usable &= record.measured
        if record.amp_overflow or not usable.any():
            self._active = False
            return []
        top_pos = int(np.argmax(np.where(usable, norms, -np.inf)))
        top = float(norms[top_pos])
        below = usable & (norms < max(self.abs_floor, self.rel_floor * top))
        return self._judge(record, top, top_pos, below, below & (norms < self.early_rel * top),
                           record.measured)

    def _judge(self, record: StepRecord, top: float, top_pos: int | None, below: np.ndarray,
               deep: np.ndarray, evaluated: np.ndarray | None) -> list[Finding]:
        """Streaks and findings from the layers ``below`` a floor and those far below
        (``deep``, for the early report); ``top_pos``: the largest layer (``None``: found here,
        when a finding needs it)."""
        onsets = self.onsets.observe_all(record.layers, below, evaluated)
        early: list[int] = []
        if self.early_rel > 0:  # --- early report: far below the largest, fewer steps needed
            early = self.early.confirm(self.onsets, record.layers, deep, evaluated)
        self._active = self.onsets.any_confirmed() or self.early.any_confirmed()
        if not len(onsets) and not early:
            return []
        norms = record.grad_norm
        top_pos = int(np.argmax(norms)) if top_pos is None else top_pos
        rel_threshold = self.rel_floor * top
        return [self._finding(record, int(i), top_pos, bool(norms[i] < self.abs_floor),
                              rel_threshold) for i in onsets] + [
            self._finding(record, i, top_pos, False, self.early_rel * top,
                          steps=self.early.onsets.patience) for i in early]

    def _finding(self, record: StepRecord, i: int, top_pos: int, below_abs: bool,
                 rel_threshold: float, steps: int | None = None) -> Finding:
        value = float(record.grad_norm[i])
        top = float(record.grad_norm[top_pos])
        ratio = value / top if top > 0 else 0.0
        if below_abs:
            evidence = f"gradient norm {_fmt(value)} is below the floor {_fmt(self.abs_floor)}"
        else:
            evidence = (f"gradient norm {_fmt(value)} is {_fmt(ratio)} x the largest layer's "
                        f"('{record.layers[top_pos]}', {_fmt(top)})")
        return Finding(
            kind=self.kind,
            layer=record.layers[i],
            step=record.step,
            value=value,
            threshold=self.abs_floor if below_abs else rel_threshold,
            message=(f"Vanishing gradient: {evidence} for {steps or self.onsets.patience} "
                     f"recorded steps{remedies.BARELY_LEARNS}"
                     + ("" if steps is None else
                        f" Reported early: below {_fmt(self.early_rel)} x the largest layer's, "
                        "the evidence is overwhelming.")),
            remedy=remedies.VANISHING,
            details={"ratio_to_largest": ratio, "largest_layer": record.layers[top_pos],
                     "largest_norm": top, "early": steps is not None,
                     "below_abs": value < self.abs_floor,
                     # the floor a layer must clear not to vanish (an early report's own
                     # threshold is far below it)
                     "vanishing_floor": float(max(self.abs_floor, self.rel_floor * top))},
        )

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "early": self.early.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if "early" in state:
            self.early.load_state_dict(state["early"])


class ExplodingRule(OnsetRule):
    """A layer's gradient norm exceeds ``abs_ceiling`` or ``factor`` x its own recent level.

    The recent level is a running geometric mean (an exponential moving average of
    ``log(norm)`` with the span of ``window`` recorded steps): robust to single spikes, O(layers)
    per step. A jump is judged only after ``min_history`` finite values, and only when the new
    norm is also above the largest recent level of any layer: a layer growing from a tiny
    initial scale up to the model's level (LayerScale initialised at 1e-6, zero-initialised
    residual branches, LoRA adapters) is not exploding, however fast it grows.
    """

    kind = "exploding"
    min_history = 5

    def __init__(self, abs_ceiling: float, factor: float, window: int, patience: int) -> None:
        super().__init__(patience)
        self.abs_ceiling = abs_ceiling
        self.factor = factor
        self.window = window
        self.alpha = 2.0 / (window + 1.0)
        self.log_factor = math.log(factor)
        self.log_level: np.ndarray | None = None
        self.count: np.ndarray | None = None
        self.layers: list[str] = []
        self._settled = False  # every layer has min_history values (known true, else unknown)

    def _ensure(self, layers: list[str]) -> None:
        if self.log_level is None or self.count is None:
            self.layers = layers
            self.log_level = np.zeros(len(layers))
            self.count = np.zeros(len(layers), dtype=int)
        elif layers is not self.layers and layers != self.layers:  # layers changed: by name
            known = {n: (lv, c) for n, lv, c in zip(self.layers, self.log_level, self.count)}
            self.log_level = np.array([known.get(n, (0.0, 0))[0] for n in layers], dtype=float)
            self.count = np.array([known.get(n, (0.0, 0))[1] for n in layers], dtype=int)
            self.layers = layers
            self._settled = False

    def update(self, record: StepRecord) -> list[Finding]:
        self._active = False
        if record.amp_overflow:
            return []
        self._ensure(record.layers)
        assert self.log_level is not None and self.count is not None
        if self._quiet_step(record):
            return []
        norms = record.grad_norm  # NaN where a layer got no gradient
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            logs = np.log(norms)  # NaN for missing/NaN, -inf for 0, +inf for inf
            # an inf norm whose elements are all finite (float32 overflow) counts as above
            above = norms > self.abs_ceiling
            settled = self.count >= self.min_history
            jump = (logs - self.log_level > self.log_factor) & settled
            if jump.any():  # growing up to the model's level is not an explosion
                jump &= logs > self.log_level[settled].max()
            if record.nonfinite:  # NaN/Inf elements belong to the nonfinite rule
                bad = list(record.nonfinite)
                above[bad] = False
                jump[bad] = False
            condition = above | jump
            if record.measured is not None:
                condition &= record.measured
            onsets = self.onsets.observe_all(record.layers, condition, record.measured)
            self._active = self.onsets.any_confirmed()
            findings = [self._finding(record, int(i), bool(above[i]),
                                      float(np.exp(self.log_level[i]))) for i in onsets]
            usable = np.isfinite(logs)
            self.log_level = np.where(usable, self.log_level + self.alpha * (logs - self.log_level),
                                      self.log_level)
            first = usable & (self.count == 0)
            if first.any():
                self.log_level[first] = logs[first]
            self.count += usable
        return findings

    def _quiet_step(self, record: StepRecord) -> bool:
        """The usual step, in a handful of whole-array operations: every layer finite, positive,
        settled, under the ceiling and within ``factor`` of its level, no streak running. Moves
        the levels exactly as :meth:`update` would and returns ``True``; otherwise changes
        nothing and returns ``False``."""
        healthy = record.healthy_range
        if healthy is None or healthy[1] > self.abs_ceiling or not self.onsets.idle:
            return False
        assert self.log_level is not None and self.count is not None
        if not self._settled:
            self._settled = bool(self.count.min() >= self.min_history)
            if not self._settled:
                return False
        step = np.log(record.grad_norm, dtype=np.float64)  # the levels are float64
        step -= self.log_level
        if step.max() > self.log_factor:
            return False
        step *= self.alpha
        self.log_level += step
        self.count += 1
        return True

    def _finding(self, record: StepRecord, i: int, above: bool, level: float) -> Finding:
        value = float(record.grad_norm[i])
        if above:
            evidence = f"gradient norm {_fmt(value)} exceeds the ceiling {_fmt(self.abs_ceiling)}"
            threshold = self.abs_ceiling
        else:
            evidence = (f"gradient norm {_fmt(value)} is {_fmt(value / level)} x its recent "
                        f"level {_fmt(level)}")
            threshold = self.factor * level
        return Finding(
            kind=self.kind,
            layer=record.layers[i],
            step=record.step,
            value=value,
            threshold=threshold,
            message=f"Exploding gradient: {evidence}; updates this large destabilise training.",
            remedy={"norm": remedies.EXPLODING_WHILE_CLIPPING,
                    "value": remedies.EXPLODING_WHILE_CLIPPING_BY_VALUE,
                    None: remedies.EXPLODING}[record.clipping],
            details={"recent_level": level},
        )

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.log_level is not None and self.count is not None:
            state["level"] = {n: [float(level), int(c)] for n, level, c in
                              zip(self.layers, self.log_level, self.count)}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        level = state.get("level")
        if level:
            self.layers = list(level)
            self.log_level = np.array([v[0] for v in level.values()], dtype=float)
            self.count = np.array([v[1] for v in level.values()], dtype=int)
            self._settled = False


class NonfiniteRule(OnsetRule):
    """Some gradient holds NaN or Inf; names the origin: the affected layer nearest the loss."""

    kind = "nonfinite"
    key = "model"
    #: Below this loss scale, inf/NaN gradients are no longer an fp16 overflow of the scaling.
    amp_scale_floor = 1.0

    def __init__(self) -> None:
        super().__init__(patience=1)
        self.amp_overflows = 0

    def update(self, record: StepRecord) -> list[Finding]:
        self.amp_overflows = self.amp_overflows + 1 if record.amp_overflow else 0
        if record.amp_overflow and record.amp_scale is not None \
                and record.amp_scale < self.amp_scale_floor:
            return self._persistent_overflow(record)
        bad = sorted(record.nonfinite) if not record.amp_overflow else []
        self._active = bool(bad)
        if not self.onsets.observe(self.key, bool(bad)):
            return []
        origin = bad[-1]  # layers are in forward order: the last is nearest the loss
        name = record.layers[origin]
        counts = record.nonfinite[origin]
        upstream = len(bad) - 1
        where = ", ".join(f"{p}: {n} element(s)" if n >= 0 else f"{p}: NaN/Inf"
                          for p, n in counts.items())
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
                    f"Non-finite gradients on {self.amp_overflows} consecutive AMP steps, still "
                    f"with a loss scale of {record.amp_scale:.3g}: this is not an fp16 overflow "
                    "of the scaled loss but NaN/Inf produced by the model or the loss."
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


class NoGradientRule(OnsetRule):
    """A trainable parameter (``requires_grad=True``) received no gradient at all."""

    kind = "no_gradient"

    def update(self, record: StepRecord) -> list[Finding]:
        if not record.missing and self.onsets.idle:
            self._active = False
            return []
        condition = np.zeros(len(record.layers), dtype=bool)
        if record.missing:
            condition[list(record.missing)] = True
        onsets = self.onsets.observe_all(record.layers, condition, record.measured)
        self._active = self.onsets.any_confirmed()
        return [self._finding(record, int(i)) for i in onsets]

    def _finding(self, record: StepRecord, i: int) -> Finding:
        name = record.layers[i]
        params = record.missing[i]
        judged = record.has_grad if record.measured is None else record.has_grad[record.measured]
        # some layer got one (this layer's graph is cut), or a lone layer (nothing to compare)
        anywhere = bool(judged.any()) or judged.size < 2
        return Finding(
            kind=self.kind,
            layer=name,
            step=record.step,
            value=float(len(params)),
            threshold=0.0,
            message=(
                f"No gradient: trainable parameter(s) {params} of '{name}' got no gradient "
                f"(.grad is None) for {self.onsets.patience} recorded steps, so the optimizer "
                "never updates them. "
                + ("Nothing between them and the loss is differentiable, or they are unused."
                   if anywhere else
                   "No monitored layer got a gradient on these steps: the gradients are read "
                   "before the backward pass (monitor.step() before loss.backward(), or after "
                   "optimizer.zero_grad()), or the loss has no graph.")
            ),
            remedy=remedies.NO_GRADIENT if anywhere else remedies.NO_GRADIENT_ANYWHERE,
            details={"parameters": list(params)},
        )
