"""Checks of the object arguments (``model``, ``watch``, ``activation_registry``, ``reporters``)
at construction, and of the clipping thresholds a step is given.

Options are checked by :mod:`graddiag.data.options`; these two are objects, checked here so
that a wrong one fails when the monitor or callback is made, not at fit or at its very end.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from graddiag.data.checks import Number, reject
from graddiag.measure.activations import ActivationRegistry

_REPORTER = "objects with report(snapshot) (finish(run) and close() optional, callable if present)"


def check_activation_registry(value: Any) -> ActivationRegistry | None:
    """``None`` (the built-in registry) or an :class:`ActivationRegistry`, else ``ValueError``."""
    if value is not None and not isinstance(value, ActivationRegistry):
        reject("activation_registry",
               "None (the built-in activations) or an ActivationRegistry, e.g. "
               "graddiag.default_registry.copy()", value)
    return value


def check_reporters(value: Any) -> list[Any]:
    """``None`` or a list of reporters: each has a callable ``report``; ``finish`` and
    ``close`` are optional but must be callable when present (see :mod:`graddiag.reporters.base`)."""
    if value is None:
        return []
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        reject("reporters", f"None or a list of {_REPORTER}", value)
    for i, reporter in enumerate(value):
        if isinstance(reporter, type):
            raise ValueError(f"reporters must be {_REPORTER}; reporters[{i}] is the class "
                             f"{reporter.__name__} (pass an instance: {reporter.__name__}(...))")
        wrong = [] if callable(getattr(reporter, "report", None)) else ["report (missing)"]
        wrong += [f"{m} (not callable)" for m in ("finish", "close")
                  if hasattr(reporter, m) and not callable(getattr(reporter, m))]
        if wrong:
            raise ValueError(
                f"reporters must be {_REPORTER}; reporters[{i}] ({type(reporter).__name__}) has "
                f"a bad {' and '.join(wrong)}, got {reporter!r}"
            )
    return list(value)


def check_monitor_arguments(model: Any, config: Any, options: dict[str, Any],
                            watch: str | None) -> None:
    """A module to monitor, either ``config`` or options (not both), and ``watch`` naming one of
    the model's methods (or ``None``), else ``ValueError``."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if config is not None and options:
        raise ValueError(f"pass either config or options, not both (got {sorted(options)})")
    if watch is not None and not callable(getattr(model, watch, None)):
        raise ValueError(f"watch must name a method of the model or be None; "
                         f"{type(model).__name__} has no method {watch!r}")


_POSITIVE = Number(0.0, low_open=True)


def check_clipping(clip_norm: Any, clip_value: Any) -> tuple[float | None, float | None]:
    """``clip_norm`` and ``clip_value`` of :meth:`GradientMonitor.step` as floats: each ``None``
    or a number > 0, and not both (one clipping follows a step)."""
    norm = None if clip_norm is None else _POSITIVE("clip_norm", clip_norm)
    value = None if clip_value is None else _POSITIVE("clip_value", clip_value)
    if norm is not None and value is not None:
        reject("clip_norm and clip_value", "one of them (the clipping that follows the step)",
               (clip_norm, clip_value))
    return norm, value
