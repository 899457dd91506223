"""Training throughput of ppl-vae beside hand-written PyTorch, one model family at a time
(issue 8's GPU figures; it runs on CPU as well).

    vae      Fashion-MNIST MLP VAE 784-400-20 (Bernoulli, static binarization, sampled KL):
             images/s and seconds per epoch; ppl-vae objectives trace and jit beside the
             hand-written loop of benchmarks/vae_overhead.py
    irt      2PL exam model, simulated students x items, amortized ability encoder
             (2I -> 64 -> (loc, scale)) + mean-field items (log-normal a, normal b):
             responses/s; ppl-vae ``build_irt`` (trace) beside the same ELBO in torch
    prodlda  ProdLDA on the DBLP corpus (OCTIS, V = 1513), K = 20, encoder V-100-100 with
             BatchNorm heads, logistic-normal Laplace prior: documents/s; ppl-vae
             ``build_prodlda`` (trace, jit) beside the same network and ELBO in torch

Every side keeps its data on the device, slices minibatches there with a shuffled index and
keeps losses on the device (ppl-vae reads them every 50 steps, the hand-written loops once per
epoch). One warm-up epoch, then one timed epoch (CUDA synchronized), alternated repeats in
one process, medians; ``ratio`` is ppl-vae's throughput over PyTorch's (>1 = faster).

    python benchmarks/throughput.py --device cuda --repeats 3            # GPU
    OMP_NUM_THREADS=1 python benchmarks/throughput.py --device cpu --threads 1 \\
        --images 10000 --students 20000 --docs 10000 --repeats 3          # CPU, cut down
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vae_overhead import TorchVAE  # noqa: E402  (the hand-written VAE, same network)

from ppl_vae import fit  # noqa: E402
from ppl_vae.models.irt import build_irt, simulate  # noqa: E402
from ppl_vae.models.prodlda import build_prodlda, laplace_prior  # noqa: E402
from ppl_vae.models.vae import build_vae  # noqa: E402

LOG_2PI = math.log(2 * math.pi)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def torch_loop(module: nn.Module, loss_fn, data: tuple[torch.Tensor, ...], batch: int,
               device: torch.device, seed: int) -> float:
    """Seconds of the second of two epochs of Adam on ``loss_fn(*rows, n)``."""
    torch.manual_seed(seed)
    module.to(device).train()
    opt = torch.optim.Adam(module.parameters(), lr=1e-3)
    n = len(data[0])
    gen = torch.Generator().manual_seed(seed)

    def epoch() -> float:
        order = torch.randperm(n, generator=gen).to(device)
        total = torch.zeros((), device=device)
        for i in range(-(-n // batch)):
            idx = order[i * batch:(i + 1) * batch]
            loss = loss_fn(*(t.index_select(0, idx) for t in data), n)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            total += loss.detach()
        return float(total)  # one host read per epoch

    epoch()
    sync(device)
    start = time.perf_counter()
    epoch()
    sync(device)
    return time.perf_counter() - start


def engine_loop(model, guide, data, batch: int, device: torch.device, seed: int,
                objective: str = "trace") -> float:
    """Seconds of ppl-vae's second epoch (``fit`` times each epoch including its final
    loss read)."""
    torch.manual_seed(seed)
    history = fit(model, guide, data, epochs=2, batch_size=batch, objective=objective,
                  lr=1e-3, seed=seed, device=str(device), progress=False)
    return history["seconds"][-1]


# ---- exam model ---------------------------------------------------------------------------
class Torch2PL(nn.Module):
    """ability_s ~ N(0, 1), a_i ~ LogNormal(0, 1), b_i ~ N(0, 3),
    y_si ~ Bernoulli(sigmoid(a_i (ability_s - b_i))) on answered cells;
    q(ability_s) = N(encoder([y*m, m])), q(log a_i) and q(b_i) Normal; one-draw ELBO."""

    def __init__(self, items: int, hidden: int = 64):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(2 * items, hidden), nn.ReLU())
        self.loc, self.scale = nn.Linear(hidden, 1), nn.Linear(hidden, 1)
        self.item_loc = nn.Parameter(torch.zeros(2, items))       # log a, b
        self.item_scale = nn.Parameter(torch.full((2, items), math.log(math.expm1(0.1))))

    def loss(self, y: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
        m = mask.to(y.dtype)
        h = self.body(torch.cat([y * m, m], -1))
        mu, sd = self.loc(h).squeeze(-1), F.softplus(self.scale(h)).squeeze(-1) + 1e-4
        eps = torch.randn_like(mu)
        theta = mu + sd * eps
        s = F.softplus(self.item_scale)
        e = torch.randn_like(self.item_loc)
        log_a, b = self.item_loc + s * e
        a = log_a.exp()
        eta = a * (theta.unsqueeze(-1) - b)
        loglik = -(F.binary_cross_entropy_with_logits(eta, y, reduction="none") * m).sum(-1)
        local = loglik - 0.5 * theta**2 - (-0.5 * eps**2 - sd.log())
        log_prior = (-0.5 * log_a**2 - log_a).sum() + (-0.5 * (b / 3.0) ** 2).sum()
        log_q = (-0.5 * e**2 - s.log()).sum() - log_a.sum()  # q of a = LogNormal
        return -(local.sum() * (n / len(y)) + log_prior - log_q)


# ---- ProdLDA ------------------------------------------------------------------------------
class TorchProdLDA(nn.Module):
    """The same network and one-draw ELBO as models/prodlda.py + DocumentEncoder."""

    def __init__(self, vocab: int, topics: int = 20, hidden: int = 100, dropout: float = 0.2):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(vocab, hidden), nn.Softplus(),
                                  nn.Linear(hidden, hidden), nn.Softplus(), nn.Dropout(dropout))
        self.fc1, self.fc2 = nn.Linear(hidden, topics), nn.Linear(hidden, topics)
        self.bn1 = nn.BatchNorm1d(topics, affine=False)
        self.bn2 = nn.BatchNorm1d(topics, affine=False)
        self.beta = nn.Linear(topics, vocab, bias=False)
        self.bn = nn.BatchNorm1d(vocab, affine=False)
        self.drop = nn.Dropout(dropout)
        loc, scale = laplace_prior(torch.ones(topics))
        self.register_buffer("prior_loc", loc)
        self.register_buffer("prior_scale", scale)

    def loss(self, docs: torch.Tensor, n: int) -> torch.Tensor:
        h = self.body(docs)
        mu, sd = self.bn1(self.fc1(h)), (0.5 * self.bn2(self.fc2(h))).exp()
        eps = torch.randn_like(mu)
        z = mu + sd * eps
        logp = F.log_softmax(self.bn(self.beta(self.drop(F.softmax(z, -1)))), -1)
        counts = docs.sum(-1)
        loglik = ((docs * logp).sum(-1) + torch.lgamma(counts + 1)
                  - torch.lgamma(docs + 1).sum(-1))
        u = (z - self.prior_loc) / self.prior_scale
        kl = (-0.5 * eps**2 - sd.log()).sum(-1) - (-0.5 * u**2 - self.prior_scale.log()).sum(-1)
        return -(loglik - kl).sum() * (n / len(docs))


# ---- the parts ----------------------------------------------------------------------------
def run_pairs(label: str, unit: str, size: int, sides: dict, repeats: int) -> list[dict]:
    """sides: name -> callable() returning seconds; alternated order per repeat."""
    times: dict[str, list[float]] = {k: [] for k in sides}
    names = list(sides)
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            times[name].append(sides[name]())
    base = statistics.median(times["pytorch"])
    rows = []
    for name in names:
        t = statistics.median(times[name])
        rows.append({"part": label, "side": name, "epoch_s": t, "per_s": size / t,
                     "ratio": base / t, "unit": unit,
                     "all": " ".join(f"{v:.3f}" for v in times[name])})
    return rows


def _torch_vae(x, batch, device) -> float:
    model = TorchVAE()
    return torch_loop(model, lambda xb, n: model.loss(xb, False, n), (x,), batch, device, 0)


def _engine_vae(x, batch, device, objective) -> float:
    return engine_loop(*build_vae(latent_dim=20, hidden=(400,)), x, batch, device, 0, objective)


def vae_part(args, device) -> list[dict]:
    from ppl_vae.data.images import load_fashion_mnist

    x, _ = load_fashion_mnist(split="train", limit=args.images, binarize="sample", seed=0)
    x = x.to(device)
    rows = []
    for batch in args.vae_batch:
        sides = {
            "pytorch": lambda b=batch: _torch_vae(x, b, device),
            "ppl-vae trace": lambda b=batch: _engine_vae(x, b, device, "trace"),
            "ppl-vae jit": lambda b=batch: _engine_vae(x, b, device, "jit"),
        }
        rows += run_pairs(f"vae batch {batch}", "images", len(x), sides, args.repeats)
    return rows


def irt_part(args, device) -> list[dict]:
    sim = simulate(args.students, args.items, kind="2pl", seed=0)
    y, mask = sim["responses"].to(device), sim["mask"].to(device)

    def torch_side() -> float:
        model = Torch2PL(args.items)
        return torch_loop(model, model.loss, (y, mask), args.irt_batch, device, 0)

    def engine_side(objective: str) -> float:
        model, guide = build_irt({"kind": "2pl", "num_items": args.items,
                                  "guide": "amortized"})
        return engine_loop(model, guide, (y, mask), args.irt_batch, device, 0, objective)

    rows = run_pairs(f"irt 2pl {args.students}x{args.items}, batch {args.irt_batch}",
                     "students", len(y),
                     {"pytorch": torch_side, "ppl-vae trace": lambda: engine_side("trace")},
                     args.repeats)  # no jit: JitTrace_ELBO cannot see AutoNormal's params
    for r in rows:  # responses per second as well
        r["responses_per_s"] = r["per_s"] * args.items
    return rows


def prodlda_part(args, device) -> list[dict]:
    from ppl_vae.data.topics import load_octis

    corpus = load_octis(args.corpus)
    docs = corpus.split("train").to_dense()[:args.docs].to(device)
    vocab = docs.shape[1]

    def torch_side() -> float:
        model = TorchProdLDA(vocab, args.topics)
        return torch_loop(model, model.loss, (docs,), args.lda_batch, device, 0)

    def engine_side(objective: str) -> float:
        model, guide = build_prodlda(vocab, args.topics)
        return engine_loop(model, guide, docs, args.lda_batch, device, 0, objective)

    return run_pairs(f"prodlda {Path(args.corpus).name} {len(docs)} docs, V={vocab}, "
                     f"batch {args.lda_batch}", "documents", len(docs),
                     {"pytorch": torch_side, "ppl-vae trace": lambda: engine_side("trace"),
                      "ppl-vae jit": lambda: engine_side("jit")}, args.repeats)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--parts", default="vae,irt,prodlda")
    p.add_argument("--images", type=int, default=60000)
    p.add_argument("--vae-batch", type=int, nargs="+", default=[128, 1024])
    p.add_argument("--students", type=int, default=100000)
    p.add_argument("--items", type=int, default=50)
    p.add_argument("--irt-batch", type=int, default=1024)
    p.add_argument("--docs", type=int, default=100000, help="first N DBLP training docs")
    p.add_argument("--corpus", default=str(Path(__file__).resolve().parents[2] / "shared"
                                           / "data" / "topics" / "DBLP"))
    p.add_argument("--topics", type=int, default=20)
    p.add_argument("--lda-batch", type=int, default=256)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"CPU, {torch.get_num_threads()} thread(s)")
    print(f"device: {name}; torch {torch.__version__}; median of {args.repeats} alternated "
          "repeats, second epoch timed", flush=True)
    parts = {"vae": vae_part, "irt": irt_part, "prodlda": prodlda_part}
    print(f"{'part':<48} {'side':<14} {'epoch s':>8} {'throughput':>22} {'ratio':>6}  "
          "epoch s of each repeat")
    for part in args.parts.split(","):
        for r in parts[part](args, device):
            rate = f"{r['per_s']:,.0f} {r['unit']}/s"
            extra = (f"  = {r['responses_per_s']:,.0f} responses/s"
                     if "responses_per_s" in r else "")
            print(f"{r['part']:<48} {r['side']:<14} {r['epoch_s']:8.3f} {rate:>22} "
                  f"{r['ratio']:6.3f}  {r['all']}{extra}", flush=True)


if __name__ == "__main__":
    main()
