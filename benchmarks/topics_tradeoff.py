"""Coherence against diversity (issue 16): how far the ProdLDA family's own options move a
run along NPMI and diversity@25, beside the peers' final points and the issue's target
region (diversity >= 0.80 and NPMI >= the best peer's).

Each grid point is a user's run with options, ``ppl_vae.train("prodlda", out, {"corpus": DIR,
"topics": K, **options}, seed=seed)`` (the family's other defaults; topics of the kept
best.pt), scored like every method of ``benchmarks/topics_peers.py`` (its ``ours`` and
``score``: gensim c_npmi of the top 10 words, window 10, whole corpus as reference;
diversity = unique top-25 words / (25 K)). The grid crosses

    beta_precision   the Normal prior's precision on the topic-word weights, as multiples of
                     the family's default (10 (20/K)^2 on long texts, 3 (20/K)^2 on short
                     ones); 0 = no prior
    alpha            the Dirichlet concentration behind the logistic-normal prior on theta
    encoder_variance the encoder's log-variance head (bounded or AVITM's batchnorm)

One row per fit goes to ``--csv`` (cells already there are skipped); the summary prints, per
corpus and K, the grid's Pareto front (no other point has both more NPMI and more diversity),
the defaults' point, the best peer's NPMI, and whether any point reaches the target region;
``--figure`` draws every point (NPMI against diversity, one panel per corpus and K) with the
peers' means (from topics_peers.csv) and the target region shaded.

Run (one thread; the peers' rows from ``benchmarks/results/topics_peers.csv``):
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 nice -n 10 python3 benchmarks/topics_tradeoff.py \\
        --corpora BBC_News --topics 20 50 --seeds 0
Summary and figure of an existing CSV, fitting nothing: add ``--summary``.
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import itertools  # noqa: E402
import statistics  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from topics_peers import append_row, corpus_grid_arguments, ours, read_rows, score  # noqa: E402

from ppl_vae.data.topics import load_octis  # noqa: E402
from ppl_vae.models.topics import TopicSpec, default_beta_precision, short_texts  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
FIGURES = Path(__file__).resolve().parent / "figures"
PEERS = ("octis-prodlda", "sklearn-lda", "gensim-lda", "fastopic", "ecrtm")
TARGET_DIVERSITY = 0.80


def grid_options(corpus_dir: Path, k: int, precisions: list[float], alphas: list[float],
                 heads: list[str]) -> list[dict]:
    """The option dicts of the grid; beta_precision as multiples of the corpus's default."""
    spec = TopicSpec(model="prodlda", corpus=str(corpus_dir), topics=k)
    default = default_beta_precision(k, short_texts(spec))
    return [{"beta_precision": round(m * default, 6), "alpha": a, "encoder_variance": h}
            for m, a, h in itertools.product(precisions, alphas, heads)]


def method_name(options: dict) -> str:
    """e.g. ppl-prodlda[beta_precision=3,alpha=1,encoder_variance=bounded] (numbers in %g)."""
    return "ppl-prodlda[" + ",".join(
        f"{k}={v:g}" if isinstance(v, float | int) else f"{k}={v}"
        for k, v in options.items()) + "]"


def pareto(points: list[dict]) -> list[dict]:
    """Points no other point beats on both NPMI and diversity, by diversity."""
    front = [p for p in points
             if not any(q["npmi"] >= p["npmi"] and q["diversity25"] >= p["diversity25"]
                        and (q["npmi"], q["diversity25"]) != (p["npmi"], p["diversity25"])
                        for q in points)]
    return sorted(front, key=lambda p: p["diversity25"])


def means(rows: list[dict]) -> list[dict]:
    """Mean NPMI and diversity over seeds, per (corpus, K, method); a cell fitted more than
    once counts with its latest row (as in topics_peers.py's summary)."""
    latest = {(r["corpus"], r["K"], r["seed"], r["method"]): r for r in rows}
    groups: dict[tuple, list[dict]] = {}
    for r in latest.values():
        groups.setdefault((r["corpus"], r["K"], r["method"]), []).append(r)
    return [{"corpus": c, "K": k, "method": m, "seeds": len(rs),
             "npmi": statistics.mean(r["npmi"] for r in rs),
             "diversity25": statistics.mean(r["diversity25"] for r in rs),
             "topics_npmi_below_0": statistics.mean(r["topics_npmi_below_0"] for r in rs)}
            for (c, k, m), rs in groups.items()]


