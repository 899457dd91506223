"""Download the public topic corpora by name (``ppl-vae data fetch bbc_news``).

The corpora are OCTIS's preprocessed versions (Terragni et al., EACL 2021), served from the
OCTIS repository (MIT licence) as ``corpus.tsv`` (document, split, label), ``vocabulary.txt``
and ``metadata.json``. The texts keep their original terms of use:

    bbc_news  BBC News, D. Greene & P. Cunningham (ICML 2006); for non-commercial research
    m10       M10, CiteSeerX abstracts in 10 fields (Lim & Buntine 2014)
    dblp      DBLP, titles of computer-science papers in 4 fields
    20ng      20 Newsgroups (K. Lang 1995), public

Files land in ``$PPL_VAE_DATA/topics/<name>`` (default ``~/.cache/ppl-vae/topics/<name>``),
each written to a unique temporary file and renamed, so a broken download leaves nothing
behind and two downloads at once cannot clash.
"""

from __future__ import annotations

import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from tqdm.auto import tqdm

OCTIS_URL = "https://raw.githubusercontent.com/MIND-Lab/OCTIS/master/preprocessed_datasets"
CORPORA = {"bbc_news": "BBC_News", "m10": "M10", "dblp": "DBLP", "20ng": "20NewsGroup"}
FILES = ("corpus.tsv", "vocabulary.txt", "metadata.json")


def data_home() -> Path:
    """Where downloaded data live: ``$PPL_VAE_DATA`` or ``~/.cache/ppl-vae``."""
    return Path(os.environ.get("PPL_VAE_DATA") or Path.home() / ".cache" / "ppl-vae")


def corpus_folder(name: str) -> Path:
    """The folder a fetched corpus ``name`` lives in (it may not exist yet)."""
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; choose one of {', '.join(CORPORA)}")
    return data_home() / "topics" / CORPORA[name]


def fetch_corpus(name: str, dest: str | Path | None = None, base_url: str | None = None,
                 progress: bool | None = None) -> Path:
    """Download the OCTIS corpus ``name`` (``bbc_news``, ``m10``, ``dblp``, ``20ng``) into
    ``dest`` (default :func:`corpus_folder`) unless its files are there already; returns
    the folder, readable by :func:`ppl_vae.data.topics.load_octis`.

    ``base_url`` replaces the OCTIS address (a mirror, or a local server in tests).
    """
    folder = Path(dest) if dest is not None else corpus_folder(name)
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; choose one of {', '.join(CORPORA)}")
    if all((folder / f).exists() for f in FILES):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    url = f"{(base_url or OCTIS_URL).rstrip('/')}/{CORPORA[name]}"
    for file in FILES:
        if not (folder / file).exists():
            _download(f"{url}/{file}", folder / file, progress)
    return folder


def _download(url: str, path: Path, progress: bool | None) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                response = urllib.request.urlopen(url, timeout=60)  # noqa: S310 (https only)
            except urllib.error.HTTPError as e:
                raise OSError(f"{url}: the server answered {e.code} {e.reason}") from e
            except (urllib.error.URLError, TimeoutError) as e:
                raise OSError(f"{url}: cannot download ({getattr(e, 'reason', e)}); are you "
                              "online? Copy the folder by hand and give --corpus DIR") from e
            total = int(response.headers.get("Content-Length") or 0) or None
            with response, tqdm(total=total, unit="B", unit_scale=True, desc=path.name,
                                disable=None if progress is None else not progress) as bar:
                while chunk := response.read(1 << 16):
                    out.write(chunk)
                    bar.update(len(chunk))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
