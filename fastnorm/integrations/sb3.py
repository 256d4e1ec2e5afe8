"""Stable-Baselines3's VecNormalize and PPO with fastnorm inside.

    from fastnorm.integrations.sb3 import PPO, VecNormalize      # was stable_baselines3
    env = VecNormalize(make_vec_env("Pendulum-v1", n_envs=8))     # fixes=True: EMA, floor, clamp
    model = PPO("MlpPolicy", env).learn(100_000)                  # advantages: fastnorm.normalize_advantages

``VecNormalize`` is a subclass of SB3's (same constructor, ``training``, ``norm_obs_keys``,
reward normalization by the running std of the discounted return, ``save`` / ``load``): its
``obs_rms`` and ``ret_rms`` are float64 fastnorm RunningNorms behind SB3's ``RunningMeanStd``
interface, so ``sync_envs_normalization``, ``EvalCallback`` and ``unwrap_vec_normalize`` work
unchanged. By default the statistics follow SB3's math (cumulative Chan merge, count prior 1e-4,
``clip((obs - mean) / sqrt(var + epsilon), -clip_obs, clip_obs)``); ``fixes=True`` adds fastnorm's
warm-started EMA and std floor to the observations' statistics (the clamp is SB3's clip_obs) and
the EMA to the returns'. In both modes non-finite observations or returns never reach the
statistics: they are counted (``obs_rms.nonfinite_count``), warned about, and the step's info of an
env whose observation had any gets ``"fastnorm_nonfinite_obs"`` (its number of such entries).

``PPO`` is SB3's PPO whose minibatch advantages go through ``fastnorm.normalize_advantages``
instead of ``(A - mean) / (std + 1e-8)``, with its statistics logged as ``train/advantages_*``.
"""

from __future__ import annotations

import copy
import pickle
from typing import Any, Optional

import numpy as np
import torch

from fastnorm.advantages import AdvantageStats, normalize_advantages
from fastnorm.integrations import require
from fastnorm.integrations.numpy_running_norm import NumpyRunningNorm

sb3 = require("stable_baselines3", "sb3")
from gymnasium import spaces  # noqa: E402  (a dependency of stable_baselines3)
from stable_baselines3.common import buffers  # noqa: E402
from stable_baselines3.common.running_mean_std import RunningMeanStd as _SB3RunningMeanStd  # noqa: E402
from stable_baselines3.common.vec_env import VecNormalize as _SB3VecNormalize  # noqa: E402

NONFINITE_INFO = "fastnorm_nonfinite_obs"
# fastnorm's floor of the advantages' std with fixes; without, SB3's epsilon (a floor, not an addend).
ADVANTAGE_MIN_STD = {False: 1e-8, True: 1e-4}

__all__ = ["DictRolloutBuffer", "PPO", "RolloutBuffer", "RunningMeanStd", "VecNormalize"]


class RunningMeanStd(NumpyRunningNorm, _SB3RunningMeanStd):
    """SB3's RunningMeanStd (``mean``, ``var``, ``count``, ``update``, ``copy``) held by a float64
    fastnorm RunningNorm (see NumpyRunningNorm)."""

    def copy(self) -> "RunningMeanStd":
        return copy.deepcopy(self)

    @classmethod
    def adopt(cls, statistics: _SB3RunningMeanStd, *, eps: float, clip: Optional[float], fixes: bool
              ) -> "RunningMeanStd":
        """A RunningMeanStd with the statistics of SB3's (or of another of ours) and these settings."""
        adopted = cls(np.shape(statistics.mean), eps=eps, clip=clip, fixes=fixes)
        adopted.load_statistics(statistics.mean, statistics.var, statistics.count)
        if isinstance(statistics, NumpyRunningNorm):
            adopted.nonfinite_count = statistics.nonfinite_count
        return adopted


