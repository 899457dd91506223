"""The variational autoencoder's generative model (Kingma & Welling 2013).

    z_i ~ N(0, I_D)                           latent code of image i
    x_i | z_i ~ p(x | f(z_i))                 f = decoder network (MLP or conv)

with the pixel likelihood p(x | f(z)) one of

    bernoulli              binarized pixels x in {0, 1}: Bernoulli(logits=f(z))
    continuous_bernoulli   grey levels x in [0, 1]: ContinuousBernoulli(logits=f(z))
                           (a normalized density, unlike cross-entropy on grey levels)
    gaussian               grey levels: N(sigmoid(f(z)), c) with one learned c, the lecture's
                           N(x | f(z), cI)

The amortized guide q(z|x) lives in :mod:`ppl_vae.guides.amortized`; the ELBO
E_q[log p(x|z)] - KL(q(z|x) || p(z)) is the engine's business.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from ppl_vae.guides.amortized import AmortizedNormal
from ppl_vae.nn import ConvDecoder, ConvEncoder, MLPDecoder, NormalEncoder

LIKELIHOODS = ("bernoulli", "continuous_bernoulli", "gaussian")


class VAE(nn.Module):
    """p(z) p(x|z) for images of shape ``image_shape`` (N, H, W in the data).

    Args:
        decoder: module z (..., D) -> logits (..., H, W).
        latent_dim: D.
        likelihood: one of ``LIKELIHOODS``.
        dynamic_binarization: with the Bernoulli likelihood, resample binary pixels from the
            grey levels every time a training batch is seen (train mode only).
    """

    def __init__(self, decoder: nn.Module, latent_dim: int, likelihood: str = "bernoulli",
                 dynamic_binarization: bool = False):
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"unknown likelihood {likelihood!r}; choose one of {LIKELIHOODS}")
        self.decoder = decoder
        self.latent_dim = latent_dim
        self.likelihood = likelihood
        self.dynamic_binarization = dynamic_binarization
        if likelihood == "gaussian":
            self.log_pixel_scale = nn.Parameter(torch.tensor(-2.0))

    def pixel_distribution(self, logits: torch.Tensor) -> dist.Distribution:
        """p(x | z) given the decoder's logits (..., H, W); event shape (H, W)."""
        if self.likelihood == "bernoulli":
            return dist.Bernoulli(logits=logits).to_event(2)
        if self.likelihood == "continuous_bernoulli":
            return dist.ContinuousBernoulli(logits=logits.clamp(-15, 15)).to_event(2)
        return dist.Normal(torch.sigmoid(logits), self.log_pixel_scale.exp()).to_event(2)

    def model(self, x: torch.Tensor, size: int | None = None,
              subsample: torch.Tensor | None = None) -> torch.Tensor:
        """x: images (B, H, W) with values in [0, 1]. Returns z (B, D)."""
        pyro.module("vae", self)
        if self.dynamic_binarization and self.training:
            x = torch.bernoulli(x)
        with pyro.plate("data", size or len(x), subsample=subsample):
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.latent_dim), 1.0).to_event(1))
            pyro.sample("x", self.pixel_distribution(self.decoder(z)), obs=x)
        return z

    forward = model

    @torch.no_grad()
    def mean_image(self, z: torch.Tensor) -> torch.Tensor:
        """E[x | z], shape (..., H, W), values in [0, 1]."""
        logits = self.decoder(z)
        if self.likelihood == "continuous_bernoulli":
            return dist.ContinuousBernoulli(logits=logits.clamp(-15, 15)).mean
        return torch.sigmoid(logits)

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        """n images E[x | z], z ~ p(z): shape (n, H, W)."""
        device = next(self.decoder.parameters()).device
        return self.mean_image(torch.randn(n, self.latent_dim, device=device))


def build_vae(latent_dim: int = 20, architecture: str = "mlp", hidden: Sequence[int] = (400,),
              likelihood: str = "bernoulli", image_shape: Sequence[int] = (28, 28),
              dynamic_binarization: bool = False) -> tuple[VAE, AmortizedNormal]:
    """The VAE and its amortized diagonal-Normal guide with matching networks.

    ``architecture="mlp"``: encoder H*W -> hidden -> (loc, scale), decoder mirrored.
    ``architecture="conv"``: the lecture notebook's conv encoder/decoder (32x32 padding).
    """
    h, w = image_shape
    if architecture == "mlp":
        encoder = NormalEncoder.mlp(h * w, list(hidden), latent_dim, flatten=2)
        decoder = MLPDecoder(latent_dim, list(reversed(hidden)), (h, w))
    elif architecture == "conv":
        encoder = ConvEncoder(latent_dim)
        decoder = ConvDecoder(latent_dim, (h, w))
    else:
        raise ValueError(f"unknown architecture {architecture!r}; choose mlp or conv")
    vae = VAE(decoder, latent_dim, likelihood, dynamic_binarization)
    guide = AmortizedNormal(encoder, site="z", plate="data")
    return vae, guide

