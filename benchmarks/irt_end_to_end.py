"""A user's whole exam analysis, CSV in and tables out: `ppl-vae train irt-2pl` vs mirt.

Both sides start from the same wide CSV (students x items, blank = missing) and end with
item estimates with standard errors and every student's EAP ability written to CSV files:

    ours: ppl-vae train irt-2pl --responses exam.csv --out RUN    (the CLI defaults: marginal
          MAP, closed-form Laplace sds, abilities by quadrature, pictures)
    mirt: csv -> numpy, fit_mirt(2PL, standard errors), fscores(EAP), two CSV files written

Each run is a fresh process with one thread (OMP/MKL/OpenBLAS/RAYON = 1); CPU seconds and
peak RSS come from GNU time (/usr/bin/time), so imports count on both sides.
Runs alternate; the table gives medians and the CPU ratio.

    python3 benchmarks/irt_end_to_end.py --peer-python /tmp/peers/bin/python --repeats 3
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SIZES = {"large": (100_000, 100, 0.7), "small": (2_000, 50, 0.0)}
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
              "RAYON_NUM_THREADS": "1"}

MIRT_SCRIPT = r'''
import csv, sys, numpy as np, mirt
path, out = sys.argv[1], sys.argv[2]
with open(path, newline="") as f:
    rows = list(csv.reader(f))
items, ids = rows[0][1:], [r[0] for r in rows[1:]]
y = np.array([[float(c) if c != "" else np.nan for c in r[1:]] for r in rows[1:]])
fitted = mirt.fit_mirt(y, model="2PL")
p, se = fitted.model.parameters, fitted.standard_errors
theta = mirt.fscores(fitted, y, method="EAP")
with open(out + "/items.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["item", "discrimination", "discrimination_se", "difficulty", "difficulty_se"])
    for row in zip(items, np.ravel(p["discrimination"]), np.ravel(se["discrimination"]),
                   np.ravel(p["difficulty"]), np.ravel(se["difficulty"])):
        w.writerow(row)
with open(out + "/students.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["student", "ability"])
    w.writerows(zip(ids, np.ravel(theta.theta)))
'''


def write_exam(folder: Path, size: str) -> tuple[Path, dict]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from ppl_vae.models.irt import simulate

    n, num_items, missing = SIZES[size]
    d = simulate(n, num_items, "2pl", missing=missing, seed=1)
    y = np.where(d["mask"].numpy(), d["responses"].numpy().astype(int).astype(str), "")
    path = folder / f"{size}.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["student"] + [f"q{j}" for j in range(num_items)])
        w.writerows([f"s{s}", *row] for s, row in enumerate(y))
    truth = {k: d[k].double().numpy() for k in ("discrimination", "difficulty", "ability")}
    return path, truth


def timed(command: list[str]) -> dict:
    """Run a fresh process; its own CPU seconds, wall seconds and peak RSS (MB), measured by
    GNU time (a process forked from this big driver would inherit the driver's peak RSS in
    its rusage; GNU time forks the command from a small process)."""
    env = {**os.environ, **ONE_THREAD}
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "RUSAGE %U %S %M", *command], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{command[:3]} failed: {proc.stderr[-2000:]}")
    user, system, peak_kb = proc.stderr.strip().splitlines()[-1].split()[1:]
    return {"cpu": float(user) + float(system), "wall": wall, "peak_mb": float(peak_kb) / 1024}


def read_columns(path: Path, *names: str) -> list[np.ndarray]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [np.array([float(r[n]) for r in rows]) for n in names]


def r(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.corrcoef(x, y)[0, 1])


def ours(exam: Path, out: Path) -> dict:
    figures = timed([sys.executable, "-m", "ppl_vae.cli.main", "train", "irt-2pl",
                     "--responses", str(exam), "--out", str(out), "--no-progress"])
    a, b, se_a, se_b = read_columns(out / "items.csv", "discrimination_mode", "difficulty_mode",
                                    "discrimination_sd", "difficulty_sd")
    (theta,) = read_columns(out / "students.csv", "ability_mean")
    return {**figures, "a": a, "b": b, "se_a": se_a, "se_b": se_b, "theta": theta}


def peer(python: str, exam: Path, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    script = out / "mirt_script.py"
    script.write_text(MIRT_SCRIPT)
    figures = timed([python, str(script), str(exam), str(out)])
    a, b, se_a, se_b = read_columns(out / "items.csv", "discrimination", "difficulty",
                                    "discrimination_se", "difficulty_se")
    (theta,) = read_columns(out / "students.csv", "ability")
    return {**figures, "a": a, "b": b, "se_a": se_a, "se_b": se_b, "theta": theta}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer-python", default="/tmp/peers/bin/python")
    parser.add_argument("--sizes", nargs="+", default=["large"], choices=list(SIZES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    results: dict[str, dict[str, list[dict]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for size in args.sizes:
            exam, truth = write_exam(tmp, size)
            runs: dict[str, list[dict]] = {"ppl-vae": [], "mirt": []}
            for repeat in range(args.repeats):
                order = ["ppl-vae", "mirt"] if repeat % 2 == 0 else ["mirt", "ppl-vae"]
                for name in order:
                    out = tmp / f"{size}-{name}-{repeat}"
                    shutil.rmtree(out, ignore_errors=True)
                    row = (ours(exam, out) if name == "ppl-vae"
                           else peer(args.peer_python, exam, out))
                    row.update(r_a=r(row["a"], truth["discrimination"]),
                               r_b=r(row["b"], truth["difficulty"]),
                               r_theta=r(row["theta"], truth["ability"]),
                               rmse_a=float(np.sqrt(np.mean((row["a"]
                                                             - truth["discrimination"]) ** 2))))
                    runs[name].append(row)
                    print(f"{size} {name} repeat {repeat}: cpu {row['cpu']:.1f} s, wall "
                          f"{row['wall']:.1f} s, peak {row['peak_mb']:.0f} MB", flush=True)
            results[size] = runs
            n, num_items, missing = SIZES[size]
            print(f"\n{size}: {n} students x {num_items} items, {missing:.0%} missing; "
                  f"medians of {args.repeats}")
            print("| | CPU s | wall s | peak RSS MB | r(a) | r(b) | rmse(a) | r(theta) |")
            print("|---|---|---|---|---|---|---|---|")
            for name, rows in runs.items():
                med = {k: statistics.median(row[k] for row in rows)
                       for k in ("cpu", "wall", "peak_mb", "r_a", "r_b", "rmse_a", "r_theta")}
                print(f"| {name} | {med['cpu']:.1f} | {med['wall']:.1f} | {med['peak_mb']:.0f} |"
                      f" {med['r_a']:.5f} | {med['r_b']:.5f} | {med['rmse_a']:.4f} | "
                      f"{med['r_theta']:.4f} |")
            ratio = statistics.median(a["cpu"] / b["cpu"] for a, b in zip(runs["ppl-vae"],
                                                                          runs["mirt"]))
            se_ratio_a = statistics.median(
                float(np.median(a["se_a"] / b["se_a"])) for a, b in zip(runs["ppl-vae"],
                                                                       runs["mirt"]))
            se_ratio_b = statistics.median(
                float(np.median(a["se_b"] / b["se_b"])) for a, b in zip(runs["ppl-vae"],
                                                                       runs["mirt"]))
            print(f"CPU ratio ppl-vae / mirt: {ratio:.2f}; median sd ratio (our Laplace sd / "
                  f"mirt SE): a {se_ratio_a:.3f}, b {se_ratio_b:.3f}")
    if args.json:
        clean = {size: {name: [{k: v for k, v in row.items() if not isinstance(v, np.ndarray)}
                               for row in rows] for name, rows in runs.items()}
                 for size, runs in results.items()}
        args.json.write_text(json.dumps(clean, indent=1))


if __name__ == "__main__":
    main()
