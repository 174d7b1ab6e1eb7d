"""The one definition of every graddiag option.

Each option is a field of :class:`MonitorConfig` (the settings of
:class:`~graddiag.GradientMonitor`, which the Lightning callback shares) or of
:class:`AdapterConfig` (settings of the Lightning callback only), declared once with
:func:`option`: name, type, default, allowed values and a one-line doc. Everything else
follows from these fields: the checks, the callback's keyword-only signature and docstring
(so ``graddiag fit``'s ``diagnostics:`` section and its ``--help``), the README's options table
(``graddiag options``) and the callback's ``state_key``. Adding an option is one new field.

Every option is checked when the settings are made; a bad value raises ``ValueError`` naming
the option, what is allowed and what was given.
"""

# No ``from __future__ import annotations``: the field types below are read at run time.

import inspect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import MISSING, Field, asdict, dataclass, field, fields
from typing import Any, Literal, get_args, get_type_hints

from graddiag.data.checks import (
    Check,
    Choice,
    Flag,
    Integer,
    NormType,
    Number,
    Strings,
    Text,
)
from graddiag.data.errors import UnknownOptionError
from graddiag.data.findings import FINDING_KINDS, FindingKind

Action = Literal["warn", "raise", "stop", "skip"]
ACTIONS: tuple[str, ...] = get_args(Action)


@dataclass(frozen=True)
class Option:
    """One option as users see it.

    Attributes:
        name: The keyword.
        type: The annotation callers see (``Literal`` for choices, so LightningCLI rejects bad
            YAML before training).
        default: The default, as a caller would pass it.
        check: Normalises a value or raises ``ValueError`` naming the option.
        doc: One line: what the option does.
        adapter: Only the Lightning callback has it (logging, progress bar, summary).
        identity: Part of what the callback monitors, hence of its ``state_key``: two callbacks
            differing here keep separate state in one checkpoint.
    """

    name: str
    type: Any
    default: Any
    check: Check
    doc: str
    adapter: bool = False
    identity: bool = False

    @property
    def allowed(self) -> str:
        return self.check.allowed


def option(default: Any, check: Check, doc: str, *, given: Any = None,
           identity: bool = False) -> Any:
    """Declare a settings field as an option.

    Args:
        default: The default value.
        check: What is allowed (see :mod:`graddiag.data.checks`).
        doc: One line saying what the option does.
        given: The type callers pass, when it differs from the stored field type (``list``
            for a stored tuple, ``"inf"`` for a stored float).
        identity: The option is part of the callback's ``state_key``.
    """
    return field(default=default,
                 metadata={"check": check, "doc": doc, "given": given, "identity": identity})


class _Checked:
    """Checks and normalises every field after ``__init__`` (frozen dataclasses)."""

    def __post_init__(self) -> None:
        for f in fields(self):  # type: ignore[arg-type]
            object.__setattr__(self, f.name, f.metadata["check"](f.name, getattr(self, f.name)))

    def to_dict(self) -> dict[str, Any]:
        """Settings as a plain dict (lists instead of tuples), e.g. for hparams or checkpoints."""
        data = asdict(self)  # type: ignore[call-overload]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}


