"""Multidimensional exam models: quadrature, recovery, the amortized IWAE path, Q-matrices, runs."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import ppl_vae
from ppl_vae import SetupError, fit
from ppl_vae.cli.main import main
from ppl_vae.data.irt import write_wide
from ppl_vae.models.irt_marginal import MarginalIRT
from ppl_vae.models.irt_multidim import (
    MultidimIRT,
    build,
    importance_abilities,
    item_estimates,
    read_q_matrix,
    simple_structure,
    simulate,
    varimax,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*answered all their items",
                                        "ignore:iwae objective.*global latents")


def items_of(a, d, rho: float | None = None) -> dict[str, torch.Tensor]:
    a = torch.as_tensor(a, dtype=torch.float64)
    dims = a.shape[1]
    r = torch.eye(dims, dtype=torch.float64)
    if rho is not None:
        r = r * (1 - rho) + rho
    return {"loadings": a, "intercept": torch.as_tensor(d, dtype=torch.float64),
            "cholesky": torch.linalg.cholesky(r)}


def read_rows(path: Path) -> list[dict]:
    return list(csv.DictReader(open(path)))


def test_2d_quadrature_log_marginal_equals_brute_force_integration():
    """log p(y_s | items) = log integral N(theta; 0, R) prod_t p(y_st | theta) dtheta, here by
    a fine rectangle rule on [-8, 8]^2 against the 21 x 21 Gauss-Hermite product rule."""
    q = np.array([[1, 0], [1, 0], [1, 1], [0, 1], [0, 1]])
    a = q * np.array([[1.3, 0.8], [0.7, 0.0], [1.1, 0.6], [0.0, 1.6], [0.0, 0.9]])
    d = np.array([0.5, -1.0, 0.2, 1.2, -0.4])
    items = items_of(a, d, rho=0.45)
    y = torch.tensor([[1., 0., 1., 1., 0.], [0., 0., 0., 1., 1.], [1., 1., 1., 1., 1.]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 0, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    model = MultidimIRT(5, 2, q, correlated=True).double()
    got = model.log_marginal(y.double(), mask, items)
    grid = torch.linspace(-8, 8, 641, dtype=torch.float64)
    theta = torch.cartesian_prod(grid, grid)
    r = items["cholesky"] @ items["cholesky"].T
    log_prior = torch.distributions.MultivariateNormal(torch.zeros(2, dtype=torch.float64),
                                                       r).log_prob(theta)
    eta = theta @ items["loadings"].T + items["intercept"]
    p = torch.sigmoid(eta)
    cell = (grid[1] - grid[0]) ** 2
    for s in range(3):
        lik = torch.where(mask[s], torch.where(y[s] > 0, p, 1 - p).log(), 0.0).sum(-1)
        brute = torch.logsumexp(lik + log_prior, 0) + cell.log()
        assert float(got[s]) == pytest.approx(float(brute), abs=2e-4)


def test_one_dimension_is_the_marginal_2pl():
    """D = 1 in slope-intercept form (a, d = -a b) gives MarginalIRT's 2PL log marginal."""
    g = torch.Generator().manual_seed(0)
    a = torch.rand(6, generator=g, dtype=torch.float64) + 0.5
    b = torch.randn(6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (8, 6), generator=g).double()
    mask = torch.rand(8, 6, generator=g) > 0.3
    ours = MultidimIRT(6, 1).double().log_marginal(y, mask, items_of(a[:, None], -a * b))
    theirs = MarginalIRT(6).double().log_marginal(
        y, mask, {"discrimination": a, "thresholds": b[:, None]})
    assert torch.allclose(ours, theirs, atol=1e-10)


def test_recovers_a_2d_confirmatory_exam_with_correlated_factors():
    q = simple_structure(12, 2)
    q[5, 1] = 1  # one item on both factors
    d = simulate(2000, q, np.array([[1.0, 0.5], [0.5, 1.0]]), missing=0.1, seed=4)
    model, guide = build(12, 2, q, num_nodes=15)
    fit(model, guide, (d["responses"], d["mask"]), epochs=100, batch_size=2000, lr=0.05,
        lr_schedule="cosine", progress=False)
    est = item_estimates(model, guide, d["responses"], d["mask"])
    a, truth = est["loadings"].numpy(), d["loadings"].numpy()
    assert np.all(a[q == 0] == 0)  # the Q-matrix's zeros stay zeros
    free = q > 0
    assert np.corrcoef(a[free], truth[free])[0, 1] > 0.95          # measured 0.985
    assert np.sqrt(((a - truth)[free] ** 2).mean()) < 0.13          # measured 0.070
    r = est["cholesky"] @ est["cholesky"].T
    assert abs(float(r[0, 1]) - 0.5) < 0.08                         # measured 0.497
    ab = model.abilities(d["responses"], d["mask"], est)
    for j in range(2):
        assert np.corrcoef(ab["eap"][:, j], d["ability"][:, j])[0, 1] > 0.68  # 0.74, 0.81


