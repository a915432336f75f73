"""An MLP for many seeds at once: every weight carries a leading seeds dimension.

Layer ``l`` holds ``weight`` (S, in, out) and ``bias`` (S, 1, out); the forward pass is one
``torch.baddbmm`` per layer, so S independent networks train as one computation. Seeds never
interact: the loss is a sum of per-seed losses and Adam/SGD act elementwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

ACTIVATIONS = ("relu", "leaky_relu", "tanh", "identity")
LEAKY_SLOPE = 0.01


def activation_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The elementwise nonlinearity called ``name``."""
    fns: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "relu": torch.relu,
        "leaky_relu": lambda z: nn.functional.leaky_relu(z, LEAKY_SLOPE),
        "tanh": torch.tanh,
        "identity": lambda z: z,
    }
    if name not in fns:
        raise ValueError(f"unknown activation {name!r}; choose one of {ACTIVATIONS}")
    return fns[name]


def activation_module(name: str) -> nn.Module:
    """The ``nn.Module`` matching ``activation_fn(name)``."""
    modules = {
        "relu": nn.ReLU,
        "leaky_relu": lambda: nn.LeakyReLU(LEAKY_SLOPE),
        "tanh": nn.Tanh,
        "identity": nn.Identity,
    }
    return modules[name]()


class BatchedMLP(nn.Module):
    """``depth`` hidden layers of ``width`` units, for ``len(seeds)`` independent networks."""

    def __init__(
        self,
        seeds: list[int],
        in_dim: int,
        width: int,
        depth: int,
        out_dim: int,
        activation: str,
    ) -> None:
        super().__init__()
        self.seeds, self.activation = list(seeds), activation
        self.act = activation_fn(activation)
        dims = [in_dim] + [width] * depth + [out_dim]
        weights, biases = [], []
        for fan_in, fan_out in zip(dims[:-1], dims[1:], strict=True):
            weights.append(torch.empty(len(seeds), fan_in, fan_out))
            biases.append(torch.empty(len(seeds), 1, fan_out))
        for s, seed in enumerate(self.seeds):
            g = torch.Generator().manual_seed(seed)
            for w, b in zip(weights, biases, strict=True):
                bound = 1.0 / math.sqrt(w.shape[1])  # nn.Linear's default initialisation
                w[s].uniform_(-bound, bound, generator=g)
                b[s].uniform_(-bound, bound, generator=g)
        self.weights = nn.ParameterList(weights)
        self.biases = nn.ParameterList(biases)

    @property
    def num_seeds(self) -> int:
        return len(self.seeds)

    def forward_with_hidden(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits (S, B, C) and each hidden layer's pre-activations (S, B, width)."""
        pre_activations = []
        h = x
        for w, b in zip(self.weights[:-1], self.biases[:-1], strict=True):
            z = torch.baddbmm(b, h, w)
            pre_activations.append(z)
            h = self.act(z)
        return torch.baddbmm(self.biases[-1], h, self.weights[-1]), pre_activations

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_hidden(x)[0]

    def per_seed_sq_norm(self, other: list[torch.Tensor] | None = None) -> torch.Tensor:
        """(S,) squared norm of the parameters, or of their difference from ``other``."""
        total = torch.zeros(self.num_seeds)
        for i, p in enumerate(self.parameters()):
            d = p if other is None else p - other[i]
            total = total + d.pow(2).flatten(1).sum(1)
        return total

    def to_module(self, s: int) -> nn.Sequential:
        """An ordinary ``nn.Sequential`` of ``nn.Linear`` layers holding seed ``s``'s weights."""
        layers: list[nn.Module] = []
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            lin = nn.Linear(w.shape[1], w.shape[2])
            with torch.no_grad():
                lin.weight.copy_(w[s].T)
                lin.bias.copy_(b[s, 0])
            layers.append(lin)
            if i < last:
                layers.append(activation_module(self.activation))
        return nn.Sequential(*layers)


def per_seed_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """(S,) Euclidean norm over all of the stacked ``tensors`` (each (S, ...)) per seed."""
    per_tensor = torch.stack([torch.linalg.vector_norm(t.flatten(1), dim=1) for t in tensors])
    return torch.linalg.vector_norm(per_tensor, dim=0)


def per_seed_cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(S,) mean cross-entropy of each seed over its batch."""
    s, b, c = logits.shape
    return nn.functional.cross_entropy(
        logits.reshape(s * b, c), y.reshape(s * b), reduction="none"
    ).view(s, b).mean(1)
