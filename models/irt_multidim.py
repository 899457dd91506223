"""Multidimensional exam models: the compensatory multidimensional 2PL with D abilities.

For student s (the data plate ``data``, subsampled by the engine) and item t:

    theta_s ~ N(0, R)                       D abilities; R a correlation matrix (fixes scales)
    P(y_st = 1 | theta_s) = sigmoid(a_t . theta_s + d_t)     slope-intercept form
    y_st ~ Bernoulli(P), only where answered (the mask); b_t = -d_t / |a_t| is reported too

Loading patterns (which a_tj are free; the others are 0):

    confirmatory   a Q-matrix (I, D) of 0/1 given by the user: a_tj free where q_tj = 1;
                   factors correlated by default (R learned), or uncorrelated (R = I)
    exploratory    no Q-matrix: the identified lower-triangular pattern a_tj = 0 for j > t
                   (item 1 loads on factor 1 only, item 2 on factors 1-2, ...), R = I; the
                   reported loadings are also given after a varimax rotation (Kaiser 1958,
                   :func:`varimax`, numpy) for interpretable factors

Latent sites (item plate ``items``, loading plate ``free_loadings``; Normal priors, so with the
``flat`` preset a posterior mode is the marginal maximum-likelihood estimate mirt gives):

    loadings         (F,)   the F free loadings a_tj (row-major over (t, j) where free)
    intercept        (I,)   d_t
    factor_cholesky  (D, D) Cholesky factor L of R, R = L L^T ~ LKJ(eta): correlated only

Two ways to fit, as the number of abilities allows:

    D <= 2  marginal: theta integrated out exactly by tensor-product Gauss-Hermite
            quadrature (Q^D nodes z_q, weights w_q; theta_q = L z_q), written as
            ``pyro.factor("responses", log p(y_s | items))`` in the student plate:
                log p(y_s | items) = logsumexp_q [log w_q + sum_t m_st log p(y_st | theta_q)]
                sum_t m_st log p(y_st | theta) = m_s . log sigmoid(-eta) + (y_s m_s) . eta,
                eta_t = a_t . theta + d_t       (two (B, I) @ (I, Q^D) matrix products)
            items by marginal MAP (AutoDelta through the engine), their posterior by the
            Laplace approximation; abilities (EAP, sd) by quadrature given the items.
    D >= 3  amortized: the joint model with an ``ability`` site (B, D) in the student plate,
            an encoder q(theta_s | y_s) = N(mu, L L^T) with full covariance (the lecture's
            Algorithm 2, :class:`ppl_vae.guides.fullcov.AmortizedFullCovNormal`), items by
            AutoDelta, trained on the importance-weighted bound with K particles (the
            approach of deepirtools' I-WAVE, Urban & Bauer 2021). Abilities: the encoder's
            mean and sd, and self-normalized importance-weighted means; log p(y_s | items)
            by importance sampling (:func:`importance_abilities`).

Units: log densities in nats; abilities on the logit scale of theta_j ~ N(0, 1).
Call form (the engine's convention): ``model(responses, mask, size=N, subsample=idx)`` with
``responses`` (B, I) float 0/1 (any value where masked) and ``mask`` (B, I) bool.
"""

from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from torch import nn
from torch.nn.functional import logsigmoid

from ppl_vae.program import SetupError

from .irt_marginal import FirstBatchInit, gauss_hermite, guide_call

#: prior (loc, scale) of the Normal item sites and the LKJ concentration, by preset
PRIORS = {
    "weak": {"loadings": (0.0, 1.5), "intercept": (0.0, 3.0), "lkj_concentration": 2.0},
    "flat": {"loadings": (0.0, 10.0), "intercept": (0.0, 100.0), "lkj_concentration": 1.0},
}
#: logistic ~ normal-ogive scale factor: sigmoid(x) ~ Phi(x / 1.702)
_PROBIT = 1.702
MARGINAL_MAX_DIMS = 2  # quadrature up to this many abilities; the amortized guide above


