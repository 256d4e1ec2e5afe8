"""Issue 23's speed table, timed honestly, in one GPU command of about three minutes:

    python bench/gpu_speed.py [--device cuda|cpu] [--quick] [--budget-s 170] [--compile auto|first|off]
                              [--json PATH] [--md PATH]

Sections (the rows, goals and tables are in bench/gpu_speed_report.py):
- loop: x (B, A, F) beyond and near the L2, float32 and bfloat16. A sample is a loop of calls (16
  at least, about 30 ms) between CUDA events, over pairs (x, y) rotated through max(256 MB, 4 x
  L2) of distinct x, each loop going on where the last stopped, so every call reads x from memory;
  7 interleaved rounds, medians. The copy `y.copy_(x)` runs the same way in the same rounds, and
  "of copy" is its time over a column's. RunningNorm writes into y (`out=`), and at the first row
  the module call that allocates y too. F.batch_norm (training) runs on the (B, A*F) view;
  torch.compile of the seed-style formula (bench/running_norm.py's eager float32 reference) at the
  first row, and at later ones while the budget allows; its compile time is reported apart.
- small: the L2-fitting batches and the RL sizes, on one (x, y) each: CUDA-graph replay of 20
  captured calls (device time per call), and eager loops of calls (us per call: the launcher's).
- advantages: normalize_advantages of 1M and 16M float32 elements (global) into out=, beside the
  copy and the eager formula (adv - adv.mean()) / (adv.std() + 1e-8), in loops as in loop.

A case that fails (Triton missing, a compile error, a capture that breaks) is reported in its cell
with the exception's first line, and the run goes on. --budget-s shares the time left among the
rows left: rounds shrink (to 3 at least) and torch.compile is skipped at later rows when it would
not fit. Each row's line is printed as it is measured, the JSON and markdown rewritten after each
section. --quick runs every row tiny (a few thousand elements, 2 rounds; on the CPU no graphs and
Triton only under TRITON_INTERPRET=1), so that tests/test_gpu_speed.py can exercise it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Union

STARTED = time.monotonic()  # the budget counts torch's import too

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fastnorm  # noqa: E402
from fastnorm.backends import BACKENDS  # noqa: E402

import gpu_speed_report as layout  # noqa: E402
from calls import repeated  # noqa: E402
from gpu_speed_report import BATCH_NORM, COMPILE, COPY, EAGER, EAGER_FORMULA, GRAPH, MODES, column  # noqa: E402
from peers import _first_line  # noqa: E402
from report import as_markdown, as_text  # noqa: E402
from running_norm import _fresh_state, reference_float32_step  # noqa: E402
from timing import Case, Plan, Rotation, cuda_graph, interleaved_medians, timer  # noqa: E402

MB = 2**20


@dataclass(frozen=True)
class Settings:
    quick: bool
    rotate_bytes: int  # distinct x per loop row, at least (the L2 raises it on the GPU)
    loop_s: float  # the time a sample aims at
    least_calls: int  # calls per sample at least
    rounds: int
    min_rounds: int
    captured: int  # calls per CUDA graph
    most_elements: int  # per row (quick: the rows are cut to it)


FULL = Settings(False, 256 * MB, 0.03, 16, 7, 3, 20, 2**40)
QUICK = Settings(True, 2 * MB, 0.002, 2, 2, 1, 20, 4096)

# A cell's recipe: a factory making the call to time (built, not yet called) or why it is skipped.
Recipe = Union[Callable[[], Callable[..., object]], str]


class Run:
    """Where the run stands: device, settings, time left, rows left, what a compile costs."""

    def __init__(self, device: torch.device, settings: Settings, budget_s: float, compile_mode: str, rows: int):
        self.device, self.settings, self.compile_mode = device, settings, compile_mode
        self.deadline, self.rows_left = STARTED + budget_s, rows
        self.row_seconds: list[float] = []
        self.compile_s = 0.0
        self.time_it = timer(device)
        self.graphs = device.type == "cuda"
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) if self.graphs else 0
        self.rotate_bytes = max(settings.rotate_bytes, 4 * l2)

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def plan(self, cases: int) -> Plan:
        """Half of this row's share of the time left goes to timed samples, spread over its cases."""
        share = max(self.time_left(), 0.0) / max(self.rows_left, 1)
        return Plan(rounds=self.settings.rounds, warmup=1, budget_s=0.5 * share / max(cases, 1),
                    min_rounds=self.settings.min_rounds)

    def row_done(self, seconds: float) -> None:
        self.rows_left -= 1
        self.row_seconds.append(seconds)

    def compile_skip_reason(self, first: bool) -> Optional[str]:
        if self.compile_mode == "off":
            return "--compile off"
        if first:
            return None
        if self.compile_mode == "first":
            return "compiled at the first row only (--compile first)"
        row_s = max(self.row_seconds, default=0.0)  # the slowest row so far: compiling must not eat the others' time
        if self.time_left() - self.rows_left * row_s < 2 * self.compile_s:
            return f"over the time budget (a compile took {self.compile_s:.0f} s)"
        return None

    def shape(self, shape) -> tuple[int, ...]:
        """The shape timed for the issue's `shape`: itself, or cut to most_elements rows (quick)."""
        per_row = math.prod(shape[1:])
        return (max(2, min(shape[0], self.settings.most_elements // per_row)),) + tuple(shape[1:])

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def calls_for(seconds_per_call: float, target_s: float, least: int, most: int = 100_000) -> int:
    return min(most, max(least, math.ceil(target_s / max(seconds_per_call, 1e-9))))


def timed_case(run: Run, name: str, fn: Callable[..., object], rotation: Rotation, graph: bool) -> tuple[Case, int]:
    """The case timing fn (called once first: JIT, compile, allocator) and its calls per sample:
    a loop over rotation, or replays of a CUDA graph of `captured` calls on its first tuple."""
    start = time.perf_counter()
    fn(*rotation.args[0])
    run.synchronize()
    first_s = time.perf_counter() - start
    if graph:
        args, captured = rotation.args[0], run.settings.captured
        replay = cuda_graph(lambda: fn(*args), captured).replay
        replays = calls_for(run.time_it(replay), run.settings.loop_s, 1)
        return Case(name, repeated(replay, replays), setup_seconds=first_s), replays * captured
    least = run.settings.least_calls
    per_call = run.time_it(rotation.loop(fn, least)) / least
    calls = calls_for(per_call, run.settings.loop_s, least)
    return Case(name, rotation.loop(fn, calls), setup_seconds=first_s), calls


def guarded(case: Case, cells: dict) -> Case:
    """case whose step records a failure in cells instead of raising, and does nothing after one."""
    def step():
        if case.name in cells:
            return
        try:
            case.step()
        except Exception as error:
            cells[case.name] = {"failed": "while timed: " + _first_line(error)}
    return Case(case.name, step, setup_seconds=case.setup_seconds)


def measure_cells(run: Run, entries: list[tuple[str, Recipe, Rotation, bool]]) -> dict[str, dict]:
    """One cell per entry (name, recipe, rotation, graph), in order: its us per call, or why not."""
    cells, cases, calls = {}, [], {}
    for name, recipe, rotation, graph in entries:
        if isinstance(recipe, str):
            cells[name] = {"skipped": recipe}
            continue
        try:
            case, calls[name] = timed_case(run, name, recipe(), rotation, graph)
        except Exception as error:
            cells[name] = {"failed": _first_line(error)}
            continue
        cases.append(guarded(case, cells))
    medians = interleaved_medians(cases, run.device, run.plan(len(cases)))
    for case in cases:
        if case.name not in cells:
            seconds, samples = medians[case.name]
            cells[case.name] = {"us": seconds / calls[case.name] * 1e6, "calls": calls[case.name],
                                "samples": samples, "first_call_s": case.setup_seconds}
    return {name: cells[name] for name, *_ in entries}


# ---------------------------------------------------------------- the calls

def unsupported(backend: str, x: torch.Tensor, op: str) -> Optional[str]:
    reasons = BACKENDS[backend].not_supported_reasons(x, op)
    return "; ".join(reasons) if reasons else None


def running_norm_recipe(backend: str, mode: str, x: torch.Tensor, allocate: bool = False) -> Recipe:
    """RunningNorm over x's (A, F) writing into y, or allocating y; calls take (x, y, flat)."""
    def factory():
        norm = fastnorm.RunningNorm(x.shape[1:], backend=backend, device=x.device, normalize_with=mode)
        if allocate:
            return lambda x, y, flat: norm(x)
        return lambda x, y, flat: norm(x, out=y)
    return unsupported(backend, x, "running_norm") or factory


def batch_norm_recipe(x: torch.Tensor) -> Recipe:
    def factory():
        cols = math.prod(x.shape[1:])
        running_mean = torch.zeros(cols, device=x.device, dtype=x.dtype)
        running_var = torch.ones(cols, device=x.device, dtype=x.dtype)
        return lambda x, y, flat: F.batch_norm(flat, running_mean, running_var, training=True, momentum=0.01)
    return factory


def compile_recipe(x: torch.Tensor) -> Recipe:
    def factory():
        torch._dynamo.reset()  # a code object compiled for many shapes would hit dynamo's recompile limit
        state = _fresh_state(x.shape[1:], x.device, torch.float32)
        compiled = torch.compile(reference_float32_step, dynamic=False)
        return lambda x, y, flat: compiled(x, state)
    return factory


def copy_recipe() -> Recipe:
    return lambda: (lambda x, y, *flat: y.copy_(x))


def triples(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, y, x as (B, A*F)): the arguments of every running-norm call."""
    return x, torch.empty_like(x), x.view(x.shape[0], -1)


def rotated(run: Run, make: Callable[[], torch.Tensor]) -> list[torch.Tensor]:
    first = make()
    return [first] + [make() for _ in range(math.ceil(run.rotate_bytes / (first.numel() * first.element_size())) - 1)]


# ---------------------------------------------------------------- rows

def row_record(run: Run, label: str, shape, measured, dtype: str, measure: Callable[[], dict]) -> dict:
    """The row's record; an exception outside the cells (an allocation, say) fails the whole row."""
    start = time.monotonic()
    row = {"label": label, "shape": list(shape), "measured_shape": list(measured), "dtype": dtype,
           "mb": math.prod(shape) * torch.empty((), dtype=getattr(torch, dtype)).element_size() / 1e6}
    try:
        row.update(measure())
    except Exception as error:
        row.update(cells={}, error=_first_line(error))
    if run.device.type == "cuda":
        torch.cuda.empty_cache()
    row["seconds"] = time.monotonic() - start
    compile_s = row["cells"].get(COMPILE, {}).get("first_call_s")
    if compile_s is not None:  # the latest compile says what the next costs (the first one also starts inductor)
        run.compile_s = compile_s
        row["seconds"] -= compile_s
    run.row_done(row["seconds"])
    return row


def loop_row(run: Run, shape, dtype: str, first: bool, backends: list[str]) -> dict:
    measured = run.shape(shape)

    def measure():
        xs = rotated(run, lambda: torch.randn(measured, device=run.device).to(getattr(torch, dtype)))
        rotation, x = Rotation([triples(x) for x in xs]), xs[0]
        entries = [(COPY, copy_recipe(), rotation, False)]
        entries += [(column(b, m), running_norm_recipe(b, m, x), rotation, False) for b in backends for m in MODES]
        if first:
            entries.append((layout.allocating(backends[0]), running_norm_recipe(backends[0], "updated", x, True),
                            rotation, False))
        entries.append((BATCH_NORM, batch_norm_recipe(x), rotation, False))
        entries.append((COMPILE, run.compile_skip_reason(first) or compile_recipe(x), rotation, False))
        return {"buffers": len(xs), "cells": measure_cells(run, entries)}

    return row_record(run, layout.row_label(shape, dtype), shape, measured, dtype, measure)


def small_row(run: Run, shape, backends: list[str]) -> dict:
    measured = run.shape(shape)

    def measure():
        x = torch.randn(measured, device=run.device)
        single = Rotation([triples(x)])
        no_graph = None if run.graphs else f"no CUDA graphs on {run.device.type}"
        graphed = [(COPY, copy_recipe())] + [(column(b, m), running_norm_recipe(b, m, x)) for b in backends
                                             for m in MODES] + [(BATCH_NORM, batch_norm_recipe(x))]
        entries = [(GRAPH + name, no_graph or recipe, single, True) for name, recipe in graphed]
        eager = [(COPY, copy_recipe()), (BATCH_NORM, batch_norm_recipe(x))]
        for b in backends:
            eager += [(b, running_norm_recipe(b, "updated", x, allocate=True)),
                      (layout.with_out(b), running_norm_recipe(b, "updated", x)),
                      (column(b, "previous"), running_norm_recipe(b, "previous", x, allocate=True))]
        entries += [(EAGER + name, recipe, single, False) for name, recipe in eager]
        return {"cells": measure_cells(run, entries)}

    return row_record(run, layout.row_label(shape), shape, measured, "float32", measure)


def advantages_row(run: Run, numel: int, backends: list[str]) -> dict:
    measured = (run.shape((numel, 1))[0],)

    def measure():
        advs = rotated(run, lambda: torch.randn(measured, device=run.device))
        rotation = Rotation([(adv, torch.empty_like(adv)) for adv in advs])
        entries = [(COPY, lambda: (lambda adv, out: out.copy_(adv)), rotation, False)]
        for b in backends:
            recipe = unsupported(b, advs[0], "normalize_advantages") or (
                lambda b=b: (lambda adv, out: fastnorm.normalize_advantages(adv, out=out, backend=b)))
            entries.append((b, recipe, rotation, False))
        entries.append((EAGER_FORMULA, lambda: (lambda adv, out: (adv - adv.mean()) / (adv.std() + 1e-8)), rotation,
                        False))
        return {"buffers": len(advs), "cells": measure_cells(run, entries)}

    row = row_record(run, layout.size_label(numel), (numel,), measured, "float32", measure)
    row["numel"] = numel
    return row


# ---------------------------------------------------------------- the run

def environment(device: torch.device, backends: list[str]) -> dict:
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "torch": torch.__version__, "python": platform.python_version(), "device": device.type,
           "fastnorm": fastnorm.__version__, "backends": fastnorm.backends(), "backends_timed": backends}
    try:
        import triton
        env["triton"] = triton.__version__
    except Exception as error:
        env["triton"] = _first_line(error)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(name=props.name, sms=props.multi_processor_count, l2_mb=getattr(props, "L2_cache_size", 0) / 1e6,
                   memory_gb=props.total_memory / 1e9)
    return env


def progress(section: str, row: dict, run: Run) -> str:
    parts = []
    for name, cell in row["cells"].items():
        if "us" in cell:
            parts.append(f"{name} {cell['us']:.2f}")
        else:
            parts.append(f"{name} {'FAILED' if 'failed' in cell else 'skipped'}")
    if "error" in row:
        parts.append(f"row FAILED: {row['error']}")
    return (f"  {section} {row['label']} ({row['seconds']:.1f} s, {run.time_left():.0f} s left), us per call: "
            + " | ".join(parts))


def write(results: dict, json_path: Optional[str], md_path: Optional[str]) -> None:
    """The results so far (goals of the sections not yet run: NOT MEASURED), as JSON and markdown."""
    results["goals"] = layout.goals(results["sections"], results["environment"]["backends_timed"])
    results["seconds"] = time.monotonic() - STARTED
    if json_path:
        with open(json_path, "w") as f:
            json.dump(results, f, indent=1)
    if md_path:
        lines = [f"## Issue 23 speed: {results['environment'].get('name', results['environment']['device'])}, "
                 f"torch {results['environment']['torch']}, {results['environment']['date']}", ""]
        lines += [as_markdown(t) + "\n" for t in layout.tables(results)]
        lines += ["### Goals", ""] + [f"- {layout.goal_line(g)}" for g in results["goals"]]
        with open(md_path, "w") as f:
            f.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="every row tiny, 2 rounds (a test's run)")
    parser.add_argument("--budget-s", type=float, default=170.0, help="seconds the whole run should fit in")
    parser.add_argument("--compile", choices=["auto", "first", "off"], default=None,
                        help="torch.compile's column: the first row and later ones the budget allows (auto, the "
                             "default), the first row only, or none (the default with --quick)")
    parser.add_argument("--json", help="write every cell, the settings and the goals here")
    parser.add_argument("--md", help="write the tables and the goal lines here, as markdown")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    settings = QUICK if args.quick else FULL
    compile_mode = args.compile or ("off" if args.quick else "auto")
    backends = ["cuda" if device.type == "cuda" else "cpu", "triton"]
    sections = {"loop": layout.LOOP_ROWS, "small": layout.SMALL_ROWS, "advantages": layout.ADVANTAGE_SIZES}
    run = Run(device, settings, args.budget_s, compile_mode, sum(len(rows) for rows in sections.values()))
    results = {"environment": environment(device, backends), "settings": {**asdict(settings), "budget_s": args.budget_s,
               "compile": compile_mode, "rotate_bytes": run.rotate_bytes}, "sections": {}}
    env = results["environment"]
    print(f"issue 23 speed on {env.get('name', device.type)}: torch {env['torch']}, triton {env['triton']}, "
          f"budget {args.budget_s:g} s, distinct inputs per loop row {run.rotate_bytes / 1e6:.0f} MB", flush=True)

    for section, rows in sections.items():
        print(f"== {section} ({len(rows)} rows)", flush=True)
        records = results["sections"][section] = []
        for i, row in enumerate(rows):
            if section == "loop":
                record = loop_row(run, row[0], row[1], i == 0, backends)
            elif section == "small":
                record = small_row(run, row, backends)
            else:
                record = advantages_row(run, row, backends)
            records.append(record)
            print(progress(section, record, run), flush=True)
        write(results, args.json, args.md)

    write(results, args.json, args.md)
    print()
    for table in layout.tables(results):
        print(as_text(table) + "\n")
    print("Goals (issue 23):")
    for goal in results["goals"]:
        print(layout.goal_line(goal))
    print(f"\n{results['seconds']:.0f} s in all (budget {args.budget_s:g} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
