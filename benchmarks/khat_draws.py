"""How many draws a PSIS k-hat verdict needs (issue 12): the default VAE's guide, judged with
100, 1000 and 4000 draws per test image.

Trains the MLP VAE (latent 20, hidden 400, Bernoulli with a fixed binarization) on the first
``--train`` Fashion-MNIST images for ``--epochs`` epochs, then computes k-hat of
log p(x, z) - log q(z | x) for ``--images`` test images with each number of draws. Prints the
share of images judged bad (k >= 0.7) and good (k < 0.5), the worst k-hat, and how far the
k-hats of the two halves of the draws differ (median over images): the estimate's own noise.

    OMP_NUM_THREADS=1 python benchmarks/khat_draws.py          # ~1 minute on one CPU core
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pyro
import torch

from ppl_vae import fit
from ppl_vae.data.images import load_fashion_mnist
from ppl_vae.diagnostics import importance_diagnostics
from ppl_vae.models.vae import build_vae


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", type=int, default=20_000)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--images", type=int, default=50)
    p.add_argument("--draws", type=int, nargs="+", default=[100, 1000, 4000])
    args = p.parse_args()
    torch.set_num_threads(1)
    x, _ = load_fashion_mnist(None, "train", limit=args.train, binarize="sample")
    x_test, _ = load_fashion_mnist(None, "test", limit=args.images, binarize="sample")
    pyro.set_rng_seed(0)
    model, guide = build_vae(latent_dim=20, hidden=[400])
    start = time.process_time()
    history = fit(model, guide, x, epochs=args.epochs, batch_size=128, progress=False)
    print(f"VAE: {args.train} images, {args.epochs} epochs, train ELBO "
          f"{history['train_elbo'][-1]:.2f} nats/image ({time.process_time() - start:.0f} CPU s)")
    print("draws  share bad (k>=0.7)  share good (k<0.5)  worst k  halves differ by")
    for draws in args.draws:
        k = importance_diagnostics(model, guide, x_test, num_samples=draws, seed=0)
        gap = "n/a" if k.uncertainty is None else f"{k.uncertainty:.2f}"
        print(f"{draws:5d}  {k.share_bad:18.2f}  {k.share_ok:18.2f}  {float(np.max(k.local)):7.2f}"
              f"  {gap:>16}")


if __name__ == "__main__":
    main()
