"""The saturation-safe log-softmax and log-sigmoid the curvature's products and readings run
through: torch's values, torch's first derivatives, and derivatives that keep their digits at a
saturated softmax or sigmoid."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from reference import saturation_safe_cross_entropy

from hessrank.curvature.saturation import SaturationSafe

_TARGETS = torch.tensor([0, 2, 1, 2, 0])
_BINARY = torch.nn.functional.one_hot(_TARGETS, 3)

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
    ("logsigmoid", F.logsigmoid),
    ("LogSigmoid", torch.nn.LogSigmoid()),
    ("BCEWithLogitsLoss", lambda f: torch.nn.BCEWithLogitsLoss()(f, _BINARY.to(f.dtype))),
    ("BCE weighted sum", lambda f: F.binary_cross_entropy_with_logits(
        f, _BINARY.to(f.dtype), torch.tensor([0.5, 1.0, 2.0], dtype=f.dtype),
        reduction="sum", pos_weight=torch.tensor([3.0, 1.0, 0.2], dtype=f.dtype))),
    ("BCE soft unreduced", lambda f: F.binary_cross_entropy_with_logits(
        f, torch.linspace(0, 1, 15, dtype=f.dtype).reshape(5, 3), reduction="none")),
]
#: calls the mode leaves to torch
_AS_GIVEN = [
    ("label smoothing", lambda f: F.cross_entropy(f, _TARGETS, label_smoothing=0.1)),
    ("probability targets", lambda f: F.cross_entropy(f, torch.full((5, 3), 1 / 3))),
    ("another dtype", lambda f: F.log_softmax(f, 1, dtype=torch.float32)),
    ("BCE targets with gradients", lambda f: F.binary_cross_entropy_with_logits(
        f, _BINARY.to(f.dtype).requires_grad_(True))),
    ("BCE legacy size_average", lambda f: F.binary_cross_entropy_with_logits(
        f, _BINARY.to(f.dtype), size_average=False)),
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
    with SaturationSafe(torch.float64):
        value = call(logits)
    (gradient,) = torch.autograd.grad(value.sum(), logits)
    assert torch.equal(value, expected)
    torch.testing.assert_close(gradient, expected_gradient, rtol=1e-14, atol=1e-15)


def _signs(targets: torch.Tensor) -> torch.Tensor:
    return 2.0 * targets.double() - 1.0


def _safe_binary(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``BCEWithLogitsLoss`` at hard labels, ``softplus(-(2 y - 1) z)``: the small side's
    sigmoid in every derivative."""
    return F.softplus(-_signs(targets) * outputs).mean()


#: (name, loss of saturated logits [5, 3] and its targets, the same loss written without the
#: cancellation, the targets, whether torch's first derivative has the cancellation too)
_SATURATING = [
    ("cross_entropy", F.cross_entropy, saturation_safe_cross_entropy, _TARGETS, True),
    ("BCEWithLogitsLoss", lambda f, y: F.binary_cross_entropy_with_logits(f, y.to(f.dtype)),
     _safe_binary, _BINARY, True),
    ("logsigmoid", lambda f, y: -F.logsigmoid(_signs(y).to(f.dtype) * f).mean(), _safe_binary,
     _BINARY,
     False),  # its first derivative is torch's sigmoid(-z), which keeps its digits
]


def _saturated_logits() -> torch.Tensor:
    """Logits [5, 3] whose label (class ``_TARGETS``; for the sigmoids, the sign ``_BINARY``
    gives) leads by margins of 10 to 25 (``1 - p`` from 5e-5 to 1e-11)."""
    margins = torch.tensor([10.0, 14.0, 18.0, 21.0, 25.0], dtype=torch.float64)
    logits = -margins[:, None].expand(5, 3).clone()
    logits[torch.arange(5), _TARGETS] = margins
    return logits


def _errors_per_entry(derivative, loss_fn, reference_fn) -> tuple[float, float]:
    """The largest error of ``derivative(loss_fn)`` under the mode and as torch runs it against
    ``derivative(reference_fn)``, each entry relative to its own size (the smallest curvature
    is 1e-11 of the largest)."""
    reference = derivative(reference_fn)
    scale = reference.abs().clamp_min(1e-300)
    with SaturationSafe(torch.float64):
        ours = derivative(loss_fn)
    torch_s = derivative(loss_fn)
    return (float(((ours - reference).abs() / scale).max()),
            float(((torch_s - reference).abs() / scale).max()))


@pytest.mark.parametrize(("loss_fn", "reference_fn", "targets"),
                         [case[1:4] for case in _SATURATING], ids=[c[0] for c in _SATURATING])
def test_second_derivatives_keep_their_digits_at_saturation(loss_fn, reference_fn, targets):
    """At margins of 10 to 25 the loss's Hessian w.r.t. the logits, by double
    backpropagation, matches that of the same loss written without the cancellation to 1e-13
    per entry under the mode; torch's own backward is off by more than 1e-8 there (the
    cancellation the mode removes)."""
    logits = _saturated_logits()

    def loss_hessian(loss) -> torch.Tensor:
        leaf = logits.clone().requires_grad_(True)
        (gradient,) = torch.autograd.grad(loss(leaf, targets), leaf, create_graph=True)
        return torch.stack([torch.autograd.grad(entry, leaf, retain_graph=True,
                                                allow_unused=True)[0].reshape(-1)
                            for entry in gradient.reshape(-1)])

    ours, torch_s = _errors_per_entry(loss_hessian, loss_fn, reference_fn)
    assert ours < 1e-13
    assert torch_s > 1e-8


