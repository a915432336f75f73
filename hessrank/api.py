"""Public entry points: effective_rank, predict_exact_cost and gradient_overlap."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import math
import numbers
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.checkpoint import CheckpointError

from hessrank.curvature.hessian import HessianOperator, dense_hessian
from hessrank.curvature.loss import subnormal_scale_error, vanished_curvature_note
from hessrank.distributed import (
    DataParallel,
    agreement,
    failures_shared,
    is_ddp_without_group,
    local_of,
    shard_problem,
)
from hessrank.estimators import (
    ESTIMATORS,
    METHODS,
    BudgetError,
    Cost,
    Estimator,
    Settings,
    Spectrum,
    option_fields,
)
from hessrank.estimators.base import DEFAULT_MAX_MEMORY, seconds_of
from hessrank.estimators.exact import batched_columns
from hessrank.estimators.gram import BACKENDS
from hessrank.guard import (
    ExitsHeldBack,
    differentiable,
    evaluation_mode,
    one_call_at_a_time,
    preserved_state,
    raise_if_signalled,
    surfacing_signals,
)
from hessrank.monitor import PeakMemory, Reporter
from hessrank.problem import (
    Batch,
    CurvatureProblem,
    LossFn,
    build_problem,
    check_call,
    check_count,
    check_loss_and_mode,
    check_model,
    check_number,
    ddp_among_wrappers,
    dtype_name,
    loss_evaluations,
    lower_precision_cause,
    nonfinite_entry,
    probe_for_target_dtype,
    probe_outputs,
    raise_extended,
    reentrant_checkpoint_error,
    refuse_target_dtype_of,
    refuse_the_nested_fast_path,
)
from hessrank.ranks import (
    MAX_DEFAULT_RTOL,
    check_rank_options,
    default_rtol,
    numerical_rank,
    spectral_ranks,
    srank,
    within_rank_bounds,
)
from hessrank.results import RankResult
from hessrank.spectrum.dense import NotFiniteError, not_finite_error, symmetric_eigenpairs
from hessrank.spectrum.lanczos import noise_eps
from hessrank.streaming import (
    StreamedProblem,
    announced_samples,
    batch_bytes,
    batch_read_seconds,
    first_batch,
    is_batch_stream,
    per_batch,
    same_draw,
    streamed_problem,
    workers_as_found,
)

if TYPE_CHECKING:
    from rich.progress import Progress

__all__ = ["BACKENDS", "METHODS", "effective_rank", "estimator_options", "gradient_overlap",
           "predict_exact_cost"]


def _estimator(method: object) -> Estimator:
    if not isinstance(method, str) or method not in ESTIMATORS:
        others = [name for name in ESTIMATORS if name not in METHODS]
        raise ValueError(f"unknown method {method!r}"
                         + (_did_you_mean([method], ESTIMATORS)
                            if isinstance(method, str) else "")
                         + f": choose one of {', '.join(METHODS)}"
                         + (f" (or {', '.join(others)})" if others else ""))
    return ESTIMATORS[method]


def _did_you_mean(words: Iterable[str], names: Iterable[str]) -> str:
    """`` (did you mean ...?)`` for the closest of ``names`` to each of ``words``, or ``""``:
    in any case and any order of the words' ``_``-separated parts (``PROGRESS``,
    ``lanczos_ggn``; probe 134)."""
    by_key = {"_".join(sorted(name.lower().split("_"))): name for name in names}
    guesses = [by_key[key] for word in words
               for key in difflib.get_close_matches("_".join(sorted(word.lower().split("_"))),
                                                    list(by_key), n=1, cutoff=0.6)]
    return f" (did you mean {', '.join(dict.fromkeys(guesses))}?)" if guesses else ""


def estimator_options() -> dict[str, dict[str, Any]]:
    """The estimators' own options, for ``effective_rank(..., **options)``.

    Returns:
        Option name -> ``{"default", "help", "choices", "methods"}``.
    """
    return {name: {"default": option.default, "help": option.metadata.get("help", ""),
                   "choices": option.metadata.get("choices"), "methods": methods}
            for name, (option, methods) in option_fields().items()}


def _settings(threshold: float, rtol: float | None, max_memory: float, max_seconds: float | None,
              seed: int, per_layer: bool, progress: bool | Progress | None,
              eigenvectors: int = 0, measure_memory: bool = False) -> Settings:
    """Validate the options every method shares (before any work) and bundle them."""
    check_rank_options(threshold, rtol)
    check_number("max_memory", max_memory)
    check_number("max_seconds", max_seconds, allow_none=True)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not (
            0 <= int(seed) < 2**63 - 1):
        # (NumPy's generators, behind the Lanczos intervals, take no negative seed: -1 raised
        # its bare "expected non-negative integer" after every product was spent; probe 85)
        raise ValueError(f"seed must be an integer in [0, 2**63 - 1), got {seed!r}")
    seed = int(seed)  # a NumPy integer works too
    for name, flag in (("per_layer", per_layer), ("measure_memory", measure_memory)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be True or False, got {flag!r}")
    if progress is not None and not isinstance(progress, bool) and not hasattr(progress,
                                                                               "add_task"):
        raise ValueError(f"progress must be None, True, False or a rich.progress.Progress, "
                         f"got {progress!r}")
    check_count("eigenvectors", eigenvectors)
    # Python floats: a NumPy float32 or integer passed the checks and reached the result, whose
    # to_dict() then failed to serialise (probe 105)
    return Settings(threshold=float(threshold), rtol=None if rtol is None else float(rtol),
                    max_memory=max_memory, max_seconds=max_seconds,
                    seed=seed, per_layer=per_layer, eigenvectors=int(eigenvectors),
                    reporter=Reporter(progress))


def checked_request(
    model: nn.Module | None,
    loss_fn: object,
    method: object,
    *,
    mode: str,
    threshold: float,
    rtol: float | None,
    max_memory: float,
    max_seconds: float | None,
    seed: int,
    per_layer: bool,
    progress: bool | Progress | None,
    eigenvectors: int,
    measure_memory: bool,
    options: dict[str, Any],
) -> tuple[Estimator, Settings, Any]:
    """:func:`effective_rank`'s checks of its arguments, none of which needs the batch: the
    estimator, the shared settings, its own options, the mode and what it can serve.

    Args:
        model: the model, or None to check the values alone (a tracker made before its model's
            first training step, where a lazy module has no shapes yet).
        loss_fn, method, mode, threshold, rtol, max_memory, max_seconds, seed, per_layer,
        progress, eigenvectors, measure_memory: as for :func:`effective_rank`.
        options: the estimators' options, as ``**options`` of :func:`effective_rank`.

    Returns:
        ``(estimator, settings, the estimator's typed options)``.

    Raises:
        TypeError, ValueError: the argument at fault, named with its fix.
    """
    estimator = _estimator(method)
    if model is not None:
        check_model(model)
    check_loss_and_mode(loss_fn, mode)
    settings = _settings(threshold, rtol, max_memory, max_seconds, seed, per_layer,
                         progress, eigenvectors, measure_memory)
    known = option_fields()
    unknown = sorted(set(options) - set(known))
    if unknown:
        offered = ", ".join(f"{name} ({', '.join(methods)})"
                            for name, (_, methods) in known.items())
        own = [name for name, parameter in inspect.signature(effective_rank).parameters.items()
               if parameter.kind is inspect.Parameter.KEYWORD_ONLY]
        raise TypeError(f"effective_rank() got unknown option(s) {', '.join(unknown)}"
                        f"{_did_you_mean(unknown, [*own, *known])}; its own keywords are: "
                        f"{', '.join(own)}; the estimators' options are: {offered}")
    method_options = estimator.make_options(options)
    estimator.check_mode(mode, model)
    estimator.check_request(settings, method_options)
    return estimator, settings, method_options


@surfacing_signals
def effective_rank(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Batch | Iterable[Batch],
    method: str = "fisher",
    *,
    threshold: float = 0.99,
    rtol: float | None = None,
    params: Iterable[Tensor | str] | None = None,
    per_layer: bool = False,
    eigenvectors: int = 0,
    mode: str = "eval",
    max_memory: float = DEFAULT_MAX_MEMORY,
    max_seconds: float | None = None,
    seed: int = 0,
    progress: bool | Progress | None = None,
    measure_memory: bool = False,
    process_group: Any = None,
    **options: Any,
) -> RankResult:
    """Rank and spectrum of the Hessian of ``loss_fn(model(*inputs), targets)`` or an approximation.

    Args:
        model: any ``nn.Module`` (a ``torch.compile``, ``DistributedDataParallel`` or
            ``nn.DataParallel`` wrapper is analysed through the module it wraps). Its outputs
            have the batch dimension first.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``. The curvature is that of this loss as
            it is: for a mean reduction, of the mean. ``fisher`` and ``ggn`` derive their
            per-sample factors from the loss itself and verify them (class weights and
            ``ignore_index`` included); see :class:`hessrank.RankResult` for the conventions.
        batch: ``(inputs, targets)``; ``inputs`` a tensor, a tuple of tensors (``model(*inputs)``)
            or a dict of tensors (``model(**inputs)``), every tensor with the batch dimension
            first. Or a whole data set: a ``DataLoader`` or any re-iterable of such batches
            (a list), for the curvature of the loss of all its samples at once, one batch in
            memory at a time for ``exact`` and the Lanczos methods (``fisher``/``ggn`` form
            one Gram matrix over every sample: use ``fisher_lanczos``/``ggn_lanczos`` for
            large data sets). Batches are moved to the model's device; how the batches' losses
            add up (sum or mean) is read off the loss and verified, and every pass must see the
            same data (the random generators are reset for each; README, "A whole data set").
        method: one of :data:`hessrank.METHODS`: ``"fisher"`` (empirical Fisher, ``n x n`` Gram
            matrix; the default, the paper's choice), ``"ggn"`` (Gauss-Newton, ``nC' x nC'`` Gram
            matrix), ``"exact"`` (dense Hessian) or ``"lanczos"`` (stochastic Lanczos quadrature
            on Hessian-vector products).
        threshold: srank threshold in (0, 1]: smallest ``k`` whose top-``k`` ``|eigenvalue|``
            mass reaches this share of the total (0.99, Kumar et al.).
        rtol: numerical-rank tolerance in [0, 1), relative to the largest ``|eigenvalue|``;
            default: the ``numpy.linalg.matrix_rank`` rule, matrix size times the epsilon of the
            model's dtype (of float32 at least for the Lanczos methods, whose basis is float32),
            at most 0.1 (:data:`hessrank.ranks.MAX_DEFAULT_RTOL`; a note says when).
        params: a list of parameters (or their names) to analyse; default all trainable ones.
            Frozen parameters among those asked for (every parameter, by default) are left
            out and listed in ``result.excluded``; one not asked for is not listed.
        per_layer: also analyse each parameterised module's diagonal block (``result.layers``).
        eigenvectors: also return the unit eigenvectors of the ``k`` largest ``|eigenvalues|``
            (``result.eigenvectors``, ``[k, P]``; ``result.unflatten`` maps one back to the
            parameters): ``exact`` from the dense solve, ``fisher``/``ggn`` as ``F u / sqrt(
            lambda)`` from the Gram eigenvectors ``u`` (one batched backward pass); there a zero
            eigenvalue (zero to rounding) has no eigenvector in the factors' range and gets a
            zero row, and ``k`` beyond the Gram's size gives that many rows (a note says so).
            With ``per_layer``, ``exact`` gives each block's too; ``fisher``/``ggn`` do not.
        mode: ``"eval"`` (default): the model as evaluated, dropout off and BatchNorm on its
            running statistics, whatever its flags; ``"train"``: the flags as set, i.e. BatchNorm
            in training mode on batch statistics, and one in eval mode (frozen) on its running
            statistics, named in a note (``exact``/``lanczos`` only; dropout must be off).
        max_memory: budget in bytes (> 0) for every method, checked against a prediction before
            the work; over it, :class:`hessrank.BudgetError` (a ``ValueError``). The
            prediction counts the call's tensors, not what a process's first call loads once
            (code, lazily imported modules: tens of MiB).
        max_seconds: time budget (> 0), checked against a prediction before the work:
            ``exact`` and the Lanczos methods predict their time (a few timed matrix-vector
            products), the Gram methods (``fisher``, ``ggn``) that of their eigen-solves (a
            timed trial solve), not of their passes over the model, and say so in a note.
        seed: seed of the private generator for random probes and checks, in ``[0, 2**63 - 1)``
            (the global RNG is not used).
        progress: ``True`` for a progress bar with ETA, ``False`` for none, or a
            ``rich.progress.Progress`` to add its tasks to; ``None`` (default): a bar once a
            task (the Hessian's columns, the Lanczos products) has run 5 s, where stderr is an
            interactive terminal (not in a notebook, a log file or a pipe; data-parallel: on
            rank 0 only).
        measure_memory: also measure the call's peak memory (``result.peak_memory``, bytes
            above its start). Off by default because measuring resets process-wide state a
            training loop may read: on CUDA the device's peak statistics
            (``torch.cuda.reset_peak_memory_stats``), on Linux CPUs the process's resident-set
            high-water mark (``VmHWM``), after returning the C allocator's free memory to the
            system (``malloc_trim``, whose page faults cost about 10 % of a fast ``fisher``
            call). On CPU the heap earlier work left moves the figure, either way (by tens of MiB
            after a few calls), and a process's first call counts what it loads once (code,
            lazily imported modules: 10-32 MiB, 124-126 with ``torch.func``). The prediction
            every method checks against ``max_memory`` is made either way.
        process_group: a ``torch.distributed`` process group (``dist.group.WORLD``) for
            data-parallel analysis: every process of the group calls with the same model and
            options and its own shard of the batch (shards concatenated in rank order form the
            global batch; sizes may differ), and every process gets the result of the global
            batch, as one process would compute it on the concatenated batch (``num_samples`` is
            the global ``n``, a mean loss is the mean over the global batch). ``exact`` and the
            Lanczos methods all-reduce their products; ``fisher``/``ggn`` all-gather per-layer
            factors (README, "Data-parallel", gives the communication volume). A
            ``DistributedDataParallel`` model is analysed through its ``.module``. An error in
            one process is raised in every one (the others raise
            :class:`hessrank.distributed.GroupFailure` naming it). None (the default): this
            process's batch alone.
        **options: the estimators' own options (:func:`hessrank.estimator_options` lists them):
            ``backend`` (``fisher``/``ggn``): ``"auto"`` (verified per-module rules where a
            module has one, README "Gram matrices" lists them, ``torch.func`` for every other
            parameter), ``"func"`` (``torch.func``
            throughout) or ``"backpack"`` (BackPACK on a deep copy, supported layers only);
            ``lanczos_steps`` (``lanczos`` and the other Lanczos pairs): matrix-vector products,
            default ``min(640, ceil(P/3))``; ``mc_samples`` (``ggn``, softmax cross-entropy):
            ``M`` labels drawn per position give the Monte-Carlo GGN's ``M n x M n`` Gram,
            whatever the classes (default unset: the exact GGN). An option that belongs to
            another method is ignored, so one set of keywords serves a loop over
            :data:`hessrank.METHODS`; a name that no method takes is an error.

    Methods beyond the four of :data:`hessrank.METHODS` (:data:`hessrank.ESTIMATORS`):
    ``ggn_lanczos`` and ``fisher_lanczos``, Lanczos quadrature on GGN / EF-vector products, for
    when ``n C'`` or ``n`` is too large for a Gram matrix.

    Returns:
        A :class:`hessrank.RankResult`. The model, its gradients, buffers, modes, hooks,
        ``requires_grad`` flags and the global RNG state are exactly as before the call, also
        when it fails or is interrupted. The peak-memory statistics are not reset unless
        ``measure_memory`` (the call's own allocations count in them, as any computation's).

    Raises:
        TypeError, ValueError: bad input, named with its fix, before any expensive work.
        Exception: what the model or the loss itself raises on the batch (torch's
            ``RuntimeError`` or ``IndexError`` for targets of the wrong shape, dtype or class
            range), as the same type, its message extended with the batch's shapes and dtypes
            and the fix; also before any expensive work.
        hessrank.BudgetError: the predicted memory or time exceeds the budget.
        hessrank.distributed.GroupFailure: with ``process_group``, another process failed.
    """
    parallel = None if process_group is None else DataParallel(process_group, _device_of(model))
    with failures_shared(parallel):  # an error in one process reaches the others
        with agreement(parallel):  # a check failing in one process fails in all
            estimator, settings, method_options = checked_request(
                model, loss_fn, method, mode=mode, threshold=threshold, rtol=rtol,
                max_memory=max_memory, max_seconds=max_seconds, seed=seed, per_layer=per_layer,
                progress=progress, eigenvectors=eigenvectors, measure_memory=measure_memory,
                options=options)
            if parallel is not None and options.get("backend") == "backpack":
                raise ValueError("backend='backpack' runs in one process: with process_group, use "
                                 "backend='auto' or 'func'")
            streaming = is_batch_stream(batch)
            if parallel is not None and streaming:
                raise ValueError("a DataLoader (or list of batches) with process_group is not "
                                 "supported: give each process its shard as one batch, or analyse "
                                 "the data set in one process")
            if parallel is not None and eigenvectors:
                raise ValueError("eigenvectors= is not available with process_group yet: compute "
                                 "them in one process on the gathered batch")
        start = time.perf_counter()
        with (_said_of_the_reading(_stream_reading(batch) if streaming else ""),
              one_call_at_a_time(),
              ExitsHeldBack() as exits,
              preserved_state(model) as check_parameters,
              differentiable(model) as guard_notes,
              loss_evaluations(loss_fn),
              workers_as_found(batch) as batch,
              # the caller's generators (global, the loader's) as they were, restored with
              # signals held back: an inner restore a signal skipped is redone (probe 223)
              same_draw(batch) if streaming else nullcontext(),
              exits.from_here()):
            with agreement(parallel):
                problem = build_problem(
                    model, loss_fn,
                    first_batch(batch, _device_of(model)) if streaming else batch,  # type: ignore[arg-type]
                    params, mode)
            if streaming:
                problem = streamed_problem(problem, batch)
            ddp, ddp_ignored = ddp_among_wrappers(model)
            if parallel is not None:
                problem = shard_problem(problem, parallel, {
                    "method": method, "mode": mode, "threshold": settings.threshold,
                    "rtol": settings.rtol,
                    "max_memory": max_memory, "max_seconds": max_seconds, "seed": seed,
                    "per_layer": per_layer, "options": sorted(options.items())},
                    ddp_buffers=ddp is not None and ddp.broadcast_buffers,
                    ddp_ignored=ddp_ignored)
            elif ddp is not None and is_ddp_without_group(ddp):
                problem.notes.append(
                    "the model is wrapped in DistributedDataParallel but process_group=None: this "
                    "is the curvature of this process's batch alone; pass "
                    "process_group=torch.distributed.group.WORLD for the global batch")
            with evaluation_mode(problem.model, mode):
                concatenate = not estimator.streams  # a data set runs on its batches joined
                if isinstance(problem, StreamedProblem):
                    _refuse_before_the_pass(estimator, problem, settings, method_options)
                    problem.survey(_unannounced_pass_watch(estimator, problem, settings, start))
                outputs = functools.cache(lambda: probe_outputs(
                    per_batch(problem)[0], check_loss=not isinstance(problem, StreamedProblem)))
                if not isinstance(problem, StreamedProblem):  # (the survey checks a data set)
                    probe_for_target_dtype(problem, outputs)
                whole_cost = _agreed_cost(parallel, estimator.predict(
                    problem, outputs, settings, method_options))
                cost, layer_costs = whole_cost, {}
                if per_layer and estimator.layer_strategy == "restricted":
                    # refused on the whole model's prediction before the modules' are made
                    # (each times a product: 10 s for a refusal on ResNet-18; probe 81)
                    estimator.check_budget(_with_data_copies(estimator, problem, cost), problem,
                                           settings, first=True)
                    layer_costs = _layer_costs(estimator, problem, outputs, settings,
                                               method_options, parallel)
                    cost = _with_layers(cost, list(layer_costs.values()))
                cost = _agreed_cost(parallel, _after(_seconds_since(start),
                                                     _with_data_copies(estimator, problem, cost)))
                check_parameters()  # the forward passes so far left the parameters alone
                estimator.check_budget(cost, problem, settings, first=True)
                if not isinstance(problem, StreamedProblem):  # (its survey checks its batches)
                    refuse_the_nested_fast_path(problem, outputs)
                if max_seconds is not None and cost.seconds is None:
                    problem.notes.append(
                        f"max_seconds is not enforced by {estimator.name}: it predicts its "
                        "memory, not its time")
                elif max_seconds is not None and cost.unpredicted is not None:
                    problem.notes.append(
                        f"max_seconds was checked against {estimator.name}'s predicted time, "
                        f"{cost.seconds:.3g} s, which leaves out its {cost.unpredicted}")
                outputs.cache_clear()
                # each block's run checks what its first pass shows against its own prediction
                # (against the whole model's, a block's run was refused after the whole
                # model's had passed; probe 106)
                run_settings = _predicted(settings, estimator, problem, whole_cost)
                block_settings = {
                    group: _predicted(dataclasses.replace(settings, per_layer=False), estimator,
                                      problem, block_cost)
                    for group, block_cost in layer_costs.items()}
                # (the batch's and the state's copies, made before, count as the prediction
                # counts them; probes 148, 205)
                with PeakMemory(problem.device, enabled=measure_memory,
                                held=problem.copied_bytes(made=True)) as memory:
                    if isinstance(problem, StreamedProblem) and concatenate:
                        problem = problem.concatenated(estimator.name)
                    block_seconds: dict[str, float] = {}  # the blocks run on their own
                    try:
                        spectrum = estimator.run(problem, run_settings, method_options)
                        error = subnormal_scale_error(_top(spectrum), problem.dtype,
                                                      estimator.source)
                        if error is not None:
                            raise error
                        if _top(spectrum) == 0 and problem.dtype != torch.float64 and \
                                not isinstance(problem, StreamedProblem):
                            _note_vanished(problem, parallel, estimator.source)
                        if block_settings:
                            spectrum.layers = {}
                            for group, names in problem.layers().items():
                                started = time.perf_counter()
                                spectrum.layers[group] = estimator.run(
                                    problem.restricted(names, _top(spectrum)),
                                    block_settings[group], method_options)
                                block_seconds[group] = _seconds_since(started)
                    except NotFiniteError as error:
                        # (diagnosed on this process's shard alone: a diagnosis's collectives
                        # in one process had aborted the group in gloo; probe 161)
                        # (a data set's first batch's entries do not tell its others')
                        cause = (None if isinstance(problem, StreamedProblem)
                                 else nonfinite_entry(local_of(problem).labelled_batch()))
                        if cause is None and error.dtype == problem.dtype:
                            raise
                        # (the model's dtype overflowed, not the float64 matrix it filled: a
                        # float32 model's had been told of float64's range; probe 170)
                        raise not_finite_error(problem.dtype, cause) from None
                    except RuntimeError as error:
                        if _REENTRANT_CHECKPOINT in str(error):
                            raise reentrant_checkpoint_error() from error
                        if isinstance(error, CheckpointError):
                            raise ValueError(
                                "a block under torch.utils.checkpoint ran differently when its "
                                "forward was recomputed in hessrank's backward passes ("
                                f"{str(error).splitlines()[0].strip()}): hessrank's forward "
                                "replaces operations whose second derivative torch gets wrong "
                                "(weight_norm's fused kernel) by the same function in a form it "
                                "differentiates twice, which a checkpoint's recomputation does "
                                "not see; analyse the model without gradient checkpointing (the "
                                "same function), or use method='fisher' or 'ggn'") from error
                        diagnosed = local_of(problem)
                        if not isinstance(problem, StreamedProblem):  # (the survey checks those)
                            refuse_target_dtype_of(diagnosed, error)
                        if _DTYPE_MISMATCH.search(str(error)):  # dtypes that do not meet: the
                            # cause (a Gram rule's product of float32 gradients and the bfloat16
                            # inputs that autocast inside forward gives a module; probe 138)
                            cause = lower_precision_cause(diagnosed, 0.0, with_loss=True)
                            if cause:
                                raise ValueError(f"{str(error).splitlines()[0]}: "
                                                 f"{cause}") from error
                        raise
        seconds = time.perf_counter() - start
        problem.notes.extend(guard_notes)  # complete now: a rescaling joins at its forward
        tied = problem.tied_layers_note() if settings.per_layer else None
        if tied is not None:
            problem.notes.append(tied)
        if parallel is not None:
            problem.notes[:] = [*parallel.shared_notes(problem.notes), parallel.describe()]
        eps = float(torch.finfo(problem.dtype).eps)
        named = dict(zip(problem.names, problem.params))
        groups = problem.layers()
        layers = {
            group: _result(spectrum.layers[group], problem,
                           sum(named[name].numel() for name in groups[group]), estimator,
                           settings.threshold, settings.rtol, eps,
                           seconds=block_seconds.get(group, 0.0), memory=None,
                           names=groups[group], whole_scale=_top(spectrum))
            for group in groups if group in spectrum.layers
        }
        return _result(spectrum, problem, problem.num_params, estimator, settings.threshold,
                       settings.rtol, eps, seconds, memory.peak, layers)


#: torch's message where a reentrant checkpoint meets ``torch.autograd.grad``.
_REENTRANT_CHECKPOINT = "use_reentrant=True, torch.utils.checkpoint is incompatible with .grad()"


#: torch's refusals of operands of two dtypes, naming a floating one in its C++ spelling
#: ("expected m1 and m2 to have the same dtype, but got: c10::BFloat16 != float").
_DTYPE_MISMATCH = re.compile(r"(?i)(dtype|scalar type).*\b(bfloat16|half|float|double)\b")


class TiedEigenvaluesError(ValueError):
    """:func:`gradient_overlap`'s ``k`` splits a cluster of equal ``|eigenvalues|``: the top-``k``
    eigenvectors are not determined; nothing was returned.

    Attributes:
        k: the ``k`` refused (the one passed, or the srank where ``k=None``).
        gaps: ``(below, above)``, the nearest ``k`` on either side at a gap (``0`` and ``P`` at
            the ends): pass one of them, as a harness that takes the srank may.
    """

    def __init__(self, message: str, k: int, gaps: tuple[int, int]) -> None:
        super().__init__(message)
        self.k = k
        self.gaps = gaps


def _check_gap(magnitudes: np.ndarray, k: int, rounding: float, chosen: str,
               share: Callable[[int], float], dtype: torch.dtype) -> None:
    """Raise unless the overlap with the top-``k`` eigenvectors is determined: the ``k``-th and
    ``(k+1)``-th largest ``|eigenvalues|`` (``magnitudes``, sorted decreasingly) must differ by
    more than the dense Hessian's ``rounding`` (the norm of the antisymmetric part its products
    left, which bounds how far rounding moved its eigenvalues, to within the symmetric part's
    like share), and by more than float64's own ``P eps`` of the largest; or the gradient must
    have no share (``share(j)``: its overlap with the top ``j``), beyond ``P`` times float64's
    epsilon or the square of ``dtype``'s (the model's: a float32 gradient's rounding leaves
    shares of 1e-15 in directions it is orthogonal to; probe 237), in the tied eigenspace.
    Within a tie (a zero or symmetric initialisation repeats eigenvalues; null directions all
    share 0) any basis of the tied eigenspace is as good as another, and the overlap takes any
    value between its extremes: those at the tie's ends, which agree where the gradient is
    orthogonal to it (three identical hidden units' 2-fold eigenvalue had been refused for an
    overlap every basis gives; probe 234).

    Raises:
        TiedEigenvaluesError: ``k`` splits a cluster of equal ``|eigenvalues|`` in which the
            gradient has a share; names the nearest ``k`` at a gap on either side.
    """
    size = len(magnitudes)
    if not 0 < k < size:
        return
    epsilon = size * float(np.finfo(np.float64).eps)
    tolerance = max(rounding, epsilon * float(magnitudes[0]))
    gaps = magnitudes[:-1] - magnitudes[1:]  # gaps[i]: between the (i+1)-th and (i+2)-th
    if gaps[k - 1] > tolerance:
        return
    at_gaps = np.flatnonzero(gaps > tolerance) + 1  # the k with a gap after the k-th
    below, above = at_gaps[at_gaps < k], at_gaps[at_gaps > k]
    gaps = (int(below[-1]) if below.size else 0, int(above[0]) if above.size else size)
    if share(gaps[1]) - share(gaps[0]) <= max(epsilon, size * float(torch.finfo(dtype).eps) ** 2):
        return
    raise TiedEigenvaluesError(
        f"{chosen} = {k} splits a cluster of equal |eigenvalues| (numbers {k} and {k + 1} by "
        f"magnitude are {magnitudes[k - 1]:.6g} and {magnitudes[k]:.6g}, equal to the Hessian's "
        "rounding): "
        "the top-k eigenvectors are not determined, and the overlap would depend on the "
        f"solver's choice of basis; pass k at a gap, {gaps[0]} or {gaps[1]} (the error's "
        "gaps)", k, gaps)


def _check_one_batch(batch: object, caller: str) -> None:
    """Raise unless ``batch`` is one batch: ``caller`` takes no data set.

    Raises:
        TypeError: a DataLoader or a list of batches, with the fix.
    """
    if is_batch_stream(batch):
        raise TypeError(
            f"{caller} takes one batch (inputs, targets), not a DataLoader or a list of "
            "batches: concatenate the batches (torch.cat of their inputs and of their targets), "
            "or use effective_rank(..., method='exact'), which takes a data set")


def _device_of(model: nn.Module) -> torch.device:
    """Where the model's parameters live (CPU for a model without any)."""
    first = next(iter(model.parameters()), None) if isinstance(model, nn.Module) else None
    return torch.device("cpu") if first is None else first.device


