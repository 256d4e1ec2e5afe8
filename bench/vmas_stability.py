"""The seed's failure on a simulator no one here wrote: MAPPO (examples/vmas_mappo.py) on VMAS
transport and balance, whose observations hold the seed's hard cases (transport: a feature that is
always 0, package velocities of std ~4e-5; balance: features of std 0.001-0.014 beside an offset
of ~1; at reset, velocities of zero variance), trained once with the seed's normalizer and once
with fastnorm, same seeds, same budget.

    python bench/vmas_stability.py                        # 2 scenarios x 2 normalizers x 3 seeds
    python bench/vmas_stability.py --scenarios transport --seeds 0 --iters 3     # a quick look
    python bench/vmas_stability.py --scenarios balance --normalizers fastnorm --min-std-rel 0.1 0.3 \
        --out bench/results/vmas-stability-relfloor     # fastnorm with its relative std floor beside it

The seed's normalizer is bench/seed_normalizer.py (cumulative Welford, eps 1e-6, no floor, no
clamp) with advantages ``(adv - mean) / (std + 1e-8)`` per agent; fastnorm is RunningNorm's
defaults and ``normalize_advantages`` per agent. Per run: max |normalized obs| (and the feature
where it occurs), the smallest train/advantages_std_raw, the largest train/advantages_norm_max_abs
and train/grad_norm (before clipping to 1), the first iteration with a non-finite value, and the
final mean episode reward; per feature, the std of the normalized obs over the last batch.
``--min-std-rel R`` adds a row "fastnorm+relR" (RunningNorm's ``min_std_rel=R``). Writes a table (.md), the records (.json) and the learning curves
(.png) to bench/results/vmas-stability.* (``--out``); run by hand (not part of `make bench`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "examples"))

import vmas_mappo  # noqa: E402
from report import Table, as_markdown, as_text  # noqa: E402
from seed_normalizer import RunningPerAgentWelford  # noqa: E402

NORMALIZERS = ("seed", "fastnorm")
REL_PREFIX = "fastnorm+rel"  # a row of fastnorm with a relative std floor: "fastnorm+rel0.1"
FEATURES = {
    "transport": ("pos x", "pos y", "vel x", "vel y", "package-goal x", "package-goal y", "package-agent x",
                  "package-agent y", "package vel x", "package vel y", "package on goal"),
    "balance": ("pos x", "pos y", "vel x", "vel y", "agent-package x", "agent-package y", "agent-line x",
                "agent-line y", "package-goal x", "package-goal y", "package vel x", "package vel y", "line vel x",
                "line vel y", "line ang vel", "line rot mod pi"),
}


class Tracker:
    """The example's on_iteration callback: keeps what the table needs from each iteration."""

    def __init__(self):
        self.history = []  # each iteration's scalars
        self.obs_max_abs = None  # (agents, features): largest |normalized obs| so far
        self.first_non_finite = None
        self.raw_std = None  # (agents, features): the normalizer's running std of the raw obs, last iteration
        self.normalized_std = None  # (agents, features): std of the normalized obs over the last batch

    def __call__(self, i, batch, scalars, norm):
        self.history.append(scalars)
        obs = torch.stack([batch.get(vmas_mappo.OBS), batch.get(("next", *vmas_mappo.OBS))])
        obs = obs.reshape(-1, *obs.shape[-2:])
        finite = bool(torch.isfinite(obs).all()) and all(math.isfinite(v) for v in scalars.values())
        if not finite and self.first_non_finite is None:
            self.first_non_finite = i
        batch_max = obs.abs().nan_to_num(nan=math.inf).amax(0)
        self.normalized_std = obs.double().std(0)
        self.obs_max_abs = batch_max if self.obs_max_abs is None else torch.maximum(self.obs_max_abs, batch_max)
        if isinstance(norm, RunningPerAgentWelford):
            self.raw_std = (norm.M2 / norm.count.clamp(min=1)).clamp(min=0).sqrt().double()
        else:
            self.raw_std = norm.var.sqrt()


def normalizer_rows(args: argparse.Namespace) -> list[str]:
    """The normalizers to run: --normalizers, then fastnorm at each --min-std-rel."""
    return list(args.normalizers) + [f"{REL_PREFIX}{r:g}" for r in args.min_std_rel]


