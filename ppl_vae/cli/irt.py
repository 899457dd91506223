"""``ppl-vae train irt-2pl|irt-1pl|irt-grm|irt-gpcm|irt-pcm|irt-3pl|irt-lecture``: exam models.

    ppl-vae train irt-2pl --responses exam.csv --out RUN     # marginal: items by MAP + Laplace
    ppl-vae train irt-2pl --responses lsat6 --method amortized --out RUN
    ppl-vae evaluate RUN                 # log_likelihood (nats per student)
    ppl-vae score RUN --responses new.csv --out scores.csv

The model knowledge (spec, defaults, tables, pictures, commands) is in ppl_vae.models.irt.
"""

from __future__ import annotations

import argparse

from ppl_vae.models.irt import HELP, METHODS

NAMES = tuple(HELP)
# flag dest -> spec field where the names differ (what --resume counts as given)
SPEC_FLAGS = {"guide": "method", "quadrature_nodes": "num_nodes"}


def add_train_arguments(p: argparse.ArgumentParser, name: str) -> None:
    marginal = name in ("irt-1pl", "irt-2pl", "irt-grm", "irt-gpcm", "irt-pcm")
    g = p.add_argument_group("exam model")
    g.add_argument("--responses", required=True,
                   help="wide CSV (student rows, item columns, blank = missing), long CSV "
                   "(student,item,response), py-irt jsonlines, or a bundled table: lsat6, lsat7")
    g.add_argument("--format", default="auto", choices=["auto", "wide", "long", "jsonl"])
    g.add_argument("--id-column", default=None, help="wide CSV: the student id column")
    g.add_argument("--method", default=None, choices=METHODS if marginal else METHODS[1:],
                   help="marginal (default for 1pl/2pl/grm/gpcm/pcm): abilities integrated out "
                   "exactly, items by marginal MAP + Laplace; amortized (default for lecture/"
                   "3pl): an encoder maps a student's answers to q(ability); meanfield: a "
                   "Normal per student")
    g.add_argument("--guide", default=None, choices=["amortized", "meanfield"],
                   help="the same as --method amortized|meanfield (older flag)")
    g.add_argument("--items", default="meanfield", choices=["meanfield", "fullrank"],
                   help="amortized: item parameters mean-field, or one multivariate Normal")
    g.add_argument("--hidden", type=int, nargs="+", default=[64],
                   help="hidden layer sizes of the amortized encoder")
    if name != "irt-lecture":
        g.add_argument("--hierarchical", action="store_true",
                       help="learn the item parameters' population mean and sd (amortized, "
                       "meanfield)")
        g.add_argument("--difficulty-scale", type=float, default=None,
                       help="prior sd of the difficulties (default: 3; marginal: flat)")
    if marginal:
        g.add_argument("--priors", default="flat", choices=["flat", "weak"],
                       help="marginal: item priors (flat: modes = MML estimates)")
        g.add_argument("--quadrature-nodes", type=int, default=None,
                       help="marginal: Gauss-Hermite nodes of the likelihood (default 21; 41 "
                       "for irt-gpcm/irt-pcm)")
    if name == "irt-3pl":
        g.add_argument("--guessing-prior", type=float, nargs=2, default=[5.0, 17.0],
                       metavar=("A", "B"), help="Beta(A, B) prior of the guessing parameters")
    g.add_argument("--posterior-samples", type=int, default=1000,
                   help="draws of the item parameters for items.csv")
    if name == "irt-2pl":
        m = p.add_argument_group("multidimensional abilities (models/irt_multidim.py)")
        m.add_argument("--dims", type=int, default=1,
                       help="abilities per student, 1-10 (2+: P = sigmoid(a_t . theta_s + d_t); "
                       "quadrature up to 2, an amortized full-covariance guide trained on the "
                       "importance-weighted bound above)")
        m.add_argument("--q-matrix", default=None,
                       help="CSV of 0/1, one row per item (optionally an item-id column and a "
                       "header), one column per factor: a confirmatory loading pattern "
                       "(without it: exploratory, lower-triangular loadings + varimax)")
        m.add_argument("--correlated", action=argparse.BooleanOptionalAction, default=None,
                       help="learn the factors' correlation (default: yes with --q-matrix)")


def cli_spec(args: argparse.Namespace) -> dict:
    spec = {"responses": str(args.responses), "format": args.format,
            "id_column": args.id_column, "method": args.method or args.guide,
            "items": args.items, "hidden": list(args.hidden),
            "hierarchical": bool(getattr(args, "hierarchical", False)),
            "difficulty_scale": getattr(args, "difficulty_scale", None),
            "posterior_samples": args.posterior_samples}
    if hasattr(args, "priors"):
        spec.update(priors=args.priors, num_nodes=args.quadrature_nodes)
    if hasattr(args, "guessing_prior"):
        spec["guessing_prior"] = list(args.guessing_prior)
    if hasattr(args, "dims"):
        spec.update(dims=args.dims, q_matrix=args.q_matrix, correlated=args.correlated)
    return spec
