"""Readers and validators of the families' data (images, exam tables, corpora), and
downloads by name (:mod:`ppl_vae.data.fetch`)."""

from __future__ import annotations

from pathlib import Path


def read_text(path: Path, error: type[Exception] = ValueError, where: str = " line",
              fix: str = "convert the file to UTF-8") -> str:
    """A file's text (UTF-8, an optional byte-order mark dropped). An unreadable file or
    non-UTF-8 bytes raise ``error`` naming the file and line (``f"{path}{where} N: ..."``)
    and ``fix``."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise error(f"{path}: cannot read the file ({e.strerror or e})") from e
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise error(f"{path}{where} {line}: byte {data[e.start]:#04x} at offset {e.start} is "
                    f"not UTF-8; {fix}") from e
