"""The conditional VAE: its objective, class-conditional generation, style transfer, CLI."""

from __future__ import annotations

import json

import pytest
import torch

from ppl_vae import elbo, fit
from ppl_vae.cli.main import main
from ppl_vae.models.cvae import build_cvae


def _data(n=400, seed=3):
    """Binary 28x28 items: class c is a bar over rows 4+2c and 5+2c, plus pixel noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    x = (torch.rand(n, 28, 28, generator=g) < 0.03).float()
    for i, c in enumerate(y.tolist()):
        x[i, 4 + 2 * c: 6 + 2 * c, 4:24] = 1.0
    return x, y


def bar_class(images: torch.Tensor) -> torch.Tensor:
    """Which class's bar (rows 4+2c, 5+2c) is brightest: (n,)."""
    score = torch.stack([images[..., 4 + 2 * c: 6 + 2 * c, 4:24].mean((-1, -2))
                         for c in range(10)], -1)
    return score.argmax(-1)


@pytest.mark.parametrize("prior", ["fixed", "learned"])
def test_cvae_learns_to_generate_each_class_and_transfers_style(prior):
    x, y = _data()
    assert (bar_class(x) == y).float().mean() > 0.95  # the check works on real items
    model, guide = build_cvae(latent_dim=2, hidden=(64,), prior=prior)
    before = elbo(model, guide, (x, y), num_particles=3, progress=False)
    history = fit(model, guide, (x, y), epochs=15, batch_size=50, lr=1e-2, progress=False,
                  device="cpu")
    after = elbo(model, guide, (x, y), num_particles=3, progress=False)
    assert history["train_elbo"][-1] > history["train_elbo"][0] and after > before + 100
    model.eval()
    torch.manual_seed(0)
    # generated items of class c show class c's bar (chance: 0.1)
    hits = torch.stack([(bar_class(model.generate(c, 20)) == c).float().mean()
                        for c in range(10)])
    assert hits.mean() >= 0.85 and hits.min() >= 0.6, hits
    moved = model.style_transfer(guide, x[:20], y[:20])          # (20, 10, 28, 28)
    assert moved.shape == (20, 10, 28, 28)
    assert (bar_class(moved) == torch.arange(10)).float().mean() >= 0.8


def test_learned_prior_enters_the_objective_as_kl_to_p_z_given_y():
    x, y = _data(100)
    model, guide = build_cvae(latent_dim=2, hidden=(16,), prior="learned")
    fixed, _ = build_cvae(latent_dim=2, hidden=(16,), prior="fixed")
    fixed.decoder.load_state_dict(model.decoder.state_dict())
    data = (x, y)
    torch.manual_seed(0)
    start = elbo(model, guide, data, num_particles=50, progress=False)
    torch.manual_seed(0)
    assert elbo(fixed, guide, data, num_particles=50, progress=False) == pytest.approx(start)
    with torch.no_grad():  # move p(z | y = 3) to mean (3, 3): items of class 3 pay for it
        model.prior_net.loc.weight[:, 3] = 3.0
    torch.manual_seed(0)
    per_item = elbo(model, guide, data, num_particles=50, per_example=True, progress=False)
    torch.manual_seed(0)
    before = elbo(fixed, guide, data, num_particles=50, per_example=True, progress=False)
    drop = (before - per_item)[y == 3]
    assert float(drop.mean()) == pytest.approx(9.0, abs=1.5)  # E[log N(z;0,1) - log N(z;m,1)]
    assert float((before - per_item)[y != 3].abs().max()) < 1.0


def test_bad_labels_are_refused_before_training():
    x, y = _data(20)
    y[7] = 12
    model, guide = build_cvae(latent_dim=2, hidden=(8,))
    with pytest.raises(ValueError, match="label 12 at row 7"):
        fit(model, guide, (x, y), epochs=1, progress=False, device="cpu")


def test_cli_train_sample_evaluate(fashion_dir, tmp_path, capsys):
    run = tmp_path / "cvae"
    main(["train", "cvae", "--latent-dim", "2", "--hidden", "32", "--epochs", "2",
          "--limit", "200", "--val-size", "50", "--batch-size", "50", "--prior", "learned",
          "--guide", "fullcov", "--binarize", "threshold", "--data", str(fashion_dir),
          "--out", str(run), "--no-progress", "--device", "cpu"])
    config = json.loads((run / "config.json").read_text())
    assert config["family"] == "cvae" and config["spec"]["guide"] == "fullcov"
    for name in ("checkpoint.pt", "loss.png", "samples_per_class.png", "style_transfer.png"):
        assert (run / name).stat().st_size > 0, name
    capsys.readouterr()
    main(["sample", str(run), "--label", "3", "--n", "16", "--device", "cpu"])
    assert (run / "samples_label3_16.png").stat().st_size > 0
    with pytest.raises(ValueError, match="--label must be in 0..9"):
        main(["sample", str(run), "--label", "10", "--device", "cpu"])
    capsys.readouterr()
    main(["evaluate", str(run), "--iwae-samples", "20", "--device", "cpu"])
    lines = dict(line.split(": ") for line in capsys.readouterr().out.strip().splitlines())
    assert float(lines["log_likelihood"]) >= float(lines["elbo"]) - 1.0


def test_cli_evaluate_after_dynamic_binarization(fashion_dir, tmp_path, capsys):
    """Training resamples binary pixels; evaluation scores one fixed binary draw."""
    run = tmp_path / "cvae-dynamic"
    main(["train", "cvae", "--latent-dim", "2", "--hidden", "16", "--epochs", "1",
          "--limit", "100", "--val-size", "20", "--data", str(fashion_dir),
          "--out", str(run), "--no-progress", "--device", "cpu"])
    capsys.readouterr()
    main(["evaluate", str(run), "--iwae-samples", "5", "--limit", "40", "--device", "cpu"])
    lines = dict(line.split(": ") for line in capsys.readouterr().out.strip().splitlines())
    assert float(lines["elbo"]) < 0 and lines["test_images"] == "40"


def test_samples_per_class_title_and_labels_fit_in_the_figure(tmp_path, monkeypatch):
    """samples_per_class.png's title (every class name) was cut off on both sides; the
    classes now label the rows and every text lies inside the figure."""
    import matplotlib.pyplot as plt

    from ppl_vae import plots
    from ppl_vae.models.cvae import class_samples

    outside = []

    def check(fig, path):
        fig.tight_layout()
        fig.canvas.draw()
        box = fig.bbox
        for ax in fig.axes:
            for text in [ax.title, *(ax.get_yticklabels() if ax.axison else [])]:
                extent = text.get_window_extent()
                if extent.x0 < box.x0 - 1 or extent.x1 > box.x1 + 1:
                    outside.append(text.get_text())
        plt.close(fig)
        return path

    monkeypatch.setattr(plots, "save_figure", check)
    model, _ = build_cvae(latent_dim=2, hidden=(8,))
    class_samples(model, tmp_path / "samples_per_class.png", per_class=4)
    assert not outside, outside
