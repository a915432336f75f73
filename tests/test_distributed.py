"""Data-parallel ranks: 2 gloo processes on CPU against one process on the concatenated batch.

One spawn of two processes runs every case of :data:`CASES` (each process with its own, unequal,
shard); the test process computes the same cases on the whole batch and compares. Also: a
``DistributedDataParallel`` model (analysed without touching DDP's state), errors that reach
every process, and the checks that refuse what cannot be computed from shards.
"""

from __future__ import annotations

import copy
import datetime
import faulthandler
import os
import pickle
import signal
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import hessrank

WORLD = 2
#: Samples of each process, in rank order: unequal on purpose.
SHARDS = (7, 5)
N = sum(SHARDS)

def _with_l2(model: nn.Module) -> Any:
    """Mean cross-entropy plus an L2 term of the parameters: its Hessian 0.1 I counts once."""
    mean = nn.CrossEntropyLoss()
    return lambda f, t: mean(f, t) + 0.05 * sum(p.pow(2).sum() for p in model.parameters())


#: Per-sample weights of the global batch, captured by a loss normalised by their sum (each
#: sample's loss alone is its own: fisher refuses it as weights tied to places, the others take
#: it on the global batch; a shard's evaluation of it had failed, probe 207).
_GLOBAL_WEIGHTS = torch.linspace(0.5, 2.0, 12, dtype=torch.float64)


