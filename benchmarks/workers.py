"""Fresh-process workers for the side-by-side benchmarks (stdlib only: the peers' venvs
import it too). A benchmark script runs itself as ``script --worker SPEC_JSON`` in a fresh
process with one thread, and the worker prints its figures as one JSON line."""

from __future__ import annotations

import json
import os
import subprocess
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
