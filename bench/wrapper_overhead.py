"""Where the time of one small update + normalize goes on the CPU: RunningNorm's module call, the
adapters' path (fastnorm/integrations/numpy_running_norm.py) and the bare op, at 8 envs x 16 features.

    python bench/wrapper_overhead.py [--envs 8] [--features 16]

Interleaved rounds, medians (bench/timing.py); then a cProfile of the module call, by function.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from timing import Case, Plan, interleaved_medians  # noqa: E402

import fastnorm  # noqa: E402
from fastnorm.integrations.numpy_running_norm import NumpyRunningNorm  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envs", type=int, default=8)
    parser.add_argument("--features", type=int, default=16)
    args = parser.parse_args(argv)
    x = np.random.default_rng(0).normal(2.0, 3.0, (args.envs, args.features)).astype(np.float32)
    module = fastnorm.RunningNorm((args.features,), momentum=None, eps=1e-8, min_std=None, clip=None)
    adapter = NumpyRunningNorm((args.features,), eps=1e-8)
    x_t, y_t = torch.from_numpy(x), torch.empty(x.shape)
    op = torch.ops.fastnorm.running_norm.default
    mean, var, count, diag = module.mean, module.var, module.count, module._diag

    def module_call():
        return module(torch.from_numpy(x)).numpy()

    cases = [
        Case("RunningNorm module call (from_numpy, norm(x), .numpy())", module_call),
        Case("adapter: NumpyRunningNorm.update_normalize", lambda: adapter.update_normalize(x)),
        Case("bare op torch.ops.fastnorm.running_norm", lambda: op(x_t, None, mean, var, count, y_t, diag, None, None,
                                                                   1e-8, None, None, None)),
        Case("steps.add_(1) alone", lambda: module.steps.add_(1)),
        Case("numpy: Gymnasium's RunningMeanStd update + normalize", gym_step(x)),
    ]
    medians = interleaved_medians(cases, torch.device("cpu"), Plan(rounds=2000, warmup=200, budget_s=1.0))
    print(f"{args.envs} envs x {args.features} features, float32, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f}")
    for name, (seconds, calls) in medians.items():
        print(f"  {seconds * 1e6:8.1f} us  {name}  ({calls} calls)")
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(5000):
        module_call()
    profile.disable()
    print("\ncProfile of 5000 module calls (tottime, by function):")
    pstats.Stats(profile).sort_stats("tottime").print_stats(12)


def gym_step(x):
    from gymnasium.wrappers.utils import RunningMeanStd

    rms = RunningMeanStd(shape=x.shape[1:], dtype=np.float32)

    def step():
        rms.update(x)
        return ((x - rms.mean) / np.sqrt(rms.var + 1e-8)).astype(np.float32)
    return step


if __name__ == "__main__":
    main()
