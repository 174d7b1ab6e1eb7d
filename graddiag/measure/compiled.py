"""Finding the parts of a model that ``torch.compile`` compiles, whichever way it was asked."""

from __future__ import annotations

from torch import nn

from graddiag.data.names import clean_name
from graddiag.measure.compat import is_compiled_in_place, is_optimized_module


def compiled_parts(root: nn.Module) -> list[str]:
    """Names of the compiled parts of ``root`` (empty when nothing is compiled).

    Recognised routes: ``torch.compile(model)`` (an ``OptimizedModule`` at the root or anywhere
    below it, e.g. ``self.net = torch.compile(...)``), ``module.compile()`` in place, and a
    LightningModule that ``trainer.fit(torch.compile(module))`` compiled (Lightning unwraps it
    and leaves its ``_compiler_ctx`` set).
    """
    found: list[str] = []
    if getattr(root, "_compiler_ctx", None):
        found.append(f"{type(root).__name__} (compiled by trainer.fit(torch.compile(...)))")
    for raw_name, module in root.named_modules():
        if is_optimized_module(module) or is_compiled_in_place(module):
            found.append(clean_name(raw_name) or type(getattr(module, "_orig_mod", module)).__name__)
    return found
