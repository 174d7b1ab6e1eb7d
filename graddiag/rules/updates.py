"""Rules on how much the weights move: ``stalled``, ``unstable_update`` and ``not_in_optimizer``.

The update ratio ``||w_t - w_(t-1)|| / ||w_t||`` is the change one optimizer step makes to a
layer's weights, relative to their size; around 1e-3 is the usual healthy range. Only records
that carry update ratios (parameter steps) advance ``stalled``/``unstable_update``, so their
patience counts parameter steps.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from graddiag.data.findings import Finding
from graddiag.data.options import MonitorConfig
from graddiag.data.records import StepRecord
from graddiag.rules import wording
from graddiag.rules.onsets import OnsetRule, Rule, _fmt

#: A layer's learning rate this far below the largest counts as "too small for this layer".
LR_GAP = 1e-2
#: A learning rate at or below this fraction of the largest the layer has had is a schedule's
#: decay (cosine to 0, step decay, a first halving), not a mistake: a tiny one is then not
#: reported on its own.
LR_DECAYED = 0.5
#: Weights whose RMS starts below this start from (near) zero: below any standard
#: initialisation (Kaiming/Xavier give ~1/sqrt(fan_in), 2e-3 even for a fan-in of 250,000), as in
#: LayerScale (1e-6..1e-4), ReZero gates, zero-initialised heads and LoRA ``B`` matrices.
SMALL_START_RMS = 1e-3


def _judged(record: StepRecord, ratio: np.ndarray) -> np.ndarray:
    """Layers whose ratio says something about their optimizer: held, trainable, measured."""
    judged = np.isfinite(ratio) & record.has_grad
    if record.measured is not None:
        judged &= record.measured
    if record.learning_rate is not None:
        judged &= ~(record.learning_rate == 0.0)  # frozen on purpose (lr 0): said so, not judged
    if record.orphaned:
        judged &= ~np.isin(np.asarray(record.layers, dtype=object), list(record.orphaned))
    return judged


def _lr_text(record: StepRecord, i: int) -> tuple[str, float]:
    if record.learning_rate is None or np.isnan(record.learning_rate[i]):
        return "", float("nan")
    return f" Its learning rate is {_fmt(float(record.learning_rate[i]))}.", float(
        record.learning_rate[i]
    )


#: An update between these multiples of one plain gradient step (learning rate x gradient norm
#: / weight norm) is that step: SGD gives 1, momentum up to 1 / (1 - momentum) (10 at 0.9); the
#: gradient read on the parameter step stands for the one the measured update used. Judged only
#: for layers whose optimizers step along the gradient (SGD): see :func:`_steps_along_gradient`.
GRADIENT_STEP_BAND = (0.5, 20.0)
#: A layer whose weights' RMS is this many times the median of the other layers' has weights of
#: another scale (a LayerNorm gain, RMS 1, is about 50x a GPT-2 linear layer's 0.02).
WEIGHT_SCALE_GAP = 100.0


def _gradient_step(lr: float, record: StepRecord, i: int) -> float:
    """The update ratio one plain gradient step gives layer ``i``: ``lr`` x its gradient norm /
    its weight norm (NaN where a factor is unknown, zero or not finite). An update ratio within
    :data:`GRADIENT_STEP_BAND` of it means the optimizer moves the layer as plain SGD would, so a
    small update comes from a gradient small for the weights, not from the optimizer."""
    if record.param_norm is None:
        return math.nan
    weight, grad = float(record.param_norm[i]), float(record.grad_norm[i])
    if not (lr > 0 and weight > 0 and grad > 0 and math.isfinite(weight * grad)):
        return math.nan
    return lr * grad / weight


def _steps_along_gradient(record: StepRecord, i: int) -> bool:
    """Whether layer ``i``'s optimizers step along its gradient (SGD): only then does an update
    near one plain gradient step say the gradient is what keeps it small (Adam moves every
    weight by about the learning rate, whatever the gradient's size unless it is near Adam's
    eps). Unknown (a record without ``along_gradient``, which live records read with the
    learning rates always carry): not judged."""
    return record.along_gradient is not None and bool(record.along_gradient[i])


def _weight_scale(rms: np.ndarray | None, i: int) -> tuple[float, float]:
    """Layer ``i``'s weight RMS over the median of the other layers' (NaN with fewer than two
    others with weights), and that median."""
    if rms is None:
        return math.nan, math.nan
    others = np.delete(rms, i)
    others = others[np.isfinite(others) & (others > 0)]
    if len(others) < 2 or not rms[i] > 0:
        return math.nan, math.nan
    median = float(np.median(others))
    return float(rms[i]) / median, median


def _rms(record: StepRecord) -> np.ndarray | None:
    """Each layer's root-mean-square weight (NaN where a layer has no counted elements), or
    ``None`` when the record carries no parameter statistics."""
    norm, count = record.param_norm, record.param_count
    if norm is None or count is None:
        return None
    norm, count = np.asarray(norm, dtype=float), np.asarray(count, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((count > 0) & np.isfinite(norm), norm / np.sqrt(count), np.nan)


class StalledRule(OnsetRule):
    """A layer with gradients whose weights barely move, while the rest of the model moves, or
    whose learning rate is too small to move weights of their size at all.

    The second case needs the learning rate (``optimizers=`` in a plain loop; the callback reads
    it): ``lr / RMS(w)`` below ``ratio_floor`` means even Adam, which moves every weight by about
    the learning rate, changes the weights by less than that fraction per step. It is judged
    where no layer moves by ``ratio_floor`` (a mistyped exponent slows every layer alike, while
    a LayerNorm's weights of 1 at a fine-tuning rate of 5e-7 sit below it next to layers that
    move), and not while the layer's learning rate rises (a warm-up under way) or is at most
    :data:`LR_DECAYED` of the largest it has had or of the rate its scheduler started from
    (``initial_lr``: a warm-up stepped per epoch, a decay, also one from before the monitor
    started). A rate set by hand far below a scheduler's ``initial_lr`` reads as a decay. The
    learning rate of a record is the one its step will apply, its ratio the update of the step
    before: under a schedule they differ by one step's change.
    """

    kind = "stalled"

    def __init__(self, ratio_floor: float, rel_floor: float, patience: int,
                 vanishing_rel: float, vanishing_abs: float = 0.0, norm_type: float = 2.0) -> None:
        super().__init__(patience)
        self.ratio_floor = ratio_floor
        #: The p of the records' gradient norms: a plain gradient step is compared with the
        #: update (a 2-norm) only when it is 2.
        self.norm_type = norm_type
        self.rel_floor = rel_floor
        self.vanishing_rel = vanishing_rel
        self.vanishing_abs = vanishing_abs
        # per layer of ``_lr_layers``: the learning rate of its last parameter step, and the
        # largest one so far (NaN: not known yet)
        self._lr_layers: list[str] = []
        self._last_lr = np.zeros(0)
        self._peak_lr = np.zeros(0)

    def update(self, record: StepRecord) -> list[Finding]:
        ratio = record.update_ratio
        if ratio is None or record.amp_overflow:
            return []
        tiny_lr = self._tiny_learning_rates(record)
        judged = _judged(record, ratio)
        if not judged.any():
            return []
        top_pos = int(np.argmax(np.where(judged, ratio, -np.inf)))
        top = float(ratio[top_pos])
        lagging = ratio < self.rel_floor * top
        if top < self.ratio_floor:  # nothing moves: a learning rate too small is one cause
            lagging |= tiny_lr
        condition = judged & (ratio < self.ratio_floor) & lagging
        onsets = self.onsets.observe_all(record.layers, condition, judged)
        self._active = self.onsets.any_confirmed()
        return [self._finding(record, int(i), top_pos) for i in onsets]

    def _tiny_learning_rates(self, record: StepRecord) -> np.ndarray:
        """Per layer: a learning rate too small for the weights' size (``lr / RMS(w)`` below
        ``ratio_floor``), neither rising since the last parameter step nor decayed; notes each
        layer's learning rate for the next call."""
        lrs, rms = record.learning_rate, _rms(record)
        if lrs is None or rms is None:
            return np.zeros(len(record.layers), dtype=bool)
        self._follow(record.layers)
        lr = np.asarray(lrs, dtype=float)
        known = np.isfinite(lr)
        last = self._last_lr
        peak = np.where(known, np.fmax(self._peak_lr, lr), self._peak_lr)
        base = record.base_learning_rate
        # a scheduler's starting rate also shows a warm-up stepped per epoch, or a decay from
        # before the monitor started, as a rate at most half of it
        reference = peak if base is None else np.fmax(peak, base)
        with np.errstate(invalid="ignore", divide="ignore"):  # NaN compares False: not tiny
            tiny = ((lr > 0.0) & (lr <= last) & (lr > LR_DECAYED * reference) & (rms > 0.0)
                    & (lr / rms < self.ratio_floor))
        self._last_lr = np.where(known, lr, last)
        self._peak_lr = peak
        return tiny

    def _follow(self, layers: list[str]) -> None:
        """Align the remembered learning rates with ``layers`` (a new layout keeps each known
        layer's, by name)."""
        if layers is self._lr_layers or layers == self._lr_layers:
            self._lr_layers = layers
            return
        last, peak = self.learning_rates_seen()
        self._lr_layers = layers
        self._last_lr = np.array([last.get(name, np.nan) for name in layers], dtype=float)
        self._peak_lr = np.array([peak.get(name, np.nan) for name in layers], dtype=float)

    def learning_rates_seen(self) -> tuple[dict[str, float], dict[str, float]]:
        """Per layer name: the learning rate of its last parameter step, and its largest."""
        last = {n: float(v) for n, v in zip(self._lr_layers, self._last_lr) if np.isfinite(v)}
        peak = {n: float(v) for n, v in zip(self._lr_layers, self._peak_lr) if np.isfinite(v)}
        return last, peak

    def _finding(self, record: StepRecord, i: int, top_pos: int) -> Finding:
        assert record.update_ratio is not None
        value = float(record.update_ratio[i])
        top = float(record.update_ratio[top_pos])
        lr_text, lr = _lr_text(record, i)
        lrs = record.learning_rate
        largest_lr = (float(np.nanmax(lrs)) if lrs is not None and np.isfinite(lrs).any()
                      else float("nan"))
        grads = np.where(record.has_grad & np.isfinite(record.grad_norm), record.grad_norm, -np.inf)
        top_grad_pos = int(np.argmax(grads))
        top_grad = float(grads[top_grad_pos])
        grad_ratio = float(record.grad_norm[i]) / top_grad if top_grad > 0 else float("nan")
        rms_all = _rms(record)
        rms = float("nan") if rms_all is None else float(rms_all[i])
        gets = "gets gradients" if record.grad_norm[i] != 0.0 else "has a .grad (all zeros)"
        step = _gradient_step(lr, record, i)  # one plain gradient step's update ratio
        cause_kind = "learning_rate"  # what the evidence points to (the explainer reads it)
        scale, median_rms = _weight_scale(rms_all, i)
        if lr_text and lr < LR_GAP * largest_lr:
            cause = (f"{lr_text[1:-1]}, against {_fmt(largest_lr)} for other layers: too small a "
                     "learning rate for this layer.")
            remedy = wording.STALLED_LR
        elif scale > WEIGHT_SCALE_GAP and record.grad_norm[i] != 0.0:  # NaN compares False
            cause_kind = "weight_scale"
            cause = (f"Its weights are {_fmt(scale)} x larger than the other layers' (RMS "
                     f"{_fmt(rms)} against a median of {_fmt(median_rms)}): an update of the usual "
                     "size is a tiny fraction of them, and where a normalisation follows them "
                     "their gradient is smaller by the same factor.")
            remedy = wording.STALLED_WEIGHT_SCALE
        elif lr_text and rms > 0 and lr / rms < self.ratio_floor:
            cause = (f"{lr_text[1:-1]}: too small for weights of this size (RMS {_fmt(rms)}); "
                     "even an optimizer that moves every weight by about the learning rate (Adam) "
                     f"changes them by ~{_fmt(lr / rms)} of their norm per step.")
            remedy = wording.STALLED_TINY_LR
        elif record.grad_norm[i] == 0.0:
            cause_kind = "gradient"
            cause = ("Its gradient is exactly 0: nothing flows back to these weights (units "
                     "that pass no gradient, or an operation with zero derivative, between them "
                     "and the loss).")
            remedy = wording.VANISHING
        elif grad_ratio < self.vanishing_rel:
            cause_kind = "gradient"
            cause = (f"Its gradient norm is {_fmt(grad_ratio)} x the largest layer's: the gradient "
                     "has vanished before it reaches these weights.")
            remedy = wording.VANISHING
        elif (lr_text and self.norm_type == 2.0 and _steps_along_gradient(record, i)
              and GRADIENT_STEP_BAND[0] <= value / step <= GRADIENT_STEP_BAND[1]):  # NaN: False
            cause_kind = "gradient_step"
            cause = (f"{lr_text[1:]} The update is about one plain gradient step (learning rate x "
                     f"gradient norm / weight norm = {_fmt(step)}), as SGD takes: the optimizer "
                     f"does not scale it down, but the gradient ({_fmt(grad_ratio)} x the largest "
                     "layer's) is small for weights of this size.")
            remedy = wording.STALLED_GRADIENT_STEP
        elif lr_text:
            cause_kind = "optimizer"
            cause = (f"{lr_text[1:]} Its gradient is not small ({_fmt(grad_ratio)} x the largest "
                     "layer's), so the optimizer scales its update down (e.g. Adam's steps "
                     "cancelling on a gradient whose sign keeps changing, its eps, weight decay "
                     "cancelling the update, a custom optimizer).")
            remedy = wording.STALLED_OPTIMIZER
        else:
            cause_kind = "unknown"
            cause = ("Causes: too small a learning rate for this layer's param group, a vanished "
                     "gradient, or an optimizer that does not hold the parameter (pass "
                     "optimizers= to GradientMonitor to have graddiag check these).")
            remedy = wording.STALLED
        return Finding(
            kind=self.kind,
            layer=record.layers[i],
            step=record.step,
            value=value,
            threshold=self.ratio_floor,
            message=(f"Stalled weights: one optimizer step changes them by {_fmt(value)} of their "
                     f"norm (usual: ~1e-3; the fastest layer '{record.layers[top_pos]}' moves "
                     f"{_fmt(top)}) on {self.onsets.patience} parameter steps in a row, although "
                     f"the layer {gets}; it does not learn. {cause}"),
            remedy=remedy,
            details={"fastest_layer": record.layers[top_pos], "fastest_ratio": top,
                     "learning_rate": lr, "largest_learning_rate": largest_lr,
                     "grad_ratio_to_largest": grad_ratio,
                     "grad_zero": bool(record.grad_norm[i] == 0.0), "cause": cause,
                     "cause_kind": cause_kind,
                     # vanished on its own: 0, or below the vanishing rule's absolute floor
                     "grad_below_abs": bool(record.grad_norm[i] <= self.vanishing_abs),
                     "largest_grad_layer": (record.layers[top_grad_pos] if top_grad > 0
                                            else None),
                     # its weights' RMS over the median of the other layers' (NaN: unknown)
                     "weight_scale": scale},
        )

    def state_dict(self) -> dict[str, Any]:
        last, peak = self.learning_rates_seen()
        return {**super().state_dict(), "last_lr": last, "peak_lr": peak}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        last, peak = state.get("last_lr", {}), state.get("peak_lr", {})
        self._lr_layers = sorted(set(last) | set(peak))
        self._last_lr = np.array([last.get(n, np.nan) for n in self._lr_layers], dtype=float)
        self._peak_lr = np.array([peak.get(n, np.nan) for n in self._lr_layers], dtype=float)


