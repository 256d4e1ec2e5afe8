"""Choosing the default of RunningNorm(min_std_rel=...) by measurement (issue 16): the economy of
bench/stability.py (256 envs x 4 agents, per-agent statistics, the raw money doubling after step
10000) normalized with the relative floor off and at a few values, the rest of RunningNorm at its
defaults. Per setting: max |y| over the run, and the normalized std per feature group (money,
income, savings ratio, mean money, prices; the std over the batch of each column, averaged over
the group's columns) at the seed's steps, with the seed's verdict 0.5 < std < 2. The economy acts
with fixed savings ratios and spending shares (bench/stability.py), so it has no reward: the data
are the same for every setting and only the normalization differs.

    python bench/relative_floor.py [--steps 10100] [--values 0.01,0.1,0.3] [--min-std 1e-2] [--eps 1e-4]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from economy import FEATURES, Economy  # noqa: E402

import fastnorm  # noqa: E402

NUM_ENVS, NUM_AGENTS, NUM_GOODS = 256, 4, 4
GROUPS = {name: [i] for i, name in enumerate(FEATURES)} | {"prices": list(range(len(FEATURES),
                                                                                len(FEATURES) + NUM_GOODS))}
WATCHED = (1, 10, 100, 1000, 10000, 10010, 10100)
DOUBLING_STEP = 10000
STD_BOUNDS = (0.5, 2.0)


@torch.inference_mode()
def measure(settings: dict, steps: int) -> dict:
    """Runs the economy once, every setting's RunningNorm on the same observations; returns per
    setting max |y| and, per watched step, the normalized std of each feature group."""
    env = Economy(NUM_ENVS, NUM_AGENTS, NUM_GOODS)
    gen = torch.Generator().manual_seed(1)
    savings = 0.2 + 0.6 * torch.rand(NUM_ENVS, NUM_AGENTS, generator=gen)
    shares = torch.full((NUM_ENVS, NUM_AGENTS, NUM_GOODS), 1.0 / NUM_GOODS)
    norms = {name: fastnorm.RunningNorm((NUM_AGENTS, env.num_features), **kwargs) for name, kwargs in settings.items()}
    result = {name: {"max_abs": 0.0, "std": {}, "held": {}} for name in settings}
    for step in range(1, steps + 1):
        obs = env.observe()
        for name, norm in norms.items():
            y = norm(obs)
            result[name]["max_abs"] = max(result[name]["max_abs"], y.abs().max().item())
            if step in WATCHED:
                col_std = y.double().std(0, unbiased=False).mean(0)  # (F,): over the batch, averaged over agents
                result[name]["std"][step] = {g: col_std[cols].mean().item() for g, cols in GROUPS.items()}
                result[name]["held"][step] = norm.health().get("rel_floor_fraction", 0.0)
        env.step(savings, shares)
        if step == DOUBLING_STEP:
            env.money = env.money * 2.0
        if step % 2000 == 0:
            print(f"  step {step}/{steps}", file=sys.stderr, flush=True)
    return result


def verdict(std: float) -> str:
    return "ok" if STD_BOUNDS[0] < std < STD_BOUNDS[1] else ("collapsing" if std <= STD_BOUNDS[0] else "exploding")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=max(WATCHED))
    parser.add_argument("--values", default="0.01,0.1,0.3", help="min_std_rel values besides off")
    parser.add_argument("--min-std", type=float, default=1e-2)
    parser.add_argument("--eps", type=float, default=1e-4)
    args = parser.parse_args()
    settings = {"off": dict(min_std=args.min_std, eps=args.eps)}
    for value in args.values.split(","):
        settings[f"min_std_rel={value}"] = dict(min_std=args.min_std, eps=args.eps, min_std_rel=float(value))
    result = measure(settings, args.steps)
    print(f"\nmax |y| over {args.steps} steps (min_std={args.min_std}, eps={args.eps}): "
          + ", ".join(f"{name} {r['max_abs']:.2f}" for name, r in result.items()))
    print("\nnormalized std per feature group (verdict 0.5 < std < 2); held: share of columns at the relative floor\n")
    print("| step | setting | " + " | ".join(GROUPS) + " | held |")
    print("|---:|---|" + "---|" * len(GROUPS) + "---:|")
    for step in (s for s in WATCHED if s <= args.steps):
        for name, r in result.items():
            cells = [f"{r['std'][step][g]:.3f} ({verdict(r['std'][step][g])})" for g in GROUPS]
            print(f"| {step} | {name} | " + " | ".join(cells) + f" | {r['held'][step]:.2f} |")


if __name__ == "__main__":
    main()