def _replaced(value: torch.Tensor) -> bool:
    """Whether ``value``'s graph holds one of the mode's replacements (a Python function's
    backward node, named after the function; torch's own are ``...Backward0``)."""
    nodes, seen = [value.grad_fn], set()
    while nodes:
        node = nodes.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__.startswith("_"):
            return True
        nodes.extend(next_node for next_node, _ in node.next_functions)
    return False


@pytest.mark.parametrize("loss", ["cross_entropy", "BCEWithLogitsLoss", "logsigmoid"])
@pytest.mark.parametrize(("model_dtype", "logits_dtype", "margin", "safe"), [
    (torch.float64, torch.float64, 2.0, True), (torch.float64, torch.float64, 25.0, True),
    (torch.float32, torch.float64, 2.0, False), (torch.float32, torch.float64, 18.0, False),
    (torch.float32, torch.float64, 25.0, True), (torch.float32, torch.float32, 2.0, True)])
def test_the_safe_backward_runs_where_the_model_s_rounding_would_show_it(
        loss, model_dtype, logits_dtype, margin, safe):
    """A float64 model's products show the amplified rounding at any saturation, and so do a
    float32 model's whose loss runs in float32; a float32 model's on float64 logits (the
    widened loss) only once some ``1 - p_max`` (a sigmoid's ``min(s, 1 - s)``) is below
    ``eps64 / eps32`` = 1.9e-9 (margin 25: 1.4e-11; margin 18: 1.5e-8): torch's own backward
    elsewhere, which costs a third less a product on GPT's logits."""
    logits = torch.zeros(5, 3, dtype=logits_dtype)
    logits[:, 0] = torch.linspace(0.0, margin, 5, dtype=logits_dtype)
    loss_fn = {name: fn for name, fn, *_ in _SATURATING}[loss]
    targets = _TARGETS * 0 if loss == "cross_entropy" else _BINARY * 0 + 1
    with SaturationSafe(model_dtype):
        value = loss_fn(logits.requires_grad_(True), targets)
    assert _replaced(value) == safe


@pytest.mark.parametrize(("loss_fn", "reference_fn", "targets", "cancels"),
                         [case[1:] for case in _SATURATING], ids=[c[0] for c in _SATURATING])
def test_per_sample_gradients_under_vmap_keep_their_digits_at_saturation(loss_fn, reference_fn,
                                                                         targets, cancels):
    """The empirical Fisher reads each sample's loss gradient under ``torch.func.vmap``: there
    the mode's replacements batch too, and ``p_y - 1`` (``s - y``) keeps its digits (per entry
    to 1e-14 of the cancellation-free loss's gradient, where torch's is off by more than
    1e-8)."""
    logits = _saturated_logits()

    def sample_gradients(loss) -> torch.Tensor:
        leaf = logits.clone().requires_grad_(True)
        losses = torch.func.vmap(lambda f, y: loss(f[None], y[None]))(leaf, targets)
        return torch.autograd.grad(losses.sum(), leaf)[0]

    ours, torch_s = _errors_per_entry(sample_gradients, loss_fn, reference_fn)
    assert ours < 1e-14
    assert (torch_s > 1e-8) == cancels


@pytest.mark.parametrize("weight_shape", [(5, 1), (5, 3), (3,)], ids=["per sample", "mask",
                                                                     "per class"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_a_captured_weight_broadcasts_each_sample_s_loss_under_vmap(weight_shape, reduction):
    """The empirical Fisher reads ``loss_fn(f_i[None], y_i[None])`` under ``vmap``: a loss that
    captured the batch's ``weight`` (``[n, 1]``, a mask ``[n, C]``) broadcasts each sample's
    logits to the batch's shape. The replacement's backward assumed the logits' shape and
    raised (a float64 model's ``fisher`` crashed; probe 125); its gradients are torch's."""
    logits = _logits(3.0)
    targets = _BINARY.to(torch.float64)
    weight = torch.linspace(0.5, 2.0, 15, dtype=torch.float64)[:int(torch.tensor(
        weight_shape).prod())].reshape(weight_shape)

    def sample_gradients(mode) -> torch.Tensor:
        leaf = logits.detach().clone().requires_grad_(True)
        with mode:
            losses = torch.func.vmap(lambda f, y: F.binary_cross_entropy_with_logits(
                f[None], y[None], weight, reduction=reduction))(leaf, targets)
        return torch.autograd.grad(losses.sum(), leaf)[0]

    torch.testing.assert_close(sample_gradients(SaturationSafe(torch.float64)),
                               sample_gradients(contextlib.nullcontext()), rtol=1e-13,
                               atol=1e-15)
