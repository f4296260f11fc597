"""Three-regime fit of the neuron-influence rank curve (paper §4.1, eq. 11, Figure 1).

Sorted in descending order and drawn on log–log axes, the per-neuron influences
``Δloss(i)`` of the final MLP layer show (for rare tokens) three regimes: a *plateau* of a
few highly influential neurons (the rare-token neurons), a *power-law* decay
``log Δ ≈ -κ log r + β`` (eq. 11) and a *rapid-decay* tail. For common tokens the plateau is
absent. This module turns that visual reading into a reproducible procedure.

Method
------
1. **Sort and floor.** ``Δ`` is sorted in descending order (stable, so ties keep neuron
   order). Values ``<= floor × max(Δ)`` (zeros of dead neurons, negative values) are treated
   as zero influence: they keep their (last) ranks but are left out of the fit, because a
   run of values clipped to a constant would form an artificial flat segment that the
   segmented fit would have to spend a segment on. Plots draw them at the floor. The floor is
   *relative* so that rescaling ``Δ`` only shifts the intercepts.
2. **Log-spaced grid (point weighting).** Uniformly spaced ranks put almost all points in the
   tail of a log–log plot (for 1536 neurons, 90 % of the ranks lie in the last decade), so an
   unweighted fit would all but ignore the plateau (a few dozen points). The ranks are
   therefore grouped into bins of width ``grid_step`` in ``log10(rank)`` and each bin becomes
   one point: the mean ``log10`` rank and the mean ``log10 Δ`` of its ranks. Bins narrower
   than one rank hold a single neuron, so the first few dozen ranks keep one point each and
   beyond that every decade of rank carries the same number of points: the fit weighs the
   curve the way the log–log plot shows it (equivalent to weighting ranks by ``~1/r``, but
   with bin means that also average the tail's noise). ``grid_step=0`` fits every rank.
3. **Segmented regression.** For ``s = 1 .. max_segments`` the grid is split into ``s``
   contiguous segments, each with its own least-squares line in
   ``(log10 rank, log10 Δ)``. Segments are **not** forced to join (no hinge): the plateau is
   defined by lying *above* the power law, i.e. by a step at ``r1``, and a continuity
   constraint would bend the power-law line towards the plateau and bias ``κ``. The
   breakpoints are found by an *exact* search: every segment's residual sum of squares comes
   from prefix sums in O(1), and dynamic programming over all split points
   (``O(s · M²)`` for ``M`` grid points, vectorised) returns the global optimum. Each segment
   holds at least ``min_segment_points`` grid points.
4. **Model selection by BIC** on the ``M`` grid points, Gaussian errors:
   ``BIC = M ln(RSS / M) + k ln M`` with ``k = 3 s`` (a slope and an intercept per segment,
   ``s - 1`` breakpoints and the error variance). Ties go to fewer segments. Real curves are
   not exactly piecewise linear, so BIC often prefers the largest model; whether the first
   segment is a plateau is decided by the separate criterion below, not by BIC alone.
5. **Plateau criterion.** A plateau exists when the chosen model has at least two segments
   and its first segment

   * is markedly flatter than the second: ``slope_1 - slope_2 >= min_slope_gap``;
   * ends *above* the power law: at the last plateau rank ``r1 - 1`` the first segment's
     line exceeds the second segment's line, extrapolated back, by at least
     ``min_plateau_step`` decades (a step down at ``r1``). A head that flattens smoothly
     (e.g. Zipf–Mandelbrot ``(r + q)^-κ``) joins the power law without a step and lies
     *below* its extrapolation: such neurons are less influential than the power law
     predicts, the opposite of the paper's "influence levels that notably exceed what would
     be expected". The step is measured at the plateau's end rather than averaged over the
     plateau because the extrapolated power law rises steeply towards rank 1 (by ``κ`` decades
     per decade) while the plateau is flat by definition;
   * is small: ``r1 - 1 <= max_plateau_fraction × N``.

   The plateau neurons are the ranks ``< r1`` (``r1`` = first rank of the second segment,
   refined to single-rank resolution: the ranks of the two grid bins around the boundary
   are split between the two fitted lines, held fixed, at the least-squares point).
   Defaults (``min_slope_gap=0.1``, ``min_plateau_step=0.15`` decades, i.e. a 1.4× step,
   ``max_plateau_fraction=0.1``) were set on simulations: sorted noisy pure power laws
   (512–16384 neurons, 0.1–0.3 decades of scatter) gave a false plateau in at most ~3 % of
   cases, while plateaus of 5–100 neurons with a 0.3–0.6 decade step were always found.
   Other breakpoints (``r2``) have the grid's resolution: ~2.3 % of the rank beyond rank ~40.
6. **Regime model, κ and r2.** With a plateau, the regimes are read from the BIC-chosen
   model: plateau, power law (segment 2, ``κ = -slope_2``, eq. 11) and, for three segments,
   rapid decay from ``r2`` on. Without a plateau the curve has at most two regimes (power law
   and rapid decay), so they are read from the candidate with ``min(s_best, 2)`` segments:
   ``κ = -slope_1`` and ``r2`` = the start of its second segment (``None`` for one segment).
   Reading them from a three-segment fit instead would be ambiguous, as its extra segment
   sometimes splits the tail and sometimes isolates a short head.

Resampling (:mod:`raretoken.stats.regime_bootstrap`)
----------------------------------------------------
:func:`bootstrap_regimes` resamples windows (``clusters=``, a cluster bootstrap: positions of
one window are correlated) or, without ``clusters``, scored positions with replacement,
recomputes ``Δ = column mean`` and refits, giving percentile intervals (and a basic interval of
``κ``) and per-neuron plateau membership frequencies.

Layout
------
This module is the entry point and re-exports the names of the parts:
:mod:`~raretoken.stats.segmented` (exact segmented regression, log-rank grid),
:mod:`~raretoken.stats.regime_results` (result types), :mod:`~raretoken.stats.regime_fit`
(:func:`fit_regimes`), :mod:`~raretoken.stats.regime_bootstrap` (the bootstrap and
:func:`window_of_rows`), :mod:`~raretoken.stats.regime_bootstrap_result`
(:class:`RegimeBootstrap`, the intervals' measured coverage) and
:mod:`~raretoken.stats.chunks` (:class:`RowChunks`, :class:`ColumnSum` for memory-mapped
Δloss).
"""

from __future__ import annotations

from .chunks import ColumnSum, RowChunks
from .regime_bootstrap import (
    MIN_WINDOWS,
    RegimeBootstrap,
    bootstrap_regimes,
    window_of_rows,
)
from .regime_fit import fit_regimes
from .regime_results import RegimeFit, RegimeSettings, SegmentFit
from .segmented import PiecewiseLinearFit, log_rank_grid, segmented_regression

__all__ = [
    "MIN_WINDOWS",
    "ColumnSum",
    "PiecewiseLinearFit",
    "RegimeBootstrap",
    "RegimeFit",
    "RegimeSettings",
    "RowChunks",
    "SegmentFit",
    "bootstrap_regimes",
    "fit_regimes",
    "log_rank_grid",
    "segmented_regression",
    "window_of_rows",
]
