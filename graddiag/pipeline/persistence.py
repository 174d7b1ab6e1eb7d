"""A monitor's checkpoint state: what :meth:`GradientMonitor.state_dict` saves and how a resumed
run restores it (with one warning when the settings changed in between)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from graddiag.data.findings import Finding
from graddiag.data.options import changed_settings

if TYPE_CHECKING:
    from graddiag.pipeline.monitor import GradientMonitor

log = logging.getLogger("graddiag")


def monitor_state(monitor: GradientMonitor) -> dict[str, Any]:
    """Rule state, findings, history, the step counter, the first step, skipped steps and the
    settings of ``monitor`` (plain containers and tensors only, so checkpoints load with
    ``weights_only=True``). A pending deferred read is evaluated first."""
    monitor.flush()
    return {"next_step": monitor._next_step,
            "first_step": monitor.first_step,
            "skipped_steps": monitor.skipped_steps,
            "rules": monitor.rules.state_dict(),
            "findings": [f.to_dict() for f in monitor.findings],
            "history": monitor._history.state_dict(), "settings": monitor.config.to_dict()}


def restore_monitor(monitor: GradientMonitor, state: dict[str, Any]) -> None:
    """Restore what :func:`monitor_state` saved into ``monitor``.

    Settings may differ from the saved ones (e.g. a changed threshold): history and findings
    are kept, the new settings apply from here on, and one warning says what changed.
    """
    changed = changed_settings(state.get("settings", {}), monitor.config)
    if changed:
        log.warning("graddiag: resuming with changed settings (%s); the saved history and "
                    "findings are kept, the new settings apply from here on.",
                    ", ".join(changed))
    monitor.forget_waiting()  # steps after the saved state, not yet judged: not part of it
    monitor._next_step = monitor._activations.upcoming = int(state["next_step"])
    first = state.get("first_step", 0)  # states saved before it was kept: a run from step 0
    monitor._restore_start(None if first is None else int(first))
    monitor.skipped_steps = int(state.get("skipped_steps", 0))
    monitor.rules.load_state_dict(state["rules"])
    monitor.findings = [Finding.from_dict(d) for d in state["findings"]]
    if "history" in state:
        monitor._history.load_state_dict(state["history"])
