"""Training objectives by name, and KL (beta) weighting of chosen latent sites.

Every objective is a callable ``loss(model, guide, batch) -> scalar tensor``: an unbiased
(for ``iwae``: importance-weighted) estimate of the negative ELBO of the *whole* dataset
(the data plate scales the minibatch by size / batch size), in nats.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import pyro.infer as infer
import torch
from pyro.poutine.messenger import Messenger

from .batching import Batch
from .evaluation import (
    as_pair,
    broadcasting_error,
    pair_log_weights,
)
from .program import SetupError, Structure, warn_user

OBJECTIVES = ("trace", "meanfield", "jit", "enum", "iwae", "renyi")
# Pyro's ELBO classes and the engine's objective that computes the same bound
PYRO_ELBOS = {"Trace_ELBO": "trace", "TraceGraph_ELBO": "trace", "JitTraceGraph_ELBO": "trace",
              "TraceMeanField_ELBO": "meanfield", "JitTraceMeanField_ELBO": "meanfield",
              "JitTrace_ELBO": "jit", "TraceEnum_ELBO": "enum", "JitTraceEnum_ELBO": "enum",
              "RenyiELBO": "renyi"}


def objective_name(objective: Any) -> str:
    """``objective`` checked: one of :data:`OBJECTIVES`. A Pyro ELBO object (what
    ``pyro.infer.SVI`` takes) is refused naming the settings that give its bound here: the
    engine builds its ELBO itself, to scale minibatches and weight KL terms."""
    if isinstance(objective, str):
        if objective not in OBJECTIVES:
            raise SetupError(f"unknown objective {objective!r}; choose one of "
                             f"{', '.join(OBJECTIVES)}")
        return objective
    kind = type(objective).__name__
    name = PYRO_ELBOS.get(kind)
    if name is None:
        raise SetupError(f"objective must be one of the names {', '.join(OBJECTIVES)}, got "
                         f"{objective!r}")
    settings = {"objective": name}
    particles = int(getattr(objective, "num_particles", 1))
    if name == "renyi":
        alpha = float(getattr(objective, "alpha", 0.5))
        if alpha == 0:
            settings["objective"] = "iwae"
        else:
            settings["renyi_alpha"] = alpha
        particles = max(particles, 2)
    if particles > 1:
        settings["num_particles"] = particles
    how = ", ".join(f"{k}={v!r}" for k, v in settings.items())
    note = (" (Trace_ELBO's score-function gradient, without TraceGraph's Rao-Blackwellized "
            "baselines)" if "Graph" in kind else
            " (each example's own bound, not the whole minibatch's)" if name == "renyi" else "")
    raise SetupError(f"objective takes a name, not a Pyro {kind} object (the engine builds its "
                     f"ELBO itself, to scale minibatches and weight KL terms): pass {how}{note}")


def check_objective(name: str, structure: Structure) -> None:
    """Refuse (:class:`SetupError`) an objective that cannot train the pair whose structure is
    ``structure`` to the right answer, naming the one that can; warn where it trains only part
    of the guide. What Pyro checks only under validation, which training steps run without."""
    if name == "meanfield" and structure.unreparameterized:
        site = structure.unreparameterized[0]
        raise SetupError(
            f"objective='meanfield' (TraceMeanField_ELBO) needs every guide site "
            f"reparameterized, but guide site {site!r} has no rsample (a discrete or other "
            "non-reparameterizable distribution); use objective='trace' (score-function "
            "gradients) or mark it with config_enumerate and use objective='enum'")
    sampled = [k for k in structure.unreparameterized if k not in structure.guide_enumerated]
    if name in ("iwae", "renyi") and sampled:
        site = sampled[0]
        raise SetupError(
            f"objective={name!r} differentiates through the guide's draws, but guide site "
            f"{site!r} has no rsample (a discrete or other non-reparameterizable "
            "distribution), so its parameters would get a wrong gradient; use "
            "objective='trace' (score-function gradients) or mark it with config_enumerate "
            "and use objective='enum'")
    if name in ("trace", "meanfield", "jit") and structure.model_enumerated:
        raise SetupError(
            f"model site {structure.model_enumerated[0]!r} is marked for enumeration "
            f"(config_enumerate), which objective={name!r} does not do (it would draw the "
            "site from its prior); use objective='enum' (or 'iwae'/'renyi', which also sum "
            "it out)")
    if name in ("iwae", "renyi") and structure.guide_enumerated:
        warn_user(
            f"objective={name!r} sums out the enumerated guide site(s) "
            f"{', '.join(structure.guide_enumerated)} exactly, so their guide distribution "
            "gets no gradient and keeps its initial values; train with objective='enum' to "
            "fit it")


class SiteWeight(Messenger):
    """Multiply the log-density of the named latent sites by ``factor`` (model and guide
    alike), so the ELBO's term log p(z) - log q(z) -- the KL for those sites -- gets weight
    beta. ``factor`` may be changed between steps (KL annealing)."""

    def __init__(self, sites: Iterable[str], factor: float = 1.0):
        super().__init__()
        self.sites = frozenset(sites)
        self.factor = float(factor)

    def _process_message(self, msg):
        if msg["type"] == "sample" and msg["name"] in self.sites and not msg["is_observed"]:
            msg["scale"] = msg["scale"] * self.factor


class ELBOObjective:
    """A Pyro ELBO (Trace, TraceMeanField, JitTrace, TraceEnum) as ``loss(model, guide, batch)``."""

    def __init__(self, elbo: infer.ELBO, kl_weight: SiteWeight | None = None):
        self.elbo = elbo
        self.kl_weight = kl_weight
        self._flat: tuple[Callable, Callable] | None = None
        self._checked = not getattr(elbo, "vectorize_particles", False)

    def __call__(self, model: Callable, guide: Callable, batch: Batch) -> torch.Tensor:
        if not self._checked:
            return self._first_vectorized_loss(model, guide, batch)
        if self.kl_weight is not None and self.kl_weight.factor != 1.0:
            model, guide = self.kl_weight(model), self.kl_weight(guide)
        if isinstance(self.elbo, infer.JitTrace_ELBO):
            return self._jit_loss(model, guide, batch)
        return self.elbo.differentiable_loss(
            model, guide, *batch.args, size=batch.size, subsample=batch.subsample, **batch.kwargs)

    def _first_vectorized_loss(self, model: Callable, guide: Callable, batch: Batch
                               ) -> torch.Tensor:
        """The first step with several particles in one vectorized pass; a program that does
        not broadcast over the extra particle dim gets Pyro's particle loop instead."""
        self._checked = True
        nesting = as_pair(model, guide).inspect(batch).nesting
        error = broadcasting_error(model, guide, batch, nesting)
        try:
            if error is not None:
                raise error
            return self(model, guide, batch)
        except Exception as e:  # the program's own error with particles: Pyro's loop
            warn_user(
                f"the model or guide does not broadcast over the extra dim of "
                f"{type(self.elbo).__name__}'s vectorized particles ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:200]}); drawing the {self.elbo.num_particles} "
                "particles one after another (slower)")
            kwargs = {k: getattr(self.elbo, k) for k in ("num_particles", "max_plate_nesting")}
            if kwargs["max_plate_nesting"] == float("inf"):
                del kwargs["max_plate_nesting"]
            self.elbo = type(self.elbo)(vectorize_particles=False, **kwargs)
            return self(model, guide, batch)

    def _jit_loss(self, model: Callable, guide: Callable, batch: Batch) -> torch.Tensor:
        """JitTrace_ELBO traces tensors passed positionally only: flatten the call to
        ``(*args, subsample, *kwargs.values())`` and rebuild it inside (same structure and
        sizes every step -- the engine drops the last short batch for jit)."""
        if self._flat is None:
            n, keys, size = len(batch.args), tuple(batch.kwargs), batch.size

            def unflatten(fn):
                def call(*flat):
                    return fn(*flat[:n], size=size, subsample=flat[n],
                              **dict(zip(keys, flat[n + 1:])))
                return call

            self._flat = (unflatten(model), unflatten(guide))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return self.elbo.differentiable_loss(
                *self._flat, *batch.args, batch.subsample, *batch.kwargs.values())


