"""``ppl-vae train cvae``: the conditional VAE on labelled Fashion-MNIST, with pictures.

    ppl-vae train cvae --prior learned --guide fullcov --epochs 20 --out runs/cvae
    ppl-vae evaluate runs/cvae            # test ELBO and log p(x | y), nats per image
    ppl-vae sample runs/cvae --label 3 --n 16
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ppl_vae import elbo, fit, log_likelihood, plots, restore
from ppl_vae.checkpoint import write_json
from ppl_vae.cli.main import fit_options
from ppl_vae.data.images import CLASSES, load_fashion_mnist, validate_images
from ppl_vae.guides import GUIDES
from ppl_vae.models.cvae import PRIORS, build_cvae, one_hot
from ppl_vae.training import resolve_device

NAMES = ("cvae",)
HELP = {"cvae": "conditional VAE q(z|x,y), p(x|z,y) on labelled Fashion-MNIST"}
TRAIN_SIZE = 60_000


def add_data_arguments(g: argparse._ArgumentGroup, binarize: tuple[str, ...]) -> None:
    """Flags shared by the labelled-image families (cvae, ssvae)."""
    g.add_argument("--binarize", choices=binarize, default=binarize[0],
                   help="binary pixels for the Bernoulli likelihood: dynamic (a new draw "
                   "each time a batch is seen), sample (one fixed draw) or threshold (> 0.5)")
    g.add_argument("--limit", type=int, default=None, help="first N training images")
    g.add_argument("--val-size", type=int, default=None,
                   help="validation images from the end of the training split "
                   "(default: 5000, or 10%% of --limit)")
    g.add_argument("--data", type=Path, default=None,
                   help="folder with the Fashion-MNIST idx files")
    g.add_argument("--download", action="store_true", help="download with torchvision if absent")


def add_train_arguments(p: argparse.ArgumentParser, name: str) -> None:
    g = p.add_argument_group("cvae")
    g.add_argument("--latent-dim", type=int, default=20)
    g.add_argument("--hidden", type=int, nargs="+", default=[400],
                   help="hidden sizes of the MLP encoder (decoder mirrored)")
    g.add_argument("--prior", choices=PRIORS, default="fixed",
                   help="p(z) = N(0, I) (fixed) or a learned p(z | y) (learned)")
    g.add_argument("--guide", choices=GUIDES, default="diagonal",
                   help="q(z | x, y): diagonal Normal, full covariance, or IAF")
    g.add_argument("--flows", type=int, default=2, help="IAF steps (--guide iaf)")
    add_data_arguments(g, ("dynamic", "sample", "threshold"))


def split_sizes(limit: int | None, val_size: int | None) -> tuple[int | None, int]:
    val = val_size if val_size is not None else (5000 if limit is None else max(1, limit // 10))
    if val < 1 or val >= TRAIN_SIZE:
        raise SystemExit(f"error: --val-size must be in 1..{TRAIN_SIZE - 1}, got {val}")
    if limit is not None and limit < 1:
        raise SystemExit(f"error: --limit must be >= 1, got {limit}")
    if limit is not None and limit + val > TRAIN_SIZE:
        limit = TRAIN_SIZE - val
    return limit, val


def load_labelled(config: dict, split: str, limit: int | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 28, 28) and labels (N,) of a split, binarized as the run was trained
    (one fixed draw for test/validation when training used dynamic binarization); checked
    before any training step."""
    binarize = config["binarize"]
    if binarize == "dynamic":  # training resamples pixels; evaluation uses one fixed draw
        binarize = "sample" if split == "test" else None
    x, y = load_fashion_mnist(config.get("data"), split, limit=limit, binarize=binarize,
                              download=config.get("download", False))
    validate_images(x, binary=binarize is not None, name=f"{split} images")
    one_hot(y, len(CLASSES))  # labels in 0..9, or an error naming the row
    return x, y


def train_val(config: dict) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple]:
    """((x, y) for training, (x, y) for validation) from the training split."""
    x, y = load_labelled(config, "train")
    val = config["val_size"]
    xv, yv = x[-val:], y[-val:]
    limit = config["limit"] or len(x) - val
    x, y = x[:limit], y[:limit]
    if config["binarize"] == "dynamic":
        xv = torch.bernoulli(xv, generator=torch.Generator().manual_seed(1))
    return (x, y), (xv, yv)


def check_resume(args: argparse.Namespace, config: dict) -> None:
    if args.resume and (args.out / "config.json").exists():
        saved = json.loads((args.out / "config.json").read_text())
        changed = {k: (saved.get(k), v) for k, v in config.items() if saved.get(k) != v}
        if changed:
            raise SystemExit(f"error: --resume with a different model spec: {changed}")


def build(config: dict):
    model, guide = build_cvae(latent_dim=config["latent_dim"], hidden=config["hidden"],
                              num_classes=len(CLASSES), prior=config["prior"],
                              guide=config["guide"],
                              **({"num_flows": config["flows"]} if config["guide"] == "iaf"
                                 else {}))
    model.dynamic_binarization = config["binarize"] == "dynamic"
    return model, guide


