"""Finite differences against the derivatives autograd takes through custom
``autograd.Function`` classes, each Function checked alone at the inputs the model gives it.

A custom Function's backward may be wrong, or right to first order but not itself
differentiable (a detached saved tensor, ``torch.no_grad()``, ``once_differentiable``, a kernel
outside torch); nothing in one call's graph tells. Where the model's graph has one
(:attr:`~hessrank.problem.CurvatureProblem.custom_functions`), each source checks what it uses,
once per call and Function: one forward records the arguments of each Function's first call,
and the Function alone is differentiated there, in float64 where it runs so, along a random
direction ``d`` of its floating inputs (:class:`_Local`):

- :data:`FIRST` (every source): ``<J^T w_k, d>`` by its backward against
  ``<w_k, (F(x + h d) - F(x - h d)) / 2h>`` for a few random output cotangents ``w_k``;
- :data:`SECOND` (``exact``, ``lanczos``, which differentiate the backward w.r.t. the inputs):
  the double backward ``d/dx <J^T w, d>`` against differences of ``J^T w``;
- :data:`COTANGENT` (``exact`` and ``lanczos`` too, whose Hessian differentiates the backward
  w.r.t. the gradient it receives, which depends on the parameters after the Function; and
  ``ggn_lanczos``, ``fisher_lanczos``, which take ``J v`` so): that ``J d`` against differences
  of ``F`` (a ``once_differentiable`` ReLU, whose second derivative is right, zero, fails it).

Alone, the Function's derivatives meet none of what a whole model's differences would also see
(a padding row torch gives no gradient on purpose, a ``detach()`` the model means, other kinks:
checked on the whole model, correct Functions had been refused; probe 154), and a small error
in a branch the model weighs little is not diluted below the tolerance. Entries of the inputs
that are exactly zero are not moved: a ReLU-like Function's derivative there is one-sided, which
no central difference reproduces (a bias-free convolution over a blank background, probe 154).
:func:`compared` takes each difference at four step sizes and tells a wrong derivative, which
all four miss by the same amount, from the differences' own errors, which change with the step.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten

from hessrank.guard import deferred_interrupts, raise_if_signalled
from hessrank.problem import CurvatureProblem, call_loss, run_model

#: The relative distance between a derivative and its finite differences beyond which it is
#: refused (where the differences at every step agree with each other, :func:`compared`).
DIFFERENCE_TOLERANCE = 1e-3
#: The step sizes, in multiples of ``ε^(1/3)`` (``ε`` the dtype's), tried in turn until one
#: agrees; each input moves by the step times its root mean square.
STEP_FACTORS = (1.0, 1 / 2, 1 / 16, 1 / 32)
#: Output cotangents of the first-order check.
COTANGENTS = 4

#: What each source differentiates through a Function (:func:`check_custom_functions`).
FIRST = "first derivative"
SECOND = "second derivative"
COTANGENT = "double backward in the cotangent"


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

    def outcome(self) -> str:
        """How the check went, where it did not refute the derivative."""
        return (f"{self.relative:.0e} apart" if self.agreed else
                "not checked: the differences at four steps disagreed, as across a kink")


def compared(derivative: Tensor, difference: Callable[[float], Tensor],
             step: float) -> Comparison:
    """``derivative`` (float64) against ``difference(h)``, its central difference at step
    ``h``, for ``h`` in ``step`` times :data:`STEP_FACTORS` until one agrees.

    A wrong derivative misses every difference by the same amount. The differences' own
    errors change with the step: truncation falls with ``h^2``, rounding grows with ``1/h``,
    and a kink crossed between the points (a ReLU's input crossing zero) adds its jump over
    ``2h``, at the steps that cross it.
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


@contextmanager
def recording(classes: Sequence[type]) -> Iterator[dict[type, tuple[tuple[Any, ...],
                                                                     dict[str, Any]]]]:
    """Inside the block, each Function class's ``forward`` records the arguments of its first
    call (tensors detached; not the ``ctx`` of a forward without ``setup_context``), however
    the model reaches it (``self.act = Function.apply`` binds ``apply`` before any wrapping of
    it could); the classes are as they were on exit, Ctrl-C held back."""
    calls: dict[type, tuple[tuple[Any, ...], dict[str, Any]]] = {}
    own = {cls: cls.__dict__.get("forward") for cls in classes}

    def wrapped(cls: type) -> staticmethod[Any, Any]:
        original = inspect.getattr_static(cls, "forward")
        forward = original.__func__ if isinstance(original, staticmethod) else original
        takes_context = (inspect.getattr_static(cls, "setup_context")
                         is inspect.getattr_static(torch.autograd.Function, "setup_context"))

        @functools.wraps(forward)  # (torch binds the arguments to its signature)
        def recorded(*args: Any, **kwargs: Any) -> Any:
            if cls not in calls:
                calls[cls] = (tuple(_detached(a) for a in args[int(takes_context):]),
                              {key: _detached(value) for key, value in kwargs.items()})
            return forward(*args, **kwargs)

        return staticmethod(recorded)

    try:
        with deferred_interrupts():
            for cls in classes:
                setattr(cls, "forward", wrapped(cls))  # noqa: B010 - a method replaced
        yield calls
    finally:
        with deferred_interrupts():
            for cls, saved in own.items():
                if saved is None:
                    if "forward" in cls.__dict__:
                        delattr(cls, "forward")
                else:
                    setattr(cls, "forward", saved)  # noqa: B010 - a method put back


def _detached(value: Any) -> Any:
    return value.detach() if isinstance(value, Tensor) else value


class _Local:
    """One Function on the recorded arguments of a call, its floating inputs moved along ``d``
    (random signs times each input's root mean square, zero where the input is exactly zero),
    in ``dtype`` (None: theirs)."""

    def __init__(self, cls: type[torch.autograd.Function], args: tuple[Any, ...],
                 kwargs: dict[str, Any], dtype: torch.dtype | None) -> None:
        self.cls, self.kwargs = cls, kwargs
        self.args = [a.to(dtype) if dtype is not None and _floating(a) else a for a in args]
        self.floating = [i for i, a in enumerate(self.args) if _floating(a)]
        generator = torch.Generator().manual_seed(0xD1FF)
        self.directions = []
        for i in self.floating:
            x = self.args[i]
            signs = torch.randint(0, 2, x.shape, generator=generator).to(x) * 2 - 1
            rms = float(x.double().square().mean().sqrt()) if x.numel() else 0.0
            self.directions.append(signs * (rms if rms > 0 else 1.0) * (x != 0))
        self.step = float(torch.finfo(self.args[self.floating[0]].dtype).eps) ** (1 / 3)
        #: the indices, among the floating outputs, of those autograd differentiates (not a
        #: mark_non_differentiable one)
        self.differentiable: list[int] | None = None

    def call(self, shift: float, graph: bool) -> tuple[list[Tensor], list[Tensor]]:
        """``(inputs, outputs)``: the Function at the inputs moved by ``shift`` times ``d``;
        with ``graph``, the inputs are leaves requiring grad (the Function gets copies: it may
        write them in place); the outputs, those autograd differentiates."""
        leaves = [(self.args[i] + shift * d).detach().requires_grad_(graph)
                  for i, d in zip(self.floating, self.directions)]
        args = list(self.args)
        for i, leaf in zip(self.floating, leaves):
            args[i] = leaf.clone()
        with torch.enable_grad() if graph else torch.no_grad():
            returned = self.cls.apply(*args, **self.kwargs)
        floating = [o for o in tree_flatten(returned)[0] if _floating(o)]
        if self.differentiable is None:  # (the first call has a graph: _trial)
            self.differentiable = [j for j, o in enumerate(floating) if o.requires_grad]
        return leaves, [floating[j] for j in self.differentiable]

    def cotangents(self, outputs: Sequence[Tensor], count: int) -> list[list[Tensor]]:
        generator = torch.Generator().manual_seed(0xC07A)
        return [[torch.randn(o.shape, generator=generator, dtype=torch.float64).to(o)
                 for o in outputs] for _ in range(count)]

    def backward(self, shift: float, cotangent: Sequence[Tensor]) -> Tensor:
        """``J^T w`` at the inputs moved by ``shift``, flat (float64)."""
        leaves, outputs = self.call(shift, graph=True)
        return _flat(leaves, _grad(_dot(cotangent, outputs), leaves))

    def outputs_difference(self, h: float) -> list[Tensor]:
        """``(F(x + h d) - F(x - h d)) / 2h`` per floating output."""
        plus, minus = self.call(h, graph=False)[1], self.call(-h, graph=False)[1]
        return [(p.double() - m.double()) / (2 * h) for p, m in zip(plus, minus)]

    def direction_dot(self, pieces: Sequence[Tensor | None], leaves: Sequence[Tensor]) -> Tensor:
        return sum(((piece * d).sum() for piece, d in zip(pieces, self.directions)
                    if piece is not None), torch.zeros((), device=leaves[0].device,
                                                       dtype=leaves[0].dtype))

    def check(self, need: str) -> Comparison:
        """The comparison of the derivative ``need`` with its differences."""
        if need == FIRST:
            leaves, outputs = self.call(0.0, graph=True)
            ws = self.cotangents(outputs, COTANGENTS)
            derivative = torch.stack([
                self.direction_dot(_grad(_dot(w, outputs), leaves, retain=True), leaves).double()
                for w in ws])
            return compared(derivative, lambda h: torch.stack([
                _dot([x.double() for x in w], self.outputs_difference(h)) for w in ws]),
                self.step)
        if need == SECOND:
            leaves, outputs = self.call(0.0, graph=True)
            (w,) = self.cotangents(outputs, 1)
            pieces = _grad(_dot(w, outputs), leaves, create=True)
            along = self.direction_dot(pieces, leaves)
            derivative = (_flat(leaves, _grad(along, leaves)) if along.requires_grad
                          else torch.zeros(sum(x.numel() for x in leaves), dtype=torch.float64,
                                           device=leaves[0].device))
            return compared(derivative, lambda h: (self.backward(h, w) - self.backward(-h, w))
                            / (2 * h), self.step)
        leaves, outputs = self.call(0.0, graph=True)  # COTANGENT
        (w,) = self.cotangents(outputs, 1)
        w = [x.requires_grad_(True) for x in w]
        along = self.direction_dot(_grad(_dot(w, outputs), leaves, create=True), leaves)
        derivative = (_flat(w, _grad(along, w)) if along.requires_grad
                      else torch.zeros(sum(x.numel() for x in w), dtype=torch.float64,
                                       device=w[0].device))
        return compared(derivative, lambda h: torch.cat(
            [x.reshape(-1) for x in self.outputs_difference(h)]), self.step)


def _floating(value: Any) -> bool:
    return isinstance(value, Tensor) and value.is_floating_point()


def _dot(first: Sequence[Tensor], second: Sequence[Tensor]) -> Tensor:
    return sum(((a * b).sum() for a, b in zip(first, second)),
               torch.zeros((), dtype=second[0].dtype, device=second[0].device))


def _grad(value: Tensor, leaves: Sequence[Tensor], retain: bool = False,
          create: bool = False) -> list[Tensor | None]:
    if not value.requires_grad:
        return [None] * len(leaves)
    return list(torch.autograd.grad(value, list(leaves), retain_graph=retain or create,
                                    create_graph=create, allow_unused=True))


def _flat(leaves: Sequence[Tensor], pieces: Sequence[Tensor | None]) -> Tensor:
    return torch.cat([(torch.zeros_like(leaf) if piece is None else piece).reshape(-1).double()
                      for leaf, piece in zip(leaves, pieces)])


#: The refusal of each derivative, after the Function's name and the distance.
_REFUSALS = {
    FIRST: ("its backward is not the derivative of its forward, so every curvature built on "
            "it is wrong, and so are the gradients training takes (a straight-through "
            "estimator's backward is a surrogate by design, and the loss's curvature is not "
            "that surrogate's). Check it with torch.autograd.gradcheck"),
    SECOND: ("its backward is right to first order but not differentiable as written (it uses "
             "a detached saved tensor, torch.no_grad(), once_differentiable or a kernel outside "
             "torch), which drops part of the Hessian exact and lanczos differentiate through "
             "it. Compute the backward with torch operations on what ctx.save_for_backward "
             "kept (check with torch.autograd.gradgradcheck), or use method='fisher' or 'ggn' "
             "(first derivatives of the model only)"),
    COTANGENT: ("its backward is not differentiable in the gradient it receives, as autograd "
                "sees it (it runs under torch.no_grad() or outside torch), and ggn_lanczos and "
                "fisher_lanczos take J v by differentiating it so; use method='fisher' or "
                "'ggn' (Gram matrices, first derivatives only)"),
}
#: What each check compares, for the refusal and the note.
_COMPARED = {FIRST: "vector-Jacobian products against finite differences of its outputs",
             SECOND: "double backward against finite differences of its backward",
             COTANGENT: "Jacobian-vector products by double backward against finite "
                        "differences of its outputs"}


def check_custom_functions(problem: CurvatureProblem, needs: Sequence[str]) -> None:
    """Check the derivatives ``needs`` (:data:`FIRST`, :data:`SECOND`, :data:`COTANGENT`) of
    every custom Function in the model's graph, each alone at the arguments of its first call
    in one forward pass (without a graph), once per call; a note says how each went.

    The Functions are those of the model's graph, and for ``exact`` and ``lanczos`` the
    loss's too (:meth:`~hessrank.problem.CurvatureProblem.add_custom_functions` from the
    loss's graph: a loss Function with half its derivative had halved exact's eigenvalues under
    a note that the model's Function agreed; probe 154).

    Each is tried in float64 first (finite differences are sharp there) and in the dtype it
    got where it does not run in float64. A Function that cannot be run again alone on its
    arguments is named in the note as not checked.

    Raises:
        ValueError: a derivative disagrees with its finite differences, naming the Function,
            the distance and the fix.
    """
    due = {cls: [need for need in needs if (cls, need) not in problem.differences_checked]
           for cls in problem.custom_functions}
    due = {cls: checks for cls, checks in due.items() if checks}
    if not due:
        return
    problem.differences_checked.update((cls, need)
                                       for cls, checks in due.items() for need in checks)
    with recording(list(due)) as calls, torch.no_grad():
        problem.before_pass()
        outputs = run_model(problem.model, problem.args, problem.kwargs, problem.mode)
        call_loss(problem.loss_fn, outputs, problem.targets)  # (a loss's own Functions)
    found: list[str] = []
    for cls, checks in due.items():
        name = cls.__qualname__
        if cls not in calls:
            continue  # (not called on this pass: a branch the batch does not take)
        try:
            local = _trial(cls, *calls[cls])
        except Exception as error:  # noqa: BLE001 - the Function does not run alone
            raise_if_signalled(error)
            found.append(f"{name} (not checked: it does not run again alone on its arguments, "
                         f"{type(error).__name__}: {' '.join(str(error).split())[:80]})")
            continue
        if local is None:
            continue  # no floating input: nothing to move
        if not any(bool(d.any()) for d in local.directions):
            found.append(f"{name} (not checked: its floating inputs are exactly zero)")
            continue
        outcomes = []
        for need in checks:
            comparison = local.check(need)
            if comparison.refuted:
                raise ValueError(
                    f"the custom autograd.Function {name} fails a check of its {need} at the "
                    f"inputs the model gives it ({_COMPARED[need]}: {comparison.relative:.1e} "
                    f"apart, the differences at four steps agreeing to {comparison.spread:.1e})"
                    f": {_REFUSALS[need]}")
            outcomes.append(f"{need} {comparison.outcome()}")
        found.append(f"{name} ({', '.join(outcomes)})")
    if found:
        problem.notes.append("custom autograd.Function(s) checked alone by finite differences "
                             "at their inputs in the model: " + "; ".join(found))


def _trial(cls: type[torch.autograd.Function], args: tuple[Any, ...],
           kwargs: dict[str, Any]) -> _Local | None:
    """The Function alone on its arguments, in float64 where it runs so (one call tried),
    else in theirs; None where it has no floating input."""
    if not any(_floating(a) for a in args):
        return None
    try:
        local = _Local(cls, args, kwargs, torch.float64)
        local.call(0.0, graph=True)
        return local
    except Exception as error:  # noqa: BLE001 - a Function of one dtype: in its own
        raise_if_signalled(error)
    local = _Local(cls, args, kwargs, None)
    local.call(0.0, graph=True)
    return local

