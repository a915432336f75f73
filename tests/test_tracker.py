"""hessrank.Tracker: schedules, records equal to the library's results, sinks, no side effects."""

from __future__ import annotations

import csv
import json
import signal
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from reference import classification_batch
from torch import nn

import hessrank

CE = nn.CrossEntropyLoss()
FAST = {"lanczos_steps": 10}


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Dropout(0.3),
        nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 3),
    )


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _train(tracker_kwargs: dict | None, log: Path | None, steps: int = 10):
    """Adam with dropout and BatchNorm; a tracker (if any) steps after every optimizer step."""
    model = _net()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = classification_batch(32, 6, 3, dtype=torch.float32)
    tracker = None
    if tracker_kwargs is not None:
        tracker = hessrank.Tracker(model, CE, log=log, **tracker_kwargs)
    losses = []
    torch.manual_seed(123)
    for step in range(steps):
        model.train()
        optimizer.zero_grad()
        index = torch.arange(step % 4 * 8, step % 4 * 8 + 8)
        loss = CE(model(x[index]), y[index])
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if tracker is not None:
            tracker.step((x[index], y[index]))
    if tracker is not None:
        tracker.close()
    return model, optimizer, losses


def test_training_run_is_bitwise_identical_with_the_tracker(tmp_path: Path) -> None:
    model_ref, opt_ref, losses_ref = _train(None, None)
    kwargs = {"methods": hessrank.METHODS, "every": 3, "per_layer": True, **FAST}
    model, opt, losses = _train(kwargs, tmp_path / "c.jsonl")
    assert losses == losses_ref
    for key, value in model_ref.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    state, state_ref = opt.state_dict()["state"], opt_ref.state_dict()["state"]
    for index in state_ref:
        for key in state_ref[index]:
            assert torch.equal(state[index][key], state_ref[index][key]), (index, key)
    records = _read(tmp_path / "c.jsonl")
    assert [(r["step"], r["method"]) for r in records] == [
        (step, method) for step in (0, 3, 6, 9) for method in hessrank.METHODS
    ]


def test_records_equal_the_library_at_each_measured_step(tmp_path: Path) -> None:
    model = _net().eval()
    x, y = classification_batch(16, 6, 3, dtype=torch.float32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    tracker = hessrank.Tracker(model, CE, ("exact", "fisher"), every=2, per_layer=True,
                               log=tmp_path / "c.jsonl", threshold=0.9)
    expected = []
    for step in range(5):
        optimizer.zero_grad()
        CE(model(x), y).backward()
        optimizer.step()
        if step % 2 == 0:
            for method in ("exact", "fisher"):
                expected.append((step, hessrank.effective_rank(
                    model, CE, (x, y), method=method, per_layer=True, threshold=0.9)))
        tracker.step((x, y))
    tracker.close()
    records = _read(tmp_path / "c.jsonl")
    assert records == tracker.records
    assert len(records) == len(expected) == 6
    for record, (step, res) in zip(records, expected, strict=True):
        assert record["step"] == step and record["method"] == res.method
        assert record["rank"] == res.rank
        assert {k: record[k] for k in res.ranks} == pytest.approx(res.ranks, rel=1e-9)
        assert record["top_eigenvalue"] == pytest.approx(res.top_eigenvalue, rel=1e-9)
        assert record["trace"] == pytest.approx(res.trace, rel=1e-9)
        assert record["threshold"] == 0.9 and record["num_samples"] == 16
        assert set(record["layers"]) == set(res.layers) == {"0", "1", "4", "6"}
        # the tolerance the numerical rank was counted at: the matrix's size times epsilon,
        # which differs by method and by layer
        assert record["rtol"] == res.rtol
        for name, layer in res.layers.items():
            assert record["layers"][name]["rank"] == layer.rank
            assert record["layers"][name]["rtol"] == layer.rtol
            assert record["layers"][name]["top_eigenvalue"] == pytest.approx(
                layer.top_eigenvalue, rel=1e-9)
    # Training moved the weights between the measurements.
    assert records[0]["top_eigenvalue"] != records[2]["top_eigenvalue"]


def test_explicit_steps_and_step_numbers(tmp_path: Path) -> None:
    model = _net().eval()
    batch = classification_batch(8, 6, 3, dtype=torch.float32)
    tracker = hessrank.Tracker(model, CE, steps=[1, 4, 100], log=None)
    measured = [bool(tracker.step(batch)) for _ in range(6)]
    assert measured == [False, True, False, False, True, False]
    assert tracker.step(batch, step=100)[0].step == 100
    assert [r["step"] for r in tracker.records] == [1, 4, 100]
    # measure() ignores the schedule and records the last counted step.
    (measurement,) = tracker.measure(batch)
    assert measurement.step == 100 and measurement.result is not None


def test_fixed_evaluation_batch_is_measured_every_time(tmp_path: Path) -> None:
    model = _net().eval()
    x, y = classification_batch(24, 6, 3, dtype=torch.float32)
    tracker = hessrank.Tracker(model, CE, every=1, eval_batch=(x[:12], y[:12]), log=None)
    (from_step,) = tracker.step((x[12:], y[12:]))  # the training batch is not measured
    (without_batch,) = tracker.step()
    reference = hessrank.effective_rank(model, CE, (x[:12], y[:12]), method="fisher")
    for measurement in (from_step, without_batch):
        assert measurement.record["num_samples"] == 12
        assert measurement.result is not None
        assert measurement.result.eigenvalues.tolist() == reference.eigenvalues.tolist()


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class CostlySink:
    """A sink that makes each record cost ``seconds`` of the fake clock."""

    def __init__(self, clock: FakeClock, seconds: float) -> None:
        self.clock, self.seconds = clock, seconds

    def write(self, record: dict) -> None:
        self.clock.now += self.seconds

    def close(self) -> None:
        pass


@pytest.mark.parametrize("budget", [0.05, 0.2])
def test_budget_keeps_the_share_of_wall_time(budget: float) -> None:
    """Training steps cost 1 s, a measurement 3 s: measure as often as the budget allows."""
    clock = FakeClock()
    model = _net().eval()
    batch = classification_batch(4, 6, 3, dtype=torch.float32)
    tracker = hessrank.Tracker(model, CE, budget=budget, log=None, clock=clock,
                               sinks=[CostlySink(clock, 3.0)])
    steps = 400
    for _ in range(steps):
        clock.now += 1.0
        tracker.step(batch)
    measured = [r["step"] for r in tracker.records]
    assert measured[0] == 0
    elapsed = clock.now - 1.0  # time counts from the first step() call
    assert tracker.overhead == pytest.approx(3.0 * len(measured) / elapsed)
    assert tracker.overhead <= budget
    # As often as allowed: one more measurement would have broken the budget.
    assert 3.0 * (len(measured) + 1) / (elapsed + 3.0) > budget
    # After the first (which pays its cost back first), evenly spread: not bunched at the start.
    gaps = {b - a for a, b in zip(measured[1:], measured[2:])}
    assert len(measured) >= 4 and max(gaps) - min(gaps) <= 1


def test_a_measurement_before_the_first_step_counts_in_the_wall_time() -> None:
    """``measure()`` (a baseline) before the loop: its time was counted as spent but the clock
    started at the first ``step()``, so the overhead read 2.5 (250 % of the wall time)."""
    clock = FakeClock()
    batch = classification_batch(4, 6, 3, dtype=torch.float32)
    tracker = hessrank.Tracker(_net().eval(), CE, budget=0.05, log=None, clock=clock,
                               sinks=[CostlySink(clock, 1.0)])
    tracker.measure(batch)
    for _ in range(5):
        clock.now += 0.1
        tracker.step(batch)
    assert [r["step"] for r in tracker.records] == [-1]  # the baseline spent the budget
    assert tracker.overhead == pytest.approx(1.0 / 1.5)


def test_step_numbers_of_numpy_and_torch_integers(tmp_path: Path) -> None:
    """``step=np.int64(5)`` (a loop over ``np.arange``) was measured, then lost: the JSON log
    refused it after the work. A tensor step was never found among ``steps``, and a float or
    a bool went through. Integers of any kind are now step numbers; anything else is refused
    before any work."""
    batch = classification_batch(4, 6, 3, dtype=torch.float32)
    log = tmp_path / "c.jsonl"
    with hessrank.Tracker(_net().eval(), CE, every=5, log=log) as tracker:
        tracker.step(batch, step=np.int64(5))
        tracker.step(batch, step=torch.tensor(10))
        for bad in (5.0, True, torch.tensor(15.0), -5):
            with pytest.raises(ValueError, match="step must be an integer >= 0"):
                tracker.step(batch, step=bad)
            with pytest.raises(ValueError, match="step must be an integer >= 0"):
                tracker.measure(batch, step=bad)
    assert [(r["step"], type(r["step"])) for r in _read(log)] == [(5, int), (10, int)]
    assert _read(log) == tracker.records
    listed = hessrank.Tracker(_net().eval(), CE, steps=np.array([3]), log=None)
    assert listed.step(batch, step=torch.tensor(3))


def test_measure_takes_one_name_and_refuses_a_name_twice() -> None:
    """``measure(methods="fisher")`` was split into letters ("'f' is not one of ..."), and
    a method named twice gave two records of one step."""
    batch = classification_batch(4, 6, 3, dtype=torch.float32)
    tracker = hessrank.Tracker(_net().eval(), CE, ("fisher", "ggn"), log=None)
    assert [m.method for m in tracker.measure(batch, methods="ggn")] == ["ggn"]
    with pytest.raises(ValueError, match="measure.methods=. names fisher more than once"):
        tracker.measure(batch, methods=("fisher", "fisher"))
    with pytest.raises(ValueError, match="measure.methods=.: 'exact' is not one of fisher, ggn"):
        tracker.measure(batch, methods="exact")
    assert len(tracker.records) == 1


def test_measure_after_resuming_records_the_resumed_model_s_step(tmp_path: Path) -> None:
    """Resumed with ``append=True``, a ``measure()`` before any ``step()`` is of the model the
    run resumed from: the log's last step. It had been recorded as the step the first
    ``step()`` counts next, which that step then recorded again for another model (probe 56);
    the earlier run's record of the resumed step moves aside to the ``.superseded`` file."""
    batch = classification_batch(4, 6, 3, dtype=torch.float32)
    log = tmp_path / "c.jsonl"
    with hessrank.Tracker(_net().eval(), CE, every=2, log=log) as tracker:
        for _ in range(5):
            tracker.step(batch)
    with hessrank.Tracker(_net().eval(), CE, every=2, log=log, append=True) as tracker:
        tracker.measure(batch)
        for _ in range(3):
            tracker.step(batch)
        tracker.measure(batch)  # after step(): the last step counted
    assert [r["step"] for r in _read(log)] == [0, 2, 4, 6, 7]
    assert [r["step"] for r in _read(tmp_path / "c.superseded.jsonl")] == [4]



@pytest.mark.parametrize(("resumed", "refused"), [
    ({}, None),
    ({"threshold": 0.9}, "threshold 0.99 there, 0.9 here"),
    ({"params": ["0.weight"]}, "num_params 239 there, 72 here"),
    ({"params": [f"{layer}.{kind}" for layer in (0, 1, 4, 6) for kind in ("weight", "bias")]},
     None),  # all of them, by name
], ids=["same", "threshold", "params", "params named"])
def test_appending_a_run_of_another_configuration_is_refused(tmp_path: Path, resumed: dict,
                                                             refused: str | None) -> None:
    """A resumed run appended to a log of another configuration (another threshold, another
    set of parameters) had its records joined to the earlier trajectory without a word: its
    plot drew a jump that was the configuration's (probe 124). Refused when the tracker is
    made, before any measurement, with the log left as it was."""
    batch = classification_batch(4, 6, 3, dtype=torch.float32)
    log = tmp_path / "c.jsonl"
    with hessrank.Tracker(_net().eval(), CE, every=1, log=log) as tracker:
        tracker.step(batch)
    before = log.read_text()
    if refused is not None:
        with pytest.raises(ValueError, match=f"log .* holds fisher measurements of another "
                                             f"configuration .{refused}.*another log="):
            hessrank.Tracker(_net().eval(), CE, every=1, log=log, append=True, **resumed)
        assert log.read_text() == before
        return
    with hessrank.Tracker(_net().eval(), CE, every=1, log=log, append=True,
                          **resumed) as tracker:
        tracker.step(batch)
    assert [r["step"] for r in _read(log)] == [0, 1]



def test_an_explicit_rtol_other_than_the_log_s_is_refused(tmp_path: Path) -> None:
    """Appending with another rtol= had been accepted: the numerical rank dropped from 20 to 13
    at the resume, and the plot joined the two runs into one line (probe 195)."""
    batch = classification_batch(4, 6, 3, dtype=torch.float32)
    log = tmp_path / "r.jsonl"
    with hessrank.Tracker(_net().eval(), CE, every=1, log=log, rtol=1e-6) as tracker:
        tracker.step(batch)
    before = log.read_text()
    with pytest.raises(ValueError, match=r"rtol 1e-06 there, 0.001 here.*rtol="):
        hessrank.Tracker(_net().eval(), CE, every=1, log=log, append=True, rtol=1e-3)
    assert log.read_text() == before
    with hessrank.Tracker(_net().eval(), CE, every=1, log=log, append=True,
                          rtol=1e-6) as tracker:
        tracker.step(batch)
    assert [r["step"] for r in _read(log)] == [0, 1]


@pytest.mark.parametrize("resumed_at", [4, 6])
def test_a_run_resumed_before_its_configuration_changed_appends(tmp_path: Path,
                                                                resumed_at: int) -> None:
    """A run froze its first layer at step 5 and was killed at 7; resumed from the checkpoint
    of step 3, before the freeze, into the same log, it had been refused for the records of
    steps 5-7 ("num_params 155 there, 239 here"), exactly those the resume moves aside
    (probe 195). The records before the step it resumes from are compared: resumed at 4 it
    appends; resumed at 6, after the freeze, unfrozen, it is refused before any measurement,
    the log as it was."""
    batch = classification_batch(4, 6, 3, dtype=torch.float32)
    log = tmp_path / "f.jsonl"
    model = _net().eval()
    with hessrank.Tracker(model, CE, every=1, log=log) as tracker:
        for step in range(8):
            if step == 5:
                model[0].requires_grad_(False)
            tracker.step(batch, step=step)
    before = log.read_text()
    tracker = hessrank.Tracker(_net().eval(), CE, every=1, log=log, append=True)
    with tracker:
        if resumed_at == 6:
            with pytest.raises(ValueError, match="num_params 155 there, 239 here.*step 5"):
                tracker.step(batch, step=resumed_at)
            assert log.read_text() == before and not tracker.records
            return
        with pytest.warns(RuntimeWarning, match="resumes fisher at step 4"):
            tracker.step(batch, step=resumed_at)
    # (fisher's records of steps 4-7 moved aside, the resumed step's own after the others)
    assert [(r["step"], r["num_params"]) for r in _read(log)] == [(step, 239)
                                                                   for step in range(5)]


class _ArmingSink:
    """A sink that, once fisher's record of step 2 is written, arms a forward hook raising
    ``RuntimeError`` at the model's next forward (exact's measurement)."""

    def __init__(self, model: nn.Module) -> None:
        self.armed = False
        model.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if self.armed:
            self.armed = False
            raise RuntimeError("out of memory (simulated)")

    def write(self, record: dict) -> None:
        self.armed = record["method"] == "fisher" and record["step"] == 2

    def close(self) -> None:
        pass


@pytest.mark.parametrize("numbered", [True, False], ids=["step=", "counted"])
def test_a_step_whose_measurement_failed_is_measured_when_retried(tmp_path: Path,
                                                                  numbered: bool) -> None:
    """A loop that catches a measurement's error and calls step() again for the same step: with
    step= the retry had been taken for a micro-batch and step 2 never measured; without it, it
    counted as step 3, every later record one step off (probe 195). A step() with no update
    since measures the methods that have no record of the step, at it."""
    batch = classification_batch(4, 6, 3, dtype=torch.float32)
    log = tmp_path / "t.jsonl"
    model = _net().eval()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    failures = []
    with hessrank.Tracker(model, CE, ("fisher", "exact"), every=2, log=log,
                          sinks=[_ArmingSink(model)]) as tracker:
        for step in range(5):
            optimizer.zero_grad()
            CE(model(batch[0]), batch[1]).backward()
            optimizer.step()
            try:
                tracker.step(batch, **({"step": step} if numbered else {}))
            except RuntimeError:
                failures.append(step)
                tracker.step(batch, **({"step": step} if numbered else {}))  # the retry
    assert failures == [2]
    assert [(r["step"], r["method"]) for r in _read(log)] == [
        (0, "fisher"), (0, "exact"), (2, "fisher"), (2, "exact"), (4, "fisher"), (4, "exact")]


def _frozen_first_layer() -> nn.Sequential:
    model = _net()
    model[0].weight.requires_grad_(False)
    return model


def _compiled() -> nn.Module:
    return torch.compile(_net())


def _lazy() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.LazyLinear(12), nn.Tanh(), nn.Linear(12, 3))


