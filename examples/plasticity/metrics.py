"""Per-seed measurements: the earlier explanations of plasticity loss and, through the public
``hessrank`` API, curvature. Every function returns one value per seed (a list of length S;
``gradient_overlap`` two: the overlap and the k it took)."""

from __future__ import annotations

import torch
from torch import nn

import hessrank
from plasticity.model import BatchedMLP, per_seed_cross_entropy
from plasticity.problems import SetupError


@torch.no_grad()
def unit_stats(
    model: BatchedMLP, x: torch.Tensor, dormant_tau: float
) -> dict[str, list[float]]:
    """Dead, dormant and active units over the evaluation inputs ``x`` (S, B, D), all hidden layers.

    - dead: a unit whose output is exactly zero for every input (ReLU can do this, leaky-ReLU,
      tanh and identity essentially cannot);
    - dormant (Sokar et al.): a unit whose mean |output| divided by its layer's average of that
      quantity is at most ``dormant_tau``;
    - active fraction: the fraction of (unit, input) pairs with a positive pre-activation.
    All three are fractions of the hidden units.
    """
    _, pre = model.forward_with_hidden(x)
    dead, dormant, active = [], [], []
    for z in pre:
        h = model.act(z)
        dead.append((h == 0).all(dim=1).float())
        score = h.abs().mean(dim=1)
        relative = score / score.mean(dim=1, keepdim=True).clamp_min(1e-12)
        dormant.append((relative <= dormant_tau).float())
        active.append((z > 0).float().mean(dim=1))
    return {
        "dead_frac": torch.cat(dead, 1).mean(1).tolist(),
        "dormant_frac": torch.cat(dormant, 1).mean(1).tolist(),
        "active_frac": torch.cat(active, 1).mean(1).tolist(),
    }


@torch.no_grad()
def feature_rank(model: BatchedMLP, x: torch.Tensor, threshold: float) -> list[int]:
    """srank of the penultimate features (S, B, W) per seed, via ``hessrank.spectral_ranks``."""
    _, pre = model.forward_with_hidden(x)
    features = model.act(pre[-1]).double()
    svals = torch.linalg.svdvals(features)
    return [
        int(hessrank.spectral_ranks(sv.numpy(), threshold=threshold)["srank"]) for sv in svals
    ]


