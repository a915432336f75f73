"""Losses whose derivatives keep their digits where a softmax or a sigmoid saturates.

torch's log-softmax backward is ``g - p sum(g)``; at a memorised batch's label, ``p_y = 1 -
1e-6``, its component ``g_y (1 - p_y)`` is the difference of two numbers near ``g_y``, whose
rounding (``eps`` of ``g_y``) is ``1e-10`` of the result in float64 (``eps / (1 - p_y)``). The
Hessian differentiates that backward again, so its products carried the loss's rounding
amplified the same way: a float64 MLP at loss 1.8e-6 had Hessian-vector products asymmetric to
5.7e-12 of the Hessian (25 times what float64 rounding leaves) and eigenvalues off by 3.7e-12
of the largest, 6 of its 17 null directions above the numerical rank's ``P eps`` cut; ``exact``
and ``lanczos`` refused it as a wrong derivative. The same gradient written as ``g (1 - p) - p
(sum(g) - g)``, with each ``1 - p_j`` summed from the other probabilities (small positive
numbers, no cancellation), holds its digits; so do its derivatives, since that "sum of the
others" is a linear map whose backward is itself (:class:`_Others`).

A sigmoid's derivative is ``s (1 - s)``, which torch forms with the same cancellation: its
second derivatives of ``sigmoid``, ``logsigmoid`` and ``binary_cross_entropy_with_logits`` at
``z = 30`` are 1e-3 off in float64, and a float64 MLP trained to a ``BCEWithLogitsLoss`` of
5e-8 had its Hessian's and its GGN's eigenvalues off by 5e-11 of the largest, every check
passed. Written ``sigmoid(z) sigmoid(-z)`` (:class:`_Sigmoid`), it keeps its digits at every
order.

Every forward is torch's own, so the loss's value is unchanged bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeGuard, cast

import torch
import torch.nn.functional as F
from torch import Tensor

from hessrank.guard import OwnMode
from hessrank.problem import LossFn


def _others_sum(values: Tensor, dim: int) -> Tensor:
    """``sum_{k != j} v_k`` for each ``j`` along ``dim``: ``total - v_j``, but for the entry of
    the largest magnitude, whose ``total - v_j`` is the one that can lose every digit (``1 -
    p_y`` at a saturated softmax), summed from the others. Another entry's is as precise as
    the sum of the others itself (the largest is among them)."""
    largest = values.abs().argmax(dim, keepdim=True)
    rest = values.scatter(dim, largest, 0.0).sum(dim, keepdim=True)
    return (values.sum(dim, keepdim=True) - values).scatter(dim, largest, rest)


class _Others(torch.autograd.Function):
    """:func:`_others_sum` as a differentiable map: it is linear and its own transpose, so its
    backward is itself, precise at every order (autograd's derivative of its operations would
    form ``sum - c_j`` of the cotangent again, with the cancellation where the cotangent's
    largest entry is elsewhere: a hand-smoothed loss's float32 Hessian at a saturated softmax
    came out asymmetric)."""

    generate_vmap_rule = True  # its operations batch (the empirical Fisher's per-sample reads)

    @staticmethod
    def forward(values: Tensor, dim: int) -> Tensor:
        return _others_sum(values, dim)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, int], output: Tensor) -> None:
        ctx.dim = inputs[1]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return _Others.apply(grad, ctx.dim), None


class _LogSoftmax(torch.autograd.Function):
    """``torch.log_softmax(logits, dim)`` whose backward ``g (1 - p) - p (sum(g) - g)`` (the
    same as torch's ``g - p sum(g)``), each ``1 - p_j`` and ``sum(g) - g_j`` an
    :class:`_Others` sum, is differentiable and free of cancellation."""

    generate_vmap_rule = True

    @staticmethod
    def forward(logits: Tensor, dim: int) -> Tensor:
        return torch.log_softmax(logits, dim)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, int], output: Tensor) -> None:
        ctx.save_for_backward(output)
        ctx.dim = inputs[1]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (log_probabilities,) = ctx.saved_tensors
        probabilities = log_probabilities.exp()
        return (grad * _Others.apply(probabilities, ctx.dim)
                - probabilities * _Others.apply(grad, ctx.dim)), None


class _Sigmoid(torch.autograd.Function):
    """``torch.sigmoid(z)`` whose derivative ``sigmoid(z) sigmoid(-z)`` (torch's ``s (1 - s)``
    without the cancellation at ``s`` near 1) is itself made of :class:`_Sigmoid`, precise
    at every order."""

    generate_vmap_rule = True

    @staticmethod
    def forward(logits: Tensor) -> Tensor:
        return torch.sigmoid(logits)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor], output: Tensor) -> None:
        ctx.save_for_backward(inputs[0])  # the logits, which the backward reads

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (logits,) = ctx.saved_tensors
        return grad * _Sigmoid.apply(logits) * _Sigmoid.apply(-logits)


class _LogSigmoid(_Sigmoid):
    """``F.logsigmoid(z)`` whose derivative ``sigmoid(-z)`` is a :class:`_Sigmoid` (its context
    is :class:`_Sigmoid`'s)."""

    @staticmethod
    def forward(logits: Tensor) -> Tensor:
        return F.logsigmoid(logits)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (logits,) = ctx.saved_tensors
        return grad * _Sigmoid.apply(-logits)


class _BinaryCrossEntropyWithLogits(torch.autograd.Function):
    """``F.binary_cross_entropy_with_logits(z, y, weight, pos_weight=q, reduction=...)`` (targets
    and weights constants) whose derivative in ``z``, ``w ((1 - y) sigmoid(z) - q y
    sigmoid(-z))`` (torch's ``w ((1 - y + q y) s - q y)``), is made of :class:`_Sigmoid`: at a
    hard label one term is zero and the other keeps its digits at every order."""

    generate_vmap_rule = True

    @staticmethod
    def forward(logits: Tensor, targets: Tensor, weight: Tensor | None,
                pos_weight: Tensor | None, reduction: str) -> Tensor:
        return F.binary_cross_entropy_with_logits(logits, targets, weight, reduction=reduction,
                                                  pos_weight=pos_weight)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        logits, targets, weight, pos_weight, reduction = inputs
        ctx.save_for_backward(logits, targets, weight, pos_weight)
        ctx.reduction = reduction

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None, None]:
        logits, targets, weight, pos_weight = ctx.saved_tensors
        positive = targets if pos_weight is None else pos_weight * targets
        derivative = (1 - targets) * _Sigmoid.apply(logits) - positive * _Sigmoid.apply(-logits)
        if weight is not None:
            derivative = derivative * weight
        # the loss's entries have the shape the weights broadcast the logits to (a captured
        # batch's weight under the EF's per-sample vmap: [n, C] for one sample's [1, C])
        scale = grad / derivative.numel() if ctx.reduction == "mean" else grad
        return (derivative * scale).sum_to_size(logits.shape), None, None, None, None


def _replaceable(logits: object, dim: object) -> TypeGuard[Tensor]:
    """Whether ``log_softmax(logits, dim)`` can run through :class:`_LogSoftmax`: floating
    logits of one dimension or more, a valid integer ``dim`` (not a name) of nonzero size
    (anything else runs as given, and torch's error, if any, is its own)."""
    return (isinstance(logits, Tensor) and logits.is_floating_point() and logits.dim() > 0
            and isinstance(dim, int) and -logits.dim() <= dim < logits.dim()
            and logits.shape[dim] > 0)


#: The positional parameters of the log-softmax functions the mode replaces.
_LOG_SOFTMAX_PARAMETERS = {
    F.log_softmax: ("input", "dim", "_stacklevel", "dtype"),
    torch.log_softmax: ("input", "dim", "dtype"),
    Tensor.log_softmax: ("input", "dim", "dtype"),
}
#: ``F.cross_entropy``'s parameters.
_CROSS_ENTROPY_PARAMETERS = ("input", "target", "weight", "size_average", "ignore_index",
                             "reduce", "reduction", "label_smoothing")
#: ``F.binary_cross_entropy_with_logits``'s parameters.
_BINARY_CROSS_ENTROPY_PARAMETERS = ("input", "target", "weight", "size_average", "reduce",
                                    "reduction", "pos_weight")


def _constant(value: object, like: Tensor, shape_too: bool = False) -> bool:
    """Whether ``value`` is a tensor of ``like``'s dtype and device (and shape with
    ``shape_too``) that does not require its gradient."""
    return (isinstance(value, Tensor) and not value.requires_grad and value.dtype == like.dtype
            and value.device == like.device and (not shape_too or value.shape == like.shape))


class SaturationSafe(OwnMode):
    """Runs a loss's log-softmax and log-sigmoid through :class:`_LogSoftmax`,
    :class:`_LogSigmoid` and :class:`_BinaryCrossEntropyWithLogits` where their rounding would
    show: the same values, derivatives without the cancellation near saturation. Replaced:
    ``F.log_softmax``, ``torch.log_softmax``, ``Tensor.log_softmax``; ``F.cross_entropy`` with
    class-index targets and no label smoothing (``nn.CrossEntropyLoss``; torch computes it as
    ``nll_loss(log_softmax(input, class_dim))``, and so does this); ``F.logsigmoid``
    (``nn.LogSigmoid``); ``F.binary_cross_entropy_with_logits`` (``nn.BCEWithLogitsLoss``) with
    targets, weights and ``pos_weight`` that are constants. Calls with another dtype, a named
    dimension, probability targets, label smoothing or arguments that require gradients run as
    given.

    The cancellation amplifies the rounding of the logits' dtype ``1 / gap`` times (``gap``:
    ``1 - p_max``, or ``min(s, 1 - s)`` of a sigmoid), which the products show once it exceeds
    the model dtype's (their checks and rank tolerances are the model's): once some sample's
    ``gap`` is below ``eps(logits) / eps(model)``. A float64 model's loss therefore always runs
    through the replacements, and so does a float32 model's loss that runs in float32; a
    float32 model's loss on outputs widened to float64 only below ``eps64 / eps32`` (1.9e-9).
    The log-softmax's backward holds two more logits-sized tensors and takes a third longer a
    product on GPT's 4.2M logits (``benchmarks/softmax_cost.py``), which float32 models at
    their usual saturations do not pay.

    The empirical Fisher's and the GGN's factors, read from the loss's first and second
    derivatives, have the same cancellation: their float64 readings run the loss through
    :func:`saturation_safe`.

    Args:
        dtype: the model's dtype, whose rounding the products are judged by.
        log_softmax: replace the log-softmaxes too (else the log-sigmoids alone): see
            :func:`saturation_safe`.
    """

    def __init__(self, dtype: torch.dtype, log_softmax: bool = True) -> None:
        super().__init__()
        #: the rounding unit of the model's dtype, which the products are judged by
        self.eps = float(torch.finfo(dtype).eps)
        self.log_softmax = log_softmax

    def _saturated(self, logits: Tensor, gap: Callable[[Tensor], Tensor]) -> bool:
        """Whether some entry of ``gap(logits)`` (without a graph) is below ``eps(logits) /
        eps`` (always where that is 1 or more, and under a functorch transform, whose values no
        branch may read)."""
        limit = float(torch.finfo(logits.dtype).eps) / self.eps
        if limit >= 1.0 or torch._C._functorch.is_functorch_wrapped_tensor(logits):
            return True
        with torch.no_grad():
            return bool((gap(logits.detach()) < limit).any())

    def _softmax_saturated(self, logits: Tensor, dim: int) -> bool:
        return self._saturated(
            logits, lambda detached: -torch.expm1(torch.log_softmax(detached, dim).amax(dim)))

    def _sigmoid_saturated(self, logits: Tensor) -> bool:
        return self._saturated(logits, lambda detached: torch.sigmoid(-detached.abs()))

    def __torch_function__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in _LOG_SOFTMAX_PARAMETERS and self.log_softmax:
            bound = {**dict(zip(_LOG_SOFTMAX_PARAMETERS[func], args)), **kwargs}
            logits, dim = bound.get("input"), bound.get("dim")
            if (set(bound) <= set(_LOG_SOFTMAX_PARAMETERS[func]) and _replaceable(logits, dim)
                    and bound.get("dtype") in (None, logits.dtype)
                    and self._softmax_saturated(logits, cast(int, dim))):
                return _LogSoftmax.apply(logits, dim)
        elif func is F.cross_entropy and self.log_softmax:
            bound = {"weight": None, "size_average": None, "ignore_index": -100,
                     "reduce": None, "reduction": "mean", "label_smoothing": 0.0,
                     **dict(zip(_CROSS_ENTROPY_PARAMETERS, args)), **kwargs}
            logits, target = bound.get("input"), bound.get("target")
            class_dim = 1 if isinstance(logits, Tensor) and logits.dim() >= 2 else 0
            if (set(bound) <= set(_CROSS_ENTROPY_PARAMETERS) and _replaceable(logits, class_dim)
                    and isinstance(target, Tensor) and not target.is_floating_point()
                    and bound["size_average"] is None and bound["reduce"] is None
                    and bound["label_smoothing"] == 0.0
                    and self._softmax_saturated(logits, class_dim)):
                return F.nll_loss(_LogSoftmax.apply(logits, class_dim),
                                  target, bound["weight"], ignore_index=bound["ignore_index"],
                                  reduction=bound["reduction"])
        elif func is F.logsigmoid:
            (logits,) = args if len(args) == 1 and not kwargs else (None,)
            if (isinstance(logits, Tensor) and logits.is_floating_point()
                    and self._sigmoid_saturated(logits)):
                return _LogSigmoid.apply(logits)
        elif func is F.binary_cross_entropy_with_logits:
            bound = {"weight": None, "size_average": None, "reduce": None, "reduction": "mean",
                     "pos_weight": None,
                     **dict(zip(_BINARY_CROSS_ENTROPY_PARAMETERS, args)), **kwargs}
            logits = bound.get("input")
            if (set(bound) <= set(_BINARY_CROSS_ENTROPY_PARAMETERS)
                    and isinstance(logits, Tensor) and logits.is_floating_point()
                    and _constant(bound.get("target"), logits, shape_too=True)
                    and all(bound[name] is None or _constant(bound[name], logits)
                            for name in ("weight", "pos_weight"))
                    and bound["size_average"] is None and bound["reduce"] is None
                    and bound["reduction"] in ("mean", "sum", "none")
                    and self._sigmoid_saturated(logits)):
                return _BinaryCrossEntropyWithLogits.apply(
                    logits, bound["target"], bound["weight"], bound["pos_weight"],
                    bound["reduction"])
        return func(*args, **kwargs)


def saturation_safe(loss_fn: LossFn, log_softmax: bool = True) -> LossFn:
    """``loss_fn`` evaluated through :class:`SaturationSafe` for a float64 model, its
    log-sigmoids (and with ``log_softmax`` its log-softmaxes) replaced at any saturation: the
    loss as the float64 readings of the output-side factors evaluate it. Those factors are the
    loss's first derivatives (the EF's ``p - e_y``, ``s - y``) or its second (the GGN's
    ``s (1 - s)``), which torch forms with a cancellation near a saturated softmax or sigmoid:
    a float64 model's ``fisher`` at a cross-entropy of 2e-9 had its top eigenvalue 1.2e-9 off,
    its smallest 5e-5, its ``ggn`` at a ``BCEWithLogitsLoss`` of 5e-8 5e-11 of the largest. At
    any saturation, not only where saturated: the samples' readings under ``vmap`` cannot tell
    and take the replacement, and the batch's must be read alike (torch's backward differs
    from it by its amplified rounding). Float32 readings run the loss as given: their rounding
    is measured against float64 (:mod:`hessrank.curvature.loss`), and they are read again in
    float64, through this, where it shows.

    The GGN's differentiated blocks keep torch's log-softmax (``log_softmax=False``): each is
    factored with its diagonal scaled to one, so every entry needs its own digits, and the
    replacement's second derivative forms ``d(1 - p_y)`` from the other classes' derivatives,
    which cancel where the label is a confidently wrong class's (an entry of 1.5e-48 came out
    2.6e-23, and a block's scaled eigenvalue negative); torch's keeps those, and a softmax
    cross-entropy's blocks come from its formula, precise in both. A sigmoid's second
    derivative through :class:`_Sigmoid` keeps its digits either way."""

    def safe(outputs: Tensor, targets: Tensor) -> Tensor:
        with SaturationSafe(torch.float64, log_softmax):
            return loss_fn(outputs, targets)

    return safe
