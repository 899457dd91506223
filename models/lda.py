"""Neural LDA: the mixture model of LDA with an amortized (neural) posterior.

For document i with word counts x_i (V-vector, N_i words) and K topics:

    theta_i ~ prior on the simplex                       (as in ProdLDA: the logistic-normal
                                                           Laplace approximation of
                                                           Dirichlet(alpha), or the Dirichlet)
    phi_k = softmax(beta_k)                               topic k's word distribution
    x_i | theta_i ~ Multinomial(N_i, sum_k theta_ik phi_k)     mixture: pick a topic, then a word

This is the lecture's generative story (choose a topic from theta_d, a word from that
topic) with the topic choices summed out. Unlike ProdLDA's product of experts, each word's
probability is a convex mixture of the topics'. With the Dirichlet prior use a sparse
alpha (0.1): with alpha = 1 the posterior stays near the prior and all topics collapse onto
the corpus's frequent words (BBC_News, K=20: diversity 0.09 vs 0.34 at alpha = 0.1).
The encoder and guides are ProdLDA's
(:func:`ppl_vae.models.prodlda.topic_guide`); the Laplace formula is in that module, and so is
the family both models share (:class:`ppl_vae.models.topics.TopicFamily`: corpus, training
defaults, topic proportions of documents, report and commands; ``build`` of an ``lda`` spec
calls :func:`build_lda` below).
"""

from __future__ import annotations

import pyro
import torch
from torch import nn
from torch.nn import functional as F

from ppl_vae.models.prodlda import (
    prior_concentration,
    topic_guide,
    topic_proportions_site,
    word_counts_site,
)


class NeuralLDA(nn.Module):
    """LDA's mixture likelihood for count matrices (B, V), data plate ``data``.

    Args: as :class:`~ppl_vae.models.prodlda.ProdLDA` (vocab_size, num_topics, alpha,
    prior, dropout on theta).
    """

    def __init__(self, vocab_size: int, num_topics: int, alpha: float = 1.0,
                 prior: str = "laplace", dropout: float = 0.2):
        super().__init__()
        self.vocab_size, self.num_topics, self.prior = vocab_size, num_topics, prior
        self.register_buffer("alpha", prior_concentration(prior, alpha, num_topics))
        self.beta = nn.Parameter(torch.randn(num_topics, vocab_size) * 0.02)
        self.drop = nn.Dropout(dropout)

    def decode(self, theta: torch.Tensor) -> torch.Tensor:
        """theta (..., K) -> word log-probabilities (..., V): log(theta . softmax(beta)).

        In training, dropout on theta zeroes some topics' shares: the rest must explain their
        words, which blurs topics towards each other (on a synthetic corpus of 5 known
        topics, dropout 0.2 left near-copies where none recovered them all at 0; the
        inverted 1/(1-p) scale itself is undone by the normalization)."""
        probs = self.drop(theta) @ F.softmax(self.beta, -1)
        return probs.clamp_min(1e-30).log()

    def model(self, docs: torch.Tensor, embeddings: torch.Tensor | None = None,
              size: int | None = None, subsample: torch.Tensor | None = None) -> torch.Tensor:
        """docs: word counts (B, V), float; ``embeddings``: the guide's extra input (unused
        here). Returns theta (B, K)."""
        pyro.module("lda", self)
        with pyro.plate("data", size or len(docs), subsample=subsample):
            theta = topic_proportions_site(self.prior, self.alpha)
            word_counts_site(self.decode(theta), docs)
        return theta

    forward = model

    def topic_word(self) -> torch.Tensor:
        """The topics' word distributions phi (K, V), rows on the simplex."""
        return F.softmax(self.beta.detach(), -1)


def build_lda(vocab_size: int, num_topics: int, hidden: int = 100, dropout: float = 0.2,
              alpha: float = 1.0, prior: str = "laplace", embedding_dim: int = 0,
              encoder_variance: str = "batchnorm", theta_dropout: float | None = None):
    """Neural LDA and the shared amortized guide (see
    :func:`ppl_vae.models.prodlda.topic_guide`; ``embedding_dim`` > 0: it also reads
    contextual document embeddings; ``encoder_variance``: its log-variance head;
    ``theta_dropout``: the decoder's dropout on theta, None: ``dropout``)."""
    model = NeuralLDA(vocab_size, num_topics, alpha=alpha, prior=prior,
                      dropout=dropout if theta_dropout is None else theta_dropout)
    return model, topic_guide(vocab_size, num_topics, hidden, dropout, prior, embedding_dim,
                              encoder_variance)
