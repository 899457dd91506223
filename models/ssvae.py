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

alpha defaults to :func:`default_alpha` (5 N / N_labelled, at least 500), the value the
sweeps on Fashion-MNIST recommend. Below the model and its guide builder:
:class:`SSVAEFamily` (``ppl-vae train ssvae``): which training images keep their labels,
the alpha rule and the objective M2 needs (``enum``), pictures, test accuracy.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from torch import nn

from ppl_vae.checkpoint import write_json
from ppl_vae.data.images import CLASSES
from ppl_vae.family import Family, register
from ppl_vae.models.cvae import CVAE, class_samples, concat, load_labelled, one_hot, sample_classes
from ppl_vae.models.vae import (
    image_fit_defaults,
    need,
    resolve_image_data,
    score_test_set,
    train_val,
)
from ppl_vae.nn import MLP, MLPDecoder, like_parameters

if TYPE_CHECKING:
    from ppl_vae.runs import Run

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


def default_alpha(num_images: int, num_labelled: int) -> float:
    """M2's weight of log q(y|x) per labelled image: 5 N / N_labelled, at least 500.

    Kingma et al.'s form (alpha proportional to N / N_labelled) with 50x their constant 0.1:
    on binarized Fashion-MNIST the paper's value left the classifier to the unlabelled ELBO
    (accuracy 0.48 at 10 labels per class), accuracy was flat from alpha 50 to 5000 with
    1,000 labels in 10k images, and with 100 labels in 60k images 3000 gave 0.63-0.68 where
    500 gave 0.53-0.56 (benchmarks/RESULTS.md, issue 5)."""
    if num_labelled < 1 or num_images < num_labelled:
        raise ValueError(f"default_alpha needs 1 <= num_labelled <= num_images, got "
                         f"{num_labelled} labelled of {num_images}")
    return max(5.0 * num_images / num_labelled, 500.0)


class SSVAE(CVAE):
    """M2's p(y) p(z) p(x | y, z) with the auxiliary classification term.

    Args:
        decoder: module [z, onehot(y)] (..., D + C) -> logits (..., H, W).
        classifier: module x (..., H*W) -> class logits (..., C): q(y | x), shared with the
            guide :class:`SSVAEGuide`.
        latent_dim: D; num_classes: C.
        alpha: weight of the classification term per labelled example; the recommended value
            is :func:`default_alpha` (Kingma et al. use 0.1 N / N_labelled in this
            per-example form; on Fashion-MNIST M2 needed about 50 times that).
        likelihood: as for :class:`~ppl_vae.models.vae.VAE`.

    Data: ``(x, y, labelled)`` -- images (N, H, W), labels (N,) int64 (any value where not
    labelled), labelled (N,) bool -- or ``(x, y, labelled, weight)`` with a weight (N,) per
    row (:func:`oversample_labelled`).
    """

    def __init__(self, decoder: nn.Module, classifier: nn.Module, latent_dim: int, alpha: float,
                 num_classes: int = 10, likelihood: str = "bernoulli"):
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
        x = like_parameters(x, self)
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
                alpha: float | None = None, likelihood: str = "bernoulli",
                image_shape: Sequence[int] = (28, 28), guide: str = "diagonal",
                num_images: int | None = None, num_labelled: int | None = None,
                **guide_options) -> tuple[SSVAE, SSVAEGuide]:
    """M2 with MLP networks (Kingma et al.: one hidden layer of 500, D = 50).

    classifier H*W -> hidden -> C; encoder [x, y] -> hidden -> q(z|x,y); decoder
    [z, y] -> reversed hidden -> logits (H, W). ``guide``: diagonal | fullcov | iaf.
    ``alpha`` defaults to ``default_alpha(num_images, num_labelled)`` (give the training
    set's number of images and of labelled images, or alpha itself).
    """
    from ppl_vae.guides import build_guide

    if alpha is None:
        if num_images is None or num_labelled is None:
            raise ValueError("build_ssvae: give alpha, or num_images and num_labelled for the "
                             "default alpha = default_alpha(num_images, num_labelled)")
        alpha = default_alpha(num_images, num_labelled)
    h, w = image_shape
    classifier = MLP([h * w, *hidden, num_classes])
    decoder = MLPDecoder(latent_dim + num_classes, list(reversed(hidden)), (h, w))
    model = SSVAE(decoder, classifier, latent_dim, alpha, num_classes, likelihood)
    z_guide = build_guide(guide, h * w + num_classes, hidden, latent_dim, inputs=z_inputs,
                          **guide_options)
    return model, SSVAEGuide(classifier, z_guide, num_classes)


