"""Programs and data an outside user hands the engine, beyond Pyro's tutorials: a DataLoader
or TensorDataset, prediction data that observes nothing, guides that draw per-row latents
jointly without being AutoContinuous (AutoStructured, an easyguide group), poutine.reparam on
a global latent, an ImproperUniform latent, observations split over two plates of the rows,
and data held outside the engine in pyro.condition. Each either gives the exact answer or is
refused (or warned about) with the fix, before any number comes out wrong."""

from __future__ import annotations

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.contrib.easyguide import easy_guide
from pyro.infer.autoguide import (
    AutoDelta,
    AutoDiscreteParallel,
    AutoMultivariateNormal,
    AutoNormal,
    AutoStructured,
)
from pyro.infer.reparam import LocScaleReparam, TransformReparam
from torch import nn
from torch.distributions import constraints
from torch.utils.data import DataLoader, TensorDataset

import ppl_vae
from ppl_vae import SetupError, elbo, fit, log_likelihood

PRIOR_SD = 3.0


def normal_mean(x):
    """mu ~ N(0, 3^2), x_i ~ N(mu, 1): a global latent only."""
    mu = pyro.sample("mu", dist.Normal(0.0, PRIOR_SD))
    with pyro.plate("data", len(x)):
        pyro.sample("obs", dist.Normal(mu, 1.0), obs=x)


def predictive_density(x):
    """Exact log p(x_i | all x) per row for :func:`normal_mean` (nats)."""
    precision = 1 / PRIOR_SD ** 2 + len(x)
    mean, var = float(x.sum()) / precision, 1 + 1 / precision
    return (-0.5 * (x - mean) ** 2 / var - 0.5 * math.log(2 * math.pi * var)).mean()


def hierarchical(x):
    """mu ~ N(0, 3^2), z_i ~ N(mu, 1), x_i ~ N(z_i, 0.7^2): per-row latents."""
    mu = pyro.sample("mu", dist.Normal(0.0, PRIOR_SD))
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Normal(mu, 1.0))
        pyro.sample("obs", dist.Normal(z, 0.7), obs=x)


def data(n=200, seed=0):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) + 1.0


# ---- data forms --------------------------------------------------------------------------

def test_dataloader_scores_like_a_tensor():
    """elbo, log_likelihood and fit(val_data=) take a DataLoader, as fit does (they crashed
    reading its batch size), and give the tensor's figures."""
    x = data()
    guide = AutoNormal(normal_mean)
    loader = DataLoader(TensorDataset(x), batch_size=50)
    history = fit(normal_mean, guide, loader, val_data=loader, epochs=40, lr=0.1, seed=0,
                  progress=False)
    assert math.isfinite(history[-1]["val_elbo"])
    exact = float(predictive_density(x))
    assert log_likelihood(normal_mean, guide, loader, 200) == pytest.approx(exact, abs=0.02)
    assert elbo(normal_mean, guide, loader, 200) == pytest.approx(
        elbo(normal_mean, guide, x, 200), abs=0.02)


def test_tensordataset_lists_and_empty_data():
    x = data(60)
    torch.manual_seed(0)
    a = fit(normal_mean, AutoNormal(normal_mean), TensorDataset(x), epochs=3, batch_size=20,
            seed=1, progress=False)
    b = fit(normal_mean, AutoNormal(normal_mean), (x,), epochs=3, batch_size=20, seed=1,
            progress=False)
    assert a[-1]["train_elbo"] == b[-1]["train_elbo"]  # a TensorDataset is its tensors
    with pytest.raises(ValueError, match="Python list of numbers.*torch.tensor"):
        fit(normal_mean, AutoNormal(normal_mean), x.tolist(), epochs=1, progress=False)
    with pytest.raises(ValueError, match="empty tuple"):
        fit(normal_mean, AutoNormal(normal_mean), (), epochs=1, progress=False)
    leaf = x.clone().requires_grad_(True)
    fit(normal_mean, AutoNormal(normal_mean), leaf, epochs=1, batch_size=20, progress=False)
    assert leaf.grad is None  # the data is not a parameter: no gradient written into it


def test_prediction_data_observing_nothing_is_named():
    def regression(x, y=None):
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("y", dist.Normal(w * x, 0.5), obs=y)

    x = data()
    guide = AutoNormal(regression)
    fit(regression, guide, (x, 2 * x), epochs=2, batch_size=200, progress=False)
    for batch_size in (50, 500):  # the message was about plates, minibatch or not
        with pytest.raises(SetupError, match="observes nothing.*needs y in the data"):
            elbo(regression, guide, (x,), 5, batch_size=batch_size)


