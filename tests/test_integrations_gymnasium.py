"""fastnorm.integrations.gymnasium: Gymnasium's NormalizeObservation wrappers with fastnorm statistics,
in Gymnasium's own step loop, beside Gymnasium's wrappers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

gym = pytest.importorskip("gymnasium")
from gymnasium.wrappers import NormalizeObservation as GymNormalizeObservation  # noqa: E402
from gymnasium.wrappers.utils import RunningMeanStd as GymRunningMeanStd  # noqa: E402
from gymnasium.wrappers.vector import NormalizeObservation as GymVectorNormalizeObservation  # noqa: E402

from fastnorm.integrations.gymnasium import NONFINITE_INFO, NormalizeObservation, VectorNormalizeObservation  # noqa: E402

# Gymnasium keeps its statistics in float32 (from the wrapper's float32 space), fastnorm in float64.
RTOL, ATOL = 1e-4, 1e-4
GYM_STAT_ATOL = 1e-5  # float32 running statistics near 0
# fastnorm's statistics of float32 batches against float64 numpy (tests/helpers.py STAT_TOL).
STAT_RTOL = 2e-6


@pytest.fixture
def seed(gen) -> int:
    return int(torch.randint(2**31 - 1, (1,), generator=gen))


class AgentsEnv(gym.vector.VectorEnv):
    """A vector env of num_envs x agents x features observations, each agent with its own scale,
    drawn fresh each step; `nan_at` puts NaN into env 1's observation at that step."""

    metadata = {"autoreset_mode": gym.vector.AutoresetMode.NEXT_STEP}

    def __init__(self, num_envs, agents, features, seed, nan_at=None):
        self.num_envs = num_envs
        self.single_observation_space = gym.spaces.Box(-np.inf, np.inf, (agents, features), np.float32)
        self.observation_space = gym.vector.utils.batch_space(self.single_observation_space, num_envs)
        self.single_action_space = gym.spaces.Discrete(2)
        self.action_space = gym.vector.utils.batch_space(self.single_action_space, num_envs)
        self.rng = np.random.default_rng(seed)
        self.scale = np.arange(1, agents + 1, dtype=np.float32)[:, None] * 10.0 ** np.arange(features)[None]
        self.nan_at, self.steps, self.seen = nan_at, 0, []

    def _obs(self):
        obs = (self.rng.normal(size=self.observation_space.shape) * self.scale + self.scale).astype(np.float32)
        self.seen.append(obs.copy())
        if self.steps == self.nan_at:
            obs[1, 0, 0] = np.nan
        return obs

    def reset(self, *, seed=None, options=None):
        return self._obs(), {}

    def step(self, actions):
        self.steps += 1
        done = np.zeros(self.num_envs, dtype=bool)
        return self._obs(), np.zeros(self.num_envs), done, done, {}


def test_single_env_matches_gymnasium(seed):
    ours, theirs = NormalizeObservation(gym.make("Pendulum-v1")), GymNormalizeObservation(gym.make("Pendulum-v1"))
    assert ours.observation_space == theirs.observation_space
    actions = np.random.default_rng(seed).uniform(-2, 2, (150, 1)).astype(np.float32)
    y, _ = ours.reset(seed=seed)
    expected, _ = theirs.reset(seed=seed)
    for step, action in enumerate(actions):
        if step == 100:  # frozen statistics: normalize only
            ours.update_running_mean = theirs.update_running_mean = False
        y, *_ = ours.step(action)
        expected, *_ = theirs.step(action)
        assert y.dtype == np.float32 and y.shape == expected.shape
        np.testing.assert_allclose(y, expected, rtol=RTOL, atol=ATOL)
    assert ours.obs_rms.count == pytest.approx(101 + 1e-4)  # reset + 100 steps, then frozen
    np.testing.assert_allclose(ours.obs_rms.mean, theirs.obs_rms.mean, rtol=RTOL, atol=GYM_STAT_ATOL)
    np.testing.assert_allclose(ours.obs_rms.var, theirs.obs_rms.var, rtol=RTOL, atol=GYM_STAT_ATOL)
    assert ours.obs_rms.mean.dtype == np.float64


def test_vector_env_matches_gymnasium(seed):
    def make():
        return gym.make_vec("CartPole-v1", num_envs=4, vectorization_mode="sync")

    ours, theirs = VectorNormalizeObservation(make()), GymVectorNormalizeObservation(make())
    assert ours.observation_space == theirs.observation_space
    assert ours.single_observation_space == theirs.single_observation_space
    y, _ = ours.reset(seed=seed)
    expected, _ = theirs.reset(seed=seed)
    actions = np.random.default_rng(seed).integers(0, 2, (120, 4))
    ends = 0
    for action in actions:  # CartPole episodes end here: NEXT_STEP autoreset runs through the wrapper
        y, _, terminated, truncated, _ = ours.step(action)
        expected, *_ = theirs.step(action)
        ends += int((terminated | truncated).sum())
        assert y.dtype == np.float32
        np.testing.assert_allclose(y, expected, rtol=RTOL, atol=ATOL)
    assert ends > 0
    np.testing.assert_allclose(ours.obs_rms.mean, theirs.obs_rms.mean, rtol=RTOL, atol=GYM_STAT_ATOL)
    assert ours.obs_rms.count == pytest.approx(theirs.obs_rms.count)