# ---- the family: ppl-vae train ssvae -------------------------------------------------------
BINARIZE = ("sample", "threshold")  # one fixed binary draw, or pixel > 0.5


def pick_labelled(y: torch.Tensor, per_class: int, seed: int,
                  num_classes: int = len(CLASSES)) -> torch.Tensor:
    """A bool mask (N,) with ``per_class`` random rows of every class (the labelled images)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(len(y), dtype=torch.bool)
    for c in range(num_classes):
        rows = (y == c).nonzero().squeeze(-1)
        need(len(rows) >= per_class, f"labels_per_class {per_class} (--labels-per-class): "
             f"class {c} ({CLASSES[c]}) has only {len(rows)} training images")
        mask[rows[torch.randperm(len(rows), generator=g)[:per_class]]] = True
    return mask


def unlabelled(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """M2's data for images without labels: (x, y = -1, labelled = False)."""
    return x, torch.full((len(x),), -1, dtype=torch.long), torch.zeros(len(x), dtype=torch.bool)


def accuracy(run: Run, x: torch.Tensor, y: torch.Tensor) -> float:
    """Share of images whose most probable class under q(y | x) is their label."""
    run.model.eval()
    with torch.no_grad():
        predicted = torch.cat([run.model.predict(b.to(run.device)).cpu()
                               for b in x.split(1000)])
    return float((predicted == y).float().mean())


@dataclass
class SSVAESpec:
    """What config.json stores under "spec" for an M2 run (defaults: ``ppl-vae train
    ssvae``). ``labels_per_class`` training images of each class, drawn with
    ``label_seed``, keep their labels; the others are used without. ``alpha=None`` is
    resolved to :func:`default_alpha` of the training set when training starts, and the
    number is stored. ``labelled_share`` S > 0 repeats the labelled images (weight 1/k each,
    :func:`oversample_labelled`) until they are about S of every minibatch."""

    model: str
    labels_per_class: int = 100
    label_seed: int = 0
    alpha: float | None = None  # weight of log q(y|x) per labelled image (None: the rule)
    labelled_share: float = 0.0
    latent_dim: int = 50
    hidden: Sequence[int] = (500,)  # classifier's and encoder's hidden sizes
    guide: str = "diagonal"  # GUIDES, for q(z | x, y)
    flows: int = 2  # IAF steps (guide iaf)
    binarize: str = "sample"  # BINARIZE
    data: str | None = None  # folder with the idx files (None: the usual places)
    download: bool = False
    limit: int | None = None  # first N training images
    val_size: int | None = None  # validation images (None: 5000, or 10% of limit)

    def __post_init__(self) -> None:
        need(self.labels_per_class >= 1, "ssvae spec: labels_per_class (--labels-per-class) "
             f"must be >= 1, got {self.labels_per_class}")
        need(self.alpha is None or self.alpha >= 0,
             f"ssvae spec: alpha must be >= 0, got {self.alpha}")
        need(0.0 <= self.labelled_share < 1.0, "ssvae spec: labelled_share (--labelled-share) "
             f"must be in [0, 1), got {self.labelled_share}")
        resolve_image_data(self, BINARIZE)