def test_new_rows_under_per_row_autoguide_parameters_are_named():
    x = data(50)
    guide = AutoNormal(hierarchical)
    fit(hierarchical, guide, x, epochs=2, batch_size=50, progress=False)
    with pytest.raises(SetupError, match="one parameter per training row for 'z' \\(50 rows\\)"
                                         ".*this data has 30.*amortized"):
        log_likelihood(hierarchical, guide, data(30, seed=1), 10)


def test_vae_takes_uint8_and_float64_images():
    from ppl_vae.models.vae import build_vae

    images = (torch.rand(32, 8, 8, generator=torch.Generator().manual_seed(0)) < 0.5)
    for x in (images.to(torch.uint8), images.double()):  # torch errors before
        vae, guide = build_vae(latent_dim=2, hidden=(16,), image_shape=(8, 8))
        fit(vae, guide, x, epochs=1, batch_size=16, progress=False)
        assert math.isfinite(elbo(vae, guide, x))


def test_warnings_point_at_the_users_line():
    def unguided(x):  # "mu" is missing from the guide: the engine warns
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        s = pyro.sample("s", dist.LogNormal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("obs", dist.Normal(mu, s), obs=x)

    def guide(x):
        loc = pyro.param("s_loc", torch.tensor(0.0))
        pyro.sample("s", dist.LogNormal(loc, 1.0))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        elbo(unguided, guide, data(20), 2)
    assert [w.filename for w in caught if "not in the guide" in str(w.message)] == [__file__]


# ---- guides and models -------------------------------------------------------------------

def test_joint_guides_over_rows_are_refused_for_per_row_figures():
    """AutoStructured and an easyguide group draw every z_i from one draw outside the rows:
    per-row weights left that log q out (-2.45 and -3.01 against an exact -1.74)."""
    x = data(80)

    @easy_guide(hierarchical)
    def grouped(self, x):
        group = self.group(match="mu|z")
        loc = pyro.param("loc", torch.zeros(group.event_shape))
        scale = pyro.param("scale", 0.1 * torch.ones(group.event_shape),
                           constraint=constraints.positive)
        group.sample("joint", dist.Normal(loc, scale).to_event(1))

    structured = AutoStructured(hierarchical, conditionals={"mu": "normal", "z": "normal"},
                                dependencies={"z": {"mu": "linear"}})
    for guide in (grouped, structured):
        with pytest.raises(SetupError, match="joint distribution.*per-row latent\\(s\\) z"):
            log_likelihood(hierarchical, guide, x, 10, batch_size=80)
    with pytest.raises(SetupError, match="AutoStructured.*cannot be trained or evaluated on "
                                         "minibatches of 20 of 80"):  # was KeyError: 'type'
        fit(hierarchical, AutoStructured(hierarchical), x, epochs=1, batch_size=20,
            progress=False)


def test_autostructured_over_globals_is_exact():
    x = data()
    guide = AutoStructured(normal_mean, conditionals={"mu": "normal"})
    fit(normal_mean, guide, x, epochs=300, batch_size=200, lr=0.05, seed=0, progress=False)
    assert log_likelihood(normal_mean, guide, x, 500) == pytest.approx(
        float(predictive_density(x)), abs=0.01)


def test_to_arviz_draws_a_joint_guide_over_all_rows_at_once():
    """Its default batching cut 250 rows into passes and refused them as minibatches."""
    x = data(250)
    guide = AutoMultivariateNormal(hierarchical)
    fit(hierarchical, guide, x, epochs=2, batch_size=250, progress=False)
    idata = ppl_vae.to_arviz(hierarchical, guide, x, log_likelihood=False)
    assert idata.posterior["z"].shape[-1] == 250


@pytest.mark.parametrize("reparam", ["locscale", "transform"])
def test_reparameterized_global_latent_is_not_an_observation(reparam):
    """poutine.reparam turns a latent into an observed Delta(...).mask(False): it was taken
    for an observation outside the data plate (refused on minibatches and in evaluation)."""
    def model(x):
        if reparam == "locscale":
            mu = pyro.sample("mu", dist.Normal(0.0, PRIOR_SD))
        else:
            mu = pyro.sample("mu", dist.TransformedDistribution(
                dist.Normal(0.0, PRIOR_SD), [dist.transforms.AffineTransform(0.0, 1.0)]))
        with pyro.plate("data", len(x)):
            pyro.sample("obs", dist.Normal(mu, 1.0), obs=x)

    config = {"mu": LocScaleReparam(centered=0.5) if reparam == "locscale"
              else TransformReparam()}
    reparameterized = pyro.poutine.reparam(model, config=config)
    x = data()
    guide = AutoNormal(reparameterized)
    fit(reparameterized, guide, x, epochs=60, batch_size=50, lr=0.05, seed=0, progress=False)
    assert log_likelihood(reparameterized, guide, x, 500) == pytest.approx(
        float(predictive_density(x)), abs=0.01)


def test_improper_uniform_latent_under_autodelta():
    """The engine's look at the model alone drew from ImproperUniform (NotImplementedError);
    it now takes the guide's value, and the MAP is the maximum-likelihood mean."""
    def model(x):
        mu = pyro.sample("mu", dist.ImproperUniform(constraints.real, (), ()))
        with pyro.plate("data", len(x)):
            pyro.sample("obs", dist.Normal(mu, 1.0), obs=x)

    x = data()
    guide = AutoDelta(model, init_loc_fn=pyro.infer.autoguide.init_to_value(
        values={"mu": torch.tensor(0.0)}))
    fit(model, guide, x, epochs=300, batch_size=200, lr=0.05, seed=0, progress=False)
    assert float(guide.median()["mu"]) == pytest.approx(float(x.mean()), abs=1e-3)


def test_observations_split_over_two_plates_of_the_rows():
    def model(x, y):
        mu = pyro.sample("mu", dist.Normal(0.0, PRIOR_SD))
        with pyro.plate("data", len(x)):
            pyro.sample("obs1", dist.Normal(mu, 1.0), obs=x)
        with pyro.plate("data2", len(y)):
            pyro.sample("obs2", dist.Normal(mu, 1.0), obs=y)

    x, y = data(), data(seed=1)
    guide = AutoNormal(model)
    fit(model, guide, (x, y), epochs=2, batch_size=200, progress=False)
    with pytest.raises(SetupError, match="different plates.*'obs1' in plate 'data'; 'obs2' "
                                         "in plate 'data2'"):
        log_likelihood(model, guide, (x, y), 10, batch_size=200)
    with pytest.warns(UserWarning, match="'obs2' lie in plate 'data2'.*left out of per-row"):
        log_likelihood(model, guide, (x, y), 10, batch_size=200, plate="data")


def test_data_held_in_pyro_condition_is_named_on_minibatches():
    def model(n):
        p = pyro.sample("p", dist.Beta(2.0, 3.0))
        with pyro.plate("data", len(n)):
            pyro.sample("obs", dist.Binomial(total_count=n, probs=p))

    n = torch.full((200,), 10.0)
    conditioned = pyro.condition(model, data={"obs": dist.Binomial(n, 0.3).sample()})
    with pytest.raises(SetupError, match="value of shape \\(200,\\).*shape \\(50,\\).*not cut "
                                         "into minibatches"):
        fit(conditioned, AutoNormal(conditioned), n, epochs=1, batch_size=50, progress=False)


def test_log_likelihood_integrates_out_unread_missing_entries_exactly():
    """obs_mask's x_unobserved is a leaf here (no other site reads it): log_likelihood leaves
    its p and q out of the weight (it only added noise: probe D's mixture was 2.7 nats off)
    and gives log p(x_observed) under q(mu) exactly."""
    def model(x, observed):
        mu = pyro.sample("mu", dist.Normal(0.0, PRIOR_SD))
        with pyro.plate("data", len(x), dim=-2), pyro.plate("entries", 2, dim=-1):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x, obs_mask=observed)

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(60, 2, generator=generator) + 1.0
    observed = torch.ones(60, 2, dtype=torch.bool)
    observed[::2, 1] = False  # every other row misses its second entry
    x = torch.where(observed, x, torch.zeros(()))
    guide = AutoNormal(model)
    fit(model, guide, (x, observed), epochs=10, batch_size=60, lr=0.05, seed=0,
        progress=False)  # a q(x_unobserved) far from p(x_unobserved | mu): a noisy weight
    loc, scale = float(pyro.param("AutoNormal.locs.mu")), float(pyro.param("AutoNormal.scales.mu"))
    var = 1.0 + scale ** 2  # one observed entry: x ~ N(loc, 1 + scale^2) under q(mu)
    exact = -0.5 * (x[::2, 0] - loc) ** 2 / var - 0.5 * math.log(2 * math.pi * var)
    got = log_likelihood(model, guide, (x, observed), 2000, per_example=True)[::2]
    assert float((got - exact).abs().max()) < 0.02  # Monte Carlo error of the mu draws


