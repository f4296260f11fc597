"""Rows of a large 2-D array read chunk by chunk, and their exact float64 column sums.

:class:`RowChunks` stands for ``source[rows]`` (optionally ``|·|``) of a memory-mapped Δloss
matrix without building it; :class:`ColumnSum` adds chunks so that the column sums and means
equal those of one NumPy call over all rows, bit for bit. Used by the regime bootstrap
(:func:`raretoken.stats.regime_bootstrap.bootstrap_regimes`) and by identification.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from raretoken.errors import ConfigError

__all__ = [
    "ColumnSum",
    "RowChunks",
]


@dataclass(frozen=True, eq=False)
class RowChunks:
    """The rows ``source[rows]`` (``|·|`` with ``absolute``) of a large 2-D array, read in chunks.

    Stands for the ``(n_rows, n_cols)`` matrix ``source[rows]`` without building it: each
    chunk of ``chunk_rows`` rows is read (from a memory map, say) into a fresh in-memory array
    of :attr:`dtype` when iterated. :func:`bootstrap_regimes` accepts it in place of the matrix.

    Attributes
    ----------
    source:
        ``(n, n_cols)`` array, e.g. a read-only :class:`numpy.memmap`.
    rows:
        Row indices into ``source`` (``None``: all rows in order).
    absolute:
        Yield absolute values.
    chunk_rows:
        Rows per chunk.
    """

    source: np.ndarray
    rows: np.ndarray | None = None
    absolute: bool = False
    chunk_rows: int = 4096

    def __post_init__(self) -> None:
        if self.source.ndim != 2:
            raise ConfigError(f"the source must be 2-D (rows, columns), got {self.source.shape}")
        if self.chunk_rows < 1:
            raise ConfigError(f"chunk_rows must be >= 1, got {self.chunk_rows}")
        if self.rows is not None:
            rows = np.asarray(self.rows)
            if rows.ndim != 1 or not (rows.size == 0 or np.issubdtype(rows.dtype, np.integer)):
                raise ConfigError("rows must be a 1-D array of row indices")
            rows = rows.astype(np.int64)
            if rows.size and (rows.min() < 0 or rows.max() >= self.source.shape[0]):
                raise ConfigError(f"row indices must lie in [0, {self.source.shape[0]})")
            object.__setattr__(self, "rows", rows)

    @property
    def shape(self) -> tuple[int, int]:
        n = self.source.shape[0] if self.rows is None else self.rows.size
        return int(n), int(self.source.shape[1])

    @property
    def dtype(self) -> np.dtype[Any]:
        """The floating dtype of the chunks (the source's, float64 for a non-float source)."""
        dt = np.dtype(self.source.dtype)
        return dt if np.issubdtype(dt, np.floating) else np.dtype(np.float64)

    def __iter__(self) -> Iterator[tuple[slice, np.ndarray]]:
        """``(slice of the rows, (rows, n_cols) array)`` per chunk, in row order."""
        n = self.shape[0]
        for start in range(0, n, self.chunk_rows):
            sl = slice(start, min(n, start + self.chunk_rows))
            part = self.source[sl] if self.rows is None else self.source[self.rows[sl]]
            block = np.array(part, dtype=self.dtype)  # always a copy: safe to change in place
            if self.absolute:
                np.abs(block, out=block)
            yield sl, block


class ColumnSum:
    """Float64 column sums (and means) of rows added chunk by chunk.

    NumPy sums a C-ordered matrix over axis 0 row after row, so adding the running total to
    the first row of each chunk and summing the chunk continues that same sequence: the
    result equals ``x.sum(axis=0, dtype=np.float64)`` (and :meth:`mean` equals
    ``x.mean(axis=0, dtype=np.float64)``) over all rows at once, bit for bit.
    """

    def __init__(self, n_cols: int) -> None:
        self.n_cols = int(n_cols)
        self.n_rows = 0
        self._total: np.ndarray | None = None

    def add(self, block: np.ndarray, *, owned: bool = False) -> None:
        """Add the rows of ``block``; with ``owned`` a C-ordered float64 ``block`` is reused
        as scratch space (its first row changes)."""
        if block.shape[0] == 0:
            return
        if owned and block.dtype == np.float64 and block.flags.c_contiguous:
            b = block
        else:
            b = np.array(block, dtype=np.float64, order="C")
        if self._total is not None:
            b[0] += self._total
        self._total = b.sum(axis=0)
        self.n_rows += int(b.shape[0])

    @property
    def total(self) -> np.ndarray:
        return np.zeros(self.n_cols) if self._total is None else self._total

    def mean(self) -> np.ndarray:
        """Column means (NaN without rows, like the mean of an empty slice)."""
        if self._total is None:
            return np.full(self.n_cols, np.nan)
        return self._total / self.n_rows
