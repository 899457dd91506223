"""Parameter recovery of ppl-vae's exam models on simulated exams (models/irt.py:simulate).

    OMP_NUM_THREADS=1 python benchmarks/irt_recovery.py [--skip-large]

1. 2PL, 2,000 students x 50 items, every answer observed: Pearson correlation of the
   posterior means with the true ability, difficulty b and discrimination a, for the
   amortized and the mean-field guide (same data, same steps), beside the best any method
   can reach for abilities (the exact posterior means given the TRUE items, by quadrature),
   and the two guides' abilities beside each other.
2. 3PL, 4,000 students x 120 items: recovery of the guessing parameters c (correlation and
   RMSE, against the RMSE of always answering the prior mean 5/22).
3. 2PL, 100,000 students x 100 items, 70% missing, amortized guide: CPU training time per
   epoch and recovery after 10 epochs (batch 1024).
One torch thread throughout.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from ppl_vae import fit
from ppl_vae.models.irt import (
    ability_posterior,
    build_irt,
    posterior_samples,
    quadrature_abilities,
    simulate,
)


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(np.corrcoef(a.numpy(), b.numpy())[0, 1])


def run(kind: str, guide: str, d: dict, **options):
    model, q = build_irt({"kind": kind, "num_items": d["responses"].shape[1], "guide": guide})
    start = time.perf_counter()
    history = fit(model, q, (d["responses"], d["mask"]), progress=False, device="cpu",
                  lr_schedule="cosine", **options)
    seconds = time.perf_counter() - start
    theta, sd = ability_posterior(q, d["responses"], d["mask"])
    items = posterior_samples(model, q, d["responses"], d["mask"], num_samples=1000)
    return {"theta": theta, "sd": sd, "items": {k: v.mean(0) for k, v in items.items()},
            "seconds": seconds, "history": history}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip-large", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)

    print("== 2PL, 2000 students x 50 items (simulate(seed=1)); 100 epochs, batch 256, "
          "lr 0.05 cosine ==")
    d = simulate(2000, 50, "2pl", seed=1)
    best, best_sd = quadrature_abilities("2pl", {k: d[k] for k in ("difficulty",
                                                                  "discrimination")},
                                         d["responses"], d["mask"])
    print(f"best possible corr(theta) (exact posterior means given the true items): "
          f"{corr(best, d['ability']):.4f}")
    exact_sd = float(best_sd.mean())
    print("guide | corr theta | corr b | corr a | rmse b | rmse a | mean sd(theta) "
          f"(exact: {exact_sd:.3f}) | seconds")
    fits = {}
    for guide in ("amortized", "meanfield"):
        r = fits[guide] = run("2pl", guide, d, epochs=100, batch_size=256, lr=0.05)
        it = r["items"]
        rmse = {k: float(((it[k] - d[k]) ** 2).mean().sqrt()) for k in
                ("difficulty", "discrimination")}
        print(f"{guide} | {corr(r['theta'], d['ability']):.4f} | "
              f"{corr(it['difficulty'], d['difficulty']):.4f} | "
              f"{corr(it['discrimination'], d['discrimination']):.4f} | "
              f"{rmse['difficulty']:.3f} | {rmse['discrimination']:.3f} | "
              f"{float(r['sd'].mean()):.3f} | {r['seconds']:.1f}")
    a, m = fits["amortized"]["theta"], fits["meanfield"]["theta"]
    print(f"amortized vs mean-field abilities: corr {corr(a, m):.4f}, mean |diff| "
          f"{float((a - m).abs().mean()):.3f}; vs exact-given-true-items: amortized "
          f"{float((a - best).abs().mean()):.3f}, mean-field {float((m - best).abs().mean()):.3f}")

    print("\n== 3PL, 4000 students x 120 items (simulate(seed=2)); 3PL amortized, 60 epochs, "
          "batch 256, lr 0.05 cosine; guessing prior Beta(5, 17) ==")
    d = simulate(4000, 120, "3pl", seed=2)
    r = run("3pl", "amortized", d, epochs=60, batch_size=256, lr=0.05)
    it = r["items"]
    c_rmse = float(((it["guessing"] - d["guessing"]) ** 2).mean().sqrt())
    prior_rmse = float(((5 / 22 - d["guessing"]) ** 2).mean().sqrt())
    print(f"guessing c: corr {corr(it['guessing'], d['guessing']):.4f}, rmse {c_rmse:.4f} "
          f"(prior mean 5/22 everywhere: rmse {prior_rmse:.4f}); corr b "
          f"{corr(it['difficulty'], d['difficulty']):.4f}, corr a "
          f"{corr(it['discrimination'], d['discrimination']):.4f}, corr theta "
          f"{corr(r['theta'], d['ability']):.4f}; {r['seconds']:.1f} s")

    if args.skip_large:
        return
    print("\n== 2PL, 100000 students x 100 items, 70% missing (simulate(seed=1)); amortized, "
          "10 epochs, batch 1024, lr 0.05 cosine ==")
    d = simulate(100_000, 100, "2pl", missing=0.7, seed=1)
    r = run("2pl", "amortized", d, epochs=10, batch_size=1024, lr=0.05)
    it = r["items"]
    best, _ = quadrature_abilities("2pl", {k: d[k] for k in ("difficulty", "discrimination")},
                                   d["responses"], d["mask"])
    per_epoch = [row["seconds"] for row in r["history"].rows]
    print(f"CPU training {r['seconds']:.1f} s ({np.median(per_epoch):.1f} s per epoch, "
          f"{len(per_epoch)} epochs); corr theta {corr(r['theta'], d['ability']):.4f} "
          f"(best possible {corr(best, d['ability']):.4f}), corr b "
          f"{corr(it['difficulty'], d['difficulty']):.4f}, corr a "
          f"{corr(it['discrimination'], d['discrimination']):.4f}")


if __name__ == "__main__":
    main()
