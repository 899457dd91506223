"""The shared engine: training, objectives, evaluation against exact answers, checkpoints."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

import ppl_vae
from ppl_vae import TrainingDiverged, elbo, fit, load_checkpoint, log_likelihood
from ppl_vae.batching import TensorBatches
from ppl_vae.guides.amortized import AmortizedNormal
from ppl_vae.models.ppca import PPCA
from ppl_vae.models.vae import build_vae
from ppl_vae.nn import NormalEncoder
from ppl_vae.objectives import make_objective


def toy_images(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, 28, 28, generator=g) < 0.1).float()
    x[: n // 2, 5:12, 5:20] = 1.0
    x[n // 2:, 15:25, 3:10] = 1.0
    return x


def ppca_data(n=400, d=5, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, k, generator=g)
    z = torch.randn(n, k, generator=g)
    return z @ w.T + 0.3 * torch.randn(n, d, generator=g) + 1.0


def ppca_pair(d=5, k=2):
    torch.manual_seed(0)
    model = PPCA(d, k)
    guide = AmortizedNormal(NormalEncoder(nn.Identity(), d, k), site="z")
    return model, guide


@pytest.mark.parametrize("objective", ["trace", "meanfield", "jit", "iwae"])
def test_loss_falls(objective):
    vae, guide = build_vae(latent_dim=4, hidden=(32,))
    history = fit(vae, guide, toy_images(), epochs=4, batch_size=64, objective=objective,
                  num_particles=3 if objective == "iwae" else 1, lr=3e-3, progress=False)
    assert history["train_elbo"][-1] > history["train_elbo"][0] + 20


def test_iwae_bound_is_above_elbo_and_grows_with_k():
    model, guide = ppca_pair()
    x = ppca_data()
    fit(model, guide, x, epochs=3, batch_size=100, lr=1e-2, progress=False)
    pyro.set_rng_seed(1)
    e = elbo(model, guide, x, num_particles=200)
    bounds = []
    for k in (1, 10, 100, 1000):
        pyro.set_rng_seed(2)
        bounds.append(log_likelihood(model, guide, x, num_samples=k))
    assert abs(bounds[0] - e) < 0.05  # K = 1 is the ELBO
    assert bounds[1] > e
    assert bounds[0] < bounds[1] < bounds[2] < bounds[3] + 1e-3
    assert bounds[3] <= float(model.exact_log_likelihood(x).mean()) + 0.02


def test_iwae_estimate_matches_exact_ppca_log_likelihood():
    model, guide = ppca_pair()
    x = ppca_data()
    fit(model, guide, x, epochs=60, batch_size=100, lr=1e-2, progress=False)
    exact = float(model.exact_log_likelihood(x).mean())
    estimate = log_likelihood(model, guide, x, num_samples=2000)
    assert abs(estimate - exact) < 0.1, (estimate, exact)
    per_example = log_likelihood(model, guide, x[:50], num_samples=2000, per_example=True)
    assert per_example.shape == (50,)
    assert (per_example - model.exact_log_likelihood(x[:50])).abs().max() < 0.3


class GlobalMean(nn.Module):
    """mu ~ N(0, 10^2) global; x_i ~ N(mu, 1). Guide: q(mu) = N(m, s)."""

    def __init__(self):
        super().__init__()
        self.m = nn.Parameter(torch.tensor(0.3))
        self.log_s = nn.Parameter(torch.tensor(-1.0))

    def model(self, x, size=None, subsample=None):
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        with pyro.plate("data", size or len(x), subsample=subsample):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x)

    def guide(self, x, size=None, subsample=None):
        pyro.module("q", self)
        pyro.sample("mu", dist.Normal(self.m, self.log_s.exp()))


def test_minibatch_elbo_with_global_latent_averages_to_full_data_elbo():
    x = torch.randn(120) + 2.0
    pair = GlobalMean()
    objective = make_objective("trace")
    full = TensorBatches(x, 120, shuffle=False)
    pyro.set_rng_seed(5)
    full_loss = objective(pair.model, pair.guide, next(iter(full))).item()
    losses = []
    for batch in TensorBatches(x, 30, shuffle=True):
        pyro.set_rng_seed(5)  # the same draw of mu for every minibatch
        losses.append(objective(pair.model, pair.guide, batch).item())
    assert len(losses) == 4
    assert sum(losses) / 4 == pytest.approx(full_loss, rel=1e-5)
    assert min(losses) != pytest.approx(max(losses))  # the batches really differ


def test_resume_equals_uninterrupted_run(tmp_path):
    x = toy_images(192)

    def run(out, epochs, resume=False):
        torch.manual_seed(0)
        vae, guide = build_vae(latent_dim=3, hidden=(16,), dynamic_binarization=True)
        h = fit(vae, guide, x, val_data=x[:32], epochs=epochs, batch_size=64, out=out,
                resume=resume, progress=False, seed=3)
        return h, vae, guide

    full, vae_a, guide_a = run(tmp_path / "a", 4)
    run(tmp_path / "b", 2)
    resumed, vae_b, guide_b = run(tmp_path / "b", 4, resume=True)
    assert [r["epoch"] for r in resumed.rows] == [1, 2, 3, 4]
    assert resumed["train_elbo"] == pytest.approx(full["train_elbo"], abs=1e-6)
    assert resumed["val_elbo"] == pytest.approx(full["val_elbo"], abs=1e-6)
    for p, q in zip(vae_a.parameters(), vae_b.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(guide_a.parameters(), guide_b.parameters()):
        assert torch.equal(p, q)


class Exploding(nn.Module):
    """A model whose likelihood turns NaN after ``after`` training calls (with gradients;
    the engine's set-up traces run without): a stand-in for divergence."""

    def __init__(self, after):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(()))
        self.calls = 0
        self.after = after

    def forward(self, x, size=None, subsample=None):
        pyro.module("exploding", self)
        self.calls += torch.is_grad_enabled()
        loc = self.loc * (math.nan if self.calls > self.after else 1.0)
        with pyro.plate("data", size or len(x), subsample=subsample):
            pyro.sample("x", dist.Normal(loc, 1.0), obs=x)


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(tmp_path):
    x = torch.randn(40)
    model = Exploding(after=4 + 2)  # epoch 1 (4 steps) + 2 steps
    with pytest.raises(TrainingDiverged, match=r"epoch 2, step 3 of 4") as err:
        fit(model, lambda *a, **k: None, x, epochs=5, batch_size=10, out=tmp_path,
            progress=False, sync_every=2)
    assert "checkpoint.pt" in str(err.value) and "learning rate" in str(err.value)
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["epoch"] == 1
    assert torch.isfinite(state["model"]["loc"])
    assert (tmp_path / "metrics.csv").read_text().count("\n") == 2  # header + epoch 1


