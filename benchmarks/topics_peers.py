"""Topic models side by side: this project's ProdLDA / neural LDA (trained the way a user
trains them: ``ppl_vae.train`` with the family's defaults, topics of the kept best.pt) vs
scikit-learn's LDA, gensim's LdaModel, OCTIS's ProdLDA, FASTopic and TopMost's ECRTM, on the
OCTIS corpora (corpus.tsv + vocabulary.txt).

Every method fits the train split of the same corpus and vocabulary with the same K and seed,
one thread, in one process; the method order alternates between seeds. Topic quality for all
of them is computed by one function (:func:`ppl_vae.topic_metrics.npmi_per_topic`, equal to
gensim's c_npmi, top-10 words, window 10, whole corpus as reference); diversity = unique
top-25 words / (25 K). Timings bracket the fit only (data already in memory): CPU seconds
(``time.process_time``, one thread) and wall seconds.

Settings of the peers (their defaults unless said):
    sklearn-lda    LatentDirichletAllocation, batch variational Bayes, max_iter=20 (default 10)
    gensim-lda     LdaModel, passes=10 (default 1: a single pass over a small corpus), rest
                   default (iterations=50, chunksize=2000, alpha=eta=1/K)
    octis-prodlda  OCTIS ProdLDA defaults: 100 epochs at most, early stopping on the val split
                   (patience 5), batch 64, Adam lr 2e-3; topics of the last epoch (OCTIS's)
    fastopic       FASTopic defaults (200 full-batch epochs, lr 2e-3) on the corpus's own
                   counts and vocabulary. No sentence-transformer can be downloaded here, so the
                   document embeddings are computed locally and passed as
                   ``preset_doc_embeddings``: TF-IDF + TruncatedSVD (LSA), 100 dimensions
                   (LSA's customary size; 384 like all-MiniLM-L6-v2 gave NPMI -0.04 instead of
                   +0.03 on BBC_News K=20), rows L2-normalized; their cost is in its CPU s
    ecrtm          TopMost ECRTM defaults with TopMost's BasicTrainer defaults (200 epochs,
                   batch 200, Adam lr 2e-3), bag of words only (random initial word embeddings;
                   the paper initializes them with GloVe, which cannot be downloaded here)
    ppl-*          ``ppl_vae.train(model, out, {"corpus": DIR, "topics": K}, seed=seed)``: the
                   family's defaults as they are when this runs; the report it writes after
                   training (topics.png, NPMI) is timed apart (report_cpu_s), not in cpu_s

Set-up (a venv outside the repo; see benchmarks/requirements-topics.txt):
    python3 -m venv /work/venvs/topics
    /work/venvs/topics/bin/pip install -r benchmarks/requirements-topics.txt
    /work/venvs/topics/bin/pip install --no-deps octis==1.14.0
    /work/venvs/topics/bin/pip install --no-deps -e .
Run (rows already in the CSV are skipped, so a grid can be filled in several runs):
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 nice -n 10 /work/venvs/topics/bin/python \\
        benchmarks/topics_peers.py --corpora BBC_News M10 --topics 20 50 --seeds 0 1 2 \\
        --methods sklearn-lda gensim-lda octis-prodlda fastopic ecrtm \\
        --csv benchmarks/results/topics_peers.csv
Summary of a CSV without fitting anything:
    /work/venvs/topics/bin/python benchmarks/topics_peers.py --summary \\
        --csv benchmarks/results/topics_peers.csv
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_v, "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # the peers' progress bars
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded

import argparse  # noqa: E402
import contextlib  # noqa: E402
import csv  # noqa: E402
import dataclasses  # noqa: E402
import io  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import numpy as np  # noqa: E402
import scipy.sparse as sps  # noqa: E402
import torch  # noqa: E402

import ppl_vae  # noqa: E402
from ppl_vae.data.topics import TopicCorpus, load_octis  # noqa: E402
from ppl_vae.topic_metrics import diversity, npmi_per_topic, top_words  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "topics"
OURS = "ppl-prodlda"  # the CPU ratios of the summary are against this method
FIELDS = ["corpus", "K", "seed", "method", "npmi", "npmi_worst", "topics_npmi_below_0",
          "diversity25", "cpu_s", "wall_s", "epochs", "best_epoch", "report_cpu_s", "settings",
          "machine"]


@dataclass
class Fitted:
    """One method's fit: topic-word weights (K, V) over ``vocabulary`` (column v is
    vocabulary[v]), epochs/iterations run, the fit's CPU and wall seconds, its settings."""

    topic_word: torch.Tensor
    vocabulary: list[str]
    epochs: int
    cpu_s: float
    wall_s: float
    settings: str
    best_epoch: int | str = ""
    report_cpu_s: float | str = ""


