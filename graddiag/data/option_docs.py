"""The README's options table, generated from the options definition.

``graddiag options`` prints :func:`markdown_table`; a test checks that the README holds
exactly that table.
"""

from __future__ import annotations

import math

from graddiag.data.options import IDENTITY_OPTION_NAMES, OPTIONS


def format_default(value: object) -> str:
    """A default as a user would write it in Python (lists for tuples, ``inf``, ``1e-12``)."""
    if isinstance(value, tuple):
        return repr(list(value))
    if isinstance(value, float):
        return "inf" if math.isinf(value) else repr(value)
    return repr(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown_table() -> str:
    """The README's options tables: options of both entry points, then callback-only ones."""
    out: list[str] = []
    for title, adapter in (
        ("`GradientMonitor` and `GradientDiagnostics`", False),
        ("`GradientDiagnostics` only (Lightning: logging and display)", True),
    ):
        out += [f"{title}:", "", "| option | default | allowed | what it does |",
                "|---|---|---|---|"]
        for o in OPTIONS:
            if o.adapter == adapter:
                out.append(f"| `{o.name}` | `{format_default(o.default)}` | {_cell(o.allowed)} "
                           f"| {_cell(o.doc)} |")
        out.append("")
    identity = ", ".join(f"`{name}`" for name in IDENTITY_OPTION_NAMES)
    out.append(f"Identity settings (the callback's `state_key`): {identity}.")
    return "\n".join(out) + "\n"
