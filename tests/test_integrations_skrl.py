"""fastnorm.integrations.skrl: RunningStandardScaler against skrl's own class (its unit test, its
math, checkpoints both ways), fixes=True, bad input, and skrl's PPO loop with fastnorm's scaler
and advantages."""

from __future__ import annotations

import importlib
import io
import sys

import gymnasium
import numpy as np
import pytest
import torch
from skrl.agents.torch.ppo import PPO as SkrlPPO
from skrl.agents.torch.ppo import PPO_CFG
from skrl.envs.wrappers.torch import wrap_env
from skrl.memories.torch import RandomMemory
from skrl.resources.preprocessors.torch import RunningStandardScaler as SkrlScaler
from skrl.trainers.torch import SequentialTrainer
from skrl.utils.model_instantiators.torch import deterministic_model, gaussian_model

from fastnorm.integrations.skrl import PPO, RunningStandardScaler
from gloo_world import gloo_world_of_one  # noqa: F401 (a fixture)

STATS = ("running_mean", "running_variance", "current_count")


def assert_same_state(a, b, exact=False):
    """Equal statistics; skrl takes each batch's mean and variance in x's float32, fastnorm in
    float64, hence float32 tolerances unless exact (a loaded checkpoint)."""
    for name in STATS:
        tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(getattr(a, name), getattr(b, name), **tol, msg=name)


def batches(gen, size, count, loc=0.0, scale=1.0):
    """Random batches of 2 and 3 dims (skrl reduces (T, N) of 3-dim inputs) with varying rows."""
    for i in range(count):
        rows = (int(torch.randint(2, 40, (1,), generator=gen)),)
        shape = rows + ((3,) if i % 2 else ()) + (size,)
        yield loc + scale * torch.randn(shape, generator=gen)


@pytest.mark.parametrize("scaler_class", [SkrlScaler, RunningStandardScaler])
def test_skrl_unit_test_of_its_scaler(scaler_class):
    # skrl's tests/resources/preprocessors/torch/test_running_standard_scaler.py (skrl 2.1.1), run
    # against skrl's class and fastnorm's: the same data and expected (min, max, mean, std).
    def check(array, ground_truth):
        array = array.cpu().numpy()
        stats = [np.min(array), np.max(array), np.mean(array), np.std(array)]
        assert np.allclose(stats, ground_truth, rtol=1e-04, atol=1e-07)

    scaler = scaler_class(size=gymnasium.spaces.Box(low=-1, high=1, shape=(100,)), device="cpu")
    for i in range(10):
        batch_size = 100 + 10 * i
        x = torch.tensor(np.linspace(-10 + i, 10 + i, batch_size * 100, dtype=np.float32).reshape(batch_size, -1))
        y, y_inverse, y_train = scaler(x), scaler(x, inverse=True), scaler(x, train=True)
        if i == 0:
            check(y, [-5.0, 5.0, 0.0, 4.08258])
            check(y_inverse, [-5.0, 5.0, 0.0, 4.08258])
            check(y_train, [-1.71464, 1.71464, 0.0, 0.99980])
        elif i == 9:
            check(y, [-0.86070, 2.28972, 0.71582, 0.91289])
            check(y_inverse, [-1.92795, 36.14016, 30.40295, 10.56556])
            check(y_train, [-0.93701, 2.15588, 0.61087, 0.89643])


def test_same_statistics_and_outputs_as_skrl(gen):
    ours, theirs = RunningStandardScaler(7, device="cpu"), SkrlScaler(7, device="cpu")
    assert_same_state(ours, theirs)
    for x in batches(gen, 7, 12, loc=3.0, scale=2.0):
        torch.testing.assert_close(ours(x, train=True), theirs(x, train=True), rtol=1e-5, atol=1e-5)
        assert_same_state(ours, theirs)
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours(x, inverse=True), theirs(x, inverse=True), rtol=1e-5, atol=1e-5)
    assert ours.running_mean.dtype == ours.running_variance.dtype == ours.current_count.dtype == torch.float64
    assert ours.current_count.shape == ()


