"""The variational autoencoder (Kingma & Welling 2013) and its family on Fashion-MNIST.

    z_i ~ N(0, I_D)                           latent code of image i
    x_i | z_i ~ p(x | f(z_i))                 f = decoder network (MLP or conv)

with the pixel likelihood p(x | f(z)) one of

    bernoulli              binarized pixels x in {0, 1}: Bernoulli(logits=f(z))
    continuous_bernoulli   grey levels x in [0, 1]: ContinuousBernoulli(logits=f(z))
                           (a normalized density, unlike cross-entropy on grey levels)
    gaussian               grey levels: N(sigmoid(f(z)), c) with one learned c, the lecture's
                           N(x | f(z), cI)

The amortized guide q(z|x) lives in :mod:`ppl_vae.guides` (diagonal Normal, full covariance,
IAF); the ELBO E_q[log p(x|z)] - KL(q(z|x) || p(z)) is the engine's business.

Below the model: the image data as every image family trains on it (which rows train and
validate, how pixels are binarized, :func:`load_images`, :func:`train_val`), the shared
test figures and checks, then :class:`VAEFamily` (``ppl-vae train vae``): its spec, fit
defaults, report pictures (loss curve, reconstructions, samples, 2-D latent map), evaluate,
sample and check.
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

from ppl_vae.batching import Data
from ppl_vae.checkpoint import write_json
from ppl_vae.data.images import CLASSES, load_fashion_mnist, validate_images
from ppl_vae.evaluation import elbo, log_likelihood
from ppl_vae.family import Family, register
from ppl_vae.guides import GUIDES, build_guide, point_estimate
from ppl_vae.guides.amortized import AmortizedNormal
from ppl_vae.nn import ConvDecoder, ConvEncoder, MLPDecoder, NormalEncoder, like_parameters
from ppl_vae.program import SetupError

if TYPE_CHECKING:
    from ppl_vae.runs import Run

LIKELIHOODS = ("bernoulli", "continuous_bernoulli", "gaussian")


class VAE(nn.Module):
    """p(z) p(x|z) for images of shape ``image_shape`` (N, H, W in the data).

    Args:
        decoder: module z (..., D) -> logits (..., H, W).
        latent_dim: D.
        likelihood: one of ``LIKELIHOODS``.
        dynamic_binarization: with the Bernoulli likelihood, resample binary pixels from the
            grey levels every time a training batch is seen (train mode); in eval mode grey
            levels are thresholded at 0.5 and binary data pass unchanged (evaluate on one
            fixed binary draw, as the families do, for the usual figures).
    """

    def __init__(self, decoder: nn.Module, latent_dim: int, likelihood: str = "bernoulli",
                 dynamic_binarization: bool = False):
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"unknown likelihood {likelihood!r}; choose one of {LIKELIHOODS}")
        self.decoder = decoder
        self.latent_dim = latent_dim
        self.likelihood = likelihood
        self.dynamic_binarization = dynamic_binarization
        if likelihood == "gaussian":
            self.log_pixel_scale = nn.Parameter(torch.tensor(-2.0))

    def pixel_distribution(self, logits: torch.Tensor) -> dist.Distribution:
        """p(x | z) given the decoder's logits (..., H, W); event shape (H, W)."""
        if self.likelihood == "bernoulli":
            return dist.Bernoulli(logits=logits).to_event(2)
        if self.likelihood == "continuous_bernoulli":
            return dist.ContinuousBernoulli(logits=logits.clamp(-15, 15)).to_event(2)
        return dist.Normal(torch.sigmoid(logits), self.log_pixel_scale.exp()).to_event(2)

    def model(self, x: torch.Tensor, size: int | None = None,
              subsample: torch.Tensor | None = None) -> torch.Tensor:
        """x: images (B, H, W) with values in [0, 1]. Returns z (B, D)."""
        pyro.module("vae", self)
        x = self.binarized(like_parameters(x, self))
        with pyro.plate("data", size or len(x), subsample=subsample):
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.latent_dim), 1.0).to_event(1))
            pyro.sample("x", self.pixel_distribution(self.decoder(z)), obs=x)
        return z

    forward = model

    def binarized(self, x: torch.Tensor) -> torch.Tensor:
        """The observed pixels: with dynamic binarization a Bernoulli draw of the grey levels
        (train mode) or the grey levels thresholded at 0.5 (eval mode: deterministic, and
        exactly x for binary x); otherwise x."""
        if not self.dynamic_binarization:
            return x
        return torch.bernoulli(x) if self.training else (x > 0.5).to(x.dtype)

    @torch.no_grad()
    def mean_image(self, z: torch.Tensor) -> torch.Tensor:
        """E[x | z], shape (..., H, W), values in [0, 1]."""
        logits = self.decoder(z)
        if self.likelihood == "continuous_bernoulli":
            return dist.ContinuousBernoulli(logits=logits.clamp(-15, 15)).mean
        return torch.sigmoid(logits)

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        """n images E[x | z], z ~ p(z): shape (n, H, W)."""
        device = next(self.decoder.parameters()).device
        return self.mean_image(torch.randn(n, self.latent_dim, device=device))


