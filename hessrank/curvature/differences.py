"""Finite differences against the derivatives autograd takes through custom
``autograd.Function`` classes, whose backward hessrank uses as written.

A custom Function's backward may be wrong, or right to first order but not itself
differentiable (a detached saved tensor, ``torch.no_grad()``, a kernel outside torch); nothing
in one call's graph tells. Where the model's graph has one
(:attr:`~hessrank.problem.CurvatureProblem.custom_functions`), each source checks what it
uses, once per call, along a random sign direction ``d`` of the analysed parameters:

- every source, the vector-Jacobian products (first order): ``<u_k, J d>`` from the backward
  against ``<u_k, (f(θ + h d) - f(θ - h d)) / 2h>`` for a few random output cotangents ``u_k``
  (:func:`check_vector_jacobian_products`);
- ``exact``/``lanczos``, a Hessian-vector product against differences of the gradient
  (``hessian.check_by_differences``);
- ``ggn_lanczos``/``fisher_lanczos``, their Jacobian-vector product by double backward against
  the outputs' differences (``factors.FactorOperator``).

:func:`compared` takes each difference at four step sizes and tells a wrong derivative, which
all four miss by the same amount, from the differences' own errors, which change with the step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from hessrank.distributed import parallel_of
from hessrank.guard import deferred_interrupts
from hessrank.problem import CurvatureProblem, GraphBytes, run_model
from hessrank.spectrum.lanczos import probe_vector

#: The relative distance between a derivative and its finite differences beyond which it is
#: refused (where the differences at every step agree with each other, :func:`compared`).
DIFFERENCE_TOLERANCE = 1e-3
#: The step sizes, in multiples of :func:`base_step`, tried in turn until one agrees.
STEP_FACTORS = (1.0, 1 / 2, 1 / 16, 1 / 32)
#: Output cotangents of the first-order check.
COTANGENTS = 2


@dataclass(frozen=True)
class Comparison:
    """A derivative against its finite differences.

    Attributes:
        relative: the closest difference's distance from the derivative, over the larger
            norm of the two.
        spread: the largest distance between two of the differences on that scale; 0 where
            the first to agree ended the trials.
    """

    relative: float
    spread: float

    @property
    def agreed(self) -> bool:
        """Some step's difference agrees within :data:`DIFFERENCE_TOLERANCE`."""
        return self.relative <= DIFFERENCE_TOLERANCE

    @property
    def refuted(self) -> bool:
        """No step's difference agrees, and all agree with each other to a quarter of their
        distance from the derivative: the derivative is wrong, not the differences."""
        return not self.agreed and 4 * self.spread <= self.relative

    def verdict(self, what: str, functions: Sequence[str]) -> str:
        """The note for a derivative ``what`` (through ``functions``) that was not refuted."""
        outcome = (f"agreed with finite differences ({self.relative:.1e} apart)"
                   if self.agreed else
                   "could not be checked by finite differences (at four step sizes they "
                   "disagreed with each other, as across kinks or in rounding)")
        return (f"{what} through the custom autograd.Function(s) ({', '.join(functions)}) "
                f"{outcome}")


def compared(derivative: Tensor, difference: Callable[[float], Tensor],
             step: float) -> Comparison:
    """``derivative`` (float64) against ``difference(h)``, its central difference at step
    ``h``, for ``h`` in ``step`` times :data:`STEP_FACTORS` until one agrees.

    A wrong derivative misses every difference by the same amount. The differences' own
    errors change with the step: truncation falls with ``h^2``, rounding grows with ``1/h``,
    and a kink crossed between the points (a ReLU's input crossing zero; in a float32
    network at the first step, often) adds its jump over ``2h``, at the steps that cross it.
    """
    estimates: list[Tensor] = []
    scale = 0.0
    for factor in STEP_FACTORS:
        estimates.append(difference(step * factor))
        scale = max(float(derivative.norm()), float(estimates[-1].norm()))
        relative = float((estimates[-1] - derivative).norm()) / scale if scale > 0 else 0.0
        if relative <= DIFFERENCE_TOLERANCE:
            return Comparison(relative, 0.0)
    distance = min(float((estimate - derivative).norm()) for estimate in estimates)
    spread = max(float((first - second).norm())
                 for i, first in enumerate(estimates) for second in estimates[:i])
    return Comparison(distance / scale, spread / scale)


def first_time(problem: CurvatureProblem, check: str) -> bool:
    """Whether ``check`` is due on ``problem``: the model's graph has custom Functions and the
    check has not run in this call (marked as run on return)."""
    if not problem.custom_functions or check in problem.differences_checked:
        return False
    problem.differences_checked.add(check)
    return True


def sign_direction(dim: int, device: torch.device) -> Tensor:
    """``[dim]`` float64: the random signs (a fixed seed: the same on every process) along
    which the parameters are shifted."""
    generator = torch.Generator().manual_seed(0xD1FF)
    return probe_vector(dim, generator, torch.device("cpu")).to(device=device,
                                                                dtype=torch.float64)


