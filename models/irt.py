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
"""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from torch import nn

KINDS = ("lecture", "1pl", "2pl", "3pl")


class IRT(nn.Module):
    """One exam model of kind ``lecture``, ``1pl``, ``2pl`` or ``3pl`` over ``num_items``.

    Latent sites: ``ability`` (student plate ``students``, scalar per student) and the item
    sites of the kind (item plate ``items``): ``beta`` (lecture), ``difficulty`` (1pl, 2pl,
    3pl), ``discrimination`` (2pl, 3pl), ``guessing`` (3pl); scalar population sites with
    ``hierarchical=True`` (``ability_mean`` for the lecture model).
    """

    # ArviZ-style dims of every latent site (the ones a model instance has are in site_dims)
    dims = {"ability": ["student"], "difficulty": ["item"], "discrimination": ["item"],
            "guessing": ["item"], "beta": ["item"], "ability_mean": [],
            "difficulty_mean": [], "difficulty_sd": [], "log_discrimination_mean": [],
            "log_discrimination_sd": []}
    student_plate = "students"
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
    (``amortized``: an MLP encoder maps responses*mask concatenated with mask (2I inputs) to
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
    encoder = NormalEncoder.mlp(2 * model.num_items, list(spec.get("hidden", [64])), 1)
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
