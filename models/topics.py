"""The topic family: ProdLDA (:mod:`ppl_vae.models.prodlda`) and neural LDA
(:mod:`ppl_vae.models.lda`) share their data, training defaults and reports.

:class:`TopicFamily` holds the spec a run stores, the corpus (:mod:`ppl_vae.data.topics`),
the training defaults, the topic proportions of documents (:meth:`TopicFamily.theta`), the
report (topics.csv with per-topic NPMI and usage, topics.png, topic_quality.json) and the
commands evaluate / transform / check (transform reads new documents as the run's corpus was
read: its tokenizer.json, :class:`~ppl_vae.data.topics.Tokenizer`). With contextual document
embeddings (CTM: spec field ``embeddings``, a ``.npy`` matrix in corpus order) the data are
``(counts, embeddings)`` and the encoder reads both; every command that encodes documents
then needs their embeddings.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import json
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ppl_vae.batching import take_rows
from ppl_vae.checkpoint import atomic_write_bytes, write_json
from ppl_vae.data.fetch import CORPORA, fetch_corpus
from ppl_vae.data.topics import (
    OCTIS_TOKENIZER,
    Tokenizer,
    TopicCorpus,
    load_corpus,
    load_documents,
    read_embeddings,
    read_vocabulary,
)
from ppl_vae.evaluation import eval_mode
from ppl_vae.family import Family, register
from ppl_vae.models.lda import build_lda
from ppl_vae.models.prodlda import (
    PRIORS,
    SITES,
    build_prodlda,
    log_frequencies,
)
from ppl_vae.nn import DocumentEncoder
from ppl_vae.program import SetupError
from ppl_vae.topic_metrics import (
    co_use,
    diversity,
    log_multinomial_coefficient,
    perplexity,
    top_words,
    topic_quality,
)

# ---- the family: spec, corpus, training defaults, reports and commands of prodlda and lda -----

@dataclasses.dataclass
class TopicSpec:
    """A topic run's settings: exactly what its config.json stores under ``spec``.

    ``corpus``: a corpus name (bbc_news, m10, dblp, 20ng: downloaded on first use), an OCTIS
    folder (corpus.tsv + vocabulary.txt), a text file with one document
    a line or a folder of ``*.txt`` files; ``min_df``, ``max_df``, ``stop_words`` (``none``
    for none), ``max_features`` and ``split_seed`` (the random train/val/test split) apply
    to plain text only. ``alpha`` None takes the prior's default (1 for ``laplace``, 0.1
    for ``dirichlet``, where alpha = 1 lets the topics collapse onto the frequent words),
    and 0.1 for ProdLDA on short texts (:func:`short_texts`: the training documents average
    fewer than :data:`SHORT_TEXT_TOKENS` tokens, e.g. titles; the rule and its measurements
    are in :func:`short_texts`).
    ``vocab_size`` None is read from the corpus (once per process while its files are
    unchanged). Bad values raise :class:`~ppl_vae.SetupError` naming the field.

    ProdLDA's decoder: ``decoder_bn`` False (default) = background log-frequencies plus
    beta with a Normal prior of precision ``beta_precision`` (None: 3 (20/K)^(2/3) with
    the bounded head, 3 (20/K)^2 on short texts, 10 (20/K)^2 with the batch-normed head,
    :func:`default_beta_precision`); True = AVITM's batch norm on
    the logits (the pre-issue-16 default, whose runs reload with it; benchmarks/RESULTS.md,
    "Issue 16"). ``embeddings``: a ``.npy`` matrix (documents, E), one row per document of
    the corpus in its order, fed to the encoder beside the counts (CTM);
    ``embedding_model``: a sentence-transformers model name that computes them from the
    corpus's texts instead (needs ``sentence_transformers``). ``embedding_dim`` E is read
    from them.

    ``encoder_variance``: the log-variance head of the logistic-normal guide's encoder,
    ``batchnorm`` (AVITM's) or ``bounded`` (each document its own, within [-3, 3]:
    :class:`~ppl_vae.nn.DocumentEncoder`). None: ``bounded`` for ProdLDA with the laplace
    prior on long texts, where it gives more distinct and more coherent topics, with the KL
    term ramped in over the warm-up epochs and a cosine learning-rate schedule
    (:meth:`TopicFamily.fit_settings`);
    ``batchnorm`` otherwise (short texts: DBLP's NPMI fell; AVITM's decoder
    ``decoder_bn`` keeps AVITM's encoder; neural LDA: not measured).
    Runs stored before this field existed reload with ``batchnorm``.

    ``theta_dropout``: the decoder's dropout on theta (ProdLDA and neural LDA) (AVITM's is
    ``dropout``, shared with the encoder). None: 0 with the ``bounded`` encoder variance,
    where dropping topics at random rewarded spare copies of a topic and kept a rare-word
    topic alive (BBC_News K=20, seeds 0-4: the worst topic's NPMI rose in every seed, mean
    -0.042 to +0.036; benchmarks/RESULTS.md, "Issue 16", fifth session); ``dropout``
    otherwise (short texts: M10 lost NPMI without it). Runs stored before this field
    existed reload with their ``dropout``.
    """

    model: str
    corpus: str = ""
    topics: int = 20
    hidden: int = 100
    dropout: float = 0.2
    alpha: float | None = None
    prior: str = "laplace"
    min_df: float = 2
    max_df: float = 0.7
    stop_words: str = "english"
    max_features: int | None = 5000
    split_seed: int = 0
    vocab_size: int | None = None
    decoder_bn: bool = False
    beta_precision: float | None = None
    embeddings: str | None = None
    embedding_model: str | None = None
    embedding_dim: int | None = None
    encoder_variance: str | None = None
    theta_dropout: float | None = None

    def __post_init__(self):
        self.corpus = str(self.corpus)
        if self.embeddings is not None:
            self.embeddings = str(self.embeddings)
        if self.embeddings and self.embedding_model:
            raise SetupError("give either embeddings (--embeddings FILE.npy) or "
                             "embedding_model (--embedding-model NAME), not both")
        if self.prior not in PRIORS:
            raise SetupError(f"prior (--prior) must be one of {PRIORS}, got {self.prior!r}")
        # scikit-learn: an int is a number of documents, a float a fraction of them
        if float(self.min_df).is_integer() and self.min_df >= 1:
            self.min_df = int(self.min_df)
        if float(self.max_df).is_integer() and self.max_df > 1:
            self.max_df = int(self.max_df)
        for name, ok, rule in (("topics", self.topics >= 2, ">= 2"),
                               ("hidden", self.hidden >= 1, ">= 1"),
                               ("dropout", 0 <= self.dropout < 1, "in [0, 1)")):
            if not ok:
                raise SetupError(f"{name} (--{name}) must be {rule}, got "
                                 f"{getattr(self, name)}")
        if self.encoder_variance not in (None, *DocumentEncoder.VARIANCES):
            raise SetupError(f"encoder_variance (--encoder-variance) must be one of "
                             f"{DocumentEncoder.VARIANCES}, got {self.encoder_variance!r}")
        short = (self.model == "prodlda"
                 and (self.alpha is None or self.beta_precision is None
                      or self.encoder_variance is None)
                 and short_texts(self))
        if self.encoder_variance is None:
            self.encoder_variance = ("bounded" if self.model == "prodlda"
                                     and self.prior == "laplace" and not self.decoder_bn
                                     and not short else "batchnorm")
        if self.theta_dropout is None:
            self.theta_dropout = (0.0 if self.model == "prodlda"
                                  and self.encoder_variance == "bounded" else self.dropout)
        if not 0 <= self.theta_dropout < 1:
            raise SetupError(f"theta_dropout (--theta-dropout) must be in [0, 1), got "
                             f"{self.theta_dropout}")
        if self.alpha is None:
            self.alpha = 1.0 if self.prior == "laplace" and not short else 0.1
        if not self.alpha > 0:
            raise SetupError(f"alpha (--alpha) must be > 0, got {self.alpha}")
        if self.beta_precision is None:
            self.beta_precision = default_beta_precision(
                self.topics, short, bounded=self.encoder_variance == "bounded")
        if self.beta_precision < 0 or not math.isfinite(self.beta_precision):
            raise SetupError(f"beta_precision (--beta-precision) must be >= 0, got "
                             f"{self.beta_precision}")
        if self.vocab_size is None:
            if not self.corpus:
                raise SetupError("the topic models need a corpus: spec field 'corpus' "
                                 "(--corpus FOLDER_OR_FILE)")
            self.vocab_size = topic_corpus(self).vocab_size
        if (self.embeddings or self.embedding_model) and self.embedding_dim is None:
            self.embedding_dim = int(document_embeddings(self).shape[1])


def default_beta_precision(num_topics: int, short: bool = False, bounded: bool = False
                           ) -> float:
    """The prior precision on ProdLDA's topic weights at K topics: 3 (20/K)^(2/3) with the
    bounded encoder head on long texts (the family's default there), 3 (20/K)^2 on short
    texts (:func:`short_texts`), 10 (20/K)^2 with the batch-normed head on long texts.

    A document's topic proportions spread over more topics as K grows, so a topic's weights
    must be larger to move a document's words as much, and the precision falls with K. With
    the batch-normed head every topic's location has unit variance over a minibatch, theta
    spreads about evenly, and the weights grow about like K: the square (measured on
    BBC_News: lambda 10 the best of 3/10/30 at K = 20; at K = 50, 10 stops training at
    epoch 4, 2 trains to epoch 40). The bounded head lets a document concentrate on few
    topics, so the weights grow more slowly; measured (benchmarks/RESULTS.md, "Issue 16",
    benchmarks/topics_tradeoff.py), BBC_News seeds 0-2: at K = 20, lambda 3 gives NPMI
    0.188 and diversity 0.824 against 0.173 and 0.756 at 10 (2: 0.186 / 0.855 with a
    negative topic; 4: 0.187 / 0.797); at K = 50, 1.6 stays the best of 0.16 / 0.48 / 1.6 /
    4.8 on NPMI (0.162 against 0.155 at 0.48); 3 (20/K)^(2/3) meets both (1.63 at K = 50)."""
    if short:
        return 3.0 * (20.0 / num_topics) ** 2
    if bounded:
        return 3.0 * (20.0 / num_topics) ** (2.0 / 3.0)
    return 10.0 * (20.0 / num_topics) ** 2


SHORT_TEXT_TOKENS = 15.0  # mean tokens per training document below which texts are short


def mean_document_length(corpus: TopicCorpus) -> float:
    """Tokens per training document (after the vocabulary's filtering), averaged; 0 for an
    empty training split."""
    counts = corpus.counts["train"]
    if not counts.shape[0]:
        return 0.0
    total = counts.values().sum() if counts.layout == torch.sparse_csr else counts.sum()
    return float(total) / counts.shape[0]


def short_texts(spec: TopicSpec) -> bool:
    """Whether the spec's corpus holds short texts: its training documents average fewer
    than :data:`SHORT_TEXT_TOKENS` (15) tokens (M10 5.9, DBLP 5.4: titles; BBC_News 120).
    False when the spec names no corpus, or names one that cannot be read while the spec
    already knows its vocabulary size (a reloaded run keeps its stored alpha and
    beta_precision, so this is never needed there).

    ProdLDA's defaults on short texts are alpha 0.1 and beta_precision 3 (20/K)^2 (instead
    of 1 and 10 (20/K)^2). Why (benchmarks/RESULTS.md, "Issue 16", short texts; K = 20, per-epoch
    validation ELBO and NPMI): with 6-word documents the model that ignores its topics
    (background frequencies only, theta at the prior) has the best validation ELBO (M10:
    -33 nats per document against -40..-46 once topics form), so with alpha 1 the background
    decoder stays in that state whatever the prior (NPMI -0.34..-0.50 at epochs 1-40, all
    topics near the background; lambda 1 or 0 leave it only after 8-12 epochs, and the
    validation ELBO, hence best.pt, prefers the collapsed epochs). alpha 0.1 (a wide
    logistic-normal prior, variance 9.5: one topic per title is cheap) puts it in the
    topic-using state from the start, where the validation ELBO and NPMI rise together, so
    early stopping works again. The prior on beta must then be weaker than on long texts
    and depends on the corpus's size: lambda 10 over-shrinks (M10 NPMI -0.02..-0.09), 0.3
    drifts to rare words (M10 -0.12, DBLP -0.05); lambda 1 is best on M10 (+0.01/+0.03 at
    the best validation epoch, 34k training tokens) but weak on 10,000 DBLP titles (+0.01,
    54k tokens); lambda 3 beats the LDA peers on both (DBLP +0.06 at 10,000 titles, +0.070
    over 2 seeds with diversity 0.88 on all 38,215, OCTIS ProdLDA 0.06-0.07; M10
    +0.004 over 2 seeds against LDA's -0.07, DBLP's LDA 0.03-0.05) but costs M10 diversity
    (0.65 against 0.81 at lambda 1, whose NPMI there is +0.031).
    The threshold 15 lies between the short corpora measured (5-6 tokens) and BBC_News
    (120); nothing in between was measured."""
    if not spec.corpus:
        return False
    try:
        corpus = topic_corpus(spec)
    except SetupError:
        if spec.vocab_size is None:
            raise
        return False
    return mean_document_length(corpus) < SHORT_TEXT_TOKENS


STEPS_PER_EPOCH = 75  # the default batch size aims at about this many minibatches an epoch


def batch_settings(spec: TopicSpec) -> dict[str, Any]:
    """The default batch size and learning rate for the spec's corpus: the power of two
    nearest to (training documents) / 75, within [64, 1024], and :func:`batch_lr` (BBC_News
    1,557 and M10 5,847 training documents: 64 and 1e-2; DBLP 38,215: 512 and 2.8e-2).
    Empty when the corpus cannot be read (a reloaded run has its settings)."""
    try:
        documents = topic_corpus(spec).counts["train"].shape[0]
    except (SetupError, OSError, ValueError):
        return {}
    batch = 2 ** round(math.log2(max(documents, 1) / STEPS_PER_EPOCH))
    batch = int(min(1024, max(64, batch)))
    return {"batch_size": batch, "lr": batch_lr(batch)}


def batch_lr(batch_size: int) -> float:
    """The default learning rate for a batch size: 1e-2 sqrt(batch / 64) (AVITM's 1e-2 at
    its batch of 64, scaled by the square root of the batch)."""
    return round(1e-2 * math.sqrt(batch_size / 64), 4)


_CORPORA: dict[tuple, TopicCorpus] = {}


def topic_corpus(spec: TopicSpec) -> TopicCorpus:
    """The corpus a spec names, validated (:func:`ppl_vae.data.topics.load_corpus`; dropped
    tokens and documents give one counted CorpusWarning). Kept while its files are unchanged,
    so the spec, the splits and the report read it once. A corpus given by name
    (``bbc_news``, ``m10``, ``dblp``, ``20ng``) is the fetched OCTIS folder, downloaded on
    first use (:mod:`ppl_vae.data.fetch`)."""
    path = Path(spec.corpus)
    if not path.exists() and spec.corpus not in CORPORA:
        close = difflib.get_close_matches(spec.corpus, list(CORPORA), n=1)
        raise SetupError(f"corpus (--corpus): {spec.corpus!r} is no such file or folder, and "
                         f"not a corpus name ({', '.join(CORPORA)})"
                         + (f"; did you mean {close[0]!r}?" if close else ""))
    if spec.corpus in CORPORA and not path.exists():
        try:
            path = fetch_corpus(spec.corpus)
        except OSError as e:
            raise SetupError(f"corpus {spec.corpus!r} is not downloaded yet and {e}") from e
    options = dict(min_df=spec.min_df, max_df=spec.max_df, max_features=spec.max_features,
                   stop_words=None if spec.stop_words == "none" else spec.stop_words,
                   seed=spec.split_seed)
    files = [path] if path.is_file() else sorted(path.glob("*")) if path.is_dir() else []
    key = (str(path.resolve()), tuple(sorted(options.items())),
           tuple((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in files))
    if key not in _CORPORA:
        try:
            corpus = load_corpus(path, **options)
        except (FileNotFoundError, ImportError) as e:
            raise SetupError(f"corpus (--corpus): {e}") from e
        _CORPORA.clear()
        _CORPORA[key] = corpus
    return _CORPORA[key]


def corpus_tokenizer(spec: TopicSpec) -> Tokenizer:
    """How the spec's corpus makes documents into tokens, told from the spec alone (without
    reading or downloading the corpus): OCTIS's whitespace split for a corpus name or an
    OCTIS folder, scikit-learn's ``CountVectorizer`` analyzer with the spec's ``stop_words``
    for a text file or a folder of ``*.txt`` files (:func:`~ppl_vae.data.topics.load_corpus`
    decides the same way); the legacy lower-cased whitespace split when the corpus is gone
    or not named. For runs stored before ``tokenizer.json`` (:meth:`TopicFamily.tokenizer`)."""
    if not spec.corpus:
        return Tokenizer()
    path = Path(spec.corpus)
    if (path / "corpus.tsv").exists() or (spec.corpus in CORPORA and not path.exists()):
        return OCTIS_TOKENIZER
    if path.is_file() or path.is_dir():
        return Tokenizer("countvectorizer",
                         stop_words=None if spec.stop_words == "none" else spec.stop_words)
    return Tokenizer()


_EMBEDDINGS: dict[tuple, torch.Tensor] = {}


def document_embeddings(spec: TopicSpec) -> torch.Tensor:
    """The contextual embeddings (documents, E) of every document of the spec's corpus, in
    the corpus's order (:attr:`~ppl_vae.data.topics.TopicCorpus.documents` maps count rows
    to them): read from ``spec.embeddings`` (.npy, checked by
    :func:`~ppl_vae.data.topics.read_embeddings`) or computed by the sentence-transformers
    model ``spec.embedding_model`` from the documents' tokens. Kept while the file is
    unchanged."""
    corpus = topic_corpus(spec)
    what = f"the corpus {spec.corpus}"
    if spec.embeddings:
        path = Path(spec.embeddings)
        stamp = (path.stat().st_mtime_ns, path.stat().st_size) if path.is_file() else None
        key = ("file", str(path.resolve()), stamp, corpus.source, corpus.num_documents)
    else:
        key = ("model", spec.embedding_model, corpus.source, corpus.num_documents)
    if key not in _EMBEDDINGS:
        if spec.embeddings:
            try:
                matrix = read_embeddings(spec.embeddings, corpus.num_documents, what)
            except (FileNotFoundError, ValueError) as e:
                raise SetupError(f"embeddings (--embeddings): {e}") from e
        else:
            matrix = encode_texts([" ".join(t) for t in corpus.texts], spec.embedding_model)
        _EMBEDDINGS.clear()
        _EMBEDDINGS[key] = matrix
    matrix = _EMBEDDINGS[key]
    if spec.embedding_dim is not None and matrix.shape[1] != spec.embedding_dim:
        raise SetupError(f"embeddings: {spec.embeddings or spec.embedding_model} now give "
                         f"{matrix.shape[1]} columns, the run was trained on "
                         f"embedding_dim {spec.embedding_dim}")
    return matrix


def encode_texts(texts: list[str], model_name: str | None) -> torch.Tensor:
    """Sentence-transformers embeddings (len(texts), E) of ``texts`` by ``model_name``; a
    SetupError when the package is missing."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as e:
        raise SetupError(f"embedding_model (--embedding-model {model_name}) needs the "
                         "sentence_transformers package; install it, or compute the "
                         "embeddings elsewhere and pass --embeddings FILE.npy") from e
    encoder = SentenceTransformer(model_name)
    array = encoder.encode(texts, convert_to_numpy=True, show_progress_bar=False)
    return torch.as_tensor(array, dtype=torch.float32)


