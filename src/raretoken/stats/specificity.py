"""Rare-token specificity: is a neuron important for *rare* tokens, or for every token?

The plateau of the rare-token Δloss rank curve (paper §4.1) is read as "rare-token neurons".
A neuron whose ablation hurts the prediction of every target token also has a large
rare-token Δloss, so a high rare-token Δloss alone does not show specialisation. This module
gives the statistics that separate the two readings. Neuron ids are the indices of the Δloss
arrays (the columns of the final-layer activation matrix, ``0..n-1``).

Overlap with the top common-token neurons (:func:`top_overlap`)
----------------------------------------------------------------
How many neurons of a group ``G`` (e.g. the plateau, ``|G| = g``) are among the ``k``
neurons with the largest score (e.g. common-token Δloss; ``k = g`` by default, ties broken by
the lower id)? Under the null hypothesis that ``G`` is a uniformly random group of ``g`` of
the ``n`` neurons, the overlap is hypergeometric (population ``n``, ``k`` "successes", ``g``
draws): expectation ``k·g/n``, and the one-sided p-value of an overlap at least as large as
the observed one is the exact hypergeometric tail ``P(X >= overlap)``
(:data:`scipy.stats.hypergeom`). A large overlap means the group's neurons are *generally*
important, not rare-token specific.

Per-neuron selectivity (:func:`selectivity`, :func:`selective_group`)
----------------------------------------------------------------------
Across neurons, ``log10 Δrare`` is regressed (ordinary least squares, with intercept) on
``log10 Δcommon``. The residual of a neuron is how many decades its rare-token influence lies
above (positive) or below what its common-token influence predicts; the log scale makes it a
*ratio* relative to the typical rare/common ratio at that level of influence, and the
regression (rather than the raw ratio) absorbs a systematic difference in scale or a slope
``!= 1`` between the two Δloss. The standardized residual is ``z = residual / s`` with
``s = sqrt(RSS / (n - 2))`` (no leverage correction: with thousands of neurons every leverage
is ~1/n). The Spearman correlation of Δrare and Δcommon over all neurons (computed on the raw
values) summarises how much the two rankings agree.

Zero Δloss (a neuron that never fires, or a floor reached in float32) has no logarithm. Both
series are floored at ``eps`` before taking logs; by default ``eps`` is one tenth of the
smallest positive value of *both* series pooled, i.e. one decade below the least influence
observed in either, so that (i) the same floor applies to both axes, (ii) a floored neuron
sits below every measured one, and (iii) it does not reach arbitrarily far out in log space
and dominate the fit. The numbers of floored values are reported.

The **selective group** (definition ``"selective"``, next to ``"plateau"`` and ``"topk"``)
is the ``k`` neurons with the largest residual, ties broken by the lower id; ``k`` is chosen
by the caller (e.g. the plateau size, to compare equal-sized groups).

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
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats as sps

from raretoken.errors import ConfigError, InsufficientDataError, NumericalError
from raretoken.stats._common import finite_or_none, frozen, nan_list, require_seed

logger = logging.getLogger(__name__)

__all__ = [
    "RatioInterval",
    "Selectivity",
    "TopOverlap",
    "ratio_interval",
    "selective_group",
    "selectivity",
    "top_overlap",
]

#: Largest number of bootstrap means held at once in :func:`ratio_interval` (per Δloss side).
_BOOT_BLOCK_ELEMENTS = 1 << 22


def _fmt(v: float | None, digits: int = 3) -> str:
    if v is None or not math.isfinite(v):
        return "n/a"
    if v != 0.0 and (abs(v) < 10.0 ** -(digits - 1) or abs(v) >= 1e5):
        return f"{v:.{digits - 1}e}"
    return f"{v:.{digits}g}"


def _vector(x: np.ndarray | Sequence[float], name: str) -> np.ndarray:
    """A finite 1-D float64 copy of ``x``."""
    try:
        a = np.array(x, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{name} must be a 1-D array of numbers") from err
    if a.ndim != 1:
        raise ConfigError(f"{name} must be 1-D, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise NumericalError(f"{name} contains NaN or infinite values")
    return a


def _group(group_ids: np.ndarray | Sequence[int], n: int, name: str = "group_ids") -> np.ndarray:
    """Validated neuron ids in ``[0, n)``, sorted (``int64``)."""
    ids = np.asarray(group_ids)
    if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
        raise ConfigError(f"{name} must be a 1-D array of integer neuron ids")
    if ids.size == 0:
        raise InsufficientDataError(f"{name} is empty")
    if np.unique(ids).size != ids.size:
        raise ConfigError(f"{name} must not repeat a neuron id")
    if ids.min() < 0 or ids.max() >= n:
        raise ConfigError(f"{name} must lie in [0, {n}), got {ids.min()}..{ids.max()}")
    return np.sort(ids.astype(np.int64))


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Ids of the ``k`` largest scores in rank order (ties: lower id first)."""
    return np.lexsort((np.arange(scores.size), -scores))[:k].astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Overlap with the top-k neurons of another score
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class TopOverlap:
    """Overlap of a neuron group with the top-``k`` neurons of a score.

    Attributes
    ----------
    n_neurons:
        Number of neurons ``n`` (the population of the hypergeometric null).
    group_size, k:
        ``|G|`` and the number of top neurons.
    group_ids:
        The group, ascending.
    top_ids:
        The ``k`` neurons of largest score, in rank order (ties: lower id first).
    overlap_ids:
        ``G ∩ top-k``, ascending.
    overlap:
        ``|G ∩ top-k|``.
    fraction:
        ``overlap / |G|``: the fraction of the group that is among the top ``k``.
    expected:
        ``k · |G| / n``: the expected overlap of a uniformly random group of size ``|G|``.
    expected_sd:
        SD of that hypergeometric overlap.
    expected_fraction:
        ``k / n`` (= ``expected / |G|``).
    p_value:
        Exact one-sided ``P(X >= overlap)`` for ``X ~ Hypergeom(n, k, |G|)``.
    group_name, score_name:
        Labels for :meth:`to_markdown`.
    """

    n_neurons: int
    group_size: int
    k: int
    group_ids: np.ndarray
    top_ids: np.ndarray
    overlap_ids: np.ndarray
    overlap: int
    fraction: float
    expected: float
    expected_sd: float
    expected_fraction: float
    p_value: float
    group_name: str = "group"
    score_name: str = "score"

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_neurons": self.n_neurons,
            "group_size": self.group_size,
            "k": self.k,
            "group_ids": self.group_ids.tolist(),
            "top_ids": self.top_ids.tolist(),
            "overlap_ids": self.overlap_ids.tolist(),
            "overlap": self.overlap,
            "fraction": finite_or_none(self.fraction),
            "expected": finite_or_none(self.expected),
            "expected_sd": finite_or_none(self.expected_sd),
            "expected_fraction": finite_or_none(self.expected_fraction),
            "p_value": finite_or_none(self.p_value),
            "group_name": self.group_name,
            "score_name": self.score_name,
        }

    def to_markdown(self) -> str:
        return (
            f"{self.overlap} of the {self.group_size} {self.group_name} neurons "
            f"({_fmt(100.0 * self.fraction, 3)} %) are among the {self.k} neurons with the "
            f"largest {self.score_name} (of {self.n_neurons}); a random group of the same size "
            f"would share {_fmt(self.expected)} ± {_fmt(self.expected_sd)} "
            f"(hypergeometric; P(overlap >= {self.overlap}) = {_fmt(self.p_value)})."
        )


