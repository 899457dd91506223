"""The conditional variational autoencoder (Sohn et al. 2015; lectures 003/004).

    y_i                       observed class label of item i (one-hot, C classes)
    z_i | y_i ~ p(z | y_i)    fixed prior N(0, I_D), or a learned conditional prior
                              N(m(y_i), diag s(y_i)^2) (``prior="learned"``)
    x_i | z_i, y_i ~ p(x | f(z_i, y_i))     f = decoder network on [z, onehot(y)]

and the amortized guide q(z | x, y) = N(g(x, y)) (any vector guide of :mod:`ppl_vae.guides`
on the encoder input [x, onehot(y)], see :func:`encoder_input`). The engine's ELBO is then
the lecture's CVAE objective

    L(x, y) = E_q(z|x,y) [log p(x | z, y)] - KL(q(z | x, y) || p(z | y)).

Pictures: :meth:`CVAE.generate` (items of one class from the prior) and
:meth:`CVAE.style_transfer` (encode an item with its own label -- its "style" z -- and
decode z with every label).

Below the model and its guide builder: the labelled image data (:func:`load_labelled`), the
class-conditional pictures M2 shares (:func:`sample_classes`, :func:`class_samples`), and
:class:`CVAEFamily` (``ppl-vae train cvae``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.nn import functional as F

from ppl_vae.data.images import CLASSES
from ppl_vae.family import Family, register
from ppl_vae.guides import point_estimate
from ppl_vae.guides.amortized import AmortizedNormal
from ppl_vae.models.vae import (
    VAE,
    check_images,
    choose,
    image_fit_defaults,
    load_images,
    need,
    resolve_image_data,
    score_test_set,
    train_val,
)
from ppl_vae.nn import MLPDecoder, NormalEncoder, like_parameters

if TYPE_CHECKING:
    from ppl_vae.runs import Run

PRIORS = ("fixed", "learned")


def one_hot(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Labels (...,) int64 -> float one-hot (..., C); errors name the first bad label."""
    if y.is_floating_point():
        raise ValueError(f"labels must be integers, got {y.dtype}")
    bad = (y < 0) | (y >= num_classes)
    if bad.any():
        i = int(bad.nonzero()[0][0]) if bad.dim() else 0
        raise ValueError(f"label {int(y.reshape(-1)[i])} at row {i} outside 0..{num_classes - 1}")
    return F.one_hot(y, num_classes).to(torch.get_default_dtype())


