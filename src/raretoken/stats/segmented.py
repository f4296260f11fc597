"""Exact least-squares segmented regression and the log-spaced rank grid.

The generic machinery behind the three-regime fit (:mod:`raretoken.stats.regimes`, steps 2–3
of its method): :func:`segmented_regression` fits ``n`` independent (discontinuous) lines to
ordered points with globally optimal breakpoints, and :func:`log_rank_grid` bins the ranks of
a rank curve into equal widths of ``log10(rank)``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from raretoken.errors import ConfigError, InsufficientDataError, NumericalError

__all__ = [
    "PiecewiseLinearFit",
    "log_rank_grid",
    "segmented_regression",
]

#: Largest grid the exhaustive search accepts (its cost matrix has M² entries).
_MAX_GRID_POINTS = 2000


@dataclass(frozen=True)
class PiecewiseLinearFit:
    """Least-squares piecewise-linear fit with independent (discontinuous) segments.

    Attributes
    ----------
    starts:
        Index of the first point of every segment (``starts[0] == 0``).
    slopes, intercepts:
        Line of each segment, ``y = intercept + slope * x``.
    rss:
        Total residual sum of squares.
    """

    starts: tuple[int, ...]
    slopes: tuple[float, ...]
    intercepts: tuple[float, ...]
    rss: float


def _prefix(v: np.ndarray) -> np.ndarray:
    return np.concatenate(([0.0], np.cumsum(v)))


def _segment_costs(x: np.ndarray, y: np.ndarray, min_points: int) -> np.ndarray:
    """``cost[a, b]``: RSS of the OLS line through points ``a .. b-1`` (inf if too short)."""
    n = x.size
    xc = x - x.mean()
    yc = y - y.mean()
    sx, sy = _prefix(xc), _prefix(yc)
    sxx, sxy, syy = _prefix(xc * xc), _prefix(xc * yc), _prefix(yc * yc)
    a = np.arange(n + 1)[:, None]
    b = np.arange(n + 1)[None, :]
    cnt = (b - a).astype(np.float64)
    valid = cnt >= min_points
    cnt = np.where(valid, cnt, 1.0)
    dx, dy = sx[b] - sx[a], sy[b] - sy[a]
    cxx = sxx[b] - sxx[a] - dx * dx / cnt
    cxy = sxy[b] - sxy[a] - dx * dy / cnt
    cyy = syy[b] - syy[a] - dy * dy / cnt
    with np.errstate(divide="ignore", invalid="ignore"):
        rss = cyy - np.where(cxx > 0, cxy * cxy / cxx, 0.0)
    return np.where(valid, np.maximum(rss, 0.0), np.inf)


def _line(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """OLS ``(slope, intercept)``."""
    mx, my = float(x.mean()), float(y.mean())
    dx = x - mx
    sxx = float(dx @ dx)
    slope = float(dx @ (y - my)) / sxx if sxx > 0 else 0.0
    return slope, my - slope * mx


def segmented_regression(
    x: np.ndarray, y: np.ndarray, n_segments: int, *, min_segment_points: int = 5
) -> PiecewiseLinearFit:
    """Globally optimal least-squares fit of ``n_segments`` independent lines.

    Points must be given in the order along which they are segmented (increasing ``x``).
    Segment costs come from prefix sums (O(1) per candidate segment); dynamic programming
    over all split points finds the exact minimum of the total RSS in ``O(n_segments · n²)``.
    On exact ties the earliest split points win.

    Raises
    ------
    ConfigError
        ``n_segments < 1`` or ``min_segment_points < 3`` (two points always fit exactly).
    InsufficientDataError
        Fewer than ``n_segments * min_segment_points`` points.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape:
        raise ConfigError(f"x and y must be 1-D of equal length, got {x.shape} and {y.shape}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise NumericalError("segmented regression needs finite x and y")
    if n_segments < 1:
        raise ConfigError(f"n_segments must be >= 1, got {n_segments}")
    if min_segment_points < 3:
        raise ConfigError(f"min_segment_points must be >= 3, got {min_segment_points}")
    n = x.size
    if n < n_segments * min_segment_points:
        raise InsufficientDataError(
            f"{n} points cannot hold {n_segments} segments of >= {min_segment_points} points"
        )
    if n > _MAX_GRID_POINTS:
        raise ConfigError(f"{n} points exceed the exhaustive-search limit of {_MAX_GRID_POINTS}")
    cost = _segment_costs(x, y, min_segment_points)
    best = cost[0].copy()  # best cost of covering points 0..b-1 with k segments
    back: list[np.ndarray] = []
    cols = np.arange(n + 1)
    for _ in range(1, n_segments):
        total = best[:, None] + cost
        arg = np.argmin(total, axis=0)
        best = total[arg, cols]
        back.append(arg)
    starts = [n]
    for arg in reversed(back):
        starts.append(int(arg[starts[-1]]))
    starts.append(0)
    bounds = starts[::-1]
    slopes, intercepts = [], []
    rss = 0.0
    for lo, hi in itertools.pairwise(bounds):
        slope, icpt = _line(x[lo:hi], y[lo:hi])
        slopes.append(slope)
        intercepts.append(icpt)
        resid = y[lo:hi] - (icpt + slope * x[lo:hi])
        rss += float(resid @ resid)
    return PiecewiseLinearFit(
        starts=tuple(bounds[:-1]), slopes=tuple(slopes), intercepts=tuple(intercepts), rss=rss
    )


def log_rank_grid(
    log10_delta_sorted: np.ndarray, grid_step: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bin ranks ``1..N`` into intervals of width ``grid_step`` in ``log10(rank)``.

    Returns ``(x, y, first_rank)``: per bin the mean ``log10`` rank, the mean of
    ``log10_delta_sorted`` over its ranks and its first (1-based) rank. ``grid_step == 0``
    keeps every rank as its own point.
    """
    n = log10_delta_sorted.size
    lr = np.log10(np.arange(1, n + 1, dtype=np.float64))
    if grid_step == 0:
        return lr, log10_delta_sorted.astype(np.float64), np.arange(1, n + 1)
    ids = np.floor(lr / grid_step + 1e-9).astype(np.int64)
    starts = np.flatnonzero(np.concatenate(([True], ids[1:] != ids[:-1])))
    counts = np.diff(np.append(starts, n))
    x = np.add.reduceat(lr, starts) / counts
    y = np.add.reduceat(log10_delta_sorted.astype(np.float64), starts) / counts
    return x, y, starts + 1
