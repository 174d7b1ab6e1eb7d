"""Attention query and key projections, recognised in the module tree: layers whose gradient
reaches the loss only through the attention scores, where a small gradient has a cause of its own.

With scores ``q_i . k_j / sqrt(d)`` and attention weights ``p_ij`` over positions ``j``, a
query's gradient is ``sum_j p_ij (g_ij - mean_p g_i) k_j / sqrt(d)`` and a key's
``sum_i p_ij (g_ij - mean_p g_i) q_i / sqrt(d)``, where ``g_ij`` is how much the loss gains from
position ``j``'s value for query ``i``. So a query projection's gradient is proportional to the
key weights and to the value weights (a key projection's to the query and the value weights),
which the value projection's own gradient does not depend on: small weights there keep it far
below the value projection's. It is also near zero where positions look alike to the loss or
attention sits on a single position. A projection that also makes the values (a fused
``qkv``/``c_attn``/``in_proj``) is not one of them.
"""

from __future__ import annotations

from dataclasses import dataclass

from graddiag.data.tree import ModuleTree

#: The last name parts of the query, key and value projections of one attention module, as the
#: models people train name them, for example: ``query``/``key``/``value`` (Hugging Face BERT,
#: RoBERTa, ALBERT, ELECTRA), ``q_proj``/``k_proj``/``v_proj`` (LLaMA, Mistral, OPT, BART,
#: Whisper, CLIP), ``q``/``k``/``v`` (T5, MPNet), ``q_lin`` (DistilBERT), ``query_proj``
#: (DeBERTa-v2), ``to_q`` (diffusers), ``wq`` and ``q_linear`` (hand-written attention).
PROJECTION_NAMES: tuple[tuple[str, str, str], ...] = (
    ("query", "key", "value"),
    ("q_proj", "k_proj", "v_proj"),
    ("q", "k", "v"),
    ("q_lin", "k_lin", "v_lin"),
    ("query_proj", "key_proj", "value_proj"),
    ("to_q", "to_k", "to_v"),
    ("wq", "wk", "wv"),
    ("q_linear", "k_linear", "v_linear"),
)
#: Parts of an adapter wrapped around a projection (peft's LoRA and DoRA: ``q_proj.base_layer``,
#: ``q_proj.lora_A.<adapter name>``, ``q_proj.lora_magnitude_vector``): the layer is still that
#: projection's.
_ADAPTER_PARTS = ("base_layer", "lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B",
                  "lora_magnitude_vector")


@dataclass(frozen=True)
class ScoreProjection:
    """A layer recognised as an attention query or key projection.

    Attributes:
        role: ``"query"`` or ``"key"``.
        partner: The projection on the other side of the scores (the key projection for a
            query, the query projection for a key): its module name.
        value: The layer of the value projection beside it that corresponds to this one (the
            same adapter part, under LoRA), whose gradient does not pass through the scores.
    """

    role: str
    partner: str
    value: str


def _projection_part(parts: list[str]) -> int | None:
    """The position of the part that names the projection: the last one, or the one before an
    adapter part (with or without an adapter name after it)."""
    if len(parts) >= 2 and parts[-1] in _ADAPTER_PARTS:
        return len(parts) - 2
    if len(parts) >= 3 and parts[-2] in _ADAPTER_PARTS:
        return len(parts) - 3
    return len(parts) - 1 if parts and parts[-1] else None


def score_projection(layer: str, tree: ModuleTree) -> ScoreProjection | None:
    """``layer`` as an attention query or key projection: named as one (see
    :data:`PROJECTION_NAMES`), with the query, key and value projections of that naming all
    under its parent module in ``tree``; ``None`` for any other layer (a ``q`` head beside a
    ``v`` head, with no ``k``, is not taken for one)."""
    parts = layer.split(".")
    at = _projection_part(parts)
    if at is None:
        return None
    prefix, name, suffix = parts[:at], parts[at], parts[at + 1:]

    def module(part: str, tail: tuple[str, ...] = ()) -> str:
        return ".".join([*prefix, part, *tail])

    for query, key, value in PROJECTION_NAMES:
        if name not in (query, key):
            continue
        if all(tree.position(module(part)) is not None for part in (query, key, value)):
            partner = key if name == query else query
            return ScoreProjection("query" if name == query else "key", module(partner),
                                   module(value, tuple(suffix)))
    return None


#: What a query's and a key's gradient is made of, in words.
_MADE_OF = {
    "query": ("the keys weighted by the attention weights and by how much more the loss gains "
              "from each attended position's value than from the average attended one"),
    "key": ("the queries weighted by the attention each of them gives this key's position and by "
            "how much more the loss gains from this position's value than from the average one "
            "that query attends"),
}


def scores_note(layer: str, projection: ScoreProjection, value_ratio: float) -> str:
    """Why an attention query or key projection's gradient is small, for a finding's message;
    ``value_ratio``: the value projection's gradient norm over this layer's, on the same step."""
    other = "key" if projection.role == "query" else "query"
    return (
        f"'{layer}' is an attention {projection.role} projection (beside '{projection.partner}' "
        "and the value projection): its gradient reaches the loss only through the attention "
        f"scores, as {_MADE_OF[projection.role]} (times the scores' scale, 1/sqrt(head size) in "
        f"most models). It is proportional to the {other} weights and to the value weights, "
        "which the value projection's own gradient does not depend on, so small weights there "
        "keep it far below that one; it is also near zero where positions look alike to the "
        f"loss or attention sits on a single position. Here '{projection.value}' gets "
        f"{value_ratio:.3g} x this layer's gradient."
    )
