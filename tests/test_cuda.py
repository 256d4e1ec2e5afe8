"""The C++/CUDA backend on a GPU: both launch paths against the float64 reference, opcheck,
torch.compile with CUDA graphs, explicit graph capture and replay, streams, determinism and the
number of launches. Skipped without a GPU and the CUDA kernels. (With FASTNORM_TEST_DEVICE=cuda
the whole RunningNorm suite also runs on this backend; tests/test_cuda_emulated.py runs the same
kernels on the CPU.)
"""

from __future__ import annotations

import pytest
import torch

from fastnorm import RunningNorm, _ops, reference
from helpers import DTYPES, Y_TOL, assert_diag_close, assert_stats_close, expected_step, random_mask, randn

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or not _ops.has_kernel("running_norm", "CUDA"),
    reason="needs a GPU and fastnorm built with its CUDA kernels",
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


def test_normalize_matches_reference(gen):
    norm = RunningNorm(SHAPE, backend="cuda", device=CUDA)
    norm(randn((500, *SHAPE), gen, device=CUDA))
    norm.eval()
    for dtype in DTYPES:
        x = randn((300, *SHAPE), gen, dtype=dtype, device=CUDA, scale=3.0)
        expected = reference.normalize(x, norm.mean, norm.var, eps=norm.eps, min_std=norm.min_std,
                                       max_std=norm.max_std, clip=norm.clip)
        torch.testing.assert_close(norm(x), expected, **Y_TOL[dtype])
