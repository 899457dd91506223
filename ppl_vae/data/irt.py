"""Exam responses (students x items, 0/1, some missing) from three file formats to one form.

Formats (``format="auto"`` picks by extension and header):

    wide CSV    one row per student, one column per item; an optional id column named
                student / student_id / subject_id / examinee / id (else ids are row numbers);
                cells 0, 1 or blank (``NA`` also means missing)
    long CSV    columns student, item, response (aliases: subject_id / examinee; item_id;
                correct / score / value / answer); one row per answered (student, item)
                pair; other columns (e.g. a time stamp) are ignored
    jsonlines   py-irt's format, one student a line:
                ``{"subject_id": "s1", "responses": {"item1": 1, "item2": 0}}``

``graded=True`` (graded response models) accepts any integer category code 0, 1, 2, ... in
place of 0/1 (up to 999; ``2.0`` is code 2 in every format).

Bundled data sets, given by name instead of a path (``--responses lsat6``): ``lsat6`` and
``lsat7``, the Law School Admission Test sections VI and VII (1000 students x 5 items each;
Bock & Lieberman 1970), as distributed with R's ltm package (GPL), shipped in this package.

Everything becomes a :class:`Responses`: ``responses`` float (N, I) with 0 where missing,
``mask`` bool (N, I) (True = answered). Missing answers are masked out of the likelihood by
the models, never imputed. Errors name the file, the line and the column.
"""

from __future__ import annotations

import csv
import io
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ppl_vae.data import read_text

ID_COLUMNS = ("student", "student_id", "subject_id", "subject", "examinee", "id")
ITEM_COLUMNS = ("item", "item_id")
RESPONSE_COLUMNS = ("response", "correct", "score", "value", "answer")
MISSING = ("", "na", "nan")
MAX_CODE = 999  # the largest graded category code the readers accept
#: the hint of a wide table's duplicate student: it may be a long table not recognised as one
LONG_HINT = ("; if the file is a long table (one row per answer), give --format long "
             f"(format='long'): columns {'/'.join(ID_COLUMNS)}, {'/'.join(ITEM_COLUMNS)} "
             f"and {'/'.join(RESPONSE_COLUMNS)}")
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
        lines: the line of each student in a wide CSV file (for messages), else None.
    """

    responses: torch.Tensor
    mask: torch.Tensor
    student_ids: list[str]
    item_ids: list[str]
    source: str = "<memory>"
    lines: list[int] | None = field(default=None, repr=False, compare=False)

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
        return Responses(responses, mask, list(self.student_ids), list(item_ids), self.source,
                         lines=self.lines)


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
    :data:`BUNDLED` (``lsat6``, ``lsat7``) when no such file exists (a folder of that name,
    e.g. the run folder of ``--responses lsat6 --out lsat6``, is not a response file)."""
    if not Path(path).is_file() and str(path).lower() in BUNDLED:
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
    table = None
    if format == "auto":
        if path.suffix.lower() in (".jsonl", ".jsonlines", ".json"):
            format = "jsonl"
        else:
            table = _read_csv(path)
            format = "long" if _is_long(table.columns) else "wide"
    if format == "wide":
        data = _read_wide(path, id_column, graded, table)
    elif format == "long":
        data = _read_long(path, graded, table)
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
    rows = data.lines if lines and data.lines is not None else None
    where = (lambda s: f"line {rows[s]} (student {data.student_ids[s]!r})") if rows else \
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

def _read_text(path: Path) -> str:
    return read_text(path, ResponseDataError, ": line",
                     "save the file as UTF-8 (Excel: 'CSV UTF-8')")


@dataclass
class _Table:
    """A CSV file split into cells: the header (names stripped), the data rows (every one
    as long as the header) and each row's line number."""

    path: Path
    columns: list[str]
    rows: list[list[str]]
    lines: list[int]
    header_line: int


