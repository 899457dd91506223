"""Mean-field guides that follow the engine's plate convention, alone or beside amortized ones.

``mean_field(model, plate)``: Pyro's AutoNormal (a Normal per latent value in unconstrained
space, so LogNormal for positive sites, logit-Normal for (0, 1) sites) whose data plate is
opened with the engine's ``size`` and ``subsample``, so per-example parameters (one per
student, say) are indexed by the minibatch rows and scaled like the model.

``mean_field_with_amortized(model, local)``: AutoNormal on the model with the local site
hidden (global latents: item parameters, topic matrices) plus an amortized guide for the
local site (:class:`ppl_vae.guides.amortized.AmortizedNormal`), as one module.
Memory then does not grow with the number of examples.

Both take the model's call: ``guide(*args, size=N, subsample=idx, **kwargs)``.
"""

from __future__ import annotations

from collections.abc import Callable

import pyro
import pyro.poutine as poutine
from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal
from pyro.infer.autoguide.initialization import init_to_median
from torch import nn

from ppl_vae.guides.amortized import AmortizedNormal
from ppl_vae.program import call_keywords


def data_plate(plate: str, data_arg: int = 0) -> Callable[..., pyro.plate]:
    """``create_plates`` for autoguides: the model's data plate named ``plate`` opened with
    the call's ``size`` and ``subsample`` (size defaults to the length of positional
    argument ``data_arg``)."""

    def create(*args, size: int | None = None, subsample=None, **kwargs) -> pyro.plate:
        n = size or len(args[data_arg] if args else next(iter(kwargs.values())))
        return pyro.plate(plate, n, subsample=subsample)

    return create


def mean_field(model: Callable, plate: str, init_scale: float = 0.1,
               init_loc_fn: Callable = init_to_median) -> AutoNormal:
    """AutoNormal over every latent site of ``model``; per-example sites live in the data
    plate ``plate`` and have one (loc, scale) per example of the whole dataset."""
    return AutoNormal(model, init_loc_fn=init_loc_fn, init_scale=init_scale,
                      create_plates=data_plate(plate))


class MeanFieldWithAmortized(nn.Module):
    """AutoNormal for every latent site but ``local.site`` (on the blocked model: global
    latents such as item parameters or topic matrices), then the amortized guide ``local``
    for that site. Memory does not grow with the number of examples.

    The model may be written either way: ``model(x, size=None, subsample=None)`` (the
    library's families) gets ``size`` and ``subsample`` passed on, a plain ``model(x)`` does
    not. (Through the engine, Pyro's ``AutoGuideList`` of an AutoNormal on the blocked model
    and the amortized guide does the same job; append the amortized guide as a function
    that returns nothing, ``guides.append(lambda *a, **k: amortized(*a, **k) and None)``:
    an AutoGuideList part must return a dict or None, and AmortizedNormal returns its draw.)

    ``full_rank=True`` puts one multivariate Normal (AutoMultivariateNormal) over all global
    values instead, keeping their posterior correlations (e.g. an item's discrimination and
    difficulty), at O(D^2) parameters for D global values.

    Attributes: ``globals`` (the autoguide), ``local`` (the AmortizedNormal).
    """

    def __init__(self, model: Callable, local: AmortizedNormal, init_scale: float = 0.1,
                 init_loc_fn: Callable = init_to_median, full_rank: bool = False):
        super().__init__()
        blocked = poutine.block(model, hide=[local.site])
        if full_rank:  # one multivariate Normal over every global value (correlations kept)
            self.globals = AutoMultivariateNormal(blocked, init_loc_fn=init_loc_fn,
                                                  init_scale=init_scale)
        else:
            self.globals = AutoNormal(blocked, init_loc_fn=init_loc_fn, init_scale=init_scale)
        self.local = local
        names = call_keywords(model)
        self._passes = {k for k in ("size", "subsample") if k in names}

    def forward(self, *args, size: int | None = None, subsample=None, **kwargs) -> dict:
        """Samples of every latent site: {name: value}."""
        engine = {k: v for k, v in (("size", size), ("subsample", subsample))
                  if k in self._passes}
        values = dict(self.globals(*args, **engine, **kwargs))
        values[self.local.site] = self.local(*args, size=size, subsample=subsample, **kwargs)
        return values


def mean_field_with_amortized(model: Callable, local: AmortizedNormal, init_scale: float = 0.1,
                              init_loc_fn: Callable = init_to_median, full_rank: bool = False,
                              ) -> MeanFieldWithAmortized:
    """:class:`MeanFieldWithAmortized`: mean-field (or with ``full_rank=True`` one
    multivariate Normal) globals, amortized ``local.site``."""
    return MeanFieldWithAmortized(model, local, init_scale, init_loc_fn, full_rank)
