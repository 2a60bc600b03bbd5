"""The slab strategy's products with sparse operands (strategy ``sparse``, CPU): SPLADE embeddings hold a few
hundred non-zero entries in ~30k vocabulary columns, where the dense GEMMs spend B·N·D multiply-adds on zeros.

The embeddings (normalised when cosine) are compressed once into :class:`SparseRows` (per row the non-zero
columns and values, C++: csrc/cpu/sparse.cpp); the slab then runs its usual loop (fastcache/ops/contrastive/slab.py)
with :data:`SPARSE_PRODUCTS` in place of the GEMMs:

    scores   out = x·yᵀ      Σ over the shared non-zero columns: nnz(x)·(nnz(y)/D) multiply-adds
    add      dx += G·y,  dy += Gᵀ·x   each output row written once in column order: rows·nnz multiply-adds

dL/ds, the epilogue, the gradients (dense, as the inputs) and every option are the slab's. The similarity blocks
come out in the compute dtype with the same sums in another order (as any BLAS). ``auto`` picks this strategy
on CPU when at most SPARSE_MAX_DENSITY of the entries of the queries and of the documents are non-zero
(:func:`sparse_enough`: one count over the inputs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from fastcache import _backend

# auto: the largest fraction of non-zero entries at which it picks the sparse products; they beat the dense slab
# up to ~6-8% (B = N = 256, D = 4096 and 30522, 1 thread: `python bench/sparse_crossover.py --threads 1`)
SPARSE_MAX_DENSITY = 0.03


@dataclass
class SparseRows:
    """Rows ``row0 .. row0 + rows - 1`` of a [*, width] matrix as compressed rows: row r holds entries
    ``starts[r] .. starts[r+1]-1`` of ``columns`` (int32) and ``values`` (fp32 / fp64). Slicing rows shares the
    arrays; the transpose (vocabulary-major, what the products read for a column operand) is built once."""

    starts: Tensor
    columns: Tensor
    values: Tensor
    width: int
    row0: int = 0
    rows: int = -1
    _transposed: tuple[Tensor, Tensor, Tensor] | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.rows < 0:
            self.rows = self.starts.numel() - 1 - self.row0

    @classmethod
    def of(cls, x: Tensor, dtype: torch.dtype) -> SparseRows:
        """The non-zero entries of the dense [n, width] CPU matrix ``x`` (NaN kept), values in ``dtype``."""
        return cls(*_backend.EXTENSION.sparse_rows_cpu(x, dtype), width=x.size(1))

    def __getitem__(self, rows: slice) -> SparseRows:
        start, stop, step = rows.indices(self.rows)
        assert step == 1, "row slices only"
        return SparseRows(self.starts, self.columns, self.values, self.width, self.row0 + start, max(stop - start, 0))

    def size(self, dim: int) -> int:
        return (self.rows, self.width)[dim]

    def transposed(self) -> tuple[Tensor, Tensor, Tensor]:
        """Compressed rows of the [width, rows] transpose."""
        if self._transposed is None:
            self._transposed = _backend.EXTENSION.sparse_transpose_cpu(
                self.starts, self.columns, self.values, self.row0, self.row0 + self.rows, self.width)
        return self._transposed


class SparseProducts:
    """The slab's products (the interface of slab.DENSE_PRODUCTS) on :class:`SparseRows` operands."""

    @staticmethod
    def operand(x: Tensor) -> SparseRows:
        return SparseRows.of(x, x.dtype)

    @staticmethod
    def scores(out: Tensor, x: SparseRows, y: SparseRows) -> None:
        """out = x·yᵀ."""
        _backend.EXTENSION.sparse_scores_cpu(out, x.starts, x.columns, x.values, x.row0, *y.transposed())

    @staticmethod
    def add(dx: Tensor, dy: Tensor, g: Tensor, x: SparseRows, y: SparseRows) -> None:
        """dx += g·y, dy += gᵀ·x."""
        _backend.EXTENSION.sparse_add_products_cpu(dx, g, *y.transposed())
        _backend.EXTENSION.sparse_add_products_cpu(dy, g.T, *x.transposed())


SPARSE_PRODUCTS = SparseProducts()


DENSITY_SAMPLE_ROWS = 64  # auto counts the non-zero entries of this many rows of each input, evenly spaced


def sparse_enough(*embeddings: Tensor) -> bool:
    """Whether at most SPARSE_MAX_DENSITY of the entries of each [..., D] tensor are non-zero, counted on
    DENSITY_SAMPLE_ROWS rows spread over it (auto's choice of ``sparse``; the choice moves speed, never results)."""
    for x in embeddings:
        rows = x.reshape(-1, x.size(-1))
        sample = rows[::max(1, rows.size(0) // DENSITY_SAMPLE_ROWS)]
        if not sample.numel() or torch.count_nonzero(sample).item() > SPARSE_MAX_DENSITY * sample.numel():
            return False
    return True
