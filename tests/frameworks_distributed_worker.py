"""The processes of test_frameworks_distributed.py: a gloo group on 127.0.0.1 in which every rank
feeds its own shard to rsl_rl's EmpiricalNormalization and fastnorm's (both sync by themselves once
torch.distributed is initialized) and to fastnorm's rl_games RunningMeanStd(sync=True), scripted as
rl_games' models script it, over a process group. Each rank saves the states it ends with."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from fastnorm.integrations import rl_games as fastnorm_rl_games
from fastnorm.integrations import rsl_rl as fastnorm_rsl_rl

STEPS = 3
FEATURES = 5


def shard(seed: int, step: int, rank: int) -> torch.Tensor:
    """Rank r's shard at this step: 4 + 3 r rows (unequal shards), offset and spread by feature."""
    gen = torch.Generator().manual_seed(seed * 1009 + step * 31 + rank)
    return 50 + torch.arange(FEATURES) + (1 + rank) * torch.randn(4 + 3 * rank, FEATURES, generator=gen)


def run(rank: int, world: int, port: int, out_dir: str, seed: int) -> None:
    from rsl_rl.modules.normalization import EmpiricalNormalization

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        host, ours = EmpiricalNormalization(FEATURES), fastnorm_rsl_rl.EmpiricalNormalization(FEATURES)
        group = dist.new_group(list(range(world)))
        games = torch.jit.script(fastnorm_rl_games.RunningMeanStd((FEATURES,), sync=True, process_group=group))
        for step in range(STEPS):
            x = shard(seed, step, rank)
            host.update(x)
            ours.update(x)
            games(x)
        states = {"rsl_rl": host.state_dict(), "fastnorm rsl_rl": ours.state_dict(), "fastnorm rl_games":
                  games.state_dict(), "sync": ours.norm.sync}
        torch.save(states, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
