"""A data set as the batch: a DataLoader or a list of batches gives the curvature of the loss of
all its samples at once (the concatenated batch), for every method and reduction."""

from __future__ import annotations

import collections
import copy
import functools
import itertools
import random
import sys

import numpy as np
import pytest
import torch
from reference import (
    assert_spectra_close,
    classification_batch,
    eigenvalues_by_magnitude,
    mlp,
    reference_hessian,
)
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset, default_collate

import hessrank

SIZES = (5, 7, 4)  # unequal batches: a mean must weigh them by their share
WEIGHTS = torch.tensor([1.0, 2.5, 0.5], dtype=torch.float64)


def _l2_mean(outputs, targets, model):
    return nn.functional.cross_entropy(outputs, targets) + 0.05 * sum(
        p.pow(2).sum() for p in model.parameters())


#: name -> (loss_fn(model), targets transform): the reductions a loss can have.
LOSSES = {
    "mean": (lambda model: nn.CrossEntropyLoss(), None),
    "sum": (lambda model: nn.CrossEntropyLoss(reduction="sum"), None),
    "class weights": (lambda model: nn.CrossEntropyLoss(weight=WEIGHTS), None),
    "ignore_index": (lambda model: nn.CrossEntropyLoss(ignore_index=2), None),
    "mse": (lambda model: nn.MSELoss(), "one-hot"),
    "mean + L2": (lambda model: lambda f, y: _l2_mean(f, y, model), None),
}
ALL_METHODS = ("exact", "lanczos", "fisher", "ggn", "fisher_lanczos", "ggn_lanczos")
#: Every method on the two weightings that differ most (sum: c_b = 1; class weights: c_b from
#: each batch's weight total); the other reductions on one method per route (summed dense
#: Hessians, the concatenated Gram).
CASES = [(loss, method) for loss in ("sum", "class weights") for method in ALL_METHODS] + [
    (loss, method) for loss in ("mean", "ignore_index", "mse") for method in ("exact", "ggn")
] + [("mean + L2", "exact"), ("mean + L2", "lanczos")]


def _data(loss: str) -> tuple[nn.Module, object, torch.Tensor, torch.Tensor]:
    model = mlp((4, 6, 3))
    x, y = classification_batch(sum(SIZES), 4, 3)
    make, targets = LOSSES[loss]
    if targets == "one-hot":
        y = nn.functional.one_hot(y, 3).double()
    return model, make(model), x, y


def _batches(x: torch.Tensor, y: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(zip(x.split(SIZES), y.split(SIZES)))


@pytest.mark.parametrize(("loss", "method"), CASES)
def test_data_set_equals_concatenated_batch(loss, method):
    """Streamed over unequal batches == one call on the concatenated batch (which
    tests/test_cases.py checks against dense float64 references)."""
    model, loss_fn, x, y = _data(loss)
    streamed = hessrank.effective_rank(model, loss_fn, _batches(x, y), method)
    whole = hessrank.effective_rank(model, loss_fn, (x, y), method)
    assert streamed.num_samples == whole.num_samples == sum(SIZES)
    assert any("data set of 16 samples in 3 batches" in note for note in streamed.notes)
    assert streamed.trace == pytest.approx(whole.trace, rel=1e-9)
    for name, value in whole.ranks.items():
        assert streamed.ranks[name] == pytest.approx(value, rel=1e-6, abs=1e-6), name
    ours, theirs = (result.eigenvalues if result.density is None else result.density[0]
                    for result in (streamed, whole))  # Lanczos: the quadrature's nodes
    assert_spectra_close(ours, theirs, min(len(ours), len(theirs), 12), rtol=1e-9)


@pytest.mark.parametrize("method", ["exact", "fisher"])
def test_namedtuple_batches_are_read_as_tuples(method):
    """A data set whose samples are namedtuples collates into namedtuple batches, which had
    failed in every method with a bare TypeError (probe 215)."""
    sample = collections.namedtuple("Sample", ["inputs", "targets"])
    model, loss_fn, x, y = _data("mean")
    batches = [sample(*batch) for batch in _batches(x, y)]
    streamed = hessrank.effective_rank(model, loss_fn, batches, method)
    whole = hessrank.effective_rank(model, loss_fn, (x, y), method)
    assert_spectra_close(streamed.eigenvalues, whole.eigenvalues, rtol=1e-9)


def test_exact_on_a_data_set_matches_finite_differences():
    """Independent ground truth: the Hessian of the concatenated loss by finite differences of
    gradients, plus its L2 term's, counted once."""
    model, loss_fn, x, y = _data("mean + L2")
    result = hessrank.effective_rank(model, loss_fn, _batches(x, y), "exact")
    data_term = reference_hessian(model, nn.CrossEntropyLoss(), x, y)
    l2_term = 2 * 0.05 * np.eye(len(data_term))  # the Hessian of 0.05 ||theta||^2
    reference = eigenvalues_by_magnitude(data_term + l2_term)
    assert_spectra_close(result.eigenvalues, reference, rtol=1e-7)


def test_shuffled_loader_is_one_fixed_draw_and_leaves_generators_alone():
    model, loss_fn, x, y = _data("class weights")
    generator = torch.Generator().manual_seed(3)
    loader = DataLoader(TensorDataset(x, y), batch_size=5, shuffle=True, generator=generator)
    states = (generator.get_state(), torch.get_rng_state(), np.random.get_state()[1].copy(),
              random.getstate())
    whole = hessrank.effective_rank(model, loss_fn, (x, y), "lanczos")
    streamed = hessrank.effective_rank(model, loss_fn, loader, "lanczos")
    assert streamed.ranks["srank"] == pytest.approx(whole.ranks["srank"], rel=1e-6)
    assert streamed.trace == pytest.approx(whole.trace, rel=1e-8)
    assert torch.equal(generator.get_state(), states[0])
    assert torch.equal(torch.get_rng_state(), states[1])
    assert np.array_equal(np.random.get_state()[1], states[2])
    assert random.getstate() == states[3]


class _OwnRandomSampler(torch.utils.data.Sampler):
    """A sampler that shuffles with a random generator of its own kind (``kind``)."""

    def __init__(self, count: int, kind: str) -> None:
        self.count = count
        self.rng = {"numpy RandomState": np.random.RandomState(0),
                    "numpy Generator": np.random.default_rng(0),
                    "random.Random": random.Random(0),
                    "random.SystemRandom": random.SystemRandom()}[kind]

    def __iter__(self):
        if isinstance(self.rng, random.Random):
            order = list(range(self.count))
            self.rng.shuffle(order)
            return iter(order)
        return iter(self.rng.permutation(self.count).tolist())

    def __len__(self) -> int:
        return self.count


@pytest.mark.parametrize("kind", ["numpy RandomState", "numpy Generator", "random.Random"])
def test_a_sampler_s_own_generator_is_one_draw_and_left_as_found(kind):
    """A sampler shuffling with its own numpy or Python generator: each pass drew another
    order (refused as data that change between passes), and the sampler's generator was left
    advanced, so the caller's next epoch changed (probe 57)."""
    model, loss_fn, x, y = _data("class weights")

    def loader() -> DataLoader:
        return DataLoader(TensorDataset(x, y), batch_size=5, sampler=_OwnRandomSampler(16, kind))

    untouched, analysed = loader(), loader()
    whole = hessrank.effective_rank(model, loss_fn, (x, y), "lanczos")
    streamed = hessrank.effective_rank(model, loss_fn, analysed, "lanczos")
    assert streamed.trace == pytest.approx(whole.trace, rel=1e-8)
    for _ in range(2):  # the caller's next epochs, as without the call
        assert [b[1].tolist() for b in analysed] == [b[1].tolist() for b in untouched]


class _EpochSampler(torch.utils.data.Sampler):
    """A sampler that shuffles by an epoch it counts itself, in ``__iter__``."""

    def __init__(self, count: int) -> None:
        self.count, self.epoch = count, 0

    def __iter__(self):
        order = torch.randperm(self.count, generator=torch.Generator().manual_seed(self.epoch))
        self.epoch += 1
        return iter(order.tolist())

    def __len__(self) -> int:
        return self.count


def test_a_sampler_s_own_epoch_count_is_left_as_found():
    """Each pass counted an epoch of the sampler: every pass drew another order (refused as
    changing data) and the caller's epoch was left advanced by the call's passes (probe 101)."""
    model, loss_fn, x, y = _data("class weights")

    def loader() -> DataLoader:
        return DataLoader(TensorDataset(x, y), batch_size=5, sampler=_EpochSampler(16))

    untouched, analysed = loader(), loader()
    for data in (untouched, analysed):
        next(iter(data))  # the caller's first epoch
    whole = hessrank.effective_rank(model, loss_fn, (x, y), "fisher")
    streamed = hessrank.effective_rank(model, loss_fn, analysed, "fisher")
    np.testing.assert_allclose(streamed.eigenvalues, whole.eigenvalues, rtol=1e-9,
                               atol=1e-12 * whole.top_eigenvalue)
    assert analysed.sampler.epoch == untouched.sampler.epoch == 1
    for _ in range(2):  # the caller's next epochs, as without the call
        assert [b[1].tolist() for b in analysed] == [b[1].tolist() for b in untouched]


class _OwnJitter(torch.utils.data.Dataset):
    """Inputs jittered by a generator the data set holds (augmentation)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, scale: float) -> None:
        self.x, self.y, self.scale = x, y, scale
        self.rng = np.random.default_rng(0)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int):
        return self.x[index] + self.scale * float(self.rng.normal()), self.y[index]


class _MixCollate:
    """A collate object drawing a mixing weight from its own generator for every batch."""

    def __init__(self) -> None:
        self.generator = torch.Generator().manual_seed(0)

    def __call__(self, items):
        weight = torch.rand((), generator=self.generator, dtype=torch.float64)
        return torch.stack([x for x, _ in items]) * (1 + 0.1 * weight), torch.stack(
            [y for _, y in items])


class _EpochIterable(torch.utils.data.IterableDataset):
    """Shuffles by an epoch it counts itself, in ``__iter__``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y, self.epoch = x, y, 0

    def __iter__(self):
        order = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(self.epoch))
        self.epoch += 1
        return iter([(self.x[i], self.y[i]) for i in order])