class UnstableUpdateRule(OnsetRule):
    """One optimizer step changes a layer's weights by a large fraction of their norm.

    A layer whose weights start from (near) zero (RMS below :data:`SMALL_START_RMS` at its first
    parameter read: LayerScale, ReZero, zero-initialised heads, LoRA ``B``) grows with ratios of
    ~1/t on its first steps by construction; it is judged once its ratio has first come below
    the ceiling.
    """

    kind = "unstable_update"

    def __init__(self, ceiling: float, patience: int) -> None:
        super().__init__(patience)
        self.ceiling = ceiling
        self.first_norm: dict[str, float] = {}
        self.settling: set[str] = set()

    def _note_starts(self, record: StepRecord) -> None:
        if record.param_norm is None:
            return
        counts = record.param_count
        for i, (name, norm) in enumerate(zip(record.layers, record.param_norm)):
            if name not in self.first_norm and np.isfinite(norm):
                self.first_norm[name] = float(norm)
                size = float(counts[i]) if counts is not None and counts[i] > 0 else 1.0
                if norm / np.sqrt(size) < SMALL_START_RMS:
                    self.settling.add(name)

    def update(self, record: StepRecord) -> list[Finding]:
        self._note_starts(record)
        ratio = record.update_ratio
        if ratio is None or record.amp_overflow:
            return []
        judged = _judged(record, ratio)
        with np.errstate(invalid="ignore"):
            above = ratio > self.ceiling
        if self.settling:
            for i, name in enumerate(record.layers):
                if name in self.settling and judged[i]:
                    if not above[i]:
                        self.settling.discard(name)
                    judged[i] = False
        condition = judged & above
        onsets = self.onsets.observe_all(record.layers, condition, judged)
        self._active = self.onsets.any_confirmed()
        return [self._finding(record, int(i)) for i in onsets]

    def _finding(self, record: StepRecord, i: int) -> Finding:
        assert record.update_ratio is not None
        value = float(record.update_ratio[i])
        lr_text, lr = _lr_text(record, i)
        return Finding(
            kind=self.kind,
            layer=record.layers[i],
            step=record.step,
            value=value,
            threshold=self.ceiling,
            message=(f"Unstable update: one optimizer step changes this layer's weights by "
                     f"{_fmt(value)} of their norm (usual: ~1e-3) on {self.onsets.patience} "
                     "parameter steps in a row; the weights are replaced rather than refined, "
                     "which precedes loss spikes and divergence even while gradient norms look "
                     f"ordinary.{lr_text}"),
            remedy=(wording.UNSTABLE_UPDATE if record.clipping is None
                    else wording.UNSTABLE_UPDATE_WHILE_CLIPPING),
            details={"learning_rate": lr},
        )

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "first_norm": dict(self.first_norm),
                "settling": sorted(self.settling)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.first_norm = dict(state.get("first_norm", {}))
        self.settling = set(state.get("settling", []))