class VecNormalize(_SB3VecNormalize):
    """``stable_baselines3.common.vec_env.VecNormalize`` with fastnorm statistics.

    Args: those of SB3's VecNormalize, and
        fixes: False (default): SB3's math. True: fastnorm's warm-started EMA momentum and std
            floor on the observations (EMA only on the returns).
    """

    def __init__(self, venv, training: bool = True, norm_obs: bool = True, norm_reward: bool = True,
                 clip_obs: float = 10.0, clip_reward: float = 10.0, gamma: float = 0.99, epsilon: float = 1e-8,
                 norm_obs_keys: Optional[list[str]] = None, *, fixes: bool = False):
        super().__init__(venv, training=training, norm_obs=norm_obs, norm_reward=norm_reward, clip_obs=clip_obs,
                         clip_reward=clip_reward, gamma=gamma, epsilon=epsilon, norm_obs_keys=norm_obs_keys)
        self._adopt_statistics(fixes)

    def _adopt_statistics(self, fixes: bool) -> None:
        """Moves obs_rms and ret_rms (SB3's or ours) into RunningNorms with the settings of ``fixes``."""
        self.fixes = fixes

        def adopt(statistics, clip):
            return RunningMeanStd.adopt(statistics, eps=self.epsilon, clip=clip, fixes=fixes)

        if hasattr(self, "obs_rms"):
            if isinstance(self.obs_rms, dict):
                self.obs_rms = {key: adopt(rms, self.clip_obs) for key, rms in self.obs_rms.items()}
            else:
                self.obs_rms = adopt(self.obs_rms, self.clip_obs)
        self.ret_rms = adopt(self.ret_rms, None)

    def _normalize_obs(self, obs: np.ndarray, obs_rms: RunningMeanStd) -> np.ndarray:
        return obs_rms.normalize(obs)

    def _unnormalize_obs(self, obs: np.ndarray, obs_rms: RunningMeanStd) -> np.ndarray:
        return obs_rms.denormalize(obs)

    def step_wait(self):
        obs, rewards, dones, infos = super().step_wait()
        if self.training and self.norm_obs and self._last_nonfinite():
            raw = self.old_obs if isinstance(self.old_obs, dict) else {None: self.old_obs}
            per_env = sum((~np.isfinite(raw[key])).reshape(self.num_envs, -1).sum(1) for key in self._obs_keys())
            for env, count in enumerate(per_env):
                if count:
                    infos[env][NONFINITE_INFO] = int(count)
        return obs, rewards, dones, infos

    def _obs_keys(self) -> list:
        return list(self.obs_rms) if isinstance(self.obs_rms, dict) else [None]

    def _last_nonfinite(self) -> int:
        rms = self.obs_rms.values() if isinstance(self.obs_rms, dict) else [self.obs_rms]
        return sum(r.last_nonfinite for r in rms)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # SB3's pickles hold SB3's RunningMeanStd and no `fixes`: they load with SB3's math.
        self._adopt_statistics(state.get("fixes", False))

    @classmethod
    def load(cls, load_path: str, venv, *, fixes: Optional[bool] = None) -> "VecNormalize":
        """Loads a VecNormalize saved by this class or by SB3's own and wraps venv with it.

        Args:
            load_path: the pickle written by ``save``.
            venv: the VecEnv to wrap.
            fixes: None keeps the saved setting (False for SB3's file); a bool overrides it.
        """
        with open(load_path, "rb") as file:
            loaded = pickle.load(file)
        if not isinstance(loaded, _SB3VecNormalize):
            raise TypeError(f"{load_path} holds a {type(loaded).__name__}, not a VecNormalize")
        if not isinstance(loaded, cls):
            adopted = cls.__new__(cls)
            adopted.__setstate__(_pickled_state(loaded))
            loaded = adopted
        if fixes is not None and fixes != loaded.fixes:
            loaded._adopt_statistics(fixes)
        loaded.set_venv(venv)
        return loaded


