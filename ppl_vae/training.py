"""The shared SVI engine: one ``fit`` for every Pyro model/guide pair.

A step: take a minibatch (sliced on the device), compute the objective's differentiable loss
(``model(*args, size=N, subsample=idx, **kwargs)`` -- see :mod:`ppl_vae.batching`),
backpropagate, clip, and step one torch optimizer over all parameters the pair uses.
Losses stay on the device; the host reads them every ``sync_every`` steps only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
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
from .objectives import check_objective, make_objective, objective_name
from .program import (
    Pair,
    SetupError,
    autoguides_set_up,
    calling_error,
    modules_of,
    needs_full_prototype,
    per_row_autoguide_sites,
    reset_autoguide_plates,
    warn_user,
)

__all__ = ["FitConfig", "History", "SetupError", "Trainer", "TrainingDiverged",
           "resolve_device"]


class TrainingDiverged(FloatingPointError):
    """The loss became NaN, infinite, or implausibly large (over :data:`PLAUSIBLE` times the
    first step's per-example size), or a parameter NaN or infinite (a NaN gradient); training
    stopped before corrupting checkpoints."""


class FitFailed(RuntimeError):
    """Training ran to its end but the family's check (:meth:`ppl_vae.family.Family.check_fit`)
    found the fit unusable, e.g. an ability encoder that gives every student the same value.
    The run folder keeps its checkpoints and a failed.json with the reason, and no result
    tables."""


PLAUSIBLE = 1e6  # a per-example |ELBO| this many times the first step's is a runaway


@dataclass
class FitConfig:
    """Settings of a run (stored in the checkpoint; JSON-able)."""

    epochs: int = 10
    batch_size: int = 128
    objective: str = "trace"  # trace | meanfield | jit | enum | iwae | renyi
    renyi_alpha: float = 0.5  # objective="renyi": 0 is the IWAE bound, 1 the ELBO
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
    # epochs 1..warmup_epochs are never kept as the best (best.pt) and not counted by early
    # stopping: a model can score best on validation data before it has learned its
    # structure (a topic model ignoring its topics). Capped at epochs - 1.
    warmup_epochs: int = 0
    val_particles: int = 1
    seed: int = 0
    device: str = "auto"
    drop_last: bool = False
    # sparse (CSR/COO) data reach the model and guide as CSR minibatches instead of dense
    # rows; both must accept them (the topic models do). Cheaper when rows are mostly zeros.
    # The Lightning path (devices=...) hands over dense rows, as before.
    sparse_batches: bool = False
    sync_every: int = 50
    # with out=: write checkpoint.pt, best.pt and metrics.csv every this many epochs (and at
    # the last one); many one-step epochs (full-batch SVI) then do not spend their time
    # writing files. The best epoch's state waits in memory until the next write.
    checkpoint_every: int = 1
    plate: str | None = None
    clear_param_store: bool = True  # start from a clean Pyro param store (Pyro's own advice)
    extra: dict = field(default_factory=dict)  # the caller's own settings (e.g. model spec)

    def __post_init__(self) -> None:
        def need(ok: bool, what: str, value: Any) -> None:
            if not ok:
                raise SetupError(f"{what}, got {value!r}")

        self.objective = objective_name(self.objective)
        if not isinstance(self.optimizer, str):
            raise SetupError(refuse_optimizer(self.optimizer))
        if self.optimizer not in OPTIMIZERS:
            raise SetupError(f"unknown optimizer {self.optimizer!r}; choose adam, adamw or "
                             "clipped_adam")
        if self.lr_schedule not in (None, "", "constant", "cosine", "exponential"):
            raise SetupError(f"unknown lr_schedule {self.lr_schedule!r}; choose cosine, "
                             "exponential or None (constant)")
        need(isinstance(self.epochs, int) and self.epochs >= 1, "epochs must be >= 1",
             self.epochs)
        need(isinstance(self.batch_size, int) and self.batch_size >= 1,
             "batch_size must be >= 1", self.batch_size)
        need(isinstance(self.num_particles, int) and self.num_particles >= 1,
             "num_particles (--particles) must be >= 1", self.num_particles)
        need(self.lr > 0 and math.isfinite(self.lr), "lr must be a positive number", self.lr)
        need(self.sync_every >= 1, "sync_every must be >= 1", self.sync_every)
        need(self.checkpoint_every >= 1, "checkpoint_every must be >= 1",
             self.checkpoint_every)
        need(self.patience is None or self.patience >= 1, "patience must be >= 1",
             self.patience)
        need(self.beta >= 0, "beta must be >= 0", self.beta)
        need(self.clip_norm is None or self.clip_norm > 0, "clip_norm must be > 0",
             self.clip_norm)
        need(self.kl_anneal_epochs >= 0, "kl_anneal_epochs must be >= 0", self.kl_anneal_epochs)
        need(self.val_particles >= 1, "val_particles must be >= 1", self.val_particles)
        need(isinstance(self.warmup_epochs, int) and self.warmup_epochs >= 0,
             "warmup_epochs must be an integer >= 0", self.warmup_epochs)


def refuse_per_row_validation(pair) -> None:
    """Validation data cannot be scored by a guide with one parameter per training row
    (AutoNormal, AutoDelta over a per-row latent): its rows have none of their own."""
    sites = per_row_autoguide_sites(pair)
    if sites:
        raise SetupError(
            f"the guide keeps one parameter per training row for {', '.join(sites)}, so "
            "validation rows have none of their own and val_data cannot be scored: drop "
            "val_data, or use an amortized guide for the per-row latents "
            "(ppl_vae.guides.amortized.AmortizedNormal)")


OPTIMIZERS = ("adam", "adamw", "clipped_adam")


def refuse_optimizer(optimizer: Any) -> str:
    """The message for an optimizer given as an object (pyro.optim or torch.optim) instead of
    one of :data:`OPTIMIZERS`, with the settings that give it here."""
    kind = getattr(optimizer, "__name__", type(optimizer).__name__)
    args = getattr(optimizer, "pt_optim_args", None) or {}  # pyro.optim.Adam({"lr": ...})
    if callable(args):
        args = {}
    if hasattr(optimizer, "pt_optim_constructor"):
        kind = optimizer.pt_optim_constructor.__name__
    name = {"Adam": "adam", "AdamW": "adamw", "ClippedAdam": "clipped_adam"}.get(kind)
    settings = {"optimizer": name, **{k: v for k, v in args.items()
                                      if k in ("lr", "weight_decay", "clip_norm")}}
    how = (", ".join(f"{k}={v!r}" for k, v in settings.items()) if name else
           f"one of optimizer={', '.join(map(repr, OPTIMIZERS))} with lr=")
    return (f"optimizer takes a name, not {kind} (the engine builds one fused torch "
            f"optimizer over all parameters, with lr_schedule= for schedules): pass {how}")


@dataclass
class History:
    """Per-epoch rows: epoch, train_elbo and val_elbo (nats per example), seconds, lr."""

    rows: list[dict]
    best_epoch: int | None = None
    stopped_early: bool = False
    # without a run folder and with validation data: the best epoch's state (checkpoint
    # form) kept in memory
    best_state: dict | None = field(default=None, repr=False)

    def __getitem__(self, key: str | int) -> list | dict:
        """A column by name (``history["val_elbo"]``: one value per epoch) or a row by
        position (``history[-1]``: the last epoch's dict)."""
        if isinstance(key, int):
            return self.rows[key]
        return [row.get(key) for row in self.rows]

    def __iter__(self):
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise SetupError(f"device={str(device)!r} is not a torch device: use 'auto', 'cpu', "
                         "'cuda' or 'cuda:N'") from e
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
        self.buffers: dict[str, torch.Tensor] = {}  # of modules outside the pair's own
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler = None
        self.history = History([])
        self.epoch = 0
        self._best = -math.inf
        self._best_state: dict | None = None  # the best epoch's state, not yet written
        self._saved_epoch = 0  # the epoch checkpoint.pt holds
        self._bad_epochs = 0
        self._scale: float | None = None
        c = self.config
        if c.objective == "jit" and c.kl_anneal_epochs:
            raise ValueError("KL annealing changes a constant every step; it cannot be "
                             "combined with objective='jit'")
        self.objective = make_objective(c.objective, c.num_particles, c.kl_sites, plate=c.plate,
                                        renyi_alpha=c.renyi_alpha)
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
                try:
                    full.call(self.guide)
                except TypeError as e:  # the data's form does not fit the signature
                    raise calling_error(e) from e
        with eval_mode(self.model, self.guide):
            structure = self.pair.inspect(batch)
        check_objective(self.config.objective, structure)
        unknown = [k for k in self.config.kl_sites if k not in structure.latents]
        if unknown:
            raise SetupError(f"kl_sites names {unknown[0]!r}, which is not a latent site of the "
                             f"model (its latent sites: {', '.join(structure.latents) or 'none'})")
        called: list[torch.nn.Module] = []
        hook = torch.nn.modules.module.register_module_forward_pre_hook(
            lambda module, args: called.append(module))
        try:
            with eval_mode(self.model, self.guide), torch.no_grad(), \
                    poutine.trace(param_only=True) as capture:
                guide_trace = poutine.trace(batch.call).get_trace(self.guide)
                poutine.replay(batch.call, trace=guide_trace)(self.model)
        finally:
            hook.remove()
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
        self.buffers = self._called_buffers(called)

    def _called_buffers(self, called: list[torch.nn.Module]) -> dict[str, torch.Tensor]:
        """Buffers (BatchNorm's running statistics ...) of the modules the pair called that
        are not its own modules (``pyro.module("decoder", net)`` in a plain function: the
        param store keeps their parameters only), named like their module's parameters
        (``decoder$$$1.running_mean`` beside ``decoder$$$1.weight``)."""
        names = {id(p): name for name, p in self.params.items()}
        seen = {id(b) for m in self._modules() for b in m.buffers()}  # in the state dicts
        buffers = {}
        for module in called:
            local, name = next(((local, names[id(p)]) for local, p in module.named_parameters()
                                if id(p) in names), (None, None))
            if name is None or not name.endswith(local):
                continue
            prefix = name[:len(name) - len(local)]
            for path, b in module.named_buffers():
                if id(b) not in seen:
                    seen.add(id(b))
                    buffers[prefix + path] = b
        return dict(sorted(buffers.items()))

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
            raise SetupError(f"unknown optimizer {c.optimizer!r}; choose adam, adamw or "
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
            "buffers": {k: v.detach().cpu() for k, v in self.buffers.items()},
            "num_examples": self._num_examples,
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
            if "buffers" in state:  # checkpoints of earlier versions hold none
                for name, b in self.buffers.items():
                    value = state["buffers"].get(name)
                    if value is None or value.shape != b.shape:
                        raise ValueError(f"buffer {name}: the checkpoint holds "
                                         f"{'none' if value is None else tuple(value.shape)}"
                                         f", the model {tuple(b.shape)}")
                    b.copy_(value.to(b.device))
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler"):
            self.scheduler.load_state_dict(state["scheduler"])
            self._stretch_cosine(max(1, self.config.epochs))
        self.epoch = self._saved_epoch = int(state["epoch"])
        self.history = History(list(state["history"]))
        es = state.get("early_stopping", {})
        self._best = float(es.get("best", -math.inf))
        self._bad_epochs = int(es.get("bad_epochs", 0))
        self.history.best_epoch = int(es.get("best_epoch", 0)) or None
        if rng:
            set_rng_state(state["rng"], batches.generator if batches is not None else None)

    def _stretch_cosine(self, epochs: int) -> None:
        """A resumed run asked for another number of epochs than its cosine schedule spans
        (continuing a finished run: its rate is 0 there): the schedule now spans ``epochs``,
        the rate set to the closed form at the epochs done."""
        s = self.scheduler
        if not isinstance(s, torch.optim.lr_scheduler.CosineAnnealingLR) or s.T_max == epochs:
            return
        s.T_max = epochs
        for group, base in zip(self.optimizer.param_groups, s.base_lrs):
            group["lr"] = s.eta_min + (base - s.eta_min) * (
                1 + math.cos(math.pi * min(s.last_epoch, epochs) / epochs)) / 2
        s._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    # ---- the loop, as public hooks (the Lightning path drives the same ones) --------------
    def setup(self, batches, resume: str | Path | bool | dict = False,
              training: bool = True) -> None:
        """Before the first step: find the pair's structure and parameters on the first
        minibatch of ``batches``, make the optimizer, and load ``resume`` (True: the run
        folder's checkpoint.pt, a path, or a loaded checkpoint dict). ``training=False``
        (reloading for evaluation): parameters only, no optimizer, the RNG untouched."""
        c = self.config
        self._num_examples = batches.num_examples
        first = (batches.take(torch.arange(batches.batch_size, device=self.device))
                 if isinstance(batches, TensorBatches) else next(iter(batches)))
        full = None
        if isinstance(batches, TensorBatches) and needs_full_prototype(
                self.pair, batches.num_examples, batches.batch_size):
            full = batches.take(torch.arange(batches.num_examples, device=self.device))
        streamed = not isinstance(batches, TensorBatches)
        set_up = autoguides_set_up(self.pair)
        try:
            with pyro.validation_enabled(True):
                self._discover_params(first, full)
        except ValueError as e:
            if streamed and per_row_autoguide_sites(self.pair):
                raise self._streamed_error() from e
            if set_up and "pyro.param" in str(e):  # per-row parameters of other data
                raise SetupError(
                    f"the guide ({', '.join(set_up)}) was set up on other data by an earlier "
                    f"fit or call, and its per-row parameters do not fit this data's "
                    f"{batches.num_examples} rows ({str(e).splitlines()[0][:160]}); build a "
                    "new guide (e.g. AutoNormal(model)) to train on this data") from e
            if set_up and isinstance(e, SetupError) and "build a new guide" not in str(e):
                raise SetupError(
                    f"{e} (the guide, {', '.join(set_up)}, was set up by an earlier fit or "
                    "call: if on other data, build a new guide)") from e
            raise
        if streamed and per_row_autoguide_sites(self.pair):
            raise self._streamed_error()
        if not training:
            return
        baselines = self.pair.structure.baselines
        if baselines:
            warn_user(
                f"guide site(s) {', '.join(map(repr, baselines))} ask for a baseline "
                "(infer={'baseline': ...}), which only Pyro's TraceGraph_ELBO uses; the "
                "engine's objectives do not (objective='trace' is Trace_ELBO): their gradient "
                "is the plain score function, noisier; more particles (num_particles=) or a "
                "reparameterized guide distribution reduce the noise")
        pyro.set_rng_seed(c.seed)  # training draws do not depend on the set-up's traces
        self._make_optimizer()
        if resume:
            if resume is True and self.out is None:
                raise ValueError("resume=True needs out= (the run folder)")
            state = resume if isinstance(resume, dict) else load_checkpoint(
                self.out / "checkpoint.pt" if resume is True else Path(resume), self.device)
            self.load_state_dict(state, batches)
            if training and self.epoch > c.epochs:
                raise SetupError(f"resume: the run has trained {self.epoch} epochs already "
                                 f"and epochs={c.epochs} is fewer; give more than "
                                 f"{self.epoch} (--epochs) to continue it")
        for m in self._modules():
            m.train()

    def begin_epoch(self) -> None:
        """Start the next epoch's clock and loss accumulators."""
        self.epoch += 1
        self._start = time.perf_counter()
        self._pending: list[torch.Tensor] = []
        self._total = torch.zeros((), device=self.device)
        self._done = 0

    def step(self, batch: Batch, step: int, steps: int,
             backward: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
        """One SVI step on ``batch`` (``step`` of ``steps`` in this epoch): the objective's
        loss (the negative full-data ELBO estimate, nats), ``backward`` (default
        ``loss.backward``; DDP's averages gradients), clipping, the optimizer's step.
        Returns the detached loss (on the device)."""
        c = self.config
        if self.kl_weight is not None:
            self.kl_weight.factor = self._kl_factor(step, steps)
        with pyro.validation_enabled(False):
            loss = self.objective(self.model, self.guide, batch)
        (backward or torch.Tensor.backward)(loss)
        if c.clip_norm is not None and c.optimizer != "clipped_adam":
            torch.nn.utils.clip_grad_norm_(self.params.values(), c.clip_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def record(self, loss: torch.Tensor, step: int, steps: int,
               reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> float | None:
        """Keep ``loss`` on the device; every ``sync_every`` steps (and at the epoch's last)
        read the pending losses once (``reduce``: e.g. the mean over DDP ranks), stop with
        :class:`TrainingDiverged` naming the step if one is not finite, or if a parameter
        is not (a NaN gradient under a finite loss: checked at the same reads, so no
        checkpoint is ever written from it), and return their mean ELBO per example (None
        between reads)."""
        self._pending.append(loss)
        if len(self._pending) < self.config.sync_every and step != steps:
            return None
        chunk = torch.stack(self._pending)
        if reduce is not None:
            chunk = reduce(chunk)
        if not bool(torch.isfinite(chunk).all()):
            first = int((~torch.isfinite(chunk)).nonzero()[0])
            self._diverged(step - len(self._pending) + 1 + first, steps, float(chunk[first]))
        per_example = chunk.abs() / self._num_examples
        if self._scale is None:  # the run's first loss sets the plausible range (the first
            # read may hold a whole epoch of steps, already diverged: lr 1e6)
            self._scale = max(float(per_example[0]), 1.0)
        runaway = per_example > PLAUSIBLE * self._scale
        if bool(runaway.any()):
            first = int(runaway.nonzero()[0])
            self._diverged(step - len(self._pending) + 1 + first, steps, float(chunk[first]),
                           f" (|ELBO| {float(per_example[first]):.3g} nats per example, "
                           f"over {PLAUSIBLE:.0e} times the {self._scale:.3g} of the first "
                           "step)")
        bad = self._nonfinite_param()
        if bad is not None:
            first = step - len(self._pending) + 1
            self._stop(f"parameter {bad[0]!r} became {bad[1]:.4g} "
                       f"(a gradient was NaN or infinite while the loss was finite) at epoch "
                       f"{self.epoch}, step {f'{first} to ' if first < step else ''}{step} "
                       f"of {steps}. ")
        self._total += chunk.sum()
        self._done += len(self._pending)
        self._pending = []
        return -float(chunk.mean()) / self._num_examples

    def end_epoch(self, val_elbo: float | None = None) -> tuple[dict, bool]:
        """Close the epoch: lr schedule, its history row (``train_elbo``, ``val_elbo`` nats
        per example, ``seconds``, ``lr``), early stopping. Returns ``(row, improved)``;
        :attr:`should_stop` tells whether patience ran out."""
        if self.scheduler is not None:
            self.scheduler.step()
        row = {"epoch": self.epoch,
               "train_elbo": -float(self._total) / max(self._done, 1) / self._num_examples,
               "seconds": time.perf_counter() - self._start,
               "lr": self.optimizer.param_groups[0]["lr"]}
        if self.kl_weight is not None:
            row["beta"] = self.kl_weight.factor
        if val_elbo is not None:
            row["val_elbo"] = val_elbo
        self.history.rows.append(row)
        improved = self._early_stopping(row)
        if self.should_stop:
            self.history.stopped_early = True
        return row, improved

    @property
    def should_stop(self) -> bool:
        """Early stopping: ``patience`` epochs without a better (validation) ELBO."""
        return self.config.patience is not None and self._bad_epochs >= self.config.patience

    def validation_elbo(self, val_data: Data) -> float:
        """The ELBO per example of ``val_data`` (nats) under the current parameters, drawn
        with the same random numbers every epoch (seeded by ``config.seed``; the training
        stream is left as it was), so that epochs differ by their parameters, not by their
        draws, when early stopping and best.pt compare them."""
        c = self.config
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(c.seed)
            return evaluate_elbo(self.model, self.guide, val_data,
                                 num_particles=c.val_particles,
                                 batch_size=max(c.batch_size, 256), plate=c.plate,
                                 device=self.device, progress=False,
                                 sparse_rows=c.sparse_batches)

    def save(self, batches, best: bool) -> None:
        """checkpoint.pt (and best.pt when ``best``) and metrics.csv into the run folder."""
        self._save(batches, best)

    def fit(self, data: Data, val_data: Data | None = None,
            resume: str | Path | bool | dict = False,
            num_data: int | None = None, progress: bool | None = None) -> History:
        c = self.config
        store = pyro.get_param_store()
        before = store.get_state() if c.clear_param_store else None
        if c.clear_param_store:
            pyro.clear_param_store()
        try:
            pyro.set_rng_seed(c.seed)
            batches = make_batches(data, c.batch_size, self.device, shuffle=True,
                                   drop_last=c.drop_last or c.objective == "jit",
                                   num_data=num_data, name="data",
                                   sparse_rows=c.sparse_batches)
            batches.generator.manual_seed(c.seed)
            self.setup(batches, resume)
            if val_data is not None:
                refuse_per_row_validation(self.pair)
        except BaseException:  # refused before the first step: the store as it was
            if before is not None:
                store.clear()
                store.set_state(before)
            raise
        steps = len(batches)
        bar = tqdm(total=max(0, c.epochs - self.epoch) * steps, unit="step",
                   dynamic_ncols=True, disable=None if progress is None else not progress)
        try:
            while self.epoch < c.epochs and not self.should_stop:
                self.begin_epoch()
                shown = 0
                for i, batch in enumerate(batches, start=1):
                    elbo = self.record(self.step(batch, i, steps), i, steps)
                    if elbo is not None:  # the losses were read: show them
                        bar.update(i - shown)
                        shown = i
                        bar.set_postfix(epoch=self.epoch, elbo=f"{elbo:.2f}")
                val = None
                if val_data is not None:
                    val = self.validation_elbo(val_data)
                    for m in self._modules():
                        m.train()
                row, improved = self.end_epoch(val)
                bar.set_postfix(epoch=self.epoch, elbo=f"{row['train_elbo']:.2f}",
                                **({"val": f"{val:.2f}"} if val is not None else {}))
                self.save(batches, best=improved)
        finally:
            bar.close()
            reset_autoguide_plates(self.pair.raw_guide)
        return self.history

    def _streamed_error(self) -> SetupError:
        return SetupError(
            f"the guide keeps one parameter per row for {per_row_autoguide_sites(self.pair)}, "
            "but streamed minibatches carry positions within the epoch, not row ids: pass the "
            "data as tensors (a tensor, tuple or dict), or use an amortized guide")

    def _kl_factor(self, step: int, steps: int) -> float:
        c = self.config
        if c.kl_anneal_epochs <= 0:
            return c.beta
        progress = (self.epoch - 1 + step / steps) / c.kl_anneal_epochs
        return c.beta * min(1.0, progress)

    def _nonfinite_param(self) -> tuple[str, float] | None:
        """A parameter holding NaN or inf and such a value, if any (one read of the device)."""
        finite = torch.stack([torch.isfinite(p).all() for p in self.params.values()])
        if bool(finite.all()):
            return None
        name = list(self.params)[int((~finite).nonzero()[0])]
        value = self.params[name].detach()
        return name, float(value[~torch.isfinite(value)].reshape(-1)[0])

    def _diverged(self, step: int, steps: int, value: float, why: str = "") -> None:
        self._stop(f"loss became {value:.4g}{why} at epoch {self.epoch}, step {step} of "
                   f"{steps}. ")

    def _stop(self, what: str) -> None:
        """Raise :class:`TrainingDiverged`: ``what`` happened, where the last good checkpoint
        is, and the remedies."""
        kept = self.out / "checkpoint.pt" if self.out else None
        if kept is not None and self._best_state is not None:  # not written yet: keep it
            save_checkpoint(self._best_state, self.out / "best.pt")
            if not kept.exists():
                save_checkpoint(self._best_state, kept)
                self._saved_epoch = int(self._best_state["epoch"])
            self._best_state = None
        if kept is None:
            where = "There is no checkpoint (no out= folder). "
        elif kept.exists():
            where = f"The last good checkpoint is kept: {kept} (epoch {self._saved_epoch}). "
        elif self.epoch > 1:
            where = f"No checkpoint had been written yet, so {self.out} holds none. "
        else:
            where = f"No epoch had finished, so {self.out} holds no checkpoint. "
        raise TrainingDiverged(
            what + where +
            "Remedies: lower the learning rate, set clip_norm (e.g. 10), use "
            "optimizer='clipped_adam', or check the data for extreme values.")

    def _early_stopping(self, row: dict) -> bool:
        if self.epoch <= min(self.config.warmup_epochs, self.config.epochs - 1):
            return False
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
            # no folder for best.pt: keep the best epoch in memory, when it was judged on
            # validation data (without it the last epoch is the run's answer, as on disk)
            if best and "val_elbo" in self.history.rows[-1]:
                self.history.best_state = _cpu_copy(self.state_dict(batches))
            return
        c = self.config
        due = self.epoch % c.checkpoint_every == 0 or self.epoch >= c.epochs or self.should_stop
        if not due:
            if best:
                self._best_state = _cpu_copy(self.state_dict(batches))
            return
        self.out.mkdir(parents=True, exist_ok=True)
        state = self.state_dict(batches)
        save_checkpoint(state, self.out / "checkpoint.pt")
        self._saved_epoch = self.epoch
        if best or self._best_state is not None:
            save_checkpoint(state if best else self._best_state, self.out / "best.pt")
            self._best_state = None
        write_history_csv(self.history.rows, self.out / "metrics.csv")


def _cpu_copy(x):
    """A detached CPU copy of a checkpoint-form state (tensors cloned, containers rebuilt)."""
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", copy=True)
    if isinstance(x, dict):
        return {k: _cpu_copy(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_cpu_copy(v) for v in x)
    return x


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)
