"""Output-side factors of the empirical Fisher and the GGN.

Both matrices have the form ``F F^T`` with columns ``J_i^T s_ik``: the vector-Jacobian product of
sample ``i``'s outputs with a cotangent ``s_ik``. This module computes the cotangents, shape
``[K, n, *output_shape]``:

- empirical Fisher (``K = 1``): ``s_i = sqrt(c) dl_i/df_i``;
- GGN (``K = C'``): ``s_ik = sqrt(c) sqrt(lambda_ik) u_ik`` from the eigendecomposition of the
  per-sample loss Hessian ``d^2 l_i / df_i^2`` (``C' <= C`` columns: the ones that are zero for
  every sample are dropped, e.g. the softmax shift of cross-entropy, giving ``C' = C - 1``),

where ``c`` is the reduction scale: the loss is ``c * sum_i l_i`` with ``c = 1/n`` (mean) or
``c = 1`` (sum), and ``l_i = loss_fn(f_i[None], y_i[None])``.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor
from torch.func import hessian, vmap

from hessrank.problem import LossFn


def reduction_scale(loss_fn: LossFn, outputs: Tensor, targets: Tensor) -> float:
    """``c`` such that ``loss_fn(outputs, targets) == c * sum_i loss_fn(f_i, y_i)``.

    Uses ``loss_fn.reduction`` when the loss is a torch loss module; otherwise compares the loss
    of two samples with their single-sample losses. Raises when neither mean nor sum fits.
    """
    n = outputs.shape[0]
    reduction = getattr(loss_fn, "reduction", None)
    if reduction == "mean":
        return 1.0 / n
    if reduction == "sum":
        return 1.0
    if n == 1:
        return 1.0
    with torch.no_grad():
        first = float(loss_fn(outputs[:1], targets[:1]))
        second = float(loss_fn(outputs[1:2], targets[1:2]))
        pair = float(loss_fn(outputs[:2], targets[:2]))
    tolerance = 1e-4 * max(abs(first) + abs(second), 1e-12)
    if abs(pair - (first + second) / 2) <= tolerance:
        return 1.0 / n
    if abs(pair - (first + second)) <= tolerance:
        return 1.0
    raise ValueError(
        "loss_fn is neither the mean nor the sum of per-sample losses (checked on two samples): "
        "'fisher' and 'ggn' need that decomposition; use method='exact' or 'lanczos', or a loss "
        "with reduction='mean' or 'sum'"
    )


def fisher_cotangents(loss_fn: LossFn, outputs: Tensor, targets: Tensor, scale: float) -> Tensor:
    """``[1, n, *out]``: ``sqrt(c) dl_i/df_i`` (``outputs`` must be part of a graph or a leaf)."""
    outputs = outputs.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(outputs, targets)
        (grad,) = torch.autograd.grad(loss, outputs)
    # grad = c * dl_i/df_i, and the Fisher is c * sum_i g_i g_i^T = sum_i (sqrt(c) g_i)(...)^T.
    return (grad / math.sqrt(scale)).unsqueeze(0)


def ggn_cotangents(loss_fn: LossFn, outputs: Tensor, targets: Tensor, scale: float) -> Tensor:
    """``[C', n, *out]``: square-root factors of the per-sample loss Hessians, scaled by sqrt(c).

    Raises ValueError when ``torch.func`` cannot differentiate the loss twice or when the loss is
    not convex in the outputs (the GGN would then be indefinite and has no square root).
    """
    n = outputs.shape[0]
    out_shape = outputs.shape[1:]
    flat = outputs.detach().reshape(n, -1)

    def sample_loss(f: Tensor, y: Tensor) -> Tensor:
        return loss_fn(f.reshape(1, *out_shape), y.unsqueeze(0))

    try:
        with warnings.catch_warnings():
            # torch's forward-mode AD scripts a helper on first use and warns that
            # torch.jit.script is deprecated: torch's own business, not the user's.
            warnings.filterwarnings("ignore", message=".*torch.jit.script.*deprecated")
            loss_hessians = vmap(hessian(sample_loss))(flat, targets)
    except Exception as error:  # torch.func raises many types for unsupported code
        raise ValueError(
            f"cannot take the per-sample Hessian of loss_fn with torch.func ({error}); the GGN "
            "needs it: write the loss with differentiable torch operations, or use "
            "method='fisher' or 'exact'"
        ) from error
    loss_hessians = (loss_hessians + loss_hessians.transpose(1, 2)).to(torch.float64) / 2
    eigenvalues, eigenvectors = torch.linalg.eigh(loss_hessians)
    largest = eigenvalues.abs().amax().clamp_min(torch.finfo(torch.float64).tiny)
    zero = eigenvalues.shape[-1] * torch.finfo(outputs.dtype).eps * largest
    if (eigenvalues < -zero).any():
        raise ValueError(
            "the loss Hessian w.r.t. the outputs has negative eigenvalues (the loss is not convex "
            "in the outputs), so the GGN is indefinite and has no Gram-matrix form: use "
            "method='exact' or 'lanczos'"
        )
    eigenvalues = torch.where(eigenvalues > zero, eigenvalues, torch.zeros_like(eigenvalues))
    factors = eigenvectors * eigenvalues.sqrt().unsqueeze(1)  # [n, C, C], column k = s_ik
    keep = (eigenvalues > 0).any(dim=0)
    factors = factors[:, :, keep] * math.sqrt(scale)
    return factors.permute(2, 0, 1).reshape(-1, n, *out_shape).to(outputs.dtype)
