"""Issue 23's GPU check of the CUDA running_norm kernels, in one call of about a minute on an H200:
is each prediction of bench/NOTES.md ("Issue 23: CUDA running_norm, written without a GPU") met?

For every shape of the issue: the raw op `torch.ops.fastnorm.running_norm` (both `normalize_with`
modes), a device copy of x (the memory floor) and `F.batch_norm`, timed
- eagerly: loops of calls over inputs rotated through more than 128 MB (so that beyond-L2 shapes
  read HBM), between CUDA events, 7 interleaved rounds, medians;
- as CUDA-graph replays of GRAPH_CALLS captured calls (the same rotation), the device time per call
  without the launch rate: what the L2-fitting and RL-size goals are stated in;
then the kernels' device time per call under torch.profiler at three shapes.

    python bench/cuda_variants.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import math
import statistics

import torch
import torch.nn.functional as F

import fastnorm

BEYOND_L2 = [(65536, 8, 64), (1_000_000, 1, 8), (4_000_000, 1, 8)]
FITS_L2 = [(4096, 16, 32), (1024, 256, 16), (256, 1024, 8)]
RL_SIZES = [(64, 4, 8), (4096, 1, 48), (8192, 4, 18)]
CASES = [(s, torch.float32) for s in BEYOND_L2 + FITS_L2 + RL_SIZES] + [((65536, 8, 64), torch.bfloat16)]
PROFILED = [(4096, 1, 48), (1_000_000, 1, 8), (65536, 8, 64)]
ROTATE_BYTES = 256 << 20  # > 4x the H200's 60 MB L2
MAX_BUFFERS = 64
LOOP_SECONDS = 4e-3  # device time of one eager loop
GRAPH_CALLS = 20
HYPER = (0.99, None, 1e-4, 1e-2, None, 10.0, False, False, None, None)  # momentum .. min_std_rel
DEVICE, BACKEND = "cuda", "cuda"


def rotation(shape, dtype):
    """Inputs rotated through ROTATE_BYTES (at most MAX_BUFFERS of them) and as many outputs."""
    nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    n = max(2, min(MAX_BUFFERS, math.ceil(ROTATE_BYTES / nbytes)))
    xs = [torch.randn(shape, device=DEVICE).mul_(2.0).add_(1.0).to(dtype) for _ in range(n)]
    return xs, [torch.empty_like(x) for x in xs]


def running_norm_step(shape, xs, outs, previous):
    """One call of the raw op on buffer i (statistics of a RunningNorm warmed up by one update)."""
    norm = fastnorm.RunningNorm(shape[1:], backend=BACKEND, device=DEVICE)
    norm(xs[0])
    mean, var, count, diag, steps = norm.mean, norm.var, norm.count, norm._diag, norm.steps
    op = torch.ops.fastnorm.running_norm.default

    def step(i):
        op(xs[i], None, mean, var, count, outs[i], diag, *HYPER, previous, steps)
    return step


def batch_norm_step(shape, xs, outs):
    cols = math.prod(shape[1:])
    running_mean = torch.zeros(cols, device=DEVICE)
    running_var = torch.ones(cols, device=DEVICE)
    flat = [x.view(-1, cols) for x in xs]

    def step(i):
        F.batch_norm(flat[i], running_mean, running_var, training=True, momentum=0.01)
    return step


def steps_of(shape, dtype):
    xs, outs = rotation(shape, dtype)
    steps = {"copy": lambda i: outs[i].copy_(xs[i]),
             "cuda updated": running_norm_step(shape, xs, outs, False),
             "cuda previous": running_norm_step(shape, xs, outs, True)}
    if dtype == torch.float32:
        steps["F.batch_norm"] = batch_norm_step(shape, xs, outs)
    return steps, len(xs)


def elapsed_us(fn) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3


def eager_loop(step, n_buffers, calls):
    def run():
        for k in range(calls):
            step(k % n_buffers)
    return run


def graph_replay(step, n_buffers):
    """A graph of GRAPH_CALLS calls on rotated buffers, and the function that replays it."""
    for k in range(3):  # warm-up on a side stream, as capture requires
        step(k % n_buffers)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for k in range(GRAPH_CALLS):
            step(k % n_buffers)
    return graph.replay


def medians(runs: dict, calls_per_run: dict, rounds: int) -> dict:
    """Interleaved rounds of each run; the median time per call in us."""
    samples = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            samples[name].append(elapsed_us(run) / calls_per_run[name])
    return {name: statistics.median(times) for name, times in samples.items()}


def time_case(shape, dtype, rounds):
    steps, n_buffers = steps_of(shape, dtype)
    for step in steps.values():  # warm-up (and the calibration of the loop length)
        eager_loop(step, n_buffers, 3)()
    copy_us = elapsed_us(eager_loop(steps["copy"], n_buffers, 20)) / 20
    calls = max(n_buffers, min(2000, int(LOOP_SECONDS * 1e6 / max(copy_us, 1.0))))
    eager = medians({n: eager_loop(s, n_buffers, calls) for n, s in steps.items()}, dict.fromkeys(steps, calls), rounds)
    graphs = {n: graph_replay(s, n_buffers) for n, s in steps.items()}
    replayed = medians(graphs, dict.fromkeys(steps, GRAPH_CALLS), rounds)
    return eager, replayed


def print_case(shape, dtype, eager, replayed):
    def row(label, t):
        parts = [f"copy {t['copy']:7.1f} us"]
        parts += [f"{n} {t[n]:7.1f} us ({t['copy'] / t[n]:.2f} of copy)" for n in t if n != "copy"]
        return f"  {label:6s} " + " | ".join(parts)
    mb = math.prod(shape) * torch.empty(0, dtype=dtype).element_size() / 1e6
    print(f"{str(shape):18s} {str(dtype).removeprefix('torch.'):8s} {mb:7.2f} MB")
    print(row("eager", eager))
    print(row("graph", replayed))


def device_times_per_call(shape, previous, calls=20):
    """Each kernel's device time per call of the op (torch.profiler)."""
    xs, outs = rotation(shape, torch.float32)
    step = running_norm_step(shape, xs, outs, previous)
    for k in range(3):
        step(k % len(xs))
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for k in range(calls):
            step(k % len(xs))
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        device_us = getattr(e, "device_time_total", None)
        if device_us is None:
            device_us = e.cuda_time_total
        if device_us > 0 and not e.key.startswith(("cuda", "fastnorm::", "aten::")):  # device work alone
            rows.append((e.key, e.count, device_us / calls))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA device"
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, fastnorm from {fastnorm.__file__}")
    print("per call: eager = loops over rotated inputs; graph = CUDA-graph replay of "
          f"{GRAPH_CALLS} captured calls; medians of {args.rounds} interleaved rounds")
    results = {}
    for shape, dtype in CASES:
        eager, replayed = time_case(shape, dtype, args.rounds)
        results[(shape, dtype)] = (eager, replayed)
        print_case(shape, dtype, eager, replayed)
    print("goals (issue 23): beyond the L2 updated >= 0.6 of copy, previous >= 0.85 (eager); "
          "L2-fitting >= 0.6 (graph); RL sizes <= 5 us per call (graph); faster than F.batch_norm")
    for (shape, dtype), (eager, replayed) in results.items():
        t = eager if shape in BEYOND_L2 else replayed
        verdicts = []
        if shape in RL_SIZES:
            verdicts += [f"{m} {replayed[m]:.1f} us {'ok' if replayed[m] <= 5.0 else 'MISS'}"
                         for m in ("cuda updated", "cuda previous")]
        else:
            bars = {"cuda updated": 0.6, "cuda previous": 0.85 if shape in BEYOND_L2 else 0.6}
            verdicts += [f"{m} {t['copy'] / t[m]:.2f} {'ok' if t['copy'] / t[m] >= bar else 'MISS'}"
                         for m, bar in bars.items()]
        if "F.batch_norm" in t:
            verdicts.append(f"vs batch_norm {t['F.batch_norm'] / t['cuda updated']:.2f}x")
        print(f"  {str(shape):18s} {str(dtype).removeprefix('torch.'):8s} " + "; ".join(verdicts))
    print("kernels, device time per call (torch.profiler, 20 calls, rotated inputs):")
    for shape in PROFILED:
        for previous in (False, True):
            print(f"  {str(shape):18s} {'previous' if previous else 'updated'}")
            for name, count, us in device_times_per_call(shape, previous):
                print(f"    {us:8.2f} us  x{count:<4d} {name[:110]}")


if __name__ == "__main__":
    main()
