"""``ppl-vae train ssvae``: the semi-supervised VAE M2 on Fashion-MNIST with few labels.

    ppl-vae train ssvae --labels-per-class 100 --epochs 20 --out runs/m2
    ppl-vae evaluate runs/m2        # test_accuracy, test ELBO and log p(x), nats per image
    ppl-vae sample runs/m2 --label 3 --n 16

The labelled images are drawn at random, ``--labels-per-class`` of each class (seed
``--label-seed``), from the training images; the other training images are used without
their labels. Their row numbers are written to RUN/labelled_rows.csv. With
``--labelled-share S`` the labelled images are repeated, each copy weighted 1/k, so that
they make up about S of every minibatch (the same training objective, its labelled part
seen more often).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ppl_vae import elbo, fit, log_likelihood, plots, restore
from ppl_vae.checkpoint import write_json
from ppl_vae.cli.cvae import add_data_arguments, check_resume, load_labelled, split_sizes
from ppl_vae.cli.main import fit_options
from ppl_vae.data.images import CLASSES
from ppl_vae.guides import GUIDES
from ppl_vae.models.ssvae import build_ssvae, check_labels, oversample_labelled
from ppl_vae.training import resolve_device

NAMES = ("ssvae",)
HELP = {"ssvae": "semi-supervised VAE (M2, Kingma et al. 2014): classify with few labels"}


def default_alpha(num_images: int, num_labelled: int) -> float:
    """Weight of log q(y|x) per labelled image: 5 N / N_labelled, at least 500.

    Kingma et al.'s form (alpha proportional to N / N_labelled) with 50x their constant 0.1:
    on binarized Fashion-MNIST the paper's value left the classifier to the unlabelled ELBO
    (accuracy 0.48 at 10 labels per class), accuracy was flat from alpha 50 to 5000 with
    1,000 labels in 10k images, and with 100 labels in 60k images 3000 gave 0.63-0.68 where
    500 gave 0.53-0.56 (benchmarks/RESULTS.md, issue 5)."""
    return max(5.0 * num_images / num_labelled, 500.0)


def add_train_arguments(p: argparse.ArgumentParser, name: str) -> None:
    g = p.add_argument_group("ssvae")
    g.add_argument("--labels-per-class", type=int, default=100,
                   help="labelled training images per class (the rest are unlabelled)")
    g.add_argument("--label-seed", type=int, default=0, help="which images are labelled")
    g.add_argument("--alpha", type=float, default=None,
                   help="weight of the classification term per labelled image (default: "
                   "5 N / N_labelled, at least 500: Kingma et al.'s form with 50x their "
                   "constant, from the sweeps in benchmarks/RESULTS.md)")
    g.add_argument("--labelled-share", type=float, default=0.0,
                   help="repeat the labelled images (weight 1/k each, so the objective is "
                   "unchanged) until they are about this share of every minibatch; default "
                   "0: each labelled image once per epoch (oversampling did not help in "
                   "benchmarks/ssvae.py)")
    g.add_argument("--latent-dim", type=int, default=50)
    g.add_argument("--hidden", type=int, nargs="+", default=[500],
                   help="hidden sizes of classifier and encoder (decoder mirrored)")
    g.add_argument("--guide", choices=GUIDES, default="diagonal", help="q(z | x, y)")
    g.add_argument("--flows", type=int, default=2, help="IAF steps (--guide iaf)")
    add_data_arguments(g, ("sample", "threshold"))


def pick_labelled(y: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    """A bool mask (N,) with ``per_class`` random rows of every class."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(len(y), dtype=torch.bool)
    for c in range(len(CLASSES)):
        rows = (y == c).nonzero().squeeze(-1)
        if len(rows) < per_class:
            raise SystemExit(f"error: --labels-per-class {per_class}: class {c} "
                             f"({CLASSES[c]}) has only {len(rows)} training images")
        mask[rows[torch.randperm(len(rows), generator=g)[:per_class]]] = True
    return mask


def build(config: dict):
    return build_ssvae(latent_dim=config["latent_dim"], hidden=config["hidden"],
                       num_classes=len(CLASSES), alpha=config["alpha"], guide=config["guide"],
                       **({"num_flows": config["flows"]} if config["guide"] == "iaf" else {}))