class Clock:
    """CPU seconds (time.process_time, all threads of this process) and wall seconds of the
    block it brackets."""

    def __enter__(self) -> Clock:
        self._cpu, self._wall = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.cpu_s = time.process_time() - self._cpu
        self.wall_s = time.perf_counter() - self._wall


@contextlib.contextmanager
def timed_report(family: ppl_vae.Family) -> Iterator[Clock]:
    """Time the family's report (which ``ppl_vae.train`` writes after fitting) apart from the
    fit: inside the block the family's class reports through a wrapper, and the yielded
    :class:`Clock` holds the report's CPU and wall seconds afterwards (0 if none ran)."""
    report = Clock()
    report.cpu_s = report.wall_s = 0.0
    family_class = type(family)  # family_of gives a new instance per call
    original = family_class.report

    def timed(self, trained):
        with report:
            return original(self, trained)

    family_class.report = timed
    try:
        yield report
    finally:
        family_class.report = original


def train_csr(corpus: TopicCorpus) -> sps.csr_matrix:
    """The train split's counts (documents, V) as a SciPy CSR matrix."""
    counts = corpus.split("train")
    return sps.csr_matrix((counts.values().numpy(), counts.col_indices().numpy(),
                           counts.crow_indices().numpy()), shape=tuple(counts.shape))


# ---- this project: trained as a user trains it ---------------------------------------------

def ours(model: str, spec: dict) -> Callable:
    """``ppl_vae.train(model, out, {"corpus": DIR, "topics": K, **spec}, seed=seed)`` with the
    family's defaults; topics from the model ``ppl_vae.load_run`` gives (best.pt)."""

    def run(corpus: TopicCorpus, k: int, seed: int, workdir: Path) -> Fitted:
        family = ppl_vae.family_of(model)
        full_spec = {"corpus": corpus.source, "topics": k, **spec}
        family.make_spec(model, **full_spec)  # reads (and caches) the corpus off the clock
        out = workdir / f"{Path(corpus.source).name}_K{k}_seed{seed}_{model}" \
            f"{''.join(f'_{v}' for v in spec.values())}"
        with timed_report(family) as report, Clock() as clock:
            trained = ppl_vae.train(model, out, full_spec, seed=seed, overwrite=True,
                                    progress=False)
        kept = ppl_vae.load_run(out)
        best_file = out / "best.pt"  # the kept epoch (after the family's warm-up epochs)
        best = (int(torch.load(best_file, weights_only=True)["epoch"]) if best_file.exists()
                else "")
        fit = trained.fit_settings
        model_spec = {k_: v for k_, v in dataclasses.asdict(kept.spec).items()
                      if k_ not in ("corpus", "model", "vocab_size", "min_df", "max_df",
                                    "stop_words", "max_features", "split_seed")}
        settings = (f"family defaults: lr={fit.get('lr')} batch={fit.get('batch_size')} "
                    f"epochs<={fit.get('epochs')} patience={fit.get('patience')} "
                    f"warmup={fit.get('warmup_epochs')} sparse={fit.get('sparse_batches')} "
                    f"objective={fit.get('objective')}; spec "
                    f"{' '.join(f'{k_}={v}' for k_, v in model_spec.items())}; "
                    f"topics of {kept.checkpoint.name}")
        return Fitted(kept.model.topic_word().detach().cpu(), corpus.vocabulary,
                      len(trained.history), clock.cpu_s - report.cpu_s,
                      clock.wall_s - report.wall_s, settings, best, report.cpu_s)
    return run


# ---- the peers -------------------------------------------------------------------------------

def sklearn_lda(corpus: TopicCorpus, k: int, seed: int, workdir: Path) -> Fitted:
    from sklearn.decomposition import LatentDirichletAllocation

    x = train_csr(corpus)
    lda = LatentDirichletAllocation(n_components=k, max_iter=20, random_state=seed, n_jobs=1)
    with Clock() as clock:
        lda.fit(x)
    return Fitted(torch.as_tensor(lda.components_), corpus.vocabulary, int(lda.n_iter_),
                  clock.cpu_s, clock.wall_s, "batch VB, max_iter=20, priors 1/K")


