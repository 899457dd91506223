"""``ppl-vae train cvae``: flags -> the conditional VAE's spec (models/cvae.py holds the rest).

    ppl-vae train cvae --prior learned --guide fullcov --epochs 20 --out runs/cvae
    ppl-vae evaluate runs/cvae            # test ELBO and log p(x | y), nats per image
    ppl-vae sample runs/cvae --label 3 --n 16
"""

from __future__ import annotations

import argparse

from ppl_vae.data.images import add_data_arguments
from ppl_vae.guides import GUIDES
from ppl_vae.models.cvae import BINARIZE, PRIORS, CVAESpec
from ppl_vae.models.vae import binarize_help

HELP = {"cvae": "conditional VAE q(z|x,y), p(x|z,y) on labelled Fashion-MNIST"}
FIELDS = ("latent_dim", "hidden", "prior", "guide", "flows", "binarize", "data", "download",
          "limit", "val_size")


def add_train_arguments(p: argparse.ArgumentParser, name: str) -> None:
    g = p.add_argument_group("cvae (unset: the spec's default, models/cvae.py:CVAESpec)")
    g.add_argument("--latent-dim", type=int, help=f"D (default {CVAESpec.latent_dim})")
    g.add_argument("--hidden", type=int, nargs="+", help="hidden sizes of the MLP encoder, "
                   f"decoder mirrored (default {list(CVAESpec.hidden)})")
    g.add_argument("--prior", choices=PRIORS, help="p(z) = N(0, I) (fixed, default) or a "
                   "learned p(z | y) (learned)")
    g.add_argument("--guide", choices=GUIDES, help="q(z | x, y): diagonal Normal (default), "
                   "full covariance, or IAF")
    g.add_argument("--flows", type=int, help=f"IAF steps (default {CVAESpec.flows})")
    add_data_arguments(g, BINARIZE, binarize_help(BINARIZE) + f" (default {CVAESpec.binarize})")


def cli_spec(args: argparse.Namespace) -> dict:
    """The spec fields the user set (the spec fills in the rest)."""
    return {k: getattr(args, k) for k in FIELDS if getattr(args, k) is not None}