def test_enumerated_run_restores_and_overwrite_keeps_a_run_on_bad_input(tmp_path):
    """restore() rebuilt the trainer with objective 'trace', which refuses a config_enumerate
    model; --overwrite deleted the old run before refusing the new start's bad input."""
    from pyro.infer import config_enumerate

    enumerated = config_enumerate(mixture)

    def empty_guide(x):
        pass

    x = torch.cat([data(100) - 4.0, data(100, seed=1) + 4.0])
    out = tmp_path / "run"
    history = fit(enumerated, empty_guide, x, epochs=3, batch_size=200, objective="enum",
                  out=out, progress=False)
    state = ppl_vae.load_checkpoint(out / "checkpoint.pt")
    ppl_vae.restore(enumerated, empty_guide, state, x[:8])  # refused as 'trace' before
    assert elbo(enumerated, empty_guide, x) == pytest.approx(history[-1]["train_elbo"], abs=0.05)

    spec = {"file": str(tmp_path / "m.py"), "data": str(tmp_path / "d.pt")}
    (tmp_path / "m.py").write_text(
        "import pyro, pyro.distributions as dist\n"
        "def model(x, y):\n    mu = pyro.sample('mu', dist.Normal(0.0, 1.0))\n"
        "    with pyro.plate('data', len(x)):\n"
        "        pyro.sample('obs', dist.Normal(mu * x, 1.0), obs=y)\n")
    torch.save({"x": data(), "y": data(seed=2)}, tmp_path / "d.pt")
    ppl_vae.train("program", tmp_path / "prog", spec, epochs=3, progress=False)
    before = sorted(p.name for p in (tmp_path / "prog").iterdir())
    torch.save({"x": data()}, tmp_path / "d.pt")  # y is missing now: refused at set-up
    with pytest.raises(SetupError, match="missing 1 required positional argument: 'y'"):
        ppl_vae.train("program", tmp_path / "prog", spec, epochs=3, overwrite=True,
                      progress=False)
    assert sorted(p.name for p in (tmp_path / "prog").iterdir()) == before


