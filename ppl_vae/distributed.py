"""Data-parallel SVI over several processes, devices and nodes, through PyTorch Lightning.

Pyro's documented route: an ELBO applied to a (model, guide) pair gives an ``ELBOModule``
(``Trace_ELBO()(model, guide)``), a ``LightningModule`` wraps it and Lightning's DDP strategy
averages the gradients over the ranks. Reached from :func:`ppl_vae.fit` when ``devices``,
``num_nodes`` or ``strategy`` is given; ``lightning`` is an optional dependency
(``pip install 'ppl-vae[lightning]'``).

Per step with W ranks and the global batch size B (``batch_size``):

* every rank draws the same shuffled permutation of the N examples (one seeded generator),
  takes the same global slice of B rows and keeps its own share ``slice[rank::W]``
  (DistributedSampler-style; a last short slice is padded by wrapping around);
* every rank calls ``model(*shard, size=N, subsample=idx)``, so its loss is an unbiased
  estimate of the whole dataset's negative ELBO (local sites scaled by N / (B/W), global
  latents counted once);
* DDP averages the W gradients, which equals the gradient of the single-process loss with
  the same global batch: (1/W) sum_r (N W / B) sum_{i in r} grad l_i = (N / B) sum_i grad l_i.

The engine's :class:`~ppl_vae.training.Trainer` does the rest (parameter discovery, the
optimizer and schedule, checkpoints, history, early stopping), so a distributed run writes
the same run folder (``checkpoint.pt``, ``best.pt``, ``metrics.csv``) -- rank 0 writes it.

Launching: with ``strategy="ddp"`` Lightning starts the other local processes itself by
re-running the script (so call ``fit`` from a script, not a notebook); on several nodes, or
under ``torchrun`` / SLURM, the launcher starts every process and Lightning reads the
environment (``MASTER_ADDR``, ``MASTER_PORT``, ``NODE_RANK``, ``LOCAL_RANK``,
``WORLD_SIZE`` or SLURM's variables). Code after ``fit`` runs on every rank.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyro
import torch
from torch import nn

from .batching import Batch, Data, IterableBatches, TensorBatches, is_in_memory, split_structure
from .checkpoint import load_checkpoint
from .evaluation import elbo as evaluate_elbo
from .training import FitConfig, History, Trainer, refuse_per_row_validation

# strategies that start the ranks from a pickled/forked copy of the caller: the trained
# parameters and the history would stay in the children
_IN_PROCESS_LAUNCH = ("ddp_spawn", "ddp_fork", "ddp_notebook", "spawn", "fork")


_ONLY_RANK_ZERO_CONTINUES = False


def set_only_rank_zero_continues(flag: bool) -> None:
    """If set (the CLI does), every rank but 0 leaves the program with status 0 once
    training has finished, so that what the caller does after ``fit`` (writing tables and
    figures) happens once. Library callers keep all ranks running by default."""
    global _ONLY_RANK_ZERO_CONTINUES
    _ONLY_RANK_ZERO_CONTINUES = bool(flag)


def launched_as_other_rank() -> bool:
    """Whether this process is a rank other than 0 of a multi-process run, as its launcher
    says in the environment before training starts: Lightning's own launcher (``strategy=
    "ddp"`` re-runs the command with ``LOCAL_RANK`` >= 1), ``torchrun`` (``RANK``), SLURM
    (``SLURM_PROCID``), another node (``NODE_RANK``). Rank 0 owns the run folder."""
    for var in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"):
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 0:
            return True
    return False


def lightning_module():
    """The ``lightning`` package (or the older ``pytorch_lightning``), or a clear ImportError."""
    try:
        import lightning as L
    except ImportError:
        try:
            import pytorch_lightning as L
        except ImportError:
            raise ImportError(
                "fit(devices=..., num_nodes=..., strategy=...) trains through PyTorch "
                "Lightning, which is not installed: pip install 'ppl-vae[lightning]' "
                "(or pip install lightning)") from None
    return L


class ShardedBatches(TensorBatches):
    """In-memory data on this rank's device; each step yields this rank's share of the global
    minibatch: ``order[s*B:(s+1)*B][rank::world]`` where ``order`` is one shuffled permutation
    per epoch, identical on every rank (same seeded generator). ``len()`` is the number of
    global steps per epoch; ``Batch.size`` is the full dataset size N on every rank."""

    def __init__(self, data: Any, batch_size: int, device: torch.device | str = "cpu",
                 shuffle: bool = True, drop_last: bool = False, name: str = "data",
                 rank: int = 0, world_size: int = 1):
        super().__init__(data, batch_size, device, shuffle=shuffle, drop_last=drop_last,
                         name=name)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        if self.batch_size < world_size:
            raise ValueError(
                f"{name}: the global batch of {self.batch_size} examples cannot be split over "
                f"{world_size} ranks; use batch_size >= {world_size} (the batch size is the "
                "global one: each rank gets batch_size / world_size examples)")
        self.rank = rank
        self.world_size = world_size

    def __iter__(self) -> Iterator[Batch]:
        n, b, w = self.num_examples, self.batch_size, self.world_size
        if self.shuffle:
            order = torch.randperm(n, generator=self.generator).to(self.device)
        else:
            order = torch.arange(n, device=self.device)
        for i in range(len(self)):
            chunk = order[i * b:(i + 1) * b]
            if len(chunk) < w:  # too short to give every rank a row: wrap around
                chunk = torch.cat([chunk, order[:w - len(chunk)]])
            yield self.take(chunk[self.rank::w])


class ShardedLoader(IterableBatches):
    """A user's ``DataLoader`` over a map-style dataset, re-made for one rank: the same
    dataset, collate function, workers and pinning, with a ``DistributedSampler`` (every rank
    a disjoint share of one seeded permutation per epoch, reshuffled each epoch like the
    original loader's ``RandomSampler``; a short last share is padded by repeating rows) and
    ``loader.batch_size / W`` rows per rank and step, so ``loader.batch_size`` stays the
    global batch size. ``Batch.size`` is the whole dataset's size on every rank."""

    def __init__(self, loader: Any, device: torch.device | str, rank: int, world_size: int,
                 seed: int, num_data: int | None = None, name: str = "data"):
        from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

        b = _check_loader_batch(loader, world_size, name)
        self.sampler = DistributedSampler(
            loader.dataset, num_replicas=world_size, rank=rank,
            shuffle=isinstance(loader.sampler, RandomSampler), seed=seed,
            drop_last=loader.drop_last)
        workers = loader.num_workers
        per_rank = DataLoader(
            loader.dataset, batch_size=b // world_size, sampler=self.sampler,
            num_workers=workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
            drop_last=loader.drop_last, timeout=loader.timeout,
            worker_init_fn=loader.worker_init_fn,
            multiprocessing_context=loader.multiprocessing_context,
            persistent_workers=loader.persistent_workers if workers else False,
            prefetch_factor=loader.prefetch_factor if workers else None)
        super().__init__(per_rank, device,
                         num_data=num_data if num_data is not None else len(loader.dataset))
        self.epoch = 0  # passes made; the sampler's shuffle seed is seed + epoch

    def __iter__(self) -> Iterator[Batch]:
        self.sampler.set_epoch(self.epoch)
        self.epoch += 1
        return super().__iter__()


def _check_loader_batch(loader: Any, world_size: int, name: str = "data") -> int:
    b = loader.batch_size
    if b is None:
        raise ValueError(f"{name}: a DataLoader with a custom batch_sampler cannot be "
                         "sharded over ranks; give it batch_size= (the global batch)")
    if b % world_size:
        raise ValueError(f"{name}: the DataLoader's batch_size {b} is the global batch and "
                         f"must divide evenly over {world_size} ranks")
    return b


def is_shardable_loader(data: Any) -> bool:
    """A ``torch.utils.data.DataLoader`` over a map-style dataset (``__getitem__``)."""
    from torch.utils.data import DataLoader, IterableDataset

    return isinstance(data, DataLoader) and not isinstance(data.dataset, IterableDataset)


def shard(data: Data, rank: int, world_size: int) -> Data:
    """Rows ``rank, rank + W, ...`` of every tensor in ``data`` (same structure)."""
    args, kwargs = split_structure(data)
    args = tuple(t[rank::world_size] for t in args)
    kwargs = {k: t[rank::world_size] for k, t in kwargs.items()}
    if isinstance(data, torch.Tensor):
        return args[0]
    return kwargs if kwargs and not args else args


class EngineELBOModule(nn.Module):
    """The loss as a module, in the shape of Pyro's ``ELBOModule``: the modules behind the
    model and guide are submodules (so their parameters are this module's), the loss is an
    engine objective (:mod:`ppl_vae.objectives`: KL weights, jit, iwae) of the pair's
    programs (:class:`ppl_vae.program.Program`), called on a
    :class:`~ppl_vae.batching.Batch`. Returns the negative full-data ELBO estimate in nats."""

    def __init__(self, model: Callable, guide: Callable, objective: Callable,
                 modules: list[nn.Module]):
        super().__init__()
        self.programs = (model, guide)  # a tuple: not registered twice
        self.parts = nn.ModuleList(modules)
        self.objective = objective

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.objective(*self.programs, batch)


def _accelerator(device: str) -> str:
    device = str(device)
    if device == "auto":
        return "auto"
    kind = torch.device(device).type
    return {"cuda": "gpu"}.get(kind, kind)


def wants_sync_batchnorm(modules: list[nn.Module], accelerator: str) -> bool:
    """Whether Lightning should turn the BatchNorm layers into ``SyncBatchNorm``: on GPUs,
    when the model or guide has any (ProdLDA's decoder, the document encoder). Then every
    rank normalizes with the statistics of the whole global batch, as one process would.

    PyTorch's ``SyncBatchNorm`` runs on GPUs only; on CPU (gloo) each rank normalizes with
    its own B/W rows, and the running statistics used at evaluation are rank 0's (DDP
    broadcasts rank 0's buffers before every step), an estimate from every W-th row."""
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                 for module in modules for m in module.modules())
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto"
                                                and torch.cuda.is_available())
    return has_bn and on_gpu