def test_truncated_or_foreign_checkpoint_gives_clear_error(tmp_path):
    x = toy_images(64)
    vae, guide = build_vae(latent_dim=2, hidden=(8,))
    fit(vae, guide, x, epochs=1, batch_size=32, out=tmp_path, progress=False)
    good = (tmp_path / "checkpoint.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(good[: len(good) // 3])
    with pytest.raises(ValueError, match=r"cut\.pt is not a readable ppl-vae checkpoint"):
        load_checkpoint(tmp_path / "cut.pt")
    torch.save({"format": "ppl-vae/1", "code": math.floor}, tmp_path / "code.pt")
    with pytest.raises(ValueError, match="code.pt"):  # refuses to unpickle a function
        load_checkpoint(tmp_path / "code.pt")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")


def test_bad_data_is_rejected_before_training():
    vae, guide = build_vae(latent_dim=2, hidden=(8,))
    x = toy_images(64)
    x[7, 3, 4] = math.nan
    with pytest.raises(ValueError, match=r"data\[0\] contains NaN or inf \(first at index "
                       r"\[7, 3, 4\]\)"):
        fit(vae, guide, x, epochs=1, progress=False)
    with pytest.raises(ValueError, match="first dimensions disagree"):
        fit(vae, guide, (toy_images(64), torch.zeros(10)), epochs=1, progress=False)
    with pytest.raises(ValueError, match="unknown objective 'elbo'"):
        fit(vae, guide, toy_images(64), objective="elbo", progress=False)


def test_kl_weight_scales_the_kl_term():
    """With beta = 0 the latent terms vanish from the loss: only -log p(x|z) remains."""
    vae, guide = build_vae(latent_dim=2, hidden=(8,))
    x = toy_images(32)
    batch = next(iter(TensorBatches(x, 32, shuffle=False)))
    weighted = make_objective("trace", kl_sites=["z"])
    weighted.kl_weight.factor = 0.0
    pyro.set_rng_seed(0)
    loss0 = weighted(vae, guide, batch).item()
    pyro.set_rng_seed(0)
    z = guide(x)
    expected = -vae.pixel_distribution(vae.decoder(z)).log_prob(x).sum().item()
    assert loss0 == pytest.approx(expected, rel=1e-5)


def test_early_stopping_and_history_csv(tmp_path):
    x = toy_images(128)
    vae, guide = build_vae(latent_dim=2, hidden=(8,))
    history = fit(vae, guide, x, val_data=x[:32], epochs=30, batch_size=64, lr=0.5,
                  patience=2, out=tmp_path, progress=False)
    assert history.stopped_early and len(history) < 30
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert header[:5] == ["epoch", "train_elbo", "seconds", "lr", "val_elbo"]
    assert (tmp_path / "best.pt").exists()


def test_warmup_epochs_are_never_kept_as_the_best_nor_stop_training(tmp_path):
    """With warmup_epochs W, best.pt holds an epoch after W even when an earlier epoch scored
    higher, and patience counts from W on; W >= epochs still keeps the last epoch."""
    x = ppca_data(200)
    model, guide = ppca_pair()
    history = fit(model, guide, x, val_data=x[:50], epochs=8, batch_size=50, lr=0.05,
                  patience=2, warmup_epochs=5, out=tmp_path, progress=False)
    assert history.best_epoch > 5 and len(history) >= 7
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == history.best_epoch
    from ppl_vae.training import FitConfig, Trainer

    for warmup, best, stop in ((0, 1, 3), (5, 6, 8)):  # validation ELBOs that only fall
        trainer = Trainer(*ppca_pair(), FitConfig(epochs=20, patience=2, warmup_epochs=warmup))
        for epoch in range(1, 21):
            trainer.epoch = epoch
            trainer._early_stopping({"train_elbo": 0.0, "val_elbo": -float(epoch)})
            if trainer.should_stop:
                break
        assert (trainer.history.best_epoch, epoch) == (best, stop)
    model, guide = ppca_pair()
    short = fit(model, guide, x, val_data=x[:50], epochs=3, batch_size=50, lr=0.05,
                patience=1, warmup_epochs=10, progress=False)
    assert short.best_epoch == 3 and len(short) == 3
    with pytest.raises(ppl_vae.SetupError, match="warmup_epochs must be an integer >= 0"):
        fit(model, guide, x, epochs=1, warmup_epochs=-1, progress=False)


def test_validation_elbo_uses_the_same_draws_every_epoch_and_leaves_training_draws_alone():
    """Two validation passes of unchanged parameters give the same number (epochs differ by
    their parameters, not their draws), and the training random stream is not advanced."""
    from ppl_vae.training import FitConfig, Trainer

    x = ppca_data(120)
    model, guide = ppca_pair()
    trainer = Trainer(model, guide, FitConfig(epochs=1, batch_size=40, lr=0.01, seed=3))
    trainer.fit(x, progress=False)
    torch.manual_seed(123)
    first = trainer.validation_elbo(x[:60])
    after = torch.rand(1)
    torch.manual_seed(123)
    assert trainer.validation_elbo(x[:60]) == first
    torch.manual_seed(123)
    assert torch.equal(torch.rand(1), after)
    with torch.no_grad():  # a different draw of the same parameters would differ
        assert elbo(model, guide, x[:60], num_particles=1) != first


def test_dataloader_input_streams_batches():
    from torch.utils.data import DataLoader, TensorDataset

    x = toy_images(128)
    loader = DataLoader(TensorDataset(x), batch_size=32, shuffle=True)
    vae, guide = build_vae(latent_dim=2, hidden=(16,))
    history = fit(vae, guide, loader, epochs=3, lr=3e-3, progress=False)
    assert history["train_elbo"][-1] > history["train_elbo"][0]
    with pytest.raises(ValueError, match="num_data"):
        fit(vae, guide, iter([(x[:4],)]), epochs=1, progress=False)


@pytest.mark.parametrize("architecture, likelihood", [
    ("mlp", "bernoulli"), ("mlp", "continuous_bernoulli"), ("mlp", "gaussian"),
    ("conv", "bernoulli")])
def test_architectures_and_likelihoods_train_and_evaluate(architecture, likelihood):
    x = toy_images(96)
    if likelihood != "bernoulli":
        x = x * 0.8 + 0.1
    vae, guide = build_vae(latent_dim=3, architecture=architecture, hidden=(32,),
                           likelihood=likelihood)
    history = fit(vae, guide, x, epochs=3, batch_size=32, lr=3e-3, progress=False)
    assert history["train_elbo"][-1] > history["train_elbo"][0]
    ll = log_likelihood(vae, guide, x[:8], num_samples=20, per_example=True)
    assert ll.shape == (8,) and torch.isfinite(ll).all()
    assert vae.sample(4).shape == (4, 28, 28)


def test_optimizer_options_schedules_and_kl_annealing():
    x = toy_images(64)
    vae, guide = build_vae(latent_dim=2, hidden=(8,))
    history = fit(vae, guide, x, epochs=4, batch_size=32, optimizer="clipped_adam",
                  lr_schedule="cosine", clip_norm=5.0, kl_sites=["z"], beta=0.5,
                  kl_anneal_epochs=2, progress=False)
    assert history["beta"] == pytest.approx([0.25, 0.5, 0.5, 0.5])
    assert history["lr"][-1] < history["lr"][0]
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
        fit(vae, guide, x, optimizer="sgd", progress=False)
    with pytest.raises(ValueError, match="unknown lr_schedule"):
        fit(vae, guide, x, lr_schedule="linear", progress=False)
    with pytest.raises(TypeError, match="unknown options"):
        fit(vae, guide, x, epochz=3)


def test_two_autoguides_with_the_same_names_keep_their_own_parameters():
    """Pyro's global param store shares values between two AutoNormals by name; with Pyro's
    module_local_params=True (set before building them) each keeps its own, and the engine
    trains and reads them there."""
    from pyro.infer.autoguide import AutoNormal

    def model(x, size=None, subsample=None):
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        with pyro.plate("data", size or len(x), subsample=subsample):
            pyro.sample("x", dist.Normal(mu, 1.0), obs=x)

    pyro.settings.set(module_local_params=True)
    try:
        first, second = AutoNormal(model), AutoNormal(model)
        fit(model, first, torch.randn(200) - 3.0, epochs=40, batch_size=50, lr=0.1,
            progress=False)
        fit(model, second, torch.randn(200) + 3.0, epochs=40, batch_size=50, lr=0.1,
            progress=False)
        x = torch.zeros(1)
        for guide, truth in ((first, -3.0), (second, 3.0)):
            draws = pyro.infer.Predictive(model, guide=guide, num_samples=300)(x)["mu"]
            assert float(draws.mean()) == pytest.approx(truth, abs=0.4)
    finally:
        pyro.settings.set(module_local_params=False)


def test_a_plain_function_model_as_in_the_readme_trains():
    decoder = nn.Linear(8, 64)

    def model(x, size=None, subsample=None):
        pyro.module("decoder", decoder)
        with pyro.plate("data", size or len(x), subsample=subsample):
            z = pyro.sample("z", dist.Normal(x.new_zeros(8), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=decoder(z)).to_event(1), obs=x)

    guide = AmortizedNormal(NormalEncoder.mlp(64, [32], 8), site="z", plate="data")
    g = torch.Generator().manual_seed(0)
    data = (torch.rand(256, 64, generator=g) < torch.linspace(0.05, 0.95, 64)).float()
    history = fit(model, guide, data, epochs=5, batch_size=64, lr=1e-2, progress=False)
    assert history["train_elbo"][-1] > history["train_elbo"][0] + 5
    assert log_likelihood(model, guide, data[:16], num_samples=50) > history["train_elbo"][-1] - 5


def test_a_nan_gradient_under_a_finite_loss_stops_before_any_checkpoint_holds_it(tmp_path):
    """One step per epoch, so the NaN gradient comes at an epoch's last step with a finite
    loss: training stops naming the parameter, and checkpoint.pt and best.pt keep the last
    finite epoch, the one the message names."""
    x = torch.randn(40, generator=torch.Generator().manual_seed(0)) + 1.0

    def model(x):
        mu = pyro.param("mu", torch.tensor(0.0))
        if mu.detach() > 0.5:  # the value stays finite, its gradient is NaN
            mu = torch.where(torch.tensor(True), mu, torch.sqrt(mu - 100.0))
        with pyro.plate("data", len(x)):
            pyro.sample("obs", dist.Normal(mu, 1.0), obs=x)

    def guide(x):
        pass

    with pytest.raises(TrainingDiverged, match=r"parameter 'mu' became nan .* at epoch (\d+)"
                       ) as stop:
        fit(model, guide, x, epochs=50, batch_size=40, lr=0.05, device="cpu",
            out=tmp_path, progress=False)
    epoch = int(str(stop.value).split("at epoch ")[1].split(",")[0])
    assert f"checkpoint.pt (epoch {epoch - 1})" in str(stop.value)
    for name in ("checkpoint.pt", "best.pt"):
        state = load_checkpoint(tmp_path / name)
        assert state["epoch"] == epoch - 1 and torch.isfinite(state["params"]["mu"])


def test_buffers_of_networks_registered_with_pyro_module_are_saved_and_restored(tmp_path):
    """A plain-function model and guide registering their networks with pyro.module: the
    BatchNorm running statistics (buffers, which Pyro's param store does not hold) come
    back with restore and with resume; a checkpoint without them still loads."""
    g = torch.Generator().manual_seed(1)
    x = torch.bernoulli(torch.full((60, 6), 0.3), generator=g)
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 4))
    dec = nn.Sequential(nn.Linear(2, 8), nn.BatchNorm1d(8), nn.Linear(8, 6))

    def model(x):
        pyro.module("decoder", dec)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(x.new_zeros(len(x), 2), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=dec(z)).to_event(1), obs=x)

    def guide(x):
        pyro.module("encoder", enc)
        with pyro.plate("data", len(x)):
            h = enc(x)
            pyro.sample("z", dist.Normal(h[:, :2], h[:, 2:].exp()).to_event(1))

    fit(model, guide, x, epochs=2, batch_size=20, device="cpu", out=tmp_path, progress=False)
    trained = [m[1].running_mean.clone() for m in (enc, dec)]
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert "decoder$$$1.running_var" in state["buffers"]
    for m in (enc, dec):
        m[1].reset_running_stats()
    ppl_vae.restore(model, guide, tmp_path / "checkpoint.pt", x[:10])
    assert all(torch.equal(m[1].running_mean, t) for m, t in zip((enc, dec), trained))
    for m in (enc, dec):
        m[1].reset_running_stats()
    fit(model, guide, x, epochs=2, batch_size=20, device="cpu", out=tmp_path, resume=True,
        progress=False)
    assert all(torch.equal(m[1].running_mean, t) for m, t in zip((enc, dec), trained))
    del state["buffers"]  # written before buffers were saved: loads as before
    ppl_vae.restore(model, guide, state, x[:10])


