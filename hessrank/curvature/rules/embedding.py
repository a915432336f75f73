"""``nn.Embedding``: the input is a one-hot choice of rows, so no dense per-sample gradient is
needed.

With tokens ``v_it`` at positions ``t`` and output gradients ``d_ikt``, sample ``i``'s weight
gradient is ``G_ik = sum_t e_{v_it} d_ikt^T`` (rows ``v_it`` only; a ``padding_idx`` row gets none)
and ``<G_ik, G_jl> = sum_{t,u} [v_it = v_ju] (d_ikt . d_jlu)``. Two exact routes, the cheaper one
picked by :func:`route_costs`:

- **token pairs**: the equality mask times the output-gradient dot products, in row chunks;
- **rows**: each sample's gradient restricted to the ``U`` distinct tokens of the batch
  (``[K n, U, d]``, formed by one ``index_add``), and its Gram, in chunks of the embedding
  dimension; the gradient check's claim comes from the same compact rows.

Assumes: the input is a batch of indices (``[n, ...]``, first dimension the sample). Refuses
``max_norm`` (the forward pass rewrites the weight; inside a call
:func:`hessrank.guard.renormalised_embeddings` has rescaled the rows and turned it off),
``scale_grad_by_freq`` (the gradient depends on token counts over the whole batch) and ``sparse``
gradients (inside a call :func:`hessrank.guard.differentiable` has turned them off).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from hessrank.curvature.row_gram import add_row_gram
from hessrank.curvature.rules import TensorRule, register_rule
from hessrank.curvature.rules.factors import CHUNK_BYTES, Claim, Factors


@dataclass
class EmbeddingFactors(Factors):
    """Per-sample factors of an embedding.

    Attributes:
        tokens: ``[n, T]`` indices (at positions of a ``padding_idx`` the output gradients are
            zero).
        output_grads: ``[K, n, T, d]``.
        num_embeddings: rows of the weight ``V``.
    """

    sample_dims = {"tokens": 0, "output_grads": 1}

    tokens: Tensor
    output_grads: Tensor
    num_embeddings: int

    def weighted_gradients(self, weights: Tensor) -> dict[str, Tensor]:
        weighted = torch.einsum("kn,kntd->ntd", weights.to(self.output_grads.dtype),
                                self.output_grads)
        dim = weighted.shape[-1]
        weight = torch.zeros(self.num_embeddings, dim, dtype=weighted.dtype,
                             device=weighted.device)
        return {"weight": weight.index_add_(0, self.tokens.reshape(-1),
                                            weighted.reshape(-1, dim))}

    def gram(self) -> Tensor:
        distinct, inverse = self._distinct()
        return self._pair_gram() if inverse is None else self._row_gram(distinct, inverse)

    def gram_and_claims(self, weights: Tensor, probes: torch.Generator | None = None
                        ) -> tuple[Tensor, dict[str, Claim]]:
        """On the rows route the claim is taken from the compact per-sample gradients whose Gram
        is formed (``w^T Z``, scattered to the distinct tokens' rows)."""
        distinct, inverse = self._distinct()
        if inverse is None:
            return self._pair_gram(), dict(self.weighted_gradients(weights))
        claimed = torch.zeros(self.num_embeddings, self.output_grads.shape[-1],
                              dtype=self.output_grads.dtype, device=self.output_grads.device)
        return self._row_gram(distinct, inverse, (weights, claimed)), {"weight": claimed}

    def _distinct(self) -> tuple[Tensor, Tensor | None]:
        """The batch's distinct tokens, and each token's index among them where
        :func:`route_costs` picks the rows route (None: the token-pairs route)."""
        k, n, positions, dim = self.output_grads.shape
        distinct, inverse = torch.unique(self.tokens, return_inverse=True)
        pairs, rows = route_costs(k * n, positions, distinct.numel(), dim)
        return distinct, None if pairs < rows else inverse

    def _pair_gram(self) -> Tensor:
        k, n, positions, dim = self.output_grads.shape
        flat = self.output_grads.reshape(k * n * positions, dim)
        tokens = self.tokens.reshape(-1).repeat(k)  # token of each row (k, i, t)
        gram = torch.empty(k * n, k * n, dtype=flat.dtype, device=flat.device)
        # a chunk's products and its boolean mask within CHUNK_BYTES (masked in place: a
        # product with the mask would hold a float copy of both, twice the chunk)
        per_sample = k * n * positions * positions * (flat.element_size() + 1)
        chunk = max(1, CHUNK_BYTES // max(1, per_sample))
        for start in range(0, k * n, chunk):
            stop = min(start + chunk, k * n)
            rows = slice(start * positions, stop * positions)
            products = flat[rows] @ flat.T  # [c T, K n T]
            products.masked_fill_(tokens[rows, None] != tokens[None, :], 0.0)
            gram[start:stop] = products.view(stop - start, positions, k * n,
                                             positions).sum(dim=(1, 3))
        return gram

    def _row_gram(self, distinct: Tensor, inverse: Tensor,
                  claim: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """The Gram from the compact gradients ``[K n, U, d]``, in chunks of at most
        :data:`CHUNK_BYTES`, of the embedding dimension and, where one of its columns over
        every distinct token exceeds that, of the distinct tokens too (a bag of words over a
        100k vocabulary at n = 2048 had formed 800 MB at once, twice the predicted peak; probe
        231); with ``claim = (weights [K, n], out [V, d])`` also ``w^T Z`` into the distinct
        tokens' rows of ``out``."""
        k, n, positions, dim = self.output_grads.shape
        count = distinct.numel()
        inverse = inverse.reshape(-1)  # [n T]: each (sample, position)'s distinct token
        sample = torch.arange(n, device=inverse.device).repeat_interleave(positions)
        gram = torch.zeros(k * n, k * n, dtype=self.output_grads.dtype,
                           device=self.output_grads.device)
        columns = max(1, CHUNK_BYTES // max(1, k * n * self.output_grads.element_size()))
        width = min(dim, columns)
        span = max(1, columns // width)  # distinct tokens a chunk holds
        for start in range(0, dim, width):
            part = self.output_grads[..., start:start + width].reshape(k, n * positions, -1)
            for first in range(0, count, span):
                block = min(span, count - first)
                places = None if block == count else torch.nonzero(
                    (inverse >= first) & (inverse < first + block)).squeeze(1)
                # row (k, i, u) of the compact gradients: sample i's at the u-th token
                target = ((torch.arange(k, device=inverse.device)[:, None] * n
                           + (sample if places is None else sample[places])[None, :]) * block
                          + (inverse if places is None else inverse[places])[None, :] - first)
                values = part if places is None else part[:, places]
                compact = torch.zeros(k * n * block, part.shape[-1], dtype=part.dtype,
                                      device=part.device)
                compact.index_add_(0, target.reshape(-1), values.reshape(-1, part.shape[-1]))
                compact = compact.view(k * n, -1)
                add_row_gram(gram, compact)
                if claim is not None:
                    weights, out = claim
                    out[distinct[first:first + block], start:start + width] = (
                        weights.reshape(1, -1).to(compact.dtype) @ compact).view(block, -1)
                del compact, values, target  # (before the next chunk's are formed)
        return gram


def route_costs(rows: int, positions: int, distinct: int, dim: int) -> tuple[float, float]:
    """Multiply-adds of ``(token pairs, rows)`` for an embedding's Gram.

    Args:
        rows: ``K n`` Gram rows.
        positions: tokens per sample ``T``.
        distinct: distinct tokens in the batch ``U``.
        dim: embedding dimension ``d``.
    """
    pairs = float(rows * positions) ** 2 * dim
    compact = float(rows) * positions * dim + float(rows) ** 2 * distinct * dim
    return pairs, compact


@register_rule
class EmbeddingRule(TensorRule):
    name = "embedding"
    module_types = (nn.Embedding,)

    def supports(self, module: nn.Module) -> bool:
        return (super().supports(module) and module.max_norm is None
                and not module.scale_grad_by_freq and not module.sparse)

    def tensor_factors(self, module: nn.Module, layer_input: Tensor, output_grads: Tensor,
                       num_samples: int, analysed: frozenset[str]) -> Factors | None:
        if (not isinstance(module, nn.Embedding) or layer_input.dim() < 1
                or layer_input.shape[0] != num_samples
                or "weight" not in analysed or layer_input.is_floating_point()):
            return None
        k = output_grads.shape[0]
        tokens = layer_input.reshape(num_samples, -1)
        grads = output_grads.reshape(k, num_samples, tokens.shape[1], -1)
        if module.padding_idx is not None:  # no gradient reaches the padding row
            grads = grads * (tokens != module.padding_idx)[None, :, :, None]
        return EmbeddingFactors(tokens, grads, module.num_embeddings)

    def working_bytes(self, module: nn.Module, layer_output: Tensor | tuple[Tensor, ...],
                      num_cotangents: int, num_samples: int, num_params: int) -> int:
        """The default (a chunk), and beside it the output gradients gathered for a chunk of
        the distinct tokens, with their indices (at most ``K n T`` rows of ``d`` entries and two
        int64 each): the rows route's (the embedding rule had predicted the chunk alone; probe
        231)."""
        default = super().working_bytes(module, layer_output, num_cotangents, num_samples,
                                        num_params)
        if not isinstance(layer_output, Tensor) or not layer_output.dim():
            return default
        entries = num_cotangents * layer_output.numel()
        return default + entries * layer_output.element_size() + 16 * (
            entries // layer_output.shape[-1])
