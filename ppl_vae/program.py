"""The contract between the engine and a user's Pyro program, written in code.

A model and its guide are called the way their signatures ask:

* a function that names ``size`` and/or ``subsample`` (the library's own families, or any
  program written ``model(x, size=None, subsample=None)`` with
  ``pyro.plate("data", size or len(x), subsample=subsample)``) receives them: ``size`` is
  the number of rows N of the whole dataset, ``subsample`` the minibatch's row indices;
* any other program -- Pyro's examples as written, ``model(x)`` with
  ``pyro.plate("data", len(x))`` -- is called with the data alone. Autoguides (whose
  ``forward(*args, **kwargs)`` passes everything on to the model) follow the model.

Whatever the call, the engine makes the data plate (the plate over rows, found by
:func:`inspect_pair`) mean the whole dataset: a plate opened at the minibatch's length B is
rewritten to full size N and its sites are scaled by N / B (:class:`DataPlate`), so a
minibatch ELBO is an unbiased estimate of the full-data ELBO whether or not the program
subsamples itself. An autoguide built without ``create_plates`` gets the minibatch's rows as
its data plate's subsample, so per-example parameters (AutoNormal's, AutoDelta's) always
pair with their own rows. A model latent site that is masked (``obs_mask``'s
``<name>_unobserved`` site, ``poutine.mask`` around a latent) masks its guide site too
(:class:`MaskGuideLikeModel`).

:func:`inspect_pair` traces the pair once and returns its :class:`Structure` (the data
plate, plate nesting, enumerated sites), refusing pairs that cannot train together -- a
guide site the model lacks, plates that disagree, a joint autoguide over per-example
or masked latents, a model that subsamples its own data plate under per-row autoguide
parameters on minibatches -- with a :class:`SetupError` that names the site and the fix.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import itertools
import re
import sys
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.contrib.easyguide import EasyGuide
from pyro.infer.autoguide import (
    AutoContinuous,
    AutoDiscreteParallel,
    AutoGuide,
    AutoGuideList,
    AutoStructured,
)
from pyro.poutine.guide import GuideMessenger
from pyro.poutine.messenger import Messenger
from pyro.poutine.replay_messenger import ReplayMessenger
from pyro.poutine.runtime import _PYRO_STACK
from pyro.poutine.subsample_messenger import _Subsample
from pyro.poutine.util import prune_subsample_sites

CALL_KEYWORDS = ("size", "subsample")
PARTICLE_PLATE = "_ppl_vae_particles"


class SetupError(ValueError):
    """The model, guide and settings cannot be trained or evaluated together; raised before
    the first step (the CLI prints it as ``error: ...``)."""


_LIBRARIES = {"ppl_vae", "torch", "pyro", "contextlib", "functools"}


def warn_user(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` pointed at the user's line: the first caller outside ppl_vae, torch
    and pyro (whose decorators and handlers sit between the user and the engine)."""
    frame, level = sys._getframe(1), 2
    while frame is not None and \
            frame.f_globals.get("__name__", "").split(".")[0] in _LIBRARIES:
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


def call_keywords(fn: Callable) -> frozenset[str]:
    """Which of ``size`` / ``subsample`` the signature of ``fn`` names (for an nn.Module,
    its ``forward``). A bare ``**kwargs`` names neither."""
    target = fn.forward if isinstance(fn, torch.nn.Module) else fn
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return frozenset()
    return frozenset(k for k in CALL_KEYWORDS if k in params)


def _takes_var_keywords(fn: Callable) -> bool:
    target = fn.forward if isinstance(fn, torch.nn.Module) else fn
    try:
        params = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def modules_of(*fns: Callable | None) -> list[torch.nn.Module]:
    """The nn.Modules behind programs: a module itself, the owner of a bound method
    (``vae.model``), the function wrapped by a :class:`Program`; each once."""
    out: list[torch.nn.Module] = []
    for fn in fns:
        fn = fn.fn if isinstance(fn, Program) else fn
        owner = getattr(fn, "__self__", fn)
        if isinstance(owner, torch.nn.Module) and not any(owner is m for m in out):
            out.append(owner)
    return out


# ---- the data plate --------------------------------------------------------------------------

_CALL: contextvars.ContextVar[tuple | None] = contextvars.ContextVar("ppl_vae_call",
                                                                    default=None)


class DataPlate(Messenger):
    """Make the data plate ``name`` stand for the whole dataset of ``size`` rows.

    A site inside a plate called ``name`` that the program opened over the minibatch's
    ``batch`` rows (``pyro.plate(name, len(x))``, or with its own ``subsample_size`` of them)
    gets its scale multiplied by ``size / batch`` and its plate frame's ``full_size`` set to
    ``size`` -- what ``pyro.plate(name, size, subsample=rows)`` would have given. Sites of a
    plate already opened at full size are left alone.
    """

    def __init__(self, name: str, size: int, batch: int):
        super().__init__()
        self.name, self.size, self.batch = name, int(size), int(batch)

    def _process_message(self, msg) -> None:
        if msg["type"] != "sample" or isinstance(msg["fn"], _Subsample):
            return
        stack = msg["cond_indep_stack"]
        for i, frame in enumerate(stack):
            # opened at the batch's rows (the program may subsample them further itself)
            # a sizeless data plate (pyro.plate("data")) broadcasts: every site in it is per
            # row, whatever its own shape (a latent drawn as Normal(0, 1) there)
            if frame.name == self.name and (frame.size == -1
                                            or frame_rows(frame, msg) == self.batch):
                msg["scale"] = msg["scale"] * (self.size / self.batch)
                if frame.size == -1 and frame.dim is not None:
                    _expand_rows(msg, frame.dim, self.batch)
                frame = frame._replace(size=self.batch if frame.size == -1 else frame.size,
                                       full_size=self.size)
                msg["cond_indep_stack"] = stack[:i] + (frame,) + stack[i + 1:]
                return


class SizelessRows(Messenger):
    """A sizeless data plate (``pyro.plate("data")``, Pyro's SS-VAE example) over a batch of
    all ``rows``: its sites get the rows' length at the plate's dim, as a sized plate gives
    them, so a latent there (an enumerated ``z`` drawn by ``infer_discrete``, a posterior
    predictive draw) is one per row, not one shared by all rows. (On minibatches
    :class:`DataPlate` does the same.)"""

    def __init__(self, name: str, rows: int):
        super().__init__()
        self.name, self.rows = name, int(rows)

    def _process_message(self, msg) -> None:
        if msg["type"] != "sample" or isinstance(msg["fn"], _Subsample):
            return
        for i, frame in enumerate(msg["cond_indep_stack"]):
            if frame.name == self.name and frame.size == -1 and frame.dim is not None:
                _expand_rows(msg, frame.dim, self.rows)
                stack = msg["cond_indep_stack"]
                msg["cond_indep_stack"] = stack[:i] + (frame._replace(size=self.rows),) \
                    + stack[i + 1:]
                return


def _expand_rows(msg, dim: int, rows: int) -> None:
    """Expand a site's distribution to ``rows`` at batch dim ``dim`` where it has 1 there."""
    shape = list(msg["fn"].batch_shape)
    if len(shape) < -dim:
        shape = [1] * (-dim - len(shape)) + shape
    if shape[dim] == 1:
        shape[dim] = rows
        msg["fn"] = msg["fn"].expand(torch.Size(shape))


