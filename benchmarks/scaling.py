"""Scaling on one machine: how time and memory grow with data size (issue 8).

Parts (``--parts``, comma-separated; default all):

  vae-batch  Fashion-MNIST MLP VAE (784-400-20), one epoch of the training images per batch
             size; alternated repeats, medians of the epoch seconds (Trainer's own clock).
  vae-step   the same VAE step (batch 128) with the ``trace`` objective, the ``jit``
             objective (JitTrace_ELBO) and with torch.compile on the encoder and decoder;
             epochs after the first (which holds tracing/compilation) are timed, alternated
             repeats, medians, ratios to ``trace``.
  irt        2PL exam model, 20 items, 10k / 100k / 1M simulated students, one epoch with
             batch 1024; amortized guide (encoder) vs mean-field guide (two numbers per
             student); each size in a fresh process so its peak RSS is its own.
  prodlda    ProdLDA (K=20, encoder hidden 100) on synthetic corpora with the statistics of
             DBLP (vocabulary 1513, 5.4 words per document on average, topic-word
             Dirichlet(0.02), document-topic Dirichlet(0.1)): 10k / 100k / 1M documents,
             batch 1024; the first ``--lda-steps`` steps of an epoch are timed (ELBO scaled
             to the full N) and the epoch extrapolated. Documents are kept as word ids
             (N x 16 int16) and made into count rows per batch (streamed to the engine with
             ``num_data``), since 1M dense rows of 1513 floats would need 6 GB.

Every process uses ``--threads`` torch threads. Run (about 6 min of CPU time; the figures
in RESULTS.md come from the reduced run below on a shared, oversubscribed 2-core machine):

    OMP_NUM_THREADS=1 python benchmarks/scaling.py --threads 1
    OMP_NUM_THREADS=1 python benchmarks/scaling.py --threads 1 \
        --parts irt,prodlda,vae-batch,vae-step --images 10000 --repeats 2 --step-images 6400
    OMP_NUM_THREADS=1 python benchmarks/scaling.py --parts irt --sizes 10000,100000
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

from ppl_vae import FitConfig, Trainer, fit


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_now_mb() -> float:
    """Resident memory now (Linux /proc), MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def param_count() -> int:
    import pyro

    return sum(v.numel() for _, v in pyro.get_param_store().named_parameters())


# ---- VAE ----------------------------------------------------------------------------------

def fashion(limit: int | None) -> torch.Tensor:
    """Fashion-MNIST training images (N, 28, 28), binarized once with a fixed seed."""
    from ppl_vae.data.images import load_fashion_mnist

    x, _ = load_fashion_mnist(split="train", limit=limit, binarize="sample", seed=0)
    return x


