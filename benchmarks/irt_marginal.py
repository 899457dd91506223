"""Marginal exam models (models/irt_marginal.py: ability integrated out by Gauss-Hermite
quadrature, item parameters the only latents) beside mirt (PyPI, Rust-backed EM), one thread
each, alternating runs in fresh processes; LSAT6/LSAT7 item estimates beside MML.

    python3 -m venv /tmp/peers && /tmp/peers/bin/pip install mirt numpy    # the peer venv
    OMP_NUM_THREADS=1 RAYON_NUM_THREADS=1 python3 benchmarks/irt_marginal.py \\
        --peer-python /tmp/peers/bin/python --repeats 3

Exams (models/irt.py:simulate, 2PL, seed 1; ability, b ~ N(0, 1), a ~ LogNormal(0, 0.5)):
``small`` 2,000 students x 50 items, all answered; ``large`` 100,000 x 100 with 70% of the
answers missing (issue 15's set). Every fit runs in its own process (peak RSS = that
process's VmHWM, imports and data included), OMP/MKL/RAYON threads = 1 and one torch thread;
the variants alternate within each repeat and the tables give medians.

Variants (ppl-vae: the Pyro program ``MarginalIRT`` with an AutoDelta guide trained by
``ppl_vae.fit``, Adam lr 0.05 with a cosine schedule = the marginal MAP; weak priors
log a ~ N(0, 0.5^2), b ~ N(0, 2^2)):

    engine        the default settings below (Q = 21 nodes, float32); then the Laplace
                  approximation at the mode (exact Hessian over all students; its seconds are
                  a separate column)
    engine-short  fewer epochs
    engine-q41    41 quadrature nodes
    engine-f64    float64 throughout
    lbfgs         the same log joint maximized by full-batch L-BFGS outside the engine (one
                  torch.optim.LBFGS, answers encoded once): the exact marginal MAP with 21
                  nodes (MAP21), the reference for "distance to the optimum" (engine-q41
                  and mirt optimize other objectives: 41 nodes; no prior)
    mirt          mirt.fit_mirt(data, "2PL") (EM, 21 nodes, Oakes standard errors)
    mirt-nose     the same with compute_standard_errors=False

Timed: ``fit`` = building the model and guide (data-driven starting values) + training +
reading the estimates (ppl-vae), or fit_mirt (mirt); library imports come before the timer
(for ppl-vae also torch._dynamo, which torch.optim imports at a process's first step: its
CPU seconds are printed separately); ``score`` = EAP abilities given the
fitted items (ppl-vae: MarginalIRT.abilities, 101 nodes, no MAP; mirt: fscores(EAP)).
CPU seconds are time.process_time() of the worker, wall seconds time.perf_counter().
Recovery: Pearson r and RMSE of a and b against the true values; r(theta) of the EAP
abilities with the true abilities ("best" = EAP given the TRUE items, the ceiling).
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

SIZES = {"small": (2000, 50, 0.0), "large": (100_000, 100, 0.7)}
# engine settings per exam: (batch size, epochs); short = fewer epochs
ENGINE = {"small": {"batch_size": 2000, "epochs": 150},
          "large": {"batch_size": 5000, "epochs": 20}}
SHORT = {"small": {"batch_size": 500, "epochs": 40},
         "large": {"batch_size": 5000, "epochs": 10}}
VARIANTS = ("engine", "engine-short", "engine-q41", "engine-f64", "lbfgs", "mirt", "mirt-nose")
# R ltm 2PL MML on LSAT6 (Rizopoulos 2006; girth 0.8 and mirt agree to 0.005)
LTM_LSAT6 = {"a": [0.825, 0.723, 0.890, 0.689, 0.657],
             "b": [-3.360, -1.370, -0.280, -1.866, -3.124]}


def recovery(a: np.ndarray, b: np.ndarray, theta: np.ndarray, data: dict) -> dict:
    def r(x, y):
        return float(np.corrcoef(x, y)[0, 1])

    return {"r_a": r(a, data["a"]), "r_b": r(b, data["b"]), "r_theta": r(theta, data["theta"]),
            "rmse_a": float(np.sqrt(np.mean((a - data["a"]) ** 2))),
            "rmse_b": float(np.sqrt(np.mean((b - data["b"]) ** 2))),
            "a": a.tolist(), "b": b.tolist()}


# ---- workers (fresh processes) ----------------------------------------------------------------

def worker_mirt(spec: dict) -> dict:
    """mirt in the peer venv (no torch here)."""
    import mirt

    data = dict(np.load(spec["data"]))
    y = data["responses"]  # NaN = missing
    rss_before = peak_mb()
    start_cpu, start = time.process_time(), time.perf_counter()
    fitted = mirt.fit_mirt(y, model="2PL",
                           compute_standard_errors=spec["variant"] == "mirt")
    fit_cpu, fit_wall = time.process_time() - start_cpu, time.perf_counter() - start
    params = fitted.model.parameters
    a, b = np.ravel(params["discrimination"]), np.ravel(params["difficulty"])
    start_cpu = time.process_time()
    theta = np.ravel(mirt.fscores(fitted, y, method="EAP").theta)
    score_cpu = time.process_time() - start_cpu
    return {"fit_cpu": fit_cpu, "fit_wall": fit_wall, "score_cpu": score_cpu,
            "iterations": int(fitted.n_iterations), "peak_mb": peak_mb(),
            "rss_before_fit_mb": rss_before,
            **recovery(a, b, theta, data)}


def lbfgs_map(model, guide_values: dict, responses, mask, max_iter: int = 500):
    """Full-batch L-BFGS on the marginal log joint of ``model`` (its priors and its
    quadrature), answers encoded once; returns the latent sites at the optimum and the number
    of function evaluations."""
    import torch

    counts = model.response_counts(responses, mask)
    n = len(responses)
    latents = {k: v.detach().clone().requires_grad_(True) for k, v in guide_values.items()}
    optimizer = torch.optim.LBFGS(list(latents.values()), lr=1.0, max_iter=max_iter,
                                  tolerance_grad=1e-7, tolerance_change=1e-12, history_size=20,
                                  line_search_fn="strong_wolfe")
    evaluations = [0]
    log_w = model.log_weights.to(counts.dtype)

    def closure():
        evaluations[0] += 1
        optimizer.zero_grad()
        items = model.item_parameters(latents)
        log_lik = torch.logsumexp(model.node_log_likelihood(counts, items) + log_w, -1).sum()
        log_prior = sum(model._prior(k, torch.zeros((), dtype=v.dtype)).log_prob(v).sum()
                        for k, v in latents.items())
        loss = -(log_lik + log_prior) / n  # nats per student
        loss.backward()
        return loss

    optimizer.step(closure)
    return {k: v.detach() for k, v in latents.items()}, evaluations[0]


def worker_ours(spec: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    # torch.optim imports torch._dynamo at a process's first optimizer step (~1.4 CPU s here,
    # whatever the data); imported before the timer like each library's own modules
    start_cpu = time.process_time()
    import torch._dynamo  # noqa: F401

    dynamo_cpu = time.process_time() - start_cpu
    if spec["variant"] == "engine-f64":
        torch.set_default_dtype(torch.float64)
    from ppl_vae import fit
    from ppl_vae.models.irt_marginal import (
        MarginalIRT,
        item_estimates,
        item_table,
        laplace_approximation,
        make_guide,
    )

    data = dict(np.load(spec["data"]))
    mask = torch.from_numpy(data.pop("mask"))
    responses = torch.from_numpy(np.nan_to_num(data.pop("responses"), nan=0.0, copy=False)
                                 ).to(torch.get_default_dtype())
    num_items = responses.shape[1]
    variant, size = spec["variant"], spec["size"]
    nodes = 41 if variant == "engine-q41" else 21
    settings = SHORT[size] if variant == "engine-short" else ENGINE[size]
    rss_before = peak_mb()
    start_cpu, start = time.process_time(), time.perf_counter()
    model = MarginalIRT(num_items, num_nodes=nodes)
    out: dict = {}
    if variant == "lbfgs":
        values, evaluations = lbfgs_map(model, model.initial_values(responses, mask),
                                        responses, mask)
        items = {k: v.cpu() for k, v in model.item_parameters(values).items()}
        out["evaluations"] = evaluations
    else:
        guide = make_guide(model, responses, mask)
        fit(model, guide, (responses, mask), lr=0.05, lr_schedule="cosine", progress=False,
            device="cpu", seed=0, **settings)
        items = item_estimates(model, guide, responses, mask)
    fit_cpu, fit_wall = time.process_time() - start_cpu, time.perf_counter() - start
    start_cpu = time.process_time()
    theta = model.abilities(responses, mask, items, map_steps=0)["eap"]
    score_cpu = time.process_time() - start_cpu
    if variant == "engine":  # the Laplace approximation at the mode (exact Hessian)
        start_cpu = time.process_time()
        laplace = laplace_approximation(model, guide, responses, mask)
        table = item_table(model, laplace, responses, mask, num_samples=2000)
        out["laplace_cpu"] = time.process_time() - start_cpu
        out["laplace_sd_a"] = float(table.loc[table.parameter == "a", "sd"].median())
        out["laplace_sd_b"] = float(table.loc[table.parameter == "b", "sd"].median())
    if variant == "lbfgs":  # the ceiling for abilities: EAP given the true items
        truth = {"discrimination": torch.from_numpy(data["a"]),
                 "thresholds": torch.from_numpy(data["b"]).unsqueeze(-1)}
        best = model.abilities(responses, mask, truth, map_steps=0)["eap"].numpy()
        out["best_r_theta"] = float(np.corrcoef(best, data["theta"])[0, 1])
    out.update(fit_cpu=fit_cpu, fit_wall=fit_wall, score_cpu=score_cpu, peak_mb=peak_mb(),
               rss_before_fit_mb=rss_before, dynamo_import_cpu=dynamo_cpu,
               **recovery(items["discrimination"].double().numpy(),
                          items["thresholds"][:, 0].double().numpy(), theta.numpy(), data))
    return out


def run_worker(python: str, spec: dict, timeout: float) -> dict:
    return workers.run_worker(python, __file__, spec, timeout, spec["size"])


# ---- the driver ---------------------------------------------------------------------------

def write_exam(folder: Path, size: str) -> Path:
    from ppl_vae.models.irt import simulate

    n, items, missing = SIZES[size]
    d = simulate(n, items, "2pl", missing=missing, seed=1)
    y = d["responses"].numpy().copy()  # float32, NaN = missing
    y[~d["mask"].numpy()] = np.nan
    path = folder / f"{size}.npz"
    np.savez(path, responses=y, mask=d["mask"].numpy(), a=d["discrimination"].double().numpy(),
             b=d["difficulty"].double().numpy(), theta=d["ability"].double().numpy())
    return path


def summarize(size: str, runs: dict[str, list[dict]]) -> None:
    n, items, missing = SIZES[size]
    print(f"\n== {size}: {n:,} students x {items} items, {missing:.0%} missing; medians of "
          f"{max(len(v) for v in runs.values())} alternated runs ==")
    ref = runs.get("lbfgs")
    ref_a = np.median([r["a"] for r in ref], 0) if ref else None
    ref_b = np.median([r["b"] for r in ref], 0) if ref else None
    header = ("| variant | fit CPU s | fit wall s | EAP CPU s | Laplace CPU s | peak RSS MB "
              "(before fit) | "
              "r(a) | r(b) | rmse(a) | rmse(b) | r(theta) | max abs(a - MAP21) | "
              "max abs(b - MAP21) |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))

    columns = [("fit_cpu", ".2f"), ("fit_wall", ".2f"), ("score_cpu", ".2f"),
               ("laplace_cpu", ".1f"), ("peak_mb", ".0f"), ("r_a", ".5f"), ("r_b", ".5f"),
               ("rmse_a", ".4f"), ("rmse_b", ".4f"), ("r_theta", ".4f")]
    print("\n".join(workers.median_rows(runs, columns, ref_a, ref_b)))
    if ref and "best_r_theta" in ref[0]:
        print(f"best possible r(theta) (EAP given the true items): {ref[0]['best_r_theta']:.4f}"
              f"; L-BFGS evaluations: {ref[0]['evaluations']}")
    dynamo = [r["dynamo_import_cpu"] for rows in runs.values() for r in rows
              if "dynamo_import_cpu" in r]
    if dynamo:
        print(f"not in fit CPU: torch importing torch._dynamo at the first optimizer step, "
              f"median {statistics.median(dynamo):.2f} CPU s per process")
    if "engine" in runs and "laplace_sd_a" in runs["engine"][0]:
        e = runs["engine"][0]
        print(f"Laplace posterior sds (median over items): a {e['laplace_sd_a']:.4f}, "
              f"b {e['laplace_sd_b']:.4f}")
    for peer in ("mirt-nose", "mirt"):
        if peer not in runs:
            continue
        for variant in [v for v in runs if not v.startswith("mirt")]:
            ratios = [o["fit_cpu"] / p["fit_cpu"] for o, p in zip(runs[variant], runs[peer])]
            print(f"fit CPU {variant} / {peer}: median {statistics.median(ratios):.2f} "
                  f"(runs {min(ratios):.2f}-{max(ratios):.2f})")


def lsat(args) -> None:
    import torch

    from ppl_vae import fit
    from ppl_vae.data.irt import load_responses
    from ppl_vae.models.irt_marginal import (
        MarginalIRT,
        item_table,
        laplace_approximation,
        make_guide,
    )

    torch.set_num_threads(1)
    for name in ("lsat6", "lsat7"):
        path = args.data / f"{name}.csv"
        if not path.exists():
            print(f"\n{path} not found: LSAT section skipped")
            return
        data = load_responses(path, check=False)
        y, mask = data.tensors()
        model = MarginalIRT(data.num_items, priors="flat")
        guide = make_guide(model, y, mask)
        start = time.process_time()
        fit(model, guide, (y, mask), epochs=300, batch_size=len(y), lr=0.05,
            lr_schedule="cosine", progress=False, device="cpu")
        seconds = time.process_time() - start
        table = item_table(model, laplace_approximation(model, guide, y, mask), y, mask,
                           num_samples=20000).set_index(["item", "parameter"])
        peer = None
        if args.peer_python:
            np.savez(args.tmp / f"{name}.npz", responses=y.double().numpy(),
                     mask=mask.numpy(), a=np.zeros(5), b=np.zeros(5), theta=np.zeros(len(y)))
            peer = run_worker(args.peer_python, {"variant": "mirt-lsat", "size": name,
                                                 "data": str(args.tmp / f"{name}.npz")}, 600)
        print(f"\n== {name.upper()}: {len(y)} examinees x {data.num_items} items; 2PL, flat "
              f"priors (log a ~ N(0, 10^2), b ~ N(0, 100^2)); marginal MAP by ppl_vae.fit "
              f"(full batch, 300 Adam steps, {seconds:.1f} CPU s) + Laplace ==")
        print("| item | a: MAP | a: mirt MML | a: ltm | sd(a) Laplace | SE(a) mirt "
              "| b: MAP | b: mirt MML | b: ltm | sd(b) Laplace | SE(b) mirt |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        diffs = {"a": [], "b": []}
        for t, item in enumerate(data.item_ids):
            row = [item]
            for par in ("a", "b"):
                mode, sd = table.loc[(item, par), "mode"], table.loc[(item, par), "sd"]
                mml = peer[par][t] if peer else float("nan")
                ltm = LTM_LSAT6[par][t] if name == "lsat6" else float("nan")
                se = peer[f"se_{par}"][t] if peer else float("nan")
                diffs[par] += [abs(mode - mml)] if peer else []
                diffs[par] += [abs(mode - ltm)] if name == "lsat6" else []
                row += [f"{mode:.3f}", f"{mml:.3f}", f"{ltm:.3f}" if ltm == ltm else "",
                        f"{sd:.3f}", f"{se:.3f}"]
            print("| " + " | ".join(row) + " |")
        if diffs["a"]:
            print(f"max abs(MAP - MML) over items and references: a {max(diffs['a']):.4f}, "
                  f"b {max(diffs['b']):.4f}")


def worker_mirt_lsat(spec: dict) -> dict:
    import mirt

    y = np.load(spec["data"])["responses"]
    fitted = mirt.fit_mirt(y, model="2PL")
    p, se = fitted.model.parameters, fitted.standard_errors
    return {"a": np.ravel(p["discrimination"]).tolist(), "b": np.ravel(p["difficulty"]).tolist(),
            "se_a": np.ravel(se["discrimination"]).tolist(),
            "se_b": np.ravel(se["difficulty"]).tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", nargs="+", default=["small", "large"], choices=list(SIZES))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peer-python", default="/tmp/peers/bin/python",
                        help="python of the venv with mirt ('' to skip the peers)")
    parser.add_argument("--data", type=Path,
                        default=Path(__file__).resolve().parents[2] / "shared" / "data" / "irt")
    parser.add_argument("--no-lsat", action="store_true")
    parser.add_argument("--timeout", type=float, default=1200)
    parser.add_argument("--json", type=Path, help="also write every run's figures here")
    args = parser.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        work = {"mirt": worker_mirt, "mirt-nose": worker_mirt,
                "mirt-lsat": worker_mirt_lsat}.get(spec["variant"], worker_ours)
        print(json.dumps(work(spec)))
        return
    variants = workers.runnable_variants(args)
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        args.tmp = Path(tmp)
        for size in args.sizes:
            path = write_exam(args.tmp, size)
            def show(repeat: int, variant: str, r: dict, size: str = size) -> None:
                print(f"  {size} repeat {repeat + 1} {variant}: fit {r['fit_cpu']:.2f} CPU s,"
                      f" r(a) {r['r_a']:.5f}, r(b) {r['r_b']:.5f}, peak "
                      f"{r['peak_mb']:.0f} MB", flush=True)

            runs = workers.alternated_runs(__file__, args, variants,
                                           {"size": size, "data": str(path)}, size, show)
            results[size] = runs
            summarize(size, runs)
        if not args.no_lsat:
            lsat(args)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