def frame_rows(frame, site: dict) -> int:
    """A plate frame's length at ``site``; a sizeless plate (``pyro.plate("data")``, as Pyro's
    SS-VAE example writes it: size -1, broadcasting) takes the site's batch length at the
    plate's dim (-1 when the site has none there)."""
    size = frame.full_size or frame.size
    if size == -1 and frame.dim is not None:
        shape = tuple(getattr(site["fn"], "batch_shape", ()))
        size = shape[frame.dim] if len(shape) >= -frame.dim else -1
        value = site.get("value")
        if size in (-1, 1) and torch.is_tensor(value):  # an observation that broadcasts
            events = len(getattr(site["fn"], "event_shape", ()))
            batch = tuple(value.shape[:value.dim() - events])
            size = batch[frame.dim] if len(batch) >= -frame.dim else size
    return size


class SharedPlates(Messenger):
    """Let one call open a plate of the same name and size more than once (an AutoGuideList
    whose parts each open the data plate, two ``with pyro.plate("data", n)`` blocks): the
    later ones reuse the first one's rows and record no second subsample site."""

    def __enter__(self):
        self.seen: dict[str, dict] = {}
        return super().__enter__()

    def _process_message(self, msg) -> None:
        if msg["type"] != "sample" or not isinstance(msg["fn"], _Subsample):
            return
        first = self.seen.get(msg["name"])
        if first is None:
            self.seen[msg["name"]] = msg
            return
        rows = first["value"]
        if rows is None or msg["value"] is not None:
            return
        same = (first["fn"].size, first["fn"].subsample_size) == (msg["fn"].size,
                                                                  msg["fn"].subsample_size)
        # or the later plate was opened at the minibatch's length (the data plate of a part
        # that does not subsample): it stands for the same rows
        at_batch = msg["fn"].size == len(rows) and msg["fn"].subsample_size in (None, len(rows))
        if same or at_batch:
            msg["value"] = rows
            msg["stop"] = True  # outer handlers (the trace) never see the repeat

    def _postprocess_message(self, msg) -> None:
        pass


class MaskGuideLikeModel(Messenger):
    """Give a guide site the mask of the model site it stands for.

    A model latent site with a mask -- ``pyro.sample(name, d, obs=x, obs_mask=m)`` adds the
    latent ``<name>_unobserved`` masked to the missing entries; ``poutine.mask`` around a
    latent -- has no log p at its masked-out entries, so the guide's log q there must not
    count either: else the ELBO rewards the guide's entropy at those entries without bound
    (an AutoNormal's scales at the observed entries grow every step, and importance weights
    are wrong; Pyro's autoguides do not mask, pyro-ppl/pyro#2772). Run around the model
    while it replays a guide's trace (every ELBO, ``log_likelihood``), this copies each
    masked latent's mask to the guide's node of the same name, and to AutoNormal's auxiliary
    ``<name>_unconstrained`` node that carries its log q, when they have none, before the
    guide trace is scored."""

    def _postprocess_message(self, msg) -> None:
        mask, name = msg["mask"], msg["name"]
        if msg["type"] != "sample" or msg["is_observed"] or mask is None or mask is True:
            return
        for handler in reversed(_PYRO_STACK):  # innermost first
            if isinstance(handler, ReplayMessenger) and handler.trace is not None \
                    and name in handler.trace.nodes:
                for key in (name, name + "_unconstrained"):
                    node = handler.trace.nodes.get(key)
                    if node is not None and node["type"] == "sample" \
                            and node.get("mask") is None and (key == name or node.get(
                                "infer", {}).get("is_auxiliary")):
                        node["mask"] = mask
                return


def reset_autoguide_plates(guide: Callable) -> None:
    """Leave an autoguide's plates at their full size after the engine's minibatches: the
    parts of an AutoGuideList read their list's plates of its last call, so ``median()``
    of a part would give the last minibatch's rows."""
    if isinstance(guide, AutoGuide) and guide.prototype_trace is not None \
            and getattr(guide, "master", None) is None \
            and isinstance(guide.create_plates, EnginePlates):  # (not a user's create_plates)
        guide._create_plates()


class EnginePlates:
    """``create_plates`` the engine gives an autoguide built without one: inside an engine
    call on a minibatch, the data plate subsampled at the minibatch's rows, when the guide
    has per-row sites there; elsewhere (``guide.median()``, Predictive) nothing, so the
    autoguide's own plates apply."""

    def __init__(self, guide: AutoGuide):
        self.guide = weakref.ref(guide)

    def __call__(self, *args, **kwargs) -> list:
        call, guide = _CALL.get(), self.guide()
        if call is None or guide is None or guide.prototype_trace is None:
            return []
        plate, dim, size, subsample = call
        if plate is None or size is None or subsample is None or len(subsample) == size:
            return []
        if not any(f.name == plate for _, site in prototype_latents(guide)
                   for f in site["cond_indep_stack"]):
            return []  # no per-row sites: the guide opens no data plate
        return [pyro.plate(plate, size, subsample=subsample, dim=dim)]


class Program:
    """A model or guide called the engine's way: ``program(*args, size=N, subsample=idx,
    **kwargs)`` calls ``fn`` with the keywords its signature names and the data plate made
    to mean the whole dataset (module docstring)."""

    def __init__(self, fn: Callable, keywords: frozenset[str], pair: Pair,
                 is_model: bool = False):
        self.fn = fn
        self.keywords = keywords
        self.pair = pair
        self.is_model = is_model

    def __call__(self, *args, size: int | None = None, subsample: torch.Tensor | None = None,
                 **kwargs):
        extra = {}
        if "size" in self.keywords:
            extra["size"] = size
        if "subsample" in self.keywords:
            extra["subsample"] = subsample
        pair = self.pair
        token = _CALL.set((pair.plate, pair.plate_dim, size, subsample))
        try:
            with SharedPlates(), MaskGuideLikeModel() if self.is_model \
                    else contextlib.nullcontext():
                if pair.plate is not None and size is not None and subsample is not None \
                        and len(subsample) != size:
                    with DataPlate(pair.plate, size, len(subsample)):
                        return self.fn(*args, **extra, **kwargs)
                if pair.plate is not None and subsample is not None:  # all rows at once
                    with SizelessRows(pair.plate, len(subsample)):
                        return self.fn(*args, **extra, **kwargs)
                return self.fn(*args, **extra, **kwargs)
        finally:
            _CALL.reset(token)

    def __repr__(self) -> str:
        return f"Program({self.fn!r}, keywords={sorted(self.keywords)})"


