"""``nn.PReLU``: ``y = max(0, x) + w min(0, x)``, ``w`` one number or one per channel (dimension
1 of a batched input), shared by every other position.

Sample ``i``'s gradient is ``sum d_i * min(0, x_i)`` over the positions that share an entry of
``w`` (``C`` numbers, formed explicitly: :class:`SampleGradients`). ``torch.func``'s vmap gets
this layer wrong after a convolution on torch 2.14.1 (per-sample gradients batched twice), so
without the rule it takes the per-sample loop.

Assumes: the input is batched (first dimension the sample) with its channels, if ``w`` has
several entries, along dimension 1.
"""

from __future__ import annotations

from torch import Tensor, nn

from hessrank.curvature.rules import TensorRule, register_rule
from hessrank.curvature.rules.factors import Factors, SampleGradients


@register_rule
class PReLURule(TensorRule):
    name = "prelu"
    module_types = (nn.PReLU,)

    def tensor_factors(self, module: nn.Module, layer_input: Tensor, output_grads: Tensor,
                       num_samples: int, analysed: frozenset[str]) -> Factors | None:
        if ("weight" not in analysed or layer_input.dim() < 2
                or layer_input.shape[0] != num_samples
                or output_grads.shape[1:] != layer_input.shape):
            return None
        weighted = output_grads * layer_input.clamp(max=0)  # [K, n, ...]
        channels = module.get_parameter("weight").numel()
        if channels == 1:
            return SampleGradients({"weight": weighted.flatten(2).sum(dim=2, keepdim=True)})
        if layer_input.shape[1] != channels:
            return None
        return SampleGradients({"weight": weighted.flatten(3).sum(dim=3)
                                if layer_input.dim() > 2 else weighted})