class _Jitter:
    """A transform jittering by a generator it holds (torchvision's style of augmentation)."""

    def __init__(self) -> None:
        self.generator = torch.Generator().manual_seed(0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.1 * torch.randn(x.shape, generator=self.generator, dtype=x.dtype)


class _Compose:
    """Transforms applied in turn, held in a list (as ``torchvision.transforms.Compose``)."""

    def __init__(self, transforms: list) -> None:
        self.transforms = transforms

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for transform in self.transforms:
            x = transform(x)
        return x


class _Transformed(Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor, transform) -> None:
        self.x, self.y, self.transform = x, y, transform

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int):
        return self.transform(self.x[index]), self.y[index]


def _jittering(generator: torch.Generator):
    """A transform (a plain function) jittering by the generator its closure holds."""
    return lambda x: x + 0.1 * torch.randn(x.shape, generator=generator, dtype=x.dtype)


def _mix_collate(items, generator: torch.Generator):
    weight = torch.rand((), generator=generator, dtype=torch.float64)
    return torch.stack([x for x, _ in items]) * (1 + 0.1 * weight), torch.stack(
        [y for _, y in items])


class _CachedFromOneShot(Dataset):
    """Reads each sample once from a one-shot source (a stream), into a dict it keeps."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.source, self.size, self.cache = iter(list(zip(x, y))), len(x), {}

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        if index not in self.cache:
            self.cache[index] = next(self.source)
        return self.cache[index]


class _LazyHandle:
    """A handle that forwards every attribute to the file it opens lazily (none yet)."""

    __slots__ = ("target",)

    def __getattr__(self, name: str):
        return getattr(self.target, name)


def test_a_data_set_holding_a_forwarding_handle_is_searched_without_its_getattr():
    """The search for generators below a data set reads an object's own ``__dict__``: asked
    through ``hasattr``, a forwarding handle without its target recursed without end (probe
    235)."""
    model, loss_fn, x, y = _data("class weights")
    data = TensorDataset(x, y)
    data.handle = _LazyHandle()
    streamed = hessrank.effective_rank(model, loss_fn, DataLoader(data, batch_size=5), "exact")
    whole = hessrank.effective_rank(model, loss_fn, (x, y), "exact")
    assert_spectra_close(streamed.eigenvalues, whole.eigenvalues, rtol=1e-9)


def test_a_data_set_s_cache_of_a_one_shot_source_is_kept():
    """What a data set fills in place stays: put back after each pass, the cache of a
    one-shot source had been emptied, the next pass refused and the caller's data lost
    (probe 235)."""
    model, loss_fn, x, y = _data("class weights")
    data = _CachedFromOneShot(x, y)
    streamed = hessrank.effective_rank(model, loss_fn, DataLoader(data, batch_size=5), "exact")
    assert len(data.cache) == len(x)
    whole = hessrank.effective_rank(model, loss_fn, (x, y), "exact")
    assert_spectra_close(streamed.eigenvalues, whole.eigenvalues, rtol=1e-9)


_DATA_SET_STATE = {
    "data set's generator, jitter": lambda x, y: DataLoader(_OwnJitter(x, y, 0.1), batch_size=5),
    "a transform's generator in a composition": lambda x, y: DataLoader(
        _Transformed(x, y, _Compose([_Jitter()])), batch_size=5),
    # (a RandomApply in a Compose: three levels had missed it, refused every pass and left it
    # advanced; probe 241)
    "a transform's generator in a composition in a composition": lambda x, y: DataLoader(
        _Transformed(x, y, _Compose([_Compose([_Jitter()])])), batch_size=5),
    "a generator a transform's closure holds": lambda x, y: DataLoader(
        _Transformed(x, y, _jittering(torch.Generator().manual_seed(0))), batch_size=5),
    "a collate object's method bound by partial": lambda x, y: DataLoader(
        TensorDataset(x, y), batch_size=5, collate_fn=functools.partial(_MixCollate().__call__)),
    "a collate function's generator bound by partial": lambda x, y: DataLoader(
        TensorDataset(x, y), batch_size=5, collate_fn=functools.partial(
            _mix_collate, generator=torch.Generator().manual_seed(0))),
    "a wrapped data set's generator": lambda x, y: DataLoader(
        torch.utils.data.Subset(_OwnJitter(x, y, 0.1), range(16)), batch_size=5),
    "collate object's generator": lambda x, y: DataLoader(
        TensorDataset(x, y), batch_size=5, collate_fn=_MixCollate()),
    "IterableDataset's epoch": lambda x, y: DataLoader(_EpochIterable(x, y), batch_size=5),
}


@pytest.mark.parametrize("method", ["fisher", "lanczos"])
@pytest.mark.parametrize("case", list(_DATA_SET_STATE))
def test_a_data_set_s_own_state_is_one_draw_and_left_as_found(case, method):
    """A data set (or one it wraps) or a collate object with random state of its own: every
    pass starts from the state the call found, so the passes agree (jitter had been refused as
    data that change between passes) and the caller's next epochs are those it would have had
    without the call (the passes had left the generator advanced, the epoch counted; probe
    109; a generator held deeper, by a data set's transform or bound to a collate function,
    had been left as the passes left it, probe 232)."""
    model, loss_fn, x, y = _data("class weights")
    untouched, analysed = (_DATA_SET_STATE[case](x, y) for _ in range(2))
    hessrank.effective_rank(model, loss_fn, analysed, method, lanczos_steps=8)
    for _ in range(2):  # the caller's next epochs, as without the call
        for ours, theirs in zip(analysed, untouched, strict=True):
            assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))


def test_persistent_workers_the_call_started_are_stopped():
    """DataLoader(persistent_workers=True): the call's passes started the workers, so the
    caller's next iter() restarted them, which draws other seeds than a first start: the next
    epochs came in another order (probe 57)."""
    model, loss_fn, x, y = _data("class weights")

    def epochs(loader: DataLoader) -> list[list[int]]:
        return [torch.cat([b[1] for b in loader]).tolist() for _ in range(2)]

    def loader() -> DataLoader:
        return DataLoader(TensorDataset(x, y), batch_size=5, shuffle=True, num_workers=1,
                          persistent_workers=True)

    torch.manual_seed(123)
    expected = epochs(loader())
    torch.manual_seed(123)
    analysed = loader()
    hessrank.effective_rank(model, loss_fn, analysed, "fisher")
    assert analysed._iterator is None
    assert epochs(analysed) == expected


class _Jittered(Dataset):
    """Inputs with noise drawn at every read (a random transform): in a worker, from the
    worker's generator."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int):
        return self.x[index] + 0.01 * torch.randn(self.x.shape[1:]), self.y[index]


@pytest.mark.parametrize("when", ["between epochs", "mid-epoch"])
def test_persistent_workers_the_caller_started_are_left_alone(when):
    """Workers the caller started are not the call's to use: its passes reset the caller's
    epoch and advanced the workers' generators, which live in their processes, so a refused
    call (a random transform in the workers) changed the caller's next epochs (probe 96). The
    call passes over a copy of the loader with workers of its own, started afresh by each pass
    (workers that persisted between its passes drew on, and the data were refused as changing;
    probe 137)."""
    model, loss_fn, x, y = _data("class weights")

    def run(call: bool) -> list[torch.Tensor]:
        torch.manual_seed(123)
        loader = DataLoader(_Jittered(x, y), batch_size=5, shuffle=True, num_workers=1,
                            persistent_workers=True)
        seen = []
        batches = iter(loader)
        seen.append(next(batches)[0])
        if when == "between epochs":
            seen.extend(b[0] for b in batches)
        workers = loader._iterator
        if call:
            assert hessrank.effective_rank(model, loss_fn, loader, "fisher").rank > 0
            assert loader._iterator is workers and loader.persistent_workers
        if when == "mid-epoch":
            seen.extend(b[0] for b in batches)  # the rest of the caller's epoch
        for _ in range(2):
            seen.extend(b[0] for b in loader)
        return seen

    expected, found = run(call=False), run(call=True)
    assert len(found) == len(expected)
    assert all(torch.equal(a, b) for a, b in zip(found, expected))


