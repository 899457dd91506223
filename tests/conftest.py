"""Shared fixtures: small data written in the real file formats, so the real loaders run."""

from __future__ import annotations

import gzip
import struct

import pyro
import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _fresh_pyro():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()


def fake_fashion_images(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Structured 28x28 uint8 images: each class is a bar at its own position, plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    images = (torch.rand(n, 28, 28, generator=g) * 60).to(torch.uint8)
    for i, label in enumerate(labels.tolist()):
        images[i, 2 + 2 * label: 6 + 2 * label, 4:24] = 230
    return images, labels


def write_idx(folder, split: str, n: int, seed: int = 0) -> None:
    images, labels = fake_fashion_images(n, seed)
    stem = "train" if split == "train" else "t10k"
    with gzip.open(folder / f"{stem}-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">IIII", 2051, n, 28, 28) + images.numpy().tobytes())
    with gzip.open(folder / f"{stem}-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">II", 2049, n) + labels.to(torch.uint8).numpy().tobytes())


@pytest.fixture(scope="session")
def fashion_dir(tmp_path_factory):
    """A folder with tiny Fashion-MNIST-format idx.gz files (400 train, 120 test)."""
    folder = tmp_path_factory.mktemp("fashion")
    write_idx(folder, "train", 400, seed=1)
    write_idx(folder, "test", 120, seed=2)
    return folder
