"""Posterior export and VI diagnostics on conjugate Normal-Normal models (exact posteriors).

Global model: mu ~ N(0, 1), x_i ~ N(mu, 1), i = 1..N -> mu | x ~ N(sum x / (N+1), 1/(N+1)).
Local model:  z_s ~ N(0, 1), x_sr ~ N(z_s, 1) for the answered raters r (mask)
              -> z_s | x_s ~ N(sum_r x_sr / (1 + m_s), 1 / (1 + m_s)), m_s = answered count.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from ppl_vae.checks import check_posterior
from ppl_vae.diagnostics import importance_diagnostics, nuts_crosscheck, pareto_khat, sbc
from ppl_vae.guides.amortized import AmortizedNormal
from ppl_vae.posterior import load_netcdf, save_netcdf, to_arviz

az = pytest.importorskip("arviz")
warnings.filterwarnings("ignore", category=FutureWarning)
torch.set_num_threads(1)


def global_model(x, size=None, subsample=None):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("data", size or len(x), subsample=subsample):
        pyro.sample("x", dist.Normal(mu, 1.0), obs=x)


def normal_guide(loc: float, scale: float):
    def guide(x, size=None, subsample=None):
        pyro.sample("mu", dist.Normal(torch.tensor(loc), scale))
    return guide


def global_data(n: int = 40, seed: int = 0):
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed)) + 1.0
    return x, float(x.sum()) / (n + 1), (n + 1) ** -0.5


class Raters(nn.Module):
    """The local model; dims declared once."""

    dims = {"z": ["student"], "x": ["student", "rater"]}

    def forward(self, x, mask, size=None, subsample=None):
        with pyro.plate("data", size or len(x), subsample=subsample):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            loc = z.unsqueeze(-1).expand(*z.shape, x.shape[-1])
            pyro.sample("x", dist.Normal(loc, 1.0).mask(mask).to_event(1),
                        obs=torch.where(mask, x, 0.0))


class ExactEncoder(nn.Module):
    """q(z|x) = the exact posterior, optionally shifted (in posterior sds) and rescaled."""

    def __init__(self, shift: float = 0.0, scale: float = 1.0):
        super().__init__()
        self.shift, self.scale = shift, scale

    def forward(self, xm):
        x, mask = xm
        prec = 1.0 + mask.sum(-1)
        sd = prec.rsqrt()
        return (x * mask).sum(-1) / prec + self.shift * sd, self.scale * sd


def local_guide(shift: float = 0.0, scale: float = 1.0) -> AmortizedNormal:
    return AmortizedNormal(ExactEncoder(shift, scale), site="z", plate="data", event_dim=0,
                           inputs=lambda x, mask: (x, mask))


def local_data(n: int = 30, raters: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 1, generator=g)
    x = z + torch.randn(n, raters, generator=g)
    mask = torch.rand(n, raters, generator=g) > 0.25
    mask[:, 0] = True
    return x, mask


def test_export_gives_exact_posterior_and_shares_globals_across_batches():
    x, m, s = global_data()
    idata = to_arviz(global_model, normal_guide(m, s), x, num_samples=4000, batch_size=7,
                     seed=0)
    mu = idata.posterior["mu"].values
    assert mu.shape == (1, 4000)
    assert abs(mu.mean() - m) < 4 * s / math.sqrt(4000)
    assert abs(mu.std() / s - 1) < 0.05
    # every minibatch saw the same global draw: log-lik recomputed from the draws agrees
    ll = idata.log_likelihood["x"].values[0]
    expect = dist.Normal(torch.from_numpy(mu[0]).unsqueeze(-1), 1.0).log_prob(x).numpy()
    np.testing.assert_allclose(ll, expect, rtol=1e-4, atol=1e-4)
    assert idata.observed_data["x"].dims == ("data",)
    assert idata.posterior_predictive["x"].shape == (1, 4000, len(x))
    loo = az.loo(idata)
    assert np.isfinite(loo.elpd_loo)


def test_export_amortized_local_latents_named_and_masked():
    x, mask = local_data()
    raters = ["a", "b", "c", "d"]
    idata = to_arviz(Raters(), local_guide(), (x, mask), num_samples=2000, batch_size=8,
                     coords={"rater": raters}, prior=True, seed=1)
    z = idata.posterior["z"]
    assert z.dims == ("chain", "draw", "student")
    prec = 1 + mask.sum(-1)
    exact_mean = ((x * mask).sum(-1) / prec).numpy()
    err = np.abs(z.mean(("chain", "draw")).values - exact_mean) / prec.rsqrt().numpy()
    assert err.max() < 4.5 / math.sqrt(2000) * 1.0 + 0.05
    assert abs(float(z.std(("chain", "draw")).values.mean() / prec.rsqrt().mean()) - 1) < 0.05
    obs = idata.observed_data["x"]
    assert obs.dims == ("student", "rater") and list(obs["rater"].values) == raters
    assert np.isnan(obs.values[~mask.numpy()]).all()
    assert not np.isnan(obs.values[mask.numpy()]).any()
    assert idata.log_likelihood["x"].dims == ("chain", "draw", "student")
    assert "prior" in idata.groups() and "prior_predictive" in idata.groups()
    for group in idata.groups():
        for var in idata[group].data_vars.values():
            assert not any(d.endswith("dim_0") for d in var.dims), (group, var.dims)


def test_netcdf_round_trip(tmp_path):
    x, mask = local_data(n=10)
    idata = to_arviz(Raters(), local_guide(), (x, mask), num_samples=50, seed=0)
    path = save_netcdf(idata, tmp_path / "sub" / "posterior.nc")
    back = load_netcdf(path)
    assert set(back.groups()) == set(idata.groups())
    np.testing.assert_array_equal(back.posterior["z"].values, idata.posterior["z"].values)
    assert back.observed_data["x"].dims == ("student", "rater")
    assert back.posterior.attrs["data_dim"] == "student"


def test_wrong_dims_are_named_in_the_error():
    x, mask = local_data(n=10)
    with pytest.raises(ValueError, match=r"site 'z'.*shape \(10,\)"):
        to_arviz(Raters(), local_guide(), (x, mask), num_samples=10,
                 dims={"z": ["student", "extra"]})
    with pytest.raises(ValueError, match="coords\\['rater'\\] has 2 labels"):
        to_arviz(Raters(), local_guide(), (x, mask), num_samples=10,
                 coords={"rater": ["a", "b"]})


def test_khat_global_small_for_exact_large_for_bad_guide():
    x, m, s = global_data()
    good = importance_diagnostics(global_model, normal_guide(m, s), x, num_samples=1000,
                                  seed=0)
    bad = importance_diagnostics(global_model, normal_guide(m + 2 * s, s / 3), x,
                                 num_samples=1000, seed=0)
    assert good.local is None and bad.local is None
    assert good.glob < 0.5 and "good" in good.verdict()
    assert bad.glob > 0.7 and "bad" in bad.verdict()
    assert bad.as_dict()["pareto_k"] == pytest.approx(bad.glob)


def test_khat_per_data_point_for_amortized_guide():
    x, mask = local_data()
    wide = importance_diagnostics(Raters(), local_guide(scale=1.2), (x, mask),
                                  num_samples=1000, seed=0)
    narrow = importance_diagnostics(Raters(), local_guide(shift=1.0, scale=0.4), (x, mask),
                                    num_samples=1000, seed=0)
    assert wide.glob is None and wide.local.shape == (30,)
    assert wide.local.max() < 0.5 and wide.as_dict()["pareto_k"] == 0.0
    assert narrow.share_bad > 0.5 and narrow.as_dict()["pareto_k"] == narrow.share_bad


def test_pareto_khat_needs_draws():
    with pytest.raises(ValueError, match="at least 10 draws"):
        pareto_khat(torch.zeros(5, 3))


def test_sbc_passes_for_exact_and_fails_for_biased_guide(tmp_path):
    x, mask = local_data(n=100)
    exact = sbc(Raters(), local_guide(), (x, mask), num_simulations=600, batch_size=100)
    biased = sbc(Raters(), local_guide(shift=0.5), (x, mask), num_simulations=600,
                 batch_size=100)
    overconfident = sbc(Raters(), local_guide(scale=0.7), (x, mask), num_simulations=600,
                        batch_size=100)
    assert exact.ranks["z"].shape == (600,) and exact.ranks["z"].max() <= 99
    assert exact.passed, exact.summary()
    assert not biased.passed and not overconfident.passed
    assert "NOT calibrated" in biased.summary()
    assert exact.plot(tmp_path / "sbc.png").stat().st_size > 0


def test_nuts_crosscheck_agrees_with_exact_guide(tmp_path):
    x, m, s = global_data(n=20)
    table, svi, nuts = nuts_crosscheck(global_model, normal_guide(m, s), x, num_samples=150,
                                       warmup_steps=100, num_chains=2, svi_samples=2000,
                                       out=tmp_path)
    row = table.loc["mu"]
    assert abs(row["z"]) < 0.5 and 0.7 < row["sd_ratio"] < 1.4
    assert nuts.posterior["mu"].shape[:2] == (2, 150)
    assert (tmp_path / "nuts_vs_svi_forest.png").exists()
    assert (tmp_path / "nuts_vs_svi.csv").exists()


def test_check_posterior_writes_files_and_flags_bad_guide(tmp_path):
    x, mask = local_data(n=40)
    ppc = {"mean per rater": ("x", lambda y: np.nanmean(y, 0), None)}
    good = check_posterior(Raters(), local_guide(scale=1.1), (x, mask), tmp_path / "good",
                           num_samples=200, ppc=ppc, seed=0)
    bad = check_posterior(Raters(), local_guide(shift=1.0, scale=0.4), (x, mask),
                          tmp_path / "bad", num_samples=200, seed=0)
    assert "share of data points" in good["pareto_k_is"]
    assert good["pareto_k"] < 0.1 < bad["pareto_k"]
    for name in ("posterior.nc", "summary.csv", "forest.png", "posterior.png", "ppc.png",
                 "khat.png", "ppc.csv"):
        assert (tmp_path / "good" / name).stat().st_size > 0, name
    summary = (tmp_path / "good" / "summary.csv").read_text()
    assert "z[0]" in summary


def test_cli_check_on_an_exam_run(tmp_path, capsys):
    from ppl_vae.cli.main import main
    from ppl_vae.models.irt import simulate

    d = simulate(120, 4, "2pl", missing=0.1, seed=3)
    data = tmp_path / "exam.csv"
    rows = ["student,q1,q2,q3,q4"] + [
        f"s{i}," + ",".join(str(int(v)) if ok else "" for v, ok in zip(r, m))
        for i, (r, m) in enumerate(zip(d["responses"].tolist(), d["mask"].tolist()))]
    data.write_text("\n".join(rows) + "\n")
    run = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main(["train", "irt-2pl", "--responses", str(data), "--epochs", "5", "--out", str(run),
              "--no-progress", "--posterior-samples", "50", "--device", "cpu",
              "--method", "amortized"])
        capsys.readouterr()
        main(["check", str(run), "--samples", "60", "--sbc-simulations", "200",
              "--device", "cpu"])
    printed = capsys.readouterr().out
    line = next(x for x in printed.splitlines() if x.startswith("pareto_k: "))
    assert 0.0 <= float(line.split(": ")[1]) <= 1.0
    assert "pareto_k_is: share of data points" in printed and "sbc: SBC: 200" in printed
    idata = load_netcdf(run / "posterior.nc")
    assert idata.posterior["ability"].dims == ("chain", "draw", "student")
    assert list(idata.posterior["item"].values) == ["q1", "q2", "q3", "q4"]
    assert idata.observed_data["responses"].dims == ("student", "item")
    assert np.isnan(idata.observed_data["responses"].values).sum() == int((~d["mask"]).sum())
    for name in ("summary.csv", "forest.png", "ppc.png", "ppc.csv", "khat.png", "sbc.png"):
        assert (run / name).exists(), name


def test_cli_check_on_a_marginal_exam_run(tmp_path, capsys):
    """The default (marginal) exam run: abilities are integrated out, so check judges the
    item posterior (Laplace) by its global k-hat."""
    from ppl_vae.cli.main import main

    run = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main(["train", "irt-2pl", "--responses", "lsat6", "--out", str(run), "--no-progress",
              "--device", "cpu"])
        capsys.readouterr()
        main(["check", str(run), "--samples", "100", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert "pareto_k_is: k-hat of the global latents" in printed
    k = float(next(x for x in printed.splitlines() if x.startswith("pareto_k: ")).split()[1])
    assert k < 0.7  # the Laplace posterior of LSAT6's ten item parameters is usable
