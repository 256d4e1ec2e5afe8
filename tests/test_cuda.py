"""The C++/CUDA backend on a GPU: both launch paths against the float64 reference, opcheck,
torch.compile with CUDA graphs, explicit graph capture and replay, streams, determinism and the
number of launches, for running_norm, the split pair batch_moments / merge_normalize,
normalize_advantages and its split pair advantage_moments / normalize_advantages_from. Skipped
without a GPU and the CUDA kernels. (On a GPU the default test device is cuda, so the whole
RunningNorm, split and advantages suites also run on this backend; tests/test_cuda_emulated*.py
run the same kernels on the CPU.)
"""

from __future__ import annotations

import pytest
import torch

from fastnorm import RunningNorm, _ops, advantages_reference, normalize_advantages, reference
from fastnorm.advantages import AdvantageStats, reduced_dims
from helpers import DTYPES, STAT_TOL, Y_TOL, assert_diag_close, assert_stats_close, expected_step, random_mask, randn

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or not _ops.has_kernel("running_norm", "CUDA"),
    reason="needs a GPU and fastnorm built with its CUDA kernels",
)

needs_split_kernels = pytest.mark.skipif(
    not all(_ops.has_kernel(op, "CUDA") for op in ("batch_moments", "merge_normalize")),
    reason="fastnorm._C has no CUDA kernels for batch_moments and merge_normalize",
)
needs_advantages_kernel = pytest.mark.skipif(not _ops.has_kernel("normalize_advantages", "CUDA"),
                                             reason="fastnorm._C has no CUDA kernel for normalize_advantages")
needs_advantage_split_kernels = pytest.mark.skipif(
    not all(_ops.has_kernel(op, "CUDA") for op in ("normalize_advantages", "advantage_moments",
                                                   "normalize_advantages_from")),
    reason="fastnorm._C has no CUDA kernels for advantage_moments and normalize_advantages_from",
)

CUDA = torch.device("cuda")
SHAPE = (3, 8)
# Rows per batch: few enough for one launch (reduce, merge, normalize), or enough for the grid to
# split the rows (reduce with a last-arriving-block merge, then a normalize launch).
ROWS = {"one_launch": 40, "row_splits": 20000}
HYPER = dict(momentum=0.99, max_count=None, eps=1e-4, min_std=1e-2, max_std=None, clip=2.5)


def make_mask(kind, rows, gen):
    if kind == "none":
        return None
    shape = {"rows": (rows,), "agents": (rows, SHAPE[0]), "elements": (rows, *SHAPE)}[kind]
    return random_mask(shape, gen, CUDA)