@dataclass
class Structure:
    """What one trace of a pair on a minibatch shows.

    ``plate``: the data plate's name (None: no plate runs over rows -- only for full-batch
    training); ``nesting``: plate dims used (Pyro's ``max_plate_nesting``, the particle
    plate excluded); ``enumerated``: sites marked for parallel enumeration (model or
    guide); ``local_latents``: latent sites of the guide inside the data plate;
    ``guide_enumerated``: the guide's sites marked for parallel enumeration;
    ``model_enumerated``: the model's, of latents the guide does not sample;
    ``unreparameterized``: guide latents without ``rsample`` (discrete ones, enumerated or
    not); ``sequential``: sequential plates around observed sites; ``latents``: the model's
    latent sites; ``own_subsample``: the subsample size of a
    model that subsamples its data plate itself (None if it does not); ``point_masses``:
    per-row guide latents drawn from a Delta (AutoDelta's MAP values); ``joint_rows``:
    per-row guide latents whose values the guide computes from one draw outside the data
    plate (AutoStructured, an easyguide group, an AutoContinuous: log q does not split by
    rows); ``row_plates``: plates of the batch's length around observed sites, {plate:
    sites}.
    """

    plate: str | None
    nesting: int
    enumerated: list[str] = field(default_factory=list)
    local_latents: list[str] = field(default_factory=list)
    guide_enumerated: list[str] = field(default_factory=list)
    model_enumerated: list[str] = field(default_factory=list)
    unreparameterized: list[str] = field(default_factory=list)
    latents: list[str] = field(default_factory=list)
    own_subsample: int | None = None
    point_masses: list[str] = field(default_factory=list)
    sequential: list[str] = field(default_factory=list)
    joint_rows: list[str] = field(default_factory=list)
    row_plates: dict[str, list[str]] = field(default_factory=dict)
    baselines: list[str] = field(default_factory=list)  # guide sites asking for a baseline


class Pair:
    """A model and its guide as the engine calls them (``pair.model``, ``pair.guide``:
    :class:`Program`), with the structure found on the first batch (:meth:`inspect`)."""

    def __init__(self, model: Callable, guide: Callable | None, plate: str | None = None):
        model = model.fn if isinstance(model, Program) else model
        guide = guide.fn if isinstance(guide, Program) else guide
        if isinstance(poutine.unwrap(guide), GuideMessenger):
            raise SetupError(
                f"{type(guide).__name__} is an effect-based guide (a GuideMessenger: it runs "
                "the model itself, so the engine cannot scale the data plate or evaluate it "
                "by importance sampling); use the AutoGuide of the same family instead, "
                "e.g. AutoNormal for AutoNormalMessenger, AutoLowRankMultivariateNormal or "
                "AutoIAFNormal for AutoRegressiveMessenger")
        self.raw_model, self.raw_guide = model, guide
        self.plate = plate
        self.plate_dim: int | None = None
        self.structure: Structure | None = None
        self.vectorizable: bool | None = None  # broadcasts over a leading particle dim?
        model_keys = call_keywords(model)
        guide_keys = frozenset()
        if guide is not None:
            guide_keys = call_keywords(guide)
            if not guide_keys and _takes_var_keywords(guide):
                guide_keys = model_keys  # an autoguide passes its call on to the model
        self.model = Program(model, model_keys, self, is_model=True)
        self.guide = Program(guide, guide_keys, self) if guide is not None else None
        self.model_subsamples = "subsample" in model_keys
        if isinstance(guide, AutoGuide) and getattr(guide, "master", None) is None \
                and guide.create_plates is None:
            # Pyro's advice for subsampling with autoguides is create_plates=; the engine
            # gives the one that opens the data plate at the minibatch's rows.
            guide.create_plates = EnginePlates(guide)

    @property
    def modules(self) -> list[torch.nn.Module]:
        return modules_of(self.raw_model, self.raw_guide)

    def inspect(self, batch, check: bool = True) -> Structure:
        """Trace the pair once on ``batch`` and keep its :class:`Structure`."""
        if self.structure is None:
            self.structure = inspect_pair(self, batch, check=check)
        return self.structure

    def data_plate(self, batch) -> str:
        """The name of the plate over the rows of the data; an error if there is none (a
        per-example figure needs one)."""
        plate = self.inspect(batch).plate
        if plate is None:
            split = self.structure.row_plates
            if len(split) > 1:
                where = "; ".join(f"{', '.join(map(repr, sites))} in plate {name!r}"
                                  for name, sites in split.items())
                raise SetupError(
                    f"the observations sit in different plates of the data's {len(batch)} "
                    f"rows ({where}); put every per-row observation inside one "
                    "`with pyro.plate(\"data\", len(x)):` (plate=NAME is for observations "
                    "made once for the whole dataset, which are not per-row)")
            raise SetupError(
                "could not tell which plate runs over the rows of the data: no plate of "
                f"length {len(batch)} surrounds every observed site; wrap the observations "
                "in `with pyro.plate(\"data\", len(x)):` or pass plate=NAME"
                + _sequential_note(self.structure.sequential))
        return plate


def _sequential_note(names: list[str]) -> str:
    """What to say when the rows sit in a sequential plate (``for i in pyro.plate(...)``)."""
    if not names:
        return ""
    return (f"; plate {names[0]!r} is sequential (`for i in pyro.plate(...)`: a site per row), "
            "and the engine needs the rows in one vectorized plate: `with pyro.plate("
            f"{names[0]!r}, len(x)):` around one site for all rows")


def records_value(site: dict) -> bool:
    """A site that records a value, not an observation: ``pyro.deterministic``, or a latent
    ``poutine.reparam`` replaced by its value (an observed ``Delta(...).mask(False)``)."""
    fn = site["fn"]
    return bool(site["infer"].get("_deterministic")) or (
        isinstance(fn, dist.MaskedDistribution) and fn._mask is False)


def observes(site: dict) -> bool:
    """Whether a trace site is an observation (obs=, pyro.factor), not a recorded value."""
    return site["type"] == "sample" and site["is_observed"] and not records_value(site)


def _sequential_plates(model_trace) -> list[str]:
    """Sequential plates (``for i in pyro.plate(...)``) around observed sites."""
    return sorted({f.name for s in model_trace.nodes.values() if observes(s)
                   for f in s["cond_indep_stack"] if not f.vectorized})


def _vectorized_frames(site: dict) -> list:
    return [f for f in site["cond_indep_stack"] if f.vectorized and f.name != PARTICLE_PLATE]


def _check_observed_shapes(model_trace) -> None:
    """An observed value whose shape does not broadcast with its distribution's (Pyro finds
    out only when scoring it, with a bare shape error), or broadcasts to a shape larger
    than both (a (N, 1) value against a (N,) distribution scores every row against every
    other: Pyro's validation refuses it, unvalidated training does not)."""
    for name, site in model_trace.nodes.items():
        if observes(site) and torch.is_tensor(site["value"]) and hasattr(site["fn"], "shape"):
            value, shape = tuple(site["value"].shape), tuple(site["fn"].shape())
            try:
                joint = tuple(torch.broadcast_shapes(value, shape))
            except RuntimeError as e:
                raise ValueError(f"observed site {name!r}: its value of shape {value} does not "
                                 f"fit its distribution's shape {shape}") from e
            if joint not in (value, shape):
                raise ValueError(
                    f"observed site {name!r}: its value of shape {value} and its "
                    f"distribution's shape {shape} broadcast to {joint}, which scores every "
                    "value against every distribution; give the value the distribution's "
                    "shape (e.g. y.squeeze(-1) or y.reshape(-1))")


def _prior_trace(pair: Pair, batch):
    """The model alone (its own plates and draws); a latent it cannot draw (ImproperUniform,
    for AutoDelta with init_to_value) takes the guide's value instead."""
    with poutine.block(), torch.no_grad():
        try:
            return poutine.trace(batch.call).get_trace(pair.model)
        except NotImplementedError:
            guide_trace = poutine.trace(batch.call).get_trace(pair.guide)
            return poutine.trace(poutine.replay(batch.call, trace=guide_trace)).get_trace(
                pair.model)


