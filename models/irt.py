"""Exam models (item response theory): student abilities and item parameters from 0/1 answers.

For student s (the data plate, subsampled by the engine) and item t (a small global plate):

    ability_s ~ N(0, 1)                                   (fixes the scale)
    lecture:  P(s solves t) = sigmoid(ability_s * beta_t),  beta_t ~ LogNormal(0, 1) >= 0,
              1/beta_t the task's difficulty (seed lecture 002); ability_s ~ N(mu, 1),
              mu ~ N(0, 2^2) the population's mean strength
    1pl:      P = sigmoid(ability_s - difficulty_t)                       (Rasch)
    2pl:      P = sigmoid(discrimination_t * (ability_s - difficulty_t)), discrimination > 0
    3pl:      P = guessing_t + (1 - guessing_t) * sigmoid(2PL logit),  guessing_t ~ Beta(5, 17)
    y_st ~ Bernoulli(P), only where the student answered (the mask); missing answers are left
    out of the likelihood, never imputed.

Item priors (weakly informative, wide enough for LSAT items near -3.5):
difficulty_t ~ N(0, 3^2), discrimination_t ~ LogNormal(0, 1). With ``hierarchical=True``
they get learned population parameters instead:
difficulty_t ~ N(difficulty_mean, difficulty_sd), difficulty_mean ~ N(0, 3^2),
difficulty_sd ~ HalfNormal(3); log discrimination_t ~ N(log_discrimination_mean,
log_discrimination_sd), ..._mean ~ N(0, 1), ..._sd ~ HalfNormal(1).

What the lecture model cannot express: its logit is zero at ability 0 for every task, so all
tasks have the same "location" -- a task differs only by how steeply the probability rises
with strength (beta_t), and an easy task (P near 1 for typical students) can only be made by a
large beta_t, which also makes it sharply discriminating. With the population mean mu > 0
it fits mostly-easy exams; a mix of easy and hard items with equal discrimination needs
the 1PL/2PL location parameter (see benchmarks/RESULTS.md for LSAT log-likelihoods).

Call form (the engine's convention): ``model(responses, mask, size=N, subsample=idx)``
with ``responses`` (B, I) float 0/1 (any value where masked) and ``mask`` (B, I) bool.
The exam family (:class:`IRTFamily`, registered for irt-lecture, irt-1pl, irt-2pl, irt-3pl,
irt-grm, irt-gpcm, irt-pcm; the graded response and (generalized) partial credit models are
in models/irt_marginal.py) fits these models by one of
two methods: ``marginal`` (default for 1pl/2pl/grm/gpcm/pcm) integrates each ability out exactly
(:class:`ppl_vae.models.irt_marginal.MarginalIRT`), fits the items by marginal MAP and gives
their posterior by the Laplace approximation, abilities by quadrature; ``amortized`` /
``meanfield`` train the joint model above with the guides of :func:`build_irt`. A run folder
holds responses.pt (its own copy of the answers: evaluate, score and check never re-read the
original file), items.csv, students.csv and the pictures (:meth:`IRTFamily.report`).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from torch import nn

from ppl_vae.family import Family, register
from ppl_vae.program import SetupError

from .irt_tables import (
    GRADED_KINDS,
    MARGINAL_BATCH,
    MARGINAL_MIN_EPOCHS,
    MARGINAL_STEPS,
    RESPONSES_FILE,
    Z90,
    kind_of,
    read_responses,
    refuse_codes_from_one,
    run_responses,
    save_responses,
    warn_unused_categories,
    write_csv,
)

KINDS = ("lecture", "1pl", "2pl", "3pl")


class IRT(nn.Module):
    """One exam model of kind ``lecture``, ``1pl``, ``2pl`` or ``3pl`` over ``num_items``.

    Latent sites: ``ability`` (student plate ``data``, scalar per student) and the item
    sites of the kind (item plate ``items``): ``beta`` (lecture), ``difficulty`` (1pl, 2pl,
    3pl), ``discrimination`` (2pl, 3pl), ``guessing`` (3pl); scalar population sites with
    ``hierarchical=True`` (``ability_mean`` for the lecture model).
    """

    # ArviZ-style dims of every latent site (the ones a model instance has are in site_dims)
    dims = {"ability": ["student"], "difficulty": ["item"], "discrimination": ["item"],
            "guessing": ["item"], "beta": ["item"], "ability_mean": [],
            "difficulty_mean": [], "difficulty_sd": [], "log_discrimination_mean": [],
            "log_discrimination_sd": []}
    student_plate = "data"
    item_plate = "items"

    def __init__(self, num_items: int, kind: str = "2pl", hierarchical: bool = False,
                 difficulty_scale: float = 3.0, discrimination_scale: float = 1.0,
                 guessing_prior: tuple[float, float] = (5.0, 17.0)):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown IRT model {kind!r}; choose one of {KINDS}")
        if hierarchical and kind == "lecture":
            raise ValueError("hierarchical=True applies to 1pl/2pl/3pl item priors")
        self.num_items = int(num_items)
        self.kind = kind
        self.hierarchical = hierarchical
        self.difficulty_scale = float(difficulty_scale)
        self.discrimination_scale = float(discrimination_scale)
        self.guessing_prior = tuple(float(v) for v in guessing_prior)

    @property
    def item_sites(self) -> tuple[str, ...]:
        """Names of the per-item latent sites, in table order."""
        return {"lecture": ("beta",), "1pl": ("difficulty",),
                "2pl": ("discrimination", "difficulty"),
                "3pl": ("discrimination", "difficulty", "guessing")}[self.kind]

    @property
    def site_dims(self) -> dict[str, list[str]]:
        """ArviZ dims of this instance's latent sites."""
        names = ("ability", *self.item_sites)
        if self.kind == "lecture":
            names += ("ability_mean",)
        if self.hierarchical:
            names += ("difficulty_mean", "difficulty_sd")
            if "discrimination" in self.item_sites:
                names += ("log_discrimination_mean", "log_discrimination_sd")
        return {n: self.dims[n] for n in names}

    # ---- the generative story -------------------------------------------------------------
    def item_parameters(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Sample the item sites; each (..., I) (leading dims: particle plates). Scalar
        population sites come out of particle plates as (..., 1), which broadcasts against
        the item plate at dim -1 as it is."""
        zero = torch.zeros((), device=device)
        params = {}
        if self.hierarchical:
            b_mean = pyro.sample("difficulty_mean", dist.Normal(zero, self.difficulty_scale))
            b_sd = pyro.sample("difficulty_sd", dist.HalfNormal(zero + self.difficulty_scale))
            b_prior = dist.Normal(b_mean, b_sd)
            if "discrimination" in self.item_sites:
                la_mean = pyro.sample("log_discrimination_mean", dist.Normal(zero, 1.0))
                la_sd = pyro.sample("log_discrimination_sd", dist.HalfNormal(zero + 1.0))
                a_prior = dist.LogNormal(la_mean, la_sd)
        else:
            b_prior = dist.Normal(zero, self.difficulty_scale)
            a_prior = dist.LogNormal(zero, self.discrimination_scale)
        with pyro.plate(self.item_plate, self.num_items, dim=-1):
            if self.kind == "lecture":
                params["beta"] = pyro.sample("beta", dist.LogNormal(zero, 1.0))
                return params
            if "discrimination" in self.item_sites:
                params["discrimination"] = pyro.sample("discrimination", a_prior)
            params["difficulty"] = pyro.sample("difficulty", b_prior)
            if self.kind == "3pl":
                c0, c1 = self.guessing_prior
                params["guessing"] = pyro.sample("guessing", dist.Beta(zero + c0, zero + c1))
        return params

    def logits(self, ability: torch.Tensor, items: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logit of the 2PL/1PL/lecture curve: ability (..., B), item params (..., I) ->
        (..., B, I). For 3PL the logit of the curve without guessing."""
        theta = ability.unsqueeze(-1)
        if self.kind == "lecture":
            return theta * items["beta"].unsqueeze(-2)
        eta = theta - items["difficulty"].unsqueeze(-2)
        if "discrimination" in items:
            eta = items["discrimination"].unsqueeze(-2) * eta
        return eta

    def response_distribution(self, ability: torch.Tensor,
                              items: dict[str, torch.Tensor]) -> dist.Bernoulli:
        """Bernoulli over each (student, item) answer, batch shape (..., B, I)."""
        eta = self.logits(ability, items)
        if self.kind != "3pl":
            return dist.Bernoulli(logits=eta)
        c = items["guessing"].unsqueeze(-2)
        # log P = log(c + (1 - c) sigmoid(eta)), log(1 - P) = log(1 - c) + log sigmoid(-eta)
        log_p = torch.logaddexp(c.log(), torch.log1p(-c) + nn.functional.logsigmoid(eta))
        log_q = torch.log1p(-c) + nn.functional.logsigmoid(-eta)
        return dist.Bernoulli(logits=log_p - log_q)

    def model(self, responses: torch.Tensor, mask: torch.Tensor | None = None,
              size: int | None = None, subsample: torch.Tensor | None = None) -> torch.Tensor:
        """responses: (B, I) float 0/1; mask: (B, I) bool, True = answered. Returns ability
        (B,) on the logit scale."""
        if responses.shape[-1] != self.num_items:
            raise ValueError(f"responses have {responses.shape[-1]} items, the model "
                             f"{self.num_items}")
        if mask is None:
            mask = torch.ones_like(responses, dtype=torch.bool)
        items = self.item_parameters(responses.device)
        ability_loc = torch.zeros((), device=responses.device)
        if self.kind == "lecture":
            ability_loc = pyro.sample("ability_mean", dist.Normal(ability_loc, 2.0))
        with pyro.plate(self.student_plate, size or len(responses), subsample=subsample, dim=-1):
            ability = pyro.sample("ability", dist.Normal(ability_loc, 1.0))
            answers = self.response_distribution(ability, items).mask(mask).to_event(1)
            pyro.sample("responses", answers, obs=torch.where(mask, responses, 0.0))
        return ability

    forward = model

    # ---- curves for plots (numbers in, numbers out; no Pyro) -------------------------------
    @staticmethod
    def probability(kind: str, theta: torch.Tensor, items: dict[str, torch.Tensor]
                    ) -> torch.Tensor:
        """P(correct) on a grid theta (T,) for item params (I,) -> (T, I)."""
        th = theta.unsqueeze(-1)
        if kind == "lecture":
            return torch.sigmoid(th * items["beta"])
        a = items.get("discrimination", torch.ones_like(items["difficulty"]))
        p = torch.sigmoid(a * (th - items["difficulty"]))
        if kind == "3pl":
            c = items["guessing"]
            p = c + (1 - c) * p
        return p

    @staticmethod
    def information(kind: str, theta: torch.Tensor, items: dict[str, torch.Tensor]
                    ) -> torch.Tensor:
        """Fisher information of each item about theta, (T, I): (dP/dtheta)^2 / (P (1-P))."""
        th = theta.unsqueeze(-1)
        if kind == "lecture":
            slope = items["beta"]
            q = torch.sigmoid(th * slope)
            return slope ** 2 * q * (1 - q)
        a = items.get("discrimination", torch.ones_like(items["difficulty"]))
        q = torch.sigmoid(a * (th - items["difficulty"]))
        if kind != "3pl":
            return a ** 2 * q * (1 - q)
        c = items["guessing"]
        p = c + (1 - c) * q
        return (a * (1 - c) * q * (1 - q)) ** 2 / (p * (1 - p))


def simulate(num_students: int, num_items: int, kind: str = "2pl", missing: float = 0.0,
             seed: int = 0) -> dict[str, torch.Tensor]:
    """Draw a synthetic exam from the model's story with typical item parameters:
    ability ~ N(0,1), difficulty ~ N(0,1), discrimination ~ LogNormal(0, 0.5),
    guessing ~ Beta(5, 17), beta ~ LogNormal(0, 0.5). Answers are missing completely at
    random with probability ``missing`` (each student and item keeps at least one).
    Returns tensors: responses (N, I) float, mask (N, I) bool, ability (N,), item params (I,).
    """
    rng = np.random.default_rng(seed)
    theta = torch.from_numpy(rng.standard_normal(num_students)).float()
    items: dict[str, torch.Tensor] = {}
    if kind == "lecture":
        items["beta"] = torch.from_numpy(np.exp(0.5 * rng.standard_normal(num_items))).float()
    else:
        items["difficulty"] = torch.from_numpy(rng.standard_normal(num_items)).float()
        if kind in ("2pl", "3pl"):
            items["discrimination"] = torch.from_numpy(
                np.exp(0.5 * rng.standard_normal(num_items))).float()
        if kind == "3pl":
            items["guessing"] = torch.from_numpy(rng.beta(5.0, 17.0, num_items)).float()
    p = IRT.probability(kind, theta, items).numpy()
    responses = torch.from_numpy((rng.random(p.shape) < p).astype(np.float32))
    mask = torch.from_numpy(rng.random(p.shape) >= missing)
    some_item = torch.from_numpy(rng.integers(0, num_items, num_students))
    some_student = torch.from_numpy(rng.integers(0, num_students, num_items))
    mask[torch.arange(num_students), some_item] = True
    mask[some_student, torch.arange(num_items)] = True
    return {"responses": torch.where(mask, responses, 0.0), "mask": mask, "ability": theta,
            **items}


# ---- model + guide from a spec (run folders), posterior summaries -------------------------

def build_irt(spec: dict) -> tuple[IRT, nn.Module]:
    """Model and guide from a JSON-able spec (a run folder's ``config.json``):

    ``kind`` (lecture|1pl|2pl|3pl), ``num_items``, ``hierarchical`` (bool), ``guide``
    (``amortized``: an MLP encoder (ELU) maps responses*mask concatenated with mask (2I inputs) to
    q(ability_s), item parameters mean-field; ``meanfield``: a Normal per student and per item
    value), ``items`` (amortized guide only: ``meanfield`` (default), a Normal per item
    value, or ``fullrank``, one multivariate Normal over all item values, which keeps the
    strong posterior correlation of an item's a and b), ``hidden`` (encoder widths, default
    [64]), ``init_scale`` (0.1), optional
    ``difficulty_scale``, ``discrimination_scale``, ``guessing_prior``.
    """
    from ppl_vae.guides.amortized import AmortizedNormal
    from ppl_vae.guides.meanfield import mean_field, mean_field_with_amortized
    from ppl_vae.nn import NormalEncoder

    options = {k: spec[k] for k in ("difficulty_scale", "discrimination_scale",
                                     "guessing_prior") if k in spec}
    model = IRT(int(spec["num_items"]), spec.get("kind", "2pl"),
                bool(spec.get("hierarchical", False)), **options)
    init_scale = float(spec.get("init_scale", 0.1))
    kind = spec.get("guide", "amortized")
    if kind == "meanfield":
        return model, mean_field(model, IRT.student_plate, init_scale=init_scale)
    if kind != "amortized":
        raise ValueError(f"unknown IRT guide {kind!r}; choose amortized or meanfield")
    # ELU, not ReLU: at the exam's lr 0.05 a ReLU layer can die in the first epoch (every
    # unit negative on every student), and the encoder then gives everyone one ability --
    # 1 of 20 seeds on a 2,000 x 50 exam (benchmarks/irt_collapse.py); ELU units never die
    encoder = NormalEncoder.mlp(2 * model.num_items, list(spec.get("hidden", [64])), 1,
                                activation=spec.get("activation", "elu"))
    local = AmortizedNormal(encoder, site="ability", plate=IRT.student_plate, event_dim=0,
                            inputs=encoder_input)
    return model, mean_field_with_amortized(model, local, init_scale=init_scale,
                                            full_rank=spec.get("items") == "fullrank")


def encoder_input(responses: torch.Tensor, mask: torch.Tensor | None = None, **_) -> torch.Tensor:
    """The amortized guide's input: [responses * mask, mask], shape (B, 2I)."""
    if mask is None:
        mask = torch.ones_like(responses, dtype=torch.bool)
    m = mask.to(responses.dtype)
    return torch.cat([responses * m, m], dim=-1)


@torch.no_grad()
def ability_posterior(guide: nn.Module, responses: torch.Tensor, mask: torch.Tensor,
                      batch_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """q(ability_s) = N(mean_s, sd_s) of every student: two (N,) tensors (logit scale).

    Amortized guides encode ``responses``/``mask`` (any students, also new ones); mean-field
    guides return their per-student parameters (the training students, in training order).
    """
    local = getattr(guide, "local", None)
    if local is not None:
        device = next(local.parameters()).device
        means, sds = [], []
        for i in range(0, len(responses), batch_size):
            q = local.distribution(responses[i:i + batch_size].to(device),
                                   mask[i:i + batch_size].to(device))
            means.append(q.mean.cpu())
            sds.append(q.stddev.cpu())
        return torch.cat(means), torch.cat(sds)
    loc = guide.locs.ability.detach().cpu()
    scale = guide.scales.ability.detach().cpu()
    if len(loc) != len(responses):
        raise ValueError(f"a mean-field guide knows the {len(loc)} training students only; "
                         "score new students with an amortized run")
    return loc, scale


def prior_if_unanswered(mean: torch.Tensor, sd: torch.Tensor, mask: torch.Tensor,
                        ability_mean: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The guide's ability means and sds (N,) with the prior N(ability_mean, 1) put in for
    the students who answered nothing (``mask`` (N, I) all False in their row): nothing is
    known of them, and the encoder never saw such a row in training."""
    empty = ~mask.bool().any(-1).to(mean.device)
    return (torch.where(empty, torch.full_like(mean, ability_mean), mean),
            torch.where(empty, torch.ones_like(sd), sd))


@torch.no_grad()
def posterior_samples(model: IRT, guide: nn.Module, responses: torch.Tensor,
                      mask: torch.Tensor, num_samples: int = 1000) -> dict[str, torch.Tensor]:
    """Draws of the global sites (item parameters (S, I), population scalars (S,)) from the
    guide, on the CPU. Abilities: see :func:`ability_posterior`."""
    device = next(iter(guide.parameters())).device
    n = len(responses)
    idx = torch.arange(min(2, n), device=device)
    with pyro.plate("_posterior_draws", num_samples, dim=-2):
        trace = pyro.poutine.trace(guide).get_trace(
            responses[:len(idx)].to(device), mask[:len(idx)].to(device), size=n, subsample=idx)
    out = {}
    for name, site in trace.nodes.items():
        if site["type"] == "sample" and name in model.site_dims and name != "ability":
            out[name] = site["value"].reshape(num_samples, -1).squeeze(-1).cpu()
    return out


@torch.no_grad()
def quadrature_abilities(kind: str, items: dict[str, torch.Tensor], responses: torch.Tensor,
                         mask: torch.Tensor, num_points: int = 201, ability_mean: float = 0.0,
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact posterior mean and sd of each student's ability given fixed item parameters
    (I,), by quadrature on a grid over [-6, 6] around the N(ability_mean, 1) prior: two (N,)
    tensors. A yardstick for the guides (with the true items: the best any method can do)."""
    grid = torch.linspace(-6.0, 6.0, num_points, dtype=torch.float64) + ability_mean
    p = IRT.probability(kind, grid, {k: v.double().cpu() for k, v in items.items()})  # (T, I)
    log_p, log_q = p.clamp_min(1e-12).log(), (1 - p).clamp_min(1e-12).log()
    means, sds = [], []
    for start in range(0, len(responses), 8192):  # chunks of students: memory stays small
        y = responses[start:start + 8192].double().cpu()
        m = mask[start:start + 8192].double().cpu()
        # (B, T): sum over answered items of y log p + (1 - y) log(1 - p), plus log prior
        log_post = (y * m) @ log_p.T + ((1 - y) * m) @ log_q.T \
            - 0.5 * (grid - ability_mean) ** 2
        w = torch.softmax(log_post, dim=-1)
        mean = w @ grid
        means.append(mean.float())
        sds.append((w @ grid ** 2 - mean ** 2).clamp_min(0).sqrt().float())
    return torch.cat(means), torch.cat(sds)


@torch.no_grad()
def inference_data(model: IRT, guide: nn.Module, responses: torch.Tensor, mask: torch.Tensor,
                   num_samples: int = 500, student_ids: list[str] | None = None,
                   item_ids: list[str] | None = None):
    """The guide's posterior as an ``arviz.InferenceData`` (one chain of ``num_samples``
    draws) with dims from :attr:`IRT.site_dims` and student/item coordinates. Abilities are
    drawn from q(ability_s) = N(mean_s, sd_s); memory is num_samples x students floats."""
    import arviz as az

    draws = {k: v.numpy()[None] for k, v in
             posterior_samples(model, guide, responses, mask, num_samples).items()}
    mean, sd = ability_posterior(guide, responses, mask)
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(num_samples, len(mean), generator=g)
    draws["ability"] = (mean + sd * eps).numpy()[None]
    coords = {"student": student_ids or list(range(len(mean))),
              "item": item_ids or list(range(model.num_items))}
    return az.from_dict(posterior=draws, coords=coords, dims=model.site_dims)


# ---- the exam family: spec, data, training settings, tables, pictures, commands -----------
#
# Two methods fit the same exams. ``marginal`` (default for 1pl, 2pl, grm): abilities are
# integrated out exactly inside the model (models/irt_marginal.py), the items are fitted by
# marginal MAP (AutoDelta through the engine) and get their posterior sd from the Laplace
# approximation at the mode; abilities come exactly from quadrature (EAP, sd, MAP).
# ``amortized`` / ``meanfield`` (the only ones for lecture and 3pl): the joint model above
# with an ability encoder or a Normal per student.

METHODS = ("marginal", "amortized", "meanfield")
MARGINAL_KINDS = ("1pl", "2pl", "grm", "gpcm", "pcm")
# polytomous kinds: category codes 0..K-1 per item, the marginal method only
HELP = {
    "irt-lecture": "the lecture's exam model P = sigmoid(alpha_s * beta_t), beta_t >= 0",
    "irt-1pl": "Rasch model P = sigmoid(theta_s - b_t)",
    "irt-2pl": "2PL model P = sigmoid(a_t (theta_s - b_t))",
    "irt-3pl": "3PL model P = c_t + (1 - c_t) sigmoid(a_t (theta_s - b_t))",
    "irt-grm": "graded response model P(y >= k) = sigmoid(a_t (theta_s - b_tk)), codes 0..K-1",
    "irt-gpcm": "generalized partial credit model P(y = k) ~ exp(sum_{j<=k} a_t (theta_s - "
                "b_tj)), codes 0..K-1",
    "irt-pcm": "partial credit model P(y = k) ~ exp(sum_{j<=k} (theta_s - b_tj)), codes 0..K-1",
}
# amortized / mean-field: about this many steps, batches growing with the exam to this size
AMORTIZED_STEPS, AMORTIZED_MAX_BATCH, AMORTIZED_MIN_EPOCHS = 4000, 1024, 10
# a fit is refused as collapsed / run away beyond these (logit scale; IRTFamily.check_fit)
MIN_ABILITY_SPREAD, MIN_DISCRIMINATION, MAX_DIFFICULTY = 0.05, 0.05, 15.0


@dataclass
class IRTSpec:
    """What an exam run's config.json stores under "spec" (``ppl-vae train irt-*`` flags).

    ``responses`` is the file (or bundled name: lsat6, lsat7) as given; it is read when the
    run is trained only: the run keeps its own copy of the answers (responses.pt).
    ``method``: None picks marginal for 1pl/2pl/grm/gpcm/pcm, amortized for lecture/3pl.
    ``difficulty_scale``: prior sd of the difficulties; None: 3 (amortized, meanfield) or the
    ``priors`` preset of the marginal model (``flat``: the MML estimates; ``weak``).
    ``num_items`` .. ``categories`` are filled from the responses."""

    model: str = "irt-2pl"
    responses: str | None = None
    format: str = "auto"
    id_column: str | None = None
    method: str | None = None
    items: str = "meanfield"
    hidden: list[int] = field(default_factory=lambda: [64])
    activation: str = "elu"  # of the amortized encoder (runs before 0.3 used relu)
    hierarchical: bool = False
    difficulty_scale: float | None = None
    guessing_prior: list[float] = field(default_factory=lambda: [5.0, 17.0])
    priors: str = "flat"
    num_nodes: int | None = None  # None: 41 for gpcm/pcm, else 21 (see make_spec)
    posterior_samples: int = 1000
    num_items: int | None = None
    num_students: int | None = None
    item_ids: list[str] | None = None
    categories: list[int] | None = None
    # multidimensional abilities (irt-2pl; models/irt_multidim.py): D, the Q-matrix file as
    # given and its 0/1 rows (filled from it), correlated factors (None: yes with a Q-matrix)
    dims: int = 1
    q_matrix: str | None = None
    loading_pattern: list[list[int]] | None = None
    correlated: bool | None = None


def marginal_model(spec: IRTSpec):
    from pyro.infer.autoguide import AutoDelta

    from .irt_marginal import FirstBatchInit, MarginalIRT

    kind = kind_of(spec.model)
    overrides = ({"difficulty": (0.0, float(spec.difficulty_scale)),
                  "step_difficulty": (0.0, float(spec.difficulty_scale))}
                 if spec.difficulty_scale is not None else None)
    model = MarginalIRT(int(spec.num_items), spec.categories or 2,
                        fixed_discrimination=1.0 if kind in ("1pl", "pcm") else None,
                        response_model="partial_credit" if kind in ("gpcm", "pcm")
                        else "graded",
                        priors=spec.priors, prior_overrides=overrides,
                        num_nodes=spec.num_nodes)
    return model, AutoDelta(model, init_loc_fn=FirstBatchInit(model))


def marginal_items(run, y: torch.Tensor, mask: torch.Tensor):
    """(item estimates at the mode, the Laplace guide N(mode, H^-1)) of a marginal run; the
    point guide itself where the Hessian is not positive definite (sd 0, with a warning)."""
    from .irt_marginal import item_estimates, laplace_approximation

    est = item_estimates(run.model, run.guide, y, mask)
    try:
        laplace = laplace_approximation(run.model, run.guide, y, mask)
    except (RuntimeError, ValueError) as e:
        warnings.warn(f"Laplace approximation failed ({e}); items.csv gives modes with sd 0",
                      stacklevel=2)
        laplace = run.guide
    return est, laplace


def predictive_statistics(item_ids: list[str], categories: list[int] | None = None
                          ) -> dict[str, tuple]:
    """The exam's posterior predictive checks (``ppc`` of
    :func:`ppl_vae.checks.check_posterior`), each a statistic of an answer table (N, I; NaN
    where missing): per item the proportion correct (binary items) or the mean code (graded
    items, ``categories`` K_t per item; None: all binary), and the share of students per
    total score, the sum of their answered codes, 0 .. sum_t (K_t - 1)."""
    cats = categories or [2] * len(item_ids)
    top = int(sum(k - 1 for k in cats))

    def totals(y: np.ndarray) -> np.ndarray:
        score = np.clip(np.nansum(y, 1).astype(int), 0, top)
        return np.bincount(score, minlength=top + 1) / len(y)

    per_item = "proportion correct per item" if max(cats) <= 2 else "mean code per item"
    return {per_item: ("responses", lambda y: np.nanmean(y, 0), list(item_ids)),
            "share of students per total score (answered items)":
            ("responses", totals, list(range(top + 1)))}


def _marginal_predictive(model: Any, y: torch.Tensor, mask: torch.Tensor, idata: Any
                         ) -> dict[str, tuple[np.ndarray, np.ndarray, list[str]]]:
    """A marginal run's answers, observed (N, I; NaN where missing) and replicated (chains,
    draws, N, I) from each posterior draw of the items in ``idata``
    (:meth:`~ppl_vae.models.irt_marginal.MarginalIRT.replicate`: a new ability per student,
    the one its likelihood integrates out); the model's likelihood is a ``pyro.factor``,
    which has no draws of its own."""
    post = idata.posterior
    chains, draws = post.sizes["chain"], post.sizes["draw"]
    latents = {site: torch.as_tensor(post[site].values, dtype=torch.float64,
                                     device=model.nodes.device).reshape(chains * draws, -1)
               for site in model.latent_sites}
    params = model.item_parameters(latents)
    rep = torch.stack([model.replicate({k: v[s] for k, v in params.items()}, len(y))
                       for s in range(chains * draws)])
    missing = ~mask.bool().cpu().numpy()
    observed = np.where(missing, np.nan, y.double().cpu().numpy())
    rep = np.where(missing, np.nan, rep.cpu().numpy())
    return {"responses": (observed, rep.reshape(chains, draws, *observed.shape),
                          ["student", "item"])}


def _wide_item_rows(table, item_ids: list[str]) -> list[dict]:
    """irt_marginal.item_table's rows (item, parameter) -> one row per item: per parameter
    ``_mode``, ``_mean``, ``_sd``, ``_5%``, ``_95%``."""
    names = {"a": "discrimination", "b": "difficulty"}
    rows = {item: {"item": item} for item in item_ids}
    for r in table.to_dict("records"):
        p = names.get(r["parameter"], r["parameter"].replace("b", "threshold"))
        rows[r["item"]].update({f"{p}_mode": r["mode"], f"{p}_mean": r["mean"],
                                f"{p}_sd": r["sd"], f"{p}_5%": r["lower"],
                                f"{p}_95%": r["upper"]})
    return list(rows.values())


def item_rows(model: IRT, samples: dict[str, torch.Tensor], item_ids: list[str]) -> list[dict]:
    """Amortized/mean-field runs: one row per item, for every item site its posterior mean,
    sd and 90% interval (5% and 95% quantiles of the guide's draws); the lecture model also
    gets 1/beta (difficulty)."""
    columns = {k: samples[k] for k in model.item_sites}
    if model.kind == "lecture":
        columns["inverse_beta"] = 1.0 / samples["beta"]
    rows = []
    for j, item in enumerate(item_ids):
        row: dict = {"item": item}
        for name, draws in columns.items():
            x = draws[:, j].double()
            q = torch.quantile(x, torch.tensor([0.05, 0.95], dtype=x.dtype))
            row.update({f"{name}_mean": float(x.mean()), f"{name}_sd": float(x.std()),
                        f"{name}_5%": float(q[0]), f"{name}_95%": float(q[1])})
        rows.append(row)
    return rows


def student_rows(data, mean: torch.Tensor, sd: torch.Tensor, extra: dict | None = None
                 ) -> list[dict]:
    """One row per student: ability mean, sd, 90% interval, items answered, score (sum of
    the answered codes); ``extra``: more columns (N,) each (MAP, exact mean ...)."""
    answered = data.mask.sum(1).tolist()
    right = (data.responses * data.mask).sum(1).tolist()
    rows = [{"student": s, "ability_mean": float(m), "ability_sd": float(d),
             "ability_5%": float(m - Z90 * d), "ability_95%": float(m + Z90 * d),
             "answered": int(a), "score": int(r)}
            for s, m, d, a, r in zip(data.student_ids, mean.tolist(), sd.tolist(), answered,
                                     right)]
    for name, values in (extra or {}).items():
        for row, v in zip(rows, values.tolist()):
            row[name] = float(v)
    return rows


def curves(run, items: dict[str, torch.Tensor], theta: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Item characteristic curves (T, I) (graded items: expected score / (K - 1)) and the
    test information curve (T,) at the items ``items`` (the fitted point)."""
    kind = kind_of(run.spec.model)
    if run.spec.method != "marginal":
        return IRT.probability(kind, theta, items), IRT.information(kind, theta, items).sum(-1)
    model = run.model
    device = model.nodes.device
    items = {k: v.to(device, torch.float64) for k, v in items.items()}
    valid, k = model.valid.cpu(), torch.arange(model.max_categories, dtype=torch.float64)

    def log_p(t: torch.Tensor) -> torch.Tensor:
        return model.category_log_probs(t.to(device, torch.float64), items).cpu()

    with torch.no_grad():
        lp = log_p(theta)
        p = torch.where(valid, lp.exp(), 0.0)                   # (T, I, K)
        top = torch.tensor(model.categories, dtype=torch.float64) - 1
        icc = (p * k).sum(-1) / top
        h = 1e-4
        slope = (log_p(theta + h) - log_p(theta - h)) / (2 * h)
        info = torch.where(valid, p * slope ** 2, 0.0).sum((-1, -2))
    return icc.float(), info.float()


def pictures(run, items: dict[str, torch.Tensor], rows: list[dict],
             abilities: torch.Tensor) -> list[Path]:
    """icc.png, information.png, difficulties.png (forest plot of the difficulties, 90%
    intervals), abilities.png (histogram of the ability means) in the run folder."""
    import matplotlib.pyplot as plt

    from ppl_vae.plots import save_figure

    out, ids, kind = Path(run.path), list(run.spec.item_ids), kind_of(run.spec.model)
    theta = torch.linspace(-4, 4, 161)
    icc, info = curves(run, items, theta)
    show = list(range(min(len(ids), 20)))
    fig, ax = plt.subplots(figsize=(6, 4))
    for j in show:
        ax.plot(theta, icc[:, j], lw=1.2, label=ids[j])
    ax.set_xlabel("ability (logit scale)")
    ax.set_ylabel("expected score / (K - 1)" if kind in GRADED_KINDS else "P(correct)")
    ax.set_title("item characteristic curves" + (f" (first {len(show)} items)"
                                                 if len(show) < len(ids) else ""))
    if len(show) <= 10:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    paths = [save_figure(fig, out / "icc.png")]

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(theta, info, color="k", label="test information")
    ax2 = ax.twinx()
    ax2.plot(theta, info.rsqrt(), color="tab:red", ls="--", label="standard error")
    ax.set_xlabel("ability (logit scale)")
    ax.set_ylabel("information")
    ax2.set_ylabel("standard error of ability", color="tab:red")
    ax.set_title("test information curve")
    ax.grid(alpha=0.3)
    paths.append(save_figure(fig, out / "information.png"))

    def first(row: dict, suffix: str) -> float:
        for name in ("inverse_beta", "difficulty", "threshold1", "step1"):
            value = row.get(f"{name}_{suffix}")
            if value is not None and not (isinstance(value, float) and math.isnan(value)):
                return float(value)
        return float("nan")

    label = "1 / beta (lecture difficulty)" if kind == "lecture" else (
        "first threshold b1 (logit)" if kind == "grm" else
        "first step difficulty (logit)" if kind in GRADED_KINDS else "difficulty b (logit)")
    order = sorted(range(len(rows)), key=lambda j: first(rows[j], "mean"))[:60]
    fig, ax = plt.subplots(figsize=(6, 0.25 * len(order) + 1.2))
    y = list(range(len(order)))
    mean = [first(rows[j], "mean") for j in order]
    lo = [first(rows[j], "mean") - first(rows[j], "5%") for j in order]
    hi = [first(rows[j], "95%") - first(rows[j], "mean") for j in order]
    ax.errorbar(mean, y, xerr=[lo, hi], fmt="o", ms=3, capsize=2)
    ax.set_yticks(y, [ids[j] for j in order], fontsize=7)
    ax.set_xlabel(label + ", posterior mean and 90% interval")
    ax.set_title("item difficulties")
    ax.grid(alpha=0.3, axis="x")
    paths.append(save_figure(fig, out / "difficulties.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(abilities.numpy(), bins=40, color="tab:blue", alpha=0.8)
    ax.set_xlabel("ability, posterior mean (logit scale)")
    ax.set_ylabel("students")
    ax.set_title(f"abilities of {len(abilities)} students")
    paths.append(save_figure(fig, out / "abilities.png"))
    return paths


@register
class IRTFamily(Family):
    """The exam models (module docstring; marginal or amortized/mean-field, see above)."""

    name = "irt"
    models = HELP
    Spec = IRTSpec
    # amortized / mean-field: a few global item parameters, one scalar per student
    fit_defaults = {"epochs": 200, "batch_size": 100, "lr": 0.05, "lr_schedule": "cosine",
                    "kl_sites": ("ability",)}
    dims = {**IRT.dims, "log_discrimination": ["item"], "log_threshold_gaps": ["gap"],
            "step_difficulty": ["step"]}

    def make_spec(self, model: str, **options: Any) -> IRTSpec:
        """The spec with its method resolved and the data fields (num_items, num_students,
        item_ids, categories) read from the responses."""
        spec = super().make_spec(model, **options)
        if not spec.posterior_samples >= 1:
            raise SetupError(f"posterior_samples (--posterior-samples) must be >= 1, got "
                             f"{spec.posterior_samples}")
        if spec.num_nodes is None:
            # 21 Gauss-Hermite nodes bias the partial-credit discriminations ~8% low (mirt's
            # 21-node EM too); 41 take it to <1% (benchmarks/RESULTS.md, polytomous items)
            spec.num_nodes = 41 if kind_of(model) in ("gpcm", "pcm") else 21
        if spec.dims != 1 or spec.q_matrix is not None:
            from .irt_multidim import make_spec as multidim_spec

            return multidim_spec(spec)
        kind = kind_of(model)
        if spec.method is None:
            spec.method = "marginal" if kind in MARGINAL_KINDS else "amortized"
        if spec.method not in METHODS:
            raise SetupError(f"{model}: unknown method {spec.method!r}; choose one of {METHODS}")
        if spec.method == "marginal" and kind not in MARGINAL_KINDS:
            raise SetupError(f"{model}: --method marginal is for irt-1pl, irt-2pl, irt-grm, "
                             "irt-gpcm, irt-pcm; "
                             "use amortized or meanfield")
        if kind in GRADED_KINDS and spec.method != "marginal":
            raise SetupError(f"{model} is fitted by the marginal method only")
        if spec.items == "fullrank" and spec.method != "amortized":
            raise SetupError("--items fullrank goes with --method amortized")
        if spec.hierarchical and spec.method == "marginal":
            raise SetupError(f"{model}: --hierarchical needs --method amortized or meanfield")
        if spec.responses is not None:
            data = read_responses(spec)
            spec.num_items, spec.num_students = data.num_items, data.num_students
            spec.item_ids = list(data.item_ids)
            if kind in GRADED_KINDS:
                refuse_codes_from_one(data)
                top = ((data.responses * data.mask).amax(0) + 1).clamp_min(2)
                spec.categories = [int(k) for k in top.tolist()]
                warn_unused_categories(data, spec.categories)
            else:  # binary items everybody got right (or wrong)
                warn_unused_categories(data, [2] * data.num_items)
        elif spec.num_items is None:
            raise SetupError(f"{model}: give the response file (--responses FILE or lsat6)")
        return spec

    def spec_from_json(self, stored: dict) -> IRTSpec:
        """A stored spec; amortized runs saved before the encoder's ``activation`` was a
        field were trained with ReLU and reload with it."""
        if isinstance(stored, dict) and "activation" not in stored:
            stored = {**stored, "activation": "relu"}
        return super().spec_from_json(stored)

    # ---- model, data, settings ------------------------------------------------------------
    def build(self, spec: IRTSpec):
        if spec.dims > 1:
            from .irt_multidim import build_spec

            return build_spec(spec)
        if spec.method == "marginal":
            return marginal_model(spec)
        config = {"kind": kind_of(spec.model), "num_items": spec.num_items,
                  "hierarchical": spec.hierarchical, "guide": spec.method,
                  "items": spec.items, "hidden": list(spec.hidden),
                  "activation": spec.activation,
                  "difficulty_scale": 3.0 if spec.difficulty_scale is None
                  else spec.difficulty_scale, "guessing_prior": list(spec.guessing_prior)}
        return build_irt(config)

    def load_data(self, spec: IRTSpec, split: str):
        if split != "train":
            return None  # an exam has one table: every student is in training
        return read_responses(spec).align(spec.item_ids).tensors()

    def run_data(self, run, split: str):
        """The run's own copy of its answers (responses.pt) once the run exists; a new run
        reads the spec's file and writes the copy before training starts."""
        if split != "train":
            return None
        if run.path is None:
            return self.load_data(run.spec, split)
        copy = Path(run.path) / RESPONSES_FILE
        if copy.exists() and (Path(run.path) / "config.json").exists():
            return run_responses(run).tensors()
        data = read_responses(run.spec).align(run.spec.item_ids)
        save_responses(data, copy)
        return data.tensors()

    def example(self, spec: IRTSpec):
        n = int(spec.num_students) if spec.method == "meanfield" else 2
        return torch.zeros(n, int(spec.num_items)), torch.ones(n, int(spec.num_items),
                                                               dtype=torch.bool)

    def fit_settings(self, spec: IRTSpec) -> dict[str, Any]:
        """Mean-field: :attr:`fit_defaults`. Amortized: about 4000 steps, batches of N/100
        students (100 to 1024), at least 10 epochs. Marginal: batches of up to 5000 students
        and about 400 steps (at least 20 epochs), lr 0.05 on a cosine schedule.
        Multidimensional: :func:`ppl_vae.models.irt_multidim.fit_settings`."""
        if spec.dims > 1:
            from .irt_multidim import fit_settings

            return fit_settings(spec)
        n = int(spec.num_students or 1)
        if spec.method == "amortized":  # batches grow with the exam; about 4000 steps
            batch = min(AMORTIZED_MAX_BATCH, max(self.fit_defaults["batch_size"], n // 100))
            epochs = max(AMORTIZED_MIN_EPOCHS, math.ceil(AMORTIZED_STEPS / math.ceil(n / batch)))
            return {**self.fit_defaults, "batch_size": batch, "epochs": epochs}
        if spec.method != "marginal":
            return dict(self.fit_defaults)
        batch = min(MARGINAL_BATCH, n)
        epochs = max(MARGINAL_MIN_EPOCHS, math.ceil(MARGINAL_STEPS / math.ceil(n / batch)))
        return {"epochs": epochs, "batch_size": batch, "lr": 0.05, "lr_schedule": "cosine"}

    # ---- after training -------------------------------------------------------------------
    def check_fit(self, run) -> str | None:
        """Amortized and mean-field fits fail (:class:`ppl_vae.FitFailed`, no tables written)
        when the abilities collapsed (the sd over students of their posterior means is below
        :data:`MIN_ABILITY_SPREAD` logits: every student gets about the same ability) or the
        items ran away (median discrimination or lecture beta below
        :data:`MIN_DISCRIMINATION`, or a difficulty beyond :data:`MAX_DIFFICULTY` logits).
        Marginal fits integrate the abilities out and cannot collapse. Multidimensional
        amortized fits: :func:`ppl_vae.models.irt_multidim.check_fit`."""
        if getattr(run.spec, "dims", 1) > 1:
            from .irt_multidim import check_fit

            return check_fit(run, self.run_data(run, "train"), MIN_ABILITY_SPREAD)
        if run.spec.method == "marginal":
            return None
        y, mask = self.run_data(run, "train")
        means, _ = ability_posterior(run.guide, y, mask)
        spread = float(means.std()) if len(means) > 1 else 1.0
        samples = posterior_samples(run.model, run.guide, y, mask, num_samples=200)
        fix = ("retrain with another --seed or a lower --lr, or use --method marginal "
               "(abilities integrated out exactly)")
        if spread < MIN_ABILITY_SPREAD:
            return (f"the ability posterior collapsed: the sd of the {len(means)} students' "
                    f"ability means is {spread:.3g} (< {MIN_ABILITY_SPREAD}); {fix}")
        slope = samples.get("discrimination", samples.get("beta"))
        if slope is not None and float(slope.mean(0).median()) < MIN_DISCRIMINATION:
            return (f"the items ran away: median discrimination "
                    f"{float(slope.mean(0).median()):.3g} (< {MIN_DISCRIMINATION}); {fix}")
        if "difficulty" in samples and float(samples["difficulty"].mean(0).abs().max()) > \
                MAX_DIFFICULTY:
            worst = int(samples["difficulty"].mean(0).abs().argmax())
            return (f"the items ran away: item {run.spec.item_ids[worst]!r} has difficulty "
                    f"{float(samples['difficulty'].mean(0)[worst]):.3g} (|b| > "
                    f"{MAX_DIFFICULTY}); {fix}")
        return None

    def report(self, run) -> list[Path]:
        """responses.pt (the run's copy of its answers), items.csv, students.csv, loss.png,
        icc.png, information.png, difficulties.png, abilities.png. Multidimensional runs:
        :func:`ppl_vae.models.irt_multidim.report`."""
        from ppl_vae import plots

        if run.spec.dims > 1:
            from .irt_multidim import report

            return report(run)

        out = Path(run.path)
        data = run_responses(run)
        paths = [out / RESPONSES_FILE]
        for m in (run.model, run.guide):
            m.eval()
        y, mask = data.tensors()
        if run.spec.method == "marginal":
            from .irt_marginal import item_table

            est, laplace = marginal_items(run, y, mask)
            table = item_table(run.model, laplace, y, mask, prob=0.9,
                               num_samples=run.spec.posterior_samples, item_ids=data.item_ids)
            rows = _wide_item_rows(table, list(data.item_ids))
            ab = run.model.abilities(y, mask, est)
            students = student_rows(data, ab["eap"], ab["sd"], {"ability_map": ab["map"]})
            mean, point = ab["eap"].float(), {k: v.float() for k, v in est.items()}
        else:
            samples = posterior_samples(run.model, run.guide, y, mask,
                                        num_samples=run.spec.posterior_samples)
            rows = item_rows(run.model, samples, list(data.item_ids))
            mean, sd = ability_posterior(run.guide, y, mask)
            point = {k: samples[k].mean(0) for k in run.model.item_sites}
            mu = float(samples["ability_mean"].mean()) if "ability_mean" in samples else 0.0
            exact = quadrature_abilities(run.model.kind, point, y, mask, ability_mean=mu)
            students = student_rows(data, mean, sd, {"ability_exact_mean": exact[0],
                                                     "ability_exact_sd": exact[1]})
        paths += [write_csv(rows, out / "items.csv"), write_csv(students, out / "students.csv")]
        if run.history:
            paths.append(plots.loss_curve(run.history, out / "loss.png"))
        return paths + pictures(run, point, rows, mean)

    def evaluate(self, run, iwae_samples: int = 1000, limit: int | None = None, seed: int = 0,
                 **_: Any) -> dict[str, Any]:
        """Log-likelihood per student (nats) on the run's answers. Marginal runs: the exact
        marginal log p(y_s | items at the mode) (101 Gauss-Hermite nodes). Amortized /
        mean-field runs: ELBO and importance-sampled log p(y_s) (items drawn from q,
        K = ``iwae_samples``). Writes evaluation.json. Multidimensional runs:
        :func:`ppl_vae.models.irt_multidim.evaluate`."""
        from ppl_vae import elbo, log_likelihood
        from ppl_vae.checkpoint import write_json

        if run.spec.dims > 1:
            from .irt_multidim import evaluate

            return evaluate(run, iwae_samples=iwae_samples, limit=limit, seed=seed)
        data = run_responses(run)
        y, mask = data.tensors()
        if limit:
            y, mask = y[:limit], mask[:limit]
        if run.spec.method == "marginal":
            est = self._estimates(run, y, mask)
            nodes = max(101, run.spec.num_nodes)
            lm = run.model.abilities(y, mask, est, num_nodes=nodes, map_steps=0)["log_marginal"]
            result = {"method": "marginal", "log_likelihood": float(lm.mean()),
                      "quadrature_nodes": nodes}
        else:
            if run.spec.method == "meanfield" and limit:
                raise SetupError("--limit needs an amortized run (mean-field parameters are "
                                 "tied to the whole table)")
            device = next(run.guide.parameters()).device
            torch.manual_seed(seed)
            result = {"method": run.spec.method,
                      "elbo": elbo(run.model, run.guide, (y, mask), num_particles=10,
                                   device=device, batch_size=1000),
                      "log_likelihood": log_likelihood(run.model, run.guide, (y, mask),
                                                       batch_size=1000, device=device,
                                                       num_samples=iwae_samples),
                      "iwae_samples": iwae_samples}
        result.update(students=len(y), items=int(run.spec.num_items), answers=int(mask.sum()))
        result["log_likelihood_per_answer"] = result["log_likelihood"] * len(y) / \
            max(result["answers"], 1)
        if run.path is not None:  # (a run trained without a folder has none)
            write_json(result, Path(run.path) / "evaluation.json")
        return result

    @staticmethod
    def _estimates(run, y, mask) -> dict[str, torch.Tensor]:
        from .irt_marginal import item_estimates

        return item_estimates(run.model, run.guide, y, mask)

    def score(self, run, responses: str | Path | None = None, out: str | Path | None = None,
              format: str | None = None, id_column: str | None = None,
              **_: Any) -> dict[str, Any]:
        """Abilities of new students into the CSV ``out``: exactly by quadrature given the
        items (marginal runs: EAP, sd, MAP), or from the amortized encoder in one pass (with
        the exact posterior mean and sd given the items' means; a student with no answers
        gets the prior, mean 0 and sd 1). Items missing from the new file count as
        unanswered. The file is read in the run's layout (its ``--format`` and
        ``--id-column``) unless ``format`` / ``id_column`` say otherwise."""
        if responses is None or out is None:
            raise SetupError("score needs responses= (a response file) and out= (a CSV)")
        if run.spec.dims > 1:
            from .irt_multidim import score

            return score(run, responses, out, format=format, id_column=id_column)
        if run.spec.method == "meanfield":
            raise SetupError(f"{run.path} was trained with --method meanfield; scoring new "
                             "students needs a marginal or an amortized run")
        data = read_responses(run.spec, responses, check=False, format=format,
                              id_column=id_column).align(run.spec.item_ids)
        y, mask = data.tensors()
        if run.spec.method == "marginal":
            from .irt_marginal import check_responses

            check_responses(y, mask, run.model.categories, source=data.source,
                            student_ids=data.student_ids, item_ids=data.item_ids,
                            lines=data.lines)
            ab = run.model.abilities(y, mask, self._estimates(run, y, mask))
            rows = student_rows(data, ab["eap"], ab["sd"], {"ability_map": ab["map"]})
        else:
            samples = posterior_samples(run.model, run.guide, y, mask, num_samples=1000)
            point = {k: samples[k].mean(0) for k in run.model.item_sites}
            mu = float(samples["ability_mean"].mean()) if "ability_mean" in samples else 0.0
            mean, sd = prior_if_unanswered(*ability_posterior(run.guide, y, mask), mask, mu)
            exact = quadrature_abilities(run.model.kind, point, y, mask, ability_mean=mu)
            rows = student_rows(data, mean, sd, {"ability_exact_mean": exact[0],
                                                 "ability_exact_sd": exact[1]})
        write_csv(rows, Path(out))
        return {"scored": len(rows), "out": str(out)}

    def check(self, run, samples: int = 500, khat_samples: int = 1000,
              sbc_simulations: int = 0, nuts: bool = False, nuts_samples: int = 500,
              seed: int = 0, **_: Any) -> dict[str, Any]:
        """Posterior checks (:func:`ppl_vae.checks.check_posterior`): posterior.nc,
        summary.csv, forest/posterior/k-hat PNGs with the exam's dims. Marginal runs: of the
        item posterior (Laplace at the marginal MAP; ``pareto_k`` is its k-hat). Amortized
        and mean-field runs: predictive checks (proportion correct per item, or mean code for
        graded runs; distribution of total scores, :func:`predictive_statistics`); for amortized
        runs simulation-based calibration of the ability encoder
        (sbc.png); ``pareto_k`` is the share of students with k-hat >= 0.7. With ``nuts`` a
        NUTS cross-check (nuts_vs_svi.csv, small data only)."""
        from ppl_vae.checkpoint import write_json
        from ppl_vae.checks import check_posterior
        from ppl_vae.diagnostics import nuts_crosscheck, sbc

        if run.spec.dims > 1:
            raise SetupError(f"{run.path}: 'ppl-vae check' does not cover multidimensional "
                             "runs yet (evaluate and score do)")
        data = run_responses(run)
        tensors = data.tensors()
        items = list(run.spec.item_ids)
        ppc = predictive_statistics(items, run.spec.categories)
        predictive = None
        if run.spec.method == "marginal":  # the item posterior: Laplace at the marginal MAP
            _, guide = marginal_items(run, *tensors)
            dims = {k: v for k, v in self.dims.items() if k in run.model.latent_sites}
            coords = {"item": items, "student": list(data.student_ids)}
            predictive = partial(_marginal_predictive, run.model, *tensors)
        else:
            guide = run.guide
            dims = {"responses": ["student", "item"]}
            coords = {"item": items, "student": list(data.student_ids)}
        torch.manual_seed(seed)
        result = check_posterior(run.model, guide, tensors, run.path, dims=dims,
                                 coords=coords, num_samples=samples, khat_samples=khat_samples,
                                 ppc=ppc, predictive=predictive, seed=seed,
                                 batch_size=max(1, 200_000 // max(1, samples)))
        if run.spec.method == "amortized" and sbc_simulations > 0:
            calibration = sbc(run.model, run.guide, tensors, num_simulations=sbc_simulations,
                              seed=seed, sites=["ability"])
            calibration.plot(Path(run.path) / "sbc.png")
            result["sbc_p_value"] = calibration.p_value
            result["sbc"] = calibration.summary()
        if nuts:
            table, _, _ = nuts_crosscheck(
                run.model, guide, tensors, num_samples=nuts_samples,
                warmup_steps=nuts_samples, num_chains=2, svi_samples=samples, dims=dims,
                coords={"item": items}, out=run.path, seed=seed,
                forest_coords=None if run.spec.method == "marginal" else {"student": [0, 1, 2]})
            glob = table[~table.index.str.startswith("ability")]
            result["nuts_max_abs_z_items"] = float(glob["z"].abs().max())
            result["nuts_sd_ratio_items"] = float(glob["sd_ratio"].median())
            if run.spec.method != "marginal":
                result["nuts_max_abs_z_abilities"] = float(
                    table[table.index.str.startswith("ability")]["z"].abs().max())
        write_json(dict(result), Path(run.path) / "check.json")
        return result