def build_vae(latent_dim: int = 20, architecture: str = "mlp", hidden: Sequence[int] = (400,),
              likelihood: str = "bernoulli", image_shape: Sequence[int] = (28, 28),
              dynamic_binarization: bool = False) -> tuple[VAE, AmortizedNormal]:
    """The VAE and its amortized diagonal-Normal guide with matching networks.

    ``architecture="mlp"``: encoder H*W -> hidden -> (loc, scale), decoder mirrored.
    ``architecture="conv"``: the lecture notebook's conv encoder/decoder (32x32 padding).
    """
    h, w = image_shape
    if architecture == "mlp":
        encoder = NormalEncoder.mlp(h * w, list(hidden), latent_dim, flatten=2)
        decoder = MLPDecoder(latent_dim, list(reversed(hidden)), (h, w))
    elif architecture == "conv":
        encoder = ConvEncoder(latent_dim)
        decoder = ConvDecoder(latent_dim, (h, w))
    else:
        raise ValueError(f"unknown architecture {architecture!r}; choose mlp or conv")
    vae = VAE(decoder, latent_dim, likelihood, dynamic_binarization)
    guide = AmortizedNormal(encoder, site="z", plate="data")
    return vae, guide


def build_guide_for(kind: str, latent_dim: int, hidden: Sequence[int], architecture: str = "mlp",
                    flows: int = 2, image_shape: Sequence[int] = (28, 28)) -> nn.Module:
    """q(z | x) of kind ``diagonal`` | ``fullcov`` | ``iaf`` on the VAE's encoder trunk (MLP
    over the flattened image, or the conv net)."""
    h, w = image_shape
    return build_guide(kind, h * w, list(hidden), latent_dim, flatten=2, num_flows=flows,
                       architecture=architecture)


# ---- the image data every image family trains on -----------------------------------------
TRAIN_SIZE = 60_000  # images in Fashion-MNIST's training file
BINARIZE = ("dynamic", "sample", "threshold", "none")
BINARIZE_TEXT = {  # what each --binarize choice means, for the help of every image family
    "dynamic": "a new binary draw each time a training batch is seen (validation and test: "
               "one fixed draw)",
    "sample": "one fixed draw", "threshold": "pixel > 0.5", "none": "grey levels"}


def binarize_help(choices: tuple[str, ...]) -> str:
    """``--binarize`` help describing exactly ``choices`` (a family's BINARIZE)."""
    return "; ".join(f"{c}: {BINARIZE_TEXT[c]}" for c in choices)


BINARIZE_HELP = binarize_help(BINARIZE)


def need(ok: bool, message: str) -> None:
    """Raise :class:`~ppl_vae.SetupError` with ``message`` unless ``ok``."""
    if not ok:
        raise SetupError(message)