def _traces(pair: Pair, batch) -> tuple:
    with poutine.block(), torch.no_grad():
        guide_trace = poutine.trace(batch.call).get_trace(pair.guide)
        model_trace = poutine.trace(
            poutine.replay(batch.call, trace=guide_trace)).get_trace(pair.model)
    return model_trace, guide_trace


def _find_plate(model_trace, n: int, b: int, data: tuple = ()) -> tuple[str | None, int | None]:
    """The plate around every observed site that runs over the dataset's rows: opened at
    full size n with b rows, or (a program that does not subsample) at the batch's b rows.
    Where several plates have b rows (a square students x items matrix, full batch), the
    one over the first axis of observed values that are the batch's own tensors (``obs=Y``
    for data Y: its rows are the rows) decides; without such a site the caller must name it.
    """
    observed = [s for s in model_trace.nodes.values() if observes(s)]
    if not observed:
        return None, None
    by_rows = _plate_of_first_axis(observed, data, b)
    full, local = None, None
    for site in observed:
        frames = _vectorized_frames(site)
        f = {fr.name: fr.dim for fr in frames if (fr.full_size or fr.size) == n and fr.size == b}
        g = {fr.name: fr.dim for fr in frames if frame_rows(fr, site) == b}
        full = f if full is None else {k: v for k, v in full.items() if k in f}
        local = g if local is None else {k: v for k, v in local.items() if k in g}
    for candidates in (full, local):
        if len(candidates) == 1:
            name, dim = next(iter(candidates.items()))
            subsampled = candidates is full and n > b  # opened at n rows, b of them drawn
            others = sorted({fr.name for site in observed for fr in _vectorized_frames(site)
                             if fr.name != name and frame_rows(fr, site) == b})
            if others and not subsampled and by_rows != name:
                raise SetupError(
                    f"plates {name!r} and {others[0]!r} both have the batch's {b} rows; say "
                    "which runs over the rows of the data with plate=NAME (or use a batch "
                    "size that differs from the other plate's length)")
            return name, dim
        if len(candidates) > 1:
            if by_rows in candidates:
                return by_rows, candidates[by_rows]
            raise SetupError(
                f"several plates of length {b} surround every observed site "
                f"({', '.join(sorted(candidates))}); say which runs over the rows of the data "
                "with plate=NAME")
    return None, None


def _plate_of_first_axis(observed: list, data: tuple, b: int) -> str | None:
    """The plate over the first axis of the observed values that are tensors of the batch
    itself (the same objects: their first axis is the data's rows), when all such sites
    agree on one; None otherwise."""
    found = set()
    for site in observed:
        value = site["value"]
        if not any(value is t for t in data) or value.dim() == 0 or value.shape[0] != b:
            continue
        dim = site["fn"].event_dim - value.dim()
        found.add(next((fr.name for fr in _vectorized_frames(site) if fr.dim == dim), None))
    return found.pop() if len(found) == 1 else None


def _check_observes(model_trace) -> None:
    """A model that observes nothing with this data (``model(x, y=None)`` given x alone)
    has no likelihood to train or score."""
    if not any(observes(s) for s in model_trace.nodes.values()):
        latents = [k for k, s in prune_subsample_sites(model_trace).nodes.items()
                   if s["type"] == "sample"]
        raise SetupError(
            "the model observes nothing with this data: no pyro.sample(..., obs=...) got a "
            f"value (its sample sites: {', '.join(map(repr, latents)) or 'none'}); a "
            "model(x, y=None) needs y in the data, e.g. (x, y) or {'x': x, 'y': y} "
            "(to predict y for new x: pyro.infer.Predictive(model, guide=guide, "
            "num_samples=100)(x))")


def _check_rows_outside(structure: Structure, model_sites: dict, n: int, b: int) -> None:
    """Warn of observations in another plate of the batch's length than the data plate, and
    not inside the data plate: per-row data put outside it (``plate=`` given for two plates
    over the rows) would be scaled as if observed once and left out of per-row figures. (A
    plate of side observations whose size equals the batch's by chance looks the same:
    hence a warning.)"""
    plate = structure.plate
    if plate is None:
        return
    others = {k: [s for s in v if not any(f.name == plate
                                           for f in _vectorized_frames(model_sites[s]))]
              for k, v in structure.row_plates.items() if k != plate}
    others = {k: v for k, v in others.items() if v}
    if not others:
        return
    name, sites = next(iter(others.items()))
    warn_user(
        f"observed site(s) {', '.join(map(repr, sites))} lie in plate {name!r} of the same "
        f"{b} rows as {'the minibatch of ' if b < n else ''}the data plate {plate!r}, outside "
        "it: they count as observed once for the whole dataset (not scaled to it on "
        "minibatches, and left out of per-row figures: log_likelihood, elbo, LOO); if they "
        f"are per row, put them inside plate {plate!r}")


def _plates_of_rows(model_sites: dict, b: int) -> dict[str, list[str]]:
    """Plates of the batch's length b around some (not all) observed sites: {name: sites}."""
    found: dict[str, list[str]] = {}
    for name, site in model_sites.items():
        if observes(site):
            for fr in _vectorized_frames(site):
                if frame_rows(fr, site) == b:
                    found.setdefault(fr.name, []).append(name)
    return found


def calling_error(error: TypeError) -> SetupError:
    """The SetupError for a model or guide that its data's form cannot call."""
    return SetupError(f"calling the model or guide with the data failed: {error}. The engine "
                      "calls model(*data) for a tensor or tuple and model(**data) for a "
                      "dict; size= and subsample= only if the signature names them")


