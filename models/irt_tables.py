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


def read_responses(spec: Any, path: str | Path | None = None, check: bool = True,
                   format: str | None = None, id_column: str | None = None):
    """The :class:`ppl_vae.data.irt.Responses` of ``path`` (default: the spec's file), read
    as the spec's model needs (graded codes for grm) and in the spec's layout (its
    ``format`` and ``id_column``, as the run was trained; ``format`` / ``id_column`` given
    here replace them, e.g. new students in another layout); the last file read is kept
    (training reads it once for the spec, the data and the report)."""
    from ppl_vae.data.irt import load_responses, resolve

    if path is None and spec.responses is None:
        raise SetupError(f"{spec.model}: give the response file (--responses FILE or lsat6)")
    file = resolve(path if path is not None else spec.responses)
    graded = kind_of(spec.model) in GRADED_KINDS
    format = format or spec.format or "auto"
    id_column = id_column or spec.id_column
    key = (str(file), file.stat().st_mtime if file.exists() else None, format, id_column,
           graded)
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = load_responses(file, format, id_column, check=check, graded=graded)
    return _CACHE[key]


def refuse_codes_from_one(data) -> None:
    """Raise ResponseDataError when no answer of a graded table is coded 0 (e.g. a Likert
    scale exported as 1..5): the models read codes 0..K-1, so category 0 would be empty in
    every item and every first threshold set by the prior alone."""
    from ppl_vae.data.irt import ResponseDataError

    codes = data.responses[data.mask]
    if len(codes) and float(codes.min()) >= 1:
        low, high = int(codes.min()), int(codes.max())
        raise ResponseDataError(
            f"{data.source}: no answer in any item is coded 0 (the codes run from {low} to "
            f"{high}): graded answers must be coded from 0, as 0..K-1; recode them (e.g. "
            f"{low}..{high} to 0..{high - low}, subtracting {low}) and train again")


def warn_unused_categories(data, categories: list[int]) -> None:
    """Warnings (one each) naming the items whose every answer has the same code (a binary
    item everybody got right, or wrong): the data cannot place such an item, its parameters
    come from the prior alone (with flat priors they run off to infinity); and the items with
    a category below their top one that nobody chose: the threshold (step) next to it is not
    identified by the data, only by the prior. ``categories``: K_t per item (2 = binary)."""
    constant, empty = [], []
    for t, k in enumerate(categories):
        used = torch.bincount(data.responses[data.mask[:, t], t].long(), minlength=k)
        if int((used > 0).sum()) == 1:
            constant.append(f"{data.item_ids[t]!r} (every answer {int(used.argmax())})")
        else:
            empty += [f"{data.item_ids[t]!r} category {c}" for c in range(k) if used[c] == 0]
    if constant:
        more = f" and {len(constant) - 3} more" if len(constant) > 3 else ""
        warnings.warn(f"{data.source}: every student gave the same answer to item "
                      f"{', '.join(constant[:3])}{more}; the data cannot place such an item: "
                      "its parameters are set by the prior, not the data (with --priors "
                      "flat they run off to infinity); drop the item", stacklevel=3)
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
    mask = codes != 255 if codes.dtype == torch.uint8 else codes >= 0
    return Responses(torch.where(mask, codes, 0).float(), mask, list(stored["student_ids"]),
                     list(stored["item_ids"]), str(file))


def save_responses(data, path: Path) -> Path:
    """The run's copy of its answers and the ids: codes (N, I) uint8 with 255 = missing
    when every code is below 255 (as every run so far), else int16 with -1 = missing (graded
    codes up to 999)."""
    from ppl_vae.checkpoint import save_checkpoint

    narrow = not bool((data.responses[data.mask] >= 255).any())
    missing, dtype = (255.0, torch.uint8) if narrow else (-1.0, torch.int16)
    codes = torch.where(data.mask, data.responses, missing).to(dtype)
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
