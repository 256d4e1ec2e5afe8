"""RunningNorm(sync=True) across processes: gloo groups of 2 and 3 processes on 127.0.0.1 run
50 steps of drifting data with unequal shards, masks, empty and fully masked shards (the ranks in
tests/distributed_worker.py). Every rank must hold bitwise the same statistics, equal within fp
tolerance to one process on the concatenated batch, and checkpoints must resume on another world
size. normalize_advantages(sync=True) the same, globally and per agent. Each world is started once
(process start-up dominates) and its results checked here."""

from __future__ import annotations

import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import distributed_worker as worker
from conftest import BACKENDS_UNDER_TEST, SESSION_SEED
from fastnorm import RunningNorm, advantages_reference
from fastnorm.advantages import AdvantageStats, reduced_dims
from fastnorm.distributed import broadcast_state
from helpers import STAT_TOL, Y_TOL, assert_diag_close
from test_advantages import assert_matches

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")
CPU_BACKENDS = [b for b in BACKENDS_UNDER_TEST if b in ("cpu", "reference")] or ["reference"]
STATE_KEYS = ("mean", "var", "count", "steps")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, out_dir, resume_from=None) -> list[dict]:
    args = (world, free_port(), str(out_dir), SESSION_SEED, CPU_BACKENDS, resume_from)
    mp.spawn(worker.run, args=args, nprocs=world, join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("world2")
    return out_dir, launch(2, out_dir)


@pytest.fixture(scope="module")
def world3(tmp_path_factory, world2):
    out_dir = tmp_path_factory.mktemp("world3")
    return out_dir, launch(3, out_dir, resume_from=str(world2[0] / "state.pt"))


@pytest.fixture(params=[2, 3], ids=lambda w: f"world{w}")
def world(request):
    return request.param, request.getfixturevalue(f"world{request.param}")[1]


def replay(seed: int, world: int, steps: int, momentum, start_state=None):
    """One process on the concatenated batches: the float64 reference; its y per step."""
    norm = RunningNorm(worker.STATS_SHAPE, momentum=momentum, backend="reference")
    if start_state is not None:
        norm.load_state_dict(start_state)
    ys = []
    for step in range(steps):
        xs, masks = worker.step_data(seed, step, world)
        ys.append(norm(torch.cat(xs), mask=torch.cat(masks)))
    return norm, ys


def assert_state_matches(state, norm, scale, calls):
    """The statistics of one process; steps counts the group's calls (an all-empty one too)."""
    tol = STAT_TOL[torch.float32]
    torch.testing.assert_close(state["count"], norm.count, rtol=0, atol=0)
    assert int(state["steps"]) == calls
    torch.testing.assert_close(state["mean"], norm.mean, rtol=tol["rtol"] * 10, atol=tol["atol"] * 10 * scale)
    torch.testing.assert_close(state["var"], norm.var, rtol=tol["rtol"] * 10, atol=tol["atol"] * 10 * scale**2)


def test_every_rank_holds_the_same_bits(world):
    size, ranks = world
    for key in ranks[0]["runs"]:
        first = ranks[0]["runs"][key]
        for other in ranks[1:]:
            run = other["runs"][key]
            for name in STATE_KEYS + (("scale",) if "scale" in first["state"] else ()):
                assert torch.equal(run["state"][name], first["state"][name]), (key, name)
            assert torch.equal(run["diag"], first["diag"]), key  # the diagnostics of the group's batch


@pytest.mark.parametrize("momentum", worker.MOMENTA)
def test_statistics_are_those_of_the_concatenated_batch(world, momentum):
    size, ranks = world
    norm, expected_ys = replay(SESSION_SEED, size, worker.STEPS, momentum)
    assert bool((norm.count > 0).all())
    for backend in CPU_BACKENDS:
        for rank, result in enumerate(ranks):
            run = result["runs"][(backend, momentum)]
            assert_state_matches(run["state"], norm, scale=math.exp(0.03 * worker.STEPS), calls=worker.STEPS)
            assert_diag_close(run["diag"], norm._diag, torch.float32, scale=math.exp(0.03 * worker.STEPS))
            for step, expected in enumerate(expected_ys):
                rows = worker.shard_sizes(step, size)
                mine = expected.split(rows)[rank]
                torch.testing.assert_close(run["ys"][step], mine, **Y_TOL[torch.float32])


def test_relative_floor_tracks_the_scale_of_the_concatenated_batch(world):
    size, ranks = world
    norm = RunningNorm(worker.STATS_SHAPE, **worker.RELATIVE_FLOOR, backend="reference")
    expected_ys = []
    for step in range(worker.STEPS):
        xs, masks = worker.step_data(SESSION_SEED, step, size)
        expected_ys.append(norm(torch.cat(xs), mask=torch.cat(masks)))
    scale = math.exp(0.03 * worker.STEPS)
    for backend in CPU_BACKENDS:
        for rank, result in enumerate(ranks):
            run = result["runs"][(backend, "relative floor")]
            assert_state_matches(run["state"], norm, scale=scale, calls=worker.STEPS)
            tol = STAT_TOL[torch.float32]
            torch.testing.assert_close(run["state"]["scale"], norm.scale, rtol=tol["rtol"] * 10,
                                       atol=tol["atol"] * 10 * scale)
            for step, expected in enumerate(expected_ys):
                mine = expected.split(worker.shard_sizes(step, size))[rank]
                torch.testing.assert_close(run["ys"][step], mine, **Y_TOL[torch.float32])


def test_torch_compile_fullgraph_syncs_like_eager(world2):
    for result in world2[1]:
        for compiled, eager in result["compiled"]["ys"]:
            assert torch.equal(compiled, eager)
        compiled, eager = result["compiled"]["states"]
        assert all(torch.equal(compiled[name], eager[name]) for name in STATE_KEYS)


def test_a_group_of_one_is_the_unsynced_update(world2):
    for result in world2[1]:
        for synced, local in result["alone"]["ys"]:
            torch.testing.assert_close(synced, local, **Y_TOL[torch.float32])
        synced, local = result["alone"]["states"]
        for name in ("mean", "var", "count"):
            torch.testing.assert_close(synced[name], local[name], rtol=1e-12, atol=1e-12)


def test_resume_on_fewer_ranks(world3):
    # World 3's checkpoint, loaded by rank 0 alone, continued by ranks 0 and 2 as a group of two.
    out_dir, ranks = world3
    saved = torch.load(out_dir / "state.pt", weights_only=True)
    check_resume([ranks[0]["resume_pair"], ranks[2]["resume_pair"]], saved, seed=SESSION_SEED + 2, world=2)
    assert "resume_pair" not in ranks[1]
    assert "this process (global rank 1) is not a member of process_group" in ranks[1]["outsider_error"]


def test_resume_on_more_ranks(world2, world3):
    # World 2's checkpoint, loaded by rank 2 alone, continued by the three ranks of world 3.
    saved = torch.load(world2[0] / "state.pt", weights_only=True)
    check_resume([r["resume_all"] for r in world3[1]], saved, seed=SESSION_SEED + 1, world=3)


def check_resume(resumed: list[dict], saved: dict, seed: int, world: int):
    for result in resumed:  # every rank starts from the saved state: counts not inflated
        for name in STATE_KEYS:
            assert torch.equal(result["loaded"][name], saved[name]), name
    for result in resumed[1:]:
        for name in STATE_KEYS:
            assert torch.equal(result["state"][name], resumed[0]["state"][name]), name
    norm, expected_ys = replay(seed, world, worker.RESUME_STEPS, worker.MOMENTA[0], start_state=saved)
    assert_state_matches(resumed[0]["state"], norm, scale=math.exp(0.03 * worker.STEPS),
                         calls=int(saved["steps"]) + worker.RESUME_STEPS)
    for step, expected in enumerate(expected_ys):
        mine = expected.split(worker.shard_sizes(step, world))
        for rank, result in enumerate(resumed):
            torch.testing.assert_close(result["ys"][step], mine[rank], **Y_TOL[torch.float32])


def test_broadcast_state_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"module \(Linear\) holds no fastnorm normalizer"):
        broadcast_state(torch.nn.Linear(2, 2))
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), RunningNorm((3,)))
    with pytest.raises(RuntimeError, match="broadcast_state needs torch.distributed to be initialized"):
        broadcast_state(model)