def test_constructor_and_state_dict_keys_match_skrl():
    kwargs = dict(size=gymnasium.spaces.Box(-1, 1, (2, 3)), epsilon=1e-6, clip_threshold=3.0, device="cpu")
    ours, theirs = RunningStandardScaler(**kwargs), SkrlScaler(**kwargs)
    assert list(ours.state_dict()) == list(theirs.state_dict()) == list(STATS)
    assert (ours.epsilon, ours.clip_threshold, ours.device) == (theirs.epsilon, theirs.clip_threshold, theirs.device)
    assert ours.running_mean.shape == theirs.running_mean.shape == (6,)


@pytest.mark.parametrize("direction", ["skrl_to_fastnorm", "fastnorm_to_skrl"])
def test_checkpoint_round_trip_with_skrl(gen, direction):
    source = SkrlScaler(5, device="cpu") if direction == "skrl_to_fastnorm" else RunningStandardScaler(5, device="cpu")
    target = RunningStandardScaler(5, device="cpu") if direction == "skrl_to_fastnorm" else SkrlScaler(5, device="cpu")
    for x in batches(gen, 5, 4, loc=-2.0, scale=0.5):
        source(x, train=True)
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    target.load_state_dict(torch.load(buffer))
    assert_same_state(target, source, exact=True)
    x = next(batches(gen, 5, 1, loc=-2.0, scale=0.5))
    torch.testing.assert_close(target(x), source(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(target(x, inverse=True), source(x, inverse=True), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(target(x, train=True), source(x, train=True), rtol=1e-5, atol=1e-5)
    assert_same_state(target, source)


def test_fixes_remove_the_prior_bias(gen):
    # The data: x = 1000 + 0.01 N(0, 1), true std 0.01; skrl's count-1 prior at 0 inflates it.
    default, theirs = RunningStandardScaler(4, device="cpu"), SkrlScaler(4, device="cpu")
    fixed = RunningStandardScaler(4, device="cpu", fixes=True)
    for _ in range(60):
        x = 1000.0 + 0.01 * torch.randn(64, 4, generator=gen, dtype=torch.float64)
        for scaler in (default, fixed, theirs):
            scaler(x.float(), train=True)
    assert_same_state(default, theirs)
    assert default.running_variance.sqrt().min() > 10
    assert ((fixed.running_variance.sqrt() - 0.01).abs() < 0.002).all()
    assert fixed.momentum == 0.99 and fixed.min_std == 1e-2 and fixed.clip == 5.0


def test_nan_rows_stay_out_of_the_statistics(gen):
    ours, clean = RunningStandardScaler(3, device="cpu"), RunningStandardScaler(3, device="cpu")
    x = torch.randn(20, 3, generator=gen)
    bad_rows = torch.tensor([2, 11, 17])
    poisoned = x.clone()
    poisoned[bad_rows] = float("nan")
    keep = torch.ones(20, dtype=torch.bool)
    keep[bad_rows] = False
    y = ours(poisoned, train=True)
    clean(x[keep], train=True)
    assert_same_state(ours, clean)
    assert y[bad_rows].isnan().all() and y[keep].isfinite().all()


def test_wrong_shape_device_and_checkpoints_raise_and_change_nothing(gen):
    scaler = RunningStandardScaler(3, device="cpu")
    scaler(torch.randn(10, 3, generator=gen), train=True)
    before = {k: v.clone() for k, v in scaler.state_dict().items()}
    with pytest.raises(ValueError, match=r"x must have shape \(\*batch, 3\), got \(10, 4\)"):
        scaler(torch.randn(10, 4), train=True)
    with pytest.raises(ValueError, match="x is on meta but the statistics are on cpu"):
        scaler(torch.randn(10, 3, device="meta"), train=True)
    with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64"):
        scaler(torch.ones(10, 3, dtype=torch.int64), train=True)
    bad_count = {**before, "current_count": torch.ones(3, dtype=torch.float64)}
    with pytest.raises(ValueError, match=r"current_count must have shape \(\), got \(3,\)"):
        scaler.load_state_dict(bad_count)
    bad_var = {**before, "running_variance": torch.full((3,), float("nan"), dtype=torch.float64)}
    with pytest.raises(ValueError, match="running_variance holds non-finite values"):
        scaler.load_state_dict(bad_var)
    with pytest.raises(RuntimeError, match="running_variance"):
        scaler.load_state_dict({k: v for k, v in before.items() if k != "running_variance"})
    for key, value in before.items():
        assert torch.equal(scaler.state_dict()[key], value), key


def test_gradients_are_refused_where_skrl_would_backpropagate():
    scaler = RunningStandardScaler(2, device="cpu")
    x = torch.randn(4, 2, requires_grad=True)
    assert scaler(x) is not None and scaler(None) is None
    with pytest.raises(NotImplementedError, match="no_grad=False"):
        scaler(x, no_grad=False)


def test_sync_needs_a_process_group(gen):
    scaler = RunningStandardScaler(3, device="cpu", sync=True)
    with pytest.raises(RuntimeError, match="needs torch.distributed to be initialized"):
        scaler(torch.randn(4, 3, generator=gen), train=True)
    assert scaler.current_count == 1


def test_sync_in_a_world_of_one_equals_the_local_statistics(gen, gloo_world_of_one):
    synced, local = RunningStandardScaler(5, device="cpu", sync=True), RunningStandardScaler(5, device="cpu")
    for x in batches(gen, 5, 4, loc=1.0):
        torch.testing.assert_close(synced(x, train=True), local(x, train=True))
    assert_same_state(synced, local, exact=True)


class DriftEnv(gymnasium.Env):
    """Observations 1000 + 0.01 N(0, 1) (the float32 cancellation case), 8-step episodes."""

    observation_space = gymnasium.spaces.Box(-np.inf, np.inf, (3,), np.float32)
    action_space = gymnasium.spaces.Box(-1, 1, (1,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return self._observation(), {}

    def _observation(self):
        return (1000 + 0.01 * self.np_random.standard_normal(3)).astype(np.float32)

    def step(self, action):
        self.t += 1
        return self._observation(), float(-action[0] ** 2), False, self.t >= 8, {}


def make_agent(env, agent_class, scaler_class, discount_factor=0.99, **scaler_kwargs):
    network = [{"name": "net", "input": "OBSERVATIONS", "layers": [8], "activations": "tanh"}]
    spaces = dict(observation_space=env.observation_space, action_space=env.action_space, device=env.device)
    models = {"policy": gaussian_model(**spaces, network=network, output="ACTIONS"),
              "value": deterministic_model(**spaces, network=network, output="ONE")}
    cfg = PPO_CFG(rollouts=8, learning_epochs=2, mini_batches=2, discount_factor=discount_factor,
                  observation_preprocessor=scaler_class,
                  observation_preprocessor_kwargs={"size": env.observation_space, "device": env.device,
                                                   **scaler_kwargs},
                  value_preprocessor=scaler_class,
                  value_preprocessor_kwargs={"size": 1, "device": env.device, **scaler_kwargs})
    cfg.experiment.write_interval = 0
    cfg.experiment.checkpoint_interval = 0
    memory = RandomMemory(memory_size=8, num_envs=env.num_envs, device=env.device)
    return agent_class(models=models, memory=memory, cfg=cfg, **spaces)


@pytest.mark.parametrize("fixes", [False, True])
def test_skrl_ppo_trainer_with_fastnorm_preprocessors_and_advantages(gen, tmp_path, fixes):
    torch.manual_seed(int(torch.randint(2**31, (1,), generator=gen)))
    vector_env = gymnasium.vector.SyncVectorEnv([DriftEnv] * 4)
    vector_env.reset(seed=int(torch.randint(2**31, (1,), generator=gen)))
    env = wrap_env(vector_env, wrapper="gymnasium")
    agent = make_agent(env, PPO, RunningStandardScaler, fixes=fixes)
    assert isinstance(agent._observation_preprocessor, RunningStandardScaler)
    trainer = SequentialTrainer(cfg={"timesteps": 16, "headless": True, "disable_progressbar": True,
                                     "close_environment_at_exit": False}, env=env, agents=agent)
    trainer.train()
    observations, values = agent._observation_preprocessor, agent._value_preprocessor
    # Two updates, each training the observation scaler on its first epoch (32 rows) and the value
    # scaler on the values and returns (2 x 32 rows); skrl's prior adds a count of 1.
    prior = 0 if fixes else 1
    assert observations.current_count == 64 + prior and values.current_count == 128 + prior
    # skrl's prior (a count of 1 at mean 0) pulls the mean of the 64 rows of ~1000 to 1000 * 64 / 65.
    assert ((observations.running_mean - 1000 * 64 / (64 + prior)).abs() < 0.01).all()
    assert agent.advantage_stats.count == 32
    advantages = agent.memory.get_tensor_by_name("advantages")
    torch.testing.assert_close(advantages.mean(), torch.tensor(0.0), atol=1e-5, rtol=0)
    # The agent's checkpoint (skrl's format) loads into an agent with skrl's own scaler.
    path = str(tmp_path / "agent.pt")
    agent.save(path)
    stock = make_agent(env, SkrlPPO, SkrlScaler)
    stock.load(path)
    assert_same_state(stock._observation_preprocessor, observations, exact=True)
    assert_same_state(stock._value_preprocessor, values, exact=True)
    env.close()


def filled_agents(gen, advantages_scale):
    """fastnorm's PPO and skrl's, the same models, one rollout in memory whose advantages (with a
    discount of 0 and values of 0: the rewards) have the given scale."""
    env = wrap_env(gymnasium.vector.SyncVectorEnv([DriftEnv] * 4), wrapper="gymnasium")
    ours = make_agent(env, PPO, RunningStandardScaler, discount_factor=0.0)
    theirs = make_agent(env, SkrlPPO, SkrlScaler, discount_factor=0.0)
    theirs.policy.load_state_dict(ours.policy.state_dict())
    theirs.value.load_state_dict(ours.value.state_dict())
    for agent in (ours, theirs):
        agent.init()
    rollout = {
        "observations": 1000 + 0.01 * torch.randn(8, 4, 3, generator=gen),
        "actions": torch.rand(8, 4, 1, generator=gen) * 2 - 1,
        "rewards": advantages_scale * torch.randn(8, 4, 1, generator=gen),
        "terminated": torch.zeros(8, 4, 1, dtype=torch.bool),
        "truncated": torch.zeros(8, 4, 1, dtype=torch.bool),
        "log_prob": -torch.rand(8, 4, 1, generator=gen),
        "values": torch.zeros(8, 4, 1),
    }
    for agent in (ours, theirs):
        for name, value in rollout.items():
            agent.memory.set_tensor_by_name(name, value.clone())
        agent._current_next_observations = rollout["observations"][-1].clone()
        agent._current_next_states = None
    env.close()
    return ours, theirs


def test_ppo_advantages_match_skrl_and_keep_a_floor(gen):
    ours, theirs = filled_agents(gen, advantages_scale=1.0)
    for agent in (ours, theirs):
        agent.update(timestep=0, timesteps=8)
    torch.testing.assert_close(ours.memory.get_tensor_by_name("advantages"),
                               theirs.memory.get_tensor_by_name("advantages"), rtol=1e-4, atol=1e-4)
    ours, theirs = filled_agents(gen, advantages_scale=1e-7)
    for agent in (ours, theirs):
        agent.update(timestep=0, timesteps=8)
    # skrl's + 1e-8 blows advantages with a std of ~1e-7 up to unit scale; the floor keeps them small.
    assert theirs.memory.get_tensor_by_name("advantages").abs().max() > 1
    assert ours.memory.get_tensor_by_name("advantages").abs().max() < 0.05
    assert ours.advantage_stats.std_below_floor.all()


def test_missing_skrl_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "skrl", None)
    monkeypatch.delitem(sys.modules, "fastnorm.integrations.skrl")
    with pytest.raises(ImportError, match=r"pip install 'fastnorm\[skrl\]'"):
        importlib.import_module("fastnorm.integrations.skrl")
