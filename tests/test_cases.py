"""Declarative case list: model x loss x method x backend, each against an independent float64
reference (finite-difference Hessian, explicit-Jacobian GGN of the batch loss, per-sample-loop
Fisher with the loss's own weights). Every model here broke, or gave silently wrong spectra, in
hessrank v1; each one exercises a class of module or loss that a fast path must not get wrong.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from reference import (
    Conv1D,
    assert_spectra_close,
    eigenvalues_by_magnitude,
    flat_gradient,
    reference_hessian,
    saturation_safe_cross_entropy,
)
from torch import Tensor, nn
from torch.nn.utils import prune

import hessrank
from hessrank.curvature.gram import LOOP_PATH, VMAP_PATH

# ------------------------------------------------------------------------------------------------
# references
# ------------------------------------------------------------------------------------------------


def _forward(model: nn.Module, inputs) -> Tensor:
    """The model on a tensor, a tuple (positional) or a dict (keyword) of inputs."""
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(*inputs) if isinstance(inputs, tuple) else model(inputs)


def reference_ggn_full(model, loss_fn, inputs, targets) -> np.ndarray:
    """``J^T (d^2 L / df^2) J`` with the Jacobian of all outputs (row by row, plain autograd)
    and the output Hessian of the batch loss by double backpropagation: no per-sample structure
    assumed."""
    params = [p for p in model.parameters() if p.requires_grad]
    outputs = _forward(model, inputs)
    flat = outputs.reshape(-1)
    jac = torch.stack([flat_gradient(flat[j], params, retain_graph=True)
                       for j in range(flat.numel())])
    f = outputs.detach().reshape(-1).clone().requires_grad_(True)
    (first,) = torch.autograd.grad(loss_fn(f.view_as(outputs), targets), f, create_graph=True)
    rows = [torch.autograd.grad(first[j], f, retain_graph=True, allow_unused=True)[0]
            for j in range(f.numel())]
    out_hessian = torch.stack([torch.zeros_like(f) if r is None else r for r in rows])
    return (jac.T @ out_hessian @ jac).numpy()


def reference_fisher_weighted(model, sample_loss, sample_weights, inputs, targets) -> np.ndarray:
    """``sum_i a_i g_i g_i^T``, ``g_i`` the gradient of ``sample_loss`` on sample i alone (the
    model called on that sample, plain autograd)."""
    params = [p for p in model.parameters() if p.requires_grad]
    size = sum(p.numel() for p in params)
    total = torch.zeros(size, size, dtype=torch.float64)
    for i in range(targets.shape[0]):
        if sample_weights[i] == 0:
            continue
        if isinstance(inputs, dict):
            x_i = {k: v[i : i + 1] for k, v in inputs.items()}
        else:
            x_i = tuple(v[i : i + 1] for v in (inputs if isinstance(inputs, tuple) else (inputs,)))
        g = flat_gradient(sample_loss(_forward(model, x_i), targets[i : i + 1]), params)
        total += sample_weights[i] * torch.outer(g, g)
    return total.numpy()


# ------------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------------

def _seeded(seed: int = 0) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed + 100)


class TokenHead(nn.Module):
    """Embedding + a head applied to ``h.reshape(n * T, d)``: rows are tokens, not samples."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 4)
        self.mix = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, tokens: Tensor) -> Tensor:
        n, t = tokens.shape
        h = torch.tanh(self.mix(self.embed(tokens)))
        return self.head(h.reshape(n * t, -1)).reshape(n, t, -1)


