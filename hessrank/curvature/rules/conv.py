"""``nn.Conv1d`` / ``nn.Conv2d``, any padding (numbers, ``'same'``, ``'valid'``; every padding
mode), stride, dilation and groups (grouped and depthwise included).

The input is padded as the module pads it (``F.pad`` with the module's padding and mode, then a
convolution without padding). Two exact routes, the cheaper one picked per layer and batch by
:func:`route_costs` when the Gram is formed (so across data-parallel processes it is picked for
the gathered, global batch, not for each process's share):

- **samples as groups** (:class:`ConvFactors`): the batch viewed as one input whose ``n g``
  channel groups are the samples' groups, so torch's own convolution weight gradient returns the
  ``n`` per-sample gradients side by side, in output-channel chunks whose Gram is added and
  freed. No ``im2col`` is formed. The check's gradient is the same operation on the whole batch.
- **patches** (one group): the input's patches (``F.unfold``'s layout) as a
  :class:`LayerFactors`, whose Gram sums ``(a_it . a_ju)(d_it . d_ju)`` over pairs of output
  positions (cheaper for few output positions and wide layers: a ResNet's last stage), or forms
  the explicit per-sample gradients from the patches by batched matrix products, whichever
  :func:`~hessrank.curvature.rules.factors.kronecker_costs` finds cheaper. On an accelerator
  every one-group convolution takes this route (:data:`GROUPED_SLOWDOWN`).

Assumes: the input is batched (``[n, C_in, ...]``, first dimension the sample).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hessrank.curvature.row_gram import add_row_gram
from hessrank.curvature.rules import TensorRule, register_rule
from hessrank.curvature.rules.factors import (
    CHUNK_BYTES,
    Claim,
    Factors,
    LayerFactors,
    kronecker_costs,
    pair_route_bytes,
)


@dataclass
class ConvFactors(Factors):
    """A convolution's per-sample factors: the padded input and the output gradients.

    Attributes:
        inputs: ``[n, C_in, H, W]``: the padded input (a 1-d convolution has ``H = 1``).
        output_grads: ``[K, n, C_out, H_out, W_out]``.
        kernel, stride, dilation: per spatial dimension ``(h, w)``.
        groups: the convolution's groups.
        weight_shape: shape of the weight (``None`` if it is not analysed).
        with_bias: whether the bias is analysed.
    """

    sample_dims = {"inputs": 0, "output_grads": 1}

    inputs: Tensor
    output_grads: Tensor
    kernel: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    weight_shape: torch.Size | None
    with_bias: bool

    def _weight_gradient(self, inputs: Tensor, output_grads: Tensor, groups: int) -> Tensor:
        """``[C_out', C_in / g', k_h, k_w]``: the convolution's weight gradient for an input
        ``[1 or n, C_in', H, W]`` and output gradients with ``C_out'`` channels, ``g'`` groups
        (torch's own convolution backward, weight part only)."""
        shape = (output_grads.shape[1], inputs.shape[1] // groups, *self.kernel)
        return torch.ops.aten.convolution_backward(
            output_grads, inputs, inputs.new_empty(shape), None, list(self.stride), [0, 0],
            list(self.dilation), False, [0, 0], groups, [False, True, False])[1]

    def weighted_gradients(self, weights: Tensor) -> dict[str, Tensor]:
        weighted = torch.einsum("kn,kn...->n...", weights.to(self.output_grads.dtype),
                                self.output_grads)
        out = {}
        if self.weight_shape is not None:
            out["weight"] = self._weight_gradient(self.inputs, weighted,
                                                  self.groups).reshape(self.weight_shape)
        if self.with_bias:
            out["bias"] = weighted.sum(dim=(0, 2, 3))
        return out

    def position_pairs(self) -> LayerFactors | None:
        """The same factors on the patches route (one group) where :func:`route_costs` finds
        it cheaper for these ``K n`` rows on this device; None: samples as groups."""
        k, n, c_out, h_out, w_out = self.output_grads.shape
        patch_cost, groups_cost = route_costs(k * n, h_out * w_out, self.inputs.shape[1], c_out,
                                              self.kernel[0] * self.kernel[1], self.groups,
                                              self.inputs.device.type)
        if patch_cost >= groups_cost:
            return None
        return LayerFactors(
            activations=patches(self.inputs, self.kernel, self.stride, self.dilation,
                                (h_out, w_out)),
            output_grads=self.output_grads.reshape(k, n, c_out, -1).transpose(2, 3),
            weight_shape=self.weight_shape, with_bias=self.with_bias)

    def gram_and_claims(self, weights: Tensor, probes: torch.Generator | None = None
                        ) -> tuple[Tensor, dict[str, Claim]]:
        pairs = self.position_pairs()
        if pairs is not None:
            return pairs.gram_and_claims(weights, probes)
        return super().gram_and_claims(weights, probes)

    def gram(self) -> Tensor:
        """Every sample's weight gradient at once: the batch as one sample whose ``n g`` groups
        are the samples' groups, so the convolution's weight gradient is the ``n`` per-sample
        gradients side by side; in output-channel chunks (:meth:`_chunks`) of at most half
        :data:`CHUNK_BYTES`, each chunk's Gram added and freed. On the position-pair route
        where that is cheaper (:meth:`position_pairs`)."""
        pairs = self.position_pairs()
        if pairs is not None:
            return pairs.gram()
        k, n, c_out = self.output_grads.shape[:3]
        rows = k * n
        dtype, device = self.output_grads.dtype, self.output_grads.device
        gram = torch.zeros(rows, rows, dtype=dtype, device=device)
        if self.with_bias:
            summed = self.output_grads.sum(dim=(3, 4)).reshape(rows, c_out)
            add_row_gram(gram, summed)
        if self.weight_shape is None:
            return gram
        features = (self.inputs.shape[1] // self.groups) * self.kernel[0] * self.kernel[1]
        per_channel = rows * features * self.output_grads.element_size()
        # (half the block each: a sample's gradient from torch's backward beside its place)
        chunk = max(1, CHUNK_BYTES // 2 // max(1, per_channel))
        for outputs, inputs, groups in self._chunks(chunk):
            part = self.output_grads[:, :, outputs]
            # (a view where the chunk reads every input channel)
            stacked = self.inputs[:, inputs].reshape(1, -1, *self.inputs.shape[2:])
            # each column's gradients written in place: stacked from a list, the chunk had
            # been held twice (ResNet-18's ggn at n = 64 peaked at 1.4x its prediction)
            flat = torch.empty(rows, part.shape[2] * features, dtype=dtype, device=device)
            for i in range(k):
                flat[i * n:(i + 1) * n] = self._weight_gradient(
                    stacked, part[i].reshape(1, -1, *part.shape[-2:]), n * groups).reshape(n, -1)
            add_row_gram(gram, flat)
            del flat, stacked  # (before the next chunk's are formed)
        return gram

    def _chunks(self, channels: int) -> list[tuple[slice, slice, int]]:
        """``(output channels, input channels, groups)`` of :meth:`gram`'s chunks of at most
        ``channels`` output channels (at least one): whole groups where a group has at most
        ``channels``, else part of one group's output channels, beside its input channels (a
        grouped convolution's chunk had been every channel, all its per-sample gradients built
        at once: 8x the predicted peak for ``groups=2`` at n = 1024; probe 231)."""
        per_out = self.output_grads.shape[2] // self.groups
        per_in = self.inputs.shape[1] // self.groups
        if per_out <= channels:
            span = channels // per_out
            return [(slice(first * per_out, last * per_out), slice(first * per_in, last * per_in),
                     last - first) for first in range(0, self.groups, span)
                    for last in [min(first + span, self.groups)]]
        return [(slice(group * per_out + start, group * per_out + min(start + channels, per_out)),
                 slice(group * per_in, (group + 1) * per_in), 1)
                for group in range(self.groups) for start in range(0, per_out, channels)]


#: On an accelerator, the samples-as-groups route's multiply-adds count this many times:
#: cuDNN's weight gradient with ``n g`` groups ran at 0.11-2.3 trillion multiply-adds a second
#: on an H200 (float32, TF32 off), 1.8 to 8.7 times slower than the same multiply-adds as the
#: patches' batched matrix products, patches formed included, on ResNet-18's convolutions at
#: n = 128; every one of its 20 was faster by patches (``benchmarks/conv_routes.py``). A
#: one-group convolution then always takes the patches route, whose cost is at most those
#: multiply-adds.
GROUPED_SLOWDOWN = 2.0


def route_costs(rows: int, positions: int, channels_in: int, channels_out: int,
                kernel_size: int, groups: int, device_type: str = "cpu") -> tuple[float, float]:
    """Multiply-adds of ``(patches, samples as groups)`` for a convolution's weight Gram: the
    patches route's cheaper way (the position-pair identity, or explicit per-sample gradients:
    the grouped convolution's multiply-adds as matrix products;
    :func:`~hessrank.curvature.rules.factors.kronecker_costs`), and the grouped convolution's,
    counted :data:`GROUPED_SLOWDOWN` times on a device other than the CPU.

    Args:
        rows: ``K n`` Gram rows.
        positions: output positions ``T``.
        channels_in, channels_out: the convolution's channels.
        kernel_size: kernel offsets (``k_h k_w``).
        groups: the convolution's groups (the patches route serves one group only).
        device_type: where the factors are (``"cpu"``, ``"cuda"``).
    """
    weight = channels_out * channels_in // groups * kernel_size
    explicit = float(rows) * positions * weight + float(rows) ** 2 * weight
    grouped = explicit * (GROUPED_SLOWDOWN if device_type != "cpu" else 1.0)
    if groups != 1:
        return float("inf"), grouped
    pair, _ = kronecker_costs(rows, positions, channels_in * kernel_size, channels_out)
    return min(pair, explicit), grouped


@register_rule
class ConvRule(TensorRule):
    name = "conv"
    module_types = (nn.Conv1d, nn.Conv2d)

    def tensor_factors(self, module: nn.Module, layer_input: Tensor, output_grads: Tensor,
                       num_samples: int, analysed: frozenset[str]) -> Factors | None:
        if not isinstance(module, nn.Conv1d | nn.Conv2d):
            return None
        spatial = 1 if isinstance(module, nn.Conv1d) else 2
        if layer_input.dim() != spatial + 2 or layer_input.shape[0] != num_samples:
            return None
        if {layer_input.dtype, output_grads.dtype} != {module.weight.dtype}:
            # (under autocast: torch's convolution backward of mixed dtypes had raised oneDNN's
            # unexplained error; the general path's check names the lower precision; probe 189)
            return None
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(layer_input, module._reversed_padding_repeated_twice, mode=mode)
        kernel, stride, dilation = (_pair(module.kernel_size), _pair(module.stride),
                                    _pair(module.dilation))
        if spatial == 1:
            x, output_grads = x.unsqueeze(-2), output_grads.unsqueeze(-2)
        weight_shape = module.weight.shape if "weight" in analysed else None
        return ConvFactors(x, output_grads, kernel, stride, dilation, module.groups, weight_shape,
                           "bias" in analysed)

    def working_bytes(self, module: nn.Module, layer_output: Tensor | tuple[Tensor, ...],
                      num_cotangents: int, num_samples: int, num_params: int) -> int:
        """On the samples-as-groups route, :meth:`ConvFactors.gram`'s block of per-sample
        gradients (``K n`` rows, at most half :data:`CHUNK_BYTES`), one cotangent's from torch's
        backward beside it (a sixth of a ``groups=16`` convolution's peak had not been
        predicted; probe 231) and the input's patches at every output position (``n C_in
        prod(kernel) positions``: what torch's backward may unfold); where :func:`route_costs`
        picks the position-pair route, the patches (what it forms) or its blocks
        (:func:`pair_route_bytes`), whichever is larger."""
        default = super().working_bytes(module, layer_output, num_cotangents, num_samples,
                                        num_params)
        if not isinstance(module, nn.Conv1d | nn.Conv2d) or not isinstance(layer_output, Tensor):
            return default
        positions = layer_output[0, 0].numel()
        kernel_size = math.prod(module.kernel_size)
        patches = (num_samples * module.in_channels * kernel_size * positions
                   * layer_output.element_size())
        # torch's CPU weight gradient holds up to about twice the (padded) input beside it,
        # more than the patches of a 1x1 or strided kernel count (a ResNet shortcut's 1x1
        # stride-2 convolution had peaked at 2.2x its prediction; probe 236)
        patches = max(patches, 2 * num_samples * module.in_channels * positions
                      * math.prod(module.stride) * layer_output.element_size())
        block = min(num_cotangents * num_samples * num_params * layer_output.element_size(),
                    CHUNK_BYTES // 2)
        by_groups = block + block // num_cotangents + patches
        rows = num_cotangents * num_samples
        patch_cost, groups_cost = route_costs(rows, positions, module.in_channels,
                                              module.out_channels, kernel_size, module.groups,
                                              layer_output.device.type)
        pair, explicit = kronecker_costs(rows, positions, module.in_channels * kernel_size,
                                         module.out_channels)
        if patch_cost >= groups_cost:  # (ConvFactors.position_pairs)
            return by_groups
        if pair >= explicit:
            return max(default, patches)
        return max(default, patches,
                   pair_route_bytes(rows, positions, layer_output.element_size()))


def patches(inputs: Tensor, kernel: tuple[int, int], stride: tuple[int, int],
            dilation: tuple[int, int], output_size: tuple[int, ...]) -> Tensor:
    """``[n, T, C_in k_h k_w]``: the input patch each output position reads, features ordered
    as the weight's ``(C_in, k_h, k_w)`` (``F.unfold``'s layout, built from one strided slice
    per kernel offset, several times faster than ``F.unfold`` on CPU).

    Args:
        inputs: ``[n, C_in, H, W]``, padded.
        output_size: ``(H_out, W_out)``.
    """
    n, channels = inputs.shape[:2]
    h_out, w_out = output_size
    (sh, sw), (dh, dw) = stride, dilation
    slices = [inputs[:, :, a * dh: a * dh + (h_out - 1) * sh + 1: sh,
                     b * dw: b * dw + (w_out - 1) * sw + 1: sw]
              for a in range(kernel[0]) for b in range(kernel[1])]
    stacked = torch.stack(slices, dim=2)  # [n, C_in, k_h k_w, H_out, W_out]
    return stacked.reshape(n, channels * kernel[0] * kernel[1], -1).transpose(1, 2)


def _pair(sizes: tuple[int, ...]) -> tuple[int, int]:
    """A convolution's per-dimension sizes as ``(h, w)``; a 1-d one has ``h = 1``."""
    return (1, sizes[0]) if len(sizes) == 1 else (sizes[0], sizes[1])
