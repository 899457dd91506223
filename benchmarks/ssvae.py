"""Semi-supervised M2 (Kingma et al. 2014) vs a supervised-only classifier (issue 5).

For 10 / 100 / 600 labels per class, drawn at random (per seed) from a pool of training
images whose other labels are hidden, train

    M2          models/ssvae.py with objective="enum" (y summed out exactly on unlabelled
                rows), classifier q(y|x) = MLP 784 -> hidden -> 10, alpha = 0.1 N / N_labelled
                per labelled image or --alpha; --labelled-share S repeats the labelled
                rows (weight 1/k) to about S of every minibatch, same objective
    supervised  the same classifier network, cross-entropy on the labelled images only,
                Adam with the same learning rate and the same number of optimizer steps;
                "sup best" is its best test accuracy over checkpoints at 250, 500, 1000, ...
                steps (an oracle early stop that favours the baseline)

and report test accuracy on the Fashion-MNIST test images (argmax of the classifier).
Same threads for both sides, the order of the two alternates with the seed; medians over
seeds. No extra dependencies:

    OMP_NUM_THREADS=1 python benchmarks/ssvae.py --pool 10000 --epochs 10 --seeds 0 1 \
        --alpha 500

That command is cut down to fit ~25 minutes on a 2-core CPU (a 10k-image pool). The
full-data figures in RESULTS.md take ~9 minutes per M2 run on one thread:

    OMP_NUM_THREADS=1 python benchmarks/ssvae.py --pool 60000 --epochs 20 --seeds 0 1 2 \
        --labels-per-class 100 --alpha 500
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.nn import functional as F

from ppl_vae import fit
from ppl_vae.data.images import load_fashion_mnist
from ppl_vae.models.ssvae import build_ssvae, oversample_labelled
from ppl_vae.nn import MLP


def pick_labelled(y: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    """A bool mask with ``per_class`` random rows of each class."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(len(y), dtype=torch.bool)
    for c in range(10):
        rows = (y == c).nonzero().squeeze(-1)
        mask[rows[torch.randperm(len(rows), generator=g)[:per_class]]] = True
    return mask


def accuracy(classifier, xt, yt) -> float:
    classifier.eval()
    with torch.no_grad():
        return float((classifier(xt.flatten(-2)).argmax(-1) == yt).float().mean())


def m2_data(x, y, labelled, args) -> tuple[torch.Tensor, ...]:
    """(x, y, labelled[, weight]): labelled rows repeated to --labelled-share of the rows,
    weighted 1/k (the same full-data objective, see oversample_labelled)."""
    y_in = torch.where(labelled, y, torch.full_like(y, -1))  # hidden labels are not passed
    if args.labelled_share:
        return oversample_labelled(x, y_in, labelled, args.labelled_share)
    return x, y_in, labelled


