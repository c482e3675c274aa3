"""TensorBoard event files of scalars, written directly: a TFRecord file of `Event` protocol
buffers (tensorflow/core/util/event.proto), encoded by hand. tensorboardX writes the same
records but imports PyTorch when it is installed, which costs a run seconds of start-up."""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC32C = _crc32c_table()


def masked_crc32c(data: bytes) -> int:
    """TFRecord's checksum: CRC-32C (Castagnoli), rotated and offset."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    crc ^= 0xFFFFFFFF
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (strings, bytes, messages)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _event(step: int, body: bytes) -> bytes:
    """Event{wall_time = 1 (double), step = 2 (int64), ...body}."""
    head = _varint(1 << 3 | 1) + struct.pack("<d", time.time()) + _varint(2 << 3) + _varint(step)
    return head + body


class EventFile:
    """DIR/events.out.tfevents.TIME.HOST, with the scalars given to `add_scalar`. A
    `purge_step` makes TensorBoard drop what earlier files logged from that step on (a
    resumed run's overlap with the run it resumes)."""

    def __init__(self, logdir: str | Path, purge_step: int | None = None):
        logdir = Path(logdir)
        logdir.mkdir(parents=True, exist_ok=True)
        self.path = logdir / f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
        self._file = self.path.open("ab")
        self._write(_event(0, _field(3, b"brain.Event:2")))  # file_version
        if purge_step is not None:
            self._write(_event(purge_step, _field(7, _varint(1 << 3) + _varint(1))))  # START

    def _write(self, record: bytes) -> None:
        header = struct.pack("<Q", len(record))
        self._file.write(header + struct.pack("<I", masked_crc32c(header)))
        self._file.write(record + struct.pack("<I", masked_crc32c(record)))

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        """Summary{value: [Value{tag = 1, simple_value = 2 (float)}]} at `step`."""
        value_msg = _field(1, tag.encode()) + _varint(2 << 3 | 5) + struct.pack("<f", value)
        self._write(_event(step, _field(5, _field(1, value_msg))))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()