def test_amortized_3d_trains_on_the_iwae_bound_and_recovers_loadings():
    q = simple_structure(15, 3)
    d = simulate(1500, q, np.eye(3) * 0.7 + 0.3, seed=5)
    model, guide = build(15, 3, q, hidden=[64])
    history = fit(model, guide, (d["responses"], d["mask"]), epochs=12, batch_size=100,
                  lr=0.02, lr_schedule="cosine", objective="iwae", num_particles=5,
                  progress=False)
    elbos = history["train_elbo"]
    assert elbos[-1] > elbos[0] + 0.3                              # measured +1.2 nats
    est = item_estimates(model, guide, d["responses"], d["mask"])
    a, truth = est["loadings"].numpy(), d["loadings"].numpy()
    assert np.corrcoef(a[q > 0], truth[q > 0])[0, 1] > 0.85        # measured 0.95
    ab = importance_abilities(model, guide, d["responses"], d["mask"], est, num_samples=50)
    for j in range(3):
        assert np.corrcoef(ab["is_mean"][:, j], d["ability"][:, j])[0, 1] > 0.7  # 0.78-0.80


def test_importance_estimate_of_an_amortized_2d_run_approaches_the_exact_quadrature():
    """log p(y_s | items) of the encoder's importance sampler (K = 2000) vs quadrature."""
    q = simple_structure(10, 2)
    d = simulate(600, q, np.array([[1.0, 0.3], [0.3, 1.0]]), seed=6)
    model, guide = build(10, 2, q, method="amortized", hidden=[32])
    fit(model, guide, (d["responses"], d["mask"]), epochs=12, batch_size=100, lr=0.02,
        objective="iwae", num_particles=5, progress=False)
    items = item_estimates(model, guide, d["responses"], d["mask"])
    y, mask = d["responses"][:50], d["mask"][:50]
    exact = MultidimIRT(10, 2, q).abilities(y, mask, items, num_nodes=41)
    sampled = importance_abilities(model, guide, y, mask, items, num_samples=2000)
    error = sampled["log_marginal"] - exact["log_marginal"]    # Monte Carlo error, ~K^-1/2
    assert float(error.mean().abs()) < 0.01 and float(error.abs().max()) < 0.06  # 0.003, 0.025
    assert float((sampled["is_mean"] - exact["eap"]).abs().max()) < 0.1             # 0.045


def test_varimax_recovers_a_rotated_simple_structure():
    truth = simple_structure(12, 3) * np.linspace(0.8, 2.0, 12)[:, None]
    angle = 0.6
    c, s = math.cos(angle), math.sin(angle)
    spin = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.array([[1, 0, 0], [0, c, -s],
                                                                     [0, s, c]])
    rotated, t = varimax(truth @ spin)
    assert np.allclose(t @ t.T, np.eye(3), atol=1e-10)
    assert np.allclose((truth @ spin) @ t, rotated)
    # up to the order and sign of the factors, the simple structure comes back
    match = np.abs(rotated.T @ truth) / np.outer(np.linalg.norm(rotated, axis=0),
                                                  np.linalg.norm(truth, axis=0))
    assert np.allclose(np.sort(match.max(1)), 1.0, atol=1e-6)


def test_q_matrix_files_are_read_by_id_and_errors_name_the_problem(tmp_path):
    ids = ["q1", "q2", "q3"]
    f = tmp_path / "Q.csv"
    f.write_text("item,verbal,math\nq3,0,1\nq1,1,0\nq2,1,1\n")
    assert read_q_matrix(f, ids).tolist() == [[1, 0], [1, 1], [0, 1]]   # reordered by id
    f.write_text("1,0\n1,1\n0,1\n")
    assert read_q_matrix(f, ids, dims=2).tolist() == [[1, 0], [1, 1], [0, 1]]

    def error(text: str, dims: int | None = None) -> str:
        f.write_text(text)
        with pytest.raises(SetupError) as e:
            read_q_matrix(f, ids, dims)
        return str(e.value)

    assert "line 2, column 1: '2' is not 0 or 1" in error("1,0\n2,1\n0,1\n", dims=2)
    assert "line 3, column 2: 'x' is not 0 or 1" in error("item,a,b\nq1,1,0\nq2,x,1\nq3,0,1\n")
    assert "line 3: item 'q3' loads on no factor" in error("1,0\n1,1\n0,0\n")
    assert "2 item rows, the response table has 3" in error("1,0\n1,1\n")
    assert "4 factor columns, but --dims is 2" in error("1,0,0,1\n1,1,0,1\n0,1,1,1\n", dims=2)
    assert "not in the Q-matrix: ['q3']" in error("item,a,b\nq1,1,0\nq2,0,1\nqx,1,1\n")
    assert "factor column 2 has no item" in error("1,0\n1,0\n1,0\n")
    assert "line 2: 3 columns" in error("1,0\n1,0,1\n1,0\n")