def gensim_lda(corpus: TopicCorpus, k: int, seed: int, workdir: Path) -> Fitted:
    from gensim.models import LdaModel

    x = train_csr(corpus)
    bow = [list(zip(x.indices[x.indptr[i]:x.indptr[i + 1]].tolist(),
                    x.data[x.indptr[i]:x.indptr[i + 1]].tolist())) for i in range(x.shape[0])]
    id2word = dict(enumerate(corpus.vocabulary))
    with Clock() as clock:
        lda = LdaModel(bow, num_topics=k, id2word=id2word, passes=10, random_state=seed)
    return Fitted(torch.as_tensor(lda.get_topics()), corpus.vocabulary, 10, clock.cpu_s,
                  clock.wall_s, "passes=10, iterations=50, chunksize=2000, alpha=eta=1/K")


def octis_prodlda(corpus: TopicCorpus, k: int, seed: int, workdir: Path) -> Fitted:
    np.Inf = np.inf  # octis 1.14 uses np.Inf, removed in NumPy 2
    from octis.dataset.dataset import Dataset
    from octis.models.ProdLDA import ProdLDA

    dataset = Dataset()
    dataset.load_custom_dataset_from_folder(corpus.source)
    torch.manual_seed(seed)
    np.random.seed(seed)
    model = ProdLDA(num_topics=k)  # its defaults: 100 epochs, early stopping, batch 64, 2e-3
    with contextlib.redirect_stdout(io.StringIO()) as log, Clock() as clock:
        out = model.train_model(dataset, top_words=10)
    ran = log.getvalue().count("Train Loss")  # one line per epoch; it stops early
    return Fitted(torch.as_tensor(np.asarray(out["topic-word-matrix"])),
                  list(dataset.get_vocabulary()), ran, clock.cpu_s, clock.wall_s,
                  "OCTIS defaults: epochs<=100, early stopping patience 5 on val, batch 64, "
                  "lr 2e-3; topics of the last epoch")


def lsa_embeddings(x: sps.csr_matrix, dim: int, seed: int) -> np.ndarray:
    """Document embeddings (documents, dim) computed without any download: TF-IDF of the
    counts, TruncatedSVD (LSA) to ``dim`` dimensions, rows scaled to unit length."""
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfTransformer

    tfidf = TfidfTransformer().fit_transform(x)
    dim = min(dim, x.shape[1] - 1)
    vectors = TruncatedSVD(dim, random_state=seed).fit_transform(tfidf)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


class _CorpusCounts:
    """FASTopic's ``preprocess`` hook returning the corpus's own train counts and vocabulary
    (instead of re-tokenizing the text with its own stop words and vocabulary)."""

    def __init__(self, bow: sps.csr_matrix, vocabulary: list[str]):
        self.bow, self.vocabulary = bow, vocabulary

    def preprocess(self, docs, pretrained_WE=False):  # noqa: N803 (TopMost's name)
        if len(docs) != self.bow.shape[0]:
            raise ValueError(f"{len(docs)} documents for {self.bow.shape[0]} count rows")
        return {"train_bow": self.bow, "vocab": self.vocabulary, "train_texts": docs}


class _NoEncoder:
    """Stands in for FASTopic's sentence-transformer: the embeddings are preset."""

    def encode(self, docs, **_):
        raise RuntimeError("FASTopic asked for new document embeddings; they are preset")


def fastopic(corpus: TopicCorpus, k: int, seed: int, workdir: Path) -> Fitted:
    from fastopic import FASTopic

    x = train_csr(corpus)
    docs = [" ".join(corpus.vocabulary[i] for i in x.indices[x.indptr[d]:x.indptr[d + 1]])
            for d in range(x.shape[0])]  # only their number is used (counts are preset)
    torch.manual_seed(seed)
    np.random.seed(seed)
    model = FASTopic(k, preprocess=_CorpusCounts(x, corpus.vocabulary), device="cpu",
                     doc_embed_model=_NoEncoder())
    with Clock() as clock:
        embeddings = lsa_embeddings(x, 100, seed)
        model.fit(docs, preset_doc_embeddings=embeddings)  # defaults: 200 epochs, lr 2e-3
    return Fitted(torch.as_tensor(model.get_beta()), corpus.vocabulary, 200, clock.cpu_s,
                  clock.wall_s, "FASTopic defaults (200 full-batch epochs, lr 2e-3, DT_alpha 3,"
                  " TW_alpha 2); doc embeddings TF-IDF+TruncatedSVD(100), L2-normalized")


