"""Gram matrices of curvature factors, parameter group by parameter group, every path verified.

The empirical Fisher and the GGN are ``F F^T`` with ``m = K n`` factor columns ``J_i^T s_ik``
(cotangents from :mod:`hessrank.curvature.loss`); their nonzero eigenvalues are those of the
``m x m`` Gram matrix ``F^T F = sum_g F_g^T F_g`` over parameter groups (parameterised modules).
Two paths fill a group's block:

- a **per-module rule** (:mod:`hessrank.curvature.rules`) from the layer's captured input and
  output gradients, without per-sample gradients;
- the **general path** for everything else: per-sample vector-Jacobian products with
  ``torch.func`` (``vmap``), or a per-sample loop in bounded chunks where ``vmap`` cannot go
  (some fused recurrent kernels, data-dependent control flow).

**Verification, on every call.** One extra backward pass with random weights ``w_ki`` gives
autograd's gradient of ``sum_{k,i} w_ki <f_i, s_ki>``, which must equal ``sum_{k,i} w_ki G_ki``
from each path's per-sample factors (a Freivalds-style check: with probability one a wrong factor
fails it, and a pass proves each sample's factors up to rounding). A wide weight of a Kronecker
rule is compared through a random probe on the parameter side as well (Freivalds' own check,
:class:`~hessrank.curvature.rules.factors.Projected`, with a tolerance that keeps it at least as
strict). A rule that fails goes to the general path, and so does one that raises (a bug in the
rule, named in a note; running out of memory is raised); the general path failing means the
samples interact (an error). The general path also checks that each sample's output, computed alone,
equals its row of the batch output.

**Data-parallel** (a :class:`~hessrank.distributed.ShardedProblem`): each process computes and
verifies the factors of its own samples; the processes agree on which rules passed everywhere,
then all-gather the rule layers' activations and output gradients (``n (d_in + K d_out) T``
numbers per layer) or the general path's per-sample factors (``K n P_group``), and every process
forms the global Gram from them.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.func import vjp, vmap
from torch.nn.utils import parametrize
from torch.nn.utils.rnn import PackedSequence
from torch.utils._pytree import tree_flatten

from hessrank.curvature.differences import FIRST, check_custom_functions
from hessrank.curvature.hessian import LONG_SUMS
from hessrank.curvature.row_gram import row_gram
from hessrank.curvature.rules import Call, Factors, GramRule, rule_for
from hessrank.curvature.rules.factors import Claim, Projected
from hessrank.distributed import agreement, parallel_of, sample_range, shard_cotangents
from hessrank.guard import (
    VMAP_FALLBACK_WARNING,
    ModuleGenerators,
    raise_if_signalled,
    warnings_ignored,
)
from hessrank.host import host_floats
from hessrank.problem import (
    BatchNotFirst,
    CurvatureProblem,
    GraphBytes,
    OutputSizes,
    UnrepeatableForward,
    agreement_tolerance,
    difference_text,
    finite_difference,
    graph_nodes,
    lower_precision_cause,
    mixed_samples_difference,
    parameter_holders,
    refuse_not_sample_first,
    repeat_pass,
    sum_terms,
    sums_tolerance,
    transformed,
    untested_mixing,
    unused_parameters,
    unused_parameters_note,
)

#: Bytes of per-sample factors the general path may hold at once.
GENERAL_CHUNK_BYTES = 512 * 2**20
#: A parametrization (``torch.nn.utils.parametrize``) is computed again in the general path's
#: VJPs and differentiated for each sample and cotangent column, which holds, beyond the
#: sample's factor, about this multiple of its forward's saved tensors and output (measured:
#: weight_norm and spectral_norm 1.02-1.10, orthogonal's householder map 1.01-1.04 and cayley
#: map 0.61-0.64, at d = 64 and 256, K = 1 and 4; ``python benchmarks/parametrized_work.py``) ...
PARAMETRIZATION_WORK = 1.25
#: ... or this multiple where its graph holds one of these operations, whose backward works in
#: temporaries it does not save (matrix_exp, orthogonal's default map: 16.02-16.07). Batched
#: over every sample, orthogonal's had run at 14 times a fisher call's budget (probe 209).
HEAVY_BACKWARDS = {"LinalgMatrixExpBackward0": 17.0}
#: Bytes the general path's batched VJPs may hold for the parametrizations they compute again:
#: the samples of a batched VJP are as many as fit (one at least).
PARAMETRIZED_CHUNK_BYTES = 128 * 2**20

#: Name of the general path in results, by how it ran.
VMAP_PATH, LOOP_PATH = "torch.func", "per-sample loop"
#: Why a forward that fails on one sample alone has no per-sample factors.
SAMPLE_ALONE = ("per-sample EF/GGN factors run the model on each sample by itself (a batch of "
                "1), and a forward that needs the whole batch (it mixes the samples, or fixes the "
                "batch size: a state it holds for n samples, an input whose batch dimension is "
                "not the first, such as a recurrent layer's h0 [layers, n, hidden]) has none; "
                "use method='fisher_lanczos'/'ggn_lanczos' (each sample's factor as the batch "
                "computes it), or 'exact'/'lanczos' (the Hessian of the batch's loss)")


@dataclass
class GramAccumulator:
    """Sum of per-group Gram matrices ``[m, m]``; per-layer sums when ``keep_groups`` (a
    layer's Gram is the sum of its groups', :meth:`CurvatureProblem.layers`).

    The sum is kept in the model's dtype (its entries come from products in that dtype) and
    widened to float64 once, by the eigen-solve.
    """

    keep_groups: bool
    problem: CurvatureProblem
    total: Tensor | None = None
    groups: dict[str, Tensor] = field(default_factory=dict)

    def add(self, group: str, gram: Tensor) -> None:
        if self.total is None:
            self.total = gram.clone() if self.keep_groups else gram
        else:
            self.total += gram.to(self.total.dtype)
        if self.keep_groups:
            layer = self.problem.layer_of(group)
            self.groups[layer] = self.groups[layer] + gram if layer in self.groups else gram


@dataclass
class GramResult:
    """The Gram matrix and how each parameter's block was computed.

    Attributes:
        accumulator: total and (optionally) per-group Grams.
        paths: parameter name -> the path that computed its block (a rule's name, ``torch.func``
            or ``per-sample loop``).
        notes: rules that failed their check or raised and were recomputed, and similar facts.
        columns: the factors' columns per sample that can be nonzero, where the Gram has more
            rows per sample (BackPACK's square root of a cross-entropy's output Hessian has
            ``C`` columns, of rank ``C - 1``: the rank is at most ``n`` times this); None where
            the Gram's rows are the factors'.
    """

    accumulator: GramAccumulator
    paths: dict[str, str]
    notes: list[str]
    columns: int | None = None


class CapturedEdge(NamedTuple):
    """Where the capturing backward pass takes a layer output's gradient (:func:`_output_edge`):
    the output's own gradient edge, its version then, and for an output that is a view over
    the whole of its base, the base's edge and the view's ``(shape, stride, offset)`` in the
    base's gradient (None: none)."""

    edge: GradientEdge
    version: int
    base: tuple[GradientEdge, tuple[int, ...], tuple[int, ...], int] | None


def _output_edge(output: Tensor) -> CapturedEdge:
    """The edges of a layer's output: its own, and its base's where the output is a view over
    the whole of a contiguous base (``nn.Linear`` over tokens, ``nn.MultiheadAttention``'s
    batch-first output). An in-place operation on such a view (its version moves) rewrites its
    history, cutting the view's own node out of the graph (its gradient had come back None,
    failing the rule's check, or torch's engine had failed an internal assertion; probe 214),
    while the base's node stays in it: the base's gradient is then the output's, unless the
    base is used elsewhere too (attention's weights, a view of the probabilities that weigh the
    values), which the check refuses."""
    base = output._base
    if (base is None or not base.requires_grad or base.numel() != output.numel()
            or not base.is_contiguous()):
        return CapturedEdge(get_gradient_edge(output), output._version, None)
    return CapturedEdge(get_gradient_edge(output), output._version, (
        get_gradient_edge(base), tuple(output.shape), tuple(output.stride()),
        int(output.storage_offset() - base.storage_offset())))