class IWAEObjective:
    """Importance-weighted bound (Burda et al. 2016) with K particles, per example:

        loss = -(size / B) * sum_i [logsumexp_k log w_ik - log K] - mean_k glob_k

    where log w_ik = log p(x_i, z_ik) - beta * [log q(z_ik|x_i) - log p(z_ik)] for the weighted
    sites. K=1 gives the ordinary ELBO. The bound is exact for models whose latents are all
    local (inside the data plate); global latents get one draw per particle (a heuristic).

    ``alpha`` != 0 gives the Renyi (variational Renyi) bound of each example instead (Li &
    Turner 2016): 1/(1-alpha) [logsumexp_k (1-alpha) log w_ik - log K]; alpha 0 is the IWAE
    bound, alpha -> 1 the ELBO.
    """

    def __init__(self, num_particles: int, kl_weight: SiteWeight | None = None,
                 plate: str | None = None, alpha: float = 0.0):
        if alpha == 1.0:
            raise ValueError("renyi_alpha 1 is the ELBO: use objective='trace'")
        self.alpha = float(alpha)
        self.num_particles = int(num_particles)
        self.kl_weight = kl_weight
        self.plate = plate
        self._nesting: int | None = None
        self._checked_globals = False

    def __call__(self, model: Callable, guide: Callable, batch: Batch) -> torch.Tensor:
        pair = as_pair(model, guide, self.plate)
        if self._nesting is None:
            self._nesting = pair.inspect(batch).nesting
            self.plate = pair.data_plate(batch)
        weight = None
        if self.kl_weight is not None and self.kl_weight.factor != 1.0:
            sites, factor = self.kl_weight.sites, self.kl_weight.factor
            weight = lambda name, site: factor if name in sites else 1.0
        local, glob = pair_log_weights(pair, batch, self.num_particles, self.plate,
                                       weight=weight)
        if not self._checked_globals:  # once: a host read every step would stall a GPU
            self._checked_globals = True
            # global latents drawn anew per particle (point-estimated ones, e.g. AutoDelta,
            # give every particle the same global weight and leave the bound exact)
            if bool((glob != glob.flatten()[0]).any()):
                warn_user("iwae objective: the model has random global latents; they get "
                              "one draw per particle, which is not the IWAE bound of the "
                              "whole dataset")
        power = 1.0 - self.alpha
        bound = ((power * local).logsumexp(0) - math.log(self.num_particles)) / power
        return -(bound.sum() * (batch.size / len(batch)) + glob.mean())