class NotInOptimizerRule(OnsetRule):
    """Trainable parameters (``requires_grad=True``) that no optimizer holds: they never change."""

    kind = "not_in_optimizer"

    def __init__(self) -> None:
        super().__init__(patience=1)

    def update(self, record: StepRecord) -> list[Finding]:
        orphaned = record.orphaned
        if orphaned is None:  # not checked on this step
            return []
        for name in list(self.onsets.streak):
            if name not in orphaned:
                self.onsets.observe(name, False)
        found = [name for name in orphaned if self.onsets.observe(name, True)]
        self._active = bool(orphaned)
        return [self._finding(record, name, orphaned[name]) for name in found]

    def _finding(self, record: StepRecord, name: str, params: list[str]) -> Finding:
        return Finding(
            kind=self.kind,
            layer=name,
            step=record.step,
            value=float(len(params)),
            threshold=0.0,
            message=(f"Not in any optimizer: trainable parameter(s) {params} of '{name}' belong "
                     "to no optimizer's param groups, so they never change, whatever their "
                     "gradients. The classic cause: the module was created after the optimizer "
                     "(after configure_optimizers, or lazily in forward), or the optimizer was "
                     "built from a list of parameters that leaves it out."),
            remedy=wording.NOT_IN_OPTIMIZER,
            details={"parameters": list(params)},
        )


def update_rules(config: MonitorConfig) -> list[Rule]:
    """The update rules with the thresholds of ``config``."""
    return [
        StalledRule(config.stalled_ratio, config.stalled_rel, config.update_patience,
                    config.vanishing_rel, config.vanishing_abs, config.norm_type),
        UnstableUpdateRule(config.unstable_ratio, config.update_patience),
        NotInOptimizerRule(),
    ]