class SequenceFirst(nn.Module):
    """A Linear on ``[T, n, d]`` (sequence first) with ``T == n``: shapes fit the Linear rule, the
    rows are not samples. Only the gradient check can tell."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(3, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:  # x: [n, T, 3]
        h = torch.tanh(self.inner(x.transpose(0, 1)))  # [T, n, 4]
        return self.head(h.transpose(0, 1).mean(dim=1))


class TiedAutoencoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(5, 3)
        self.dec_bias = nn.Parameter(torch.zeros(5))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(torch.tanh(self.enc(x)), self.enc.weight.t(), self.dec_bias)


class ViewOnceAutoencoder(nn.Module):
    """``TiedAutoencoder`` with its decoder's weight a view made once, in ``__init__``: it
    trains as that one does (the view's backward reaches ``enc.weight`` at every step), and
    fisher and ggn had stopped at a raw torch error in their gradient check (probe 229)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(5, 3, dtype=torch.float64)
        self.dec_bias = nn.Parameter(torch.zeros(5, dtype=torch.float64))
        self.dec_weight = self.enc.weight.t()

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(torch.tanh(self.enc(x)), self.dec_weight, self.dec_bias)


class EmptyPrefix(nn.Module):
    """Learned prefix tokens, none of them configured: a Linear over zero positions, which had
    stopped fisher and ggn at a raw error in its rule (probe 231)."""

    def __init__(self) -> None:
        super().__init__()
        self.prefix = nn.Parameter(torch.randn(0, 4))
        self.prefix_proj = nn.Linear(4, 4)
        self.token_proj = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        prefix = self.prefix_proj(self.prefix.expand(x.shape[0], -1, -1))
        return self.head(torch.tanh(torch.cat([prefix, self.token_proj(x)], dim=1)).sum(1))


class OutputHooked(nn.Sequential):
    """An MLP whose first layer's output a forward hook of the user's scales: the rule had
    captured the hooked output as the layer's, failed its check and left the layer to the
    general path (probe 231)."""

    def __init__(self) -> None:
        super().__init__(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
        self[0].register_forward_hook(lambda module, args, output: output * 0.5)


class KeywordCall(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(input=torch.tanh(self.fc(input=x)))


class LSTMClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(3, 4, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.lstm(x)
        return self.head(out[:, -1])


class LSTMWithState(nn.Module):
    """A sequence-first LSTM started from a fixed nonzero state: the LSTM rule's recomputation
    assumes a zero state, so its factors must fail the gradient check."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(3, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        state = torch.full((1, x.shape[0], 4), 0.5, dtype=x.dtype, device=x.device)
        out, (h, _) = self.lstm(x.transpose(0, 1), (state, state))
        return self.head(out.mean(dim=0) + h[0])


class SequenceFirstLSTM(nn.Module):
    """batch_first=False, the final hidden and cell states used besides the outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(3, 4, bias=False)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        out, (h, c) = self.lstm(x.transpose(0, 1))
        return self.head(out[1] + h[0] * c[0])


class GRUClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(3, 3, batch_first=True)
        self.head = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.gru(x)
        return self.head(out.mean(dim=1))


class StackedLSTM(nn.Module):
    """Two layers, both directions, from an explicit zero state (``start``: from a nonzero one,
    which the rule's recomputation does not assume: the rule declines it, and the general path
    takes over)."""

    start = 0.0

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(3, 4, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        state = torch.full((4, x.shape[0], 4), self.start, dtype=x.dtype, device=x.device)
        out, _ = self.lstm(x, (state, state))
        return self.head(out[:, -1])


class StackedLSTMWithState(StackedLSTM):
    start = 0.5


class StackedLSTMWithSmallState(StackedLSTM):
    """A state so small that the rule's error (about 1e-5 of the top eigenvalue) hid under a
    float32 gradient check, which passed it."""

    start = 1e-4


class StackedRNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.RNN(3, 4, num_layers=2, nonlinearity="relu")
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        out, h = self.rnn(x.transpose(0, 1))
        return self.head(out.mean(dim=0) + h[0])


class PackedGRU(nn.Module):
    """Variable-length sequences packed inside ``forward`` (the usual recipe): the GRU's input is
    a ``PackedSequence``, which ``torch.func`` cannot transform (``backend="func"`` goes through
    the per-sample loop)."""

    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(3, 4, num_layers=2, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True,
                                                   enforce_sorted=False)
        return self.head(self.gru(packed)[1][-1])


class PackedBidirectionalLSTM(nn.Module):
    """Packed sequences through two bidirectional LSTM layers; the padded output (its padding
    zeros) and the final states both reach the head."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(3, 4, num_layers=2, bidirectional=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor, lengths: Tensor) -> Tensor:
        packed = nn.utils.rnn.pack_padded_sequence(x.transpose(0, 1), lengths.cpu(),
                                                   enforce_sorted=False)
        out, (h, c) = self.lstm(packed)
        padded = nn.utils.rnn.pad_packed_sequence(out, total_length=x.shape[1])[0]
        return self.head(padded.sum(dim=0) + torch.cat([h[-2], c[-1]], dim=-1))


class _ClampFunction(torch.autograd.Function):
    """An old-style ``autograd.Function`` (no ``setup_context``): ``torch.func`` refuses it."""

    @staticmethod
    def forward(ctx, x):  # noqa: ANN001, ANN205
        ctx.save_for_backward(x)
        return x.clamp(-1, 1)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        (x,) = ctx.saved_tensors
        return grad * (x.abs() < 1)


class ScaledClamp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 5)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 5))
        self.head = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(_ClampFunction.apply(self.fc(x)) * self.scale)


class ConvPReLU(nn.Module):
    """A per-channel PReLU after a convolution: torch.func's vmap returns its per-sample
    gradients batched twice (torch 2.14.1); the PReLU rule, or plain autograd on the general
    path (``backend="func"``), computes them."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.act = nn.PReLU(3)
        self.head = nn.Linear(27, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.act(self.conv(x)).flatten(1))


class Attention(nn.Module):
    """Multi-head self-attention with a residual, LayerNorm and a pooled head."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = x + self.attn(x, x, x, need_weights=False)[0]
        return self.head(self.norm(h).mean(dim=1))


class AttentionVariants(nn.Module):
    """Self-attention returning its per-head weights, used downstream; sequence-first attention
    under a causal mask and a key padding mask; cross-attention of the same length, which the
    attention rule declines (the general path)."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.masked = nn.MultiheadAttention(4, 2, bias=False)
        self.cross = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        out, weights = self.attn(x, x, x, average_attn_weights=False)
        h = out + weights.mean(dim=(1, 3)).unsqueeze(-1)  # [n, L, E] + [n, L, 1]
        causal = nn.Transformer.generate_square_subsequent_mask(x.shape[1], x.device, x.dtype)
        # a sample's keys after its first whose first feature exceeds 0.5 are padding
        padding = (x[..., 0] > 0.5) & (torch.arange(x.shape[1], device=x.device) > 0)
        seq = h.transpose(0, 1)
        y = self.masked(seq, seq, seq, attn_mask=causal, key_padding_mask=padding,
                        need_weights=False)[0].transpose(0, 1)
        z = self.cross(y, x, x, need_weights=False)[0]
        return self.head(torch.tanh(y + z).mean(dim=1))


class CausalEncoder(nn.Module):
    """A decoder-only stack the usual way: a stock encoder layer with a causal mask and
    ``is_causal=True``."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(4, 2, dim_feedforward=6, dropout=0.0,
                                                batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        causal = nn.Transformer.generate_square_subsequent_mask(x.shape[1], x.device, x.dtype)
        return self.head(self.layer(x, src_mask=causal, is_causal=True)[:, -1])


class CrossAttentionDecoder(nn.Module):
    """A stock decoder layer over a memory longer than its target (S = 5, L = 3) under a causal
    target mask, a memory mask ``[L, S]`` and a memory key padding mask ``[n, S]``: the
    self-attention is the rule's, the cross-attention the general path's."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerDecoderLayer(4, 2, dim_feedforward=6, dropout=0.0,
                                                batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, tgt: Tensor, memory: Tensor) -> Tensor:
        length, keys = tgt.shape[1], memory.shape[1]
        causal = nn.Transformer.generate_square_subsequent_mask(length, tgt.device, tgt.dtype)
        memory_mask = torch.zeros(length, keys, dtype=torch.bool, device=tgt.device)
        memory_mask[0, -1] = True
        # a sample's memory positions after its first whose first feature exceeds 0.5 are padding
        padding = (memory[..., 0] > 0.5) & (torch.arange(keys, device=memory.device) > 0)
        out = self.layer(tgt, memory, tgt_mask=causal, memory_mask=memory_mask,
                         memory_key_padding_mask=padding)
        return self.head(out.mean(dim=1))


class LeftPaddedCausal(nn.Module):
    """Decoder-only attention over left-padded sequences: a causal mask and a key padding mask
    leave a padded sample's first query rows no key at all (the attention kernel gives them zero
    weights); every position is pooled, those rows included."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(4, 2, dim_feedforward=6, dropout=0.0,
                                                batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor, padding: Tensor) -> Tensor:
        causal = nn.Transformer.generate_square_subsequent_mask(x.shape[1], x.device, x.dtype)
        return self.head(self.layer(x, src_mask=causal, src_key_padding_mask=padding).mean(1))


def _left_padded(g: torch.Generator) -> tuple[dict[str, Tensor], Tensor]:
    padding = torch.zeros(4, 4, dtype=torch.bool)
    padding[0, :2] = True  # two pads: query rows 0 and 1 see no key
    padding[2, :1] = True
    return ({"x": torch.randn(4, 4, 4, generator=g, dtype=torch.float64), "padding": padding},
            torch.randint(0, 3, (4,), generator=g))


def _additive_padding(g: torch.Generator) -> tuple[dict[str, Tensor], Tensor]:
    """Right-padded sequences whose key padding mask is additive, ``-inf`` at the pads (the
    float form torch accepts beside the boolean one), passed with the inputs."""
    padding = torch.zeros(4, 4, dtype=torch.float64)
    padding[0, 2:] = float("-inf")
    padding[2, 3:] = float("-inf")
    return ({"x": torch.randn(4, 4, 4, generator=g, dtype=torch.float64), "padding": padding},
            torch.randint(0, 3, (4,), generator=g))


class KeywordAttention(nn.Module):
    """Rule layers called by keyword, each by its own ``forward``'s name for its input:
    ``attn(query=, key=, value=)`` and a HuggingFace ``Conv1D(x=)``."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.proj = Conv1D(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = x + self.attn(query=x, key=x, value=x, need_weights=False)[0]
        return self.head(torch.tanh(self.proj(x=h)).mean(dim=1))


class SequenceFirstTransformer(nn.Module):
    """A stock batch_first=False encoder layer, used correctly: inputs transposed to [T, n, d]."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(4, 2, dim_feedforward=6, dropout=0.0)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.layer(x.transpose(0, 1)).mean(dim=0))


class ConvVariants(nn.Module):
    """Grouped, depthwise, dilated, 'same'-padded and reflect-padded convolutions, GroupNorm and
    eval-mode BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.grouped = nn.Conv2d(4, 4, 3, groups=2, padding="same")
        self.depthwise = nn.Conv2d(4, 4, 3, groups=4, dilation=2, padding=2,
                                   padding_mode="reflect")
        self.norm = nn.GroupNorm(2, 4)
        self.conv1d = nn.Conv1d(4, 2, 2, stride=2)
        self.head = nn.Linear(2, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.bn(self.conv(x)))
        h = torch.tanh(self.norm(self.depthwise(torch.tanh(self.grouped(h)))))
        h = torch.tanh(self.conv1d(h.flatten(2)))
        return self.head(h.mean(dim=-1))


class TwiceRegistered(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        shared = nn.Linear(4, 4)
        self.body = nn.Sequential(shared, nn.Tanh(), shared, nn.Tanh())
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


class DictInputs(nn.Module):
    """Called as ``model(**inputs)`` (HuggingFace style)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(6, 3)
        self.fc = nn.Linear(3, 3)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        h = self.embed(input_ids) * attention_mask.unsqueeze(-1)
        return self.fc(torch.tanh(h.sum(dim=1)))


class TinyGPT(nn.Module):
    """Embedding (with a padding row) + positional embedding, pre-norm causal attention block,
    MLP block, final LayerNorm, per-token logits."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(6, 4, padding_idx=0)
        self.pos = nn.Embedding(3, 4)
        self.norm1 = nn.LayerNorm(4)
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.norm2 = nn.LayerNorm(4)
        self.mlp = nn.Sequential(nn.Linear(4, 5), nn.GELU(), nn.Linear(5, 4))
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 3)

    def forward(self, tokens: Tensor) -> Tensor:
        t = tokens.shape[1]
        h = self.tok(tokens) + self.pos(torch.arange(t, device=tokens.device).expand_as(tokens))
        mask = torch.triu(torch.ones(t, t, dtype=torch.bool, device=tokens.device), diagonal=1)
        a = self.norm1(h)
        h = h + self.attn(a, a, a, attn_mask=mask, need_weights=False)[0]
        h = h + self.mlp(self.norm2(h))
        return self.head(self.norm(h))


class GPT2Block(nn.Module):
    """GPT-2's block as HuggingFace writes it: ``Conv1D`` layers (weights ``[in, out]``) for the
    fused query/key/value projection, the attention output and the MLP, causal attention through
    ``scaled_dot_product_attention``, a token embedding, per-token logits."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(6, 4)
        self.ln_1 = nn.LayerNorm(4)
        self.c_attn = Conv1D(12, 4)
        self.c_proj = Conv1D(4, 4)
        self.ln_2 = nn.LayerNorm(4)
        self.c_fc = Conv1D(5, 4)
        self.mlp_proj = Conv1D(4, 5)
        self.head = nn.Linear(4, 3)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.tok(tokens)
        n, t, d = h.shape
        q, k, v = (x.reshape(n, t, 2, d // 2).transpose(1, 2)
                   for x in self.c_attn(self.ln_1(h)).split(d, dim=-1))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.c_proj(attended.transpose(1, 2).reshape(n, t, d))
        h = h + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(h))))
        return self.head(h)


class ResidualConvNet(nn.Module):
    """ResNet-style block (conv-BN-ReLU-conv-BN + shortcut), a strided conv to 1x1 positions
    (the position-pair route) and a 1x1 convolution. The first ReLU acts in place on the
    BatchNorm's output, as torchvision's ``ReLU(inplace=True)`` does."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 6, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(6)
        self.conv1 = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.down = nn.Conv2d(6, 8, 4, stride=4)
        self.point = nn.Conv2d(8, 3, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.bn0(self.stem(x)).relu_()
        h = torch.relu(h + self.bn1(self.conv1(h)))
        return self.point(torch.tanh(self.down(h))).flatten(1)


class Imputing(nn.Module):
    """Missing inputs as NaN, replaced by a learned fill value and flagged (GRU-D style)."""

    def __init__(self):
        super().__init__()
        self.fill = nn.Parameter(torch.linspace(-0.5, 0.5, 3))
        self.net = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2))

    def forward(self, x):
        missing = x.isnan()
        filled = torch.where(missing, self.fill.expand_as(x), x)
        return self.net(torch.cat([filled, missing.to(x.dtype)], dim=1))


def _with_missing(g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Inputs and regression targets with NaN entries (missing values), the last sample's
    targets all missing."""
    x = torch.randn(6, 3, generator=g, dtype=torch.float64)
    x[torch.rand(6, 3, generator=g) < 0.3] = float("nan")
    y = torch.randn(6, 2, generator=g, dtype=torch.float64)
    y[torch.rand(6, 2, generator=g) < 0.3] = float("nan")
    y[-1] = float("nan")
    return x, y


def masked_mse(outputs: Tensor, targets: Tensor) -> Tensor:
    """The mean squared error over the targets that are not NaN."""
    seen = ~targets.isnan()
    return ((outputs - targets.nan_to_num()) ** 2 * seen).sum() / seen.sum()


def _seen_weights(targets: Tensor) -> Tensor:
    seen = (~targets.isnan()).sum(dim=1).double()
    return seen / seen.sum()


def _pruned() -> nn.Module:
    """A convolution and a Linear pruned by torch.nn.utils.prune (the parameter is weight_orig,
    the weight a forward pre-hook's product with a mask buffer)."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 3))
    prune.l1_unstructured(model[0], "weight", amount=0.4)
    prune.random_structured(model[3], "weight", amount=0.3, dim=1)
    return model


def _running_stats(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            with torch.no_grad():
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return model


def _tokens(n, t, vocab, g):
    return torch.randint(0, vocab, (n, t), generator=g)


# ------------------------------------------------------------------------------------------------
# losses: the batch loss and, for the Fisher reference, the per-sample loss and its weights
# ------------------------------------------------------------------------------------------------

CE = nn.CrossEntropyLoss()


def token_ce(outputs: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1))


CLASS_WEIGHTS = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)
WEIGHTED_CE = nn.CrossEntropyLoss(weight=CLASS_WEIGHTS)
IGNORING_CE = nn.CrossEntropyLoss(ignore_index=2)
MSE = nn.MSELoss()
SUM_CE = nn.CrossEntropyLoss(reduction="sum")


def _mean_weights(targets: Tensor) -> Tensor:
    return torch.full((targets.shape[0],), 1.0 / targets.shape[0], dtype=torch.float64)


def _class_weights(targets: Tensor) -> Tensor:
    w = CLASS_WEIGHTS[targets]
    return w / w.sum()


def _ignore_weights(targets: Tensor) -> Tensor:
    kept = (targets != 2).double()
    return kept / kept.sum()


def _ones(targets: Tensor) -> Tensor:
    return torch.ones(targets.shape[0], dtype=torch.float64)


@dataclass
class Case:
    """One model and loss, the methods and backends to check, and the paths to expect."""

    name: str
    build: Callable[[], tuple[nn.Module, object, Tensor]]
    loss: Callable[[Tensor, Tensor], Tensor] = CE
    #: per-sample loss and its weights in the batch loss, for the Fisher reference
    sample_loss: Callable[[Tensor, Tensor], Tensor] = CE
    sample_weights: Callable[[Tensor], Tensor] = _mean_weights
    methods: tuple[str, ...] = ("exact", "fisher", "ggn")
    backends: tuple[str, ...] = ("auto", "func")
    #: expected path of some parameters under backend="auto"
    paths: dict[str, str] = field(default_factory=dict)
    #: a note expected under backend="auto" (e.g. a rule that failed its check)
    note: str | None = None


def _mlp_batch(n=6, d=4, classes=3, seed=0):
    g = _seeded(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randint(0, classes, (n,),
                                                                            generator=g)


def _build(model_cls, inputs_fn):
    def build():
        g = _seeded(1)
        model = model_cls().double().eval()  # as evaluated (hessrank's default mode)
        inputs, targets = inputs_fn(g)
        return model, inputs, targets
    return build


CASES = [
    Case("token head on n*T rows", _build(TokenHead, lambda g: (
        _tokens(3, 4, 7, g), torch.randint(0, 3, (3, 4), generator=g))),
        loss=token_ce, sample_loss=token_ce,
        paths={"embed.weight": "embedding", "head.weight": "torch.func",
               "mix.weight": "linear"}),
    Case("sequence-first rows with T == n", _build(SequenceFirst, lambda g: (
        torch.randn(4, 4, 3, generator=g, dtype=torch.float64),
        torch.randint(0, 3, (4,), generator=g))),
        paths={"inner.weight": "torch.func", "head.weight": "linear"},
        note="linear rule's factors for 'inner' failed the gradient check"),
    Case("tied autoencoder (F.linear with enc.weight.t())", _build(TiedAutoencoder, lambda g: (
        torch.randn(5, 5, generator=g, dtype=torch.float64),
        torch.randn(5, 5, generator=g, dtype=torch.float64))),
        loss=MSE, sample_loss=MSE, paths={"enc.weight": "torch.func"},
        note="linear rule's factors for 'enc' failed the gradient check"),
    Case("tied autoencoder, the decoder's view made once", _build(ViewOnceAutoencoder, lambda g: (
        torch.randn(5, 5, generator=g, dtype=torch.float64),
        torch.randn(5, 5, generator=g, dtype=torch.float64))),
        loss=MSE, sample_loss=MSE),
    Case("a Linear over zero prefix positions", _build(EmptyPrefix, lambda g: (
        torch.randn(4, 3, 4, generator=g, dtype=torch.float64),
        torch.randint(0, 3, (4,), generator=g))),
        paths={"token_proj.weight": "linear", "prefix_proj.weight": "linear"}),
    Case("a forward hook scaling a Linear's output", _build(OutputHooked, lambda g: _mlp_batch()),
         paths={"0.weight": "linear", "2.weight": "linear"}),
    Case("keyword-argument module calls", _build(KeywordCall, lambda g: _mlp_batch(5, 4)),
         paths={"fc.weight": "linear", "out.bias": "linear"}),
    Case("LSTM classifier", _build(LSTMClassifier, lambda g: (
        torch.randn(4, 3, 3, generator=g, dtype=torch.float64),
        torch.randint(0, 3, (4,), generator=g))),
        paths={"lstm.weight_ih_l0": "lstm", "lstm.bias_hh_l0": "lstm", "head.weight": "linear"}),
    Case("LSTM, sequence first, final states used", _build(SequenceFirstLSTM, lambda g: (
        torch.randn(4, 3, 3, generator=g, dtype=torch.float64),
        torch.randint(0, 3, (4,), generator=g))),
        paths={"lstm.weight_ih_l0": "lstm", "lstm.weight_hh_l0": "lstm"}),
    Case("LSTM from a nonzero initial state", _build(LSTMWithState, lambda g: (
        torch.randn(4, 3, 3, generator=g, dtype=torch.float64),
        torch.randint(0, 3, (4,), generator=g))), methods=("fisher", "ggn"),
        paths={"lstm.weight_ih_l0": "per-sample loop"}),  # declined: no note
    Case("GRU classifier", _build(GRUClassifier, lambda g: (
        torch.randn(4, 3, 3, generator=g, dtype=torch.float64),
        torch.randint(0, 3, (4,), generator=g))),
        paths={"gru.weight_ih_l0": "gru", "gru.bias_hh_l0": "gru"}),
    Case("LSTM, two layers, both directions", _build(StackedLSTM, lambda g: (
        torch.randn(4, 3, 3, generator=g, dtype=torch.float64),
        torch.randint(0, 3, (4,), generator=g))),
        paths={"lstm.weight_ih_l1_reverse": "lstm", "lstm.weight_hh_l0": "lstm"}),
    Case("packed variable-length sequences (GRU)", _build(PackedGRU, lambda g: (
        {"x": torch.randn(4, 5, 3, generator=g, dtype=torch.float64),
         "lengths": torch.tensor([5, 2, 4, 1])},
        torch.randint(0, 3, (4,), generator=g))),
        paths={"gru.weight_ih_l1": "gru", "head.weight": "linear"}),
    Case("packed sequences, two bidirectional LSTM layers", _build(
        PackedBidirectionalLSTM, lambda g: (
            {"x": torch.randn(4, 5, 3, generator=g, dtype=torch.float64),
             "lengths": torch.tensor([2, 5, 1, 4])},
            torch.randint(0, 3, (4,), generator=g))),
        paths={"lstm.weight_hh_l1_reverse": "lstm", "lstm.bias_ih_l0": "lstm"}),
    Case("old-style autograd.Function around a parameter", _build(ScaledClamp, lambda g: (
        2 * torch.randn(5, 4, generator=g, dtype=torch.float64),
        torch.randint(0, 3, (5,), generator=g))),
        paths={"scale": "per-sample loop", "fc.weight": "linear"}),
    Case("per-channel PReLU after a convolution", _build(ConvPReLU, lambda g: (
        torch.randn(4, 2, 5, 5, generator=g, dtype=torch.float64),
        torch.randint(0, 3, (4,), generator=g))),
        paths={"conv.weight": "conv", "act.weight": "prelu"}),
    Case("ReLU RNN, two layers, sequence first", _build(StackedRNN, lambda g: (
        torch.randn(4, 3, 3, generator=g, dtype=torch.float64),
        torch.randint(0, 3, (4,), generator=g))),
        paths={"rnn.weight_hh_l1": "rnn", "rnn.bias_ih_l0": "rnn"}),
    Case("multi-head attention + LayerNorm", _build(Attention, lambda g: (
        torch.randn(4, 3, 4, generator=g, dtype=torch.float64),
        torch.randint(0, 3, (4,), generator=g))),
        paths={"attn.in_proj_weight": "attention", "attn.out_proj.weight": "attention",
               "attn.out_proj.bias": "attention", "norm.weight": "norm",
               "head.weight": "linear"}),
    Case("attention weights used, masked and cross-attention", _build(
        AttentionVariants, lambda g: (torch.randn(4, 3, 4, generator=g, dtype=torch.float64),
                                      torch.randint(0, 3, (4,), generator=g))),
        paths={"attn.in_proj_bias": "attention", "attn.out_proj.weight": "attention",
               "masked.in_proj_weight": "attention", "masked.out_proj.weight": "attention",
               "cross.in_proj_weight": "torch.func", "cross.out_proj.bias": "torch.func"}),
    Case("cross-attention to a longer, masked and padded memory (stock decoder layer)", _build(
        CrossAttentionDecoder, lambda g: (
            {"tgt": torch.randn(4, 3, 4, generator=g, dtype=torch.float64),
             "memory": torch.randn(4, 5, 4, generator=g, dtype=torch.float64)},
            torch.randint(0, 3, (4,), generator=g))),
        paths={"layer.self_attn.in_proj_weight": "attention",
               "layer.self_attn.out_proj.bias": "attention",
               "layer.multihead_attn.in_proj_weight": "torch.func",
               "layer.multihead_attn.out_proj.weight": "torch.func",
               "layer.linear1.weight": "linear", "layer.norm3.weight": "norm"}),
    Case("left-padded causal attention: query rows with no key", _build(
        LeftPaddedCausal, _left_padded),
        paths={"layer.self_attn.in_proj_weight": "attention",
               "layer.self_attn.in_proj_bias": "attention",
               "layer.self_attn.out_proj.weight": "attention",
               "layer.self_attn.out_proj.bias": "attention"}),
    Case("additive -inf key padding mask among the inputs", _build(
        LeftPaddedCausal, _additive_padding),
        paths={"layer.self_attn.in_proj_weight": "attention",
               "layer.self_attn.out_proj.bias": "attention"}),
    Case("attention and Conv1D called by keyword", _build(KeywordAttention, lambda g: (
        torch.randn(4, 3, 4, generator=g, dtype=torch.float64),
        torch.randint(0, 3, (4,), generator=g))),
        paths={"attn.in_proj_weight": "attention", "attn.out_proj.bias": "attention",
               "proj.weight": "hf-conv1d", "head.weight": "linear"}),
    Case("causal self-attention (stock encoder layer, is_causal=True)", _build(
        CausalEncoder, lambda g: (torch.randn(4, 3, 4, generator=g, dtype=torch.float64),
                                  torch.randint(0, 3, (4,), generator=g))),
        paths={"layer.self_attn.in_proj_weight": "attention",
               "layer.self_attn.out_proj.weight": "attention"}),
    Case("stock TransformerEncoderLayer, sequence first", _build(SequenceFirstTransformer,
         lambda g: (torch.randn(3, 3, 4, generator=g, dtype=torch.float64),
                    torch.randint(0, 3, (3,), generator=g))), backends=("auto",),
         paths={"layer.self_attn.in_proj_weight": "attention",
                "layer.self_attn.out_proj.bias": "attention"}),
    Case("conv variants, GroupNorm, eval BatchNorm", _build(ConvVariants, lambda g: (
        torch.randn(3, 2, 5, 5, generator=g, dtype=torch.float64),
        torch.randint(0, 3, (3,), generator=g))),
        paths={"conv.weight": "conv", "grouped.weight": "conv", "depthwise.weight": "conv",
               "conv1d.weight": "conv", "bn.weight": "norm", "bn.bias": "norm",
               "norm.weight": "norm"}),
    Case("Linear registered twice", _build(TwiceRegistered, lambda g: _mlp_batch(5, 4)),
         paths={"body.0.weight": "torch.func", "head.weight": "linear"}),
    Case("dict inputs, model(**inputs)", _build(DictInputs, lambda g: (
        {"input_ids": _tokens(4, 3, 6, g),
         "attention_mask": (torch.rand(4, 3, generator=g) > 0.3).double()},
        torch.randint(0, 3, (4,), generator=g))), paths={"embed.weight": "embedding"}),
    Case("class-weighted cross-entropy", _build(KeywordCall, lambda g: _mlp_batch(6, 4)),
         loss=WEIGHTED_CE, sample_weights=_class_weights, methods=("fisher", "ggn")),
    Case("ignore_index cross-entropy", _build(KeywordCall, lambda g: (
        torch.randn(6, 4, generator=g, dtype=torch.float64),
        torch.tensor([0, 2, 1, 2, 0, 1]))),
        loss=IGNORING_CE, sample_loss=IGNORING_CE, sample_weights=_ignore_weights,
        methods=("fisher", "ggn")),
    Case("sum-reduced cross-entropy", _build(KeywordCall, lambda g: _mlp_batch(5, 4)),
         loss=SUM_CE, sample_loss=SUM_CE, sample_weights=_ones, methods=("fisher", "ggn")),
    Case("plain-function loss (mean of squares)", _build(KeywordCall, lambda g: (
        torch.randn(5, 4, generator=g, dtype=torch.float64),
        torch.randn(5, 3, generator=g, dtype=torch.float64))),
        loss=lambda f, y: ((f - y) ** 2).sum(dim=1).mean(),
        sample_loss=lambda f, y: ((f - y) ** 2).sum(dim=1).mean(), methods=("fisher", "ggn")),
    Case("missing values as NaN, replaced in the model, masked in the loss",
         _build(Imputing, _with_missing), loss=masked_mse, sample_loss=masked_mse,
         sample_weights=_seen_weights, paths={"net.0.weight": "linear"}),
    Case("pruned convolution and Linear (torch.nn.utils.prune)", _build(_pruned, lambda g: (
        torch.randn(5, 2, 4, 4, generator=g, dtype=torch.float64),
        torch.randint(0, 3, (5,), generator=g))),
        paths={"0.weight_orig": "torch.func", "3.weight_orig": "torch.func"}),
    Case("GPT-style: embeddings, causal attention, LayerNorm, per-token loss",
         _build(TinyGPT, lambda g: (_tokens(3, 3, 6, g), torch.randint(0, 3, (3, 3), generator=g))),
         loss=token_ce, sample_loss=token_ce,
         paths={"tok.weight": "embedding", "pos.weight": "embedding", "norm1.weight": "norm",
                "norm.bias": "norm", "mlp.0.weight": "linear", "head.weight": "linear",
                "attn.in_proj_weight": "attention", "attn.out_proj.weight": "attention"}),
    Case("GPT-2 block (HuggingFace Conv1D layers, SDPA), per-token loss",
         _build(GPT2Block, lambda g: (_tokens(3, 3, 6, g),
                                      torch.randint(0, 3, (3, 3), generator=g))),
         loss=token_ce, sample_loss=token_ce,
         paths={"c_attn.weight": "hf-conv1d", "c_proj.bias": "hf-conv1d",
                "mlp_proj.weight": "hf-conv1d", "head.weight": "linear"}),
    Case("ResNet-style block, eval BatchNorm, strided and 1x1 convolutions",
         _build(lambda: _running_stats(ResidualConvNet()), lambda g: (
             torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64),
             torch.randint(0, 3, (3,), generator=g))),
         paths={"stem.weight": "conv", "bn0.weight": "norm", "bn1.bias": "norm",
                "down.weight": "conv", "point.weight": "conv"}),
]

PARAMS = [pytest.param(case, method, backend, id=f"{case.name}-{method}-{backend}")
          for case in CASES for method in case.methods
          for backend in (case.backends if method in ("fisher", "ggn") else ("auto",))]


def _reference(case: Case, method: str, model, inputs, targets) -> np.ndarray:
    if method == "exact":
        return double_backprop_hessian(model, case.loss, inputs, targets)
    if method == "ggn":
        return reference_ggn_full(model, case.loss, inputs, targets)
    return reference_fisher_weighted(model, case.sample_loss, case.sample_weights(targets),
                                     inputs, targets)


def double_backprop_hessian(model, loss_fn, inputs, targets) -> np.ndarray:
    """Row by row: the gradient of each gradient entry, by plain autograd on the model (math
    attention kernel: the fused ones have no double backward)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    params = [p for p in model.parameters() if p.requires_grad]
    with sdpa_kernel(SDPBackend.MATH):
        outputs = model(**inputs) if isinstance(inputs, dict) else model(inputs)
        grads = torch.autograd.grad(loss_fn(outputs, targets), params, create_graph=True)
    flat = torch.cat([g.reshape(-1) for g in grads])
    rows = []
    for j in range(flat.numel()):
        row = torch.autograd.grad(flat[j], params, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([torch.zeros_like(p).reshape(-1) if r is None else r.reshape(-1)
                               for r, p in zip(row, params)]))
    matrix = torch.stack(rows).detach().numpy()
    return (matrix + matrix.T) / 2


@pytest.mark.parametrize(("case", "method", "backend"), PARAMS)
def test_case_matches_reference(case: Case, method: str, backend: str):
    model, inputs, targets = case.build()
    result = hessrank.effective_rank(model, case.loss, (inputs, targets), method=method,
                                     backend=backend)
    reference = eigenvalues_by_magnitude(_reference(case, method, model, inputs, targets))
    count = min(len(result.eigenvalues), len(reference))
    assert_spectra_close(result.eigenvalues, reference, count=count, rtol=1e-9)
    if method != "exact" and count < len(reference):
        assert np.all(np.abs(reference[count:]) <= 1e-9 * abs(reference[0]))
    if method in ("fisher", "ggn") and backend == "auto":
        for name, path in case.paths.items():
            assert result.paths[name] == path, (name, result.paths)
        if case.note is not None:
            assert any(case.note in note for note in result.notes), result.notes


@pytest.mark.parametrize(("wrap", "note"), [(torch.compile, "torch.compile"),
                                             (nn.DataParallel, "nn.DataParallel")],
                         ids=["torch.compile", "nn.DataParallel"])
def test_wrapped_model_is_analysed_through_its_module(wrap, note):
    model, x, y = _build(KeywordCall, lambda g: _mlp_batch(5, 4))()
    wrapper = wrap(model)
    for method in ("fisher", "ggn", "exact"):
        plain = hessrank.effective_rank(model, CE, (x, y), method=method)
        wrapped = hessrank.effective_rank(wrapper, CE, (x, y), method=method)
        np.testing.assert_allclose(wrapped.eigenvalues, plain.eigenvalues, rtol=0,
                                   atol=1e-12 * abs(plain.top_eigenvalue))
        assert plain.top_eigenvalue > 0
        assert any(note in text for text in wrapped.notes)
    # the wrapper's own parameter names select the module's (probe 131: refused as unknown)
    first = next(iter(dict(wrapper.named_parameters())))
    assert first.startswith(("_orig_mod.", "module."))
    chosen = hessrank.effective_rank(wrapper, CE, (x, y), method="exact", params=[first])
    alone = hessrank.effective_rank(model, CE, (x, y), method="exact",
                                    params=[first.split(".", 1)[1]])
    assert chosen.num_params == alone.num_params < plain.num_params
    np.testing.assert_allclose(chosen.eigenvalues, alone.eigenvalues, rtol=0,
                               atol=1e-12 * abs(alone.top_eigenvalue))


@pytest.mark.parametrize("hook", ["forward", "pre"])
@pytest.mark.parametrize("wrap", [torch.compile, nn.DataParallel],
                         ids=["torch.compile", "nn.DataParallel"])
def test_a_wrappers_own_forward_hooks_are_refused(wrap, hook):
    """The wrapper's call runs its forward hooks, the wrapped module analysed alone would not: a
    hook scaling the output had given a top eigenvalue 10 times too small, noted as "same
    function" (probe 149). Refused, naming where to register them; once there they count."""
    model, x, y = _build(KeywordCall, lambda g: _mlp_batch(5, 4))()
    wrapper = wrap(model)
    scale = ((lambda module, args, output: output * 3.0) if hook == "forward"
             else (lambda module, args: (args[0] * 3.0,)))
    register = "register_forward_hook" if hook == "forward" else "register_forward_pre_hook"
    handle = getattr(wrapper, register)(scale)
    with pytest.raises(ValueError, match=r"wrapper has 1 forward hook.*register them on "
                                         r"model\.(_orig_mod|module) instead"):
        hessrank.effective_rank(wrapper, CE, (x, y), method="exact")
    handle.remove()
    handle = getattr(model, register)(scale)
    hooked = hessrank.effective_rank(wrapper, CE, (x, y), method="exact")
    handle.remove()
    plain = hessrank.effective_rank(model, CE, (x, y), method="exact")
    assert hooked.top_eigenvalue > 2 * plain.top_eigenvalue  # the hook is in the function


@pytest.mark.parametrize("method", ["fisher", "ggn", "exact", "lanczos"])
@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
def test_calls_under_no_grad_and_inference_mode(method, context):
    model, x, y = _build(KeywordCall, lambda g: _mlp_batch(5, 4))()
    expected = hessrank.effective_rank(model, CE, (x, y), method=method)
    manager = torch.no_grad if context == "no_grad" else torch.inference_mode
    with manager():
        if context == "inference_mode":
            x, y = x.clone(), y.clone()  # inference tensors, as a user's would be
        result = hessrank.effective_rank(model, CE, (x, y), method=method)
        assert not torch.is_grad_enabled()
    np.testing.assert_allclose(result.eigenvalues, expected.eigenvalues, rtol=0,
                               atol=1e-12 * abs(expected.top_eigenvalue))


def test_lstm_excluded_by_params_still_works():
    model, x, y = _build(LSTMClassifier, lambda g: (
        torch.randn(4, 3, 3, generator=g, dtype=torch.float64),
        torch.randint(0, 3, (4,), generator=g)))()
    names = ["head.weight", "head.bias"]
    result = hessrank.effective_rank(model, CE, (x, y), params=names)
    reference = eigenvalues_by_magnitude(reference_fisher_weighted(
        _Restricted(model, names), CE, _mean_weights(y), x, y))
    assert_spectra_close(result.eigenvalues, reference, count=len(result.eigenvalues), rtol=1e-9)


@pytest.mark.parametrize("names", [["attn.out_proj.weight"],
                                   ["attn.out_proj.weight", "attn.out_proj.bias", "head.bias"]])
@pytest.mark.parametrize("method", ["fisher", "ggn"])
def test_attention_out_proj_without_the_in_projection(names, method):
    """``out_proj`` never runs as a module (``F.multi_head_attention_forward`` uses its
    parameters): analysed without any in-projection parameter, the attention module is claimed
    for it all the same (it had gone to the general path), and the numbers are the reference's."""
    model, x, y = _build(Attention, lambda g: (
        torch.randn(4, 3, 4, generator=g, dtype=torch.float64),
        torch.randint(0, 3, (4,), generator=g)))()
    result = hessrank.effective_rank(model, CE, (x, y), method=method, params=names)
    assert result.paths["attn.out_proj.weight"] == "attention"
    restricted = _Restricted(model, names)
    reference = eigenvalues_by_magnitude(
        reference_ggn_full(restricted, CE, x, y) if method == "ggn"
        else reference_fisher_weighted(restricted, CE, _mean_weights(y), x, y))
    assert_spectra_close(result.eigenvalues, reference, count=len(result.eigenvalues), rtol=1e-9)


class _Restricted(nn.Module):
    """The model with every parameter but ``names`` frozen (for the references)."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model = model
        for name, p in model.named_parameters():
            p.requires_grad_(name in names)

    def forward(self, *args):
        return self.model(*args)


def test_ggn_of_a_loss_linear_in_the_outputs_is_refused():
    model = nn.Sequential(nn.Linear(4, 3), nn.LogSoftmax(dim=1)).double()
    x, y = _mlp_batch(5, 4)
    with pytest.raises(ValueError, match="linear in the model's outputs.*GGN is exactly zero"):
        hessrank.effective_rank(model, nn.NLLLoss(), (x, y), method="ggn")
    # the Fisher of the same loss is well defined
    assert hessrank.effective_rank(model, nn.NLLLoss(), (x, y), method="fisher").rank > 0


def _confident(scale: float, inputs: int = 5, outputs: int = 3, seed: int = 0) -> nn.Module:
    """A float64 tanh MLP whose logits are scaled by ``scale``: confident predictions, as a
    network trained to a small loss makes (most probabilities within 1e-8 of 0 or 1 at 100)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(inputs, 6), nn.Tanh(), nn.Linear(6, outputs)).double()
    with torch.no_grad():
        model[2].weight.mul_(scale)
        model[2].bias.mul_(scale)
    return model


@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float64, 1e-9), (torch.float32, 1e-5)],
                         ids=["float64", "float32"])
