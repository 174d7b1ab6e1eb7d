"""The graddiag tab in TensorBoard (found by TensorBoard through the ``tensorboard_plugins`` entry
point): a layers x steps heatmap of gradient norms, the findings, and a step's gradient flow."""

from graddiag.tensorboard_plugin.plugin import GraddiagLoader, GraddiagPlugin

__all__ = ["GraddiagLoader", "GraddiagPlugin"]
