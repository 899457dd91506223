"""Does the amortized ability encoder collapse? 20 seeds per simulated exam (issue 15).

Each seed trains ``irt-2pl --method amortized`` with the family's default settings (as
``ppl-vae train`` does; ``--epochs``/``--batch-size`` override them, e.g. the old 10-epoch
setting) and records: whether the family's fit check refused it (:class:`ppl_vae.FitFailed`),
the sd over students of the ability means (a collapsed encoder gives ~0), the median
discrimination, the largest |difficulty|, recovery against the truth (r(a), r(b), r(theta))
and CPU seconds. Seed 0 runs twice: the same seed must give the same fit (bit-identical
item means). One thread.

    OMP_NUM_THREADS=1 python3 benchmarks/irt_collapse.py --sets 2k 100k --seeds 20
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import ppl_vae  # noqa: E402
from ppl_vae.models.irt import ability_posterior, posterior_samples, simulate  # noqa: E402

SETS = {"2k": (2000, 50, 0.0, 0), "100k": (100_000, 100, 0.7, 1)}


def write_exam(folder: Path, name: str) -> tuple[Path, dict]:
    n, items, missing, seed = SETS[name]
    d = simulate(n, items, "2pl", missing=missing, seed=seed)
    y = np.where(d["mask"].numpy(), d["responses"].numpy().astype(int).astype(str), "")
    path = folder / f"{name}.csv"
    header = "student," + ",".join(f"q{j}" for j in range(items))
    lines = [header] + [f"s{s}," + ",".join(row) for s, row in enumerate(y)]
    path.write_text("\n".join(lines) + "\n")
    return path, d


def one_fit(path: Path, truth: dict, seed: int, overrides: dict) -> dict:
    start = time.process_time()
    failed = None
    try:
        run = ppl_vae.train("irt-2pl", None, {"responses": str(path), "method": "amortized"},
                            seed=seed, progress=False, **overrides)
    except ppl_vae.FitFailed as e:
        failed, run = str(e), None
    cpu = time.process_time() - start
    row = {"seed": seed, "cpu_s": cpu, "refused": failed is not None}
    if run is None:  # the check refused it; no estimates to score
        return row
    y, mask = truth["responses"], truth["mask"]
    means, _ = ability_posterior(run.guide, y, mask)
    draws = posterior_samples(run.model, run.guide, y[:2], mask[:2], num_samples=500)
    a, b = draws["discrimination"].mean(0), draws["difficulty"].mean(0)

    def r(x, z):
        return float(np.corrcoef(x.numpy(), z.numpy())[0, 1])

    row.update(spread=float(means.std()), a_median=float(a.median()),
               b_max=float(b.abs().max()), r_a=r(a, truth["discrimination"]),
               r_b=r(b, truth["difficulty"]), r_theta=r(means, truth["ability"]),
               a_means=a)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    overrides = {k: v for k, v in (("epochs", args.epochs), ("batch_size", args.batch_size))
                 if v is not None}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.sets:
            path, truth = write_exam(Path(tmp), name)
            rows = [one_fit(path, truth, seed, overrides) for seed in range(args.seeds)]
            again = one_fit(path, truth, 0, overrides)
            same = ("a_means" in again and "a_means" in rows[0]
                    and torch.equal(again["a_means"], rows[0]["a_means"]))
            print(f"\n## {name}: {SETS[name][0]} students x {SETS[name][1]} items, "
                  f"{SETS[name][2]:.0%} missing; overrides {overrides or 'none'}")
            print("| seed | refused | ability spread | median a | max abs b | r(a) | r(b) | "
                  "r(theta) | CPU s |")
            print("|---|---|---|---|---|---|---|---|---|")
            for row in rows:
                if row["refused"]:
                    print(f"| {row['seed']} | yes | | | | | | | {row['cpu_s']:.1f} |")
                    continue
                print(f"| {row['seed']} | no | {row['spread']:.3f} | {row['a_median']:.3f} | "
                      f"{row['b_max']:.2f} | {row['r_a']:.4f} | {row['r_b']:.4f} | "
                      f"{row['r_theta']:.4f} | {row['cpu_s']:.1f} |")
            ok = [row for row in rows if not row["refused"]]
            collapsed = [row for row in ok if row["spread"] < 0.3 or row["r_a"] < 0.9]
            print(f"\nrefused by the fit check: {len(rows) - len(ok)} of {len(rows)}; "
                  f"accepted but poor (spread < 0.3 or r(a) < 0.9): {len(collapsed)}; "
                  f"same seed, same fit: {same}")
            if ok:
                for key in ("r_a", "r_b", "r_theta", "cpu_s"):
                    values = [row[key] for row in ok]
                    print(f"{key}: median {statistics.median(values):.4f}, "
                          f"min {min(values):.4f}, max {max(values):.4f}")


if __name__ == "__main__":
    main()
