"""Hessian-vector products by double backpropagation, and the dense Hessian built from them."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.utils.rnn import PackedSequence

from hessrank.curvature.differences import COTANGENT, FIRST, SECOND, check_custom_functions
from hessrank.curvature.loss import (
    RUNS_AS_GIVEN,
    add_float64_note,
    add_lowered_loss_note,
    direct_parameter_names,
    float64_failure,
    float64_twin,
    kept_cast,
    loss_modules,
    loss_second_derivative_error,
    lower_precision_in,
    subnormal_scale_error,
)
from hessrank.curvature.operator import ParameterOperator, stacked_rows
from hessrank.curvature.saturation import SaturationSafe
from hessrank.distributed import ShardedProblem, check_shards_uncoupled, whole_batch
from hessrank.guard import OwnMode, held_tensors, raise_if_signalled
from hessrank.problem import (
    FOR_THE_LOSS_S,
    HESSIAN_NEEDS,
    CurvatureProblem,
    GraphBytes,
    LossFn,
    UnrepeatableLoss,
    agreement_tolerance,
    dtype_name,
    listed_names,
    long_sums_allowance,
    lower_precision_cause,
    unused_parameters,
    without_second_derivative,
)
from hessrank.spectrum.dense import not_finite_error
from hessrank.spectrum.lanczos import input_unit, probe_vector
from hessrank.spectrum.operator import SymmetricOperator


class TwiceDifferentiable(OwnMode):
    """Replaces operations whose second derivative torch gets wrong by their composite formula.

    ``torch._weight_norm`` (``nn.utils.parametrizations.weight_norm`` and the old
    ``nn.utils.weight_norm``, ``dim`` not None): torch 2.14.1's fused kernel has a correct first
    derivative but a wrong double backward (its Hessian is not even symmetric: 13-26 % off finite
    differences on a 4 x 3 weight). ``v * (g / norm_except_dim(v, 2, dim))`` is the same function
    (bitwise, on the CPU) and autograd differentiates it twice correctly.
    """

    def __torch_function__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is torch._weight_norm:
            v, g, dim = _weight_norm_arguments(*args, **kwargs)
            return v * (g / torch.norm_except_dim(v, 2, dim))
        return func(*args, **kwargs)


def _weight_norm_arguments(v: Tensor, g: Tensor, dim: int = 0) -> tuple[Tensor, Tensor, int]:
    return v, g, dim


@contextmanager
def second_order(dtype: torch.dtype) -> Iterator[None]:
    """A forward whose graph is differentiated twice: attention through the math kernel (the
    CPU flash kernel has no double backward), :class:`TwiceDifferentiable`, and log-softmax
    and log-sigmoid through :class:`~hessrank.curvature.saturation.SaturationSafe` (their
    derivatives without the cancellation that near a saturated softmax or sigmoid amplifies
    their rounding, where that rounding would show in a ``dtype`` model's products). Its backward
    passes too: a block under ``torch.utils.checkpoint`` (``use_reentrant=False``) runs its
    forward again there, and outside this context its attention or weight norm took the other
    kernel, which the checkpoint refused as a forward that changed (``CheckpointError``, a
    transformer layer's ``exact``; probe 111)."""
    with sdpa_kernel(SDPBackend.MATH), TwiceDifferentiable(), SaturationSafe(dtype):
        yield


def _sequence_steps(module: nn.Module, args: tuple[Any, ...]) -> int:
    """Time steps of a recurrent layer's input (``[n, T, d]``, ``[T, n, d]``, ``[T, d]`` or a
    packed sequence); 0 where it is none of those."""
    sequence = args[0] if args else None
    if isinstance(sequence, PackedSequence):
        return int(sequence.batch_sizes.numel())
    if not isinstance(sequence, Tensor) or sequence.dim() not in (2, 3):
        return 0
    return int(sequence.shape[1] if sequence.dim() == 3 and getattr(module, "batch_first", False)
               else sequence.shape[0])


def _widened_loss(problem: CurvatureProblem) -> tuple[Tensor, float]:
    """The loss on a forward pass, its outputs widened to float64 where they are in a lower
    precision (the loss then in float64, :func:`~hessrank.curvature.loss.float64_twin`), so that
    its derivatives w.r.t. the outputs, the output Hessian in every product, are float64's; and
    the value of the loss as given on them, which a data set's passes compare with the first
    pass's (the widened one differs from it by the outputs' rounding: near zero loss, every
    pass over a saturated classifier's data had been refused as changed data, 2.1e-9 against
    0; probe 118).

    Near a saturated softmax the float32 output Hessian ``diag(p) - p p^T`` rounds ``1 -
    p_max`` to 0: its rows no longer sum to zero, and it turns indefinite. A confident linear
    classifier's float32 ``exact`` had its top eigenvalue 21 % high, its third 8.5 times, and a
    negative eigenvalue of no direction (-3.5e-4 of a top of 3.0e-3), passing every check
    (probe 112). The loss runs as given, with a note, where it uses the parameters directly
    (its float64 copy would hold copies of them: an L2 term had been dropped; probe 113), is
    another function in float64 (:func:`~hessrank.curvature.loss.float64_twin`: a clamp at
    the dtype's eps) or cannot be differentiated twice there (a loss closing over float32
    tensors, Huber's backward with float32 targets), tried first on detached outputs; and on a
    batch of a data set where the float64 loss fails though the first batch's passed (probe
    116)."""
    outputs = problem.forward()
    if not (isinstance(outputs, Tensor) and outputs.is_floating_point()):
        loss = problem.loss(outputs)
        return loss, float(loss.detach())
    # decided once per call: over a data set the operator is built for every batch of every
    # product, and the trials took 30 % of a large-vocabulary transformer's lanczos there
    key = (tuple(id(p) for p in problem.params), outputs.dtype, problem.targets.dtype)
    if key not in problem.loss_widening:
        problem.loss_widening[key] = _widening(problem, outputs)
    loss_fn, why = problem.loss_widening[key]
    if loss_fn is None and why is None:  # float64 outputs, a loss computed in float64
        loss = problem.loss(outputs)
        return loss, float(loss.detach())
    if loss_fn is not None:
        try:
            widened = problem.loss(outputs.double(), loss_fn)
        except UnrepeatableLoss:
            raise
        except Exception as error:  # noqa: BLE001 - this batch's loss as given
            raise_if_signalled(error)
            if isinstance(problem, ShardedProblem):  # (no other route than the others': a
                # process that took it exchanged its outputs again, and gloo aborted; probe 161)
                raise
            why = float64_failure(error, "on a batch of the data set")
        else:
            with torch.no_grad():  # (the loss as given, checked by the data set's first pass;
                # the global batch's, a collective as the widened loss's: probe 207)
                return widened, float(problem.loss(outputs.detach())
                                      if isinstance(problem, ShardedProblem)
                                      else problem.loss_fn(outputs, problem.targets))
    if outputs.dtype != torch.float64:
        add_float64_note(problem.notes, f"{_UNWIDENED} {dtype_name(outputs.dtype)}, not on "
                         "outputs widened to float64", str(why),
                         "its curvature rounds to wrong, even negative, eigenvalues")
    elif loss_fn is not None:  # its cast widened on the first batch, not on this one (where
        # the widening was refused, _widening has said so, once: not a loss evaluation a build)
        add_lowered_loss_note(problem.notes, lower_precision_in(
            problem.loss_fn, outputs.detach(), problem.targets) or torch.float32, str(why))
    loss = problem.loss(outputs)
    return loss, float(loss.detach())


#: How the note of a loss not widened to float64 opens (:func:`_widened_loss`).
_UNWIDENED = "the loss runs in"


def _widening(problem: CurvatureProblem, outputs: Tensor) -> tuple[LossFn | None, str | None]:
    """``(the loss for float64 outputs, None)`` where :func:`_widened_loss` may widen, else
    ``(None, why not)``: its trials on detached ``outputs``, kept out of the operator's graph
    count. Float64 ``outputs`` are widened only where the loss computes in a lower precision
    inside (as :func:`~hessrank.curvature.loss.float64_loss`; a note says which way it went),
    and get ``(None, None)`` where it does not: the loss as given, nothing to say."""
    with GraphBytes.uncounted():
        # the global batch's loss, gathered once (a loss holding a tensor of its size failed on
        # a shard; probe 207), its trials then without exchanges: a process whose twin failed
        # had skipped the trial's exchange of outputs that the others made (probe 161)
        whole, everything = whole_batch(problem, outputs)
        lowered = (lower_precision_in(whole.loss_fn, everything, whole.targets)
                   if outputs.dtype == torch.float64 else None)
        if outputs.dtype == torch.float64 and lowered is None:
            return None, None
        kept = None if lowered is None else kept_cast(lowered)
        loss_fn, why = (None, kept) if kept is not None else _twin_trials(whole, everything)
    if isinstance(problem, ShardedProblem):
        # one decision for every process: a shard whose trial failed had run the loss as given
        # while the others widened it, and the next exchange of outputs, float32 against
        # float64, aborted the interpreter in gloo (probe 161)
        reasons = problem.parallel.gather_objects(why if loss_fn is None else None)
        refused = next(((rank, reason) for rank, reason in enumerate(reasons)
                        if reason is not None), None)
        if refused is not None:  # (one note, the same in every process)
            loss_fn, why = None, f"{refused[1]} (in process {refused[0]})"
    if lowered is not None:
        add_lowered_loss_note(problem.notes, lowered, why)
    return loss_fn, why


def _twin_trials(problem: CurvatureProblem, outputs: Tensor) -> tuple[LossFn | None, str | None]:
    """``(the loss's float64 twin, None)`` where it exists and can be differentiated twice at
    ``outputs`` (detached), else ``(None, why not)``."""
    if direct_parameter_names(problem.loss_fn, outputs.detach(), problem.targets,
                              problem.params, problem.names):
        return None, "it uses the parameters directly"
    try:
        loss_fn = float64_twin(problem.loss_fn, outputs, problem.targets)
    except ValueError as error:
        raise_if_signalled(error)
        return None, str(error)
    try:
        trial = outputs.detach().double().requires_grad_(True)
        (gradient,) = torch.autograd.grad(problem.loss(trial, loss_fn), trial,
                                          create_graph=True)
        if gradient.requires_grad:  # (a loss linear in the outputs has a constant one)
            torch.autograd.grad(gradient.sum(), trial, allow_unused=True)
    except UnrepeatableLoss:
        raise
    except Exception as error:  # noqa: BLE001 - the loss as given, in the outputs' dtype
        raise_if_signalled(error)
        return None, float64_failure(error)
    return loss_fn, None


def softmax_saved_bytes(roots: Sequence[Tensor | None]) -> int:
    """About what the softmax nodes (softmax, log-softmax and, in a differentiated backward,
    their backward's node) of the graph behind ``roots`` saved: one tensor of each node's output
    size (bytes), read from the nodes' metadata. A Hessian-vector product's double backward
    through a softmax forms several temporaries of their size (attention's ``[n, heads, T, T]``
    weights), more than the graphs a product is allowed otherwise
    (:data:`~hessrank.curvature.operator.SOFTMAX_TEMPORARIES`). The saved tensors themselves
    are not read: reading one inside a checkpointed block recomputes its forward, outside the
    call's attention kernel, and the checkpoint refused it. 0 where torch's nodes keep no
    metadata."""
    seen: set[torch.autograd.graph.Node] = set()
    stack: list[torch.autograd.graph.Node | None] = [
        root.grad_fn for root in roots if root is not None]
    held = 0
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if "Softmax" in node.name():
            for output in getattr(node, "_input_metadata", ()):
                held += math.prod(output.shape) * output.dtype.itemsize
        stack.extend(following for following, _ in node.next_functions)
    return held


class HessianOperator(ParameterOperator):
    """``V -> V H`` for the Hessian of the loss w.r.t. the analysed parameters (flattened, ``P``).

    The gradient graph is built once (one forward and one ``create_graph`` backward); each product
    is then one backward pass through it. :meth:`matmat` pushes a block of vectors through one
    vectorised backward (``is_grads_batched``) and falls back to a loop where an operator of the
    model does not support that. Works for any module autograd can differentiate twice.

    On a :class:`~hessrank.distributed.ShardedProblem` each process differentiates the global
    loss through its own shard's outputs and the gradient and every product are summed over the
    processes (one all-reduce), which gives the global batch's Hessian once the loss is checked
    not to couple samples of different shards.
    """

    #: A product differentiates the gradient's graph again: a call's peak above the
    #: prediction before the work measured 3.3 (two convolutions, n = 96), 2.2 (an LSTM) and
    #: 6.5 (a transformer layer: a graph of 3 MiB, the rest fixed costs) times the graph beyond
    #: it (``lanczos``, 40 steps, 2026-12-01; the factor of 1 before had let calls run at up to
    #: 2.7 times their budget). The instance's :attr:`product_graphs` allows more for a
    #: recurrent layer. ``benchmarks/working_memory.py`` measures both again.
    PRODUCT_GRAPHS = 4.0
    #: A recurrent layer's product holds more the longer its sequences: an LSTM's measured 3.7
    #: and 4.4 graphs at 50 and 48 steps, 6.0 at 100, 9.0 and 9.2 at 200 (hidden sizes 8-64;
    #: ``lanczos`` ran at 1.4-1.8 times its budget there; probe 71): ``2.5 + steps / 28``.
    RECURRENT_STEPS_PER_GRAPH = 28

    def __init__(self, problem: CurvatureProblem) -> None:
        super().__init__(problem)
        self.problem = problem  # for the messages of a missing or asymmetric second derivative
        if isinstance(problem, ShardedProblem):
            check_shards_uncoupled(problem)
        graph = GraphBytes(problem)
        steps: list[int] = []  # the sequence lengths of the model's recurrent layers
        hooks = [module.register_forward_pre_hook(
            lambda module, args: steps.append(_sequence_steps(module, args)))
            for module in problem.model.modules() if isinstance(module, nn.RNNBase)]
        try:
            with second_order(problem.dtype), graph.counting():
                loss, self.loss_value = _widened_loss(problem)
                grads = torch.autograd.grad(loss, self.params, create_graph=True,
                                            allow_unused=True)
        finally:
            for hook in hooks:
                hook.remove()
        # the float64 twin's copies of the loss module's tensors, which its loss saved: state
        # counted as the twin's copies, not graph (counted as both, a float32 model's loss
        # buffer had its lanczos predicted at 2.9 times its peak)
        graph.leave_out(tensor for twin, _ in problem.loss_widening.values() if twin is not None
                        for module in loss_modules(twin)
                        for tensor in (*module.parameters(), *held_tensors(module)))
        #: graphs a product's double backward holds beyond the gradient's graph (its memory)
        self.product_graphs = max(self.PRODUCT_GRAPHS,
                                  2.5 + max(steps, default=0) / self.RECURRENT_STEPS_PER_GRAPH)
        # agreed: the columns of a batched product are sized from it, and every process must
        # push the same number through each product's all-reduce
        self.graph_bytes = self._largest(graph.total)
        self.softmax_bytes = self._largest(softmax_saved_bytes(grads))
        self.unused = unused_parameters(grads)
        self._grads = grads
        # Gradient pieces that still depend on the parameters; the others have zero Hessian rows.
        self._graph_index = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        self._graph_grads = [grads[i] for i in self._graph_index]
        self._batched = True
        #: the Frobenius norm of the antisymmetric part of the dense Hessian the products built
        #: (:func:`dense_hessian`), a measure of their rounding; None before one is built
        self.rounding: float | None = None
        check_custom_functions(problem, (FIRST, SECOND, COTANGENT), loss=loss)

    @functools.cached_property
    def gradient(self) -> Tensor:
        """``[P]``: the loss's gradient w.r.t. the analysed parameters (on a sharded problem,
        summed over the processes: one all-reduce, on first use). Joined when asked for: an
        operator over a data set is built for each batch of every product, and this
        ``P``-long vector had been joined each time (``benchmarks/README.md``, "Fresh memory in
        every product")."""
        return self._summed(torch.cat([
            (g if g is not None else torch.zeros_like(p)).detach().reshape(-1)
            for g, p in zip(self._grads, self.params)
        ]))

    def _flatten(self, pieces: tuple[Tensor | None, ...], leading: tuple[int, ...]) -> Tensor:
        return torch.cat([
            (piece if piece is not None
             else torch.zeros((*leading, *p.shape), dtype=self.dtype, device=self.device))
            .reshape(*leading, -1)
            for piece, p in zip(pieces, self.params)
        ], dim=-1)

    def _pieces(self, vectors: Tensor) -> list[Tensor]:
        """``[..., P]`` -> the per-parameter pieces matching the gradients with a graph."""
        chunks = vectors.split(self.sizes, dim=-1)
        return [chunks[i].reshape((*vectors.shape[:-1], *self.params[i].shape))
                for i in self._graph_index]

    def _summed(self, local: Tensor) -> Tensor:
        """The sum over the processes of a sharded problem (the tensor itself otherwise)."""
        return local if self.parallel is None else self.parallel.all_reduce(local)

    def matmat(self, vectors: Tensor) -> Tensor:
        """Hessian times each row of ``vectors`` (``[k, P]``); result ``[k, P]`` in model dtype."""
        vectors = vectors.to(dtype=self.dtype, device=self.device)
        self.num_products += vectors.shape[0]
        try:
            with second_order(self.dtype):  # a checkpointed block recomputes its forward here
                local = self._local_matmat(vectors)
        except RuntimeError as error:
            raise self._second_derivative_error(error) from error
        return self._summed(local)

    def _second_derivative_error(self, error: RuntimeError) -> Exception:
        """:func:`without_second_derivative` for a product, with the methods that avoid the
        operation: ``fisher`` and ``ggn`` for one of the model, ``fisher`` alone for one of the
        loss (``ggn`` differentiates the loss twice: one product of its Hessian w.r.t. the
        outputs tells)."""
        converted = without_second_derivative(
            error, HESSIAN_NEEDS, "use method='fisher' (first derivatives only) or 'ggn' (first "
            "derivatives of the model, second of the loss); not their Lanczos variants, whose "
            "Jacobian-vector products differentiate the model's backward pass too")
        if converted is error:
            return error
        with torch.no_grad():
            outputs = self.problem.forward()
        if loss_second_derivative_error(self.problem.loss_fn, outputs,
                                        self.problem.targets) is None:
            return converted
        return without_second_derivative(error, HESSIAN_NEEDS, FOR_THE_LOSS_S)

    def _local_matmat(self, vectors: Tensor) -> Tensor:
        """This process's products (the whole Hessian's for a single-process problem)."""
        k = vectors.shape[0]
        if not self._graph_grads:
            return torch.zeros_like(vectors)
        if self._batched and k > 1:
            try:
                products = torch.autograd.grad(
                    self._graph_grads, self.params, grad_outputs=self._pieces(vectors),
                    retain_graph=True, allow_unused=True, is_grads_batched=True,
                )
                return self._flatten(products, (k,))
            except RuntimeError as error:
                raise_if_signalled(error)
                self._batched = False
        rows = []
        for row in vectors:
            products = torch.autograd.grad(
                self._graph_grads, self.params, grad_outputs=self._pieces(row),
                retain_graph=True, allow_unused=True,
            )
            rows.append(self._flatten(products, ()))
        return stacked_rows(rows)

    def matvec(self, vector: Tensor) -> Tensor:
        """``H v`` for a flat ``[P]`` vector."""
        return self.matmat(vector.reshape(1, -1))[0]


#: A source's products and its matrix, as the symmetry check names them.
PRODUCTS_OF = {"hessian": ("Hessian-vector products", "the Hessian"),
               "ggn": ("GGN-vector products", "the GGN"),
               "fisher": ("EF-vector products", "the empirical Fisher")}


def asymmetry_error(antisymmetric: float, symmetric: float,
                    problem: CurvatureProblem, source: str = "hessian") -> ValueError | None:
    """The error for Hessian-vector products that are not symmetric beyond rounding, if they are.

    A Hessian is symmetric; products that are not (``||K|| / ||S||`` for the computed matrix's
    antisymmetric part ``K`` and symmetric part ``S``, of norms ``antisymmetric`` and
    ``symmetric``; float32 rounding leaves about 2e-7) come from a wrong second derivative
    somewhere in the model or the loss: a custom ``autograd.Function`` whose backward is not
    differentiable as written, or a torch kernel with a wrong double backward
    (:class:`TwiceDifferentiable` replaces the one known here), or, in a float64 model, part of
    the forward computed at a lower precision, whose rounding the products carry (named by
    :func:`~hessrank.problem.lower_precision_cause` from a forward of ``problem``, one batch of
    the products' data). Their eigenvalues would be those of a matrix that is not the Hessian.
    NaN products (a NaN derivative, an overflow) get
    :func:`~hessrank.spectrum.dense.not_finite_error` instead.

    ``source`` ``"ggn"`` or ``"fisher"``: the factor operators' products ``J^T s s^T J v``,
    symmetric by form where ``J v`` (a double backward) is the transpose of ``J^T u``; a model
    rounding through half precision breaks that (``fisher_lanczos`` had listed every
    eigenvalue twice, its trace 2x; probe 166), as a wrong double backward would.

    A block of the parameters (``per_layer``) is measured against the whole curvature's scale
    where that is larger (``problem.whole_scale``): its products run through the whole model's
    backward pass, whose rounding is all a block that is zero to rounding holds (a module whose
    output every logit shares, which cross-entropy cancels); against its own size it was
    refused as a wrong second derivative (probe 132). The whole's products, checked first,
    include the block's.
    """
    tolerance = agreement_tolerance(problem.dtype)
    scale = max(symmetric, problem.whole_scale)
    asymmetry = antisymmetric / scale if scale > 0 else 0.0
    if not math.isfinite(asymmetry):
        return not_finite_error(problem.dtype)
    if asymmetry <= tolerance:
        return None
    subnormal = subnormal_scale_error(scale, problem.dtype, source, "norm")
    if subnormal is not None:  # (whose rounding is no wrong derivative's)
        return subnormal
    products, matrix = PRODUCTS_OF[source]
    # the loss, where the products ran it as given (a float64 model's: its cast not widened)
    # (below float64 the loss's casts below float32 are kept, and its float64 widening is no
    # cause the watch would see); the factors' products do not differentiate it
    cause = lower_precision_cause(problem, asymmetry, with_loss=source == "hessian" and (
        problem.dtype != torch.float64 or any(RUNS_AS_GIVEN in note for note in problem.notes)))
    allowed = tolerance if cause else _long_sums_allowed(
        problem, tolerance, asymmetry, f"the {products}' symmetry check",
        "their antisymmetric part")
    if asymmetry <= allowed:
        return None
    observation = (f"the {products} are not symmetric (antisymmetric part "
                   f"{asymmetry:.1e} of the symmetric one, rounding allows {allowed:.1e})")
    if cause:
        return ValueError(f"{observation}: {cause}")
    unwidened = [note for note in problem.notes if note.startswith(_UNWIDENED)]
    if unwidened:  # the loss's own rounding near saturation, first
        rounding = f"; or the loss's rounding, as {unwidened[0]}"
    elif problem.dtype == torch.float64:
        rounding = ("; at a loss near zero, a memorised batch's, the rounding of the larger terms "
                    "the products sum can exceed the allowance too: the model's float32 copy, "
                    "whose loss runs in float64, then passes")
    else:
        rounding = f"; {LONG_SUMS}"
    return ValueError(
        f"{observation}: autograd's second derivative of some operation in the model or the "
        "loss is wrong (a custom autograd.Function whose backward is not itself "
        "differentiable as written, or a torch kernel with a wrong double backward), so no "
        f"eigenvalue of them is {matrix}'s. Use method='fisher' or 'ggn' (no second "
        "derivatives of the model), or write that operation with plain differentiable torch "
        f"operations{rounding}")


def check_products(operator: SymmetricOperator, generator: torch.Generator,
                   problem: CurvatureProblem, source: str, eps: float
                   ) -> tuple[float, int, float]:
    """Verify the products symmetric, ``u . A v = v . A u``, and linear, ``A (u + v) = A u + A
    v``, for two random vectors ``u``, ``v`` (three products); returns ``|u . K v|``, an estimate
    of the antisymmetric part's norm ``||K||_F`` (one draw of a variable of that standard
    deviation), the products spent, and their noise (below).

    With ``A = S + K`` (symmetric and antisymmetric parts), ``u . A v - v . A u = 2 u . K v``,
    whose size is about ``||K||_F``, against ``||u|| ||A v|| / sqrt(P)``, about ``||S||_F``:
    their ratio estimates the dense check's ``||K|| / ||S||`` (:func:`dense_hessian`). The
    vectors are a run's probes (:func:`~hessrank.spectrum.lanczos.probe_vector`: independent
    entries of mean 0 and variance 1, which is all the estimate needs; Rademacher beyond a few
    entries, drawn in a third of the time of Gaussians: 0.65 s of a 6.4 s call at P = 11 million
    had drawn two in float64).

    A Lanczos run takes the products for a fixed matrix's, to the rounding that
    :func:`~hessrank.spectrum.lanczos.rounding_slack` allows two runs' values of one eigenvalue
    (``eps``: the run's, :func:`~hessrank.spectrum.lanczos.working_eps`): products that carry
    more noise than that give each run its own copy of an eigenvalue, counted once a run. A
    float32 model rounding through half precision inside a custom ``autograd.Function``, where
    no watch sees it, had given ``fisher_lanczos`` every eigenvalue twice, its trace 1.6-1.9x,
    with the symmetry check passing (probe 175). Such noise is not linear in the vector: the
    third product measures it, ``e = A (u + v) - A u - A v``, along the products (the range,
    where the Ritz vectors lie): the largest ``|e . A w| / ||A w||^2`` over ``w`` in ``u``,
    ``v``, ``u + v`` estimates by how much of an eigenvalue a product's noise moves its Ritz
    value. Float32 products of MLPs, transformers, LSTMs and ResNet-18 measure 0.01 to 2
    epsilons; a CNN's EF averaging 1,024 positions, 83; that model's 64 to 1,600. The run
    allows its comparisons :data:`~hessrank.spectrum.lanczos.NOISE_MARGIN` times it
    (``lanczos_spectrum(noise=)``); beyond the tolerance of two computations that agree to
    rounding (:func:`~hessrank.problem.agreement_tolerance`, in the run's epsilons) the products
    are refused. Products below the normal range, whose rounding is absolute, are taken again on
    probes scaled up by a power of two (:func:`~hessrank.spectrum.lanczos.input_unit`), as the
    run takes its own: unscaled, a top of 2e-38 was refused as subnormal.

    Raises:
        ValueError: the products are not symmetric beyond rounding (:func:`asymmetry_error`),
            or not linear beyond it (:func:`nonlinearity_error`).
    """
    dim = operator.dim
    probes = torch.stack([probe_vector(dim, generator, operator.device, operator.dtype)
                          for _ in range(2)])
    products = operator.matmat(probes)
    spent = 2
    unit = input_unit(products)
    if unit != 1.0:  # (a power of two: the probes scaled exactly)
        # ``|A u|`` estimates ``||A||_F``, at least the largest ``|eigenvalue|``: eight times it
        # below the normal range (a draw that small about never), so is the spectrum, which
        # the call refuses after the run (:func:`~hessrank.curvature.loss.subnormal_scale_error`)
        norm = max(_frobenius(product.to(torch.float64)) for product in products)
        below = (subnormal_scale_error(norm, problem.dtype, source, "norm")
                 if 8 * norm < torch.finfo(operator.dtype).smallest_normal else None)
        if below is not None:
            raise below
        products = operator.matmat(probes / unit)
        spent += 2
    summed = operator.matmat((probes / unit).sum(0, keepdim=True))
    spent += 1
    (u, v), (au, av, a_sum) = (probes.to(torch.float64).cpu(),
                               torch.cat([products, summed]).to(torch.float64).cpu() * unit)
    norms = [_frobenius(product) for product in (au, av, a_sum)]  # (in range at 1e-305, 1e200)
    scale = float(u.norm() * norms[1] + v.norm() * norms[0]) / (2 * math.sqrt(dim))
    antisymmetric = float((u @ av - v @ au).abs()) / 2
    if scale == 0:
        return antisymmetric, spent, 0.0
    error = asymmetry_error(antisymmetric, scale, problem, source)
    noise = 0.0
    if error is None:
        largest = max(norms)
        noise = math.inf  # (NaN or overflowing products: not finite, named so)
        if math.isfinite(largest):
            unit_sum = (a_sum - au - av) / largest  # (norms up to 1: in range at any scale)
            # Each against its own size, or the whole curvature's for a block (per_layer) where
            # that is larger, as the symmetry's (a block the loss cancels is all rounding: its
            # noise is its size; probe 132's model); a product far shorter than the others, by
            # chance, would magnify its draw.
            floors = [problem.whole_scale * float(w.norm()) / math.sqrt(dim)
                      for w in (u, v, u + v)]
            noise = max(float((unit_sum @ (product / norm)).abs()) * largest / max(norm, floor)
                        for product, norm, floor in zip((au, av, a_sum), norms, floors)
                        if 4 * norm >= largest)
        error = nonlinearity_error(noise, scale, eps, problem, source)
    if error is not None:
        raise error
    return antisymmetric, spent, noise


def nonlinearity_error(noise: float, scale: float, eps: float, problem: CurvatureProblem,
                       source: str) -> ValueError | None:
    """The error for products whose ``A (u + v) - A u - A v`` moves their Rayleigh quotients by
    ``noise`` (:func:`check_products`), beyond what two computations that agree to a Lanczos
    run's rounding (of working epsilon ``eps``) differ by, if it is (``scale``: the check's
    estimate of the matrix's norm, below the normal range a subnormal product's rounding). The
    cause named where a forward watched operation by operation finds one
    (:func:`~hessrank.problem.lower_precision_cause`)."""
    allowed = 1024 * eps  # (agreement_tolerance's units)
    if not math.isfinite(noise):
        return not_finite_error(problem.dtype)
    if noise <= allowed:
        return None
    subnormal = subnormal_scale_error(scale, problem.dtype, source, "norm")
    if subnormal is not None:
        return subnormal
    products, matrix = PRODUCTS_OF[source]
    cause = lower_precision_cause(problem, noise, with_loss=source == "hessian")
    if not cause:
        allowed = _long_sums_allowed(problem, allowed, noise, f"the {products}' linearity check",
                                     "A(u + v) - A u - A v")
        if noise <= allowed:
            return None
    return ValueError(
        f"the {products} are not linear in the vector (A(u + v) - A u - A v moves them by "
        f"{noise:.1e} of their size, rounding allows {allowed:.1e}): they carry noise "
        f"that each Lanczos run would take for its own copies of {matrix}'s eigenvalues. "
        + (f"Cause: {cause}" if cause else
           "Part of the model or its loss computes at a lower precision where no forward "
           "watch sees it (inside a custom autograd.Function: cast its forward and backward "
           f"to {dtype_name(problem.dtype)} for the call), or draws random numbers at each "
           "call (make it deterministic, or use mode='eval')"
           + (f"; or {LONG_SUMS}" if problem.dtype != torch.float64 else "")))


def _long_sums_allowed(problem: CurvatureProblem, tolerance: float, measured: float,
                       check: str, what: str) -> float:
    """What a check of the products allows, ``tolerance`` or more where the model's layers sum
    long (:func:`~hessrank.problem.long_sums_allowance`), with a note in the problem's where
    only that lets ``measured`` (``what``, relative to the products) pass."""
    allowed, terms = long_sums_allowance(problem, tolerance)
    if tolerance < measured <= allowed:
        # (a block's, per_layer's, named: the blocks share their notes; probe 189)
        block = (f" on the block of {listed_names(problem.names, 3)}" if problem.whole_scale
                 else "")
        note = (f"{check}{block} passes only within the rounding of the model's long sums "
                f"({what} {measured:.1e} of their size; {tolerance:.1e} allowed for any model, "
                f"{allowed:.1e} for sums of {terms:,} terms)")
        if note not in problem.notes:
            problem.notes.append(note)
    return allowed


#: The float32 products' own rounding beyond the checks' allowances (CNNs over 128 x 128 to
#: 384 x 384 positions: their symmetry and linearity checks failed; probes 180, 183), in the
#: checks' messages.
LONG_SUMS = ("the rounding of very long float32 sums (feature maps of 10^4 positions and more), "
             "which a float64 copy of the model (copy.deepcopy(model).double(), float64 inputs) "
             "measures")


def dense_hessian(
    operator: HessianOperator,
    chunk_size: int,
    advance: Callable[[int], None] | None = None,
    symmetrise: bool = True,
) -> Tensor:
    """The full ``[P, P]`` Hessian in float64, ``chunk_size`` columns at a time, symmetrised
    once its products are verified symmetric to rounding (:func:`symmetrised`); as computed
    where not ``symmetrise`` (a data set's batch: its sum is checked).

    Memory: the float64 result plus ``chunk_size`` products in flight. ``advance(k)`` is called
    after each chunk of ``k`` columns (progress reporting). A chunk of columns below the
    dtype's normal range (a float32 loss scaled by 1e-40, to a top eigenvalue of 2e-38: its
    spectrum had been off by 1.6e-5 of the top) is taken again on basis vectors scaled up by a
    power of two (:func:`~hessrank.spectrum.lanczos.input_unit`).

    Raises:
        ValueError: the products are not symmetric beyond rounding (:func:`asymmetry_error`).
    """
    dim = operator.dim
    hessian = torch.empty(dim, dim, dtype=torch.float64, device=operator.device)
    for start in range(0, dim, chunk_size):
        stop = min(start + chunk_size, dim)
        basis = torch.zeros(stop - start, dim, dtype=operator.dtype, device=operator.device)
        basis[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
        products = operator.matmat(basis)
        unit = input_unit(products)  # each chunk its own (a first chunk's 2^-64 had made a
        hessian[start:stop] = products  # later chunk of large columns overflow; probe 170)
        if unit != 1.0:
            hessian[start:stop] = operator.matmat(basis / unit)
            hessian[start:stop] *= unit
        if advance is not None:
            advance(stop - start)
    if symmetrise:
        operator.rounding = symmetrised(hessian, operator.problem)
    return hessian


def _frobenius(matrix: Tensor) -> float:
    """``||matrix||_F``, where its sum of squares leaves the dtype's range measured on the
    matrix scaled by its largest entry (a float64 Hessian of 8e199 had a norm of Inf, and was
    refused as not finite; from about 1e154 the check's ratio was x / Inf = 0; probe 170)."""
    norm = float(matrix.norm())
    largest = float(torch.linalg.vector_norm(matrix, math.inf))
    if largest == 0 or not math.isfinite(largest) or (math.isfinite(norm) and norm >= largest):
        return norm
    return largest * float((matrix / largest).norm())


def symmetrised(hessian: Tensor, problem: CurvatureProblem) -> float:
    """Make the computed ``[P, P]`` ``hessian`` symmetric in place, once its antisymmetric part
    is verified to be rounding; returns that part's norm (the products' rounding).

    A data set's batches are checked summed, as one batch of all their samples is: a batch
    saturated to float32's subnormal floor alone has products whose rounding is 7e-4 of its
    own (tiny) Hessian, and was refused as a wrong second derivative (probe 128).

    Raises:
        ValueError: the products are not symmetric beyond rounding (:func:`asymmetry_error`).
    """
    antisymmetric = _frobenius(hessian - hessian.T) / 2
    hessian += hessian.T.clone()
    hessian /= 2
    symmetric = _frobenius(hessian)
    error = asymmetry_error(antisymmetric, symmetric, problem)
    if error is not None:
        raise error
    return antisymmetric
