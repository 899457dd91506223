"""``ppl-vae check RUN``, the generic part: posterior export, summaries, pictures, k-hat.

A family CLI module's ``check(run, args)`` rebuilds its trained model and guide, loads its
data and calls :func:`check_posterior` with the family's dims, coords and predictive
statistics. Files written into the run folder:

    posterior.nc      ArviZ InferenceData (posterior, posterior_predictive, observed_data,
                      log_likelihood) -- ``ppl_vae.posterior.load_netcdf`` reads it back
    summary.csv       ``az.summary(kind="stats")``: mean, sd, 94% HDI of every latent
                      (independent guide draws: R-hat/ESS do not apply)
    khat.csv          PSIS k-hat per data point (local latents)
    forest.png        ``az.plot_forest`` of the global latents and the first data points'
                      local latents
    posterior.png     ``az.plot_posterior`` densities of the globals and the first data
                      point's locals (at most 40 panels)
    ppc.png, ppc.csv  posterior predictive checks (family statistics, else ``az.plot_ppc``)
    khat.png          k-hat per data point with the 0.5 / 0.7 thresholds

Returns ``{"pareto_k": float, "pareto_k_is": what it is, ...}``: with local latents
(amortized or per-example guides) ``pareto_k`` is the share of data points whose k-hat is
at least 0.7; without them, the k-hat of the global latents.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .batching import Data
from .diagnostics import importance_diagnostics, plot_khat, plot_ppc_table, ppc_table
from .plots import save_figure
from .posterior import save_netcdf, to_arviz
from .program import SetupError

# name -> (observed site, statistic(one data set) -> 1-D array, labels or None)
PPCSpec = Mapping[str, tuple[str, Callable[[np.ndarray], np.ndarray], Sequence[Any] | None]]
# idata -> {site: (observed (N, ...) with NaN where missing, replicated (chains, draws, N, ...),
#                  names of the observed axes)}
Predictive = Callable[[Any], Mapping[str, tuple[np.ndarray, np.ndarray, Sequence[str]]]]


def check_posterior(model: Callable, guide: Callable, data: Data, out: str | Path, *,
                    dims: Mapping[str, Sequence[str]] | None = None,
                    coords: Mapping[str, Sequence[Any]] | None = None,
                    num_samples: int = 500, khat_samples: int | None = None,
                    inner_samples: int = 50, ppc: PPCSpec | None = None,
                    predictive: Predictive | None = None,
                    var_names: Sequence[str] | None = None, plot_points: int = 5,
                    batch_size: int | None = None, plate: str | None = None,
                    device: str | torch.device | None = None, seed: int = 0) -> dict:
    """Write the posterior checks of a trained pair into the folder ``out`` (module docstring).

    Args:
        model, guide, data: as for :func:`ppl_vae.fit` (data: tensors, examples first).
        dims, coords: ArviZ names (see :func:`ppl_vae.posterior.to_arviz`).
        num_samples: guide draws in posterior.nc; ``khat_samples`` draws per data point for
            k-hat (default: the same); ``inner_samples``: local draws per global draw.
        ppc: named predictive statistics, e.g. ``{"proportion correct": ("responses",
            lambda y: np.nanmean(y, 0), item_ids)}``.
        predictive: replicated data for a likelihood Pyro cannot draw from (a
            ``pyro.factor``, e.g. abilities integrated out), from the posterior draws:
            added to the InferenceData as ``observed_data`` and ``posterior_predictive``
            before anything is written, so ``ppc`` can name its sites.
        var_names: latents to summarize and plot (default: all).
        plot_points: how many data points' local latents the forest/density plots show.
    """
    import arviz as az

    if out is None:
        raise SetupError("the posterior checks write posterior.nc, summary.csv and their "
                         "figures into a folder, and this run has none (trained with "
                         "out=None): train it with a folder, or call ppl_vae.checks."
                         "check_posterior(model, guide, data, out=FOLDER)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    idata = to_arviz(model, guide, data, num_samples, dims=dims, coords=coords,
                     batch_size=batch_size, plate=plate, device=device, seed=seed)
    if predictive is not None:
        _add_predictive(idata, predictive(idata), coords or {})
    save_netcdf(idata, out / "posterior.nc")
    names = list(var_names) if var_names else list(idata.posterior.data_vars)
    az.summary(idata, var_names=names, kind="stats").to_csv(out / "summary.csv")
    files = ["posterior.nc", "summary.csv"]

    k = importance_diagnostics(model, guide, data, khat_samples or num_samples,
                               inner_samples=inner_samples, batch_size=batch_size,
                               plate=plate, device=device, seed=seed)
    if k.local is not None:
        plot_khat(k.local, out / "khat.png")
        np.savetxt(out / "khat.csv", k.local, fmt="%.4f", header="k_hat", comments="")
        files += ["khat.png", "khat.csv"]

    data_dim = idata.posterior.attrs.get("data_dim")
    plot_coords = {}
    if data_dim is not None:
        plot_coords[data_dim] = idata.posterior[data_dim].values[:plot_points]
    _forest(idata, names, plot_coords, out / "forest.png")
    first = {k: v[:1] for k, v in plot_coords.items()}  # densities: one data point's locals
    _densities(idata, names, first, out / "posterior.png")
    files += ["forest.png", "posterior.png"]

    if ppc:
        tables = {title: ppc_table(idata, site, stat, labels)
                  for title, (site, stat, labels) in ppc.items()}
        plot_ppc_table(tables, out / "ppc.png")
        _write_ppc_csv(tables, out / "ppc.csv")
        files += ["ppc.png", "ppc.csv"]
    elif _default_ppc(idata, out / "ppc.png"):
        files.append("ppc.png")
    result = k.as_dict()
    result["draws"] = num_samples
    result["wrote"] = ", ".join(files)
    return result


def _write_ppc_csv(tables: Mapping[str, Any], path: Path) -> None:
    import pandas as pd

    frames = [t.reset_index().assign(check=title) for title, t in tables.items()]
    pd.concat(frames).to_csv(path, index=False)


def _save(axes: Any, path: Path) -> None:
    """An ArviZ plot (its axes) through the one figure saver."""
    save_figure(np.asarray(axes).flat[0].get_figure(), path)


def _forest(idata: Any, names: Sequence[str], coords: dict, path: Path) -> None:
    import arviz as az

    _save(az.plot_forest(idata, var_names=list(names), coords=_applicable(idata, coords),
                         combined=True), path)


def _densities(idata: Any, names: Sequence[str], coords: dict, path: Path) -> None:
    import arviz as az

    with az.rc_context({"plot.max_subplots": 40}):
        _save(az.plot_posterior(idata, var_names=list(names),
                                coords=_applicable(idata, coords)), path)


def _applicable(idata: Any, coords: dict) -> dict:
    return {k: v for k, v in coords.items() if k in idata.posterior.dims}


def _add_predictive(idata: Any, sites: Mapping[str, tuple[np.ndarray, np.ndarray,
                                                          Sequence[str]]],
                    coords: Mapping[str, Sequence[Any]]) -> None:
    """Put ``predictive``'s observed and replicated data into ``idata`` (ArviZ groups)."""
    import arviz as az

    dims = {site: list(axes) for site, (_, _, axes) in sites.items()}
    idata.extend(az.from_dict(
        posterior_predictive={site: rep for site, (_, rep, _) in sites.items()},
        observed_data={site: obs for site, (obs, _, _) in sites.items()},
        dims=dims, coords={d: list(v) for d, v in coords.items()
                           if any(d in axes for axes in dims.values())}))


def _default_ppc(idata: Any, path: Path) -> bool:
    """ArviZ's ``plot_ppc`` of every observed site with finite draws; False (no picture)
    when there is none (a likelihood written as ``pyro.factor`` has no draws)."""
    import arviz as az

    if "posterior_predictive" not in idata.groups():
        return False
    names = [name for name, values in idata.posterior_predictive.data_vars.items()
             if values.size and np.isfinite(values.values).any()
             and np.ptp(values.values[np.isfinite(values.values)]) > 0]
    if not names:
        return False
    _save(az.plot_ppc(idata, var_names=names,
                      num_pp_samples=min(50, idata.posterior.sizes["draw"]), random_seed=0),
          path)
    return True
