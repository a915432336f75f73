"""What an estimator is: a named (curvature source, solver) pair with its traits and options.

An estimator class declares, in one place:

- ``name``, ``source`` (``"hessian"``, ``"ggn"``, ``"fisher"``) and ``solver`` (``"dense"``,
  ``"lanczos"``, ``"gram"``), a one-line ``summary`` and its ``listing_order`` (its place in
  listings: ``hessrank.estimators.ALL_METHODS``, the CLI's); ``listed = True`` puts it among
  ``hessrank.METHODS`` (the four of the paper, which the CLI compares by default). Both lists
  are made when ``hessrank.estimators`` is imported, which imports every estimator's module;
- ``modes``: the ``mode=`` values it supports (``"eval"``, ``"train"``);
- ``streams``: whether it passes over a data set (a ``DataLoader``) batch by batch;
- ``layer_strategy``: how ``per_layer=True`` is answered (``"gram-blocks"``: the diagonal blocks of
  the Gram it already built; ``"restricted"``: the estimator rerun on each module's parameters);
- ``Options``: a dataclass of its typed options (each field's ``metadata["help"]`` documents it;
  the command line builds its flags from them);
- :meth:`Estimator.predict`: its memory (and, when asked, time) before any work;
- :meth:`Estimator.run`: the work, returning a :class:`Spectrum`.

:func:`register` adds a class to :data:`ESTIMATORS`; a new estimator is one module in this package,
imported in its ``__init__``.
"""

from __future__ import annotations

import dataclasses
import numbers
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from hessrank.distributed import parallel_of
from hessrank.monitor import Reporter
from hessrank.problem import CurvatureProblem
from hessrank.spectrum.dense import symmetric_eigenpairs, symmetric_eigenvalues

#: Registered estimators by method name, in registration order.
ESTIMATORS: dict[str, Estimator] = {}


#: The memory budget of a call where none is given (bytes).
DEFAULT_MAX_MEMORY = 4 * 2**30


class BudgetError(ValueError):
    """A method would exceed the memory or time budget; nothing was computed.

    Attributes:
        memory_bytes: predicted peak memory of the method.
        seconds: predicted time, None where it was not predicted.
        at_least: the prediction was made before the work, which measures its first pass over
            the model and adds that: the figures are a least (the message says "or more").
    """

    def __init__(self, message: str, memory_bytes: int, seconds: float | None,
                 at_least: bool = False) -> None:
        super().__init__(message)
        self.memory_bytes = memory_bytes
        self.seconds = seconds
        self.at_least = at_least



