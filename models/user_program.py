"""Your own Pyro program, trained from the command line: the ``program`` family.

A Python file holds the model (a function, or a method of an object the file builds) and,
optionally, its guide, written as for Pyro; a data file holds the rows. Then

    ppl-vae train program --file my_model.py --data train.pt --out runs/mine
    ppl-vae evaluate runs/mine      # elbo, log_likelihood: nats per example
    ppl-vae check runs/mine         # ArviZ: posterior.nc, summary.csv, k-hat, PPC

trains it with the engine (``ppl_vae.fit``: checkpoints, resume, early stopping on
``--val-data``) exactly as a script calling ``fit(model, guide, data)`` would.

* ``--model-name`` (default ``model``): the model's name in the file; a dotted name reaches a
  method (``vae.model`` for ``vae = VAE()``).
* ``--guide``: a name in the file, or a Pyro autoguide's class name (``AutoNormal``,
  ``AutoDelta``, ``AutoMultivariateNormal`` ...) built on the model; default: the file's
  ``guide`` if it defines one, else ``AutoNormal``.
* ``--data`` / ``--val-data`` / ``--test-data``: ``.pt`` (``torch.save`` of a tensor, a tuple
  or a dict of tensors; read with ``weights_only=True``), ``.npy``, ``.npz`` (a dict: the
  model's keyword arguments) or ``.csv`` (a header of names: one float column per keyword
  argument). Rows are examples; float64 arrays become float32 (torch's default).

The file is imported anew for every build (its networks are created under the run's seed)
and its SHA-256 is stored in the spec: ``load_run`` warns when the file changed since
training, and ``--resume`` refuses a changed file. The checkpoint holds parameters only
(``weights_only=True``); the program is the file.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import importlib.util
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pyro
import pyro.infer.autoguide as autoguides
import torch

from ppl_vae.batching import Data, make_batches
from ppl_vae.checkpoint import write_json
from ppl_vae.evaluation import as_pair, elbo, log_likelihood
from ppl_vae.family import Family, register
from ppl_vae.plots import loss_curve
from ppl_vae.program import SetupError, per_row_autoguide_sites, warn_user

STEPS = 3000  # default optimizer steps of a run (epochs follow from the data's size)
FULL_BATCH_ROWS = 1024  # up to this many rows a step sees all of them; else batches of 256


@dataclass
class ProgramSpec:
    """What config.json stores under "spec" for a ``program`` run."""

    model: str = "program"
    file: str = ""  # the Python file (an absolute path once the spec is made)
    model_name: str = "model"
    guide: str = ""  # a name in the file or an autoguide class ("": guide, else AutoNormal)
    data: str = ""
    val_data: str = ""
    test_data: str = ""
    plate: str = ""  # the plate over the rows, when the engine cannot tell
    file_sha256: str = ""
    data_sha256: str = ""  # of --data: a resumed run trains on the rows it was trained on


def file_digest(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for piece in iter(lambda: f.read(1 << 20), b""):
            digest.update(piece)
    return digest.hexdigest()


def changed(path: str, sha256: str) -> bool:
    """Whether the file at ``path`` differs from the one hashed at training (False when no
    hash was stored or the file is gone: the callers say so themselves)."""
    return bool(sha256) and Path(path).is_file() and file_digest(path) != sha256


def import_file(path: str | Path) -> ModuleType:
    """The user's file imported as a fresh module (its folder importable meanwhile, for
    sibling modules); a failing import is a SetupError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise SetupError(f"--file {path}: no such file")
    name = "ppl_vae_program_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise SetupError(f"--file {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    folder = path.resolve().parent
    for key in _SIBLINGS:  # modules that user files imported from their folders: anew too
        sys.modules.pop(key, None)  # (two folders' "helpers" must not stand for each other)
    _SIBLINGS.clear()
    before = set(sys.modules)
    sys.modules[name] = module  # (dataclasses and pickling look the module up by name)
    sys.path.insert(0, str(folder))
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # the user's code: any error is theirs, named with the file
        raise SetupError(f"--file {path}: importing it failed ({type(e).__name__}: {e})") from e
    finally:
        sys.path.remove(str(folder))
        _SIBLINGS.update(k for k in set(sys.modules) - before
                         if _inside(getattr(sys.modules[k], "__file__", None), folder))
    return module


_SIBLINGS: set[str] = set()  # modules that a user file imported from its own folder


def _inside(file: str | None, folder: Path) -> bool:
    return file is not None and Path(file).resolve().is_relative_to(folder)


def attribute(module: ModuleType, dotted: str, flag: str) -> Any:
    """``module.a.b`` for ``dotted="a.b"``; the error lists what the file defines."""
    value: Any = module
    for part in dotted.split("."):
        if not hasattr(value, part):
            defined = sorted(k for k, v in vars(module).items()
                             if not k.startswith("_") and callable(v)
                             and getattr(v, "__module__", None) == module.__name__)
            raise SetupError(f"{flag} {dotted}: {module.__file__} defines no {dotted!r} "
                             f"(its own callables: {', '.join(defined) or 'none'})")
        value = getattr(value, part)
    return value


def default_guide(module: ModuleType, model_name: str) -> str:
    """The guide beside the model: ``vae.guide`` for ``vae.model``, else the file's
    ``guide``, else ``AutoNormal``."""
    owner, _, _ = model_name.rpartition(".")
    for name in ([f"{owner}.guide"] if owner else []) + ["guide"]:
        try:
            attribute(module, name, "--guide")
            return name
        except SetupError:
            continue
    return "AutoNormal"


def build_program(spec: ProgramSpec) -> tuple[Callable, Callable]:
    """The model and guide of ``spec``'s file, freshly imported."""
    module = import_file(spec.file)
    model = attribute(module, spec.model_name, "--model-name")
    if not callable(model):
        raise SetupError(f"--model-name {spec.model_name}: {type(model).__name__} is not callable")
    name = spec.guide or default_guide(module, spec.model_name)
    auto = getattr(autoguides, name, None)
    if isinstance(auto, type) and issubclass(auto, autoguides.AutoGuide):
        return model, auto(model)
    if not hasattr(module, name.split(".")[0]) and name.startswith("Auto"):
        known = sorted(k for k, v in vars(autoguides).items()
                       if isinstance(v, type) and issubclass(v, autoguides.AutoGuide)
                       and k not in ("AutoGuide", "AutoGuideList", "AutoCallable",
                                     "AutoContinuous"))
        close = difflib.get_close_matches(name, known, n=1)
        raise SetupError(f"--guide {name}: not an autoguide of pyro.infer.autoguide nor a "
                         f"name in {spec.file}"
                         + (f"; did you mean {close[0]}?" if close else "")
                         + f" (autoguides: {', '.join(known)})")
    return model, attribute(module, name, "--guide")


# ---- data files ---------------------------------------------------------------------------
def read_data(path: str | Path) -> Data:
    """Rows from a data file (module docstring): a tensor, a tuple or a dict of tensors."""
    path = Path(path)
    if not path.is_file():
        raise SetupError(f"{path}: no such data file")
    suffix = path.suffix.lower()
    if suffix == ".pt":
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # an unpickling refusal or a corrupt file
            raise SetupError(f"{path}: not a torch.save file of tensors ({e})") from e
    elif suffix == ".npy":
        data = torch.as_tensor(np.load(path, allow_pickle=False))
    elif suffix == ".npz":
        with np.load(path, allow_pickle=False) as arrays:
            data = {k: torch.as_tensor(arrays[k]) for k in arrays.files}
    elif suffix == ".csv":
        data = _read_csv(path)
    else:
        raise SetupError(f"{path}: data files are .pt, .npy, .npz or .csv, not {suffix!r}")
    return _checked(data, path)


def _read_csv(path: Path) -> dict[str, torch.Tensor]:
    with path.open(newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))
    if len(rows) < 2:
        raise SetupError(f"{path}: a header of names and at least one row are needed")
    names = [n.strip() for n in rows[0]]
    if not all(n.isidentifier() for n in names):
        bad = next(n for n in names if not n.isidentifier())
        raise SetupError(f"{path}: line 1: column name {bad!r} is not a Python argument name "
                         "(the columns are the model's keyword arguments)")
    values = np.empty((len(rows) - 1, len(names)), dtype=np.float32)
    for i, row in enumerate(rows[1:], start=2):
        if len(row) != len(names):
            raise SetupError(f"{path}: line {i}: {len(row)} fields, the header has {len(names)}")
        for j, field in enumerate(row):
            try:
                values[i - 2, j] = number = float(field)
            except ValueError:
                number = math.nan
            if not math.isfinite(number):
                raise SetupError(f"{path}: line {i}, column {names[j]!r}: value {field!r} is "
                                 "not a finite number")
    return {name: torch.from_numpy(values[:, j].copy()) for j, name in enumerate(names)}


