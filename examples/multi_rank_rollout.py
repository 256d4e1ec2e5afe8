"""Many ranks, one set of statistics: each rank rolls out its own shard of environments and
normalizes observations with RunningNorm(sync=True); every rank ends with bitwise the same
statistics. Its advantages are normalized per agent over all ranks' shards with
normalize_advantages(sync=True). Then a resume: rank 0 alone loads the checkpoint and
broadcast_state re-seeds the rest.

    torchrun --standalone --nproc_per_node=2 examples/multi_rank_rollout.py [--steps 200]

On GPUs each rank takes cuda:LOCAL_RANK and the group uses NCCL; on CPUs, gloo.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

import fastnorm
from fastnorm.distributed import broadcast_state

AGENTS, FEATURES = 16, 32


def rollout_step(envs: int, step: int, gen: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor]:
    """A stand-in for env.step(): (envs, AGENTS, FEATURES) observations whose scale drifts
    (wealth compounding), and a mask of the agents still active."""
    growth = 1.0 + 0.01 * torch.arange(FEATURES, dtype=torch.float32)
    obs = torch.randn(envs, AGENTS, FEATURES, generator=gen) * growth**(step / 10) + 0.05 * step
    active = torch.rand(envs, AGENTS, generator=gen) < 0.9
    return obs.to(device), active.to(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--checkpoint", default="multi_rank_rollout_norm.pt")
    args = parser.parse_args()

    use_cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    # Shards of different sizes; the last rank sits out every tenth step (an empty shard).
    envs = 64 * (rank + 1)
    gen = torch.Generator().manual_seed(1234 + rank)
    norm = fastnorm.RunningNorm((AGENTS, FEATURES), sync=True, device=device)
    for step in range(args.steps):
        obs, active = rollout_step(envs, step, gen, device)
        if rank == world - 1 and step % 10 == 0:
            obs, active = obs[:0], active[:0]
        norm(obs, mask=active)  # every rank calls, in the same order: a collective

    # Every rank holds the same bits: compare each rank's statistics with rank 0's.
    reference = torch.stack([norm.mean, norm.var, norm.count])
    dist.broadcast(reference, src=0)
    same = torch.equal(reference, torch.stack([norm.mean, norm.var, norm.count]))
    print(f"rank {rank}/{world}: {envs} envs, count {norm.count[0, 0].item():.0f}, "
          f"std {norm.var.sqrt().mean().item():.3f}, identical to rank 0: {same}")

    # The PPO update's advantages (a stand-in: T steps of this rank's envs, per agent), normalized
    # per agent with the statistics of every rank's shard.
    advantages = (torch.randn(32 * envs, AGENTS, generator=gen) * (1.0 + rank)).to(device)
    _, adv_stats = fastnorm.normalize_advantages(advantages, dim=0, sync=True, out=advantages)
    reference = adv_stats.std_raw.clone()
    dist.broadcast(reference, src=0)
    print(f"rank {rank}/{world}: advantages of {int(adv_stats.count[0])} samples per agent over all ranks, "
          f"std_raw identical to rank 0: {torch.equal(reference, adv_stats.std_raw)}")

    # Checkpoint from rank 0; on resume (any world size) rank 0 loads and re-seeds the others.
    if rank == 0:
        torch.save(norm.state_dict(), args.checkpoint)
    dist.barrier()
    resumed = fastnorm.RunningNorm((AGENTS, FEATURES), sync=True, device=device)
    if rank == 0:
        resumed.load_state_dict(torch.load(args.checkpoint, map_location=device, weights_only=True))
    broadcast_state(resumed, src=0)
    assert torch.equal(resumed.count, norm.count), "counts must not inflate on resume"
    if rank == 0:
        os.remove(args.checkpoint)
        print(f"resumed on {world} ranks: count {resumed.count[0, 0].item():.0f}, steps {int(resumed.steps)}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