def summarize(grid: list[dict], peers: list[dict], defaults: list[dict]) -> None:
    for corpus, k in sorted({(r["corpus"], r["K"]) for r in grid}):
        points = [p for p in means(grid) if (p["corpus"], p["K"]) == (corpus, k)]
        peer = [p for p in means(peers) if (p["corpus"], p["K"]) == (corpus, k)
                and p["method"] in PEERS]
        best_peer = max(peer, key=lambda p: p["npmi"]) if peer else None
        floor = best_peer["npmi"] if best_peer else float("-inf")
        print(f"\n{corpus} K={k}: {len(points)} grid points"
              + (f"; best peer {best_peer['method']} NPMI {floor:+.3f}" if best_peer else ""))
        for p in defaults:
            if (p["corpus"], p["K"]) == (corpus, k):
                print(f"  defaults (topics_peers.csv, {p['seeds']} seeds): NPMI "
                      f"{p['npmi']:+.3f} diversity {p['diversity25']:.3f}")
        print("  Pareto front (diversity, NPMI, topics < 0, options):")
        for p in pareto(points):
            print(f"    {p['diversity25']:.3f}  {p['npmi']:+.3f}  "
                  f"{p['topics_npmi_below_0']:4.1f}  {p['method'][len('ppl-prodlda'):]}")
        hits = [p for p in points
                if p["diversity25"] >= TARGET_DIVERSITY and p["npmi"] >= floor]
        print(f"  points in the target region (diversity >= {TARGET_DIVERSITY}, NPMI >= best "
              f"peer): {len(hits)}")


def figure(grid: list[dict], peers: list[dict], defaults: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = sorted({(r["corpus"], r["K"]) for r in grid})
    columns = min(3, len(cells))
    rows = -(-len(cells) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 4.4 * rows),
                             squeeze=False)
    for ax in axes.flat[len(cells):]:
        ax.axis("off")
    cells = sorted(cells, key=lambda c: (c[1], c[0]))  # a row per K when there are three corpora
    for ax, (corpus, k) in zip(axes.flat, cells):
        points = [p for p in means(grid) if (p["corpus"], p["K"]) == (corpus, k)]
        peer = [p for p in means(peers) if (p["corpus"], p["K"]) == (corpus, k)
                and p["method"] in PEERS]
        floor = max((p["npmi"] for p in peer), default=None)
        for head, marker in (("bounded", "o"), ("batchnorm", "s")):
            sub = [p for p in points if f"encoder_variance={head}" in p["method"]]
            ax.scatter([p["diversity25"] for p in sub], [p["npmi"] for p in sub], s=22,
                       marker=marker, alpha=0.7, label=f"ours, {head} head (grid)")
        front = pareto(points)
        ax.plot([p["diversity25"] for p in front], [p["npmi"] for p in front], "k-", lw=0.8,
                label="ours: Pareto front")
        for p in defaults:
            if (p["corpus"], p["K"]) == (corpus, k):
                ax.scatter([p["diversity25"]], [p["npmi"]], marker="*", s=160, c="crimson",
                           label="ours: defaults", zorder=5)
        for p in peer:
            ax.scatter([p["diversity25"]], [p["npmi"]], marker="x", c="gray")
            ax.annotate(p["method"], (p["diversity25"], p["npmi"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        if floor is not None:
            top = max([floor] + [p["npmi"] for p in points]) + 0.02
            ax.fill_between([TARGET_DIVERSITY, 1.0], floor, top, color="green", alpha=0.1,
                            label="issue 16's target region")
        ax.set(title=f"{corpus}, K={k}", xlabel="diversity (unique top-25 words)",
               ylabel="NPMI (mean over topics)", xlim=(0, 1.02))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"figure: {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    corpus_grid_arguments(p)
    p.add_argument("--precisions", type=float, nargs="+", default=[0, 0.1, 0.3, 1, 3],
                   help="beta_precision as multiples of the family's default")
    p.add_argument("--alphas", type=float, nargs="+", default=[0.3, 1, 3])
    p.add_argument("--heads", nargs="+", default=["bounded", "batchnorm"])
    p.add_argument("--csv", type=Path, default=RESULTS / "topics_tradeoff.csv")
    p.add_argument("--peers-csv", type=Path, default=RESULTS / "topics_peers.csv")
    p.add_argument("--figure", type=Path, default=FIGURES / "topics_tradeoff.png")
    p.add_argument("--summary", action="store_true", help="only summarize the CSV")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/topics_tradeoff_runs"))
    args = p.parse_args()
    if not args.summary:
        torch.set_num_threads(1)
        warnings.filterwarnings("ignore")
        torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # imports torch._dynamo
        done = {(r["corpus"], r["K"], r["seed"], r["method"]) for r in read_rows(args.csv)}
        for name in args.corpora:
            corpus = load_octis(args.data / name)
            for k in args.topics:
                grid = grid_options(args.data / name, k, args.precisions, args.alphas,
                                    args.heads)
                for seed in args.seeds:
                    for options in grid:
                        method = method_name(options)
                        if (name, k, seed, method) in done:
                            continue
                        fitted = ours("prodlda", options)(corpus, k, seed, args.workdir)
                        row = score(corpus, name, k, seed, method, fitted)
                        print(f"{name} K={k} seed={seed} {method}: NPMI {row['npmi']:+.3f} "
                              f"diversity {row['diversity25']:.3f} "
                              f"below 0 {row['topics_npmi_below_0']}", flush=True)
                        append_row(args.csv, row)
    grid = read_rows(args.csv)
    peer_rows = read_rows(args.peers_csv)
    defaults = [p for p in means([r for r in peer_rows if r["method"] == "ppl-prodlda"])]
    summarize(grid, peer_rows, defaults)
    figure(grid, peer_rows, defaults, args.figure)


if __name__ == "__main__":
    main()