def run_one(scenario: str, normalizer: str, seed: int, args: argparse.Namespace) -> dict:
    floor = []
    if normalizer.startswith(REL_PREFIX):
        floor = ["--obs-min-std-rel", normalizer[len(REL_PREFIX):]]
    train_args = vmas_mappo.parse_args(floor + [
        "--scenario", scenario, "--agents", str(args.agents), "--envs", str(args.envs), "--steps", str(args.steps),
        "--iters", str(args.iters), "--epochs", str(args.epochs), "--minibatches", str(args.minibatches),
        "--normalizer", "fastnorm" if floor else normalizer, "--seed", str(seed),
        "--logdir", args.logdir, "--run", f"{scenario}-{normalizer}-{seed}"])
    tracker, start, error = Tracker(), time.perf_counter(), None
    try:
        vmas_mappo.train(train_args, on_iteration=tracker)
    except (ValueError, RuntimeError) as e:  # e.g. a distribution refusing NaN parameters
        error = f"at iteration {len(tracker.history)}: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    history = tracker.history
    record = {"scenario": scenario, "normalizer": normalizer, "seed": seed, "seconds": time.perf_counter() - start,
              "iterations": len(history), "error": error, "first_non_finite": tracker.first_non_finite,
              "reward": [h["rollout/ep_rew_mean"] for h in history]}
    if history:
        record.update({
            "adv_std_raw_min": min(h["train/advantages_std_raw"] for h in history),
            "adv_norm_max_abs_max": max(h["train/advantages_norm_max_abs"] for h in history),
            "grad_norm_max": max(h["train/grad_norm"] for h in history),
            "final_reward": history[-1]["rollout/ep_rew_mean"]})
    if tracker.obs_max_abs is not None:
        flat = tracker.obs_max_abs.reshape(-1)
        agent, feature = divmod(int(flat.argmax()), tracker.obs_max_abs.shape[-1])
        record.update({"obs_max_abs": float(flat.max()), "obs_max_abs_at": (agent, FEATURES[scenario][feature]),
                       "obs_max_abs_per_feature": tracker.obs_max_abs.amax(0).tolist(),
                       "raw_std_per_feature": tracker.raw_std.amin(0).tolist(),
                       "normalized_std_per_feature": tracker.normalized_std.mean(0).tolist()})
    return record


def summary_table(records: list[dict], args: argparse.Namespace) -> Table:
    table = Table(f"MAPPO on VMAS, {args.agents} agents, {args.envs} envs x {args.steps} steps x {args.iters} "
                  f"iterations ({args.epochs} epochs of {args.minibatches} minibatches), {len(args.seeds)} seeds: "
                  f"{' vs '.join(normalizer_rows(args))}",
                  ["scenario", "normalizer", "max abs normalized obs", "at (agent, feature)", "adv std raw min",
                   "adv norm max abs max", "grad norm max", "first non-finite", "final reward (per seed)"])
    for scenario in args.scenarios:
        for normalizer in normalizer_rows(args):
            runs = [r for r in records if r["scenario"] == scenario and r["normalizer"] == normalizer]
            finished = [r for r in runs if "obs_max_abs" in r]
            worst = max(finished, key=lambda r: r["obs_max_abs"]) if finished else None
            non_finite = [f"seed {r['seed']}: iteration {r['first_non_finite']}" for r in runs
                          if r["first_non_finite"] is not None]
            table.rows.append([
                scenario, normalizer, f"{worst['obs_max_abs']:.3g}" if worst else "-",
                f"{worst['obs_max_abs_at'][0]}, {worst['obs_max_abs_at'][1]}" if worst else "-",
                _fmt(min((r["adv_std_raw_min"] for r in finished), default=None)),
                _fmt(max((r["adv_norm_max_abs_max"] for r in finished), default=None)),
                _fmt(max((r["grad_norm_max"] for r in finished), default=None)),
                "; ".join(non_finite) or "none",
                ", ".join(f"{r['final_reward']:.3f}" if "final_reward" in r else "-" for r in runs)])
    table.notes.append("max abs normalized obs: over every observation of every batch (the policy's inputs); adv and grad "
                       "norm over the iterations (train/grad_norm is the largest of an iteration's minibatch steps, "
                       "before clipping to 1); final reward: mean episode reward of the last batch")
    table.notes += [f"{r['scenario']} {r['normalizer']} seed {r['seed']} stopped {r['error']}"
                    for r in records if r["error"]]
    return table


