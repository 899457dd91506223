"""Pyro's own examples and tutorials, written the way Pyro users write them, through ppl_vae.

Every model here is a plain Pyro program: ``model(x)`` (or ``model(y, sigma)``, or a method of
an ``nn.Module``) opening its data plate as ``pyro.plate("data", len(x))``, with no ``size=``
or ``subsample=`` keywords. Each test checks the trained guide against an answer computed
here exactly: Gaussian conditioning in float64 for the linear-Gaussian models, exact sums
over the mixture components for the Gaussian mixtures.

Tolerances are in units of the exact posterior standard deviation (sd) unless said
otherwise; each is justified where it is set. Training runs are kept to a few hundred
steps of a vectorized multi-particle ELBO with a decaying learning rate (the engine's
``lr_schedule="exponential"``), which settles the guides' means to a few hundredths of a
posterior sd (measured with Pyro's own SVI on the same programs, and with ppl_vae.fit
over several seeds; the numbers are given where each run is set up).
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
import torch.nn.functional as F
from pyro.contrib.easyguide import easy_guide
from pyro.infer import config_enumerate
from pyro.infer.autoguide import (
    AutoDelta,
    AutoDiagonalNormal,
    AutoGuide,
    AutoGuideList,
    AutoIAFNormal,
    AutoLaplaceApproximation,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
)
from torch import nn
from torch.distributions import constraints

import ppl_vae
from ppl_vae import SetupError, elbo, fit, log_likelihood

F64 = torch.float64
ONE_SD = (0.158655, 0.841345)  # Normal quantiles at -1 and +1 standard deviations


# ---- exact answers ---------------------------------------------------------------------------

def gaussian_posterior(prior_cov, design, noise_sd, y, prior_mean=None):
    """Exact posterior of z ~ N(prior_mean, prior_cov) given y = design @ z + e, with
    e ~ N(0, diag(noise_sd ** 2)); everything in float64. Returns (mean, cov)."""
    prior_cov = torch.as_tensor(prior_cov, dtype=F64)
    design = torch.as_tensor(design, dtype=F64)
    y = torch.as_tensor(y, dtype=F64).reshape(-1)
    noise_var = torch.as_tensor(noise_sd, dtype=F64).expand(y.shape) ** 2
    prior_mean = (torch.zeros(len(prior_cov), dtype=F64) if prior_mean is None
                  else torch.as_tensor(prior_mean, dtype=F64))
    prior_prec = torch.linalg.inv(prior_cov)
    cov = torch.linalg.inv(prior_prec + design.T @ (design / noise_var[:, None]))
    cov = (cov + cov.T) / 2
    mean = cov @ (prior_prec @ prior_mean + design.T @ (y / noise_var))
    return mean, cov


def mixture_log_lik(x, weights, locs, scale):
    """Exact per-example log-likelihood of a 1-D Gaussian mixture (float64):
    log p(x_i) = logsumexp_k [log w_k + log N(x_i; loc_k, scale)]."""
    x = torch.as_tensor(x, dtype=F64)[:, None]
    w, mu = weights.detach().to(F64), locs.detach().to(F64)
    s = torch.as_tensor(scale).detach().to(F64)
    return torch.logsumexp(w.log() + dist.Normal(mu, s).log_prob(x), dim=-1)


# ---- eight schools with known tau ------------------------------------------------------------

Y_SCHOOLS = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
SIGMA_SCHOOLS = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])
TAU = 5.0


def schools_model(y, sigma):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    with pyro.plate("data", len(y)):
        theta = pyro.sample("theta", dist.Normal(mu, TAU))
        pyro.sample("obs", dist.Normal(theta, sigma), obs=y)


def schools_exact():
    """Exact posterior of (mu, theta_1..8): prior mu ~ N(0, 25), theta_j = mu + N(0, tau^2),
    y_j = theta_j + N(0, sigma_j^2). Returns (mean, sd) of theta (8 values each).

    Checked once offline against NUTS (4000 draws): means and sds agree within its Monte
    Carlo error (e.g. theta_1: exact 6.71 +- 5.62, NUTS 6.42 +- 5.61)."""
    j = len(Y_SCHOOLS)
    prior_cov = 25.0 * torch.ones(j + 1, j + 1, dtype=F64)
    prior_cov[1:, 1:] += TAU ** 2 * torch.eye(j, dtype=F64)
    design = torch.cat([torch.zeros(j, 1, dtype=F64), torch.eye(j, dtype=F64)], dim=1)
    mean, cov = gaussian_posterior(prior_cov, design, SIGMA_SCHOOLS, Y_SCHOOLS)
    return mean[1:], cov.diagonal()[1:].sqrt()


def schools_easy_guide():
    """An easy_guide in the style of Pyro's easyguide tutorial: a Normal for the global mu,
    and per-school Normals inside the data plate (parameters declared with event_dim, so
    Pyro subsamples them with the plate)."""

    @easy_guide(schools_model)
    def guide(self, y, sigma):
        group = self.group(match="mu")
        loc = pyro.param("mu_loc", lambda: torch.zeros(1))
        scale = pyro.param("mu_scale", lambda: torch.ones(1), constraint=constraints.positive)
        group.sample("mu_joint", dist.Normal(loc, scale).to_event(1))
        plate = self.plate("data", len(y))
        with plate:
            group = self.group(match="theta")
            # one row per school of the whole data set: the plate knows how many there are
            loc = pyro.param("theta_loc", lambda: torch.zeros(plate.size, 1), event_dim=1)
            scale = pyro.param("theta_scale", lambda: torch.ones(plate.size, 1), event_dim=1,
                               constraint=constraints.positive)
            group.sample("theta_joint", dist.Normal(loc, scale).to_event(1))

    return guide


SCHOOL_GUIDES = {
    "AutoNormal": lambda: AutoNormal(schools_model),
    "AutoDiagonalNormal": lambda: AutoDiagonalNormal(schools_model),
    "AutoMultivariateNormal": lambda: AutoMultivariateNormal(schools_model),
    "AutoLowRankMultivariateNormal": lambda: AutoLowRankMultivariateNormal(schools_model),
    "AutoIAFNormal": lambda: AutoIAFNormal(schools_model),
    "AutoDelta": lambda: AutoDelta(schools_model),
    "AutoLaplaceApproximation": lambda: AutoLaplaceApproximation(schools_model),
    "easy_guide": schools_easy_guide,
}
# Guides that hold one joint distribution over all latents (or, for the easy_guide, per-school
# parameters the guide cannot index by minibatch rows without a subsample argument): the
# engine may refuse them on minibatches, with a SetupError that says what to change.
MAY_REFUSE_MINIBATCHES = {"AutoDiagonalNormal", "AutoMultivariateNormal",
                          "AutoLowRankMultivariateNormal", "AutoIAFNormal",
                          "AutoLaplaceApproximation", "easy_guide"}
FULL_RANK = {"AutoMultivariateNormal", "AutoLaplaceApproximation"}


def fit_schools(guide, batch_size, steps=300, **kwargs):
    """300 steps of a 32-particle ELBO, lr 0.3 decaying to 0.006 (the posterior sds are
    about 5, so the means have ~5 units to travel). Measured with Pyro's own SVI on this
    model, and with ppl_vae.fit over seeds 1-3: the guides' theta means then sit within
    0.01-0.09 sd of the exact ones (max over schools), the full-rank sds within 5%."""
    n = len(Y_SCHOOLS)
    epochs = steps // math.ceil(n / batch_size)
    options = dict(epochs=epochs, batch_size=batch_size, lr=0.3, num_particles=32,
                   lr_schedule="exponential", lr_gamma=0.02 ** (1 / epochs), seed=0,
                   progress=False, device="cpu")
    options.update(kwargs)
    return fit(schools_model, guide, (Y_SCHOOLS, SIGMA_SCHOOLS), **options)


def guide_theta(name, guide):
    """Posterior mean and sd of theta under the trained guide (sd None: not checked)."""
    args = (Y_SCHOOLS, SIGMA_SCHOOLS)
    if name in ("AutoIAFNormal", "easy_guide"):
        # no closed form: 4000 vectorized draws (Monte Carlo error of the mean ~0.016 sd)
        with torch.no_grad(), pyro.plate("_draws", 4000, dim=-2):
            trace = poutine.trace(guide).get_trace(*args)
        theta = trace.nodes["theta"]["value"].reshape(4000, -1)
        return theta.mean(0), theta.std(0)
    if name == "AutoLaplaceApproximation":
        guide = guide.laplace_approximation(*args)  # a Hessian: needs autograd
    mean = guide.median(*args)["theta"]
    if name == "AutoDelta":
        return mean, None
    lo, hi = guide.quantiles(list(ONE_SD), *args)["theta"]
    return mean, (hi - lo) / 2


@pytest.mark.parametrize("batch_size", [8, 4], ids=["full_batch", "minibatch4"])
@pytest.mark.parametrize("name", list(SCHOOL_GUIDES))
def test_eight_schools_known_tau(name, batch_size):
    pyro.set_rng_seed(0)
    guide = SCHOOL_GUIDES[name]()
    if batch_size < len(Y_SCHOOLS) and name in MAY_REFUSE_MINIBATCHES:
        # a joint guide over the per-school thetas (or per-row params not told their rows)
        # cannot be subsampled: refused before the first step, saying what to change
        with pytest.raises(SetupError, match=r"batch_size >= 8"):
            fit_schools(guide, batch_size)
        return
    history = fit_schools(guide, batch_size)
    assert all(math.isfinite(v) for v in history["train_elbo"])
    exact_mean, exact_sd = schools_exact()
    mean, sd = guide_theta(name, guide)
    assert tuple(mean.shape) == (8,), f"theta has shape {tuple(mean.shape)}, not (8,)"
    err = ((mean.double() - exact_mean) / exact_sd).abs()
    print(f"{name} batch_size={batch_size}: max |mean - exact| = {err.max():.3f} sd")
    # 0.15 sd: the mean of any Gaussian-family guide (and the MAP/Laplace point) is exact for
    # this Gaussian posterior; what is left is optimisation noise, measured at <= 0.09 sd
    assert err.max() <= 0.15, (
        f"{name}, batch_size={batch_size}: theta means {mean.tolist()} vs exact "
        f"{exact_mean.tolist()}: errors {err.tolist()} sd")
    if name in FULL_RANK:
        ratio = sd.double() / exact_sd
        print(f"{name}: max |sd / exact - 1| = {(ratio - 1).abs().max():.3f}")
        # 15%: a full-rank Gaussian guide is exact here; measured within 5% after 300 steps
        assert (ratio - 1).abs().max() <= 0.15, f"{name}: sd / exact sd = {ratio.tolist()}"


def test_full_batch_rows_stay_aligned_with_their_parameters():
    """batch_size >= N is full batch: school j's data must meet school j's guide
    parameters (the bug: rows shuffled in full batch while AutoNormal's per-school
    parameters were not, mixing up the schools)."""
    guide = AutoNormal(schools_model)
    n = len(Y_SCHOOLS)
    fit(schools_model, guide, (Y_SCHOOLS, SIGMA_SCHOOLS), epochs=300, batch_size=100, lr=0.3,
        num_particles=32, lr_schedule="exponential", lr_gamma=0.02 ** (1 / 300), seed=0,
        progress=False, device="cpu")
    exact_mean, exact_sd = schools_exact()
    mean = guide.median(Y_SCHOOLS, SIGMA_SCHOOLS)["theta"]
    assert tuple(mean.shape) == (n,)
    err = ((mean.double() - exact_mean) / exact_sd).abs()
    print(f"batch_size=100: max |mean - exact| = {err.max():.3f} sd")
    # same 0.15 sd as above; rows shuffled against the parameters every epoch come out
    # 0.41-0.46 sd off (emulated with Pyro's SVI on a permuted full batch)
    assert err.max() <= 0.15, f"per-school errors {err.tolist()} sd"


def test_to_arviz_default_batch_size_eight_schools():
    guide = AutoNormal(schools_model)
    fit_schools(guide, batch_size=8)
    pyro.set_rng_seed(1)
    idata = ppl_vae.to_arviz(schools_model, guide, (Y_SCHOOLS, SIGMA_SCHOOLS), num_samples=200)
    theta = torch.as_tensor(idata.posterior["theta"].values)
    assert tuple(theta.shape) == (1, 200, 8)
    median = guide.median(Y_SCHOOLS, SIGMA_SCHOOLS)["theta"]
    lo, hi = guide.quantiles(list(ONE_SD), Y_SCHOOLS, SIGMA_SCHOOLS)["theta"]
    guide_sd = (hi - lo) / 2
    se = guide_sd / math.sqrt(200)
    err = (theta[0].mean(0) - median).abs() / se
    print(f"to_arviz draws' mean vs guide median: max {err.max():.2f} SE")
    # 4.5 Monte Carlo standard errors of a 200-draw mean, max over 8 schools
    assert err.max() <= 4.5, f"draws' means off the guide's by {err.tolist()} SE"


def test_importance_diagnostics_on_a_plain_program():
    guide = AutoNormal(schools_model)
    fit_schools(guide, batch_size=8, steps=100)
    from ppl_vae.diagnostics import importance_diagnostics

    k = importance_diagnostics(schools_model, guide, (Y_SCHOOLS, SIGMA_SCHOOLS),
                               num_samples=200, inner_samples=10, seed=0)
    assert k.local is not None and len(k.local) == 8
    assert all(math.isfinite(float(v)) for v in k.local)
    assert k.glob is not None and math.isfinite(k.glob)


# ---- Pyro's examples/vae/vae.py --------------------------------------------------------------

class Decoder(nn.Module):
    def __init__(self, z_dim, hidden_dim, x_dim):
        super().__init__()
        self.fc1 = nn.Linear(z_dim, hidden_dim)
        self.fc21 = nn.Linear(hidden_dim, x_dim)
        self.softplus = nn.Softplus()
        self.sigmoid = nn.Sigmoid()

    def forward(self, z):
        hidden = self.softplus(self.fc1(z))
        return self.sigmoid(self.fc21(hidden))


class Encoder(nn.Module):
    def __init__(self, z_dim, hidden_dim, x_dim):
        super().__init__()
        self.x_dim = x_dim
        self.fc1 = nn.Linear(x_dim, hidden_dim)
        self.fc21 = nn.Linear(hidden_dim, z_dim)
        self.fc22 = nn.Linear(hidden_dim, z_dim)
        self.softplus = nn.Softplus()

    def forward(self, x):
        x = x.reshape(-1, self.x_dim)
        hidden = self.softplus(self.fc1(x))
        return self.fc21(hidden), torch.exp(self.fc22(hidden))


class VAE(nn.Module):
    """Pyro's examples/vae/vae.py, with 784 pixels replaced by ``x_dim``."""

    def __init__(self, z_dim=2, hidden_dim=32, x_dim=64):
        super().__init__()
        self.encoder = Encoder(z_dim, hidden_dim, x_dim)
        self.decoder = Decoder(z_dim, hidden_dim, x_dim)
        self.z_dim = z_dim
        self.x_dim = x_dim

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z_loc = torch.zeros(x.shape[0], self.z_dim, dtype=x.dtype, device=x.device)
            z_scale = torch.ones(x.shape[0], self.z_dim, dtype=x.dtype, device=x.device)
            z = pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))
            loc_img = self.decoder(z)
            pyro.sample("obs", dist.Bernoulli(loc_img, validate_args=False).to_event(1),
                        obs=x.reshape(-1, self.x_dim))
            return loc_img

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            z_loc, z_scale = self.encoder(x)
            pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))


