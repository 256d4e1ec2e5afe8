"""fastnorm.integrations.rsl_rl against rsl-rl-lib's own classes and inside its OnPolicyRunner."""

from __future__ import annotations

import math

import onnxruntime
import pytest
import torch
from rsl_rl.env import VecEnv
from rsl_rl.modules.normalization import EmpiricalNormalization as HostNorm
from rsl_rl.runners import OnPolicyRunner
from tensordict import TensorDict

from fastnorm.integrations import rsl_rl as fastnorm_rsl_rl

# Nothing here is skipped: make test installs rsl_rl and onnxruntime (fastnorm[integrations,export]).
# rsl_rl computes in float32 from float32 statistics, fastnorm in float64: agreement to float32 rounding.
F32 = dict(rtol=1e-5, atol=1e-5)


def batches(gen, n, rows, cols, scale=3.0):
    offsets = torch.randn(cols, generator=gen) * 10
    return [offsets + scale * torch.randn(rows, cols, generator=gen) for _ in range(n)]


def test_same_statistics_and_outputs_as_rsl_rl(gen):
    host, ours = HostNorm(7), fastnorm_rsl_rl.EmpiricalNormalization(7)
    for x in batches(gen, 5, 33, 7):
        host.update(x)
        ours.update(x)
        torch.testing.assert_close(ours(x), host(x), **F32)
    assert ours.count.dtype == torch.long and int(ours.count) == int(host.count) == 5 * 33
    torch.testing.assert_close(ours.mean, host.mean, **F32)
    torch.testing.assert_close(ours.std, host.std, **F32)
    y = torch.randn(4, 7, generator=gen)
    torch.testing.assert_close(ours.inverse(y), host.inverse(y), **F32)


# rsl_rl's own expectations of its normalizer (its tests of EmpiricalNormalization), met by both classes.
BOTH = pytest.mark.parametrize("cls", [HostNorm, fastnorm_rsl_rl.EmpiricalNormalization], ids=["rsl_rl", "fastnorm"])


@BOTH
def test_host_contract_converges_and_normalizes(cls, gen):
    norm = cls(shape=4)
    for _ in range(200):
        norm.update(5.0 + 2.0 * torch.randn(64, 4, generator=gen))
    assert torch.allclose(norm.mean, torch.full((4,), 5.0), atol=0.15)
    assert torch.allclose(norm.std, torch.full((4,), 2.0), atol=0.15)
    x = torch.randn(16, 4, generator=gen) * 3 + 5
    # Within float32 rounding: fastnorm's kernel computes y in float32 from float64 statistics, and
    # outputs near 0 carry x - mean's cancellation, so no pure relative tolerance fits them.
    expected = ((x - norm._mean) / (norm._std + norm.eps)).to(x.dtype)
    torch.testing.assert_close(norm(x), expected, **F32)
    assert torch.allclose(norm.inverse(norm(x)), x, atol=1e-5)


@BOTH
def test_host_contract_until_eval_and_single_sample(cls, gen):
    norm = cls(shape=2, until=100)
    for _ in range(10):
        norm.update(torch.randn(20, 2, generator=gen))
    assert norm.count >= 100
    snapshot = norm._mean.clone(), norm._std.clone()
    norm.update(torch.randn(20, 2, generator=gen) + 100)
    assert torch.equal(norm._mean, snapshot[0]) and torch.equal(norm._std, snapshot[1])
    fresh = cls(shape=2)
    fresh.update(torch.tensor([[1.0, 2.0]]))
    assert not torch.isnan(fresh._mean).any() and not torch.isnan(fresh._std).any()
    fresh.eval()
    snapshot = fresh._mean.clone(), fresh._std.clone()
    fresh.update(torch.randn(50, 2, generator=gen) + 100)
    assert torch.equal(fresh._mean, snapshot[0]) and torch.equal(fresh._std, snapshot[1])


def test_until_and_eval_stop_updates(gen):
    host, ours = HostNorm(3, until=50), fastnorm_rsl_rl.EmpiricalNormalization(3, until=50)
    for x in batches(gen, 4, 30, 3):  # learns from the first two batches only: 30 < 50 <= 60
        host.update(x)
        ours.update(x)
    assert int(ours.count) == int(host.count) == 60
    torch.testing.assert_close(ours.mean, host.mean, **F32)
    ours.eval()
    before = ours.state_dict()
    ours.update(torch.randn(10, 3, generator=gen))
    torch.testing.assert_close(ours.state_dict(), before, rtol=0, atol=0)


