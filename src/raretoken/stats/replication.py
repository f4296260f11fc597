"""Does the plateau replicate? Split-half replication of the rare-token neuron set.

The plateau of the rare-token Δloss rank curve (paper §4.1,
:func:`raretoken.stats.regimes.fit_regimes`) is a set of neurons found on one sample of
scored positions. A set that is a property of the model, not of the sample, is found again on
independent data. This module splits the scored *windows* (the unit of sampling: positions of
one window share their context) into two disjoint halves, identifies the plateau on each and
compares the two.

Method
------
1. :func:`split_windows`: the distinct window ids are permuted with an explicit seed; the first
   ``floor(W / 2)`` form half A, the rest half B (equal sizes ±1). Every position follows its
   window.
2. Per half, ``Δloss`` is the column mean of the ``|L - L̃(i)|`` rows of that half (read in
   chunks, so a memory map of many rows is fine) and the regime fit is run on it.
3. Overlap of the two plateaus: the Jaccard index ``|A ∩ B| / |A ∪ B|`` (:func:`jaccard`)
   against its exact expectation for two independent uniformly random groups of the same
   sizes (:func:`expected_jaccard`: for sizes ``a``, ``b`` out of ``n`` the intersection ``I``
   is hypergeometric and ``E[J] = Σ_i P(I = i) · i / (a + b - i)``). Because ``J`` increases
   with ``I`` at fixed sizes, ``P(J_random >= J_obs) = P(I >= i_obs)`` exactly (hypergeometric
   tail: :attr:`Replication.p_value`). A Monte Carlo p-value from ``n_random`` seeded pairs of
   random groups, ``(1 + #{J_r >= J_obs}) / (1 + n_random)``, is reported next to it
   (:attr:`Replication.p_value_empirical`) as a check.
4. Rank agreement: Spearman ρ of the two halves' Δloss over all neurons.

Rule for :attr:`Replication.replicates`
---------------------------------------
The plateau replicates when

* both halves have a plateau;
* the overlap is significantly above random: exact p-value ``< alpha`` (default 0.05); and
* the overlap is substantial: ``J >= min_jaccard`` (default 0.5; for equal sizes that is at
  least two thirds of each half's plateau shared).

The second condition alone is too weak for sets of ~1 % of the layer: two random 56-neuron
groups out of 1536 have ``E[J] ≈ 0.02``, so sharing a handful of neurons is already
"significant". The third makes the verdict about *the same neurons* being found. When a half
has no plateau the overlap fields are ``None``, ``replicates`` is ``False`` and
:attr:`Replication.note` says which half.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats as sps

from raretoken.errors import ConfigError, InsufficientDataError, NumericalError
from raretoken.stats._common import finite_or_none, frozen, nan_list, require_seed
from raretoken.stats._common import fmt_number as _fmt
from raretoken.stats.regimes import RegimeFit, fit_regimes

logger = logging.getLogger(__name__)

__all__ = [
    "Replication",
    "expected_jaccard",
    "jaccard",
    "replicate_plateau",
    "split_windows",
]

#: A regime fit: ``fit(delta, neuron_ids)`` with ``.has_plateau`` and ``.plateau_neurons``.
FitFn = Callable[[np.ndarray, np.ndarray], RegimeFit]


def _window_ids(window_ids: np.ndarray | Sequence[int]) -> np.ndarray:
    w = np.asarray(window_ids)
    if w.ndim != 1 or (w.size and not np.issubdtype(w.dtype, np.integer)):
        raise ConfigError("window_ids must be a 1-D array of integer window ids")
    return w.astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Split, Jaccard
# ---------------------------------------------------------------------------------------------


def split_windows(
    window_ids: np.ndarray | Sequence[int], seed: int | np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of the distinct windows into two halves; positions follow their window.

    The distinct ids (ascending) are permuted by ``rng.permutation``; the first
    ``floor(W / 2)`` windows form half A and the other ``ceil(W / 2)`` half B.

    Returns
    -------
    (half_a_mask, half_b_mask)
        Boolean masks over the positions (``window_ids``), complementary.

    Raises
    ------
    ConfigError
        Non-integer or non-1-D ids, or no seed.
    InsufficientDataError
        Fewer than 2 distinct windows.
    """
    w = _window_ids(window_ids)
    uniq, inv = np.unique(w, return_inverse=True)
    if uniq.size < 2:
        raise InsufficientDataError(f"a split-half replication needs >= 2 windows, got {uniq.size}")
    rng = require_seed(seed, "split_windows")
    perm = rng.permutation(uniq.size)
    in_a = np.zeros(uniq.size, dtype=bool)
    in_a[perm[: uniq.size // 2]] = True
    mask_a = in_a[inv.ravel()]
    return mask_a, ~mask_a


def jaccard(a: np.ndarray | Sequence[int], b: np.ndarray | Sequence[int]) -> float:
    """``|A ∩ B| / |A ∪ B|`` of two id sets (duplicates ignored); NaN when both are empty."""
    sa = np.unique(np.asarray(a))
    sb = np.unique(np.asarray(b))
    union = np.union1d(sa, sb).size
    if union == 0:
        return math.nan
    return float(np.intersect1d(sa, sb).size / union)


def expected_jaccard(n: int, size_a: int, size_b: int) -> float:
    """Exact ``E[J]`` of two independent uniformly random subsets of sizes ``a`` and ``b``
    of ``n`` items: ``Σ_i P(I = i) · i / (a + b - i)`` with ``I ~ Hypergeom(n, a, b)``.

    NaN when ``a = b = 0`` (the Jaccard index of two empty sets is undefined).

    Raises
    ------
    ConfigError
        ``n < 1`` or a size outside ``[0, n]``.
    """
    n, a, b = int(n), int(size_a), int(size_b)
    if n < 1:
        raise ConfigError(f"n must be >= 1, got {n}")
    if not (0 <= a <= n and 0 <= b <= n):
        raise ConfigError(f"set sizes must lie in [0, {n}], got {a} and {b}")
    if a == 0 and b == 0:
        return math.nan
    i = np.arange(max(0, a + b - n), min(a, b) + 1)
    pmf = sps.hypergeom(n, a, b).pmf(i)
    return float(np.sum(pmf * i / (a + b - i)))


# ---------------------------------------------------------------------------------------------
# Result
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Replication:
    """Split-half replication of the plateau (see the module docstring).

    Attributes
    ----------
    seed:
        The int seed (``None`` when a Generator was passed).
    n_neurons:
        Number of neurons (columns).
    n_windows_a, n_windows_b, n_rows_a, n_rows_b:
        Windows and rows (positions) in each half.
    delta_a, delta_b:
        Δloss (column mean) per neuron id in each half.
    has_plateau_a, has_plateau_b:
        Whether the fit found a plateau in each half.
    plateau_a, plateau_b:
        Plateau neuron ids of each half, ascending (empty without a plateau).
    spearman_rho, spearman_p:
        Spearman correlation of ``delta_a`` and ``delta_b`` over all neurons.
    overlap:
        ``|A ∩ B|`` (``None`` unless both halves have a plateau; so are the fields below).
    jaccard, expected_jaccard:
        Observed Jaccard index and its exact expectation for random groups of the same sizes.
    p_value:
        Exact ``P(J_random >= J_obs)`` (hypergeometric tail of the intersection).
    p_value_empirical:
        ``(1 + #{J_r >= J_obs}) / (1 + n_random)`` over ``n_random`` random pairs.
    random_jaccard_mean:
        Mean Jaccard of those random pairs (a check of ``expected_jaccard``).
    n_random, alpha, min_jaccard:
        Settings of the test and of the rule.
    significant:
        ``p_value < alpha`` (``False`` without two plateaus).
    replicates:
        Both halves have a plateau, ``significant`` and ``jaccard >= min_jaccard``.
    note:
        Plain-language verdict.
    """

    seed: int | None
    n_neurons: int
    n_windows_a: int
    n_windows_b: int
    n_rows_a: int
    n_rows_b: int
    delta_a: np.ndarray
    delta_b: np.ndarray
    has_plateau_a: bool
    has_plateau_b: bool
    plateau_a: np.ndarray
    plateau_b: np.ndarray
    spearman_rho: float
    spearman_p: float
    overlap: int | None
    jaccard: float | None
    expected_jaccard: float | None
    p_value: float | None
    p_value_empirical: float | None
    random_jaccard_mean: float | None
    n_random: int
    alpha: float
    min_jaccard: float
    significant: bool
    replicates: bool
    note: str

    @property
    def plateau_size_a(self) -> int:
        return int(self.plateau_a.size)

    @property
    def plateau_size_b(self) -> int:
        return int(self.plateau_b.size)

    def to_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "n_neurons": self.n_neurons,
            "n_windows_a": self.n_windows_a,
            "n_windows_b": self.n_windows_b,
            "n_rows_a": self.n_rows_a,
            "n_rows_b": self.n_rows_b,
            "delta_a": nan_list(self.delta_a),
            "delta_b": nan_list(self.delta_b),
            "has_plateau_a": self.has_plateau_a,
            "has_plateau_b": self.has_plateau_b,
            "plateau_a": self.plateau_a.tolist(),
            "plateau_b": self.plateau_b.tolist(),
            "spearman_rho": finite_or_none(self.spearman_rho),
            "spearman_p": finite_or_none(self.spearman_p),
            "overlap": self.overlap,
            "jaccard": finite_or_none(self.jaccard),
            "expected_jaccard": finite_or_none(self.expected_jaccard),
            "p_value": finite_or_none(self.p_value),
            "p_value_empirical": finite_or_none(self.p_value_empirical),
            "random_jaccard_mean": finite_or_none(self.random_jaccard_mean),
            "n_random": self.n_random,
            "alpha": self.alpha,
            "min_jaccard": self.min_jaccard,
            "significant": self.significant,
            "replicates": self.replicates,
            "note": self.note,
        }

    def to_markdown(self) -> str:
        def size(has: bool, ids: np.ndarray) -> str:
            return str(ids.size) if has else "no plateau"

        table = (
            "| | half A | half B |\n|---|---:|---:|\n"
            f"| windows | {self.n_windows_a} | {self.n_windows_b} |\n"
            f"| positions | {self.n_rows_a} | {self.n_rows_b} |\n"
            f"| plateau neurons | {size(self.has_plateau_a, self.plateau_a)} | "
            f"{size(self.has_plateau_b, self.plateau_b)} |\n"
        )
        if self.jaccard is not None:
            line = (
                f"Shared plateau neurons: {self.overlap}; Jaccard = {_fmt(self.jaccard)} "
                f"(random groups of the same sizes: {_fmt(self.expected_jaccard)}; "
                f"p = {_fmt(self.p_value)} exact, {_fmt(self.p_value_empirical)} from "
                f"{self.n_random} random pairs). "
            )
        else:
            line = ""
        line += (
            f"Spearman ρ of the halves' Δloss over {self.n_neurons} neurons = "
            f"{_fmt(self.spearman_rho)}. **{'Replicates' if self.replicates else 'Does not replicate'}**"
            f" (rule: plateau in both halves, p < {_fmt(self.alpha)}, "
            f"Jaccard >= {_fmt(self.min_jaccard)}): {self.note}"
        )
        return table + "\n" + line + "\n"


# ---------------------------------------------------------------------------------------------
# Replication
# ---------------------------------------------------------------------------------------------


def _half_means(
    rows: np.ndarray, mask_a: np.ndarray, chunk_rows: int
) -> tuple[np.ndarray, np.ndarray]:
    """Float64 column means of the rows in ``mask_a`` and of the others, ``chunk_rows`` rows
    at a time (a memory map is read chunk by chunk)."""
    n_rows, n_cols = rows.shape
    sum_a = np.zeros(n_cols, dtype=np.float64)
    sum_b = np.zeros(n_cols, dtype=np.float64)
    for start in range(0, n_rows, chunk_rows):
        stop = min(n_rows, start + chunk_rows)
        block = np.asarray(rows[start:stop], dtype=np.float64)
        if not np.all(np.isfinite(block)):
            raise NumericalError("abs_delta_rows contains NaN or infinite values")
        if (block < 0).any():
            raise ConfigError("abs_delta_rows must hold absolute values |L - L̃| (>= 0)")
        m = mask_a[start:stop]
        sum_a += block[m].sum(axis=0)
        sum_b += block[~m].sum(axis=0)
    n_a = int(np.count_nonzero(mask_a))
    return sum_a / n_a, sum_b / (n_rows - n_a)


def _random_intersections(
    rng: np.random.Generator, n: int, a: int, b: int, n_random: int
) -> np.ndarray:
    """Intersection sizes of ``n_random`` independent pairs of uniform random groups."""
    out = np.empty(n_random, dtype=np.int64)
    for r in range(n_random):
        ma = np.zeros(n, dtype=bool)
        ma[rng.choice(n, size=a, replace=False)] = True
        out[r] = int(np.count_nonzero(ma[rng.choice(n, size=b, replace=False)]))
    return out


def replicate_plateau(
    abs_delta_rows: np.ndarray,
    window_ids: np.ndarray | Sequence[int],
    seed: int | np.random.Generator,
    fit: FitFn = fit_regimes,
    *,
    n_random: int = 1000,
    alpha: float = 0.05,
    min_jaccard: float = 0.5,
    chunk_rows: int = 4096,
) -> Replication:
    """Split-half replication of the plateau (see the module docstring for the rule).

    Parameters
    ----------
    abs_delta_rows:
        ``(n_rows, n_neurons)`` values ``|L - L̃(i)|`` per scored (rare-target) position; an
        array or a memory map (read ``chunk_rows`` rows at a time).
    window_ids:
        Window id of every row.
    seed:
        Int seed or Generator (required): the split, then the random groups.
    fit:
        Regime fit, called as ``fit(delta, neuron_ids)`` with ``neuron_ids = 0..n-1`` (e.g.
        ``functools.partial(fit_regimes, min_plateau_step=0.2)``).
    n_random:
        Pairs of random groups for the Monte Carlo p-value (>= 1).
    alpha:
        Significance level of the overlap test, in ``(0, 1)``.
    min_jaccard:
        Least Jaccard index for the plateau to count as replicated, in ``[0, 1]``.
    chunk_rows:
        Rows read at a time.

    Raises
    ------
    ConfigError
        Bad shapes, ids or settings; negative values.
    InsufficientDataError
        Fewer than 2 windows (and whatever ``fit`` raises for a half).
    NumericalError
        Non-finite values.
    """
    rows = abs_delta_rows
    if not hasattr(rows, "ndim") or not hasattr(rows, "shape"):
        rows = np.asarray(rows)
    if rows.ndim != 2:
        raise ConfigError(f"abs_delta_rows must be 2-D (rows, neurons), got shape {rows.shape}")
    n_rows, n_neu = (int(v) for v in rows.shape)
    w = _window_ids(window_ids)
    if w.size != n_rows:
        raise ConfigError(f"window_ids has {w.size} entries for {n_rows} rows")
    if int(n_random) < 1:
        raise ConfigError(f"n_random must be >= 1, got {n_random}")
    if not 0.0 < float(alpha) < 1.0:
        raise ConfigError(f"alpha must be in (0, 1), got {alpha}")
    if not 0.0 <= float(min_jaccard) <= 1.0:
        raise ConfigError(f"min_jaccard must be in [0, 1], got {min_jaccard}")
    if int(chunk_rows) < 1:
        raise ConfigError(f"chunk_rows must be >= 1, got {chunk_rows}")
    rng = require_seed(seed, "replicate_plateau")
    mask_a, _ = split_windows(w, rng)
    delta_a, delta_b = _half_means(rows, mask_a, int(chunk_rows))
    ids = np.arange(n_neu, dtype=np.int64)
    fit_a, fit_b = fit(delta_a, ids), fit(delta_b, ids)
    has_a, has_b = bool(fit_a.has_plateau), bool(fit_b.has_plateau)
    none = np.empty(0, dtype=np.int64)
    pa = np.sort(np.asarray(fit_a.plateau_neurons, dtype=np.int64)) if has_a else none
    pb = np.sort(np.asarray(fit_b.plateau_neurons, dtype=np.int64)) if has_b else none
    rho, rho_p = sps.spearmanr(delta_a, delta_b)

    overlap: int | None = None
    jac: float | None = None
    e_jac: float | None = None
    p: float | None = None
    p_emp: float | None = None
    r_mean: float | None = None
    significant = replicates = False
    if has_a and has_b:
        a, b = int(pa.size), int(pb.size)
        overlap = int(np.intersect1d(pa, pb).size)
        jac = overlap / (a + b - overlap)
        e_jac = expected_jaccard(n_neu, a, b)
        p = float(sps.hypergeom(n_neu, a, b).sf(overlap - 1))
        inter = _random_intersections(rng, n_neu, a, b, int(n_random))
        # J increases with the intersection at fixed sizes: compare integers, not floats
        p_emp = (1.0 + np.count_nonzero(inter >= overlap)) / (1.0 + int(n_random))
        r_mean = float(np.mean(inter / (a + b - inter)))
        significant = p < float(alpha)
        replicates = significant and jac >= float(min_jaccard)
        if replicates:
            note = (
                f"the two halves share {overlap} plateau neurons (Jaccard {_fmt(jac)} vs "
                f"{_fmt(e_jac)} for random groups)"
            )
        elif significant:
            note = (
                f"the overlap is above random (p = {_fmt(p)}) but small: Jaccard "
                f"{_fmt(jac)} < {_fmt(float(min_jaccard))}"
            )
        else:
            note = f"the overlap is not above random (p = {_fmt(p)} >= {_fmt(float(alpha))})"
    else:
        if has_a or has_b:
            note = f"no plateau in half {'B' if has_a else 'A'}"
        else:
            note = "no plateau in either half"
    logger.info("plateau replication: %s", note)
    n_windows_a = int(np.unique(w[mask_a]).size)
    return Replication(
        seed=None if isinstance(seed, np.random.Generator) else int(seed),
        n_neurons=n_neu,
        n_windows_a=n_windows_a,
        n_windows_b=int(np.unique(w).size) - n_windows_a,
        n_rows_a=int(np.count_nonzero(mask_a)),
        n_rows_b=int(n_rows - np.count_nonzero(mask_a)),
        delta_a=frozen(delta_a),
        delta_b=frozen(delta_b),
        has_plateau_a=has_a,
        has_plateau_b=has_b,
        plateau_a=frozen(pa),
        plateau_b=frozen(pb),
        spearman_rho=float(rho),
        spearman_p=float(rho_p),
        overlap=overlap,
        jaccard=jac,
        expected_jaccard=e_jac,
        p_value=p,
        p_value_empirical=p_emp,
        random_jaccard_mean=r_mean,
        n_random=int(n_random),
        alpha=float(alpha),
        min_jaccard=float(min_jaccard),
        significant=bool(significant),
        replicates=bool(replicates),
        note=note,
    )
