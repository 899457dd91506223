"""Data readers on bad input: a clear error naming file, line and field, or the right table.

Regression tests for the cases of issue 14 (BOM, short rows, null ids, empty / non-UTF-8 /
header-only files, truncated Fashion-MNIST .gz and its cache) and property-based tests
(hypothesis): any bytes, or random tables, give an error of the reader's type that names
the file, or a table equal to what was written.
"""

from __future__ import annotations

import csv
import gzip
import json
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ppl_vae.data import images
from ppl_vae.data.irt import (
    ID_COLUMNS,
    ResponseDataError,
    from_arrays,
    load_responses,
    write_jsonl,
)
from ppl_vae.data.topics import load_octis, load_text, read_documents

pytestmark = [pytest.mark.filterwarnings("ignore:.*answered all their items"),
              pytest.mark.filterwarnings("ignore::UserWarning")]

PROPERTY = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])

WIDE = "student,q1,q2,q3\nann,1,0,\nbob,,1,1\ncid,0,0,1\n"
LONG = "student,item,response\nann,q1,1\nann,q2,0\nbob,q2,1\nbob,q3,1\ncid,q1,0\n"


def write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# ---- regression tests -----------------------------------------------------------------------

@pytest.mark.parametrize("text", [WIDE, LONG], ids=["wide", "long"])
def test_utf8_bom_csv_reads_like_plain_utf8(tmp_path, text):
    plain = load_responses(write_bytes(tmp_path / "plain.csv", text.encode()), check=False)
    bom = load_responses(write_bytes(tmp_path / "bom.csv", b"\xef\xbb\xbf" + text.encode()),
                         check=False)  # Excel's "CSV UTF-8"
    assert bom.student_ids == plain.student_ids == ["ann", "bob", "cid"]
    assert bom.item_ids == plain.item_ids == ["q1", "q2", "q3"]
    assert torch.equal(bom.responses, plain.responses) and torch.equal(bom.mask, plain.mask)


def test_utf8_bom_in_corpus_files(tmp_path):
    folder = tmp_path / "octis"
    folder.mkdir()
    write_bytes(folder / "vocabulary.txt", b"\xef\xbb\xbfw0\nw1\n")
    write_bytes(folder / "corpus.tsv", b"\xef\xbb\xbfw0 w1\ttrain\t0\nw0\ttrain\t0\n")
    corpus = load_octis(folder)
    assert corpus.vocabulary == ["w0", "w1"]
    assert corpus.counts["train"].to_dense().tolist() == [[1.0, 1.0], [1.0, 0.0]]


@pytest.mark.parametrize("text, expected", [
    ("student,q1,q2,q3\nann,1,0,1\nbob,1,0\n",
     r"w\.csv: line 3: 3 fields but the header \(line 1\) has 4: missing fields"),
    ("student,q1,q2,q3\nann,1,0,1,1\n",
     r"w\.csv: line 2: 5 fields but the header \(line 1\) has 4: extra fields"),
    ("student,item,response\nann,q1,1\n\nbob,q2\n",
     r"w\.csv: line 4: 2 fields but the header \(line 1\) has 3"),
    ('student,q1,q2\n"ann\nsmith",1,0\nbob,1\n', r"w\.csv: line 4: 2 fields"),
])
def test_short_or_long_rows_are_errors_naming_file_and_line(tmp_path, text, expected):
    with pytest.raises(ResponseDataError, match=expected):
        load_responses(write_bytes(tmp_path / "w.csv", text.encode()))


def test_line_numbers_count_blank_lines(tmp_path):
    with pytest.raises(ResponseDataError, match=r"line 5, column 'q2': value 'x'"):
        load_responses(write_bytes(tmp_path / "w.csv", b"student,q1,q2\n\nann,1,0\n\nbob,0,x\n"))
    with pytest.raises(ResponseDataError, match=r"line 5 \(student 'bob'\) has no responses"):
        load_responses(write_bytes(tmp_path / "w.csv", b"student,q1,q2\n\nann,1,0\n\nbob,,\n"))


