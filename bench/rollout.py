"""The rollout benchmark: the economy of bench/economy.py stepping N envs x A agents, its policy
acting on observations normalized per agent every step, once with the seed's original normalizer
and once with fastnorm. Reports env-steps per second and the share of each step spent normalizing,
from 1k to 1M agents.

Both rollouts run interleaved in chunks of steps after a warm-up; step and normalize times are
medians over the timed steps (CUDA events on GPU, perf_counter on CPU).
"""

from __future__ import annotations

import statistics
import time

import torch

import fastnorm

from economy import Economy, Policy
from report import SectionResult, Table
from seed_normalizer import RunningPerAgentWelford

TITLE = "Rollout: a multi-agent economy, observations normalized per agent every step"
AGENTS_PER_ENV = 8
SIZES = {False: [1_000, 10_000, 100_000, 1_000_000], True: [1_000, 100_000]}  # agents in all
TIMED_STEPS = {False: 15, True: 10}
CHUNK, WARMUP = 5, 2
SEED = "seed RunningPerAgentWelford"


class Rollout:
    """One economy, its policy and one normalizer; `step()` returns its four time marks (start,
    observed, normalized, stepped): perf_counter values on CPU, recorded CUDA events on GPU."""

    def __init__(self, num_envs: int, normalizer: str, device: torch.device):
        self.env = Economy(num_envs, AGENTS_PER_ENV, device=device)
        self.policy = Policy(self.env.num_features).to(device)
        shape = (AGENTS_PER_ENV, self.env.num_features)
        if normalizer == SEED:
            self.normalize = RunningPerAgentWelford(shape, device=device)
        else:
            norm = fastnorm.RunningNorm(shape, device=device)
            self.normalize = lambda obs: norm(obs, out=obs)  # obs is fresh each step: normalize in place
        self.cuda = device.type == "cuda"

    def step(self) -> list:
        marks = [self._mark()]
        obs = self.env.observe()
        marks.append(self._mark())
        y = self.normalize(obs)
        marks.append(self._mark())
        self.env.step(*self.policy(y))
        marks.append(self._mark())
        return marks

    def _mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event


def seconds(marks: list, cuda: bool) -> tuple[float, float]:
    """(whole step, normalize) seconds from one step's four marks."""
    if cuda:
        marks[-1].synchronize()
        elapsed = lambda a, b: a.elapsed_time(b) / 1e3  # noqa: E731
    else:
        elapsed = lambda a, b: b - a  # noqa: E731
    return elapsed(marks[0], marks[3]), elapsed(marks[1], marks[2])


@torch.inference_mode()
def measure(agents: int, device: torch.device, timed_steps: int) -> list[dict]:
    num_envs = agents // AGENTS_PER_ENV
    rollouts = {name: Rollout(num_envs, name, device) for name in (SEED, "fastnorm")}
    for rollout in rollouts.values():
        for _ in range(WARMUP):
            rollout.step()
    marks = {name: [] for name in rollouts}
    for _ in range(max(1, timed_steps // CHUNK)):
        for name, rollout in rollouts.items():
            marks[name] += [rollout.step() for _ in range(CHUNK)]
    records = []
    for name, steps in marks.items():
        times = [seconds(m, device.type == "cuda") for m in steps]
        step_s = statistics.median(t[0] for t in times)
        norm_s = statistics.median(t[1] for t in times)
        records.append({"agents": num_envs * AGENTS_PER_ENV, "envs": num_envs, "normalizer": name,
                        "step_ms": step_s * 1e3, "normalize_ms": norm_s * 1e3, "normalize_share": norm_s / step_s,
                        "env_steps_per_s": num_envs / step_s, "agent_steps_per_s": num_envs * AGENTS_PER_ENV / step_s,
                        "steps": len(times)})
    seed_step = records[0]["step_ms"]
    for r in records:
        r["step_speedup_vs_seed"] = seed_step / r["step_ms"]
    return records


def run(device: torch.device, quick: bool) -> SectionResult:
    records = []
    for agents in SIZES[quick]:
        records += measure(agents, device, TIMED_STEPS[quick])
    table = Table(f"Rollout on {device.type}: {AGENTS_PER_ENV} agents per env, "
                  f"{Economy(1, 1).num_features} features per agent, policy MLP 32x32",
                  ["agents", "envs", "normalizer", "step ms", "normalize ms", "normalizing", "env-steps/s",
                   "agent-steps/s", "step speed-up"])
    for r in records:
        table.rows.append([f"{r['agents']:,}", f"{r['envs']:,}", r["normalizer"], f"{r['step_ms']:.2f}",
                           f"{r['normalize_ms']:.2f}", f"{100 * r['normalize_share']:.0f}%",
                           f"{r['env_steps_per_s']:,.0f}", f"{r['agent_steps_per_s']:,.0f}",
                           f"{r['step_speedup_vs_seed']:.2f}x"])
    table.notes.append(f"medians over {TIMED_STEPS[quick]} timed steps per rollout (after {WARMUP} warm-up steps), "
                       f"the two rollouts interleaved in chunks of {CHUNK}; fastnorm normalizes in place (out=obs)")
    return SectionResult([table], {"rows": records})
