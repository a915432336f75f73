"""Regularizers against loss of plasticity, all per seed on stacked (S, ...) parameters.

Penalties return an (S,) tensor added to the per-seed loss; Shrink & Perturb acts on the
parameters after each optimizer step instead.
"""

from __future__ import annotations

import numpy as np
import torch

REGULARIZERS = ("none", "l2", "l2_init", "shrink_perturb", "wasserstein", "feature_rank")


def l2_penalty(params: list[torch.Tensor]) -> torch.Tensor:
    """sum_l ||theta_l||^2 per seed."""
    return sum(p.pow(2).flatten(1).sum(1) for p in params)


def l2_init_penalty(params: list[torch.Tensor], init: list[torch.Tensor]) -> torch.Tensor:
    """sum_l ||theta_l - theta0_l||^2 per seed (Kumar et al., regenerative regularization)."""
    return sum((p - p0).pow(2).flatten(1).sum(1) for p, p0 in zip(params, init, strict=True))


def wasserstein_penalty(
    params: list[torch.Tensor], init_sorted: list[torch.Tensor]
) -> torch.Tensor:
    """sum_l sum_i (theta_l,(i) - theta0_l,(i))^2 per seed: squared distance of order statistics.

    ``init_sorted[l]`` holds each seed's initial entries of tensor ``l`` sorted, shape (S, d_l).
    This is the squared 2-Wasserstein distance between the empirical distributions of the current
    and initial entries (times d_l): it is blind to which entry holds which value.

    Computed as ||theta - target||^2 where ``target`` gives each entry the initial value of the same
    rank: the same value, and (the ranking being locally constant) the same gradient as
    differentiating through a sort, without the sort's backward pass. On CPU the ranking uses
    numpy's argsort, several times faster than torch's here.
    """
    total = torch.zeros(params[0].shape[0], device=params[0].device)
    for p, q in zip(params, init_sorted, strict=True):
        flat = p.flatten(1)
        with torch.no_grad():
            if flat.is_cpu:
                order = torch.from_numpy(np.argsort(flat.detach().numpy(), axis=1))
            else:
                order = flat.argsort(dim=1)
            target = torch.empty_like(flat).scatter_(1, order, q)
        total = total + (flat - target).pow(2).sum(1)
    return total


def feature_rank_penalty(features: torch.Tensor) -> torch.Tensor:
    """Minus the entropy of the normalised singular values of each seed's features (S, B, W).

    The exponential of that entropy is the entropy effective rank (Roy & Vetterli), a smooth
    stand-in for srank; minimising this penalty spreads the feature spectrum out.
    """
    s = torch.linalg.svdvals(features)
    p = s / s.sum(dim=1, keepdim=True).clamp_min(1e-12)
    return (p * torch.log(p.clamp_min(1e-12))).sum(1)


@torch.no_grad()
def shrink_perturb_(
    params: list[torch.Tensor], shrink: float, noise_std: float, gens: list[torch.Generator]
) -> None:
    """theta <- (1 - shrink) theta + noise_std * N(0, 1), noise from each seed's generator."""
    for p in params:
        noise = torch.stack([torch.randn(p.shape[1:], generator=g) for g in gens])
        p.mul_(1.0 - shrink).add_(noise, alpha=noise_std)
