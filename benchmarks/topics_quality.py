"""Issue 16: topic quality of this project's ProdLDA, setting by setting, on the OCTIS corpora.

Each setting is a spec (``ppl_vae.models.topics.TopicSpec`` fields) plus fit settings over
the family's defaults; each (setting, seed) trains one run with ``ppl_vae.train`` (early
stopping on the validation ELBO; topics from the best epoch, best.pt, as `ppl-vae evaluate`
scores them) and reads its topic_quality.json; settings without early stopping (``-30``)
score the last epoch's topics (checkpoint.pt) instead. One thread; CPU seconds are
``time.process_time`` of the whole ``ppl_vae.train`` call (fit + report, the report's NPMI
included: about 1 s on BBC_News).

Printed per (corpus, setting): NPMI mean over seeds [min, max] (gensim c_npmi, top 10,
window 10, whole corpus as reference), the worst topic's NPMI (mean over seeds), how many
topics score below 0, diversity at 25, the least-used topic's share of documents (argmax),
epochs to the best validation ELBO / epochs run, CPU s -- and the NPMI difference and CPU
ratio to the first setting's.

    OMP_NUM_THREADS=1 nice -n 10 python3 benchmarks/topics_quality.py \\
        --corpora BBC_News --seeds 0 1 --settings old background prior10 default
    OMP_NUM_THREADS=1 nice -n 10 python3 benchmarks/topics_quality.py \\
        --corpora M10 DBLP --max-train 10000 --seeds 0 --settings old default
    OMP_NUM_THREADS=1 nice -n 10 python3 benchmarks/topics_quality.py \\
        --corpora M10 --seeds 0 1 --settings old long-defaults default
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

import ppl_vae  # noqa: E402
from ppl_vae.models.topics import topic_corpus  # noqa: E402
from ppl_vae.topic_metrics import topic_quality  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "topics"

# name -> (spec fields, fit settings) over the family's defaults
SETTINGS: dict[str, tuple[dict, dict]] = {
    # the pre-issue-16 defaults: AVITM's batch norm on the decoder logits, lr 1e-2, batch 64
    "old": ({"decoder_bn": True}, {"lr": 1e-2, "batch_size": 64, "epochs": 50}),
    "old-lr2e-3": ({"decoder_bn": True}, {"lr": 2e-3, "batch_size": 64, "epochs": 50}),
    # background log-frequencies instead of batch norm, no prior on beta
    "background": ({"beta_precision": 0.0}, {"lr": 1e-2, "batch_size": 64, "epochs": 50}),
    "background-cosine": ({"beta_precision": 0.0},
                          {"lr": 1e-2, "batch_size": 64, "epochs": 50,
                           "lr_schedule": "cosine"}),
    # background + Normal prior on beta of precision lambda
    "prior3": ({"beta_precision": 3.0}, {"lr": 1e-2, "batch_size": 64, "epochs": 100}),
    "prior10": ({"beta_precision": 10.0}, {"lr": 1e-2, "batch_size": 64, "epochs": 100}),
    "prior3-b256": ({"beta_precision": 3.0}, {"lr": 2e-2, "batch_size": 256, "epochs": 100}),
    "prior5-b256": ({"beta_precision": 5.0}, {"lr": 2e-2, "batch_size": 256, "epochs": 100}),
    "alpha0.1": ({"alpha": 0.1}, {}),
    "dropout0": ({"dropout": 0.0}, {}),
    # the family's defaults as they stand (on short texts, under 15 tokens per training
    # document: alpha 0.1 and beta_precision 3 (20/K)^2, ppl_vae.models.topics.short_texts)
    "default": ({}, {}),
    # the long-text defaults forced on any corpus (alpha 1, lambda 10 (20/K)^2; K = 20 here)
    "long-defaults": ({"alpha": 1.0, "beta_precision": 10.0}, {}),
    # the short-text defaults forced on any corpus (K = 20), and other priors with alpha 0.1
    "short-defaults": ({"alpha": 0.1, "beta_precision": 3.0}, {}),
    "short-prior0.3": ({"alpha": 0.1, "beta_precision": 0.3}, {}),
    "short-prior1": ({"alpha": 0.1, "beta_precision": 1.0}, {}),
    "old-a0.1": ({"decoder_bn": True, "alpha": 0.1}, {}),
    # no early stopping: 30 epochs, the last one's topics (short-text corpora, M10 / DBLP,
    # reach their best validation ELBO within a few epochs, long before their best topics)
    "old-30": ({"decoder_bn": True}, {"lr": 1e-2, "batch_size": 64, "epochs": 30,
                                      "patience": None}),
    "background-30": ({"beta_precision": 0.0}, {"epochs": 30, "patience": None}),
    "default-30": ({}, {"epochs": 30, "patience": None}),
}


def octis_subset(folder: Path, max_train: int | None, dest: Path) -> Path:
    """The OCTIS folder itself, or a copy whose train split keeps its first ``max_train``
    documents (val and test whole)."""
    if not max_train:
        return folder
    lines = (folder / "corpus.tsv").read_text(encoding="utf-8").splitlines()
    kept, train = [], 0
    for line in lines:
        fields = line.split("\t")
        if len(fields) > 1 and fields[1].strip() == "train":
            train += 1
            if train > max_train:
                continue
        kept.append(line)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "corpus.tsv").write_text("\n".join(kept) + "\n", encoding="utf-8")
    (dest / "vocabulary.txt").write_text((folder / "vocabulary.txt").read_text(
        encoding="utf-8"), encoding="utf-8")
    return dest


def one_run(corpus: Path, setting: str, topics: int, seed: int, work: Path) -> dict:
    spec, fit = SETTINGS[setting]
    out = work / f"{corpus.name}-{setting}-{topics}-{seed}"
    start = time.process_time()
    wall = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = ppl_vae.train("prodlda", out, {"corpus": str(corpus), "topics": topics, **spec},
                            seed=seed, progress=False, overwrite=True, device="cpu", **fit)
    cpu = time.process_time() - start
    wall = time.perf_counter() - wall
    quality = json.loads((out / "topic_quality.json").read_text())
    if fit.get("patience", "default") is None:  # no early stopping: the last epoch's topics
        last = torch.load(out / "checkpoint.pt", weights_only=True)
        run.model.load_state_dict(last["model"])
        corpus_data = topic_corpus(run.spec)
        quality = topic_quality(run.model.topic_word(), corpus_data.vocabulary,
                                corpus_data.texts)
        theta = run.family.theta(run, corpus_data.split("train"))
        quality["documents"] = torch.bincount(theta.argmax(-1),
                                              minlength=topics).tolist()
    best = max(run.history, key=lambda r: r.get("val_elbo", r["train_elbo"]))
    per_topic = quality["npmi_per_topic"]
    return {"npmi": quality["npmi"], "worst": min(per_topic),
            "below0": sum(v < 0 for v in per_topic), "diversity": quality["diversity_25"],
            "least_used": min(quality["documents"]) / sum(quality["documents"]),
            "best_epoch": best["epoch"], "epochs": len(run.history), "cpu": cpu,
            "wall": wall, "per_topic": per_topic}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpora", nargs="+", default=["BBC_News"])
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--topics", type=int, default=20)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--settings", nargs="+", default=["old", "default"],
                   choices=sorted(SETTINGS))
    p.add_argument("--max-train", type=int, default=None,
                   help="keep the first N training documents (val/test whole)")
    p.add_argument("--per-topic", action="store_true", help="print each run's topic NPMIs")
    p.add_argument("--json", type=Path, default=None, help="write every run's figures here")
    args = p.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, K={args.topics}, "
          f"seeds {args.seeds}")
    header = ("| corpus | setting | NPMI mean [min, max] | worst topic | topics < 0 | "
              "diversity@25 | least-used topic | best/run epochs | CPU s | NPMI - first | "
              "CPU ratio |")
    rows, records = [], []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in args.corpora:
            corpus = octis_subset(args.data / name, args.max_train, work / f"data-{name}")
            first = None
            for setting in args.settings:
                runs = []
                for seed in args.seeds:
                    r = one_run(corpus, setting, args.topics, seed, work)
                    runs.append(r)
                    records.append({"corpus": name, "setting": setting, "seed": seed, **r})
                    print(f"  {name} {setting} seed {seed}: NPMI {r['npmi']:+.3f} worst "
                          f"{r['worst']:+.3f} div {r['diversity']:.2f} epochs "
                          f"{r['best_epoch']}/{r['epochs']} CPU {r['cpu']:.1f}s "
                          f"(wall {r['wall']:.1f}s)", flush=True)
                    if args.per_topic:
                        print("    per topic: " + " ".join(f"{v:+.2f}" for v in
                                                           sorted(r["per_topic"])))
                npmi = [r["npmi"] for r in runs]
                mean = {k: statistics.mean(r[k] for r in runs)
                        for k in ("worst", "below0", "diversity", "least_used", "cpu")}
                mean["npmi"] = statistics.mean(npmi)
                first = first or mean
                rows.append(
                    f"| {name} | {setting} | {mean['npmi']:+.3f} [{min(npmi):+.3f}, "
                    f"{max(npmi):+.3f}] | {mean['worst']:+.3f} | {mean['below0']:.1f} | "
                    f"{mean['diversity']:.3f} | {mean['least_used']:.1%} | "
                    f"{'/'.join(str(r['best_epoch']) for r in runs)} of "
                    f"{'/'.join(str(r['epochs']) for r in runs)} | {mean['cpu']:.1f} | "
                    f"{mean['npmi'] - first['npmi']:+.3f} | "
                    f"{mean['cpu'] / first['cpu']:.2f} |")
    print()
    print(header)
    print("|" + "---|" * header.count(" | ") + "---|")
    print("\n".join(rows))
    if args.json:
        args.json.write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