def base_step(params: Sequence[Tensor]) -> float:
    """The first step: ``ε^(1/3)`` (``ε`` the dtype's) times the parameters' root mean
    square, where a central difference's truncation and rounding balance."""
    with torch.no_grad():
        squares = sum(float(p.detach().double().square().sum()) for p in params)
    count = sum(p.numel() for p in params)
    scale = math.sqrt(squares / count) if squares > 0 else 1.0
    return float(torch.finfo(params[0].dtype).eps) ** (1 / 3) * scale


@contextmanager
def shifted(params: Sequence[Tensor], shift: Tensor) -> Iterator[None]:
    """The parameters plus ``shift`` (``[P]``, in their order) inside the block.

    Shifted in place through ``.data``, so that no version counter moves (a graph the caller
    holds stays differentiable) and every use of the objects sees the shift (a weight tied
    across modules, a loss's penalty on them); their values are copied back on exit, Ctrl-C
    held back, bit for bit.
    """
    saved = [p.detach().clone() for p in params]
    try:
        for p, piece in zip(params, shift.split([p.numel() for p in params])):
            p.data.add_(piece.reshape(p.shape).to(p.dtype))
        yield
    finally:
        with deferred_interrupts():
            for p, value in zip(params, saved):
                p.data.copy_(value)


def output_difference(problem: CurvatureProblem, direction: Tensor) -> Callable[[float], Tensor]:
    """``h -> (f(θ + h d) - f(θ - h d)) / 2h`` in float64 for the model's outputs ``f`` on the
    problem's batch (passes without a graph)."""

    def outputs_at(shift: Tensor) -> Tensor:
        with shifted(problem.params, shift), torch.no_grad():
            problem.before_pass()
            outputs = run_model(problem.model, problem.args, problem.kwargs, problem.mode)
        assert isinstance(outputs, Tensor), "checked by the caller"
        return outputs.to(torch.float64)

    return lambda h: (outputs_at(h * direction) - outputs_at(-h * direction)) / (2 * h)


def check_vector_jacobian_products(problem: CurvatureProblem, outputs: object) -> None:
    """Check the model's vector-Jacobian products, which every estimator builds on, against
    differences of its outputs, once per call where its graph has custom Functions.

    ``<J^T u_k, d>`` by backward passes from ``outputs`` (the problem's forward, with its
    graph) for :data:`COTANGENTS` random cotangents ``u_k``, against ``<u_k, J d>`` from
    :func:`output_difference`. The outputs are continuous where their derivatives have kinks,
    so a ReLU network's differences agree too. A wrong backward is refused; a note says how
    the check went otherwise. Not run for a model without a single tensor output, nor on a
    sharded problem (each process would judge its own shard: one refusing alone would leave
    the others waiting).

    Raises:
        ValueError: the products disagree with the differences, naming the Functions.
    """
    if (not isinstance(outputs, Tensor) or outputs.grad_fn is None
            or not outputs.is_floating_point() or parallel_of(problem) is not None
            or not first_time(problem, "vector-Jacobian")):
        return
    direction = sign_direction(problem.num_params, problem.device)
    generator = torch.Generator().manual_seed(0xC07A)
    cotangents = torch.randn((COTANGENTS, *outputs.shape), generator=generator,
                             dtype=torch.float64).to(outputs.device)
    products = []  # <J^T u_k, d>, one backward pass each (a custom Function need not vmap)
    for cotangent in cotangents:
        with GraphBytes.uncounted():
            pieces = torch.autograd.grad(outputs, problem.params,
                                         grad_outputs=cotangent.to(outputs.dtype),
                                         retain_graph=True, allow_unused=True)
        products.append(sum((float(piece.double().reshape(-1) @ chunk)
                             for piece, chunk in zip(pieces, direction.split(
                                 [p.numel() for p in problem.params])) if piece is not None),
                            0.0))
    differences = output_difference(problem, direction)
    comparison = compared(
        torch.tensor(products, dtype=torch.float64, device=problem.device),
        lambda h: torch.einsum("k...,...->k", cotangents, differences(h)),
        base_step(problem.params))
    if comparison.refuted:
        raise ValueError(
            f"the model's backward through the custom autograd.Function(s) "
            f"({', '.join(problem.custom_functions)}) disagrees with finite differences of its "
            f"outputs by {comparison.relative:.1e} (vector-Jacobian products against "
            "Jacobian-vector products; the differences at four step sizes agree to "
            f"{comparison.spread:.1e}): the backward is not the derivative of the forward, "
            "so every curvature built on it is wrong, and so are the gradients training "
            "takes. Check it with torch.autograd.gradcheck")
    problem.notes.append(comparison.verdict("the model's vector-Jacobian products",
                                            problem.custom_functions))
