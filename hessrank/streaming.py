"""Curvature of a whole data set: a ``DataLoader`` (or any re-iterable of batches), batch by batch.

**What is computed.** The curvature of the data set's loss: ``loss_fn`` on all samples at once,
``L = loss_fn(concatenated outputs, concatenated targets)``, the same number one call on the
concatenated batch gives. It is never formed that way. Instead, every batch ``b`` adds its own
loss ``L_b`` with a weight ``c_b``:

- **sum** reductions: ``L = sum_b L_b`` (``c_b = 1``);
- **(weighted) means**: ``L = sum_b (Z_b / Z) L_b``, where ``Z_b`` is the batch's normaliser
  (its sample count, its non-ignored targets, its class weights' total) and ``Z = sum_b Z_b``.

Nothing about the loss is assumed; both forms are read off the loss itself and verified on every
batch. The loss is evaluated on the outputs of a reference batch ``r`` (the first) next to batch
``b``'s, and the gradient w.r.t. those outputs must split as ``alpha dL_r/df_r + beta
dL_b/df_b``. For a sum, ``alpha = beta = 1``. For a mean, ``alpha + beta = 1`` and ``Z_b / Z_r =
beta / alpha``. A loss of any other shape is refused, naming the batch: one that couples samples
(a contrastive or batch-normalised loss), or that changes its form between batches. The same
weights make the Hessian, the GGN and the empirical Fisher of ``L`` the ``c_b``-weighted sums of
the batches' own, because each is linear in the loss.

**How.** Methods built on matrix-vector products (``exact``, ``lanczos``, ``ggn_lanczos``,
``fisher_lanczos``) stream. Every product is one pass over the data holding a single batch's
graph, and ``exact`` sums the batches' dense Hessians in one pass. The Gram methods (``fisher``,
``ggn``) need every sample's factors at once (an ``m x m`` Gram over all ``m = K n`` columns), so
they run on the concatenated batch. Their memory, data included, is predicted before the work,
and over budget the error names the streaming alternative.

**Every pass sees the same data.** Each pass starts from the same random state: the global torch,
NumPy and Python generators and the loader's own ``generator``, restored after the pass. A
shuffling loader or a random transform therefore yields one fixed draw of the data set, and the
caller's generators end exactly as they were. Each pass checks its sample count, its batches'
weights and its total loss against the first pass. A loader whose data still changes (a source
outside these generators) is refused instead of being averaged silently.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import numbers
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, default_collate

from hessrank.curvature.loss import (
    ZeroCurvatureError,
    binade,
    direct_parameter_names,
    float64_twin,
)
from hessrank.curvature.operator import ParameterOperator
from hessrank.guard import (
    CODE_TYPES,
    HELD_ITEMS,
    GlobalGenerators,
    deferred_interrupts,
    held_generators,
    raise_if_signalled,
    rescales_lookups,
)
from hessrank.problem import (
    Batch,
    CurvatureProblem,
    LossFn,
    agreement_tolerance,
    call_loss,
    check_loss,
    evaluate_loss,
    output_gradient,
    output_gradient_and_product,
    raise_extended,
    read_batch,
    refuse_mixed_samples,
    refuse_split_batch_statistics,
    refuse_the_nested_fast_path,
    unused_in_every,
)

Data = TypeVar("Data")

#: A batch's :func:`_fingerprint`.
Fingerprint = tuple[float, ...]


def is_batch_stream(batch: object) -> bool:
    """Whether ``batch`` is a collection of batches rather than one ``(inputs, targets)`` pair.

    A tuple or list holding a tensor is one batch (possibly malformed: its own checks name the
    problem); any other iterable that is not a tensor, a mapping or a string is a stream.
    """
    if isinstance(batch, (Tensor, Mapping, str, bytes)):
        return False
    if isinstance(batch, (tuple, list)):
        return not any(isinstance(item, Tensor) for item in batch)
    return isinstance(batch, Iterable)


def _check_pair(index: int, item: object) -> None:
    """Raise unless the data's batch number ``index`` is an ``(inputs, targets)`` pair."""
    if isinstance(item, np.ndarray):
        # (a pair of NumPy arrays holds no tensor, so it reads as a data set of two batches)
        raise TypeError(
            f"batch {index} of the data is a NumPy array: hessrank takes torch tensors; "
            "convert one batch with (torch.from_numpy(inputs), torch.from_numpy(targets)), or "
            "wrap arrays in a torch.utils.data.TensorDataset and DataLoader for a data set")
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise TypeError(
            f"batch {index} of the data is {type(item).__name__}"
            + (f" of length {len(item)}" if isinstance(item, (tuple, list)) else "")
            + ": each batch must be a pair (inputs, targets); for batches that are dicts "
            "holding the labels, map them first, e.g. [(b, b.pop('labels')) for b in loader]"
        )


def _to_device(item: object, device: torch.device) -> object:
    """A batch's tensors moved to ``device`` (new tensors; the loader's are not modified)."""
    if isinstance(item, Tensor):
        return item.to(device)
    if isinstance(item, Mapping):
        return {key: _to_device(value, device) for key, value in item.items()}
    if isinstance(item, (tuple, list)):
        values = [_to_device(value, device) for value in item]
        # a namedtuple (a data set's samples collated) takes its fields as arguments (probe 215)
        rebuilt: Callable[..., object] = type(item)
        return rebuilt(*values) if hasattr(item, "_fields") else rebuilt(values)
    return item


#: Objects whose attributes are not a pass's state: code (a collate function).
_NOT_STATEFUL = (*CODE_TYPES, functools.partial)
#: How deep :func:`_data_set_owners` follows data sets that wrap others.
_WRAPPED_DEPTH = 4
#: How deep below a data set's (sampler's, collate function's) attributes generators are
#: searched (:func:`~hessrank.guard.held_generators`): a generator in a transform of a
#: ``RandomApply`` in a ``Compose``, ``dataset.transform.transforms[i].transforms[j].generator``
#: (three levels had missed it: every pass refused, the generator left advanced; probe 241).
_HELD_DEPTH = 6


def _loaders(data: object) -> list[tuple[str, DataLoader[Any]]]:
    """``(place, loader)``: ``data`` where it is a ``DataLoader``, else the loaders among its
    attributes (a class that wraps one to move its batches to a device: its loader's sampler,
    generator and workers had not been seen, the caller's epoch ended by the passes; probe
    215)."""
    if isinstance(data, DataLoader):
        return [("", data)]
    return [(f"{name}.", value) for name, value in getattr(data, "__dict__", {}).items()
            if isinstance(value, DataLoader)]