@register
class SSVAEFamily(Family):
    """``ppl-vae train ssvae``: M2 on Fashion-MNIST with few labels (labelled rows:
    :func:`pick_labelled`; RUN/labelled_rows.csv lists them)."""

    name = "ssvae"
    models = {"ssvae": "semi-supervised VAE (M2, Kingma et al. 2014): classify with few labels"}
    Spec = SSVAESpec
    fit_defaults = dict(image_fit_defaults(), objective="enum")  # y summed out exactly
    dims = {"z": ["image", "latent_dim"], "x": ["image", "row", "column"]}

    def labelled_rows(self, spec: SSVAESpec) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """((x, y, labelled) of the training rows, with y = -1 where the label is hidden;
        validation images)."""
        (x, y), (xv, _) = train_val(spec, *load_labelled(spec, "train"))
        labelled = pick_labelled(y, spec.labels_per_class, spec.label_seed)
        y = torch.where(labelled, y, torch.full_like(y, -1))  # the hidden labels are not passed
        check_labels(y, labelled, len(CLASSES), name="training labels")
        return (x, y, labelled), xv

    def fit_settings(self, spec: SSVAESpec) -> dict[str, Any]:
        """The fit defaults (objective ``enum``); resolves ``spec.alpha = None`` to
        :func:`default_alpha` of the training rows (reads the training labels)."""
        if spec.alpha is None:
            (x, _, labelled), _ = self.labelled_rows(spec)
            spec.alpha = default_alpha(len(x), int(labelled.sum()))
        return dict(self.fit_defaults)

    def check_fit_settings(self, spec: SSVAESpec, settings: dict[str, Any]) -> None:
        need(settings.get("objective") == "enum", "ssvae trains with objective 'enum' "
             f"(--objective enum: y summed out exactly), not {settings.get('objective')!r}")

    def build(self, spec: SSVAESpec) -> tuple[SSVAE, SSVAEGuide]:
        need(spec.alpha is not None, "ssvae spec: alpha is None; fit_settings(spec) resolves "
             "it from the training set (ppl_vae.train does), or give it")
        return build_ssvae(spec.latent_dim, spec.hidden, len(CLASSES), spec.alpha,
                           guide=spec.guide,
                           **({"num_flows": spec.flows} if spec.guide == "iaf" else {}))

    def load_data(self, spec: SSVAESpec, split: str) -> tuple[torch.Tensor, ...]:
        """train: (x, y, labelled), or (x, y, labelled, weight) with ``labelled_share``;
        val and test: the images without their labels."""
        if split == "test":
            return unlabelled(load_labelled(spec, "test")[0])
        (x, y, labelled), xv = self.labelled_rows(spec)
        if split != "train":
            return unlabelled(xv)
        if spec.labelled_share:
            return oversample_labelled(x, y, labelled, spec.labelled_share)
        return x, y, labelled

    def example(self, spec: SSVAESpec) -> tuple[torch.Tensor, ...]:
        return unlabelled(torch.zeros(2, 28, 28))

    def report(self, run: Run) -> list[Path]:
        """labelled_rows.csv (rows of the training file that kept their label), loss.png,
        samples_per_class.png, summary.json (images, labelled, alpha, accuracy of q(y|x) on
        the first 2000 test images)."""
        from ppl_vae import plots

        out, spec = run.path, run.spec
        (x, _, labelled), _ = self.labelled_rows(spec)
        rows = out / "labelled_rows.csv"
        rows.write_text("row\n" + "".join(
            f"{i}\n" for i in labelled.nonzero().squeeze(-1).tolist()))
        xt, yt = load_labelled(spec, "test", limit=2000)
        summary = {"train_images": len(x), "labelled": int(labelled.sum()),
                   "alpha": spec.alpha, "test_accuracy": accuracy(run, xt, yt),
                   "test_images": len(xt)}
        write_json(summary, out / "summary.json")
        return [rows, out / "summary.json", plots.loss_curve(run.history, out / "loss.png"),
                class_samples(run.model, out / "samples_per_class.png")]

    def evaluate(self, run: Run, iwae_samples: int = 100, limit: int | None = None,
                 seed: int = 0, **_: Any) -> dict[str, Any]:
        """test_accuracy of q(y | x) (argmax), and with y unobserved the test ELBO and the
        importance-sampled log p(x) (K = ``iwae_samples``), nats per image."""
        x, y = load_labelled(run.spec, "test", limit)
        result = {"test_accuracy": accuracy(run, x, y)}
        result.update(score_test_set(run, unlabelled(x), iwae_samples, seed))
        if run.path is not None:
            write_json(result, run.path / "evaluation.json")
        return result

    def sample(self, run: Run, n: int = 64, label: int | None = None,
               out: str | Path | None = None, seed: int = 0, **_: Any) -> dict[str, str]:
        """A PNG of ``n`` generated items of class ``label`` (every class if None)."""
        return sample_classes(run, n, label, out, seed)

