"""Marginal exam models: each student's ability integrated out exactly, items the only latents.

For student s (the data plate ``data``, subsampled by the engine) and item t:

    theta_s ~ N(0, 1)                                              (fixes the scale)
    graded response model (Samejima), K_t ordered categories 0..K_t-1 per item:
        P(y_st >= k | theta) = sigmoid(a_t (theta - b_tk)),   k = 1..K_t-1,
        b_t1 < b_t2 < ... < b_t,K_t-1                          (ordered thresholds)
        P(y_st = k | theta)  = P(y_st >= k) - P(y_st >= k+1)   (P(y >= 0) = 1, P(y >= K_t) = 0)
    binary items are the K_t = 2 case: the 2PL  P(y_st = 1 | theta) = sigmoid(a_t (theta - b_t));
    ``fixed_discrimination=1.0`` gives the 1PL (Rasch) and its graded form.

The likelihood of the item parameters integrates every ability out, exactly up to the
quadrature rule (Gauss-Hermite for the N(0, 1) weight, Q nodes theta_q, weights w_q, sum 1):

    log p(y_s | items) = log integral N(theta; 0, 1) prod_t p(y_st | theta)^{m_st} dtheta
                       = logsumexp_q [ log w_q + sum_t m_st log p(y_st | theta_q) ]

with m_st the mask (1 = answered): a missing answer contributes nothing, it is never imputed.
The model writes this as ``pyro.factor("responses", log_marginal)`` inside the student plate,
so the only latent sites are the item parameters (a few per item): Pyro's autoguides over
them (AutoDelta / AutoLaplaceApproximation = marginal MAP, AutoMultivariateNormal) train with
``ppl_vae.fit``, and minibatches of students give an unbiased estimate of the exact marginal
log joint (the plate scales a minibatch by N/B). The inner sum over items and categories is one
matrix product, (students, items x categories) @ (items x categories, nodes), on the device.

Latent sites (all on the real line, Normal priors, so a posterior mode is the same in the
sampling and in the unconstrained space, and with flat priors it is the MML estimate):

    log_discrimination  (I,)  plate ``items``: log a_t ~ N(0, 0.5^2)   (a_t ~ LogNormal(0, 0.5))
    difficulty          (I,)  plate ``items``: b_t1 ~ N(0, 2^2)  (the 2PL b; the GRM's lowest
                                                threshold)
    log_threshold_gaps  (G,)  plate ``threshold_gaps``: log(b_t,k+1 - b_tk) ~ N(0, 1), for the
                              G = sum_t max(K_t - 2, 0) gaps of the graded items

``priors="flat"`` widens them to N(0, 10^2) for log a and log gaps, N(0, 100^2) for b.
Abilities given the items come from Gauss-Hermite quadrature too
(:meth:`MarginalIRT.abilities`: EAP, posterior sd, MAP; 101 nodes by default, as narrow
posteriors need more nodes than the item likelihood). :func:`laplace_approximation` gives the
Gaussian at the mode, and :func:`item_table` per-item means, sds, modes and intervals.
Units: log densities in nats, abilities and thresholds on the logit scale of theta ~ N(0, 1).

Call form (the engine's convention): ``model(responses, mask, size=N, subsample=idx)`` with
``responses`` (B, I) category codes 0..K_t-1 (float or integer; any value where masked) and
``mask`` (B, I) bool, True = answered.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from numpy.polynomial.hermite_e import hermegauss
from torch import nn
from torch.nn.functional import logsigmoid

#: prior (loc, scale) of each latent site, by name of the preset
PRIORS = {
    "weak": {"log_discrimination": (0.0, 0.5), "difficulty": (0.0, 2.0),
             "log_threshold_gaps": (0.0, 1.0)},
    "flat": {"log_discrimination": (0.0, 10.0), "difficulty": (0.0, 100.0),
             "log_threshold_gaps": (0.0, 10.0)},
}
#: logit(P(y >= k)) of an item with a = 1 is about -b / 1.16 for theta ~ N(0, 1) (probit
#: approximation sigmoid(x) ~ Phi(x / 1.702)): the scale of the data-driven starting values
_MARGINAL_SLOPE = 1.16


def gauss_hermite(num_nodes: int, dtype: torch.dtype = torch.float64
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gauss-Hermite rule for the standard normal density: nodes (Q,) and log weights (Q,),
    weights summing to 1, so sum_q w_q f(theta_q) ~ E f(theta) for theta ~ N(0, 1), exact for
    polynomials of degree <= 2Q - 1."""
    if num_nodes < 1:
        raise ValueError(f"num_nodes must be >= 1, got {num_nodes}")
    x, w = hermegauss(int(num_nodes))
    w = w / w.sum()
    return torch.tensor(x, dtype=dtype), torch.tensor(np.log(w), dtype=dtype)


