"""PyHessian's top eigenvalue and Hutchinson trace, as a check independent of hessrank."""

from __future__ import annotations

import copy
import time
import warnings
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel


def _rel_diff(value: float | None, reference: float | None) -> float | None:
    if value is None or reference is None or reference == 0:
        return None
    return (value - reference) / abs(reference)


def pyhessian_check(
    model: nn.Module,
    loss_fn: nn.Module,
    batch: tuple[Tensor, Tensor],
    *,
    seed: int,
    exact: dict[str, Any] | None,
    max_iter: int = 100,
    tol: float = 1e-3,
) -> dict[str, Any]:
    """Run ``pyhessian.hessian(...).eigenvalues(top_n=1)`` and ``.trace()`` on a deep copy of
    ``model`` (pyhessian switches it to eval mode and fills ``.grad``) under a forked, seeded RNG.

    PyHessian differentiates ``loss_fn`` as given, like hessrank, so for a mean-reduced loss both
    see the Hessian of the mean. Any failure (pyhessian predates current torch) is returned as
    ``error`` instead of raised. ``exact`` is hessrank's exact record to compare against.
    """
    out: dict[str, Any] = {
        "top_eigenvalue": None,
        "trace": None,
        "trace_samples": None,
        "trace_stderr": None,
        "trace_stopped_by_sign": None,
        "seconds": None,
        "error": None,
        "exact_top_eigenvalue": exact["top_eigenvalue"] if exact else None,
        "exact_trace": exact["trace"] if exact else None,
        "top_rel_diff": None,
        "trace_rel_diff": None,
    }
    start = time.perf_counter()
    inputs, targets = batch
    default_dtype = torch.get_default_dtype()
    try:
        from pyhessian import hessian

        twin = copy.deepcopy(model)
        dtype = next(twin.parameters()).dtype
        with (
            torch.random.fork_rng(devices=[inputs.device] if inputs.is_cuda else []),
            warnings.catch_warnings(),
            # Attention through the math kernel, as hessrank's own Hessian: the fused kernels'
            # backward passes (CPU flash attention's) have no second derivative.
            sdpa_kernel(SDPBackend.MATH),
        ):
            # pyhessian calls backward(create_graph=True), which torch warns about.
            warnings.simplefilter("ignore", UserWarning)
            torch.manual_seed(seed)
            # pyhessian draws its random vectors in the default dtype.
            torch.set_default_dtype(dtype)
            checker = hessian(twin, loss_fn, data=(inputs, targets), cuda=inputs.is_cuda)
            eigenvalues, _ = checker.eigenvalues(maxIter=max_iter, tol=tol, top_n=1)
            samples = checker.trace(maxIter=max_iter, tol=tol)
        out["top_eigenvalue"] = float(eigenvalues[0])
        out["trace"] = float(np.mean(samples))
        out["trace_samples"] = len(samples)
        # pyhessian stops when |mean - previous mean| / (previous mean + 1e-6) < tol: any
        # negative previous mean passes that test, whatever the estimate's spread.
        out["trace_stopped_by_sign"] = bool(
            1 < len(samples) < max_iter and np.mean(samples[:-1]) + 1e-6 < 0
        )
        if len(samples) > 1:
            out["trace_stderr"] = float(np.std(samples, ddof=1) / np.sqrt(len(samples)))
    except Exception as err:
        out["error"] = " ".join(f"{type(err).__name__}: {err}".split())
    finally:
        torch.set_default_dtype(default_dtype)
    out["seconds"] = time.perf_counter() - start
    out["top_rel_diff"] = _rel_diff(out["top_eigenvalue"], out["exact_top_eigenvalue"])
    out["trace_rel_diff"] = _rel_diff(out["trace"], out["exact_trace"])
    return out
