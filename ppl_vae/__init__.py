"""ppl-vae: deep latent-variable models as Pyro programs, trained with one SVI engine.

    from ppl_vae import fit, log_likelihood, elbo
    history = fit(model, guide, train_data, val_data=..., epochs=10)
    log_likelihood(model, guide, test_data, num_samples=1000)   # nats per example
"""

from .checkpoint import load_checkpoint
from .evaluation import elbo, log_likelihood
from .family import Family, family_of, register
from .program import SetupError
from .runs import Run, load_run, train
from .svi import fit, restore
from .training import FitConfig, FitFailed, History, Trainer, TrainingDiverged

__all__ = ["fit", "Trainer", "FitConfig", "History", "TrainingDiverged", "FitFailed",
           "SetupError", "restore",
           "log_likelihood", "elbo", "load_checkpoint", "to_arviz", "importance_diagnostics",
           "train", "load_run", "Run",
           "Family", "register", "family_of"]


def __getattr__(name: str):
    if name == "to_arviz":  # imported on first use: arviz is slow to import
        from .posterior import to_arviz

        return to_arviz
    if name == "importance_diagnostics":  # the same: it draws through ppl_vae.posterior
        from .diagnostics import importance_diagnostics

        return importance_diagnostics
    raise AttributeError(f"module 'ppl_vae' has no attribute {name!r}")
__version__ = "0.2.0"
