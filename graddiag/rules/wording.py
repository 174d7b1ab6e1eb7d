"""What to try for each finding kind, most promising first, and the phrases finding messages
share between the rules and the explainer."""

from __future__ import annotations

#: How the vanishing rule ends its claim; the explainer drops it where the weights still move.
BARELY_LEARNS = "; this layer barely learns."
#: What helps a vanishing gradient whatever lies between the layer and the loss.
VANISHING_STRUCTURE = "add normalisation (BatchNorm/LayerNorm) or residual connections; reduce depth"
#: ... what is left of it when dead units are treated first.
DEEPER = "add residual connections or reduce depth"
#: Vanishing gradients, when the activations between the layer and the loss are not known.
VANISHING = (
    "use ReLU-family activations (ReLU, LeakyReLU, GELU) instead of sigmoid/tanh in hidden "
    "layers; initialise with Kaiming (ReLU) or Xavier (tanh) init; " + VANISHING_STRUCTURE
)
#: ... behind rectifiers only, few of them dead: the shrink beyond theirs is the weights' scale.
VANISHING_BEHIND_RECTIFIERS = (
    "initialise the weights with Kaiming init (the shrink beyond the activations' comes from "
    "the weights' scale); " + VANISHING_STRUCTURE
)
#: ... behind sigmoid/tanh sites that account for little of the shrink.
VANISHING_FROM_WEIGHTS = (
    "check the weights' initialisation scale (Xavier for sigmoid/tanh, Kaiming for ReLU-family "
    "activations): the sigmoid/tanh sites account for little of the shrink; "
    + VANISHING_STRUCTURE
)
#: ... with no activation between the layer and the loss.
VANISHING_WITHOUT_ACTIVATIONS = (
    "check the initialisation scale (Kaiming/Xavier); normalise inputs; " + VANISHING_STRUCTURE
)
#: ... at an attention query or key projection far below its value projection.
ATTENTION_SCORES = (
    "initialise the query, key and value projections with a larger std (about 1/sqrt(hidden "
    "size), not a small fixed std at a small width; where the scores are not divided by "
    "sqrt(head size), as in T5, the query's std also by 1/sqrt(head size)); where attention has "
    "collapsed onto single positions, normalise queries and keys (QK-norm) or lower the "
    "learning rate"
)
#: ... the same, where its weights still move at the usual rate (Adam).
ATTENTION_SCORES_MOVING = (
    "nothing yet: the weights still move, and this gradient usually grows once attention "
    "starts to learn; if it stays this small, " + ATTENTION_SCORES
)
#: How to turn gradient clipping on, in a loop and in Lightning.
CLIP = ("clip gradients (torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); in Lightning, "
        "Trainer(gradient_clip_val=1.0))")