@pytest.mark.parametrize("direction", ["rsl_rl to fastnorm", "fastnorm to rsl_rl"])
def test_checkpoint_round_trip(gen, direction):
    writer_cls, reader_cls = HostNorm, fastnorm_rsl_rl.EmpiricalNormalization
    if direction == "fastnorm to rsl_rl":
        writer_cls, reader_cls = reader_cls, writer_cls
    writer, reader = writer_cls((2, 3)), reader_cls((2, 3))
    for x in batches(gen, 3, 16, 6):
        writer.update(x.view(16, 2, 3))
    state = writer.state_dict()
    assert set(state) == {"_mean", "_var", "_std", "count"}
    reader.load_state_dict(state)  # strict
    x = torch.randn(5, 2, 3, generator=gen)
    torch.testing.assert_close(reader(x), writer(x), **F32)
    assert int(reader.count) == int(writer.count) == 48


def test_state_dict_inside_a_model_and_its_validation(gen):
    model = torch.nn.Sequential(fastnorm_rsl_rl.EmpiricalNormalization(4), torch.nn.Linear(4, 2))
    assert {k for k in model.state_dict() if k.startswith("0.")} == {"0._mean", "0._var", "0._std", "0.count"}
    other = torch.nn.Sequential(HostNorm(4), torch.nn.Linear(4, 2))
    other[0].update(torch.randn(9, 4, generator=gen) + 5)
    model.load_state_dict(other.state_dict())
    torch.testing.assert_close(model[0].mean, other[0].mean, **F32)

    bad = other.state_dict()
    bad["0._var"] = torch.full((1, 4), math.nan)
    with pytest.raises(ValueError, match="non-finite"):
        model.load_state_dict(bad)
    bad["0._var"] = torch.ones(1, 5)
    with pytest.raises(RuntimeError, match="size mismatch for 0._var"):
        model.load_state_dict(bad)
    torch.testing.assert_close(model[0].mean, other[0].mean, **F32)  # unchanged by the failed loads


def test_bad_input_leaves_the_statistics_unchanged(gen):
    ours = fastnorm_rsl_rl.EmpiricalNormalization(4)
    ours.update(torch.randn(20, 4, generator=gen))
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(ValueError, match=r"x must have shape \(\*batch, 4\), got \(20, 5\)"):
        ours.update(torch.randn(20, 5, generator=gen))
    with pytest.raises(ValueError, match="x is on meta but the statistics are on cpu"):
        ours.update(torch.empty(20, 4, device="meta"))
    torch.testing.assert_close(ours.state_dict(), before, rtol=0, atol=0)


def test_nan_rows_stay_out_of_the_statistics(gen):
    ours, clean = fastnorm_rsl_rl.EmpiricalNormalization(3), fastnorm_rsl_rl.EmpiricalNormalization(3)
    x = torch.randn(12, 3, generator=gen) * 2 + 1
    poisoned = torch.cat([x, torch.full((4, 3), math.nan)])
    ours.update(poisoned)
    clean.update(x)
    torch.testing.assert_close(ours.state_dict(), clean.state_dict(), rtol=2e-6, atol=2e-6)  # float32 blocks
    y = ours(poisoned)
    assert torch.isnan(y[12:]).all() and torch.isfinite(y[:12]).all()


def test_fixes_switch_changes_the_math(gen):
    exact, fixed = fastnorm_rsl_rl.EmpiricalNormalization(2), fastnorm_rsl_rl.EmpiricalNormalization(2, fixes=True)
    assert (exact.norm.momentum, exact.norm.min_std, exact.norm.clip) == (None, None, None)
    assert (fixed.norm.momentum, fixed.norm.min_std, fixed.norm.clip) == (0.99, 1e-2, 10.0)
    for x in batches(gen, 3, 8, 2):
        fixed.update(x)
    assert fixed(torch.full((1, 2), 1e6)).abs().max() == 10.0  # the clamp


