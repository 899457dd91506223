"""Exam responses (students x items, 0/1, some missing) from three file formats to one form.

Formats (``format="auto"`` picks by extension and header):

    wide CSV    one row per student, one column per item; an optional id column named
                student / student_id / subject_id / examinee / id (else ids are row numbers);
                cells 0, 1 or blank (``NA`` also means missing)
    long CSV    columns student, item, response (aliases: subject_id / examinee; item_id;
                correct / score); one row per answered (student, item) pair
    jsonlines   py-irt's format, one student a line:
                ``{"subject_id": "s1", "responses": {"item1": 1, "item2": 0}}``

``graded=True`` (graded response models) accepts any integer category code 0, 1, 2, ... in
place of 0/1.

Bundled data sets, given by name instead of a path (``--responses lsat6``): ``lsat6`` and
``lsat7``, the Law School Admission Test sections VI and VII (1000 students x 5 items each;
Bock & Lieberman 1970), as distributed with R's ltm package (GPL), shipped in this package.

Everything becomes a :class:`Responses`: ``responses`` float (N, I) with 0 where missing,
``mask`` bool (N, I) (True = answered). Missing answers are masked out of the likelihood by
the models, never imputed. Errors name the file, the line and the column.
"""

from __future__ import annotations

import csv
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ID_COLUMNS = ("student", "student_id", "subject_id", "subject", "examinee", "id")
ITEM_COLUMNS = ("item", "item_id")
RESPONSE_COLUMNS = ("response", "correct", "score", "value")
MISSING = ("", "na", "nan")
#: bundled response tables: name -> file in this package (see the module docstring)
BUNDLED = {"lsat6": "lsat6.csv", "lsat7": "lsat7.csv"}


class ResponseDataError(ValueError):
    """A response file that cannot be used; the message names file, line and column."""


@dataclass
class Responses:
    """Binary responses of N students to I items.

    Attributes:
        responses: float tensor (N, I), 1 = correct, 0 = wrong or missing.
        mask: bool tensor (N, I), True where the student answered the item.
        student_ids: N labels; item_ids: I labels (column names / item ids).
        source: the file it came from (for messages).
    """

    responses: torch.Tensor
    mask: torch.Tensor
    student_ids: list[str]
    item_ids: list[str]
    source: str = "<memory>"

    @property
    def num_students(self) -> int:
        return int(self.responses.shape[0])

    @property
    def num_items(self) -> int:
        return int(self.responses.shape[1])

    @property
    def missing_fraction(self) -> float:
        return 1.0 - float(self.mask.float().mean())

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(responses, mask)``: the data in the engine's call form (two positional args)."""
        return self.responses, self.mask

    def align(self, item_ids: list[str]) -> Responses:
        """The same students on the item order ``item_ids`` (items a model was trained on);
        items absent here are missing for every student. Unknown items are an error."""
        unknown = [i for i in self.item_ids if i not in set(item_ids)]
        if unknown:
            raise ResponseDataError(
                f"{self.source}: items {unknown[:5]} were not in the training data "
                f"(trained on {len(item_ids)} items: {item_ids[:5]}...)")
        pos = {item: k for k, item in enumerate(self.item_ids)}
        n = self.num_students
        responses = torch.zeros(n, len(item_ids))
        mask = torch.zeros(n, len(item_ids), dtype=torch.bool)
        for k, item in enumerate(item_ids):
            if item in pos:
                responses[:, k] = self.responses[:, pos[item]]
                mask[:, k] = self.mask[:, pos[item]]
        return Responses(responses, mask, list(self.student_ids), list(item_ids), self.source)


