"""Attention query and key projections: recognised by name beside their value projection, and
their small gradients explained by the attention scores rather than by the weights' scale."""

from __future__ import annotations

import numpy as np
import pytest

from graddiag.data.findings import Finding
from graddiag.data.records import ActivationRecord, StepRecord
from graddiag.data.tree import ModuleTree
from graddiag.rules import wording
from graddiag.rules.attention import score_projection
from graddiag.rules.explain import Explainer

BERT = ("", "embeddings", "encoder", "encoder.layer.0", "encoder.layer.0.attention",
        "encoder.layer.0.attention.self", "encoder.layer.0.attention.self.query",
        "encoder.layer.0.attention.self.key", "encoder.layer.0.attention.self.value",
        "encoder.layer.0.attention.output", "encoder.layer.0.attention.output.dense",
        "encoder.layer.0.intermediate.dense", "classifier")


def _tree(*names: str) -> ModuleTree:
    return ModuleTree(("", *names), "Model")


@pytest.mark.parametrize(("names", "layer", "expected"), [
    (BERT[1:], "encoder.layer.0.attention.self.query",
     ("query", "encoder.layer.0.attention.self.value")),
    (BERT[1:], "encoder.layer.0.attention.self.key",
     ("key", "encoder.layer.0.attention.self.value")),
    (BERT[1:], "encoder.layer.0.attention.self.value", None),
    (BERT[1:], "encoder.layer.0.attention.output.dense", None),
    (("layers.3.self_attn", "layers.3.self_attn.q_proj", "layers.3.self_attn.k_proj",
      "layers.3.self_attn.v_proj", "layers.3.self_attn.o_proj"), "layers.3.self_attn.k_proj",
     ("key", "layers.3.self_attn.v_proj")),
    (("block.0.SelfAttention.q", "block.0.SelfAttention.k", "block.0.SelfAttention.v"),
     "block.0.SelfAttention.q", ("query", "block.0.SelfAttention.v")),
    (("attn1.to_q", "attn1.to_k", "attn1.to_v"), "attn1.to_q", ("query", "attn1.to_v")),
    (("q", "k", "v"), "k", ("key", "v")),  # the root's own projections
    # a "key" without the value projection of its naming beside it is not taken for one
    (("memory.key", "memory.table"), "memory.key", None),
    (("attn.key", "attn.v"), "attn.key", None),
    (("attn.q", "attn.key", "other.v"), "attn.q", None),
    # a fused projection also makes the values: not a query or key projection
    (("h.0.attn.c_attn", "h.0.attn.c_proj"), "h.0.attn.c_attn", None),
])
def test_query_and_key_projections_are_recognised_beside_their_value_projection(
        names: tuple[str, ...], layer: str, expected: tuple[str, str] | None) -> None:
    found = score_projection(layer, _tree(*names))
    assert (None if found is None else (found.role, found.value)) == expected


LAYERS = ["encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.key",
          "encoder.layer.0.attention.self.value", "encoder.layer.0.attention.output.dense",
          "encoder.layer.0.intermediate.dense", "classifier"]


def _record(with_activations: bool = True) -> StepRecord:
    acts = None
    if with_activations:  # one GELU between the attention and the classifier
        acts = ActivationRecord(sites=["encoder.layer.0.intermediate:gelu"], kinds=["gelu"],
                                families=["rectifier"], saturated=np.full(1, np.nan),
                                dead=np.zeros(1), gain=np.array([0.5]), calls=np.ones(1))
    return StepRecord(step=9, layers=LAYERS,
                      grad_norm=np.array([2e-5, 3e-5, 4e-3, 1e-2, 2e-2, 0.3]),
                      has_grad=np.ones(len(LAYERS), bool), activations=acts)


def _vanishing(layer: str, value: float) -> Finding:
    return Finding("vanishing", layer, 9, value, 3e-5, "Vanishing gradient.",
                   details={"ratio_to_largest": value / 0.3})


@pytest.mark.parametrize("with_activations", [True, False])
@pytest.mark.parametrize(("layer", "role"), [("encoder.layer.0.attention.self.query", "query"),
                                             ("encoder.layer.0.attention.self.key", "key")])
def test_a_vanishing_query_or_key_is_explained_by_the_attention_scores(
        layer: str, role: str, with_activations: bool) -> None:
    record = _record(with_activations)
    explainer = Explainer(_tree(*BERT[1:]))
    explainer.observe(record)
    found = explainer.explain(_vanishing(layer, float(record.grad_norm[LAYERS.index(layer)])),
                              record)
    assert found.remedy == wording.ATTENTION_SCORES
    assert found.details["attention_projection"] == role
    assert found.details["value_projection"] == "encoder.layer.0.attention.self.value"
    assert f"is an attention {role} projection" in found.message
    assert "only through the attention scores" in found.message
    # neither the weights' scale nor a missing activation is blamed
    assert "weights' scale" not in found.message
    assert "No activation sits between" not in found.message
    if with_activations:
        assert "(the rest comes from the attention scores)" in found.message


def test_other_layers_and_an_exactly_zero_gradient_keep_their_explanation() -> None:
    record = _record()
    explainer = Explainer(_tree(*BERT[1:]))
    explainer.observe(record)
    value = explainer.explain(_vanishing("encoder.layer.0.attention.self.value", 4e-3), record)
    assert value.remedy != wording.ATTENTION_SCORES
    assert "attention_projection" not in value.details
    assert "(the rest comes from the weights' scale, i.e. initialisation)" in value.message
    zero = explainer.explain(_vanishing("encoder.layer.0.attention.self.query", 0.0), record)
    assert "attention_projection" not in zero.details
    assert "The gradient is exactly zero" in zero.message


def _stalled(layer: str, grad_zero: bool) -> Finding:
    cause = ("Its gradient norm is 6.7e-05 x the largest layer's: the gradient has vanished "
             "before it reaches these weights.")
    return Finding("stalled", layer, 50, 1e-8, 1e-6, f"Stalled weights. {cause}",
                   remedy=wording.VANISHING,
                   details={"cause": cause, "cause_kind": "gradient", "grad_zero": grad_zero,
                            "grad_ratio_to_largest": 6.7e-5, "largest_grad_layer": "classifier",
                            "grad_below_abs": grad_zero})


def test_a_query_stalled_by_its_small_gradient_gets_the_same_explanation() -> None:
    record = _record(with_activations=False)
    explainer = Explainer(_tree(*BERT[1:]))
    explainer.observe(record)
    layer = "encoder.layer.0.attention.self.query"
    stalled = explainer.explain(_stalled(layer, grad_zero=False), record)
    assert stalled.remedy == wording.ATTENTION_SCORES
    assert stalled.details["attention_projection"] == "query"
    assert stalled.message.startswith("Stalled weights. Its gradient norm is 6.7e-05")
    assert "only through the attention scores" in stalled.message
    zero = explainer.explain(_stalled(layer, grad_zero=True), record)
    assert zero.remedy == wording.VANISHING and "attention_projection" not in zero.details
