"""Marginal exam models (ability integrated out by quadrature) against exact answers:
brute-force integrals, the cumulative-logit definition, masking, recovery, published MML
estimates (LSAT6, R ltm), exact abilities and the Laplace approximation's curvature."""

from __future__ import annotations

import csv
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyro.poutine as poutine
import pytest
import torch
from scipy import integrate, optimize

from ppl_vae import fit, load_run
from ppl_vae.cli.main import main
from ppl_vae.data.irt import write_wide
from ppl_vae.models.irt_marginal import (
    MarginalIRT,
    check_responses,
    item_estimates,
    item_table,
    laplace_approximation,
    make_guide,
    simulate,
)

LSAT6 = Path(__file__).resolve().parents[1] / "ppl_vae" / "data" / "lsat6.csv"  # bundled
# R ltm 2PL marginal maximum likelihood on LSAT6 (21 Gauss-Hermite nodes; girth and mirt agree
# to 0.005): discrimination a and difficulty b of items 1-5
LTM_A = [0.825, 0.723, 0.890, 0.689, 0.657]
LTM_B = [-3.360, -1.370, -0.280, -1.866, -3.124]

KINDS = {"2pl": ([2, 2, 2, 2], None), "1pl": ([2, 2, 2, 2], 1.0),
         "grm": ([4, 4, 4, 4], None), "mixed": ([2, 5, 3, 2], None)}


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(np.corrcoef(a.numpy(), b.numpy())[0, 1])


def exam(kind: str, n: int = 12, missing: float = 0.25, seed: int = 0):
    """A small simulated exam and its model; item parameters in float64."""
    cats, fixed = KINDS[kind]
    d = simulate(n, cats, missing=missing, fixed_discrimination=fixed, seed=seed)
    items = {"discrimination": d["discrimination"].double(),
             "thresholds": d["thresholds"].double()}
    return d, items, cats


def category_probability(theta: float, a: float, b: np.ndarray, k: int) -> float:
    """P(y = k) by the definition P(y >= k) - P(y >= k + 1), cumulative logits."""
    def at_least(j: int) -> float:
        if j == 0:
            return 1.0
        if j > len(b):
            return 0.0
        return 1.0 / (1.0 + math.exp(-a * (theta - b[j - 1])))
    return at_least(k) - at_least(k + 1)


def brute_posterior(y, mask, items, cats, probability=None, parameter="thresholds"):
    """Unnormalized posterior density of one student's ability, N(0, 1) prior; answers'
    ``probability(theta, a, item's parameter row, k)`` (default: the graded model's)."""
    probability = probability or category_probability
    a, th = items["discrimination"].numpy(), items[parameter].numpy()

    def density(theta: float) -> float:
        p = math.exp(-0.5 * theta ** 2) / math.sqrt(2 * math.pi)
        for t, k in enumerate(cats):
            if mask[t]:
                p *= probability(theta, a[t], th[t, :k - 1], int(y[t]))
        return p
    return density


def brute_log_marginal(y, mask, items, cats) -> float:
    value, _ = integrate.quad(brute_posterior(y, mask, items, cats), -12, 12, epsabs=0,
                              epsrel=1e-12, limit=200, points=[0.0])
    return math.log(value)


@pytest.mark.parametrize("kind", list(KINDS))
def test_log_marginal_of_each_student_equals_the_integral(kind):
    d, items, cats = exam(kind)
    model = MarginalIRT(len(cats), cats, num_nodes=61)
    got = model.log_marginal(d["responses"].double(), d["mask"], items)
    for s in range(6):
        expected = brute_log_marginal(d["responses"][s], d["mask"][s], items, cats)
        assert float(got[s]) == pytest.approx(expected, abs=1e-6)


def test_model_log_joint_is_the_summed_marginal_and_minibatches_scale_to_it():
    """The Pyro program: the factor site holds sum_s log p(y_s | items) (the brute-force
    integral), and a minibatch of B of N students counts N/B times."""
    d, items, cats = exam("mixed", n=20)
    model = MarginalIRT(len(cats), cats, num_nodes=61)
    latents = {"log_discrimination": items["discrimination"].log(),
               "difficulty": items["thresholds"][:, 0]}
    th = items["thresholds"]
    gaps = [th[t, k + 1] - th[t, k] for t, c in enumerate(cats) for k in range(c - 2)]
    latents["log_threshold_gaps"] = torch.stack(gaps).log()
    for name, value in model.item_parameters(latents).items():  # the sites rebuild the items
        assert torch.allclose(torch.nan_to_num(value * (items[name] == items[name])),
                              torch.nan_to_num(items[name]), atol=1e-12)
    y = d["responses"].double()
    expected = sum(brute_log_marginal(y[s], d["mask"][s], items, cats) for s in range(len(y)))
    assert_responses_factor(model, latents, y, d["mask"], expected, abs_tol=1e-5)


