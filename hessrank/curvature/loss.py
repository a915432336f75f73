"""Output-side factors of the empirical Fisher and the GGN, derived from the loss and verified.

Both matrices are ``F F^T`` with columns ``J_i^T s_ik``: the vector-Jacobian product of sample
``i``'s outputs with a cotangent ``s_ik``. This module computes the cotangents, shape
``[K, n, *output_shape]``, from the batch loss ``L(f_1, ..., f_n)`` itself; nothing about the
loss's reduction is assumed:

- **GGN** (``K = C'``): ``GGN = J^T (d^2 L / df^2) J``. Where three Hessian-vector products of
  the loss *verify* that its curvature is a softmax cross-entropy's, ``a_r (diag(p_r) -
  p_r p_r^T)`` at every position (labels, smoothing, class weights, ``ignore_index`` and the
  reduction only set ``a_r``, which is read off the loss), the blocks are formed from that formula
  in float64: near a saturated softmax, blocks computed by differentiation round to negative
  eigenvalues. Otherwise the output Hessian is computed block by block (``C`` Hessian-vector
  products, with the same unit vector in every sample's block), then verified to be
  block-diagonal per sample with one random product. The blocks are factored
  ``B_i = sum_k s_ik s_ik^T`` in float64. ``C' <= C``: columns that are zero for every sample
  (the softmax shift of cross-entropy) are dropped.
- **Empirical Fisher** (``K = 1``): the loss must be a weighted sum ``L = sum_i a_i l_i`` of
  per-sample losses ``l_i = loss_fn(f_i[None], y_i[None])`` (the loss function applied to one
  sample alone) with constant weights ``a_i >= 0``. The weights are read off the gradients,
  ``dL/df_i = a_i dl_i/df_i``; that identity is *verified* for every sample to the rounding of
  the batch's gradient, and the weights to be the same with the outputs' rows moved one sample
  on (a function of a sum, RMSE or ``log`` of a mean, has weights that vary with the outputs).
  The EF is ``sum_i a_i g_i g_i^T`` (``g_i`` the gradient of ``l_i``), so ``s_i = sqrt(a_i)
  dl_i/df_i``. Mean reduction: ``a_i = 1/n``; sum: ``a_i = 1``; class weights with mean
  reduction: ``a_i = w_{y_i} / sum_j w_{y_j}``; an ignored sample, or one whose gradient is
  within the batch gradient's rounding: ``a_i = 0``.

A loss that also depends on the parameters directly (an L2 term) has no such factors: refused,
naming the parameters.
"""

from __future__ import annotations

import copy
import math
import numbers
from collections import ChainMap
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, TypeGuard, TypeVar

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import vmap
from torch.utils._pytree import tree_flatten, tree_map

from hessrank.curvature.row_gram import row_norms
from hessrank.curvature.saturation import saturation_safe
from hessrank.guard import VMAP_FALLBACK_WARNING, OwnMode, raise_if_signalled, warnings_ignored
from hessrank.problem import (
    LossFn,
    agreement_tolerance,
    broadcast_hint,
    dtype_name,
    evaluate_loss,
    listed_names,
    loss_modified_in_place_error,
    nonfinite_entry,
    output_gradient,
    refuse_not_sample_first,
    without_second_derivative,
)

_Result = TypeVar("_Result")


def direct_parameter_names(loss_fn: LossFn, outputs: Tensor, targets: Tensor,
                           params: Sequence[Tensor], names: Sequence[str]) -> list[str]:
    """Names of the parameters the loss uses other than through the model's outputs (an L2 term).

    One backward pass of the loss alone, on detached outputs.
    """
    leaf = outputs.detach().requires_grad_(True)
    value = evaluate_loss(loss_fn, leaf, targets, finite=False)
    if not value.requires_grad:
        return []
    # (retained: a term the forward stored on the model shares the caller's forward graph,
    # which exact's float32 trials then differentiated freed; probe 228)
    pieces = torch.autograd.grad(value, list(params), allow_unused=True, retain_graph=True)
    return [name for name, piece in zip(names, pieces) if piece is not None]


def check_no_parameter_terms(
    loss_fn: LossFn, outputs: Tensor, targets: Tensor, params: Sequence[Tensor],
    names: Sequence[str], method: str,
) -> None:
    """Raise if the loss depends on the parameters other than through the model's outputs.

    Raises:
        ValueError: naming the parameters the loss uses directly.
    """
    direct = direct_parameter_names(loss_fn, outputs, targets, params, names)
    if direct:
        raise ValueError(
            f"loss_fn uses the parameters directly ({listed_names(direct)}), e.g. an L2 / "
            "L2-Init term, or a term the forward stores on the model for the loss to add (a "
            f"VAE's KL, an auxiliary load-balancing loss): the {method} is defined for a loss "
            "of the model's outputs and has no per-sample factors for such a term. Pass the "
            "data term alone as loss_fn (the "
            "regulariser's own Hessian is known in closed form, e.g. 2*lambda*I for "
            "lambda*||theta||^2), or use "
            "method='exact' or 'lanczos', which include it"
        )


def _sample_gradients(loss_fn: LossFn, outputs: Tensor, targets: Tensor) -> Tensor:
    """``[n, *out]``: gradients of ``l_i = loss_fn(f_i[None], y_i[None])`` w.r.t. ``f_i``.

    The ``n`` losses are evaluated under ``vmap`` (each sees its own sample alone, as
    ``loss_fn`` would) and differentiated by one backward pass of their sum, which is
    ``dl_i/df_i`` in row ``i``; this costs a fraction of ``vmap(grad(...))``'s transforms (a
    per-token loss over GPT's 4.2M logits: 11 against 26 ms). Where ``vmap`` cannot batch the
    loss, or a sample's loss is not a scalar, one sample at a time.
    """
    def sample_loss(f: Tensor, y: Tensor) -> Tensor:
        return loss_fn(f.unsqueeze(0), y.unsqueeze(0))

    leaf = outputs.detach().requires_grad_(True)
    with warnings_ignored(VMAP_FALLBACK_WARNING):
        try:
            losses = vmap(sample_loss)(leaf, targets)
        except Exception as error:  # noqa: BLE001 - vmap raises many types on code it cannot batch
            raise_if_signalled(error)
            losses = None
        if isinstance(losses, Tensor) and losses.shape == outputs.shape[:1]:
            if not losses.requires_grad:
                return torch.zeros_like(outputs)
            (gradient,) = torch.autograd.grad(losses.sum(), leaf, allow_unused=True)
            return torch.zeros_like(outputs) if gradient is None else gradient.detach()
    rows = []
    for i in range(outputs.shape[0]):
        f = outputs[i : i + 1].detach().requires_grad_(True)
        try:
            value = loss_fn(f, targets[i : i + 1])
            # a constant without a graph: the sample's loss does not use its outputs (all its
            # targets ignored, in a loss that returns outputs.new_zeros(()) then)
            (row,) = (torch.autograd.grad(value, f, allow_unused=True) if value.requires_grad
                      else (None,))
        except Exception as error:  # noqa: BLE001 - any failure on one sample
            raise_if_signalled(error)
            if i:  # (the earlier samples ran alone: not a dimension squeezed away)
                raise ValueError(
                    f"loss_fn ran on sample 0 alone but not on sample {i} ({error}): its "
                    "per-sample values depend on the batch (a contrastive loss over the "
                    "batch's own similarities couples the samples), and the empirical Fisher "
                    "needs per-sample losses; use method='exact' or 'lanczos'") from error
            hint = _one_sample_hint(loss_fn, outputs, targets)
            raise ValueError(
                f"loss_fn cannot be evaluated on one sample ({error}){hint}: the empirical "
                "Fisher needs per-sample losses; use method='ggn', 'exact' or 'lanczos'"
            ) from error
        rows.append(torch.zeros_like(f) if row is None else row.detach())
    return torch.cat(rows)


def _one_sample_hint(loss_fn: LossFn, outputs: Tensor, targets: Tensor) -> str:
    """Where ``loss_fn`` runs on two samples and not on one: most likely it squeezes the batch
    dimension away (``out.squeeze()``, a common idiom; probe 202), and the hint says so."""
    if outputs.shape[0] < 2:
        return ""
    try:
        with torch.no_grad():
            loss_fn(outputs[:2].detach(), targets[:2])
    except Exception as error:  # noqa: BLE001 - then it is not the one sample's shape
        raise_if_signalled(error)
        return ""
    return (" though it can on two: a loss that squeezes its outputs (out.squeeze()) drops "
            "one sample's batch dimension too; squeeze only the dimension meant "
            "(out.squeeze(-1))")


class _Reading(NamedTuple):
    """Per-sample weights read off the loss's gradients (:func:`_read_weights`), each ``[n]``
    but ``sample_grads`` ``[n, size]``."""

    weights: Tensor  # a_i, 0 where not read
    uncertainty: Tensor  # of a_i, inf where not read
    sample_grads: Tensor  # dl_i/df_i, flattened
    mismatch: Tensor  # ||dL/df_i - a_i dl_i/df_i|| / R, passing <= 1
    finite: Tensor  # whether dL/df_i is finite (a row that is not is not read)


def _read_weights(loss_fn: LossFn, outputs: Tensor, targets: Tensor,
                  sample_grads: Tensor | None = None,
                  precision: torch.dtype | None = None) -> _Reading | None:
    """The weights ``a_i`` read off ``dL/df_i = a_i dl_i/df_i`` at ``outputs``, verified to the
    rounding of the batch's gradient, and their uncertainty; None where the loss does not
    depend on the outputs. ``sample_grads``: the ``dl_i/df_i`` at these outputs where already
    known (``[n, size]``), else computed. ``precision``: the dtype whose rounding the loss's
    gradients carry, where not the outputs' (a float64 model's loss that computes in float32
    inside and cannot be widened, :func:`float64_loss`).

    Rounding: where the batch and the single-sample gradients are computed by different kernels
    (``nn.BCEWithLogitsLoss``'s fused backward against its batched decomposition), every entry
    of each differs from the other by the rounding of the terms it is computed from
    (``sigmoid(z)`` and ``y``, of order one, times the weight) rather than of its own value, which
    near saturation is far smaller. So the mismatch ``||dL/df_i - a_i dl_i/df_i||`` is measured
    against ``R = tol * M``: ``M`` the largest entry of the batch's gradient (over all samples),
    ``tol`` the agreement tolerance times ``sqrt(size of f_i)`` (an error of that rounding in
    every entry of ``f_i``). A sample with ``||dL/df_i|| <= R`` passes by construction (the
    residual of a projection is at most the vector) and its weight cannot be read: it gets
    ``a_i = 0``, as does a sample without gradient, and its term ``a_i g_i g_i^T``, at the
    computation's rounding floor either way, is left out. A coupled loss fails on the samples
    that carry its gradient.

    Returns:
        The reading, or None where ``dL/df`` is None (the loss does not use the outputs).
    """
    leaf = outputs.detach().requires_grad_(True)
    try:
        (batch_grad,) = torch.autograd.grad(evaluate_loss(loss_fn, leaf, targets, finite=False),
                                            leaf, allow_unused=True)
    except RuntimeError as error:  # (the first differentiation of the loss in the EF)
        named = loss_modified_in_place_error(error)
        if named is None:
            raise
        raise named from error
    if batch_grad is None:
        return None
    batch_grad = batch_grad.detach()
    n = outputs.shape[0]
    if sample_grads is None:
        sample_grads = _sample_gradients(loss_fn, outputs.detach(), targets)
    flat_batch, flat_sample = batch_grad.reshape(n, -1), sample_grads.reshape(n, -1)
    tolerance = agreement_tolerance(precision or outputs.dtype) * math.sqrt(flat_batch.shape[1])
    tiny = torch.finfo(outputs.dtype).tiny
    finite = torch.isfinite(flat_batch).all(dim=1)
    flat_batch = torch.where(finite[:, None], flat_batch, 0.0)
    # Each side in units of its largest entry (a power of two: exact), the weights and their
    # uncertainties in the batch's until the end, so that no square or product below leaves the
    # range: a loss scaled by 1e-21 (or 1e21) had them flushed to zero (or overflow) in float32,
    # and was refused as one whose samples interact. (Summed in float64 instead, the call's loss
    # side took 1.6 times as long on GPT's per-token logits.)
    largest = float(flat_batch.abs().amax()) if flat_batch.numel() else 0.0
    unit = binade(largest)
    flat_batch /= unit
    rounding = max(tolerance * largest / unit, tiny)  # R
    batch_norm = row_norms(flat_batch)
    sample_unit = binade(float(flat_sample.abs().amax()) if flat_sample.numel() else 0.0)
    scaled_sample = flat_sample / sample_unit
    # (the samples' norms in their unit: squared as they are, a float64 loss scaled by 1e-160
    # or 1e160 left float64's range, and was refused as one whose samples interact; probe 170)
    scaled_norm = row_norms(scaled_sample).clamp_min(torch.finfo(torch.float64).tiny)
    read = batch_norm > rounding  # none where the batch's gradient is zero
    weights = ((flat_batch * scaled_sample).sum(dim=1).double() / (scaled_norm * scaled_norm)
               / sample_unit)
    residual = row_norms(flat_batch - weights.to(flat_batch.dtype)[:, None] * flat_sample)
    # a sample alone may have no defined loss (all its targets ignored): only read ones count
    mismatch = torch.where(read, torch.where(torch.isfinite(weights), residual.double(),
                                             math.inf), 0.0)
    weights = torch.where(read, weights, 0.0)
    # errors of R in dL/df_i and of tol * (largest entry of a read dl_j/df_j) in dl_i/df_i
    sample_rounding = tolerance * float(torch.where(read[:, None], flat_sample.abs(), 0.0).amax())
    spread = (rounding + weights * sample_rounding) / scaled_norm / sample_unit
    uncertainty = torch.where(read, spread, math.inf)
    return _Reading((weights * unit).to(outputs.dtype), (uncertainty * unit).to(outputs.dtype),
                    flat_sample, (mismatch / rounding).to(outputs.dtype), finite)


