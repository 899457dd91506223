"""The VAE end to end through the CLI and the real Fashion-MNIST loader (tiny idx files)."""

from __future__ import annotations

import csv
import json

import pytest
import torch

import ppl_vae
from ppl_vae.cli.main import main
from ppl_vae.data.images import load_fashion_mnist, validate_images


def test_train_evaluate_sample(fashion_dir, tmp_path, capsys):
    run = tmp_path / "run"
    main(["train", "vae", "--latent-dim", "2", "--hidden", "32", "--epochs", "3",
          "--limit", "300", "--batch-size", "50", "--lr", "3e-3", "--data", str(fashion_dir),
          "--out", str(run), "--no-progress", "--device", "cpu"])
    config = json.loads((run / "config.json").read_text())
    assert config["model"] == "vae" and config["spec"]["binarize"] == "dynamic"
    assert config["spec"]["val_size"] == 30 and config["fit"]["epochs"] == 3
    for name in ("checkpoint.pt", "best.pt", "metrics.csv", "loss.png", "reconstructions.png",
                 "samples.png", "latent_scatter.png", "latent_grid.png"):
        assert (run / name).stat().st_size > 0, name
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert len(rows) == 3 and float(rows[-1]["train_elbo"]) > float(rows[0]["train_elbo"])
    capsys.readouterr()

    main(["evaluate", str(run), "--iwae-samples", "50", "--device", "cpu"])
    lines = dict(line.split(": ") for line in capsys.readouterr().out.strip().splitlines())
    elbo, ll = float(lines["elbo"]), float(lines["log_likelihood"])
    assert -784 * 0.7 < elbo < 0 and ll >= elbo - 0.5  # IS estimate sits above the ELBO

    main(["sample", str(run), "--n", "16", "--device", "cpu"])
    assert (run / "samples_16.png").exists()

    main(["train", "vae", "--latent-dim", "2", "--hidden", "32", "--epochs", "4",
          "--limit", "300", "--batch-size", "50", "--data", str(fashion_dir),
          "--out", str(run), "--no-progress", "--device", "cpu", "--resume", "--lr", "3e-3"])
    assert len(list(csv.DictReader(open(run / "metrics.csv")))) == 4


def test_resume_with_a_different_model_is_refused(fashion_dir, tmp_path):
    run = tmp_path / "run"
    args = ["train", "vae", "--hidden", "8", "--epochs", "1", "--limit", "100",
            "--data", str(fashion_dir), "--out", str(run), "--no-progress"]
    main(args)
    with pytest.raises(ValueError, match="different model spec"):
        main(args[:-1] + ["--resume", "--latent-dim", "5", "--no-progress"])


def _metrics_without_time(run) -> list[str]:
    lines = (run / "metrics.csv").read_text().splitlines()
    keep = [i for i, name in enumerate(lines[0].split(",")) if name != "seconds"]
    return [",".join(line.split(",")[i] for i in keep) for line in lines]


def test_the_same_seed_gives_the_same_run_from_the_cli_and_from_python(fashion_dir, tmp_path):
    """Two CLI trainings with the same --seed give bit-identical metrics.csv (the seed fixes
    the initial weights too), ppl_vae.train with the same spec and seed gives the same run,
    and another seed another run."""
    args = ["train", "vae", "--latent-dim", "2", "--hidden", "16", "--epochs", "2", "--limit",
            "120", "--batch-size", "40", "--data", str(fashion_dir), "--no-progress",
            "--device", "cpu", "--seed", "5"]
    main(args + ["--out", str(tmp_path / "a")])
    main(args + ["--out", str(tmp_path / "b")])
    spec = {"latent_dim": 2, "hidden": [16], "limit": 120, "data": str(fashion_dir)}
    run = ppl_vae.train("vae", tmp_path / "python", spec, epochs=2, batch_size=40, seed=5,
                        device="cpu", progress=False)
    main(args[:-1] + ["6", "--out", str(tmp_path / "c")])
    first = _metrics_without_time(tmp_path / "a")
    assert first == _metrics_without_time(tmp_path / "b")
    assert first == _metrics_without_time(tmp_path / "python")
    assert first != _metrics_without_time(tmp_path / "c")
    assert run.config() == json.loads((tmp_path / "a" / "config.json").read_text())


def test_a_run_is_a_library_object(fashion_dir, tmp_path):
    """What the CLI prints, Python gets from the reloaded run and its family."""
    run = ppl_vae.train("vae", tmp_path / "run", {"latent_dim": 3, "hidden": [16], "limit": 100,
                                                  "data": str(fashion_dir)},
                        epochs=1, device="cpu", progress=False)
    again = ppl_vae.load_run(tmp_path / "run")
    assert again.checkpoint.name == "best.pt" and again.spec == run.spec
    assert again.data("train").shape == (100, 28, 28) and again.data("val").shape == (10, 28, 28)
    result = again.family.evaluate(again, iwae_samples=5, limit=20)
    assert result["test_images"] == 20 and result["log_likelihood"] >= result["elbo"] - 1.0
    assert json.loads((tmp_path / "run" / "evaluation.json").read_text()) == result
    with pytest.raises(ValueError, match="--label needs a conditional model"):
        again.family.sample(again, label=3)


def test_spec_errors_name_the_field():
    family = ppl_vae.family_of("vae")
    with pytest.raises(ValueError, match="needs likelihood bernoulli"):
        family.make_spec("vae", likelihood="gaussian", binarize="sample")
    with pytest.raises(ValueError, match="Bernoulli likelihood needs binary pixels"):
        family.make_spec("vae", binarize="none")
    with pytest.raises(ValueError, match="val_size"):
        family.make_spec("vae", val_size=0)
    spec = family.make_spec("vae", likelihood="gaussian", limit=59_000)
    assert spec.binarize == "none" and spec.val_size == 5900 and spec.limit == 54_100


