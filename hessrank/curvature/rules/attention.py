"""``nn.MultiheadAttention`` used as self-attention: its in-projection and its out-projection.

With ``x [n, L, E]`` the layer's input, ``[q, k, v] = x W_in^T + b_in`` split into ``h`` heads of
``d = E / h``, ``P = softmax(q k^T / sqrt(d))`` per head, ``A = P v`` (heads merged) and
``y = A W_out^T + b_out``: the out-projection is a linear layer on ``A`` (Kronecker factors
``A`` and ``dy`` over the ``L`` positions), the in-projection one on ``x`` whose output
gradients ``[dq, dk, dv]`` follow from ``dy`` by attention's backward, written out here for all
samples and cotangents at once: ``dA = dy W_out``, ``dv = P^T dA``, ``dP = dA v^T``,
``dS = P * (dP - rowsum(dP * P))``, ``dq = dS k / sqrt(d)``, ``dk = dS^T q / sqrt(d)``. The
attention weights the module may also return (averaged over heads or not) add their gradient to
``dP``. ``F.multi_head_attention_forward`` uses ``out_proj``'s parameters without calling that
submodule, so no hook sees it: this rule covers it (:attr:`GramRule.children`).

The call's attention mask, key padding mask and causal flag are applied as
``F.multi_head_attention_forward`` applies them, down to a query row whose every key is masked
(left padding under a causal mask): without returned weights the call runs
``scaled_dot_product_attention``, whose softmax gives such a row zero weights (its output is
``b_out``), and so does the rule; with them the call's plain softmax gives NaN, as the rule's does.

Assumes: key and value are the query tensor itself (self-attention, as the module recognises it;
a call with any other key or value, cross-attention, is declined), one embedding size, no
``bias_k``/``bias_v`` or zero attention, evaluation (no dropout). A call outside the last fails
the gradient check, which compares with autograd's gradient through the module's own kernels,
and the general path takes the module.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from hessrank.curvature.rules import Call, GramRule, register_rule
from hessrank.curvature.rules.factors import CHUNK_BYTES, ColumnFactors, Factors, LayerFactors


@register_rule
class AttentionRule(GramRule):
    name = "attention"
    module_types = (nn.MultiheadAttention,)
    children = ("out_proj",)

    def supports(self, module: nn.Module) -> bool:
        return bool(super().supports(module) and isinstance(module, nn.MultiheadAttention)
                    and module._qkv_same_embed_dim and module.bias_k is None
                    and module.bias_v is None and not module.add_zero_attn)

    def working_bytes(self, module: nn.Module, layer_output: Tensor | tuple[Tensor, ...],
                      num_cotangents: int, num_samples: int, num_params: int) -> int:
        """The score-sized tensors ``[n, h, L, L]`` the rule holds at once: the scores and
        their mask, the weights, and for ``K`` cotangents the weights' gradients and a product
        of theirs (a transformer layer over 128 tokens peaked at 5.6x a prediction without
        them; probe 71); and the default's per-sample gradients."""
        output = layer_output if isinstance(layer_output, Tensor) else layer_output[0]
        if not isinstance(module, nn.MultiheadAttention) or output.dim() != 3:
            return super().working_bytes(module, layer_output, num_cotangents, num_samples,
                                         num_params)
        length = output.shape[1] if module.batch_first else output.shape[0]
        scores = num_samples * module.num_heads * length**2 * output.element_size()
        return (3 + 2 * num_cotangents) * scores + super().working_bytes(
            module, layer_output, num_cotangents, num_samples, num_params)

    def factors(self, module: nn.Module, layer_input: Tensor | PackedSequence,
                layer_output: Tensor | tuple[Tensor, ...],
                output_grads: Tensor | tuple[Tensor, ...], num_samples: int,
                analysed: frozenset[str], call: Call = ((), {})) -> dict[str, Factors] | None:
        if (not isinstance(module, nn.MultiheadAttention) or not isinstance(layer_input, Tensor)
                or not isinstance(output_grads, tuple) or layer_input.dim() != 3):
            return None
        try:
            options = inspect.signature(module.forward).bind(*call[0], **call[1]).arguments
        except TypeError:
            return None
        query = options["query"]
        if options["key"] is not query or options["value"] is not query:
            return None  # cross-attention: keys and values of their own (and length)
        x, d_out = layer_input, output_grads[0]
        if not module.batch_first:  # [L, n, E]: the samples are the second dimension
            x, d_out = x.transpose(0, 1), d_out.transpose(1, 2)
        k, (n, length, width) = d_out.shape[0], x.shape
        heads = module.num_heads
        if n != num_samples or k * n * heads * length * length * x.element_size() > CHUNK_BYTES:
            return None
        names: list[str] = [name for name in ("in_proj_weight", "in_proj_bias")
                            if name in analysed]
        with torch.no_grad():
            in_bias = module.in_proj_bias
            qkv = x @ module.in_proj_weight.T + (0 if in_bias is None else in_bias)
            q, key, v = (t.reshape(n, length, heads, -1).transpose(1, 2)  # [n, h, L, d]
                         for t in qkv.chunk(3, dim=-1))
            scale = 1 / math.sqrt(q.shape[-1])
            scores = q @ key.transpose(-1, -2) * scale  # [n, h, L, L]
            mask = _mask(options, n, heads, length, scores)
            if mask is not None:
                scores = scores + mask
            probs = torch.softmax(scores, dim=-1)
            if mask is not None and not options.get("need_weights", True):
                # scaled_dot_product_attention's softmax: a fully masked row has zero weights
                probs = probs.masked_fill((scores == -math.inf).all(dim=-1, keepdim=True), 0)
            del scores, mask  # (the score-sized tensors held at once: working_bytes)
            mixed = (probs @ v).transpose(1, 2).reshape(n, length, width)  # A
        parts: dict[str, Factors] = {}
        if names:  # (out_proj's factors need none of attention's backward)
            d_qkv = _in_projection_grads(module.out_proj.weight, d_out, output_grads[1]
                                         if len(output_grads) == 2 else None,
                                         q, key, v, probs, scale)
            sources = {"in_proj_weight": x, "in_proj_bias": x.new_ones(n, length, 1)}
            activations = torch.cat([sources[name] for name in names], dim=-1)
            shapes = {name: module.get_parameter(name).shape for name in names}
            parts[""] = ColumnFactors(LayerFactors(activations, d_qkv, torch.Size(
                (3 * width, activations.shape[-1])), with_bias=False), shapes)
        if {"out_proj.weight", "out_proj.bias"} & analysed:
            parts["out_proj"] = LayerFactors(
                mixed, d_out, module.out_proj.weight.shape if "out_proj.weight" in analysed
                else None, with_bias="out_proj.bias" in analysed)
        return parts or None


