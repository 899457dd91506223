"""The engine/program contract (ppl_vae/program.py): how plain Pyro programs are called,
scaled to the dataset and refused, and PSIS k-hat verdicts on a model with a known
posterior."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoDelta, AutoNormal

from ppl_vae import SetupError, fit
from ppl_vae.batching import make_batches
from ppl_vae.diagnostics import importance_diagnostics
from ppl_vae.evaluation import as_pair
from ppl_vae.objectives import make_objective
from ppl_vae.program import call_keywords


def plain_model(x):
    """Pyro's usual way: no size/subsample, the plate at the data's length."""
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    with pyro.plate("data", len(x)):
        pyro.sample("obs", dist.Normal(mu, 1.0), obs=x)


def ignoring_model(x, size=None, subsample=None):
    """Takes the engine's keywords but opens its plate at the batch's length."""
    plain_model(x)


def test_call_keywords_follow_the_signature():
    assert call_keywords(plain_model) == frozenset()
    assert call_keywords(ignoring_model) == {"size", "subsample"}
    guide = AutoNormal(plain_model)
    pair = as_pair(plain_model, guide)
    assert pair.guide.keywords == frozenset()  # an autoguide follows its model
    pair = as_pair(ignoring_model, AutoNormal(ignoring_model))
    assert pair.guide.keywords == {"size", "subsample"}


@pytest.mark.parametrize("model", [plain_model, ignoring_model])
def test_minibatch_losses_of_an_unsubsampled_plate_add_up_to_the_full_data_loss(model):
    """With a point-mass guide nothing is random: the N/B-scaled minibatch losses of one
    epoch average exactly to the full-data loss, so the data plate was scaled by N/B."""
    x = torch.randn(60) + 1.0
    guide = AutoDelta(model)
    guide(x)  # set the guide up; the point mu is then fixed
    full = Trace_ELBO().differentiable_loss(model, guide, x)
    objective = make_objective("trace")
    pair = as_pair(model, guide)
    batches = make_batches(x, 20, "cpu", shuffle=True)
    pair.inspect(next(iter(batches)))
    losses = [objective(pair.model, pair.guide, batch) for batch in batches]
    assert len(losses) == 3
    assert float(torch.stack(losses).mean()) == pytest.approx(float(full), rel=1e-6)
    # a minibatch alone is scaled by 60/20: far from the unscaled batch loss
    unscaled = Trace_ELBO().differentiable_loss(model, guide, x[:20])
    assert abs(float(losses[0]) - float(unscaled)) > 10


def test_posterior_of_a_global_mean_is_right_on_minibatches():
    """Normal mean with known noise: conjugate, exact posterior sd 1/sqrt(1/100 + N)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, generator=g) + 2.0
    guide = AutoNormal(plain_model, init_scale=0.05)
    fit(plain_model, guide, x, epochs=150, batch_size=50, lr=0.02, progress=False)
    precision = 1 / 100 + len(x)
    mean, sd = float(x.sum()) / precision, precision ** -0.5
    loc, scale = guide._get_loc_and_scale("mu")
    assert float(loc) == pytest.approx(mean, abs=0.3 * sd)
    assert float(scale) == pytest.approx(sd, rel=0.25)  # unscaled: sqrt(8) = 2.8x too wide


def test_observations_outside_any_plate_are_refused_on_minibatches():
    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        pyro.sample("obs", dist.Normal(mu, 1.0).expand([len(x)]).to_event(1), obs=x)

    x = torch.randn(40)
    with pytest.raises(SetupError, match=r"'obs'.*not inside a plate.*pyro.plate"):
        fit(model, AutoNormal(model), x, epochs=1, batch_size=10, progress=False)
    fit(model, AutoNormal(model), x, epochs=2, batch_size=40, progress=False)  # full batch


