"""Each Gram rule, on every route its cost model can pick, against explicit per-sample gradients
computed by plain autograd, one sample and one cotangent at a time (float64).

A rule's ``gram()`` must equal ``Z Z^T`` and its ``weighted_gradients(w)`` must equal
``sum_{k,i} w_ki Z_ki`` for ``Z_ki`` the gradient of ``<layer(x_i), d_ki>``, and so must the pair
``gram_and_claims(w)`` (which the gradient check uses); routes are forced by replacing the
module's cost function.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from reference import (
    Conv1D,
    assert_spectra_close,
    classification_batch,
    eigenvalues_by_magnitude,
    mlp,
    reference_fisher,
    reference_ggn,
)
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

import hessrank
from hessrank.curvature import row_gram
from hessrank.curvature.rules import conv, embedding, factors, linear, rule_for

CHEAP_FIRST, CHEAP_SECOND = (lambda *a: (0.0, 1.0)), (lambda *a: (1.0, 0.0))


@dataclass
class RuleCase:
    name: str
    layer: Callable[[], nn.Module]
    inputs: Callable[[torch.Generator], Tensor]
    #: (module, name of its cost function, replacement) forcing one route; None: the default
    force: tuple[object, str, Callable[..., tuple[float, float]]] | None = None
    rule: str = ""
    #: the sample dimension of the input, and of each output tensor (an LSTM returns three)
    input_dim: int = 0
    output_dims: tuple[int, ...] = (0,)
    #: an :data:`~hessrank.curvature.rules.factors.EXPLICIT_BLOCK_BYTES` small enough to form
    #: the explicit per-sample gradients in several blocks
    block_bytes: int | None = None
    #: (a rule's module, a :data:`~hessrank.curvature.rules.factors.CHUNK_BYTES` for it) small
    #: enough to form its per-sample gradients in several chunks: a convolution's of output
    #: channels, an embedding's of dimensions and distinct tokens
    chunks: tuple[object, int] | None = None


def _x(*shape):
    return lambda g: torch.randn(*shape, generator=g, dtype=torch.float64)


def _tokens(*shape, vocab=5):
    return lambda g: torch.randint(0, vocab, shape, generator=g)


def _bn(cls, channels):
    def build():
        layer = cls(channels)
        layer.running_mean.uniform_(-1, 1)
        layer.running_var.uniform_(0.5, 2)
        return layer.eval()
    return build


def _affine(layer: nn.Module) -> nn.Module:
    with torch.no_grad():  # away from the initial ones and zeros
        for p in layer.parameters():
            p.uniform_(0.5, 1.5)
    return layer


CASES = [
    RuleCase("conv2d offsets", lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1), _x(3, 3, 7, 6),
             (conv, "route_costs", CHEAP_SECOND), "conv"),
    RuleCase("conv2d position pairs", lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1),
             _x(3, 3, 7, 6), (conv, "route_costs", CHEAP_FIRST), "conv"),
    RuleCase("conv2d grouped, dilated, circular", lambda: nn.Conv2d(
        4, 6, (2, 3), groups=2, dilation=(2, 1), padding=(1, 2), padding_mode="circular"),
        _x(2, 4, 6, 5), rule="conv"),
    RuleCase("conv2d depthwise 'same'", lambda: nn.Conv2d(3, 3, 4, groups=3, padding="same"),
             _x(3, 3, 5, 5), rule="conv"),
    RuleCase("conv2d grouped, chunks within a group", lambda: nn.Conv2d(4, 6, 3, groups=2),
             _x(3, 4, 5, 5), (conv, "route_costs", CHEAP_SECOND), "conv", chunks=(conv, 1728)),
    RuleCase("conv2d grouped, chunks of whole groups", lambda: nn.Conv2d(4, 8, 3, groups=4),
             _x(3, 4, 5, 5), (conv, "route_costs", CHEAP_SECOND), "conv", chunks=(conv, 1728)),
    RuleCase("conv1d offsets, no bias", lambda: nn.Conv1d(2, 3, 3, stride=2, bias=False),
             _x(3, 2, 9), (conv, "route_costs", CHEAP_SECOND), "conv"),
    RuleCase("conv1d pairs, reflect", lambda: nn.Conv1d(2, 3, 3, padding=2,
                                                        padding_mode="reflect"),
             _x(3, 2, 6), (conv, "route_costs", CHEAP_FIRST), "conv"),
    RuleCase("linear tokens, pairs", lambda: nn.Linear(3, 2), _x(3, 4, 3),
             (factors, "kronecker_costs", CHEAP_FIRST), "linear"),
    RuleCase("linear tokens, per-sample", lambda: nn.Linear(3, 2), _x(3, 4, 3),
             (factors, "kronecker_costs", CHEAP_SECOND), "linear"),
    RuleCase("linear tokens, per-sample, a row block at a time", lambda: nn.Linear(3, 5),
             _x(3, 4, 3), (factors, "kronecker_costs", CHEAP_SECOND), "linear",
             block_bytes=2 * 3 * 4 * 8),
    RuleCase("HuggingFace Conv1D tokens, pairs", lambda: Conv1D(2, 3), _x(3, 4, 3),
             (factors, "kronecker_costs", CHEAP_FIRST), "hf-conv1d"),
    RuleCase("HuggingFace Conv1D tokens, per-sample", lambda: Conv1D(5, 3), _x(3, 4, 3),
             (factors, "kronecker_costs", CHEAP_SECOND), "hf-conv1d", block_bytes=2 * 3 * 4 * 8),
    RuleCase("HuggingFace Conv1D, one position", lambda: Conv1D(4, 3), _x(3, 3),
             rule="hf-conv1d"),
    RuleCase("embedding token pairs", lambda: nn.Embedding(5, 3), _tokens(4, 6),
             (embedding, "route_costs", CHEAP_FIRST), "embedding"),
    RuleCase("embedding distinct rows", lambda: nn.Embedding(5, 3), _tokens(4, 6),
             (embedding, "route_costs", CHEAP_SECOND), "embedding"),
    RuleCase("embedding distinct rows, chunks of tokens", lambda: nn.Embedding(5, 3),
             _tokens(4, 6), (embedding, "route_costs", CHEAP_SECOND), "embedding",
             chunks=(embedding, 224)),
    RuleCase("embedding padding_idx, [n, T1, T2]", lambda: nn.Embedding(5, 3, padding_idx=1),
             _tokens(3, 2, 3), rule="embedding"),
    RuleCase("LayerNorm over the last two dims", lambda: _affine(nn.LayerNorm((3, 4))),
             _x(3, 2, 3, 4), rule="norm"),
    RuleCase("LayerNorm without bias", lambda: _affine(nn.LayerNorm(4, bias=False)),
             _x(3, 5, 4), rule="norm"),
    RuleCase("GroupNorm", lambda: _affine(nn.GroupNorm(2, 4)), _x(3, 4, 3, 2), rule="norm"),
    RuleCase("BatchNorm1d eval on [n, C]", _bn(nn.BatchNorm1d, 4), _x(3, 4), rule="norm"),
    RuleCase("BatchNorm2d eval", _bn(nn.BatchNorm2d, 3), _x(3, 3, 2, 4), rule="norm"),
    RuleCase("PReLU per channel on [n, C, H, W]", lambda: _affine(nn.PReLU(3)),
             _x(3, 3, 2, 4), rule="prelu"),
    RuleCase("PReLU per feature on [n, C]", lambda: _affine(nn.PReLU(4)), _x(3, 4), rule="prelu"),
    RuleCase("PReLU, one weight, on [n, T, d]", lambda: _affine(nn.PReLU()), _x(3, 5, 4),
             rule="prelu"),
    RuleCase("LSTM, batch first", lambda: nn.LSTM(3, 4, batch_first=True), _x(3, 5, 3),
             rule="lstm", output_dims=(0, 1, 1)),
    RuleCase("LSTM, sequence first, no bias", lambda: nn.LSTM(3, 4, bias=False), _x(5, 3, 3),
             rule="lstm", input_dim=1, output_dims=(1, 1, 1)),
    RuleCase("LSTM, 3 layers", lambda: nn.LSTM(3, 4, num_layers=3, batch_first=True),
             _x(3, 5, 3), rule="lstm", output_dims=(0, 1, 1)),
    RuleCase("LSTM, per-sample rows a gate block at a time",
             lambda: nn.LSTM(3, 4, batch_first=True), _x(3, 5, 3),
             (factors, "kronecker_costs", CHEAP_SECOND), "lstm", output_dims=(0, 1, 1),
             block_bytes=3 * 3 * 9 * 8 * 5),
    RuleCase("LSTM, 2 layers, both directions, sequence first",
             lambda: nn.LSTM(3, 4, num_layers=2, bidirectional=True), _x(5, 3, 3), rule="lstm",
             input_dim=1, output_dims=(1, 1, 1)),
    RuleCase("GRU, batch first", lambda: nn.GRU(3, 4, batch_first=True), _x(3, 5, 3),
             rule="gru", output_dims=(0, 1)),
    RuleCase("GRU, 2 layers, both directions, no bias",
             lambda: nn.GRU(3, 4, num_layers=2, bidirectional=True, bias=False,
                            batch_first=True), _x(3, 5, 3), rule="gru", output_dims=(0, 1)),
    RuleCase("RNN tanh, 2 layers, sequence first", lambda: nn.RNN(3, 4, num_layers=2),
             _x(5, 3, 3), rule="rnn", input_dim=1, output_dims=(1, 1)),
    RuleCase("RNN relu, both directions", lambda: nn.RNN(3, 4, nonlinearity="relu",
                                                         bidirectional=True, batch_first=True),
             _x(3, 5, 3), rule="rnn", output_dims=(0, 1)),
]


def _explicit(layer: nn.Module, x: Tensor, grads: tuple[Tensor, ...], case: RuleCase
              ) -> dict[str, Tensor]:
    """``{name: [K, n, *shape]}``: gradient of ``<layer(x_i), d_ki>`` (summed over the output
    tensors), one (k, i) at a time."""
    params = dict(layer.named_parameters())
    rows: dict[str, list[Tensor]] = {name: [] for name in params}
    k, n = grads[0].shape[0], x.shape[case.input_dim]
    for kk in range(k):
        for i in range(n):
            outputs = tree_flatten(layer(x.narrow(case.input_dim, i, 1)))[0]
            value = sum((out * grad[kk].narrow(dim, i, 1)).sum()
                        for out, grad, dim in zip(outputs, grads, case.output_dims))
            pieces = torch.autograd.grad(value, list(params.values()))
            for name, piece in zip(params, pieces):
                rows[name].append(piece)
    return {name: torch.stack(r).view(k, n, *params[name].shape) for name, r in rows.items()}


def _split_every_block(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every row Gram split down to single rows (:mod:`hessrank.curvature.row_gram`)."""
    monkeypatch.setattr(row_gram, "SMALLEST_HALVES", ((0, 1),))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
