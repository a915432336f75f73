"""What every matrix-free curvature operator over the analysed parameters shares."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from hessrank.distributed import parallel_of
from hessrank.problem import CurvatureProblem


def stacked_rows(rows: Sequence[Tensor]) -> Tensor:
    """``[k, P]`` from ``k`` flat products, without copying a single one (``[1, P]``, a view).

    A Lanczos run asks for one product at a time; at P = 10^7 a copy of it is 40 MB of fresh
    memory, which the allocator takes from the kernel page by page (10,000 page faults, about
    20 ms, every product: ``benchmarks/README.md``, "Fresh memory in every product").
    """
    return rows[0].unsqueeze(0) if len(rows) == 1 else torch.stack(list(rows))


def interchangeable_slices(params: Sequence[Tensor]) -> list[str]:
    """Where the parameters hold equal values that a symmetry may interchange: two parameters
    of one shape equal (a diagonal linear network's ``u = v``), or two nonzero slices along the
    first dimension of one (duplicated units), as ``"index"`` or ``"index[row]"`` pairs; empty
    where none. Compared by a fixed random projection of each slice (one pass), candidates
    then exactly. The Hessian of such parameters has eigenvectors spread equally over the two,
    which a ``+-1`` start vector is orthogonal to half the time (a diagonal linear network's
    top eigenvalue had been reported as -6.70 for +7.06 in 18 of 40 seeds; probe 213)."""
    keys: dict[tuple[object, ...], tuple[str, Tensor]] = {}
    found: list[str] = []
    generator = torch.Generator().manual_seed(0x5107)
    for index, param in enumerate(params):
        value = param.detach()
        pieces = [(str(index), value, float(value.sum()))]
        if value.dim() > 1:
            rows = value.reshape(value.shape[0], -1)
            projection = torch.randn(rows.shape[1], generator=generator, dtype=torch.float64)
            pieces += [(f"{index}[{row}]", rows[row], key) for row, key in
                       enumerate((rows @ projection.to(rows.device, rows.dtype)).tolist())]
        for name, piece, key in pieces:
            slot = (tuple(piece.shape), piece.dtype, key)
            earlier = keys.get(slot)
            if earlier is None:
                keys[slot] = (name, piece)
            elif bool(piece.any()) and torch.equal(earlier[1], piece):
                found.append(f"{earlier[0]} and {name}")
    return found


class ParameterOperator:
    """A symmetric ``P x P`` operator on the analysed parameters, flattened in their order.

    Attributes:
        params: the analysed parameters.
        sizes: their numbers of entries.
        dim: ``P``.
        dtype, device: the parameters' (products are computed in them).
        num_products: matrix-vector products spent so far.
        parallel: the data-parallel group of a sharded problem, else None.
        graph_bytes: bytes of the autograd graph the operator keeps for its products (the
            tensors it saves, :class:`~hessrank.problem.GraphBytes`); 0 where not measured.
        rank_bound: the largest rank the operator can have (``P``, or a factorisation's width).
        unused: the indices of the parameters no gradient of the loss reaches (on a data set:
            on any of its batches), whose rows and columns are zero; empty where every one is
            reached or it is not known.
    """

    #: What one product's backward passes hold while they run, in multiples of
    #: :attr:`graph_bytes` (beyond the graph itself), for a memory prediction.
    product_graphs: float = 1.0

    def __init__(self, problem: CurvatureProblem) -> None:
        self.params = problem.params
        self.sizes = [p.numel() for p in self.params]
        self.dim = sum(self.sizes)
        self.dtype = problem.dtype
        self.device = problem.device
        self.num_products = 0
        self.parallel = parallel_of(problem)
        self.graph_bytes = 0
        self.rank_bound = self.dim
        self.unused: frozenset[int] = frozenset()

    def _total(self, local: int) -> int:
        """The sum of the processes' ``local`` values (``local`` itself without a group)."""
        return local if self.parallel is None else sum(self.parallel.gather_objects(local))

    def _largest(self, local: int) -> int:
        """The largest of the processes' ``local`` values (``local`` itself without a group):
        what sizes their collective work must agree on (one exchange)."""
        return local if self.parallel is None else max(self.parallel.gather_objects(local))