#: Peak bytes of :func:`fisher_cotangents`, in copies of the outputs: the batch's and the samples'
#: loss gradients, their graphs and the cotangents. Measured 7-10 (cross-entropy over 10 to
#: 20000 classes, GPT's per-token logits), 15 when the weights are read again in float64.
FISHER_LOSS_SIDE_COPIES = 16


def fisher_cotangents(loss_fn: LossFn, outputs: Tensor, targets: Tensor,
                      notes: list[str]) -> tuple[Tensor, Tensor]:
    """``s_i = sqrt(a_i) dl_i/df_i`` (see the module docstring), verified, and the weights.

    Two checks, both on the loss alone (no model pass): the gradient identity
    ``dL/df_i = a_i dl_i/df_i`` for every sample, to the rounding of the batch's gradient
    (:func:`_read_weights`); and weights that do not depend on the outputs. The second catches
    a nonlinear function of a sum of per-sample losses (RMSE ``sqrt(mean)``, ``log`` or a power
    of the mean), whose gradient passes the first with ``a_i`` varying with the outputs, and,
    with one output per sample (where the first is vacuous), a loss that uses a per-sample
    tensor captured from outside: the weights are read again with the outputs' rows moved one
    sample on (``f_{i+1}`` with ``y_i``: each row stays a valid output, so the loss's domain
    is kept) and must agree within their uncertainty wherever both are read; read with the
    outputs and targets moved together, they must move with them (a per-sample weight tensor
    captured from outside, which broadcasts against one sample's loss alone). Mean, sum, class
    weights and ``ignore_index`` set ``a_i`` from the targets and the batch only.

    Below float64 the weights and gradients are read again in float64 where the first
    reading's rounding shows (:func:`_rounding_shows`); where the loss cannot be evaluated in
    float64, the first reading stands, with a note in ``notes``.

    Returns:
        Cotangents ``[1, n, *out]`` and the per-sample weights ``a_i`` ``[n]`` (0 for samples
        whose gradient is zero or within the batch's rounding, see :func:`_read_weights`).

    Raises:
        ValueError: the loss is not a non-negatively weighted sum of per-sample losses with
            weights independent of the outputs.
    """
    refuse_not_sample_first(outputs, targets.shape[0] if targets.dim() else 1)
    loss_fn, precision = float64_loss(loss_fn, outputs, targets, notes)
    if outputs.dtype == torch.float64:
        loss_fn = saturation_safe(loss_fn)
    read = _read_weights(loss_fn, outputs, targets, precision=precision)
    if read is None:
        return (torch.zeros(1, *outputs.shape, dtype=outputs.dtype, device=outputs.device),
                torch.zeros(outputs.shape[0], dtype=outputs.dtype, device=outputs.device))
    dtype = outputs.dtype
    # float64 decides where float32's reading is refused too: a saturated BCEWithLogitsLoss's
    # fused batch gradient rounds s - 1 to 0 where the samples' own do not, every weight
    # unread, and was refused as a loss whose samples interact (probe 125)
    refused = bool((read.mismatch > 1).any())
    reread = dtype != torch.float64 and (refused or _unread_terms_matter(read, dtype))
    if dtype != torch.float64 and not reread and not bool((read.weights > 0).any()):
        largest = vanished_gradient(loss_fn, outputs, targets, read.sample_grads)
        if largest > 0:  # (an EF of 1e-93 had been returned as a zero matrix, every rank 0;
            # probe 157. A data set's batch so saturated adds nothing, as its samples add
            # nothing beside others in one batch, where they are not read either)
            raise ZeroCurvatureError(
                f"every sample's loss gradient w.r.t. the outputs is zero in "
                f"{dtype_name(dtype)}, not in float64 (up to {largest:.3g}: a softmax or a "
                f"sigmoid saturated past {dtype_name(dtype)}'s range), so the empirical Fisher "
                "vanishes here. Analyse a float64 copy of the model "
                "(copy.deepcopy(model).double(), float64 inputs)")
    if reread or (dtype != torch.float64
                  and _rounding_shows(loss_fn, outputs, targets, read, notes)):
        try:
            loss_fn = saturation_safe(float64_twin(loss_fn, outputs, targets))
            outputs = outputs.double()
            precise = _read_weights(loss_fn, outputs, targets)
        except Exception as error:  # noqa: BLE001 - any failure of the loss in float64
            raise_if_signalled(error)
            if refused:  # float32's refusal stands, the cause of a cast named
                _refuse_half_precision_loss(loss_fn, outputs, targets, "its per-sample gradients",
                                            read.mismatch)
                raise _interacting_samples_error(read.mismatch, "") from error
            raise ValueError(
                f"the weights of some samples cannot be read in {dtype} (their gradient in the "
                "batch loss is within its rounding, yet their own gradients are not small: "
                f"many outputs per sample), and loss_fn cannot be read in float64 instead: "
                f"{error}; analyse a float64 copy of the model, or use method='ggn'") from error
        assert precise is not None  # the loss used the outputs in the first reading
        # (later readings carry float64's rounding too: at the first reading's, saturated
        # samples the float64 reading read went unread, and their weights seemed to move)
        read, precision = precise, torch.float64
    weights, mismatch = read.weights, read.mismatch
    if not bool(read.finite.all()):
        sample = int((~read.finite).nonzero()[0])
        # (a NaN target the loss masks by torch.where, whose gradient still meets it, had gone
        # unnamed; probe 225)
        entry = nonfinite_entry([(f"targets[{sample}]", targets[sample])])
        raise ValueError(
            f"the loss's gradient w.r.t. the outputs is not finite for sample {sample}"
            + ("" if entry is None else
               f" ({entry}: a loss that masks a missing target must keep it out of the gradient "
               "too, (f - t.nan_to_num()) ** 2 * seen, not torch.where(seen, (f - t) ** 2, 0))")
            + ": the empirical Fisher of these outputs is undefined; check loss_fn at them (a "
            "log of zero, a division by zero)")
    if bool((mismatch > 1).any()):
        _refuse_half_precision_loss(loss_fn, outputs, targets, "its per-sample gradients",
                                    mismatch)
        raise _interacting_samples_error(mismatch, "")
    # before the sign: weights that vary with the outputs can come out negative (outputs [n, 1]
    # against targets [n] under MSELoss broadcast to an [n, n] loss were said to weigh a
    # sample negatively)
    try:
        _check_constant_weights(loss_fn, outputs, targets, read, precision)
    except ValueError as error:
        _refuse_half_precision_loss(loss_fn, outputs, targets, "its per-sample weights")
        hint = broadcast_hint(outputs, targets)
        if hint is None:
            raise
        raise ValueError(f"{error}. {hint}") from None
    if (weights < 0).any():
        i = int((weights < 0).nonzero()[0])
        raise ValueError(
            f"loss_fn weighs sample {i} negatively ({float(weights[i]):.3g}): the empirical "
            "Fisher sum_i a_i g_i g_i^T needs a_i >= 0; use method='exact' or 'lanczos'"
        )
    if read.sample_grads.dtype == torch.float64:
        samples = torch.nonzero(weights > 0).flatten()
        cancelled = _cancelled_target_error(loss_fn, outputs, targets,
                                            read.sample_grads[samples], samples)
        if cancelled is not None:
            raise cancelled
    factors = torch.where(weights[:, None] > 0, read.sample_grads * weights.sqrt()[:, None], 0.0)
    _check_squares_in_range(factors, dtype)
    return factors.reshape(1, *outputs.shape).to(dtype), weights.to(dtype)


def binade(largest: float) -> float:
    """The power of two at or above ``largest`` (1 for 0 or a value that is not finite)."""
    return 2.0 ** math.frexp(largest)[1] if 0 < largest < math.inf else 1.0


def _check_squares_in_range(factors: Tensor, dtype: torch.dtype) -> None:
    """Raise where the largest factor's square leaves ``dtype``'s range altogether: the EF's
    entries are products of two factors (times the model's Jacobians, which can make up some
    of the difference), and below the smallest subnormal they flush to zero (a loss scaled by
    1e-24: every eigenvalue 0, every rank 0), above the largest value they overflow. (At the
    normal range's edge instead, EFs of 1e-37 that float32 computes to 2e-7 were refused;
    probe 69.)"""
    largest = float(factors.abs().amax()) if factors.numel() else 0.0
    info = torch.finfo(dtype)
    smallest = info.smallest_normal * info.eps  # the smallest subnormal
    if largest == 0.0 or math.sqrt(smallest) <= largest <= math.sqrt(info.max):
        return
    side, limit = (("under", smallest) if largest < 1 else ("over", info.max))
    raise ValueError(
        f"the samples' loss gradients w.r.t. the outputs reach at most {largest:.3g}: the "
        f"empirical Fisher's entries, products of two of them, fall {side} {dtype}'s range "
        f"({limit:.3g}) and would be lost. {rescaling_advice(-math.frexp(largest)[1], dtype)}")


def subnormal_scale_error(scale: float, dtype: torch.dtype, source: str,
                          what: str = "largest eigenvalue", remedy: str | None = None
                          ) -> ValueError | None:
    """The error for a curvature whose ``scale`` (its largest ``|eigenvalue|``, or ``what``
    else) is below ``dtype``'s normal range, if it is: its products were subnormal numbers,
    whose rounding is absolute (``eps`` of the smallest normal number), so its eigenvalues and
    ranks would be mostly rounding. A float32 ``fisher_lanczos`` of a loss scaled by 1e-20 had
    reported an eigenvalue of -0.98 of the top, its ``fisher`` eigenvalues off by 8e-3 of it
    at 1e-21, and ``exact`` of one scaled by 2^-136 was refused as a wrong second derivative
    (probe 157). ``source`` (``"hessian"``, ``"ggn"``, ``"fisher"``) sets the scale advised:
    the Hessian and the GGN scale with the loss, the empirical Fisher with its square;
    ``remedy``, where given, replaces that advice."""
    info = torch.finfo(dtype)
    if not 0 < scale < info.smallest_normal:
        return None
    power = -math.frexp(scale)[1] // (2 if source == "fisher" else 1)
    return ValueError(
        f"the {source} matrix's {what} is {scale:.3g}, below {dtype_name(dtype)}'s normal range "
        f"({info.smallest_normal:.3g}): its products were subnormal numbers, rounded to "
        f"{info.smallest_normal * info.eps:.2g} whatever their size "
        f"({info.smallest_normal * info.eps / scale:.1g} of it and more of its smaller "
        f"eigenvalues), so its spectrum and ranks would be rounding. "
        f"{rescaling_advice(power, dtype) if remedy is None else remedy}")


def vanished_gradient(loss_fn: LossFn, outputs: Tensor, targets: Tensor,
                      gradient: Tensor) -> float:
    """The largest entry of the loss's float64 gradient w.r.t. ``outputs`` (below float64),
    where ``gradient``, the loss's in their dtype (the batch's or the samples'), is zero in
    every finite entry: a softmax or sigmoid saturated past the dtype's range, whose gradients
    of 1e-48 float32 rounds to 0 (probes 157, 162). 0 where it is not, where float64's is zero
    too (a fit, every target ignored), or where the loss has no float64 twin (nothing to tell
    it by)."""
    if outputs.dtype == torch.float64 or bool((gradient[torch.isfinite(gradient)] != 0).any()):
        return 0.0  # (NaN read as nonzero had hidden a gradient of zero; probe 164)
    try:
        wide = _in_float64(lambda twin, leaf, labels: output_gradient(saturation_safe(twin), leaf,
                                                                     labels),
                           loss_fn, outputs, targets)
    except ValueError as failure:
        raise_if_signalled(failure)
        return 0.0
    return float(wide.abs().amax()) if wide.numel() else 0.0


def vanished_curvature_note(loss_fn: LossFn, outputs: Tensor, targets: Tensor,
                            source: str) -> str | None:
    """What a curvature computed as exactly zero at ``outputs`` (below float64) may be, where
    the loss's gradient w.r.t. them vanishes in their dtype alone (:func:`vanished_gradient`):
    a softmax or sigmoid saturated past the dtype's range, whose curvature the dtype cannot
    hold (a float32 classifier at logit margins past 104 had ``exact`` and ``lanczos`` srank
    0, no word, where ``fisher`` and ``ggn`` refuse; probe 162), or a curvature that is zero
    in float64 too (a linear model under a loss linear in its outputs; refused as the first,
    wrongly, probe 164): a note, and the float64 copy tells. None where it does not."""
    if outputs.dtype == torch.float64:
        return None
    largest = vanished_gradient(loss_fn, outputs, targets,
                                output_gradient(loss_fn, outputs, targets))
    if largest == 0.0:
        return None
    name = dtype_name(outputs.dtype)
    return (f"the {source} matrix is zero in {name}, and so is the loss's gradient w.r.t. the "
            f"outputs, which float64 reads as up to {largest:.3g}: a softmax or a sigmoid "
            f"saturated past {name}'s range has a curvature {name} cannot hold, so every rank "
            "here may be 0 for a matrix that is not; the same call on a float64 copy of the "
            "model (copy.deepcopy(model).double(), float64 inputs) tells")


