"""The running normalizers RL libraries ship, imported from their packages (never re-typed), each
as a benchmark `Case` doing what a user of that library pays per step: update the statistics with
the batch x of shape (B, *stats_shape) and normalize x.

They come with `pip install fastnorm[bench]` (`make bench` installs them). A peer that cannot be
imported is skipped, with the reason. None of them floors the std or warm-starts an EMA; their
other differences from fastnorm are in each case's note.
"""

from __future__ import annotations

import contextlib
import io
from types import SimpleNamespace
from typing import Callable

import torch

from timing import Case


def sb3_running_mean_std(x: torch.Tensor, stats_shape) -> Case:
    import numpy as np
    from stable_baselines3.common.running_mean_std import RunningMeanStd
    from stable_baselines3.common.vec_env import VecNormalize

    rms = RunningMeanStd(shape=tuple(stats_shape))
    # VecNormalize._normalize_obs reads only these two attributes (its defaults); calling it on a
    # stand-in avoids building a gym VecEnv around the benchmark.
    settings = SimpleNamespace(epsilon=1e-8, clip_obs=10.0)

    def step():
        arr = x.float().cpu().numpy()  # numpy has no bfloat16
        rms.update(arr)
        y = VecNormalize._normalize_obs(settings, arr, rms).astype(np.float32)
        return torch.from_numpy(y).to(device=x.device, dtype=x.dtype)

    return Case("SB3 RunningMeanStd (numpy)", step, "float64 numpy stats, cumulative; incl. tensor<->array")


def rsl_rl_empirical_normalization(x: torch.Tensor, stats_shape) -> Case:
    from rsl_rl.modules import EmpiricalNormalization

    norm = EmpiricalNormalization(tuple(stats_shape)).to(x.device)

    def step():
        norm.update(x)
        return norm(x)

    return Case("rsl-rl EmpiricalNormalization", step, "float32 stats, cumulative, no clamp")


def rl_games_running_mean_std(x: torch.Tensor, stats_shape) -> Case:
    from rl_games.algos_torch.running_mean_std import RunningMeanStd

    with contextlib.redirect_stdout(io.StringIO()):  # its constructor prints its size
        rms = RunningMeanStd(tuple(stats_shape)).to(x.device)
    return Case("rl-games RunningMeanStd", lambda: rms(x), "float64 stats, cumulative, clamp 5")


def torchrl_vecnorm_v2(x: torch.Tensor, stats_shape) -> Case:
    from tensordict import TensorDict
    from torchrl.envs.transforms import VecNorm

    vecnorm = VecNorm(in_keys=["obs"], out_keys=["obs_norm"], decay=0.99, eps=1e-4, reduce_batch_dims=True,
                      new_api=True)  # a VecNormV2
    data = TensorDict({"obs": x}, batch_size=[x.shape[0]], device=x.device)
    # _step is what a TransformedEnv calls on every env step.
    return Case("TorchRL VecNormV2", lambda: vecnorm._step(data, data)["obs_norm"],
                "x.dtype stats, EMA of E[x^2]-E[x]^2, no clamp")


PEERS: list[tuple[str, Callable[[torch.Tensor, tuple], Case]]] = [
    ("stable-baselines3", sb3_running_mean_std),
    ("rsl-rl-lib", rsl_rl_empirical_normalization),
    ("rl-games", rl_games_running_mean_std),
    ("torchrl", torchrl_vecnorm_v2),
]


def peer_cases(x: torch.Tensor, stats_shape) -> tuple[list[Case], dict[str, str]]:
    """The peers' cases for x, each called once here, and {package: why it is skipped} for those
    that cannot be imported or cannot run x."""
    cases, skipped = [], {}
    for package, make in PEERS:
        try:
            case = make(x, stats_shape)
        except Exception as error:  # an optional package missing or failing to load
            skipped[package] = _first_line(error)
            continue
        try:
            case.step()
        except Exception as error:
            skipped[package] = f"fails on {str(x.dtype).replace('torch.', '')} {tuple(x.shape)}: {_first_line(error)}"
            continue
        cases.append(case)
    return cases, skipped


def _first_line(error: Exception) -> str:
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"