class _OnDevice:
    """A class wrapping a loader to move its batches (the usual ``DeviceLoader``)."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for inputs, targets in self.loader:
            yield inputs.to("cpu"), targets.to("cpu")


def test_a_loader_inside_a_wrapper_is_one_draw_and_its_workers_left_alone():
    """A class wrapping a loader had its loader unseen: the call's passes used the caller's
    persistent workers and ended the caller's epoch (17 of 21 samples lost to the loop), and a
    shuffle of its own generator was refused as changing data, the generator left advanced
    (probe 215). Handled as the loader given directly is."""
    model, loss_fn, x, y = _data("class weights")

    def run(call: bool) -> list[torch.Tensor]:
        torch.manual_seed(123)
        loader = DataLoader(_Jittered(x, y), batch_size=5, shuffle=True, num_workers=1,
                            persistent_workers=True)
        wrapped = _OnDevice(loader)
        batches = iter(wrapped)
        seen = [next(batches)[0]]
        if call:
            assert hessrank.effective_rank(model, loss_fn, wrapped, "fisher").rank > 0
        seen.extend(b[0] for b in batches)  # the rest of the caller's epoch
        return seen

    expected, found = run(call=False), run(call=True)
    assert len(found) == len(expected)
    assert all(torch.equal(a, b) for a, b in zip(found, expected))
    generator = torch.Generator().manual_seed(7)
    wrapped = _OnDevice(DataLoader(TensorDataset(x, y), batch_size=5, shuffle=True,
                                   generator=generator))
    state = generator.get_state()
    streamed = hessrank.effective_rank(model, loss_fn, wrapped, "exact")
    assert torch.equal(generator.get_state(), state)
    whole = hessrank.effective_rank(model, loss_fn, (x, y), "exact")
    assert_spectra_close(streamed.eigenvalues, whole.eigenvalues, rtol=1e-9)


class _EpochShuffled:
    """Batches of its own, shuffled anew in each epoch it counts (a bucketing iterator)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y, self.epoch = x, y, 0

    def __iter__(self):
        order = torch.randperm(len(self.y), generator=torch.Generator().manual_seed(self.epoch))
        self.epoch += 1
        for start in range(0, len(self.y), 5):
            yield self.x[order[start:start + 5]], self.y[order[start:start + 5]]


class _CachedStream:
    """Batches read once from a one-shot stream into a cache, on first use."""

    def __init__(self, batches) -> None:
        self.stream, self.items = iter(batches), None

    def __iter__(self):
        if self.items is None:
            self.items = list(self.stream)
        return iter(self.items)


def test_a_re_iterable_that_caches_its_batches_keeps_them():
    """Its attributes put back after a pass had emptied the cache the pass filled, its stream
    spent: the data set was refused as empty and the caller's data lost (probe 217). Only the
    numbers it holds are put back."""
    model, loss_fn, x, y = _data("class weights")
    data = _CachedStream(_batches(x, y))
    streamed = hessrank.effective_rank(model, loss_fn, data, "exact")
    assert len(list(data)) == len(SIZES)
    whole = hessrank.effective_rank(model, loss_fn, (x, y), "exact")
    assert_spectra_close(streamed.eigenvalues, whole.eigenvalues, rtol=1e-9)


def test_a_re_iterable_of_its_own_is_one_draw_and_its_epoch_left_as_found():
    """A re-iterable (not a DataLoader) that counts its epochs had been refused as changing
    data, its count left at 3 (probe 215): its attributes are put back after every pass."""
    model, loss_fn, x, y = _data("class weights")
    data = _EpochShuffled(x, y)
    streamed = hessrank.effective_rank(model, loss_fn, data, "exact")
    assert data.epoch == 0
    whole = hessrank.effective_rank(model, loss_fn, (x, y), "exact")
    assert_spectra_close(streamed.eigenvalues, whole.eigenvalues, rtol=1e-9)


class _Drifting(Dataset):
    """A data set whose samples change every time they are read, so no two passes agree: its
    reads counted by an iterator (a source hessrank cannot reset; a count in an attribute is
    set back after every pass)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, drift: float) -> None:
        self.x, self.y, self.drift, self.reads = x, y, drift, itertools.count(1)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int):
        reads = next(self.reads)
        return self.x[index] * (1 + self.drift * (reads // len(self.y))), self.y[index]


@pytest.mark.parametrize("method", ["lanczos", "exact", "fisher", "ggn", "fisher_lanczos"])
@pytest.mark.parametrize("drift", [0.01, 1e-6], ids=["1 %", "1e-6"])
def test_data_that_changes_between_passes_is_refused(method, drift):
    """Every pass is checked batch by batch against the first: before, fisher and ggn (which
    concatenate the batches in a second pass) took changed data, and exact a drift within its
    loss tolerance."""
    model, loss_fn, x, y = _data("mean")
    loader = DataLoader(_Drifting(x, y, drift), batch_size=6)
    with pytest.raises(ValueError, match="data changed between passes.*batch 0 differs"):
        hessrank.effective_rank(model, loss_fn, loader, method, lanczos_steps=10)


class _Moving(_Drifting):
    """``_Drifting`` whose data move on every other pass, each batch's sums and count kept:
    its samples flipped (``"flip"``), the one-hot targets of its first two samples exchanged
    (``"labels"``), or its two inputs exchanged (``"inputs"``)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, move: str) -> None:
        super().__init__(x, y, 0.0)
        self.move = move

    def __getitem__(self, index: int):
        moved = (next(self.reads) - 1) // len(self.y) % 2
        x, y = self.x[index], self.y[index]
        if self.move == "flip":
            return (x.flip(0) if moved else x), y
        if self.move == "labels":
            return x, self.y[1 - index if moved and index < 2 else index]
        return ((x.flip(0), x) if moved else (x, x.flip(0))), y


class _TwoInputs(nn.Module):
    """Takes ``(a, b)``, each in its own role."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.model(a - 0.5 * b)


@pytest.mark.parametrize("method", ["exact", "fisher", "ggn"])
@pytest.mark.parametrize("move", ["flip", "labels", "inputs"])
def test_data_that_move_within_a_batch_between_passes_are_refused(method, move):
    """A pass's fingerprint weighs each entry by its place, not linearly in it, and keeps
    each input's own: sums alone had taken a random flip for the first pass's data (probe
    232), weights linear in the place one-hot labels exchanged between samples, and sums over
    the inputs two inputs exchanged (probe 235); fisher and ggn had analysed a later pass's
    data."""
    model, loss_fn, x, y = _data("mse" if move == "labels" else "mean")
    if move == "labels":
        y[0], y[1] = nn.functional.one_hot(torch.tensor([0, 1]), 3).double()
    loader = DataLoader(_Moving(x, y, move), batch_size=6)
    with pytest.raises(ValueError, match="data changed between passes.*batch 0 differs"):
        hessrank.effective_rank(_TwoInputs(model) if move == "inputs" else model, loss_fn,
                                loader, method)


class _MaskedDrifting(_Drifting):
    """``_Drifting`` with an additive mask beside each input (``-inf`` at its last feature),
    which the model takes and leaves unused."""

    def __getitem__(self, index: int):
        x, y = super().__getitem__(index)
        mask = torch.zeros_like(x)
        mask[-1] = float("-inf")
        return (x, mask), y


class _TakesMask(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model(x)


@pytest.mark.parametrize("method", ["fisher", "ggn"])
def test_data_that_changes_beside_an_infinite_mask_is_refused(method):
    """An input's ``-inf`` (an additive mask's) made the sum that tells passes apart ``-inf``
    on every pass, so fisher and ggn, which compare the passes by it alone, took changed data
    (probe 101)."""
    model, loss_fn, x, y = _data("mean")
    loader = DataLoader(_MaskedDrifting(x, y, 0.01), batch_size=6)
    with pytest.raises(ValueError, match="data changed between passes.*batch 0 differs"):
        hessrank.effective_rank(_TakesMask(model), loss_fn, loader, method)


class _Missing(Dataset):
    """Regression data with missing (NaN) inputs and targets; on later passes ``what`` changes
    (the targets by 1 %, or a zero input becoming missing), so no two passes agree."""

    def __init__(self, what: str) -> None:
        x, y = classification_batch(12, 4, 3)
        self.x, self.y = x.clone(), nn.functional.one_hot(y, 3).double()
        self.x[::3, 1] = float("nan")
        self.x[1, 2] = 0.0
        self.y[::4, 0] = float("nan")
        self.what, self.reads = what, itertools.count(0)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int):
        later = next(self.reads) >= len(self.y)
        x, y = self.x[index].clone(), self.y[index].clone()
        if later and self.what == "targets":
            y *= 1.01
        if later and self.what == "inputs" and index == 1:
            x[2] = float("nan")
        return x, y


class _Imputing(nn.Module):
    """An MLP on inputs whose NaN entries (missing values) it replaces by zeros."""

    def __init__(self) -> None:
        super().__init__()
        self.model = mlp((4, 6, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(torch.where(x.isnan(), 0.0, x))


def _masked_mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    seen = ~targets.isnan()
    return ((outputs - targets.nan_to_num()) ** 2 * seen).sum() / seen.sum()


@pytest.mark.parametrize("method", ["exact", "fisher", "ggn"])
def test_a_data_set_with_missing_values(method):
    """NaN inputs the model replaces and NaN targets the loss masks are taken (a data set as
    its concatenated batch); data whose NaN entries or targets change between passes are
    refused: a NaN made the sums that tell passes apart NaN on every pass."""
    fixed = _Missing("none")
    batch = (fixed.x, fixed.y)
    streamed = hessrank.effective_rank(_Imputing(), _masked_mse,
                                       DataLoader(fixed, batch_size=5), method)
    whole = hessrank.effective_rank(_Imputing(), _masked_mse, batch, method)
    np.testing.assert_allclose(streamed.eigenvalues, whole.eigenvalues, rtol=1e-9,
                               atol=1e-12 * abs(whole.eigenvalues[0]))
    for what in ("targets", "inputs"):
        with pytest.raises(ValueError, match="data changed between passes"):
            hessrank.effective_rank(_Imputing(), _masked_mse,
                                    DataLoader(_Missing(what), batch_size=5), method)


def _coupled(outputs, targets):
    """Cross-entropy minus the batch's mean logit squared: samples interact."""
    return nn.functional.cross_entropy(outputs, targets) + outputs.mean().pow(2)


