"""TensorBoard event records checksummed in C: the same bytes as TensorBoard writes, at a fraction
of the cost.

TensorBoard frames every event record with two CRC-32C checksums that it computes in pure Python,
about 90 ns a byte (a 106-value scalar event, about 0.3 ms; a 20 KB findings table, about
1.8 ms),
on the training process's interpreter lock even though a background thread does it. With
``google-crc32c`` installed (a dependency of graddiag; its compiled build), :class:`CChecksums`
has the record writer behind one torch ``SummaryWriter`` compute the same checksums in C for as
long as graddiag writes to it; :meth:`CChecksums.undo` puts TensorBoard's own method back. The
bytes on disk are identical either way, so nothing that reads the event file can tell.
"""

from __future__ import annotations

import functools
import io
import struct
import types
import warnings
import weakref
from collections.abc import Callable
from typing import Any

from graddiag.reporters.events import is_torch_writer

try:
    with warnings.catch_warnings():  # its pure-Python fallback warns on import: not used here
        warnings.simplefilter("ignore", RuntimeWarning)
        import google_crc32c

    _COMPILED = google_crc32c.implementation == "c"
except ImportError:  # without it, TensorBoard's own (pure-Python) checksums are used
    _COMPILED = False

_MASK_DELTA = 0xA282EAD8


def masked_crc32c(data: bytes) -> int:
    """The masked CRC-32C of ``data`` as TensorBoard's event records carry it."""
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def fastest_masked_crc32c() -> Callable[[bytes], int]:
    """:func:`masked_crc32c` where the compiled build is installed, else TensorBoard's own."""
    if _COMPILED:
        return masked_crc32c
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as pure

    return pure  # type: ignore[no-any-return]


def _write(record_writer: Any, data: bytes) -> None:
    """TensorBoard's ``RecordWriter.write`` with the checksums computed in C: length, its masked
    CRC, the data, its masked CRC (little-endian)."""
    data = bytes(data)  # the C checksum takes bytes only (no copy when it is bytes already)
    header = struct.pack("<Q", len(data))
    record_writer._writer.write(header + struct.pack("<I", masked_crc32c(header)) + data
                                + struct.pack("<I", masked_crc32c(data)))


@functools.cache
def _record_writer_class() -> type | None:
    """TensorBoard's ``RecordWriter``, when its records are the ones :func:`_write` writes
    (checked once per process: both write the same samples to memory and must give the same
    bytes), else ``None``."""
    try:
        from tensorboard.summary.writer.record_writer import RecordWriter
    except ImportError:
        return None
    samples = (b"", b"graddiag event record", bytes(range(256)) * 5)
    try:
        theirs, ours = RecordWriter(io.BytesIO()), RecordWriter(io.BytesIO())
        for sample in samples:
            theirs.write(sample)
            _write(ours, sample)
        same = theirs._writer.getvalue() == ours._writer.getvalue()
    except Exception:  # noqa: BLE001 - another TensorBoard: leave its writer as it is
        return None
    return RecordWriter if same else None


class CChecksums:
    """Has the record writers behind torch ``SummaryWriter`` objects checksum in C, until
    :meth:`undo`. Does nothing without a compiled ``google-crc32c``, for other writers, or for an
    internal layout of TensorBoard's writer it does not recognise."""

    def __init__(self) -> None:
        # the covered record writers, weakly (a closed one is not kept alive)
        self._covered: list[weakref.ref[Any]] = []
        self._class = _record_writer_class() if _COMPILED else None

    @property
    def available(self) -> bool:
        """Whether checksums in C can be used here (compiled ``google-crc32c``, a known
        TensorBoard)."""
        return self._class is not None

    def cover(self, writer: Any) -> None:
        """Have ``writer``'s current record writer checksum in C (cheap when already done; a
        writer reopened after ``close`` has a new record writer, covered on the next call).

        Never opens a closed writer: it reads the writer's open file writer, if any.
        """
        if self._class is None or not is_torch_writer(writer):
            return
        file_writer = getattr(writer, "file_writer", None)
        async_writer = getattr(getattr(file_writer, "event_writer", None), "_async_writer", None)
        record_writer = getattr(async_writer, "_writer", None)
        if type(record_writer) is not self._class or "write" in vars(record_writer):
            return
        setattr(record_writer, "write", types.MethodType(_write, record_writer))  # noqa: B010
        self._covered = [ref for ref in self._covered if ref() is not None]
        self._covered.append(weakref.ref(record_writer))

    def undo(self) -> None:
        """Give every covered record writer TensorBoard's own ``write`` back (only where the
        ``write`` it has is the one :meth:`cover` gave it)."""
        for ref in self._covered:
            record_writer = ref()
            if (record_writer is not None
                    and getattr(vars(record_writer).get("write"), "__func__", None) is _write):
                del record_writer.write
        self._covered.clear()
