"""fastnorm.integrations.rl_games against rl-games' own RunningMeanStd, scripted as its models script
it, and inside its Runner."""

from __future__ import annotations

import math

import gymnasium
import pytest
import torch
from rl_games.algos_torch import running_mean_std
from rl_games.common import env_configurations, vecenv
from rl_games.common.ivecenv import IVecEnv
from rl_games.torch_runner import Runner

from fastnorm.integrations import rl_games as fastnorm_rl_games

# Nothing here is skipped: make test installs rl_games (fastnorm[integrations]).
HostRMS = running_mean_std.RunningMeanStd
F32 = dict(rtol=1e-5, atol=1e-5)  # rl_games normalizes in float32 from float32 casts of its statistics
STATS = dict(rtol=2e-6, atol=2e-6)  # fastnorm's float64 statistics of one batch sliced two ways (float32 blocks)


def make(cls, *args, scripted=True, **kwargs):
    module = cls(*args, **kwargs)
    return torch.jit.script(module) if scripted else module


def batches(gen, n, rows, cols):
    offsets = torch.randn(cols, generator=gen) * 10
    return [offsets + 3 * torch.randn(rows, cols, generator=gen) for _ in range(n)]


@pytest.mark.parametrize("scripted", [True, False], ids=["scripted", "eager"])
def test_same_statistics_and_outputs_as_rl_games(gen, scripted):
    host, ours = make(HostRMS, (6,)), make(fastnorm_rl_games.RunningMeanStd, (6,), scripted=scripted)
    for x in batches(gen, 4, 50, 6):
        torch.testing.assert_close(ours(x), host(x), **F32)  # training: update, then normalize
    torch.testing.assert_close(ours.count, host.count, rtol=0, atol=0)
    assert float(ours.count) == 1 + 4 * 50  # the prior counts once
    # rl_games reduces each batch in float32, fastnorm in float64: agreement to float32 rounding.
    torch.testing.assert_close(ours.running_mean, host.running_mean, **F32)
    torch.testing.assert_close(ours.running_var, host.running_var, **F32)
    host.eval(), ours.eval()
    x = torch.randn(7, 6, generator=gen) * 30  # some beyond the clamp at 5
    torch.testing.assert_close(ours(x), host(x), **F32)
    torch.testing.assert_close(ours(x, denorm=True), host(x, denorm=True), **F32)
    assert ours(x).abs().max() <= 5.0


@pytest.mark.parametrize("direction", ["rl_games to fastnorm", "fastnorm to rl_games"])
def test_checkpoint_round_trip(gen, direction):
    writer_cls, reader_cls = HostRMS, fastnorm_rl_games.RunningMeanStd
    if direction == "fastnorm to rl_games":
        writer_cls, reader_cls = reader_cls, writer_cls
    writer, reader = make(writer_cls, (3,)), make(reader_cls, (3,))
    for x in batches(gen, 3, 20, 3):
        writer(x)
    state = writer.state_dict()
    assert set(state) == {"running_mean", "running_var", "count"}
    reader.load_state_dict(state)  # strict
    writer.eval(), reader.eval()
    x = torch.randn(5, 3, generator=gen) * 5
    torch.testing.assert_close(reader(x), writer(x), **F32)
    torch.testing.assert_close(reader.count, writer.count, rtol=0, atol=0)


def test_dict_observations_script_and_match_rl_games(gen):
    # rl_games' own RunningMeanStdObs does not compile with torch.jit.script (it indexes its
    # ModuleDict by a variable key), so its eager module is the reference here.
    shapes = {"a": (3,), "b": (2, 2)}
    host, ours = running_mean_std.RunningMeanStdObs(shapes), torch.jit.script(
        fastnorm_rl_games.RunningMeanStdObs(shapes))
    for _ in range(3):
        x = {"a": torch.randn(9, 3, generator=gen) + 4, "b": 2 * torch.randn(9, 2, 2, generator=gen)}
        y, expected = ours(x), host(x)
        for key in shapes:
            torch.testing.assert_close(y[key], expected[key], **F32)
    host.load_state_dict(ours.state_dict())  # strict: the same keys


