"""Checkpoints: written atomically, read with ``torch.load(weights_only=True)`` only.

A checkpoint is a dict of tensors, numbers, strings, lists and dicts -- never pickled code:

    format      "ppl-vae/1"
    config      JSON-able dict (the run's settings; the CLI stores the model spec here)
    epoch       last finished epoch (1-based)
    model, guide         state_dicts of the model/guide modules (empty if plain functions)
    params      {name: unconstrained tensor} of every Pyro param the pair uses
    buffers     {name: tensor}: buffers (BatchNorm statistics) of networks outside the
                model/guide modules (``pyro.module("decoder", net)``); older files lack it
    num_examples  rows of the training data (restore sets per-row autoguides up for them;
                older files lack it)
    optimizer, scheduler state_dicts
    rng         torch / cuda / numpy / python RNG states and the shuffling generator's
    history     list of per-epoch rows
    early_stopping  {"best": float, "bad_epochs": int, "best_epoch": int}
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = "ppl-vae/1"
_UMASK = os.umask(0)
os.umask(_UMASK)
REQUIRED = ("format", "config", "epoch", "model", "guide", "params", "optimizer", "rng",
            "history")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``: a crash
    mid-write leaves the previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # as open() would make it (mkstemp makes 0600)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(state: Mapping[str, Any], path: str | os.PathLike) -> None:
    buffer = io.BytesIO()
    torch.save(dict(state, format=FORMAT), buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load and check a checkpoint; errors name the file and what is wrong with it."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated, corrupt, or holds pickled code
        raise ValueError(f"{path} is not a readable ppl-vae checkpoint "
                         f"(truncated or corrupt?): {type(e).__name__}: {e}") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a ppl-vae checkpoint (format "
                         f"{state.get('format') if isinstance(state, dict) else type(state)})")
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        raise ValueError(f"{path} lacks the fields {missing}")
    return state


def rng_state(generator: torch.Generator | None = None) -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": _tuples_to_lists(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["shuffle"] = generator.get_state()
    return state


def set_rng_state(state: dict, generator: torch.Generator | None = None) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    random.setstate(_lists_to_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "shuffle" in state:
        generator.set_state(state["shuffle"])


def _tuples_to_lists(x):
    return [_tuples_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _lists_to_tuples(x):
    return tuple(_lists_to_tuples(v) for v in x) if isinstance(x, list) else x


def write_history_csv(rows: list[dict], path: str | os.PathLike) -> None:
    """Per-epoch history as CSV (atomic)."""
    if not rows:
        return
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(path, out.getvalue().encode())


def write_json(obj: Any, path: str | os.PathLike) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())
