"""Every private torch API graddiag relies on, in one place, so a torch upgrade breaks one file."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


def function_mode_stack() -> list[Any]:
    """The ``TorchFunctionMode`` objects active now, innermost last."""
    return list(torch.overrides._get_current_function_mode_stack())


def is_compiling() -> bool:
    """Whether dynamo is tracing the code that calls this (``torch.compile``)."""
    return bool(torch.compiler.is_compiling())


def is_optimized_module(module: nn.Module) -> bool:
    """Whether ``module`` is the wrapper ``torch.compile(module)`` returns (``OptimizedModule``)."""
    cls = type(module)
    return cls.__name__ == "OptimizedModule" and cls.__module__.startswith("torch._dynamo")


def is_compiled_in_place(module: nn.Module) -> bool:
    """Whether ``module.compile()`` compiled this module in place."""
    return getattr(module, "_compiled_call_impl", None) is not None


@contextmanager
def without_function_mode(mode: Any) -> Iterator[None]:
    """Run the body with ``mode`` off the function-mode stack when it is on top (its own work,
    e.g. statistics computed in a module hook, then skips its ``__torch_function__``);
    otherwise leave the stack as it is."""
    stack = function_mode_stack()
    if not stack or stack[-1] is not mode:
        yield
        return
    torch.overrides._pop_mode()
    try:
        yield
    finally:
        torch.overrides._push_mode(mode)


def remove_function_mode(mode: Any) -> int:
    """Take ``mode`` off the function-mode stack, keeping the modes above it in order.

    Returns:
        How many modes sat above it (0 in the normal, nested case).

    Raises:
        RuntimeError: if ``mode`` is not on the stack.
    """
    stack = function_mode_stack()
    if mode not in stack:
        raise RuntimeError(f"{type(mode).__name__} is not on the function-mode stack")
    above = stack[stack.index(mode) + 1:]
    for _ in range(len(above) + 1):
        torch.overrides._pop_mode()
    for other in above:
        torch.overrides._push_mode(other)
    return len(above)
