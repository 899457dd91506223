"""The variational posterior of any model/guide pair as an ArviZ ``InferenceData``.

    idata = to_arviz(model, guide, data, num_samples=500)
    az.summary(idata, kind="stats"); az.loo(idata); idata.to_netcdf("posterior.nc")

Draws: S particles of the guide are taken at once in an extra outermost plate (the same
vectorization as :func:`ppl_vae.evaluation.log_weights`) and the model is replayed
against them. Global latents (sites outside the data plate) are drawn once per particle and
shared by every minibatch; local latents (inside the data plate, e.g. the codes of an
amortized encoder) are drawn per example. Groups:

    posterior             every latent and deterministic model site, (chain=1, draw=S, ...)
    posterior_predictive  a fresh draw of every observed site given each posterior draw
    observed_data         the observed sites' values (masked entries -> NaN)
    log_likelihood        log p(x | z) of every observed site per observation (nats; masked
                          entries contribute 0), so ``az.loo`` / ``az.waic`` work
    prior, prior_predictive   with ``prior=True``: the model run without the guide

Dimension names: a model may declare them once as a class attribute
``dims = {"ability": ["student"], "difficulty": ["item"]}`` (site -> names of the site's
axes, draw/chain excluded); ``dims=`` overrides it per call. Undeclared axes are named
after the plate they belong to (``data``, ``student``, ``item`` ...); event axes are named
``latent_dim`` (a latent vector) or ``<site>_axis<j>`` -- never an anonymous ``dim_0``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.distributions.torch_distribution import MaskedDistribution
from pyro.infer import infer_discrete
from pyro.poutine.subsample_messenger import _Subsample
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import prune_subsample_sites
from tqdm.auto import tqdm

from .batching import Batch, Data, make_batches
from .evaluation import (
    NOT_BROADCASTING,
    PARTICLE_PLATE,
    as_pair,
    check_broadcasting,
    enumerated_log_likelihood,
    eval_mode,
    in_particles,
    module_device,
    warn_not_broadcasting,
    within_particle_plate,
)
from .program import check_per_row_evaluation, holds_joint_rows, records_value, warn_user

__all__ = ["to_arviz", "save_netcdf", "load_netcdf", "model_dims", "Draws", "draw",
           "samples_to_draws", "draws_to_arviz"]


def model_dims(model: Any, dims: Mapping[str, Sequence[str]] | None = None
               ) -> dict[str, list[str]]:
    """The dims a model declares (class attribute ``dims``; for a bound method, its owner's),
    updated with ``dims``."""
    owner = getattr(model, "__self__", model)
    declared = dict(getattr(owner, "dims", None) or {})
    declared.update(dims or {})
    return {k: list(v) for k, v in declared.items()}


# ---- drawing ---------------------------------------------------------------------------------

def _in_plate(site: dict, plate: str) -> bool:
    return any(f.name == plate for f in site["cond_indep_stack"])


def _global_trace(trace: Trace, plate: str) -> Trace:
    """The sample sites of ``trace`` outside the data plate (to replay in later minibatches)."""
    out = Trace()
    for name, site in trace.nodes.items():
        if site["type"] == "sample" and not site["is_observed"] and not _in_plate(site, plate) \
                and not isinstance(site["fn"], _Subsample):
            out.add_node(name, **site)
    return out


def _axes(name: str, site: dict, shape: Sequence[int], event_dim: int, kind: str
          ) -> tuple[list[str], list[int]]:
    """Names of a site's axes and which of its batch axes to keep.

    ``shape`` excludes the sample (draw) axis. Batch axes of size 1 that belong to no plate
    are broadcasting padding and are dropped (leading ones, and the trailing one of a
    per-row site in a plate at dim -2: theta of shape (students, 1)); plate axes are named
    after the plate. Returns ``(names of kept axes, indices of dropped axes)``.
    """
    plates = {f.dim: f.name for f in site["cond_indep_stack"]
              if f.vectorized and f.dim is not None and f.name != PARTICLE_PLATE}
    n_batch = len(shape) - event_dim
    names, drop = [], []
    for j in range(n_batch):
        dim = j - n_batch
        if dim not in plates and shape[j] == 1:
            drop.append(j)
            continue
        names.append(plates.get(dim, f"{name}_batch{n_batch - j}"))
    if kind == "latent" and event_dim == 1:
        names.append("latent_dim")
    else:
        names += [f"{name}_axis{j}" for j in range(event_dim)]
    return names, drop


class Draws:
    """Site values collected from S draws, one array per minibatch: ``latent[site]``,
    ``predictive[site]`` and ``log_lik[site]`` hold arrays (S, *site shape) (log_lik without
    event axes), ``observed[site]`` arrays (*site shape); ``axes[site]`` are the default axis
    names, ``data_axis[site]`` the index (draw axis excluded) of the data plate's axis for
    local sites, else None. :meth:`joined` concatenates the minibatches."""

    def __init__(self) -> None:
        self.latent: dict[str, list[np.ndarray]] = {}
        self.predictive: dict[str, list[np.ndarray]] = {}
        self.observed: dict[str, list[np.ndarray]] = {}
        self.log_lik: dict[str, list[np.ndarray]] = {}
        self.axes: dict[str, list[str]] = {}
        self.lik_axes: dict[str, list[str]] = {}
        self.data_axis: dict[str, int | None] = {}

    def extend_draws(self, parts: Sequence[Draws]) -> None:
        """Append one minibatch given as one :class:`Draws` per draw (the draws of a program
        run once per draw), joined along the draw axis."""
        first = parts[0]
        for group in ("latent", "predictive", "log_lik"):
            for name in getattr(first, group):
                joined = np.concatenate([getattr(p, group)[name][0] for p in parts], axis=0)
                getattr(self, group).setdefault(name, []).append(joined)
        for name, arrays in first.observed.items():
            self.observed.setdefault(name, []).append(arrays[0])
        for attr in ("axes", "lik_axes", "data_axis"):
            for name, value in getattr(first, attr).items():
                getattr(self, attr).setdefault(name, value)

    def joined(self, group: str) -> dict[str, np.ndarray]:
        out = {}
        for name, parts in getattr(self, group).items():
            axis = self.data_axis.get(name)
            if axis is None or len(parts) == 1:
                out[name] = parts[0]
            else:
                shift = 0 if group == "observed" else 1
                out[name] = np.concatenate(parts, axis=axis + shift)
        return out


def _collect(draws: Draws, model_trace: Trace, num: int, plate: str, first: bool,
             predictive: bool, log_likelihood: bool,
             enumerated_lik: dict[str, torch.Tensor] | None = None,
             vectorized: bool = True) -> None:
    """Add the sites of one pass's model trace to ``draws`` (``num`` draws in its leading
    dim; ``vectorized=False``: one draw without that dim). ``enumerated_lik`` (site ->
    (num, B) nats) replaces the log-likelihood of observed sites that depend on enumerated
    discrete sites."""
    lead = (lambda t: t) if vectorized else (lambda t: t.unsqueeze(0))
    for name, site in prune_subsample_sites(model_trace).nodes.items():
        if site["type"] != "sample" or name.startswith("_"):
            continue
        fn, value = site["fn"], site["value"]
        local = _in_plate(site, plate)
        if not local and not first:
            continue  # global values are replayed: identical in every minibatch
        # pyro.deterministic, and a site poutine.reparam replaced by its value (an observed
        # Delta(...).mask(False)): part of the posterior, not of the likelihood
        deterministic = records_value(site)
        observed = site["is_observed"] and not deterministic
        event_dim = len(getattr(fn, "event_shape", ()))
        if deterministic:  # pyro.deterministic's event_dim defaults to all of the value's
            # dims, the particle and plate dims included: only those left of the plates are
            plates = max((-f.dim for f in site["cond_indep_stack"]
                          if f.vectorized and f.dim is not None), default=0)
            event_dim = min(event_dim, max(value.dim() - plates, 0))
        full = tuple(value.shape)
        if hasattr(fn, "batch_shape") and not deterministic:  # (the plates expand its Delta)
            full = tuple(torch.broadcast_shapes(tuple(fn.batch_shape) + tuple(fn.event_shape),
                                                full))
        vec = value.expand(full) if value.shape != full else value
        mask = site["mask"]
        if not observed and name.endswith("_unobserved") and vec.is_floating_point() \
                and name[:-len("_unobserved")] in model_trace.nodes \
                and mask is not None and not isinstance(mask, bool):
            # obs_mask's latent holds the guide's values at observed entries too: unused
            # there (the site's own value is the data), so NaN, as in observed_data
            hidden = ~torch.as_tensor(mask, device=vec.device).bool().expand(
                full[:len(full) - event_dim])
            vec = vec.masked_fill(hidden.reshape(hidden.shape + (1,) * event_dim), math.nan)
        if not vectorized:
            vec = vec.unsqueeze(0)
        elif vec.dim() == 0 or vec.shape[0] != num:
            vec = vec.expand(num, *vec.shape)
        shape = tuple(vec.shape[1:])
        kind = "latent" if not observed else "observed"
        names, drop = _axes(name, site, shape, event_dim, kind)
        data_axis = None
        if local:
            frame = next(f for f in site["cond_indep_stack"] if f.name == plate)
            j = len(shape) - event_dim + frame.dim
            data_axis = j - sum(1 for d in drop if d < j)
        draws.axes.setdefault(name, names)
        draws.data_axis.setdefault(name, data_axis)

        def keep(t: torch.Tensor, drop: list[int] = drop) -> np.ndarray:
            t = t.detach()
            for d in sorted(drop, reverse=True):
                t = t.squeeze(d + 1)
            return t.cpu().numpy()

        if not observed:
            draws.latent.setdefault(name, []).append(keep(vec))
            continue
        mask = site["mask"]
        batch_full = full[:len(full) - event_dim]
        mask_t = None
        if mask is not None and not isinstance(mask, bool):
            mask_t = torch.as_tensor(mask).expand(batch_full)
        obs = vec.to(torch.get_default_dtype()) if not vec.is_floating_point() else vec.clone()
        if mask_t is not None:
            m = mask_t.reshape(mask_t.shape + (1,) * event_dim).expand(obs.shape)
            obs = obs.masked_fill(~m, float("nan"))
        inner = _distribution_mask(fn, full)
        if inner is not None:
            obs = obs.masked_fill(~inner, float("nan"))
        # pyro.factor (a Unit site): a log-density term with no data to show or predict;
        # it stays in log_likelihood (az.loo then needs var_name= beside other sites)
        factor = isinstance(fn, dist.Unit) or site["infer"].get("is_auxiliary", False)
        if not factor:
            draws.observed.setdefault(name, []).append(keep(obs)[0])
        if predictive and not factor:
            # a plate without a size does not expand the distribution: draw one value per
            # observed entry (as many as the data), not one per draw
            sampler = fn if tuple(fn.batch_shape) == batch_full else fn.expand(batch_full)
            with torch.no_grad():
                draws.predictive.setdefault(name, []).append(keep(lead(sampler.sample())))
        if log_likelihood and enumerated_lik is not None and name in enumerated_lik:
            lp = enumerated_lik[name]  # summed over the enumerated sites, per row
            draws.log_lik.setdefault(name, []).append(
                lp.reshape(num, -1).detach().cpu().numpy())
            draws.lik_axes.setdefault(name, [names[data_axis]] if data_axis is not None
                                      else [f"{name}_row"])
        elif log_likelihood and not enumerated_lik:
            lp = lead(fn.log_prob(value))
            target = batch_full if vectorized else (1,) + batch_full
            lp = lp.expand(target) if lp.shape != target else lp
            if mask_t is not None:
                lp = lp.masked_fill(~mask_t, 0.0)
            draws.log_lik.setdefault(name, []).append(keep(lp))
            draws.lik_axes.setdefault(name, names[:len(names) - event_dim])


def _distribution_mask(fn: Any, full: tuple[int, ...]) -> torch.Tensor | None:
    """The mask of a ``.mask(m)`` inside ``fn`` (possibly under ``to_event``), broadcast to
    the value's shape ``full``; None if there is none."""
    d = fn
    while d is not None:
        if isinstance(d, MaskedDistribution):
            m = d._mask
            if isinstance(m, bool) or m is None:
                return None
            m = m.reshape(m.shape + (1,) * len(d.event_shape))
            return m.expand(full)
        d = getattr(d, "base_dist", None)
    return None


