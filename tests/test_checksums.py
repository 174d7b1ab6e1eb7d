"""Event records checksummed in C: the same checksums as TensorBoard's, on the writer graddiag
writes to and only while it does."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as tensorboard_crc
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from graddiag import GradientMonitor
from graddiag.reporters import checksums
from graddiag.reporters.checksums import CChecksums, masked_crc32c
from graddiag.reporters.tensorboard import TensorBoardReporter


def _bitwise_crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), one bit at a time."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def test_the_compiled_build_is_installed() -> None:
    # a dependency of graddiag: without its compiled build the C path would silently be unused
    assert checksums._COMPILED and CChecksums().available


@pytest.mark.parametrize("data", [b"", b"123456789", bytes(range(256)) * 41, b"\x00" * 8])
def test_masked_crc32c_matches_the_standard_and_tensorboard(data: bytes) -> None:
    crc = _bitwise_crc32c(data)
    if data == b"123456789":
        assert crc == 0xE3069283  # the published CRC-32C check value
    masked = (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF
    assert masked_crc32c(data) == masked == tensorboard_crc(data)


def _record_writer(writer: SummaryWriter):  # noqa: ANN202
    return writer.file_writer.event_writer._async_writer._writer


def _records(path: Path) -> list[bytes]:
    """Every record's data, each checked with the bitwise CRC above (length and data)."""
    blob, records, at = path.read_bytes(), [], 0
    while at < len(blob):
        header = blob[at:at + 8]
        assert struct.unpack("<I", blob[at + 8:at + 12])[0] == tensorboard_crc(header)
        (length,) = struct.unpack("<Q", header)
        data = blob[at + 12:at + 12 + length]
        crc = _bitwise_crc32c(data)
        masked = (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF
        assert struct.unpack("<I", blob[at + 12 + length:at + 16 + length])[0] == masked
        records.append(data)
        at += 16 + length
    assert at == len(blob)
    return records


def test_a_monitored_run_writes_records_tensorboard_reads(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    writer = SummaryWriter(str(tmp_path))
    writer.add_scalar("user/before", 1.0, 0)  # the user's own writes share the writer
    reporter = TensorBoardReporter(writer, scalars_every_n_steps=1, figure_every_n_steps=2,
                                   save_png=False)
    monitor = GradientMonitor(model, reporters=[reporter], every_n_steps=1)
    record_writer = _record_writer(writer)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(4):
        loss = model(torch.randn(8, 6)).square().mean()
        opt.zero_grad()
        loss.backward()
        monitor.step()
        opt.step()
        assert "write" in vars(record_writer)  # covered while graddiag writes to it
        writer.add_text("user/note", "x" * 3000, step)
    monitor.close()
    assert "write" not in vars(record_writer)  # TensorBoard's own method is back
    writer.add_scalar("user/after", 2.0, 5)
    writer.close()
    (path,) = tmp_path.glob("events.out.tfevents.*")
    records = _records(path)
    tags = {value.tag for data in records for value in Event.FromString(data).summary.value}
    assert {"user/before", "user/after", "user/note/text_summary", "graddiag/grad_norm/0",
            "graddiag/gradient_flow"} <= tags
    # TensorBoard's loader reads the same number of records
    assert len(list(RawEventFileLoader(str(path)).Load())) == len(records)


def test_cover_never_reopens_a_closed_writer_and_ignores_other_writers(tmp_path: Path) -> None:
    writer = SummaryWriter(str(tmp_path))
    writer.close()
    cover = CChecksums()
    cover.cover(writer)
    assert writer.file_writer is None
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 1  # the one made on creation

    # another writer class with TensorBoard's record writer inside is left as it is
    from types import SimpleNamespace

    from tensorboard.summary.writer.record_writer import RecordWriter

    record_writer = RecordWriter(io.BytesIO())
    other = SimpleNamespace(file_writer=SimpleNamespace(event_writer=SimpleNamespace(
        _async_writer=SimpleNamespace(_writer=record_writer))))
    cover.cover(other)
    assert "write" not in vars(record_writer)


def test_without_the_compiled_build_tensorboards_checksums_stay(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch
                                                               ) -> None:
    monkeypatch.setattr(checksums, "_COMPILED", False)
    writer = SummaryWriter(str(tmp_path))
    cover = CChecksums()
    cover.cover(writer)
    assert not cover.available and "write" not in vars(_record_writer(writer))
    writer.add_scalar("a", float(np.float32(1.5)), 0)
    writer.close()
    (path,) = tmp_path.glob("events.out.tfevents.*")
    assert len(_records(path)) == 2  # the file-version record and the scalar


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_records_are_tensorboards_bytes_whatever_buffer_they_come_in(kind: type) -> None:
    import io

    from tensorboard.summary.writer.record_writer import RecordWriter

    theirs, ours = RecordWriter(io.BytesIO()), RecordWriter(io.BytesIO())
    checksums._write(ours, b"")
    theirs.write(b"")
    for size in (1, 9, 1000, 70_000):
        data = bytes(np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8))
        theirs.write(data)
        checksums._write(ours, kind(data))
    assert ours._writer.getvalue() == theirs._writer.getvalue()


def test_a_reporter_turned_off_by_an_error_gives_the_writer_its_method_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writer = SummaryWriter(str(tmp_path))
    reporter = TensorBoardReporter(writer, figure_every_n_steps=0, save_png=False)
    monitor = GradientMonitor(nn.Sequential(nn.Linear(3, 2)), reporters=[reporter],
                              every_n_steps=1)
    record_writer = _record_writer(writer)

    def broken(snapshot: object) -> None:
        assert "write" in vars(record_writer)  # covered while it writes
        raise OSError("disk full")

    monkeypatch.setattr(reporter, "_report", broken)
    monitor.model(torch.randn(4, 3)).sum().backward()
    monitor.step()  # the error is logged and the reporter turned off; training goes on
    assert "write" not in vars(record_writer)
    monitor.close()
    writer.close()


def test_a_monitor_never_closed_gives_the_writer_its_method_back_when_dropped(
        tmp_path: Path) -> None:
    import gc

    writer = SummaryWriter(str(tmp_path))
    model = nn.Sequential(nn.Linear(3, 2))
    monitor = GradientMonitor(model, reporters=[TensorBoardReporter(writer, save_png=False)],
                              every_n_steps=1)
    model(torch.randn(4, 3)).sum().backward()
    monitor.step()
    record_writer = _record_writer(writer)
    assert "write" in vars(record_writer)
    del monitor
    gc.collect()
    assert "write" not in vars(record_writer)
    writer.close()


def test_undo_leaves_a_write_it_did_not_give_and_two_covers_share_one_writer(
        tmp_path: Path) -> None:
    writer = SummaryWriter(str(tmp_path))
    first, second = CChecksums(), CChecksums()
    first.cover(writer)
    second.cover(writer)  # already covered: the second leaves it to the first
    record_writer = _record_writer(writer)
    second.undo()
    assert "write" in vars(record_writer)
    first.undo()
    assert "write" not in vars(record_writer)

    def theirs(data: bytes) -> None:
        raise AssertionError("not called")

    record_writer.write = theirs  # someone else's method on the instance
    first.cover(writer)
    first.undo()
    assert vars(record_writer)["write"] is theirs
    del record_writer.write
    writer.close()