def binary_prototypes(n=200, d=64, seed=0):
    """Four random binary prototypes with 5% of the pixels flipped."""
    g = torch.Generator().manual_seed(seed)
    protos = (torch.rand(4, d, generator=g) < 0.5).float()
    which = torch.randint(0, 4, (n,), generator=g)
    flips = (torch.rand(n, d, generator=g) < 0.05).float()
    return (protos[which] + flips) % 2


def test_pyro_vae_example():
    torch.manual_seed(0)
    x = binary_prototypes()
    vae = VAE(z_dim=2, hidden_dim=32, x_dim=64)
    history = fit(vae.model, vae.guide, x, epochs=15, batch_size=50, lr=1e-2, seed=0,
                  progress=False, device="cpu")
    first, last = history["train_elbo"][0], history["train_elbo"][-1]
    print(f"VAE train ELBO {first:.2f} -> {last:.2f}")
    assert math.isfinite(first) and math.isfinite(last)
    # from ~44 nats (64 coin flips) towards ~13 (four prototypes, 5% noise): a rise of 5 is a
    # small fraction of what one run achieves
    assert last > first + 5, f"train ELBO {first:.2f} -> {last:.2f}"
    pyro.set_rng_seed(1)
    e = elbo(vae.model, vae.guide, x, num_particles=20)
    ll = log_likelihood(vae.model, vae.guide, x, num_samples=200)
    print(f"VAE elbo {e:.3f}, log_likelihood {ll:.3f}")
    assert math.isfinite(e) and math.isfinite(ll)
    # IWAE(K=200) >= ELBO in expectation; 0.2 nats covers the Monte Carlo noise of the
    # 20-particle ELBO averaged over 200 rows (a few hundredths of a nat)
    assert ll >= e - 0.2, f"log_likelihood {ll:.3f} < elbo {e:.3f}"


# ---- Pyro's GMM tutorial: enumerated assignments ---------------------------------------------

K = 2


def two_clusters(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.cat([-3.0 + 0.7 * torch.randn(60, generator=g),
                      2.5 + 0.7 * torch.randn(140, generator=g)])


@config_enumerate
def gmm_param_model(data):
    weights = pyro.param("weights", lambda: torch.ones(K) / K, constraint=constraints.simplex)
    locs = pyro.param("locs", lambda: torch.tensor([-1.0, 1.0]))
    scale = pyro.param("scale", lambda: torch.tensor(1.0), constraint=constraints.positive)
    with pyro.plate("data", len(data)):
        assignment = pyro.sample("assignment", dist.Categorical(weights))
        pyro.sample("obs", dist.Normal(locs[assignment], scale), obs=data)


def empty_guide(data):
    pass


def test_gmm_params_enumerated_exact_log_likelihood():
    data = two_clusters()
    history = fit(gmm_param_model, empty_guide, data, epochs=150, batch_size=len(data),
                  objective="enum", lr=0.1, seed=0, progress=False, device="cpu")
    weights, locs, scale = pyro.param("weights"), pyro.param("locs"), pyro.param("scale")
    # trained: the two clusters found (Pyro's own SVI gets locs -2.96, 2.45 here)
    assert sorted(locs.tolist()) == pytest.approx([-2.96, 2.45], abs=0.1), locs
    exact = mixture_log_lik(data, weights, locs, scale)
    # nothing is sampled (the assignment is summed out, the guide is empty): float32 sums
    ll = log_likelihood(gmm_param_model, empty_guide, data, num_samples=10)
    e = elbo(gmm_param_model, empty_guide, data)
    print(f"GMM exact {exact.mean().item():.6f}, log_likelihood {ll:.6f}, elbo {e:.6f}, "
          f"last train_elbo {history['train_elbo'][-1]:.6f}")
    assert ll == pytest.approx(exact.mean().item(), abs=1e-4)
    assert e == pytest.approx(exact.mean().item(), abs=1e-4)
    rows = log_likelihood(gmm_param_model, empty_guide, data, num_samples=10, per_example=True)
    assert tuple(rows.shape) == (len(data),)
    assert (rows.double() - exact).abs().max() <= 1e-4
    rows = elbo(gmm_param_model, empty_guide, data, per_example=True)
    assert (rows.double() - exact).abs().max() <= 1e-4
    # the last step's ELBO was taken one step before these parameters (converged: the
    # change is ~1e-7 nats with Pyro's SVI); 0.05 nats
    assert history["train_elbo"][-1] == pytest.approx(exact.mean().item(), abs=0.05)


@config_enumerate
def gmm_model(data):
    weights = pyro.sample("weights", dist.Dirichlet(0.5 * torch.ones(K)))
    scale = pyro.sample("scale", dist.LogNormal(0.0, 2.0))
    with pyro.plate("components", K):
        locs = pyro.sample("locs", dist.Normal(0.0, 10.0))
    with pyro.plate("data", len(data)):
        assignment = pyro.sample("assignment", dist.Categorical(weights))
        pyro.sample("obs", dist.Normal(locs[assignment], scale), obs=data)


def test_gmm_tutorial_global_autodelta():
    data = two_clusters()

    def init_loc_fn(site):  # as in the tutorial, with the locs at the data's extremes
        if site["name"] == "weights":
            return torch.ones(K) / K
        if site["name"] == "scale":
            return (data.var() / 2).sqrt()
        if site["name"] == "locs":
            return torch.stack([data.min(), data.max()])
        raise ValueError(site["name"])

    global_guide = AutoDelta(poutine.block(gmm_model, expose=["weights", "locs", "scale"]),
                             init_loc_fn=init_loc_fn)
    history = fit(gmm_model, global_guide, data, epochs=150, batch_size=len(data),
                  objective="enum", lr=0.1, seed=0, progress=False, device="cpu")
    assert history["train_elbo"][-1] > history["train_elbo"][0]
    point = global_guide.median(data)
    assert sorted(point["locs"].tolist()) == pytest.approx([-2.96, 2.45], abs=0.15), point
    exact = mixture_log_lik(data, point["weights"], point["locs"], point["scale"])
    # the globals are points, the assignment is summed out: exact up to float32 sums
    ll = log_likelihood(gmm_model, global_guide, data, num_samples=10)
    print(f"GMM (AutoDelta) exact {exact.mean().item():.6f}, log_likelihood {ll:.6f}")
    assert ll == pytest.approx(exact.mean().item(), abs=1e-3)
    e = elbo(gmm_model, global_guide, data)
    assert e == pytest.approx(exact.mean().item(), abs=1e-3)


# ---- Bayesian linear regression, conjugate -----------------------------------------------------

N_REG, D_REG = 400, 3


def regression_data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N_REG, D_REG, generator=g)
    y = x @ torch.tensor([0.5, -0.3, 0.2]) + 0.1 + 0.5 * torch.randn(N_REG, generator=g)
    return x, y


