"""Pictures shared by every family: loss curves, image grids, latent maps.

All functions write a PNG and return its path. They leave matplotlib's backend alone (a
headless machine gets Agg by itself; notebooks keep their inline backend) and close their
figures after saving.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from torchvision.utils import make_grid


def loss_curve(rows: Sequence[dict], path: str | Path, title: str = "ELBO per example") -> Path:
    """Train (and validation) ELBO in nats per example against epoch."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    epochs = [r["epoch"] for r in rows]
    ax.plot(epochs, [r["train_elbo"] for r in rows], marker="o", label="train")
    if any("val_elbo" in r for r in rows):
        ax.plot(epochs, [r.get("val_elbo") for r in rows], marker="s", label="validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("ELBO (nats / example)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def image_grid(images: torch.Tensor, path: str | Path, nrow: int = 8,
               title: str | None = None, row_labels: Sequence[str] | None = None) -> Path:
    """A grid of grey images (N, H, W) with values in [0, 1]; ``row_labels`` name the rows
    on the left. The title is wrapped to the figure's width."""
    padding = 2
    grid = make_grid(images.detach().float().cpu().clamp(0, 1).unsqueeze(1), nrow=nrow,
                     padding=padding, pad_value=1.0)
    ncol = min(nrow, len(images))
    rows = -(-len(images) // nrow)
    width = max(2.0, 0.6 * ncol)
    fig, ax = plt.subplots(figsize=(width, max(2.0, 0.6 * rows + 0.4)))
    ax.imshow(grid[0].numpy(), cmap="gray", vmin=0, vmax=1)
    ax.set_xticks([])
    if row_labels is not None:
        cell = images.shape[-2] + padding
        ax.set_yticks([padding + cell * r + images.shape[-2] / 2 for r in range(rows)],
                      list(row_labels)[:rows], fontsize=8)
        ax.tick_params(left=False)
    else:
        ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    if title:  # about 9 characters of 10-point text per inch
        ax.set_title(textwrap.fill(title, max(16, int(9 * width))), fontsize=10)
    return save_figure(fig, path)


def reconstructions(originals: torch.Tensor, recon: torch.Tensor, path: str | Path) -> Path:
    """Originals (top row) over their reconstructions (bottom row), each (n, H, W)."""
    n = len(originals)
    return image_grid(torch.cat([originals, recon]), path, nrow=n,
                      title="top: data, bottom: reconstruction E[x | z = mean q(z|x)]")


def latent_scatter(z: torch.Tensor, labels: torch.Tensor, path: str | Path,
                   class_names: Sequence[str] | None = None,
                   title: str = "posterior means of the test set") -> Path:
    """2-D latent codes (N, 2) colored by class."""
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    z, labels = z.detach().cpu(), labels.detach().cpu()
    points = ax.scatter(z[:, 0], z[:, 1], c=labels, cmap="tab10", s=3, alpha=0.7,
                        vmin=-0.5, vmax=9.5)
    bar = fig.colorbar(points, ax=ax, ticks=range(10))
    if class_names is not None:
        bar.ax.set_yticklabels(class_names)
    ax.set_xlabel("z1")
    ax.set_ylabel("z2")
    ax.set_title(title)
    return save_figure(fig, path)


def latent_grid(decode: Callable[[torch.Tensor], torch.Tensor], path: str | Path, n: int = 15,
                span: float = 2.5, device: torch.device | str = "cpu") -> Path:
    """Decode a regular n x n grid over [-span, span]^2 of a 2-D latent space."""
    axis = torch.linspace(-span, span, n)
    z2, z1 = torch.meshgrid(axis.flip(0), axis, indexing="ij")
    z = torch.stack([z1.reshape(-1), z2.reshape(-1)], -1).to(device)
    with torch.no_grad():
        images = decode(z).cpu()
    return image_grid(images, path, nrow=n, title=f"decoded latent grid, z in [-{span}, {span}]^2")


def save_figure(fig, path: str | Path) -> Path:
    """Write a matplotlib figure as a PNG (parents created, tight layout, 110 dpi), close it,
    and return the path. Every picture in the package goes through here."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


_save = save_figure  # the old private name, kept so older callers keep working
