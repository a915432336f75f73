"""Finite differences against the derivatives autograd takes through custom
``autograd.Function`` classes, each Function checked alone at the inputs the model gives it.

A custom Function's backward may be wrong, or right to first order but not itself
differentiable (a detached saved tensor, ``torch.no_grad()``, ``once_differentiable``, a kernel
outside torch); nothing in one call's graph tells. Where the model's graph has one
(:attr:`~hessrank.problem.CurvatureProblem.custom_functions`), each source checks what it uses,
once per call and Function: one forward records the arguments of each Function's first
:data:`CALLS_CHECKED` calls, and the Function alone is differentiated there, along a random
direction ``d`` of the inputs autograd differentiates in the model (the others, a loss's
targets or a mask, stay: a backward that returns None for them is right; probe 155)
(:class:`_Local`):

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
in a branch the model weighs little is not diluted below the tolerance. :func:`compared` takes
each difference at four step sizes and tells a wrong derivative, which all four miss by the
same amount and where the one-sided differences agree, from the differences' own errors, which
change with the step, and from a kink at the inputs themselves (a ReLU at exactly zero, a
hardtanh at exactly 1), where the one-sided differences disagree. There the check is tried
again with the inputs' exact zeros held, and otherwise says it could not tell.
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten

from hessrank.guard import also_at_call_exit, deferred_interrupts, raise_if_signalled
from hessrank.problem import CurvatureProblem, UnrepeatableLoss, call_loss, run_model

#: The relative distance between a derivative and its finite differences beyond which it is
#: refused (where the differences at every step agree with each other, :func:`compared`).
DIFFERENCE_TOLERANCE = 1e-3
#: The step sizes, in multiples of ``ε^(1/3)`` (``ε`` the dtype's), tried in turn until one
#: agrees; each input moves by the step times its root mean square.
STEP_FACTORS = (1.0, 1 / 2, 1 / 16, 1 / 32)
#: Output cotangents of the first-order check.
COTANGENTS = 4
#: The calls of each Function checked (its first ones in the forward): a derivative wrong on
#: negative inputs alone passed where the first call's were positive (probe 155).
CALLS_CHECKED = 4
#: The most bytes of a call's floating arguments, in float64, a check differentiates at once:
#: beyond it, the rows of their leading dimension are cut (a Function's derivatives are its
#: own at any input), so that a ResNet's activations do not cost the check several float64
#: copies of themselves, which no budget counts.
CHECK_BYTES = 16 * 2**20
#: One recording at a time: two threads that wrapped a shared Function class in turn had left
#: one's wrapper in place for good (probe 155).
_RECORDING = threading.RLock()

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
        kink: the distance between the forward and the backward difference at the smallest
            step, on that scale: a derivative that jumps at the point itself.
        resolved: whether the values moved beyond their rounding over the largest step (a tanh
            at inputs of 1e-7: its backward's values did not, every difference was exactly 0,
            and a right Function had been refused; probe 156).
    """

    relative: float
    spread: float = 0.0
    kink: float = 0.0
    resolved: bool = True

    @property
    def agreed(self) -> bool:
        """Some step's difference agrees within :data:`DIFFERENCE_TOLERANCE`."""
        return self.relative <= DIFFERENCE_TOLERANCE

    @property
    def refuted(self) -> bool:
        """No step's difference agrees, all agree with each other, and the one-sided ones
        with each other, to a quarter of their distance from the derivative: the derivative is
        wrong, not the differences, nor the point a kink."""
        return (not self.agreed and self.resolved
                and 4 * max(self.spread, self.kink) <= self.relative)

    @property
    def severity(self) -> tuple[int, float]:
        """Refuted before undecided before agreed, then by distance: the worst of several."""
        return (2 if self.refuted else 0 if self.agreed else 1), self.relative

    def outcome(self) -> str:
        """How the check went, where it did not refute the derivative."""
        if self.agreed:
            return f"{self.relative:.0e} apart"
        if not self.resolved:
            return "not checked: its values did not move beyond their rounding"
        return ("not checked: its one-sided differences disagreed, as at a kink at its inputs"
                if 4 * self.kink > self.relative else
                "not checked: the differences at four steps disagreed, as across a kink or in "
                "rounding")


