"""The processes of test_distributed.py: a gloo group on 127.0.0.1 in which every rank runs
RunningNorm(sync=True) on its own shard of a drifting batch, then resumes from a checkpoint with
another world size, and normalize_advantages(sync=True) on its own shard of advantages. Each rank
saves what it saw; the test process checks it. The data of each step is a function of (seed, step,
world size) alone, so the test rebuilds the concatenated batch.
"""

from __future__ import annotations

import datetime
import math
import os
from typing import Optional

import torch
import torch.distributed as dist

from fastnorm import RunningNorm, normalize_advantages
from fastnorm.backends import BACKENDS
from fastnorm.distributed import broadcast_state

STATS_SHAPE = (3, 4)
STEPS = 50
RESUME_STEPS = 8
MOMENTA = (0.99, None)
RELATIVE_FLOOR = dict(momentum=0.9, min_std_rel=1.2)  # binds in the first ~30 steps, then the drift outgrows it
ADVANTAGE_CALLS = 6  # call c has the shards shard_sizes(c, world): an empty rank 0 and an empty last rank
# name: (adv's shape after the batch dim, dim, mask dims (0: no mask), dtype)
ADVANTAGE_CASES = {
    "global": ((), None, 0, torch.float32),
    "global, masked rows": ((4, 3), None, 1, torch.float32),
    "global, bfloat16": ((6,), None, 2, torch.bfloat16),
    "per agent": ((5,), 0, 2, torch.float32),
    "per agent, dims (0, 2), float64": ((3, 2), (0, 2), 1, torch.float64),
}


def shard_sizes(step: int, world: int) -> list[int]:
    """Unequal shards; rank 0 is empty on every third step, and rank world - 1 on every fifth."""
    sizes = [7 + 5 * rank + (step * (rank + 3)) % 11 for rank in range(world)]
    if step % 3 == 0:
        sizes[0] = 0
    if step % 5 == 1:
        sizes[-1] = 0
    return sizes


