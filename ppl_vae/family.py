"""The contract of a model family, in code, and the registry of families by model name.

A family (``models/<family>.py``) owns everything the library knows about its models, as
``pyro.contrib.forecast.ForecastingModel`` does for forecasters while the trainer stays
apart; the engine and the CLI only call this contract:

    @register
    class VAEFamily(Family):
        name = "vae"                       # family name, stored in config.json
        models = {"vae": "one line of help"}
        Spec = VAESpec                     # dataclass: exactly what config.json stores
        fit_defaults = {"epochs": 10, "batch_size": 128, "lr": 1e-3}

        def build(self, spec) -> (model, guide)           # fresh, untrained
        def load_data(self, spec, split) -> Data          # validated tensors of a split
        def run_data(self, run, split) -> Data            # the run's own copy (default: load_data)
        def example(self, spec) -> Data                   # a few rows to create parameters
        def fit_settings(self, spec) -> dict              # fit defaults + what the family needs
        def with_overrides(self, spec, given) -> dict     # defaults + the caller's settings
        def check_fit_settings(self, spec, settings)      # refuse overrides it cannot train with
        def report(self, run) -> list[Path]               # tables and figures after training
        def evaluate(self, run, **options) -> dict        # test figures (nats per example)

Optional commands (``sample``, ``score``, ``transform``, ``check``) are methods of the same
names taking ``(run, **options)``. ``dims`` names the ArviZ axes of the model's sites.

Families register by their module being imported; :data:`BUILTIN` maps every built-in
model name to its module, imported on first use (the engine imports no concrete model).
"""

from __future__ import annotations

import dataclasses
import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from .batching import Data
from .program import SetupError

Run = Any  # a ppl_vae.runs.Run (not imported: runs imports this module)

# model name -> module that registers its family (imported on first use)
BUILTIN: dict[str, str] = {
    "vae": "ppl_vae.models.vae",
    "cvae": "ppl_vae.models.cvae",
    "ssvae": "ppl_vae.models.ssvae",
    **{name: "ppl_vae.models.irt"
       for name in ("irt-lecture", "irt-1pl", "irt-2pl", "irt-3pl", "irt-grm", "irt-gpcm",
                    "irt-pcm")},
    "prodlda": "ppl_vae.models.topics",
    "lda": "ppl_vae.models.topics",
    "program": "ppl_vae.models.user_program",  # the user's own model file
}

_REGISTRY: dict[str, type[Family]] = {}


class Family(ABC):
    """One model family (module docstring). Subclasses set the class attributes and
    implement the abstract methods; a family object holds no state."""

    name: ClassVar[str]
    models: ClassVar[dict[str, str]]  # model name -> one line of help
    Spec: ClassVar[type]  # a dataclass; ``spec.model`` is the model name
    fit_defaults: ClassVar[dict[str, Any]] = {}
    dims: ClassVar[dict[str, list[str]]] = {}
    data_plate: ClassVar[str] = "data"

    # ---- specs ---------------------------------------------------------------------------
    def make_spec(self, model: str, **options: Any) -> Any:
        """The spec of ``model`` with ``options`` (unknown names are refused)."""
        fields = {f.name for f in dataclasses.fields(self.Spec)}
        unknown = sorted(set(options) - fields)
        if unknown:
            raise SetupError(f"{model}: unknown settings {unknown}; known: {sorted(fields)}")
        return self.Spec(model=model, **options)

    def spec_from_json(self, stored: dict) -> Any:
        """The spec stored in a run's config.json (with an error naming a bad field)."""
        if not isinstance(stored, dict):
            raise SetupError(f"the model spec must be a JSON object, got {type(stored).__name__}")
        fields = {f.name for f in dataclasses.fields(self.Spec)}
        unknown = sorted(set(stored) - fields)
        if unknown:
            raise SetupError(f"unknown fields {unknown} in the {self.name} spec")
        try:
            return self.Spec(**stored)
        except TypeError as e:
            raise SetupError(f"{self.name} spec: {e}") from e

    # ---- the family's knowledge -----------------------------------------------------------
    @abstractmethod
    def build(self, spec: Any) -> tuple[Callable, Callable]:
        """A fresh (untrained) model and guide for ``spec``."""

    @abstractmethod
    def load_data(self, spec: Any, split: str) -> Data:
        """The validated data of ``split`` (``train``, ``val`` or ``test``) in the call form
        the model takes (tensor, tuple or dict; rows = examples)."""

    def run_data(self, run: Run, split: str) -> Data:
        """The data of ``split`` that ``run`` trains and is evaluated on: by default
        :meth:`load_data` of its spec; a family whose run folder keeps its own copy of the
        data (the exam runs' responses.pt) reads that, so ``--resume`` and ``run.data()``
        never re-read a file that may have changed."""
        return self.load_data(run.spec, split)

    @abstractmethod
    def example(self, spec: Any) -> Data:
        """A few rows in the model's call form: enough to create its parameters when a run
        is restored (no data files are read)."""

    def fit_settings(self, spec: Any) -> dict[str, Any]:
        """Training settings for ``spec``: :attr:`fit_defaults` plus whatever the family
        needs (an objective, an alpha rule). ``ppl-vae train`` and ``ppl_vae.train`` use
        these same values."""
        return dict(self.fit_defaults)

    def with_overrides(self, spec: Any, given: dict[str, Any]) -> dict[str, Any]:
        """The settings a run trains with: :meth:`fit_settings` updated with the caller's
        ``given`` ones. A family whose defaults depend on each other (a learning rate that
        follows the batch size) recomputes the dependent ones here."""
        return {**self.fit_settings(spec), **given}

    def check_fit_settings(self, spec: Any, settings: dict[str, Any]) -> None:
        """Refuse settings the family cannot train with (SetupError), after the caller's
        overrides (e.g. M2 needs objective='enum'). Every setting is fine by default."""
        return None

    def check_fit(self, run: Run) -> str | None:
        """Why the trained ``run`` is not a usable result (a collapsed encoder, parameters
        that ran away), or None when it is. Called after training, before :meth:`report`; a
        reason stops the run with :class:`ppl_vae.FitFailed`. Every fit passes by default."""
        return None

    def report(self, run: Run) -> list[Path]:
        """Write the family's tables and figures into the run folder after training."""
        return []

    def evaluate(self, run: Run, **options: Any) -> dict[str, Any]:
        """Test figures of a trained run (nats per example)."""
        raise SetupError(f"'evaluate' is not defined for {self.name} runs")


def register(cls: type[Family]) -> type[Family]:
    """Class decorator: make ``cls`` the family of each of its model names."""
    for model in cls.models:
        _REGISTRY[model] = cls
    return cls


def family_of(model: str) -> Family:
    """The family that trains ``model`` (imports a built-in family's module on first use)."""
    if model not in _REGISTRY and model in BUILTIN:
        importlib.import_module(BUILTIN[model])
    if model not in _REGISTRY:
        known = sorted(set(_REGISTRY) | set(BUILTIN))
        raise SetupError(f"unknown model {model!r}; known models: {', '.join(known)}")
    return _REGISTRY[model]()


def model_names() -> list[str]:
    """Every model name the CLI can train (built-in and registered)."""
    return sorted(set(_REGISTRY) | set(BUILTIN))