def test_per_row_parameters_of_a_guide_that_does_not_know_its_rows_are_refused():
    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("obs", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        loc = pyro.param("loc", torch.zeros(len(x)))
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(loc, 0.5))

    with pytest.raises(SetupError, match=r"'loc'.*one entry per row.*subsample"):
        fit(model, guide, torch.randn(40), epochs=1, batch_size=10, progress=False)

    def sliced_guide(x):  # one entry per row of the data, the first len(x) used: wrong rows
        loc = pyro.param("loc", torch.zeros(40))
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(loc[:len(x)], 0.5))

    with pytest.raises(SetupError, match=r"'loc'.*one entry per row.*data, 40.*subsample"):
        fit(model, sliced_guide, torch.randn(40), epochs=1, batch_size=10, progress=False)
    fit(model, sliced_guide, torch.randn(40), epochs=1, batch_size=40, progress=False)


def test_guide_plate_of_another_size_is_refused():
    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("obs", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", 3):
            pyro.sample("z", dist.Normal(0.0, 1.0))

    with pytest.raises(SetupError, match=r"site 'z'.*'data' \(size 3\).*'data' \(size 8\)"):
        fit(model, guide, torch.randn(8), epochs=1, batch_size=8, progress=False)


class ExactPPCAGuide:
    """q(z | x) of a fixed pPCA x = W z + e, e ~ N(0, s^2 I): the exact posterior
    N(M^-1 W^T x, s^2 M^-1), M = W^T W + s^2 I, or with ``diagonal=True`` its mean-field
    fit N(mean, diag(1 / precision diagonal)) (too narrow)."""

    def __init__(self, weight: torch.Tensor, noise: float, diagonal: bool = False):
        k = weight.shape[1]
        m = weight.T @ weight + noise**2 * torch.eye(k)
        self.proj = torch.linalg.solve(m, weight.T)
        precision = m / noise**2
        self.cov = torch.linalg.inv(precision)
        if diagonal:
            self.cov = torch.diag(1 / precision.diagonal())

    def __call__(self, x):
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.MultivariateNormal(x @ self.proj.T, self.cov))


def ppca_model(weight: torch.Tensor, noise: float):
    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(torch.zeros(weight.shape[1]), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ weight.T, noise).to_event(1), obs=x)
    return model


def test_khat_verdicts_on_ppca_exact_and_mean_field_guides():
    """The exact posterior gives constant ratios (k = 0 for every point); its mean-field
    fit, too narrow along the correlated direction, gets k-hat >= 0.7 on most points. The
    result says how many draws it used and how much k-hat moves between their halves."""
    g = torch.Generator().manual_seed(0)
    weight = torch.tensor([[1.0, 0.9], [1.0, 1.1], [0.5, 0.4]]) * 2
    model = ppca_model(weight, 0.3)
    x = (torch.randn(30, 2, generator=g) @ weight.T + 0.3 * torch.randn(30, 3, generator=g))
    exact = importance_diagnostics(model, ExactPPCAGuide(weight, 0.3), x, num_samples=1000,
                                   seed=0)
    assert exact.local.max() < 0.5 and exact.share_bad == 0.0
    narrow = importance_diagnostics(model, ExactPPCAGuide(weight, 0.3, diagonal=True), x,
                                    num_samples=1000, seed=0)
    assert narrow.share_bad > 0.5 and float(torch.tensor(narrow.local).median()) > 0.7
    report = narrow.as_dict()
    assert report["pareto_k_draws"] == 1000 and 0 <= report["pareto_k_halves_gap"] < 0.3
    assert "from 1000 draws (halves of 500 differ by" in report["pareto_k_verdict"]