def test_checkpoint_every_writes_less_and_resumes(tmp_path, monkeypatch):
    import ppl_vae.training as training

    written = []
    save = training.save_checkpoint
    monkeypatch.setattr(training, "save_checkpoint",
                        lambda state, path: (written.append(path.name), save(state, path)))
    x = data()
    out = tmp_path / "run"
    fit(normal_mean, AutoNormal(normal_mean), x, epochs=25, batch_size=200, out=out,
        checkpoint_every=10, progress=False)
    assert written.count("checkpoint.pt") == 3  # epochs 10, 20 and the last, 25
    assert written.count("best.pt") <= 3
    state = ppl_vae.load_checkpoint(out / "checkpoint.pt")
    assert state["epoch"] == 25 and len(state["history"]) == 25  # the last epoch is written
    history = fit(normal_mean, AutoNormal(normal_mean), x, epochs=30, batch_size=200, out=out,
                  checkpoint_every=10, resume=True, progress=False)
    assert len(history.rows) == 30


def test_hand_written_per_row_guide_restores_from_a_slice(tmp_path):
    """Its pyro.params have one entry per training row: restore used to set them up on the
    slice's 8 rows and refuse."""
    def guide(x):
        loc = pyro.param("z_loc", torch.zeros(len(x)))
        mu = pyro.param("mu_loc", torch.tensor(0.0))
        pyro.sample("mu", dist.Delta(mu))
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(loc, 0.5))

    x = data(50)
    history = fit(hierarchical, guide, x, epochs=30, batch_size=50, lr=0.05, out=tmp_path,
                  progress=False)
    ppl_vae.restore(hierarchical, guide, tmp_path / "checkpoint.pt", x[:8])
    assert pyro.param("z_loc").shape == (50,)
    assert elbo(hierarchical, guide, x, 50) == pytest.approx(history[-1]["train_elbo"], abs=0.3)


def test_autoguidelist_median_gives_every_row_after_minibatches():
    """The list's parts read its plates of the last call: after minibatch training median()
    gave the last minibatch's 20 rows, in its random order."""
    from pyro.infer.autoguide import AutoDiagonalNormal, AutoGuideList

    x = torch.arange(60.0)
    guide = AutoGuideList(hierarchical)
    guide.append(AutoDiagonalNormal(pyro.poutine.block(hierarchical, expose=["mu"])))
    guide.append(AutoDelta(pyro.poutine.block(hierarchical, expose=["z"])))
    fit(hierarchical, guide, x, epochs=100, batch_size=20, lr=0.5, progress=False)
    z = guide.median(x)["z"]
    assert z.shape == (60,) and bool((z[1:] > z[:-1]).all())  # every row, in order


