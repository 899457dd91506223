"""The semi-supervised VAE "M2" (Kingma, Rezende, Mohamed & Welling 2014).

Generative model, for every image i (labelled or not):

    y_i ~ Cat(1/C, ..., 1/C)                  class (one-hot)
    z_i ~ N(0, I_D)                           style, independent of the class
    x_i | y_i, z_i ~ p(x | f(z_i, y_i))       f = decoder on [z, onehot(y)] (as in the CVAE)

Guide: q(y | x) = Cat(pi(x)) (the classifier) and q(z | x, y) (any vector guide of
:mod:`ppl_vae.guides` on the input [x, onehot(y)]).

Where y_i is observed, the guide pins it: q(y_i | x_i, y~_i) = delta(y~_i), so the objective
for that row is the labelled ELBO L(x, y~) = E_q(z|x,y~)[log p(x, y~, z) - log q(z|x, y~)];
where y_i is not observed, it is latent and ``objective="enum"`` (TraceEnum_ELBO) sums it out
exactly, U(x) = sum_y q(y|x) [L(x, y) - log q(y|x)]. The delta is written as logits 0 / -1e4,
whose softmax is exactly one-hot in floating point, so both cases are one program and one
minibatch may mix them. (Masking the enumerated site instead would count labelled rows once
per class: TraceEnum weights each enumerated value by the *masked* guide probability.)

The classification term of Kingma et al. (their eq. 9), alpha * sum_labelled log q(y~|x), is
added by the model as a factor ``classification`` on the labelled rows (as Pyro's own ss-vae
example adds it), with the classifier shared with the guide under one Pyro name. The engine
maximizes  sum_i [labelled ? L(x_i, y~_i) + alpha log q(y~_i|x_i) : U(x_i)].
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from torch import nn

from ppl_vae.models.cvae import CVAE, concat, one_hot
from ppl_vae.nn import MLP, MLPDecoder

PINNED = -1e4  # logit of the classes other than the observed one: exp(-1e4) == 0 in float


def check_labels(y: torch.Tensor, labelled: torch.Tensor, num_classes: int,
                 name: str = "labels") -> None:
    """y (N,) integers, labelled (N,) bool; labelled rows need y in 0..C-1 (others are
    ignored). Errors name the first offending row."""
    if y.dim() != 1 or labelled.shape != y.shape:
        raise ValueError(f"{name}: y and labelled must both have shape (N,), got "
                         f"{tuple(y.shape)} and {tuple(labelled.shape)}")
    if y.is_floating_point():
        raise ValueError(f"{name}: labels must be integers, got {y.dtype}")
    if labelled.dtype != torch.bool:
        raise ValueError(f"{name}: labelled must be a bool mask, got {labelled.dtype}")
    bad = labelled & ((y < 0) | (y >= num_classes))
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(f"{name}: row {i} is labelled with {int(y[i])}, outside "
                         f"0..{num_classes - 1}")


def _weighted(weight: torch.Tensor | None):
    """Scale every site of the row by its weight (B,); no-op without weights."""
    return poutine.scale(scale=weight) if weight is not None else contextlib.nullcontext()


def oversample_labelled(x: torch.Tensor, y: torch.Tensor, labelled: torch.Tensor,
                        share: float = 0.5) -> tuple[torch.Tensor, ...]:
    """Repeat the labelled rows so that they make up about ``share`` of the rows (hence of
    every shuffled minibatch), with weight 1/k on a row repeated k times: the weighted sum
    over the N' rows equals the sum over the N original rows, so the engine's N'/B scaling
    keeps the ELBO an unbiased estimate of the same full-data objective; only its variance
    (and how often the classifier sees each label) changes.

    Returns ``(x, y, labelled, weight)`` with N' = N_unlabelled + k N_labelled rows, the
    labelled rows of one draw repeated k = round(share / (1 - share) * N_u / N_l) >= 1 times
    (k = 1, weights 1, where the labelled share is already >= ``share``).
    """
    if not 0.0 <= share < 1.0:
        raise ValueError(f"share must be in [0, 1), got {share}")
    n_l = int(labelled.sum())
    n_u = len(labelled) - n_l
    k = max(1, round(share / (1.0 - share) * n_u / n_l)) if n_l and n_u else 1
    rows = torch.arange(len(x))
    if k > 1:
        rows = torch.cat([rows, labelled.nonzero().squeeze(-1).repeat(k - 1)])
    weight = torch.where(labelled, 1.0 / k, 1.0)[rows].to(x.dtype)
    return x[rows], y[rows], labelled[rows], weight


class SSVAE(CVAE):
    """M2's p(y) p(z) p(x | y, z) with the auxiliary classification term.

    Args:
        decoder: module [z, onehot(y)] (..., D + C) -> logits (..., H, W).
        classifier: module x (..., H*W) -> class logits (..., C): q(y | x), shared with the
            guide :class:`SSVAEGuide`.
        latent_dim: D; num_classes: C.
        alpha: weight of the classification term per labelled example (Kingma et al. use
            alpha = 0.1 N / N_labelled in this per-example form; on Fashion-MNIST M2 needed
            about 50 times that, see ``ppl_vae.cli.ssvae.default_alpha`` and
            benchmarks/RESULTS.md, issue 5).
        likelihood: as for :class:`~ppl_vae.models.vae.VAE`.

    Data: ``(x, y, labelled)`` -- images (N, H, W), labels (N,) int64 (any value where not
    labelled), labelled (N,) bool -- or ``(x, y, labelled, weight)`` with a weight (N,) per
    row (:func:`oversample_labelled`).
    """

    def __init__(self, decoder: nn.Module, classifier: nn.Module, latent_dim: int,
                 num_classes: int = 10, alpha: float = 50.0, likelihood: str = "bernoulli"):
        super().__init__(decoder, latent_dim, num_classes, prior="fixed", likelihood=likelihood)
        self.classifier = classifier
        self.alpha = float(alpha)

    def model(self, x: torch.Tensor, y: torch.Tensor, labelled: torch.Tensor,  # type: ignore[override]
              weight: torch.Tensor | None = None, size: int | None = None,
              subsample: torch.Tensor | None = None) -> None:
        """x (B, H, W) in [0, 1], y (B,) labels, labelled (B,) bool; weight (B,) optional:
        every term of row i counts weight_i times (see :func:`oversample_labelled`)."""
        pyro.module("ssvae_decoder", self.decoder)
        pyro.module("y_classifier", self.classifier)
        prior_y = dist.OneHotCategorical(logits=x.new_zeros(self.num_classes))
        with pyro.plate("data", size or len(x), subsample=subsample), _weighted(weight):
            y1 = pyro.sample("y", prior_y)
            z = pyro.sample("z", self.prior_distribution(y1))
            pyro.sample("x", self.pixel_distribution(self.decoder(concat(z, y1))), obs=x)
            if self.alpha:
                q_y = dist.Categorical(logits=self.classifier(x.flatten(-2)))
                with poutine.mask(mask=labelled):
                    pyro.factor("classification", self.alpha * q_y.log_prob(y.clamp(min=0)))

    forward = model

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Most probable class under q(y | x): images (B, H, W) -> labels (B,)."""
        return self.classifier(x.flatten(-2)).argmax(-1)