def test_fisher_of_confident_bce_with_logits_matches_the_reference(dtype, rtol):
    """Logits up to |z| = 23 (a multi-label head scaled by 30): the fused backward of
    ``nn.BCEWithLogitsLoss`` and its single-sample (vmap) decomposition differ by the rounding of
    ``sigmoid(z) - y``, far more than the saturated sample's own gradient (relative 1.9e-10 in
    float64, 1.3e-2 in float32), and fisher refused the loss as 'the samples interact'. Against
    the per-sample-loop reference of the float64 model, with the mean's weights 1/n."""
    torch.manual_seed(10)
    x = torch.randn(8, 4, dtype=torch.float64)
    y = (torch.rand(8, 3) > 0.5).double()
    model = _confident(30.0, inputs=4)
    bce = nn.BCEWithLogitsLoss()
    assert float(model(x).detach().abs().max()) > 20
    reference = eigenvalues_by_magnitude(reference_fisher_weighted(
        model, bce, _mean_weights(y), x, y))
    result = hessrank.effective_rank(model.to(dtype), bce, (x.to(dtype), y.to(dtype)),
                                     method="fisher")
    assert_spectra_close(result.eigenvalues, reference, count=len(result.eigenvalues), rtol=rtol)
    assert len(result.eigenvalues) == 8


