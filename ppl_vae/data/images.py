"""Fashion-MNIST (and MNIST-format image sets) as tensors, validated before training.

Where the files are looked for, in order:
  1. ``root`` given by the user (a folder with the idx files, gzipped or not, directly or
     under ``FashionMNIST/raw``);
  2. ``$PPL_VAE_DATA`` and the Debian package's folder ``/usr/share/datasets/fashion-mnist``
     (``apt-get install dataset-fashion-mnist``);
  3. torchvision's download into ``~/.cache/ppl-vae`` when ``download=True`` (needs internet).
Otherwise a clear error says how to get the data.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import math
import os
import shutil
import tempfile
import zlib
from pathlib import Path

import torch

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
           "Sneaker", "Bag", "Ankle boot")
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
CACHE_DIR = Path.home() / ".cache" / "ppl-vae"
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def _candidates(root: str | os.PathLike | None) -> list[Path]:
    """Folders to look in: the one the caller names (only it), else $PPL_VAE_DATA, the
    Debian package's and the download cache."""
    if root is not None:
        return [Path(root), Path(root) / "FashionMNIST" / "raw"]
    dirs = []
    if os.environ.get("PPL_VAE_DATA"):
        dirs.append(Path(os.environ["PPL_VAE_DATA"]))
    dirs += [DEBIAN_DIR, CACHE_DIR]
    out = []
    for d in dirs:
        out += [d, d / "FashionMNIST" / "raw"]
    return out


def _find(name: str, dirs: list[Path]) -> Path | None:
    for d in dirs:
        for candidate in (d / name, d / f"{name}.gz"):
            if candidate.exists():
                return candidate
    return None


def _unpack(path: Path) -> Path:
    """The plain idx file of ``path.gz``, unpacked once into the cache (keyed by the .gz's
    path, size and time). The data goes to a temp file of a unique name in the cache folder,
    renamed into place when complete: concurrent first loads never share a temp file, and a
    failed unpack (truncated or corrupt .gz, full disk) leaves nothing behind."""
    st = path.resolve().stat()
    key = hashlib.sha1(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    target = CACHE_DIR / "idx" / f"{key.hexdigest()[:16]}-{path.stem}"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with gzip.open(path, "rb") as src, os.fdopen(fd, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(tmp, target)
    except (OSError, EOFError, zlib.error) as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, (EOFError, zlib.error, gzip.BadGzipFile)):
            raise ValueError(f"{path}: not a readable gzip file ({e}); the download is "
                             "probably truncated or corrupt: fetch it again") from e
        raise ValueError(f"{path}: cannot unpack into {target.parent} ({e})") from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def _read_idx(path: Path, ndim: int | None = None) -> torch.Tensor:
    """Read an unsigned-byte idx file (the MNIST format), plain or gzipped, checking the
    magic number and that the size matches the header; errors name the file. ``ndim``: the
    expected number of dimensions (3 for images, 1 for labels; default from the name)."""
    ndim = ndim or (3 if "images" in path.name else 1)
    plain = _unpack(path) if path.suffix == ".gz" else path
    try:
        data = plain.read_bytes()
    except OSError as e:
        raise ValueError(f"{path}: cannot read the file ({e.strerror or e})") from e
    name = f"{path} (unpacked: {plain})" if plain != path else str(path)
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08 or data[3] != ndim:
        raise ValueError(f"{name}: not an idx file of unsigned bytes with {ndim} dimensions "
                         f"(magic number {data[:4].hex() or 'missing'}, expected "
                         f"0000080{ndim})")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{name}: truncated header ({len(data)} bytes)")
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    expected = header + math.prod(shape)
    if len(data) != expected:
        raise ValueError(f"{name}: {len(data)} bytes but the header (shape {tuple(shape)}) "
                         f"needs {expected}; the file is "
                         f"{'truncated' if len(data) < expected else 'too long'}")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8, offset=header).view(*shape)