def compared(derivative: Tensor, value: Callable[[float], Tensor], step: float,
             eps: float) -> Comparison:
    """``derivative`` (float64) of ``value`` (float64) along the direction at 0, against its
    central difference ``(value(h) - value(-h)) / 2h`` for ``h`` in ``step`` times
    :data:`STEP_FACTORS` until one agrees.

    A wrong derivative misses every difference by the same amount. The differences' own
    errors change with the step: truncation falls with ``h^2``, rounding grows with ``1/h``,
    and a kink crossed between the points (a ReLU's input crossing zero) adds its jump over
    ``2h``, at the steps that cross it. A kink at the point itself adds the mean of the two
    slopes at every step, which the one-sided differences ``(value(h) - value(0)) / h`` and
    ``(value(0) - value(-h)) / h`` show by disagreeing (:attr:`Comparison.kink`). ``eps``:
    the precision the values are computed in; below a thousand times it, their change over the
    largest step tells nothing (:attr:`Comparison.resolved`).
    """
    estimates: list[Tensor] = []
    scale = 0.0
    resolved = True
    for factor in STEP_FACTORS:
        h = step * factor
        plus, minus = value(h), value(-h)
        if not estimates:
            size = max(float(plus.norm()), float(minus.norm()))
            resolved = float((plus - minus).norm()) > 1000 * eps * size
        estimates.append((plus - minus) / (2 * h))
        scale = max(float(derivative.norm()), float(estimates[-1].norm()))
        relative = float((estimates[-1] - derivative).norm()) / scale if scale > 0 else 0.0
        if relative <= DIFFERENCE_TOLERANCE:
            return Comparison(relative)
    distance = min(float((estimate - derivative).norm()) for estimate in estimates)
    spread = max(float((first - second).norm())
                 for i, first in enumerate(estimates) for second in estimates[:i])
    kink = float((plus + minus - 2 * value(0.0)).norm()) / h
    return Comparison(distance / scale, spread / scale, kink / scale, resolved)


#: A call's recorded arguments: positional (tensors detached) and keyword.
Arguments = tuple[tuple[Any, ...], dict[str, Any]]
#: A recorded call: its arguments within :data:`CHECK_BYTES`, None where they cannot be.
Recorded = Arguments | None


@contextmanager
def recording(classes: Sequence[type]) -> Iterator[dict[type, list[Recorded]]]:
    """Inside the block, each Function class's ``forward`` records the arguments of its first
    :data:`CALLS_CHECKED` calls (not the ``ctx`` of a forward without ``setup_context``; cut
    and copied by :func:`_bounded`, so that the pass's own tensors are not kept),
    however the model reaches it (``self.act = Function.apply`` binds ``apply`` before any
    wrapping of it could); the classes are as they were on exit, Ctrl-C held back, one
    recording at a time."""
    calls: dict[type, list[Recorded]] = {cls: [] for cls in classes}

    def wrapped(cls: type) -> staticmethod[Any, Any]:
        original = inspect.getattr_static(cls, "forward")
        forward = (original.__func__ if isinstance(original, staticmethod)
                   else original.__get__(None, cls) if isinstance(original, classmethod)
                   else original)
        takes_context = (inspect.getattr_static(cls, "setup_context")
                         is inspect.getattr_static(torch.autograd.Function, "setup_context"))

        @functools.wraps(forward)  # (torch binds the arguments to its signature)
        def recorded(*args: Any, **kwargs: Any) -> Any:
            if len(calls[cls]) < CALLS_CHECKED:  # (cut and copied: not the pass's tensors)
                calls[cls].append(_bounded((args[int(takes_context):], kwargs)))
            return forward(*args, **kwargs)

        return staticmethod(recorded)

    with _RECORDING:  # (the classes read inside: another thread's wrapper is not theirs)
        own = {cls: cls.__dict__.get("forward") for cls in classes}

        def put_back() -> None:
            for cls, saved in own.items():
                if saved is None:
                    if "forward" in cls.__dict__:
                        delattr(cls, "forward")
                else:
                    setattr(cls, "forward", saved)  # noqa: B010 - a method put back

        # (a signal landing as the finally begins skips it: the call puts them back again)
        also_at_call_exit(put_back)
        try:
            with deferred_interrupts():
                for cls in classes:
                    setattr(cls, "forward", wrapped(cls))  # noqa: B010 - a method replaced
            yield calls
        finally:
            with deferred_interrupts():
                put_back()


def _copied(value: Any) -> Any:
    return value.detach().clone() if isinstance(value, Tensor) else value


