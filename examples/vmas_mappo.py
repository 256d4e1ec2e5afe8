"""MAPPO on VMAS with fastnorm in the loop: a compact multi-agent PPO on TorchRL.

A shared-parameter actor and a centralised critic (64x64 MLPs), GAE, clipped PPO. fastnorm does
three jobs in it:

- observations are normalized per (agent, feature) as the env produces them, by
  ``fastnorm.integrations.torchrl.RunningNormTransform`` (a ``fastnorm.RunningNorm``: update +
  normalize in one pass, float64 statistics, std floor, clamp);
- advantages are normalized per agent by ``fastnorm.normalize_advantages`` (std floor 1e-4),
  whose statistics (train/advantages_std_raw, train/advantages_norm_max_abs) come for free;
- ``fastnorm.Monitor`` checks and logs each iteration's scalars to TensorBoard, and
  ``fastnorm.checkpoint.save`` writes checkpoints (model, optimizer, normalizer) that cannot hold NaN.

    python examples/vmas_mappo.py                                  # navigation, 3 agents, CPU, ~a minute
    python examples/vmas_mappo.py --device cuda --envs 30000
    python examples/vmas_mappo.py --scenario transport --normalizer seed
    fastnorm scan runs/vmas_mappo                                  # healthy?

``--normalizer seed`` swaps in the seed's normalizer (bench/seed_normalizer.py: cumulative Welford,
eps 1e-6, no floor, no clamp; advantages ``(adv - mean) / (std + 1e-8)``), ``none`` normalizes
nothing. Needs ``pip install 'fastnorm[torchrl,vmas]'``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable, Optional

import torch
from tensordict import TensorDictBase
from tensordict.nn import NormalParamExtractor, TensorDictModule
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from torchrl.collectors import Collector
from torchrl.envs import RewardSum, Transform, TransformedEnv
from torchrl.envs.libs.vmas import VmasEnv
from torchrl.modules import MultiAgentMLP, ProbabilisticActor, TanhNormal
from torchrl.objectives import ClipPPOLoss, ValueEstimators

import fastnorm
from fastnorm.integrations.torchrl import RunningNormTransform

OBS, REWARD, ACTION = ("agents", "observation"), ("agents", "reward"), ("agents", "action")
EPISODE_REWARD = ("agents", "episode_reward")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--scenario", default="navigation")
    p.add_argument("--agents", type=int, default=3)
    p.add_argument("--envs", type=int, default=60, help="parallel envs; a batch is envs x --steps frames")
    p.add_argument("--steps", type=int, default=100, help="env steps per batch (= the episode length)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--epochs", type=int, default=10, help="passes over each batch (TorchRL's tutorial: 30)")
    p.add_argument("--minibatches", type=int, default=15,
                   help="gradient steps per epoch (400 env steps each by default)")
    p.add_argument("--normalizer", choices=("fastnorm", "seed", "none"), default="fastnorm")
    p.add_argument("--obs-min-std-rel", type=float, default=None,
                   help="fastnorm's relative std floor for the observations (RunningNorm's min_std_rel; default off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--logdir", default="runs/vmas_mappo", help="TensorBoard logs and checkpoints go in LOGDIR/RUN")
    p.add_argument("--run", help="the run's name (default: scenario-normalizer-seed)")
    return p.parse_args(argv)


class SeedNormalize(Transform):
    """The seed's normalizer (bench/seed_normalizer.py) as a TorchRL transform, for comparison: it
    updates with every observation of every step and reset (it has no mask, so at a partial reset
    the envs that did not reset count twice)."""

    def __init__(self, shape: tuple, device):
        super().__init__(in_keys=[OBS], out_keys=[OBS])
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
        from seed_normalizer import RunningPerAgentWelford

        self.norm = RunningPerAgentWelford(shape, device=device)

    def _apply_transform(self, obs: torch.Tensor) -> torch.Tensor:
        return self.norm(obs)

    def _reset(self, tensordict: TensorDictBase, tensordict_reset: TensorDictBase) -> TensorDictBase:
        return self._call(tensordict_reset)


def make_env(args: argparse.Namespace) -> tuple[TransformedEnv, object]:
    """The VMAS env (obs (envs, agents, features) under ("agents", "observation")) with its
    observation normalizer and a per-agent episode-reward sum; returns the env and the normalizer."""
    env = TransformedEnv(VmasEnv(scenario=args.scenario, num_envs=args.envs, continuous_actions=True,
                                 max_steps=args.steps, device=args.device, seed=args.seed, n_agents=args.agents))
    if args.normalizer == "fastnorm":
        # Statistics per (agent, feature): the spec's shape beyond the env's batch dim (envs).
        transform = RunningNormTransform(in_keys=[OBS], min_std_rel=args.obs_min_std_rel)
        env.append_transform(transform)
        norm = transform.norm(OBS)
    elif args.normalizer == "seed":
        transform = SeedNormalize(tuple(env.observation_spec[OBS].shape[-2:]), args.device)
        env.append_transform(transform)
        norm = transform.norm
    else:
        norm = None
    env.append_transform(RewardSum(in_keys=[REWARD], out_keys=[EPISODE_REWARD]))
    return env, norm


def make_actor_critic(env: TransformedEnv, device) -> tuple[ProbabilisticActor, TensorDictModule]:
    """A shared-parameter actor on each agent's observation and a centralised critic on all of them."""
    n_agents, n_features = env.observation_spec[OBS].shape[-2:]
    n_actions = env.full_action_spec[ACTION].shape[-1]
    mlp = dict(n_agents=n_agents, share_params=True, depth=2, num_cells=64, activation_class=nn.Tanh, device=device)
    actor_net = nn.Sequential(MultiAgentMLP(n_features, 2 * n_actions, centralised=False, **mlp),
                              NormalParamExtractor())
    actor = ProbabilisticActor(
        TensorDictModule(actor_net, in_keys=[OBS], out_keys=[("agents", "loc"), ("agents", "scale")]),
        spec=env.full_action_spec_unbatched[ACTION], in_keys=[("agents", "loc"), ("agents", "scale")],
        out_keys=[ACTION], distribution_class=TanhNormal, return_log_prob=True,
        distribution_kwargs={"low": env.full_action_spec_unbatched[ACTION].space.low,
                             "high": env.full_action_spec_unbatched[ACTION].space.high})
    critic = TensorDictModule(MultiAgentMLP(n_features, 1, centralised=True, **mlp), in_keys=[OBS],
                              out_keys=[("agents", "state_value")])
    return actor, critic