def _make_module_class(L):
    class SVIModule(L.LightningModule):
        """One SVI step per Lightning step (manual optimization, mirrors Trainer._run_epoch)."""

        def __init__(self, core: Trainer, data: Data, val_data: Data | None,
                     resume_state: dict | None, num_data: int | None = None):
            super().__init__()
            self.automatic_optimization = False
            self.core = core
            self.data = data
            self.val_data = val_data
            self.resume_state = resume_state
            self.num_data = num_data
            self.loss_fn = EngineELBOModule(core.model, core.guide, core.objective,
                                            core.pair.modules)
            # Pyro params outside any nn.Module (pyro.param in a model or guide), registered
            # here so that DDP averages their gradients too
            self.store_params = nn.ParameterDict()
            self.batches: ShardedBatches | ShardedLoader | None = None
            self._ready = False

        # ---- set-up on every rank, before DDP wraps the module -----------------------------
        def setup(self, stage: str) -> None:
            if self._ready:
                return
            core, c = self.core, self.core.config
            rank, world = self.trainer.global_rank, self.trainer.world_size
            core.device = self.trainer.strategy.root_device
            if c.clear_param_store:
                pyro.clear_param_store()
            pyro.set_rng_seed(c.seed)
            if is_in_memory(self.data):
                self.batches = ShardedBatches(
                    self.data, c.batch_size, core.device, shuffle=True,
                    drop_last=c.drop_last or c.objective == "jit", rank=rank,
                    world_size=world)
                self.batches.generator.manual_seed(c.seed)
            else:
                self.batches = ShardedLoader(self.data, core.device, rank, world, c.seed,
                                             num_data=self.num_data)
            core.setup(self.batches)
            if self._register_store_params():  # the param store now holds nn.Parameters:
                core.setup(self.batches)       # the optimizer must step those
            if self.resume_state is not None:
                core.load_state_dict(self.resume_state, self.batches)
            if isinstance(self.batches, ShardedLoader):
                self.batches.epoch = core.epoch  # a resumed run goes on with the next shuffle
            # the same shuffling on every rank, different latent draws on every rank
            pyro.set_rng_seed(c.seed + 7919 * core.epoch + rank)
            self._ready = True

        def _register_store_params(self) -> bool:
            """Pyro params outside any module (pyro.param in a program) become
            nn.Parameters of this module, so DDP averages their gradients; they are put
            back into Pyro's param store through its public get_state/set_state. Returns
            whether any was converted."""
            store = pyro.get_param_store()
            state = store.get_state()
            in_modules = {id(p) for m in self.core.pair.modules for p in m.parameters()}
            converted = False
            for name in list(self.core.params):
                old = state["params"].get(name)
                if old is None or id(old) in in_modules:
                    continue
                if not isinstance(old, nn.Parameter):
                    state["params"][name] = nn.Parameter(old.detach())
                    converted = True
                self.store_params[name.replace(".", "__")] = state["params"][name]
            if converted:
                store.set_state(state)
            return converted

        def configure_optimizers(self):
            return self.core.optimizer

        def train_dataloader(self) -> ShardedBatches:
            return self.batches

        def transfer_batch_to_device(self, batch: Batch, device, dataloader_idx: int) -> Batch:
            return batch  # already on this rank's device

        # ---- the loop ----------------------------------------------------------------------
        def on_train_epoch_start(self) -> None:
            self.core.begin_epoch()

        def training_step(self, batch: Batch, batch_idx: int) -> None:
            """The Trainer's own step, with DDP's backward (it averages the gradients), and
            one collective every sync_every steps: every rank sees the same mean losses,
            so all of them stop together if the loss diverges."""
            steps, step = len(self.batches), batch_idx + 1
            loss = self.core.step(batch, step, steps, backward=self.manual_backward)
            self.core.record(loss, step, steps, reduce=lambda t: self.trainer.strategy.reduce(
                t, reduce_op="mean"))

        def on_train_epoch_end(self) -> None:
            val = self._val_elbo() if self.val_data is not None else None
            _, improved = self.core.end_epoch(val)
            if self.trainer.is_global_zero:
                self.core.save(self.batches, best=improved)
            if self.core.should_stop:
                self.trainer.should_stop = True

        @torch.no_grad()
        def _val_elbo(self) -> float:
            """Validation ELBO per example: each rank evaluates its rows, sums are reduced."""
            c, world = self.core.config, self.trainer.world_size
            with torch.random.fork_rng(devices=[self.core.device]
                                       if self.core.device.type == "cuda" else []):
                # the same draws every epoch (common random numbers), as the single-process
                # fit: epochs then differ by their parameters; the training stream untouched
                torch.manual_seed(c.seed + self.trainer.global_rank)
                return self._val_elbo_drawn(c, world)

        def _val_elbo_drawn(self, c: Any, world: int) -> float:
            part = shard(self.val_data, self.trainer.global_rank, world)
            args, kwargs = split_structure(part)
            rows_n = int((args or tuple(kwargs.values()))[0].shape[0])
            totals = torch.zeros(2, dtype=torch.float64, device=self.core.device)
            if rows_n:
                values = evaluate_elbo(self.core.model, self.core.guide, part,
                                       num_particles=c.val_particles,
                                       batch_size=max(c.batch_size, 256), plate=c.plate,
                                       device=self.core.device, per_example=True,
                                       progress=False)
                totals[0], totals[1] = float(values.sum()), rows_n
            totals = self.trainer.strategy.reduce(totals, reduce_op="sum")
            for m in self.core.pair.modules:
                m.train()
            return float(totals[0] / totals[1])

    return SVIModule