def assert_responses_factor(model, latents, y, mask, expected: float, abs_tol: float) -> None:
    """The model conditioned on the item ``latents`` scores the answers at ``expected`` (its
    ``responses`` factor: the log marginal likelihood, nats), and minibatches of 5 students
    with ``size``/``subsample`` add up to it after Pyro's N/B scaling."""
    def factor(rows=None):
        args = (y, mask) if rows is None else (y[rows], mask[rows])
        kwargs = {} if rows is None else {"size": len(y), "subsample": rows}
        trace = poutine.trace(poutine.condition(model, data=latents)).get_trace(*args, **kwargs)
        trace.compute_log_prob()
        return float(trace.nodes["responses"]["log_prob_sum"])

    assert factor() == pytest.approx(expected, abs=abs_tol)
    rows = torch.arange(len(y)).split(5)
    parts = sum(factor(r) for r in rows)
    assert parts / (len(y) / 5) == pytest.approx(expected, abs=abs_tol)


def test_graded_probabilities_follow_the_cumulative_logits_and_sum_to_one():
    d, items, cats = exam("mixed")
    assert_category_probabilities(MarginalIRT(len(cats), cats), items, cats, "thresholds",
                                  category_probability)


def assert_category_probabilities(model, items, cats, steps: str, reference) -> None:
    """The model's P(category c | theta) for every item t equals the scalar formula
    ``reference(theta, a_t, steps_t, c)`` on a grid of abilities, and sums to one."""
    theta = torch.linspace(-4, 4, 9, dtype=torch.float64)
    p = model.category_log_probs(theta, items).exp()  # (T, I, Kmax)
    for t, k in enumerate(cats):
        assert torch.allclose(p[:, t, :k].sum(-1), torch.ones(9, dtype=torch.float64))
        for i, th in enumerate(theta.tolist()):
            for c in range(k):
                expected = reference(th, float(items["discrimination"][t]),
                                     items[steps][t, :k - 1].numpy(), c)
                assert float(p[i, t, c]) == pytest.approx(expected, abs=1e-12)


def test_masked_answers_change_nothing_and_fully_masked_students_contribute_zero():
    d, items, cats = exam("mixed", n=30)
    model = MarginalIRT(len(cats), cats)
    y, mask = d["responses"].double(), d["mask"].clone()
    mask[0] = False
    base = model.log_marginal(y, mask, items)
    scrambled = torch.where(mask, y, torch.randint_like(y, 0, 5))  # any code where masked
    assert torch.equal(model.log_marginal(scrambled, mask, items), base)
    assert float(base[0]) == pytest.approx(0.0, abs=1e-12)
    # dropping an item's column for the students who did not answer it changes nothing
    keep = mask[:, 1]
    reduced = MarginalIRT(len(cats) - 1, cats[:1] + cats[2:])
    sub_items = {k: torch.cat([v[:1], v[2:]]) for k, v in items.items()}
    sub_items["thresholds"] = sub_items["thresholds"][:, :reduced.max_categories - 1]
    sub = reduced.log_marginal(torch.cat([y[:, :1], y[:, 2:]], 1)[~keep],
                               torch.cat([mask[:, :1], mask[:, 2:]], 1)[~keep], sub_items)
    assert torch.allclose(sub, base[~keep], atol=1e-12)


def test_item_draws_in_a_leading_dimension_give_one_marginal_per_draw():
    d, items, cats = exam("grm", n=8)
    model = MarginalIRT(len(cats), cats)
    draws = {k: torch.stack([v, v * 1.1]) for k, v in items.items()}
    both = model.log_marginal(d["responses"].double(), d["mask"], draws)
    assert both.shape == (2, 8)
    second = {k: v[1] for k, v in draws.items()}
    assert torch.allclose(both[1], model.log_marginal(d["responses"].double(), d["mask"],
                                                      second))


