"""Wording of a replay's result: the operation, the line and the numbers, added to a finding.

Pure: a :class:`~graddiag.data.replay.ReplayOutcome` in, sentences out (no torch).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

from graddiag.data.findings import Finding
from graddiag.data.replay import ReplayOutcome
from graddiag.rules.replay_remedies import (
    DIVISION_OPS,
    DIVISOR_FIRST_OPS,
    LARGEST_VALUE,
    LOG_OPS,
    NO_CLOSURE_HINT,
    ROOT_OPS,
    SOFTMAX_OPS,
    base_name,
    remedy_for,
    tensor_inputs,
)


def with_replay(finding: Finding, outcome: ReplayOutcome) -> Finding:
    """``finding`` with the replay's sentence appended, a fitting remedy and its fields."""
    sentence = describe(outcome, finding.step)
    remedy = remedy_for(outcome)
    return dataclasses.replace(
        finding,
        message=f"{finding.message} {sentence}" if sentence else finding.message,
        remedy=f"{remedy}; then: {finding.remedy}" if remedy and finding.remedy else
        (remedy or finding.remedy),
        details={**finding.details, **replay_details(outcome)},
    )


def replay_details(outcome: ReplayOutcome) -> dict[str, Any]:
    """The outcome's fields for ``Finding.details``: ``replay`` is the status."""
    data = outcome.to_dict()
    renamed = {"status": "replay", "reason": "replay_reason", "reason_detail": "replay_detail",
               "seconds": "replay_seconds"}
    return {renamed.get(k, k): v for k, v in data.items()}


# ----------------------------------------------------------------------- sentences
def describe(outcome: ReplayOutcome, step: int) -> str:
    """One or two sentences for a reader who wants to know where the NaN came from."""
    if outcome.status == "located":
        return f"First non-finite value ({_replay_label(outcome, step)}): {_located(outcome)}."
    if outcome.status == "finite":
        return _finite(outcome, step)
    if outcome.status == "failed":
        return (f"Replaying step {step} to name the operation failed ({outcome.reason_detail}); "
                "the layer-level origin above stands.")
    return _not_replayed(outcome, step)


def _replay_label(o: ReplayOutcome, step: int) -> str:
    label = f"replay of step {step}"
    if o.micro_batches > 1 and o.micro_batch is not None:
        label += f", micro-batch {o.micro_batch + 1} of {o.micro_batches}"
    if o.world_size > 1 and o.rank is not None:
        label += f", rank {o.rank}'s batch"
    return label


def _located(o: ReplayOutcome) -> str:
    if o.phase == "backward":
        return _backward(o)
    if o.phase == "data":
        return _data(o)
    if o.phase in ("parameter", "buffer"):
        return _weights(o)
    return _forward(o)


def short_path(path: str) -> str:
    """``path`` relative to the working directory when it lies below it."""
    try:
        relative = os.path.relpath(path)
    except ValueError:  # another drive
        return path
    return path if relative.startswith("..") else relative


def _caller(module: str | None, function: str | None, root: str | None) -> str | None:
    label = None if module is None else (module or root or "model")
    if label is not None and function and function.split(".")[-1] == "forward":
        return f"`{label}.forward`"
    if function and not function.startswith("<"):
        return f"`{function}`" + (f" (inside `{label}.forward`)" if label is not None else "")
    return f"`{label}.forward`" if label is not None else None


def where(o: ReplayOutcome | dict[str, Any], root: str | None = None) -> str:
    """``called in `codebook.forward` at `models/vq.py:42` (`d = torch.sqrt(s)`)``.

    ``root`` names the monitored module when ``o`` (a ``first_forward`` dict) does not.
    """
    data = o if isinstance(o, dict) else o.to_dict()
    parts = []
    caller = _caller(data.get("module"), data.get("function"), data.get("root") or root)
    if caller:
        parts.append(f"called in {caller}")
    file = data.get("file")
    if file:
        parts.append(f"at `{short_path(file)}:{data.get('line')}`")
        if data.get("code"):
            parts.append(f"(`{data['code']}`)")
    return " ".join(parts) if parts else "at an unknown place (no user code on the stack)"


def _word(value: str | None) -> str:
    if value is None:
        return "non-finite"
    return "NaN" if value == "nan" else value


