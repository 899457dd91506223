"""Guides beyond mean-field: full-covariance (Algorithm 2) and IAF."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from ppl_vae import elbo, fit, restore
from ppl_vae.guides import build_guide, point_estimate
from ppl_vae.guides.fullcov import AmortizedFullCovNormal, CholeskyGaussian, FullCovEncoder
from ppl_vae.guides.iaf import AmortizedIAF, ContextNormalEncoder
from ppl_vae.models.vae import VAE
from ppl_vae.nn import MLPDecoder


def test_fullcov_log_density_matches_multivariate_normal():
    g = torch.Generator().manual_seed(0)
    loc, log_scale = torch.randn(5, 4, generator=g), 0.5 * torch.randn(5, 4, generator=g)
    tril_raw = torch.randn(5, 4, 4, generator=g)
    q = CholeskyGaussian(loc, log_scale, tril_raw)
    L = q.scale_tril
    # L = L_mask * L' + diag(sigma): strictly-lower part of L', sigma on the diagonal
    assert torch.equal(L.triu(1), torch.zeros_like(L))
    assert torch.allclose(L.diagonal(dim1=-2, dim2=-1), log_scale.exp())
    assert torch.allclose(L.tril(-1), tril_raw.tril(-1))
    mvn = torch.distributions.MultivariateNormal(loc, scale_tril=L)
    z = q.rsample((3,))
    assert z.shape == (3, 5, 4)
    assert torch.allclose(q.log_prob(z), mvn.log_prob(z), atol=1e-4)
    far = 3 * torch.randn(7, 1, 4, generator=g)  # arbitrary points, broadcast over the batch
    assert torch.allclose(q.log_prob(far), mvn.log_prob(far), atol=1e-3)
    # the lecture's formula: log q(z) = sum log N(eps; 0, 1) - sum log sigma (not 1/2 log sigma)
    eps = torch.randn(5, 4, generator=g)
    z = loc + (L @ eps.unsqueeze(-1)).squeeze(-1)
    by_hand = dist.Normal(0.0, 1.0).log_prob(eps).sum(-1) - log_scale.sum(-1)
    assert torch.allclose(q.log_prob(z), by_hand, atol=1e-4)
    assert torch.allclose(q.entropy(), mvn.entropy(), atol=1e-4)
    # under a particle plate the guide's distribution is expanded
    assert q.expand((2, 5)).log_prob(z).shape == (2, 5)


def test_fullcov_samples_have_covariance_LLt():
    torch.manual_seed(0)
    q = CholeskyGaussian(torch.tensor([1.0, -1.0]), torch.tensor([0.0, -0.5]),
                         torch.tensor([[0.0, 0.0], [0.8, 0.0]]))
    z = q.rsample((40000,))
    cov = torch.cov(z.T)
    assert torch.allclose(cov, q.covariance_matrix, atol=0.03)
    assert torch.allclose(z.mean(0), q.loc, atol=0.03)


def test_fullcov_encoder_starts_diagonal_with_a_scaled_off_diagonal_head():
    torch.manual_seed(0)
    x = torch.randn(4, 6)
    enc = FullCovEncoder.mlp(6, [16], 3)
    assert enc.tril_scale == pytest.approx(0.25)  # 1 / sqrt(hidden)
    loc, log_scale, tril = enc(x)
    assert loc.shape == log_scale.shape == (4, 3) and tril.shape == (4, 3, 3)
    assert torch.equal(tril, torch.zeros_like(tril))  # training starts from a diagonal q
    with torch.no_grad():
        enc.tril.bias.fill_(1.0)
    assert torch.allclose(enc(x)[2], torch.full((4, 3, 3), 0.25))
    assert FullCovEncoder.mlp(6, [16], 3, tril_scale=1.0).tril_scale == 1.0


def _iaf(latent_dim: int = 2, flows: int = 2):
    torch.manual_seed(0)
    encoder = ContextNormalEncoder.mlp(3, [8], latent_dim)
    guide = AmortizedIAF(encoder, latent_dim, 8, num_flows=flows)
    with torch.no_grad():  # move the flows away from the identity
        for p in guide.flows.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return guide


def test_iaf_log_density_is_a_normalized_density_and_scores_samples_consistently():
    guide = _iaf()
    x = torch.randn(1, 3)
    q = guide.distribution(x)
    z = q.rsample((6,))
    cached = q.log_prob(z)                 # inverse from the sampling cache
    fresh = guide.distribution(x).log_prob(z)   # inverse computed step by step
    assert torch.allclose(cached, fresh, atol=1e-4)
    # change of variables by hand: base density minus the steps' log-determinants
    u = z
    logdet = torch.zeros(6, 1)
    for t in reversed(guide.distribution(x).transforms):
        prev = t.inv(u)
        logdet = logdet + t.log_abs_det_jacobian(prev, u)
        u = prev
    assert torch.allclose(q.base_dist.log_prob(u) - logdet, cached, atol=1e-4)
    # integrates to one over the plane (a grid wide enough for the flow's mass)
    loc = point_estimate(q).squeeze(0)
    h = 0.1
    grid = torch.stack(torch.meshgrid(torch.arange(-8, 8, h), torch.arange(-8, 8, h),
                                      indexing="ij"), -1).reshape(-1, 1, 2) + loc
    with torch.no_grad():
        mass = float(guide.distribution(x).log_prob(grid).exp().sum() * h * h)
    assert mass == pytest.approx(1.0, abs=0.02)


def _bars(n: int = 256, seed: int = 0) -> torch.Tensor:
    """Binary 8x8 images: one of 4 horizontal bars, with pixel noise."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, 8, 8, generator=g) < 0.05).float()
    rows = torch.randint(0, 4, (n,), generator=g)
    for i, r in enumerate(rows.tolist()):
        x[i, 2 * r: 2 * r + 2] = 1.0
    return x


