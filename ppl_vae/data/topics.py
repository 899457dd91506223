"""Corpora for topic models: OCTIS folders or plain text, as sparse document-term counts.

A corpus becomes one sparse CSR tensor of word counts per split, shape (documents, V), float32.
The engine keeps it sparse on the device and densifies only each minibatch
(:class:`ppl_vae.batching.TensorBatches`), so large corpora fit.

Formats:
  * OCTIS folder (``corpus.tsv``: ``space-separated tokens<TAB>split<TAB>label`` with split in
    train/val/test; ``vocabulary.txt``: one word a line) -- :func:`load_octis`.
  * plain text: a file with one document a line, or a folder of ``*.txt`` files (one document
    each), tokenized and filtered by scikit-learn's ``CountVectorizer`` (optional extra
    ``ppl-vae[topics]``), split at random into train/val/test -- :func:`load_text`.

Validation happens before any training: malformed lines and unknown split names are errors
naming file, line and field; out-of-vocabulary tokens and empty documents are dropped with
one counted :class:`CorpusWarning`; new documents that share no word with a trained run's
vocabulary are an error (:func:`load_documents`).

New documents for a trained run become tokens the way its corpus's did (:class:`Tokenizer`,
kept in the run folder as ``tokenizer.json``). Every file is split into lines at ``\n``,
``\r\n`` or ``\r`` only, after its UTF-8 byte-order mark is dropped (:func:`document_lines`),
so a document's line number is the same wherever it is reported.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from ppl_vae.data import read_text

SPLITS = ("train", "val", "test")


class CorpusWarning(UserWarning):
    """Something in a corpus was dropped (out-of-vocabulary tokens, empty documents)."""


TOKEN_PATTERN = r"(?u)\b\w\w+\b"  # scikit-learn CountVectorizer's default


@dataclass(frozen=True)
class Tokenizer:
    """How a corpus's documents became tokens, so that new documents become tokens the same
    way (:func:`load_documents`); a run folder keeps it as ``tokenizer.json``.

    ``kind``:
      * ``whitespace`` -- OCTIS corpora (already preprocessed): the text before a line's
        first tab, split at whitespace, case kept;
      * ``countvectorizer`` -- plain text: the whole line through scikit-learn's
        ``CountVectorizer`` analyzer with ``lowercase``, ``token_pattern`` and
        ``stop_words`` (punctuation is not part of a token: ``"apple,"`` is ``apple``);
      * ``lowercase_whitespace`` -- the text before the first tab, lower-cased, split at
        whitespace: only for runs stored before ``tokenizer.json`` whose corpus no longer
        tells which of the two it was (what ``transform`` did for every run before).
    """

    kind: str = "lowercase_whitespace"
    lowercase: bool = True
    token_pattern: str = TOKEN_PATTERN
    stop_words: str | list[str] | None = None

    KINDS: ClassVar[tuple[str, ...]] = ("whitespace", "countvectorizer", "lowercase_whitespace")

    def text(self, line: str) -> str:
        """The part of a line that is the document (all of it, or the text before a tab)."""
        return line if self.kind == "countvectorizer" else line.split("\t")[0]

    def analyzer(self) -> Callable[[str], list[str]]:
        """A function from a document's text to its tokens."""
        if self.kind == "countvectorizer":
            return self.vectorizer().build_analyzer()
        if self.kind == "whitespace":
            return str.split
        return lambda text: text.lower().split()

    def vectorizer(self, **options: Any):
        """scikit-learn's ``CountVectorizer`` with these settings and ``options`` (min_df,
        max_df, max_features) -- for the ``countvectorizer`` kind."""
        try:
            from sklearn.feature_extraction.text import CountVectorizer
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("plain-text corpora need scikit-learn: pip install "
                              "'ppl-vae[topics]' (or give an OCTIS folder)") from e
        return CountVectorizer(lowercase=self.lowercase, token_pattern=self.token_pattern,
                               stop_words=self.stop_words, **options)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, stored: Any, where: str) -> Tokenizer:
        """A stored tokenizer (:meth:`to_json`); errors name ``where`` (the file), the field
        and its value."""
        if not isinstance(stored, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(stored).__name__}")
        unknown = sorted(set(stored) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"{where}: unknown field {unknown[0]!r}")
        checks = {"kind": lambda v: v in cls.KINDS,
                  "lowercase": lambda v: isinstance(v, bool),
                  "token_pattern": lambda v: isinstance(v, str),
                  "stop_words": lambda v: v is None or isinstance(v, str) or (
                      isinstance(v, list) and all(isinstance(w, str) for w in v))}
        for name, ok in checks.items():
            if name in stored and not ok(stored[name]):
                raise ValueError(f"{where}: field {name!r} has value {stored[name]!r}"
                                 + (f"; expected one of {', '.join(cls.KINDS)}"
                                    if name == "kind" else ""))
        return cls(**stored)


