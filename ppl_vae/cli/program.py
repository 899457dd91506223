"""``ppl-vae train program``: your own Pyro model from a Python file (models/user_program.py).

    ppl-vae train program --file my_model.py --data train.pt --out runs/mine
    ppl-vae evaluate runs/mine      # elbo, log_likelihood (nats per example)
    ppl-vae check runs/mine         # ArviZ posterior checks
"""

from __future__ import annotations

import argparse

HELP = {"program": "your own Pyro model (and guide) from a Python file"}
FIELDS = ("file", "model_name", "guide", "data", "val_data", "test_data", "plate")


def add_train_arguments(p: argparse.ArgumentParser, name: str) -> None:
    g = p.add_argument_group("program (models/user_program.py)")
    g.add_argument("--file", help="the Python file that defines the model (and its guide)")
    g.add_argument("--model-name", help="the model's name in the file (default model; "
                   "vae.model for a method)")
    g.add_argument("--guide", help="a name in the file, or an autoguide class (AutoNormal, "
                   "AutoDelta, AutoMultivariateNormal ...); default: the file's guide, else "
                   "AutoNormal")
    g.add_argument("--data", help="training rows: .pt (tensor, tuple or dict of tensors), "
                   ".npy, .npz (keyword arguments) or .csv (a header of argument names)")
    g.add_argument("--val-data", help="validation rows (early stopping, best.pt)")
    g.add_argument("--test-data", help="rows for 'evaluate' (default: the training rows)")
    g.add_argument("--plate", help="the plate over the rows, if the engine cannot tell")


def cli_spec(args: argparse.Namespace) -> dict:
    """The spec fields the user set (the spec fills in the rest)."""
    return {k: getattr(args, k) for k in FIELDS if getattr(args, k) is not None}