def plot_topics(weights: torch.Tensor, vocabulary: list[str], path: str | Path,
                n: int = 10, titles: list[str] | None = None) -> Path:
    """One panel per topic: its ``n`` top words as horizontal bars of their weights;
    ``titles``: one panel title per topic (default ``topic k``)."""
    import matplotlib.pyplot as plt

    from ppl_vae.plots import save_figure

    k = weights.shape[0]
    cols = min(5, k)
    fig, axes = plt.subplots(math.ceil(k / cols), cols, figsize=(3.2 * cols,
                             2.6 * math.ceil(k / cols)), squeeze=False)
    top = weights.topk(min(n, weights.shape[1]), -1)
    for t, ax in enumerate(axes.flat):
        if t >= k:
            ax.axis("off")
            continue
        words = [vocabulary[i] for i in top.indices[t].tolist()]
        ax.barh(range(len(words))[::-1], top.values[t].tolist(), color="tab:blue")
        ax.set_yticks(range(len(words))[::-1], words, fontsize=8)
        ax.set_title(titles[t] if titles else f"topic {t}", fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
    return save_figure(fig, path)


@register
class TopicFamily(Family):
    """ProdLDA and neural LDA: one corpus format, one guide, one report (module docstring).

    In Python, as on the command line::

        run = ppl_vae.train("prodlda", "runs/bbc", {"corpus": "data/topics/BBC_News"})
        run = ppl_vae.load_run("runs/bbc")
        theta = run.family.theta(run, counts)        # (D, K) topic proportions
        run.family.evaluate(run)                     # npmi, diversity, perplexity ...
    """

    name = "topics"
    models = {"prodlda": "ProdLDA topic model (product-of-experts decoder, Srivastava & "
                         "Sutton 2017)",
              "lda": "neural LDA topic model (mixture decoder theta . softmax(beta))"}
    Spec = TopicSpec
    # AVITM-style settings: small batches, a high learning rate (BBC_News, K=20: NPMI 0.09 at
    # lr 1e-2 vs 0.03 at 2e-3), analytic KL of the logistic-normal/Dirichlet posterior.
    # Training stops when the validation ELBO has not improved for 10 epochs, and the run
    # keeps its best epoch (best.pt: what load_run, the report and evaluate use). Issue 16
    # (benchmarks/RESULTS.md): with ProdLDA's background decoder and prior (the spec's
    # defaults) these settings give BBC_News NPMI 0.18 with no negative topic. On short
    # texts the same fit settings serve, because the spec's short-text defaults (alpha 0.1,
    # a weaker prior: short_texts) make the validation ELBO rise with the topics' quality
    # (M10: best epoch 17-24 of 27-34); with alpha 1 it peaks on a model that ignores its
    # topics, and no patience or epoch count fixes that (best.pt holds the peak). Even with
    # alpha 0.1 the validation ELBO can peak at epoch 1-2 and dip below that for 10-20
    # epochs before the topics form (M10 K=50 seed 1: best epoch 2 of 12, NPMI -0.42; the
    # same run past the dip: epoch 29, -0.03), hence 10 warm-up epochs that are never kept.
    # Minibatches stay sparse (CSR): the encoder's first layer and the likelihood read the
    # nonzero counts only (DBLP: 1.5 s an epoch at batch 512 instead of 2.3 s dense). The
    # batch size follows the corpus (batch_settings).
    fit_defaults = {"lr": 1e-2, "batch_size": 64, "epochs": 50, "objective": "meanfield",
                    "patience": 10, "warmup_epochs": 10, "sparse_batches": True}
    dims = {"logtheta": ["document", "topic"], "theta": ["document", "topic"],
            "counts": ["document", "word"]}

    def build(self, spec: TopicSpec):
        embedding_dim = spec.embedding_dim or 0
        if spec.model == "lda":
            return build_lda(spec.vocab_size, spec.topics, hidden=spec.hidden,
                             dropout=spec.dropout, alpha=spec.alpha, prior=spec.prior,
                             embedding_dim=embedding_dim,
                             encoder_variance=spec.encoder_variance,
                             theta_dropout=spec.theta_dropout)
        return build_prodlda(spec.vocab_size, spec.topics, hidden=spec.hidden,
                             dropout=spec.dropout, alpha=spec.alpha, prior=spec.prior,
                             decoder_bn=spec.decoder_bn, beta_precision=spec.beta_precision,
                             background=self.background(spec),
                             embedding_dim=embedding_dim,
                             encoder_variance=spec.encoder_variance,
                             theta_dropout=spec.theta_dropout)

    @staticmethod
    def background(spec: TopicSpec) -> torch.Tensor | None:
        """The initial background of ProdLDA's decoder: log word frequencies of the training
        split (:func:`~ppl_vae.models.prodlda.log_frequencies`); None for the batch-norm
        decoder, or when the corpus cannot be read (a reloaded run takes b from its
        checkpoint, so it does not need the corpus)."""
        if spec.decoder_bn or spec.model != "prodlda":
            return None
        try:
            corpus = topic_corpus(spec)
        except (SetupError, OSError, ValueError):
            return None
        if corpus.vocab_size != spec.vocab_size:
            return None
        return log_frequencies(corpus.counts["train"])

    def spec_from_json(self, stored: dict) -> TopicSpec:
        """A stored spec; runs written before ``decoder_bn``, ``encoder_variance`` or
        ``theta_dropout`` existed (issue 16) used AVITM's batch norms and its dropout on theta
        there and reload with them."""
        if isinstance(stored, dict):
            stored = {"decoder_bn": True, "encoder_variance": "batchnorm",
                      "theta_dropout": stored.get("dropout", TopicSpec.dropout), **stored}
        return super().spec_from_json(stored)

    def load_data(self, spec: TopicSpec, split: str):
        """Sparse CSR counts (documents, V) of ``split``; with embeddings the pair (counts,
        embeddings (documents, E)); None for an empty val/test split."""
        corpus = topic_corpus(spec)
        if corpus.vocab_size != spec.vocab_size:
            raise SetupError(f"vocabulary mismatch: {_vocabulary_file(spec)} now has "
                             f"{corpus.vocab_size} words, the spec says vocab_size "
                             f"{spec.vocab_size}")
        counts = corpus.counts.get(split)
        if counts is None or not counts.shape[0]:
            return None
        if spec.embedding_dim:
            return counts, split_embeddings(spec, corpus, split)
        return counts

    def example(self, spec: TopicSpec):
        counts = torch.ones(2, spec.vocab_size)
        return (counts, torch.zeros(2, spec.embedding_dim)) if spec.embedding_dim else counts

    def fit_settings(self, spec: TopicSpec) -> dict[str, Any]:
        """The defaults, with the batch size following the corpus (:func:`batch_settings`);
        ``--beta``/``--kl-anneal-epochs`` weight the site of theta. With the ``bounded``
        encoder variance the KL term is ramped in over the warm-up epochs: from the full
        KL term at the start the encoder can settle on the prior (every document's
        posterior equal to it, the topics unused: BBC_News K=50, the validation ELBO best
        at epoch 2, NPMI -0.11), which the batch norm on the log-variance prevents. It also
        trains with a cosine learning-rate schedule over the epochs: at a constant rate
        NPMI peaks around epoch 20-30 and then declines (BBC_News K=50: 0.143 kept against
        0.167 with the schedule, 5 topics below 0 against 1.3, seed spread 0.036 against
        0.020; diversity 0.50 against 0.44; benchmarks/RESULTS.md, "Issue 16")."""
        settings = {**self.fit_defaults, **batch_settings(spec),
                    "kl_sites": (SITES[spec.prior],)}
        if spec.encoder_variance == "bounded":
            settings["kl_anneal_epochs"] = settings["warmup_epochs"]
            settings["lr_schedule"] = "cosine"
        return settings

    def with_overrides(self, spec: TopicSpec, given: dict[str, Any]) -> dict[str, Any]:
        """A batch size given without a learning rate gets :func:`batch_lr` of it, not the
        default batch's rate; the bounded encoder's KL ramp (unless given) follows given
        warm-up epochs and, like the warm-up, ends before the last epoch (so the final epochs
        of a short run train on the whole ELBO)."""
        settings = super().with_overrides(spec, given)
        if "batch_size" in given and "lr" not in given:
            settings["lr"] = batch_lr(int(given["batch_size"]))
        if spec.encoder_variance == "bounded" and "kl_anneal_epochs" not in given:
            settings["kl_anneal_epochs"] = min(settings["warmup_epochs"],
                                               max(int(settings["epochs"]) - 1, 0))
        return settings

    # ---- after training ----------------------------------------------------------------
    def report(self, run) -> list[Path]:
        """On the state a reloaded run holds (best.pt when there is validation data):
        vocabulary.txt; tokenizer.json (how the corpus became tokens, for :meth:`transform`:
        :class:`~ppl_vae.data.topics.Tokenizer`); topics.csv (topic, rank, word, weight of the
        top 25 words, and per topic its ``npmi`` (top 10), ``usage`` (mean topic proportion over
        the training documents) and ``documents`` (training documents whose largest proportion
        is the topic), ``near_copy_of`` (the topic sharing the most of its top 25 words, when
        more than half: :func:`~ppl_vae.topic_metrics.near_duplicates`, with a warning that
        names them and the epochs trained, :func:`near_copy_message`); topics.png (each topic's
        top 10 words, its NPMI and usage in the title); topic_quality.json (the same per-topic
        figures, mean NPMI, diversity at 10 and 25, the near-duplicate pairs and, for each,
        ``near_duplicates_co_use``: the correlation of the two topics' proportions over the
        training documents, :func:`~ppl_vae.topic_metrics.co_use`)."""
        corpus = topic_corpus(run.spec)
        vocabulary = corpus.vocabulary
        path = Path(run.path)
        atomic_write_bytes(path / "vocabulary.txt", ("\n".join(vocabulary) + "\n").encode())
        write_json(corpus.tokenizer.to_json(), path / TOKENIZER_FILE)
        weights = run.model.topic_word().cpu()
        quality = topic_quality(weights, vocabulary, corpus.texts)
        theta = self.train_theta(run, corpus)
        quality.update(self.usage(run, corpus, theta))
        if quality.get("near_duplicates"):
            quality["near_duplicates_co_use"] = co_use(theta, quality["near_duplicates"])
        top = weights.topk(min(25, weights.shape[1]), -1)
        copies = near_copies(quality.get("near_duplicates", []), weights.shape[0])
        rows = ["topic,rank,word,weight,npmi,usage,documents,near_copy_of"]
        for k in range(weights.shape[0]):
            per_topic = (f"{quality['npmi_per_topic'][k]:.6g},{quality['usage'][k]:.6g},"
                         f"{quality['documents'][k]},{'' if copies[k] is None else copies[k]}")
            for r, (i, w) in enumerate(zip(top.indices[k].tolist(), top.values[k].tolist())):
                word = vocabulary[i].replace('"', '""')
                rows.append(f'{k},{r + 1},"{word}",{w:.6g},{per_topic}')
        atomic_write_bytes(path / "topics.csv", ("\n".join(rows) + "\n").encode())
        write_json(quality, path / "topic_quality.json")
        copied = sorted(k for k, j in enumerate(copies) if j is not None)
        if copied:
            warnings.warn(NearDuplicateTopics(near_copy_message(
                copied, weights.shape[0], quality["near_duplicates_co_use"],
                path / "topics.csv", len(run.history))), stacklevel=2)
        titles = [f"topic {k}: NPMI {n:+.2f}, usage {u:.1%}" for k, (n, u) in
                  enumerate(zip(quality["npmi_per_topic"], quality["usage"]))]
        return [path / "vocabulary.txt", path / "topics.csv",
                plot_topics(weights, vocabulary, path / "topics.png", titles=titles),
                path / "topic_quality.json"]

    def train_theta(self, run, corpus: TopicCorpus | None = None) -> torch.Tensor:
        """Topic proportions (D, K) of the training documents (:meth:`theta`)."""
        corpus = corpus or self.corpus(run)
        embeddings = (split_embeddings(run.spec, corpus, "train") if run.spec.embedding_dim
                      else None)
        return self.theta(run, corpus.split("train"), embeddings=embeddings)

    def usage(self, run, corpus: TopicCorpus | None = None,
              theta: torch.Tensor | None = None) -> dict[str, list]:
        """How much the training documents use each topic: ``usage`` (K,) the mean topic
        proportion (sums to 1), ``documents`` (K,) how many documents have it as their
        largest proportion. ``theta``: the training documents' proportions (D, K) when
        already computed (:meth:`train_theta`)."""
        theta = self.train_theta(run, corpus) if theta is None else theta
        counts = torch.bincount(theta.argmax(-1), minlength=theta.shape[1])
        return {"usage": theta.mean(0).tolist(), "documents": counts.tolist()}

    def vocabulary(self, run) -> list[str]:
        """The run's words (column v of its counts is word v): its vocabulary.txt, or for a
        run without one (not saved, or stopped before its report) the corpus's."""
        file = Path(run.path) / "vocabulary.txt" if run.path is not None else None
        if file is not None and file.exists():
            return read_vocabulary(file)
        words = topic_corpus(run.spec).vocabulary
        if len(words) != run.spec.vocab_size:
            raise SetupError(f"vocabulary mismatch: {_vocabulary_file(run.spec)} now has "
                             f"{len(words)} words, the run was trained on "
                             f"{run.spec.vocab_size} (and has no vocabulary.txt)")
        return words

    def tokenizer(self, run) -> Tokenizer:
        """How the run's training made documents into tokens (what :meth:`transform` does
        to new ones): the run folder's tokenizer.json, written with its report; for a run
        without one (stored before it existed, or not saved) told from its spec
        (:func:`corpus_tokenizer`)."""
        file = Path(run.path) / TOKENIZER_FILE if run.path is not None else None
        if file is None or not file.exists():
            return corpus_tokenizer(run.spec)
        try:
            stored = json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SetupError(f"{file}: not valid JSON ({e})") from e
        try:
            return Tokenizer.from_json(stored, str(file))
        except ValueError as e:
            raise SetupError(str(e)) from e

    def corpus(self, run) -> TopicCorpus:
        """The run's corpus, checked against the words the run was trained on."""
        corpus = topic_corpus(run.spec)
        words = self.vocabulary(run)
        if corpus.vocabulary != words:
            differ = next((f"word {i + 1} is {a!r} there, {b!r} in the run" for i, (a, b)
                           in enumerate(zip(corpus.vocabulary, words)) if a != b), "")
            raise SetupError(f"vocabulary mismatch: {_vocabulary_file(run.spec)} now has "
                             f"{corpus.vocab_size} words, the run was trained on {len(words)} "
                             f"({Path(run.path) / 'vocabulary.txt'}){'; ' if differ else ''}"
                             f"{differ}")
        return corpus

    @torch.no_grad()
    def theta(self, run, counts: torch.Tensor, batch_size: int = 1000,
              embeddings: torch.Tensor | None = None) -> torch.Tensor:
        """Topic proportions (D, K) of count rows (D, V), dense or sparse CSR, in one encoder
        pass: the guide's posterior mean for the Dirichlet guide, softmax of the posterior
        mean of log theta (its mode in the logistic basis) for the logistic-normal guide.
        A run trained with contextual embeddings needs the documents' ``embeddings``
        (D, E) too."""
        check_embeddings(run.spec, embeddings, counts.shape[0], "theta(run, counts, "
                         "embeddings=...)")
        out = []
        with eval_mode(run.model, run.guide):
            for i in range(0, counts.shape[0], batch_size):
                rows = torch.arange(i, min(i + batch_size, counts.shape[0]))
                inputs = [take_rows(counts, rows).to(run.device)]
                if embeddings is not None:
                    inputs.append(embeddings[rows].to(run.device))
                q = run.guide.distribution(*inputs)
                out.append((q.mean if run.spec.prior == "dirichlet"
                            else torch.softmax(q.mean, -1)).cpu())
        return torch.cat(out) if out else torch.zeros(0, run.spec.topics)

    # ---- commands ----------------------------------------------------------------------
    def evaluate(self, run, limit: int | None = None, seed: int = 0, **_: Any) -> dict:
        """NPMI (top 10, the whole corpus as reference; ``npmi_per_topic`` in
        evaluation.json), diversity (top 25) and the test perplexity bound (the val split
        when there is no test split); ``limit``: the first documents only. Written to
        evaluation.json too."""
        corpus = self.corpus(run)
        weights = run.model.topic_word().cpu()
        quality = topic_quality(weights, corpus.vocabulary, corpus.texts)
        test = _heldout(corpus, limit)
        if run.spec.embedding_dim:
            test = (test, _heldout_embeddings(run.spec, corpus, limit))
        torch.manual_seed(seed)
        top = min(25, corpus.vocab_size)
        per_topic = quality["npmi_per_topic"]
        result = {"npmi": quality["npmi"],
                  "diversity": diversity(top_words(weights, corpus.vocabulary, top), top),
                  "perplexity": perplexity(run.model, run.guide, test, device=run.device),
                  "npmi_min": float(min(per_topic)), "npmi_max": float(max(per_topic)),
                  "diversity_10": quality["diversity_10"],
                  "near_duplicate_pairs": len(quality.get("near_duplicates", [])),
                  "test_documents": int(_rows(test)),
                  "heldout_split": "test" if corpus.counts["test"].shape[0] else "val"}
        if run.path is not None:
            write_json({**result, "npmi_per_topic": per_topic},
                       Path(run.path) / "evaluation.json")
        return result

    def transform(self, run, docs: str | Path, out: str | Path,
                  embeddings: str | Path | np.ndarray | torch.Tensor | None = None,
                  **_: Any) -> dict:
        """``out`` (CSV): the topic proportions of each document of ``docs`` (one a line, made
        into tokens as the run's training corpus was: :meth:`tokenizer`; ``doc`` = its line
        number in the file, :func:`~ppl_vae.data.topics.document_lines`), columns
        topic_0..K-1. A run trained with contextual embeddings needs the new documents'
        ``embeddings`` too: a ``.npy`` file or matrix (documents, E), one row per non-blank
        line of ``docs`` (computed here instead, from each document's in-vocabulary tokens
        as in training, when the run used ``--embedding-model``)."""
        new = load_documents(docs, self.vocabulary(run), self.tokenizer(run))
        counts = new.counts
        matrix = None
        if embeddings is not None and isinstance(embeddings, (str, Path)):
            matrix = read_embeddings(embeddings, counts.shape[0],
                                     f"{docs} (its non-blank lines)")
        elif embeddings is not None:
            matrix = torch.as_tensor(np.asarray(embeddings), dtype=torch.float32)
        elif run.spec.embedding_model:
            matrix = encode_texts([" ".join(t) for t in new.tokens], run.spec.embedding_model)
        theta = self.theta(run, counts, embeddings=matrix)
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["doc"] + [f"topic_{k}" for k in range(theta.shape[1])])
            for n, row in zip(new.lines, theta.tolist()):
                writer.writerow([n] + [f"{v:.6g}" for v in row])
        return {"documents": int(theta.shape[0]), "empty_documents": new.empty,
                "out": str(out)}

    def check(self, run, samples: int = 500, khat_samples: int = 1000, seed: int = 0,
              **_: Any) -> dict:
        """Posterior checks on the first 50 held-out documents (written into the run folder):
        topic proportions [document, topic], PPC of the 30 most frequent held-out words'
        shares (per-document frequencies averaged, so the replicates' lengths do not matter),
        k-hat per document, and the held-out word log-likelihood under the posterior draws:
        ``heldout_loglik_per_word`` = mean over draws of sum_d [log p(x_d | theta_d) - log C_d]
        / words, nats per word, with each document's multinomial coefficient C_d removed as
        in :meth:`evaluate`'s perplexity (the likelihood of the word sequence, at most the
        saturated model's sum_w n_w log(n_w / N) per word), and ``heldout_perplexity`` =
        exp(-heldout_loglik_per_word): no KL term, so on the same documents at or below
        evaluate's bound, up to Monte Carlo noise."""
        import numpy as np

        from ppl_vae.checks import check_posterior
        from ppl_vae.posterior import load_netcdf

        if run.path is None:
            raise SetupError("check writes into the run folder: load the run with "
                             "ppl_vae.load_run(path)")
        corpus = self.corpus(run)
        test = _heldout(corpus, 50)  # dense rows
        keep = test.sum(-1) > 0
        test = test[keep]
        data = test
        if run.spec.embedding_dim:
            data = (test, _heldout_embeddings(run.spec, corpus, 50)[keep])
        top = torch.argsort(test.sum(0), descending=True)[:30].numpy()

        def shares(counts: np.ndarray) -> np.ndarray:
            freq = counts / np.maximum(np.nansum(counts, -1, keepdims=True), 1)
            return np.nanmean(freq, 0)[top]

        site = SITES[run.spec.prior]
        ppc = {"share of the 30 most frequent held-out words":
               ("counts", shares, [corpus.vocabulary[i] for i in top])}
        torch.manual_seed(seed)
        result = check_posterior(run.model, run.guide, data, run.path,
                                 dims={k: self.dims[k] for k in (site, "counts")},
                                 coords={"word": corpus.vocabulary},
                                 num_samples=min(samples, 100), khat_samples=khat_samples,
                                 ppc=ppc, seed=seed, device=run.device, plot_points=2)
        idata = load_netcdf(Path(run.path) / "posterior.nc")
        ll = float(idata.log_likelihood["counts"].values.sum(-1).mean())
        per_word = (ll - float(log_multinomial_coefficient(test).sum())) / float(test.sum())
        result["heldout_loglik_per_word"] = per_word
        result["heldout_perplexity"] = math.exp(-per_word)
        result["heldout_documents"] = int(test.shape[0])
        write_json(result, Path(run.path) / "check.json")
        return result


