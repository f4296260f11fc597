"""Bootstrap of the three-regime fit, over windows (cluster bootstrap) or over positions.

:func:`bootstrap_regimes` resamples the scored rows, recomputes ``Δ = column mean`` and refits
:func:`~raretoken.stats.regime_fit.fit_regimes`, giving percentile intervals of ``κ``, ``r1``,
``r2``, ``R²`` and the plateau size, a basic interval of ``κ`` and per-neuron plateau
membership frequencies.

Unit of resampling
------------------
Positions of one window share their context, so their Δloss values are correlated: treating
them as independent makes every interval too narrow (on synthetic data with a window effect,
95 % per-position intervals of a neuron's mean held the true value only ~70 % of the time; see
``tests/test_cluster_coverage.py``). With ``clusters`` (the window of every row, e.g. from
:func:`window_of_rows`) each resample draws as many *windows* as were observed, with
replacement, and takes all their rows. A resample's Δ is then the mean over the drawn rows,
``(multiplicities @ window_sums) / (multiplicities @ window_counts)``: the rows are read once,
chunk by chunk, into ``(n_windows, n_neurons)`` float64 sums, so each resample costs one small
product and memory does not grow with the number of positions. The draws and the per-window
sums are those of :mod:`raretoken.stats.cluster_bootstrap`. Without ``clusters`` the rows are
resampled one by one (the behaviour before window resampling, kept bit for bit).

The intervals and their measured coverage are described in
:mod:`raretoken.stats.regime_bootstrap_result`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np

from raretoken._rng import as_generator
from raretoken.errors import ConfigError, InsufficientDataError, NumericalError

from ._common import frozen
from .chunks import ColumnSum, RowChunks
from .cluster_bootstrap import cluster_labels, cluster_sums_of_blocks, multiplicities
from .regime_bootstrap_result import MIN_WINDOWS, RegimeBootstrap, _basic, _ci
from .regime_fit import _check_ids, fit_regimes

__all__ = [
    "MIN_WINDOWS",
    "RegimeBootstrap",
    "bootstrap_regimes",
    "window_of_rows",
]

logger = logging.getLogger(__name__)

#: Rows per chunk when an in-memory matrix is summed per window.
_CLUSTER_CHUNK_ROWS = 4096


def window_of_rows(target_mask: np.ndarray) -> np.ndarray:
    """Window index of every scored position, in row-major ``target_mask`` order.

    The scored positions of a sample are the ``True`` entries of its ``(n_windows, L)``
    ``target_mask`` taken row by row (the order of the captured rows), so the window of scored
    position ``k`` is the row of the ``k``-th ``True`` entry. Select with the same indices as
    the rows: ``window_of_rows(sample.target_mask)[rare_pos]``.

    Raises
    ------
    ConfigError
        ``target_mask`` is not a 2-D boolean array.
    """
    m = np.asarray(target_mask)
    if m.ndim != 2 or m.dtype != np.bool_:
        raise ConfigError(
            f"target_mask must be a 2-D boolean array (windows, positions), got {m.dtype} "
            f"with shape {m.shape}"
        )
    return np.nonzero(m)[0].astype(np.int64)


def _checked(chunks: RowChunks, acc: ColumnSum) -> Iterator[tuple[slice, np.ndarray]]:
    """The chunks of ``chunks``, each checked for finiteness and added to ``acc`` on the way."""
    for sl, block in chunks:
        if not np.all(np.isfinite(block)):
            raise NumericalError("per_position contains NaN or infinite values")
        acc.add(block)
        yield sl, block


def bootstrap_regimes(
    per_position: np.ndarray | RowChunks,
    neuron_ids: np.ndarray | None = None,
    *,
    n_boot: int = 200,
    seed: int | np.random.Generator,
    level: float = 0.95,
    batch_size: int = 16,
    clusters: np.ndarray | None = None,
    **fit_kw: Any,
) -> RegimeBootstrap:
    """Bootstrap the regime fit over windows (with ``clusters``) or over scored positions.

    **By window** (``clusters`` given): the rows are summed per window once (chunk by chunk);
    resample ``b`` draws row ``b`` of ``rng.integers(0, C, size=(n_boot, C))`` over the ``C``
    windows (sorted distinct ids; drawn ``batch_size`` rows at a time: the same draws for any
    ``batch_size``, with resample means equal up to float rounding), and its Δloss is the mean
    of the rows of the drawn windows (a window drawn twice counts twice), computed in float64
    from the window sums. **By position** (no ``clusters``): each resample draws
    ``n_positions`` rows with replacement; its Δloss is the column mean (a
    multiplicity-weighted mean, ``batch_size`` resamples per matrix product, in the input's
    floating dtype). Either way each resample is refitted with :func:`fit_regimes`
    (``fit_kw`` are passed through); the intervals are percentile intervals, plus a basic
    interval of ``κ`` (their measured coverage is in
    :mod:`raretoken.stats.regime_bootstrap_result`). The estimate is the fit of the column
    means of all rows, the same with or without ``clusters``.

    A matrix too large for memory can be passed as :class:`RowChunks` (e.g. rows of a
    memory-mapped array); it is read once for the column means (and the window sums) and, by
    position, once per batch of resamples (``weights @ chunk``, accumulated in float64). The
    random draws are the same; the estimate is identical bit for bit, and so are the
    per-position resample means whenever the rows fit in one chunk (with several chunks they
    differ from one product over all rows by float rounding of the partial sums only, ~1e-7
    relative in float32).

    Parameters
    ----------
    per_position:
        ``(n_positions, n_neurons)`` values ``|L - L~(i)|`` per scored position, or the same
        as :class:`RowChunks`.
    neuron_ids:
        Id of every column (default ``0..n_neurons-1``).
    n_boot:
        Number of resamples.
    seed:
        Int seed or Generator (required; no global randomness).
    level:
        Confidence level of the intervals.
    batch_size:
        Resamples drawn and averaged at a time.
    clusters:
        ``(n_positions,)`` integer window id of every row (of the selection, for
        :class:`RowChunks`): resample windows instead of positions. At least 2 windows.

    Raises
    ------
    ConfigError
        Bad shapes, settings or window ids.
    InsufficientDataError
        Fewer than 2 positions, or fewer than 2 windows.
    NumericalError
        Non-finite values.
    """
    chunks = per_position if isinstance(per_position, RowChunks) else None
    if chunks is None:
        x = np.asarray(per_position)
        if x.ndim != 2:
            raise ConfigError(f"per_position must be 2-D (positions, neurons), got shape {x.shape}")
        if not np.issubdtype(x.dtype, np.floating):
            x = x.astype(np.float64)
        n_pos, n_neu = x.shape
        dtype = x.dtype
    else:
        (n_pos, n_neu), dtype = chunks.shape, chunks.dtype
    if n_pos < 2:
        raise InsufficientDataError(f"bootstrap needs >= 2 positions, got {n_pos}")
    if chunks is None and not np.all(np.isfinite(x)):
        raise NumericalError("per_position contains NaN or infinite values")
    if n_boot < 1:
        raise ConfigError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < level < 1.0:
        raise ConfigError(f"level must be in (0, 1), got {level}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    index: np.ndarray | None = None
    n_clusters = 0
    if clusters is not None:
        windows, index = np.unique(cluster_labels(clusters, n_pos, "clusters"), return_inverse=True)
        n_clusters = int(windows.size)
        if n_clusters < 2:
            raise InsufficientDataError(
                f"a bootstrap over windows needs >= 2 windows, got {n_clusters}"
            )
    ids = _check_ids(neuron_ids, n_neu)
    rng = as_generator(seed)
    sums = counts = np.empty(0)
    if chunks is None:
        column_mean = x.mean(axis=0, dtype=np.float64)
        if index is not None:
            sums, counts = cluster_sums_of_blocks(
                RowChunks(x, chunk_rows=_CLUSTER_CHUNK_ROWS),
                index,
                n_clusters,
                n_neu,
                "per_position",
                nonnegative=False,
            )
    else:
        acc = ColumnSum(n_neu)
        stream = _checked(chunks, acc)  # one pass: finiteness, column means (and window sums)
        if index is None:
            for _ in stream:
                pass
        else:
            sums, counts = cluster_sums_of_blocks(
                stream, index, n_clusters, n_neu, "per_position", nonnegative=False
            )
        column_mean = acc.mean()
    estimate = fit_regimes(column_mean, ids, **fit_kw)

    def weighted_means(weights: np.ndarray) -> np.ndarray:
        if chunks is None:
            return (weights @ x).astype(np.float64)
        out: np.ndarray | None = None
        for sl, block in chunks:
            part = weights[:, sl] @ block
            out = part.astype(np.float64) if out is None else out + part
        assert out is not None
        return out

    def position_resamples(nb: int) -> np.ndarray:
        weights = np.zeros((nb, n_pos), dtype=dtype)
        for j in range(nb):
            draw = rng.integers(0, n_pos, size=n_pos)
            weights[j] = np.bincount(draw, minlength=n_pos) / n_pos
        return weighted_means(weights)

    def window_resamples(nb: int) -> np.ndarray:
        w = multiplicities(rng, n_clusters, nb)
        out: np.ndarray = (w @ sums) / (w @ counts)[:, None]
        return out

    kappa = np.empty(n_boot)
    r1 = np.full(n_boot, np.nan)
    r2 = np.full(n_boot, np.nan)
    rsq = np.empty(n_boot)
    psize = np.zeros(n_boot, dtype=np.int64)
    member_counts = np.zeros(n_neu, dtype=np.int64)
    col_of = {int(v): i for i, v in enumerate(ids.tolist())}
    for b0 in range(0, n_boot, batch_size):
        nb = min(batch_size, n_boot - b0)
        deltas = position_resamples(nb) if index is None else window_resamples(nb)
        for j in range(nb):
            fit = fit_regimes(deltas[j], ids, **fit_kw)
            k = b0 + j
            kappa[k] = fit.kappa
            rsq[k] = fit.model.r_squared
            if fit.r1 is not None:
                r1[k] = fit.r1
            if fit.r2 is not None:
                r2[k] = fit.r2
            psize[k] = fit.plateau_size
            if fit.plateau_size:
                member_counts[[col_of[int(v)] for v in fit.plateau_neurons]] += 1
    result = RegimeBootstrap(
        n_boot=n_boot,
        seed=None if isinstance(seed, np.random.Generator) else int(seed),
        level=level,
        estimate=estimate,
        neuron_ids=frozen(ids),
        membership_frequency=frozen(member_counts / n_boot),
        plateau_existence_rate=float(np.count_nonzero(psize) / n_boot),
        kappa=frozen(kappa),
        r1=frozen(r1),
        r2=frozen(r2),
        r_squared=frozen(rsq),
        plateau_size=frozen(psize),
        ci_kappa=_ci(kappa, level),
        ci_r1=_ci(r1, level),
        ci_r2=_ci(r2, level),
        ci_r_squared=_ci(rsq, level),
        ci_plateau_size=_ci(psize.astype(np.float64), level),
        ci_kappa_basic=_basic(estimate.kappa, kappa, level),
        unit="position" if index is None else "window",
        n_clusters=None if index is None else n_clusters,
        n_positions=int(n_pos),
    )
    if result.caveat is not None:
        logger.info("regime bootstrap: %s", result.caveat)
    return result