def test_float32_fisher_of_a_confident_softmax_matches_the_reference():
    """A float32 classifier whose predictions are right and confident (``1 - p_y`` about 1e-6,
    as a network trained to a small loss): its per-sample loss gradients ``p - e_y`` cancel in
    float32 (``p_y - 1``, an absolute error of eps against a gradient of 1e-6), and the float32
    reading made the top eigenvalues wrong by up to 80 % of the largest. The head's gradients
    in float64 show it, and the loss side is read in float64; against the per-sample-loop
    reference of the same float32 parameters in float64, with the mean's weights 1/n."""
    model = _confident(14.0).float()
    pool = torch.randn(256, 5, generator=_seeded(5))
    doubt = 1 - model(pool).double().softmax(1).max(1).values.detach()  # 1 - p_y
    x = pool[(doubt < 1e-5) & (doubt > 1e-7)][:12]
    y = model(x).argmax(dim=1).detach()
    assert len(x) == 12
    reference = eigenvalues_by_magnitude(reference_fisher_weighted(
        copy.deepcopy(model).double(), CE, torch.full((12,), 1 / 12, dtype=torch.float64),
        x.double(), y))
    result = hessrank.effective_rank(model, CE, (x, y), method="fisher")
    assert_spectra_close(result.eigenvalues, reference, count=6, rtol=1e-4)


@pytest.mark.parametrize("method", ["ggn", "ggn_lanczos"])
def test_ggn_of_a_confident_softmax_matches_the_reference(method):
    """Near a saturated softmax the diagonal p (1 - p) of the output Hessian rounds to more than
    its value, so its computed blocks had negative eigenvalues and ggn refused the model as 'not
    convex in the outputs' (so did a float32 MLP trained on 128 digits to a loss of 1.2e-3).
    A softmax cross-entropy's blocks now come from its formula; against the double-backprop
    reference."""
    model, (x, y) = _confident(100.0), _mlp_batch(12, 5)
    reference = eigenvalues_by_magnitude(reference_ggn_full(model, CE, x, y))
    result = hessrank.effective_rank(model, CE, (x, y), method=method, lanczos_steps=40)
    if method == "ggn":
        assert_spectra_close(result.eigenvalues, reference, count=6, rtol=1e-9)
    else:  # the top Ritz value, through a float32 basis
        assert result.eigenvalues[0] == pytest.approx(reference[0], rel=1e-6)


def _tempered(outputs: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy at temperature 0.5: a softmax of scaled outputs, convex, not recognised as
    a softmax of the outputs (its blocks come from Hessian-vector products)."""
    return F.cross_entropy(outputs / 0.5, targets)


def _logit_adjusted(outputs: Tensor, targets: Tensor) -> Tensor:
    """Logit-adjusted cross-entropy (a class prior added to the outputs): convex."""
    return F.cross_entropy(outputs + torch.log(torch.tensor([0.7, 0.2, 0.1],
                                                            dtype=outputs.dtype)), targets)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("loss", [_tempered, _logit_adjusted], ids=["temperature", "adjusted"])
def test_ggn_of_a_shifted_or_scaled_softmax_matches_the_reference(loss, dtype):
    """Such a loss's output Hessian cancels in its entries (5e-5 of the largest in float32 at
    probabilities 2e-4, 1e-14 in float64), whose rounding the test for negative eigenvalues had
    taken as exact: every seed of a ten-class and a three-class MLP with its last layer scaled
    by 6 was refused as 'not convex in the outputs' (probe 84). Blocks with negative eigenvalues
    are now computed again in the other precision, whose difference bounds their rounding, and
    the float64 ones are solved; against the double-backprop reference of a float64 copy."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)
    with torch.no_grad():
        model[2].weight.mul_(6)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(32, 8, generator=generator).to(dtype)
    y = torch.randint(0, 3, (32,), generator=generator)
    reference = eigenvalues_by_magnitude(reference_ggn_full(copy.deepcopy(model).double(), loss,
                                                            x.double(), y))
    result = hessrank.effective_rank(model, loss, (x, y), method="ggn")
    assert_spectra_close(result.eigenvalues, reference, count=10,
                         rtol=1e-5 if dtype == torch.float32 else 1e-10)


