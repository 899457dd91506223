"""Topic-model quality the way the field measures it, so numbers compare with papers/OCTIS.

* :func:`npmi` -- NPMI coherence of each topic's top words, computed exactly as gensim's
  ``CoherenceModel(coherence="c_npmi", topn=10)`` with the whole corpus as reference texts:
  every document contributes max(1, L - 10 + 1) boolean sliding windows of 10 tokens
  (a shorter document is one window); with N windows in all, per ordered pair (a, b) of a
  topic's top words (a != b)

      NPMI(a, b) = log[(P(a,b) + eps) / (P(a) P(b))] / -log(P(a,b) + eps),   eps = 1e-12

  where P(.) are window frequencies; a topic's coherence is the mean over its pairs and the
  corpus figure the mean over topics. Like gensim, a window's word set is updated
  incrementally as it slides (the word leaving at the left edge is removed even if it occurs
  again inside the window) -- reproduced here so the numbers agree to float precision.
* :func:`diversity` -- unique words among all topics' top-k / (k * K) (Dieng et al. 2020).
* :func:`topic_quality` -- both for a trained model's topics (NPMI per topic of the top 10,
  diversity at 10 and at 25): what a topic run reports after training and on evaluation.
* :func:`perplexity` -- exp(-sum_d ELBO_d / sum_d N_d) on held-out documents, with the
  multinomial coefficient removed (the likelihood of the word sequence, as in AVITM). Since
  ELBO <= log p, this is an UPPER BOUND on the model's true held-out perplexity.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

EPSILON = 1e-12


def top_words(topic_word: torch.Tensor, vocabulary: Sequence[str], k: int = 10
              ) -> list[list[str]]:
    """The k highest-weighted words of each topic; topic_word (K, V) -> K lists of k words."""
    idx = torch.as_tensor(topic_word).topk(k, dim=-1).indices.tolist()
    return [[vocabulary[i] for i in row] for row in idx]


def _window_matrix(texts: Sequence[Sequence[str]], words: dict[str, int], window: int):
    """Boolean (windows, W) sparse matrix of which relevant words each window holds (gensim's
    incremental window state), and the number of windows."""
    import scipy.sparse as sps

    rows, cols = [], []
    offset = 0
    width = len(words)
    for text in texts:
        ids = np.fromiter((words.get(t, width) for t in text), dtype=np.int64, count=len(text))
        length = len(ids)
        n_win = max(1, length - window + 1)
        present = np.unique(ids[ids < width])
        if present.size:
            if length <= window:  # one window: the document's word set
                rows.append(np.full(present.size, offset))
                cols.append(present)
            else:
                col_of = {w: j for j, w in enumerate(present)}
                # event per (window s, word): +1 added (enters at right edge), -1 removed (left
                # the window at its left edge); the last event decides, an add wins a tie.
                ev = np.zeros((n_win, present.size), dtype=np.int8)
                first = np.zeros(present.size, dtype=bool)
                for j, w in enumerate(present):
                    first[j] = bool((ids[:window] == w).any())
                ev[0] = np.where(first, 1, -1)
                pos = np.nonzero(ids < width)[0]
                for p in pos:  # removal at window p+1 (p was the left edge of window p)
                    if 1 <= p + 1 < n_win:
                        ev[p + 1, col_of[ids[p]]] = -1
                for p in pos:  # addition at window p-window+1 (p is its right edge)
                    s = p - window + 1
                    if s >= 1:
                        ev[s, col_of[ids[p]]] = 1
                last = np.where(ev != 0, np.arange(n_win)[:, None], 0)
                np.maximum.accumulate(last, axis=0, out=last)
                state = np.take_along_axis(ev, last, axis=0) > 0
                r, c = np.nonzero(state)
                rows.append(r + offset)
                cols.append(present[c])
        offset += n_win
    r = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    c = np.concatenate(cols) if cols else np.zeros(0, np.int64)
    m = sps.csr_matrix((np.ones(len(r), dtype=np.float64), (r, c)), shape=(offset, width))
    return m, offset


def npmi_per_topic(topics: Sequence[Sequence[str]], texts: Sequence[Sequence[str]],
                   topn: int = 10, window: int = 10) -> np.ndarray:
    """NPMI coherence of each topic (shape (K,)) as gensim's c_npmi computes it (module
    docstring). ``topics``: K word lists (the first ``topn`` are used); ``texts``: the
    reference documents as token lists (the whole corpus)."""
    topics = [list(t)[:topn] for t in topics]
    vocab = {w for text in texts for w in text}
    for k, topic in enumerate(topics):
        missing = [w for w in topic if w not in vocab]
        if missing:
            raise ValueError(f"topic {k}: words {missing} never occur in the reference texts")
    words = {w: i for i, w in enumerate(sorted({w for t in topics for w in t}))}
    m, n = _window_matrix(texts, words, window)
    occ = np.asarray(m.sum(0)).ravel()
    co = (m.T @ m).toarray()
    out = np.empty(len(topics))
    with np.errstate(divide="ignore", invalid="ignore"):
        for k, topic in enumerate(topics):
            ids = [words[w] for w in topic]
            sims = []
            for a in ids:
                for b in ids:
                    if a == b:
                        continue
                    p_ab = co[a, b] / n
                    pmi = np.log((p_ab + EPSILON) / ((occ[a] / n) * (occ[b] / n)))
                    sims.append(pmi / -np.log(p_ab + EPSILON))
            out[k] = np.mean(sims)
    return out


def npmi(topics: Sequence[Sequence[str]], texts: Sequence[Sequence[str]], topn: int = 10,
         window: int = 10) -> float:
    """Mean NPMI over topics (gensim ``c_npmi`` with top-``topn`` words, window 10)."""
    return float(np.mean(npmi_per_topic(topics, texts, topn, window)))


def diversity(topics: Sequence[Sequence[str]], topk: int = 25) -> float:
    """Topic diversity: unique words among all topics' top-``topk`` / (topk * K), in [0, 1]."""
    tops = [list(t)[:topk] for t in topics]
    if any(len(t) < topk for t in tops):
        raise ValueError(f"diversity@{topk} needs {topk} words per topic")
    return len({w for t in tops for w in t}) / (topk * len(tops))


