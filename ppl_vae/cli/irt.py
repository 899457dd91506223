"""``ppl-vae train irt-2pl|irt-1pl|irt-3pl|irt-lecture``: exam models on a response table.

    ppl-vae train irt-2pl --responses exam.csv --guide amortized --epochs 200 --out RUN
    ppl-vae evaluate RUN                 # elbo, log_likelihood (nats per student)
    ppl-vae score RUN --responses new.csv --out scores.csv   (amortized runs)

RUN gets config.json, checkpoint.pt / best.pt, metrics.csv, items.csv (each item parameter's
posterior mean, sd and 94% interval), students.csv (ability mean, sd, 94% interval from
the guide, and the exact posterior mean and sd given the items' means by quadrature), and the
pictures icc.png (item characteristic curves), information.png (test information curve),
difficulties.png (forest plot), abilities.png (histogram), loss.png.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import torch

from ppl_vae import elbo, fit, log_likelihood, restore
from ppl_vae.checkpoint import write_json
from ppl_vae.cli.main import fit_options
from ppl_vae.data.irt import Responses, load_responses
from ppl_vae.models.irt import (
    IRT,
    ability_posterior,
    build_irt,
    posterior_samples,
    quadrature_abilities,
)
from ppl_vae.training import resolve_device

NAMES = ("irt-lecture", "irt-1pl", "irt-2pl", "irt-3pl")
HELP = {
    "irt-lecture": "the lecture's exam model P = sigmoid(alpha_s * beta_t), beta_t >= 0",
    "irt-1pl": "Rasch model P = sigmoid(theta_s - b_t)",
    "irt-2pl": "2PL model P = sigmoid(a_t (theta_s - b_t))",
    "irt-3pl": "3PL model P = c_t + (1 - c_t) sigmoid(a_t (theta_s - b_t))",
}
# defaults suited to a few global item parameters and one scalar per student
TRAIN_DEFAULTS = {"epochs": 200, "batch_size": 100, "lr": 0.05, "lr_schedule": "cosine"}
Z94 = 1.8807936081512509  # the 97th percentile of N(0, 1): 94% central interval


def add_train_arguments(p: argparse.ArgumentParser, name: str) -> None:
    g = p.add_argument_group(
        "exam model", "exam models change the common defaults to --epochs 200 --batch-size 100 "
        "--lr 0.05 --lr-schedule cosine (a few global item parameters, one scalar per student)")
    g.add_argument("--responses", type=Path, required=True,
                   help="wide CSV (student rows, item columns, blank = missing), long CSV "
                   "(student,item,response) or py-irt jsonlines")
    g.add_argument("--format", default="auto", choices=["auto", "wide", "long", "jsonl"])
    g.add_argument("--id-column", default=None, help="wide CSV: the student id column")
    g.add_argument("--guide", default="amortized", choices=["amortized", "meanfield"],
                   help="amortized: an encoder maps a student's answers to q(ability) "
                   "(scores new students); meanfield: a Normal per student")
    g.add_argument("--items", default="meanfield", choices=["meanfield", "fullrank"],
                   help="amortized guide: item parameters mean-field, or one multivariate "
                   "Normal over all of them (keeps each item's a-b posterior correlation; "
                   "wider, more honest intervals for weakly identified items)")
    g.add_argument("--hidden", type=int, nargs="+", default=[64],
                   help="hidden layer sizes of the amortized encoder")
    if name != "irt-lecture":
        g.add_argument("--hierarchical", action="store_true",
                       help="learn the item parameters' population mean and sd")
        g.add_argument("--difficulty-scale", type=float, default=3.0,
                       help="prior sd of the difficulties (logit scale)")
    if name == "irt-3pl":
        g.add_argument("--guessing-prior", type=float, nargs=2, default=[5.0, 17.0],
                       metavar=("A", "B"), help="Beta(A, B) prior of the guessing parameters")
    g.add_argument("--posterior-samples", type=int, default=1000,
                   help="draws of the item parameters for items.csv")


def spec_from_args(args: argparse.Namespace, data: Responses) -> dict:
    kind = args.model.removeprefix("irt-")
    spec = {"family": "irt", "model": args.model, "kind": kind, "guide": args.guide,
            "hidden": list(args.hidden), "items": args.items,
            "hierarchical": bool(getattr(args, "hierarchical", False)),
            "num_items": data.num_items, "num_students": data.num_students,
            "item_ids": data.item_ids, "responses": str(Path(args.responses).resolve()),
            "format": args.format, "id_column": args.id_column}
    if kind != "lecture":
        spec["difficulty_scale"] = args.difficulty_scale
    if kind == "3pl":
        spec["guessing_prior"] = list(args.guessing_prior)
    return spec


def train(args: argparse.Namespace) -> None:
    if args.items == "fullrank" and args.guide != "amortized":
        raise SystemExit("error: --items fullrank goes with --guide amortized")
    data = load_responses(args.responses, args.format, args.id_column)
    spec = spec_from_args(args, data)
    if args.resume and (args.out / "config.json").exists():
        saved = json.loads((args.out / "config.json").read_text())
        changed = {k: (saved.get(k), v) for k, v in spec.items() if saved.get(k) != v}
        if changed:
            raise SystemExit(f"error: --resume with a different model spec: {changed}")
    print(f"{data.source}: {data.num_students} students x {data.num_items} items, "
          f"{100 * data.missing_fraction:.1f}% missing")
    model, guide = build_irt(spec)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(spec, args.out / "config.json")
    history = fit(model, guide, data.tensors(), config=spec,
                  **fit_options(args, ("ability",)))
    print(f"trained {len(history)} epochs: ELBO {history['train_elbo'][-1]:.3f} nats/student")
    write_outputs(args.out, spec, model, guide, data, args.posterior_samples, history.rows)
    print(f"wrote {args.out}/items.csv, students.csv and pictures")


# ---- tables and pictures ------------------------------------------------------------------

def item_table(model: IRT, samples: dict[str, torch.Tensor], item_ids: list[str]) -> list[dict]:
    """One row per item: for every item site its posterior mean, sd and 94% interval
    (3% and 97% quantiles of the draws); the lecture model also gets 1/beta (difficulty)."""
    columns = dict((k, samples[k]) for k in model.item_sites)
    if model.kind == "lecture":
        columns["inverse_beta"] = 1.0 / samples["beta"]
    rows = []
    for j, item in enumerate(item_ids):
        row: dict = {"item": item}
        for name, draws in columns.items():
            x = draws[:, j].double()
            q = torch.quantile(x, torch.tensor([0.03, 0.97], dtype=x.dtype))
            row.update({f"{name}_mean": float(x.mean()), f"{name}_sd": float(x.std()),
                        f"{name}_hdi_3%": float(q[0]), f"{name}_hdi_97%": float(q[1])})
        rows.append(row)
    return rows


def student_rows(ids: list[str], mean: torch.Tensor, sd: torch.Tensor,
                 data: Responses, exact: tuple[torch.Tensor, torch.Tensor] | None = None,
                 ) -> list[dict]:
    """One row per student: ability mean, sd, 94% interval (from the guide), items
    answered, number right; with ``exact`` also the exact posterior mean and sd given the
    items' posterior means (quadrature: ``ability_exact_mean``, ``ability_exact_sd``)."""
    answered = data.mask.sum(1).tolist()
    right = (data.responses * data.mask).sum(1).tolist()
    rows = [{"student": s, "ability_mean": float(m), "ability_sd": float(d),
             "ability_hdi_3%": float(m - Z94 * d), "ability_hdi_97%": float(m + Z94 * d),
             "answered": int(a), "correct": int(r)}
            for s, m, d, a, r in zip(ids, mean.tolist(), sd.tolist(), answered, right)]
    if exact is not None:
        for row, m, d in zip(rows, exact[0].tolist(), exact[1].tolist()):
            row.update(ability_exact_mean=m, ability_exact_sd=d)
    return rows


