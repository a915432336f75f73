"""Independent dense float64 references built with torch.func, and the test models.

Nothing here imports hessrank: the references are the ground truth the library is tested against.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, hessian, jacrev


def flat_function(model: nn.Module, names: list[str] | None = None):
    """``(theta, inputs) -> outputs`` over the flattened parameters ``names``, and ``theta0``."""
    params = dict(model.named_parameters())
    names = names or [n for n, p in params.items() if p.requires_grad]
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]

    def outputs(theta: Tensor, inputs: tuple[Tensor, ...]) -> Tensor:
        pieces = {n: c.view(s) for n, c, s in zip(names, theta.split(sizes), shapes)}
        return functional_call(model, pieces, inputs)

    theta0 = torch.cat([params[n].detach().reshape(-1) for n in names])
    return outputs, theta0


def flat_gradient(scalar: Tensor, params: list[Tensor], **options) -> Tensor:
    """The gradient of ``scalar`` w.r.t. ``params`` by plain autograd, flattened (zeros where
    unused); ``options`` go to ``torch.autograd.grad`` (``retain_graph=True``)."""
    pieces = torch.autograd.grad(scalar, params, allow_unused=True, **options)
    return torch.cat([torch.zeros_like(p).reshape(-1) if g is None else g.reshape(-1)
                      for g, p in zip(pieces, params)])


def reference_hessian(model, loss_fn, inputs, targets, names=None, step=1e-3) -> np.ndarray:
    """Dense Hessian by fourth-order central differences of first-order gradients (float64).

    Not ``torch.func.hessian``: on torch 2.14.1 it returns wrong LayerNorm second derivatives
    (its cross terms disagree with finite differences), so it cannot serve as ground truth here.
    """
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    outputs, theta0 = flat_function(model, names)
    def gradient(theta: Tensor) -> Tensor:
        theta = theta.detach().requires_grad_(True)
        return torch.autograd.grad(loss_fn(outputs(theta, inputs), targets), theta)[0]

    columns = []
    for j in range(theta0.numel()):
        e = torch.zeros_like(theta0)
        e[j] = step
        columns.append((-gradient(theta0 + 2 * e) + 8 * gradient(theta0 + e)
                        - 8 * gradient(theta0 - e) + gradient(theta0 - 2 * e)) / (12 * step))
    matrix = torch.stack(columns, dim=1).detach().double().numpy()
    return (matrix + matrix.T) / 2


def double_backward_hessian(model, loss_fn, inputs, targets) -> np.ndarray:
    """Dense Hessian of ``loss_fn(model(inputs), targets)`` w.r.t. every parameter of ``model``,
    by double backpropagation, row by row (zeros where a parameter or an entry is unused).
    Give float64 copies for a float64 reference."""
    params = list(model.parameters())
    gradient = flat_gradient(loss_fn(model(inputs), targets), params, create_graph=True)
    rows = [flat_gradient(entry, params, retain_graph=True) if entry.requires_grad
            else torch.zeros_like(gradient) for entry in gradient]
    return torch.stack(rows).detach().double().numpy()


def _per_sample(inputs, targets, i):
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    return tuple(x[i : i + 1] for x in inputs), targets[i : i + 1]


def reference_fisher(model, loss_fn, inputs, targets, scale, names=None) -> np.ndarray:
    """``scale * sum_i g_i g_i^T`` with ``g_i`` the gradient of sample i's loss (a loop)."""
    outputs, theta0 = flat_function(model, names)
    total = torch.zeros(theta0.numel(), theta0.numel(), dtype=torch.float64)
    for i in range(targets.shape[0]):
        x_i, y_i = _per_sample(inputs, targets, i)
        g = grad(lambda t, x_i=x_i, y_i=y_i: loss_fn(outputs(t, x_i), y_i))(theta0)
        g = g.detach().double()
        total += torch.outer(g, g)
    return (scale * total).numpy()


def reference_ggn(model, loss_fn, inputs, targets, scale, names=None) -> np.ndarray:
    """``scale * sum_i J_i^T H_i J_i`` with explicit Jacobians and output Hessians (a loop)."""
    outputs, theta0 = flat_function(model, names)
    total = torch.zeros(theta0.numel(), theta0.numel(), dtype=torch.float64)
    for i in range(targets.shape[0]):
        x_i, y_i = _per_sample(inputs, targets, i)
        f_i = outputs(theta0, x_i).detach()
        jac = jacrev(lambda t, x_i=x_i: outputs(t, x_i).reshape(-1))(theta0).detach().double()
        out_hessian = hessian(
            lambda f, f_i=f_i, y_i=y_i: loss_fn(f.view_as(f_i), y_i)
        )(f_i.reshape(-1)).detach().double()
        total += jac.T @ out_hessian @ jac
    return (scale * total).numpy()


def saturation_safe_cross_entropy(outputs: Tensor, targets: Tensor) -> Tensor:
    """``nn.CrossEntropyLoss()`` (mean over ``[n, C]`` outputs) written as ``log1p(sum_{k != y}
    exp(f_k - f_y))``: the same function, whose derivatives at a saturated softmax hold their
    digits (``1 - p_y`` is never formed as a difference), so a float64 reference there."""
    differences = outputs - outputs.gather(1, targets[:, None])
    others = torch.ones_like(differences, dtype=torch.bool).scatter(1, targets[:, None], False)
    return torch.log1p(torch.where(others, differences.exp(), 0.0).sum(1)).mean()