def test_divergence_between_checkpoints_keeps_the_best_epoch(tmp_path):
    """With checkpoint_every=5, a NaN in epoch 4 lost epochs 1-3 and said none had finished."""
    calls = {"n": 0}

    def exploding(x):
        calls["n"] += 1
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        with pyro.plate("data", len(x)):
            pyro.sample("obs", dist.Normal(mu, 1.0), obs=x)
        if calls["n"] >= 11:  # set-up and validation calls included: NaN from epoch 4
            pyro.factor("boom", mu * float("nan"))

    with pytest.raises(ppl_vae.TrainingDiverged, match="last good checkpoint is kept") as e:
        fit(exploding, AutoNormal(exploding), data(50), val_data=data(30, seed=1), epochs=12,
            batch_size=50, lr=0.3, seed=1, out=tmp_path, checkpoint_every=5, progress=False)
    kept = ppl_vae.load_checkpoint(tmp_path / "best.pt")  # the best of epochs 1-3
    assert 1 <= kept["epoch"] <= 3 and f"(epoch {kept['epoch']})" in str(e.value)


def test_a_square_students_by_items_matrix_finds_its_rows_plate():
    """Full batch on a 30 x 30 answer matrix: the students plate (dim -2) and the items
    plate (dim -1) both have 30 entries. The rows of ``obs=Y`` are the data's rows, so the
    students plate is the data plate (it was refused, asking for plate=); per-student
    log p(y_s) with fixed difficulties matches 1-D quadrature. Observations that are not the
    batch's own tensor (``obs=Y.T``) leave it ambiguous: refused, naming plate=."""
    generator = torch.Generator().manual_seed(0)
    size = 30
    difficulty = torch.linspace(-1.5, 1.5, size)
    ability = torch.randn(size, 1, generator=generator)
    answers = torch.bernoulli(torch.sigmoid(ability - difficulty), generator=generator)

    def model(answers):
        with pyro.plate("students", len(answers), dim=-2):
            theta = pyro.sample("ability", dist.Normal(0.0, 1.0))
            with pyro.plate("items", answers.shape[1], dim=-1):
                pyro.sample("y", dist.Bernoulli(logits=theta - difficulty), obs=answers)

    guide = AutoNormal(model)
    fit(model, guide, answers, epochs=300, lr=0.05, progress=False)
    got = log_likelihood(model, guide, answers, 2000, per_example=True)
    assert got.shape == (size,)
    grid = torch.linspace(-8, 8, 4001, dtype=torch.float64)
    logits = grid[:, None, None] - difficulty.double()  # (grid, 1, items)
    per_grid = dist.Bernoulli(logits=logits).log_prob(answers.double()).sum(-1)  # (grid, S)
    log_prior = dist.Normal(0.0, 1.0).log_prob(grid)[:, None]
    exact = torch.logsumexp(per_grid + log_prior, 0) + math.log(float(grid[1] - grid[0]))
    assert float((got.double() - exact).abs().max()) < 0.05

    def transposed(answers):
        with pyro.plate("items", answers.shape[1], dim=-2):
            with pyro.plate("students", len(answers), dim=-1):
                theta = pyro.sample("ability", dist.Normal(0.0, 1.0))
                pyro.sample("y", dist.Bernoulli(logits=theta - difficulty[:, None]),
                            obs=answers.T)

    with pytest.raises(SetupError, match="several plates of length 30.*plate=NAME"):
        fit(transposed, AutoNormal(transposed), answers, epochs=1, progress=False)


def mixture(x):
    """Two Normal components with pyro.param weights and locations; z per row."""
    weights = pyro.param("weights", torch.ones(2) / 2, constraint=constraints.simplex)
    locs = pyro.param("locs", torch.tensor([-1.0, 1.0]))
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Categorical(weights))
        pyro.sample("obs", dist.Normal(locs[z], 1.0), obs=x)


