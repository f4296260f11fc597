"""Attention-routing statistics (paper §3.2, eq. 7–8, §4.4, Table 2).

Three pieces, all on plain arrays (the model wiring computes attention maps and ablated
activations elsewhere):

Attention concentration: Gini coefficient (eq. 7)
-------------------------------------------------
For one query position, the attention weights over its ``n`` *valid* keys are
``α_1 <= ... <= α_n`` (ascending). The standard Gini coefficient is

    G = Σ_i Σ_j |α_i - α_j| / (2 n² ᾱ) = (n + 1) / n - 2 Σ_i (n + 1 - i) α_i / (n Σ α),

0 for uniform attention and ``1 - 1/n`` for attention on a single key. Eq. 7 as printed,
``1 - 2 Σ_i (n + 1 - i) α_i / n``, equals ``G - 1/n`` (it gives ``-1/n`` for uniform
attention, which contradicts its reading as a concentration index that is 0 when nothing is
concentrated), so the default ``variant="standard"`` is the textbook ``G``; ``"paper"``
reproduces eq. 7 verbatim (after normalising ``α`` to sum 1) and ``"corrected"`` is
``G · n / (n - 1)``, which reaches exactly 1 for one-hot attention at every ``n``.

*Causal rows.* Query ``q`` of a causal head can only attend to keys ``0..q``; its masked
keys are not "zero attention" but absent, and counting them would make early rows look
concentrated merely because they are short-padded. Gini is therefore computed over the
valid keys only (``mask``; :func:`causal_mask` builds the usual lower-triangular one).
Rows with fewer than 2 valid keys (the first position) or zero total weight have no defined
concentration and give NaN; the per-head comparisons drop NaNs.

Rare vs common routing
----------------------
:func:`compare_head_gini` takes, for each head ``(layer, head)``, the Gini values at query
positions whose *target* token is rare and at positions whose target is common. Per head:
mean and SD per group, Welch's t-test and the Mann–Whitney U test (two-sided), each
Benjamini–Hochberg-adjusted across heads, and Cohen's d. Across heads: Spearman's ρ between
the per-head rare and common means (the paper's "correlations between attention patterns
for rare versus common tokens across all heads"), and a paired t-test across heads of the
per-head means (the paper's "G_rare = 0.34 ± 0.05 vs G_common = 0.32 ± 0.04, t-test"; heads
are the paired units and ± is the SD across heads — our reading).

Ablation impact (eq. 8)
-----------------------
``Impact(h) = ||a_base - a_abl(h)|| / ||a_base||`` with ``a`` the rare-token neurons'
activations. With activations of shape ``(positions, neurons)`` the norm is the Frobenius
norm over positions × neurons (eq. 8's 2-norm of the flattened matrix): one number per
ablation. :func:`relative_norm_change` gives the *signed* change ``(||a_abl|| - ||a_base||)
/ ||a_base||``, our reading of Table 2's negative "All" column ("activation drops of −45 % to
−50 %"). :func:`compare_impacts` compares two samples of impacts (e.g. top single heads vs
random single heads, or single heads vs whole layers) by Welch's (or a paired) t-test and a
permutation test with the ``(1 + #extreme) / (n_perm + 1)`` correction.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
from scipy import stats

from raretoken.errors import ConfigError, InsufficientDataError, NumericalError
from raretoken.stats._common import (
    finite_or_none,
    finite_scalars_dict,
    from_nan_list,
    frozen,
    nan_if_none,
    nan_list,
    require_seed,
)

logger = logging.getLogger(__name__)

GiniVariant = Literal["standard", "corrected", "paper"]

__all__ = [
    "GiniComparison",
    "ImpactComparison",
    "ablation_impact",
    "benjamini_hochberg",
    "causal_mask",
    "cohens_d",
    "compare_head_gini",
    "compare_impacts",
    "gini",
    "relative_norm_change",
]


# ---------------------------------------------------------------------------------------------
# Gini
# ---------------------------------------------------------------------------------------------


def causal_mask(n_query: int, n_key: int | None = None) -> np.ndarray:
    """Boolean ``(n_query, n_key)`` mask of the keys a causal query may attend to.

    Query ``q`` sees keys ``0 .. q + (n_key - n_query)`` (the queries are the last
    ``n_query`` positions of the key sequence, as with a KV cache).
    """
    nk = n_query if n_key is None else n_key
    if n_query < 1 or nk < n_query:
        raise ConfigError(f"need 1 <= n_query <= n_key, got {n_query}, {nk}")
    q = np.arange(n_query)[:, None] + (nk - n_query)
    return np.arange(nk)[None, :] <= q


def gini(
    weights: np.ndarray,
    axis: int = -1,
    *,
    mask: np.ndarray | None = None,
    variant: GiniVariant = "standard",
) -> np.ndarray:
    """Gini coefficient of attention distributions along ``axis`` (eq. 7).

    Parameters
    ----------
    weights:
        Non-negative attention weights, e.g. ``(..., n_query, n_key)``.
    axis:
        The key axis.
    mask:
        Boolean array broadcastable to ``weights``; ``True`` marks valid keys. Masked keys are
        left out entirely (``n`` counts valid keys only). Default: all keys valid.
    variant:
        ``"standard"`` (0 uniform, ``1 - 1/n`` one-hot), ``"corrected"`` (times
        ``n / (n - 1)``: one-hot gives 1) or ``"paper"`` (eq. 7 verbatim: standard
        ``- 1/n``).

    Returns
    -------
    np.ndarray
        ``weights`` with ``axis`` removed (a 0-d array for 1-D input); NaN for rows with
        fewer than 2 valid keys or zero total weight.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim == 0:
        raise ConfigError("weights must have at least one axis")
    valid = np.ones(w.shape, dtype=bool) if mask is None else np.broadcast_to(mask, w.shape)
    if valid.dtype != np.bool_:
        raise ConfigError("mask must be boolean")
    w = np.moveaxis(w, axis, -1)
    valid = np.moveaxis(valid, axis, -1)
    if not np.isfinite(w[valid]).all():
        raise NumericalError("attention weights contain NaN or infinite values")
    if np.any(w[valid] < 0.0):
        raise NumericalError("attention weights must be non-negative")
    if variant not in ("standard", "corrected", "paper"):
        raise ConfigError(f"unknown Gini variant {variant!r}")
    big_n = w.shape[-1]
    n = valid.sum(axis=-1)
    # masked keys sort first (-inf) and then count as 0; valid rank = position - #masked
    s = np.sort(np.where(valid, w, -np.inf), axis=-1)
    s = np.where(np.isfinite(s), s, 0.0)
    total = s.sum(axis=-1)
    pos = np.arange(1, big_n + 1, dtype=np.float64)
    rank_sum = (s * pos).sum(axis=-1) - (big_n - n) * total  # Σ_i i · α_(i)
    with np.errstate(divide="ignore", invalid="ignore"):
        nf = n.astype(np.float64)
        g = 2.0 * rank_sum / (nf * total) - (nf + 1.0) / nf
        if variant == "corrected":
            g = g * nf / (nf - 1.0)
        elif variant == "paper":
            g = g - 1.0 / nf
    bad = (n < 2) | ~(total > 0.0)
    return np.where(bad, np.nan, g)


