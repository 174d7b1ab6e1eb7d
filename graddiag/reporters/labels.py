"""Short, still distinguishable labels for long layer names (Hugging Face models have names like
``bert.encoder.layer.10.attention.output.dense``)."""

from __future__ import annotations

from collections.abc import Sequence

MAX_LABEL = 28
ELLIPSIS = "\u2026"


def abbreviate(name: str, max_len: int = MAX_LABEL) -> str:
    """``name`` shortened to at most ``max_len`` characters.

    Module-path components are cut to their first letter from the left, keeping numbers (which
    tell repeated blocks apart) and the last component; what is still too long loses its middle
    to an ellipsis. ``bert.encoder.layer.10.attention.output.dense`` becomes
    ``b.e.l.10.a.output.dense``.
    """
    if len(name) <= max_len:
        return name
    parts = name.split(".")
    for i in range(len(parts) - 1):
        if len(".".join(parts)) <= max_len:
            break
        if not parts[i].isdigit() and len(parts[i]) > 1:
            parts[i] = parts[i][0]
    short = ".".join(parts)
    if len(short) <= max_len:
        return short
    keep = max_len - 1
    head = keep // 2
    return short[:head] + ELLIPSIS + short[len(short) - (keep - head):]


def abbreviate_all(names: Sequence[str], max_len: int = MAX_LABEL) -> list[str]:
    """:func:`abbreviate` for each name; names whose labels would collide keep a middle-ellipsis
    of their full name instead, so that different layers never share a label where avoidable."""
    labels = [abbreviate(n, max_len) for n in names]
    seen: dict[str, int] = {}
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
    for i, (name, label) in enumerate(zip(names, labels)):
        if seen[label] > 1 and len(name) > max_len:
            keep = max_len - 1
            labels[i] = name[: keep // 2] + ELLIPSIS + name[len(name) - (keep - keep // 2):]
    return labels
