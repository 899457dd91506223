"""``ppl-vae train ssvae``: flags -> the spec of M2 (models/ssvae.py holds the rest).

    ppl-vae train ssvae --labels-per-class 100 --epochs 20 --out runs/m2
    ppl-vae evaluate runs/m2        # test_accuracy, test ELBO and log p(x), nats per image
    ppl-vae sample runs/m2 --label 3 --n 16

The labelled images are drawn at random, ``--labels-per-class`` of each class (seed
``--label-seed``), from the training images; the other training images are used without
their labels. Their row numbers are written to RUN/labelled_rows.csv.
"""

from __future__ import annotations

import argparse

from ppl_vae.data.images import add_data_arguments
from ppl_vae.guides import GUIDES
from ppl_vae.models.ssvae import BINARIZE, SSVAESpec
from ppl_vae.models.vae import binarize_help

HELP = {"ssvae": "semi-supervised VAE (M2, Kingma et al. 2014): classify with few labels"}
FIELDS = ("labels_per_class", "label_seed", "alpha", "labelled_share", "latent_dim", "hidden",
          "guide", "flows", "binarize", "data", "download", "limit", "val_size")


def add_train_arguments(p: argparse.ArgumentParser, name: str) -> None:
    g = p.add_argument_group("ssvae (unset: the spec's default, models/ssvae.py:SSVAESpec)")
    g.add_argument("--labels-per-class", type=int, help="labelled training images per class, "
                   f"the rest are unlabelled (default {SSVAESpec.labels_per_class})")
    g.add_argument("--label-seed", type=int, help="which images are labelled (default "
                   f"{SSVAESpec.label_seed})")
    g.add_argument("--alpha", type=float, help="weight of the classification term per "
                   "labelled image (default: 5 N / N_labelled, at least 500: Kingma et al.'s "
                   "form with 50x their constant, models/ssvae.py:default_alpha)")
    g.add_argument("--labelled-share", type=float, help="repeat the labelled images (weight "
                   "1/k each, so the objective is unchanged) until they are about this share "
                   "of every minibatch; default 0: each labelled image once per epoch")
    g.add_argument("--latent-dim", type=int, help=f"D (default {SSVAESpec.latent_dim})")
    g.add_argument("--hidden", type=int, nargs="+", help="hidden sizes of classifier and "
                   f"encoder, decoder mirrored (default {list(SSVAESpec.hidden)})")
    g.add_argument("--guide", choices=GUIDES, help="q(z | x, y) (default diagonal)")
    g.add_argument("--flows", type=int, help=f"IAF steps (default {SSVAESpec.flows})")
    add_data_arguments(g, BINARIZE, binarize_help(BINARIZE) + f" (default {SSVAESpec.binarize})")


def cli_spec(args: argparse.Namespace) -> dict:
    """The spec fields the user set (the spec fills in the rest)."""
    return {k: getattr(args, k) for k in FIELDS if getattr(args, k) is not None}