def _checked(data: Any, path: Path) -> Data:
    def tensor(t: Any, where: str) -> torch.Tensor:
        if not isinstance(t, torch.Tensor):
            raise SetupError(f"{path}: {where} is a {type(t).__name__}, not a tensor")
        return t.float() if t.dtype == torch.float64 else t

    if isinstance(data, torch.Tensor):
        return tensor(data, "the data")
    if isinstance(data, (tuple, list)):
        return tuple(tensor(t, f"entry {i}") for i, t in enumerate(data))
    if isinstance(data, dict):
        return {str(k): tensor(t, f"entry {k!r}") for k, t in data.items()}
    raise SetupError(f"{path}: holds a {type(data).__name__}; give a tensor, a tuple or a "
                     "dict of tensors (rows = examples)")


def rows_of(data: Data) -> int:
    first = data if isinstance(data, torch.Tensor) else (
        next(iter(data.values())) if isinstance(data, dict) else data[0])
    return int(first.shape[0])


def head(data: Data, n: int) -> Data:
    """The first ``n`` rows of every entry."""
    if isinstance(data, torch.Tensor):
        return data[:n]
    if isinstance(data, dict):
        return {k: v[:n] for k, v in data.items()}
    return tuple(v[:n] for v in data)


# ---- the family ---------------------------------------------------------------------------
@register
class ProgramFamily(Family):
    name = "program"
    models = {"program": "your own Pyro model (and guide) from a Python file"}
    Spec = ProgramSpec
    # Pyro's tutorials' small-model settings (a neural network usually wants --lr 1e-3)
    fit_defaults = {"lr": 0.03, "objective": "trace", "lr_schedule": "cosine"}

    def make_spec(self, model: str, **options: Any) -> ProgramSpec:
        spec = super().make_spec(model, **options)
        if not spec.file or not spec.data:
            raise SetupError("a program run needs --file (the model's Python file) and --data")
        for field in ("file", "data", "val_data", "test_data"):
            value = getattr(spec, field)
            if value:
                if not Path(value).is_file():
                    raise SetupError(f"--{field.replace('_', '-')} {value}: no such file")
                setattr(spec, field, str(Path(value).resolve()))
        spec.file_sha256 = file_digest(spec.file)
        spec.data_sha256 = file_digest(spec.data)
        return spec

    def spec_from_json(self, stored: dict) -> ProgramSpec:
        """The stored spec; paths given on a resume (maybe relative) made absolute."""
        spec = super().spec_from_json(stored)
        for field in ("file", "data", "val_data", "test_data"):
            value = getattr(spec, field)
            if value and Path(value).exists():
                setattr(spec, field, str(Path(value).resolve()))
        return spec

    def check_fit_settings(self, spec: ProgramSpec, settings: dict[str, Any]) -> None:
        """A resumed run needs the file and the training data it was trained with (a new
        run hashes them anew)."""
        if changed(spec.file, spec.file_sha256):
            raise SetupError(f"{spec.file} changed since this run was trained (its SHA-256 "
                             "differs): --resume needs the same file; train anew with "
                             "--overwrite or another --out")
        if changed(spec.data, spec.data_sha256):
            raise SetupError(f"--data {spec.data} changed since this run was trained (its "
                             "SHA-256 differs): --resume needs the same rows; train anew with "
                             "--overwrite or another --out")

    def build(self, spec: ProgramSpec) -> tuple[Callable, Callable]:
        if changed(spec.file, spec.file_sha256):
            warn_user(f"{spec.file} changed since this run was trained (its SHA-256 differs); "
                      "the trained parameters are loaded into the file as it is now")
        return build_program(spec)

    def load_data(self, spec: ProgramSpec, split: str) -> Data | None:
        """train: --data; val: --val-data (None without); test: --test-data, else --data."""
        path = {"train": spec.data, "val": spec.val_data,
                "test": spec.test_data or spec.data}[split]
        return read_data(path) if path else None

    def example(self, spec: ProgramSpec) -> Data:
        if not Path(spec.data).is_file():
            raise SetupError(f"the run's training data {spec.data} is gone: reloading the run "
                             "needs a few of its rows to create the parameters; put it back")
        if changed(spec.data, spec.data_sha256):
            warn_user(f"--data {spec.data} changed since this run was trained (its SHA-256 "
                      "differs); figures on the training data use the file as it is now")
        return head(read_data(spec.data), 16)

    def fit_settings(self, spec: ProgramSpec) -> dict[str, Any]:
        """All rows per step up to 1,024 rows, else batches of 256; about 3,000 steps (at
        least 10 epochs), checkpoints about 100 times a run; with --val-data (scored with 10
        particles), early stopping after a tenth of the epochs without improvement, not in
        the first half (earlier, a noisy validation ELBO kept epochs whose scales had not
        converged: sds up to 63% too wide)."""
        n = rows_of(read_data(spec.data))
        batch = n if n <= FULL_BATCH_ROWS else 256
        epochs = max(10, math.ceil(STEPS / math.ceil(n / batch)))
        settings = {**self.fit_defaults, "batch_size": batch, "epochs": epochs,
                    "checkpoint_every": max(1, epochs // 100)}
        if spec.plate:
            settings["plate"] = spec.plate
        if spec.val_data:  # 10 particles: one-step epochs differ by little, not by noise
            settings.update(patience=max(10, epochs // 10), warmup_epochs=epochs // 2,
                            val_particles=10)
        return settings

    def report(self, run: Any) -> list[Path]:
        return [loss_curve(run.history, run.path / "loss.png",
                           title=f"{Path(run.spec.file).name}: ELBO per example")]

    def evaluate(self, run: Any, iwae_samples: int = 100, limit: int | None = None,
                 seed: int = 0, **_: Any) -> dict[str, Any]:
        """ELBO and importance-sampled log p(x) (nats per example) of --test-data, else of
        the training data."""
        data = self.run_data(run, "test")
        if limit:
            data = head(data, limit)
        pair = as_pair(run.model, run.guide, run.spec.plate or None)  # one look at it
        if run.spec.test_data:  # the data plate, from the training rows the guide knows
            pair.inspect(next(iter(make_batches(self.run_data(run, "train"), 100, run.device,
                                                shuffle=False))))
        per_row = per_row_autoguide_sites(pair) if run.spec.test_data else []
        if per_row:
            raise SetupError(
                f"--test-data rows have no parameters of their own: the guide keeps one per "
                f"training row for {', '.join(per_row)}; evaluate on the training rows (a run "
                "without --test-data) or give the per-row latents an amortized guide")
        pyro.set_rng_seed(seed)
        figures = {"data": "test" if run.spec.test_data else "train",
                   "examples": rows_of(data),
                   "elbo": elbo(pair.model, pair.guide, data, num_particles=10,
                                device=run.device),
                   "log_likelihood": log_likelihood(pair.model, pair.guide, data,
                                                    num_samples=iwae_samples,
                                                    device=run.device)}
        if run.path is not None:  # (a run trained without a folder has none)
            write_json(figures, run.path / "evaluation.json")
        return figures

    def check(self, run: Any, samples: int = 500, khat_samples: int = 1000, seed: int = 0,
              **_: Any) -> dict[str, Any]:
        """ArviZ checks of the posterior on the training data (:mod:`ppl_vae.checks`)."""
        from ppl_vae.checks import check_posterior

        result = check_posterior(run.model, run.guide, self.run_data(run, "train"), run.path,
                                 num_samples=samples, khat_samples=khat_samples,
                                 plate=run.spec.plate or None, device=run.device, seed=seed)
        write_json(result, run.path / "check.json")
        return result
