"""The ``ppl-vae`` command: train, evaluate, sample, score, transform, check.

The CLI maps flags to calls of the family contract (:mod:`ppl_vae.family`) and the run API
(:mod:`ppl_vae.runs`); it holds no model knowledge. ``FAMILIES`` maps a model name to the
CLI module of its family, which provides

    HELP                          model name -> one line of help
    add_train_arguments(p, name)  its own flags on ``train`` (common flags are added here)
    cli_spec(args)                -> dict of the family's spec fields
    SPEC_FLAGS (optional)         flag dest -> spec field, where the names differ

``train`` then calls ``ppl_vae.train(model, out, spec, **flags given)`` (unset flags take
the family's fit defaults; with ``--resume`` the spec holds only the flags on the command
line, the run's stored spec gives the rest); every other command loads the run
(``ppl_vae.load_run``) and calls the family's method of the command's name with the
command's flags.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path
from types import ModuleType

from ppl_vae.program import SetupError
from ppl_vae.runs import load_run, train
from ppl_vae.training import FitFailed

# model name -> family module (the one place that names concrete models; imported by name)
FAMILIES: dict[str, str] = {
    "vae": "ppl_vae.cli.vae",
    **{name: "ppl_vae.cli.irt"
       for name in ("irt-lecture", "irt-1pl", "irt-2pl", "irt-3pl", "irt-grm", "irt-gpcm",
                    "irt-pcm")},
    **{name: "ppl_vae.cli.topics" for name in ("prodlda", "lda")},
    "cvae": "ppl_vae.cli.cvae", "ssvae": "ppl_vae.cli.ssvae",
    "program": "ppl_vae.cli.program",
}


def family_module(name: str) -> ModuleType:
    return importlib.import_module(name)


# flag dest -> fit setting; unset flags (None) leave the family's default
FIT_FLAGS = {"epochs": "epochs", "batch_size": "batch_size", "lr": "lr",
             "objective": "objective", "particles": "num_particles", "optimizer": "optimizer",
             "lr_schedule": "lr_schedule", "clip_norm": "clip_norm", "beta": "beta",
             "kl_anneal_epochs": "kl_anneal_epochs", "patience": "patience",
             "warmup_epochs": "warmup_epochs", "seed": "seed",
             "renyi_alpha": "renyi_alpha", "device": "device", "devices": "devices",
             "num_nodes": "num_nodes",
             "strategy": "strategy"}
def add_common_train_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training (shared by every model; unset: the family's default)")
    g.add_argument("--out", required=True, type=Path, help="run folder to write")
    g.add_argument("--epochs", type=int, default=None)
    g.add_argument("--batch-size", type=int, default=None)
    g.add_argument("--lr", type=float, default=None)
    g.add_argument("--objective", default=None,
                   choices=["trace", "meanfield", "jit", "enum", "iwae", "renyi"])
    g.add_argument("--particles", type=int, default=None,
                   help="ELBO particles; importance samples K for --objective iwae")
    g.add_argument("--renyi-alpha", type=float, default=None,
                   help="--objective renyi: 0 is the IWAE bound, 1 the ELBO (default 0.5)")
    g.add_argument("--optimizer", default=None, choices=["adam", "adamw", "clipped_adam"])
    g.add_argument("--lr-schedule", default=None, choices=["cosine", "exponential", "constant"])
    g.add_argument("--clip-norm", type=float, default=None)
    g.add_argument("--beta", type=float, default=None, help="weight of the KL term")
    g.add_argument("--kl-anneal-epochs", type=float, default=None)
    g.add_argument("--patience", type=int, default=None, help="early stopping (epochs)")
    g.add_argument("--warmup-epochs", type=int, default=None,
                   help="epochs never kept as the best one nor counted by early stopping")
    g.add_argument("--seed", type=int, default=None, help="fixes weights, data order, draws")
    g.add_argument("--device", default=None, help="auto (CUDA when present), cpu, cuda:0")
    g.add_argument("--resume", action="store_true", help="continue the run in --out")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the run in --out (without it an existing run is refused)")
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


def _positive(text: str) -> int:
    """A count that must be at least 1 (draws, samples, examples)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def fit_overrides(args: argparse.Namespace) -> dict:
    """The fit settings the user set with flags (the family's defaults fill the rest)."""
    return {setting: getattr(args, dest) for dest, setting in FIT_FLAGS.items()
            if getattr(args, dest, None) is not None}


