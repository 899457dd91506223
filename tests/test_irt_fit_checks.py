"""Exam fits that collapse or run away are refused, not written as results."""

from __future__ import annotations

import json
import sys

import pytest
import torch

import ppl_vae
from ppl_vae.family import family_of
from ppl_vae.models.irt import simulate

pytestmark = pytest.mark.filterwarnings("ignore:.*answered all their items")


def _write_exam(path, answers: torch.Tensor) -> None:
    rows = ["student," + ",".join(f"q{j}" for j in range(answers.shape[1]))]
    rows += [f"s{s}," + ",".join(str(int(v)) for v in row) for s, row in enumerate(answers)]
    path.write_text("\n".join(rows) + "\n")


@pytest.fixture(scope="module")
def amortized_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fit")
    d = simulate(300, 10, "2pl", seed=0)
    exam = folder / "exam.csv"
    _write_exam(exam, d["responses"])
    ppl_vae.train("irt-2pl", folder / "run", {"responses": str(exam), "method": "amortized"},
                  epochs=60, progress=False)
    return folder


def test_collapsed_encoder_and_runaway_items_are_detected(amortized_run):
    run = ppl_vae.load_run(amortized_run / "run")
    assert run.family.check_fit(run) is None                     # a healthy fit passes
    head = run.guide.local.encoder.head.loc
    with torch.no_grad():                                         # the encoder ignores the
        head.weight.zero_()                                       # answers: one ability
        head.bias.fill_(-0.00015)                                 # for everyone
    assert "ability posterior collapsed" in run.family.check_fit(run)

    run = ppl_vae.load_run(amortized_run / "run")
    loc = dict(run.guide.named_parameters())["globals.locs.discrimination_unconstrained"]
    with torch.no_grad():
        loc.fill_(-4.0)             # log a = -4: a = 0.018 for every item
    assert "items ran away: median discrimination" in run.family.check_fit(run)


def test_a_failed_fit_writes_failed_json_and_no_tables(amortized_run, monkeypatch, capsys):
    family = family_of("irt-2pl")
    monkeypatch.setattr(type(family), "check_fit",
                        lambda self, run: "the ability posterior collapsed (test)")
    out = amortized_run / "failed"
    with pytest.raises(ppl_vae.FitFailed, match="collapsed"):
        ppl_vae.train("irt-2pl", out, {"responses": str(amortized_run / "exam.csv"),
                                        "method": "amortized"}, epochs=2, progress=False)
    assert "collapsed" in json.loads((out / "failed.json").read_text())["failed"]
    assert (out / "checkpoint.pt").exists() and not (out / "items.csv").exists()

    from ppl_vae.cli.main import run

    monkeypatch.setattr(sys, "argv", [
        "ppl-vae", "train", "irt-2pl", "--method", "amortized", "--responses",
        str(amortized_run / "exam.csv"), "--epochs", "2", "--out", str(out), "--overwrite",
        "--no-progress"])
    monkeypatch.delenv("PPL_VAE_DEBUG", raising=False)
    capsys.readouterr()
    assert run() == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        f"error: {out}: the ability posterior collapsed")

    monkeypatch.undo()  # the real check: a good fit clears the old failure
    ppl_vae.train("irt-2pl", out, {"responses": str(amortized_run / "exam.csv"),
                                   "method": "amortized"}, epochs=60, progress=False,
                  overwrite=True)
    assert (out / "items.csv").exists() and not (out / "failed.json").exists()


def test_amortized_settings_follow_the_exam_size():
    family = family_of("irt-2pl")
    small = family.fit_settings(family.Spec(model="irt-2pl", method="amortized",
                                            num_students=2000, num_items=50))
    big = family.fit_settings(family.Spec(model="irt-2pl", method="amortized",
                                          num_students=100_000, num_items=100))
    assert (small["batch_size"], small["epochs"]) == (100, 200)   # 4000 steps
    assert big["batch_size"] == 1000 and big["epochs"] == 40       # 4000 steps, not 200k


def test_encoder_uses_elu_and_older_runs_reload_with_relu():
    """A ReLU encoder at the exam's lr can die in its first epoch (every unit negative for
    every student: one ability for all; seed 17 of benchmarks/irt_collapse.py); new runs
    use ELU, and a config.json from before the field existed still rebuilds its ReLU net."""
    family = family_of("irt-2pl")
    spec = family.Spec(model="irt-2pl", method="amortized", num_items=5, num_students=10)
    _, guide = family.build(spec)
    assert isinstance(guide.local.encoder.body[-1], torch.nn.ELU)
    stored = {k: v for k, v in vars(spec).items() if k != "activation"}
    _, old = family.build(family.spec_from_json(stored))
    assert isinstance(old.local.encoder.body[-1], torch.nn.ReLU)
