"""A log-softmax whose derivatives keep their digits at a saturated softmax.

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
others" is a linear map whose backward is itself (:class:`_Others`). The forward is torch's
own, so the loss's value is unchanged bit for bit.
"""

from __future__ import annotations

from typing import Any, TypeGuard, cast

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode


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

    @staticmethod
    def forward(ctx: Any, values: Tensor, dim: int) -> Tensor:
        ctx.dim = dim
        return _others_sum(values, dim)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return _Others.apply(grad, ctx.dim), None


class _LogSoftmax(torch.autograd.Function):
    """``torch.log_softmax(logits, dim)`` whose backward ``g (1 - p) - p (sum(g) - g)`` (the
    same as torch's ``g - p sum(g)``), each ``1 - p_j`` and ``sum(g) - g_j`` an
    :class:`_Others` sum, is differentiable and free of cancellation."""

    @staticmethod
    def forward(ctx: Any, logits: Tensor, dim: int) -> Tensor:
        log_probabilities = torch.log_softmax(logits, dim)
        ctx.save_for_backward(log_probabilities)
        ctx.dim = dim
        return log_probabilities

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (log_probabilities,) = ctx.saved_tensors
        probabilities = log_probabilities.exp()
        return (grad * _Others.apply(probabilities, ctx.dim)
                - probabilities * _Others.apply(grad, ctx.dim)), None


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


class SaturationSafeSoftmax(TorchFunctionMode):
    """Runs ``log_softmax`` (``F.log_softmax``, ``torch.log_softmax``, ``Tensor.log_softmax``)
    and ``F.cross_entropy`` with class-index targets and no label smoothing
    (``nn.CrossEntropyLoss``; torch computes it as ``nll_loss(log_softmax(input, class_dim))``,
    and so does this) through :class:`_LogSoftmax` where its rounding would show: the same
    values, derivatives without the cancellation near a saturated softmax. Calls with another
    dtype, a named dimension, probability targets or label smoothing run as given.

    The cancellation amplifies the rounding of the logits' dtype ``1 / (1 - p_max)`` times,
    which the products show once it exceeds the model dtype's (their checks and rank
    tolerances are the model's): once some sample's ``1 - p_max`` is below ``eps(logits) /
    eps(model)``. A float64 model's log-softmax therefore always runs through
    :class:`_LogSoftmax`, and so does a float32 model's loss that runs in float32; a float32
    model's loss on outputs widened to float64 only below ``eps64 / eps32`` (1.9e-9). The
    backward holds two more logits-sized tensors and takes a third longer a product on GPT's
    4.2M logits (``benchmarks/softmax_cost.py``), which float32 models at their usual
    saturations do not pay.

    Args:
        dtype: the model's dtype, whose rounding the products are judged by.
    """

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        #: the rounding unit of the model's dtype, which the products are judged by
        self.eps = float(torch.finfo(dtype).eps)

    def _saturated(self, logits: Tensor, dim: int) -> bool:
        """Whether some sample's ``1 - p_max`` along ``dim`` is below ``eps(logits) / eps``
        (always where that is 1 or more, and under a functorch transform, whose values no
        branch may read)."""
        limit = float(torch.finfo(logits.dtype).eps) / self.eps
        if limit >= 1.0 or torch._C._functorch.is_functorch_wrapped_tensor(logits):
            return True
        with torch.no_grad():
            gap = -torch.expm1(torch.log_softmax(logits.detach(), dim).amax(dim))
        return bool((gap < limit).any())

    def __torch_function__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in _LOG_SOFTMAX_PARAMETERS:
            bound = {**dict(zip(_LOG_SOFTMAX_PARAMETERS[func], args)), **kwargs}
            logits, dim = bound.get("input"), bound.get("dim")
            if (set(bound) <= set(_LOG_SOFTMAX_PARAMETERS[func]) and _replaceable(logits, dim)
                    and bound.get("dtype") in (None, logits.dtype)
                    and self._saturated(logits, cast(int, dim))):
                return _LogSoftmax.apply(logits, dim)
        elif func is F.cross_entropy:
            bound = {"weight": None, "size_average": None, "ignore_index": -100,
                     "reduce": None, "reduction": "mean", "label_smoothing": 0.0,
                     **dict(zip(_CROSS_ENTROPY_PARAMETERS, args)), **kwargs}
            logits, target = bound.get("input"), bound.get("target")
            class_dim = 1 if isinstance(logits, Tensor) and logits.dim() >= 2 else 0
            if (set(bound) <= set(_CROSS_ENTROPY_PARAMETERS) and _replaceable(logits, class_dim)
                    and isinstance(target, Tensor) and not target.is_floating_point()
                    and bound["size_average"] is None and bound["reduce"] is None
                    and bound["label_smoothing"] == 0.0 and self._saturated(logits, class_dim)):
                return F.nll_loss(_LogSoftmax.apply(logits, class_dim),
                                  target, bound["weight"], ignore_index=bound["ignore_index"],
                                  reduction=bound["reduction"])
        return func(*args, **kwargs)
