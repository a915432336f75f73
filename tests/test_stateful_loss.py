"""Loss functions that are not a function of the outputs and the targets alone.

A call evaluates the loss several times (``ggn`` four times, ``fisher`` three, a data set's
batches at every product): a loss that updates state it reads (a temperature schedule, a running
average) or draws random numbers would make each evaluation another loss, and the curvature a mix
of them (probe 76: ``ggn`` gave the GGN at a later temperature, 6.8x too small, without a note).
The call's first evaluation must not draw from a global generator and must return the same value
when repeated, and a loss module's state comes back as it was.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from reference import (
    assert_spectra_close,
    classification_batch,
    eigenvalues_by_magnitude,
    mlp,
    reference_hessian,
)
from torch import Tensor, nn

import hessrank
from hessrank.problem import UnrepeatableLoss

ALL_METHODS = ("exact", "lanczos", "ggn", "fisher", "ggn_lanczos", "fisher_lanczos")
#: the methods whose results are compared with a dense Hessian reference
HESSIAN_METHODS = ("exact", "lanczos")


class AnnealedLoss:
    """Cross-entropy at a temperature that grows with every call (a schedule stepped inside the
    loss): the loss as given is the first call's, at temperature 1."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, outputs: Tensor, targets: Tensor) -> Tensor:
        temperature = 1.0 + 0.5 * self.calls
        self.calls += 1
        return F.cross_entropy(outputs / temperature, targets)


class RunningScaleLoss(nn.Module):
    """Cross-entropy over a running average of its own value, held in a buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("average", torch.tensor(1.0, dtype=torch.float64))

    def forward(self, outputs: Tensor, targets: Tensor) -> Tensor:
        value = F.cross_entropy(outputs, targets)
        self.average.mul_(0.5).add_(0.5 * value.detach())
        return value / self.average


class CountedLoss(nn.Module):
    """Cross-entropy that counts its calls in a buffer and in an attribute, without reading
    them: one function of the outputs and targets. ``holding``: a module it holds as a
    submodule (the model itself, for a loss wrapper)."""

    def __init__(self, holding: nn.Module | None = None) -> None:
        super().__init__()
        if holding is not None:
            self.model = holding
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))
        self.seen = 0

    def forward(self, outputs: Tensor, targets: Tensor) -> Tensor:
        self.calls += 1
        self.seen += 1
        return F.cross_entropy(outputs, targets)


def noisy_loss(draw: str):
    """Cross-entropy on logits with noise drawn from one of the global generators."""
    def loss(outputs: Tensor, targets: Tensor) -> Tensor:
        if draw == "torch":
            noise = 0.5 * torch.randn_like(outputs)
        elif draw == "python":
            noise = outputs.new_tensor(random.gauss(0.0, 0.5))
        else:
            noise = outputs.new_tensor(float(np.random.normal(0.0, 0.5)))
        return F.cross_entropy(outputs + noise, targets)
    return loss


def _compared(method: str) -> int:
    """How many leading eigenvalues a method's result is compared on: Lanczos's converged top
    one, every other's first five."""
    return 1 if method == "lanczos" else 5


def _batches(data: bool, x: Tensor, y: Tensor):
    return [(x[:6], y[:6]), (x[6:], y[6:])] if data else (x, y)


@pytest.mark.parametrize("data", [False, True], ids=["batch", "data set"])
@pytest.mark.parametrize("method", ALL_METHODS)
def test_a_loss_that_changes_with_each_call_is_refused(method, data):
    """The call's first evaluation is repeated: a temperature stepped inside the loss shows."""
    model = mlp((5, 6, 3))
    x, y = classification_batch(12, 5, 3)
    with pytest.raises(UnrepeatableLoss, match=r"returned \S+, then \S+ on the same outputs "
                                               r"and targets.*temperature"):
        hessrank.effective_rank(model, AnnealedLoss(), _batches(data, x, y), method=method)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_a_loss_modules_running_average_is_put_back(method):
    """Refused as a loss that changes with each call, and the buffer it updates comes back as
    it was, the same tensor."""
    model = mlp((5, 6, 3))
    x, y = classification_batch(12, 5, 3)
    loss = RunningScaleLoss()
    buffer = loss.average
    with pytest.raises(UnrepeatableLoss, match="returned"):
        hessrank.effective_rank(model, loss, (x, y), method=method)
    assert loss.average is buffer
    assert float(loss.average) == 1.0