def test_train_writes_tables_and_reloads(tmp_path):
    q = simple_structure(8, 2)
    d = simulate(400, q, np.array([[1.0, 0.4], [0.4, 1.0]]), missing=0.1, seed=7)
    exam = write_wide(tmp_path / "exam.csv", d["responses"], d["mask"])
    qfile = tmp_path / "Q.csv"
    qfile.write_text("\n".join(",".join(map(str, row)) for row in q) + "\n")
    run = ppl_vae.train("irt-2pl", tmp_path / "run", {"responses": str(exam), "dims": 2,
                                                      "q_matrix": str(qfile),
                                                      "posterior_samples": 100},
                        epochs=40, progress=False)
    assert run.spec.correlated and run.spec.method == "marginal"
    assert run.spec.loading_pattern == q.tolist()
    folder = tmp_path / "run"
    for name in ("items.csv", "students.csv", "factors.json", "loadings.png",
                 "abilities.png", "loss.png"):
        assert (folder / name).exists(), name
    items = read_rows(folder / "items.csv")
    assert [r["item"] for r in items] == [f"q{t + 1}" for t in range(8)]
    assert float(items[0]["a2"]) == 0.0 and float(items[0]["a1"]) > 0.3
    assert float(items[0]["a1_sd"]) > 0.0                         # Laplace sds
    students = read_rows(folder / "students.csv")
    assert len(students) == 400 and "theta2_sd" in students[0]
    factors = json.loads((folder / "factors.json").read_text())
    assert 0.0 < factors["correlation"][0][1] < 0.8 and factors["correlation_sd"][0][1] > 0
    loaded = ppl_vae.load_run(folder)
    result = loaded.family.evaluate(loaded)
    assert result["dims"] == 2 and -8 * math.log(2) < result["log_likelihood"] < 0
    new = tmp_path / "new.csv"
    new.write_text("student,q1,q2,q5,q6\nhigh,1,1,1,1\nlow,0,0,0,0\n")
    loaded.family.score(loaded, responses=new, out=tmp_path / "scores.csv")
    scores = {r["student"]: r for r in read_rows(tmp_path / "scores.csv")}
    for j in (1, 2):
        assert float(scores["high"][f"theta{j}_mean"]) > float(scores["low"][f"theta{j}_mean"])


def three_factor_exam(folder: Path) -> tuple[Path, Path]:
    """A simulated 300 x 9 exam with a 3-factor simple structure: its CSV and Q-matrix."""
    q = simple_structure(9, 3)
    d = simulate(300, q, seed=8)
    exam = write_wide(folder / "exam.csv", d["responses"], d["mask"])
    qfile = folder / "Q.csv"
    qfile.write_text("item,F1,F2,F3\n" + "".join(
        f"q{t + 1},{','.join(map(str, q[t]))}\n" for t in range(9)))
    return exam, qfile


def test_cli_3d_amortized_and_exploratory_runs(tmp_path):
    exam, qfile = three_factor_exam(tmp_path)
    main(["train", "irt-2pl", "--responses", str(exam), "--dims", "3", "--q-matrix",
          str(qfile), "--no-correlated", "--epochs", "3", "--out", str(tmp_path / "r3"),
          "--no-progress", "--device", "cpu"])
    config = json.loads((tmp_path / "r3" / "config.json").read_text())
    assert config["fit"]["objective"] == "iwae" and config["spec"]["method"] == "amortized"
    assert not config["spec"]["correlated"]
    students = read_rows(tmp_path / "r3" / "students.csv")
    assert "theta3_is_mean" in students[0]
    main(["train", "irt-2pl", "--responses", str(exam), "--dims", "2", "--epochs", "20",
          "--out", str(tmp_path / "x2"), "--no-progress", "--device", "cpu"])
    items = read_rows(tmp_path / "x2" / "items.csv")
    assert float(items[0]["a2"]) == 0.0 and "a2_varimax" in items[0]   # lower-triangular
    with pytest.raises(SetupError, match="--correlated needs a Q-matrix"):
        ppl_vae.train("irt-2pl", tmp_path / "bad", {"responses": str(exam), "dims": 2,
                                                    "correlated": True})
    with pytest.raises(SetupError, match="marginal integrates abilities by quadrature up to 2"):
        ppl_vae.train("irt-2pl", tmp_path / "bad", {"responses": str(exam), "dims": 3,
                                                    "method": "marginal"})
    with pytest.raises(SetupError, match="available for irt-2pl"):
        ppl_vae.train("irt-1pl", tmp_path / "bad", {"responses": str(exam), "dims": 2})


def test_a_collapsed_factor_of_an_amortized_fit_is_detected(tmp_path):
    """The fit check of 3+ dimensional (encoder) runs: a factor on which the encoder gives
    every student the same value is named; a trained run passes."""
    exam, qfile = three_factor_exam(tmp_path)
    run = ppl_vae.train("irt-2pl", tmp_path / "r3", {"responses": str(exam), "dims": 3,
                                                     "q_matrix": str(qfile)},
                        epochs=10, progress=False)
    assert run.family.check_fit(run) is None
    loc = run.guide.local.encoder.loc
    with torch.no_grad():
        loc.weight[1].zero_()     # factor 2: one value for every student
    assert "collapsed on factor 2" in run.family.check_fit(run)