@torch.no_grad()
def draw(model: Callable, guide: Callable | None, data: Data, num_samples: int = 500, *,
         batch_size: int | None = None, plate: str | None = None,
         device: str | torch.device | None = None, predictive: bool = True,
         log_likelihood: bool = True, prior: bool = False) -> Draws:
    """Run ``guide`` (or, with ``prior=True``, nothing: the model's prior) with
    ``num_samples`` vectorized particles over ``data`` in minibatches, replay the model, and
    collect every sample site. Global draws are shared by all minibatches.

    A program that does not broadcast over an extra leading particle dim is run once per
    draw instead. Discrete sites the model enumerates (``config_enumerate``) and the guide
    leaves out are drawn from their exact conditional posterior (Pyro's ``infer_discrete``),
    and the observed sites' ``log_likelihood`` sums them out (per row).
    """
    if device is None:
        device = module_device(model, guide)
    pair = as_pair(model, guide, plate)
    n = make_batches(data, 1, device, shuffle=False).num_examples
    if holds_joint_rows(pair, n):  # a guide that draws its rows at once sees them all
        batch_size = n
    elif batch_size is None:
        batch_size = max(1, min(n, 100_000 // max(1, num_samples)))
    batches = make_batches(data, batch_size, device, shuffle=False)
    draws = Draws()
    with eval_mode(model, guide):
        globs: dict[int | None, Trace] = {}
        plate_name = structure = None
        for i, batch in enumerate(tqdm(batches, desc="posterior draws", unit="batch",
                                       leave=False, disable=None)):
            if plate_name is None:
                structure = pair.inspect(batch)
                plate_name = pair.data_plate(batch)
                check_per_row_evaluation(pair, structure, weights=False)
            args = (pair, batch, structure, plate_name, globs, prior)
            collect = dict(plate=plate_name, first=i == 0, predictive=predictive and not prior,
                           log_likelihood=log_likelihood and not prior)
            if check_broadcasting(pair, batch, structure.nesting, "drawing the draws"):
                try:
                    model_trace, lik = _draw_pass(*args, num_samples)
                    if within_particle_plate(model_trace):
                        pair.vectorizable = True
                        _collect(draws, model_trace, num_samples, enumerated_lik=lik,
                                 **collect)
                        continue
                    warn_user(
                        "a site's batch dims reach left of the particle plate: the program "
                        f"does not broadcast over a leading particle dim ({NOT_BROADCASTING});"
                        f" drawing the {num_samples} draws one after another (slower)")
                except (ValueError, RuntimeError, IndexError) as e:
                    if pair.vectorizable:
                        raise
                    warn_not_broadcasting(e, "drawing the draws")
                pair.vectorizable = False
                globs.clear()
            one = [Draws() for _ in range(num_samples)]
            for s, part in enumerate(one):
                model_trace, lik = _draw_pass(*args, None, s)
                _collect(part, model_trace, 1, enumerated_lik=lik, vectorized=False, **collect)
            draws.extend_draws(one)
    return draws


def _draw_pass(pair: Any, batch: Batch, structure: Any, plate: str, globs: dict,
               prior: bool, num: int | None, index: int | None = None
               ) -> tuple[Trace, dict[str, torch.Tensor] | None]:
    """One pass of ``num`` vectorized draws (None: one plain draw, number ``index``): the
    model's trace, and for enumerated models the per-row log-likelihood of each observed
    site with the enumerated sites summed out (site -> (num, B) nats)."""
    nesting = structure.nesting
    glob = globs.get(index)
    if prior:
        fn = poutine.uncondition(pair.model)
        if glob is not None:
            fn = poutine.replay(fn, trace=glob)
        model_trace = poutine.trace(batch.call).get_trace(in_particles(fn, num, nesting))
        if glob is None:
            globs[index] = _global_trace(model_trace, plate)
        return model_trace, None
    g = pair.guide if glob is None else poutine.replay(pair.guide, trace=glob)
    guide_trace = poutine.trace(batch.call).get_trace(in_particles(g, num, nesting))
    if glob is None:
        globs[index] = _global_trace(guide_trace, plate)
    model = in_particles(poutine.replay(pair.model, trace=guide_trace), num, nesting)
    lik = None
    if any(name not in guide_trace.nodes for name in structure.enumerated):
        lik = enumerated_log_likelihood(pair, batch, guide_trace, num, plate, nesting)
        # the particle plate inside infer_discrete: its enumerated pass must see the plate,
        # or one draw per row is made and repeated across the particles whenever nothing
        # the guide drew varies along them (an empty guide, a model of pyro.params)
        model = infer_discrete(model, first_available_dim=-nesting - 2)
    model_trace = poutine.trace(batch.call).get_trace(model)
    return model_trace, lik


# ---- InferenceData ---------------------------------------------------------------------------

def _resolve_dims(values: Mapping[str, np.ndarray], default: Mapping[str, list[str]],
                  declared: Mapping[str, Sequence[str]], sizes: dict[str, int],
                  sample_axes: int, group: str) -> dict[str, list[str]]:
    """Final dim names per variable: declared ones (checked), else defaults with clashing
    sizes renamed ``<site>_<name>``. ``sizes`` accumulates name -> length across groups."""
    out: dict[str, list[str]] = {}
    for name, arr in values.items():
        shape = arr.shape[sample_axes:]
        names = list(declared[name]) if name in declared else list(default[name])
        if name in declared and len(names) != len(shape):
            raise ValueError(
                f"dims for site {name!r} ({group}): {names} names {len(names)} axes but the "
                f"site has shape {tuple(shape)} ({len(shape)} axes, draws excluded); give one "
                "name per axis")
        for j, (dim, length) in enumerate(zip(names, shape)):
            if sizes.setdefault(dim, length) != length:
                if name in declared:
                    raise ValueError(
                        f"dims for site {name!r}: axis {j} is named {dim!r} with length "
                        f"{length}, but {dim!r} already has length {sizes[dim]}")
                dim = f"{name}_{dim}"
                sizes.setdefault(dim, length)
                names[j] = dim
        out[name] = names
    return out


def to_arviz(model: Callable, guide: Callable, data: Data, num_samples: int = 500, *,
             dims: Mapping[str, Sequence[str]] | None = None,
             coords: Mapping[str, Sequence[Any]] | None = None, prior: bool = False,
             posterior_predictive: bool = True, log_likelihood: bool = True,
             batch_size: int | None = None, plate: str | None = None,
             device: str | torch.device | None = None, seed: int | None = None) -> Any:
    """The variational posterior of a trained pair as ``arviz.InferenceData``.

    Args:
        model, guide: Pyro programs called as ``fn(*data, size=N, subsample=idx)``
            (any pair the engine trains; amortized guides encode each example).
        data: tensor / tuple / dict of tensors, first dim = examples (N).
        num_samples: S draws from the guide (one chain of S independent draws).
        dims: site -> axis names (draw/chain excluded), overriding the model's ``dims``.
        coords: dim name -> labels (e.g. ``{"item": ["item1", ...]}``).
        prior: also draw ``prior`` and ``prior_predictive`` from the model alone.
        batch_size: examples per vectorized pass (default: S * batch <= 100,000).
        seed: seeds Pyro's RNG first (reproducible draws).

    Returns:
        InferenceData with groups ``posterior`` (shape (1, S, ...)), ``posterior_predictive``,
        ``observed_data``, ``log_likelihood`` (nats per observation), optionally ``prior``.
    """
    import arviz as az

    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if seed is not None:
        pyro.set_rng_seed(seed)
    declared = model_dims(model, dims)
    post = draw(model, guide, data, num_samples, batch_size=batch_size, plate=plate,
                device=device, predictive=posterior_predictive, log_likelihood=log_likelihood)
    groups = {"posterior": (post.joined("latent"), post.axes, 2)}
    if posterior_predictive:
        groups["posterior_predictive"] = (post.joined("predictive"), post.axes, 2)
    groups["observed_data"] = (post.joined("observed"), post.axes, 0)
    if log_likelihood:
        groups["log_likelihood"] = (post.joined("log_lik"), post.lik_axes, 2)
    if prior:
        pri = draw(model, guide, data, num_samples, batch_size=batch_size, plate=plate,
                   device=device, prior=True)
        latent = pri.joined("latent")
        groups["prior"] = ({k: v for k, v in latent.items() if k not in post.observed},
                           pri.axes, 2)
        groups["prior_predictive"] = ({k: v for k, v in latent.items() if k in post.observed},
                                      post.axes, 2)
    unknown = set(declared) - {k for g in groups.values() for k in g[0]}
    if dims and unknown & set(dims):
        raise ValueError(f"dims name sites the model does not have: {sorted(unknown & set(dims))}"
                         f"; its sites are {sorted({k for g in groups.values() for k in g[0]})}")
    sizes: dict[str, int] = {}
    datasets = {}
    data_dim = None
    for group, (values, axes, sample_axes) in groups.items():
        if sample_axes == 2:
            values = {k: v[None] for k, v in values.items()}  # one chain
        lik = {k: declared[k][:values[k].ndim - sample_axes] for k in values
               if k in declared} if group == "log_likelihood" else {}
        names = _resolve_dims(values, axes, lik if group == "log_likelihood" else declared,
                              sizes, sample_axes, group)
        if group == "posterior":
            data_dim = next((names[k][post.data_axis[k]] for k in names
                             if post.data_axis.get(k) is not None), None)
        group_coords = _check_coords(coords or {}, names, values, sample_axes)
        datasets[group] = az.dict_to_dataset(
            values, coords=group_coords, dims=names, library=pyro,
            default_dims=["chain", "draw"] if sample_axes == 2 else [])
    idata = az.InferenceData(**datasets)
    if data_dim is not None:  # the dim that runs over examples (local latents), for plots
        idata.posterior.attrs["data_dim"] = data_dim
    return idata


def _check_coords(coords: Mapping[str, Sequence[Any]], names: Mapping[str, list[str]],
                  values: Mapping[str, np.ndarray], sample_axes: int) -> dict[str, list]:
    out = {}
    for var, dim_names in names.items():
        for dim, length in zip(dim_names, values[var].shape[sample_axes:]):
            if dim in coords:
                labels = list(coords[dim])
                if len(labels) != length:
                    raise ValueError(f"coords[{dim!r}] has {len(labels)} labels but the axis "
                                     f"{dim!r} of site {var!r} has length {length}")
                out[dim] = labels
    return out


def save_netcdf(idata: Any, path: str | Path) -> Path:
    """Write ``idata`` to a NetCDF file (parent folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    idata.to_netcdf(str(path))
    return path


def load_netcdf(path: str | Path) -> Any:
    """Read an ``InferenceData`` written by :func:`save_netcdf` (fully loaded into memory)."""
    import arviz as az

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no NetCDF file at {path}")
    idata = az.from_netcdf(str(path))
    for group in idata.groups():
        idata[group].load()
    return idata


def samples_to_draws(samples: Mapping[str, torch.Tensor], model: Callable, data: Data
                     ) -> Draws:
    """Draws from another sampler (e.g. ``MCMC.get_samples(group_by_chain=True)``: site ->
    (C, S, *site shape)) laid out like :func:`draw`'s, so they get the same dim names."""
    from .batching import split_structure

    args, kwargs = split_structure(data)
    with poutine.block(), torch.no_grad():
        trace = poutine.trace(model).get_trace(*args, **kwargs)
    out = Draws()
    for name, value in samples.items():
        site = trace.nodes.get(name)
        if site is None or site["type"] != "sample":
            continue
        event_dim = len(getattr(site["fn"], "event_shape", ()))
        names, drop = _axes(name, site, tuple(value.shape[2:]), event_dim, "latent")
        t = value.detach()
        for d in sorted(drop, reverse=True):
            t = t.squeeze(d + 2)
        out.latent[name] = [t.cpu().numpy()]
        out.axes[name] = names
        out.data_axis[name] = None
    return out


def draws_to_arviz(draws: Draws, model: Callable,
                   dims: Mapping[str, Sequence[str]] | None = None,
                   coords: Mapping[str, Sequence[Any]] | None = None) -> Any:
    """An ``InferenceData`` (posterior only) from :class:`Draws` whose arrays already have
    (chain, draw) leading axes -- e.g. from :func:`samples_to_dataset_shapes`."""
    import arviz as az

    declared = model_dims(model, dims)
    values = draws.joined("latent")
    names = _resolve_dims(values, draws.axes, declared, {}, 2, "posterior")
    ds = az.dict_to_dataset(values, coords=_check_coords(coords or {}, names, values, 2),
                            dims=names, library=pyro)
    return az.InferenceData(posterior=ds)