def _as_generator(x, y):
    return ((xb, yb) for xb, yb in _batches(x, y))


#: (what, loss, data(x, y), method, error, message)
BAD_DATA = [
    ("one-shot generator", "mean", _as_generator, "exact", TypeError, "one-shot iterator"),
    ("batch not a pair", "mean", lambda x, y: [(x[:5], y[:5]), (x[5:],)], "exact", TypeError,
     "batch 1 of the data.*pair"),
    ("bad batch", "mean", lambda x, y: [(x[:5], y[:5]), (x[5:9], y[5:8])], "exact", ValueError,
     "batch 1 of the data: mismatched batch sizes"),
    ("empty", "mean", lambda x, y: [], "exact", ValueError, "no batch"),
    # a second batch the model or the loss fails on is named (probe 133: read as one batch)
    ("a second batch of another width", "mean",
     lambda x, y: [(x[:5], y[:5]), (torch.cat([x[5:], x[5:]], 1), y[5:])], "lanczos",
     RuntimeError, r"batch 1 of the data \(the batches before it passed\): mat1 and mat2"),
    # (a first batch with a NaN loss, weighed once a later one had begun, had been named
    # after that later one)
    ("a first batch whose loss is NaN", "mean",
     lambda x, y: [(x[:5] * torch.tensor([[float("nan")], *[[1.0]] * 4]), y[:5]),
                   (x[5:], y[5:])], "fisher", ValueError,
     r"^the loss is nan.*inputs\[0\] holds nan at \[0, 0\] \(4 entries\), likely the cause"),
    ("a second batch's class out of range", "mean",
     lambda x, y: [(x[:5], y[:5]), (x[5:], y[5:] + 3)], "exact", IndexError,
     r"batch 1 of the data \(the batches before it passed\): loss_fn\(outputs, targets\) "
     "failed"),
    ("a second batch's targets of another dtype", "mean",
     lambda x, y: [(x[:5], y[:5]), (x[5:], y[5:].int())], "fisher", RuntimeError,
     r"batch 1 of the data \(the batches before it passed\): loss_fn"),
    ("coupled loss", "coupled", _batches, "exact", ValueError, "does not add up over batches"),
    # a log-sum-exp of the samples' losses: its gradient on a batch is a multiple of the
    # batch's own, and a data set of it was analysed as a weighted mean (probe 128); also with
    # a first batch of one sample, or of one class (probe 130: a first version, which moved
    # the first batch's rows, saw nothing there)
    *((f"log-sum-exp of the losses, {method}", "log-sum-exp", _batches, method, ValueError,
       "its second derivatives couple the first batch with a copy of itself")
      for method in ("exact", "lanczos", "ggn")),
    ("log-sum-exp, a first batch of one sample", "log-sum-exp",
     lambda x, y: list(zip(x.split([1, 7, 8]), y.split([1, 7, 8]))), "exact", ValueError,
     "its second derivatives couple"),
    ("log-sum-exp, a first batch of one class", "log-sum-exp",
     lambda x, y: list(zip(x.split(SIZES), torch.cat([torch.zeros(5, dtype=y.dtype),
                                                       y[5:]]).split(SIZES))),
     "exact", ValueError, "its second derivatives couple"),
    ("sum with an L2 term", "sum + L2", _batches, "lanczos", ValueError,
     "once per batch.*mean reduction"),
    ("Gram over budget", "mean", _batches, "fisher", hessrank.BudgetError,
     "fisher_lanczos.*streams"),
]


@pytest.mark.parametrize(("what", "loss", "data", "method", "error", "message"), BAD_DATA,
                         ids=[case[0] for case in BAD_DATA])