def _read_csv(path: Path) -> _Table:
    """Parse a CSV file strictly: errors (naming file and line) for an empty file, no data
    rows, empty or duplicate column names and rows with more or fewer fields than the
    header. Blank lines are skipped."""
    text = _read_text(path)
    if not text.strip():
        raise ResponseDataError(f"{path}: the file is empty (expected a CSV header line and "
                                "one row per student)")
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    header_line = 0
    rows: list[list[str]] = []
    lines: list[int] = []
    last = 0
    try:
        for row in reader:
            first, last = last + 1, reader.line_num
            if not row or (len(row) == 1 and not row[0].strip()):
                continue  # a blank line
            if header is None:
                header, header_line = [c.strip() for c in row], first
                continue
            if len(row) != len(header):
                what = "missing fields (write an empty field for a missing answer, e.g. " \
                    "'ann,1,,0')" if len(row) < len(header) else "extra fields"
                raise ResponseDataError(
                    f"{path}: line {first}: {len(row)} fields but the header (line "
                    f"{header_line}) has {len(header)}: {what}")
            rows.append(row)
            lines.append(first)
    except csv.Error as e:
        raise ResponseDataError(f"{path}: line {reader.line_num}: not a readable CSV "
                                f"({e})") from e
    if header is None:
        raise ResponseDataError(f"{path}: no CSV header (only blank lines)")
    other = next((d for d in (";", "\t", "|") if len(header) == 1 and d in header[0]), None)
    if other is not None:
        raise ResponseDataError(
            f"{path}: line {header_line}: one column, {header[0][:60]!r}: the file looks "
            f"separated by {other!r}; response tables are comma-separated CSV")
    for j, name in enumerate(header):
        if not name:
            raise ResponseDataError(f"{path}: line {header_line}, column {j + 1}: empty "
                                    "column name")
    seen: set[str] = set()
    for name in header:
        if name in seen:
            raise ResponseDataError(f"{path}: line {header_line}: duplicate item column "
                                    f"{name!r}")
        seen.add(name)
    if not rows:
        raise ResponseDataError(f"{path}: only a header line, no data rows (one row per "
                                "student expected)")
    return _Table(path, header, rows, lines, header_line)


def _is_long(columns: list[str]) -> bool:
    """A long table: an item column and a response column (:data:`ITEM_COLUMNS`,
    :data:`RESPONSE_COLUMNS`) and either nothing else or also a student column
    (:data:`ID_COLUMNS`; more columns, e.g. a time stamp, are ignored)."""
    names = {c.lower() for c in columns}
    named = bool(names & set(ITEM_COLUMNS)) and bool(names & set(RESPONSE_COLUMNS))
    return named and (len(columns) == 3 or bool(names & set(ID_COLUMNS)))


def _detect_format(path: Path) -> str:
    if path.suffix.lower() in (".jsonl", ".jsonlines", ".json"):
        return "jsonl"
    return "long" if _is_long(_read_csv(path).columns) else "wide"


_GRADED_CODE = re.compile(r"[0-9]{1,3}(?:\.0)?", re.ASCII)


def _parse_cell(text: str, graded: bool) -> tuple[float, bool] | None:
    """One cell -> (value, answered), or None when it is not a valid answer."""
    v = text.strip().lower()
    if v in MISSING:
        return 0.0, False
    if graded:
        return (float(v.split(".")[0]), True) if _GRADED_CODE.fullmatch(v) else None
    if v in ("1", "1.0"):
        return 1.0, True
    if v in ("0", "0.0"):
        return 0.0, True
    return None


