"""VAE quality on Fashion-MNIST: test ELBO and log p(x) (importance sampling, K samples).

MLP VAE (784-400-D), Bernoulli likelihood with dynamic binarization for training and a fixed
binary draw of the test set (seed 0) for evaluation; Adam 1e-3, batch 128.

    python benchmarks/vae_quality.py --epochs 20 --latent-dim 20 --iwae-samples 1000
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from ppl_vae import elbo, fit, log_likelihood
from ppl_vae.data.images import load_fashion_mnist
from ppl_vae.models.vae import build_vae


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--latent-dim", type=int, default=20)
    p.add_argument("--iwae-samples", type=int, default=1000)
    p.add_argument("--test-limit", type=int, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    x, _ = load_fashion_mnist(split="train")
    x_test, _ = load_fashion_mnist(split="test", binarize="sample", limit=args.test_limit)
    torch.manual_seed(args.seed)
    vae, guide = build_vae(latent_dim=args.latent_dim, hidden=(400,),
                           dynamic_binarization=True)
    history = fit(vae, guide, x, epochs=args.epochs, batch_size=128, lr=1e-3, seed=args.seed,
                  device=args.device, progress=False)
    start = time.perf_counter()
    test_elbo = elbo(vae, guide, x_test, num_particles=1)
    ll = log_likelihood(vae, guide, x_test, num_samples=args.iwae_samples, batch_size=50)
    eval_seconds = time.perf_counter() - start
    device = next(vae.parameters()).device
    print(f"machine: {platform.processor() or platform.machine()}, device {device}, "
          f"threads {args.threads}")
    print(f"epochs: {args.epochs}, latent dim {args.latent_dim}, train images {len(x)}, "
          f"test images {len(x_test)}")
    print(f"seconds_per_epoch: {statistics.median(history['seconds']):.2f}")
    print(f"train_elbo_last_epoch: {history['train_elbo'][-1]:.2f}")
    print(f"test_elbo: {test_elbo:.2f}")
    print(f"test_log_likelihood (K={args.iwae_samples}): {ll:.2f}")
    print(f"gap log p(x) - ELBO: {ll - test_elbo:.2f}")
    print(f"evaluation seconds: {eval_seconds:.1f}")


if __name__ == "__main__":
    main()