@pytest.mark.parametrize("kind", ["diagonal", "fullcov", "iaf"])
def test_each_guide_trains_a_vae(kind):
    torch.manual_seed(0)
    x = _bars()
    model = VAE(MLPDecoder(2, [32], (8, 8)), 2)
    guide = build_guide(kind, 64, [32], 2, flatten=2)
    before = elbo(model, guide, x, num_particles=5, progress=False)
    history = fit(model, guide, x, epochs=15, batch_size=64, lr=1e-2, progress=False,
                  device="cpu")
    after = elbo(model, guide, x, num_particles=5, progress=False)
    assert history["train_elbo"][-1] > history["train_elbo"][0] + 5
    assert after > before + 10


@pytest.mark.parametrize("kind", ["fullcov", "iaf"])
def test_richer_guides_train_on_the_conv_trunk(kind):
    """--architecture conv: the full-covariance and IAF heads on the lecture's conv net."""
    from ppl_vae.nn import ConvDecoder

    torch.manual_seed(0)
    x = _bars(128)
    model = VAE(ConvDecoder(2, (8, 8), widths=(16, 8, 8)), 2)
    guide = build_guide(kind, 64, [32], 2, architecture="conv")
    assert guide.encoder.body.out_features == 2048
    before = elbo(model, guide, x, num_particles=5, progress=False)
    fit(model, guide, x, epochs=20, batch_size=32, lr=3e-3, progress=False, device="cpu")
    # +4.9 nats at the one-factor plateau most seeds reach in 20 epochs, +11 past it
    assert elbo(model, guide, x, num_particles=5, progress=False) > before + 4


@pytest.mark.parametrize("kind", ["fullcov", "iaf"])
def test_richer_guides_work_with_iwae_and_evaluation(kind):
    x = _bars(64)
    model = VAE(MLPDecoder(2, [16], (8, 8)), 2)
    guide = build_guide(kind, 64, [16], 2, flatten=2)
    history = fit(model, guide, x, epochs=2, batch_size=32, objective="iwae",
                  num_particles=4, progress=False, device="cpu")
    assert all(math.isfinite(v) for v in history["train_elbo"])


# A linear-Gaussian model with a strongly correlated exact posterior:
#   z ~ N(0, I_2),  x | z ~ N(W z, s^2 I_2)  =>  p(x) = N(0, W W^T + s^2 I),
#   posterior precision I + W^T W / s^2 (correlation about -0.87 here).
W = torch.tensor([[1.0, 0.9], [0.9, 1.0]])
NOISE = 0.5


def linear_gaussian(x, size=None, subsample=None):
    with pyro.plate("data", size or len(x), subsample=subsample):
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z @ W.T, NOISE).to_event(1), obs=x)