class _Capture:
    """Forward hooks recording each claimed layer's input, its output's value and the output's
    place in the autograd graph (a gradient edge, :func:`_output_edge`, through which the
    capturing backward pass takes the layer's output gradient).

    The edge stays the layer's own output even when a downstream operation modifies that tensor
    in place (``ReLU(inplace=True)``), or its base's where the output is a view so modified, so
    the forward pass runs unchanged, without copies. A layer
    whose output is not a tensor (or a tuple of them, an RNN's output and final states) that
    requires grad gets no entry in ``edges``.
    """

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.inputs: dict[str, Tensor | PackedSequence | None] = {}
        self.outputs: dict[str, Tensor | tuple[Tensor, ...]] = {}
        self.edges: dict[str, list[CapturedEdge]] = {}
        self.calls: dict[str, int] = dict.fromkeys(modules, 0)
        self.arguments: dict[str, Call] = {}
        # first among the layer's hooks: one of the user's that returns another output (a
        # scaled one) had been captured as the layer's, the rule failing its check and the
        # layer taking the general path, 2.4x slower (probe 231)
        self.handles = [module.register_forward_hook(self._hook(name), with_kwargs=True,
                                                     prepend=True)
                        for name, module in modules.items()]

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            self.calls[name] += 1
            if any(transformed(leaf) for leaf in tree_flatten((args, kwargs, output))[0]
                   if isinstance(leaf, Tensor)):
                # called inside a torch.func transform (a force field's grad of its energy):
                # its tensors must not leave it, and the rule's factors had failed with torch's
                # "tensor may have escaped" (probe 194); the general path takes the layer, as
                # one whose input is not a tensor
                self.inputs[name] = None
                return
            self.arguments[name] = (args, kwargs)
            layer_input = args[0] if args else kwargs.get(_first_parameter(module))
            if isinstance(layer_input, PackedSequence):
                self.inputs[name] = PackedSequence(layer_input.data.detach(), *layer_input[1:])
            else:
                self.inputs[name] = (layer_input.detach() if isinstance(layer_input, Tensor)
                                     else None)
            # A packed sequence's bookkeeping (integer batch sizes and orders, or None) has no
            # gradient: its data tensor stands for it.
            leaves = [leaf for leaf in tree_flatten(output)[0] if leaf is not None and not (
                isinstance(leaf, Tensor) and not leaf.is_floating_point())]
            if leaves and all(isinstance(leaf, Tensor) and leaf.requires_grad for leaf in leaves):
                self.edges[name] = [_output_edge(leaf) for leaf in leaves]
                values = tuple(leaf.detach() for leaf in leaves)
                self.outputs[name] = values if isinstance(output, tuple) else values[0]
        return hook

    def forget(self) -> None:
        """Forget every call recorded so far (a pass restarted)."""
        for records in (self.inputs, self.outputs, self.edges, self.arguments):
            records.clear()
        self.calls = dict.fromkeys(self.calls, 0)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _first_parameter(module: nn.Module) -> str | None:
    """The name of the first parameter of the module's ``forward`` (``input``, ``query``, ``x``...),
    by which a keyword call passes the layer's input; None where it cannot be passed by name.
    Read only for a call without positional arguments."""
    first = next(iter(inspect.signature(module.forward).parameters.values()), None)
    return first.name if first is not None and first.kind in (
        inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY) else None


def unruled_sizes(problem: CurvatureProblem, use_rules: bool) -> list[int]:
    """Parameter counts of the groups whose module no rule covers (every group without
    ``use_rules``): those the general path takes whatever the call."""
    modules = dict(problem.model.named_modules())
    named = dict(zip(problem.names, problem.params))
    return [sum(named[name].numel() for name in names)
            for group, names in problem.modules_with_params().items()
            if not use_rules or group not in modules or rule_for(modules[group]) is None]


