"""What replaying a step with a non-finite gradient found: plain data, no torch.

When a ``nonfinite`` finding begins, graddiag can re-run that step's forward and backward pass
with checks on every operation. A :class:`ReplayOutcome` records the result: the first
operation whose forward output or backward gradient became non-finite, where it was called,
and the numbers around it; or why there was nothing to name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal, get_args

ReplayStatus = Literal["located", "finite", "not_replayed", "failed"]
REPLAY_STATUSES: tuple[str, ...] = get_args(ReplayStatus)

#: ``forward``: an operation's output became non-finite; ``backward``: an operation's gradient
#: did while the gradient flowing into it was finite; ``data``: a tensor that no operation of
#: the step produced (the batch) already held it; ``parameter``/``buffer``: a model tensor did.
ReplayPhase = Literal["forward", "backward", "data", "parameter", "buffer"]

#: Why a step was not replayed, or why its replay named nothing (worded in ``rules.replay``).
ReplayReason = Literal[
    "",
    "no_closure",  # a plain loop gave no ``replay=`` closure
    "already_replayed",  # this step was replayed before (e.g. a second optimizer)
    "manual_optimization",  # training_step steps the optimizers itself
    "dataloader_iter",  # training_step reads the batch from an iterator
    "no_batch",  # no batch of this optimizer step was kept
    "no_loss",  # the closure / training_step returned no loss
    "loss_without_grad",  # the loss does not depend on any trainable parameter
    "communicating_model",  # forward/backward would talk to other ranks (SyncBatchNorm, FSDP)
    "distributed_closure",  # a plain loop's closure under torch.distributed (may synchronise)
    "error",  # the replay raised
]


@dataclass(frozen=True)
class ReplayOutcome:
    """The result of replaying one step; every field is a plain Python value.

    Attributes:
        status: ``located`` (an operation is named), ``finite`` (the replay produced no
            non-finite value: the step did not reproduce), ``not_replayed`` or ``failed``.
        reason: A :data:`ReplayReason` code when nothing was located.
        reason_detail: Free text that goes with the reason (an error message, a module type).
        phase: Where the first non-finite value appeared (:data:`ReplayPhase`).
        op: The operation, as called (``torch.sqrt``, ``Tensor.div``, ``F.linear``), or the
            custom ``autograd.Function`` class.
        node: The autograd node whose backward produced the value (``SqrtBackward0``).
        module: Qualified name of the innermost module whose ``forward`` made the call
            (``""``: the monitored module itself; ``None``: outside any module's forward).
        root: Class name of the monitored module (to name ``module == ""``).
        function: The Python function that made the call (``Codebook.forward``, ``nll``).
        file: Absolute path of the source file of that call; ``line`` its line number and
            ``code`` the source text of the line.
        nonfinite: What appeared first: ``"nan"``, ``"inf"`` or ``"-inf"``.
        inputs: Statistics of the operation's tensor inputs (or, for a backward, of the
            forward values it saved): ``role``, ``dtype``, ``shape``, ``min``/``max``/``max_abs``
            over finite values, ``zeros``, ``negatives``, ``nan``, ``inf`` counts.
        output: The same statistics for the non-finite output or gradient.
        grad_index: For a backward: which input's gradient became non-finite.
        grad_in_max: For a backward: the largest absolute gradient flowing into the node.
        constant: A non-finite Python number passed to the operation (``x * float("nan")``).
        forward_finite: Whether every forward value was finite (``None``: not checked).
        first_forward: For a backward, or a forward op fed by a deliberate ``-inf``: the first
            forward event of the step, as a dict with ``op``, ``file``, ``line``, ``nonfinite``.
        tensor: For ``data``/``parameter``/``buffer``: the tensor's name (``fc.weight``, a
            closure variable such as ``x``, ``batch[0]``).
        random_state: Whether the step's random state was restored for the replay (dropout
            masks then match the real step).
        micro_batch: Which micro-batch of the optimizer step (gradient accumulation), 0-based.
        micro_batches: How many micro-batches the step had.
        rank: Under data parallelism, the rank whose batch produced the value.
        world_size: Number of ranks that replayed.
        seconds: Wall time of the replay.
    """

    status: str
    reason: str = ""
    reason_detail: str = ""
    phase: str | None = None
    op: str | None = None
    node: str | None = None
    module: str | None = None
    root: str | None = None
    function: str | None = None
    file: str | None = None
    line: int | None = None
    code: str | None = None
    nonfinite: str | None = None
    inputs: list[dict[str, Any]] = field(default_factory=list)
    output: dict[str, Any] | None = None
    grad_index: int | None = None
    grad_in_max: float | None = None
    constant: float | None = None
    forward_finite: bool | None = None
    first_forward: dict[str, Any] | None = None
    tensor: str | None = None
    random_state: bool | None = None
    micro_batch: int | None = None
    micro_batches: int = 1
    rank: int | None = None
    world_size: int = 1
    seconds: float = 0.0

    @property
    def located(self) -> bool:
        return self.status == "located"

    def to_dict(self) -> dict[str, Any]:
        """The outcome as a plain dict (for ``Finding.details``, checkpoints and collectives)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReplayOutcome:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def skipped(cls, reason: str, detail: str = "") -> ReplayOutcome:
        """An outcome for a step that was not replayed, with the reason code."""
        return cls(status="not_replayed", reason=reason, reason_detail=detail)


def combine_rank_outcomes(outcomes: Sequence[ReplayOutcome]) -> ReplayOutcome:
    """One outcome for all ranks of a data-parallel step, the same on every rank.

    The lowest rank that located an operation wins; otherwise the lowest rank whose replay
    failed; otherwise, when every rank replayed finite values, ``finite`` (the NaN did not
    reproduce anywhere); otherwise rank zero's outcome.
    """
    world = len(outcomes)
    if world == 0:
        raise ValueError("outcomes must hold one outcome per rank, got none")
    for wanted in ("located", "failed"):
        for rank, outcome in enumerate(outcomes):
            if outcome.status == wanted:
                return replace(outcome, rank=rank, world_size=world)
    return replace(outcomes[0], rank=None, world_size=world)
