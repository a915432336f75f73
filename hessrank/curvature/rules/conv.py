"""``nn.Conv1d`` / ``nn.Conv2d``, any padding (numbers, ``'same'``, ``'valid'``; every padding
mode), stride, dilation and groups (grouped and depthwise included).

The input is padded as the module pads it (``F.pad`` with the module's padding and mode, then a
convolution without padding), so sample ``i``'s weight gradient for cotangent ``k`` is, at kernel
offset ``o`` and group ``g``, ``G_ik[g, o] = sum_t d_ikt x_i(t, o)^T``: output positions ``t``,
``x_i(t, o)`` the input pixels the offset reads for output ``t``. Two exact routes, the cheaper
one picked per layer and batch by :func:`route_costs`:

- **offsets** (:class:`ConvFactors`): for each kernel offset, one batched matrix product of the
  output gradients with the strided input slice the offset reads gives every sample's gradient
  slice; its Gram is added and it is freed. No ``im2col`` is formed; memory is one input slice and
  one offset's gradients (in channel chunks above :data:`CHUNK_BYTES`).
- **position pairs** (one group): the input unfolded into patches (``F.unfold``) as a
  :class:`LayerFactors`, whose Gram sums ``(a_it . a_ju)(d_it . d_ju)`` over pairs of output
  positions: cheaper for few output positions and wide layers (a ResNet's last stage).

Assumes: the input is batched (``[n, C_in, ...]``, first dimension the sample).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hessrank.curvature.rules import GramRule, register_rule
from hessrank.curvature.rules.factors import CHUNK_BYTES, Factors, LayerFactors, kronecker_costs


@dataclass
class ConvFactors(Factors):
    """A convolution's per-sample factors, read offset by offset.

    Attributes:
        inputs: ``[n, C_in, H, W]``: the padded input (a 1-d convolution has ``H = 1``).
        output_grads: ``[K, n, C_out, H_out, W_out]``.
        kernel, stride, dilation: per spatial dimension ``(h, w)``.
        groups: the convolution's groups.
        weight_shape: shape of the weight (``None`` if it is not analysed).
        with_bias: whether the bias is analysed.
    """

    inputs: Tensor
    output_grads: Tensor
    kernel: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    weight_shape: torch.Size | None
    with_bias: bool

    def _slice(self, a: int, b: int) -> Tensor:
        """``[n g, T, C_in / g]``: the input pixels kernel offset ``(a, b)`` reads."""
        n, channels = self.inputs.shape[:2]
        h_out, w_out = self.output_grads.shape[-2:]
        (sh, sw), (dh, dw) = self.stride, self.dilation
        pixels = self.inputs[:, :, a * dh: a * dh + (h_out - 1) * sh + 1: sh,
                             b * dw: b * dw + (w_out - 1) * sw + 1: sw]
        return pixels.reshape(n * self.groups, channels // self.groups, -1).transpose(1, 2)

    def _grads(self, output_grads: Tensor) -> Tensor:
        """``[K, n, C_out, H_out, W_out] -> [n g, K C_out / g, T]``."""
        k, n, c_out = output_grads.shape[:3]
        g = self.groups
        grouped = output_grads.reshape(k, n, g, c_out // g, -1).permute(1, 2, 0, 3, 4)
        return grouped.reshape(n * g, k * (c_out // g), -1)

    def _offsets(self) -> list[tuple[int, int]]:
        return [(a, b) for a in range(self.kernel[0]) for b in range(self.kernel[1])]

    def weighted_gradients(self, weights: Tensor) -> dict[str, Tensor]:
        weighted = torch.einsum("kn,kn...->n...", weights.to(self.output_grads.dtype),
                                self.output_grads)
        out = {}
        if self.weight_shape is not None:
            # One product per offset, contracting samples and positions together.
            n, g = weighted.shape[0], self.groups
            grads = self._grads(weighted[None])  # [n g, C_out / g, T]
            grads = grads.view(n, g, grads.shape[1], -1).permute(1, 2, 0, 3).flatten(2)
            pieces = []
            for a, b in self._offsets():
                pixels = self._slice(a, b)  # [n g, T, C_in / g]
                pixels = pixels.reshape(n, g, *pixels.shape[1:]).transpose(0, 1).flatten(1, 2)
                pieces.append((grads @ pixels).reshape(-1))
            out["weight"] = torch.stack(pieces, dim=-1).reshape(self.weight_shape)
        if self.with_bias:
            out["bias"] = weighted.sum(dim=(0, 2, 3))
        return out

    def gram(self) -> Tensor:
        k, n, c_out = self.output_grads.shape[:3]
        rows = k * n
        dtype, device = self.output_grads.dtype, self.output_grads.device
        gram = torch.zeros(rows, rows, dtype=dtype, device=device)
        if self.with_bias:
            summed = self.output_grads.sum(dim=(3, 4)).reshape(rows, c_out)
            gram.addmm_(summed, summed.T)
        if self.weight_shape is None:
            return gram
        g = self.groups
        per_group_out, per_group_in = c_out // g, self.inputs.shape[1] // g
        grads = self._grads(self.output_grads).view(n * g, k, per_group_out, -1)
        element = self.output_grads.element_size()
        chunk = max(1, CHUNK_BYTES // max(1, rows * g * per_group_in * element))
        for a, b in self._offsets():
            pixels = self._slice(a, b).contiguous()  # [n g, T, C_in / g]
            for start in range(0, per_group_out, chunk):
                part = grads[:, :, start:start + chunk].reshape(n * g, -1, grads.shape[-1])
                slices = part @ pixels  # [n g, K c, C_in / g]
                flat = (slices.view(n, g, k, -1, per_group_in).permute(2, 0, 1, 3, 4)
                        .reshape(rows, -1))
                gram.addmm_(flat, flat.T)
        return gram


def route_costs(rows: int, positions: int, channels_in: int, channels_out: int,
                kernel_size: int, groups: int) -> tuple[float, float]:
    """Multiply-adds of ``(position pairs, offsets)`` for a convolution's weight Gram.

    Args:
        rows: ``K n`` Gram rows.
        positions: output positions ``T``.
        channels_in, channels_out: the convolution's channels.
        kernel_size: kernel offsets (``k_h k_w``).
        groups: the convolution's groups (the pair route serves one group only).
    """
    weight = channels_out * channels_in // groups * kernel_size
    offsets = float(rows) * positions * weight + float(rows) ** 2 * weight
    if groups != 1:
        return float("inf"), offsets
    pair, _ = kronecker_costs(rows, positions, channels_in * kernel_size, channels_out)
    return pair, offsets


@register_rule
class ConvRule(GramRule):
    name = "conv"
    module_types = (nn.Conv1d, nn.Conv2d)

    def factors(self, module: nn.Module, layer_input: Tensor,
                output_grads: Tensor | tuple[Tensor, ...], num_samples: int,
                analysed: frozenset[str]) -> Factors | None:
        if not isinstance(output_grads, Tensor):
            return None
        if not isinstance(module, nn.Conv1d | nn.Conv2d):
            return None
        spatial = 1 if isinstance(module, nn.Conv1d) else 2
        if layer_input.dim() != spatial + 2 or layer_input.shape[0] != num_samples:
            return None
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(layer_input, module._reversed_padding_repeated_twice, mode=mode)
        k = output_grads.shape[0]
        kernel, stride, dilation = (_pair(module.kernel_size), _pair(module.stride),
                                    _pair(module.dilation))
        if spatial == 1:
            x, output_grads = x.unsqueeze(-2), output_grads.unsqueeze(-2)
        weight_shape = module.weight.shape if "weight" in analysed else None
        positions = output_grads.shape[-2] * output_grads.shape[-1]
        pair, offsets = route_costs(k * num_samples, positions, x.shape[1], output_grads.shape[2],
                                    kernel[0] * kernel[1], module.groups)
        if pair < offsets:
            patches = F.unfold(x, kernel, dilation=dilation, stride=stride)
            return LayerFactors(
                activations=patches.transpose(1, 2),
                output_grads=output_grads.reshape(k, num_samples, output_grads.shape[2],
                                                  -1).transpose(2, 3),
                weight_shape=weight_shape, with_bias="bias" in analysed)
        return ConvFactors(x, output_grads, kernel, stride, dilation, module.groups, weight_shape,
                           "bias" in analysed)


def _pair(sizes: tuple[int, ...]) -> tuple[int, int]:
    """A convolution's per-dimension sizes as ``(h, w)``; a 1-d one has ``h = 1``."""
    return (1, sizes[0]) if len(sizes) == 1 else (sizes[0], sizes[1])
