"""Probabilistic PCA (Tipping & Bishop 1999): the linear-Gaussian latent-variable model.

    z_i ~ N(0, I_k)
    x_i | z_i ~ N(W z_i + b, sigma^2 I_d)

Its marginal is exact, x_i ~ N(b, W W^T + sigma^2 I_d), so it is the reference case for
checking estimators of log p(x) (ELBO, importance sampling) and guides.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import nn


class PPCA(nn.Module):
    """PPCA with learnable W (d, k), b (d,) and noise scale sigma."""

    def __init__(self, data_dim: int, latent_dim: int, init_scale: float = 0.1):
        super().__init__()
        self.latent_dim = latent_dim
        self.weight = nn.Parameter(init_scale * torch.randn(data_dim, latent_dim))
        self.bias = nn.Parameter(torch.zeros(data_dim))
        self.log_noise = nn.Parameter(torch.zeros(()))

    def model(self, x: torch.Tensor, size: int | None = None,
              subsample: torch.Tensor | None = None) -> None:
        """x: (B, d) observations."""
        pyro.module("ppca", self)
        with pyro.plate("data", size or len(x), subsample=subsample):
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.latent_dim), 1.0).to_event(1))
            loc = z @ self.weight.T + self.bias
            pyro.sample("x", dist.Normal(loc, self.log_noise.exp()).to_event(1), obs=x)

    forward = model

    def marginal(self) -> dist.MultivariateNormal:
        """The exact p(x) = N(b, W W^T + sigma^2 I)."""
        d = self.bias.shape[0]
        cov = self.weight @ self.weight.T + self.log_noise.exp() ** 2 * torch.eye(d)
        return dist.MultivariateNormal(self.bias, covariance_matrix=cov)

    @torch.no_grad()
    def exact_log_likelihood(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x_i) per example, shape (B,), nats."""
        return self.marginal().log_prob(x)
