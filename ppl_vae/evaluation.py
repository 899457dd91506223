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

import itertools
import math
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions.util import scale_and_mask
from pyro.ops import packed
from pyro.ops.contract import contract_to_tensor
from pyro.ops.rings import LogRing
from pyro.poutine.enum_messenger import EnumMessenger
from pyro.poutine.subsample_messenger import _Subsample
from pyro.poutine.util import prune_subsample_sites

from .batching import Batch, Data, make_batches
from .program import (
    PARTICLE_PLATE,
    Pair,
    Program,
    SetupError,
    check_per_row_evaluation,
    holds_joint_rows,
    modules_of,
    unobserved_leaves,
    warn_user,
)


def as_pair(model: Callable, guide: Callable | None, plate: str | None = None) -> Pair:
    """``model`` and ``guide`` as the engine calls them (:class:`ppl_vae.program.Pair`)."""
    if isinstance(model, Program) and model.pair.raw_guide is _raw(guide) \
            and (plate is None or plate == model.pair.plate):
        return model.pair
    return Pair(model, guide, plate)


def _raw(fn):
    return fn.fn if isinstance(fn, Program) else fn


def log_weights(model: Callable, guide: Callable, batch: Batch, num_particles: int,
                plate: str, nesting: int,
                weight: Callable[[str, dict], float] | None = None,
                enumerated: bool = False, kind: str = "weights", vectorize: bool = True,
                skip: frozenset[str] = frozenset()) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example log importance weights of one minibatch.

    Returns ``(local, glob)``: ``local`` has shape (K, B) -- the terms of every site in the data
    plate (observations, local latents), ``glob`` has shape (K,) -- the terms of sites outside
    it (global latents' log p - log q). Units: nats. Not scaled by size/B.
    ``weight(name, site)`` optionally multiplies a latent site's terms (a KL weight beta).
    ``model`` and ``guide`` are called as :class:`ppl_vae.program.Program` s (``batch.call``).

    ``enumerated=True``: discrete sites marked for parallel enumeration (``config_enumerate``)
    are summed out exactly with Pyro's tensor contraction: model-side ones inside
    log p(x_i, z_i) = log sum_y p(x_i, y, z_i); guide-side ones give ``kind="weights"``
    log sum_y p(x_i, y, z_iy) / q(z_iy | y) (an importance weight of log p(x_i)) or
    ``kind="elbo"`` sum_y q(y | x_i) [log p(x_i, y, z_iy) - log q(y | x_i) - log q(z_iy | y)].
    ``vectorize=False`` runs the K particles one after another (for programs that do not
    broadcast over an extra leading dim, e.g. ``locs[assignment]`` or ``x @ w``).
    ``skip``: latent sites left out of model and guide terms alike (leaves the rest of the
    model does not read, integrated out exactly by leaving them out).
    Differentiable: used both for evaluation (under no_grad) and by the IWAE objective.
    """
    if not vectorize:
        parts = [log_weights(model, guide, batch, None, plate, nesting, weight, enumerated, kind,
                             skip=skip)
                 for _ in range(num_particles)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    if enumerated:
        return _enumerated_log_weights(model, guide, batch, num_particles, plate, nesting,
                                       kind, skip)
    k = num_particles or 1
    guide_trace = poutine.trace(batch.call).get_trace(
        in_particles(guide, num_particles, nesting))
    model_trace = poutine.trace(poutine.replay(batch.call, trace=guide_trace)).get_trace(
        in_particles(model, num_particles, nesting))
    local = torch.zeros(k, len(batch), device=batch.subsample.device)
    glob = torch.zeros(k, device=batch.subsample.device)
    for sign, trace in ((1.0, model_trace), (-1.0, guide_trace)):
        for name, site in prune_subsample_sites(trace).nodes.items():
            if site["type"] != "sample" or name in skip:
                continue
            if trace is guide_trace and site["is_observed"]:
                continue
            if trace is model_trace and not site["is_observed"] \
                    and name not in guide_trace.nodes:
                continue  # drawn from its prior, the proposal: log p(z) - log q(z) = 0
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


def _enumerated_log_weights(model: Callable, guide: Callable, batch: Batch,
                            num_particles: int, plate: str, nesting: int, kind: str,
                            skip: frozenset[str] = frozenset()
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`log_weights` with enumerated discrete sites summed out (its docstring)."""

    # the guide enumerates from the first free dim, the model to the left of the guide's
    # dims (Pyro's TraceEnum_ELBO does the same)
    guide_trace = poutine.trace(
        EnumMessenger(first_available_dim=-nesting - 2)(batch.call)).get_trace(
        in_particles(guide, num_particles, nesting))
    # enumeration inside the replay, as in TraceEnum_ELBO: a replayed site (the guide's z)
    # is marked done by the replay and would get no enumeration dims from an outer enum
    model_trace = poutine.trace(poutine.replay(EnumMessenger()(batch.call),
                                               trace=guide_trace)).get_trace(
        in_particles(model, num_particles, nesting))
    guide_trace = prune_subsample_sites(guide_trace)
    model_trace = prune_subsample_sites(model_trace)
    model_trace.compute_log_prob()
    guide_trace.compute_log_prob()
    model_trace.pack_tensors()
    guide_trace.pack_tensors(model_trace.plate_to_symbol)
    symbols = model_trace.plate_to_symbol
    data_symbol = symbols.get(plate)
    if data_symbol is None:
        raise SetupError(f"plate {plate!r} is not a plate of the model")
    target = frozenset({data_symbol} | ({symbols[PARTICLE_PLATE]} if num_particles else set()))
    sizes = {data_symbol: len(batch)}
    if num_particles:
        sizes[symbols[PARTICLE_PLATE]] = num_particles
    local_tree: OrderedDict[frozenset, list[torch.Tensor]] = OrderedDict()
    glob_terms: list[torch.Tensor] = []
    enum_dims: set[str] = set()
    guide_enum: list[torch.Tensor] = []
    # a site the guide enumerates is an ELBO term like any latent: masked in the model too
    # (obs_mask's <name>_unobserved at observed rows); for the importance weight its q(y)
    # leaves the weight and the model's factor stays whole, as for model-side enumeration
    by_guide = {name for name, site in guide_trace.nodes.items() if site["type"] == "sample"
                and site["infer"].get("_enumerate_dim") is not None} if kind == "elbo" else set()
    for sign, trace in ((1.0, model_trace), (-1.0, guide_trace)):
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or (trace is guide_trace and site["is_observed"]) \
                    or name in skip:
                continue
            p = site["packed"]
            is_enum = site["infer"].get("_enumerate_dim") is not None
            term = _enumerated_term(p, is_enum and trace is model_trace and name not in by_guide)
            if is_enum:
                enum_dims.update(d for d in term._pyro_dims if d not in symbols.values())
            if trace is guide_trace and is_enum:
                guide_enum.append(term)  # summed exactly: its q(y) leaves the weight
                continue
            if sign < 0:
                term = packed.neg(term)
            ordinal = frozenset(symbols[f.name] for f in site["cond_indep_stack"]
                                if f.vectorized)
            if data_symbol in ordinal:
                local_tree.setdefault(ordinal, []).append(term)
            else:
                glob_terms.append((name, term))
    symbol_to_dim = model_trace.symbol_to_dim
    k = num_particles or 1
    glob = torch.zeros(k, device=batch.subsample.device)
    for name, term in glob_terms:
        if any(d in enum_dims for d in term._pyro_dims):
            raise SetupError(f"site {name!r} depends on an enumerated discrete site outside the "
                             f"data plate {plate!r}; evaluation sums out per-row discrete "
                             "sites only")
        lp = packed.unpack(term, symbol_to_dim)
        glob = glob + _keep_dims(lp, nesting, None).reshape(-1)
    guide_dims = {d for t in guide_enum for d in t._pyro_dims if d in enum_dims}
    if kind == "elbo" and guide_enum:
        keep = guide_dims
    else:
        keep = set()
    parts = [packed.unpack(t, symbol_to_dim)
             for t in _contract(local_tree, enum_dims, target, sizes, keep)]
    value = parts[0]
    for part in parts[1:]:
        value = value + part
    if keep:
        log_q, log_weight = 0.0, 0.0
        for t in guide_enum:
            lq = packed.unpack(t, symbol_to_dim)
            own = [symbol_to_dim[d] for d in t._pyro_dims if d in enum_dims]
            log_q = log_q + lq
            # normalized over its values: where the site is masked (log q = 0 for every
            # value) the row's terms do not depend on it and count once, not once per value
            log_weight = log_weight + lq - lq.logsumexp(own, keepdim=True)
        value, log_q, log_weight = torch.broadcast_tensors(value, log_q, log_weight)
        value = log_weight.exp() * (value - log_q)
        dims = [d for d in range(-value.dim(), -nesting - 1)]
        value = value.sum(dims, keepdim=True) if dims else value
    width = nesting + 1
    value = value.reshape(value.shape[-width:]) if value.dim() > width else value
    lp = _keep_dims(value, nesting, symbol_to_dim[data_symbol])
    local = lp.reshape(lp.shape[0], -1).expand(k, len(batch))
    return local, glob


def enumerated_log_likelihood(pair: Pair, batch: Batch, guide_trace, num_particles: int | None,
                              plate: str, nesting: int) -> dict[str, torch.Tensor]:
    """log p(x_i | z_i, globals) of each row with the model's enumerated discrete sites
    summed out, for the guide's draws in ``guide_trace``: ``{first observed site: (K, B)}``
    (nats; all observed sites of the row together, under the first one's name). Where a
    row's latent z_i depends on an enumerated site y: log sum_y p(y, z_i, x_i) - log sum_y
    p(y, z_i), i.e. log sum_y p(y | z_i) p(x_i | y, z_i)."""
    model_trace = poutine.trace(poutine.replay(
        EnumMessenger(first_available_dim=-nesting - 2)(batch.call),
        trace=guide_trace)).get_trace(in_particles(pair.model, num_particles, nesting))
    model_trace = prune_subsample_sites(model_trace)
    model_trace.compute_log_prob()
    model_trace.pack_tensors()
    symbols = model_trace.plate_to_symbol
    data_symbol = symbols[plate]
    joint: OrderedDict[frozenset, list[torch.Tensor]] = OrderedDict()  # p(y, z, x)
    latent: OrderedDict[frozenset, list[torch.Tensor]] = OrderedDict()  # p(y, z)
    enum_dims: set[str] = set()
    first = None
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample":
            continue
        is_enum = site["infer"].get("_enumerate_dim") is not None
        ordinal = frozenset(symbols[f.name] for f in site["cond_indep_stack"] if f.vectorized)
        if data_symbol not in ordinal:
            continue
        if site["is_observed"] and first is None:
            first = name
        term = _enumerated_term(site["packed"], is_enum)
        if is_enum:
            enum_dims.update(d for d in term._pyro_dims if d not in symbols.values())
        joint.setdefault(ordinal, []).append(term)
        if not site["is_observed"]:
            latent.setdefault(ordinal, []).append(term)
    if first is None:
        return {}
    target = frozenset({data_symbol} | ({symbols[PARTICLE_PLATE]} if num_particles else set()))
    sizes = {data_symbol: len(batch)}
    if num_particles:
        sizes[symbols[PARTICLE_PLATE]] = num_particles
    value = packed.unpack(_contract(joint, enum_dims, target, sizes)[0],
                          model_trace.symbol_to_dim)
    if latent:  # log p(x | z) = log p(y, z, x) - log p(y, z), y summed out in both
        value = value - packed.unpack(_contract(latent, enum_dims, target, sizes)[0],
                                      model_trace.symbol_to_dim)
    lp = _keep_dims(value, nesting, model_trace.symbol_to_dim[data_symbol])
    return {first: lp.reshape(lp.shape[0], -1).expand(num_particles or 1, len(batch))}


def _enumerated_term(packed_site: dict, model_enumerated: bool) -> torch.Tensor:
    """A site's packed log-factor for the contraction: masked, except for a discrete site the
    model enumerates, whose factor stays whole as in Pyro's TraceEnum_ELBO -- it sums to one
    over its values, so where it is masked out (``obs_mask``'s ``<name>_unobserved`` at the
    observed rows) it drops out of the sum instead of counting each row K times."""
    if model_enumerated:
        return packed_site["unscaled_log_prob"]
    return packed.scale_and_mask(packed_site["unscaled_log_prob"], mask=packed_site["mask"])


def _contract(tree: OrderedDict, sum_dims: set[str], target: frozenset, sizes: dict[str, int],
              keep: set[str] | None = None) -> list[torch.Tensor]:
    """Sum out ``sum_dims`` (log space, Pyro's tensor message passing) down to the plates
    ``target``, keeping the dims ``keep``. Without ``keep``: one packed tensor. With it: one
    per connected group of terms (Pyro's contract_to_tensor would drop the groups that do
    not touch ``keep``; here they are contracted fully), to be added. ``sizes``: the
    lengths of the target plates' symbols."""
    dim_to_size: dict[str, int] = dict(sizes)
    for terms in tree.values():
        for t in terms:
            dim_to_size.update(zip(t._pyro_dims, t.shape))
    ring = LogRing(dim_to_size=dim_to_size)
    if not keep:
        return [contract_to_tensor(tree, set(sum_dims), target_ordinal=target, ring=ring)]
    groups: list[tuple[set[str], list]] = []  # terms joined by the sum dims they share
    for ordinal, terms in tree.items():
        for t in terms:
            dims = set(t._pyro_dims) & sum_dims
            joined = [g for g in groups if g[0] & dims]
            group = (set(dims), [(ordinal, t)])
            for g in joined:
                group[0].update(g[0])
                group[1].extend(g[1])
                groups.remove(g)
            groups.append(group)
    out = []
    for dims, members in groups:
        sub: OrderedDict = OrderedDict()
        for ordinal, t in members:
            sub.setdefault(ordinal, []).append(t)
        out.append(contract_to_tensor(sub, set(sum_dims), target_ordinal=target,
                                      target_dims=set(keep) & dims, ring=ring))
    return out


def in_particles(fn: Callable, num: int | None, nesting: int) -> Callable:
    """``fn`` run inside a plate of ``num`` particles at the dim left of the program's
    ``nesting`` plates (``num`` None: ``fn`` itself, one particle without that dim)."""
    if num is None:
        return fn

    def run(*args, **kwargs):
        with pyro.plate(PARTICLE_PLATE, num, dim=-nesting - 1):
            return fn(*args, **kwargs)
    return run


# what the checks for a particle dim pushed left of the plates say (within_particle_plate,
# _keep_dims): the usual cause and its fix
NOT_BROADCASTING = ("e.g. mu[..., index] on a latent with an event dim; Pyro's "
                    "Vindex(mu)[..., index] broadcasts")


def warn_not_broadcasting(error: Exception, doing: str) -> None:
    """Warn that a vectorized pass failed with ``error`` and ``doing`` (e.g. "evaluating its
    K particles") now runs one particle at a time."""
    warn_user(
        "the model or guide does not broadcast over an extra leading particle dim "
        f"({type(error).__name__}: {str(error).splitlines()[0][:200]}); {doing} one at a time "
        "(slower). Write it batch-shape-agnostic (e.g. Vindex(locs)[..., a], "
        "x @ w.unsqueeze(-1)) for speed")


def within_particle_plate(trace) -> bool:
    """Whether every site of a vectorized pass keeps its batch dims within the particle
    plate's. Indexing a latent's event dim (``mu[..., index]``) pushes one left of it: no
    error, but the draws mix (every particle's latent against every other's rows)."""
    for site in trace.nodes.values():
        frame = next((f for f in site.get("cond_indep_stack", ()) if f.name == PARTICLE_PLATE),
                     None)
        if site["type"] == "sample" and frame is not None \
                and len(getattr(site["fn"], "batch_shape", ())) > -frame.dim:
            return False
    return True


def _sizes(trace) -> set[int]:
    """Every length in a trace: its sites' value and batch shapes and their plates' sizes."""
    sizes: set[int] = set()
    for site in trace.nodes.values():
        if site["type"] != "sample":
            continue
        value = site.get("value")
        if torch.is_tensor(value):
            sizes.update(value.shape)
        sizes.update(getattr(site["fn"], "batch_shape", ()))
        sizes.update(f.size for f in site.get("cond_indep_stack", ()) if f.size)
    return sizes


def broadcasting_error(model: Callable, guide: Callable | None, batch: Batch, nesting: int
                       ) -> Exception | None:
    """Whether ``model`` and ``guide`` broadcast over an extra leading particle dim on
    ``batch``: None if they do, else the error a vectorized pass of particles raised, or one
    saying how it went wrong without raising.

    The trial draws K particles in one vectorized pass and scores the same draws again one
    particle at a time: each particle's log p and log q must be the ones a plain run gives
    (a ``pyro.factor`` of ``w.pow(2).sum()`` sums over the particles and raises nothing;
    nor does ``a[g]`` when it happens to fit the shapes). K equals no length in the program
    (its sites' shapes, its plates, the batch), so that ``a[g]`` on a (K, G) latent cannot
    pass for ``a[..., g]`` when K, the batch's rows and the G groups coincide. Modules run in
    eval mode (no dropout), and the random stream is left as it was."""
    with torch.random.fork_rng(devices=[]), poutine.block(), torch.no_grad(), \
            eval_mode(model, guide):
        try:
            one_guide = poutine.trace(batch.call).get_trace(guide) if guide is not None \
                else None
            one_model = poutine.trace(poutine.replay(batch.call, trace=one_guide)).get_trace(
                model)
            sizes = _sizes(one_model) | (_sizes(one_guide) if one_guide else set())
            k = next(k for k in itertools.count(2) if k not in sizes | {batch.size, len(batch)})
            guide_k = (poutine.trace(batch.call).get_trace(in_particles(guide, k, nesting))
                       if guide is not None else None)
            model_k = poutine.trace(batch.call).get_trace(
                in_particles(poutine.replay(model, trace=guide_k), k, nesting))
            if not within_particle_plate(model_k):
                return ValueError(f"a site's batch dims reach left of the particle plate "
                                  f"({NOT_BROADCASTING})")
            together = {"model": _particle_log_densities(model_k, nesting, k)}
            if guide_k is not None:  # (scored after the model set its masks on it)
                together["guide"] = _particle_log_densities(guide_k, nesting, k)
            for i in range(k):
                replayed = _particle(model_k, one_model, i, nesting)
                alone = {}
                if guide is not None:
                    alone["guide"] = poutine.trace(poutine.replay(batch.call, trace=_particle(
                        guide_k, one_guide, i, nesting))).get_trace(guide)
                    for name, node in alone["guide"].nodes.items():  # the nodes themselves,
                        if node["type"] == "sample":  # which the model's masks reach
                            replayed.nodes[name] = node
                alone["model"] = poutine.trace(poutine.replay(batch.call, trace=replayed)
                                               ).get_trace(model)
                for part, trace in alone.items():
                    trace.compute_log_prob()
                    sites = [t["log_prob"].double() for t in trace.nodes.values()
                             if t["type"] == "sample"]
                    value = sum(float(lp.sum()) for lp in sites)
                    scale = sum(float(lp.abs().sum()) for lp in sites)
                    if abs(float(together[part][i]) - value) > 1e-4 * (1.0 + scale):
                        return ValueError(
                            f"particle {i} of {k} drawn together has log {part[0]} "
                            f"{float(together[part][i]):.6g} nats, alone {value:.6g}: the "
                            "program mixes the particles (e.g. a sum over a latent's leading "
                            "dim, a[g] for a[..., g])")
        except Exception as e:  # any error of the vectorized program: run it one at a time
            return e
    return None


def _particle_log_densities(trace, nesting: int, k: int) -> torch.Tensor:
    """Each particle's log-density (k,) in a trace of k particles at dim -nesting-1."""
    trace.compute_log_prob()
    total = torch.zeros(k, dtype=torch.float64)
    for site in trace.nodes.values():
        if site["type"] == "sample":
            lp = _keep_dims(site["log_prob"], nesting, None).double()
            total += lp.reshape(lp.shape[0], -1).sum(-1).expand(k)
    return total


def _particle(trace, plain, i: int, nesting: int):
    """The latent values of particle ``i`` of a vectorized ``trace``, in the shapes of the
    same sites in ``plain`` (one particle, no particle dim): a trace to replay. A plate's own
    subsample (a model drawing its rows) is kept as drawn: the same rows alone."""
    out = poutine.Trace()
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"] or name not in plain.nodes:
            continue
        value = site["value"]
        if isinstance(site["fn"], _Subsample):
            out.add_node(name, type="sample", value=value, is_observed=False,
                         infer=site["infer"], fn=site["fn"])
            continue
        at = value.dim() - site["fn"].event_dim - (nesting + 1)
        if at >= 0 and value.shape[at] > 1:
            value = value.select(at, i)
        shape = plain.nodes[name]["value"].shape
        if value.numel() == shape.numel():
            value = value.reshape(shape)
        out.add_node(name, type="sample", value=value, is_observed=False,
                     infer=site["infer"], fn=site["fn"])
    return out


def check_broadcasting(pair: Pair, batch: Batch, nesting: int, doing: str) -> bool:
    """Before the pair's first vectorized pass, find out (:func:`broadcasting_error`) whether
    it broadcasts over particles; if not, remember it (``pair.vectorizable = False``) and
    warn (``doing``: what then runs one at a time). Returns whether to try a vectorized
    pass (the first real one still falls back on an error, and sets ``vectorizable``)."""
    if pair.vectorizable is None and not getattr(pair, "_broadcast_checked", False):
        error = broadcasting_error(pair.model, pair.guide, batch, nesting)
        pair._broadcast_checked = True
        if error is not None:
            pair.vectorizable = False
            warn_not_broadcasting(error, doing)
    return pair.vectorizable is not False


def pair_log_weights(pair: Pair, batch: Batch, num_particles: int, plate: str,
                     weight: Callable[[str, dict], float] | None = None, kind: str = "weights",
                     skip: frozenset[str] = frozenset()) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`log_weights` of a :class:`~ppl_vae.program.Pair`, vectorized over particles
    when the program broadcasts over an extra leading dim, else one particle at a time
    (found out on the first call and remembered, with a warning). ``skip``: sites left out
    of the weights (:func:`ppl_vae.program.unobserved_leaves`: log p(x_observed) exactly,
    less noise)."""
    structure = pair.inspect(batch)
    if getattr(pair, "_rows_checked", None) is not structure:  # once, not every iwae step
        check_per_row_evaluation(pair, structure)
        pair._rows_checked = structure
    common = dict(weight=weight, enumerated=bool(structure.enumerated), kind=kind, skip=skip)
    if check_broadcasting(pair, batch, structure.nesting, "evaluating particles"):
        try:
            out = log_weights(pair.model, pair.guide, batch, num_particles, plate,
                              structure.nesting, **common)
            pair.vectorizable = True
            return out
        except (ValueError, RuntimeError, IndexError) as e:
            if pair.vectorizable:
                raise
            pair.vectorizable = False
            warn_not_broadcasting(e, "evaluating particles")
    return log_weights(pair.model, pair.guide, batch, num_particles, plate,
                       structure.nesting, vectorize=False, **common)


def _keep_dims(lp: torch.Tensor, nesting: int, data_dim: int | None) -> torch.Tensor:
    """Sum a site's log-prob over every dim but the particle dim and the data-plate dim."""
    if not torch.is_tensor(lp):
        lp = torch.as_tensor(lp)
    width = nesting + 1
    if lp.dim() > width:  # a dim left of the particle plate: the program moved it there
        raise ValueError(
            f"a site's log-prob has {lp.dim()} dims, more than its {width} of plates and "
            f"particles: the program does not broadcast over a leading particle dim "
            f"({NOT_BROADCASTING})")
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
    for the block, then restore each one's previous mode. Modules the block calls that are
    not among them (a plain function's networks held in a closure, registered with
    ``pyro.module``) are put in eval mode as they are called, and restored too."""
    modes = [(m, m.training) for m in modules_of(*objs)]
    for m, _ in modes:
        m.eval()
    called: dict[int, tuple[torch.nn.Module, bool]] = {}

    def to_eval(module: torch.nn.Module, args) -> None:
        if module.training and id(module) not in called:
            called[id(module)] = (module, True)
            module.training = False  # itself only: its submodules are called in turn

    hook = torch.nn.modules.module.register_module_forward_pre_hook(to_eval)
    try:
        yield
    finally:
        hook.remove()
        for module, training in called.values():
            module.training = training
        for m, training in modes:
            m.train(training)


@torch.no_grad()
def per_example_log_weights(model: Callable, guide: Callable, data: Data, num_samples: int,
                            batch_size: int = 100, particles_per_pass: int | None = None,
                            plate: str | None = None, device: str | torch.device | None = None,
                            reduce: str = "logmeanexp", progress: bool | None = None,
                            sparse_rows: bool = False) -> torch.Tensor:
    """Reduce K log weights per example, streaming over particles so K=5000 fits in memory.

    ``reduce="logmeanexp"`` gives the IS estimate of log p(x_i); ``"mean"`` gives the ELBO.
    ``sparse_rows``: sparse data reach the model as CSR minibatches (as in training with
    ``FitConfig.sparse_batches``). Returns a CPU tensor of shape (N,) in nats per example.
    """
    from tqdm.auto import tqdm

    if device is None:
        device = module_device(model, guide)
    pair = as_pair(model, guide, plate)
    batches = make_batches(data, batch_size, device, shuffle=False, sparse_rows=sparse_rows)
    n = getattr(batches, "num_examples", None)
    if n is not None and batch_size < n and holds_joint_rows(pair, n):
        # a guide that draws all rows at once (AutoDiscreteParallel's per-row probabilities;
        # a joint autoguide is then refused per-row figures, naming why) sees them all
        batches = make_batches(data, n, device, shuffle=False, sparse_rows=sparse_rows)
    if particles_per_pass is None:
        rows = getattr(batches, "batch_size", None) \
            or getattr(getattr(batches, "loader", None), "batch_size", None) or batch_size
        particles_per_pass = max(1, min(num_samples, 50_000 // max(1, rows)))
    if reduce not in ("logmeanexp", "mean"):
        raise ValueError(f"reduce must be 'logmeanexp' or 'mean', not {reduce!r}")
    out = []
    with eval_mode(model, guide):
        structure = None
        for batch in tqdm(batches, desc="evaluating", unit="batch", leave=False,
                          disable=None if progress is None else not progress):
            if structure is None:
                structure = pair.inspect(batch)
                plate_name = pair.data_plate(batch)
                if structure.point_masses and reduce == "logmeanexp":
                    warn_user(
                        f"the guide's per-row latent(s) {', '.join(structure.point_masses)} "
                        "are point masses (Delta, e.g. AutoDelta): log_likelihood is then "
                        "log p(x_i, z_i) at those points, not an estimate of log p(x_i); use "
                        "a guide with a density (AutoNormal) for log p(x)")
            skip = frozenset(unobserved_leaves(pair, batch) if reduce == "logmeanexp" else ())
            acc = None
            done = 0
            while done < num_samples:
                k = min(particles_per_pass, num_samples - done)
                local, _ = pair_log_weights(pair, batch, k, plate_name,
                                            kind="weights" if reduce == "logmeanexp"
                                            else "elbo", skip=skip)
                if reduce == "logmeanexp":
                    part = local.logsumexp(0)
                    acc = part if acc is None else torch.logaddexp(acc, part)
                else:
                    part = local.sum(0)
                    acc = part if acc is None else acc + part
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
         sparse_rows: bool = False) -> float | torch.Tensor:
    """ELBO per example (nats), averaged over ``num_particles`` draws from the guide.

    The local part only: see the module docstring for how global latents are treated.
    ``sparse_rows``: see :func:`per_example_log_weights`.
    """
    values = per_example_log_weights(model, guide, data, num_particles, batch_size=batch_size,
                                     plate=plate, device=device, reduce="mean", progress=progress,
                                     sparse_rows=sparse_rows)
    return values if per_example else float(values.mean())


def module_device(*objs) -> torch.device:
    """The device of the first parameter of the modules behind ``objs`` (CPU if none)."""
    for m in modules_of(*objs):
        for p in m.parameters():
            return p.device
    return torch.device("cpu")