class NearDuplicateTopics(UserWarning):
    """Some topics of a trained run are near-copies of others (their top 25 words overlap by
    more than half)."""


TOKENIZER_FILE = "tokenizer.json"  # how the run's corpus became tokens (Tokenizer)
SETTLED_EPOCHS = 10  # the default warm-up: before it, topics may not have separated yet


def near_copy_message(copied: list[int], num_topics: int, co_use_values: list[float],
                      table: Path, epochs: int) -> str:
    """The report's warning about near-copy topics: which topics (``copied``, of
    ``num_topics``), where they are listed (``table``), the median correlation of a pair's
    proportions (``co_use_values``, NaN skipped) and after how many training ``epochs``.
    It states what was measured; fewer than :data:`SETTLED_EPOCHS` epochs are too few to
    say the corpus has fewer themes than topics (an undertrained run's topics overlap too:
    neural LDA, 400 documents of 5 themes, K = 5: near-copies at 3 epochs, none at 30)."""
    together = [c for c in co_use_values if c == c]
    shown = ", ".join(map(str, copied[:12])) + (" ..." if len(copied) > 12 else "")
    message = (f"{len(copied)} of {num_topics} topics share more than half of their top 25 "
               f"words with another (topics {shown}; column near_copy_of of {table}"
               + (f"; median correlation of a pair's proportions over the training "
                  f"documents {float(np.median(together)):.2f}" if together else "") + ")")
    if epochs:
        message += f" after {epochs} training epoch{'s' if epochs != 1 else ''}"
    if 0 < epochs < SETTLED_EPOCHS:
        return (message + ": too few to tell an undertrained run, whose topics overlap too, "
                "from a corpus with fewer themes than topics; train longer (--epochs) "
                "before trying fewer topics (--topics)")
    return (message + ": the corpus may have fewer themes than topics (an undertrained run "
            "shows this too); fewer topics (--topics) usually gives distinct ones")


