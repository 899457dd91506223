"""Exam models on the shared engine: likelihoods, masking, recovery, guides, CLI."""

from __future__ import annotations

import csv
import math
import sys

import numpy as np
import pyro
import pyro.poutine as poutine
import pytest
import torch

from ppl_vae import SetupError, elbo, fit, load_run, log_likelihood
from ppl_vae.cli.main import main
from ppl_vae.data.irt import write_wide
from ppl_vae.models.irt import (
    IRT,
    ability_posterior,
    build_irt,
    inference_data,
    posterior_samples,
    quadrature_abilities,
    simulate,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*answered all their items")


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(np.corrcoef(a.numpy(), b.numpy())[0, 1])


def log_lik(model: IRT, values: dict, responses, mask) -> float:
    """log p(responses | latent values) from a conditioned model trace."""
    trace = poutine.trace(poutine.condition(model, data=values)).get_trace(responses, mask)
    trace.compute_log_prob()
    return float(trace.nodes["responses"]["log_prob_sum"])


@pytest.mark.parametrize("kind", ["lecture", "1pl", "2pl", "3pl"])
def test_likelihood_matches_formula_and_ignores_masked_answers(kind):
    theta = torch.tensor([-1.0, 0.5])
    items = {"beta": torch.tensor([0.5, 2.0, 1.0]), "difficulty": torch.tensor([0., 1., -2.]),
             "discrimination": torch.tensor([1.5, 0.7, 1.0]),
             "guessing": torch.tensor([0.2, 0.1, 0.3])}
    model = IRT(3, kind)
    values = {"ability": theta, **{k: items[k] for k in model.item_sites}}
    if kind == "lecture":
        values["ability_mean"] = torch.tensor(0.0)
    y = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    mask = torch.tensor([[True, True, False], [True, False, True]])
    # the formulas, written out
    if kind == "lecture":
        p = torch.sigmoid(theta[:, None] * items["beta"])
    else:
        a = items["discrimination"] if kind in ("2pl", "3pl") else torch.ones(3)
        p = torch.sigmoid(a * (theta[:, None] - items["difficulty"]))
        if kind == "3pl":
            p = items["guessing"] + (1 - items["guessing"]) * p
    expected = float((y * p.log() + (1 - y) * (1 - p).log())[mask].sum())
    assert log_lik(model, values, y, mask) == pytest.approx(expected, abs=1e-5)
    # what sits in a masked cell does not matter: it is not imputed, it is left out
    y2 = y.clone()
    y2[~mask] = 1 - y2[~mask]
    assert log_lik(model, values, y2, mask) == pytest.approx(expected, abs=1e-5)


def test_student_plate_scales_minibatch_to_the_whole_exam():
    """A minibatch of B students out of N counts N/B times (the engine's plate convention),
    so the item parameters see an unbiased full-data likelihood."""
    d = simulate(40, 6, "2pl", seed=3)
    model = IRT(6, "2pl")
    values = {"ability": d["ability"], "difficulty": d["difficulty"],
              "discrimination": d["discrimination"]}
    full = log_lik(model, values, d["responses"], d["mask"])
    idx = torch.arange(40)
    total = 0.0
    for part in idx.split(10):
        trace = poutine.trace(poutine.condition(model, data={**values, "ability":
                                                             d["ability"][part]})).get_trace(
            d["responses"][part], d["mask"][part], size=40, subsample=part)
        trace.compute_log_prob()
        total += float(trace.nodes["responses"]["log_prob_sum"])
    assert total / 4 == pytest.approx(full, rel=1e-5)  # each of 4 parts scaled by 40/10


@pytest.mark.parametrize("guide", ["amortized", "meanfield"])
def test_2pl_recovers_simulated_abilities_and_items(guide):
    d = simulate(500, 20, "2pl", missing=0.3, seed=0)
    model, q = build_irt({"kind": "2pl", "num_items": 20, "guide": guide})
    history = fit(model, q, (d["responses"], d["mask"]), epochs=60, batch_size=100, lr=0.05,
                  lr_schedule="cosine", progress=False, device="cpu")
    assert history["train_elbo"][-1] > history["train_elbo"][0] + 1.0
    theta, sd = ability_posterior(q, d["responses"], d["mask"])
    samples = posterior_samples(model, q, d["responses"], d["mask"], num_samples=200)
    # the yardstick: exact posterior means given the TRUE item parameters (quadrature)
    best, best_sd = quadrature_abilities("2pl", {k: d[k] for k in ("difficulty",
                                                                  "discrimination")},
                                         d["responses"], d["mask"])
    assert corr(theta, d["ability"]) > corr(best, d["ability"]) - 0.03
    assert corr(theta, best) > 0.97
    assert corr(samples["difficulty"].mean(0), d["difficulty"]) > 0.95
    assert corr(samples["discrimination"].mean(0), d["discrimination"]) > 0.6
    assert float(sd.mean()) == pytest.approx(float(best_sd.mean()), rel=0.25)
    # students with fewer answers get wider posteriors
    few = d["mask"].sum(1) <= 11
    assert float(sd[few].mean()) > float(sd[~few].mean())


def test_jit_objective_with_an_autonormal_guide():
    """Pyro's default global param store: JitTrace_ELBO trains an AutoNormal guide. With
    module_local_params=True its parameters stay in the module, where JitTrace_ELBO cannot
    see them: the run stops before its first step and says which objective to use."""
    sim = simulate(64, 5, seed=0)
    data = (sim["responses"], sim["mask"])
    model, guide = build_irt({"kind": "2pl", "num_items": 5})
    history = fit(model, guide, data, epochs=3, batch_size=32, objective="jit", lr=0.05,
                  progress=False, device="cpu")
    assert all(math.isfinite(v) for v in history["train_elbo"])
    pyro.settings.set(module_local_params=True)
    try:
        model, guide = build_irt({"kind": "2pl", "num_items": 5})
        with pytest.raises(SetupError, match="objective='jit'.*PyroModule.*use objective='trace'"):
            fit(model, guide, data, epochs=1, batch_size=32, objective="jit", progress=False,
                device="cpu")
    finally:
        pyro.settings.set(module_local_params=False)


def test_3pl_and_lecture_and_hierarchical_train():
    d = simulate(300, 12, "3pl", seed=1)
    for spec in ({"kind": "3pl"}, {"kind": "lecture"}, {"kind": "2pl", "hierarchical": True}):
        model, q = build_irt({**spec, "num_items": 12, "guide": "amortized"})
        h = fit(model, q, (d["responses"], d["mask"]), epochs=15, batch_size=100, lr=0.05,
                progress=False, device="cpu")
        assert h["train_elbo"][-1] > h["train_elbo"][0], spec
        # population sites (outside both plates) broadcast right under the particle plate
        torch.manual_seed(0)
        ll = log_likelihood(model, q, (d["responses"], d["mask"]), num_samples=20,
                            progress=False, device="cpu")
        el = elbo(model, q, (d["responses"], d["mask"]), num_particles=20, progress=False,
                  device="cpu")
        assert el - 0.05 <= ll < 0, spec
        assert ll > h["train_elbo"][-1] - 1.0, spec
        samples = posterior_samples(model, q, d["responses"], d["mask"], num_samples=50)
        if spec["kind"] == "3pl":
            assert bool(((samples["guessing"] > 0) & (samples["guessing"] < 1)).all())
        if spec["kind"] == "lecture":
            assert bool((samples["beta"] > 0).all()) and "ability_mean" in samples
        if spec.get("hierarchical"):
            assert samples["difficulty_sd"].shape == (50,)
            assert bool((samples["difficulty_sd"] > 0).all())


def test_dims_declare_every_latent_site_with_its_shape():
    """Issue 6's ArviZ export relies on IRT.dims: names and plate sizes must match."""
    d = simulate(7, 4, "3pl", seed=0)
    for kind in ("lecture", "1pl", "2pl", "3pl"):
        model = IRT(4, kind, hierarchical=kind != "lecture")
        trace = poutine.trace(model).get_trace(d["responses"], d["mask"])
        latent = {n: s["value"].shape for n, s in trace.nodes.items()
                  if s["type"] == "sample" and not s["is_observed"]
                  and not n.startswith(("data", "items"))}
        assert set(latent) == set(model.site_dims)
        sizes = {"student": 7, "item": 4}
        for name, dims in model.site_dims.items():
            assert tuple(latent[name]) == tuple(sizes[x] for x in dims), (kind, name)


def test_amortized_guide_memory_is_flat_in_students_and_meanfield_is_not():
    def count(n: int, guide: str) -> int:
        pyro.clear_param_store()
        d = simulate(n, 10, "2pl", seed=0)
        model, q = build_irt({"kind": "2pl", "num_items": 10, "guide": guide})
        q(d["responses"], d["mask"])
        return sum(p.numel() for p in q.parameters())

    assert count(50, "amortized") == count(500, "amortized")
    assert count(500, "meanfield") - count(50, "meanfield") == 2 * 450


def test_cli_train_evaluate_score_and_reload(tmp_path, capsys):
    d = simulate(300, 8, "2pl", missing=0.2, seed=2)
    data = tmp_path / "exam.csv"
    write_wide(data, d["responses"], d["mask"])
    run = tmp_path / "run"
    main(["train", "irt-2pl", "--method", "amortized", "--responses", str(data), "--epochs",
          "100", "--out", str(run), "--no-progress", "--posterior-samples", "100",
          "--device", "cpu"])
    for name in ("config.json", "checkpoint.pt", "metrics.csv", "items.csv", "students.csv",
                 "icc.png", "information.png", "difficulties.png", "abilities.png"):
        assert (run / name).exists(), name
    items = list(csv.DictReader(open(run / "items.csv")))
    assert [r["item"] for r in items] == [f"q{j}" for j in range(1, 9)]
    b = torch.tensor([float(r["difficulty_mean"]) for r in items])
    assert corr(b, d["difficulty"]) > 0.9
    for r in items:
        assert float(r["difficulty_5%"]) < float(r["difficulty_mean"]) \
            < float(r["difficulty_95%"])
    students = list(csv.DictReader(open(run / "students.csv")))
    assert len(students) == 300 and students[0]["student"] == "s0"

    capsys.readouterr()
    main(["evaluate", str(run), "--iwae-samples", "50", "--device", "cpu"])
    figures = dict(line.split(": ") for line in capsys.readouterr().out.strip().splitlines())
    assert -8 * math.log(2) < float(figures["elbo"]) <= float(figures["log_likelihood"]) + 0.05
    assert float(figures["log_likelihood"]) < 0

    # reload: the same abilities as written at the end of training
    mean, _ = ability_posterior(load_run(run).guide, d["responses"], d["mask"])
    written = torch.tensor([float(r["ability_mean"]) for r in students])
    assert torch.allclose(mean, written, atol=1e-4)

    # score new students: a subset of items, in another order; more right -> higher ability
    new = tmp_path / "new.csv"
    new.write_text("student,q3,q1,q2\nhigh,1,1,1\nlow,0,0,0\n")
    main(["score", str(run), "--responses", str(new), "--out", str(tmp_path / "scores.csv"),
          "--device", "cpu"])
    scores = {r["student"]: r for r in csv.DictReader(open(tmp_path / "scores.csv"))}
    assert float(scores["high"]["ability_mean"]) > float(scores["low"]["ability_mean"]) + 0.5
    assert float(scores["high"]["ability_sd"]) > 0
    # the encoder's one-pass scores agree with the exact posterior given the items
    for row in students[:50]:
        assert abs(float(row["ability_mean"]) - float(row["ability_exact_mean"])) < 0.25


def test_cli_rejects_bad_file_before_training_and_meanfield_score(tmp_path, monkeypatch,
                                                                 capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("student,q1,q2\na,1,0\nb,1,x\n")
    with pytest.raises(ValueError, match=r"bad\.csv: line 3, column 'q2': value 'x'"):
        main(["train", "irt-1pl", "--responses", str(bad), "--epochs", "1",
              "--out", str(tmp_path / "r"), "--no-progress"])
    assert not (tmp_path / "r" / "config.json").exists()  # nothing of a run written
    # the ppl-vae command prints the same message as one line, exit status 2, no traceback
    from ppl_vae.cli.main import run

    monkeypatch.setattr(sys, "argv", ["ppl-vae", "train", "irt-1pl", "--responses", str(bad),
                                      "--out", str(tmp_path / "r"), "--no-progress"])
    monkeypatch.delenv("PPL_VAE_DEBUG", raising=False)
    assert run() == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {bad}: line 3, column 'q2': value 'x' is not 0, 1 or blank")

    d = simulate(60, 5, "1pl", seed=0)
    data = tmp_path / "ok.csv"
    write_wide(data, d["responses"], d["mask"])
    run = tmp_path / "mf"
    main(["train", "irt-1pl", "--guide", "meanfield", "--responses", str(data), "--epochs", "2",
          "--out", str(run), "--no-progress", "--posterior-samples", "20", "--device", "cpu"])
    with pytest.raises(ValueError, match="needs a marginal or an amortized run"):
        main(["score", str(run), "--responses", str(data), "--out", str(tmp_path / "s.csv")])


def test_posterior_goes_to_arviz_with_student_and_item_dims():
    az = pytest.importorskip("arviz")
    d = simulate(30, 4, "2pl", seed=0)
    model, q = build_irt({"kind": "2pl", "num_items": 4, "guide": "meanfield"})
    fit(model, q, (d["responses"], d["mask"]), epochs=2, batch_size=10, progress=False,
        device="cpu")
    idata = inference_data(model, q, d["responses"], d["mask"], num_samples=40,
                           item_ids=list("abcd"))
    post = idata.posterior
    assert post["ability"].dims == ("chain", "draw", "student")
    assert post["difficulty"].shape == (1, 40, 4) and list(post["item"].values) == list("abcd")
    summary = az.summary(idata, var_names=["discrimination"], kind="stats")
    assert (summary["mean"] > 0).all()  # LogNormal guide: positive draws only


def exam_file(path, d, rows, id_column: str = "student"):
    """A wide CSV of the simulated exam ``d``'s students ``rows``, ids in ``id_column``."""
    n = d["responses"].shape[1]
    with open(path, "w") as f:
        f.write(id_column + "," + ",".join(f"q{j}" for j in range(n)) + "\n")
        for s in rows:
            cells = [str(int(v)) if m else "" for v, m in zip(d["responses"][s], d["mask"][s])]
            f.write(f"id{s}," + ",".join(cells) + "\n")
    return path


def test_score_reads_new_files_in_the_runs_layout(tmp_path):
    """A run trained with --id-column could not score new students in the same layout: the
    id column was read as an item. --id-column / --format on score replace the run's."""
    d = simulate(200, 5, "1pl", seed=1)
    train = exam_file(tmp_path / "train.csv", d, range(150), "StudentID")
    run = tmp_path / "run"
    main(["train", "irt-1pl", "--responses", str(train), "--id-column", "StudentID", "--out",
          str(run), "--epochs", "5", "--no-progress", "--posterior-samples", "20"])
    new = exam_file(tmp_path / "new.csv", d, range(150, 200), "StudentID")
    main(["score", str(run), "--responses", str(new), "--out", str(tmp_path / "s.csv")])
    scores = list(csv.DictReader(open(tmp_path / "s.csv")))
    assert [r["student"] for r in scores] == [f"id{s}" for s in range(150, 200)]
    other = exam_file(tmp_path / "other.csv", d, range(150, 160), "pupil")
    main(["score", str(run), "--responses", str(other), "--id-column", "pupil", "--out",
          str(tmp_path / "o.csv")])
    assert [float(r["ability_mean"]) for r in csv.DictReader(open(tmp_path / "o.csv"))] == \
        pytest.approx([float(r["ability_mean"]) for r in scores[:10]], abs=1e-6)
    long = tmp_path / "long.txt"  # no .csv: --format long, not the run's wide
    long.write_text("student,item,response\nzed,q0,1\nzed,q1,0\n")
    main(["score", str(run), "--responses", str(long), "--format", "long", "--out",
          str(tmp_path / "l.csv")])
    assert next(csv.DictReader(open(tmp_path / "l.csv")))["answered"] == "2"


def test_amortized_score_gives_a_student_with_no_answers_the_prior(tmp_path):
    """The encoder never saw an empty row: it gave such a student ability sd 0.7, not 1."""
    d = simulate(200, 6, "2pl", seed=4)
    data = tmp_path / "exam.csv"
    write_wide(data, d["responses"], d["mask"])
    run = tmp_path / "run"
    main(["train", "irt-2pl", "--method", "amortized", "--responses", str(data), "--epochs",
          "5", "--out", str(run), "--no-progress", "--posterior-samples", "20"])
    new = tmp_path / "new.csv"
    new.write_text("student,q1,q2,q3,q4,q5,q6\nnobody,,,,,,\nann,1,1,1,,,\n")
    main(["score", str(run), "--responses", str(new), "--out", str(tmp_path / "s.csv")])
    rows = {r["student"]: r for r in csv.DictReader(open(tmp_path / "s.csv"))}
    assert float(rows["nobody"]["ability_mean"]) == 0.0
    assert float(rows["nobody"]["ability_sd"]) == 1.0
    assert float(rows["nobody"]["ability_exact_sd"]) == pytest.approx(1.0, abs=1e-4)
    assert float(rows["ann"]["ability_sd"]) < 1.0  # answered students keep the encoder's
