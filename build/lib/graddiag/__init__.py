"""graddiag: per-layer gradient diagnostics for PyTorch and PyTorch Lightning.

It records per-layer gradient norms while training runs, flags vanishing, exploding,
non-finite and missing gradients, saturated and dead activations, explains the likely cause
and suggests what to try.
"""

from graddiag.data.errors import GradientAlarm
from graddiag.data.findings import FINDING_KINDS, Finding
from graddiag.data.options import MonitorConfig
from graddiag.data.records import ActivationRecord, StepRecord
from graddiag.measure.activations import (
    ActivationRegistry,
    ActivationSpec,
    default_registry,
)
from graddiag.pipeline.monitor import GradientMonitor, StepReport

__version__ = "0.1.0"

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


def __getattr__(name: str):  # noqa: ANN202 - lazy import keeps Lightning optional for plain loops
    if name == "GradientDiagnostics":
        from graddiag.lightning.callback import GradientDiagnostics

        return GradientDiagnostics
    raise AttributeError(f"module 'graddiag' has no attribute {name!r}")
