"""Deferred host reads: when a recorded step's statistics are read one step late.

On CUDA with warn-only actions the device never has to wait for the host: a recorded step's
copy goes to pinned memory without blocking and is read on the next step, so findings and the
report returned by :meth:`~graddiag.pipeline.monitor.GradientMonitor.step` concern the previous
recorded step, and non-finite gradients are named per parameter without element counts.
``skip``/``stop``/``raise`` and a replay of a non-finite step always read on the step itself.
"""

from __future__ import annotations

from collections.abc import Callable

from graddiag.data.options import MonitorConfig
from graddiag.data.records import StepRecord
from graddiag.measure.layers import LayerIndex
from graddiag.measure.replay import ReplayArgument

#: Finishes a started measurement: reads the host copy and returns the step's record.
Finish = Callable[[], StepRecord]


class HostReadDeferral:
    """Decides whether a step's host read is deferred and keeps the one read still pending.

    Args:
        config: The monitor's settings (``on_nonfinite``, ``on_exploding``, ``replay_nonfinite``).
        index: The monitored layers (their first parameter's device decides ``auto``).
    """

    def __init__(self, config: MonitorConfig, index: LayerIndex) -> None:
        self.config = config
        self.index = index
        self.pending: Finish | None = None  # the previous recorded step, read on the next one
        self._auto: bool | None = None

    def wanted(self, replay: ReplayArgument = None, override: bool | None = None) -> bool:
        """Whether this step's host read is deferred: on CUDA (or as ``override`` says, when
        not ``None``), when nothing needs the step itself — ``on_nonfinite`` and
        ``on_exploding`` both ``"warn"``, and no replay of a non-finite step asked for (a
        replay needs this step's weights)."""
        c = self.config
        if c.on_nonfinite != "warn" or c.on_exploding != "warn":
            return False
        if replay is not None and getattr(c, "replay_nonfinite", True):
            return False
        if override is not None:
            return override
        if self._auto is None:
            first = next((p for layer in self.index.layers for p in layer.params), None)
            self._auto = first is not None and first.is_cuda
        return self._auto

    def swap(self, finish: Finish | None) -> Finish | None:
        """Keep ``finish`` pending; return the one pending before (to evaluate now)."""
        previous, self.pending = self.pending, finish
        return previous

    def take(self) -> Finish | None:
        """The pending read, if any, now no longer pending."""
        return self.swap(None)