def near_copies(pairs: list, num_topics: int) -> list[int | None]:
    """For each topic, the topic it shares the most top words with among ``pairs`` (k, j,
    shared) of :func:`~ppl_vae.topic_metrics.near_duplicates`, or None."""
    best: list[tuple[int, int] | None] = [None] * num_topics
    for k, j, shared in pairs:
        for a, b in ((k, j), (j, k)):
            if best[a] is None or shared > best[a][1]:
                best[a] = (b, shared)
    return [None if b is None else b[0] for b in best]


def split_embeddings(spec: TopicSpec, corpus: TopicCorpus, split: str) -> torch.Tensor:
    """The embeddings (documents, E) of the count rows of ``split``, in their order."""
    rows = torch.as_tensor(corpus.documents[split], dtype=torch.long)
    return document_embeddings(spec).index_select(0, rows)


def check_embeddings(spec: TopicSpec, embeddings: torch.Tensor | None, documents: int,
                     call: str) -> None:
    """A clear error when a run's encoder input and the given ``embeddings`` disagree: a
    run trained with contextual embeddings needs (documents, E) finite values; a run
    without them takes none."""
    if spec.embedding_dim and embeddings is None:
        source = spec.embeddings or f"--embedding-model {spec.embedding_model}"
        raise SetupError(
            f"this run was trained with contextual document embeddings ({spec.embedding_dim} "
            f"columns, from {source}), so its encoder needs the new documents' embeddings "
            f"too: pass them to {call} (a .npy file or matrix, one row per document, in the "
            f"documents' order, made by the same embedding model)")
    if embeddings is None:
        return
    if not spec.embedding_dim:
        raise SetupError("this run was trained without document embeddings; do not pass "
                         "embeddings")
    if embeddings.dim() != 2 or embeddings.shape != (documents, spec.embedding_dim):
        raise SetupError(f"embeddings of shape {tuple(embeddings.shape)}; this run needs "
                         f"({documents}, {spec.embedding_dim}): one row per document, "
                         f"{spec.embedding_dim} columns")
    if not bool(torch.isfinite(embeddings).all()):
        bad = int((~torch.isfinite(embeddings).all(-1)).nonzero()[0])
        raise SetupError(f"embeddings hold NaN or infinite values, first in row {bad}")


def _rows(data) -> int:
    return (data[0] if isinstance(data, tuple) else data).shape[0]


def _heldout_embeddings(spec: TopicSpec, corpus: TopicCorpus,
                        limit: int | None = None) -> torch.Tensor:
    """The embeddings of :func:`_heldout`'s documents."""
    split = "test" if corpus.counts["test"].shape[0] else "val"
    matrix = split_embeddings(spec, corpus, split)
    return matrix[:limit] if limit else matrix


def _heldout(corpus: TopicCorpus, limit: int | None = None) -> torch.Tensor:
    """The test split's counts (the val split's when the test split is empty), first
    ``limit`` documents."""
    test = corpus.counts["test"] if corpus.counts["test"].shape[0] else corpus.split("val")
    if limit:
        test = take_rows(test, torch.arange(min(limit, test.shape[0])))
    return test


def _vocabulary_file(spec: TopicSpec) -> Path:
    """The corpus file that fixes a spec's words (an OCTIS folder's vocabulary.txt)."""
    path = Path(spec.corpus)
    return path / "vocabulary.txt" if (path / "corpus.tsv").exists() else path
