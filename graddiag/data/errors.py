"""Exceptions raised by graddiag on purpose."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from graddiag.data.findings import Finding


class GradientAlarm(RuntimeError):
    """Raised when a finding's action is ``"raise"``; carries the findings that triggered it."""

    def __init__(self, findings: list[Finding]) -> None:
        self.findings = list(findings)
        super().__init__("; ".join(str(f) for f in self.findings))


class PatternMatchError(ValueError):
    """An ``include``/``exclude`` pattern that matches no layer of the model, or patterns that
    leave no layer to monitor (found when the model is seen, not when the options are); the
    message begins with the option at fault: ``include``, ``exclude`` or ``include/exclude``.
    """


class UnknownOptionError(ValueError, TypeError):
    """An option name that does not exist: a ``ValueError`` for graddiag's checks and a
    ``TypeError`` like any unexpected keyword argument."""
