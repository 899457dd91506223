"""``ppl-vae train prodlda|lda``: topic models on an OCTIS folder or plain text.

    ppl-vae train prodlda --corpus ../shared/data/topics/BBC_News --topics 20 --out RUN
    ppl-vae evaluate RUN            # npmi, diversity (top-25), perplexity (test split, a bound)
    ppl-vae transform RUN --docs new.txt --out theta.csv
    ppl-vae check RUN

    ppl-vae train prodlda --corpus DIR --embeddings DIR_embeddings.npy --out RUN   # CTM

The flags map to the spec of :class:`ppl_vae.models.topics.TopicFamily`, which holds the
models, the corpus, the training defaults, the report (vocabulary.txt, topics.csv with
per-topic NPMI and usage, topics.png, topic_quality.json) and the commands.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ppl_vae.data.fetch import CORPORA
from ppl_vae.models.prodlda import PRIORS
from ppl_vae.models.topics import TopicFamily
from ppl_vae.models.topics import TopicSpec as S

HELP = TopicFamily.models
# flag dest -> spec field where the names differ (what --resume counts as given)
SPEC_FLAGS = {"seed": "split_seed"}


def add_train_arguments(p: argparse.ArgumentParser, name: str) -> None:
    g = p.add_argument_group(name)
    g.add_argument("--corpus", type=Path, required=True,
                   help=f"a corpus name ({', '.join(CORPORA)}: OCTIS's preprocessed "
                   "corpora, downloaded on first use), an OCTIS folder (corpus.tsv + "
                   "vocabulary.txt), a text file with one document a line, or a folder of "
                   "*.txt files")
    g.add_argument("--topics", type=int, default=S.topics, help="number of topics K")
    g.add_argument("--hidden", type=int, default=S.hidden, help="encoder hidden units")
    g.add_argument("--dropout", type=float, default=S.dropout)
    g.add_argument("--theta-dropout", type=float, default=None,
                   help="dropout on the topic proportions before the decoder "
                   "(default: 0 with the bounded encoder variance, else --dropout)")
    g.add_argument("--alpha", type=float, default=None,
                   help="symmetric Dirichlet concentration of the prior on theta (default: "
                   "1 for --prior laplace, 0.1 on short texts (< 15 tokens a document) and "
                   "for --prior dirichlet, where alpha = 1 lets the topics collapse onto "
                   "the frequent words)")
    g.add_argument("--prior", choices=PRIORS, default=S.prior,
                   help="laplace: logistic normal + Normal guide; dirichlet: Dirichlet prior "
                   "+ reparameterized Dirichlet guide")
    g.add_argument("--decoder-bn", action="store_true",
                   help="prodlda: AVITM's batch norm on the decoder logits (the old default) "
                   "instead of background word frequencies + a Normal prior on the topics")
    g.add_argument("--beta-precision", type=float, default=None,
                   help="prodlda: precision of the Normal prior on the topics' word weights "
                   "(default 10 (20/K)^2, 3 (20/K)^2 on short texts; 0: none)")
    g.add_argument("--encoder-variance", choices=("batchnorm", "bounded"), default=None,
                   help="prodlda: the encoder's log-variance head: AVITM's batch norm, or "
                   "each document its own within [-3, 3] (default: bounded on long texts, "
                   "trained with the KL term ramped in over the warm-up epochs and a cosine "
                   "learning rate; batchnorm on short texts)")
    e = g.add_mutually_exclusive_group()
    e.add_argument("--embeddings", type=Path, default=None,
                   help="contextual document embeddings for the encoder (CTM): a .npy matrix "
                   "(documents, E), one row per document of the corpus in its order")
    e.add_argument("--embedding-model", default=None,
                   help="compute those embeddings from the corpus's texts with this "
                   "sentence-transformers model (needs sentence_transformers)")
    t = p.add_argument_group("plain-text corpora (scikit-learn CountVectorizer; the split "
                             "into train/val/test follows --seed)")
    t.add_argument("--min-df", type=float, default=S.min_df)
    t.add_argument("--max-df", type=float, default=S.max_df)
    t.add_argument("--stop-words", default=S.stop_words, help="'english' or 'none'")
    t.add_argument("--max-features", type=int, default=S.max_features)


def cli_spec(args: argparse.Namespace) -> dict:
    """The spec fields the flags give (vocab_size is read from the corpus)."""
    return dict(corpus=str(args.corpus), topics=args.topics, hidden=args.hidden,
                dropout=args.dropout, alpha=args.alpha, prior=args.prior,
                min_df=args.min_df, max_df=args.max_df, stop_words=args.stop_words,
                max_features=args.max_features, decoder_bn=args.decoder_bn,
                beta_precision=args.beta_precision, encoder_variance=args.encoder_variance,
                theta_dropout=args.theta_dropout,
                embeddings=str(args.embeddings) if args.embeddings else None,
                embedding_model=args.embedding_model,
                split_seed=args.seed if args.seed is not None else S.split_seed)