def _num(x: Any) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3g}"


def _range_text(o: ReplayOutcome) -> str:
    stats = [s for s in tensor_inputs(o) if s.get("numel")]
    if not stats:
        return ""
    top = max(s["max_abs"] for s in stats if not math.isnan(s["max_abs"])) \
        if any(not math.isnan(s["max_abs"]) for s in stats) else math.nan
    dtypes = sorted({s["dtype"] for s in stats})
    out = (o.output or {}).get("dtype")
    text = f"input max |x| {_num(top)}, {'/'.join(dtypes)}"
    if out and out not in dtypes:
        text += f", computed in {out} (autocast)"
    largest = LARGEST_VALUE.get(out or dtypes[0])
    if largest is not None and (out or dtypes[0]) in ("float16", "bfloat16"):
        text += f"; {out or dtypes[0]} holds at most {_num(largest)}"
    return text


def _divisor(o: ReplayOutcome) -> dict[str, Any] | None:
    stats = tensor_inputs(o)
    index = 0 if base_name(o.op) in DIVISOR_FIRST_OPS else 1
    if len(stats) > index:
        return stats[index]
    return stats[0] if base_name(o.op) in ("reciprocal", "rsqrt") and stats else None


def _what_forward(o: ReplayOutcome) -> str:
    base, word = base_name(o.op), _word(o.nonfinite)
    first = tensor_inputs(o)[0] if tensor_inputs(o) else {}
    if o.constant is not None:
        return f"is {word} because the constant {_word(str(o.constant))} was passed to it"
    divisor = _divisor(o) if base in DIVISION_OPS else None
    if divisor is not None and divisor.get("zeros"):
        kind = "0/0" if word == "NaN" else "division by zero"
        return f"is {word}: {kind} (the divisor has {divisor['zeros']} zero(s))"
    if base in LOG_OPS | ROOT_OPS and first.get("negatives") and word == "NaN":
        return (f"is NaN: `{o.op}` of negative values (input min {_num(first.get('min'))}, "
                f"{first['negatives']} negative)")
    if base in LOG_OPS and first.get("zeros"):
        return f"is {word}: log of 0 (the input has {first['zeros']} zero(s))"
    if word == "NaN":
        if any(s.get("inf") for s in tensor_inputs(o)):
            if base in SOFTMAX_OPS:
                return ("is NaN: a row whose every entry is -inf (entirely masked) has no "
                        "softmax")
            return "is NaN from infinite inputs (inf - inf, 0 * inf or inf / inf)"
        return f"is NaN from finite inputs ({_range_text(o)})"
    return f"overflowed to {word} ({_range_text(o)})"


def _forward(o: ReplayOutcome) -> str:
    if o.node and o.op and o.op.endswith(".apply"):
        text = (f"the forward output of custom autograd.Function `{o.op[:-len('.apply')]}` "
                f"{where(o)} is {_word(o.nonfinite)}")
    else:
        text = f"the forward output of `{o.op}` {where(o)} {_what_forward(o)}"
    first = o.first_forward
    held = any(s.get("inf") or s.get("nan") for s in tensor_inputs(o))
    if first and held and first.get("op") != o.op:
        text += (f"; its input held {_word(first.get('nonfinite'))} written by `{first.get('op')}` "
                 f"{where(first, o.root)}")
    return text


def _data(o: ReplayOutcome) -> str:
    stats = o.output or {}
    name = f"`{o.tensor}`" if o.tensor else "a tensor that no operation of the step produced"
    count = stats.get("nan", 0) + stats.get("inf", 0)
    return (f"the input {name} already holds {_word(o.nonfinite)} ({count} of {stats.get('numel')} "
            "values) before any operation of the model ran on it: the non-finite value is in "
            f"the data, not in the model. It is first used by `{o.op}` {where(o)}")


def _weights(o: ReplayOutcome) -> str:
    stats = o.output or {}
    count = stats.get("nan", 0) + stats.get("inf", 0)
    return (f"{o.phase} `{o.tensor}` already holds {_word(o.nonfinite)} ({count} of "
            f"{stats.get('numel')} values) before the forward pass, so an earlier optimizer "
            f"step wrote it; it is first used by `{o.op}` {where(o)}")