@pytest.mark.parametrize("scripted", [True, False], ids=["scripted", "eager"])
def test_bad_input_leaves_the_statistics_unchanged(gen, scripted):
    ours = make(fastnorm_rl_games.RunningMeanStd, (4,), scripted=scripted)
    ours(torch.randn(20, 4, generator=gen))
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    errors = (ValueError, RuntimeError, torch.jit.Error)  # scripted: the TorchScript interpreter's error
    with pytest.raises(errors, match=r"must have shape \(\*batch, 4\), got \(20, 5\)|"
                                                          r"x must have shape \(\*batch, \[4\]\), got \[20, 5\]"):
        ours(torch.randn(20, 5, generator=gen))
    with pytest.raises(errors, match="input is on meta but the statistics are on cpu"):
        ours(torch.empty(20, 4, device="meta"))
    torch.testing.assert_close(ours.state_dict(), before, rtol=0, atol=0)


@pytest.mark.parametrize("scripted", [True, False], ids=["scripted", "eager"])
def test_nan_rows_and_masked_rows_stay_out_of_the_statistics(gen, scripted):
    ours, clean = (make(fastnorm_rl_games.RunningMeanStd, (3,), scripted=scripted) for _ in range(2))
    x = torch.randn(12, 3, generator=gen) * 2 + 1
    poisoned = torch.cat([x, torch.full((4, 3), math.nan)])
    y = ours(poisoned)
    clean(x)
    torch.testing.assert_close(ours.state_dict(), clean.state_dict(), **STATS)
    assert torch.isnan(y[12:]).all() and torch.isfinite(y[:12]).all()
    masked = make(fastnorm_rl_games.RunningMeanStd, (3,), scripted=scripted)
    noise = torch.cat([x, 1e6 * torch.randn(5, 3, generator=gen)])
    masked(noise, mask=torch.arange(17) < 12)
    torch.testing.assert_close(masked.state_dict(), clean.state_dict(), **STATS)


def test_fixes_switch_drops_the_prior(gen):
    x = 1000 + 0.01 * torch.randn(64, 2, generator=gen, dtype=torch.float64)
    exact = make(fastnorm_rl_games.RunningMeanStd, (2,))
    fixed = make(fastnorm_rl_games.RunningMeanStd, (2,), fixes=True)
    exact(x.float()), fixed(x.float())
    # The prior (mean 0, var 1, count 1) adds about mean^2 / count to the variance; no prior, no bias.
    assert float(exact.running_var.min()) > 1000**2 / 65 * 0.9
    torch.testing.assert_close(fixed.running_var, x.var(0, unbiased=False), rtol=1e-3, atol=0)
    assert float(fixed.count) == 64


class TinyVecEnv(IVecEnv):
    """rl_games' IVecEnv on torch tensors: a point mass pulled towards 0, observed around 100."""

    def __init__(self, num_envs: int, seed: int):
        self.num_envs, self.gen = num_envs, torch.Generator().manual_seed(seed)
        self.pos = torch.randn(num_envs, 2, generator=self.gen)
        self.steps = torch.zeros(num_envs, dtype=torch.long)
        self.observation_space = gymnasium.spaces.Box(-math.inf, math.inf, (4,))
        self.action_space = gymnasium.spaces.Box(-1.0, 1.0, (2,))

    def observations(self) -> torch.Tensor:
        return torch.cat([100 + self.pos, 0.1 * self.pos.square()], dim=1)

    def step(self, actions):
        self.pos = self.pos + 0.1 * actions.clamp(-1, 1)
        self.steps += 1
        dones = self.steps >= 8
        self.steps[dones] = 0
        self.pos[dones] = torch.randn(int(dones.sum()), 2, generator=self.gen)
        return self.observations(), -self.pos.square().sum(1), dones, {}

    def reset(self):
        return self.observations()

    def get_number_of_agents(self):
        return 1

    def get_env_info(self):
        return {"observation_space": self.observation_space, "action_space": self.action_space, "agents": 1,
                "value_size": 1}

    def has_action_masks(self):
        return False