def make_objective(name: str, num_particles: int = 1, kl_sites: Iterable[str] = (),
                   max_plate_nesting: int | None = None, vectorize_particles: bool = True,
                   plate: str | None = None, renyi_alpha: float = 0.5,
                   ) -> ELBOObjective | IWAEObjective:
    """Build the objective called ``name``: trace (Trace_ELBO), meanfield (TraceMeanField_ELBO,
    analytic KL where available), jit (JitTrace_ELBO), enum (TraceEnum_ELBO, sums out
    enumerated discrete latents), iwae (importance-weighted bound with ``num_particles``,
    per example), renyi (the variational Renyi bound of each example with ``renyi_alpha``:
    alpha 0 is the IWAE bound, alpha -> 1 the ELBO; Li & Turner 2016)."""
    kl_weight = SiteWeight(kl_sites) if kl_sites else None
    common = dict(num_particles=num_particles,
                  vectorize_particles=vectorize_particles and num_particles > 1)
    if max_plate_nesting is not None:
        common["max_plate_nesting"] = max_plate_nesting
    if name == "trace":
        return ELBOObjective(infer.Trace_ELBO(**common), kl_weight)
    if name == "meanfield":
        return ELBOObjective(infer.TraceMeanField_ELBO(**common), kl_weight)
    if name == "jit":
        return ELBOObjective(infer.JitTrace_ELBO(ignore_jit_warnings=True, **common), kl_weight)
    if name == "enum":
        return ELBOObjective(infer.TraceEnum_ELBO(**common), kl_weight)
    if name == "renyi":
        if num_particles < 2:
            raise ValueError("objective 'renyi' needs num_particles >= 2")
        return IWAEObjective(num_particles, kl_weight, plate=plate, alpha=renyi_alpha)
    if name == "iwae":
        if num_particles < 2:
            raise ValueError("objective 'iwae' needs num_particles >= 2 (K=1 is the ELBO)")
        return IWAEObjective(num_particles, kl_weight, plate=plate)
    raise SetupError(f"unknown objective {name!r}; choose one of {', '.join(OBJECTIVES)}")