def regression_model(x, y):
    w = pyro.sample("w", dist.Normal(torch.zeros(D_REG), 1.0).to_event(1))
    b = pyro.sample("b", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(x)):
        # x @ w + b, written to broadcast over vectorized particles (w: (..., 1, D))
        pyro.sample("obs", dist.Normal((x * w).sum(-1) + b, 0.5), obs=y)


def regression_exact(x, y):
    """Exact posterior of (w_1, w_2, w_3, b): prior N(0, I), y = [x 1] @ (w, b) + N(0, 0.25)."""
    design = torch.cat([x, torch.ones(len(x), 1)], dim=1)
    mean, cov = gaussian_posterior(torch.eye(D_REG + 1), design, 0.5, y)
    return mean, cov.diagonal().sqrt()


def guide_wb(guide, *args, **kwargs):
    """Posterior means and sds of (w_1, w_2, w_3, b) under a trained autoguide."""
    median = guide.median(*args, **kwargs)
    q = guide.quantiles(list(ONE_SD), *args, **kwargs)
    mean = torch.cat([median["w"].reshape(-1), median["b"].reshape(-1)]).double()
    sd = torch.cat([((q["w"][1] - q["w"][0]) / 2).reshape(-1),
                    ((q["b"][1] - q["b"][0]) / 2).reshape(-1)]).double()
    return mean, sd


def fit_regression(guide, data, batch_size, steps=240):
    """240 steps of a 32-particle ELBO, lr 0.05 decaying to 0.0005. Measured over 4 seeds,
    minibatches of 50 and full batch: AutoMultivariateNormal's means within 0.09 sd of
    exact, sds within 5%. With Pyro's own SVI, the same run with the minibatch likelihood
    left unscaled (N/B = 8 not applied) gives sds 2.6-2.9x exact."""
    epochs = steps // math.ceil(N_REG / batch_size)
    return fit(regression_model, guide, data, epochs=epochs, batch_size=batch_size, lr=0.05,
               num_particles=32, lr_schedule="exponential", lr_gamma=0.01 ** (1 / epochs),
               seed=0, progress=False, device="cpu")


@pytest.mark.parametrize("batch_size", [50, 400], ids=["minibatch50", "full_batch"])
def test_bayesian_regression_multivariate_normal(batch_size):
    x, y = regression_data()
    # init_scale 0.03: the exact sds are ~0.025; started there, a guide trained against an
    # unscaled likelihood still has to (and does) widen to ~0.07
    guide = AutoMultivariateNormal(regression_model, init_scale=0.03)
    fit_regression(guide, (x, y), batch_size)
    exact_mean, exact_sd = regression_exact(x, y)
    mean, sd = guide_wb(guide, x, y)
    err = ((mean - exact_mean) / exact_sd).abs()
    ratio = sd / exact_sd
    print(f"regression batch_size={batch_size}: max |mean - exact| = {err.max():.3f} sd, "
          f"sd / exact = {[round(r, 3) for r in ratio.tolist()]}")
    # 0.2 sd: optimisation noise measured at <= 0.09 sd
    assert err.max() <= 0.2, f"means {mean.tolist()} vs exact {exact_mean.tolist()}: {err} sd"
    # 20%: measured within 5%; an unscaled minibatch likelihood gives sqrt(400/50) = 2.8x
    assert (ratio - 1).abs().max() <= 0.2, f"sd / exact sd = {ratio.tolist()}"


def test_dict_data_as_keyword_arguments():
    x, y = regression_data()
    guide = AutoNormal(regression_model, init_scale=0.03)
    fit_regression(guide, {"x": x, "y": y}, batch_size=50)
    exact_mean, exact_sd = regression_exact(x, y)
    mean, _ = guide_wb(guide, x=x, y=y)
    err = ((mean - exact_mean) / exact_sd).abs()
    print(f"dict data: max |mean - exact| = {err.max():.3f} sd")
    # 0.2 sd as above (the features are independent: mean-field is exact in the mean)
    assert err.max() <= 0.2, f"means {mean.tolist()} vs exact {exact_mean.tolist()}: {err} sd"


def matmul_regression_model(x, y):
    w = pyro.sample("w", dist.Normal(torch.zeros(D_REG), 1.0).to_event(1))
    b = pyro.sample("b", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(x)):
        pyro.sample("obs", dist.Normal(x @ w + b, 0.5), obs=y)  # not batch-shape agnostic


def test_non_vectorizable_model_with_several_particles():
    """``x @ w`` fails under Pyro's vectorized particles (w gets shape (K, 1, D)); asked for
    num_particles=4, the engine draws the particles one at a time (with a warning) instead
    of stopping with a raw RuntimeError from inside the model; evaluation does the same."""
    x, y = regression_data()
    guide = AutoNormal(matmul_regression_model)
    with pytest.warns(UserWarning, match="one after another"):
        history = fit(matmul_regression_model, guide, (x, y), epochs=2, batch_size=100,
                      num_particles=4, lr=0.05, seed=0, progress=False, device="cpu")
    assert all(math.isfinite(v) for v in history["train_elbo"])
    with pytest.warns(UserWarning, match="one at a time"):
        value = elbo(matmul_regression_model, guide, (x, y), num_particles=4)
    assert math.isfinite(value)


# ---- two plates: students x items ---------------------------------------------------------------

