"""``ppl-vae train prodlda|lda``: topic models on an OCTIS folder or plain text.

    ppl-vae train prodlda --corpus ../shared/data/topics/BBC_News --topics 20 --out RUN
    ppl-vae evaluate RUN            # npmi, diversity (top-25), perplexity (test split, a bound)
    ppl-vae transform RUN --docs new.txt --out theta.csv

A run folder gets config.json, vocabulary.txt, checkpoint.pt/best.pt, metrics.csv (per
epoch), topics.csv (topic, rank, word, weight), topics.png (each topic's top words) and
topic_quality.json (NPMI per topic, diversity at 10 and 25 after training).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import warnings
from pathlib import Path

import torch

from ppl_vae import fit, restore
from ppl_vae.checkpoint import atomic_write_bytes, write_json
from ppl_vae.cli.main import fit_options
from ppl_vae.data.topics import CorpusWarning, load_corpus, read_documents
from ppl_vae.models.lda import build_lda
from ppl_vae.models.prodlda import PRIORS, build_prodlda
from ppl_vae.topic_metrics import diversity, npmi_per_topic, perplexity, top_words
from ppl_vae.training import resolve_device

NAMES = ("prodlda", "lda")
HELP = {"prodlda": "ProdLDA topic model (product-of-experts decoder, Srivastava & Sutton 2017)",
        "lda": "neural LDA topic model (mixture decoder theta . softmax(beta))"}
BUILDERS = {"prodlda": build_prodlda, "lda": build_lda}
# AVITM-style settings: small batches, a high learning rate (BBC_News, K=20: NPMI 0.09 at
# lr 1e-2 vs 0.03 at 2e-3), analytic KL of the logistic-normal/Dirichlet posterior
TRAIN_DEFAULTS = {"lr": 1e-2, "batch_size": 64, "epochs": 50, "objective": "meanfield"}


def add_train_arguments(p: argparse.ArgumentParser, name: str) -> None:
    g = p.add_argument_group(name)
    g.add_argument("--corpus", type=Path, required=True,
                   help="OCTIS folder (corpus.tsv + vocabulary.txt), a text file with one "
                   "document a line, or a folder of *.txt files")
    g.add_argument("--topics", type=int, default=20, help="number of topics K")
    g.add_argument("--hidden", type=int, default=100, help="encoder hidden units")
    g.add_argument("--dropout", type=float, default=0.2)
    g.add_argument("--alpha", type=float, default=None,
                   help="symmetric Dirichlet concentration of the prior on theta (default: "
                   "1 for --prior laplace, 0.1 for --prior dirichlet, where alpha = 1 lets "
                   "the topics collapse onto the frequent words)")
    g.add_argument("--prior", choices=PRIORS, default="laplace",
                   help="laplace: logistic normal + Normal guide; dirichlet: Dirichlet prior "
                   "+ reparameterized Dirichlet guide")
    t = p.add_argument_group("plain-text corpora (scikit-learn CountVectorizer)")
    t.add_argument("--min-df", type=float, default=2)
    t.add_argument("--max-df", type=float, default=0.7)
    t.add_argument("--stop-words", default="english", help="'english' or 'none'")
    t.add_argument("--max-features", type=int, default=5000)


def build(config: dict):
    """Model and guide from a run's config."""
    return BUILDERS[config["model"]](config["vocab_size"], config["topics"],
                                     hidden=config["hidden"], dropout=config["dropout"],
                                     alpha=config["alpha"], prior=config["prior"])