class MarginalIRT(nn.Module):
    """2PL / 1PL / graded response model with each ability integrated out by quadrature.

    Args:
        num_items: I, the number of items (columns of the response table).
        categories: K_t, the number of answer categories of each item (an int for all items
            or one per item; 2 = a binary item, the 2PL). Responses are coded 0..K_t-1.
        fixed_discrimination: None (default) estimates a_t; a number fixes every a_t to it
            (1.0: the 1PL / Rasch model, and its graded form).
        priors: ``"weak"`` (default) or ``"flat"``; see :data:`PRIORS`.
        prior_overrides: (loc, scale) per site name to replace a preset's Normal prior, e.g.
            ``{"difficulty": (0.0, 3.0)}``.
        num_nodes: Q, Gauss-Hermite nodes of the marginal likelihood (21 as mirt's default).
    """

    student_plate = "data"
    item_plate = "items"
    gap_plate = "threshold_gaps"

    def __init__(self, num_items: int, categories: int | Sequence[int] = 2, *,
                 fixed_discrimination: float | None = None, priors: str = "weak",
                 prior_overrides: dict[str, tuple[float, float]] | None = None,
                 num_nodes: int = 21):
        super().__init__()
        self.num_items = int(num_items)
        if isinstance(categories, (int, np.integer)):
            cats = [int(categories)] * self.num_items
        else:
            cats = [int(k) for k in categories]
        if len(cats) != self.num_items:
            raise ValueError(f"categories has {len(cats)} entries for {self.num_items} items")
        if min(cats) < 2:
            raise ValueError(f"every item needs at least 2 categories, got {min(cats)}")
        if priors not in PRIORS:
            raise ValueError(f"unknown priors {priors!r}; choose one of {sorted(PRIORS)}")
        self.categories = cats
        self.max_categories = max(cats)
        self.fixed_discrimination = (None if fixed_discrimination is None
                                     else float(fixed_discrimination))
        self.priors = {**PRIORS[priors], **(prior_overrides or {})}
        unknown = set(self.priors) - set(PRIORS["weak"])
        if unknown:
            raise ValueError(f"unknown prior sites {sorted(unknown)}")
        self.num_nodes = int(num_nodes)
        nodes, log_weights = gauss_hermite(self.num_nodes)
        self.register_buffer("nodes", nodes)
        self.register_buffer("log_weights", log_weights)
        kmax = self.max_categories
        k = torch.arange(kmax)
        kt = torch.tensor(cats).unsqueeze(-1)
        self.register_buffer("valid", k < kt)                        # (I, Kmax)
        self.register_buffer("top", k == kt - 1)                     # (I, Kmax)
        self.register_buffer("middle", (k >= 1) & (k <= kt - 2))     # (I, Kmax)
        self.register_buffer("valid_threshold", k[:kmax - 1] < kt - 1)   # (I, Kmax-1)
        valid_gap = k[:max(kmax - 2, 0)] < kt - 2                    # (I, Kmax-2)
        self.register_buffer("valid_gap", valid_gap)
        # (G, I*(Kmax-2)) 0/1: puts the G free gaps in their padded (item, gap) slots
        slots = valid_gap.flatten().nonzero().squeeze(-1)
        scatter = torch.zeros(len(slots), valid_gap.numel(), dtype=torch.float64)
        scatter[torch.arange(len(slots)), slots] = 1.0
        self.register_buffer("gap_scatter", scatter)
        self.num_gaps = len(slots)

    # ---- item parameters ------------------------------------------------------------------
    @property
    def latent_sites(self) -> tuple[str, ...]:
        """Names of the latent sites of this instance, in table order."""
        names = () if self.fixed_discrimination is not None else ("log_discrimination",)
        names += ("difficulty",)
        return names + (("log_threshold_gaps",) if self.num_gaps else ())

    def _prior(self, site: str, zero: torch.Tensor) -> dist.Normal:
        loc, scale = self.priors[site]
        return dist.Normal(zero + loc, zero + scale)

    def sample_items(self, device: torch.device | None = None,
                     dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Sample the latent item sites from their priors (Pyro sample statements) and return
        the item parameters of :meth:`item_parameters`."""
        zero = torch.zeros((), device=device or self.nodes.device,
                           dtype=dtype or torch.get_default_dtype())
        latents = {}
        with pyro.plate(self.item_plate, self.num_items, dim=-1):
            if self.fixed_discrimination is None:
                latents["log_discrimination"] = pyro.sample(
                    "log_discrimination", self._prior("log_discrimination", zero))
            latents["difficulty"] = pyro.sample("difficulty", self._prior("difficulty", zero))
        if self.num_gaps:
            with pyro.plate(self.gap_plate, self.num_gaps, dim=-1):
                latents["log_threshold_gaps"] = pyro.sample(
                    "log_threshold_gaps", self._prior("log_threshold_gaps", zero))
        return self.item_parameters(latents)

    def item_parameters(self, latents: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Latent site values (leading batch dims allowed, e.g. posterior draws (S, I)) -> the
        natural item parameters: ``discrimination`` a (..., I) and ``thresholds`` b
        (..., I, Kmax-1), each item's first K_t - 1 thresholds increasing (padding slots
        hold finite filler values, masked everywhere)."""
        b1 = latents["difficulty"]
        batch, num_items = b1.shape[:-1], b1.shape[-1]
        if self.fixed_discrimination is None:
            a = latents["log_discrimination"].exp()
        else:
            a = torch.full_like(b1, self.fixed_discrimination)
        kmax = self.max_categories
        if kmax > 2:
            if self.num_gaps:
                gaps = latents["log_threshold_gaps"].exp() @ self.gap_scatter.to(b1.dtype)
                gaps = gaps.reshape(*batch, num_items, kmax - 2)
                gaps = torch.where(self.valid_gap, gaps, torch.ones_like(gaps))
            else:
                gaps = b1.new_ones(*batch, num_items, kmax - 2)
            thresholds = torch.cat([b1.unsqueeze(-1), b1.unsqueeze(-1) + gaps.cumsum(-1)], -1)
        else:
            thresholds = b1.unsqueeze(-1)
        return {"discrimination": a, "thresholds": thresholds}

    def initial_values(self, responses: torch.Tensor, mask: torch.Tensor | None = None
                       ) -> dict[str, torch.Tensor]:
        """Data-driven starting values of the latent sites (for ``init_to_value``): a_t = 1
        and b_tk = -1.16 logit(share of answered y_st >= k), the thresholds a = 1 items would
        have under theta ~ N(0, 1); gaps at least 0.05. Reads the data on the host once."""
        y = torch.as_tensor(responses).detach().double().cpu()
        m = (torch.ones_like(y, dtype=torch.bool) if mask is None
             else torch.as_tensor(mask).detach().bool().cpu())
        answered = m.sum(0).double()
        b = torch.zeros(self.num_items, self.max_categories - 1, dtype=torch.float64)
        for k in range(1, self.max_categories):
            share = ((y >= k) & m).sum(0) / answered.clamp_min(1.0)
            share = ((share * answered + 0.5) / (answered + 1.0)).clamp(1e-4, 1 - 1e-4)
            b[:, k - 1] = -_MARGINAL_SLOPE * torch.logit(share)
        dtype = torch.get_default_dtype()
        values = {"difficulty": b[:, 0].to(dtype)}
        if self.fixed_discrimination is None:
            values["log_discrimination"] = torch.zeros(self.num_items, dtype=dtype)
        if self.num_gaps:
            gaps = (b[:, 1:] - b[:, :-1]).clamp_min(0.05).log()
            values["log_threshold_gaps"] = gaps[self.valid_gap.cpu()].to(dtype)
        return {k: v.to(self.nodes.device) for k, v in values.items()}

    # ---- the likelihood -------------------------------------------------------------------
    def response_counts(self, responses: torch.Tensor, mask: torch.Tensor | None = None,
                        dtype: torch.dtype | None = None) -> torch.Tensor:
        """Cumulative answer indicators: (B, I) codes and mask -> (B, Kmax * I), column
        k * I + t = 1 if student s answered item t with a code y_st >= k (column block 0 is
        the mask itself); missing answers are all zeros. With :meth:`node_log_likelihood`'s
        differences lp_k - lp_k-1 these sum to log p(y_st) (a binary exam: [m, y m])."""
        num_students, num_items = responses.shape
        dtype = dtype or (responses.dtype if responses.is_floating_point()
                          else torch.get_default_dtype())
        out = torch.empty(num_students, self.max_categories * num_items, dtype=dtype,
                          device=responses.device)
        if mask is None:
            out[:, :num_items] = 1.0
            mask = torch.ones((), dtype=torch.bool, device=responses.device)
        else:
            out[:, :num_items] = mask
        for k in range(1, self.max_categories):
            out[:, k * num_items:(k + 1) * num_items] = (responses >= k) & mask
        return out

    def category_log_probs(self, theta: torch.Tensor, items: dict[str, torch.Tensor]
                           ) -> torch.Tensor:
        """log P(y = k | theta, item t) in nats: theta (T,), items (..., I) / (..., I, Kmax-1)
        -> (..., T, I, Kmax); 0 in the padding slots k >= K_t.

        log P(y = k) = log sigmoid(eta_k) + log sigmoid(-eta_k+1) + log(1 - exp(-a (b_k+1 - b_k)))
        with eta_k = a (theta - b_k), the first term absent for k = 0, the other two for the
        top category k = K_t - 1 (the identity sigmoid(x) - sigmoid(z) = sigmoid(x)
        sigmoid(-z) (1 - exp(z - x)) keeps it stable in the tails)."""
        a = items["discrimination"]
        th = torch.where(self.valid_threshold, items["thresholds"],
                         torch.zeros((), dtype=a.dtype, device=a.device))
        eta = a[..., None, :, None] * (theta[:, None, None] - th[..., None, :, :])
        zero = torch.zeros_like(eta[..., :1])
        lower = torch.cat([zero, logsigmoid(eta)], -1)                    # uses eta_k
        upper = torch.cat([logsigmoid(-eta), zero], -1)                   # uses eta_k+1
        log_p = lower + torch.where(self.top, 0.0, upper)
        if self.max_categories > 2:
            gaps = th[..., 1:] - th[..., :-1]
            gaps = torch.where(self.valid_gap, gaps, torch.ones_like(gaps))
            between = torch.log(-torch.expm1(-a.unsqueeze(-1) * gaps))   # (..., I, Kmax-2)
            pad = torch.zeros_like(between[..., :1])
            between = torch.cat([pad, between, pad], -1)
            log_p = log_p + torch.where(self.middle, between, 0.0).unsqueeze(-3)
        return torch.where(self.valid, log_p, 0.0)

    def node_log_likelihood(self, counts: torch.Tensor, items: dict[str, torch.Tensor],
                            nodes: torch.Tensor | None = None) -> torch.Tensor:
        """sum_t m_st log p(y_st | theta_q) at every node: counts (B, Kmax*I) (from
        :meth:`response_counts`) -> (..., B, Q) nats; one matrix product."""
        nodes = self.nodes if nodes is None else nodes
        steps = self.cumulative_differences(self.category_log_probs(nodes.to(counts.dtype),
                                                                    items))
        return counts @ steps.flatten(-2).transpose(-1, -2)

    @staticmethod
    def cumulative_differences(log_p: torch.Tensor) -> torch.Tensor:
        """(..., I, Kmax) log probabilities -> (..., Kmax, I) weights of the cumulative
        indicators of :meth:`response_counts`: lp_0, lp_1 - lp_0, ..., lp_K-1 - lp_K-2."""
        steps = torch.cat([log_p[..., :1], log_p[..., 1:] - log_p[..., :-1]], -1)
        return steps.transpose(-1, -2)

    def log_marginal(self, responses: torch.Tensor, mask: torch.Tensor | None,
                     items: dict[str, torch.Tensor], num_nodes: int | None = None
                     ) -> torch.Tensor:
        """log p(y_s | items), ability integrated out by Gauss-Hermite quadrature: (..., B)
        nats (leading dims: those of the item parameters). ``num_nodes`` overrides Q."""
        dtype = items["thresholds"].dtype
        if num_nodes is None or num_nodes == self.num_nodes:
            nodes, log_w = self.nodes, self.log_weights
        else:
            nodes, log_w = gauss_hermite(num_nodes)
            nodes, log_w = nodes.to(responses.device), log_w.to(responses.device)
        counts = self.response_counts(responses, mask, dtype)
        ll = self.node_log_likelihood(counts, items, nodes)
        return torch.logsumexp(ll + log_w.to(dtype), -1)

    def model(self, responses: torch.Tensor, mask: torch.Tensor | None = None,
              size: int | None = None, subsample: torch.Tensor | None = None
              ) -> torch.Tensor:
        """responses: (B, I) codes 0..K_t-1; mask: (B, I) bool, True = answered. Returns the
        log marginal likelihood of each student's answers, (B,) nats."""
        if responses.shape[-1] != self.num_items:
            raise ValueError(f"responses have {responses.shape[-1]} items, the model "
                             f"{self.num_items}")
        dtype = responses.dtype if responses.is_floating_point() else None
        self.last_batch = (responses, mask)  # for :class:`FirstBatchInit` (no copy, no read)
        items = self.sample_items(responses.device, dtype)
        with pyro.plate(self.student_plate, size or len(responses), subsample=subsample,
                        dim=-1):
            log_marginal = self.log_marginal(responses, mask, items)
            pyro.factor("responses", log_marginal)
        return log_marginal

    forward = model

    # ---- abilities given the items --------------------------------------------------------
    @torch.no_grad()
    def abilities(self, responses: torch.Tensor, mask: torch.Tensor | None,
                  items: dict[str, torch.Tensor], num_nodes: int | None = 101,
                  map_steps: int = 30, chunk_size: int = 8192) -> dict[str, torch.Tensor]:
        """Each student's ability posterior given fixed items (I,) / (I, Kmax-1), exactly by
        quadrature over the N(0, 1) prior: ``eap`` (posterior mean), ``sd`` (posterior sd),
        ``map`` (posterior mode: Newton's method on the log posterior, concave for these
        models, started at the EAP; left out with ``map_steps=0``), ``log_marginal`` (nats),
        each (N,) on the CPU, float64.

        ``num_nodes``: Gauss-Hermite nodes (None: the model's Q). Students who answer many
        items have narrow posteriors that few nodes resolve badly: on simulated 2PL exams
        (50 items answered; 30 of 100) the largest EAP error against 301 nodes was 0.038 /
        0.079 with 21 nodes, 1e-4 / 1e-3 with 61, 7e-7 / 3e-5 with 101 (the default; the
        cost is one (B, Kmax*I) @ (Kmax*I, Q) product per chunk of students)."""
        nodes, log_w = (gauss_hermite(num_nodes) if num_nodes
                        else (self.nodes.double(), self.log_weights.double()))
        device = self.nodes.device
        nodes, log_w = nodes.to(device), log_w.to(device)
        items = {k: v.to(device=device, dtype=torch.float64) for k, v in items.items()}
        out: dict[str, list[torch.Tensor]] = {"eap": [], "sd": [], "map": [], "log_marginal": []}
        for start in range(0, len(responses), chunk_size):
            y = responses[start:start + chunk_size].to(device)
            m = None if mask is None else mask[start:start + chunk_size].to(device)
            counts = self.response_counts(y, m, torch.float64)
            joint = self.node_log_likelihood(counts, items, nodes) + log_w      # (B, Q)
            log_marginal = torch.logsumexp(joint, -1)
            w = torch.exp(joint - log_marginal.unsqueeze(-1))
            eap = w @ nodes
            sd = (w @ nodes ** 2 - eap ** 2).clamp_min(0.0).sqrt()
            out["eap"].append(eap.cpu())
            out["sd"].append(sd.cpu())
            out["log_marginal"].append(log_marginal.cpu())
            if map_steps:
                out["map"].append(self._posterior_mode(y, m, items, eap, map_steps).cpu())
        return {k: torch.cat(v) for k, v in out.items() if v}

    def _posterior_mode(self, responses: torch.Tensor, mask: torch.Tensor | None,
                        items: dict[str, torch.Tensor], start: torch.Tensor, steps: int
                        ) -> torch.Tensor:
        """Newton's method on log N(theta; 0, 1) + sum_t m_st log p(y_st | theta) per student
        (B,), steps bounded by 1 logit. With P*_k = P(y >= k | theta) (P*_0 = 1, P*_K = 0):
        d/dtheta log P(y = k) = a (1 - P*_k - P*_k+1) and
        d2/dtheta2 = -a^2 (P*_k (1 - P*_k) + P*_k+1 (1 - P*_k+1)) < 0 (a concave problem)."""
        a = items["discrimination"]
        th = torch.where(self.valid_threshold, items["thresholds"], 0.0)
        answered = (torch.ones_like(responses, dtype=torch.bool) if mask is None else mask)
        y = torch.where(answered, responses, 0).round().long().clamp(0, self.max_categories - 1)
        y = y.unsqueeze(-1)
        m = answered.to(a.dtype)
        theta = start.clone()
        for _ in range(steps):
            p = torch.sigmoid(a.unsqueeze(-1) * (theta[:, None, None] - th))  # (B, I, Kmax-1)
            p = torch.where(self.valid_threshold, p, 0.0)
            ext = torch.cat([torch.ones_like(p[..., :1]), p, torch.zeros_like(p[..., :1])], -1)
            lo = ext.gather(-1, y).squeeze(-1)
            hi = ext.gather(-1, y + 1).squeeze(-1)
            grad = (m * a * (1.0 - lo - hi)).sum(-1) - theta
            hess = -(m * a ** 2 * (lo * (1.0 - lo) + hi * (1.0 - hi))).sum(-1) - 1.0
            theta = theta - (grad / hess).clamp(-1.0, 1.0)
        return theta


# ---- guides, estimates, item table --------------------------------------------------------

def make_guide(model: MarginalIRT, responses: torch.Tensor, mask: torch.Tensor | None = None,
               kind: str = "delta") -> nn.Module:
    """An autoguide over the item sites, started at :meth:`MarginalIRT.initial_values`:
    ``delta`` (AutoDelta: marginal MAP), ``laplace`` (AutoLaplaceApproximation: marginal MAP
    in one flat vector; ``guide.laplace_approximation(responses, mask)`` then gives the
    Gaussian at the mode with the exact Hessian), ``mvn`` (AutoMultivariateNormal, trained by
    SVI), ``normal`` (AutoNormal, mean-field)."""
    from pyro.infer import autoguide

    init = autoguide.init_to_value(values=model.initial_values(responses, mask))
    if kind == "delta":
        return autoguide.AutoDelta(model, init_loc_fn=init)
    if kind == "laplace":
        return autoguide.AutoLaplaceApproximation(model, init_loc_fn=init)
    if kind == "mvn":
        return autoguide.AutoMultivariateNormal(model, init_loc_fn=init, init_scale=0.01)
    if kind == "normal":
        return autoguide.AutoNormal(model, init_loc_fn=init, init_scale=0.01)
    raise ValueError(f"unknown guide {kind!r}; choose delta, laplace, mvn or normal")


class FirstBatchInit:
    """``init_loc_fn`` of an autoguide over a :class:`MarginalIRT`: the data-driven starting
    values of :meth:`MarginalIRT.initial_values` from the batch the model is called with when
    the guide builds its prototype (the engine's first minibatch), so a guide can be built
    before any data is seen (as a run is, from its spec). Other sites: their prior median."""

    def __init__(self, model: MarginalIRT):
        self.model = model

    def __call__(self, site: dict) -> torch.Tensor:
        from pyro.infer.autoguide import init_to_median

        batch = getattr(self.model, "last_batch", None)
        if batch is None or site["name"] not in self.model.latent_sites:
            return init_to_median(site)
        value = self.model.initial_values(*batch)[site["name"]]
        ref = site["fn"].mean  # the prior (a Normal): device and dtype of the site
        return value.to(device=ref.device, dtype=ref.dtype).expand(ref.shape).clone()


def laplace_approximation(model: MarginalIRT, guide: nn.Module, responses: torch.Tensor,
                          mask: torch.Tensor | None = None) -> nn.Module:
    """The Laplace approximation of the item posterior at the mode of a point guide (AutoDelta
    or AutoLaplaceApproximation trained to the marginal MAP): an AutoMultivariateNormal guide
    N(mode, H^-1), H the exact Hessian of the negative log joint over all students (all sites
    are real-valued, so no change of variables enters). One backward pass per latent number
    over the full data."""
    from pyro.infer import autoguide

    args, kwargs = _guide_call(guide, responses, mask)
    values = guide_mode(model, guide, responses, mask)
    laplace = autoguide.AutoLaplaceApproximation(
        model, init_loc_fn=autoguide.init_to_value(values=values))
    laplace(*args, **kwargs)  # builds its prototype at the mode
    device = args[0].device
    m = None if mask is None else mask.to(device)
    return laplace.laplace_approximation(responses.to(device), m)


def _guide_call(guide: nn.Module, responses: torch.Tensor, mask: torch.Tensor | None):
    """Arguments that run a guide of global sites cheaply: two students, the full size."""
    n = len(responses)
    device = next((p.device for p in guide.parameters()), responses.device)
    idx = torch.arange(min(2, n), device=device)
    m = None if mask is None else mask[:len(idx)].to(device)
    return (responses[:len(idx)].to(device), m), {"size": n, "subsample": idx}


@torch.no_grad()
def guide_mode(model: MarginalIRT, guide: nn.Module, responses: torch.Tensor,
               mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The latent sites at the guide's mode: its median in the unconstrained space, where
    every site here lives (a point guide's point)."""
    args, kwargs = _guide_call(guide, responses, mask)
    try:
        mode = guide.median(*args, **kwargs)
    except NotImplementedError:  # AutoLaplaceApproximation: a point mass, its draw is the mode
        mode = guide(*args, **kwargs)
    return {k: mode[k].detach() for k in model.latent_sites}


@torch.no_grad()
def item_estimates(model: MarginalIRT, guide: nn.Module, responses: torch.Tensor,
                   mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Item parameters at the guide's mode (its median in the unconstrained space, where
    every site here lives): ``discrimination`` (I,), ``thresholds`` (I, Kmax-1), on the CPU.
    For AutoDelta / AutoLaplaceApproximation this is the marginal MAP estimate."""
    return {k: v.detach().cpu() for k, v in model.item_parameters(
        guide_mode(model, guide, responses, mask)).items()}


@torch.no_grad()
def posterior_draws(model: MarginalIRT, guide: nn.Module, responses: torch.Tensor,
                    mask: torch.Tensor | None = None, num_samples: int = 2000, seed: int = 0
                    ) -> dict[str, torch.Tensor]:
    """Draws of the latent item sites (S, I) / (S, G) from the guide, on the CPU."""
    args, kwargs = _guide_call(guide, responses, mask)
    with pyro.poutine.seed(rng_seed=seed), pyro.plate("_posterior_draws", num_samples, dim=-2):
        trace = pyro.poutine.trace(guide).get_trace(*args, **kwargs)
    out = {}
    for name in model.latent_sites:
        value = trace.nodes[name]["value"]
        out[name] = value.detach().reshape(num_samples, -1).cpu()
    return out


def item_table(model: MarginalIRT, guide: nn.Module, responses: torch.Tensor,
               mask: torch.Tensor | None = None, num_samples: int = 4000, prob: float = 0.9,
               item_ids: Sequence[str] | None = None, seed: int = 0):
    """One row per item parameter (pandas DataFrame): ``item``, ``parameter`` (``a``; ``b``
    for a binary item, ``b1``..``b{K-1}`` for a graded one), ``mean``, ``sd``, ``mode``
    (the parameter at the guide's mode: the marginal MAP for AutoDelta / Laplace guides),
    ``lower``, ``upper`` (central ``prob`` interval), from ``num_samples`` guide draws
    (a point-mass guide gives sd 0 and a zero-width interval). With a fixed discrimination
    the ``a`` rows are left out."""
    import pandas as pd

    draws = model.item_parameters(posterior_draws(model, guide, responses, mask,
                                                  num_samples, seed))
    mode = item_estimates(model, guide, responses, mask)
    tail = (1.0 - prob) / 2.0
    ids = list(item_ids) if item_ids is not None else [f"item{t + 1}" for t in
                                                        range(model.num_items)]
    rows = []
    for t, item in enumerate(ids):
        columns = []
        if model.fixed_discrimination is None:
            columns.append(("a", draws["discrimination"][:, t], mode["discrimination"][t]))
        num_thresholds = model.categories[t] - 1
        for k in range(num_thresholds):
            name = "b" if num_thresholds == 1 else f"b{k + 1}"
            columns.append((name, draws["thresholds"][:, t, k], mode["thresholds"][t, k]))
        for name, x, x_mode in columns:
            x = x.double()
            lower, upper = torch.quantile(x, torch.tensor([tail, 1.0 - tail],
                                                          dtype=torch.float64)).tolist()
            rows.append({"item": item, "parameter": name, "mean": float(x.mean()),
                         "sd": float(x.std()) if len(x) > 1 else 0.0,
                         "mode": float(x_mode), "lower": lower, "upper": upper})
    return pd.DataFrame(rows)


# ---- checks and simulation ----------------------------------------------------------------

def check_responses(responses: torch.Tensor, mask: torch.Tensor | None,
                    categories: int | Sequence[int]) -> None:
    """Raise ValueError naming the first answered cell whose code is not an integer in
    0..K_t-1. The model does not check (no host reads in a step): it reads codes through
    y >= k comparisons, so a bad code would silently count as some other category."""
    y = torch.as_tensor(responses)
    m = torch.ones_like(y, dtype=torch.bool) if mask is None else torch.as_tensor(mask).bool()
    k = torch.as_tensor(categories if not isinstance(categories, int)
                        else [categories] * y.shape[-1]).to(y.device)
    bad = m & ((y < 0) | (y >= k) | (y != torch.round(y.double()).to(y.dtype)))
    if bool(bad.any()):
        s, t = bad.nonzero()[0].tolist()
        raise ValueError(f"row {s}, item {t}: value {float(y[s, t])} is not a category code "
                         f"0..{int(k[t]) - 1}")


def simulate(num_students: int, categories: int | Sequence[int], missing: float = 0.0,
             fixed_discrimination: float | None = None, seed: int = 0
             ) -> dict[str, torch.Tensor]:
    """Draw an exam from the model's story: theta ~ N(0, 1), a ~ LogNormal(0, 0.5) (or fixed),
    thresholds of item t = location_t + sorted N(0, 1) draws (K_t - 1 of them, at least 0.3
    apart; a binary item's single threshold = location_t ~ N(0, 1)). Answers are missing
    completely at random with probability ``missing`` (each student and item keeps one).

    ``categories`` is a list of K_t (its length is the number of items). Returns tensors:
    responses (N, I) float codes (0 where missing), mask (N, I) bool, ability (N,),
    discrimination (I,), thresholds (I, Kmax-1) (NaN padding)."""
    cats = list(categories)
    rng = np.random.default_rng(seed)
    n, num_items, kmax = num_students, len(cats), max(cats)
    theta = rng.standard_normal(n)
    a = (np.full(num_items, fixed_discrimination) if fixed_discrimination is not None
         else np.exp(0.5 * rng.standard_normal(num_items)))
    thresholds = np.full((num_items, kmax - 1), np.nan)
    for t, k in enumerate(cats):
        loc = rng.standard_normal()
        if k == 2:
            thresholds[t, 0] = loc
            continue
        cuts = np.sort(rng.standard_normal(k - 1))
        cuts = cuts - cuts.mean() + loc
        for j in range(1, k - 1):  # keep categories apart
            cuts[j] = max(cuts[j], cuts[j - 1] + 0.3)
        thresholds[t, :k - 1] = cuts
    # y = number of thresholds passed: P(y >= k) = sigmoid(a (theta - b_k))
    u = rng.random((n, num_items))
    p_at_least = 1.0 / (1.0 + np.exp(-a[None, :, None] * (theta[:, None, None]
                                                            - thresholds[None])))
    y = (np.nan_to_num(p_at_least, nan=0.0) > u[..., None]).sum(-1).astype(np.float32)
    mask = rng.random((n, num_items)) >= missing
    mask[np.arange(n), rng.integers(0, num_items, n)] = True
    mask[rng.integers(0, n, num_items), np.arange(num_items)] = True
    y = np.where(mask, y, 0.0).astype(np.float32)
    return {"responses": torch.from_numpy(y), "mask": torch.from_numpy(mask),
            "ability": torch.from_numpy(theta).float(),
            "discrimination": torch.from_numpy(a).float(),
            "thresholds": torch.from_numpy(thresholds).float()}


__all__ = ["MarginalIRT", "PRIORS", "FirstBatchInit", "gauss_hermite", "make_guide",
           "laplace_approximation",
           "guide_mode", "item_estimates",
           "posterior_draws", "item_table", "check_responses", "simulate"]
