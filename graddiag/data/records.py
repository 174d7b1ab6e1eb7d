"""What one recorded step measured, on the host, ready for rules and reporters."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np


@dataclass
class ActivationRecord:
    """Activation statistics of one recorded step, one entry per activation site.

    Attributes:
        sites: Activation site names (the activation module, or the module whose ``forward``
            called the activation function), in forward order.
        kinds: Activation kind of each site (``"sigmoid"``, ``"relu"``, ...).
        families: ``"saturating"`` (sigmoid/tanh-like) or ``"rectifier"`` (ReLU-like) per site.
        saturated: Fraction of elements whose local derivative is below the saturation floor.
        dead: Fraction of units whose local derivative is below the floor for every sample;
            for a site called at several positions of a forward pass (a shared module),
            its worst position's.
        gain: Mean absolute local derivative; the factor by which the site scales gradients.
        calls: How many times each site ran during the step (several micro-batches, reuse).
        position: Where each site ran among the layers of the step's record (input side first),
            from the order gradients arrived, in layer-index units: ``k - 0.5`` between layers
            ``k-1`` and ``k``; ``-0.5`` with no trainable layer on its input side (or no
            gradient through it); ``len(layers) - 0.5`` after the last layer (its gradient
            comes straight from the loss); NaN (or ``None``) where unknown.
        call_positions: How many call positions each site has in a forward pass, each with
            units of its own: 1 usually, several for a module called at several places (a
            shared ``self.relu``); calls on the same units (a recurrent cell's time steps) are
            one. 0 where the ranks saw different positions (no dead fraction); ``None``: not
            known.
        dead_by_call: The dead fraction of every call position, the sites' positions end to end
            (``call_positions`` of each; NaN for a position without units); ``dead`` is each
            site's largest. ``None``: not known.
    """

    sites: list[str]
    kinds: list[str]
    families: list[str]
    saturated: np.ndarray
    dead: np.ndarray
    gain: np.ndarray
    calls: np.ndarray
    cut_ops: dict[str, list[str]] = field(default_factory=dict)
    position: np.ndarray | None = None
    call_positions: np.ndarray | None = None
    dead_by_call: np.ndarray | None = None


@dataclass
class StepRecord:
    """Everything measured on one recorded optimizer step.

    Attributes:
        step: The optimizer step.
        layers: Layer names in forward order (input side first, loss side last).
        grad_norm: Per-layer gradient p-norm; NaN for a layer that got no gradient.
        has_grad: Whether any parameter of the layer got a gradient.
        missing: ``{layer position: [parameter names]}`` for trainable parameters without gradient.
        nonfinite: ``{layer position: {parameter name: number of NaN/Inf elements}}`` (-1:
            not counted, after a deferred host read).
        param_norm: Per-layer parameter 2-norm, or ``None`` on steps without parameter statistics.
        update_ratio: Per-layer ``||w_t - w_(t-1)|| / ||w_t||``: how much the last optimizer step
            changed the weights, relative to their size (~1e-3 is usual); NaN where unknown,
            ``None`` on steps without parameter statistics.
        activations: Activation statistics, or ``None`` on steps without them.
        grad_histograms: ``(layers, bins + 2)`` gradient-magnitude histogram counts over
            :data:`graddiag.data.bins.HISTOGRAM_EDGES` plus sum and sum of squares, or ``None``.
        optimizer: Index of the optimizer whose step this is (0 with a single optimizer).
        measured: Layers whose parameters this optimizer updates (``None``: all layers). Rules
            leave the state of unmeasured layers untouched.
        amp_overflow: The AMP grad scaler found inf/NaN and skips this step (not an alarm).
        amp_scale: The grad scaler's loss scale on this step (``None`` without fp16 AMP).
        clipped: Gradient clipping will rescale this step's gradients (``None``: no clipping by
            the global norm).
        clip_value: The threshold of gradient clipping by value on this step (``None``: none).
        clip_norm: The threshold of gradient clipping by norm on this step (``None``: none);
            ``clipped`` says whether it acts (known for the 2-norm only).
        param_count: Elements per layer behind ``param_norm`` (with it, the weights' RMS), or
            ``None`` on steps without parameter statistics.
        learning_rate: Per-layer learning rate (the largest over the param groups holding the
            layer's parameters; NaN for a layer in no optimizer), or ``None`` when the
            optimizers are unknown or on steps without parameter statistics.
        orphaned: ``{module name: [parameter names]}`` of trainable parameters that no
            optimizer holds, or ``None`` when not checked on this step.
        base_learning_rate: Per-layer rate a learning-rate scheduler started from (its param
            groups' ``initial_lr``; NaN where no scheduler set one), read with
            ``learning_rate``; a rate below half of it is a warm-up or a decay, not a choice.
        along_gradient: Per layer, whether every optimizer holding it moves its weights by the
            learning rate times the gradient, or a running sum of such steps, plus weight decay
            (``torch.optim.SGD``, with or without momentum); False under adaptive optimizers
            such as Adam, unknown ones, or none. Read with ``learning_rate`` (``None`` when that
            is not read).
    """

    step: int
    layers: list[str]
    grad_norm: np.ndarray
    has_grad: np.ndarray
    missing: dict[int, list[str]] = field(default_factory=dict)
    nonfinite: dict[int, dict[str, int]] = field(default_factory=dict)
    param_norm: np.ndarray | None = None
    update_ratio: np.ndarray | None = None
    activations: ActivationRecord | None = None
    grad_histograms: np.ndarray | None = None
    optimizer: int = 0
    measured: np.ndarray | None = None
    amp_overflow: bool = False
    amp_scale: float | None = None
    clipped: bool | None = None
    param_count: np.ndarray | None = None
    learning_rate: np.ndarray | None = None
    orphaned: dict[str, list[str]] | None = None
    base_learning_rate: np.ndarray | None = None
    clip_value: float | None = None
    clip_norm: float | None = None
    along_gradient: np.ndarray | None = None

    @property
    def clipping(self) -> str | None:
        """Which gradient clipping follows this step's measurement: ``"norm"``, ``"value"``,
        or ``None``."""
        if self.clip_norm is not None or self.clipped is not None:  # (states from before clip_norm)
            return "norm"
        return None if self.clip_value is None else "value"

    @cached_property
    def healthy_range(self) -> tuple[float, float] | None:
        """``(smallest, largest)`` gradient norm when every layer was measured and has a
        finite, positive gradient norm, not under an AMP overflow; ``None`` otherwise.

        The usual step: rules then check whole-model bounds against these two numbers instead
        of comparing layer by layer (computed once and shared by the rules; a record is not
        changed after it is made).
        """
        if self.measured is not None or self.amp_overflow or not len(self.grad_norm):
            return None
        values = self.grad_norm.tolist()  # one conversion, then C loops over floats
        if not math.isfinite(sum(values)):  # NaN (no gradient) or inf somewhere
            return None
        low = min(values)
        return (low, max(values)) if low > 0.0 else None

    @property
    def global_norm(self) -> float:
        """2-norm over all layers' gradient norms (equals the model's total norm for p = 2)."""
        values = self.grad_norm[self.has_grad]
        return float(np.sqrt(np.sum(np.square(values)))) if values.size else 0.0
