"""The fastnorm benchmark: every available backend beside its peers and the memory floor.

    python bench/run.py [--device cpu|cuda] [--quick] [--json PATH]

For each shape (B, A, F) and dtype it times every case interleaved (warm-up first, then rounds
in which each case runs once, so all see the same machine state) and reports the median time,
GB/s counting one read and one write of x, the fraction of the copy's GB/s, and the speed-up
over the eager reference. Results are written to bench/results/<device>-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import running_norm as cases  # noqa: E402  (bench/running_norm.py)

import fastnorm  # noqa: E402
from fastnorm.backends import BACKENDS  # noqa: E402

SHAPES = [(4096, 16, 32), (65536, 8, 64), (1024, 256, 16), (256, 1024, 8), (1_000_000, 1, 8), (64, 4, 8)]
QUICK_SHAPES = [(4096, 16, 32), (1_000_000, 1, 8), (64, 4, 8)]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def timer(device: torch.device):
    """A function that times fn() in seconds: CUDA events on GPU, perf_counter on CPU."""
    if device.type == "cuda":
        def run(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        return run

    def run(fn):
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    return run


def build_cases(x, stats_shape):
    built = [cases.copy_case(x)]
    for name, backend in BACKENDS.items():
        if name != "reference" and not backend.not_supported_reasons(x):
            built.append(cases.fastnorm_case(x, stats_shape, name))
    built.append(cases.reference_case(x, stats_shape))
    built.append(cases.compiled_reference_case(x, stats_shape))
    built.append(cases.batch_norm_case(x, stats_shape))
    return built


def measure(shape, dtype, device, rounds, warmup):
    b, a, f = shape
    x = torch.randn(shape, device=device).to(dtype)
    built = build_cases(x, (a, f))
    time_it = timer(device)
    for case in built:
        for _ in range(warmup):
            case.step()
    samples = {case.name: [] for case in built}
    for _ in range(rounds):
        for case in built:
            samples[case.name].append(time_it(case.step))
    bytes_moved = 2 * x.numel() * x.element_size()
    copy_time = statistics.median(samples[built[0].name])
    ref_time = statistics.median(samples["reference (eager, float64)"])
    rows = []
    for case in built:
        t = statistics.median(samples[case.name])
        rows.append({"shape": list(shape), "dtype": str(dtype).replace("torch.", ""), "impl": case.name,
                     "median_us": t * 1e6, "gb_per_s": bytes_moved / t / 1e9, "fraction_of_copy": copy_time / t,
                     "speedup_vs_reference": ref_time / t, "setup_s": case.setup_seconds, "note": case.note})
    return rows


def print_table(rows):
    header = f"{'shape':>18} {'dtype':>8} {'implementation':<28} {'median us':>10} {'GB/s':>7} {'of copy':>8} {'vs ref':>7}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{str(tuple(r['shape'])):>18} {r['dtype']:>8} {r['impl']:<28} {r['median_us']:>10.1f} "
              f"{r['gb_per_s']:>7.1f} {r['fraction_of_copy']:>8.2f} {r['speedup_vs_reference']:>6.1f}x")


def environment(device):
    env = {"date": datetime.date.today().isoformat(), "device": device.type, "torch": torch.__version__,
           "python": platform.python_version(), "threads": torch.get_num_threads(), "fastnorm": fastnorm.__version__,
           "machine": platform.processor() or platform.machine()}
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
    else:
        try:
            with open("/proc/cpuinfo") as f:
                env["device_name"] = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
        except (OSError, StopIteration):
            env["device_name"] = platform.processor()
    return env


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="fewer shapes and rounds (under 2 minutes on CPU)")
    parser.add_argument("--json", help="where to write the results (default: bench/results/<device>-<date>.json)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    env = environment(device)
    print(f"fastnorm benchmark: {env['device_name']} ({device.type}), torch {env['torch']}, "
          f"{env['threads']} threads, backends: {fastnorm.backends()}")
    shapes = QUICK_SHAPES if args.quick else SHAPES
    rounds, warmup = (7, 2) if args.quick else (21, 3)
    rows = []
    for dtype_name, dtype in DTYPES.items():
        for shape in shapes:
            rows += measure(shape, dtype, device, rounds, warmup)
    print_table(rows)
    path = args.json or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                     f"{device.type}-{env['date']}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"environment": env, "results": rows}, f, indent=1)
    print(f"results written to {path}")


if __name__ == "__main__":
    main()