class SSVAEGuide(nn.Module):
    """q(y | x, y~) q(z | x, y): the classifier (pinned to y~ on labelled rows, enumerated in
    parallel by TraceEnum_ELBO on the others) and a guide for z on [x, onehot(y)].

    Args:
        classifier: the module shared with :class:`SSVAE`.
        z_guide: a vector guide for the site ``z`` (AmortizedNormal,
            AmortizedFullCovNormal, AmortizedIAF, ...) whose ``distribution(x, y1)`` gives
            q(z | x, y) (its ``inputs`` reads ``(x, y1)`` with y1 one-hot, e.g.
            :func:`z_inputs`); sampled here inside this guide's data plate.
        num_classes: C.
    """

    def __init__(self, classifier: nn.Module, z_guide: nn.Module, num_classes: int = 10):
        super().__init__()
        self.classifier = classifier
        self.z_guide = z_guide
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor, y: torch.Tensor, labelled: torch.Tensor,
                weight: torch.Tensor | None = None, size: int | None = None,
                subsample: torch.Tensor | None = None) -> torch.Tensor:
        pyro.module("y_classifier", self.classifier)
        pyro.module("ssvae_z_guide", self.z_guide)
        logits = self.classifier(x.flatten(-2))                                   # (B, C)
        pinned = (1.0 - one_hot(y.clamp(min=0), self.num_classes)) * PINNED
        logits = torch.where(labelled.unsqueeze(-1), pinned, logits)
        with pyro.plate("data", size or len(x), subsample=subsample), _weighted(weight):
            y1 = pyro.sample("y", dist.OneHotCategorical(logits=logits),
                             infer={"enumerate": "parallel"})                   # (B, C)
            return pyro.sample("z", self.z_guide.distribution(x, y1))          # (B, D)


def z_inputs(x: torch.Tensor, y1: torch.Tensor) -> torch.Tensor:
    """Encoder input of q(z | x, y): [x flattened, y one-hot], broadcasting the enumerated
    dim of y: (..., H*W + C)."""
    return concat(x.flatten(-2), y1)


def build_ssvae(latent_dim: int = 50, hidden: Sequence[int] = (500,), num_classes: int = 10,
                alpha: float = 50.0, likelihood: str = "bernoulli",
                image_shape: Sequence[int] = (28, 28), guide: str = "diagonal",
                **guide_options) -> tuple[SSVAE, SSVAEGuide]:
    """M2 with MLP networks (Kingma et al.: one hidden layer of 500, D = 50).

    classifier H*W -> hidden -> C; encoder [x, y] -> hidden -> q(z|x,y); decoder
    [z, y] -> reversed hidden -> logits (H, W). ``guide``: diagonal | fullcov | iaf.
    """
    from ppl_vae.guides import build_guide

    h, w = image_shape
    classifier = MLP([h * w, *hidden, num_classes])
    decoder = MLPDecoder(latent_dim + num_classes, list(reversed(hidden)), (h, w))
    model = SSVAE(decoder, classifier, latent_dim, num_classes, alpha, likelihood)
    z_guide = build_guide(guide, h * w + num_classes, hidden, latent_dim, inputs=z_inputs,
                          **guide_options)
    return model, SSVAEGuide(classifier, z_guide, num_classes)
