"""Forward checks for a replay: every operation's output is tested for NaN/Inf as it is made.

A ``TorchFunctionMode`` that exists only while the replayed forward pass runs sees each torch
call made from Python (functions, tensor methods and operators, ``F.*``). For each call it
notes whether the inputs and outputs are finite, and where the call was made, so that:

* the first operation that *made* a non-finite value from finite inputs is known (an
  ``exp`` that overflowed, a ``log`` of 0, a division by 0, a non-finite constant);
* a non-finite tensor that no checked operation produced is traced to where it came from
  (the batch, a parameter, or an operation the mode cannot see, such as a custom
  ``autograd.Function``, located through anomaly mode's forward traceback);
* every autograd node the forward pass creates is mapped to the operation and line that
  created it, so that a backward check can name them.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.overrides import TorchFunctionMode, resolve_name
from torch.utils.weak import WeakIdKeyDictionary

from graddiag.measure.replay.sites import (
    CallSite,
    ModuleStack,
    current_site,
    node_traceback,
    site_from_traceback,
)
from graddiag.measure.replay.stats import (
    checkable,
    flags,
    nonfinite_numbers,
    nonfinite_word,
    tensor_stats,
    tensors_in,
)

log = logging.getLogger("graddiag")

_SHORT_PREFIXES = (("torch.nn.functional.", "F."), ("torch.Tensor.", "Tensor."))


def op_name(func: Callable[..., Any]) -> str:
    """How users write a torch callable: ``torch.exp``, ``Tensor.div``, ``F.linear``."""
    try:
        name = resolve_name(func) or getattr(func, "__qualname__", repr(func))
    except Exception:  # noqa: BLE001
        name = getattr(func, "__qualname__", repr(func))
    for prefix, short in _SHORT_PREFIXES:
        if name.startswith(prefix):
            return short + name[len(prefix):]
    return name


def node_op_name(node: Any) -> str:
    """The operation behind an autograd node that no forward check saw being created."""
    function_class = getattr(node, "_forward_cls", None)
    if function_class is not None:  # a custom torch.autograd.Function
        return f"{function_class.__name__}.apply"
    name = node.name() if hasattr(node, "name") else type(node).__name__
    return re.sub(r"Backward\d*$", "", name)


def custom_function(node: Any) -> str | None:
    """The class name of a custom ``autograd.Function`` behind ``node``, if it is one."""
    function_class = getattr(node, "_forward_cls", None)
    return None if function_class is None else function_class.__name__


@dataclass
class OpRecord:
    """What the forward check knows about the operation that created an autograd node."""

    op: str
    site: CallSite
    inputs_nonfinite: bool
    output_nonfinite: bool


@dataclass
class ForwardEvent:
    """A non-finite value that appeared in the forward pass.

    ``cause`` is ``made`` (an operation turned finite inputs into NaN/Inf), ``constant``
    (a non-finite Python number was passed in) or ``entered`` (a tensor that no checked
    operation produced already held it: ``source`` says whether it was the ``data``, a
    ``parameter``, a ``buffer`` or an ``unseen`` operation such as a custom Function).
    """

    cause: str
    op: str
    site: CallSite
    nonfinite: str
    inputs: list[dict[str, Any]] = field(default_factory=list)
    output: dict[str, Any] | None = None
    constant: float | None = None
    source: str | None = None
    tensor: str | None = None
    node: Any = None

    @property
    def deliberate(self) -> bool:
        """An infinite constant written on purpose (``masked_fill(mask, -inf)``), not a fault."""
        return (self.cause == "constant" and self.constant is not None
                and math.isinf(self.constant) and self.nonfinite != "nan")

    def summary(self) -> dict[str, Any]:
        """The event as plain data (for ``ReplayOutcome.first_forward``)."""
        return {
            "op": self.op, "cause": self.cause, "nonfinite": self.nonfinite,
            "file": self.site.file, "line": self.site.line, "function": self.site.function,
            "module": self.site.module, "code": self.site.code, "constant": self.constant,
            "source": self.source, "tensor": self.tensor,
        }


_MAX_EVENTS = 16
_MAX_INPUT_STATS = 3

#: A checked input: the tensor, its (has_nan, has_inf) and whether the check had not seen it.
_Input = tuple[torch.Tensor, tuple[bool, bool], bool]


class ForwardCheck(TorchFunctionMode):
    """Checks every torch call of the replayed forward pass (enter it around the forward only).

    Args:
        modules: The running-module tracker of the replayed model.
        model_tensors: ``id -> (kind, name)`` of the model's parameters and buffers.
        input_names: ``id -> name`` of the tensors the step was given (the batch).
    """

    def __init__(self, modules: ModuleStack, model_tensors: dict[int, tuple[str, str]],
                 input_names: dict[int, str]) -> None:
        super().__init__()
        self.modules = modules
        self.model_tensors = model_tensors
        self.input_names = input_names
        self.known: WeakIdKeyDictionary = WeakIdKeyDictionary()  # tensor -> (has_nan, has_inf)
        self.nodes: dict[Any, OpRecord] = {}
        self.events: list[ForwardEvent] = []
        self.calls = 0
        self._functions: dict[tuple[str | None, int], CallSite] = {}  # (file, first line)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") == "__get__":  # attribute reads (.shape, .grad_fn)
            return func(*args, **kwargs)
        try:
            before = self._inputs(args, kwargs)
        except Exception:  # noqa: BLE001 - a check must never change what the model computes
            log.debug("graddiag: replay check skipped an input of %s", func, exc_info=True)
            before = None
        result = func(*args, **kwargs)
        if before is not None:
            try:
                self._outputs(func, args, kwargs, before, result)
            except Exception:  # noqa: BLE001
                log.debug("graddiag: replay check skipped an output of %s", func, exc_info=True)
        return result

    # ----------------------------------------------------------------- per call
    def _inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[_Input]:
        """Each checkable input with its (nan, inf) flags and whether it is new to the check."""
        seen = []
        for tensor in tensors_in((args, kwargs)):
            if not checkable(tensor):
                continue
            known = self.known.get(tensor)
            fresh = known is None
            if fresh:
                known = flags(tensor)
                self.known[tensor] = known
            seen.append((tensor, known, fresh))
        return seen

    def _outputs(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                 before: list[_Input], result: Any) -> None:
        self.calls += 1
        outputs = [t for t in tensors_in(result) if checkable(t)]
        site: CallSite | None = None
        name = op_name(func)
        for tensor, (nan, inf), fresh in before:
            if fresh and (nan or inf):
                site = site or current_site(self.modules.current)
                self._add(self._entered(name, site, tensor))
        if not outputs:
            return
        in_nan = any(f[0] for _, f, _ in before)
        in_inf = any(f[1] for _, f, _ in before)
        out_flags = [flags(t) for t in outputs]
        for tensor, out in zip(outputs, out_flags):
            self.known[tensor] = out
        out_nan = any(f[0] for f in out_flags)
        out_inf = any(f[1] for f in out_flags)
        if (out_nan and not in_nan) or (out_inf and not (in_nan or in_inf)):
            site = site or current_site(self.modules.current)
            self._add(self._made(name, site, args, kwargs, before, outputs, out_flags, out_nan,
                                 in_nan))
        for tensor in outputs:
            node = tensor.grad_fn
            if node is not None and node not in self.nodes:
                site = site or current_site(self.modules.current)
                self.nodes[node] = OpRecord(name, site, in_nan or in_inf, out_nan or out_inf)
                if site.span is not None:
                    self._functions.setdefault((site.file, site.span[0]), site)

    def _made(self, name: str, site: CallSite, args: tuple[Any, ...], kwargs: dict[str, Any],
              before: list[_Input], outputs: list[torch.Tensor],
              out_flags: list[tuple[bool, bool]], out_nan: bool, in_nan: bool) -> ForwardEvent:
        constants = list(nonfinite_numbers((args, kwargs)))
        made_nan = out_nan and not in_nan
        bad = next(t for t, f in zip(outputs, out_flags) if (f[0] if made_nan else f[1]))
        word = "nan" if made_nan else nonfinite_word(bad)
        return ForwardEvent(
            cause="constant" if constants else "made",
            op=name,
            site=site,
            nonfinite=word,
            inputs=[tensor_stats(t, f"input {i}")
                    for i, (t, _, _) in enumerate(before[:_MAX_INPUT_STATS])],
            output=tensor_stats(bad, "output"),
            constant=constants[0] if constants else None,
        )

    def _entered(self, name: str, site: CallSite, tensor: torch.Tensor) -> ForwardEvent:
        """A non-finite tensor reached ``name`` without any checked operation having made it."""
        kind, label = self.model_tensors.get(id(tensor), (None, None))
        node = tensor.grad_fn
        if kind is not None:
            source, tensor_name = kind, label
        elif id(tensor) in self.input_names:
            source, tensor_name = "data", self.input_names[id(tensor)]
        elif node is not None:
            source, tensor_name = "unseen", None
        else:
            source, tensor_name = "data", None
        event = ForwardEvent(cause="entered", op=name, site=site, nonfinite=nonfinite_word(tensor),
                             output=tensor_stats(tensor, "tensor"), source=source,
                             tensor=tensor_name, node=node if source == "unseen" else None)
        if source == "unseen":  # name the operation that made it, where it was called
            event.op = node_op_name(node)
            event.site = self.refine(site_from_traceback(node_traceback(node)))
        return event

    def refine(self, site: CallSite) -> CallSite:
        """A site read from a traceback (function name only, no module), completed from a
        checked call made in the same function: its qualified name and its module."""
        if site.line is None:
            return site
        for (file, first), known in self._functions.items():
            assert known.span is not None
            if file == site.file and first <= site.line <= known.span[1] and \
                    (known.function or "").split(".")[-1] == site.function:
                return CallSite(site.file, site.line, known.function, known.module, known.span)
        return site

    def _add(self, event: ForwardEvent) -> None:
        if len(self.events) < _MAX_EVENTS:
            self.events.append(event)

    # ----------------------------------------------------------------- results
    def first_fault(self) -> ForwardEvent | None:
        """The first non-finite forward value that is not a deliberate infinite constant."""
        for event in self.events:
            if not event.deliberate:
                return event
        return self.events[0] if self.events else None

    def loss_origin(self, loss: torch.Tensor, site: CallSite) -> ForwardEvent | None:
        """The event for a non-finite loss that no checked operation consumed or made."""
        if not checkable(loss) or not any(flags(loss)):
            return None
        if self.known.get(loss) is not None:
            return None  # a checked operation made it: its events say how
        return self._entered("loss", site, loss)
