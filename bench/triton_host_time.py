"""The Triton backend's eager call on a GPU (issue 23): host time per call against F.batch_norm, where
that time goes (cProfile), and the reduce kernel's device time at (65536, 8, 64) fp32 over a sweep of
its launch plan (rows a step, programs, warps).

    python bench/triton_host_time.py [--sweep]

Host time: rounds of 200 back-to-back calls on one input, synchronized at the end of each round;
for these small shapes the loop is bound by the host (the device finishes each call sooner), so the
time per call is the host's. Device time: CUDA events around 20 launches over inputs rotated
through more than twice the L2.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time

import torch
import torch.nn.functional as F

from fastnorm import RunningNorm

SHAPES = [(64, 4, 8), (4096, 1, 48), (8192, 4, 18), (65536, 8, 64)]


def per_call_us(fn, calls: int = 200, rounds: int = 7) -> float:
    fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        samples.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(samples)


def host_time() -> None:
    print("| x (B, A, F) | triton updated | triton previous | F.batch_norm | ratio (updated / batch_norm) |")
    print("|---|---|---|---|---|")
    for shape in SHAPES:
        x = torch.randn(shape, device="cuda")
        times = []
        for mode in ("updated", "previous"):
            norm = RunningNorm(shape[1:], backend="triton", normalize_with=mode, device="cuda")
            times.append(per_call_us(lambda: norm(x)))
        flat = x.view(-1, shape[1] * shape[2])
        mean, var = torch.zeros(flat.shape[1], device="cuda"), torch.ones(flat.shape[1], device="cuda")
        bn = per_call_us(lambda: F.batch_norm(flat, mean, var, training=True, momentum=0.01))
        print(f"| {shape} | {times[0]:.1f} us | {times[1]:.1f} us | {bn:.1f} us | {times[0] / bn:.2f} |")
    x = torch.randn(4096, 1, 48, device="cuda")
    norm = RunningNorm((1, 48), backend="triton", device="cuda")
    norm(x)
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(500):
        norm(x)
    profile.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(20)
    print("cProfile of 500 calls at (4096, 1, 48):\n" + text.getvalue()[-6000:])


def reduce_sweep() -> None:
    from fastnorm.triton_kernels.running_norm import Blocks, launch_batch_moments

    rows, cols = 65536, 512
    inputs = [torch.randn(rows, cols, device="cuda") for _ in range(4)]  # 4 x 134 MB: beyond the L2
    table = torch.empty(6, cols, dtype=torch.float64, device="cuda")
    print("| BLOCK_R | splits | warps | programs | reduce + merge (us) |")
    print("|---|---|---|---|---|")
    for block_r in (32, 64, 128):
        for splits in (64, 128, 256):
            for warps in (4, 8):
                blocks = Blocks(rows=block_r, cols=64, rows_per_split=-(-rows // splits // block_r) * block_r, merge=8,
                                num_warps=warps)
                launch_batch_moments(inputs[0], None, table, blocks=blocks)  # compiles
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for i in range(20):
                    launch_batch_moments(inputs[i % 4], None, table, blocks=blocks)
                end.record()
                torch.cuda.synchronize()
                grid = blocks.grid(rows, cols)
                print(f"| {block_r} | {grid[1]} | {warps} | {grid[0] * grid[1]} | {start.elapsed_time(end) / 20 * 1e3:.1f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--sweep", action="store_true", help="also time the reduce kernel's launch plans")
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__)
    host_time()
    if args.sweep:
        reduce_sweep()
