"""An exam run's tables and files, shared by the one- and multidimensional exam models:
reading a spec's response table (cached: training reads it for the spec, the data and the
report), the run's own copy of its answers (responses.pt), CSV writing, and the settings
both fit with. ``spec`` is :class:`ppl_vae.models.irt.IRTSpec`."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path
from typing import Any

import torch

from ppl_vae.program import SetupError

GRADED_KINDS = ("grm", "gpcm", "pcm")
RESPONSES_FILE = "responses.pt"  # the run's own copy of its training answers
Z90 = 1.6448536269514722  # the 95th percentile of N(0, 1): 90% central interval
# marginal method: minibatches of students this large, about this many optimizer steps
MARGINAL_BATCH, MARGINAL_STEPS, MARGINAL_MIN_EPOCHS = 5000, 400, 20


def kind_of(model: str) -> str:
    return model.removeprefix("irt-")


_CACHE: dict[tuple, Any] = {}


def read_responses(spec: Any, path: str | Path | None = None, check: bool = True):
    """The :class:`ppl_vae.data.irt.Responses` of ``path`` (default: the spec's file), read
    as the spec's model needs (graded codes for grm); the last file read is kept (training
    reads it once for the spec, the data and the report)."""
    from ppl_vae.data.irt import load_responses, resolve

    if path is None and spec.responses is None:
        raise SetupError(f"{spec.model}: give the response file (--responses FILE or lsat6)")
    file = resolve(path if path is not None else spec.responses)
    graded = kind_of(spec.model) in GRADED_KINDS
    key = (str(file), file.stat().st_mtime if file.exists() else None,
           spec.format if path is None else "auto", spec.id_column if path is None else None,
           graded)
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = load_responses(file, spec.format if path is None else "auto",
                                     spec.id_column if path is None else None, check=check,
                                     graded=graded)
    return _CACHE[key]


def warn_unused_categories(data, categories: list[int]) -> None:
    """One warning naming the items with a category below their top one that nobody chose:
    the threshold (step) next to it is not identified by the data, only by the prior."""
    empty = []
    for t, k in enumerate(categories):
        used = torch.bincount(data.responses[data.mask[:, t], t].long(), minlength=k)
        empty += [f"{data.item_ids[t]!r} category {c}" for c in range(k) if used[c] == 0]
    if empty:
        more = f" and {len(empty) - 3} more" if len(empty) > 3 else ""
        warnings.warn(f"{data.source}: no answers in {', '.join(empty[:3])}{more}; the "
                      "thresholds next to an empty category are set by the prior, not the "
                      "data (merge the category with a neighbour to estimate them)",
                      stacklevel=3)


def run_responses(run):
    """The training answers of a run, from its own copy (responses.pt; read with
    ``weights_only=True``), else from the spec's file."""
    from ppl_vae.data.irt import Responses

    file = Path(run.path) / RESPONSES_FILE if run.path is not None else None
    if file is None or not file.exists():
        return read_responses(run.spec, check=False).align(run.spec.item_ids)
    stored = torch.load(file, weights_only=True)
    codes = stored["codes"]
    mask = codes != 255
    return Responses(torch.where(mask, codes, 0).float(), mask, list(stored["student_ids"]),
                     list(stored["item_ids"]), str(file))


def save_responses(data, path: Path) -> Path:
    """The run's copy of its answers: uint8 codes (255 = missing) and the ids."""
    from ppl_vae.checkpoint import save_checkpoint

    codes = torch.where(data.mask, data.responses, 255.0).to(torch.uint8)
    save_checkpoint({"codes": codes, "student_ids": list(data.student_ids),
                     "item_ids": list(data.item_ids)}, path)  # atomic
    return path


def write_csv(rows: list[dict], path: Path) -> Path:
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path
