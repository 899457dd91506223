"""Runs as library objects: train a family's model into a run folder, reload it in one call.

    run = ppl_vae.train("vae", out="runs/vae", spec={"latent_dim": 2}, epochs=5)
    run = ppl_vae.load_run("runs/vae")          # model, guide, spec, history, data access
    run.family.evaluate(run)                    # what `ppl-vae evaluate runs/vae` prints

``ppl-vae train`` calls :func:`train` with the spec its flags give, so a script and the
command with the same spec and seed train the same run. A run folder holds

    config.json    {"family", "model", "spec": the family's spec, "fit": the fit settings}
    checkpoint.pt  the last epoch (atomic), best.pt the best epoch on validation data
    metrics.csv    one row per epoch; the family's tables and PNG figures

One rule picks the state a reloaded run holds: ``best.pt`` when the run had validation data
(its best epoch is a real choice), else ``checkpoint.pt`` (the last epoch; a best training
ELBO is only noise).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyro
import torch

from .checkpoint import load_checkpoint, write_json
from .distributed import launched_as_other_rank
from .family import Family, family_of
from .program import SetupError
from .svi import fit, restore
from .training import FitConfig, FitFailed, resolve_device


@dataclass
class Run:
    """A trained (or training) run: its folder, family, spec, model and guide.

    Pyro keeps parameters in one global param store, which the next ``load_run`` or ``fit``
    clears: a run remembers its own (``params``) and puts them back whenever its ``model``
    or ``guide`` is used, so two runs loaded in one session each score with their own."""

    path: Path | None
    family: Family
    spec: Any
    _model: Any
    _guide: Any
    fit_settings: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    device: torch.device = torch.device("cpu")
    checkpoint: Path | None = None
    params: dict | None = field(default=None, repr=False)  # its param-store state

    @property
    def model(self) -> Any:
        self.activate()
        return self._model

    @model.setter
    def model(self, value: Any) -> None:
        self._model = value

    @property
    def guide(self) -> Any:
        self.activate()
        return self._guide

    @guide.setter
    def guide(self, value: Any) -> None:
        self._guide = value

    def keep_params(self) -> None:
        """Remember the param store's present state as this run's (it now owns the store)."""
        global _OWNER
        self.params = pyro.get_param_store().get_state()
        _OWNER = weakref.ref(self)

    def activate(self) -> None:
        """Put this run's parameters back into Pyro's param store when another run took it
        over since (loaded or trained); while the store is this run's, its present values
        are the run's (trained further with ``fit``, ``restore`` d) and only names cleared
        from it (``pyro.clear_param_store()``) are put back. Other names stay untouched."""
        global _OWNER
        if self.params is None:
            return
        store = pyro.get_param_store()
        current = dict(store.named_parameters())
        mine = self.params["params"]
        owner = _OWNER() if _OWNER is not None else None
        if owner is self:
            mine = {k: current.get(k, v) for k, v in mine.items()}
            self.params = {"params": mine, "constraints": self.params["constraints"]}
        if any(current.get(k) is not v for k, v in mine.items()):
            store.set_state({"params": dict(mine),
                             "constraints": dict(self.params["constraints"])})
        _OWNER = weakref.ref(self)

    @property
    def name(self) -> str:
        """The model name (``vae``, ``irt-2pl`` ...)."""
        return self.spec.model

    def data(self, split: str = "train") -> Any:
        """The run's data of ``split`` as the family loads it for this run (validated
        tensors; :meth:`Family.run_data`)."""
        return self.family.run_data(self, split)

    def config(self) -> dict:
        return {"family": self.family.name, "model": self.name,
                "spec": dataclasses.asdict(self.spec), "fit": self.fit_settings}


def read_config(path: str | Path) -> dict:
    """``config.json`` of a run folder; errors name the file and what is wrong."""
    path = Path(path)
    file = path / "config.json"
    if not file.exists():
        raise SetupError(f"{path} is not a ppl-vae run folder (no config.json); give the "
                         "--out folder of a 'ppl-vae train' run")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SetupError(f"{file}: not valid JSON ({e})") from e
    if isinstance(config, dict) and "model" in config and "spec" not in config:
        raise SetupError(f"{file}: written by ppl-vae 0.1 (a flat config without 'spec'); "
                         "this version cannot rebuild that run: train it again")
    if not isinstance(config, dict) or "model" not in config or "spec" not in config:
        raise SetupError(f"{file}: not a ppl-vae run config (needs the keys 'model' and "
                         "'spec')")
    return config


def checkpoint_of(path: str | Path, history_has_validation: bool | None = None) -> Path:
    """The checkpoint a reloaded run holds (module docstring's rule)."""
    path = Path(path)
    if history_has_validation is None:
        metrics = path / "metrics.csv"
        header = metrics.read_text().splitlines()[0] if metrics.exists() else ""
        history_has_validation = "val_elbo" in header.split(",")
    best = path / "best.pt"
    if history_has_validation and best.exists():
        return best
    return path / "checkpoint.pt"


def load_run(path: str | Path, device: str | torch.device = "cpu",
             checkpoint: str | Path | None = None) -> Run:
    """Rebuild a run's model and guide from its config.json and load its trained state
    (``checkpoint``: a file name in the folder or a path; default by the module's rule).
    Reads no data files. Checkpoints are read with ``weights_only=True``."""
    path = Path(path)
    config = read_config(path)
    family = family_of(config["model"])
    spec = family.spec_from_json(config["spec"])
    device = resolve_device(device)
    pyro.clear_param_store()
    model, guide = family.build(spec)
    file = checkpoint_of(path) if checkpoint is None else (
        path / checkpoint if not Path(checkpoint).is_absolute() else Path(checkpoint))
    state = load_checkpoint(file, device)
    stored = state["config"].get("extra", {}).get("model")
    if stored is not None and stored != config["model"]:
        raise SetupError(f"{file} was written by a {stored!r} run, not {config['model']!r}")
    try:
        restore(model, guide, state, family.example(spec), device=device)
    except (RuntimeError, KeyError, ValueError) as e:
        raise SetupError(f"{file} does not fit the model that {path / 'config.json'} "
                         f"describes (was config.json edited?): "
                         f"{' '.join(line.strip() for line in str(e).splitlines()[:2])[:300]}"
                         ) from e
    run = Run(path, family, spec, model, guide, dict(config.get("fit", {})),
              list(state["history"]), device, file)
    run.keep_params()
    return run


RUN_FILES = ("config.json", "checkpoint.pt", "best.pt", "metrics.csv", "failed.json")


@contextmanager
def run_lock(out: Path) -> Iterator[None]:
    """Hold ``out/.lock`` (pid and host) while a training writes the folder: a second writer
    is refused; a lock left by a dead process is taken over. Leftover temp files of saves
    that were killed midway (``.<name>.*.tmp``) are removed once the lock is held. Folders
    this call created are removed again if they are still empty when it ends (a start
    refused before it wrote anything leaves no trace)."""
    if out.exists() and not out.is_dir():
        raise SetupError(f"--out {out} is a file, not a run folder")
    created = _missing_folders(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SetupError(f"--out {out}: cannot create the run folder ({e.strerror})") from e
    try:
        with _locked(out):
            yield
    finally:
        for folder in created:  # innermost first; a folder with anything in it stays
            try:
                folder.rmdir()
            except OSError:
                break


def _missing_folders(out: Path) -> list[Path]:
    """``out`` and its ancestors that do not exist yet, innermost first."""
    missing = []
    for folder in (out, *out.absolute().parents):
        if folder.exists():
            break
        missing.append(folder)
    return missing


@contextmanager
def _locked(out: Path) -> Iterator[None]:
    """``out/.lock`` held for the ``with`` block (:func:`run_lock`)."""
    lock = out / ".lock"
    me = f"{os.getpid()} {socket.gethostname()}"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = lock.read_text(errors="replace").split()
            pid = int(holder[0]) if holder and holder[0].isdigit() else None
            host = holder[1] if len(holder) > 1 else None
            if pid is not None and host == socket.gethostname() and _alive(pid):
                raise SetupError(f"{out} is being written by another training (pid {pid}); "
                                 "wait for it to finish or choose another --out") from None
            lock.unlink(missing_ok=True)  # stale: its process is gone
            continue
        except OSError as e:
            raise SetupError(f"--out {out}: cannot write there ({e.strerror})") from e
        with os.fdopen(fd, "w") as f:
            f.write(me + "\n")
        break
    try:
        for leftover in out.glob(".*.tmp"):
            leftover.unlink(missing_ok=True)
        yield
    finally:
        lock.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _prepare_folder(out: Path, resume: bool, overwrite: bool) -> Path | None:
    """Refuse to touch an existing run unless told to continue or replace it. A run to be
    replaced is moved aside into ``out/.replaced`` (returned), to be put back if the new
    start fails before its first checkpoint (:func:`_settle_replaced`)."""
    existing = [name for name in RUN_FILES if (out / name).exists()]
    if resume:
        if not (out / "checkpoint.pt").exists():
            raise SetupError(f"--resume: {out} holds no checkpoint.pt to continue (start a new "
                             "run without --resume)")
        return
    # a start that failed before its first checkpoint (no CUDA, NaN in epoch 1) left only
    # its config: nothing to lose, so a new start may replace it
    trained = any((out / name).exists() for name in ("checkpoint.pt", "best.pt"))
    if existing and trained and not overwrite:
        raise SetupError(f"{out} already holds a run ({', '.join(existing)}): pass --resume "
                         "(resume=True) to continue it or --overwrite (overwrite=True) to "
                         "replace it")
    if not trained:
        for name in existing:
            (out / name).unlink()
        return None
    aside = out / ".replaced"
    shutil.rmtree(aside, ignore_errors=True)  # left by a killed replacement: that run is gone
    aside.mkdir()
    for file in out.iterdir():  # the whole run: its tables, figures and data copies too
        if not file.name.startswith("."):
            file.replace(aside / file.name)
    return aside


def _settle_replaced(out: Path, aside: Path | None, failed: bool) -> None:
    """Drop the replaced run once the new one stands, or put it back when the new start
    failed before writing its first checkpoint (bad input: nothing is lost)."""
    if aside is None:
        return
    if failed and not (out / "checkpoint.pt").exists():
        for file in aside.iterdir():
            target = out / file.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            file.replace(target)
    shutil.rmtree(aside, ignore_errors=True)


def train(model: str, out: str | Path | None = None, spec: dict | Any | None = None, *,
          resume: bool = False, overwrite: bool = False, progress: bool | None = None,
          **fit_options: Any) -> Run:
    """Train ``model`` (a registered model name) with its family's defaults.

    Args:
        model: ``vae``, ``irt-2pl``, ``prodlda`` ... (:func:`ppl_vae.family.model_names`).
        out: run folder (config.json, checkpoints, metrics.csv, the family's report).
        spec: the family's spec, or a dict of its fields (the rest take their defaults).
        resume: continue the run in ``out`` (its spec must be the same: fields missing
            from a dict ``spec``, or all with ``spec=None``, take the run's stored values;
            the family's own copy of the data is read where it keeps one).
        **fit_options: override the family's fit settings (:class:`ppl_vae.FitConfig`
            fields and ``devices``/``num_nodes``/``strategy``).

    The seed (``seed=``, default 0) is set before the model is built, so it fixes the
    initial weights too: the same spec and seed give the same run.

    An existing run in ``out`` is refused unless ``resume`` (continue it) or ``overwrite``
    (replace it); ``out/.lock`` keeps a second training out while this one writes.
    """
    if out is None:
        return _train(model, None, spec, resume, progress, fit_options)
    out = Path(out)
    multi = any(fit_options.get(k) is not None for k in ("devices", "num_nodes", "strategy"))
    if multi and launched_as_other_rank():  # rank 0 holds the lock and writes the folder
        return _train(model, out, spec, resume, progress, fit_options, writer=False)
    with run_lock(out):
        aside = _prepare_folder(out, resume, overwrite)
        try:
            run = _train(model, out, spec, resume, progress, fit_options)
        except BaseException:
            _settle_replaced(out, aside, failed=True)
            raise
        _settle_replaced(out, aside, failed=False)
        return run


def _train(model: str, out: Path | None, spec: Any, resume: bool, progress: bool | None,
           fit_options: dict, writer: bool = True) -> Run:
    family = family_of(model)
    unknown = set(fit_options) - set(FitConfig.__dataclass_fields__) - {
        "devices", "num_nodes", "strategy"}
    if unknown:
        raise SetupError(f"unknown fit settings {sorted(unknown)}")
    FitConfig(**{k: v for k, v in fit_options.items()  # the caller's own settings: checked
                 if k in FitConfig.__dataclass_fields__})  # before any data is read
    if resume and out is not None and (spec is None or isinstance(spec, dict)):
        spec = _resumed_spec(read_config(out), model, family, spec or {})
    if spec is None or isinstance(spec, dict):
        spec = family.make_spec(model, **(spec or {}))
    settings = family.with_overrides(spec, fit_options)
    if out is not None and resume:
        settings = _resumed_settings(read_config(out).get("fit"), settings, fit_options)
    family.check_fit_settings(spec, settings)
    settings.setdefault("seed", 0)
    FitConfig(**{k: v for k, v in settings.items()  # impossible settings: refused here,
                 if k in FitConfig.__dataclass_fields__})  # before anything is written
    run = Run(Path(out) if out is not None else None, family, spec, None, None,
              _jsonable(settings))
    config = run.config()
    if out is not None and resume:
        saved = read_config(out)
        if saved.get("spec") != config["spec"] or saved.get("model") != config["model"]:
            changed = {k: (saved.get("spec", {}).get(k), v) for k, v in config["spec"].items()
                       if saved.get("spec", {}).get(k) != v}
            raise SetupError(
                f"--resume with a different model spec than the run in {out}: "
                + ", ".join(f"{k} (run: {old!r}, given: {new!r})"
                            for k, (old, new) in sorted(changed.items()))
                + "; drop those settings to continue with the run's own, or train anew "
                "(--overwrite or another --out)")
    data = family.run_data(run, "train")
    val = family.run_data(run, "val")
    pyro.set_rng_seed(settings["seed"])  # before build: the seed fixes the initial weights
    run.model, run.guide = family.build(spec)
    if out is not None and writer:
        write_json(config, Path(out) / "config.json")
        if resume:  # `evaluate`'s figures are of the model before the resumed epochs
            (Path(out) / "evaluation.json").unlink(missing_ok=True)
    history = fit(run.model, run.guide, data, val_data=val, out=out, resume=resume,
                  progress=progress, config={"model": model}, **settings)
    run.history = list(history.rows)
    if not writer:  # another rank of a multi-process run: rank 0 reloads and reports
        return run
    run.device = next((p.device for m in (run.model, run.guide)
                       if isinstance(m, torch.nn.Module) for p in m.parameters()),
                      torch.device("cpu"))
    if out is not None:
        run.checkpoint = checkpoint_of(out, val is not None)
        if run.checkpoint.name == "best.pt" and history.best_epoch != len(history.rows):
            # report on the state a reloaded run holds: the best epoch's
            state = load_checkpoint(run.checkpoint, run.device)
            restore(run.model, run.guide, state, family.example(spec), device=run.device)
    elif (history.best_state is not None
          and history.best_epoch != len(history.rows)):  # no folder: the same, from memory
        restore(run.model, run.guide, history.best_state, family.example(spec),
                device=run.device)
    run.keep_params()
    problem = family.check_fit(run)
    if out is not None:
        failed = Path(out) / "failed.json"
        if problem:
            write_json({"failed": problem}, failed)
        elif failed.exists():
            failed.unlink()
    if problem:
        raise FitFailed(f"{out or model}: {problem}")
    if out is not None:
        family.report(run)
    return run


def _resumed_spec(saved: dict, model: str, family: Family, given: dict) -> Any:
    """The spec a resumed run continues with: the run's stored spec, with the fields the
    caller gave (``spec`` as a dict; the CLI passes only the flags on the command line) in
    place of the stored ones (a real difference is refused afterwards, naming both)."""
    if saved.get("model") != model:
        raise SetupError(f"--resume: the run holds a {saved.get('model')!r} model, not "
                         f"{model!r}")
    fields = {f.name for f in dataclasses.fields(family.Spec)}
    unknown = sorted(set(given) - fields)
    if unknown:
        raise SetupError(f"{model}: unknown settings {unknown}; known: {sorted(fields)}")
    return family.spec_from_json({**saved["spec"], **given, "model": model})


_OWNER: weakref.ref | None = None  # the Run whose parameters Pyro's param store holds

# what a resumed run may change; everything else continues as the run was set up
RESUMABLE = frozenset({"epochs", "patience", "device", "sync_every", "checkpoint_every",
                       "devices", "num_nodes",
                       "strategy"})


def _resumed_settings(saved: dict | None, settings: dict, given: dict) -> dict:
    """A resumed run trains with its stored fit settings, with only the :data:`RESUMABLE`
    ones (more epochs, say) taken from the call; a different learning rate, seed, schedule
    ... is refused (the optimizer's and schedule's states come from the checkpoint, so it
    could not take effect). Runs stored without fit settings take the call's."""
    if not saved:
        return settings
    changed = {k: (saved.get(k), v) for k, v in _jsonable(given).items()
               if k not in RESUMABLE and saved.get(k) != v}
    if changed:
        raise SetupError(
            "--resume continues a run with its own fit settings; these differ from it: "
            + ", ".join(f"{k} (run: {old!r}, given: {new!r})" for k, (old, new) in
                        sorted(changed.items()))
            + "; drop them, or train anew (--overwrite or another --out)")
    return {**saved, **{k: v for k, v in given.items() if k in RESUMABLE}}


def _jsonable(settings: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in settings.items()}