@pytest.mark.parametrize("num_cotangents", [1, 3])
@pytest.mark.parametrize("triangle", [False, True], ids=["row Grams as priced",
                                                          "row Grams split to single rows"])
def test_rule_matches_explicit_per_sample_gradients(case: RuleCase, num_cotangents: int,
                                                    triangle: bool,
                                                    monkeypatch: pytest.MonkeyPatch):
    if triangle:
        _split_every_block(monkeypatch)
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    layer = case.layer().double()
    x = case.inputs(g)
    outputs = tuple(out.detach() for out in tree_flatten(layer(x))[0])
    grads = tuple(torch.randn(num_cotangents, *out.shape, generator=g, dtype=torch.float64)
                  for out in outputs)
    if case.force is not None:
        monkeypatch.setattr(*case.force)
    if case.block_bytes is not None:
        monkeypatch.setattr(factors, "EXPLICIT_BLOCK_BYTES", case.block_bytes)
    if case.chunks is not None:
        monkeypatch.setattr(case.chunks[0], "CHUNK_BYTES", case.chunks[1])
    rule = rule_for(layer)
    assert rule is not None and rule.name == case.rule
    analysed = frozenset(name for name, _ in layer.named_parameters())
    n = x.shape[case.input_dim]
    single = len(outputs) == 1
    layer_factors = rule.factors(layer, x, outputs[0] if single else outputs,
                                 grads[0] if single else grads, n, analysed)
    assert layer_factors is not None
    explicit = _explicit(layer, x, grads, case)
    flat = torch.cat([z.reshape(num_cotangents * n, -1) for z in explicit.values()], 1)
    torch.testing.assert_close(layer_factors.gram(), flat @ flat.T, rtol=1e-12, atol=1e-12)
    weights = torch.randn(num_cotangents, n, generator=g, dtype=torch.float64)
    claimed = layer_factors.weighted_gradients(weights)
    assert sorted(claimed) == sorted(explicit)
    gram, claimed_together = layer_factors.gram_and_claims(weights)
    torch.testing.assert_close(gram, flat @ flat.T, rtol=1e-12, atol=1e-12)
    assert sorted(claimed_together) == sorted(explicit)
    for name, z in explicit.items():
        expected = torch.einsum("kn,kn...->...", weights, z)
        torch.testing.assert_close(claimed[name], expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(claimed_together[name], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("layer", "reason"), [
    (nn.Embedding(5, 3, max_norm=1.0), "max_norm rewrites the weight in the forward pass"),
    (nn.Embedding(5, 3, scale_grad_by_freq=True), "gradient depends on batch token counts"),
    (nn.Embedding(5, 3, sparse=True), "sparse gradients"),
])
def test_rules_do_not_claim_what_they_cannot_compute(layer: nn.Module, reason: str):
    assert rule_for(layer) is None, reason


def test_a_conv1d_outside_transformers_is_not_claimed():
    """The rule claims HuggingFace's class, not any module of that name."""
    mine = type("Conv1D", (Conv1D,), {"__module__": "my_models"})(4, 3)
    assert rule_for(mine) is None
    assert rule_for(Conv1D(4, 3)).name == "hf-conv1d"


def _attention_factors(layer: nn.MultiheadAttention, args: tuple[Tensor, ...],
                       kwargs: dict[str, object]):
    """The attention rule's factors for the call ``layer(*args, **kwargs)``, as a Gram call
    captures it (its output without the weights it does not return)."""
    kwargs = {"need_weights": False, **kwargs}
    out = layer(*args, **kwargs)[0].detach()
    grads = torch.randn(2, *out.shape, dtype=torch.float64)
    return rule_for(layer).factors(
        layer, args[0].detach(), (out,), (grads,), out.shape[0],
        frozenset(name for name, _ in layer.named_parameters()), (args, kwargs))


@pytest.mark.parametrize("call", [
    lambda x, memory: ((x, memory, memory), {}),
    lambda x, memory: ((x, memory, memory),
                       {"key_padding_mask": torch.arange(5).expand(3, 5) > 3}),
    lambda x, memory: ((x, memory, memory), {"attn_mask": torch.eye(4, 5, dtype=torch.bool)}),
    lambda x, memory: ((x, x.clone(), x.clone()), {}),
    lambda x, memory: ((x, x, memory[:, :4]), {}),
    lambda x, memory: ((x,), {"key": memory, "value": memory}),
], ids=["longer memory", "longer memory, key padding mask [n, S]", "longer memory, mask [L, S]",
        "same length, other tensors", "value not the query", "keys by keyword"])
def test_attention_rule_declines_cross_attention(call):
    """The rule assumes self-attention (key and value are the query itself) and declines every
    other call up front, masks of the key length included: the general path takes them."""
    layer = nn.MultiheadAttention(4, 2, batch_first=True).double()
    g = torch.Generator().manual_seed(0)
    x, memory = (torch.randn(3, length, 4, generator=g, dtype=torch.float64)
                 for length in (4, 5))
    assert _attention_factors(layer, (x, x, x), {}) is not None  # self-attention is claimed
    assert _attention_factors(layer, *call(x, memory)) is None


def _broken_linear_rule(monkeypatch: pytest.MonkeyPatch, raised: Exception,
                        where: str = "factors") -> None:
    def broken(*args, **kwargs):
        raise raised

    if where == "factors":
        monkeypatch.setattr(linear.LinearRule, "tensor_factors", broken)
    else:
        monkeypatch.setattr(factors.LayerFactors, "gram_and_claims", broken)


@pytest.mark.parametrize("where", ["factors", "gram"])
def test_a_rule_that_raises_leaves_its_layers_to_the_general_path(monkeypatch, where: str):
    """A rule is a verified shortcut: an error in it, in its factors or in their Gram (which
    had stopped the call: a Linear on zero positions; probe 231), sends its layers to the
    general path with the error in a note, and the numbers are the reference's."""
    _broken_linear_rule(monkeypatch, RuntimeError("shape '[4, 1, 1, 3]' is invalid"), where)
    _every_layer_on_the_general_path_with(
        "linear rule raised RuntimeError on '0' (shape '[4, 1, 1, 3]' is invalid)")


def _every_layer_on_the_general_path_with(note: str) -> None:
    """``fisher`` on an MLP: every layer computed by the general path, ``note`` among the
    result's notes, and the numbers the reference's."""
    model, (x, y), loss = mlp(), classification_batch(6, 5, 3), nn.CrossEntropyLoss()
    result = hessrank.effective_rank(model, loss, (x, y), method="fisher")
    assert set(result.paths.values()) == {"torch.func"}
    assert any(note in found for found in result.notes), result.notes
    reference = eigenvalues_by_magnitude(reference_fisher(model, loss, x, y, 1 / 6))
    assert_spectra_close(result.eigenvalues, reference, rtol=1e-9)


class _InPlaceAfterView(nn.Module):
    """A rule layer whose output is a view (``nn.Linear`` over tokens, ``nn.MultiheadAttention``
    batch first) written in place downstream: a residual through a frozen layer, or a scale."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.proj = nn.Linear(4, 8)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.frozen = nn.Linear(8, 8).requires_grad_(False)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.proj(x)
        if self.kind == "residual":
            h += torch.tanh(self.frozen(h))
        elif self.kind == "attention":
            a = self.attention(h, h, h, need_weights=False)[0]
            a += h
            h = a
        else:
            h.mul_(1.5)
        return self.head(h.mean(1))


@pytest.mark.parametrize("kind", ["residual", "scaled", "attention"])
@pytest.mark.parametrize("method", ["fisher", "ggn"])
def test_a_rule_layers_view_output_written_in_place(kind: str, method: str):
    """The rewritten view had been cut out of the graph: torch's engine failed an internal
    assertion (the residual), or the layer's output gradient came back None and its rule failed
    its check, leaving the layer to the general path with a note of a relative error (probe
    214). Its base's gradient is taken instead: the rules compute every layer, and the numbers
    are the reference's."""
    torch.manual_seed(0)
    model = _InPlaceAfterView(kind).double()
    x = torch.randn(6, 5, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    loss = nn.CrossEntropyLoss()
    result = hessrank.effective_rank(model, loss, (x, y), method=method)
    used = {"proj", "head", *(("attention",) if kind == "attention" else ())}
    assert {name.split(".")[0] for name, path in result.paths.items()
            if path != "torch.func"} == used, result.paths
    make = reference_fisher if method == "fisher" else reference_ggn
    names = [name for name, p in model.named_parameters()
             if p.requires_grad and name.split(".")[0] in used]
    reference = eigenvalues_by_magnitude(make(model, loss, x, y, 1 / 6, names=names))
    assert_spectra_close(result.eigenvalues, reference, rtol=1e-9)


def test_a_failed_capturing_backward_leaves_the_rules_layers_to_the_general_path(monkeypatch):
    """An error in the capturing backward pass (torch's engine) sends every rule's layers to
    the general path, with the error in a note."""
    from hessrank.curvature import gram

    def failing(*args, **kwargs):
        raise RuntimeError("INTERNAL ASSERT FAILED")

    monkeypatch.setattr(gram, "_backward_batched", failing)
    _every_layer_on_the_general_path_with("capturing backward pass failed (INTERNAL ASSERT FAILED)")


def test_a_rule_out_of_memory_is_raised(monkeypatch):
    """Running out of memory is not the rule's fault (the general path needs memory too)."""
    _broken_linear_rule(monkeypatch, torch.OutOfMemoryError("CUDA out of memory"))
    with pytest.raises(torch.OutOfMemoryError):
        hessrank.effective_rank(mlp(), nn.CrossEntropyLoss(), classification_batch(6, 5, 3),
                                method="fisher")


def test_one_group_convolutions_take_the_patches_on_an_accelerator():
    """ResNet-18's first stage at n = 128 (64 positions, 64 to 64 channels, 3 x 3): the CPU
    forms it by samples as groups, an accelerator by the input's patches, where cuDNN's grouped
    weight gradient ran 1.8-8.7 times slower (``benchmarks/conv_routes.py``); a grouped
    convolution has no patches route anywhere."""
    patches_cost, groups_cost = conv.route_costs(128, 64, 64, 64, 9, 1)
    assert patches_cost >= groups_cost
    patches_cost, groups_cost = conv.route_costs(128, 64, 64, 64, 9, 1, "cuda")
    assert patches_cost < groups_cost
    assert conv.route_costs(128, 64, 64, 64, 9, 2, "cuda")[0] == float("inf")


def test_norm_rule_declines_batch_statistics():
    layer = nn.BatchNorm1d(3).double()  # training: batch statistics couple the samples
    x = torch.randn(4, 3, dtype=torch.float64)
    grads = torch.randn(1, 4, 3, dtype=torch.float64)
    analysed = frozenset({"weight", "bias"})
    assert rule_for(layer).factors(layer, x, layer(x).detach(), grads, 4, analysed) is None
    untracked = nn.BatchNorm1d(3, track_running_stats=False).double().eval()
    assert rule_for(untracked).factors(untracked, x, untracked(x).detach(), grads, 4,
                                       analysed) is None


@pytest.mark.parametrize(("positions", "route"), [(1, None), (3, CHEAP_FIRST)],
                         ids=["one position", "position pairs"])
@pytest.mark.parametrize("num_cotangents", [1, 2])
@pytest.mark.parametrize("transposed", [False, True], ids=["[out, in]", "[in, out]"])
def test_wide_kronecker_claims_come_through_a_probe(positions: int, route, num_cotangents: int,
                                                    transposed: bool,
                                                    monkeypatch: pytest.MonkeyPatch):
    """With a probe generator, a weight wide enough for it to pay is claimed as ``C R``
    (:class:`factors.Projected`): equal to the whole claim times the probe, also for a weight
    stored ``[in, out]``; the bias, the Gram and the claims without a generator are as before."""
    if route is not None:
        monkeypatch.setattr(factors, "kronecker_costs", route)
    g = torch.Generator().manual_seed(0)
    n, d_in, d_out = 64, 192, 160
    layer = factors.LayerFactors(
        torch.randn(n, positions, d_in, generator=g, dtype=torch.float64),
        torch.randn(num_cotangents, n, positions, d_out, generator=g, dtype=torch.float64),
        torch.Size((d_in, d_out) if transposed else (d_out, d_in)), with_bias=True,
        weight_transposed=transposed)
    assert factors._projection_pays(n * positions, d_in, d_out)
    weights = torch.randn(num_cotangents, n, generator=g, dtype=torch.float64)
    exact = layer.weighted_gradients(weights)
    gram, claims = layer.gram_and_claims(weights, torch.Generator().manual_seed(1))
    torch.testing.assert_close(gram, layer.gram(), rtol=1e-12, atol=1e-12)
    projected = claims["weight"]
    assert isinstance(projected, factors.Projected)
    assert projected.probe.shape == (d_in, factors.PROBE_COLUMNS)
    as_out_in = exact["weight"].T if transposed else exact["weight"]
    torch.testing.assert_close(projected.product, as_out_in @ projected.probe,
                               rtol=1e-12, atol=1e-12)
    assert projected.excess(exact["weight"]) <= 1e-20 * float(exact["weight"].norm()) ** 2
    torch.testing.assert_close(claims["bias"], exact["bias"], rtol=1e-12, atol=1e-12)
    assert all(isinstance(c, Tensor) for c in layer.gram_and_claims(weights)[1].values())


def test_narrow_weight_claims_are_formed():
    """A weight too narrow for the probe to pay (a 10-class head) is claimed whole."""
    g = torch.Generator().manual_seed(0)
    layer = factors.LayerFactors(torch.randn(64, 1, 192, generator=g),
                                 torch.randn(1, 64, 1, 10, generator=g),
                                 torch.Size((10, 192)), with_bias=True)
    _, claims = layer.gram_and_claims(torch.randn(1, 64, generator=g),
                                      torch.Generator().manual_seed(1))
    assert isinstance(claims["weight"], Tensor)


def test_projected_check_is_at_least_as_strict_as_the_whole_comparison():
    """A difference of rank one is the worst case for a probe (chi-square with r degrees of
    freedom): over many probes it still counts at least its whole size, so a claim the
    comparison of whole matrices fails also fails projected (the chance of the opposite is
    below 2e-14 per layer)."""
    g = torch.Generator().manual_seed(0)
    counted = []
    for _ in range(500):
        difference = torch.outer(torch.randn(160, generator=g, dtype=torch.float64),
                                 torch.randn(192, generator=g, dtype=torch.float64))
        probe = torch.randn(192, factors.PROBE_COLUMNS, generator=g, dtype=torch.float64)
        projected = factors.Projected(difference @ probe, probe)
        counted.append(projected.excess(torch.zeros_like(difference))
                       / float(difference.norm()) ** 2)
    assert min(counted) >= 1.0
    # and it is an estimate of the size, not a bound far above it (16x in expectation)
    assert 12 < sum(counted) / len(counted) < 20


@pytest.mark.parametrize(("rows", "columns"), [(512, 600), (513, 600), (300, 513), (260, 2100),
                                               (128, 9000), (256, 100), (5, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_row_gram_is_the_product_of_the_rows(rows: int, columns: int, dtype: torch.dtype):
    """At the thresholds the rules use (split and unsplit shapes, odd row counts), against the
    float64 product; added to a symmetric matrix, the sum."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, columns, generator=g, dtype=dtype)
    start = torch.randn(rows, rows, generator=g, dtype=dtype)
    start = start + start.T
    reference = x.double() @ x.double().T
    tolerance = {"rtol": 0.0, "atol": 64 * columns**0.5 * torch.finfo(dtype).eps
                 * float(reference.diagonal().max())}
    torch.testing.assert_close(row_gram.row_gram(x).double(), reference, **tolerance)
    added = row_gram.add_row_gram(start.clone(), x)
    torch.testing.assert_close(added.double(), start.double() + reference, **tolerance)


def test_row_gram_keeps_small_entries_after_a_large_one():
    """Twelve rows whose first entry is large and whose 256,000 others are small (a sample's
    gradient over many classes, its target's entry first): a float32 Gram summed along a whole
    row drops the small entries after the large one (MKL with few rows on an AVX-512 machine
    lost 1e-4 of the largest entry here, an 8,000-class gradient's Gram 7e-5). Summed in
    blocks of columns, within 2e-6 of the float64 product."""
    g = torch.Generator().manual_seed(0)
    x = 1e-4 * torch.rand(12, 256_000, generator=g) + 1e-4
    x[:, 0] = 1.0 + torch.rand(12, generator=g)
    reference = x.double() @ x.double().T
    error = (row_gram.row_gram(x).double() - reference).abs().max() / reference.abs().max()
    assert error < 2e-6, error


class _LargeMaps(nn.Module):
    """Two 3 x 3 convolutions (8 channels) over 128 x 128 images, averaged, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 5)

    def forward(self, x: Tensor) -> Tensor:
        hidden = torch.relu(self.second(torch.relu(self.first(x))))
        return self.head(hidden.mean((2, 3)))


class _FunctionalMaps(_LargeMaps):
    """The same, its convolutions computed by ``F.conv2d`` on the modules' weights in the
    model's forward: the modules are never called."""

    def forward(self, x: Tensor) -> Tensor:
        for layer in (self.first, self.second):
            x = torch.relu(nn.functional.conv2d(x, layer.weight, layer.bias, padding=1))
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("model_type", [_LargeMaps, _FunctionalMaps])
@pytest.mark.parametrize("method", ["fisher", "ggn"])
def test_long_float32_sums_pass_the_gradient_check(method: str, model_type: type[nn.Module]):
    """A float32 convolution's batch gradient sums n x 16,384 positions an entry, rounded (on
    one thread) by up to 6,000 units against its size, beyond the fixed tolerance of 1,024: the
    rule's factors and then the general path's failed the check, and the model was refused as
    mixing its samples (relative error 3.3-7.2e-4; probe 108). Each group's tolerance now grows
    with its sums; the float32 spectrum matches per-sample gradients of the float64 model.
    Written with ``F.conv2d`` on the modules' weights, the modules record no output: the
    general path's check had kept the fixed tolerance, and refused it (probe 185); the
    operations that take each parameter record their sums' length."""
    torch.manual_seed(0)
    model = model_type()
    inputs = torch.randn(16, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, 5, (16,), generator=torch.Generator().manual_seed(2))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one long sum: the largest rounding measured
    try:
        result = hessrank.effective_rank(model, nn.CrossEntropyLoss(), (inputs, targets), method)
    finally:
        torch.set_num_threads(threads)
    # the rules passed their check, or the general path's where no rule sees the layers
    assert set(result.paths.values()) == (
        {"conv", "linear"} if model_type is _LargeMaps else {"torch.func", "linear"})
    twin = [model.double(), nn.CrossEntropyLoss(reduction="sum"), inputs.double(), targets,
            1 / len(targets)]
    reference = (reference_fisher if method == "fisher" else reference_ggn)(*twin)
    assert_spectra_close(result.eigenvalues, eigenvalues_by_magnitude(reference), count=8,
                         rtol=1e-5)


class _AutocastConv(nn.Module):
    """A convolution under bfloat16 autocast (``functional``: through ``F.conv2d`` on the
    module's weights, the module never called), a linear head."""

    def __init__(self, functional: bool = True) -> None:
        super().__init__()
        self.first, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 5)
        self.functional = functional

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hidden = torch.relu(nn.functional.conv2d(x, self.first.weight, self.first.bias,
                                                     padding=1) if self.functional
                                else self.first(x)).to(x.dtype)
        return self.head(hidden.mean((2, 3)))


class _MixingPositions(nn.Module):
    """A positional embedding ``[1, T, D]`` added to the inputs, then a mean over the batch
    (``h - 1e-3 h.mean(0)``): it mixes the samples a little."""

    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Parameter(0.1 * torch.randn(1, 256, 64))
        self.lin = nn.Linear(64, 5)

    def forward(self, x: Tensor) -> Tensor:
        hidden = x + self.pos
        hidden = hidden - 1e-3 * hidden.mean(0, keepdim=True)
        return self.lin(torch.tanh(hidden)).mean(1)


@pytest.mark.parametrize("method", ["fisher", "ggn"])
@pytest.mark.parametrize("case", ["autocast", "autocast-module", "positions"])
def test_the_long_sums_allowance_is_the_parameters_sums(case: str, method: str):
    """The long sums' allowance had read the bfloat16 outputs' epsilon under autocast (a
    tolerance of 23: the half-precision model passed) and a positional embedding's sums as n T D
    terms (its gradient sums n: a model mixing its samples passed; probe 189). Both are refused
    again, the first naming bfloat16; so is the module called under autocast, which the
    convolution rule had met with oneDNN's unexplained error (probe 189)."""
    torch.manual_seed(0)
    if case.startswith("autocast"):
        model = _AutocastConv(functional=case == "autocast")
        batch = (torch.randn(8, 3, 32, 32), torch.randint(0, 5, (8,)))
        match = r"computes in half precision \(first: torch.bfloat16 from conv2d"
    else:
        model = _MixingPositions()
        batch = (torch.randn(8, 256, 64), torch.randint(0, 5, (8,)))
        match = "mixes the samples"
    with pytest.raises(ValueError, match=match):
        hessrank.effective_rank(model, nn.CrossEntropyLoss(), batch, method)


class _PerTokenUnderVmap(nn.Module):
    """A per-token MLP through ``torch.func.vmap`` over the tokens, mean-pooled, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 4))
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        tokens = torch.func.vmap(self.mlp, in_dims=1, out_dims=1)(x)
        return self.head((x + tokens).mean(1))


class _PoolingProjection(nn.Module):
    """A projection of every token that mean-pools them inside its own forward (``[n, T, 4]``
    to ``[n, 6]``)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(0.5 * torch.randn(6, 4))
        self.bias = nn.Parameter(torch.zeros(6))

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x @ self.weight.T + self.bias).mean(1)


class _PooledTokens(nn.Module):
    """:class:`_PoolingProjection`, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.pooling = _PoolingProjection()
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pooling(x))


@pytest.mark.parametrize(("model_type", "seed", "method"),
                         [(_PerTokenUnderVmap, 0, "fisher"), (_PerTokenUnderVmap, 0, "ggn"),
                          (_PooledTokens, 1, "ggn"), (_PooledTokens, 2, "ggn")])
def test_long_float32_sums_under_vmap_or_pooled_in_a_module_pass_the_gradient_check(
        model_type: type[nn.Module], seed: int, method: str):
    """Over 65,536 tokens (n = 8), a float32 per-token MLP under ``vmap``, whose tensors' sizes
    inside it are one token's, had its sums counted 8 long, and a parameter's module that
    pools inside its own forward had them counted by its pooled output: both kept the fixed
    tolerance (relative error 3.5-4.5e-4 against 1.2e-4) and were refused as mixing their
    samples (probe 194: 4 of 4 calls, 2 of 3 seeds). Their float32 spectra match per-sample
    gradients of the float64 model."""
    torch.manual_seed(seed)
    model = model_type()
    generator = torch.Generator().manual_seed(100 + seed)
    inputs = 3 * torch.randn(8, 65_536, 4, generator=generator) + 4
    targets = torch.randint(0, 3, (8,), generator=generator)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # (the rounding the probe met)
    try:
        result = hessrank.effective_rank(model, nn.CrossEntropyLoss(), (inputs, targets), method)
    finally:
        torch.set_num_threads(threads)
    twin = [model.double(), nn.CrossEntropyLoss(reduction="sum"), inputs.double(), targets,
            1 / len(targets)]
    reference = (reference_fisher if method == "fisher" else reference_ggn)(*twin)
    assert_spectra_close(result.eigenvalues, eigenvalues_by_magnitude(reference), count=3,
                         rtol=1e-5)


class _HalfBackwardLinear(torch.autograd.Function):
    """``x W^T + b``, its backward rounded through float16."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight)
        return x @ weight.T + bias

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x, weight = ctx.saved_tensors
        return ((grad.half() @ weight.half()).to(grad.dtype),
                (grad.half().T @ x.half()).to(grad.dtype), grad.sum(0))


class _HalfHeadCNN(_LargeMaps):
    """The same layers, the head through :class:`_HalfBackwardLinear`."""

    def forward(self, x: Tensor) -> Tensor:
        hidden = torch.relu(self.second(torch.relu(self.first(x)))).mean((2, 3))
        return _HalfBackwardLinear.apply(hidden, self.head.weight, self.head.bias)


def test_the_products_allowance_is_their_measured_rounding():
    """A CNN over 32 x 32 (n = 8: sums of 8,192 terms, which round the plain model's products
    by 2e-6) whose head rounds its backward through float16: its products' antisymmetric part,
    1.7e-4, had passed an allowance of 32 sqrt(L) epsilons (3.5e-4, 170 times the sums'
    rounding) under a note blaming the model's long sums (probe 189). ``L / 32`` epsilons
    leaves the agreement tolerance there: refused as a wrong second derivative."""
    torch.manual_seed(0)
    model = _HalfHeadCNN()
    batch = (torch.randn(8, 3, 32, 32), torch.randint(0, 5, (8,)))
    with pytest.raises(ValueError, match="not (symmetric|linear)"):
        hessrank.effective_rank(model, nn.CrossEntropyLoss(), batch, "lanczos",
                                lanczos_steps=10)


def test_long_float32_sums_pass_the_products_checks():
    """A float32 ReLU CNN over 256 x 256 positions: its EF-vector products' linearity (and, on
    other seeds, symmetry) checks measured 2-6e-4 of their size, beyond the 1.2e-4 any model is
    allowed, and ``fisher_lanczos`` and ``lanczos`` refused it as noisy or a wrong second
    derivative (probe 185; 6 of 6 calls on 3 seeds). The checks allow the rounding of the
    layers' sums, as the gradient check does, with a note; the spectrum matches the float64
    copy's ``fisher``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    inputs, targets = torch.randn(8, 3, 256, 256), torch.randint(0, 10, (8,))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # (the rounding the probe met)
    try:
        result = hessrank.effective_rank(model, nn.CrossEntropyLoss(), (inputs, targets),
                                         "fisher_lanczos", lanczos_steps=10)
    finally:
        torch.set_num_threads(threads)
    (note,) = [note for note in result.notes if "long sums" in note]  # (n x 256 x 256 terms)
    assert re.search(r"linearity check passes only within the rounding of the model's long sums "
                     r"\(A\(u \+ v\) - A u - A v \S+ of their size; 1.2e-04 allowed for any "
                     r"model, \S+ for sums of 524,288 terms\)", note), note
    wide = hessrank.effective_rank(model.double(), nn.CrossEntropyLoss(),
                                   (inputs.double(), targets), "fisher")
    assert result.trace == pytest.approx(wide.trace, rel=1e-3)
    assert_spectra_close(result.eigenvalues, wide.eigenvalues, count=3, rtol=1e-3)


@pytest.mark.parametrize("method", ["fisher", "ggn"])
def test_long_float32_sums_of_a_layer_no_rule_covers_pass_the_gradient_check(method: str):
    """A decoder of transposed convolutions (no rule: the general path) up to 96 x 96 positions:
    its float32 batch gradients sum n x 2,304 terms an entry, rounded beyond the fixed tolerance
    the general path kept (the rules' grew with their sums), and the model was refused as mixing
    its samples on 4 of 6 seeds (relative error 1.5-8.1e-4; probe 176). The general path's
    groups now get the same tolerance; each seed's float32 spectrum matches per-sample
    gradients of the float64 model."""
    for seed in range(6):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.ConvTranspose2d(4, 8, 4, stride=4), nn.Tanh(),
                              nn.ConvTranspose2d(8, 4, 2, stride=2), nn.Tanh(),
                              nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 10))
        inputs, targets = torch.randn(32, 4, 12, 12), torch.randint(0, 10, (32,))
        result = hessrank.effective_rank(model, nn.CrossEntropyLoss(), (inputs, targets),
                                         method)
        assert result.paths["0.weight"] != "conv"  # (the general path's)
        twin = [model.double(), nn.CrossEntropyLoss(reduction="sum"), inputs.double(),
                targets, 1 / len(targets)]
        reference = (reference_fisher if method == "fisher" else reference_ggn)(*twin)
        assert_spectra_close(result.eigenvalues, eigenvalues_by_magnitude(reference), count=8,
                             rtol=1e-5)