@dataclass(frozen=True)
class MonitorConfig(_Checked):
    """The settings of :class:`~graddiag.GradientMonitor`, shared by the Lightning callback."""

    every_n_steps: int = option(
        1, Integer(1),
        "Record gradient norms on optimizer steps divisible by this; 1 catches a NaN on the "
        "step it appears, larger values trade detection latency for cost.")
    evaluate_every_n_records: int = option(
        8, Integer(1),
        "Judge plain recorded steps (gradient norms only, on one device) this many at a time, "
        "or at the first step over a second after the first: a finding then arrives at most "
        "this many minus one recorded steps late (this many on a GPU with the deferred read, "
        "whose blocks reach the host in one copy read on the next step), naming its own step, "
        "at a fraction of the per-step cost. Non-finite gradients (except in those GPU blocks), "
        "activation and parameter steps, and every step when on_exploding is not warn are "
        "judged on the step itself; 1: every step on itself.")
    norm_type: float = option(
        2.0, NormType(), "The p of each layer's gradient p-norm: 1, 2, any p > 0, or inf.",
        given=float | Literal["inf"], identity=True)
    include: tuple[str, ...] | None = option(
        None, Strings("glob patterns", optional="every layer"),
        "Glob patterns (fnmatch) of layer names to monitor; None monitors every layer.",
        given=Sequence[str] | str | None, identity=True)
    exclude: tuple[str, ...] = option(
        (), Strings("glob patterns"), "Glob patterns of layer names to leave out.",
        given=Sequence[str] | str, identity=True)
    param_every_n_steps: int = option(
        50, Integer(0),
        "Parameter norms, one-step update ratios and learning rates on steps divisible by this "
        "(0: off, and with them stalled/unstable_update); the weights are copied on the step "
        "before, into one kept copy. Optimizers taking turns on the step counter each read "
        "theirs on their first step from there.")
    activation_every_n_steps: int = option(
        50, Integer(0),
        "Activation statistics (saturated and dead units) on steps divisible by this (0: off); "
        "hooks exist only during the training forward pass of those steps.")
    histogram_every_n_steps: int = option(
        0, Integer(0),
        "Per-layer gradient-magnitude histograms (fixed log-spaced bins) on steps divisible "
        "by this (0: off).")
    early_steps: int = option(
        5, Integer(0),
        "Also record activation and parameter statistics on the first this many optimizer "
        "steps the monitor sees (from step 0, or from where a run resumed without graddiag's "
        "state starts), so a short run or the first minutes of a long one get "
        "saturated/dead_relu/stalled evidence at once (0: the cadence only).")
    functional_activations: bool = option(
        True, Flag(),
        "Also analyse activation functions called inside forward (torch.sigmoid, F.relu, ...) "
        "and note graph-cutting ops such as argmax.")
    vanishing_abs: float = option(
        1e-12, Number(0.0), "A layer whose gradient norm is below this is vanishing.")
    vanishing_rel: float = option(
        1e-4, Number(0.0, 1.0),
        "A layer whose gradient norm is below this fraction of the largest layer's on the "
        "same step is vanishing.")
    vanishing_patience: int = option(
        10, Integer(1), "Consecutive recorded steps a layer must vanish before it is reported.")
    vanishing_early_rel: float = option(
        1e-8, Number(0.0, 1.0),
        "Below this fraction of the largest layer's gradient norm the evidence is overwhelming: "
        "vanishing is reported after vanishing_early_patience steps (0: off).")
    vanishing_early_patience: int = option(
        2, Integer(1), "Consecutive recorded steps for that early vanishing report.")
    exploding_abs: float = option(
        1e4, Number(0.0), "A layer whose gradient norm exceeds this is exploding.")
    exploding_factor: float = option(
        100.0, Number(1.0, low_open=True),
        "A layer whose gradient norm exceeds this multiple of its own recent level (a running "
        "geometric mean of its norms) is exploding.")
    exploding_window: int = option(
        20, Integer(1),
        "Span, in recorded steps, of that running level (an exponential moving average of "
        "log-norm with alpha = 2 / (window + 1)).")
    exploding_patience: int = option(
        1, Integer(1), "Consecutive recorded steps a layer must explode before it is reported.")
    no_gradient_patience: int = option(
        3, Integer(1),
        "Consecutive recorded steps a trainable parameter must get no gradient before "
        "no_gradient is reported.")
    stalled_ratio: float = option(
        1e-6, Number(0.0),
        "A layer with gradients whose weights change by less than this fraction of their norm "
        "in one optimizer step (||w_t - w_(t-1)|| / ||w_t||, ~1e-3 is usual) is stalled, if "
        "it also lags the fastest-moving layer (stalled_rel), or if its learning rate, neither "
        "rising nor decayed, is below this fraction of its weights' RMS.")
    stalled_rel: float = option(
        1e-3, Number(0.0, 1.0),
        "Fraction of the fastest-moving layer's update ratio a stalled layer must also be "
        "below, unless no layer moves by stalled_ratio and its learning rate is too small for "
        "its weights (a warm-up that slows every layer alike is not a finding).")
    unstable_ratio: float = option(
        0.1, Number(0.0, low_open=True),
        "A layer whose weights change by more than this fraction of their norm in one "
        "optimizer step is unstable_update.")
    update_patience: int = option(
        3, Integer(1),
        "Consecutive parameter steps before stalled or unstable_update is reported.")
    derivative_floor: float = option(
        0.01, Number(0.0),
        "A unit whose local derivative f'(x) is below this in magnitude passes almost no "
        "gradient: saturated (sigmoid/tanh-like) or dead (ReLU-like).")
    saturated_fraction: float = option(
        0.5, Number(0.0, 1.0),
        "A sigmoid/tanh-like site with more than this fraction of saturated units is "
        "reported saturated.")
    dead_fraction: float = option(
        0.7, Number(0.0, 1.0),
        "A ReLU-like site with more than this fraction of units that pass no gradient for any "
        "sample of the batch is reported dead_relu.")
    activation_patience: int = option(
        2, Integer(1), "Consecutive activation steps before saturated or dead_relu is reported.")
    on_nonfinite: Action = option(
        "warn", Choice(ACTIONS),
        "On a NaN/Inf gradient: warn, raise (GradientAlarm), stop (the Trainer stops cleanly, "
        "all ranks together) or skip (the optimizer step applies nothing).")
    on_exploding: Action = option(
        "warn", Choice(ACTIONS), "The same choices, for exploding gradients.")
    ignore: tuple[FindingKind, ...] = option(
        (), Strings("finding kinds", choices=FINDING_KINDS), "Finding kinds never reported.",
        given=Sequence[FindingKind] | FindingKind)
    max_history_rows: int = option(
        200_000, Integer(1),
        "Bound on rows (steps x layers) kept in history; older records are thinned (every "
        "second dropped), onset steps kept.")
    replay_nonfinite: bool = option(
        True, Flag(),
        "When a nonfinite finding begins, replay that step under checks and name the first op "
        "and source line whose output or gradient became non-finite (one extra forward and "
        "backward per onset).")

    @classmethod
    def from_options(cls, **options: Any) -> "MonitorConfig":
        """Build settings from keyword options, rejecting unknown names."""
        reject_unknown(options, OPTION_NAMES)
        return cls(**options)


