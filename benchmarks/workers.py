"""Fresh-process workers for the side-by-side benchmarks (stdlib only: the peers' venvs
import it too). A benchmark script runs itself as ``script --worker SPEC_JSON`` in a fresh
process with one thread, and the worker prints its figures as one JSON line."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "RAYON_NUM_THREADS": "1"}


def peak_mb() -> float:
    """This process's peak resident memory, MB (VmHWM: not inherited across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_worker(python: str, script: str, spec: dict, timeout: float, label: str) -> dict:
    """``python script --worker SPEC`` with one thread; its last stdout line as JSON. A mirt
    worker (variant ``mirt*``) runs without PYTHONPATH (its venv has no torch)."""
    env = {**os.environ, **THREADS}
    if spec["variant"].startswith("mirt"):
        env.pop("PYTHONPATH", None)
    proc = subprocess.run([python, str(Path(script).resolve()), "--worker", json.dumps(spec)],
                          capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{spec['variant']} on {label} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def median(key: str, rows: list[dict]) -> float | None:
    """The median of ``key`` over the runs that have it, or None."""
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def median_rows(runs: dict[str, list[dict]], columns: list[tuple[str, str]],
                ref_a=None, ref_b=None) -> list[str]:
    """One markdown row per variant: the median over its runs of each (key, format) column
    (``peak_mb`` followed by the RSS before the fit in brackets), then the largest
    |a - ref_a| and |b - ref_b| of its median item estimates (blank without a reference)."""
    import numpy as np  # the summary runs in this project's env, not in a peer's

    lines = []
    for variant, rows in runs.items():
        cells = [variant]
        for key, fmt in columns:
            v = median(key, rows)
            cells.append("" if v is None else format(v, fmt))
            if key == "peak_mb":
                cells[-1] += f" ({median('rss_before_fit_mb', rows):.0f})"
        if ref_a is not None:
            a, b = np.median([r["a"] for r in rows], 0), np.median([r["b"] for r in rows], 0)
            cells += [f"{np.abs(a - ref_a).max():.4f}", f"{np.nanmax(np.abs(b - ref_b)):.4f}"]
        else:
            cells += ["", ""]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def runnable_variants(args) -> list[str]:
    """``args.variants`` without the mirt ones when ``args.peer_python`` (the peers' venv)
    is missing, saying so; prints the machine line every benchmark starts with."""
    if args.peer_python and not Path(args.peer_python).exists():
        print(f"{args.peer_python} not found: mirt runs skipped")
        args.peer_python = ""
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()}; python "
          f"{sys.version.split()[0]}; threads {THREADS}")
    return [v for v in args.variants if args.peer_python or not v.startswith("mirt")]


def alternated_runs(script: str, args, variants: list[str], spec: dict, label: str,
                    show) -> dict[str, list[dict]]:
    """``args.repeats`` fresh-process runs of every variant on one data set (``spec``: the
    worker's other fields), the order reversed every other repeat; a mirt variant runs in
    ``args.peer_python``, ours in this interpreter. ``show(repeat, variant, figures)``
    prints each run as it ends. Returns the figures per variant."""
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for repeat in range(args.repeats):
        for variant in variants if repeat % 2 == 0 else variants[::-1]:
            python = args.peer_python if variant.startswith("mirt") else sys.executable
            figures = run_worker(python, script, {"variant": variant, **spec}, args.timeout,
                                 label)
            runs[variant].append(figures)
            show(repeat, variant, figures)
    return runs