def vae_batch(args) -> None:
    from ppl_vae.models.vae import build_vae

    x = fashion(args.images)
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    times: dict[int, list[float]] = {b: [] for b in sizes}
    for rep in range(args.repeats):
        for b in sizes if rep % 2 == 0 else reversed(sizes):
            torch.manual_seed(0)
            model, guide = build_vae(latent_dim=20, hidden=(400,))
            h = fit(model, guide, x, epochs=1, batch_size=b, lr=1e-3, device="cpu",
                    progress=False, sync_every=50)
            times[b].append(h.rows[0]["seconds"])
            print(f"  batch {b}: {times[b][-1]:.2f} s", flush=True)
    print(f"\nVAE epoch time vs batch size ({len(x)} images, {args.threads} thread(s), "
          f"median of {args.repeats})")
    print(f"{'batch':>6} {'epoch s':>9} {'images/s':>10} {'ms/step':>8}")
    for b in sizes:
        t = statistics.median(times[b])
        steps = -(-len(x) // b)
        print(f"{b:>6} {t:>9.2f} {len(x) / t:>10.0f} {1000 * t / steps:>8.2f}")


def vae_step(args) -> None:
    from ppl_vae.models.vae import build_vae

    x = fashion(args.step_images)
    variants = ["trace", "jit", "compile"]
    times: dict[str, list[float]] = {v: [] for v in variants}
    warm: dict[str, list[float]] = {v: [] for v in variants}
    for rep in range(args.repeats):
        for v in variants if rep % 2 == 0 else reversed(variants):
            torch.manual_seed(0)
            model, guide = build_vae(latent_dim=20, hidden=(400,))
            if v == "compile":
                model.decoder = torch.compile(model.decoder)
                guide.encoder = torch.compile(guide.encoder)
            cfg = FitConfig(epochs=3, batch_size=128, objective="jit" if v == "jit" else "trace",
                            device="cpu", sync_every=50)
            h = Trainer(model, guide, cfg).fit(x, progress=False)
            warm[v].append(h.rows[0]["seconds"])
            times[v].append(statistics.median(r["seconds"] for r in h.rows[1:]))
            print(f"  {v}: {times[v][-1]:.2f} s/epoch, first {warm[v][-1]:.2f} s", flush=True)
    steps = len(x) // 128
    base = statistics.median(times["trace"])
    print(f"\nVAE step, batch 128, {len(x)} images ({steps} steps/epoch), {args.threads} "
          f"thread(s), median of {args.repeats} (epochs 2-3; epoch 1 reported separately)")
    print(f"{'variant':>8} {'ms/step':>8} {'steps/s':>8} {'vs trace':>9} {'1st epoch s':>12}")
    for v in variants:
        t = statistics.median(times[v])
        print(f"{v:>8} {1000 * t / steps:>8.2f} {steps / t:>8.1f} {base / t:>9.2f} "
              f"{statistics.median(warm[v]):>12.2f}")


# ---- exam model -----------------------------------------------------------------------------

def irt_worker(n: int, guide_kind: str, batch: int) -> dict:
    from ppl_vae.models.irt import build_irt, simulate

    base = rss_now_mb()
    data = simulate(n, 20, "2pl", seed=0)
    responses, mask = data["responses"], data["mask"]
    data_mb = (responses.numel() * responses.element_size() + mask.numel()) / 2**20
    torch.manual_seed(0)
    model, guide = build_irt({"kind": "2pl", "num_items": 20, "guide": guide_kind})
    h = fit(model, guide, (responses, mask), epochs=1, batch_size=batch, lr=0.01,
            device="cpu", progress=False)
    t = h.rows[0]["seconds"]
    return {"n": n, "guide": guide_kind, "seconds": t, "students_per_s": n / t,
            "responses_per_s": float(mask.sum()) / t, "params": param_count(),
            "data_mb": data_mb, "rss_after_import_mb": base, "peak_rss_mb": peak_rss_mb(),
            "rss_end_mb": rss_now_mb(),
            "elbo": h.rows[0]["train_elbo"]}


# ---- ProdLDA --------------------------------------------------------------------------------

def synthetic_dblp(n: int, vocab: int = 1513, topics: int = 20, mean_len: float = 5.4,
                   max_len: int = 16, seed: int = 0, chunk: int = 100_000) -> torch.Tensor:
    """Word ids (n, max_len) int16, -1 = padding: lengths 1 + Poisson(mean_len - 1)
    (capped at max_len), words from an LDA process with sparse topics. Made in chunks of
    ``chunk`` documents so that generating does not dominate the peak memory."""
    rng = np.random.default_rng(seed)
    phi = rng.dirichlet(np.full(vocab, 0.02), size=topics)  # (K, V)
    cdf = np.cumsum(phi, 1)
    ids = np.full((n, max_len), -1, dtype=np.int16)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        theta = rng.dirichlet(np.full(topics, 0.1), size=m)  # (m, K)
        lengths = np.minimum(1 + rng.poisson(mean_len - 1, size=m), max_len)
        doc = np.repeat(np.arange(m), lengths)
        pos = np.arange(len(doc)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        z = (rng.random(len(doc))[:, None] > np.cumsum(theta, 1)[doc]).sum(1)
        z = z.clip(0, topics - 1)
        u = rng.random(len(doc))
        words = np.empty(len(doc), dtype=np.int64)
        for k in range(topics):
            sel = z == k
            words[sel] = np.searchsorted(cdf[k], u[sel]).clip(0, vocab - 1)
        ids[start + doc, pos] = words
    return torch.from_numpy(ids)


class CountBatches:
    """Shuffled minibatches of count rows (B, V) made from word ids on the fly."""

    def __init__(self, ids: torch.Tensor, vocab: int, batch_size: int, seed: int = 0,
                 max_steps: int | None = None):
        self.ids, self.vocab, self.batch_size = ids, vocab, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.max_steps = max_steps

    def __len__(self) -> int:
        steps = -(-len(self.ids) // self.batch_size)
        return min(steps, self.max_steps) if self.max_steps else steps

    def __iter__(self):
        order = torch.randperm(len(self.ids), generator=self.generator)
        for i in range(len(self)):
            ids = self.ids[order[i * self.batch_size:(i + 1) * self.batch_size]].long()
            counts = torch.zeros(len(ids), self.vocab)
            counts.scatter_add_(1, ids.clamp(min=0), (ids >= 0).float())
            yield counts


def prodlda_worker(n: int, batch: int, max_steps: int) -> dict:
    from ppl_vae.models.prodlda import build_prodlda

    base = rss_now_mb()
    t0 = time.perf_counter()
    ids = synthetic_dblp(n)
    gen_s = time.perf_counter() - t0
    words = int((ids >= 0).sum())
    torch.manual_seed(0)
    model, guide = build_prodlda(1513, 20, hidden=100)
    batches = CountBatches(ids, 1513, batch, max_steps=max_steps or None)
    h = fit(model, guide, batches, num_data=n, epochs=1, batch_size=batch, lr=2e-3,
            device="cpu", progress=False)
    seen = min(n, len(batches) * batch)
    docs_per_s = seen / h.rows[0]["seconds"]
    return {"n": n, "steps": len(batches), "seconds": n / docs_per_s, "docs_per_s": docs_per_s,
            "words_per_doc": words / n,
            "params": param_count(), "data_mb": ids.numel() * 2 / 2**20,
            "generate_s": gen_s, "rss_after_import_mb": base, "peak_rss_mb": peak_rss_mb(),
            "rss_end_mb": rss_now_mb(),
            "elbo": h.rows[0]["train_elbo"]}


def run_worker(args, *extra: str) -> dict:
    cmd = [sys.executable, __file__, "--threads", str(args.threads), "--worker", *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def irt(args) -> None:
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        for g in ("amortized", "meanfield"):
            rows.append(run_worker(args, "irt", str(n), g, str(args.irt_batch)))
            print(json.dumps(rows[-1]), flush=True)
    print(f"\nExam model (2PL, 20 items), one epoch, batch {args.irt_batch}, "
          f"{args.threads} thread(s)")
    print(f"{'students':>9} {'guide':>10} {'epoch s':>8} {'students/s':>11} "
          f"{'params':>9} {'data MB':>8} {'RSS start MB':>13} {'RSS end MB':>11} "
          f"{'peak RSS MB':>12}")
    for r in rows:
        print(f"{r['n']:>9} {r['guide']:>10} {r['seconds']:>8.2f} {r['students_per_s']:>11.0f} "
              f"{r['params']:>9} {r['data_mb']:>8.1f} {r['rss_after_import_mb']:>13.0f} "
              f"{r['rss_end_mb']:>11.0f} {r['peak_rss_mb']:>12.0f}")


def prodlda(args) -> None:
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        rows.append(run_worker(args, "prodlda", str(n), str(args.lda_batch),
                               str(args.lda_steps)))
        print(json.dumps(rows[-1]), flush=True)
    print(f"\nProdLDA (K=20, V=1513, DBLP-like), batch {args.lda_batch}, {args.threads} "
          f"thread(s); epoch s = documents / (docs/s over the first {args.lda_steps or 'all'} "
          "steps)")
    print(f"{'documents':>10} {'words/doc':>9} {'epoch s':>8} {'docs/s':>8} {'params':>8} "
          f"{'ids MB':>7} {'RSS start MB':>13} {'RSS end MB':>11} {'peak RSS MB':>12}")
    for r in rows:
        print(f"{r['n']:>10} {r['words_per_doc']:>9.2f} {r['seconds']:>8.2f} "
              f"{r['docs_per_s']:>8.0f} {r['params']:>8} {r['data_mb']:>7.1f} "
              f"{r['rss_after_import_mb']:>13.0f} {r['rss_end_mb']:>11.0f} "
              f"{r['peak_rss_mb']:>12.0f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", default="vae-batch,vae-step,irt,prodlda")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--images", type=int, default=None, help="VAE images (default all 60k)")
    p.add_argument("--batch-sizes", default="32,128,512,2048")
    p.add_argument("--step-images", type=int, default=12800)
    p.add_argument("--sizes", default="10000,100000,1000000")
    p.add_argument("--irt-batch", type=int, default=1024)
    p.add_argument("--lda-batch", type=int, default=1024)
    p.add_argument("--lda-steps", type=int, default=100,
                   help="time this many steps per size and extrapolate the epoch (0: all)")
    p.add_argument("--worker", nargs="+", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        kind, *rest = args.worker
        result = (irt_worker(int(rest[0]), rest[1], int(rest[2])) if kind == "irt"
                  else prodlda_worker(int(rest[0]), int(rest[1]), int(rest[2])))
        print(json.dumps(result))
        return
    print(f"torch {torch.__version__}, {args.threads} thread(s), CPU only")
    parts = {"vae-batch": vae_batch, "vae-step": vae_step, "irt": irt, "prodlda": prodlda}
    for name in args.parts.split(","):
        start = time.perf_counter()
        parts[name](args)
        print(f"[{name}: {time.perf_counter() - start:.0f} s]", flush=True)


if __name__ == "__main__":
    main()
