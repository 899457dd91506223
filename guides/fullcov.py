"""Amortized full-covariance Gaussian guide: q(z_i | x_i) = N(mu(x_i), L(x_i) L(x_i)^T).

The lecture's Algorithm 2 (seed 001, Kingma & Welling 2019, section 2.5):

    (mu, log sigma, L') <- EncoderNeuralNet(x)
    L   <- L_mask * L' + diag(sigma)          L_mask: ones strictly below the diagonal
    eps ~ N(0, I)
    z   <- mu + L eps
    log q(z|x) = sum_i log N(eps_i; 0, 1) - sum_i log sigma_i
               = -sum_i (1/2 (eps_i^2 + log 2 pi) + log sigma_i)

The Jacobian dz/deps = L is lower triangular with diagonal sigma, so log|det| = sum log sigma.
(The seed's pseudo-code line ``log qz <- -sum(1/2 (eps^2 + log(2 pi) + log sigma))`` puts
log sigma inside the factor 1/2; that is a typo -- the density above, used here, is the
correct one and equals ``MultivariateNormal(mu, scale_tril=L).log_prob(z)``.)

Not tied to any model: like :class:`ppl_vae.guides.amortized.AmortizedNormal` it serves any
vector latent site inside a data plate.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import pyro.distributions as dist
import torch
from pyro.distributions.torch_distribution import TorchDistribution
from torch import nn
from torch.distributions import constraints

from ppl_vae.guides.amortized import AmortizedNormal
from ppl_vae.nn import mlp_body

LOG_2PI = math.log(2 * math.pi)


class CholeskyGaussian(TorchDistribution):
    """N(loc, L L^T) with L = L_mask * L' + diag(exp(log_scale)), sampled and scored as in
    Algorithm 2.

    Args:
        loc: mu, shape (..., D).
        log_scale: log sigma, shape (..., D) (the diagonal of L, in log units).
        tril: L', shape (..., D, D); only its strictly lower triangle is used.
    """

    arg_constraints = {"loc": constraints.real_vector, "log_scale": constraints.real_vector}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, loc: torch.Tensor, log_scale: torch.Tensor, tril: torch.Tensor,
                 validate_args: bool | None = None):
        d = loc.shape[-1]
        mask = torch.ones(d, d, dtype=loc.dtype, device=loc.device).tril(-1)
        self.loc = loc
        self.log_scale = log_scale
        self.scale_tril = mask * tril + torch.diag_embed(log_scale.exp())   # L
        batch_shape = torch.broadcast_shapes(loc.shape[:-1], log_scale.shape[:-1],
                                             tril.shape[:-2])
        super().__init__(batch_shape, loc.shape[-1:], validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(CholeskyGaussian, _instance)
        batch_shape = torch.Size(batch_shape)
        new.loc = self.loc.expand(batch_shape + self.event_shape)
        new.log_scale = self.log_scale.expand(batch_shape + self.event_shape)
        new.scale_tril = self.scale_tril.expand(batch_shape + self.event_shape * 2)
        super(CholeskyGaussian, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def rsample(self, sample_shape: tuple = ()) -> torch.Tensor:
        """z = mu + L eps, eps ~ N(0, I); shape sample_shape + batch_shape + (D,)."""
        shape = self._extended_shape(torch.Size(sample_shape))
        eps = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
        return self.loc + (self.scale_tril @ eps.unsqueeze(-1)).squeeze(-1)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """sum log N(eps; 0, 1) - sum log sigma with eps = L^{-1}(z - mu); nats, shape
        broadcast(sample, batch)."""
        diff = (value - self.loc).unsqueeze(-1)
        tril = self.scale_tril.expand(diff.shape[:-2] + self.scale_tril.shape[-2:])
        eps = torch.linalg.solve_triangular(tril, diff, upper=False).squeeze(-1)
        return (-0.5 * (eps.pow(2) + LOG_2PI)).sum(-1) - self.log_scale.sum(-1)

    @property
    def mean(self) -> torch.Tensor:
        return self.loc

    @property
    def covariance_matrix(self) -> torch.Tensor:
        return self.scale_tril @ self.scale_tril.transpose(-1, -2)

    @property
    def variance(self) -> torch.Tensor:
        return self.scale_tril.pow(2).sum(-1)

    def entropy(self) -> torch.Tensor:
        d = self.event_shape[0]
        return 0.5 * d * (1.0 + LOG_2PI) + self.log_scale.sum(-1)


class FullCovEncoder(nn.Module):
    """EncoderNeuralNet of Algorithm 2: body network -> (mu, log sigma, L').

    Input (..., input features) (``flatten`` trailing dims flattened first); outputs mu and
    log sigma (..., D) and L' (..., D, D). log sigma is clamped to [-9, 5] for numerical
    safety.

    Parameterization of L' (what is computed is unchanged: any L' is reachable, and
    L = L_mask * L' + diag(sigma), z and log q are exactly Algorithm 2's):

        L' = tril_scale * Linear(h),  Linear initialized at zero,  tril_scale = 1/sqrt(hidden)

    so training starts from a diagonal Gaussian, and the off-diagonal head moves
    ``tril_scale`` times slower (in units of L') under Adam than with a plain linear head.
    Why: the gradient of the ELBO with respect to L_ij (i > j) is d f/dz_i * eps_j, one
    noisy sample per example with a small mean; with a plain head reading 400 hidden units,
    Adam's per-weight steps grow off-diagonals fast from that noise (and feed it to the
    shared trunk; cutting only the trunk path recovered only part of the loss), and the VAE
    on binarized Fashion-MNIST (10k images, 15 epochs, D=20, Adam 1e-3) ended about 3 nats
    worse in test ELBO and log p(x) than the diagonal guide. With the default
    (0.05 for 400 units; 0.01 to 0.1 behaved alike) it ends 0.5 nats better in ELBO, level
    in log p(x), with a 15% smaller gap (benchmarks/RESULTS.md, issue 5). The value is an
    empirical choice, not derived; pass ``tril_scale=1.0`` for the plain head.
    """

    def __init__(self, body: nn.Module, hidden: int, latent_dim: int, flatten: int = 0,
                 tril_scale: float | None = None):
        super().__init__()
        self.body = body
        self.latent_dim = latent_dim
        self.flatten = flatten
        self.tril_scale = 1.0 / math.sqrt(hidden) if tril_scale is None else float(tril_scale)
        self.loc = nn.Linear(hidden, latent_dim)
        self.log_scale = nn.Linear(hidden, latent_dim)
        self.tril = nn.Linear(hidden, latent_dim * latent_dim)
        nn.init.zeros_(self.tril.weight)
        nn.init.zeros_(self.tril.bias)

    @classmethod
    def mlp(cls, input_dim: int, hidden: Sequence[int], latent_dim: int,
            activation: str = "relu", flatten: int = 0,
            tril_scale: float | None = None) -> FullCovEncoder:
        return cls(mlp_body(input_dim, hidden, activation), hidden[-1], latent_dim,
                   flatten=flatten, tril_scale=tril_scale)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.flatten:
            x = x.flatten(-self.flatten)
        h = self.body(x)
        d = self.latent_dim
        tril = (self.tril_scale * self.tril(h)).reshape(*h.shape[:-1], d, d)
        return self.loc(h), self.log_scale(h).clamp(-9.0, 5.0), tril


class AmortizedFullCovNormal(AmortizedNormal):
    """Guide q(z|x) = N(mu(x), L(x) L(x)^T) for one vector latent site in a data plate.

    Args:
        encoder: module mapping the input (B, ...) to ``(mu, log_sigma, L')`` with shapes
            (B, D), (B, D), (B, D, D), e.g. :class:`FullCovEncoder`.
        site, plate, plate_dim, inputs: as for
            :class:`~ppl_vae.guides.amortized.AmortizedNormal` (the site must be a vector,
            event_dim 1).

    Called like the model: ``guide(*args, size=N, subsample=idx, **kwargs)``.
    """

    def __init__(self, encoder: nn.Module, site: str = "z", plate: str = "data",
                 plate_dim: int = -1, inputs: Callable[..., torch.Tensor] | str | None = None):
        if plate_dim != -1:
            raise ValueError(f"{type(self).__name__} needs the data plate at dim -1 of the "
                             f"model, got plate_dim={plate_dim}; open it there, or use "
                             "AmortizedNormal, which takes any plate_dim")
        super().__init__(encoder, site=site, plate=plate, event_dim=1, plate_dim=plate_dim,
                         inputs=inputs)

    def distribution(self, *args, **kwargs) -> dist.Distribution:
        """q(z | x) for a batch: batch shape (B,), event shape (D,)."""
        loc, log_scale, tril = self.encoder(self.encoder_input(*args, **kwargs))
        return CholeskyGaussian(loc, log_scale, tril)