def test_abilities_equal_the_brute_force_posterior_mean_sd_and_mode():
    d, items, cats = exam("mixed", n=10, missing=0.0)
    model = MarginalIRT(len(cats), cats)
    got = model.abilities(d["responses"], d["mask"], items, num_nodes=61)
    for s in range(5):
        density = brute_posterior(d["responses"][s], d["mask"][s], items, cats)
        z = integrate.quad(density, -12, 12, epsabs=0, epsrel=1e-12, limit=200)[0]
        mean = integrate.quad(lambda t, f=density: t * f(t), -12, 12, epsabs=0,
                              epsrel=1e-12, limit=200)[0] / z
        second = integrate.quad(lambda t, f=density: t * t * f(t), -12, 12, epsabs=0,
                                epsrel=1e-12, limit=200)[0] / z
        mode = optimize.minimize_scalar(lambda t, f=density: -math.log(f(t)), bounds=(-8, 8),
                                        method="bounded", options={"xatol": 1e-10}).x
        assert float(got["eap"][s]) == pytest.approx(mean, abs=1e-6)
        assert float(got["sd"][s]) == pytest.approx(math.sqrt(second - mean ** 2), abs=1e-6)
        assert float(got["map"][s]) == pytest.approx(mode, abs=1e-6)
        assert float(got["log_marginal"][s]) == pytest.approx(math.log(z), abs=1e-6)


def test_marginal_map_recovers_simulated_2pl_items():
    d = simulate(2000, [2] * 10, seed=1)
    model = MarginalIRT(10)
    guide = make_guide(model, d["responses"], d["mask"], "delta")
    fit(model, guide, (d["responses"], d["mask"]), epochs=40, batch_size=500, lr=0.05,
        lr_schedule="cosine", progress=False, device="cpu")
    est = item_estimates(model, guide, d["responses"], d["mask"])
    assert corr(est["discrimination"], d["discrimination"]) > 0.9
    assert corr(est["thresholds"][:, 0], d["thresholds"][:, 0]) > 0.98
    # EAP abilities given the estimated items track the ones given the true items
    eap = model.abilities(d["responses"], d["mask"], est)["eap"]
    best = model.abilities(d["responses"], d["mask"], {k: d[k] for k in
                                                       ("discrimination", "thresholds")})["eap"]
    assert corr(eap.float(), best.float()) > 0.995


def test_marginal_map_recovers_graded_thresholds():
    cats = [4] * 6 + [2] * 2
    d = simulate(1500, cats, missing=0.2, seed=2)
    model = MarginalIRT(len(cats), cats)
    guide = make_guide(model, d["responses"], d["mask"])
    fit(model, guide, (d["responses"], d["mask"]), epochs=40, batch_size=500, lr=0.05,
        lr_schedule="cosine", progress=False, device="cpu")
    est = item_estimates(model, guide, d["responses"], d["mask"])
    valid = ~torch.isnan(d["thresholds"])
    assert corr(est["thresholds"][valid], d["thresholds"][valid]) > 0.98
    assert corr(est["discrimination"], d["discrimination"]) > 0.9
    assert bool((est["thresholds"][:6].diff(dim=-1) > 0).all())  # ordered


def test_flat_prior_modes_match_published_mml_estimates_on_lsat6():
    if not LSAT6.exists():
        pytest.skip("shared LSAT data not present")
    table = pd.read_csv(LSAT6)
    y = torch.tensor(table.iloc[:, 1:].to_numpy(), dtype=torch.float32)
    mask = torch.ones_like(y, dtype=torch.bool)
    model = MarginalIRT(5, priors="flat")
    guide = make_guide(model, y, mask)
    fit(model, guide, (y, mask), epochs=300, batch_size=1000, lr=0.05, lr_schedule="cosine",
        progress=False, device="cpu")
    est = item_estimates(model, guide, y, mask)
    assert np.abs(est["discrimination"].numpy() - LTM_A).max() < 0.05
    assert np.abs(est["thresholds"][:, 0].numpy() - LTM_B).max() < 0.05


