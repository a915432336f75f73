"""Kronecker-structured per-sample factors of a layer whose gradient is a sum of outer products.

For a weight used as ``out_t = W a_t (+ b)`` at positions ``t`` (one position for a plain linear
layer, the output pixels of a convolution, the tokens of a sequence), sample ``i``'s gradient for
cotangent ``k`` is ``G_ik = sum_t d_ikt a_it^T`` and its bias gradient ``sum_t d_ikt``. The Gram
entries follow from the factors alone:
``<G_ik, G_jl> = sum_{t,u} (a_it . a_ju)(d_ikt . d_jlu)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class LayerFactors:
    """Per-sample factors of one layer.

    Attributes:
        activations: ``[n, T, d_in]``: the layer input at each of ``T`` positions.
        output_grads: ``[K, n, T, d_out]``: the backpropagated output gradient at each position.
        weight_shape: shape of the weight parameter (``None`` if it is not analysed).
        with_bias: whether the bias is analysed.
    """

    activations: Tensor
    output_grads: Tensor
    weight_shape: torch.Size | None
    with_bias: bool

    def weighted_gradients(self, weights: Tensor) -> dict[str, Tensor]:
        """``sum_{k,i} w_ki G_ki`` for each analysed parameter (``weights``: ``[K, n]``).

        This is what the factors claim the gradient of ``sum_{k,i} w_ki <f_i, s_ki>`` to be.
        """
        k, n, positions, d_out = self.output_grads.shape
        weighted = (weights.to(self.output_grads.dtype).reshape(k, n, 1, 1)
                    * self.output_grads).sum(dim=0).reshape(n * positions, d_out)
        out = {}
        if self.weight_shape is not None:  # one GEMM over all (sample, position) rows
            rows = self.activations.reshape(n * positions, -1)
            out["weight"] = (weighted.T @ rows).reshape(self.weight_shape)
        if self.with_bias:
            out["bias"] = weighted.sum(dim=0)
        return out

    def gram(self) -> Tensor:
        """``[K n, K n]`` Gram of the per-sample (weight, bias) gradients, row order ``(k, i)``.

        With one position, the weight and bias share one ``D D^T``: ``(D D^T) * (A A^T + 1)``.
        With many, the cheaper of the position-pair identity and explicit per-sample gradients.
        """
        activations, output_grads = self.activations, self.output_grads
        k, n, positions, d_out = output_grads.shape
        d_in = activations.shape[-1]
        with_weight = self.weight_shape is not None
        rows = output_grads.reshape(k * n, positions, d_out)
        if positions == 1:
            output_gram = rows[:, 0] @ rows[:, 0].T
            if not with_weight:
                return output_gram
            activation_gram = activations[:, 0] @ activations[:, 0].T
            if self.with_bias:
                activation_gram += 1.0
            # Entry ((k, i), (l, j)) takes (a_i . a_j): broadcast over k and l.
            output_gram.view(k, n, k, n).mul_(activation_gram[None, :, None, :])
            return output_gram
        summed = rows.sum(dim=1)
        gram = summed @ summed.T if self.with_bias else torch.zeros(
            k * n, k * n, dtype=rows.dtype, device=rows.device)
        if not with_weight:
            return gram
        kron_cost = (k * n) ** 2 * positions**2 * (d_in + d_out)
        dense_cost = k * n * positions * d_in * d_out + (k * n) ** 2 * d_in * d_out
        if kron_cost < dense_cost:
            inner_a = torch.einsum("ntd,msd->nmts", activations, activations).repeat(k, k, 1, 1)
            inner_d = torch.einsum("ptd,qsd->pqts", rows, rows)
            return gram + (inner_a * inner_d).sum(dim=(2, 3))
        per_sample = torch.einsum("ptd,ptf->pdf", rows, activations.repeat(k, 1, 1))
        flat = per_sample.reshape(k * n, -1)
        return gram + flat @ flat.T
