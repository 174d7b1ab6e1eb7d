"""Which optimizer steps are measured, and what is measured on each."""

from __future__ import annotations

from dataclasses import dataclass

from graddiag.data.options import MonitorConfig


@dataclass
class Schedule:
    """The cadences of one monitor; a cadence of 0 turns that measurement off.

    Parameter and activation statistics are front-loaded: also recorded on the first ``early``
    steps from ``start``, so a short run (a sweep trial, a smoke test) and the first minutes of
    a long one get evidence at once, while a long run costs what the plain cadence costs.
    ``start`` is the first step the monitor sees (0 for a run from scratch; the resumed step for
    a run resumed without the monitor's state, or a monitor attached mid-run); it is set once,
    before that step is measured, and kept in checkpoints.

    Attributes:
        gradients: Gradient norms on steps divisible by this (at least 1).
        parameters: Parameter norms and update ratios on steps divisible by this.
        activations: Activation statistics on steps divisible by this.
        histograms: Gradient-magnitude histograms on steps divisible by this.
        early: The first this many steps from ``start`` also record parameter and activation
            statistics (when on).
        start: The monitor's first step.
    """

    gradients: int = 1
    parameters: int = 0
    activations: int = 0
    histograms: int = 0
    early: int = 0
    start: int = 0

    def front(self, step: int) -> bool:
        """One of the front-loaded steps: the first ``early`` from ``start`` (never a step
        before ``start``, as in a run rolled back past where the monitor began)."""
        return self.start <= step < self.start + self.early

    def first_steps(self, step: int) -> bool:
        """One of the monitor's first steps, never kept for a block: the front-loaded ones and
        at least the first (where learning rates and optimizer coverage are read). Steps before
        ``start`` (a run rolled back past it) are not."""
        return self.start <= step < max(self.start + 1, self.start + self.early)

    @classmethod
    def from_config(cls, config: MonitorConfig) -> Schedule:
        return cls(config.every_n_steps, config.param_every_n_steps,
                   config.activation_every_n_steps, config.histogram_every_n_steps,
                   config.early_steps)

    @staticmethod
    def _due(every: int, step: int) -> bool:
        return bool(every) and step % every == 0

    def _front_loaded(self, every: int, step: int) -> bool:
        return bool(every) and (self.front(step) or step % every == 0)

    def records_parameters(self, step: int, lookahead: int = 1) -> bool:
        """Whether ``step`` may read parameter statistics: every front-loaded step, then the
        first ``lookahead`` steps from each multiple of the cadence (optimizers taking turns on
        the step counter each read theirs on their first step there; see
        :meth:`copies_parameters`)."""
        parameters = self.parameters
        return bool(parameters) and (self.front(step) or step % parameters < lookahead)

    def records_activations(self, step: int) -> bool:
        return self._front_loaded(self.activations, step)

    def copies_parameters(self, step: int, lookahead: int = 1) -> bool:
        """Whether ``step`` copies the weights for a parameter step among the next ``lookahead``.

        The copy taken on the step before a parameter step makes the update measured there
        exactly one optimizer step. ``lookahead`` is how many steps optimizers taking turns on
        the step counter may be apart (manual optimization counts each optimizer's step): each
        one copies on its steps in the ``lookahead`` steps before a multiple of the cadence and
        reads on its first step in the ``lookahead`` steps from it, one of its own steps later.
        """
        parameters = self.parameters
        return bool(parameters) and (
            # a front-loaded step among the next ``lookahead``
            self.early > 0 and step + lookahead >= self.start
            and step + 1 < self.start + self.early
            or (step + lookahead) // parameters != step // parameters)

    def records_histograms(self, step: int) -> bool:
        return self._due(self.histograms, step)

    def _reads_beyond_gradients(self, step: int, lookahead: int) -> bool:
        """Whether ``step`` reads more than gradient norms on the host: parameter statistics,
        activations or histograms (written out rather than calling the ``records_*`` methods:
        :meth:`records` runs on every step)."""
        early = self.start <= step < self.start + self.early
        parameters, activations, histograms = self.parameters, self.activations, self.histograms
        return bool(
            (parameters and (early or step % parameters < lookahead))
            or (activations and (early or step % activations == 0))
            or (histograms and step % histograms == 0))

    def keeps(self, step: int, lookahead: int = 1) -> bool:
        """Whether ``step`` may be kept for its block: gradient norms due and nothing else read
        on the host (no parameter statistics, activations or histograms; a weight copy for the
        next parameter step is taken on the device), and not one of the first steps (where
        learning rates and optimizer coverage are read)."""
        return (not self.first_steps(step) and step % self.gradients == 0
                and not self._reads_beyond_gradients(step, lookahead))

    def copies_only(self, step: int, lookahead: int = 1) -> bool:
        """Whether all ``step`` measures is the weight copy for a parameter step among the next
        ``lookahead`` (see :meth:`copies_parameters`): no gradient norms are due on it."""
        return (step % self.gradients != 0 and not self._reads_beyond_gradients(step, lookahead)
                and self.copies_parameters(step, lookahead))

    def records(self, step: int, lookahead: int = 1) -> bool:
        """Whether ``step`` is measured at all: gradients, parameters, the weight copy for a
        parameter step among the next ``lookahead`` (see :meth:`copies_parameters`), activations
        or histograms."""
        return (step % self.gradients == 0 or self._reads_beyond_gradients(step, lookahead)
                or self.copies_parameters(step, lookahead))
