"""The shared SVI engine: one ``fit`` for every Pyro model/guide pair.

A step: take a minibatch (sliced on the device), compute the objective's differentiable loss
(``model(*args, size=N, subsample=idx, **kwargs)`` -- see :mod:`ppl_vae.batching`),
backpropagate, clip, and step one torch optimizer over all parameters the pair uses.
Losses stay on the device; the host reads them every ``sync_every`` steps only.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyro
import pyro.poutine as poutine
import torch
from pyro.optim.clipped_adam import ClippedAdam
from tqdm.auto import tqdm

from .batching import Batch, Data, TensorBatches, make_batches
from .checkpoint import (
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    write_history_csv,
)
from .evaluation import elbo as evaluate_elbo
from .evaluation import eval_mode
from .objectives import make_objective
from .program import (
    Pair,
    SetupError,
    modules_of,
    needs_full_prototype,
    per_row_autoguide_sites,
)

__all__ = ["FitConfig", "History", "SetupError", "Trainer", "TrainingDiverged", "fit",
           "restore", "resolve_device"]


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or infinite; training stopped before corrupting checkpoints."""


@dataclass
class FitConfig:
    """Settings of a run (stored in the checkpoint; JSON-able)."""

    epochs: int = 10
    batch_size: int = 128
    objective: str = "trace"
    num_particles: int = 1
    optimizer: str = "adam"  # adam | adamw | clipped_adam
    lr: float = 1e-3
    weight_decay: float = 0.0
    lr_schedule: str | None = None  # None | cosine | exponential
    lr_gamma: float = 0.97  # per-epoch factor for the exponential schedule
    clip_norm: float | None = None
    kl_sites: tuple[str, ...] = ()
    beta: float = 1.0  # final weight of the kl_sites' KL term
    kl_anneal_epochs: float = 0.0  # ramp the weight linearly from 0 to beta over this many epochs
    patience: int | None = None  # early stopping on validation ELBO
    val_particles: int = 1
    seed: int = 0
    device: str = "auto"
    drop_last: bool = False
    sync_every: int = 50
    plate: str | None = None
    clear_param_store: bool = True  # start from a clean Pyro param store (Pyro's own advice)
    extra: dict = field(default_factory=dict)  # the caller's own settings (e.g. model spec)


@dataclass
class History:
    """Per-epoch rows: epoch, train_elbo and val_elbo (nats per example), seconds, lr."""

    rows: list[dict]
    best_epoch: int | None = None
    stopped_early: bool = False

    def __getitem__(self, key: str) -> list:
        return [row.get(key) for row in self.rows]

    def __len__(self) -> int:
        return len(self.rows)


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but no CUDA device is available; "
                         "use device='auto' or 'cpu'")
    return device