def top_overlap(
    group_ids: np.ndarray | Sequence[int],
    scores: np.ndarray | Sequence[float],
    n_neurons: int | None = None,
    k: int | None = None,
    *,
    group_name: str = "group",
    score_name: str = "score",
) -> TopOverlap:
    """Overlap of ``group_ids`` with the ``k`` neurons of largest ``scores``.

    Parameters
    ----------
    group_ids:
        Neuron ids of the group (e.g. the rare-token plateau), in ``[0, n)``.
    scores:
        ``(n,)`` score per neuron id (e.g. common-token Δloss); ``scores[i]`` is neuron ``i``.
    n_neurons:
        Number of neurons; when given it must equal ``len(scores)`` (a consistency check).
    k:
        Number of top neurons (default ``|G|``), in ``[1, n]``.
    group_name, score_name:
        Labels for :meth:`TopOverlap.to_markdown`.

    Raises
    ------
    ConfigError
        Bad ids, ``k`` out of range, ``n_neurons`` inconsistent with ``scores``.
    InsufficientDataError
        An empty group.
    NumericalError
        Non-finite scores.
    """
    s = _vector(scores, "scores")
    n = s.size
    if n_neurons is not None and int(n_neurons) != n:
        raise ConfigError(f"n_neurons={n_neurons} but scores has {n} entries")
    if n == 0:
        raise InsufficientDataError("scores is empty")
    g = _group(group_ids, n)
    kk = g.size if k is None else int(k)
    if not 1 <= kk <= n:
        raise ConfigError(f"k must be in [1, {n}], got {kk}")
    top = _top_k(s, kk)
    inter = np.intersect1d(g, top)
    dist = sps.hypergeom(n, kk, g.size)
    return TopOverlap(
        n_neurons=n,
        group_size=int(g.size),
        k=kk,
        group_ids=frozen(g),
        top_ids=frozen(top),
        overlap_ids=frozen(inter.astype(np.int64)),
        overlap=int(inter.size),
        fraction=inter.size / g.size,
        expected=kk * g.size / n,
        expected_sd=float(dist.std()),
        expected_fraction=kk / n,
        p_value=float(dist.sf(inter.size - 1)),
        group_name=group_name,
        score_name=score_name,
    )


