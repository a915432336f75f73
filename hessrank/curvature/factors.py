"""The empirical Fisher and the GGN as matrix-free operators: ``v -> F F^T v``.

``F`` has the columns ``J_i^T s_ik`` (cotangents from :mod:`hessrank.curvature.loss`), so
``F^T v`` is ``<s_ik, J_i v>`` and ``F u`` one vector-Jacobian product. ``J v`` comes from the
double-backward trick on the forward graph: ``g(u) = J^T u`` is linear in ``u``, and the gradient
of ``<g(u), v>`` w.r.t. ``u`` is ``J v``. A product costs two backward passes through the graph
built once; no Gram matrix is formed, so this serves where ``nC`` or ``n`` is too large for one.

Data-parallel (a :class:`~hessrank.distributed.ShardedProblem`): the cotangents are those of the
global loss (derived from the gathered outputs), each process applies its samples' part of
``F F^T`` and the products are summed over the processes by one all-reduce.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from hessrank.curvature.differences import (
    COTANGENT,
    FIRST,
    check_custom_functions,
    loss_needs,
)
from hessrank.curvature.hessian import second_order
from hessrank.curvature.loss import check_no_parameter_terms
from hessrank.curvature.operator import ParameterOperator, stacked_rows
from hessrank.distributed import ShardedProblem, shard_cotangents, whole_batch
from hessrank.guard import ModuleGenerators, raise_if_signalled
from hessrank.problem import (
    _GRAPHLESS,
    BatchNotFirst,
    CurvatureProblem,
    GraphBytes,
    UnrepeatableForward,
    difference_text,
    mixed_samples_difference,
    refuse_mixed_samples,
    untested_mixing,
    unused_parameters,
    without_second_derivative,
)


class FactorOperator(ParameterOperator):
    """``V -> V F F^T`` (rows times the EF or GGN) on the analysed parameters, flattened (``P``).

    Args:
        problem: the validated problem.
        cotangents_of: ``(outputs, targets) -> [K, n, *out]`` output-side factors of a batch.
        method: the method's name, for messages.
        check_working_memory: called once the forward pass has run, before the output-side
            factors are formed, with the bytes the forward's graph, a product through it
            (:attr:`product_graphs`) and ``output_side_bytes`` of its outputs hold; it raises
            over the budget.
        output_side_bytes: the peak bytes of ``cotangents_of`` on given outputs.
    """

    #: A product is a double backward (``J v``) and a backward (``J^T u``) through the graph:
    #: counted as one graph beyond it, calls peaked at 2 (convolutions, ``fisher_lanczos``)
    #: and 1.7 (attention over 128 tokens, ``ggn_lanczos``) times the prediction (probe 74).
    product_graphs = 3.0

    def __init__(self, problem: CurvatureProblem,
                 cotangents_of: Callable[[Tensor, Tensor], Tensor], method: str,
                 check_working_memory: Callable[[int], None] | None = None,
                 output_side_bytes: Callable[[Tensor], int] | None = None) -> None:
        super().__init__(problem)
        graph = GraphBytes(problem)
        with second_order(problem.dtype), graph.counting():  # J^T u: differentiated below
            outputs = problem.forward()
        if isinstance(problem, ShardedProblem) and isinstance(outputs, Tensor):
            refuse_mixed_samples(problem.local(), outputs, "process's shard")
        self._problem, self._method = problem, method
        if isinstance(outputs, Tensor):  # else shard_cotangents names the problem
            self._dummy = torch.zeros_like(outputs, requires_grad=True)
            with second_order(problem.dtype), graph.counting():
                pieces = torch.autograd.grad(outputs, self.params, grad_outputs=self._dummy,
                                             create_graph=True, allow_unused=True)
            self.graph_bytes = graph.total
            self.unused = unused_parameters(pieces)
            self._used = [i for i in range(len(pieces)) if i not in self.unused]
            self._transposed = [pieces[i] for i in self._used]  # J^T u, linear in the dummy u
            check_custom_functions(problem, (FIRST, COTANGENT), loss_needs(method), outputs)
            if check_working_memory is not None and output_side_bytes is not None:
                # the graph (the forward's and J^T u's: the forward's alone was a third of
                # it, and refusals came at a third of the peak; probe 74), what a product
                # through it holds, and the output side, before the latter is formed
                check_working_memory(self.held_by_products() + output_side_bytes(outputs))
        # a model that returns no tensor is named by the loss's checked entry
        self.loss_value = float(problem.loss(
            outputs.detach() if isinstance(outputs, Tensor) else outputs).detach())
        if isinstance(outputs, Tensor):  # (the global batch's loss; probe 207)
            whole, everything = whole_batch(problem, outputs)
            check_no_parameter_terms(whole.loss_fn, everything, whole.targets, problem.params,
                                     problem.names, method)
        self.cotangents = shard_cotangents(problem, cotangents_of, outputs)
        # F's columns are J_i^T s_ki: at most as many independent ones as nonzero s_ki, summed
        # over the processes (whose K may differ by their own rounding). Without the bound a
        # data-parallel call's ranks and intervals reached P, past n (EF) or n C' (GGN); with
        # K n instead, a batch holding samples its loss ignores got another bound than the same
        # samples as a data set, whose ignored batches add nothing (probe 61)
        k = self.cotangents.shape[0]
        nonzero = int(self.cotangents.reshape(k, self.cotangents.shape[1], -1).ne(0)
                      .any(dim=-1).sum())
        self.rank_bound = min(self.dim, self._total(nonzero))
        self._outputs = outputs

    def mixing_note(self) -> str | None:
        """What a model whose samples interact in the batch should know of the factors, None
        where they do not (or it cannot be told): one forward pass of the batch's halves alone,
        without a graph (for a model that draws from its own generator, each half at its rows
        of a batch of the whole's size: :func:`~hessrank.problem.mixed_samples_difference`).
        Not asked of a data set's batches (the data set refuses such a model).
        A model that does not run on half its batch (a graph's adjacency among its inputs) is
        told that it was not tested, and what the factors are if its samples interact.

        Returns:
            The note, or None.
        """
        if isinstance(self._problem, ShardedProblem) or not isinstance(self._outputs, Tensor):
            return None
        meaning = (f"{self._method}'s factors J_i^T s_i hold each sample's Jacobian in the batch "
                   "(its output as the batch computes it), the curvature of this batch's loss "
                   "as exact's Hessian is; fisher and ggn, whose factors need each sample's "
                   "output to depend on that sample alone, refuse such a model")
        try:
            difference = mixed_samples_difference(
                self._problem, self._outputs,
                in_place=bool(ModuleGenerators.read(self._problem.model).states))
        except UnrepeatableForward:
            raise
        except BatchNotFirst as error:  # factors of the outputs' rows, whatever the layout
            return (f"whether the model's output for a sample depends on the other samples of "
                    f"the batch was not tested: the model's output for {error.samples} samples "
                    f"run alone (the first {error.samples} rows of every input) has "
                    f"{error.rows} rows, not {error.samples} (its inputs are not batch first); "
                    f"{self._method}'s factors are those of the outputs' rows, the samples of "
                    "the loss, as the batch computes them")
        except Exception as error:  # noqa: BLE001 - a model that runs on its whole batch only
            raise_if_signalled(error)
            return f"{untested_mixing(error, 'half of the batch')}; where it does, {meaning}"
        if difference is None:
            return None
        return (f"the model's output for a sample depends on the other samples of the batch "
                f"(each half run alone differs "
                f"{difference_text(difference, 'the largest output')}): "
                f"{meaning}")

    def _jacobian_product(self, vector: Tensor) -> Tensor | None:
        """``J v`` (``[n, *out]``) for a flat ``[P]`` vector by double backward, None where no
        output depends on the parameters.

        Raises:
            ValueError: the model's backward cannot be differentiated w.r.t. the gradient it
                receives (a custom autograd.Function's under ``torch.no_grad()``), or
                :func:`~hessrank.problem.without_second_derivative`'s errors.
        """
        chunks = vector.to(self.dtype).split(self.sizes)
        fix = "use method='fisher' or 'ggn' (Gram matrices, first derivatives only)"
        try:
            (jv,) = torch.autograd.grad(self._transposed, self._dummy,
                                        grad_outputs=[chunks[i].view_as(self.params[i])
                                                      for i in self._used],
                                        retain_graph=True, allow_unused=True)
        except RuntimeError as error:
            if self._problem.custom_functions and _GRAPHLESS in str(error):
                raise ValueError(
                    f"{self._method}'s Jacobian-vector products differentiate the model's "
                    "backward pass (J v by double backward), and the backward through the "
                    "custom autograd.Function(s) ("
                    + ", ".join(cls.__qualname__ for cls in self._problem.custom_functions)
                    + ") has no graph (it runs "
                    f"under torch.no_grad() or outside torch): {fix}") from error
            raise without_second_derivative(
                error, "these products differentiate the model's backward pass (J v by double "
                "backward)", fix) from error
        return jv

    def _row(self, vector: Tensor) -> Tensor:
        jv = self._jacobian_product(vector)
        if jv is None:
            return torch.zeros_like(vector)
        coefficients = torch.einsum("kn...,n...->kn", self.cotangents, jv)
        combined = torch.einsum("kn,kn...->n...", coefficients, self.cotangents)
        products = torch.autograd.grad(self._outputs, self.params, grad_outputs=combined,
                                       retain_graph=True, allow_unused=True)
        return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                          for g, p in zip(products, self.params)])

    def matmat(self, vectors: Tensor) -> Tensor:
        """``F F^T`` times each row of ``vectors`` (``[k, P]``); result ``[k, P]``."""
        vectors = vectors.to(dtype=self.dtype, device=self.device)
        self.num_products += vectors.shape[0]
        with second_order(self.dtype):  # a checkpointed block recomputes its forward here
            products = stacked_rows([self._row(row) for row in vectors])
        return products if self.parallel is None else self.parallel.all_reduce(products)