def features_table(records: list[dict], scenario: str, normalizers: list[str]) -> Table:
    """Per feature: the largest |normalized obs| and the normalized std over the last batch (mean over
    agents and seeds) under each normalizer, and the smallest running std of the raw feature (over
    agents; at the end of the run, over seeds, in the first normalizer's view) — the features closest to failing."""
    names = FEATURES[scenario]
    stats = {}
    for normalizer in normalizers:
        runs = [r for r in records
                if r["scenario"] == scenario and r["normalizer"] == normalizer and "obs_max_abs" in r]
        if runs:
            stats[normalizer] = (
                [max(r["obs_max_abs_per_feature"][f] for r in runs) for f in range(len(names))],
                [min(r["raw_std_per_feature"][f] for r in runs) for f in range(len(names))],
                [sum(r["normalized_std_per_feature"][f] for r in runs) / len(runs) for f in range(len(names))])
    shown = [n for n in normalizers if n in stats]
    table = Table(f"{scenario}: per feature, largest |normalized obs|, std of the normalized obs (last batch) and "
                  f"running raw std ({shown[0] if shown else '-'}'s view)",
                  ["feature", "raw std (running)"] + [f"max abs y, {n}" for n in shown]
                  + [f"std y, {n}" for n in shown])
    if not shown:
        return table
    first = stats[shown[0]]
    for f in sorted(range(len(names)), key=lambda f: -first[0][f]):
        table.rows.append([names[f], f"{first[1][f]:.3g}"] + [f"{stats[n][0][f]:.3g}" for n in shown]
                          + [f"{stats[n][2][f]:.3g}" for n in shown])
    return table


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3g}"


def plot(records: list[dict], args: argparse.Namespace, path: str) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        return f"plot skipped: {error} (pip install fastnorm[bench])"
    fig, axes = plt.subplots(1, len(args.scenarios), figsize=(6 * len(args.scenarios), 4), squeeze=False)
    colors = dict(zip(normalizer_rows(args), ("tab:red", "tab:blue", "tab:green", "tab:orange", "tab:purple")))
    for ax, scenario in zip(axes[0], args.scenarios):
        for normalizer in normalizer_rows(args):
            for k, r in enumerate(r for r in records if r["scenario"] == scenario and r["normalizer"] == normalizer):
                ax.plot(range(len(r["reward"])), r["reward"], color=colors.get(normalizer), alpha=0.75,
                        label=f"{normalizer} normalizer" if k == 0 else None)
        ax.set_title(f"VMAS {scenario}, {args.agents} agents, {len(args.seeds)} seeds")
        ax.set_xlabel("iteration")
        ax.set_ylabel("mean episode reward")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"plot written to {path}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenarios", nargs="+", default=["transport", "balance"], choices=sorted(FEATURES))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--agents", type=int, default=4)
    p.add_argument("--envs", type=int, default=32)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--minibatches", type=int, default=8, help="per epoch (400 env steps each at 32 envs)")
    p.add_argument("--normalizers", nargs="+", default=list(NORMALIZERS), choices=NORMALIZERS)
    p.add_argument("--min-std-rel", nargs="*", type=float, default=[],
                   help="also run fastnorm with RunningNorm's min_std_rel at each of these values")
    p.add_argument("--out", default=os.path.join(HERE, "results", "vmas-stability"),
                   help="writes OUT.md, OUT.json and OUT.png")
    p.add_argument("--logdir", default="runs/vmas_stability")
    args = p.parse_args(argv)

    records, start = [], time.perf_counter()
    for scenario in args.scenarios:
        for seed in args.seeds:
            for normalizer in normalizer_rows(args):
                print(f"== {scenario}, {normalizer} normalizer, seed {seed} "
                      f"({time.perf_counter() - start:.0f} s so far)", flush=True)
                records.append(run_one(scenario, normalizer, seed, args))
    minutes = (time.perf_counter() - start) / 60
    tables = [summary_table(records, args)] + [features_table(records, s, normalizer_rows(args)) for s in args.scenarios]
    tables[0].notes.append(f"took {minutes:.1f} minutes on {os.cpu_count()} CPUs with {torch.get_num_threads()} torch "
                           f"threads, load average {os.getloadavg()[0]:.1f} at the end (shared machine)")
    for table in tables:
        print("\n" + as_text(table))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump({"args": vars(args), "minutes": minutes, "runs": records}, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(f"# VMAS stability: {' vs '.join(normalizer_rows(args))} under MAPPO\n\n"
                f"`{' '.join(['python bench/vmas_stability.py', *(argv if argv is not None else sys.argv[1:])])}`\n\n"
                + "\n\n".join(as_markdown(t) for t in tables) + "\n")
    print(plot(records, args, args.out + ".png"))
    print(f"results written to {args.out}.md and .json")


if __name__ == "__main__":
    main()
