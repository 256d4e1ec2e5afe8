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
import re
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


def _unmask(crc: int) -> int:
    """The masked CRC stored in TFRecords: rotate right by 15, add a constant (mod 2^32)."""
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _scalar(value, tensor_util) -> float:
    if value.HasField("simple_value"):
        return value.simple_value
    return float(tensor_util.make_ndarray(value.tensor).reshape(-1)[0])


def _read_file(path: str, wanted: dict[str, tuple[list, list]], problems: list[str]) -> None:
    """Appends the (step, value) pairs of the wanted tags in one event file to ``wanted``."""
    google_crc32c, event_pb2, tensor_util = _require_extra()
    size = os.path.getsize(path)
    if size == 0:
        return
    # Locals: this loop runs once per record (10^6 for a long run).
    crc32c, parse, unpack_header, unpack_crc = google_crc32c.value, event_pb2.Event.FromString, \
        _HEADER.unpack_from, _CRC.unpack_from
    may_hold_wanted = re.compile(b"|".join(re.escape(tag.encode()) for tag in wanted)).search
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        offset = 0
        while offset < size:
            if offset + _HEADER.size > size:
                problems.append(f"{path}: truncated record at byte {offset}")
                return
            length, length_crc = unpack_header(data, offset)
            if _unmask(crc32c(data[offset : offset + 8])) != length_crc:
                problems.append(f"{path}: corrupted record length at byte {offset}; rest of the file skipped")
                return
            start = offset + _HEADER.size
            end = start + length
            if end + _CRC.size > size:
                problems.append(f"{path}: truncated record at byte {offset}")
                return
            record = data[start:end]
            offset = end + _CRC.size
            if may_hold_wanted(record) is None:
                continue
            if _unmask(crc32c(record)) != unpack_crc(data, end)[0]:
                problems.append(f"{path}: corrupted record at byte {start - _HEADER.size} skipped")
                continue
            event = parse(record)
            for value in event.summary.value:
                lists = wanted.get(value.tag)
                if lists is None:
                    continue
                try:
                    scalar = _scalar(value, tensor_util)
                except (TypeError, ValueError, IndexError):
                    problems.append(f"{path}: {value.tag} at step {event.step} is not a number; skipped")
                    continue
                lists[0].append(event.step)
                lists[1].append(scalar)


def read_scalars(files: Iterable[str], tags: Iterable[str]) -> RunScalars:
    """The series of each of ``tags`` found in ``files`` (read in order, e.g. a run's restarts).

    A record whose data CRC fails is skipped, and one whose length CRC fails ends the file (its
    length cannot be trusted); both are reported in ``problems``, as is a truncated last record
    (a run killed mid-write).
    """
    _require_extra()
    wanted: dict[str, tuple[list, list]] = {tag: ([], []) for tag in tags}
    problems: list[str] = []
    for path in files:
        _read_file(path, wanted, problems)
    series = {tag: Series(np.asarray(steps, dtype=np.int64), np.asarray(values, dtype=np.float64))
              for tag, (steps, values) in wanted.items() if steps}
    return RunScalars(series, problems)
