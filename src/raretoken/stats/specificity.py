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

The ratio ``Δrare / Δcommon`` per neuron with a window-cluster bootstrap interval is
:func:`raretoken.stats.cluster_bootstrap.ratio_interval`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats as sps

from raretoken.errors import ConfigError, InsufficientDataError, NumericalError
from raretoken.stats._common import finite_or_none, frozen, nan_list
from raretoken.stats._common import fmt_number as _fmt

__all__ = [
    "Selectivity",
    "TopOverlap",
    "selective_group",
    "selectivity",
    "top_overlap",
]


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
