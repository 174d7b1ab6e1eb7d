"""Attention query and key projections, recognised in the module tree: layers whose gradient
reaches the loss only through the attention scores, where a small gradient has a cause of its own.

While attention is nearly uniform (every position weighted about 1/sequence length, as at
initialisation), the softmax passes little gradient back to the scores, and the scores' scale
(1/sqrt(head size)) shrinks it again: the query and key projections then get gradients orders of
magnitude below the value projection beside them, with nothing wrong in the weights or the
activations. A projection that also makes the values (a fused ``qkv``/``c_attn``/``in_proj``) is
not one of them: its gradient has the values' share.
"""

from __future__ import annotations

from dataclasses import dataclass

from graddiag.data.tree import ModuleTree

#: The last name parts of the query, key and value projections of one attention module, as the
#: models people train name them: Hugging Face BERT/RoBERTa/ViT/Swin/ALBERT (``query``), LLaMA,
#: Mistral, OPT, BART, Whisper and CLIP (``q_proj``), T5 and MPNet (``q``), DistilBERT
#: (``q_lin``), DeBERTa-v2 (``query_proj``), diffusers (``to_q``), hand-written attention (``wq``,
#: ``q_linear``).
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


@dataclass(frozen=True)
class ScoreProjection:
    """A layer recognised as an attention query or key projection.

    Attributes:
        role: ``"query"`` or ``"key"``.
        value: The value projection beside it (same parent module), whose presence confirms
            the reading of the name.
    """

    role: str
    value: str

    def details(self) -> dict[str, str]:
        """The finding details that name it: ``attention_projection`` (its role) and
        ``value_projection``."""
        return {"attention_projection": self.role, "value_projection": self.value}


def score_projection(layer: str, tree: ModuleTree) -> ScoreProjection | None:
    """``layer`` as an attention query or key projection: named as one (see
    :data:`PROJECTION_NAMES`) with the matching value projection beside it in ``tree``; ``None``
    for any other layer (a ``key`` without a ``value`` sibling is not taken for one)."""
    parent, _, last = layer.rpartition(".")
    for query, key, value in PROJECTION_NAMES:
        if last in (query, key):
            sibling = f"{parent}.{value}" if parent else value
            if tree.position(sibling) is not None:
                return ScoreProjection("query" if last == query else "key", sibling)
    return None


def scores_note(layer: str, projection: ScoreProjection) -> str:
    """Why an attention query or key projection's gradient is small, for a finding's message."""
    return (
        f"'{layer}' is an attention {projection.role} projection (named so, beside the value "
        f"projection '{projection.value}'): its gradient reaches the loss only through the "
        "attention scores, scaled there by the softmax's derivative (each attention weight, "
        "about 1/sequence length while attention is nearly uniform) and by the scores' "
        "1/sqrt(head size). That is the usual state at initialisation, and it lasts where "
        "nothing in the data rewards attending to particular positions; the gradient grows as "
        "attention sharpens."
    )