def from_arrays(responses: np.ndarray | torch.Tensor, mask: np.ndarray | torch.Tensor | None = None,
                student_ids: list[str] | None = None, item_ids: list[str] | None = None,
                source: str = "<memory>", check: bool = True) -> Responses:
    """Build :class:`Responses` from an (N, I) array of 0/1 with NaN (or ``mask`` False) for
    missing answers."""
    r = torch.as_tensor(np.asarray(responses, dtype=np.float32))
    if r.dim() != 2:
        raise ResponseDataError(f"{source}: responses must be 2-D (students x items), "
                                f"got shape {tuple(r.shape)}")
    m = ~torch.isnan(r)
    if mask is not None:
        m = m & torch.as_tensor(np.asarray(mask)).bool()
    r = torch.where(m, r, torch.zeros(()))
    bad = m & (r != 0) & (r != 1)
    if bool(bad.any()):
        s, i = bad.nonzero()[0].tolist()
        raise ResponseDataError(f"{source}: row {s}, column {i}: value {float(r[s, i])} is not "
                                "0, 1 or missing")
    n, k = r.shape
    data = Responses(r, m, student_ids or [str(s) for s in range(1, n + 1)],
                     item_ids or [f"item{j}" for j in range(1, k + 1)], source)
    if check:
        validate(data)
    return data


def resolve(path: str | Path) -> Path:
    """The file of a response table: ``path`` itself, or the bundled file of a name in
    :data:`BUNDLED` (``lsat6``, ``lsat7``) when no such file exists."""
    if not Path(path).exists() and str(path).lower() in BUNDLED:
        return Path(__file__).with_name(BUNDLED[str(path).lower()])
    return Path(path)


def load_responses(path: str | Path, format: str = "auto", id_column: str | None = None,
                   check: bool = True, graded: bool = False) -> Responses:
    """Read a wide CSV, long CSV or py-irt jsonlines file, or a bundled table by name (see
    the module docstring). ``graded``: accept integer category codes 0, 1, 2, ..."""
    path = resolve(path)
    if not path.exists():
        raise FileNotFoundError(f"no response file at {path} (bundled: "
                                f"{', '.join(BUNDLED)})")
    if format == "auto":
        format = _detect_format(path)
    if format == "wide":
        data = _read_wide(path, id_column, graded)
    elif format == "long":
        data = _read_long(path, graded)
    elif format in ("jsonl", "jsonlines"):
        data = _read_jsonl(path, graded)
    else:
        raise ValueError(f"unknown response format {format!r}; choose auto, wide, long, jsonl")
    if check:
        validate(data, lines=format == "wide")
    return data


def validate(data: Responses, lines: bool = False) -> None:
    """Errors for items or students with no responses; a warning for students who got every
    answered item right (or wrong): their ability is pulled only by the prior."""
    where = (lambda s: f"line {s + 2} (student {data.student_ids[s]!r})") if lines else \
        (lambda s: f"student {data.student_ids[s]!r}")
    if data.num_students == 0 or data.num_items == 0:
        raise ResponseDataError(f"{data.source}: no responses (shape {data.num_students} "
                                f"students x {data.num_items} items)")
    answered = data.mask.sum(0)
    if bool((answered == 0).any()):
        j = int((answered == 0).nonzero()[0])
        raise ResponseDataError(f"{data.source}: column {data.item_ids[j]!r}: item has no "
                                "responses (every cell is missing); drop it")
    per_student = data.mask.sum(1)
    if bool((per_student == 0).any()):
        s = int((per_student == 0).nonzero()[0])
        raise ResponseDataError(f"{data.source}: {where(s)} has no responses; drop the row")
    if bool((data.responses > 1).any()):
        return  # graded codes: no single "all right"
    correct = (data.responses * data.mask).sum(1)
    extreme = (correct == 0) | (correct == per_student)
    if bool(extreme.any()):
        idx = extreme.nonzero().flatten().tolist()
        warnings.warn(f"{data.source}: {len(idx)} students answered all their items right or "
                      f"all wrong (first: {', '.join(where(s) for s in idx[:3])}); the "
                      "answers only bound their abilities, the prior N(0, 1) sets them",
                      stacklevel=3)


# ---- readers ------------------------------------------------------------------------------

def _detect_format(path: Path) -> str:
    if path.suffix.lower() in (".jsonl", ".jsonlines", ".json"):
        return "jsonl"
    header = pd.read_csv(path, nrows=0, dtype=str).columns
    names = {c.strip().lower() for c in header}
    if len(header) == 3 and names & set(ITEM_COLUMNS) and names & set(RESPONSE_COLUMNS):
        return "long"
    return "wide"


