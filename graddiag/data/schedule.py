"""Which optimizer steps are measured, and what is measured on each."""

from __future__ import annotations

from dataclasses import dataclass

from graddiag.data.options import MonitorConfig


@dataclass(frozen=True)
class Schedule:
    """The cadences of one monitor; a cadence of 0 turns that measurement off.

    Attributes:
        gradients: Gradient norms on steps divisible by this (at least 1).
        parameters: Parameter norms and update ratios on steps divisible by this.
        activations: Activation statistics on steps divisible by this.
        histograms: Gradient-magnitude histograms on steps divisible by this.
    """

    gradients: int = 1
    parameters: int = 0
    activations: int = 0
    histograms: int = 0

    @classmethod
    def from_config(cls, config: MonitorConfig) -> Schedule:
        return cls(config.every_n_steps, config.param_every_n_steps,
                   config.activation_every_n_steps, config.histogram_every_n_steps)

    @staticmethod
    def _due(every: int, step: int) -> bool:
        return bool(every) and step % every == 0

    def records_parameters(self, step: int) -> bool:
        return self._due(self.parameters, step)

    def records_activations(self, step: int) -> bool:
        return self._due(self.activations, step)

    def records_histograms(self, step: int) -> bool:
        return self._due(self.histograms, step)

    def records(self, step: int) -> bool:
        """Whether ``step`` is measured at all (gradients, parameters, activations or histograms)."""
        return (self._due(self.gradients, step) or self.records_parameters(step)
                or self.records_activations(step) or self.records_histograms(step))