@pytest.mark.parametrize("record, expected", [
    ({"subject_id": None, "responses": {"q1": 1}}, r"line 2, field 'subject_id': null"),
    ({"responses": {"q1": 1}}, r"line 2, field 'subject_id': missing"),
    ({"subject_id": "  ", "responses": {"q1": 1}}, r"line 2, field 'subject_id': empty"),
    ({"subject_id": ["b"], "responses": {"q1": 1}},
     r"line 2, field 'subject_id': expected a string or an integer"),
    ({"subject_id": True, "responses": {"q1": 1}}, r"line 2, field 'subject_id': expected"),
    ({"subject_id": "b"}, r"line 2, field 'responses': missing"),
    ({"subject_id": "b", "responses": [1, 0]}, r"line 2, field 'responses': expected an obj"),
    ({"subject_id": "b", "responses": {"q1": 0.5}}, r"line 2, field 'responses.q1': value 0.5"),
    ({"subject_id": "b", "responses": {"q1": "1"}}, r"line 2, field 'responses.q1': value '1'"),
])
def test_jsonl_bad_ids_and_fields_name_file_line_and_field(tmp_path, record, expected):
    first = json.dumps({"subject_id": "a", "responses": {"q1": 0}})
    path = write_bytes(tmp_path / "j.jsonl", f"{first}\n{json.dumps(record)}\n".encode())
    with pytest.raises(ResponseDataError, match=r"j\.jsonl: " + expected):
        load_responses(path)


def test_jsonl_integer_ids_and_the_student_alias(tmp_path):
    path = write_bytes(tmp_path / "j.jsonl", b'{"subject_id": 7, "responses": {"q1": 1}}\n'
                                             b'{"student": "b", "responses": {"q1": 0}}\n')
    assert load_responses(path, check=False).student_ids == ["7", "b"]


OCTIS_VOCAB = b"w0\nw1\n"
OCTIS_CORPUS = b"w0 w1\ttrain\t0\n"


def _octis(folder: Path, corpus: bytes = OCTIS_CORPUS, vocab: bytes = OCTIS_VOCAB) -> Path:
    folder.mkdir(exist_ok=True)
    write_bytes(folder / "corpus.tsv", corpus)
    write_bytes(folder / "vocabulary.txt", vocab)
    return folder


@pytest.mark.parametrize("name, data, expected", [
    ("w.csv", b"", r"w\.csv: the file is empty"),
    ("w.csv", b"\n\n  \n", r"w\.csv: the file is empty"),
    ("w.csv", b"student,q1,q2\n", r"w\.csv: only a header line, no data rows"),
    ("w.csv", b"student,q1,q2\r\n\r\n", r"w\.csv: only a header line"),
    ("w.csv", b"student,q1\nann,1\nb\xe9b,0\n", r"w\.csv: line 3: byte 0xe9 .* is not UTF-8"),
    ("w.csv", b"\xff\xfes\x00t\x00", r"w\.csv: line 1: byte 0xff"),  # UTF-16
    ("w.csv", b"student,,q2\nann,1,0\n", r"w\.csv: line 1, column 2: empty column name"),
    ("w.csv", b"student\nann\n", r"w\.csv: no item columns"),
    ("l.csv", b"student,item,response\n", r"l\.csv: only a header line"),
    ("j.jsonl", b"", r"j\.jsonl: the file is empty"),
    ("j.jsonl", b'{"subject_id": "\xe9"}\n', r"j\.jsonl: line 1: byte 0xe9"),
    ("j.jsonl", b'{"subject_id": "a", "responses": {}\n', r"j\.jsonl: line 1: not JSON"),
    ("j.jsonl", b"[" * 100000 + b"\n", r"j\.jsonl: line 1: not JSON"),
    ("j.jsonl", b"1" * 5000 + b"\n", r"j\.jsonl: line 1: not JSON"),
])
def test_empty_non_utf8_and_header_only_response_files(tmp_path, name, data, expected):
    with pytest.raises(ResponseDataError, match=expected):
        load_responses(write_bytes(tmp_path / name, data))


