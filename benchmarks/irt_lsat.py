"""LSAT (sections VI and VII, 1000 examinees x 5 items): ppl-vae's exam models beside girth's
marginal maximum likelihood (MML) estimates, amortized vs mean-field abilities, and the
lecture model beside 1PL/2PL/3PL on the same data.

Needs girth beside ppl-vae in one environment (outside the repository):

    python -m venv /work/venvs/irt
    /work/venvs/irt/bin/pip install -r benchmarks/requirements-irt.txt
    /work/venvs/irt/bin/pip install -e . --no-deps
    OMP_NUM_THREADS=1 /work/venvs/irt/bin/python benchmarks/irt_lsat.py [--data ../shared/data/irt]

Prints: per item, girth's MML 2PL (a, b) and Rasch b beside the posterior means (and sds)
of ppl-vae's 2PL (amortized and mean-field guides) and 1PL; abilities of the two guides side
by side and beside the exact quadrature posterior given the fitted items; and each model's
importance-sampled log-likelihood per student (K=1000).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from ppl_vae import fit, log_likelihood
from ppl_vae.data.irt import load_responses
from ppl_vae.models.irt import (
    ability_posterior,
    build_irt,
    posterior_samples,
    quadrature_abilities,
)

FIT = dict(epochs=200, batch_size=100, lr=0.05, lr_schedule="cosine", progress=False,
           device="cpu")


def train(kind: str, guide: str, data, seed: int = 0):
    spec = {"kind": kind, "num_items": data.num_items, "guide": guide}
    if guide == "fullrank":  # amortized abilities, one multivariate Normal over the items
        spec.update(guide="amortized", items="fullrank")
    model, q = build_irt(spec)
    start = time.perf_counter()
    fit(model, q, data.tensors(), seed=seed, **FIT)
    seconds = time.perf_counter() - start
    samples = posterior_samples(model, q, *data.tensors(), num_samples=4000)
    return model, q, samples, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path,
                        default=Path(__file__).resolve().parents[2] / "shared" / "data" / "irt")
    parser.add_argument("--iwae-samples", type=int, default=1000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    import girth

    for name in ("lsat6", "lsat7"):
        data = load_responses(args.data / f"{name}.csv", check=False)
        y = data.responses.numpy().T.astype(int)  # girth: items x participants, 0/1
        start = time.perf_counter()
        g2 = girth.twopl_mml(y)
        g_sec = time.perf_counter() - start
        g1 = girth.rasch_mml(y, discrimination=1.0)
        fits = {(k, g): train(k, g, data) for k, g in
                (("2pl", "amortized"), ("2pl", "meanfield"), ("2pl", "fullrank"),
                 ("1pl", "amortized"),
                 ("3pl", "amortized"), ("lecture", "amortized"))}
        print(f"\n== {name.upper()}: {data.num_students} examinees x {data.num_items} items ==")
        t_a, t_m = fits["2pl", "amortized"][3], fits["2pl", "meanfield"][3]
        print(f"girth twopl_mml: {g_sec:.2f} s; ppl-vae 2PL amortized {t_a:.1f} s, "
              f"mean-field {t_m:.1f} s "
              f"({FIT['epochs']} epochs, batch {FIT['batch_size']})")
        print("item | a: girth MML | 2PL amortized mean (sd) | 2PL mean-field | 2PL full-rank "
              "items || b: girth MML | 2PL amortized | 2PL mean-field | 2PL full-rank items "
              "|| Rasch b: girth | 1PL")
        sa, sm, sf, s1 = (fits[k][2] for k in (("2pl", "amortized"), ("2pl", "meanfield"),
                                                ("2pl", "fullrank"), ("1pl", "amortized")))
        for j, item in enumerate(data.item_ids):
            def ms(s, site, j=j):
                return f"{float(s[site][:, j].mean()):6.3f} ({float(s[site][:, j].std()):.3f})"
            print(f"{item} | {g2['Discrimination'][j]:6.3f} | {ms(sa, 'discrimination')} | "
                  f"{ms(sm, 'discrimination')} | {ms(sf, 'discrimination')} || "
                  f"{g2['Difficulty'][j]:6.3f} | {ms(sa, 'difficulty')} | "
                  f"{ms(sm, 'difficulty')} | {ms(sf, 'difficulty')} || "
                  f"{g1['Difficulty'][j]:6.3f} | {ms(s1, 'difficulty')}")
        for site, key in (("discrimination", "Discrimination"), ("difficulty", "Difficulty")):
            for label, s in (("amortized", sa), ("mean-field", sm), ("full-rank items", sf)):
                diff = np.abs(s[site].mean(0).numpy() - g2[key])
                print(f"max |{site} - girth| ({label}): {diff.max():.3f}")

        # abilities: amortized vs mean-field vs the exact posterior given the fitted items
        model_a, qa = fits["2pl", "amortized"][:2]
        model_m, qm = fits["2pl", "meanfield"][:2]
        ma, sda = ability_posterior(qa, *data.tensors())
        mm, sdm = ability_posterior(qm, *data.tensors())
        items = {k: sa[k].mean(0) for k in ("difficulty", "discrimination")}
        ex, sdx = quadrature_abilities("2pl", items, *data.tensors())
        gi = {"difficulty": torch.tensor(g2["Difficulty"]).float(),
              "discrimination": torch.tensor(g2["Discrimination"]).float()}
        eg, _ = quadrature_abilities("2pl", gi, *data.tensors())
        c = lambda a, b: float(np.corrcoef(a.numpy(), b.numpy())[0, 1])  # noqa: E731
        print(f"abilities: corr(amortized, mean-field) {c(ma, mm):.4f}, mean |diff| "
              f"{float((ma - mm).abs().mean()):.3f}; mean sd amortized {float(sda.mean()):.3f}, "
              f"mean-field {float(sdm.mean()):.3f}, exact given items {float(sdx.mean()):.3f}")
        print(f"abilities vs exact posterior mean given the fitted items: amortized mean |diff| "
              f"{float((ma - ex).abs().mean()):.3f}, "
              f"mean-field {float((mm - ex).abs().mean()):.3f}; "
              f"vs girth-EAP (exact given girth's items): corr {c(ma, eg):.4f}, "
              f"mean |diff| {float((ma - eg).abs().mean()):.3f}")

        print(f"model | log-likelihood per student (IWAE, K={args.iwae_samples}; items drawn "
              "from q) | seconds")
        for (kind, guide), (model, q, _, sec) in fits.items():
            torch.manual_seed(0)
            ll = log_likelihood(model, q, data.tensors(), num_samples=args.iwae_samples,
                                progress=False, device="cpu")
            print(f"{kind} {guide} | {ll:.4f} | {sec:.1f}")


if __name__ == "__main__":
    main()
