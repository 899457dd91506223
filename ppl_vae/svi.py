"""The engine's entry points: :func:`fit` (one process, or data-parallel through
Lightning) and :func:`restore`. The loop itself is :class:`ppl_vae.training.Trainer`;
:mod:`ppl_vae.distributed` drives the same Trainer, so this module imports both and neither
imports it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pyro
import torch
from pyro.infer.autoguide import AutoGuide

from .batching import Data, TensorBatches, make_batches
from .checkpoint import load_checkpoint
from .program import SetupError, modules_of, per_row_autoguide_sites, warn_user
from .training import FitConfig, History, Trainer

__all__ = ["fit", "restore"]


def fit(model: Callable, guide: Callable, data: Data, val_data: Data | None = None, *,
        epochs: int = 10, batch_size: int = 128, objective: str = "trace",
        num_particles: int = 1, optimizer: str = "adam", lr: float | None = None,
        lr_schedule: str | None = None, clip_norm: float | None = None,
        kl_sites: Iterable[str] = (), beta: float = 1.0, kl_anneal_epochs: float = 0.0,
        patience: int | None = None, seed: int | None = None, device: str = "auto",
        out: str | Path | None = None, resume: str | Path | bool = False,
        num_data: int | None = None, progress: bool | None = None,
        config: dict | None = None, devices: int | str | list[int] | None = None,
        num_nodes: int | None = None, strategy: str | None = None,
        **options: Any) -> History:
    """Train ``guide`` (and the model's parameters) by stochastic variational inference.

    Args:
        model, guide: Pyro programs called as ``fn(*batch, size=N, subsample=idx)``
            (see :mod:`ppl_vae.batching` for the convention).
        data: a tensor, tuple/dict of tensors (first dim = examples; moved to the device once)
            or an iterable of minibatches (then give ``num_data`` if it has no ``.dataset``).
        val_data: same structure; its ELBO per example is recorded each epoch and drives
            early stopping (``patience`` epochs without improvement).
        objective: ``trace`` | ``meanfield`` | ``jit`` | ``enum`` | ``iwae`` | ``renyi``
            (``iwae``/``renyi`` use ``num_particles`` importance samples; ``renyi_alpha``).
            A name, not a Pyro ELBO object: the error for one names the settings that give
            its bound. An objective that cannot train the pair (``meanfield``, ``iwae`` or
            ``renyi`` with a discrete guide site; ``trace``/``meanfield``/``jit`` with a
            ``config_enumerate``-d model site) is refused before training, naming one that
            can (:func:`ppl_vae.objectives.check_objective`).
        lr, seed: default 1e-3 and 0; a resumed run continues with its own (its optimizer's
            and random states come from the checkpoint): another value is refused, as are
            another ``weight_decay`` or ``lr_gamma``.
        kl_sites, beta, kl_anneal_epochs: weight the KL term of these latent sites by beta,
            ramped linearly from 0 over ``kl_anneal_epochs`` epochs.
        out: run folder: ``checkpoint.pt`` (every epoch, atomic), ``best.pt``, ``metrics.csv``.
        resume: ``True`` (``out/checkpoint.pt``) or a checkpoint path: continue that run.
        config: extra JSON-able settings stored in the checkpoint (e.g. the model spec).
        devices, num_nodes, strategy: any of them given -> data-parallel training through
            PyTorch Lightning (:func:`ppl_vae.distributed.fit_distributed`; optional
            dependency ``lightning``): ``devices`` processes per node (CPU) or GPUs,
            ``strategy`` default ``ddp``; ``batch_size`` is then the global batch size.
        **options: further :class:`FitConfig` fields (weight_decay, lr_gamma, drop_last,
            val_particles, sync_every, plate, optimizer).

    Returns:
        :class:`History` with one row per epoch: ``train_elbo``, ``val_elbo`` (nats per
        example), ``seconds``, ``lr``.
    """
    unknown = set(options) - set(FitConfig.__dataclass_fields__)
    if unknown:
        raise TypeError(f"fit() got unknown options {sorted(unknown)}")
    state = _checkpoint_to_resume(resume, out)
    given = {"lr": lr, "seed": seed, **{k: options.pop(k, None) for k in CONTINUED}}
    kept = _continued(state["config"] if state else {}, given)
    cfg = FitConfig(epochs=epochs, batch_size=batch_size, objective=objective,
                    num_particles=num_particles, optimizer=optimizer, lr=kept["lr"],
                    lr_schedule=lr_schedule, clip_norm=clip_norm, kl_sites=tuple(kl_sites),
                    beta=beta, kl_anneal_epochs=kl_anneal_epochs, patience=patience,
                    seed=kept["seed"], device=device, extra=dict(config or {}), **options,
                    **{k: kept[k] for k in CONTINUED})
    if cfg.beta != 1.0 and not cfg.kl_sites:
        warn_user("beta has no effect without kl_sites (the latent sites to weight)")
    if devices is not None or num_nodes is not None or strategy is not None:
        from .distributed import fit_distributed  # lightning is optional

        return fit_distributed(model, guide, data, cfg, devices=devices,
                               num_nodes=num_nodes or 1, strategy=strategy or "ddp",
                               accelerator=None, out=out, val_data=val_data, resume=resume,
                               progress=progress, num_data=num_data)
    return Trainer(model, guide, cfg, out=out).fit(data, val_data, resume=state or False,
                                                   num_data=num_data, progress=progress)


# settings a resumed run takes from its checkpoint (the optimizer's and scheduler's state),
# beside lr and seed: given explicitly, they must be the run's
CONTINUED = ("weight_decay", "lr_gamma")


def _checkpoint_to_resume(resume: str | Path | bool, out: str | Path | None) -> dict | None:
    """The checkpoint ``resume`` names (True: ``out/checkpoint.pt``), loaded; None if none."""
    if not resume:
        return None
    if resume is True and out is None:
        raise ValueError("resume=True needs out= (the run folder)")
    return load_checkpoint(Path(out) / "checkpoint.pt" if resume is True else resume)


def _continued(stored: dict, given: dict) -> dict:
    """The ``given`` settings (None: not given) a fit runs with: on resume (``stored``: the
    checkpoint's settings) the run's own, and another value given is refused naming both;
    else the given ones or the defaults."""
    changed = {k: (stored[k], v) for k, v in given.items()
               if v is not None and k in stored and stored[k] != v}
    if changed:
        raise SetupError(
            "resume continues a run with its own settings (its optimizer's and random states "
            "come from the checkpoint); these differ from it: "
            + ", ".join(f"{k} (run: {old!r}, given: {new!r})" for k, (old, new) in
                        sorted(changed.items()))
            + "; leave them out (or pass the run's), or train anew in another out= folder")
    defaults = FitConfig()
    return {k: v if v is not None else stored.get(k, getattr(defaults, k))
            for k, v in given.items()}


def restore(model: Callable, guide: Callable, checkpoint: str | Path | dict, data: Data,
            device: str | torch.device = "cpu") -> dict:
    """Load a checkpoint's parameters into ``model`` and ``guide`` (for evaluation or sampling).

    ``data`` is one small example batch (any slice of the training data) used to create the
    parameters before they are overwritten. An autoguide keeping one parameter per training
    row (AutoNormal, AutoDelta over a per-row latent), or a guide function that is not a
    network's method (whose ``pyro.param`` s may be per row), is set up for the checkpoint's
    number of rows (the slice's rows repeated). Clears Pyro's param store first, as ``fit`` does.
    Returns the checkpoint dict.
    """
    state = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint, device)
    pyro.clear_param_store()
    saved = state["config"]  # the objective too: an enumerating pair is refused under trace
    cfg = FitConfig(device=str(device), plate=saved.get("plate"),
                    objective=saved.get("objective") or "trace")
    trainer = Trainer(model, guide, cfg)
    rows = state.get("num_examples")  # checkpoints of earlier versions lack it
    batches = make_batches(data, 8, trainer.device, shuffle=False)
    if rows and isinstance(batches, TensorBatches) and batches.num_examples < rows \
            and (_has_autoguide(guide)
                 or not isinstance(getattr(guide, "__self__", guide), torch.nn.Module)):
        batches = make_batches(_repeat_rows(batches, rows), rows, trainer.device, shuffle=False)
    trainer.setup(batches, training=False)
    try:
        trainer.load_state_dict(state, rng=False)
    except (RuntimeError, ValueError) as e:
        sites = per_row_autoguide_sites(trainer.pair)
        if not sites or batches.num_examples == rows:
            raise
        raise SetupError(
            f"the guide keeps one parameter per training row for {sites}, and the checkpoint "
            f"holds them for {rows or 'another number of'} rows: pass restore all the "
            f"training rows ({batches.num_examples} given)") from e
    for m in trainer.pair.modules:
        m.eval()
    return state


def _has_autoguide(guide: Callable) -> bool:
    """Whether ``guide`` is or holds an AutoGuide (which may keep parameters per row)."""
    return any(isinstance(m, AutoGuide) for owner in modules_of(guide) for m in owner.modules())


def _repeat_rows(batches: TensorBatches, rows: int) -> tuple | dict:
    """``batches``' data with its rows repeated to ``rows`` rows, in the user's structure."""
    batch = batches.take(torch.arange(rows, device=batches.device) % batches.num_examples)
    return batch.kwargs or batch.args
