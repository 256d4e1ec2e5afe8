"""fastnorm.integrations.torchrl: RunningNormTransform in a TransformedEnv, a collector and
ClipPPOLoss on a multi-agent batch; its specs, state dict, masks, evaluation and bad input."""

from __future__ import annotations

import importlib
import io
import sys

import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import NormalParamExtractor, TensorDictModule
from torch import nn
from torchrl.collectors import Collector
from torchrl.envs import TransformedEnv
from torchrl.envs.utils import ExplorationType, check_env_specs, set_exploration_type
from torchrl.modules import ProbabilisticActor, TanhNormal
from torchrl.objectives import ClipPPOLoss as TorchRLClipPPOLoss
from torchrl.objectives import ValueEstimators

from fastnorm.integrations.torchrl import ClipPPOLoss, KLPENPPOLoss, PPOLoss, RunningNormTransform
from gloo_world import gloo_world_of_one  # noqa: F401 (a fixture)
from torchrl_toy_env import ToyMultiAgentEnv

OBS, OBS_N, ACTIVE = ("agents", "observation"), ("agents", "obs_n"), ("agents", "active")


def make_env(seed, **kwargs) -> TransformedEnv:
    transform = RunningNormTransform([OBS], [OBS_N], mask_key=ACTIVE, **{"decay": None, **kwargs})
    return TransformedEnv(ToyMultiAgentEnv(seed=seed), transform)


def seed_of(gen) -> int:
    return int(torch.randint(2**31, (1,), generator=gen))


def test_statistics_per_agent_and_feature_over_active_entries(gen):
    env = make_env(seed_of(gen))
    norm = env.transform.norm(OBS)
    assert norm.shape == (3, 4)
    rollout = env.rollout(7, break_when_any_done=False)
    assert rollout["next", "done"].any() and not rollout["next", "done"].all(), "the rollout must hold partial resets"
    count, mean, var = env.base_env.expected_moments()
    torch.testing.assert_close(norm.count, count, rtol=0, atol=0)
    torch.testing.assert_close(norm.mean, mean, rtol=1e-12, atol=0)
    torch.testing.assert_close(norm.var, var, rtol=1e-6, atol=0)
    # The output is normalized with the statistics of the step (the last step's here).
    last = rollout["next", "agents", "observation"][:, -1].double()
    expected = ((last - mean) / (var + norm.eps).sqrt().clamp_min(norm.min_std)).clamp(-norm.clip, norm.clip)
    torch.testing.assert_close(rollout["next", "agents", "obs_n"][:, -1], expected.float(), rtol=1e-5, atol=1e-5)
    assert rollout["next", "agents", "obs_n"][:, -1][rollout["next", "agents", "active"][:, -1]].abs().max() < 5


def test_specs_and_check_env_specs(gen):
    env = make_env(seed_of(gen))
    check_env_specs(env)
    spec = env.observation_spec[OBS_N]
    assert spec.shape == env.observation_spec[OBS].shape and spec.dtype == torch.float32


def test_evaluation_and_freeze_leave_the_statistics(gen):
    env = make_env(seed_of(gen))
    env.rollout(3)
    norm = env.transform.norm(OBS)
    before = {k: v.clone() for k, v in norm.state_dict().items() if k != "_extra_state"}
    with set_exploration_type(ExplorationType.DETERMINISTIC):
        evaluated = env.rollout(3)
    env.transform.freeze()
    env.rollout(3)
    for key, value in before.items():
        assert torch.equal(norm.state_dict()[key], value), key
    assert evaluated["next", "agents", "obs_n"].isfinite().all()
    env.transform.unfreeze()
    env.rollout(1)
    assert not torch.equal(norm.count, before["count"])


def test_state_dict_round_trip_through_transformed_env(gen):
    env = make_env(seed_of(gen))
    env.rollout(5, break_when_any_done=False)
    buffer = io.BytesIO()
    torch.save(env.state_dict(), buffer)
    buffer.seek(0)
    fresh = make_env(seed_of(gen))
    fresh.load_state_dict(torch.load(buffer, weights_only=False))
    for name in ("mean", "var", "count", "steps"):
        assert torch.equal(getattr(fresh.transform.norm(OBS), name), getattr(env.transform.norm(OBS), name))
    td = env.base_env.reset()
    torch.testing.assert_close(fresh.transform.forward(td.clone())["agents", "obs_n"],
                               env.transform.forward(td.clone())["agents", "obs_n"])


