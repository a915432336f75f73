"""``lanczos``: Lanczos quadrature on Hessian-vector products (deflated, with honest intervals).

The solver (:func:`hessrank.spectrum.lanczos.lanczos_spectrum`) runs on any symmetric operator;
:class:`LanczosEstimator` is the shared (source, Lanczos) pair, and this module's ``Lanczos`` is
the one on the Hessian. ``ggn_lanczos`` and ``fisher_lanczos`` pair it with the factor operators.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

from hessrank.curvature.hessian import PRODUCTS_OF, HessianOperator, check_products
from hessrank.curvature.operator import ParameterOperator, interchangeable_slices
from hessrank.estimators.base import (
    Cost,
    Estimator,
    Settings,
    Spectrum,
    positive_int,
    register,
    seconds_of,
)
from hessrank.problem import (
    CurvatureProblem,
    listed_names,
    lower_precision_cause,
    probe_outputs,
    unused_parameters_note,
)
from hessrank.spectrum.lanczos import (
    krylov_rows,
    lanczos_spectrum,
    probe_vector,
    ritz_workspace_bytes,
    spot_check_steps,
    working_eps,
)
from hessrank.spectrum.operator import SymmetricOperator
from hessrank.streaming import StreamedProblem, operator_over

#: dtype of the stored Lanczos basis.
BASIS_DTYPE = torch.float32
#: Default products: a third of ``P`` (where the rank targets were met, ``benchmarks/``), at most
#: this many.
DEFAULT_MAX_STEPS = 640


class Verified(NamedTuple):
    """What :meth:`LanczosEstimator.verify` found before the run."""

    #: products spent
    products: int
    #: the products' rounding, where measured (:attr:`Spectrum.rounding`)
    rounding: float | None
    #: their noise along the products (:func:`check_products`), for ``lanczos_spectrum(noise=)``
    noise: float


@dataclass(frozen=True)
class LanczosOptions:
    """Options of the Lanczos estimators."""

    lanczos_steps: int | None = field(default=None, metadata={
        "help": "matrix-vector products (Lanczos steps); default min(640, ceil(P/3))"})

    def __post_init__(self) -> None:
        if self.lanczos_steps is not None:
            # a NumPy integer as an int (options are logged as JSON)
            object.__setattr__(self, "lanczos_steps",
                               positive_int("lanczos_steps", self.lanczos_steps))
            if self.lanczos_steps < 2:
                raise ValueError(
                    "lanczos_steps=1 gives a quadrature of one node, which shows nothing of its "
                    "own sampling error (its intervals would have no width): use at least 2")

    def steps(self, num_params: int) -> int:
        """The products to spend on ``num_params`` parameters: ``lanczos_steps``, by default
        ``ceil(P / 3)`` up to :data:`DEFAULT_MAX_STEPS`, at least 2 (one node's quadrature has
        intervals of no width, which the default gave a block of 2 or 3 parameters) and at most
        ``P`` (a full Krylov space: the quadrature is exact)."""
        wanted = (self.lanczos_steps if self.lanczos_steps is not None
                  else min(DEFAULT_MAX_STEPS, math.ceil(num_params / 3)))
        return min(num_params, max(2, wanted))


#: Largest block of basis rows :func:`basis_seconds` times (256 MiB in float32): larger than a
#: processor's caches, which a basis streamed from memory is not served from.
BASIS_TRIAL_BYTES = 256 * 2**20


#: Passes over a ``P``-long vector that a Lanczos step makes besides its product and its
#: reorthogonalisation (the conversions between the basis's, the products' and the recurrence's
#: dtypes, the recurrence, the norms, the normalisation), in float32 reads of the vector: 15-21
#: measured at P = 10^6 to 10^7 (``lanczos_run`` on a diagonal operator), 30 at 10^5 where
#: Python's own overhead counts. Left out, with the build and the symmetry check, 10 products
#: on ResNet-18 (P = 11 million) took 1.6-2.0 times their prediction (probe 108).
STEP_VECTOR_PASSES = 20


def basis_seconds(steps: int, rows: int, dim: int, device: torch.device) -> float:
    """Predicted seconds of the vector work of ``steps`` products in runs of at most ``rows``
    steps: the reorthogonalisation, where step ``j`` reads the ``j`` basis vectors once to
    measure the overlaps, and in about half the steps (measured: 107 of 227, 89 of 200) twice
    more to remove them and measure again, about ``rows`` vector reads a step, and
    :data:`STEP_VECTOR_PASSES` more of the step's own; each read timed on a block of the
    basis's size up to :data:`BASIS_TRIAL_BYTES` (a memory-bound pass, scaled by the vectors'
    length).
    It had been left out: a run predicted at 12.6 s took 48.7 s, 36 of them here. (The timed
    block's 8 rows had then stood for ``rows``, and its 32 MiB were read from a cache: a run of
    658 products on 640 rows of P = 159,010 was predicted at 0.75 s and took 10.4 s, 8.6 of
    them here; ``benchmarks/exact_time.py --lanczos``.)"""
    element = torch.empty((), dtype=BASIS_DTYPE).element_size()
    entries = min(rows * dim, BASIS_TRIAL_BYTES // element)
    trial_rows = max(1, min(rows, entries // dim))
    columns = min(dim, max(1, entries // trial_rows))
    # written, not zeros: untouched zero pages would all read the same physical page
    block = torch.ones(trial_rows, columns, dtype=BASIS_DTYPE, device=device)
    vector = block[0].clone()
    seconds_of(lambda: block @ vector, device)  # a first pass pays the kernel's set-up
    per_vector = seconds_of(lambda: block @ vector, device) / trial_rows * dim / columns
    return per_vector * steps * (rows + STEP_VECTOR_PASSES)


class LanczosEstimator(Estimator):
    """A curvature operator solved by Lanczos quadrature."""

    solver = "lanczos"
    Options = LanczosOptions
    streams = True
    budget_advice = "use fewer lanczos_steps, or method='fisher'/'ggn'"
    #: Products :meth:`verify` spends before the run (two more where they are below the
    #: normal range: :func:`check_products`).
    verify_products = 3

    @abstractmethod
    def operator(self, problem: CurvatureProblem, settings: Settings) -> SymmetricOperator:
        """The matrix-free operator of this estimator's curvature source on one batch."""

    def verify(self, problem: CurvatureProblem, operator: SymmetricOperator,
               settings: Settings) -> Verified:
        """Check what the source's operator cannot guarantee by construction, before the run.

        The factor operators' products ``J^T s s^T J v`` are symmetric by form where ``J v``
        (a double backward) is the transpose of ``J^T u``, which a wrong double backward
        breaks: three products verify it, and the products linear to the run's rounding
        (:func:`check_products`). A model rounding through
        half precision breaks it too (``fisher_lanczos`` had listed every eigenvalue twice,
        its trace 2x and its intervals missing it, where ``fisher`` refused; probe 166), by
        an asymmetry (3e-4 of the products) that the check's one draw let through in 2 of 20
        seeds: a forward watched operation by operation refuses it, naming the first.

        Raises:
            ValueError: the products are not symmetric or not linear beyond rounding, or the
                model computes in half precision."""
        _, spent, noise = self._checked(problem, operator, settings)
        cause = lower_precision_cause(_one_batch(problem), 0.0, half_only=True)
        if cause:
            raise ValueError(f"{self.name}'s products transpose the model's Jacobian-vector "
                             f"products, which rounding to half precision does not keep: {cause}")
        return Verified(spent, None, noise)

    def _checked(self, problem: CurvatureProblem, operator: SymmetricOperator,
                 settings: Settings) -> tuple[float, int, float]:
        """:func:`check_products` of ``operator``'s products (a data set's diagnosed on its
        first batch): the estimate of their antisymmetric part's norm, the products spent and
        their noise."""
        return check_products(operator, torch.Generator().manual_seed(settings.seed ^ 0x5E77),
                              _one_batch(problem), self.source,
                              working_eps(operator, BASIS_DTYPE))

    def source_notes(self, problem: CurvatureProblem, operator: SymmetricOperator) -> list[str]:
        """What the source's operator found worth reporting: here the parameters the loss does
        not depend on (on a data set: on any batch)."""
        note = unused_parameters_note(problem, getattr(operator, "unused", frozenset()),
                                      data_set=isinstance(problem, StreamedProblem))
        return [] if note is None else [note]

    def rank_bound(self, problem: CurvatureProblem, outputs: Callable[[], Tensor]) -> int:
        """The largest rank the operator can have, known before the work (``outputs``: the
        first batch's): ``P`` here. It caps the solver's basis
        (:func:`~hessrank.spectrum.lanczos.krylov_rows`)."""
        return problem.num_params

    def data_operator(self, problem: CurvatureProblem, settings: Settings) -> SymmetricOperator:
        """The operator on the problem's batch, or summed over a data set's batches."""
        return operator_over(problem, lambda batch: self.operator(batch, settings))

    def _budgeted_operator(self, problem: CurvatureProblem,
                           settings: Settings) -> SymmetricOperator:
        """:meth:`data_operator`, its first batch's operator checked against the budget once
        built, with what its graph and a product's backward passes through it hold
        (:meth:`check_refined`). A data set's operator builds its batches' one at a time, at
        each product, and the first stands for the others (their graphs had been left out:
        ``lanczos`` over a DataLoader ran at 8 times a budget that refused the same batch given
        as tensors; probe 106)."""
        first = True

        def built(batch: CurvatureProblem) -> SymmetricOperator:
            nonlocal first
            operator = self.operator(batch, settings)
            if first:
                first = False
                self.check_refined(
                    _held_by_products(operator), problem, settings,
                    advice=(f"use smaller batches (each holds its graph), {self.budget_advice}"
                            if isinstance(problem, StreamedProblem) else None))
            return operator

        return operator_over(problem, built)

    def predict(self, problem: CurvatureProblem, outputs: Callable[[], Tensor], settings: Settings,
                options: LanczosOptions) -> Cost:
        steps = options.steps(problem.num_params)
        rows = min(steps, krylov_rows(self.rank_bound(problem, outputs)))  # the basis
        # The float32 basis, a few work vectors in float64, and the Ritz vectors' workspace.
        memory = (4 * (rows + 1) * problem.num_params + 8 * 6 * problem.num_params
                  + ritz_workspace_bytes(rows + 1, problem.num_params, 4))
        seconds = None
        if settings.max_seconds is not None and memory <= settings.max_memory:
            # The run builds its operator again (a data set's builds its batches' at each
            # product): timed here, with its products. The time this prediction spends, the
            # first product's one-off set-up with it, counts as the call's time so far
            # (:func:`~hessrank.api.effective_rank`): left out, with the build and the
            # symmetry check, a run of 10 products on ResNet-18 took 1.6-2.0 times its
            # prediction (probe 108).
            built: list[SymmetricOperator] = []
            build = seconds_of(lambda: built.append(self.data_operator(problem, settings)),
                               problem.device)
            operator = built[0]
            # refused untimed where the graph a product holds is over the budget: the timed
            # products held it (224 MiB for a budget of 200; probe 188)
            refined = _held_by_products(operator)
            if memory + refined > settings.max_memory:
                return Cost(memory + refined, None, refined)
            probe = torch.ones(1, operator.dim, dtype=operator.dtype, device=operator.device)
            seconds_of(lambda: operator.matmat(probe), operator.device)  # one-off set-up
            product = seconds_of(lambda: operator.matmat(probe), operator.device)
            # the random vectors: a run's start, and the products' check's two
            draw = seconds_of(lambda: probe_vector(operator.dim, torch.Generator(),
                                                   operator.device), operator.device)
            seconds = (build + product * (steps + spot_check_steps(rows))
                       + product * self.verify_products + draw * 3
                       + basis_seconds(steps, rows, operator.dim, operator.device))
        return Cost(memory, seconds)

    def run(self, problem: CurvatureProblem, settings: Settings,
            options: LanczosOptions) -> Spectrum:
        operator = self._budgeted_operator(problem, settings)
        checks, rounding, noise = self.verify(problem, operator, settings)
        steps = options.steps(operator.dim)
        # the prediction's bound, which a data set's operator knows only after a pass
        known = (self.rank_bound(problem, lambda: probe_outputs(problem.first(),
                                                                check_loss=False))
                 if isinstance(problem, StreamedProblem) else None)
        # The basis is float32: products are no more precise than that.
        eps = working_eps(operator, BASIS_DTYPE)
        products = steps + spot_check_steps(steps)  # the most the solver can spend
        # (labelled with the bar's own total, the spot check's products too: a bar labelled
        # 300 had counted to 316; probe 132)
        label = f"{self.name} ({steps} products" + (
            f" + {products - steps} to check them)" if products > steps else ")")
        # parameters a symmetry may interchange: a +-1 start is orthogonal to eigenvectors
        # spread equally over them half the time (probe 213)
        interchangeable = interchangeable_slices(problem.params)
        with settings.reporter.task(label, products) as advance:
            # rtol None: the solver applies the rule the result's ranks apply, at the operator's
            # rank bound as the run found it (a data set's is known after a pass)
            result = lanczos_spectrum(operator, max_products=steps, threshold=settings.threshold,
                                      seed=settings.seed, advance=advance,
                                      basis_dtype=BASIS_DTYPE, rtol=settings.rtol,
                                      rank_bound=known, noise=noise,
                                      gaussian_start=bool(interchangeable))
        bound = (operator.rank_bound if isinstance(operator, ParameterOperator)
                 else operator.dim)
        # a budget far below the README's advice, its estimates no more than coarse (a tracker
        # had logged srank 45,117 of P = 55,050 from 60 steps without a word; probe 141)
        # (it had said to read the intervals, which at 48 products for a trained MLP's P =
        # 1,893 missed its srank in 11 of 20 seeds; probe 159)
        coarse = ([f"lanczos_steps={steps} is below a tenth of the rank bound ({bound:,}): the "
                   "quadrature resolves the spectrum coarsely, its estimates and its srank "
                   "interval too, which can be too narrow this far below P / 3 products; where "
                   "the rank matters, spend at least a tenth (README, 'Lanczos')"]
                  if 10 * steps < bound and result.num_products >= steps else [])
        return Spectrum(result.eigenvalues, self.backend, max_rank=bound,
                        weights=result.weights, ritz_values=result.ritz_values,
                        rank_interval=result.rank_interval,
                        trace_interval=result.trace_interval,
                        numerical_interval=result.numerical_interval,
                        num_hvps=result.num_products + checks, rounding=rounding,
                        eps=eps, noise=noise, notes=[*self.source_notes(problem, operator), *coarse,
                                        *([f"parameters hold equal values a symmetry may "
                                           f"interchange ({listed_names(interchangeable, 2)}, by "
                                           "index among the analysed): the run started from a "
                                           "Gaussian vector, since a +-1 start is orthogonal to "
                                           "eigenvectors spread equally over them half the time"]
                                          if interchangeable else []),
                                        *result.notes,
                                        *([f"{checks} products before the run checked the "
                                           f"{PRODUCTS_OF[self.source][0]} symmetric and linear "
                                           f"({result.num_products + checks} in all)"]
                                          if checks else [])])

    backend = "autograd"