# ---------------------------------------------------------------------------------------------
# Per-neuron selectivity: residual of log Δrare on log Δcommon
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Selectivity:
    """Rare-token selectivity of every neuron (see the module docstring).

    Attributes
    ----------
    delta_rare, delta_common:
        The Δloss given, per neuron id.
    eps:
        Floor applied before the logarithm.
    n_floored_rare, n_floored_common:
        Number of values ``< eps`` raised to ``eps`` (zeros, unless ``eps`` was given larger).
    log_rare, log_common:
        ``log10(max(Δ, eps))``.
    slope, intercept:
        OLS line ``log_rare ≈ intercept + slope · log_common`` over all neurons.
    r_squared:
        Coefficient of determination of that line.
    residual:
        ``log_rare - (intercept + slope · log_common)`` per neuron (decades; positive: more
        rare-token influence than the neuron's common-token influence predicts).
    residual_sd:
        ``s = sqrt(RSS / (n - 2))``.
    z:
        ``residual / s`` (NaN when ``s == 0``).
    spearman_rho, spearman_p:
        Spearman correlation of ``delta_rare`` and ``delta_common`` over all neurons (raw
        values) and its two-sided p-value (scipy).
    """

    delta_rare: np.ndarray
    delta_common: np.ndarray
    eps: float
    n_floored_rare: int
    n_floored_common: int
    log_rare: np.ndarray
    log_common: np.ndarray
    slope: float
    intercept: float
    r_squared: float
    residual: np.ndarray
    residual_sd: float
    z: np.ndarray
    spearman_rho: float
    spearman_p: float

    @property
    def n_neurons(self) -> int:
        return int(self.delta_rare.size)

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_neurons": self.n_neurons,
            "delta_rare": nan_list(self.delta_rare),
            "delta_common": nan_list(self.delta_common),
            "eps": finite_or_none(self.eps),
            "n_floored_rare": self.n_floored_rare,
            "n_floored_common": self.n_floored_common,
            "log_rare": nan_list(self.log_rare),
            "log_common": nan_list(self.log_common),
            "slope": finite_or_none(self.slope),
            "intercept": finite_or_none(self.intercept),
            "r_squared": finite_or_none(self.r_squared),
            "residual": nan_list(self.residual),
            "residual_sd": finite_or_none(self.residual_sd),
            "z": nan_list(self.z),
            "spearman_rho": finite_or_none(self.spearman_rho),
            "spearman_p": finite_or_none(self.spearman_p),
        }

    def group_summary(self, group_ids: np.ndarray | Sequence[int]) -> tuple[float, float, int]:
        """``(mean residual, mean z, #neurons with z > 2)`` of a group of neuron ids."""
        g = _group(group_ids, self.n_neurons)
        return (
            float(self.residual[g].mean()),
            float(self.z[g].mean()),
            int(np.count_nonzero(self.z[g] > 2.0)),
        )

    def to_markdown(
        self, group_ids: np.ndarray | Sequence[int] | None = None, group_name: str = "plateau"
    ) -> str:
        text = (
            f"Over {self.n_neurons} neurons, log10 Δloss_rare = {_fmt(self.intercept)} + "
            f"{_fmt(self.slope)} · log10 Δloss_common (OLS, R² = {_fmt(self.r_squared)}, "
            f"residual SD {_fmt(self.residual_sd)} decades); Spearman ρ(Δloss_rare, "
            f"Δloss_common) = {_fmt(self.spearman_rho)}. Zeros floored at "
            f"{_fmt(self.eps)} ({self.n_floored_rare} rare, {self.n_floored_common} common)."
        )
        if group_ids is not None:
            mean_res, mean_z, n_sel = self.group_summary(group_ids)
            size = int(np.asarray(group_ids).size)
            text += (
                f" The {size} {group_name} neurons lie {_fmt(mean_res)} decades "
                f"(mean z = {_fmt(mean_z)}) above the line on average; {n_sel} have z > 2."
            )
        return text


