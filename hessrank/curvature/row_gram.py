"""The Gram matrix ``X X^T`` of a matrix's rows, computed a triangle of blocks at a time.

``X X^T`` is symmetric, so half of a plain GEMM's multiply-adds are spent twice. Splitting the
rows in two, the product is three block products (``X_1 X_1^T``, ``X_2 X_2^T`` and ``X_2
X_1^T``, whose transpose is copied into the upper block), recursively: the multiply-adds
approach ``m^2 k / 2`` for ``m`` rows of ``k`` columns. Smaller GEMMs run at a lower rate, so a
block is split only where that pays (:func:`_splits`).

Every entry is a dot product of two rows. A BLAS may sum a whole row in one accumulator for a
product of few rows (MKL's kernel for products under 16 x 16 on an AVX-512 machine, one
vector's too), and a float32 accumulator that has taken a large entry drops the small ones after
it: a sample's gradient over 8,000 classes lost the 7,999 small classes' share beside its
target's, 7e-5 of a 12-sample Gram's largest entry (``tests/test_rules.py``). A Gram of fewer
than :data:`FEW_ROWS` rows is summed :data:`SUMMED_COLUMNS` columns at a time into the Gram, off
by 1e-7 to 1e-6 then; products of more rows are left to the BLAS's blocked sums (MKL's: 3e-6 of
the largest entry at 16 to 300 rows of 147,456 to 256,000 columns, where summing 4,096 columns
at a time cost 3-10 % of their time and gained nothing).
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Columns below which a split never pays (the GEMM is bound by its overheads, not its
#: multiply-adds: ``512 x 256`` rows took 1.05-1.22x the plain product split).
MIN_SPLIT_COLUMNS = 512
#: The fewest rows of a split's halves, by the rows' columns (at least this many columns: halves
#: of at least this many rows). ``OMP_NUM_THREADS=2 python benchmarks/row_gram.py`` (40
#: rounds) against the plain product: ``512 x 784`` and ``512 x 512`` 0.84-0.91x split into
#: halves of 256 or 128 rows alike, ``256 x 784`` 1.02-1.07x into halves of 128 (so left
#: whole), ``512 x 4000`` 0.72-0.75x down to 128 rows against 0.81x to 256. The Grams of 128
#: rows stay whole: split down to 32 rows, ``128 x 16362`` took 0.84-0.93x alone, but the
#: LSTM's and GPT's ``fisher`` calls, which form such blocks, measured 3.61 against 3.59 and
#: 2.94 against 2.92 forward+backwards with and without (``benchmarks/README.md``, run L).
SMALLEST_HALVES = ((2048, 128), (MIN_SPLIT_COLUMNS, 256))
#: Columns a GEMM of a Gram of few rows sums before its sums are added to the Gram's (see the
#: module docstring): 4096 float32 entries beside a large one lose at most about
#: ``4096 eps / 2`` (2.4e-4) of it where a BLAS sums them one after the other, and the
#: 8,000-class gradients' Gram came out 9e-7 off (5e-7 and 7e-7 at 2048 and 1024 columns).
SUMMED_COLUMNS = 4096
#: Grams of fewer rows are summed :data:`SUMMED_COLUMNS` columns at a time: four times the
#: size under which MKL sums whole rows, for BLAS libraries whose small kernels reach further.
FEW_ROWS = 64


def _splits(rows: int, columns: int) -> bool:
    """Whether a block of ``rows`` rows and ``columns`` columns is split in two."""
    return any(columns >= wide and rows // 2 >= half for wide, half in SMALLEST_HALVES)


def add_row_gram(gram: Tensor, rows: Tensor) -> Tensor:
    """Add ``rows @ rows.T`` to ``gram`` in place.

    Args:
        gram: ``[m, m]``, symmetric (its upper triangle is overwritten from its lower one
            wherever a block is split).
        rows: ``[m, k]``, of ``gram``'s dtype and device.

    Returns:
        ``gram``.
    """
    count, columns = rows.shape
    if not _splits(count, columns):
        return _add_product(gram, rows, rows)
    middle = count // 2
    add_row_gram(gram[:middle, :middle], rows[:middle])
    add_row_gram(gram[middle:, middle:], rows[middle:])
    lower = _add_product(gram[middle:, :middle], rows[middle:], rows[:middle])
    gram[:middle, middle:] = lower.T
    return gram


def _in_blocks(rows: int, columns: int) -> bool:
    """Whether a product of ``rows`` rows (the fewer of its two sides) and ``columns`` columns
    is summed :data:`SUMMED_COLUMNS` columns at a time (see the module docstring)."""
    return rows < FEW_ROWS and columns > SUMMED_COLUMNS


def _add_product(out: Tensor, left: Tensor, right: Tensor) -> Tensor:
    """Add ``left @ right.T`` (``[a, k]``, ``[b, k]``) to ``out`` (``[a, b]``) in place, in
    blocks of columns where :func:`_in_blocks`."""
    if not _in_blocks(min(left.shape[0], right.shape[0]), left.shape[1]):
        return out.addmm_(left, right.T)
    for start in range(0, left.shape[1], SUMMED_COLUMNS):
        stop = start + SUMMED_COLUMNS
        out.addmm_(left[:, start:stop], right[:, start:stop].T)
    return out


def row_gram(rows: Tensor) -> Tensor:
    """``rows @ rows.T`` (``[m, k]`` -> ``[m, m]``), a triangle of blocks at a time."""
    count, columns = rows.shape
    if not _splits(count, columns) and not _in_blocks(count, columns):
        return rows @ rows.T
    return add_row_gram(rows.new_zeros(count, count), rows)


def row_norms(rows: Tensor) -> Tensor:
    """``[m]``: the norms of ``rows``' rows (``[m, k]``), in float64, each summed
    :data:`SUMMED_COLUMNS` columns at a time: a float32 norm over a whole row drops small squares
    beside a large one as a Gram of few rows does (MKL on an AVX-512 machine: a per-token
    cross-entropy's sample gradients over 8,000 classes and 32 tokens had their norms 1e-5 to
    9e-4 low, and the empirical Fisher's per-sample weights, read against them, as much high;
    probe 245). No copy of ``rows`` is made: blocks of :data:`SUMMED_COLUMNS` columns at most."""
    squares = torch.zeros(rows.shape[0], dtype=torch.float64, device=rows.device)
    for block in rows.split(SUMMED_COLUMNS, dim=1):
        squares += torch.linalg.vector_norm(block, dim=1).double().square()
    return squares.sqrt()