def ecrtm(corpus: TopicCorpus, k: int, seed: int, workdir: Path) -> Fitted:
    from topmost import ECRTM, BasicTrainer
    from torch.utils.data import DataLoader

    dense = torch.as_tensor(train_csr(corpus).toarray(), dtype=torch.float32)
    torch.manual_seed(seed)
    np.random.seed(seed)
    counts = SimpleNamespace(  # what BasicTrainer reads of a TopMost dataset
        train_data=dense, vocab=corpus.vocabulary,
        train_dataloader=DataLoader(dense, batch_size=200, shuffle=True))  # its default batch
    model = ECRTM(vocab_size=corpus.vocab_size, num_topics=k)
    trainer = BasicTrainer(model, counts)  # defaults: 200 epochs, lr 2e-3
    with Clock() as clock:
        trainer.train()
    return Fitted(torch.as_tensor(trainer.get_beta()), corpus.vocabulary, trainer.epochs,
                  clock.cpu_s, clock.wall_s, "TopMost defaults (ECRTM: en_units 200, "
                  "weight_loss_ECR 100, sinkhorn_alpha 20; BasicTrainer: 200 epochs, batch "
                  "200, lr 2e-3); no pretrained word embeddings")


METHODS: dict[str, Callable] = {
    "ppl-prodlda": ours("prodlda", {}),
    "ppl-lda": ours("lda", {}),
    "ppl-lda-dirichlet": ours("lda", {"prior": "dirichlet"}),
    "octis-prodlda": octis_prodlda,
    "sklearn-lda": sklearn_lda,
    "gensim-lda": gensim_lda,
    "fastopic": fastopic,
    "ecrtm": ecrtm,
}


# ---- one row per fit, a summary over seeds -------------------------------------------------

def score(corpus: TopicCorpus, name: str, k: int, seed: int, method: str,
          fitted: Fitted) -> dict:
    """The CSV row of one fit: NPMI (mean, worst topic, topics below 0), diversity@25."""
    if fitted.topic_word.shape != (k, len(fitted.vocabulary)):
        raise ValueError(f"{method}: topic-word matrix {tuple(fitted.topic_word.shape)}, "
                         f"expected ({k}, {len(fitted.vocabulary)})")
    weights = fitted.topic_word.double()
    per_topic = npmi_per_topic(top_words(weights, fitted.vocabulary, 10), corpus.texts)
    return {"corpus": name, "K": k, "seed": seed, "method": method,
            "npmi": float(per_topic.mean()), "npmi_worst": float(per_topic.min()),
            "topics_npmi_below_0": int((per_topic < 0).sum()),
            "diversity25": diversity(top_words(weights, fitted.vocabulary, 25)),
            "cpu_s": fitted.cpu_s, "wall_s": fitted.wall_s, "epochs": fitted.epochs,
            "best_epoch": fitted.best_epoch, "report_cpu_s": fitted.report_cpu_s,
            "settings": fitted.settings, "machine": machine()}


def machine() -> str:
    return (f"{platform.node()} {platform.processor() or platform.machine()} "
            f"{os.cpu_count()} cpus, torch {torch.__version__} threads "
            f"{torch.get_num_threads()}")


def read_rows(path: Path | None) -> list[dict]:
    if path is None or not path.exists():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["K"], r["seed"] = int(r["K"]), int(r["seed"])
        for key in ("npmi", "npmi_worst", "diversity25", "cpu_s", "wall_s"):
            r[key] = float(r[key])
        r["topics_npmi_below_0"], r["epochs"] = int(r["topics_npmi_below_0"]), int(r["epochs"])
    return rows


