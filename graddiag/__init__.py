"""graddiag: per-layer gradient diagnostics for PyTorch and PyTorch Lightning.

It records per-layer gradient norms while training runs, flags vanishing, exploding,
non-finite and missing gradients, saturated and dead activations, explains the likely cause
and suggests what to try.

Importing ``graddiag`` (or ``graddiag.data``, ``graddiag.rules``) loads no torch: the names that
need it are imported on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from graddiag.data.errors import GradientAlarm
from graddiag.data.findings import FINDING_KINDS, Finding
from graddiag.data.options import MonitorConfig
from graddiag.data.policy import StepReport
from graddiag.data.records import ActivationRecord, StepRecord

__version__ = "0.1.0"

_LAZY = {
    "ActivationRegistry": "graddiag.measure.activations.registry",
    "ActivationSpec": "graddiag.measure.activations.specs",
    "default_registry": "graddiag.measure.activations.registry",
    "GradientMonitor": "graddiag.pipeline.monitor",
    "GradientDiagnostics": "graddiag.lightning.callback",  # Lightning stays optional
}

__all__ = [
    "FINDING_KINDS",
    "ActivationRecord",
    "ActivationRegistry",
    "ActivationSpec",
    "Finding",
    "GradientAlarm",
    "GradientDiagnostics",
    "GradientMonitor",
    "MonitorConfig",
    "StepRecord",
    "StepReport",
    "default_registry",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'graddiag' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
