"""Models hessrank was not designed for: torchvision architectures (small configurations),
``fisher`` and ``ggn`` against Gram-form float64 references built by plain autograd.

A model's ``P`` is too large for a dense ``P x P`` reference, so the reference is the nonzero
spectrum in Gram form: with ``J`` the ``[n C, P]`` Jacobian of the outputs (one backward pass per
row) and the mean cross-entropy, the EF's nonzero eigenvalues are those of ``n G G^T`` with
``G = R J`` (``R`` the per-sample loss gradients w.r.t. the outputs, ``(p_i - e_y_i) / n``), and
the GGN's those of ``F F^T`` with ``F_i = S_i^T J_i``, ``S_i S_i^T = (diag p_i - p_i p_i^T) / n``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from reference import assert_spectra_close, flat_gradient
from torch import Tensor, nn

import hessrank

torchvision = pytest.importorskip("torchvision")
models = torchvision.models


def _jacobian_rows(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """Outputs ``[n, C]`` and the Jacobian ``[n, C, P]`` (float64, plain autograd)."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = model(x)
    rows = [flat_gradient(value, params, retain_graph=True) for value in out.reshape(-1)]
    return out.detach(), torch.stack(rows).reshape(*out.shape, -1)


def _gram_spectra(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, np.ndarray]:
    """The EF's and the GGN's nonzero spectra (mean cross-entropy), decreasing."""
    out, jac = _jacobian_rows(model, x)
    n, classes = out.shape
    probs = out.softmax(dim=-1)
    residual = (probs - nn.functional.one_hot(y, classes).double()) / n
    gradients = torch.einsum("nc,ncp->np", residual, jac)
    factors = []
    for i in range(n):
        values, vectors = torch.linalg.eigh((torch.diag(probs[i]) - torch.outer(probs[i],
                                                                                 probs[i])) / n)
        factors.append((vectors * values.clamp_min(0).sqrt()).T @ jac[i])
    stacked = torch.cat(factors)
    return {"fisher": torch.linalg.eigvalsh(n * gradients @ gradients.T).flip(0).numpy(),
            "ggn": torch.linalg.eigvalsh(stacked @ stacked.T).flip(0).numpy()}


def _vit() -> nn.Module:
    return models.VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=2,
                                    hidden_dim=16, mlp_dim=24, num_classes=10)


def _convnext() -> nn.Module:
    config = models.convnext.CNBlockConfig
    return models.convnext.ConvNeXt([config(8, 16, 1), config(16, None, 1)], num_classes=10)


def _swin() -> nn.Module:
    return models.swin_transformer.SwinTransformer(
        patch_size=[4, 4], embed_dim=8, depths=[1, 1], num_heads=[2, 2], window_size=[2, 2],
        num_classes=10)


# (name, model, input size, the rule some parameter must take under backend="auto")
ZOO: list[tuple[str, Callable[[], nn.Module], tuple[int, ...], str]] = [
    ("shufflenet_v2_x0_5", lambda: models.shufflenet_v2_x0_5(num_classes=10), (3, 32, 32),
     "conv"),
    ("mobilenet_v3_small", lambda: models.mobilenet_v3_small(num_classes=10), (3, 32, 32),
     "conv"),
    ("vit (1 layer, 16 x 16 images)", _vit, (3, 16, 16), "attention"),
    ("convnext (2 stages)", _convnext, (3, 16, 16), "linear"),
    ("swin (2 stages)", _swin, (3, 16, 16), "norm"),
]


@pytest.mark.parametrize(("make", "shape", "rule"), [case[1:] for case in ZOO],
                         ids=[case[0] for case in ZOO])
def test_torchvision_model_matches_gram_reference(make, shape, rule):
    torch.manual_seed(0)
    model = make().double().eval()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, *shape, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 10, (2,), generator=generator)
    reference = _gram_spectra(model, x, y)
    for method in ("fisher", "ggn"):
        result = hessrank.effective_rank(model, nn.CrossEntropyLoss(), (x, y), method=method)
        count = min(len(result.eigenvalues), len(reference[method]))
        assert_spectra_close(result.eigenvalues, reference[method], count=count, rtol=1e-9)
        assert rule in result.paths.values(), (method, set(result.paths.values()))


def test_mobilenet_v3_lanczos_names_hardsigmoid():
    """MobileNetV3's Hardsigmoid has no second derivative on torch 2.14.1: the Hessian methods
    say so (when this torch lacks it), and name the replacement."""
    model = models.mobilenet_v3_small(num_classes=10).eval()
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    try:
        hessrank.effective_rank(model, nn.CrossEntropyLoss(), (x, y), method="lanczos",
                                lanczos_steps=4)
    except ValueError as error:
        assert "aten::hardsigmoid_backward" in str(error) and "F.relu6(x + 3) / 6" in str(error)
    else:
        pytest.skip("this torch differentiates hardsigmoid twice")
