"""fastnorm: fused running normalization for large multi-agent reinforcement learning.

    norm = fastnorm.RunningNorm((num_agents, num_features))
    y = norm(obs)                 # obs: (*batch, num_agents, num_features)
    adv_n, stats = fastnorm.normalize_advantages(adv, mask=active, min_std=1e-4)

``fastnorm.backends()`` lists the kernels built here and why any is missing.
"""

from fastnorm import checkpoint
from fastnorm.advantages import AdvantageStats, normalize_advantages
from fastnorm.backends import backends, default_backend
from fastnorm.monitoring import Monitor
from fastnorm.running_norm import RunningNorm

__all__ = ["AdvantageStats", "Monitor", "RunningNorm", "backends", "checkpoint", "default_backend",
           "normalize_advantages"]
__version__ = "0.1.0"