def inspect_pair(pair: Pair, batch, check: bool = True) -> Structure:
    """One blocked trace of guide and model on ``batch``: the data plate, plate nesting,
    enumerated sites, and (``check=True``) the checks Pyro's validation would make, as
    :class:`SetupError` before any training step (module docstring)."""
    n, b = batch.size, len(batch)
    try:
        try:
            prior_trace = _prior_trace(pair, batch)
            if check:
                _check_observed_shapes(prior_trace)
        except (ValueError, RuntimeError, IndexError, AssertionError) as e:
            # a minibatch failure names the full size, or is the model's own shape assert
            if b >= n or not (isinstance(e, AssertionError) or re.search(rf"\b{n}\b", str(e))):
                raise
            first = (str(e).splitlines() or [""])[0][:200]
            raise SetupError(
                f"the model failed on a minibatch of {b} of {n} rows ({type(e).__name__}: "
                f"{first}); the rows of the data are its first axis, and data the model reads "
                "from elsewhere than "
                "its arguments (a tensor in pyro.condition(model, data=...), a global or a "
                "closure) is not cut into minibatches, nor is a plate sized by a fixed number "
                "(pyro.plate('data', N)): pass the data in the arguments (e.g. (x, y) for "
                "model(x, y)) and size the plate by them (len(x)), or use one batch of all "
                f"rows (batch_size >= {n})") from e
        if pair.plate is None:  # the guide's plates follow from the model's
            pair.plate, pair.plate_dim = _find_plate(
                prior_trace, n, b, (*batch.args, *batch.kwargs.values()))
        own = _own_subsample(prior_trace, pair.plate)
        if check:
            _check_observes(prior_trace)
            _check_joint_autoguide(pair, n, b)
            _check_own_subsampling(pair, own, n, b)
        try:
            model_trace, guide_trace = _traces(pair, batch)
        except (RuntimeError, ValueError, IndexError) as e:
            if check:  # the model failed on the guide's values: say which site and why
                _explain_failed_replay(pair, batch, prior_trace, e)
            raise
    except TypeError as e:
        raise calling_error(e) from e
    if pair.plate is not None:
        dims = {f.name: f.dim for s in model_trace.nodes.values() if s["type"] == "sample"
                for f in _vectorized_frames(s)}
        if pair.plate not in dims:
            sequential = _sequential_plates(model_trace)
            raise SetupError(f"plate={pair.plate!r} is not a vectorized plate of the model "
                             f"(its vectorized plates: {sorted(dims) or 'none'})"
                             + _sequential_note([k for k in sequential if k == pair.plate]))
        pair.plate_dim = dims[pair.plate]
    plate = pair.plate
    nesting = 0
    enumerated: list[str] = []
    for trace in (guide_trace, model_trace):
        for name, site in prune_subsample_sites(trace).nodes.items():
            if site["type"] != "sample":
                continue
            for f in _vectorized_frames(site):
                if f.dim is not None:
                    nesting = max(nesting, -f.dim)
            if site["infer"].get("enumerate") == "parallel" and name not in enumerated:
                enumerated.append(name)
    guide_latents = {name: site for name, site in prune_subsample_sites(guide_trace).nodes.items()
                     if site["type"] == "sample" and not site["is_observed"]
                     and not site["infer"].get("is_auxiliary")}
    local = [k for k, s in guide_latents.items()
             if any(f.name == plate for f in _vectorized_frames(s))]
    parallel = [k for k in enumerated if k in guide_latents]
    model_only = [k for k in enumerated if k not in guide_latents and k in model_trace.nodes
                  and not model_trace.nodes[k]["is_observed"]]
    discrete = [k for k, s in guide_latents.items() if not s["fn"].has_rsample]
    latents = [k for k, s in prune_subsample_sites(model_trace).nodes.items()
               if s["type"] == "sample" and not s["is_observed"]]
    # a Delta backed by an auxiliary draw (AutoNormal's <name>_unconstrained, an
    # AutoContinuous's joint latent) is a density's value, not a point mass (AutoDelta)
    auxiliary = [k for k, s in guide_trace.nodes.items() if s["type"] == "sample"
                 and s["infer"].get("is_auxiliary")]
    deltas = [k for k in local if is_delta(guide_latents[k]["fn"])
              and f"{k}_unconstrained" not in auxiliary]
    joint, deltas = _split_deltas(pair, batch, guide_trace, plate, deltas)
    structure = Structure(plate, nesting, enumerated, local, parallel, model_only, discrete,
                          latents, own.subsample_size if own is not None else None, deltas,
                          _sequential_plates(model_trace), joint,
                          _plates_of_rows(dict(prune_subsample_sites(model_trace).nodes), b),
                          [k for k in discrete if guide_latents[k]["infer"].get("baseline")])
    if check:
        _check_pair(pair, model_trace, guide_trace, prior_trace, guide_latents, structure, n, b)
    return structure


def _check_pair(pair: Pair, model_trace, guide_trace, prior_trace, guide_latents: dict,
                structure: Structure, n: int, b: int) -> None:
    model_sites = {name: site for name, site in prune_subsample_sites(model_trace).nodes.items()
                   if site["type"] == "sample"}
    model_latents = set(structure.latents)
    stray = [k for k in guide_latents if k not in model_sites]
    if stray:
        raise SetupError(
            f"guide site {stray[0]!r} is not a sample site of the model (model latent sites: "
            f"{', '.join(sorted(model_latents)) or 'none'}); name the guide's "
            f"pyro.sample({stray[0]!r}, ...) after the model site it approximates")
    observed_in_guide = [k for k in guide_latents if model_sites[k]["is_observed"]]
    if observed_in_guide:
        raise SetupError(f"guide samples {observed_in_guide[0]!r}, which the model observes")
    sequential = [k for k in model_latents if k not in guide_latents
                  and model_sites[k]["infer"].get("enumerate") == "sequential"]
    if sequential:
        raise SetupError(
            f"model site {sequential[0]!r} is marked for sequential enumeration, which Pyro "
            "implements in the guide only; mark it parallel (config_enumerate, "
            "infer={'enumerate': 'parallel'}) and train with objective='enum'")
    missing = [k for k in model_latents if k not in guide_latents
               and model_sites[k]["infer"].get("enumerate") != "parallel"
               and not model_sites[k]["infer"].get("_deterministic")]
    if missing:
        warn_user(
            f"model latent site(s) {', '.join(sorted(missing))} are not in the guide: they are "
            "drawn from the prior at every step (mark discrete ones with config_enumerate and "
            "use objective='enum', or add them to the guide)")
    for name, site in guide_latents.items():
        alone = prior_trace.nodes.get(name, model_sites[name])  # plates not replayed
        g = {f.name: f.size for f in _vectorized_frames(site)}
        m = {f.name: f.size for f in _vectorized_frames(alone)}
        # a guide that subsamples a plate itself (Pyro's examples/lda.py) hands the model its
        # rows by replay: then the plates' full sizes agree
        g_full = {f.name: f.full_size or f.size for f in _vectorized_frames(site)}
        m_full = {f.name: f.full_size or f.size for f in _vectorized_frames(alone)}
        if g.keys() != m.keys() or any(g[k] != m[k] and g_full[k] != m_full[k]
                                       and -1 not in (g[k], m[k]) for k in g):
            plate = structure.plate
            if plate in g and plate in m and g[plate] != m[plate] \
                    and name in per_row_autoguide_sites(pair):
                raise SetupError(
                    f"the guide keeps one parameter per training row for {name!r} "
                    f"({g[plate]} rows), but this data has {m[plate]}: an autoguide's per-row "
                    "parameters belong to the rows it was first set up on, in their order; "
                    "to train on this data build a new guide (e.g. AutoNormal(model)), and "
                    "to score new rows use an amortized guide for the per-row latents "
                    "(ppl_vae.guides.amortized.AmortizedNormal)")

            def show(d: dict) -> str:
                return ", ".join(f"{k!r} (size {v})" for k, v in d.items()) or "no plate"
            raise SetupError(
                f"site {name!r}: the guide samples it in {show(g)} but the model in {show(m)}; "
                "open the same plates, with the same names and sizes, in both")
        _check_shapes(name, model_sites[name], site, structure.nesting)
        if site["infer"].get("_enumerate_dim") is None:
            _check_guide_support(name, model_sites[name], site)
    masked = [k for k in model_latents
              if model_sites[k]["mask"] is not None and model_sites[k]["mask"] is not True]
    for part in _autoguide_parts(pair.raw_guide):
        joint = [k for k in masked if isinstance(part, (AutoContinuous, AutoStructured))
                 and k in dict(prototype_latents(part))]
        if joint:
            raise SetupError(
                f"model site {joint[0]!r} is masked (obs_mask or poutine.mask), but "
                f"{type(part).__name__} keeps one joint distribution over all its entries, "
                "masked ones included, whose entropy the ELBO would then reward without "
                "bound; use AutoNormal or AutoDelta for it (they are masked like the model)")
    _check_support(prior_trace)
    _check_rows_outside(structure, model_sites, n, b)
    if b >= n:
        return
    plate = structure.plate
    if plate is None:
        observed = [repr(k) for k, s in model_sites.items() if observes(s)]
        inside = _plates_of_rows(model_sites, b)
        if inside:  # some observations are in a plate over the rows, others outside it
            name, sites = next(iter(inside.items()))
            outside = [repr(k) for k, s in model_sites.items() if observes(s)
                       and k not in sites]
            raise SetupError(
                f"on minibatches of {b} of {n} rows: plate {name!r} runs over the "
                f"rows of {', '.join(map(repr, sites))}, but observed site(s) "
                f"{', '.join(outside)} lie outside it; if they are observed once for the "
                f"whole dataset (not per row), pass plate={name!r} (they are then not "
                "scaled); if per row, put them inside that plate")
        raise SetupError(
            f"on minibatches of {b} of {n} rows, but the observed site(s) "
            f"{', '.join(observed)} are not inside a plate over the rows, so the engine "
            "cannot scale them to the dataset; wrap them in `with pyro.plate(\"data\", "
            "len(x)):` (or train full-batch: batch_size >= number of rows)"
            + _sequential_note(structure.sequential))
    guide = pair.raw_guide
    if structure.local_latents and not pair.model_subsamples:
        for part in _autoguide_parts(guide):
            if isinstance(part, AutoGuide) and part.prototype_trace is not None:
                frame = next((f for _, s in prototype_latents(part)
                              for f in s["cond_indep_stack"] if f.name == plate), None)
                if frame is not None and (frame.full_size or frame.size) != n:
                    raise SetupError(
                        f"{type(part).__name__} holds one value per row of a "
                        f"{frame.full_size or frame.size}-row call of the model, but the "
                        f"data has {n} rows: build the guide anew before fit (or train "
                        f"full-batch: batch_size >= {n})")
    if structure.local_latents and "subsample" not in pair.guide.keywords \
            and not isinstance(guide, AutoGuide):
        per_row = [name for name, site in guide_trace.nodes.items()
                   if site["type"] == "param" and "$$$" not in name
                   and (b in tuple(site["value"].shape) or n in tuple(site["value"].shape))
                   and not any(site["value"].unconstrained() is p if
                               hasattr(site["value"], "unconstrained") else site["value"] is p
                               for m in pair.modules for p in m.parameters())]
        if per_row:
            raise SetupError(
                f"guide parameter {per_row[0]!r} has one entry per row (of the minibatch, "
                f"{b}, or of the data, {n}), but the guide is not told which rows it gets: "
                "add a subsample "
                "argument, guide(x, subsample=None), and open its plate as "
                f"pyro.plate({plate!r}, {n}, subsample=subsample) (or train full-batch: "
                f"batch_size >= {n})")


