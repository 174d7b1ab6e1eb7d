"""Reporters get immutable snapshots (never the monitor); the earlier report(record, findings)
interface keeps working; the end of the run arrives once, in finish(run)."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from torch import nn

from graddiag import Finding, GradientMonitor, StepRecord
from graddiag.data.snapshots import RunSnapshot, StepSnapshot
from graddiag.reporters.tensorboard import TensorBoardReporter


class WithUnused(nn.Module):
    """``unused`` never gets a gradient: no_gradient after 3 recorded steps (its patience)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(3, 4), nn.Sigmoid(), nn.Linear(4, 2), nn.Tanh(),
                                 nn.Linear(2, 1))
        self.unused = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _train(reporters: list[Any], steps: int = 5) -> GradientMonitor:
    model = WithUnused()
    with GradientMonitor(model, reporters=reporters, activation_every_n_steps=2) as monitor:
        for _ in range(steps):
            model(torch.randn(4, 3)).sum().backward()
            monitor.step()
    return monitor


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def report(self, snapshot: StepSnapshot) -> None:
        self.calls.append(("report", snapshot))

    def finish(self, run: RunSnapshot) -> None:
        self.calls.append(("finish", run))

    def close(self) -> None:
        self.calls.append(("close", None))


def test_snapshots_carry_the_step_and_are_immutable() -> None:
    recorder = Recorder()
    monitor = _train([recorder])
    kinds = [kind for kind, _ in recorder.calls]
    assert kinds == ["report"] * 5 + ["finish", "close"]
    snapshots = [s for kind, s in recorder.calls if kind == "report"]
    assert [s.step for s in snapshots] == [0, 1, 2, 3, 4]
    assert all(isinstance(s.record, StepRecord) for s in snapshots)
    # no_gradient of 'unused' begins at step 2 (patience 3) and still holds afterwards
    assert [[f.kind for f in s.new_findings] for s in snapshots] == [[], [], ["no_gradient"], [], []]
    assert [s.active_count for s in snapshots] == [0, 0, 1, 1, 1]
    assert [len(s.findings) for s in snapshots] == [0, 0, 1, 1, 1]
    # activation sites sit between the layers: 'net.1' after layer 0, 'net.3' after layer 1
    assert [(m.site, m.x) for m in snapshots[-1].marks] == [("net.1", 0.5), ("net.3", 1.5)]
    with pytest.raises(dataclasses.FrozenInstanceError):
        snapshots[0].new_findings = ()  # type: ignore[misc]
    run = recorder.calls[5][1]
    assert run.layers == ("net.0", "net.2", "net.4", "unused")
    assert [r.step for r in run.records] == [0, 1, 2, 3, 4]
    assert [f.kind for f in run.findings] == ["no_gradient"] and run.last_step == 4
    assert list(run.summary.layer) == list(monitor.summary().layer)


def test_reporters_written_for_report_record_findings_keep_working() -> None:
    class Legacy:
        def __init__(self) -> None:
            self.seen: list[tuple[int, list[str]]] = []
            self.closed = False

        def report(self, record: StepRecord, findings: list[Finding]) -> None:
            self.seen.append((record.step, [f.kind for f in findings]))

        def close(self) -> None:
            self.closed = True

    legacy = Legacy()
    _train([legacy])
    assert legacy.seen == [(0, []), (1, []), (2, ["no_gradient"]), (3, []), (4, [])]
    assert legacy.closed


def test_an_object_without_report_is_rejected_with_a_clear_error() -> None:
    with pytest.raises(ValueError, match="reporters must be objects with report\\(snapshot\\)"):
        GradientMonitor(nn.Linear(2, 2), reporters=[object()])


def test_reporters_never_see_the_monitor() -> None:
    assert not hasattr(TensorBoardReporter, "bind")
    recorder = Recorder()
    _train([recorder], steps=2)
    for _, payload in recorder.calls:
        if payload is not None:
            for field in dataclasses.fields(payload):
                assert not isinstance(getattr(payload, field.name), GradientMonitor)