def params(train_dir, seed) -> dict:
    return {"params": {
        "seed": seed,
        "algo": {"name": "a2c_continuous"},
        "model": {"name": "fastnorm_continuous_a2c_logstd"},
        "network": {"name": "actor_critic", "separate": False, "mlp": {"units": [16, 16], "activation": "elu",
                                                                        "initializer": {"name": "default"}},
                    "space": {"continuous": {"mu_activation": "None", "sigma_activation": "None",
                                             "mu_init": {"name": "default"}, "fixed_sigma": True,
                                             "sigma_init": {"name": "const_initializer", "val": 0}}}},
        "config": {"name": "fastnorm_tiny", "env_name": "fastnorm_tiny", "device": "cpu", "ppo": True,
                   "torch_compile": False, "normalize_input": True, "normalize_value": True,
                   "normalize_advantage": True, "reward_shaper": {"scale_value": 1.0}, "gamma": 0.99, "tau": 0.95,
                   "learning_rate": 3e-4, "lr_schedule": "None", "kl_threshold": 0.008, "score_to_win": 1e9,
                   "max_epochs": 2, "save_best_after": 100, "save_frequency": 0, "grad_norm": 1.0,
                   "entropy_coef": 0.0, "truncate_grads": True, "e_clip": 0.2, "clip_value": True,
                   "num_actors": 8, "horizon_length": 16, "minibatch_size": 64, "mini_epochs": 2,
                   "critic_coef": 2, "bounds_loss_coef": 0.0, "train_dir": str(train_dir), "print_stats": False,
                   "env_config": {}},
    }}


class RecordingAgent(fastnorm_rl_games.A2CAgent):
    """Keeps the raw advantages and what the dataset holds after prepare_dataset."""

    def prepare_dataset(self, batch_dict):
        self.raw_advantages = (batch_dict["returns"] - batch_dict["values"]).sum(1)
        super().prepare_dataset(batch_dict)
        self.stored_advantages = self.dataset.values_dict["advantages"].clone()


def test_runner_trains_with_scripted_fastnorm_normalizers(gen, tmp_path):
    seed = int(torch.randint(2**31, (1,), generator=gen))
    vecenv.register("FASTNORM_TINY", lambda config_name, num_actors, **kwargs: TinyVecEnv(num_actors, seed))
    env_configurations.register("fastnorm_tiny", {"vecenv_type": "FASTNORM_TINY", "env_creator": lambda **kw: None})
    assert "fastnorm_continuous_a2c_logstd" in fastnorm_rl_games.register_models()
    runner = Runner()
    runner.algo_factory.register_builder("a2c_continuous", lambda **kwargs: RecordingAgent(**kwargs))
    runner.load(params(tmp_path, seed))
    agent = runner.algo_factory.create("a2c_continuous", base_name="run", params=runner.params)
    obs_norm, value_norm = agent.model.running_mean_std, agent.model.value_mean_std
    assert isinstance(obs_norm, torch.jit.ScriptModule) and obs_norm.original_name == "RunningMeanStd"
    assert "fastnorm" in str(obs_norm.graph)  # the scripted update calls fastnorm's ops
    agent.train()

    # rl_games updates the observation statistics during the first mini-epoch only.
    assert float(obs_norm.count) > 1 and 99 < float(obs_norm.running_mean[0]) < 101
    assert float(value_norm.count) > 1
    raw = agent.raw_advantages
    expected = (raw - raw.mean()) / max(float(raw.std()), 1e-4)
    torch.testing.assert_close(agent.stored_advantages, expected, **F32)

    state = agent.model.state_dict()
    plain = Runner()
    plain.load({"params": {**params(tmp_path, seed)["params"], "model": {"name": "continuous_a2c_logstd"}}})
    host_agent = plain.algo_factory.create("a2c_continuous", base_name="run", params=plain.params)
    host_agent.model.load_state_dict(state)  # rl_games' own model reads the checkpoint
    obs = torch.randn(5, 4, generator=gen) + 100
    host_agent.model.eval(), agent.model.eval()
    torch.testing.assert_close(host_agent.model.norm_obs(obs), agent.model.norm_obs(obs), **F32)