def _captured(model: nn.Module) -> Any:
    ce = nn.CrossEntropyLoss(reduction="none")

    def loss(f: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        weights = _GLOBAL_WEIGHTS.to(f.dtype)
        return (weights * ce(f, t)).sum() / weights.sum()
    return loss


#: name -> loss of a model
LOSSES = {
    "mean": lambda model: nn.CrossEntropyLoss(),
    "sum": lambda model: nn.CrossEntropyLoss(reduction="sum"),
    "weighted": lambda model: nn.CrossEntropyLoss(weight=torch.tensor([0.5, 2.0, 1.0],
                                                                      dtype=torch.float64)),
    "mean+l2": _with_l2,
    "captured": _captured,
}

#: (case name, model, method, loss, options, effective_rank keywords): compared with one process.
CASES = [
    ("fisher", "mlp", "fisher", "mean", {}, {}),
    ("fisher-sum", "mlp", "fisher", "sum", {}, {}),
    ("fisher-weighted", "mlp", "fisher", "weighted", {}, {}),
    ("fisher-func", "mlp", "fisher", "mean", {"backend": "func"}, {}),
    ("ggn", "mlp", "ggn", "mean", {}, {"per_layer": True}),
    ("ggn-weighted", "mlp", "ggn", "weighted", {}, {}),
    ("exact", "mlp", "exact", "mean", {}, {}),
    ("exact-sum", "mlp", "exact", "sum", {}, {"per_layer": True}),
    ("lanczos", "mlp", "lanczos", "mean", {"lanczos_steps": 40}, {}),
    # a parameter term in the loss: in every process's loss, its curvature counted once
    ("exact-l2", "mlp", "exact", "mean+l2", {}, {}),
    ("lanczos-l2", "mlp", "lanczos", "mean+l2", {"lanczos_steps": 40}, {}),
    ("ggn_lanczos", "mlp", "ggn_lanczos", "mean", {"lanczos_steps": 30}, {}),
    ("fisher_lanczos", "mlp", "fisher_lanczos", "weighted", {"lanczos_steps": 12}, {}),
    # fewer products than the rank bound n = 12: the bound then caps the interval (it was P = 51
    # in a data-parallel call: srank interval up to 14.65 for an EF of rank 12)
    ("fisher_lanczos-short", "mlp", "fisher_lanczos", "mean", {"lanczos_steps": 10},
     {"seed": 3}),
    # conv and linear rules (factors over positions) beside the general path (LayerNorm)
    ("fisher-cnn", "cnn", "fisher", "mean", {}, {"per_layer": True}),
    ("ggn-cnn", "cnn", "ggn", "mean", {}, {}),
    # the recurrent rule (factors summed over layers and directions)
    ("fisher-gru", "rnn", "fisher", "mean", {}, {"per_layer": True}),
    ("ggn-gru", "rnn", "ggn", "weighted", {}, {}),
    # the attention rule (its own and its out-projection's factors)
    ("fisher-attention", "attention", "fisher", "mean", {}, {"per_layer": True}),
    # the embedding rule's tokens and output gradients (it had taken the general path in every
    # process: 30-100 times slower than one process on a 20,000-token table; probe 242)
    ("ggn-embedding", "tokens", "ggn", "mean", {}, {"per_layer": True}),
    # a convolution whose cheaper route is position pairs for 5 rows and samples as groups for
    # 7 or 12: each process built its own route's factors, which could not be gathered (an
    # error that blamed the model's shapes); the route is now picked for the gathered batch
    ("fisher-conv-route", "conv-route", "fisher", "mean", {}, {}),
    # a graph large enough that the columns per batched product depend on the shard: each
    # process pushed its own number through the products' all-reduces and gloo aborted
    ("exact-wide-graph", "wide", "exact", "mean", {}, {}),
    # a custom autograd.Function: checked alone by finite differences in every process
    ("exact-custom", "custom", "exact", "mean", {}, {}),
    ("lanczos-custom", "custom", "lanczos", "mean", {"lanczos_steps": 40}, {}),
    # a loss of the global batch that cannot run on a shard: evaluated on the gathered batch
    # by the factor operators' check and by the float32 loss's float64 trials (probe 207)
    ("ggn_lanczos-captured", "mlp", "ggn_lanczos", "captured", {"lanczos_steps": 30}, {}),
    ("exact-captured-float32", "mlp32", "exact", "captured", {}, {}),
]


def batch_of(kind: str, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch a case's model takes: float32 inputs for the float32 MLP."""
    return (x.float(), y) if kind == "mlp32" else (x, y)


class Tanh(torch.autograd.Function):
    """tanh, its backward differentiable (``detached``: not, its saved output detached)."""

    detached = False

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a)
        return torch.tanh(a)

    @classmethod
    def backward(cls, ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (a,) = ctx.saved_tensors
        t = torch.tanh(a)
        return grad * (1 - (t.detach() if cls.detached else t) ** 2)


class DetachedTanh(Tanh):
    detached = True


class Activation(nn.Module):
    def __init__(self, function: type[torch.autograd.Function]) -> None:
        super().__init__()
        self.function = function

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.function.apply(x)


class AttentionHead(nn.Module):
    """Each 4-feature row as 2 tokens of 2 features, 2-head self-attention, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(2, 2, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.view(-1, 2, 2)
        return self.head(self.attn(tokens, tokens, tokens, need_weights=False)[0].flatten(1))


class TokenHead(nn.Module):
    """Each 4-feature row as 4 tokens of 7 (padding token 0), embedded in 3 features, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(7, 3, padding_idx=0)
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = (x.abs() * 3).long().clamp(max=6)
        return self.head(torch.tanh(self.embedding(tokens)).flatten(1))


class GRUHead(nn.Module):
    """Each 4-feature row as 2 steps of 2 features, a 2-layer bidirectional GRU, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(2, 3, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.gru(x.view(-1, 2, 2))[0][:, -1])


class WideActivations(nn.Module):
    """Few parameters, large activations: its graph, not its Hessian, rules the budget."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.last = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = self.first(x)[:, :, None].repeat(1, 1, 8192)
        return self.last(torch.tanh(wide).mean(dim=-1))


class WideOutputs(nn.Module):
    """Few parameters, many classes (a fixed projection to 20,000): the loss side rules the
    budget."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(4, 3)
        self.register_buffer("projection", torch.randn(3, 20_000))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.first(x)) @ self.projection


class Scaled(nn.Module):
    """The test MLP with its outputs times a plain attribute: nothing a fingerprint of the
    parameters and buffers sees."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.net, self.scale = make_model(), scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * self.scale


class Capped(nn.Module):
    """The test MLP with its hidden pre-activations clamped at a plain attribute ``cap``."""

    def __init__(self, cap: float) -> None:
        super().__init__()
        self.net, self.cap = make_model(), cap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.net[0](x).clamp(-self.cap, self.cap)
        return self.net[2](torch.tanh(hidden))


class PairsOnly(nn.Module):
    """The test MLP, refusing a batch of one sample (in every process, or in ``failing``)."""

    def __init__(self, failing: bool = True) -> None:
        super().__init__()
        self.net, self.failing = make_model(), failing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.failing and x.shape[0] < 2:
            raise ValueError("a batch needs two samples")
        return self.net(x)


class DictOutputs(nn.Module):
    """The test MLP's logits in a dict."""

    def __init__(self) -> None:
        super().__init__()
        self.net = make_model()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.net(x)}


class BatchStandardised(nn.Module):
    """A hidden layer standardised over the batch by hand (no BatchNorm module to refuse)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first, self.last = nn.Linear(4, 6).double(), nn.Linear(6, 3).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.first(x)
        return self.last(torch.tanh((hidden - hidden.mean(0)) / (hidden.std(0) + 1e-3)))


def make_model(kind: str = "mlp") -> nn.Module:
    torch.manual_seed(0)
    if kind == "rnn":
        return GRUHead().double()
    if kind == "attention":
        return AttentionHead().double()
    if kind == "tokens":
        return TokenHead().double()
    if kind == "cnn":
        return nn.Sequential(nn.Unflatten(1, (1, 2, 2)), nn.Conv2d(1, 2, 2, padding=1), nn.ReLU(),
                             nn.Flatten(), nn.LayerNorm(18), nn.Linear(18, 3)).double()
    if kind == "conv-route":  # route_costs: pairs below 135 C / (675 - 2 C) = 6.6 rows
        return nn.Sequential(nn.Linear(4, 63), nn.Unflatten(1, (3, 3, 7)), nn.Conv2d(3, 30, 3),
                             nn.Tanh(), nn.Flatten(), nn.Linear(150, 3)).double()
    if kind == "wide":
        return WideActivations().double()
    if kind in ("custom", "detached"):
        return nn.Sequential(nn.Linear(4, 6), Activation(Tanh if kind == "custom" else
                                                         DetachedTanh), nn.Linear(6, 3)).double()
    if kind == "batchnorm":
        return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(),
                             nn.Linear(6, 3)).double()
    if kind == "mlp32":
        return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def make_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(N, 4, generator=generator, dtype=torch.float64),
            torch.randint(0, 3, (N,), generator=generator))


def shard(tensor: torch.Tensor, rank: int) -> torch.Tensor:
    start = sum(SHARDS[:rank])
    return tensor[start : start + SHARDS[rank]]


def summary(result: hessrank.RankResult) -> dict[str, Any]:
    return {"eigenvalues": result.eigenvalues, "ranks": result.ranks, "n": result.num_samples,
            "trace": result.trace, "notes": result.notes, "rank": result.rank,
            "paths": result.paths, "max_rank": result.max_rank,
            "rank_interval": result.rank_interval, "trace_interval": result.trace_interval,
            "layers": {name: layer.eigenvalues for name, layer in result.layers.items()}}


def notes_or_error(call: Any) -> tuple[str, str]:
    """``("none", the result's notes joined)`` of a call, or ``(exception type, message)``."""
    try:
        return "none", " | ".join(call().notes)
    except Exception as error:  # noqa: BLE001 - the test compares the type and message
        return type(error).__name__, str(error)


def outcome(call: Any) -> tuple[str, str]:
    """``(exception type, message)`` of a call that must fail."""
    try:
        call()
    except Exception as error:  # noqa: BLE001 - the test compares the type and message
        return type(error).__name__, str(error)
    return "none", ""


def worker(rank: int, port: int, out: str) -> None:
    # A process killed by a signal (gloo aborts with SIGABRT; spawn ends the others with
    # SIGTERM) leaves its Python stack here, for the fixture's error: the fixture had failed once
    # in CI with no trace of where.
    faults = open(Path(out) / f"faults{rank}.txt", "w")  # noqa: SIM115 - open until exit
    faulthandler.enable(faults, all_threads=True)
    faulthandler.register(signal.SIGTERM, faults, all_threads=True, chain=True)
    torch.set_num_threads(1)
    # a collective that one process never joins fails the test in minutes, not gloo's 30
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                           world_size=WORLD, timeout=datetime.timedelta(seconds=180))
    group = dist.group.WORLD
    inputs, targets = make_batch()
    x, y = shard(inputs, rank), shard(targets, rank)
    results: dict[str, Any] = {}
    model = make_model()
    for name, kind, method, loss, options, keywords in CASES:
        case_model = make_model(kind)
        results[name] = summary(hessrank.effective_rank(
            case_model, LOSSES[loss](case_model), batch_of(kind, x, y), method=method,
            process_group=group, **options, **keywords))

    # A rule that claims a layer in one process only: the attention rule declines a layer whose
    # score tensors exceed its limit, 64 n bytes here, so process 0 (7 samples) declines it and
    # process 1 (5) does not; every process must take the general path for it.
    from hessrank.curvature.rules import attention

    limit, attention.CHUNK_BYTES = attention.CHUNK_BYTES, 64 * 6
    try:
        results["attention-declined-once"] = summary(hessrank.effective_rank(
            make_model("attention"), nn.CrossEntropyLoss(), (x, y), method="fisher",
            process_group=group))
    finally:
        attention.CHUNK_BYTES = limit

    # DDP: its .module analysed; no gradient, no reducer state touched; training still works.
    ddp = nn.parallel.DistributedDataParallel(make_model())
    results["ddp"] = summary(hessrank.effective_rank(ddp, nn.CrossEntropyLoss(), (x, y),
                                                     method="fisher", process_group=group))
    results["ddp-grads"] = [p.grad for p in ddp.parameters()]
    nn.CrossEntropyLoss()(ddp(x), y).backward()  # DDP averages the shards' gradients
    results["ddp-step"] = [p.grad.clone() for p in ddp.parameters()]

    # DDP with BatchNorm after a training step: each process's running statistics are its own
    # shard's (DDP broadcasts process 0's at the start of its next forward). The call takes
    # process 0's, says so, and leaves every process's own buffers as they were.
    normed_ddp = nn.parallel.DistributedDataParallel(make_model("batchnorm"))
    nn.CrossEntropyLoss()(normed_ddp(x), y).backward()
    results["ddp-bn-own"] = normed_ddp.module[1].running_mean.clone()
    normed_ddp.eval()
    results["ddp-bn"] = summary(hessrank.effective_rank(
        normed_ddp, nn.CrossEntropyLoss(), (x, y), method="exact", process_group=group))
    results["ddp-bn-after"] = normed_ddp.module[1].running_mean.clone()
    results["ddp-bn-state"] = copy.deepcopy(normed_ddp.module.state_dict())
    results["ddp-bn-unwrapped"] = outcome(lambda: hessrank.effective_rank(
        normed_ddp.module, nn.CrossEntropyLoss(), (x, y), method="exact", process_group=group))
    # a buffer DDP ignores (never synchronised) that differs: refused as for a plain module;
    # process 0's had been taken, the note saying DDP's next forward would (probe 207)
    ignoring = make_model("batchnorm").eval()
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        ignoring, ["1.running_mean"])
    with torch.no_grad():
        ignoring[1].running_mean.fill_(float(rank))
    results["ddp-bn-ignored"] = outcome(lambda: hessrank.effective_rank(
        nn.parallel.DistributedDataParallel(ignoring), nn.CrossEntropyLoss(), (x, y),
        method="exact", process_group=group))
    # DDP and torch.compile in either order (probe 208): DDP below a compile wrapper had not
    # been seen (process 0's statistics refused as differing), and a compile wrapper below DDP
    # prefixed the names it ignores with _orig_mod. (its ignored buffer broadcast all the same)
    results["compiled-ddp-bn"] = summary(hessrank.effective_rank(
        torch.compile(normed_ddp), nn.CrossEntropyLoss(), (x, y), method="exact",
        process_group=group))
    compiled = torch.compile(copy.deepcopy(ignoring))
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        compiled, ["_orig_mod.1.running_mean"])
    results["ddp-compiled-ignored"] = outcome(lambda: hessrank.effective_rank(
        nn.parallel.DistributedDataParallel(compiled), nn.CrossEntropyLoss(), (x, y),
        method="exact", process_group=group))
    # DDP-wrapped in one process only: its buffers' broadcast, a collective of that process
    # alone, had hung the group (probe 98)
    results["ddp-one-process"] = outcome(lambda: hessrank.effective_rank(
        normed_ddp if rank == 1 else normed_ddp.module, nn.CrossEntropyLoss(), (x, y),
        method="exact", process_group=group))

    # FSDP, either API: each process holds shards of the weights (FSDP2's had failed in the
    # call's snapshot with torch's bare error, FSDP1's been blamed on differing parameters;
    # probe 242)
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard

    for case, wrap in (("fsdp2", fully_shard), ("fsdp1", lambda model: FullyShardedDataParallel(
            model, device_id=torch.device("cpu")))):
        results[case] = outcome(lambda wrap=wrap: hessrank.effective_rank(
            wrap(make_model()), nn.CrossEntropyLoss(), (x, y), method="fisher",
            process_group=group))

    # a process outside the group it passes: new_group hands it a placeholder, whose type had
    # been named (an int), not the membership (probe 242)
    outside = dist.new_group([1])
    if rank == 0:
        results["non-member"] = outcome(lambda: hessrank.effective_rank(
            model, nn.CrossEntropyLoss(), (x, y), process_group=outside))

    # SyncBatchNorm normalises with the global batch's statistics: refused for another reason
    # than BatchNorm's own shard statistics (probe 242)
    results["syncbn"] = outcome(lambda: hessrank.effective_rank(
        nn.SyncBatchNorm.convert_sync_batchnorm(make_model("batchnorm")), nn.CrossEntropyLoss(),
        (x, y), method="exact", mode="train", process_group=group))

    # Errors reach every process: bad input in process 1 only.
    bad = x.clone()
    if rank == 1:
        bad[0, 0] = float("nan")
    results["nan"] = outcome(lambda: hessrank.effective_rank(
        model, nn.CrossEntropyLoss(), (bad, y), process_group=group))
    other = make_model()
    if rank == 1:
        with torch.no_grad():
            other[0].weight[0, 0] += 1.0
    results["params"] = outcome(lambda: hessrank.effective_rank(
        other, nn.CrossEntropyLoss(), (x, y), process_group=group))
    # State the parameters' sums did not show: swapped entries, a buffer, a frozen parameter.
    normed = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))
    normed = normed.double().eval()
    normed[0].requires_grad_(False)
    row = (0, slice(0, 2))  # two entries of the head's weight, swapped
    for case, change in (("swapped", lambda m: m[3].weight[row].copy_(m[3].weight[row].flip(0))),
                         ("buffer", lambda m: m[1].running_mean.add_(0.5)),
                         ("frozen", lambda m: m[0].weight.mul_(3.0))):
        changed = copy.deepcopy(normed)
        if rank == 1:
            with torch.no_grad():
                change(changed)
        results[case] = outcome(lambda changed=changed: hessrank.effective_rank(
            changed, nn.CrossEntropyLoss(), (x, y), method="exact", process_group=group))
    # Models equal in every tensor that compute other functions (probe 61: the results had
    # mixed the two models' curvatures silently): a plain attribute, another activation.
    results["attribute"] = outcome(lambda: hessrank.effective_rank(
        Scaled(1.0 if rank == 0 else 3.0), nn.CrossEntropyLoss(), (x, y), method="fisher",
        process_group=group))
    # A cap just above process 0's first sample's pre-activations in process 1: no output of
    # that sample differs, and the result had mixed two models silently (probe 188).
    with torch.no_grad():
        reach = float(make_model()[0](shard(inputs, 0)[:1]).abs().max())
    results["attribute-unseen"] = outcome(lambda: hessrank.effective_rank(
        Capped(100.0 if rank == 0 else 1.001 * reach), nn.CrossEntropyLoss(), (x, y),
        method="fisher", process_group=group))
    activated = make_model()
    if rank == 1:
        activated[1] = nn.Sigmoid()
    results["activation"] = outcome(lambda: hessrank.effective_rank(
        activated, nn.CrossEntropyLoss(), (x, y), method="exact", process_group=group))
    # A model that cannot run one sample alone: compared by its tensors only (a note), unless
    # it runs in one process and not in another.
    results["pairs-only"] = summary(hessrank.effective_rank(
        PairsOnly(), nn.CrossEntropyLoss(), (x, y), method="exact", process_group=group))
    results["pairs-only-once"] = outcome(lambda: hessrank.effective_rank(
        PairsOnly(failing=rank == 1), nn.CrossEntropyLoss(), (x, y), method="exact",
        process_group=group))
    # As one process would say it (probe 62): a NaN loss had been called two processes' losses
    # disagreeing ("nan and nan"), outputs in a dict a bare AttributeError.
    results["nan-loss"] = outcome(lambda: hessrank.effective_rank(
        model, lambda f, t: nn.functional.cross_entropy(f, t) * float("nan"), (x, y),
        method="exact", process_group=group))
    results["dict-outputs"] = outcome(lambda: hessrank.effective_rank(
        DictOutputs(), lambda f, t: nn.functional.cross_entropy(f["logits"], t), (x, y),
        method="exact", process_group=group))
    # The refined budget (the model's graph, known after its first pass) in every process:
    # large activations, few parameters; refused by one process alone on its shard.
    results["refined-budget"] = outcome(lambda: hessrank.effective_rank(
        WideActivations().double(), nn.CrossEntropyLoss(), (x, y), method="exact",
        max_memory=2 * 2**20, process_group=group))
    # The output side runs on the gathered global batch in every process: counted at the
    # shard's size, a budget one process on the whole batch refuses let each run at twice it
    # (probe 98). 16 samples a process: about 41 MiB of loss-side copies for the 32.
    g = torch.Generator().manual_seed(1)
    wide_x, wide_y = torch.randn(32, 4, generator=g), torch.randint(0, 20_000, (32,), generator=g)
    for method in ("fisher", "fisher_lanczos"):
        results[f"wide-outputs-{method}"] = outcome(
            lambda method=method: hessrank.effective_rank(
                WideOutputs(), nn.CrossEntropyLoss(), (wide_x[16 * rank:16 * rank + 16],
                                                       wide_y[16 * rank:16 * rank + 16]),
                method=method, max_memory=36e6, process_group=group))
    # Uneven shards of wide inputs: the processes' batch copies differ, and the refined check
    # had judged each process's own figure, so at a budget between them one refused and the
    # other went on to a GroupFailure (probe 188). Every process judges the largest.
    wide = nn.Sequential(nn.Linear(4096, 4), nn.Tanh(), nn.Linear(4, 3))
    g = torch.Generator().manual_seed(2)
    wide_in, wide_labels = torch.randn(80, 4096, generator=g), torch.randint(0, 3, (80,),
                                                                            generator=g)
    uneven = slice(0, 75) if rank == 0 else slice(75, 80)

    def budgeted(budget: float, batch: tuple[torch.Tensor, torch.Tensor] = (
            wide_in[uneven], wide_labels[uneven])) -> tuple[str, int | None]:
        try:
            hessrank.effective_rank(wide, nn.CrossEntropyLoss(), batch, method="fisher",
                                    max_memory=budget, process_group=group)
        except Exception as error:  # noqa: BLE001 - the test compares the type and figure
            return type(error).__name__, getattr(error, "memory_bytes", None)
        return "none", None

    first = budgeted(1.0)
    results["uneven-refined-budget"] = (first, budgeted((first[1] or 0) + 1))
    # The rule layers' factors gathered from every process (probe 188: uncounted, fisher ran at
    # 3.5-5.4 times max_memory): the refined figure at a budget just above the first.
    # The budget raised to each refusal's figure until the call runs: the budget it ran at.
    even = slice(40 * rank, 40 * rank + 40)
    budget, kind = 1.0, "BudgetError"
    for _ in range(8):
        kind, figure = budgeted(budget, (wide_in[even], wide_labels[even]))
        if kind != "BudgetError":
            break
        budget = (figure or 0) + 1
    results["gathered-factors"] = (kind, budget)
    results["detached-exact"] = outcome(lambda: hessrank.effective_rank(
        make_model("detached"), nn.CrossEntropyLoss(), (x, y), method="exact",
        process_group=group))
    results["coupled"] = outcome(lambda: hessrank.effective_rank(
        model, lambda f, t: f.sum() ** 2, (x, y), method="exact", process_group=group))
    # a loss torch differentiates once only: the coupling check's products had raised torch's
    # bare "derivative ... is not implemented" (probe 77)
    results["once-differentiable"] = outcome(lambda: hessrank.effective_rank(
        model, nn.MultiMarginLoss(), (x, y), method="exact", process_group=group))
    # A model that standardises over its batch: each shard would be standardised on its own.
    for method in ("exact", "ggn_lanczos"):
        results[f"mixing-{method}"] = outcome(lambda method=method: hessrank.effective_rank(
            BatchStandardised(), nn.CrossEntropyLoss(), (x, y), method=method,
            process_group=group))
    # Two samples per process: each half of a shard is one sample, whose standardisation over
    # itself is NaN, which the comparison with the shard's outputs had passed (probe 98).
    for method in ("exact", "lanczos"):
        results[f"two-sample-{method}"] = outcome(lambda method=method: hessrank.effective_rank(
            BatchStandardised(), nn.CrossEntropyLoss(), (x[:2], y[:2]), method=method,
            process_group=group))
    # One sample per process: no shard to split, so a model that standardises over its batch
    # was analysed one sample at a time, unchecked (probe 71).
    for method in ("exact", "fisher"):
        results[f"one-sample-{method}"] = outcome(lambda method=method: hessrank.effective_rank(
            BatchStandardised(), nn.CrossEntropyLoss(), (x[:1], y[:1]), method=method,
            process_group=group))
    # Another loss in one process: the global loss would be a mix of the two.
    other_loss = nn.CrossEntropyLoss(reduction="sum" if rank == 1 else "mean")
    for method in ("fisher", "exact"):
        results[f"loss-{method}"] = outcome(lambda method=method: hessrank.effective_rank(
            model, other_loss, (x, y), method=method, process_group=group))
    # An error inside the computation of one process, between exchanges ("mid": a Hessian
    # product of process 1, while process 0 waits in the product's all-reduce) or after the
    # last ("late": process 1's eigen-solve, when process 0 has nothing left to exchange).
    from hessrank.curvature import hessian
    from hessrank.estimators import exact

    def failing(*args: Any, **kwargs: Any) -> Any:
        raise ValueError("injected failure in process 1")

    for case, module, name in (("mid", hessian.HessianOperator, "_local_matmat"),
                               ("late", exact, "symmetric_eigenvalues")):
        original = getattr(module, name)
        if rank == 1:
            setattr(module, name, failing)
        try:
            results[case] = outcome(lambda: hessrank.effective_rank(
                model, nn.CrossEntropyLoss(), (x, y), method="exact", process_group=group))
        finally:
            setattr(module, name, original)
    # The loss's float64 trials failing in one process only (probe 161): that process had run
    # the loss as given while the others widened it, or skipped the trial's exchange, and the
    # next exchange aborted the interpreter in gloo. One decision for all: not widened, noted.
    def no_twin(*args: Any, **kwargs: Any) -> Any:
        raise ValueError("no float64 twin in process 1")

    original_twin = hessian.float64_twin
    if rank == 1:
        hessian.float64_twin = no_twin
    try:  # (float32: a float64 model's loss is not widened)
        results["twin-one-process"] = notes_or_error(lambda: hessrank.effective_rank(
            copy.deepcopy(model).float(), nn.CrossEntropyLoss(), (x.float(), y),
            method="exact", process_group=group))
    finally:
        hessian.float64_twin = original_twin

    def wide_fails(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # fails on the global batch, not on this shard: the trials run on the global batch
        # (on the shard, they had passed, and the widened global loss failed in one process)
        if len(outputs) > len(x):
            raise RuntimeError("the global float64 loss fails in process 1")
        return nn.functional.cross_entropy(outputs, labels)

    if rank == 1:
        hessian.float64_twin = lambda *args: wide_fails
    try:
        results["widened-one-process"] = notes_or_error(lambda: hessrank.effective_rank(
            copy.deepcopy(model).float(), nn.CrossEntropyLoss(), (x.float(), y),
            method="lanczos", process_group=group))
    finally:
        hessian.float64_twin = original_twin
    # The loss side read otherwise in one process (its float64 check failing there alone, out
    # of memory): the spectrum had been a mix of the two readings (probe 174).
    from hessrank.estimators.fisher import Fisher

    original_cotangents = Fisher.cotangents

    def read_otherwise(self: Fisher, *args: Any, **kwargs: Any) -> Any:
        cotangents, weights = original_cotangents(self, *args, **kwargs)
        return 1.5 * cotangents, weights

    if rank == 1:
        Fisher.cotangents = read_otherwise  # type: ignore[method-assign]
    try:
        results["cotangents-one-process"] = outcome(lambda: hessrank.effective_rank(
            model, nn.CrossEntropyLoss(), (x, y), method="fisher", process_group=group))
    finally:
        Fisher.cotangents = original_cotangents  # type: ignore[method-assign]
    # The loss side's float64 check failing in one process only: its caveat had reached only
    # that process's result (probe 207); every process now returns the same notes.
    def narrow_only(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if rank == 1 and outputs.dtype == torch.float64:
            raise RuntimeError("the float64 loss fails in process 1")
        return nn.functional.cross_entropy(outputs, labels)

    for method in ("fisher", "ggn"):
        results[f"check-one-process-{method}"] = notes_or_error(
            lambda method=method: hessrank.effective_rank(
                copy.deepcopy(model).float(), narrow_only, (x.float(), y), method=method,
                process_group=group))
    # A Ctrl-C in one process: the others had waited for the group's timeout (probe 164).
    def interrupted(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if rank == 1:
            raise KeyboardInterrupt("interrupted in process 1")
        return nn.functional.cross_entropy(outputs, labels)

    try:
        hessrank.effective_rank(model, interrupted, (x, y), method="fisher", process_group=group)
        results["interrupted"] = ("none", "")
    except BaseException as error:  # noqa: BLE001 - compared by the test
        results["interrupted"] = (type(error).__name__, str(error))
    # A timeout's exception landing inside an exchange of process 1 (between its flag and its
    # collective): it had started fail()'s all-reduce where process 0 was in the collective,
    # both waited for the group's timeout, and the group was broken for good (probe 165).
    def timed_out(*_: Any) -> None:
        raise TimeoutError("timed out in process 1")

    real_gather, fired = dist.all_gather_object, []

    def gather_signalled(*args: Any, **kwargs: Any) -> Any:
        if rank == 1 and not fired:
            fired.append(True)
            signal.raise_signal(signal.SIGALRM)  # its handler runs before the collective
        return real_gather(*args, **kwargs)

    previous = signal.signal(signal.SIGALRM, timed_out)
    dist.all_gather_object = gather_signalled
    try:
        results["mid-exchange"] = outcome(lambda: hessrank.effective_rank(
            model, nn.CrossEntropyLoss(), (x, y), method="exact", process_group=group))
    finally:
        dist.all_gather_object = real_gather
        signal.signal(signal.SIGALRM, previous)
    # A classifier saturated past float32's range: its float32 Hessian is zero, noted in every
    # process (a data-parallel call had returned srank 0 without a word; probe 164).
    saturated = nn.Linear(4, 3)
    with torch.no_grad():
        logits = saturated(inputs.float())
        top = logits.topk(2, dim=1).values
        saturated.weight.mul_(120.0 / float((top[:, 0] - top[:, 1]).min()))
        saturated.bias.mul_(120.0 / float((top[:, 0] - top[:, 1]).min()))
        labels = saturated(x.float()).argmax(1)
    notes = hessrank.effective_rank(saturated, nn.CrossEntropyLoss(), (x.float(), labels),
                                    method="exact", process_group=group).notes
    results["vanished"] = ("none", " | ".join(notes))
    results["options"] = outcome(lambda: hessrank.effective_rank(
        model, nn.CrossEntropyLoss(), (x, y), method="fisher",
        threshold=0.9 if rank == 0 else 0.95, process_group=group))
    with open(Path(out) / f"rank{rank}.pkl", "wb") as file:
        pickle.dump(results, file)
    # Both processes done with every collective, then the group destroyed, then the process
    # ended without the interpreter's finalisation, its results written. The DDP wrappers sit in
    # reference cycles, one of them held where the collector cannot release it, so reducers and
    # the group's gloo threads outlive destroy_process_group; a process finalised with them alive
    # aborted this fixture once under load ("terminate called without an active exception"),
    # after only the first wrapper had been released. What torch's teardown does is not what
    # these tests check. (A second abort in CI, of process 1 with no trace of where, is what the
    # fault files above are for.)
    dist.barrier()
    dist.destroy_process_group()
    faulthandler.unregister(signal.SIGTERM)
    faulthandler.disable()
    faults.close()
    os._exit(0)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def spawned(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("distributed")
    try:
        mp.spawn(worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    except mp.ProcessExitedException as error:  # killed by a signal: where each process was
        stacks = "\n".join(f"process {rank}:\n{(out / f'faults{rank}.txt').read_text()}"
                           for rank in range(WORLD) if (out / f"faults{rank}.txt").exists())
        raise AssertionError(f"{error}\n{stacks}") from error
    return [pickle.loads((out / f"rank{rank}.pkl").read_bytes()) for rank in range(WORLD)]


def single(name: str) -> dict[str, Any]:
    _, kind, method, loss, options, keywords = next(case for case in CASES if case[0] == name)
    model = make_model(kind)
    return summary(hessrank.effective_rank(model, LOSSES[loss](model),
                                           batch_of(kind, *make_batch()), method=method,
                                           **options, **keywords))


@pytest.mark.parametrize("name", [case[0] for case in CASES])
def test_equals_one_process_on_the_whole_batch(spawned: list[dict[str, Any]], name: str) -> None:
    reference = single(name)
    first = spawned[0][name]
    for rank in range(WORLD):
        got = spawned[rank][name]
        assert got["n"] == N
        # Every process returns the same numbers.
        np.testing.assert_array_equal(got["eigenvalues"], first["eigenvalues"])
        assert got["ranks"] == first["ranks"]
    assert first["rank"] == reference["rank"]
    assert first["ranks"]["numerical"] == reference["ranks"]["numerical"]
    # Lanczos runs from the same probe on products equal to rounding; float32 sums in another
    # order round otherwise.
    rtol = 1e-6 if "lanczos" in name or "float32" in name else 1e-9
    np.testing.assert_allclose(first["eigenvalues"], reference["eigenvalues"], rtol=rtol,
                               atol=rtol * abs(reference["eigenvalues"][0]))
    np.testing.assert_allclose(first["trace"], reference["trace"], rtol=rtol)
    for layer, values in reference["layers"].items():
        np.testing.assert_allclose(first["layers"][layer], values, rtol=1e-9,
                                   atol=1e-9 * abs(values[0]))
    assert first["paths"] == reference["paths"]
    assert first["max_rank"] == reference["max_rank"]
    if reference["rank_interval"] is not None:
        np.testing.assert_allclose(first["rank_interval"], reference["rank_interval"], rtol=1e-6)
        np.testing.assert_allclose(first["trace_interval"], reference["trace_interval"],
                                   rtol=1e-6)
    assert any("data-parallel over 2 processes (gloo)" in note for note in first["notes"])


def test_cnn_cases_gather_every_kind_of_rule_factors(spawned: list[dict[str, Any]]) -> None:
    """Kronecker (linear), convolution, explicit per-sample (norm), recurrent, attention and
    embedding factors all gathered."""
    assert set(spawned[0]["fisher-cnn"]["paths"].values()) == {"conv", "linear", "norm"}
    assert set(spawned[0]["fisher-gru"]["paths"].values()) == {"gru", "linear"}  # summed
    assert set(spawned[0]["fisher-attention"]["paths"].values()) == {"attention", "linear"}
    assert set(spawned[0]["ggn-embedding"]["paths"].values()) == {"embedding", "linear"}


def test_a_rule_declined_in_one_process_is_declined_in_all(
        spawned: list[dict[str, Any]]) -> None:
    """Process 0's share is too large for the attention rule, process 1's is not: both take the
    general path for the attention layer, say why, and agree with one process."""
    reference = single("fisher-attention")
    first = spawned[0]["attention-declined-once"]
    for rank in range(WORLD):
        got = spawned[rank]["attention-declined-once"]
        np.testing.assert_array_equal(got["eigenvalues"], first["eigenvalues"])
        assert got["paths"] == first["paths"] and got["notes"] == first["notes"]
    np.testing.assert_allclose(first["eigenvalues"], reference["eigenvalues"], rtol=1e-9,
                               atol=1e-9 * abs(reference["eigenvalues"][0]))
    assert {first["paths"][name] for name in first["paths"] if name.startswith("attn.")} == {
        "torch.func"}
    assert any("'attn'" in note and "but not in process 0" in note for note in first["notes"])


def test_a_model_that_cannot_run_one_sample_is_compared_by_its_tensors(
        spawned: list[dict[str, Any]]) -> None:
    """The function check runs one sample; a model that refuses it everywhere is analysed as
    one process would analyse the whole batch, with a note."""
    expected = hessrank.effective_rank(PairsOnly(), nn.CrossEntropyLoss(), make_batch(), "exact")
    for rank in range(WORLD):
        result = spawned[rank]["pairs-only"]
        np.testing.assert_allclose(result["eigenvalues"], expected.eigenvalues, rtol=0,
                                   atol=1e-10 * abs(expected.eigenvalues[0]))
        assert any("compared by their parameters and buffers alone" in note
                   and "a batch needs two samples" in note for note in result["notes"])


def test_ddp_model_analysed_without_touching_ddp(spawned: list[dict[str, Any]]) -> None:
    reference = single("fisher")
    for rank in range(WORLD):
        got = spawned[rank]
        np.testing.assert_allclose(got["ddp"]["eigenvalues"], reference["eigenvalues"],
                                   rtol=1e-9)
        assert any("DistributedDataParallel" in note for note in got["ddp"]["notes"])
        assert all(grad is None for grad in got["ddp-grads"])
    # DDP's own all-reduce still works after the call: equal gradients in both processes, the
    # average of the shards' mean-loss gradients.
    for mine, theirs in zip(spawned[0]["ddp-step"], spawned[1]["ddp-step"]):
        torch.testing.assert_close(mine, theirs)
    model = make_model()
    inputs, targets = make_batch()
    for rank in range(WORLD):
        nn.CrossEntropyLoss()(model(shard(inputs, rank)), shard(targets, rank)).backward()
    for mine, param in zip(spawned[0]["ddp-step"], model.parameters()):
        torch.testing.assert_close(mine, param.grad / WORLD)


def test_ddp_batchnorm_statistics_are_process_0s_for_the_call(
        spawned: list[dict[str, Any]]) -> None:
    """After a DDP training step the processes' running statistics differ; the DDP-wrapped
    model is analysed with process 0's, as DDP's next forward would use them, equal to one
    process holding process 0's model; the unwrapped module is refused with that fix."""
    own = [spawned[rank]["ddp-bn-own"] for rank in range(WORLD)]
    assert not torch.equal(own[0], own[1])  # the shards' statistics
    model = make_model("batchnorm")
    model.load_state_dict(spawned[0]["ddp-bn-state"])
    reference = hessrank.effective_rank(model.eval(), nn.CrossEntropyLoss(), make_batch(),
                                        method="exact")
    for rank in range(WORLD):
        got = spawned[rank]["ddp-bn"]
        np.testing.assert_allclose(got["eigenvalues"], reference.eigenvalues, rtol=1e-9,
                                   atol=1e-9 * abs(reference.eigenvalues[0]))
        assert any("process 0's in every process" in note for note in got["notes"])
        torch.testing.assert_close(spawned[rank]["ddp-bn-after"], own[rank], rtol=0, atol=0)
        kind, message = spawned[rank]["ddp-bn-unwrapped"]
        assert "buffer '1.running_mean' differs" in message and "dist.broadcast" in message
        for case in ("ddp-bn-ignored", "ddp-compiled-ignored"):
            kind, message = spawned[rank][case]
            assert kind == "ValueError" and "buffer '1.running_mean' differs" in message, message
        np.testing.assert_allclose(spawned[rank]["compiled-ddp-bn"]["eigenvalues"],
                                   reference.eigenvalues, rtol=1e-9,
                                   atol=1e-9 * abs(reference.eigenvalues[0]))


@pytest.mark.parametrize(("case", "kind", "fragment"), [
    ("nan", "ValueError", "the loss is nan"),
    ("params", "ValueError", "differs between processes 0 and 1"),
    ("swapped", "ValueError", "parameter '3.weight' differs between processes 0 and 1"),
    ("buffer", "ValueError", "buffer '1.running_mean' differs between processes 0 and 1"),
    ("frozen", "ValueError", "parameter '0.weight' differs between processes 0 and 1"),
    ("attribute", "ValueError", "computes another function in process 1 than in process 0"),
    ("activation", "ValueError", "computes another function in process 1 than in process 0"),
    ("attribute-unseen", "ValueError", "computes another function in process 1 than in process "
                                       "0 (on process 1's first sample their outputs differ"),
    ("pairs-only-once", "ValueError", "the model of process 1 fails on process 0's first sample"),
    ("nan-loss", "ValueError", "the loss is nan"),
    ("dict-outputs", "TypeError", "the model returned dict; hessrank needs a tensor of outputs"),
    ("refined-budget", "BudgetError", "method='exact' needs about"),
    ("wide-outputs-fisher", "BudgetError", "method='fisher' needs about"),
    ("wide-outputs-fisher_lanczos", "BudgetError", "method='fisher_lanczos' needs about"),
    ("ddp-one-process", "ValueError", "differently (DistributedDataParallel with "
                                      "broadcast_buffers: [False] against [True])"),
    ("coupled", "ValueError", "couples samples of different processes"),
    ("fsdp2", "ValueError", "the model is sharded across processes (DTensor parameters: 0.weight"),
    ("fsdp1", "ValueError", "the model is wrapped in FullyShardedDataParallel: each process"),
    ("syncbn", "ValueError", "SyncBatchNorm on batch statistics (1): its forward exchanges"),
    ("detached-exact", "ValueError", "DetachedTanh fails a check of its second derivative"),
    ("once-differentiable", "ValueError", "multi_margin_loss_backward: the operation is the "
                                          "loss's, which 'ggn' differentiates twice too"),
    ("mixing-exact", "ValueError", "depends on the other samples of its batch"),
    ("mixing-ggn_lanczos", "ValueError", "depends on the other samples of its batch"),
    ("two-sample-exact", "ValueError", "whole batch's outputs in which of their entries are "
                                       "NaN or infinite"),
    ("two-sample-lanczos", "ValueError", "depends on the other samples of its batch"),
    ("one-sample-exact", "ValueError", "every process holds one sample (shards of [1, 1])"),
    ("one-sample-fisher", "ValueError", "every process holds one sample (shards of [1, 1])"),
    ("options", "ValueError", "call effective_rank differently (threshold"),
    ("mid", "ValueError", "injected failure in process 1"),
    ("late", "ValueError", "injected failure in process 1"),
    ("interrupted", "KeyboardInterrupt", "interrupted in process 1"),
    ("mid-exchange", "TimeoutError", "timed out in process 1"),
    ("vanished", "none", "hessian matrix is zero in float32, and so is the loss's gradient"),
    ("twin-one-process", "none", "not on outputs widened to float64, since no float64 twin in "
                                 "process 1"),
    ("widened-one-process", "none", "the global float64 loss fails in process 1."),
    ("cotangents-one-process", "ValueError", "processes 0 and 1 derived different output-side "
                                             "factors from the same gathered batch"),
    ("check-one-process-fisher", "none", "in process 1: the samples' loss gradients are "
                                         "float32's, not checked against float64"),
    ("check-one-process-ggn", "none", "in process 1: the loss's curvature is a softmax "
                                      "cross-entropy's in float32, not checked in float64"),
    ("loss-fisher", "ValueError", "every process of the group must pass the same loss_fn"),
    ("loss-exact", "ValueError", "every process of the group must pass the same loss_fn"),
])
def test_errors_reach_every_process(spawned: list[dict[str, Any]], case: str, kind: str,
                                    fragment: str) -> None:
    for rank in range(WORLD):
        got_kind, message = spawned[rank][case]
        assert fragment in message, (rank, message)
        # The failing process raises its own error; the others name it (GroupFailure: the
        # error reached them at an exchange, after the failing process's own checks).
        assert got_kind in (kind, "RuntimeError", "GroupFailure"), (rank, got_kind)
    assert {spawned[rank][case][0] for rank in range(WORLD)} & {kind}


def test_a_process_outside_the_group_is_told_so(spawned: list[dict[str, Any]]) -> None:
    kind, message = spawned[0]["non-member"]
    assert kind == "ValueError" and "not a member of process_group" in message, message


def test_a_nan_input_is_named_where_it_is(spawned: list[dict[str, Any]]) -> None:
    """The process whose input holds the NaN names the entry; the others cannot."""
    kind, message = spawned[1]["nan"]
    assert kind == "ValueError" and "inputs[0] holds nan at [0, 0] (1 entry)" in message, message
    assert "holds nan" not in spawned[0]["nan"][1]


@pytest.mark.parametrize("case", ["twin-one-process", "check-one-process-fisher",
                                  "check-one-process-ggn"])
def test_every_process_returns_the_same_notes(spawned: list[dict[str, Any]], case: str) -> None:
    """Notes of one process's own finding reach every process's result, the same list."""
    assert len({spawned[rank][case] for rank in range(WORLD)}) == 1

def test_a_refined_budget_is_judged_alike_in_every_process(
        spawned: list[dict[str, Any]]) -> None:
    """A budget just above the first prediction: every process refuses at the refined check,
    with the same figure, above that prediction (one had refused while the other raised
    GroupFailure; probe 188)."""
    (first, refined), other = (spawned[rank]["uneven-refined-budget"] for rank in range(2))
    assert first[0] == "BudgetError" and (first, refined) == tuple(other)
    assert refined[0] == "BudgetError" and refined[1] > first[1]


def test_the_gathered_factors_count_in_a_data_parallel_budget(
        spawned: list[dict[str, Any]]) -> None:
    """The first layer's activations, 40 samples of 4,096 features a process, are gathered:
    the exchange's padded copy, the two parts received and their concatenation (of 80), 200
    rows beside the 40 kept. Raised to each refusal's figure, the budget a call runs at holds
    them."""
    for rank in range(2):
        kind, budget = spawned[rank]["gathered-factors"]
        assert kind == "none" and budget >= (40 + 200) * 4096 * 4, (kind, budget)


def test_a_call_while_a_group_failure_is_handled_is_its_own() -> None:
    """Inside ``except GroupFailure:`` (a fallback to one process) a call whose loss's float64
    trial fails, as the library expects of a float32-only loss, had raised the handled failure
    again: it was in the trial's error's context (probe 164)."""
    from hessrank.distributed import GroupFailure

    model = make_model().float()
    inputs, targets = make_batch()

    def float32_only(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if outputs.dtype == torch.float64:
            raise RuntimeError("float32 only")
        return nn.functional.cross_entropy(outputs, labels)

    try:
        raise GroupFailure("process 1 of the group failed (RuntimeError): out of data")
    except GroupFailure:
        result = hessrank.effective_rank(model, float32_only, (inputs.float(), targets), "exact")
    assert result.rank > 0


@pytest.mark.parametrize(("change", "named"), [
    (lambda m: m[0].weight[0, :2].copy_(m[0].weight[0, :2].flip(0)), "parameter '0.weight'"),
    (lambda m: m[1].running_var.mul_(1.0 + 1e-6), "buffer '1.running_var'"),
    (lambda m: m[1].num_batches_tracked.add_(1), "buffer '1.num_batches_tracked'"),
    (lambda m: m.phase.imag.add_(0.5), "buffer 'phase'"),
], ids=["swapped entries", "a statistic off by 1e-6", "an integer buffer", "an imaginary part"])
def test_the_same_model_fingerprint_tells_each_change(change, named) -> None:
    """What the sums of each analysed parameter did not show (one process, no group needed)."""
    from hessrank.distributed import _differing_state, _fingerprint

    model = make_model("batchnorm")
    model.register_buffer("phase", torch.tensor([1.0 + 2.0j, 3.0 - 1.0j]))
    before = _fingerprint(model)
    assert _differing_state(before, _fingerprint(copy.deepcopy(model))) is None
    with torch.no_grad():
        change(model)
    assert _differing_state(before, _fingerprint(model)) == named


def test_process_group_needs_initialised_distributed() -> None:
    if dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    model, batch = make_model(), make_batch()
    with pytest.raises(ValueError, match="not initialised"):
        hessrank.effective_rank(model, nn.CrossEntropyLoss(), batch, process_group=object())
