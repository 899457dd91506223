"""ppl-vae's 2PL (amortized guide, minibatches of students) beside py-irt's 2PL (full-batch
SVI, a Normal per student) on the same simulated exams, side by side in one run.

Exams (models/irt.py:simulate, 2PL, seed 1): ``small`` 2,000 students x 50 items, all
answered; ``large`` 100,000 students x 100 items with 70% of the answers missing.

Each fit runs in its own subprocess (so peak memory is that fit's), one torch thread each,
the two libraries alternating over ``--repeats``; figures are medians. Wall time is the
training call only (data already in memory: ppl-vae's tensors, py-irt's Dataset).
Recovery: Pearson correlation of the estimates (posterior means) with the true ability,
difficulty and discrimination; next to it the best any method can reach for abilities:
the exact posterior means given the TRUE item parameters (quadrature). For ppl-vae also the
abilities rescored by quadrature given the fitted items (models/irt.py:quadrature_abilities).

Environment (outside the repository; py-irt pins nothing that clashes with ppl-vae):

    python -m venv /work/venvs/irt
    /work/venvs/irt/bin/pip install -r benchmarks/requirements-irt.txt
    /work/venvs/irt/bin/pip install -e . --no-deps
    OMP_NUM_THREADS=1 /work/venvs/irt/bin/python benchmarks/irt_pyirt.py --sizes small large
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

SIZES = {"small": (2000, 50, 0.0), "large": (100_000, 100, 0.7)}
# ppl-vae: epochs over the students, minibatch size; py-irt: full-batch steps (its default
# 2000 steps at lr 0.1 with priors="hierarchical"; its "vague" priors are N(0, 0.1) on the
# difficulties and would not recover them)
OURS = {"small": dict(epochs=100, batch_size=256), "large": dict(epochs=10, batch_size=1024)}
# large: 300 full-batch steps only (2000 would take hours on the shared 2-core machine); its
# seconds per step are printed, so the default 2000 steps can be extrapolated
PYIRT = {"small": dict(epochs=2000), "large": dict(epochs=300)}


def peak_mb() -> float:
    """This process's peak resident memory (VmHWM; unlike ru_maxrss it is not inherited
    from the parent across fork/exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker_ours(folder: Path, size: str, out: Path) -> dict:
    from ppl_vae import fit
    from ppl_vae.models.irt import (
        ability_posterior,
        build_irt,
        posterior_samples,
        quadrature_abilities,
    )

    torch.manual_seed(0)  # the encoder's initial weights
    data = torch.load(folder / "data.pt", weights_only=True)
    tensors = (data["responses"], data["mask"])
    model, guide = build_irt({"kind": "2pl", "num_items": tensors[0].shape[1],
                              "guide": "amortized"})
    base = peak_mb()
    start = time.perf_counter()
    fit(model, guide, tensors, lr=0.05, lr_schedule="cosine", progress=False, device="cpu",
        **OURS[size])
    seconds = time.perf_counter() - start
    ability, _ = ability_posterior(guide, *tensors)
    items = posterior_samples(model, guide, *tensors, num_samples=500)
    means = {k: v.mean(0) for k, v in items.items()}
    # rescoring: exact posterior means of the abilities given the fitted items' means
    start = time.perf_counter()
    eap, _ = quadrature_abilities("2pl", means, *tensors)
    eap_seconds = time.perf_counter() - start
    np.savez(out, ability=ability.numpy(), ability_eap=eap.numpy(),
             difficulty=means["difficulty"].numpy(),
             discrimination=means["discrimination"].numpy())
    return {"seconds": seconds, "peak_mb": peak_mb(), "before_fit_mb": base,
            "eap_seconds": eap_seconds}


def worker_pyirt(folder: Path, size: str, out: Path) -> dict:
    from py_irt.config import IrtConfig
    from py_irt.dataset import Dataset
    from py_irt.training import IrtModelTrainer

    dataset = Dataset.from_jsonlines(folder / "data.jsonl")
    config = IrtConfig(model_type="2pl", priors="hierarchical", lr=0.1, log_every=10**9,
                       **PYIRT[size])
    trainer = IrtModelTrainer(data_path=None, config=config, dataset=dataset, verbose=False)
    base = peak_mb()
    start = time.perf_counter()
    trainer.train(device="cpu")
    seconds = time.perf_counter() - start
    p = trainer.last_params
    subject = {sid: i for i, sid in p["subject_ids"].items()}
    item = {iid: i for i, iid in p["item_ids"].items()}
    ids = json.loads((folder / "ids.json").read_text())
    ability = np.array(p["ability"])[[subject[s] for s in ids["students"]]]
    order = [item[i] for i in ids["items"]]
    np.savez(out, ability=ability, difficulty=np.array(p["diff"])[order],
             discrimination=np.array(p["disc"])[order])
    return {"seconds": seconds, "peak_mb": peak_mb(), "before_fit_mb": base}