def _cells(rows: list[list[str]], path: Path, columns: list[str], lines: list[int],
           graded: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Cell strings (rows of equal length) -> (float array, answered mask); the first bad cell
    raises with its line and column. ``graded``: integer codes 0, 1, 2, ... instead of 0/1."""
    n, k = len(rows), len(columns)
    lookup: dict[str, int] = {}
    codes = np.fromiter((lookup.setdefault(c, len(lookup)) for row in rows for c in row),
                        dtype=np.int64, count=n * k).reshape(n, k)
    parsed = [_parse_cell(c, graded) for c in lookup]
    bad = np.array([p is None for p in parsed], dtype=bool)
    if bad.any() and bad[codes].any():
        r, c = np.argwhere(bad[codes])[0]
        what = "a category code 0, 1, 2, ... or blank" if graded else "0, 1 or blank"
        raise ResponseDataError(f"{path}: line {lines[r]}, column {columns[c]!r}: value "
                                f"{rows[r][c]!r} is not {what}")
    values = np.array([p[0] if p else 0.0 for p in parsed], dtype=np.float32)
    answered = np.array([bool(p and p[1]) for p in parsed], dtype=bool)
    return values[codes].reshape(n, k), answered[codes].reshape(n, k)


def _read_wide(path: Path, id_column: str | None, graded: bool = False,
               table: _Table | None = None) -> Responses:
    table = table or _read_csv(path)
    columns, rows, lines = table.columns, table.rows, table.lines
    lowered = [c.lower() for c in columns]
    if id_column is not None:
        if id_column not in columns:
            raise ResponseDataError(f"{path}: line {table.header_line}: no id column "
                                    f"{id_column!r} (columns: {columns[:6]}...)")
        key = columns.index(id_column)
    else:
        key = next((lowered.index(c) for c in ID_COLUMNS if c in lowered), None)
    if key is not None:
        ids = [row[key].strip() for row in rows]
        seen: dict[str, int] = {}
        for r, s in enumerate(ids):
            if s == "":
                raise ResponseDataError(f"{path}: line {lines[r]}, column {columns[key]!r}: "
                                        "empty student id")
            if s in seen:
                raise ResponseDataError(f"{path}: line {lines[r]}, column {columns[key]!r}: "
                                        f"duplicate student {s!r} (first on line {seen[s]})"
                                        f"{LONG_HINT}")
            seen[s] = lines[r]
        items = [c for j, c in enumerate(columns) if j != key]
        cells = [row[:key] + row[key + 1:] for row in rows]
    else:
        ids = [str(r) for r in range(1, len(rows) + 1)]
        items, cells = columns, rows
    if not items:
        raise ResponseDataError(f"{path}: no item columns (only the id column "
                                f"{columns[key]!r})")
    try:
        r, m = _cells(cells, path, items, lines, graded=graded)
    except ResponseDataError as e:
        if key is None and _looks_like_ids([row[0] for row in rows]):
            raise ResponseDataError(f"{e}; if column {columns[0]!r} holds the students' ids, "
                                    f"give --id-column {columns[0]} (id_column="
                                    f"{columns[0]!r}): ids are found by themselves only in a "
                                    f"column named {', '.join(ID_COLUMNS)}") from e
        raise
    return Responses(torch.from_numpy(r), torch.from_numpy(m), ids, items, str(path),
                     lines=list(lines))


def _looks_like_ids(values: list[str]) -> bool:
    """True when the answered cells of a column are all non-numeric text (e.g. 's0001'):
    a column of student ids, not answers."""
    cells = [v.strip() for v in values if v.strip().lower() not in MISSING]
    return bool(cells) and not any(_is_number(v) for v in cells)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _pick(columns: list[str], names: tuple[str, ...], what: str, path: Path) -> int:
    for j, c in enumerate(columns):
        if c.lower() in names:
            return j
    raise ResponseDataError(f"{path}: line 1: no {what} column (one of {', '.join(names)}); "
                            f"columns are {columns}")


def _read_long(path: Path, graded: bool = False, table: _Table | None = None) -> Responses:
    table = table or _read_csv(path)
    columns, rows, lines = table.columns, table.rows, table.lines
    sc = _pick(columns, ID_COLUMNS, "student", path)
    ic = _pick(columns, ITEM_COLUMNS, "item", path)
    rc = _pick(columns, RESPONSE_COLUMNS, "response", path)
    s_pos: dict[str, int] = {}
    i_pos: dict[str, int] = {}
    first: dict[tuple[int, int], int] = {}
    rows_idx = np.empty(len(rows), dtype=np.int64)
    cols_idx = np.empty(len(rows), dtype=np.int64)
    for r, row in enumerate(rows):
        student, item = row[sc].strip(), row[ic].strip()
        for col, value in ((sc, student), (ic, item)):
            if not value:
                raise ResponseDataError(f"{path}: line {lines[r]}, column {columns[col]!r}: "
                                        "empty value")
        s = s_pos.setdefault(student, len(s_pos))
        j = i_pos.setdefault(item, len(i_pos))
        if (s, j) in first:
            raise ResponseDataError(f"{path}: line {lines[r]}: duplicate response of student "
                                    f"{student!r} to item {item!r} (first on line "
                                    f"{first[s, j]})")
        first[s, j] = lines[r]
        rows_idx[r], cols_idx[r] = s, j
    r, m = _cells([[row[rc]] for row in rows], path, [columns[rc]], lines, graded=graded)
    resp = np.zeros((len(s_pos), len(i_pos)), dtype=np.float32)
    mask = np.zeros_like(resp, dtype=bool)
    keep = m[:, 0]
    resp[rows_idx[keep], cols_idx[keep]] = r[keep, 0]
    mask[rows_idx[keep], cols_idx[keep]] = True
    return Responses(torch.from_numpy(resp), torch.from_numpy(mask), list(s_pos), list(i_pos),
                     str(path))


def _read_jsonl(path: Path, graded: bool = False) -> Responses:
    ids: list[str] = []
    seen: dict[str, int] = {}
    item_pos: dict[str, int] = {}
    triples: list[tuple[int, int, float]] = []
    text = _read_text(path)
    if not text.strip():
        raise ResponseDataError(f"{path}: the file is empty (expected one JSON object a line: "
                                '{"subject_id": ..., "responses": {item: 0/1}})')
    for line_no, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
            raise ResponseDataError(f"{path}: line {line_no}: not JSON: {e}") from e
        if not isinstance(record, dict):
            raise ResponseDataError(f"{path}: line {line_no}: expected an object with "
                                    "'subject_id' and 'responses'")
        field = "subject_id" if "subject_id" in record or "student" not in record \
            else "student"
        raw = record.get(field)
        if raw is None:
            raise ResponseDataError(f"{path}: line {line_no}, field 'subject_id': "
                                    f"{'null' if field in record else 'missing'}")
        if isinstance(raw, bool) or not isinstance(raw, (str, int)):
            raise ResponseDataError(f"{path}: line {line_no}, field {field!r}: expected a "
                                    f"string or an integer, got {raw!r}")
        sid = str(raw).strip()
        if not sid:
            raise ResponseDataError(f"{path}: line {line_no}, field {field!r}: empty")
        if sid in seen:
            raise ResponseDataError(f"{path}: line {line_no}, field {field!r}: duplicate "
                                    f"student {sid!r} (first on line {seen[sid]})")
        seen[sid] = line_no
        if "responses" not in record:
            raise ResponseDataError(f"{path}: line {line_no}, field 'responses': missing")
        responses = record["responses"]
        if not isinstance(responses, dict):
            raise ResponseDataError(f"{path}: line {line_no}, field 'responses': expected "
                                    "an object {item: 0/1}")
        s = len(ids)
        ids.append(sid)
        for item, value in responses.items():
            if not item.strip():
                raise ResponseDataError(f"{path}: line {line_no}, field 'responses': empty "
                                        "item name")
            if value is None or value == "":
                continue
            if graded:  # an integer code, also written as a float (2.0)
                ok = isinstance(value, (int, float)) and not isinstance(value, bool) and \
                    float(value).is_integer() and 0 <= value <= MAX_CODE
            else:
                ok = isinstance(value, (int, float)) and value in (0, 1)
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


def _table(responses: np.ndarray | torch.Tensor | Responses,
           mask: np.ndarray | torch.Tensor | None, student_ids: list[str] | None,
           item_ids: list[str] | None) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """Codes (N, I) float, answered (N, I) bool and the ids a writer uses: a
    :class:`Responses` brings its own mask and ids; an array has NaN (or ``mask`` False) where
    missing and default ids s0, s1, ... and q1, q2, ...."""
    if isinstance(responses, Responses):
        data = responses
        mask = data.mask if mask is None else (
            data.mask & torch.as_tensor(np.asarray(mask)).bool())
        responses = data.responses
        student_ids, item_ids = student_ids or data.student_ids, item_ids or data.item_ids
    r = np.asarray(responses, dtype=np.float64)
    m = ~np.isnan(r) if mask is None else np.asarray(mask, dtype=bool) & ~np.isnan(r)
    students = list(student_ids or [f"s{s}" for s in range(r.shape[0])])
    items = list(item_ids or [f"q{j + 1}" for j in range(r.shape[1])])
    return r, m, students, items


def write_wide(path: str | Path, responses: np.ndarray | torch.Tensor | Responses,
               mask: np.ndarray | torch.Tensor | None = None,
               student_ids: list[str] | None = None, item_ids: list[str] | None = None
               ) -> Path:
    """Write answer codes (N, I) (0/1, or 0..K-1 for graded items) as the wide CSV that
    :func:`load_responses` reads: a ``student`` column (default ids s0, s1, ...), one
    column per item (default q1, q2, ...), a blank cell where ``mask`` is False or the
    value is NaN. ``responses`` may be a :class:`Responses` (its mask and ids). Returns the
    path."""
    r, m, students, items = _table(responses, mask, student_ids, item_ids)
    path = Path(path)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["student"] + items)
        for sid, row, ok in zip(students, r.tolist(), m.tolist()):
            w.writerow([sid] + [int(v) if o else "" for v, o in zip(row, ok)])
    return path


def write_jsonl(path: str | Path | Responses,
                responses: np.ndarray | torch.Tensor | Responses | str | Path,
                mask: np.ndarray | torch.Tensor | None = None,
                student_ids: list[str] | None = None, item_ids: list[str] | None = None
                ) -> Path:
    """Write answers in py-irt's jsonlines format (missing answers left out), with the
    arguments of :func:`write_wide`: ``write_jsonl(path, responses, mask)``. The older
    form ``write_jsonl(data, path)`` (a :class:`Responses` first) still works. Returns the
    path."""
    if isinstance(path, Responses):  # the older argument order (data, path)
        path, responses = responses, path
    r, m, students, items = _table(responses, mask, student_ids, item_ids)
    path = Path(path)
    with open(path, "w", encoding="utf-8") as f:
        for sid, row, ok in zip(students, r.tolist(), m.tolist()):
            answers = {item: int(v) for item, v, o in zip(items, row, ok) if o}
            f.write(json.dumps({"subject_id": sid, "responses": answers}) + "\n")
    return path
