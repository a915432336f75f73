"""``nn.Conv1d`` / ``nn.Conv2d`` (one group, zero padding): the input unfolded into patches
(``F.unfold``), so the output pixels are the positions of a Kronecker factor.

Assumes: the input is batched (``[n, C_in, ...]``, first dimension the sample).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from hessrank.curvature.rules import GramRule, LayerFactors, register_rule


@register_rule
class ConvRule(GramRule):
    name = "conv"
    module_types = (nn.Conv1d, nn.Conv2d)

    def supports(self, module: nn.Module) -> bool:
        return (super().supports(module) and module.groups == 1
                and module.padding_mode == "zeros" and not isinstance(module.padding, str))

    def factors(self, module: nn.Module, layer_input: Tensor, output_grads: Tensor,
                num_samples: int, analysed: frozenset[str]) -> LayerFactors | None:
        spatial = 1 if isinstance(module, nn.Conv1d) else 2
        if layer_input.dim() != spatial + 2 or layer_input.shape[0] != num_samples:
            return None
        x = layer_input
        if isinstance(module, nn.Conv1d):
            x = x.unsqueeze(-2)
            kernel, dilation = (1, module.kernel_size[0]), (1, module.dilation[0])
            padding, stride = (0, module.padding[0]), (1, module.stride[0])
        else:
            kernel, dilation = module.kernel_size, module.dilation
            padding, stride = module.padding, module.stride
        patches = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
        k, n, channels = output_grads.shape[:3]
        return LayerFactors(
            activations=patches.transpose(1, 2),
            output_grads=output_grads.reshape(k, n, channels, -1).transpose(2, 3),
            weight_shape=module.weight.shape if "weight" in analysed else None,
            with_bias="bias" in analysed,
        )