def test_state_dict_loads_into_a_transform_that_has_not_seen_its_env(gen):
    env = make_env(seed_of(gen))
    env.rollout(4)
    detached = RunningNormTransform([OBS], [OBS_N], mask_key=ACTIVE, decay=None)
    detached.load_state_dict(env.transform.state_dict())
    td = env.base_env.reset()
    torch.testing.assert_close(detached(td.clone())["agents", "obs_n"],
                               env.transform.forward(td.clone())["agents", "obs_n"])


def test_min_std_rel_reaches_the_running_norm_and_its_state_dict(gen):
    env = make_env(seed_of(gen), min_std_rel=0.25)
    env.rollout(5, break_when_any_done=False)
    norm = env.transform.norm(OBS)
    assert norm.min_std_rel == 0.25
    state = env.state_dict()
    assert any(key.endswith("norms.agents/observation.scale") for key in state)
    assert not torch.equal(norm.scale, torch.ones_like(norm.scale))  # tracked by the updates
    fresh = make_env(seed_of(gen), min_std_rel=0.25)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.transform.norm(OBS).scale, norm.scale)
    off = make_env(seed_of(gen))
    off.rollout(2, break_when_any_done=False)
    assert off.transform.norm(OBS).min_std_rel is None
    assert not any(key.endswith(".scale") for key in off.state_dict())


def test_nan_rows_stay_out_of_the_statistics(gen):
    env = TransformedEnv(ToyMultiAgentEnv(seed=seed_of(gen), nan_envs=(1, 4)),
                         RunningNormTransform([OBS], [OBS_N], mask_key=ACTIVE, decay=None))
    rollout = env.rollout(4, break_when_any_done=False)
    norm = env.transform.norm(OBS)
    count, mean, var = env.base_env.expected_moments()
    torch.testing.assert_close(norm.count, count, rtol=0, atol=0)
    torch.testing.assert_close(norm.mean, mean, rtol=1e-12, atol=0)
    out = rollout["next", "agents", "obs_n"]
    assert out[[1, 4]].isnan().all() and out[[0, 2, 3, 5]].isfinite().all()


def test_wrong_shape_and_device_raise_and_change_nothing(gen):
    env = make_env(seed_of(gen))
    env.rollout(2)
    transform, norm = env.transform, env.transform.norm(OBS)
    before = {k: v.clone() for k, v in norm.state_dict().items() if k != "_extra_state"}
    td = env.base_env.reset()
    with pytest.raises(ValueError, match=r"x must have shape \(\*batch, 3, 4\), got \(6, 3, 5\)"):
        transform._call(td.clone().set(OBS, torch.zeros(6, 3, 5)))
    wrong_device = td.clone().set(OBS, torch.zeros(6, 3, 4, device="meta"))
    with pytest.raises(ValueError, match="is on meta but the statistics are on cpu"):
        transform._call(wrong_device)
    missing = td.clone().exclude(ACTIVE)
    with pytest.raises(KeyError, match="mask_key"):
        transform._call(missing)
    for key, value in before.items():
        assert torch.equal(norm.state_dict()[key], value), key


def test_integer_entries_are_refused_at_spec_time():
    env = ToyMultiAgentEnv()
    with pytest.raises(TypeError, match="normalizes float entries"):
        TransformedEnv(env, RunningNormTransform([ACTIVE])).observation_spec


def make_policy_critic_loss(loss_class=ClipPPOLoss, **loss_kwargs):
    actor_net = TensorDictModule(nn.Sequential(nn.Linear(4, 2), NormalParamExtractor()), in_keys=[OBS_N],
                                 out_keys=[("agents", "loc"), ("agents", "scale")])
    policy = ProbabilisticActor(actor_net, in_keys=[("agents", "loc"), ("agents", "scale")],
                                out_keys=[("agents", "action")], distribution_class=TanhNormal,
                                return_log_prob=True, log_prob_key=("agents", "sample_log_prob"))
    critic = TensorDictModule(nn.Linear(4, 1), in_keys=[OBS_N], out_keys=[("agents", "state_value")])
    loss = loss_class(policy, critic, normalize_advantage=True, normalize_advantage_exclude_dims=(-2,), **loss_kwargs)
    loss.set_keys(reward=("agents", "reward"), action=("agents", "action"), value=("agents", "state_value"),
                  sample_log_prob=("agents", "sample_log_prob"), done=("agents", "done"),
                  terminated=("agents", "terminated"), advantage=("agents", "advantage"),
                  value_target=("agents", "value_target"))
    loss.make_value_estimator(ValueEstimators.GAE, gamma=0.99, lmbda=0.95)
    return policy, critic, loss