def test_bad_data_is_refused_with_the_fix(what, loss, data, method, error, message):
    model, _, x, y = _data("mean")
    loss_fn = {"mean": nn.CrossEntropyLoss(), "coupled": _coupled,
               "log-sum-exp": lambda f, t: torch.logsumexp(
                   nn.functional.cross_entropy(f, t, reduction="none"), 0),
               "sum + L2": lambda f, t: nn.functional.cross_entropy(f, t, reduction="sum")
               + sum(p.pow(2).sum() for p in model.parameters())}[loss]
    before = [p.detach().clone() for p in model.parameters()]
    budget = {"max_memory": 1000} if error is hessrank.BudgetError else {}
    with pytest.raises(error, match=message):
        hessrank.effective_rank(model, loss_fn, data(x, y), method, **budget)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def _mean_over_the_misclassified(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    mask = (outputs.argmax(1) != targets).to(outputs.dtype)
    return (nn.functional.cross_entropy(outputs, targets, reduction="none") * mask).sum() / (
        mask.sum())


def _over_its_detached_total(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    losses = nn.functional.cross_entropy(outputs, targets, reduction="none")
    return losses.sum() / losses.sum().detach()


@pytest.mark.parametrize("loss_fn", [_mean_over_the_misclassified, _over_its_detached_total],
                         ids=["mean over the misclassified", "over its detached total"])
@pytest.mark.parametrize("method", ["exact", "lanczos"])
def test_weights_the_outputs_choose_without_a_derivative_are_a_data_set_s(loss_fn, method):
    """A mean over the samples an argmax picks, or a loss over its own total taken detached:
    the weights depend on the outputs, but through nothing autograd differentiates, so the
    curvature is the batches' weighted sum, as read. A first check of the weights with the
    first batch's rows moved refused them (probe 130); the second derivatives across batches
    are zero, and they pass."""
    model, _, x, y = _data("mean")
    streamed = hessrank.effective_rank(model, loss_fn, _batches(x, y), method, seed=1)
    whole = hessrank.effective_rank(model, loss_fn, (x, y), method, seed=1)
    assert streamed.trace == pytest.approx(whole.trace, rel=1e-9)
    assert_spectra_close(streamed.eigenvalues, whole.eigenvalues, 12, rtol=1e-9)


def _masked_mean(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The mean cross-entropy over targets other than 2, and a constant without a graph
    (``outputs.new_zeros(())``) where there is none, as hand-written masked losses do."""
    kept = targets != 2
    if not bool(kept.any()):
        return outputs.new_zeros(())
    return nn.functional.cross_entropy(outputs[kept], targets[kept])


@pytest.mark.parametrize("batch", [1, 0], ids=["second batch", "first batch"])
@pytest.mark.parametrize("masked", [False, True], ids=["ignore_index", "masked constant"])
@pytest.mark.parametrize("method", ["exact", "ggn", "fisher"])
def test_a_batch_whose_targets_are_all_ignored_adds_nothing(method, masked, batch):
    """A batch with every target ignored has a NaN mean loss of its own (or a constant without a
    graph), and no gradient or curvature; the data set's loss (the mean over the targets not
    ignored) is finite. Streamed == the concatenated batch; a note names the NaN batch left out
    (before: refused as a NaN loss; the constant, by autograd's 'does not require grad'). The
    first batch too: how the data set's loss weighs its batches is read off the first batch
    that has a finite loss and a gradient (it was refused as a NaN loss)."""
    model, loss_fn, x, y = _data("ignore_index")
    if masked:
        loss_fn = _masked_mean
    y = y.clone()
    start = sum(SIZES[:batch])
    y[start:start + SIZES[batch]] = 2  # every target of that batch is ignore_index
    streamed = hessrank.effective_rank(model, loss_fn, _batches(x, y), method)
    whole = hessrank.effective_rank(model, loss_fn, (x, y), method)
    # the NaN loss is left out, and said so; the constant is a term of zero
    assert masked or any(f"batch {batch} adds nothing" in note for note in streamed.notes)
    assert streamed.trace == pytest.approx(whole.trace, rel=1e-9)
    assert_spectra_close(streamed.eigenvalues, whole.eigenvalues, 12, rtol=1e-9)


def _weighted_mean(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy weighted by the targets' second column, normalised by the weights' sum
    (README's recipe for per-sample weights carried in the targets)."""
    weights = targets[:, 1].to(outputs.dtype)
    losses = nn.functional.cross_entropy(outputs, targets[:, 0].long(), reduction="none")
    return (weights * losses).sum() / weights.sum()


@pytest.mark.parametrize("method", ["exact", "fisher", "ggn_lanczos"])
def test_a_batch_whose_weights_are_all_zero_adds_nothing(method):
    """Per-sample weights in the targets, a batch's all zero: its own loss is 0/0, whose NaN
    curvature had been taken for a curved loss without a share of the data set's, and the data
    set refused (probe 215). Judged next to another batch it has none: streamed == the
    concatenated batch."""
    model, _, x, y = _data("mean")
    weights = torch.rand(len(y), generator=torch.Generator().manual_seed(3),
                         dtype=torch.float64) + 0.5
    weights[SIZES[0]:SIZES[0] + SIZES[1]] = 0.0
    targets = torch.stack([y.double(), weights], 1)
    streamed = hessrank.effective_rank(model, _weighted_mean, _batches(x, targets), method,
                                       **({"lanczos_steps": 40} if "lanczos" in method else {}))
    whole = hessrank.effective_rank(model, _weighted_mean, (x, targets), method,
                                    **({"lanczos_steps": 40} if "lanczos" in method else {}))
    assert any("batch 1 adds nothing" in note for note in streamed.notes), streamed.notes
    ours, theirs = (result.eigenvalues if result.density is None else result.density[0]
                    for result in (streamed, whole))
    assert_spectra_close(ours, theirs, min(len(ours), len(theirs), 8), rtol=1e-8)


@pytest.mark.parametrize(("margin", "split", "method", "dtype"), [
    (45.0, [2, 2, 9], "ggn", torch.float32), (100.0, [5, 5, 3], "ggn", torch.float32),
    (100.0, [2, 2, 9], "exact", torch.float32), (45.0, [5, 5, 3], "exact", torch.float32),
    (20.0, [1, 4, 8], "exact", torch.float64)])
def test_batches_at_the_subnormal_floor_keep_their_weights(margin, split, method, dtype):
    """A memorised classifier's batches whose loss gradients sit at the bottom of the dtype's
    range: repeated, a float32 batch's pair gradient rounded to zero or to a ratio of its own,
    and the data set was refused as one whose loss weighs the first batch by 0 (or 0.56) when
    repeated; a float64 batch's gradients of 2e-273 had squares of zero, and it was said to
    have no gradient alone; a float32 batch at the subnormal floor alone had Hessian products
    7e-4 off symmetric, and was refused as a wrong second derivative. Now the data set is the
    concatenated batch (probe 128)."""
    model, loss_fn, x, y = _memorised_float32(3, torch.float64, margin, seed=1 if dtype ==
                                              torch.float32 else 0, dtype=dtype)
    whole = hessrank.effective_rank(model, loss_fn, (x, y), method)
    streamed = hessrank.effective_rank(model, loss_fn, list(zip(x.split(split), y.split(split))),
                                       method)
    assert streamed.top_eigenvalue == pytest.approx(whole.top_eigenvalue, rel=1e-4)
    assert streamed.ranks["srank"] == whole.ranks["srank"]


def test_a_data_set_saturated_everywhere_in_float32_names_the_float64_copy():
    """Every float32 loss gradient exactly zero (every margin 150): how the batches add up
    cannot be read, and the refusal had named only ignored targets and detached losses; it
    names the saturation and the float64 copy, which works (probe 128)."""
    model, loss_fn, x, y = _memorised_float32(3, torch.float64, margin=150.0)
    batches = list(zip(x.split(5), y.split(5)))
    with pytest.raises(ValueError, match="saturated to a gradient of exactly zero in "
                                         "torch.float32.*float64 copy"):
        hessrank.effective_rank(model, loss_fn, batches, "exact")
    wide = hessrank.effective_rank(copy.deepcopy(model).double(), loss_fn,
                                   [(inputs.double(), labels) for inputs, labels in batches],
                                   "exact")
    assert wide.top_eigenvalue > 0


@pytest.mark.parametrize("batch", [1, 0], ids=["second batch", "first batch"])
@pytest.mark.parametrize("method", ["ggn_lanczos", "fisher_lanczos"])
def test_a_batch_whose_targets_are_all_ignored_adds_nothing_to_a_sum(method, batch):
    """Under a sum a batch whose every target is ignored has a loss of 0 and weighs 1:
    ggn_lanczos took its zero GGN for a linear loss's and refused the data set (a known gap of
    the README). It adds nothing now, as in the concatenated batch; a loss linear in the outputs
    of every batch is still refused."""
    model, _, x, y = _data("mean")
    loss_fn = nn.CrossEntropyLoss(ignore_index=2, reduction="sum")
    y = y.clone()
    start = sum(SIZES[:batch])
    y[start:start + SIZES[batch]] = 2
    streamed = hessrank.effective_rank(model, loss_fn, _batches(x, y), method)
    whole = hessrank.effective_rank(model, loss_fn, (x, y), method)
    assert streamed.trace == pytest.approx(whole.trace, rel=1e-9)
    assert_spectra_close(streamed.eigenvalues, whole.eigenvalues, 12, rtol=1e-9)
    if method == "ggn_lanczos":
        linear = nn.NLLLoss(reduction="sum")  # on the raw outputs: linear in them
        for data in ((x, y.clamp(max=1)), _batches(x, y.clamp(max=1))):
            with pytest.raises(ValueError, match="the loss is linear in the model's outputs"):
                hessrank.effective_rank(model, linear, data, method)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("method", ["exact", "lanczos"])
def test_a_batch_without_gradient_but_with_curvature(reduction, method):
    """Exact predictions under a squared error: batch 1's outputs have no loss gradient, but its
    curvature counts. A sum weighs it 1; a mean by its share, read off the first batch's
    coefficient next to it (``1 - alpha``): it was refused, and before that left out."""
    model, _, x, y = _data("mean")
    with torch.no_grad():
        targets = model(x) + torch.randn(len(x), 3, dtype=torch.float64)
        targets[5:12] = model(x[5:12])
    loss_fn = nn.MSELoss(reduction=reduction)
    streamed = hessrank.effective_rank(model, loss_fn, _batches(x, targets), method, seed=1)
    whole = hessrank.effective_rank(model, loss_fn, (x, targets), method, seed=1)
    assert_spectra_close(streamed.eigenvalues, whole.eigenvalues, 12, rtol=1e-9)
    assert streamed.trace == pytest.approx(whole.trace, rel=1e-9)


def test_a_flat_hinge_batch_keeps_its_share_of_the_mean():
    """A squared hinge loss whose last batch sits in its flat region (every margin above 1): no
    gradient and no curvature there, but its samples count in the mean's denominator. It was
    weighed 0, so every streamed eigenvalue came out 18 / 12 times too large."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1)).double()

    def squared_hinge(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return (torch.relu(1 - outputs[:, 0] * labels) ** 2).mean()

    x = torch.cat([torch.randn(12, 3, dtype=torch.float64),
                   100 * torch.randn(6, 3, dtype=torch.float64)])
    with torch.no_grad():
        labels = torch.cat([torch.randint(0, 2, (12,)).double() * 2 - 1,
                            torch.sign(model(x[12:])[:, 0])])
        assert bool((model(x[12:])[:, 0] * labels[12:] > 1).all())  # the flat region
    batches = list(zip(x.split(6), labels.split(6)))
    for method in ("exact", "lanczos"):
        streamed = hessrank.effective_rank(model, squared_hinge, batches, method, seed=1)
        whole = hessrank.effective_rank(model, squared_hinge, (x, labels), method, seed=1)
        assert_spectra_close(streamed.eigenvalues, whole.eigenvalues, 12, rtol=1e-9)


@pytest.mark.parametrize("first", [100, 9000])
def test_one_flat_sample_next_to_many_keeps_its_share(first):
    """A last batch of one sample in a squared hinge's flat region, next to a first batch of
    9000: its share 1 / 9001 was within the coefficients' agreement tolerance (1.2e-4 in
    float32) and counted as none, so the streamed eigenvalues came out (n + 1) / n too large."""
    torch.manual_seed(0)
    model = nn.Linear(2, 2)

    def squared_hinge(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        sign = 2 * labels.float() - 1
        return torch.relu(1 - sign * (outputs[:, 1] - outputs[:, 0])).pow(2).mean()

    x = torch.cat([torch.randn(first, 2), 100 * torch.randn(1, 2)])
    with torch.no_grad():
        outputs = model(x)
    y = torch.cat([torch.randint(0, 2, (first,)), (outputs[-1:, 1] > outputs[-1:, 0]).long()])
    streamed = hessrank.effective_rank(model, squared_hinge, [(x[:first], y[:first]),
                                                              (x[first:], y[first:])], "exact")
    whole = hessrank.effective_rank(model, squared_hinge, (x, y), "exact")
    assert streamed.eigenvalues[0] == pytest.approx(whole.eigenvalues[0], rel=1e-6)


def test_a_model_that_cuts_to_its_batch_is_not_taken_for_one_that_mixes():
    """Per-token outputs cut to the batch's longest sequence (each sample's tokens its own, the
    padding ignored by the loss): its halves' outputs differ in shape, and the mixed-samples
    check raised torch's own concatenation error."""
    torch.manual_seed(0)

    class Cut(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.out = nn.Embedding(9, 3), nn.Linear(3, 9)

        def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
            return self.out(self.embed(tokens[:, :int(lengths.max())]))

    def per_token(outputs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        cut = tokens[:, :outputs.shape[1]]
        return nn.functional.cross_entropy(outputs.reshape(-1, 9), cut.reshape(-1),
                                           ignore_index=0)

    lengths = torch.tensor([3, 3, 3, 3, 3, 6])
    batches = []
    for _ in range(2):
        tokens = torch.randint(1, 9, (6, 8))
        tokens[torch.arange(8)[None, :] >= lengths[:, None]] = 0
        batches.append(((tokens, lengths), tokens.clone()))
    model = Cut().double()
    streamed = hessrank.effective_rank(model, per_token, batches, "exact")
    assert streamed.num_samples == 12 and streamed.rank > 0


def test_a_loss_off_a_mean_by_one_sample_is_refused_in_float32():
    """``sum / (n + 1)`` over batches of 100: its coefficients are 0.5025, which the float32
    tolerance (1.2 %) took for a mean's 0.5, streaming a loss over ``N + B`` instead of
    ``N + 1``; the tolerance is now the coefficients' rounding."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    x, y = classification_batch(300, 4, 3, dtype=torch.float32)

    def almost_mean(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(outputs, targets, reduction="sum") / (len(targets) + 1)

    with pytest.raises(ValueError, match="weighs the first batch by 0.5025 and 0.5025"):
        hessrank.effective_rank(model, almost_mean, list(zip(x.split(100), y.split(100))),
                                "exact")


class _OverTheBatch(nn.Module):
    """A hidden layer centred over the batch by hand, and with ``standardise`` divided by its
    standard deviation over the batch: a model that mixes its samples."""

    def __init__(self, standardise: bool) -> None:
        super().__init__()
        self.first, self.last, self.standardise = nn.Linear(4, 6), nn.Linear(6, 3), standardise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.first(x)
        centred = hidden - hidden.mean(0)
        return self.last(torch.tanh(centred / (hidden.std(0) + 1e-3) if self.standardise
                                    else centred))


@pytest.mark.parametrize("method", ["exact", "lanczos", "fisher_lanczos"])
def test_a_model_that_mixes_its_batch_is_refused_on_a_data_set(method):
    """A hidden layer standardised over the batch by hand: each batch of a data set would be
    standardised on its own (the streamed top eigenvalue was 1.30 against 1.38, the rank 34
    against 36), which only BatchNorm modules were refused for."""
    torch.manual_seed(0)
    model = _OverTheBatch(standardise=True).double()
    x, y = classification_batch(sum(SIZES), 4, 3)
    with pytest.raises(ValueError, match="depends on the other samples of its batch.*each batch "
                                         "would be computed on its own"):
        hessrank.effective_rank(model, nn.CrossEntropyLoss(), _batches(x, y), method)


@pytest.mark.parametrize("method", ["exact", "fisher_lanczos"])
def test_a_model_that_mixes_its_batch_is_refused_on_batches_of_one_sample(method):
    """Batches of one sample have no halves to compare: a model that centres a layer over its
    batch was analysed one sample at a time, unchecked (probe 71). Two of them are joined to
    check it."""
    torch.manual_seed(0)
    model = _OverTheBatch(standardise=False).double()
    x, y = classification_batch(6, 4, 3)
    data = list(zip(x.split(1), y.split(1)))
    with pytest.raises(ValueError, match="depends on the other samples of its batch.*each batch "
                                         "would be computed on its own"):
        hessrank.effective_rank(model, nn.CrossEntropyLoss(), data, method)
    # a model that computes each sample alone runs on them
    plain = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    assert hessrank.effective_rank(plain, nn.CrossEntropyLoss(), data, method).rank > 0


class _LastState(nn.Module):
    """A GRU over sequences, its last state to a linear head; ``centred``: the states centred
    over the batch (a model that mixes its samples)."""

    def __init__(self, centred: bool = False) -> None:
        super().__init__()
        self.rnn, self.head, self.centred = nn.GRU(3, 5, batch_first=True), nn.Linear(5, 2), centred

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self.rnn(x)[0][:, -1]
        return self.head(state - state.mean(0) if self.centred else state)


def _sequences(lengths: list[int], per_batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    return [(torch.randn(per_batch, length, 3, dtype=torch.float64),
             torch.randint(0, 2, (per_batch,))) for length in lengths]


def test_batches_of_one_sample_that_cannot_be_joined_say_the_mixing_check_did_not_run():
    """Sequences of other lengths, one per batch: no two can be joined, and a model that
    centres over its batch ran unchecked and unnoted (probe 74). A note says so."""
    data = _sequences([4, 5, 6], 1)
    result = hessrank.effective_rank(_LastState(centred=True).double(), nn.CrossEntropyLoss(),
                                     data, "exact")
    assert any("could not check that the model computes each sample on its own" in note
               for note in result.notes)
    # batches that can be joined are checked, and say nothing
    plain = hessrank.effective_rank(_LastState().double(), nn.CrossEntropyLoss(),
                                    _sequences([4, 4, 4], 1), "exact")
    assert not any("could not check" in note for note in plain.notes)


@pytest.mark.parametrize("method", ["fisher", "ggn"])
def test_a_gram_method_names_batches_it_cannot_join(method):
    """fisher and ggn join a data set's batches into one: sequences of other lengths met
    torch's bare "Sizes of tensors must match" after the pass (probe 74)."""
    with pytest.raises(ValueError, match=f"method='{method}' joins a data set's batches into one"
                                         f".*pad them to one length, or use method='{method}"
                                         "_lanczos'"):
        hessrank.effective_rank(_LastState().double(), nn.CrossEntropyLoss(),
                                _sequences([4, 6], 3), method)
    lanczos = hessrank.effective_rank(_LastState().double(), nn.CrossEntropyLoss(),
                                      _sequences([4, 6], 3), f"{method}_lanczos")
    assert lanczos.rank > 0


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "channels_last",
                                    "samples past a block"])
def test_fingerprints_read_a_batch_in_views(layout):
    """A pass's fingerprint sums a batch a block of samples at a time, in views of it: a
    flattened view of a transposed or channels-last batch had copied it whole, and the
    targets' float64 copy had been made whole (probe 150); a sample larger than a block is
    read in views of its own rows (a 320^3 volume had been one block; probe 235)."""
    from hessrank.streaming import PRINT_BLOCK, _blocks

    batch = torch.randn(64, 3, 40, 40)
    if layout == "transposed":
        batch = torch.randn(40, 40, 3, 64).permute(3, 2, 1, 0)
    elif layout == "channels_last":
        batch = batch.contiguous(memory_format=torch.channels_last)
    elif layout == "samples past a block":
        batch = torch.randn(2, 3, 200, 300)
    blocks = _blocks(batch)
    assert all(block.untyped_storage().data_ptr() == batch.untyped_storage().data_ptr()
               for block in blocks)
    assert all(block.numel() <= PRINT_BLOCK for block in blocks)
    assert len(blocks) > 1 and torch.equal(torch.cat([block.reshape(-1) for block in blocks]),
                                           batch.reshape(-1))


@pytest.mark.parametrize("method", ["fisher", "ggn"])
def test_a_gram_method_joins_batches_of_other_dtypes_as_torch_cat_does(method):
    """The joined batch is filled batch by batch (not every batch held, then concatenated;
    probe 148), in the dtypes torch.cat promotes the batches' to: float32 targets beside
    float64 ones, an int32 mask beside an int64 one."""
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()

    class Masked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return self.inner(x) * mask.to(x.dtype)[:, None]

    x, y = torch.randn(12, 4, dtype=torch.float64), torch.randn(12, 2, dtype=torch.float64)
    mask = torch.ones(12, dtype=torch.int64)
    mask[3] = 0
    data = [((x[:6], mask[:6].int()), y[:6].float()), ((x[6:], mask[6:]), y[6:])]
    joined = ((x, torch.cat([mask[:6].int(), mask[6:]])), torch.cat([y[:6].float(), y[6:]]))
    result = hessrank.effective_rank(Masked(), nn.MSELoss(), data, method)
    expected = hessrank.effective_rank(Masked(), nn.MSELoss(), joined, method)
    np.testing.assert_allclose(result.eigenvalues, expected.eigenvalues, rtol=0,
                               atol=1e-13 * expected.top_eigenvalue)


def test_a_model_drawing_from_its_own_generator_is_refused_on_a_data_set_naming_it():
    """Per-sample noise from a ``torch.Generator`` the model holds: one batch is analysed at
    the draw its next forward would make (with a note), but each batch of a data set starts
    the generator again, so a sample's noise follows its position in its batch. The refusal
    named only batch statistics and attention (probe 61); it names the generator."""
    torch.manual_seed(0)

    class Noisy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first, self.last = nn.Linear(4, 6), nn.Linear(6, 3)
            self.noise = torch.Generator().manual_seed(11)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            hidden = self.first(x)
            noise = torch.randn(hidden.shape, generator=self.noise, dtype=hidden.dtype)
            return self.last(torch.tanh(hidden + 0.5 * noise))

    model = Noisy().double()
    x, y = classification_batch(sum(SIZES), 4, 3)
    assert any("own random generator (noise)" in note for note in hessrank.effective_rank(
        model, nn.CrossEntropyLoss(), (x, y), "exact").notes)
    with pytest.raises(ValueError, match=r"the draws of the model's own random generator \(noise\)"
                                         r", which every pass starts again"):
        hessrank.effective_rank(model, nn.CrossEntropyLoss(), _batches(x, y), "exact")


@pytest.mark.parametrize(("method", "bound"), [("ggn_lanczos", 15 * 2), ("fisher_lanczos", 15)])
def test_samples_the_loss_ignores_bound_the_rank_as_in_a_data_set(method: str, bound: int):
    """5 of 20 samples at ``ignore_index``: their factor columns are zero, so the rank is at
    most 15 C' (GGN, C' = 2) or 15 (EF). As a data set whose second batch holds them, the bound
    was that; as one batch it was 20 C' or 20, and so were the numerical rank and the default
    ``rtol`` (probe 61)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = classification_batch(20, 4, 3)
    y = y.clamp_min(1)
    y[5:10] = 0
    loss = nn.CrossEntropyLoss(ignore_index=0)
    whole = hessrank.effective_rank(model, loss, (x, y), method)
    streamed = hessrank.effective_rank(model, loss, list(zip(x.split(5), y.split(5))), method)
    assert whole.max_rank == streamed.max_rank == bound
    assert whole.rtol == streamed.rtol
    assert whole.ranks["numerical"] <= bound


def test_train_mode_batchnorm_is_refused_on_a_data_set():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)).double()
    x, y = classification_batch(16, 4, 3)
    with pytest.raises(ValueError, match="own statistics.*mode='eval'"):
        hessrank.effective_rank(model, nn.CrossEntropyLoss(), _batches(x, y), "exact",
                                mode="train")


def test_tracker_measures_a_fixed_data_set(tmp_path):
    model, loss_fn, x, y = _data("mean")
    tracker = hessrank.Tracker(model, loss_fn, methods=["exact"], every=1,
                               eval_batch=_batches(x, y), log=tmp_path / "log.jsonl")
    (measurement,) = tracker.step(step=0)
    whole = hessrank.effective_rank(model, loss_fn, (x, y), "exact")
    assert measurement.result.ranks["srank"] == whole.ranks["srank"]


class _Rescaled(nn.Module):
    """A linear head on inputs scaled down by 1e-308 (inputs near the float64 limit)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(4, 3).double()

    def forward(self, x):
        return self.linear(x * 1e-308)


def test_fixed_data_whose_sum_overflows_is_not_refused():
    """Finite inputs of +-1.5e308 sum to NaN in float64: a fixed list of batches was refused as
    changed data, NaN being unequal to itself."""
    x = torch.randn(8, 4, dtype=torch.float64)
    x[:, 0], x[:, 1] = 1.5e308, -1.5e308
    y = torch.arange(8) % 3
    streamed = hessrank.effective_rank(_Rescaled(), nn.CrossEntropyLoss(),
                                       [(x[:4], y[:4]), (x[4:], y[4:])], "exact")
    whole = hessrank.effective_rank(_Rescaled(), nn.CrossEntropyLoss(), (x, y), "exact")
    assert_spectra_close(streamed.eigenvalues, whole.eigenvalues, rtol=1e-9)


class _CountingBatches:
    """A re-iterable list of batches that records the batches it yields (in a list it holds:
    a count in an attribute is set back after every pass, as its own state)."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.batches, self.read = batches, []

    @property
    def yielded(self) -> int:
        return len(self.read)

    def __iter__(self):
        for index, batch in enumerate(self.batches):
            self.read.append(index)
            yield batch


@pytest.mark.parametrize("method", ["exact", "lanczos", "fisher"])
def test_a_budget_one_batch_exceeds_is_refused_before_the_pass_over_the_data(method):
    """An exact Hessian of 609 GiB was refused only after a pass over the whole loader (6.3 s
    and 3,100 samples read; probe 57). The first batch alone, read to validate the data, is
    predicted first: over the budget, nothing more is read."""
    model, loss_fn, x, y = _data("mean")
    data = _CountingBatches(_batches(x, y))
    with pytest.raises(hessrank.BudgetError, match=(  # and the unit (probe 133)
            r"on the data set's first batch alone.*or raise max_memory, in bytes \(4 GiB is")):
        hessrank.effective_rank(model, loss_fn, data, method, max_memory=100)
    assert data.yielded == 1
    # within the budget, the data set is read and measured as before
    result = hessrank.effective_rank(model, loss_fn, data, method, max_memory=2**30)
    assert result.num_samples == sum(SIZES)


class _CountingDataset(TensorDataset):
    """A data set that counts the samples read from it."""

    read = 0

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        type(self).read += 1
        return super().__getitem__(index)


class _CodedError(ValueError):
    """An error type of a user's own, whose constructor takes a code."""

    def __init__(self, code: int) -> None:
        super().__init__(f"failed with code {code}")
        self.code = code


def test_a_later_batch_s_own_error_keeps_its_type_and_payload():
    """A later batch's error of the user's own type had been rebuilt with the batch's name as
    its argument (its code the message; probe 134); Python's and torch's own errors are
    prefixed (test_bad_data_is_refused_with_the_fix)."""
    model, _, x, y = _data("mean")

    def loss_fn(outputs, targets):
        if len(targets) == 7:  # the third batch alone
            raise _CodedError(42)
        return nn.functional.cross_entropy(outputs, targets)

    data = [(x[:5], y[:5]), (x[5:9], y[5:9]), (x[9:], y[9:])]
    with pytest.raises(_CodedError) as raised:
        hessrank.effective_rank(model, loss_fn, data, "exact")
    assert raised.value.code == 42 and str(raised.value) == "failed with code 42"
    if sys.version_info >= (3, 11):
        *advice, where = raised.value.__notes__  # the loss's advice, then the batch
        assert where == "batch 2 of the data (the batches before it passed)"
        assert advice and advice[0].startswith("loss_fn(outputs, targets) failed on outputs")


class _EndlessDataset(Dataset):
    """A billion samples, from a pool of 256, counting those read."""

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(256, 4, generator=generator)
        self.y = torch.randint(0, 3, (256,), generator=generator)
        self.read = 0

    def __len__(self) -> int:
        return 10**9

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.read += 1
        return self.x[index % 256], self.y[index % 256]


@pytest.mark.parametrize("method", ["exact", "lanczos", "fisher_lanczos"])
def test_a_time_budget_the_announced_pass_exceeds_is_refused_before_it(method):
    """The methods that stream their batches predict their time from a pass over the data:
    with max_seconds, a loader announcing 10^9 samples was still being read after 100 s (probe
    133). The first pass alone, at least reading, running and scoring each batch as the first
    does, is predicted first: refused after three batches read."""
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    dataset = _EndlessDataset()
    loader = DataLoader(dataset, batch_size=64)
    with pytest.raises(hessrank.BudgetError, match=(
            f"the first pass of method='{method}' over the data set's 1,000,000,000 samples "
            r"\(at least reading each batch, its forward pass and its loss")):
        hessrank.effective_rank(model, nn.CrossEntropyLoss(), loader, method, max_seconds=60)
    assert dataset.read <= 3 * 64


class _EndlessStream(IterableDataset):
    """Samples without end and without a length (a stream), from a pool of 256; a test that
    would read a million of them fails instead of hanging."""

    def __init__(self) -> None:
        self.pool = _EndlessDataset()

    def __iter__(self):
        for index in range(10**6):
            yield self.pool[index]
        raise AssertionError("read a million samples of an endless stream")


@pytest.mark.parametrize("method", ["exact", "fisher"])
def test_a_time_budget_is_kept_over_a_data_set_without_a_length(method):
    """A loader that announces no length cannot be predicted before its first pass: that pass
    was refused only at its end, 90 times over the budget, and an endless one never ended
    (probe 215). The pass stops once the call runs past max_seconds."""
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    loader = DataLoader(_EndlessStream(), batch_size=8)
    with pytest.raises(hessrank.BudgetError, match=(
            f"the first pass of method='{method}' over a data set that announces no length "
            r"\(an IterableDataset or a generator\) has run .* over max_seconds = 1.5 s")):
        hessrank.effective_rank(model, nn.CrossEntropyLoss(), loader, method, max_seconds=1.5)


@pytest.mark.parametrize("drop_last", [False, True])
def test_a_budget_the_announced_data_set_exceeds_is_refused_before_the_pass(drop_last):
    """A fisher Gram over 20,000 samples (7.7 GiB) was refused only after a pass over all of
    them, though the loader said how many it holds (probe 71). Predicted at that count first:
    one batch read; a budget the announced data fits runs as before."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    dataset = _CountingDataset(torch.randn(2000, 4), torch.randint(0, 3, (2000,)))
    loader = DataLoader(dataset, batch_size=64, drop_last=drop_last)
    announced = 1984 if drop_last else 2000
    _CountingDataset.read = 0
    with pytest.raises(hessrank.BudgetError, match=f"on the data set's {announced:,} samples "
                                                   r"\(as many as its loader announces\)"):
        hessrank.effective_rank(model, nn.CrossEntropyLoss(), loader, "fisher",
                                max_memory=announced**2 * 8)
    assert _CountingDataset.read == 64
    result = hessrank.effective_rank(model, nn.CrossEntropyLoss(), loader, "fisher",
                                     max_memory=2**30)
    assert result.num_samples == announced
    # a collate_fn of the loader's own may drop samples: the count is not taken for granted
    # (probe 74: a collate that dropped a fifth of them was refused at the full count)
    _CountingDataset.read = 0
    dropping = DataLoader(dataset, batch_size=64, drop_last=drop_last,
                          collate_fn=lambda rows: default_collate(rows[::2]))
    with pytest.raises(hessrank.BudgetError, match="needs about"):
        hessrank.effective_rank(model, nn.CrossEntropyLoss(), dropping, "fisher",
                                max_memory=announced**2 * 8)
    assert _CountingDataset.read > 64  # refused after the pass, at the count it found


def test_a_sampler_on_the_system_s_entropy_is_refused_as_changing_data_not_crashed():
    """random.SystemRandom has no state to read: reading it crashed with 'System entropy
    source does not have state' (probe 58). Its draws differ on every pass: refused as such."""
    model, loss_fn, x, y = _data("class weights")
    loader = DataLoader(TensorDataset(x, y), batch_size=5,
                        sampler=_OwnRandomSampler(16, "random.SystemRandom"))
    with pytest.raises(ValueError, match="changed between passes|differ"):
        hessrank.effective_rank(model, loss_fn, loader, "lanczos")


def test_a_counted_graph_is_freed_without_a_backward_pass():
    """The operators count the graph they keep (``GraphBytes``) by a saved-tensor hook; kept as
    it was, a saved output held its own ``grad_fn``, a cycle no collection frees where the graph
    is never backpropagated: Lanczos over a data set grew by 6 KiB a sample a product (7 GB at
    65,536 samples, probe 63)."""
    import gc
    import weakref

    from hessrank.problem import GraphBytes, build_problem

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = classification_batch(8, 4, 3)
    graph = GraphBytes(build_problem(model, nn.CrossEntropyLoss(), (x, y), None, "eval"))
    with graph.counting():
        hidden = torch.tanh(model[0](x))  # saved by its backward as an output
        outputs = model[2](hidden)
    assert graph.total > 0
    kept = weakref.ref(hidden)
    del hidden, outputs
    gc.collect()
    assert kept() is None


@pytest.mark.parametrize("method", ["exact", "lanczos"])
def test_the_loss_s_graphs_are_freed_after_a_call(method):
    """Every graph a call builds through the loss is freed when it returns: the float64
    widening's trial kept its saved tensors as they were, a saved output holding its own
    ``grad_fn`` (the cycle of probe 63), and leaked them once per operator build (1.1 MiB a call
    of a four-batch ``lanczos``; a long GPT run grew to 8 GB)."""
    import gc
    import weakref

    saved_outputs = []

    def loss_fn(outputs, targets):
        log_probabilities = nn.functional.log_softmax(outputs, 1)  # saved as an output
        saved_outputs.append(weakref.ref(log_probabilities))
        return nn.functional.nll_loss(log_probabilities, targets)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))  # float32: widened
    batches = [classification_batch(8, 4, 3, dtype=torch.float32, seed=s) for s in (1, 2)]
    result = hessrank.effective_rank(model, loss_fn, batches, method, lanczos_steps=4)
    assert not any("widened" in note for note in result.notes)
    gc.collect()
    assert saved_outputs and not [ref for ref in saved_outputs if ref() is not None]