class Trainer:
    """Owns the SVI loop for one model/guide pair: parameters, optimizer, checkpoints."""

    def __init__(self, model: Callable, guide: Callable, config: FitConfig | None = None,
                 out: str | Path | None = None):
        self.config = config or FitConfig()
        self.pair = Pair(model, guide, plate=self.config.plate)
        self.model = self.pair.model  # called the engine's way (ppl_vae.program.Program)
        self.guide = self.pair.guide
        self.out = Path(out) if out is not None else None
        self.device = resolve_device(self.config.device)
        self.params: dict[str, torch.Tensor] = {}
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler = None
        self.history = History([])
        self.epoch = 0
        self._best = -math.inf
        self._bad_epochs = 0
        c = self.config
        if c.objective not in ("trace", "meanfield", "jit", "enum", "iwae"):
            raise ValueError(f"unknown objective {c.objective!r}")
        if c.objective == "jit" and c.kl_anneal_epochs:
            raise ValueError("KL annealing changes a constant every step; it cannot be "
                             "combined with objective='jit'")
        self.objective = make_objective(c.objective, c.num_particles, c.kl_sites, plate=c.plate)
        self.kl_weight = getattr(self.objective, "kl_weight", None)

    # ---- set-up ---------------------------------------------------------------------------
    def _modules(self) -> list[torch.nn.Module]:
        return self.pair.modules

    def _owner(self, role: str) -> torch.nn.Module | None:
        """The module behind the model (or guide): itself, or a bound method's owner; the
        guide's is None when it is the model's (``vae.model`` / ``vae.guide``)."""
        owners = modules_of(self.pair.raw_model if role == "model" else self.pair.raw_guide)
        if role == "guide" and owners and modules_of(self.pair.raw_model) \
                and owners[0] is modules_of(self.pair.raw_model)[0]:
            return None
        return owners[0] if owners else None

    def _discover_params(self, batch: Batch, full: Batch | None = None) -> None:
        """Run guide and model once (eval mode, no grad) to create and collect every
        parameter: Pyro params by their param-store names, sorted for a stable order.

        The pair's structure is checked on ``batch`` first (:func:`ppl_vae.program.inspect_pair`).
        ``full`` (all rows) is given when an autoguide over a model that does not subsample
        must see every row once to hold one parameter per row.
        """
        for m in self._modules():
            m.to(self.device)
        if full is not None:
            with eval_mode(self.model, self.guide), torch.no_grad(), poutine.block():
                full.call(self.guide)
        with eval_mode(self.model, self.guide):
            self.pair.inspect(batch)
        with eval_mode(self.model, self.guide), torch.no_grad(), \
                poutine.trace(param_only=True) as capture:
            guide_trace = poutine.trace(batch.call).get_trace(self.guide)
            poutine.replay(batch.call, trace=guide_trace)(self.model)
        params = {}
        for name, site in capture.trace.nodes.items():
            if site["type"] != "param":
                continue
            value = site["value"]
            # a param-store value carries its unconstrained leaf; a module-local nn.Parameter
            # (module_local_params=True) is its own leaf
            leaf = value.unconstrained() if hasattr(value, "unconstrained") else value
            if isinstance(leaf, torch.Tensor) and leaf.is_leaf and leaf.requires_grad \
                    and not any(leaf is p for p in params.values()):  # one name per tensor
                params[name] = leaf
        if self.config.objective == "jit":
            store = pyro.get_param_store()
            local = [name for name in params if name not in store]
            if local:
                raise SetupError(
                    f"objective='jit' (Pyro's JitTrace_ELBO) reads parameters from the global "
                    f"param store, but {local[0]!r} ({len(local)} in all) belongs to a "
                    "PyroModule whose parameters stay in the module "
                    "(pyro.settings module_local_params=True); use objective='trace' or "
                    "'meanfield' for this model and guide")
        for i, m in enumerate(self._modules()):
            for name, p in m.named_parameters():
                if not any(p is q for q in params.values()):
                    params[f"_module{i}.{name}"] = p
        if not params:
            raise SetupError("the model and guide have no parameters to train")
        self.params = dict(sorted(params.items()))

    def _make_optimizer(self) -> None:
        c = self.config
        params = list(self.params.values())
        # one optimizer over all parameters with fused kernels (Pyro's pyro.optim wraps one
        # optimizer per parameter: many small kernel launches per step)
        fused = {"fused": True} if all(p.is_floating_point() and p.device.type in
                                       ("cpu", "cuda") for p in params) else {}
        if c.optimizer == "adam":
            self.optimizer = torch.optim.Adam(params, lr=c.lr, weight_decay=c.weight_decay,
                                              **fused)
        elif c.optimizer == "adamw":
            self.optimizer = torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay,
                                               **fused)
        elif c.optimizer == "clipped_adam":
            self.optimizer = ClippedAdam(params, lr=c.lr, weight_decay=c.weight_decay,
                                         clip_norm=c.clip_norm or 10.0)
        else:
            raise ValueError(f"unknown optimizer {c.optimizer!r}; choose adam, adamw or "
                             "clipped_adam")
        if c.lr_schedule == "cosine":
            self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
                self.optimizer, T_max=max(1, c.epochs))
        elif c.lr_schedule == "exponential":
            self.scheduler = torch.optim.lr_scheduler.ExponentialLR(self.optimizer, c.lr_gamma)
        elif c.lr_schedule not in (None, "", "constant"):
            raise ValueError(f"unknown lr_schedule {c.lr_schedule!r}; choose cosine, "
                             "exponential or constant")

    # ---- checkpoints ----------------------------------------------------------------------
    def _free_params(self) -> dict[str, torch.Tensor]:
        """Pyro params that live outside the model/guide modules (saved by name; module
        parameters are saved with the modules' state dicts)."""
        owned = {id(p) for m in self._modules() for p in m.parameters()}
        return {k: v for k, v in self.params.items() if id(v) not in owned}

    def state_dict(self, batches) -> dict:
        return {
            "config": _jsonable(asdict(self.config)),
            "epoch": self.epoch,
            "model": self._owner("model").state_dict() if self._owner("model") else {},
            "guide": self._owner("guide").state_dict() if self._owner("guide") else {},
            "params": {k: v.detach().cpu() for k, v in self._free_params().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler else {},
            "rng": rng_state(batches.generator),
            "history": self.history.rows,
            "early_stopping": {"best": self._best, "bad_epochs": self._bad_epochs,
                               "best_epoch": self.history.best_epoch or 0},
        }

    def load_state_dict(self, state: dict, batches=None, rng: bool = True) -> None:
        for role in ("model", "guide"):
            owner = self._owner(role)
            if owner is not None:
                owner.load_state_dict(state[role])
        free = self._free_params()
        missing = [k for k in free if k not in state["params"]]
        if missing:
            raise ValueError(f"checkpoint lacks parameters {missing[:5]}: was it written by "
                             "another model or guide?")
        with torch.no_grad():
            for name, p in free.items():
                value = state["params"][name]
                if value.shape != p.shape:
                    raise ValueError(f"parameter {name}: checkpoint shape {tuple(value.shape)} "
                                     f"!= model shape {tuple(p.shape)}")
                p.copy_(value.to(p.device))
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler"):
            self.scheduler.load_state_dict(state["scheduler"])
        self.epoch = int(state["epoch"])
        self.history = History(list(state["history"]))
        es = state.get("early_stopping", {})
        self._best = float(es.get("best", -math.inf))
        self._bad_epochs = int(es.get("bad_epochs", 0))
        self.history.best_epoch = int(es.get("best_epoch", 0)) or None
        if rng:
            set_rng_state(state["rng"], batches.generator if batches is not None else None)

    # ---- the loop -------------------------------------------------------------------------
    def fit(self, data: Data, val_data: Data | None = None, resume: str | Path | bool = False,
            num_data: int | None = None, progress: bool | None = None,
            callbacks: Iterable[Callable[[Trainer, dict], None]] = ()) -> History:
        c = self.config
        if c.clear_param_store:
            pyro.clear_param_store()
        pyro.set_rng_seed(c.seed)
        batches = make_batches(data, c.batch_size, self.device, shuffle=True,
                               drop_last=c.drop_last or c.objective == "jit",
                               num_data=num_data, name="data")
        batches.generator.manual_seed(c.seed)
        first = (batches.take(torch.arange(batches.batch_size, device=self.device))
                 if isinstance(batches, TensorBatches) else next(iter(batches)))
        full = None
        if isinstance(batches, TensorBatches) and needs_full_prototype(
                self.pair, batches.num_examples, batches.batch_size):
            full = batches.take(torch.arange(batches.num_examples, device=self.device))
        streamed = not isinstance(batches, TensorBatches)
        try:
            with pyro.validation_enabled(True):
                self._discover_params(first, full)
        except ValueError as e:
            if streamed and per_row_autoguide_sites(self.pair):
                raise self._streamed_error() from e
            raise
        if streamed and per_row_autoguide_sites(self.pair):
            raise self._streamed_error()
        pyro.set_rng_seed(c.seed)  # training draws do not depend on the set-up's traces
        self._make_optimizer()
        if resume:
            path = self.out / "checkpoint.pt" if resume is True else Path(resume)
            if resume is True and self.out is None:
                raise ValueError("resume=True needs out= (the run folder)")
            self.load_state_dict(load_checkpoint(path, self.device), batches)
        for m in self._modules():
            m.train()
        steps = len(batches)
        total = max(0, c.epochs - self.epoch) * steps
        bar = tqdm(total=total, unit="step", dynamic_ncols=True,
                   disable=None if progress is None else not progress)
        try:
            while self.epoch < c.epochs:
                row = self._run_epoch(batches, bar)
                if val_data is not None:
                    row["val_elbo"] = evaluate_elbo(
                        self.model, self.guide, val_data, num_particles=c.val_particles,
                        batch_size=max(c.batch_size, 256), plate=c.plate, device=self.device,
                        progress=False)
                    for m in self._modules():
                        m.train()
                self.history.rows.append(row)
                improved = self._early_stopping(row)
                bar.set_postfix(epoch=self.epoch, elbo=f"{row['train_elbo']:.2f}",
                                **({"val": f"{row['val_elbo']:.2f}"} if "val_elbo" in row
                                   else {}))
                self._save(batches, best=improved)
                for callback in callbacks:
                    callback(self, row)
                if c.patience is not None and self._bad_epochs >= c.patience:
                    self.history.stopped_early = True
                    break
        finally:
            bar.close()
        return self.history

    def _streamed_error(self) -> SetupError:
        return SetupError(
            f"the guide keeps one parameter per row for {per_row_autoguide_sites(self.pair)}, "
            "but streamed minibatches carry positions within the epoch, not row ids: pass the "
            "data as tensors (a tensor, tuple or dict), or use an amortized guide")

    def _run_epoch(self, batches, bar) -> dict:
        c = self.config
        self.epoch += 1
        start = time.perf_counter()
        steps = len(batches)
        pending: list[torch.Tensor] = []
        total = torch.zeros((), device=self.device)
        done = 0
        with pyro.validation_enabled(False):
            for step, batch in enumerate(batches, start=1):
                if self.kl_weight is not None:
                    self.kl_weight.factor = self._kl_factor(step, steps)
                loss = self.objective(self.model, self.guide, batch)
                loss.backward()
                if c.clip_norm is not None and c.optimizer != "clipped_adam":
                    torch.nn.utils.clip_grad_norm_(self.params.values(), c.clip_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                pending.append(loss.detach())
                if len(pending) >= c.sync_every or step == steps:
                    chunk = torch.stack(pending)
                    if not bool(torch.isfinite(chunk).all()):
                        bad = step - len(pending) + 1 + int((~torch.isfinite(chunk)).nonzero()[0])
                        self._diverged(bad, steps, float(chunk[bad - step + len(pending) - 1]))
                    total += chunk.sum()
                    done += len(pending)
                    bar.update(len(pending))
                    bar.set_postfix(epoch=self.epoch,
                                    elbo=f"{-float(chunk.mean()) / batches.num_examples:.2f}")
                    pending = []
        if self.scheduler is not None:
            self.scheduler.step()
        row = {"epoch": self.epoch,
               "train_elbo": -float(total) / max(done, 1) / batches.num_examples,
               "seconds": time.perf_counter() - start,
               "lr": self.optimizer.param_groups[0]["lr"]}
        if self.kl_weight is not None:
            row["beta"] = self.kl_weight.factor
        return row

    def _kl_factor(self, step: int, steps: int) -> float:
        c = self.config
        if c.kl_anneal_epochs <= 0:
            return c.beta
        progress = (self.epoch - 1 + step / steps) / c.kl_anneal_epochs
        return c.beta * min(1.0, progress)

    def _diverged(self, step: int, steps: int, value: float) -> None:
        where = f"{self.out / 'checkpoint.pt'}" if self.out else "none (no out= folder)"
        raise TrainingDiverged(
            f"loss became {value} at epoch {self.epoch}, step {step} of {steps}. "
            f"The last good checkpoint is kept: {where} (epoch {self.epoch - 1}). "
            "Remedies: lower the learning rate, set clip_norm (e.g. 10), use "
            "optimizer='clipped_adam', or check the data for extreme values.")

    def _early_stopping(self, row: dict) -> bool:
        score = row.get("val_elbo", row["train_elbo"])
        if score > self._best:
            self._best = score
            self._bad_epochs = 0
            self.history.best_epoch = self.epoch
            return True
        self._bad_epochs += 1
        return False

    def _save(self, batches, best: bool) -> None:
        if self.out is None:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        state = self.state_dict(batches)
        save_checkpoint(state, self.out / "checkpoint.pt")
        if best:
            save_checkpoint(state, self.out / "best.pt")
        write_history_csv(self.history.rows, self.out / "metrics.csv")


def fit(model: Callable, guide: Callable, data: Data, val_data: Data | None = None, *,
        epochs: int = 10, batch_size: int = 128, objective: str = "trace",
        num_particles: int = 1, optimizer: str = "adam", lr: float = 1e-3,
        lr_schedule: str | None = None, clip_norm: float | None = None,
        kl_sites: Iterable[str] = (), beta: float = 1.0, kl_anneal_epochs: float = 0.0,
        patience: int | None = None, seed: int = 0, device: str = "auto",
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
        objective: ``trace`` | ``meanfield`` | ``jit`` | ``enum`` | ``iwae``
            (``iwae`` uses ``num_particles`` importance samples).
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
    cfg = FitConfig(epochs=epochs, batch_size=batch_size, objective=objective,
                    num_particles=num_particles, optimizer=optimizer, lr=lr,
                    lr_schedule=lr_schedule, clip_norm=clip_norm, kl_sites=tuple(kl_sites),
                    beta=beta, kl_anneal_epochs=kl_anneal_epochs, patience=patience, seed=seed,
                    device=device, extra=dict(config or {}), **options)
    if cfg.beta != 1.0 and not cfg.kl_sites:
        warnings.warn("beta has no effect without kl_sites (the latent sites to weight)",
                      stacklevel=2)
    if devices is not None or num_nodes is not None or strategy is not None:
        from .distributed import fit_distributed  # lightning is optional

        return fit_distributed(model, guide, data, cfg, devices=devices,
                               num_nodes=num_nodes or 1, strategy=strategy or "ddp",
                               accelerator=None, out=out, val_data=val_data, resume=resume,
                               progress=progress, num_data=num_data)
    return Trainer(model, guide, cfg, out=out).fit(data, val_data, resume=resume,
                                                   num_data=num_data, progress=progress)


def restore(model: Callable, guide: Callable, checkpoint: str | Path | dict, data: Data,
            device: str | torch.device = "cpu") -> dict:
    """Load a checkpoint's parameters into ``model`` and ``guide`` (for evaluation or sampling).

    ``data`` is one small example batch (any slice of the training data) used to create the
    parameters before they are overwritten. Clears Pyro's param store first, as ``fit`` does.
    Returns the checkpoint dict.
    """
    state = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint, device)
    pyro.clear_param_store()
    cfg = FitConfig(device=str(device), plate=state["config"].get("plate"))
    trainer = Trainer(model, guide, cfg)
    batches = make_batches(data, 8, trainer.device, shuffle=False)
    first = next(iter(batches))
    full = None
    if isinstance(batches, TensorBatches) and needs_full_prototype(
            trainer.pair, batches.num_examples, batches.batch_size):
        full = batches.take(torch.arange(batches.num_examples, device=trainer.device))
    trainer._discover_params(first, full)
    trainer.load_state_dict(state, rng=False)
    for m in trainer._modules():
        m.eval()
    return state


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)