@pytest.mark.parametrize("corpus, vocab, expected", [
    (b"", OCTIS_VOCAB, r"corpus\.tsv: no documents"),
    (OCTIS_CORPUS, b"", r"vocabulary\.txt: the vocabulary is empty"),
    (b"w0 \xe9\ttrain\t0\n", OCTIS_VOCAB, r"corpus\.tsv line 1: byte 0xe9 .* not UTF-8"),
    (OCTIS_CORPUS, b"w0\n\xc3(\n", r"vocabulary\.txt line 2: byte 0xc3"),
    (OCTIS_CORPUS, b"w0\nw 1\n", r"vocabulary\.txt line 2: word 'w 1' contains whitespace"),
    (b"w0 w1\ttest\t0\n", OCTIS_VOCAB, r"corpus\.tsv: no documents in split 'train'"),
    (b"zz\ttrain\t0\nw0\ttest\t0\n", OCTIS_VOCAB, r"corpus\.tsv: no documents in split 'train'"),
])
def test_bad_octis_files_name_the_file(tmp_path, corpus, vocab, expected):
    with pytest.raises(ValueError, match=expected):
        load_octis(_octis(tmp_path / "c", corpus, vocab))


@pytest.mark.parametrize("data, expected", [
    (b"", r"docs\.txt: 0 non-empty documents"),
    (b"apple pie\nbanana \xff split\ncherry tart\n", r"docs\.txt line 2: byte 0xff"),
])
def test_bad_plain_text_names_the_file(tmp_path, data, expected):
    path = write_bytes(tmp_path / "docs.txt", data)
    with pytest.raises(ValueError, match=expected):
        load_text(path, min_df=1, max_df=1.0, stop_words=None)
    folder = tmp_path / "folder"
    folder.mkdir()
    write_bytes(folder / "a.txt", b"fine words here")
    write_bytes(folder / "b.txt", b"caf\xe9 au lait")
    with pytest.raises(ValueError, match=r"b\.txt line 1: byte 0xe9"):
        load_text(folder, min_df=1, max_df=1.0, stop_words=None)
    with pytest.raises(ValueError, match=r"b\.txt line 1: byte 0xe9"):
        read_documents(folder / "b.txt", ["au"])


# ---- Fashion-MNIST idx files ---------------------------------------------------------------

def idx_bytes(array: np.ndarray) -> bytes:
    head = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big")
                                                   for d in array.shape)
    return head + array.astype(np.uint8).tobytes()


@pytest.fixture
def mnist_folder(tmp_path, monkeypatch):
    """A folder with a tiny gzipped test split (3 images) and an empty cache."""
    monkeypatch.setattr(images, "CACHE_DIR", tmp_path / "cache")
    monkeypatch.setattr(images, "DEBIAN_DIR", tmp_path / "nothing")
    folder = tmp_path / "data"
    folder.mkdir()
    pixels = np.arange(3 * 28 * 28).reshape(3, 28, 28) % 256
    write_bytes(folder / "t10k-images-idx3-ubyte.gz", gzip.compress(idx_bytes(pixels)))
    write_bytes(folder / "t10k-labels-idx1-ubyte.gz", gzip.compress(idx_bytes(np.array([3, 1,
                                                                                        4]))))
    return folder, pixels


def cache_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.is_file())


def test_gz_unpacks_once_into_the_cache_with_nothing_left_over(mnist_folder, tmp_path):
    folder, pixels = mnist_folder
    x, y = images.load_fashion_mnist(folder, split="test")
    assert torch.equal(x, torch.from_numpy(pixels).float() / 255) and y.tolist() == [3, 1, 4]
    cached = cache_files(tmp_path / "cache")
    assert len(cached) == 2 and not any(n.endswith(".tmp") for n in cached)
    x2, _ = images.load_fashion_mnist(folder, split="test")  # from the cache
    assert torch.equal(x, x2) and cache_files(tmp_path / "cache") == cached