def test_auto_discrete_parallel_evaluates_all_rows_and_is_refused_on_minibatches():
    """AutoDiscreteParallel keeps a probability vector per row (N, K) that Pyro never slices:
    elbo/log_likelihood/to_arviz at their default batch of 100 crashed on 400 rows with
    Pyro's shape error; now they take all rows (log p(x) exact: the mixture's density at
    the fitted parameters), and minibatch training is refused naming full batch or enum."""
    x = torch.cat([data(280) - 2.5, data(120, seed=1) + 1.0])
    guide = AutoDiscreteParallel(mixture)
    fit(mixture, guide, x, epochs=100, batch_size=len(x), lr=0.05, objective="enum",
        progress=False)
    w, m = pyro.param("weights").detach().double(), pyro.param("locs").detach().double()
    exact = (w.log() + dist.Normal(m, 1.0).log_prob(x.double()[:, None])).logsumexp(-1)
    assert log_likelihood(mixture, guide, x, 10) == pytest.approx(float(exact.mean()), abs=1e-3)
    assert elbo(mixture, guide, x) <= float(exact.mean()) + 1e-3
    assert ppl_vae.to_arviz(mixture, guide, x, num_samples=20).posterior["z"].shape[-1] == 400
    with pytest.raises(SetupError, match="AutoDiscreteParallel keeps one probability vector "
                                         "per row.*batch_size >= 400.*objective='enum'"):
        fit(mixture, AutoDiscreteParallel(mixture), x, epochs=1, batch_size=100,
            objective="enum", progress=False)


@pytest.mark.parametrize("batch_size", [50, 1000])
def test_a_guide_set_up_on_other_rows_is_refused_naming_a_new_guide(batch_size):
    """fit of an AutoNormal trained on 100 rows, given 150: on minibatches Pyro's raw
    ValueError came out, full-batch a message pointing to amortized guides only."""
    x = data(150)
    guide = AutoNormal(hierarchical)
    fit(hierarchical, guide, x[:100], epochs=2, batch_size=batch_size, progress=False)
    with pytest.raises(SetupError, match=r"build a new guide \(e\.g\. AutoNormal\(model\)\)"):
        fit(hierarchical, guide, x, epochs=2, batch_size=batch_size, progress=False)


def test_plain_group_indexing_is_caught_when_particles_rows_and_groups_coincide():
    """``a[g]`` on a (K, G) latent indexes the particle dim; with K particles = B rows = G
    groups every shape came out right and log_likelihood was silently wrong (G=6, K=6, B=6:
    -14.9 against -0.84). The broadcast check now uses a particle count that is no length
    of the program: a warning, one particle at a time, and the a[..., g] figure."""
    groups = 6
    generator = torch.Generator().manual_seed(0)
    g = torch.arange(60) % groups
    x = torch.randn(60, generator=generator)
    y = 2.0 * torch.randn(groups, generator=generator)[g] + 0.7 * x \
        + 0.5 * torch.randn(60, generator=generator)

    def make(plain):
        def model(g, x, y):
            b = pyro.sample("b", dist.Normal(0.0, 1.0))
            with pyro.plate("groups", groups):
                a = pyro.sample("a", dist.Normal(0.0, 2.0))
            with pyro.plate("data", len(x)):
                pyro.sample("y", dist.Normal((a[g] if plain else a[..., g]) + b * x, 0.5),
                            obs=y)
        return model

    figures = {}
    for plain in (False, True):
        model = make(plain)
        guide = AutoNormal(model)
        fit(model, guide, (g, x, y), epochs=300, batch_size=60, lr=0.05, progress=False,
            seed=0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pyro.set_rng_seed(1)
            figures[plain] = log_likelihood(model, guide, (g, x, y), num_samples=groups,
                                            batch_size=groups)
        said = [str(w.message) for w in caught if "does not broadcast" in str(w.message)]
        assert bool(said) == plain
    assert figures[True] == pytest.approx(figures[False], abs=0.15)  # 6 draws: MC noise
    assert figures[True] > -2.0


def test_data_that_does_not_fit_the_signature_is_named_on_minibatches_too():
    """Full batch said how the engine calls the model; on minibatches the autoguide's set-up
    pass over all rows let Pyro's raw TypeError out. A tuple holding one dict was taken for
    streamed minibatches ("needs num_data=")."""
    x = data(100)
    y = 2 * x

    def model_of_batch(batch):
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(batch["x"])):
            pyro.sample("y", dist.Normal(w * batch["x"], 0.5), obs=batch["y"])

    for batch_size in (25, 100):
        with pytest.raises(SetupError, match="unexpected keyword argument 'x'.*model"
                                             r"\(\*\*data\) for a dict"):
            fit(model_of_batch, AutoNormal(model_of_batch), {"x": x, "y": y}, epochs=1,
                batch_size=batch_size, progress=False)
    with pytest.raises(ValueError, match=r"tuple holding one dict.*write it as\s+model\(x, y\)"):
        fit(model_of_batch, AutoNormal(model_of_batch), ({"x": x, "y": y},), epochs=1,
            batch_size=25, progress=False)


