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


#: Entries of a parameter :func:`interchangeable_slices` hashes at a time.
HASH_BLOCK = 2**20


def _row_hashes(rows: Tensor) -> Tensor:
    """``[R]`` exact hashes of the rows of ``rows`` (``[R, C]``): their bits as integers, mixed
    by fixed odd multipliers and summed with wraparound (integer sums are exact in any order:
    equal rows hash equal, wherever they lie; a float projection had not), in blocks of about
    :data:`HASH_BLOCK` entries."""
    width = rows.shape[1]
    bits = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[rows.element_size()]
    multipliers = torch.randint(1, 2**62, (width,), generator=torch.Generator().manual_seed(
        0x5107), dtype=torch.int64).to(rows.device) | 1
    step = max(1, HASH_BLOCK // max(width, 1))
    return torch.cat([(rows[start:start + step].contiguous().view(bits).to(torch.int64)
                       * multipliers).sum(1) for start in range(0, rows.shape[0], step)])


def interchangeable_slices(params: Sequence[Tensor]) -> list[str]:
    """Where the parameters hold equal values that a symmetry may interchange: two parameters
    of one shape equal (a diagonal linear network's ``u = v``), or two nonzero slices of at
    least two entries along the first dimension of one (duplicated units), as ``"i and j"`` or
    ``"i[r] and i[s]"``; empty where none. The Hessian of such parameters has eigenvectors
    spread equally over the two, which a ``+-1`` start vector is orthogonal to half the time
    (a diagonal linear network's top eigenvalue had been reported as -6.70 for +7.06 in 18 of
    40 seeds; probe 213). Exact hashes of the slices (:func:`_row_hashes`, one pass, vectorised:
    a loop over rows had taken 57 s at 10^7; probe 217), then the candidates compared."""
    found: list[str] = []
    wholes: dict[tuple[object, ...], list[int]] = {}
    for index, param in enumerate(params):
        value = param.detach()
        if not bool(value.any()):
            continue
        key = (tuple(value.shape), value.dtype, int(_row_hashes(value.reshape(1, -1))[0]))
        for earlier in wholes.setdefault(key, []):
            if torch.equal(params[earlier].detach(), value):
                found.append(f"{earlier} and {index}")
        wholes[key].append(index)
        if value.dim() < 2 or value[0].numel() < 2:
            continue
        rows = value.reshape(value.shape[0], -1)
        hashes = _row_hashes(rows).masked_fill(~rows.any(1), 0)  # (zero rows left out)
        unique, inverse, counts = torch.unique(hashes, return_inverse=True,
                                               return_counts=True)
        for group in torch.nonzero((counts > 1) & (unique != 0)).flatten().tolist():
            members = torch.nonzero(inverse == group).flatten().tolist()
            first = members[0]
            found.extend(f"{index}[{first}] and {index}[{other}]" for other in members[1:]
                         if torch.equal(rows[first], rows[other]))
            if len(found) > 8:  # (enough to say so)
                return found
    return found


#: What a Hessian-vector product's double backward through a softmax holds beyond the graphs
#: allowed otherwise, in multiples of what its nodes saved
#: (:attr:`ParameterOperator.softmax_bytes`): attention's held up to 5.8 times it over 32-512
#: tokens, where calls had run at up to 1.5 times the prediction (probe 239), a token model's
#: log-softmax over 500 and 2,000 classes 0.9-3.0 times (three runs of ``python
#: benchmarks/working_memory.py --softmax``).
SOFTMAX_TEMPORARIES = 7.0


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
        softmax_bytes: about what the graph's softmax nodes saved, where a product
            differentiates them twice (:func:`~hessrank.curvature.hessian.softmax_saved_bytes`;
            else 0: a factor operator's products through attention peaked at 0.35 times a
            prediction that counted them).
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
        self.softmax_bytes = 0
        self.rank_bound = self.dim
        self.unused: frozenset[int] = frozenset()

    def held_by_products(self) -> int:
        """What the graph and one product's backward passes through it hold (bytes): the graph,
        :attr:`product_graphs` times it, and :data:`SOFTMAX_TEMPORARIES` times what its softmax
        nodes saved."""
        return int((1 + self.product_graphs) * self.graph_bytes
                   + SOFTMAX_TEMPORARIES * self.softmax_bytes)

    def _total(self, local: int) -> int:
        """The sum of the processes' ``local`` values (``local`` itself without a group)."""
        return local if self.parallel is None else sum(self.parallel.gather_objects(local))

    def _largest(self, local: int) -> int:
        """The largest of the processes' ``local`` values (``local`` itself without a group):
        what sizes their collective work must agree on (one exchange)."""
        return local if self.parallel is None else max(self.parallel.gather_objects(local))