@pytest.mark.parametrize("damage, expected", [
    (lambda gz: gz[:len(gz) // 2], r"t10k-images-idx3-ubyte\.gz: not a readable gzip file"),
    (lambda gz: gz[:-6], r"t10k-images-idx3-ubyte\.gz: not a readable gzip file"),
    (lambda gz: b"not gzip at all", r"t10k-images-idx3-ubyte\.gz: not a readable gzip file"),
    (lambda gz: gzip.compress(b"\x00\x00\x09\x03" + gzip.decompress(gz)[4:]),
     r"t10k-images-idx3-ubyte\.gz .*: not an idx file of unsigned bytes with 3 dimensions "
     r"\(magic number 00000903"),
    (lambda gz: gzip.compress(gzip.decompress(gz)[:-10]),
     r"t10k-images-idx3-ubyte\.gz .*: 2358 bytes but the header \(shape \(3, 28, 28\)\) "
     r"needs 2368; the file is truncated"),
    (lambda gz: gzip.compress(gzip.decompress(gz) + b"extra"), r"the file is too long"),
    (lambda gz: gzip.compress(b""), r"magic number missing"),
])
def test_damaged_gz_is_an_error_naming_the_file_and_leaves_no_temp(mnist_folder, tmp_path,
                                                                   damage, expected):
    folder, _ = mnist_folder
    gz = folder / "t10k-images-idx3-ubyte.gz"
    gz.write_bytes(damage(gz.read_bytes()))
    with pytest.raises(ValueError, match=expected):
        images.load_fashion_mnist(folder, split="test")
    assert not any(n.endswith(".tmp") for n in cache_files(tmp_path / "cache"))


def test_bad_labels_and_plain_idx_errors(mnist_folder):
    folder, pixels = mnist_folder
    write_bytes(folder / "t10k-labels-idx1-ubyte.gz", gzip.compress(idx_bytes(np.array([3, 1,
                                                                                        12]))))
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte\.gz: label 12 outside 0\.\.9"):
        images.load_fashion_mnist(folder, split="test")
    plain = write_bytes(folder / "t10k-images-idx3-ubyte", idx_bytes(pixels)[:100])
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte: 100 bytes .* truncated"):
        images._read_idx(plain)


def test_concurrent_first_loads_use_unique_temp_files(mnist_folder, tmp_path, monkeypatch):
    folder, pixels = mnist_folder
    names: list[str] = []
    real = images.tempfile.mkstemp

    def spy(*args, **kwargs):
        fd, name = real(*args, **kwargs)
        names.append(name)
        return fd, name

    monkeypatch.setattr(images.tempfile, "mkstemp", spy)
    start = threading.Barrier(4)
    results, errors = [], []

    def load():
        start.wait()
        try:
            results.append(images._read_idx(folder / "t10k-images-idx3-ubyte.gz"))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 4
    assert all(torch.equal(r, torch.from_numpy(pixels).to(torch.uint8)) for r in results)
    assert len(set(names)) == len(names) >= 1
    assert all(Path(n).parent == tmp_path / "cache" / "idx" for n in names)
    assert not any(n.endswith(".tmp") for n in cache_files(tmp_path / "cache"))


# ---- property-based tests ------------------------------------------------------------------

def check_table(data) -> None:
    """Invariants of any table a reader returns."""
    n, k = data.responses.shape
    assert data.mask.shape == (n, k) and len(data.student_ids) == n and len(data.item_ids) == k
    assert len(set(data.student_ids)) == n and len(set(data.item_ids)) == k
    assert bool((data.responses[~data.mask] == 0).all())
    assert bool(((data.responses == 0) | (data.responses == 1))[data.mask].all())


def read_or_error(path: Path, **options):
    """The table, or None after checking the error names the file."""
    try:
        data = load_responses(path, **options)
    except ResponseDataError as e:
        assert str(path) in str(e)
        return None
    check_table(data)
    return data


@PROPERTY
@given(data=st.binary(max_size=400), suffix=st.sampled_from([".csv", ".jsonl"]),
       format=st.sampled_from(["auto", "wide", "long"]), check=st.booleans())
def test_any_bytes_give_a_response_table_or_a_clear_error(tmp_path, data, suffix, format,
                                                          check):
    if suffix == ".jsonl":
        format = "auto"
    read_or_error(write_bytes(tmp_path / f"r{suffix}", data), format=format, check=check)


@PROPERTY
@given(lines=st.lists(st.text(alphabet=st.sampled_from(list('01,\n\r" aNstudentiemrpoq\t')),
                              max_size=30), max_size=8))
def test_csv_like_text_gives_a_table_or_a_clear_error(tmp_path, lines):
    read_or_error(write_bytes(tmp_path / "r.csv", "\n".join(lines).encode()), check=False)


def _name(text: str) -> bool:
    return bool(text.strip()) and text == text.strip()


names = st.text(min_size=1, max_size=8).filter(_name)
item_names = names.filter(lambda t: t.lower() not in ID_COLUMNS)


@st.composite
def response_tables(draw):
    """Random responses (N, I) with a mask, every student and item answered at least once."""
    n = draw(st.integers(1, 6))
    k = draw(st.integers(1, 5))
    ids = draw(st.lists(names, min_size=n, max_size=n, unique=True))
    items = draw(st.lists(item_names, min_size=k, max_size=k, unique_by=str.lower))
    values = np.array(draw(st.lists(st.integers(0, 1), min_size=n * k, max_size=n * k)),
                      dtype=np.float32).reshape(n, k)
    mask = np.array(draw(st.lists(st.booleans(), min_size=n * k, max_size=n * k))).reshape(n, k)
    mask[np.arange(n), np.arange(n) % k] = True
    mask[np.arange(k) % n, np.arange(k)] = True
    return from_arrays(np.where(mask, values, np.nan), student_ids=ids, item_ids=items,
                       check=False)


def write_wide(data, path: Path, spellings: dict[float, str], missing: str) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow(["student"] + data.item_ids)
        for s, sid in enumerate(data.student_ids):
            out.writerow([sid] + [spellings[float(v)] if m else missing
                                  for v, m in zip(data.responses[s].tolist(),
                                                  data.mask[s].tolist())])
    return path


def write_long(data, path: Path) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow(["student", "item", "response"])
        for s, sid in enumerate(data.student_ids):
            for j, item in enumerate(data.item_ids):
                if data.mask[s, j]:
                    out.writerow([sid, item, int(data.responses[s, j])])
    return path


def assert_same(back, data) -> None:
    assert back.student_ids == data.student_ids and back.item_ids == data.item_ids
    assert torch.equal(back.mask, data.mask) and torch.equal(back.responses, data.responses)


@PROPERTY
@given(data=response_tables(), one=st.sampled_from(["1", "1.0", " 1 "]),
       zero=st.sampled_from(["0", "0.0", "0 "]), missing=st.sampled_from(["", "NA", "nan", " "]),
       bom=st.booleans())
def test_written_responses_read_back_the_same(tmp_path, data, one, zero, missing, bom):
    wide = write_wide(data, tmp_path / "w.csv", {1.0: one, 0.0: zero}, missing)
    if bom:
        wide.write_bytes(b"\xef\xbb\xbf" + wide.read_bytes())
    assert_same(load_responses(wide, check=False), data)
    # long and jsonl list items in order of first appearance
    long = load_responses(write_long(data, tmp_path / "l.csv"), check=False)
    assert sorted(long.item_ids) == sorted(data.item_ids)
    assert_same(long.align(data.item_ids), data)
    write_jsonl(data, tmp_path / "j.jsonl")
    jsonl = load_responses(tmp_path / "j.jsonl", check=False)
    assert sorted(jsonl.item_ids) == sorted(data.item_ids)
    assert_same(jsonl.align(data.item_ids), data)


VALID = {"": None, "na": None, "nan": None, "1": 1.0, "1.0": 1.0, "0": 0.0, "0.0": 0.0}
cells = st.one_of(st.sampled_from(["0", "1", "", "NA", "1.0", " 0"]), st.text(max_size=4))


@PROPERTY
@given(ids=st.lists(names, min_size=1, max_size=5, unique=True),
       items=st.lists(item_names, min_size=1, max_size=4, unique=True),
       data=st.data())
def test_random_cells_give_the_table_or_an_error_naming_line_and_column(tmp_path, ids, items,
                                                                        data):
    rows = [data.draw(st.lists(cells, min_size=len(items), max_size=len(items)))
            for _ in ids]
    path = tmp_path / "w.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["student"] + items] + [[s] + r for s, r in zip(ids, rows)])
    bad = [(s, j) for s, row in enumerate(rows) for j, c in enumerate(row)
           if c.strip().lower() not in VALID]
    if bad:
        s, j = bad[0]
        with pytest.raises(ResponseDataError) as info:
            load_responses(path, check=False)
        message = str(info.value)
        assert str(path) in message and f"column {items[j]!r}" in message
        if not any(ch in c for row in [ids + items] + rows for c in row for ch in "\r\n"):
            assert f"line {s + 2}," in message
        return
    back = load_responses(path, check=False)
    expected = np.array([[VALID[c.strip().lower()] if VALID[c.strip().lower()] is not None
                          else np.nan for c in row] for row in rows], dtype=np.float32)
    assert back.student_ids == ids and back.item_ids == items
    assert back.mask.tolist() == (~np.isnan(expected)).tolist()
    assert back.responses.tolist() == np.nan_to_num(expected).tolist()


@PROPERTY
@given(records=st.lists(st.one_of(
    st.fixed_dictionaries({"subject_id": st.one_of(names, st.none(), st.integers(0, 99),
                                                    st.just("")),
                           "responses": st.dictionaries(names, st.one_of(
                               st.sampled_from([0, 1, None, 2, 0.5, "1", True])))}),
    st.dictionaries(st.text(max_size=3), st.one_of(st.none(), st.integers(), st.text()))),
    max_size=5))
def test_random_jsonl_records_give_the_table_or_a_clear_error(tmp_path, records):
    path = tmp_path / "j.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    data = read_or_error(path, check=False)
    if data is None:
        return
    # a table came back: every record was valid, and it holds exactly their answers
    assert data.student_ids == [str(r["subject_id"]) for r in records]
    for s, record in enumerate(records):
        answers = {i: float(v) for i, v in record["responses"].items() if v is not None}
        got = {data.item_ids[j]: float(data.responses[s, j])
               for j in range(data.num_items) if data.mask[s, j]}
        assert got == answers


# ---- corpora -------------------------------------------------------------------------------

def corpus_error_names_a_file(error: ValueError, *paths: Path) -> None:
    assert any(str(p) in str(error) for p in paths), str(error)


@PROPERTY
@given(corpus=st.binary(max_size=300), vocab=st.binary(max_size=100))
def test_any_bytes_give_an_octis_corpus_or_a_clear_error(tmp_path, corpus, vocab):
    folder = _octis(tmp_path / "octis", corpus, vocab)
    try:
        loaded = load_octis(folder)
    except ValueError as e:
        corpus_error_names_a_file(e, folder / "corpus.tsv", folder / "vocabulary.txt")
        return
    assert loaded.counts["train"].shape[0] > 0
    assert all(c.shape[1] == len(loaded.vocabulary) for c in loaded.counts.values())


words = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc", "Zs", "Zl", "Zp")),
                min_size=1, max_size=6).filter(lambda w: not any(ch.isspace() for ch in w))


@PROPERTY
@given(vocabulary=st.lists(words, min_size=1, max_size=8, unique=True), data=st.data())
def test_octis_corpus_written_reads_back_the_same_counts(tmp_path, vocabulary, data):
    docs = data.draw(st.lists(st.tuples(
        st.lists(st.integers(0, len(vocabulary)), max_size=6),  # index len(vocab): OOV
        st.sampled_from(["train", "val", "test"])), min_size=1, max_size=8))
    folder = tmp_path / "octis"
    tokens = [[vocabulary[i] if i < len(vocabulary) else "\u2603oov" for i in ids]
              for ids, _ in docs]
    _octis(folder, "".join(f"{' '.join(t)}\t{s}\tlabel\n" for t, (_, s) in zip(tokens, docs)
                           ).encode(), "".join(w + "\n" for w in vocabulary).encode())
    expected = {s: [] for s in ("train", "val", "test")}
    for ids, split in docs:
        row = np.bincount([i for i in ids if i < len(vocabulary)], minlength=len(vocabulary)
                          )[:len(vocabulary)]
        if row.sum():
            expected[split].append(row.tolist())
    if not expected["train"]:
        with pytest.raises(ValueError, match="no documents in split 'train'") as info:
            load_octis(folder)
        corpus_error_names_a_file(info.value, folder / "corpus.tsv")
        return
    loaded = load_octis(folder)
    assert loaded.vocabulary == vocabulary
    for split, rows in expected.items():
        assert loaded.counts[split].to_dense().tolist() == [[float(c) for c in r] for r in rows]


@PROPERTY
@given(data=st.one_of(st.binary(max_size=300),
                      st.lists(st.text(max_size=20), max_size=10).map(
                          lambda lines: "\n".join(lines).encode())))
def test_any_bytes_give_a_text_corpus_or_a_clear_error(tmp_path, data):
    path = write_bytes(tmp_path / "docs.txt", data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            corpus = load_text(path, min_df=1, max_df=1.0, stop_words=None)
        except ValueError as e:
            corpus_error_names_a_file(e, path)
            return
    text = data.decode("utf-8-sig")
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    assert sum(c.shape[0] for c in corpus.counts.values()) <= sum(bool(t.strip())
                                                                   for t in lines)
    for split, numbers in corpus.lines.items():
        assert len(numbers) == corpus.counts[split].shape[0]
        assert all(lines[n - 1].strip() for n in numbers)
        dense = corpus.counts[split].to_dense()
        assert bool((dense >= 0).all()) and bool((dense.sum(1) > 0).all())


@PROPERTY
@given(data=st.binary(max_size=300))
def test_any_bytes_give_documents_or_a_clear_error(tmp_path, data):
    path = write_bytes(tmp_path / "new.txt", data)
    try:
        counts, empty = read_documents(path, ["a", "b", "\u00e9"])
    except ValueError as e:
        corpus_error_names_a_file(e, path)
        return
    assert counts.shape[1] == 3 and 0 <= empty <= counts.shape[0]


def test_a_folder_named_for_the_data_is_the_only_one_looked_in(mnist_folder, tmp_path,
                                                               monkeypatch):
    """--data DIR (root=) naming an existing folder without the Fashion-MNIST files fell back
    silently to $PPL_VAE_DATA and the Debian package's copy (and the run recorded DIR). It is
    now an error naming DIR; an OCTIS folder missing its corpus.tsv is named as such, not
    read as a folder of *.txt documents (its vocabulary.txt as the only one)."""
    from ppl_vae.data.images import load_fashion_mnist
    from ppl_vae.data.topics import load_corpus

    elsewhere, _ = mnist_folder
    monkeypatch.setenv("PPL_VAE_DATA", str(elsewhere))
    assert load_fashion_mnist(split="test")[0].shape[0] == 3  # found there when not named
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=f"not found in: {empty}"):
        load_fashion_mnist(split="test", root=empty)
    octis = tmp_path / "octis"
    octis.mkdir()
    (octis / "vocabulary.txt").write_text("apple\nbanana\ncherry\n")
    with pytest.raises(FileNotFoundError, match="vocabulary.txt but no corpus.tsv"):
        load_corpus(octis)
