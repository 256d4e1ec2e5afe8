"""Each RL framework's normalizer beside fastnorm's drop-in class for it: a section of bench/run.py,
and a standalone table.

    python bench/frameworks.py [--device cpu|cuda] [--quick] [--threads N]

One training step of each normalizer as its framework calls it, on the frameworks' typical shapes:
4096 envs x 48 features, and 8192 envs x 4 agents x 18 features (statistics per agent and feature):
- rsl_rl: ``update(x)`` then ``forward(x)`` (rsl-rl-lib's EmpiricalNormalization; fastnorm's class
  makes the same two calls);
- rl_games: ``forward(x)`` in training mode of the module scripted with ``torch.jit.script``, as
  rl_games' models build it (update + normalize);
- skrl: ``scaler(x, train=True)`` (on the 3-d batch skrl keeps statistics per feature, shared by the
  agents: its preprocessor reduces the first two dims);
- torchrl: the transform called on a TensorDict holding x (VecNormV2 with ``reduce_batch_dims=True``,
  statistics over the env dim).
A framework not installed, or whose fastnorm class is not on this branch, is reported as such.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import os
import sys
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from report import SectionResult, Table, as_text  # noqa: E402
from timing import Case, Plan, interleaved_medians  # noqa: E402

TITLE = "RL frameworks: each framework's normalizer beside its fastnorm drop-in (one training step)"
SHAPES = [(4096, 48), (8192, 4, 18)]
PLANS = {False: Plan(rounds=31, warmup=5, budget_s=0.75), True: Plan(rounds=11, warmup=3, budget_s=0.25)}


def quiet(fn: Callable):
    with contextlib.redirect_stdout(io.StringIO()):  # rl_games' constructor prints its size
        return fn()


def rsl_rl_case(cls, x, stats_shape):
    norm = cls(stats_shape).to(x.device)

    def step():
        norm.update(x)
        return norm(x)
    return step


def rl_games_case(cls, x, stats_shape):
    norm = quiet(lambda: torch.jit.script(cls(stats_shape)).to(x.device))
    return lambda: norm(x)


def skrl_case(cls, x, stats_shape):
    # skrl reduces a 3-d batch over its first two dims: statistics per feature, shared by the agents.
    scaler = cls(stats_shape[-1], device=x.device)
    return lambda: scaler(x, train=True)


def torchrl_vecnorm_case(x, stats_shape):
    from tensordict import TensorDict
    from torchrl.envs.transforms import VecNormV2

    vecnorm = VecNormV2(in_keys=["observation"], reduce_batch_dims=True)
    data = TensorDict({"observation": x}, batch_size=[x.shape[0]], device=x.device)
    return lambda: vecnorm._step(data, data.clone(False))  # what a TransformedEnv's step calls


def torchrl_fastnorm_case(x, stats_shape):
    from tensordict import TensorDict

    from fastnorm.integrations.torchrl import RunningNormTransform

    transform = RunningNormTransform(in_keys=["observation"])  # statistics shape from the first data
    data = TensorDict({"observation": x}, batch_size=[x.shape[0]], device=x.device)
    return lambda: transform._step(data, data.clone(False))


def host(module: str, name: str):
    return lambda: getattr(importlib.import_module(module), name)


def pairs():
    """(framework, the framework's step maker, fastnorm's step maker): each maker takes (x, stats_shape)."""
    def own(make, cls_getter):
        return lambda x, s: make(cls_getter(), x, s)

    return [
        ("rsl_rl", own(rsl_rl_case, host("rsl_rl.modules.normalization", "EmpiricalNormalization")),
         own(rsl_rl_case, host("fastnorm.integrations.rsl_rl", "EmpiricalNormalization"))),
        ("rl_games", own(rl_games_case, host("rl_games.algos_torch.running_mean_std", "RunningMeanStd")),
         own(rl_games_case, host("fastnorm.integrations.rl_games", "RunningMeanStd"))),
        ("skrl", own(skrl_case, host("skrl.resources.preprocessors.torch", "RunningStandardScaler")),
         own(skrl_case, host("fastnorm.integrations.skrl", "RunningStandardScaler"))),
        ("torchrl", torchrl_vecnorm_case, torchrl_fastnorm_case),
    ]


def missing_module(error: ImportError) -> str:
    """The module an ImportError could not find; fastnorm's integrations re-raise without a name,
    from the framework's own ModuleNotFoundError."""
    while error is not None and not getattr(error, "name", None):
        error = error.__cause__
    return getattr(error, "name", None) or ""


def build(maker, x, stats_shape):
    """(step, why it cannot run)."""
    try:
        step = maker(x, stats_shape)
        step()  # a step that cannot run fails here, not in the timed rounds
        return step, ""
    except ImportError as error:
        missing = missing_module(error)
        on_branch = not missing.startswith("fastnorm.integrations")
        return None, (f"not installed ({missing.split('.')[0]})" if on_branch else "not on this branch")
    except Exception as error:  # a class whose constructor differs: say so rather than stop the run
        return None, f"failed: {type(error).__name__}: {error}"


def run(device: torch.device, quick: bool = False) -> SectionResult:
    gen = torch.Generator().manual_seed(0)
    table = Table(TITLE, ["framework", "x shape", "framework us", "fastnorm us", "speed-up", "calls"],
                  notes=["median of interleaved rounds; other processes share these cores: expect noise"])
    records = []
    for shape in SHAPES:
        x = (torch.randn(shape, generator=gen) * 2 + 5).to(device)
        stats_shape = tuple(shape[1:])
        for framework, own_maker, fastnorm_maker in pairs():
            print(f"  {framework} {shape} ...", flush=True)
            own, own_reason = build(own_maker, x, stats_shape)
            ours, our_reason = build(fastnorm_maker, x, stats_shape)
            cases = [Case(name, step) for name, step in (("framework", own), ("fastnorm", ours)) if step is not None]
            times = interleaved_medians(cases, device, PLANS[quick]) if cases else {}
            us = {name: t * 1e6 for name, (t, _) in times.items()}
            calls = "/".join(str(n) for _, n in times.values())
            speedup = f"{us['framework'] / us['fastnorm']:.2f}x" if len(us) == 2 else "-"
            table.rows.append([framework, "x".join(map(str, shape)),
                               f"{us['framework']:.1f}" if "framework" in us else own_reason,
                               f"{us['fastnorm']:.1f}" if "fastnorm" in us else our_reason, speedup, calls or "-"])
            records.append({"framework": framework, "shape": list(shape), "framework_us": us.get("framework"),
                            "fastnorm_us": us.get("fastnorm"), "framework_skip": own_reason,
                            "fastnorm_skip": our_reason})
    return SectionResult([table], {"rows": records})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's); 1 on a CPU shared with "
                        "other jobs, where threads waiting for each other dominate every time")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{torch.get_num_threads()} CPU threads, load average {os.getloadavg()[0]:.1f}")
    for table in run(torch.device(args.device), args.quick).tables:
        print(as_text(table))


if __name__ == "__main__":
    main()