class _Local:
    """One Function on the recorded arguments of a call, in ``dtype`` (None: theirs), its
    inputs that autograd differentiates in the model (``differentiated``, over its tensor
    arguments in order) moved along ``d``: random signs times each input's root mean square,
    the same along an input's expanded (stride-0) dimensions, whose entries the model moves
    together (a max over them had its ties broken; probe 155), and with ``hold_zeros`` none at
    the input's exact zeros."""

    def __init__(self, cls: type[torch.autograd.Function], arguments: Arguments,
                 differentiated: Sequence[bool], dtype: torch.dtype | None,
                 hold_zeros: bool = False) -> None:
        args, self.kwargs = arguments
        self.cls = cls
        self.args = [a.to(dtype) if dtype is not None and _floating(a) else a for a in args]
        tensors = [i for i, a in enumerate(self.args) if isinstance(a, Tensor)]
        self.moved = [i for i, flag in zip(tensors, differentiated)
                      if flag and _floating(self.args[i])]
        generator = torch.Generator().manual_seed(0xD1FF)
        self.directions = []
        for i in self.moved:
            x = self.args[i]
            tied = [1 if stride == 0 else size for size, stride in zip(x.shape, x.stride())]
            signs = torch.randint(0, 2, tied, generator=generator).to(x) * 2 - 1
            rms = float(x.double().square().mean().sqrt()) if x.numel() else 0.0
            direction = signs.expand(x.shape) * (rms if rms > 0 else 1.0)
            self.directions.append(direction * (x != 0) if hold_zeros else direction)
        dtype = self.args[self.moved[0]].dtype if self.moved else torch.float64
        #: the precision the Function computes in (raised to float32's where it rounds to it
        #: inside: :func:`_checked`), and the first step, where truncation and rounding balance
        self.eps = float(torch.finfo(dtype).eps)
        self.step = self.eps ** (1 / 3)
        #: the indices, among the floating outputs, of those autograd differentiates (not a
        #: mark_non_differentiable one)
        self.differentiable: list[int] | None = None

    def call(self, shift: float, graph: bool) -> tuple[list[Tensor], list[Tensor]]:
        """``(inputs, outputs)``: the Function at the inputs moved by ``shift`` times ``d``;
        with ``graph``, the moved inputs are leaves requiring grad (the Function gets copies:
        it may write them in place); the outputs, those autograd differentiates."""
        leaves = [(self.args[i] + shift * d).detach().requires_grad_(graph)
                  for i, d in zip(self.moved, self.directions)]
        args = list(self.args)
        for i, leaf in zip(self.moved, leaves):
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

    def direction_dot(self, pieces: Sequence[Tensor | None], like: Tensor) -> Tensor:
        return sum(((piece * d).sum() for piece, d in zip(pieces, self.directions)
                    if piece is not None), torch.zeros((), device=like.device, dtype=like.dtype))

    def outputs_at(self, shift: float) -> Tensor:
        """``F(x + shift d)``, its differentiable outputs flat (float64)."""
        return torch.cat([o.double().reshape(-1) for o in self.call(shift, graph=False)[1]])

    def check(self, need: str) -> Comparison:
        """The comparison of the derivative ``need`` with its differences."""
        leaves, outputs = self.call(0.0, graph=True)
        if need == FIRST:
            ws = self.cotangents(outputs, COTANGENTS)
            derivative = torch.stack([
                self.direction_dot(_grad(_dot(w, outputs), leaves, retain=True),
                                   outputs[0]).double() for w in ws])
            flat = torch.stack([torch.cat([x.double().reshape(-1) for x in w]) for w in ws])
            return compared(derivative, lambda shift: flat @ self.outputs_at(shift), self.step,
                            self.eps)
        (w,) = self.cotangents(outputs, 1)
        if need == SECOND:
            along = self.direction_dot(_grad(_dot(w, outputs), leaves, create=True), outputs[0])
            derivative = _flat(leaves, _grad(along, leaves))

            def backward_at(shift: float) -> Tensor:  # J^T w at the moved inputs
                moved, moved_outputs = self.call(shift, graph=True)
                return _flat(moved, _grad(_dot(w, moved_outputs), moved))

            return compared(derivative, backward_at, self.step, self.eps)
        w = [x.requires_grad_(True) for x in w]  # COTANGENT
        along = self.direction_dot(_grad(_dot(w, outputs), leaves, create=True), outputs[0])
        return compared(_flat(w, _grad(along, w)), self.outputs_at, self.step, self.eps)


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


def loss_needs(method: str) -> tuple[str, ...]:
    """The derivatives ``method`` takes through the loss's own Functions: the GGN's loss
    Hessian (``ggn``, ``ggn_lanczos``) differentiates their backward as the Hessian does; the
    empirical Fisher takes first derivatives."""
    return (FIRST, SECOND, COTANGENT) if method.startswith("ggn") else (FIRST,)


