"""Integrity of TensorBoard event files: every record whole and passing its CRC checks.

TensorBoard's reader stops at the first damaged record of a file without saying so; this check
tells which file, where and why, so that ``graddiag report`` can say what it could not read.
"""

from __future__ import annotations

import struct
from pathlib import Path

from graddiag.reporters.checksums import fastest_masked_crc32c

_HEADER = 8  # uint64 length
_CRC = 4  # uint32 masked CRC-32C


def event_file_problem(path: str | Path) -> str | None:
    """``None`` if the file reads to its end; otherwise what is wrong and where.

    Each record is ``length (8 bytes) | crc(length) | data | crc(data)``; the check reads every
    record and verifies both checksums (in C where ``google-crc32c`` is compiled).
    """
    masked_crc32c = fastest_masked_crc32c()
    records = 0
    with open(path, "rb") as stream:
        while True:
            offset = stream.tell()
            header = stream.read(_HEADER)
            if not header:
                return None
            header_crc = stream.read(_CRC)
            if len(header) < _HEADER or len(header_crc) < _CRC:
                return _incomplete(records, offset)
            if struct.unpack("<I", header_crc)[0] != masked_crc32c(header):
                return _damaged(records, offset, "its length field fails the CRC check")
            (length,) = struct.unpack("<Q", header)
            data = stream.read(length)
            data_crc = stream.read(_CRC)
            if len(data) < length or len(data_crc) < _CRC:
                return _incomplete(records, offset)
            if struct.unpack("<I", data_crc)[0] != masked_crc32c(data):
                return _damaged(records, offset, "its data fail the CRC check")
            records += 1


def _damaged(records: int, offset: int, why: str) -> str:
    return (f"corrupted: record {records + 1} (byte {offset}) is damaged, {why}; the "
            f"{records} record(s) before it were read, the rest of the file is skipped")


def _incomplete(records: int, offset: int) -> str:
    return (f"truncated: the record at byte {offset} is incomplete (a run still writing, or one "
            f"stopped mid-write or by a full disk); the {records} record(s) before it were read")
