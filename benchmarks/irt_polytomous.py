"""Polytomous exam models (issue 15): the graded response model (GRM), the generalized partial
credit model (GPCM) and the partial credit model (PCM), fitted by the marginal method
(models/irt_marginal.py: abilities integrated out by Gauss-Hermite quadrature, item
parameters the only latents) beside mirt (PyPI, Rust-backed EM) on the same simulated exams,
one thread each, alternating runs in fresh processes.

    python3 -m venv /tmp/peers && /tmp/peers/bin/pip install mirt numpy    # the peer venv
    OMP_NUM_THREADS=1 RAYON_NUM_THREADS=1 nice -n 10 python3 benchmarks/irt_polytomous.py \\
        --peer-python /tmp/peers/bin/python --repeats 3

Exams (models/irt_marginal.py:simulate, seed 1): 10,000 students x 20 items with 5 categories
(codes 0..4), 10% of the answers missing completely at random; theta ~ N(0, 1), a ~
LogNormal(0, 0.5) (PCM: a = 1), item location ~ N(0, 1); ``grm``: ordered thresholds =
location + sorted centred N(0, 1) draws (at least 0.3 apart); ``gpcm`` / ``pcm``: step
difficulties = location + centred N(0, 1) draws in drawn order (33 of the GPCM set's 60
adjacent pairs reversed).

Variants:

    ours       the exam family's defaults, as ``ppl-vae train irt-grm|irt-gpcm|irt-pcm`` fits
               them (IRTFamily.build + fit_settings: AutoDelta started at data-driven values,
               flat priors = the MML estimates, 21 nodes, float32, batches of 5,000 students,
               about 400 Adam steps at lr 0.05 on a cosine schedule) through ``ppl_vae.fit``;
               then the Laplace approximation at the mode (a separate column)
    ours-q61   the same with 61 Gauss-Hermite nodes (``--quadrature-nodes 61``)
    mirt       mirt.fit_mirt(y, "GRM" | "GPCM" | "PCM") (EM, 21 nodes, Oakes standard errors)
    mirt-nose  the same with compute_standard_errors=False (the like-for-like fit time)

Timed: ``fit`` = building the model and guide + training + reading the estimates (ours) or
fit_mirt (mirt); library imports come before the timer (for ours also torch._dynamo, which
torch.optim imports at a process's first step); ``EAP`` = abilities given the fitted items
(ours: MarginalIRT.abilities, 101 nodes, no MAP; mirt: fscores(EAP)). CPU seconds are
time.process_time() of the worker, wall seconds time.perf_counter(), peak RSS the worker's
VmHWM (imports and data included). Recovery against the true values: Pearson r and RMSE of a
(not for the PCM) and of the thresholds / steps (all (item, k) pairs), r(theta) of the EAP
abilities ("best": EAP given the TRUE items, the ceiling); ``max |ours - mirt|``: the largest
difference between the two estimates of one parameter (both estimate the same MML optimum).
``id`` columns: only the steps whose two adjacent categories both have at least 20 answers
(a step next to an empty category has no finite MML estimate); for a, only the items whose
steps are all identified.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import workers
from workers import peak_mb

# name -> (response model of the simulation, mirt's model, fixed a, categories)
SETS = {"grm": ("graded", "GRM", None), "gpcm": ("partial_credit", "GPCM", None),
        "pcm": ("partial_credit", "PCM", 1.0)}
STUDENTS, ITEMS, CATEGORIES, MISSING = 10_000, 20, 5, 0.1
VARIANTS = ("ours", "ours-q61", "mirt", "mirt-nose")
MIN_ANSWERS = 20  # a step counts as identified when both its categories have this many


def recovery(a: np.ndarray, b: np.ndarray, theta: np.ndarray, data: dict) -> dict:
    """r and RMSE of a (I,) and the thresholds / steps b (I, K-1) against the truth, r of
    the abilities."""
    def r(x, y):
        return float(np.corrcoef(x, y)[0, 1]) if np.std(x) > 0 and np.std(y) > 0 else None

    valid, known = ~np.isnan(data["b"]), data["identified"]
    whole = known.all(-1)  # items with every step identified
    return {"r_a": r(a, data["a"]), "r_b": r(b[valid], data["b"][valid]),
            "r_a_id": r(a[whole], data["a"][whole]),
            "rmse_a_id": float(np.sqrt(np.mean((a[whole] - data["a"][whole]) ** 2))),
            "r_b_id": r(b[known], data["b"][known]), "r_theta": r(theta, data["theta"]),
            "rmse_a": float(np.sqrt(np.mean((a - data["a"]) ** 2))),
            "rmse_b": float(np.sqrt(np.mean((b[valid] - data["b"][valid]) ** 2))),
            "rmse_b_id": float(np.sqrt(np.mean((b[known] - data["b"][known]) ** 2))),
            "a": a.tolist(), "b": np.where(valid, b, np.nan).tolist()}


# ---- workers (fresh processes) ------------------------------------------------------------

def worker_mirt(spec: dict) -> dict:
    """mirt in the peer venv (no torch here)."""
    import mirt

    data = dict(np.load(spec["data"]))
    y = data["responses"]  # NaN = missing
    rss_before = peak_mb()
    start_cpu, start = time.process_time(), time.perf_counter()
    fitted = mirt.fit_mirt(y, model=SETS[spec["set"]][1], n_categories=CATEGORIES,
                           compute_standard_errors=spec["variant"] == "mirt")
    fit_cpu, fit_wall = time.process_time() - start_cpu, time.perf_counter() - start
    params = fitted.model.parameters
    a = np.ravel(params["discrimination"]).astype(float)
    b = np.asarray(params["thresholds" if "thresholds" in params else "steps"], dtype=float)
    start_cpu = time.process_time()
    theta = np.ravel(mirt.fscores(fitted, y, method="EAP").theta)
    score_cpu = time.process_time() - start_cpu
    return {"fit_cpu": fit_cpu, "fit_wall": fit_wall, "score_cpu": score_cpu,
            "iterations": int(fitted.n_iterations), "converged": bool(fitted.converged),
            "peak_mb": peak_mb(), "rss_before_fit_mb": rss_before,
            **recovery(a, b, theta, data)}


def worker_ours(spec: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    start_cpu = time.process_time()
    import torch._dynamo  # noqa: F401  (torch.optim imports it at the first step)

    dynamo_cpu = time.process_time() - start_cpu
    from ppl_vae import fit
    from ppl_vae.family import family_of
    from ppl_vae.models.irt_marginal import item_estimates, item_table, laplace_approximation

    data = dict(np.load(spec["data"]))
    mask = torch.from_numpy(data["mask"])
    responses = torch.from_numpy(np.nan_to_num(data["responses"], nan=0.0)).float()
    name = f"irt-{spec['set']}"
    family = family_of(name)
    fields = {"model": name, "method": "marginal", "num_items": ITEMS,
              "num_students": STUDENTS, "categories": [CATEGORIES] * ITEMS,
              "item_ids": [f"q{t + 1}" for t in range(ITEMS)]}
    exam_spec = family.Spec(**fields, num_nodes=61 if spec["variant"] == "ours-q61" else 21)
    settings = family.fit_settings(exam_spec)
    rss_before = peak_mb()
    start_cpu, start = time.process_time(), time.perf_counter()
    model, guide = family.build(exam_spec)
    fit(model, guide, (responses, mask), progress=False, device="cpu", seed=0, **settings)
    items = item_estimates(model, guide, responses, mask)
    fit_cpu, fit_wall = time.process_time() - start_cpu, time.perf_counter() - start
    start_cpu = time.process_time()
    theta = model.abilities(responses, mask, items, map_steps=0)["eap"]
    score_cpu = time.process_time() - start_cpu
    start_cpu = time.process_time()
    table = item_table(model, laplace_approximation(model, guide, responses, mask), responses,
                       mask, num_samples=1000)
    laplace_cpu = time.process_time() - start_cpu
    key = "steps" if "steps" in items else "thresholds"
    truth = {"discrimination": torch.from_numpy(data["a"]),
             key: torch.from_numpy(np.nan_to_num(data["b"], nan=0.0))}
    best = model.abilities(responses, mask, truth, map_steps=0)["eap"].numpy()
    return {"fit_cpu": fit_cpu, "fit_wall": fit_wall, "score_cpu": score_cpu,
            "laplace_cpu": laplace_cpu, "laplace_sd_b": float(table.loc[
                table.parameter != "a", "sd"].median()),
            "steps": settings["epochs"] * -(-STUDENTS // settings["batch_size"]),
            "settings": {k: settings[k] for k in ("epochs", "batch_size", "lr")},
            "peak_mb": peak_mb(), "rss_before_fit_mb": rss_before, "dynamo_cpu": dynamo_cpu,
            "best_r_theta": float(np.corrcoef(best, data["theta"])[0, 1]),
            **recovery(items["discrimination"].double().numpy(),
                       items[key].double().numpy(), theta.numpy(), data)}


# ---- the driver ---------------------------------------------------------------------------

def write_exam(folder: Path, name: str) -> Path:
    from ppl_vae.models.irt_marginal import simulate

    response_model, _, fixed = SETS[name]
    d = simulate(STUDENTS, [CATEGORIES] * ITEMS, missing=MISSING, fixed_discrimination=fixed,
                 seed=1, response_model=response_model)
    y = d["responses"].numpy().copy()
    y[~d["mask"].numpy()] = np.nan
    b = d["thresholds" if response_model == "graded" else "steps"].double().numpy()
    answers = np.stack([((y == k) & d["mask"].numpy()).sum(0) for k in range(CATEGORIES)], -1)
    identified = np.minimum(answers[:, 1:], answers[:, :-1]) >= MIN_ANSWERS  # (I, K-1)
    path = folder / f"{name}.npz"
    np.savez(path, responses=y, mask=d["mask"].numpy(), a=d["discrimination"].double().numpy(),
             b=b, theta=d["ability"].double().numpy(), identified=identified)
    return path


def summarize(name: str, runs: dict[str, list[dict]]) -> None:
    print(f"\n== {name.upper()}: {STUDENTS:,} students x {ITEMS} items, {CATEGORIES} "
          f"categories, {MISSING:.0%} missing; medians of "
          f"{max(len(v) for v in runs.values())} alternated runs ==")
    header = ("| variant | fit CPU s | fit wall s | EAP CPU s | Laplace CPU s | peak RSS MB "
              "(before fit) | r(a) | r(a) id | r(b) | r(b) id | rmse(a) | rmse(a) id | rmse(b) "
              "| rmse(b) id | r(theta) | max abs(a - mirt) | max abs(b - mirt) |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))

    ref = runs.get("mirt-nose") or runs.get("mirt")
    ref_a = np.median([r["a"] for r in ref], 0) if ref else None
    ref_b = np.median([r["b"] for r in ref], 0) if ref else None
    columns = [("fit_cpu", ".2f"), ("fit_wall", ".2f"), ("score_cpu", ".2f"),
               ("laplace_cpu", ".1f"), ("peak_mb", ".0f"), ("r_a", ".4f"), ("r_a_id", ".4f"),
               ("r_b", ".4f"), ("r_b_id", ".4f"), ("rmse_a", ".4f"), ("rmse_a_id", ".4f"),
               ("rmse_b", ".4f"), ("rmse_b_id", ".4f"), ("r_theta", ".4f")]
    print("\n".join(workers.median_rows(runs, columns, ref_a, ref_b)))
    ours = [v for v in runs if v.startswith("ours")]
    for variant in ours:
        o = runs[variant][0]
        print(f"{variant}: {o['settings']} = {o['steps']} Adam steps; best possible r(theta) "
              f"(EAP given the true items) {o['best_r_theta']:.4f}; Laplace sd of b (median) "
              f"{o['laplace_sd_b']:.4f}; torch._dynamo import (not in fit CPU) "
              f"{statistics.median(r['dynamo_cpu'] for r in runs[variant]):.2f} CPU s")
    for peer in ("mirt", "mirt-nose"):
        if peer in runs:
            p = runs[peer][0]
            print(f"{peer}: {p['iterations']} EM iterations, converged {p['converged']}")
            for variant in ours:
                ratios = [o["fit_cpu"] / q["fit_cpu"] for o, q in zip(runs[variant], runs[peer])]
                print(f"fit CPU {variant} / {peer}: median {statistics.median(ratios):.2f} "
                      f"(runs {min(ratios):.2f}-{max(ratios):.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peer-python", default="/tmp/peers/bin/python",
                        help="python of the venv with mirt ('' to skip the peers)")
    parser.add_argument("--timeout", type=float, default=1200)
    parser.add_argument("--json", type=Path, help="also write every run's figures here")
    args = parser.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        work = worker_mirt if spec["variant"].startswith("mirt") else worker_ours
        print(json.dumps(work(spec)))
        return
    variants = workers.runnable_variants(args)
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.sets:
            path = write_exam(Path(tmp), name)
            def show(repeat: int, variant: str, r: dict, name: str = name) -> None:
                print(f"  {name} repeat {repeat + 1} {variant}: fit {r['fit_cpu']:.2f} CPU s, "
                      f"r(a) {r['r_a'] if r['r_a'] is None else round(r['r_a'], 4)}, "
                      f"r(b) {r['r_b']:.4f}, r(theta) {r['r_theta']:.4f}, peak "
                      f"{r['peak_mb']:.0f} MB", flush=True)

            runs = workers.alternated_runs(__file__, args, variants,
                                           {"set": name, "data": str(path)}, name, show)
            results[name] = runs
            summarize(name, runs)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