def test_laplace_item_table_has_the_inverse_hessian_spread():
    """Laplace approximation at the marginal MAP: the item table's sds equal the square roots
    of the inverse Hessian of the log posterior (written out here without Pyro)."""
    d = simulate(400, [2] * 4, seed=3)
    y, mask = d["responses"], d["mask"]
    model = MarginalIRT(4)
    guide = make_guide(model, y, mask)
    fit(model, guide, (y, mask), epochs=200, batch_size=400, lr=0.05, lr_schedule="cosine",
        progress=False, device="cpu")
    laplace = laplace_approximation(model, guide, y, mask)
    table = item_table(model, laplace, y, mask, num_samples=20000)
    mode = item_estimates(model, guide, y, mask)
    assert table["parameter"].tolist() == ["a", "b"] * 4

    def neg_log_post(flat: torch.Tensor) -> torch.Tensor:
        log_a, b = flat[:4], flat[4:]
        items = {"discrimination": log_a.exp(), "thresholds": b.unsqueeze(-1)}
        prior = -0.5 * (log_a / 0.5) ** 2 - 0.5 * (b / 2.0) ** 2
        return -(model.log_marginal(y.double(), mask, items).sum() + prior.sum())

    at = torch.cat([mode["discrimination"].double().log(), mode["thresholds"][:, 0].double()])
    grad = torch.autograd.functional.jacobian(neg_log_post, at)
    assert float(grad.abs().max()) < 0.05  # the MAP
    cov = torch.linalg.inv(torch.autograd.functional.hessian(neg_log_post, at))
    sd_b = cov.diagonal()[4:].sqrt()
    sd_a = mode["discrimination"].double() * cov.diagonal()[:4].sqrt()  # delta method
    rows = table.set_index(["item", "parameter"])
    for t in range(4):
        b_row, a_row = rows.loc[(f"item{t + 1}", "b")], rows.loc[(f"item{t + 1}", "a")]
        assert b_row["sd"] == pytest.approx(float(sd_b[t]), rel=0.05)
        assert a_row["sd"] == pytest.approx(float(sd_a[t]), rel=0.1)
        assert b_row["mode"] == pytest.approx(float(mode["thresholds"][t, 0]), abs=1e-6)
        assert b_row["lower"] < b_row["mode"] < b_row["upper"]


def test_rasch_has_no_discrimination_site_and_bad_codes_are_named():
    model = MarginalIRT(3, fixed_discrimination=1.0)
    assert model.latent_sites == ("difficulty",)
    trace = poutine.trace(model).get_trace(torch.zeros(4, 3), torch.ones(4, 3, dtype=torch.bool))
    assert "log_discrimination" not in trace.nodes
    y = torch.tensor([[0.0, 1.0, 2.0], [1.0, 0.0, 1.0]])
    with pytest.raises(ValueError, match="row 0, item 2: value 2.0"):
        check_responses(y, None, [2, 2, 2])
    check_responses(y, torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool), 2)
    check_responses(y, None, [2, 2, 3])


def test_full_rank_guide_trained_by_svi_matches_the_laplace_posterior():
    """AutoMultivariateNormal over the item sites through the engine: with 400 students the
    posterior is close to Gaussian, so its sds agree with the Laplace approximation's."""
    d = simulate(400, [2] * 3 + [3], seed=4)
    y, mask = d["responses"], d["mask"]
    model = MarginalIRT(4, [2, 2, 2, 3])
    point = make_guide(model, y, mask)
    fit(model, point, (y, mask), epochs=200, batch_size=400, lr=0.05, lr_schedule="cosine",
        progress=False, device="cpu")
    laplace = item_table(model, laplace_approximation(model, point, y, mask), y, mask,
                         num_samples=20000)
    mvn = make_guide(model, y, mask, "mvn")
    fit(model, mvn, (y, mask), epochs=1500, batch_size=400, lr=0.01, lr_schedule="cosine",
        num_particles=1, progress=False, device="cpu")
    svi = item_table(model, mvn, y, mask, num_samples=20000)
    assert np.allclose(svi["mean"], laplace["mean"], atol=0.5 * laplace["sd"].max())
    ratio = svi["sd"] / laplace["sd"]
    assert ratio.between(0.7, 1.3).all(), ratio.tolist()


# ---- the exam family through the CLI and the run API (marginal method, the default) --------

def read_rows(path: Path) -> list[dict]:
    return list(csv.DictReader(open(path)))


@pytest.mark.filterwarnings("ignore:.*answered all their items")
def test_cli_defaults_on_bundled_lsat6_give_the_mml_item_modes(tmp_path):
    run = tmp_path / "lsat6"
    main(["train", "irt-2pl", "--responses", "lsat6", "--out", str(run), "--no-progress",
          "--device", "cpu"])
    rows = read_rows(run / "items.csv")
    assert [r["item"] for r in rows] == [f"item{t}" for t in range(1, 6)]
    a = np.array([float(r["discrimination_mode"]) for r in rows])
    b = np.array([float(r["difficulty_mode"]) for r in rows])
    assert np.abs(a - LTM_A).max() < 0.05 and np.abs(b - LTM_B).max() < 0.05
    for r in rows:  # mode beside mean, sd and the 90% interval
        assert float(r["difficulty_5%"]) < float(r["difficulty_mode"]) \
            < float(r["difficulty_95%"])
        assert float(r["discrimination_sd"]) > 0
    for name in ("students.csv", "icc.png", "information.png", "difficulties.png",
                 "abilities.png", "responses.pt"):
        assert (run / name).exists(), name
    assert len(read_rows(run / "students.csv")) == 1000