def test_vector_statistics_per_agent_and_feature(seed):
    env = AgentsEnv(num_envs=6, agents=3, features=4, seed=seed)
    wrapped = VectorNormalizeObservation(env)
    wrapped.reset(seed=seed)
    for _ in range(40):
        y, *_ = wrapped.step(np.zeros(6, dtype=np.int64))
    # What Gymnasium's RunningMeanStd computes, in float64, on the same observations.
    expected = GymRunningMeanStd(shape=(3, 4), dtype=np.float64)
    for obs in env.seen:
        expected.update(obs.astype(np.float64))
    assert wrapped.obs_rms.mean.shape == (3, 4)
    np.testing.assert_allclose(wrapped.obs_rms.mean, expected.mean, rtol=STAT_RTOL)
    np.testing.assert_allclose(wrapped.obs_rms.var, expected.var, rtol=STAT_RTOL)
    y_expected = (env.seen[-1] - expected.mean) / np.sqrt(expected.var + 1e-8)
    np.testing.assert_allclose(y, y_expected, rtol=1e-5, atol=1e-5)
    # Each agent and feature has its own scale: the normalized batch is near unit std in each.
    assert np.all(np.abs(np.log(np.concatenate(env.seen).std(0) / np.sqrt(wrapped.obs_rms.var))) < 0.1)


def test_vector_nan_observation_stays_out_of_the_statistics(seed):
    ours_env = AgentsEnv(num_envs=4, agents=2, features=3, seed=seed, nan_at=5)
    theirs_env = AgentsEnv(num_envs=4, agents=2, features=3, seed=seed, nan_at=5)
    ours, theirs = VectorNormalizeObservation(ours_env), GymVectorNormalizeObservation(theirs_env)
    ours.reset(seed=seed)
    theirs.reset(seed=seed)
    infos_at = {}
    for step in range(1, 10):
        if step == 5:
            with pytest.warns(RuntimeWarning, match="non-finite"):
                y, _, _, _, infos_at[step] = ours.step(np.zeros(4, dtype=np.int64))
            assert np.isnan(y[1, 0, 0]) and np.isfinite(np.delete(y.reshape(4, -1), 0, axis=1)).all()
        else:
            y, _, _, _, infos_at[step] = ours.step(np.zeros(4, dtype=np.int64))
        theirs.step(np.zeros(4, dtype=np.int64))
    assert np.isfinite(ours.obs_rms.mean).all() and np.isfinite(ours.obs_rms.var).all()
    assert np.isnan(theirs.obs_rms.mean[0, 0])  # Gymnasium's statistics are poisoned for good
    np.testing.assert_array_equal(infos_at[5][NONFINITE_INFO], [0, 1, 0, 0])
    np.testing.assert_array_equal(infos_at[5]["_" + NONFINITE_INFO], [False, True, False, False])
    assert NONFINITE_INFO not in infos_at[6]
    assert ours.obs_rms.nonfinite_count == 1
    # The NaN entry left out, everything else counted: the statistics of the finite data.
    seen = np.stack(ours_env.seen)  # (steps, envs, agents, features), before the NaN was put in
    seen[5, 1, 0, 0] = np.nan
    flat = seen.reshape(-1, 2, 3)
    count = np.isfinite(flat).sum(0) + 1e-4
    mean = np.nansum(flat, 0) / count  # the prior (mean 0, weight 1e-4) pulls the mean by 1e-4 / count
    np.testing.assert_allclose(ours.obs_rms.mean, mean, rtol=STAT_RTOL)
    assert ours.obs_rms.count[0, 0] == pytest.approx(count[0, 0])
    assert ours.obs_rms.count[0, 1] == pytest.approx(count[0, 1])


def test_fixes_floor_and_clamp(seed):
    rng = np.random.default_rng(seed)

    class ConstantThenJump(gym.Env):
        observation_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float64)
        action_space = gym.spaces.Discrete(2)

        def __init__(self):
            self.t = 0

        def reset(self, *, seed=None, options=None):
            return np.array([3.0, rng.normal()]), {}

        def step(self, action):
            self.t += 1
            return np.array([3.0 if self.t < 200 else 4.0, rng.normal()]), 0.0, False, False, {}

    default, fixed = NormalizeObservation(ConstantThenJump()), NormalizeObservation(ConstantThenJump(), fixes=True)
    default.reset()
    fixed.reset()
    for step in range(1, 201):
        if step == 200:  # normalize the jump with the statistics of the constant stretch
            default.update_running_mean = fixed.update_running_mean = False
        y_default, *_ = default.step(0)
        y_fixed, *_ = fixed.step(0)
    # A feature constant for 199 steps has std ~0: Gymnasium's divisor is ~2e-3 (the prior's weight).
    assert abs(y_default[0]) > 100
    assert y_fixed[0] == pytest.approx(10.0)  # the floor 1e-2 gives 100, the clamp 10
    assert np.sqrt(fixed.obs_rms.var[0]) < 1e-2
    assert y_fixed.dtype == np.float32 and fixed.obs_rms.fixes


def test_vector_wrapper_keeps_gymnasiums_checks():
    class SameStep(AgentsEnv):
        metadata = {"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP}

    with pytest.raises(ValueError, match="NEXT_STEP"):
        VectorNormalizeObservation(SameStep(2, 1, 2, seed=0))
    wrapped = VectorNormalizeObservation(AgentsEnv(2, 1, 2, seed=0))
    with pytest.raises(ValueError, match="partial resets"):
        wrapped.reset(options={"reset_mask": np.array([True, False])})
    with pytest.raises(gym.error.InvalidBound):
        NormalizeObservation(gym.make("Pendulum-v1"), epsilon=0.0)
    with pytest.raises(TypeError, match="fixes must be a bool"):
        NormalizeObservation(gym.make("Pendulum-v1"), fixes="yes")
