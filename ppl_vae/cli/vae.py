"""``ppl-vae train vae``: the VAE on Fashion-MNIST, with its pictures and test figures."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ppl_vae import elbo, fit, log_likelihood, plots, restore
from ppl_vae.checkpoint import write_json
from ppl_vae.cli.main import fit_options
from ppl_vae.data.images import CLASSES, load_fashion_mnist, validate_images
from ppl_vae.guides import GUIDES, build_guide, point_estimate
from ppl_vae.models.vae import LIKELIHOODS, build_vae
from ppl_vae.training import resolve_device

NAMES = ("vae",)
HELP = {"vae": "variational autoencoder on Fashion-MNIST (MLP or conv networks)"}
TRAIN_SIZE = 60_000


def add_train_arguments(p: argparse.ArgumentParser, name: str) -> None:
    g = p.add_argument_group("vae")
    g.add_argument("--latent-dim", type=int, default=20)
    g.add_argument("--architecture", choices=["mlp", "conv"], default="mlp")
    g.add_argument("--hidden", type=int, nargs="+", default=[400],
                   help="hidden layer sizes of the MLP encoder (decoder mirrored)")
    g.add_argument("--likelihood", choices=LIKELIHOODS, default="bernoulli")
    g.add_argument("--binarize", choices=["dynamic", "sample", "threshold", "none"],
                   default=None, help="Bernoulli likelihood: dynamic (resampled every step, "
                   "default), sample (one fixed draw) or threshold; grey-level likelihoods: none")
    g.add_argument("--limit", type=int, default=None, help="first N training images")
    g.add_argument("--val-size", type=int, default=None,
                   help="validation images, taken from the end of the training split "
                   "(default: 5000, or 10%% of --limit)")
    g.add_argument("--data", type=Path, default=None,
                   help="folder with the Fashion-MNIST idx files (default: look in the "
                   "Debian package's folder and ~/.cache/ppl-vae)")
    g.add_argument("--download", action="store_true", help="download with torchvision if absent")
    g.add_argument("--guide", choices=GUIDES, default="diagonal",
                   help="q(z|x): diagonal Normal, full covariance (Algorithm 2), or IAF "
                   "(on the MLP or conv encoder trunk)")
    g.add_argument("--flows", type=int, default=2, help="IAF steps (--guide iaf)")


def build(config: dict):
    """Model and guide from a run's config (the VAE spec)."""
    model, guide = build_vae(latent_dim=config["latent_dim"],
                             architecture=config["architecture"], hidden=config["hidden"],
                             likelihood=config["likelihood"],
                             dynamic_binarization=config["binarize"] == "dynamic")
    kind = config.get("guide", "diagonal")
    if kind != "diagonal":
        guide = build_guide(kind, 28 * 28, config["hidden"], config["latent_dim"], flatten=2,
                            num_flows=config.get("flows", 2),
                            architecture=config["architecture"])
    return model, guide


def load_split(config: dict, split: str, limit: int | None = None):
    """Images and labels of a split, binarized as the run was trained (static draw for
    evaluation when training used dynamic binarization)."""
    binarize = config["binarize"]
    if binarize == "dynamic":
        binarize = "sample" if split == "test" else None
    x, y = load_fashion_mnist(config.get("data"), split, limit=limit,
                              binarize=None if binarize == "none" else binarize,
                              download=config.get("download", False))
    return validate_images(x, binary=config["likelihood"] == "bernoulli"
                           and config["binarize"] != "dynamic", name=f"{split} images"), y


