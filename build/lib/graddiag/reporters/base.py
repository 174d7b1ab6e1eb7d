"""The reporter interface, and the guard that keeps a failing reporter from hurting training."""

from __future__ import annotations

import logging
from typing import Protocol, runtime_checkable

from graddiag.data.findings import Finding
from graddiag.data.records import StepRecord

log = logging.getLogger("graddiag")


@runtime_checkable
class Reporter(Protocol):
    """Receives every record and the findings that began with it."""

    def report(self, record: StepRecord, findings: list[Finding]) -> None: ...

    def close(self) -> None: ...


class SafeReporter:
    """Wraps a reporter: its first error is logged once as a warning and the reporter is turned
    off; training and the in-memory history carry on untouched."""

    def __init__(self, inner: Reporter) -> None:
        self.inner = inner
        self.failed: BaseException | None = None

    def _guard(self, what: str, call, *args) -> None:  # noqa: ANN001
        if self.failed is not None:
            return
        try:
            call(*args)
        except Exception as error:  # noqa: BLE001 - diagnostics must never break training
            self.failed = error
            log.warning(
                "graddiag: %s failed in %s (%s: %s); it is turned off for the rest of the run, "
                "training and the in-memory history continue.",
                type(self.inner).__name__, what, type(error).__name__, error,
            )

    def report(self, record: StepRecord, findings: list[Finding]) -> None:
        self._guard("report", self.inner.report, record, findings)

    def close(self) -> None:
        self._guard("close", self.inner.close)