def append_row(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerow(row)


def summarize(rows: list[dict], markdown: bool = False) -> None:
    """Per (corpus, K, method), over seeds: NPMI mean [min, max], worst-topic NPMI (mean),
    topics below 0 (mean), diversity@25, CPU and wall seconds (mean), epochs (mean), and the
    CPU seconds as a multiple of this project's ProdLDA's (``OURS``) on the same corpus and K
    (> 1: slower than ours). ``markdown``: as a Markdown table."""
    latest = {(r["corpus"], r["K"], r["seed"], r["method"]): r for r in rows}
    rows = list(latest.values())
    head = ["corpus", "K", "method", "seeds", "NPMI mean [min, max]", "worst topic",
            "topics < 0", "div@25", "CPU s", "wall s", "epochs", "CPU / ours"]
    lines = []
    for corpus, k in sorted({(r["corpus"], r["K"]) for r in rows}):
        sub = [r for r in rows if r["corpus"] == corpus and r["K"] == k]
        ours_cpu = [r["cpu_s"] for r in sub if r["method"] == OURS]
        for method in [m for m in METHODS if any(r["method"] == m for r in sub)]:
            rs = [r for r in sub if r["method"] == method]
            n = [r["npmi"] for r in rs]
            cpu = statistics.mean(r["cpu_s"] for r in rs)
            epochs = sorted({r["epochs"] for r in rs})
            lines.append([corpus, str(k), method, ",".join(str(r["seed"]) for r in rs),
                          f"{statistics.mean(n):+.3f} [{min(n):+.3f}, {max(n):+.3f}]",
                          f"{statistics.mean(r['npmi_worst'] for r in rs):+.3f}",
                          f"{statistics.mean(r['topics_npmi_below_0'] for r in rs):.1f}",
                          f"{statistics.mean(r['diversity25'] for r in rs):.3f}", f"{cpu:.1f}",
                          f"{statistics.mean(r['wall_s'] for r in rs):.1f}",
                          ",".join(map(str, epochs)) if len(epochs) <= 3
                          else f"{epochs[0]}-{epochs[-1]}",
                          f"{cpu / statistics.mean(ours_cpu):.2f}" if ours_cpu else ""])
    if markdown:
        print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
        for line in lines:
            print("| " + " | ".join(line) + " |")
        return
    widths = [max(len(x) for x in col) for col in zip(head, *lines)]
    print()
    for line in [head, *lines]:
        print("  ".join(x.rjust(w) if i in (1, 5, 6, 7, 8, 9, 11) else x.ljust(w)
                        for i, (x, w) in enumerate(zip(line, widths))))


def corpus_grid_arguments(p: argparse.ArgumentParser) -> None:
    """--data, --corpora, --topics, --seeds: the grid of the topic benchmarks."""
    p.add_argument("--data", type=Path, default=DATA, help="folder of the OCTIS corpora")
    p.add_argument("--corpora", nargs="+", default=["BBC_News", "M10", "DBLP"])
    p.add_argument("--topics", type=int, nargs="+", default=[20, 50])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    corpus_grid_arguments(p)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                   help="methods to fit (default: all)")
    p.add_argument("--csv", type=Path, default=None,
                   help="append one row per fit here; fits already in it are skipped")
    p.add_argument("--rerun", action="store_true", help="fit again what the CSV already holds")
    p.add_argument("--summary", action="store_true", help="only print the CSV's summary")
    p.add_argument("--markdown", action="store_true", help="the summary as a Markdown table")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/topics_peers_runs"),
                   help="run folders of this project's models")
    args = p.parse_args()
    if args.summary:
        if args.csv is None or not args.csv.exists():
            p.error("--summary needs an existing --csv")
        summarize(read_rows(args.csv), args.markdown)
        return
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # first use imports torch._dynamo
    done = {(r["corpus"], r["K"], r["seed"], r["method"]) for r in read_rows(args.csv)}
    rows = []
    for name in args.corpora:
        corpus = load_octis(args.data / name)
        for k in args.topics:
            for i, seed in enumerate(args.seeds):
                order = args.methods if i % 2 == 0 else args.methods[::-1]
                for method in order:
                    if (name, k, seed, method) in done and not args.rerun:
                        continue
                    fitted = METHODS[method](corpus, k, seed, args.workdir)
                    row = score(corpus, name, k, seed, method, fitted)
                    rows.append(row)
                    print(" ".join(f"{k_}={v:.4g}" if isinstance(v, float) else f"{k_}={v}"
                                   for k_, v in row.items() if k_ not in ("settings", "machine")),
                          flush=True)
                    if args.csv:
                        append_row(args.csv, row)
    summarize(read_rows(args.csv) if args.csv else rows, args.markdown)


if __name__ == "__main__":
    main()
