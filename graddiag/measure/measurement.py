"""One recorded step's measurement: every probe's device tensors, one host copy, one StepRecord."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import nn

from graddiag.data.records import StepRecord
from graddiag.data.schedule import Schedule
from graddiag.measure.activations.packing import ActivationPack
from graddiag.measure.histograms import HistogramProbe
from graddiag.measure.layers import LayerIndex
from graddiag.measure.live_layers import LiveLayers
from graddiag.measure.norms import GradientProbe, GradientReading, clipping_acts
from graddiag.measure.rows import NormRows, SentRows
from graddiag.measure.transfer import HostCopy
from graddiag.measure.updates import UpdateTracker, UpdateView


class StepMeasurement:
    """Reads the probes a step's schedule asks for and turns their one host copy into a record.

    The layers follow the run (:class:`~graddiag.measure.live_layers.LiveLayers`): ordered by
    the order gradients arrive, rediscovered when ``requires_grad`` or the modules change; the
    probes are (re)built whenever the layers do.

    Args:
        root: The monitored module.
        index: Its layers (kept up to date in place).
        norm_type: The p of the gradient p-norms.
        schedule: Which steps read parameters and histograms.
        record_order: Learn the layer order from what runs (off for compiled models, where
            hooks would force recompilation: definition order is kept).
        include: Glob patterns of layer names to keep when the layers are found again.
        exclude: Glob patterns of layer names to drop then.
        updates: Parameter norms, one-step update ratios and optimizer coverage, if any.
    """

    def __init__(self, root: nn.Module, index: LayerIndex, norm_type: float, schedule: Schedule,
                 *, record_order: bool = True, include: tuple[str, ...] | None = None,
                 exclude: tuple[str, ...] = (), updates: UpdateTracker | None = None) -> None:
        self.index = index
        self.norm_type = norm_type
        self.schedule = schedule
        self.live = LiveLayers(root, index, include=include, exclude=exclude,
                               record_order=record_order)
        self._grads: GradientProbe | None = None
        self._per_optimizer: dict[int, GradientProbe] = {}
        self._updates = updates
        self._histograms: HistogramProbe | None = None
        self._warned: set[str] = set()  # kinds of tensors already warned about as unmeasurable
        self._rows: NormRows | None = None  # plain steps kept for judging together
        self._sent: list[SentRows] = []  # blocks of them on their way to the host
        # after a step that could not be kept (a sparse gradient, say), the next attempt
        # waits 2, 4, ... 64 steps: a model that can never be kept costs no retries
        self._failed_keeps = 0
        self._next_keep = 0
        # the parameters a kept step last saw without a gradient or with an all-zero one: the
        # flags are compared again only when these change
        self._without: tuple[tuple[int, ...], tuple[int, ...]] = ((), ())

    @property
    def layers(self) -> list[str]:
        """The layer names in forward order (one list shared by every record of a layout)."""
        return self.live.names

    def _settle(self, all_flags: bool = True) -> GradientProbe:
        changed = self.live.update(all_flags)
        if changed or self._grads is None:
            self._per_optimizer.clear()
            self._grads = GradientProbe(self.index, self.norm_type, warned=self._warned)
            self._histograms = None
            if self._updates is not None:  # new layers: new parameter probes, no valid copy
                self._updates.reset(self._warned)
            if self.schedule.histograms:
                self._histograms = HistogramProbe(self.index, warned=self._warned)
        return self._grads

    def _probe_for(self, optimizer: int, params: Iterable[torch.Tensor] | None,
                   all_flags: bool = True) -> GradientProbe:
        everything = self._settle(all_flags)
        if params is None:
            return everything
        probe = self._per_optimizer.get(optimizer)
        if probe is None:
            probe = GradientProbe(self.index, self.norm_type, only={id(p) for p in params},
                                  warned=self._warned)
            if probe.measured.all():
                probe = everything
            self._per_optimizer[optimizer] = probe
        return probe

    def keep(self, step: int, capacity: int, *, optimizer: int = 0,
             params: Iterable[torch.Tensor] | None = None,
             clip_norm: float | None = None, clip_value: float | None = None,
             sent: bool = False) -> bool:
        """Keep a plain step (gradient norms only) as a row of
        :class:`~graddiag.measure.rows.NormRows` instead of measuring it in full; its record
        comes from :meth:`take_kept` (or, ``sent``, from :meth:`take_sent` after
        :meth:`send_kept`).

        Returns ``False`` when the step must be measured with :meth:`start` instead: the step
        is not plain (a gradient sparse, a DTensor, on several devices, or non-finite when the
        row is read on the step, or one optimizer reading only some layers; the next try then
        waits 2, 4, ... up to 64 steps), the layers changed while steps are kept (take those
        first), or a parameter was frozen or unfrozen (looked for when the parameters with a
        missing or all-zero gradient change; its row is dropped). ``capacity``: how many steps
        the rows hold (:meth:`take_kept` when full). ``sent``: nothing is read on the step
        (see :class:`~graddiag.measure.rows.NormRows`), so every parameter's
        ``requires_grad`` is compared instead (a frozen one then leaves the layers on the
        step it is frozen, which is measured in full).
        """
        if step < self._next_keep:
            return False
        # rows read on the step: only the frozen parameters' flags (a parameter frozen since
        # shows in its gradient); sent rows show nothing on the step: every flag
        probe = self._probe_for(optimizer, params, all_flags=sent)
        rows = self._rows
        if rows is None or rows.probe is not probe or rows.sent != sent:
            # another layout or optimizer's probe, or another way of reading the rows
            if rows is not None and len(rows):  # the kept steps are judged first
                return False
            if not (probe.measures_all and probe.reads_rows and len(probe.row_layers)):
                return False
            rows = self._rows = NormRows(probe, self.layers, capacity, self.norm_type, sent)
        missing = rows.keep(step, optimizer, clip_norm, clip_value)
        if missing is None:
            self._failed_keeps = min(self._failed_keeps + 1, 6)
            self._next_keep = step + 2 ** self._failed_keeps
            return False
        without = rows.last_without_gradient()
        # a parameter may have been frozen (sent rows compared every flag already)
        if not sent and without != self._without and any(without):
            if self.live.flags_changed():
                rows.drop_last()  # it was: the layers change, and this step is measured in full
                return False
        self._without = without
        self._failed_keeps = 0
        self.live.note_missing(missing)
        if self._updates is not None:  # a kept step's optimizer step is applied: copy is valid
            self._updates.copy(step, optimizer, probe.measured)
        self._finish_step(step)
        return True

    def copy_weights(self, step: int, *, optimizer: int = 0,
                     params: Iterable[torch.Tensor] | None = None) -> None:
        """A step whose only measurement is the weight copy for the next parameter step: the
        layers are followed (a copy belongs to one layout), nothing is read on the host."""
        probe = self._probe_for(optimizer, params)
        if self._updates is not None:
            self._updates.copy(step, optimizer, probe.measured)
        self._finish_step(step)

    def _finish_step(self, step: int) -> None:
        """After a step's measurement: forget its gradient timing, and watch the next backward
        pass if it will record activations (or the layers still need sorting)."""
        self.live.finish_step(watch_next=self.schedule.records_activations(step + 1))

    @property
    def kept(self) -> int:
        """How many steps :meth:`keep` holds."""
        return 0 if self._rows is None else len(self._rows)

    @property
    def kept_full(self) -> bool:
        """The rows are full: :meth:`take_kept` before keeping another step."""
        return self._rows is not None and self._rows.full

    @property
    def sends_kept(self) -> bool:
        """The kept rows travel to the host a block at a time (:meth:`send_kept`)."""
        return self._rows is not None and self._rows.sent

    def send_kept(self) -> None:
        """Start the kept rows' copy to the host; :meth:`take_sent` makes their records."""
        if self._rows is not None and len(self._rows):
            self._sent.append(self._rows.send())

    def take_sent(self) -> list[StepRecord]:
        """The records of the blocks sent to the host, oldest first."""
        records = [record for block in self._sent for record in block.records()]
        self._sent.clear()
        return records

    def take_kept(self) -> list[StepRecord]:
        """The records of the kept steps, sent or not, oldest first (none are kept
        afterwards)."""
        return self.take_sent() + ([] if self._rows is None else self._rows.take())

    def discard_kept(self) -> None:
        """Forget the kept steps without making their records (a checkpoint was loaded)."""
        if self._rows is not None:
            self._rows.clear()
        self._sent.clear()
        self._failed_keeps = self._next_keep = 0

    def start(
        self,
        step: int,
        *,
        optimizer: int = 0,
        params: Iterable[torch.Tensor] | None = None,
        amp_scale: torch.Tensor | float | None = None,
        grads_scaled: bool = False,
        clip_norm: float | None = None,
        clip_value: float | None = None,
        activations: ActivationPack | None = None,
        deferred: bool = False,
    ) -> Callable[[], StepRecord]:
        """The device half of :meth:`measure`: reads the probes and starts the one host copy;
        returns what builds the record from it, at once or (``deferred``) a step later."""
        probe = self._probe_for(optimizer, params)
        device: dict[str, torch.Tensor] = {}  # everything this step sends to the host
        scale = None if amp_scale is None else torch.as_tensor(amp_scale, dtype=torch.float32)
        reading = probe.read(scale if grads_scaled else None)
        self.live.note_missing(reading.missing)
        device["grad_norm"] = reading.layer_norms
        if scale is not None:
            device["amp_scale"] = scale.reshape(1)
        view = None  # parameter norms and update norms, the weight copy if due, learning rates
        if self._updates is not None:
            tensors, view = self._updates.read(step, optimizer, probe.measured)
            device.update(tensors)
        if self._histograms is not None and self.schedule.records_histograms(step):
            device["histograms"] = self._histograms.read()
        for i, chunk in enumerate(activations.chunks if activations is not None else []):
            device[f"act{i}"] = chunk
        if deferred:  # the gradients are gone when the copy is read: name non-finite tensors
            device.update({f"tensors{i}": n for i, n in enumerate(reading.tensor_norms)})
        deferred = deferred and activations is None  # site positions need this step's timing
        copy = HostCopy(list(device.values()), deferred=deferred)  # the one host copy
        names = list(device)
        layers = self.layers

        def finish() -> StepRecord:
            host = dict(zip(names, copy.result()))
            record = self._record(step, optimizer, probe, reading, host, activations, clip_norm,
                                  layers, deferred, view, clip_value)
            if record.activations is not None:  # where each site ran among the layers
                record.activations.position = self.live.site_positions(record.activations.sites)
            return record

        if not deferred:
            record = finish()
            self._finish_step(step)
            return lambda: record
        self._finish_step(step)
        return finish

    def _record(self, step: int, optimizer: int, probe: GradientProbe, reading: GradientReading,
                host: dict[str, np.ndarray], activations: ActivationPack | None,
                clip_norm: float | None, layers: list[str], deferred: bool,
                view: UpdateView | None = None, clip_value: float | None = None) -> StepRecord:
        grad_norm = host["grad_norm"]
        has_grad = reading.has_grad
        # every layer got a gradient (the usual step): nothing to mark missing
        complete = has_grad is probe.all_read and probe.measures_all
        if not complete and not has_grad.all():
            grad_norm[~has_grad] = np.nan
        param_norm = update_ratio = param_count = learning_rate = orphaned = None
        if view is not None:
            param_norm, update_ratio = view.ratios(host)
            param_count, learning_rate, orphaned = view.counts, view.learning_rate, view.orphaned
        histograms = host.get("histograms")
        if histograms is not None:
            histograms = histograms.reshape(len(self.index), -1)
        suspicious: set[int] = set()
        if not math.isfinite(grad_norm.sum()):  # missing layers (NaN), or non-finite ones
            suspicious = set(np.flatnonzero(has_grad & ~np.isfinite(grad_norm)).tolist())
        # Under a GradScaler, inf/NaN gradients make the scaler skip the step: AMP overflow.
        amp_overflow = "amp_scale" in host and bool(suspicious)
        nonfinite: dict[int, dict[str, int]] = {}
        if suspicious and not amp_overflow:
            if deferred:
                values = [v for k, v in host.items() if k.startswith("tensors")]
                nonfinite = reading.nonfinite_tensors(np.concatenate(values))
            else:
                nonfinite = probe.nonfinite_elements(suspicious)
                overflowed = suspicious - set(nonfinite)  # every element finite: a float32 norm
                if overflowed:  # overflowed; the float64 norm is the record's
                    grad_norm = grad_norm.astype(np.float64)
                    for lid, norm in probe.exact_norms(overflowed).items():
                        grad_norm[lid] = norm
        clipped = clipping_acts(grad_norm, has_grad, clip_norm, self.norm_type)
        return StepRecord(
            step=step,
            layers=layers,
            grad_norm=grad_norm,
            has_grad=has_grad,
            missing=reading.missing,
            nonfinite=nonfinite,
            param_norm=param_norm,
            update_ratio=update_ratio,
            activations=None if activations is None else activations.finish(
                [v for k, v in host.items() if k.startswith("act")]),
            grad_histograms=histograms,
            optimizer=optimizer,
            measured=None if probe.measures_all else probe.measured.copy(),
            amp_overflow=amp_overflow,
            amp_scale=float(host["amp_scale"][0]) if "amp_scale" in host else None,
            clipped=clipped,
            clip_value=clip_value,
            clip_norm=clip_norm,
            param_count=param_count,
            learning_rate=learning_rate,
            base_learning_rate=None if view is None else view.base_learning_rate,
            orphaned=orphaned,
            along_gradient=None if view is None else view.along_gradient,
        )

    def close(self) -> None:
        """Remove the order hooks (forward, gradient arrival) that are still installed."""
        self.live.close()