def test_same_seed_gives_bit_identical_metrics(tmp_path):
    d = simulate(200, [2] * 6, missing=0.1, seed=4)
    data = write_wide(tmp_path / "exam.csv", d["responses"], d["mask"])

    def metrics(name: str, *flags: str) -> list[list[str]]:
        main(["train", "irt-2pl", "--responses", str(data), "--out", str(tmp_path / name),
              "--epochs", "3", "--batch-size", "64", "--seed", "7", "--no-progress",
              "--posterior-samples", "50", "--device", "cpu", *flags])
        rows = list(csv.reader(open(tmp_path / name / "metrics.csv")))
        keep = [j for j, column in enumerate(rows[0]) if column != "seconds"]  # wall clock
        return [[row[j] for j in keep] for row in rows]

    assert metrics("m1") == metrics("m2")
    assert metrics("a1", "--method", "amortized") == metrics("a2", "--method", "amortized")


def test_run_keeps_its_answers_reloads_evaluates_and_scores_after_the_file_moved(tmp_path):
    d = simulate(300, [2] * 6, missing=0.2, seed=5)
    data = write_wide(tmp_path / "exam.csv", d["responses"], d["mask"])
    run = tmp_path / "run"
    main(["train", "irt-1pl", "--responses", str(data), "--out", str(run), "--epochs", "30",
          "--no-progress", "--posterior-samples", "100", "--device", "cpu"])
    shutil.move(data, tmp_path / "elsewhere.csv")
    loaded = load_run(run)
    assert loaded.spec.method == "marginal" and loaded.checkpoint.name == "checkpoint.pt"
    result = loaded.family.evaluate(loaded, iwae_samples=10)
    assert result["students"] == 300 and -6 * math.log(2) < result["log_likelihood"] < 0
    # the abilities of students.csv are the quadrature EAPs given the reloaded items
    written = torch.tensor([float(r["ability_mean"]) for r in read_rows(run / "students.csv")])
    est = item_estimates(loaded.model, loaded.guide, d["responses"], d["mask"])
    eap = loaded.model.abilities(d["responses"], d["mask"], est)["eap"]
    assert torch.allclose(eap.float(), written.float(), atol=1e-5)
    new = tmp_path / "new.csv"
    new.write_text("student,q3,q1,q2\nhigh,1,1,1\nlow,0,0,0\n")
    out = loaded.family.score(loaded, responses=new, out=tmp_path / "scores.csv")
    assert out["scored"] == 2
    scores = {r["student"]: r for r in read_rows(tmp_path / "scores.csv")}
    assert float(scores["high"]["ability_mean"]) > float(scores["low"]["ability_mean"]) + 0.5
    # posterior checks of the item posterior (Laplace at the marginal MAP), from the run's copy
    checked = loaded.family.check(loaded, samples=100, khat_samples=100)
    assert checked["pareto_k_is"] == "k-hat of the global latents" and checked["pareto_k"] < 0.7
    assert (run / "posterior.nc").exists() and (run / "check.json").exists()


def test_graded_response_model_trains_from_the_cli(tmp_path):
    cats = [4, 4, 3, 2]
    d = simulate(400, cats, missing=0.1, seed=6)
    data = write_wide(tmp_path / "graded.csv", d["responses"], d["mask"])
    run = tmp_path / "grm"
    main(["train", "irt-grm", "--responses", str(data), "--out", str(run), "--epochs", "40",
          "--no-progress", "--posterior-samples", "100", "--device", "cpu"])
    loaded = load_run(run)
    assert loaded.spec.categories == cats
    rows = {r["item"]: r for r in read_rows(run / "items.csv")}
    assert float(rows["q1"]["threshold1_mode"]) < float(rows["q1"]["threshold3_mode"])
    assert rows["q4"]["difficulty_mode"] != ""
    assert (run / "icc.png").exists() and (run / "information.png").exists()
    with pytest.raises(ValueError, match="marginal method only"):
        main(["train", "irt-grm", "--method", "amortized", "--responses", str(data),
              "--out", str(tmp_path / "x"), "--no-progress"])


# ---- (generalized) partial credit models -----------------------------------------------------

def partial_credit_exam(cats, n: int = 12, missing: float = 0.25, seed: int = 0,
                        fixed: float | None = None):
    """A small simulated partial credit exam; item parameters in float64."""
    d = simulate(n, cats, missing=missing, fixed_discrimination=fixed, seed=seed,
                 response_model="partial_credit")
    return d, {"discrimination": d["discrimination"].double(), "steps": d["steps"].double()}


