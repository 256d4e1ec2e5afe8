"""The running std each framework's normalizer reaches on data with a large offset and a small
spread, beside fastnorm's drop-in class for that framework (its default, the framework's own math
in float64, and ``fixes=True``).

    python bench/framework_stats.py [--batches 300] [--batch-size 64] [--seed 0] [--markdown]

The data of issue 12: ``batches`` batches of ``batch_size`` rows, x = 1000 + 0.01 N(0, 1) in
float32 (true std 0.0100), one feature. Each normalizer is fed every batch the way its framework
feeds it in training; the table gives the std it ends with and the std of its output on a fresh
batch of the same data (1.0 when the statistics are right). A framework or fastnorm class that is
not installed (or not on this branch) is reported as such.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import math
from typing import Callable, Optional

import torch

OFFSET, SPREAD = 1000.0, 0.01
Feeder = tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[], float]]  # (train step -> y, running std)


def data(batches: int, batch_size: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [OFFSET + SPREAD * torch.randn(batch_size, 1, generator=gen) for _ in range(batches + 1)]


def rsl_rl_own() -> Feeder:
    from rsl_rl.modules.normalization import EmpiricalNormalization

    norm = EmpiricalNormalization(1)
    return (lambda x: (norm.update(x), norm(x))[1]), lambda: float(norm.std[0])


def rsl_rl_fastnorm(**options) -> Feeder:
    from fastnorm.integrations.rsl_rl import EmpiricalNormalization

    norm = EmpiricalNormalization(1, **options)
    return (lambda x: (norm.update(x), norm(x))[1]), lambda: float(norm.std[0])


def rl_games(cls, **options) -> Feeder:
    with contextlib.redirect_stdout(io.StringIO()):  # rl_games' constructor prints its size
        norm = torch.jit.script(cls((1,), **options))  # as rl_games' models build it
    return norm, lambda: math.sqrt(float(norm.running_var[0]))


def skrl(cls, **options) -> Feeder:
    scaler = cls(1, **options)
    return (lambda x: scaler(x, train=True)), lambda: math.sqrt(float(scaler.running_variance[0]))


def torchrl_own(decay: float) -> Feeder:
    from tensordict import TensorDict
    from torchrl.envs.transforms import VecNormV2

    vecnorm = VecNormV2(in_keys=["observation"], decay=decay, reduce_batch_dims=True)

    def step(x):
        data = TensorDict({"observation": x}, batch_size=[x.shape[0]])
        return vecnorm._step(data, data)["observation"]  # what a TransformedEnv's step calls

    def std():
        _, scale = vecnorm._get_loc_scale()
        return float(scale["observation"].reshape(-1)[0])
    return step, std


def torchrl_fastnorm(**options) -> Feeder:
    from tensordict import TensorDict

    from fastnorm.integrations.torchrl import RunningNormTransform

    transform = RunningNormTransform(in_keys=["observation"], **options)  # fastnorm's defaults (decay 0.99)

    def step(x):
        data = TensorDict({"observation": x}, batch_size=[x.shape[0]])
        return transform._step(data, data)["observation"]
    return step, lambda: math.sqrt(float(transform.norm("observation").var.reshape(-1)[0]))


def rows() -> list[tuple[str, str, Callable[[], Feeder]]]:
    """(framework, class, builder) for every row of the table."""
    def fastnorm_module(name):
        return lambda: importlib.import_module(f"fastnorm.integrations.{name}")

    def rl_games_own():
        from rl_games.algos_torch.running_mean_std import RunningMeanStd
        return rl_games(RunningMeanStd)

    def skrl_own():
        from skrl.resources.preprocessors.torch import RunningStandardScaler
        return skrl(RunningStandardScaler)

    return [
        ("rsl_rl", "EmpiricalNormalization (rsl_rl)", rsl_rl_own),
        ("rsl_rl", "fastnorm EmpiricalNormalization", lambda: rsl_rl_fastnorm()),
        ("rsl_rl", "fastnorm EmpiricalNormalization(fixes=True)", lambda: rsl_rl_fastnorm(fixes=True)),
        ("rl_games", "RunningMeanStd (rl_games)", rl_games_own),
        ("rl_games", "fastnorm RunningMeanStd", lambda: rl_games(fastnorm_module("rl_games")().RunningMeanStd)),
        ("rl_games", "fastnorm RunningMeanStd(fixes=True)",
         lambda: rl_games(fastnorm_module("rl_games")().RunningMeanStd, fixes=True)),
        ("skrl", "RunningStandardScaler (skrl)", skrl_own),
        ("skrl", "fastnorm RunningStandardScaler", lambda: skrl(fastnorm_module("skrl")().RunningStandardScaler)),
        ("skrl", "fastnorm RunningStandardScaler(fixes=True)",
         lambda: skrl(fastnorm_module("skrl")().RunningStandardScaler, fixes=True)),
        ("torchrl", "VecNormV2(decay=1) (torchrl)", lambda: torchrl_own(1.0)),
        ("torchrl", "VecNormV2 default decay (torchrl)", lambda: torchrl_own(0.9999)),
        ("torchrl", "fastnorm RunningNormTransform", lambda: torchrl_fastnorm()),
    ]


def measure(build: Callable[[], Feeder], batches: list[torch.Tensor]) -> tuple[Optional[float], Optional[float], str]:
    """(running std, std of the output on the last batch, why it could not run)."""
    try:
        step, running_std = build()
    except ImportError as error:
        reason = "not on this branch" if "fastnorm.integrations" in str(error) else f"not installed ({error.name})"
        return None, None, reason
    with torch.no_grad():
        for x in batches[:-1]:
            step(x)
        return running_std(), float(step(batches[-1]).double().std()), ""


def table(batches: int, batch_size: int, seed: int) -> list[list[str]]:
    xs = data(batches, batch_size, seed)
    out = []
    for framework, name, build in rows():
        print(f"  {name} ...", flush=True)
        std, y_std, reason = measure(build, xs)
        fmt = (lambda v: "NaN" if math.isnan(v) else f"{v:.4g}")
        out.append([framework, name, fmt(std) if std is not None else reason, fmt(y_std) if y_std is not None else "-"])
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown", action="store_true", help="print the table as markdown")
    args = parser.parse_args(argv)
    print(f"{args.batches} batches of {args.batch_size}, x = {OFFSET:g} + {SPREAD} N(0,1) float32 "
          f"(true std {SPREAD:.4f}), seed {args.seed}")
    results = table(args.batches, args.batch_size, args.seed)
    columns = ["framework", "class", "running std", "std of y (last batch)"]
    if args.markdown:
        print("| " + " | ".join(columns) + " |\n|---|---|---:|---:|")
        print("\n".join("| " + " | ".join(r) + " |" for r in results))
    else:
        widths = [max(len(c) for c in col) for col in zip(columns, *results)]
        for r in [columns] + results:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)))


if __name__ == "__main__":
    main()
