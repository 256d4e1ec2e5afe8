"""Where the fused running-norm op spends its time: the op, its two passes run alone (update only:
the reduce and the running update; normalize only: pass 2), normalize_with="previous" (one pass),
beside a copy of x, x.sum(0) and F.batch_norm on the same data, in microseconds (medians of
interleaved rounds, bench/timing.py).

    python bench/passes.py [--device cpu|cuda] [--backend cpu] [--threads N] [--dtype bfloat16]

A tool for optimizing a kernel (bench/NOTES.md), not a section of `make bench`.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from timing import Case, Plan, interleaved_medians  # noqa: E402

import fastnorm  # noqa: E402

SHAPES = [(4096, 16, 32), (65536, 8, 64), (1024, 256, 16), (256, 1024, 8), (1_000_000, 1, 8)]


def cases(x: torch.Tensor, backend: str) -> list[Case]:
    out = torch.empty_like(x)
    norm = fastnorm.RunningNorm(x.shape[1:], backend=backend, device=x.device)
    norm(x)  # statistics that clip nothing, as in a steady state
    previous = fastnorm.RunningNorm(x.shape[1:], backend=backend, device=x.device, normalize_with="previous")
    previous(x)  # every column has a history: the one-pass path
    rows = x.view(x.shape[0], -1)
    running_mean, running_var = torch.zeros(rows.shape[1], device=x.device), torch.ones(rows.shape[1], device=x.device)
    return [Case("copy", lambda: out.copy_(x)), Case("x.sum(0)", lambda: rows.sum(0)),
            Case("fused", lambda: norm(x, out=out)), Case("update only", lambda: norm.update(x)),
            Case("normalize only", lambda: norm.normalize(x, out=out)),
            Case("fused previous", lambda: previous(x, out=out)),
            Case("F.batch_norm", lambda: torch.nn.functional.batch_norm(rows, running_mean, running_var,
                                                                         training=True, momentum=0.01))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    names = [case.name for case in cases(torch.randn(8, 1, 1, device=device), args.backend)]
    print(f"{'shape':<18}" + "".join(f"{name:>16}" for name in names) + f"   (us, {args.dtype})")
    for shape in SHAPES:
        x = torch.randn(shape, device=device).to(dtype)
        medians = interleaved_medians(cases(x, args.backend), device, Plan(rounds=21, warmup=3, budget_s=2.0))
        print(f"{str(shape):<18}" + "".join(f"{medians[name][0] * 1e6:16.0f}" for name in names))


if __name__ == "__main__":
    main()