def partial_credit_probability(theta: float, a: float, steps: np.ndarray, k: int) -> float:
    """P(y = k) by the definition: exp(sum_{j<=k} a (theta - b_j)) over its sum over k."""
    numerators = [math.exp(sum(a * (theta - b) for b in steps[:j]))
                  for j in range(len(steps) + 1)]
    return numerators[k] / sum(numerators)


def test_partial_credit_probabilities_follow_the_definition_and_binary_items_are_the_2pl():
    cats = [2, 5, 3, 2]
    d, items = partial_credit_exam(cats)
    assert_category_probabilities(MarginalIRT(len(cats), cats, response_model="partial_credit"),
                                  items, cats, "steps", partial_credit_probability)
    theta = torch.linspace(-4, 4, 9, dtype=torch.float64)
    # an exam of binary items: the same log-likelihood as the graded model's (the 2PL)
    binary = {"discrimination": items["discrimination"], "thresholds": items["steps"][:, :1]}
    pcm2 = MarginalIRT(len(cats), 2, response_model="partial_credit")
    grm2 = MarginalIRT(len(cats), 2)
    y = d["responses"].clamp(max=1.0).double()
    got = pcm2.log_marginal(y, d["mask"], {"discrimination": binary["discrimination"],
                                           "steps": binary["thresholds"]})
    assert torch.allclose(got, grm2.log_marginal(y, d["mask"], binary), rtol=0, atol=1e-12)
    assert torch.allclose(pcm2.category_log_probs(theta, {"discrimination": binary[
        "discrimination"], "steps": binary["thresholds"]}), grm2.category_log_probs(
        theta, binary), rtol=0, atol=1e-12)


def test_partial_credit_log_marginal_and_abilities_equal_brute_force_integrals():
    cats = [2, 5, 3, 4]
    d, items = partial_credit_exam(cats, n=10, missing=0.2, seed=3)
    model = MarginalIRT(len(cats), cats, response_model="partial_credit", num_nodes=61)
    log_marginal = model.log_marginal(d["responses"].double(), d["mask"], items)
    got = model.abilities(d["responses"], d["mask"], items, num_nodes=61)
    for s in range(5):
        density = brute_posterior(d["responses"][s], d["mask"][s], items, cats,
                                  partial_credit_probability, "steps")

        def moment(power: int, f=density) -> float:
            return integrate.quad(lambda t: t ** power * f(t), -12, 12, epsabs=0,
                                  epsrel=1e-12, limit=200, points=[0.0])[0]
        z = moment(0)
        mean = moment(1) / z
        mode = optimize.minimize_scalar(lambda t, f=density: -math.log(f(t)), bounds=(-8, 8),
                                        method="bounded", options={"xatol": 1e-10}).x
        assert float(log_marginal[s]) == pytest.approx(math.log(z), abs=1e-6)
        assert float(got["eap"][s]) == pytest.approx(mean, abs=1e-6)
        assert float(got["sd"][s]) == pytest.approx(math.sqrt(moment(2) / z - mean ** 2),
                                                    abs=1e-6)
        assert float(got["map"][s]) == pytest.approx(mode, abs=1e-6)


def test_partial_credit_program_rebuilds_its_steps_and_scales_minibatches():
    """The Pyro program's sites: ``step_difficulty`` (G,) fills the padded (item, step)
    slots in item order; the factor is the summed marginal, a minibatch counts N/B times."""
    cats = [2, 4, 3]
    d, items = partial_credit_exam(cats, n=20)
    model = MarginalIRT(len(cats), cats, response_model="partial_credit")
    assert model.latent_sites == ("log_discrimination", "step_difficulty")
    steps = items["steps"]
    latents = {"log_discrimination": items["discrimination"].log(),
               "step_difficulty": steps[~torch.isnan(steps)]}
    assert latents["step_difficulty"].shape == (1 + 3 + 2,)
    rebuilt = model.item_parameters(latents)
    assert torch.equal(rebuilt["steps"][~torch.isnan(steps)], latents["step_difficulty"])
    y = d["responses"].double()
    trace = poutine.trace(poutine.condition(model, data=latents)).get_trace(y, d["mask"])
    assert trace.nodes["step_difficulty"]["value"].shape == (6,)
    expected = float(model.log_marginal(y, d["mask"], rebuilt).sum())
    assert_responses_factor(model, latents, y, d["mask"], expected, abs_tol=1e-9)


