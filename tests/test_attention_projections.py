"""Attention query and key projections: recognised by name beside the key/query and value
projections of the same naming, and a small gradient there explained by the attention scores
when the value projection beside it is far larger."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from graddiag.data.findings import Finding
from graddiag.data.records import ActivationRecord, StepRecord
from graddiag.data.tree import ModuleTree
from graddiag.rules import wording
from graddiag.rules.attention import PROJECTION_NAMES, score_projection
from graddiag.rules.explain import Explainer

SELF = "encoder.layer.0.attention.self"
BERT = ("embeddings", "encoder", "encoder.layer.0", "encoder.layer.0.attention", SELF,
        f"{SELF}.query", f"{SELF}.key", f"{SELF}.value", "encoder.layer.0.attention.output",
        "encoder.layer.0.attention.output.dense", "encoder.layer.0.intermediate.dense",
        "classifier")


def _tree(*names: str) -> ModuleTree:
    return ModuleTree(("", *names), "Model")


#: The namings the README documents, written out here.
NAMINGS = [("query", "key", "value"), ("q_proj", "k_proj", "v_proj"), ("q", "k", "v"),
           ("q_lin", "k_lin", "v_lin"), ("query_proj", "key_proj", "value_proj"),
           ("to_q", "to_k", "to_v"), ("wq", "wk", "wv"), ("q_linear", "k_linear", "v_linear")]


def test_the_code_knows_exactly_the_documented_namings() -> None:
    assert sorted(PROJECTION_NAMES) == sorted(NAMINGS)


@pytest.mark.parametrize(("query", "key", "value"), NAMINGS)
def test_every_naming_is_recognised_with_its_partner_and_value(query: str, key: str,
                                                                value: str) -> None:
    tree = _tree("blocks.2.attn", f"blocks.2.attn.{query}", f"blocks.2.attn.{key}",
                 f"blocks.2.attn.{value}", "blocks.2.attn.out")
    found = score_projection(f"blocks.2.attn.{query}", tree)
    assert found is not None
    assert (found.role, found.partner, found.value) == (
        "query", f"blocks.2.attn.{key}", f"blocks.2.attn.{value}")
    found = score_projection(f"blocks.2.attn.{key}", tree)
    assert found is not None
    assert (found.role, found.partner) == ("key", f"blocks.2.attn.{query}")
    assert score_projection(f"blocks.2.attn.{value}", tree) is None
    assert score_projection("blocks.2.attn.out", tree) is None


LORA = ("layers.0.self_attn", *(f"layers.0.self_attn.{p}{tail}"
                                for p in ("q_proj", "k_proj", "v_proj")
                                for tail in ("", ".base_layer", ".lora_A", ".lora_A.default",
                                             ".lora_B", ".lora_B.default",
                                             ".lora_magnitude_vector")))


@pytest.mark.parametrize(("names", "layer", "expected"), [
    # peft's LoRA wraps the projection: its adapter parts are the projection's layers
    (LORA, "layers.0.self_attn.q_proj.lora_B.default",
     ("query", "layers.0.self_attn.k_proj", "layers.0.self_attn.v_proj.lora_B.default")),
    (LORA, "layers.0.self_attn.k_proj.base_layer",
     ("key", "layers.0.self_attn.q_proj", "layers.0.self_attn.v_proj.base_layer")),
    (LORA, "layers.0.self_attn.q_proj.lora_magnitude_vector",  # DoRA's magnitudes
     ("query", "layers.0.self_attn.k_proj", "layers.0.self_attn.v_proj.lora_magnitude_vector")),
    (LORA, "layers.0.self_attn.v_proj.lora_A.default", None),
    (("q", "k", "v"), "k", ("key", "q", "v")),  # the root's own projections
    # an actor-critic's q and v heads: no key projection, no attention
    (("trunk", "q", "v"), "q", None),
    (("memory.key", "memory.value_table"), "memory.key", None),
    # the three must share one naming and one parent module
    (("attn.q", "attn.key", "attn.v"), "attn.q", None),
    (("a.query", "a.key", "b.value"), "a.query", None),
    # a fused projection also makes the values: not a query or key projection
    (("h.0.attn.c_attn", "h.0.attn.c_proj"), "h.0.attn.c_attn", None),
])
def test_what_is_and_is_not_taken_for_a_query_or_key_projection(
        names: tuple[str, ...], layer: str, expected: tuple[str, str, str] | None) -> None:
    found = score_projection(layer, _tree(*names))
    assert (None if found is None else (found.role, found.partner, found.value)) == expected


LAYERS = [f"{SELF}.query", f"{SELF}.key", f"{SELF}.value",
          "encoder.layer.0.attention.output.dense", "encoder.layer.0.intermediate.dense",
          "classifier"]
LARGEST = 0.3
FLOOR = 1e-4 * LARGEST  # the vanishing rule's relative floor at its default


def _record(value: float = 4e-3, with_activations: bool = True, key: float = 3e-5,
            moving: bool = False) -> StepRecord:
    acts = None
    if with_activations:  # one GELU between the attention and the classifier
        acts = ActivationRecord(sites=["encoder.layer.0.intermediate:gelu"], kinds=["gelu"],
                                families=["rectifier"], saturated=np.full(1, np.nan),
                                dead=np.zeros(1), gain=np.array([0.5]), calls=np.ones(1))
    # every layer's weights moved by 1e-3 of their norm on this step (as Adam moves them)
    update_ratio = np.full(len(LAYERS), 1e-3) if moving else None
    return StepRecord(step=9, layers=LAYERS,
                      grad_norm=np.array([2e-5, key, value, 1e-2, 2e-2, LARGEST]),
                      has_grad=np.ones(len(LAYERS), bool), activations=acts,
                      update_ratio=update_ratio)


def _explained(layer: str, record: StepRecord, early: bool = False,
               with_floor: bool = True) -> Finding:
    value = float(record.grad_norm[LAYERS.index(layer)])
    explainer = Explainer(_tree(*BERT))
    explainer.observe(record)
    details: dict[str, object] = {"ratio_to_largest": value / LARGEST}
    if with_floor:
        details["vanishing_floor"] = FLOOR
    finding = Finding("vanishing", layer, 9, value, 1e-8 * LARGEST if early else FLOOR,
                      "Vanishing gradient.", details=details)
    return explainer.explain(finding, record)


@pytest.mark.parametrize("with_activations", [True, False])
@pytest.mark.parametrize(("layer", "role", "partner"), [
    (f"{SELF}.query", "query", f"{SELF}.key"), (f"{SELF}.key", "key", f"{SELF}.query")])
def test_a_query_or_key_far_below_its_value_projection_is_explained_by_the_scores(
        layer: str, role: str, partner: str, with_activations: bool) -> None:
    record = _record(with_activations=with_activations)
    found = _explained(layer, record)
    ratio = 4e-3 / float(record.grad_norm[LAYERS.index(layer)])  # 200 and 133, by hand
    assert found.remedy == wording.ATTENTION_SCORES
    assert found.details["attention_projection"] == role
    assert found.details["value_projection"] == f"{SELF}.value"
    assert found.details["value_ratio"] == pytest.approx(ratio)
    assert f"is an attention {role} projection (beside '{partner}'" in found.message
    assert f"'{SELF}.value' gets {ratio:.3g} x this layer's gradient" in found.message
    other = "key" if role == "query" else "query"
    assert f"It is proportional to the {other} weights and to the value weights" in found.message
    made_of = {"query": "as the keys weighted by the attention weights",
               "key": "as the queries weighted by the attention each of them gives this key's"}
    assert made_of[role] in found.message


@pytest.mark.parametrize("moving", [False, True])
def test_waiting_is_advised_only_where_the_weights_still_move(moving: bool) -> None:
    found = _explained(f"{SELF}.query", _record(moving=moving))
    assert found.remedy == (wording.ATTENTION_SCORES_MOVING if moving
                            else wording.ATTENTION_SCORES)
    assert ("Its weights still move" in found.message) == moving
    assert found.remedy.startswith("nothing yet") == moving


@pytest.mark.parametrize(("value", "key", "early"), [
    # the value projection vanishes too (15,000 x the key's gradient, but below the floor):
    # the cause lies elsewhere, also under an early report's far lower threshold
    (FLOOR / 2, 1e-9, False),
    (FLOOR / 2, 1e-9, True),
    (5 * 3e-5, 3e-5, False),  # above the floor, but only 5 x the key's gradient
    (9.5 * 3e-5, 3e-5, False),  # just short of 10 x
])
def test_a_query_or_key_not_far_below_a_healthy_value_projection_keeps_the_usual_explanation(
        value: float, key: float, early: bool) -> None:
    record = _record(value=value, key=key)
    found = _explained(f"{SELF}.key", record, early=early)
    assert "attention_projection" not in found.details
    # the remedy for a layer behind one rectifier with no dead units, as for any other layer
    assert found.remedy == wording.VANISHING_BEHIND_RECTIFIERS


def test_a_key_just_over_ten_times_below_its_value_projection_is_explained_by_the_scores(
        ) -> None:
    found = _explained(f"{SELF}.key", _record(value=10.5 * 3e-5, key=3e-5))
    assert found.details["attention_projection"] == "key"
    assert found.details["value_ratio"] == pytest.approx(10.5)


def _without(record: StepRecord, what: str) -> StepRecord:
    i = LAYERS.index(f"{SELF}.value")
    if what == "missing":  # the value projection is not among the record's layers
        keep = [j for j in range(len(LAYERS)) if j != i]
        return dataclasses.replace(record, layers=[LAYERS[j] for j in keep],
                                   grad_norm=record.grad_norm[keep],
                                   has_grad=record.has_grad[keep])
    if what == "no_grad":
        has_grad = record.has_grad.copy()
        has_grad[i] = False
        return dataclasses.replace(record, has_grad=has_grad)
    grad_norm = record.grad_norm.copy()
    grad_norm[i] = float(what)
    return dataclasses.replace(record, grad_norm=grad_norm)


@pytest.mark.parametrize("what", ["missing", "no_grad", "nan", "inf"])
def test_no_comparison_without_a_finite_value_gradient_of_the_same_step(what: str) -> None:
    found = _explained(f"{SELF}.query", _without(_record(), what))
    assert "attention_projection" not in found.details
    assert found.remedy != wording.ATTENTION_SCORES


def test_no_comparison_without_the_vanishing_rule_s_floor() -> None:
    """A finding without ``vanishing_floor`` (not the vanishing rule's) is not judged: its own
    threshold may be an early report's, far below the floor."""
    found = _explained(f"{SELF}.query", _record(), with_floor=False)
    assert "attention_projection" not in found.details
    assert _explained(f"{SELF}.query", _record()).details["attention_projection"] == "query"


def test_other_layers_and_an_exactly_zero_gradient_keep_their_explanation() -> None:
    record = _record()
    value = _explained(f"{SELF}.value", record)
    assert "attention_projection" not in value.details
    assert value.remedy != wording.ATTENTION_SCORES
    record.grad_norm[0] = 0.0
    zero = _explained(f"{SELF}.query", record)
    assert "attention_projection" not in zero.details
    assert "The gradient is exactly zero" in zero.message


def test_a_value_projection_another_optimizer_updates_is_not_compared() -> None:
    """With several optimizers a record measures only one optimizer's layers: a value
    projection outside them has no gradient norm of this step to compare with."""
    record = _record()
    measured = np.ones(len(LAYERS), bool)
    measured[LAYERS.index(f"{SELF}.value")] = False
    record = dataclasses.replace(record, measured=measured)
    found = _explained(f"{SELF}.query", record)
    assert "attention_projection" not in found.details
    assert found.remedy != wording.ATTENTION_SCORES
    assert _explained(f"{SELF}.query", _record()).remedy == wording.ATTENTION_SCORES
