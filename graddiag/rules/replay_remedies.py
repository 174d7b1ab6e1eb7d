"""What to try for the operation a replay named: remedies by operation family.

Pure: a :class:`~graddiag.data.replay.ReplayOutcome` in, a remedy out (no torch).
"""

from __future__ import annotations

from typing import Any

from graddiag.data.replay import ReplayOutcome
from graddiag.rules import wording as remedies

LOG_OPS = {"log", "log2", "log10", "log1p", "xlogy", "lgamma", "digamma", "polygamma"}
ROOT_OPS = {"sqrt", "rsqrt", "pow", "float_power"}
POWER_OPS = {"pow", "float_power", "square"}
DIVISION_OPS = {"div", "divide", "true_divide", "truediv", "reciprocal", "rdiv", "rtruediv",
             "floor_divide", "remainder", "fmod"}
DIVISOR_FIRST_OPS = {"reciprocal", "rdiv", "rtruediv", "rsqrt"}
EXP_OPS = {"exp", "exp2", "expm1", "cosh", "sinh", "ldexp"}
PRODUCT_OPS = {"matmul", "mm", "bmm", "baddbmm", "addmm", "linear", "einsum", "mul", "multiply",
            "scaled_dot_product_attention", "conv1d", "conv2d", "conv3d", "sum", "square"}
SOFTMAX_OPS = {"softmax", "log_softmax", "softmin"}
LARGEST_VALUE = {"float16": 65504.0, "bfloat16": 3.39e38, "float32": 3.40e38, "float64": 1.80e308}

LOG_REMEDY = ("keep the argument of `{op}` away from 0 (x.clamp_min(1e-12)) or stay in log "
              "space: log_softmax / F.cross_entropy instead of log(softmax), BCEWithLogitsLoss "
              "instead of log(sigmoid), torch.logsumexp")
POWER_OVERFLOW_REMEDY = ("the values raised by `{op}` are so large that their power "
                         "overflows: something before it diverged (weights or activations "
                         "growing); " + remedies.EXPLODING)
SMALL_BASE_REMEDY = ("keep the base of `{op}` away from 0 (x.abs().clamp_min(1e-12), or x + 1e-12 "
                     "for a positive x): a negative power of a tiny value overflows")
ROOT_REMEDY = ("add a small constant inside the root (torch.sqrt(x + 1e-12)), or use "
               "torch.linalg.vector_norm, whose gradient at 0 is 0")
DIVISION_REMEDY = ("add a small constant to the divisor (x / (n + 1e-12)) or use "
                   "F.normalize(x, eps=1e-12), which clamps the norm")
EXP_REMEDY = ("subtract the maximum before exponentiating (x - x.amax(dim, keepdim=True)), or "
              "use torch.softmax / torch.logsumexp, which do")
HALF_REMEDY = ("keep `{op}` in float32 (x.float(), or torch.autocast(..., enabled=False) "
               "around it), scale its inputs down (attention logits by 1/sqrt(head_dim)), or "
               "train in bfloat16, whose range is that of float32")
SOFTMAX_REMEDY = ("make sure no row is masked entirely, or mask with a large finite negative "
                  "number (torch.finfo(x.dtype).min) instead of -inf")
CONSTANT_REMEDY = ("remove the non-finite constant; to mask, use a large finite number "
                   "(torch.finfo(x.dtype).min) instead of -inf")
FUNCTION_REMEDY = ("fix the backward of `{cls}`: check it against finite differences with "
                   "torch.autograd.gradcheck in float64, and guard its formula where the input "
                   "makes it divide by 0 or overflow")
DATA_REMEDY = ("check the data, not the model: assert torch.isfinite(x).all() where batches "
               "are built, and drop, impute or mask missing values")
WEIGHT_REMEDY = ("an earlier update made the weights non-finite: lower the learning rate, clip "
                 "gradients, and set on_nonfinite='skip' so a non-finite step is never applied")
NO_CLOSURE_HINT = ("To have the operation and line named, pass the step's loss as a closure: "
                   "monitor.step(replay=lambda: loss_fn(model(x), y)).")


def base_name(op: str | None) -> str:
    """``Tensor.__truediv__`` -> ``truediv``: the operation without namespace or underscores."""
    return (op or "").split(".")[-1].strip("_")


def remedy_for(o: ReplayOutcome) -> str:
    """What to try for the named operation (empty when nothing specific is known)."""
    if o.status != "located":
        return ""
    base = base_name(o.op)
    if o.phase == "data":
        return DATA_REMEDY
    if o.phase in ("parameter", "buffer"):
        return WEIGHT_REMEDY
    if o.op and o.op.endswith(".apply"):
        return FUNCTION_REMEDY.format(cls=o.op[:-len(".apply")])
    if o.constant is not None:
        return CONSTANT_REMEDY
    out_dtype = (o.output or {}).get("dtype") if o.phase == "forward" else None
    if base in LOG_OPS:
        return LOG_REMEDY.format(op=o.op)
    if base in POWER_OPS and o.nonfinite in ("inf", "-inf"):
        largest = _largest_base(o)
        if largest is not None and largest > 1.0:  # finite values above 1, no zero: too large
            return POWER_OVERFLOW_REMEDY.format(op=o.op)
        if largest is not None:  # every value at most 1 and none 0: a negative power of tiny ones
            return SMALL_BASE_REMEDY.format(op=o.op)
    if base in ROOT_OPS:
        return ROOT_REMEDY
    if base in DIVISION_OPS:
        return DIVISION_REMEDY
    if base in SOFTMAX_OPS:
        return SOFTMAX_REMEDY
    if out_dtype == "float16" and o.nonfinite in ("inf", "-inf"):
        return HALF_REMEDY.format(op=o.op)
    if base in EXP_OPS or (base in PRODUCT_OPS and o.phase == "forward"):
        return EXP_REMEDY if base in EXP_OPS else remedies.EXPLODING
    return ""


def tensor_inputs(o: ReplayOutcome) -> list[dict[str, Any]]:
    """The statistics of the failing operation's tensor inputs, in argument order."""
    return [s for s in o.inputs if isinstance(s, dict)]


def _largest_base(o: ReplayOutcome) -> float | None:
    """The largest finite |value| of a power's first tensor input (its base, or the exponent of
    a number raised to a tensor), or ``None`` when it holds a zero or is unknown (a root or a
    power of 0 then)."""
    first = next(iter(tensor_inputs(o)), None)
    if first is None or first.get("zeros") or not first.get("numel"):
        return None
    largest = first.get("max_abs")
    return float(largest) if isinstance(largest, (int, float)) else None
