"""Rough edges: grouped warnings, the end-of-fit summary, damaged event files, ``--csv`` paths
and a full disk while saving the gradient-flow PNG."""

from __future__ import annotations

import errno
import logging
import math
import struct
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch.utils.tensorboard import SummaryWriter

from graddiag import GradientMonitor
from graddiag.cli import main as cli_main
from graddiag.demos.models import build_mlp
from graddiag.reporters.console import summary_screen
from graddiag.reporters.tensorboard import FIGURE_FILE, TensorBoardReporter
from tests.helpers import train_plain


def test_a_fully_exploding_net_gets_one_warning_listing_its_layers(digits, caplog) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    model = build_mlp(64, 10, depth=10, width=64, activation="relu", init="normal", init_std=3.0)
    x, y = digits
    F.cross_entropy(model(x[:64]), y[:64]).backward()
    norms = {name: math.sqrt(sum(float(p.grad.double().pow(2).sum())
                                 for p in module.parameters(recurse=False)))
             for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    exploding = {name for name, norm in norms.items() if norm > 1e4}
    assert len(exploding) == 11  # every layer, by the float64 recomputation
    with caplog.at_level(logging.WARNING, logger="graddiag"):
        with GradientMonitor(model, activation_every_n_steps=0) as monitor:
            monitor.step()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].startswith("graddiag [exploding] step 0, 11 layers: ")
    listed = warnings[0].split(" layers: ")[1].split(". First")[0]
    assert {part.split("'")[1] for part in listed.split("), ")} == exploding
    assert warnings[0].count("Try:") == 1
    assert len(monitor.findings) == 11  # the findings themselves stay one per layer


def test_summary_lists_activation_sites_apart_without_nan_columns(digits) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    monitor = train_plain(build_mlp(64, 10, depth=4, width=64, activation="relu", init="kaiming",
                                    bias_init=-3.0), digits, steps=30, activation_every_n_steps=10)
    sites = sorted({f.layer for f in monitor.findings if f.kind == "dead_relu"})
    assert sites  # the activation modules "1", "3", ...
    text = summary_screen(monitor.summary(), monitor.findings, skipped_steps=2)
    layer_part, site_part = text.split("activation site")
    assert "nan" not in text
    assert "2 optimizer step(s) skipped" in text.splitlines()[0]
    layer_names = [line.split()[0] for line in layer_part.splitlines()[3:] if line.strip()]
    assert set(layer_names) <= {"0", "2", "4", "6", "8", "..."}
    site_names = [line.split()[0] for line in site_part.splitlines()[2:] if line.strip()]
    assert site_names == sites
    for line in site_part.splitlines()[2:]:
        assert "dead_relu" in line and line.rstrip().endswith("%")


def _write_run(path: Path, values: int) -> Path:
    writer = SummaryWriter(str(path))
    for step in range(values):
        writer.add_scalar("graddiag/grad_norm/net.0", float(step + 1), step)
    writer.close()
    return next(path.glob("events.out.tfevents.*"))


def _record_offsets(data: bytes) -> list[int]:
    """Byte offsets of the records: length (8) | crc (4) | data | crc (4)."""
    offsets, at = [], 0
    while at < len(data):
        offsets.append(at)
        (length,) = struct.unpack("<Q", data[at:at + 8])
        at += 8 + 4 + length + 4
    return offsets


@pytest.mark.parametrize("damage", ["corrupted", "truncated"])
def test_report_names_a_damaged_event_file_and_keeps_the_rest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str
) -> None:
    _write_run(tmp_path / "good", 10)
    bad = _write_run(tmp_path / "bad", 10)
    data = bytearray(bad.read_bytes())
    offsets = _record_offsets(bytes(data))
    assert len(offsets) == 11  # the file-version record, then 10 scalars
    if damage == "corrupted":
        data[offsets[6] + 12 + 5] ^= 0xFF  # inside the data of the 6th scalar's record
        readable = 5
    else:
        data = data[: len(data) - 3]  # the last record cut short
        readable = 9
    bad.write_bytes(bytes(data))
    out = tmp_path / "new" / "folder" / "scalars.csv"
    assert cli_main(["report", str(tmp_path), "--csv", str(out)]) == 0
    err = capsys.readouterr().err
    assert str(bad) in err and damage in err
    table = pd.read_csv(out)
    assert table.groupby("run").size().to_dict() == {"bad": readable, "good": 10}
    assert list(table[table.run == "bad"].value) == [float(v) for v in range(1, readable + 1)]


def test_report_csv_into_an_impossible_place_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _write_run(tmp_path / "run", 3)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert cli_main(["report", str(tmp_path / "run"), "--csv", str(blocker / "x.csv")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("graddiag report: error: cannot write --csv")


class _FullDisk:
    """``Figure.savefig`` that writes half the PNG, then fails like a full disk."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, target, *args, **kwargs) -> None:  # noqa: ANN001, ANN002, ANN003
        self.calls += 1
        half = b"\x89PNG\r\n\x1a\n" + b"\0" * 100
        if isinstance(target, (str, Path)):
            Path(target).write_bytes(half)
        else:
            target.write(half)
        raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("existing", [False, True])
def test_a_full_disk_leaves_no_truncated_png(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    existing: bool, digits,  # noqa: ANN001
) -> None:
    previous = b"the PNG of an earlier run"
    if existing:
        (tmp_path / FIGURE_FILE).write_bytes(previous)
    writer = SummaryWriter(str(tmp_path))
    reporter = TensorBoardReporter(writer, figure_every_n_steps=0)
    full_disk = _FullDisk()
    monkeypatch.setattr(Figure, "savefig", full_disk)
    with caplog.at_level(logging.WARNING, logger="graddiag"):
        train_plain(build_mlp(64, 10, depth=2, width=8), digits, steps=3, reporters=[reporter])
    writer.close()
    assert full_disk.calls == 1
    left = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("events"))
    assert left == ([FIGURE_FILE] if existing else [])  # no temporary file either
    if existing:
        assert (tmp_path / FIGURE_FILE).read_bytes() == previous
    warnings = [r.getMessage() for r in caplog.records if FIGURE_FILE in r.getMessage()]
    assert len(warnings) == 1 and "No space left on device" in warnings[0]
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(str(tmp_path), size_guidance={ea.TENSORS: 0})
    acc.Reload()
    assert "graddiag/summary/text_summary" in acc.Tags()["tensors"]  # the rest still written


def test_a_plain_monitor_counts_the_steps_it_asks_to_skip_and_keeps_the_count(digits) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    model = build_mlp(64, 10, depth=2, width=8)
    x, y = digits
    skipped_by_loop = []
    with GradientMonitor(model, on_nonfinite="skip", reporters=[]) as monitor:
        for step in range(6):
            model.zero_grad()
            loss = F.cross_entropy(model(x[:32]), y[:32])
            (loss * float("nan") if step in (2, 3) else loss).backward()
            if monitor.step().should_skip:
                skipped_by_loop.append(step)
    assert skipped_by_loop == [2, 3]
    assert monitor.skipped_steps == 2
    resumed = GradientMonitor(model, reporters=[])
    resumed.load_state_dict(monitor.state_dict())
    assert resumed.skipped_steps == 2
    resumed.close()