EXPLODING = (
    "lower the learning rate; " + CLIP + "; check the initialisation scale (Kaiming/Xavier "
    "instead of large weights); add normalisation layers; check for unnormalised inputs or "
    "targets"
)
#: What to try for an exploding gradient when clipping is already on.
_EXPLODING_UNDER_CLIPPING = (
    "lower the learning rate; check the initialisation scale (Kaiming/Xavier instead of large "
    "weights; for recurrent weights, an orthogonal init); add normalisation layers; check for "
    "unnormalised inputs or targets"
)
#: Exploding while gradient clipping is on: clipping bounds the step, not the gradient.
EXPLODING_WHILE_CLIPPING = (
    _EXPLODING_UNDER_CLIPPING + "; clipping by the global norm is already on, and when it acts "
    "it shrinks every layer's update by the same factor, so the exploding layer also starves "
    "the others"
)
#: Exploding while gradient clipping by value is on: each element is capped, the direction bent.
EXPLODING_WHILE_CLIPPING_BY_VALUE = (
    _EXPLODING_UNDER_CLIPPING + "; clipping by value is already on: it caps each gradient "
    "element, which bounds the step but bends its direction when it acts; clipping by the "
    "global norm keeps the direction (torch.nn.utils.clip_grad_norm_; in Lightning, "
    "Trainer(gradient_clip_algorithm=\"norm\"))"
)
#: A layer small, or stalled, only next to another layer whose gradient exploded.
BEHIND_AN_EXPLOSION = (
    "treat the exploding layer first (its finding says how): this layer's own gradient is "
    "ordinary"
)
NONFINITE = (
    "look for log(0), division by zero, sqrt of 0 or of negatives and exp overflow near the "
    "origin layer; lower the learning rate; clip gradients; use a numerically stable loss "
    "(BCEWithLogitsLoss, log_softmax); under fp16 use a GradScaler or bf16"
)
#: No monitored layer got a gradient at all: the call order, or a loss without a graph.
NO_GRADIENT_ANYWHERE = (
    "call monitor.step() after loss.backward() and before optimizer.zero_grad() (which sets "
    ".grad to None); in Lightning with manual optimization, call self.manual_backward(loss) "
    "before the optimizer steps; make sure the loss is computed from the model's outputs with "
    "gradients "
    "enabled (not under torch.no_grad(), not from .detach()ed or .item() values)"
)
NO_GRADIENT = (
    "a non-differentiable operation (argmax, round, comparison, integer cast, .detach(), "
    "torch.no_grad) or an unused branch cut the graph: use a straight-through estimator "
    "(y = x + (hard(x) - x).detach()), a differentiable relaxation (softmax with temperature, "
    "Gumbel-softmax via F.gumbel_softmax(hard=True)), or REINFORCE for sampled decisions; if the "
    "parameter is unused on purpose, freeze it (requires_grad_(False)) or exclude the layer"
)
SATURATED = (
    "lower the learning rate; initialise with Xavier init (smaller weights keep inputs in the "
    "linear region); normalise inputs and pre-activations (BatchNorm/LayerNorm); or switch to a "
    "ReLU-family activation"
)
DEAD_RELU = (
    "lower the learning rate; initialise biases at zero or slightly positive and weights with "
    "Kaiming init; use LeakyReLU/ELU/GELU, which pass gradient for negative inputs; add "
    "normalisation before the activation"
)
STALLED = (
    "check this layer's param group: raise its learning rate if it is much smaller than the "
    "others'; make sure the optimizer holds the parameter (build the optimizer after creating "
    "every submodule); if the gradient has vanished, treat that first (ReLU-family activations, "
    "Kaiming/Xavier init, normalisation, residual connections); if the layer should not train, "
    "freeze it (requires_grad_(False))"
)
#: ... when the layer's weights are of another scale than the other layers'.
STALLED_WEIGHT_SCALE = (
    "check how this layer's weights were initialised or loaded (a scale applied twice, a "
    "checkpoint in other units, an init meant for another shape) and bring them to the other "
    "layers' scale (re-initialise or rescale them); weight decay lowers them only slowly; if "
    "the layer should not train, freeze it (requires_grad_(False))"
)
#: ... when the optimizer scales the step of a layer with a fair gradient down.
STALLED_OPTIMIZER = (
    "find what shrinks this layer's steps: with Adam on a gradient whose sign keeps changing "
    "(noise), a larger batch or gradient accumulation steadies it; lower a large eps or weight "
    "decay (leave norms' gains and biases out of weight decay); check a custom optimizer's "
    "update; raising the param group's learning rate moves it too; if the layer should not "
    "train, freeze it (requires_grad_(False))"
)
STALLED_LR = (
    "raise this param group's learning rate towards the others' (check per-group lr settings "
    "and any per-layer lr decay); if the layer should not train, freeze it "
    "(requires_grad_(False)) instead"
)
#: ... when the optimizer steps by the learning rate times a gradient small for the weights.
STALLED_GRADIENT_STEP = (
    "raise this param group's learning rate (a separate group for small-gradient layers such as "
    "norms' gains and biases); with plain SGD, an optimizer that normalises each weight's step "
    "by its gradient's running size (Adam, RMSprop) also moves such layers; if the gradient has "
    "vanished, treat that first; if the layer should not train, freeze it "
    "(requires_grad_(False))"
)
#: ... when the learning rate is too small for the weights everywhere, not only in this group.
STALLED_TINY_LR = (
    "raise the learning rate (check its exponent for a typo, and a schedule stuck at or near "
    "its start: warm-up, a scheduler stepped per epoch instead of per step); Adam commonly "
    "uses 1e-4 to 1e-3"
)
_UNSTABLE_CHECKS = (
    "check this layer's initialisation scale (weights near zero make any update large relative "
    "to them); with Adam, a larger eps damps updates of parameters whose gradients are tiny"
)
_UNSTABLE_FIRST = (
    "lower the learning rate (or this layer's param group's); add a learning-rate warm-up; ")
UNSTABLE_UPDATE = _UNSTABLE_FIRST + CLIP + "; " + _UNSTABLE_CHECKS
#: ... while gradient clipping (by norm or by value) is already on.
UNSTABLE_UPDATE_WHILE_CLIPPING = (
    _UNSTABLE_FIRST + _UNSTABLE_CHECKS + "; gradient clipping is already on: it bounds the gradient, and an "
    "optimizer that normalises each weight's step (Adam, RMSprop) still moves the weights by "
    "about the learning rate"
)
NOT_IN_OPTIMIZER = (
    "create every submodule before building the optimizer (in Lightning: in __init__ or "
    "configure_model, not in configure_optimizers after the optimizer or lazily in forward), "
    "and build it from self.parameters(); or add them with "
    "optimizer.add_param_group({'params': module.parameters()}); if they should not train, "
    "freeze them (requires_grad_(False))"
)


def replace_saturating(sites: int) -> str:
    """Vanishing gradients behind ``sites`` sigmoid/tanh sites that account for much of it."""
    return (f"replace the {sites} sigmoid/tanh site(s) with ReLU-family activations and use "
            "Kaiming init; or keep them with Xavier init plus normalisation (BatchNorm/LayerNorm) "
            "or residual connections; lower the learning rate if the units are saturated")