def load_fashion_mnist(root: str | os.PathLike | None = None, split: str = "train",
                       limit: int | None = None, binarize: str | None = None, seed: int = 0,
                       download: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST images and labels.

    Returns ``(images, labels)``: images float32 of shape (N, 28, 28) with grey levels in
    [0, 1] (or binary with ``binarize``), labels int64 (N,) in 0..9 (see ``CLASSES``).

    Args:
        split: ``train`` (60,000) or ``test`` (10,000).
        limit: keep the first ``limit`` images.
        binarize: ``None`` (grey levels), ``"threshold"`` (pixel > 0.5) or ``"sample"``
            (one fixed Bernoulli draw per pixel with ``seed``: the usual static binarization).
        download: fetch with torchvision (into ``root``, else ``~/.cache/ppl-vae``) if no
            local copy exists. A ``root`` given is the only folder looked in.
    """
    if split not in FILES:
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    if root is not None and not Path(root).exists():
        raise FileNotFoundError(f"data folder {root} does not exist")
    image_name, label_name = FILES[split]
    dirs = _candidates(root)
    image_path, label_path = _find(image_name, dirs), _find(label_name, dirs)
    if (image_path is None or label_path is None) and download:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(str(root or CACHE_DIR), train=split == "train", download=True)
        image_path, label_path = _find(image_name, dirs), _find(label_name, dirs)
    if image_path is None or label_path is None:
        looked = ", ".join(str(d) for d in dirs[::2])
        raise FileNotFoundError(
            f"Fashion-MNIST {split} files ({image_name}[.gz]) not found in: {looked}. "
            "Get them with 'apt-get install dataset-fashion-mnist' (Debian), pass a folder "
            "that holds them (--data DIR / root=), or allow download=True / --download.")
    images = _read_idx(image_path, 3)
    labels = _read_idx(label_path, 1).long()
    if labels.numel() and int(labels.max()) >= len(CLASSES):
        raise ValueError(f"{label_path}: label {int(labels.max())} outside 0..{len(CLASSES) - 1}")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{image_path} has {images.shape[0]} images but {label_path} has "
                         f"{labels.shape[0]} labels")
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        images, labels = images[:limit], labels[:limit]
    x = images.float() / 255.0
    if binarize == "threshold":
        x = (x > 0.5).float()
    elif binarize == "sample":
        x = torch.bernoulli(x, generator=torch.Generator().manual_seed(seed))
    elif binarize is not None:
        raise ValueError(f"binarize must be None, 'threshold' or 'sample', not {binarize!r}")
    return x, labels


def validate_images(x: torch.Tensor, binary: bool = False, name: str = "images") -> torch.Tensor:
    """Check images before training: a float tensor (N, H, W), finite, values in [0, 1]
    (exactly 0/1 when ``binary``). Errors name the first offending image and pixel."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"{name} must have shape (N, H, W), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be floating point with values in [0, 1], got {x.dtype} "
                         "(divide uint8 pixels by 255)")
    bad = ~torch.isfinite(x)
    if bad.any():
        i = bad.nonzero()[0].tolist()
        raise ValueError(f"{name}: NaN or inf at image {i[0]}, pixel ({i[1]}, {i[2]})")
    out = (x < 0) | (x > 1)
    if out.any():
        i = out.nonzero()[0].tolist()
        raise ValueError(f"{name}: value {float(x[tuple(i)]):g} outside [0, 1] at image {i[0]}, "
                         f"pixel ({i[1]}, {i[2]})")
    if binary:
        grey = (x != 0) & (x != 1)
        if grey.any():
            i = grey.nonzero()[0].tolist()
            raise ValueError(f"{name}: the Bernoulli likelihood needs binary pixels; value "
                             f"{float(x[tuple(i)]):g} at image {i[0]}, pixel ({i[1]}, {i[2]}). "
                             "Binarize the data or choose a grey-level likelihood")
    return x


def add_data_arguments(group: argparse._ArgumentGroup, binarize: tuple[str, ...],
                       binarize_help: str = "") -> None:
    """The command-line flags that choose an image family's data (the spec fields
    ``binarize``, ``limit``, ``val_size``, ``data``, ``download``; unset: the spec's
    default), for ``ppl-vae train vae|cvae|ssvae``."""
    group.add_argument("--binarize", choices=binarize, default=None, help=binarize_help)
    group.add_argument("--limit", type=int, default=None, help="first N training images")
    group.add_argument("--val-size", type=int, default=None,
                       help="validation images, taken from the end of the training file "
                       "(default: 5000, or 10%% of --limit)")
    group.add_argument("--data", type=Path, default=None,
                       help="folder with the Fashion-MNIST idx files (default: "
                       "$PPL_VAE_DATA, the Debian package's folder, ~/.cache/ppl-vae)")
    group.add_argument("--download", action="store_true",
                       help="download with torchvision if absent")
