"""Data-parallel curvature: one batch sharded over the processes of a ``torch.distributed`` group.

Every process holds the same model and its own shard of the batch (shards concatenated in rank
order form the global batch of ``n = sum_r n_r`` samples). The curvature is that of the loss of
the **global** batch, exactly as one process would compute it on the concatenated batch:

- **The loss.** ``loss_fn`` is evaluated on the all-gathered outputs and targets (``n x C`` numbers
  and ``n`` targets), so the global loss is whatever ``loss_fn`` gives on the whole batch. For a
  mean reduction that is ``sum_r (n_r / n) L_r`` (``L_r`` the shard's own mean), for a sum
  ``sum_r L_r``, for class weights ``sum_r (W_r / W) L_r``: shards may differ in size and nothing
  about the reduction is assumed. Inside a process the other shards' outputs are constants, so the
  gradient and the Hessian-vector products of this "global loss of my shard" add up over the
  processes to the global ones, provided the loss does not couple samples of different shards
  (checked: :func:`check_shards_uncoupled`). A term of the parameters themselves (an L2
  penalty) is in every process's loss; only process 0 keeps its derivatives, so it counts once.
  Every process must evaluate the same loss: checked on the gathered batch
  (:func:`check_same_loss`).
- **Products** (``exact``, ``lanczos``, ``ggn_lanczos``, ``fisher_lanczos``): each process applies
  its shard's part of the operator; the products are summed by one all-reduce of ``k x P``
  numbers.
- **Gram matrices** (``fisher``, ``ggn``): cotangents come from the loss on the gathered outputs
  (every process derives the same ones, then keeps its rows); the per-layer factors (rule layers:
  activations and output gradients) or per-sample factors (general path) are verified in their
  own process, then all-gathered, and every process forms the global Gram from them.

Every process returns the same result. Errors stay collective: a check that fails in one process
(bad input, a budget, a rule's or the general path's verification) is agreed on before the next
exchange and raised in every process, so no process is left waiting in a collective.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from hessrank.guard import (
    GroupFailure,
    ModuleGenerators,
    deferred_interrupts,
    evaluation_mode,
    raise_if_signalled,
)
from hessrank.problem import (
    FOR_THE_LOSS_S,
    HESSIAN_NEEDS,
    CurvatureProblem,
    LossFn,
    agreement_tolerance,
    call_loss,
    check_loss,
    finite_difference,
    refuse_mixed_samples,
    refuse_split_batch_statistics,
    tensor_outputs,
    without_second_derivative,
)

#: Most dimensions a gathered tensor may have (its shape travels in a fixed-size header).
MAX_DIMS = 8


_Method = TypeVar("_Method", bound=Callable[..., Any])


def _whole(method: _Method) -> _Method:
    """``method``, an exchange, with every signal held back until it has ended
    (:func:`~hessrank.guard.deferred_interrupts`): a timeout's exception or a Ctrl-C that landed
    between its flag's all-reduce and its collectives had this process start :meth:`fail`'s
    all-reduce where the others were in the collective, and both waited for the group's
    timeout, the group broken for good (probe 165). Held back, it lands between exchanges,
    where the others meet :meth:`fail` at their next flag."""

    @functools.wraps(method)
    def whole(*args: Any, **kwargs: Any) -> Any:
        with deferred_interrupts():
            return method(*args, **kwargs)

    return cast(_Method, whole)


class DataParallel:
    """This process's view of a process group: rank, shard sizes and the collectives hessrank uses.

    Args:
        group: an initialised ``torch.distributed`` process group this process belongs to.
        device: the model's device (NCCL communicates CUDA tensors; other backends go via CPU).

    Attributes:
        rank, world_size: this process's rank in ``group`` and the group's size.
        sizes: samples per process, in rank order (set by :func:`shard_problem`).
        exchanged_bytes: bytes this process receives in the tensor collectives so far, the same
            in every process: an all-gather brings the other processes' (padded) parts, a
            bandwidth-optimal (ring) all-reduce ``2 (R - 1) / R`` of the tensor.

    Raises:
        ValueError: ``torch.distributed`` is not initialised or this process is not in the group.
    """

    def __init__(self, group: Any, device: torch.device) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError(
                "process_group was given but torch.distributed is not initialised: call "
                "torch.distributed.init_process_group(...) in every process first (torchrun sets "
                "the environment), or pass process_group=None for one process"
            )
        not_member = ValueError(
            "this process is not a member of process_group (new_group gives the processes "
            "outside a group a placeholder): call effective_rank with process_group only in the "
            "group's members")
        if isinstance(group, int) and group == dist.GroupMember.NON_GROUP_MEMBER:
            # (what new_group hands the processes outside it; its type had been named, an int,
            # and the membership never; probe 242)
            raise not_member
        if not isinstance(group, dist.ProcessGroup):
            raise TypeError(f"process_group must be a torch.distributed ProcessGroup (e.g. "
                            f"dist.group.WORLD), got {type(group).__name__}")
        self.group = group
        self.rank = dist.get_rank(group)
        if self.rank < 0:
            raise not_member
        self.world_size = dist.get_world_size(group)
        self.backend = str(dist.get_backend(group))
        self.device = device if device.type == "cuda" and "nccl" in self.backend \
            else torch.device("cpu")
        self.sizes: tuple[int, ...] = ()
        self.exchanged_bytes = 0

    def global_ranks(self, *ranks: int) -> str:
        """``" (global ranks 1 and 2)"``: the global ranks of processes ``ranks`` of the group,
        for a message that numbers them by their group rank; empty where the group is the
        whole world (a subgroup's messages had named group ranks as if global; probe 242)."""
        members = dist.get_process_group_ranks(self.group)
        if members == list(range(dist.get_world_size())):
            return ""
        said = [str(members[rank]) for rank in ranks]
        return f" (global ranks {', '.join(said[:-1])} and {said[-1]})"

    @property
    def start(self) -> int:
        """Index of this process's first sample in the global batch."""
        return sum(self.sizes[: self.rank])

    @property
    def stop(self) -> int:
        """One past this process's last sample in the global batch."""
        return self.start + self.sizes[self.rank]

    @_whole
    def gather_objects(self, item: object) -> list[Any]:
        """``item`` from every process, in rank order (metadata; not counted as payload)."""
        self._proceed()
        return self._all_objects(item)

    def _all_objects(self, item: object) -> list[Any]:
        items: list[Any] = [None] * self.world_size
        dist.all_gather_object(items, item, group=self.group)
        return items

    def _proceed(self) -> None:
        """Before every exchange (and at the call's end, :meth:`finish`): one all-reduce of a
        flag, 1 in a process that is running, 0 in one that failed (:meth:`fail`), so that an
        error anywhere in one process's computation reaches the others at their next exchange
        instead of leaving them waiting for it until the group's timeout.

        Raises:
            GroupFailure: another process failed; names it, its error and message.
        """
        flag = torch.ones(1, dtype=torch.int32, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group)
        if int(flag.item()) == 0:
            reports = self._all_objects(None)
            rank, (kind, message) = next((rank, report) for rank, report in enumerate(reports)
                                         if report is not None)
            raise GroupFailure(f"process {rank} of the group failed ({kind}): {message}")

    @_whole
    def fail(self, error: BaseException) -> None:
        """Tell the other processes that this one failed with ``error``: they learn it at their
        next exchange or at the call's end (:meth:`_proceed`), where they are waiting."""
        flag = torch.zeros(1, dtype=torch.int32, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group)
        self._all_objects((type(error).__name__, str(error)))

    @_whole
    def finish(self) -> None:
        """The call's last exchange: every process has finished its computation (a process that
        failed after the others' last exchange is waited for here, and its error raised).

        Raises:
            GroupFailure: another process failed.
        """
        self._proceed()

    @_whole
    def broadcast_buffers(self, model: nn.Module, ignored: Collection[str] = ()) -> int:
        """Process 0's values into every floating or integer buffer of ``model`` but those
        ``ignored`` names, in place (the call's copies, :func:`hessrank.guard.preserved_state`);
        returns how many there are."""
        self._proceed()
        source = dist.get_global_rank(self.group, 0)
        buffers = [buffer for name, buffer in model.named_buffers()
                   if buffer is not None and name not in ignored]
        for buffer in buffers:
            moved = buffer.to(self.device)
            dist.broadcast(moved, src=source, group=self.group)
            if moved is not buffer:
                buffer.copy_(moved)
        return len(buffers)

    def agree(self, error: BaseException | None) -> None:
        """Raise in every process if ``error`` is set in any: the local error where there is one,
        elsewhere a ``RuntimeError`` naming the first failing process and its message."""
        reports = self.gather_objects(
            None if error is None else (type(error).__name__, str(error)))
        if error is not None:
            raise error
        for rank, report in enumerate(reports):
            if report is not None:
                kind, message = report
                raise RuntimeError(f"process {rank} of the group failed ({kind}): {message}")

    @contextmanager
    def agreement(self) -> Iterator[None]:
        """Run a block that contains no collective; if it raises in any process, raise in all."""
        error: Exception | None = None
        try:
            yield
        except GroupFailure:
            raise  # already raised in every process that was not the one failing
        except Exception as caught:  # noqa: BLE001 - every error is reported to the others
            error = caught
        self.agree(error)

    @_whole
    def gather_samples(self, tensor: Tensor, dim: int = 0) -> Tensor:
        """All-gather along the sample dimension ``dim``: the shards concatenated in rank order.

        Shards may differ in size along ``dim`` (padded for the exchange); every other dimension
        must agree across the processes.

        Raises:
            ValueError: the shards' other dimensions or their number differ.
        """
        if tensor.dim() > MAX_DIMS:
            raise ValueError(f"cannot exchange a tensor of {tensor.dim()} dimensions "
                             f"(at most {MAX_DIMS})")
        self._proceed()
        header = torch.full((MAX_DIMS + 1,), -1, dtype=torch.int64, device=self.device)
        header[0] = tensor.dim()
        header[1 : tensor.dim() + 1] = torch.tensor(tensor.shape, dtype=torch.int64)
        headers = [torch.empty_like(header) for _ in range(self.world_size)]
        dist.all_gather(headers, header, group=self.group)
        shapes = [h[1 : int(h[0]) + 1].tolist() for h in (x.cpu() for x in headers)]
        mine = list(tensor.shape)
        for rank, shape in enumerate(shapes):
            if len(shape) != len(mine) or any(a != b for axis, (a, b) in
                                              enumerate(zip(shape, mine)) if axis != dim):
                raise ValueError(
                    f"process {rank} holds a tensor of shape {tuple(shape)} where this process "
                    f"(rank {self.rank}) holds {tuple(mine)}: every dimension but the samples "
                    "must agree across the processes (same model, same input shapes)"
                )
        longest = max(shape[dim] for shape in shapes)
        padded_shape = list(mine)
        padded_shape[dim] = longest
        padded = torch.zeros(padded_shape, dtype=tensor.dtype, device=self.device)
        padded.narrow(dim, 0, mine[dim]).copy_(tensor)
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded, group=self.group)
        self.exchanged_bytes += (self.world_size - 1) * padded.numel() * padded.element_size()
        return torch.cat([part.narrow(dim, 0, shape[dim]) for part, shape in zip(parts, shapes)],
                         dim=dim).to(tensor.device)

    @_whole
    def all_reduce(self, tensor: Tensor) -> Tensor:
        """The sum of ``tensor`` over the processes (a new tensor on ``tensor``'s device)."""
        self._proceed()
        buffer = tensor.to(self.device, copy=True)
        dist.all_reduce(buffer, group=self.group)
        # A bandwidth-optimal (ring) all-reduce receives 2 (R - 1) / R of the tensor.
        self.exchanged_bytes += (2 * (self.world_size - 1) * buffer.numel()
                                 * buffer.element_size() // self.world_size)
        return buffer.to(tensor.device)

    def shared_notes(self, notes: Sequence[str]) -> list[str]:
        """Every process's ``notes``, the same list in each: in rank order, each once, those
        that not every process has opening with the processes that have it (a caveat of one
        shard's float64 check had reached only that process's result; probe 207)."""
        held: dict[str, list[int]] = {}
        for rank, listed in enumerate(self.gather_objects(list(notes))):
            for note in listed:
                if rank not in held.setdefault(note, []):
                    held[note].append(rank)
        return [note if len(ranks) == self.world_size else
                f"in process{'es' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}: {note}"
                for note, ranks in held.items()]

    def describe(self) -> str:
        """One line for ``RankResult.notes``."""
        shards = ", ".join(map(str, self.sizes))
        processes = "1 process" if self.world_size == 1 else f"{self.world_size} processes"
        return (f"data-parallel over {processes} ({self.backend}): n = "
                f"{sum(self.sizes)} from shards of {shards} samples; tensor collectives moved "
                f"{self.exchanged_bytes / 2**20:.3g} MiB per process")


@dataclass
class ShardedProblem(CurvatureProblem):
    """A problem whose batch is sharded over a process group.

    ``args``, ``kwargs`` and ``targets`` are this process's shard; :attr:`num_samples` is the
    global ``n`` and :meth:`loss` the loss of the global batch (see the module docstring).

    Attributes:
        parallel: the group and the shard layout.
        all_targets: the targets of the global batch.
    """

    parallel: DataParallel = field(kw_only=True)
    all_targets: Tensor = field(kw_only=True)

    @property
    def num_samples(self) -> int:
        return sum(self.parallel.sizes)

    def gather_outputs(self, outputs: Tensor) -> Tensor:
        """The global batch's outputs (detached) from this shard's."""
        return self.parallel.gather_samples(outputs.detach())

    def loss(self, outputs: object = None, loss_fn: LossFn | None = None) -> Tensor:
        """The loss of the global batch, differentiable through this shard's outputs only.

        A collective: every process calls it together. Checked like
        :meth:`CurvatureProblem.loss` (same errors and arguments).
        """
        outputs = tensor_outputs(self.forward() if outputs is None else outputs)
        whole, everything = whole_batch(self, outputs)
        start, stop = self.parallel.start, self.parallel.stop
        combined = torch.cat([everything[:start], outputs, everything[stop:]])
        value = CurvatureProblem.loss(whole, combined, loss_fn)
        if self.parallel.rank == 0:
            return value
        # A term of the parameters themselves (an L2 penalty) is in every process's loss, and
        # the processes' derivatives are summed: only process 0 keeps its derivatives. Its
        # derivatives are those of the loss at constant outputs; the value stays the loss's.
        direct = call_loss(loss_fn or whole.loss_fn, everything, self.all_targets)
        return value - direct + direct.detach()

    def local(self) -> CurvatureProblem:
        """This shard as a single-process problem."""
        return CurvatureProblem(**self.core_fields())  # type: ignore[arg-type]


def parallel_of(problem: CurvatureProblem) -> DataParallel | None:
    """The problem's process group view, None for a single-process problem."""
    return problem.parallel if isinstance(problem, ShardedProblem) else None


def whole_batch(problem: CurvatureProblem, outputs: Tensor
                ) -> tuple[CurvatureProblem, Tensor]:
    """The global batch as a single-process problem, and its outputs (detached): a sharded
    problem's targets and outputs gathered (a collective: every process calls it together),
    a single process's problem and outputs as they are. What the loss of the global batch is
    evaluated on where each process evaluates it alike, without further exchanges (a loss
    holding a tensor of the global batch's size, per-sample weights, had been run on a shard
    and refused; probe 207)."""
    if not isinstance(problem, ShardedProblem):
        return problem, outputs.detach()
    whole = dataclasses.replace(problem.local(), targets=problem.all_targets)
    return whole, problem.gather_outputs(outputs)


def local_of(problem: CurvatureProblem) -> CurvatureProblem:
    """This process's shard as a single-process problem (the problem itself where it is one):
    what a process computes without exchanges (a trial, a diagnosis), which the others need not
    join (probe 161)."""
    return problem.local() if isinstance(problem, ShardedProblem) else problem


def sample_range(problem: CurvatureProblem) -> tuple[int, int, int]:
    """``(start, stop, n)``: this process's samples in the global batch of ``n``."""
    parallel = parallel_of(problem)
    if parallel is None:
        return 0, problem.num_samples, problem.num_samples
    return parallel.start, parallel.stop, problem.num_samples


@contextmanager
def agreement(parallel: DataParallel | None) -> Iterator[None]:
    """:meth:`DataParallel.agreement` in a group; a plain block for one process (None)."""
    if parallel is None:
        yield
    else:
        with parallel.agreement():
            yield


@contextmanager
def failures_shared(parallel: DataParallel | None) -> Iterator[None]:
    """A call's whole computation in a group (a plain block for one process, None): an error in
    one process is sent to the others (:meth:`DataParallel.fail`), which raise
    :class:`GroupFailure` at their next exchange or at the block's end
    (:meth:`DataParallel.finish`), instead of waiting for the failed process until the group's
    timeout; the failing process raises its own error."""
    if parallel is None:
        yield
        return
    try:
        yield
    except GroupFailure:
        raise
    except BaseException as error:  # re-raised once the others know
        # a Ctrl-C or a signal handler's exception too: the others had waited for the group's
        # timeout and got gloo's bare error (probe 164); not another process's failure, which
        # this one only learned of
        carried = getattr(error, "original", None)  # (a signal's exception on its way out)
        if not isinstance(carried, GroupFailure):
            parallel.fail(error if carried is None else carried)
        raise
    parallel.finish()


#: The fingerprint's position weights: frac(k * golden ratio), spread over [0, 1) without a period.
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


_Print = tuple[str, tuple[int, ...], tuple[float, float, float]]


def _fingerprint(model: nn.Module) -> list[_Print]:
    """Per parameter (analysed or frozen) and buffer: its label, shape, and float64 sum, sum of
    squares and sum weighted by position (``frac(k * golden ratio)``). Equal models give equal
    fingerprints; a changed entry moves the sums, and entries swapped between positions the
    weighted one. One tensor at a time: two float64 copies of the largest."""
    prints: list[_Print] = []
    with torch.no_grad():
        for kind, named in (("parameter", model.named_parameters()),
                            ("buffer", model.named_buffers())):
            for name, tensor in named:
                values = tensor.detach()
                values = (torch.view_as_real(values) if values.is_complex() else values)
                values = values.reshape(-1).double()
                positions = torch.arange(values.numel(), dtype=torch.float64,
                                         device=values.device).mul_(_GOLDEN).frac_()
                prints.append((f"{kind} {name!r}", tuple(tensor.shape),
                               (float(values.sum()), float(values.square().sum()),
                                float(values @ positions))))
    return prints


def _differing_state(mine: list[_Print], theirs: list[_Print]) -> str | None:
    """The first parameter or buffer whose fingerprint differs (to rounding), or None."""
    if [label for label, _, _ in mine] != [label for label, _, _ in theirs]:
        return "the models' parameters and buffers (different names)"
    for (label, shape, sums), (_, other_shape, other_sums) in zip(mine, theirs):
        size = math.prod(shape)
        scale = max(abs(sums[1]), math.sqrt(abs(sums[1]) * max(size, 1)), 1e-300)
        if shape != other_shape or any(abs(a - b) > 1e-9 * scale
                                       for a, b in zip(sums, other_sums)):
            return label
    return None


def shard_problem(problem: CurvatureProblem, parallel: DataParallel,
                  signature: dict[str, object], ddp_buffers: bool = False,
                  ddp_ignored: Collection[str] = ()) -> ShardedProblem:
    """Check that every process analyses the same thing and build the sharded problem.

    One exchange of metadata (the call's signature, the shard size, a fingerprint of the
    parameters and buffers, process 0's first sample), one all-gather of the targets, and one
    of the outputs every process's model gives that sample (:func:`_check_same_function`).

    Args:
        problem: this process's validated shard.
        parallel: the group (its ``sizes`` are set here).
        signature: the call's options, which must agree across the processes.
        ddp_buffers: the model is a ``DistributedDataParallel`` with ``broadcast_buffers``:
            its buffers are process 0's for the call, as DDP's next forward would make them
            (after its last training step each process holds the running statistics its own
            shard updated), with a note.
        ddp_ignored: the names of the buffers DDP leaves alone (its ``parameters_to_ignore``):
            not broadcast, so that differing ones are refused as for a plain module (process
            0's had been taken, the note saying DDP would; probe 207).

    Raises:
        ValueError: the processes disagree on the options, the parameters, the batch's shapes
            or what their models compute, ``mode='train'`` would use each shard's BatchNorm
            statistics, or every shard holds one sample (in every process).
    """
    described = {
        **signature,
        "parameters": [(name, tuple(p.shape)) for name, p in zip(problem.names, problem.params)],
        "dtype": str(problem.dtype),
        "inputs": [tuple(x.shape[1:]) for x in problem.args]
        + [(key, tuple(x.shape[1:])) for key, x in sorted(problem.kwargs.items())],
        "targets": (tuple(problem.targets.shape[1:]), str(problem.targets.dtype)),
        # agreed before the buffers' broadcast, a collective of the processes that ask for it
        # (a model DDP-wrapped in one process only had hung the group; probe 98)
        "DistributedDataParallel with broadcast_buffers": ddp_buffers,
    }
    args, kwargs = problem.sample_slice(0, 1)  # each process's first serves every model
    reports = parallel.gather_objects((described, problem.num_samples,
                                       None if ddp_buffers else _fingerprint(problem.model),
                                       ([x.cpu() for x in args],
                                        {key: x.cpu() for key, x in kwargs.items()})))
    first = reports[0][0]
    for rank, (other, _, _, _) in enumerate(reports):
        differing = sorted(key for key in first if first[key] != other.get(key))
        if differing:
            raise ValueError(
                f"processes 0 and {rank} call effective_rank differently ({', '.join(differing)}:"
                f" {[first[key] for key in differing]} against {[other[key] for key in differing]}"
                "): every process of the group must pass the same model, options and input "
                "shapes, with its own shard of the batch"
            )
    prints = [report[2] for report in reports]
    if ddp_buffers:
        with torch.no_grad():
            if parallel.broadcast_buffers(problem.model, ddp_ignored):
                problem.notes.append(
                    "buffers (BatchNorm statistics) are process 0's in every process, as "
                    "DistributedDataParallel's next forward would make them (broadcast_buffers="
                    "True); your buffers are unchanged")
        prints = parallel.gather_objects(_fingerprint(problem.model))
    first_print = prints[0]
    for rank, other_print in enumerate(prints):
        differing_state = _differing_state(first_print, other_print)
        if differing_state is not None:
            raise ValueError(
                f"{differing_state} differs between processes 0 and {rank}"
                f"{parallel.global_ranks(0, rank)}: "
                "every process must hold the same model, its frozen parameters and buffers "
                "included. DistributedDataParallel keeps parameters equal, but after a training "
                "step each process's BatchNorm statistics are its own shard's: pass the "
                "DDP-wrapped model (with broadcast_buffers=True its buffers are taken from "
                "process 0), or broadcast them first (for b in model.buffers(): "
                "dist.broadcast(b, group_src=0, group=process_group))"
            )
    refuse_split_batch_statistics(problem, "process's shard")
    parallel.sizes = tuple(int(size) for _, size, _, _ in reports)
    if max(parallel.sizes) < 2:
        # each process runs its shard alone, and whether the model mixes the samples of a batch
        # is seen only in a shard of two samples or more: unchecked, a model with a batch mean
        # was analysed one sample at a time (exact's top eigenvalue 3.42 against the one
        # process's 3.17; probe 71)
        raise ValueError(
            f"every process holds one sample (shards of {list(parallel.sizes)}), so the call "
            "cannot check that the model computes each sample on its own (each process runs its "
            "shard alone, and a model that mixes the samples of a batch would be analysed one "
            "sample at a time): give at least one process two samples or more, or call without "
            "process_group on the whole batch")
    all_targets = parallel.gather_samples(problem.targets)
    sharded = ShardedProblem(**problem.core_fields(),  # type: ignore[arg-type]
                             parallel=parallel, all_targets=all_targets)
    with evaluation_mode(problem.model, problem.mode):
        _check_same_function(sharded, [report[3] for report in reports])
    return sharded


def gathered_output_side(problem: CurvatureProblem, outputs: Tensor, columns: int
                         ) -> tuple[int, int]:
    """The samples :func:`shard_cotangents` computes the output side on, and the bytes it
    holds for the gathered global batch beyond one process's own: the global batch's
    outputs and its ``columns`` factor columns a sample (``(n_r, 0)`` in one process).

    Args:
        problem: the problem (sharded or not).
        outputs: this process's outputs ``[n_r, *out]``.
        columns: factor columns ``K`` a sample.
    """
    if not isinstance(problem, ShardedProblem):
        return outputs.shape[0], 0
    samples = problem.num_samples
    return samples, (1 + columns) * samples * outputs[0].numel() * outputs.element_size()


def shard_cotangents(problem: CurvatureProblem,
                     cotangents_of: Callable[[Tensor, Tensor], Tensor],
                     outputs: Tensor) -> Tensor:
    """``[K, n_r, *out]`` output-side factors of this process's samples.

    Args:
        problem: the problem (sharded or not).
        cotangents_of: ``(outputs, targets) -> [K, n, *out]`` for a whole batch.
        outputs: this process's outputs.

    Single process: ``cotangents_of(outputs, targets)``. Sharded: every process derives the
    cotangents of the global loss from the gathered outputs and targets (the same computation as
    one process on the whole batch, so a mean reduction weighs each sample ``1/n``), and keeps its
    own rows.
    """
    outputs = tensor_outputs(outputs)
    if not isinstance(problem, ShardedProblem):
        return cotangents_of(outputs.detach(), problem.targets)
    everything = problem.gather_outputs(outputs)
    with torch.no_grad():
        check_same_loss(problem, call_loss(problem.loss_fn, everything, problem.all_targets))
    cotangents = cotangents_of(everything, problem.all_targets)
    _check_same_cotangents(problem, cotangents)
    # a copy: the view kept every process's rows alive
    return cotangents[:, problem.parallel.start : problem.parallel.stop].clone()


def _check_same_cotangents(problem: ShardedProblem, cotangents: Tensor) -> None:
    """Raise in every process unless each derived the same cotangents from the gathered batch
    (their shape, sum and sum of squares, a collective): the loss side's float64 checks may
    fail in one process only (out of memory there), which then read its factors otherwise, and
    the spectrum was a mix of the two readings (a GGN 27 % low, with no note in process 0;
    probe 174).

    Raises:
        ValueError: naming the processes and what differs.
    """
    # (summed in float64 without a float64 copy: two copies had raised an MC GGN's peak over
    # its budget, 300 MiB at 20,000 classes; probe 175)
    detached = cotangents.detach()
    mine = (tuple(cotangents.shape), float(detached.sum(dtype=torch.float64)),
            float(torch.linalg.vector_norm(detached, dtype=torch.float64)) ** 2)
    readings = problem.parallel.gather_objects(mine)
    tolerance = agreement_tolerance(cotangents.dtype)
    first_shape, first_total, first_squares = readings[0]
    for rank, (shape, total, squares) in enumerate(readings):
        if shape != first_shape or not (
                abs(squares - first_squares) <= tolerance * max(first_squares, 1e-300)
                and abs(total - first_total) <= tolerance * math.sqrt(
                    max(first_squares, 1e-300) * max(detached.numel(), 1))):
            raise ValueError(
                f"processes 0 and {rank} derived different output-side factors from the same "
                f"gathered batch (shapes {first_shape} and {shape}, sums of squares "
                f"{first_squares:.8g} and {squares:.8g}): a check of the loss that one of them "
                "ran in float64 failed there alone (out of memory, a note in its result says "
                "why); rerun where the float64 copy of the loss fits in every process")


def _check_same_function(problem: ShardedProblem,
                         samples: list[tuple[list[Tensor], dict[str, Tensor]]]) -> None:
    """Raise in every process unless every process's model gives each process's first sample
    (``samples``, in rank order: inputs and keyword inputs) the same outputs, to rounding (a
    collective; one forward pass of one sample a process, in the mode the caller sets). The
    fingerprint compares parameters and buffers, not what the model computes from them: a
    plain attribute (a scale, a flag), an activation or a layer chosen by a setting, or another
    forward made the result a silent mix of several models' curvatures (probe 61); one that
    changes no output of process 0's first sample (a clamp above its values) had gone unseen
    on it alone (probe 188).

    Raises:
        ValueError: naming the first process whose outputs differ, on which sample, by how
            much, and the likely causes.
    """
    parallel = problem.parallel
    for owner, (shared_args, shared_kwargs) in enumerate(samples):
        sample = dataclasses.replace(
            problem.local(), args=tuple(x.to(problem.device) for x in shared_args),
            kwargs={key: x.to(problem.device) for key, x in shared_kwargs.items()},
            targets=problem.targets[:1])
        outputs: list[Tensor] | str
        try:
            with torch.no_grad():
                outputs = [leaf.detach().cpu() for leaf in tree_flatten(sample.forward())[0]
                           if isinstance(leaf, Tensor)]
        except Exception as error:  # noqa: BLE001 - a model that cannot run one sample alone
            raise_if_signalled(error)
            outputs = f"{type(error).__name__}: {error}"
        everyone = parallel.gather_objects(outputs)
        failures = [rank for rank, leaves in enumerate(everyone) if isinstance(leaves, str)]
        if len(failures) == len(everyone):  # the same model everywhere, as far as this tells
            problem.notes.append(
                "the processes' models were compared by their parameters and buffers alone: "
                f"they cannot run one sample alone ({everyone[0]})")
            return
        if failures:
            working = next(rank for rank in range(len(everyone)) if rank not in failures)
            raise ValueError(
                f"the model of process {failures[0]} fails on process {owner}'s first sample "
                f"({everyone[failures[0]]}) where that of process {working} runs it: every "
                "process must hold the same model")
        _refuse_other_outputs(problem, cast(list[list[Tensor]], everyone), owner)


def _refuse_other_outputs(problem: ShardedProblem, everyone: list[list[Tensor]],
                          owner: int) -> None:
    """Raise where a process's outputs ``everyone[rank]`` of process ``owner``'s first sample
    differ from process 0's beyond rounding (:func:`_check_same_function`)."""
    first = everyone[0]
    scale = max((float(leaf.double().nan_to_num(0.0, 0.0, 0.0).abs().max())
                 for leaves in everyone for leaf in leaves if leaf.numel()), default=0.0)
    tolerance = agreement_tolerance(problem.dtype) * max(scale, torch.finfo(problem.dtype).tiny)
    for rank, leaves in enumerate(everyone[1:], start=1):
        same_shapes = [leaf.shape for leaf in leaves] == [leaf.shape for leaf in first]
        difference = max((finite_difference(a, b) for a, b in zip(leaves, first)),
                         default=0.0) if same_shapes else None
        if difference is None or difference > tolerance:
            places = ModuleGenerators.read(problem.model).places
            measured = ("their outputs have other shapes" if difference is None else
                        f"their outputs differ by {difference / max(scale, 1e-300):.1e} of the "
                        "largest")
            raise ValueError(
                f"the model computes another function in process {rank} than in process 0 (on "
                f"process {owner}'s first sample {measured}), though their parameters and "
                "buffers agree: something held outside them differs (a plain attribute such as "
                "a scale or a flag, an activation or a layer chosen by a setting, the forward's "
                "code"
                + (f", the state of the model's own random generator ({', '.join(places)})"
                   if places else "")
                + "), and the result would mix several models' curvatures; every process must "
                "hold the same model")


def check_same_loss(problem: ShardedProblem, value: Tensor) -> None:
    """Raise in every process unless each evaluated ``loss_fn`` on the gathered batch to the
    same ``value`` (a collective): a process passing another loss would make the result a mix.

    Raises:
        ValueError: naming the processes and their values.
    """
    values = problem.parallel.gather_objects(float(value))
    if not any(math.isfinite(other) for other in values):
        # non-finite everywhere: one process's error, not a mismatch (probe 62), naming the
        # NaN or infinite entry of this process's shard where it holds one
        check_loss(value, batch=problem.local().labelled_batch())
    tolerance = agreement_tolerance(value.dtype) * max(abs(values[0]), 1e-30)
    for rank, other in enumerate(values):
        if not abs(other - values[0]) <= tolerance:
            raise ValueError(
                f"processes 0 and {rank} evaluate loss_fn to {values[0]:.8g} and {other:.8g} on "
                "the same gathered batch: every process of the group must pass the same loss_fn")


def check_shards_uncoupled(problem: ShardedProblem) -> None:
    """Raise unless the loss's Hessian w.r.t. the outputs has no blocks between shards, and
    unless the model computes each sample's outputs on its own (:func:`refuse_mixed_samples`).

    Then the global Hessian is the sum of the processes' Hessians of the global loss of their own
    shard. Checked on the gathered outputs with one random probe per shard (a batched
    Hessian-vector product of the loss alone: every process computes the same thing).

    Raises:
        ValueError: the loss couples samples of different processes, or the model samples of
            one batch.
    """
    parallel = problem.parallel
    with torch.no_grad():
        local = tensor_outputs(problem.forward())
    refuse_mixed_samples(problem.local(), local, "process's shard")
    outputs = problem.gather_outputs(local)
    leaf = outputs.requires_grad_(True)
    value = call_loss(problem.loss_fn, leaf, problem.all_targets)
    check_same_loss(problem, value.detach())
    (first,) = torch.autograd.grad(value, leaf, create_graph=True, allow_unused=True)
    if first is None or not first.requires_grad:
        return  # linear in the outputs: no second-order coupling
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(outputs.shape, generator=generator, dtype=outputs.dtype)
    probe = probe.to(outputs.device)
    masks = torch.zeros(parallel.world_size, outputs.shape[0], dtype=outputs.dtype,
                        device=outputs.device)
    bounds = [0, *torch.tensor(parallel.sizes).cumsum(0).tolist()]
    for rank in range(parallel.world_size):
        masks[rank, bounds[rank] : bounds[rank + 1]] = 1.0
    shape = (parallel.world_size, outputs.shape[0], *([1] * (outputs.dim() - 1)))
    vectors = probe[None] * masks.reshape(shape)
    try:
        products = torch.stack([torch.autograd.grad(first, leaf, vector, retain_graph=True)[0]
                                for vector in vectors])
    except RuntimeError as error:  # (torch's bare message reached the caller; probe 77)
        raise without_second_derivative(error, HESSIAN_NEEDS, FOR_THE_LOSS_S) from error
    inside = (products * masks.reshape(shape)).norm()
    outside = (products * (1 - masks.reshape(shape))).norm()
    if outside > agreement_tolerance(outputs.dtype) * max(float(inside), 1e-300):
        raise ValueError(
            "the loss couples samples of different processes (its Hessian w.r.t. the outputs has "
            f"blocks between shards, relative size {float(outside / max(inside, 1e-300)):.2e}), "
            "so the global Hessian is not a sum over the processes: data-parallel 'exact' and "
            "'lanczos' need a loss that adds up over samples (mean, sum, weighted mean); gather "
            "the batch in one process instead"
        )


def is_ddp_without_group(model: nn.Module) -> bool:
    """Whether ``model`` is a DistributedDataParallel wrapper in a group of several processes."""
    return (isinstance(model, nn.parallel.DistributedDataParallel) and dist.is_initialized()
            and dist.get_world_size() > 1)
