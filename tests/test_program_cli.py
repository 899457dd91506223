"""``ppl-vae train program``: a user's own Pyro model file trained, evaluated, checked and
reloaded from the command line, against the exact posterior of a conjugate regression."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
import torch

import ppl_vae
from ppl_vae import SetupError
from ppl_vae.cli.main import main

NOISE = 0.5
REGRESSION = textwrap.dedent("""
    import pyro, pyro.distributions as dist, torch

    def model(x, y):
        w = pyro.sample("w", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        with pyro.plate("data", len(x)):
            pyro.sample("obs", dist.Normal(x @ w, 0.5), obs=y)
""")


@pytest.fixture
def regression(tmp_path):
    """The model file and its data (.pt dict, .npz, .csv), with the exact posterior mean."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(200, 2, generator=generator)
    y = x @ torch.tensor([1.0, -2.0]) + NOISE * torch.randn(200, generator=generator)
    (tmp_path / "model.py").write_text(REGRESSION)
    torch.save({"x": x, "y": y}, tmp_path / "train.pt")
    np.savez(tmp_path / "train.npz", x=x.numpy(), y=y.numpy())
    x64, y64 = x.double(), y.double()
    precision = torch.eye(2, dtype=torch.float64) + x64.T @ x64 / NOISE ** 2
    mean = torch.linalg.solve(precision, x64.T @ y64 / NOISE ** 2)
    return tmp_path, mean


def test_train_evaluate_check_a_users_model_file(regression, capsys):
    folder, exact = regression
    out = folder / "run"
    assert main(["train", "program", "--file", str(folder / "model.py"), "--data",
                 str(folder / "train.pt"), "--out", str(out), "--epochs", "400",
                 "--no-progress"]) == 0
    run = ppl_vae.load_run(out)  # rebuilt from the file, parameters from best.pt
    w = run.guide.median()["w"].double()
    assert torch.allclose(w, exact, atol=0.02)  # posterior sd is about 0.035
    capsys.readouterr()
    assert main(["evaluate", str(out), "--iwae-samples", "200"]) == 0
    printed = dict(line.split(": ") for line in capsys.readouterr().out.strip().splitlines())
    assert printed["data"] == "train" and float(printed["elbo"]) <= float(
        printed["log_likelihood"]) + 0.01
    assert abs(float(printed["log_likelihood"]) - (-0.73)) < 0.1  # log N(e; 0, 0.5^2) ~ -0.73
    assert main(["check", str(out), "--samples", "50", "--khat-samples", "50",
                 "--sbc-simulations", "0"]) == 0
    assert (out / "posterior.nc").exists() and (out / "summary.csv").exists()
    assert json.loads((out / "config.json").read_text())["spec"]["guide"] == ""


def test_autoguide_by_name_npz_and_csv_data(regression):
    folder, exact = regression
    data = np.load(folder / "train.npz")
    np.savetxt(folder / "train.csv", np.c_[data["x"][:, 0], data["y"]], delimiter=",",
               header="x,y", comments="")
    one = textwrap.dedent("""
        import pyro, pyro.distributions as dist

        def slope(x, y):
            w = pyro.sample("w", dist.Normal(0.0, 1.0))
            with pyro.plate("data", len(x)):
                pyro.sample("obs", dist.Normal(w * x, 1.0), obs=y)
    """)
    (folder / "slope.py").write_text(one)
    for file, data_file, guide in (("model.py", "train.npz", "AutoDelta"),
                                  ("slope.py", "train.csv", "AutoNormal")):
        run = ppl_vae.train("program", folder / f"run-{guide}", {
            "file": str(folder / file), "data": str(folder / data_file), "guide": guide,
            "model_name": "model" if file == "model.py" else "slope"}, epochs=300,
            progress=False)
        assert type(run.guide).__name__ == guide
        w = run.guide.median()["w"].double()
        if guide == "AutoDelta":  # MAP = posterior mean for this Gaussian posterior
            assert torch.allclose(w, exact, atol=0.02)
        else:
            assert abs(float(w) - 1.0) < 0.3  # y depends on x[:, 0] with slope 1 (+ noise)


def test_bad_files_are_named_before_training(regression, tmp_path):
    folder, _ = regression
    model = str(folder / "model.py")
    with pytest.raises(SetupError, match="defines no 'modle'.*its own callables: model"):
        ppl_vae.train("program", tmp_path / "a", {"file": model, "model_name": "modle",
                                                  "data": str(folder / "train.pt")})
    with pytest.raises(SetupError, match=r"AutoNormall: not an autoguide.*did you mean "
                                         r"AutoNormal\?"):
        ppl_vae.train("program", tmp_path / "b", {"file": model, "guide": "AutoNormall",
                                                  "data": str(folder / "train.pt")})
    (folder / "bad.csv").write_text("x,y\n1.0,2.0\n3.0,oops\n")
    with pytest.raises(SetupError, match="bad.csv: line 3, column 'y': value 'oops'"):
        ppl_vae.train("program", tmp_path / "c", {"file": model,
                                                  "data": str(folder / "bad.csv")})
    (folder / "broken.py").write_text("import pyro\nraise RuntimeError('typo')\n")
    with pytest.raises(SetupError, match="broken.py: importing it failed.*typo"):
        ppl_vae.train("program", tmp_path / "d", {"file": str(folder / "broken.py"),
                                                  "data": str(folder / "train.pt")})
    assert not any((tmp_path / name).exists() for name in "abcd")  # nothing left behind


def test_a_changed_file_is_named_on_reload(regression):
    folder, _ = regression
    out = folder / "run"
    ppl_vae.train("program", out, {"file": str(folder / "model.py"),
                                   "data": str(folder / "train.pt")}, epochs=5, progress=False)
    (folder / "model.py").write_text(REGRESSION + "\n# edited\n")
    with pytest.warns(UserWarning, match="model.py changed since this run was trained"):
        ppl_vae.load_run(out)


def test_changed_training_data_is_refused_on_resume_and_named_on_reload(regression):
    """A resumed run trains on the rows it was trained on: --data replaced by other rows
    is refused before any step (the run is left as it was); reloading warns."""
    folder, _ = regression
    out = folder / "run"
    ppl_vae.train("program", out, {"file": str(folder / "model.py"),
                                   "data": str(folder / "train.pt")}, epochs=5, progress=False)
    before = (out / "checkpoint.pt").read_bytes()
    data = torch.load(folder / "train.pt", weights_only=True)
    torch.save({"x": data["x"][:100], "y": -data["y"][:100]}, folder / "train.pt")
    with pytest.raises(SetupError, match="train.pt changed since this run was trained.*same rows"):
        main(["train", "program", "--out", str(out), "--epochs", "10", "--resume"])
    assert (out / "checkpoint.pt").read_bytes() == before
    with pytest.warns(UserWarning, match="train.pt changed since this run was trained"):
        ppl_vae.load_run(out)


def test_sibling_modules_resume_and_guide_defaults(tmp_path, regression, monkeypatch):
    """Two folders' "helpers" never stand for each other; a resume takes relative paths and
    refuses a changed file; an object's own guide is its model's default guide."""
    folder, exact = regression
    for name, sign in (("a", ""), ("b", "-")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "helpers.py").write_text(
            f"def design(x):\n    return {sign}x\n")
        (tmp_path / name / "model.py").write_text(REGRESSION.replace(
            "import pyro,", "from helpers import design\nimport pyro,").replace(
            "x @ w", "design(x) @ w"))
    slopes = {}
    for name in ("a", "b"):
        run = ppl_vae.train("program", None, {"file": str(tmp_path / name / "model.py"),
                                              "data": str(folder / "train.pt")},
                            epochs=300, progress=False)
        slopes[name] = run.guide.median()["w"].double()
    assert torch.allclose(slopes["a"], exact, atol=0.03)
    assert torch.allclose(slopes["b"], -exact, atol=0.03)  # its own helpers: x flipped

    out = tmp_path / "run"
    main(["train", "program", "--file", str(folder / "model.py"), "--data",
          str(folder / "train.pt"), "--out", str(out), "--epochs", "20", "--no-progress"])
    monkeypatch.chdir(folder)  # the same files given by relative paths: the same run
    main(["train", "program", "--file", "model.py", "--data", "train.pt", "--out", str(out),
          "--epochs", "30", "--resume", "--no-progress"])
    assert len(ppl_vae.load_run(out).history) == 30
    (folder / "model.py").write_text(REGRESSION + "\n# edited\n")
    with pytest.raises(SetupError, match="changed since this run was trained.*--resume needs"):
        main(["train", "program", "--out", str(out), "--epochs", "40", "--resume"])

    (tmp_path / "vae.py").write_text(textwrap.dedent("""
        import pyro, pyro.distributions as dist, torch

        class Regression:
            def model(self, x, y):
                w = pyro.sample("w", dist.Normal(torch.zeros(2), 1.0).to_event(1))
                with pyro.plate("data", len(x)):
                    pyro.sample("obs", dist.Normal(x @ w, 0.5), obs=y)

            def guide(self, x, y):
                loc = pyro.param("loc", torch.zeros(2))
                pyro.sample("w", dist.Delta(loc).to_event(1))

        fit = Regression()
    """))
    run = ppl_vae.train("program", None, {"file": str(tmp_path / "vae.py"), "model_name":
                                          "fit.model", "data": str(folder / "train.pt")},
                        epochs=300, progress=False)
    assert run.guide.__name__ == "guide"  # fit.guide, not an AutoNormal


def test_test_rows_need_a_guide_for_new_rows_and_csv_nan_is_named(tmp_path):
    per_row = textwrap.dedent("""
        import pyro, pyro.distributions as dist

        def model(x):
            mu = pyro.sample("mu", dist.Normal(0.0, 3.0))
            with pyro.plate("data", len(x)):
                z = pyro.sample("z", dist.Normal(mu, 1.0))
                pyro.sample("obs", dist.Normal(z, 0.5), obs=x)
    """)
    (tmp_path / "model.py").write_text(per_row)
    torch.save(torch.randn(40), tmp_path / "train.pt")
    torch.save(torch.randn(40), tmp_path / "test.pt")
    out = tmp_path / "run"
    ppl_vae.train("program", out, {"file": str(tmp_path / "model.py"), "data": str(
        tmp_path / "train.pt"), "test_data": str(tmp_path / "test.pt")}, epochs=5,
        progress=False)
    with pytest.raises(SetupError, match="--test-data rows have no parameters of their own.*z"):
        main(["evaluate", str(out)])
    (tmp_path / "nan.csv").write_text("x\n1.0\nnan\n")
    with pytest.raises(SetupError, match="nan.csv: line 3, column 'x': value 'nan' is not a "
                                         "finite number"):
        ppl_vae.train("program", tmp_path / "r2", {"file": str(tmp_path / "model.py"),
                                                   "data": str(tmp_path / "nan.csv")})


def test_two_loaded_runs_each_score_with_their_own_parameters(regression, tmp_path):
    """Pyro's one param store: loading a second run replaced the first's parameters, whose
    elbo then went from -0.65 to -42 with no word."""
    folder, _ = regression
    data = torch.load(folder / "train.pt")
    torch.save({"x": data["x"], "y": -data["y"]}, folder / "flipped.pt")
    runs = []
    for name in ("train.pt", "flipped.pt"):
        out = tmp_path / f"run-{name}"
        ppl_vae.train("program", out, {"file": str(folder / "model.py"),
                                       "data": str(folder / name)}, epochs=300, progress=False)
        runs.append(ppl_vae.load_run(out))
    first, second = runs
    w_first, w_second = first.guide.median()["w"], second.guide.median()["w"]
    assert torch.allclose(w_first, -w_second, atol=0.05)  # each its own, after both loads
    assert ppl_vae.elbo(first.model, first.guide, first.data(), 20) > -1.0


def test_point_mass_guides_get_no_khat_verdict_and_errors_stay_one_line(regression, capsys):
    folder, _ = regression
    out = folder / "map"
    main(["train", "program", "--file", str(folder / "model.py"), "--data",
          str(folder / "train.pt"), "--guide", "AutoDelta", "--epochs", "50", "--out",
          str(out), "--no-progress"])
    capsys.readouterr()
    main(["check", str(out), "--samples", "20", "--khat-samples", "50",
          "--sbc-simulations", "0"])
    printed = capsys.readouterr().out
    assert "k-hat does not apply" in printed and "can be trusted" not in printed

    from ppl_vae.cli.main import _short
    pyro_style = "Expected parameter loc ... found invalid values:\ntensor([nan,\n nan])\nTrace"
    assert _short(pyro_style).count("\n") == 0 and "PPL_VAE_DEBUG=1" in _short(pyro_style)


def test_a_run_keeps_further_training_and_the_users_own_params(regression):
    """Taking the store back must not undo the run's own further training (fit on its model
    and guide), nor delete parameters of the user's that are not the run's."""
    import pyro

    folder, exact = regression
    guide_file = REGRESSION + textwrap.dedent("""
        from torch.distributions import constraints

        def guide(x, y):
            loc = pyro.param("w_loc", torch.zeros(2))
            scale = pyro.param("w_scale", torch.ones(2), constraint=constraints.positive)
            pyro.sample("w", dist.Normal(loc, scale).to_event(1))
    """)
    (folder / "guided.py").write_text(guide_file)
    run = ppl_vae.train("program", None, {"file": str(folder / "guided.py"),
                                          "data": str(folder / "train.pt")}, epochs=5,
                        progress=False)  # far from converged
    model, guide = run.model, run.guide
    ppl_vae.fit(model, guide, run.data(), epochs=1500, batch_size=200, lr=0.03,
                lr_schedule="cosine", progress=False)
    trained = pyro.param("w_loc").detach().clone()
    assert torch.allclose(trained.double(), exact, atol=0.05)
    pyro.param("mine", torch.tensor(3.0))
    ppl_vae.elbo(run.model, run.guide, run.data(), 5)  # the run's model and guide again
    assert torch.equal(pyro.param("w_loc").detach(), trained)  # not put back to epoch 5
    assert float(pyro.param("mine")) == 3.0


def test_a_run_without_a_folder_evaluates_and_says_check_needs_one(regression):
    folder, _ = regression
    run = ppl_vae.train("program", None, {"file": str(folder / "model.py"),
                                          "data": str(folder / "train.pt")}, epochs=20,
                        progress=False)
    assert "elbo" in run.family.evaluate(run, iwae_samples=10)
    with pytest.raises(SetupError, match="this run has none \\(trained with out=None\\)"):
        run.family.check(run, samples=10, khat_samples=10)