def _held_by_products(operator: SymmetricOperator) -> int:
    """What an operator's graph and a product's backward passes through it hold (bytes; 0 for
    an operator without a graph)."""
    return operator.held_by_products() if isinstance(operator, ParameterOperator) else 0


def _one_batch(problem: CurvatureProblem) -> CurvatureProblem:
    """The problem a check's diagnosis runs on: a data set's first batch, else the problem."""
    return problem.first() if isinstance(problem, StreamedProblem) else problem


@register
class Lanczos(LanczosEstimator):
    name = "lanczos"
    source = "hessian"
    listed = True
    listing_order = 1
    summary = "Lanczos quadrature on Hessian-vector products"
    modes = ("eval", "train")

    def operator(self, problem: CurvatureProblem, settings: Settings) -> SymmetricOperator:
        return HessianOperator(problem)

    def verify(self, problem: CurvatureProblem, operator: SymmetricOperator,
               settings: Settings) -> Verified:
        """Three products verify the Hessian-vector products symmetric and linear
        (:func:`check_products`): a wrong second derivative in the model would otherwise pass
        through the run unseen. Their estimate of the antisymmetric part's norm, one draw, is
        below a sixteenth of it about one time in twenty: sixteen times it bounds the
        products' rounding."""
        antisymmetric, spent, noise = self._checked(problem, operator, settings)
        return Verified(spent, 16 * antisymmetric, noise)
