"""The frequency elbow of a rank-frequency curve (paper §3.1, first stage of the split).

The paper defines rare tokens in two stages; the first drops the "extremely rare" tokens
below the *elbow* of the frequency distribution, found "using a sliding-window detection
method". :func:`find_elbow` implements it with local slopes on the log-log rank-frequency
curve and returns an :class:`Elbow` (the count threshold plus the curve and slopes, for
plots). The second stage, the percentile split, is in :mod:`raretoken.data.split`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from raretoken.errors import ConfigError, InsufficientDataError, NumericalError

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class Elbow:
    """The frequency elbow of a rank-frequency curve (see :func:`find_elbow`).

    Attributes
    ----------
    count_threshold
        Tokens with a count ``>= count_threshold`` are kept (the count at rank ``rank``).
    rank
        Rank (1-based, non-zero counts sorted in decreasing order) of the elbow.
    method
        ``"local-slope"``.
    params
        The parameters used (``points_per_decade``, ``half_window``, ``steepness``, ``body``,
        ``refine``).
    found
        False when no fall-off was detected; the elbow is then the last rank and the
        threshold the smallest non-zero count (only zero counts are dropped).
    n_types
        Number of ids with a non-zero count on the curve (excluded ids left out).
    body_slope, slope_threshold
        Median local slope over the body region, and ``steepness * body_slope``.
    log_rank, detected_log_rank
        ``log10`` rank of the elbow, and of the first grid point of the steep tail (before
        refinement).
    log_rank_grid, log_count_grid, local_slopes
        The evenly spaced ``log10(rank)`` grid, ``log10(count)`` interpolated on it and the
        local least-squares slope around each grid point (for plots).
    """

    count_threshold: float
    rank: int
    method: str
    params: dict[str, Any]
    found: bool
    n_types: int
    body_slope: float
    slope_threshold: float
    log_rank: float
    detected_log_rank: float
    log_rank_grid: np.ndarray = field(repr=False)
    log_count_grid: np.ndarray = field(repr=False)
    local_slopes: np.ndarray = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (arrays as lists; NaN slopes as ``None``)."""
        return {
            "count_threshold": self.count_threshold,
            "rank": self.rank,
            "method": self.method,
            "params": dict(self.params),
            "found": self.found,
            "n_types": self.n_types,
            "body_slope": self.body_slope,
            "slope_threshold": self.slope_threshold,
            "log_rank": self.log_rank,
            "detected_log_rank": self.detected_log_rank,
            "log_rank_grid": self.log_rank_grid.tolist(),
            "log_count_grid": self.log_count_grid.tolist(),
            "local_slopes": [None if math.isnan(s) else s for s in self.local_slopes.tolist()],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Elbow:
        """Inverse of :meth:`to_dict`."""
        params = dict(data["params"])
        if "body" in params:
            params["body"] = tuple(params["body"])
        return cls(
            count_threshold=float(data["count_threshold"]),
            rank=int(data["rank"]),
            method=str(data["method"]),
            params=params,
            found=bool(data["found"]),
            n_types=int(data["n_types"]),
            body_slope=float(data["body_slope"]),
            slope_threshold=float(data["slope_threshold"]),
            log_rank=float(data["log_rank"]),
            detected_log_rank=float(data["detected_log_rank"]),
            log_rank_grid=np.asarray(data["log_rank_grid"], dtype=np.float64),
            log_count_grid=np.asarray(data["log_count_grid"], dtype=np.float64),
            local_slopes=np.asarray(
                [math.nan if s is None else s for s in data["local_slopes"]], dtype=np.float64
            ),
        )


def _ols_slope(x: np.ndarray, y: np.ndarray) -> float:
    xc = x - x.mean()
    denom = float(xc @ xc)
    return float(xc @ (y - y.mean()) / denom) if denom > 0 else math.nan


def _local_slopes(xg: np.ndarray, yg: np.ndarray, half_window: float) -> np.ndarray:
    slopes = np.full(xg.shape, math.nan)
    tol = 1e-9
    for i, centre in enumerate(xg):
        inside = np.abs(xg - centre) <= half_window + tol
        if np.count_nonzero(inside) >= 3:
            slopes[i] = _ols_slope(xg[inside], yg[inside])
    return slopes


def _hinge_sse(x: np.ndarray, y: np.ndarray, xb: float) -> float:
    design = np.column_stack([np.ones_like(x), x, np.maximum(0.0, x - xb)])
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    resid = y - design @ coef
    return float(resid @ resid)


def _refine(xg: np.ndarray, yg: np.ndarray, start: int, half_window: float) -> float:
    """Best breakpoint of a continuous two-segment line near grid point ``start``."""
    x0 = xg[start]
    near = (xg >= x0 - 2 * half_window - 1e-9) & (xg <= x0 + 2 * half_window + 1e-9)
    x, y = xg[near], yg[near]
    best_x, best_sse = float(x0), math.inf
    for xb in x[(x >= x0 - half_window - 1e-9) & (x <= x0 + half_window + 1e-9)]:
        if np.count_nonzero(x < xb) < 2 or np.count_nonzero(x > xb) < 2:
            continue
        sse = _hinge_sse(x, y, float(xb))
        if sse < best_sse - 1e-12:
            best_x, best_sse = float(xb), sse
    return best_x


def find_elbow(
    counts: np.ndarray,
    *,
    exclude_ids: Iterable[int] = (),
    points_per_decade: int = 20,
    half_window: float = 0.25,
    steepness: float = 2.0,
    body: tuple[float, float] = (0.2, 0.6),
    refine: bool = True,
) -> Elbow:
    """Find the frequency elbow below which the tail of the rank-frequency curve falls off.

    Method (sliding-window local slopes on the log-log rank-frequency curve):

    1. Sort the non-zero counts (``exclude_ids`` left out) in decreasing order, giving the curve
       ``log10(count)`` against ``log10(rank)``. Tied counts are placed at the right end of
       their block: count ``c`` sits at rank ``R(c)``, the number of types with a count of at
       least ``c`` (the survival function of the type counts). Otherwise the staircase of small
       integer counts (a long run of hapaxes ends every curve) reads as a flattening; with it a
       power law ``R(c) ~ c**(-1/a)`` keeps its slope ``-a`` down to count 1, so a corpus too
       small to reach the end of the vocabulary has no elbow. The curve is resampled by linear
       interpolation on a grid evenly spaced in log-rank (``points_per_decade`` per decade), so
       that every decade weighs the same and the dense high ranks do not dominate.
    2. At every grid point, fit a least-squares line to the grid points within
       ``± half_window`` decades: its slope is the *local slope*.
    3. The *body slope* is the median local slope over the body region, the grid points
       between ``body[0]`` and ``body[1]`` (fractions of the log-rank range). The median
       ignores the flatter head (Zipf-Mandelbrot) and a tail covering less than half the
       region. For natural text it is close to the Zipf exponent, about -1.
    4. A grid point is *steep* when its local slope is below ``steepness * body_slope``
       (twice as steep as the body by default). The tail is the last run of steep grid points
       that reaches the end of the curve, and its first point is the detected elbow. A fall-off
       must last to the end of the curve: a steep stretch that flattens again is not the tail.
    5. With ``refine`` (the default), the elbow moves to the best breakpoint of a continuous
       two-segment line fitted to the grid points within ``± 2 half_window`` of the detected
       point, trying breakpoints within ``± half_window``. This removes the bias of step 4,
       which fires before a sharp break (once enough of the window lies past it).

    The elbow's count threshold is the count at the elbow rank; tokens with a count at least
    that large are kept, so ties at the threshold are all kept even beyond the elbow rank.
    When no grid point is steep at the end of the curve (pure power law), no elbow is found:
    ``found`` is False, the rank is the last one and only zero counts are dropped.

    The paper names only "a sliding-window detection method"; local slopes were chosen over
    maximum curvature or maximum distance to the chord because both of those also react to
    the flat head of a Zipf-Mandelbrot curve and always return a point, even for a pure power
    law.

    Raises
    ------
    ConfigError
        Invalid parameters.
    NumericalError
        Negative or non-finite counts.
    InsufficientDataError
        No non-zero count.
    """
    if points_per_decade < 2:
        raise ConfigError(f"points_per_decade must be >= 2, got {points_per_decade}")
    if not half_window > 0:
        raise ConfigError(f"half_window must be > 0 decades, got {half_window}")
    if not steepness > 1:
        raise ConfigError(f"steepness must be > 1, got {steepness}")
    if not 0 <= body[0] < body[1] <= 1:
        raise ConfigError(f"body must be two fractions 0 <= lo < hi <= 1, got {body}")
    values = np.asarray(counts, dtype=np.float64).ravel()
    if not np.all(np.isfinite(values)) or np.any(values < 0):
        raise NumericalError("token counts must be finite and non-negative")
    keep = np.ones(values.shape, dtype=bool)
    excluded = np.asarray(list(exclude_ids), dtype=np.int64)
    excluded = excluded[(excluded >= 0) & (excluded < values.size)]
    keep[excluded] = False
    nonzero = np.sort(values[keep & (values > 0)])[::-1]
    n_types = int(nonzero.size)
    if n_types == 0:
        raise InsufficientDataError("no token has a non-zero count; cannot find the elbow")
    params: dict[str, Any] = {
        "points_per_decade": points_per_decade,
        "half_window": half_window,
        "steepness": steepness,
        "body": tuple(body),
        "refine": refine,
    }

    # right end of each block of tied counts: rank R(c) = number of types with count >= c
    block_end = np.flatnonzero(np.append(nonzero[1:] != nonzero[:-1], True))
    x = np.log10(block_end + 1.0)
    y = np.log10(nonzero[block_end])
    x_min, x_max = float(x[0]), float(x[-1])
    span = x_max - x_min
    n_grid = max(math.ceil(span * points_per_decade) + 1, 2) if span > 0 else 1
    xg = np.linspace(x_min, x_max, n_grid)
    yg = np.interp(xg, x, y)
    slopes = _local_slopes(xg, yg, half_window)

    lo, hi = x_min + body[0] * span, x_min + body[1] * span
    in_body = (xg >= lo - 1e-9) & (xg <= hi + 1e-9) & ~np.isnan(slopes)
    body_values = slopes[in_body] if np.any(in_body) else slopes[~np.isnan(slopes)]
    body_slope = float(np.median(body_values)) if body_values.size else math.nan
    slope_threshold = steepness * body_slope

    start = n_grid
    if body_values.size and body_slope < 0:
        steep = slopes < slope_threshold  # NaN compares False
        not_steep = np.flatnonzero(~steep)
        start = int(not_steep[-1]) + 1 if not_steep.size else 0
    found = start < n_grid
    if found:
        detected = float(xg[start])
        log_rank = _refine(xg, yg, start, half_window) if refine else detected
        rank = int(np.clip(round(10.0**log_rank), 1, n_types))
    else:
        detected = log_rank = x_max
        rank = n_types
    elbow = Elbow(
        count_threshold=float(nonzero[rank - 1]),
        rank=rank,
        method="local-slope",
        params=params,
        found=found,
        n_types=n_types,
        body_slope=body_slope,
        slope_threshold=slope_threshold,
        log_rank=float(log_rank),
        detected_log_rank=float(detected),
        log_rank_grid=xg,
        log_count_grid=yg,
        local_slopes=slopes,
    )
    logger.info(
        "frequency elbow %s at rank %d of %d (count >= %g kept; body slope %.2f)",
        "found" if found else "not found, keeping all",
        rank,
        n_types,
        elbow.count_threshold,
        body_slope,
    )
    return elbow