def _backward_hint(o: ReplayOutcome) -> str:
    base = base_name(o.op)
    saved = tensor_inputs(o)
    zeros = [s for s in saved if s.get("zeros")]
    if base in ("sqrt", "log", "log2", "log10", "rsqrt") and zeros:
        return " (input 0 -> derivative inf)"
    if base in DIVISION_OPS and zeros:
        return " (a divisor of 0)"
    if any(s.get("inf") or s.get("nan") for s in saved):
        return " (a value it saved from the forward pass is non-finite: 0 * inf)"
    if zeros and o.nonfinite in ("inf", "-inf"):
        return " (a value it saved from the forward pass is 0)"
    return ""


def _backward(o: ReplayOutcome) -> str:
    gradient = f"a finite incoming gradient (max |g| {_num(o.grad_in_max)})"
    if o.op and o.op.endswith(".apply"):
        text = (f"the backward of custom autograd.Function `{o.op[:-len('.apply')]}`, "
                f"{where(o)}, returned {_word(o.nonfinite)} for input {o.grad_index} from "
                f"{gradient} ({o.node})")
    else:
        text = (f"backward of `{o.op}`{_backward_hint(o)}, {where(o)}: {gradient} became "
                f"{_word(o.nonfinite)} for input {o.grad_index} ({o.node})")
    if o.forward_finite:
        return f"{text}; forward values were finite"
    first = o.first_forward
    if first:
        return (f"{text}; forward values were not all finite: `{first.get('op')}` "
                f"{where(first, o.root)} made {_word(first.get('nonfinite'))} first")
    return text


def _finite(o: ReplayOutcome, step: int) -> str:
    same = "same batch and weights" + (", same random state" if o.random_state else "")
    scope = f" on all {o.world_size} ranks" if o.world_size > 1 else ""
    if o.micro_batches > 1:
        scope += f" (all {o.micro_batches} micro-batches)"
    reasons = []
    if not o.random_state:
        reasons.append("the replay did not have the step's random state, so dropout or "
                       "sampling drew differently")
    reasons.append("nondeterministic kernels, or state that the forward pass changes (a "
                   "counter, a cache)")
    reasons.append("the batch was changed in place after the step")
    text = (f"Replaying step {step}{scope} ({same}) gave a finite loss and finite gradients, "
            f"so no operation can be named. Possible reasons: {'; '.join(reasons)}. The "
            "layer-level origin above stands.")
    first = o.first_forward
    if first:
        text += (f" The replay's forward pass did hold {_word(first.get('nonfinite'))} from "
                 f"`{first.get('op')}` {where(first, o.root)}, but it did not reach the "
                 "gradients.")
    return text


_NOT_REPLAYED = {
    "no_closure": NO_CLOSURE_HINT,
    "already_replayed": "Step {step} was already replayed for an earlier finding; see that one.",
    "manual_optimization": ("Not replayed: with manual optimization, training_step steps the "
                            "optimizers itself, so running it again would change the weights."),
    "dataloader_iter": ("Not replayed: training_step reads its batch from a dataloader_iter, "
                        "which cannot be read again."),
    "no_batch": "Not replayed: no batch of step {step} was kept.",
    "no_loss": "Not replayed: the step's closure / training_step returned no loss tensor.",
    "loss_without_grad": ("Not replayed: the recomputed loss does not depend on any trainable "
                          "parameter (was it computed under torch.no_grad()?)."),
    "communicating_model": ("Not replayed: the model's forward or backward communicates across "
                            "ranks ({detail}), and a replay that stops early on one rank would "
                            "leave the others waiting."),
    "distributed_closure": ("Not replayed: in a plain loop under torch.distributed ({detail} "
                            "ranks) the closure's forward may synchronise with the other ranks "
                            "(DDP, SyncBatchNorm), which only this rank would run; replay the "
                            "same closure in a single process to name the operation."),
}


def _not_replayed(o: ReplayOutcome, step: int) -> str:
    template = _NOT_REPLAYED.get(o.reason, "Not replayed ({reason}).")
    text = template.format(step=step, detail=o.reason_detail, reason=o.reason)
    if o.reason != "no_closure":
        text += " The layer-level origin above stands."
    return text
