"""Per-call overhead: what a call costs beyond its op, at the sizes where calls are launch- and
Python-bound (a rollout of a few thousand envs). Each row is one call, timed as the median of
interleaved rounds of `CALLS_PER_SAMPLE` back-to-back calls:

- `RunningNorm(x)`: the module call as users write it (y allocated), and with `out=`;
- the raw op: `torch.ops.fastnorm.running_norm` on preallocated buffers, all arguments positional
  (the least any Python caller pays);
- `F.batch_norm` in training mode on the same (rows, columns) view: the speed peer;
- `normalize_advantages(adv)` against its raw op on preallocated buffers and the eager formula.

"overhead us" is the call's time minus its raw op's; the goals (issue 17) are an overhead of at
most 5 us at (64, 4, 8) and a raw op no slower than F.batch_norm there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import fastnorm
from fastnorm.backends import select_backend

from report import SectionResult, Table
from timing import Case, Plan, interleaved_medians

TITLE = "Per-call overhead: a module call beside its raw op (float32)"
SHAPES = [(64, 4, 8), (4096, 1, 48), (4096, 4, 18), (8192, 4, 18)]
QUICK_SHAPES = [(64, 4, 8), (4096, 1, 48)]
CALLS_PER_SAMPLE = {False: 200, True: 50}
PLANS = {False: Plan(rounds=25, warmup=3, budget_s=0.5), True: Plan(rounds=9, warmup=2, budget_s=0.15)}
OVERHEAD_GOAL_US = 5.0
MODULE, MODULE_OUT, RAW = "RunningNorm(x)", "RunningNorm(x, out=y)", "raw op fastnorm::running_norm"
BATCH_NORM = "F.batch_norm (train)"
ADV, ADV_RAW, ADV_EAGER = "normalize_advantages(adv)", "raw op fastnorm::normalize_advantages", "eager formula"


def repeated(fn, times: int):
    def step():
        for _ in range(times):
            fn()
    return step


def running_norm_cases(x: torch.Tensor) -> list[Case]:
    stats_shape = x.shape[1:]
    norm = fastnorm.RunningNorm(stats_shape, device=x.device)
    norm(x)
    out = torch.empty_like(x)
    raw_norm = fastnorm.RunningNorm(stats_shape, device=x.device)
    mean, var, count, diag, steps = raw_norm.mean, raw_norm.var, raw_norm.count, raw_norm._diag, raw_norm.steps
    op = torch.ops.fastnorm.running_norm.default

    def raw():
        op(x, None, mean, var, count, out, diag, 0.99, None, 1e-4, 1e-2, None, 10.0, False, False, None, None, False,
           steps)

    cols = stats_shape.numel()
    flat = x.view(-1, cols)
    running_mean, running_var = torch.zeros(cols, device=x.device), torch.ones(cols, device=x.device)
    return [Case(MODULE, lambda: norm(x)), Case(MODULE_OUT, lambda: norm(x, out=out)), Case(RAW, raw),
            Case(BATCH_NORM, lambda: F.batch_norm(flat, running_mean, running_var, training=True, momentum=0.01))]


def advantage_cases(adv: torch.Tensor) -> list[Case]:
    out = torch.empty_like(adv)
    x, y = adv.view(1, 1, -1), out.view(1, 1, -1)
    stats = torch.empty((4, 1), dtype=torch.float64, device=adv.device)
    op = torch.ops.fastnorm.normalize_advantages.default
    return [Case(ADV, lambda: fastnorm.normalize_advantages(adv)),
            Case(ADV_RAW, lambda: op(x, None, y, stats, 1e-4, True)),
            Case(ADV_EAGER, lambda: (adv - adv.mean()) / (adv.std() + 1e-8))]


def run(device: torch.device, quick: bool) -> SectionResult:
    probe = torch.empty(0, device=device)
    backend = select_backend("auto", probe).name
    if backend not in ("cpu", "cuda"):
        return SectionResult([Table(TITLE, ["note"], [[f"skipped: the C++ kernels do not run on {device}"]])], {})
    times = CALLS_PER_SAMPLE[quick]
    records = []
    for shape in QUICK_SHAPES if quick else SHAPES:
        print(f"  calls {shape}", flush=True)
        x = torch.randn(shape, device=device)
        cases = running_norm_cases(x) + advantage_cases(x)
        medians = interleaved_medians([Case(c.name, repeated(c.step, times)) for c in cases], device, PLANS[quick])
        for case in cases:
            records.append({"shape": list(shape), "impl": case.name, "us": medians[case.name][0] / times * 1e6})
    return SectionResult([calls_table(records, backend)], {"rows": records, "calls_per_sample": times})


def calls_table(records: list[dict], backend: str) -> Table:
    us = {(tuple(r["shape"]), r["impl"]): r["us"] for r in records}
    shapes = list(dict.fromkeys(tuple(r["shape"]) for r in records))
    table = Table(f"{TITLE}, backend {backend}: us per call",
                  ["shape", MODULE, MODULE_OUT, RAW, "overhead us", "overhead with out= us", BATCH_NORM, ADV, ADV_RAW,
                   "adv overhead us", ADV_EAGER])
    for s in shapes:
        table.rows.append([str(s).replace(" ", "")] + [f"{us[s, name]:.1f}" for name in (MODULE, MODULE_OUT, RAW)]
                          + [f"{us[s, MODULE] - us[s, RAW]:.1f}", f"{us[s, MODULE_OUT] - us[s, RAW]:.1f}",
                             f"{us[s, BATCH_NORM]:.1f}", f"{us[s, ADV]:.1f}",
                             f"{us[s, ADV_RAW]:.1f}", f"{us[s, ADV] - us[s, ADV_RAW]:.1f}", f"{us[s, ADV_EAGER]:.1f}"])
    small = shapes[0]
    overhead, adv_overhead = us[small, MODULE] - us[small, RAW], us[small, ADV] - us[small, ADV_RAW]
    with_out = us[small, MODULE_OUT] - us[small, RAW]

    def verdict(value):
        return "met" if value <= OVERHEAD_GOAL_US else "MISSED"

    table.notes.append(f"at {small}, goal <= {OVERHEAD_GOAL_US:g} us: RunningNorm overhead {overhead:.1f} us "
                       f"({verdict(overhead)}), {with_out:.1f} us with out= ({verdict(with_out)}); normalize_advantages "
                       f"{adv_overhead:.1f} us ({verdict(adv_overhead)}); raw op {us[small, RAW]:.1f} us vs "
                       f"F.batch_norm {us[small, BATCH_NORM]:.1f} us")
    return table