@pytest.mark.parametrize(("loss", "seed"), [(_tempered, 2), (_tempered, 6), (_tempered, 7),
                                            (_logit_adjusted, 3)],
                         ids=["temperature-2", "temperature-6", "temperature-7", "adjusted-3"])
def test_float64_ggn_of_a_shifted_or_scaled_softmax_on_its_own_labels_is_not_refused(loss, seed):
    """A float64 block's rounding was taken for 16 times the float32 blocks' distance scaled to
    float64, a one-sample estimate that the rounding's negative eigenvalues exceed up to 30 times:
    these batches (every sample at 1 - p >= 1e-6, labelled by the model) were refused as 'not
    convex in the outputs' (probe 240); against the double-backprop reference."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    with torch.no_grad():
        model[2].weight.mul_(10)
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(seed)).double()
    with torch.no_grad():
        y = model(x).argmax(1)
    reference = eigenvalues_by_magnitude(reference_ggn_full(model, loss, x, y))
    result = hessrank.effective_rank(model, loss, (x, y), method="ggn")
    assert_spectra_close(result.eigenvalues, reference, count=10, rtol=1e-10)


def _z_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy plus PaLM's z-loss ``1e-4 logsumexp(f)^2``: convex, not a softmax's."""
    return F.cross_entropy(outputs, targets) + 1e-4 * torch.logsumexp(outputs, 1).pow(2).mean()


@pytest.mark.parametrize("mc_samples", [None, 16], ids=["exact", "mc"])
def test_float32_ggn_of_cross_entropy_plus_a_z_loss_is_not_taken_for_a_softmax(mc_samples):
    """Near saturation the z-loss carries most of the curvature, yet in float32 it is below the
    softmax structure test's rounding of the cross-entropy's terms: the GGN was a pure softmax's,
    20x too small. The structure is confirmed in float64 on the batch's samples; the blocks are
    then differentiated (against the double-backprop reference of the float32 parameters), and
    the Monte-Carlo GGN, which samples a softmax's labels, is refused."""
    model = _confident(1.0, inputs=6, outputs=10).float()
    with torch.no_grad():
        model[2].bias[0] += 14.0  # p(class 0) about 1 - 1e-5
    x = torch.randn(8, 6, generator=_seeded(2))
    y = torch.zeros(8, dtype=torch.long)
    if mc_samples:
        with pytest.raises(ValueError, match="needs the curvature of a softmax.*float64"):
            hessrank.effective_rank(model, _z_loss, (x, y), method="ggn",
                                    mc_samples=mc_samples)
        return
    reference = eigenvalues_by_magnitude(reference_ggn_full(
        copy.deepcopy(model).double(), _z_loss, x.double(), y))
    result = hessrank.effective_rank(model, _z_loss, (x, y), method="ggn")
    assert_spectra_close(result.eigenvalues, reference, count=10, rtol=1e-4)


