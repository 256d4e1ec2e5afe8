"""fastnorm.integrations.sb3: VecNormalize and PPO with fastnorm inside, in SB3's own learn() loop,
beside SB3's VecNormalize (same numbers by default, NaN kept out, pickles both ways)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

pytest.importorskip("stable_baselines3")
import gymnasium as gym  # noqa: E402
import stable_baselines3  # noqa: E402
from stable_baselines3.common.callbacks import EvalCallback  # noqa: E402
from stable_baselines3.common.env_util import make_vec_env  # noqa: E402
from stable_baselines3.common.running_mean_std import RunningMeanStd as SB3RunningMeanStd  # noqa: E402
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnvWrapper, unwrap_vec_normalize  # noqa: E402
from stable_baselines3.common.vec_env import VecNormalize as SB3VecNormalize  # noqa: E402

from fastnorm.integrations.sb3 import ADVANTAGE_MIN_STD, NONFINITE_INFO, PPO, RolloutBuffer, RunningMeanStd, VecNormalize  # noqa: E402

# SB3 reduces float32 observations in float32 (np.mean), fastnorm in float64.
RTOL, ATOL = 1e-5, 1e-5
STAT_ATOL = 2e-6  # a mean near 0 of float32 features (tests/helpers.py STAT_TOL)
PPO_SMALL = dict(n_steps=64, batch_size=64, n_epochs=2, policy_kwargs=dict(net_arch=[16]), device="cpu")


@pytest.fixture
def seed(gen) -> int:
    return int(torch.randint(2**31 - 1, (1,), generator=gen))


class InjectNaN(VecEnvWrapper):
    """Puts NaN into env 1's first observation entry at step `at`."""

    def __init__(self, venv, at):
        super().__init__(venv)
        self.at, self.steps = at, 0

    def reset(self):
        return self.venv.reset()

    def step_wait(self):
        obs, rewards, dones, infos = self.venv.step_wait()
        self.steps += 1
        if self.steps == self.at:
            obs = obs.copy()
            obs[1, 0] = np.nan
        return obs, rewards, dones, infos


def random_actions(env, steps, seed):
    space = env.action_space
    space.seed(seed)
    return [np.stack([space.sample() for _ in range(env.num_envs)]) for _ in range(steps)]