class TinyVecEnv(VecEnv):
    """A point mass pulled towards a target: observations around 100 with small spreads."""

    def __init__(self, num_envs: int, gen: torch.Generator):
        self.num_envs, self.num_actions, self.max_episode_length = num_envs, 2, 8
        self.device, self.cfg, self.gen = "cpu", {}, gen
        self.episode_length_buf = torch.zeros(num_envs, dtype=torch.long)
        self.pos = torch.randn(num_envs, 2, generator=gen)

    def get_observations(self) -> TensorDict:
        obs = torch.cat([100 + self.pos, 0.1 * self.pos.square()], dim=1)
        return TensorDict({"policy": obs}, batch_size=[self.num_envs])

    def step(self, actions):
        self.pos = self.pos + 0.1 * actions.clamp(-1, 1)
        self.episode_length_buf += 1
        dones = self.episode_length_buf >= self.max_episode_length
        self.episode_length_buf[dones] = 0
        self.pos[dones] = torch.randn(int(dones.sum()), 2, generator=self.gen)
        rewards = -self.pos.square().sum(1)
        return self.get_observations(), rewards, dones.long(), {"time_outs": dones.float()}


def train_cfg() -> dict:
    model = {"class_name": "fastnorm.integrations.rsl_rl:MLPModel", "obs_normalization": True,
             "hidden_dims": [16, 16], "activation": "elu"}
    return {
        "num_steps_per_env": 8, "save_interval": 100, "obs_groups": {"actor": ["policy"], "critic": ["policy"]},
        "algorithm": {"class_name": "fastnorm.integrations.rsl_rl:PPO", "num_learning_epochs": 2,
                      "num_mini_batches": 2},
        "actor": {**model, "distribution_cfg": {"class_name": "GaussianDistribution", "init_std": 1.0}},
        "critic": dict(model),
    }


def test_on_policy_runner_trains_and_exports(gen, tmp_path):
    torch.manual_seed(int(torch.randint(2**31, (1,), generator=gen)))
    runner = OnPolicyRunner(TinyVecEnv(16, gen), train_cfg(), log_dir=None, device="cpu")
    actor = runner.alg.get_policy()
    assert isinstance(actor.obs_normalizer, fastnorm_rsl_rl.EmpiricalNormalization)
    assert isinstance(runner.alg, fastnorm_rsl_rl.PPO)
    runner.learn(2)
    assert int(actor.obs_normalizer.count) == 2 * 8 * 16
    assert 99 < float(actor.obs_normalizer.mean[0]) < 101  # learned the observations' offset

    runner.save(str(tmp_path / "model.pt"))
    again = OnPolicyRunner(TinyVecEnv(16, gen), train_cfg(), log_dir=None, device="cpu")
    again.load(str(tmp_path / "model.pt"))
    torch.testing.assert_close(again.alg.get_policy().obs_normalizer.state_dict(), actor.obs_normalizer.state_dict())

    obs = runner.env.get_observations()["policy"] + torch.randn(16, 4, generator=gen)
    policy = runner.get_inference_policy()
    with torch.no_grad():
        expected = policy(TensorDict({"policy": obs}, batch_size=[16]))
    runner.export_policy_to_jit(str(tmp_path), "policy.pt")
    scripted = torch.jit.load(str(tmp_path / "policy.pt"))
    torch.testing.assert_close(scripted(obs), expected, **F32)
    runner.export_policy_to_onnx(str(tmp_path), "policy.onnx")
    session = onnxruntime.InferenceSession(str(tmp_path / "policy.onnx"))
    for row in range(4):  # rsl_rl exports for one observation at a time (its dummy input's batch of 1)
        (actions,) = session.run(None, {"obs": obs[row:row + 1].numpy()})
        torch.testing.assert_close(torch.from_numpy(actions), expected[row:row + 1], **F32)


def test_ppo_normalizes_advantages_with_fastnorm(gen):
    torch.manual_seed(int(torch.randint(2**31, (1,), generator=gen)))
    runner = OnPolicyRunner(TinyVecEnv(8, gen), train_cfg(), log_dir=None, device="cpu")
    obs = runner.env.get_observations()
    with torch.inference_mode():
        for _ in range(8):
            runner.alg.act(obs)
            obs, rewards, dones, extras = runner.env.step(runner.alg.transition.actions)
            runner.alg.process_env_step(obs, rewards, dones, extras)
        runner.alg.compute_returns(obs)
    storage = runner.alg.storage
    raw = storage.returns - storage.values
    expected = (raw - raw.mean()) / max(float(raw.std()), 1e-4)
    torch.testing.assert_close(storage.advantages, expected, **F32)
    with pytest.raises(ValueError, match="normalize_advantage_per_mini_batch must be False"):
        cfg = train_cfg()
        cfg["algorithm"]["normalize_advantage_per_mini_batch"] = True
        OnPolicyRunner(TinyVecEnv(8, gen), cfg, log_dir=None, device="cpu")
