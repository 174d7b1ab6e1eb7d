"""Hugging Face models built from tiny configs (no download): BERT, GPT-2, ViT.

Healthy training raises nothing; an injected NaN, vanishing layer or dead GELU is found at its
layer and step; norms equal float64 references computed from ``.grad``.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")  # a dev dependency: pip install -e ".[dev]"

from graddiag import GradientMonitor  # noqa: E402
from tests.real_models.layouts import batches, digits, nan_gradient_at  # noqa: E402
from tests.real_models.training import Run, train  # noqa: E402

transformers.logging.set_verbosity_error()


def name_of(model: torch.nn.Module, module: torch.nn.Module) -> str:
    """A submodule's qualified name (module names differ between transformers versions)."""
    return next(name for name, m in model.named_modules() if m is module)


def gpt2(initializer_range: float = 0.02) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=99, n_positions=32, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=initializer_range,
        bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def _counting(model: torch.nn.Module) -> Callable[[int], torch.Tensor]:
    """Next-token prediction on counting sequences (learnable: the next token is +1)."""
    g = torch.Generator().manual_seed(0)

    def loss(step: int) -> torch.Tensor:
        ids = (torch.randint(0, 99, (16, 1), generator=g) + torch.arange(24)) % 99
        return model(input_ids=ids, labels=ids).loss

    return loss


@pytest.mark.parametrize("initializer_range", [0.02, 1.0], ids=["default_init", "large_init"])
def test_gpt2_trains_without_alarms_and_gelu_new_is_one_gelu_site(
        initializer_range: float) -> None:
    model = gpt2(initializer_range)
    inputs: dict[int, torch.Tensor] = {}
    step_now = [0]
    act = model.transformer.h[0].mlp.act
    act.register_forward_pre_hook(lambda m, a: inputs.__setitem__(step_now[0], a[0].detach()))
    loss = _counting(model)

    def counted(step: int) -> torch.Tensor:
        step_now[0] = step
        return loss(step)

    run = train(model, counted, 20, activation_every_n_steps=5)
    assert run.findings == []  # large init saturates the tanh inside gelu_new: not a tanh site
    run.assert_norms_match_reference(rtol=1e-4)
    table = run.monitor.activation_history
    assert set(table.kind) == {"gelu_tanh"}
    assert set(table.site) == {"transformer.h.0.mlp.act", "transformer.h.1.mlp.act"}
    # the gain is the mean |d gelu_new / dx| at the recorded inputs (autograd, float64)
    for step in (0, 5, 10, 15):
        x = inputs[step].double().requires_grad_(True)
        act(x).sum().backward()
        row = table[(table.step == step) & (table.site == "transformer.h.0.mlp.act")]
        assert float(row.gain.iloc[0]) == pytest.approx(float(x.grad.abs().mean()), rel=1e-4)


def test_gpt2_nan_is_traced_to_the_layer_where_it_entered() -> None:
    model = gpt2()
    target = model.transformer.h[1].mlp.c_fc
    removers = []
    run = train(model, _counting(model), 7, activation_every_n_steps=0,
                before_step=lambda s: removers.append(nan_gradient_at(target)) if s == 4 else None)
    found = [(f.kind, f.layer, f.step) for f in run.findings]
    assert found == [("nonfinite", "transformer.h.1.mlp.c_fc", 4)]
    # wte is tied to the LM head (used first and last): it is affected through its input use
    assert "transformer.wte" in run.findings[0].details["affected_layers"]
    assert "transformer.h.1.mlp.c_proj" not in run.findings[0].details["affected_layers"]


def bert() -> torch.nn.Module:
    # hidden 128: at hidden 32 with BERT's 0.02 init, query/key gradients start ~1e-5 of the
    # classifier's (a degenerate width; BERT-base's are ~1e-2 of it at lr 1e-4)
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=99, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=32, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, num_labels=2)
    return transformers.BertForSequenceClassification(config)


def _contains_token(model: torch.nn.Module) -> Callable[[int], torch.Tensor]:
    """Sequence classification: does token 7 occur in the sequence?"""
    g = torch.Generator().manual_seed(0)

    def loss(step: int) -> torch.Tensor:
        ids = torch.randint(10, 99, (16, 12), generator=g)
        labels = torch.randint(0, 2, (16,), generator=g)
        ids[labels == 1, torch.randint(0, 12, (1,), generator=g)] = 7
        return model(input_ids=ids, labels=labels).loss

    return loss