def students_items_data(students=30, items=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    ability = torch.randn(students, 1, generator=g)
    difficulty = torch.randn(items, generator=g)
    return ability - difficulty + torch.randn(students, items, generator=g)


def students_items_model(y):
    students = pyro.plate("students", len(y), dim=-2)
    items = pyro.plate("items", y.shape[1], dim=-1)
    with items:
        difficulty = pyro.sample("difficulty", dist.Normal(0.0, 1.0))
    with students:
        ability = pyro.sample("ability", dist.Normal(0.0, 1.0))
    with students, items:
        pyro.sample("obs", dist.Normal(ability - difficulty, 1.0), obs=y)


def students_items_exact(y):
    """Exact posterior of (ability_1..S, difficulty_1..I): prior N(0, I),
    y_si = ability_s - difficulty_i + N(0, 1)."""
    s, i = y.shape
    design = torch.zeros(s * i, s + i, dtype=F64)
    rows = torch.arange(s * i)
    design[rows, rows // i] = 1.0
    design[rows, s + rows % i] = -1.0
    mean, cov = gaussian_posterior(torch.eye(s + i), design, 1.0, y.reshape(-1))
    return mean, cov.diagonal().sqrt()


@pytest.mark.parametrize("guide_class", [AutoNormal, AutoMultivariateNormal],
                         ids=lambda c: c.__name__)
def test_students_items_two_plates(guide_class):
    y = students_items_data()
    guide = guide_class(students_items_model)
    epochs = 250
    fit(students_items_model, guide, y, epochs=epochs, batch_size=len(y), lr=0.1,
        num_particles=16, lr_schedule="exponential", lr_gamma=0.02 ** (1 / epochs), seed=0,
        progress=False, device="cpu")
    exact_mean, exact_sd = students_items_exact(y)
    median = guide.median(y)
    assert tuple(median["ability"].shape) == (30, 1)
    assert tuple(median["difficulty"].shape) == (5,)
    mean = torch.cat([median["ability"].reshape(-1), median["difficulty"]]).double()
    err = ((mean - exact_mean) / exact_sd).abs()
    print(f"students x items {guide_class.__name__}: max |mean - exact| = {err.max():.3f} sd")
    # 0.15 sd: Gaussian-family guide on a Gaussian posterior, exact in the mean; measured
    # with Pyro's SVI (200-300 steps) at <= 0.09 sd over the 35 values
    assert err.max() <= 0.15, f"max error {err.max():.3f} sd at {int(err.argmax())}"


# ---- mismatched model and guide ---------------------------------------------------------------

def z_model(x):
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("obs", dist.Normal(z, 1.0), obs=x)


def zz_guide(x):
    loc = pyro.param("loc", lambda: torch.zeros(len(x)))
    with pyro.plate("data", len(x)):
        pyro.sample("zz", dist.Normal(loc, 1.0))


def rows_model(x):
    with pyro.plate("rows", len(x)):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("obs", dist.Normal(z, 1.0), obs=x)


def data_plate_guide(x):
    loc = pyro.param("loc", lambda: torch.zeros(len(x)))
    with pyro.plate("data", len(x)):
        pyro.sample("z", dist.Normal(loc, 1.0))


def quoted(name):
    return re.compile(rf"['\"`]{name}['\"`]")


@pytest.mark.parametrize("model, guide, names", [
    (z_model, zz_guide, ["zz"]),
    (rows_model, data_plate_guide, ["rows", "data"]),
], ids=["site_name", "plate_name"])
def test_mismatch_is_refused_before_the_first_step(model, guide, names):
    x = torch.randn(20)
    with pytest.raises(ValueError) as info:  # SetupError is a ValueError
        fit(model, guide, x, epochs=2, batch_size=20, lr=0.1, progress=False, device="cpu")
    message = str(info.value)
    for name in names:
        assert quoted(name).search(message), f"{name!r} not named in: {message}"
    store = pyro.get_param_store()
    if "loc" in store:  # created, but never stepped
        assert torch.equal(store["loc"].detach(), torch.zeros(20))


# ---- no global side effects -------------------------------------------------------------------

def test_import_leaves_pyro_settings_alone():
    code = ("import pyro\n"
            "before = pyro.settings.get('module_local_params')\n"
            "import ppl_vae\n"
            "print(before, pyro.settings.get('module_local_params'))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert out.returncode == 0, out.stderr
    before, after = out.stdout.split()
    assert before == after, f"module_local_params {before} before import ppl_vae, {after} after"


def test_fit_leaves_pyro_settings_as_found():
    before = pyro.settings.get("module_local_params")
    fit_schools(AutoNormal(schools_model), batch_size=8, steps=5)
    assert pyro.settings.get("module_local_params") == before


# ---- AutoGuideList: global autoguide + amortized local part ------------------------------------

N_LAT, D_LAT = 200, 4
W_LAT = torch.tensor([1.0, 0.5, -0.5, 1.5])


def latent_factor_data(seed=0):
    g = torch.Generator().manual_seed(seed)
    loc = torch.tensor([1.0, -1.0, 0.5, 2.0])
    return (loc + torch.randn(N_LAT, 1, generator=g) * W_LAT
            + 0.5 * torch.randn(N_LAT, D_LAT, generator=g))


def latent_factor_model(x):
    loc = pyro.sample("loc", dist.Normal(torch.zeros(D_LAT), 5.0).to_event(1))
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("obs", dist.Normal(loc + z.unsqueeze(-1) * W_LAT, 0.5).to_event(1), obs=x)


class AmortizedLocal(AutoGuide):
    """The local part as Pyro's AutoCallable docs advise for guides that need plates: a
    subclass of AutoGuide that opens the list's data plate (``self._create_plates``)."""

    def __init__(self, model, encoder):
        super().__init__(model)
        self.encoder = encoder

    def forward(self, x):
        if self.prototype_trace is None:
            self._setup_prototype(x)
        plates = self._create_plates(x)
        out = self.encoder(x)
        with plates["data"]:
            z = pyro.sample("z", dist.Normal(out[..., 0], F.softplus(out[..., 1])))
        return {"z": z}


def latent_factor_guide(kind):
    torch.manual_seed(0)
    encoder = nn.Linear(D_LAT, 2)
    guide = AutoGuideList(latent_factor_model)
    guide.append(AutoNormal(poutine.block(latent_factor_model, hide=["z"])))
    if kind == "autoguide_part":
        guide.append(AmortizedLocal(poutine.block(latent_factor_model, expose=["z"]), encoder))
    else:
        def local_guide(x):  # a plain function, wrapped in an AutoCallable by append
            pyro.module("encoder", encoder)
            with pyro.plate("data", len(x)):
                out = encoder(x)
                pyro.sample("z", dist.Normal(out[..., 0], F.softplus(out[..., 1])))

        guide.append(local_guide)
    return guide


@pytest.mark.parametrize("kind", ["autoguide_part", "function_part"])
def test_autoguidelist_global_plus_amortized_local(kind):
    x = latent_factor_data()
    guide = latent_factor_guide(kind)
    # plain Pyro rejects the function part (AutoGuideList opens the "data" plate itself, so
    # the function's own pyro.plate("data") is a second site of that name); the engine lets
    # both stand for the same rows
    history = fit(latent_factor_model, guide, x, epochs=50, batch_size=50, lr=0.1, seed=0,
                  progress=False, device="cpu")
    first, last = history["train_elbo"][0], history["train_elbo"][-1]
    # measured: about -35 (first epoch's mean) -> -4.5 nats per example
    assert last > first + 10, f"train ELBO {first:.2f} -> {last:.2f}"
    pyro.set_rng_seed(1)
    e = elbo(latent_factor_model, guide, x, num_particles=20)
    ll = log_likelihood(latent_factor_model, guide, x, num_samples=200)
    assert math.isfinite(e) and math.isfinite(ll)
    assert ll >= e - 0.1
    # exact: x_i | loc ~ N(loc, w w^T + 0.25 I). With loc at the guide's point the importance
    # estimate (200 draws of a 1-D local latent) is within ~0.01 nats (measured: -4.458 vs
    # -4.456 with Pyro's SVI, -4.3121 vs -4.3121 with fit); q(loc)'s spread moves it by
    # about D / (2 N) = 0.01 more
    loc = guide[0].median(x)["loc"].double()  # the AutoNormal part holds the global
    cov = torch.outer(W_LAT, W_LAT).double() + 0.25 * torch.eye(D_LAT, dtype=F64)
    exact = dist.MultivariateNormal(loc, cov).log_prob(x.double()).mean().item()
    print(f"AutoGuideList {kind}: train ELBO {first:.2f} -> {last:.2f}; elbo {e:.4f}, "
          f"log_likelihood {ll:.4f}, exact at the guide's loc {exact:.4f}")
    assert ll == pytest.approx(exact, abs=0.05)


# ---- an HMM with pyro.markov and enumerated states (Pyro's hmm example style) ------------------

def test_hmm_with_markov_enumeration_gives_the_forward_algorithms_likelihood():
    """Sequences are rows; the hidden states are enumerated with config_enumerate under
    pyro.markov. log_likelihood and elbo (nothing is sampled) must equal the forward
    algorithm's log p(y) for every sequence, at the trained parameters."""
    from pyro.ops.indexing import Vindex

    g = torch.Generator().manual_seed(0)
    trans = torch.tensor([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8]])
    locs = torch.tensor([-2.0, 0.0, 2.0])
    num_seqs, length = 30, 6
    states = torch.zeros(num_seqs, length, dtype=torch.long)
    state = torch.zeros(num_seqs, dtype=torch.long)
    for t in range(length):
        state = torch.multinomial(trans[state], 1, generator=g).squeeze(-1)
        states[:, t] = state
    ys = locs[states] + 0.7 * torch.randn(num_seqs, length, generator=g)

    @config_enumerate
    def model(seqs):
        probs_x = pyro.param("probs_x", trans.clone(), constraint=constraints.simplex)
        loc = pyro.param("locs", locs.clone())
        with pyro.plate("sequences", len(seqs)):
            x = 0
            for t in pyro.markov(range(seqs.shape[1])):
                x = pyro.sample(f"x_{t}", dist.Categorical(Vindex(probs_x)[x]))
                pyro.sample(f"y_{t}", dist.Normal(Vindex(loc)[x], 0.7), obs=seqs[:, t])

    def guide(seqs):
        pass

    fit(model, guide, ys, epochs=5, batch_size=10, lr=0.02, objective="enum", seed=0,
        progress=False, device="cpu")
    p, loc = pyro.param("probs_x").detach(), pyro.param("locs").detach()
    emit = dist.Normal(loc, 0.7)
    alpha = p[0].log() + emit.log_prob(ys[:, :1])  # from state 0, as the model starts
    for t in range(1, length):
        alpha = torch.logsumexp(alpha[:, :, None] + p.log(), 1) + emit.log_prob(ys[:, t:t + 1])
    exact = torch.logsumexp(alpha, -1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Vindex indexing: particles evaluated one at a time
        per_seq = log_likelihood(model, guide, ys, num_samples=2, per_example=True)
        whole = elbo(model, guide, ys)
    assert torch.allclose(per_seq, exact, atol=1e-4), (per_seq - exact).abs().max()
    assert whole == pytest.approx(float(exact.mean()), abs=1e-4)


# ---- missing values (obs_mask), a model that subsamples itself, discrete draws -------------------

def _missing_values_data(n=60):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(n, generator=g) + 2.0
    observed = torch.arange(n) % 3 != 0  # every third value missing
    return torch.where(observed, x, torch.zeros(())), observed


def missing_values_model(x, observed):
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    with pyro.plate("data", len(x)):
        pyro.sample("obs", dist.Normal(mu, 1.0), obs=x, obs_mask=observed)


@pytest.mark.parametrize("batch_size", [60, 20])
def test_obs_mask_with_autonormal_scores_observed_rows_exactly(batch_size):
    """obs_mask adds the latent 'obs_unobserved', masked to the missing rows. AutoNormal has
    a value for every row; at the observed ones the model has no density, so its log q
    there must not count: else the ELBO rewards the guide's entropy there without bound
    (its scales grew 0.05 -> 7.7 in 400 steps, the train ELBO kept rising) and an observed
    row's log-likelihood came out +2.7 nats against an exact -1.43. Exact here: the
    predictive N(x_i | m, 1 + s^2) under the trained q(mu) = N(m, s^2); importance sampling
    from q itself is then exact up to Monte Carlo error (~0.001 nats with 1,000 draws)."""
    x, observed = _missing_values_data()
    guide = AutoNormal(missing_values_model, init_scale=0.05)
    history = fit(missing_values_model, guide, (x, observed), epochs=400 * batch_size // 60,
                  batch_size=batch_size, lr=0.05, seed=0, progress=False, device="cpu")
    loc, scale = (v.detach() for v in guide._get_loc_and_scale("mu"))
    _, unobserved_scale = (v.detach() for v in guide._get_loc_and_scale("obs_unobserved"))
    assert torch.allclose(unobserved_scale[observed], torch.tensor(0.05))  # no gradient there
    assert (unobserved_scale[~observed] - 1).abs().max() < 0.3  # the missing values' N(mu, 1)
    late = history["train_elbo"][-40:]
    assert max(late) < -0.9, late  # bounded: about -1.0 nats per row
    ll = log_likelihood(missing_values_model, guide, (x, observed), num_samples=1000,
                        per_example=True)
    exact = dist.Normal(loc, (1 + scale ** 2).sqrt()).log_prob(x)
    assert (ll[observed] - exact[observed]).abs().max() < 0.01
    assert ll[~observed].abs().max() < 0.05  # a missing row has no data: log 1 = 0


def test_joint_autoguide_over_a_masked_latent_is_refused():
    """AutoDiagonalNormal keeps one joint Normal over every latent, the masked entries of
    'obs_unobserved' included, so masking cannot remove their entropy: refused, naming the
    site and the guide to use instead."""
    x, observed = _missing_values_data()
    with pytest.raises(SetupError, match=r"'obs_unobserved' is masked.*use AutoNormal"):
        fit(missing_values_model, AutoDiagonalNormal(missing_values_model), (x, observed),
            epochs=1, batch_size=60, progress=False, device="cpu")


def test_a_model_subsampling_its_own_plate_under_per_row_autoguide_params():
    """pyro.plate("data", len(x), subsample_size=20) with a per-row latent and AutoNormal:
    full-batch it trains (the model's subsample_size makes the minibatches, as with Pyro's
    SVI); on the engine's minibatches the guide's rows and the model's cannot agree, so it
    is refused before training with the two ways out."""
    x = torch.randn(300, generator=torch.Generator().manual_seed(1)) + 1.5

    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        with pyro.plate("data", len(x), subsample_size=20) as rows:
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("obs", dist.Normal(z + mu, 1.0), obs=x[rows])

    guide = AutoNormal(model)
    fit(model, guide, x, epochs=150, batch_size=300, lr=0.05, seed=0, progress=False,
        device="cpu")
    loc = float(guide._get_loc_and_scale("mu")[0].detach())
    # exact: x_i ~ N(mu, 2) given mu, so mu | x ~ N(sum x / (n + 2/100), 2 / n) nearly
    assert loc == pytest.approx(float(x.mean()), abs=3 * math.sqrt(2 / 300))
    with pytest.raises(SetupError, match=r"subsample_size=20.*batch_size >= 300"
                                         r".*batch_size=20"):
        fit(model, AutoNormal(model), x, epochs=1, batch_size=50, progress=False,
            device="cpu")


def test_to_arviz_draws_enumerated_sites_afresh_in_every_draw():
    """A mixture with known weights and locations and an empty guide: the assignments'
    draws (infer_discrete) must follow p(a_i = 1 | x_i) row by row. Before, nothing varied
    along the draws, so each row got one value repeated in all of them (share 0 or 1).
    400 draws: the binomial sd of a share is at most 0.025; the bound is 4 of them."""
    weights, locs = torch.tensor([0.3, 0.7]), torch.tensor([-1.0, 1.0])
    x = 1.5 * torch.randn(20, generator=torch.Generator().manual_seed(16))

    @config_enumerate
    def model(x):
        with pyro.plate("data", len(x)):
            a = pyro.sample("a", dist.Categorical(weights))
            pyro.sample("obs", dist.Normal(locs[a], 1.0), obs=x)

    def guide(x):
        pass

    exact = (weights.log() + dist.Normal(locs, 1.0).log_prob(x[:, None])).softmax(-1)[:, 1]
    pyro.set_rng_seed(0)
    idata = ppl_vae.to_arviz(model, guide, x, num_samples=400)
    share = torch.as_tensor(idata.posterior["a"].values).reshape(400, -1).float().mean(0)
    assert (share - exact).abs().max() < 0.1, (share, exact)


def test_effect_based_guides_are_refused_with_the_autoguide_to_use():
    """AutoNormalMessenger runs the model itself (a GuideMessenger), outside the engine's
    data-plate scaling and importance sampling; wrapped like a plain guide it trained to
    the prior without a word. Refused, naming the AutoGuide to use."""
    from pyro.infer.autoguide import AutoNormalMessenger

    x = torch.randn(20)

    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("obs", dist.Normal(mu, 1.0), obs=x)

    with pytest.raises(SetupError, match=r"AutoNormalMessenger is an effect-based guide.*"
                                         r"AutoNormal for AutoNormalMessenger"):
        fit(model, AutoNormalMessenger(model), x, epochs=1, progress=False, device="cpu")


def test_semi_supervised_labels_with_obs_mask_are_summed_out_exactly():
    """Labels observed for some rows only (obs_mask on an enumerated Categorical; known
    weights and locations, no guide latents): the per-row log-likelihood is log w_y +
    log N(x | loc_y, 1) where y is observed and the mixture's logsumexp elsewhere, as Pyro's
    TraceEnum_ELBO gives. The masked 'y_unobserved' factor is kept whole in the sum (Pyro
    does the same); masked, it added log 2 to every labelled row. to_arviz draws it."""
    weights, locs = torch.tensor([0.4, 0.6]), torch.tensor([-1.0, 2.0])
    g = torch.Generator().manual_seed(3)
    labels = torch.multinomial(weights, 30, replacement=True, generator=g)
    x = locs[labels] + torch.randn(30, generator=g)
    observed = torch.arange(30) % 2 == 0

    @config_enumerate
    def model(x, labels, observed):
        with pyro.plate("data", len(x)):
            y = pyro.sample("y", dist.Categorical(weights), obs=labels, obs_mask=observed)
            pyro.sample("obs", dist.Normal(locs[y], 1.0), obs=x)

    def guide(x, labels, observed):
        pass

    joint = weights.log() + dist.Normal(locs, 1.0).log_prob(x[:, None])
    exact = torch.where(observed, joint.gather(1, labels[:, None]).squeeze(1),
                        joint.logsumexp(1))
    per_row = log_likelihood(model, guide, (x, labels, observed), num_samples=2,
                             per_example=True)
    assert (per_row - exact).abs().max() < 1e-4
    assert elbo(model, guide, (x, labels, observed)) == pytest.approx(float(exact.mean()),
                                                                     abs=1e-4)
    idata = ppl_vae.to_arviz(model, guide, (x, labels, observed), num_samples=20)
    assert idata.posterior["y_unobserved"].shape == (1, 20, 30)


def test_deterministic_sites_keep_their_own_shape_in_to_arviz():
    """pyro.deterministic's event_dim defaults to all of the value's dims, the particles'
    included, so to_arviz gave a global one shape (draws, draws, 1) and a per-row one
    (draws, rows, draws, rows). They are (draws,) and (draws, rows), equal to what they
    compute."""
    x = torch.randn(15, generator=torch.Generator().manual_seed(2)) + 1.0

    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        pyro.deterministic("twice", 2 * mu)
        with pyro.plate("data", len(x)):
            pyro.deterministic("residual", x - mu)
            pyro.sample("obs", dist.Normal(mu, 1.0), obs=x)

    guide = AutoNormal(model)
    fit(model, guide, x, epochs=20, lr=0.05, progress=False, device="cpu")
    post = ppl_vae.to_arviz(model, guide, x, num_samples=9).posterior
    assert post["twice"].dims == ("chain", "draw") and post["twice"].shape == (1, 9)
    assert post["residual"].dims == ("chain", "draw", "data")
    assert post["residual"].shape == (1, 9, 15)
    mu = post["mu"].values[0]
    assert abs(post["twice"].values[0] - 2 * mu).max() < 1e-6
    assert abs(post["residual"].values[0] - (x.numpy()[None] - mu[:, None])).max() < 1e-5


def test_a_program_that_indexes_a_latents_event_dim_is_evaluated_per_particle():
    """mu[..., group] on a latent with an event dim puts the particle dim left of every
    plate, so a vectorized pass mixes the draws: log_likelihood came out -451.8 nats per
    row against -1.50. The engine now sees the extra dim, warns, and evaluates the
    particles one at a time (as for x @ w). Exact here: under q(mu_g) = N(m_g, s_g^2) set
    by hand, log p(y_i) estimated with 400 draws is within Monte Carlo error (~0.01) of
    log N(y_i | m_g, 1 + s_g^2) on average. to_arviz draws the same way."""
    groups = torch.arange(24) % 3
    y = torch.tensor([-1.0, 0.5, 2.0])[groups] + torch.randn(24, generator=torch.Generator()
                                                             .manual_seed(5))
    loc, scale = torch.tensor([-0.9, 0.4, 1.8]), torch.tensor([0.3, 0.2, 0.25])

    def model(groups, y):
        mu = pyro.sample("mu", dist.Normal(torch.zeros(3), 1.0).to_event(1))
        with pyro.plate("data", len(groups)):
            pyro.sample("obs", dist.Normal(mu[..., groups], 1.0), obs=y)

    def guide(groups, y):
        pyro.sample("mu", dist.Normal(loc, scale).to_event(1))

    exact = dist.Normal(loc[groups], (1 + scale[groups] ** 2).sqrt()).log_prob(y).mean()
    pyro.set_rng_seed(0)
    with pytest.warns(UserWarning, match="does not broadcast over"):
        estimate = log_likelihood(model, guide, (groups, y), num_samples=400)
    assert estimate == pytest.approx(float(exact), abs=0.02)
    idata = ppl_vae.to_arviz(model, guide, (groups, y), num_samples=10)
    assert idata.log_likelihood["obs"].shape == (1, 10, 24)


def test_global_khat_of_a_program_that_does_not_broadcast_over_particles():
    """x @ w (Pyro's regression tutorial style) does not broadcast over a leading particle
    dim; importance_diagnostics crashed on its global latents where elbo and log_likelihood
    fall back to one particle at a time. Now it falls back too, with a warning, and a
    Gaussian guide at the exact Gaussian posterior gets a good k-hat."""
    g = torch.Generator().manual_seed(7)
    design = torch.randn(40, 2, generator=g)
    y = design @ torch.tensor([1.0, -0.5]) + 0.5 * torch.randn(40, generator=g)

    def model(design, y):
        w = pyro.sample("w", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        with pyro.plate("data", len(y)):
            pyro.sample("obs", dist.Normal(design @ w, 0.5), obs=y)

    mean, cov = gaussian_posterior(torch.eye(2), design, torch.full((40,), 0.5), y)

    def guide(design, y):
        pyro.sample("w", dist.MultivariateNormal(mean.float(), cov.float()))

    with pytest.warns(UserWarning, match="does not broadcast"):
        k = ppl_vae.importance_diagnostics(model, guide, (design, y), num_samples=200,
                                           seed=0)
    assert k.glob is not None and k.glob < 0.5


def test_training_with_vectorized_particles_checks_the_particle_dims():
    """The same mu[..., group] program trained with 8 vectorized particles: no error is
    raised, but the loss mixed every particle's latent with every other's rows (posterior
    sds came out 0.07 against the exact 0.218, the ELBO -12.0 against -1.6 nats per row).
    The first step now checks the dims, warns, and draws the particles one after another;
    the guide then matches the exact conjugate posterior N(sum y / (1 + n), 1 / (1 + n))."""
    groups = torch.arange(60) % 3
    y = torch.tensor([-1.0, 0.5, 2.0])[groups] + torch.randn(
        60, generator=torch.Generator().manual_seed(5))

    def model(groups, y):
        mu = pyro.sample("mu", dist.Normal(torch.zeros(3), 1.0).to_event(1))
        with pyro.plate("data", len(groups)):
            pyro.sample("obs", dist.Normal(mu[..., groups], 1.0), obs=y)

    guide = AutoNormal(model)
    with pytest.warns(UserWarning, match="does not broadcast over the extra dim"):
        fit(model, guide, (groups, y), epochs=300, batch_size=60, lr=0.05, num_particles=8,
            seed=0, progress=False, device="cpu")
    loc, scale = (v.detach() for v in guide._get_loc_and_scale("mu"))
    exact_sd = 1 / math.sqrt(21)
    assert (scale / exact_sd - 1).abs().max() < 0.25
    exact_mean = torch.zeros(3).index_add_(0, groups, y) / 21
    assert (loc - exact_mean).abs().max() < 0.5 * exact_sd


def test_a_latent_drawn_from_its_prior_drops_out_of_the_importance_weight():
    """A model latent that the guide leaves out is drawn from its prior (the warning says
    so): the prior is then its proposal, so log p(z) - log q(z) = 0. The weight kept
    log p(z) alone, and log_likelihood converged to log sum_z p(z)^2 p(x|z) instead of
    log p(x) (exact + log 0.5 here). Exact: a two-component mixture's log-density."""
    g = torch.Generator().manual_seed(4)
    x = torch.cat([torch.randn(100, generator=g) - 2, torch.randn(100, generator=g) + 2])
    locs = torch.tensor([-2.0, 2.0])

    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Categorical(torch.tensor([0.5, 0.5])))
            pyro.sample("obs", dist.Normal(locs[z], 1.0), obs=x)

    def guide(x):
        pass

    exact = (math.log(0.5) + dist.Normal(locs[:, None], 1.0).log_prob(x)).logsumexp(0).mean()
    pyro.set_rng_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        estimate = log_likelihood(model, guide, x, num_samples=2000)
    assert estimate == pytest.approx(float(exact), abs=0.01)


def test_sequential_enumeration_in_the_model_and_constants_in_the_data_are_refused():
    """Pyro enumerates sequentially in the guide only; the engine trained such a model with
    the site drawn from its prior and a warning advising config_enumerate. A dict or tuple
    of data holding a constant (num_classes=3) was taken for a stream of minibatches
    ("streamed data needs num_data="). Both now say what to do."""
    x = torch.randn(20)

    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Bernoulli(0.5), infer={"enumerate": "sequential"})
            pyro.sample("obs", dist.Normal(2.0 * z - 1.0, 1.0), obs=x)

    def guide(x):
        pass

    with pytest.raises(SetupError, match=r"'z' is marked for sequential enumeration.*"
                                         r"config_enumerate"):
        fit(model, guide, x, epochs=1, objective="enum", progress=False, device="cpu")

    def counted(y, num_classes=2):
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Categorical(torch.ones(num_classes)), obs=y)

    y = torch.randint(0, 3, (20,))
    with pytest.raises(ValueError, match=r"data\['num_classes'\] is of type int, not a tensor"
                                         r".*functools.partial\(model, num_classes=...\)"):
        fit(counted, lambda y, num_classes=2: None, {"y": y, "num_classes": 3}, epochs=1,
            progress=False, device="cpu")


def test_a_reparameterized_site_is_in_the_posterior_not_the_likelihood():
    """poutine.reparam(LocScaleReparam) replaces 'theta' by an observed Delta(...).mask(False)
    of its value; to_arviz filed it as a likelihood (all zeros) and observed data, so
    az.loo(idata) refused ("several log likelihood arrays"). It is now a posterior variable
    equal to mu + tau * theta_decentered, and loo runs on 'obs' alone."""
    import arviz as az
    from pyro.infer.reparam import LocScaleReparam

    y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
    sigma = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])

    def schools(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        with pyro.plate("data", len(y)):
            theta = pyro.sample("theta", dist.Normal(mu, 5.0))
            pyro.sample("obs", dist.Normal(theta, sigma), obs=y)

    model = poutine.reparam(schools, config={"theta": LocScaleReparam(centered=0.0)})
    guide = AutoNormal(model)
    fit(model, guide, y, epochs=100, lr=0.05, progress=False, device="cpu")
    idata = ppl_vae.to_arviz(model, guide, y, num_samples=50)
    assert list(idata.log_likelihood.data_vars) == ["obs"]
    assert list(idata.observed_data.data_vars) == ["obs"]
    post = idata.posterior
    assert post["theta"].dims == ("chain", "draw", "data")
    rebuilt = post["mu"].values[..., None] + 5.0 * post["theta_decentered"].values
    assert abs(post["theta"].values - rebuilt).max() < 1e-4
    assert np.isfinite(az.loo(idata).elpd_loo)


def test_objectives_that_cannot_train_the_pair_are_refused_naming_one_that_can():
    """z ~ Bernoulli(0.3), x | z ~ N(3z - 1.5, 1), guide q(z | x) = Bernoulli(sigmoid(a x + c)):
    the exact posterior is in the family (a = 3, c = logit 0.3 = -0.847). TraceMeanField_ELBO
    has no score-function term, so ``meanfield`` trained q to the prior (a = 0.000, c =
    -0.847); ``iwae``/``renyi`` differentiate through the draws only and pushed q the wrong
    way (a = -5.1). Pyro refuses the first only under validation, which training steps run
    without. Both are now refused naming ``trace``, which trains q to the exact posterior.
    A ``config_enumerate``-d model site under ``trace`` was drawn from its prior with no
    word (Pyro warns); Pyro ELBO and optimizer objects and an unknown KL site were refused
    or ignored unclearly."""
    torch.manual_seed(0)
    z = torch.bernoulli(torch.full((400,), 0.3))
    x = 3.0 * z - 1.5 + torch.randn(400)

    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Bernoulli(0.3))
            pyro.sample("obs", dist.Normal(3.0 * z - 1.5, 1.0), obs=x)

    class Guide(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.tensor(0.0))
            self.c = nn.Parameter(torch.tensor(0.0))

        def forward(self, x):
            pyro.module("q", self)
            with pyro.plate("data", len(x)):
                pyro.sample("z", dist.Bernoulli(logits=self.a * x + self.c))

    for objective, particles in (("meanfield", 1), ("iwae", 4), ("renyi", 4)):
        with pytest.raises(SetupError, match=rf"objective='{objective}'.*guide site 'z' has no "
                                             r"rsample.*use objective='trace'"):
            fit(model, Guide(), x, objective=objective, num_particles=particles, epochs=1,
                progress=False, device="cpu")
    guide = Guide()
    fit(model, guide, x, objective="trace", num_particles=8, epochs=60, batch_size=100,
        lr=0.05, progress=False, device="cpu")
    # exact: logit q = logit 0.3 + log N(x; 1.5, 1) - log N(x; -1.5, 1) = 3 x - 0.847
    assert guide.a.item() == pytest.approx(3.0, abs=0.6)
    assert guide.c.item() == pytest.approx(math.log(0.3 / 0.7), abs=0.4)

    @config_enumerate
    def mixture(x):
        with pyro.plate("data", len(x)):
            y = pyro.sample("y", dist.Bernoulli(0.3))
            pyro.sample("obs", dist.Normal(3.0 * y - 1.5, 1.0), obs=x)

    with pytest.raises(SetupError, match=r"model site 'y' is marked for enumeration.*"
                                         r"objective='trace' does not do.*objective='enum'"):
        fit(mixture, lambda x: None, x, objective="trace", epochs=1, progress=False,
            device="cpu")
    with pytest.raises(SetupError, match=r"not a Pyro TraceMeanField_ELBO object.*pass "
                                         r"objective='meanfield', num_particles=4"):
        fit(model, Guide(), x, objective=pyro.infer.TraceMeanField_ELBO(num_particles=4))
    with pytest.raises(SetupError, match=r"pass objective='renyi', renyi_alpha=0.5, "
                                         r"num_particles=5"):
        fit(model, Guide(), x, objective=pyro.infer.RenyiELBO(alpha=0.5, num_particles=5))
    with pytest.raises(SetupError, match=r"optimizer takes a name, not Adam.*"
                                         r"optimizer='adam', lr=0.01"):
        fit(model, Guide(), x, optimizer=pyro.optim.Adam({"lr": 0.01}))
    with pytest.raises(SetupError, match=r"kl_sites names 'zz', which is not a latent site.*: z"):
        fit(model, Guide(), x, kl_sites=["zz"], epochs=1, progress=False, device="cpu")


