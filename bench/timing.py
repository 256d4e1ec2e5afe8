"""How every benchmark here times code: warm up, then interleaved rounds, then medians.

Interleaving (each round runs every case once, in turn) lets all cases see the same machine
state, so a noisy neighbour slows them alike instead of one case alone. A case whose single call
takes longer than its time budget allows runs fewer rounds (never fewer than `min_rounds`): the
float64 reference at a million agents takes a second a call and would otherwise dominate the run.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass
class Case:
    """One implementation under test: `step()` runs one call (timed); `setup_seconds` is any
    one-time cost paid before (e.g. torch.compile), reported apart."""

    name: str
    step: Callable[[], object]
    note: str = ""
    setup_seconds: Optional[float] = None


@dataclass(frozen=True)
class Plan:
    """How long to measure: `warmup` calls first (fewer if they exceed `budget_s`), then
    `rounds` interleaved rounds at most, about `budget_s` seconds of timed calls per case but
    `min_rounds` calls at least."""

    rounds: int
    warmup: int
    budget_s: float
    min_rounds: int = 3


def timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
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


def interleaved_medians(cases: list[Case], device: torch.device, plan: Plan) -> dict[str, tuple[float, int]]:
    """Each case's median time in seconds and the number of timed calls it is the median of."""
    time_it = timer(device)
    targets = {}
    for case in cases:
        # Warm up until `warmup` calls or the budget is spent; the fastest warm-up call (a noisy
        # neighbour only ever slows one down) tells how many rounds the budget allows.
        warm = [time_it(case.step)]
        while len(warm) < plan.warmup and sum(warm) < plan.budget_s:
            warm.append(time_it(case.step))
        targets[case.name] = max(plan.min_rounds, min(plan.rounds, int(plan.budget_s / max(min(warm), 1e-9))))
    samples = {case.name: [] for case in cases}
    for _ in range(max(targets.values(), default=0)):
        for case in cases:
            if len(samples[case.name]) < targets[case.name]:
                samples[case.name].append(time_it(case.step))
    return {name: (statistics.median(times), len(times)) for name, times in samples.items()}


class Rotation:
    """Argument tuples that every loop built on it cycles through, each loop going on where the
    last one stopped, so that a loop starts on the tuple touched longest ago: with more than twice
    the L2 in the tuples, every call reads its input from memory, as a rollout's fresh batch is."""

    def __init__(self, args: list[tuple]):
        self.args, self.cursor = args, 0

    def loop(self, fn: Callable[..., object], calls: int) -> Callable[[], None]:
        """A step running fn on the next `calls` tuples."""
        def step():
            args, start = self.args, self.cursor
            for k in range(start, start + calls):
                fn(*args[k % len(args)])
            self.cursor = (start + calls) % len(args)
        return step


def cuda_graph(fn: Callable[[], object], calls: int, warmup: int = 3) -> "torch.cuda.CUDAGraph":
    """fn() captured `calls` times in one CUDA graph, after warm-up calls on a side stream (what
    torch.cuda.graphs' documentation asks for)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return graph