def test_bert_trains_without_alarms_and_a_starved_layer_is_found() -> None:
    model = bert()
    healthy = train(model, _contains_token(model), 20, activation_every_n_steps=5)
    assert healthy.findings == []
    healthy.assert_norms_match_reference(rtol=1e-4)
    layers = healthy.monitor.records[0].layers
    assert layers[-2:] == ["bert.pooler.dense", "classifier"]

    model = bert()
    starved = model.bert.encoder.layer[0].intermediate.dense
    starved_name = name_of(model, starved)

    def starve(step: int) -> None:  # this layer's gradient is 1e-7 of what it should be
        for p in starved.parameters():
            p.grad.mul_(1e-7)

    run = train(model, _contains_token(model), 12, activation_every_n_steps=5,
                after_backward=starve)
    # it is the reference norm itself that is tiny, relative to the largest layer's; below 1e-8
    # of it on steps 0 and 1 the evidence is overwhelming and it is reported at step 1
    ratios = [ref[starved_name] / max(ref.values()) for ref in run.references]
    assert max(ratios[:10]) < 1e-4
    step = 1 if max(ratios[:2]) < 1e-8 else 9
    assert [(f.kind, f.layer, f.step) for f in run.findings] == [("vanishing", starved_name, step)]


def test_a_narrow_bert_s_vanishing_query_and_key_are_explained_by_the_attention_scores() -> None:
    """At hidden size 32 (head size 16) with BERT's 0.02 init, the query and key projections get
    ~1e-5 of the largest layer's gradient over the first steps, the value projections ~100 x
    more: reported ``vanishing``, with the attention scores named and the value projection's
    measured ratio quoted. What the remedy says is then checked: under Adam the gradient grows
    as attention starts to learn; query, key and value projections initialised at
    1/sqrt(hidden size) start far from vanishing."""
    from graddiag.rules import wording

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, num_labels=2)
    model = transformers.BertForSequenceClassification(config)
    names = [name for name, _ in model.named_modules()]
    scores = {n for n in names if n.endswith((".attention.self.query", ".attention.self.key"))}
    assert len(scores) == 4

    def value_of(layer: str) -> str:
        return layer.rsplit(".", 1)[0] + ".value"

    def ratios(reference: dict[str, float]) -> tuple[float, float]:
        """The query/key gradients' smallest ratio to the largest layer's, and the largest
        ratio of a value projection's gradient to its query's or key's (float64, from .grad)."""
        return (min(reference[n] for n in scores) / max(reference.values()),
                max(reference[value_of(n)] / reference[n] for n in scores))

    run = train(model, _contains_token(model), 50, activation_every_n_steps=5)
    for reference in run.references[:10]:  # query/key below 1e-4 x the largest, value >= 10 x
        top = max(reference.values())
        assert max(reference[n] for n in scores) < 1e-4 * top
        assert min(reference[value_of(n)] / reference[n] for n in scores) > 10
    assert {(f.kind, f.layer, f.step) for f in run.findings} == {("vanishing", n, 9)
                                                                for n in scores}
    for finding in run.findings:
        reference = run.references[finding.step]
        assert finding.remedy == wording.ATTENTION_SCORES_MOVING  # Adam moves them
        assert finding.details["attention_projection"] == finding.layer.rsplit(".", 1)[1]
        assert finding.details["value_projection"] == value_of(finding.layer)
        assert finding.details["value_ratio"] == pytest.approx(
            reference[value_of(finding.layer)] / reference[finding.layer], rel=1e-4)
        assert finding.details["vanishing_floor"] == pytest.approx(
            1e-4 * max(reference.values()), rel=1e-4)
        assert "only through the attention scores" in finding.message
    smallest, value_above = ratios(run.references[-1])  # step 49: attention learns
    assert smallest > 1e-3 and value_above < 10

    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    torch.manual_seed(1)
    with torch.no_grad():  # the remedy: query, key and value projections at 1/sqrt(hidden size)
        for name, module in model.named_modules():
            if name.endswith((".attention.self.query", ".attention.self.key",
                              ".attention.self.value")):
                module.weight.normal_(0.0, 32 ** -0.5)
    wider = train(model, _contains_token(model), 10, activation_every_n_steps=5)
    assert wider.findings == []
    for reference in wider.references:
        smallest, value_above = ratios(reference)
        assert smallest > 5e-4 and value_above < 10