def test_enumerated_sites_score_exactly_when_masked_or_parent_of_a_guide_latent():
    """Two evaluation bugs of enumerated programs. (1) A guide that enumerates obs_mask's
    ``y_unobserved`` (semi-supervised): ``elbo`` counted each labelled row once per class
    (-9.35 against -2.02; the validation ELBO of fit uses it). (2) A model-enumerated c with
    a guide-drawn child z ~ N(loc[c], 1): every evaluator raised "Error while packing
    tensors at site 'z'" (the enumeration sat outside the replay, which marks z done), and
    to_arviz's log_likelihood left p(z | c) out (log sum_c p(c) p(x | z, c) instead of log
    p(x | z) = log sum_c p(c | z) p(x | z, c))."""
    import math as _math

    from pyro.ops.indexing import Vindex

    classes = 3
    x = torch.tensor([-4.0, 0.2, 3.9, 1.0])
    y = torch.tensor([0, 1, 2, 0])
    labelled = torch.tensor([True, True, True, False])
    locs = torch.tensor([-4.0, 0.0, 4.0])

    def model(x, y, labelled):
        with pyro.plate("data", len(x)):
            yy = pyro.sample("y", dist.Categorical(logits=torch.zeros(classes)), obs=y,
                             obs_mask=labelled)
            pyro.sample("x", dist.Normal(locs[yy], 1.0), obs=x)

    @config_enumerate
    def guide(x, y, labelled):
        with pyro.plate("data", len(x)):
            pyro.sample("y_unobserved",
                        dist.Categorical(logits=x[:, None] * torch.tensor([-1.0, 0.0, 1.0])))

    joint = dist.Normal(locs, 1.0).log_prob(x[:, None]) - _math.log(classes)
    log_q = torch.log_softmax(x[:, None] * torch.tensor([-1.0, 0.0, 1.0]), -1)
    given = joint.gather(1, y[:, None]).squeeze(1)
    exact_elbo = torch.where(labelled, given, (log_q.exp() * (joint - log_q)).sum(1))
    exact_log_p = torch.where(labelled, given, joint.logsumexp(1))
    data = (x, y, labelled)
    assert torch.allclose(elbo(model, guide, data, per_example=True), exact_elbo, atol=1e-4)
    assert torch.allclose(log_likelihood(model, guide, data, num_samples=3, per_example=True),
                          exact_log_p, atol=1e-4)

    torch.manual_seed(0)
    loc = torch.tensor([-3.0, 3.0])
    x = torch.cat([torch.randn(10) - 3, torch.randn(10) + 3])

    @config_enumerate
    def mixture(x):
        with pyro.plate("data", len(x)):
            c = pyro.sample("c", dist.Categorical(torch.tensor([0.5, 0.5])))
            z = pyro.sample("z", dist.Normal(Vindex(loc)[c], 1.0))
            pyro.sample("x", dist.Normal(z, 0.5), obs=x)

    def local(x):  # q(z | x) = N(0.8 x, 0.5), fixed
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(0.8 * x, 0.5))

    # exact log p(x): z integrates out, x | c ~ N(loc_c, sqrt(1 + 0.25))
    exact = (dist.Normal(loc, 1.25 ** 0.5).log_prob(x[:, None]) + _math.log(0.5)).logsumexp(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "does not broadcast" fallback either
        estimate = log_likelihood(mixture, local, x, num_samples=4000, per_example=True)
        idata = ppl_vae.to_arviz(mixture, local, x, num_samples=50)
    assert torch.allclose(estimate, exact, atol=0.05)
    z = torch.as_tensor(idata.posterior["z"].values[0])  # (draws, rows)
    parts = dist.Normal(loc, 1.0).log_prob(z[..., None]) + _math.log(0.5)
    by_hand = (parts + dist.Normal(z[..., None], 0.5).log_prob(x[:, None])).logsumexp(-1) \
        - parts.logsumexp(-1)
    lik = torch.as_tensor(idata.log_likelihood["x"].values[0])
    assert torch.allclose(lik, by_hand, atol=1e-4)


def test_sizeless_plates_side_observations_and_rows_that_cannot_be_scored():
    """``pyro.plate("data")`` without a size (Pyro's SS-VAE example) was never scaled on
    minibatches: q(w) came out sqrt(10) too wide at batch 20 of 200. Observations in a second
    plate were refused saying the row-plate's own site was outside any plate. A model that
    subsamples its own data plate, a joint autoguide over per-row latents and AutoDelta's
    point masses gave wrong per-row numbers (10 random rows in to_arviz, -2.78 against an
    exact -1.87, +0.21 for count data) with no word."""
    torch.manual_seed(0)
    x = torch.randn(200)
    y = 2 * x + torch.randn(200)

    def sizeless(x, y):
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        with pyro.plate("data"):
            pyro.sample("obs", dist.Normal(w * x, 1.0), obs=y)

    guide = AutoNormal(sizeless)
    fit(sizeless, guide, (x, y), epochs=60, batch_size=20, lr=0.02, progress=False,
        device="cpu")
    exact_sd = float((1.0 + (x ** 2).sum()) ** -0.5)  # N(0, 1) prior, unit noise
    assert guide.scales.w.item() == pytest.approx(exact_sd, rel=0.25)

    def sizeless_rows(x):  # Pyro's SS-VAE shape: per-row latents in a sizeless plate
        with pyro.plate("data"):
            z = pyro.sample("z", dist.Normal(torch.zeros(len(x)), 1.0))
            pyro.sample("obs", dist.Normal(z, 1.0), obs=x)

    def amortized(x):
        a = pyro.param("a", torch.tensor(0.1))
        s = pyro.param("s", torch.tensor(1.0), constraint=constraints.positive)
        with pyro.plate("data"):
            pyro.sample("z", dist.Normal(a * x, s))

    fit(sizeless_rows, amortized, 2 * x, epochs=40, batch_size=25, lr=0.05, progress=False,
        device="cpu")  # refused before ("'data' (size 25) but the model in 'data' (size -1)")
    # exact q(z | x) = N(x / 2, sqrt(1/2)); minibatch noise at lr 0.05 leaves a few hundredths
    assert pyro.param("a").item() == pytest.approx(0.5, abs=0.06)
    assert pyro.param("s").item() == pytest.approx(0.5 ** 0.5, abs=0.06)

    side = torch.tensor([1.5, 2.0, 0.5, 1.0, 2.5])

    def two_plates(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        with pyro.plate("aux", 5):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=side)
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x)

    with pytest.raises(SetupError, match=r"plate 'data' runs over the rows of 'x', but "
                                         r"observed site\(s\) 'y' lie outside it.*plate='data'"):
        fit(two_plates, AutoNormal(two_plates), x, epochs=1, batch_size=4, progress=False,
            device="cpu")

    def own(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        with pyro.plate("data", len(x), subsample_size=10) as idx:
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x[idx])

    guide = AutoNormal(own)
    fit(own, guide, x, epochs=2, progress=False, device="cpu")
    for evaluate in (lambda: log_likelihood(own, guide, x, num_samples=5),
                     lambda: ppl_vae.to_arviz(own, guide, x, num_samples=5)):
        with pytest.raises(SetupError, match=r"subsamples plate 'data' itself "
                                             r"\(subsample_size=10\).*without subsample_size"):
            evaluate()

    def local(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    joint = AutoDiagonalNormal(local)
    fit(local, joint, x[:20], epochs=2, batch_size=20, progress=False, device="cpu")
    with pytest.raises(SetupError, match=r"AutoDiagonalNormal keeps one joint distribution.*"
                                         r"per-row latent\(s\) z.*use AutoNormal"):
        log_likelihood(local, joint, x[:20], num_samples=5)
    point = AutoDelta(local)
    fit(local, point, x[:20], epochs=2, batch_size=20, progress=False, device="cpu")
    with pytest.warns(UserWarning, match=r"per-row latent\(s\) z are point masses"):
        log_likelihood(local, point, x[:20], num_samples=5)
    density = AutoNormal(local)  # its sites are Deltas too, of an auxiliary Normal draw
    fit(local, density, x[:20], epochs=2, batch_size=20, progress=False, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        log_likelihood(local, density, x[:20], num_samples=5)


def test_to_arviz_names_rows_of_a_dim_minus_2_plate_and_hides_unused_obs_mask_values():
    """Students x items with theta in a plate at dim -2: theta came out as (draws, students,
    theta_batch1) with labels theta[0, 0], and dims={"theta": ["student"]} was refused.
    obs_mask's x_unobserved held the guide's untrained values at observed entries, which
    az.summary reported as if they were posterior draws. A program that does not broadcast
    over particles was drawn one draw at a time without the warning the other evaluators
    give."""
    import arviz as az

    torch.manual_seed(0)
    students, items = 12, 5
    y = torch.randn(students, 1) + torch.randn(items) + torch.randn(students, items)

    def exam(y):
        with pyro.plate("items", y.shape[1]):
            b = pyro.sample("b", dist.Normal(0.0, 1.0))
        with pyro.plate("students", len(y), dim=-2):
            theta = pyro.sample("theta", dist.Normal(0.0, 1.0))
            with pyro.plate("items", y.shape[1], dim=-1):
                pyro.sample("y", dist.Normal(theta + b, 1.0), obs=y)

    guide = AutoNormal(exam)
    fit(exam, guide, y, epochs=3, batch_size=students, progress=False, device="cpu")
    idata = ppl_vae.to_arviz(exam, guide, y, num_samples=20)
    assert idata.posterior["theta"].dims == ("chain", "draw", "students")
    assert idata.log_likelihood["y"].dims == ("chain", "draw", "students", "items")
    assert "theta[0]" in az.summary(idata, kind="stats").index
    named = ppl_vae.to_arviz(exam, guide, y, num_samples=20, dims={"theta": ["student"]})
    assert named.posterior["theta"].dims == ("chain", "draw", "student")

    x = torch.randn(30) + 4.0
    seen = torch.rand(30) > 0.3

    def missing(x, seen):
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        with pyro.plate("data", len(x)):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x, obs_mask=seen)

    guide = AutoNormal(missing)
    fit(missing, guide, (x, seen), epochs=5, batch_size=30, progress=False, device="cpu")
    idata = ppl_vae.to_arviz(missing, guide, (x, seen), num_samples=20)
    values = idata.posterior["x_unobserved"].values[0]  # (draws, rows)
    assert np.isnan(values[:, seen.numpy()]).all()
    assert np.isfinite(values[:, ~seen.numpy()]).all()

    w_true = torch.tensor([1.0, -2.0])
    inputs = torch.randn(40, 2)
    target = inputs @ w_true + 0.5 * torch.randn(40)

    def regression(inputs, target):
        w = pyro.sample("w", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        with pyro.plate("data", len(inputs)):
            pyro.sample("obs", dist.Normal(inputs @ w, 0.5), obs=target)

    guide = AutoNormal(regression)
    fit(regression, guide, (inputs, target), epochs=3, progress=False, device="cpu")
    with pytest.warns(UserWarning, match="does not broadcast over an extra leading particle"):
        ppl_vae.to_arviz(regression, guide, (inputs, target), num_samples=5)


def test_factors_have_no_observed_data_and_sequential_plates_are_named():
    """pyro.factor beside an observation gave to_arviz empty (rows, 0) arrays in observed_data
    and posterior_predictive; SVI Part II's sequential plate (`for i in pyro.plate(...)`) was
    refused on minibatches as if it were no plate, and plate="data_loop" was called "not a
    plate of the model"."""
    torch.manual_seed(0)
    x = 1.5 * torch.randn(24)

    def penalized(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.factor("penalty", -0.5 * z ** 2)
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    guide = AutoNormal(penalized)
    fit(penalized, guide, x, epochs=5, batch_size=24, progress=False, device="cpu")
    idata = ppl_vae.to_arviz(penalized, guide, x, num_samples=20)
    assert list(idata.observed_data.data_vars) == ["x"]
    assert list(idata.posterior_predictive.data_vars) == ["x"]
    z = idata.posterior["z"].values
    assert np.allclose(idata.log_likelihood["penalty"].values, -0.5 * z ** 2, atol=1e-5)

    flips = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0])

    def coin(data):
        f = pyro.sample("f", dist.Beta(10.0, 10.0))
        for i in pyro.plate("data_loop", len(data)):
            pyro.sample(f"obs_{i}", dist.Bernoulli(f), obs=data[i])

    for kwargs in ({"batch_size": 5}, {"plate": "data_loop"}):
        with pytest.raises(SetupError, match=r"plate 'data_loop' is sequential.*"
                                             r"`with pyro.plate\('data_loop', len\(x\)\):`"):
            fit(coin, AutoNormal(coin), flips, epochs=1, progress=False, device="cpu", **kwargs)


def test_numpy_data_per_row_guides_with_val_data_and_joint_guides_on_minibatches_are_named():
    """NumPy data was taken for a stream ("streamed data needs num_data="); val_data beside an
    AutoNormal over per-row latents failed after the first epoch with a raw size mismatch
    (50 vs 300) after a misleading "does not broadcast" warning; log_likelihood of a joint
    autoguide at the default batch size said it "cannot be trained on minibatches"."""
    torch.manual_seed(0)
    x = torch.randn(300)

    def per_row(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(mu, 1.0))
            pyro.sample("obs", dist.Normal(z, 0.5), obs=x)

    with pytest.raises(ValueError, match=r"data is a numpy ndarray, not a torch tensor.*"
                                         r"torch.as_tensor"):
        fit(per_row, AutoNormal(per_row), x.numpy(), epochs=1, progress=False, device="cpu")
    with pytest.raises(ValueError, match=r"data\[1\] is a numpy ndarray"):
        fit(per_row, AutoNormal(per_row), (x, x.numpy()), epochs=1, progress=False,
            device="cpu")
    with pytest.raises(SetupError, match=r"one parameter per training row for z.*val_data "
                                         r"cannot be scored.*AmortizedNormal"):
        fit(per_row, AutoNormal(per_row), x, val_data=x[:50], epochs=1, progress=False,
            device="cpu")
    joint = AutoDiagonalNormal(per_row)
    fit(per_row, joint, x, epochs=1, batch_size=300, progress=False, device="cpu")
    # evaluation takes all rows for a joint guide, whose per-row weights are then refused
    with pytest.raises(SetupError, match=r"AutoDiagonalNormal keeps one joint distribution.*"
                                         r"per-row weights.*use AutoNormal"):
        log_likelihood(per_row, joint, x, num_samples=5)
    with pytest.raises(SetupError, match=r"cannot be trained or evaluated on minibatches of "
                                         r"100 of 300 rows"):
        fit(per_row, joint, x, epochs=1, batch_size=100, progress=False, device="cpu")


def test_a_guide_of_the_wrong_shape_or_support_is_named_before_training():
    """A guide whose value at a site has another shape than the model's (a latent size of 3
    for a 2-dim site, plate_dim=-2 forgotten) failed inside the model with a raw
    "mat1 and mat2 shapes cannot be multiplied"; a Normal guide on a Gamma latent stopped
    training with "loss became nan ... lower the learning rate". Iterating over a History
    never ended."""
    torch.manual_seed(0)
    x = torch.randn(40, 3)
    weights = torch.randn(3, 2)

    def linear(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ weights.T, 1.0).to_event(1), obs=x)

    def too_wide(x):
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(torch.zeros(len(x), 3), 1.0).to_event(1))

    with pytest.raises(SetupError, match=r"site 'z': the guide draws values of shape \(40, 3\) "
                                         r"but the model's own draws have shape \(40, 2\)"):
        fit(linear, too_wide, x, epochs=1, progress=False, device="cpu")

    rates = torch.rand(30) * 5

    def gamma(rates):
        with pyro.plate("data", len(rates)):
            r = pyro.sample("r", dist.Gamma(2.0, 1.0))
            pyro.sample("n", dist.Poisson(r), obs=rates.round())

    def normal_guide(rates):
        with pyro.plate("data", len(rates)):
            pyro.sample("r", dist.Normal(torch.zeros(len(rates)), 1.0))

    with pytest.raises(SetupError, match=r"site 'r': the guide draws values outside the "
                                         r"model's support.*of Gamma"):
        fit(gamma, normal_guide, rates, epochs=1, progress=False, device="cpu")

    history = fit(gamma, AutoNormal(gamma), rates, epochs=2, progress=False, device="cpu")
    assert [row["epoch"] for row in history] == [1, 2]
    assert history[-1]["epoch"] == 2 and len(history["train_elbo"]) == 2