def _refuse_per_row_validation(core: Any, data: Data) -> None:
    """The single-process refusal of val_data beside per-row autoguide parameters, made
    before any process starts (set-up on one example batch)."""
    with torch.no_grad():
        batch = next(iter(TensorBatches(data, core.config.batch_size, "cpu", shuffle=False)))
        core.pair.inspect(batch)
    refuse_per_row_validation(core.pair)


def fit_distributed(model: Any, guide: Any, data: Data, config: FitConfig,
                    devices: int | str | list[int] | None = None, num_nodes: int = 1,
                    strategy: str = "ddp", accelerator: str | None = None,
                    out: str | Path | None = None, *, val_data: Data | None = None,
                    resume: str | Path | bool = False, progress: bool | None = None,
                    num_data: int | None = None) -> History:
    """Train ``guide`` and the model's parameters with data-parallel SVI through Lightning.

    Args:
        model, guide: Pyro programs called as ``fn(*batch, size=N, subsample=idx)``.
        data: in-memory tensors (a tensor, tuple or dict; first dim = examples): every rank
            holds all of it on its device and takes its share of each global minibatch; or a
            ``DataLoader`` over a map-style dataset, re-made per rank with a
            ``DistributedSampler`` (:class:`ShardedLoader`; its ``batch_size`` is the global
            batch) and streamed to the device (pinned, non-blocking copies on GPU).
        config: the run's settings; ``config.batch_size`` is the *global* batch size B (each
            of the W = devices * num_nodes ranks gets B / W examples per step).
        devices: processes per node (``int``), a list of GPU ids, or ``"auto"``.
        num_nodes: number of machines.
        strategy: a Lightning strategy that starts the ranks as separate scripts (``ddp``,
            ``ddp_find_unused_parameters_true``, ...).
        accelerator: ``cpu`` | ``gpu`` | ``auto``; default from ``config.device``.
        out: run folder written by rank 0 (``checkpoint.pt``, ``best.pt``, ``metrics.csv``).
        val_data: validation data; its ELBO per example (nats) is computed over all ranks.
        resume: ``True`` (``out/checkpoint.pt``) or a checkpoint path.
        num_data: the dataset size N for a DataLoader (default ``len(loader.dataset)``).

    Returns:
        :class:`~ppl_vae.training.History` (the same rows on every rank): ``train_elbo``
        (mean over the ranks' estimates, nats per example), ``val_elbo``, ``seconds``, ``lr``.
    """
    L = lightning_module()
    if not is_in_memory(data) and not is_shardable_loader(data):
        raise ValueError(
            "distributed training needs in-memory data (a tensor, tuple or dict of tensors) or "
            "a torch DataLoader over a map-style dataset, so that every rank can take its "
            f"share of each shuffled minibatch; got {type(data).__name__} (an iterable "
            "dataset cannot be sharded here: shard it by rank yourself and give each rank "
            "its own in-memory part, or train it with the single-process fit)")
    if strategy in _IN_PROCESS_LAUNCH:
        raise ValueError(f"strategy={strategy!r} trains in child processes whose parameters "
                         "do not come back to the caller; use strategy='ddp' (Lightning "
                         "re-runs your script for the other ranks) or launch with torchrun")
    if isinstance(devices, int) and devices < 1:
        raise ValueError(f"devices must be >= 1, got {devices}")
    if int(num_nodes) < 1:
        raise ValueError(f"num_nodes must be >= 1, got {num_nodes}")
    if resume is True and out is None:
        raise ValueError("resume=True needs out= (the run folder)")
    # check the data (shapes, NaN/inf, naming the field) before any process is started
    if is_in_memory(data):
        TensorBatches(data, config.batch_size, "cpu", shuffle=False, name="data")
    else:
        world = (devices if isinstance(devices, int) else
                 len(devices) if isinstance(devices, (list, tuple)) else None)
        if world is not None:
            _check_loader_batch(data, world * int(num_nodes))
    if val_data is not None:
        TensorBatches(val_data, config.batch_size, "cpu", shuffle=False, name="val_data")
    core = Trainer(model, guide, config, out=out)
    resume_state = None
    if resume:
        path = Path(out) / "checkpoint.pt" if resume is True else Path(resume)
        resume_state = load_checkpoint(path, "cpu")
    done_epochs = int(resume_state["epoch"]) if resume_state else 0
    stopped = resume_state is not None and config.patience is not None and int(
        resume_state.get("early_stopping", {}).get("bad_epochs", 0)) >= config.patience
    if resume_state is not None and (done_epochs >= config.epochs or stopped):
        # nothing left to train (finished, or stopped early): what the single-process fit
        # does -- load the run into model and guide, refuse fewer epochs -- in this process
        return core.fit(data, val_data, resume=resume_state, num_data=num_data,
                        progress=progress)
    if val_data is not None and is_in_memory(data):
        _refuse_per_row_validation(core, data)
    module = _make_module_class(L)(core, data, val_data, resume_state, num_data)
    accelerator = accelerator or _accelerator(config.device)
    trainer = L.Trainer(
        accelerator=accelerator,
        sync_batchnorm=wants_sync_batchnorm(core.pair.modules, accelerator),
        devices=devices if devices is not None else "auto",
        num_nodes=int(num_nodes), strategy=strategy,
        max_epochs=config.epochs - done_epochs,
        logger=False, enable_checkpointing=False, enable_model_summary=False,
        enable_progress_bar=progress is not False, num_sanity_val_steps=0,
        use_distributed_sampler=False,
        default_root_dir=str(out) if out is not None else None)
    trainer.fit(module)
    if _ONLY_RANK_ZERO_CONTINUES and trainer.global_rank != 0:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        sys.exit(0)
    return core.history


__all__ = ["fit_distributed", "ShardedBatches", "ShardedLoader", "is_shardable_loader",
           "EngineELBOModule", "shard", "wants_sync_batchnorm", "lightning_module",
           "set_only_rank_zero_continues"]
