"""``ppl-vae train vae``: flags -> the VAE's spec. The model, its data, pictures and test
figures are in models/vae.py (:class:`~ppl_vae.models.vae.VAEFamily`)."""

from __future__ import annotations

import argparse

from ppl_vae.data.images import add_data_arguments
from ppl_vae.guides import GUIDES
from ppl_vae.models.vae import BINARIZE, BINARIZE_HELP, LIKELIHOODS, VAESpec

HELP = {"vae": "variational autoencoder on Fashion-MNIST (MLP or conv networks)"}
FIELDS = ("latent_dim", "architecture", "hidden", "likelihood", "binarize", "data", "download",
          "limit", "val_size", "guide", "flows")


def add_train_arguments(p: argparse.ArgumentParser, name: str) -> None:
    g = p.add_argument_group("vae (unset: the spec's default, models/vae.py:VAESpec)")
    g.add_argument("--latent-dim", type=int, help=f"D (default {VAESpec.latent_dim})")
    g.add_argument("--architecture", choices=["mlp", "conv"],
                   help=f"encoder and decoder networks (default {VAESpec.architecture})")
    g.add_argument("--hidden", type=int, nargs="+", help="hidden layer sizes of the MLP "
                   f"encoder, decoder mirrored (default {list(VAESpec.hidden)})")
    g.add_argument("--likelihood", choices=LIKELIHOODS,
                   help=f"p(x | z) (default {VAESpec.likelihood})")
    g.add_argument("--guide", choices=GUIDES, help="q(z|x): diagonal Normal (default), full "
                   "covariance (Algorithm 2), or IAF (on the MLP or conv encoder trunk)")
    g.add_argument("--flows", type=int, help=f"IAF steps (default {VAESpec.flows})")
    add_data_arguments(g, BINARIZE, BINARIZE_HELP + " (default: dynamic for the Bernoulli "
                       "likelihood, none for grey-level likelihoods)")


def cli_spec(args: argparse.Namespace) -> dict:
    """The spec fields the user set (the spec fills in the rest)."""
    return {k: getattr(args, k) for k in FIELDS if getattr(args, k) is not None}