def _memorised_float32(classes: int, built_in: torch.dtype, margin: float = 20.0,
                       seed: int = 0, dtype: torch.dtype = torch.float32
                       ) -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    """A float32 (or ``dtype``) MLP built in ``built_in`` and scaled until its loss saturates
    (every margin ``margin`` at least, most past the ~104 where float32's softmax or sigmoid
    gradient is exactly zero), its samples ordered by their loss gradient, smallest first."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, classes)).to(built_in)
    x = torch.randn(13, 5, generator=torch.Generator().manual_seed(seed), dtype=built_in)
    with torch.no_grad():
        outputs = model(x)
        if classes == 1:
            y, gap = (outputs > 0).float(), outputs.abs().min()
        else:
            top = outputs.topk(2, dim=1).values
            y, gap = outputs.argmax(1), (top[:, 0] - top[:, 1]).min()
        model[2].weight.mul_(margin / gap)
        model[2].bias.mul_(margin / gap)
    model, x = model.to(dtype), x.to(dtype)
    y = y.to(dtype) if classes == 1 else y
    loss_fn = nn.BCEWithLogitsLoss() if classes == 1 else nn.CrossEntropyLoss()
    gradient = torch.autograd.functional.jacobian(lambda f: loss_fn(f, y), model(x).detach())
    order = gradient.reshape(13, -1).abs().amax(1).argsort()
    return model, loss_fn, x[order], y[order]


@pytest.mark.parametrize("built_in", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize(("classes", "method"), [
    (1, "exact"), (1, "fisher"), (1, "fisher_lanczos"), (3, "exact"), (3, "ggn"),
    (3, "ggn_lanczos")])
def test_a_float32_batch_saturated_to_zero_gradient_is_one_of_the_data_set(classes, method,
                                                                           built_in):
    """A memorised float32 classifier whose first batch's loss gradients are all exactly zero
    (its curvature too, for the GGN): the logistic one's data set was refused as batches that
    interact in the loss (exact, fisher, fisher_lanczos: next to another batch those gradients
    were read at the subnormal floor, and their squares flushed to zero in float32); the
    softmax one's by ggn_lanczos as a GGN that vanishes, or as a loss that couples the samples
    (a batch at the subnormal floor alone, its products 20 % off). Each method gives the
    concatenated batch's spectrum now (probe 126), but for fisher_lanczos where a batch's output
    gradients fall under float32's range: refused (the model's Jacobians could make up the
    difference, and a batch left out for it had carried nearly all of the EF; probe 128), as a
    batch whose every gradient does is."""
    model, loss_fn, x, y = _memorised_float32(classes, built_in)
    batches = list(zip(x.split(5), y.split(5)))
    with torch.no_grad():
        first = torch.autograd.functional.jacobian(lambda f: loss_fn(f, batches[0][1]),
                                                   model(batches[0][0]))
    assert bool((first == 0).all())  # the case: a batch without gradient in float32
    whole = hessrank.effective_rank(model, loss_fn, (x, y), method, seed=1)
    if method == "fisher_lanczos" and built_in == torch.float32:  # its second batch's
        with pytest.raises(ValueError, match="fall under torch.float32's range"):
            hessrank.effective_rank(model, loss_fn, batches, method, seed=1)
        return
    streamed = hessrank.effective_rank(model, loss_fn, batches, method, seed=1)
    assert streamed.top_eigenvalue == pytest.approx(whole.top_eigenvalue, rel=1e-4)
    assert streamed.rank == whole.rank
    if method == "fisher_lanczos":  # every batch's EF under the range: refused as one batch
        def scaled(f: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return 1e-25 * loss_fn(f, t)

        for data in ((x, y), batches):
            with pytest.raises(ValueError, match="fall under torch.float32's range"):
                hessrank.effective_rank(model, scaled, data, method)


def test_an_error_of_a_later_batch_in_a_later_pass_names_the_batch():
    """fisher_lanczos takes a data set's batches one at a time in its passes after the survey,
    whose errors had named no batch: 'not finite for sample 2', of the second batch (probe
    225)."""
    model = mlp((4, 5, 2))
    x, y = torch.randn(12, 4, dtype=torch.float64), torch.randn(12, 2, dtype=torch.float64)
    y[8, 1] = float("nan")

    def masked(outputs, targets):
        return torch.where(targets.isnan(), 0.0, (outputs - targets) ** 2).sum()

    with pytest.raises(ValueError, match=r"^batch 1 of the data \(the batches before it passed\): "
                       r"the loss's gradient .* not finite for sample 2 \(targets\[2\] holds nan"):
        hessrank.effective_rank(model, masked, [(x[:6], y[:6]), (x[6:], y[6:])],
                                method="fisher_lanczos")