def _z_loss_where_flagged(outputs: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy of the labels ``targets[:, 0]`` plus a z-loss on the samples flagged by
    ``targets[:, 1]`` alone."""
    flagged = targets[:, 1].to(outputs.dtype) * torch.logsumexp(outputs, 1).pow(2)
    return F.cross_entropy(outputs, targets[:, 0]) + 1e-4 * flagged.mean()


@pytest.mark.parametrize("method", ["ggn", "ggn_lanczos"])
def test_a_z_loss_on_the_later_samples_alone_is_not_left_out(method):
    """The float64 confirmation of the softmax structure read the first 8 samples with
    curvature: a z-loss on the batch's later samples alone was taken for rounding, and the
    float32 GGN came out 66x too small, by the batch's order alone (probe 167). Every sample is
    read now; both orders give the double-backprop reference."""
    model = _confident(1.0, inputs=6, outputs=10).float()
    with torch.no_grad():
        model[2].bias[0] += 14.0  # p(class 0) about 1 - 1e-5
    x = torch.randn(16, 6, generator=_seeded(2))
    targets = torch.stack([torch.zeros(16, dtype=torch.long), (torch.arange(16) >= 10).long()],
                          1)
    options = {"lanczos_steps": 40, "seed": 0} if method == "ggn_lanczos" else {}
    for order in (torch.arange(16), torch.arange(16).flip(0)):
        reference = eigenvalues_by_magnitude(reference_ggn_full(
            copy.deepcopy(model).double(), _z_loss_where_flagged, x[order].double(),
            targets[order]))
        result = hessrank.effective_rank(model, _z_loss_where_flagged,
                                         (x[order], targets[order]), method=method, **options)
        assert_spectra_close(result.eigenvalues, reference, count=5, rtol=1e-4)


def _penalty_where_ignored(outputs: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy of the labelled samples plus a logit L2 penalty on the unlabelled ones
    (``-100``, ignored by the cross-entropy)."""
    unlabelled = (targets == -100).to(outputs.dtype)[:, None]
    return (F.cross_entropy(outputs, targets, ignore_index=-100, reduction="sum")
            + 1e-4 * (unlabelled * outputs.pow(2)).sum()) / len(targets)


@pytest.mark.parametrize("method", ["ggn", "ggn_lanczos"])
def test_a_term_on_the_samples_the_softmax_ignores_is_not_left_out(method):
    """The float64 confirmation read only the samples the softmax gives weight: a penalty on
    the ignored ones alone was taken for rounding and left out, the GGN 20x too small
    (probe 172)."""
    model = _confident(1.0, inputs=6, outputs=10).float()
    with torch.no_grad():
        model[2].bias[0] += 14.0  # p(class 0) about 1 - 1e-5
    x = torch.randn(12, 6, generator=_seeded(2))
    targets = torch.where(torch.arange(12) < 6, 0, -100)
    options = {"lanczos_steps": 40, "seed": 0} if method == "ggn_lanczos" else {}
    reference = eigenvalues_by_magnitude(reference_ggn_full(
        copy.deepcopy(model).double(), _penalty_where_ignored, x.double(), targets))
    result = hessrank.effective_rank(model, _penalty_where_ignored, (x, targets), method=method,
                                     **options)
    assert_spectra_close(result.eigenvalues, reference, count=5, rtol=1e-4)


class _SequenceFirst(nn.Module):
    """A token model whose outputs are sequence-first, ``[T, n, V]``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embedding, self.head = nn.Embedding(6, 8), nn.Linear(8, 6)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(torch.tanh(self.embedding(tokens))).transpose(0, 1)


def _sequence_first_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(outputs.permute(1, 2, 0), targets)


def test_ggn_lanczos_of_sequence_first_outputs():
    """The float64 check of a float32 softmax indexed the outputs' rows and the targets' alike:
    an IndexError past the targets' (T = 5 rows of outputs for n = 4 samples; probe 201). Now
    read whole, against the float64 copy's ``J^T H J``."""
    model = _SequenceFirst()
    generator = _seeded(3)
    tokens, targets = (torch.randint(0, 6, (4, 5), generator=generator),
                       torch.randint(0, 6, (4, 5), generator=generator))
    reference = eigenvalues_by_magnitude(reference_ggn_full(
        copy.deepcopy(model).double(), _sequence_first_loss, tokens, targets))
    result = hessrank.effective_rank(model, _sequence_first_loss, (tokens, targets),
                                     method="ggn_lanczos", seed=0)
    assert_spectra_close(result.eigenvalues, reference, count=5, rtol=1e-4)
    assert result.trace == pytest.approx(float(np.abs(reference).sum()), rel=1e-4)


@pytest.mark.parametrize("method", ["fisher", "fisher_lanczos"])
def test_per_sample_weights_in_the_targets_normalised_by_their_sum(method):
    """Per-sample weights passed in the targets and normalised inside the loss by their sum,
    ``sum_i w_i l_i / sum_i w_i``, are class weights' convention: each sample's loss alone is
    its own (the weight cancels), ``a_i = w_i / sum_j w_j``; against the per-sample loop of the
    float64 copy with the saturation-safe loss, on a saturated classifier (its float64 check
    runs). The same weights captured from outside loss_fn are refused: there one sample's loss
    alone is ``mean(w)`` times its own (an EF ``mean(w)`` times this one, returned unrefused
    before probe 202; probe 172's weights had a mean of 1)."""
    model = _confident(1.0, inputs=6, outputs=10).float()
    with torch.no_grad():
        model[2].bias[0] += 14.0
    x = torch.randn(16, 6, generator=_seeded(2))
    y = torch.zeros(16, dtype=torch.long)
    weights = torch.linspace(0.5, 3.5, 16)
    options = {"seed": 0} if "lanczos" in method else {}

    def weighted(outputs, targets):
        w = targets[:, 1].to(outputs.dtype)
        ce = F.cross_entropy(outputs, targets[:, 0].long(), reduction="none")
        return (w * ce).sum() / w.sum()

    reference = eigenvalues_by_magnitude(reference_fisher_weighted(
        copy.deepcopy(model).double(), saturation_safe_cross_entropy,
        weights.double() / weights.double().sum(), x.double(), y))
    result = hessrank.effective_rank(model, weighted, (x, torch.stack([y.float(), weights], 1)),
                                     method=method, **options)
    assert not any("not checked against float64" in note for note in result.notes)
    assert_spectra_close(result.eigenvalues, reference, count=6, rtol=1e-5)

    def captured(outputs, targets):
        return (weights.to(outputs.dtype) * F.cross_entropy(outputs, targets,
                                                            reduction="none")).mean()

    with pytest.raises(ValueError, match="weighs the samples by their place in the batch.*pass "
                                         "per-sample weights in the targets"):
        hessrank.effective_rank(model, captured, (x, y), method=method, **options)


class _ShiftedLogit(nn.Module):
    """An MLP whose logit 0 is shifted by the input's first entry (the margin, no parameter)."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden, self.head = nn.Linear(5, 8), nn.Linear(8, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.hidden(x[:, 1:]))) + F.pad(x[:, :1], (0, 9))


def _handwritten_cross_entropy(outputs: Tensor, targets: Tensor) -> Tensor:
    return (torch.logsumexp(outputs, 1) - outputs.gather(1, targets[:, None])[:, 0]).mean()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method", ["fisher", "fisher_lanczos"])
@pytest.mark.parametrize("margin", [5.0, 40.0])
def test_a_cross_entropy_written_by_hand_is_refused_where_its_target_entry_rounds(
        margin, method, dtype):
    """``logsumexp(f) - f_y`` forms ``p_y - 1`` as a difference: past a logit margin of about
    40 it is 0 even in float64, and the EF came out 9x too small, in float32 and float64
    alike, with no word (probe 172). Refused there, naming F.log_softmax; at a margin of 5 it
    is F.cross_entropy's EF."""
    torch.manual_seed(0)
    model = _ShiftedLogit().to(dtype)
    x = torch.randn(16, 6, dtype=dtype)
    x[:, 0] = margin + torch.linspace(0, 3, 16, dtype=dtype)
    y = torch.zeros(16, dtype=torch.long)
    options = {"seed": 0} if "lanczos" in method else {}
    if margin < 10:
        written = hessrank.effective_rank(model, _handwritten_cross_entropy, (x, y), method,
                                          **options)
        builtin = hessrank.effective_rank(model, F.cross_entropy, (x, y), method, **options)
        assert_spectra_close(written.eigenvalues, builtin.eigenvalues, count=4, rtol=1e-5)
        return
    with pytest.raises(ValueError, match=r"1 - p_y is lost to rounding.*F\.log_softmax"):
        hessrank.effective_rank(model, _handwritten_cross_entropy, (x, y), method, **options)


def _per_position_cross_entropy_by_hand(outputs: Tensor, targets: Tensor) -> Tensor:
    """``logsumexp - f_y`` over the class dimension 1 of ``[n, C, T]`` outputs."""
    return (torch.logsumexp(outputs, 1) - outputs.gather(1, targets[:, None])[:, 0]).mean()


def _penalised(cross_entropy: Callable[[Tensor, Tensor], Tensor]
               ) -> Callable[[Tensor, Tensor], Tensor]:
    """``cross_entropy`` plus a penalty on the logits' norm past 44."""
    return lambda f, t: cross_entropy(f, t) + 0.01 * F.relu(f.norm(dim=1) - 44).pow(2).mean()


def _beside_l1(cross_entropy: Callable[[Tensor, Tensor], Tensor]
               ) -> Callable[[Tensor, Tensor], Tensor]:
    """``cross_entropy`` of the first 6 outputs plus an L1 loss of the other 4 (a detection
    head's class and box terms)."""
    return lambda f, t: cross_entropy(f[:, :6], t) + F.l1_loss(f[:, 6:], torch.ones_like(f[:, 6:]))


@pytest.mark.parametrize(("loss", "reference_loss"), [
    (_per_position_cross_entropy_by_hand, None),
    (F.cross_entropy, saturation_safe_cross_entropy),  # its sums vanish along C, not along T
    (lambda f, t: F.cross_entropy(f.clamp(-40, 40), t),
     lambda f, t: saturation_safe_cross_entropy(f.clamp(-40, 40), t)),
    (_penalised(F.cross_entropy), _penalised(saturation_safe_cross_entropy)),
    (_beside_l1(F.cross_entropy), _beside_l1(saturation_safe_cross_entropy)),
], ids=["by hand", "F.cross_entropy", "clamped", "penalised", "beside L1"])
def test_the_cancelled_target_check_reads_the_class_dimension_at_the_outputs(loss,
                                                                            reference_loss):
    """Outputs ``[n, C, T]`` at a margin of 45 (float64): the check had read the last dimension
    alone, and the hand-written loss over dimension 1 came out 6.6x too small; shift-invariance
    read at a random point had refused a cross-entropy of clamped logits and one with a penalty
    acting at the outputs (probe 173), read as a zero Hessian along the shift one beside an L1
    term (probe 175). The others match the per-sample loop of the loss written without the
    cancellation."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(3, 10, 1)).double()
    x = torch.randn(8, 3, 4, dtype=torch.float64)
    with torch.no_grad():
        model[0].bias[0] += 45.0
    y = torch.zeros(8, 4, dtype=torch.long)
    if reference_loss is None:
        with pytest.raises(ValueError, match="over dimension 1.*1 - p_y is lost to rounding"):
            hessrank.effective_rank(model, loss, (x, y), "fisher")
        return
    result = hessrank.effective_rank(model, loss, (x, y), "fisher")
    reference = eigenvalues_by_magnitude(reference_fisher_weighted(
        model, reference_loss, torch.full((8,), 1 / 8, dtype=torch.float64), x, y))
    assert_spectra_close(result.eigenvalues, reference, count=4, rtol=1e-6)


def _float32_only_z_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    """:func:`_z_loss` behind a guard that refuses any dtype but float32 (as a fused kernel
    written for float32 would)."""
    if outputs.dtype != torch.float32:
        raise TypeError(f"this kernel takes float32, not {outputs.dtype}")
    return _z_loss(outputs, targets)


def test_a_softmax_structure_not_checked_in_float64_is_said():
    """Where the loss cannot be run in float64, the float32 softmax test stands: for
    cross-entropy plus a z-loss near saturation, a GGN 20x too small, which was reported
    without a word. It is now noted, with why."""
    model = _confident(1.0, inputs=6, outputs=10).float()
    with torch.no_grad():
        model[2].bias[0] += 14.0
    x = torch.randn(8, 6, generator=_seeded(2))
    y = torch.zeros(8, dtype=torch.long)
    result = hessrank.effective_rank(model, _float32_only_z_loss, (x, y), method="ggn")
    said = [n for n in result.notes if "not checked in float64" in n]
    assert len(said) == 1 and "this kernel takes float32" in said[0], result.notes
    assert "z-loss" in said[0]


def test_float64_head_checks_use_samples_with_gradient():
    """The float64 confirmations read the first samples the loss weighs: with the batch's
    first 8 targets ignored they read only zero gradients, found no softmax, and refused the
    Monte-Carlo GGN of a plain cross-entropy. Against the float64 model's own result."""
    model = _confident(1.0, inputs=6, outputs=10).float()
    x = torch.randn(16, 6, generator=_seeded(3))
    y = torch.randint(0, 10, (16,), generator=_seeded(4))
    y[:8] = -100
    for options in ({"mc_samples": 4}, {}):
        ours = hessrank.effective_rank(model, CE, (x, y), method="ggn", **options)
        precise = hessrank.effective_rank(copy.deepcopy(model).double(), CE, (x.double(), y),
                                          method="ggn", **options)
        assert ours.top_eigenvalue == pytest.approx(precise.top_eigenvalue, rel=1e-5)


class _ConfidentTokens(nn.Module):
    """Per-token logits ``[n, C = 3, T = 4]`` scaled by 100 (confident at most positions)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(5, 12)

    def forward(self, x: Tensor) -> Tensor:
        return 100 * self.layer(x).view(-1, 3, 4)


def test_ggn_of_confident_per_token_logits_matches_the_reference():
    """With ``[n, C, T]`` logits near saturation the positions' dimension could also pass the
    softmax check, with weights read off products of vanishing probabilities (up to 1.9e17):
    taken as the class dimension it gave a top eigenvalue of 2.8e-8 against 544. Two passing
    dimensions are ambiguous now, and the blocks are differentiated instead."""
    torch.manual_seed(0)
    model = _ConfidentTokens().double()
    g = _seeded(0)
    x = torch.randn(12, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (12, 4), generator=g)
    reference = eigenvalues_by_magnitude(reference_ggn_full(model, CE, x, y))
    result = hessrank.effective_rank(model, CE, (x, y), method="ggn")
    assert_spectra_close(result.eigenvalues, reference, count=6, rtol=1e-9)
    # and the positions' dimension fails on its own: its other entries disagree with the weight
    from hessrank.curvature.loss import _loss_gradient, _softmax_curvature

    leaf = model(x).detach().requires_grad_(True)
    first = _loss_gradient(CE, leaf, y)
    assert _softmax_curvature(first, leaf, 2, torch.Generator().manual_seed(0))[2] > 1.0
    assert _softmax_curvature(first, leaf, 1, torch.Generator().manual_seed(0))[2] < 1e-10


def test_softmax_ggn_has_c_minus_one_columns_per_position():
    """The softmax's shift direction carries no curvature: its column is left out by
    construction (the blocks are factored orthogonally to it), not by a rounding threshold that
    every one of the samples' computed null eigenvalues must stay under; one more column per
    position would make the benchmark MLP's Gram 5120 instead of 4608 (1.4x the eigen-solve)."""
    from hessrank.curvature.loss import ggn_cotangents

    g = _seeded(3)
    logits = torch.randn(512, 10, generator=g)
    labels = torch.randint(0, 10, (512,), generator=g)
    columns = ggn_cotangents(CE, logits, labels, torch.Generator().manual_seed(0), [])
    assert columns.shape == (9, 512, 10)
    tokens = ggn_cotangents(CE, torch.randn(8, 10, 3, generator=g),
                            torch.randint(0, 10, (8, 3), generator=g),
                            torch.Generator().manual_seed(0), [])
    assert tokens.shape == (27, 8, 10, 3)


def test_softmax_curvature_is_recognised_near_saturation():
    """The softmax cross-entropy's weight ``a_r`` (here the mean's 1/n) is read off an entry free
    of cancellation; reading it off the diagonal made the Monte-Carlo GGN refuse confident
    models ("needs the curvature of a softmax cross-entropy"), which now run."""
    from hessrank.curvature.loss import _loss_gradient, _softmax_structure

    model, (x, y) = _confident(100.0), _mlp_batch(12, 5)
    leaf = model(x).detach().requires_grad_(True)
    class_dim, _, weights, _ = _softmax_structure(_loss_gradient(CE, leaf, y), leaf,
                                                  torch.Generator().manual_seed(0))
    assert class_dim == 1
    torch.testing.assert_close(weights, torch.full((12,), 1 / 12, dtype=torch.float64))
    result = hessrank.effective_rank(model, CE, (x, y), method="ggn", mc_samples=4)
    assert any("Monte-Carlo GGN" in note for note in result.notes)


@pytest.mark.parametrize("classes", [3, 2])
def test_ggn_of_a_trained_float32_network(classes: int):
    """A float32 MLP trained to a small loss (probabilities above 0.99): ggn runs and agrees with
    the float64 reference of the same weights. With two classes the weight's confirmation comes
    from the second class's own products (its diagonal ``p_j (1 - p_j)`` does not cancel)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, classes))
    x, y = _mlp_batch(16, 4, classes)
    x32 = x.float()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(400):
        optimizer.zero_grad()
        CE(model(x32), y).backward()
        optimizer.step()
    model.zero_grad(set_to_none=True)
    assert float(CE(model(x32), y)) < 1e-2
    result = hessrank.effective_rank(model, CE, (x32, y), method="ggn")
    reference = eigenvalues_by_magnitude(reference_ggn_full(model.double(), CE, x, y))
    assert_spectra_close(result.eigenvalues, reference, count=4, rtol=1e-4)


@pytest.mark.parametrize("method", ["fisher", "ggn"])
def test_parameter_terms_in_the_loss_are_refused(method):
    model, x, y = _build(KeywordCall, lambda g: _mlp_batch(5, 4))()

    def regularised(outputs, targets):
        return CE(outputs, targets) + 0.1 * sum(p.pow(2).sum() for p in model.parameters())

    with pytest.raises(ValueError, match=r"uses the parameters directly \(fc.weight, fc.bias"):
        hessrank.effective_rank(model, regularised, (x, y), method=method)
    # exact includes the regulariser's curvature: 0.2 * I shifts the spectrum
    plain = hessrank.effective_rank(model, CE, (x, y), method="exact")
    shifted = hessrank.effective_rank(model, regularised, (x, y), method="exact")
    np.testing.assert_allclose(np.sort(shifted.eigenvalues), np.sort(plain.eigenvalues) + 0.2,
                               atol=1e-10)


class StoresKL(nn.Module):
    """A VAE-style encoder whose forward stores its KL term on the model (``self.kl``), which
    the loss adds."""

    def __init__(self):
        super().__init__()
        self.enc, self.dec = nn.Linear(4, 4), nn.Linear(2, 3)
        self.kl: Tensor | None = None

    def forward(self, x):
        mu, logvar = self.enc(x).chunk(2, -1)
        self.kl = -0.5 * (1 + logvar - mu**2 - logvar.exp()).sum(-1).mean()
        return self.dec(torch.tanh(mu))


@pytest.mark.parametrize("method", ["exact", "lanczos"])
def test_a_float32_loss_term_the_forward_stores_is_included(method):
    """exact and lanczos include a term the forward stores on the model (what fisher and ggn
    refuse, naming them): in float32 the check of the loss's parameter terms freed the forward's
    graph the stored term shares, and both failed with torch's 'backward through the graph a
    second time' (probe 228)."""
    torch.manual_seed(0)
    model = StoresKL()
    x, y = _mlp_batch(5, 4)
    x = x.float()

    def with_kl(outputs, targets):
        return CE(outputs, targets) + model.kl

    result = hessrank.effective_rank(model, with_kl, (x, y), method=method)
    double = copy.deepcopy(model).double()

    def double_kl(outputs, targets):
        return CE(outputs, targets) + double.kl

    reference = eigenvalues_by_magnitude(
        double_backprop_hessian(double, double_kl, x.double(), y))
    assert abs(result.eigenvalues[0] - reference[0]) <= 1e-5 * abs(reference[0])


@pytest.mark.parametrize("backend", ["auto", "func", "backpack"])
@pytest.mark.parametrize("method", ["fisher", "ggn", "fisher_lanczos", "ggn_lanczos"])
def test_a_loss_term_the_forward_stores_is_refused(method, backend):
    """Read after the passes without a graph that run samples alone, the stored term had no
    graph, and fisher and ggn had dropped it (an EF 5.7 times low; probe 222)."""
    if backend != "auto" and method.endswith("lanczos"):
        pytest.skip("the factor Lanczos methods have no backend option")
    model = StoresKL().double()
    x, y = _mlp_batch(5, 4)

    def with_kl(outputs, targets):
        return CE(outputs, targets) + model.kl

    options = {} if method.endswith("lanczos") else {"backend": backend}
    with pytest.raises(ValueError, match=r"uses the parameters directly \(enc.weight, enc.bias"):
        hessrank.effective_rank(model, with_kl, (x, y), method=method, **options)


def test_ggn_with_many_classes_is_refused_before_the_work():
    torch.manual_seed(0)
    model = nn.Linear(8, 1000)
    x, y = torch.randn(64, 8), torch.randint(0, 1000, (64,))
    with pytest.raises(hessrank.BudgetError, match="method='ggn' needs about .*GiB.*'fisher'"):
        hessrank.effective_rank(model, CE, (x, y), method="ggn")


# ------------------------------------------------------------------------------------------------
# Monte-Carlo GGN (mc_samples)
# ------------------------------------------------------------------------------------------------

MC_CASES = [
    pytest.param(_build(TinyGPT, lambda g: (_tokens(3, 3, 6, g),
                                            torch.randint(0, 3, (3, 3), generator=g))),
                 token_ce, id="per-token cross-entropy, GPT-style"),
    pytest.param(_build(KeywordCall, lambda g: _mlp_batch(6, 4)), WEIGHTED_CE,
                 id="class-weighted cross-entropy"),
    pytest.param(_build(KeywordCall, lambda g: (torch.randn(6, 4, generator=g,
                                                            dtype=torch.float64),
                                                torch.tensor([0, 2, 1, 2, 0, 1]))),
                 nn.CrossEntropyLoss(ignore_index=2, label_smoothing=0.2),
                 id="ignore_index and label smoothing"),
]


@pytest.mark.parametrize(("build", "loss"), MC_CASES)
def test_mc_ggn_converges_to_the_exact_ggn(build, loss):
    """The Monte-Carlo Gram's spectrum is near the exact GGN's (explicit-Jacobian reference) with
    many draws (the Gram is M n x M n, so M stays moderate: 10 % of the top eigenvalue)."""
    model, inputs, targets = build()
    reference = eigenvalues_by_magnitude(reference_ggn_full(model, loss, inputs, targets))
    result = hessrank.effective_rank(model, loss, (inputs, targets), method="ggn",
                                     mc_samples=400)
    assert any("Monte-Carlo GGN" in note for note in result.notes)
    top = abs(reference[0])
    np.testing.assert_allclose(result.eigenvalues[:3], reference[:3], rtol=0, atol=0.1 * top)
    assert abs(result.eigenvalues.sum() - reference.sum()) <= 0.1 * abs(reference.sum())
    few = hessrank.effective_rank(model, loss, (inputs, targets), method="ggn", mc_samples=1)
    assert len(few.eigenvalues) <= targets.shape[0]  # one column per sample


def test_mc_ggn_factors_are_unbiased_for_the_output_hessian():
    """``sum_m s_m s_m^T`` at each position against the loss's own output Hessian (autograd), and
    no cross-position terms beyond sampling noise (1e5 draws: noise about 0.3 %)."""
    from hessrank.curvature.loss import ggn_mc_cotangents

    g = torch.Generator().manual_seed(4)
    outputs = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)  # [n, T, C]
    targets = torch.randint(0, 4, (2, 3), generator=g)
    loss = nn.CrossEntropyLoss(label_smoothing=0.1)

    def per_token(f):
        return loss(f.reshape(-1, 4), targets.reshape(-1))

    hessian = torch.autograd.functional.hessian(per_token, outputs).reshape(6, 4, 2, 3, 4)
    factors = ggn_mc_cotangents(lambda f, y: per_token(f), outputs, targets, 100000, g, [])
    estimate = torch.einsum("mic,mjd->icjd", factors.reshape(-1, 6, 4), factors.reshape(-1, 6, 4))
    torch.testing.assert_close(estimate, hessian.reshape(6, 4, 6, 4), rtol=0,
                               atol=0.02 * float(hessian.abs().max()))


