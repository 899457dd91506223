"""Small network building blocks shared by models and guides.

Every block accepts inputs with any number of leading batch dims (``(..., features)`` or
``(..., C, H, W)``), so models stay vectorizable over Pyro's particle plates.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

ACTIVATIONS = {"relu": nn.ReLU, "softplus": nn.Softplus, "tanh": nn.Tanh, "elu": nn.ELU,
               "gelu": nn.GELU}


def like_parameters(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """``x`` in the dtype of ``module``'s parameters: uint8, bool or float64 images enter a
    float32 network as float32 (values unchanged)."""
    p = next(module.parameters(), None)
    return x if p is None or x.dtype == p.dtype else x.to(p.dtype)


class MLP(nn.Sequential):
    """Linear layers with an activation between them (none after the last).

    ``MLP([784, 400, 20])`` maps (..., 784) -> (..., 20).
    """

    def __init__(self, sizes: Sequence[int], activation: str = "relu", dropout: float = 0.0):
        if len(sizes) < 2:
            raise ValueError(f"MLP needs at least input and output sizes, got {list(sizes)}")
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(ACTIVATIONS[activation]())
                if dropout:
                    layers.append(nn.Dropout(dropout))
        super().__init__(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(like_parameters(x, self))


def mlp_body(input_dim: int, hidden: Sequence[int], activation: str = "relu") -> nn.Module:
    """An encoder's trunk: MLP input_dim -> hidden[...] with the activation after every layer,
    (..., input_dim) -> (..., hidden[-1])."""
    return nn.Sequential(MLP([input_dim, *hidden], activation), ACTIVATIONS[activation]())


class NormalHead(nn.Module):
    """Maps features (..., H) to the parameters (loc, scale) of a diagonal Normal, each
    (..., D); scale = softplus(.) + min_scale keeps it positive."""

    def __init__(self, hidden: int, latent_dim: int, min_scale: float = 1e-4):
        super().__init__()
        self.loc = nn.Linear(hidden, latent_dim)
        self.scale = nn.Linear(hidden, latent_dim)
        self.min_scale = min_scale

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.loc(h), F.softplus(self.scale(h)) + self.min_scale


class NormalEncoder(nn.Module):
    """body network -> NormalHead: an encoder q(z|x) = N(loc(x), diag scale(x)^2).

    ``NormalEncoder.mlp(784, [400], 20)`` is the usual MLP encoder for 28x28 images.
    """

    def __init__(self, body: nn.Module, hidden: int, latent_dim: int, flatten: int = 0):
        super().__init__()
        self.body = body
        self.head = NormalHead(hidden, latent_dim)
        self.flatten = flatten  # number of trailing input dims to flatten (2 for HxW images)

    @classmethod
    def mlp(cls, input_dim: int, hidden: Sequence[int], latent_dim: int,
            activation: str = "relu", flatten: int = 0) -> NormalEncoder:
        return cls(mlp_body(input_dim, hidden, activation), hidden[-1], latent_dim,
                   flatten=flatten)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = like_parameters(x, self)
        if self.flatten:
            x = x.flatten(-self.flatten)
        return self.head(self.body(x))


def _pad_to_32(x: torch.Tensor) -> torch.Tensor:
    h, w = x.shape[-2:]
    if (h, w) == (32, 32):
        return x
    if h > 32 or w > 32:
        raise ValueError(f"conv networks take images up to 32x32, got {h}x{w}")
    top, left = (32 - h) // 2, (32 - w) // 2
    return F.pad(x, (left, 32 - w - left, top, 32 - h - top))


class ConvBody(nn.Module):
    """The lecture notebook's convolutional trunk: pad to 32x32, three 3x3 convs with stride
    2 (32, 64, 128 channels, ReLU), flatten: (..., H, W) or (..., C, H, W) grey images ->
    features (..., 128*4*4 = 2048 = ``out_features``). Any encoder head can sit on it (the
    diagonal, full-covariance and IAF guides take it as their ``body``)."""

    def __init__(self, channels: int = 1, widths: Sequence[int] = (32, 64, 128)):
        super().__init__()
        layers, c = [], channels
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, stride=2, padding=1), nn.ReLU()]
            c = w
        self.convs = nn.Sequential(*layers, nn.Flatten())
        self.channels = channels
        self.out_features = c * 4 * 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = like_parameters(x, self)
        if self.channels == 1 and (x.dim() < 4 or x.shape[-3] != 1):
            x = x.unsqueeze(-3)
        batch = x.shape[:-3]
        h = self.convs(_pad_to_32(x.reshape(-1, *x.shape[-3:])))
        return h.reshape(*batch, self.out_features)


class ConvEncoder(ConvBody):
    """:class:`ConvBody` -> NormalHead: input (..., H, W) or (..., C, H, W) grey images;
    output (loc, scale), each (..., D)."""

    def __init__(self, latent_dim: int, channels: int = 1, widths: Sequence[int] = (32, 64, 128)):
        super().__init__(channels, widths)
        self.head = NormalHead(self.out_features, latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(super().forward(x))


class ConvDecoder(nn.Module):
    """The mirrored decoder: z -> 2048 -> (128, 4, 4) -> three 3x3 transposed convs with
    stride 2 (128, 64, 32 channels, ReLU) -> 3x3 conv to one channel at 32x32 -> cropped to
    ``image_size``. Returns logits (..., H, W) for the likelihood."""

    def __init__(self, latent_dim: int, image_size: tuple[int, int] = (28, 28),
                 widths: Sequence[int] = (128, 64, 32)):
        super().__init__()
        self.fc = nn.Linear(latent_dim, widths[0] * 4 * 4)
        layers, c = [], widths[0]
        for w in widths:
            layers += [nn.ConvTranspose2d(c, w, 3, stride=2, padding=1, output_padding=1),
                       nn.ReLU()]
            c = w
        self.deconvs = nn.Sequential(*layers, nn.Conv2d(c, 1, 3, padding=1))
        self.first = widths[0]
        self.image_size = tuple(image_size)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        batch = z.shape[:-1]
        h = self.fc(z.reshape(-1, z.shape[-1])).reshape(-1, self.first, 4, 4)
        out = self.deconvs(h).squeeze(-3)
        hh, ww = self.image_size
        top, left = (32 - hh) // 2, (32 - ww) // 2
        out = out[..., top:top + hh, left:left + ww]
        return out.reshape(*batch, hh, ww)


class MLPDecoder(nn.Module):
    """z (..., D) -> MLP -> logits reshaped to ``output_shape`` (e.g. (28, 28))."""

    def __init__(self, latent_dim: int, hidden: Sequence[int], output_shape: Sequence[int],
                 activation: str = "relu"):
        super().__init__()
        self.output_shape = tuple(output_shape)
        size = 1
        for s in self.output_shape:
            size *= s
        self.net = MLP([latent_dim, *hidden, size], activation)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).reshape(*z.shape[:-1], *self.output_shape)


class DocumentEncoder(nn.Module):
    """Bag-of-words encoder of the topic models (Srivastava & Sutton 2017, AVITM):

        h = dropout(softplus(W2 softplus(W1 x)))         x: word counts (..., V)
        head "normal":    loc = BN(W_mu h),  scale = exp(log_var / 2)            each (..., K)
            variance "batchnorm": log_var = BN(W_logvar h)                         (AVITM)
            variance "bounded":   log_var = c tanh(W_logvar h / c),  c = max_log_variance
        head "dirichlet": concentration = softplus(BN(W_a h)) + min_concentration (..., K)

    The batch norms have no affine part (they keep the heads' scale fixed, which avoids the
    component collapse of plain VAEs on text). On the log-variance that also fixes the
    posterior's noise: over a minibatch its log-variance has mean 0 and variance 1 in every
    topic, so no document can be placed precisely, and ProdLDA then spreads one theme over
    several topics that documents use together (less noise in their sum; BBC_News, K=50:
    near-copies whose proportions correlate at 0.89-1.00). ``variance="bounded"`` lets each
    document have its own log-variance within [-c, c] (the bound keeps it finite on
    documents unlike the training ones): BBC_News diversity 0.65 -> 0.74 at K=20, where the
    copies left are no longer used together, 0.40 -> 0.44 at K=50, where most still are
    (benchmarks/RESULTS.md, "Issue 16"). The normal head
    feeds :class:`ppl_vae.guides.amortized.AmortizedNormal` (a logistic-normal posterior of
    log theta), the Dirichlet head :class:`ppl_vae.guides.dirichlet.AmortizedDirichlet`.
    """

    VARIANCES = ("batchnorm", "bounded")

    def __init__(self, vocab_size: int, num_topics: int, hidden: int = 100,
                 dropout: float = 0.2, head: str = "normal", min_concentration: float = 1e-3,
                 variance: str = "batchnorm", max_log_variance: float = 3.0):
        super().__init__()
        if head not in ("normal", "dirichlet"):
            raise ValueError(f"unknown head {head!r}; choose normal or dirichlet")
        if variance not in self.VARIANCES:
            raise ValueError(f"unknown variance {variance!r}; choose one of {self.VARIANCES}")
        if not max_log_variance > 0:
            raise ValueError(f"max_log_variance must be > 0, got {max_log_variance}")
        self.variance, self.max_log_variance = variance, float(max_log_variance)
        self.body = nn.Sequential(nn.Linear(vocab_size, hidden), nn.Softplus(),
                                  nn.Linear(hidden, hidden), nn.Softplus(), nn.Dropout(dropout))
        self.head = head
        self.min_concentration = min_concentration
        self.fc1 = nn.Linear(hidden, num_topics)
        self.bn1 = nn.BatchNorm1d(num_topics, affine=False)
        if head == "normal":
            self.fc2 = nn.Linear(hidden, num_topics)
            if variance == "batchnorm":
                self.bn2 = nn.BatchNorm1d(num_topics, affine=False)

    @staticmethod
    def _bn(bn: nn.BatchNorm1d, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if bn.training and flat.shape[0] == 1:  # a lone document: use the running statistics
            return F.batch_norm(flat, bn.running_mean, bn.running_var, training=False,
                                eps=bn.eps).reshape(x.shape)
        return bn(flat).reshape(x.shape)

    def forward(self, x: torch.Tensor):
        """x: counts (B, V), dense or a sparse CSR batch (the first layer then reads only the
        nonzero counts, as an embedding bag: the same numbers, far fewer operations)."""
        if x.layout == torch.sparse_csr:
            first = self.body[0]
            crow = x.crow_indices()
            h = F.embedding_bag(x.col_indices(), first.weight.t(), crow[:-1],
                                per_sample_weights=x.values().to(first.weight.dtype),
                                mode="sum", include_last_offset=False) + first.bias
            h = self.body[1:](h)
        else:
            h = self.body(x)
        if self.head == "dirichlet":
            return F.softplus(self._bn(self.bn1, self.fc1(h))) + self.min_concentration
        loc = self._bn(self.bn1, self.fc1(h))
        if self.variance == "bounded":
            c = self.max_log_variance
            log_var = c * torch.tanh(self.fc2(h) / c)
        else:
            log_var = self._bn(self.bn2, self.fc2(h))
        return loc, (0.5 * log_var).exp()
