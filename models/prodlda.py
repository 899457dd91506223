"""ProdLDA (Srivastava & Sutton 2017, "Autoencoding variational inference for topic models").

For document i with word counts x_i (a V-vector, N_i = sum_v x_iv words) and K topics:

    beta_kv ~ N(0, 1/lambda)                          topic k's log-odds of word v (MAP)
    log theta_i ~ N(mu, diag sigma^2)                 logistic-normal prior, theta = softmax
    x_i | theta_i ~ Multinomial(N_i, softmax(b + beta^T theta_i))      product of experts

b (V,) is a background of log word frequencies (initialized from the training counts,
learned), so a topic's row of beta holds only its departures from the corpus's word
frequencies, and the Normal prior of precision lambda (``beta_precision``) keeps rare words
from taking over topics on the strength of a few documents (issue 16: without it the
validation ELBO keeps improving while the topics drift to rare words). The prior enters
the training objective only; held-out ELBOs (early stopping, perplexity) score documents.

``decoder_bn=True`` is AVITM's original decoder, softmax(BN(beta^T theta_i)) with a batch
norm without affine part and no background or prior. Batch norm forces every word's logit
to mean 0 and variance 1 over a minibatch, so the model cannot say that a word is rare
except through a topic that loads on rare words: on BBC_News, K=20, two or three such
"junk" topics (NPMI about -0.45, e.g. *satisfy explode broadcasting transform check*) in
every run (benchmarks/RESULTS.md, "Issue 16").

(mu, sigma^2) is the Laplace approximation, in the softmax basis, of a Dirichlet(alpha)
prior on theta (MacKay 1998; Srivastava & Sutton eq. 3); for alpha_1..alpha_K

    mu_k      = log alpha_k - (1/K) sum_j log alpha_j
    sigma^2_k = (1/alpha_k) (1 - 2/K) + (1/K^2) sum_j 1/alpha_j

so a symmetric Dirichlet(alpha) gives mu = 0, sigma^2 = (1/alpha)(1 - 1/K); alpha = 1 gives
variance 1 - 1/K. With ``prior="dirichlet"`` the site is theta itself:
theta_i ~ Dirichlet(alpha) (pair it with the reparameterized Dirichlet guide).

The likelihood's log-probability counts the multinomial coefficient log(N_i! / prod x_iv!);
``word_log_likelihood`` style perplexities subtract it (see :mod:`ppl_vae.topic_metrics`).

The family of both topic models (``prodlda`` here, ``lda`` in :mod:`ppl_vae.models.lda`) --
spec, corpus, training defaults, topic proportions of documents, reports, commands -- is
:class:`ppl_vae.models.topics.TopicFamily`.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.torch_distribution import TorchDistribution
from torch import nn
from torch.distributions import constraints
from torch.nn import functional as F

from ppl_vae.guides.amortized import AmortizedNormal
from ppl_vae.guides.dirichlet import AmortizedDirichlet
from ppl_vae.nn import DocumentEncoder

PRIORS = ("laplace", "dirichlet")
SITES = {"laplace": "logtheta", "dirichlet": "theta"}  # the topic-proportion site per prior


def laplace_prior(alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mu, sigma) of the logistic-normal Laplace approximation of Dirichlet(alpha).

    alpha: (K,) concentrations. Returns loc and scale, each (K,) (formula in the module
    docstring)."""
    k = alpha.shape[-1]
    loc = alpha.log() - alpha.log().mean(-1, keepdim=True)
    var = (1.0 / alpha) * (1 - 2.0 / k) + (1.0 / alpha).sum(-1, keepdim=True) / k**2
    return loc, var.sqrt()


def prior_concentration(prior: str, alpha: float, num_topics: int) -> torch.Tensor:
    """The symmetric Dirichlet concentration (K,) behind either prior; a clear error for an
    unknown prior or alpha <= 0."""
    if prior not in PRIORS:
        raise ValueError(f"unknown prior {prior!r}; choose one of {PRIORS}")
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    return torch.full((num_topics,), float(alpha))


def topic_proportions_site(prior: str, alpha: torch.Tensor) -> torch.Tensor:
    """Sample the document's topic proportions theta (..., K) at site ``logtheta``
    (logistic normal, ``prior="laplace"``) or ``theta`` (``prior="dirichlet"``)."""
    if prior == "laplace":
        loc, scale = laplace_prior(alpha)
        logtheta = pyro.sample("logtheta", dist.Normal(loc, scale).to_event(1))
        return F.softmax(logtheta, -1)
    return pyro.sample("theta", dist.Dirichlet(alpha))


