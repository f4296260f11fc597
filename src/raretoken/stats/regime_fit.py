"""Fit of the plateau / power-law / rapid-decay regimes of a Δloss rank curve.

The method and the choices made are described in :mod:`raretoken.stats.regimes`.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from raretoken.errors import ConfigError, InsufficientDataError, NumericalError

from ._common import frozen
from .regime_results import RegimeFit, RegimeSettings, SegmentFit
from .segmented import log_rank_grid, segmented_regression

__all__ = ["fit_regimes"]

logger = logging.getLogger(__name__)

#: Lower bound on the mean squared residual (log10 units²) so that BIC stays finite for
#: noise-free curves; with it, an exact line is a 1-segment model.
_MSE_FLOOR = 1e-20


def _check_ids(neuron_ids: np.ndarray | None, n: int) -> np.ndarray:
    if neuron_ids is None:
        return np.arange(n, dtype=np.int64)
    ids = np.asarray(neuron_ids)
    if ids.shape != (n,):
        raise ConfigError(f"neuron_ids has shape {ids.shape}, expected ({n},)")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ConfigError("neuron_ids must be integers")
    if np.unique(ids).size != n:
        raise ConfigError("neuron_ids must be unique")
    return ids.astype(np.int64)


def _refine_boundary(ylog: np.ndarray, first_rank: np.ndarray, fit: SegmentFit) -> int:
    """Plateau boundary ``r1`` at single-rank resolution.

    The grid puts the boundary at the start of a bin; when the bins on either side hold
    several ranks, the boundary may lie inside one of them. With both fitted lines held
    fixed, each candidate boundary strictly inside those two bins (or the grid's choice)
    assigns the ranks before it to the first line and the rest to the second; the one with
    the least squared error (per rank, in log10 units) wins, ties going to the earliest.
    """
    j = int(np.searchsorted(first_rank, fit.breakpoints[0]))
    lo = int(first_rank[j - 1])  # first rank of the bin before the boundary
    hi = int(first_rank[j + 1]) if j + 1 < first_rank.size else ylog.size + 1
    if hi - lo <= 2:
        return fit.breakpoints[0]
    ranks = np.arange(lo, hi)
    lr = np.log10(ranks.astype(np.float64))
    obs = ylog[lo - 1 : hi - 1]
    e_a = (obs - (fit.intercepts[0] + fit.slopes[0] * lr)) ** 2
    e_b = (obs - (fit.intercepts[1] + fit.slopes[1] * lr)) ** 2
    # boundary r in lo+1 .. hi-1: ranks lo..r-1 on line a, r..hi-1 on line b
    cum_a = np.cumsum(e_a)[:-1]
    cum_b = np.cumsum(e_b[::-1])[::-1][1:]
    return lo + 1 + int(np.argmin(cum_a + cum_b))


def fit_regimes(
    delta: np.ndarray,
    neuron_ids: np.ndarray | None = None,
    *,
    max_segments: int = 3,
    min_segment_points: int = 5,
    max_plateau_fraction: float = 0.1,
    floor: float = 1e-6,
    grid_step: float = 0.01,
    min_slope_gap: float = 0.1,
    min_plateau_step: float = 0.15,
) -> RegimeFit:
    """Fit the plateau / power-law / rapid-decay regimes of a Δloss rank curve.

    See the module docstring for the method and the choices made.

    Parameters
    ----------
    delta:
        ``(n_neurons,)`` Δloss per neuron (any order; eq. 3).
    neuron_ids:
        Id of each entry of ``delta`` (default ``0..n-1``).
    max_segments:
        Largest number of segments tried (1..max_segments are compared by BIC).
    min_segment_points:
        Fewest grid points per segment (>= 3).
    max_plateau_fraction:
        Largest plateau, as a fraction of all neurons (the paper reports ~1 %).
    floor:
        Relative floor: ranks with ``Δ <= floor × max(delta)`` are not fitted.
    grid_step:
        Bin width in decades of rank for the log-spaced grid (0: one point per rank).
    min_slope_gap:
        Least ``slope_1 - slope_2`` (log10/log10) for the first segment to count as flat.
    min_plateau_step:
        Least height (decades) of the first segment above the power law at its last rank.

    Returns
    -------
    RegimeFit

    Raises
    ------
    NumericalError
        Non-finite Δloss.
    InsufficientDataError
        No positive Δloss, or too few neurons above the floor for one segment.
    ConfigError
        Bad parameters or ``neuron_ids``.
    """
    settings = RegimeSettings(
        max_segments=max_segments,
        min_segment_points=min_segment_points,
        max_plateau_fraction=max_plateau_fraction,
        floor=floor,
        grid_step=grid_step,
        min_slope_gap=min_slope_gap,
        min_plateau_step=min_plateau_step,
    )
    settings.validate()
    d = np.asarray(delta, dtype=np.float64)
    if d.ndim != 1:
        raise ConfigError(f"delta must be 1-D, got shape {d.shape}")
    if not np.all(np.isfinite(d)):
        raise NumericalError("Δloss contains NaN or infinite values")
    n = d.size
    ids = _check_ids(neuron_ids, n)
    top = float(d.max()) if n else 0.0
    if top <= 0.0:
        raise InsufficientDataError("no neuron has a positive Δloss")
    order = np.argsort(-d, kind="stable")
    d_sorted, ids_sorted = d[order], ids[order]
    floor_value = floor * top
    n_fit = int(np.count_nonzero(d_sorted > floor_value))
    if n_fit < n:
        logger.info(
            "%d of %d Δloss values are <= the floor %.3g and are not fitted",
            n - n_fit,
            n,
            floor_value,
        )
    ylog = np.log10(d_sorted[:n_fit])
    x, y, first_rank = log_rank_grid(ylog, grid_step)
    m = x.size
    if m < min_segment_points:
        raise InsufficientDataError(
            f"{n_fit} neurons above the floor give {m} grid points, "
            f"fewer than min_segment_points={min_segment_points}"
        )
    tss = float(((y - y.mean()) ** 2).sum())
    candidates: list[SegmentFit] = []
    for s in range(1, max_segments + 1):
        if m < s * min_segment_points:
            break
        pw = segmented_regression(x, y, s, min_segment_points=min_segment_points)
        mse = max(pw.rss / m, _MSE_FLOOR)
        candidates.append(
            SegmentFit(
                n_segments=s,
                breakpoints=tuple(int(first_rank[i]) for i in pw.starts[1:]),
                slopes=pw.slopes,
                intercepts=pw.intercepts,
                rss=pw.rss,
                bic=m * math.log(mse) + 3 * s * math.log(m),
                r_squared=1.0 - pw.rss / tss if tss > 0 else 1.0,
                n_points=m,
            )
        )
    best = candidates[0]
    for c in candidates[1:]:
        if c.bic < best.bic:
            best = c

    gap: float | None = None
    step: float | None = None
    has_plateau = False
    if best.n_segments >= 2:
        b1 = best.breakpoints[0]
        gap = best.slopes[0] - best.slopes[1]
        x_end = math.log10(b1 - 1)
        step = (best.intercepts[0] - best.intercepts[1]) + gap * x_end
        has_plateau = (
            gap >= min_slope_gap and step >= min_plateau_step and b1 - 1 <= max_plateau_fraction * n
        )
    if has_plateau:
        model, pl = best, 1
        boundary = _refine_boundary(ylog, first_rank, best)
        r1: int | None = boundary
        plateau = ids_sorted[: boundary - 1]
    else:
        model, pl = candidates[min(best.n_segments, 2) - 1], 0
        r1 = None
        plateau = np.empty(0, dtype=np.int64)
    r2 = model.breakpoints[pl] if pl < len(model.breakpoints) else None
    return RegimeFit(
        neuron_ids=frozen(ids_sorted),
        delta=frozen(d_sorted),
        floor_value=floor_value,
        n_fitted=n_fit,
        grid_log10_rank=frozen(x),
        grid_log10_delta=frozen(y),
        candidates=tuple(candidates),
        best=best,
        model=model,
        has_plateau=has_plateau,
        plateau_neurons=frozen(plateau),
        kappa=-model.slopes[pl],
        power_law_segment=pl,
        r1=r1,
        r2=r2,
        plateau_slope_gap=gap,
        plateau_step=step,
        settings=settings,
    )
