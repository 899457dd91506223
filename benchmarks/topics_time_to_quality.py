"""Time to quality of this project's ProdLDA (issue 16): the NPMI of its topics after every
epoch against the CPU seconds spent so far, beside the peers' final (CPU s, NPMI).

Ours is trained the way a user trains it, ``ppl_vae.train("prodlda", out, {"corpus": DIR,
"topics": K}, seed=seed)`` with the family's defaults. The only instrumentation is a wrapper
around :meth:`ppl_vae.Trainer.end_epoch` that reads ``time.process_time()`` (CPU seconds since
the call began, one thread) and copies the topic-word weights (K x V) at the end of every
epoch; NPMI and diversity of those copies are computed after training, off the clock (the
same :func:`ppl_vae.topic_metrics.npmi_per_topic` as ``benchmarks/topics_peers.py``: gensim's
c_npmi, top 10 words, window 10, whole corpus as reference).

For each (corpus, K) it prints, over seeds (medians):
    kept        the epoch the run keeps (best.pt) and the CPU seconds spent up to it: the CPU
                to ours' final quality (the epochs after it only confirm early stopping)
    total       the CPU seconds of the whole fit (what topics_peers.py reports)
    to <peer>   the CPU seconds until ours' NPMI first reaches that peer's mean final NPMI
                (over its seeds in the peers' CSV), and the ratio peer CPU / ours (> 1: ours
                gets there in less CPU than the peer spends on its whole fit)
and writes one row per epoch to ``--csv`` and a figure (NPMI against CPU seconds, one line
per seed, the peers' final points as markers) to ``--figure``.

Run (peers' rows from ``benchmarks/results/topics_peers.csv``):
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 nice -n 5 python3 benchmarks/topics_time_to_quality.py \\
        --corpora BBC_News M10 DBLP --topics 20 50 --seeds 0 1 2
Summary and figure of an existing CSV, fitting nothing: add ``--summary``.
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from topics_peers import corpus_grid_arguments, read_rows, timed_report  # noqa: E402

import ppl_vae  # noqa: E402
from ppl_vae.data.topics import load_octis  # noqa: E402
from ppl_vae.topic_metrics import diversity, npmi_per_topic, top_words  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
FIELDS = ["corpus", "K", "seed", "epoch", "cpu_s", "val_elbo", "npmi", "npmi_worst",
          "diversity25", "kept_epoch", "total_cpu_s"]
PEERS = ("octis-prodlda", "sklearn-lda", "gensim-lda", "ecrtm", "fastopic")


def fit_with_snapshots(corpus_dir: Path, k: int, seed: int, workdir: Path,
                       fit: dict | None = None) -> tuple[list[dict], int, float]:
    """Train ours with the family's defaults (``fit``: settings to change, e.g. epochs);
    returns per-epoch rows (epoch, cumulative CPU s,
    validation ELBO, topic-word weights), the kept epoch and the whole fit's CPU seconds (the
    report that ``train`` writes afterwards excluded)."""
    epochs: list[dict] = []
    original = ppl_vae.Trainer.end_epoch
    start = 0.0

    def end_epoch(self, val_elbo=None):
        row, improved = original(self, val_elbo)
        cpu = time.process_time() - start
        owner = next(m for m in self._modules() if hasattr(m, "topic_word"))
        epochs.append({"epoch": row["epoch"], "cpu_s": cpu, "val_elbo": val_elbo,
                       "topic_word": owner.topic_word().detach().cpu().clone()})
        return row, improved

    family = ppl_vae.family_of("prodlda")
    spec = {"corpus": str(corpus_dir), "topics": k}
    family.make_spec("prodlda", **spec)  # reads (and caches) the corpus off the clock
    ppl_vae.Trainer.end_epoch = end_epoch
    try:
        with timed_report(family) as report:
            start = time.process_time()
            ppl_vae.train("prodlda", workdir / f"{corpus_dir.name}_K{k}_seed{seed}", spec,
                          seed=seed, overwrite=True, progress=False, **(fit or {}))
            total = time.process_time() - start
    finally:
        ppl_vae.Trainer.end_epoch = original
    best = workdir / f"{corpus_dir.name}_K{k}_seed{seed}" / "best.pt"
    kept = int(torch.load(best, weights_only=True)["epoch"]) if best.exists() \
        else epochs[-1]["epoch"]
    return epochs, kept, total - report.cpu_s


def score_epochs(corpus, name: str, k: int, seed: int, epochs: list[dict], kept: int,
                 total: float) -> list[dict]:
    rows = []
    for e in epochs:
        per_topic = npmi_per_topic(top_words(e["topic_word"].double(), corpus.vocabulary, 10),
                                   corpus.texts)
        rows.append({"corpus": name, "K": k, "seed": seed, "epoch": e["epoch"],
                     "cpu_s": round(e["cpu_s"], 3), "val_elbo": e["val_elbo"],
                     "npmi": float(per_topic.mean()), "npmi_worst": float(per_topic.min()),
                     "diversity25": diversity(top_words(e["topic_word"], corpus.vocabulary,
                                                        25)),
                     "kept_epoch": kept, "total_cpu_s": round(total, 3)})
    return rows


def read_csv(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for key in ("K", "seed", "epoch", "kept_epoch"):
            if key in r and r[key] != "":
                r[key] = int(r[key])
        for key in ("cpu_s", "npmi", "diversity25", "total_cpu_s", "npmi_worst"):
            if key in r and r[key] not in ("", None):
                r[key] = float(r[key])
    return rows


def peer_finals(peers_csv: Path) -> dict:
    """(corpus, K, method) -> (mean NPMI, mean CPU s) over the method's seeds (latest rows)."""
    latest = {(r["corpus"], r["K"], r["seed"], r["method"]): r for r in read_rows(peers_csv)}
    out: dict = {}
    for (corpus, k, _, method), r in latest.items():
        if method in PEERS:
            out.setdefault((corpus, k, method), []).append(r)
    return {key: (statistics.mean(r["npmi"] for r in rs), statistics.mean(r["cpu_s"]
                                                                         for r in rs))
            for key, rs in out.items()}


