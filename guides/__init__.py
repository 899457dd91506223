"""Guides (variational families), each usable by any model whose latent site matches.

Import as ``ppl_vae.guides.<module>``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

GUIDES = ("diagonal", "fullcov", "iaf")


def point_estimate(q: torch.distributions.Distribution) -> torch.Tensor:
    """A representative z of a guide's q(z | x) (for pictures, codes): its mean, or for a
    flow (no closed-form mean) the base distribution's mean pushed through the flow's steps.
    Shape: batch + event."""
    if isinstance(q, torch.distributions.TransformedDistribution):
        z = q.base_dist.mean
        for t in q.transforms:
            z = t(z)
        return z
    return q.mean


def build_guide(kind: str, input_dim: int, hidden: Sequence[int], latent_dim: int,
                site: str = "z", plate: str = "data", flatten: int = 0,
                inputs: Callable[..., torch.Tensor] | str | None = None, num_flows: int = 2,
                activation: str = "relu") -> nn.Module:
    """An amortized guide for a vector latent site with an MLP encoder (input_dim -> hidden):

    ``diagonal``  N(mu(x), diag sigma(x)^2)            (guides/amortized.py)
    ``fullcov``   N(mu(x), L(x) L(x)^T), Algorithm 2   (guides/fullcov.py)
    ``iaf``       diagonal Normal + ``num_flows`` conditional IAF steps (guides/iaf.py)
    """
    from ppl_vae.guides.amortized import AmortizedNormal
    from ppl_vae.guides.fullcov import AmortizedFullCovNormal, FullCovEncoder
    from ppl_vae.guides.iaf import AmortizedIAF, ContextNormalEncoder
    from ppl_vae.nn import NormalEncoder

    hidden = list(hidden)
    common = dict(site=site, plate=plate, inputs=inputs)
    if kind == "diagonal":
        enc = NormalEncoder.mlp(input_dim, hidden, latent_dim, activation, flatten)
        return AmortizedNormal(enc, **common)
    if kind == "fullcov":
        enc = FullCovEncoder.mlp(input_dim, hidden, latent_dim, activation, flatten)
        return AmortizedFullCovNormal(enc, **common)
    if kind == "iaf":
        enc = ContextNormalEncoder.mlp(input_dim, hidden, latent_dim, activation, flatten)
        return AmortizedIAF(enc, latent_dim, hidden[-1], num_flows=num_flows, **common)
    raise ValueError(f"unknown guide {kind!r}; choose one of {', '.join(GUIDES)}")