def test_marginal_map_recovers_simulated_gpcm_items():
    d = simulate(2000, [4] * 10, seed=1, response_model="partial_credit")
    model = MarginalIRT(10, 4, response_model="partial_credit")
    guide = make_guide(model, d["responses"], d["mask"])
    fit(model, guide, (d["responses"], d["mask"]), epochs=40, batch_size=500, lr=0.05,
        lr_schedule="cosine", progress=False, device="cpu")
    est = item_estimates(model, guide, d["responses"], d["mask"])
    assert corr(est["discrimination"], d["discrimination"]) > 0.97
    assert corr(est["steps"].flatten(), d["steps"].flatten()) > 0.98
    reversed_pairs = d["steps"].diff(dim=-1) < 0  # disordered steps come out disordered
    assert bool(reversed_pairs.any())
    assert bool(((est["steps"].diff(dim=-1) < 0) == reversed_pairs).float().mean() > 0.85)


def test_partial_credit_model_fixes_every_discrimination_to_one():
    cats = [3, 3, 4, 2, 3, 4]
    d, _ = partial_credit_exam(cats, n=1500, missing=0.1, seed=5, fixed=1.0)
    model = MarginalIRT(len(cats), cats, fixed_discrimination=1.0,
                        response_model="partial_credit")
    assert model.latent_sites == ("step_difficulty",)
    trace = poutine.trace(model).get_trace(d["responses"][:4], d["mask"][:4])
    assert "log_discrimination" not in trace.nodes and "difficulty" not in trace.nodes
    guide = make_guide(model, d["responses"], d["mask"])
    fit(model, guide, (d["responses"], d["mask"]), epochs=30, batch_size=500, lr=0.05,
        lr_schedule="cosine", progress=False, device="cpu")
    est = item_estimates(model, guide, d["responses"], d["mask"])
    assert torch.equal(est["discrimination"], torch.ones(len(cats)))
    valid = ~torch.isnan(d["steps"])
    assert corr(est["steps"][valid], d["steps"][valid]) > 0.98
    table = item_table(model, guide, d["responses"], d["mask"], num_samples=10)
    assert "a" not in set(table["parameter"])
    assert table.loc[table["item"] == "item3", "parameter"].tolist() == \
        ["step1", "step2", "step3"]
    assert table.loc[table["item"] == "item4", "parameter"].tolist() == ["b"]


