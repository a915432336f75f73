"""Per-sample factors a rule hands back: the Gram block and the check's weighted gradient.

Every kind of factors answers two questions from the same data (so that the gradient check, which
verifies :meth:`Factors.weighted_gradients`, also vouches for :meth:`Factors.gram`):

- ``gram()``: the ``[K n, K n]`` Gram matrix of the layer's per-sample gradients, row order
  ``(k, i)``;
- ``weighted_gradients(w)``: ``sum_{k,i} w_ki G_ki`` for each analysed parameter;
- ``gram_and_claims(w, probes)``: both at once, which :mod:`hessrank.curvature.gram` calls: a
  route that forms explicit per-sample gradients takes the weighted sum from those very rows, so
  the check verifies the matrix whose Gram is taken, at ``K n P`` multiply-adds instead of another
  pass over the factors; the Kronecker routes without them claim a wide weight's gradient
  through a random probe (:class:`Projected`), ``n T r (d_in + d_out)`` multiply-adds instead of
  the ``n T d_in d_out`` of forming it.

:class:`LayerFactors` is the Kronecker structure of a layer whose gradient is a sum of outer
products: for a weight used as ``out_t = W a_t (+ b)`` at positions ``t`` (one position for a
plain linear layer, the output pixels of a convolution, the tokens of a sequence), sample ``i``'s
gradient for cotangent ``k`` is ``G_ik = sum_t d_ikt a_it^T`` and its bias gradient ``sum_t d_ikt``.
The Gram entries follow from the factors alone:
``<G_ik, G_jl> = sum_{t,u} (a_it . a_ju)(d_ikt . d_jlu)``.
:class:`SampleGradients` holds explicit per-sample gradients of small parameters (norm layers'
affine parameters), for which the Gram is one product. :class:`ColumnFactors` splits one
Kronecker layer's weight into several parameters (an LSTM's weights and biases).
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, cast

import torch
from torch import Tensor

from hessrank.curvature.row_gram import add_row_gram, row_gram

#: Bytes of intermediate tensors a rule's Gram may hold at once (it works in chunks above).
CHUNK_BYTES = 256 * 2**20
#: Bytes of one block of explicit per-sample gradients: formed, read by the Gram's GEMM while
#: still in the last-level cache, and freed. Measured on a 32 MiB L3, n = 128: the LSTM's
#: per-sample gradients and their Gram 47 ms in one 40 MiB block, 27 ms in 5-10 MiB ones; a
#: 256-unit token Linear's 20 ms in one 16 MiB block, 15-16 ms in 4-8 MiB ones.
EXPLICIT_BLOCK_BYTES = 8 * 2**20

#: Probe columns ``r`` of a :class:`Projected` claim.
PROBE_COLUMNS = 32
#: A projected difference's norm counts this many times its expected size (see :class:`Projected`).
PROBE_STRICTNESS = 4.0


@dataclass
class Projected:
    """A claimed gradient ``C`` (``[d_out, ...]``, flattened to ``[d_out, m]``) given through its
    product ``C R`` with a Gaussian probe ``R`` ``[m, r]``: Freivalds' check of a matrix product,
    without forming ``C`` (which costs as much as the weight gradient of a backward pass).

    For autograd's gradient ``T``, ``||(C - T) R||^2 / r`` estimates ``||C - T||^2`` without
    bias; :meth:`excess` counts it ``PROBE_STRICTNESS^2 = 16`` times, so the check fails every
    claim that the comparison of the whole matrices fails unless ``||(C - T) R||^2 <
    ||C - T||^2 r / 16``, a chi-square tail: at worst (``C - T`` of rank one)
    ``P(chi2_32 < 2) < 2e-14`` per layer, and less the higher the rank. The price is a tolerance
    4x tighter for rounding differences, far from binding (they sit 10^2-10^3 below it), and a
    failed check only sends the layer to the general path.

    Attributes:
        product: ``C R``, ``[d_out, r]``.
        probe: ``R``, ``[m, r]``.
        transposed: the parameter holds ``C^T`` (``[m, d_out]``, a weight stored input-major):
            autograd's gradient is transposed before the comparison.
    """

    product: Tensor
    probe: Tensor
    transposed: bool = False

    def excess(self, true: Tensor) -> Tensor:
        """``16 ||(C - T) R||^2 / r``: the squared difference from autograd's gradient ``true``
        as the check counts it (a float64 scalar on the gradient's device)."""
        true = true.T if self.transposed else true
        difference = self.product - true.reshape(self.product.shape[0], -1) @ self.probe
        return (PROBE_STRICTNESS**2 * torch.linalg.vector_norm(difference).double() ** 2
                / self.probe.shape[1])


#: A claimed gradient: the tensor itself, or its product with a probe.
Claim = Tensor | Projected


class Factors(ABC):
    """What a rule computes for one layer (see the module docstring)."""

    #: Tensor fields with a sample dimension: name -> that dimension. With them the factors of
    #: every process of a data-parallel group can be gathered (:meth:`gathered`); without, a
    #: sharded problem takes the general path for the layer.
    sample_dims: ClassVar[dict[str, int]] = {}

    @property
    def gatherable(self) -> bool:
        """Whether :meth:`gathered` can build the factors of the global batch."""
        return bool(self.sample_dims)

    def gathered(self, gather: Callable[[Tensor, int], Tensor]) -> Factors:
        """The factors of the global batch from ``gather(tensor, sample_dim)`` (an all-gather
        along the sample dimension)."""
        return dataclasses.replace(self, **{  # type: ignore[type-var]
            name: gather(getattr(self, name), dim) for name, dim in self.sample_dims.items()})

    @abstractmethod
    def weighted_gradients(self, weights: Tensor) -> dict[str, Tensor]:
        """``sum_{k,i} w_ki G_ki`` for each analysed parameter (``weights``: ``[K, n]``), keyed
        by the parameter's local name: what the factors claim the gradient of
        ``sum_{k,i} w_ki <f_i, s_ki>`` to be."""

    @abstractmethod
    def gram(self) -> Tensor:
        """``[K n, K n]`` Gram of the per-sample gradients, row order ``(k, i)``."""

    def gram_and_claims(self, weights: Tensor, probes: torch.Generator | None = None
                        ) -> tuple[Tensor, dict[str, Claim]]:
        """``(gram(), weighted_gradients(weights))``, sharing whatever the two have in common.

        With ``probes`` (a CPU generator) a claim may come as a :class:`Projected` product where
        forming it would cost a pass over the factors; without, every claim is the tensor."""
        return self.gram(), dict(self.weighted_gradients(weights))


@dataclass
class SampleGradients(Factors):
    """Explicit per-sample gradients ``{local name: [K, n, *shape]}`` of small parameters."""

    gradients: dict[str, Tensor]

    @property
    def gatherable(self) -> bool:
        return True

    def gathered(self, gather: Callable[[Tensor, int], Tensor]) -> Factors:
        return SampleGradients({name: gather(g, 1) for name, g in self.gradients.items()})

    def weighted_gradients(self, weights: Tensor) -> dict[str, Tensor]:
        return {name: torch.einsum("kn,kn...->...", weights.to(g.dtype), g)
                for name, g in self.gradients.items()}

    def gram(self) -> Tensor:
        flat = torch.cat([g.reshape(g.shape[0] * g.shape[1], -1)
                          for g in self.gradients.values()], dim=1)
        return row_gram(flat)


@dataclass
class LayerFactors(Factors):
    """Kronecker-structured per-sample factors of one layer.

    Attributes:
        activations: ``[n, T, d_in]``: the layer input at each of ``T`` positions.
        output_grads: ``[K, n, T, d_out]``: the backpropagated output gradient at each position.
        weight_shape: shape of the weight parameter (``None`` if it is not analysed).
        with_bias: whether the bias is analysed.
        weight_transposed: the weight is stored ``[d_in, d_out]`` (``y = x W + b``, as
            HuggingFace's ``Conv1D``) instead of ``nn.Linear``'s ``[d_out, d_in]``.
    """

    sample_dims = {"activations": 0, "output_grads": 1}

    activations: Tensor
    output_grads: Tensor
    weight_shape: torch.Size | None
    with_bias: bool
    weight_transposed: bool = False

    def _as_weight(self, claim: Tensor) -> Tensor:
        """A ``[d_out, d_in]`` claim in the weight parameter's layout."""
        assert self.weight_shape is not None
        return (claim.T if self.weight_transposed else claim).reshape(self.weight_shape)

    def weighted_gradients(self, weights: Tensor) -> dict[str, Tensor]:
        """``sum_{k,i} w_ki G_ki`` for each analysed parameter (``weights``: ``[K, n]``).

        This is what the factors claim the gradient of ``sum_{k,i} w_ki <f_i, s_ki>`` to be.
        """
        weighted, rows = self._weighted_rows(weights)
        out = {}
        if self.weight_shape is not None:  # one GEMM over all (sample, position) rows
            out["weight"] = self._as_weight(weighted.T @ rows)
        if self.with_bias:
            out["bias"] = weighted.sum(dim=0)
        return out

    def _weighted_rows(self, weights: Tensor) -> tuple[Tensor, Tensor]:
        """``sum_k w_ki d_ikt`` and ``a_it`` as ``[n T, d_out]`` and ``[n T, d_in]`` rows."""
        k, n, positions, d_out = self.output_grads.shape
        scale = weights.to(self.output_grads.dtype).reshape(k, n, 1, 1)
        weighted = (self.output_grads[0] * scale[0] if k == 1
                    else (scale * self.output_grads).sum(dim=0))
        return (weighted.reshape(n * positions, d_out),
                self.activations.reshape(n * positions, self.activations.shape[-1]))

    def gram(self) -> Tensor:
        """With one position, the weight and bias share one ``D D^T``: ``(D D^T) * (A A^T + 1)``.
        With many, the cheaper of the position-pair identity and explicit per-sample gradients
        (:func:`kronecker_costs`).
        """
        if self._explicit_pays():
            return self._explicit_gram_and_claims(None)[0]
        activations, output_grads = self.activations, self.output_grads
        k, n, positions, d_out = output_grads.shape
        rows = output_grads.reshape(k * n, positions, d_out)
        if positions == 1:
            output_gram = row_gram(rows[:, 0])
            if self.weight_shape is None:
                return output_gram
            activation_gram = row_gram(activations[:, 0])
            if self.with_bias:
                activation_gram += 1.0
            # Entry ((k, i), (l, j)) takes (a_i . a_j): broadcast over k and l.
            output_gram.view(k, n, k, n).mul_(activation_gram[None, :, None, :])
            return output_gram
        summed = rows.sum(dim=1)
        gram = row_gram(summed) if self.with_bias else torch.zeros(
            k * n, k * n, dtype=rows.dtype, device=rows.device)
        if self.weight_shape is None:
            return gram
        # in blocks of rows: the pair tensors, [rows, K n, T, T] each, had been formed whole
        # (three of 244 MiB for 2,000 samples of 4 tokens, outside the prediction; probe 108)
        block = pair_route_rows(k * n, positions, rows.element_size())
        for start in range(0, k * n, block):
            stop = min(start + block, k * n)
            samples = torch.arange(start, stop, device=rows.device) % n  # row k n + i: sample i
            inner_a = torch.einsum("ptd,msd->pmts", activations[samples], activations).repeat(
                1, k, 1, 1)
            inner_d = torch.einsum("ptd,qsd->pqts", rows[start:stop], rows)
            gram[start:stop] += (inner_a * inner_d).sum(dim=(2, 3))
        return gram

    def gram_and_claims(self, weights: Tensor, probes: torch.Generator | None = None
                        ) -> tuple[Tensor, dict[str, Claim]]:
        """On the explicit route the claims come from the per-sample gradients whose Gram is
        taken; on the others, with ``probes``, the weight's claim is :class:`Projected` where
        that is cheaper (``n T r (d_in + d_out) + r d_in d_out`` multiply-adds with the probe's
        product of the true gradient, instead of ``n T d_in d_out``), the bias's exact."""
        if self._explicit_pays():  # a weight with many positions, per-sample gradients formed
            return self._explicit_gram_and_claims(weights)
        k, n, positions, d_out = self.output_grads.shape
        d_in = self.activations.shape[-1]
        if self.weight_shape is not None and probes is not None and (
                _projection_pays(n * positions, d_in, d_out)):
            grads = self.output_grads.reshape(k * n * positions, d_out)
            rows = self.activations.reshape(n * positions, d_in)
            probe = torch.randn(d_in, PROBE_COLUMNS, generator=probes,
                                dtype=rows.dtype).to(rows.device)
            # sum_{k,i,t} w_ki d_ikt (a_it . R): the weights scale the narrow [n T, r] side.
            scale = weights.to(grads.dtype).reshape(k, n, 1, 1)
            probed = (scale * (rows @ probe).reshape(1, n, positions, -1)).reshape(
                k * n * positions, -1)
            projected: dict[str, Claim] = {
                "weight": Projected(grads.T @ probed, probe, self.weight_transposed)}
            if self.with_bias:
                projected["bias"] = scale.expand(k, n, positions, 1).reshape(-1) @ grads
            return self.gram(), projected
        return super().gram_and_claims(weights)

    def _explicit_pays(self) -> bool:
        """Whether :func:`kronecker_costs` picks explicit per-sample gradients of the weight over
        the position-pair identity (never with one position or without the weight)."""
        k, n, positions, d_out = self.output_grads.shape
        if self.weight_shape is None or positions == 1:
            return False
        pair_cost, dense_cost = kronecker_costs(k * n, positions, self.activations.shape[-1],
                                                d_out)
        return pair_cost >= dense_cost

    def _explicit_gram_and_claims(self, weights: Tensor | None
                                  ) -> tuple[Tensor, dict[str, Claim]]:
        """The Gram of the explicit per-sample gradients ``[K n, d_out (d_in + bias)]`` (the bias
        as one more input column, the output gradients summed over the positions) and, with
        ``weights``, the claims ``w^T Z`` from the same rows. The rows are formed a block of
        output units at a time and their Gram accumulated: a block's rows ``[K n, block, d_in +
        bias]`` and the copy its contraction makes of its output gradients ``[K, n, T, block]``
        (a slice of their last dimension) within :data:`EXPLICIT_BLOCK_BYTES` each. Nothing the
        size of the activations is formed (with the bias's column of ones appended, a second
        copy of a convolution's patches had doubled the route's memory; probe 147)."""
        assert self.weight_shape is not None
        activations, output_grads = self.activations, self.output_grads
        k, n, positions, d_out = output_grads.shape
        width = activations.shape[-1] + int(self.with_bias)
        block = max(1, EXPLICIT_BLOCK_BYTES // max(
            1, k * n * max(width, positions) * activations.element_size()))
        gram = torch.zeros(k * n, k * n, dtype=activations.dtype, device=activations.device)
        claimed = []
        for start in range(0, d_out, block):
            part = output_grads[..., start:start + block]
            rows = torch.einsum("kntd,ntf->kndf", part, activations)
            if self.with_bias:
                rows = torch.cat([rows, part.sum(dim=2).unsqueeze(-1)], dim=-1)
            rows = rows.reshape(k * n, -1)
            add_row_gram(gram, rows)
            if weights is not None:
                claimed.append((weights.reshape(1, -1).to(rows.dtype) @ rows).reshape(-1, width))
        if weights is None:
            return gram, {}
        together = torch.cat(claimed)
        claims: dict[str, Claim] = {
            "weight": self._as_weight(together[:, :self.activations.shape[-1]])}
        if self.with_bias:
            claims["bias"] = together[:, -1]
        return gram, claims