def m2_steps(x, y, labelled, args) -> int:
    return args.epochs * -(-len(m2_data(x, y, labelled, args)[0]) // args.batch_size)


def train_m2(x, y, labelled, xt, yt, seed, args) -> tuple[float, float, int]:
    torch.manual_seed(seed)
    alpha = args.alpha if args.alpha is not None else 0.1 * len(x) / int(labelled.sum())
    model, guide = build_ssvae(latent_dim=args.latent, hidden=(args.hidden,), alpha=alpha)
    data = m2_data(x, y, labelled, args)
    start = time.perf_counter()
    fit(model, guide, data, epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, objective="enum", seed=seed, device="cpu", progress=False)
    steps = args.epochs * -(-len(data[0]) // args.batch_size)
    return accuracy(model.classifier, xt, yt), time.perf_counter() - start, steps


def train_supervised(x, y, labelled, xt, yt, seed, steps, args
                     ) -> tuple[float, float, float]:
    """Test accuracy after ``steps`` Adam steps, the seconds taken, and the best test accuracy
    over the checkpoints 250, 500, 1000, 2000, ... and ``steps`` (an oracle early stop that
    favours the baseline: M2 gets no such choice)."""
    torch.manual_seed(seed)
    classifier = MLP([28 * 28, args.hidden, 10])
    xl, yl = x[labelled].flatten(-2), y[labelled]
    opt = torch.optim.Adam(classifier.parameters(), lr=args.lr)
    batch = min(args.batch_size, len(xl))
    g = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    order = torch.randperm(len(xl), generator=g)
    pos = 0
    checkpoints = {250 * 2**k for k in range(20) if 250 * 2**k < steps} | {steps}
    best = 0.0
    for step in range(1, steps + 1):
        if pos + batch > len(xl):
            order, pos = torch.randperm(len(xl), generator=g), 0
        idx = order[pos:pos + batch]
        pos += batch
        loss = F.cross_entropy(classifier(xl[idx]), yl[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in checkpoints:
            best = max(best, accuracy(classifier, xt, yt))
            classifier.train()
    return accuracy(classifier, xt, yt), time.perf_counter() - start, best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pool", type=int, default=10000, help="training images (first N)")
    p.add_argument("--test", type=int, default=10000)
    p.add_argument("--labels-per-class", type=int, nargs="+", default=[10, 100, 600])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--latent", type=int, default=16)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--labelled-share", type=float, default=0.0,
                   help="M2: labelled rows repeated (weight 1/k) to this share of each "
                   "epoch's rows; 0 = each labelled image once per epoch")
    p.add_argument("--alpha", type=float, default=None,
                   help="M2: weight of log q(y|x) per labelled image (default 0.1 N / "
                   "N_labelled, Kingma et al.)")
    args = p.parse_args()
    torch.set_num_threads(1)
    x, y = load_fashion_mnist(split="train", limit=args.pool, binarize="sample", seed=0)
    xt, yt = load_fashion_mnist(split="test", limit=args.test, binarize="sample", seed=1)
    print(f"binarized Fashion-MNIST: pool {len(x)} train images, {len(xt)} test images, "
          f"{args.epochs} M2 epochs, batch {args.batch_size}, D={args.latent}, hidden "
          f"{args.hidden}, labelled share {args.labelled_share}, alpha "
          f"{args.alpha or '0.1 N / N_labelled'}, threads {torch.get_num_threads()}", flush=True)
    print(f"{'labels/class':>12} {'seed':>4} {'M2 acc':>7} {'sup acc':>7} {'sup best':>8} "
          f"{'M2 s':>7} {'sup s':>6} {'steps':>6}", flush=True)
    rows = []
    for i, seed in enumerate(args.seeds):
        for per_class in args.labels_per_class:
            labelled = pick_labelled(y, per_class, seed)
            if i % 2 == 0:  # alternate which side runs first
                m2, m2_s, steps = train_m2(x, y, labelled, xt, yt, seed, args)
                sup, sup_s, best = train_supervised(x, y, labelled, xt, yt, seed, steps, args)
            else:
                steps = m2_steps(x, y, labelled, args)
                sup, sup_s, best = train_supervised(x, y, labelled, xt, yt, seed, steps, args)
                m2, m2_s, _ = train_m2(x, y, labelled, xt, yt, seed, args)
            rows.append((per_class, seed, m2, sup, best))
            print(f"{per_class:>12} {seed:>4} {m2:7.4f} {sup:7.4f} {best:8.4f} {m2_s:7.1f} "
                  f"{sup_s:6.1f} {steps:>6}", flush=True)
    print(f"\nmedians over seeds {args.seeds}: test accuracy")
    print(f"{'labels/class':>12} {'M2':>7} {'supervised':>10} {'difference':>10} "
          f"{'sup best':>8} {'vs best':>8}")
    for per_class in args.labels_per_class:
        m2 = statistics.median(r[2] for r in rows if r[0] == per_class)
        sup = statistics.median(r[3] for r in rows if r[0] == per_class)
        best = statistics.median(r[4] for r in rows if r[0] == per_class)
        print(f"{per_class:>12} {m2:7.4f} {sup:10.4f} {m2 - sup:+10.4f} {best:8.4f} "
              f"{m2 - best:+8.4f}")


if __name__ == "__main__":
    main()