def assert_same_normalization(ours, theirs, obs):
    np.testing.assert_allclose(ours.normalize_obs(obs), theirs.normalize_obs(obs), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
def test_matches_sb3_step_by_step(env_id, seed):
    ours = VecNormalize(make_vec_env(env_id, n_envs=3, seed=seed))
    theirs = SB3VecNormalize(make_vec_env(env_id, n_envs=3, seed=seed))
    np.testing.assert_allclose(ours.reset(), theirs.reset(), rtol=RTOL, atol=ATOL)
    for actions in random_actions(ours, 150, seed):
        obs, rewards, dones, infos = ours.step(actions)
        obs_sb3, rewards_sb3, dones_sb3, infos_sb3 = theirs.step(actions)
        assert obs.dtype == np.float32 and rewards.dtype == np.float32
        np.testing.assert_allclose(obs, obs_sb3, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(rewards, rewards_sb3, rtol=RTOL, atol=ATOL)
        for info, info_sb3 in zip(infos, infos_sb3):
            if "terminal_observation" in info:
                np.testing.assert_allclose(info["terminal_observation"], info_sb3["terminal_observation"],
                                           rtol=RTOL, atol=ATOL)
    assert ours.obs_rms.count == pytest.approx(theirs.obs_rms.count)
    np.testing.assert_allclose(ours.obs_rms.mean, theirs.obs_rms.mean, rtol=RTOL, atol=STAT_ATOL)
    np.testing.assert_allclose(ours.ret_rms.var, theirs.ret_rms.var, rtol=1e-9)
    np.testing.assert_allclose(ours.unnormalize_obs(obs), ours.get_original_obs(), rtol=RTOL, atol=1e-4)


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
def test_ppo_learns_save_load_continue(env_id, seed, tmp_path):
    env = VecNormalize(make_vec_env(env_id, n_envs=4, seed=seed))
    model = PPO("MlpPolicy", env, seed=seed, **PPO_SMALL).learn(512)
    assert unwrap_vec_normalize(model.get_env()) is env
    assert isinstance(env.obs_rms, RunningMeanStd) and isinstance(env.ret_rms, RunningMeanStd)
    assert env.obs_rms.count == pytest.approx(4 * (512 // 4 + 1) + 1e-4)  # one batch per step and reset
    assert np.isfinite(env.obs_rms.var).all() and (env.obs_rms.var > 0).all()
    assert model.logger.name_to_value["train/advantages_count"] == 2 * 256  # 2 epochs of 4 envs x 64 steps
    assert np.isfinite(model.logger.name_to_value["train/advantages_std_raw"])

    model.save(tmp_path / "model")
    env.save(tmp_path / "vec_normalize.pkl")
    probe = np.stack([env.observation_space.sample() for _ in range(5)])
    expected = env.normalize_obs(probe)

    loaded_env = VecNormalize.load(tmp_path / "vec_normalize.pkl", make_vec_env(env_id, n_envs=4, seed=seed + 1))
    assert type(loaded_env) is VecNormalize and not loaded_env.fixes
    np.testing.assert_array_equal(loaded_env.normalize_obs(probe), expected)
    loaded = PPO.load(tmp_path / "model", env=loaded_env, device="cpu")
    count = loaded_env.obs_rms.count
    loaded.learn(256, reset_num_timesteps=False)
    assert loaded_env.obs_rms.count == pytest.approx(count + 4 * (256 // 4 + 1))
    assert loaded.num_timesteps == 512 + 256


def test_eval_callback_with_synced_eval_env(seed):
    env = VecNormalize(make_vec_env("CartPole-v1", n_envs=2, seed=seed))
    eval_env = VecNormalize(make_vec_env("CartPole-v1", n_envs=1, seed=seed + 1), training=False, norm_reward=False)
    callback = EvalCallback(eval_env, eval_freq=64, n_eval_episodes=2, warn=False)
    PPO("MlpPolicy", env, seed=seed, **PPO_SMALL).learn(256, callback=callback)
    assert callback.n_calls >= 64 and np.isfinite(callback.last_mean_reward)  # it evaluated
    # sync_envs_normalization deep-copied the training statistics into the eval env, which left them as they were.
    assert eval_env.obs_rms is not env.obs_rms and isinstance(eval_env.obs_rms, RunningMeanStd)
    count_at_sync = eval_env.obs_rms.count
    assert 0 < count_at_sync <= env.obs_rms.count
    eval_env.reset()
    eval_env.step(np.zeros(1, dtype=np.int64))
    assert eval_env.obs_rms.count == count_at_sync  # training=False: no update
    probe = np.stack([env.observation_space.sample() for _ in range(4)])
    eval_env.obs_rms = env.obs_rms.copy()
    np.testing.assert_array_equal(eval_env.normalize_obs(probe), env.normalize_obs(probe))


def test_nan_observation_stays_out_of_the_statistics(seed):
    ours = VecNormalize(InjectNaN(make_vec_env("Pendulum-v1", n_envs=3, seed=seed), at=20))
    theirs = SB3VecNormalize(InjectNaN(make_vec_env("Pendulum-v1", n_envs=3, seed=seed), at=20))
    ours.reset()
    theirs.reset()
    for step, actions in enumerate(random_actions(ours, 40, seed), start=1):
        if step == 20:
            with pytest.warns(RuntimeWarning, match="non-finite"):
                obs, _, _, infos = ours.step(actions)
            assert np.isnan(obs[1, 0]) and infos[1][NONFINITE_INFO] == 1
            assert NONFINITE_INFO not in infos[0] and NONFINITE_INFO not in infos[2]
        else:
            obs, _, _, infos = ours.step(actions)
            assert np.isfinite(obs).all() and all(NONFINITE_INFO not in info for info in infos)
        theirs.step(actions)
    assert np.isfinite(ours.obs_rms.mean).all() and np.isfinite(ours.obs_rms.var).all()
    assert ours.obs_rms.nonfinite_count == 1
    np.testing.assert_allclose(ours.obs_rms.count, [3 * 41 + 1e-4 - 1, 3 * 41 + 1e-4, 3 * 41 + 1e-4])
    assert np.isnan(theirs.obs_rms.mean[0]) and np.isnan(theirs.obs_rms.var[0])  # SB3's: poisoned for good
    # The other features saw the same finite data in both.
    np.testing.assert_allclose(ours.obs_rms.mean[1:], theirs.obs_rms.mean[1:], rtol=RTOL, atol=STAT_ATOL)


def test_sb3_pickle_loads_into_ours_and_back(seed, tmp_path):
    theirs = SB3VecNormalize(make_vec_env("Pendulum-v1", n_envs=2, seed=seed), clip_obs=5.0)
    theirs.reset()
    for actions in random_actions(theirs, 30, seed):
        theirs.step(actions)
    probe = np.stack([theirs.observation_space.sample() * 3 for _ in range(6)])
    theirs.save(tmp_path / "sb3.pkl")

    ours = VecNormalize.load(tmp_path / "sb3.pkl", make_vec_env("Pendulum-v1", n_envs=2, seed=seed))
    assert type(ours) is VecNormalize and isinstance(ours.obs_rms, RunningMeanStd) and not ours.fixes
    assert ours.clip_obs == 5.0 and ours.obs_rms.count == theirs.obs_rms.count
    assert_same_normalization(ours, theirs, probe)
    np.testing.assert_array_equal(ours.obs_rms.mean, theirs.obs_rms.mean)

    ours.save(tmp_path / "ours.pkl")
    back = SB3VecNormalize.load(tmp_path / "ours.pkl", make_vec_env("Pendulum-v1", n_envs=2, seed=seed))
    assert isinstance(back, SB3VecNormalize)
    assert_same_normalization(back, theirs, probe)
    with_fixes = VecNormalize.load(tmp_path / "sb3.pkl", make_vec_env("Pendulum-v1", n_envs=2), fixes=True)
    assert with_fixes.fixes and with_fixes.obs_rms.norm.momentum is not None
    np.testing.assert_array_equal(with_fixes.obs_rms.var, theirs.obs_rms.var)

    # A poisoned SB3 file is refused rather than adopted.
    theirs.obs_rms.mean[0] = np.nan
    theirs.save(tmp_path / "poisoned.pkl")
    with pytest.raises(ValueError, match="non-finite"):
        VecNormalize.load(tmp_path / "poisoned.pkl", make_vec_env("Pendulum-v1", n_envs=2))


class DictObsEnv(gym.Env):
    observation_space = gym.spaces.Dict({"state": gym.spaces.Box(-np.inf, np.inf, (3,), np.float32),
                                         "goal": gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)})
    action_space = gym.spaces.Discrete(2)

    def __init__(self, seed=0):
        self.rng = np.random.default_rng(seed)

    def _obs(self):
        return {"state": self.rng.normal(5.0, 2.0, 3).astype(np.float32),
                "goal": self.rng.normal(-1.0, 0.5, 2).astype(np.float32)}

    def reset(self, *, seed=None, options=None):
        return self._obs(), {}

    def step(self, action):
        return self._obs(), 1.0, False, False, {}


def test_dict_observations_norm_obs_keys(seed, tmp_path):
    def make(s):
        return DummyVecEnv([lambda i=i: DictObsEnv(s + i) for i in range(2)])

    ours = VecNormalize(make(seed), norm_obs_keys=["state"])
    theirs = SB3VecNormalize(make(seed), norm_obs_keys=["state"])
    assert set(ours.obs_rms) == {"state"}
    ours.reset()
    theirs.reset()
    for _ in range(20):
        obs, *_ = ours.step(np.zeros(2, dtype=np.int64))
        obs_sb3, *_ = theirs.step(np.zeros(2, dtype=np.int64))
        np.testing.assert_allclose(obs["state"], obs_sb3["state"], rtol=RTOL, atol=ATOL)
        np.testing.assert_array_equal(obs["goal"], obs_sb3["goal"])  # not normalized
    theirs.save(tmp_path / "dict.pkl")
    loaded = VecNormalize.load(tmp_path / "dict.pkl", make(seed))
    assert isinstance(loaded.obs_rms["state"], RunningMeanStd)
    np.testing.assert_array_equal(loaded.obs_rms["state"].mean, theirs.obs_rms["state"].mean)


def test_ppo_default_reproduces_sb3(seed):
    """fixes=False: the floor is SB3's 1e-8, so training follows SB3's PPO to float rounding."""
    models = []
    for cls in (stable_baselines3.PPO, PPO):
        env = make_vec_env("CartPole-v1", n_envs=2, seed=seed)
        models.append(cls("MlpPolicy", env, seed=seed, **{**PPO_SMALL, "batch_size": 32}).learn(128))
    for ours, theirs in zip(models[1].policy.parameters(), models[0].policy.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fixes", [False, True])
def test_ppo_buffer_floors_near_equal_advantages(fixes, seed):
    """A minibatch of 1024 equal advantages but one (raw std 3e-8): SB3's formula and the default
    floor 1e-8 give the odd one |A| ~ sqrt(1024) = 32; fastnorm's floor 1e-4 gives 0.01."""
    env = make_vec_env("CartPole-v1", n_envs=1, seed=seed)
    model = PPO("MlpPolicy", env, seed=seed, fixes=fixes, n_steps=1024, batch_size=1024, device="cpu")
    buffer = model.rollout_buffer
    assert isinstance(buffer, RolloutBuffer)
    buffer.reset()
    buffer.advantages[:] = 0.25
    buffer.advantages[np.random.default_rng(seed).integers(1024)] += 1e-6
    buffer.full, buffer.advantage_min_std = True, ADVANTAGE_MIN_STD[fixes]
    (batch,) = list(buffer.get(batch_size=1024))
    max_abs = float(batch.advantages.abs().max())
    if fixes:
        assert max_abs < 0.05
    else:
        assert max_abs > 20
    (stats,) = buffer.advantage_stats
    assert bool(stats.std_below_floor) == fixes


def test_ppo_hook_leaves_sb3_switches_alone(seed):
    env = make_vec_env("CartPole-v1", n_envs=2, seed=seed)
    model = PPO("MlpPolicy", env, seed=seed, normalize_advantage=False, **PPO_SMALL).learn(128)
    assert model.normalize_advantage is False and model.rollout_buffer.advantage_stats == []
    with pytest.raises(TypeError, match="rollout_buffer_class"):
        from stable_baselines3.common.buffers import RolloutBuffer as SB3RolloutBuffer
        PPO("MlpPolicy", env, rollout_buffer_class=SB3RolloutBuffer, **PPO_SMALL)
    with pytest.raises(TypeError, match="fixes must be a bool"):
        VecNormalize(make_vec_env("CartPole-v1", n_envs=1), fixes=1)


def test_running_mean_std_is_sb3s(seed):
    rms = RunningMeanStd.adopt(SB3RunningMeanStd(shape=(4,)), eps=1e-8, clip=10.0, fixes=False)
    assert isinstance(rms, SB3RunningMeanStd) and rms.count == pytest.approx(1e-4)
    data = np.random.default_rng(seed).normal(3.0, 2.0, (50, 4))
    reference = SB3RunningMeanStd(shape=(4,))
    for batch in np.split(data, 5):
        rms.update(batch)
        reference.update(batch)
    np.testing.assert_allclose(rms.mean, reference.mean, rtol=1e-12)
    np.testing.assert_allclose(rms.var, reference.var, rtol=1e-12)
    other = rms.copy()
    other.combine(reference)  # SB3's own merge, run through the statistics' setters
    assert other.count == pytest.approx(2 * reference.count)
    assert rms.count == pytest.approx(reference.count)  # copy() is deep
    restored = pickle.loads(pickle.dumps(rms))
    np.testing.assert_array_equal(restored.var, rms.var)
    assert restored.norm.steps == rms.norm.steps == 5
