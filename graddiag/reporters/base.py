"""The reporter interface, and the guard that keeps a failing reporter from hurting training.

A reporter receives immutable data only, never the monitor or the trainer:

* ``report(snapshot)`` on every recorded step, with a :class:`~graddiag.data.snapshots.StepSnapshot`
  (the record, the findings that began on it, every finding so far, how many conditions still
  hold, where the activation sites sit);
* ``finish(run)`` (optional) once at the end, with a :class:`~graddiag.data.snapshots.RunSnapshot`
  (the kept records, the final layers, every finding, the per-layer summary);
* ``close()`` (optional) last;
* ``flush()`` (optional): write out what is buffered; called instead of ``finish``/``close``
  for a monitor that was never closed, when it is dropped or the interpreter exits.

Reporters written for the earlier interface, ``report(record, findings)``, keep working: they get
the record and the findings that began on it.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from graddiag.data.snapshots import RunSnapshot, StepSnapshot

log = logging.getLogger("graddiag")


@runtime_checkable
class Reporter(Protocol):
    """Receives a snapshot of every recorded step (``finish`` and ``close`` are optional)."""

    def report(self, snapshot: StepSnapshot) -> None: ...


def _takes_record_and_findings(report: Callable[..., Any]) -> bool:
    """Whether ``report`` has the earlier ``report(record, findings)`` signature."""
    try:
        parameters = inspect.signature(report).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = [p for p in parameters
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2


class SafeReporter:
    """Wraps a reporter: its first error is logged once as a warning and the reporter is turned
    off; training and the in-memory history carry on untouched.

    Raises:
        ValueError: if ``inner`` has no callable ``report``.
    """

    def __init__(self, inner: Any) -> None:
        report = getattr(inner, "report", None)
        if not callable(report):
            raise ValueError(
                "reporters must be objects with report(snapshot) (and optionally finish(run) and "
                f"close()), got {type(inner).__name__} without a report method"
            )
        self.inner = inner
        self.legacy = _takes_record_and_findings(report)
        self.failed: BaseException | None = None

    @property
    def wants_finish(self) -> bool:
        return self.failed is None and callable(getattr(self.inner, "finish", None))

    def _guard(self, what: str, call: Callable[..., Any], *args: Any) -> None:
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

    def report(self, snapshot: StepSnapshot) -> None:
        if self.legacy:
            self._guard("report", self.inner.report, snapshot.record, list(snapshot.new_findings))
        else:
            self._guard("report", self.inner.report, snapshot)

    def finish(self, run: RunSnapshot) -> None:
        if self.wants_finish:
            self._guard("finish", self.inner.finish, run)

    def close(self) -> None:
        close = getattr(self.inner, "close", None)
        if callable(close):
            self._guard("close", close)

    def flush(self) -> None:
        flush = getattr(self.inner, "flush", None)
        if callable(flush):
            self._guard("flush", flush)

    def unattended(self) -> None:
        """Tell the reporter its monitor was never closed and is judging its last steps (a
        reporter with an ``unattended`` attribute, such as the TensorBoard one, gets it set)."""
        if hasattr(self.inner, "unattended"):
            self._guard("unattended", setattr, self.inner, "unattended", True)