def general_path_bytes(group_sizes: Sequence[int], rows: int, element: int) -> int:
    """What the general path holds at once for groups of these parameter counts: the per-sample
    factors of its largest bin (``[rows, P_bin]``, ``rows = K n``, bins of at most
    :data:`GENERAL_CHUNK_BYTES` but one group each at least) three times: as its chunks and as
    their joined copy, or as the chunks and the batched VJP's own terms (one per use of a
    parameter used twice, a tied embedding's: 901 MiB measured against 580 predicted with
    two)."""
    if not group_sizes:
        return 0
    per_bin = max(max(group_sizes),
                  min(sum(group_sizes), GENERAL_CHUNK_BYTES // max(1, rows * element)))
    return 3 * rows * element * per_bin


def parametrization_work(module: nn.Module) -> int:
    """Bytes one sample's VJP holds per cotangent column, beyond its factor, to differentiate
    ``module`` where it is a parametrization's list (which computes the parametrized tensor
    from its originals; the group of the originals): its forward's saved tensors and output,
    times :data:`PARAMETRIZATION_WORK` or :data:`HEAVY_BACKWARDS`'s multiple; 0 for any other
    module. Computes the tensor once (the next pass's state is put back before it,
    :class:`~hessrank.guard.PassState`)."""
    if not isinstance(module, parametrize.ParametrizationList):
        return 0
    saved: dict[int, int] = {}

    def pack(tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        value = module()
    multiple = max([PARAMETRIZATION_WORK, *(HEAVY_BACKWARDS.get(node.name(), 0.0)
                                             for node in graph_nodes([value.grad_fn]))])
    return int(multiple * (sum(saved.values()) + value.numel() * value.element_size()))


def parametrized_chunk(work: int, k: int) -> int:
    """Samples per batched VJP whose parametrizations' ``work`` (bytes a sample and column,
    :func:`parametrization_work`) over ``k`` columns fit :data:`PARAMETRIZED_CHUNK_BYTES`."""
    return max(1, PARAMETRIZED_CHUNK_BYTES // max(1, k * work))


def parametrized_bytes(work: int, k: int, n: int) -> int:
    """What the general path's batched VJPs hold for parametrizations of ``work`` bytes a
    sample and column, over ``k`` columns and ``n`` samples, in chunks of
    :func:`parametrized_chunk`."""
    return min(n, parametrized_chunk(work, k)) * k * work


def working_bytes(graph: GraphBytes, claimed: Mapping[str, tuple[nn.Module, GramRule]],
                  captured: Mapping[str, Tensor | tuple[Tensor, ...]],
                  sizes: Mapping[str, int], k: int, n: int, cotangent_bytes: int) -> int:
    """What a Gram call holds beyond its Gram matrices and the general path's factors, predicted
    from its capturing forward pass: the forward's graph (kept for the capturing and the check's
    backward passes), one output gradient per cotangent column for every layer a rule claims
    (``K`` times its output, all held at once) and the cotangents themselves; with them, the
    larger of two phases' own tensors. The batched backward pass's: a node's output and input
    gradients and a temporary of its batched rule, ``K`` columns each, of at most the graph's
    largest activation (ggn's ``K = 10`` had peaked at 1.4 times a prediction without them on a CNN
    of 9 MiB activations, at 9 times on a convolution's output upsampled, where the backward
    pass rose by 2.7 ``K`` times its largest activation; probe 106).
    The rules': as much again as the graph for a backward pass's gradients, and the largest
    rule's working tensors (:meth:`~hessrank.curvature.rules.GramRule.working_bytes`).

    Args:
        graph: the forward pass's saved tensors.
        claimed: the layers rules claim, ``group -> (module, rule)``.
        captured: their outputs, by group.
        sizes: their analysed parameters' sizes, by group.
        k, n: ``K`` cotangent columns per sample, ``n`` samples.
        cotangent_bytes: bytes of the cotangents ``[K, n, *out]``.

    Returns:
        Bytes.
    """
    rule_work = max((rule.working_bytes(module, captured[group], k, n, sizes[group])
                     for group, (module, rule) in claimed.items()), default=0)
    outputs = sum(t.numel() * t.element_size() for group in claimed
                  for t in _leaves(captured[group]))
    held = graph.total + k * outputs + cotangent_bytes
    return held + max(3 * k * graph.largest_activation, graph.total + rule_work)


#: Bytes of one block of eigenvector columns' batched backward pass (:func:`eigenvector_block`).
EIGENVECTOR_BLOCK_BYTES = 256 * 2**20


def eigenvector_block(graph: GraphBytes, count: int, num_params: int,
                      element: int) -> tuple[int, int]:
    """How many of ``count`` eigenvectors in parameter space one batched backward pass forms
    (``F u`` for a block of eigenvectors ``u`` of the Gram), and the bytes of such a block: each
    column costs the graph's size twice and three times its largest activation (a transformer's
    rose by 2.1 times its graph per column, a CNN's by 0.9-1.2; ``fisher`` with
    ``eigenvectors=20`` had peaked at 2.2 times a prediction without them), and ``P (2 element
    + 8)`` bytes for its gradient's pieces on their way into the float64 rows. Blocks of up to
    :data:`EIGENVECTOR_BLOCK_BYTES` (at least one column) bound the pass however many are asked.

    Args:
        graph: the forward pass's saved tensors.
        count: the eigenvectors formed.
        num_params: ``P``; ``element``: bytes of one of its entries.

    Returns:
        ``(columns per block, bytes of a block)``.
    """
    column = (2 * graph.total + 3 * graph.largest_activation
              + num_params * (2 * element + 8))
    block = max(1, min(count, EIGENVECTOR_BLOCK_BYTES // max(column, 1)))
    return block, block * column


def eigenvector_bytes(graph: GraphBytes, count: int, k: int, cotangent_bytes: int,
                      num_params: int, element: int) -> int:
    """What forming ``count`` eigenvectors in parameter space holds beyond the Gram and its
    eigen-solve: the forward pass's graph again, the cotangents and a block's combinations of
    them, a block's backward pass (:func:`eigenvector_block`) and the ``[count, P]`` float64
    eigenvectors.

    Args:
        graph: the forward pass's saved tensors.
        count: the eigenvectors formed (0: none, 0 bytes).
        k: ``K`` cotangent columns per sample; ``cotangent_bytes``: their bytes ``[K, n, *out]``.
        num_params: ``P``; ``element``: bytes of one of its entries.

    Returns:
        Bytes.
    """
    if not count:
        return 0
    block, block_bytes = eigenvector_block(graph, count, num_params, element)
    return (graph.total + cotangent_bytes + cotangent_bytes * block // max(k, 1) + block_bytes
            + 8 * count * num_params)


def _locals(names: Sequence[str]) -> list[str]:
    """The parameters' names in their module (``"weight"`` of ``"block.fc.weight"``)."""
    return [name.rsplit(".", 1)[-1] for name in names]


def _leaves(value: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """A captured output's tensors: itself, or the tuple's."""
    return value if isinstance(value, tuple) else (value,)


#: One gradient check's inputs: a group's claimed gradients, autograd's, the diagonal of its
#: Gram ``[K n]`` and the cotangents' weights ``[K, n]``.
Check = tuple[Sequence[Claim], list[Tensor], Tensor, Tensor]


#: Entries of a gradient whose norm is taken at once (:func:`_squared_norm`).
NORM_BLOCK = 2**20


def _squared_norm(tensor: Tensor, minus: Tensor | None = None,
                  dtype: torch.dtype | None = None) -> Tensor:
    """``||tensor - minus||^2`` (``minus`` None: ``||tensor||^2``) as a float64 scalar, from
    the norms of blocks of :data:`NORM_BLOCK` entries (of whole rows, where a tensor is not
    contiguous) in ``dtype`` (None: the tensors' own), each block's difference written into
    one buffer: no difference or float64 copy of a whole gradient (on a wide float32 model,
    P = 64M, they had held two gradients' bytes beyond the check's prediction, and blocks'
    differences allocated one after the other had grown the resident set by most of one;
    probe 204)."""
    if minus is not None:  # (a claim flattened, or not: its entries are the gradient's)
        minus = minus.reshape(tensor.shape)
    if tensor.is_contiguous() and (minus is None or minus.is_contiguous()):
        tensor, minus = tensor.reshape(-1), None if minus is None else minus.reshape(-1)
        rows = NORM_BLOCK
    else:  # (a view: whole rows, each a view too)
        rows = max(1, NORM_BLOCK // max(1, tensor[0].numel()))
    blocks = tensor.split(rows)
    if minus is None:
        norms = [torch.linalg.vector_norm(block, dtype=dtype) for block in blocks]
    else:
        spare = torch.empty(max(block.numel() for block in blocks), device=tensor.device,
                            dtype=torch.result_type(tensor, minus))
        norms = [torch.linalg.vector_norm(torch.sub(block, other, out=spare[:block.numel()].view(
            block.shape)), dtype=dtype) for block, other in zip(blocks, minus.split(rows))]
    return (torch.stack(norms).double() ** 2).sum()


def _rule_raised(rule: GramRule, group: str, raised: Exception) -> str:
    """The note for a rule that raised on a layer, which the general path then computes."""
    return (f"the {rule.name} rule raised {type(raised).__name__} on {group!r} ({raised}): "
            "computed by the general path; please report this bug in the rule")


def _measured(checks: Sequence[Check]) -> list[tuple[float, float]]:
    """Each check's ``(difference, scale)``: the claims' distance from autograd's gradients (a
    projected claim counts as :meth:`~hessrank.curvature.rules.factors.Projected.excess` says)
    and the typical size of ``sum_r w_r G_r``, ``sqrt(sum_r w_r^2 ||G_r||^2)``; every number
    read in one go (:func:`~hessrank.host.host_floats`). Without a graph: a model reading a
    parameter through a tensor made from it once (``self.w_t = layer.weight.t()`` in
    ``__init__``, a tied decoder's) gives gradients with a history, which the differences'
    ``out=`` refused, a raw torch error in place of the check's verdict (probe 229)."""
    squares: list[Tensor] = []
    with torch.no_grad():
        for claimed, true, gram_diagonal, weights in checks:
            squares.append((weights.reshape(-1).double() ** 2 * gram_diagonal.double()).sum())
            squares.extend(c.excess(t) if isinstance(c, Projected) else _squared_norm(c, t)
                           for c, t in zip(claimed, true))
    read = iter(host_floats(squares))
    measured = []
    for claimed, *_ in checks:
        scale = math.sqrt(next(read))
        measured.append((math.sqrt(sum(next(read) for _ in claimed)), scale))
    return measured


#: The smallest scale, as a share of the whole model's, a group's gradient check is judged
#: against (:func:`_rounding_floor`).
CHECK_FLOOR = 0.01


#: A gradient check that fails by less than this many times its allowance may have met the
#: model's rounding, amplified by cancellation, rather than a mixing of samples: its refusal
#: names both.
ROUNDING_OR_MIXING = 100


def _rounding_floor(true_grads: dict[str, Tensor]) -> float:
    """The smallest scale a group's check is judged against: :data:`CHECK_FLOOR` of the size of
    the whole model's weighted gradient (Gaussian weights: the typical size of all the groups'
    weighted per-sample gradients together).

    A group whose gradients cancel in exact arithmetic (the first layer of an MLP with equal
    output rows, under a softmax) holds the rounding of the model's backward pass, a few ``eps``
    of the model's scale ``M``, which the two computations of the check do not share: against
    its own scale it failed (relative error 0.17 in float32, 2e-10 in float64), and the model
    was refused as mixing its samples. Judged against ``CHECK_FLOOR M`` it passes in any dtype
    while its rounding stays under ``1024 CHECK_FLOOR eps M`` (the agreement tolerance's 1024
    ``eps``); a mixing the floor hides moves the full spectrum by under ``CHECK_FLOOR`` times
    the tolerance, and the group's own per-layer spectrum is then checked only to the floor
    (:func:`_judged` notes it)."""
    # Blocks' norms in the gradients' dtype (a float64 norm of the whole copies it first: 2P
    # float32 entries at once), read again in float64 where float32's squares may have left
    # its range: overflowed, or a norm below 1e-12 (each square under float32's smallest
    # normal then dropped, at most sqrt(P) 1e-19 in all, is no longer negligible)
    grads = list(true_grads.values())
    squares = host_floats([_squared_norm(g) for g in grads])
    squares = [square if g.dtype == torch.float64 or 1e-24 <= square < math.inf
               else float(_squared_norm(g, dtype=torch.float64))
               for g, square in zip(grads, squares)]
    return CHECK_FLOOR * math.sqrt(sum(squares))


def _judged(group: str, measured: tuple[float, float], dtype: torch.dtype, floor: float,
            tolerance: float, notes: list[str]) -> float:
    """The check's relative error of a group of parameters of ``dtype``: its claims' distance
    from autograd's gradients against its scale (``measured``, :func:`_measured`), or the
    model's ``floor`` where that is larger, with a note in ``notes`` where only the floor, or
    only a ``tolerance`` above the agreement tolerance (:func:`sums_tolerance`), let it
    pass."""
    difference, scale = measured
    tiny = torch.finfo(torch.float64).tiny
    error = difference / max(scale, floor, tiny)
    own = difference / max(scale, tiny)
    fixed = agreement_tolerance(dtype)
    opening = f"the per-sample gradients of {group!r} pass the gradient check only within"
    if fixed < error <= tolerance and not any(note.startswith(opening) for note in notes):
        notes.append(f"{opening} the rounding of its long float sums (relative error {error:.1e}, "
                     f"above {fixed:.1e}, within {tolerance:.1e} for their length): a mixing of "
                     "samples that small would pass unseen (a float64 model is checked to "
                     f"{agreement_tolerance(torch.float64):.1e})")
    if error <= tolerance < own:
        note = (f"the per-sample gradients of {group!r} are small beside the model's (below "
                f"{floor:.2g}, 1 % of its scale) and pass the gradient check only against that "
                f"(their own relative error {own:.1e}: the model's rounding, or a mixing of "
                "samples that small): the full spectrum is verified, their own per-layer "
                "spectrum is not")
        if note not in notes:
            notes.append(note)
    return error


def compute_gram(
    problem: CurvatureProblem,
    cotangents_of: Callable[[Tensor, Tensor], Tensor],
    keep_groups: bool,
    use_rules: bool,
    generator: torch.Generator,
    check_working_memory: Callable[[int], None] | None = None,
    output_side_bytes: Callable[[Tensor], int] | None = None,
    eigenvectors: int = 0,
    for_the_loss: Sequence[str] = (),
    check_outputs: Callable[[Tensor], None] | None = None,
) -> GramResult:
    """The Gram of the factors: rules where they apply and pass their check, the general path
    elsewhere.

    Args:
        problem: the validated problem.
        cotangents_of: ``(outputs, targets) -> [K, n, *out]`` cotangents (the output-side
            factors) of a batch.
        keep_groups: keep per-group Grams (per-layer spectra).
        use_rules: False forces the general path everywhere.
        generator: private generator for the check's random weights.
        check_working_memory: called once the capturing forward pass has run, before anything
            else, with the bytes the rest of the call holds beyond the Gram matrices and the
            general path's factors (:func:`working_bytes`), or where larger what forming
            ``eigenvectors`` eigenvectors then holds (:func:`eigenvector_bytes`); it raises over
            the budget.
        output_side_bytes: the peak bytes of ``cotangents_of`` on these outputs that the
            prediction before the work could not count (it needs the outputs' size; 0: nothing
            to add), for a source with one cotangent column per sample; checked with the
            forward's graph, and against what the rest of the call holds, before the cotangents
            are formed.
        eigenvectors: the eigenvectors the call forms afterwards, for the memory check.
        for_the_loss: the derivatives the cotangents take through the loss's own custom
            Functions (:func:`~hessrank.curvature.differences.loss_needs`), checked.
        check_outputs: called with the capturing forward pass's outputs before any other pass
            over the model, while the model holds what that pass stored on it (a check of the
            loss, which may read it).

    Raises:
        ValueError: the general path's check fails (the samples interact in the model).
    """
    groups = problem.modules_with_params()
    modules = dict(problem.model.named_modules())
    owners = parameter_holders(problem.model)
    named = dict(zip(problem.names, problem.params))
    claimed: dict[str, tuple[nn.Module, GramRule]] = {}
    # A claimed module's children whose factors its rule computes: group -> {child: group}.
    covered: dict[str, dict[str, str]] = {}
    if use_rules:
        # a module whose rule covers an analysed child is claimed for it even where none of its
        # own parameters is analysed (attention's out_proj alone: its module never runs)
        parents = {group.rpartition(".")[0] for group in groups if "." in group}
        for group in [*groups, *sorted(parents - set(groups))]:
            found = modules.get(group)
            rule = rule_for(found) if found is not None else None
            if found is None or rule is None or not all(
                    owners[id(named[name])] == 1 for name in groups.get(group, ())):
                continue
            children = {child: f"{group}.{child}" for child in rule.children
                        if f"{group}.{child}" in groups and all(
                            owners[id(named[name])] == 1
                            for name in groups[f"{group}.{child}"])}
            if group in groups or children:
                claimed[group], covered[group] = (found, rule), children
    capture = _Capture({group: module for group, (module, _) in claimed.items()})
    # every module's output size, for its gradient check's tolerance (the rules' and the
    # general path's alike)
    sizes_of = OutputSizes(problem, [*groups, *claimed])
    graph = GraphBytes(problem)
    try:
        # (the graph measured up to where the forward restarted is kept: what it measures
        # without the hooks, nothing, would count less)
        with (problem.restarts_forget(capture.forget), problem.restarts_forget(sizes_of.forget),
              graph.counting(), sizes_of.operations):
            outputs = problem.forward()
    finally:
        capture.remove()
        sizes_of.remove()
    if check_outputs is not None and isinstance(outputs, Tensor):
        check_outputs(outputs)
    check_custom_functions(problem, (FIRST,), for_the_loss, outputs)
    for group in list(claimed):
        if capture.calls[group] != 1 or capture.inputs.get(group) is None or (
                group not in capture.edges):
            # called twice (its gradient sums several calls), not at all, or an output that
            # is not differentiable tensors
            claimed.pop(group)
    start, stop, total = sample_range(problem)
    refuse_not_sample_first(outputs, stop - start)
    sizes = {group: sum(named[name].numel() for name in groups.get(group, ()))
             for group in claimed}
    element = problem.params[0].element_size()
    children_groups = {child for group in claimed for child in covered[group].values()}
    unclaimed = [g for g in groups if g not in claimed and g not in children_groups]
    notes: list[str] = []
    if not unclaimed:
        untested = refuse_mixed_rule_samples(problem, outputs)
        if untested is not None:
            notes.append(untested)
    counted = unruled_sizes(problem, use_rules)  # the general path's groups before the work
    # what a sample's VJP holds to compute each parametrization again (probe 209)
    modules = dict(problem.model.named_modules())
    works = {group: parametrization_work(modules[group]) for group in unclaimed
             if group in modules}

    def general_extra(general: Iterable[str], columns: int) -> int:
        """The general path's factors for the groups ``general`` with ``columns`` cotangent
        columns per sample, beyond those counted before the work (for the groups no rule
        covers): those the rules leave count too (a tied embedding's, its rule declined, had
        peaked at 2.7x the prediction; probe 71); and what its batched VJPs hold for
        parametrizations."""
        rows = columns * total
        general = list(general)
        return max(0, general_path_bytes([sum(named[name].numel() for name in groups[group])
                                          for group in general], rows, element)
                   - general_path_bytes(counted, rows, element)) + parametrized_bytes(
            sum(works.get(group, 0) for group in general), columns, stop - start)

    output_side = (output_side_bytes(outputs) if output_side_bytes is not None
                   and isinstance(outputs, Tensor) else 0)
    if check_working_memory is not None and output_side:
        # before the output side runs: its peak, or what the rest holds with its one column
        # (the eigenvectors' too: a refusal there comes before the output side's work)
        output_bytes = outputs.numel() * outputs.element_size()
        check_working_memory(max(
            graph.total + output_side,
            working_bytes(graph, claimed, capture.outputs, sizes, 1, outputs.shape[0],
                          output_bytes),
            general_extra(unclaimed, 1),
            eigenvector_bytes(graph, min(eigenvectors, total), 1, output_bytes,
                              problem.num_params, element)))
    cotangents = shard_cotangents(problem, cotangents_of, outputs)
    k, n = cotangents.shape[:2]
    if check_working_memory is not None:
        cotangent_bytes = cotangents.numel() * cotangents.element_size()
        check_working_memory(max(
            working_bytes(graph, claimed, capture.outputs, sizes, k, n, cotangent_bytes),
            general_extra(unclaimed, k),
            eigenvector_bytes(graph, min(eigenvectors, k * total), k, cotangent_bytes,
                              problem.num_params, element)))
    weights = torch.randn(k, total, generator=generator, dtype=torch.float64)[:, start:stop]
    weights = weights.to(device=problem.device, dtype=problem.dtype)
    # The probes of projected claims: their own stream (the weights' generator is left as it was).
    probes = torch.Generator().manual_seed(generator.initial_seed() ^ 0x5DEECE66D)
    # group -> why its rule's factors were not used (a failed check, an error in the rule)
    failures: dict[str, str] = {}
    try:
        layer_grads: list[Tensor | None] = list(_backward_batched(
            outputs, [edge for g in claimed for edge in capture.edges[g]],
            [t for g in claimed for t in _leaves(capture.outputs[g])], cotangents))
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as raised:  # the general path, itself verified, takes the layers over
        raise_if_signalled(raised)
        # (torch's engine had failed an internal assertion where a captured output's history
        # was rewritten in place; probe 214)
        failures.update(dict.fromkeys(claimed, (
            f"the rules' capturing backward pass failed ({str(raised).splitlines()[0]}): "
            "computed by the general path")))
        claimed, layer_grads = {}, []
    # Each layer's Gram block and claims are formed as soon as its factors are, and (in one
    # process) its captured tensors and factors are dropped then: the check's backward pass below
    # runs without them. Across processes the factors stay, to be gathered.
    keep_factors = parallel_of(problem) is not None
    factors: dict[str, Factors] = {}
    formed: dict[str, tuple[Tensor, dict[str, Claim]]] = {}
    rule_of: dict[str, GramRule] = {}
    position = 0
    tolerance = agreement_tolerance(problem.dtype)
    tolerances: dict[str, float] = {}  # by group, where its layer's sums are long
    for group in (*unclaimed, *claimed):
        terms = sizes_of.terms(group, [named[name] for name in groups.get(group, ())])
        if terms is not None:  # (a rule's children are checked on its output's length)
            tolerances[group] = sums_tolerance(tolerance, terms, problem.dtype)
            for child in covered.get(group, {}).values():
                tolerances[child] = sums_tolerance(tolerance, sum_terms(
                    sizes_of.entries[group], [named[name] for name in groups.get(child, ())])
                    if group in sizes_of.entries else terms, problem.dtype)
    for group, (module, rule) in claimed.items():
        value = capture.outputs.pop(group)
        width = len(_leaves(value))
        pieces, layer_grads[position:position + width] = (
            layer_grads[position:position + width], [None] * width)
        position += width
        grads = tuple(pieces) if isinstance(value, tuple) else pieces[0]
        children = covered[group]
        analysed = frozenset([name.rsplit(".", 1)[-1] for name in groups.get(group, ())] + [
            f"{child}.{name.rsplit('.', 1)[-1]}"
            for child, child_group in children.items() for name in groups[child_group]])
        layer_input = capture.inputs.pop(group)
        try:
            layer = None if layer_input is None else rule.factors(
                module, layer_input, value, grads, n, analysed,  # type: ignore[arg-type]
                capture.arguments[group])
        except torch.OutOfMemoryError:
            raise  # not the rule's fault: the general path needs memory too
        except Exception as raised:  # noqa: BLE001 - the general path, itself verified, takes over
            raise_if_signalled(raised)
            # A rule is a shortcut whose every result is checked: one that raises on a call it
            # did not foresee is a bug in the rule, named here, not a reason to fail the call.
            layer = None
            for failed in (group, *children.values()):
                failures[failed] = _rule_raised(rule, group, raised)
        del layer_input, value, grads, pieces
        parts = layer if isinstance(layer, dict) else {"": layer}
        for child, part in parts.items():
            target = group if not child else children.get(child)
            # Across processes a layer's factors must be gatherable; others take the general
            # path there (the same decision in every process: it depends on the factors' type).
            if target is not None and part is not None and (not keep_factors or part.gatherable):
                try:  # (its Gram too: a Linear on zero positions had raised here; probe 231)
                    formed[target] = part.gram_and_claims(weights, probes)
                except torch.OutOfMemoryError:
                    raise
                except Exception as raised:  # noqa: BLE001 - as for the factors
                    raise_if_signalled(raised)
                    failures[target] = _rule_raised(rule, group, raised)
                    continue
                rule_of[target] = rule
                if keep_factors:
                    factors[target] = part
        del layer, parts
    del layer_grads, capture
    if keep_factors and check_working_memory is not None:
        # before the exchange, which gathers every process's factors layer by layer
        check_working_memory(graph.total + cotangent_bytes
                             + _sharded_factor_bytes(problem, factors))

    # The check: autograd's gradient of sum_{k,i} w_ki <f_i, s_ki> for every analysed parameter.
    combined = torch.einsum("kn,kn...->n...", weights.to(cotangents.dtype), cotangents)
    true_pieces = torch.autograd.grad(outputs, problem.params, grad_outputs=combined,
                                      allow_unused=True)
    true_grads = {name: torch.zeros_like(p) if g is None else g
                  for name, p, g in zip(problem.names, problem.params, true_pieces)}
    unused = unused_parameters_note(problem, unused_parameters(true_pieces))
    if unused is not None:
        notes.append(unused)
    outputs = outputs.detach()

    accumulator = GramAccumulator(keep_groups, problem)
    paths: dict[str, str] = {}
    floor = _rounding_floor(true_grads)
    passed: dict[str, Tensor] = {}
    checked = [group for group, (_, claims) in formed.items()
               if sorted(claims) == sorted(_locals(groups[group]))]
    measured = dict(zip(checked, _measured([
        ([formed[group][1][local] for local in _locals(groups[group])],
         [true_grads[name] for name in groups[group]], formed[group][0].diagonal(), weights)
        for group in checked])))
    for group, (gram, claims) in formed.items():
        locals_ = _locals(groups[group])
        error = math.inf if group not in measured else _judged(
            group, measured[group], true_grads[groups[group][0]].dtype, floor,
            tolerances[group], notes)
        rule = rule_of[group]
        if error <= tolerances[group]:
            passed[group] = gram
        elif math.isinf(error):  # (a note said 'relative error inf' for weight_norm's weight_g)
            # (none where every analysed one is computed from: "are for , ..." of a pruned
            # layer's weight_orig; probe 222)
            made = (f"factors for {group!r} are for {', '.join(sorted(claims))}" if claims
                    else f"factors for {group!r} are for none of the analysed parameters")
            failures[group] = (f"the {rule.name} rule's {made}, the module's parameters are "
                               f"{', '.join(sorted(locals_))} (a parametrisation or pruning, "
                               "of which its weight is computed): computed by the general path")
        else:
            failures[group] = (f"the {rule.name} rule's factors for {group!r} failed the gradient "
                               f"check (relative error {error:.1e}): computed by the general path")
    passed = _agreed_rules(problem, passed, failures)
    notes.extend(dict.fromkeys(failures.values()))  # (one failure may stand for many)
    for group, gram in passed.items():
        accumulator.add(group, _global_rule_gram(problem, factors.get(group), gram))
        paths.update(dict.fromkeys(groups[group], rule_of[group].name))
    remaining = {g: names for g, names in groups.items() if g not in formed
                 or names[0] not in paths}
    if remaining and check_working_memory is not None:  # and those whose rule's check failed
        check_working_memory(general_extra(remaining, k))
    if remaining:
        general = _general_gram(problem, remaining, cotangents, outputs, weights, true_grads,
                                floor, tolerances, accumulator, notes, works)
        for names in remaining.values():
            paths.update(dict.fromkeys(names, general))
    return GramResult(accumulator, paths, notes)


@contextmanager
def substituted(model: nn.Module, replacements: dict[int, Tensor]) -> Iterator[None]:
    """Every registration of a parameter (by object) replaced by a tensor inside the block.

    Like ``torch.func.functional_call`` but keyed by the parameter object, so a module registered
    under two names (``nn.Sequential(shared, act, shared)``) or a weight tied across modules is
    substituted at every registration at once. The registrations are restored on exit.
    """
    swapped: list[tuple[dict[str, Any], str, Tensor]] = []
    for module in {id(m): m for m in model.modules()}.values():
        registry: dict[str, Any] = module._parameters  # holds plain tensors while substituted
        for local, param in list(registry.items()):
            if param is not None and id(param) in replacements:
                swapped.append((registry, local, param))
                registry[local] = replacements[id(param)]
    try:
        yield
    finally:
        for registry, local, param in swapped:
            registry[local] = param


def _sample_vjps(problem: CurvatureProblem) -> Callable[..., tuple[dict[str, Tensor], Tensor]]:
    """``(params, cotangent [K, *out], args, kwargs) -> (VJPs {name: [K, *shape]}, outputs)``
    for one sample (inputs without the batch dimension)."""
    ids = {name: id(p) for name, p in zip(problem.names, problem.params)}
    model = problem.model
    # Every other parameter is substituted by a detached view, so that the forward pass, which
    # runs with grad mode on, records no graph beyond torch.func's own.
    frozen = {id(p): p.detach() for p in model.parameters()}

    def sample_vjps(params: dict[str, Tensor], cotangent: Tensor, args: tuple[Tensor, ...],
                    kwargs: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
        def outputs_of(p: dict[str, Tensor]) -> Tensor:
            with substituted(model, {**frozen, **{ids[name]: value for name, value in p.items()}}):
                return model(*(x.unsqueeze(0) for x in args),
                             **{key: x.unsqueeze(0) for key, x in kwargs.items()})[0]

        # Grad mode on: on the CPU a float32 nn.LSTM of several layers or directions runs
        # oneDNN's kernel, which keeps what its backward needs only when grad mode is on.
        with torch.enable_grad():
            sample_outputs, pullback = vjp(outputs_of, params)[:2]
            return vmap(pullback)(cotangent)[0], sample_outputs

    return sample_vjps


def _sample_gradients(model: nn.Module, params: dict[str, Tensor], cotangent: Tensor,
                      args: tuple[Tensor, ...], kwargs: dict[str, Tensor]
                      ) -> tuple[dict[str, Tensor], Tensor]:
    """``({name: [K, *shape]}, output)``: one sample's gradients for the cotangents ``[K, *out]``
    by plain autograd (the model on the sample alone, one backward pass per cotangent).

    The path for what ``torch.func`` cannot transform: packed sequences, ``autograd.Function``
    without ``setup_context``, operators without a batching rule. ``params``: the model's own
    parameters by name.
    """
    with torch.enable_grad():
        output = model(*(x.unsqueeze(0) for x in args),
                       **{key: x.unsqueeze(0) for key, x in kwargs.items()})[0]
        rows = [torch.autograd.grad(output, list(params.values()), grad_outputs=c,
                                    retain_graph=True, allow_unused=True) for c in cotangent]
    return ({name: torch.stack([torch.zeros_like(p) if row[j] is None else row[j]
                                for row in rows])
             for j, (name, p) in enumerate(params.items())}, output.detach())


def _general_gram(
    problem: CurvatureProblem,
    names_by_group: dict[str, list[str]],
    cotangents: Tensor,
    outputs: Tensor,
    weights: Tensor,
    true_grads: dict[str, Tensor],
    floor: float,
    tolerances: dict[str, float],
    accumulator: GramAccumulator,
    notes: list[str],
    works: Mapping[str, int],
) -> str:
    """Per-sample VJPs for the given groups, in bounded passes, checked against the model's
    ``floor`` at least (:func:`_rounding_floor`; notes go to ``notes``) to the agreement
    tolerance, or a group's own in ``tolerances`` (:func:`sums_tolerance`); returns the path
    used. ``works``: what a sample's VJP holds per column for a group's parametrization
    (:func:`parametrization_work`), which bounds a batched VJP's samples.

    Raises:
        ValueError: a sample's output computed alone differs from its row in the batch, or the
            per-sample factors fail the gradient check: the samples interact in the model.
    """
    k, n = cotangents.shape[:2]
    named = dict(zip(problem.names, problem.params))
    element = problem.params[0].element_size()
    bins: list[list[tuple[str, list[str]]]] = [[]]
    bin_size = 0
    total = sample_range(problem)[2]  # every process bins alike: the gathered factors hold all n
    for group, names in names_by_group.items():
        size = sum(named[name].numel() for name in names)
        if bins[-1] and (bin_size + size) * k * total * element > GENERAL_CHUNK_BYTES:
            bins.append([])
            bin_size = 0
        bins[-1].append((group, names))
        bin_size += size
    sample_vjps = _sample_vjps(problem)
    path = VMAP_PATH
    tolerance = agreement_tolerance(problem.dtype)
    for groups in bins:
        subset = {name: named[name].detach() for _, names in groups for name in names}
        chunk = parametrized_chunk(sum(works.get(group, 0) for group, _ in groups), k)
        flats, failure, path = _checked_bin(problem, groups, subset, path, sample_vjps,
                                            cotangents, outputs, weights, true_grads, floor,
                                            tolerance, tolerances, notes, chunk)
        if failure is not None and path == VMAP_PATH:
            # torch.func's batching rules are not all right (vmap through PReLU after a
            # convolution returns gradients batched twice, torch 2.14.1): plain autograd decides.
            path = LOOP_PATH
            flats, failure, path = _checked_bin(problem, groups, subset, path, sample_vjps,
                                                cotangents, outputs, weights, true_grads,
                                                floor, tolerance, tolerances, notes, chunk)
        with agreement(parallel_of(problem)):
            if failure is not None:
                repeat_pass(problem)  # a forward that does not repeat itself explains it first
                observation, cause, error = failure
                raise ValueError(
                    f"{observation}: {lower_precision_cause(problem, error) or cause}")
        for group, flat in flats.items():
            gathered = _all_rows(problem, flat, k)
            accumulator.add(group, row_gram(gathered))
    return path


def _checked_bin(problem: CurvatureProblem, groups: list[tuple[str, list[str]]],
                 subset: dict[str, Tensor], path: str,
                 sample_vjps: Callable[..., tuple[dict[str, Tensor], Tensor]],
                 cotangents: Tensor, outputs: Tensor, weights: Tensor,
                 true_grads: dict[str, Tensor], floor: float, tolerance: float,
                 tolerances: dict[str, float], notes: list[str], most: int
                 ) -> tuple[dict[str, Tensor], tuple[str, str, float] | None, str]:
    """One bin's per-sample factors ``{group: [K n, P_group]}`` on ``path`` (``torch.func``'s
    vmap, in chunks of at most ``most`` samples, or, where vmap fails, plain autograd per
    sample), what fails their check as ``(what differs, its likely cause, the relative
    difference)`` (None: they pass) and the path taken."""
    k, n = cotangents.shape[:2]
    numel = sum(t.numel() for t in subset.values())
    chunk = min(most, max(1, GENERAL_CHUNK_BYTES
                          // max(1, k * numel * problem.params[0].element_size())))
    pieces: dict[str, list[Tensor]] = {name: [] for name in subset}
    sample_outputs: list[Tensor] = []
    named = dict(zip(problem.names, problem.params))
    params = {name: named[name] for name in subset}  # the model's own, for plain autograd
    with torch.no_grad():
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            args, kwargs = problem.sample_slice(start, stop)
            vjps: dict[str, Tensor] | None = None
            outs: Tensor | None = None
            if path == VMAP_PATH:
                problem.before_pass()
                try:
                    with warnings_ignored(VMAP_FALLBACK_WARNING):
                        vjps, outs = vmap(sample_vjps, in_dims=(None, 1, 0, 0))(
                            subset, cotangents[:, start:stop], args, kwargs)
                except Exception as unbatched:  # noqa: BLE001 - vmap raises many types it cannot batch
                    raise_if_signalled(unbatched)
                    path = LOOP_PATH
            if vjps is None or outs is None or any(  # a batching rule that got shapes wrong
                    value.shape != (stop - start, k, *subset[name].shape)
                    for name, value in vjps.items()):
                path = LOOP_PATH
                samples = []
                for i in range(start, stop):
                    problem.before_pass()
                    try:
                        samples.append(_sample_gradients(problem.model, params, cotangents[:, i],
                                                         *_sample(args, kwargs, i - start)))
                    except torch.OutOfMemoryError:
                        raise
                    except Exception as raised:  # noqa: BLE001 - the model's error, explained
                        raise_if_signalled(raised)
                        return {}, (f"the model's forward failed on one sample alone "
                                    f"({type(raised).__name__}: {raised})", SAMPLE_ALONE,
                                    math.inf), path
                vjps = {name: torch.stack([s[0][name] for s in samples]) for name in subset}
                outs = torch.stack([s[1] for s in samples])
            sample_outputs.append(outs)
            for name, value in vjps.items():  # [n_chunk, K, *shape]
                pieces[name].append(value.transpose(0, 1).reshape(k, stop - start, -1))
    failure = _samples_differ(torch.cat(sample_outputs), outputs, tolerance,
                              ModuleGenerators.read(problem.model).places)
    flats: dict[str, Tensor] = {}
    for group, names in groups:
        # pop: the bin's pieces become its groups' factors without a second copy
        flat = torch.cat([torch.cat(pieces.pop(name), dim=1) for name in names],
                         dim=-1).reshape(k * n, -1)
        # (products without a copy of the factors: the bin holds two, general_path_bytes)
        claimed = weights.reshape(-1) @ flat
        true = torch.cat([true_grads[name].reshape(-1) for name in names])
        allowed = tolerances.get(group, tolerance)
        error = _judged(group, _measured([([claimed], [true], torch.linalg.vector_norm(
            flat, dim=1).square(), weights)])[0], true.dtype, floor, allowed, notes)
        if failure is None and error > allowed:
            # (a float32 convolution over 256 x 256 positions had been told of mixing and
            # cancellation only; probe 185)
            near = (f"; or, this near the rounding allowance ({allowed:.1e}), the rounding of "
                    "its backward pass amplified by cancellation (gradients that nearly cancel, "
                    "as before a GroupNorm over two channels)"
                    + (f", or {LONG_SUMS}" if true.dtype != torch.float64 else "")
                    + ", which leaves its factors unverified"
                    if error <= ROUNDING_OR_MIXING * allowed else "")
            failure = (f"per-sample gradients of {group!r} do not add up to the batch gradient "
                       f"(relative error {error:.1e})",
                       "the model mixes the samples of a batch (per-sample EF/GGN factors are "
                       f"then undefined){near}: use method='exact' or 'lanczos'", error)
        flats[group] = flat
    return flats, failure, path


def _agreed_rules(problem: CurvatureProblem, passed: dict[str, Tensor],
                  failures: dict[str, str]) -> dict[str, Tensor]:
    """The rule groups that passed their check in every process (all of ``passed`` for one
    process); a group that failed elsewhere joins ``failures`` with that process's note, and so
    does one that a rule claimed in some processes only (a rule may decline a layer for its size,
    which depends on each process's share of the batch), so that every process takes the same
    path for it, with the same collectives, and reports the same notes."""
    parallel = parallel_of(problem)
    if parallel is None:
        return passed
    reports = parallel.gather_objects((failures, sorted(passed)))
    failures.clear()
    for rank, (report, _) in enumerate(reports):
        for group, note in report.items():
            failures.setdefault(group, f"{note} (process {rank})")
    claimed = [set(groups) for _, groups in reports]
    everywhere = set.intersection(*claimed)
    for group in sorted(set.union(*claimed) - everywhere - set(failures)):
        rank = next(r for r, groups in enumerate(claimed) if group not in groups)
        failures[group] = (f"a rule computed {group!r} in some processes but not in process "
                           f"{rank} (its share of the batch): computed by the general path in "
                           "every process")
    return {group: gram for group, gram in passed.items()
            if group in everywhere and group not in failures}


def _global_rule_gram(problem: CurvatureProblem, layer: Factors | None, gram: Tensor) -> Tensor:
    """The global batch's Gram block of a rule layer: ``gram`` itself for one process, else
    from the all-gathered activations ``[n, T, d_in]`` and output gradients ``[K, n, T, d_out]``
    (sharded problems keep gatherable factors only)."""
    parallel = parallel_of(problem)
    if parallel is None:
        return gram
    assert layer is not None, "a sharded problem keeps its rule layers' factors"
    return layer.gathered(lambda tensor, dim: parallel.gather_samples(tensor, dim=dim)).gram()


def _sharded_factor_bytes(problem: CurvatureProblem, factors: Mapping[str, Factors]) -> int:
    """What a sharded problem's rule layers hold as their Grams are formed from the global
    batch (:func:`_global_rule_gram`): every layer's factors, this process's rows, kept until
    then, and for the largest layer the exchange's padded copy, the parts received and their
    concatenation (:meth:`~hessrank.distributed.DataParallel.gather_samples`). Uncounted, a
    data-parallel ``fisher`` had run at 3.5 to 5.4 times ``max_memory`` (probe 188)."""
    parallel = parallel_of(problem)
    if parallel is None:
        return 0
    rows = max(parallel.sizes) * (len(parallel.sizes) + 1) + sum(parallel.sizes)
    kept = largest = 0
    for part in factors.values():
        tensors: list[tuple[Tensor, int]] = []

        def listed(tensor: Tensor, dim: int, tensors: list = tensors) -> Tensor:
            tensors.append((tensor, dim))
            return tensor

        part.gathered(listed)  # (each tensor as itself: its sizes, read without an exchange)
        kept += sum(tensor.numel() * tensor.element_size() for tensor, _ in tensors)
        largest = max(largest, sum(tensor.numel() // max(1, tensor.shape[dim]) * rows
                                   * tensor.element_size() for tensor, dim in tensors))
    return kept + largest


def _all_rows(problem: CurvatureProblem, flat: Tensor, k: int) -> Tensor:
    """``[K n, P_group]`` per-sample factors of the global batch, rows ``(k, i)``, from this
    process's ``[K n_r, P_group]`` (all-gathered when the problem is sharded)."""
    parallel = parallel_of(problem)
    if parallel is None:
        return flat
    everything = parallel.gather_samples(flat.reshape(k, -1, flat.shape[-1]), dim=1)
    return everything.reshape(-1, flat.shape[-1])


def _sample(args: tuple[Tensor, ...], kwargs: dict[str, Tensor], i: int
            ) -> tuple[tuple[Tensor, ...], dict[str, Tensor]]:
    return tuple(x[i] for x in args), {key: x[i] for key, x in kwargs.items()}


def refuse_mixed_rule_samples(problem: CurvatureProblem, outputs: object) -> str | None:
    """Raise where the rules claim every parameter and the model's output for a sample depends
    on the other samples of the batch; return a note where that could not be tested.

    The general path runs each sample alone and compares; the rules do not, and their check
    passes where the samples mix before the first parameterised layer (an input standardised
    with the batch's statistics: the factors are then each sample's in the batch, not those of
    the sample alone that the EF's ``l_i`` and the GGN's blocks need, and fisher returned them
    without a word; probe 89). The batch's first two samples run alone, a forward of two, its
    middle two and its last two (a model that mixes samples in batch order spares the first;
    probe 222; one that ranks tokens over the batch may spare both ends; probe 238)
    (:func:`~hessrank.problem.mixed_samples_difference`); for a model that draws from its own
    generator, at their rows of a batch of the whole's size, other samples around them (each
    pass restarts its draws: a forward of two would draw other noise; skipped, such a model
    had its mixing pass unseen, probe 152). Not asked across processes (each shard was tested on
    its own, :func:`~hessrank.distributed.check_shards_uncoupled`). Also the check of BackPACK's
    factors, whose own check compares them with the batch's gradient as well (probe 152).

    Raises:
        ValueError: the outputs of the samples alone differ from their rows of the batch.
    """
    if parallel_of(problem) is not None:
        return None
    try:
        difference = mixed_samples_difference(
            problem, outputs, first=2, in_place=bool(ModuleGenerators.read(problem.model).states))
    except (UnrepeatableForward, BatchNotFirst, torch.OutOfMemoryError):
        raise
    except Exception as error:  # noqa: BLE001 - a model that runs on its whole batch only
        raise_if_signalled(error)
        return (f"{untested_mixing(error, 'two samples alone')}; the rules' factors are each "
                "sample's in the batch")
    if difference is not None:
        observation, cause = _mixing(difference)
        raise ValueError(f"{observation}: {lower_precision_cause(problem, difference) or cause}")
    return None


def _mixing(relative: float, generators: Sequence[str] = ()) -> tuple[str, str]:
    """What differs, and its likely cause, where the outputs of samples run alone differ from
    their rows of the batch output by ``relative``; ``generators``: where the model holds
    random generators (the draws of a sample alone are not its draws in the batch)."""
    observation = (f"a sample's output computed alone differs from its row of the batch output "
                   f"{difference_text(relative, 'its largest entry')}")
    if generators:
        return observation, (
            f"the forward draws from the generator the model holds ({', '.join(generators)}), "
            "whose draws for a sample alone are not its draws in the batch (noise added to "
            "activations), or the model mixes the samples of a batch, so per-sample EF/GGN "
            "factors are undefined; use method='exact' or 'lanczos' (the Hessian of the "
            "batch's loss at the model's next draw), or 'fisher_lanczos'/'ggn_lanczos'")
    return observation, (
        "the model mixes the samples of a batch (BatchNorm on batch statistics, attention over "
        "the batch dimension, e.g. a batch_first=False transformer given [n, T, d]), or the "
        "batch is not in the first dimension of the inputs and outputs (sequence-first "
        "[T, n, ...] tensors, which a T equal to n lets through the shape checks), so "
        "per-sample EF/GGN factors are undefined; fix the layout or use method='exact' or "
        "'lanczos' (the Hessian of the batch's loss), or 'fisher_lanczos'/'ggn_lanczos' (each "
        "sample's factor as the batch computes it)")


def _samples_differ(sample_outputs: Tensor, outputs: Tensor, tolerance: float,
                    generators: Sequence[str]) -> tuple[str, str, float] | None:
    """What is wrong where the outputs of the samples computed alone differ from the batch's:
    ``(what differs, its likely cause, the relative difference)`` (``generators``: as
    :func:`_mixing`'s)."""
    alone = sample_outputs.reshape(outputs.shape)
    finite = torch.isfinite(outputs)
    if not bool(finite.all()):
        # compared where finite, once their NaN and infinite entries agree: an additive mask's
        # -inf in the outputs (illegal actions' logits) made the difference NaN, and a model
        # that does not mix its samples was refused as mixing them (probe 225)
        if math.isinf(finite_difference(alone, outputs)):
            return (*_mixing(math.inf, generators), math.inf)
        alone, outputs = torch.where(finite, alone, 0.0), torch.where(finite, outputs, 0.0)
    difference = (alone - outputs).norm()
    scale = outputs.norm().clamp_min(torch.finfo(outputs.dtype).tiny)
    if difference <= tolerance * math.sqrt(outputs[0].numel()) * scale:
        return None
    relative = float(difference / scale)
    return (*_mixing(relative, generators), relative)


def _backward_batched(outputs: Tensor, edges: list[CapturedEdge], values: list[Tensor],
                      cotangents: Tensor) -> list[Tensor]:
    """Gradients ``[K, *value.shape]`` of ``<outputs, cotangent_k>`` w.r.t. each captured tensor
    (its gradient edge and its value; zeros where the outputs do not depend on it)."""
    if not edges:
        return []
    # a view written in place since (its version, shared by the detached value, moved): its
    # base's edge (:func:`_output_edge`)
    bases = [captured.base if captured.base is not None and value._version != captured.version
             else None for captured, value in zip(edges, values)]
    nodes = [captured.edge if base is None else base[0] for captured, base in zip(edges, bases)]

    def filled(grads: tuple[Tensor | None, ...], count: int) -> list[Tensor]:
        return [torch.zeros(count, *v.shape, dtype=v.dtype, device=v.device) if g is None
                else g if base is None
                else g.reshape(count, -1).as_strided(  # the view's layout in its base's gradient
                    (count, *base[1]), (g[0].numel(), *base[2]), base[3])
                for g, v, base in zip(grads, values, bases)]

    def one(cotangent: Tensor) -> list[Tensor]:
        grads = torch.autograd.grad(outputs, nodes, grad_outputs=cotangent, retain_graph=True,
                                    allow_unused=True)
        return filled(tuple(None if g is None else g.unsqueeze(0) for g in grads), 1)

    if cotangents.shape[0] == 1:
        return one(cotangents[0])
    try:
        return filled(torch.autograd.grad(outputs, nodes, grad_outputs=cotangents,
                                          retain_graph=True, is_grads_batched=True,
                                          allow_unused=True), cotangents.shape[0])
    except RuntimeError as error:
        raise_if_signalled(error)
        return [torch.cat(pieces) for pieces in zip(*(one(c) for c in cotangents))]
