"""The Gymnasium and SB3 wrappers' step: fastnorm's beside the library's own, at the batch sizes
their users run (a section of bench/run.py, and a standalone table).

    python bench/wrappers.py [--envs 8,16,64,1024,4096] [--features 16] [--quick]

Each wrapper wraps a stub vector env that hands back the same pre-drawn observations (and, for
SB3, rewards, no episode end) without work of its own, so the time is the wrapper's: Gymnasium's
``wrappers.vector.NormalizeObservation.step`` (update the statistics, normalize) and SB3's
``VecNormalize.step`` (update, normalize, discounted return, its statistics, reward scaling),
with fastnorm's subclasses (``fastnorm.integrations.gymnasium.VectorNormalizeObservation``,
``fastnorm.integrations.sb3.VecNormalize``) in their default mode and with ``fixes=True``.
Issue 15's bar: at most 1.2x the library's time from 8 to 64 envs, faster from 1024 envs up.
A library that is not installed (`pip install 'fastnorm[gymnasium,sb3]'`) is skipped, with the reason.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from report import SectionResult, Table, as_text  # noqa: E402
from timing import Case, Plan, interleaved_medians  # noqa: E402

TITLE = "Gymnasium and SB3 observation-normalizing wrappers: one step, fastnorm beside the library's own"
SMALL_BAR, LARGE_FROM = 1.2, 1024  # issue 15: <= 1.2x the library's step up to 64 envs, < 1x from 1024 envs
SECTION = {False: dict(envs=[8, 16, 64, 256, 1024, 4096], features=16),
           True: dict(envs=[8, 64, 1024], features=16)}
PLANS = {False: Plan(rounds=400, warmup=50, budget_s=0.4), True: Plan(rounds=150, warmup=20, budget_s=0.15)}
# Each library's wrappers and the packages they import.
LIBRARIES = {"Gymnasium": ("gymnasium",), "SB3": ("gymnasium", "stable_baselines3")}


def why_not_installed(library: str) -> str:
    """Why `library`'s wrappers cannot be measured here ("" when they can)."""
    for module in LIBRARIES[library]:
        try:
            importlib.import_module(module)
        except ImportError as error:
            return f"{type(error).__name__}: {error}"
    return ""


def gym_stub(num_envs: int, features: int, rng: np.random.Generator):
    """A Gymnasium vector env (NEXT_STEP autoreset) whose step returns fixed observations."""
    import gymnasium as gym

    class Stub(gym.vector.VectorEnv):
        metadata = {"autoreset_mode": gym.vector.AutoresetMode.NEXT_STEP}

        def __init__(self):
            self.num_envs = num_envs
            self.single_observation_space = gym.spaces.Box(-np.inf, np.inf, (features,), np.float32)
            self.observation_space = gym.vector.utils.batch_space(self.single_observation_space, num_envs)
            self.single_action_space = gym.spaces.Discrete(2)
            self.action_space = gym.vector.utils.batch_space(self.single_action_space, num_envs)
            self.obs = rng.normal(2.0, 3.0, (num_envs, features)).astype(np.float32)
            self.rewards = rng.normal(size=num_envs)
            self.done = np.zeros(num_envs, dtype=bool)

        def reset(self, *, seed=None, options=None):
            return self.obs, {}

        def step(self, actions):
            return self.obs, self.rewards, self.done, self.done, {}

    return Stub()


def sb3_stub(num_envs: int, features: int, rng: np.random.Generator):
    """An SB3 VecEnv whose step returns fixed observations and rewards, no episode end."""
    import gymnasium as gym
    from stable_baselines3.common.vec_env import VecEnv

    class Stub(VecEnv):
        def __init__(self):
            super().__init__(num_envs, gym.spaces.Box(-np.inf, np.inf, (features,), np.float32), gym.spaces.Discrete(2))
            self.obs = rng.normal(2.0, 3.0, (num_envs, features)).astype(np.float32)
            self.rewards = rng.normal(size=num_envs).astype(np.float32)
            self.dones = np.zeros(num_envs, dtype=bool)
            self.infos = [{} for _ in range(num_envs)]

        def reset(self):
            return self.obs

        def step_async(self, actions):
            pass

        def step_wait(self):
            return self.obs, self.rewards, self.dones, self.infos

        def close(self):
            pass

        def get_attr(self, attr_name, indices=None):
            return [None] * num_envs

        def set_attr(self, attr_name, value, indices=None):
            pass

        def env_method(self, method_name, *args, indices=None, **kwargs):
            return [None] * num_envs

        def env_is_wrapped(self, wrapper_class, indices=None):
            return [False] * num_envs

    return Stub()


