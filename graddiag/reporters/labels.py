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
    return _shortened(name.split("."), _cuts(name, max_len), max_len)


def _cuts(name: str, max_len: int) -> int:
    """How many leading components :func:`abbreviate` cuts to their first letter (counting the
    numbers and one-letter components it passes over)."""
    parts = name.split(".")
    if len(name) <= max_len:
        return 0
    for i in range(len(parts) - 1):
        if len(".".join(parts)) <= max_len:
            return i
        if not parts[i].isdigit() and len(parts[i]) > 1:
            parts[i] = parts[i][0]
    return len(parts) - 1


def _shortened(parts: list[str], cuts: int, max_len: int) -> str:
    """``parts`` joined with the first ``cuts`` of them cut to their first letter (numbers
    kept), then the middle replaced by an ellipsis if still longer than ``max_len``."""
    short = ".".join(p if i >= cuts or p.isdigit() else p[0] for i, p in enumerate(parts))
    if len(short) <= max_len:
        return short
    keep = max_len - 1
    head = keep // 2
    return short[:head] + ELLIPSIS + short[len(short) - (keep - head):]


def abbreviate_all(names: Sequence[str], max_len: int = MAX_LABEL) -> list[str]:
    """:func:`abbreviate` for each name, siblings alike: layers of one parent module have their
    parent's path cut the same way (``b.e.l.0.a.self.query`` next to ``b.e.l.0.a.self.key``,
    not ``b.e.l.0.attention.self.key``). Names whose labels would collide keep a
    middle-ellipsis of their full name instead, so that different layers never share a label
    where avoidable."""
    parents = [name.rpartition(".")[0] for name in names]
    cuts: dict[str, int] = {}
    for name, parent in zip(names, parents):
        cuts[parent] = max(cuts.get(parent, 0), _cuts(name, max_len))
    labels = [_shortened(name.split("."), cuts[parent], max_len)
              for name, parent in zip(names, parents)]
    seen: dict[str, int] = {}
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
    for i, (name, label) in enumerate(zip(names, labels)):
        if seen[label] > 1 and len(name) > max_len:
            keep = max_len - 1
            labels[i] = name[: keep // 2] + ELLIPSIS + name[len(name) - (keep - keep // 2):]
    return labels