def seconds_of(call: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of ``call()`` on ``device`` (a CUDA device synchronised before and after,
    so that its queued kernels count): the timings behind the time predictions."""
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    synchronize()
    start = time.perf_counter()
    call()
    synchronize()
    return time.perf_counter() - start


#: Size of the eigen-solve timed to predict ``exact``'s and the Gram methods'
#: (:func:`eigen_solve_seconds`).
EIGEN_TRIAL_SIZE = 512
#: Up to this size a float64 eigen-solve's time grows as ``size^2.5`` beyond the trial's (LAPACK
#: ``dsyevd`` on one thread, measured 2026-12-01 at 512, 1024, 2048, 4096: 0.029, 0.19, 0.84,
#: 5.3 s; ``size^3`` from 512 had predicted 15 s at 4096), as ``size^3`` above it. With
#: eigenvectors it grows as ``size^3`` throughout (their back-transformation: ``size^2.5`` had
#: predicted 1.8 and 2.4 times too little at 2048 and 3290; probe 90).
EIGEN_SUBCUBIC_SIZE = 4096


def eigen_solve_seconds(dim: int, device: torch.device, vectors: bool = False) -> float:
    """Predicted seconds of the float64 eigen-solve of a ``dim x dim`` matrix on ``device``
    (with ``vectors``, eigenvectors too: 4-6 times the eigenvalues' time at P = 4810, which a
    prediction of eigenvalues alone had left out; probe 78): one of :data:`EIGEN_TRIAL_SIZE`
    (at most ``dim``) timed here, on the solver's threads, scaled as ``size^2.5`` up to
    :data:`EIGEN_SUBCUBIC_SIZE` and ``size^3`` beyond (a constant per ``dim^3`` measured on one
    machine had been 1.7x short on another; with ``vectors``, ``size^3`` throughout)."""
    size = min(dim, EIGEN_TRIAL_SIZE)
    generator = torch.Generator().manual_seed(0)
    trial = torch.randn(size, size, generator=generator, dtype=torch.float64)
    trial = (trial + trial.T).to(device)
    solve = symmetric_eigenpairs if vectors else symmetric_eigenvalues
    seconds = seconds_of(lambda: solve(trial), device)
    knee = max(size, min(dim, EIGEN_SUBCUBIC_SIZE))
    return seconds * (knee / size) ** (3.0 if vectors else 2.5) * (dim / knee) ** 3


@dataclass(frozen=True)
class Settings:
    """What every estimator receives besides the problem and its own options."""

    threshold: float = 0.99
    rtol: float | None = None
    max_memory: float = DEFAULT_MAX_MEMORY
    max_seconds: float | None = None
    seed: int = 0
    per_layer: bool = False
    eigenvectors: int = 0
    reporter: Reporter = field(default_factory=Reporter)
    #: the estimator's memory prediction before the work (bytes), without what a method
    #: refines once its first forward pass shows what the model holds (``Cost.refined_bytes``)
    predicted_memory: int = 0


@dataclass(frozen=True)
class NoOptions:
    """An estimator without options of its own."""


@dataclass
class Spectrum:
    """What an estimator measured.

    Attributes:
        eigenvalues: by decreasing magnitude; with ``weights``, the nodes of a quadrature of the
            spectral density, each standing for ``weight`` eigenvalues.
        backend: the machinery that computed it.
        max_rank: structural upper bound on the rank.
        weights: quadrature weights (Lanczos), None for a plain spectrum.
        ritz_values: values to show as "the eigenvalues" when ``weights`` is set.
        rank_interval, trace_interval, numerical_interval: 95 % intervals for the srank, the
            trace and the numerical rank (Lanczos).
        num_hvps: Hessian-vector products spent.
        paths: parameter name -> the path that computed its part (Gram estimators).
        eps: machine epsilon of the arithmetic behind the spectrum, for the default numerical-rank
            tolerance (None: the model dtype's).
        eigenvectors: ``[k, P]`` float64 unit eigenvectors of the ``k`` largest ``|eigenvalues|``
            (in the flattened order of the analysed parameters), when asked for.
        notes: caveats worth reading.
        layers: per parameterised module, that module's diagonal block.
        rounding: how far rounding may have moved its eigenvalues, where the products measured
            it (the norm of the antisymmetric part a Hessian's products left, with a margin);
            None where it was not measured.
        noise: the products' noise relative to their size, where a check measured it (Lanczos,
            :func:`~hessrank.curvature.hessian.check_products`): no estimate tells eigenvalues
            below that fraction of the largest from it; 0 where it was not measured.
    """

    eigenvalues: np.ndarray
    backend: str
    max_rank: int
    weights: np.ndarray | None = None
    ritz_values: np.ndarray | None = None
    rank_interval: tuple[float, float] | None = None
    trace_interval: tuple[float, float] | None = None
    numerical_interval: tuple[float, float] | None = None
    num_hvps: int | None = None
    paths: dict[str, str] = field(default_factory=dict)
    eps: float | None = None
    eigenvectors: Tensor | None = None
    notes: list[str] = field(default_factory=list)
    layers: dict[str, Spectrum] = field(default_factory=dict)
    rounding: float | None = None
    noise: float = 0.0

    @property
    def trace(self) -> float:
        weights = 1.0 if self.weights is None else self.weights
        return float(np.sum(self.eigenvalues * weights))


@dataclass(frozen=True)
class Cost:
    """Predicted peak memory (bytes) and time (seconds, None when not predicted).

    ``refined_bytes``: the part of ``memory_bytes`` the prediction measured on a first pass over
    the model (``exact`` timing its products builds the operator), which the work measures
    again once it makes that pass (:meth:`Estimator.check_refined`): counted once.
    """

    memory_bytes: int
    seconds: float | None = None
    refined_bytes: int = 0
    #: The work ``seconds`` leaves out, where it predicts a part (the Gram methods' time is
    #: their eigen-solves', not their passes over the model's); None where it is the whole.
    unpredicted: str | None = None


class Estimator(ABC):
    """A named (curvature source, solver) pair; see the module docstring."""

    name: ClassVar[str]
    source: ClassVar[str]
    solver: ClassVar[str]
    summary: ClassVar[str]
    #: Position in listings (``hessrank.METHODS``): ground truth first, then cheaper ones.
    listing_order: ClassVar[int]
    #: Whether the method is in ``hessrank.METHODS`` (the four of the paper, the set the CLI
    #: compares by default); a new estimator is not, unless it says so.
    listed: ClassVar[bool] = False
    modes: ClassVar[tuple[str, ...]] = ("eval",)
    layer_strategy: ClassVar[str] = "restricted"
    Options: ClassVar[type] = NoOptions
    #: Whether the estimator can return eigenvectors (``effective_rank(..., eigenvectors=k)``).
    provides_eigenvectors: ClassVar[bool] = False
    #: What to try instead when the budget is exceeded.
    budget_advice: ClassVar[str] = ""
    #: Whether :meth:`run` passes over a data set batch by batch (a
    #: :class:`~hessrank.streaming.StreamedProblem`); otherwise it is given the batches
    #: concatenated into one.
    streams: ClassVar[bool] = False

    def make_options(self, given: dict[str, Any]) -> Any:
        """This estimator's options from keyword arguments; names it does not declare are
        ignored (they belong to other estimators), declared ones are validated by the Options
        class (``__post_init__``)."""
        names = {f.name for f in dataclasses.fields(self.Options)}
        return self.Options(**{key: value for key, value in given.items() if key in names})

    def check_request(self, settings: Settings, options: Any) -> None:
        """Raise, before any work, for a request this estimator cannot serve."""
        if settings.eigenvectors and not self.provides_eigenvectors:
            capable = ", ".join(name for name, e in ESTIMATORS.items()
                                if e.provides_eigenvectors)
            raise ValueError(f"method={self.name!r} does not return eigenvectors: use one of "
                             f"{capable}")

    def check_mode(self, mode: str, model: nn.Module | None) -> None:
        """Raise if ``mode`` is not among :attr:`modes`, or if a method without a training mode
        (per-sample factors) meets a BatchNorm that normalises with the batch's statistics in
        evaluation mode too (no running statistics): its samples interact. ``model`` None: the
        mode alone."""
        if mode not in self.modes:
            raise ValueError(
                f"mode={mode!r} is not defined for method={self.name!r} (it supports "
                f"{', '.join(map(repr, self.modes))}): per-sample factors assume samples that do "
                "not interact; use mode='eval' or method='exact'/'lanczos'"
            )
        if "train" in self.modes or model is None:
            return
        for name, module in model.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and (
                    module.running_mean is None and module.running_var is None):
                raise ValueError(
                    f"{name!r} ({type(module).__name__}, track_running_stats=False) normalises "
                    "with the batch's statistics even in evaluation mode, so the samples of a "
                    f"batch interact and method={self.name!r}'s per-sample factors are "
                    "undefined: use method='exact' or 'lanczos', or give the layer running "
                    "statistics")

    @abstractmethod
    def predict(self, problem: CurvatureProblem, outputs: Callable[[], Tensor], settings: Settings,
                options: Any) -> Cost:
        """Peak memory, and time when ``settings.max_seconds`` is set, before any work.

        Args:
            outputs: returns the model's outputs on the batch (no graph; one forward pass, run
                only if called).
        """

    @abstractmethod
    def run(self, problem: CurvatureProblem, settings: Settings, options: Any) -> Spectrum:
        """Compute the spectrum (``settings.per_layer``: with ``layers`` when the strategy is
        ``"gram-blocks"``)."""

    def check_refined(self, extra_bytes: int, problem: CurvatureProblem,
                      settings: Settings, advice: str | None = None) -> None:
        """Once the first pass over the model shows what it holds: the prediction made before
        the work plus ``extra_bytes`` against the budget (:class:`BudgetError` over it). The
        processes of a data-parallel problem call it at the same point of their work and judge
        the largest of their ``extra_bytes``, so all refuse or none does (a refusal in one would
        leave the others waiting). ``advice``: what to do instead, where the refined part is
        what a refusal is about (default :attr:`budget_advice`)."""
        needed = settings.predicted_memory + int(extra_bytes)
        parallel = parallel_of(problem)
        if parallel is not None:  # (the whole figure: the predictions count each process's
            # own batch copy, and one process had refused while the other went on; probe 188)
            needed = max(parallel.gather_objects(needed))
        self.check_budget(Cost(needed), problem, settings, advice=advice)

    def check_budget(self, cost: Cost, problem: CurvatureProblem, settings: Settings,
                     caller: str | None = None, advice: str | None = None,
                     first: bool = False) -> None:
        """Raise :class:`BudgetError` when the predicted cost exceeds the budget.

        Args:
            caller: who needs the cost, named in the message (default ``method=<name>``).
            advice: what to do instead (default :attr:`budget_advice`).
            first: the prediction made before the work, which the work refines once its first
                pass over the model shows what that pass holds (:meth:`check_refined`): its
                figure is a least, "or more" (a budget raised to it was refused again at twice
                it; probe 90).
        """
        who = caller or f"method={self.name!r}"
        instead = advice or self.budget_advice
        more = " or more" if first else ""
        later = (" (predicted before the work: what its first pass over the model holds is "
                 "measured then and added)" if first else "")
        if cost.memory_bytes > settings.max_memory:
            # (max_memory=4 meant as the CLI's 4 GiB was refused at "4 B"; probe 133)
            unit = (", in bytes (4 GiB is 4 * 2**30)" if settings.max_memory < 2**20 else "")
            raise BudgetError(
                f"{who} needs about {format_bytes(cost.memory_bytes)}{more} for "
                f"P = {problem.num_params:,} parameters and n = {problem.num_samples:,} "
                f"samples, over max_memory = {format_bytes(settings.max_memory)}: "
                f"{instead}, restrict params=, or raise max_memory{unit}{later}",
                cost.memory_bytes, cost.seconds, first,
            )
        if settings.max_seconds is not None and cost.seconds is not None and (
            cost.seconds > settings.max_seconds
        ):
            amount = f"about {cost.seconds:.3g} s" + (
                more if cost.unpredicted is None else f" beyond its {cost.unpredicted}")
            raise BudgetError(
                f"{who} would take {amount}, over max_seconds = "
                f"{settings.max_seconds:g} s: {instead}, or raise max_seconds{later}",
                cost.memory_bytes, cost.seconds, first,
            )


def format_bytes(count: float) -> str:
    """``1536 -> '1.5 KiB'``: bytes in the largest binary unit that keeps a number >= 1."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.3g} {unit}"
        value /= 1024
    return f"{value:.3g} TiB"


#: What an estimator class must declare (the traits without a default).
REQUIRED_TRAITS = ("name", "source", "solver", "summary", "listing_order")


def register(cls: type[Estimator]) -> type[Estimator]:
    """Class decorator: register an estimator under its ``name``.

    Raises:
        TypeError: the class leaves out a trait of :data:`REQUIRED_TRAITS` (without it the
            package's import had failed on a bare ``AttributeError``; probe 136), or its
            ``name`` is another class's.
    """
    missing = [trait for trait in REQUIRED_TRAITS if not hasattr(cls, trait)]
    if missing:
        raise TypeError(f"estimator {cls.__name__} does not declare {', '.join(missing)}: an "
                        f"estimator declares {', '.join(REQUIRED_TRAITS)} (see "
                        "hessrank.estimators.base)")
    taken = ESTIMATORS.get(cls.name)
    # (the same class defined again, a notebook cell run twice or a module reloaded, replaces
    # itself; probe 139)
    if taken is not None and (type(taken).__module__, type(taken).__qualname__) != (
            cls.__module__, cls.__qualname__):
        raise TypeError(f"estimator {cls.__name__}: the name {cls.name!r} is "
                        f"{type(taken).__name__}'s; give it another")
    ESTIMATORS[cls.name] = cls()
    return cls


def eigenvector_note(found: int, asked: int, why: str) -> str:
    """The note for ``eigenvectors=asked`` where only ``found`` exist, and ``why``."""
    return f"eigenvectors: {found} of the {asked} asked exist; {why}"


def positive_int(name: str, value: object) -> int:
    """``value`` as an ``int``; raise a ValueError naming the option unless it is an integer
    >= 1 (a Python or NumPy integer, not a bool: ``lanczos_steps=np.int64(5)`` had been refused
    as no positive integer; probe 159)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)