def _refuse_before_the_pass(estimator: Estimator, problem: StreamedProblem,
                            settings: Settings, options: Any) -> None:
    """Before a data set's first pass (a whole epoch of reading): refuse a budget that its
    first batch alone exceeds, since the whole data costs at least as much (an exact Hessian of
    609 GiB was refused after 6.3 s and 3,100 samples read, where one batch is refused in 2 ms),
    and one that the whole data exceeds where the loader says how many samples it holds and the
    method's cost grows with them (a ``fisher`` Gram of 7.7 GiB was refused after a pass over
    20,000 samples; probe 71): its first batch's prediction at that many samples, with a copy
    of each for a method that joins the batches; and a ``max_seconds`` that the first pass
    alone exceeds, at least a forward pass and a loss of each announced batch, timed on the
    first (a ``lanczos`` call over 400,000 samples with ``max_seconds=0.5`` was refused after
    11 s, and one over a loader announcing 10^9 samples was still reading them after 100 s;
    probe 133: the methods that stream their batches predict their time from a pass). Anything
    else the batch would raise is left to the pass, which names the batch.

    Raises:
        BudgetError: the first batch's, or the announced data set's, predicted cost exceeds the
            budget.
    """
    first = problem.first()
    outputs = functools.cache(lambda: probe_outputs(first))
    announced = announced_samples(problem.data)
    try:
        # (the data set's copies as a pass over its first batch alone holds them)
        cost = _with_data_copies(estimator, problem, estimator.predict(first, outputs, settings,
                                                                       options))
        estimator.check_budget(cost, first, settings, caller=f"method={estimator.name!r} on the "
                               "data set's first batch alone")
        if (settings.max_seconds is not None and announced is not None
                and announced > first.num_samples):
            with torch.no_grad():  # (the least of two: a first call's set-up is no batch's)
                one = min(seconds_of(first.loss, first.device) for _ in range(2))
            one += batch_read_seconds(problem.data)
            passes = Cost(0, one * announced / first.num_samples)
            estimator.check_budget(passes, first, settings, caller=(
                f"the first pass of method={estimator.name!r} over the data set's "
                f"{announced:,} samples (at least reading each batch, its forward pass and its "
                f"loss: {one:.3g} s for a batch of {first.num_samples:,} samples)"),
                advice="analyse fewer samples")
        if announced is None or announced <= first.num_samples or estimator.streams:
            return
        first_bytes = batch_bytes(first)
        whole = dataclasses.replace(problem, total_samples=announced, batch_bytes=first_bytes,
                                    data_bytes=first_bytes * announced // first.num_samples)
        cost = _with_data_copies(estimator, whole,
                                 estimator.predict(whole, outputs, settings, options))
    except BudgetError:
        raise
    except Exception as error:  # noqa: BLE001 - the pass over the data names the batch and the cause
        raise_if_signalled(error)
        return
    estimator.check_budget(cost, whole, settings, caller=(
        f"method={estimator.name!r} on the data set's {announced:,} samples (as many as its "
        "loader announces)"))


def _unannounced_pass_watch(estimator: Estimator, problem: StreamedProblem, settings: Settings,
                            start: float) -> Callable[[int], None] | None:
    """Where a data set announces no length (an ``IterableDataset``, a generator) and the call
    has a ``max_seconds``: a check after each batch of the first pass that raises once the call
    has run past it (such a pass was refused only at its end, 90 times over a budget, and an
    endless one never ended; probe 215). None otherwise: a length is judged before the pass
    (:func:`_refuse_before_the_pass`)."""
    max_seconds = settings.max_seconds
    if max_seconds is None or announced_samples(problem.data) is not None:
        return None

    def watch(samples: int) -> None:
        spent = time.perf_counter() - start
        if spent > max_seconds:
            raise BudgetError(
                f"the first pass of method={estimator.name!r} over a data set that announces no "
                f"length (an IterableDataset or a generator) has run {spent:.2f} s, over "
                f"max_seconds = {max_seconds:g} s, after {samples:,} samples and not at their "
                "end: analyse fewer samples (a loader over a part of them), give the data set "
                "a length (__len__), or raise max_seconds",
                0, spent, False)

    return watch


def _stream_reading(data: object) -> str:
    """How a collection of batches was read, for an error about its first batch: a tuple or
    list of two pairs may have been meant as one batch whose targets are a pair."""
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return ("; hessrank read the data as a data set of 2 batches, each (inputs, targets), "
                "since the outer pair holds no tensor (if you meant one batch whose targets "
                "are a pair: one batch takes one targets tensor, and a loss that needs more, "
                "such as sample weights, can take them stacked in one tensor or as a closure "
                "over them)")
    return ""


#: How the errors about a data set's first batch that :func:`_said_of_the_reading` extends open:
#: its shape, its inputs not fitting the forward, and its loss failing on its targets.
_FIRST_BATCH_ERRORS = ("batch 0 of the data", "the batch gives ",
                       "loss_fn(outputs, targets) failed")


@contextmanager
def _said_of_the_reading(reading: str) -> Iterator[None]:
    """Errors about the first batch of a data set extended by how the data was read
    (``reading``, :func:`_stream_reading`): one batch whose targets are a pair, read as a data
    set of two, had been told that its batch was a dict, that it left out a forward input, or
    that its loss failed on boolean targets, with no word of the reading (probe 219)."""
    try:
        yield
    except (TypeError, ValueError) as error:
        message = str(error)
        if reading and message.startswith(_FIRST_BATCH_ERRORS):
            raise_extended(error, f"{message.rstrip('. ')}{reading}", reading.lstrip("; "))
        raise


def _layer_costs(estimator: Estimator, problem: CurvatureProblem,
                 outputs: Callable[[], Tensor], settings: Settings, options: Any,
                 parallel: DataParallel | None) -> dict[str, Cost]:
    """Parameterised module -> the estimator's prediction for its diagonal block's run
    (``per_layer`` with the ``"restricted"`` strategy), agreed over the processes."""
    single = dataclasses.replace(settings, per_layer=False)
    return {group: _agreed_cost(parallel, estimator.predict(problem.restricted(names), outputs,
                                                            single, options))
            for group, names in problem.layers().items()}


def _with_layers(cost: Cost, layer_costs: list[Cost]) -> Cost:
    """``cost``, the prediction for the whole model, with its blocks' runs (``layer_costs``):
    they follow the whole model's, so their times add, and the peak is the largest
    (``lanczos`` with ``per_layer=True`` had run 7.7 to 85 times past the ``max_seconds`` its
    whole-model prediction allowed; probe 78)."""
    costs = [cost, *layer_costs]
    times = [each.seconds for each in costs if each.seconds is not None]
    largest = max(costs, key=lambda each: each.memory_bytes)
    return Cost(largest.memory_bytes, sum(times) if len(times) == len(costs) else None,
                largest.refined_bytes)


def _seconds_since(start: float) -> float:
    """Seconds since ``start``, a ``time.perf_counter()`` reading."""
    return time.perf_counter() - start


def _after(seconds: float, cost: Cost) -> Cost:
    """``cost`` for a call that has spent ``seconds`` already (set-up, the prediction's own
    passes and timed products): ``max_seconds`` is the whole call's."""
    return cost if cost.seconds is None else dataclasses.replace(
        cost, seconds=seconds + cost.seconds)


def _predicted(settings: Settings, estimator: Estimator, problem: CurvatureProblem,
               cost: Cost) -> Settings:
    """``settings`` for a run predicted at ``cost``: what its first pass shows is checked
    against the prediction (with the data set's joined copy, where the method joins its
    batches) without the part that pass measures again (:class:`Cost`)."""
    cost = _with_data_copies(estimator, problem, cost)
    return dataclasses.replace(settings, predicted_memory=cost.memory_bytes - cost.refined_bytes)


def _with_data_copies(estimator: Estimator, problem: CurvatureProblem, cost: Cost) -> Cost:
    """``cost`` with the call's copies of the data and of the model's state: the batch's
    tensors it copied (a batch of token embeddings twice a linear layer's working memory had
    been left out: peaks of 9 times the prediction; probe 147) and the state's copies (probe
    205); for a data set, what a pass over it holds beside its first batch's copy
    (:meth:`StreamedProblem.pass_bytes`), and a copy of the data set where the method joins
    its batches into one."""
    copies = problem.copied_bytes()
    if isinstance(problem, StreamedProblem):
        copies += problem.pass_bytes() + (0 if estimator.streams else problem.data_bytes)
    return dataclasses.replace(cost, memory_bytes=cost.memory_bytes + copies)


def _agreed_cost(parallel: DataParallel | None, cost: Cost) -> Cost:
    """The largest prediction over the processes, so that every process decides the same."""
    if parallel is None:
        return cost
    costs = parallel.gather_objects((cost.memory_bytes, cost.seconds, cost.refined_bytes))
    times = [seconds for _, seconds, _ in costs if seconds is not None]
    return dataclasses.replace(cost, memory_bytes=max(memory for memory, _, _ in costs),
                               seconds=max(times) if times else None,
                               refined_bytes=max(refined for _, _, refined in costs))


def _top(spectrum: Spectrum) -> float:
    """The largest ``|eigenvalue|`` of a spectrum (a quadrature's: of its nodes)."""
    return float(np.abs(spectrum.eigenvalues).max(initial=0.0))


def _note_vanished(problem: CurvatureProblem, parallel: DataParallel | None,
                   source: str) -> None:
    """Add :func:`~hessrank.curvature.loss.vanished_curvature_note`'s note of a zero curvature
    to ``problem.notes``, read on this process's shard (one forward without a graph), the
    first process's that has one in every process (a data-parallel call had returned srank 0
    without it; probe 164)."""
    local = local_of(problem)
    with torch.no_grad():
        reached = local.forward()
    note = (vanished_curvature_note(local.loss_fn, reached, local.targets, source)
            if isinstance(reached, Tensor) else None)
    if parallel is not None:
        note = next((found for found in parallel.gather_objects(note) if found), None)
    if note is not None:
        problem.notes.append(note)


def _result(
    spectrum: Spectrum,
    problem: CurvatureProblem,
    num_params: int,
    estimator: Estimator,
    threshold: float,
    rtol: float | None,
    eps: float,
    seconds: float,
    memory: int | None,
    layers: dict[str, RankResult] | None = None,
    names: Sequence[str] | None = None,
    whole_scale: float = 0.0,
) -> RankResult:
    """Ranks of a spectrum, packaged with everything the call knows; ``names``: the parameters
    the spectrum is of (default: all the problem's; a layer's block: the layer's).

    A layer's block (``whole_scale``: the whole curvature's largest ``|eigenvalue|``) is
    computed by the whole model's backward passes: a block the loss cancels (a module whose
    output every logit shares, under cross-entropy) is their rounding and nothing else, which
    had been given ranks of 5 (probe 132). Its eigenvalues within the rounding its own
    Hessian-vector products measured (:attr:`Spectrum.rounding`) count as zero in its ranks.
    No floor from the whole's scale: a block far smaller than the whole (the first layer of
    a deep sigmoid network, 4e-8 of it and below) is computed on its own scale, and such a
    floor had zeroed its real eigenvalues (probe 135); where a block's largest eigenvalue is
    below the model's epsilon of the whole's, a note says what it may be and how to tell."""
    size = spectrum.max_rank if spectrum.weights is not None or estimator.solver == "dense" \
        else len(spectrum.eigenvalues)
    tolerance = default_rtol(size, spectrum.eps or eps) if rtol is None else rtol
    notes = [*problem.notes, *spectrum.notes]
    counted = spectrum.eigenvalues
    floor = spectrum.rounding if whole_scale and spectrum.rounding is not None else 0.0
    rounding = np.abs(counted) <= floor
    if np.any(rounding & (counted != 0)):
        counted = np.where(rounding, 0.0, counted)
        notes.append(
            f"{int(np.count_nonzero(rounding))} of this block's eigenvalues (up to "
            f"{float(np.abs(spectrum.eigenvalues[rounding]).max()):.3g}) are within the "
            f"rounding its Hessian-vector products measured, {floor:.3g}, and count as zero "
            "in its ranks")
    top = float(np.abs(counted).max(initial=0.0))
    if 0 < top < eps * whole_scale:
        notes.append(
            f"this block's largest eigenvalue is {top / whole_scale:.2g} of the whole "
            f"curvature's, below the model's epsilon ({eps:.2g}): its eigenvalues may be the "
            "rounding of terms the loss cancels (a module whose output every logit shares, "
            "under cross-entropy) or real curvature computed on its own scale (a layer far "
            "from the output); the same call on a float64 copy of the model tells them apart")
    finer_still = ("A loss scaled nearer to 1 measures it" if problem.dtype == torch.float64
                   else "The same call on a float64 copy of the model measures it")
    subnormal = subnormal_scale_error(_top(spectrum), problem.dtype, estimator.source,
                                      remedy=finer_still) if whole_scale else None
    if subnormal is not None:  # (a block of a whole in range: a ggn block of 1.5e-43 had had
        # srank 19 for 14 with no word; probe 162)
        notes.append(f"this block: {subnormal}")
    info = torch.finfo(problem.dtype)
    if whole_scale and _top(spectrum) == 0 and whole_scale < info.smallest_normal / info.eps:
        # (a block of 1.6e-44 beside a whole of 6e-38 had come out zero, every rank 0)
        notes.append(
            f"this block is zero, and the whole curvature's largest eigenvalue, "
            f"{whole_scale:.3g}, is below {info.smallest_normal / info.eps:.3g}, "
            f"{dtype_name(problem.dtype)}'s smallest normal number over its epsilon: a block "
            f"smaller than epsilon of the whole underflows to zero there; {finer_still[0].lower()}"
            f"{finer_still[1:]} (or tells it zero)")
    ranks = spectral_ranks(counted, threshold, tolerance, spectrum.weights, spectrum.max_rank)
    resolution = spectrum.eps or eps
    copy = "" if problem.dtype == torch.float64 else " on a float64 copy of the model"
    # (none finer than a float64 model's dense or Gram solve)
    finer = (f", or use a dense or Gram method (exact, ggn, fisher){copy}: the Lanczos "
             "methods' float32 basis resolves no further" if spectrum.ritz_values is not None
             else ", or analyse a float64 copy of the model" if copy else "")
    # Products noisier than the arithmetic's epsilon, as the run's slack counts them, resolve no
    # further than their noise (a float32 model rounding through half precision in a custom
    # Function, at 64 to 1,600 epsilons): what is counted below it is the noise's as much as
    # the matrix's.
    noisy = noise_eps(spectrum.noise) > resolution
    if noisy:
        resolution = spectrum.noise
        limit, least = f"the products' measured noise ({resolution:.3g} of their size)", "it"
        blur = "noise"
        finer = ("; the model's arithmetic makes the noise (a lower precision inside a custom "
                 "autograd.Function, or very long float32 sums: a float64 copy of the model has "
                 "less of the latter)")
    else:
        limit, least = f"the computation's epsilon ({resolution:.3g})", "epsilon"
        blur = "rounding"
    if (rtol is not None or noisy) and tolerance < resolution:
        # (a fisher_lanczos at rtol = 1e-12 in float32 gave 15 in [15, 15], "the other 198
        # exactly zero", for a numerical rank of 16: its 16th eigenvalue, 1e-10 of the top, was
        # a sample whose gradient is within the batch's rounding, left out; probe 159)
        notes.append(
            f"numerical rank at rtol = {tolerance:.3g}, below {limit}: eigenvalues under that "
            f"fraction of the largest are within its {blur}, and what it counts (with its "
            f"interval) below that is the {blur}'s as much as the matrix's; pass rtol >= "
            f"{least}{finer}")
    # (a quadrature's count is fractional, its srank whole: 17 against 16.6 had been noted as
    # 0.39 eigenvalues under epsilon; probe 164)
    rounding_counted = ranks["srank"] - math.ceil(
        numerical_rank(counted, resolution, spectrum.weights) - 1e-9)
    if rounding_counted > 0:  # (threshold=1.0 gave a float32 exact srank 43 for 32; probe 163)
        notes.append(
            f"srank at threshold {threshold:g} counts {rounding_counted:g} eigenvalue(s) under "
            f"{limit} of the largest, within its {blur}: the {blur}'s as much as the "
            f"matrix's; a threshold further from 1 (the default 0.99) leaves them out{finer}")
    shown = spectrum.eigenvalues
    if rtol is None and size * (spectrum.eps or eps) > MAX_DEFAULT_RTOL:
        notes.append(f"numerical rank at rtol = {MAX_DEFAULT_RTOL:g}: the default rule, matrix "
                     f"size x epsilon = {size * (spectrum.eps or eps):.3g}, is capped there (it "
                     "reaches 1 at 1 / epsilon); pass rtol= for another tolerance")
    if spectrum.ritz_values is not None:
        top_node = float(np.abs(spectrum.eigenvalues).max(initial=0.0))
        top_ritz = float(np.abs(spectrum.ritz_values).max(initial=0.0))
        if not len(spectrum.ritz_values):  # nothing converged: show the quadrature's nodes
            notes.append("no Ritz value converged: the eigenvalues shown (and the top one) are "
                         "the quadrature's nodes, unconverged Ritz values; raise lanczos_steps")
        elif top_node > top_ritz * (1 + 1e-6):
            # only values below the top converged (an EF's null space at 0, its top at 2.28:
            # the top eigenvalue was reported as 2.9e-10; probe 74): the nodes, as above
            notes.append(f"the largest Ritz value ({top_node:.4g}) has not converged, only "
                         f"smaller ones (up to {top_ritz:.4g}): the eigenvalues shown (and the "
                         "top one) are the quadrature's nodes, unconverged Ritz values; raise "
                         "lanczos_steps")
        else:
            shown = spectrum.ritz_values
    interval: tuple[float, float] | None = None
    if spectrum.rank_interval is not None:  # a zero matrix's interval is (0, 0), not in [1, P]
        low, high = (float(end) for end in spectrum.rank_interval)
        if np.abs(spectrum.eigenvalues).max(initial=0.0) > 0:
            low, high = (within_rank_bounds(end, spectrum.max_rank) for end in (low, high))
        interval = (low, high)
    return RankResult(
        rank=int(round(ranks["srank"])),
        eigenvalues=shown,
        ranks=ranks,
        method=estimator.name,
        backend=spectrum.backend,
        num_params=num_params,
        num_samples=problem.num_samples,
        seconds=seconds,
        threshold=threshold,
        rtol=tolerance,
        trace=spectrum.trace,
        max_rank=spectrum.max_rank,
        peak_memory=memory,
        rank_interval=interval,
        trace_interval=spectrum.trace_interval,
        numerical_interval=spectrum.numerical_interval,
        num_hvps=spectrum.num_hvps,
        excluded=problem.excluded,
        layers=layers or {},
        paths=dict(spectrum.paths),
        eigenvectors=None if spectrum.eigenvectors is None else
        spectrum.eigenvectors.detach().cpu().numpy(),
        parameters=tuple((name, tuple(p.shape)) for name, p in zip(problem.names, problem.params)
                         if names is None or name in names),
        notes=tuple(notes),
        density=(spectrum.eigenvalues, spectrum.weights) if spectrum.weights is not None else None,
    )


@surfacing_signals
def predict_exact_cost(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Batch,
    params: Iterable[Tensor | str] | None = None,
    eigenvectors: int = 0,
) -> tuple[int, float | None]:
    """Predicted peak memory (bytes) and seconds of ``method="exact"``.

    Memory: the Hessian, its solve, and what the model's graph holds through the batched
    products (measured by building the Hessian operator, one pass over the model). Time: one
    timed chunk of Hessian-vector products, extrapolated. Where the Hessian alone rules the
    problem out (over 64 GiB), nothing is built: the memory is the Hessian's and its solve's (as
    the prediction of a call counts them), and the time None.

    Args:
        model: as for :func:`effective_rank`.
        loss_fn: as for :func:`effective_rank`.
        batch: one batch, as for :func:`effective_rank` (not a data set).
        params: as for :func:`effective_rank`.
        eigenvectors: as for :func:`effective_rank`: the solve with eigenvectors holds and takes
            more (a prediction without them was 30 % short of a call with ``eigenvectors=5``,
            which was then refused at that budget; probe 87).

    Returns:
        ``(memory_bytes, seconds)``.

    Raises:
        TypeError, ValueError: bad input, as for :func:`effective_rank`; a data set (one batch
            only).
    """
    estimator = ESTIMATORS["exact"]
    check_call(model, loss_fn, "eval")
    _check_one_batch(batch, "predict_exact_cost")
    check_count("eigenvectors", eigenvectors)
    settings = Settings(max_memory=64 * 2**30, max_seconds=float("inf"),
                        eigenvectors=int(eigenvectors))
    with (one_call_at_a_time(), ExitsHeldBack() as exits, preserved_state(model),
          differentiable(model),
          loss_evaluations(loss_fn), exits.from_here()):
        problem = build_problem(model, loss_fn, batch, params, "eval")
        with evaluation_mode(problem.model, "eval"):
            cost = _with_data_copies(estimator, problem, estimator.predict(
                problem, lambda: probe_outputs(problem), settings, estimator.make_options({})))
    return cost.memory_bytes, cost.seconds


@surfacing_signals
def gradient_overlap(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Batch,
    k: int | None = None,
    *,
    threshold: float = 0.99,
    params: Iterable[Tensor | str] | None = None,
    max_memory: float = DEFAULT_MAX_MEMORY,
) -> float:
    """Share of the gradient's squared norm inside the top-``k`` eigenvectors of the Hessian.

    ``||V_k^T g||^2 / ||g||^2`` with ``V_k`` the eigenvectors of the ``k`` largest
    ``|eigenvalues|`` of the exact Hessian (dense, so within ``max_memory``); ``k`` defaults to
    the Hessian's srank at ``threshold``. 1 means the gradient lies in the curvature directions.

    Args:
        model: as for :func:`effective_rank`.
        loss_fn: as for :func:`effective_rank`.
        batch: one batch, as for :func:`effective_rank` (not a data set).
        k: how many top eigenvectors; default the srank at ``threshold``.
        threshold: srank threshold for the default ``k``.
        params: as for :func:`effective_rank`.
        max_memory: memory budget of the dense Hessian, in bytes.

    Returns:
        The share in [0, 1]; 0.0 for a zero gradient.

    Raises:
        TypeError, ValueError: bad input, as for :func:`effective_rank`; a data set (one batch
            only).
        hessrank.BudgetError: the dense Hessian would exceed ``max_memory``.
        hessrank.TiedEigenvaluesError: ``k`` (or the srank) splits a cluster of equal
            ``|eigenvalues|`` in whose eigenspace the gradient has a share (the overlap then
            depends on the basis); its ``gaps`` are the nearest ``k`` to pass instead.
    """
    estimator = ESTIMATORS["exact"]
    check_call(model, loss_fn, "eval")
    _check_one_batch(batch, "gradient_overlap")
    if k is not None:
        check_count("k", k, "a count of eigenvectors", " (or None for the srank)")
    settings = _settings(threshold, None, max_memory, None, 0, False, False, eigenvectors=1)
    with (one_call_at_a_time(), ExitsHeldBack() as exits, preserved_state(model),
          differentiable(model),
          loss_evaluations(loss_fn), exits.from_here()):
        problem = build_problem(model, loss_fn, batch, params, "eval")
        if k is not None and k > problem.num_params:
            raise ValueError(f"k = {k} exceeds the P = {problem.num_params} eigenvectors of the "
                             "Hessian: choose k <= P, or None for the srank")
        with evaluation_mode(problem.model, "eval"):
            caller = "gradient_overlap (a dense Hessian's eigenvectors)"
            advice = "k does not lower it (the whole dense Hessian is solved)"
            outputs = functools.cache(lambda: probe_outputs(problem))  # (one probing pass)
            probe_for_target_dtype(problem, outputs)
            cost = _with_data_copies(estimator, problem, estimator.predict(
                problem, outputs, settings, None))
            estimator.check_budget(cost, problem, settings, caller=caller, advice=advice,
                                   first=True)
            refuse_the_nested_fast_path(problem, outputs)
            outputs.cache_clear()
            try:
                operator = HessianOperator(problem)
            except RuntimeError as error:
                refuse_target_dtype_of(problem, error)
                raise
            chunk, held = batched_columns(operator, settings.max_memory - cost.memory_bytes)
            # the model's graph and the batched products, once the first pass has shown them
            estimator.check_budget(
                dataclasses.replace(cost, memory_bytes=cost.memory_bytes + held),
                problem, settings, caller=caller, advice=advice)
            hessian = dense_hessian(operator, chunk)
    eigenvalues, eigenvectors = symmetric_eigenpairs(hessian)
    chosen = "k" if k is not None else f"k (the srank at threshold={threshold})"
    if k is None:
        k = int(srank(eigenvalues, threshold))
    assert operator.rounding is not None, "dense_hessian measured it"
    gradient = operator.gradient.to(torch.float64)
    norm = float(gradient @ gradient)

    def share(count: int) -> float:
        """The gradient's share in the top ``count`` eigenvectors' span."""
        if norm == 0.0:
            return 0.0
        projection = eigenvectors[:, :count].T @ gradient
        return float(np.clip(float(projection @ projection) / norm, 0.0, 1.0))

    _check_gap(np.abs(eigenvalues), int(k), operator.rounding, chosen, share, problem.dtype)
    return share(int(k))