OCTIS_TOKENIZER = Tokenizer("whitespace", lowercase=False)  # OCTIS text is preprocessed


@dataclass
class TopicCorpus:
    """A corpus ready for training.

    Attributes:
        vocabulary: the V words; column v of the counts is ``vocabulary[v]``.
        counts: split name -> sparse CSR float32 tensor (documents, V) of word counts
            (empty documents left out).
        texts: every document's in-vocabulary tokens in order, all splits (the reference
            texts of NPMI, as OCTIS uses them).
        lines: split name -> the 1-based source line (or file index) of each counts row.
        source: where it was read from.
        documents: split name -> the 0-based position of each counts row among the corpus's
            documents (its non-blank lines, or files, in order: the row order of a document
            embedding matrix, :func:`load_embeddings`).
        num_documents: how many documents the source has (empty ones included).
        tokenizer: how the source's documents became tokens (:class:`Tokenizer`).
    """

    vocabulary: list[str]
    counts: dict[str, torch.Tensor]
    texts: list[list[str]]
    lines: dict[str, list[int]] = field(default_factory=dict)
    source: str = ""
    documents: dict[str, list[int]] = field(default_factory=dict)
    num_documents: int = 0
    tokenizer: Tokenizer = field(default_factory=Tokenizer)

    @property
    def vocab_size(self) -> int:
        return len(self.vocabulary)

    def split(self, name: str) -> torch.Tensor:
        """The counts of split ``name`` (sparse CSR (documents, V)); a clear error if empty."""
        if name not in self.counts or self.counts[name].shape[0] == 0:
            have = [k for k, v in self.counts.items() if v.shape[0]]
            raise ValueError(f"{self.source}: no documents in split {name!r} (splits with "
                             f"documents: {have})")
        return self.counts[name]