def _pickled_state(vec_normalize: _SB3VecNormalize) -> dict[str, Any]:
    """What SB3's VecNormalize pickles (its __getstate__ drops the venv)."""
    state = dict(vars(vec_normalize))
    state.pop("venv", None)
    return state


# ---------------------------------------------------------------------------------------- PPO


class _AdvantageNormalizingBuffer:
    """Mixed into SB3's rollout buffers: minibatches come out with their advantages normalized by
    fastnorm.normalize_advantages (floor ``advantage_min_std``; None: as stored), and the
    statistics of every minibatch since the last rollout are kept in ``advantage_stats``."""

    advantage_min_std: Optional[float] = None

    def reset(self) -> None:
        super().reset()
        self.advantage_stats: list[AdvantageStats] = []

    def _get_samples(self, batch_inds: np.ndarray, env=None):
        samples = super()._get_samples(batch_inds, env)
        # As SB3: a minibatch of one is not normalized (GH #325).
        if self.advantage_min_std is None or len(samples.advantages) < 2:
            return samples
        advantages, stats = normalize_advantages(samples.advantages, min_std=self.advantage_min_std)
        self.advantage_stats.append(stats)
        return samples._replace(advantages=advantages)


class RolloutBuffer(_AdvantageNormalizingBuffer, buffers.RolloutBuffer):
    """SB3's RolloutBuffer whose minibatches carry fastnorm-normalized advantages (for PPO)."""


class DictRolloutBuffer(_AdvantageNormalizingBuffer, buffers.DictRolloutBuffer):
    """SB3's DictRolloutBuffer whose minibatches carry fastnorm-normalized advantages (for PPO)."""


class PPO(sb3.PPO):
    """``stable_baselines3.PPO`` normalizing each minibatch's advantages with
    ``fastnorm.normalize_advantages``: ``(A - mean) / max(std, min_std)`` instead of
    ``(A - mean) / (std + 1e-8)``, and ``train/advantages_std_raw``, ``..._norm_max_abs``,
    ``..._std_below_floor`` (over the minibatches of the update: smallest std, largest |A|,
    fraction floored), ``..._mean`` and ``..._count`` logged.

    Args: those of SB3's PPO (``normalize_advantage=False`` leaves advantages as they are), and
        fixes: False (default): the floor is SB3's 1e-8. True: fastnorm's floor 1e-4, so a
            minibatch of near-equal advantages is not blown up to magnitude sqrt(n).

    A ``rollout_buffer_class`` given must be one of this module's buffers (or mix in theirs).
    """

    def __init__(self, *args, fixes: bool = False, **kwargs):
        if not isinstance(fixes, bool):
            raise TypeError(f"fixes must be a bool, got {type(fixes).__name__}")
        self.fixes = fixes
        super().__init__(*args, **kwargs)

    def _setup_model(self) -> None:
        if self.rollout_buffer_class is None:
            dict_obs = isinstance(self.observation_space, spaces.Dict)
            self.rollout_buffer_class = DictRolloutBuffer if dict_obs else RolloutBuffer
        if not issubclass(self.rollout_buffer_class, _AdvantageNormalizingBuffer):
            raise TypeError("rollout_buffer_class must be fastnorm.integrations.sb3.RolloutBuffer or "
                            f"DictRolloutBuffer (or a subclass), got {self.rollout_buffer_class.__name__}")
        super()._setup_model()

    def train(self) -> None:
        # SB3's train() reads the minibatches from the buffer, which normalizes their advantages:
        # its own formula is switched off for the call.
        normalize = self.normalize_advantage
        self.rollout_buffer.advantage_min_std = ADVANTAGE_MIN_STD[self.fixes] if normalize else None
        self.normalize_advantage = False
        try:
            super().train()
        finally:
            self.normalize_advantage = normalize
        stats = self.rollout_buffer.advantage_stats
        if stats:
            merged = AdvantageStats(*(torch.stack(field) for field in zip(*stats)))
            for name, value in merged.as_dict(prefix="train/advantages_").items():
                self.logger.record(name, value)