def summarize(rows: list[dict], peers: dict) -> list[list[str]]:
    """One line per (corpus, K), medians over seeds: the kept epoch's NPMI, the epoch and the
    CPU seconds up to it, the whole fit's CPU seconds, and per peer the CPU seconds until ours
    first reaches that peer's mean NPMI with the ratio peer CPU / that ("not reached" when the
    median seed never does)."""
    head = ["corpus", "K", "seeds", "NPMI kept", "kept epoch", "CPU s to kept", "CPU s total"]
    shown = ["octis-prodlda", "sklearn-lda"]
    head += [f"CPU s to {p} NPMI (its NPMI) / its CPU ratio" for p in shown]
    lines = [head]
    for corpus, k in sorted({(r["corpus"], r["K"]) for r in rows}):
        runs: dict[int, list[dict]] = {}
        for r in rows:
            if (r["corpus"], r["K"]) == (corpus, k):
                runs.setdefault(r["seed"], []).append(r)
        kept_cpu, kept_npmi, kept_epoch, totals = [], [], [], []
        for seed_rows in runs.values():
            seed_rows.sort(key=lambda r: r["epoch"])
            kept = next(r for r in seed_rows if r["epoch"] == seed_rows[0]["kept_epoch"])
            kept_cpu.append(kept["cpu_s"])
            kept_npmi.append(kept["npmi"])
            kept_epoch.append(kept["epoch"])
            totals.append(seed_rows[0]["total_cpu_s"])
        line = [corpus, str(k), ",".join(map(str, sorted(runs))),
                f"{statistics.median(kept_npmi):+.3f}", f"{statistics.median(kept_epoch):g}",
                f"{statistics.median(kept_cpu):.1f}", f"{statistics.median(totals):.1f}"]
        for peer in shown:
            if (corpus, k, peer) not in peers:
                line.append("")
                continue
            target, peer_cpu = peers[(corpus, k, peer)]
            reach = []
            for seed_rows in runs.values():
                hit = next((r["cpu_s"] for r in seed_rows if r["npmi"] >= target), None)
                reach.append(float("inf") if hit is None else hit)
            med = statistics.median(reach)
            line.append(f"{med:.1f} s ({target:+.3f}) / {peer_cpu / med:.2f}"
                        if med != float("inf") else f"not reached ({target:+.3f})")
        lines.append(line)
    return lines


