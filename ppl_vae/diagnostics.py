"""Did variational inference work? Diagnostics for any model/guide pair.

PSIS Pareto k-hat (Yao, Vehtari, Simpson & Gelman 2018, "Yes, but did it work?")
    Importance ratios r = p(x, z) / q(z | x) with z ~ q. The shape k of a generalized Pareto
    fit to the largest ratios says how heavy their tail is:
        k < 0.5        good: q is close to the posterior; importance sampling corrects the
                       rest and estimates from q can be trusted
        0.5 <= k < 0.7 ok: usable, but the ratios have infinite variance; PSIS-corrected
                       estimates converge slowly
        k >= 0.7       bad: q misses posterior mass (too narrow or shifted); do not trust
                       posterior summaries from this guide
    Per data point i (local latents, e.g. an amortized encoder):
        log r_is = log p(x_i, z_is | g_s) - log q(z_is | x_i),  (z_is, g_s) ~ q
    taken from :func:`ppl_vae.evaluation.log_weights`. For the global latents g:
        log r_s = log p(g_s) - log q(g_s) + sum_i log p^(x_i | g_s)
    where p^(x_i | g) = mean_k p(x_i, z_ik | g) / q(z_ik | x_i) integrates the local
    latents out by importance sampling with ``inner_samples`` draws (exact without locals).
    The noise of that estimate (summed over N examples) itself fattens the tail of r_s; its
    sd is measured (two independent estimates for 20 draws) and the verdict says when it
    exceeds 0.3 nats (then raise ``inner_samples``).

Simulation-based calibration (Talts, Betancourt, Simpson, Vehtari & Gelman 2018)
    z ~ p(z) (globals from the guide), x ~ p(x | z); L draws z_l ~ q(z | x); the rank of the
    true z among them is uniform on {0..L} for every component iff q is calibrated. Tested
    with a chi-square test on binned ranks (Bonferroni over components); histogram PNG with
    the 99% band of a uniform histogram.

NUTS cross-check: :func:`nuts_crosscheck` runs ``pyro.infer.MCMC(NUTS)`` on a small data set
and compares its posterior with the guide's (one forest plot, a mean/sd difference table).

Posterior predictive checks: :func:`ppc_table` compares a statistic of the observed data with
its distribution over posterior predictive replicates (interval and p-value per component).
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import pyro.poutine as poutine
import torch
from pyro.poutine.util import prune_subsample_sites
from tqdm.auto import tqdm

from .batching import Data, make_batches, split_structure
from .evaluation import (
    as_pair,
    check_broadcasting,
    eval_mode,
    in_particles,
    log_weights,
    module_device,
    pair_log_weights,
)
from .plots import save_figure
from .posterior import (
    _global_trace,
    _in_plate,
    draws_to_arviz,
    samples_to_draws,
    to_arviz,
)
from .program import holds_joint_rows, is_delta, unobserved_leaves, warn_user

GOOD, BAD = 0.5, 0.7
NOISY = 0.3  # nats: inner-estimate noise sd above which the global k-hat is inflated
CONSTANT_SPREAD = 1e-3  # nats: log ratios closer than this count as constant

__all__ = ["pareto_khat", "khat_verdict", "ParetoK", "importance_diagnostics", "SBCResult",
           "sbc", "nuts_crosscheck", "compare_posteriors", "ppc_table", "plot_ppc_table",
           "plot_khat"]


# ---- PSIS k-hat ------------------------------------------------------------------------------

def pareto_khat(log_ratios: torch.Tensor | np.ndarray) -> np.ndarray:
    """PSIS k-hat of log importance ratios of shape (S, ...): one k per trailing index.

    ``log_ratios`` are log p - log q (not negated: ArviZ's ``psislw`` takes log ratios; in
    its LOO use they happen to be minus log-likelihoods). Returns an array of shape (...).
    Ratios constant to within 1e-3 nats (an exact guide in float32) give k = 0.
    """
    import arviz as az

    lr = log_ratios.detach().cpu().double().numpy() if torch.is_tensor(log_ratios) \
        else np.asarray(log_ratios, dtype=float)
    if lr.ndim == 0 or lr.shape[0] < 10:
        raise ValueError(f"need at least 10 draws (first axis) for a Pareto fit, got shape "
                         f"{lr.shape}")
    lr = np.moveaxis(lr, 0, -1)
    finite = np.isfinite(lr).all(-1)
    with np.errstate(all="ignore"):
        _, k = az.psislw(np.where(np.isfinite(lr), lr, -1e30), reff=1.0)
    k = np.asarray(k, dtype=float)
    # ratios equal to float precision (q is the exact posterior): no tail to fit, k = 0
    flat = np.ptp(np.where(np.isfinite(lr), lr, 0.0), axis=-1) < CONSTANT_SPREAD
    return np.where(finite, np.where(flat, 0.0, k), np.inf)


def khat_verdict(k: float) -> str:
    """The Yao et al. (2018) reading of one k-hat, in words."""
    if not np.isfinite(k):
        return "bad (k-hat not finite): the importance ratios are degenerate"
    if k < GOOD:
        return f"good (k-hat {k:.2f} < {GOOD}): the approximation can be trusted"
    if k < BAD:
        return (f"ok (k-hat {k:.2f} in [{GOOD}, {BAD})): usable, importance-sampling "
                "corrections converge slowly")
    return (f"bad (k-hat {k:.2f} >= {BAD}): the guide misses posterior mass; do not trust "
            "its posterior summaries")


@dataclass
class ParetoK:
    """k-hat per data point (local latents; None without them) and for the global latents
    (None without them)."""

    local: np.ndarray | None
    glob: float | None
    num_samples: int
    inner_samples: int
    glob_noise: float | None = None  # sd (nats) of the inner estimate of sum_i log p(x_i | g)
    local_halves: np.ndarray | None = None  # k-hat per data point from each half: (2, N)
    glob_halves: tuple[float, float] | None = None
    glob_point_masses: bool = False  # the guide holds the globals at points (AutoDelta)

    @property
    def uncertainty(self) -> float | None:
        """How far k-hat moves between two independent halves of the draws: the median
        |k(first S/2) - k(second S/2)| over data points (or of the globals' k). A k-hat from
        S draws is about 1/sqrt(2) as uncertain."""
        if self.local_halves is not None:
            both = np.isfinite(self.local_halves).all(0)  # an infinite k-hat has no distance
            gaps = np.abs(self.local_halves[0][both] - self.local_halves[1][both])
            return float(np.median(gaps)) if gaps.size else None
        if self.glob_halves is not None and np.isfinite(self.glob_halves).all():
            return abs(self.glob_halves[0] - self.glob_halves[1])
        return None

    @property
    def share_bad(self) -> float | None:
        """Share of data points with k-hat >= 0.7."""
        return None if self.local is None else float(np.mean(self.local >= BAD))

    @property
    def share_ok(self) -> float | None:
        """Share of data points with k-hat < 0.5."""
        return None if self.local is None else float(np.mean(self.local < GOOD))

    def headline(self) -> tuple[float, str]:
        """The one figure ``ppl-vae check`` prints, and what it is."""
        if self.local is not None:
            return self.share_bad, "share of data points with k-hat >= 0.7 (local latents)"
        return float(self.glob), "k-hat of the global latents"

    def verdict(self) -> str:
        parts = [f"from {self.num_samples} draws"
                 + (f" (halves of {self.num_samples // 2} differ by {self.uncertainty:.2f})"
                    if self.uncertainty is not None else "")]
        if self.glob is not None and self.glob_point_masses:
            parts.append("global latents: k-hat does not apply: the guide holds them at "
                         "points (Delta, e.g. AutoDelta: MAP estimates, no posterior "
                         "uncertainty to check)")
        elif self.glob is not None:
            text = "global latents: " + khat_verdict(self.glob)
            if self.glob_noise is not None and self.glob_noise > NOISY:
                text += (f" [inflated by the noise of integrating the local latents out, sd "
                         f"{self.glob_noise:.2f} nats > {NOISY}: raise inner_samples from "
                         f"{self.inner_samples}]")
            parts.append(text)
        if self.local is not None:
            worst = float(np.max(self.local))
            parts.append(f"data points: {self.share_ok:.1%} good (k < {GOOD}), "
                         f"{self.share_bad:.1%} bad (k >= {BAD}); worst k-hat {worst:.2f}")
        return "; ".join(parts)

    def as_dict(self) -> dict[str, float | str]:
        value, meaning = self.headline()
        out: dict[str, float | str] = {"pareto_k": value, "pareto_k_is": meaning}
        if self.glob is not None:
            out["pareto_k_global"] = float(self.glob)
        if self.glob_noise is not None:
            out["pareto_k_global_noise_sd"] = self.glob_noise
        if self.local is not None:
            out["pareto_k_share_bad"] = self.share_bad
            out["pareto_k_share_good"] = self.share_ok
            out["pareto_k_local_max"] = float(np.max(self.local))
        out["pareto_k_draws"] = self.num_samples
        if self.uncertainty is not None:
            out["pareto_k_halves_gap"] = self.uncertainty
        out["pareto_k_verdict"] = self.verdict()
        return out


@torch.no_grad()
def importance_diagnostics(model: Callable, guide: Callable, data: Data,
                           num_samples: int = 1000, inner_samples: int = 50,
                           batch_size: int | None = None, plate: str | None = None,
                           device: str | torch.device | None = None,
                           seed: int | None = None) -> ParetoK:
    """PSIS k-hat of the guide, per data point and for the global latents (module docstring).

    ``num_samples`` S draws per data point / of the globals; ``inner_samples`` K local draws
    per global draw for the global ratio (cost S*K*N model evaluations).
    """
    if seed is not None:
        pyro.set_rng_seed(seed)
    if device is None:
        device = module_device(model, guide)
    n = make_batches(data, 1, device, shuffle=False).num_examples
    pair = as_pair(model, guide, plate)
    # a guide that draws its rows all at once (holds_joint_rows) sees them all
    batch_size = n if holds_joint_rows(pair, n) else batch_size or min(n, 1000)
    per_pass = max(1, 200_000 // batch_size)  # particles x examples per vectorized pass
    batches = make_batches(data, batch_size, device, shuffle=False)
    local_k: list[np.ndarray] = []
    local_halves: list[np.ndarray] = []
    glob_halves = None
    half = num_samples // 2
    with eval_mode(model, guide):
        first = next(iter(batches))
        nesting = pair.inspect(first).nesting
        plate = pair.data_plate(first)
        with poutine.block():
            probe = poutine.trace(first.call).get_trace(pair.guide)
        sites = [s for s in prune_subsample_sites(probe).nodes.values()
                 if s["type"] == "sample" and not s["is_observed"]]
        has_local = any(_in_plate(s, plate) for s in sites)
        has_global = any(not _in_plate(s, plate) for s in sites)
        point_masses = has_global and all(  # Deltas drawn from no auxiliary draw
            is_delta(s["fn"]) and not s["infer"].get("is_auxiliary")
            for s in sites if not _in_plate(s, plate))
        if has_local:
            for batch in tqdm(batches, desc="k-hat", unit="batch", leave=False, disable=None):
                skip = frozenset(unobserved_leaves(pair, batch))
                chunks = [pair_log_weights(pair, batch, k, plate, skip=skip)[0]
                          for k in _chunks(num_samples, max(1, 200_000 // len(batch)))]
                ratios = torch.cat(chunks)
                local_k.append(pareto_khat(ratios))
                if half >= 10:
                    local_halves.append(np.stack([pareto_khat(ratios[:half]),
                                                  pareto_khat(ratios[half:2 * half])]))
        glob_k = noise = None
        if has_global:
            inner = inner_samples if has_local else 1
            enumerated = bool(pair.structure.enumerated)
            glob = None
            if check_broadcasting(pair, first, nesting, "drawing the global draws"):
                try:
                    with poutine.block():
                        gtrace = poutine.trace(first.call).get_trace(
                            in_particles(pair.guide, num_samples, nesting))
                    glob = _global_trace(gtrace, plate)
                except (ValueError, RuntimeError, IndexError):
                    pass
            singles: list = []  # the one-at-a-time path's global draws, kept for reuse

            def global_log_ratios_looped(rows: int) -> torch.Tensor:
                """The same ratios, one global draw (and its inner draws) at a time, for
                programs that do not broadcast over an extra leading particle dim."""
                total = torch.zeros(rows, dtype=torch.float64)
                for i in range(rows):
                    while len(singles) <= i:
                        with poutine.block():
                            one = poutine.trace(first.call).get_trace(pair.guide)
                        singles.append(_global_trace(one, plate))
                    g = poutine.replay(pair.guide, trace=singles[i])
                    for b, batch in enumerate(batches):
                        loc, gl = log_weights(pair.model, g, batch, inner, plate, nesting,
                                              enumerated=enumerated, vectorize=False)
                        total[i] += (loc.double().logsumexp(0) - math.log(inner)).sum().cpu()
                        if b == 0:
                            total[i] += float(gl[0])
                return total

            def global_log_ratios(rows: int) -> torch.Tensor:
                total = torch.zeros(rows, dtype=torch.float64)
                start = 0
                for s in _chunks(rows, max(1, per_pass // inner)):
                    g = poutine.replay(pair.guide, trace=_repeat_trace(
                        glob, slice(start, start + s), inner))
                    for b, batch in enumerate(batches):
                        loc, gl = log_weights(pair.model, g, batch, s * inner, plate, nesting,
                                              enumerated=enumerated)
                        loc = loc.double().reshape(s, inner, -1)
                        total[start:start + s] += (loc.logsumexp(1) - math.log(inner)
                                                   ).sum(-1).cpu()
                        if b == 0:
                            total[start:start + s] += gl.double().reshape(s, inner)[:, 0].cpu()
                    start += s
                return total

            ratios, why = global_log_ratios, "the guide's draws failed"
            if glob is not None:
                try:
                    total = ratios(num_samples)
                except (ValueError, RuntimeError, IndexError) as e:
                    why = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                    glob = None
            if glob is None:
                warn_user(
                    f"the model or guide does not broadcast over an extra leading particle dim "
                    f"({why}); the global k-hat's {num_samples} draws are evaluated one after "
                    "another (slower)")
                ratios = global_log_ratios_looped
                total = ratios(num_samples)
            glob_k = float(pareto_khat(total))
            if half >= 10:
                glob_halves = (float(pareto_khat(total[:half])),
                               float(pareto_khat(total[half:2 * half])))
            if has_local:  # a second inner estimate for a few global draws: its noise
                m = min(num_samples, 20)
                noise = float(((ratios(m) - total[:m]) ** 2).mean().div(2).sqrt())
    return ParetoK(np.concatenate(local_k) if local_k else None, glob_k, num_samples,
                   inner_samples, noise,
                   np.concatenate(local_halves, axis=1) if local_halves else None, glob_halves,
                   point_masses)


def _chunks(total: int, size: int) -> list[int]:
    out = []
    while total > 0:
        out.append(min(size, total))
        total -= out[-1]
    return out


def _repeat_trace(trace, rows: slice, times: int):
    """A copy of ``trace`` with every value's particle rows ``rows``, each repeated ``times``."""
    from pyro.poutine.trace_struct import Trace

    out = Trace()
    for name, site in trace.nodes.items():
        value = site["value"][rows].repeat_interleave(times, 0)
        out.add_node(name, **dict(site, value=value))
    return out


def plot_khat(k: np.ndarray, path: str | Path, title: str = "PSIS k-hat per data point"
              ) -> Path:
    """Scatter of k-hat per data point with the 0.5 / 0.7 thresholds; PNG at ``path``."""

    import matplotlib.pyplot as plt

    k = np.asarray(k)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    colors = np.where(k >= BAD, "tab:red", np.where(k >= GOOD, "tab:orange", "tab:blue"))
    ax.scatter(np.arange(len(k)), k, s=6, c=colors)
    for y, label in ((GOOD, "0.5: ok above"), (BAD, "0.7: bad above")):
        ax.axhline(y, color="grey", ls="--", lw=0.8)
        ax.text(len(k), y, label, ha="right", va="bottom", fontsize=8)
    ax.set_xlabel("data point")
    ax.set_ylabel("k-hat")
    ax.set_title(f"{title}: {np.mean(k >= BAD):.1%} bad (>= 0.7)")
    save_figure(fig, path)
    return Path(path)


# ---- simulation-based calibration ------------------------------------------------------------

@dataclass
class SBCResult:
    """Ranks of the true values among ``num_draws`` guide draws, per site: arrays of shape
    (num_simulations, *site event shape) with values in 0..num_draws, and the uniformity test
    (chi-square on ``bins`` equal bins per component, Bonferroni over components)."""

    ranks: dict[str, np.ndarray]
    num_draws: int
    bins: int
    alpha: float
    p_values: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from scipy import stats

        for name, r in self.ranks.items():
            flat = r.reshape(r.shape[0], -1)
            counts = self._counts(flat)
            self.p_values[name] = np.array([stats.chisquare(c).pvalue for c in counts.T])

    def _counts(self, flat: np.ndarray) -> np.ndarray:
        edges = np.linspace(0, self.num_draws + 1, self.bins + 1)
        return np.stack([np.histogram(col, bins=edges)[0] for col in flat.T], axis=1)

    @property
    def num_tests(self) -> int:
        return sum(p.size for p in self.p_values.values())

    @property
    def min_p(self) -> float:
        return float(min(p.min() for p in self.p_values.values()))

    @property
    def p_value(self) -> float:
        """Bonferroni-adjusted smallest p-value over all components."""
        return min(1.0, self.min_p * self.num_tests)

    @property
    def passed(self) -> bool:
        """True if no component's ranks are detectably non-uniform at level ``alpha``."""
        return self.p_value >= self.alpha

    def summary(self) -> str:
        n = next(iter(self.ranks.values())).shape[0]
        verdict = "calibrated (ranks uniform)" if self.passed else "NOT calibrated"
        return (f"SBC: {n} simulations, {self.num_draws} guide draws each, {self.num_tests} "
                f"component(s); chi-square on {self.bins} bins, Bonferroni p = "
                f"{self.p_value:.3g} (alpha {self.alpha}): {verdict}")

    def table(self) -> Any:
        import pandas as pd

        rows = []
        for name, r in self.ranks.items():
            flat = r.reshape(r.shape[0], -1)
            for j, p in enumerate(self.p_values[name]):
                rows.append({"site": name, "component": j, "p_value": float(p),
                             "mean_rank": float(flat[:, j].mean() / self.num_draws),
                             "sd_rank": float(flat[:, j].std() / self.num_draws)})
        return pd.DataFrame(rows)

    def plot(self, path: str | Path, max_panels: int = 12) -> Path:
        """Rank histograms (up to ``max_panels`` components) with the 99% band of counts a
        uniform rank distribution gives (Talts et al. 2018, fig. 1)."""

        import matplotlib.pyplot as plt
        from scipy import stats

        panels = [(name, j, r.reshape(r.shape[0], -1)[:, j]) for name, r in self.ranks.items()
                  for j in range(int(np.prod(r.shape[1:], dtype=int)))][:max_panels]
        cols = min(4, len(panels))
        rows = -(-len(panels) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(max(5.0, 3.2 * cols), 2.6 * rows + 0.6),
                                 squeeze=False)
        for ax, (name, j, col) in zip(axes.flat, panels):
            n = len(col)
            lo, hi = stats.binom.ppf([0.005, 0.995], n, 1 / self.bins)
            ax.axhspan(lo, hi, color="grey", alpha=0.25, lw=0)
            ax.hist(col, bins=np.linspace(0, self.num_draws + 1, self.bins + 1),
                    color="tab:blue", edgecolor="white")
            label = name if len(self.p_values[name]) == 1 else f"{name}[{j}]"
            ax.set_title(f"{label}: p={self.p_values[name][j]:.2g}", fontsize=9)
            ax.set_xlabel("rank of truth")
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        fig.suptitle(textwrap.fill(self.summary(), 70 if cols == 1 else 110), fontsize=8)
        return save_figure(fig, path)


def _default_replace(args: tuple, kwargs: dict, simulated: Mapping[str, torch.Tensor]
                     ) -> tuple[tuple, dict]:
    """Put simulated observations back into the call: a keyword argument with the site's
    name, else the only positional tensor of the same shape."""
    args, kwargs = list(args), dict(kwargs)
    for name, value in simulated.items():
        if name in kwargs and kwargs[name].shape == value.shape:
            kwargs[name] = value.to(kwargs[name].dtype)
            continue
        same = [i for i, a in enumerate(args)
                if torch.is_tensor(a) and a.shape == value.shape]
        if len(same) > 1:  # e.g. responses and their mask: prefer the same kind of dtype
            same = [i for i in same if args[i].is_floating_point() == value.is_floating_point()]
        if len(same) != 1:
            raise ValueError(
                f"SBC: cannot tell which argument holds the observed site {name!r} (shape "
                f"{tuple(value.shape)}); pass replace_data=fn(args, kwargs, simulated) -> "
                "(args, kwargs)")
        args[same[0]] = value.to(args[same[0]].dtype)
    return tuple(args), kwargs


@torch.no_grad()
def sbc(model: Callable, guide: Callable, data: Data, num_simulations: int = 1000,
        num_draws: int = 99, *, sites: Sequence[str] | None = None, bins: int = 20,
        alpha: float = 0.01, batch_size: int = 250, plate: str | None = None,
        replace_data: Callable | None = None, device: str | torch.device | None = None,
        seed: int = 0) -> SBCResult:
    """Simulation-based calibration of an amortized guide's local latents.

    Rows of ``data`` serve as templates (shapes, covariates, missing-value masks). Each round
    of ``batch_size`` simulations draws the global latents once from the guide, the local
    latents from the model's prior and the observations from the model
    (``poutine.uncondition``), then ``num_draws`` draws from the guide given the simulated
    data. ``replace_data(args, kwargs, {site: simulated})`` puts simulated observations into
    the model's call (default: the argument of matching name or shape).

    ``num_draws + 1`` should be a multiple of ``bins`` (Talts et al.: 99 draws, 20 bins).
    Returns :class:`SBCResult`; ``.passed`` is the uniformity verdict.
    """
    pyro.set_rng_seed(seed)
    if device is None:
        device = module_device(model, guide)
    replace_data = replace_data or _default_replace
    full = make_batches(data, 1, device, shuffle=False)
    n = full.num_examples
    batch_size = min(batch_size, n, num_simulations)
    generator = torch.Generator().manual_seed(seed)
    ranks: dict[str, list[np.ndarray]] = {}
    pair = as_pair(model, guide, plate)
    model, guide = pair.model, pair.guide
    with eval_mode(model, guide):
        done = 0
        nesting = plate_name = None
        observed: set[str] = set()
        while done < num_simulations:
            b = min(batch_size, num_simulations - done)
            idx = torch.randperm(n, generator=generator)[:b].to(full.device)
            batch = full.take(idx)
            args, kwargs = batch.args, batch.kwargs
            if nesting is None:
                nesting = pair.inspect(batch).nesting
                plate_name = pair.data_plate(batch)
                with poutine.block():
                    plain = poutine.trace(model).get_trace(*args, **kwargs)
                observed = {name for name, site in plain.nodes.items()
                            if site["type"] == "sample" and site["is_observed"]
                            and not site["infer"].get("_deterministic")}
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            glob = _global_trace(guide_trace, plate_name)
            sim = poutine.trace(poutine.uncondition(poutine.replay(model, trace=glob))
                                ).get_trace(*args, **kwargs)
            truth, simulated = {}, {}
            for name, site in prune_subsample_sites(sim).nodes.items():
                if site["type"] != "sample" or not _in_plate(site, plate_name):
                    continue
                if site["infer"].get("_deterministic"):
                    continue
                if name in observed:
                    simulated[name] = site["value"]
                elif sites is None or name in sites:
                    truth[name] = site["value"]
            if not truth:
                raise ValueError("SBC: the model has no local latent sites to calibrate "
                                 f"(in plate {plate_name!r}){'' if sites is None else ' among '}"
                                 f"{'' if sites is None else list(sites)}")
            new_args, new_kwargs = replace_data(args, kwargs, simulated)
            post = poutine.trace(in_particles(guide, num_draws, nesting)).get_trace(
                *new_args, **new_kwargs)
            for name, value in truth.items():
                draws = post.nodes[name]["value"].reshape(num_draws, *value.shape)
                rank = (draws < value).sum(0)
                shape = tuple(value.shape[1:]) if value.shape[:1] == (b,) else (-1,)
                ranks.setdefault(name, []).append(rank.cpu().numpy().reshape(b, *shape))
            done += b
    return SBCResult({k: np.concatenate(v) for k, v in ranks.items()}, num_draws, bins, alpha)


# ---- NUTS cross-check ------------------------------------------------------------------------

def nuts_crosscheck(model: Callable, guide: Callable, data: Data, *, num_samples: int = 500,
                    warmup_steps: int = 500, num_chains: int = 2, svi_samples: int = 1000,
                    dims: Mapping[str, Sequence[str]] | None = None,
                    coords: Mapping[str, Sequence[Any]] | None = None,
                    var_names: Sequence[str] | None = None, out: str | Path | None = None,
                    seed: int = 0, progress: bool = False,
                    forest_coords: Mapping[str, Sequence[Any]] | None = None
                    ) -> tuple[Any, Any, Any]:
    """Run NUTS on ``data`` (small: every latent is sampled) and compare with the guide.

    Chains run one after another (seeds ``seed + c``). Returns ``(table, idata_svi,
    idata_nuts)``: ``table`` is a DataFrame indexed like ``az.summary`` (one row per scalar
    latent) with svi/nuts means and sds, ``mean_diff`` (SVI - NUTS), ``z`` = mean_diff /
    nuts_sd, ``sd_ratio`` = svi_sd / nuts_sd, and NUTS's ``r_hat``, ``ess_bulk``. With
    ``out``: writes ``out/nuts_vs_svi.csv`` and ``out/nuts_vs_svi_forest.png``.
    """
    from pyro.infer import MCMC, NUTS

    args, kwargs = split_structure(data)
    nesting = as_pair(model, guide).inspect(
        next(iter(make_batches(data, 8, "cpu", False))), check=False).nesting
    runs = []
    for c in range(num_chains):
        pyro.set_rng_seed(seed + c)
        kernel = NUTS(model, max_plate_nesting=nesting, jit_compile=False)
        mcmc = MCMC(kernel, num_samples=num_samples, warmup_steps=warmup_steps,
                    disable_progbar=not progress)
        mcmc.run(*args, **kwargs)
        runs.append(mcmc.get_samples())
    samples = {k: torch.stack([r[k] for r in runs]) for k in runs[0]}
    idata_nuts = draws_to_arviz(samples_to_draws(samples, model, data), model, dims, coords)
    idata_svi = to_arviz(model, guide, data, svi_samples, dims=dims, coords=coords,
                         posterior_predictive=False, log_likelihood=False, seed=seed)
    table = compare_posteriors(idata_svi, idata_nuts, var_names)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        table.to_csv(out / "nuts_vs_svi.csv")
        plot_forest_pair(idata_svi, idata_nuts, out / "nuts_vs_svi_forest.png",
                         var_names=var_names, coords=forest_coords)
    return table, idata_svi, idata_nuts


def compare_posteriors(idata_svi: Any, idata_ref: Any, var_names: Sequence[str] | None = None,
                       ref: str = "nuts") -> Any:
    """Mean/sd of every scalar latent under both posteriors, side by side (see
    :func:`nuts_crosscheck`)."""
    import arviz as az

    names = list(var_names) if var_names else [v for v in idata_ref.posterior.data_vars
                                               if v in idata_svi.posterior.data_vars]
    a = az.summary(idata_svi, var_names=names, kind="stats")
    b = az.summary(idata_ref, var_names=names, kind="all")
    table = a[["mean", "sd"]].add_prefix("svi_").join(
        b[["mean", "sd", "r_hat", "ess_bulk"]].rename(
            columns={"mean": f"{ref}_mean", "sd": f"{ref}_sd"}), how="inner")
    table["mean_diff"] = table["svi_mean"] - table[f"{ref}_mean"]
    table["z"] = table["mean_diff"] / table[f"{ref}_sd"]
    table["sd_ratio"] = table["svi_sd"] / table[f"{ref}_sd"]
    return table


def plot_forest_pair(idata_svi: Any, idata_ref: Any, path: str | Path,
                     var_names: Sequence[str] | None = None,
                     coords: Mapping[str, Sequence[Any]] | None = None,
                     names: tuple[str, str] = ("SVI", "NUTS")) -> Path:
    """One ``az.plot_forest`` with both posteriors (94% HDI, quartiles)."""
    import arviz as az

    vars_ = list(var_names) if var_names else [v for v in idata_ref.posterior.data_vars
                                               if v in idata_svi.posterior.data_vars]
    axes = az.plot_forest([idata_svi, idata_ref], model_names=list(names), var_names=vars_,
                          coords=dict(coords or {}), combined=True)
    return save_figure(np.asarray(axes).flat[0].get_figure(), path)


# ---- posterior predictive checks -------------------------------------------------------------

def ppc_table(idata: Any, var: str, statistic: Callable[[np.ndarray], np.ndarray],
              labels: Sequence[Any] | None = None, max_draws: int | None = None) -> Any:
    """Observed statistic vs its posterior predictive distribution.

    ``statistic`` maps one data set (the observed site's array, examples first, NaN where
    missing) to a 1-D vector of K numbers (e.g. proportion correct per item). Returns a
    DataFrame with K rows: ``observed``, predictive ``mean``, ``lo``/``hi`` (2.5/97.5%) and
    ``p_value`` = P(T(x_rep) >= T(x)) (near 0 or 1: the model misses that feature).
    """
    import pandas as pd

    observed = np.asarray(idata.observed_data[var].values)
    rep = np.asarray(idata.posterior_predictive[var].values)
    rep = rep.reshape(-1, *rep.shape[2:])
    if max_draws is not None:
        rep = rep[:max_draws]
    missing = np.isnan(observed)
    t_obs = np.atleast_1d(np.asarray(statistic(observed), dtype=float))
    t_rep = np.stack([np.atleast_1d(np.asarray(statistic(np.where(missing, np.nan, r)),
                                               dtype=float)) for r in rep])
    lo, hi = np.percentile(t_rep, [2.5, 97.5], axis=0)
    p = (t_rep >= t_obs).mean(0)
    index = list(labels) if labels is not None else list(range(len(t_obs)))
    return pd.DataFrame({"observed": t_obs, "mean": t_rep.mean(0), "lo": lo, "hi": hi,
                         "p_value": p}, index=pd.Index(index, name="statistic"))


def plot_ppc_table(tables: Mapping[str, Any], path: str | Path) -> Path:
    """One panel per table from :func:`ppc_table`: predictive 95% intervals (bars) and the
    observed statistic (red dots)."""

    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(tables), 1, figsize=(7, 2.8 * len(tables)), squeeze=False)
    for ax, (title, t) in zip(axes[:, 0], tables.items()):
        x = np.arange(len(t))
        ax.vlines(x, t["lo"], t["hi"], color="tab:blue", lw=4, alpha=0.5,
                  label="posterior predictive 95%")
        ax.plot(x, t["mean"], "_", color="tab:blue", ms=10)
        ax.plot(x, t["observed"], "o", color="tab:red", ms=4, label="observed")
        if len(t) <= 30:
            ax.set_xticks(x, [str(i) for i in t.index], rotation=45, fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    return save_figure(fig, path)