def test_pyro_lda_example_whose_guide_subsamples_documents_trains():
    """Pyro's examples/lda.py as written: the guide subsamples its documents plate
    (``pyro.plate("documents", D, batch_size)``) and the model takes those rows by replay.
    The engine compared the plates' subsample sizes (8 against 20) and refused it; it trains
    now (the rows of its data are word positions, so only full batch: a minibatch of them
    fails the model's own shape assert, which is named)."""
    import functools


    topics, words, docs, per_doc = 3, 15, 20, 12

    def model(data=None, batch_size=None):
        with pyro.plate("topics", topics):
            topic_weights = pyro.sample("topic_weights", dist.Gamma(1.0 / topics, 1.0))
            topic_words = pyro.sample("topic_words",
                                      dist.Dirichlet(torch.ones(words) / words))
        with pyro.plate("documents", docs) as ind:
            if data is not None:
                assert data.shape == (per_doc, docs)
                data = data[:, ind]
            doc_topics = pyro.sample("doc_topics", dist.Dirichlet(topic_weights))
            with pyro.plate("words", per_doc):
                word_topics = pyro.sample("word_topics", dist.Categorical(doc_topics),
                                          infer={"enumerate": "parallel"})
                data = pyro.sample("doc_words", dist.Categorical(topic_words[word_topics]),
                                   obs=data)
        return data

    predictor = nn.Sequential(nn.Linear(words, 10), nn.Sigmoid(), nn.Linear(10, topics),
                              nn.Softmax(dim=-1))

    def guide(data, batch_size=None):
        weights = pyro.param("topic_weights_posterior", lambda: torch.ones(topics),
                             constraint=constraints.positive)
        word_weights = pyro.param("topic_words_posterior", lambda: torch.ones(topics, words),
                                  constraint=constraints.greater_than(0.5))
        with pyro.plate("topics", topics):
            pyro.sample("topic_weights", dist.Gamma(weights, 1.0))
            pyro.sample("topic_words", dist.Dirichlet(word_weights))
        pyro.module("predictor", predictor)
        with pyro.plate("documents", docs, batch_size) as ind:
            rows = data[:, ind]
            counts = torch.zeros(words, ind.size(0)).scatter_add(0, rows, torch.ones(rows.shape))
            pyro.sample("doc_topics", dist.Delta(predictor(counts.transpose(0, 1)), event_dim=1))

    pyro.set_rng_seed(0)
    data = model()
    history = fit(model, functools.partial(guide, batch_size=8), data, epochs=80,
                  batch_size=per_doc, lr=0.05, objective="enum", progress=False)
    losses = [row["train_elbo"] for row in history.rows]
    assert sum(losses[-10:]) > sum(losses[:10])  # the ELBO rises
    with pytest.raises(SetupError, match=r"minibatch of 4 of 12 rows \(AssertionError.*first axis"):
        fit(model, guide, data, epochs=1, batch_size=4, objective="enum", progress=False)