def _load(config: dict):
    """The run's corpus (counted warnings printed); a bad corpus exits with its error."""
    text_options = dict(min_df=config["min_df"], max_df=config["max_df"],
                        stop_words=None if config["stop_words"] == "none"
                        else config["stop_words"], max_features=config["max_features"],
                        seed=config["seed"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CorpusWarning)
        try:
            corpus = load_corpus(config["corpus"], **text_options)
        except (FileNotFoundError, ValueError, ImportError) as e:
            raise SystemExit(f"error: {e}") from e
    for w in caught:
        if issubclass(w.category, CorpusWarning):
            print(f"warning: {w.message}")
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return corpus


def _min_df(value: float) -> float:
    return int(value) if float(value).is_integer() and value >= 1 else float(value)


def train(args: argparse.Namespace) -> None:
    if args.topics < 2:
        raise SystemExit(f"error: --topics must be >= 2, got {args.topics}")
    if args.alpha is None:
        args.alpha = 1.0 if args.prior == "laplace" else 0.1
    if args.alpha <= 0:
        raise SystemExit(f"error: --alpha must be > 0, got {args.alpha}")
    config = {"family": "topics", "model": args.model, "corpus": str(args.corpus),
              "topics": args.topics, "hidden": args.hidden, "dropout": args.dropout,
              "alpha": args.alpha, "prior": args.prior, "min_df": _min_df(args.min_df),
              "max_df": _min_df(args.max_df), "stop_words": args.stop_words,
              "max_features": args.max_features, "seed": args.seed}
    corpus = _load(config)
    config["vocab_size"] = corpus.vocab_size
    if args.resume and (args.out / "config.json").exists():
        saved = json.loads((args.out / "config.json").read_text())
        changed = {k: (saved.get(k), v) for k, v in config.items() if saved.get(k) != v}
        if changed:
            raise SystemExit(f"error: --resume with a different model spec: {changed}")
    train_counts = corpus.split("train")
    val = corpus.counts.get("val")
    val = val if val is not None and val.shape[0] else None
    model, guide = build(config)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(config, args.out / "config.json")
    atomic_write_bytes(args.out / "vocabulary.txt", ("\n".join(corpus.vocabulary) + "\n").encode())
    site = "logtheta" if config["prior"] == "laplace" else "theta"
    history = fit(model, guide, train_counts, val_data=val, config=config,
                  **fit_options(args, (site,)))
    model.eval()
    guide.eval()
    quality = write_topics(args.out, model, corpus.vocabulary, corpus.texts)
    print(f"trained {len(history)} epochs on {train_counts.shape[0]} documents: train ELBO "
          f"{history['train_elbo'][-1]:.2f} nats/doc; NPMI {quality['npmi']:.4f}, "
          f"diversity(10) {quality['diversity_10']:.3f}")


def write_topics(run: Path, model, vocabulary: list[str], texts) -> dict:
    """topics.csv, topics.png and topic_quality.json of a trained model."""
    weights = model.topic_word().cpu()
    top = weights.topk(min(25, weights.shape[1]), -1)
    rows = ["topic,rank,word,weight"]
    for k in range(weights.shape[0]):
        for r, (i, w) in enumerate(zip(top.indices[k].tolist(), top.values[k].tolist())):
            word = vocabulary[i].replace('"', '""')
            rows.append(f'{k},{r + 1},"{word}",{w:.6g}')
    atomic_write_bytes(run / "topics.csv", ("\n".join(rows) + "\n").encode())
    plot_topics(weights, vocabulary, run / "topics.png")
    words10 = top_words(weights, vocabulary, 10)
    per_topic = npmi_per_topic(words10, texts)
    quality = {"npmi": float(per_topic.mean()), "npmi_per_topic": per_topic.tolist(),
               "diversity_10": diversity(words10, 10)}
    if weights.shape[1] >= 25:
        quality["diversity_25"] = diversity(top_words(weights, vocabulary, 25), 25)
    write_json(quality, run / "topic_quality.json")
    return quality


def plot_topics(weights: torch.Tensor, vocabulary: list[str], path: Path, n: int = 10) -> None:
    """One panel per topic: its ``n`` top words as horizontal bars of their weights."""

    import matplotlib.pyplot as plt

    k = weights.shape[0]
    cols = min(5, k)
    nrows = math.ceil(k / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.6 * nrows), squeeze=False)
    top = weights.topk(min(n, weights.shape[1]), -1)
    for t, ax in enumerate(axes.flat):
        if t >= k:
            ax.axis("off")
            continue
        words = [vocabulary[i] for i in top.indices[t].tolist()]
        ax.barh(range(len(words))[::-1], top.values[t].tolist(), color="tab:blue")
        ax.set_yticks(range(len(words))[::-1], words, fontsize=8)
        ax.set_title(f"topic {t}", fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _restore(run: Path, device: str):
    config = json.loads((run / "config.json").read_text())
    model, guide = build(config)
    device = resolve_device(device)
    checkpoint = run / "best.pt" if (run / "best.pt").exists() else run / "checkpoint.pt"
    restore(model, guide, checkpoint, torch.ones(2, config["vocab_size"]), device=device)
    return config, model, guide, device


def run_vocabulary(run: Path) -> list[str]:
    return (run / "vocabulary.txt").read_text(encoding="utf-8").splitlines()


def evaluate(run: Path, args: argparse.Namespace) -> dict:
    """NPMI (top-10, whole corpus), diversity (top-25) and the test perplexity bound."""
    config, model, guide, device = _restore(run, args.device)
    corpus = _load(config)
    vocabulary = run_vocabulary(run)
    if corpus.vocabulary != vocabulary:
        raise SystemExit(f"error: vocabulary mismatch: {config['corpus']} now has "
                         f"{corpus.vocab_size} words, the run was trained on "
                         f"{len(vocabulary)} ({run / 'vocabulary.txt'})")
    weights = model.topic_word().cpu()
    words10 = top_words(weights, vocabulary, 10)
    per_topic = npmi_per_topic(words10, corpus.texts)
    test = corpus.counts["test"] if corpus.counts["test"].shape[0] else corpus.split("val")
    if args.limit:
        from ppl_vae.batching import take_rows
        test = take_rows(test, torch.arange(min(args.limit, test.shape[0])))
    torch.manual_seed(args.seed)
    result = {"npmi": float(per_topic.mean()),
              "diversity": diversity(top_words(weights, vocabulary, min(25, len(vocabulary))),
                                     min(25, len(vocabulary))),
              "perplexity": perplexity(model, guide, test, device=device),
              "npmi_min": float(per_topic.min()), "npmi_max": float(per_topic.max()),
              "diversity_10": diversity(words10, 10), "test_documents": int(test.shape[0])}
    write_json(result, run / "evaluation.json")
    return result


@torch.no_grad()
def theta_of(model, guide, counts: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Topic proportions (D, K) of count rows (D, V), dense or sparse CSR: the guide's
    posterior mean for the Dirichlet guide, softmax of the posterior mean of log theta (its
    mode in the logistic basis) for the logistic-normal guide."""
    from ppl_vae.batching import take_rows

    device = next(guide.parameters()).device
    out = []
    for i in range(0, counts.shape[0], batch_size):
        x = take_rows(counts, torch.arange(i, min(i + batch_size, counts.shape[0]))).to(device)
        q = guide.distribution(x)
        if model.prior == "dirichlet":
            out.append(q.mean.cpu())
        else:
            out.append(torch.softmax(q.mean, -1).cpu())
    return torch.cat(out)


def transform(run: Path, args: argparse.Namespace) -> dict:
    """THETA.csv: one row per document of --docs (doc = its line number), topic_0..K-1."""
    config, model, guide, _ = _restore(run, args.device)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", CorpusWarning)
            counts, empty = read_documents(args.docs, run_vocabulary(run))
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from e
    for w in caught:
        print(f"warning: {w.message}")
    theta = theta_of(model, guide, counts)
    lines = [i for i, line in enumerate(Path(args.docs).read_text(encoding="utf-8")
                                         .splitlines(), start=1) if line.split("\t")[0].strip()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["doc"] + [f"topic_{k}" for k in range(theta.shape[1])])
        for n, row in zip(lines, theta.tolist()):
            writer.writerow([n] + [f"{v:.6g}" for v in row])
    return {"documents": int(theta.shape[0]), "empty_documents": empty, "out": str(args.out)}


def check(run: Path, args: argparse.Namespace) -> dict:
    """``ppl-vae check RUN`` on the first 50 held-out (test) documents: topic proportions
    [document, topic], PPC of the 30 most frequent held-out words' shares (per-document
    frequencies averaged, so the replicates' document lengths do not matter), k-hat per
    document, and the held-out word log-likelihood under the posterior draws (nats per word,
    mean over draws of sum_d log p(x_d | theta_d) / words)."""
    import numpy as np

    from ppl_vae.batching import take_rows
    from ppl_vae.checks import check_posterior

    config, model, guide, device = _restore(run, args.device)
    corpus = _load(config)
    vocabulary = run_vocabulary(run)
    test = corpus.counts["test"] if corpus.counts["test"].shape[0] else corpus.split("val")
    test = take_rows(test, torch.arange(min(50, test.shape[0])))
    test = test[test.sum(-1) > 0]
    top = torch.argsort(test.sum(0), descending=True)[:30].numpy()

    def shares(counts: np.ndarray) -> np.ndarray:
        freq = counts / np.maximum(np.nansum(counts, -1, keepdims=True), 1)
        return np.nanmean(freq, 0)[top]

    site = "logtheta" if config["prior"] == "laplace" else "theta"
    dims = {site: ["document", "topic"], "counts": ["document", "word"]}
    ppc = {"share of the 30 most frequent held-out words":
           ("counts", shares, [vocabulary[i] for i in top])}
    torch.manual_seed(args.seed)
    result = check_posterior(model, guide, test, run, dims=dims, coords={"word": vocabulary},
                             num_samples=min(args.samples, 100), khat_samples=args.khat_samples,
                             ppc=ppc, seed=args.seed, device=device, plot_points=2)
    from ppl_vae.posterior import load_netcdf

    idata = load_netcdf(run / "posterior.nc")
    ll = idata.log_likelihood["counts"].values.sum(-1).mean()
    result["heldout_loglik_per_word"] = float(ll / float(test.sum()))
    result["heldout_documents"] = int(test.shape[0])
    write_json(result, run / "check.json")
    return result