def test_commands_on_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(ValueError, match="not a ppl-vae run folder"):
        main(["evaluate", str(tmp_path)])


def test_loader_reads_idx_and_reports_missing_data(fashion_dir, tmp_path):
    x, y = load_fashion_mnist(fashion_dir, "test", limit=10, binarize="threshold")
    assert x.shape == (10, 28, 28) and y.dtype == torch.int64
    assert set(x.unique().tolist()) <= {0.0, 1.0}
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_fashion_mnist(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    import ppl_vae.data.images as images

    old = images.DEBIAN_DIR, images.CACHE_DIR
    images.DEBIAN_DIR, images.CACHE_DIR = empty, empty
    try:
        with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
            load_fashion_mnist(empty)
    finally:
        images.DEBIAN_DIR, images.CACHE_DIR = old


def test_image_validation_names_the_problem():
    x = torch.rand(4, 28, 28)
    x[2, 5, 6] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or inf at image 2, pixel \(5, 6\)"):
        validate_images(x)
    with pytest.raises(ValueError, match=r"shape \(N, H, W\)"):
        validate_images(torch.rand(4, 784))
    with pytest.raises(ValueError, match="outside \\[0, 1\\] at image 0"):
        validate_images(torch.full((1, 2, 2), 255.0))
    with pytest.raises(ValueError, match="needs binary pixels"):
        validate_images(torch.full((1, 2, 2), 0.5), binary=True)
    with pytest.raises(ValueError, match="floating point"):
        validate_images(torch.zeros(1, 2, 2, dtype=torch.uint8))


@pytest.mark.parametrize("value", ["-5", "0"])
def test_check_refuses_a_non_positive_khat_samples(value, capsys):
    """--khat-samples -5 ended in a torch traceback and 0 fell back to 500 draws: both are
    refused as flag errors (an ``error:`` line, exit status 2)."""
    with pytest.raises(SystemExit) as stop:
        main(["check", "some-run", "--khat-samples", value])
    assert stop.value.code == 2
    assert f"error: argument --khat-samples: must be >= 1, got {int(value)}" in (
        capsys.readouterr().err)


def test_resume_takes_spec_flags_not_given_from_the_run(fashion_dir, tmp_path):
    """`train vae --resume --epochs N --out RUN` without the first start's --limit, --data ...
    used to be refused ('different model spec: limit (100, None)'): argparse's defaults
    counted as changes. Only flags on the command line do, and the error names both."""
    run = tmp_path / "run"
    main(["train", "vae", "--hidden", "8", "--latent-dim", "3", "--epochs", "1", "--limit",
          "100", "--data", str(fashion_dir), "--out", str(run), "--no-progress"])
    spec = json.loads((run / "config.json").read_text())["spec"]
    (run / "evaluation.json").write_text("{}")  # `evaluate` of the 1-epoch model
    main(["train", "vae", "--resume", "--epochs", "2", "--out", str(run), "--no-progress"])
    assert json.loads((run / "config.json").read_text())["spec"] == spec
    assert not (run / "evaluation.json").exists()  # stale once more epochs are trained
    assert len(list(csv.DictReader(open(run / "metrics.csv")))) == 2
    with pytest.raises(ValueError, match=r"limit \(run: 100, given: 150\)"):
        main(["train", "vae", "--resume", "--epochs", "3", "--limit", "150", "--out", str(run),
              "--no-progress"])


@pytest.mark.parametrize("flags", [["--latent-dim", "0"], ["--batch-size", "0"],
                                   ["--data", "MISSING"], ["--resume"]])
def test_a_failed_start_removes_the_run_folder_it_created(fashion_dir, tmp_path, flags):
    """A start that fails before writing anything leaves no empty --out folder behind."""
    flags = [str(tmp_path / "missing") if f == "MISSING" else f for f in flags]
    data = [] if "--data" in flags else ["--data", str(fashion_dir)]
    with pytest.raises((ValueError, OSError)):  # `ppl-vae`: one error line, status 2
        main(["train", "vae", "--limit", "100", "--epochs", "1", "--no-progress", *data,
              *flags, "--out", str(tmp_path / "runs" / "y2")])
    assert not (tmp_path / "runs").exists()


def test_help_texts_describe_the_choices_each_family_takes(capsys):
    """--binarize help described choices a family refuses (cvae: 'none', ssvae: 'dynamic',
    'none'); prodlda's --corpus help left out the corpus names; --khat-samples its default."""
    import argparse
    import re

    from ppl_vae.cli.main import build_parser

    def option(parser: argparse.ArgumentParser, flag: str) -> argparse.Action:
        return next(a for a in parser._actions if flag in a.option_strings)

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    models = next(a for a in sub.choices["train"]._actions
                  if isinstance(a, argparse._SubParsersAction)).choices
    for name in ("vae", "cvae", "ssvae"):
        action = option(models[name], "--binarize")
        described = set(re.findall(r"(?:^|; )(\w+): ", action.help))
        assert described == set(action.choices), (name, action.help)
    for name in ("prodlda", "lda"):
        text = option(models[name], "--corpus").help
        assert all(corpus in text for corpus in ("bbc_news", "m10", "dblp", "20ng")), text
    assert "default 1000" in option(sub.choices["check"], "--khat-samples").help


def test_a_misspelt_corpus_name_lists_the_names(tmp_path):
    with pytest.raises(ValueError, match=r"not a corpus name \(bbc_news, m10, dblp, 20ng\); "
                                         r"did you mean 'bbc_news'"):
        main(["train", "prodlda", "--corpus", "bbc_nws", "--out", str(tmp_path / "run"),
              "--no-progress"])
    assert not (tmp_path / "run").exists()
