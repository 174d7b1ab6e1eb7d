"""Which modules are layers, what they are called, and in which order the forward pass runs them.

A *layer* is a module that directly owns trainable parameters. Its name is the module's
qualified name relative to the monitored module, with ``torch.compile``'s ``_orig_mod.``
removed. A parameter shared by several modules (tied weights) belongs to the first one only.
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from graddiag.data.errors import PatternMatchError
from graddiag.data.names import clean_name

log = logging.getLogger("graddiag")


@dataclass
class Layer:
    """One monitored layer: its module and the trainable parameters it owns directly."""

    name: str
    module: nn.Module
    param_names: list[str]
    params: list[nn.Parameter]


@dataclass
class LayerIndex:
    """The monitored layers, in forward order once a forward pass has been seen."""

    layers: list[Layer] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def __len__(self) -> int:
        return len(self.layers)

    def reorder(self, order: dict[str, int]) -> None:
        """Sort layers by forward execution index; layers never seen keep their order at the end."""
        big = len(self.layers) + max(order.values(), default=0) + 1
        position = {layer.name: i for i, layer in enumerate(self.layers)}
        self.layers.sort(key=lambda layer: (order.get(layer.name, big), position[layer.name]))


def _owners(root: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules that directly own parameters (trainable or not), with the names users see."""
    return [
        (clean_name(raw_name) or type(module).__name__, module)
        for raw_name, module in root.named_modules(remove_duplicate=True)
        if next(iter(module.parameters(recurse=False)), None) is not None
    ]


def discover_layers(
    root: nn.Module,
    include: tuple[str, ...] | None = None,
    exclude: tuple[str, ...] = (),
    *,
    check_patterns: bool = True,
) -> LayerIndex:
    """Find the layers of ``root``: modules owning parameters that require gradients now.

    Args:
        root: The monitored module.
        include: Glob patterns of layer names to keep (``None`` keeps all).
        exclude: Glob patterns of layer names to drop.
        check_patterns: Reject patterns that match no module owning parameters (frozen ones
            count: they may be unfrozen later).

    Raises:
        ValueError: if an ``include`` or ``exclude`` pattern matches no module owning parameters,
            or the patterns together leave no such module to monitor (``include=[]``,
            ``exclude=["*"]``).
    """
    seen: set[int] = set()
    candidates: list[Layer] = []
    owners = _owners(root)
    for name, module in owners:
        names, params = [], []
        for pname, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            names.append(pname)
            params.append(param)
        if params:
            candidates.append(Layer(name, module, names, params))
    if check_patterns:
        all_names = [name for name, _ in owners]
        for option, patterns in (("include", include or ()), ("exclude", exclude)):
            for pattern in patterns:
                if not any(fnmatch.fnmatchcase(n, pattern) for n in all_names):
                    raise PatternMatchError(
                        f"{option} pattern {pattern!r} matches no layer; layers are {all_names}")
        if all_names and not any(_selected(n, include, exclude) for n in all_names):
            raise PatternMatchError(
                f"include/exclude: the patterns include={None if include is None else list(include)!r} and "
                f"exclude={list(exclude)!r} left no layer to monitor; layers are {all_names}"
            )
    return LayerIndex([layer for layer in candidates if _selected(layer.name, include, exclude)])


def _selected(name: str, include: tuple[str, ...] | None, exclude: tuple[str, ...]) -> bool:
    return ((include is None or any(fnmatch.fnmatchcase(name, p) for p in include))
            and not any(fnmatch.fnmatchcase(name, p) for p in exclude))


class ForwardOrderRecorder:
    """Learns the order in which modules owning parameters first run, by watching forward passes.

    Every module that owns parameters is watched, trainable or not, so a layer unfrozen later
    can be placed. The first execution counts (a reused module sits where it is first used, its
    use furthest from the loss); calls made during a backward pass (activation checkpointing
    re-running blocks) are ignored. Hooks are removed by :meth:`finish`.
    """

    def __init__(self, root: nn.Module) -> None:
        self._order: dict[str, int] = {}
        self._counter = 0
        self._handles: list[RemovableHandle] = []
        for name, module in _owners(root):
            self._handles.append(module.register_forward_hook(self._hook_for(name)))

    def _hook_for(self, name: str):  # noqa: ANN202 - a closure over the layer's name
        def hook(module: nn.Module, args: object, output: object) -> None:
            if name in self._order or torch._C._current_graph_task_id() != -1:
                return
            self._order[name] = self._counter
            self._counter += 1

        return hook

    @property
    def order(self) -> dict[str, int]:
        return dict(self._order)

    def finish(self) -> dict[str, int]:
        """Remove the hooks and return ``{module name: first execution index}``."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        return self.order


def is_dtensor(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a distributed tensor (FSDP2 / tensor parallel)."""
    return type(tensor).__name__ == "DTensor"
