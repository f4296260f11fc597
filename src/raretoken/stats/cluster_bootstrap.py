"""Cluster bootstrap by window of per-neuron means and their ratio ``Δrare / Δcommon``.

Part of the rare-token specificity question (the other statistics are in
:mod:`raretoken.stats.specificity`): is a neuron's Δloss on rare targets large relative to its
Δloss on common targets, beyond the sampling noise of the scored windows?

Ratio with a cluster-bootstrap interval (:func:`ratio_interval`)
----------------------------------------------------------------
``Δrare(i) / Δcommon(i)`` (both the mean of ``|L - L̃(i)|`` over their rows) with a percentile
interval. Positions of one window share their context, so they are not independent: the
bootstrap resamples *windows* (clusters) with replacement and takes all their rows. Only
per-window sums and row counts enter a mean of rows, so the rows are read once (in chunks, a
memory map is fine) into ``(n_windows, n_neurons)`` sums; every resample's means are then
``(multiplicities @ sums) / (multiplicities @ counts)``, exactly the means of the resampled
rows. With ``paired=True`` (default) one draw of windows serves the rare and the common rows
(the windows were sampled once and yield both kinds of position, so the within-window
correlation of the two Δloss is kept); ``paired=False`` resamples the rare rows' windows and
the common rows' windows independently (right when they come from different windows;
otherwise conservative under a positive correlation).

Shared resampling helpers
-------------------------
:func:`cluster_labels` (checks window ids), :func:`cluster_sums_of_blocks` (per-window sums
read chunk by chunk), :func:`multiplicities` (the resampling draws) and
:func:`nanquantile_columns` are also used by the per-neuron mean interval
(:mod:`raretoken.stats.mean_bootstrap`) and the window bootstrap of the regime fit
(:mod:`raretoken.stats.regime_bootstrap`), so every window bootstrap draws the same way.
They are not part of the package's exports.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from raretoken.errors import ConfigError, InsufficientDataError, NumericalError
from raretoken.stats._common import frozen, nan_list, require_seed
from raretoken.stats.specificity import _fmt, _group, _top_k

logger = logging.getLogger(__name__)

__all__ = [
    "RatioInterval",
    "ratio_interval",
]

#: Largest number of bootstrap means held at once in :func:`ratio_interval` (per Δloss side).
_BOOT_BLOCK_ELEMENTS = 1 << 22


@dataclass(frozen=True, eq=False)
class RatioInterval:
    """``Δrare / Δcommon`` per neuron with a cluster-bootstrap percentile interval.

    Unpacks as ``ratio, lo, hi = result``.

    Attributes
    ----------
    ratio:
        ``mean(rare rows) / mean(common rows)`` per neuron (``inf``/NaN where the common mean
        is 0).
    lo, hi:
        Percentile interval at ``level`` over the resamples with a defined ratio (NaN if none;
        may be ``inf`` when resamples have a common mean of 0).
    level, n_boot, paired, seed:
        Settings (``seed`` is ``None`` when a Generator was passed).
    n_rare_rows, n_common_rows, n_rare_clusters, n_common_clusters:
        Sizes of the input.
    n_undefined:
        Resamples dropped because they hold no rare or no common row (paired mode only).
    """

    ratio: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    level: float
    n_boot: int
    paired: bool
    seed: int | None
    n_rare_rows: int
    n_common_rows: int
    n_rare_clusters: int
    n_common_clusters: int
    n_undefined: int

    def __iter__(self) -> Iterator[np.ndarray]:
        return iter((self.ratio, self.lo, self.hi))

    def to_dict(self) -> dict[str, Any]:
        return {
            "ratio": nan_list(self.ratio),
            "lo": nan_list(self.lo),
            "hi": nan_list(self.hi),
            "level": self.level,
            "n_boot": self.n_boot,
            "paired": self.paired,
            "seed": self.seed,
            "n_rare_rows": self.n_rare_rows,
            "n_common_rows": self.n_common_rows,
            "n_rare_clusters": self.n_rare_clusters,
            "n_common_clusters": self.n_common_clusters,
            "n_undefined": self.n_undefined,
        }

    def to_markdown(self, neuron_ids: np.ndarray | Sequence[int] | None = None) -> str:
        """A paragraph and a table of ``neuron_ids`` (default: the 10 largest ratios)."""
        n = self.ratio.size
        if neuron_ids is None:
            key = np.where(np.isfinite(self.ratio), self.ratio, -np.inf)
            ids = _top_k(key, min(10, n))
        else:
            ids = _group(neuron_ids, n, "neuron_ids")
        mode = "jointly (paired)" if self.paired else "independently for rare and common rows"
        head = (
            f"Δloss_rare / Δloss_common with {_fmt(100 * self.level, 3)} % percentile intervals "
            f"from {self.n_boot} window-cluster bootstrap resamples (windows resampled {mode}; "
            f"{self.n_rare_rows} rare rows in {self.n_rare_clusters} windows, "
            f"{self.n_common_rows} common rows in {self.n_common_clusters} windows).\n\n"
            "| neuron | ratio | lo | hi |\n|---:|---:|---:|---:|\n"
        )
        rows = [
            f"| {int(i)} | {_fmt(float(self.ratio[i]))} | {_fmt(float(self.lo[i]))} | "
            f"{_fmt(float(self.hi[i]))} |"
            for i in ids
        ]
        return head + "\n".join(rows) + "\n"


def _rows_matrix(rows: np.ndarray, name: str) -> np.ndarray:
    if not hasattr(rows, "ndim") or not hasattr(rows, "shape"):
        rows = np.asarray(rows)
    if rows.ndim != 2:
        raise ConfigError(f"{name} must be 2-D (rows, neurons), got shape {rows.shape}")
    if rows.shape[0] == 0:
        raise InsufficientDataError(f"{name} has no rows")
    return rows


def cluster_labels(clusters: np.ndarray | Sequence[int], n_rows: int, name: str) -> np.ndarray:
    c = np.asarray(clusters)
    if c.ndim != 1 or (c.size and not np.issubdtype(c.dtype, np.integer)):
        raise ConfigError(f"{name} must be a 1-D array of integer window ids")
    if c.size != n_rows:
        raise ConfigError(f"{name} has {c.size} entries for {n_rows} rows")
    return c.astype(np.int64)


def _cluster_sums(
    rows: np.ndarray, index: np.ndarray, n_clusters: int, chunk_rows: int, name: str
) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster float64 column sums ``(n_clusters, n_cols)`` and row counts, reading
    ``rows`` (array or memory map) ``chunk_rows`` at a time; values must be ``>= 0``."""
    n_rows = rows.shape[0]
    blocks = (
        (sl, rows[sl])
        for sl in (slice(s, min(n_rows, s + chunk_rows)) for s in range(0, n_rows, chunk_rows))
    )
    return cluster_sums_of_blocks(blocks, index, n_clusters, rows.shape[1], name)