def _explain_failed_replay(pair: Pair, batch, prior_trace, error: Exception) -> None:
    """A model that ran on its own but failed on the guide's values: raise a SetupError
    naming the guide site whose value has another shape than the model's own draw, or lies
    outside the model site's support (nothing found: the caller re-raises ``error``)."""
    with poutine.block(), torch.no_grad():
        guide_trace = poutine.trace(batch.call).get_trace(pair.guide)
    for name, site in guide_trace.nodes.items():
        alone = prior_trace.nodes.get(name)
        if site["type"] != "sample" or site["is_observed"] or alone is None \
                or alone["is_observed"] or not torch.is_tensor(site["value"]):
            continue
        if tuple(site["value"].shape) != tuple(alone["value"].shape):
            raise SetupError(
                f"site {name!r}: the guide draws values of shape {tuple(site['value'].shape)}"
                f" but the model's own draws have shape {tuple(alone['value'].shape)}, and the "
                f"model failed on the guide's ({type(error).__name__}: "
                f"{str(error).splitlines()[0][:150]}); give the guide the model's latent size "
                "and its rows the dim of the model's plate (an amortized guide's plate_dim=)"
            ) from error
        _check_guide_support(name, alone, site, error)


def _check_guide_support(name: str, model_site: dict, guide_site: dict,
                         error: Exception | None = None) -> None:
    """Refuse a guide whose draw at a latent site lies outside the model site's support
    (a Normal guide on a Gamma or Dirichlet latent): the model's log-density is then NaN
    or an error, whatever the learning rate."""
    try:
        support = model_site["fn"].support
        inside = bool(support.check(guide_site["value"]).all())
    except (NotImplementedError, AttributeError, RuntimeError, ValueError):
        return
    if not inside:
        raise SetupError(
            f"site {name!r}: the guide draws values outside the model's support ({support}) "
            f"of {type(model_site['fn']).__name__}; give the guide a distribution on that "
            "support (AutoNormal transforms to it; a hand-written guide: LogNormal/Gamma for "
            "positive values, Dirichlet for a simplex)") from error


def _check_shapes(name: str, model_site: dict, guide_site: dict, nesting: int) -> None:
    """The shape check of Pyro's validation (``check_model_guide_match``), which the engine's
    training steps run without: the guide's distribution at a site must have the model's
    shape within the plates (dims left of them may broadcast). E.g. an amortized guide whose
    rows are not at the plate's dim gives (B, B, D) where the model has (B, 1, D)."""
    if model_site["infer"].get("_enumerate_dim") is not None:
        return
    try:
        shapes = [tuple(s["fn"].batch_shape) + tuple(s["fn"].event_shape)
                  for s in (model_site, guide_site)]
        event_dims = [len(s["fn"].event_shape) for s in (model_site, guide_site)]
    except (AttributeError, NotImplementedError):
        return
    model_shape, guide_shape = (shape[max(len(shape) - nesting - e, 0):]
                                for shape, e in zip(shapes, event_dims))
    for m, g in itertools.zip_longest(reversed(model_shape), reversed(guide_shape),
                                      fillvalue=1):
        if m != g:
            raise SetupError(
                f"site {name!r}: the guide's distribution has shape {tuple(shapes[1])} but "
                f"the model's has {tuple(shapes[0])}; give the guide's rows the dim of the "
                "model's plate (an amortized guide's plate_dim=) and the same event shape")