@pytest.mark.parametrize("method", HESSIAN_METHODS)
def test_a_loss_modules_state_is_put_back_after_a_call_that_succeeds(method):
    """A loss module that counts its calls (without reading the count) is one function: the
    call runs, its curvature is the plain loss's, and the counter is as before."""
    model = mlp((5, 6, 3))
    x, y = classification_batch(12, 5, 3)

    loss = CountedLoss()
    result = hessrank.effective_rank(model, loss, (x, y), method=method, seed=0)
    reference = eigenvalues_by_magnitude(reference_hessian(model, nn.CrossEntropyLoss(), x, y))
    assert_spectra_close(result.eigenvalues, reference, count=_compared(method), rtol=1e-6)
    assert int(loss.calls) == 0 and loss.seen == 0


@pytest.mark.parametrize("data", [False, True], ids=["batch", "data set"])
@pytest.mark.parametrize("draw", ["torch", "python", "numpy"])
@pytest.mark.parametrize("method", ALL_METHODS)
def test_a_random_loss_is_refused(method, draw, data):
    """As a random forward pass is: the loss is random and its curvature undefined; the global
    generators are left as they were."""
    model = mlp((5, 6, 3))
    x, y = classification_batch(12, 5, 3)
    before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    with pytest.raises(UnrepeatableLoss, match="loss_fn draws random numbers"):
        hessrank.effective_rank(model, noisy_loss(draw), _batches(data, x, y), method=method)
    assert torch.equal(before[0], torch.get_rng_state())
    assert before[1] == random.getstate()
    assert np.array_equal(before[2], np.random.get_state()[1])