def eigenvalues_by_magnitude(matrix: np.ndarray) -> np.ndarray:
    values = np.linalg.eigvalsh((matrix + matrix.T) / 2)
    return values[np.argsort(-np.abs(values), kind="stable")]


def assert_spectra_close(ours: np.ndarray, reference: np.ndarray, count: int | None = None,
                         rtol: float = 1e-6) -> None:
    """The leading ``count`` eigenvalues (by magnitude) agree, relative to the top one."""
    count = count or min(len(ours), len(reference))
    scale = abs(reference[0])
    np.testing.assert_allclose(ours[:count], reference[:count], atol=rtol * scale, rtol=0)


# ------------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------------

def mlp(sizes=(5, 7, 3), activation=nn.Tanh, dtype=torch.float64, seed=0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers).to(dtype)


class Conv1D(nn.Module):
    """HuggingFace ``transformers.pytorch_utils.Conv1D`` (GPT-2's linear layers, weight stored
    ``[nx, nf]``), copied so that the tests need no ``transformers``; it claims that module, as
    hessrank's rule recognises it."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.empty(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))
        nn.init.normal_(self.weight, std=0.5)
        nn.init.normal_(self.bias, std=0.5)

    def forward(self, x: Tensor) -> Tensor:
        size_out = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


Conv1D.__module__ = "transformers.pytorch_utils"


class Scale(nn.Module):
    """A custom module holding its own parameter."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, width))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gain


class ResidualNet(nn.Module):
    """Residual block with LayerNorm, a custom parameter, a reused layer and tied weights."""

    def __init__(self, d_in=4, width=6, classes=3) -> None:
        super().__init__()
        self.inp = nn.Linear(d_in, width)
        self.norm = nn.LayerNorm(width)
        self.block = nn.Linear(width, width)
        self.scale = Scale(width)
        self.head = nn.Linear(width, classes)
        self.tied = nn.Linear(classes, width, bias=False)
        self.tied.weight = nn.Parameter(torch.randn(width, classes) * 0.3)
        self.mixer = nn.Linear(width, classes)
        self.mixer.weight = self.head.weight  # weight tying across modules
        self.temperature = nn.Parameter(torch.tensor(0.7))

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x))
        h = h + torch.tanh(self.block(self.norm(h)))
        h = h + 0.5 * torch.tanh(self.block(h))  # the same layer called twice
        h = self.scale(h)
        return self.head(h) * self.temperature + 0.3 * self.mixer(torch.tanh(h))


class ConvNet(nn.Module):
    def __init__(self, classes=3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 2, 3, stride=2)
        self.conv1d = nn.Conv1d(2, 2, 2)
        self.head = nn.Linear(2, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.nn.functional.softplus(self.conv1(x))
        h = torch.tanh(self.conv2(h))  # [n, 2, 2, 2]
        h = torch.tanh(self.conv1d(h.flatten(2)))  # [n, 2, 3]
        return self.head(h.mean(dim=-1))


def per_token_cross_entropy(outputs: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy over every token of logits ``[n, C, T]`` and targets ``[n, T]``."""
    return nn.functional.cross_entropy(outputs.transpose(1, 2), targets)


def token_head(vocabulary: int, tokens: int, n: int, seed: int = 0
               ) -> tuple[nn.Sequential, Tensor, Tensor]:
    """A float32 embedding (width 32), tanh and linear head over ``vocabulary`` classes (logits
    ``[n, vocabulary, tokens]``), and ``n`` random sequences of ``tokens`` tokens and targets."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Embedding(vocabulary, 32), nn.Tanh(), nn.Linear(32, vocabulary))
    words = torch.randint(0, vocabulary, (n, tokens))
    return model, words, torch.randint(0, vocabulary, (n, tokens))


def head_bias_gradients(model: nn.Sequential, words: Tensor, targets: Tensor) -> Tensor:
    """``[n, vocabulary]``: each sample's :func:`per_token_cross_entropy` gradient w.r.t. the
    head's bias (:func:`token_head`), of a float64 copy of the model, one sample at a time."""
    wide = copy.deepcopy(model).double()
    return torch.stack([torch.autograd.grad(
        per_token_cross_entropy(wide(words[i:i + 1]), targets[i:i + 1]), wide[2].bias)[0]
        for i in range(len(words))])


def classification_batch(n, d, classes, dtype=torch.float64, seed=1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=generator, dtype=dtype)
    y = torch.randint(0, classes, (n,), generator=generator)
    return x, y


def adaptive_softmax_case(scale: float, dtype: torch.dtype = torch.float64, hidden: int = 6,
                          seed: int = 3, scale_bias: bool = False):
    """An MLP whose 6 output features, their last layer's weight (and with ``scale_bias`` its
    bias) times ``scale``, feed ``nn.AdaptiveLogSoftmaxWithLoss`` (5 classes, a cutoff at 2), on
    8 samples labelled by its own predictions: ``(model, adaptive, x, y)``."""
    torch.manual_seed(11)
    adaptive = nn.AdaptiveLogSoftmaxWithLoss(6, 5, cutoffs=[2], div_value=2.0).to(dtype)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 6)).to(dtype)
    with torch.no_grad():
        model[2].weight.mul_(scale)
        if scale_bias:
            model[2].bias.mul_(scale)
    x = torch.randn(8, 4, dtype=dtype)
    with torch.no_grad():
        y = adaptive.predict(model(x))
    return model, adaptive, x, y
