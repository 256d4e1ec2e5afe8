"""A vectorized multi-agent economy in plain torch, the workload of the rollout and stability
benchmarks: N independent economies of A agents trading G goods.

Each agent has money, an income, the prices it faces and a savings ratio. Each step it keeps
`savings_ratio` of its wealth (money with interest, plus income) and spends the rest over the goods
in the shares it chooses. Prices move towards clearing each good's market (tatonnement) and the
economy's spending is paid back out as next step's incomes, in proportion to each agent's fixed
productivity. Money starts at the seed's "5.0 +- small noise".

Observations (N, A, F) per agent: money, income, savings ratio, the economy's mean money and the
G prices. The policy is a small MLP with fixed random weights (acting, not learning).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

FEATURES = ("money", "income", "savings_ratio", "mean_money")  # then one price per good
MONEY = FEATURES.index("money")


class Economy:
    """N economies x A agents x G goods; `observe()` -> (N, A, F), `step(savings, shares)`."""

    def __init__(self, num_envs: int, num_agents: int, num_goods: int = 4, *, money_noise: float = 0.01,
                 interest: float = 1e-4, price_speed: float = 0.1, seed: int = 0,
                 device: Optional[torch.device] = None):
        gen = torch.Generator().manual_seed(seed)
        n, a, g = num_envs, num_agents, num_goods
        self.num_features = len(FEATURES) + g
        self.interest, self.price_speed = interest, price_speed
        self.money = (5.0 + money_noise * torch.randn(n, a, generator=gen)).to(device)
        self.productivity = torch.exp(0.3 * torch.randn(n, a, generator=gen)).to(device)
        self.productivity /= self.productivity.sum(1, keepdim=True)
        self.income = self.productivity * a  # mean income 1
        self.savings = torch.full((n, a), 0.5, device=device)
        self.prices = torch.ones(n, g, device=device)
        self.supply = torch.full((n, g), float(a), device=device)  # one unit of each good per agent

    def observe(self) -> Tensor:
        n, a = self.money.shape
        per_agent = torch.stack([self.money, self.income, self.savings, self.money.mean(1, keepdim=True).expand(n, a)], -1)
        return torch.cat([per_agent, self.prices.unsqueeze(1).expand(n, a, -1)], -1)

    def step(self, savings: Tensor, shares: Tensor) -> None:
        """savings (N, A) in [0, 1]; shares (N, A, G), each agent's rows summing to 1."""
        wealth = self.money * (1.0 + self.interest) + self.income
        spending = (1.0 - savings) * wealth
        demand = torch.einsum("nag,na->ng", shares, spending) / self.prices  # units asked for
        excess = (demand / self.supply - 1.0).clamp(-5.0, 5.0)
        self.prices = self.prices * torch.exp(self.price_speed * excess)
        self.money = wealth - spending
        self.income = self.productivity * spending.sum(1, keepdim=True)
        self.savings = savings


class Policy(nn.Module):
    """F -> hidden -> hidden -> (savings ratio, G spending shares), tanh MLP, random weights."""

    def __init__(self, num_features: int, num_goods: int = 4, hidden: int = 32, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):  # seeded weights, the global generator untouched
            torch.manual_seed(seed)
            self.net = nn.Sequential(nn.Linear(num_features, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                                     nn.Linear(hidden, 1 + num_goods))

    def forward(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        out = self.net(obs)
        return torch.sigmoid(out[..., 0]), torch.softmax(out[..., 1:], -1)