def normalize_advantages(adv: torch.Tensor, kind: str) -> tuple[torch.Tensor, dict[str, float]]:
    """adv (..., agents, 1) normalized per agent, and its statistics under the seed's metric names."""
    flat = adv.reshape(-1, adv.shape[-2])
    if kind == "fastnorm":
        y, stats = fastnorm.normalize_advantages(flat, dim=0)
        return y.reshape(adv.shape), stats.as_dict(prefix="train/advantages_")
    std = flat.std(0)
    y = (flat - flat.mean(0)) / (std + 1e-8) if kind == "seed" else flat  # the seed's formula, per agent
    return y.reshape(adv.shape), {"train/advantages_std_raw": std.min().item(),
                                  "train/advantages_norm_max_abs": y.abs().max().item()}


def explained_variance(value: torch.Tensor, target: torch.Tensor) -> float:
    """1 - Var(target - value) / Var(target) over the batch: 1 is a perfect critic, 0 a constant one."""
    return (1 - (target - value).var() / target.var().clamp(min=1e-12)).item()


def train(args: argparse.Namespace, on_iteration: Optional[Callable] = None) -> list[dict[str, float]]:
    """Trains for ``args.iters`` iterations; returns each iteration's scalars. ``on_iteration(i,
    batch, scalars, norm)``, if given, sees each batch (normalized observations included) and the
    observation normalizer after the update. Stops early when the run diverges (a checkpoint that
    would hold NaN or inf)."""
    torch.manual_seed(args.seed)
    env, norm = make_env(args)
    actor, critic = make_actor_critic(env, args.device)
    collector = Collector(env, actor, frames_per_batch=args.envs * args.steps,
                          total_frames=args.envs * args.steps * args.iters, device=args.device,
                          auto_register_policy_transforms=False)
    loss_module = ClipPPOLoss(actor, critic, clip_epsilon=0.2, entropy_coeff=1e-4, normalize_advantage=False)
    loss_module.set_keys(reward=REWARD, action=ACTION, value=("agents", "state_value"),
                         done=("agents", "done"), terminated=("agents", "terminated"))
    loss_module.make_value_estimator(ValueEstimators.GAE, gamma=0.99, lmbda=0.9)
    optim = torch.optim.Adam(loss_module.parameters(), lr=3e-4)

    run_dir = os.path.join(args.logdir, args.run or f"{args.scenario}-{args.normalizer}-{args.seed}")
    monitor = fastnorm.Monitor(writer=SummaryWriter(run_dir))
    history, start = [], time.perf_counter()
    for i, batch in enumerate(collector):
        # The env's done flags are per env; GAE wants them per agent, like the rewards.
        for key in ("done", "terminated"):
            batch.set(("next", "agents", key),
                      batch.get(("next", key)).unsqueeze(-1).expand(batch.get_item_shape(("next", REWARD))))
        with torch.no_grad():
            loss_module.value_estimator(batch, params=loss_module.critic_network_params,
                                        target_params=loss_module.target_critic_network_params)
        adv, adv_scalars = normalize_advantages(batch.get("advantage"), args.normalizer)
        batch.set("advantage", adv)
        scalars = {**adv_scalars, "train/explained_variance": explained_variance(
            batch.get(("agents", "state_value")), batch.get("value_target"))}
        scalars.update(ppo_epochs(loss_module, optim, batch.reshape(-1), args))
        done = batch.get(("next", "agents", "done"))
        scalars["rollout/ep_rew_mean"] = batch.get(("next", *EPISODE_REWARD))[done].mean().item()
        if isinstance(norm, fastnorm.RunningNorm):
            scalars.update(norm.health(prefix="obs/"))
        monitor.update(scalars, step=i)
        history.append(scalars)
        print(f"iter {i:3d}  reward {scalars['rollout/ep_rew_mean']:7.3f}"
              f"  adv std {scalars['train/advantages_std_raw']:.3g}  grad norm {scalars['train/grad_norm']:8.3g}"
              f"  ev {scalars['train/explained_variance']:6.3f}"
              f"  ({time.perf_counter() - start:.0f} s)", flush=True)
        if on_iteration is not None:
            on_iteration(i, batch, scalars, norm)
        state = {"actor": actor.state_dict(), "critic": critic.state_dict(), "optim": optim.state_dict(),
                 "iteration": i}
        if isinstance(norm, fastnorm.RunningNorm):
            state["obs_norm"] = norm.state_dict()
        try:
            fastnorm.checkpoint.save(state, os.path.join(run_dir, "checkpoint.pt"))
        except fastnorm.checkpoint.NonFiniteError as error:
            print(f"diverged at iteration {i}, checkpoint not written: {error}")
            break
    collector.shutdown()
    monitor.writer.close()
    return history


