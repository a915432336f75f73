"""Per-seed measurements: the earlier explanations of plasticity loss and, through the public
``hessrank`` API, curvature. Every function returns one value per seed (a list of length S)."""

from __future__ import annotations

import torch
from torch import nn

import hessrank
from plasticity.model import BatchedMLP, per_seed_cross_entropy


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


def hessian_ranks(
    model: BatchedMLP,
    x: torch.Tensor,
    y: torch.Tensor,
    methods: list[str],
    threshold: float,
    lanczos_steps: int,
    lanczos_probes: int,
) -> dict[str, list]:
    """For each method, srank and the top eigenvalue per seed, from ``hessrank.effective_rank``.

    Each seed's weights become an ordinary ``nn.Sequential`` evaluated on its own batch.
    Keys: ``hess_rank_<method>``, ``hess_top_<method>``, plus ``hess_rank_lanczos_lo``/``_hi``.
    """
    loss_fn = nn.CrossEntropyLoss()
    out: dict[str, list] = {}
    for s in range(model.num_seeds):
        net = model.to_module(s)
        for method in methods:
            res = hessrank.effective_rank(
                net, loss_fn, (x[s], y[s]), method=method, threshold=threshold,
                lanczos_steps=lanczos_steps, lanczos_probes=lanczos_probes, seed=model.seeds[s],
            )
            out.setdefault(f"hess_rank_{method}", []).append(int(res.rank))
            out.setdefault(f"hess_top_{method}", []).append(float(res.top_eigenvalue))
            if res.rank_interval is not None:
                lo, hi = res.rank_interval
                out.setdefault(f"hess_rank_{method}_lo", []).append(int(lo))
                out.setdefault(f"hess_rank_{method}_hi", []).append(int(hi))
    return out


def gradient_overlap(
    model: BatchedMLP, x: torch.Tensor, y: torch.Tensor, k: int | None
) -> list[float]:
    """Fraction of ||grad||^2 in the top-k (default: srank) exact-Hessian eigenspace, per seed."""
    loss_fn = nn.CrossEntropyLoss()
    return [
        float(hessrank.gradient_overlap(model.to_module(s), loss_fn, (x[s], y[s]), k=k))
        for s in range(model.num_seeds)
    ]
