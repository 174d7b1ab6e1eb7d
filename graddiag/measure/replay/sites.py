"""Where an operation was called: the user's source line, function and module.

A *user frame* is a Python frame outside torch, Lightning, the standard library and graddiag's
own library code (graddiag's bundled demos count as user code). The module is the innermost
module of the replayed model whose ``forward`` was running, tracked with global module hooks
that exist only during a replay.
"""

from __future__ import annotations

import functools
import linecache
import os
import re
import sys
import sysconfig
from dataclasses import dataclass
from types import CodeType, FrameType
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from graddiag.measure.layers import clean_name


@dataclass(frozen=True)
class CallSite:
    """A call of an operation: the user's file, line, function and the calling module."""

    file: str | None = None
    line: int | None = None
    function: str | None = None
    module: str | None = None
    span: tuple[int, int] | None = None  # first and last line of the calling function

    @property
    def code(self) -> str | None:
        """The source text of the line, stripped (``None`` if the file cannot be read)."""
        if self.file is None or self.line is None:
            return None
        text = linecache.getline(self.file, self.line).strip()
        return text or None

    def fields(self) -> dict[str, Any]:
        """Where the call was, as the keyword fields of a replay outcome."""
        return {"module": self.module, "function": self.function, "file": self.file,
                "line": self.line, "code": self.code}


def _package_dir(name: str) -> str | None:
    module = sys.modules.get(name)
    path = getattr(module, "__file__", None)
    return os.path.dirname(os.path.abspath(path)) + os.sep if path else None


@functools.lru_cache(maxsize=1)
def _internal_dirs() -> tuple[tuple[str, ...], str, tuple[str, ...]]:
    graddiag_dir = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    library = [_package_dir(n) for n in ("torch", "pytorch_lightning", "lightning",
                                         "lightning_fabric", "lightning_utilities",
                                         "torchmetrics")]
    demos = os.path.join(graddiag_dir, "demos") + os.sep
    stdlib = tuple({os.path.abspath(sysconfig.get_paths()[k]) + os.sep
                    for k in ("stdlib", "platstdlib")})
    return tuple(d for d in library if d) + (graddiag_dir + os.sep,), demos, stdlib


@functools.lru_cache(maxsize=4096)
def is_internal(filename: str) -> bool:
    """Whether a frame in ``filename`` belongs to torch, Lightning, the stdlib or graddiag itself."""
    if filename.startswith("<"):
        return True  # <frozen ...>, <string> of generated code
    path = os.path.abspath(filename)
    library, demos, stdlib = _internal_dirs()
    if path.startswith(demos):
        return False
    if any(path.startswith(d) for d in library):
        return True
    packages = f"{os.sep}site-packages{os.sep}" in path or f"{os.sep}dist-packages{os.sep}" in path
    return not packages and any(path.startswith(d) for d in stdlib)


def _function_name(frame: FrameType) -> str:
    code = frame.f_code
    return getattr(code, "co_qualname", code.co_name)


@functools.lru_cache(maxsize=4096)
def _span(code: CodeType) -> tuple[int, int]:
    lines = [line for _, _, line in code.co_lines() if line is not None]
    return code.co_firstlineno, max(lines, default=code.co_firstlineno)


def user_frame(frame: FrameType | None) -> FrameType | None:
    """The innermost frame at or above ``frame`` that is user code."""
    while frame is not None and is_internal(frame.f_code.co_filename):
        frame = frame.f_back
    return frame


def current_site(module: str | None) -> CallSite:
    """The call site of the operation being executed now, seen from inside a function mode."""
    frame = user_frame(sys._getframe(1))
    if frame is None:
        return CallSite(module=module)
    return CallSite(os.path.abspath(frame.f_code.co_filename), frame.f_lineno,
                    _function_name(frame), module, _span(frame.f_code))


_TRACE_LINE = re.compile(r'File "(?P<file>.+)", line (?P<line>\d+), in (?P<function>\S+)')


def site_from_traceback(lines: list[str] | None, module: str | None = None) -> CallSite:
    """The innermost user frame of a formatted stack (anomaly mode's forward traceback)."""
    for entry in reversed(lines or []):
        match = _TRACE_LINE.search(entry)
        if match and not is_internal(match["file"]):
            return CallSite(os.path.abspath(match["file"]), int(match["line"]),
                            match["function"], module)
    return CallSite(module=module)


def node_traceback(node: Any) -> list[str] | None:
    """The forward traceback that anomaly mode stored on an autograd node, if any."""
    try:
        metadata = node.metadata
    except Exception:  # noqa: BLE001 - not every node type exposes metadata
        return None
    trace = metadata.get("traceback_") if isinstance(metadata, dict) else None
    return list(trace) if isinstance(trace, (list, tuple)) else None


def _user_forward(module: nn.Module) -> bool:
    code = getattr(type(module).forward, "__code__", None)
    return code is not None and not is_internal(code.co_filename)


class ModuleStack:
    """The innermost running module of one model whose ``forward`` is user code (not a torch
    built-in such as ``nn.Linear``, whose calls show up on the line of the module calling it),
    through global module hooks that exist only while entered."""

    def __init__(self, root: nn.Module) -> None:
        self.names = {m: clean_name(n) for n, m in root.named_modules() if _user_forward(m)}
        self.stack: list[str] = []
        self._handles: list[RemovableHandle] = []

    @property
    def current(self) -> str | None:
        return self.stack[-1] if self.stack else None

    def __enter__(self) -> ModuleStack:
        self.stack.clear()
        hooks = nn.modules.module
        self._handles.append(hooks.register_module_forward_pre_hook(self._push))
        try:
            self._handles.append(hooks.register_module_forward_hook(self._pop, always_call=True))
        except TypeError:  # torch without always_call
            self._handles.append(hooks.register_module_forward_hook(self._pop))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.stack.clear()

    def _push(self, module: nn.Module, args: Any) -> None:
        name = self.names.get(module)
        if name is not None:
            self.stack.append(name)

    def _pop(self, module: nn.Module, args: Any, output: Any) -> None:
        name = self.names.get(module)
        if name is not None and self.stack and self.stack[-1] == name:
            self.stack.pop()


def named_model_tensors(root: nn.Module) -> dict[int, tuple[str, str]]:
    """``id(tensor) -> (kind, name)`` for the parameters and buffers of ``root``."""
    found: dict[int, tuple[str, str]] = {}
    for name, param in root.named_parameters():
        found.setdefault(id(param), ("parameter", clean_name(name)))
    for name, buffer in root.named_buffers():
        found.setdefault(id(buffer), ("buffer", clean_name(name)))
    return found


def closure_tensors(closure: Any) -> dict[int, str]:
    """``id(tensor) -> variable name`` for tensors a closure refers to (its cells and globals)."""
    found: dict[int, str] = {}
    code = getattr(closure, "__code__", None)
    if code is None:
        return found
    cells = getattr(closure, "__closure__", None) or ()
    for name, cell in zip(code.co_freevars, cells):
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if isinstance(value, torch.Tensor):
            found.setdefault(id(value), name)
    scope = getattr(closure, "__globals__", {})
    for name in code.co_names:
        value = scope.get(name)
        if isinstance(value, torch.Tensor):
            found.setdefault(id(value), name)
    return found