def choose(family: str, field: str, value: Any, choices: Sequence[Any]) -> None:
    need(value in choices, f"{family} spec: {field} {value!r} is not one of "
         f"{', '.join(map(str, choices))}")


def resolve_image_data(spec: Any, binarize: Sequence[str]) -> None:
    """Check and complete, in place, the fields every image family's spec has (the data:
    ``binarize``, ``data``, ``download``, ``limit``, ``val_size``; the networks:
    ``latent_dim``, ``hidden``, ``guide``, ``flows``); errors name the field:

    * ``val_size`` (validation images, the last ones of the training file) defaults to
      5000, or 10% of ``limit`` (at least 1);
    * ``limit`` (the first training images) is cut so that training and validation images
      do not overlap in the 60,000 of Fashion-MNIST;
    * ``data`` (a folder) is stored as a string, ``hidden`` sizes as a list (as config.json
      holds them, so a resumed run's spec compares equal).
    """
    name = spec.model
    choose(name, "binarize", spec.binarize, binarize)
    need(spec.limit is None or (isinstance(spec.limit, int) and spec.limit >= 1),
         f"{name} spec: limit (--limit) must be an integer >= 1, got {spec.limit!r}")
    if spec.val_size is None:
        spec.val_size = 5000 if spec.limit is None else max(1, spec.limit // 10)
    need(isinstance(spec.val_size, int) and 1 <= spec.val_size < TRAIN_SIZE,
         f"{name} spec: val_size (--val-size) must be in 1..{TRAIN_SIZE - 1}, "
         f"got {spec.val_size!r}")
    if spec.limit is not None and spec.limit + spec.val_size > TRAIN_SIZE:
        spec.limit = TRAIN_SIZE - spec.val_size
    if spec.data is not None:
        spec.data = str(spec.data)
    spec.download = bool(spec.download)
    spec.hidden = [int(h) for h in spec.hidden]
    need(len(spec.hidden) >= 1 and min(spec.hidden) >= 1,
         f"{name} spec: hidden sizes must be >= 1, got {spec.hidden}")
    need(spec.latent_dim >= 1, f"{name} spec: latent_dim must be >= 1, got {spec.latent_dim}")
    choose(name, "guide", spec.guide, GUIDES)
    need(spec.flows >= 1, f"{name} spec: flows must be >= 1, got {spec.flows}")


def load_images(spec: Any, split: str, limit: int | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 28, 28) and labels (N,) of a file (``train``: the whole training file,
    validation rows included; ``test``), binarized as the run trains: ``dynamic`` keeps grey
    levels for training (the model draws binary pixels each step) and scores the test split
    on one fixed binary draw. Checked before any training step; ``limit``: first N only."""
    binarize = spec.binarize
    if binarize == "dynamic":
        binarize = "sample" if split == "test" else "none"
    x, y = load_fashion_mnist(spec.data, split, limit=limit,
                              binarize=None if binarize == "none" else binarize,
                              download=spec.download)
    validate_images(x, binary=binarize != "none", name=f"{split} images")
    return x, y


def train_val(spec: Any, x: torch.Tensor, *rest: torch.Tensor,
              ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """Split the training file's tensors (rows first) into the training rows (the first
    ``limit``, else all but the validation rows) and the validation rows (the last
    ``val_size``; one fixed binary draw of the images when training binarizes dynamically)."""
    need(spec.val_size < len(x), f"{spec.model}: val_size {spec.val_size} leaves no "
         f"training images: the training file has {len(x)} (set --val-size / val_size)")
    n = len(x) - spec.val_size
    n = min(spec.limit, n) if spec.limit else n
    tensors = (x, *rest)
    train = tuple(t[:n] for t in tensors)
    val = tuple(t[-spec.val_size:] for t in tensors)
    if spec.binarize == "dynamic":
        val = (torch.bernoulli(val[0], generator=torch.Generator().manual_seed(1)), *val[1:])
    return train, val


def score_test_set(run: Run, data: Data, iwae_samples: int, seed: int) -> dict[str, Any]:
    """Test ELBO and the importance-sampled log p(x) (K = ``iwae_samples``), nats per image,
    of ``data``; written to RUN/evaluation.json too."""
    torch.manual_seed(seed)
    n = len(data[0] if isinstance(data, tuple) else data)
    result = {"elbo": elbo(run.model, run.guide, data, device=run.device),
              "log_likelihood": log_likelihood(run.model, run.guide, data,
                                               num_samples=iwae_samples, device=run.device),
              "iwae_samples": iwae_samples, "test_images": n}
    if run.path is not None:
        write_json(result, run.path / "evaluation.json")
    return result


def check_images(run: Run, data: Data, dims: dict, samples: int, khat_samples: int,
                 seed: int) -> dict[str, Any]:
    """``ppl-vae check`` on a few test images (``data``; 50 keep the pictures, predictive
    draws and posterior.nc small): codes z[image, latent_dim], PPC of the per-pixel means
    (the mean image of the replicates vs of the data, 784 statistics), k-hat of
    log p(x, z) - log q(z | x) per image; ``pareto_k`` is the share of images with
    k-hat >= 0.7 (an IWAE estimate of log p(x) for those is unreliable)."""
    import numpy as np

    from ppl_vae.checks import check_posterior

    n = len(data[0] if isinstance(data, tuple) else data)
    ppc = {f"per-pixel mean over the {n} test images (784 pixels)":
           ("x", lambda img: np.nanmean(img, 0).reshape(-1), None)}
    torch.manual_seed(seed)
    result = check_posterior(run.model, run.guide, data, run.path, dims=dims,
                             num_samples=min(samples, 100), khat_samples=khat_samples,
                             ppc=ppc, seed=seed, device=run.device, plot_points=3)
    write_json(result, run.path / "check.json")
    return result


def image_fit_defaults() -> dict[str, Any]:
    """The training defaults of the image families (the KL weight --beta acts on ``z``)."""
    return {"epochs": 10, "batch_size": 128, "lr": 1e-3, "objective": "trace",
            "kl_sites": ("z",)}


# ---- the family: ppl-vae train vae ---------------------------------------------------------
@dataclass
class VAESpec:
    """What config.json stores under "spec" for a VAE run (defaults: ``ppl-vae train vae``)."""

    model: str
    latent_dim: int = 20
    architecture: str = "mlp"  # mlp | conv
    hidden: Sequence[int] = (400,)  # MLP encoder's hidden sizes (decoder mirrored)
    likelihood: str = "bernoulli"  # LIKELIHOODS
    binarize: str | None = None  # BINARIZE; None: dynamic for bernoulli, else none
    data: str | None = None  # folder with the idx files (None: the usual places)
    download: bool = False
    limit: int | None = None  # first N training images
    val_size: int | None = None  # validation images (None: 5000, or 10% of limit)
    guide: str = "diagonal"  # GUIDES
    flows: int = 2  # IAF steps (guide iaf)

    def __post_init__(self) -> None:
        choose("vae", "likelihood", self.likelihood, LIKELIHOODS)
        choose("vae", "architecture", self.architecture, ("mlp", "conv"))
        if self.binarize is None:
            self.binarize = "dynamic" if self.likelihood == "bernoulli" else "none"
        need(self.likelihood == "bernoulli" or self.binarize == "none",
             f"binarize {self.binarize} needs likelihood bernoulli (grey-level likelihoods "
             "take binarize none)")
        need(self.likelihood != "bernoulli" or self.binarize != "none",
             "the Bernoulli likelihood needs binary pixels: choose binarize dynamic, sample "
             "or threshold (--binarize), or a grey-level likelihood")
        resolve_image_data(self, BINARIZE)


@register
class VAEFamily(Family):
    """``ppl-vae train vae``: the VAE above with one of the guides on Fashion-MNIST."""

    name = "vae"
    models = {"vae": "variational autoencoder on Fashion-MNIST (MLP or conv networks)"}
    Spec = VAESpec
    fit_defaults = image_fit_defaults()
    dims = {"z": ["image", "latent_dim"], "x": ["image", "row", "column"]}

    def build(self, spec: VAESpec) -> tuple[VAE, nn.Module]:
        model, guide = build_vae(spec.latent_dim, spec.architecture, spec.hidden,
                                 spec.likelihood, dynamic_binarization=spec.binarize == "dynamic")
        if spec.guide != "diagonal":
            guide = build_guide_for(spec.guide, spec.latent_dim, spec.hidden, spec.architecture,
                                    spec.flows)
        return model, guide

    def load_data(self, spec: VAESpec, split: str) -> torch.Tensor:
        if split == "test":
            return load_images(spec, "test")[0]
        train, val = train_val(spec, load_images(spec, "train")[0])
        return train[0] if split == "train" else val[0]

    def example(self, spec: VAESpec) -> torch.Tensor:
        return torch.zeros(2, 28, 28)

    def report(self, run: Run) -> list[Path]:
        """loss.png, reconstructions.png (8 test images over E[x | z = mean of q(z|x)]),
        samples.png (64 images E[x | z], z ~ p(z)); with D = 2 also latent_scatter.png (the
        codes of 2000 test images colored by class) and latent_grid.png (decoded grid)."""
        from ppl_vae import plots

        model, guide, out = run.model, run.guide, run.path
        paths = [plots.loss_curve(run.history, out / "loss.png")]
        model.eval()
        guide.eval()
        x_test, y_test = load_images(run.spec, "test", limit=2000)
        with torch.no_grad():
            x8 = x_test[:8].to(run.device)
            recon = model.mean_image(point_estimate(guide.distribution(x8))).cpu()
            paths.append(plots.reconstructions(x8.cpu(), recon, out / "reconstructions.png"))
            torch.manual_seed(0)
            paths.append(plots.image_grid(model.sample(64).cpu(), out / "samples.png",
                                          title="samples: E[x | z], z ~ N(0, I)"))
            if run.spec.latent_dim == 2:
                z = point_estimate(guide.distribution(x_test.to(run.device))).cpu()
                paths.append(plots.latent_scatter(z, y_test, out / "latent_scatter.png",
                                                  CLASSES))
                paths.append(plots.latent_grid(model.mean_image, out / "latent_grid.png",
                                               device=run.device))
        return paths

    def evaluate(self, run: Run, iwae_samples: int = 100, limit: int | None = None,
                 seed: int = 0, **_: Any) -> dict[str, Any]:
        """Test ELBO and importance-sampled log p(x) with K = ``iwae_samples`` (the bound
        tightens as K grows; 1000 for the full estimate), nats per image, on the first
        ``limit`` test images (all by default)."""
        return score_test_set(run, load_images(run.spec, "test", limit)[0], iwae_samples, seed)

    def sample(self, run: Run, n: int = 64, label: int | None = None,
               out: str | Path | None = None, seed: int = 0, **_: Any) -> dict[str, str]:
        """A PNG grid of ``n`` images E[x | z], z ~ p(z) (default RUN/samples_<n>.png)."""
        from ppl_vae import plots

        need(label is None, "--label needs a conditional model (train cvae or ssvae)")
        need(n >= 1, f"--n must be >= 1, got {n}")
        torch.manual_seed(seed)
        path = Path(out) if out is not None else run.path / f"samples_{n}.png"
        plots.image_grid(run.model.sample(n).cpu(), path, title="samples: E[x | z], z ~ N(0, I)")
        return {"samples": str(path)}

    def check(self, run: Run, samples: int = 500, khat_samples: int = 1000, seed: int = 0,
              **_: Any) -> dict[str, Any]:
        """Posterior checks on the first 50 test images (:func:`check_images`)."""
        x, _ = load_images(run.spec, "test", limit=50)
        return check_images(run, x, self.dims, samples, khat_samples, seed)