def _data_set_owners(data: object) -> list[tuple[str, object]]:
    """``(place, object)``: a loader's (:func:`_loaders`) samplers, data set, those it wraps
    (``.dataset``, as a ``Subset`` holds it, and ``.datasets``, a ``ConcatDataset``'s;
    :data:`_WRAPPED_DEPTH` levels) and collate function, and the object that wraps the loader
    (an epoch it counts)."""
    owners: list[tuple[str, object]] = []
    for prefix, loader in _loaders(data):
        if prefix:
            owners.append(("", data))
        batch_sampler = loader.batch_sampler
        owners.extend((f"{prefix}{place}", owner) for place, owner in (
            ("sampler", loader.sampler), ("batch_sampler", batch_sampler),
            ("batch_sampler.sampler", getattr(batch_sampler, "sampler", None))))
        owners.extend(_wrapped_data_sets(loader, prefix))
    if not owners and not isinstance(data, list | tuple):
        owners.append(("", data))  # a re-iterable of batches of the user's own (probe 215)
    return owners


def _wrapped_data_sets(loader: DataLoader[Any], prefix: str) -> list[tuple[str, object]]:
    """A loader's collate function, data set and those it wraps (:func:`_data_set_owners`)."""
    owners: list[tuple[str, object]] = [(f"{prefix}collate_fn", loader.collate_fn)]
    level: list[tuple[str, object]] = [(f"{prefix}dataset", loader.dataset)]
    for _ in range(_WRAPPED_DEPTH):
        owners.extend(level)
        level = [(f"{place}.dataset", inner) for place, owner in level
                 if (inner := getattr(owner, "dataset", None)) is not None] + [
                 (f"{place}.datasets[{index}]", inner) for place, owner in level
                 if isinstance(inners := getattr(owner, "datasets", None), list | tuple)
                 for index, inner in enumerate(inners[:HELD_ITEMS])]
    return owners


@contextmanager
def same_draw(data: object) -> Iterator[None]:
    """Run one pass over ``data`` from the current random state and restore it afterwards.

    Restores the global generators (:class:`~hessrank.guard.GlobalGenerators`), those the
    loader, its sampler, its batch sampler, its data set (and the data sets it wraps) and its
    collate function hold (``DataLoader.generator``, a ``RandomSampler``'s, a custom sampler's
    NumPy or Python generator, an augmenting data set's) and those objects' other attributes
    (an epoch a sampler or an ``IterableDataset`` counts itself), so that every pass draws the
    same shuffle and the same random transforms, and the caller's generators, samplers and data
    sets end as they began.
    """
    generators = GlobalGenerators.read()
    # the samplers, the data set (and those it wraps) and the collate function: a data set's
    # own generator (augmentation), a collate object's (MixUp) and an epoch an IterableDataset
    # counts in __iter__ had been left advanced by the passes (probe 109)
    owners = [owner for owner in _data_set_owners(data) if owner[1] is not None]
    own = held_generators([("", data), *((place.rstrip("."), loader)
                                          for place, loader in _loaders(data) if place),
                           *owners], depth=_HELD_DEPTH)
    # their own attributes too (a sampler that counts its epochs in __iter__ had been left
    # counting the call's passes, and drew another order in each; probe 101). Not what those
    # hold, written in place: put back after a pass, a cache filled from a one-shot source had
    # been emptied, the data lost, and an index of a million paths copied every pass (probe
    # 235)
    attributes = [(owner.__dict__, dict(owner.__dict__)) for owner in
                  {id(owner): owner for place, owner in owners
                   if place and hasattr(owner, "__dict__")
                   and not isinstance(owner, _NOT_STATEFUL)}.values()]
    # of the data object itself (a wrapper of a loader, a re-iterable of the user's own), only
    # the numbers it held (an epoch it counts): its other attributes may be what a pass filled
    # in, a cache read from a one-shot stream, which a restore had emptied (probe 217)
    counts = [(vars(owner), {key: value for key, value in vars(owner).items()
                             if isinstance(value, numbers.Real)})
              for place, owner in owners if not place and hasattr(owner, "__dict__")]
    try:
        yield
    finally:
        # with signals held back: one landing in the restores had left the caller's loader
        # generator advanced, the next epoch shuffled otherwise (7 in 421 interrupted calls;
        # probe 223). One landing as the block begins skips it: the call's own same_draw
        # around its work, exited with signals held back (hessrank.api), restores then.
        with deferred_interrupts():
            generators.restore()
            for held in own:
                held.restore()
            for current, saved in attributes:
                current.clear()
                current.update(saved)
            for current, saved in counts:
                current.update(saved)


@contextmanager
def workers_as_found(data: Data) -> Iterator[Data]:
    """The data for the block's passes, a ``DataLoader`` with ``persistent_workers`` left with
    its workers as found; other data as they are.

    Workers the caller started (between epochs or in the middle of one) are not the block's to
    use: the passes would reset the caller's epoch and advance the workers' random state, which
    lives in their processes and cannot be put back (a refused call changed the caller's next
    epochs; probe 96). Nor do workers that persist between the block's own passes serve it: a
    random transform in them draws on from one pass to the next, and the data were refused as
    changing between passes, a training loader given to a Tracker as its ``eval_batch`` among
    them (probe 137). The block gets a shallow copy of the loader whose workers do not persist:
    each pass starts its own, seeded as a first start is, and stops them at its end. (Its flag
    set past ``DataLoader``'s guard against changing it after construction.) An object wrapping
    such a loader (:func:`_loaders`) is given as a shallow copy holding the loader's copy.
    """
    persistent = [(place, loader) for place, loader in _loaders(data)
                  if loader.persistent_workers]
    if not persistent:
        yield data
        return
    copied: dict[str, DataLoader[Any]] = {}
    for place, found in persistent:
        loader: DataLoader[Any] = copy.copy(found)  # the same data set, samplers, generator
        object.__setattr__(loader, "persistent_workers", False)
        loader._iterator = None
        copied[place.rstrip(".")] = loader
    if "" in copied:
        yield cast(Data, copied[""])
        return
    wrapper = copy.copy(data)  # a class wrapping the loader: its copy holds the loader's copy
    vars(wrapper).update(copied)
    yield wrapper


def _fingerprint(problem: CurvatureProblem) -> Fingerprint:
    """The batch's sample count and :func:`_input_print` of each input and of the targets (each
    input's own: summed over the inputs, two that traded contents between passes had agreed;
    probe 235)."""
    with torch.no_grad():
        return (problem.num_samples, *(value for x in (*problem.args, *problem.kwargs.values(),
                                                       problem.targets)
                                       for value in _input_print(x)))


#: Entries of an input :func:`_input_print` sums in float64 at a time.
PRINT_BLOCK = 2**16
#: Bytes :func:`_input_print` holds: a block's float64 copy and the weights of its places
#: (:func:`_place_weights`, kept).
PRINT_BYTES = 3 * 8 * PRINT_BLOCK
#: The irrational steps of the weights :func:`_input_print` gives an entry's place in its
#: block and the block's place in the tensor.
_PLACE_STEPS = ((math.sqrt(5.0) - 1) / 2, math.sqrt(2.0) - 1)


