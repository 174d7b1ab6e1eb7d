"""Replay of a step with a non-finite gradient, to name the operation and line that made it.

Nothing here runs on healthy steps. When a ``nonfinite`` finding begins, the pipeline hands a
:class:`ReplayPlan` (the step's loss closures and random state) to :func:`replay_step`.
"""

from graddiag.measure.replay.locate import replay_step
from graddiag.measure.replay.plan import (
    ReplayArgument,
    ReplayPlan,
    ReplayRun,
    ReplayUnavailable,
    as_plan,
    check_replay,
    communicating_module,
    distributed_world,
)
from graddiag.measure.replay.state import RngState, untouched

__all__ = [
    "ReplayArgument",
    "ReplayPlan",
    "ReplayRun",
    "ReplayUnavailable",
    "RngState",
    "as_plan",
    "check_replay",
    "communicating_module",
    "distributed_world",
    "replay_step",
    "untouched",
]