def test_collector_and_clip_ppo_loss_on_a_multi_agent_batch(gen):
    torch.manual_seed(seed_of(gen))
    env = make_env(seed_of(gen), decay=0.99)
    policy, critic, loss = make_policy_critic_loss()
    optimizer = torch.optim.Adam(loss.parameters(), lr=1e-3)
    collector = Collector(env, policy, frames_per_batch=6 * 4, total_frames=2 * 6 * 4)
    norm = env.transform.norm(OBS)
    for batch in collector:
        for key in ("done", "terminated"):  # the agents' done flags, as TorchRL's multi-agent PPO tutorial
            batch.set(("next", "agents", key),
                      batch["next", key].unsqueeze(-1).expand(batch.get_item_shape(("next", "agents", "reward"))))
        with torch.no_grad():
            loss.value_estimator(batch, params=loss.critic_network_params,
                                 target_params=loss.target_critic_network_params)
        losses = loss(batch)
        total = losses["loss_objective"] + losses["loss_critic"] + losses["loss_entropy"]
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        assert total.isfinite()
        assert batch["agents", "obs_n"][batch["agents", "active"]].abs().max() < 10
    collector.shutdown()
    assert norm.steps > 8 and loss.advantage_stats.count.shape == (3,)
    advantage = batch["agents", "advantage"]
    stock = TorchRLClipPPOLoss(policy, critic, normalize_advantage=True, normalize_advantage_exclude_dims=(-2,))
    torch.testing.assert_close(loss._standardize_advantage(advantage, batch),
                               stock._standardize_advantage(advantage, batch), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss.advantage_stats.mean, advantage.double().mean((0, 1, 3)))


@pytest.mark.parametrize("loss_class", [ClipPPOLoss, PPOLoss, KLPENPPOLoss])
def test_advantage_floor_where_torchrl_divides_by_a_vanishing_std(gen, loss_class):
    _, _, loss = make_policy_critic_loss(loss_class, advantage_min_std=1e-3)
    advantage = 2.0 + 1e-6 * torch.randn(8, 5, 3, 1, generator=gen)
    td = TensorDict({"shifted_valid": torch.rand(8, 5, generator=gen) < 0.8}, batch_size=(8, 5))
    y = loss._standardize_advantage(advantage, td)
    assert y.abs().max() <= 0.01 and loss.advantage_stats.std_below_floor.all()
    valid = td["shifted_valid"]
    torch.testing.assert_close(loss.advantage_stats.count, valid.sum().double().expand(3))


def test_sync_needs_a_process_group(gen):
    env = make_env(seed_of(gen), sync=True)
    with pytest.raises(RuntimeError, match="needs torch.distributed to be initialized"):
        env.rollout(2)


def test_sync_in_a_world_of_one_equals_the_local_statistics(gen, gloo_world_of_one):
    seed = seed_of(gen)
    synced, local = make_env(seed, sync=True), make_env(seed)
    synced.rollout(5, break_when_any_done=False)
    local.rollout(5, break_when_any_done=False)
    for name in ("mean", "var", "count", "steps"):
        torch.testing.assert_close(getattr(synced.transform.norm(OBS), name), getattr(local.transform.norm(OBS), name))
    _, _, loss = make_policy_critic_loss(advantage_sync=True)
    advantage = torch.randn(8, 5, 3, 1, generator=gen)
    torch.testing.assert_close(loss._standardize_advantage(advantage, TensorDict({}, batch_size=(8, 5))),
                               (advantage - advantage.mean((0, 1, 3), keepdim=True))
                               / advantage.std((0, 1, 3), keepdim=True), rtol=1e-5, atol=1e-5)


def test_missing_torchrl_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchrl", None)
    monkeypatch.delitem(sys.modules, "fastnorm.integrations.torchrl")
    with pytest.raises(ImportError, match=r"pip install 'fastnorm\[torchrl\]'"):
        importlib.import_module("fastnorm.integrations.torchrl")
