"""Nearest the loss is where gradients arrive first: the nonfinite origin and the activation
sites between a layer and the loss follow what ran, not how modules were defined."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.real_models.layouts import (
    CheckpointedMLP,
    HeadBeforeStem,
    ScaledCosine,
    ViTLike,
    batches,
    digits,
    nan_gradient_at,
)
from tests.real_models.training import train


def _classifier_loss(model: torch.nn.Module, seed: int = 0):  # noqa: ANN202
    data = batches(*digits(), batch_size=32, seed=seed)

    def loss(step: int) -> torch.Tensor:
        x, y = next(data)
        return F.cross_entropy(model(x), y)

    return loss


def _origin_run(model: torch.nn.Module, module: torch.nn.Module, at_step: int, steps: int = 6,
                **options: object):  # noqa: ANN202
    removers: list = []

    def inject(step: int) -> None:
        if step == at_step:
            removers.append(nan_gradient_at(module))

    run = train(model, _classifier_loss(model), steps, before_step=inject,
                activation_every_n_steps=0, **options)
    for remove in removers:
        remove()
    return run


def test_top_level_parameters_sit_where_they_are_used() -> None:
    torch.manual_seed(0)
    model = ViTLike()
    run = _origin_run(model, model.blocks.layers[0].linear2, at_step=3)
    layers = run.monitor.records[0].layers
    # cls_token and pos_embed (owned by the top module) join the patch embedding before block 0
    assert set(layers[:2]) == {"ViTLike", "patch_embed"}
    assert layers[2] == "blocks.layers.0.self_attn"
    assert layers[-1] == "head"  # defined first, runs last
    found = [f for f in run.findings if f.kind == "nonfinite"]
    assert [(f.layer, f.step) for f in found] == [("blocks.layers.0.linear2", 3)]
    # upstream of the origin: the first block's attention and norm, the embeddings
    assert set(found[0].details["affected_layers"]) == {
        "patch_embed", "ViTLike", "blocks.layers.0.self_attn", "blocks.layers.0.self_attn.out_proj",
        "blocks.layers.0.norm1", "blocks.layers.0.linear1", "blocks.layers.0.linear2"}
    run.assert_norms_match_reference()


def test_multihead_attention_out_proj_is_placed_inside_its_block() -> None:
    torch.manual_seed(0)
    model = ViTLike(depth=2)
    run = _origin_run(model, model.blocks.layers[1].linear1, at_step=2)
    layers = run.monitor.records[0].layers
    for i in range(2):  # out_proj's own forward never runs; its gradient arrives after linear1's
        block = f"blocks.layers.{i}"
        assert (layers.index(f"{block}.self_attn") < layers.index(f"{block}.self_attn.out_proj")
                < layers.index(f"{block}.norm1") < layers.index(f"{block}.linear1"))
    found = [(f.layer, f.step) for f in run.findings if f.kind == "nonfinite"]
    assert found == [("blocks.layers.1.linear1", 2)]


def test_logit_scale_owned_by_the_top_module_is_nearest_the_loss() -> None:
    torch.manual_seed(0)
    model = ScaledCosine()
    run = _origin_run(model, model.encoder[2], at_step=2)
    assert run.monitor.records[0].layers == ["encoder.0", "encoder.2", "prototypes",
                                             "ScaledCosine"]
    assert [(f.kind, f.layer, f.step) for f in run.findings] == [("nonfinite", "encoder.2", 2)]


def test_activation_checkpointing_does_not_scramble_the_order() -> None:
    torch.manual_seed(0)
    model = CheckpointedMLP(depth=4)
    run = _origin_run(model, model.blocks[2][2], at_step=3)
    layers = run.monitor.records[0].layers
    expected = ["stem"] + [f"blocks.{i}.{j}" for i in range(4) for j in (0, 2)] + ["head"]
    assert layers == expected
    found = [(f.kind, f.layer, f.step) for f in run.findings]
    assert found == [("nonfinite", "blocks.2.2", 3)]
    run.assert_norms_match_reference()


def test_checkpointed_vit_blames_the_block_where_the_nan_entered() -> None:
    torch.manual_seed(0)
    model = ViTLike(depth=3, checkpointed=True)
    run = _origin_run(model, model.blocks.layers[1].linear2, at_step=2)
    assert [(f.kind, f.layer, f.step) for f in run.findings] == [
        ("nonfinite", "blocks.layers.1.linear2", 2)]


def test_sites_between_a_layer_and_the_loss_follow_the_run_order() -> None:
    torch.manual_seed(0)
    model = HeadBeforeStem(depth=10)
    run = train(model, _classifier_loss(model), 24, activation_every_n_steps=4,
                vanishing_patience=5)
    stem = [f for f in run.findings if f.kind == "vanishing" and f.layer == "stem"]
    assert stem, run.kinds()
    # every one of the 10 sigmoids runs between the stem and the loss
    assert stem[0].details["sites_between"] == 10
    assert stem[0].details["activation_kinds"] == {"sigmoid": 10}
    assert "No activation sits between" not in stem[0].message
    assert stem[0].remedy.startswith("replace the 10 sigmoid/tanh site(s)")
    positions = [r.activations for r in run.monitor.records if r.activations is not None][-1]
    assert positions is not None
    assert list(positions.sites) == ["act"] + [f"body.{2 * i + 1}" for i in range(9)]
    # the first sigmoid runs after the stem (layer 0), the last before the head (layer 10)
    assert list(positions.position) == [0.5 + i for i in range(10)]


@pytest.mark.parametrize("build", [
    lambda: ViTLike(), lambda: ViTLike(checkpointed=True), lambda: ScaledCosine(),
    lambda: CheckpointedMLP(depth=3),
], ids=["vit_like", "vit_like_checkpointed", "scaled_cosine", "checkpointed_mlp"])
def test_healthy_layouts_train_without_alarms(build) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    model = build()
    run = train(model, _classifier_loss(model), 25, activation_every_n_steps=5,
                param_every_n_steps=5)
    assert run.findings == []
    run.assert_norms_match_reference(rtol=1e-4)
    for record in run.monitor.records:
        if record.activations is not None:  # recomputation under checkpointing is not counted
            assert set(record.activations.calls) == {1.0}
            assert np.isfinite(record.activations.position).all()


def test_checkpointed_relu_sites_sit_inside_their_blocks() -> None:
    torch.manual_seed(0)
    model = CheckpointedMLP(depth=3)
    run = train(model, _classifier_loss(model), 1, activation_every_n_steps=1)
    record = run.monitor.records[0]
    layers, acts = record.layers, record.activations
    assert acts is not None
    for i in range(3):  # the ReLU of block i runs between its two linear layers
        position = acts.position[acts.sites.index(f"blocks.{i}.1")]
        assert layers[int(position - 0.5)] == f"blocks.{i}.0"
        assert layers[int(position + 0.5)] == f"blocks.{i}.2"
