"""examples/vmas_mappo.py: one iteration of a tiny configuration trains, logs the seed's metric names
for `fastnorm scan` and writes a checkpoint holding the normalizer; its observation normalizer keeps
per-(agent, feature) statistics equal to RunningNorm's on the env's stacked observations."""

from __future__ import annotations

import os
import sys

import pytest
import torch

import fastnorm

pytest.importorskip("vmas")
pytest.importorskip("torchrl")
pytest.importorskip("tensorboard")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))

import vmas_mappo  # noqa: E402
from fastnorm.monitoring.scan import scan  # noqa: E402
from torchrl.envs.libs.vmas import VmasEnv  # noqa: E402

TINY = ["--agents", "2", "--envs", "4", "--steps", "10", "--iters", "1", "--epochs", "1", "--minibatches", "2"]


@pytest.mark.parametrize("normalizer", ["fastnorm", "seed", "none"])
def test_one_iteration(tmp_path, normalizer):
    args = vmas_mappo.parse_args(TINY + ["--normalizer", normalizer, "--logdir", str(tmp_path), "--run", "tiny"])
    history = vmas_mappo.train(args)
    assert len(history) == 1
    for tag in ("train/advantages_std_raw", "train/advantages_norm_max_abs", "train/grad_norm",
                "train/clip_fraction", "train/explained_variance", "train/policy_loss", "train/value_loss",
                "rollout/ep_rew_mean"):
        assert torch.isfinite(torch.tensor(history[0][tag])), tag
    [report] = scan(str(tmp_path))
    assert report.missing == [] and report.status != "diverged", report.as_dict()
    state = torch.load(tmp_path / "tiny" / "checkpoint.pt", weights_only=True)
    assert {"actor", "critic", "optim"} <= set(state)
    if normalizer == "fastnorm":
        assert state["obs_norm"]["mean"].shape == (2, 18)  # navigation, 2 agents: 18 features each
        assert int(state["obs_norm"]["steps"]) == 12  # the first reset, 10 steps, the reset after the last


def test_obs_min_std_rel_reaches_the_observation_normalizer(tmp_path):
    args = vmas_mappo.parse_args(TINY + ["--obs-min-std-rel", "0.1", "--logdir", str(tmp_path), "--run", "tiny"])
    vmas_mappo.train(args)
    state = torch.load(tmp_path / "tiny" / "checkpoint.pt", weights_only=True)
    assert state["obs_norm"]["scale"].shape == (2, 18)
    assert vmas_mappo.parse_args(TINY).obs_min_std_rel is None


def test_normalizer_statistics_match_running_norm_on_the_stacked_observations():
    """The example's env (transform included) and a bare VmasEnv, same seed, same actions: the
    transform's statistics are RunningNorm's over the bare env's (envs, agents, features)
    observations, reset included, and its outputs are RunningNorm's outputs."""
    args = vmas_mappo.parse_args(["--scenario", "transport", "--agents", "3", "--envs", "8", "--steps", "50"])
    gen = torch.Generator().manual_seed(1)
    actions = [2 * torch.rand(8, 3, 2, generator=gen) - 1 for _ in range(6)]

    def rollout(env):
        step = iter(actions)
        torch.manual_seed(0)
        return env.rollout(len(actions), policy=lambda td: td.set(vmas_mappo.ACTION, next(step)))

    env, norm = vmas_mappo.make_env(args)
    normalized = rollout(env)
    raw = rollout(VmasEnv(scenario="transport", num_envs=8, continuous_actions=True, max_steps=50, seed=args.seed,
                          n_agents=3))
    # Contiguous, as the env hands them over (the kernel's summation order follows the layout).
    stacked = [x.contiguous() for x in [raw.get(vmas_mappo.OBS)[:, 0], *raw.get(("next", *vmas_mappo.OBS)).unbind(1)]]
    assert stacked[0].shape == (8, 3, 11)

    expected = fastnorm.RunningNorm((3, 11))
    outputs = [expected(x) for x in stacked]
    for name in ("mean", "var", "count", "steps"):
        torch.testing.assert_close(getattr(norm, name), getattr(expected, name), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(normalized.get(vmas_mappo.OBS)[:, 0], outputs[0])
    torch.testing.assert_close(normalized.get(("next", *vmas_mappo.OBS)), torch.stack(outputs[1:], 1))
    assert not torch.allclose(norm.mean[0], norm.mean[1])  # the agents' statistics are their own
