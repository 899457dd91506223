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
                activation: str = "relu", architecture: str = "mlp") -> nn.Module:
    """An amortized guide for a vector latent site:

    ``diagonal``  N(mu(x), diag sigma(x)^2)            (guides/amortized.py)
    ``fullcov``   N(mu(x), L(x) L(x)^T), Algorithm 2   (guides/fullcov.py)
    ``iaf``       diagonal Normal + ``num_flows`` conditional IAF steps (guides/iaf.py)

    The encoder's trunk is an MLP input_dim -> hidden (``architecture="mlp"``; ``flatten``
    trailing input dims are flattened first) or the lecture's conv net on (..., H, W) images
    (``"conv"``, :class:`ppl_vae.nn.ConvBody`, 2048 features; input_dim, hidden, flatten
    and activation are then unused).
    """
    from ppl_vae.guides.amortized import AmortizedNormal
    from ppl_vae.guides.fullcov import AmortizedFullCovNormal, FullCovEncoder
    from ppl_vae.guides.iaf import AmortizedIAF, ContextNormalEncoder
    from ppl_vae.nn import ConvBody, NormalEncoder, mlp_body

    if kind not in GUIDES:
        raise ValueError(f"unknown guide {kind!r}; choose one of {', '.join(GUIDES)}")
    if architecture == "mlp":
        body, width = mlp_body(input_dim, list(hidden), activation), list(hidden)[-1]
    elif architecture == "conv":
        body, flatten = ConvBody(), 0
        width = body.out_features
    else:
        raise ValueError(f"unknown architecture {architecture!r}; choose mlp or conv")
    common = dict(site=site, plate=plate, inputs=inputs)
    if kind == "diagonal":
        return AmortizedNormal(NormalEncoder(body, width, latent_dim, flatten), **common)
    if kind == "fullcov":
        return AmortizedFullCovNormal(FullCovEncoder(body, width, latent_dim, flatten),
                                      **common)
    enc = ContextNormalEncoder(body, width, latent_dim, flatten)
    return AmortizedIAF(enc, latent_dim, width, num_flows=num_flows, **common)