def rescaling_advice(power: int, dtype: torch.dtype) -> str:
    """The remedies for a curvature outside ``dtype``'s normal range that a loss scaled by
    ``2**power`` brings into it: that scale where ``dtype`` holds it (a loss saturated past
    float32's range needed 2**160, which overflows the loss; probe 157), and a float64 copy."""
    if dtype == torch.float64:  # (a float64 model had been told to analyse a float64 copy)
        scale = (f" (loss_fn = lambda f, y: 2.0**{power} * loss(f, y))"
                 if abs(power) < math.log2(torch.finfo(dtype).max) - 8 else "")
        return f"Ranks are scale-free: scale the loss nearer to 1{scale}"
    float64_copy = ("analyse a float64 copy of the model (copy.deepcopy(model).double(), float64 "
                    "inputs)")
    if abs(power) >= math.log2(torch.finfo(dtype).max) - 8:  # (room for the loss's own size)
        return float64_copy[0].upper() + float64_copy[1:]
    return (f"Ranks are scale-free: scale the loss (loss_fn = lambda f, y: 2.0**{power} * "
            f"loss(f, y)), or {float64_copy}")


def float64_twin(loss_fn: LossFn, outputs: Tensor, targets: Tensor) -> LossFn:
    """``loss_fn`` for float64 copies of ``outputs`` (in a lower precision), checked to be the
    same function there, computed in float64: a loss module holding floating tensors of another
    dtype (a class ``weight``, a ``pos_weight``) as a float64 deep copy (one that cannot be
    copied, a lock in it, as it is, for :class:`_Promoting` below), anything else as it is;
    the torch functions it calls on the float64 outputs must match, call by call, those it
    calls on ``outputs`` (:class:`_Calls`): the same numbers among their arguments, the same
    values of the small tensors not computed from the outputs (to ``outputs``' agreement
    tolerance), and results at least as precise as the outputs. A constant chosen by the
    outputs' dtype (a clamp at ``torch.finfo(outputs.dtype).eps``, a tensor from a table keyed
    by dtype) or a branch on it makes another function in float64, whose curvature is not the
    loss's (an eps-clamped log-loss's Hessian came out 45 % high, its srank 15 for 8; probe
    116).

    Floating targets are widened to float64 too, by the twin itself (the same values: a
    ``nn.HuberLoss``, whose backward takes no mixed dtypes, had failed on float32 targets with
    float64 outputs and run unwidened, with a note of failure).

    Where the loss as it is fails in float64 or computes in float32 there, it is tried again
    under :class:`_Promoting`, which widens what it calls to float64 (a captured float32 tensor
    such as a class weight, a cast back to float32 such as ``F.cross_entropy(f.float(), y)``:
    the same function, exactly, computed in float64); both had left the EF's float32 reading of
    a saturated classifier standing, its top eigenvalue 2x high without a word (probe 117).
    Two to four evaluations of the loss without a graph.

    Raises:
        ValueError: the loss fails on either, is another function in float64, computes in a
            lower precision there (a cast to float16) or, promoted, would write in place into
            a tensor of a lower precision (:class:`_Promoting`); naming why, in the words of the
            loss as it is.
    """
    twin = loss_fn
    if isinstance(loss_fn, torch.nn.Module) and any(
            t.is_floating_point() and t.dtype != torch.float64
            for t in [*loss_fn.parameters(), *loss_fn.buffers()]):
        try:
            twin = copy.deepcopy(loss_fn).double()
        except Exception as error:  # noqa: BLE001 - (a lock in it) the module as it is, promoted below
            raise_if_signalled(error)
            twin = loss_fn
    try:
        given = _calls_of(loss_fn, outputs, targets)
    except Exception as error:  # noqa: BLE001 - any failure: no float64 twin
        raise_if_signalled(error)
        raise ValueError(float64_failure(error)) from error
    widened_targets = targets.double() if targets.is_floating_point() else targets
    why = _twin_failure(twin, outputs, widened_targets, given, promote=False)
    if why is not None:
        promoted_why = _twin_failure(twin, outputs, widened_targets, given, promote=True)
        if promoted_why is not None:
            raise ValueError(why if promoted_why == why
                             else f"{why}; with its calls widened, {promoted_why}")
        twin = _promoting(twin)
    return _widening_targets(twin) if targets.is_floating_point() else twin


def loss_modules(loss_fn: LossFn) -> list[nn.Module]:
    """The modules ``loss_fn`` is or closes over (a float64 twin inside :func:`_promoting`'s and
    :func:`_widening_targets`'s wrappers), whose tensors exist before the loss runs."""
    found: list[nn.Module] = []
    pending: list[Any] = [loss_fn]
    seen: set[int] = set()
    while pending:
        item = pending.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, nn.Module):
            found.append(item)
            continue
        for cell in getattr(item, "__closure__", None) or ():
            try:
                content = cell.cell_contents
            except ValueError:  # (an empty cell)
                continue
            if callable(content):
                pending.append(content)
    return found


def _promoting(loss_fn: LossFn) -> LossFn:
    """``loss_fn`` run under :class:`_Promoting`."""
    def promoted(outputs: Tensor, targets: Tensor) -> Tensor:
        with _Promoting():
            return loss_fn(outputs, targets)
    return promoted


def _widening_targets(loss_fn: LossFn) -> LossFn:
    """``loss_fn`` given its floating targets in float64."""
    def widening(outputs: Tensor, targets: Tensor) -> Tensor:
        return loss_fn(outputs, targets.double() if targets.is_floating_point() else targets)
    return widening


def _twin_failure(twin: LossFn, outputs: Tensor, targets: Tensor, given: _Calls,
                  promote: bool) -> str | None:
    """Why ``twin`` on float64 ``outputs`` (and ``targets``, floating ones widened) is not the
    loss whose calls on ``outputs`` are ``given`` (see :func:`float64_twin`), run under
    :class:`_Promoting` with ``promote``; None where it is."""
    high = outputs.detach().to(torch.float64, copy=True)  # (a loss may write into it)
    try:
        with torch.no_grad(), _Calls(high, promote) as widened:
            twin(high, targets)
    except _Unpromotable as error:
        return str(error)
    except Exception as error:  # noqa: BLE001 - any failure: no float64 twin
        raise_if_signalled(error)
        return float64_failure(error)
    if widened.lowered:
        name = dtype_name(widened.lowered)
        return (f"it computes in {name} inside (a cast such as {_cast_call(widened.lowered)} or "
                f"dtype=torch.{name} in the loss), whatever the outputs' precision")
    if given.lowest is not None and kept_cast(given.lowest) and widened.lowest is None:
        # (torch.autocast casts float32 alone: in float64 its bfloat16 rounding was dropped,
        # and the loss called the same function; probe 121)
        return (f"it computes in {dtype_name(given.lowest)} inside where float64 does not "
                "(under torch.autocast, which casts float32 alone)")
    if not _same_calls(given.calls, widened.calls, agreement_tolerance(outputs.dtype)):
        return ("it computes another function in float64 (a constant or a branch that depends "
                "on the outputs' dtype, such as torch.finfo(outputs.dtype).eps)")
    return None


def _in_float64(compute: Callable[[LossFn, Tensor, Tensor], _Result], loss_fn: LossFn,
                outputs: Tensor, targets: Tensor) -> _Result:
    """``compute(the loss's float64 twin, float64 outputs, targets)``.

    Raises:
        ValueError: the loss has no float64 twin (:func:`float64_twin`) or ``compute`` fails
            on it, naming why.
    """
    twin = float64_twin(loss_fn, outputs, targets)
    try:
        return compute(twin, outputs.detach().double(), targets)
    except Exception as error:  # noqa: BLE001 - any failure of the loss in float64
        raise_if_signalled(error)
        raise ValueError(float64_failure(error)) from error


def _in_float64_on(compute: Callable[[LossFn, Tensor, Tensor], _Result], loss_fn: LossFn,
                   outputs: Tensor, targets: Tensor, samples: Tensor
                   ) -> tuple[_Result, Tensor, bool]:
    """:func:`_in_float64` on the ``samples`` (indices) of the batch alone, or on the whole
    batch where the loss fails on them alone: a loss holding a batch-sized tensor (per-sample
    weights) runs on its batch alone, and the float64 checks read on a part had been skipped,
    noted as float64's failure (the EF 20 % off, the GGN 9x; probe 172). Returns the result,
    the samples it read, and whether they are the whole batch in place of ``samples``.

    Raises:
        ValueError: as :func:`_in_float64`, where the loss fails on the whole batch too.
    """
    whole = torch.arange(len(outputs), device=outputs.device)
    if targets.shape[:1] != outputs.shape[:1]:
        # outputs whose rows are not the targets' (sequence-first, [T, n, V], whose loss
        # permutes them; the operator methods take them): read whole, rows had been taken from
        # both alike, an IndexError past the targets' (probe 201)
        return _in_float64(compute, loss_fn, outputs, targets), whole, True
    try:
        return _in_float64(compute, loss_fn, outputs[samples], targets[samples]), samples, False
    except ValueError as failure:
        raise_if_signalled(failure)
        if len(samples) == len(outputs) and bool((samples == whole).all()):
            raise
    return _in_float64(compute, loss_fn, outputs, targets), whole, True


def add_float64_note(notes: list[str], what: str, why: str, risk: str) -> None:
    """Add to ``notes`` (once) that ``what`` (stands in the outputs' precision, not in float64)
    since ``why``, with its ``risk`` near a saturated softmax and the remedy."""
    note = (f"{what}, since {why}: near a saturated softmax (probabilities within the dtype's "
            f"rounding of 1) {risk}; analyse a float64 copy of the model there, its loss "
            "computed in float64")
    if note not in notes:
        notes.append(note)


def float64_failure(error: Exception, where: str = "") -> str:
    """Why a loss has no float64 twin: it failed in float64 (``where``), with the error's type
    and first line."""
    return (f"it failed in float64{' ' + where if where else ''} ({type(error).__name__}: "
            f"{(str(error).splitlines() or [''])[0]})")


#: Tensors not computed from the outputs up to which :class:`_Calls` records their values (a
#: constant such as an eps or a class weight).
_CONSTANT_ENTRIES = 64