def test_fullcov_guide_closes_the_elbo_gap_of_a_correlated_posterior():
    torch.manual_seed(0)
    cov = W @ W.T + NOISE ** 2 * torch.eye(2)
    x = torch.distributions.MultivariateNormal(torch.zeros(2), cov).sample((256,))
    exact = float(torch.distributions.MultivariateNormal(torch.zeros(2), cov).log_prob(x).mean())
    gaps = {}
    for kind, encoder in (
            ("diagonal", None),
            ("fullcov", FullCovEncoder(nn.Identity(), 2, 2))):
        torch.manual_seed(1)
        if kind == "diagonal":
            guide = build_guide("diagonal", 2, [16], 2)
        else:
            guide = AmortizedFullCovNormal(encoder)  # linear in x, as the exact posterior
        fit(linear_gaussian, guide, x, epochs=60, batch_size=128, lr=2e-2, progress=False,
            device="cpu")
        value = elbo(linear_gaussian, guide, x, num_particles=200, progress=False)
        assert value < exact + 0.02  # a lower bound
        gaps[kind] = exact - value
    # the best diagonal q has KL = 0.72 nats here; the full-covariance q can reach 0
    assert gaps["diagonal"] > 0.5
    assert gaps["fullcov"] < 0.15
    assert gaps["fullcov"] < gaps["diagonal"] - 0.4


def test_build_guide_rejects_unknown_kind():
    with pytest.raises(ValueError, match="unknown guide 'flow'"):
        build_guide("flow", 4, [8], 2)
    with pytest.raises(ValueError, match="unknown architecture 'resnet'"):
        build_guide("iaf", 4, [8], 2, architecture="resnet")


def test_iaf_guide_is_restored_from_a_checkpoint(tmp_path):
    x = _bars(32)
    torch.manual_seed(0)
    model = VAE(MLPDecoder(2, [8], (8, 8)), 2)
    guide = build_guide("iaf", 64, [8], 2, flatten=2)
    fit(model, guide, x, epochs=1, batch_size=16, progress=False, device="cpu", out=tmp_path)
    torch.manual_seed(1)  # other random MADE orders and weights until restored
    model2 = VAE(MLPDecoder(2, [8], (8, 8)), 2)
    guide2 = build_guide("iaf", 64, [8], 2, flatten=2)
    restore(model2, guide2, tmp_path / "checkpoint.pt", x[:2])
    z = torch.randn(5, 2)
    with torch.no_grad():
        assert torch.allclose(guide.distribution(x[:1]).log_prob(z),
                              guide2.distribution(x[:1]).log_prob(z), atol=1e-5)


@pytest.mark.parametrize("kind, architecture", [("fullcov", "mlp"), ("iaf", "mlp"),
                                                ("fullcov", "conv")])
def test_vae_cli_trains_with_a_richer_guide(kind, architecture, fashion_dir, tmp_path, capsys):
    from ppl_vae.cli.main import main

    run = tmp_path / kind
    main(["train", "vae", "--guide", kind, "--architecture", architecture,
          "--latent-dim", "2", "--hidden", "16",
          "--epochs", "2", "--limit", "100", "--val-size", "20", "--batch-size", "50",
          "--data", str(fashion_dir), "--out", str(run), "--no-progress", "--device", "cpu"])
    assert (run / "reconstructions.png").stat().st_size > 0
    capsys.readouterr()
    main(["evaluate", str(run), "--iwae-samples", "20", "--device", "cpu", "--limit", "50"])
    lines = dict(line.split(": ") for line in capsys.readouterr().out.strip().splitlines())
    assert float(lines["log_likelihood"]) >= float(lines["elbo"]) - 1.0


# ---- the amortized guides on models laid out differently ------------------------------------