def full_batch_gradient_norm(model: BatchedMLP, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    """||grad of the data loss|| per seed on (x, y), leaving ``.grad`` untouched."""
    loss = per_seed_cross_entropy(model(x), y).sum()
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return sum(g.pow(2).flatten(1).sum(1) for g in grads).sqrt().tolist()


BLOCKS = ("all", "last2")


def block_params(net: nn.Sequential, block: str) -> list[torch.Tensor] | None:
    """The parameters of ``block`` in ``net``: ``all`` (None: every parameter) or ``last2``.

    ``last2`` is the weights and biases of the last two ``nn.Linear`` layers, the block the
    reviews of v1 describe the paper's Hessian rank as being computed on.
    """
    if block == "all":
        return None
    if block == "last2":
        linears = [m for m in net if isinstance(m, nn.Linear)]
        return [p for lin in linears[-2:] for p in lin.parameters()]
    raise ValueError(f"unknown parameter block {block!r}; choose one of {BLOCKS}")


def hess_key(quantity: str, method: str, block: str) -> str:
    """Metric name of a curvature ``quantity`` (rank, top, cap, ...) of ``method`` on ``block``.

    ``hess_rank_fisher`` for the whole network, ``hess_rank_fisher_last2`` for the last two
    layers (the task-start / task-end suffix is added by the caller).
    """
    return f"hess_{quantity}_{method}" + ("" if block == "all" else f"_{block}")


def hessian_ranks(
    model: BatchedMLP,
    x: torch.Tensor,
    y: torch.Tensor,
    methods: list[str],
    blocks: list[str],
    threshold: float,
    lanczos_steps: int | None,
    max_memory: float,
) -> dict[str, list]:
    """For each method and parameter block, srank, top eigenvalue and rank cap per seed.

    Each seed's weights become an ordinary ``nn.Sequential`` evaluated on its own batch
    (``x`` (S, n, D), ``y`` (S, n)) and passed to ``hessrank.effective_rank``. Keys (see
    ``hess_key``): ``hess_rank_*``, ``hess_top_*``, ``hess_cap_*`` (the structural maximum rank:
    ``min(P, n)`` for EF, ``min(P, n(C-1))`` for GGN, ``P`` for exact and Lanczos) and, for
    Lanczos, ``hess_rank_lanczos*_lo`` / ``_hi`` (its rank interval).
    """
    loss_fn = nn.CrossEntropyLoss()
    out: dict[str, list] = {}
    if not methods:
        return out
    # the step count goes to a tracker whose methods take it (one that none takes is refused)
    takers = hessrank.estimator_options()["lanczos_steps"]["methods"]
    steps = {"lanczos_steps": lanczos_steps} if set(methods) & set(takers) else {}
    for s in range(model.num_seeds):
        net = model.to_module(s)
        for block in blocks:
            # The library's one way of recording curvature over time (as the CLI's checkpoints).
            tracker = hessrank.Tracker(
                net, loss_fn, methods, log=None, threshold=threshold,
                params=block_params(net, block), max_memory=max_memory,
                seed=model.seeds[s], **steps,
            )
            for measurement in tracker.measure((x[s], y[s])):
                method, res = measurement.method, measurement.result
                assert res is not None  # on_error="raise": a failure has raised
                rank_key = hess_key("rank", method, block)
                values = {
                    rank_key: int(res.rank),
                    hess_key("top", method, block): float(res.top_eigenvalue),
                    hess_key("cap", method, block): int(min(res.max_rank, res.num_params)),
                }
                if res.rank_interval is not None:
                    lo, hi = res.rank_interval
                    values[f"{rank_key}_lo"], values[f"{rank_key}_hi"] = int(lo), int(hi)
                for key, value in values.items():
                    out.setdefault(key, []).append(value)
    return out


def gradient_overlap(
    model: BatchedMLP, x: torch.Tensor, y: torch.Tensor, k: int | None, threshold: float,
    max_memory: float
) -> tuple[list[float], list[int]]:
    """Fraction of ||grad||^2 in the top-k exact-Hessian eigenspace, and the k it used, per seed.

    ``k`` None takes the srank at ``threshold`` (as the ranks are measured), unless it splits a
    cluster of equal |eigenvalues| (a +a/-a pair, a repeated eigenvalue), where the top-k
    eigenvectors, and so the overlap, are not determined: then the nearest k at a gap (the lower
    one of two as near), which is why the k used is returned, to be recorded beside the overlap.

    Raises:
        SetupError: an explicit ``k`` splits such a cluster, naming the gaps on either side.
    """
    loss_fn = nn.CrossEntropyLoss()
    overlaps, used = [], []
    for s in range(model.num_seeds):
        net, batch = model.to_module(s), (x[s], y[s])
        chosen = k if k is not None else int(hessrank.effective_rank(
            net, loss_fn, batch, method="exact", threshold=threshold, max_memory=max_memory).rank)
        try:
            overlap = hessrank.gradient_overlap(net, loss_fn, batch, k=chosen,
                                                max_memory=max_memory)
        except hessrank.TiedEigenvaluesError as tie:
            below, above = tie.gaps
            if k is not None:
                raise SetupError(
                    f"--overlap-k {k} splits a cluster of equal |eigenvalues| of seed "
                    f"{model.seeds[s]}'s exact Hessian, so its top-k eigenvectors, and the "
                    f"overlap, are not determined: the nearest k at a gap are {below} and "
                    f"{above}; pass one of them (with another --out: config.json fixes "
                    "overlap_k), or omit --overlap-k to take the srank (moved to the nearest "
                    "gap where it splits such a cluster)") from None
            chosen = below if chosen - below <= above - chosen else above
            overlap = hessrank.gradient_overlap(net, loss_fn, batch, k=chosen,
                                                max_memory=max_memory)
        overlaps.append(float(overlap))
        used.append(chosen)
    return overlaps, used