@pytest.mark.parametrize("method", ALL_METHODS)
def test_a_loss_that_reads_fixed_state_is_not_refused(method):
    """Values the loss reads but does not change (a fixed temperature attribute, class weights)
    give the same value at every evaluation: no refusal, and the same spectrum as the plain
    loss at that temperature."""
    model = mlp((5, 6, 3))
    x, y = classification_batch(12, 5, 3)

    class Tempered(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.temperature = 2.0

        def forward(self, outputs: Tensor, targets: Tensor) -> Tensor:
            return F.cross_entropy(outputs / self.temperature, targets)

    tempered = hessrank.effective_rank(model, Tempered(), (x, y), method=method, seed=0)
    plain = hessrank.effective_rank(model, lambda f, t: F.cross_entropy(f / 2.0, t), (x, y),
                                    method=method, seed=0)
    np.testing.assert_allclose(tempered.eigenvalues, plain.eigenvalues, rtol=0,
                               atol=1e-12 * abs(plain.eigenvalues[0]))


@pytest.mark.parametrize("method", HESSIAN_METHODS)
def test_a_loss_that_changes_its_outputs_in_place_is_one_function(method):
    """``f /= 2`` inside the loss: its repeat runs on its own copy of the outputs, so the check
    does not take the write for state (probe 77); the curvature is that of the loss of f / 2."""
    model = mlp((5, 6, 3))
    x, y = classification_batch(12, 5, 3)

    def halving(outputs: Tensor, targets: Tensor) -> Tensor:
        outputs /= 2
        return F.cross_entropy(outputs, targets)

    result = hessrank.effective_rank(model, halving, (x, y), method=method, seed=0)
    reference = eigenvalues_by_magnitude(reference_hessian(
        model, lambda f, t: F.cross_entropy(f / 2, t), x, y))
    assert_spectra_close(result.eigenvalues, reference, count=_compared(method), rtol=1e-6)


@pytest.mark.parametrize(("method", "targets"), [
    ("ggn", "classes"), ("fisher", "classes"),
    # the check of targets of another dtype, and a data set's survey, differentiate the loss
    # on leaf copies of the outputs too: they had passed autograd's bare error (probe 122)
    *((method, "float32 values") for method in ALL_METHODS), ("exact", "a data set")])
def test_a_loss_that_changes_its_outputs_in_place_is_named_where_it_cannot_run(method, targets):
    """On the leaf copies of the outputs the Gram methods differentiate, an in-place write
    fails: named as such, not as a problem of the targets."""
    model = mlp((5, 6, 3))
    x, y = classification_batch(12, 5, 3)

    def halving(outputs: Tensor, labels: Tensor) -> Tensor:
        outputs /= 2
        return (F.cross_entropy(outputs, labels) if not labels.is_floating_point()
                else F.huber_loss(outputs, labels))

    batch = ((x, y) if targets == "classes" else [(x[:6], y[:6]), (x[6:], y[6:])]
             if targets == "a data set" else (x, torch.randn(12, 3)))
    with pytest.raises(RuntimeError, match="modifies the outputs in place.*out of place"):
        hessrank.effective_rank(model, halving, batch, method=method)


@pytest.mark.parametrize("method", ["exact", "lanczos", "ggn"])
def test_a_loss_that_writes_its_targets_in_place_is_named(method):
    """``labels.clamp_(...)`` inside the loss: a saved tensor of the targets' copy changed, which
    ``exact`` and ``lanczos`` had blamed on the model's forward (probe 210). The caller's
    targets are untouched."""
    model = mlp((5, 6, 3))
    x, y = classification_batch(12, 5, 3)
    given = y.clone()

    def clamping(outputs: Tensor, labels: Tensor) -> Tensor:
        return F.cross_entropy(outputs, labels.clamp_(0, 2))

    with pytest.raises(ValueError, match=r"^loss_fn \(or the model's forward\) modifies the "
                                         r"targets in place"):
        hessrank.effective_rank(model, clamping, (x, y), method=method)
    assert torch.equal(y, given)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_a_loss_module_that_clamps_its_own_parameter(method):
    """A learned temperature kept in range in place, inside forward: the loss's own business,
    not a write of the model's parameters (it had been refused as one; probe 77)."""
    model = mlp((5, 6, 3))
    x, y = classification_batch(12, 5, 3)

    class LearnedTemperature(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.log_temperature = nn.Parameter(torch.tensor(0.5, dtype=torch.float64))

        def forward(self, outputs: Tensor, targets: Tensor) -> Tensor:
            with torch.no_grad():
                self.log_temperature.clamp_(-3.0, 3.0)
            return F.cross_entropy(outputs / self.log_temperature.exp(), targets)

    learned = hessrank.effective_rank(model, LearnedTemperature(), (x, y), method=method, seed=0)
    fixed = hessrank.effective_rank(
        model, lambda f, t: F.cross_entropy(f / float(np.exp(0.5)), t), (x, y), method=method,
        seed=0)
    np.testing.assert_allclose(learned.eigenvalues, fixed.eigenvalues, rtol=0,
                               atol=1e-9 * abs(fixed.eigenvalues[0]))


@pytest.mark.parametrize("method", ALL_METHODS)
def test_a_loss_module_holding_the_model_gets_its_own_state_back(method):
    """A loss wrapper that holds the model as a submodule and counts its calls: its counter
    comes back too (only the model's modules had been guarded; probe 77)."""
    model = mlp((5, 6, 3))
    x, y = classification_batch(12, 5, 3)

    loss = CountedLoss(holding=model)
    hessrank.effective_rank(model, loss, (x, y), method=method, seed=0)
    assert int(loss.calls) == 0 and loss.seen == 0