def _linear_gaussian(n=200, latent=2, observed=4, noise=0.5, seed=3):
    """x = W h + noise with W fixed: the exact log p(x) per row is a Gaussian's."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.randn(observed, latent, generator=g)
    h = torch.randn(n, latent, generator=g)
    x = h @ weights.T + noise * torch.randn(n, observed, generator=g)
    cov = weights @ weights.T + noise ** 2 * torch.eye(observed)
    exact = torch.distributions.MultivariateNormal(torch.zeros(observed), cov).log_prob(x)
    return x, weights, noise, float(exact.mean())


def test_amortized_guide_serves_a_data_plate_at_dim_minus_two():
    """A model whose rows are at dim -2 (a feature plate at -1): AmortizedNormal with
    plate_dim=-2 gives q the batch shape (B, 1); it gave (B, B) before, which trained on
    without an error to log p(x) = -155 against the exact -5.6. Now the estimate is exact
    within Monte Carlo and optimization error (0.02 nats); the engine refuses a guide whose
    shape disagrees with the model's, and the full-covariance guide says it needs dim -1."""
    from ppl_vae import SetupError, log_likelihood
    from ppl_vae.guides.amortized import AmortizedNormal
    from ppl_vae.nn import NormalEncoder

    x, weights, noise, exact = _linear_gaussian()

    def model(obs):
        with pyro.plate("rows", len(obs), dim=-2):
            h = pyro.sample("h", dist.Normal(obs.new_zeros(1, 2), 1.0).to_event(1))
            with pyro.plate("features", obs.shape[1], dim=-1):
                pyro.sample("y", dist.Normal((h @ weights.T).squeeze(-2), noise), obs=obs)

    guide = AmortizedNormal(NormalEncoder(nn.Identity(), 4, 2), site="h", plate="rows",
                            plate_dim=-2, inputs="obs")
    fit(model, guide, {"obs": x}, epochs=1500, lr=1e-2, lr_schedule="cosine", seed=0,
        progress=False, device="cpu")
    assert log_likelihood(model, guide, {"obs": x}, num_samples=500) == pytest.approx(
        exact, abs=0.02)

    class RowsAtMinusOne(AmortizedNormal):  # what the guide did before
        def at_plate_dim(self, t, event_dims):
            return t

    wrong = RowsAtMinusOne(NormalEncoder(nn.Identity(), 4, 2), site="h", plate="rows",
                           plate_dim=-2, inputs="obs")
    with pytest.raises(SetupError, match=r"site 'h': the guide's distribution has shape "
                                         r"\((\d+), \1, 2\) but the model's has \(\1, 1, 2\)"):
        fit(model, wrong, {"obs": x}, epochs=1, progress=False, device="cpu")
    with pytest.raises(ValueError, match="needs the data plate at dim -1"):
        AmortizedFullCovNormal(FullCovEncoder(nn.Identity(), 4, 2), site="h", plate="rows",
                               plate_dim=-2)


def test_mean_field_with_amortized_serves_a_plain_pyro_model():
    """mean_field_with_amortized passed size= and subsample= on to a model(x) that does not
    take them (a SetupError blaming the engine). Now it passes them only to a model that
    names them. The global offset b ~ N(0, 0.05^2) of x = W z + b + noise, on minibatches
    of 50 of 200 rows, is then learned as the full-batch run learns it (exact posterior mean
    of b given x, in closed form: within 0.01)."""
    from ppl_vae.guides.amortized import AmortizedNormal
    from ppl_vae.guides.meanfield import mean_field_with_amortized
    from ppl_vae.nn import NormalEncoder

    x, weights, noise, _ = _linear_gaussian()
    offset = torch.tensor([0.3, -0.2, 0.1, 0.0])
    x = x + offset

    def model(x):
        b = pyro.sample("b", dist.Normal(torch.zeros(4), 0.05).to_event(1))
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ weights.T + b, noise).to_event(1), obs=x)

    # exact: x_i - b ~ N(0, C) given b, C = W W^T + s^2 I, so b | x is Gaussian
    cov = weights @ weights.T + noise ** 2 * torch.eye(4)
    precision = torch.eye(4) / 0.05 ** 2 + len(x) * torch.linalg.inv(cov)
    exact = torch.linalg.solve(precision, torch.linalg.inv(cov) @ x.sum(0))
    guide = mean_field_with_amortized(
        model, AmortizedNormal(NormalEncoder(nn.Identity(), 4, 2), site="z"))
    fit(model, guide, x, epochs=400, batch_size=50, lr=1e-2, lr_schedule="cosine", seed=0,
        progress=False, device="cpu")
    loc = guide.globals.median()["b"].detach()
    assert (loc - exact).abs().max() < 0.01, (loc, exact)
