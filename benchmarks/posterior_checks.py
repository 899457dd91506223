"""Did VI work on the exam model? SBC of the amortized ability guide, k-hat, NUTS vs SVI on LSAT.

Trains the 2PL exam model with the amortized ability guide (mean-field item parameters) on
LSAT Section VI (1000 students x 5 items) with the CLI's defaults, then

  1. simulation-based calibration (Talts et al. 2018) of q(ability | answers): ranks of the
     simulated true abilities among 99 guide draws, chi-square uniformity test -- for the
     trained encoder and, as a control, an encoder trained for 1 epoch only;
  2. PSIS k-hat (Yao et al. 2018): per student and for the item parameters;
  3. NUTS (pyro.infer.MCMC, 2 chains run one after the other) on the same data, compared
     with the SVI posterior: mean/sd differences of the item parameters and abilities, one
     forest plot; and the wall-clock time of both, same threads, side by side.

No extra packages (NUTS is Pyro's). Writes benchmarks/figures/posterior_checks/
(sbc.png, sbc_control.png, nuts_vs_svi.csv, nuts_vs_svi_forest.png).

    OMP_NUM_THREADS=1 python benchmarks/posterior_checks.py --threads 1
"""

from __future__ import annotations

import argparse
import platform
import time
import warnings
from pathlib import Path

import pyro
import torch

from ppl_vae import fit
from ppl_vae.data.irt import load_responses
from ppl_vae.diagnostics import importance_diagnostics, nuts_crosscheck, sbc
from ppl_vae.models.irt import build_irt

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "irt" / "lsat6.csv"


def train(spec: dict, tensors: tuple, epochs: int, seed: int) -> tuple:
    model, guide = build_irt(spec)
    start = time.perf_counter()
    fit(model, guide, tensors, epochs=epochs, batch_size=100, lr=0.05, lr_schedule="cosine",
        seed=seed, progress=False)
    return model, guide, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--sbc-simulations", type=int, default=2000, help="0: skip SBC")
    p.add_argument("--nuts-samples", type=int, default=500,
                   help="draws and warmup per chain (0: skip NUTS)")
    p.add_argument("--svi-samples", type=int, default=2000)
    p.add_argument("--khat-samples", type=int, default=1000)
    p.add_argument("--inner-samples", type=int, default=50,
                   help="local draws per global draw for the item parameters' k-hat")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=HERE / "figures" / "posterior_checks")
    args = p.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"machine: {platform.processor() or platform.machine()}, torch threads "
          f"{torch.get_num_threads()}, torch {torch.__version__}, pyro {pyro.__version__}")

    data = load_responses(args.data)
    tensors = data.tensors()
    spec = {"kind": "2pl", "num_items": data.num_items, "guide": "amortized", "hidden": [64]}
    print(f"data: {args.data.name}, {data.num_students} students x {data.num_items} items")

    model, guide, svi_seconds = train(spec, tensors, args.epochs, args.seed)
    print(f"SVI: {args.epochs} epochs in {svi_seconds:.1f} s")

    # 1. SBC of the amortized ability guide, and a control that must fail
    if args.sbc_simulations > 0:
        run_sbc(args, spec, tensors, model, guide)

    # 2. PSIS k-hat
    k = importance_diagnostics(model, guide, tensors, num_samples=args.khat_samples,
                               inner_samples=args.inner_samples, seed=args.seed)
    print(f"k-hat: {k.verdict()}")
    if k.glob_noise is not None:
        print(f"  item k-hat {k.glob:.2f}; sd of the inner estimate of log p(x | items) "
              f"{k.glob_noise:.2f} nats ({args.inner_samples} ability draws per student)")

    # 3. NUTS vs SVI
    if args.nuts_samples > 0:
        run_nuts(args, data, tensors, model, guide, svi_seconds)
    if args.sbc_simulations > 0:
        run_sbc_control(args, spec, tensors)
    print(f"wrote {args.out}")


def run_sbc(args: argparse.Namespace, spec: dict, tensors: tuple, model, guide) -> None:
    result = sbc(model, guide, tensors, num_simulations=args.sbc_simulations, seed=args.seed,
                 sites=["ability"])
    result.plot(args.out / "sbc.png")
    print(f"[trained encoder] {result.summary()}")
    ranks = result.ranks["ability"] / result.num_draws
    print(f"  rank mean {ranks.mean():.3f} (uniform 0.5), sd {ranks.std():.3f} (uniform 0.289)")


def run_sbc_control(args: argparse.Namespace, spec: dict, tensors: tuple) -> None:
    """Last: ``fit`` clears Pyro's param store and the AutoNormal item guide of a new pair
    has the same parameter names, so the first pair's item parameters are gone after it."""
    c_model, c_guide, _ = train(spec, tensors, 1, args.seed)
    control = sbc(c_model, c_guide, tensors, num_simulations=args.sbc_simulations,
                  seed=args.seed, sites=["ability"])
    control.plot(args.out / "sbc_control.png")
    print(f"[1-epoch encoder, control] {control.summary()}")


def run_nuts(args: argparse.Namespace, data, tensors: tuple, model, guide,
             svi_seconds: float) -> None:
    start = time.perf_counter()
    table, _, _ = nuts_crosscheck(model, guide, tensors, num_samples=args.nuts_samples,
                                  warmup_steps=args.nuts_samples, num_chains=2,
                                  svi_samples=args.svi_samples, seed=args.seed, out=args.out,
                                  coords={"item": data.item_ids},
                                  forest_coords={"student": [0, 1, 2]})
    nuts_seconds = time.perf_counter() - start
    items = table[~table.index.str.startswith("ability")]
    abilities = table[table.index.str.startswith("ability")]
    cols = ["svi_mean", "nuts_mean", "mean_diff", "svi_sd", "nuts_sd", "sd_ratio", "z",
            "r_hat", "ess_bulk"]
    print("NUTS vs SVI, item parameters:")
    print(items[cols].round(3).to_string())
    print(f"abilities ({len(abilities)} students): mean |z| {abilities['z'].abs().mean():.3f}, "
          f"max |z| {abilities['z'].abs().max():.3f}, median sd ratio "
          f"{abilities['sd_ratio'].median():.3f}")
    print(f"time: SVI fit {svi_seconds:.1f} s, NUTS (2 x {2 * args.nuts_samples} steps) "
          f"{nuts_seconds:.1f} s, ratio NUTS/SVI {nuts_seconds / svi_seconds:.1f}")


if __name__ == "__main__":
    main()