def test_mc_ggn_factors_are_sampled_softmax_gradients():
    """Each column is sqrt(a / M) (p - e_y) at every position, for a label y."""
    from hessrank.curvature.loss import ggn_mc_cotangents

    g = torch.Generator().manual_seed(3)
    outputs = torch.randn(4, 5, 7, generator=g, dtype=torch.float64)  # [n, T, C]
    targets = torch.randint(0, 7, (4, 5), generator=g)
    factors = ggn_mc_cotangents(token_ce, outputs, targets, 3, g, [])
    assert factors.shape == (3, 4, 5, 7)
    probs = torch.softmax(outputs, dim=-1)
    onehot = probs - factors * (3 * 20) ** 0.5  # a = 1 / (n T) = 1 / 20
    torch.testing.assert_close(onehot.sum(-1), torch.ones(3, 4, 5, dtype=torch.float64))
    assert torch.allclose(onehot, onehot.round(), atol=1e-12) and onehot.round().max() == 1



def test_mc_ggn_factors_keep_their_digits_at_a_saturated_prediction():
    """A label drawn at a saturated position is the predicted class, whose factor entry
    ``p_y - 1`` had been formed as a difference: at ``1 - p_y`` = 1e-13 it was 1e-3 off. It is
    minus the other classes' probabilities, summed: exact to float64's rounding."""
    from hessrank.curvature.loss import ggn_mc_cotangents

    margins = torch.tensor([20.0, 25.0, 30.0], dtype=torch.float64)
    outputs = torch.zeros(3, 4, dtype=torch.float64)
    outputs[:, 0] = margins
    factors = ggn_mc_cotangents(CE, outputs, torch.zeros(3, dtype=torch.long), 2,
                                torch.Generator().manual_seed(0), [])
    complement = (-margins).exp() * 3 / (1 + 3 * (-margins).exp())  # 1 - p_0, in closed form
    expected = -(1 / 3 / 2) ** 0.5 * complement
    assert factors.shape == (2, 3, 4)
    torch.testing.assert_close(factors[:, :, 0], expected.expand(2, 3), rtol=1e-14, atol=0)


def test_mc_ggn_refuses_a_loss_that_is_not_a_softmax_cross_entropy():
    model, x, _ = _build(KeywordCall, lambda g: _mlp_batch(5, 4))()
    y = torch.randn(5, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="mc_samples needs the curvature of a softmax cross-ent"):
        hessrank.effective_rank(model, MSE, (x, y), method="ggn", mc_samples=4)


def test_mc_ggn_gram_size_is_in_the_memory_prediction():
    torch.manual_seed(0)
    model = nn.Linear(8, 1000)
    x, y = torch.randn(64, 8), torch.randint(0, 1000, (64,))
    with pytest.raises(hessrank.BudgetError, match="mc_samples="):
        hessrank.effective_rank(model, CE, (x, y), method="ggn")
    result = hessrank.effective_rank(model, CE, (x, y), method="ggn", mc_samples=2)
    assert result.max_rank <= 128
    with pytest.raises(hessrank.BudgetError, match="method='ggn' needs about"):
        hessrank.effective_rank(model, CE, (x, y), method="ggn", mc_samples=2000,
                                max_memory=2**28)


# (model, path of its recurrent weights): float32 LSTMs on the CPU run fused kernels (oneDNN's
# for several layers or directions) that torch.func must differentiate under grad mode
FLOAT32_LSTMS = [(LSTMClassifier, "lstm"), (StackedLSTM, "lstm"),
                 (StackedLSTMWithState, "torch.func"), (StackedLSTMWithSmallState, "torch.func")]


@pytest.mark.parametrize(("model_cls", "path"), FLOAT32_LSTMS,
                         ids=[cls.__name__ for cls, _ in FLOAT32_LSTMS])
@pytest.mark.parametrize("method", ["fisher", "ggn"])
def test_float32_lstm_matches_float64(model_cls, path, method):
    """A float32 LSTM gives the float64 spectrum, through the rule or the general path."""
    model, x, y = _build(model_cls, lambda g: (
        torch.randn(6, 5, 3, generator=g, dtype=torch.float64),
        torch.randint(0, 3, (6,), generator=g)))()
    expected = hessrank.effective_rank(model, CE, (x, y), method=method)
    single = hessrank.effective_rank(model.float(), CE, (x.float(), y), method=method)
    assert single.paths["lstm.weight_hh_l0"] == path
    np.testing.assert_allclose(single.eigenvalues, expected.eigenvalues, rtol=0,
                               atol=1e-5 * expected.top_eigenvalue)


# ------------------------------------------------------------------------------------------------
# the same cases on a GPU (skipped without CUDA): the CPU reference, the computation on the device
# ------------------------------------------------------------------------------------------------


def _on(value, device: torch.device):
    """``value`` (a tensor, tuple or dict of tensors) on ``device``."""
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {key: _on(item, device) for key, item in value.items()}
    return tuple(_on(item, device) for item in value)


CUDA_PARAMS = [pytest.param(case, method, id=f"{case.name}-{method}") for case in CASES
               for method in (*case.methods, "lanczos") if case.loss is not WEIGHTED_CE]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize(("case", "method"), CUDA_PARAMS)
def test_case_on_cuda_matches_cpu_reference(case: Case, method: str):
    """Every case computed on the GPU (float64) against the CPU reference; the rules take the
    same paths there (the general route may differ: torch's vmap batches an LSTM given its
    initial state on CUDA, not on the CPU). ``lanczos`` is checked on its converged top
    eigenvalue against the exact Hessian's, with as many steps as parameters."""
    kind = "exact" if method == "lanczos" else method
    reference = eigenvalues_by_magnitude(_reference(case, kind, *case.build()))
    model, inputs, targets = case.build()  # the same seeded model (a reference may alter one)
    device = torch.device("cuda")
    options = {"lanczos_steps": len(reference)} if method == "lanczos" else {}
    result = hessrank.effective_rank(model.to(device), case.loss,
                                     (_on(inputs, device), targets.to(device)), method=method,
                                     **options)
    if method == "lanczos":
        assert result.eigenvalues[0] == pytest.approx(reference[0], rel=1e-6)
        return
    count = min(len(result.eigenvalues), len(reference))
    assert_spectra_close(result.eigenvalues, reference, count=count, rtol=1e-9)
    if method in ("fisher", "ggn"):  # which general route vmap can batch depends on the device
        for name, path in case.paths.items():
            general = path in (VMAP_PATH, LOOP_PATH)
            assert result.paths[name] in ((VMAP_PATH, LOOP_PATH) if general else (path,)), (
                name, result.paths)


# ------------------------------------------------------------------------------------------------
# second derivatives torch gets wrong, parametrizations, graded output curvature
# ------------------------------------------------------------------------------------------------

def _weight_normed(kind: str) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    if kind == "parametrizations.weight_norm":
        torch.nn.utils.parametrizations.weight_norm(model[0])
    else:
        with warnings.catch_warnings():  # deprecated, still in use
            warnings.simplefilter("ignore")
            torch.nn.utils.weight_norm(model[0])
    return model


@pytest.mark.parametrize("method", ["exact", "lanczos"])
@pytest.mark.parametrize("kind", ["parametrizations.weight_norm", "nn.utils.weight_norm"])
def test_weight_norm_hessian_matches_finite_differences(kind, method):
    """torch 2.14.1's double backward of its fused weight-norm kernel is wrong (its Hessian is
    not even symmetric); hessrank differentiates the same function written out. The reference is
    finite differences of first derivatives, which that kernel gets right (a double-backprop
    reference would share the bug)."""
    model = _weight_normed(kind)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (8,), generator=g)
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    reference = eigenvalues_by_magnitude(reference_hessian(model, CE, x, y, names, step=1e-4))
    steps = {"lanczos_steps": len(reference)} if method == "lanczos" else {}
    result = hessrank.effective_rank(model, CE, (x, y), method=method, **steps)
    assert_spectra_close(result.eigenvalues, reference, count=10, rtol=1e-7)


class _DetachedProduct(torch.autograd.Function):
    """``a * b`` whose backward uses ``b`` detached: first derivatives right, the second
    derivative d(grad_a)/db lost while d(grad_b)/da is kept: an asymmetric 'Hessian'."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return a * b

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        return grad * b.detach(), grad * a


class _AsymmetricSecondDerivative(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.left, self.right, self.head = nn.Linear(4, 5), nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(_DetachedProduct.apply(self.left(x), self.right(x))))


#: The two checks that refuse a wrong second derivative through a custom Function, by what
#: their messages say: the Function's finite differences, first, and the symmetry of the
#: products (alone where the first is switched off: the gate for a torch kernel's wrong double
#: backward, which no note of custom Functions flags).
_GATES = {"differences": "fails a check of its",
          "symmetry": "not symmetric"}


def _only_gate(gate: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Switch the differences off for ``gate`` "symmetry"; the message the gate's refusal
    carries."""
    if gate == "symmetry":
        from hessrank.curvature import hessian

        monkeypatch.setattr(hessian, "check_custom_functions", lambda *args, **kwargs: None)
    return _GATES[gate]


