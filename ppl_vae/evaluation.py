"""Evaluation of any model/guide pair: per-example ELBO and importance-sampled log p(x).

Both come from one quantity, the per-example log importance weights

    log w_ik = log p(x_i, z_ik | g_k) - log q(z_ik | x_i),    z_ik ~ q(z | x_i), g_k ~ q(g)

computed with K particles vectorized in an extra plate. Sites inside the data plate
(local latents, observations) give ``w_ik``; sites outside it (global latents g) give one
term per particle, reported separately. Then

    elbo_i            = mean_k log w_ik                         (nats per example)
    log_likelihood_i  = logsumexp_k log w_ik - log K            (the lecture's estimator,
                                                                 = the IWAE bound with K samples)

For models with global latents the global draws g_k are taken from the guide and their own
prior/guide terms are left out of ``log w_ik``: the per-example figure is then the
posterior-predictive log-likelihood of x_i, the usual held-out figure for such models.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions.util import scale_and_mask
from pyro.poutine.subsample_messenger import _Subsample
from pyro.poutine.util import prune_subsample_sites

from .batching import Batch, Data, make_batches

PARTICLE_PLATE = "_ppl_vae_particles"


def max_plate_nesting(model: Callable, guide: Callable, batch: Batch) -> int:
    """How many plate dims the pair uses (one blocked run of guide and model)."""
    with poutine.block(), torch.no_grad():
        guide_trace = poutine.trace(batch.call).get_trace(guide)
        model_trace = poutine.trace(poutine.replay(batch.call, trace=guide_trace)).get_trace(model)
    deepest = 0
    for trace in (guide_trace, model_trace):
        for site in prune_subsample_sites(trace).nodes.values():
            if site["type"] == "sample":
                for frame in site["cond_indep_stack"]:
                    if frame.vectorized and frame.dim is not None:
                        deepest = max(deepest, -frame.dim)
    return deepest


def find_data_plate(model: Callable, guide: Callable, batch: Batch) -> str:
    """The name of the plate over examples: the vectorized plate of the observed sites whose
    full size is the dataset size. Raises if there is no such plate or more than one."""
    with poutine.block(), torch.no_grad():
        guide_trace = poutine.trace(batch.call).get_trace(guide)
        model_trace = poutine.trace(poutine.replay(batch.call, trace=guide_trace)).get_trace(model)
    full_size = {name: site["fn"].size for name, site in model_trace.nodes.items()
                 if site["type"] == "sample" and isinstance(site["fn"], _Subsample)}
    candidates: set[str] | None = None
    for site in model_trace.nodes.values():
        if site["type"] == "sample" and site["is_observed"]:
            names = {f.name for f in site["cond_indep_stack"]
                     if f.vectorized and full_size.get(f.name) == batch.size
                     and f.size == len(batch)}
            candidates = names if candidates is None else candidates & names
    if not candidates or len(candidates) != 1:
        raise ValueError(
            "could not tell which plate runs over examples (plates of full size "
            f"{batch.size} around every observed site: {sorted(candidates or [])}); open the "
            "data plate as pyro.plate(name, size, subsample=subsample) and/or pass plate=name")
    return candidates.pop()


def log_weights(model: Callable, guide: Callable, batch: Batch, num_particles: int,
                plate: str, nesting: int,
                weight: Callable[[str, dict], float] | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example log importance weights of one minibatch.

    Returns ``(local, glob)``: ``local`` has shape (K, B) -- the terms of every site in the data
    plate (observations, local latents), ``glob`` has shape (K,) -- the terms of sites outside
    it (global latents' log p - log q). Units: nats. Not scaled by size/B.
    ``weight(name, site)`` optionally multiplies a latent site's terms (a KL weight beta).
    Differentiable: used both for evaluation (under no_grad) and by the IWAE objective.
    """
    particle_dim = -nesting - 1

    def vectorized(fn):
        def run(*args, **kwargs):
            with pyro.plate(PARTICLE_PLATE, num_particles, dim=particle_dim):
                return fn(*args, **kwargs)
        return run

    guide_trace = poutine.trace(batch.call).get_trace(vectorized(guide))
    model_trace = poutine.trace(
        poutine.replay(batch.call, trace=guide_trace)).get_trace(vectorized(model))
    local = torch.zeros(num_particles, len(batch), device=batch.subsample.device)
    glob = torch.zeros(num_particles, device=batch.subsample.device)
    for sign, trace in ((1.0, model_trace), (-1.0, guide_trace)):
        for name, site in prune_subsample_sites(trace).nodes.items():
            if site["type"] != "sample":
                continue
            if trace is guide_trace and site["is_observed"]:
                continue
            lp = site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
            lp = scale_and_mask(lp, 1.0, site["mask"])
            if weight is not None and not site["is_observed"]:
                lp = lp * weight(name, site)
            frames = {f.name: f for f in site["cond_indep_stack"] if f.vectorized}
            in_data = plate in frames
            lp = _keep_dims(lp, nesting, frames[plate].dim if in_data else None)
            if in_data:
                local = local + sign * lp.reshape(lp.shape[0], -1)
            else:
                glob = glob + sign * lp.reshape(-1)
    return local, glob