def cluster_sums_of_blocks(
    blocks: Iterable[tuple[slice, np.ndarray]],
    index: np.ndarray,
    n_clusters: int,
    n_cols: int,
    name: str,
    *,
    nonnegative: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster float64 column sums ``(n_clusters, n_cols)`` and row counts ``(n_clusters,)``.

    ``blocks`` yields ``(slice of the rows, rows)`` in row order (e.g. a
    :class:`~raretoken.stats.chunks.RowChunks`); ``index[r]`` in ``[0, n_clusters)`` is the
    cluster of row ``r``. Only one block is held (as float64) at a time. The shared helper of
    every window-cluster bootstrap in :mod:`raretoken.stats`: a resample's mean of rows is
    ``(multiplicities @ sums) / (multiplicities @ counts)``.

    Raises
    ------
    NumericalError
        Non-finite values.
    ConfigError
        Negative values when ``nonnegative``.
    """
    sums = np.zeros((n_clusters, n_cols), dtype=np.float64)
    for sl, rows in blocks:
        block = np.asarray(rows, dtype=np.float64)
        if not np.all(np.isfinite(block)):
            raise NumericalError(f"{name} contains NaN or infinite values")
        if nonnegative and (block < 0).any():
            raise ConfigError(f"{name} must hold absolute values |L - L̃| (>= 0)")
        if block.shape[0] == 0:
            continue
        idx = index[sl]
        order = np.argsort(idx, kind="stable")
        sidx = idx[order]
        first = np.flatnonzero(np.concatenate(([True], sidx[1:] != sidx[:-1])))
        sums[sidx[first]] += np.add.reduceat(block[order], first, axis=0)
    counts = np.bincount(index, minlength=n_clusters).astype(np.float64)
    return sums, counts


def multiplicities(rng: np.random.Generator, n_clusters: int, n_boot: int) -> np.ndarray:
    """``(n_boot, n_clusters)`` resampling multiplicities: row ``b`` counts, per cluster, the
    draws in row ``b`` of ``rng.integers(0, n_clusters, size=(n_boot, n_clusters))`` (drawn in
    batches of rows, which gives the same draws)."""
    w = np.empty((n_boot, n_clusters), dtype=np.float64)
    batch = max(1, _BOOT_BLOCK_ELEMENTS // n_clusters)
    for b0 in range(0, n_boot, batch):
        nb = min(batch, n_boot - b0)
        draws = rng.integers(0, n_clusters, size=(nb, n_clusters))
        draws += np.arange(nb, dtype=draws.dtype)[:, None] * n_clusters
        w[b0 : b0 + nb] = np.bincount(draws.ravel(), minlength=nb * n_clusters).reshape(
            nb, n_clusters
        )
    return w


def ratio_interval(
    abs_delta_rare_rows: np.ndarray,
    abs_delta_common_rows: np.ndarray,
    rare_clusters: np.ndarray | Sequence[int],
    common_clusters: np.ndarray | Sequence[int],
    n_boot: int,
    seed: int | np.random.Generator,
    level: float = 0.95,
    *,
    paired: bool = True,
    chunk_rows: int = 4096,
) -> RatioInterval:
    """Per-neuron ``Δrare / Δcommon`` with a window-cluster bootstrap percentile interval.

    Parameters
    ----------
    abs_delta_rare_rows, abs_delta_common_rows:
        ``(n_rare_rows, n)`` and ``(n_common_rows, n)`` values ``|L - L̃(i)|`` per scored
        position (arrays or memory maps; read ``chunk_rows`` rows at a time).
    rare_clusters, common_clusters:
        Window id of every rare / common row.
    n_boot:
        Number of resamples (>= 1).
    seed:
        Int seed or Generator (required).
    level:
        Confidence level of the percentile interval, in ``(0, 1)``.
    paired:
        Resample the windows once for both kinds of row (the distinct window ids of both,
        ascending, are the clusters), or the rare rows' and common rows' windows
        independently (rare draws first).
    chunk_rows:
        Rows read at a time.

    Resample ``b`` draws row ``b`` of ``rng.integers(0, C, size=(n_boot, C))`` over the
    ``C`` clusters (sorted distinct ids; unpaired: the rare draws, then the common draws);
    its ratio is the mean of the drawn windows' rare rows over the mean of their common rows.
    Resamples without a rare or a common row give no ratio and are dropped
    (:attr:`RatioInterval.n_undefined`); so are 0/0 ratios of a neuron. Memory: the rows are
    read once into ``(C, n)`` float64 sums per kind; the multiplicities take ``n_boot × C``
    floats and the resampled means are formed ``2**22`` values at a time.

    Raises
    ------
    ConfigError
        Bad shapes, labels or settings; negative values.
    InsufficientDataError
        No rows, or fewer than 2 windows among the rare or the common rows.
    NumericalError
        Non-finite values.
    """
    rare = _rows_matrix(abs_delta_rare_rows, "abs_delta_rare_rows")
    common = _rows_matrix(abs_delta_common_rows, "abs_delta_common_rows")
    if rare.shape[1] != common.shape[1]:
        raise ConfigError(
            f"rare rows have {rare.shape[1]} neurons, common rows {common.shape[1]}: they differ"
        )
    rc = cluster_labels(rare_clusters, rare.shape[0], "rare_clusters")
    cc = cluster_labels(common_clusters, common.shape[0], "common_clusters")
    if int(n_boot) < 1:
        raise ConfigError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < float(level) < 1.0:
        raise ConfigError(f"level must be in (0, 1), got {level}")
    if int(chunk_rows) < 1:
        raise ConfigError(f"chunk_rows must be >= 1, got {chunk_rows}")
    n_boot, chunk_rows, level = int(n_boot), int(chunk_rows), float(level)
    ur, uc = np.unique(rc), np.unique(cc)
    if ur.size < 2 or uc.size < 2:
        raise InsufficientDataError(
            f"a cluster bootstrap needs >= 2 windows per kind of row; got {ur.size} windows "
            f"with rare rows and {uc.size} with common rows"
        )
    rng = require_seed(seed, "ratio_interval")
    if paired:
        union = np.union1d(ur, uc)
        s_r, n_r = _cluster_sums(
            rare, np.searchsorted(union, rc), union.size, chunk_rows, "abs_delta_rare_rows"
        )
        s_c, n_c = _cluster_sums(
            common, np.searchsorted(union, cc), union.size, chunk_rows, "abs_delta_common_rows"
        )
        w_r = multiplicities(rng, union.size, n_boot)
        w_c = w_r
    else:
        s_r, n_r = _cluster_sums(
            rare, np.searchsorted(ur, rc), ur.size, chunk_rows, "abs_delta_rare_rows"
        )
        s_c, n_c = _cluster_sums(
            common, np.searchsorted(uc, cc), uc.size, chunk_rows, "abs_delta_common_rows"
        )
        w_r = multiplicities(rng, ur.size, n_boot)
        w_c = multiplicities(rng, uc.size, n_boot)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = (s_r.sum(axis=0) / n_r.sum()) / (s_c.sum(axis=0) / n_c.sum())
    den_r, den_c = w_r @ n_r, w_c @ n_c
    ok = (den_r > 0) & (den_c > 0)
    n_undefined = int(np.count_nonzero(~ok))
    if n_undefined:
        logger.info("%d of %d resamples hold no rare or no common row", n_undefined, n_boot)
    w_r, w_c, den_r, den_c = w_r[ok], w_c[ok], den_r[ok], den_c[ok]
    n_neu = rare.shape[1]
    lo = np.full(n_neu, np.nan)
    hi = np.full(n_neu, np.nan)
    q = [(1.0 - level) / 2.0, (1.0 + level) / 2.0]
    if w_r.shape[0]:
        block = max(1, _BOOT_BLOCK_ELEMENTS // w_r.shape[0])
        for j0 in range(0, n_neu, block):
            j1 = min(n_neu, j0 + block)
            with np.errstate(divide="ignore", invalid="ignore"):
                boot = ((w_r @ s_r[:, j0:j1]) / den_r[:, None]) / (
                    (w_c @ s_c[:, j0:j1]) / den_c[:, None]
                )
            qs = nanquantile_columns(boot, q)  # 0/0 (NaN) resamples are dropped
            lo[j0:j1], hi[j0:j1] = qs[0], qs[1]
    return RatioInterval(
        ratio=frozen(ratio),
        lo=frozen(lo),
        hi=frozen(hi),
        level=level,
        n_boot=n_boot,
        paired=bool(paired),
        seed=None if isinstance(seed, np.random.Generator) else int(seed),
        n_rare_rows=int(rare.shape[0]),
        n_common_rows=int(common.shape[0]),
        n_rare_clusters=int(ur.size),
        n_common_clusters=int(uc.size),
        n_undefined=n_undefined,
    )


def nanquantile_columns(x: np.ndarray, q: list[float]) -> np.ndarray:
    """``np.nanquantile(x, q, axis=0)`` for ``q = [lower, upper]``, vectorised where a column
    has no NaN and without the all-NaN-column warning (NaN there). Columns holding an infinite
    ratio (a resample whose common mean is 0) take the order statistics without
    interpolation (``"lower"`` for the lower bound, ``"higher"`` for the upper), since
    interpolating towards ``inf`` is undefined."""
    nan = np.isnan(x)
    out = np.full((len(q), x.shape[1]), np.nan)
    finite = np.isfinite(x) | nan
    for cols, nanq in ((~nan.any(axis=0), False), (~nan.all(axis=0) & nan.any(axis=0), True)):
        linear = cols & finite.all(axis=0)
        stepped = cols & ~finite.all(axis=0)
        fn = np.nanquantile if nanq else np.quantile
        if linear.any():
            out[:, linear] = fn(x[:, linear], q, axis=0)
        if stepped.any():
            out[0, stepped] = fn(x[:, stepped], q[0], axis=0, method="lower")
            out[1, stepped] = fn(x[:, stepped], q[1], axis=0, method="higher")
    return out