def plot(rows: list[dict], peers: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    cells = sorted({(r["corpus"], r["K"]) for r in rows})
    cols = min(2, len(cells))
    nrows = (len(cells) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(5.5 * cols, 3.6 * nrows), squeeze=False)
    markers = dict(zip(PEERS, "osD^v"))
    for ax, (corpus, k) in zip(axes.flat, cells):
        for seed in sorted({r["seed"] for r in rows if (r["corpus"], r["K"]) == (corpus, k)}):
            rs = sorted((r for r in rows if (r["corpus"], r["K"], r["seed"]) == (corpus, k,
                                                                                 seed)),
                        key=lambda r: r["epoch"])
            line, = ax.plot([r["cpu_s"] for r in rs], [r["npmi"] for r in rs], lw=1,
                            label=f"ours, seed {seed}")
            kept = next(r for r in rs if r["epoch"] == r["kept_epoch"])
            ax.plot(kept["cpu_s"], kept["npmi"], "*", ms=10, color=line.get_color())
        for (pc, pk, peer), (npmi, cpu) in peers.items():
            if (pc, pk) == (corpus, k):
                ax.plot(cpu, npmi, markers[peer], color="k", mfc="none", label=peer)
        ax.set_title(f"{corpus}, K={k}")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("CPU seconds (one thread, log scale)")
        ax.set_ylabel("NPMI (top 10)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(cells):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("ProdLDA (ppl-vae defaults): NPMI after each epoch vs CPU seconds\n"
                 "star = kept epoch; black = peers' final (mean over seeds)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    corpus_grid_arguments(p)
    p.add_argument("--csv", type=Path, default=RESULTS / "topics_time_to_quality.csv")
    p.add_argument("--peers-csv", type=Path, default=RESULTS / "topics_peers.csv")
    p.add_argument("--figure", type=Path, default=Path(__file__).resolve().parent
                   / "figures" / "topics_time_to_quality.png")
    p.add_argument("--summary", action="store_true", help="summarize the CSV, fit nothing")
    p.add_argument("--fit", type=json.loads, default={},
                   help='fit settings to change from the defaults, as JSON, e.g. \'{"epochs": '
                   '100}\' (use another --csv for them)')
    args = p.parse_args()
    if not args.summary:
        torch.set_num_threads(1)
        warnings.filterwarnings("ignore")
        done = {(r["corpus"], r["K"], r["seed"]) for r in read_csv(args.csv)}
        with tempfile.TemporaryDirectory() as workdir:
            for name in args.corpora:
                corpus = load_octis(args.data / name)
                for k in args.topics:
                    for seed in args.seeds:
                        if (name, k, seed) in done:
                            continue
                        epochs, kept, total = fit_with_snapshots(args.data / name, k, seed,
                                                                 Path(workdir), args.fit)
                        rows = score_epochs(corpus, name, k, seed, epochs, kept, total)
                        new = not args.csv.exists()
                        args.csv.parent.mkdir(parents=True, exist_ok=True)
                        with open(args.csv, "a", newline="") as f:
                            writer = csv.DictWriter(f, fieldnames=FIELDS)
                            if new:
                                writer.writeheader()
                            writer.writerows(rows)
                        best = next(r for r in rows if r["epoch"] == kept)
                        print(f"{name} K={k} seed={seed}: kept epoch {kept} NPMI "
                              f"{best['npmi']:+.3f} at {best['cpu_s']:.1f} CPU s, total "
                              f"{total:.1f}", flush=True)
    rows = read_csv(args.csv)
    peers = peer_finals(args.peers_csv)
    lines = summarize(rows, peers)
    print("| " + " | ".join(lines[0]) + " |\n|" + "---|" * len(lines[0]))
    for line in lines[1:]:
        print("| " + " | ".join(line) + " |")
    plot(rows, peers, args.figure)
    print(f"figure: {args.figure}")


if __name__ == "__main__":
    main()
