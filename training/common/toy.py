"""Shared pieces of the CPU toy problems (STD and SiD-LSG): an exact Gaussian-mixture teacher and small MLPs."""

from __future__ import annotations

import math

import torch
from torch import nn


class GMM:
    """A 2-D mixture: 8 components on a ring of radius 2, std 0.2 (a classic multimodal test)."""

    def __init__(self, k: int = 8, radius: float = 2.0, std: float = 0.2):
        angles = torch.arange(k) * (2 * math.pi / k)
        self.means = torch.stack([radius * angles.cos(), radius * angles.sin()], 1)
        self.var = std ** 2
        self.weights = torch.full((k,), 1.0 / k)

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        idx = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        return self.means[idx] + math.sqrt(self.var) * torch.randn(n, 2, generator=generator)

    def eps(self, x_t: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
        """Exact ε-prediction: ε = -s_t ∇ log p_t(x_t)."""
        a, s2 = alpha_bar.sqrt().view(-1, 1, 1), (1 - alpha_bar).view(-1, 1, 1)
        var = a ** 2 * self.var + s2                                     # [B,1,1] isotropic per component
        diff = x_t[:, None, :] - a * self.means[None]                    # [B,K,2]
        logp = -(diff ** 2).sum(-1, keepdim=True) / (2 * var) + self.weights.log().view(1, -1, 1)
        resp = torch.softmax(logp, dim=1)                                # [B,K,1]
        score = -(resp * diff / var).sum(1)                              # [B,2]
        return -s2.view(-1, 1).sqrt() * score


def mlp(inp: int, out: int, width: int = 128) -> nn.Module:
    return nn.Sequential(nn.Linear(inp, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                         nn.Linear(width, width), nn.SiLU(), nn.Linear(width, out))


class Score(nn.Module):
    """ε(x_t, t) with a sinusoidal embedding of t/1000."""

    def __init__(self):
        super().__init__()
        self.net = mlp(2 + 16, 2)

    def forward(self, x, t):
        f = torch.arange(8, dtype=torch.float32)
        ang = (t.float()[:, None] / 1000.0) * (2.0 ** f)[None] * math.pi
        return self.net(torch.cat([x, ang.sin(), ang.cos()], 1))


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, projections: int = 256, seed: int = 0) -> float:
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(projections, a.shape[1], generator=g)
    dirs = dirs / dirs.norm(dim=1, keepdim=True)
    pa, pb = (a @ dirs.T).sort(0).values, (b @ dirs.T).sort(0).values
    return float((pa - pb).abs().mean())