@torch.no_grad()
def _in_projection_grads(out_weight: Tensor, d_out: Tensor, d_weights: Tensor | None,
                         q: Tensor, key: Tensor, v: Tensor, probs: Tensor, scale: float
                         ) -> Tensor:
    """Every cotangent's gradient w.r.t. the in-projection's output, ``[K, n, L, 3E]``, by
    attention's backward.

    Args:
        out_weight: ``out_proj``'s weight ``[E, E]``.
        d_out: the output gradients ``[K, n, L, E]`` (samples first).
        d_weights: the gradients of the returned attention weights where they are used
            downstream (``[K, n, h, L, L]`` per head or ``[K, n, L, L]`` averaged), else None.
        q, key, v: the forward's projections ``[n, h, L, d]``.
        probs: its attention weights ``[n, h, L, L]``.
        scale: its score scale ``1 / sqrt(d)``.
    """
    k, (n, heads, length, _) = d_out.shape[0], q.shape
    d_mixed = (d_out @ out_weight).reshape(k, n, length, heads, -1)
    d_mixed = d_mixed.transpose(2, 3)  # [K, n, h, L, d]
    d_probs = d_mixed @ v.transpose(-1, -2)
    if d_weights is not None:  # the returned attention weights, used downstream
        d_probs += d_weights.unsqueeze(2) / heads if d_weights.dim() == 4 else d_weights
    # dS = P * (dP - rowsum(dP * P)) * scale, in dP's place
    row = (d_probs * probs).sum(dim=-1, keepdim=True)
    d_scores = d_probs.sub_(row).mul_(probs).mul_(scale)
    d_q, d_k = d_scores @ key, d_scores.transpose(-1, -2) @ q
    d_v = probs.transpose(-1, -2) @ d_mixed
    return torch.cat([t.transpose(2, 3).reshape(k, n, length, heads * t.shape[-1])
                      for t in (d_q, d_k, d_v)], dim=-1)


def _mask(options: dict[str, Any], n: int, heads: int, length: int, scores: Tensor
          ) -> Tensor | None:
    """The additive mask ``[n or 1, h or 1, L, L]`` the module's call adds to ``scores``, as
    ``F.multi_head_attention_forward`` forms it: a boolean mask's True entries are ``-inf``,
    ``key_padding_mask`` masks keys per sample, and ``is_causal`` without a key padding mask or
    returned weights is the causal mask itself (the given ``attn_mask`` only hints at it)."""
    attn_mask, padding = options.get("attn_mask"), options.get("key_padding_mask")
    if options.get("is_causal") and padding is None and not options.get("need_weights", True):
        attn_mask = torch.ones(length, length, dtype=torch.bool, device=scores.device).triu(1)

    def additive(mask: Tensor) -> Tensor:
        return (torch.zeros(mask.shape, dtype=scores.dtype, device=scores.device)
                .masked_fill(mask, float("-inf")) if mask.dtype == torch.bool
                else mask.to(scores.dtype))

    total = None
    if attn_mask is not None:
        total = additive(attn_mask)
        total = (total.reshape(n, heads, length, length) if total.dim() == 3
                 else total.reshape(1, 1, length, length))
    if padding is not None:
        keys = additive(padding).reshape(n, 1, 1, length)
        total = keys if total is None else total + keys
    return total
