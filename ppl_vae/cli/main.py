"""The ``ppl-vae`` command: train, evaluate, sample, score, transform, check.

The table ``FAMILIES`` below is the only place in the engine that names concrete models:
it maps a model name (``vae``, ``irt-2pl``, ``prodlda``, ...) to the CLI module of its family.
A family module provides

    NAMES                      model names it trains
    add_train_arguments(p)     its own flags on ``train`` (common flags are added here)
    train(args)                fit and write the run folder (args.out)
    evaluate(run, args)        -> dict of figures, printed as ``name: value`` lines
    and optionally sample(run, args), score(run, args), transform(run, args), check(run, args)

Every run folder holds ``config.json`` with at least ``{"family": ..., "model": ...}``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from types import ModuleType

# model name -> family module (the one place that names concrete models; imported by name)
FAMILIES: dict[str, str] = {
    "vae": "ppl_vae.cli.vae",
    **{name: "ppl_vae.cli.irt" for name in ("irt-lecture", "irt-1pl", "irt-2pl", "irt-3pl")},
    **{name: "ppl_vae.cli.topics" for name in ("prodlda", "lda")},
    "cvae": "ppl_vae.cli.cvae", "ssvae": "ppl_vae.cli.ssvae",
}


def family_module(name: str) -> ModuleType:
    return importlib.import_module(name)


def run_config(run: str | Path) -> dict:
    """The ``config.json`` of a run folder, with a clear error if it is not one."""
    path = Path(run) / "config.json"
    if not path.exists():
        raise SystemExit(f"error: {run} is not a ppl-vae run folder (no config.json); "
                         "give the --out folder of a 'ppl-vae train' run")
    return json.loads(path.read_text())


def add_common_train_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training (shared by every model)")
    g.add_argument("--out", required=True, type=Path, help="run folder to write")
    g.add_argument("--epochs", type=int, default=10)
    g.add_argument("--batch-size", type=int, default=128)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--objective", default="trace",
                   choices=["trace", "meanfield", "jit", "enum", "iwae"])
    g.add_argument("--particles", type=int, default=1,
                   help="ELBO particles; importance samples K for --objective iwae")
    g.add_argument("--optimizer", default="adam", choices=["adam", "adamw", "clipped_adam"])
    g.add_argument("--lr-schedule", default=None, choices=["cosine", "exponential", "constant"])
    g.add_argument("--clip-norm", type=float, default=None)
    g.add_argument("--beta", type=float, default=1.0, help="weight of the KL term")
    g.add_argument("--kl-anneal-epochs", type=float, default=0.0)
    g.add_argument("--patience", type=int, default=None, help="early stopping (epochs)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda:0")
    g.add_argument("--resume", action="store_true", help="continue the run in --out")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    d = p.add_argument_group("data-parallel training through PyTorch Lightning (optional "
                             "dependency 'lightning'; --batch-size is then the global batch)")
    d.add_argument("--devices", type=_devices, default=None,
                   help="processes per node on CPU, or GPUs per node: N, 'auto' or ids '0,1'")
    d.add_argument("--num-nodes", type=int, default=None, help="machines (default 1)")
    d.add_argument("--strategy", default=None,
                   help="Lightning strategy (default ddp when --devices/--num-nodes is given)")


def _devices(text: str) -> int | str | list[int]:
    """``--devices``: an int, ``auto``, or comma-separated device ids."""
    if text == "auto":
        return text
    try:
        return [int(t) for t in text.split(",")] if "," in text else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--devices {text!r}: give a number of devices, 'auto' or ids like 0,1") from None


def fit_options(args: argparse.Namespace, kl_sites: tuple[str, ...] = ()) -> dict:
    """The keyword arguments of :func:`ppl_vae.fit` from the common flags."""
    return dict(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                objective=args.objective, num_particles=args.particles,
                optimizer=args.optimizer, lr_schedule=args.lr_schedule,
                clip_norm=args.clip_norm, kl_sites=kl_sites if
                (args.beta != 1.0 or args.kl_anneal_epochs) else (),
                beta=args.beta, kl_anneal_epochs=args.kl_anneal_epochs,
                patience=args.patience, seed=args.seed, device=args.device, out=args.out,
                resume=args.resume, progress=False if args.no_progress else None,
                **{k: getattr(args, k) for k in ("devices", "num_nodes", "strategy")
                   if getattr(args, k, None) is not None})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ppl-vae", description="Train and check deep latent-variable models "
        "(Pyro programs) with one SVI engine.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a named model, write a run folder")
    models = train.add_subparsers(dest="model", required=True, metavar="MODEL")
    seen: dict[str, ModuleType] = {}
    for name, module_name in FAMILIES.items():
        module = seen.setdefault(module_name, family_module(module_name))
        p = models.add_parser(name, help=getattr(module, "HELP", {}).get(name, ""))
        module.add_train_arguments(p, name)
        add_common_train_arguments(p)
        # a family may change the common flags' defaults (TRAIN_DEFAULTS: dest -> value)
        p.set_defaults(family=module_name, **getattr(module, "TRAIN_DEFAULTS", {}))

    ev = sub.add_parser("evaluate", help="print a run's test figures as 'name: value' lines")
    ev.add_argument("run", type=Path)
    ev.add_argument("--iwae-samples", type=int, default=1000,
                    help="importance samples K for log p(x)")
    ev.add_argument("--limit", type=int, default=None, help="first N test examples only")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--seed", type=int, default=0)

    sa = sub.add_parser("sample", help="draw from a trained generative model")
    sa.add_argument("run", type=Path)
    sa.add_argument("--n", type=int, default=64)
    sa.add_argument("--label", type=int, default=None, help="class label (conditional models)")
    sa.add_argument("--out", type=Path, default=None, help="PNG to write (default RUN/...)")
    sa.add_argument("--seed", type=int, default=0)
    sa.add_argument("--device", default="auto")

    sc = sub.add_parser("score", help="encode new data with a run's amortized guide")
    sc.add_argument("run", type=Path)
    sc.add_argument("--responses", type=Path, required=True)
    sc.add_argument("--out", type=Path, required=True)
    sc.add_argument("--device", default="auto")

    tr = sub.add_parser("transform", help="topic proportions of new documents")
    tr.add_argument("run", type=Path)
    tr.add_argument("--docs", type=Path, required=True)
    tr.add_argument("--out", type=Path, required=True)
    tr.add_argument("--device", default="auto")

    ch = sub.add_parser("check", help="posterior checks with ArviZ (writes into RUN)")
    ch.add_argument("run", type=Path)
    ch.add_argument("--samples", type=int, default=500,
                    help="guide draws written to posterior.nc")
    ch.add_argument("--khat-samples", type=int, default=1000,
                    help="draws per data point for PSIS k-hat (Pyro's psis_diagnostic "
                         "default; fewer make k-hat noisy and biased upwards)")
    ch.add_argument("--sbc-simulations", type=int, default=1000,
                    help="simulation-based calibration of amortized guides (0: skip)")
    ch.add_argument("--nuts", action="store_true",
                    help="also run NUTS and compare it with the guide (small data only)")
    ch.add_argument("--nuts-samples", type=int, default=500,
                    help="NUTS draws (and warmup steps) per chain, 2 chains")
    ch.add_argument("--device", default="auto")
    ch.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "train":
        if any(getattr(args, k, None) is not None for k in ("devices", "num_nodes", "strategy")):
            from ppl_vae import distributed

            # only rank 0 writes the run folder's tables and figures after training
            distributed.set_only_rank_zero_continues(True)
        family_module(args.family).train(args)
        return 0
    config = run_config(args.run)
    module_name = FAMILIES.get(config.get("model", ""))
    if module_name is None:
        raise SystemExit(f"error: {args.run}: unknown model {config.get('model')!r}")
    module = family_module(module_name)
    handler = getattr(module, args.command, None)
    if handler is None:
        raise SystemExit(f"error: 'ppl-vae {args.command}' does not apply to "
                         f"{config['model']} runs")
    result = handler(args.run, args)
    if isinstance(result, dict):
        for key, value in result.items():
            print(f"{key}: {value:.6g}" if isinstance(value, float) else f"{key}: {value}")
    return 0


def run() -> int:
    """The ``ppl-vae`` command: :func:`main`, with bad input (a ValueError naming the file,
    line, field or setting) and a diverged run (TrainingDiverged) reported as one
    ``error: ...`` line and exit status 2 instead of a traceback (``PPL_VAE_DEBUG=1`` keeps
    the traceback). Tests and scripts call :func:`main`, which raises."""
    import os

    try:
        return main()
    except (ValueError, FloatingPointError) as e:
        if os.environ.get("PPL_VAE_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(run())
