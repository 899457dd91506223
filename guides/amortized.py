"""Amortized diagonal-Normal guide: q(z_i | x_i) = N(loc(x_i), diag scale(x_i)^2).

One encoder network maps an example's observed data to the parameters of its local latent,
so memory does not grow with the number of examples and a new example is encoded by one
forward pass. Not tied to any model: give it the name and shape of the latent site it
serves (``z`` of a VAE, ``ability`` of an exam model, ``logtheta`` of a topic model), the
model's data plate, and how to read the encoder's input from the model's arguments.
"""

from __future__ import annotations

from collections.abc import Callable

import pyro
import pyro.distributions as dist
import torch
from torch import nn


class AmortizedNormal(nn.Module):
    """Guide for one local latent site, inside the model's data plate.

    Args:
        encoder: module mapping the input (B, ...) to ``(loc, scale)``, each of shape
            (B, *event_shape); e.g. :class:`ppl_vae.nn.NormalEncoder`.
        site: name of the model's latent sample site.
        plate: name of the model's data plate (opened here with the same size/subsample).
        event_dim: number of event dims of the site (1 for a vector z, 0 for a scalar; an
            encoder output of shape (B, 1) then gives a site of shape (B,)).
        plate_dim: the plate's dim in the model (default -1); with -2 (another plate to its
            right in the model) q's batch shape is (B, 1), and so on.
        inputs: ``inputs(*args, **kwargs) -> Tensor`` picks the encoder input from the
            model's arguments; default: the first positional argument. A string picks a
            keyword argument by name.

    Called like the model: ``guide(*args, size=N, subsample=idx, **kwargs)``.
    """

    def __init__(self, encoder: nn.Module, site: str = "z", plate: str = "data",
                 event_dim: int = 1, plate_dim: int = -1,
                 inputs: Callable[..., torch.Tensor] | str | None = None):
        super().__init__()
        self.encoder = encoder
        self.site = site
        self.plate = plate
        self.event_dim = event_dim
        self.plate_dim = plate_dim
        self.inputs = inputs

    def encoder_input(self, *args, **kwargs) -> torch.Tensor:
        if self.inputs is None:
            if not args:
                raise TypeError(f"guide for {self.site!r}: no positional input; pass inputs=")
            return args[0]
        if isinstance(self.inputs, str):
            return kwargs[self.inputs]
        return self.inputs(*args, **kwargs)

    def at_plate_dim(self, t: torch.Tensor, event_dims: int) -> torch.Tensor:
        """(B, *event) -> (B, 1, ..., 1, *event): the rows at the plate's dim (``plate_dim``
        -1 leaves ``t`` as it is)."""
        extra = -self.plate_dim - 1
        if extra <= 0 or t.dim() <= event_dims:
            return t
        return t.reshape(t.shape[:1] + (1,) * extra + t.shape[1:])

    def distribution(self, *args, **kwargs) -> dist.Distribution:
        """q(z | x) for a batch, batch shape (B,) (``plate_dim`` -2: (B, 1), ...), event
        shape as the site's."""
        loc, scale = self.encoder(self.encoder_input(*args, **kwargs))
        if self.event_dim == 0 and loc.dim() > 1 and loc.shape[-1] == 1:
            # a scalar latent per example: encoders give (B, 1), the site is (B,)
            loc, scale = loc.squeeze(-1), scale.squeeze(-1)
        loc, scale = (self.at_plate_dim(t, self.event_dim) for t in (loc, scale))
        return dist.Normal(loc, scale).to_event(self.event_dim)

    def forward(self, *args, size: int | None = None, subsample: torch.Tensor | None = None,
                **kwargs) -> torch.Tensor:
        pyro.module(f"{self.site}_encoder", self.encoder)
        q = self.distribution(*args, **kwargs)
        n = q.batch_shape[0] if q.batch_shape else 1
        with pyro.plate(self.plate, size or n, subsample=subsample, dim=self.plate_dim):
            return pyro.sample(self.site, q)
