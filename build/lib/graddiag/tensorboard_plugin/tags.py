"""Which of a run's TensorBoard tags graddiag wrote, found by name alone.

Scalars: ``{prefix}grad_norm/{layer}``, ``{prefix}saturated/{site}``, ``{prefix}dead/{site}``.
Texts (torch's ``SummaryWriter`` stores them under ``"<tag>/text_summary"``):
``{prefix}layers_json``, ``{prefix}findings_json`` and the Markdown ``{prefix}findings``.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from graddiag.reporters.plugin_data import FINDINGS_TAG, LAYERS_TAG

DEFAULT_PREFIX = "graddiag/"
TEXT_SUFFIX = "/text_summary"
GRAD_NORM = re.compile(r"^(?P<prefix>.*?)grad_norm/(?P<layer>.+)$")
MARKDOWN_FINDINGS = "findings"


def text_name(tag: str) -> str:
    """A text tag without the ``/text_summary`` suffix that torch's writer appends."""
    return tag[: -len(TEXT_SUFFIX)] if tag.endswith(TEXT_SUFFIX) else tag


@dataclass
class RunTags:
    """The graddiag tags of one run, under one prefix.

    Attributes:
        prefix: The tag prefix (``"graddiag/"`` unless the callback was given another).
        grad_norm: ``{layer: scalar tag}`` of the per-layer gradient norms.
        fractions: ``{site: scalar tag}`` of the saturated/dead fraction per activation site.
        texts: ``{"layers_json" | "findings_json" | "findings": text tag}`` (tags as stored).
    """

    prefix: str
    grad_norm: dict[str, str] = field(default_factory=dict)
    fractions: dict[str, str] = field(default_factory=dict)
    texts: dict[str, str] = field(default_factory=dict)

    @property
    def empty(self) -> bool:
        """No graddiag data at all under this prefix."""
        return not self.grad_norm and LAYERS_TAG not in self.texts and FINDINGS_TAG not in self.texts


def _choose_prefix(candidates: Iterable[str]) -> str | None:
    counts = Counter(candidates)
    if not counts:
        return None
    if DEFAULT_PREFIX in counts:
        return DEFAULT_PREFIX
    return sorted(counts, key=lambda p: (-counts[p], p))[0]


def run_tags(scalar_tags: Iterable[str], text_tags: Iterable[str]) -> RunTags:
    """Sort one run's tags into graddiag's (an empty :class:`RunTags` if it has none).

    The prefix is the one of the ``layers_json`` text if there is one, else the most common
    prefix of ``grad_norm`` tags (``graddiag/`` wins a tie).
    """
    scalar_tags, text_tags = list(scalar_tags), [str(t) for t in text_tags]
    record_prefixes = [text_name(t)[: -len(LAYERS_TAG)] for t in text_tags
                       if text_name(t).endswith(LAYERS_TAG)]
    grad = [m for m in map(GRAD_NORM.match, scalar_tags) if m]
    prefix = _choose_prefix(record_prefixes) or _choose_prefix(m["prefix"] for m in grad)
    if prefix is None:
        return RunTags(prefix=DEFAULT_PREFIX)
    tags = RunTags(prefix=prefix)
    tags.grad_norm = {m["layer"]: m.string for m in grad if m["prefix"] == prefix}
    for tag in scalar_tags:
        for statistic in ("saturated/", "dead/"):
            if tag.startswith(prefix + statistic) and len(tag) > len(prefix + statistic):
                tags.fractions.setdefault(tag[len(prefix + statistic):], tag)
    for tag in text_tags:
        name = text_name(tag)
        for key in (LAYERS_TAG, FINDINGS_TAG, MARKDOWN_FINDINGS):
            if name == prefix + key:
                tags.texts.setdefault(key, tag)
    return tags