@pytest.mark.parametrize("autoguide", ["AutoNormal", "AutoDelta"])
def test_restore_from_a_slice_sets_up_per_row_autoguide_parameters_for_every_row(autoguide,
                                                                                 tmp_path):
    """restore's data may be any slice of the training data, also for an autoguide with one
    parameter per row; a checkpoint that does not say its number of rows asks for them."""
    from pyro.infer import autoguide as autoguides

    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, generator=g)
    y = 1.5 * x + 0.7 * torch.randn(60, generator=g)

    def model(x, y):
        s = pyro.sample("slope", dist.Normal(0.0, 2.0))
        with pyro.plate("data", len(x)):
            u = pyro.sample("u", dist.Normal(0.0, 0.5))
            pyro.sample("y", dist.Normal(s * x + u, 0.5), obs=y)

    make = getattr(autoguides, autoguide)
    guide = make(model)
    fit(model, guide, (x, y), epochs=2, batch_size=20, device="cpu", out=tmp_path,
        progress=False)
    trained = {k: v.detach().clone() for k, v in guide.state_dict().items()}
    again = make(model)
    state = ppl_vae.restore(model, again, tmp_path / "checkpoint.pt", (x[:10], y[:10]))
    assert {k: v.shape for k, v in again.state_dict().items()} == {
        k: v.shape for k, v in trained.items()}
    assert all(torch.equal(again.state_dict()[k], v) for k, v in trained.items())
    del state["num_examples"]  # written before checkpoints held it
    with pytest.raises(ppl_vae.SetupError, match=r"one parameter per training row for "
                       r"\['u'\].*pass restore all the training rows \(10 given\)"):
        ppl_vae.restore(model, make(model), state, (x[:10], y[:10]))
    ppl_vae.restore(model, make(model), state, (x, y))