def _keep_dims(lp: torch.Tensor, nesting: int, data_dim: int | None) -> torch.Tensor:
    """Sum a site's log-prob over every dim but the particle dim and the data-plate dim."""
    if not torch.is_tensor(lp):
        lp = torch.as_tensor(lp)
    width = nesting + 1
    if lp.dim() > width:  # should not happen (event dims are summed by log_prob)
        lp = lp.sum(list(range(lp.dim() - width)))
    lp = lp.reshape((1,) * (width - lp.dim()) + tuple(lp.shape))
    keep = {0}
    if data_dim is not None:
        keep.add(width + data_dim)
    dims = [d for d in range(width) if d not in keep]
    if dims:
        lp = lp.sum(dims, keepdim=True)
    return lp


@contextmanager
def eval_mode(*objs) -> Iterator[None]:
    """Put the modules among ``objs`` in eval mode (no dropout, batch-norm running stats)
    for the block, then restore each one's previous mode."""
    modes = [(m, m.training) for m in objs if isinstance(m, torch.nn.Module)]
    for m, _ in modes:
        m.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.train(training)


@torch.no_grad()
def per_example_log_weights(model: Callable, guide: Callable, data: Data, num_samples: int,
                            batch_size: int = 100, particles_per_pass: int | None = None,
                            plate: str | None = None, device: str | torch.device | None = None,
                            reduce: str = "logmeanexp", progress: bool | None = None,
                            ) -> torch.Tensor:
    """Reduce K log weights per example, streaming over particles so K=5000 fits in memory.

    ``reduce="logmeanexp"`` gives the IS estimate of log p(x_i); ``"mean"`` gives the ELBO.
    Returns a CPU tensor of shape (N,) in nats per example.
    """
    from tqdm.auto import tqdm

    if device is None:
        device = module_device(model, guide)
    batches = make_batches(data, batch_size, device, shuffle=False)
    if particles_per_pass is None:
        particles_per_pass = max(1, min(num_samples, 50_000 // max(1, batches.batch_size)))
    out = []
    with eval_mode(model, guide):
        nesting = plate_name = None
        for batch in tqdm(batches, desc="evaluating", unit="batch", leave=False,
                          disable=None if progress is None else not progress):
            if nesting is None:
                nesting = max_plate_nesting(model, guide, batch)
                plate_name = plate or find_data_plate(model, guide, batch)
            acc = None
            done = 0
            while done < num_samples:
                k = min(particles_per_pass, num_samples - done)
                local, glob = log_weights(model, guide, batch, k, plate_name, nesting)
                if reduce == "logmeanexp":
                    part = local.logsumexp(0)
                    acc = part if acc is None else torch.logaddexp(acc, part)
                elif reduce == "mean":
                    part = local.sum(0)
                    acc = part if acc is None else acc + part
                else:
                    raise ValueError(f"reduce must be 'logmeanexp' or 'mean', not {reduce!r}")
                done += k
            acc = acc - math.log(num_samples) if reduce == "logmeanexp" else acc / num_samples
            out.append(acc.cpu())
    return torch.cat(out)


def log_likelihood(model: Callable, guide: Callable, data: Data, num_samples: int = 1000,
                   batch_size: int = 100, per_example: bool = False, plate: str | None = None,
                   device: str | torch.device | None = None, progress: bool | None = None,
                   ) -> float | torch.Tensor:
    """Importance-sampled log p(x) with the guide as proposal (IWAE bound with K=num_samples).

    Returns the mean over examples in nats per example, or with ``per_example=True`` a
    tensor of shape (N,) (e.g. for anomaly scores). Grows towards the exact log p(x) as
    ``num_samples`` grows; always >= the ELBO in expectation.
    """
    values = per_example_log_weights(model, guide, data, num_samples, batch_size=batch_size,
                                     plate=plate, device=device, progress=progress)
    return values if per_example else float(values.mean())


def elbo(model: Callable, guide: Callable, data: Data, num_particles: int = 1,
         batch_size: int = 100, per_example: bool = False, plate: str | None = None,
         device: str | torch.device | None = None, progress: bool | None = None,
         ) -> float | torch.Tensor:
    """ELBO per example (nats), averaged over ``num_particles`` draws from the guide.

    The local part only: see the module docstring for how global latents are treated.
    """
    values = per_example_log_weights(model, guide, data, num_particles, batch_size=batch_size,
                                     plate=plate, device=device, reduce="mean", progress=progress)
    return values if per_example else float(values.mean())


def module_device(*objs) -> torch.device:
    for obj in objs:
        if isinstance(obj, torch.nn.Module):
            for p in obj.parameters():
                return p.device
    return torch.device("cpu")
