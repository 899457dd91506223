"""Engine overhead: training steps/s of ppl-vae's VAE vs a hand-written PyTorch VAE.

Same network (784-400-20 encoder, 20-400-784 decoder), same batch, same Adam, same data on the
same device sliced by a shuffled index; the hand-written loop also keeps losses on the device.
Variants: analytic KL (ppl-vae ``meanfield`` vs torch closed-form KL) and sampled KL
(ppl-vae ``trace`` and ``jit`` vs torch log q - log p of one draw). The hand-written loop uses
torch's default Adam (as a user would); the engine uses one fused Adam over all parameters,
so a "torch fused Adam" row shows the loop with the same optimizer too. Alternated repeats in one
process with the same threads; prints medians and the ratio ppl-vae / PyTorch (>1 = faster).

    python benchmarks/vae_overhead.py --threads 1 --repeats 5 --images 10240
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import pyro
import torch
from torch import nn
from torch.nn import functional as F

from ppl_vae import fit
from ppl_vae.models.vae import build_vae


class TorchVAE(nn.Module):
    def __init__(self, latent=20, hidden=400):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(784, hidden), nn.ReLU())
        self.loc, self.scale = nn.Linear(hidden, latent), nn.Linear(hidden, latent)
        self.dec = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, 784))

    def loss(self, x, analytic_kl: bool, n_total: int):
        x = x.flatten(1)
        h = self.enc(x)
        mu, sigma = self.loc(h), F.softplus(self.scale(h)) + 1e-4
        eps = torch.randn_like(mu)
        z = mu + sigma * eps
        logits = self.dec(z)
        rec = -F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(1)
        if analytic_kl:
            kl = 0.5 * (sigma**2 + mu**2 - 2 * sigma.log() - 1).sum(1)
        else:
            log_q = (-0.5 * eps**2 - sigma.log() - 0.5 * math.log(2 * math.pi)).sum(1)
            log_p = (-0.5 * z**2 - 0.5 * math.log(2 * math.pi)).sum(1)
            kl = log_q - log_p
        return -(rec - kl).sum() * (n_total / len(x))


def torch_epoch(x, batch_size, analytic_kl, seed, fused=False):
    torch.manual_seed(seed)
    model = TorchVAE()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused)
    n = len(x)
    gen = torch.Generator().manual_seed(seed)

    def one_epoch():
        order = torch.randperm(n, generator=gen)
        total = torch.zeros(())
        for i in range(-(-n // batch_size)):
            batch = x.index_select(0, order[i * batch_size:(i + 1) * batch_size])
            loss = model.loss(batch, analytic_kl, n)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            total += loss.detach()
        return float(total)

    one_epoch()  # warm-up epoch, as the engine's first epoch below
    start = time.perf_counter()
    one_epoch()
    return time.perf_counter() - start


def pyro_epoch(x, batch_size, objective, seed):
    torch.manual_seed(seed)
    vae, guide = build_vae(latent_dim=20, hidden=(400,))
    history = fit(vae, guide, x, epochs=2, batch_size=batch_size, objective=objective,
                  lr=1e-3, seed=seed, device="cpu", progress=False, drop_last=False)
    return history["seconds"][-1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--images", type=int, default=10240)
    p.add_argument("--batch-size", type=int, default=256)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    pyro.enable_validation(False)
    x = (torch.rand(args.images, 28, 28) < 0.3).float()
    try:
        from ppl_vae.data.images import load_fashion_mnist

        x, _ = load_fashion_mnist(split="train", limit=args.images, binarize="sample")
        source = "Fashion-MNIST"
    except FileNotFoundError:
        source = "random binary images"
    steps = -(-len(x) // args.batch_size)
    variants = {
        "torch analytic KL": lambda s: torch_epoch(x, args.batch_size, True, s),
        "ppl-vae meanfield": lambda s: pyro_epoch(x, args.batch_size, "meanfield", s),
        "torch sampled KL": lambda s: torch_epoch(x, args.batch_size, False, s),
        "torch fused Adam": lambda s: torch_epoch(x, args.batch_size, False, s, fused=True),
        "ppl-vae trace": lambda s: pyro_epoch(x, args.batch_size, "trace", s),
        "ppl-vae jit": lambda s: pyro_epoch(x, args.batch_size, "jit", s),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(args.repeats):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for name in order:
            times[name].append(variants[name](r))
    print(f"data: {source}, {len(x)} images, batch {args.batch_size}, {steps} steps/epoch, "
          f"threads {args.threads}, repeats {args.repeats} (medians)")
    rate = {k: steps / statistics.median(v) for k, v in times.items()}
    for name, r in rate.items():
        print(f"{name:20s} {r:8.1f} steps/s")
    pairs = [("ppl-vae meanfield", "torch analytic KL"), ("ppl-vae trace", "torch sampled KL"),
             ("ppl-vae jit", "torch sampled KL")]
    for ours, theirs in pairs:
        print(f"ratio {ours} / {theirs}: {rate[ours] / rate[theirs]:.3f}")
    print(f"ratio trace / torch sampled KL with fused Adam: "
          f"{rate['ppl-vae trace'] / rate['torch fused Adam']:.3f}")


if __name__ == "__main__":
    main()