def _check_joint_autoguide(pair: Pair, n: int, b: int) -> None:
    """Refuse an AutoContinuous guide (one joint distribution over every latent) whose
    latents include per-row ones, on minibatches: it cannot be subsampled."""
    plate = pair.plate
    if b >= n or plate is None:
        return
    discrete = _discrete_rows(pair, plate)
    rows = set(discrete.values())
    if discrete and rows != {n}:
        raise SetupError(
            f"AutoDiscreteParallel keeps one probability vector per row for "
            f"{', '.join(discrete)}, of the {', '.join(map(str, sorted(rows)))} rows it was set "
            f"up on, and this data has {n}: to train on this data build a new guide; to score "
            "new rows leave the discrete site out of the guide and sum it out "
            "(config_enumerate the model, objective='enum')")
    if discrete:
        raise SetupError(
            f"AutoDiscreteParallel keeps one probability vector per row of the data for "
            f"{', '.join(discrete)} (plate {plate!r}) and cannot be subsampled (in Pyro "
            f"either), so not on minibatches of {b} of {n} rows: train it full-batch "
            f"(batch_size >= {n}; elbo, log_likelihood and to_arviz take all rows at once "
            "for it), or leave the discrete site out of the guide and sum it out "
            "(config_enumerate the model, objective='enum')")
    joint = _joint_over_rows(pair, plate)
    if joint:
        kind, local = joint
        raise SetupError(
            f"{kind} keeps one joint distribution over all latents, including the per-row "
            f"latent(s) {', '.join(local)} of plate {plate!r}, so it cannot be trained or "
            f"evaluated on minibatches of {b} of {n} rows (nor give per-row figures: elbo, "
            "log_likelihood, k-hat); use AutoNormal / AutoDelta for the per-row latents, or "
            f"train full-batch (batch_size >= {n})")


def _discrete_rows(pair: Pair, plate: str | None) -> dict[str, int]:
    """Sites of ``plate`` that an AutoDiscreteParallel part of the guide keeps per-row
    probabilities for (a parameter of the dataset's size, never sliced to a minibatch),
    with the number of rows it was set up on: {site: rows}."""
    return {name: f.full_size or f.size for part in _autoguide_parts(pair.raw_guide)
            if isinstance(part, AutoDiscreteParallel)
            for name, s in prototype_latents(part)
            for f in s["cond_indep_stack"] if f.name == plate}


def _joint_over_rows(pair: Pair, plate: str | None) -> tuple[str, list[str]] | None:
    """The first AutoContinuous or AutoStructured part of the guide (one joint distribution
    over all its latents) that holds latents of ``plate``: (its class name, those latents);
    None if none."""
    for part in _autoguide_parts(pair.raw_guide):
        if not isinstance(part, (AutoContinuous, AutoStructured)):
            continue
        local = [name for name, s in prototype_latents(part)
                 if any(f.name == plate for f in s["cond_indep_stack"])]
        if local:
            return type(part).__name__, local
    return None


def unobserved_leaves(pair: Pair, batch) -> list[str]:
    """obs_mask's ``<name>_unobserved`` latents that no other model site reads on ``batch``,
    with the guide sites that draw them (the site, and AutoNormal's
    ``<name>_unobserved_unconstrained`` behind its Delta): the model replayed with the leaf
    moved (every other latent held) scores every other site the same. Integrating such a
    leaf out of p(x, z) leaves p(x_observed, z), so log_likelihood drops its p and q terms
    from the importance weight (they only add noise). Found batch by batch: on a batch
    without missing entries nothing reads the leaf (and its terms are masked out anyway)."""
    if not any(k.endswith("_unobserved") for k in pair.inspect(batch).latents):
        return []
    model_trace, guide_trace = _traces(pair, batch)
    nodes, guide = model_trace.nodes, guide_trace.nodes
    candidates = [k for k in nodes if k.endswith("_unobserved") and k in guide
                  and f"{k[:-len('_unobserved')]}_observed" in nodes
                  and guide[k]["type"] == "sample" and not guide[k]["is_observed"]
                  and guide[k]["infer"].get("_enumerate_dim") is None
                  and nodes[k]["value"].is_floating_point()
                  and (not is_delta(guide[k]["fn"]) or f"{k}_unconstrained" in guide)]
    leaves = []
    for name in candidates:
        moved = poutine.Trace()
        for k, site in nodes.items():
            moved.add_node(k, **(dict(site, value=site["value"] + 1) if k == name else site))
        try:
            with poutine.block(), torch.no_grad():
                again = poutine.trace(poutine.replay(batch.call, trace=moved)).get_trace(
                    pair.model)
        except (ValueError, RuntimeError, IndexError, KeyError):
            continue
        if all(k in again.nodes and _same_score(site, again.nodes[k])
               for k, site in nodes.items()
               if site["type"] == "sample" and k != name and not records_value(site)
               and not isinstance(site["fn"], _Subsample)):
            leaves += [name] + [f"{name}_unconstrained"] * (f"{name}_unconstrained" in guide)
    return leaves


def _same_score(a: dict, b: dict) -> bool:
    """Whether two traces' versions of a site score the same (log-prob at its value)."""
    try:
        return bool(torch.allclose(a["fn"].log_prob(a["value"]), b["fn"].log_prob(b["value"]),
                                   equal_nan=True))
    except (ValueError, RuntimeError):
        return False


def _split_deltas(pair: Pair, batch, guide_trace, plate: str | None, deltas: list[str]
                  ) -> tuple[list[str], list[str]]:
    """Split per-row Delta sites of the guide into (joint, point masses): joint ones take
    their value from an auxiliary draw outside the data plate (AutoStructured's
    ``<name>_aux``, an easyguide group's draw, an AutoContinuous's ``_Auto..._latent``), so
    their log q sits outside the rows; point masses come from no auxiliary draw (AutoDelta).
    Found by moving each auxiliary draw (the others held) and watching the Delta values
    against a run with nothing moved (a guide with other randomness, e.g. dropout, gives no
    verdict). An auxiliary draw outside the plate with fewer entries than rows is a global's
    (a point mass given it), not a joint draw over the rows."""
    auxiliary = {k: s for k, s in guide_trace.nodes.items() if s["type"] == "sample"
                 and s["infer"].get("is_auxiliary") and s["value"].is_floating_point()}
    if not deltas or not auxiliary:
        return [], deltas
    held = {k: s["value"] for k, s in auxiliary.items()}

    def values(moves: dict) -> dict | None:
        try:
            trace = poutine.trace(batch.call).get_trace(
                poutine.condition(pair.guide, data=dict(held, **moves)))
        except (ValueError, RuntimeError):  # a value the guide cannot take: no verdict
            return None
        return {k: trace.nodes[k]["value"] for k in deltas if k in trace.nodes}

    joint: set[str] = set()
    backed: set[str] = set()
    with poutine.block(), torch.no_grad():
        base = values({})
        if base is None:
            return [], deltas
        steady = [k for k in deltas if k in base and torch.equal(base[k],
                                                                   guide_trace.nodes[k]["value"])]
        for name, site in auxiliary.items():
            moved = values({name: site["value"] + 1})
            if moved is None:
                continue
            outside = not any(f.name == plate for f in _vectorized_frames(site))
            if outside and site["value"].numel() < len(batch):
                continue  # a global's draw: the Delta is a point mass given it
            for k in steady:
                if k in moved and not torch.equal(moved[k], base[k]):
                    (joint if outside else backed).add(k)
    return ([k for k in deltas if k in joint],
            [k for k in deltas if k not in joint and k not in backed])


def holds_joint_rows(pair: Pair, n: int) -> bool:
    """Whether the guide draws its latents of a plate of n rows for all n at once: an
    AutoContinuous or AutoStructured part holding such latents (its one joint draw covers
    every row), an AutoDiscreteParallel part (its per-row probabilities cannot be sliced to
    a minibatch), or an easyguide (whose groups may draw over all rows)."""
    guide = pair.raw_guide
    if any(isinstance(part, EasyGuide)
           for part in (guide if isinstance(guide, AutoGuideList) else [guide])):
        return True
    return any((isinstance(part, (AutoContinuous, AutoStructured))
                and any((f.full_size or f.size) == n for _, s in prototype_latents(part)
                        for f in s["cond_indep_stack"] if f.vectorized))
               or (isinstance(part, AutoDiscreteParallel)  # of these rows or of others
                   and any(f.vectorized for _, s in prototype_latents(part)
                           for f in s["cond_indep_stack"]))
               for part in _autoguide_parts(pair.raw_guide))