#: (the model, the tracker's options) that a resumed run appends to its own log with
_RESUMABLE = [
    (_frozen_first_layer, {"params": ["0.weight", "4.weight"]}),  # a frozen one named
    (_compiled, {"params": ["0.weight"]}),  # a compiled model's names, as effective_rank's
    (_net, {"params": "generator"}),  # model[0].parameters(), read once
    (_lazy, {}),  # built before its first forward pass
]


@pytest.mark.parametrize(("make", "options"), _RESUMABLE,
                         ids=["frozen named", "compiled", "generator", "lazy"])
def test_a_resumed_run_of_the_same_configuration_appends(tmp_path: Path, make, options: dict
                                                         ) -> None:
    """The append check's count of the parameters is the analysis's: a frozen parameter among
    ``params`` is left out (an identical run had been refused, "num_params 24 there, 72
    here"), a compiled model's parameters go by the original module's names, a generator of
    parameters is read once (the second measurement had found it empty, and with
    ``append=True`` the first), and a lazy module's size waits for its first pass (torch's
    "uninitialized parameter" at construction; probe 126)."""
    batch = classification_batch(4, 6, 3, dtype=torch.float32)
    log = tmp_path / "c.jsonl"
    for resumed in (False, True):
        model = make()
        chosen = ({"params": model[0].parameters()} if options.get("params") == "generator"
                  else options)
        with hessrank.Tracker(model, CE, every=1, log=log, append=resumed,
                              **chosen) as tracker:
            if make is _lazy:
                model(batch[0])  # the training's first pass gives its shapes
            tracker.step(batch)
            tracker.step(batch)
    records = _read(log)
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert len({r["num_params"] for r in records}) == 1