@dataclass(frozen=True)
class AdapterConfig(_Checked):
    """Settings of the Lightning callback only: how it logs and shows what the monitor finds."""

    log_every_n_steps: int | None = option(
        None, Integer(1, optional=True),
        "Scalar logging interval in optimizer steps; None uses the Trainer's log_every_n_steps.")
    figure_every_n_steps: int | None = option(
        None, Integer(0, optional=True),
        "Gradient-flow image interval in TensorBoard; None: on multiples of 500 steps while "
        "figures, the next one included, stay within 0.25 % of the wall time since the first "
        "step; an integer: every recorded step divisible by it "
        "(0: only the final image, also saved as gradient_flow.png in the log directory).")
    prefix: str = option("graddiag/", Text(), "Prefix of every logged key.", identity=True)
    progress_bar: bool = option(
        True, Flag(), "Show the number of active findings in the progress bar.")
    print_summary: bool = option(
        True, Flag(), "Print the per-layer summary and the findings when fit ends.")


def _option(f: Field, adapter: bool) -> Option:
    assert f.default is not MISSING
    given = f.metadata["given"]
    return Option(
        name=f.name, type=f.type if given is None else given, default=f.default,
        check=f.metadata["check"], doc=f.metadata["doc"], adapter=adapter,
        identity=f.metadata["identity"],
    )


OPTIONS: tuple[Option, ...] = (
    *(_option(f, adapter=False) for f in fields(MonitorConfig)),
    *(_option(f, adapter=True) for f in fields(AdapterConfig)),
)
"""Every option, monitor options first, in the order of the callback's signature."""

OPTION_NAMES: tuple[str, ...] = tuple(o.name for o in OPTIONS if not o.adapter)
"""Options of :class:`MonitorConfig` (``GradientMonitor`` and the callback)."""

ADAPTER_OPTION_NAMES: tuple[str, ...] = tuple(o.name for o in OPTIONS if o.adapter)
"""Options of the Lightning callback only."""

IDENTITY_OPTION_NAMES: tuple[str, ...] = tuple(o.name for o in OPTIONS if o.identity)
"""The settings in the callback's ``state_key``."""

