"""The cost of sync=True: per call, beside the same call without sync, in a group of --nproc
processes on this machine (gloo on CPU, NCCL on GPU: one GPU per process).

    python bench/distributed.py [--nproc 2] [--device cpu|cuda] [--shape 4096 16 32] [--rounds 41]
    python bench/distributed.py --op advantages [--numel 1M] [--layout global] ...

Each rank normalizes its own x of --shape (float32) with RunningNorm, or with --op advantages its
own advantages of --numel float32 elements in a layout of bench/advantages.py (LAYOUTS) with
normalize_advantages. Cases run interleaved after a warm-up, each
call started together on all ranks (a barrier, not timed). Rank 0 prints medians and minima (the
minimum is near the cost on a quiet machine; on a loaded one, thread wake-ups in the collective
add noise) of: the call without sync, with sync, their difference, the synced call in a group of
one rank (the split ops alone: a group of one skips the all-gather), and the all-gather of the
moments table alone.
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastnorm
from fastnorm.advantages_reference import MOMENT_ROWS as ADVANTAGE_MOMENT_ROWS
from fastnorm.distributed import all_gather_moments
from fastnorm.reference import MOMENT_ROWS

from advantages import LAYOUTS, parse_size  # bench/advantages.py


def timed(fn, device: torch.device) -> float:
    """Seconds fn() takes, its device work included."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def run(rank: int, world: int, port: int, args) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    device = torch.device(f"cuda:{rank}" if args.device == "cuda" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # the cores, shared out
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    # Every rank alone in a group of one: the split ops, no collective.
    alone = [dist.new_group([r]) for r in range(world)][rank]
    what, cases = (advantage_cases if args.op == "advantages" else running_norm_cases)(args, device, alone)
    samples = {name: [] for name in cases}
    for round_index in range(args.warmup + args.rounds):
        for name, fn in cases.items():
            dist.barrier()
            seconds = timed(fn, device)
            if round_index >= args.warmup:
                samples[name].append(seconds)
    if rank == 0:
        medians = {name: statistics.median(s) * 1e6 for name, s in samples.items()}
        minima = {name: min(s) * 1e6 for name, s in samples.items()}
        print(f"{what}, {world} ranks, {device.type} ({dist.get_backend()}), {torch.get_num_threads()} threads per "
              f"rank, {args.rounds} rounds:")
        print(f"  {'':<20} {'median us':>10} {'min us':>10}")
        for name in cases:
            print(f"  {name:<20} {medians[name]:10.1f} {minima[name]:10.1f}")
        print(f"  {'sync overhead':<20} {medians['sync'] - medians['no sync']:10.1f} "
              f"{minima['sync'] - minima['no sync']:10.1f}  per call")
    dist.destroy_process_group()


def running_norm_cases(args, device: torch.device, alone) -> tuple[str, dict]:
    shape = tuple(args.shape)
    x = torch.randn(shape, device=device)
    out = torch.empty_like(x)
    local = fastnorm.RunningNorm(shape[1:], device=device)
    synced = fastnorm.RunningNorm(shape[1:], sync=True, device=device)
    split = fastnorm.RunningNorm(shape[1:], sync=True, process_group=alone, device=device)
    table = torch.zeros((len(MOMENT_ROWS), *shape[1:]), dtype=torch.float64, device=device)
    return f"RunningNorm{shape[1:]} on x {shape} float32", {
        "no sync": lambda: local(x, out=out), "sync": lambda: synced(x, out=out),
        "sync, 1-rank group": lambda: split(x, out=out), "all-gather alone": lambda: all_gather_moments(table)}


def advantage_cases(args, device: torch.device, alone) -> tuple[str, dict]:
    make_shape, dim, masked = LAYOUTS[args.layout]
    shape = make_shape(parse_size(args.numel))
    adv = torch.randn(shape, device=device)
    mask = torch.rand(shape[0], device=device) < 0.8 if masked else None
    out = torch.empty_like(adv)
    groups = 1 if dim is None else shape[1]

    def call(**sync):
        return lambda: fastnorm.normalize_advantages(adv, mask=mask, dim=dim, out=out, **sync)

    table = torch.zeros((len(ADVANTAGE_MOMENT_ROWS), groups), dtype=torch.float64, device=device)
    return f"normalize_advantages, {args.layout}, on adv {shape} float32", {
        "no sync": call(), "sync": call(sync=True), "sync, 1-rank group": call(sync=True, process_group=alone),
        "all-gather alone": lambda: all_gather_moments(table)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--op", choices=["running_norm", "advantages"], default="running_norm")
    parser.add_argument("--shape", type=int, nargs=3, default=[4096, 16, 32], help="x's shape (running_norm)")
    parser.add_argument("--numel", default="1M", help="elements of adv per rank (advantages), e.g. 1M")
    parser.add_argument("--layout", choices=list(LAYOUTS), default="global", help="adv's layout (advantages)")
    parser.add_argument("--rounds", type=int, default=41)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(run, args=(args.nproc, port, args), nprocs=args.nproc, join=True)


if __name__ == "__main__":
    main()