def test_a_resume_killed_while_it_moves_records_aside_keeps_the_log(tmp_path: Path,
                                                                   monkeypatch) -> None:
    """Moving the redone records aside rewrote the log in place, empty until written again: a
    kill then lost every record (all 300,000 of a large log; probe 85). The log is now written
    whole beside itself and swapped in; an interruption before the swap leaves it as it was,
    and the next resume's swap holds, the interrupted one's copy gone."""
    batch = classification_batch(4, 6, 3, dtype=torch.float32)
    log = tmp_path / "c.jsonl"
    with hessrank.Tracker(_net().eval(), CE, every=1, log=log) as tracker:
        for _ in range(4):
            tracker.step(batch)
    before = log.read_text()

    def killed(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("hessrank.tracker.os.replace", killed)
    with pytest.raises(KeyboardInterrupt), hessrank.Tracker(
            _net().eval(), CE, every=1, log=log, append=True) as tracker:
        tracker.step(batch, step=2)
    assert log.read_text() == before
    monkeypatch.undo()
    (tmp_path / ".c.jsonl.1.tmp").write_text("a copy a killed rewrite left behind")
    with hessrank.Tracker(_net().eval(), CE, every=1, log=log, append=True) as tracker:
        tracker.step(batch, step=2)
    assert [r["step"] for r in _read(log)] == [0, 1, 2]
    assert not list(tmp_path.glob(".c.jsonl.*.tmp"))


def test_a_second_open_tracker_takes_over_a_log(tmp_path: Path) -> None:
    """Two trackers given one ``log=`` path overwrote each other's lines (3 of 6 records
    readable, the file refused by ``hessrank plot``). The second takes the file over, with a
    warning (a notebook cell that builds the tracker, run again), and the first's next record
    raises instead of writing."""
    log = tmp_path / "c.jsonl"
    batch = classification_batch(4, 6, 3, dtype=torch.float32)
    first = hessrank.Tracker(_net().eval(), CE, "fisher", every=1, log=log)
    first.step(batch)
    with pytest.warns(RuntimeWarning, match="was the log of another open tracker.*takes it over"):
        second = hessrank.Tracker(_net().eval(), CE, "ggn", every=1,
                                  log=str(log.parent / "." / log.name))
    with pytest.raises(RuntimeError, match="taken over by a newer tracker's log"):
        first.step(batch)
    with pytest.warns(RuntimeWarning, match="replacing"):
        second.step(batch)
    second.step(batch)
    first.close()
    second.close()
    assert [(r["step"], r["method"]) for r in _read(log)] == [(0, "ggn"), (1, "ggn")]


def test_on_error_warn_writes_the_error_and_goes_on(tmp_path: Path) -> None:
    model = _net().eval()
    batch = classification_batch(8, 6, 3, dtype=torch.float32)
    tracker = hessrank.Tracker(model, CE, ("exact", "fisher"), every=1, on_error="warn",
                               log=tmp_path / "c.jsonl",
                               method_options={"exact": {"max_memory": 1}})
    with pytest.warns(RuntimeWarning, match="exact failed at step 0: BudgetError"):
        exact, fisher = tracker.step(batch)
    tracker.close()
    assert exact.result is None and isinstance(exact.error, hessrank.BudgetError)
    assert fisher.result is not None
    first, second = _read(tmp_path / "c.jsonl")
    assert first == {"step": 0, "method": "exact", "error": first["error"]}
    assert first["error"].startswith("BudgetError: ")
    assert second["rank"] == fisher.result.rank
    raising = hessrank.Tracker(model, CE, "exact", every=1, log=None, max_memory=1)
    with pytest.raises(hessrank.BudgetError):
        raising.step(batch)


def test_dataloader_list_batches_and_append(tmp_path: Path) -> None:
    x, y = classification_batch(16, 6, 3, dtype=torch.float32)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    model = _net().eval()
    log = tmp_path / "c.jsonl"
    with hessrank.Tracker(model, CE, every=1, log=log) as tracker:
        for batch in loader:  # default collate gives a list [inputs, targets]
            tracker.step(batch)
    with hessrank.Tracker(model, CE, every=1, log=log, append=True) as tracker:
        tracker.step(next(iter(loader)), step=7)
        tracker.step(next(iter(loader)))  # numbering goes on from the log's last step
    assert [r["step"] for r in _read(log)] == [0, 1, 7, 8]
    with hessrank.Tracker(model, CE, every=1, log=log, append=True) as tracker:
        tracker.step(next(iter(loader)))  # a resumed run: from the largest step logged
    assert [r["step"] for r in _read(log)] == [0, 1, 7, 8, 9]
    before = log.read_text()
    with hessrank.Tracker(model, CE, every=1, log=log) as tracker:
        pass  # built, never run: the earlier run's records stay
    assert log.read_text() == before
    with pytest.warns(RuntimeWarning, match="replacing .*c.jsonl.*append=True"), \
            hessrank.Tracker(model, CE, every=1, log=log) as tracker:
        tracker.step(next(iter(loader)))  # a log given by name is replaced, with a warning
    assert [r["step"] for r in _read(log)] == [0]


def test_the_default_log_never_replaces_an_earlier_run(tmp_path: Path, monkeypatch) -> None:
    """Without ``log=`` the records go to ``curvature.jsonl`` in the working folder; a second
    run there takes ``curvature-1.jsonl`` (before, building a second tracker emptied the first
    run's log)."""
    monkeypatch.chdir(tmp_path)
    batch = classification_batch(8, 6, 3, dtype=torch.float32)
    paths = []
    for _ in range(3):
        with hessrank.Tracker(_net(), CE, every=1) as tracker:
            tracker.step(batch)
        paths.append(tracker.log_path)
    assert paths == [Path.cwd() / "curvature.jsonl", Path.cwd() / "curvature-1.jsonl",
                     Path.cwd() / "curvature-2.jsonl"]
    assert all(len(_read(tmp_path / path)) == 1 for path in paths)


def test_live_trackers_never_share_the_default_log(tmp_path: Path, monkeypatch) -> None:
    """Each tracker takes its default log when it is built, exclusively (before, two trackers
    built before the loop both took the empty ``curvature.jsonl`` the first had created, and
    wrote over each other's records); an empty one that another process has taken is not
    free, and a name no record was written to is given back at close."""
    import fcntl

    monkeypatch.chdir(tmp_path)
    batch = classification_batch(8, 6, 3, dtype=torch.float32)
    # taken by a tracker of another process: held open, locked (a lock of another open file
    # conflicts in this process too)
    held = (tmp_path / "curvature.jsonl").open("a")
    fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    first = hessrank.Tracker(_net(), CE, every=1)
    second = hessrank.Tracker(_net(), CE, ("fisher", "ggn"), every=1)
    unused = hessrank.Tracker(_net(), CE, every=1)
    assert (first.log_path, second.log_path, unused.log_path) == tuple(
        Path.cwd() / f"curvature-{k}.jsonl" for k in (1, 2, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no tracker replaces a log
        for _ in range(3):
            first.step(batch)
            second.step(batch)
    for tracker in (first, second, unused):
        tracker.close()
    assert _read(tmp_path / "curvature-1.jsonl") == first.records and len(first.records) == 3
    assert _read(tmp_path / "curvature-2.jsonl") == second.records and len(second.records) == 6
    assert (tmp_path / "curvature.jsonl").read_text() == ""
    assert not (tmp_path / "curvature-3.jsonl").exists()
    held.close()


def test_a_named_log_without_records_is_not_left_behind(tmp_path: Path) -> None:
    """A ``log=`` file the tracker made and never wrote to is removed at close (an empty log
    was left, which ``hessrank plot`` refuses); an existing one is untouched until a record."""
    made, existing = tmp_path / "runs" / "made.jsonl", tmp_path / "existing.jsonl"
    existing.write_text('{"step": 0, "method": "fisher"}\n')
    for path in (made, existing):
        tracker = hessrank.Tracker(_net(), CE, log=path, every=1)
        assert path.exists()  # checked writable when built
        tracker.close()
    assert not made.exists()
    assert existing.read_text() == '{"step": 0, "method": "fisher"}\n'


def _cut_log(path: Path) -> str:
    """Two records of a run, then the first 40 characters of a third: a crash mid-write."""
    lines = [json.dumps({"step": step, "method": "fisher", "rank": 3}) for step in range(3)]
    path.write_text(lines[0] + "\n" + lines[1] + "\n" + lines[2][:40])
    return lines[2][:40]


def test_appending_to_a_log_cut_by_a_crash_starts_a_line_of_its_own(tmp_path: Path) -> None:
    """The first record appended used to be glued onto the cut line, and lost with it."""
    log = tmp_path / "c.jsonl"
    cut = _cut_log(log)
    batch = classification_batch(8, 6, 3, dtype=torch.float32)
    tracker = hessrank.Tracker(_net(), CE, every=1, log=log, append=True)
    assert log.read_text().endswith(cut)  # building the tracker changes nothing
    with pytest.warns(RuntimeWarning, match="dropped line 3, which a crash cut mid-write") as seen:
        tracker.step(batch, step=2)
    assert seen[0].filename == __file__ and cut[:30] in str(seen[0].message)
    tracker.step(batch)
    tracker.close()
    assert [r["step"] for r in _read(log)] == [0, 1, 2, 3]  # numbering after the whole records
    assert _read(log)[2:] == tracker.records
    # A whole record whose newline the crash cut is kept, and the next one starts a line.
    log.write_text(json.dumps({"step": 0, "method": "fisher", "rank": 3}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with hessrank.Tracker(_net(), CE, every=1, log=log, append=True) as tracker:
            tracker.step(batch, step=1)
    assert [r["step"] for r in _read(log)] == [0, 1]


def test_a_cut_line_is_numbered_as_the_file_had_it_when_a_resume_moves_records(
        tmp_path: Path) -> None:
    """Resumed at step 1, the run moves the record of step 1 aside: the warning had numbered
    the cut line in the rewritten log (line 2), not in the file the user has (3; probe 187)."""
    log = tmp_path / "c.jsonl"
    _cut_log(log)
    batch = classification_batch(8, 6, 3, dtype=torch.float32)
    tracker = hessrank.Tracker(_net(), CE, every=1, log=log, append=True)
    with pytest.warns(RuntimeWarning, match="dropped line 3, which a crash cut mid-write"):
        tracker.step(batch, step=1)
    tracker.close()
    assert [r["step"] for r in _read(log)] == [0, 1]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"methods": ("fisher", "hutch")}, ValueError, "methods: 'hutch' is not one of exact, "),
        ({"methods": ("fisher", "ggn", "fisher")}, ValueError,
         r"methods names fisher more than once \(one record per method and step\)"),
        ({"methods": ()}, ValueError, "methods is empty"),
        ({"every": 10, "budget": 0.1}, ValueError, "one schedule, not every and budget"),
        ({"every": 0}, ValueError, r"every must be an integer >= 1, got 0 \(int\)"),
        ({"every": 2.0}, ValueError, r"every must be an integer >= 1, got 2.0 \(float\)"),
        ({"steps": [3, -1]}, ValueError, r"steps\[1\] must be an integer >= 0, got -1"),
        ({"steps": [torch.tensor(3.0)]}, ValueError, r"steps\[0\] must be an integer >= 0"),
        ({"budget": 5}, ValueError, r"budget is a share of wall time in \(0, 1\)"),
        ({"on_error": "ignore"}, ValueError, "on_error must be one of raise, warn, record"),
        ({"treshold": 0.9}, TypeError, "treshold not an option of hessrank.effective_rank"),
        # an estimator option none of the tracker's methods takes had been accepted and ignored
        ({"methods": ("fisher", "ggn"), "lanczos_steps": 5}, ValueError,
         r"Tracker options: lanczos_steps not an option of fisher or ggn, which would ignore it "
         r"\(lanczos_steps is taken by lanczos"),
        ({"methods": "fisher", "method_options": {"fisher": {"lanczos_steps": 5}}}, ValueError,
         r"method_options\['fisher'\]: lanczos_steps not an option of fisher, which would"),
        ({"method_options": {"ggn": {}}}, ValueError, "names 'ggn', not one of the methods"),
        ({"eval_batch": torch.zeros(3)}, TypeError, "eval_batch must be a pair"),
        ({"steps": 5}, TypeError, r"steps is a list of step numbers \(steps=\[5\] for one\)"),
        # a string is iterable: its characters had been read as steps ('1', '0')
        ({"steps": "10"}, TypeError, r"steps=\['10'\] for one\), got str"),
        ({"steps": []}, ValueError, "steps is empty, so the tracker would never measure"),
        ({"budget": "0.1"}, ValueError, r"budget is a share of wall time in \(0, 1\), got '0.1'"),
        # Values effective_rank refuses, refused by its own checks when the tracker is made
        # (before, at the first scheduled step, or recorded as errors with on_error="record").
        ({"threshold": 5}, ValueError, r"threshold must lie in \(0, 1\], got 5"),
        ({"mode": "trian"}, ValueError, "mode must be 'eval' or 'train', got 'trian'"),
        ({"max_memory": -1}, ValueError, "max_memory must lie in"),
        ({"backend": "bogus", "on_error": "record"}, ValueError, "unknown backend 'bogus'"),
        ({"per_layer": "yes"}, ValueError, "per_layer must be True or False"),
        ({"progress": "yes"}, ValueError, "progress must be None, True, False or a rich"),
        ({"seed": "a"}, ValueError, "seed must be an integer"),
        ({"methods": "exact", "eigenvectors": -1}, ValueError, "eigenvectors must be a count"),
        ({"methods": "lanczos", "eigenvectors": 2}, ValueError, "does not return eigenvectors"),
        ({"methods": ("fisher", "lanczos"), "method_options": {"lanczos": {"lanczos_steps": 1}}},
         ValueError, "lanczos_steps=1 gives a quadrature of one node"),
        ({"methods": "ggn", "mode": "train"}, ValueError, "mode='train' is not defined for"),
        ({"methods": ("exact", "fisher"), "mode": "train"}, ValueError,
         r"fisher: mode='train' is not defined.*goes in method_options"),
        # a value no method takes is wrong, not misplaced: no method_options hint
        ({"methods": ("exact", "fisher"), "threshold": 2}, ValueError,
         r"exact: threshold must lie in \(0, 1\], got 2$"),
        # a misspelt parameter name is refused when the tracker is made, not at its first record
        ({"params": ["0.wieght"]}, ValueError, "unknown parameter name '0.wieght'"),
        ({"methods": ("exact", "fisher"), "method_options": {"fisher": {"params": ["9.bias"]}}},
         ValueError, "fisher: unknown parameter name '9.bias'"),
        ({"eval_batch": (torch.zeros(8, 6), torch.zeros(3, dtype=torch.long))}, ValueError,
         "eval_batch: mismatched batch sizes"),
        ({"eval_batch": [(torch.zeros(8, 6), torch.zeros(8, dtype=torch.long)),
                         (torch.zeros(8, 6), torch.zeros(5, dtype=torch.long))]},
         ValueError, r"eval_batch\[1\]: mismatched batch sizes"),
    ],
)
def test_bad_arguments_fail_before_any_file_is_written(kwargs, error, match, tmp_path) -> None:
    log = tmp_path / "c.jsonl"
    with pytest.raises(error, match=match):
        hessrank.Tracker(_net(), CE, log=log, **kwargs)
    assert not log.exists()


def test_numpy_integers_schedule(tmp_path: Path) -> None:
    """A schedule computed with NumPy (``np.int64``) was refused as not an integer."""
    batch = classification_batch(4, 6, 3, dtype=torch.float32)
    for schedule in ({"every": np.int64(2)}, {"steps": np.arange(0, 6, 2)}):
        tracker = hessrank.Tracker(_net(), CE, log=None, **schedule)
        assert [bool(tracker.step(batch)) for _ in range(5)] == [True, False, True, False, True]


def test_warnings_point_at_the_callers_line(tmp_path: Path) -> None:
    """``on_error="warn"`` and the log-replacement warning pointed into tracker.py."""
    batch = classification_batch(8, 6, 3, dtype=torch.float32)
    log = tmp_path / "c.jsonl"
    log.write_text('{"step": 0, "method": "exact"}\n')
    tracker = hessrank.Tracker(_net(), CE, "exact", every=1, on_error="warn", log=log,
                               max_memory=1)
    with pytest.warns(RuntimeWarning) as seen:
        tracker.step(batch)
        tracker.measure(batch)
    tracker.close()
    messages = [(str(w.message).split()[0], w.filename) for w in seen]
    assert messages == [("hessrank.Tracker:", __file__), ("replacing", __file__),
                        ("hessrank.Tracker:", __file__)]


def test_misuse_of_step() -> None:
    batch = classification_batch(4, 6, 3, dtype=torch.float32)
    tracker = hessrank.Tracker(_net(), CE, log=None)
    with pytest.raises(ValueError, match="no schedule"):
        tracker.step(batch)
    assert tracker.measure(batch)[0].result is not None  # measure() needs no schedule
    scheduled = hessrank.Tracker(_net(), CE, every=1, log=None)
    with pytest.raises(TypeError, match="needs the batch"):
        scheduled.step()
    scheduled.close()
    with pytest.raises(ValueError, match="closed"):
        scheduled.step(batch)


def test_tensorboard_sink_holds_the_records(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason="TensorBoard sink: pip install tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = _net().eval()
    batch = classification_batch(8, 6, 3, dtype=torch.float32)
    with hessrank.Tracker(model, CE, ("fisher", "ggn"), every=2, log=None, per_layer=True,
                          tensorboard=tmp_path / "tb") as tracker:
        for _ in range(3):
            tracker.step(batch)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    for record in tracker.records:
        for key, value in hessrank.tracker.record_scalars(record).items():
            points = {e.step: e.value for e in events.Scalars(f"hessrank/{key}")}
            assert points[record["step"]] == pytest.approx(value, rel=1e-6), key
    assert "hessrank/ggn/layers/4/rank" in events.Tags()["scalars"]


def test_tensorboard_hides_the_abandoned_trajectory_of_a_resumed_run(tmp_path: Path) -> None:
    """A run resumed at step 2 of a log that went to 3: the JSON log moved steps 2-3 aside, and
    TensorBoard had kept them beside the new ones, its curves going back (probe 195). The
    resumed run's writer purges them."""
    pytest.importorskip("tensorboard", reason="TensorBoard sink: pip install tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    batch = classification_batch(8, 6, 3, dtype=torch.float32)
    options = {"every": 1, "log": tmp_path / "c.jsonl", "tensorboard": tmp_path / "tb"}
    with hessrank.Tracker(_net().eval(), CE, **options) as tracker:
        for step in range(4):
            tracker.step(batch, step=step)
    resumed = _net().eval()
    with torch.no_grad():
        resumed[0].weight.mul_(2.0)  # (another trajectory from step 2)
    with pytest.warns(RuntimeWarning, match="resumes fisher at step 2"), hessrank.Tracker(
            resumed, CE, append=True, **options) as tracker:
        for step in range(2, 4):
            tracker.step(batch, step=step)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    logged = {r["step"]: r["top_eigenvalue"] for r in _read(tmp_path / "c.jsonl")}
    points = [(e.step, e.value) for e in events.Scalars("hessrank/fisher/top_eigenvalue")]
    assert [step for step, _ in points] == [0, 1, 2, 3]
    assert [value for _, value in points] == pytest.approx([logged[s] for s in range(4)],
                                                           rel=1e-6)


def test_lightning_callback_measures_on_the_trainers_steps(tmp_path: Path) -> None:
    lightning = pytest.importorskip("lightning", reason="the optional extra hessrank[lightning]")

    class Module(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _net()

        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            return self.net(inputs)

        def training_step(self, batch, batch_idx):
            inputs, targets = batch
            return CE(self(inputs), targets)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    x, y = classification_batch(32, 6, 3, dtype=torch.float32)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    module = Module()
    tracker = hessrank.Tracker(module, CE, every=5, log=tmp_path / "c.jsonl")
    logger = lightning.pytorch.loggers.CSVLogger(tmp_path, name="csv")
    trainer = lightning.Trainer(
        max_steps=6, accelerator="cpu", logger=logger, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        callbacks=[tracker.lightning_callback()],
    )
    trainer.fit(module, loader)
    records = _read(tmp_path / "c.jsonl")
    assert [r["step"] for r in records] == [0, 5]
    with pytest.raises(ValueError, match="closed"):  # closed at the end of fit
        tracker.step((x, y))
    # Step 5, the last, trained on the sixth batch (the second of epoch 2): the record is the
    # trained module's curvature on that batch.
    final = hessrank.effective_rank(module, CE, (x[8:16], y[8:16]), method="fisher")
    assert records[-1]["rank"] == final.rank
    assert records[-1]["top_eigenvalue"] == pytest.approx(final.top_eigenvalue, rel=1e-12)
    # The trainer's logger got the same numbers at the same steps.
    with open(Path(logger.log_dir) / "metrics.csv") as handle:
        logged = [row for row in csv.DictReader(handle) if row.get("hessrank/fisher/rank")]
    assert [(int(r["step"]), float(r["hessrank/fisher/rank"])) for r in logged] == [
        (r["step"], r["rank"]) for r in records
    ]


def test_a_shuffling_loader_as_eval_batch_is_one_data_set_and_leaves_the_generator_alone():
    """A ``DataLoader`` as ``eval_batch`` is measured as one data set, batch by batch, inside the
    call's guard: its shuffling draws no number the training loop would see."""
    x, y = classification_batch(48, 6, 3, dtype=torch.float32)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16,
                                         shuffle=True)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    tracker = hessrank.Tracker(model, nn.CrossEntropyLoss(), methods=["fisher"], every=1,
                               eval_batch=loader, log=None)
    state = torch.get_rng_state()
    (measured,) = tracker.measure()
    assert torch.equal(torch.get_rng_state(), state)
    assert measured.result.num_samples == 48


def test_every_registered_method_can_be_tracked() -> None:
    """The Lanczos methods on the GGN/EF operators, which effective_rank takes, were refused."""
    batch = classification_batch(8, 6, 3, dtype=torch.float32)
    tracker = hessrank.Tracker(_net(), CE, ("fisher_lanczos", "ggn_lanczos"), every=1, log=None)
    fisher = hessrank.effective_rank(_net(), CE, batch, "fisher")
    records = [measurement.record for measurement in tracker.step(batch)]
    assert [record["method"] for record in records] == ["fisher_lanczos", "ggn_lanczos"]
    assert records[0]["rank"] == fisher.rank


def test_lanczos_layer_records_carry_their_intervals(tmp_path: Path) -> None:
    """Per-layer Lanczos results have srank intervals of their own; the records had none."""
    model = _net().eval()
    batch = classification_batch(16, 6, 3, dtype=torch.float32)
    options = {"per_layer": True, "lanczos_steps": 20, "seed": 4}
    expected = hessrank.effective_rank(model, CE, batch, method="lanczos", **options)
    tracker = hessrank.Tracker(model, CE, ("lanczos",), every=1, log=None, **options)
    tracker.step(batch)
    tracker.close()
    (record,) = tracker.records
    for interval in ("rank_interval", "trace_interval", "numerical_interval"):
        assert record[interval] == pytest.approx(list(getattr(expected, interval)))
        for name, layer in expected.layers.items():
            assert getattr(layer, interval) is not None
            assert record["layers"][name][interval] == pytest.approx(
                list(getattr(layer, interval)))


@pytest.mark.parametrize("append", [False, True])
@pytest.mark.parametrize("content", ["import torch\n", "print('no newline')",
                                     '{"step": 0, "method": "fisher"}\n[1, 2]\n',
                                     '{"step": 5, "lr": 0.1}'],
                         ids=["script", "script-cut", "array-line", "one-line config"])
def test_a_log_that_holds_no_records_is_refused_untouched(tmp_path: Path, append: bool,
                                                         content: str) -> None:
    """``log="notes.py"`` replaced the script at the first record (with a warning that it held
    an earlier run's records), and ``append=True`` cut its last line as a crash's (probe 56)."""
    path = tmp_path / "notes.py"
    path.write_text(content)
    with pytest.raises(ValueError, match="holds something other than hessrank records"):
        hessrank.Tracker(_net(), CE, every=1, log=path, append=append)
    assert path.read_text() == content


def test_a_log_another_process_writes_is_refused(tmp_path: Path) -> None:
    """Two processes on one ``log=`` interleaved fragments of lines, and the first run's
    records were lost (probe 56): the second process's tracker is refused while the first's
    is open."""
    import subprocess
    import sys

    pytest.importorskip("fcntl")
    log = tmp_path / "shared.jsonl"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, hessrank, torch\n"
         f"t = hessrank.Tracker(torch.nn.Linear(2, 2), torch.nn.MSELoss(), log={str(log)!r})\n"
         "print('open', flush=True)\nsys.stdin.readline()\nt.close()\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
        with pytest.raises(OSError, match="being written by a tracker in another process"):
            hessrank.Tracker(_net(), CE, every=1, log=log, append=True)
    finally:
        holder.communicate("\n", timeout=60)
    with hessrank.Tracker(_net(), CE, every=1, log=log):  # free once the other closed it
        pass


def test_a_run_resumed_before_its_log_s_last_records_moves_them_aside(tmp_path: Path) -> None:
    """A run logged to step 6, resumed from its step-3 checkpoint with ``step=``: the log went
    0, 2, 4, 6, 4, 6 (probe 56). The redone records move to ``.superseded.jsonl``."""
    batch = classification_batch(4, 6, 3, dtype=torch.float32)
    log = tmp_path / "c.jsonl"
    with hessrank.Tracker(_net().eval(), CE, every=2, log=log) as tracker:
        for _ in range(7):
            tracker.step(batch)
    with (hessrank.Tracker(_net().eval(), CE, every=2, log=log, append=True) as tracker,
          pytest.warns(RuntimeWarning, match="resumes fisher at step 4, before the last 2 record")):
        for step in range(4, 9):
            tracker.step(batch, step=step)
    assert [r["step"] for r in _read(log)] == [0, 2, 4, 6, 8]
    assert [r["step"] for r in _read(tmp_path / "c.superseded.jsonl")] == [4, 6]


def test_a_baseline_before_the_first_step_is_step_minus_one_and_going_back_warns() -> None:
    """``measure()`` before the loop and the first ``step()`` both recorded step 0, for two
    models (probe 56). The baseline is the model before any update: step -1. A step that goes
    back after a training step warns; a measure() at the step just counted does not."""
    batch = classification_batch(4, 6, 3, dtype=torch.float32)
    tracker = hessrank.Tracker(_net().eval(), CE, every=1, log=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tracker.measure(batch)
        tracker.step(batch)
        tracker.measure(batch)  # the model step 0 counted, measured again
    assert [r["step"] for r in tracker.records] == [-1, 0, 0]
    # (not a micro-batch of step 0: that step was counted without step=)
    with pytest.warns(RuntimeWarning, match="recorded at step 0 after step 0 and a training"):
        tracker.step(batch, step=0)
    tracker.step(batch)
    with pytest.warns(RuntimeWarning, match="recorded at step 0 after step 1 and a training "
                      "step: the log's steps go back"):
        tracker.step(batch, step=0)
    tracker.close()


class WarmingSink(CostlySink):
    """The first record costs ``first`` seconds of the fake clock (torch and scipy warming up),
    every later one ``seconds``."""

    def __init__(self, clock: FakeClock, first: float, seconds: float) -> None:
        super().__init__(clock, seconds)
        self.first: float | None = first

    def write(self, record: dict) -> None:
        self.clock.now += self.first if self.first is not None else self.seconds
        self.first = None


def test_a_budget_spreads_its_measurements_after_a_slow_first_one() -> None:
    """A first measurement of 1.4 s then 8 ms ones, 10 ms steps, budget 0.1: nothing for 2,300
    steps, then 117 measurements in a row (probe 56). After the wait they are now spread out,
    about one each 8 ms x 9 of training, and the share stays within the budget."""
    clock = FakeClock()
    tracker = hessrank.Tracker(_net().eval(), CE, budget=0.1, log=None, clock=clock,
                               sinks=[WarmingSink(clock, 1.4, 0.008)])
    batch = classification_batch(4, 6, 3, dtype=torch.float32)
    measured = []
    for index in range(3400):  # the second measurement once 2 x 1.4 s is 10 % of the time
        clock.now += 0.01
        if tracker.step(batch):
            measured.append(index)
    gaps = np.diff(measured[1:])
    assert len(measured) > 50 and gaps.min() >= 7  # 0.008 * 9 / 0.01 steps apart
    assert tracker.overhead <= 0.1 + 1e-9
    tracker.close()


def test_a_resume_with_another_schedule_moves_the_abandoned_records(tmp_path: Path) -> None:
    """Logged every 3 steps to 12, resumed from the step-7 checkpoint every 5: the old step-9
    record, of a trajectory the run abandoned, stayed beside the new 10 and 15, because the
    move waited for fisher's first new record (10; probe 103). The first counted step marks
    the resume; a method the resumed run does not measure keeps its records."""
    batch = classification_batch(4, 6, 3, dtype=torch.float32)
    log = tmp_path / "c.jsonl"
    with hessrank.Tracker(_net().eval(), CE, ("fisher", "ggn"), every=3, log=log) as tracker:
        for _ in range(14):
            tracker.step(batch)
    with (hessrank.Tracker(_net().eval(), CE, "fisher", every=5, log=log, append=True) as tracker,
          pytest.warns(RuntimeWarning, match="resumes fisher at step 8, before the last 2 record")):
        for step in range(8, 17):
            tracker.step(batch, step=step)
    assert [(r["method"], r["step"]) for r in _read(log) if r["step"] > 7] == [
        ("ggn", 9), ("ggn", 12), ("fisher", 10), ("fisher", 15)]
    assert [(r["method"], r["step"]) for r in _read(tmp_path / "c.superseded.jsonl")] == [
        ("fisher", 9), ("fisher", 12)]


def test_a_relative_log_stays_where_the_tracker_was_built(tmp_path: Path, monkeypatch) -> None:
    """``log="rel.jsonl"`` was opened again at each record relative to the working folder:
    after the training script changed folder, the records replaced another folder's
    ``rel.jsonl`` (or raised where there was none), and the checked, locked file stayed empty
    (probe 103)."""
    batch = classification_batch(4, 6, 3, dtype=torch.float32)
    built, later = tmp_path / "built", tmp_path / "later"
    built.mkdir()
    later.mkdir()
    (later / "rel.jsonl").write_text(json.dumps({"step": 0, "method": "ggn", "rank": 1}) + "\n")
    monkeypatch.chdir(built)
    tracker = hessrank.Tracker(_net(), CE, every=1, log="rel.jsonl")
    monkeypatch.chdir(later)
    with tracker:
        tracker.step(batch)
        tracker.step(batch)
    assert [r["step"] for r in _read(built / "rel.jsonl")] == [0, 1]
    assert _read(later / "rel.jsonl") == [{"step": 0, "method": "ggn", "rank": 1}]
    assert tracker.log_path == built / "rel.jsonl"


def test_resuming_one_method_leaves_the_others_records(tmp_path: Path) -> None:
    """A second run that logs lanczos at steps 0-2 into a log holding fisher at 0-2 moved the
    fisher records aside as redone (probe 58): only the resumed method's records move."""
    batch = classification_batch(4, 6, 3, dtype=torch.float32)
    log = tmp_path / "c.jsonl"
    with hessrank.Tracker(_net().eval(), CE, "fisher", every=1, log=log) as tracker:
        for _ in range(3):
            tracker.step(batch)
    with (hessrank.Tracker(_net().eval(), CE, ("fisher", "ggn"), every=1, log=log,
                           append=True) as tracker,
          pytest.warns(RuntimeWarning, match="resumes fisher at step 1, before the last 2")):
        tracker.step(batch, step=1)
    assert [(r["step"], r["method"]) for r in _read(log)] == [
        (0, "fisher"), (1, "fisher"), (1, "ggn")]
    assert [r["step"] for r in _read(tmp_path / "c.superseded.jsonl")] == [1, 2]


@pytest.mark.parametrize("tail", ["\x00" * 64, '{"ste', "\n", "\n\n"],
                         ids=["NUL padding", "cut in its first bytes", "blank line", "blank lines"])
def test_crash_leftovers_do_not_stop_a_resume(tmp_path: Path, tail: str) -> None:
    """A log ending in NUL padding (a power loss), a line cut in its first 9 bytes, or blank
    lines was refused as holding something other than records (probe 58)."""
    log = tmp_path / "c.jsonl"
    log.write_text(json.dumps({"step": 0, "method": "fisher", "rank": 3}) + "\n" + tail)
    batch = classification_batch(4, 6, 3, dtype=torch.float32)
    with hessrank.Tracker(_net().eval(), CE, every=1, log=log, append=True) as tracker, \
            warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the cut line's
        tracker.step(batch)
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    assert [r["step"] for r in records] == [0, 1]


def test_a_forked_child_does_not_keep_the_log_locked(tmp_path: Path) -> None:
    """A DataLoader worker forked while a tracker held its log kept the lock after the
    tracker closed it: the same process could not open its own log again (probe 58)."""
    import multiprocessing

    pytest.importorskip("fcntl")
    log = tmp_path / "c.jsonl"
    tracker = hessrank.Tracker(_net().eval(), CE, every=1, log=log)
    context = multiprocessing.get_context("fork")
    release = context.Event()
    child = context.Process(target=release.wait)
    child.start()
    try:
        tracker.close()
        hessrank.Tracker(_net().eval(), CE, every=1, log=log).close()  # the lock is free
    finally:
        release.set()
        child.join(timeout=30)


def test_a_file_system_without_locks_still_logs(tmp_path: Path, monkeypatch) -> None:
    """flock raising ENOSYS (Lustre without -o flock) or ENOLCK (NFS without a lock daemon)
    stopped the tracker from being built (probe 58): such a file system is not locked."""
    import errno

    fcntl = pytest.importorskip("fcntl")

    def unsupported(*_: object) -> None:
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", unsupported)
    batch = classification_batch(4, 6, 3, dtype=torch.float32)
    with hessrank.Tracker(_net().eval(), CE, every=1, log=tmp_path / "c.jsonl") as tracker:
        tracker.step(batch)
    assert len(_read(tmp_path / "c.jsonl")) == 1


def test_a_forked_child_cannot_write_its_parent_s_log(tmp_path: Path) -> None:
    """A child forked from a process with a tracker wrote through the inherited sink and got a
    bare EBADF (probe 59): it is told whose log it is."""
    import multiprocessing

    pytest.importorskip("fcntl")
    sink = hessrank.tracker.JsonLinesSink(tmp_path / "c.jsonl", new=True)
    context = multiprocessing.get_context("fork")
    queue = context.Queue()

    def child() -> None:
        try:
            sink.write({"step": 0, "method": "fisher"})
            queue.put("wrote")
        except RuntimeError as error:
            queue.put(str(error))

    process = context.Process(target=child)
    process.start()
    message = queue.get(timeout=60)
    process.join(timeout=60)
    assert "which forked this one" in message
    sink.write({"step": 0, "method": "fisher"})  # the parent still writes
    sink.close()
    assert [r["step"] for r in _read(tmp_path / "c.jsonl")] == [0]


def _keys(records: list[dict]) -> list[str]:
    """Each record as one comparable string (its measured numbers tell two runs apart)."""
    return [json.dumps(record, sort_keys=True) for record in records]


@pytest.mark.parametrize(
    "before_the_loop",
    [None, {}, {"step": 30}, {"step": 40}, {"step": 10, "methods": "fisher"}],
    ids=["step first", "measure()", "measure(step=30)", "measure(step=40)",
         "measure(step=10, fisher)"],
)
def test_a_resume_after_a_measure_moves_every_redone_record_once(tmp_path: Path,
                                                                 before_the_loop) -> None:
    """A log to step 30, resumed from the step-10 checkpoint: a ``measure()`` of the restored
    model (recorded at the log's last step, 30) took the method's first record, and the resume
    at ``step(step=11)`` then moved nothing: steps 15-30 were logged twice (probe 115). Every
    earlier record of a step the run goes back before now moves aside exactly once, whatever
    comes first, and the log holds each (method, step) once."""
    batch = classification_batch(4, 6, 3, dtype=torch.float32)
    log, side = tmp_path / "c.jsonl", tmp_path / "c.superseded.jsonl"
    methods = ("fisher", "ggn")
    with hessrank.Tracker(_net().eval(), CE, methods, every=5, log=log) as earlier:
        for step in range(31):
            earlier.step(batch, step=step)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with hessrank.Tracker(_net().eval(), CE, methods, every=5, log=log,
                              append=True) as tracker:
            if before_the_loop is not None:
                tracker.measure(batch, **before_the_loop)
            for step in range(11, 35):
                tracker.step(batch, step=step)
    logged, moved = _read(log), _read(side)
    pairs = [(r["method"], r["step"]) for r in logged]
    assert sorted(pairs) == sorted((m, s) for m in methods for s in range(0, 31, 5))
    # nothing lost, nothing doubled: each earlier record in the log or moved aside, once
    for key, record in zip(_keys(earlier.records), earlier.records, strict=True):
        assert (_keys(logged) + _keys(moved)).count(key) == 1, record
        if record["step"] >= 11:
            assert key in _keys(moved), record
    # the log's records of the resumed steps are the resumed run's own
    assert all(key in _keys(tracker.records) for key, r in zip(_keys(logged), logged,
                                                                 strict=True) if r["step"] >= 11)
    # the moves are warned of; the log's steps, once moved, do not go back
    assert any("which it redoes: moved them" in str(w.message) for w in seen)
    assert not [w for w in seen if "steps go back" in str(w.message)]


def test_a_method_option_the_method_does_not_take_is_refused(tmp_path: Path) -> None:
    """``method_options={"fisher": {"lanczos_steps": 5}}`` was accepted, and fisher measured
    as if it had not been given (probe 115): it is refused when the tracker is made, naming
    the option, the method and which methods take it, before any file is made."""
    log = tmp_path / "out" / "c.jsonl"
    with pytest.raises(ValueError, match=r"method_options\['fisher'\]: lanczos_steps not an "
                       r"option of fisher.*taken by lanczos, ggn_lanczos, fisher_lanczos; "
                       "fisher takes backend"):
        hessrank.Tracker(_net(), CE, ("fisher", "lanczos"), log=log,
                         method_options={"fisher": {"lanczos_steps": 5}})
    with pytest.raises(ValueError, match=r"method_options\['exact'\]: backend.*exact takes "
                       "none of the estimator options"):
        hessrank.Tracker(_net(), CE, ("exact", "fisher"), log=log,
                         method_options={"exact": {"backend": "func"}})
    with pytest.raises(ValueError, match=r"names 'ggn', not one of the methods \(fisher\)"):
        hessrank.Tracker(_net(), CE, "fisher", log=log,
                         method_options={"ggn": {"mc_samples": 2}})
    assert not (tmp_path / "out").exists()
    # the options the method takes, and one for every method, still go through
    tracker = hessrank.Tracker(_net(), CE, ("fisher", "lanczos"), log=None, lanczos_steps=10,
                               method_options={"fisher": {"backend": "func"}})
    assert tracker._options_for("fisher") == {"lanczos_steps": 10, "backend": "func"}
    # an option at its default goes to methods that do not take it (backend='auto' had been
    # refused for exact and lanczos; probe 122)
    tracker = hessrank.Tracker(_net(), CE, ("exact", "lanczos"), log=None, backend="auto",
                               lanczos_steps=None)
    assert tracker._options_for("exact") == {"backend": "auto", "lanczos_steps": None}
    with pytest.raises(ValueError, match="exact takes none of the estimator options; lanczos "
                       "takes lanczos_steps"):
        hessrank.Tracker(_net(), CE, ("exact", "lanczos"), log=None, backend="func")


def test_a_folder_as_log_is_refused(tmp_path: Path, monkeypatch) -> None:
    """``log="runs/"`` wrote a file named ``runs`` (probe 115), and ``log="."`` raised a bare
    IsADirectoryError: a folder is refused, with what to give instead, and nothing is made."""
    monkeypatch.chdir(tmp_path)
    for log in ("runs/", "runs/deeper/", ".", str(tmp_path)):
        with pytest.raises(IsADirectoryError, match="names a folder, not a file: name a file in "
                           "it, e.g. log="):
            hessrank.Tracker(_net(), CE, every=1, log=log)
    assert list(tmp_path.iterdir()) == []


def test_a_log_s_folder_is_not_left_behind_without_records(tmp_path: Path) -> None:
    """A tracker closed before any record removed its log but left the folders it had made for
    it (probe 115): they go too, while empty; a folder that holds something else now stays,
    and one of a log with records stays."""
    for log in (tmp_path / "out" / "deeper" / "x.jsonl", tmp_path / "x.jsonl"):
        tracker = hessrank.Tracker(_net(), CE, every=1, log=log)
        assert log.exists()
        tracker.close()
    assert list(tmp_path.iterdir()) == []
    tracker = hessrank.Tracker(_net(), CE, every=1, log=tmp_path / "out" / "deeper" / "x.jsonl")
    (tmp_path / "out" / "notes.txt").write_text("someone else's")
    tracker.close()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["notes.txt"]
    batch = classification_batch(4, 6, 3, dtype=torch.float32)
    with hessrank.Tracker(_net(), CE, every=1, log=tmp_path / "kept" / "x.jsonl") as tracker:
        tracker.step(batch)
    assert len(_read(tmp_path / "kept" / "x.jsonl")) == 1


def test_the_step_back_warning_says_what_happened_between() -> None:
    """``measure(step=5)`` then ``measure(step=3)`` warned "after step 5 and a training step",
    with none between (probe 115): the warning says whether, and how many, training steps
    came between the two records."""
    batch = classification_batch(4, 6, 3, dtype=torch.float32)
    tracker = hessrank.Tracker(_net().eval(), CE, steps=[2, 10], log=None)
    tracker.measure(batch, step=5)
    with pytest.warns(RuntimeWarning, match="recorded at step 3 after step 5 with no training "
                      "step between: one model at two steps") as seen:
        tracker.measure(batch, step=3)
    assert "and a training step" not in str(seen[0].message)
    tracker.step(batch, step=10)
    tracker.step(batch, step=11)
    with pytest.warns(RuntimeWarning, match="recorded at step 2 after step 10 and 2 training "
                      "steps: the log's steps go back"):
        tracker.step(batch, step=2)
    assert [r["step"] for r in tracker.records] == [5, 3, 10, 2]


class _FlakySink:
    """A network logger whose first write fails."""

    def __init__(self) -> None:
        self.records: list[dict] = []

    def write(self, record: dict) -> None:
        if not self.records:
            self.records.append({})
            raise ConnectionError("the logging service is unreachable")
        self.records.append(record)

    def close(self) -> None:
        pass


def test_a_failing_sink_keeps_no_record_from_the_log(tmp_path: Path) -> None:
    """A sink listed before the log that raised had kept the record from the JSON log, on
    every ``on_error`` (probe 124): every sink now gets it, then the sink's error is raised."""
    log = tmp_path / "curvature.jsonl"
    batch = classification_batch(4, 6, 3, dtype=torch.float32)
    flaky = _FlakySink()
    tracker = hessrank.Tracker(_net().eval(), CE, methods=("fisher",), every=1, log=log,
                               sinks=[flaky], on_error="warn")
    with pytest.raises(ConnectionError, match="unreachable"):
        tracker.step(batch)
    tracker.step(batch)
    tracker.close()
    assert [record["step"] for record in _read(log)] == [0, 1]
    assert [record["step"] for record in flaky.records[1:]] == [1]


def test_a_failing_sink_leaves_no_method_of_the_step_unmeasured(tmp_path: Path) -> None:
    """The sink's error had been raised after the step's first method, the others never
    measured nor recorded (probe 216): every method is, then the error is raised."""
    log = tmp_path / "curvature.jsonl"
    batch = classification_batch(4, 6, 3, dtype=torch.float32)
    tracker = hessrank.Tracker(_net().eval(), CE, methods=("exact", "fisher"), every=1, log=log,
                               sinks=[_FlakySink()], on_error="warn")
    with pytest.raises(ConnectionError, match="unreachable"):
        tracker.step(batch)
    tracker.close()
    assert [(record["step"], record["method"]) for record in _read(log)] == [
        (0, "exact"), (0, "fisher")]


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception notes are Python 3.11's")
def test_a_sink_failure_before_a_method_s_error_is_said(tmp_path: Path) -> None:
    """A sink failed on the first method's record, then the second method raised: the sink's
    failure had been dropped without a word (probe 217); a note on the raised error says it."""
    batch = classification_batch(4, 6, 3, dtype=torch.float32)
    tracker = hessrank.Tracker(_net().eval(), CE, methods=("fisher", "exact"), every=1,
                               log=tmp_path / "curvature.jsonl", sinks=[_FlakySink()],
                               method_options={"exact": {"max_memory": 1000}})
    with pytest.raises(hessrank.BudgetError) as raised:
        tracker.step(batch)
    tracker.close()
    assert any("a sink had failed to write an earlier record of this step: ConnectionError"
               in note for note in raised.value.__notes__)


@pytest.mark.parametrize("where", ["options", "method_options"])
def test_a_budget_schedule_with_a_process_group_is_refused(tmp_path: Path, where: str) -> None:
    """Each process's own clock decided when to measure: one measured while another trained,
    their collectives did not meet, and a DDP job aborted in gloo (probe 218). Refused when
    the tracker is built, naming the schedules every process shares."""
    group = object()  # (refused before the group is looked at)
    options = ({"process_group": group} if where == "options"
               else {"method_options": {"fisher": {"process_group": group}}})
    with pytest.raises(ValueError, match=r"budget= schedules the measurements by this "
                                         r"process's own clock.*pass every= or steps="):
        hessrank.Tracker(_net(), CE, methods=("fisher",), budget=0.1,
                         log=tmp_path / "curvature.jsonl", **options)


def test_parameters_given_as_tensors_follow_a_reset_layer(tmp_path: Path) -> None:
    """``params=`` as the layer's tensors, the layer then re-initialised with new parameters (a
    plasticity study's reset): every later measurement had been refused as given a tensor not
    of the model (probe 216). Followed by name, as ``params=`` of names is."""
    batch = classification_batch(8, 6, 3, dtype=torch.float32)
    model = _net().eval()
    head = len(model) - 1
    tracker = hessrank.Tracker(model, CE, methods=("fisher",), every=1,
                               log=tmp_path / "curvature.jsonl",
                               params=list(model[head].parameters()))
    tracker.step(batch)
    model[head] = nn.Linear(model[head].in_features, model[head].out_features)
    tracker.step(batch)
    tracker.close()
    expected = hessrank.effective_rank(model, CE, batch, method="fisher",
                                       params=list(model[head].parameters()))
    assert tracker.records[-1]["num_params"] == expected.num_params
    assert tracker.records[-1]["rank"] == expected.rank


class _InterruptingSink:
    """A sink whose first ``write`` gets a Ctrl-C (a real SIGINT) as it receives the record."""

    def __init__(self) -> None:
        self.records: list[dict] = []
        self.finished: list[int] = []  # the writes that ran to their end

    def write(self, record: dict) -> None:
        self.records.append(record)
        if len(self.records) == 2:
            signal.raise_signal(signal.SIGINT)
        self.finished.append(record["step"])

    def close(self) -> None:
        pass


def test_a_ctrl_c_as_a_record_is_written_keeps_it_in_every_sink(tmp_path: Path) -> None:
    """A Ctrl-C after a record joined ``tracker.records`` but before the log had it: the loop
    went on, and the log lacked that step for good (probe 153). The record goes to the log
    first; the caller's sink gets the Ctrl-C as it comes, not held back (a stalled network
    logger had held it as long; probe 195)."""
    log = tmp_path / "curvature.jsonl"
    batch = classification_batch(4, 6, 3, dtype=torch.float32)
    interrupting = _InterruptingSink()
    tracker = hessrank.Tracker(_net().eval(), CE, methods=("fisher",), every=1, log=log,
                               sinks=[interrupting])
    tracker.step(batch)
    with pytest.raises(KeyboardInterrupt):
        tracker.step(batch)
    tracker.step(batch)
    tracker.close()
    assert [record["step"] for record in tracker.records] == [0, 1, 2]
    assert [record["step"] for record in _read(log)] == [0, 1, 2]
    assert interrupting.finished == [0, 2]


#: (a schedule the loop's steps 0, 2, 4, ... pass over, what it measures; one they meet, what
#: that measures)
_PASSED_SCHEDULES = [({"steps": [5, 15]}, [], {"steps": [4, 8]}, [4, 8]),
                     ({"every": 5}, [0, 10], {"every": 4}, [0, 4, 8])]


@pytest.mark.parametrize(("schedule", "measured", "met", "met_measured"), _PASSED_SCHEDULES)
def test_scheduled_steps_the_loop_passes_over_are_warned_of(tmp_path: Path, schedule, measured,
                                                             met, met_measured) -> None:
    # (every=: the remedy had said "an every= that divides the stride", the wrong way round;
    # probe 162)
    remedy = ("name steps your loop counts, or use every=" if "steps" in schedule else
              r"use an every= that is a multiple of the steps' stride \(2\)")
    """``steps=[5, 15]`` with ``step=2 * i``: no step is scheduled, nothing was measured, and
    the log was removed as empty at close, without a word (probe 153); ``every=5``, every other
    multiple of 5 (probe 160)."""
    batch = classification_batch(4, 6, 3, dtype=torch.float32)
    tracker = hessrank.Tracker(_net().eval(), CE, **schedule, log=None)
    with pytest.warns(RuntimeWarning, match=r"step 6 follows step 4, passing over the scheduled "
                                            rf"step\(s\) \[5\].*{remedy} \(said once\)"
                      ) as caught:
        for i in range(10):
            tracker.step(batch, step=2 * i)
    assert len([w for w in caught if "passing over" in str(w.message)]) == 1
    assert [record["step"] for record in tracker.records] == measured
    with warnings.catch_warnings():  # a schedule the loop meets: no such warning
        warnings.simplefilter("error")
        meeting = hessrank.Tracker(_net().eval(), CE, **met, log=None)
        for i in range(6):
            meeting.step(batch, step=2 * i)
    assert [record["step"] for record in meeting.records] == met_measured


def test_a_resumed_run_whose_first_step_was_interrupted_resumes_there(tmp_path: Path,
                                                                       monkeypatch) -> None:
    """A Ctrl-C in the first ``step(step=6)`` of a resumed run, before it counted: the loop
    went on at 7, the tracker resumed there, and the abandoned run's step-6 record stayed in the
    log beside the new run's (probe 153). The first step given is where it resumes."""
    batch = classification_batch(4, 6, 3, dtype=torch.float32)
    log = tmp_path / "c.jsonl"
    with hessrank.Tracker(_net().eval(), CE, every=2, log=log) as tracker:
        for _ in range(11):
            tracker.step(batch)
    from hessrank import tracker as tracking

    checked = tracking._check_batch

    def interrupted(*args: object, **kwargs: object) -> None:
        monkeypatch.setattr(tracking, "_check_batch", checked)
        raise KeyboardInterrupt

    monkeypatch.setattr(tracking, "_check_batch", interrupted)
    with (hessrank.Tracker(_net().eval(), CE, every=2, log=log, append=True) as tracker,
          pytest.warns(RuntimeWarning, match="resumes fisher at step 6")):
        with pytest.raises(KeyboardInterrupt):
            tracker.step(batch, step=6)
        for step in range(7, 9):
            tracker.step(batch, step=step)
    assert [r["step"] for r in _read(log)] == [0, 2, 4, 8]
    assert [r["step"] for r in _read(tmp_path / "c.superseded.jsonl")] == [6, 8, 10]


def test_a_sink_without_write_is_refused_when_the_tracker_is_built(tmp_path: Path) -> None:
    """An object that is no sink was taken, and failed at the first record, after its
    measurement, leaving an empty log (probe 124): refused when the tracker is built, with
    nothing written."""
    log = tmp_path / "curvature.jsonl"
    with pytest.raises(TypeError, match=r"sinks\[0\] \(object\) has no write\(\) or close\(\)"):
        hessrank.Tracker(_net().eval(), CE, every=1, log=log, sinks=[object()])
    assert not log.exists()


def test_a_log_whose_folder_cannot_be_made_is_named(tmp_path: Path) -> None:
    """``log=`` under a folder that cannot be created (here: a file stands there; probe 124's
    ``/proc/nope/x.jsonl``) got a bare ``[Errno ...]`` naming neither ``log=`` nor a fix; the
    error keeps its type and says both, and leaves nothing behind."""
    (tmp_path / "afile").write_text("")
    log = tmp_path / "afile" / "runs" / "x.jsonl"
    with pytest.raises(OSError, match=r"log '.*x\.jsonl': its folder .* cannot be created .*"
                                      r"give log= a file in a folder you can write, or log=None"):
        hessrank.Tracker(_net().eval(), CE, every=1, log=str(log))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["afile"]


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_a_log_that_cannot_be_opened_is_named() -> None:
    """A ``log=`` whose folder exists but where no file can be made (``/proc``) had raised a bare
    ``FileNotFoundError`` (probe 146); the error keeps its type and names log= and the fix."""
    with pytest.raises(FileNotFoundError, match=r"log '/proc/hessrank-x\.jsonl' cannot be opened "
                                                r"for writing .*or log=None for no file"):
        hessrank.Tracker(_net().eval(), CE, every=1, log="/proc/hessrank-x.jsonl")


def _quiet_tracker(**kwargs) -> hessrank.Tracker:
    return hessrank.Tracker(_net().eval(), CE, ("fisher",), **kwargs)


def _fused_adam_step(weight: nn.Parameter) -> None:
    """One step of ``Adam(fused=True)``, whose kernel leaves the version counters as they are."""
    weight.grad = torch.ones_like(weight)
    torch.optim.Adam([weight], lr=0.1, fused=True).step()
    weight.grad = None


def _data_write(weight: nn.Parameter) -> None:
    """``param.data -= ...``: an update through ``.data``, which no version counter sees."""
    weight.data -= 0.1


#: ways to update a weight between two step() calls with one step=: each is another model
_UPDATES = {"in place (mul_)": lambda weight: weight.detach().mul_(2.0),
            "Adam(fused=True)": _fused_adam_step, "param.data": _data_write}


def _accumulated_steps(tracker: hessrank.Tracker, batches: list[tuple], steps: int,
                       update: str) -> None:
    """``steps`` steps of gradient accumulation over ``batches`` (a due step measured once, at
    its first micro-batch, and no warning), then another micro-batch of the last step after an
    ``update`` of the first layer's weight: another model at that step, measured and warned of
    (a step= per epoch given at every batch had been dropped silently; probe 139)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for step in range(steps):
            for micro, (x, y) in enumerate(batches):
                CE(tracker.model(x), y).backward()
                taken = tracker.step((x, y), step=step)
                assert (taken != []) == (tracker.due(step) and micro == 0), (step, micro)
    with torch.no_grad():
        _UPDATES[update](tracker.model[0].weight)
    with pytest.warns(RuntimeWarning, match="two models at one step"):
        assert tracker.step(batches[0], step=steps - 1) != []


@pytest.mark.parametrize("update", list(_UPDATES))
def test_the_micro_batches_of_one_step_are_measured_once(tmp_path: Path, update: str) -> None:
    """step() with the last call's step= (gradient accumulation's micro-batches) is that step
    again: each due step had been measured once per micro-batch, warned of as two models at
    one step (probe 137). An update since makes it another model, however it was made: a fused
    optimizer and ``.data`` raise no version counter, and were dropped silently (probe 160)."""
    x, y = classification_batch(32, 6, 3, dtype=torch.float32)
    with _quiet_tracker(every=2, log=tmp_path / "c.jsonl") as tracker:
        _accumulated_steps(tracker, [(x[micro::3], y[micro::3]) for micro in range(3)], 5,
                           update)
    assert [r["step"] for r in _read(tmp_path / "c.jsonl")] == [0, 2, 4, 4]


@pytest.mark.parametrize("update", list(_UPDATES))
def test_an_embedding_s_rescaling_in_its_forward_is_no_update(update: str) -> None:
    """``nn.Embedding(max_norm=...)`` rescales the rows each forward looks up, in place, raising
    its version counter: every micro-batch had been taken for an update, measured, recorded
    again and warned of as two models at one step (probe 243). Rows its lookups rescaled are
    no update, their values moved: every row starts above max_norm, and the second and third
    micro-batches look up rows the first does not, the third shrinking some again by their
    rounding. An update of the table is one still."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(20, 6, max_norm=0.8), nn.Flatten(), nn.Linear(30, 3))
    assert bool((model[0].weight.norm(dim=1) > 0.8).all())
    rows = torch.arange(20).remainder(10).view(4, 5)
    y = torch.randint(0, 3, (4,))
    with hessrank.Tracker(model, CE, "fisher", every=1, log=None) as tracker:
        _accumulated_steps(tracker, [(rows, y), (rows + 10, y), (rows + 10, y.flip(0))], 2,
                           update)
    assert [r["step"] for r in tracker.records] == [0, 1, 1]


def test_a_resumed_log_counted_without_step_numbers_is_warned_of(tmp_path: Path) -> None:
    """The log holds measured steps only: counting on from its last record mislabelled every
    later record of a run resumed elsewhere (probe 137), and a baseline measure() before the
    first step went under the last record's step, moving that record aside (probe 160); step=
    is asked for, and then no warning."""
    log = tmp_path / "c.jsonl"
    x, y = classification_batch(16, 6, 3, dtype=torch.float32)
    with _quiet_tracker(every=5, log=log) as tracker:
        for _ in range(8):
            tracker.step((x, y))
    with pytest.warns(RuntimeWarning, match=r"step\(\) without step= on a resumed log counts "
                      r"on from step 6, one after the log's last record.*step=global_step"), \
            _quiet_tracker(every=5, log=log, append=True) as tracker:
        tracker.step((x, y))
    with pytest.warns(RuntimeWarning, match=r"measure\(\) without step= before any step\(\) "
                      r"on a resumed log records at step 5, the log's last.*"
                      r"measure\(step=global_step\)"), \
            _quiet_tracker(every=5, log=log, append=True) as tracker:
        tracker.measure((x, y))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with _quiet_tracker(every=5, log=log, append=True) as tracker:
            tracker.measure((x, y), step=7)
            tracker.step((x, y), step=10)
    assert [r["step"] for r in _read(log)] == [0, 5, 7, 10]


def test_the_eval_batch_is_the_tracker_s_own_copy(tmp_path: Path) -> None:
    """A training loop that permutes its data in place (a task switch) had changed the fixed
    eval_batch between measurements (probe 137)."""
    x, y = classification_batch(16, 6, 3, dtype=torch.float32)
    fixed = (x.clone(), y.clone())
    with _quiet_tracker(log=None, eval_batch=(x, y)) as tracker:
        x[:] = x[:, torch.randperm(6, generator=torch.Generator().manual_seed(0))]
        (measured,) = tracker.measure()
    direct = hessrank.effective_rank(tracker.model, CE, fixed, "fisher")
    np.testing.assert_array_equal(measured.result.eigenvalues, direct.eigenvalues)


def test_records_carry_the_result_s_notes(tmp_path: Path) -> None:
    """A Lanczos run whose Ritz values did not converge, a rank capped by n: the result's
    caveats had not reached the log (probe 137)."""
    x, y = classification_batch(16, 6, 3, dtype=torch.float32)
    with hessrank.Tracker(_net().eval(), CE, ("lanczos", "fisher"), log=tmp_path / "c.jsonl",
                          lanczos_steps=4) as tracker:
        measurements = tracker.measure((x, y))
    for measurement, record in zip(measurements, _read(tmp_path / "c.jsonl"), strict=True):
        assert record["notes"] == list(measurement.result.notes) and record["notes"]
        assert not any(key.endswith("notes") for key in hessrank.tracker.record_scalars(record))


def test_a_measurement_of_other_sizes_is_warned_of(tmp_path: Path) -> None:
    """A layer frozen between two measurements, or a step's batch of another size, had joined
    one line of the plot without a word: its jump was the configuration's (probe 137), and so
    had a numerical rank counted at another rtol (probe 243). The parameters' and the rtol's
    change is said each time, the samples' once."""
    model = _net().eval()
    x, y = classification_batch(16, 6, 3, dtype=torch.float32)
    with hessrank.Tracker(model, CE, ("fisher",), every=1, log=None) as tracker:
        tracker.step((x, y))
        with pytest.warns(RuntimeWarning, match=r"fisher measured 8 samples at step 1, 16 at "
                          r"its last record.*eval_batch=.*\(said once\)"):
            tracker.step((x[:8], y[:8]))
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            tracker.step((x, y))  # (said once)
        total = sum(p.numel() for p in model.parameters())
        model[0].requires_grad_(False)
        left = total - sum(p.numel() for p in model[0].parameters())
        with pytest.warns(RuntimeWarning, match=rf"fisher measured {left} parameters at step 3, "
                          rf"{total} at its last record \(a layer frozen or unfrozen"):
            tracker.step((x, y))
        # a model that grows (it had been told of "another params=", which a tracker keeps;
        # probe 243)
        model.append(nn.Linear(3, 3))
        with pytest.warns(RuntimeWarning, match=rf"fisher measured {left + 12} parameters at "
                          rf"step 4, {left} at its last record \(a layer frozen or unfrozen, "
                          r"added or removed, or reset to another size\): its ranks jump"):
            tracker.step((x, y))
        # a model cast to float64: the default rtol, n times the dtype's epsilon, falls and
        # the numerical rank with it, silently (probe 243); said each time
        model.double()
        with pytest.warns(RuntimeWarning, match=r"fisher counted its numerical rank at rtol "
                          r"3.55e-15 at step 5, 1.91e-06 at its last record, on as many "
                          r"parameters and samples .*a model cast to another dtype"):
            tracker.step((x.double(), y))


def test_a_crashed_run_s_empty_default_log_is_taken_again(tmp_path: Path, monkeypatch) -> None:
    """A run that crashed before its first record left an empty curvature.jsonl (its close
    never ran), so the next run wrote curvature-1.jsonl and `hessrank plot curvature.jsonl`
    found nothing (probe 137). An empty log another open tracker holds is not taken."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "curvature.jsonl").touch()
    with _quiet_tracker() as first, _quiet_tracker() as second:
        assert first.log_path == tmp_path / "curvature.jsonl"
        assert second.log_path == tmp_path / "curvature-1.jsonl"


def test_a_lazy_model_before_its_first_forward_is_recorded_not_raised() -> None:
    """``step()`` on a model with lazy modules before its first forward: the update fingerprint
    read their uninitialised parameters, and torch's error left the loop whatever
    ``on_error`` said (probe 241). The library's refusal is recorded."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.LazyLinear(10), nn.Tanh(), nn.LazyLinear(3))
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    tracker = hessrank.Tracker(model, CE, "fisher", every=1, log=None, eval_batch=(x, y),
                               on_error="record")
    tracker.step(step=0)
    assert "uninitialised lazy parameters" in tracker.records[-1]["error"]
    model(x)
    tracker.step(step=1)
    assert "error" not in tracker.records[-1] and tracker.records[-1]["rank"] > 0


class _ReentrantCheckpoint(nn.Module):
    """A block under ``checkpoint(use_reentrant=True)``, whose parameters get gradients only
    where the input requires one."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.block, self.head = nn.Sequential(nn.Linear(6, 12), nn.Tanh()), nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.utils.checkpoint import checkpoint

        return self.head(checkpoint(self.block, x, use_reentrant=True))


def test_an_eval_batch_is_measured_as_the_same_batch_passed_to_step() -> None:
    """The tracker's own copy of ``eval_batch`` had dropped ``requires_grad``: a model under a
    reentrant checkpoint, given inputs that require a gradient, was refused with the fix
    named through ``step(batch)`` but measured through ``eval_batch`` with its checkpointed
    block's curvature missing (probe 241)."""
    x = torch.randn(8, 6).requires_grad_()
    y = torch.randint(0, 3, (8,))
    records = []
    for batch_kind in ("step", "eval_batch"):
        tracker = hessrank.Tracker(_ReentrantCheckpoint(), CE, "exact", every=1, log=None,
                                   on_error="record",
                                   eval_batch=(x, y) if batch_kind == "eval_batch" else None)
        tracker.step((x, y) if batch_kind == "step" else None)
        records.append(tracker.records[-1])
    assert "use_reentrant" in records[0]["error"]
    assert records[1].get("error") == records[0]["error"]
