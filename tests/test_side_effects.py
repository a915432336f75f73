"""A call never changes the model, its gradients, buffers, modes, hooks or the global RNG."""

from __future__ import annotations

import copy

import pytest
import torch
from reference import classification_batch
from torch import nn

import hessrank

CE = nn.CrossEntropyLoss()


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Dropout(0.3),
        nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 3),
    )


def _train(calls: list[str], steps: int = 12) -> tuple[dict, list]:
    """Adam on a BatchNorm + dropout net; ``calls`` methods are measured every 3 steps."""
    model = _net()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = classification_batch(32, 6, 3, dtype=torch.float32)
    losses = []
    torch.manual_seed(123)
    for step in range(steps):
        model.train()
        optimizer.zero_grad()
        loss = CE(model(x), y)
        loss.backward()
        if step % 3 == 1:
            for method in calls:  # between backward and step: .grad must survive
                hessrank.effective_rank(model, CE, (x[:8], y[:8]), method=method,
                                        lanczos_steps=10, lanczos_probes=2)
        optimizer.step()
        losses.append(loss.item())
    return model.state_dict(), losses


def test_training_run_is_bitwise_identical_with_calls():
    reference_state, reference_losses = _train([])
    state, losses = _train(["fisher", "ggn", "exact", "lanczos"])
    assert losses == reference_losses
    assert reference_state.keys() == state.keys()
    for key in state:
        assert torch.equal(state[key], reference_state[key]), key


def _snapshot(model: nn.Module) -> dict:
    return {
        "state": copy.deepcopy(model.state_dict()),
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "grad_ids": [id(p.grad) for p in model.parameters()],
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "hooks": [(dict(m._forward_hooks), dict(m._forward_pre_hooks),
                   dict(m._backward_hooks)) for m in model.modules()],
        "rng": torch.get_rng_state(),
    }


def _assert_same(before: dict, model: nn.Module) -> None:
    after = _snapshot(model)
    for key in before["state"]:
        assert torch.equal(before["state"][key], after["state"][key]), key
    for a, b in zip(before["grads"], after["grads"]):
        assert (a is None and b is None) or torch.equal(a, b)
    assert before["grad_ids"] == after["grad_ids"]
    assert before["training"] == after["training"]
    assert before["requires_grad"] == after["requires_grad"]
    assert before["hooks"] == after["hooks"]
    assert torch.equal(before["rng"], after["rng"])


CASES = [("exact", "auto"), ("lanczos", "auto"),
         *((m, b) for m in ("fisher", "ggn") for b in ("auto", "func", "backpack"))]


@pytest.mark.parametrize(("method", "backend"), CASES)
def test_state_untouched_after_success(method, backend):
    model = _net()
    model.train()
    model[4].weight.requires_grad_(False)
    x, y = classification_batch(10, 6, 3, dtype=torch.float32)
    CE(model(x), y).backward()  # gradients present, BatchNorm statistics updated
    seen = []
    model[0].register_forward_hook(lambda *args: seen.append(1))
    before = _snapshot(model)
    hessrank.effective_rank(model, CE, (x, y), method=method, backend=backend,
                            lanczos_steps=5, lanczos_probes=2)
    _assert_same(before, model)
    assert seen  # the user's hook is part of the model and ran


def test_state_untouched_after_failure():
    model = _net()
    x, y = classification_batch(10, 6, 3, dtype=torch.float32)

    def failing_loss(outputs, targets):
        raise RuntimeError("boom")

    before = _snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        hessrank.effective_rank(model, failing_loss, (x, y), method="exact")
    _assert_same(before, model)


def test_train_mode_batchnorm_restores_statistics():
    model = _net()
    model[3].p = 0.0  # dropout off so that mode='train' is well defined
    model.train()
    x, y = classification_batch(10, 6, 3, dtype=torch.float32)
    before = _snapshot(model)
    train = hessrank.effective_rank(model, CE, (x, y), method="exact", mode="train")
    _assert_same(before, model)
    evaluated = hessrank.effective_rank(model, CE, (x, y), method="exact")
    assert abs(train.top_eigenvalue - evaluated.top_eigenvalue) > 1e-6  # batch vs running stats
