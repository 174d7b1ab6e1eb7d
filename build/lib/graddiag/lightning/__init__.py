"""Floor 6, the Lightning adapter: ``GradientDiagnostics`` and ``graddiag fit``."""

from graddiag.lightning.callback import GradientDiagnostics

__all__ = ["GradientDiagnostics"]