def _cells(values: np.ndarray, path: Path, columns: list[str], row_offset: int,
           graded: bool = False) -> tuple:
    """Strings -> (float 0/1 array, mask); the first bad cell raises with its line/column.
    ``graded``: integer codes 0, 1, 2, ... instead of 0/1."""
    v = np.char.lower(np.char.strip(values.astype(str)))
    missing = np.isin(v, MISSING)
    if graded:
        code = np.char.replace(v, ".0", "")
        ok = np.char.isdigit(code) & (np.char.str_len(code) < 4)
        bad = ~(missing | ok)
        what = "a category code 0, 1, 2, ... or blank"
        out = np.where(ok, code, "0").astype(np.float32)
    else:
        one, zero = np.isin(v, ("1", "1.0")), np.isin(v, ("0", "0.0"))
        bad = ~(missing | one | zero)
        what = "0, 1 or blank"
        out = one.astype(np.float32)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise ResponseDataError(f"{path}: line {r + row_offset}, column {columns[c]!r}: value "
                                f"{values[r, c]!r} is not {what}")
    return out, ~missing


def _read_wide(path: Path, id_column: str | None, graded: bool = False) -> Responses:
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise ResponseDataError(f"{path}: not a readable CSV: {e}") from e
    with open(path, newline="", encoding="utf-8") as f:
        columns = [c.strip() for c in next(csv.reader(f), [])]
    if len(columns) != frame.shape[1]:
        raise ResponseDataError(f"{path}: line 1: {len(columns)} header names for "
                                f"{frame.shape[1]} columns")
    dup = pd.Series(columns)[pd.Series(columns).duplicated()].tolist()
    if dup:
        raise ResponseDataError(f"{path}: line 1: duplicate item column {dup[0]!r}")
    lowered = [c.lower() for c in columns]
    if id_column is not None:
        if id_column not in columns:
            raise ResponseDataError(f"{path}: line 1: no id column {id_column!r} "
                                    f"(columns: {columns[:6]}...)")
        key = columns.index(id_column)
    else:
        key = next((lowered.index(c) for c in ID_COLUMNS if c in lowered), None)
    if key is not None:
        ids = [s.strip() for s in frame.iloc[:, key].tolist()]
        seen: dict[str, int] = {}
        for r, s in enumerate(ids):
            if s == "":
                raise ResponseDataError(f"{path}: line {r + 2}, column {columns[key]!r}: "
                                        "empty student id")
            if s in seen:
                raise ResponseDataError(f"{path}: line {r + 2}, column {columns[key]!r}: "
                                        f"duplicate student {s!r} (first on line {seen[s]})")
            seen[s] = r + 2
        items = [c for j, c in enumerate(columns) if j != key]
        values = frame.drop(columns=frame.columns[key]).to_numpy()
    else:
        ids = [str(r) for r in range(1, len(frame) + 1)]
        items, values = columns, frame.to_numpy()
    if not items:
        raise ResponseDataError(f"{path}: no item columns")
    r, m = _cells(values, path, items, row_offset=2, graded=graded)
    return Responses(torch.from_numpy(r), torch.from_numpy(m), ids, items, str(path))


def _pick(columns: list[str], names: tuple[str, ...], what: str, path: Path) -> str:
    for c in columns:
        if c.strip().lower() in names:
            return c
    raise ResponseDataError(f"{path}: line 1: no {what} column (one of {', '.join(names)}); "
                            f"columns are {columns}")


