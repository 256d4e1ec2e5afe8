"""The kernel benchmark: one update + normalize of x (B, A, F) with statistics per (agent, feature),
by every available fastnorm backend, the pure-PyTorch references, torch.compile, F.batch_norm, the
seed's normalizer and the RL libraries' normalizers (bench/peers.py), beside the memory floor.

The floor is a plain copy of x into a preallocated tensor in the same run: one read and one write
of x, the bytes every implementation must move at least. GB/s counts those bytes (2 x itemsize per
element: 8 bytes for float32), "of copy" is the copy's time over the row's, and "vs eager" the
eager float32 reference's time over the row's.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

import fastnorm
from fastnorm import reference
from fastnorm.backends import BACKENDS

from peers import peer_cases
from report import SectionResult, Table, timing_table
from seed_normalizer import RunningPerAgentWelford
from timing import Case, Plan, interleaved_medians

TITLE = "Running normalization: update + normalize of x (B, A, F), statistics per (A, F)"
SHAPES = [(4096, 16, 32), (65536, 8, 64), (1024, 256, 16), (256, 1024, 8), (1_000_000, 1, 8), (64, 4, 8)]
QUICK_SHAPES = [(4096, 16, 32), (1_000_000, 1, 8)]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PLANS = {False: Plan(rounds=21, warmup=3, budget_s=0.75), True: Plan(rounds=9, warmup=2, budget_s=0.25)}
HYPER = dict(momentum=0.99, max_count=None, eps=1e-4, min_std=1e-2, max_std=None, clip=10.0)  # fastnorm's defaults
COPY = "copy (memory floor)"
EAGER = "reference (eager, float32)"


def copy_case(x: torch.Tensor) -> Case:
    dst = torch.empty_like(x)
    return Case(COPY, lambda: dst.copy_(x))


def timed_backends(x: torch.Tensor, op: str = "running_norm") -> list[str]:
    """The fastnorm backends timed for op on x: every kernel backend that can run it and that
    "auto" may pick (so never the Triton interpreter, which is for tests)."""
    return [name for name, backend in BACKENDS.items() if name != "reference"
            and not backend.not_supported_reasons(x, op) and not backend.auto_skip_reasons(x)]


def fastnorm_case(x: torch.Tensor, stats_shape, backend: str, normalize_with: str = "updated") -> Case:
    norm = fastnorm.RunningNorm(stats_shape, backend=backend, device=x.device, normalize_with=normalize_with)
    out = torch.empty_like(x)
    if normalize_with == "updated":
        return Case(f"fastnorm {backend}", lambda: norm(x, out=out), "update + normalize, out=")
    return Case(f"fastnorm {backend}, previous", lambda: norm(x, out=out),
                "normalize_with='previous': y from the statistics before x, one pass")


def reference_float32_step(x: torch.Tensor, state: dict) -> torch.Tensor:
    """fastnorm's update and output in eager float32, the way the seed's normalizer is written
    (float32 statistics, the batch's torch.mean and torch.var), with the merge and the bounded std
    of fastnorm.reference, which keep their arguments' dtype."""
    mean, var, count = state["mean"], state["var"], state["count"]
    rows = x.reshape(-1, mean.numel()).float()
    n_b = torch.full_like(count, rows.shape[0])
    m_b, v_b = rows.mean(0), rows.var(0, unbiased=False)
    new = reference.merge_running(mean, var, count, n_b, m_b, v_b, momentum=HYPER["momentum"],
                                  max_count=HYPER["max_count"])
    for old, value in zip((mean, var, count), new):
        old.copy_(value)
    std = reference.bounded_std(var, HYPER["eps"], HYPER["min_std"], HYPER["max_std"])
    return ((rows - mean) / std).clamp(-HYPER["clip"], HYPER["clip"]).to(x.dtype).reshape(x.shape)


def reference_float64_step(x: torch.Tensor, state: dict) -> torch.Tensor:
    """fastnorm.reference itself: the float64 contract every kernel is tested against."""
    result = reference.running_norm(x, None, state["mean"], state["var"], state["count"], **HYPER)
    for name in ("mean", "var", "count"):
        state[name].copy_(getattr(result, name))
    return result.y


REFERENCE_STEPS = {torch.float32: reference_float32_step, torch.float64: reference_float64_step}


def reference_case(x: torch.Tensor, stats_shape, dtype: torch.dtype) -> Case:
    state = _fresh_state(stats_shape, x.device, dtype)
    step = REFERENCE_STEPS[dtype]
    return Case(f"reference (eager, {str(dtype).replace('torch.', '')})", lambda: step(x, state))


def compiled_reference_case(x: torch.Tensor, stats_shape) -> Case:
    torch._dynamo.reset()  # one code object compiled for many shapes would hit dynamo's recompile limit
    state = _fresh_state(stats_shape, x.device, torch.float32)
    compiled = torch.compile(reference_float32_step, dynamic=False)
    start = time.perf_counter()
    compiled(x, state)
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    return Case("torch.compile(reference float32)", lambda: compiled(x, state),
                setup_seconds=time.perf_counter() - start)


def seed_case(x: torch.Tensor, stats_shape) -> Case:
    norm = RunningPerAgentWelford(stats_shape, device=x.device)
    return Case("seed RunningPerAgentWelford", lambda: norm(x), "float32 stats, cumulative, eps 1e-6, no clamp")


def batch_norm_case(x: torch.Tensor, stats_shape) -> Case:
    cols = int(torch.Size(stats_shape).numel())
    running_mean = torch.zeros(cols, device=x.device, dtype=x.dtype)
    running_var = torch.ones(cols, device=x.device, dtype=x.dtype)
    flat = x.view(x.numel() // cols, cols)
    return Case("F.batch_norm (train)", lambda: F.batch_norm(flat, running_mean, running_var, training=True,
                                                            momentum=0.01), "no floor, no clamp: a speed peer only")


def build_cases(x: torch.Tensor, stats_shape) -> tuple[list[Case], dict[str, str]]:
    """Every case for x, the copy first, and the peers that had to be skipped (with why)."""
    cases = [copy_case(x)]
    cases += [fastnorm_case(x, stats_shape, name) for name in timed_backends(x)]
    cases += [fastnorm_case(x, stats_shape, name, "previous") for name in timed_backends(x)]
    cases += [reference_case(x, stats_shape, torch.float32), compiled_reference_case(x, stats_shape),
              reference_case(x, stats_shape, torch.float64), seed_case(x, stats_shape), batch_norm_case(x, stats_shape)]
    peers, skipped = peer_cases(x, stats_shape)
    return cases + peers, skipped


def measure(shape, dtype: torch.dtype, device: torch.device, plan: Plan) -> tuple[list[dict], dict[str, str]]:
    """One record per case for x of `shape` and `dtype`, and the skipped peers."""
    x = torch.randn(shape, device=device).to(dtype)
    cases, skipped = build_cases(x, shape[1:])
    medians = interleaved_medians(cases, device, plan)
    bytes_moved = 2 * x.numel() * x.element_size()
    copy_s, eager_s = medians[COPY][0], medians[EAGER][0]
    records = []
    for case in cases:
        seconds, calls = medians[case.name]
        records.append({"shape": list(shape), "dtype": str(dtype).replace("torch.", ""), "impl": case.name,
                        "median_us": seconds * 1e6, "calls": calls, "gb_per_s": bytes_moved / seconds / 1e9,
                        "fraction_of_copy": copy_s / seconds, "speedup_vs_eager": eager_s / seconds,
                        "setup_s": case.setup_seconds, "note": case.note})
    return records, skipped


def run(device: torch.device, quick: bool) -> SectionResult:
    shapes = QUICK_SHAPES if quick else SHAPES
    records, skipped = [], {}
    for dtype in DTYPES.values():
        for shape in shapes:
            rows, skip = measure(shape, dtype, device, PLANS[quick])
            records += rows
            for package, reason in skip.items():
                skipped.setdefault(package, [])
                if reason not in skipped[package]:
                    skipped[package].append(reason)
    tables = [detail_table(records, shape, dtype) for dtype in DTYPES for shape in shapes]
    tables += [summary_table(records, dtype, shapes, skipped) for dtype in DTYPES]
    return SectionResult(tables, {"rows": records, "skipped": skipped, "plan": vars(PLANS[quick])})


def detail_table(records: list[dict], shape, dtype: str) -> Table:
    rows = [r for r in records if tuple(r["shape"]) == tuple(shape) and r["dtype"] == dtype]
    numel = 1
    for n in shape:
        numel *= n
    return timing_table(f"{tuple(shape)} {dtype}: {numel:,} elements", rows)


def summary_table(records: list[dict], dtype: str, shapes, skipped: dict[str, list[str]]) -> Table:
    """One row per implementation, one column per shape: fraction of the copy / speed-up over eager."""
    impls = list(dict.fromkeys(r["impl"] for r in records if r["dtype"] == dtype))
    cell = {(r["impl"], tuple(r["shape"])): r for r in records if r["dtype"] == dtype}
    table = Table(f"Summary, {dtype}: fraction of the copy's speed / speed-up over the eager float32 reference",
                  ["implementation"] + [str(tuple(s)).replace(" ", "") for s in shapes])
    for impl in impls:
        table.rows.append([impl] + [f"{cell[impl, tuple(s)]['fraction_of_copy']:.3g} / "
                                    f"{cell[impl, tuple(s)]['speedup_vs_eager']:.3g}x" if (impl, tuple(s)) in cell
                                    else "-" for s in shapes])
    table.notes += [f"skipped {package}: {'; '.join(reasons)}" for package, reasons in skipped.items()]
    return table


def _fresh_state(stats_shape, device, dtype):
    like = dict(dtype=dtype, device=device)
    return {"mean": torch.zeros(stats_shape, **like).reshape(-1), "var": torch.ones(stats_shape, **like).reshape(-1),
            "count": torch.zeros(stats_shape, **like).reshape(-1)}
