"""Gymnasium's NormalizeObservation wrappers with fastnorm's statistics.

    from fastnorm.integrations.gymnasium import NormalizeObservation        # was gymnasium.wrappers
    env = NormalizeObservation(gym.make("Pendulum-v1"))                      # fixes=True: EMA, floor, clamp
    envs = VectorNormalizeObservation(gym.make_vec("Pendulum-v1", num_envs=8))

Subclasses of ``gymnasium.wrappers.NormalizeObservation`` and
``gymnasium.wrappers.vector.NormalizeObservation`` (same constructor, ``obs_rms``, ``epsilon``,
``update_running_mean``, float32 observation space, the vector one's autoreset and partial-reset
checks), whose ``obs_rms`` is a float64 RunningNorm per observation element (per agent and
feature for an observation ``(agents, features)``). By default the output is Gymnasium's:
``(obs - mean) / sqrt(var + epsilon)`` with the cumulative statistics (count prior 1e-4), no clip;
``fixes=True`` adds fastnorm's warm-started EMA, std floor and clamp to 10. In both modes a
non-finite observation entry never reaches the statistics: it is counted in
``obs_rms.nonfinite_count``, warned about, and flagged in the step's info under
``"fastnorm_nonfinite_obs"`` (the number of entries; per env, with ``"_fastnorm_nonfinite_obs"``,
for the vector wrapper).
"""

from __future__ import annotations

import numpy as np

from fastnorm.integrations import require
from fastnorm.integrations.numpy_running_norm import NumpyRunningNorm

gym = require("gymnasium", "gymnasium")
from gymnasium.wrappers import NormalizeObservation as _GymNormalizeObservation  # noqa: E402
from gymnasium.wrappers.utils import RunningMeanStd as _GymRunningMeanStd  # noqa: E402
from gymnasium.wrappers.vector import NormalizeObservation as _GymVectorNormalizeObservation  # noqa: E402

NONFINITE_INFO = "fastnorm_nonfinite_obs"

__all__ = ["NormalizeObservation", "RunningMeanStd", "VectorNormalizeObservation"]


class RunningMeanStd(NumpyRunningNorm, _GymRunningMeanStd):
    """Gymnasium's RunningMeanStd (``mean``, ``var``, ``count``, ``update``) held by a float64
    fastnorm RunningNorm (see NumpyRunningNorm)."""


class NormalizeObservation(_GymNormalizeObservation):
    """``gymnasium.wrappers.NormalizeObservation(env, epsilon)`` with fastnorm statistics.

    Args:
        env: the environment, whose observation space has a shape.
        epsilon: added to the variance under the square root (> 0).
        fixes: False (default): Gymnasium's math. True: fastnorm's warm-started EMA momentum,
            std floor and clamp.
    """

    def __init__(self, env: gym.Env, epsilon: float = 1e-8, *, fixes: bool = False):
        super().__init__(env, epsilon=epsilon)
        gym.utils.RecordConstructorArgs.__init__(self, epsilon=epsilon, fixes=fixes)
        self.obs_rms = RunningMeanStd(self.observation_space.shape, eps=epsilon, fixes=fixes)

    def observation(self, observation: np.ndarray) -> np.ndarray:
        """The observation normalized with the running statistics, updated first when
        ``update_running_mean``."""
        if self._update_running_mean:
            y = self.obs_rms.update_normalize(observation)
        else:
            y = self.obs_rms.normalize(observation)
        return y.astype(np.float32, copy=False)

    def step(self, action):
        observation, reward, terminated, truncated, info = super().step(action)
        if self._update_running_mean and self.obs_rms.last_nonfinite:
            info = {**info, NONFINITE_INFO: self.obs_rms.last_nonfinite}
        return observation, reward, terminated, truncated, info


class VectorNormalizeObservation(_GymVectorNormalizeObservation):
    """``gymnasium.wrappers.vector.NormalizeObservation(env, epsilon)`` with fastnorm statistics.

    The statistics have the shape of one env's observation: per element, so per agent and
    feature for a multi-agent env whose observations are ``(num_envs, agents, features)``. Like
    Gymnasium's, it needs the NEXT_STEP autoreset mode and refuses partial resets.

    Args:
        env: the vector environment.
        epsilon: added to the variance under the square root (> 0).
        fixes: False (default): Gymnasium's math. True: fastnorm's warm-started EMA momentum,
            std floor and clamp.
    """

    def __init__(self, env: gym.vector.VectorEnv, epsilon: float = 1e-8, *, fixes: bool = False):
        super().__init__(env, epsilon=epsilon)
        gym.utils.RecordConstructorArgs.__init__(self, epsilon=epsilon, fixes=fixes)
        self.obs_rms = RunningMeanStd(self.single_observation_space.shape, eps=epsilon, fixes=fixes)
        self._nonfinite_per_env = None

    def observations(self, observations: np.ndarray) -> np.ndarray:
        """The observations normalized with the running statistics, updated first when
        ``update_running_mean``."""
        self._nonfinite_per_env = None
        if not self._update_running_mean:
            return self.obs_rms.normalize(observations).astype(np.float32, copy=False)
        y = self.obs_rms.update_normalize(observations)
        if self.obs_rms.last_nonfinite:
            self._nonfinite_per_env = (~np.isfinite(observations)).reshape(len(observations), -1).sum(1)
        return y.astype(np.float32, copy=False)

    def step(self, actions):
        observations, rewards, terminations, truncations, infos = super().step(actions)
        if self._nonfinite_per_env is not None:
            infos = {**infos, NONFINITE_INFO: self._nonfinite_per_env,
                     "_" + NONFINITE_INFO: self._nonfinite_per_env > 0}
        return observations, rewards, terminations, truncations, infos