def _read_loss_functions(problem: CurvatureProblem, outputs: object,
                         loss: Tensor | None) -> None:
    """Add the loss's own custom Functions, once a call, from ``loss`` (the Hessian's, with its
    graph) or a loss graph on the detached ``outputs``
    (:attr:`~hessrank.problem.CurvatureProblem.loss_functions`): the Gram sources
    differentiate the loss apart from the model, where the model's graph does not show them
    (a loss Function with half its derivative had halved ``ggn``'s eigenvalues, quartered
    ``fisher``'s, under no note; probe 156). Not evaluated for torch's own loss modules."""
    if problem.loss_graph_read[0]:  # (a data set's Hessian builds an operator a product)
        return
    problem.loss_graph_read[0] = True
    if loss is None:
        if (not isinstance(outputs, Tensor) or not outputs.is_floating_point()
                or type(problem.loss_fn).__module__.startswith("torch.")):
            return
        try:
            with torch.enable_grad():  # (not a leaf: a loss may write its outputs in place)
                loss = call_loss(problem.loss_fn,
                                 outputs.detach().requires_grad_(True).clone(), problem.targets)
        except UnrepeatableLoss:
            raise
        except Exception as error:  # noqa: BLE001 - the checked evaluations say what is wrong
            raise_if_signalled(error)
            return
    if isinstance(loss, Tensor) and loss.grad_fn is not None:
        problem.loss_functions.update(problem.add_custom_functions(loss))


def check_custom_functions(problem: CurvatureProblem, needs: Sequence[str],
                           for_the_loss: Sequence[str] = (), outputs: object = None,
                           loss: Tensor | None = None) -> None:
    """Check the derivatives ``needs`` (:data:`FIRST`, :data:`SECOND`, :data:`COTANGENT`) of
    every custom Function in the model's graph, each alone at the arguments of its first
    :data:`CALLS_CHECKED` calls in one forward pass (without a graph), once per call; a note
    says how each went.

    The Functions are those of the model's graph and the loss's, read once a call from
    ``loss`` (the Hessian's) or a loss on ``outputs`` (:func:`_read_loss_functions`: a loss
    Function with half its derivative had halved exact's eigenvalues under a note that the
    model's Function agreed; probe 154), the latter checked for ``for_the_loss`` too
    (:func:`loss_needs`).

    Each is tried in float64 first (finite differences are sharp there), then at float32's
    steps, then in the dtype it got, where it does not run in float64 or these could not tell
    (a Function that computes in float32 inside, whose differences at float64's steps are its
    rounding: errors up to 30 % had passed so; probe 155), each also with the inputs' exact
    zeros held where a kink at them kept it from telling. A Function that cannot be run again
    alone on its arguments is named in the note as not checked.

    Raises:
        ValueError: a derivative disagrees with its finite differences, naming the Function,
            the distance and the fix.
    """
    _read_loss_functions(problem, outputs, loss)
    due = {cls: [need for need in (FIRST, SECOND, COTANGENT)
                 if need in needs or cls in problem.loss_functions and need in for_the_loss
                 if (cls, need) not in problem.differences_checked]
           for cls in problem.custom_functions}
    due = {cls: checks for cls, checks in due.items() if checks}
    if not due:
        return
    problem.differences_checked.update((cls, need)
                                       for cls, checks in due.items() for need in checks)
    calls = _recorded_calls(problem, list(due), grad=False)
    unseen = [cls for cls in due if not calls[cls]]
    if unseen:  # called only where a graph is built (a fused kernel's pattern; probe 156)
        calls.update(_recorded_calls(problem, unseen, grad=True))
    found: list[str] = []
    for cls, checks in due.items():
        outcomes: dict[str, Comparison | None] = {}
        too_large = False
        try:
            for arguments in calls[cls]:
                if arguments is None:
                    too_large = True
                    break
                for need in checks:
                    comparison = _checked(cls, arguments, problem.custom_functions[cls], need)
                    kept = outcomes.get(need)
                    if comparison is not None and (kept is None
                                                   or comparison.severity > kept.severity):
                        outcomes[need] = comparison  # (the worst of the calls)
        except Exception as error:  # noqa: BLE001 - the Function does not run alone
            raise_if_signalled(error)
            found.append(f"{cls.__qualname__} (not checked: it does not run again alone on its "
                         f"arguments, {type(error).__name__}: "
                         f"{' '.join(str(error).split())[:80]})")
            continue
        for need, comparison in outcomes.items():
            if comparison is not None and comparison.refuted:
                raise _refusal(cls.__qualname__, need, comparison)
        if too_large:
            found.append(f"{cls.__qualname__} (not checked: its arguments are too large to "
                         "differentiate alone)")
        elif not calls[cls]:
            found.append(f"{cls.__qualname__} (not checked: not called in a forward pass on "
                         "the batch)")
        else:
            found.append(f"{cls.__qualname__} (" + ", ".join(
                f"{need} " + ("not checked: no input autograd differentiates moves"
                              if comparison is None else comparison.outcome())
                for need, comparison in ((need, outcomes.get(need)) for need in checks)) + ")")
    if found:
        problem.notes.append("custom autograd.Function(s) checked alone by finite differences "
                             "at their inputs in the model: " + "; ".join(found))


