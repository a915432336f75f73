"""Bad input gets an error naming the problem and the fix, and changes nothing."""

from __future__ import annotations

import copy

import pytest
import torch
from reference import classification_batch, mlp
from torch import nn

import hessrank

CE = nn.CrossEntropyLoss()


@pytest.fixture
def setup():
    model = mlp((5, 6, 3))
    x, y = classification_batch(8, 5, 3)
    return model, x, y


def _check(model, call, error, match):
    state = copy.deepcopy(model.state_dict())
    training = [m.training for m in model.modules()]
    with pytest.raises(error, match=match):
        call()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert training == [m.training for m in model.modules()]
    assert all(p.grad is None for p in model.parameters())


def test_unknown_method(setup):
    model, x, y = setup
    _check(model, lambda: hessrank.effective_rank(model, CE, (x, y), method="hutchinson"),
           ValueError, "unknown method 'hutchinson'.*exact, lanczos, ggn, fisher")


def test_non_scalar_loss(setup):
    model, x, y = setup
    _check(model, lambda: hessrank.effective_rank(model, nn.CrossEntropyLoss(reduction="none"),
                                                  (x, y), method="exact"),
           ValueError, "expected a scalar.*reduction='mean'")
    _check(model, lambda: hessrank.effective_rank(model, nn.CrossEntropyLoss(reduction="none"),
                                                  (x, y), method="fisher"),
           ValueError, "expected a scalar")


def test_mismatched_batch(setup):
    model, x, y = setup
    _check(model, lambda: hessrank.effective_rank(model, CE, (x, y[:5])),
           ValueError, "mismatched batch sizes.*batch dimension must come first")


def test_empty_batch(setup):
    model, x, y = setup
    _check(model, lambda: hessrank.effective_rank(model, CE, (x[:0], y[:0])),
           ValueError, "batch is empty")


def test_nan_inputs_and_parameters(setup):
    model, x, y = setup
    bad = x.clone()
    bad[0, 0] = float("nan")
    _check(model, lambda: hessrank.effective_rank(model, CE, (bad, y)),
           ValueError, r"inputs\[0\] contains NaN")
    with torch.no_grad():
        model[0].weight[0, 0] = float("inf")
    _check(model, lambda: hessrank.effective_rank(model, CE, (x, y)),
           ValueError, "parameter '0.weight' contains NaN or Inf")


def test_no_trainable_parameters(setup):
    model, x, y = setup
    model.requires_grad_(False)
    _check(model, lambda: hessrank.effective_rank(model, CE, (x, y)),
           ValueError, "no trainable parameters.*requires_grad=True")


def test_unknown_parameter_name(setup):
    model, x, y = setup
    _check(model, lambda: hessrank.effective_rank(model, CE, (x, y), params=["head.weight"]),
           ValueError, "unknown parameter name 'head.weight'")


def test_bad_batch_structure(setup):
    model, x, y = setup
    _check(model, lambda: hessrank.effective_rank(model, CE, x), TypeError, r"\(inputs, targets\)")


def test_loss_that_ggn_cannot_differentiate(setup):
    model, x, y = setup

    def numpy_loss(outputs, targets):
        import numpy as np

        value = float(np.mean(outputs.detach().numpy() ** 2))
        return outputs.sum() * 0 + value

    _check(model, lambda: hessrank.effective_rank(model, numpy_loss, (x, y), method="ggn"),
           ValueError, "GGN")


def test_non_convex_loss_for_ggn(setup):
    model, x, y = setup

    def concave(outputs, targets):
        return -(outputs**2).mean()

    _check(model, lambda: hessrank.effective_rank(model, concave, (x, y), method="ggn"),
           ValueError, "not convex in the outputs.*method='exact'")


def test_loss_without_per_sample_decomposition(setup):
    model, x, y = setup

    def batch_coupled(outputs, targets):  # centring across the batch couples the samples
        return CE(outputs - outputs.mean(dim=0), targets) + outputs.mean(dim=0).pow(2).sum()

    _check(model, lambda: hessrank.effective_rank(model, batch_coupled, (x, y)),
           ValueError, "not a weighted sum of per-sample losses.*method='ggn'")
    _check(model, lambda: hessrank.effective_rank(model, batch_coupled, (x, y), method="ggn"),
           ValueError, "couples the samples.*method='exact'")


def test_batchnorm_train_mode_for_fisher():
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)).double()
    x, y = classification_batch(8, 5, 3)
    _check(model, lambda: hessrank.effective_rank(model, CE, (x, y), mode="train"),
           ValueError, "mode='train' is not defined for method='fisher'.*use mode='eval'")


def test_dropout_with_train_mode():
    model = nn.Sequential(nn.Linear(5, 6), nn.Dropout(0.5), nn.Linear(6, 3)).double()
    x, y = classification_batch(8, 5, 3)
    _check(model, lambda: hessrank.effective_rank(model, CE, (x, y), method="exact",
                                                  mode="train"),
           ValueError, "active dropout.*mode='eval'")


def test_exact_over_budget_predicts_and_suggests(setup):
    model, x, y = setup
    with pytest.raises(hessrank.BudgetError, match="KiB.*method='lanczos'") as info:
        hessrank.effective_rank(model, CE, (x, y), method="exact", max_memory=1000)
    assert info.value.memory_bytes > 1000
    with pytest.raises(hessrank.BudgetError, match="would take about"):
        hessrank.effective_rank(model, CE, (x, y), method="exact", max_seconds=1e-9)
    memory, seconds = hessrank.predict_exact_cost(model, CE, (x, y))
    assert memory == info.value.memory_bytes and seconds > 0


def test_large_model_refused_before_any_work():
    model = nn.Sequential(nn.Linear(1000, 1000), nn.Linear(1000, 10))
    x = torch.randn(4, 1000)
    y = torch.randint(0, 10, (4,))

    def loss_never_called(outputs, targets):
        raise AssertionError("the model was evaluated before the budget check")

    with pytest.raises(hessrank.BudgetError, match="P = 1,011,010"):
        hessrank.effective_rank(model, loss_never_called, (x, y), method="exact")
