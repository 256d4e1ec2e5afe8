"""The VMAS benchmark: four scenarios of the Vectorized Multi-Agent Simulator (vmas 1.5.2) stepping
N envs x A agents, a shared-parameter policy acting on observations normalized per (agent, feature)
every step. Reports env-steps per second and the share of each step spent normalizing for no
normalization, the seed's normalizer, TorchRL's VecNormV2 and fastnorm (in place).

One env per (scenario, agents, envs) serves all four: each step is timed in parts, the env step
(with stacking the per-agent observations into (N, A, F)), the policy, and each normalizer on its
own fresh copy of the observations (copying is not timed), in an order that rotates every step.
Each normalizer runs REPEATS times per step (each call updates its statistics) and the fastest
call counts: on a shared CPU a descheduled OpenMP thread stalls a call by a whole time slice. A
normalizer's step is env + policy + its normalize time; medians over the timed steps. The policy
acts on fastnorm's output. Env construction is timed apart (it grows with the agents).

A configuration whose step would exceed STEP_LIMIT_S (measured, or predicted linearly in the envs
from the last size) is skipped with the reason: the 16-agent navigation and simple_spread take
seconds per step at 1k envs on a CPU. Without vmas (`pip install 'fastnorm[vmas]'`) the section
is skipped, as is VecNormV2 without torchrl.

(Named vmas_rollout, beside rollout.py, because bench/run.py puts bench/ first on sys.path: a
bench/vmas.py would shadow the vmas package it benchmarks.)
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Optional

import torch
from torch import nn

import fastnorm

from report import SectionResult, Table
from seed_normalizer import RunningPerAgentWelford
from timing import timer

TITLE = "VMAS: simulator scenarios, observations normalized per (agent, feature) every step"
SCENARIOS = ("navigation", "transport", "simple_spread", "balance")
AGENTS = {False: (4, 16), True: (4,)}
ENVS = {"cpu": {False: (1_000, 8_000, 32_000), True: (1_000,)},
        "cuda": {False: (1_000, 8_000, 32_000, 131_072, 262_144), True: (1_000, 32_000)}}
STEP_LIMIT_S = {"cpu": 10.0, "cuda": 2.0}
TIMED_STEPS = {False: 5, True: 3}
WARMUP = 1
REPEATS = 3  # calls per normalizer and step, each on a fresh copy; the fastest counts (preemption only slows)
NONE, SEED, VECNORM, FASTNORM = "none", "seed RunningPerAgentWelford", "TorchRL VecNormV2", "fastnorm"
GOAL_EAGER_SHARE, GOAL_FASTNORM_SHARE = 0.08, 0.02


class Policy(nn.Module):
    """A shared-parameter MLP (64x64, tanh) from each agent's normalized observation to its action
    in [-u_range, u_range]; fixed random weights (acting, not learning)."""

    def __init__(self, num_features: int, action_size: int, u_range: float):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(num_features, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                                 nn.Linear(64, action_size), nn.Tanh())
        self.u_range = u_range

    def forward(self, obs: torch.Tensor) -> list[torch.Tensor]:
        return list((self.net(obs) * self.u_range).unbind(1))  # one (N, action) tensor per agent


def make_env(scenario: str, num_envs: int, agents: int, device: torch.device):
    import vmas

    return vmas.make_env(scenario, num_envs=num_envs, device=device, continuous_actions=True, n_agents=agents, seed=0)


def vecnorm_v2(shape: tuple) -> Callable[[torch.Tensor], Callable[[], torch.Tensor]]:
    """TorchRL's VecNormV2 over a (N, A, F) batch with batch size [N]: statistics per (A, F), the
    settings of bench/peers.py. Returns prepare(x) -> the timed call (the TensorDict a TransformedEnv
    already holds is built untimed)."""
    from tensordict import TensorDict
    from torchrl.envs.transforms import VecNorm

    vecnorm = VecNorm(in_keys=["obs"], out_keys=["obs_norm"], decay=0.99, eps=1e-4, reduce_batch_dims=True,
                      new_api=True)

    def prepare(x):
        data = TensorDict({"obs": x}, batch_size=x.shape[:1], device=x.device)
        return lambda: vecnorm._step(data, data)["obs_norm"]
    return prepare


def normalizers(shape: tuple, device: torch.device) -> tuple[dict, dict]:
    """{name: prepare(x) -> timed call returning y} and {name: why it is skipped}."""
    seed = RunningPerAgentWelford(shape, device=device)
    norm = fastnorm.RunningNorm(shape, device=device)
    prepared = {SEED: lambda x: (lambda: seed(x)), FASTNORM: lambda x: (lambda: norm(x, out=x))}
    skipped = {}
    try:
        prepared[VECNORM] = vecnorm_v2(shape)
    except ImportError as error:
        skipped[VECNORM] = f"{type(error).__name__}: {error}"
    return prepared, skipped


class Bench:
    """One VMAS env, its policy and the normalizers; `step()` returns the seconds of the env step,
    the policy and each normalizer."""

    def __init__(self, scenario: str, num_envs: int, agents: int, device: torch.device):
        start = time.perf_counter()
        self.env = make_env(scenario, num_envs, agents, device)
        self.obs = torch.stack(self.env.reset(), 1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.construct_s = time.perf_counter() - start
        agent = self.env.agents[0]
        self.policy = Policy(self.obs.shape[-1], self.env.get_agent_action_size(agent), agent.u_range).to(device)
        self.prepared, self.skipped = normalizers(tuple(self.obs.shape[1:]), device)
        self.time_it = timer(device)
        self.steps = 0

    def step(self) -> dict[str, float]:
        names = list(self.prepared)
        names = names[self.steps % len(names):] + names[:self.steps % len(names)]
        self.steps += 1
        seconds, outputs = {}, {}
        for name in names:
            calls = [self.prepared[name](self.obs.clone()) for _ in range(REPEATS)]
            seconds[name] = min(self.time_it(lambda: outputs.__setitem__(name, call())) for call in calls)
        actions = []
        seconds["policy"] = self.time_it(lambda: actions.extend(self.policy(outputs[FASTNORM])))
        seconds["env"] = self.time_it(lambda: setattr(self, "obs", torch.stack(self.env.step(actions)[0], 1)))
        return seconds


@torch.inference_mode()
def measure(scenario: str, agents: int, num_envs: int, device: torch.device, timed_steps: int,
            step_limit_s: float = float("inf")) -> tuple[list[dict], Optional[str], float]:
    """Records (one per normalizer, "none" first), why the configuration was cut short (or None),
    and its median env + policy seconds (to predict the next size)."""
    bench = Bench(scenario, num_envs, agents, device)
    warm = [bench.step() for _ in range(WARMUP)]
    probe = warm[-1]["env"] + warm[-1]["policy"]
    if probe > step_limit_s:
        return [], f"one step took {probe:.1f} s at {num_envs:,} envs (limit {step_limit_s:g} s)", probe
    steps = [bench.step() for _ in range(timed_steps)]
    base = [s["env"] + s["policy"] for s in steps]
    common = {"scenario": scenario, "agents": agents, "envs": num_envs, "features": bench.obs.shape[-1],
              "construct_s": bench.construct_s, "env_ms": statistics.median(s["env"] for s in steps) * 1e3,
              "policy_ms": statistics.median(s["policy"] for s in steps) * 1e3, "steps": timed_steps}
    records = [{**common, "normalizer": NONE, "step_ms": statistics.median(base) * 1e3, "normalize_ms": 0.0}]
    for name in bench.prepared:
        norm = [s[name] for s in steps]
        step_ms = statistics.median(b + n for b, n in zip(base, norm)) * 1e3
        records.append({**common, "normalizer": name, "step_ms": step_ms,
                        "normalize_ms": statistics.median(norm) * 1e3})
    for r in records:
        r["normalize_share"] = r["normalize_ms"] / r["step_ms"]
        r["env_steps_per_s"] = num_envs / (r["step_ms"] / 1e3)
    for name, reason in bench.skipped.items():
        records.append({**common, "normalizer": name, "skipped": reason})
    return records, None, statistics.median(base)


def sweep(device: torch.device, quick: bool) -> tuple[list[dict], list[str]]:
    """Every scenario, agent count and size; returns the records and the skip notes."""
    records, notes = [], []
    sizes, limit = ENVS.get(device.type, ENVS["cpu"])[quick], STEP_LIMIT_S.get(device.type, STEP_LIMIT_S["cpu"])
    for scenario in SCENARIOS:
        for agents in AGENTS[quick]:
            last = None
            for num_envs in sizes:
                if last is not None and last[1] * num_envs / last[0] > limit:
                    notes.append(f"{scenario}, {agents} agents, {num_envs:,} envs skipped: a step would take about "
                                 f"{last[1] * num_envs / last[0]:.0f} s here ({last[1]:.2f} s at {last[0]:,} envs; "
                                 f"limit {limit:g} s)")
                    break
                try:
                    rows, cut, base_s = measure(scenario, agents, num_envs, device, TIMED_STEPS[quick], limit)
                except (RuntimeError, ValueError, AssertionError) as error:  # a scenario that does not take `agents`
                    notes.append(f"{scenario}, {agents} agents skipped: {type(error).__name__}: {error}")
                    break
                if cut:
                    notes.append(f"{scenario}, {agents} agents, {num_envs:,} envs and more skipped: {cut}")
                    break
                records += rows
                last = (num_envs, base_s)
                print(progress_line(rows), flush=True)
    return records, notes


def progress_line(rows: list[dict]) -> str:
    r = rows[0]
    shares = ", ".join(f"{x['normalizer'].split()[0] if x['normalizer'] != SEED else 'seed'} "
                       f"{100 * x['normalize_share']:.1f}%" for x in rows[1:] if "skipped" not in x)
    return (f"  {r['scenario']}, {r['agents']} agents, {r['envs']:,} envs: built in {r['construct_s']:.1f} s, "
            f"step {r['step_ms']:.0f} ms; normalizing: {shares}")


def run(device: torch.device, quick: bool) -> SectionResult:
    try:
        import vmas  # noqa: F401
    except ImportError as error:
        table = Table(TITLE, ["scenario"], notes=[f"skipped: vmas is not installed ({error}); "
                                                  "pip install 'fastnorm[vmas]'"])
        return SectionResult([table], {"skipped": str(error)})
    records, notes = sweep(device, quick)
    timed = [r for r in records if "skipped" not in r]
    return SectionResult([summary_table(timed, notes, device), detail_table(records)],
                         {"rows": records, "skipped": notes})


def summary_table(records: list[dict], notes: list[str], device: torch.device) -> Table:
    table = Table(f"VMAS on {device.type}: share of the step spent normalizing per (agent, feature)",
                  ["scenario", "agents", "envs", "obs (A, F)", "built s", "step ms (no norm)", "env-steps/s (no norm)",
                   "seed", "VecNormV2", "fastnorm", "fastnorm vs seed"])
    by_config = {}
    for r in records:
        by_config.setdefault((r["scenario"], r["agents"], r["envs"]), {})[r["normalizer"]] = r
    for (scenario, agents, envs), rows in by_config.items():
        none, seed, fast = rows[NONE], rows[SEED], rows[FASTNORM]
        vec = rows.get(VECNORM)
        table.rows.append([scenario, str(agents), f"{envs:,}", f"({agents}, {none['features']})",
                           f"{none['construct_s']:.1f}", f"{none['step_ms']:.1f}", f"{none['env_steps_per_s']:,.0f}",
                           f"{100 * seed['normalize_share']:.1f}%",
                           f"{100 * vec['normalize_share']:.1f}%" if vec else "-",
                           f"{100 * fast['normalize_share']:.1f}%",
                           f"{seed['normalize_ms'] / fast['normalize_ms']:.1f}x"])
    table.notes.append(goal_note(by_config))
    table.notes.append(f"medians over {records[0]['steps'] if records else 0} timed steps after {WARMUP} warm-up; "
                       "one env per row serves all normalizers, each timed on its own fresh copy of the observations "
                       f"(the fastest of {REPEATS} calls per step); "
                       "the step is the env step + the 64x64 policy + the normalizer; built s: vmas.make_env and the "
                       "first reset; 'fastnorm vs seed': how many "
                       "times faster fastnorm normalizes")
    table.notes += notes
    return table


def goal_note(by_config: dict) -> str:
    """The issue's goal: fastnorm under 2% of the step wherever eager (the seed's) costs 8% or more."""
    hard = [(key, rows) for key, rows in by_config.items() if rows[SEED]["normalize_share"] >= GOAL_EAGER_SHARE]
    if not hard:
        return (f"goal (fastnorm under {GOAL_FASTNORM_SHARE:.0%} where the seed's normalizer costs "
                f"{GOAL_EAGER_SHARE:.0%} or more): no configuration here costs the seed's normalizer that much")
    missed = [f"{s} {a} agents {n:,} envs ({100 * rows[FASTNORM]['normalize_share']:.1f}%)"
              for (s, a, n), rows in hard if rows[FASTNORM]["normalize_share"] >= GOAL_FASTNORM_SHARE]
    verdict = "met in all" if not missed else f"missed in {len(missed)}: " + ", ".join(missed)
    return (f"goal, fastnorm under {GOAL_FASTNORM_SHARE:.0%} of the step where the seed's normalizer costs "
            f"{GOAL_EAGER_SHARE:.0%} or more ({len(hard)} configurations): {verdict}")


def detail_table(records: list[dict]) -> Table:
    table = Table("VMAS: every normalizer per configuration", ["scenario", "agents", "envs", "normalizer", "step ms",
                  "normalize ms", "normalizing", "env-steps/s", "agent-steps/s"], detail=True)
    for r in records:
        if "skipped" in r:
            table.notes.append(f"{r['normalizer']} skipped: {r['skipped']}")
            continue
        table.rows.append([r["scenario"], str(r["agents"]), f"{r['envs']:,}", r["normalizer"], f"{r['step_ms']:.2f}",
                           f"{r['normalize_ms']:.3f}", f"{100 * r['normalize_share']:.1f}%",
                           f"{r['env_steps_per_s']:,.0f}", f"{r['env_steps_per_s'] * r['agents']:,.0f}"])
    return table