_BY_NAME = {o.name: o for o in OPTIONS}


def reject_unknown(options: dict[str, Any], known: Sequence[str]) -> None:
    """Raise :class:`UnknownOptionError` (a ``ValueError`` and ``TypeError``) for unknown names."""
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise UnknownOptionError(
            f"unknown option(s) {unknown}; allowed options are {sorted(known)}"
        )


def split_options(options: dict[str, Any]) -> tuple[MonitorConfig, AdapterConfig]:
    """Check every option of the callback; returns the monitor's and the adapter's settings."""
    reject_unknown(options, OPTION_NAMES + ADAPTER_OPTION_NAMES)
    monitor = MonitorConfig(**{k: v for k, v in options.items() if k in OPTION_NAMES})
    adapter = AdapterConfig(**{k: v for k, v in options.items() if k in ADAPTER_OPTION_NAMES})
    return monitor, adapter


def identity_settings(monitor: MonitorConfig, adapter: AdapterConfig) -> dict[str, Any]:
    """The identity settings (plain values, fixed order) from which ``state_key`` is made."""
    values = {**monitor.to_dict(), **adapter.to_dict()}
    return {name: values[name] for name in IDENTITY_OPTION_NAMES}


def changed_settings(saved: dict[str, Any], config: MonitorConfig) -> list[str]:
    """``"name old -> new"`` for every monitor setting that differs from ``saved``.

    Settings missing from ``saved`` (saved by a version without them) are not reported.
    """
    now = config.to_dict()
    return [f"{name} {saved[name]!r} -> {now[name]!r}" for name in OPTION_NAMES
            if name in saved and saved[name] != now[name]]


def option_parameters() -> list[inspect.Parameter]:
    """Every option as a keyword-only parameter with its type and default (for signatures)."""
    return [inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, default=o.default,
                              annotation=o.type) for o in OPTIONS]


def get_option(name: str) -> Option:
    """The option called ``name`` (``KeyError`` if there is none)."""
    return _BY_NAME[name]


def option_signature(init: Callable[..., None]) -> Callable[..., None]:
    """Give ``__init__(self, *, <object arguments>, **options)`` every option as a parameter.

    The signature (what ``inspect.signature``, IDEs, jsonargparse and LightningCLI read) becomes
    ``self``, every option of :data:`OPTIONS` keyword-only with its type and default, then the
    function's own keyword arguments; ``**options`` disappears from it.
    """
    hints = get_type_hints(init)
    own = [p.replace(annotation=hints.get(p.name, p.annotation))
           for p in inspect.signature(init).parameters.values()
           if p.kind is not inspect.Parameter.VAR_KEYWORD]
    init.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [*own[:1], *option_parameters(), *own[1:]], return_annotation=None)
    init.__annotations__ = {**{o.name: o.type for o in OPTIONS},
                            **{p.name: p.annotation for p in own[1:]}, "return": None}
    return init


def docstring_section(title: str, options: Iterable[Option], indent: str = "    ",
                      extra: dict[str, str] | None = None) -> str:
    """A Google-style ``Args:``/``Attributes:`` section, one line per option (then ``extra``)."""
    lines = [f"{indent}{title}:"]
    lines += [f"{indent}    {o.name}: {o.doc} Allowed: {o.allowed}." for o in options]
    lines += [f"{indent}    {name}: {doc}" for name, doc in (extra or {}).items()]
    return "\n".join(lines) + "\n"


MonitorConfig.__doc__ = (f"{MonitorConfig.__doc__}\n\n"
                         + docstring_section("Attributes", (o for o in OPTIONS if not o.adapter)))
AdapterConfig.__doc__ = (f"{AdapterConfig.__doc__}\n\n"
                         + docstring_section("Attributes", (o for o in OPTIONS if o.adapter)))


def check_int(name: str, value: Any, *, minimum: int) -> int:
    """Check one integer setting outside the dataclasses (see :class:`~graddiag.data.checks.Integer`)."""
    return Integer(minimum)(name, value)  # type: ignore[return-value]


def check_bool(name: str, value: Any) -> bool:
    """Check one ``True``/``False`` setting outside the dataclasses."""
    return Flag()(name, value)