def near_duplicates(topics: Sequence[Sequence[str]], shared: int = 13
                    ) -> list[tuple[int, int, int]]:
    """Pairs of topics whose word lists share at least ``shared`` words (13 of the top 25:
    more than half), as (k, j, words shared) with k < j, most shared first. Low diversity
    comes from such near-copies; a topic model with more topics than its corpus has themes
    makes them (fewer topics, ``--topics``, usually gives distinct ones)."""
    sets = [set(t) for t in topics]
    pairs = [(k, j, len(sets[k] & sets[j])) for k in range(len(sets))
             for j in range(k + 1, len(sets))]
    return sorted((p for p in pairs if p[2] >= shared), key=lambda p: (-p[2], p[0], p[1]))


def co_use(theta: torch.Tensor, pairs: Sequence[Sequence[int]]) -> list[float]:
    """For each pair (k, j, ...) of topics, the correlation over documents of their
    proportions theta[:, k] and theta[:, j] (theta: (documents, K)). Near-copies with a
    correlation near 1 are used together by the same documents (one theme spread over
    several topics), near 0 or below as alternatives. NaN when a topic's proportion does not
    vary."""
    theta = theta.double()
    centred = theta - theta.mean(0)
    norms = centred.norm(dim=0)
    out = []
    for k, j, *_ in pairs:
        denominator = norms[k] * norms[j]
        out.append(float((centred[:, k] @ centred[:, j]) / denominator)
                   if denominator > 0 else float("nan"))
    return out


def topic_quality(topic_word: torch.Tensor, vocabulary: Sequence[str],
                  texts: Sequence[Sequence[str]]) -> dict:
    """Quality of topics (K, V) with the corpus ``texts`` as NPMI reference: ``npmi`` (mean
    over topics of the top-10 NPMI), ``npmi_per_topic``, ``diversity_10`` and, when the
    vocabulary has 25 words, ``diversity_25``, and with 100 words ``near_duplicates`` (pairs
    of topics sharing more than half of their top 25 words, :func:`near_duplicates`)."""
    words10 = top_words(topic_word, vocabulary, min(10, len(vocabulary)))
    per_topic = npmi_per_topic(words10, texts)
    quality = {"npmi": float(per_topic.mean()), "npmi_per_topic": per_topic.tolist(),
               "diversity_10": diversity(words10, len(words10[0]))}
    if len(vocabulary) >= 25:
        words25 = top_words(topic_word, vocabulary, 25)
        quality["diversity_25"] = diversity(words25, 25)
        if len(vocabulary) >= 100:  # below, two random top-25 lists share 6+ words by chance
            quality["near_duplicates"] = [list(p) for p in near_duplicates(words25)]
    return quality


def log_multinomial_coefficient(counts: torch.Tensor) -> torch.Tensor:
    """log(N_d! / prod_v x_dv!) per document: counts (D, V) -> (D,), nats."""
    counts = counts.to_dense() if counts.layout != torch.strided else counts
    return torch.lgamma(counts.sum(-1) + 1) - torch.lgamma(counts + 1).sum(-1)


def perplexity(model: Callable, guide: Callable, counts: torch.Tensor | tuple,
               num_particles: int = 1, batch_size: int = 500,
               device: str | torch.device | None = None) -> float:
    """Held-out perplexity bound exp(-sum_d [ELBO_d - log C_d] / sum_d N_d).

    counts: (D, V) word counts (dense or sparse CSR), or a tuple whose first element they
    are (the rest, e.g. document embeddings (D, E), go to model and guide as well). ELBO_d
    from :func:`ppl_vae.elbo` (``num_particles`` draws), C_d the multinomial coefficient,
    N_d the document's length. An upper bound on the true perplexity (ELBO <= log p(x));
    lower is better.
    """
    from ppl_vae.batching import take_rows
    from ppl_vae.evaluation import elbo

    data = counts
    counts = data[0] if isinstance(data, tuple) else data
    per_doc = elbo(model, guide, data, num_particles=num_particles, batch_size=batch_size,
                   per_example=True, device=device, progress=False)
    coef, words = [], []
    for i in range(0, counts.shape[0], batch_size):
        dense = take_rows(counts, torch.arange(i, min(i + batch_size, counts.shape[0])))
        coef.append(log_multinomial_coefficient(dense))
        words.append(dense.sum(-1))
    log_p_words = per_doc.double() - torch.cat(coef).double()
    return float(torch.exp(-log_p_words.sum() / torch.cat(words).double().sum()))