def given_flags(argv: list[str]) -> set[str]:
    """The dests of the flags on the command line ``argv`` (argparse's defaults left out)."""
    parser = build_parser()
    _suppress_defaults(parser)
    return set(vars(parser.parse_args(argv)))


def _suppress_defaults(parser: argparse.ArgumentParser) -> None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _suppress_defaults(sub)
        else:
            action.default = argparse.SUPPRESS


def given_spec(module: ModuleType, spec: dict, given: set[str]) -> dict:
    """The spec fields set by flags in ``given`` (a family module's ``SPEC_FLAGS`` maps a
    flag's dest to its field where the names differ)."""
    names = getattr(module, "SPEC_FLAGS", {})
    fields = {names.get(dest, dest) for dest in given}
    return {k: v for k, v in spec.items() if k in fields}


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
        p.set_defaults(family=module_name)

    ev = sub.add_parser("evaluate", help="print a run's test figures as 'name: value' lines")
    ev.add_argument("run", type=Path)
    ev.add_argument("--iwae-samples", type=_positive, default=100,
                    help="importance samples K for log p(x) (default 100: about a minute on a "
                    "CPU for a 10,000-example test set; --full uses 1000)")
    ev.add_argument("--full", dest="iwae_samples", action="store_const", const=1000,
                    help="the full estimate: K = 1000 (the bound tightens as K grows)")
    ev.add_argument("--limit", type=_positive, default=None, help="first N test examples only")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--seed", type=int, default=0)

    sa = sub.add_parser("sample", help="draw from a trained generative model")
    sa.add_argument("run", type=Path)
    sa.add_argument("--n", type=_positive, default=64)
    sa.add_argument("--label", type=int, default=None, help="class label (conditional models)")
    sa.add_argument("--out", type=Path, default=None, help="PNG to write (default RUN/...)")
    sa.add_argument("--seed", type=int, default=0)
    sa.add_argument("--device", default="auto")

    sc = sub.add_parser("score", help="encode new data with a run's amortized guide")
    sc.add_argument("run", type=Path)
    sc.add_argument("--responses", type=Path, required=True)
    sc.add_argument("--out", type=Path, required=True)
    sc.add_argument("--format", default=None, choices=["auto", "wide", "long", "jsonl"],
                    help="exam runs: layout of --responses (default: the run's --format)")
    sc.add_argument("--id-column", default=None,
                    help="exam runs: the wide CSV's student id column (default: the run's)")
    sc.add_argument("--device", default="auto")

    tr = sub.add_parser("transform", help="topic proportions of new documents")
    tr.add_argument("run", type=Path)
    tr.add_argument("--docs", type=Path, required=True)
    tr.add_argument("--out", type=Path, required=True)
    tr.add_argument("--embeddings", type=Path, default=None,
                    help="a run trained with --embeddings: the new documents' (docs, E) .npy")
    tr.add_argument("--device", default="auto")

    da = sub.add_parser("data", help="download public data sets by name")
    da_sub = da.add_subparsers(dest="action", required=True)
    fe = da_sub.add_parser("fetch", help="download an OCTIS topic corpus (needs the network)")
    fe.add_argument("names", nargs="+", choices=["bbc_news", "m10", "dblp", "20ng"])
    fe.add_argument("--dest", type=Path, default=None,
                    help="folder for one corpus (default $PPL_VAE_DATA or ~/.cache/ppl-vae)")

    ch = sub.add_parser("check", help="posterior checks with ArviZ (writes into RUN)")
    ch.add_argument("run", type=Path)
    ch.add_argument("--samples", type=_positive, default=500,
                    help="guide draws written to posterior.nc")
    ch.add_argument("--khat-samples", type=_positive, default=1000,
                    help="draws per data point for PSIS k-hat (default 1000, Pyro's "
                         "psis_diagnostic default; fewer make k-hat noisy and biased upwards)")
    ch.add_argument("--sbc-simulations", type=int, default=1000,
                    help="simulation-based calibration of amortized guides (0: skip)")
    ch.add_argument("--nuts", action="store_true",
                    help="also run NUTS and compare it with the guide (small data only)")
    ch.add_argument("--nuts-samples", type=_positive, default=500,
                    help="NUTS draws (and warmup steps) per chain, 2 chains")
    ch.add_argument("--device", default="auto")
    ch.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    if args.command == "train":
        if any(getattr(args, k, None) is not None for k in ("devices", "num_nodes", "strategy")):
            from ppl_vae import distributed

            # only rank 0 writes the run folder's tables and figures after training
            distributed.set_only_rank_zero_continues(True)
        module = family_module(args.family)
        spec = module.cli_spec(args)
        if args.resume:  # flags not on the command line keep the run's values, not defaults
            spec = given_spec(module, spec, given_flags(sys.argv[1:] if argv is None else argv))
        run = train(args.model, args.out, spec, resume=args.resume, overwrite=args.overwrite,
                    progress=False if args.no_progress else None, **fit_overrides(args))
        last = run.history[-1] if run.history else {}
        print(f"trained {len(run.history)} epochs: " + ", ".join(
            f"{k} {last[k]:.2f}" for k in ("train_elbo", "val_elbo") if k in last)
            + f" nats per example; wrote {args.out} in "
            f"{time.perf_counter() - start:.1f} seconds")
        return 0
    if args.command == "data":
        from ppl_vae.data.fetch import fetch_corpus

        if args.dest is not None and len(args.names) > 1:
            raise SetupError("--dest names the folder of one corpus; fetch one at a time")
        for name in args.names:
            print(f"{name}: {fetch_corpus(name, args.dest)}")
        return 0
    run = load_run(args.run, device=args.device)
    handler = getattr(run.family, args.command, None)
    if handler is None:
        raise SetupError(f"'ppl-vae {args.command}' does not apply to {run.name} runs")
    options = {k: v for k, v in vars(args).items() if k not in ("command", "run")}
    _print(handler(run, **options), start)
    return 0


