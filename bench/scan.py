"""How long ``fastnorm scan`` takes on a large run, beside the tensorboard package's own loader.

    python bench/scan.py [--steps 100000] [--loader-records 20000]

Writes a run of --steps updates with the seed's 8 tags (one scalar per event, as SummaryWriter
writes them; the seed's catastrophe at the end) into a temporary directory, then times
``fastnorm.monitoring.scan.scan`` on it, end to end, and tensorboard's EventFileLoader on its first
--loader-records records (extrapolated to the whole file), in wall and CPU seconds (the CPU
time is the fairer number on a shared machine). The log is written with the same
record framing fastnorm.monitoring.events reads (SummaryWriter itself needs about half a millisecond per
scalar, which would make the set-up the slow part).
"""

from __future__ import annotations

import argparse
import math
import os
import struct
import tempfile
import time

import google_crc32c
import numpy as np
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.compat.proto import event_pb2, summary_pb2

from fastnorm.monitoring.scan import SEED_TAGS, scan

# The seed's reconstructed catastrophe, at the last steps of the run (offsets from the end).
CATASTROPHE = {
    -2: dict(advantages_std_raw=0.00005, advantages_norm_max_abs=8.5),
    -1: dict(advantages_std_raw=0.000018, advantages_norm_max_abs=385.2, grad_norm=2847.3, clip_fraction=0.98,
             explained_variance=-3.2, policy_loss=-47.3, value_loss=156.8),
    0: dict(advantages_std_raw=math.nan, advantages_norm_max_abs=math.nan, policy_loss=math.nan,
            value_loss=math.nan, explained_variance=math.nan, ep_rew_mean=-850.3),
}


def _record(event: event_pb2.Event) -> bytes:
    def masked(data: bytes) -> bytes:
        crc = google_crc32c.value(data)
        return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)

    data = event.SerializeToString()
    header = struct.pack("<Q", len(data))
    return header + masked(header) + data + masked(data)


def write_log(path: str, steps: int, seed: int = 0) -> int:
    """A healthy run of ``steps`` updates ending in the catastrophe; returns the file size."""
    rng = np.random.default_rng(seed)
    healthy = {"advantages_std_raw": (0.01, 0.5), "advantages_norm_max_abs": (1, 5), "grad_norm": (0.1, 1),
               "clip_fraction": (0.1, 0.3), "explained_variance": (0.3, 0.9), "policy_loss": (-0.002, 0.01),
               "value_loss": (0.01, 0.5), "ep_rew_mean": (50, 150)}
    values = {key: rng.uniform(low, high, steps) for key, (low, high) in healthy.items()}
    for offset, row in CATASTROPHE.items():
        for key, value in row.items():
            values[key][steps - 1 + offset] = value
    with open(path, "wb") as f:
        f.write(_record(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2")))
        for step in range(steps):
            for key, tag in SEED_TAGS.items():
                value = summary_pb2.Summary.Value(tag=tag, simple_value=float(values[key][step]))
                f.write(_record(event_pb2.Event(wall_time=1.7e9 + step, step=step,
                                                summary=summary_pb2.Summary(value=[value]))))
    return os.path.getsize(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--loader-records", type=int, default=20_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as logdir:
        path = os.path.join(logdir, "events.out.tfevents.0.bench")
        start = time.perf_counter()
        size = write_log(path, args.steps)
        print(f"wrote {args.steps} steps x {len(SEED_TAGS)} tags ({size / 1e6:.1f} MB) "
              f"in {time.perf_counter() - start:.1f} s")

        start, cpu = time.perf_counter(), time.process_time()
        (report,) = scan(logdir)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        assert report.diverged_at == args.steps - 1, report.verdict
        assert all(s["points"] == args.steps for s in report.series.values())
        print(f"fastnorm scan: {seconds:.2f} s wall, {cpu:.2f} s CPU ({report.status} at step {report.diverged_at})")

        start, cpu = time.perf_counter(), time.process_time()
        records = 0
        for _ in EventFileLoader(path).Load():
            records += 1
            if records == args.loader_records:
                break
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        total = args.steps * len(SEED_TAGS) + 1
        print(f"tensorboard EventFileLoader: {seconds:.2f} s wall, {cpu:.2f} s CPU for {records} records; "
              f"for all {total}: about {seconds * total / records:.0f} s wall, {cpu * total / records:.0f} s CPU")


if __name__ == "__main__":
    main()