def train(args: argparse.Namespace) -> None:
    limit, val_size = split_sizes(args.limit, args.val_size)
    config = {"family": "cvae", "model": "cvae", "latent_dim": args.latent_dim,
              "hidden": list(args.hidden), "prior": args.prior, "guide": args.guide,
              "flows": args.flows, "binarize": args.binarize,
              "data": str(args.data) if args.data else None, "download": args.download,
              "limit": limit, "val_size": val_size}
    check_resume(args, config)
    (x, y), val = train_val(config)
    model, guide = build(config)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(config, args.out / "config.json")
    history = fit(model, guide, (x, y), val_data=val, config=config,
                  **fit_options(args, ("z",)))
    print(f"trained {len(history)} epochs on {len(x)} images: train ELBO "
          f"{history['train_elbo'][-1]:.2f}, validation ELBO {history['val_elbo'][-1]:.2f} "
          "nats/image")
    write_pictures(args.out, config, model, guide, history.rows)


def write_pictures(run: Path, config: dict, model, guide, rows: list[dict]) -> None:
    """loss.png; samples_per_class.png (a row of generated items per class);
    style_transfer.png (test items, first column, redrawn with every label)."""
    plots.loss_curve(rows, run / "loss.png")
    model.eval()
    guide.eval()
    torch.manual_seed(0)
    per_class = torch.cat([model.generate(c, 8) for c in range(len(CLASSES))]).cpu()
    plots.image_grid(per_class, run / "samples_per_class.png", nrow=8,
                     title="rows: " + ", ".join(CLASSES))
    x, y = load_labelled(config, "test", limit=8)
    device = next(model.parameters()).device
    with torch.no_grad():
        moved = model.style_transfer(guide, x.to(device), y.to(device)).cpu()   # (8, C, H, W)
    grid = torch.cat([x.unsqueeze(1), moved], 1).reshape(-1, *x.shape[1:])
    plots.image_grid(grid, run / "style_transfer.png", nrow=len(CLASSES) + 1,
                     title="original | decoded with labels 0..9")


def _restore(run: Path, device: str):
    config = json.loads((run / "config.json").read_text())
    model, guide = build(config)
    device = resolve_device(device)
    checkpoint = run / "best.pt" if (run / "best.pt").exists() else run / "checkpoint.pt"
    example = (torch.zeros(2, 28, 28), torch.zeros(2, dtype=torch.long))
    restore(model, guide, checkpoint, example, device=device)
    return config, model, guide, device


def evaluate(run: Path, args: argparse.Namespace) -> dict:
    """Test ELBO and importance-sampled log p(x | y) (K = --iwae-samples), nats per image."""
    config, model, guide, device = _restore(run, args.device)
    x, y = load_labelled(config, "test", limit=args.limit)
    torch.manual_seed(args.seed)
    result = {"elbo": elbo(model, guide, (x, y), device=device),
              "log_likelihood": log_likelihood(model, guide, (x, y),
                                               num_samples=args.iwae_samples, device=device),
              "iwae_samples": args.iwae_samples, "test_images": len(x)}
    write_json(result, run / "evaluation.json")
    return result


def sample(run: Path, args: argparse.Namespace, restorer=None) -> dict:
    """A PNG of ``--n`` generated items of class ``--label`` (every class if omitted)."""
    _, model, _, _ = (restorer or _restore)(run, args.device)
    if args.label is not None and not 0 <= args.label < len(CLASSES):
        raise SystemExit(f"error: --label must be in 0..{len(CLASSES) - 1}, got {args.label}")
    if args.n < 1:
        raise SystemExit(f"error: --n must be >= 1, got {args.n}")
    torch.manual_seed(args.seed)
    if args.label is None:
        images = torch.cat([model.generate(c, args.n) for c in range(len(CLASSES))])
        path, title = args.out or run / f"samples_{args.n}.png", "rows: classes 0..9"
    else:
        images = model.generate(args.label, args.n)
        path = args.out or run / f"samples_label{args.label}_{args.n}.png"
        title = f"class {args.label}: {CLASSES[args.label]}"
    plots.image_grid(images.cpu(), path, nrow=min(args.n, 16), title=title)
    return {"samples": str(path)}


def check(run: Path, args: argparse.Namespace) -> dict:
    """``ppl-vae check RUN`` on the first 50 test images and their labels: codes
    z[image, latent_dim] from q(z | x, y), PPC of the per-pixel means, k-hat of
    log p(x, z | y) - log q(z | x, y) per image; ``pareto_k`` is the share of images with
    k-hat >= 0.7 (see :func:`ppl_vae.checks.check_posterior`)."""
    import numpy as np

    from ppl_vae.checks import check_posterior

    config, model, guide, device = _restore(run, args.device)
    x, y = load_labelled(config, "test", limit=50)
    if config["binarize"] == "dynamic" and config.get("likelihood", "bernoulli") == "bernoulli":
        # grey levels under a Bernoulli likelihood: check one fixed binary draw (seed 0)
        x = torch.bernoulli(x, generator=torch.Generator().manual_seed(0))
    dims = {"z": ["image", "latent_dim"], "x": ["image", "row", "column"]}
    ppc = {"per-pixel mean over the 50 test images (784 pixels)":
           ("x", lambda img: np.nanmean(img, 0).reshape(-1), None)}
    torch.manual_seed(args.seed)
    result = check_posterior(model, guide, (x, y), run, dims=dims,
                             num_samples=min(args.samples, 100), khat_samples=args.khat_samples,
                             ppc=ppc, seed=args.seed, device=device, plot_points=3)
    write_json(result, run / "check.json")
    return result