def concat(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[a, b] along the last dim, broadcasting the leading (particle/enumeration) dims."""
    batch = torch.broadcast_shapes(a.shape[:-1], b.shape[:-1])
    return torch.cat([a.expand(*batch, a.shape[-1]), b.expand(*batch, b.shape[-1])], -1)


def encoder_input(num_classes: int):
    """``inputs=`` for a guide of a CVAE: (x (B, H, W), y (B,)) -> [x flattened, onehot(y)]
    of shape (B, H*W + C)."""
    def inputs(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return concat(x.flatten(-2), one_hot(y, num_classes))
    inputs.num_classes = num_classes  # type: ignore[attr-defined]
    return inputs


class ConditionalPrior(nn.Module):
    """p(z | y) = N(m(y), diag s(y)^2): one embedding per class, (B, C) -> (B, D) each.
    Starts at N(0, I)."""

    def __init__(self, num_classes: int, latent_dim: int):
        super().__init__()
        self.loc = nn.Linear(num_classes, latent_dim, bias=False)
        self.log_scale = nn.Linear(num_classes, latent_dim, bias=False)
        nn.init.zeros_(self.loc.weight)
        nn.init.zeros_(self.log_scale.weight)

    def forward(self, y_onehot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.loc(y_onehot), self.log_scale(y_onehot).clamp(-5, 3).exp()


class CVAE(VAE):
    """p(z | y) p(x | z, y) for labelled images (x (N, H, W) in [0, 1], y (N,) in 0..C-1).

    Args:
        decoder: module [z, onehot(y)] (..., D + C) -> logits (..., H, W).
        latent_dim: D; num_classes: C.
        prior: ``fixed`` (N(0, I)) or ``learned`` (:class:`ConditionalPrior`).
        likelihood, dynamic_binarization: as for :class:`~ppl_vae.models.vae.VAE`.
    """

    def __init__(self, decoder: nn.Module, latent_dim: int, num_classes: int = 10,
                 prior: str = "fixed", likelihood: str = "bernoulli",
                 dynamic_binarization: bool = False):
        super().__init__(decoder, latent_dim, likelihood, dynamic_binarization)
        if prior not in PRIORS:
            raise ValueError(f"unknown prior {prior!r}; choose one of {PRIORS}")
        self.num_classes = num_classes
        self.prior = prior
        if prior == "learned":
            self.prior_net = ConditionalPrior(num_classes, latent_dim)

    def prior_distribution(self, y_onehot: torch.Tensor) -> dist.Distribution:
        """p(z | y), batch shape (B,), event shape (D,)."""
        if self.prior == "learned":
            loc, scale = self.prior_net(y_onehot)
            return dist.Normal(loc, scale).to_event(1)
        zeros = y_onehot.new_zeros(*y_onehot.shape[:-1], self.latent_dim)
        return dist.Normal(zeros, 1.0).to_event(1)

    def model(self, x: torch.Tensor, y: torch.Tensor, size: int | None = None,
              subsample: torch.Tensor | None = None) -> torch.Tensor:
        """x: images (B, H, W) in [0, 1]; y: labels (B,). Returns z (B, D)."""
        pyro.module("cvae", self)
        x = self.binarized(like_parameters(x, self))
        y1 = one_hot(y, self.num_classes)
        with pyro.plate("data", size or len(x), subsample=subsample):
            z = pyro.sample("z", self.prior_distribution(y1))
            pyro.sample("x", self.pixel_distribution(self.decoder(concat(z, y1))), obs=x)
        return z

    forward = model

    @torch.no_grad()
    def mean_image(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """E[x | z, y] for z (..., D) and labels y (...,): shape (..., H, W) in [0, 1]."""
        logits = self.decoder(concat(z, one_hot(y, self.num_classes)))
        if self.likelihood == "continuous_bernoulli":
            return dist.ContinuousBernoulli(logits=logits.clamp(-15, 15)).mean
        return torch.sigmoid(logits)

    @torch.no_grad()
    def generate(self, label: int, n: int) -> torch.Tensor:  # type: ignore[override]
        """n items of class ``label``: E[x | z, y], z ~ p(z | y); shape (n, H, W)."""
        device = next(self.decoder.parameters()).device
        y = torch.full((n,), int(label), dtype=torch.long, device=device)
        z = self.prior_distribution(one_hot(y, self.num_classes)).sample()
        return self.mean_image(z, y)

    sample = generate

    @torch.no_grad()
    def style_transfer(self, guide: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Encode each item with its own label (z = mean of q(z | x, y)), decode with every
        label: shape (B, C, H, W); entry [i, c] is item i redrawn as class c."""
        z = point_estimate(guide.distribution(x, y))               # (B, D)
        labels = torch.arange(self.num_classes, device=z.device)   # (C,)
        return self.mean_image(z.unsqueeze(1).expand(-1, self.num_classes, -1),
                               labels.expand(len(z), -1))


def build_cvae(latent_dim: int = 20, hidden: Sequence[int] = (400,), num_classes: int = 10,
               prior: str = "fixed", likelihood: str = "bernoulli",
               image_shape: Sequence[int] = (28, 28), guide: str = "diagonal",
               **guide_options) -> tuple[CVAE, nn.Module]:
    """A CVAE with MLP networks and its amortized guide q(z | x, y).

    Encoder [x, onehot(y)] (H*W + C) -> hidden -> q's parameters; decoder [z, onehot(y)]
    (D + C) -> reversed hidden -> logits (H, W). ``guide``: diagonal | fullcov | iaf (see
    :func:`ppl_vae.guides.build_guide`).
    """
    h, w = image_shape
    decoder = MLPDecoder(latent_dim + num_classes, list(reversed(hidden)), (h, w))
    model = CVAE(decoder, latent_dim, num_classes, prior, likelihood)
    inputs = encoder_input(num_classes)
    if guide == "diagonal":
        q = AmortizedNormal(NormalEncoder.mlp(h * w + num_classes, list(hidden), latent_dim),
                            site="z", plate="data", inputs=inputs)
    else:
        from ppl_vae.guides import build_guide

        q = build_guide(guide, h * w + num_classes, hidden, latent_dim, inputs=inputs,
                        **guide_options)
    return model, q



# ---- labelled images and class pictures (shared with M2, models/ssvae.py) -----------------
BINARIZE = ("dynamic", "sample", "threshold")  # the Bernoulli likelihood's binary pixels


def load_labelled(spec: Any, split: str, limit: int | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 28, 28) and labels (N,) of a file, binarized as the run trains
    (:func:`ppl_vae.models.vae.load_images`); labels checked to be in 0..9 (an error names the
    row) before any training step."""
    x, y = load_images(spec, split, limit)
    one_hot(y, len(CLASSES))
    return x, y


def class_samples(model: CVAE, path: Path, per_class: int = 8) -> Path:
    """``per_class`` generated items of every class, one class per row (seed 0)."""
    from ppl_vae import plots

    model.eval()
    torch.manual_seed(0)
    images = torch.cat([model.generate(c, per_class) for c in range(model.num_classes)])
    return plots.image_grid(images.cpu(), path, nrow=per_class,
                            title="generated items, one class per row",
                            row_labels=CLASSES[:model.num_classes])


def sample_classes(run: Run, n: int = 64, label: int | None = None,
                   out: str | Path | None = None, seed: int = 0) -> dict[str, str]:
    """A PNG of ``n`` generated items of class ``label`` (``n`` of every class if None)."""
    from ppl_vae import plots

    classes = run.model.num_classes
    need(label is None or 0 <= label < classes,
         f"--label must be in 0..{classes - 1}, got {label}")
    need(n >= 1, f"--n must be >= 1, got {n}")
    torch.manual_seed(seed)
    if label is None:
        images = torch.cat([run.model.generate(c, n) for c in range(classes)])
        path, title = run.path / f"samples_{n}.png", f"rows: classes 0..{classes - 1}"
    else:
        images = run.model.generate(label, n)
        path = run.path / f"samples_label{label}_{n}.png"
        title = f"class {label}: {CLASSES[label]}"
    path = Path(out) if out is not None else path
    plots.image_grid(images.cpu(), path, nrow=min(n, 16), title=title)
    return {"samples": str(path)}


# ---- the family: ppl-vae train cvae --------------------------------------------------------
@dataclass
class CVAESpec:
    """What config.json stores under "spec" for a CVAE run (defaults: ``ppl-vae train cvae``)."""

    model: str
    latent_dim: int = 20
    hidden: Sequence[int] = (400,)  # MLP encoder's hidden sizes (decoder mirrored)
    prior: str = "fixed"  # PRIORS: N(0, I) or a learned p(z | y)
    guide: str = "diagonal"  # GUIDES, for q(z | x, y)
    flows: int = 2  # IAF steps (guide iaf)
    binarize: str = "dynamic"  # BINARIZE
    data: str | None = None  # folder with the idx files (None: the usual places)
    download: bool = False
    limit: int | None = None  # first N training images
    val_size: int | None = None  # validation images (None: 5000, or 10% of limit)

    def __post_init__(self) -> None:
        choose("cvae", "prior", self.prior, PRIORS)
        resolve_image_data(self, BINARIZE)


@register
class CVAEFamily(Family):
    """``ppl-vae train cvae``: the CVAE above on labelled Fashion-MNIST."""

    name = "cvae"
    models = {"cvae": "conditional VAE q(z|x,y), p(x|z,y) on labelled Fashion-MNIST"}
    Spec = CVAESpec
    fit_defaults = image_fit_defaults()
    dims = {"z": ["image", "latent_dim"], "x": ["image", "row", "column"]}

    def build(self, spec: CVAESpec) -> tuple[CVAE, nn.Module]:
        model, guide = build_cvae(spec.latent_dim, spec.hidden, len(CLASSES), spec.prior,
                                  guide=spec.guide, **({"num_flows": spec.flows}
                                                       if spec.guide == "iaf" else {}))
        model.dynamic_binarization = spec.binarize == "dynamic"
        return model, guide

    def load_data(self, spec: CVAESpec, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        if split == "test":
            return load_labelled(spec, "test")
        train, val = train_val(spec, *load_labelled(spec, "train"))
        return train if split == "train" else val

    def example(self, spec: CVAESpec) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(2, 28, 28), torch.zeros(2, dtype=torch.long)

    def report(self, run: Run) -> list[Path]:
        """loss.png; samples_per_class.png (a row of generated items per class);
        style_transfer.png (8 test items, first column, redrawn with every label)."""
        from ppl_vae import plots

        model, guide, out = run.model, run.guide, run.path
        paths = [plots.loss_curve(run.history, out / "loss.png"),
                 class_samples(model, out / "samples_per_class.png")]
        guide.eval()
        x, y = load_labelled(run.spec, "test", limit=8)
        with torch.no_grad():
            moved = model.style_transfer(guide, x.to(run.device), y.to(run.device)).cpu()
        grid = torch.cat([x.unsqueeze(1), moved], 1).reshape(-1, *x.shape[1:])
        paths.append(plots.image_grid(grid, out / "style_transfer.png", nrow=len(CLASSES) + 1,
                                      title="original | decoded with labels 0..9"))
        return paths

    def evaluate(self, run: Run, iwae_samples: int = 100, limit: int | None = None,
                 seed: int = 0, **_: Any) -> dict[str, Any]:
        """Test ELBO and importance-sampled log p(x | y) with K = ``iwae_samples``, nats per
        image, on the first ``limit`` test images (all by default)."""
        return score_test_set(run, load_labelled(run.spec, "test", limit), iwae_samples, seed)

    def sample(self, run: Run, n: int = 64, label: int | None = None,
               out: str | Path | None = None, seed: int = 0, **_: Any) -> dict[str, str]:
        """A PNG of ``n`` generated items of class ``label`` (every class if None)."""
        return sample_classes(run, n, label, out, seed)

    def check(self, run: Run, samples: int = 500, khat_samples: int = 1000, seed: int = 0,
              **_: Any) -> dict[str, Any]:
        """Posterior checks on the first 50 test images and their labels: codes from
        q(z | x, y), k-hat of log p(x, z | y) - log q(z | x, y)
        (:func:`ppl_vae.models.vae.check_images`)."""
        data = load_labelled(run.spec, "test", limit=50)
        return check_images(run, data, self.dims, samples, khat_samples, seed)