def train(args: argparse.Namespace) -> None:
    binarize = args.binarize or ("dynamic" if args.likelihood == "bernoulli" else "none")
    if args.likelihood != "bernoulli" and binarize != "none":
        raise SystemExit(f"error: --binarize {binarize} needs --likelihood bernoulli")
    if args.likelihood == "bernoulli" and binarize == "none":
        raise SystemExit("error: the Bernoulli likelihood needs binary pixels: choose "
                         "--binarize dynamic|sample|threshold or a grey-level --likelihood")
    limit = args.limit
    val_size = args.val_size if args.val_size is not None else (
        5000 if limit is None else max(1, limit // 10))
    if limit is not None and limit + val_size > TRAIN_SIZE:
        limit = TRAIN_SIZE - val_size
    config = {"family": "vae", "model": "vae", "latent_dim": args.latent_dim,
              "architecture": args.architecture, "hidden": list(args.hidden),
              "likelihood": args.likelihood, "binarize": binarize,
              "data": str(args.data) if args.data else None, "download": args.download,
              "limit": limit, "val_size": val_size, "guide": args.guide, "flows": args.flows}
    if args.resume and (args.out / "config.json").exists():
        saved = json.loads((args.out / "config.json").read_text())
        changed = {k: (saved.get(k), v) for k, v in config.items() if saved.get(k) != v}
        if changed:
            raise SystemExit(f"error: --resume with a different model spec: {changed}")

    x, y = load_split(config, "train")
    val = x[TRAIN_SIZE - val_size:] if len(x) == TRAIN_SIZE else x[-val_size:]
    x, y = (x[:limit], y[:limit]) if limit else (x[:len(x) - val_size], y[:len(y) - val_size])
    if binarize == "dynamic":  # validate on one fixed binary draw, as the test split
        val = torch.bernoulli(val, generator=torch.Generator().manual_seed(1))
    model, guide = build(config)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(config, args.out / "config.json")
    history = fit(model, guide, x, val_data=val, config=config, **fit_options(args, ("z",)))
    print(f"trained {len(history)} epochs on {len(x)} images: train ELBO "
          f"{history['train_elbo'][-1]:.2f}, validation ELBO {history['val_elbo'][-1]:.2f} "
          "nats/image")
    write_pictures(args.out, config, model, guide, history.rows)


def write_pictures(run: Path, config: dict, model, guide, rows: list[dict]) -> None:
    """Loss curve, reconstructions, samples; for a 2-D latent the test-set latent scatter
    colored by class and the decoded latent grid."""
    plots.loss_curve(rows, run / "loss.png")
    device = next(model.parameters()).device
    model.eval()
    guide.eval()
    x_test, y_test = load_split(config, "test", limit=2000)
    with torch.no_grad():
        x8 = x_test[:8].to(device)
        recon = model.mean_image(point_estimate(guide.distribution(x8))).cpu()
        plots.reconstructions(x8.cpu(), recon, run / "reconstructions.png")
        torch.manual_seed(0)
        plots.image_grid(model.sample(64).cpu(), run / "samples.png",
                         title="samples: E[x | z], z ~ N(0, I)")
        if config["latent_dim"] == 2:
            z = point_estimate(guide.distribution(x_test.to(device))).cpu()
            plots.latent_scatter(z, y_test, run / "latent_scatter.png", CLASSES)
            plots.latent_grid(model.mean_image, run / "latent_grid.png", device=device)


def _restore(run: Path, device: str):
    config = json.loads((run / "config.json").read_text())
    model, guide = build(config)
    device = resolve_device(device)
    checkpoint = run / "best.pt" if (run / "best.pt").exists() else run / "checkpoint.pt"
    restore(model, guide, checkpoint, torch.zeros(2, 28, 28).bernoulli_(0.5), device=device)
    return config, model, guide, device


def evaluate(run: Path, args: argparse.Namespace) -> dict:
    """Test ELBO and importance-sampled log p(x) (K = --iwae-samples), nats per image."""
    config, model, guide, device = _restore(run, args.device)
    x, _ = load_split(config, "test", limit=args.limit)
    torch.manual_seed(args.seed)
    result = {"elbo": elbo(model, guide, x, device=device),
              "log_likelihood": log_likelihood(model, guide, x, num_samples=args.iwae_samples,
                                               device=device),
              "iwae_samples": args.iwae_samples, "test_images": len(x)}
    write_json(result, run / "evaluation.json")
    return result


def sample(run: Path, args: argparse.Namespace) -> dict:
    """A PNG grid of ``--n`` images decoded from z ~ p(z)."""
    if args.label is not None:
        raise SystemExit("error: --label needs a conditional model (train cvae)")
    _, model, _, _ = _restore(run, args.device)
    torch.manual_seed(args.seed)
    path = args.out or run / f"samples_{args.n}.png"
    plots.image_grid(model.sample(args.n).cpu(), path, title="samples: E[x | z], z ~ N(0, I)")
    return {"samples": str(path)}


def check(run: Path, args: argparse.Namespace) -> dict:
    """``ppl-vae check RUN`` on the first 50 test images (pictures, predictive draws and
    posterior.nc stay small): codes z[image, latent_dim], PPC of the per-pixel means (the
    mean image of the replicates vs of the data, 784 statistics), k-hat of
    log p(x, z) - log q(z | x) per image; ``pareto_k`` is the share of images with
    k-hat >= 0.7 (an IWAE estimate of log p(x) for those is unreliable)."""
    import numpy as np

    from ppl_vae.checks import check_posterior

    config, model, guide, device = _restore(run, args.device)
    x, _ = load_split(config, "test", limit=50)
    dims = {"z": ["image", "latent_dim"], "x": ["image", "row", "column"]}
    ppc = {"per-pixel mean over the 50 test images (784 pixels)":
           ("x", lambda img: np.nanmean(img, 0).reshape(-1), None)}
    torch.manual_seed(args.seed)
    result = check_posterior(model, guide, x, run, dims=dims, num_samples=min(args.samples, 100),
                             khat_samples=args.khat_samples, ppc=ppc, seed=args.seed,
                             device=device, plot_points=3)
    write_json(result, run / "check.json")
    return result
