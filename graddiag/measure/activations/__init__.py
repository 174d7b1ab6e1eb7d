"""Activation statistics: how much gradient each activation site lets through.

A registry maps activation module types and functions to an :class:`ActivationSpec`: its kind,
its family (``"saturating"`` sigmoid/tanh-like or ``"rectifier"`` ReLU-like) and its local
derivative ``|f'(x)|``. An :class:`ActivationWatch` hooks the registered modules and,
optionally, intercepts functional calls (``torch.sigmoid``, ``F.relu``, ...) made inside any
``forward`` through a ``TorchFunctionMode`` -- only inside its ``watching()`` context, which the
monitor opens around the model's forward pass of an activation step and nowhere else.

Per site and step it accumulates, on device:

* saturated fraction: elements whose ``|f'(x)|`` is below ``derivative_floor``;
* dead fraction: units (channels for 4-D/5-D outputs, the last dimension otherwise) whose
  ``|f'(x)|`` is below the floor for every sample;
* gain: the mean ``|f'(x)|``, the factor by which the site scales gradients passing back.

All arithmetic is done in float32 on upcast values, so float16/bfloat16 outputs are compared
with exact thresholds, not thresholds rounded to the low-precision type.
"""

from graddiag.measure.activations.registry import ActivationRegistry, default_registry
from graddiag.measure.activations.specs import ActivationSpec
from graddiag.measure.activations.watch import ActivationWatch

__all__ = ["ActivationRegistry", "ActivationSpec", "ActivationWatch", "default_registry"]