def wrapper_cases(library: str, num_envs: int, features: int, seed: int) -> list[Case]:
    """The library's wrapper and fastnorm's (default, fixes=True) around identical stubs."""
    if library == "Gymnasium":
        from gymnasium.wrappers.vector import NormalizeObservation

        from fastnorm.integrations.gymnasium import VectorNormalizeObservation as Fastnorm
        make_stub, Library = gym_stub, NormalizeObservation
    else:
        from stable_baselines3.common.vec_env import VecNormalize

        from fastnorm.integrations.sb3 import VecNormalize as Fastnorm
        make_stub, Library = sb3_stub, VecNormalize
    actions = np.zeros(num_envs, dtype=np.int64)
    cases = []
    for name, make in [("library", Library), ("fastnorm", Fastnorm),
                       ("fastnorm fixes=True", lambda env: Fastnorm(env, fixes=True))]:
        wrapper = make(make_stub(num_envs, features, np.random.default_rng(seed)))
        wrapper.reset()
        cases.append(Case(name, lambda wrapper=wrapper: wrapper.step(actions)))
    return cases


def measure(library: str, num_envs: int, features: int, plan: Plan) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the stubs are not registered envs; Gymnasium says so
        cases = wrapper_cases(library, num_envs, features, seed=num_envs)
        medians = interleaved_medians(cases, torch.device("cpu"), plan)
    base = medians["library"][0]
    return {"library": library, "envs": num_envs, "features": features,
            "us": {name: t * 1e6 for name, (t, _) in medians.items()},
            "calls": {name: calls for name, (_, calls) in medians.items()},
            "ratio": {name: t / base for name, (t, _) in medians.items()}}


def bar_verdict(record: dict) -> str:
    ratio = record["ratio"]["fastnorm"]
    if record["envs"] <= 64:
        return "meets" if ratio <= SMALL_BAR else "misses"
    if record["envs"] >= LARGE_FROM:
        return "meets" if ratio < 1.0 else "misses"
    return "-"


def measure_all(envs: list[int], features: int, plan: Plan) -> tuple[list[dict], dict[str, str]]:
    """The records of every installed library at every number of envs, and {library: why it is skipped}."""
    records, skipped = [], {}
    for library in LIBRARIES:
        skipped[library] = why_not_installed(library)
        if skipped[library]:
            print(f"  {library} skipped: {skipped[library]}", flush=True)
            continue
        for num_envs in envs:
            print(f"  {library} wrapper, {num_envs} envs x {features} features", flush=True)
            records.append(measure(library, num_envs, features, plan))
    return records, {library: reason for library, reason in skipped.items() if reason}


def table(records: list[dict], skipped: dict[str, str]) -> Table:
    t = Table("Wrapper step on cpu: microseconds (ratio to the library's wrapper)",
              ["library", "envs", "features", "library us", "fastnorm us", "fastnorm fixes=True us", "bar"])
    for r in records:
        us, ratio = r["us"], r["ratio"]
        t.rows.append([r["library"], str(r["envs"]), str(r["features"]), f"{us['library']:.1f}",
                       f"{us['fastnorm']:.1f} ({ratio['fastnorm']:.2f}x)",
                       f"{us['fastnorm fixes=True']:.1f} ({ratio['fastnorm fixes=True']:.2f}x)", bar_verdict(r)])
    t.notes.append(f"bar (issue 15): fastnorm default at most {SMALL_BAR}x the library's step up to 64 envs, "
                   f"faster (< 1x) from {LARGE_FROM} envs; medians of interleaved rounds; stub envs without work")
    t.notes += [f"skipped {library}: {reason}; pip install 'fastnorm[gymnasium,sb3]'" for library, reason in skipped.items()]
    return t


def run(device: torch.device, quick: bool) -> SectionResult:
    if device.type != "cpu":
        print("(the wrappers take numpy observations: measured on the CPU whatever --device says)")
    spec = SECTION[quick]
    records, skipped = measure_all(spec["envs"], spec["features"], PLANS[quick])
    return SectionResult([table(records, skipped)], {"rows": records, "skipped": skipped})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envs", default=None, help="comma-separated numbers of envs (default: the section's)")
    parser.add_argument("--features", type=int, default=16)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    envs = [int(n) for n in args.envs.split(",")] if args.envs else SECTION[args.quick]["envs"]
    print(as_text(table(*measure_all(envs, args.features, PLANS[args.quick]))))


if __name__ == "__main__":
    main()
