"""The frameworks' normalizers across ranks (gloo, 2 processes on 127.0.0.1): fastnorm's rsl_rl
class syncs where rsl_rl's does and agrees with it; fastnorm's rl_games class with sync=True (which
rl_games lacks) holds, on every rank, the statistics of one process on the concatenated batches."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import frameworks_distributed_worker as worker
from conftest import SESSION_SEED
from fastnorm.integrations import rl_games as fastnorm_rl_games
from test_distributed import free_port

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")
WORLD = 2


@pytest.fixture(scope="module")
def states(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("frameworks")
    mp.spawn(worker.run, args=(WORLD, free_port(), str(out_dir), SESSION_SEED), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_every_rank_holds_the_same_statistics(states):
    assert all(s["sync"] for s in states)  # built after init_process_group: syncs, as rsl_rl does
    for name in ("fastnorm rsl_rl", "fastnorm rl_games"):
        torch.testing.assert_close(states[1][name], states[0][name], rtol=0, atol=0)


def test_rsl_rl_sync_agrees_with_rsl_rl(states):
    host, ours = states[0]["rsl_rl"], states[0]["fastnorm rsl_rl"]
    assert int(ours["count"]) == int(host["count"]) == worker.STEPS * (4 + 7)
    for key in ("_mean", "_var", "_std"):
        torch.testing.assert_close(ours[key].float(), host[key], rtol=1e-5, atol=1e-5)


def test_rl_games_sync_is_one_process_on_the_concatenated_batch(states):
    single = fastnorm_rl_games.RunningMeanStd((worker.FEATURES,))
    for step in range(worker.STEPS):
        single(torch.cat([worker.shard(SESSION_SEED, step, rank) for rank in range(WORLD)]))
    torch.testing.assert_close(states[0]["fastnorm rl_games"], single.state_dict(), rtol=2e-6, atol=2e-6)