class DocumentCounts(TorchDistribution):
    """Word counts of documents: x_i ~ Multinomial(N_i, softmax(logits_i)), where every row
    has its own length N_i = ``total_count[i]`` (torch's Multinomial takes one int for all).

        log p(x_i) = log N_i! - sum_v log x_iv! + sum_v x_iv log softmax(logits_i)_v

    Scoring reads nothing back to the host (no per-step synchronisation on a GPU).

    Args:
        logits: (..., V) log word weights, normalized here (``normalized=True``: they are
            already log-probabilities, e.g. a log_softmax, and are used as they are).
        total_count: (...,) document lengths, needed for sampling; scoring uses the observed
            rows' own sums.
    """

    arg_constraints = {"logits": constraints.real_vector}
    support = constraints.independent(constraints.nonnegative_integer, 1)

    def __init__(self, logits: torch.Tensor, total_count: torch.Tensor | None = None,
                 normalized: bool = False, validate_args: bool | None = None):
        self.logits = logits if normalized else logits - logits.logsumexp(-1, keepdim=True)
        self.total_count = total_count
        super().__init__(logits.shape[:-1], logits.shape[-1:], validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        total = (None if self.total_count is None
                 else self.total_count.expand(batch_shape))
        return DocumentCounts(self.logits.expand(batch_shape + self.event_shape), total,
                              normalized=True, validate_args=False)

    @property
    def mean(self) -> torch.Tensor:
        if self.total_count is None:
            raise ValueError("DocumentCounts needs total_count= for its mean")
        return self.total_count.unsqueeze(-1) * self.logits.exp()

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """log p of counts ``value`` (..., V), dense or a sparse CSR batch (B, V) (the
        engine's ``sparse_batches``: only the nonzero counts are read, the same numbers)."""
        if value.layout == torch.sparse_csr:
            return self._log_prob_csr(value)
        if self._validate_args:
            self._validate_sample(value)
        n = value.sum(-1)
        return (torch.lgamma(n + 1) - torch.lgamma(value + 1).sum(-1)
                + (value * self.logits).sum(-1))

    def _log_prob_csr(self, value: torch.Tensor) -> torch.Tensor:
        rows, cols, counts = csr_entries(value)
        if self._validate_args and not bool(((counts >= 0) & (counts == counts.round()))
                                            .all()):
            raise ValueError("DocumentCounts: counts must be non-negative integers")
        b = value.shape[0]
        logits = self.logits
        if logits.dim() < 2:
            logits = logits.expand(value.shape)
        chosen = logits[..., rows, cols]                          # (..., nonzeros)
        n = counts.new_zeros(b).index_add_(0, rows, counts)
        words = counts * chosen - torch.lgamma(counts + 1)
        per_row = words.new_zeros(*words.shape[:-1], b).index_add_(-1, rows, words)
        return torch.lgamma(n + 1) + per_row

    def sample(self, sample_shape: torch.Size | tuple = ()) -> torch.Tensor:
        """Counts (sample_shape + batch + (V,)): N_i words drawn for row i."""
        if self.total_count is None:
            raise ValueError("sampling documents needs their lengths: DocumentCounts(..., "
                             "total_count=...)")
        shape = torch.Size(sample_shape) + self.batch_shape
        n = self.total_count.expand(shape).long()
        longest = int(n.max()) if n.numel() else 0
        words = torch.distributions.Categorical(logits=self.logits).sample(
            torch.Size([longest]) + torch.Size(sample_shape))               # (L, *shape)
        keep = torch.arange(longest, device=n.device).view(-1, *[1] * len(shape)) < n
        counts = torch.zeros(shape + self.event_shape, dtype=self.logits.dtype,
                             device=self.logits.device)
        return counts.scatter_add_(-1, words.movedim(0, -1),
                                   keep.movedim(0, -1).to(counts.dtype))


def csr_entries(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The nonzero entries of a CSR matrix (B, V): row indices, column indices, values."""
    crow = counts.crow_indices()
    rows = torch.repeat_interleave(torch.arange(counts.shape[0], device=crow.device),
                                   crow[1:] - crow[:-1])
    return rows, counts.col_indices(), counts.values()


def document_lengths(docs: torch.Tensor) -> torch.Tensor:
    """Words per document (B,) of counts (B, V), dense or sparse CSR."""
    if docs.layout != torch.sparse_csr:
        return docs.sum(-1)
    rows, _, counts = csr_entries(docs)
    return counts.new_zeros(docs.shape[0]).index_add_(0, rows, counts)


def word_counts_site(logits: torch.Tensor, docs: torch.Tensor,
                     normalized: bool = False) -> torch.Tensor:
    """Observe the counts docs (B, V), dense or a CSR batch, under Multinomial(N_i,
    softmax(logits)), N_i the length of row i (:class:`DocumentCounts`; ``normalized``:
    logits are log-probabilities already)."""
    return pyro.sample("counts", DocumentCounts(logits, document_lengths(docs), normalized),
                       obs=docs)


class ProdLDA(nn.Module):
    """The ProdLDA generative model for count matrices (B, V), data plate ``data``.

    Two decoders (module docstring): ``decoder_bn=False`` (the default) gives word logits
    ``b + beta^T theta`` with a background ``b`` (V,) of log word frequencies and a Normal
    prior of precision ``beta_precision`` on beta; ``decoder_bn=True`` is AVITM's
    ``BN(beta^T theta)`` (batch norm without affine part, no background, no prior on beta).

    Args:
        vocab_size: V.  num_topics: K.
        alpha: symmetric Dirichlet concentration of the prior on theta (default 1).
        prior: ``laplace`` (logistic normal, site ``logtheta``) or ``dirichlet`` (site
            ``theta``).
        dropout: dropout on theta before the decoder (training only).
        decoder_bn: AVITM's batch-norm decoder instead of background + prior.
        beta_precision: lambda of beta_kv ~ Normal(0, 1/sqrt(lambda)) (0: no prior).
        background: initial b (V,), e.g. :func:`log_frequencies` of the training counts
            (default zeros; a reloaded run takes its trained b from the checkpoint).
    """

    def __init__(self, vocab_size: int, num_topics: int, alpha: float = 1.0,
                 prior: str = "laplace", dropout: float = 0.2, decoder_bn: bool = False,
                 beta_precision: float = 10.0, background: torch.Tensor | None = None):
        super().__init__()
        if beta_precision < 0:
            raise ValueError(f"beta_precision must be >= 0, got {beta_precision}")
        self.vocab_size, self.num_topics, self.prior = vocab_size, num_topics, prior
        self.decoder_bn = decoder_bn
        self.beta_precision = 0.0 if decoder_bn else float(beta_precision)
        self.register_buffer("alpha", prior_concentration(prior, alpha, num_topics))
        self.beta = nn.Linear(num_topics, vocab_size, bias=False)
        if decoder_bn:
            self.bn = nn.BatchNorm1d(vocab_size, affine=False)
        else:
            if background is not None and tuple(background.shape) != (vocab_size,):
                raise ValueError(f"background must have shape ({vocab_size},), got "
                                 f"{tuple(background.shape)}")
            self.background = nn.Parameter(torch.zeros(vocab_size) if background is None
                                           else background.detach().float().clone())
        self.drop = nn.Dropout(dropout)

    def decode(self, theta: torch.Tensor) -> torch.Tensor:
        """theta (..., K) -> word log-probabilities (..., V): log softmax(b + beta^T theta),
        or log softmax(BN(beta^T theta)) with ``decoder_bn``."""
        h = self.beta(self.drop(theta))
        if self.decoder_bn:
            return F.log_softmax(DocumentEncoder._bn(self.bn, h), -1)
        return F.log_softmax(h + self.background, -1)

    def topic_prior_site(self, size: int, rows: int) -> None:
        """log N(beta | 0, 1/lambda) (constant dropped), spread over the ``size`` documents of
        the data plate (``rows`` of them in this minibatch) so that the engine's N/B scaling
        adds it once per pass over the data. Training only: held-out ELBOs (validation, early
        stopping, perplexity) score the documents alone."""
        if self.beta_precision and self.training:
            log_prior = -0.5 * self.beta_precision * self.beta.weight.pow(2).sum()
            pyro.factor("beta_prior", (log_prior / size).expand(rows))

    def model(self, docs: torch.Tensor, embeddings: torch.Tensor | None = None,
              size: int | None = None, subsample: torch.Tensor | None = None
              ) -> torch.Tensor:
        """docs: word counts (B, V), float; ``embeddings`` (B, E): the guide's extra input
        (unused by the generative model). Returns theta (B, K)."""
        pyro.module("prodlda", self)
        with pyro.plate("data", size or len(docs), subsample=subsample):
            self.topic_prior_site(size or len(docs), len(docs))
            theta = topic_proportions_site(self.prior, self.alpha)
            word_counts_site(self.decode(theta), docs, normalized=True)
        return theta

    forward = model

    def topic_word(self) -> torch.Tensor:
        """The topics' word weights (K, V): the rows of beta (unnormalized log weights, as
        OCTIS/AVITM rank them; with the background decoder, each topic's log-odds against
        the background)."""
        return self.beta.weight.detach().t()


def log_frequencies(counts: torch.Tensor, smoothing: float = 1.0) -> torch.Tensor:
    """log of each word's share of all tokens, (V,), from counts (D, V) dense or sparse CSR,
    with ``smoothing`` added to every word's count (so unseen words stay finite)."""
    if counts.layout == torch.sparse_csr:
        totals = torch.zeros(counts.shape[1]).index_add_(
            0, counts.col_indices(), counts.values().float())
    else:
        totals = counts.float().sum(0)
    totals = totals + smoothing
    return (totals / totals.sum()).log()


def build_prodlda(vocab_size: int, num_topics: int, hidden: int = 100, dropout: float = 0.2,
                  alpha: float = 1.0, prior: str = "laplace", decoder_bn: bool = False,
                  beta_precision: float = 10.0, background: torch.Tensor | None = None,
                  embedding_dim: int = 0, encoder_variance: str = "batchnorm",
                  theta_dropout: float | None = None):
    """ProdLDA and its amortized guide: the :class:`~ppl_vae.nn.DocumentEncoder` feeding
    AmortizedNormal over ``logtheta`` (laplace) or AmortizedDirichlet over ``theta``;
    ``embedding_dim`` E > 0: the encoder reads [counts, embeddings] (CTM, see
    :func:`topic_guide`); ``encoder_variance``: the encoder's log-variance head
    (``batchnorm`` or ``bounded``, :class:`~ppl_vae.nn.DocumentEncoder`); ``dropout``: the
    encoder's, and theta's before the decoder unless ``theta_dropout`` is given."""
    model = ProdLDA(vocab_size, num_topics, alpha=alpha, prior=prior,
                    dropout=dropout if theta_dropout is None else theta_dropout,
                    decoder_bn=decoder_bn, beta_precision=beta_precision,
                    background=background)
    return model, topic_guide(vocab_size, num_topics, hidden, dropout, prior, embedding_dim,
                              encoder_variance)


def encoder_input(docs: torch.Tensor, embeddings: torch.Tensor | None = None) -> torch.Tensor:
    """The encoder's input for a minibatch: the counts (B, V), or with contextual embeddings
    (B, E) the concatenation (B, V + E) (Bianchi et al. 2021, CombinedTM; a CSR batch of
    counts is densified for it)."""
    if embeddings is None:
        return docs
    if docs.layout == torch.sparse_csr:
        docs = docs.to_dense()
    return torch.cat([docs, embeddings.to(docs.dtype)], -1)


def topic_guide(vocab_size: int, num_topics: int, hidden: int, dropout: float, prior: str,
                embedding_dim: int = 0, encoder_variance: str = "batchnorm"):
    """The amortized guide for the topic-proportion site of either prior. With
    ``embedding_dim`` E > 0 the data are ``(counts, embeddings)`` and the encoder reads both
    (:func:`encoder_input`); the model ignores the embeddings. ``encoder_variance``: the
    log-variance head of the logistic-normal guide (:class:`~ppl_vae.nn.DocumentEncoder`;
    the Dirichlet guide has none)."""
    width = vocab_size + embedding_dim
    inputs = encoder_input if embedding_dim else None
    if prior == "laplace":
        encoder = DocumentEncoder(width, num_topics, hidden, dropout, head="normal",
                                  variance=encoder_variance)
        return AmortizedNormal(encoder, site="logtheta", plate="data", inputs=inputs)
    encoder = DocumentEncoder(width, num_topics, hidden, dropout, head="dirichlet")
    return AmortizedDirichlet(encoder, site="theta", plate="data", inputs=inputs)
