"""Amortized inverse-autoregressive-flow guide (Kingma et al. 2016).

    (mu, sigma, h) <- encoder(x)                      h: context features of x
    z_0 ~ N(mu, diag sigma^2)
    z_k = f_k(z_{k-1}; h),  k = 1..K                  conditional affine autoregressive steps
    log q(z_K | x) = log N(z_0; mu, sigma) - sum_k log |det dz_k / dz_{k-1}|

Each step is Pyro's :class:`~pyro.distributions.transforms.ConditionalAffineAutoregressive`
(a MADE network of z_{k-1} and the context h; Jacobian triangular, so its log-determinant is
the sum of the log-scales). By default the numerically stable gated update of the paper's
eq. (14), z_k = s * z_{k-1} + (1 - s) * m, is used. Each MADE draws its own random input
order, so successive steps see the coordinates in different orders.

Sampling and scoring a sample are one pass per step (Pyro caches the inverse); scoring an
arbitrary z inverts each step coordinate by coordinate (D passes).

Not tied to any model: it serves any vector latent site inside a data plate, with the same
constructor shape as :class:`ppl_vae.guides.amortized.AmortizedNormal`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.transforms import ConditionalAffineAutoregressive
from pyro.nn import ConditionalAutoRegressiveNN
from torch import nn

from ppl_vae.guides.amortized import AmortizedNormal
from ppl_vae.nn import NormalHead, mlp_body


class ContextNormalEncoder(nn.Module):
    """body network -> (loc, scale, h): a diagonal Normal's parameters (..., D) and the body's
    features h (..., hidden) as the flow's context."""

    def __init__(self, body: nn.Module, hidden: int, latent_dim: int, flatten: int = 0):
        super().__init__()
        self.body = body
        self.head = NormalHead(hidden, latent_dim)
        self.hidden = hidden
        self.flatten = flatten

    @classmethod
    def mlp(cls, input_dim: int, hidden: Sequence[int], latent_dim: int,
            activation: str = "relu", flatten: int = 0) -> ContextNormalEncoder:
        return cls(mlp_body(input_dim, hidden, activation), hidden[-1], latent_dim,
                   flatten=flatten)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.flatten:
            x = x.flatten(-self.flatten)
        h = self.body(x)
        loc, scale = self.head(h)
        return loc, scale, h


class AmortizedIAF(AmortizedNormal):
    """Guide q(z|x): diagonal Normal followed by ``num_flows`` conditional IAF steps.

    Args:
        encoder: module mapping the input (B, ...) to ``(loc, scale, context)`` with shapes
            (B, D), (B, D), (B, C), e.g. :class:`ContextNormalEncoder`.
        latent_dim: D; context_dim: C.
        num_flows: K, the number of autoregressive steps.
        flow_hidden: hidden sizes of each step's MADE network (default ``[4 * D]``).
        stable: use the gated update of Kingma et al. (2016), eq. (14).
        site, plate, plate_dim, inputs: as for
            :class:`~ppl_vae.guides.amortized.AmortizedNormal` (vector site, event_dim 1).
    """

    def __init__(self, encoder: nn.Module, latent_dim: int, context_dim: int,
                 num_flows: int = 2, flow_hidden: Sequence[int] | None = None,
                 stable: bool = True, site: str = "z", plate: str = "data",
                 plate_dim: int = -1, inputs: Callable[..., torch.Tensor] | str | None = None):
        if plate_dim != -1:
            raise ValueError(f"{type(self).__name__} needs the data plate at dim -1 of the "
                             f"model, got plate_dim={plate_dim}; open it there, or use "
                             "AmortizedNormal, which takes any plate_dim")
        super().__init__(encoder, site=site, plate=plate, event_dim=1, plate_dim=plate_dim,
                         inputs=inputs)
        if num_flows < 1:
            raise ValueError(f"num_flows must be >= 1, got {num_flows}")
        hidden = list(flow_hidden) if flow_hidden else [4 * latent_dim]
        self.flows = nn.ModuleList(
            ConditionalAffineAutoregressive(
                ConditionalAutoRegressiveNN(latent_dim, context_dim, hidden), stable=stable)
            for _ in range(num_flows))

    def distribution(self, *args, **kwargs) -> dist.Distribution:
        """q(z | x) for a batch: batch shape (B,), event shape (D,)."""
        loc, scale, context = self.encoder(self.encoder_input(*args, **kwargs))
        base = dist.Normal(loc, scale).to_event(1)
        return dist.TransformedDistribution(base, [f.condition(context) for f in self.flows])

    def forward(self, *args, size: int | None = None, subsample: torch.Tensor | None = None,
                **kwargs) -> torch.Tensor:
        pyro.module(f"{self.site}_iaf", self.flows)
        return super().forward(*args, size=size, subsample=subsample, **kwargs)
