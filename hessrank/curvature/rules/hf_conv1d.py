"""HuggingFace ``transformers``' ``Conv1D`` (GPT-2's attention and MLP layers): despite its name a
linear layer whose weight is stored input-major, ``y = x W + b`` with ``W`` ``[d_in, d_out]``
(``torch.addmm(bias, x.view(-1, d_in), weight)``), so ``G_i = sum_t a_it d_it^T``: the linear
rule's factors with the weight's claim transposed.

Claimed by its class, as ``transformers`` defines it (named ``Conv1D``, in a ``transformers``
module, with ``nf`` output features and an ``[nx, nf]`` weight): ``transformers`` is not a
dependency. Assumes what the linear rule assumes (the input's first dimension is the sample);
the gradient check verifies every claim, so a module that computes something else goes to the
general path.
"""

from __future__ import annotations

import dataclasses

from torch import Tensor, nn

from hessrank.curvature.rules import LayerFactors, register_rule
from hessrank.curvature.rules.linear import LinearRule


@register_rule
class HuggingFaceConv1DRule(LinearRule):
    name = "hf-conv1d"
    module_types = ()

    def supports(self, module: nn.Module) -> bool:
        kind = type(module)
        weight = getattr(module, "weight", None)
        bias = getattr(module, "bias", None)
        return (kind.__name__ == "Conv1D" and kind.__module__.split(".")[0] == "transformers"
                and isinstance(weight, nn.Parameter) and weight.dim() == 2
                and weight.shape == (getattr(module, "nx", None), getattr(module, "nf", None))
                and (bias is None or tuple(bias.shape) == (module.nf,)))

    def tensor_factors(self, module: nn.Module, layer_input: Tensor, output_grads: Tensor,
                       num_samples: int, analysed: frozenset[str]) -> LayerFactors | None:
        factors = super().tensor_factors(module, layer_input, output_grads, num_samples,
                                         analysed)
        if factors is None or factors.weight_shape is None:
            return factors
        weight = module.weight
        assert isinstance(weight, Tensor)
        return dataclasses.replace(factors, weight_shape=weight.shape, weight_transposed=True)
