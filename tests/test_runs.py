"""Runs as library objects (ppl_vae.runs): train into a folder, reload it, never lose it."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from ppl_vae import Family, SetupError, load_run, register, train
from ppl_vae.runs import read_config


class Gauss(nn.Module):
    """x_i ~ N(mu + z_i, 1), z_i ~ N(0, 1): a global mean and one latent per row, with a
    small network in the guide so that the initial weights depend on the seed."""

    def forward(self, x, size=None, subsample=None):
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        with pyro.plate("data", size or len(x), subsample=subsample):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(mu + z, 1.0), obs=x)


class GaussGuide(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(1, 2)
        self.mu = nn.Parameter(torch.zeros(()))

    def forward(self, x, size=None, subsample=None):
        pyro.sample("mu", dist.Normal(self.mu, 0.1))
        out = self.net(x.unsqueeze(-1))
        with pyro.plate("data", size or len(x), subsample=subsample):
            pyro.sample("z", dist.Normal(out[..., 0], out[..., 1].exp()))


@dataclass
class GaussSpec:
    model: str
    rows: int = 120
    true_mu: float = 2.0


@register
class GaussFamily(Family):
    name = "gauss"
    models = {"test-gauss": "a test family"}
    Spec = GaussSpec
    fit_defaults = {"epochs": 3, "batch_size": 40, "lr": 0.05}

    def build(self, spec):
        return Gauss(), GaussGuide()

    def load_data(self, spec, split):
        g = torch.Generator().manual_seed({"train": 0, "val": 1}.get(split, 2))
        return torch.randn(spec.rows, generator=g) * 1.4 + spec.true_mu

    def example(self, spec):
        return torch.zeros(4)

    def report(self, run):
        path = run.path / "mu.txt"
        path.write_text(f"{float(run.guide.mu):.6f}\n")
        return [path]


def metrics_without_time(run_dir) -> list[str]:
    lines = (run_dir / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    keep = [i for i, name in enumerate(header) if name != "seconds"]
    return [",".join(row.split(",")[i] for i in keep) for row in lines]


def test_train_writes_a_run_that_load_run_restores(tmp_path):
    run = train("test-gauss", tmp_path / "run", {"rows": 80}, progress=False)
    config = read_config(tmp_path / "run")
    assert config["family"] == "gauss" and config["spec"] == {"model": "test-gauss", "rows": 80,
                                                              "true_mu": 2.0}
    assert config["fit"]["epochs"] == 3 and config["fit"]["lr"] == 0.05  # family defaults
    assert (tmp_path / "run" / "mu.txt").exists() and len(run.history) == 3
    again = load_run(tmp_path / "run")
    assert again.checkpoint.name == "best.pt"  # validation data: the best epoch's state
    # the run object holds the state the folder reloads to (the best epoch's)
    assert float(again.guide.mu) == pytest.approx(float(run.guide.mu), abs=1e-6)
    assert again.spec == run.spec and again.history == run.history
    assert float((tmp_path / "run" / "mu.txt").read_text()) == pytest.approx(
        float(again.guide.mu), abs=1e-6)


def test_the_same_seed_gives_the_same_run_weights_included(tmp_path):
    train("test-gauss", tmp_path / "a", seed=3, progress=False)
    train("test-gauss", tmp_path / "b", seed=3, progress=False)
    train("test-gauss", tmp_path / "c", seed=4, progress=False)
    assert metrics_without_time(tmp_path / "a") == metrics_without_time(tmp_path / "b")
    assert metrics_without_time(tmp_path / "a") != metrics_without_time(tmp_path / "c")


def test_an_existing_run_is_never_overwritten_by_accident(tmp_path):
    out = tmp_path / "run"
    train("test-gauss", out, progress=False)
    before = (out / "checkpoint.pt").read_bytes()
    with pytest.raises(SetupError, match=r"already holds a run.*--resume.*--overwrite"):
        train("test-gauss", out, progress=False)
    assert (out / "checkpoint.pt").read_bytes() == before  # nothing touched
    run = train("test-gauss", out, resume=True, epochs=5, progress=False)
    assert [r["epoch"] for r in run.history] == [1, 2, 3, 4, 5]
    with pytest.raises(SetupError, match="different model spec"):
        train("test-gauss", out, {"rows": 99}, resume=True, epochs=6, progress=False)
    run = train("test-gauss", out, overwrite=True, epochs=1, progress=False)
    assert len(run.history) == 1
    with pytest.raises(SetupError, match="holds no checkpoint.pt"):
        train("test-gauss", tmp_path / "new", resume=True, progress=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(SetupError, match="is a file"):
        train("test-gauss", tmp_path / "file", progress=False)


def test_a_live_lock_refuses_a_second_writer_and_a_stale_one_is_taken_over(tmp_path):
    import socket

    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text(f"{os.getpid()} {socket.gethostname()}\n")  # alive: us
    with pytest.raises(SetupError, match=r"being written by another training \(pid"):
        train("test-gauss", out, progress=False)
    dead = 2**22 + 12345  # above the usual pid_max: no such process
    (out / ".lock").write_text(f"{dead} {socket.gethostname()}\n")
    (out / ".checkpoint.pt.abc123.tmp").write_bytes(b"half a save")
    train("test-gauss", out, epochs=1, progress=False)
    assert not (out / ".lock").exists()
    assert not list(out.glob(".*.tmp"))


def test_unknown_model_and_settings_are_refused():
    with pytest.raises(SetupError, match="unknown model 'nope'.*test-gauss"):
        train("nope")
    with pytest.raises(SetupError, match=r"unknown settings \['rowz'\]"):
        train("test-gauss", spec={"rowz": 3})
    with pytest.raises(SetupError, match=r"unknown fit settings \['epochz'\]"):
        train("test-gauss", epochz=3)


@pytest.mark.parametrize("setting, value, message", [
    ("epochs", 0, "epochs must be >= 1"), ("num_particles", 0, r"num_particles \(--particles\)"),
    ("lr", -1.0, "lr must be a positive"), ("batch_size", 0, "batch_size must be >= 1"),
    ("patience", 0, "patience must be >= 1")])
def test_impossible_fit_settings_are_refused_before_anything_is_written(tmp_path, setting,
                                                                        value, message):
    with pytest.raises(SetupError, match=message):
        train("test-gauss", tmp_path / "run", **{setting: value})
    assert not (tmp_path / "run" / "config.json").exists()


def test_run_files_get_ordinary_permissions(tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    train("test-gauss", tmp_path / "run", epochs=1, progress=False)
    for name in ("config.json", "checkpoint.pt", "metrics.csv", "mu.txt"):
        assert (tmp_path / "run" / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_config_errors_name_the_file(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(SetupError, match="not a ppl-vae run folder"):
        load_run(run)
    (run / "config.json").write_text("[]")
    with pytest.raises(SetupError, match=r"config.json: not a ppl-vae run config"):
        load_run(run)
    (run / "config.json").write_text("{bad json")
    with pytest.raises(SetupError, match=r"config.json: not valid JSON"):
        load_run(run)
    (run / "config.json").write_text('{"family": "vae", "model": "vae", "latent_dim": 2}')
    with pytest.raises(SetupError, match="written by ppl-vae 0.1.*train it again"):
        load_run(run)


def test_a_checkpoint_that_does_not_fit_the_edited_config_is_a_clear_error(tmp_path):
    import json

    train("test-gauss", tmp_path / "run", epochs=1, progress=False)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    config["model"] = "vae"
    config["spec"] = {"model": "vae", "latent_dim": 3, "limit": 10, "val_size": 2}
    (tmp_path / "run" / "config.json").write_text(json.dumps(config))
    with pytest.raises(SetupError, match=r"(written by a 'test-gauss' run|does not fit)"):
        load_run(tmp_path / "run")


def test_resume_continues_with_the_runs_own_fit_settings(tmp_path):
    """A resumed run keeps its stored fit settings (the CLI passes only the flags given):
    resuming a cosine run without repeating --lr-schedule used to drop the schedule and keep
    the finished run's rate of 0, so the new epochs trained nothing. More epochs stretch the
    cosine over the new total (the rate at epoch 3 of 4 is the closed form's, not 0); a
    different lr or seed is refused, naming both values."""
    out = tmp_path / "run"
    train("test-gauss", out, epochs=2, lr_schedule="cosine", progress=False)
    assert read_config(out)["fit"]["lr_schedule"] == "cosine"
    run = train("test-gauss", out, resume=True, epochs=4, progress=False)
    assert read_config(out)["fit"]["lr_schedule"] == "cosine"
    lrs = [row["lr"] for row in run.history]
    # the rate each epoch ends with: cosine over 2 epochs, then over 4 from epoch 2 on
    assert lrs == pytest.approx([0.025, 0.0, 0.05 * (1 + math.cos(3 * math.pi / 4)) / 2, 0.0],
                                abs=1e-9)
    assert run.history[2]["train_elbo"] != run.history[1]["train_elbo"]
    with pytest.raises(SetupError, match=r"own fit settings.*lr \(run: 0.05, given: 0.5\)"):
        train("test-gauss", out, resume=True, epochs=5, lr=0.5, progress=False)
    with pytest.raises(SetupError, match=r"seed \(run: 0, given: 3\)"):
        train("test-gauss", out, resume=True, epochs=5, seed=3, progress=False)
    with pytest.raises(SetupError, match=r"trained 4 epochs already and epochs=3 is fewer"):
        train("test-gauss", out, resume=True, epochs=3, progress=False)


def test_a_start_that_failed_before_its_first_checkpoint_can_be_retried(tmp_path):
    """A start that stops before any checkpoint (a NaN in epoch 1, a missing CUDA device)
    leaves its config.json; it used to block a plain retry ('already holds a run') and
    --resume ('no checkpoint.pt') alike. It is now replaced without --overwrite; the error
    says that no checkpoint was written, instead of naming one of epoch 0."""
    from ppl_vae import TrainingDiverged

    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match="No epoch had finished, so .* holds no "
                                               "checkpoint"):
        train("test-gauss", out, lr=1e30, progress=False)
    assert (out / "config.json").exists() and not (out / "checkpoint.pt").exists()
    run = train("test-gauss", out, progress=False)
    assert len(run.history) == 3 and (out / "checkpoint.pt").exists()


def test_a_loss_that_runs_away_within_the_first_read_is_caught():
    """Losses are read from the device every sync_every steps; the plausible range came from
    the median of the first read, so a run that diverged within it (lr 1e6 on a small epoch)
    trained to an ELBO of -1.8e33 and exited 0. It is now set by the first step's loss."""
    from ppl_vae import TrainingDiverged, fit

    x = torch.randn(400)

    def model(x):  # Adam at lr 1e6 moves loc by about 1e6 a step: finite, absurd losses
        loc = pyro.param("loc", torch.zeros(()))
        with pyro.plate("data", len(x)):
            pyro.sample("obs", dist.Normal(loc, 1.0), obs=x)

    def guide(x):
        pass

    with pytest.raises(TrainingDiverged, match="times the"):
        fit(model, guide, x, epochs=3, batch_size=50, lr=1e6, optimizer="adam",
            progress=False, device="cpu")


def test_a_refused_start_leaves_no_empty_run_folder(tmp_path):
    """A start refused before it wrote anything (an impossible setting, --resume of nothing)
    used to leave its empty --out folder behind; folders it created are removed again, a
    folder that was there before is kept."""
    out = tmp_path / "new" / "run"
    with pytest.raises(SetupError, match="holds no checkpoint.pt"):
        train("test-gauss", out, resume=True, progress=False)
    assert not (tmp_path / "new").exists()
    with pytest.raises(ValueError, match="batch_size"):
        train("test-gauss", out, batch_size=0, progress=False)
    assert not (tmp_path / "new").exists()
    out.mkdir(parents=True)  # the user's own (empty) folder stays
    with pytest.raises(ValueError, match="batch_size"):
        train("test-gauss", out, batch_size=0, progress=False)
    assert out.is_dir() and not list(out.iterdir())


def test_resume_with_a_partial_spec_takes_the_rest_from_the_run(tmp_path):
    """A dict spec on resume gives only the fields it names (the CLI passes the flags on
    the command line); the others are the run's, not the defaults. A real difference is
    refused naming the run's and the given value."""
    out = tmp_path / "run"
    train("test-gauss", out, {"rows": 80}, epochs=1, progress=False)
    run = train("test-gauss", out, {"true_mu": 2.0}, resume=True, epochs=2, progress=False)
    assert run.spec.rows == 80 and len(run.history) == 2
    with pytest.raises(SetupError, match=r"rows \(run: 80, given: 99\)"):
        train("test-gauss", out, {"rows": 99}, resume=True, epochs=3, progress=False)