def test_a_program_that_mixes_particles_without_an_error_trains_and_scores_right():
    """A global ``pyro.factor(-0.5 * w.pow(2).sum())`` sums over the particles and raises
    nothing: with 8 vectorized particles the penalty counted 8 times (posterior mean 0.641
    for an exact 1.023). A shape ``assert`` fails on particles with an AssertionError, which
    escaped the fallback. Both now run one particle at a time, with a warning."""
    y = data(10, seed=3) + 0.5

    def ridge(y):
        w = pyro.sample("w", dist.Normal(torch.zeros(1), 1.0).to_event(1))
        pyro.factor("ridge", -0.5 * w.pow(2).sum())  # prior precision 1 + 1
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(w[..., 0], 1.0), obs=y)

    guide = AutoNormal(ridge)
    with pytest.warns(UserWarning, match="mixes the particles"):
        fit(ridge, guide, y, epochs=1500, lr=0.02, batch_size=10, num_particles=8,
            progress=False, seed=0)
    exact = float(y.sum()) / (2 + len(y))
    assert float(guide.median()["w"][0]) == pytest.approx(exact, abs=0.05)

    def asserting(y):
        w = pyro.sample("w", dist.Normal(torch.zeros(1), 1.0).to_event(1)).squeeze()
        assert w.dim() == 0, f"w has shape {tuple(w.shape)}"
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(w, 1.0), obs=y)

    guide = AutoNormal(asserting)
    fit(asserting, guide, y, epochs=2, batch_size=10, progress=False)
    with pytest.warns(UserWarning, match="AssertionError"):
        assert math.isfinite(elbo(asserting, guide, y))

    def own_rows(x):  # draws its rows: the trial scores the same rows alone (no warning)
        mu = pyro.sample("mu", dist.Normal(0.0, PRIOR_SD))
        with pyro.plate("data", len(x), subsample_size=50) as rows:
            pyro.sample("obs", dist.Normal(mu, 1.0), obs=x[rows])

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit(own_rows, AutoNormal(own_rows), data(), epochs=2, batch_size=200,
            num_particles=4, progress=False)


def test_refused_fit_keeps_the_param_store_and_adp_checks_use_all_rows():
    """A fit refused before its first step cleared Pyro's param store (a trained
    AutoDiscreteParallel, whose probabilities live there, was reset: elbo -4.91 for
    -2.03); importance_diagnostics and to_arviz(batch_size=) of a full-batch-trained
    AutoDiscreteParallel were refused as if on minibatches."""
    x = torch.cat([data(700) - 2.5, data(500, seed=1) + 1.0])
    guide = AutoDiscreteParallel(mixture)
    fit(mixture, guide, x, epochs=60, batch_size=len(x), lr=0.05, objective="enum",
        progress=False)
    trained = elbo(mixture, guide, x)
    with pytest.raises(SetupError, match="AutoDiscreteParallel"):
        fit(mixture, AutoDiscreteParallel(mixture), x, epochs=1, batch_size=100,
            objective="enum", progress=False)
    assert elbo(mixture, guide, x) == pytest.approx(trained, abs=1e-4)
    assert ppl_vae.importance_diagnostics(mixture, guide, x, num_samples=20) is not None
    assert ppl_vae.to_arviz(mixture, guide, x, num_samples=10, batch_size=100
                            ).posterior["z"].shape[-1] == len(x)