def exact_abilities(model: IRT, samples: dict[str, torch.Tensor], data: Responses
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact posterior of each ability given the items' posterior means (quadrature)."""
    means = {k: samples[k].mean(0) for k in model.item_sites}
    mu = float(samples["ability_mean"].mean()) if "ability_mean" in samples else 0.0
    return quadrature_abilities(model.kind, means, *data.tensors(), ability_mean=mu)


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_outputs(run: Path, spec: dict, model: IRT, guide, data: Responses,
                  num_samples: int = 1000, rows: list[dict] | None = None) -> None:
    """items.csv, students.csv and the pictures, from the trained guide."""
    from ppl_vae import plots

    for m in (model, guide):
        m.eval()
    samples = posterior_samples(model, guide, *data.tensors(), num_samples=num_samples)
    items = item_table(model, samples, data.item_ids)
    write_csv(items, run / "items.csv")
    mean, sd = ability_posterior(guide, *data.tensors())
    write_csv(student_rows(data.student_ids, mean, sd, data,
                           exact_abilities(model, samples, data)), run / "students.csv")
    means = {k: samples[k].mean(0) for k in model.item_sites}
    if rows:
        plots.loss_curve(rows, run / "loss.png")
    _pictures(run, model.kind, means, samples, items, data.item_ids, mean)


def _pictures(run: Path, kind: str, means: dict, samples: dict, items: list[dict],
              item_ids: list[str], abilities: torch.Tensor) -> None:

    import matplotlib.pyplot as plt

    theta = torch.linspace(-4, 4, 161)
    show = list(range(min(len(item_ids), 20)))
    p = IRT.probability(kind, theta, means)
    fig, ax = plt.subplots(figsize=(6, 4))
    for j in show:
        ax.plot(theta, p[:, j], lw=1.2, label=item_ids[j])
    ax.set_xlabel("ability (logit scale)")
    ax.set_ylabel("P(correct)")
    ax.set_title("item characteristic curves" + (f" (first {len(show)} items)"
                                                 if len(show) < len(item_ids) else ""))
    if len(show) <= 10:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    _save(fig, run / "icc.png")

    info = IRT.information(kind, theta, means).sum(-1)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(theta, info, color="k", label="test information")
    ax2 = ax.twinx()
    ax2.plot(theta, info.rsqrt(), color="tab:red", ls="--", label="standard error")
    ax.set_xlabel("ability (logit scale)")
    ax.set_ylabel("information")
    ax2.set_ylabel("standard error of ability", color="tab:red")
    ax.set_title("test information curve")
    ax.grid(alpha=0.3)
    _save(fig, run / "information.png")

    name = "inverse_beta" if kind == "lecture" else "difficulty"
    label = "1 / beta (lecture difficulty)" if kind == "lecture" else "difficulty b (logit)"
    order = sorted(range(len(items)), key=lambda j: items[j][f"{name}_mean"])[:60]
    fig, ax = plt.subplots(figsize=(6, 0.25 * len(order) + 1.2))
    y = list(range(len(order)))
    mean_ = [items[j][f"{name}_mean"] for j in order]
    lo = [items[j][f"{name}_mean"] - items[j][f"{name}_hdi_3%"] for j in order]
    hi = [items[j][f"{name}_hdi_97%"] - items[j][f"{name}_mean"] for j in order]
    ax.errorbar(mean_, y, xerr=[lo, hi], fmt="o", ms=3, capsize=2)
    ax.set_yticks(y, [item_ids[j] for j in order], fontsize=7)
    ax.set_xlabel(label + ", posterior mean and 94% interval")
    ax.set_title("item difficulties")
    ax.grid(alpha=0.3, axis="x")
    _save(fig, run / "difficulties.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(abilities.numpy(), bins=40, color="tab:blue", alpha=0.8)
    ax.set_xlabel("ability, posterior mean (logit scale)")
    ax.set_ylabel("students")
    ax.set_title(f"abilities of {len(abilities)} students")
    _save(fig, run / "abilities.png")


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- reload a run -------------------------------------------------------------------------

def load_run(run: str | Path, device: str = "cpu") -> tuple[dict, IRT, torch.nn.Module]:
    """Config, model and guide of a run folder with the final trained parameters
    (checkpoint.pt: the state items.csv and students.csv describe; there is no validation
    split, so best.pt only marks the best noisy training ELBO). The training data are not
    needed: parameters are created from zeros of the recorded shape."""
    run = Path(run)
    spec = json.loads((run / "config.json").read_text())
    model, guide = build_irt(spec)
    n, i = int(spec["num_students"]), int(spec["num_items"])
    example = (torch.zeros(n, i), torch.ones(n, i, dtype=torch.bool))
    restore(model, guide, run / "checkpoint.pt", example, device=resolve_device(device))
    return spec, model, guide


def _training_data(spec: dict) -> Responses:
    return load_responses(spec["responses"], spec.get("format", "auto"), spec.get("id_column"),
                          check=False)


def evaluate(run: Path, args: argparse.Namespace) -> dict:
    """ELBO and importance-sampled log-likelihood per student (nats) on the training table
    (items drawn from q; K = --iwae-samples per student), plus sizes."""
    spec, model, guide = load_run(run, args.device)
    data = _training_data(spec).align(spec["item_ids"])
    tensors = data.tensors()
    if args.limit:
        tensors = tuple(t[:args.limit] for t in tensors)
    device = next(guide.parameters()).device
    torch.manual_seed(args.seed)
    if spec["guide"] == "meanfield" and args.limit:
        raise SystemExit("error: --limit needs an amortized run (mean-field parameters are "
                         "tied to the whole table)")
    result = {"elbo": elbo(model, guide, tensors, num_particles=10, device=device,
                           batch_size=1000),
              "log_likelihood": log_likelihood(model, guide, tensors, batch_size=1000,
                                               num_samples=args.iwae_samples, device=device),
              "iwae_samples": args.iwae_samples, "students": len(tensors[0]),
              "items": spec["num_items"], "answers": int(tensors[1].sum())}
    result["log_likelihood_per_answer"] = result["log_likelihood"] * result["students"] / \
        max(result["answers"], 1)
    write_json(result, Path(run) / "evaluation.json")
    return result


def score(run: Path, args: argparse.Namespace) -> dict:
    """Abilities of new students (mean, sd, 94% interval) from the amortized encoder: one
    forward pass, no retraining. Items missing from the new file count as unanswered."""
    spec, model, guide = load_run(run, args.device)
    if spec["guide"] != "amortized":
        raise SystemExit(f"error: {run} was trained with --guide {spec['guide']}; scoring new "
                         "students needs an amortized run (--guide amortized)")
    data = load_responses(args.responses, check=False).align(spec["item_ids"])
    mean, sd = ability_posterior(guide, *data.tensors())
    samples = posterior_samples(model, guide, *data.tensors(), num_samples=1000)
    write_csv(student_rows(data.student_ids, mean, sd, data,
                           exact_abilities(model, samples, data)), args.out)
    return {"scored": len(mean), "out": str(args.out)}


def check(run: Path, args: argparse.Namespace) -> dict:
    """``ppl-vae check RUN``: posterior.nc, summary.csv, forest/posterior/PPC/k-hat PNGs
    (:func:`ppl_vae.checks.check_posterior`) with the exam's dims (ability[student],
    item parameters[item], responses[student, item]) and predictive checks (proportion
    correct per item, distribution of total scores); for amortized runs simulation-based
    calibration of the ability encoder (sbc.png); with ``--nuts`` a NUTS cross-check
    (nuts_vs_svi.csv, nuts_vs_svi_forest.png). Prints ``pareto_k`` (share of students with
    k-hat >= 0.7) and the verdicts."""
    import numpy as np

    from ppl_vae.checks import check_posterior
    from ppl_vae.diagnostics import nuts_crosscheck, sbc

    spec, model, guide = load_run(run, args.device)
    data = _training_data(spec).align(spec["item_ids"])
    tensors = data.tensors()
    items = list(spec["item_ids"])
    dims = {"responses": ["student", "item"]}
    coords = {"item": items, "student": list(data.student_ids)}
    ppc = {"proportion correct per item": ("responses", lambda y: np.nanmean(y, 0), items),
           "share of students per total score (answered items)":
           ("responses", lambda y: np.bincount(np.nansum(y, 1).astype(int),
                                               minlength=len(items) + 1) / len(y),
            list(range(len(items) + 1)))}
    torch.manual_seed(args.seed)
    result = check_posterior(model, guide, tensors, run, dims=dims, coords=coords,
                             num_samples=args.samples, khat_samples=args.khat_samples, ppc=ppc,
                             seed=args.seed,
                             batch_size=max(1, 200_000 // max(1, args.samples)))
    if spec["guide"] == "amortized" and getattr(args, "sbc_simulations", 0) > 0:
        calibration = sbc(model, guide, tensors, num_simulations=args.sbc_simulations,
                          seed=args.seed, sites=["ability"])
        calibration.plot(Path(run) / "sbc.png")
        result["sbc_p_value"] = calibration.p_value
        result["sbc"] = calibration.summary()
    if getattr(args, "nuts", False):
        table, _, _ = nuts_crosscheck(
            model, guide, tensors, num_samples=args.nuts_samples,
            warmup_steps=args.nuts_samples, num_chains=2, svi_samples=args.samples,
            dims=dims, coords={"item": items}, out=run, seed=args.seed,
            forest_coords={"student": [0, 1, 2]})
        glob = table[~table.index.str.startswith("ability")]
        result["nuts_max_abs_z_items"] = float(glob["z"].abs().max())
        result["nuts_sd_ratio_items"] = float(glob["sd_ratio"].median())
        result["nuts_max_abs_z_abilities"] = float(
            table[table.index.str.startswith("ability")]["z"].abs().max())
    write_json({k: v for k, v in result.items()}, Path(run) / "check.json")
    return result