def device_activities(prof):
    """Names of the device activities (kernels, memsets, copies) a profiler recorded, in order."""
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return [e.name for e in sorted(events, key=lambda e: e.time_range.start)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", list(ROWS))
@pytest.mark.parametrize("mask_kind", ["none", "rows", "agents", "elements"])
def test_matches_reference(gen, dtype, path, mask_kind):
    norm = RunningNorm(SHAPE, clip=2.5, backend="cuda", device=CUDA)
    for _ in range(2):
        x = randn((ROWS[path], *SHAPE), gen, dtype=dtype, device=CUDA, mean=1.0, scale=2.0)
        mask = make_mask(mask_kind, ROWS[path], gen)
        expected = expected_step(norm, x, mask)
        out = torch.full_like(x, float("nan"))
        norm(x, mask=mask, out=out)
        torch.testing.assert_close(out, expected.y, **Y_TOL[dtype])
        assert_stats_close(norm, expected, dtype, scale=2.0)
        assert_diag_close(norm._diag, expected.diag, dtype, scale=2.0)


@pytest.mark.parametrize("path", list(ROWS))
def test_non_finite_and_huge_values(gen, path):
    rows = ROWS[path]
    x = randn((rows, *SHAPE), gen, device=CUDA)
    x[3, 0, 0] = float("nan")
    x[rows // 2, 1, 2] = float("inf")
    x[rows - 1, 1, 2] = float("-inf")
    x[:, 2, 5] = float("nan")  # a column without a finite entry
    x[:, 0, 7] = randn((rows,), gen, device=CUDA, scale=1e30)  # float32 squares overflow
    norm = RunningNorm(SHAPE, clip=2.5, backend="cuda", device=CUDA)
    expected = expected_step(norm, x)
    y = norm(x)
    torch.testing.assert_close(y, expected.y, **Y_TOL[torch.float32], equal_nan=True)
    torch.testing.assert_close(norm.count, expected.count, rtol=0, atol=0)
    torch.testing.assert_close(norm.mean, expected.mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(norm.var, expected.var, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(norm._diag[[0, 3]], expected.diag[[0, 3]], rtol=0, atol=0)


@pytest.mark.parametrize("with_out", [True, False])
@pytest.mark.parametrize("mask_kind", ["none", "agents"])
@pytest.mark.parametrize("path", list(ROWS))
def test_opcheck(gen, with_out, mask_kind, path):
    rows = ROWS[path]
    x = randn((rows, *SHAPE), gen, device=CUDA)
    stats = [randn(SHAPE, gen, device=CUDA).double(), torch.rand(SHAPE, generator=gen).double().to(CUDA) + 0.5,
             torch.full(SHAPE, 7.0, dtype=torch.float64, device=CUDA)]
    out = torch.empty_like(x) if with_out else None
    diag = torch.empty(6, 24, dtype=torch.float64, device=CUDA)
    args = (x, make_mask(mask_kind, rows, gen), *stats, out, diag)
    torch.library.opcheck(torch.ops.fastnorm.running_norm.default, args, HYPER)
    bounds = dict(eps=1e-4, min_std=1e-2, max_std=None, clip=2.5)
    torch.library.opcheck(torch.ops.fastnorm.normalize.default, (x, stats[0], stats[1], torch.empty_like(x)), bounds)


@pytest.mark.parametrize("path", list(ROWS))
def test_compile_reduce_overhead_uses_cuda_graphs(gen, path):
    from torch._dynamo.utils import counters

    counters.clear()
    torch._dynamo.reset()
    norm = RunningNorm(SHAPE, backend="cuda", device=CUDA)
    shadow = RunningNorm(SHAPE, backend="reference", device=CUDA)

    @torch.compile(fullgraph=True, mode="reduce-overhead")
    def step(x, mask):
        return norm(x, mask=mask) * 2.0

    for _ in range(6):  # warm-up, recording, then replays
        x = randn((ROWS[path], *SHAPE), gen, device=CUDA)
        mask = make_mask("agents", ROWS[path], gen)
        torch.compiler.cudagraph_mark_step_begin()
        y = step(x, mask).clone()
        expected = shadow(x, mask=mask) * 2.0
        torch.testing.assert_close(y, expected, **Y_TOL[torch.float32])
        torch.testing.assert_close(norm.mean, shadow.mean, rtol=2e-6, atol=2e-6)
        torch.testing.assert_close(norm.var, shadow.var, rtol=2e-6, atol=2e-6)
    assert int(norm.steps) == 6
    assert counters["inductor"]["cudagraph_skips"] == 0


@pytest.mark.parametrize("path", list(ROWS))
def test_cuda_graph_replays_advance_the_statistics(gen, path):
    rows = ROWS[path]
    norm = RunningNorm(SHAPE, backend="cuda", device=CUDA)
    static_x = randn((rows, *SHAPE), gen, device=CUDA)
    static_mask = make_mask("elements", rows, gen)
    static_y = torch.empty_like(static_x)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as torch.cuda.graph asks
        norm(static_x, mask=static_mask, out=static_y)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        norm(static_x, mask=static_mask, out=static_y)
    for replay in range(4):
        static_x.copy_(randn((rows, *SHAPE), gen, device=CUDA, mean=float(replay), scale=2.0))
        static_mask.copy_(make_mask("elements", rows, gen))
        expected = expected_step(norm, static_x, static_mask)
        graph.replay()
        torch.testing.assert_close(static_y, expected.y, **Y_TOL[torch.float32])
        assert_stats_close(norm, expected, torch.float32, scale=2.0 + replay)
        assert_diag_close(norm._diag, expected.diag, torch.float32, scale=2.0 + replay)
    assert int(norm.steps) == 1 + 4


@pytest.mark.parametrize("path", list(ROWS))
def test_runs_on_the_current_stream(gen, path):
    # x is written on `stream` after a long sleep: a kernel launched on any other stream would read
    # it too early (NaN) and fail the comparison.
    rows = ROWS[path]
    x_ready = randn((rows, *SHAPE), gen, device=CUDA)
    x = torch.full_like(x_ready, float("nan"))
    norm = RunningNorm(SHAPE, backend="cuda", device=CUDA)
    expected = expected_step(norm, x_ready)
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        torch.cuda._sleep(50_000_000)
        x.copy_(x_ready)
        y = norm(x)
    stream.synchronize()
    torch.testing.assert_close(y, expected.y, **Y_TOL[torch.float32])
    assert_stats_close(norm, expected, torch.float32)


def test_concurrent_calls_on_two_streams(gen):
    rows = ROWS["row_splits"]
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    norms = [RunningNorm(SHAPE, backend="cuda", device=CUDA) for _ in streams]
    xs = [randn((rows, *SHAPE), gen, device=CUDA, mean=float(i)) for i in range(2)]
    expected = [expected_step(n, x) for n, x in zip(norms, xs)]
    torch.cuda.synchronize()
    ys = []
    for stream, norm, x in zip(streams, norms, xs):
        with torch.cuda.stream(stream):
            ys.append(norm(x))
    torch.cuda.synchronize()
    for norm, y, e in zip(norms, ys, expected):
        torch.testing.assert_close(y, e.y, **Y_TOL[torch.float32])
        assert_stats_close(norm, e, torch.float32)


@pytest.mark.parametrize("path", list(ROWS))
def test_results_are_deterministic(gen, path):
    x = randn((ROWS[path], *SHAPE), gen, device=CUDA, dtype=torch.bfloat16)
    mask = make_mask("agents", ROWS[path], gen)
    results = []
    for _ in range(2):
        norm = RunningNorm(SHAPE, backend="cuda", device=CUDA)
        y = norm(x, mask=mask)
        results.append((y, norm.mean.clone(), norm.var.clone(), norm._diag.clone()))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("path, launches", [("one_launch", ["running_norm_kernel"]),
                                            ("row_splits", ["Memset", "running_norm_kernel", "normalize_kernel"])])
def test_number_of_launches(gen, path, launches):
    rows = ROWS[path]
    x = randn((rows, *SHAPE), gen, device=CUDA)
    stats = [torch.zeros(SHAPE, dtype=torch.float64, device=CUDA), torch.ones(SHAPE, dtype=torch.float64, device=CUDA),
             torch.zeros(SHAPE, dtype=torch.float64, device=CUDA)]
    out = torch.empty_like(x)
    diag = torch.empty(6, 24, dtype=torch.float64, device=CUDA)
    args = (x, None, *stats, out, diag)
    torch.ops.fastnorm.running_norm(*args, **HYPER)  # plans and occupancy queries cached
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        torch.ops.fastnorm.running_norm(*args, **HYPER)
        torch.cuda.synchronize()
    names = device_activities(prof)
    assert len(names) == len(launches) and all(want in name for want, name in zip(launches, names)), names


# A RunningNorm call, once its plan is cached: one kernel when the batch fits one launch (the
# update, diag and the step counter inside it), else the counters' memset, the reduce and the
# normalize launch (which, with normalize_with="previous" and every column with a history, reads no
# x: the reduce wrote y).
@pytest.mark.parametrize("normalize_with", ["updated", "previous"])
@pytest.mark.parametrize("path, launches", [("one_launch", ["running_norm_kernel"]),
                                            ("row_splits", ["Memset", "running_norm_kernel", "normalize_kernel"])])
def test_running_norm_call_launches(gen, normalize_with, path, launches):
    rows = ROWS[path]
    norm = RunningNorm(SHAPE, backend="cuda", device=CUDA, normalize_with=normalize_with)
    x = randn((rows, *SHAPE), gen, device=CUDA)
    mask = make_mask("agents", rows, gen)
    out = torch.empty_like(x)
    norm(x, mask=mask, out=out)  # plans and occupancy queries cached; every column gets a history
    torch.cuda.synchronize()
    for call_mask in (mask, None):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            norm(x, mask=call_mask, out=out)
            torch.cuda.synchronize()
        names = device_activities(prof)
        assert len(names) == len(launches) and all(want in name for want, name in zip(launches, names)), names
    assert int(norm.steps) == 3


@needs_advantages_kernel
@pytest.mark.parametrize("path", list(ROWS))
def test_rollout_step_replays_in_a_cuda_graph_as_it_runs_eagerly(gen, path):
    # A rollout step: observations through RunningNorm in both modes (updating), advantages through
    # normalize_advantages; captured once, replayed on new inputs copied into the static tensors,
    # and run eagerly on the same inputs by twin modules: the same bits everywhere.
    rows = ROWS[path]

    def norms():
        return [RunningNorm(SHAPE, backend="cuda", device=CUDA, normalize_with=w, clip=2.5)
                for w in ("updated", "previous")]

    def step(modules, x, mask, adv):
        ys = [m(x, mask=mask) for m in modules]
        normalized, stats = normalize_advantages(adv, mask=mask[:, 0].contiguous(), dim=0, backend="cuda")
        return ys, normalized, stats

    graphed, eager = norms(), norms()
    static_x = randn((rows, *SHAPE), gen, device=CUDA)
    static_mask = make_mask("agents", rows, gen)
    static_adv = randn((rows, 4), gen, device=CUDA)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as torch.cuda.graph asks
        step(graphed, static_x, static_mask, static_adv)
    torch.cuda.current_stream().wait_stream(side)
    step(eager, static_x, static_mask, static_adv)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step(graphed, static_x, static_mask, static_adv)
    for replay in range(4):
        x = randn((rows, *SHAPE), gen, device=CUDA, mean=2.0 * replay, scale=1.0 + replay)
        mask = make_mask("agents", rows, gen)
        adv = randn((rows, 4), gen, device=CUDA, mean=float(replay))
        static_x.copy_(x)
        static_mask.copy_(mask)
        static_adv.copy_(adv)
        graph.replay()
        ys, normalized, stats = step(eager, x, mask, adv)
        torch.cuda.synchronize()
        for got, want in zip(static_out[0], ys):
            assert torch.equal(got, want)
        assert torch.equal(static_out[1], normalized)
        assert all(torch.equal(a, b) for a, b in zip(static_out[2], stats))
        for g, e in zip(graphed, eager):
            for name in ("mean", "var", "count", "steps", "_diag"):
                assert torch.equal(getattr(g, name), getattr(e, name)), name
    assert [int(g.steps) for g in graphed] == [1 + 4, 1 + 4]
    assert not torch.equal(static_out[0][0], static_out[0][1])  # the modes differ once there is a history


def test_normalize_matches_reference(gen):
    norm = RunningNorm(SHAPE, backend="cuda", device=CUDA)
    norm(randn((500, *SHAPE), gen, device=CUDA))
    norm.eval()
    for dtype in DTYPES:
        x = randn((300, *SHAPE), gen, dtype=dtype, device=CUDA, scale=3.0)
        expected = reference.normalize(x, norm.mean, norm.var, eps=norm.eps, min_std=norm.min_std,
                                       max_std=norm.max_std, clip=norm.clip)
        torch.testing.assert_close(norm(x), expected, **Y_TOL[dtype])


# ---------------------------------------------------------------- batch_moments and merge_normalize


def fresh_stats():
    f64 = dict(dtype=torch.float64, device=CUDA)
    return [torch.zeros(SHAPE, **f64), torch.ones(SHAPE, **f64), torch.zeros(SHAPE, **f64)]


def moments_of(x, mask):
    moments = torch.full((6, *SHAPE), float("nan"), dtype=torch.float64, device=CUDA)
    torch.ops.fastnorm.batch_moments(x, mask, moments)
    return moments


@needs_split_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", list(ROWS))
@pytest.mark.parametrize("mask_kind", ["none", "agents", "elements"])
def test_split_ops_give_every_shard_the_concatenated_batch(gen, dtype, path, mask_kind):
    sizes = (ROWS[path], 0, 7)  # unequal shards, one empty
    x = randn((sum(sizes), *SHAPE), gen, dtype=dtype, device=CUDA, mean=1.0, scale=2.0)
    x[1, 0, 0] = float("nan")
    mask = make_mask(mask_kind, sum(sizes), gen)
    masks = mask.split(sizes) if mask is not None else [None] * len(sizes)
    parts = torch.stack([moments_of(xp, mp) for xp, mp in zip(x.split(sizes), masks)])
    tol = STAT_TOL[dtype]
    for part, xp, mp in zip(parts, x.split(sizes), masks):
        want = reference.batch_moment_table(xp, mp, torch.Size(SHAPE))
        assert torch.equal(part[[0, 3, 4, 5]], want[[0, 3, 4, 5]])  # counts, min, max: exact
        torch.testing.assert_close(part[1], want[1], rtol=tol["rtol"], atol=tol["atol"] * 2.0)
        torch.testing.assert_close(part[2], want[2], rtol=tol["rtol"], atol=tol["atol"] * 4.0 * float(want[0].max()))
    expected = reference.running_norm(x, mask, *fresh_stats(), **HYPER)
    states, ys, diags = [], [], []
    for xp, mp in zip(x.split(sizes), masks):
        states.append(fresh_stats())
        ys.append(torch.full_like(xp, float("nan")))
        diags.append(torch.full((6, 24), float("nan"), dtype=torch.float64, device=CUDA))
        torch.ops.fastnorm.merge_normalize(xp, mp, parts, *states[-1], ys[-1], diags[-1], **HYPER)
    for state, diag in zip(states[1:], diags[1:]):  # the same parts, the same bits
        assert all(torch.equal(a, b) for a, b in zip(state, states[0]))
        assert torch.equal(diag[[0, 1, 2, 3, 5]], diags[0][[0, 1, 2, 3, 5]])
    assert torch.equal(states[0][2], expected.count)
    torch.testing.assert_close(states[0][0], expected.mean, rtol=tol["rtol"], atol=tol["atol"] * 2.0)
    torch.testing.assert_close(states[0][1], expected.var, rtol=tol["rtol"], atol=tol["atol"] * 4.0)
    torch.testing.assert_close(torch.cat(ys), expected.y, equal_nan=True, **Y_TOL[dtype])
    merged_diag = diags[0].clone()
    merged_diag[4] = sum(d[4] for d in diags)  # clipped: each shard counts its own entries
    assert_diag_close(merged_diag, expected.diag, dtype, scale=2.0)


@needs_split_kernels
@pytest.mark.parametrize("path", list(ROWS))
def test_split_ops_one_part_is_running_norm_bit_for_bit(gen, path):
    x = randn((ROWS[path], *SHAPE), gen, device=CUDA, dtype=torch.bfloat16)
    mask = make_mask("elements", ROWS[path], gen)
    fused, split = fresh_stats(), fresh_stats()
    y_fused, y = torch.empty_like(x), torch.empty_like(x)
    diag_fused, diag = (torch.empty(6, 24, dtype=torch.float64, device=CUDA) for _ in range(2))
    torch.ops.fastnorm.running_norm(x, mask, *fused, y_fused, diag_fused, **HYPER)
    torch.ops.fastnorm.merge_normalize(x, mask, moments_of(x, mask)[None], *split, y, diag, **HYPER)
    assert torch.equal(y, y_fused) and torch.equal(diag, diag_fused)
    assert all(torch.equal(a, b) for a, b in zip(split, fused))


@needs_split_kernels
@pytest.mark.parametrize("with_out", [True, False])
@pytest.mark.parametrize("path", list(ROWS))
def test_split_ops_opcheck(gen, with_out, path):
    rows = ROWS[path]
    x = randn((rows, *SHAPE), gen, device=CUDA)
    mask = make_mask("agents", rows, gen)
    torch.library.opcheck(torch.ops.fastnorm.batch_moments.default,
                          (x, mask, torch.empty(6, *SHAPE, dtype=torch.float64, device=CUDA)))
    parts = torch.stack([moments_of(randn((rows, *SHAPE), gen, device=CUDA), None) for _ in range(3)])
    out = torch.empty_like(x) if with_out else None
    args = (x, mask, parts, *fresh_stats(), out, torch.empty(6, 24, dtype=torch.float64, device=CUDA))
    torch.library.opcheck(torch.ops.fastnorm.merge_normalize.default, args, HYPER)


@needs_split_kernels
@pytest.mark.parametrize("path", list(ROWS))
def test_split_ops_replay_in_a_cuda_graph(gen, path):
    rows = ROWS[path]
    static_x = randn((rows, *SHAPE), gen, device=CUDA)
    static_mask = make_mask("elements", rows, gen)
    parts = torch.empty(1, 6, *SHAPE, dtype=torch.float64, device=CUDA)
    stats, shadow = fresh_stats(), fresh_stats()
    y = torch.empty_like(static_x)
    diag = torch.empty(6, 24, dtype=torch.float64, device=CUDA)

    def step():
        torch.ops.fastnorm.batch_moments(static_x, static_mask, parts[0])
        torch.ops.fastnorm.merge_normalize(static_x, static_mask, parts, *stats, y, diag, **HYPER)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture
        step()
    torch.cuda.current_stream().wait_stream(side)
    expected = reference.running_norm(static_x, static_mask, *shadow, **HYPER)
    shadow = [expected.mean, expected.var, expected.count]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for replay in range(3):
        static_x.copy_(randn((rows, *SHAPE), gen, device=CUDA, mean=float(replay), scale=2.0))
        static_mask.copy_(make_mask("elements", rows, gen))
        expected = reference.running_norm(static_x, static_mask, *shadow, **HYPER)
        shadow = [expected.mean, expected.var, expected.count]
        graph.replay()
        torch.testing.assert_close(y, expected.y, **Y_TOL[torch.float32])
        torch.testing.assert_close(stats[0], expected.mean, rtol=2e-6, atol=2e-6 * (2.0 + replay))
        torch.testing.assert_close(stats[1], expected.var, rtol=2e-6, atol=2e-6 * (2.0 + replay) ** 2)
        assert torch.equal(stats[2], expected.count)
        assert_diag_close(diag, expected.diag, torch.float32, scale=2.0 + replay)


@needs_split_kernels
@pytest.mark.parametrize("path, moments_launches", [("one_launch", ["running_norm_kernel"]),
                                                    ("row_splits", ["Memset", "running_norm_kernel"])])
def test_split_ops_number_of_launches(gen, path, moments_launches):
    rows = ROWS[path]
    x = randn((rows, *SHAPE), gen, device=CUDA)
    moments = torch.empty(1, 6, *SHAPE, dtype=torch.float64, device=CUDA)
    stats, out = fresh_stats(), torch.empty_like(x)
    diag = torch.empty(6, 24, dtype=torch.float64, device=CUDA)
    for expected_names, call in [
        (moments_launches, lambda: torch.ops.fastnorm.batch_moments(x, None, moments[0])),
        (["merge_parts_kernel", "normalize_kernel"],
         lambda: torch.ops.fastnorm.merge_normalize(x, None, moments, *stats, out, diag, **HYPER)),
    ]:
        call()  # plans and occupancy queries cached
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            call()
            torch.cuda.synchronize()
        names = device_activities(prof)
        assert len(names) == len(expected_names) and all(w in n for w, n in zip(expected_names, names)), names


# ---------------------------------------------------------------- normalize_advantages

# (shape, dim, mask shape) per layout and the kernels one call launches: one run of every entry
# (G == 1, odd: scalar loads, over 1024 pieces: a block merges them), runs per group cut into
# pieces, columns (16 groups, each over 256 x 64 rows; the mask covers the first dim only, so it is
# expanded per row; enough rows for batch_moments' split reduce).
ADVANTAGE_CASES = {
    "one_run": (((3_000_001,), None, (3_000_001,)), ["reduce_one_run_kernel", "normalize_runs_kernel"]),
    "runs_per_group": (((40, 8_192), 1, (40,)), ["reduce_runs_kernel", "merge_groups_kernel", "normalize_runs_kernel"]),
    "columns": (((256, 64, 16), (0, 1), (256,)), ["expand_mask_kernel", "Memset", "running_norm_kernel",
                                                  "normalize_columns_kernel"]),
}
# advantage_moments of the same cases: the fused op's reduce, then the merge that the fused op
# leaves to its normalize kernel where it can (one run, columns of a group each).
ADVANTAGE_MOMENTS_LAUNCHES = {
    "one_run": ["reduce_one_run_kernel", "merge_one_run_kernel"],
    "runs_per_group": ["reduce_runs_kernel", "merge_groups_kernel"],
    "columns": ["expand_mask_kernel", "Memset", "running_norm_kernel", "merge_groups_kernel"],
}


def expected_advantages(adv, mask, dim):
    return advantages_reference.normalize_advantages(adv, mask, reduced_dims(dim, adv.dim()))


def assert_advantages_close(y, stats, ref, scale=1.0):
    torch.testing.assert_close(y, ref.y, **Y_TOL[torch.float32])
    assert torch.equal(stats.count, ref.count)
    torch.testing.assert_close(stats.mean, ref.mean, rtol=2e-6, atol=2e-6 * scale)
    torch.testing.assert_close(stats.std_raw, ref.std_raw, rtol=2e-6, atol=2e-6 * scale)
    torch.testing.assert_close(stats.norm_max_abs, ref.norm_max_abs, rtol=1e-5, atol=1e-5)


@needs_advantages_kernel
@pytest.mark.parametrize("case", list(ADVANTAGE_CASES))
def test_advantages_replay_in_a_cuda_graph(gen, case):
    (shape, dim, mask_shape), _ = ADVANTAGE_CASES[case]
    static_adv = randn(shape, gen, device=CUDA)
    static_mask = random_mask(mask_shape, gen, CUDA)
    out = torch.empty_like(static_adv)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture
        normalize_advantages(static_adv, mask=static_mask, dim=dim, out=out, backend="cuda")
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _, stats = normalize_advantages(static_adv, mask=static_mask, dim=dim, out=out, backend="cuda")
    for replay in range(3):
        static_adv.copy_(randn(shape, gen, device=CUDA, mean=float(replay), scale=1.0 + replay))
        static_mask.copy_(random_mask(mask_shape, gen, CUDA))
        out.fill_(float("nan"))
        graph.replay()
        assert_advantages_close(out, stats, expected_advantages(static_adv, static_mask, dim), scale=1.0 + replay)


@needs_advantages_kernel
@pytest.mark.parametrize("case", list(ADVANTAGE_CASES))
def test_advantages_compile_reduce_overhead_uses_cuda_graphs(gen, case):
    from torch._dynamo.utils import counters

    (shape, dim, mask_shape), _ = ADVANTAGE_CASES[case]
    counters.clear()
    torch._dynamo.reset()

    @torch.compile(fullgraph=True, mode="reduce-overhead")
    def step(adv, mask):
        y, stats = normalize_advantages(adv, mask=mask, dim=dim, backend="cuda")
        return y * 2.0, stats.std_raw, stats.std_below_floor

    for _ in range(4):  # warm-up, recording, then replays
        adv = randn(shape, gen, device=CUDA)
        mask = random_mask(mask_shape, gen, CUDA)
        torch.compiler.cudagraph_mark_step_begin()
        y, std, below = (t.clone() for t in step(adv, mask))
        ref = expected_advantages(adv, mask, dim)
        torch.testing.assert_close(y, ref.y.float() * 2.0, rtol=4e-5, atol=4e-5)
        torch.testing.assert_close(std, ref.std_raw, rtol=2e-6, atol=2e-6)
        assert torch.equal(below, ref.std_below_floor)
    assert counters["inductor"]["cudagraph_skips"] == 0


@needs_advantages_kernel
@pytest.mark.parametrize("case", list(ADVANTAGE_CASES))
def test_advantages_run_on_the_current_stream_deterministically(gen, case):
    # adv is written on `stream` after a long sleep: a kernel on any other stream would read NaN.
    (shape, dim, mask_shape), _ = ADVANTAGE_CASES[case]
    ready = randn(shape, gen, device=CUDA, mean=-2.0)
    mask = random_mask(mask_shape, gen, CUDA)
    adv = torch.full_like(ready, float("nan"))
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        torch.cuda._sleep(50_000_000)
        adv.copy_(ready)
        results = [normalize_advantages(adv, mask=mask, dim=dim, backend="cuda") for _ in range(2)]
    stream.synchronize()
    assert_advantages_close(*results[0], expected_advantages(ready, mask, dim), scale=2.0)
    (y0, s0), (y1, s1) = results
    assert torch.equal(y0, y1) and all(torch.equal(a, b) for a, b in zip(s0, s1))


@needs_advantages_kernel
@pytest.mark.parametrize("case", list(ADVANTAGE_CASES))
def test_advantages_number_of_launches(gen, case):
    (shape, dim, mask_shape), launches = ADVANTAGE_CASES[case]
    adv = randn(shape, gen, device=CUDA)
    mask = random_mask(mask_shape, gen, CUDA)
    normalize_advantages(adv, mask=mask, dim=dim, backend="cuda")  # plans and occupancy queries cached
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        normalize_advantages(adv, mask=mask, dim=dim, backend="cuda")
        torch.cuda.synchronize()
    names = [n for n in device_activities(prof) if "elementwise" not in n]  # stats.std_below_floor's comparison
    assert len(names) == len(launches) and all(want in name for want, name in zip(launches, names)), names


@needs_advantages_kernel
def test_advantages_reject_a_mask_on_another_device(gen):
    adv = randn((33, 4), gen, device=CUDA)
    stats = torch.empty(4, 4, dtype=torch.float64, device=CUDA)
    out = torch.full_like(adv, float("nan")).view(33, 4, 1)
    with pytest.raises(RuntimeError, match=r"mask is on cpu but x is on cuda"):
        torch.ops.fastnorm.normalize_advantages(adv.view(33, 4, 1), torch.ones(33, dtype=torch.bool), out, stats,
                                                1e-4, True)
    assert out.isnan().all()


# ---------------------------------------------------------------- advantage_moments and normalize_advantages_from

# ADVANTAGE_CASES as the ops see them, (O, G, I) and the flat mask's entries, and the axis along
# which the shards of x are cut; normalize_advantages_from launches the parts' merge and the same
# normalize kernel as the fused op.
ADVANTAGE_SPLIT_CASES = {
    "one_run": ((1, 1, 3_000_001), 3_000_001, 2),
    "runs_per_group": ((1, 40, 8_192), 40, 2),
    "columns": ((16_384, 16, 1), 256, 0),
}


def advantage_moments_of(x, mask):
    moments = torch.full((5, x.shape[1]), float("nan"), dtype=torch.float64, device=CUDA)
    torch.ops.fastnorm.advantage_moments(x, mask, moments)
    return moments


def as_advantage_stats(table, min_std=1e-4):
    mean, std_raw, count, norm_max_abs = table[1], table[2], table[0], table[3]
    return AdvantageStats(mean, std_raw, count, norm_max_abs, std_raw < min_std)


def advantages_from(x, parts):
    """normalize_advantages_from into poisoned buffers: (y, AdvantageStats)."""
    out = torch.full_like(x, float("nan"))
    stats = torch.full((4, x.shape[1]), float("nan"), dtype=torch.float64, device=CUDA)
    torch.ops.fastnorm.normalize_advantages_from(x, parts, out, stats, 1e-4, True)
    return out, as_advantage_stats(stats)


def fused_advantages(x, mask):
    out = torch.full_like(x, float("nan"))
    stats = torch.full((4, x.shape[1]), float("nan"), dtype=torch.float64, device=CUDA)
    torch.ops.fastnorm.normalize_advantages(x, mask, out, stats, 1e-4, True)
    return out, as_advantage_stats(stats)


def full_advantage_mask(mask, x):
    return mask.repeat_interleave(x.numel() // mask.numel()).view(x.shape)


@needs_advantage_split_kernels
@pytest.mark.parametrize("case", list(ADVANTAGE_SPLIT_CASES))
def test_advantage_split_ops_one_part_is_the_fused_op_bit_for_bit(gen, case):
    shape, mask_numel, _ = ADVANTAGE_SPLIT_CASES[case]
    x = randn(shape, gen, device=CUDA, dtype=torch.bfloat16, mean=1.0)
    mask = random_mask((mask_numel,), gen, CUDA)
    y, stats = advantages_from(x, advantage_moments_of(x, mask)[None])
    y_fused, stats_fused = fused_advantages(x, mask)
    assert torch.equal(y, y_fused)
    for name, got, want in zip(stats._fields, stats, stats_fused):
        assert torch.equal(got, want), name


@needs_advantage_split_kernels
@pytest.mark.parametrize("case", list(ADVANTAGE_SPLIT_CASES))
def test_advantage_split_ops_give_every_shard_the_concatenated_advantages(gen, case):
    shape, _, axis = ADVANTAGE_SPLIT_CASES[case]
    x = randn(shape, gen, device=CUDA, mean=-1.0, scale=3.0)
    mask = random_mask(shape, gen, CUDA)
    size = shape[axis]
    sizes = (size // 3, 0, size - size // 3)  # unequal shards, one empty
    xs = [part.contiguous() for part in x.split(sizes, dim=axis)]
    masks = [part.reshape(-1) for part in mask.split(sizes, dim=axis)]
    parts = torch.stack([advantage_moments_of(xp, mp) for xp, mp in zip(xs, masks)])
    results = [advantages_from(xp, parts) for xp in xs]
    for _, stats in results[1:]:  # the same parts, the same bits
        assert all(torch.equal(a, b) for a, b in zip(stats, results[0][1]))
    y = torch.cat([y for y, _ in results], dim=axis)
    assert_advantages_close(y, results[0][1], advantages_reference.normalize_advantages(x, mask, (0, 2)), scale=3.0)


@needs_advantage_split_kernels
@pytest.mark.parametrize("case", list(ADVANTAGE_SPLIT_CASES))
def test_advantage_split_ops_replay_in_a_cuda_graph(gen, case):
    shape, mask_numel, _ = ADVANTAGE_SPLIT_CASES[case]
    static_x = randn(shape, gen, device=CUDA)
    static_mask = random_mask((mask_numel,), gen, CUDA)
    parts = torch.empty(1, 5, shape[1], dtype=torch.float64, device=CUDA)
    out = torch.empty_like(static_x)
    table = torch.empty(4, shape[1], dtype=torch.float64, device=CUDA)

    def step():
        torch.ops.fastnorm.advantage_moments(static_x, static_mask, parts[0])
        torch.ops.fastnorm.normalize_advantages_from(static_x, parts, out, table, 1e-4, True)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for replay in range(3):
        static_x.copy_(randn(shape, gen, device=CUDA, mean=float(replay), scale=1.0 + replay))
        static_mask.copy_(random_mask((mask_numel,), gen, CUDA))
        out.fill_(float("nan"))
        graph.replay()
        expected = advantages_reference.normalize_advantages(static_x, full_advantage_mask(static_mask, static_x),
                                                             (0, 2))
        assert_advantages_close(out, as_advantage_stats(table), expected, scale=1.0 + replay)


@needs_advantage_split_kernels
@pytest.mark.parametrize("case", list(ADVANTAGE_SPLIT_CASES))
def test_advantage_split_ops_number_of_launches(gen, case):
    shape, mask_numel, _ = ADVANTAGE_SPLIT_CASES[case]
    fused_launches = ADVANTAGE_CASES[case][1]
    x = randn(shape, gen, device=CUDA)
    mask = random_mask((mask_numel,), gen, CUDA)
    moments = torch.empty(1, 5, shape[1], dtype=torch.float64, device=CUDA)
    out, table = torch.empty_like(x), torch.empty(4, shape[1], dtype=torch.float64, device=CUDA)
    for expected_names, call in [
        (ADVANTAGE_MOMENTS_LAUNCHES[case], lambda: torch.ops.fastnorm.advantage_moments(x, mask, moments[0])),
        (["merge_group_parts_kernel", fused_launches[-1]],
         lambda: torch.ops.fastnorm.normalize_advantages_from(x, moments, out, table, 1e-4, True)),
    ]:
        call()  # plans and occupancy queries cached
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            call()
            torch.cuda.synchronize()
        names = device_activities(prof)
        assert len(names) == len(expected_names) and all(w in n for w, n in zip(expected_names, names)), names