def unlabelled(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The model's data for images without labels: (x, y = -1, labelled = False)."""
    return x, torch.full((len(x),), -1, dtype=torch.long), torch.zeros(len(x), dtype=torch.bool)


def train(args: argparse.Namespace) -> None:
    if args.objective in (None, "trace"):  # the shared default: M2 sums y out exactly
        args.objective = "enum"
    elif args.objective != "enum":
        raise SystemExit(f"error: ssvae trains with --objective enum (y summed out exactly), "
                         f"not {args.objective}")
    if args.labels_per_class < 1:
        raise SystemExit(f"error: --labels-per-class must be >= 1, got {args.labels_per_class}")
    limit, val_size = split_sizes(args.limit, args.val_size)
    spec = {"family": "ssvae", "model": "ssvae", "latent_dim": args.latent_dim,
            "hidden": list(args.hidden), "guide": args.guide, "flows": args.flows,
            "binarize": args.binarize, "data": str(args.data) if args.data else None,
            "download": args.download, "limit": limit, "val_size": val_size,
            "labels_per_class": args.labels_per_class, "label_seed": args.label_seed}
    if args.labelled_share:  # stored only when used, so runs from before it still resume
        spec["labelled_share"] = args.labelled_share
    x, y = load_labelled(spec, "train")
    xv = x[-val_size:]
    x, y = x[:limit or len(x) - val_size], y[:limit or len(y) - val_size]
    labelled = pick_labelled(y, args.labels_per_class, args.label_seed)
    y = torch.where(labelled, y, torch.full_like(y, -1))  # the hidden labels are not passed
    check_labels(y, labelled, len(CLASSES), name="training labels")
    alpha = args.alpha if args.alpha is not None else default_alpha(len(x), int(labelled.sum()))
    config = dict(spec, alpha=alpha)
    check_resume(args, config)
    model, guide = build(config)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(config, args.out / "config.json")
    (args.out / "labelled_rows.csv").write_text(
        "row\n" + "".join(f"{i}\n" for i in labelled.nonzero().squeeze(-1).tolist()))
    data = (oversample_labelled(x, y, labelled, args.labelled_share) if args.labelled_share
            else (x, y, labelled))  # no weight column at 0: old runs' data unchanged
    history = fit(model, guide, data, val_data=unlabelled(xv), config=config,
                  **fit_options(args, ("z",)))
    model.eval()
    xt, yt = load_labelled(config, "test", limit=2000)
    accuracy = float((model.predict(xt.to(next(model.parameters()).device)).cpu() == yt)
                     .float().mean())
    print(f"trained {len(history)} epochs on {len(x)} images ({int(labelled.sum())} labelled, "
          f"alpha {alpha:.3g}): train objective {history['train_elbo'][-1]:.2f}, validation "
          f"ELBO {history['val_elbo'][-1]:.2f} nats/image; accuracy on 2000 test images "
          f"{accuracy:.4f}")
    plots.loss_curve(history.rows, args.out / "loss.png")
    torch.manual_seed(0)
    per_class = torch.cat([model.generate(c, 8) for c in range(len(CLASSES))]).cpu()
    plots.image_grid(per_class, args.out / "samples_per_class.png", nrow=8,
                     title="rows: " + ", ".join(CLASSES))


def _restore(run: Path, device: str):
    config = json.loads((run / "config.json").read_text())
    model, guide = build(config)
    device = resolve_device(device)
    checkpoint = run / "best.pt" if (run / "best.pt").exists() else run / "checkpoint.pt"
    restore(model, guide, checkpoint, unlabelled(torch.zeros(2, 28, 28)), device=device)
    return config, model, guide, device


def evaluate(run: Path, args: argparse.Namespace) -> dict:
    """test_accuracy of q(y | x) (argmax), and with y unobserved the test ELBO and the
    importance-sampled log p(x) (K = --iwae-samples), nats per image."""
    config, model, guide, device = _restore(run, args.device)
    x, y = load_labelled(config, "test", limit=args.limit)
    with torch.no_grad():
        predicted = torch.cat([model.predict(b.to(device)).cpu() for b in x.split(1000)])
    torch.manual_seed(args.seed)
    data = unlabelled(x)
    result = {"test_accuracy": float((predicted == y).float().mean()),
              "elbo": elbo(model, guide, data, device=device),
              "log_likelihood": log_likelihood(model, guide, data,
                                               num_samples=args.iwae_samples, device=device),
              "iwae_samples": args.iwae_samples, "test_images": len(x)}
    write_json(result, run / "evaluation.json")
    return result


def sample(run: Path, args: argparse.Namespace) -> dict:
    """A PNG of ``--n`` generated items of class ``--label`` (every class if omitted)."""
    from ppl_vae.cli import cvae

    return cvae.sample(run, args, restorer=_restore)