def step_data(seed: int, step: int, world: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each rank's (x, mask) at this step: float32 x (B_r, 3, 4) drifting in mean and scale, an
    agent mask (B_r, 3); on every seventh step rank 1's shard is fully masked."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step * 101 + world)
    sizes = shard_sizes(step, world)
    total = sum(sizes)
    mean, scale = 0.1 * step, math.exp(0.03 * step)
    col = torch.randn(STATS_SHAPE, generator=gen, dtype=torch.float64)
    x = (mean + col + scale * torch.randn((total, *STATS_SHAPE), generator=gen, dtype=torch.float64)).float()
    mask = torch.rand((total, STATS_SHAPE[0]), generator=gen) < 0.75
    xs, masks = list(x.split(sizes)), list(mask.split(sizes))
    if step % 7 == 3:
        masks[1] = torch.zeros_like(masks[1])
    return xs, masks


def advantage_data(seed: int, call: int, world: int, case: str) -> tuple[list[torch.Tensor], list]:
    """Each rank's (adv, mask) for one call of an ADVANTAGE_CASES case: offsets and scales per
    entry of the group shape; rank 1's mask selects nothing on every fourth call."""
    shape, _, mask_dims, dtype = ADVANTAGE_CASES[case]
    gen = torch.Generator().manual_seed(seed * 1_000_003 + call * 101 + world * 7 + len(case))
    sizes = shard_sizes(call, world)
    total = sum(sizes)
    offset = 2.0 * torch.randn(shape, generator=gen, dtype=torch.float64)
    scale = 0.5 + torch.rand(shape, generator=gen, dtype=torch.float64)
    adv = (offset + scale * torch.randn((total, *shape), generator=gen, dtype=torch.float64)).to(dtype)
    advs = list(adv.split(sizes))
    if mask_dims == 0:
        return advs, [None] * world
    masks = list((torch.rand((total, *shape)[:mask_dims], generator=gen) < 0.7).split(sizes))
    if call % 4 == 2:
        masks[1] = torch.zeros_like(masks[1])
    return advs, masks


def advantage_calls(rank: int, world: int, seed: int, backends: list[str]) -> dict:
    """normalize_advantages(sync=True) on this rank's shard: (y, stats) per call, per (backend, case)."""
    results = {}
    for backend in backends:
        for case, (_, dim, _, _) in ADVANTAGE_CASES.items():
            calls = []
            for call in range(ADVANTAGE_CALLS):
                advs, masks = advantage_data(seed, call, world, case)
                y, stats = normalize_advantages(advs[rank], mask=masks[rank], dim=dim, backend=backend, sync=True)
                calls.append((y, tuple(stats)))
            results[(backend, case)] = calls
    return results


def compiled_advantage_calls(rank: int, world: int, seed: int, backend: str) -> list:
    """normalize_advantages(sync=True) through torch.compile(fullgraph=True) beside eager mode."""
    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(adv, mask):
        y, stats = normalize_advantages(adv, mask=mask, dim=0, backend=backend, sync=True)
        return y, stats.std_raw, stats.norm_max_abs

    pairs = []
    for call in (2, 13):  # the same shard sizes (one compilation); rank 1 fully masked in call 2
        advs, masks = advantage_data(seed, call, world, "per agent")
        y, stats = normalize_advantages(advs[rank], mask=masks[rank], dim=0, backend=backend, sync=True)
        pairs.append((step(advs[rank], masks[rank]), (y, stats.std_raw, stats.norm_max_abs)))
    return pairs


def run(rank: int, world: int, port: int, out_dir: str, seed: int, backends: list[str],
        resume_from: Optional[str]) -> None:
    """One rank: 50 synced steps per (backend, momentum), the checkpoint of rank 0, resumes, and
    synced advantage normalization on every backend in backends that has the split ops."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        result = {"runs": run_steps(rank, world, seed, backends)}
        advantage_backends = [b for b in backends if not BACKENDS[b].not_supported_reasons(
            torch.empty(0), "normalize_advantages_from")]
        result["advantages"] = advantage_calls(rank, world, seed, advantage_backends)
        if world == 2:
            result["compiled"] = compiled_steps(rank, world, seed, backends[0])
            result["alone"] = alone_steps(rank, world, seed, backends[0])
            result["advantages_compiled"] = compiled_advantage_calls(rank, world, seed, advantage_backends[0])
        if rank == 0:
            torch.save(result["runs"][(backends[0], MOMENTA[0])]["state"], os.path.join(out_dir, "state.pt"))
        dist.barrier()
        if resume_from is not None:  # every rank of this world continues a checkpoint saved elsewhere
            result["resume_all"] = resume(rank, resume_from, None, src=world - 1, seed=seed + 1, world=world)
        if world > 2:  # ranks 0 and 2 continue this world's checkpoint as a group of two
            group = dist.new_group([0, 2])
            if rank in (0, 2):
                result["resume_pair"] = resume(rank, os.path.join(out_dir, "state.pt"), group, src=0,
                                               seed=seed + 2, world=2)
            else:
                result["outsider_error"] = outsider_error(group)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_steps(rank: int, world: int, seed: int, backends: list[str]) -> dict:
    norms = {(b, m): RunningNorm(STATS_SHAPE, momentum=m, backend=b, sync=True) for b in backends for m in MOMENTA}
    norms.update({(b, "relative floor"): RunningNorm(STATS_SHAPE, **RELATIVE_FLOOR, backend=b, sync=True)
                  for b in backends})
    ys = {key: [] for key in norms}
    for step in range(STEPS):
        xs, masks = step_data(seed, step, world)
        for key, norm in norms.items():
            ys[key].append(norm(xs[rank], mask=masks[rank]))
    return {key: {"ys": ys[key], "diag": norm._diag.clone(), "state": norm.state_dict()} for key, norm in norms.items()}


def compiled_steps(rank: int, world: int, seed: int, backend: str) -> dict:
    """A few synced steps through torch.compile(fullgraph=True) beside the same steps in eager mode."""
    compiled_norm, eager_norm = (RunningNorm(STATS_SHAPE, backend=backend, sync=True) for _ in range(2))

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(norm, x, mask):
        return norm(x, mask=mask)

    pairs = []
    for i in range(3):
        xs, masks = step_data(seed, i, world)
        pairs.append((step(compiled_norm, xs[rank], masks[rank]), eager_norm(xs[rank], mask=masks[rank])))
    return {"ys": pairs, "states": (compiled_norm.state_dict(), eager_norm.state_dict())}


def outsider_error(group) -> str:
    """What a rank outside group hears when it tries to sync over it (nothing may change)."""
    norm = RunningNorm(STATS_SHAPE, sync=True, process_group=group)
    try:
        norm(torch.ones(4, *STATS_SHAPE))
    except RuntimeError as error:
        assert int(norm.steps) == 0 and bool((norm.count == 0).all())
        return str(error)
    return "no error"


def alone_steps(rank: int, world: int, seed: int, backend: str) -> dict:
    """Each rank synced over a group of itself beside the same steps without sync."""
    alone = [dist.new_group([r]) for r in range(world)][rank]
    synced = RunningNorm(STATS_SHAPE, backend=backend, sync=True, process_group=alone)
    local = RunningNorm(STATS_SHAPE, backend=backend)
    pairs = []
    for i in range(3):
        xs, masks = step_data(seed, i, world)
        pairs.append((synced(xs[rank], mask=masks[rank]), local(xs[rank], mask=masks[rank])))
    return {"ys": pairs, "states": (synced.state_dict(), local.state_dict())}


def resume(rank: int, path: str, group, src: int, seed: int, world: int) -> dict:
    """Only rank src loads the checkpoint; broadcast_state gives it to the group; then a few
    synced steps on this group's shards (group rank order)."""
    norm = RunningNorm(STATS_SHAPE, momentum=MOMENTA[0], sync=True, process_group=group)
    if rank == src:
        norm.load_state_dict(torch.load(path, weights_only=True))
    broadcast_state(norm, src=src, process_group=group)
    loaded = {k: v.clone() for k, v in norm.state_dict().items() if torch.is_tensor(v)}
    group_rank = dist.get_rank(group)
    ys = []
    for step in range(RESUME_STEPS):
        xs, masks = step_data(seed, step, world)
        ys.append(norm(xs[group_rank], mask=masks[group_rank]))
    return {"loaded": loaded, "ys": ys, "state": norm.state_dict()}