def selectivity(
    delta_rare: np.ndarray | Sequence[float],
    delta_common: np.ndarray | Sequence[float],
    eps: float | None = None,
) -> Selectivity:
    """Residual of ``log10 Δrare`` regressed on ``log10 Δcommon`` over all neurons.

    Parameters
    ----------
    delta_rare, delta_common:
        ``(n,)`` Δloss per neuron id on rare / common targets (``>= 0``).
    eps:
        Floor before the logarithm (``> 0``); default one tenth of the smallest positive value
        of both series pooled (see the module docstring).

    Raises
    ------
    ConfigError
        Shapes differ, negative Δloss, ``eps <= 0``.
    InsufficientDataError
        Fewer than 3 neurons, no positive value, or no spread in ``log_common``.
    NumericalError
        Non-finite values.
    """
    r = _vector(delta_rare, "delta_rare")
    c = _vector(delta_common, "delta_common")
    if r.shape != c.shape:
        raise ConfigError(f"delta_rare {r.shape} and delta_common {c.shape} differ in shape")
    n = r.size
    if n < 3:
        raise InsufficientDataError(f"selectivity needs >= 3 neurons, got {n}")
    if (r < 0).any() or (c < 0).any():
        raise ConfigError("Δloss must be >= 0 (a mean of |L - L̃|)")
    if eps is None:
        pos = np.concatenate((r[r > 0], c[c > 0]))
        if pos.size == 0:
            raise InsufficientDataError("no neuron has a positive Δloss")
        floor = float(pos.min()) / 10.0
    else:
        floor = float(eps)
        if not (math.isfinite(floor) and floor > 0.0):
            raise ConfigError(f"eps must be a positive finite number, got {eps}")
    lr = np.log10(np.maximum(r, floor))
    lc = np.log10(np.maximum(c, floor))
    xm, ym = float(lc.mean()), float(lr.mean())
    dx, dy = lc - xm, lr - ym
    sxx = float(dx @ dx)
    if sxx <= 0.0:
        raise InsufficientDataError("log Δloss_common has no spread: the regression is undefined")
    slope = float(dx @ dy) / sxx
    intercept = ym - slope * xm
    resid = lr - (intercept + slope * lc)
    rss = float(resid @ resid)
    tss = float(dy @ dy)
    s = math.sqrt(rss / (n - 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        z = resid / s if s > 0.0 else np.full(n, np.nan)
    rho, p = sps.spearmanr(r, c)
    return Selectivity(
        delta_rare=frozen(r),
        delta_common=frozen(c),
        eps=floor,
        n_floored_rare=int(np.count_nonzero(r < floor)),
        n_floored_common=int(np.count_nonzero(c < floor)),
        log_rare=frozen(lr),
        log_common=frozen(lc),
        slope=slope,
        intercept=intercept,
        r_squared=1.0 - rss / tss if tss > 0.0 else math.nan,
        residual=frozen(resid),
        residual_sd=s,
        z=frozen(z),
        spearman_rho=float(rho),
        spearman_p=float(p),
    )


def selective_group(sel: Selectivity, k: int) -> np.ndarray:
    """The ``selective`` group: ids of the ``k`` neurons with the largest residual.

    Ties are broken by the lower id; the result is sorted ascending (``int64``), like the
    ``plateau`` and ``topk`` groups. ``k`` (in ``[1, n]``) is the caller's choice, e.g. the
    plateau size so that the groups compare at equal size.
    """
    n = sel.n_neurons
    if not 1 <= int(k) <= n:
        raise ConfigError(f"k must be in [1, {n}], got {k}")
    return np.sort(_top_k(np.asarray(sel.residual), int(k)))


# ---------------------------------------------------------------------------------------------
# Ratio Δrare / Δcommon with a window-cluster bootstrap interval
# ---------------------------------------------------------------------------------------------


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


def _cluster_labels(clusters: np.ndarray | Sequence[int], n_rows: int, name: str) -> np.ndarray:
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
    ``rows`` (array or memory map) ``chunk_rows`` at a time."""
    n_rows, n_cols = rows.shape
    sums = np.zeros((n_clusters, n_cols), dtype=np.float64)
    for start in range(0, n_rows, chunk_rows):
        stop = min(n_rows, start + chunk_rows)
        block = np.asarray(rows[start:stop], dtype=np.float64)
        if not np.all(np.isfinite(block)):
            raise NumericalError(f"{name} contains NaN or infinite values")
        if (block < 0).any():
            raise ConfigError(f"{name} must hold absolute values |L - L̃| (>= 0)")
        idx = index[start:stop]
        order = np.argsort(idx, kind="stable")
        sidx = idx[order]
        first = np.flatnonzero(np.concatenate(([True], sidx[1:] != sidx[:-1])))
        sums[sidx[first]] += np.add.reduceat(block[order], first, axis=0)
    counts = np.bincount(index, minlength=n_clusters).astype(np.float64)
    return sums, counts


def _multiplicities(rng: np.random.Generator, n_clusters: int, n_boot: int) -> np.ndarray:
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
    rc = _cluster_labels(rare_clusters, rare.shape[0], "rare_clusters")
    cc = _cluster_labels(common_clusters, common.shape[0], "common_clusters")
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
        w_r = _multiplicities(rng, union.size, n_boot)
        w_c = w_r
    else:
        s_r, n_r = _cluster_sums(
            rare, np.searchsorted(ur, rc), ur.size, chunk_rows, "abs_delta_rare_rows"
        )
        s_c, n_c = _cluster_sums(
            common, np.searchsorted(uc, cc), uc.size, chunk_rows, "abs_delta_common_rows"
        )
        w_r = _multiplicities(rng, ur.size, n_boot)
        w_c = _multiplicities(rng, uc.size, n_boot)
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
            qs = _nanquantile_columns(boot, q)  # 0/0 (NaN) resamples are dropped
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


def _nanquantile_columns(x: np.ndarray, q: list[float]) -> np.ndarray:
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