def _print(result, start: float) -> None:
    if isinstance(result, dict):
        result = dict(result, seconds=round(time.perf_counter() - start, 1))
        for key, value in result.items():
            print(f"{key}: {value:.6g}" if isinstance(value, float) else f"{key}: {value}")


def run() -> int:
    """The ``ppl-vae`` command: :func:`main`, with bad input (a ValueError naming the file,
    line, field or setting), a diverged run (TrainingDiverged) and a failed fit (FitFailed)
    reported as one ``error: ...`` line and exit status 2 instead of a traceback
    (``PPL_VAE_DEBUG=1`` keeps the traceback). Tests and scripts call :func:`main`, which raises."""
    import os
    import warnings

    if not os.environ.get("PPL_VAE_DEBUG"):  # a data warning is one "warning: ..." line
        warnings.showwarning = lambda message, *args, **kwargs: print(
            f"warning: {message}", file=sys.stderr)
    try:
        return main()
    except (ValueError, FloatingPointError, OSError, FitFailed) as e:
        if os.environ.get("PPL_VAE_DEBUG"):
            raise
        print(f"error: {_short(str(e))}", file=sys.stderr)
        return 2


def _short(message: str, lines: int = 2, width: int = 400) -> str:
    """The first lines of an error (Pyro's validation errors append tensors and trace
    tables): one ``error: ...`` line stays readable; PPL_VAE_DEBUG=1 shows all of it."""
    kept = [line.strip()[:width] for line in message.splitlines() if line.strip()]
    text = " ".join(kept[:lines])
    return text + (" ... (PPL_VAE_DEBUG=1 shows the whole message)"
                   if len(kept) > lines else "")


if __name__ == "__main__":
    sys.exit(run())