def quadrature_rule(num_nodes: int, dims: int, dtype: torch.dtype = torch.float64
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Tensor-product Gauss-Hermite rule for N(0, I_D): nodes (Q^D, D) and log weights
    (Q^D,), weights summing to 1 (exact for polynomials of degree <= 2Q - 1 per axis)."""
    x, log_w = gauss_hermite(num_nodes, dtype)
    grid = torch.cartesian_prod(*[x] * dims).reshape(-1, dims)
    log_weights = torch.cartesian_prod(*[log_w] * dims).reshape(-1, dims).sum(-1)
    return grid, log_weights


class MultidimIRT(nn.Module):
    """The compensatory multidimensional 2PL (module docstring).

    Args:
        num_items: I, columns of the response table.
        dims: D, the number of abilities (1 is the ordinary 2PL in slope-intercept form).
        q_matrix: (I, D) 0/1 loading pattern (confirmatory), or None (exploratory: the
            lower-triangular pattern).
        correlated: learn the factor correlation R (default: True with a Q-matrix, else
            False; an exploratory fit cannot have it: its rotation is not identified).
        method: ``marginal`` (abilities integrated out by quadrature, D <= 2) or
            ``amortized`` (the joint model with an ``ability`` site, any D).
        priors: ``flat`` (default: modes = marginal ML estimates) or ``weak``; see
            :data:`PRIORS`. ``prior_overrides``: (loc, scale) per Normal site.
        num_nodes: Gauss-Hermite nodes per dimension of the marginal likelihood (Q^D in all).
    """

    student_plate = "data"
    item_plate = "items"
    loading_plate = "free_loadings"
    dims_of_sites = {"loadings": ["loading"], "intercept": ["item"],
                     "factor_cholesky": ["factor", "factor_"], "ability": ["student", "factor"]}

    def __init__(self, num_items: int, dims: int, q_matrix: Any = None,
                 correlated: bool | None = None, method: str = "marginal",
                 priors: str = "flat",
                 prior_overrides: dict[str, tuple[float, float]] | None = None,
                 num_nodes: int = 21):
        super().__init__()
        self.num_items, self.dims = int(num_items), int(dims)
        if self.dims < 1:
            raise ValueError(f"dims must be >= 1, got {dims}")
        if method not in ("marginal", "amortized"):
            raise ValueError(f"method must be marginal or amortized, got {method!r}")
        if method == "marginal" and self.dims > MARGINAL_MAX_DIMS:
            raise ValueError(f"quadrature over {self.dims} dimensions ({num_nodes}^{self.dims} "
                             f"nodes) is too costly; use method='amortized' for D >= 3")
        if priors not in PRIORS:
            raise ValueError(f"unknown priors {priors!r}; choose one of {sorted(PRIORS)}")
        self.confirmatory = q_matrix is not None
        if self.confirmatory:
            pattern = torch.as_tensor(np.asarray(q_matrix), dtype=torch.float64) != 0
            if tuple(pattern.shape) != (self.num_items, self.dims):
                raise ValueError(f"q_matrix has shape {tuple(pattern.shape)}, expected "
                                 f"({self.num_items}, {self.dims})")
        else:
            if self.num_items < self.dims:
                raise ValueError(f"an exploratory fit of {self.dims} dimensions needs at least "
                                 f"{self.dims} items, got {self.num_items}")
            pattern = torch.ones(self.num_items, self.dims).tril().bool()
        self.correlated = bool(self.confirmatory if correlated is None else correlated)
        if self.correlated and not self.confirmatory:
            raise ValueError("an exploratory fit (no Q-matrix) keeps its factors uncorrelated: "
                             "the lower-triangular pattern identifies only orthogonal "
                             "rotations; give a Q-matrix for correlated factors")
        if self.correlated and self.dims < 2:
            self.correlated = False
        self.method = method
        self.priors = {**PRIORS[priors], **(prior_overrides or {})}
        self.register_buffer("pattern", pattern)                            # (I, D) bool
        slots = pattern.flatten().nonzero().squeeze(-1)
        scatter = torch.zeros(len(slots), pattern.numel(), dtype=torch.float64)
        scatter[torch.arange(len(slots)), slots] = 1.0
        self.register_buffer("loading_scatter", scatter)                    # (F, I*D)
        self.num_loadings = len(slots)
        self.num_nodes = int(num_nodes)
        if method == "marginal":
            nodes, log_weights = quadrature_rule(self.num_nodes, self.dims)
            self.register_buffer("nodes", nodes)                            # (Q^D, D)
            self.register_buffer("log_weights", log_weights)                # (Q^D,)

    # ---- item parameters ------------------------------------------------------------------
    @property
    def latent_sites(self) -> tuple[str, ...]:
        """Names of the item-level latent sites, in table order."""
        return ("loadings", "intercept") + (("factor_cholesky",) if self.correlated else ())

    def _normal(self, site: str, zero: torch.Tensor) -> dist.Normal:
        loc, scale = self.priors[site]
        return dist.Normal(zero + loc, zero + scale)

    def sample_items(self, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Sample the item sites from their priors; returns :meth:`item_parameters`."""
        zero = torch.zeros((), device=device, dtype=dtype)
        latents = {}
        with pyro.plate(self.loading_plate, self.num_loadings, dim=-1):
            latents["loadings"] = pyro.sample("loadings", self._normal("loadings", zero))
        with pyro.plate(self.item_plate, self.num_items, dim=-1):
            latents["intercept"] = pyro.sample("intercept", self._normal("intercept", zero))
        if self.correlated:
            latents["factor_cholesky"] = pyro.sample("factor_cholesky", dist.LKJCholesky(
                self.dims, zero + self.priors["lkj_concentration"]))
        return self.item_parameters(latents)

    def item_parameters(self, latents: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Latent site values (leading dims allowed, e.g. draws (S, F)) -> ``loadings`` A
        (..., I, D) (zeros outside the pattern), ``intercept`` d (..., I), ``cholesky`` L
        (..., D, D) of the factor correlation (the identity when uncorrelated)."""
        free = latents["loadings"]
        a = (free @ self.loading_scatter.to(free.dtype)).reshape(
            *free.shape[:-1], self.num_items, self.dims)
        if self.correlated:
            chol = latents["factor_cholesky"]
        else:
            chol = torch.eye(self.dims, dtype=free.dtype, device=free.device)
        return {"loadings": a, "intercept": latents["intercept"], "cholesky": chol}

    def initial_values(self, responses: torch.Tensor, mask: torch.Tensor | None = None
                       ) -> dict[str, torch.Tensor]:
        """Data-driven starting values of the latent sites. Confirmatory: a_tj = 1/sqrt(k_t)
        on the k_t factors of item t, R = I. Exploratory: the top-D principal axes of the
        items' correlation matrix (slopes 1.702 lambda / sqrt(1 - h^2)), rotated to the
        lower-triangular pattern (a QR decomposition) with a positive diagonal. Intercepts:
        d_t = logit(share correct) sqrt(1 + |a_t|^2 / 1.702^2), the intercept such items
        would have under theta ~ N(0, I). Reads the data on the host once."""
        y = torch.as_tensor(responses).detach().double().cpu()
        m = (torch.ones_like(y) if mask is None
             else torch.as_tensor(mask).detach().double().cpu())
        answered = m.sum(0)
        share = (((y * m).sum(0) + 0.5) / (answered + 1.0)).clamp(1e-4, 1 - 1e-4)
        pattern = self.pattern.cpu()
        if self.confirmatory:
            a = pattern.double() / pattern.sum(1, keepdim=True).double().sqrt()
        else:
            centered = (y - share) * m
            pairs = (m.T @ m).clamp_min(1.0)
            cov = centered.T @ centered / pairs
            sd = cov.diagonal().clamp_min(1e-6).sqrt()
            corr = cov / sd[:, None] / sd[None, :]
            evals, evecs = torch.linalg.eigh(corr)
            top = evals.flip(0)[:self.dims].clamp_min(1e-3)
            lam = evecs.flip(1)[:, :self.dims] * top.sqrt()
            h2 = (lam ** 2).sum(1, keepdim=True)
            lam = lam * (0.8 / h2).clamp(max=1.0).sqrt()             # communality <= 0.8
            a = _PROBIT * lam / (1.0 - (lam ** 2).sum(1, keepdim=True)).sqrt()
            q, _ = torch.linalg.qr(a[:self.dims].T)                   # a[:D] q lower-triangular
            a = a @ q
            a = a * torch.sign(a.diagonal()).where(a.diagonal() != 0, torch.ones(()))
            a = torch.where(pattern, a, 0.0)
        d = torch.logit(share) * (1.0 + (a ** 2).sum(1) / _PROBIT ** 2).sqrt()
        dtype = torch.get_default_dtype()
        values = {"loadings": a.flatten()[pattern.flatten()].to(dtype),
                  "intercept": d.to(dtype)}
        if self.correlated:
            values["factor_cholesky"] = torch.eye(self.dims, dtype=dtype)
        return {k: v.to(self.pattern.device) for k, v in values.items()}

    # ---- the likelihood -------------------------------------------------------------------
    @staticmethod
    def logits(theta: torch.Tensor, items: dict[str, torch.Tensor]) -> torch.Tensor:
        """eta = a_t . theta + d_t: theta (..., T, D), items (..., I, D) / (..., I) ->
        (..., T, I) (leading dims broadcast: particles of the items and of theta)."""
        return theta @ items["loadings"].transpose(-1, -2) + items["intercept"].unsqueeze(-2)

    @staticmethod
    def log_likelihood_at(theta: torch.Tensor, responses: torch.Tensor, mask: torch.Tensor,
                          items: dict[str, torch.Tensor]) -> torch.Tensor:
        """sum_t m_st log p(y_st | theta_q) for every student and point: responses, mask
        (B, I), points theta (T, D) shared by all students -> (B, T) nats; two matrix
        products (module docstring)."""
        eta = MultidimIRT.logits(theta, items)                              # (T, I)
        m = mask.to(eta.dtype)
        return m @ logsigmoid(-eta).transpose(-1, -2) + \
            (responses.to(eta.dtype) * m) @ eta.transpose(-1, -2)

    def log_marginal(self, responses: torch.Tensor, mask: torch.Tensor | None,
                     items: dict[str, torch.Tensor], num_nodes: int | None = None
                     ) -> torch.Tensor:
        """log p(y_s | items), abilities integrated out by the tensor-product Gauss-Hermite
        rule (``num_nodes`` per dimension; None: the model's): (B,) nats."""
        dtype = items["intercept"].dtype
        if num_nodes is None or num_nodes == self.num_nodes:
            nodes, log_w = self.nodes, self.log_weights
        else:
            nodes, log_w = quadrature_rule(num_nodes, self.dims)
            nodes, log_w = nodes.to(responses.device), log_w.to(responses.device)
        if mask is None:
            mask = torch.ones_like(responses, dtype=torch.bool)
        theta = nodes.to(dtype) @ items["cholesky"].transpose(-1, -2)       # theta_q = L z_q
        ll = self.log_likelihood_at(theta, responses, mask, items)
        return torch.logsumexp(ll + log_w.to(dtype), -1)

    def model(self, responses: torch.Tensor, mask: torch.Tensor | None = None,
              size: int | None = None, subsample: torch.Tensor | None = None) -> torch.Tensor:
        """responses (B, I) 0/1, mask (B, I) bool. Marginal: returns log p(y_s | items) (B,)
        nats; amortized: the abilities (B, D)."""
        if responses.shape[-1] != self.num_items:
            raise ValueError(f"responses have {responses.shape[-1]} items, the model "
                             f"{self.num_items}")
        if mask is None:
            mask = torch.ones_like(responses, dtype=torch.bool)
        dtype = responses.dtype if responses.is_floating_point() else torch.get_default_dtype()
        self.last_batch = (responses, mask)  # for FirstBatchInit (no copy, no host read)
        items = self.sample_items(responses.device, dtype)
        with pyro.plate(self.student_plate, size or len(responses), subsample=subsample,
                        dim=-1):
            if self.method == "marginal":
                log_marginal = self.log_marginal(responses, mask, items)
                pyro.factor("responses", log_marginal)
                return log_marginal
            zero = torch.zeros(self.dims, device=responses.device, dtype=dtype)
            prior = (dist.MultivariateNormal(zero, scale_tril=items["cholesky"])
                     if self.correlated else dist.Normal(zero, 1.0).to_event(1))
            theta = pyro.sample("ability", prior)                          # (..., B, D)
            eta = self.logits(theta, items)                                 # (..., B, I)
            answers = dist.Bernoulli(logits=eta).mask(mask).to_event(1)
            pyro.sample("responses", answers, obs=torch.where(mask, responses, 0.0))
        return theta

    forward = model

    # ---- abilities given the items (quadrature, D <= 2) ------------------------------------
    @torch.no_grad()
    def abilities(self, responses: torch.Tensor, mask: torch.Tensor | None,
                  items: dict[str, torch.Tensor], num_nodes: int = 41, chunk_size: int = 2048
                  ) -> dict[str, torch.Tensor]:
        """Each student's posterior given fixed items, by quadrature with ``num_nodes`` per
        dimension: ``eap`` (N, D) posterior means, ``sd`` (N, D), ``log_marginal`` (N,)
        nats; float64 on the CPU."""
        nodes, log_w = quadrature_rule(num_nodes, self.dims)
        items = {k: v.detach().double().cpu() for k, v in items.items()}
        theta = nodes @ items["cholesky"].T
        if mask is None:
            mask = torch.ones_like(responses, dtype=torch.bool)
        out: dict[str, list] = {"eap": [], "sd": [], "log_marginal": []}
        for start in range(0, len(responses), chunk_size):
            y = responses[start:start + chunk_size].double().cpu()
            m = mask[start:start + chunk_size].cpu()
            joint = self.log_likelihood_at(theta, y, m, items) + log_w
            log_marginal = torch.logsumexp(joint, -1)
            w = torch.exp(joint - log_marginal.unsqueeze(-1))
            eap = w @ theta
            out["eap"].append(eap)
            out["sd"].append((w @ theta ** 2 - eap ** 2).clamp_min(0.0).sqrt())
            out["log_marginal"].append(log_marginal)
        return {k: torch.cat(v) for k, v in out.items()}


# ---- guides ------------------------------------------------------------------------------

def encoder_input(responses: torch.Tensor, mask: torch.Tensor | None = None, **_) -> torch.Tensor:
    """The ability encoder's input: [responses * mask, mask], (B, 2I)."""
    if mask is None:
        mask = torch.ones_like(responses, dtype=torch.bool)
    m = mask.to(responses.dtype)
    return torch.cat([responses * m, m], dim=-1)


class PointItemsAmortizedAbilities(nn.Module):
    """Guide of the amortized (joint) model: AutoDelta over the item sites (the model with
    ``ability`` hidden; started at :class:`~ppl_vae.models.irt_marginal.FirstBatchInit`)
    and q(theta_s | y_s) = N(mu, L L^T) from an MLP encoder (Algorithm 2). Attributes
    ``items``, ``local``."""

    def __init__(self, model: MultidimIRT, hidden: list[int]):
        from pyro.infer.autoguide import AutoDelta

        from ppl_vae.guides.fullcov import AmortizedFullCovNormal, FullCovEncoder

        super().__init__()
        self.items = AutoDelta(poutine.block(model, hide=["ability"]),
                               init_loc_fn=FirstBatchInit(model))
        encoder = FullCovEncoder.mlp(2 * model.num_items, list(hidden), model.dims,
                                     activation="elu")
        self.local = AmortizedFullCovNormal(encoder, site="ability", plate=model.student_plate,
                                            inputs=encoder_input)

    def forward(self, *args, size: int | None = None, subsample=None, **kwargs) -> dict:
        values = dict(self.items(*args, size=size, subsample=subsample, **kwargs))
        values["ability"] = self.local(*args, size=size, subsample=subsample, **kwargs)
        return values


def build(num_items: int, dims: int, q_matrix: Any = None, correlated: bool | None = None,
          method: str | None = None, priors: str = "flat",
          prior_overrides: dict[str, tuple[float, float]] | None = None, num_nodes: int = 21,
          hidden: list[int] | None = None) -> tuple[MultidimIRT, nn.Module]:
    """Model and guide: ``method`` None picks marginal for D <= 2, amortized above.
    Marginal: AutoDelta over the item sites (marginal MAP); amortized:
    :class:`PointItemsAmortizedAbilities` with encoder widths ``hidden`` (default [128])."""
    from pyro.infer.autoguide import AutoDelta

    method = method or ("marginal" if dims <= MARGINAL_MAX_DIMS else "amortized")
    model = MultidimIRT(num_items, dims, q_matrix, correlated, method, priors,
                        prior_overrides, num_nodes)
    if method == "marginal":
        return model, AutoDelta(model, init_loc_fn=FirstBatchInit(model))
    return model, PointItemsAmortizedAbilities(model, hidden or [128])


# ---- estimates after training --------------------------------------------------------------

def _item_guide(guide: nn.Module) -> nn.Module:
    return getattr(guide, "items", guide)


@torch.no_grad()
def guide_mode(model: MultidimIRT, guide: nn.Module, responses: torch.Tensor,
               mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The item sites at a point guide's value (AutoDelta: the marginal MAP), detached."""
    items = _item_guide(guide)
    args, kwargs = guide_call(items, responses, mask)
    mode = items.median(*args, **kwargs)
    return {k: mode[k].detach() for k in model.latent_sites}


@torch.no_grad()
def item_estimates(model: MultidimIRT, guide: nn.Module, responses: torch.Tensor,
                   mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """:meth:`MultidimIRT.item_parameters` at the guide's point, float64 on the CPU."""
    return {k: v.detach().double().cpu() for k, v in
            model.item_parameters(guide_mode(model, guide, responses, mask)).items()}


def laplace_items(model: MultidimIRT, guide: nn.Module, responses: torch.Tensor,
                  mask: torch.Tensor | None, num_samples: int = 1000, seed: int = 0
                  ) -> dict[str, torch.Tensor] | None:
    """Draws of the item parameters (S, ...) from the Laplace approximation at the marginal
    MAP of a marginal run: Pyro's AutoLaplaceApproximation started at the point guide's
    value, N(mode, H^-1) with H the Hessian of the negative log joint over all students (one
    backward pass per latent number) in the unconstrained space of the sites (the factor
    correlation through its Cholesky transform, whose log-Jacobian H includes). None (with a
    warning) where H is not positive definite."""
    from pyro.infer import autoguide

    mode = guide_mode(model, guide, responses, mask)
    laplace = autoguide.AutoLaplaceApproximation(
        model, init_loc_fn=autoguide.init_to_value(values=mode))
    args, kwargs = guide_call(guide, responses, mask)
    laplace(*args, **kwargs)  # builds its prototype at the mode
    device = args[0].device
    try:
        gaussian = laplace.laplace_approximation(
            responses.to(device), None if mask is None else mask.to(device))
    except (RuntimeError, ValueError) as e:
        warnings.warn(f"Laplace approximation failed ({str(e)[:200]}); items.csv gives the "
                      "modes without sds", stacklevel=2)
        return None
    with torch.no_grad(), poutine.seed(rng_seed=seed), \
            pyro.plate("_posterior_draws", num_samples, dim=-2):
        trace = poutine.trace(gaussian).get_trace(*args, **kwargs)
    latents = {}
    for name in model.latent_sites:
        value = trace.nodes[name]["value"].detach().cpu()
        shape = (model.dims, model.dims) if name == "factor_cholesky" else (-1,)
        latents[name] = value.reshape(num_samples, *shape).double()
    return model.item_parameters(latents)


@torch.no_grad()
def importance_abilities(model: MultidimIRT, guide: PointItemsAmortizedAbilities,
                         responses: torch.Tensor, mask: torch.Tensor,
                         items: dict[str, torch.Tensor], num_samples: int = 100,
                         batch_size: int = 1024, seed: int = 0) -> dict[str, torch.Tensor]:
    """Abilities of an amortized run given the items: the encoder's ``mean``, ``sd`` (N, D);
    with K = ``num_samples`` draws theta_k ~ q(theta | y_s), log weights
    log w_k = log p(y_s | theta_k) + log N(theta_k; 0, R) - log q(theta_k | y_s):
    ``is_mean`` (N, D) the self-normalized importance-weighted posterior means,
    ``log_marginal`` (N,) = logmeanexp_k log w_k (a lower bound on log p(y_s | items) in
    expectation, tight as K grows), ``ess`` (N,) the effective sample size. CPU, float64."""
    gen = torch.Generator().manual_seed(seed)
    items = {k: v.detach().double().cpu() for k, v in items.items()}
    prior = dist.MultivariateNormal(torch.zeros(model.dims, dtype=torch.float64),
                                    scale_tril=items["cholesky"])
    device = next(guide.local.parameters()).device
    out: dict[str, list] = {k: [] for k in ("mean", "sd", "is_mean", "log_marginal", "ess")}
    for start in range(0, len(responses), batch_size):
        y = responses[start:start + batch_size]
        m = mask[start:start + batch_size]
        q = guide.local.distribution(y.to(device), m.to(device))
        loc, tril = q.loc.double().cpu(), q.scale_tril.double().cpu()
        q = dist.MultivariateNormal(loc, scale_tril=tril)
        eps = torch.randn(num_samples, *loc.shape, generator=gen, dtype=torch.float64)
        theta = loc + (tril @ eps.unsqueeze(-1)).squeeze(-1)            # (K, B, D)
        eta = (theta @ items["loadings"].T) + items["intercept"]         # (K, B, I)
        mm = m.double().cpu()
        ll = (mm * (y.double().cpu() * eta + logsigmoid(-eta))).sum(-1)
        log_w = ll + prior.log_prob(theta) - q.log_prob(theta)           # (K, B)
        w = torch.softmax(log_w, 0)
        out["mean"].append(loc)
        out["sd"].append(tril.pow(2).sum(-1).sqrt())
        out["is_mean"].append((w.unsqueeze(-1) * theta).sum(0))
        out["log_marginal"].append(torch.logsumexp(log_w, 0) - math.log(num_samples))
        out["ess"].append(1.0 / (w ** 2).sum(0))
    return {k: torch.cat(v) for k, v in out.items()}


# ---- rotation and orientation ----------------------------------------------------------------

def varimax(loadings: np.ndarray, normalize: bool = True, max_iter: int = 500,
            tol: float = 1e-10) -> tuple[np.ndarray, np.ndarray]:
    """Varimax rotation (Kaiser 1958; the SVD algorithm of R's ``stats::varimax``, with
    Kaiser's row normalization): loadings (I, D) -> (rotated loadings A T, the orthogonal
    rotation T (D, D)). Abilities rotate with them: theta* = T^T theta, so A T theta* = A
    theta."""
    a = np.asarray(loadings, dtype=np.float64)
    num_items, dims = a.shape
    if dims < 2:
        return a.copy(), np.eye(dims)
    norms = np.sqrt((a ** 2).sum(1, keepdims=True)) if normalize else np.ones((num_items, 1))
    norms = np.where(norms > 0, norms, 1.0)
    x = a / norms
    rotation = np.eye(dims)
    criterion = 0.0
    for _ in range(max_iter):
        z = x @ rotation
        u, s, vt = np.linalg.svd(x.T @ (z ** 3 - z @ np.diag((z ** 2).sum(0)) / num_items))
        rotation = u @ vt
        previous, criterion = criterion, s.sum()
        if criterion < previous * (1 + tol):
            break
    return (x @ rotation) * norms, rotation


def orientation(loadings: np.ndarray) -> np.ndarray:
    """Signs (D,) that make each factor's loadings sum to >= 0 (a factor and its reflection
    fit equally; this picks the one where more ability means more correct answers)."""
    s = np.sign(np.asarray(loadings).sum(0))
    return np.where(s == 0, 1.0, s)


# ---- the Q-matrix file -------------------------------------------------------------------------

def read_q_matrix(path: str | Path, item_ids: list[str], dims: int | None = None) -> np.ndarray:
    """A Q-matrix CSV -> (I, D) int array of 0/1 in the order of ``item_ids`` (the response
    table's columns). Rows are items; D columns of 0/1, optionally after an item-id column
    (then rows are matched to the items by id, in any order) and under a header row.
    Without ids the rows are the items in the response table's order (a first column is
    taken for ids when there are D + 1 columns, or without ``dims`` when it holds anything
    but 0/1: names or numbers 1..I). Raises SetupError
    naming the file, line and value: wrong shape, a value that is not 0 or 1, an item with
    no loading, a factor with no item, ids that do not match the response table."""
    path = Path(path)
    if not path.exists():
        raise SetupError(f"--q-matrix {path}: no such file")
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = [(n, [c.strip() for c in row]) for n, row in enumerate(csv.reader(f), 1)
                if any(c.strip() for c in row)]
    if not rows:
        raise SetupError(f"--q-matrix {path}: the file is empty")

    def number(cell: str) -> float | None:
        try:
            return float(cell)
        except ValueError:
            return None

    width = len(rows[0][1])
    for n, row in rows:
        if len(row) != width:
            raise SetupError(f"{path}, line {n}: {len(row)} columns, the first line has {width}")
    header = any(number(c) is None for c in rows[0][1][1:]) or (
        width > 1 and number(rows[0][1][0]) is None and len(rows) == len(item_ids) + 1)
    body = rows[1:] if header else rows
    if dims is not None and width in (dims, dims + 1):
        has_ids = width == dims + 1
    else:
        has_ids = width > 1 and any(number(row[0]) not in (0.0, 1.0) for _, row in body)
    ncols = width - int(has_ids)
    if dims is not None and ncols != dims:
        raise SetupError(f"{path}: {ncols} factor columns, but --dims is {dims}")
    if ncols < 1:
        raise SetupError(f"{path}: no factor columns")
    if len(body) != len(item_ids):
        raise SetupError(f"{path}: {len(body)} item rows, the response table has "
                         f"{len(item_ids)} items (one row per item, in any order when the "
                         "first column holds the item ids)")
    values = np.zeros((len(body), ncols), dtype=np.int64)
    for r, (n, row) in enumerate(body):
        for j, cell in enumerate(row[int(has_ids):]):
            v = number(cell)
            if v not in (0.0, 1.0):
                raise SetupError(f"{path}, line {n}, column {j + 1 + int(has_ids)}: {cell!r} "
                                 "is not 0 or 1 (a Q-matrix says which factors an item "
                                 "loads on)")
            values[r, j] = int(v)
    if has_ids:
        ids = [row[0] for _, row in body]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise SetupError(f"{path}: item ids appear twice: {dupes[:5]}")
        missing = [i for i in item_ids if i not in ids]
        extra = [i for i in ids if i not in set(item_ids)]
        if missing or extra:
            raise SetupError(f"{path}: its item ids do not match the response table's columns"
                             + (f"; not in the Q-matrix: {missing[:5]}" if missing else "")
                             + (f"; not in the responses: {extra[:5]}" if extra else ""))
        lines = {i: n for i, (n, _) in zip(ids, body)}
        order = [ids.index(i) for i in item_ids]
        values = values[order]
        line_of = [lines[i] for i in item_ids]
    else:
        line_of = [n for n, _ in body]
    empty = np.flatnonzero(values.sum(1) == 0)
    if len(empty):
        t = int(empty[0])
        raise SetupError(f"{path}, line {line_of[t]}: item {item_ids[t]!r} loads on no factor "
                         "(a row of zeros); every item needs at least one 1")
    unused = np.flatnonzero(values.sum(0) == 0)
    if len(unused):
        raise SetupError(f"{path}: factor column {int(unused[0]) + 1} has no item (a column "
                         "of zeros)")
    return values


# ---- simulation ------------------------------------------------------------------------------

def simulate(num_students: int, q_matrix: np.ndarray, correlation: np.ndarray | None = None,
             missing: float = 0.0, seed: int = 0) -> dict[str, torch.Tensor]:
    """Draw an exam from the model: theta ~ N(0, R) (R = ``correlation``, default I),
    a_tj = q_tj LogNormal(0, 0.3) scaled so |a_t| ~ LogNormal(0.2, 0.3), d_t ~ N(0, 1).
    Returns responses (N, I) float, mask (N, I) bool, ability (N, D), loadings (I, D),
    intercept (I,), correlation (D, D)."""
    rng = np.random.default_rng(seed)
    q = np.asarray(q_matrix, dtype=np.float64)
    num_items, dims = q.shape
    r = np.eye(dims) if correlation is None else np.asarray(correlation, dtype=np.float64)
    theta = rng.standard_normal((num_students, dims)) @ np.linalg.cholesky(r).T
    a = q * np.exp(0.3 * rng.standard_normal(q.shape))
    a = a / np.linalg.norm(a, axis=1, keepdims=True) * np.exp(0.2 + 0.3 *
                                                              rng.standard_normal((num_items, 1)))
    d = rng.standard_normal(num_items)
    p = 1.0 / (1.0 + np.exp(-(theta @ a.T + d)))
    y = (rng.random(p.shape) < p).astype(np.float32)
    mask = rng.random(p.shape) >= missing
    mask[np.arange(num_students), rng.integers(0, num_items, num_students)] = True
    y = np.where(mask, y, 0.0).astype(np.float32)
    return {"responses": torch.from_numpy(y), "mask": torch.from_numpy(mask),
            "ability": torch.from_numpy(theta), "loadings": torch.from_numpy(a),
            "intercept": torch.from_numpy(d), "correlation": torch.from_numpy(r)}


def simple_structure(num_items: int, dims: int) -> np.ndarray:
    """A simple-structure Q-matrix (I, D): consecutive blocks of items on each factor."""
    q = np.zeros((num_items, dims), dtype=np.int64)
    for t, block in enumerate(np.array_split(np.arange(num_items), dims)):
        q[block, t] = 1
    return q



# ---- the exam family's multidimensional runs (models/irt.py dispatches here when dims > 1) ---
#
# Spec fields (IRTSpec): ``dims`` D, ``q_matrix`` (the CSV as given), ``loading_pattern`` (its
# 0/1 rows, read once at training: the run never re-reads the file), ``correlated``,
# ``method`` (marginal for D <= 2, amortized above), ``priors``, ``num_nodes`` (per
# dimension), ``hidden`` (encoder widths), ``particles`` (K of the importance-weighted bound).

MAX_DIMS = 10
#: amortized runs: Adam steps (at least 10 epochs), batch of students, lr, particles K
AMORTIZED_STEPS, AMORTIZED_BATCH, AMORTIZED_LR, AMORTIZED_PARTICLES = 3000, 100, 0.01, 5


def make_spec(spec: Any) -> Any:
    """Check an exam spec with ``dims`` > 1 or a ``q_matrix`` and fill its data fields
    (num_items, num_students, item_ids, dims and loading_pattern from the Q-matrix, method,
    correlated). Raises SetupError naming the flag or file."""
    from .irt_tables import read_responses, warn_unused_categories

    name = spec.model
    if name != "irt-2pl":
        raise SetupError(f"{name}: multidimensional abilities (--dims, --q-matrix) are "
                         "available for irt-2pl")
    if spec.hierarchical or spec.items != "meanfield":
        raise SetupError(f"{name}: --hierarchical and --items fullrank are for 1-dimensional "
                         "fits")
    if not isinstance(spec.dims, int) or spec.dims < 1 or spec.dims > MAX_DIMS:
        raise SetupError(f"{name}: --dims must be 2..{MAX_DIMS}, got {spec.dims!r}")
    if spec.responses is None:
        raise SetupError(f"{name}: give the response file (--responses FILE)")
    data = read_responses(spec)
    warn_unused_categories(data, [2] * data.num_items)  # items everybody got right (or wrong)
    spec.num_items, spec.num_students = data.num_items, data.num_students
    spec.item_ids = list(data.item_ids)
    if spec.q_matrix is not None:
        pattern = read_q_matrix(spec.q_matrix, spec.item_ids,
                                None if spec.dims == 1 else spec.dims)
        spec.dims = int(pattern.shape[1])
        spec.loading_pattern = pattern.tolist()
    elif spec.loading_pattern is not None:
        shape = np.asarray(spec.loading_pattern).shape
        if shape != (spec.num_items, spec.dims):
            raise SetupError(f"{name}: loading_pattern has shape {shape}, expected "
                             f"({spec.num_items}, {spec.dims})")
    if spec.dims == 1:
        raise SetupError(f"{name}: a Q-matrix with one column is the ordinary 2PL; leave "
                         "--q-matrix out (or give --dims 2 or more)")
    if spec.loading_pattern is None and spec.num_items < spec.dims:
        raise SetupError(f"{name}: an exploratory fit of {spec.dims} dimensions needs at "
                         f"least {spec.dims} items, the table has {spec.num_items}")
    if spec.method is None:
        spec.method = "marginal" if spec.dims <= MARGINAL_MAX_DIMS else "amortized"
    if spec.method == "meanfield":
        raise SetupError(f"{name}: --method meanfield is for 1-dimensional fits; "
                         "multidimensional ones use marginal (D <= 2) or amortized")
    if spec.method == "marginal" and spec.dims > MARGINAL_MAX_DIMS:
        raise SetupError(f"{name}: --method marginal integrates abilities by quadrature up to "
                         f"{MARGINAL_MAX_DIMS} dimensions ({spec.num_nodes}^{spec.dims} nodes "
                         f"for {spec.dims}); use --method amortized (the default for 3+)")
    if spec.correlated and spec.loading_pattern is None:
        raise SetupError(f"{name}: --correlated needs a Q-matrix (--q-matrix); an exploratory "
                         "fit keeps its factors uncorrelated and reports a varimax rotation")
    spec.correlated = bool(spec.loading_pattern is not None if spec.correlated is None
                           else spec.correlated)
    return spec


def build_spec(spec: Any) -> tuple[MultidimIRT, nn.Module]:
    """Model and guide of a multidimensional exam spec (see :func:`build`)."""
    overrides = ({"intercept": (0.0, float(spec.difficulty_scale))}
                 if spec.difficulty_scale is not None else None)
    return build(int(spec.num_items), int(spec.dims), spec.loading_pattern, spec.correlated,
                 spec.method, spec.priors, overrides, spec.num_nodes, list(spec.hidden))


def fit_settings(spec: Any) -> dict[str, Any]:
    """Marginal: the 1-D marginal runs' settings (batches of up to 5000 students, about 400
    Adam steps, lr 0.05 cosine). Amortized: the importance-weighted bound with K = 5,
    batches of 100 students, lr 0.01 on a cosine schedule, about 3000 steps (>= 10 epochs)."""
    from .irt_tables import MARGINAL_BATCH, MARGINAL_MIN_EPOCHS, MARGINAL_STEPS

    n = int(spec.num_students or 1)
    if spec.method == "marginal":
        batch = min(MARGINAL_BATCH, n)
        epochs = max(MARGINAL_MIN_EPOCHS, math.ceil(MARGINAL_STEPS / math.ceil(n / batch)))
        return {"epochs": epochs, "batch_size": batch, "lr": 0.05, "lr_schedule": "cosine"}
    batch = min(AMORTIZED_BATCH, n)
    epochs = max(10, math.ceil(AMORTIZED_STEPS / math.ceil(n / batch)))
    return {"epochs": epochs, "batch_size": batch, "lr": AMORTIZED_LR, "lr_schedule": "cosine",
            "objective": "iwae", "num_particles": AMORTIZED_PARTICLES}


def solution(run, y: torch.Tensor, mask: torch.Tensor, num_samples: int = 1000,
             laplace: bool = True) -> dict[str, Any]:
    """Everything the tables need, oriented (each factor's loadings sum >= 0) and for
    exploratory fits also varimax-rotated: ``loadings`` (I, D), ``intercept`` (I,),
    ``correlation`` (D, D), their Laplace sds (marginal runs, else None), ``theta`` mean and
    sd (N, D) (quadrature, or the encoder's), ``theta_is`` (amortized: importance-weighted
    means), ``rotation`` T (exploratory) with ``loadings_rotated`` = A T and
    ``theta_rotated`` = theta T. ``laplace=False`` skips the item sds (scoring new
    students: ``y`` are not the training answers)."""
    model = run.model
    items = item_estimates(model, run.guide, y, mask)
    out: dict[str, Any] = {"loadings_sd": None, "intercept_sd": None, "correlation_sd": None,
                           "theta_is": None, "rotation": None}
    if model.method == "marginal":
        draws = (laplace_items(model, run.guide, y, mask, num_samples=num_samples)
                 if laplace else None)
        ab = model.abilities(y, mask, items)
        mean, sd = ab["eap"].numpy(), ab["sd"].numpy()
    else:
        draws = None
        ab = importance_abilities(model, run.guide, y, mask, items)
        mean, sd = ab["mean"].numpy(), ab["sd"].numpy()
        out["theta_is"] = ab["is_mean"].numpy()
    a = items["loadings"].numpy()
    chol = items["cholesky"].numpy()
    signs = orientation(a)
    out["loadings"], out["intercept"] = a * signs, items["intercept"].numpy()
    out["correlation"] = signs[:, None] * (chol @ chol.T) * signs[None, :]
    out["theta"], out["theta_sd"] = mean * signs, sd
    if out["theta_is"] is not None:
        out["theta_is"] = out["theta_is"] * signs
    if draws is not None:
        out["loadings_sd"] = draws["loadings"].std(0).numpy()
        out["intercept_sd"] = draws["intercept"].std(0).numpy()
        if model.correlated:
            c = draws["cholesky"]
            out["correlation_sd"] = (c @ c.transpose(-1, -2)).std(0).numpy()
    if not model.confirmatory:
        rotated, t = varimax(out["loadings"])
        order = np.argsort(-(rotated ** 2).sum(0), kind="stable")
        t = t[:, order] * orientation(rotated[:, order])
        out["rotation"], out["loadings_rotated"] = t, out["loadings"] @ t
        out["theta_rotated"] = out["theta"] @ t
    return out


def check_fit(run, data: tuple[torch.Tensor, torch.Tensor], min_spread: float) -> str | None:
    """Why an amortized multidimensional fit is unusable, or None: a factor whose encoder
    means have an sd over students below ``min_spread`` (the encoder gives everyone one
    value on it). Quadrature fits integrate the abilities out and cannot collapse."""
    if run.model.method == "marginal":
        return None
    y, mask = data
    items = item_estimates(run.model, run.guide, y, mask)
    means = importance_abilities(run.model, run.guide, y, mask, items, num_samples=2)["mean"]
    spread = means.std(0)
    dead = [f"factor {j + 1} (sd {float(v):.3g})" for j, v in enumerate(spread)
            if float(v) < min_spread]
    if dead:
        return (f"the ability posterior collapsed on {', '.join(dead)}: the encoder gives every "
                f"student about the same value (< {min_spread}); retrain with another --seed "
                "or a lower --lr, or fewer --dims")
    return None


def _item_rows(spec: Any, sol: dict[str, Any]) -> list[dict]:
    a, d = sol["loadings"], sol["intercept"]
    norm = np.sqrt((a ** 2).sum(1))
    rows = []
    for t, item in enumerate(spec.item_ids):
        row: dict[str, Any] = {"item": item}
        for j in range(a.shape[1]):
            row[f"a{j + 1}"] = float(a[t, j])
            if sol["loadings_sd"] is not None:
                row[f"a{j + 1}_sd"] = float(sol["loadings_sd"][t, j])
        row["d"] = float(d[t])
        if sol["intercept_sd"] is not None:
            row["d_sd"] = float(sol["intercept_sd"][t])
        row["mdisc"] = float(norm[t])                   # |a_t|, multidimensional discrimination
        row["b"] = float(-d[t] / norm[t]) if norm[t] > 0 else float("nan")   # -d / |a|
        if sol["rotation"] is not None:
            for j in range(a.shape[1]):
                row[f"a{j + 1}_varimax"] = float(sol["loadings_rotated"][t, j])
        rows.append(row)
    return rows


def _student_rows(data, sol: dict[str, Any]) -> list[dict]:
    from .irt_tables import Z90

    theta, sd = sol["theta"], sol["theta_sd"]
    answered = data.mask.sum(1).tolist()
    right = (data.responses * data.mask).sum(1).tolist()
    rows = []
    for s, student in enumerate(data.student_ids):
        row: dict[str, Any] = {"student": student}
        for j in range(theta.shape[1]):
            row[f"theta{j + 1}_mean"] = float(theta[s, j])
            row[f"theta{j + 1}_sd"] = float(sd[s, j])
            row[f"theta{j + 1}_5%"] = float(theta[s, j] - Z90 * sd[s, j])
            row[f"theta{j + 1}_95%"] = float(theta[s, j] + Z90 * sd[s, j])
        if sol["theta_is"] is not None:
            for j in range(theta.shape[1]):
                row[f"theta{j + 1}_is_mean"] = float(sol["theta_is"][s, j])
        if sol["rotation"] is not None:
            for j in range(theta.shape[1]):
                row[f"theta{j + 1}_varimax"] = float(sol["theta_rotated"][s, j])
        row.update(answered=int(answered[s]), score=int(right[s]))
        rows.append(row)
    return rows


def _factors_json(run, sol: dict[str, Any]) -> dict[str, Any]:
    return {"dims": int(run.spec.dims), "method": run.spec.method,
            "pattern": "confirmatory (Q-matrix)" if run.model.confirmatory
            else "exploratory (lower-triangular, varimax reported)",
            "correlated": bool(run.model.correlated),
            "correlation": np.round(sol["correlation"], 6).tolist(),
            "correlation_sd": None if sol["correlation_sd"] is None
            else np.round(sol["correlation_sd"], 6).tolist(),
            "varimax_rotation": None if sol["rotation"] is None
            else np.round(sol["rotation"], 6).tolist()}


def pictures(run, sol: dict[str, Any]) -> list[Path]:
    """loadings.png (heatmap items x factors; exploratory: the varimax loadings) and
    abilities.png (the first two abilities' posterior means, or one histogram per factor)."""
    import matplotlib.pyplot as plt

    from ppl_vae.plots import save_figure

    out = Path(run.path)
    a = sol["loadings_rotated"] if sol["rotation"] is not None else sol["loadings"]
    ids = list(run.spec.item_ids)
    dims = a.shape[1]
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * dims, 1.2 + 0.22 * min(len(ids), 80)))
    top = float(np.abs(a).max()) or 1.0
    image = ax.imshow(a[:80], cmap="RdBu_r", vmin=-top, vmax=top, aspect="auto")
    ax.set_xticks(range(dims), [f"F{j + 1}" for j in range(dims)])
    ax.set_yticks(range(min(len(ids), 80)), ids[:80], fontsize=6)
    fig.colorbar(image, ax=ax, label="slope a_tj (logit per unit ability)")
    ax.set_title("loadings" + (" (varimax)" if sol["rotation"] is not None else ""))
    paths = [save_figure(fig, out / "loadings.png")]

    theta = sol["theta_rotated"] if sol["rotation"] is not None else sol["theta"]
    fig, axes = plt.subplots(1, 2 if dims == 2 else 1, figsize=(9 if dims == 2 else 6, 4))
    axes = np.atleast_1d(axes)
    if dims == 2:
        axes[0].scatter(theta[:, 0], theta[:, 1], s=2, alpha=0.3)
        axes[0].set_xlabel("theta1 (posterior mean)")
        axes[0].set_ylabel("theta2 (posterior mean)")
        axes[0].set_title("abilities")
    for j in range(dims):
        axes[-1].hist(theta[:, j], bins=40, histtype="step", label=f"theta{j + 1}")
    axes[-1].set_xlabel("ability, posterior mean (logit scale)")
    axes[-1].set_ylabel("students")
    axes[-1].legend(fontsize=7)
    paths.append(save_figure(fig, out / "abilities.png"))
    return paths


def report(run) -> list[Path]:
    """responses.pt, items.csv (a1..aD, d, mdisc |a|, b = -d/|a|; marginal runs with
    Laplace sds; exploratory fits also a1_varimax..), students.csv (theta_j mean, sd, 90%
    interval; amortized also importance-weighted means; exploratory also varimax
    abilities), factors.json (correlation, its sd, the rotation), loss.png, loadings.png,
    abilities.png."""
    from ppl_vae import plots
    from ppl_vae.checkpoint import write_json

    from .irt_tables import RESPONSES_FILE, read_responses, save_responses, write_csv

    out = Path(run.path)
    data = read_responses(run.spec, check=False).align(run.spec.item_ids)
    paths = [save_responses(data, out / RESPONSES_FILE)]
    for m in (run.model, run.guide):
        m.eval()
    y, mask = data.tensors()
    sol = solution(run, y, mask, num_samples=run.spec.posterior_samples)
    paths += [write_csv(_item_rows(run.spec, sol), out / "items.csv"),
              write_csv(_student_rows(data, sol), out / "students.csv")]
    write_json(_factors_json(run, sol), out / "factors.json")
    paths.append(out / "factors.json")
    if run.history:
        paths.append(plots.loss_curve(run.history, out / "loss.png"))
    return paths + pictures(run, sol)


def evaluate(run, iwae_samples: int = 1000, limit: int | None = None, seed: int = 0
             ) -> dict[str, Any]:
    """Log-likelihood per student (nats) given the items at their point estimate: exact by
    quadrature (41 nodes per dimension or the run's, if more) for marginal runs; the
    importance-sampled estimate with K = ``iwae_samples`` draws from the encoder for
    amortized runs (a stochastic lower bound, tight as K grows). Writes evaluation.json."""
    from ppl_vae.checkpoint import write_json

    from .irt_tables import run_responses

    y, mask = run_responses(run).tensors()
    if limit:
        y, mask = y[:limit], mask[:limit]
    items = item_estimates(run.model, run.guide, y, mask)
    if run.model.method == "marginal":
        nodes = max(41, run.spec.num_nodes)
        lm = run.model.abilities(y, mask, items, num_nodes=nodes)["log_marginal"]
        result = {"method": "marginal", "log_likelihood": float(lm.mean()),
                  "quadrature_nodes_per_dim": nodes}
    else:
        ab = importance_abilities(run.model, run.guide, y, mask, items,
                                  num_samples=iwae_samples, seed=seed)
        result = {"method": "amortized", "log_likelihood": float(ab["log_marginal"].mean()),
                  "iwae_samples": iwae_samples,
                  "effective_sample_size_median": float(ab["ess"].median())}
    result.update(students=len(y), items=int(run.spec.num_items), dims=int(run.spec.dims),
                  answers=int(mask.sum()))
    result["log_likelihood_per_answer"] = result["log_likelihood"] * len(y) / \
        max(result["answers"], 1)
    if run.path is not None:  # (a run trained without a folder has none)
        write_json(result, Path(run.path) / "evaluation.json")
    return result


def score(run, responses: str | Path, out: str | Path, format: str | None = None,
          id_column: str | None = None) -> dict[str, Any]:
    """Abilities of new students (items missing from their file count as unanswered) into
    the CSV ``out``: by quadrature given the items (marginal runs) or from the encoder and
    importance weights (amortized runs); same columns as students.csv. The file is read in
    the run's layout (``--format``, ``--id-column``) unless ``format`` / ``id_column`` say
    otherwise."""
    from .irt_tables import read_responses, write_csv

    data = read_responses(run.spec, responses, check=False, format=format,
                          id_column=id_column).align(run.spec.item_ids)
    y, mask = data.tensors()
    sol = solution(run, y, mask, laplace=False)
    write_csv(_student_rows(data, sol), Path(out))
    return {"scored": len(y), "out": str(out)}

__all__ = ["MultidimIRT", "PRIORS", "PointItemsAmortizedAbilities", "build",
           "build_spec", "evaluate", "fit_settings", "make_spec", "report", "score",
           "solution",
           "encoder_input", "guide_mode", "importance_abilities", "item_estimates",
           "laplace_items", "orientation", "quadrature_rule", "read_q_matrix",
           "simple_structure", "simulate", "varimax"]

