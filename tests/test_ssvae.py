"""The semi-supervised VAE M2: its enumerated objective, training with few labels, CLI."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from pyro.infer import Trace_ELBO, TraceEnum_ELBO

import ppl_vae
from ppl_vae import fit
from ppl_vae.cli.main import main
from ppl_vae.models.ssvae import build_ssvae, check_labels, default_alpha, oversample_labelled

C = 4


def _bars(n: int, seed: int = 0):
    """Binary 8x8 images of C classes: class c is a bar over rows 2c, 2c+1, plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, C, (n,), generator=g)
    x = (torch.rand(n, 8, 8, generator=g) < 0.05).float()
    for i, c in enumerate(y.tolist()):
        x[i, 2 * c: 2 * c + 2] = 1.0
    return x, y


def _tiny(alpha: float = 5.0):
    torch.manual_seed(0)
    return build_ssvae(latent_dim=2, hidden=(16,), num_classes=C, alpha=alpha,
                       image_shape=(8, 8))


def _loss(elbo, model, guide, *data, **kwargs):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Trace_ELBO: "y" is not enumerated
        return float(elbo.loss(model, guide, *data, **kwargs))


def test_labelled_rows_count_once_with_the_observed_label():
    """Enumerating y on labelled rows must give the labelled ELBO -L(x, y~) - alpha log q(y~|x)
    (one term, not one per class): compare with plain Monte Carlo, where the guide's point
    mass always draws y~."""
    model, guide = _tiny()
    x, y = _bars(3)
    labelled = torch.ones(3, dtype=torch.bool)
    kw = dict(num_particles=3000, vectorize_particles=True, max_plate_nesting=1)
    enum = _loss(TraceEnum_ELBO(**kw), model, guide, x, y, labelled)
    mc = _loss(Trace_ELBO(**kw), model, guide, x, y, labelled)
    assert enum == pytest.approx(mc, rel=0.01)


def test_unlabelled_rows_sum_y_out_exactly():
    """-U(x) = sum_y q(y|x) [-L(x, y)] + sum_y q(y|x) log q(y|x) for an unlabelled image."""
    model, guide = _tiny()
    x, _ = _bars(1)
    kw = dict(num_particles=3000, vectorize_particles=True, max_plate_nesting=1)
    unlabelled = torch.zeros(1, dtype=torch.bool)
    enum = _loss(TraceEnum_ELBO(**kw), model, guide, x, torch.tensor([-1]), unlabelled)
    model.alpha = 0.0  # the classification term belongs to labelled rows only
    per_class = torch.tensor([_loss(Trace_ELBO(**kw), model, guide, x, torch.tensor([c]),
                                    torch.ones(1, dtype=torch.bool)) for c in range(C)])
    with torch.no_grad():
        q = torch.softmax(model.classifier(x.flatten(-2)), -1)[0]
    expected = float((q * per_class).sum() + (q * q.log()).sum())
    assert enum == pytest.approx(expected, rel=0.01)


def test_oversampled_labels_keep_the_objective():
    """Labelled rows repeated k times with weight 1/k: a share of about one half of the rows,
    and the same full-data loss as the original rows (also as a minibatch estimate)."""
    model, guide = _tiny()
    x, y = _bars(40)
    labelled = torch.zeros(40, dtype=torch.bool)
    labelled[:4] = True
    y = torch.where(labelled, y, torch.full_like(y, -1))
    data = oversample_labelled(x, y, labelled, share=0.5)
    assert len(data[0]) == 36 + 9 * 4 and float(data[2].float().mean()) == 0.5
    assert float(data[3][data[2]].sum()) == pytest.approx(4.0)
    assert oversample_labelled(x, y, labelled, share=0.05)[3].eq(1).all()  # already >= 5%
    kw = dict(num_particles=2000, vectorize_particles=True, max_plate_nesting=1)
    whole = _loss(TraceEnum_ELBO(**kw), model, guide, x, y, labelled)
    assert _loss(TraceEnum_ELBO(**kw), model, guide, *data) == pytest.approx(whole, rel=0.01)
    torch.manual_seed(1)
    batches = [torch.randperm(len(data[0]))[:24] for _ in range(200)]
    estimate = sum(_loss(TraceEnum_ELBO(num_particles=10, vectorize_particles=True,
                                        max_plate_nesting=1), model, guide,
                         *(t[i] for t in data), size=len(data[0]), subsample=i)
                   for i in batches) / len(batches)
    assert estimate == pytest.approx(whole, rel=0.03)


