"""A step's scalars travel in one TensorBoard event, and every value reads back exactly."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator as ea
from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
from tensorboard.compat.proto.event_pb2 import Event
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from graddiag import GradientMonitor
from graddiag.reporters.events import write_image, write_scalars
from graddiag.reporters.logs import read_logs
from graddiag.reporters.tensorboard import TensorBoardReporter


def _run(logdir: Path) -> GradientMonitor:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Sigmoid(), nn.Linear(5, 4), nn.ReLU(),
                          nn.Linear(4, 3))
    model[2].bias.requires_grad_(False)  # a frozen parameter: its layer still has a gradient
    writer = SummaryWriter(str(logdir))
    reporter = TensorBoardReporter(writer, scalars_every_n_steps=2, figure_every_n_steps=0,
                                   save_png=False)
    monitor = GradientMonitor(model, reporters=[reporter], param_every_n_steps=2,
                              activation_every_n_steps=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(5):
        loss = model(torch.randn(8, 6)).square().mean()
        opt.zero_grad()
        loss.backward()
        monitor.step()
        opt.step()
    monitor.close()
    writer.close()
    return monitor


def test_scalars_round_trip_one_event_per_step(tmp_path: Path) -> None:
    monitor = _run(tmp_path)
    records = {r.step: r for r in monitor.records}
    expected: dict[tuple[str, int], float] = {}
    for step in (0, 2, 4):
        r = records[step]
        for i, layer in enumerate(r.layers):
            expected[(f"graddiag/grad_norm/{layer}", step)] = r.grad_norm[i]
            expected[(f"graddiag/param_norm/{layer}", step)] = r.param_norm[i]
            if step:
                expected[(f"graddiag/update_ratio/{layer}", step)] = r.update_ratio[i]
        a = r.activations
        assert a is not None and a.sites == ["1", "3"]
        expected[("graddiag/saturated/1", step)] = a.saturated[0]
        expected[("graddiag/dead/3", step)] = a.dead[1]
        for i, site in enumerate(a.sites):
            expected[(f"graddiag/gain/{site}", step)] = a.gain[i]
        expected[("graddiag/global_grad_norm", step)] = np.sqrt(np.sum(r.grad_norm ** 2))
        expected[("graddiag/layer_norm/max", step)] = r.grad_norm.max()
        expected[("graddiag/layer_norm/min", step)] = r.grad_norm.min()
        expected[("graddiag/layer_norm/median", step)] = np.median(r.grad_norm)

        expected[("graddiag/skipped_steps", step)] = 0.0
    for (tag, step), value in list(expected.items()):  # the log10 series of the norms
        name = tag.removeprefix("graddiag/")
        if name.startswith(("grad_norm/", "global_grad_norm", "layer_norm/", "update_ratio/")):
            if value > 0:
                expected[(f"graddiag/log10_{name}", step)] = np.log10(value)

    acc = ea.EventAccumulator(str(tmp_path), size_guidance={ea.SCALARS: 0})
    acc.Reload()
    seen = {(tag, e.step): e.value for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)
            if tag != "graddiag/active_findings"}
    assert set(seen) == set(expected)
    for key, value in expected.items():
        assert seen[key] == pytest.approx(float(np.float32(value)), rel=1e-6, abs=1e-7), key

    table = read_logs(tmp_path).scalars  # what `graddiag report` reads
    assert len(table[table.statistic != "active_findings"]) == len(expected)

    # every logged step's values arrive in one event, not one event per value
    raw = [Event.FromString(b) for f in sorted(tmp_path.glob("events.out.tfevents.*"))
           for b in RawEventFileLoader(str(f)).Load()]
    events = [e for e in raw
              if any(v.tag.startswith("graddiag/") and v.HasField("simple_value")
                     for v in e.summary.value)]
    assert [e.step for e in events] == [0, 2, 4]
    assert all(len(e.summary.value) == 1 + sum(1 for k in expected if k[1] == e.step)
               for e in events)


def test_writers_other_than_torchs_get_one_add_scalar_per_key() -> None:
    calls: list[tuple[str, float, int]] = []

    class Writer:
        def add_scalar(self, tag: str, value: float, step: int) -> None:
            calls.append((tag, value, step))

    write_scalars(Writer(), {"a": 1.0, "b": 2.5}, 7)
    assert calls == [("a", 1.0, 7), ("b", 2.5, 7)]


def test_an_image_is_one_png_event_with_the_exact_pixels(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(37, 53, 3), dtype=np.uint8)
    pixels[:20] = 255  # mostly white, like a figure
    writer = SummaryWriter(str(tmp_path))
    write_image(writer, "g/flow", pixels, 11)
    writer.close()
    acc = ea.EventAccumulator(str(tmp_path), size_guidance={ea.IMAGES: 0})
    acc.Reload()
    (event,) = acc.Images("g/flow")
    assert (event.step, event.height, event.width) == (11, 37, 53)
    decoded = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))
    np.testing.assert_array_equal(decoded, pixels)


def test_writers_other_than_torchs_get_add_image() -> None:
    calls: list[tuple[str, tuple[int, ...], int, str]] = []

    class Writer:
        def add_image(self, tag: str, pixels: np.ndarray, step: int, dataformats: str) -> None:
            calls.append((tag, pixels.shape, step, dataformats))

    write_image(Writer(), "t", np.zeros((4, 5, 3), np.uint8), 3)
    assert calls == [("t", (4, 5, 3), 3, "HWC")]


@pytest.mark.parametrize("pixels", [np.zeros((4, 5, 3), np.float32), np.zeros((4, 5, 4), np.uint8),
                                    np.zeros((4, 5), np.uint8)])
def test_an_image_that_is_not_uint8_rgb_is_refused(pixels: np.ndarray) -> None:
    with pytest.raises(ValueError, match=r"uint8 RGB pixels \(height, width, 3\), got"):
        write_image(SummaryWriter, "t", pixels, 0)