def test_pyro_examples_sizeless_plate_baseline_fixed_plate_size_and_dict_tuples():
    """From Pyro's SVI Part III, the DPMM tutorial and the toy-mixture example: a sizeless
    data plate drew one posterior-predictive value per draw, not per row; a guide's baseline
    (TraceGraph_ELBO's) was dropped without a word; a plate sized by a global N on an
    evaluation minibatch was blamed on data read from outside; a tuple (dict, n) was taken
    for streamed minibatches."""
    flips = torch.tensor([1.0, 1, 1, 1, 1, 1, 0, 0, 0, 0])

    class NonreparameterizedBeta(dist.Beta):  # SVI Part III's
        has_rsample = False

    def coin(data):
        f = pyro.sample("f", dist.Beta(10.0, 10.0))
        with pyro.plate("data_plate"):
            pyro.sample("obs", dist.Bernoulli(f), obs=data)

    def beta_guide(data):
        a = pyro.param("a", torch.tensor(15.0), constraint=constraints.positive)
        b = pyro.param("b", torch.tensor(15.0), constraint=constraints.positive)
        pyro.sample("f", NonreparameterizedBeta(a, b), infer={"baseline": {
            "use_decaying_avg_baseline": True, "baseline_beta": 0.9}})

    with pytest.warns(UserWarning, match="'f' ask for a baseline.*only Pyro's TraceGraph"):
        fit(coin, beta_guide, flips, epochs=20, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no gradient here: no word of baselines
        idata = ppl_vae.to_arviz(coin, beta_guide, flips, num_samples=400, seed=0)
    predicted = idata.posterior_predictive["obs"]
    assert predicted.shape == (1, 400, 10)
    assert float(predicted.mean()) == pytest.approx(float(idata.posterior["f"].mean()),
                                                    abs=0.05)

    total = 120

    def fixed_size(x):
        mu = pyro.sample("mu", dist.Normal(0.0, PRIOR_SD))
        with pyro.plate("data", total):
            pyro.sample("obs", dist.Normal(mu, 1.0), obs=x)

    guide = AutoNormal(fixed_size)
    fit(fixed_size, guide, data(total), epochs=2, batch_size=total, progress=False)
    with pytest.raises(SetupError, match=r"a plate sized by a fixed number.*batch_size >= 120"):
        elbo(fixed_size, guide, data(total))

    with pytest.raises(ValueError, match=r"tuple of \(dict, int\).*functools.partial"):
        fit(normal_mean, AutoNormal(normal_mean), ({"x": data()}, 200), epochs=1,
            progress=False)
    with pytest.raises(ValueError, match=r"tuple of \(Tensor, dict\).*as one tuple"):
        fit(normal_mean, AutoNormal(normal_mean), (data(), {"y": data()}), epochs=1,
            progress=False)  # (it was told to pass the dict as a constant)


def test_networks_in_closures_are_evaluated_without_dropout():
    """A plain-function VAE whose encoder (with dropout) is held in a closure and registered
    with pyro.module: evaluation scored it with dropout on (elbo -7.94 / -7.96 for -7.73),
    and the particle-broadcast check, seeing different numbers for the same draws, warned
    falsely and trained one particle at a time."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(120, 4, generator=generator)
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 4))
    decoder = nn.Linear(2, 4)

    def model(x):
        pyro.module("decoder", decoder)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(decoder(z), 1.0).to_event(1), obs=x)

    def guide(x):
        pyro.module("encoder", encoder)
        with pyro.plate("data", len(x)):
            h = encoder(x)
            pyro.sample("z", dist.Normal(h[..., :2], h[..., 2:].exp()).to_event(1))

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit(model, guide, x, epochs=3, batch_size=40, num_particles=3, progress=False)
        pyro.set_rng_seed(0)
        got = elbo(model, guide, x, num_particles=200)
    assert encoder.training  # left as the user had it
    encoder.eval()
    pyro.set_rng_seed(0)
    assert got == pytest.approx(elbo(model, guide, x, num_particles=200), abs=1e-4)


def test_an_enumerated_site_in_a_sizeless_data_plate_is_drawn_per_row():
    """Pyro's SS-VAE writes ``pyro.plate("data")`` without a size; with all rows in one
    batch, to_arviz drew one enumerated z per draw for every row (P(z=1) 0.85 on every row
    against 0.27 .. 1 exactly). Its sites now get the rows' length, as on minibatches."""
    from pyro.infer import config_enumerate

    locs, weights = torch.tensor([-2.0, 2.0]), torch.tensor([0.3, 0.7])
    generator = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(4, generator=generator) - 2,
                   torch.randn(8, generator=generator) + 2])

    @config_enumerate
    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 0.01))
        with pyro.plate("data"):
            z = pyro.sample("z", dist.Categorical(weights))
            pyro.sample("obs", dist.Normal(locs[z] + mu, 1.0), obs=x)

    def guide(x):
        pyro.sample("mu", dist.Normal(0.0, 0.01))

    joint = weights.log() + dist.Normal(locs, 1.0).log_prob(x.unsqueeze(-1))
    exact = (joint - joint.logsumexp(-1, keepdim=True)).exp()[:, 1]
    for batch_size in (None, 5):
        idata = ppl_vae.to_arviz(model, guide, x, 2000, seed=1, batch_size=batch_size)
        z = torch.as_tensor(idata.posterior["z"].values[0])
        assert z.shape == (2000, 12)
        assert float((z.double().mean(0) - exact.double()).abs().max()) < 0.05