def _projection_pays(rows: int, d_in: int, d_out: int) -> bool:
    """Whether a :class:`Projected` weight claim over ``rows`` (sample, position) rows costs less
    than forming the claim."""
    return (PROBE_COLUMNS * (rows * (d_in + d_out) + d_in * d_out)
            < rows * d_in * d_out)


#: ``[block, rows, T, T]`` tensors the position-pair route holds at once: the activations'
#: inner products before and after their repeat over the ``K`` columns, the output gradients',
#: and their product.
PAIR_ROUTE_TENSORS = 4


def pair_route_rows(rows: int, positions: int, element: int) -> int:
    """Gram rows the position-pair route forms at once: its :data:`PAIR_ROUTE_TENSORS`
    ``[block, rows, T, T]`` tensors within :data:`CHUNK_BYTES`, at least one row."""
    per_row = PAIR_ROUTE_TENSORS * rows * positions**2 * element
    return max(1, min(rows, CHUNK_BYTES // max(1, per_row)))


def pair_route_bytes(rows: int, positions: int, element: int) -> int:
    """Bytes the position-pair route holds at once for ``rows`` Gram rows of ``positions``
    positions each (``T``): its blocks' tensors (:func:`pair_route_rows`)."""
    return (PAIR_ROUTE_TENSORS * pair_route_rows(rows, positions, element) * rows
            * positions**2 * element)


def kronecker_costs(rows: int, positions: int, d_in: int, d_out: int) -> tuple[float, float]:
    """Multiply-adds of a Kronecker layer's weight Gram by the two exact routes.

    Args:
        rows: ``K n`` Gram rows.
        positions: ``T`` positions per sample.
        d_in, d_out: the weight's input and output sizes.

    Returns:
        ``(position-pair identity, explicit per-sample gradients)``: the pair route forms the
        ``(K n)^2 T^2`` inner products of inputs and of output gradients; the explicit route
        forms the ``K n`` gradients (``T d_in d_out`` each) and their Gram.
    """
    pair = float(rows) ** 2 * positions**2 * (d_in + d_out)
    dense = float(rows) * positions * d_in * d_out + float(rows) ** 2 * d_in * d_out
    return pair, dense


@dataclass
class ColumnFactors(Factors):
    """Several parameters of one module whose per-sample gradients are column blocks of one
    Kronecker layer's weight gradient ``[d_out, sum of widths]`` (an LSTM's input and recurrent
    weights and its biases, all multiplying the gates' gradients): one Gram, the claims split.

    Attributes:
        layer: the stacked factors (a weight, no bias).
        shapes: ``{parameter's local name: its shape}`` in column order; a parameter of shape
            ``[d_out, *rest]`` takes ``prod(rest)`` columns (a bias one).
    """

    layer: LayerFactors
    shapes: dict[str, torch.Size]

    @property
    def gatherable(self) -> bool:
        return self.layer.gatherable

    def gathered(self, gather: Callable[[Tensor, int], Tensor]) -> Factors:
        return ColumnFactors(cast(LayerFactors, self.layer.gathered(gather)), self.shapes)

    def weighted_gradients(self, weights: Tensor) -> dict[str, Tensor]:
        return self._split(self.layer.weighted_gradients(weights)["weight"])

    def gram(self) -> Tensor:
        return self.layer.gram()

    def gram_and_claims(self, weights: Tensor, probes: torch.Generator | None = None
                        ) -> tuple[Tensor, dict[str, Claim]]:
        gram, claims = self.layer.gram_and_claims(weights)  # whole claims: they are split
        return gram, dict(self._split(cast(Tensor, claims["weight"])))

    def _split(self, stacked: Tensor) -> dict[str, Tensor]:
        """The stacked weight's column blocks, one per parameter, in their shapes."""
        out, start = {}, 0
        for name, shape in self.shapes.items():
            width = shape.numel() // shape[0]
            out[name] = stacked[:, start:start + width].reshape(shape)
            start += width
        return out


@dataclass
class SummedFactors(Factors):
    """Factors of disjoint parameter sets of one module (the layers and directions of an RNN, a
    GRU's input and recurrent weights): the module's Gram is the sum of theirs, its claims their
    union."""

    parts: list[Factors]

    @property
    def gatherable(self) -> bool:
        return all(part.gatherable for part in self.parts)

    def gathered(self, gather: Callable[[Tensor, int], Tensor]) -> Factors:
        return SummedFactors([part.gathered(gather) for part in self.parts])

    def weighted_gradients(self, weights: Tensor) -> dict[str, Tensor]:
        return {name: claim for part in self.parts
                for name, claim in part.weighted_gradients(weights).items()}

    def gram(self) -> Tensor:
        return cast(Tensor, sum(part.gram() for part in self.parts))

    def gram_and_claims(self, weights: Tensor, probes: torch.Generator | None = None
                        ) -> tuple[Tensor, dict[str, Claim]]:
        grams, claims = [], {}
        for part in self.parts:
            gram, part_claims = part.gram_and_claims(weights, probes)
            grams.append(gram)
            claims.update(part_claims)
        return cast(Tensor, sum(grams)), claims
