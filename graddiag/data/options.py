"""Settings shared by :class:`~graddiag.GradientMonitor` and :class:`~graddiag.GradientDiagnostics`.

Every option is checked when the settings are made; a bad value raises ``ValueError`` naming
the option, what is allowed and what was given.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, Sequence, get_args

from graddiag.data.findings import FINDING_KINDS

Action = Literal["warn", "raise", "stop", "skip"]
ACTIONS: tuple[str, ...] = get_args(Action)


@dataclass(frozen=True)
class MonitorConfig:
    """All diagnostics settings. See the README's "Options" table for why each default is what it is.

    Attributes:
        every_n_steps: Record gradient norms on optimizer steps divisible by this. 1 catches a
            non-finite gradient on the step it appears; larger values trade latency for cost.
        norm_type: The p of the p-norm (``1``, ``2``, any ``p > 0`` or ``inf``).
        include: Glob patterns (``fnmatch``) of layer names to monitor; ``None`` monitors all.
        exclude: Glob patterns of layer names to leave out.
        param_every_n_steps: Record parameter norms and update ratios on steps divisible by
            this (0 turns them off). Each such step reads the weights twice and keeps one copy.
        activation_every_n_steps: Record activation statistics on steps divisible by this
            (0 turns them off). Hooks exist only during those steps.
        histogram_every_n_steps: Record per-layer gradient-magnitude histograms (fixed
            log-spaced bins) on steps divisible by this (0, the default, turns them off).
        functional_activations: Also intercept ``torch.sigmoid``, ``F.relu`` and friends
            called inside ``forward`` (and non-differentiable ops such as ``argmax``) on
            activation steps.
        vanishing_abs: A layer whose gradient norm is below this is vanishing.
        vanishing_rel: A layer whose gradient norm is below this fraction of the largest
            layer's gradient norm on the same step is vanishing.
        vanishing_patience: Consecutive recorded steps a layer must be vanishing before it is
            reported.
        exploding_abs: A layer whose gradient norm exceeds this is exploding.
        exploding_factor: A layer whose gradient norm exceeds this multiple of its own recent
            level (a running geometric mean of its recorded norms) is exploding.
        exploding_window: Span, in recorded steps, of that running level (an exponential
            moving average of log-norm with alpha = 2 / (window + 1)).
        exploding_patience: Consecutive recorded steps before ``exploding`` is reported.
        no_gradient_patience: Consecutive recorded steps a trainable parameter must get no
            gradient before ``no_gradient`` is reported.
        derivative_floor: A unit whose local derivative ``|f'(x)|`` is below this passes almost
            no gradient: saturated for sigmoid/tanh-like activations, dead for ReLU-like ones.
        saturated_fraction: An activation site with more than this fraction of saturated units
            is reported ``saturated``.
        dead_fraction: A ReLU-like site with more than this fraction of units that pass no
            gradient for every sample of the batch is reported ``dead_relu``.
        activation_patience: Consecutive activation steps before ``saturated``/``dead_relu``.
        on_nonfinite: Action when a gradient is NaN/Inf: ``warn``, ``raise``, ``stop`` or ``skip``.
        on_exploding: Action when a gradient explodes: ``warn``, ``raise``, ``stop`` or ``skip``.
        ignore: Finding kinds never reported.
        max_history_rows: Upper bound on rows (steps x layers) kept in ``history``; older records
            are thinned (every second dropped) to stay under it, onset steps kept.
        replay_nonfinite: When a ``nonfinite`` finding begins, re-run that step's forward and
            backward pass (same batch, weights and random state) with checks on every operation
            and name the first one whose output or gradient became non-finite, with its source
            line. Costs one extra forward and backward pass per onset, nothing on other steps.
    """

    every_n_steps: int = 1
    norm_type: float = 2.0
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    param_every_n_steps: int = 50
    activation_every_n_steps: int = 50
    histogram_every_n_steps: int = 0
    functional_activations: bool = True
    vanishing_abs: float = 1e-12
    vanishing_rel: float = 1e-4
    vanishing_patience: int = 10
    exploding_abs: float = 1e4
    exploding_factor: float = 100.0
    exploding_window: int = 20
    exploding_patience: int = 1
    no_gradient_patience: int = 3
    derivative_floor: float = 0.01
    saturated_fraction: float = 0.5
    dead_fraction: float = 0.7
    activation_patience: int = 2
    on_nonfinite: Action = "warn"
    on_exploding: Action = "warn"
    ignore: tuple[str, ...] = ()
    max_history_rows: int = 200_000
    replay_nonfinite: bool = True

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "norm_type", _norm_type(self.norm_type))
        for name in ("include", "exclude", "ignore"):
            value = getattr(self, name)
            if value is None and name == "include":
                continue  # None: every layer
            set_(self, name, _patterns(name, () if value is None else value))
        for name in ("every_n_steps", "vanishing_patience", "exploding_patience",
                     "no_gradient_patience", "activation_patience", "exploding_window",
                     "max_history_rows"):
            check_int(name, getattr(self, name), minimum=1)
        for name in ("param_every_n_steps", "activation_every_n_steps",
                     "histogram_every_n_steps"):
            check_int(name, getattr(self, name), minimum=0)
        for name in ("vanishing_abs", "exploding_abs", "derivative_floor"):
            _check_float(name, getattr(self, name), low=0.0, low_open=False)
        for name in ("vanishing_rel", "saturated_fraction", "dead_fraction"):
            _check_float(name, getattr(self, name), low=0.0, high=1.0, low_open=False)
        _check_float("exploding_factor", self.exploding_factor, low=1.0, low_open=True)
        check_bool("functional_activations", self.functional_activations)
        check_bool("replay_nonfinite", self.replay_nonfinite)
        for name in ("on_nonfinite", "on_exploding"):
            value = getattr(self, name)
            if value not in ACTIONS:
                raise ValueError(f"{name} must be one of {list(ACTIONS)}, got {value!r}")
        unknown = [k for k in self.ignore if k not in FINDING_KINDS]
        if unknown:
            raise ValueError(
                f"ignore must list finding kinds from {list(FINDING_KINDS)}, got {unknown}"
            )

    @classmethod
    def from_options(cls, **options: Any) -> MonitorConfig:
        """Build settings from keyword options, rejecting unknown names."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(
                f"unknown option(s) {unknown}; allowed options are {sorted(known)}"
            )
        return cls(**options)

    def to_dict(self) -> dict[str, Any]:
        """Settings as a plain dict (lists instead of tuples), e.g. for hparams or state keys."""
        data = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}


OPTION_NAMES: tuple[str, ...] = tuple(f.name for f in fields(MonitorConfig))


def _norm_type(value: Any) -> float:
    if isinstance(value, str) and value.strip().lower() in {"inf", "infinity", ".inf"}:
        return math.inf
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"norm_type must be a number p > 0 or 'inf', got {value!r}")
    if not (value > 0):  # also rejects NaN
        raise ValueError(f"norm_type must be a number p > 0 or 'inf', got {value!r}")
    return float(value)


def _patterns(name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{name} must be a list of strings, got {value!r}")
    return tuple(value)


def check_int(name: str, value: Any, *, minimum: int) -> None:
    """Raise ``ValueError`` unless ``value`` is an int (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_bool(name: str, value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is ``True`` or ``False``."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def _check_float(
    name: str,
    value: Any,
    *,
    low: float,
    high: float = math.inf,
    low_open: bool,
) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    if ok:
        ok = (value > low if low_open else value >= low) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise ValueError(f"{name} must be a number in {bracket}{low}, {high}], got {value!r}")