def _read_long(path: Path, graded: bool = False) -> Responses:
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    columns = list(frame.columns)
    sc = _pick(columns, ID_COLUMNS, "student", path)
    ic = _pick(columns, ITEM_COLUMNS, "item", path)
    rc = _pick(columns, RESPONSE_COLUMNS, "response", path)
    students = frame[sc].str.strip().to_numpy()
    items = frame[ic].str.strip().to_numpy()
    for col, values in ((sc, students), (ic, items)):
        empty = np.nonzero(values == "")[0]
        if len(empty):
            raise ResponseDataError(f"{path}: line {empty[0] + 2}, column {col!r}: empty value")
    r, m = _cells(frame[[rc]].to_numpy(), path, [rc], row_offset=2, graded=graded)
    keys = pd.Series(list(zip(students, items)))
    dup = keys.duplicated()
    if dup.any():
        row = int(np.nonzero(dup.to_numpy())[0][0])
        first = int(np.nonzero((keys == keys[row]).to_numpy())[0][0])
        raise ResponseDataError(f"{path}: line {row + 2}: duplicate response of student "
                                f"{students[row]!r} to item {items[row]!r} (first on line "
                                f"{first + 2})")
    sid, s_index = np.unique(students, return_inverse=True)
    iid, i_index = np.unique(items, return_inverse=True)
    s_order = pd.unique(students)  # keep first-appearance order
    i_order = pd.unique(items)
    s_map = np.empty(len(sid), dtype=np.int64)
    s_map[np.searchsorted(sid, s_order)] = np.arange(len(s_order))
    i_map = np.empty(len(iid), dtype=np.int64)
    i_map[np.searchsorted(iid, i_order)] = np.arange(len(i_order))
    rows, cols = s_map[s_index], i_map[i_index]
    resp = np.zeros((len(s_order), len(i_order)), dtype=np.float32)
    mask = np.zeros_like(resp, dtype=bool)
    keep = m[:, 0]
    resp[rows[keep], cols[keep]] = r[keep, 0]
    mask[rows[keep], cols[keep]] = True
    return Responses(torch.from_numpy(resp), torch.from_numpy(mask), [str(s) for s in s_order],
                     [str(i) for i in i_order], str(path))


def _read_jsonl(path: Path, graded: bool = False) -> Responses:
    ids: list[str] = []
    seen: dict[str, int] = {}
    item_pos: dict[str, int] = {}
    triples: list[tuple[int, int, float]] = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ResponseDataError(f"{path}: line {line_no}: not JSON: {e}") from e
            if not isinstance(record, dict) or "responses" not in record:
                raise ResponseDataError(f"{path}: line {line_no}: expected an object with "
                                        "'subject_id' and 'responses'")
            sid = str(record.get("subject_id", record.get("student", ""))).strip()
            if not sid:
                raise ResponseDataError(f"{path}: line {line_no}, field 'subject_id': missing")
            if sid in seen:
                raise ResponseDataError(f"{path}: line {line_no}, field 'subject_id': duplicate "
                                        f"student {sid!r} (first on line {seen[sid]})")
            seen[sid] = line_no
            responses = record["responses"]
            if not isinstance(responses, dict):
                raise ResponseDataError(f"{path}: line {line_no}, field 'responses': expected "
                                        "an object {item: 0/1}")
            s = len(ids)
            ids.append(sid)
            for item, value in responses.items():
                if value is None or value == "":
                    continue
                ok = (isinstance(value, int) and not isinstance(value, bool) and value >= 0
                      ) if graded else value in (0, 1) and not isinstance(value, str)
                if not ok:
                    what = "a category code 0, 1, 2, ..." if graded else "0, 1"
                    raise ResponseDataError(f"{path}: line {line_no}, field 'responses.{item}': "
                                            f"value {value!r} is not {what} or null")
                j = item_pos.setdefault(str(item), len(item_pos))
                triples.append((s, j, float(value)))
    resp = torch.zeros(len(ids), len(item_pos))
    mask = torch.zeros(len(ids), len(item_pos), dtype=torch.bool)
    if triples:
        t = torch.tensor(triples)
        rows, cols = t[:, 0].long(), t[:, 1].long()
        resp[rows, cols] = t[:, 2]
        mask[rows, cols] = True
    return Responses(resp, mask, ids, list(item_pos), str(path))


def write_jsonl(data: Responses, path: str | Path) -> None:
    """Write py-irt's jsonlines format (missing answers left out)."""
    r, m = data.responses.numpy(), data.mask.numpy()
    with open(path, "w", encoding="utf-8") as f:
        for s, sid in enumerate(data.student_ids):
            answers = {data.item_ids[j]: int(r[s, j]) for j in np.nonzero(m[s])[0]}
            f.write(json.dumps({"subject_id": sid, "responses": answers}) + "\n")
