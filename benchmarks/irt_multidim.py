"""Multidimensional 2PL recovery: ppl-vae (family defaults) vs mirt (PyPI, Rust-backed EM).

Simulated sets (models/irt_multidim.py's ``simulate``: theta ~ N(0, R), a_tj on a Q-matrix,
|a_t| ~ LogNormal(0.2, 0.3), d_t ~ N(0, 1)):

    2d   5,000 students x 20 items, 2 factors (simple structure), correlation 0.5,
         confirmatory: ours = quadrature marginal MAP (flat priors = MML); mirt = EM with
         ``mirt_model("F1 = 1-10, F2 = 11-20, COV = F1*F2")``, 21 nodes per dimension
    5d   10,000 students x 50 items, 5 factors (simple structure, 10 items each), all
         correlations 0.3, confirmatory: ours = amortized full-covariance guide + IWAE (K=5);
         mirt = EM on a 5-D product grid (``--mirt-nodes``, default 5 per dimension: 3,125
         nodes; 21^5 would take hours), same model syntax
    2dx  the 2d set fitted exploratory (no Q-matrix): ours = lower-triangular pattern, mirt =
         exploratory EM; loadings compared after an orthogonal Procrustes rotation to truth

Recovery: loadings r and rmse over the free loadings (after matching factor order and sign,
or Procrustes for exploratory fits), intercept rmse, max |error| of the factor correlations,
r(theta_j, true theta_j) per dimension (EAP; ours amortized: the encoder's mean).
Each fit runs in its own process (nice 10, one thread), reporting CPU s, wall s, peak RSS.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/irt_multidim.py            # both sets
    python benchmarks/irt_multidim.py --sets 2d --peer-python /tmp/peers/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SETS = {"2d": dict(students=5000, items=20, dims=2, rho=0.5, confirmatory=True, seed=1),
        "5d": dict(students=10000, items=50, dims=5, rho=0.3, confirmatory=True, seed=2),
        "2dx": dict(students=5000, items=20, dims=2, rho=0.0, confirmatory=False, seed=3)}


def make_set(name: str) -> dict:
    """The simulated set ``name`` (numpy arrays); made once by the parent, read by the children
    from an .npz (mirt's venv has no torch)."""
    from ppl_vae.models.irt_multidim import simple_structure, simulate

    cfg = SETS[name]
    dims = cfg["dims"]
    q = simple_structure(cfg["items"], dims)
    r = np.full((dims, dims), cfg["rho"])
    np.fill_diagonal(r, 1.0)
    d = simulate(cfg["students"], q, r, seed=cfg["seed"])
    return {"q": q, "y": d["responses"].numpy().astype(np.int64), "theta": d["ability"].numpy(),
            "a": d["loadings"].numpy(), "d": d["intercept"].numpy(), "r": r, **cfg}


# ---- the fits (each in a child process: `--child ours|mirt SET OUT`) ----------------------

def load_set(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        s = {k: z[k] for k in z.files}
    return {k: (v.item() if v.ndim == 0 else v) for k, v in s.items()}


def fit_ours(name: str, out: Path) -> dict:
    import torch

    torch.set_num_threads(1)
    import ppl_vae
    from ppl_vae.models.irt_multidim import solution

    s = load_set(Path(name))
    folder = Path(tempfile.mkdtemp(prefix="mdim_"))
    exam = folder / "exam.csv"
    np.savetxt(exam, s["y"], fmt="%d", delimiter=",",
               header=",".join(f"q{t + 1}" for t in range(s["items"])), comments="")
    spec = {"responses": str(exam), "dims": s["dims"], "posterior_samples": 200}
    if s["confirmatory"]:
        qfile = folder / "Q.csv"
        np.savetxt(qfile, s["q"], fmt="%d", delimiter=",")
        spec["q_matrix"] = str(qfile)
    cpu, wall = time.process_time(), time.perf_counter()  # fit + report (abilities, tables)
    run = ppl_vae.train("irt-2pl", folder / "run", spec, progress=False)
    fitted = time.process_time() - cpu, time.perf_counter() - wall
    y = torch.from_numpy(s["y"]).float()
    mask = torch.ones_like(y, dtype=torch.bool)
    sol = solution(run, y, mask, laplace=False)
    return {"cpu_s": fitted[0], "wall_s": fitted[1], "loadings": sol["loadings"],
            "intercept": sol["intercept"], "correlation": sol["correlation"],
            "theta": sol["theta"], "settings": run.fit_settings, "method": run.spec.method}


def fit_mirt(name: str, out: Path, nodes: int) -> dict:
    import mirt

    s = load_set(Path(name))
    dims = s["dims"]
    cpu, wall = time.process_time(), time.perf_counter()
    if s["confirmatory"]:
        lines = []
        for j in range(dims):
            idx = np.flatnonzero(s["q"][:, j]) + 1
            lines.append(f"F{j + 1} = {idx[0]}-{idx[-1]}")
        pairs = [f"F{i + 1}*F{j + 1}" for i in range(dims) for j in range(i + 1, dims)]
        lines.append("COV = " + ", ".join(pairs))
        spec = mirt.mirt_model("\n".join(lines))
        result = mirt.fit_mirt(s["y"], "2PL", n_factors=dims, spec=spec, n_quadpts=nodes,
                               compute_standard_errors=False)
    else:
        result = mirt.fit_mirt(s["y"], "2PL", n_factors=dims, n_quadpts=nodes,
                               compute_standard_errors=False)
    scores = mirt.fscores(result, s["y"], method="EAP", n_quadpts=nodes if dims > 2 else None)
    theta = np.asarray(scores.to_array())
    fitted = time.process_time() - cpu, time.perf_counter() - wall  # fit + EAP scores
    cov = result.latent_covariance
    corr = (np.eye(dims) if cov is None else
            np.asarray(cov) / np.sqrt(np.outer(np.diag(cov), np.diag(cov))))
    params = result.model.parameters
    return {"cpu_s": fitted[0], "wall_s": fitted[1], "loadings": np.asarray(params["slopes"]),
            "intercept": np.asarray(params["intercepts"]), "correlation": corr,
            "theta": theta.reshape(len(s["y"]), dims), "iterations": int(result.n_iterations),
            "converged": bool(result.converged), "nodes_per_dim": nodes}


def child(which: str, name: str, out: Path, nodes: int) -> None:
    result = fit_ours(name, out) if which == "ours" else fit_mirt(name, out, nodes)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out.write_text(json.dumps({k: (v.tolist() if isinstance(v, np.ndarray) else v)
                               for k, v in result.items()}))


# ---- recovery ------------------------------------------------------------------------------

def align(est: np.ndarray, truth: np.ndarray, confirmatory: bool) -> tuple[np.ndarray, np.ndarray]:
    """A matrix M (D, D) with est @ M ~ truth: signed permutation (confirmatory: sign only,
    factors already in Q's order) or the orthogonal Procrustes rotation (exploratory)."""
    dims = truth.shape[1]
    if confirmatory:
        signs = np.sign((est * truth).sum(0))
        return np.diag(np.where(signs == 0, 1.0, signs)), np.arange(dims)
    u, _, vt = np.linalg.svd(est.T @ truth)
    return u @ vt, np.arange(dims)


def recovery(s: dict, fit: dict) -> dict:
    a, d = np.asarray(fit["loadings"]), np.asarray(fit["intercept"])
    m, _ = align(a, s["a"], s["confirmatory"])
    a = a @ m
    free = s["q"] > 0 if s["confirmatory"] else np.ones_like(s["a"], dtype=bool)
    theta = np.asarray(fit["theta"]) @ m
    r = m.T @ np.asarray(fit["correlation"]) @ m
    iu = np.triu_indices(s["dims"], 1)
    return {"loadings_r": float(np.corrcoef(a[free], s["a"][free])[0, 1]),
            "loadings_rmse": float(np.sqrt(((a - s["a"]) ** 2)[free].mean())),
            "intercept_rmse": float(np.sqrt(((d - s["d"]) ** 2).mean())),
            "correlation_max_err": float(np.abs(r[iu] - s["r"][iu]).max()) if len(iu[0]) else 0.0,
            "theta_r": [float(np.corrcoef(theta[:, j], s["theta"][:, j])[0, 1])
                        for j in range(s["dims"])]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sets", nargs="+", default=["2d", "5d"], choices=sorted(SETS))
    p.add_argument("--peer-python", default="/tmp/peers/bin/python")
    p.add_argument("--mirt-nodes", type=int, nargs=2, default=[21, 5],
                   metavar=("LOW_D", "HIGH_D"), help="mirt EM nodes per dimension for D <= 2 "
                   "and for D > 2")
    p.add_argument("--skip", nargs="*", default=[], choices=["ours", "mirt"])
    p.add_argument("--child", nargs=3, metavar=("WHO", "SET", "OUT"), help=argparse.SUPPRESS)
    p.add_argument("--nodes", type=int, default=21, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child[0], args.child[1], Path(args.child[2]), args.nodes)
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "OPENBLAS_NUM_THREADS": "1", "RAYON_NUM_THREADS": "1", "PPL_VAE_QUICK": ""}
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    print(f"machine: {os.cpu_count()} CPUs, python {sys.version.split()[0]}; one thread each")
    for name in args.sets:
        s = make_set(name)
        data = Path(tempfile.mkstemp(suffix=".npz")[1])
        np.savez(data, **s)
        nodes = args.mirt_nodes[0] if s["dims"] <= 2 else args.mirt_nodes[1]
        print(f"\n== {name}: {s['students']} students x {s['items']} items, D={s['dims']}, "
              f"{'confirmatory' if s['confirmatory'] else 'exploratory'}, rho={s['rho']}")
        results = {}
        for who in ("ours", "mirt"):
            if who in args.skip:
                continue
            out = Path(tempfile.mkstemp(suffix=".json")[1])
            python = sys.executable if who == "ours" else args.peer_python
            cmd = ["nice", "-n", "10", python, __file__, "--child", who, str(data), str(out),
                   "--nodes", str(nodes)]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"{who} failed:\n{done.stderr[-2000:]}")
                continue
            fit = json.loads(out.read_text())
            results[who] = {**fit, **recovery(s, fit)}
        head = f"{'':24s}" + "".join(f"{w:>14s}" for w in results)
        print(head)
        rows = [("CPU s", "cpu_s", "{:.1f}"), ("wall s", "wall_s", "{:.1f}"),
                ("peak RSS MB", "peak_rss_mb", "{:.0f}"), ("loadings r", "loadings_r", "{:.4f}"),
                ("loadings rmse", "loadings_rmse", "{:.4f}"),
                ("intercept rmse", "intercept_rmse", "{:.4f}"),
                ("max |corr err|", "correlation_max_err", "{:.4f}")]
        for label, key, fmt in rows:
            print(f"{label:24s}" + "".join(f"{fmt.format(r[key]):>14s}" for r in results.values()))
        for j in range(s["dims"]):
            print(f"{f'r(theta{j + 1})':24s}" + "".join(f"{r['theta_r'][j]:>14.4f}"
                                                        for r in results.values()))
        if "ours" in results and "mirt" in results:
            o, m = results["ours"], results["mirt"]
            print(f"ours/mirt: CPU {o['cpu_s'] / m['cpu_s']:.2f}x, loadings rmse "
                  f"{o['loadings_rmse'] / m['loadings_rmse']:.2f}x, mean r(theta) "
                  f"{np.mean(o['theta_r']) - np.mean(m['theta_r']):+.4f}")
            print(f"mirt: {m.get('iterations')} EM iterations, converged {m.get('converged')}, "
                  f"{m.get('nodes_per_dim')} nodes per dimension; ours: {o['method']}, "
                  f"{o['settings']}")


if __name__ == "__main__":
    main()
