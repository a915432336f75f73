"""The result object every estimator returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


# eq=False: the generated __eq__ compared the eigenvalue arrays, whose truth value is ambiguous
# (``a == b``, ``a in [b]`` raised; probe 90): results compare, and hash, by identity.
@dataclass(frozen=True, repr=False, eq=False)
class RankResult:
    """Spectrum and ranks of one curvature matrix.

    Eigenvalues are those of the curvature of the loss exactly as ``loss_fn`` returns it: for a
    mean-reduced loss, the Hessian of the mean, the GGN ``(1/n) sum_i J_i^T H_i J_i`` and the
    empirical Fisher ``(1/n) sum_i g_i g_i^T`` (``g_i`` the gradient of sample ``i``'s loss); for
    a sum-reduced loss the same without ``1/n``. Ranks do not depend on this scale.

    Attributes:
        rank: srank at ``threshold`` (for ``lanczos``, the SLQ estimate rounded to an integer).
        eigenvalues: float64, sorted by decreasing magnitude, signed. ``fisher``/``ggn``: the
            spectrum through the Gram matrix (length ``min(n, P)`` / ``min(n C', P)``, zeros
            of the factors included); ``exact``: all ``P``; the Lanczos methods: the converged
            Ritz values of the first probe (a value found several times once), or, where none
            converged or the largest has not, its quadrature's nodes, with a note saying so;
            not every eigenvalue: those its Krylov space did not resolve are absent, so
            ``eigenvalues[k]`` can lie below the ``k``-th largest, and ranks computed from them
            are not the result's (those come from the quadrature, :attr:`density`).
        ranks: the same spectrum under every definition of :mod:`hessrank.ranks`.
        method, backend: estimator and the machinery that computed it.
        num_params: ``P``, parameters analysed. num_samples: ``n``.
        seconds: wall time of the call (a block in ``layers``: its own run's, where the
            method runs each block on its own, ``exact`` and the Lanczos methods; 0.0 where
            the blocks come from the whole model's run, ``fisher`` and ``ggn``).
        peak_memory: bytes above the call's starting point, with ``measure_memory=True``
            (None otherwise, or where it cannot be measured).
        threshold, rtol: the srank threshold and numerical-rank tolerance used.
        trace: sum of the eigenvalues (``lanczos``: SLQ estimate).
        max_rank: structural upper bound on the rank (``n``, ``n C'``, or ``P``; the factor
            Lanczos methods count the factor columns that are not zero, so samples the loss
            ignores do not count).
        rank_interval: the Lanczos methods (``lanczos``, ``ggn_lanczos``, ``fisher_lanczos``)
            only: 95 % interval for the rank (probe spread plus quadrature resolution).
        trace_interval, numerical_interval: the Lanczos methods only: 95 % intervals for
            ``trace`` and for the numerical rank at ``rtol`` (the same construction; the
            numerical rank's in whole numbers, rounded outward as its note states).
        num_hvps: matrix-vector products spent (``exact``, ``lanczos``: Hessian-vector
            products; ``ggn_lanczos``, ``fisher_lanczos``: products with the GGN or the EF),
            those that checked them included.
        excluded: names of frozen parameters left out, among those asked for (``params``;
            every parameter by default).
        layers: per parameterised module (``per_layer=True``): that module's diagonal block, in
            ``model.named_modules()`` order for every method (a parametrized module's block
            holds its parametrization's originals: ``weight_norm``'s magnitude and direction).
        paths: ``fisher``/``ggn``: parameter name -> the path that computed its part of the Gram
            matrix (a verified per-module rule such as ``linear`` or ``conv``, ``torch.func``,
            ``per-sample loop`` or ``backpack``).
        eigenvectors: with ``eigenvectors=k``: ``[k, P]`` float64 unit eigenvectors of the ``k``
            largest ``|eigenvalues|`` (rows match ``eigenvalues[:k]``), in the flattened order of
            ``parameters``; :meth:`unflatten` maps one back to the parameters' shapes. For
            ``fisher``/``ggn`` a zero eigenvalue's row is zero, and there are at most as many
            rows as the Gram matrix has eigenvalues (a note says so). In :attr:`layers`, each
            block's own eigenvectors with ``exact`` (its dense block is solved); None with
            ``fisher``/``ggn``, whose blocks are solved from their Gram matrices alone.
        parameters: the analysed parameters' names and shapes, in the flattening order.
        notes: caveats worth reading.
        density: the Lanczos methods only: ``(nodes, weights)`` of the SLQ quadrature, weights
            summing to ``num_params``.
    """

    rank: int
    eigenvalues: np.ndarray
    ranks: dict[str, float]
    method: str
    backend: str
    num_params: int
    num_samples: int
    seconds: float
    threshold: float
    rtol: float
    trace: float
    max_rank: int
    peak_memory: int | None = None
    rank_interval: tuple[float, float] | None = None
    trace_interval: tuple[float, float] | None = None
    numerical_interval: tuple[float, float] | None = None
    num_hvps: int | None = None
    excluded: tuple[str, ...] = ()
    layers: dict[str, RankResult] = field(default_factory=dict)
    paths: dict[str, str] = field(default_factory=dict)
    eigenvectors: np.ndarray | None = None
    parameters: tuple[tuple[str, tuple[int, ...]], ...] = ()
    notes: tuple[str, ...] = ()
    density: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def top_eigenvalue(self) -> float:
        """The eigenvalue of largest magnitude, with its sign (0.0 for an empty spectrum)."""
        return float(self.eigenvalues[0]) if self.eigenvalues.size else 0.0

    def unflatten(self, vector: np.ndarray) -> dict[str, np.ndarray]:
        """A flat ``[P]`` vector (e.g. ``eigenvectors[0]``) as ``{parameter name: array}``.

        Args:
            vector: ``P`` entries in the order of :attr:`parameters`.

        Returns:
            Each parameter's piece, in its shape.

        Raises:
            ValueError: ``vector`` does not have ``P`` entries.
        """
        vector = np.asarray(vector).ravel()
        sizes = [int(np.prod(shape)) for _, shape in self.parameters]
        if vector.size != sum(sizes):
            raise ValueError(f"vector has {vector.size} entries, the parameters {sum(sizes)}")
        pieces = np.split(vector, np.cumsum(sizes)[:-1])
        return {name: piece.reshape(shape)
                for (name, shape), piece in zip(self.parameters, pieces)}

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable view of every field."""
        out: dict[str, Any] = {
            "rank": self.rank,
            "ranks": dict(self.ranks),
            "method": self.method,
            "backend": self.backend,
            "num_params": self.num_params,
            "num_samples": self.num_samples,
            "seconds": self.seconds,
            "peak_memory": self.peak_memory,
            "threshold": self.threshold,
            "rtol": self.rtol,
            "trace": self.trace,
            "top_eigenvalue": self.top_eigenvalue,
            "max_rank": self.max_rank,
            "rank_interval": list(self.rank_interval) if self.rank_interval else None,
            "trace_interval": list(self.trace_interval) if self.trace_interval else None,
            "numerical_interval": (list(self.numerical_interval) if self.numerical_interval
                                   else None),
            "num_hvps": self.num_hvps,
            "excluded": list(self.excluded),
            "notes": list(self.notes),
            "eigenvalues": self.eigenvalues.tolist(),
            "layers": {name: layer.to_dict() for name, layer in self.layers.items()},
            "paths": dict(self.paths),
            "parameters": [[name, list(shape)] for name, shape in self.parameters],
        }
        if self.eigenvectors is not None:
            out["eigenvectors"] = self.eigenvectors.tolist()
        if self.density is not None:
            out["density"] = {
                "nodes": self.density[0].tolist(),
                "weights": self.density[1].tolist(),
            }
        return out

    def __repr__(self) -> str:
        return str(self)

    def __str__(self) -> str:
        interval = ""
        if self.rank_interval is not None:
            interval = f" in [{self.rank_interval[0]:.0f}, {self.rank_interval[1]:.0f}]"
        return (
            f"RankResult(method={self.method!r}, backend={self.backend!r}, "
            f"srank@{self.threshold}={self.rank}{interval}, "
            f"numerical={self.ranks['numerical']:.0f}, top={self.top_eigenvalue:.4g}, "
            f"P={self.num_params}, n={self.num_samples}, {self.seconds:.3f}s)"
        )