def _input_print(tensor: Tensor) -> tuple[float, float, int, int, int]:
    """Two float64 sums of ``tensor``'s finite entries, plain and weighted by each entry's
    place (:func:`_place_weights`), and the counts of its ``+inf``, ``-inf`` and NaN entries.
    The plain sum alone had not seen data that move within a batch: a random flip of an image,
    targets shuffled within a batch, a pass's data taken for the first's by every method
    (probe 232); weights linear in the place had not seen rows of equal sums trade places
    (one-hot targets; probe 235). An input's ``-inf`` (an additive mask's) made a plain sum
    ``-inf`` on every pass, and inputs that changed between passes went unseen by fisher and
    ggn (probe 101); so would NaN inputs (missing values) or targets (missing labels). In
    blocks (:func:`_blocks`): a float64 copy of the whole input, twice a float32 batch, had
    been every pass's peak over a data set (probe 148)."""
    plain, weighted = _blockwise_sums(tensor, finite=False)
    if math.isfinite(plain) and math.isfinite(weighted):
        return plain, weighted, 0, 0, 0
    blocks = _blocks(tensor)
    return (*_blockwise_sums(tensor, finite=True),
            int(sum(block.isposinf().sum() for block in blocks)),
            int(sum(block.isneginf().sum() for block in blocks)),
            int(sum(block.isnan().sum() for block in blocks)))


