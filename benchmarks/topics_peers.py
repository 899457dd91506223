"""Topic models side by side: this project's ProdLDA / neural LDA vs scikit-learn's LDA,
gensim's LdaModel and OCTIS's ProdLDA, on the OCTIS corpora.

Every method fits the train split of the same corpus with the same K and seed, one thread,
in one process; the method order alternates between seeds. Topic quality for all of them is
computed by one function (:func:`ppl_vae.topic_metrics.npmi`, equal to gensim's c_npmi,
top-10 words, window 10, whole corpus as reference) and diversity at top-25.

Set-up (venv outside the repo; see benchmarks/requirements-topics.txt):
    python -m venv /work/venvs/topics
    /work/venvs/topics/bin/pip install -r benchmarks/requirements-topics.txt
    /work/venvs/topics/bin/pip install --no-deps octis==1.14.0 && \\
        /work/venvs/topics/bin/pip install --no-deps -e .
Run:
    OMP_NUM_THREADS=1 /work/venvs/topics/bin/python benchmarks/topics_peers.py \\
        --corpora BBC_News M10 --topics 20 50 --seeds 0 1 --epochs 50 --csv /tmp/topics.csv
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import csv  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ppl_vae import fit  # noqa: E402
from ppl_vae.data.topics import load_octis  # noqa: E402
from ppl_vae.models.lda import build_lda  # noqa: E402
from ppl_vae.models.prodlda import build_prodlda  # noqa: E402
from ppl_vae.topic_metrics import diversity, npmi_per_topic, top_words  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "topics"


OURS_LR = {"value": 2e-3}


def ours(builder, prior, alpha=1.0):
    def run(corpus, k, seed, epochs):
        torch.manual_seed(seed)
        model, guide = builder(corpus.vocab_size, k, prior=prior, alpha=alpha)
        start = time.perf_counter()
        history = fit(model, guide, corpus.split("train"), epochs=epochs, batch_size=64,
                      lr=OURS_LR["value"], objective="meanfield", seed=seed, device="cpu",
                      progress=False)
        seconds = time.perf_counter() - start
        return model.topic_word().cpu(), seconds, len(history)
    return run


def sklearn_lda(corpus, k, seed, epochs):
    from sklearn.decomposition import LatentDirichletAllocation
    counts = corpus.split("train")
    import scipy.sparse as sps
    x = sps.csr_matrix((counts.values().numpy(), counts.col_indices().numpy(),
                        counts.crow_indices().numpy()), shape=tuple(counts.shape))
    lda = LatentDirichletAllocation(n_components=k, max_iter=20, random_state=seed, n_jobs=1)
    start = time.perf_counter()
    lda.fit(x)
    return torch.as_tensor(lda.components_), time.perf_counter() - start, 20


def gensim_lda(corpus, k, seed, epochs):
    from gensim.corpora import Dictionary
    from gensim.models import LdaModel
    counts = corpus.split("train")
    crow, col, val = counts.crow_indices(), counts.col_indices(), counts.values()
    bow = [list(zip(col[crow[i]:crow[i + 1]].tolist(), val[crow[i]:crow[i + 1]].tolist()))
           for i in range(counts.shape[0])]
    dictionary = Dictionary()
    dictionary.token2id = {w: i for i, w in enumerate(corpus.vocabulary)}
    id2word = dict(enumerate(corpus.vocabulary))
    start = time.perf_counter()
    lda = LdaModel(bow, num_topics=k, id2word=id2word, passes=10, random_state=seed)
    return torch.as_tensor(lda.get_topics()), time.perf_counter() - start, 10


def octis_prodlda(corpus, k, seed, epochs):
    np.Inf = np.inf  # octis 1.14 uses np.Inf, removed in NumPy 2
    from octis.dataset.dataset import Dataset
    from octis.models.ProdLDA import ProdLDA
    dataset = Dataset()
    dataset.load_custom_dataset_from_folder(corpus.source)
    torch.manual_seed(seed)
    np.random.seed(seed)
    model = ProdLDA(num_topics=k, num_epochs=epochs, batch_size=64, lr=2e-3)
    start = time.perf_counter()
    import contextlib
    import io
    with contextlib.redirect_stdout(io.StringIO()) as log:
        out = model.train_model(dataset, top_words=25)
    seconds = time.perf_counter() - start
    ran = log.getvalue().count("Train Loss")  # it stops early on validation loss
    return torch.as_tensor(np.asarray(out["topic-word-matrix"])), seconds, ran


METHODS = {"ppl-prodlda": ours(build_prodlda, "laplace"),
           "ppl-lda": ours(build_lda, "laplace"),
           "ppl-lda-dirichlet": ours(build_lda, "dirichlet", alpha=0.1),  # alpha=1 collapses
           "octis-prodlda": octis_prodlda,
           "sklearn-lda": sklearn_lda,
           "gensim-lda": gensim_lda}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--corpora", nargs="+", default=["BBC_News", "M10", "DBLP"])
    p.add_argument("--topics", type=int, nargs="+", default=[20, 50])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=50, help="epochs of the neural models")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--ours-lr", type=float, default=2e-3,
                   help="Adam learning rate of this project's models (OCTIS: 2e-3)")
    p.add_argument("--csv", type=Path, default=None, help="append one row per fit here")
    args = p.parse_args()
    OURS_LR["value"] = args.ours_lr
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # first use imports torch._dynamo
    rows = []
    for name in args.corpora:
        corpus = load_octis(args.data / name)
        for k in args.topics:
            for i, seed in enumerate(args.seeds):
                order = args.methods if i % 2 == 0 else args.methods[::-1]
                for method in order:
                    weights, seconds, epochs = METHODS[method](corpus, k, seed, args.epochs)
                    per_topic = npmi_per_topic(top_words(weights, corpus.vocabulary, 10),
                                               corpus.texts)
                    row = {"corpus": name, "K": k, "seed": seed, "method": method,
                           "lr": args.ours_lr if method.startswith("ppl") else "",
                           "npmi": float(per_topic.mean()),
                           "diversity25": diversity(top_words(weights, corpus.vocabulary, 25)),
                           "fit_s": seconds, "epochs": epochs, "s_per_epoch": seconds / epochs}
                    rows.append(row)
                    print(" ".join(f"{k_}={v:.4g}" if isinstance(v, float) else f"{k_}={v}"
                                   for k_, v in row.items()), flush=True)
                    if args.csv:
                        new = not args.csv.exists()
                        with open(args.csv, "a", newline="") as f:
                            w = csv.DictWriter(f, fieldnames=list(row))
                            if new:
                                w.writeheader()
                            w.writerow(row)
    summarize(rows)


def summarize(rows: list[dict]) -> None:
    print("\ncorpus    K  method              NPMI mean [min, max]       div25  fit s (median)"
          "  s/epoch  x OCTIS speed")
    keys = sorted({(r["corpus"], r["K"]) for r in rows})
    for corpus, k in keys:
        sub = [r for r in rows if r["corpus"] == corpus and r["K"] == k]
        octis = [r["s_per_epoch"] for r in sub if r["method"] == "octis-prodlda"]
        for method in dict.fromkeys(r["method"] for r in sub):
            rs = [r for r in sub if r["method"] == method]
            n = [r["npmi"] for r in rs]
            spe = statistics.median(r["s_per_epoch"] for r in rs)
            speed = (f"{statistics.median(octis) / spe:.2f}" if octis and method.startswith(
                "ppl") else "")
            div = statistics.mean(r["diversity25"] for r in rs)
            print(f"{corpus:9s} {k:2d} {method:18s} {statistics.mean(n):+.4f} "
                  f"[{min(n):+.4f}, {max(n):+.4f}]  {div:.3f}"
                  f"  {statistics.median(r['fit_s'] for r in rs):8.1f}  {spe:7.3f}  {speed}")


if __name__ == "__main__":
    main()
