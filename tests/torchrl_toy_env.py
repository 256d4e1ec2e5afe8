"""A small multi-agent TorchRL env for the integration tests: N envs, A agents, F features.

Observations per (agent, feature) sit near 1000 + 10 a + f with std 0.01 (a + 1), the float32
cancellation case of TorchRL's VecNormV2; inactive agents (``("agents", "active")`` false) show
1e6. Episodes last ``max_steps`` steps, staggered across envs so resets are partial. The env keeps
every observation it emitted to the transform in ``emitted`` (float64 copies with their active
masks, only the envs a reset resets) so a test can compute the statistics it expects.
"""

from __future__ import annotations

import torch
from tensordict import TensorDict
from torchrl.data.tensor_specs import Bounded, Categorical, Composite, Unbounded
from torchrl.envs.common import EnvBase


class ToyMultiAgentEnv(EnvBase):
    """Multi-agent env with an agents dim, an active mask and partial resets (see the module)."""

    def __init__(self, num_envs: int = 6, n_agents: int = 3, n_obs: int = 4, max_steps: int = 3, seed: int = 0,
                 nan_envs: tuple = ()):
        super().__init__(batch_size=torch.Size([num_envs]))
        self.n_agents, self.n_obs, self.max_steps, self.nan_envs = n_agents, n_obs, max_steps, list(nan_envs)
        n, a, f = num_envs, n_agents, n_obs
        self.full_observation_spec = Composite(
            agents=Composite(observation=Unbounded((n, a, f)), active=Categorical(2, (n, a), dtype=torch.bool),
                             shape=(n, a)),
            shape=(n,))
        self.full_action_spec = Composite(agents=Composite(action=Bounded(-1.0, 1.0, (n, a, 1)), shape=(n, a)),
                                          shape=(n,))
        self.full_reward_spec = Composite(agents=Composite(reward=Unbounded((n, a, 1)), shape=(n, a)), shape=(n,))
        self.full_done_spec = Composite(done=Categorical(2, (n, 1), dtype=torch.bool),
                                        terminated=Categorical(2, (n, 1), dtype=torch.bool),
                                        truncated=Categorical(2, (n, 1), dtype=torch.bool), shape=(n,))
        self.gen = torch.Generator().manual_seed(seed)
        self.t = torch.arange(n) % max_steps
        self.emitted: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _observe(self, envs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, a, f = self.batch_size[0], self.n_agents, self.n_obs
        loc = 1000.0 + 10 * torch.arange(a).view(a, 1) + torch.arange(f).view(1, f)
        obs = loc + 0.01 * (1 + torch.arange(a).view(a, 1)) * torch.randn(n, a, f, generator=self.gen)
        active = torch.rand(n, a, generator=self.gen) < 0.7
        active[:, 0] = True
        obs = torch.where(active.unsqueeze(-1), obs, torch.full_like(obs, 1e6)).float()
        obs[self.nan_envs] = float("nan")
        self.emitted.append((obs[envs].double(), active[envs]))
        return obs, active

    def _output(self, obs, active, done, reward=None) -> TensorDict:
        agents = {"observation": obs, "active": active}
        if reward is not None:
            agents["reward"] = reward
        return TensorDict({"agents": TensorDict(agents, batch_size=(*self.batch_size, self.n_agents)),
                           "done": done, "terminated": done.clone(), "truncated": torch.zeros_like(done)},
                          batch_size=self.batch_size)

    def _reset(self, tensordict):
        envs = torch.ones(self.batch_size, dtype=torch.bool)
        if tensordict is not None and "_reset" in tensordict.keys():
            envs = tensordict["_reset"].reshape(self.batch_size)
        self.t = torch.where(envs, 0, self.t)
        obs, active = self._observe(envs)
        return self._output(obs, active, torch.zeros(*self.batch_size, 1, dtype=torch.bool))

    def _step(self, tensordict):
        self.t = self.t + 1
        obs, active = self._observe(torch.ones(self.batch_size, dtype=torch.bool))
        reward = -tensordict["agents", "action"].pow(2) + obs[..., :1].nan_to_num() * 1e-3
        return self._output(obs, active, (self.t >= self.max_steps).unsqueeze(-1), reward)

    def _set_seed(self, seed):
        self.gen.manual_seed(seed or 0)

    def expected_moments(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """float64 count, mean and population variance per (agent, feature) of the active, finite
        observations emitted so far."""
        obs = torch.cat([o for o, _ in self.emitted])
        keep = torch.cat([m for _, m in self.emitted]).unsqueeze(-1).expand_as(obs) & obs.isfinite()
        count = keep.sum(0).double()
        mean = torch.where(keep, obs, 0).sum(0) / count
        var = torch.where(keep, (obs - mean) ** 2, 0).sum(0) / count
        return count, mean, var
