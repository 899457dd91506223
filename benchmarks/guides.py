"""Guides beyond mean-field on binarized Fashion-MNIST (issue 5).

For each seed, and for every pair (guide, training objective) with guide in diagonal /
fullcov / iaf and objective in trace (ELBO) / iwae (K importance samples), train the same
VAE (MLP decoder 20 -> 400 -> 784, Bernoulli pixels; encoder 784 -> 400 -> q's parameters)
for the same epochs on the same subset, then on held-out test images report

    test ELBO       mean over 100 draws of log p(x, z) - log q(z|x)        nats / image
    test log p(x)   importance-sampled with K_eval >= 1000 draws from q     nats / image
    gap             log p(x) - ELBO  (~ KL(q(z|x) || p(z|x)), the lecture's gap)

Runs are interleaved (the configurations' order rotates with the seed), single-threaded;
the summary gives medians over seeds and differences against the diagonal guide trained
with the same objective. No extra dependencies (the package's own environment):

    OMP_NUM_THREADS=1 python benchmarks/guides.py --train 10000 --test 500 --epochs 15 \
        --seeds 0 1

The defaults are cut down to fit ~25 minutes on a 2-core CPU (a 10k-image training subset,
15 epochs); the full data set is ``--train 60000 --test 10000``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ppl_vae import elbo, fit, log_likelihood
from ppl_vae.data.images import load_fashion_mnist
from ppl_vae.guides import GUIDES, build_guide
from ppl_vae.models.vae import VAE
from ppl_vae.nn import MLPDecoder


def run_one(guide: str, objective: str, seed: int, x, xt, args) -> dict:
    torch.manual_seed(seed)
    model = VAE(MLPDecoder(args.latent, [args.hidden], (28, 28)), args.latent)
    q = build_guide(guide, 28 * 28, [args.hidden], args.latent, flatten=2,
                    num_flows=args.flows)
    start = time.perf_counter()
    fit(model, q, x, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        objective=objective, num_particles=args.k_train if objective == "iwae" else 1,
        seed=seed, device="cpu", progress=False)
    seconds = time.perf_counter() - start
    torch.manual_seed(1000 + seed)
    test_elbo = elbo(model, q, xt, num_particles=100, progress=False)
    test_ll = log_likelihood(model, q, xt, num_samples=args.k_eval, progress=False)
    return {"guide": guide, "objective": objective, "seed": seed, "train_s": seconds,
            "elbo": test_elbo, "logpx": test_ll, "gap": test_ll - test_elbo}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train", type=int, default=10000, help="training images (first N)")
    p.add_argument("--test", type=int, default=500, help="test images (first N)")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--latent", type=int, default=20)
    p.add_argument("--hidden", type=int, default=400)
    p.add_argument("--flows", type=int, default=2, help="IAF steps")
    p.add_argument("--k-train", type=int, default=5, help="importance samples for iwae")
    p.add_argument("--k-eval", type=int, default=1000, help="importance samples for log p(x)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--guides", nargs="+", default=list(GUIDES), choices=GUIDES)
    p.add_argument("--objectives", nargs="+", default=["trace", "iwae"],
                   choices=["trace", "iwae"])
    args = p.parse_args()
    torch.set_num_threads(1)
    x, _ = load_fashion_mnist(split="train", limit=args.train, binarize="sample", seed=0)
    xt, _ = load_fashion_mnist(split="test", limit=args.test, binarize="sample", seed=1)
    configs = [(g, o) for o in args.objectives for g in args.guides]
    print(f"binarized Fashion-MNIST: {len(x)} train / {len(xt)} test images, {args.epochs} "
          f"epochs, batch {args.batch_size}, D={args.latent}, hidden {args.hidden}, "
          f"IAF steps {args.flows}, iwae K={args.k_train}, log p(x) K={args.k_eval}, "
          f"threads {torch.get_num_threads()}", flush=True)
    print(f"{'guide':9} {'objective':9} {'seed':>4} {'train s':>8} {'ELBO':>9} "
          f"{'log p(x)':>9} {'gap':>7}", flush=True)
    rows = []
    for i, seed in enumerate(args.seeds):
        shift = i % len(configs)
        for guide, objective in configs[shift:] + configs[:shift]:  # alternate the order
            r = run_one(guide, objective, seed, x, xt, args)
            rows.append(r)
            print(f"{guide:9} {objective:9} {seed:>4} {r['train_s']:8.1f} {r['elbo']:9.2f} "
                  f"{r['logpx']:9.2f} {r['gap']:7.2f}", flush=True)

    def med(guide, objective, key):
        return statistics.median(r[key] for r in rows
                                 if r["guide"] == guide and r["objective"] == objective)

    print(f"\nmedians over seeds {args.seeds} (nats per test image); deltas against the "
          "diagonal guide with the same objective")
    print(f"{'guide':9} {'objective':9} {'ELBO':>9} {'log p(x)':>9} {'gap':>7} "
          f"{'d log p(x)':>10} {'gap ratio':>9} {'time ratio':>10}")
    for guide, objective in configs:
        base = ("diagonal", objective)
        d_ll = med(guide, objective, "logpx") - med(*base, "logpx")
        ratio = med(guide, objective, "gap") / med(*base, "gap")
        t_ratio = med(guide, objective, "train_s") / med(*base, "train_s")
        print(f"{guide:9} {objective:9} {med(guide, objective, 'elbo'):9.2f} "
              f"{med(guide, objective, 'logpx'):9.2f} {med(guide, objective, 'gap'):7.2f} "
              f"{d_ll:+10.2f} {ratio:9.2f} {t_ratio:10.2f}")
    if "trace" in args.objectives and "iwae" in args.objectives:
        print("\niwae vs trace training, same guide (medians): d log p(x), d ELBO")
        for guide in args.guides:
            print(f"{guide:9} {med(guide, 'iwae', 'logpx') - med(guide, 'trace', 'logpx'):+8.2f}"
                  f" {med(guide, 'iwae', 'elbo') - med(guide, 'trace', 'elbo'):+8.2f}")


if __name__ == "__main__":
    main()
