"""The peer tools' ways to the same spectra, written as a user of each tool would write them.

Every function takes ``(model, x, y)`` for a model ending in logits and a mean-reduced
cross-entropy loss, and returns eigenvalues as a 1-D float64 numpy array sorted by decreasing
magnitude, on the scale of hessrank's conventions for a mean loss:

- empirical Fisher: ``(1/n) sum_i g_i g_i^T`` (``g_i`` the gradient of sample i's loss), whose
  nonzero eigenvalues are those of the n x n Gram matrix ``(1/n) [g_i . g_j]``;
- GGN: ``(1/n) sum_i J_i^T H_i J_i``, the eigenvalues of the nC x nC Gram matrix of its factors;
- Hessian of the mean loss.

The peers are benchmark-only dependencies (the ``bench`` extra); nothing here is imported by
hessrank. ``install_symeig_shim`` restores the ``Tensor.symeig`` that ViViT calls and that torch
removed; it is applied only inside the benchmark process.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn


def sort_desc(evals: Tensor | np.ndarray) -> np.ndarray:
    """Return eigenvalues as float64 numpy, sorted by decreasing magnitude."""
    arr = np.asarray(evals.detach().cpu().double() if isinstance(evals, Tensor) else evals)
    return arr[np.argsort(-np.abs(arr), kind="stable")]


def gram_eigvalsh(gram: Tensor) -> np.ndarray:
    """Eigenvalues of a symmetric Gram matrix, solved in float64."""
    return sort_desc(torch.linalg.eigvalsh(gram.double()))


def install_symeig_shim() -> None:
    """Give tensors back the ``symeig`` method ViViT calls (removed from torch).

    ViViT calls ``gram.symeig(eigenvectors=...)`` on its float32 Gram matrix and expects
    ascending eigenvalues (and eigenvectors or an empty tensor); ``torch.linalg.eigh`` matches.
    Torch still defines ``Tensor.symeig``, but only to raise, so the shim replaces it.
    """
    if getattr(Tensor.symeig, "_hessrank_bench_shim", False):
        return

    def symeig(self: Tensor, eigenvectors: bool = False, upper: bool = True):
        uplo = "U" if upper else "L"
        if eigenvectors:
            return torch.linalg.eigh(self, UPLO=uplo)
        return torch.linalg.eigvalsh(self, UPLO=uplo), torch.empty(0)

    symeig._hessrank_bench_shim = True  # type: ignore[attr-defined]
    Tensor.symeig = symeig  # type: ignore[method-assign]


def fwd_bwd(model: nn.Module, x: Tensor, y: Tensor) -> None:
    """One plain forward and backward pass of the mean loss (the unit of all ratios)."""
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()


def extended(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """A BackPACK-extended deep copy of ``model`` and an extended loss (the original is untouched,
    since ``torch.func`` transforms fail on an extended module)."""
    from backpack import extend

    return extend(copy.deepcopy(model)), extend(nn.CrossEntropyLoss())


def backpack_batchgrad_gram(model: nn.Module, loss: nn.Module, x: Tensor, y: Tensor) -> np.ndarray:
    """BackPACK ``BatchGrad`` (all n x P per-sample gradients) + dense n x n Gram + eigvalsh.

    ``grad_batch`` carries the 1/n of the mean reduction; the Gram matrix is accumulated one
    parameter at a time (no concatenated n x P copy).
    """
    from backpack import backpack
    from backpack.extensions import BatchGrad

    n = x.shape[0]
    model.zero_grad(set_to_none=True)
    with backpack(BatchGrad()):
        loss(model(x), y).backward()
    gram = torch.zeros(n, n, dtype=next(model.parameters()).dtype, device=x.device)
    for p in model.parameters():
        gb = p.grad_batch.flatten(1)
        gram.addmm_(gb, gb.T)
        del p.grad_batch
    return gram_eigvalsh(gram * n)


def backpack_sqrtggn_gram(model: nn.Module, loss: nn.Module, x: Tensor, y: Tensor) -> np.ndarray:
    """BackPACK ``SqrtGGNExact`` (C x n x P factors) + dense nC x nC Gram + eigvalsh.

    An extension hook turns each layer's factors into its Gram contribution and frees them, so
    only one layer's C x n x P_layer factors live at a time (BackPACK's own memory advice).
    """
    from backpack import backpack
    from backpack.extensions import SqrtGGNExact

    grams: list[Tensor] = []

    def hook(module: nn.Module) -> None:
        for p in module.parameters(recurse=False):
            s = getattr(p, "sqrt_ggn_exact", None)
            if s is None:
                continue
            s = s.flatten(2).flatten(0, 1)  # [C * n, P_p], class-major
            g = s @ s.T
            if grams:
                grams[0] += g
            else:
                grams.append(g)
            del p.sqrt_ggn_exact

    model.zero_grad(set_to_none=True)
    with backpack(SqrtGGNExact(), extension_hook=hook):
        loss(model(x), y).backward()
    return gram_eigvalsh(grams[0])


def vmap_grad_gram(model: nn.Module, x: Tensor, y: Tensor) -> np.ndarray:
    """``torch.func.vmap(grad)`` per-sample gradients + dense n x n Gram + eigvalsh."""
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def sample_loss(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        out = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return nn.functional.cross_entropy(out, yi.unsqueeze(0))

    grads = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, x, y)
    n = x.shape[0]
    gram = torch.zeros(n, n, dtype=next(iter(params.values())).dtype, device=x.device)
    for g in grads.values():
        g = g.flatten(1)
        gram.addmm_(g, g.T)
    return gram_eigvalsh(gram / n)


def vivit_ggn_eigvals(model: nn.Module, loss: nn.Module, x: Tensor, y: Tensor,
                      mc_samples: int) -> np.ndarray:
    """ViViT's GGN eigenvalues of all parameters as one block (``mc_samples=0``: exact GGN).

    ViViT solves its Gram matrix in the model dtype (float32) via the shimmed ``symeig``.
    """
    from backpack import backpack
    from vivit.linalg.eigvalsh import EigvalshComputation

    install_symeig_shim()
    computation = EigvalshComputation(mc_samples=mc_samples)
    group = {"params": [p for p in model.parameters() if p.requires_grad]}
    model.zero_grad(set_to_none=True)
    with backpack(computation.get_extension(),
                  extension_hook=computation.get_extension_hook([group])):
        loss(model(x), y).backward()
    return sort_desc(computation.get_result(group))


def curvlinops_hessian(model: nn.Module, x: Tensor, y: Tensor) -> Callable:
    """curvlinops ``HessianLinearOperator`` of the mean loss on the batch ``(x, y)``."""
    from curvlinops import HessianLinearOperator

    params = [p for p in model.parameters() if p.requires_grad]
    return HessianLinearOperator(model, nn.CrossEntropyLoss(), params, [(x, y)],
                                 check_deterministic=False)


def curvlinops_dense_eigvalsh(model: nn.Module, x: Tensor, y: Tensor) -> np.ndarray:
    """curvlinops dense Hessian ``H @ I`` (all P columns in one call) + float64 eigvalsh."""
    op = curvlinops_hessian(model, x, y)
    dense = op @ torch.eye(op.shape[1], dtype=x.dtype, device=x.device)
    dense = (dense + dense.T) / 2
    return sort_desc(torch.linalg.eigvalsh(dense.double()))


def curvlinops_eigsh(model: nn.Module, x: Tensor, y: Tensor, k: int,
                     seed: int = 0) -> tuple[np.ndarray, int]:
    """Top-``k`` |eigenvalues| by SciPy ``eigsh`` (implicitly restarted Lanczos) on the
    curvlinops Hessian through its SciPy bridge; also returns the matrix-vector products spent."""
    from scipy.sparse.linalg import LinearOperator, eigsh

    op = curvlinops_hessian(model, x, y).to_scipy()
    count = [0]

    def matvec(v: np.ndarray) -> np.ndarray:
        count[0] += 1 if v.ndim == 1 else v.shape[1]
        return op.matvec(v)

    counted = LinearOperator(op.shape, matvec=matvec, dtype=np.float32)
    v0 = np.random.default_rng(seed).standard_normal(op.shape[0]).astype(np.float32)
    evals = eigsh(counted, k=k, which="LM", v0=v0, return_eigenvectors=False)
    return sort_desc(evals), count[0]


def curvlinops_operator(kind: str, model: nn.Module, x: Tensor, y: Tensor) -> Callable:
    """curvlinops' empirical-Fisher (``kind="ef"``) or GGN (``"ggn"``) operator of the mean
    cross-entropy on the batch ``(x, y)``; ``op @ v`` is one matrix-vector product."""
    from curvlinops import EFLinearOperator, GGNLinearOperator

    cls = {"ef": EFLinearOperator, "ggn": GGNLinearOperator}[kind]
    params = [p for p in model.parameters() if p.requires_grad]
    return cls(model, nn.CrossEntropyLoss(), params, [(x, y)], check_deterministic=False)


class PyHessianHVP:
    """pyhessian on a deep copy of the model (pyhessian switches it to eval mode and leaves a
    graph-carrying ``.grad`` behind). ``setup`` runs pyhessian's ``create_graph`` backward."""

    def __init__(self, model: nn.Module, x: Tensor, y: Tensor) -> None:
        self.model, self.x, self.y = copy.deepcopy(model), x, y
        self.hess = None

    def setup(self) -> None:
        """Construct ``pyhessian.hessian``: forward and a ``create_graph=True`` backward."""
        from pyhessian import hessian

        self.model.zero_grad(set_to_none=True)
        self.hess = hessian(self.model, nn.CrossEntropyLoss(), data=(self.x, self.y), cuda=False)

    def hvp(self, v: list[Tensor]) -> list[Tensor]:
        """One Hessian-vector product (double backward through the stored gradient graph)."""
        from pyhessian.utils import hessian_vector_product

        return list(hessian_vector_product(self.hess.gradsH, self.hess.params, v))

    def random_vector(self) -> list[Tensor]:
        """A random vector in parameter format."""
        return [torch.randn_like(p) for p in self.hess.params]

    def top_eigenvalue(self, max_iter: int = 100, tol: float = 1e-3) -> float:
        """pyhessian's power iteration for the top eigenvalue (its defaults)."""
        evals, _ = self.hess.eigenvalues(maxIter=max_iter, tol=tol, top_n=1)
        return float(evals[0])