def is_delta(fn) -> bool:
    while not isinstance(fn, dist.Delta) and hasattr(fn, "base_dist"):
        fn = fn.base_dist  # Independent, MaskedDistribution ...
    return isinstance(fn, dist.Delta)


def _own_subsample(prior_trace, plate: str | None):
    """The ``_Subsample`` of a model that subsamples its data plate itself
    (``pyro.plate("data", len(x), subsample_size=m)``, m < len(x)); None if it does not."""
    return next((s["fn"] for s in prior_trace.nodes.values()
                 if s["type"] == "sample" and isinstance(s["fn"], _Subsample)
                 and s["name"] == plate
                 and (s["fn"].subsample_size or s["fn"].size) < s["fn"].size), None)


def check_per_row_evaluation(pair: Pair, structure: Structure, weights: bool = True) -> None:
    """Refuse what cannot be scored row by row (``elbo``, ``log_likelihood``, k-hat per row,
    the iwae/renyi objectives; ``weights=False``: ``to_arviz``'s draws): a model that
    subsamples its own data plate scores m random rows of each batch, and (``weights``) a
    joint autoguide over per-row latents puts all of log q on one site outside the rows."""
    if structure.own_subsample:
        m = structure.own_subsample
        raise SetupError(
            f"the model subsamples plate {structure.plate!r} itself (subsample_size={m}), so "
            f"it scores {m} random rows of each call, not every row; evaluate it without "
            f"subsample_size (the engine's batch_size={m} makes the same minibatches in fit)")
    joint = _joint_over_rows(pair, structure.plate) if weights else None
    if weights and joint is None and structure.joint_rows:
        joint = type(pair.raw_guide).__name__, structure.joint_rows
    if joint:
        kind, local = joint
        raise SetupError(
            f"{kind} keeps one joint distribution over all latents, including the per-row "
            f"latent(s) {', '.join(local)} of plate {structure.plate!r}: its log q does not "
            "split by rows, so per-row weights (elbo, log_likelihood, k-hat, iwae) cannot be "
            "computed; use AutoNormal for the per-row latents (to_arviz's draws are fine as "
            "they are)")


def _check_own_subsampling(pair: Pair, own, n: int, b: int) -> None:
    """Refuse, on minibatches, a model that subsamples its data plate itself
    (``pyro.plate("data", len(x), subsample_size=m)``) under an autoguide with per-row
    parameters there: the guide is handed the minibatch's rows, the model draws m of them,
    and the two cannot agree on which rows a step sees. ``own``: the model's ``_Subsample``
    of its data plate (:func:`_own_subsample`), None if it does not subsample itself."""
    plate = pair.plate
    if b >= n or plate is None:
        return
    per_row = per_row_autoguide_sites(pair)
    if own is not None and per_row:
        raise SetupError(
            f"the model subsamples plate {plate!r} itself (subsample_size="
            f"{own.subsample_size}) and the autoguide keeps per-row parameters there "
            f"({', '.join(per_row)}), so on minibatches of {b} of {n} rows the two cannot "
            f"agree on the rows: train full-batch (batch_size >= {n}; the model's own "
            f"subsample_size makes the minibatches) or drop subsample_size and pass "
            f"batch_size={own.subsample_size}")


def _check_support(trace) -> None:
    """Observed values outside their distribution's support (0-255 pixels for a Bernoulli,
    negative counts for a Poisson) are refused, naming the site; a distribution built with
    ``validate_args=False`` (Pyro's vae example on grey levels) is trusted."""
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or not site["is_observed"] \
                or site["infer"].get("_deterministic") or site["infer"].get("is_auxiliary") \
                or isinstance(site["fn"], _Subsample):  # pyro.factor: auxiliary, no support
            continue
        fn, trusted, inner = site["fn"], False, site["fn"]
        while fn is not None:
            trusted |= fn.__dict__.get("_validate_args") is False
            inner, fn = fn, getattr(fn, "base_dist", None)
        support = getattr(site["fn"], "support", None)
        if trusted or support is None or not torch.is_tensor(site["value"]):
            continue
        try:
            ok = support.check(site["value"])
        except Exception:  # a support without a check for these shapes: nothing to say
            continue
        if site["mask"] is not None and not isinstance(site["mask"], bool):
            ok = ok | ~torch.as_tensor(site["mask"], dtype=torch.bool)
        elif site["mask"] is False:
            continue
        if not bool(torch.as_tensor(ok).all()):
            value = site["value"]
            bad = value[~torch.as_tensor(ok).expand(value.shape[:torch.as_tensor(ok).dim()])]
            example = float(bad.reshape(-1)[0]) if bad.numel() else "?"
            raise SetupError(
                f"observed site {name!r}: the data hold values outside the support of "
                f"{type(inner).__name__} ({inner.support}), e.g. {example}; rescale or "
                "transform the data (images to [0, 1], counts to non-negative integers) or "
                "choose a likelihood that fits them")


def _autoguide_parts(guide) -> list:
    if isinstance(guide, AutoGuideList):
        return [p for part in guide for p in _autoguide_parts(part)]
    return [guide] if isinstance(guide, AutoGuide) else []


def prototype_latents(part: AutoGuide) -> list[tuple[str, dict]]:
    """An autoguide's latent sites as its prototype trace saw them, (name, site) pairs
    ([] before its first call; AutoStructured keeps them in ``_sorted_sites`` and clears
    the trace)."""
    if part.prototype_trace is None:
        return []
    kept = getattr(part, "_sorted_sites", None)
    if kept is not None:
        return list(kept)
    return [(k, s) for k, s in part.prototype_trace.nodes.items()
            if s.get("type") == "sample" and not s.get("is_observed")]


def per_row_autoguide_sites(pair: Pair) -> list[str]:
    """Latent sites of the data plate that an autoguide keeps one parameter per row for
    (AutoNormal, AutoDelta ...): they need the rows' ids, which streamed data lacks."""
    plate = pair.plate
    return [name for part in _autoguide_parts(pair.raw_guide)
            for name, site in prototype_latents(part)
            if any(f.name == plate for f in site["cond_indep_stack"])]


def autoguides_set_up(pair: Pair) -> list[str]:
    """Class names of the guide's autoguide parts already set up (by an earlier fit or
    call): their per-row parameters have the rows of the data they first saw."""
    return [type(p).__name__ for p in _autoguide_parts(pair.raw_guide)
            if p.prototype_trace is not None]


def needs_full_prototype(pair: Pair, n: int, b: int) -> bool:
    """Whether the guide is an autoguide still to be set up over a model that does not
    subsample: then its first call must see all rows, so that it holds one parameter per
    row of the dataset (not of the first minibatch)."""
    if b >= n or pair.model_subsamples:
        return False
    return any(p.prototype_trace is None for p in _autoguide_parts(pair.raw_guide))