def prepare(size: str, folder: Path) -> dict:
    from ppl_vae.data.irt import from_arrays, write_jsonl
    from ppl_vae.models.irt import quadrature_abilities, simulate

    n, i, missing = SIZES[size]
    d = simulate(n, i, "2pl", missing=missing, seed=1)
    torch.save({"responses": d["responses"], "mask": d["mask"]}, folder / "data.pt")
    table = from_arrays(d["responses"], d["mask"], student_ids=[f"s{k}" for k in range(n)],
                        item_ids=[f"q{k}" for k in range(i)], check=False)
    write_jsonl(table, folder / "data.jsonl")
    (folder / "ids.json").write_text(json.dumps({"students": table.student_ids,
                                                 "items": table.item_ids}))
    best, _ = quadrature_abilities("2pl", {k: d[k] for k in ("difficulty", "discrimination")},
                                   d["responses"], d["mask"])
    d["oracle"] = best
    return d


def recovery(truth: dict, est: Path) -> dict:
    e = np.load(est)
    c = lambda k, t: float(np.corrcoef(e[k], truth[t].numpy())[0, 1])  # noqa: E731
    out = {"theta": c("ability", "ability"), "b": c("difficulty", "difficulty"),
           "a": c("discrimination", "discrimination")}
    if "ability_eap" in e:
        out["theta_eap"] = c("ability_eap", "ability")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["small", "large"], choices=list(SIZES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", choices=["ours", "pyirt"], default=None)
    parser.add_argument("--worker", choices=["ours", "pyirt"], default=None)
    parser.add_argument("--folder", type=Path)
    parser.add_argument("--size")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.worker:
        fn = worker_ours if args.worker == "ours" else worker_pyirt
        print("RESULT " + json.dumps(fn(args.folder, args.size, args.out)))
        return
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    libs = [args.only] if args.only else ["ours", "pyirt"]
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            truth = prepare(size, folder)
            oracle = float(np.corrcoef(truth["oracle"].numpy(), truth["ability"].numpy())[0, 1])
            rows: dict[str, list[dict]] = {lib: [] for lib in libs}
            for r in range(args.repeats):
                for lib in (libs if r % 2 == 0 else libs[::-1]):
                    out = folder / f"{lib}{r}.npz"
                    proc = subprocess.run(
                        [sys.executable, __file__, "--worker", lib, "--folder", str(folder),
                         "--size", size, "--out", str(out)], env=env, capture_output=True,
                        text=True)
                    if proc.returncode != 0:
                        raise SystemExit(f"{lib} failed:\n{proc.stderr[-3000:]}")
                    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
                    row = json.loads(line[7:]) | recovery(truth, out)
                    rows[lib].append(row)
                    print(f"  {size} repeat {r} {lib}: " + ", ".join(
                        f"{k} {v:.4g}" for k, v in row.items()), flush=True)
            n, i, missing = SIZES[size]
            print(f"\n{size}: {n} students x {i} items, {100 * missing:.0f}% missing; "
                  f"ppl-vae {OURS[size]}, py-irt {PYIRT[size]}; medians of {args.repeats}; "
                  f"best possible corr(theta) = {oracle:.4f}")
            keys = ["seconds", "peak_mb", "before_fit_mb", "theta", "b", "a"]
            med = {lib: {k: statistics.median(x[k] for x in rows[lib]) for k in keys}
                   for lib in libs}
            print("library | fit seconds | peak MB | MB before fit | corr theta | corr b | "
                  "corr a")
            for lib in libs:
                m = med[lib]
                print(f"{lib} | {m['seconds']:.1f} | {m['peak_mb']:.0f} | "
                      f"{m['before_fit_mb']:.0f} | {m['theta']:.4f} | {m['b']:.4f} | "
                      f"{m['a']:.4f}")
            if "ours" in libs:
                eap = statistics.median(x["theta_eap"] for x in rows["ours"])
                sec = statistics.median(x["eap_seconds"] for x in rows["ours"])
                print(f"ours, abilities rescored by quadrature given the fitted items: corr "
                      f"theta {eap:.4f} (+{sec:.1f} s)")
            if "pyirt" in libs:
                print(f"py-irt seconds per full-batch step: "
                      f"{med['pyirt']['seconds'] / PYIRT[size]['epochs']:.3f}")
            if len(libs) == 2:
                print(f"speed-up (py-irt seconds / ppl-vae seconds): "
                      f"{med['pyirt']['seconds'] / med['ours']['seconds']:.1f}x; peak memory "
                      f"ratio {med['pyirt']['peak_mb'] / med['ours']['peak_mb']:.2f}")


if __name__ == "__main__":
    main()