def test_m2_learns_a_classifier_from_few_labels():
    x, y = _bars(300)
    labelled = torch.zeros(300, dtype=torch.bool)
    for c in range(C):
        labelled[(y == c).nonzero()[:3, 0]] = True  # 3 labels per class
    y_in = torch.where(labelled, y, torch.full_like(y, -1))
    model, guide = _tiny(alpha=50.0)
    history = fit(model, guide, (x, y_in, labelled), epochs=8, batch_size=50, lr=1e-2,
                  objective="enum", progress=False, device="cpu")
    assert history["train_elbo"][-1] > history["train_elbo"][0] + 5
    xt, yt = _bars(200, seed=1)
    model.eval()
    assert float((model.predict(xt) == yt).float().mean()) > 0.9  # chance: 0.25


def test_bad_labels_are_refused():
    y = torch.tensor([1, 2, 11, -1])
    labelled = torch.tensor([True, True, True, False])
    with pytest.raises(ValueError, match="row 2 is labelled with 11"):
        check_labels(y, labelled, 10)
    check_labels(y, torch.tensor([True, True, False, False]), 10)  # -1 where unlabelled is fine


def test_the_models_default_alpha_is_the_recommended_rule():
    assert default_alpha(60_000, 1_000) == 500.0  # 5 N / N_labelled = 300, at least 500
    assert default_alpha(60_000, 100) == pytest.approx(3000.0)  # 5 N / N_labelled
    model, _ = build_ssvae(latent_dim=2, hidden=(8,), num_images=60_000, num_labelled=100)
    assert model.alpha == pytest.approx(3000.0)
    with pytest.raises(ValueError, match="give alpha, or num_images and num_labelled"):
        build_ssvae(latent_dim=2, hidden=(8,))
    with pytest.raises(ValueError, match="objective 'enum'"):
        ppl_vae.train("ssvae", None, {"alpha": 500.0}, objective="trace")


def test_cli_train_evaluate(fashion_dir, tmp_path, capsys):
    run = tmp_path / "m2"
    base = ["train", "ssvae", "--latent-dim", "2", "--hidden", "32", "--epochs", "2",
            "--limit", "200", "--val-size", "50", "--batch-size", "50", "--labels-per-class",
            "3", "--data", str(fashion_dir), "--out", str(run), "--no-progress",
            "--device", "cpu"]
    with pytest.raises(ValueError, match="--objective enum"):
        main(base + ["--objective", "iwae", "--particles", "2"])
    main(base + ["--labelled-share", "0.5"])
    config = json.loads((run / "config.json").read_text())
    spec = config["spec"]
    assert config["model"] == "ssvae" and spec["alpha"] == pytest.approx(max(5 * 200 / 30, 500))
    assert spec["labelled_share"] == 0.5 and config["fit"]["objective"] == "enum"
    assert len((run / "labelled_rows.csv").read_text().split()) == 31  # header + 30 rows
    assert (run / "samples_per_class.png").stat().st_size > 0
    capsys.readouterr()
    main(["evaluate", str(run), "--iwae-samples", "10", "--device", "cpu"])
    lines = dict(line.split(": ") for line in capsys.readouterr().out.strip().splitlines())
    assert 0.0 <= float(lines["test_accuracy"]) <= 1.0
    assert float(lines["log_likelihood"]) >= float(lines["elbo"]) - 1.0
    main(["sample", str(run), "--label", "2", "--n", "4", "--device", "cpu"])
    assert (run / "samples_label2_4.png").exists()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["labelled"] == 30 and summary["train_images"] == 200
    loaded = ppl_vae.load_run(run)
    assert loaded.model.alpha == pytest.approx(spec["alpha"])
    # share 0.5: the 30 labelled rows 6 times (170 / 30 unlabelled per labelled, rounded)
    assert [len(t) for t in loaded.data("train")] == [170 + 6 * 30] * 4