def test_import_leaves_pyro_settings_alone():
    import subprocess
    import sys

    code = ("import pyro; before = pyro.settings.get('module_local_params'); import ppl_vae; "
            "print(before == pyro.settings.get('module_local_params'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "True"


def test_per_row_autoguide_on_streamed_data_is_refused():
    from torch.utils.data import DataLoader, TensorDataset

    def model(x):
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("obs", dist.Normal(z, 1.0), obs=x)

    loader = DataLoader(TensorDataset(torch.randn(40)), batch_size=10)
    with pytest.raises(SetupError, match=r"one parameter per row.*\['z'\].*tensors"):
        fit(model, AutoNormal(model), loader, epochs=1, progress=False)


def test_data_outside_the_likelihoods_support_is_refused_before_training():
    def model(x):
        p = pyro.param("p", torch.tensor(0.5), constraint=dist.constraints.unit_interval)
        with pyro.plate("data", len(x)):
            pyro.sample("obs", dist.Bernoulli(p).expand([len(x), 4]).to_event(1), obs=x)

    def guide(x):
        pass

    pixels = torch.randint(0, 256, (20, 4)).float()  # 0-255 grey levels, not {0, 1}
    with pytest.raises(SetupError, match=r"'obs'.*outside the support of.*Bernoulli"):
        fit(model, guide, pixels, epochs=1, progress=False)
    fit(model, guide, (pixels > 127).float(), epochs=1, progress=False)


def test_a_runaway_loss_stops_training_like_a_nan(tmp_path):
    """lr 1e6: the loss leaves any plausible range long before it overflows."""
    from ppl_vae import TrainingDiverged

    def model(x):
        loc = pyro.param("loc", torch.tensor(0.0))
        with pyro.plate("data", len(x)):
            pyro.sample("obs", dist.Normal(loc, 1.0), obs=x)

    def guide(x):
        pass

    with pytest.raises(TrainingDiverged, match=r"times the .* of the first step.*epoch 1"):
        fit(model, guide, torch.randn(100), epochs=3, batch_size=10, lr=1e6, sync_every=1,
            out=tmp_path, progress=False)


def test_renyi_bound_lies_between_the_elbo_and_the_iwae_bound():
    """For one fixed pPCA and a too-narrow guide, per example: ELBO <= Renyi(0.5) <= IWAE
    (Li & Turner 2016), each estimated with 400 particles."""
    from ppl_vae.batching import make_batches

    g = torch.Generator().manual_seed(0)
    weight = torch.tensor([[1.0, 0.9], [1.0, 1.1], [0.5, 0.4]]) * 2
    model = ppca_model(weight, 0.3)
    x = torch.randn(40, 2, generator=g) @ weight.T + 0.3 * torch.randn(40, 3, generator=g)
    guide = ExactPPCAGuide(weight, 0.3, diagonal=True)
    batch = next(iter(make_batches(x, 40, "cpu", shuffle=False)))
    pair = as_pair(model, guide)
    pair.inspect(batch)
    values = {}
    for name in ("iwae", "renyi"):
        objective = make_objective(name, num_particles=400, renyi_alpha=0.5)
        values[name] = -float(objective(pair.model, pair.guide, batch)) / 40
    values["trace"] = -float(make_objective("trace", num_particles=400)(
        pair.model, pair.guide, batch)) / 40
    assert values["trace"] + 0.05 < values["renyi"] < values["iwae"] - 0.01, values


def test_a_model_that_subsamples_its_own_plate_is_scaled_to_the_dataset():
    """Pyro's idiom `with pyro.plate("data", len(x), subsample_size=16) as idx: obs=x[idx]`
    on engine minibatches of 50 of 400 rows: two subsamplings, one scale N/16."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(400, generator=g) + 2.0

    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        with pyro.plate("data", len(x), subsample_size=16) as idx:
            pyro.sample("obs", dist.Normal(mu, 1.0), obs=x[idx])

    guide = AutoDelta(model)
    guide(x)
    full = Trace_ELBO().differentiable_loss(model, guide, x)  # N/16 scaling, one subsample
    pair = as_pair(model, guide)
    batches = make_batches(x, 50, "cpu", shuffle=True)
    pair.inspect(next(iter(batches)))
    pyro.set_rng_seed(0)
    losses = torch.stack([make_objective("trace")(pair.model, pair.guide, batch)
                          for _ in range(40) for batch in batches])
    # both are unbiased for the same full-data loss (noise: subsampling 16 rows)
    assert float(losses.mean()) == pytest.approx(float(full), rel=0.05)
    guide = AutoNormal(model, init_scale=0.05)
    fit(model, guide, x, epochs=150, batch_size=50, lr=0.02, progress=False)
    loc, scale = guide._get_loc_and_scale("mu")
    assert float(scale) == pytest.approx((1 / 100 + 400) ** -0.5, rel=0.3)
