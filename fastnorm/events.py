"""Reading the scalars of TensorBoard event files, fast enough for 10^5-step runs.

An event file is a sequence of TFRecords (little-endian uint64 length, uint32 masked CRC-32C of
the length, the serialized ``tensorboard`` Event protobuf, uint32 masked CRC-32C of it). The
``tensorboard`` package's own loader, without TensorFlow installed, checks the CRCs in pure
Python byte by byte (minutes for a 10^5-step log), so this module walks the records itself, checks
both CRCs with ``google_crc32c`` and decodes events with the tensorboard package's ``Event`` proto.
Records that cannot hold a wanted tag (a byte search) are skipped before any decoding. Needs the
optional extra ``fastnorm[monitor]``.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

EVENT_FILE_MARK = "tfevents"
_HEADER = struct.Struct("<QI")  # length, masked CRC of the length
_CRC = struct.Struct("<I")


class MissingExtraError(ImportError):
    """The optional packages of fastnorm[monitor] are not installed."""


def _require_extra():
    try:
        import google_crc32c
        from tensorboard.compat.proto import event_pb2
        from tensorboard.util import tensor_util
    except ImportError as error:
        raise MissingExtraError(
            f"reading TensorBoard logs needs the optional extra: pip install 'fastnorm[monitor]' ({error})"
        ) from None
    return google_crc32c, event_pb2, tensor_util


@dataclass
class Run:
    """A directory holding event files; ``name`` is its path relative to the scanned directory."""

    name: str
    path: str
    files: list[str]


@dataclass
class Series:
    """One tag's logged points in the order they were written."""

    steps: np.ndarray  # int64
    values: np.ndarray  # float64


@dataclass
class RunScalars:
    series: dict[str, Series]
    problems: list[str] = field(default_factory=list)  # damaged or truncated records, per file


def find_runs(logdir: str) -> list[Run]:
    """Every directory under ``logdir`` (itself included) that holds event files, sorted by name.
    Raises OSError when ``logdir`` cannot be read."""
    if not os.path.isdir(logdir):
        raise NotADirectoryError(f"{logdir!r} is not a directory" if os.path.exists(logdir)
                                 else f"{logdir!r} does not exist")
    os.listdir(logdir)  # raises PermissionError for an unreadable directory

    def fail(error: OSError):
        raise error

    runs = []
    for directory, subdirs, files in os.walk(logdir, onerror=fail):
        subdirs.sort()
        events = sorted(f for f in files if EVENT_FILE_MARK in f)
        if events:
            name = os.path.relpath(directory, logdir)
            runs.append(Run(name, directory, [os.path.join(directory, f) for f in events]))
    return sorted(runs, key=lambda run: run.name)


def _masked_crc(crc32c, data) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _scalar(value, tensor_util) -> float:
    if value.HasField("simple_value"):
        return value.simple_value
    return float(tensor_util.make_ndarray(value.tensor).reshape(-1)[0])


def read_scalars(files: Iterable[str], tags: Iterable[str]) -> RunScalars:
    """The series of each of ``tags`` found in ``files`` (read in order, e.g. a run's restarts).

    A record whose data CRC fails is skipped, and one whose length CRC fails ends the file (its
    length cannot be trusted); both are reported in ``problems``, as is a truncated last record
    (a run killed mid-write).
    """
    google_crc32c, event_pb2, tensor_util = _require_extra()
    crc32c = google_crc32c.value
    wanted = set(tags)
    wanted_bytes = [t.encode() for t in wanted]
    steps: dict[str, list[int]] = {t: [] for t in wanted}
    values: dict[str, list[float]] = {t: [] for t in wanted}
    problems = []
    for path in files:
        size = os.path.getsize(path)
        if size == 0:
            continue
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            offset = 0
            while offset < size:
                if offset + _HEADER.size > size:
                    problems.append(f"{path}: truncated record at byte {offset}")
                    break
                length, length_crc = _HEADER.unpack_from(data, offset)
                if _masked_crc(crc32c, data[offset : offset + 8]) != length_crc:
                    problems.append(f"{path}: corrupted record length at byte {offset}; rest of the file skipped")
                    break
                start, end = offset + _HEADER.size, offset + _HEADER.size + length
                if end + _CRC.size > size:
                    problems.append(f"{path}: truncated record at byte {offset}")
                    break
                record = data[start:end]
                offset = end + _CRC.size
                if not any(t in record for t in wanted_bytes):
                    continue
                if _masked_crc(crc32c, record) != _CRC.unpack_from(data, end)[0]:
                    problems.append(f"{path}: corrupted record at byte {start - _HEADER.size} skipped")
                    continue
                event = event_pb2.Event.FromString(record)
                for value in event.summary.value:
                    if value.tag not in wanted:
                        continue
                    try:
                        scalar = _scalar(value, tensor_util)
                    except (TypeError, ValueError, IndexError):
                        problems.append(f"{path}: {value.tag} at step {event.step} is not a number; skipped")
                        continue
                    steps[value.tag].append(event.step)
                    values[value.tag].append(scalar)
    series = {t: Series(np.asarray(steps[t], dtype=np.int64), np.asarray(values[t], dtype=np.float64))
              for t in wanted if steps[t]}
    return RunScalars(series, problems)
