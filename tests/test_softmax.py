"""The saturation-safe log-softmax the Hessian's products run through: torch's values, torch's
first derivatives, and second derivatives that keep their digits at a saturated softmax."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from reference import saturation_safe_cross_entropy

from hessrank.curvature.softmax import SaturationSafeSoftmax

_TARGETS = torch.tensor([0, 2, 1, 2, 0])

#: (name, call of logits [5, 3] / [5, 3, 4] that the mode replaces)
_REPLACED = [
    ("F.log_softmax", lambda f: F.log_softmax(f, dim=1)),
    ("torch.log_softmax", lambda f: torch.log_softmax(f, -1)),
    ("Tensor.log_softmax", lambda f: f.log_softmax(1)),
    ("cross_entropy", lambda f: F.cross_entropy(f, _TARGETS)),
    ("weighted sum", lambda f: F.cross_entropy(
        f, _TARGETS, torch.tensor([0.5, 1.0, 2.0], dtype=f.dtype), reduction="sum")),
    ("ignore_index", lambda f: F.cross_entropy(f, torch.tensor([0, -100, 1, 2, -100]))),
    ("unreduced", lambda f: torch.nn.CrossEntropyLoss(reduction="none")(f, _TARGETS)),
    ("one sample", lambda f: F.cross_entropy(f[0], _TARGETS[0])),
    ("per position", lambda f: F.cross_entropy(f[..., None].expand(5, 3, 4),
                                               _TARGETS[:, None].expand(5, 4))),
]
#: calls the mode leaves to torch
_AS_GIVEN = [
    ("label smoothing", lambda f: F.cross_entropy(f, _TARGETS, label_smoothing=0.1)),
    ("probability targets", lambda f: F.cross_entropy(f, torch.full((5, 3), 1 / 3))),
    ("another dtype", lambda f: F.log_softmax(f, 1, dtype=torch.float32)),
]


def _logits(scale: float) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return (torch.randn(5, 3, generator=generator, dtype=torch.float64) * scale
            ).requires_grad_(True)


@pytest.mark.parametrize("call", [c for _, c in _REPLACED + _AS_GIVEN],
                         ids=[name for name, _ in _REPLACED + _AS_GIVEN])
def test_values_and_gradients_are_torch_s(call):
    """Bit for bit the same values, and the same gradient to rounding, as torch's own."""
    logits = _logits(3.0)
    expected = call(logits)
    (expected_gradient,) = torch.autograd.grad(expected.sum(), logits)
    with SaturationSafeSoftmax(torch.float64):
        value = call(logits)
    (gradient,) = torch.autograd.grad(value.sum(), logits)
    assert torch.equal(value, expected)
    torch.testing.assert_close(gradient, expected_gradient, rtol=1e-14, atol=1e-15)


def test_second_derivatives_keep_their_digits_at_saturation():
    """At margins of 10 to 25 (``1 - p_y`` from 5e-5 to 1e-11) the loss's Hessian w.r.t. the
    logits, by double backpropagation, matches that of the same loss written without the
    cancellation to 1e-13 under the mode; torch's own log-softmax backward is off by more than
    1e-8 there (the cancellation the mode removes)."""
    margins = torch.tensor([10.0, 14.0, 18.0, 21.0, 25.0], dtype=torch.float64)
    logits = torch.zeros(5, 3, dtype=torch.float64)
    logits[torch.arange(5), _TARGETS] = margins

    def loss_hessian(loss_fn) -> torch.Tensor:
        leaf = logits.clone().requires_grad_(True)
        (gradient,) = torch.autograd.grad(loss_fn(leaf, _TARGETS), leaf, create_graph=True)
        return torch.stack([torch.autograd.grad(entry, leaf, retain_graph=True)[0].reshape(-1)
                            for entry in gradient.reshape(-1)])

    reference = loss_hessian(saturation_safe_cross_entropy)
    torch_s = loss_hessian(F.cross_entropy)
    with SaturationSafeSoftmax(torch.float64):
        ours = loss_hessian(F.cross_entropy)
    # per entry, relative to its own size (the smallest curvature is 1e-11 of the largest)
    scale = reference.abs().clamp_min(1e-300)
    assert float(((ours - reference).abs() / scale).max()) < 1e-13
    assert float(((torch_s - reference).abs() / scale).max()) > 1e-8


@pytest.mark.parametrize(("model_dtype", "logits_dtype", "margin", "safe"), [
    (torch.float64, torch.float64, 2.0, True), (torch.float64, torch.float64, 25.0, True),
    (torch.float32, torch.float64, 2.0, False), (torch.float32, torch.float64, 18.0, False),
    (torch.float32, torch.float64, 25.0, True), (torch.float32, torch.float32, 2.0, True)])
def test_the_safe_backward_runs_where_the_model_s_rounding_would_show_it(
        model_dtype, logits_dtype, margin, safe):
    """A float64 model's products show the amplified rounding at any saturation, and so do a
    float32 model's whose loss runs in float32; a float32 model's on float64 logits (the
    widened loss) only once some ``1 - p_max`` is below ``eps64 / eps32`` = 1.9e-9 (margin 25:
    1.4e-11; margin 18: 1.5e-8): torch's own backward elsewhere, which costs a third less a
    product on GPT's logits."""
    logits = torch.zeros(5, 3, dtype=logits_dtype)
    logits[:, 0] = torch.linspace(0.0, margin, 5, dtype=logits_dtype)
    with SaturationSafeSoftmax(model_dtype):
        value = F.cross_entropy(logits.requires_grad_(True), _TARGETS)
    # nll_loss over the log-softmax's output: the node under NllLossBackward is whose it is
    node = value.grad_fn.next_functions[0][0]
    assert ("LogSoftmax" in type(node).__name__ and "Backward0" not in type(node).__name__) == safe
