"""The README's picture: a 2-D VAE on Fashion-MNIST -- test images' posterior means colored
by class beside the decoded latent grid.

    python benchmarks/readme_figure.py --epochs 15 --out benchmarks/figures/vae_2d.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torchvision.utils import make_grid  # noqa: E402

from ppl_vae import fit  # noqa: E402
from ppl_vae.data.images import CLASSES, load_fashion_mnist  # noqa: E402
from ppl_vae.models.vae import build_vae  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--out", type=Path, default=Path("benchmarks/figures/vae_2d.png"))
    args = p.parse_args()
    torch.manual_seed(0)
    x, _ = load_fashion_mnist(split="train")
    x_test, y_test = load_fashion_mnist(split="test", limit=5000)
    vae, guide = build_vae(latent_dim=2, hidden=(512, 256), dynamic_binarization=True)
    fit(vae, guide, x, epochs=args.epochs, batch_size=128, lr=1e-3, progress=False)
    vae.eval()
    guide.eval()
    with torch.no_grad():
        z = guide.distribution(x_test).mean
        axis = torch.linspace(-2.5, 2.5, 16)
        z2, z1 = torch.meshgrid(axis.flip(0), axis, indexing="ij")
        images = vae.mean_image(torch.stack([z1.reshape(-1), z2.reshape(-1)], -1))
    grid = make_grid(images.unsqueeze(1), nrow=16, padding=1, pad_value=1.0)[0]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 5))
    points = left.scatter(z[:, 0], z[:, 1], c=y_test, cmap="tab10", s=2, vmin=-0.5, vmax=9.5)
    left.set_xlim(-3.5, 3.5)
    left.set_ylim(-3.5, 3.5)
    left.set_title("posterior means of 5,000 test images")
    bar = fig.colorbar(points, ax=left, ticks=range(10))
    bar.ax.set_yticklabels(CLASSES)
    right.imshow(grid, cmap="gray")
    right.axis("off")
    right.set_title("decoded grid, z in [-2.5, 2.5]^2")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=90)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