def vit() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=8, patch_size=2, num_channels=1, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=37, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, num_labels=10)
    return transformers.ViTForImageClassification(config)


def _first_block(model: torch.nn.Module) -> torch.nn.Module:
    vit_model = model.vit
    blocks = getattr(vit_model, "layers", None) or vit_model.encoder.layer
    return blocks[0]


def _vit_run(model: torch.nn.Module, steps: int, **options: object) -> Run:
    data = batches(*digits(), batch_size=32)

    def loss(step: int) -> torch.Tensor:
        x, y = next(data)
        return F.cross_entropy(model(pixel_values=x.reshape(-1, 1, 8, 8)).logits, y)

    return train(model, loss, steps, **options)


def test_vit_trains_without_alarms_and_a_dead_gelu_is_found_at_its_site() -> None:
    model = vit()
    healthy = _vit_run(model, 20, activation_every_n_steps=5)
    assert healthy.findings == []
    healthy.assert_norms_match_reference(rtol=1e-4)
    layers = healthy.monitor.records[0].layers
    block = _first_block(model)
    norm = next(m for m in block.modules() if isinstance(m, torch.nn.LayerNorm))
    # cls_token/position embeddings (ViTEmbeddings' own parameters) sit at the input side
    assert layers.index("vit.embeddings") < layers.index(name_of(model, norm))

    model = vit()
    block = _first_block(model)
    dense = next(m for m in block.modules()
                 if isinstance(m, torch.nn.Linear) and m.out_features == 37)
    act = next(m for m in block.modules() if type(m).__name__ == "GELUActivation")
    with torch.no_grad():  # every unit of this GELU sits at -10: derivative ~0 for all samples
        dense.weight.mul_(0.01)
        dense.bias.fill_(-10.0)
    run = _vit_run(model, 7, activation_every_n_steps=3)
    site = name_of(model, act)
    found = [(f.kind, f.layer, f.step) for f in run.findings]
    assert ("dead_relu", site, 1) in found  # activation steps 0 and 1 (front-loaded)
    acts = run.monitor.records[1].activations
    assert acts is not None and float(acts.dead[acts.sites.index(site)]) == 1.0
    # the layers that feed only the dead units get exactly zero gradient (the float64
    # references): vanishing at step 1 (overwhelming), and their weights stop moving (stalled)
    zero = {k for k, v in run.references[0].items() if v == 0.0}
    assert zero == {k for k, v in run.references[1].items() if v == 0.0} and zero
    assert sorted(found) == sorted([("dead_relu", site, 1)]
                                   + [("vanishing", k, 1) for k in zero]
                                   + [("stalled", k, 3) for k in zero])


def test_a_layer_stalled_under_plain_sgd_is_blamed_on_its_gradient_step_not_the_optimizer() -> None:
    """Plain SGD moves weights by lr x gradient: a LayerNorm gain with a small gradient for
    its norm stalls, and the message gives that step (lr x gradient norm / weight norm,
    computed here from ``.grad`` and the weights) instead of blaming the optimizer."""
    model = gpt2()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    norm = model.transformer.h[0].ln_1
    layer = name_of(model, norm)
    monitor = GradientMonitor(model, optimizers=optimizer, reporters=[])
    ids = torch.randint(0, 99, (128, 16), generator=torch.Generator().manual_seed(0))
    steps: dict[int, float] = {}
    for step in range(8):
        batch = ids[(step * 16) % 128:(step * 16) % 128 + 16]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        with torch.no_grad():
            grad = torch.sqrt(sum(p.grad.double().square().sum() for p in norm.parameters()))
            weight = torch.sqrt(sum(p.double().square().sum() for p in norm.parameters()))
        steps[step] = 1e-3 * float(grad) / float(weight)
        monitor.step(step)
        optimizer.step()
    monitor.close()
    found = [f for f in monitor.findings if f.kind == "stalled" and f.layer == layer]
    assert len(found) == 1, [(f.kind, f.layer) for f in monitor.findings]
    finding = found[0]
    assert finding.details["cause_kind"] == "gradient_step"
    assert "scales its update down" not in finding.message
    shown = re.search(r"weight norm = ([0-9.e+-]+)\)", finding.message)
    assert shown is not None, finding.message
    assert float(shown.group(1)) == pytest.approx(steps[finding.step], rel=2e-3)
    # the measured update (of the step before) is within a factor 2 of that plain step
    assert 0.5 <= finding.value / steps[finding.step - 1] <= 2.0
