"""The conditional variational autoencoder (Sohn et al. 2015; lectures 003/004).

    y_i                       observed class label of item i (one-hot, C classes)
    z_i | y_i ~ p(z | y_i)    fixed prior N(0, I_D), or a learned conditional prior
                              N(m(y_i), diag s(y_i)^2) (``prior="learned"``)
    x_i | z_i, y_i ~ p(x | f(z_i, y_i))     f = decoder network on [z, onehot(y)]

and the amortized guide q(z | x, y) = N(g(x, y)) (any vector guide of :mod:`ppl_vae.guides`
on the encoder input [x, onehot(y)], see :func:`encoder_input`). The engine's ELBO is then
the lecture's CVAE objective

    L(x, y) = E_q(z|x,y) [log p(x | z, y)] - KL(q(z | x, y) || p(z | y)).

Pictures: :meth:`CVAE.generate` (items of one class from the prior) and
:meth:`CVAE.style_transfer` (encode an item with its own label -- its "style" z -- and
decode z with every label).
"""

from __future__ import annotations

from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.nn import functional as F

from ppl_vae.guides import point_estimate
from ppl_vae.guides.amortized import AmortizedNormal
from ppl_vae.models.vae import VAE
from ppl_vae.nn import MLPDecoder, NormalEncoder

PRIORS = ("fixed", "learned")