@pytest.mark.parametrize("gate", list(_GATES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method", ["exact", "lanczos"])
def test_a_wrong_second_derivative_is_refused(method, dtype, gate, monkeypatch):
    """Hessian-vector products that are not symmetric are no Hessian's: refused, not solved."""
    message = _only_gate(gate, monkeypatch)
    torch.manual_seed(0)
    model = _AsymmetricSecondDerivative().to(dtype)
    x, y = torch.randn(16, 4, dtype=dtype), torch.randint(0, 3, (16,))
    with pytest.raises(ValueError, match=f"{message}.*method='fisher'"):
        hessrank.effective_rank(model, CE, (x, y), method=method)
    # the same products, written with differentiable operations, pass
    model.forward = lambda x: model.head(torch.tanh(model.left(x) * model.right(x)))
    hessrank.effective_rank(model, CE, (x, y), method=method)


class _DetachedScale(torch.autograd.Function):
    """``a * sum(a)`` whose backward uses the sum detached: first derivatives right, a second
    derivative wrong by a term that is nearly symmetric where the upstream gradients are alike."""

    @staticmethod
    def forward(ctx, a):
        ctx.save_for_backward(a)
        return a * a.sum(-1, keepdim=True)

    @staticmethod
    def backward(ctx, grad):
        (a,) = ctx.saved_tensors
        return grad * a.sum(-1, keepdim=True).detach() + (grad * a).sum(-1, keepdim=True)


class _ScaledByASum(nn.Module):
    """A tanh MLP 6-8-4 plus 0.03 times :class:`_DetachedScale` of a linear map."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body, self.head, self.left = nn.Linear(6, 8), nn.Linear(8, 4), nn.Linear(6, 4)

    def forward(self, x: Tensor) -> Tensor:
        return (self.head(torch.tanh(self.body(x)))
                + 0.03 * _DetachedScale.apply(self.left(x)))


@pytest.mark.parametrize("gate", list(_GATES))
@pytest.mark.parametrize("method", ["exact", "lanczos"])
def test_a_float64_derivative_wrong_almost_symmetrically_is_refused(method, gate, monkeypatch):
    """Its products' antisymmetric part is a small share (1e-6 to 1e-4) of their error, within
    float32's rounding though far beyond float64's: a band that took such float64 products for
    rounding near zero loss passed it, its note understating the error up to 1000x (trace 496
    for 704; probe 119). Refused, as any asymmetry beyond the model's dtype's rounding, and
    first by the differences of the gradient."""
    message = _only_gate(gate, monkeypatch)
    model = _ScaledByASum().double()
    x = torch.randn(32, 6, dtype=torch.float64)
    targets = torch.full((32, 4), -500.0, dtype=torch.float64)
    with pytest.raises(ValueError, match=message):
        hessrank.effective_rank(model, nn.MSELoss(), (x, targets), method=method)


@pytest.mark.parametrize("method", ["exact", "fisher", "ggn"])
def test_calls_inside_parametrize_cached(method):
    """Inside ``parametrize.cached()`` a parametrized weight would be computed once and its graph
    reused by every pass (``ggn`` silently lost the weights' curvature, ``fisher`` crashed): the
    cache is off for the call and back on after."""
    from torch.nn.utils import parametrize
    from torch.nn.utils.parametrizations import orthogonal

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    orthogonal(model[0])
    x, y = _mlp_batch(8, 4)
    outside = hessrank.effective_rank(model, CE, (x, y), method=method)
    with parametrize.cached():
        inside = hessrank.effective_rank(model, CE, (x, y), method=method)
        assert parametrize._cache_enabled == 1
    assert any("parametrize.cached()" in note for note in inside.notes)
    assert_spectra_close(inside.eigenvalues, outside.eigenvalues, rtol=1e-12)


class _MaskedPolicy(nn.Module):
    """Action logits scaled by a learned inverse temperature (no rule claims it: the general
    path) plus an additive mask of the illegal actions among the inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5))
        self.scale = nn.Parameter(torch.tensor(1.5))

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        return self.net(x) * self.scale + mask


@pytest.mark.parametrize("backend", ["auto", "func"])
@pytest.mark.parametrize("method", ["fisher", "ggn"])
def test_an_additive_minus_inf_in_the_outputs_is_not_taken_for_mixing(method, backend):
    """The general path compared a sample's outputs alone with the batch's by the norm of their
    difference, NaN where both hold the mask's -inf: a policy with illegal actions masked was
    refused as mixing its samples (probe 225). The -inf mask gives the spectrum of a -1e4 one,
    which the float64 references give."""
    model = _MaskedPolicy().double()
    x, _ = _mlp_batch(8, 4)
    y = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    legal = torch.rand(8, 5, generator=_seeded(3)) < 0.6
    legal[torch.arange(8), y] = True
    spectra = []
    for fill in (float("-inf"), -1e4):
        inputs = (x, torch.where(legal, 0.0, fill).double())
        spectra.append(hessrank.effective_rank(model, CE, (inputs, y), method=method,
                                               backend=backend).eigenvalues)
    reference = (reference_ggn_full(model, CE, inputs, y) if method == "ggn" else
                 reference_fisher_weighted(model, CE, _mean_weights(y), inputs, y))
    assert_spectra_close(spectra[1], eigenvalues_by_magnitude(reference), count=len(spectra[1]),
                         rtol=1e-9)
    assert_spectra_close(spectra[0], spectra[1], count=len(spectra[1]), rtol=1e-9)


class _Squeezed(nn.Module):
    """One output per sample, returned as ``[n]`` (binary classification, regression)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x).squeeze(-1)


class _SigmoidOutputs(nn.Module):
    """Three probabilities through a sigmoid inside the model; the first logit of a sample
    marked by its first input above 5 pushed to ``shift`` (a confidently wrong output: huge
    loss curvature, tiny Jacobian). (Marked by its place in the batch, row 0, the model mixed
    its samples: run alone, the batch's last samples were pushed instead.)"""

    def __init__(self, shift: float) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
        self.shift = shift

    def forward(self, x: Tensor) -> Tensor:
        logits = self.body(x)
        marked = (x[:, 0] > 5).to(x.dtype)
        offset = torch.zeros_like(logits)
        offset[:, 0] = marked * (self.shift - logits[:, 0].detach())
        return torch.sigmoid(logits + offset)


def _first_marked(g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Eight inputs, the first marked for :class:`_SigmoidOutputs`, and all-ones targets."""
    x = torch.randn(8, 4, generator=g, dtype=torch.float64)
    x[0, 0] = 10.0
    return x, torch.ones(8, 3, dtype=torch.float64)


def _difference_loss(beta: float) -> Callable[[Tensor, Tensor], Tensor]:
    """A Bradley-Terry / DPO-style loss of two scores: convex in their difference only, so its
    curvature has the softmax cross-entropy's form with ``a = h'' / (p_0 p_1)``."""
    return lambda f, y: -F.logsigmoid(beta * (f[:, 0] - f[:, 1]) * (2 * y - 1)).mean()


def _wide_gaps(scale: float) -> Callable[[], tuple[nn.Module, Tensor, Tensor]]:
    def build():
        model = _confident(scale, inputs=4, outputs=2, seed=4)
        x, _ = _mlp_batch(8, 4)
        return model, x, (torch.arange(8) % 2).double()
    return build


GRADED = [
    pytest.param(_build(_Squeezed, lambda g: (
        torch.randn(6, 4, generator=g, dtype=torch.float64),
        (torch.rand(6, generator=g) > 0.5).double())), nn.BCEWithLogitsLoss(),
        id="outputs [n], BCEWithLogitsLoss"),
    pytest.param(_build(_Squeezed, lambda g: (
        torch.randn(6, 4, generator=g, dtype=torch.float64),
        torch.randn(6, generator=g, dtype=torch.float64))), nn.MSELoss(),
        id="outputs [n], MSELoss"),
    *[pytest.param(_build(lambda shift=shift: _SigmoidOutputs(shift), _first_marked),
                   nn.BCELoss(),
        id=f"BCELoss after sigmoid, one output at logit {shift:g}") for shift in (-17, -36)],
    *[pytest.param(_wide_gaps(scale), _difference_loss(beta),
                   id=f"two scores, gaps x{scale:g}, beta {beta:g}")
      for scale in (40, 60) for beta in (1.0, 0.1)],
    pytest.param(_wide_gaps(60), lambda f, y: ((f[:, 0] - f[:, 1] - y) ** 2).mean(),
                 id="two scores, gaps x60, squared error of the difference"),
]


@pytest.mark.parametrize(("build", "loss"), GRADED)
def test_ggn_of_graded_output_curvature_matches_the_reference(build, loss):
    """Output curvatures that differ by up to 1e30 between samples and within a sample, and two
    scores far apart (whose softmax form has a diagonal that cancels): no block's rounding may
    zero another's curvature."""
    model, x, y = build()
    result = hessrank.effective_rank(model, loss, (x, y), method="ggn")
    reference = eigenvalues_by_magnitude(reference_ggn_full(model, loss, x, y))
    assert_spectra_close(result.eigenvalues, reference, count=len(result.eigenvalues), rtol=1e-9)
    assert np.all(np.abs(reference[len(result.eigenvalues):]) <= 1e-9 * abs(reference[0]))


class EncoderProbe(nn.Module):
    """A linear probe on a ``TransformerEncoder`` over padded sequences, pooled over every
    position or (``masked``) the unpadded ones only."""

    def __init__(self, masked: bool) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2)
        self.head = nn.Linear(8, 3)
        self.masked = masked

    def forward(self, x: Tensor, padding: Tensor) -> Tensor:
        features = self.encoder(x, src_key_padding_mask=padding)
        if self.masked:
            kept = (~padding).unsqueeze(-1).to(features.dtype)
            return self.head((features * kept).sum(1) / kept.sum(1))
        return self.head(features.mean(1))


def _encoder_probe(masked: bool, frozen: bool) -> tuple[nn.Module, dict[str, Tensor], Tensor]:
    torch.manual_seed(0)
    model = EncoderProbe(masked).eval()
    model.encoder.requires_grad_(not frozen)
    g = _seeded(2)
    x = torch.randn(6, 5, 8, generator=g)
    padding = torch.arange(5)[None] >= torch.tensor([5, 2, 4, 3, 5, 1])[:, None]
    return model, {"x": x, "padding": padding}, torch.randint(0, 3, (6,), generator=g)


@pytest.mark.parametrize("method", ["exact", "fisher", "ggn"])
@pytest.mark.parametrize("data", ["batch", "data set"])
def test_a_frozen_encoder_s_nested_fast_path_is_refused_where_the_loss_reads_its_padding(
        method: str, data: str) -> None:
    """A frozen encoder in eval mode, given a padding mask, runs as nested tensors in the
    caller's training forward (zeros at the padded positions), where a call's standard path
    computes values there: pooled over every position, the probe's curvature had been that of
    another function, 80 % off, with no note (probe 233); in a data set, every batch is
    checked (one without padding first had passed the check for all; probe 236)."""
    model, inputs, targets = _encoder_probe(masked=False, frozen=True)
    batch: object = (inputs, targets)
    if data == "data set":
        unpadded = {"x": inputs["x"], "padding": torch.zeros_like(inputs["padding"])}
        batch = [(unpadded, targets), (inputs, targets)]
    with pytest.raises(ValueError, match="nested-tensor fast path through encoder.*masked mean"):
        hessrank.effective_rank(model, CE, batch, method=method)


@pytest.mark.parametrize(("masked", "frozen"), [(True, True), (False, False)],
                         ids=["frozen, masked pooling", "trained, pooled over every position"])
def test_an_encoder_whose_paths_agree_on_what_the_loss_reads_is_analysed(masked: bool,
                                                                         frozen: bool) -> None:
    """Pooled over the unpadded positions only, both paths give one loss; a trained encoder's
    forward takes the standard path in training too: their Hessians are the reference's,
    built by double backpropagation through the caller's own forward (fast path on)."""
    model, inputs, targets = _encoder_probe(masked, frozen)
    result = hessrank.effective_rank(model, CE, (inputs, targets), method="exact")
    reference = eigenvalues_by_magnitude(double_backprop_hessian(model, CE, inputs, targets))
    assert_spectra_close(result.eigenvalues, reference, rtol=1e-4)


class CausalHint(nn.Module):
    """A transformer layer given ``is_causal=True`` without a mask."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.layer(x, is_causal=True).mean(1))


def test_a_causal_hint_without_a_mask_says_the_fast_path_ignored_it() -> None:
    """Frozen in eval mode, the layer runs in the caller's forward (torch's fast path ignores
    the hint); a call's standard path needs the mask, and torch's bare error had not said why
    the forward that ran for the caller failed in the call (probe 233)."""
    torch.manual_seed(0)
    model = CausalHint().eval()
    model.layer.requires_grad_(False)
    x, y = torch.randn(4, 5, 8), torch.randint(0, 3, (4,))
    model(x)  # (runs for the caller)
    with pytest.raises(ValueError, match="fast path.*ignores the hint.*generate_square_subseq"):
        hessrank.effective_rank(model, CE, (x, y), method="fisher")