# ---------------------------------------------------------------------------------------------
# Multiple testing and effect size
# ---------------------------------------------------------------------------------------------


def benjamini_hochberg(pvalues: np.ndarray | Sequence[float]) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (q-values), same order as the input.

    ``q_(i) = min_{j >= i} min(1, m p_(j) / j)`` over the sorted p-values; NaNs stay NaN and
    do not count towards ``m``.
    """
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    if np.any((p[ok] < 0.0) | (p[ok] > 1.0)):
        raise ConfigError("p-values must lie in [0, 1]")
    pv = p[ok]
    m = pv.size
    if m == 0:
        return out
    order = np.argsort(pv)
    scaled = pv[order] * m / np.arange(1, m + 1)
    q = np.minimum.accumulate(scaled[::-1])[::-1]
    adj = np.empty(m)
    adj[order] = np.minimum(q, 1.0)
    out[ok] = adj
    return out


def cohens_d(a: np.ndarray | Sequence[float], b: np.ndarray | Sequence[float]) -> float:
    """Cohen's d, ``(mean(a) - mean(b)) / s_pooled`` with the ``n - 1`` pooled SD.

    NaN when the pooled SD is 0 or a sample has fewer than 2 values.
    """
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.size < 2 or y.size < 2:
        return math.nan
    pooled = ((x.size - 1) * x.var(ddof=1) + (y.size - 1) * y.var(ddof=1)) / (x.size + y.size - 2)
    if not pooled > 0.0:
        return math.nan
    return float((x.mean() - y.mean()) / math.sqrt(pooled))


# ---------------------------------------------------------------------------------------------
# Rare vs common Gini per head
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class GiniComparison:
    """Per-head comparison of attention Gini at rare- vs common-target query positions.

    Per-head arrays are indexed like :attr:`heads` (rows ``(layer, head)``).

    Attributes
    ----------
    heads:
        ``(n_heads, 2)`` integer array of ``(layer, head)``.
    n_rare, n_common:
        Non-NaN positions per head and group.
    mean_rare, mean_common, sd_rare, sd_common:
        Per-head mean and SD (``ddof=1``) of the Gini values.
    t_welch, p_welch, q_welch:
        Welch's t (rare - common), two-sided p, BH-adjusted p across heads.
    u_mannwhitney, p_mannwhitney, q_mannwhitney:
        Mann–Whitney U of the rare group, two-sided p, BH-adjusted p.
    cohens_d:
        Per-head Cohen's d (rare - common).
    spearman_rho, spearman_p:
        Spearman correlation across heads between ``mean_rare`` and ``mean_common``.
    grand_mean_rare, grand_sd_rare, grand_mean_common, grand_sd_common:
        Mean and SD across heads of the per-head means.
    paired_t, paired_p:
        Paired t-test across heads of ``mean_rare`` vs ``mean_common``.
    variant:
        Gini variant the inputs were computed with (as passed; for the record).
    """

    heads: np.ndarray
    n_rare: np.ndarray
    n_common: np.ndarray
    mean_rare: np.ndarray
    mean_common: np.ndarray
    sd_rare: np.ndarray
    sd_common: np.ndarray
    t_welch: np.ndarray
    p_welch: np.ndarray
    q_welch: np.ndarray
    u_mannwhitney: np.ndarray
    p_mannwhitney: np.ndarray
    q_mannwhitney: np.ndarray
    cohens_d: np.ndarray
    spearman_rho: float
    spearman_p: float
    grand_mean_rare: float
    grand_sd_rare: float
    grand_mean_common: float
    grand_sd_common: float
    paired_t: float
    paired_p: float
    variant: str

    _ARRAYS: ClassVar[tuple[str, ...]] = (
        "mean_rare",
        "mean_common",
        "sd_rare",
        "sd_common",
        "t_welch",
        "p_welch",
        "q_welch",
        "u_mannwhitney",
        "p_mannwhitney",
        "q_mannwhitney",
        "cohens_d",
    )
    _SCALARS: ClassVar[tuple[str, ...]] = (
        "spearman_rho",
        "spearman_p",
        "grand_mean_rare",
        "grand_sd_rare",
        "grand_mean_common",
        "grand_sd_common",
        "paired_t",
        "paired_p",
    )

    @property
    def n_heads(self) -> int:
        return int(self.heads.shape[0])

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "heads": self.heads.tolist(),
            "n_rare": self.n_rare.tolist(),
            "n_common": self.n_common.tolist(),
            "variant": self.variant,
        }
        for name in self._ARRAYS:
            d[name] = nan_list(getattr(self, name))
        for name in self._SCALARS:
            d[name] = finite_or_none(getattr(self, name))
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GiniComparison:
        kw: dict[str, Any] = {
            "heads": frozen(np.asarray(d["heads"], dtype=np.int64).reshape(-1, 2)),
            "n_rare": frozen(np.asarray(d["n_rare"], dtype=np.int64)),
            "n_common": frozen(np.asarray(d["n_common"], dtype=np.int64)),
            "variant": str(d["variant"]),
        }
        for name in cls._ARRAYS:
            kw[name] = frozen(from_nan_list(d[name]))
        for name in cls._SCALARS:
            kw[name] = nan_if_none(d[name])
        return cls(**kw)


def _check_heads(heads: Sequence[tuple[int, int]] | np.ndarray, n: int) -> np.ndarray:
    h = np.asarray(heads)
    if h.shape != (n, 2) or not np.issubdtype(h.dtype, np.integer):
        raise ConfigError(f"heads must be {n} (layer, head) integer pairs, got shape {h.shape}")
    if len({(int(a), int(b)) for a, b in h}) != n:
        raise ConfigError("heads must be unique (layer, head) pairs")
    return h.astype(np.int64)


def _clean(values: np.ndarray | Sequence[float], what: str) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64).ravel()
    if np.isinf(v).any():
        raise NumericalError(f"{what} contains infinite values")
    v = v[~np.isnan(v)]
    if v.size < 2:
        raise InsufficientDataError(f"{what} has {v.size} non-NaN value(s); need >= 2")
    return v


def compare_head_gini(
    rare: Sequence[np.ndarray] | np.ndarray,
    common: Sequence[np.ndarray] | np.ndarray,
    heads: Sequence[tuple[int, int]] | np.ndarray,
    *,
    variant: str = "standard",
) -> GiniComparison:
    """Compare attention concentration at rare- vs common-target positions, head by head.

    Parameters
    ----------
    rare, common:
        One 1-D array of Gini values per head (positions whose target token is rare /
        common); a 2-D ``(n_heads, n_positions)`` array also works. NaNs are dropped.
    heads:
        ``(layer, head)`` of each entry.
    variant:
        Recorded in the result (the Gini variant used upstream).

    Returns
    -------
    GiniComparison
    """
    n_heads = len(rare)
    if len(common) != n_heads:
        raise ConfigError(f"rare has {n_heads} heads but common has {len(common)}")
    if n_heads < 3:
        raise InsufficientDataError(f"need >= 3 heads for across-head statistics, got {n_heads}")
    h = _check_heads(heads, n_heads)
    cols: dict[str, list[float]] = {k: [] for k in GiniComparison._ARRAYS}
    n_r: list[int] = []
    n_c: list[int] = []
    for idx in range(n_heads):
        label = f"head (layer {h[idx, 0]}, head {h[idx, 1]})"
        r = _clean(rare[idx], f"rare Gini of {label}")
        c = _clean(common[idx], f"common Gini of {label}")
        n_r.append(r.size)
        n_c.append(c.size)
        cols["mean_rare"].append(float(r.mean()))
        cols["mean_common"].append(float(c.mean()))
        cols["sd_rare"].append(float(r.std(ddof=1)))
        cols["sd_common"].append(float(c.std(ddof=1)))
        tt = stats.ttest_ind(r, c, equal_var=False)
        cols["t_welch"].append(float(tt.statistic))
        cols["p_welch"].append(float(tt.pvalue))
        mw = stats.mannwhitneyu(r, c, alternative="two-sided")
        cols["u_mannwhitney"].append(float(mw.statistic))
        cols["p_mannwhitney"].append(float(mw.pvalue))
        cols["cohens_d"].append(cohens_d(r, c))
    cols["q_welch"] = benjamini_hochberg(cols["p_welch"]).tolist()
    cols["q_mannwhitney"] = benjamini_hochberg(cols["p_mannwhitney"]).tolist()
    mr = np.asarray(cols["mean_rare"])
    mc = np.asarray(cols["mean_common"])
    if np.ptp(mr) == 0.0 or np.ptp(mc) == 0.0:
        rho, rho_p = math.nan, math.nan
    else:
        sp = stats.spearmanr(mr, mc)
        rho, rho_p = float(sp.statistic), float(sp.pvalue)
    if np.ptp(mr - mc) == 0.0:
        pt, pp = math.nan, math.nan
    else:
        paired = stats.ttest_rel(mr, mc)
        pt, pp = float(paired.statistic), float(paired.pvalue)
    logger.debug("Gini rare %.3f vs common %.3f over %d heads", mr.mean(), mc.mean(), n_heads)
    return GiniComparison(
        heads=frozen(h),
        n_rare=frozen(np.asarray(n_r, dtype=np.int64)),
        n_common=frozen(np.asarray(n_c, dtype=np.int64)),
        **{k: frozen(np.asarray(v, dtype=np.float64)) for k, v in cols.items()},
        spearman_rho=rho,
        spearman_p=rho_p,
        grand_mean_rare=float(mr.mean()),
        grand_sd_rare=float(mr.std(ddof=1)),
        grand_mean_common=float(mc.mean()),
        grand_sd_common=float(mc.std(ddof=1)),
        paired_t=pt,
        paired_p=pp,
        variant=str(variant),
    )


# ---------------------------------------------------------------------------------------------
# Ablation impact (eq. 8)
# ---------------------------------------------------------------------------------------------


def _base_abl(base: np.ndarray, ablated: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    b = np.asarray(base, dtype=np.float64)
    a = np.asarray(ablated, dtype=np.float64)
    if b.shape != a.shape:
        raise ConfigError(f"baseline shape {b.shape} differs from ablated shape {a.shape}")
    if not (np.isfinite(b).all() and np.isfinite(a).all()):
        raise NumericalError("activations contain NaN or infinite values")
    norm = float(np.linalg.norm(b.ravel()))
    if not norm > 0.0:
        raise NumericalError("baseline activations are all zero; relative impact is undefined")
    return b, a, norm


def ablation_impact(base: np.ndarray, ablated: np.ndarray) -> float:
    """Eq. 8: ``||a_base - a_abl||_F / ||a_base||_F`` over all positions × neurons."""
    b, a, norm = _base_abl(base, ablated)
    return float(np.linalg.norm((b - a).ravel()) / norm)


def relative_norm_change(base: np.ndarray, ablated: np.ndarray) -> float:
    """Signed ``(||a_abl||_F - ||a_base||_F) / ||a_base||_F`` (negative = activation drop)."""
    _, a, norm = _base_abl(base, ablated)
    return float(np.linalg.norm(a.ravel()) / norm - 1.0)


@dataclass(frozen=True, eq=False)
class ImpactComparison:
    """Two samples of ablation impacts compared (``a`` minus ``b``).

    Attributes
    ----------
    label_a, label_b:
        Names of the samples (e.g. ``"top_single"``, ``"random_single"``, ``"layer"``).
    n_a, n_b:
        Sample sizes.
    mean_a, mean_b, sd_a, sd_b:
        Means and SDs (``ddof=1``).
    mean_difference:
        ``mean_a - mean_b`` (mean of the differences when paired).
    t, p_t:
        Welch's t (or paired t) and its two-sided p-value.
    p_permutation:
        Two-sided permutation p of ``|mean difference|``: label shuffles (unpaired) or sign
        flips (paired), ``(1 + #{|T*| >= |T|}) / (n_permutations + 1)``.
    n_permutations:
        Permutations drawn.
    cohens_d:
        Cohen's d (pooled SD; for paired data the mean difference over the SD of the
        differences, often called d_z).
    paired:
        Whether the samples were treated as paired.
    """

    label_a: str
    label_b: str
    n_a: int
    n_b: int
    mean_a: float
    mean_b: float
    sd_a: float
    sd_b: float
    mean_difference: float
    t: float
    p_t: float
    p_permutation: float
    n_permutations: int
    cohens_d: float
    paired: bool

    def to_dict(self) -> dict[str, Any]:
        return finite_scalars_dict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ImpactComparison:
        floats: tuple[str, ...] = ("mean_a", "mean_b", "sd_a", "sd_b", "mean_difference")
        floats = (*floats, "t", "p_t", "p_permutation", "cohens_d")
        kw: dict[str, Any] = dict(d)
        for name in floats:
            kw[name] = nan_if_none(d[name])
        return cls(**kw)


def _permutation_p(
    x: np.ndarray, y: np.ndarray, paired: bool, n_perm: int, rng: np.random.Generator
) -> float:
    chunk = max(1, 2_000_000 // max(x.size + y.size, 1))
    extreme = 0
    if paired:
        d = x - y
        obs = abs(d.mean())
        done = 0
        while done < n_perm:
            m = min(chunk, n_perm - done)
            signs = rng.choice(np.array([-1.0, 1.0]), size=(m, d.size))
            extreme += int(np.sum(np.abs((signs * d).mean(axis=1)) >= obs * (1 - 1e-12)))
            done += m
    else:
        pooled = np.concatenate([x, y])
        obs = abs(x.mean() - y.mean())
        done = 0
        while done < n_perm:
            m = min(chunk, n_perm - done)
            perm = rng.permuted(np.broadcast_to(pooled, (m, pooled.size)), axis=1)
            stat = perm[:, : x.size].mean(axis=1) - perm[:, x.size :].mean(axis=1)
            extreme += int(np.sum(np.abs(stat) >= obs * (1 - 1e-12)))
            done += m
    return (1.0 + extreme) / (n_perm + 1.0)


def compare_impacts(
    a: np.ndarray | Sequence[float],
    b: np.ndarray | Sequence[float],
    *,
    seed: int | np.random.Generator,
    labels: tuple[str, str] = ("a", "b"),
    paired: bool = False,
    n_permutations: int = 10_000,
) -> ImpactComparison:
    """Compare two samples of ablation impacts (t-test and permutation test).

    Parameters
    ----------
    a, b:
        Impacts (e.g. eq. 8 per ablated head, or per batch of prompts).
    seed:
        Seed or Generator for the permutations.
    labels:
        Names of ``a`` and ``b`` for the record.
    paired:
        Treat ``a[i]`` and ``b[i]`` as paired (same prompts): paired t-test and sign-flip
        permutations. Otherwise Welch's t-test and label permutations.
    n_permutations:
        Number of random permutations (``>= 1``).
    """
    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise NumericalError("impacts contain NaN or infinite values")
    if x.size < 2 or y.size < 2:
        raise InsufficientDataError(f"need >= 2 impacts per sample, got {x.size} and {y.size}")
    if paired and x.size != y.size:
        raise ConfigError(f"paired samples differ in size: {x.size} vs {y.size}")
    if n_permutations < 1:
        raise ConfigError(f"n_permutations must be >= 1, got {n_permutations}")
    rng = require_seed(seed, "compare_impacts")
    with np.errstate(divide="ignore", invalid="ignore"):
        if paired:
            d = x - y
            res = stats.ttest_rel(x, y)
            sd_d = float(d.std(ddof=1))
            eff = float(d.mean() / sd_d) if sd_d > 0 else math.nan
        else:
            res = stats.ttest_ind(x, y, equal_var=False)
            eff = cohens_d(x, y)
    p_perm = _permutation_p(x, y, paired, int(n_permutations), rng)
    return ImpactComparison(
        label_a=str(labels[0]),
        label_b=str(labels[1]),
        n_a=int(x.size),
        n_b=int(y.size),
        mean_a=float(x.mean()),
        mean_b=float(y.mean()),
        sd_a=float(x.std(ddof=1)),
        sd_b=float(y.std(ddof=1)),
        mean_difference=float(x.mean() - y.mean()),
        t=float(res.statistic),
        p_t=float(res.pvalue),
        p_permutation=float(p_perm),
        n_permutations=int(n_permutations),
        cohens_d=eff,
        paired=bool(paired),
    )