def one_hot(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Labels (...,) int64 -> float one-hot (..., C); errors name the first bad label."""
    if y.is_floating_point():
        raise ValueError(f"labels must be integers, got {y.dtype}")
    bad = (y < 0) | (y >= num_classes)
    if bad.any():
        i = int(bad.nonzero()[0][0]) if bad.dim() else 0
        raise ValueError(f"label {int(y.reshape(-1)[i])} at row {i} outside 0..{num_classes - 1}")
    return F.one_hot(y, num_classes).to(torch.get_default_dtype())


def concat(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[a, b] along the last dim, broadcasting the leading (particle/enumeration) dims."""
    batch = torch.broadcast_shapes(a.shape[:-1], b.shape[:-1])
    return torch.cat([a.expand(*batch, a.shape[-1]), b.expand(*batch, b.shape[-1])], -1)


def encoder_input(num_classes: int):
    """``inputs=`` for a guide of a CVAE: (x (B, H, W), y (B,)) -> [x flattened, onehot(y)]
    of shape (B, H*W + C)."""
    def inputs(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return concat(x.flatten(-2), one_hot(y, num_classes))
    inputs.num_classes = num_classes  # type: ignore[attr-defined]
    return inputs


class ConditionalPrior(nn.Module):
    """p(z | y) = N(m(y), diag s(y)^2): one embedding per class, (B, C) -> (B, D) each.
    Starts at N(0, I)."""

    def __init__(self, num_classes: int, latent_dim: int):
        super().__init__()
        self.loc = nn.Linear(num_classes, latent_dim, bias=False)
        self.log_scale = nn.Linear(num_classes, latent_dim, bias=False)
        nn.init.zeros_(self.loc.weight)
        nn.init.zeros_(self.log_scale.weight)

    def forward(self, y_onehot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.loc(y_onehot), self.log_scale(y_onehot).clamp(-5, 3).exp()


class CVAE(VAE):
    """p(z | y) p(x | z, y) for labelled images (x (N, H, W) in [0, 1], y (N,) in 0..C-1).

    Args:
        decoder: module [z, onehot(y)] (..., D + C) -> logits (..., H, W).
        latent_dim: D; num_classes: C.
        prior: ``fixed`` (N(0, I)) or ``learned`` (:class:`ConditionalPrior`).
        likelihood, dynamic_binarization: as for :class:`~ppl_vae.models.vae.VAE`.
    """

    def __init__(self, decoder: nn.Module, latent_dim: int, num_classes: int = 10,
                 prior: str = "fixed", likelihood: str = "bernoulli",
                 dynamic_binarization: bool = False):
        super().__init__(decoder, latent_dim, likelihood, dynamic_binarization)
        if prior not in PRIORS:
            raise ValueError(f"unknown prior {prior!r}; choose one of {PRIORS}")
        self.num_classes = num_classes
        self.prior = prior
        if prior == "learned":
            self.prior_net = ConditionalPrior(num_classes, latent_dim)

    def prior_distribution(self, y_onehot: torch.Tensor) -> dist.Distribution:
        """p(z | y), batch shape (B,), event shape (D,)."""
        if self.prior == "learned":
            loc, scale = self.prior_net(y_onehot)
            return dist.Normal(loc, scale).to_event(1)
        zeros = y_onehot.new_zeros(*y_onehot.shape[:-1], self.latent_dim)
        return dist.Normal(zeros, 1.0).to_event(1)

    def model(self, x: torch.Tensor, y: torch.Tensor, size: int | None = None,
              subsample: torch.Tensor | None = None) -> torch.Tensor:
        """x: images (B, H, W) in [0, 1]; y: labels (B,). Returns z (B, D)."""
        pyro.module("cvae", self)
        if self.dynamic_binarization and self.training:
            x = torch.bernoulli(x)
        y1 = one_hot(y, self.num_classes)
        with pyro.plate("data", size or len(x), subsample=subsample):
            z = pyro.sample("z", self.prior_distribution(y1))
            pyro.sample("x", self.pixel_distribution(self.decoder(concat(z, y1))), obs=x)
        return z

    forward = model

    @torch.no_grad()
    def mean_image(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """E[x | z, y] for z (..., D) and labels y (...,): shape (..., H, W) in [0, 1]."""
        logits = self.decoder(concat(z, one_hot(y, self.num_classes)))
        if self.likelihood == "continuous_bernoulli":
            return dist.ContinuousBernoulli(logits=logits.clamp(-15, 15)).mean
        return torch.sigmoid(logits)

    @torch.no_grad()
    def generate(self, label: int, n: int) -> torch.Tensor:  # type: ignore[override]
        """n items of class ``label``: E[x | z, y], z ~ p(z | y); shape (n, H, W)."""
        device = next(self.decoder.parameters()).device
        y = torch.full((n,), int(label), dtype=torch.long, device=device)
        z = self.prior_distribution(one_hot(y, self.num_classes)).sample()
        return self.mean_image(z, y)

    sample = generate

    @torch.no_grad()
    def style_transfer(self, guide: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Encode each item with its own label (z = mean of q(z | x, y)), decode with every
        label: shape (B, C, H, W); entry [i, c] is item i redrawn as class c."""
        z = point_estimate(guide.distribution(x, y))               # (B, D)
        labels = torch.arange(self.num_classes, device=z.device)   # (C,)
        return self.mean_image(z.unsqueeze(1).expand(-1, self.num_classes, -1),
                               labels.expand(len(z), -1))


def build_cvae(latent_dim: int = 20, hidden: Sequence[int] = (400,), num_classes: int = 10,
               prior: str = "fixed", likelihood: str = "bernoulli",
               image_shape: Sequence[int] = (28, 28), guide: str = "diagonal",
               **guide_options) -> tuple[CVAE, nn.Module]:
    """A CVAE with MLP networks and its amortized guide q(z | x, y).

    Encoder [x, onehot(y)] (H*W + C) -> hidden -> q's parameters; decoder [z, onehot(y)]
    (D + C) -> reversed hidden -> logits (H, W). ``guide``: diagonal | fullcov | iaf (see
    :func:`ppl_vae.guides.build_guide`).
    """
    h, w = image_shape
    decoder = MLPDecoder(latent_dim + num_classes, list(reversed(hidden)), (h, w))
    model = CVAE(decoder, latent_dim, num_classes, prior, likelihood)
    inputs = encoder_input(num_classes)
    if guide == "diagonal":
        q = AmortizedNormal(NormalEncoder.mlp(h * w + num_classes, list(hidden), latent_dim),
                            site="z", plate="data", inputs=inputs)
    else:
        from ppl_vae.guides import build_guide

        q = build_guide(guide, h * w + num_classes, hidden, latent_dim, inputs=inputs,
                        **guide_options)
    return model, q

