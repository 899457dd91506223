"""Marginal exam models: each student's ability integrated out exactly, items the only latents.

For student s (the data plate ``data``, subsampled by the engine) and item t:

    theta_s ~ N(0, 1)                                              (fixes the scale)
    graded response model (Samejima), K_t ordered categories 0..K_t-1 per item:
        P(y_st >= k | theta) = sigmoid(a_t (theta - b_tk)),   k = 1..K_t-1,
        b_t1 < b_t2 < ... < b_t,K_t-1                          (ordered thresholds)
        P(y_st = k | theta)  = P(y_st >= k) - P(y_st >= k+1)   (P(y >= 0) = 1, P(y >= K_t) = 0)
    generalized partial credit model (Muraki), ``response_model="partial_credit"``:
        P(y_st = k | theta) proportional to exp(sum_{j=1..k} a_t (theta - b_tj)),  k = 0..K_t-1
        (the empty sum, 0, for k = 0): adjacent categories have log odds
        log P(y = k) / P(y = k-1) = a_t (theta - b_tj) at j = k, the step difficulties
        b_t1..b_t,K_t-1 unordered (a reversed pair is a category that is never the most
        likely one)
    binary items are the K_t = 2 case of both: the 2PL  P(y_st = 1 | theta) =
    sigmoid(a_t (theta - b_t)), so binary and polytomous items mix in one exam;
    ``fixed_discrimination=1.0`` gives the 1PL (Rasch) and its graded form, or with the
    partial credit response model the partial credit model (PCM, Masters).

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
    partial credit models: log_discrimination as above (not with a fixed a) and
    step_difficulty     (G,)  plate ``steps``: b_tj ~ N(0, 2^2), the G = sum_t (K_t - 1) steps
                              of all items, item by item (item 1's steps, then item 2's ...)

``priors="flat"`` widens them to N(0, 10^2) for log a and log gaps, N(0, 100^2) for b and
the steps.
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

import math
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
             "log_threshold_gaps": (0.0, 1.0), "step_difficulty": (0.0, 2.0)},
    "flat": {"log_discrimination": (0.0, 10.0), "difficulty": (0.0, 100.0),
             "log_threshold_gaps": (0.0, 10.0), "step_difficulty": (0.0, 100.0)},
}
#: the response models of :class:`MarginalIRT` (module docstring)
RESPONSE_MODELS = ("graded", "partial_credit")
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
    """2PL / 1PL / graded response / (generalized) partial credit model with each ability
    integrated out by quadrature.

    Args:
        num_items: I, the number of items (columns of the response table).
        categories: K_t, the number of answer categories of each item (an int for all items
            or one per item; 2 = a binary item, the 2PL). Responses are coded 0..K_t-1.
        fixed_discrimination: None (default) estimates a_t; a number fixes every a_t to it
            (1.0: the 1PL / Rasch model, and its graded form; the PCM with partial credit).
        response_model: ``"graded"`` (default: Samejima's graded response model, ordered
            thresholds ``thresholds``) or ``"partial_credit"`` (the generalized partial credit
            model, unordered step difficulties ``steps``); the same 2PL for binary items.
        priors: ``"weak"`` (default) or ``"flat"``; see :data:`PRIORS`.
        prior_overrides: (loc, scale) per site name to replace a preset's Normal prior, e.g.
            ``{"difficulty": (0.0, 3.0)}``.
        num_nodes: Q, Gauss-Hermite nodes of the marginal likelihood (21 as mirt's default).
    """

    student_plate = "data"
    item_plate = "items"
    gap_plate = "threshold_gaps"
    step_plate = "steps"

    def __init__(self, num_items: int, categories: int | Sequence[int] = 2, *,
                 fixed_discrimination: float | None = None,
                 response_model: str = "graded", priors: str = "weak",
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
        if response_model not in RESPONSE_MODELS:
            raise ValueError(f"unknown response_model {response_model!r}; choose one of "
                             f"{RESPONSE_MODELS}")
        self.response_model = response_model
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
        self.num_gaps = len(slots) if response_model == "graded" else 0
        # partial credit: the padded (item, step) slot of each of the G free steps
        self.register_buffer("step_slots", self.valid_threshold.flatten().nonzero().squeeze(-1))
        self.num_steps = len(self.step_slots) if response_model == "partial_credit" else 0

    # ---- item parameters ------------------------------------------------------------------
    @property
    def latent_sites(self) -> tuple[str, ...]:
        """Names of the latent sites of this instance, in table order."""
        names = () if self.fixed_discrimination is not None else ("log_discrimination",)
        if self.response_model == "partial_credit":
            return names + ("step_difficulty",)
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
            if self.response_model == "graded":
                latents["difficulty"] = pyro.sample("difficulty",
                                                    self._prior("difficulty", zero))
        if self.num_steps:
            with pyro.plate(self.step_plate, self.num_steps, dim=-1):
                latents["step_difficulty"] = pyro.sample(
                    "step_difficulty", self._prior("step_difficulty", zero))
        if self.num_gaps:
            with pyro.plate(self.gap_plate, self.num_gaps, dim=-1):
                latents["log_threshold_gaps"] = pyro.sample(
                    "log_threshold_gaps", self._prior("log_threshold_gaps", zero))
        return self.item_parameters(latents)

    def item_parameters(self, latents: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Latent site values (leading batch dims allowed, e.g. posterior draws (S, I)) -> the
        natural item parameters: ``discrimination`` a (..., I) and, for the graded model,
        ``thresholds`` b (..., I, Kmax-1), each item's first K_t - 1 thresholds increasing;
        for the partial credit model ``steps`` b (..., I, Kmax-1), item t's step difficulties
        b_t1..b_t,K_t-1 in its first K_t - 1 slots (a binary item's one step is its 2PL
        difficulty). Padding slots hold finite filler values, masked everywhere."""
        if self.response_model == "partial_credit":
            return self._partial_credit_parameters(latents)
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

    def _partial_credit_parameters(self, latents: dict[str, torch.Tensor]
                                   ) -> dict[str, torch.Tensor]:
        """``step_difficulty`` (..., G) -> ``steps`` (..., I, Kmax-1) (0 in the padding
        slots) and ``discrimination`` (..., I)."""
        free = latents["step_difficulty"]
        batch = free.shape[:-1]
        steps = free.new_zeros(*batch, self.num_items * (self.max_categories - 1))
        steps = steps.index_copy(-1, self.step_slots, free)
        steps = steps.reshape(*batch, self.num_items, self.max_categories - 1)
        if self.fixed_discrimination is None:
            a = latents["log_discrimination"].exp()
        else:
            a = torch.full_like(steps[..., 0], self.fixed_discrimination)
        return {"discrimination": a, "steps": steps}

    def initial_values(self, responses: torch.Tensor, mask: torch.Tensor | None = None
                       ) -> dict[str, torch.Tensor]:
        """Data-driven starting values of the latent sites (for ``init_to_value``): a_t = 1
        and b_tk = -1.16 logit(share of answered y_st >= k), the thresholds a = 1 items would
        have under theta ~ N(0, 1); gaps at least 0.05. Partial credit models: see
        :meth:`_partial_credit_start`. Reads the data on the host once."""
        y = torch.as_tensor(responses).detach().double().cpu()
        m = (torch.ones_like(y, dtype=torch.bool) if mask is None
             else torch.as_tensor(mask).detach().bool().cpu())
        dtype = torch.get_default_dtype()
        if self.response_model == "partial_credit":
            a, steps = self._partial_credit_start(y, m)
            values = {"step_difficulty": steps.flatten()[self.step_slots.cpu()].to(dtype)}
            if self.fixed_discrimination is None:
                values["log_discrimination"] = a.log().to(dtype)
            return {k: v.to(self.nodes.device) for k, v in values.items()}
        answered = m.sum(0).double()
        b = torch.zeros(self.num_items, self.max_categories - 1, dtype=torch.float64)
        for k in range(1, self.max_categories):
            share = ((y >= k) & m).sum(0) / answered.clamp_min(1.0)
            share = ((share * answered + 0.5) / (answered + 1.0)).clamp(1e-4, 1 - 1e-4)
            b[:, k - 1] = -_MARGINAL_SLOPE * torch.logit(share)
        values = {"difficulty": b[:, 0].to(dtype)}
        if self.fixed_discrimination is None:
            values["log_discrimination"] = torch.zeros(self.num_items, dtype=dtype)
        if self.num_gaps:
            gaps = (b[:, 1:] - b[:, :-1]).clamp_min(0.05).log()
            values["log_threshold_gaps"] = gaps[self.valid_gap.cpu()].to(dtype)
        return {k: v.to(self.nodes.device) for k, v in values.items()}

    def _partial_credit_start(self, y: torch.Tensor, m: torch.Tensor
                              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Starting a (I,) and steps (I, Kmax-1) of a partial credit model from answers y
        (N, I) float64 and mask m (N, I) bool on the host, in two moves:

        a_t = 1.702 rho / sqrt(1 - rho^2) (within 0.2..4; or the fixed a), the
        factor-analytic slope with the ad hoc polyserial correlation rho = r sd(y_t) /
        sum_k phi(tau_tk) (Olsson et al. 1982: tau_tk = Phi^-1(share of answers below k), r
        the correlation of item t's code with the student's mean score, as a share of the
        top code, on the other answered items) for the loading, a formula for cumulative
        (graded) slopes: on simulated 4-category GPCM exams (2000 x 10) it came out about
        1.6 times the MML a, whose adjacent-category slope is smaller, yet correlated
        0.5-0.95 with the truth, which Adam fixes in its first hundred steps;
        steps: given that a, the maximum of item t's own marginal likelihood
        sum_k n_tk log integral P(k | theta) N(theta; 0, 1) dtheta (n_tk answers in category
        k, plus 0.5; so the model's category shares match the observed ones), by L-BFGS on
        the Gauss-Hermite rule, within +-6."""
        kmax, valid = self.max_categories, self.valid.cpu()
        top = torch.tensor(self.categories, dtype=torch.float64) - 1.0
        if self.fixed_discrimination is not None:
            a = torch.full((self.num_items,), self.fixed_discrimination, dtype=torch.float64)
        else:
            share = torch.where(m, y / top, 0.0)
            answered = m.double()
            rest = ((share.sum(1, keepdim=True) - share)
                    / (answered.sum(1, keepdim=True) - answered).clamp_min(1.0))
            count = answered.sum(0).clamp_min(2.0)

            def centred(x: torch.Tensor) -> torch.Tensor:
                return torch.where(m, x - (x * answered).sum(0) / count, 0.0)

            ys, rs = centred(torch.where(m, y, 0.0)), centred(rest)
            r = (ys * rs).sum(0) / ((ys ** 2).sum(0) * (rs ** 2).sum(0)).sqrt().clamp_min(1e-12)
            below = torch.stack([((y < k) & m).sum(0) for k in range(1, kmax)], -1) / count[:, None]
            tau = torch.distributions.Normal(0.0, 1.0).icdf(below.double().clamp(1e-4, 1 - 1e-4))
            density = torch.where(self.valid_threshold.cpu(), (-0.5 * tau ** 2).exp(), 0.0)
            rho = r * ((ys ** 2).sum(0) / count).sqrt() / (density.sum(-1) / math.sqrt(2 * math.pi))
            rho = rho.clamp(0.05, 0.9)
            a = (1.702 * rho / (1.0 - rho ** 2).sqrt()).clamp(0.2, 4.0)
        counts = torch.stack([((y == k) & m).sum(0) for k in range(kmax)], -1).double() + 0.5
        counts = torch.where(valid, counts, 0.0)                             # (I, Kmax)
        steps = -(counts[:, 1:] / counts[:, :-1]).log().clamp(-6, 6) / a.unsqueeze(-1)
        steps = torch.where(self.valid_threshold.cpu(), steps, 0.0).requires_grad_(True)
        nodes, log_w = gauss_hermite(41)
        optimizer = torch.optim.LBFGS([steps], lr=1.0, max_iter=100, tolerance_grad=1e-8,
                                      line_search_fn="strong_wolfe")
        cpu = MarginalIRT(self.num_items, self.categories, response_model="partial_credit")

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            log_p = cpu.category_log_probs(nodes, {"discrimination": a, "steps": steps})
            marginal = torch.logsumexp(log_p + log_w[:, None, None], 0)      # (I, Kmax)
            loss = -(counts * torch.where(valid, marginal, 0.0)).sum() / counts.sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            optimizer.step(closure)
        return a, steps.detach().clamp(-6.0, 6.0)

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
        sigmoid(-z) (1 - exp(z - x)) keeps it stable in the tails).

        Partial credit models (items with ``steps`` b): log P(y = k) = log_softmax over
        k = 0..K_t-1 of the cumulative sums sum_{j<=k} a (theta - b_j) (0 for k = 0)."""
        if self.response_model == "partial_credit":
            return self._partial_credit_log_probs(theta, items)
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
            # (..., I, Kmax-2); a gap too small for the dtype (far prior draws) gives the
            # smallest finite log, never -inf (0 * -inf would be NaN in the counts product)
            spread = (a.unsqueeze(-1) * gaps).clamp_min(torch.finfo(gaps.dtype).tiny)
            between = torch.log(-torch.expm1(-spread))
            pad = torch.zeros_like(between[..., :1])
            between = torch.cat([pad, between, pad], -1)
            log_p = log_p + torch.where(self.middle, between, 0.0).unsqueeze(-3)
        return torch.where(self.valid, log_p, 0.0)

    def _partial_credit_log_probs(self, theta: torch.Tensor, items: dict[str, torch.Tensor]
                                  ) -> torch.Tensor:
        """:meth:`category_log_probs` of the generalized partial credit model: theta (T,),
        ``discrimination`` (..., I), ``steps`` (..., I, Kmax-1) -> (..., T, I, Kmax)."""
        a = items["discrimination"]
        b = torch.where(self.valid_threshold, items["steps"],
                        torch.zeros((), dtype=a.dtype, device=a.device))
        eta = a[..., None, :, None] * (theta[:, None, None] - b[..., None, :, :])
        logits = torch.cat([torch.zeros_like(eta[..., :1]), eta.cumsum(-1)], -1)
        logits = torch.where(self.valid, logits, -math.inf)   # padding: no probability
        return torch.where(self.valid, torch.log_softmax(logits, -1), 0.0)

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
        dtype = items["discrimination"].dtype
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

    @torch.no_grad()
    def replicate(self, items: dict[str, torch.Tensor], num_students: int) -> torch.Tensor:
        """Answers of ``num_students`` students drawn from the model given one set of item
        parameters ((I,) / (I, Kmax-1), :meth:`item_parameters`): theta ~ N(0, 1) (the
        ability this model integrates out), y_st ~ p(y | theta_s, item t). Returns (N, I)
        float codes; uses torch's global random numbers. Posterior predictive replicates of
        an exam for ``ppl-vae check``."""
        a = items["discrimination"]
        theta = torch.randn(num_students, dtype=a.dtype, device=a.device)
        log_p = torch.where(self.valid, self.category_log_probs(theta, items), -math.inf)
        return dist.Categorical(logits=log_p).sample().to(a.dtype)

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
        (B,), steps bounded by 1 logit; the derivatives of each answer's log-likelihood come
        from :meth:`_answer_derivatives` (negative curvature: a concave problem)."""
        a = items["discrimination"]
        answered = (torch.ones_like(responses, dtype=torch.bool) if mask is None else mask)
        y = torch.where(answered, responses, 0).round().long().clamp(0, self.max_categories - 1)
        m = answered.to(a.dtype)
        theta = start.clone()
        for step in range(steps):
            slope, curvature = self._answer_derivatives(theta, y, items)   # (B, I) each
            grad = (m * slope).sum(-1) - theta
            hess = (m * curvature).sum(-1) - 1.0
            move = (grad / hess).clamp(-1.0, 1.0)
            theta = theta - move
            # Newton converges quadratically from the EAP: stop once every step is tiny
            # (one host read every 4 steps)
            if step % 4 == 3 and float(move.abs().max()) < 1e-9:
                break
        return theta

    def _answer_derivatives(self, theta: torch.Tensor, y: torch.Tensor,
                            items: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """First and second derivative in theta of log P(y_st | theta_s): theta (B,), codes y
        (B, I) long -> two (B, I).

        Graded: with P*_k = P(y >= k | theta) (P*_0 = 1, P*_K = 0),
        d/dtheta log P(y = k) = a (1 - P*_k - P*_k+1),
        d2/dtheta2 = -a^2 (P*_k (1 - P*_k) + P*_k+1 (1 - P*_k+1)) < 0.
        Partial credit: d/dtheta log P(y = k) = a (k - E[y | theta]),
        d2/dtheta2 = -a^2 Var[y | theta] < 0."""
        a = items["discrimination"]
        if self.response_model == "partial_credit":
            p = self._partial_credit_log_probs(theta, items).exp()       # (B, I, Kmax)
            p = torch.where(self.valid, p, 0.0)
            k = torch.arange(self.max_categories, dtype=p.dtype, device=p.device)
            mean = p @ k
            variance = (p @ k ** 2 - mean ** 2).clamp_min(0.0)
            return a * (y.to(a.dtype) - mean), -a ** 2 * variance
        th = torch.where(self.valid_threshold, items["thresholds"], 0.0)
        p = torch.sigmoid(a.unsqueeze(-1) * (theta[:, None, None] - th))  # (B, I, Kmax-1)
        p = torch.where(self.valid_threshold, p, 0.0)
        ext = torch.cat([torch.ones_like(p[..., :1]), p, torch.zeros_like(p[..., :1])], -1)
        lo = ext.gather(-1, y.unsqueeze(-1)).squeeze(-1)
        hi = ext.gather(-1, y.unsqueeze(-1) + 1).squeeze(-1)
        return a * (1.0 - lo - hi), -a ** 2 * (lo * (1.0 - lo) + hi * (1.0 - hi))


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
    """``init_loc_fn`` of an autoguide over an exam program with ``latent_sites``,
    ``initial_values(responses, mask)`` and ``last_batch`` (:class:`MarginalIRT`, the
    multidimensional model): the data-driven starting values from the batch the model is
    called with when the guide builds its prototype (the engine's first minibatch), so a
    guide can be built before any data is seen (as a run is, from its spec). Other sites:
    their prior median."""

    def __init__(self, model: MarginalIRT):
        self.model = model

    def __call__(self, site: dict) -> torch.Tensor:
        from pyro.infer.autoguide import init_to_median

        batch = getattr(self.model, "last_batch", None)
        if batch is None or site["name"] not in self.model.latent_sites:
            return init_to_median(site)
        value = self.model.initial_values(*batch)[site["name"]]
        try:  # the prior's mean: device, dtype and shape of the site
            ref = site["fn"].mean
        except NotImplementedError:  # e.g. LKJCholesky: a draw has them too
            ref = site["fn"].sample()
        return value.to(device=ref.device, dtype=ref.dtype).expand(ref.shape).clone()


def laplace_approximation(model: MarginalIRT, guide: nn.Module, responses: torch.Tensor,
                          mask: torch.Tensor | None = None) -> nn.Module:
    """The Laplace approximation of the item posterior at the mode of a point guide (AutoDelta
    or AutoLaplaceApproximation trained to the marginal MAP): an AutoMultivariateNormal guide
    N(mode, H^-1), H the exact Hessian of the negative log joint over all students (all sites
    are real-valued, so no change of variables enters), in closed form from the quadrature
    posterior (:func:`ppl_vae.models.irt_information.marginal_hessian`: a few matrix products
    over the students instead of one backward pass per latent number)."""
    from .irt_information import laplace_guide

    args, kwargs = guide_call(guide, responses, mask)
    values = guide_mode(model, guide, responses, mask)
    return laplace_guide(model, values, responses, mask, args, kwargs)


def guide_call(guide: nn.Module, responses: torch.Tensor, mask: torch.Tensor | None):
    """Arguments that run a guide of item (global) sites cheaply: two students, the full
    size (any exam program with the ``(responses, mask, size=, subsample=)`` call form)."""
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
    args, kwargs = guide_call(guide, responses, mask)
    try:
        mode = guide.median(*args, **kwargs)
    except NotImplementedError:  # AutoLaplaceApproximation: a point mass, its draw is the mode
        mode = guide(*args, **kwargs)
    return {k: mode[k].detach() for k in model.latent_sites}


@torch.no_grad()
def item_estimates(model: MarginalIRT, guide: nn.Module, responses: torch.Tensor,
                   mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Item parameters at the guide's mode (its median in the unconstrained space, where
    every site here lives): ``discrimination`` (I,), ``thresholds`` (graded) or ``steps``
    (partial credit) (I, Kmax-1), on the CPU.
    For AutoDelta / AutoLaplaceApproximation this is the marginal MAP estimate."""
    return {k: v.detach().cpu() for k, v in model.item_parameters(
        guide_mode(model, guide, responses, mask)).items()}


@torch.no_grad()
def posterior_draws(model: MarginalIRT, guide: nn.Module, responses: torch.Tensor,
                    mask: torch.Tensor | None = None, num_samples: int = 2000, seed: int = 0
                    ) -> dict[str, torch.Tensor]:
    """Draws of the latent item sites (S, I) / (S, G) from the guide, on the CPU."""
    args, kwargs = guide_call(guide, responses, mask)
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
    for a binary item, ``b1``..``b{K-1}`` (thresholds) for a graded one, ``step1``..
    ``step{K-1}`` (step difficulties b_tj) for a partial credit one), ``mean``, ``sd``, ``mode``
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
        key, prefix = (("steps", "step") if model.response_model == "partial_credit"
                       else ("thresholds", "b"))
        for k in range(num_thresholds):
            name = "b" if num_thresholds == 1 else f"{prefix}{k + 1}"
            columns.append((name, draws[key][:, t, k], mode[key][t, k]))
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
                    categories: int | Sequence[int], *, source: str | None = None,
                    student_ids: Sequence[str] | None = None,
                    item_ids: Sequence[str] | None = None,
                    lines: Sequence[int] | None = None) -> None:
    """Raise ValueError naming the first answered cell of ``responses`` (N, I) whose code is
    not an integer in 0..K_t-1. The model does not check (no host reads in a step): it reads
    codes through y >= k comparisons, so a bad code would silently count as some other
    category. With ``item_ids`` the message names the file ``source``, the line (``lines``:
    each student's line in a wide CSV) or the student, and the item, as the readers do;
    without, the 0-based row and item."""
    y = torch.as_tensor(responses)
    m = torch.ones_like(y, dtype=torch.bool) if mask is None else torch.as_tensor(mask).bool()
    k = torch.as_tensor(categories if not isinstance(categories, int)
                        else [categories] * y.shape[-1]).to(y.device)
    bad = m & ((y < 0) | (y >= k) | (y != torch.round(y.double()).to(y.dtype)))
    if not bool(bad.any()):
        return
    s, t = bad.nonzero()[0].tolist()
    what = f"is not a category code 0..{int(k[t]) - 1}"
    if item_ids is None:
        raise ValueError(f"row {s}, item {t}: value {float(y[s, t])} {what}")
    where = (f"line {lines[s]}, column {item_ids[t]!r}" if lines is not None else
             f"student {(student_ids[s] if student_ids else s)!r}, item {item_ids[t]!r}")
    raise ValueError(f"{source or '<memory>'}: {where}: value {float(y[s, t]):g} {what} "
                     f"(the run's item {item_ids[t]!r} has {int(k[t])} categories)")


def simulate(num_students: int, categories: int | Sequence[int], missing: float = 0.0,
             fixed_discrimination: float | None = None, seed: int = 0,
             response_model: str = "graded") -> dict[str, torch.Tensor]:
    """Draw an exam from the model's story: theta ~ N(0, 1), a ~ LogNormal(0, 0.5) (or fixed),
    a binary item's single threshold = location_t ~ N(0, 1); graded items: thresholds =
    location_t + sorted N(0, 1) draws (K_t - 1 of them, centred, at least 0.3 apart);
    partial credit items (``response_model="partial_credit"``): step difficulties =
    location_t + the same draws centred but in their drawn order (unordered, as the model
    allows). Answers are missing completely at random with probability ``missing`` (each
    student and item keeps one).

    ``categories`` is a list of K_t (its length is the number of items). Returns tensors:
    responses (N, I) float codes (0 where missing), mask (N, I) bool, ability (N,),
    discrimination (I,), and ``thresholds`` (graded) or ``steps`` (partial credit)
    (I, Kmax-1) (NaN padding)."""
    if response_model not in RESPONSE_MODELS:
        raise ValueError(f"unknown response_model {response_model!r}; choose one of "
                         f"{RESPONSE_MODELS}")
    cats = list(categories)
    rng = np.random.default_rng(seed)
    n, num_items, kmax = num_students, len(cats), max(cats)
    theta = rng.standard_normal(n)
    a = (np.full(num_items, fixed_discrimination) if fixed_discrimination is not None
         else np.exp(0.5 * rng.standard_normal(num_items)))
    graded = response_model == "graded"
    thresholds = np.full((num_items, kmax - 1), np.nan)
    for t, k in enumerate(cats):
        loc = rng.standard_normal()
        if k == 2:
            thresholds[t, 0] = loc
            continue
        draws = rng.standard_normal(k - 1)
        if not graded:
            thresholds[t, :k - 1] = draws - draws.mean() + loc
            continue
        cuts = np.sort(draws)
        cuts = cuts - cuts.mean() + loc
        for j in range(1, k - 1):  # keep categories apart
            cuts[j] = max(cuts[j], cuts[j - 1] + 0.3)
        thresholds[t, :k - 1] = cuts
    u = rng.random((n, num_items))
    eta = a[None, :, None] * (theta[:, None, None] - thresholds[None])   # (N, I, Kmax-1)
    if graded:  # y = number of thresholds passed: P(y >= k) = sigmoid(a (theta - b_k))
        p_at_least = 1.0 / (1.0 + np.exp(-eta))
        y = (np.nan_to_num(p_at_least, nan=0.0) > u[..., None]).sum(-1)
    else:  # P(y = k) proportional to exp(sum_{j<=k} a (theta - b_j)); inverse CDF of u
        logits = np.concatenate([np.zeros((n, num_items, 1)), np.cumsum(eta, -1)], -1)
        logits = np.where(np.arange(kmax) < np.array(cats)[:, None], logits, -np.inf)
        p = np.exp(logits - logits.max(-1, keepdims=True))
        cdf = np.cumsum(p / p.sum(-1, keepdims=True), -1)
        y = np.minimum((cdf[..., :-1] < u[..., None]).sum(-1), np.array(cats) - 1)
    y = y.astype(np.float32)
    mask = rng.random((n, num_items)) >= missing
    mask[np.arange(n), rng.integers(0, num_items, n)] = True
    mask[rng.integers(0, n, num_items), np.arange(num_items)] = True
    y = np.where(mask, y, 0.0).astype(np.float32)
    return {"responses": torch.from_numpy(y), "mask": torch.from_numpy(mask),
            "ability": torch.from_numpy(theta).float(),
            "discrimination": torch.from_numpy(a).float(),
            "thresholds" if graded else "steps": torch.from_numpy(thresholds).float()}


__all__ = ["MarginalIRT", "PRIORS", "RESPONSE_MODELS", "FirstBatchInit", "gauss_hermite",
           "make_guide",
           "laplace_approximation",
           "guide_mode", "item_estimates",
           "posterior_draws", "item_table", "check_responses", "simulate"]