def _bounded(arguments: Arguments) -> Recorded:
    """A call's arguments within :data:`CHECK_BYTES` (float64), detached copies: where they
    are beyond it, those whose leading dimension is the commonest one cut to its first rows;
    None where no cut brings them within four times it."""
    args, kwargs = arguments
    total = sum(8 * a.numel() for a in args if _floating(a))
    if total > CHECK_BYTES:
        leading = [a.shape[0] for a in args if isinstance(a, Tensor) and a.dim() > 0]
        lead = max(set(leading), key=leading.count) if leading else 0
        keep = max(1, int(lead * CHECK_BYTES / total)) if lead > 1 else 0
        args = tuple(a[:keep] if keep and isinstance(a, Tensor) and a.dim() > 0
                     and a.shape[0] == lead else a for a in args)
        if sum(8 * a.numel() for a in args if _floating(a)) > 4 * CHECK_BYTES:
            return None
    return (tuple(_copied(a) for a in args),
            {key: _copied(value) for key, value in kwargs.items()})


def _recorded_calls(problem: CurvatureProblem, classes: list[type],
                    grad: bool) -> dict[type, list[Recorded]]:
    """The arguments of the first calls of ``classes`` in one forward pass and loss on the
    problem's batch, without a graph or (``grad``) with one, dropped at once."""
    with recording(classes) as calls, torch.set_grad_enabled(grad):
        problem.before_pass()
        outputs = run_model(problem.model, problem.args, problem.kwargs, problem.mode)
        call_loss(problem.loss_fn, outputs, problem.targets)  # (a loss's own Functions)
    return calls


def _checked(cls: type[torch.autograd.Function], arguments: Arguments,
             differentiated: Sequence[bool], need: str) -> Comparison | None:
    """The comparison for ``need`` at one call's ``arguments``: in float64 where the Function
    runs so, else or where that cannot tell in the arguments' dtype, each with the inputs'
    exact zeros held where a kink at them kept the check from telling (the most conclusive
    kept); None where no input it differentiates moves."""
    own = next((a.dtype for a in arguments[0] if _floating(a)), torch.float64)
    # float64, at its steps and float32's (a Function that rounds to float32 inside), then
    # the arguments' own dtype where it is another
    tries = [(torch.float64, False), (torch.float64, True)] + (
        [(None, False)] if own != torch.float64 else [])
    best: Comparison | None = None
    for dtype, coarse in tries:
        for hold_zeros in (False, True):
            local = _trial(cls, arguments, differentiated, dtype, hold_zeros)
            if local is None or not any(bool(d.any()) for d in local.directions):
                continue
            if coarse:
                local.eps = float(torch.finfo(torch.float32).eps)
                local.step = local.eps ** (1 / 3)
            comparison = local.check(need)
            if comparison.refuted or comparison.agreed:
                return comparison
            best = best or comparison
    return best


def _trial(cls: type[torch.autograd.Function], arguments: Arguments,
           differentiated: Sequence[bool], dtype: torch.dtype | None,
           hold_zeros: bool) -> _Local | None:
    """The Function alone on one call's ``arguments`` in ``dtype`` (one call tried); None
    where it does not run in that dtype (float64; in its own dtype it must) or has no input to
    move."""
    local = _Local(cls, arguments, differentiated, dtype, hold_zeros)
    if not local.moved:
        return None
    try:
        local.call(0.0, graph=True)
    except Exception as error:  # noqa: BLE001 - a Function of one dtype: in its own
        if dtype is None:
            raise
        raise_if_signalled(error)
        return None
    return local


def _refusal(name: str, need: str, comparison: Comparison) -> ValueError:
    return ValueError(
        f"the custom autograd.Function {name} fails a check of its {need} at the inputs the "
        f"model gives it ({_COMPARED[need]}: {comparison.relative:.1e} apart, the differences "
        f"at four steps agreeing to {comparison.spread:.1e}): {_REFUSALS[need]}")