def sparse_counts(docs: list[np.ndarray], vocab_size: int) -> torch.Tensor:
    """Word-id arrays (one per document) -> sparse CSR float32 counts (documents, V)."""
    crow = [0]
    cols, vals = [], []
    for ids in docs:
        u, c = np.unique(ids, return_counts=True)
        cols.append(u)
        vals.append(c)
        crow.append(crow[-1] + len(u))
    col = np.concatenate(cols) if cols else np.zeros(0, np.int64)
    val = np.concatenate(vals) if vals else np.zeros(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        return torch.sparse_csr_tensor(torch.tensor(crow, dtype=torch.int64),
                                       torch.as_tensor(col, dtype=torch.int64),
                                       torch.as_tensor(val, dtype=torch.float32),
                                       size=(len(docs), vocab_size))


def _read_text(path: Path) -> str:
    return read_text(path, fix="convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8)")


def _lines(text: str) -> list[str]:
    """Lines split at \\n, \\r\\n or \\r (as reading a file in text mode does), never at
    the other characters ``str.splitlines`` breaks at (\\x0c, \\x85, U+2028 ...)."""
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def document_lines(path: str | os.PathLike) -> list[str]:
    """A text file's lines (UTF-8, the byte-order mark dropped; split as :func:`_lines`):
    element i is line i + 1 of the file. The one line splitting of every corpus reader, so
    line numbers agree everywhere."""
    return _lines(_read_text(Path(path)))


def read_vocabulary(path: str | os.PathLike) -> list[str]:
    """One word a line (text after a tab ignored, blank lines skipped); errors name the file
    and line of a repeated word or one containing whitespace."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no vocabulary file (one word a line)")
    words, seen = [], {}
    for i, line in enumerate(document_lines(path), start=1):
        word = line.strip().split("\t")[0].strip()
        if not word:
            continue
        if len(word.split()) > 1:
            raise ValueError(f"{path} line {i}: word {word!r} contains whitespace (documents "
                             "are split into tokens at whitespace, so it could never occur)")
        if word in seen:
            raise ValueError(f"{path} line {i}: word {word!r} repeats line {seen[word]}")
        seen[word] = i
        words.append(word)
    if not words:
        raise ValueError(f"{path}: the vocabulary is empty")
    return words


def _tokens_to_ids(docs: list[list[str]], index: dict[str, int], where: str,
                   line_numbers: list[int]) -> tuple[list[np.ndarray], list[list[str]]]:
    """Map tokens to ids, dropping out-of-vocabulary tokens with one counted warning."""
    ids, kept = [], []
    oov_tokens, oov_docs, examples = 0, 0, {}
    for tokens, line in zip(docs, line_numbers):
        good = [t for t in tokens if t in index]
        if len(good) != len(tokens):
            oov_docs += 1
            oov_tokens += len(tokens) - len(good)
            for t in tokens:
                if t not in index and len(examples) < 5:
                    examples.setdefault(t, line)
        kept.append(good)
        ids.append(np.fromiter((index[t] for t in good), dtype=np.int64, count=len(good)))
    if oov_tokens:
        shown = ", ".join(f"{w!r} (line {n})" for w, n in examples.items())
        warnings.warn(f"{where}: {oov_tokens} out-of-vocabulary tokens in {oov_docs} documents "
                      f"were dropped, e.g. {shown}", CorpusWarning, stacklevel=3)
    return ids, kept


def _drop_empty(ids: list[np.ndarray], lines: list[int], where: str
                ) -> tuple[list[np.ndarray], list[int]]:
    empty = [n for a, n in zip(ids, lines) if len(a) == 0]
    if empty:
        first = ", ".join(map(str, empty[:5]))
        warnings.warn(f"{where}: {len(empty)} empty documents (no in-vocabulary word) were "
                      f"left out, lines {first}{' ...' if len(empty) > 5 else ''}",
                      CorpusWarning, stacklevel=3)
    keep = [i for i, a in enumerate(ids) if len(a)]
    return [ids[i] for i in keep], [lines[i] for i in keep]


def load_octis(folder: str | os.PathLike) -> TopicCorpus:
    """Read an OCTIS dataset folder (``corpus.tsv`` + ``vocabulary.txt``).

    Each ``corpus.tsv`` line is ``tokens<TAB>split[<TAB>label]``; split is train, val or test.
    Returns a :class:`TopicCorpus` with counts for each split.
    """
    folder = Path(folder)
    corpus_path = folder / "corpus.tsv"
    if not corpus_path.exists():
        raise FileNotFoundError(f"{folder}: not an OCTIS corpus folder (no corpus.tsv)")
    vocabulary = read_vocabulary(folder / "vocabulary.txt")
    index = {w: i for i, w in enumerate(vocabulary)}
    docs: list[list[str]] = []
    splits: list[str] = []
    numbers: list[int] = []
    analyze = OCTIS_TOKENIZER.analyzer()
    for n, line in enumerate(document_lines(corpus_path), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2:
            raise ValueError(f"{corpus_path} line {n}: expected 'tokens<TAB>split"
                             f"[<TAB>label]', found {len(fields)} field (no tab)")
        split = fields[1].strip()
        if split not in SPLITS:
            raise ValueError(f"{corpus_path} line {n}: field 'split' is {split!r}; "
                             f"expected one of {', '.join(SPLITS)}")
        docs.append(analyze(fields[0]))
        splits.append(split)
        numbers.append(n)
    if not docs:
        raise ValueError(f"{corpus_path}: no documents")
    ids, texts = _tokens_to_ids(docs, index, str(corpus_path), numbers)
    rows = {name: [i for i, s in enumerate(splits) if s == name] for name in SPLITS}
    return _make_corpus(vocabulary, ids, numbers, rows, texts, str(corpus_path), str(folder),
                        OCTIS_TOKENIZER)


def _make_corpus(vocabulary: list[str], ids: list, numbers: list[int],
                 rows: dict[str, list[int]], texts: list, label: str,
                 source: str, tokenizer: Tokenizer) -> TopicCorpus:
    """Split documents (word ids, their line numbers) into train/val/test count matrices,
    dropping empty documents with one counted warning per split; ``label`` names the file in
    messages. Checks that the training split is usable."""
    counts, lines, documents = {}, {}, {}
    for name in SPLITS:
        part, part_lines = _drop_empty([ids[i] for i in rows[name]],
                                       [numbers[i] for i in rows[name]], f"{label} ({name})")
        counts[name] = sparse_counts(part, len(vocabulary))
        lines[name] = part_lines
        documents[name] = [i for i in rows[name] if len(ids[i])]
    if counts["train"].shape[0] == 0:
        have = [k for k, v in counts.items() if v.shape[0]]
        raise ValueError(f"{label}: no documents in split 'train' (splits with documents: "
                         f"{have})")
    return TopicCorpus(vocabulary, counts, texts, lines, source, documents, len(ids),
                       tokenizer)


def _text_documents(path: Path) -> tuple[list[str], list[int]]:
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise FileNotFoundError(f"{path}: no *.txt files (and no corpus.tsv)")
        return [_read_text(p) for p in files], list(range(1, len(files) + 1))
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such corpus file or folder")
    lines = document_lines(path)
    return lines, list(range(1, len(lines) + 1))


def load_text(path: str | os.PathLike, min_df: float = 2, max_df: float = 0.7,
              stop_words: str | None = "english", max_features: int | None = 5000,
              val_fraction: float = 0.15, test_fraction: float = 0.15,
              seed: int = 0) -> TopicCorpus:
    """Plain text (a file with one document a line, or a folder of ``*.txt`` files) through
    scikit-learn's ``CountVectorizer`` (``min_df``, ``max_df``, ``stop_words``,
    ``max_features`` as there; its default lower-casing and token pattern, the corpus's
    :class:`Tokenizer`), split at random (``seed``) into train/val/test."""
    tokenizer = Tokenizer("countvectorizer", stop_words=stop_words)
    vectorizer = tokenizer.vectorizer(min_df=min_df, max_df=max_df,
                                      max_features=max_features)
    path = Path(path)
    raw, numbers = _text_documents(path)
    keep = [i for i, t in enumerate(raw) if t.strip()]
    if len(keep) < 3:
        raise ValueError(f"{path}: {len(keep)} non-empty documents; need at least 3")
    raw, numbers = [raw[i] for i in keep], [numbers[i] for i in keep]
    try:
        vectorizer.fit(raw)
    except ValueError as e:
        raise ValueError(f"{path}: no vocabulary left after filtering ({e}); lower min_df "
                         "or raise max_df") from e
    vocabulary = list(vectorizer.get_feature_names_out())
    index = {w: i for i, w in enumerate(vocabulary)}
    analyzer = vectorizer.build_analyzer()
    tokens = [[t for t in analyzer(doc) if t in index] for doc in raw]
    ids = [np.fromiter((index[t] for t in doc), dtype=np.int64, count=len(doc))
           for doc in tokens]
    order = np.random.default_rng(seed).permutation(len(raw))
    n_test = int(round(test_fraction * len(raw)))
    n_val = int(round(val_fraction * len(raw)))
    parts = {"test": order[:n_test], "val": order[n_test:n_test + n_val],
             "train": order[n_test + n_val:]}
    rows = {name: sorted(parts[name].tolist()) for name in SPLITS}
    return _make_corpus(vocabulary, ids, numbers, rows, tokens, str(path), str(path),
                        tokenizer)


def load_corpus(path: str | os.PathLike, **text_options) -> TopicCorpus:
    """An OCTIS folder (has ``corpus.tsv``) or plain text (see :func:`load_text`)."""
    path = Path(path)
    if (path / "corpus.tsv").exists():
        return load_octis(path)
    if (path / "vocabulary.txt").exists():
        raise FileNotFoundError(f"{path}: vocabulary.txt but no corpus.tsv; an OCTIS folder "
                                "needs both (a folder of plain-text documents holds *.txt "
                                "files and no vocabulary.txt)")
    return load_text(path, **text_options)


@dataclass
class NewDocuments:
    """New documents for a trained run (:func:`load_documents`).

    Attributes:
        counts: sparse CSR float32 counts (documents, V), one row per non-blank line, in
            line order.
        lines: the 1-based file line of each row.
        tokens: each row's in-vocabulary tokens, in order.
        empty: how many rows have no in-vocabulary word (all-zero rows).
    """

    counts: torch.Tensor
    lines: list[int]
    tokens: list[list[str]]
    empty: int


def load_documents(path: str | os.PathLike, vocabulary: list[str],
                   tokenizer: Tokenizer | None = None) -> NewDocuments:
    """New documents for a trained run, one a line, made into tokens by the run's corpus's
    ``tokenizer`` (default: the text before a tab, lower-cased, split at whitespace) and
    counted against its ``vocabulary``.

    Lines are :func:`document_lines`'s; a line is a document when its text
    (:meth:`Tokenizer.text`) is not blank. Out-of-vocabulary tokens are dropped with one
    counted :class:`CorpusWarning`, and documents left without a word are another (their
    rows are zero: the encoder's answer for an empty document). A file that shares no word
    with the vocabulary is an error (wrong run or wrong preprocessing).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such documents file")
    tokenizer = tokenizer or Tokenizer()
    analyze = tokenizer.analyzer()
    index = {w: i for i, w in enumerate(vocabulary)}
    docs, numbers = [], []
    for n, line in enumerate(document_lines(path), start=1):
        text = tokenizer.text(line)
        if text.strip():
            docs.append(analyze(text))
            numbers.append(n)
    if not docs:
        raise ValueError(f"{path}: no documents (every line is blank)")
    ids, kept = _tokens_to_ids(docs, index, str(path), numbers)
    total = sum(len(d) for d in docs)
    if sum(len(a) for a in ids) == 0:
        first = next((i for i, d in enumerate(docs) if d), 0)
        raise ValueError(f"{path}: vocabulary mismatch: none of its {total} tokens is in the "
                         f"run's vocabulary of {len(vocabulary)} words (e.g. "
                         f"{docs[first][:3]} on line {numbers[first]}); were the documents "
                         "preprocessed like the training corpus?")
    empty = [n for a, n in zip(ids, numbers) if len(a) == 0]
    if empty:
        warnings.warn(f"{path}: {len(empty)} documents have no in-vocabulary word (lines "
                      f"{', '.join(map(str, empty[:5]))}{' ...' if len(empty) > 5 else ''}); "
                      "their topic proportions are the encoder's answer for an empty "
                      "document", CorpusWarning, stacklevel=2)
    return NewDocuments(sparse_counts(ids, len(vocabulary)), numbers, kept, len(empty))


def read_documents(path: str | os.PathLike, vocabulary: list[str],
                   tokenizer: Tokenizer | None = None) -> tuple[torch.Tensor, int]:
    """:func:`load_documents`'s ``(counts, empty)``: sparse CSR float32 counts (documents,
    V) in line order (blank lines skipped) and how many documents had no in-vocabulary
    word."""
    docs = load_documents(path, vocabulary, tokenizer)
    return docs.counts, docs.empty


def read_embeddings(path: str | os.PathLike, num_documents: int,
                    what: str = "the corpus") -> torch.Tensor:
    """Document embeddings (CTM's contextual encoder input) from a NumPy ``.npy`` file.

    The file holds a float matrix (documents, E), one row per document of ``what`` in its
    order (for a corpus: its non-blank lines or files, :attr:`TopicCorpus.documents`).
    Returns a float32 tensor (documents, E). Errors name the file and the problem: missing,
    not a ``.npy`` array, not 2-D, not numbers, a row count other than ``num_documents``,
    NaN or infinite values (the first bad row).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such embeddings file (a .npy matrix, one row per "
                                f"document of {what})")
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"{path}: not a NumPy .npy array ({e}); save the embeddings with "
                         "numpy.save(path, matrix)") from e
    if not isinstance(array, np.ndarray) or array.ndim != 2:
        shape = getattr(array, "shape", None)
        raise ValueError(f"{path}: embeddings must be a 2-D matrix (documents, E), got shape "
                         f"{shape}")
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise ValueError(f"{path}: embeddings must be numbers, got dtype {array.dtype}")
    if array.shape[0] != num_documents:
        raise ValueError(f"{path}: {array.shape[0]} rows of embeddings, but {what} has "
                         f"{num_documents} documents (one row per document, in order)")
    if array.shape[1] == 0:
        raise ValueError(f"{path}: embeddings have 0 columns")
    finite = np.isfinite(array).all(axis=1)
    if not finite.all():
        bad = np.nonzero(~finite)[0]
        raise ValueError(f"{path}: {len(bad)} rows of embeddings hold NaN or infinite values, "
                         f"first row {int(bad[0])} (0-based)")
    return torch.as_tensor(array, dtype=torch.float32)
