"""``nn.Linear``: ``y = x W^T + b`` on inputs ``[n, ..., d_in]``; every leading position of a
sample shares its weight (tokens of a sequence), so ``G_i = sum_t d_it a_it^T``.

Assumes: the input's first dimension is the sample (checked against ``n``; a token head applied to
``x.reshape(n * T, d)`` or a sequence-first layout is caught by the gradient check and goes to the
general path).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from hessrank.curvature.rules import LayerFactors, TensorRule, register_rule
from hessrank.curvature.rules.factors import kronecker_costs, pair_route_bytes


@register_rule
class LinearRule(TensorRule):
    name = "linear"
    module_types: ClassVar[tuple[type[nn.Module], ...]] = (nn.Linear,)

    def tensor_factors(self, module: nn.Module, layer_input: Tensor, output_grads: Tensor,
                       num_samples: int, analysed: frozenset[str]) -> LayerFactors | None:
        if layer_input.dim() < 2 or layer_input.shape[0] != num_samples:
            return None
        k = output_grads.shape[0]
        return LayerFactors(
            activations=layer_input.reshape(num_samples, -1, layer_input.shape[-1]),
            output_grads=output_grads.reshape(k, num_samples, -1, output_grads.shape[-1]),
            weight_shape=torch.Size((output_grads.shape[-1], layer_input.shape[-1]))
            if "weight" in analysed else None,
            with_bias="bias" in analysed,
        )

    def working_bytes(self, module: nn.Module, layer_output: Tensor | tuple[Tensor, ...],
                      num_cotangents: int, num_samples: int, num_params: int) -> int:
        """One position per sample (an MLP's layer): the Kronecker identity holds ``K n x K n``
        matrices only; several (tokens): the default, per-sample gradients in blocks, or where
        :func:`kronecker_costs` picks the position-pair route, the larger of that and its
        blocks (:func:`pair_route_bytes`)."""
        if isinstance(layer_output, Tensor) and layer_output.dim() == 2:
            return 3 * (num_cotangents * num_samples) ** 2 * layer_output.element_size()
        default = super().working_bytes(module, layer_output, num_cotangents, num_samples,
                                        num_params)
        if not isinstance(layer_output, Tensor) or not isinstance(module, nn.Linear):
            return default
        rows = num_cotangents * num_samples
        positions = layer_output[0].numel() // layer_output.shape[-1]
        pair, explicit = kronecker_costs(rows, positions, module.in_features,
                                         module.out_features)
        if pair >= explicit:  # the route LayerFactors takes (explicit gradients)
            return default
        return max(default, pair_route_bytes(rows, positions, layer_output.element_size()))