def test_gpcm_trains_from_the_cli_reloads_scores_and_refuses_bad_codes(tmp_path):
    cats = [4, 4, 3, 2]
    d = simulate(300, cats, missing=0.1, seed=6, response_model="partial_credit")
    data = write_wide(tmp_path / "gpcm.csv", d["responses"], d["mask"])
    run = tmp_path / "gpcm"
    main(["train", "irt-gpcm", "--responses", str(data), "--out", str(run), "--epochs", "20",
          "--no-progress", "--posterior-samples", "50", "--device", "cpu"])
    loaded = load_run(run)
    assert loaded.spec.categories == cats and loaded.spec.method == "marginal"
    assert loaded.model.response_model == "partial_credit"
    rows = {r["item"]: r for r in read_rows(run / "items.csv")}
    assert {"discrimination_mode", "step1_mode", "step3_sd", "step3_95%"} <= set(rows["q1"])
    assert rows["q1"]["step3_mode"] != "" and rows["q3"]["step3_mode"] == ""
    assert rows["q4"]["difficulty_mode"] != ""  # a binary item: its 2PL difficulty
    est = item_estimates(loaded.model, loaded.guide, d["responses"], d["mask"])
    assert float(rows["q2"]["step2_mode"]) == pytest.approx(float(est["steps"][1, 1]),
                                                            abs=1e-5)
    written = torch.tensor([float(r["ability_mean"]) for r in read_rows(run / "students.csv")])
    eap = loaded.model.abilities(d["responses"], d["mask"], est)["eap"]
    assert torch.allclose(eap.float(), written, atol=1e-5)
    result = loaded.family.evaluate(loaded)
    assert result["students"] == 300 and result["log_likelihood"] < 0
    new = tmp_path / "new.csv"
    new.write_text("student,q1,q2,q3,q4\nhigh,3,3,2,1\nlow,0,0,0,0\n")
    assert loaded.family.score(loaded, responses=new, out=tmp_path / "s.csv")["scored"] == 2
    scores = {r["student"]: r for r in read_rows(tmp_path / "s.csv")}
    assert float(scores["high"]["ability_mean"]) > float(scores["low"]["ability_mean"]) + 1
    new.write_text("student,q1,q2,q3,q4\nhigh,3,3,2,1\nlow,0,0,3,0\n")  # q3 has codes 0..2
    with pytest.raises(ValueError, match=r"new\.csv: line 3, column 'q3': value 3 is not a "
                                         r"category code 0\.\.2"):
        loaded.family.score(loaded, responses=new, out=tmp_path / "s.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("student,q1,q2\na,1,2\nb,1.5,0\n")
    with pytest.raises(ValueError, match=r"line 3, column 'q1': value '1.5'"):
        main(["train", "irt-pcm", "--responses", str(bad), "--out", str(tmp_path / "x"),
              "--no-progress"])
    with pytest.raises(ValueError, match="irt-gpcm is fitted by the marginal method only"):
        main(["train", "irt-gpcm", "--method", "amortized", "--responses", str(data),
              "--out", str(tmp_path / "y"), "--no-progress"])


def test_pcm_run_through_the_python_api_has_no_discrimination_columns(tmp_path):
    import ppl_vae

    d = simulate(200, [3, 3, 3], seed=7, fixed_discrimination=1.0,
                 response_model="partial_credit")
    data = write_wide(tmp_path / "pcm.csv", d["responses"], d["mask"])
    run = ppl_vae.train("irt-pcm", tmp_path / "pcm", {"responses": str(data),
                                                      "posterior_samples": 20},
                        epochs=5, progress=False, device="cpu")
    rows = read_rows(tmp_path / "pcm" / "items.csv")
    assert [r["item"] for r in rows] == ["q1", "q2", "q3"]
    assert not any(k.startswith("discrimination") for k in rows[0])
    assert float(rows[0]["step1_sd"]) > 0  # the Laplace posterior
    assert load_run(run.path).model.fixed_discrimination == 1.0


@pytest.mark.parametrize("response_model", ["graded", "partial_credit"])
def test_log_marginal_stays_finite_at_draws_from_the_flat_priors(response_model):
    """The engine traces the model once at prior draws before training: with flat priors a
    threshold gap can vanish against its threshold in float32, which must not give -inf
    log-probabilities (0 * -inf = NaN in the counts product)."""
    import pyro

    d = simulate(200, [5] * 20, missing=0.1, seed=1, response_model=response_model)
    model = MarginalIRT(20, 5, priors="flat", response_model=response_model)
    for seed in range(20):
        pyro.set_rng_seed(seed)
        items = model.sample_items()
        assert bool(torch.isfinite(model.log_marginal(d["responses"], d["mask"], items)).all())


def graded_run(tmp_path: Path, cats: list[int], n: int = 200) -> Path:
    """A small irt-grm run (a few epochs) on a simulated exam with items q1, q2, ..."""
    d = simulate(n, cats, seed=7)
    data = write_wide(tmp_path / "graded.csv", d["responses"], d["mask"])
    run = tmp_path / "grm"
    main(["train", "irt-grm", "--responses", str(data), "--out", str(run), "--epochs", "5",
          "--no-progress", "--posterior-samples", "20", "--device", "cpu"])
    return run


def test_check_of_a_graded_run_counts_total_scores_up_to_the_top_codes(tmp_path):
    """'ppl-vae check' crashed on every graded run: the total-score statistic assumed totals
    0..I (binary items); graded totals run to sum_t (K_t - 1)."""
    run = graded_run(tmp_path, [4, 3, 2])
    main(["check", str(run), "--samples", "20", "--khat-samples", "20",
          "--sbc-simulations", "0"])
    rows = read_rows(run / "ppc.csv")
    totals = [r for r in rows if r["check"].startswith("share of students per total")]
    assert [int(r["statistic"]) for r in totals] == list(range(3 + 2 + 1 + 1))
    assert sum(float(r["observed"]) for r in totals) == pytest.approx(1.0)
    means = [r for r in rows if r["check"] == "mean code per item"]
    assert len(means) == 3 and 0 <= float(means[0]["observed"]) <= 3


def test_score_of_a_graded_run_names_file_line_and_item_of_a_bad_code(tmp_path):
    """The error said 'row 0, item 1' (0-based positions, no file)."""
    run = graded_run(tmp_path, [3, 3])
    new = tmp_path / "new.csv"
    new.write_text("student,q2,q1\nann,1,0\nbob,3,1\n")
    with pytest.raises(ValueError, match=r"new\.csv: line 3, column 'q2': value 3 is not a "
                                         r"category code 0\.\.2"):
        main(["score", str(run), "--responses", str(new), "--out", str(tmp_path / "s.csv")])
    long = tmp_path / "new_long.csv"
    long.write_text("student,item,response\nann,q1,0\nbob,q1,7\n")
    with pytest.raises(ValueError, match=r"new_long\.csv: student 'bob', item 'q1': value 7"):
        main(["score", str(run), "--responses", str(long), "--out", str(tmp_path / "s.csv")])