def _blocks(tensor: Tensor) -> list[Tensor]:
    """``tensor`` in views of at most :data:`PRINT_BLOCK` entries: blocks of whole samples
    where one fits, else each sample's own in turn (its rows, and so on down; a flattened view
    of a non-contiguous tensor, transposed or channels-last, had copied the whole batch; probe
    150; a sample of a 320^3 volume had been one block, its float64 copy and weights 500 MB;
    probe 235)."""
    if tensor.dim() == 0:
        return [tensor]
    if tensor.dim() == 1:
        return list(tensor.split(PRINT_BLOCK))
    per_row = tensor[:1].numel()
    if per_row <= PRINT_BLOCK:
        return list(tensor.split(max(1, PRINT_BLOCK // max(1, per_row))))
    return [block for row in tensor for block in _blocks(row)]


@functools.cache
def _place_weights(device: torch.device) -> Tensor:
    """``[PRINT_BLOCK, 2]`` float64: ones (the plain sum), and the weights of the places in a
    block, ``1 + frac(p phi)``: not linear in the place ``p``, so that no exchange of entries
    keeps the weighted sum."""
    places = torch.arange(PRINT_BLOCK, dtype=torch.float64, device=device)
    return torch.stack((torch.ones_like(places), 1 + torch.frac(places * _PLACE_STEPS[0])), 1)


def _blockwise_sums(tensor: Tensor, finite: bool) -> tuple[float, float]:
    """The float64 sums of :func:`_input_print` (of the finite entries only, the others taken
    as zero, where ``finite``), a block at a time (:func:`_blocks`), each block's weighted sum
    weighted again by its place among the blocks: a float64 copy of large targets had been
    every pass's peak (probe 150)."""
    sums = []
    shares = []
    for index, block in enumerate(_blocks(tensor)):
        # (one copy of one block at most, in the order of its places)
        values = block.to(torch.float64, memory_format=torch.contiguous_format).reshape(-1)
        if finite:
            values = values.nan_to_num(0.0, 0.0, 0.0)
        sums.append(values @ _place_weights(values.device)[:values.numel()])
        shares.append(1 + math.modf(index * _PLACE_STEPS[1])[0])
    if not sums:
        return 0.0, 0.0
    together = torch.stack(sums)  # [blocks, 2]
    plain = together[:, 0].sum()
    weighted = together[:, 1] @ torch.tensor(shares, dtype=torch.float64, device=together.device)
    first, second = torch.stack((plain, weighted)).tolist()  # (one read from a GPU)
    return first, second


def _same(first: Fingerprint, second: Fingerprint) -> bool:
    """Whether two fingerprints are equal, a NaN equal to a NaN (finite inputs near the float64
    limit can sum to one; fixed data give it on every pass)."""
    return all(a == b or (a != a and b != b) for a, b in zip(first, second))


def _can_be_reference(batch: CurvatureProblem, outputs: Tensor) -> bool:
    """Whether how the data set's loss weighs its batches can be read off this batch: its loss
    is finite and has a nonzero gradient w.r.t. the outputs (not so where every target is
    ignored: a mean over none is NaN, a sum over none 0)."""
    with torch.no_grad():  # a parameter term would otherwise build a graph
        value = evaluate_loss(batch.loss_fn, outputs, batch.targets, finite=False)
    return (math.isfinite(float(value))
            and float(output_gradient(batch.loss_fn, outputs, batch.targets).abs().max()) > 0)


def _curved(loss_fn: Callable[[Tensor, Tensor], Tensor], outputs: Tensor, targets: Tensor,
            beside: tuple[Tensor, Tensor] | None = None) -> bool:
    """Whether the loss's Hessian w.r.t. the outputs is nonzero (or not finite) along a random
    direction: a batch whose loss gradient vanishes may still add curvature. ``beside``: the
    outputs and targets of a batch to judge it next to, in the loss of the two (a batch whose
    own loss is 0/0, its weights in the targets all zero, had been judged curved by its own NaN
    product, and the data set refused; probe 215)."""
    rows = outputs.shape[0]
    if beside is not None:
        outputs, targets = torch.cat([outputs, beside[0]]), torch.cat([targets, beside[1]])
    leaf = outputs.detach().requires_grad_(True)
    with torch.enable_grad():
        value = call_loss(loss_fn, leaf, targets)
        if not value.requires_grad:  # a constant (see output_gradient)
            return False
        (gradient,) = torch.autograd.grad(value, leaf, create_graph=True, allow_unused=True)
    if gradient is None or not gradient.requires_grad:
        return False
    direction = torch.randn(leaf.shape, generator=torch.Generator().manual_seed(0),
                            dtype=leaf.dtype).to(leaf.device)
    direction[rows:] = 0  # (the batch's own rows)
    (product,) = torch.autograd.grad(gradient, leaf, grad_outputs=direction, allow_unused=True)
    return product is not None and not bool((product[:rows] == 0).all())


def _joined(first: CurvatureProblem, second: CurvatureProblem) -> CurvatureProblem:
    """The two batches as one, their inputs and targets concatenated (their shapes past the
    batch dimension agree)."""
    return dataclasses.replace(
        first, args=tuple(torch.cat([a, b]) for a, b in zip(first.args, second.args)),
        kwargs={key: torch.cat([x, second.kwargs[key]]) for key, x in first.kwargs.items()},
        targets=torch.cat([first.targets, second.targets]))


def _reading(batches: Iterator[Data], reading: list[int]) -> Iterator[Data]:
    """``batches``, with the index of the one being read (or used) in ``reading[0]``: the
    next one's from the moment it is asked for."""
    reading[0] = 0
    for batch in batches:
        yield batch
        del batch  # (before the next is read)
        reading[0] += 1


@contextmanager
def _naming_the_batch(reading: list[int]) -> Iterator[None]:
    """An error that the block raises while it reads batch ``reading[0]`` of a data set (set
    before the batch is read), past the first, names that batch where it does not already (a
    second batch's inputs of another width, targets of another dtype or out of range had been
    refused as if the data set were one batch; probe 133): torch's and Python's own errors
    with their message prefixed, another type (one whose constructor takes other arguments,
    or with attributes of its own) as it is, with a note (Python 3.11) naming the batch.

    Raises:
        TypeError, ValueError, RuntimeError, IndexError: the block's, naming the batch.
    """
    try:
        yield
    except (TypeError, ValueError, RuntimeError, IndexError) as error:
        raise_if_signalled(error)
        index = reading[0]
        if index == 0 or re.search(rf"\bbatch {index}\b", str(error)):
            raise
        where = f"batch {index} of the data (the batches before it passed)"
        raise_extended(error, f"{where}: {error}", where)


def _outputs(batch: CurvatureProblem) -> Tensor:
    """The model's outputs on one batch, without a graph."""
    with torch.no_grad():
        return batch.forward()


def _coefficient(pair_part: Tensor, alone: Tensor, what: str) -> float:
    """``c`` with ``pair_part = c * alone`` (both ``[n, *out]``), or raise naming ``what``.
    Summed in float64: a float32 batch's gradients below about 1e-19 have squares that flush
    to zero in float32, and it was said to have no gradient on its own."""
    tolerance = agreement_tolerance(alone.dtype) * math.sqrt(alone[0].numel())
    # in units of the largest entry alone (its binade: exact), so that no square leaves the
    # range (a float64 batch's gradients of 2e-273 had squares of zero; probe 128)
    unit = binade(float(alone.abs().max()) if alone.numel() else 0.0)
    pair_part, alone = pair_part.double() / unit, alone.double() / unit
    alone_sq = float((alone * alone).sum())
    if alone_sq == 0.0:
        if float(pair_part.abs().max()) == 0.0:
            return math.nan  # the batch's loss does not depend on its outputs: weight immaterial
        raise ValueError(
            f"loss_fn does not add up over batches: {what} has no gradient on its own but one "
            "next to another batch, so the samples of different batches interact in the loss; "
            "pass the data as one batch"
        )
    coefficient = float((pair_part * alone).sum()) / alone_sq
    residual = float((pair_part - coefficient * alone).norm())
    if residual > tolerance * max(float(pair_part.norm()), math.sqrt(alone_sq) * abs(coefficient)):
        raise ValueError(
            f"loss_fn does not add up over batches: next to another batch, the gradient of "
            f"{what}'s outputs is not a multiple of its gradient alone (relative mismatch "
            f"{residual / max(float(pair_part.norm()), 1e-300):.2e}), so the loss couples samples "
            "(e.g. a contrastive or batch-normalised loss) and the data set's loss is not a sum "
            "over batches; pass the data as one batch"
        )
    return coefficient


def _refuse_cross_curvature(product: Tensor | None, split: int, what: str) -> None:
    """Raise where the loss of a pair of batches has second derivatives across them:
    ``product``, its Hessian w.r.t. the pair's outputs along a random direction on the first
    ``split`` rows (the reference's), must be zero, to rounding, on the other batch's rows.

    A data set's curvature is a weighted sum of its batches' (:meth:`StreamedProblem.summed`),
    which drops whatever couples two batches. A log-sum-exp of the samples' losses passes the
    gradient's multiple test (its weights are shares of a sum over the batch), and a data set of
    it was analysed as a weighted mean, every eigenvalue off (probe 128). Weights that the
    outputs choose without a derivative (a mean over the samples an argmax picks, a normaliser
    taken detached) add no such term, and pass. Without a product (a loss with no second
    derivative in torch) nothing is checked here (the methods that need one say so).

    Raises:
        ValueError: naming ``what``, the share across the batches and the fix.
    """
    if product is None:
        return
    across, own = float(product[split:].norm()), float(product[:split].norm())
    tolerance = agreement_tolerance(product.dtype) * math.sqrt(product[0].numel())
    if math.isfinite(across) and across > tolerance * max(own, across * 1e-300, 1e-300):
        partner = "a copy of itself" if what == "the first batch" else "the first batch"
        raise ValueError(
            f"loss_fn does not add up over batches: its second derivatives couple {what} with "
            f"{partner} (a product along the first's outputs reaches the other's with "
            f"{across / max(own, 1e-300):.2e} of its size there), so the loss couples samples "
            "through their values (e.g. a log-sum-exp or a softmax over the batch's losses) and "
            "the data set's curvature is not a sum over batches; pass the data as one batch")


@dataclass
class StreamedProblem(CurvatureProblem):
    """A problem whose batch is a whole data set, iterated batch by batch (module docstring).

    ``args``, ``kwargs`` and ``targets`` hold the **first** batch, for shapes and cost
    predictions only. :meth:`forward` and :meth:`loss` refuse to run, so no code can take the
    first batch for the data set; the curvature comes from :meth:`summed`.

    Attributes:
        data: the re-iterable of ``(inputs, targets)`` batches.
        kind: ``"sum"`` or ``"mean"`` (how the batches' losses add up), set by :meth:`survey`.
        total_samples: ``n``, samples in the data set.
        num_batches: batches per pass.
        data_loss: the data set's loss ``sum_b c_b L_b`` from the first pass.
        data_bytes: bytes of one copy of every batch's tensors.
        batch_bytes: bytes of the largest batch's tensors.
        joinable: whether the batches can be joined into one (their shapes past the batch
            dimension agree), set by :meth:`survey`.
    """

    data: Iterable[Any] = field(kw_only=True)
    kind: str = field(default="", kw_only=True)
    total_samples: int = field(default=0, kw_only=True)
    num_batches: int = field(default=0, kw_only=True)
    data_loss: float = field(default=math.nan, kw_only=True)
    data_bytes: int = field(default=0, kw_only=True)
    batch_bytes: int = field(default=0, kw_only=True)
    #: whether every batch's inputs and targets have the first's shapes past the batch
    #: dimension (so that the batches can be joined into one), set by :meth:`survey`
    joinable: bool = field(default=True, kw_only=True)
    #: the joined batch's dtypes (:func:`_batch_tensors`' order), each its batches' promoted
    #: as ``torch.cat`` promotes them, set by :meth:`survey`
    _joined_dtypes: list[torch.dtype] = field(default_factory=list, kw_only=True, repr=False)
    _reference: tuple[Tensor, Tensor, Tensor] | None = field(default=None, kw_only=True,
                                                             repr=False)
    _normalisers: list[tuple[Fingerprint, float]] = field(default_factory=list, kw_only=True,
                                                          repr=False)

    @property
    def num_samples(self) -> int:
        return self.total_samples or super().num_samples

    def forward(self) -> Tensor:
        raise RuntimeError("internal error: a data set is evaluated batch by batch "
                           "(StreamedProblem.summed), never through one forward pass")

    def loss(self, outputs: object = None, loss_fn: LossFn | None = None) -> Tensor:
        raise RuntimeError("internal error: a data set's loss is a sum over batches "
                           "(StreamedProblem.summed)")

    def pass_bytes(self) -> int:
        """Bytes a pass over the data holds beside the first batch's copy: the batch it reads
        (a loader's, with those its workers have ready), the call's copy of it, and in the first
        pass a copy of half of it (the check that the samples do not interact runs each half
        alone). A list's or a tuple's batches are the caller's: the copies alone. (A pass over a
        loader had peaked at 1.7 times a prediction that counted none of them; probe 148.) And
        the fingerprint's block and weights (:data:`PRINT_BYTES`)."""
        if isinstance(self.data, DataLoader):
            read = 1 + self.data.num_workers * (self.data.prefetch_factor or 0)
        else:  # (another iterable may make each batch it yields)
            read = 0 if isinstance(self.data, (list, tuple)) else 1
        return (2 * read + 3) * (self.batch_bytes or batch_bytes(self)) // 2 + PRINT_BYTES

    def first(self) -> CurvatureProblem:
        """The first batch alone (for predictions of a single batch's cost)."""
        return CurvatureProblem(**self.core_fields())  # type: ignore[arg-type]

    def _batches(self) -> Iterator[CurvatureProblem]:
        """One pass: each batch validated as :func:`hessrank.effective_rank` validates one.

        The batch as read is let go before the next is read, and the caller lets go of the
        batch yielded (:meth:`_checked_pass`): a pass holds one batch and its copy. (No
        ``enumerate`` in these loops: it keeps its last ``(index, item)`` to reuse, which had
        held every previous batch while the next was read; probe 148.)"""
        index = -1
        for item in self.data:
            index += 1
            _check_pair(index, item)
            try:
                fields = read_batch(_to_device(item, self.device), self.device)
            except (TypeError, ValueError) as error:
                raise type(error)(f"batch {index} of the data: {error}") from error
            del item
            yield dataclasses.replace(self.first(), **fields)
            del fields

    def _pair(self, outputs: Tensor, targets: Tensor, gradient: Tensor,
              what: str) -> tuple[float, float]:
        """``(alpha, beta)`` of the loss on the reference batch next to this one (docstring)."""
        assert self._reference is not None
        reference_outputs, reference_targets, reference_gradient = self._reference
        try:
            both_outputs = torch.cat([reference_outputs, outputs.detach()])
            both_targets = torch.cat([reference_targets, targets])
        except RuntimeError as error:
            raise ValueError(
                f"{what} cannot be concatenated with the first batch ({error}): the loss of a "
                "data set is that of all its samples at once, so every batch needs the same "
                "output and target shapes past the batch dimension (pad sequences to one length)"
            ) from error
        split = reference_outputs.shape[0]

        def coefficients(loss_fn: LossFn, both: Tensor, reference: Tensor, alone: Tensor
                         ) -> tuple[float, float]:
            direction = torch.zeros_like(both)
            direction[:split] = torch.randn(both[:split].shape, dtype=both.dtype,
                                            generator=torch.Generator().manual_seed(0)
                                            ).to(both.device)
            pair_gradient, product = output_gradient_and_product(loss_fn, both, both_targets,
                                                                 direction)
            alpha = _coefficient(pair_gradient[:split], reference, "the first batch")
            beta = _coefficient(pair_gradient[split:], alone, what)
            _refuse_cross_curvature(product, split, what)
            return alpha, beta

        dtype = both_outputs.dtype
        # Near a saturated softmax or sigmoid a float32 batch's gradients lie at the subnormal
        # floor, where dividing by the pair's 2n instead of n rounds them to zero or not (a
        # memorised classifier's first batch was said to interact with the next), or by a
        # ratio of its own (one read as weighing the first batch 0.56 when repeated; probe
        # 128): below the normal range to the agreement tolerance, and wherever the reading
        # fails, they are read in float64, where the loss can be.
        floor = torch.finfo(dtype).smallest_normal / agreement_tolerance(dtype)
        coarse = dtype != torch.float64 and min(
            float(reference_gradient.abs().max()), float(gradient.abs().max())) < floor
        refused: ValueError | None = None
        if not coarse:
            try:
                return coefficients(self.loss_fn, both_outputs, reference_gradient, gradient)
            except ValueError as error:
                if dtype == torch.float64:
                    raise
                refused = error
        try:
            twin = float64_twin(self.loss_fn, both_outputs, both_targets)
        except ValueError as error:
            raise_if_signalled(error)
            if refused is not None:
                raise refused from None
            return coefficients(self.loss_fn, both_outputs, reference_gradient, gradient)
        return coefficients(
            twin, both_outputs.double(),
            output_gradient(twin, reference_outputs.double(), reference_targets),
            output_gradient(twin, outputs.detach().double(), targets))

    def _weighed(self, batch: CurvatureProblem, outputs: Tensor, index: int
                 ) -> tuple[Any, float, float]:
        """``(fingerprint, Z_b, L_b)``: batch ``index``'s fingerprint, normaliser
        (:meth:`_normaliser`) and loss, which must be finite where the data set's loss weighs
        the batch (``Z_b > 0``); a batch whose outputs have no gradient next to another (every
        target ignored) may have a NaN loss of its own, and then counts with loss 0, in a
        note."""
        with torch.no_grad():  # a parameter term would otherwise build a graph
            loss = evaluate_loss(batch.loss_fn, outputs, batch.targets, finite=False)
        normaliser = self._normaliser(batch, outputs, f"batch {index}", float(loss))
        if normaliser != 0.0:
            check_loss(loss, batch=batch.labelled_batch())
        elif _curved(batch.loss_fn, outputs, batch.targets,
                     None if math.isfinite(float(loss)) or self._reference is None
                     else self._reference[:2]):
            raise ValueError(
                f"batch {index} has no share of the data set's loss (read off the first batch's "
                "coefficient next to it) and no loss gradient, yet a curved loss: the loss does "
                "not add up over batches; pass the data as one batch")
        value = float(loss)
        if normaliser == 0.0 and not math.isfinite(value):
            self.notes.append(
                f"batch {index} adds nothing to the data set's loss (its own loss is "
                f"{value}, e.g. every target ignored, and its outputs have no gradient "
                "next to another batch): left out")
            value = 0.0
        return _fingerprint(batch), normaliser, value

    def _normaliser(self, batch: CurvatureProblem, outputs: Tensor, what: str,
                    own_loss: float) -> float:
        """``Z_b`` relative to the reference batch's (1 for a sum), from the batch's outputs
        (and its own loss ``own_loss``, where its gradient is zero).

        Where the batch's outputs get no gradient (every target ignored; a hinge loss's flat
        region; exact predictions under a squared error), its own coefficient ``beta`` cannot
        be read; a sum still weighs it 1, and a mean's ``1 - alpha`` is its share. That share
        is 0 (``Z_b = 0``: every target ignored) within a few units of rounding, or within the
        coefficients' agreement tolerance where the batch's own loss is not finite (a mean
        over no target); a batch of one sample next to 10^5 still counts."""
        gradient = output_gradient(batch.loss_fn, outputs, batch.targets)
        alpha, beta = self._pair(outputs, batch.targets, gradient, what)
        tolerance = agreement_tolerance(outputs.dtype)
        if math.isnan(beta):
            beta = 1.0 if self.kind == "sum" else 1.0 - alpha
            rounding = 16 * float(torch.finfo(outputs.dtype).eps)
            if self.kind == "mean" and (abs(beta) <= rounding or (
                    abs(beta) <= tolerance and not math.isfinite(own_loss))):
                return 0.0
        if self.kind == "sum":
            if abs(alpha - 1) > tolerance or abs(beta - 1) > tolerance:
                raise ValueError(
                    f"loss_fn adds the first batch's losses but weighs {what} by {beta:.4g} "
                    f"next to it (the first batch by {alpha:.4g}): it is neither a sum nor a "
                    "mean over samples; pass the data as one batch"
                )
            return 1.0
        if abs(alpha + beta - 1) > tolerance or alpha <= 0 or beta < 0:
            raise ValueError(
                f"loss_fn averages the first batch's losses but weighs it by {alpha:.4g} and "
                f"{what} by {beta:.4g} together (a mean would give weights summing to 1): it is "
                "neither a sum nor a mean over samples; pass the data as one batch"
            )
        return beta / alpha

    def survey(self, watch: Callable[[int], None] | None = None) -> None:
        """The first pass: count the samples, read off and verify the batches' weights;
        ``watch(samples read)`` after each batch (a time budget's check, which may raise).

        One forward pass per batch without a graph, plus a few loss gradients w.r.t. outputs.

        Raises:
            TypeError, ValueError: a bad batch (named by its index), an empty data set, a loss
                that does not add up over batches, a sum with a parameter term, or BatchNorm
                on batch statistics.
        """
        refuse_split_batch_statistics(self, "batch")
        # index -> (fingerprint, normaliser, loss); batches seen before one that can serve as
        # the reference (every target ignored: a NaN mean, or a zero sum) wait for it
        weighed: dict[int, tuple[Any, float, float]] = {}
        waiting: list[tuple[int, CurvatureProblem, Tensor]] = []
        total_bytes = 0
        mixing_checked = False
        single: CurvatureProblem | None = None  # a first batch of one sample
        first_shapes: list[object] = []  # the first batch's, past the batch dimension
        if rescales_lookups(self.model):  # every batch's rows rescaled before any is weighed
            with same_draw(self.data):
                for batch in self._batches():
                    _outputs(batch)
        reading = [0]  # the batch being read, for the errors (:func:`_naming_the_batch`)
        stopped: ValueError | None = None  # the watch's
        with same_draw(self.data), _naming_the_batch(reading):
            for batch in _reading(self._batches(), reading):
                index = reading[0]
                outputs = _outputs(batch)
                refuse_the_nested_fast_path(batch, lambda: outputs)  # noqa: B023 - read at once
                shapes: list[object] = [
                    *(x.shape[1:] for x in batch.args), batch.targets.shape[1:],
                    *((key, x.shape[1:]) for key, x in sorted(batch.kwargs.items()))]
                tensors = _batch_tensors(batch)
                self._joined_dtypes = ([torch.promote_types(a, x.dtype) for a, x in
                                        zip(self._joined_dtypes, tensors)] if index
                                       else [x.dtype for x in tensors])
                first_shapes = first_shapes or shapes
                self.joinable = self.joinable and shapes == first_shapes
                if not mixing_checked and batch.num_samples > 1:  # once: the model's property
                    refuse_mixed_samples(batch, outputs, "batch")
                    mixing_checked = True
                elif not mixing_checked and index == 0:
                    single = batch
                elif not mixing_checked and single is not None and shapes == first_shapes:
                    # batches of one sample: the first joined with one of its shapes (a model
                    # with a batch mean had been analysed one sample at a time; probe 71)
                    joined = _joined(single, batch)
                    refuse_mixed_samples(joined, _outputs(joined), "batch")
                    mixing_checked = True
                self.total_samples += batch.num_samples
                total_bytes += _tensor_bytes(tensors)
                self.batch_bytes = max(self.batch_bytes, _tensor_bytes(tensors))
                del tensors
                if self._reference is None and not _can_be_reference(batch, outputs):
                    waiting.append((index, batch, outputs))
                elif self._reference is None:
                    self._begin(batch, outputs)
                    weighed[index] = self._weighed(batch, outputs, index)
                    for earlier, earlier_batch, earlier_outputs in waiting:
                        reading[0] = earlier  # (its errors had named the batch read last)
                        weighed[earlier] = self._weighed(earlier_batch, earlier_outputs, earlier)
                    reading[0] = index
                    waiting.clear()
                else:
                    weighed[index] = self._weighed(batch, outputs, index)
                del batch, outputs  # (before the next is read; a waiting batch stays held)
                if watch is not None:
                    try:
                        watch(self.total_samples)
                    except ValueError as over:  # (raised as it is: no batch's error)
                        stopped = over
                        break
        if stopped is not None:
            raise stopped
        if waiting:  # no batch can: the first one's own error says why
            _, batch, outputs = waiting[0]
            with torch.no_grad():  # a parameter term would otherwise build a graph
                CurvatureProblem.loss(batch, outputs)  # checked: a finite scalar
            self._begin(batch, outputs)
        if not weighed:
            raise ValueError("the data yielded no batch: pass a loader over a non-empty data set")
        self._normalisers = [(weighed[i][0], weighed[i][1]) for i in sorted(weighed)]
        losses = [(weighed[i][1], weighed[i][2]) for i in sorted(weighed)]
        self.num_batches = len(losses)
        self.data_bytes = total_bytes
        if not mixing_checked and self.num_batches > 1:
            # (probe 74: a batch-mean GRU on sequences of other lengths ran unchecked, unnoted)
            self.notes.append(
                "every batch holds one sample and none could be joined with the first (their "
                "shapes differ): the call could not check that the model computes each sample on "
                "its own; a model that mixes the samples of a batch (statistics over the batch) "
                "is analysed here one sample at a time")
        total = self._total_normaliser()
        self.data_loss = sum(self._weight(z, total) * value for z, value in losses)
        self.notes.append(
            f"data set of {self.total_samples:,} samples in {self.num_batches} batches, "
            + ("its loss the sum of the batches' losses" if self.kind == "sum" else
               "its loss the batches' losses weighted by their share of the normaliser "
               "(a mean over the data set)")
            + " (verified on every batch)")

    def _begin(self, batch: CurvatureProblem, outputs: Tensor) -> None:
        """Take ``batch`` (with its ``outputs``) as the reference and read the reduction's kind
        off a pair of it."""
        gradient = output_gradient(batch.loss_fn, outputs, batch.targets)
        if float(gradient.abs().max()) == 0.0:
            raise ValueError(
                "no batch's loss has a nonzero gradient w.r.t. the model's outputs, so how "
                "the data set's loss weighs its batches cannot be read off (every target "
                "ignored in every batch, or a loss_fn that returns its value detached, under "
                "torch.no_grad() or through .item(): return it as a tensor computed from the "
                "outputs with torch operations"
                + ("" if outputs.dtype == torch.float64 else
                   f"; or every output saturated to a gradient of exactly zero in "
                   f"{outputs.dtype}, a memorised classifier's: analyse a float64 copy of the "
                   "model, copy.deepcopy(model).double() with float64 inputs") + ")"
            )
        self._reference = (outputs.detach(), batch.targets, gradient)
        alpha, beta = self._pair(outputs, batch.targets, gradient, "the first batch")
        tolerance = agreement_tolerance(outputs.dtype)
        if abs(alpha - 1) <= tolerance and abs(beta - 1) <= tolerance:
            self.kind = "sum"
        elif abs(alpha - 0.5) <= tolerance and abs(beta - 0.5) <= tolerance:
            self.kind = "mean"
        else:
            raise ValueError(
                f"loss_fn weighs the first batch by {alpha:.4g} and {beta:.4g} when it is "
                "repeated (a sum gives 1 and 1, a mean 0.5 and 0.5): the data set's loss is not "
                "a sum of its batches' losses; pass the data as one batch"
            )
        terms = direct_parameter_names(batch.loss_fn, outputs, batch.targets, batch.params,
                                       batch.names)
        if terms and self.kind == "sum":
            raise ValueError(
                f"loss_fn sums over samples and uses the parameters directly ({', '.join(terms)})"
                ": over a data set that term would count once per batch, but once in the loss "
                "of the concatenated data; use a mean reduction, or pass the data as one batch"
            )

    def _weight(self, normaliser: float, total: float) -> float:
        """``c_b`` from the batch's normaliser and the data set's (0 for a batch whose outputs
        have no gradient: nothing to add)."""
        if normaliser == 0.0:
            return 0.0
        return 1.0 if self.kind == "sum" else normaliser / total

    def _total_normaliser(self) -> float:
        return sum(z for _, z in self._normalisers)

    def summed(self, compute: Callable[[CurvatureProblem], tuple[Tensor, float]]) -> Tensor:
        """``sum_b c_b compute(b)`` over one pass, checked against the first pass.

        Args:
            compute: ``batch -> (tensor, the batch's loss L_b)``; the tensor is linear in the
                batch's loss (a product with its Hessian, GGN or EF, its dense Hessian) and
                the caller's own: the first is weighted in place (no second copy of it).

        Raises:
            ValueError: the pass saw a different data set (batches or loss).
        """
        total = self._total_normaliser()
        result: Tensor | None = None
        loss = 0.0

        def add(batch: CurvatureProblem, normaliser: float) -> None:
            nonlocal result, loss
            weight = self._weight(normaliser, total)
            if weight == 0.0:
                return
            value, batch_loss = compute(batch)
            loss += weight * batch_loss
            result = value.mul_(weight) if result is None else result.add_(value, alpha=weight)

        self._checked_pass(add)
        tolerance = agreement_tolerance(self.dtype)
        if result is None or abs(loss - self.data_loss) > tolerance * max(abs(self.data_loss),
                                                                          1e-30):
            raise _data_changed(f"loss {loss:.8g} against {self.data_loss:.8g} in "
                                           "the first pass")
        return result

    def _checked_pass(self, visit: Callable[[CurvatureProblem, float], None]) -> None:
        """One more pass over the data: ``visit(batch, its normaliser)`` for each batch that is
        the first pass's batch in its place (count, inputs and targets, by their sums).

        Raises:
            ValueError: a batch differs, or the number of batches does.
        """
        count = 0
        # (an error of a batch past the first named it: fisher_lanczos had said "not finite for
        # sample 2" of the data set's second batch; probe 225)
        reading = [0]
        with same_draw(self.data), _naming_the_batch(reading):
            for batch in self._batches():
                reading[0] = count
                if (count >= len(self._normalisers)
                        or not _same(self._normalisers[count][0], _fingerprint(batch))):
                    raise _data_changed(f"batch {count} differs from the first pass's")
                visit(batch, self._normalisers[count][1])
                count += 1
                del batch  # (before the next is read)
        if count != len(self._normalisers):
            raise _data_changed(f"{count} batches against "
                                           f"{len(self._normalisers)} in the first pass")

    def concatenated(self, method: str) -> CurvatureProblem:
        """Every batch in one problem (for the Gram methods; memory predicted by the caller).

        Each batch is copied into its place as the pass reads it, so that the pass holds one
        batch beside the joined ones (:meth:`pass_bytes`), not every batch (twice the data; probe
        148).

        Raises:
            ValueError: the batches' shapes past the batch dimension differ (:attr:`joinable`),
                naming ``method`` and what to do (torch's bare "Sizes of tensors must match"
                had come after the pass; probe 74).
        """
        if not self.joinable:
            raise ValueError(
                f"method={method!r} joins a data set's batches into one (its Gram matrix is over "
                "every sample), and these batches' inputs or targets differ in shape past the "
                "batch dimension (sequences of other lengths): pad them to one length, or use "
                f"method='{method}_lanczos', which takes the batches one at a time")
        joined: list[Tensor] = []
        start, required = 0, False

        def place(batch: CurvatureProblem, _: float) -> None:
            nonlocal start, required
            required = required or batch.inputs_require_grad
            tensors = _batch_tensors(batch)
            if not joined:
                joined.extend(x.new_empty((self.total_samples, *x.shape[1:]), dtype=dtype)
                              for x, dtype in zip(tensors, self._joined_dtypes))
            for whole, part in zip(joined, tensors):
                whole[start:start + batch.num_samples] = part
            start += batch.num_samples

        self._checked_pass(place)
        first = self.first()
        named = dict(zip(sorted(first.kwargs), joined[len(first.args):-1]))
        return dataclasses.replace(first, args=tuple(joined[:len(first.args)]),
                                   kwargs={key: named[key] for key in first.kwargs},
                                   targets=joined[-1], notes=list(self.notes),
                                   inputs_require_grad=required)


def _batch_tensors(batch: CurvatureProblem) -> list[Tensor]:
    """A batch's tensors: positional inputs, keyword inputs by name, targets."""
    return [*batch.args, *(batch.kwargs[key] for key in sorted(batch.kwargs)), batch.targets]


def _tensor_bytes(tensors: list[Tensor]) -> int:
    """Bytes of ``tensors``."""
    return sum(x.numel() * x.element_size() for x in tensors)


def batch_bytes(batch: CurvatureProblem) -> int:
    """Bytes of a batch's tensors (inputs and targets)."""
    return _tensor_bytes(_batch_tensors(batch))


def _data_changed(detail: str) -> ValueError:
    """The error for ``data`` that differ between passes over them (``detail``: how)."""
    return ValueError(
        f"the data changed between passes over it ({detail}). Every product is one pass, so the "
        "data must be the same in each: random transforms drawn from a generator hessrank does "
        "not restore (torch, NumPy, Python and the loader's are, and each pass starts the "
        "loader's workers afresh, from the same seeds) or data read from a changing source make "
        "the curvature undefined")


def streamed_problem(problem: CurvatureProblem, data: Iterable[Any]) -> StreamedProblem:
    """A :class:`StreamedProblem` over ``data`` whose first batch ``problem`` is (not surveyed)."""
    return StreamedProblem(**problem.core_fields(), data=data)  # type: ignore[arg-type]


def announced_samples(data: Iterable[Any]) -> int | None:
    """How many samples a ``DataLoader`` will yield, as far as it says so before a pass (its
    sampler's length, less what ``drop_last`` drops); None where it does not say (a batch
    sampler of its own, a sampler without a length, a ``collate_fn`` of its own, which may
    drop or add samples, another iterable)."""
    if (not isinstance(data, DataLoader) or data.batch_size is None
            or data.collate_fn is not default_collate):
        return None
    try:
        count = len(data.sampler)  # type: ignore[arg-type]
    except TypeError:
        return None
    return count // data.batch_size * data.batch_size if data.drop_last else count


def first_batch(data: Iterable[Any], device: torch.device) -> Batch:
    """The first batch of a re-iterable ``data``, moved to ``device``, for validation.

    Raises:
        TypeError: ``data`` is a one-shot iterator (a generator), which a pass per product would
            exhaust.
        ValueError: ``data`` yields nothing.
    """
    with same_draw(data):  # creating an iterator may draw a seed
        one_shot = iter(data) is data
    if one_shot:
        raise TypeError(
            f"the batches come from a one-shot iterator ({type(data).__name__}): hessrank passes "
            "over the data more than once (once per product for the Lanczos methods), so pass "
            "a re-iterable: a DataLoader, or a list of (inputs, targets) batches"
        )
    with same_draw(data):
        for item in data:
            _check_pair(0, item)
            return _to_device(item, device)  # type: ignore[return-value]
    raise ValueError("the data yielded no batch: pass a loader over a non-empty data set")


def batch_read_seconds(data: Iterable[Any]) -> float:
    """Seconds a ``DataLoader`` without workers takes to give a batch (its second, the first
    paying for the iterator's start), with the draws restored (:func:`same_draw`); 0 for other
    data (a list holds its batches; workers read ahead in parallel)."""
    if not isinstance(data, DataLoader) or data.num_workers:
        return 0.0
    with same_draw(data):
        batches = iter(data)
        try:
            next(batches)
            start = time.perf_counter()
            next(batches)
        except StopIteration:
            return 0.0
        return time.perf_counter() - start


class StreamedOperator(ParameterOperator):
    """``V -> V A`` for a data set's curvature ``A = sum_b c_b A_b``: one pass per product.

    Args:
        problem: the surveyed data set.
        make: ``batch -> operator of that batch's A_b`` (with its ``loss_value``); built and
            dropped batch by batch, so one batch's graph is held at a time.
    """

    def __init__(self, problem: StreamedProblem,
                 make: Callable[[CurvatureProblem], Any]) -> None:
        super().__init__(problem)
        self.problem = problem
        self.make = make

    def matmat(self, vectors: Tensor) -> Tensor:
        """The data set's curvature times each row of ``vectors`` (``[k, P]``)."""
        self.num_products += vectors.shape[0]
        bounds: list[int] = []
        unused: list[frozenset[int]] = []
        vanished: list[ZeroCurvatureError] = []

        def batch_product(batch: CurvatureProblem) -> tuple[Tensor, float]:
            try:
                operator = self.make(batch)
            except ZeroCurvatureError as error:
                # A batch whose GGN factors are zero adds nothing, as its samples would add
                # nothing beside the others in one batch: every target ignored under a sum
                # (taken for a linear loss's), or saturated to the last digit (its loss Hessian
                # rounds to zero, in float32 first; probe 126). Where no batch adds any, the
                # first one's error stands.
                vanished.append(error)
                bounds.append(0)
                unused.append(frozenset(range(len(self.params))))
                with torch.no_grad():
                    loss = float(batch.loss(batch.forward()))
                return torch.zeros(vectors.shape, dtype=self.dtype, device=self.device), loss
            bounds.append(operator.rank_bound)
            unused.append(operator.unused)
            return operator.matmat(vectors), operator.loss_value

        product = self.problem.summed(batch_product)
        if vanished and sum(bounds) == 0:
            raise vanished[0]
        self.rank_bound = min(self.dim, sum(bounds))  # a sum's rank is at most its terms' sum
        self.unused = unused_in_every(unused)
        return product


def per_batch(problem: CurvatureProblem) -> tuple[CurvatureProblem, int]:
    """``(one batch, batches per pass)``: ``(problem, 1)`` unless ``problem`` is a data set."""
    if isinstance(problem, StreamedProblem):
        return problem.first(), problem.num_batches
    return problem, 1


def operator_over(problem: CurvatureProblem,
                  make: Callable[[CurvatureProblem], Any]) -> Any:
    """``make(problem)`` for one batch; for a data set, its batches' operators summed."""
    if isinstance(problem, StreamedProblem):
        return StreamedOperator(problem, make)
    return make(problem)