def test_advantage_statistics_are_the_same_bits_on_every_rank(world):
    size, ranks = world
    assert ranks[0]["advantages"], "no backend under test ran normalize_advantages(sync=True)"
    for key, calls in ranks[0]["advantages"].items():
        for other in ranks[1:]:
            for call, ((_, stats), (_, other_stats)) in enumerate(zip(calls, other["advantages"][key])):
                for name, a, b in zip(AdvantageStats._fields, stats, other_stats):
                    assert torch.equal(a, b), (key, call, name)


def test_advantages_are_those_of_the_concatenated_batch(world):
    size, ranks = world
    for (backend, case), calls in ranks[0]["advantages"].items():
        _, dim, _, dtype = worker.ADVANTAGE_CASES[case]
        for call in range(worker.ADVANTAGE_CALLS):
            advs, masks = worker.advantage_data(SESSION_SEED, call, size, case)
            adv = torch.cat(advs)
            mask = None if masks[0] is None else torch.cat(masks)
            expected = advantages_reference.normalize_advantages(adv, mask, reduced_dims(dim, adv.dim()))
            assert bool((expected.count > 0).all())
            y = torch.cat([result["advantages"][backend, case][call][0] for result in ranks])
            stats = AdvantageStats(*calls[call][1])  # the same bits on every rank
            assert_matches(y, stats, expected, dtype, scale=4.0)


def test_torch_compile_fullgraph_syncs_advantages_like_eager(world2):
    for result in world2[1]:
        for compiled, eager in result["advantages_compiled"]:
            assert all(torch.equal(a, b) for a, b in zip(compiled, eager))