class _Promoting(OwnMode):
    """Runs every torch function in float64 where it is given less: floating tensors of a
    lower precision among its arguments (a captured float32 class weight) widened, a float32
    dtype among them (``.to(torch.float32)``, ``log_softmax(..., dtype=torch.float32)``) made
    float64, ``Tensor.float`` ``Tensor.double``, and a float32 result (a tensor made in the
    default dtype, ``torch.zeros(f.shape)``) widened. Widening is exact, so the function is the
    same; a cast to float16 or bfloat16 is kept (its rounding is part of the function). A call
    that writes in place into a tensor of a lower precision made elsewhere (``t[i] = ...``,
    ``t.add_(...)``, ``out=t`` on a captured float32 ``t``) raises :class:`_Unpromotable`:
    widened, it would write into a copy, which the loss's later calls do not read (a
    label-smoothed loss that scattered into a float32 tensor had been widened to its uniform
    part alone, its Hessian 10x off; probe 118)."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        return _promoted_call(func, args, kwargs or {})


class _Unpromotable(RuntimeError):
    """A call :class:`_Promoting` cannot widen: it writes in place into a tensor of a lower
    precision."""


#: The in-place operators whose first argument is written (``t += x`` calls ``__iadd__``).
_IN_PLACE_OPERATORS = frozenset(
    f"__i{name}__" for name in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow",
                                "matmul", "and", "or", "xor", "lshift", "rshift")) | {"__setitem__"}


def _lower_than_float64(value: object) -> TypeGuard[Tensor]:
    """Whether ``value`` is a floating tensor less precise than float64."""
    return isinstance(value, Tensor) and value.is_floating_point() and (
        torch.finfo(value.dtype).eps > torch.finfo(torch.float64).eps)


def _written(func: Any, args: Any, kwargs: dict[str, Any]) -> list[object]:
    """What ``func(*args, **kwargs)`` writes in place: its ``out=``, and the tensor of an
    in-place method (``add_``) or operator (``__iadd__``, ``__setitem__``)."""
    written = tree_flatten(kwargs.get("out"))[0]
    name = getattr(func, "__name__", "")
    if args and (name in _IN_PLACE_OPERATORS
                 or (name.endswith("_") and not name.startswith("__"))):
        written.append(args[0])
    return written


#: float32 named as a tensor type (``f.type(torch.FloatTensor)``, ``f.type("torch.FloatTensor")``)
#: and float64's name for it, for :meth:`Tensor.type`.
_FLOAT32_TYPES: dict[object, object] = {
    torch.FloatTensor: torch.DoubleTensor, "torch.FloatTensor": "torch.DoubleTensor",
    "torch.cuda.FloatTensor": "torch.cuda.DoubleTensor"}


def _promoted_call(func: Any, args: Any, kwargs: dict[str, Any]) -> Any:
    """``func(*args, **kwargs)`` as :class:`_Promoting` runs it, its result.

    Raises:
        _Unpromotable: the call writes in place into a tensor of a lower precision, or makes
            a float32 tensor of float64 ones in a way not widened here (its rounding would
            stay: ``f.type`` with a type's name had been taken for the same function, a float64
            model's EF 2e-7 off with a note saying it was widened; probe 121).
    """
    name = getattr(func, "__name__", func)
    lower = [value for value in _written(func, args, kwargs) if _lower_than_float64(value)]
    if lower:
        raise _Unpromotable(
            f"it writes in place into a {dtype_name(lower[0].dtype)} tensor made outside it "
            f"({name}), which cannot hold float64")

    def widened(value: object) -> object:
        if _lower_than_float64(value):
            return value.double()
        if value is torch.float32:
            return torch.float64
        if func is Tensor.type and isinstance(value, str | type):
            return _FLOAT32_TYPES.get(value, value)
        return value
    if func is Tensor.float:
        func = Tensor.double
    args, kwargs = tree_map(widened, args), tree_map(widened, kwargs)
    result = func(*args, **kwargs)
    if any(t.dtype == torch.float32 for t in _tensors(result)) and any(
            t.dtype == torch.float64 for t in _tensors((args, kwargs))):
        raise _Unpromotable(f"it casts float64 to float32 in a way not widened ({name})")
    return tree_map(lambda value: value.double() if isinstance(value, Tensor)
                    and value.dtype == torch.float32 else value, result)


class _Calls(OwnMode):
    """The torch functions a loss calls on ``outputs``, each with the :func:`_structure` of its
    arguments, where a tensor computed from the outputs (:attr:`derived`) is its shape alone and
    a small other one (a constant) its values too; and :attr:`lowered`, the first floating dtype
    less precise than the outputs' that a call returned (None where none did). With
    ``promote``, each call runs as :class:`_Promoting` runs it (recorded as called)."""

    def __init__(self, outputs: Tensor, promote: bool = False) -> None:
        super().__init__()
        self.eps = torch.finfo(outputs.dtype).eps
        self.promote = promote
        self.calls: list[tuple[object, object]] = []
        #: the tensors computed from the outputs, by id (held, so that no id is reused)
        self.derived: dict[int, Tensor] = {id(outputs): outputs}
        self.lowered: torch.dtype | None = None
        #: the least precise of them, where less precise than the outputs
        self.lowest: torch.dtype | None = None

    def __torch_function__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        # a tensor the call writes is its shape alone: its values before are not the call's
        # input (an uninitialised one's, torch.empty_like's for an index_copy_, differ between
        # evaluations: nn.AdaptiveLogSoftmaxWithLoss's float32 model had been refused its
        # float64 twin, its fisher 39 % off at a loss of 2e-12; probe 240)
        written = {id(t): t for t in _written(func, args, kwargs) if isinstance(t, Tensor)}
        self.calls.append((func, _structure((args, kwargs), ChainMap(written, self.derived))))
        from_outputs = any(id(t) in self.derived for t in _tensors((args, kwargs)))
        result = (_promoted_call(func, args, kwargs) if self.promote
                  else func(*args, **kwargs))
        if from_outputs:
            for tensor in _tensors(result):
                self.derived[id(tensor)] = tensor
                if tensor.is_floating_point() and torch.finfo(tensor.dtype).eps > self.eps:
                    self.lowered = self.lowered or tensor.dtype
                    if self.lowest is None or (torch.finfo(tensor.dtype).eps
                                               > torch.finfo(self.lowest).eps):
                        self.lowest = tensor.dtype
        return result


def _calls_of(loss_fn: LossFn, outputs: Tensor, targets: Tensor) -> _Calls:
    """The :class:`_Calls` of the loss as given on ``outputs``, evaluated without a graph."""
    # a copy (the very tensor _Calls follows): a loss that writes into its outputs (f /= 2)
    # had halved the model's, a float64 model's exact then the curvature of f / 4 (CI)
    low = outputs.detach().clone()
    with torch.no_grad(), _Calls(low) as calls:
        loss_fn(low, targets)
    return calls


def _tensors(value: object) -> list[Tensor]:
    """The tensors in ``value`` (containers searched)."""
    return [leaf for leaf in tree_flatten(value)[0] if isinstance(leaf, Tensor)]


def _structure(value: object, derived: Mapping[int, Tensor]) -> object:
    """``value`` without what a change of precision changes: a tensor computed from the
    outputs (``derived``) as its shape, any other as its shape and, up to
    :data:`_CONSTANT_ENTRIES` entries, its values; a floating dtype as ``"floating"``; numbers
    (NumPy's too) as Python numbers, strings and other dtypes as they are; containers element
    by element; any other object as its type's name."""
    if isinstance(value, Tensor):
        if id(value) not in derived and value.numel() <= _CONSTANT_ENTRIES:
            values = value.detach().to("cpu", torch.float64 if value.is_floating_point()
                                       or value.dtype == torch.bool else value.dtype)
            return ("constant", tuple(value.shape), tuple(values.flatten().tolist()))
        return ("tensor", tuple(value.shape), value.is_floating_point() or value.dtype)
    if isinstance(value, torch.dtype):
        return "floating" if value.is_floating_point else value
    if isinstance(value, list | tuple):
        return tuple(_structure(item, derived) for item in value)
    if isinstance(value, dict):
        return tuple((key, _structure(item, derived)) for key, item in value.items())
    if isinstance(value, np.ndarray) and value.size <= _CONSTANT_ENTRIES:
        return ("array", value.shape, tuple(np.asarray(value, dtype=float).flatten().tolist()))
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):  # (np.float32 and np.float64 alike; probe 117)
        return float(value)
    if value is None or isinstance(value, complex | str):
        return value
    return type(value).__name__


def _same_calls(first: object, second: object, rtol: float) -> bool:
    """Whether two :class:`_Calls` records (or parts of them) match, floats to ``rtol``."""
    if isinstance(first, float) and isinstance(second, float):
        return (first == second or (math.isnan(first) and math.isnan(second))
                or abs(first - second) <= rtol * max(abs(first), abs(second)))
    if isinstance(first, tuple | list) and isinstance(second, tuple | list):
        return len(first) == len(second) and all(
            _same_calls(a, b, rtol) for a, b in zip(first, second))
    return type(first) is type(second) and first == second


def _unread_terms_matter(reading: _Reading, dtype: torch.dtype) -> bool:
    """Whether a sample left unread (its gradient in the batch loss within the batch gradient's
    rounding, :func:`_read_weights`) has a gradient of its own large enough that its term could
    show in the result: above ``sqrt(eps)`` of the largest sample's. The rounding bound grows
    with the number of outputs per sample (``sqrt`` of it), so with a large vocabulary it can
    exceed samples whose terms count (classes 20000: 1.7 % of the largest entry, which a sample
    predicted at p = 0.99 is below); in float64 it is 2^29 times smaller."""
    unread = reading.finite & torch.isinf(reading.uncertainty)
    if not bool(unread.any()):
        return False
    norms = reading.sample_grads.norm(dim=1)
    largest = float(norms.max())
    return bool((norms[unread] > math.sqrt(torch.finfo(dtype).eps) * largest).any())


def _first_samples(chosen: Tensor) -> Tensor:
    """Indices of the first :data:`CONSTANCY_SAMPLES` samples ``chosen`` (``[n]``, bool) marks:
    the head the float64 checks read."""
    return torch.nonzero(chosen).flatten()[:CONSTANCY_SAMPLES]


#: The largest share of a sample's largest float64 gradient entry that the entries' sum over
#: the class dimension may reach, for a loss invariant to shifting every class's output alike:
#: the saturation-safe log-softmax's readings sum to rounding (about 1e-16).
SHIFT_SUM_SHARE = 1e-6


def _cancelled_target_error(loss_fn: LossFn, outputs: Tensor, targets: Tensor,
                            gradients: Tensor, read: Tensor) -> ValueError | None:
    """The error for float64 per-sample gradients ``gradients`` (``[k, size]`` for the samples
    ``read`` ``[k]`` of ``outputs`` and ``targets``) whose entries do not sum to zero over a
    class dimension (the last or the second), beyond :data:`SHIFT_SUM_SHARE` of their largest,
    on the :data:`CONSTANCY_SAMPLES` samples that weigh most in the EF (largest entries; of
    those, the ones above ``sqrt(eps)`` of the largest: a cancelled sample among lighter ones
    holds rounding of the EF's scale, the whole batch saturated alike shows it), where the
    loss's float64 curvature there is a softmax cross-entropy's over that dimension
    (:func:`_softmax_over`, on the samples furthest off): a cross-entropy written
    ``logsumexp(f) - f_y`` or ``-log(softmax(f))`` forms ``p_y - 1`` as a difference, 0 past
    logit margins of about 40 even in float64 (the saturation-safe derivatives reach only
    ``F.log_softmax`` and ``F.cross_entropy`` with class indices), and the EF came out 9x too
    small, in float64 too (probe 172). Shift-invariance read instead (at a random point, or as
    a zero Hessian along the shift) had refused a cross-entropy of clamped logits, and a
    cross-entropy beside an L1 term on outputs of its own (probes 173, 175). None where no sums
    are off, the curvature is not a softmax's, or it cannot be read on those samples alone."""
    if not len(gradients) or outputs.dim() < 2:
        return None
    if len(gradients) > CONSTANCY_SAMPLES:  # the samples that weigh most in the EF (a pass
        # over every sample's entries had cost a float64 MSE over 3,072 outputs 8 % of its call)
        heaviest = gradients.abs().amax(dim=1).topk(CONSTANCY_SAMPLES).indices
        gradients, read = gradients[heaviest], read[heaviest]
    shaped = gradients.double().reshape(len(gradients), *outputs.shape[1:])
    for class_dim in dict.fromkeys([outputs.dim() - 1, 1]):
        if outputs.shape[class_dim] < 2:
            continue
        sizes = shaped.abs().amax(dim=class_dim)
        significant = sizes >= math.sqrt(torch.finfo(torch.float64).eps) * float(sizes.max())
        shares = torch.where(significant & (sizes > 0),
                             shaped.sum(dim=class_dim).abs() / sizes, 0.0)
        worst = shares.reshape(len(shares), -1).amax(dim=1)
        suspects = torch.nonzero(worst > SHIFT_SUM_SHARE).flatten()
        if not len(suspects):
            continue
        suspects = suspects[worst[suspects].argsort(descending=True)[:CONSTANCY_SAMPLES]]
        samples = read[suspects]
        if _softmax_over(loss_fn, outputs[samples], targets[samples], class_dim):
            share = float(worst.max())
            return ValueError(
                f"the loss's float64 curvature is a softmax cross-entropy's over dimension "
                f"{class_dim}, whose gradient sums to zero over it, yet sample "
                f"{int(samples[0])}'s gradient sums to {share:.2g} of its largest entry there, "
                "even in float64: its 1 - p_y is lost to rounding (a cross-entropy written as "
                "logsumexp(f) - f_y or -log(softmax(f)), or with probability targets, at large "
                "logit margins: all of it past about 40), so its gradients, and the empirical "
                "Fisher, are not the loss's. Write it with F.log_softmax (or F.cross_entropy "
                "with class indices), whose derivatives hessrank forms without the "
                "cancellation, or use method='ggn'")
    return None


def _softmax_over(loss_fn: LossFn, outputs: Tensor, targets: Tensor, class_dim: int) -> bool:
    """Whether the loss's float64 curvature at ``outputs`` (a few samples, as a batch of their
    own) is a softmax cross-entropy's over ``class_dim`` (:func:`_softmax_structure`), whose
    gradient sums to zero over it; False where it cannot be read there."""
    try:
        return _in_float64(_structure_of, loss_fn, outputs, targets)[0] == class_dim
    except ValueError as failure:
        raise_if_signalled(failure)
        return False


def _rounding_shows(loss_fn: LossFn, outputs: Tensor, targets: Tensor, reading: _Reading,
                    notes: list[str]) -> bool:
    """Whether the loss's per-sample gradients in the outputs' dtype are off by more than the
    agreement tolerance of the largest weighted one: the first :data:`CONSTANCY_SAMPLES` read
    samples' (``a_i > 0``) ``dl_i/df_i`` are computed again in float64 and compared, weighted
    by ``sqrt(a_i)`` as in the factors.

    A confident softmax cross-entropy is the case: ``dl_i/df_i = p_i - e_{y_i}``, whose entry
    ``p_y - 1`` cancels in float32 to an absolute error of ``eps`` while the whole gradient is
    far smaller (``1 - p_y`` = 1e-6 on a network trained to zero loss), so every factor, and the
    spectrum, would be mostly rounding (the top eigenvalue 5x off on one probe). Such rounding
    comes from the loss's own terms, shared by the batch's samples, so the head shows it; where
    the loss cannot be evaluated in float64 on the head alone, the reading stands, with a note
    in ``notes`` saying so and why (it had stood without one: a saturated classifier's top
    eigenvalue 2x high; probe 117)."""
    head = _first_samples(reading.weights > 0)  # read samples
    if not len(head):
        return False
    try:
        # the loss as float64's readings run it: float64 rounds 1 - p_y to 0 too past a margin
        # of 37, and agreed with float32's EF 4x too small (probe 157)
        precise, head, _ = _in_float64_on(lambda twin, wide, labels: _sample_gradients(
            saturation_safe(twin), wide, labels), loss_fn, outputs, targets, head)
    except ValueError as failure:
        raise_if_signalled(failure)
        add_float64_note(notes, f"the samples' loss gradients are {dtype_name(outputs.dtype)}'s, "
                         "not checked against float64", str(failure),
                         "they are mostly rounding, and the spectrum with them")
        return False
    cancelled = _cancelled_target_error(loss_fn, outputs, targets, precise, head)
    if cancelled is not None:
        raise cancelled
    scale = reading.weights.clamp_min(0).sqrt()
    error = (scale[head, None].double() * (reading.sample_grads[head].double()
                                           - precise.reshape(precise.shape[0], -1))).norm(dim=1)
    # the batch's largest weighted gradient, in its own dtype (a float64 copy of GPT's 4.2M
    # per-token gradients took 0.1 s)
    largest = float((scale * reading.sample_grads.norm(dim=1)).amax())
    return bool((error > agreement_tolerance(outputs.dtype) * largest).any())


#: Samples on which :func:`_check_constant_weights` reads the weights a second time where the
#: batch's outputs hold more than :data:`CONSTANCY_WHOLE_ENTRIES` entries.
CONSTANCY_SAMPLES = 8
#: Entries of the outputs up to which the weights are read a second time on the whole batch
#: (cheaper there than two readings of a part: 2.7 against 3.0 ms for 512 x 10 outputs).
CONSTANCY_WHOLE_ENTRIES = 2**16


def float64_chunk_samples(outputs_per_sample: int) -> int:
    """Samples in each chunk the softmax structure is confirmed on in float64
    (:func:`_softmax_in_float64`): :data:`CONSTANCY_WHOLE_ENTRIES` output entries, and at least
    :data:`CONSTANCY_SAMPLES` samples."""
    return max(CONSTANCY_SAMPLES, CONSTANCY_WHOLE_ENTRIES // max(1, outputs_per_sample))


def _check_constant_weights(loss_fn: LossFn, outputs: Tensor, targets: Tensor,
                            reading: _Reading, precision: torch.dtype | None = None) -> None:
    """Raise unless the weights read with the outputs' rows moved one sample on (``f_{i+1}``
    with ``y_i``) equal those of ``reading`` within the two readings' uncertainties, wherever
    both are read (see :func:`fisher_cotangents`; ``precision`` as :func:`_read_weights`'s); a
    moved row where the loss's gradient is not finite (a valid output paired with another
    target) is not read.

    On a batch of more than :data:`CONSTANCY_SAMPLES` whose outputs hold more than
    :data:`CONSTANCY_WHOLE_ENTRIES` entries, both readings are of the loss of its first
    :data:`CONSTANCY_SAMPLES` samples alone (a weighted sum with constant weights is one on any
    part of the batch, and a function of a sum stays one), so that the check costs a fraction
    of the batch's loss (a per-token loss over a vocabulary: 60 ms of GPT's 0.87 s call on the
    whole batch); a loss whose weights depend on the outputs of later samples only (through
    their position in the batch) is then not caught. ``reading`` serves only where the loss
    cannot be evaluated on those samples alone (a tensor of the batch's size captured in it),
    and the whole batch is checked.

    Then the weights are read with the outputs and targets moved one sample on together: they
    must move with them (a weight tied to a sample's place in the batch does not).

    Raises:
        ValueError: a weight depends on the outputs or on the sample's place in the batch
            (naming the sample and the two readings).
    """
    if outputs.shape[0] < 2:
        return  # one sample: L = l_1, a_1 = 1 whatever the outputs
    if outputs.shape[0] > CONSTANCY_SAMPLES and outputs.numel() > CONSTANCY_WHOLE_ENTRIES:
        head = slice(0, CONSTANCY_SAMPLES)
        try:  # the loss of the first samples alone, a weighted sum with constant weights too
            first = _read_weights(loss_fn, outputs[head], targets[head],
                                  reading.sample_grads[head], precision)
        except Exception as error:  # noqa: BLE001 - a loss that needs the whole batch is checked on it
            raise_if_signalled(error)
            first = None
        if first is not None:
            outputs, targets, reading = outputs[head], targets[head], first
    read = _read_weights(loss_fn, outputs.roll(-1, dims=0), targets, precision=precision)
    if read is None:
        raise _varying_weights_error(0, float(reading.weights[0]), 0.0)
    if bool((read.mismatch > 1).any()):
        raise _interacting_samples_error(read.mismatch,
                                         " with the outputs' rows moved one sample on")
    # the uncertainty is inf where either reading is not read: never bad there
    bad = ~((reading.weights - read.weights).abs() <= reading.uncertainty + read.uncertainty)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise _varying_weights_error(i, float(reading.weights[i]), float(read.weights[i]))
    # Weights tied to a sample's place in the batch (a tensor of the batch's size captured from
    # outside loss_fn, against which one sample's loss alone broadcasts) pass the reading above,
    # the outputs being moved and the places not: read again with the outputs and targets
    # moved together (each row a sample as given, its own gradients moved with it), the weights
    # must move with them. (Weights [0.5, 3, 1, 0, 2, 4] in a mean had given an EF of mean(w)
    # times one of the loss's readings, unrefused; probe 202.)
    moved = _read_weights(loss_fn, outputs.roll(-1, dims=0), targets.roll(-1, dims=0),
                          reading.sample_grads.roll(-1, dims=0), precision)
    assert moved is not None  # the loss uses the outputs (the first reading)
    if bool((moved.mismatch > 1).any()):
        raise _interacting_samples_error(
            moved.mismatch, " with the batch's rows (outputs and targets) moved one sample on")
    expected, spread = reading.weights.roll(-1), reading.uncertainty.roll(-1)
    bad = ~((expected - moved.weights).abs() <= spread + moved.uncertainty)
    # Moved with its targets, a sample's gradient in the batch is as large as before: one read
    # clearly above zero on one side and unread on the other (within the batch's rounding)
    # had its weight taken to a place that zeroes it (a captured 0/1 mask: the EF had come
    # out mean(mask) times the reference, every read weight equal; probe 205)
    unread, unread_moved = spread.isinf(), moved.uncertainty.isinf()
    bad |= unread_moved & ~unread & (expected > 2 * spread)
    bad |= unread & ~unread_moved & (moved.weights > 2 * moved.uncertainty)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise _placed_weights_error((i + 1) % outputs.shape[0], float(expected[i]),
                                    float(moved.weights[i]), i)


def _interacting_samples_error(mismatch: Tensor, where: str) -> ValueError:
    """The refusal naming the first sample whose ``mismatch`` (``[n]``) is above 1."""
    i = int((mismatch > 1).nonzero()[0])
    if math.isinf(float(mismatch[i])):  # (a weight read off a gradient that is not finite)
        return ValueError(
            f"loss_fn applied to sample {i} alone{where} has no finite gradient, while the batch "
            "loss's gradient for it is finite and not zero (e.g. a normaliser that is zero on "
            "that sample alone: a class weight of 0 with label smoothing), so its per-sample loss "
            "is undefined and the empirical Fisher with it; use method='ggn' (if the loss is "
            "convex in the outputs), 'exact' or 'lanczos'")
    return ValueError(
        f"loss_fn is not a weighted sum of per-sample losses: the batch loss's gradient for "
        f"sample {i}{where} is not a multiple of loss_fn applied to that sample alone (mismatch "
        f"{float(mismatch[i]):.2e} times the batch gradient's rounding): the samples interact "
        "in the loss, or its terms are reduced differently (a mean plus a sum), and the "
        "empirical Fisher is undefined; use method='ggn' (it checks that the loss's second "
        "derivatives do not couple the samples), 'exact' or 'lanczos'"
    )


def _placed_weights_error(i: int, before: float, after: float, place: int) -> ValueError:
    return ValueError(
        f"loss_fn weighs the samples by their place in the batch: sample {i}'s weight a_i (read "
        f"off dL/df_i = a_i dl_i/df_i) is {before:.6g}, and {after:.6g} with the batch's rows "
        f"(outputs and targets together) moved one sample on, the sample at place {place}, so "
        "what loss_fn gives on one sample alone cannot be told from the weights (a per-sample "
        "weight or mask tensor captured from outside loss_fn broadcasts against one sample: a "
        "weighted mean then gives mean(w) times the sample's own loss) and the empirical "
        "Fisher is undefined; pass per-sample weights in the targets, either normalised by "
        "their sum inside loss_fn ((w * l).sum() / w.sum(): a_i = w_i / sum w, class weights' "
        "convention) or not ((w * l).mean(): each sample's loss is w_i l_i), or use "
        "method='ggn', 'exact' or 'lanczos'"
    )


def _varying_weights_error(i: int, before: float, after: float) -> ValueError:
    return ValueError(
        f"loss_fn's weights depend on the model's outputs: sample {i}'s weight a_i (read off "
        f"dL/df_i = a_i dl_i/df_i) is {before:.6g}, and {after:.6g} with the outputs' rows "
        "moved one sample on (targets unchanged), so the loss is not a sum of per-sample losses "
        "with constant weights (e.g. sqrt, log or a power of a mean, or a per-sample tensor "
        "captured from outside loss_fn) and the empirical Fisher is undefined; use method='ggn' "
        "(if the loss is convex in the outputs), 'exact' or 'lanczos'"
    )


def _loss_hessian_products(first: Tensor, leaf: Tensor, vectors: Tensor) -> Tensor | None:
    """``[k, *out]``: the loss's Hessian w.r.t. the outputs times each of ``vectors``, from its
    gradient ``first`` (built with ``create_graph``); None where the gradient does not depend on
    ``leaf``. Batched, or one product at a time where the loss's backward has no batching rule.

    Raises:
        ValueError: an operation of the loss has no second derivative in torch (named, with the
            method that needs none).
    """
    with warnings_ignored(".*torch.jit.script.*deprecated"):
        try:
            (products,) = torch.autograd.grad(first, leaf, grad_outputs=vectors,
                                              is_grads_batched=True, allow_unused=True,
                                              retain_graph=True)
            return products
        except RuntimeError as error:
            raise_if_signalled(error)
        try:
            pieces = [torch.autograd.grad(first, leaf, v, retain_graph=True, allow_unused=True)[0]
                      for v in vectors]
        except RuntimeError as error:
            raise without_second_derivative(
                error, "the GGN needs the loss's second derivatives w.r.t. the outputs",
                "use method='fisher' (first derivatives only)") from error
    return None if pieces[0] is None else torch.stack(pieces)


def _loss_gradient(loss_fn: LossFn, leaf: Tensor, targets: Tensor) -> Tensor | None:
    """``dL/df`` at ``leaf`` with its graph (for Hessian-vector products); None where the loss is
    linear (or constant) in the outputs, so that its second derivative is zero by construction.

    Raises:
        ValueError: the loss cannot be differentiated w.r.t. the outputs.
    """
    value = evaluate_loss(loss_fn, leaf, targets, finite=False)
    try:
        (first,) = torch.autograd.grad(value, leaf, create_graph=True, allow_unused=True)
    except RuntimeError as error:
        raise (loss_modified_in_place_error(error) or ValueError(
            f"cannot differentiate loss_fn w.r.t. the outputs ({error})")) from error
    return first if first is not None and first.requires_grad else None


def loss_second_derivative_error(loss_fn: LossFn, outputs: Tensor, targets: Tensor
                                 ) -> ValueError | None:
    """The GGN's refusal (:func:`_loss_hessian_products`) where an operation of the loss itself
    has no second derivative in torch, found by one product of the loss's Hessian w.r.t. the
    outputs; None where it has one (or the loss is linear in the outputs)."""
    leaf = outputs.detach().requires_grad_(True)
    first = _loss_gradient(loss_fn, leaf, targets)
    if first is None:
        return None
    try:
        _loss_hessian_products(first, leaf, torch.ones_like(leaf).unsqueeze(0))
    except ValueError as error:
        return error
    return None


def _curvature_gradient(loss_fn: LossFn, outputs: Tensor, targets: Tensor
                        ) -> tuple[Tensor, Tensor]:
    """The outputs as a leaf and the loss's gradient there, with its graph (for the GGN's
    Hessian-vector products of the loss).

    Raises:
        ValueError: the loss is linear in the outputs (its GGN is zero), or cannot be
            differentiated w.r.t. them.
    """
    leaf = outputs.detach().requires_grad_(True)
    first = _loss_gradient(loss_fn, leaf, targets)
    if first is None:
        raise _linear_loss_error()
    return leaf, first


class ZeroCurvatureError(ValueError):
    """A batch whose GGN or EF factors are all zero: a loss linear or constant in the outputs
    there (every target ignored), a curved loss's second derivatives zero at every sample
    (saturated), or its first derivatives zero in the outputs' dtype, not in float64 (saturated
    past the dtype's range). A data set's other batches may add curvature where this one adds
    none. (Not an EF whose output gradients' squares, not the gradients themselves, fall
    under the dtype's range: the model's Jacobians can make up the difference, and a data
    set's batch left out for it had carried nearly all of the EF; probe 128.)"""


def _linear_loss_error() -> ZeroCurvatureError:
    return ZeroCurvatureError(
        "the loss is linear in the model's outputs (e.g. nn.NLLLoss after a LogSoftmax inside "
        "the model) or piecewise linear (nn.L1Loss, a hinge), or linear or constant in them "
        "on this batch (every target ignored; nn.HuberLoss with every residual beyond delta), "
        "so its GGN is exactly zero: move the last nonlinearity "
        "into the loss (nn.CrossEntropyLoss on logits), use a curved loss (nn.HuberLoss or "
        "nn.MSELoss for nn.L1Loss), or use method='fisher' (first derivatives only), 'exact' "
        "or 'lanczos'")


def output_hessian_blocks(first: Tensor, leaf: Tensor, generator: torch.Generator
                          ) -> Tensor | None:
    """``[n, C, C]``: per-sample blocks of ``d^2 L / df^2`` (``C`` outputs per sample) from the
    loss's gradient ``first`` at ``leaf``, verified block-diagonal by one random Hessian-vector
    product; None where the gradient does not depend on the outputs.

    Raises:
        ValueError: the loss is not twice differentiable, or it couples samples.
    """
    n = leaf.shape[0]
    size = leaf[0].numel()
    units = torch.eye(size, dtype=leaf.dtype, device=leaf.device)
    combs = units[:, None, :].expand(size, n, size).reshape(size, *leaf.shape)
    probe = torch.randn(leaf.shape, generator=generator, dtype=leaf.dtype).to(leaf.device)
    vectors = torch.cat([combs, probe[None]])
    products = _loss_hessian_products(first, leaf, vectors)
    if products is None:
        return None
    columns = products[:size].reshape(size, n, size)  # [c, i, :] = B_i e_c
    blocks = columns.permute(1, 2, 0)  # [i, :, c]
    expected = torch.einsum("nij,nj->ni", blocks, probe.reshape(n, size))
    actual = products[size].reshape(n, size)
    scale = torch.sqrt(((blocks**2).sum(dim=(1, 2)) * (probe.reshape(n, size) ** 2).sum(1)).sum())
    mismatch = (actual - expected).norm()
    if mismatch > agreement_tolerance(leaf.dtype) * math.sqrt(size) * max(float(scale), 1e-300):
        raise _SamplesCoupled(float(mismatch / scale), leaf.dtype)
    return blocks


class _SamplesCoupled(ValueError):
    """The loss's Hessian w.r.t. the outputs is not block-diagonal per sample
    (:func:`output_hessian_blocks`): ``mismatch``, relative to the products' size."""

    def __init__(self, mismatch: float, dtype: torch.dtype) -> None:
        # a small mismatch of a float64 loss may be its rounding, which no other precision
        # measures where the loss holds float64 state (a confident
        # nn.AdaptiveLogSoftmaxWithLoss's log-softmax: 5e-12 to 1e-7 below losses of 6e-6,
        # per-sample all the same; probe 240)
        rounding = dtype == torch.float64 and mismatch <= 1e-6
        super().__init__(
            "the loss couples the samples"
            + (", or float64 cannot resolve its curvature" if rounding else "")
            + ": its Hessian w.r.t. the outputs is not block-diagonal per sample (relative "
            f"mismatch {mismatch:.2e}"
            + (", small enough to be the rounding of second derivatives that cancel, as a "
               "confident log-softmax's do" if rounding else "")
            + "), so the GGN has no per-sample factors; use method='exact' or 'lanczos'")
        self.mismatch = mismatch


def lower_precision_in(loss_fn: LossFn, outputs: Tensor, targets: Tensor) -> torch.dtype | None:
    """The least precise floating dtype, below the outputs', that the loss computes in (a cast
    inside it, :class:`_Calls`); None where there is none, or the loss fails here."""
    try:
        return _calls_of(loss_fn, outputs, targets).lowest
    except Exception as error:  # noqa: BLE001 - a diagnosis must not replace the error it explains
        raise_if_signalled(error)
        return None


def _refuse_half_precision_loss(loss_fn: LossFn, outputs: Tensor, targets: Tensor,
                                read: str, mismatch: Tensor | None = None) -> None:
    """Raise where the loss computes in float16 or bfloat16 inside (a cast it keeps,
    :func:`kept_cast`), whose rounding explains ``read`` (what the empirical Fisher read of the
    loss) failing its checks: ``F.cross_entropy(f.bfloat16().float(), y)`` had been refused as
    samples that interact (probe 138). ``mismatch``, where given (in units of the outputs'
    dtype's rounding), must be within what that rounding explains, 64 times its relative
    rounding: samples that truly interact had been blamed on the cast (probe 139).

    Raises:
        ValueError: naming the dtype and the fix.
    """
    lowered = lower_precision_in(loss_fn, outputs, targets)
    if lowered is None or kept_cast(lowered) is None:
        return
    explained = 64 * torch.finfo(lowered).eps / torch.finfo(outputs.dtype).eps
    if mismatch is not None and float(mismatch.max()) > explained:
        return
    raise ValueError(
        f"{_computes_inside(lowered)}, and {read} carry {dtype_name(lowered)}'s rounding (about "
        f"3 digits), beyond what the empirical Fisher's checks allow; "
        f"{_remove_the_cast(lowered)}")


def _computes_inside(lowered: torch.dtype) -> str:
    """What a loss that computes in ``lowered`` inside, whatever its outputs' dtype, is told."""
    return (f"the loss computes in {dtype_name(lowered)} inside (a cast such as "
            f"{_cast_call(lowered)}), whatever the outputs' precision")


def _cast_call(dtype: torch.dtype) -> str:
    """The ``Tensor`` method that casts outputs to ``dtype``, as a loss would call it."""
    method = {torch.float32: "float", torch.float16: "half", torch.float64: "double"}.get(
        dtype, dtype_name(dtype))
    return f"outputs.{method}()"


def _remove_the_cast(lowered: torch.dtype) -> str:
    """The fix for a loss that computes in ``lowered`` inside a model of a higher precision."""
    return "remove the cast" + (", or analyse a float32 copy of the model"
                                if lowered == torch.float32 else "")


def kept_cast(lowered: torch.dtype) -> str | None:
    """Why a loss that computes in ``lowered`` inside is not widened for that alone, if it is
    not: :class:`_Promoting` keeps a cast below float32. None for float32."""
    if torch.finfo(lowered).eps <= torch.finfo(torch.float32).eps:
        return None
    return "a cast below float32 is part of the function (its rounding is what the loss computes)"


#: What :func:`add_lowered_loss_note` says of a loss that ran as given.
RUNS_AS_GIVEN = ", and runs so, since "


def add_lowered_loss_note(notes: list[str], lowered: torch.dtype,
                          why_not_widened: str | None) -> None:
    """Add to a float64 model's ``notes`` (once) what they say of a loss that computes in
    ``lowered`` inside: that its calls were widened to float64 (``why_not_widened`` None), or
    why not."""
    name = dtype_name(lowered)
    found = (f"the loss computes in {name} inside (a cast such as {_cast_call(lowered)}), "
             "though the model is float64")
    if why_not_widened is None:
        note = (f"{found}: its derivatives were taken with its calls widened to float64 (the "
                "same function, computed to the precision the float64 checks and rank "
                "tolerances assume)")
    else:
        note = (f"{found}{RUNS_AS_GIVEN}{why_not_widened}: its derivatives carry {name}'s "
                "rounding, which the float64 checks and rank tolerances do not allow for "
                "(near a saturated softmax its curvature rounds to wrong eigenvalues); "
                f"{_remove_the_cast(lowered)}")
    if note not in notes:
        notes.append(note)


def float64_loss(loss_fn: LossFn, outputs: Tensor, targets: Tensor,
                 notes: list[str]) -> tuple[LossFn, torch.dtype]:
    """The loss whose derivatives at float64 ``outputs`` are read, and the dtype whose rounding
    they carry: the loss as given, or, where it computes in a lower precision inside
    (``F.cross_entropy(f.float(), y)``), its :func:`float64_twin`, the same function with its
    calls widened (a note in ``notes`` either way, :func:`add_lowered_loss_note`). A saturated
    float64 classifier whose loss cast to float32 had its EF's top eigenvalue 57 % low and
    srank 9 for 8 without a word, and was refused by ``ggn`` as coupling its samples (probe
    120). Outputs of another dtype: the loss as given (the float32 paths widen on their own
    terms). One evaluation of the loss without a graph.
    """
    if outputs.dtype != torch.float64:
        return loss_fn, outputs.dtype
    lowered = lower_precision_in(loss_fn, outputs, targets)
    if lowered is None:
        return loss_fn, outputs.dtype
    why = kept_cast(lowered)
    if why is None:
        try:
            twin = float64_twin(loss_fn, outputs, targets)
        except ValueError as error:
            raise_if_signalled(error)
            why = str(error)
    add_lowered_loss_note(notes, lowered, why)
    return (loss_fn, lowered) if why is not None else (twin, outputs.dtype)


class _Softmax(NamedTuple):
    """The loss's gradient at the outputs (``leaf``: the outputs as a leaf; ``first``: the
    gradient, with its graph) and the softmax cross-entropy structure of its curvature:
    ``class_dim`` None where there is none or it does not hold in float64 on the head, with
    the mismatches measured; ``probs`` and ``weights`` (``p``, ``a``) where it holds."""

    leaf: Tensor
    first: Tensor
    class_dim: int | None
    probs: Tensor
    weights: Tensor
    mismatches: list[str]


def _verified_softmax(loss_fn: LossFn, outputs: Tensor, targets: Tensor,
                      generator: torch.Generator, notes: list[str]) -> _Softmax:
    """:func:`_softmax_structure` at the outputs, confirmed by :func:`_softmax_in_float64` (its
    note to ``notes``): what :func:`ggn_cotangents`, :func:`ggn_mc_cotangents` and
    :func:`softmax_columns` read."""
    leaf, first = _curvature_gradient(loss_fn, outputs, targets)
    class_dim, probs, weights, mismatches = _softmax_structure(first, leaf, generator)
    if class_dim is None:
        return _Softmax(leaf, first, class_dim, probs, weights, mismatches)
    holds, precise = _softmax_in_float64(loss_fn, outputs, targets, class_dim, probs, weights,
                                         notes)
    if not holds:
        class_dim = None
        mismatches.append("in float64 on every sample, above its rounding")
    elif not precise:  # the weights read again in float64, on the whole batch
        try:
            found, probs, weights, _ = _in_float64(_structure_of, loss_fn, outputs, targets)
        except ValueError as failure:  # (its chunks ran in float64: not expected)
            raise_if_signalled(failure)
            add_float64_note(notes, f"the loss's curvature weights are "
                             f"{dtype_name(outputs.dtype)}'s, not float64's", str(failure),
                             "near a saturated sigmoid they are mostly rounding, and the "
                             "spectrum with them")
            found = class_dim
        if found != class_dim:
            class_dim = None
            mismatches.append("in float64 on the whole batch, above its rounding")
    return _Softmax(leaf, first, class_dim, probs, weights, mismatches)


#: How far beyond its float32-measured rounding (scaled to float64) a float64 output-Hessian
#: block's negative eigenvalue must reach to be called non-convex (:func:`ggn_cotangents`).
ROUNDING_SPREAD = 1024


def ggn_cotangents(loss_fn: LossFn, outputs: Tensor, targets: Tensor,
                   generator: torch.Generator, notes: list[str]) -> Tensor:
    """``[C', n, *out]``: square-root factors of the per-sample output-Hessian blocks of ``L``.

    A softmax cross-entropy's curvature (verified, :func:`_softmax_structure`; what could not
    be verified in float64 noted in ``notes``) is factored from its formula,
    ``a_r (diag(p_r) - p_r p_r^T)`` per position, formed in float64; any other loss's blocks
    come from Hessian-vector products (:func:`output_hessian_blocks`), each factored with its
    diagonal scaled to one: eigenvalues of that scaled block below the rounding of its entries
    are zero, more negative ones are refused.

    Raises:
        ValueError: the loss is linear in the outputs (zero GGN), its curvature vanishes at these
            outputs, it is not convex in them (indefinite GGN), couples samples, or cannot be
            differentiated twice.
    """
    n = outputs.shape[0]
    loss_fn = float64_loss(loss_fn, outputs, targets, notes)[0]
    if outputs.dtype == torch.float64:
        loss_fn = saturation_safe(loss_fn, log_softmax=False)
    leaf, first, class_dim, probs, weights, _ = _verified_softmax(loss_fn, outputs, targets,
                                                                  generator, notes)
    if class_dim is not None:
        return _softmax_factors(probs, weights, class_dim, outputs.dtype)
    try:
        found = output_hessian_blocks(first, leaf, generator)
    except _SamplesCoupled as error:
        if outputs.dtype != torch.float64:
            # float64 decides where float32's checks refuse: a softmax saturated to its
            # subnormal floor fails both (its products round to 20 % there), and a data set's
            # batch of such samples alone was said to couple them (probe 126)
            try:
                wide_dim, wide_probs, wide_weights, _ = _in_float64(_structure_of, loss_fn,
                                                                    outputs, targets)
            except ValueError as failure:
                raise_if_signalled(failure)
                wide_dim = None
            if wide_dim is not None:
                return _softmax_factors(wide_probs, wide_weights, wide_dim, outputs.dtype)
        # a loss computing in a lower precision inside has blocks coupled to that rounding (a
        # float64 model's loss cast to float32 had been said to couple its samples; probe 119)
        lowered = lower_precision_in(loss_fn, outputs, targets)
        if lowered is None or error.mismatch > agreement_tolerance(lowered) * math.sqrt(
                outputs[0].numel()):
            raise
        name = dtype_name(lowered)
        raise ValueError(
            f"the loss's Hessian w.r.t. the outputs is block-diagonal per sample only to "
            f"{name}'s rounding (relative mismatch {error.mismatch:.2e}): "
            f"{_computes_inside(lowered)}; {_remove_the_cast(lowered)}") from error
    if found is None:
        raise _linear_loss_error()
    blocks = _symmetric(found)
    rough = None  # blocks in float32 beside the solved float64 ones (negative eigenvalues)
    if outputs.dtype != torch.float64:
        # Solved in float64: float32 blocks carry the loss's cancellations (a saturated
        # sigmoid's s (1 - s), to eps32 of s: a float32 MLP at a BCEWithLogitsLoss of 5e-8
        # had its GGN's top eigenvalue 2 % off and numerical rank 19 for 40, every check
        # passed); at a softmax cross-entropy's cost (its blocks come from the formula).
        try:
            rough, blocks = blocks, _in_float64(
                lambda twin, wide, labels: _blocks_of(saturation_safe(twin, log_softmax=False),
                                                      wide, labels, generator),
                loss_fn, outputs, targets)
        except ValueError as failure:
            raise_if_signalled(failure)
            add_float64_note(notes, "the loss's second derivatives w.r.t. the outputs are "
                             f"{dtype_name(outputs.dtype)}'s, not float64's", str(failure),
                             "near a saturated sigmoid they are mostly rounding, and the "
                             "spectrum with them")
    finite = torch.isfinite(blocks).flatten(1).all(dim=1)
    if not bool(finite.all()):  # (eigh had raised torch's LinAlgError; probe 117)
        raise ValueError(
            f"the loss's second derivatives w.r.t. the outputs are not finite for sample "
            f"{int((~finite).nonzero()[0])}: the GGN of these outputs is undefined; check loss_fn "
            "at them (a log of a probability that underflowed to zero: use F.log_softmax, or "
            "F.cross_entropy on the logits)")
    if not bool((blocks != 0).any()):
        raise _flat_curvature_error(loss_fn, leaf, targets, generator)
    # Each block is solved with its diagonal scaled to one, B = S M S (S = diag(sqrt|B_cc|)):
    # entries of one block, like blocks of different samples, differ in size by any factor (a
    # confidently wrong output's curvature may be 1e20 times its neighbours', with a Jacobian
    # that much smaller), and rounding of the large ones must not set the small ones' zero.
    # M's eigenvalues within C eps (the outputs' eps) of its largest are below what the factors
    # resolve; B = (S V sqrt(Lambda)) (S V sqrt(Lambda))^T.
    scale, scaled = _diagonally_scaled(blocks)
    eigenvalues, eigenvectors = torch.linalg.eigh(scaled)
    zero = eigenvalues.shape[-1] * torch.finfo(outputs.dtype).eps * _largest(eigenvalues)
    if (eigenvalues < -zero).any():
        # Negative beyond the entries' own rounding, or a loss whose second derivatives cancel
        # (a softmax of scaled or shifted outputs: a temperature, a logit adjustment), whose
        # entries are far less accurate, 5e-5 of the largest in float32 at probabilities 2e-4
        # (refused as not convex, probe 84). The blocks in float32 beside the float64 ones
        # tell: the float64 ones are solved, and their rounding is the float32 ones' distance
        # to them times 16 eps(float64) / eps(float32), at most sqrt(eps(float64)) of the
        # largest (a float32 block rounded to nonsense says nothing of the float64 one's
        # accuracy: a softmax at probabilities 1e-14 is 1e-3 off in float64). That estimate
        # is one sample's: the negative eigenvalues a float64 block's rounding gives reach
        # 490 times the float32 distance times eps(float64) / eps(float32) (a temperature's
        # softmax over 10 classes; 16 times had refused 5 of 59 batches of a float64 MLP as
        # not convex, probe 240), so a refusal takes ROUNDING_SPREAD times it; what the
        # factors drop stays below 16 times it.
        if outputs.dtype == torch.float64:
            rough = _blocks_in_float32(loss_fn, outputs, targets, generator)
        # A float64 block through a chain of products (nn.AdaptiveLogSoftmaxWithLoss's
        # projections) rounds its null eigenvalues to 90 eps of the largest at a loss of 0.2:
        # where float32 could not evaluate the loss (its float64 parameters), every seed had
        # been refused as not convex (probe 240). Within 1024 eps of it is rounding.
        largest = _largest(eigenvalues)
        resolved = (agreement_tolerance(torch.float64) * largest
                    if outputs.dtype == torch.float64 else zero)
        unresolved, allowance = True, torch.maximum(zero, resolved)
        if rough is not None:
            measured = (torch.finfo(torch.float64).eps / torch.finfo(torch.float32).eps
                        * torch.linalg.matrix_norm(_diagonally_scaled(rough)[1] - scaled)[:, None])
            cap = math.sqrt(torch.finfo(torch.float64).eps) * largest
            floor = eigenvalues.shape[-1] * torch.finfo(outputs.dtype).eps * largest
            zero = floor + torch.minimum(16 * measured, cap)
            allowance = torch.maximum(floor + torch.minimum(ROUNDING_SPREAD * measured, cap),
                                      resolved)
            negative = (eigenvalues < -allowance).any(dim=-1, keepdim=True)
            unresolved = bool((negative & (ROUNDING_SPREAD * measured > cap)).any())
        if (eigenvalues < -allowance).any():
            raise ValueError(
                "the loss Hessian w.r.t. the outputs has negative eigenvalues (the loss is not "
                "convex in the outputs), so the GGN is indefinite and has no square-root factors "
                "(which the GGN methods, the Gram and the Lanczos one alike, are built from)"
                + (", or its second derivatives cancel beyond the precision that could be "
                   "evaluated here (a softmax of scaled or shifted outputs saturated to "
                   "probabilities near 0 and 1), which hides its convexity" if unresolved
                   else "")
                + ": use method='exact' or 'lanczos'"
            )
    eigenvalues = torch.where(eigenvalues > zero, eigenvalues, torch.zeros_like(eigenvalues))
    # [n, C, C], column k = s_ik
    factors = scale[:, :, None] * eigenvectors * eigenvalues.sqrt().unsqueeze(1)
    keep = (eigenvalues > 0).any(dim=0)
    factors = factors[:, :, keep]
    return factors.permute(2, 0, 1).reshape(-1, n, *outputs.shape[1:]).to(outputs.dtype)


def softmax_columns(loss_fn: LossFn, outputs: Tensor, targets: Tensor) -> int | None:
    """At most the GGN factor columns per sample of a loss :func:`ggn_cotangents` factors as a
    softmax cross-entropy (``C - 1`` at each position of the ``C`` classes that carries loss
    weight in some sample: the factors drop the columns zero in every sample, such as padding's
    under ``ignore_index``), for predictions before the work; None where the loss is not one,
    or where the check cannot tell (the work's own checks then name the problem)."""
    try:
        structure = _verified_softmax(float64_loss(loss_fn, outputs, targets, [])[0], outputs,
                                      targets, torch.Generator().manual_seed(0),
                                      [])  # (the work's own call notes)
    except (RuntimeError, ValueError, TypeError) as error:
        raise_if_signalled(error)
        return None
    if structure.class_dim is None:
        return None
    classes = outputs.shape[structure.class_dim]
    weighted = int((structure.weights != 0).reshape(len(outputs), -1).any(0).sum())
    return weighted * (classes - 1)


def _symmetric(blocks: Tensor) -> Tensor:
    """``[n, C, C]`` blocks in float64, symmetrised."""
    blocks = blocks.to(torch.float64)
    return (blocks + blocks.transpose(1, 2)) / 2


def _largest(eigenvalues: Tensor) -> Tensor:
    """``[n, 1]``: each block's largest ``|eigenvalue|`` (``eigenvalues`` ``[n, C]``), at least
    the smallest normal float64."""
    return eigenvalues.abs().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)


def _diagonally_scaled(blocks: Tensor) -> tuple[Tensor, Tensor]:
    """``S`` (``[n, C]``, ``sqrt|B_cc|``, 1 where that is 0) and ``S^-1 B S^-1`` of ``[n, C, C]``
    blocks ``B``."""
    diagonal = blocks.diagonal(dim1=-2, dim2=-1).abs()
    scale = torch.where(diagonal > 0, diagonal.sqrt(), 1.0)
    return scale, blocks / (scale[:, :, None] * scale[:, None, :])


def _blocks_of(loss_fn: LossFn, outputs: Tensor, targets: Tensor, generator: torch.Generator
               ) -> Tensor:
    """The symmetrised float64 copy of the per-sample output-Hessian blocks
    (:func:`output_hessian_blocks`) of the loss at ``outputs``.

    Raises:
        ValueError: the loss is linear in the outputs, cannot be differentiated twice, or
            couples samples.
    """
    leaf, first = _curvature_gradient(loss_fn, outputs.detach(), targets)
    found = output_hessian_blocks(first, leaf, generator)
    if found is None:
        raise _linear_loss_error()
    return _symmetric(found)


def _blocks_in_float32(loss_fn: LossFn, outputs: Tensor, targets: Tensor,
                       generator: torch.Generator) -> Tensor | None:
    """:func:`_blocks_of` the loss evaluated on float64 ``outputs`` (and floating targets) cast
    to float32; None where it cannot be evaluated or differentiated there."""
    labels = targets.float() if targets.is_floating_point() else targets
    try:
        return _blocks_of(loss_fn, outputs.float(), labels, generator)
    except Exception as error:  # noqa: BLE001 - any failure of the loss in the other precision
        raise_if_signalled(error)
        return None


def _curved_elsewhere(loss_fn: LossFn, leaf: Tensor, targets: Tensor,
                      generator: torch.Generator) -> bool:
    """Whether a loss whose output Hessian is zero at ``leaf`` has curvature at a random point
    (standard normal outputs): a saturated softmax has, a loss linear in the outputs
    (``nn.NLLLoss``, whose backward autograd still records) has not. One Hessian-vector product;
    a point where the loss is not finite counts as curved (linearity is not shown)."""
    point = torch.randn(leaf.shape, generator=generator, dtype=leaf.dtype).to(leaf.device)
    first = _loss_gradient(loss_fn, point.requires_grad_(True), targets)
    if first is None:
        return False
    probe = torch.randn(leaf.shape, generator=generator, dtype=leaf.dtype).to(leaf.device)
    products = _loss_hessian_products(first, point, probe[None])
    return products is not None and bool((products != 0).any())


def _flat_curvature_error(loss_fn: LossFn, leaf: Tensor, targets: Tensor,
                          generator: torch.Generator) -> ValueError:
    """The error for a loss whose output Hessian is zero at ``leaf``: linear in the outputs, or
    flat only here (:func:`_curved_elsewhere`)."""
    if _curved_elsewhere(loss_fn, leaf, targets, generator):
        return _vanishing_curvature_error(leaf.dtype)
    return _linear_loss_error()


def _vanishing_curvature_error(dtype: torch.dtype) -> ZeroCurvatureError:
    return ZeroCurvatureError(
        "the loss's second derivative w.r.t. the outputs is zero at these outputs for every "
        "sample, though the loss is not linear in them (e.g. a softmax saturated to "
        f"probabilities 0 and 1 in {dtype}): the GGN vanishes here. Use method='exact' or "
        "'lanczos'" + ("" if dtype == torch.float64 else ", or a float64 copy of the model"))


def _softmax_factors(probs: Tensor, weights: Tensor, class_dim: int, dtype: torch.dtype
                     ) -> Tensor:
    """``[C', n, *out]``: square-root factors of ``a_r (diag(p_r) - p_r p_r^T)`` at every
    position ``r`` (``probs`` ``[n, ..., C]`` and ``weights`` ``[n, ...]`` with the class
    dimension last), formed and factored in float64 position by position, returned in
    ``dtype`` (the outputs').

    Each block is factored on the ``C - 1`` directions orthogonal to the softmax's shift
    direction ``1``, its exact null vector, so that ``C' <= (C - 1)`` per position whatever the
    rounding. Every entry is formed without cancellation: the diagonal ``p_c (1 - p_c)`` as
    ``p_c`` times the sum of the other classes' probabilities (prefix and suffix sums, no
    subtraction), since near a saturated softmax ``p_m - p_m^2`` rounds to about ``eps p_m``
    while its value ``p_m sum_{c != m} p_c`` may be far smaller (and ``a_r`` then far larger:
    two outputs scored by any convex function of their difference have this curvature with
    ``a_r = h'' / (p_1 p_2)``). Each entry is thus exact to a few roundings of itself, and a
    block's eigenvalues within ``C eps`` of its largest are rounding, set to zero (the formula is
    positive semi-definite). Columns zero for every sample are dropped.

    Raises:
        ValueError: the curvature is zero at every position of every sample.
    """
    n, classes = probs.shape[0], probs.shape[-1]
    zero = probs.new_zeros(probs.shape[:-1] + (1,))
    before = torch.cat([zero, probs.cumsum(-1)[..., :-1]], -1)
    after = torch.cat([probs.flip(-1).cumsum(-1).flip(-1)[..., 1:], zero], -1)
    blocks = -weights[..., None, None] * probs[..., :, None] * probs[..., None, :]
    blocks.diagonal(dim1=-2, dim2=-1).copy_(weights[..., None] * probs * (before + after))
    ones = torch.full((classes, 1), classes ** -0.5, dtype=torch.float64, device=probs.device)
    completed = torch.cat([ones, torch.eye(classes, dtype=torch.float64, device=probs.device)], 1)
    shift_free = torch.linalg.qr(completed).Q[:, 1:]  # [C, C - 1], orthonormal, orthogonal to 1
    eigenvalues, eigenvectors = torch.linalg.eigh(shift_free.T @ blocks @ shift_free)
    rounding = classes * torch.finfo(torch.float64).eps * eigenvalues.abs().amax(
        dim=-1, keepdim=True)
    eigenvalues = torch.where(eigenvalues > rounding, eigenvalues, 0.0)
    if not bool((eigenvalues > 0).any()):
        raise _vanishing_curvature_error(dtype)
    width = classes - 1
    factors = (shift_free @ eigenvectors * eigenvalues.sqrt().unsqueeze(-2)).reshape(
        n, -1, classes, width)  # [n, R, entries, k]
    positions = factors.shape[1]
    # column (r, k) holds factor k of position r at position r and zeros elsewhere; only the
    # columns nonzero in some sample are formed, in (r, k) order (every column formed, then
    # those kept copied, had held P^2 C (C - 1) float64 entries twice over: a per-token GGN
    # with 63 of 64 positions padded peaked at twice its prediction; probe 221)
    position, factor = (factors != 0).any(dim=2).any(dim=0).nonzero(as_tuple=True)
    columns = torch.zeros(len(position), n, positions, classes, dtype=torch.float64,
                          device=probs.device)
    columns[torch.arange(len(position), device=probs.device), :, position, :] = (
        factors[:, position, :, factor])
    columns = columns.reshape(-1, n, *probs.shape[1:])
    return columns.movedim(-1, class_dim + 1).to(dtype).contiguous()


def _resolvable_probability(dtype: torch.dtype) -> float:
    """The least second-largest probability at which :func:`_softmax_curvature` reads a
    position's weight in ``dtype`` (``sqrt(tiny)``: 1.1e-19 in float32), its products'
    entries ``p_m p_j`` staying normal numbers."""
    return math.sqrt(torch.finfo(dtype).tiny)


def _softmax_curvature(first: Tensor, leaf: Tensor, class_dim: int, generator: torch.Generator
                       ) -> tuple[Tensor, Tensor, float]:
    """Test whether ``d^2 L / df^2`` is ``a_r (diag(p_r) - p_r p_r^T)`` at every position ``r``
    (``p_r`` the softmax of the outputs over ``class_dim``): the curvature of a softmax
    cross-entropy, whatever its labels, smoothing, class weights or reduction.

    Three Hessian-vector products of the loss, none read where it cancels: near a saturated
    softmax the diagonal entry ``p_m (1 - p_m)`` of the most probable class ``m`` rounds to more
    than its value. A unit vector at ``m`` reads ``a_r`` off the entry of the next most probable
    class ``j``, the product ``(H e_m)_j = -a_r p_m p_j``. A unit vector at ``j`` must then give
    ``a_r p_j (e_j - p_r)`` in every entry whose ``p_c`` the outputs' dtype represents, each to
    rounding relative to its own size (``p_j <= 1/2``, so ``1 - p_j`` does not cancel either): a
    weight read off a product of vanishing probabilities where the Hessian is not of this form
    fails there. A Gaussian probe ``v`` then checks the whole block-diagonal structure, against
    the rounding of the two terms ``a_r p_r * v_r`` and ``a_r p_r (p_r . v_r)`` whose difference
    ``H v`` is, since near saturation ``H v`` itself is smaller than that rounding (a different
    Hessian fails it with probability one). Positions whose ``p_j`` the dtype does not represent
    carry no curvature it can resolve: their weight is 0.

    Returns:
        ``p`` and ``a`` with the class dimension last (``[n, ..., C]``, ``[n, ...]``), and the
        larger of the relative mismatches.
    """
    probs = torch.softmax(leaf.detach().to(torch.float64), dim=class_dim).movedim(class_dim, -1)
    if probs.shape[-1] < 2:
        return probs, torch.zeros(probs.shape[:-1], dtype=torch.float64), math.inf
    top = probs.topk(2, dim=-1)
    first_class = torch.zeros_like(probs).scatter_(-1, top.indices[..., :1], 1.0)
    second_class = torch.zeros_like(probs).scatter_(-1, top.indices[..., 1:], 1.0)
    probe = torch.randn(probs.shape, generator=generator, dtype=torch.float64).to(probs.device)
    vectors = torch.stack([first_class, second_class, probe]).movedim(-1, class_dim + 1)
    products = _loss_hessian_products(first, leaf, vectors.to(leaf.dtype))
    if products is None:
        products = torch.zeros_like(vectors)
    products = products.to(torch.float64).movedim(class_dim + 1, -1)
    representable = _resolvable_probability(leaf.dtype)
    p_m, p_j = top.values[..., 0], top.values[..., 1]
    read = products[0].gather(-1, top.indices[..., 1:]).squeeze(-1)
    weights = torch.where(p_j >= representable, -read / (p_m * p_j).clamp_min(
        torch.finfo(torch.float64).tiny), 0.0)
    predicted = weights[..., None] * p_j[..., None] * (second_class - probs)
    usable = (probs >= representable) & (predicted != 0)
    entry_error = torch.where(usable, (products[1] - predicted).abs()
                              / predicted.abs().clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    scaled = weights[..., None] * probs * probe
    shifted = weights[..., None] * probs * (probs * probe).sum(-1, keepdim=True)
    terms = float(scaled.norm()) + float(shifted.norm())
    mismatch = float((products[2] - (scaled - shifted)).norm()) / max(terms, 1e-300)
    return probs, weights, max(mismatch, float(entry_error.amax()))


def _softmax_structure(first: Tensor, leaf: Tensor, generator: torch.Generator
                       ) -> tuple[int | None, Tensor, Tensor, list[str]]:
    """The class dimension (the last or the second) over which the loss's curvature is a
    softmax cross-entropy's with non-negative weights, not all zero (:func:`_softmax_curvature`),
    with ``p`` and ``a``; ``None`` and the mismatches measured where no dimension, or where both,
    pass. A loss linear in the outputs, or a softmax saturated at every position, has no weight
    to read. Both passing is ambiguous (the check's confirmation of the weight rejects a
    dimension that is not the class dimension; this is the safeguard behind it), and the caller
    differentiates the blocks instead."""
    tolerance = agreement_tolerance(leaf.dtype) * math.sqrt(leaf[0].numel())
    mismatches = []
    passing = []
    for class_dim in dict.fromkeys([leaf.dim() - 1, 1]):
        if not 1 <= class_dim < leaf.dim():  # outputs [n] have no class dimension
            continue
        probs, weights, mismatch = _softmax_curvature(first, leaf, class_dim, generator)
        shown = f"{mismatch:.1e}" if mismatch < 1e3 else "above 1e3"
        mismatches.append(f"{shown} over dimension {class_dim}")
        if mismatch <= tolerance and bool((weights >= 0).all()) and bool((weights > 0).any()):
            passing.append((class_dim, probs, weights))
    if len(passing) == 1:
        return (*passing[0], mismatches)
    if passing:
        mismatches.append("both pass: ambiguous")
    empty = torch.empty(0)
    return None, empty, empty, mismatches


def _structure_of(loss_fn: LossFn, outputs: Tensor, targets: Tensor
                  ) -> tuple[int | None, Tensor, Tensor, list[str]]:
    """:func:`_softmax_structure` of the loss at ``outputs`` (its own products)."""
    leaf, first = _curvature_gradient(loss_fn, outputs, targets)
    return _softmax_structure(first, leaf, torch.Generator().manual_seed(0))


def _top_pair(probs: Tensor) -> Tensor:
    """``p_m p_j`` of the two most probable classes at each position (class dimension last):
    the size of the position's softmax block ``diag(p) - p p^T`` to a factor ``C``."""
    top = probs.topk(2, dim=-1).values
    return top[..., 0] * top[..., 1]


def _softmax_in_float64(loss_fn: LossFn, outputs: Tensor, targets: Tensor, class_dim: int,
                        probs: Tensor, weights: Tensor, notes: list[str]) -> tuple[bool, bool]:
    """Whether the softmax cross-entropy structure found over ``class_dim`` in the outputs'
    dtype holds in float64 on every sample (always for float64 outputs; where ``weights``
    ``[n, ...]``, the structure's ``a_r``, are all zero, nothing to confirm); and whether its
    weights, read in the outputs' dtype, are float64's there (``probs`` ``[n, ..., C]``:
    ``p``). The samples are read in chunks of :data:`CONSTANCY_WHOLE_ENTRIES` output entries
    (at least :data:`CONSTANCY_SAMPLES` samples), each as a batch of its own; a chunk of
    samples the softmax gives no weight (ignored, or of class weight 0) is read with one that
    has weight, its loss defined: a penalty on those samples alone had been left out, the GGN
    20x too small (probe 172).

    In float32 the structure test resolves the loss's curvature only to the rounding of the
    softmax terms, ``1024 eps`` of them: near saturation a convex term beside the cross-entropy
    (PaLM's z-loss ``1e-4 logsumexp(f)^2``) is below that and carries most of the curvature
    (a GGN 20x too small, on one probe); in float64 it is 2^29 times above the rounding. Such a
    term on some samples only (a penalty above a threshold) shows on those alone: read on the
    first 8 samples with curvature, a batch whose penalised samples came later had its GGN
    89x too small, by its order alone (probe 167). Where the loss cannot be evaluated in
    float64 on a chunk alone, it is on the whole batch (:func:`_in_float64_on`); where not
    there either, the float32 test stands, with a note in ``notes`` (it had stood without
    one).

    The weights: a loss of the two outputs' difference has this structure (two classes), with
    ``a_r = h'' / (p_1 p_2)``, and where ``h''`` is a saturated sigmoid's, torch's float32
    derivative forms it with a cancellation (a DPO-style ``-logsigmoid(beta (f_0 - f_1))``
    had blocks 36 % off and its GGN 2e-3 of the top eigenvalue; probe 125). Each chunk's
    weights are compared with float64's up to one factor (the reduction over fewer samples),
    each scaled by its block's size, against ``64 eps`` of the batch's largest block: the
    weights' own rounding is a few ``eps``."""
    if outputs.dtype == torch.float64:
        return True, True
    # positions whose second probability is below what the outputs' dtype resolves got a weight
    # of 0, their curvature left out; a batch saturated throughout has it on the scale of the
    # others' (a float32 GGN at logit margins of 40 to 60 lost 3 of its 8 directions; probe 157)
    second = probs.topk(2, dim=-1).values[..., 1]
    precise_weights = not bool(((second > 0)
                                & (second < _resolvable_probability(outputs.dtype))).any())
    has_weight = (weights.reshape(weights.shape[0], -1) > 0).any(dim=1)
    curved = torch.nonzero(has_weight).flatten()
    if not len(curved):
        return True, precise_weights
    largest_block = float((weights.double() * _top_pair(probs)).amax())
    for chunk in torch.arange(len(weights), device=weights.device).split(
            float64_chunk_samples(outputs[0].numel())):
        if not bool(has_weight[chunk].any()):  # (a mean over none of its samples is NaN)
            chunk = torch.cat([curved[:1], chunk])
        try:
            (found, precise_probs, precise, _), chunk, whole = _in_float64_on(
                _structure_of, loss_fn, outputs, targets, chunk)
        except ValueError as failure:
            raise_if_signalled(failure)
            add_float64_note(notes, f"the loss's curvature is a softmax cross-entropy's in "
                             f"{dtype_name(outputs.dtype)}, not checked in float64", str(failure),
                             "a convex term beside it (a z-loss) is below the rounding of its "
                             "terms, and would be left out of the GGN")
            return True, True
        if found != class_dim:
            return False, True
        read = weights[chunk].double()
        factor = float((precise * read).sum() / (read * read).sum())
        error = float(((precise - factor * read).abs() * _top_pair(precise_probs)).amax())
        precise_weights &= error <= 64 * torch.finfo(outputs.dtype).eps * factor * largest_block
        if whole:  # (every sample read at once)
            break
    return True, precise_weights


def ggn_mc_cotangents(loss_fn: LossFn, outputs: Tensor, targets: Tensor, mc_samples: int,
                      generator: torch.Generator, notes: list[str]) -> Tensor:
    """``[M, n, *out]``: Monte-Carlo square-root factors of the GGN of a softmax cross-entropy.

    For a loss whose output Hessian is ``a_r (diag(p_r) - p_r p_r^T)`` at each position ``r``
    (verified by :func:`_softmax_curvature`, over the last output dimension or else the second),
    that block is ``a_r E_{y ~ p_r}[(p_r - e_y)(p_r - e_y)^T]``: the gradient of ``-log p_y`` for
    a label drawn from the model's own prediction (the "true Fisher" of K-FAC, ViViT's MC mode).
    Column ``m`` holds, at every position, ``sqrt(a_r / M) (p_r - e_{y_rm})`` with independent
    draws, so ``sum_m s_m s_m^T`` has expectation the per-sample output-Hessian block (cross-
    position terms vanish in expectation) and the Gram has ``M n`` rows whatever ``C`` is.

    Raises:
        ValueError: the loss is linear in the outputs, its curvature vanishes at these outputs,
            or it is not a softmax cross-entropy's (use the exact GGN).
    """
    loss_fn = float64_loss(loss_fn, outputs, targets, notes)[0]
    leaf, first, class_dim, probs, weights, mismatches = _verified_softmax(
        loss_fn, outputs, targets, generator, notes)
    if class_dim is None:
        probe = torch.randn(leaf.shape, generator=generator, dtype=leaf.dtype).to(leaf.device)
        products = _loss_hessian_products(first, leaf, probe[None])
        if products is None or not bool((products != 0).any()):
            raise _flat_curvature_error(loss_fn, leaf, targets, generator)
        raise ValueError(
            "mc_samples needs the curvature of a softmax cross-entropy over the class dimension "
            f"(last or second) of the outputs; this loss's output Hessian differs (relative "
            f"mismatch {', '.join(mismatches)}): use the exact GGN (mc_samples=None), "
            "method='fisher' or 'lanczos'"
        )
    classes = probs.shape[-1]
    flat = probs.reshape(-1, classes)
    uniform = torch.rand(flat.shape[0], mc_samples, generator=generator, dtype=torch.float64)
    cumulative = flat.cumsum(dim=-1)
    labels = torch.searchsorted(cumulative, uniform.to(flat.device) * cumulative[:, -1:])
    labels = labels.clamp_max(classes - 1).T.reshape(mc_samples, *probs.shape[:-1], 1)
    # p - e_y, its entry p_y - 1 as minus the sum of the other classes' probabilities (formed
    # as a difference it is all rounding where the drawn label is a saturated prediction's)
    factors = probs.unsqueeze(0).expand(mc_samples, *probs.shape).clone()
    others = factors.scatter(-1, labels, 0.0).sum(-1, keepdim=True)
    factors.scatter_(-1, labels, -others)
    factors *= (weights / mc_samples).sqrt().unsqueeze(-1)
    return factors.movedim(-1, class_dim + 1).to(outputs.dtype).contiguous()
