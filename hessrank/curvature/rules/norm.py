"""Affine parameters of ``nn.LayerNorm``, ``nn.GroupNorm`` and eval-mode ``nn.BatchNorm1d/2d/3d``.

Each layer computes ``y = x_hat * weight + bias`` with ``x_hat`` the normalised input, the
parameters broadcast over every other position. Sample ``i``'s gradients are therefore tiny
(``C`` numbers each): ``sum d_i * x_hat_i`` and ``sum d_i`` over the positions that share a
parameter entry, and they are formed explicitly (:class:`SampleGradients`). ``x_hat`` is
recomputed from the captured input with the module's own normalisation and no affine part.

Assumes: the input is batched (first dimension the sample) and, for BatchNorm, that it runs on
its running statistics (the module is not training and tracks them; BatchNorm on batch statistics
couples the samples and is left to the general path, which refuses it).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from hessrank.curvature.rules import TensorRule, register_rule
from hessrank.curvature.rules.factors import Factors, SampleGradients

BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _normalised(module: nn.Module, x: Tensor) -> tuple[Tensor, tuple[int, ...]] | None:
    """``x_hat`` and the dimensions of ``x`` (after the sample's) that share a parameter entry,
    or None where the module's configuration is outside the rule."""
    if isinstance(module, nn.LayerNorm):
        shape = tuple(module.normalized_shape)
        if x.dim() < len(shape) + 1 or tuple(x.shape[x.dim() - len(shape):]) != shape:
            return None
        return (F.layer_norm(x, shape, None, None, module.eps),
                tuple(range(1, x.dim() - len(shape))))
    if isinstance(module, nn.GroupNorm):
        if x.dim() < 2:
            return None
        return (F.group_norm(x, module.num_groups, None, None, module.eps),
                tuple(range(2, x.dim())))
    if not isinstance(module, BATCH_NORMS):
        return None
    mean, var = module.running_mean, module.running_var
    if module.training or mean is None or var is None or x.dim() < 2:
        return None
    view = (1, -1) + (1,) * (x.dim() - 2)
    x_hat = (x - mean.view(view)) * (var.view(view) + module.eps).rsqrt()
    return x_hat, tuple(range(2, x.dim()))


@register_rule
class NormRule(TensorRule):
    name = "norm"
    module_types = (nn.LayerNorm, nn.GroupNorm, *BATCH_NORMS)

    def tensor_factors(self, module: nn.Module, layer_input: Tensor, output_grads: Tensor,
                       num_samples: int, analysed: frozenset[str]) -> Factors | None:
        if layer_input.dim() < 2 or layer_input.shape[0] != num_samples:
            return None
        normalised = _normalised(module, layer_input)
        if normalised is None or output_grads.shape[1:] != layer_input.shape:
            return None
        x_hat, shared = normalised
        dims = tuple(d + 1 for d in shared)  # the same dimensions of [K, n, ...]
        gradients = {}
        if "weight" in analysed:
            weighted = output_grads * x_hat
            gradients["weight"] = weighted.sum(dim=dims) if dims else weighted
        if "bias" in analysed:
            gradients["bias"] = output_grads.sum(dim=dims) if dims else output_grads
        return SampleGradients(gradients)