def test_resume_refuses_another_lr_or_seed_and_keeps_the_runs_own(tmp_path):
    """fit(resume=True) continues with the run's optimizer and random states: another lr or
    seed given is refused naming both values (as the CLI refuses them); left out, the run's
    own are used (also when they are not fit's defaults)."""
    x = torch.randn(40, generator=torch.Generator().manual_seed(0)) + 1.0

    def model(x):
        mu = pyro.param("mu", torch.tensor(0.0))
        with pyro.plate("data", len(x)):
            pyro.sample("obs", dist.Normal(mu, 1.0), obs=x)

    def guide(x):
        pass

    def run(**options):
        return fit(model, guide, x, batch_size=20, device="cpu", out=tmp_path, progress=False,
                   **options)

    run(epochs=1, lr=0.01, seed=4)
    with pytest.raises(ppl_vae.SetupError, match=r"lr \(run: 0\.01, given: 0\.5\)"):
        run(epochs=2, lr=0.5, resume=True)
    with pytest.raises(ppl_vae.SetupError, match=r"seed \(run: 4, given: 0\)"):
        run(epochs=2, seed=0, resume=True)
    history = run(epochs=2, resume=True)
    assert history["lr"] == [0.01, 0.01]
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert (state["config"]["lr"], state["config"]["seed"]) == (0.01, 4)
    assert len(run(epochs=3, lr=0.01, seed=4, resume=True)) == 3