def ppo_epochs(loss_module: ClipPPOLoss, optim: torch.optim.Optimizer, data: TensorDictBase,
               args: argparse.Namespace) -> dict[str, float]:
    """``args.epochs`` passes over the batch in shuffled minibatches; the iteration's scalars:
    mean losses and clip fraction, and the largest gradient norm (before clipping to 1)."""
    sums, grad_norms, steps = {}, [], 0
    for _ in range(args.epochs):
        for idx in torch.randperm(data.shape[0], device=data.device).chunk(args.minibatches):
            out = loss_module(data[idx])
            loss = out["loss_objective"] + out["loss_critic"] + out["loss_entropy"]
            optim.zero_grad()
            loss.backward()
            grad_norms.append(torch.nn.utils.clip_grad_norm_(loss_module.parameters(), 1.0))
            optim.step()
            for name, key in (("policy_loss", "loss_objective"), ("value_loss", "loss_critic"),
                              ("clip_fraction", "clip_fraction"), ("entropy", "entropy")):
                sums[name] = sums.get(name, 0.0) + out[key].detach()
            steps += 1
    scalars = {f"train/{name}": (total / steps).item() for name, total in sums.items()}
    scalars["train/grad_norm"] = torch.stack(grad_norms).max().item()
    return scalars


def main(argv=None):
    args = parse_args(argv)
    print(f"MAPPO on VMAS {args.scenario}: {args.agents} agents, {args.envs} envs x {args.steps} steps per batch, "
          f"{args.iters} iterations, normalizer {args.normalizer}, device {args.device}")
    history = train(args)
    print(f"mean episode reward: {history[0]['rollout/ep_rew_mean']:.3f} -> {history[-1]['rollout/ep_rew_mean']:.3f}; "
          f"logs in {args.logdir} (fastnorm scan {args.logdir})")


if __name__ == "__main__":
    main()
