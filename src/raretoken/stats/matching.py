"""Random groups of neurons matched to a neuron group on per-neuron covariates.

A group of neurons (the rare-token plateau) can differ from uniform random groups of the same
layer simply because its members have, say, larger output weights or larger activations. This
module draws random groups matched to the group on a chosen set of per-neuron covariates
(:func:`matched_random_groups`; e.g. columns of
:meth:`raretoken.stats.covariates.NeuronCovariates.columns`), to be compared next to the
uniform random groups of :func:`raretoken.stats.baselines.random_groups`.

The function is pure: the caller passes the covariates as ``name -> (n_neurons,)`` arrays and
an explicit seed or Generator.

Matched random groups (:func:`matched_random_groups`)
-----------------------------------------------------
Exact matching on coarsened covariates (coarsened exact matching, Iacus, King & Porro 2012),
in the spirit of Gurnee et al. 2024, whose baseline neurons are drawn within quantile cuts
of weight norm and vocabulary variance (universal-neurons ``analysis/entropy_neurons.py:
sample_baseline_neurons``) and whose neuron properties are compared as within-layer
percentiles:

1. **Bins.** Each covariate ``x`` is cut into ``B = n_bins`` quantile bins over *all* neurons:
   inner edges ``e_j = quantile(x, j / B)`` (linear interpolation, ``j = 1..B-1``), fine code
   ``c = #{j : e_j <= x}`` in ``[0, B)`` (tied values share a bin).
2. **Cells.** A group member's cell is the set of neurons that share its code on every
   covariate. A level-``l`` coarsening of a covariate merges ``2^l`` adjacent fine bins
   (code ``c >> l``); at level ``L = ceil(log2 B)`` the covariate is ignored.
3. **Fallback.** The candidates of member ``m`` are the pool neurons (all neurons minus the
   group and ``exclude``) in its cell. A cell is large enough when it holds at least as many
   candidates as there are group members whose cells intersect it (itself included); at full
   resolution this is "at least as many candidates as group members in the same cell". While
   a member's cell is too small, that member's finest covariate is coarsened by one level (ties:
   the covariate listed *last* first, so the first covariate keeps its resolution longest),
   and the check is repeated for all members until no cell is too small. The members that
   needed it are counted in ``n_coarsened``; ``levels`` records each member's level per
   covariate. The rule guarantees that the draws below never run out of candidates.
4. **Draws.** For each of ``n_groups`` random groups, member ``m`` (in ascending id order)
   gets a neuron drawn uniformly from its candidates not yet drawn for this group (without
   replacement within a group; groups are independent). Column ``j`` of ``groups`` is the
   control of ``group[j]``.
5. **Balance.** Per covariate: the group mean, the mean over all matched controls, the mean
   over all neurons, and standardised mean differences ``SMD = (group mean - other mean) /
   sd_all`` with ``sd_all`` the SD over all neurons (``ddof=1``; one fixed scale, so matched
   and unmatched SMDs are comparable; Stuart 2010 recommends |SMD| < 0.1–0.25).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from raretoken.errors import ConfigError, InsufficientDataError
from raretoken.stats._common import (
    finite_scalars_dict,
    from_nan_list,
    frozen,
    nan_if_none,
    nan_list,
    require_seed,
)

logger = logging.getLogger(__name__)

__all__ = [
    "CovariateBalance",
    "MatchedGroups",
    "matched_random_groups",
]


@dataclass(frozen=True)
class CovariateBalance:
    """Balance of one covariate between the group and its matched controls.

    ``smd_matched = (group_mean - matched_mean) / all_sd`` and
    ``smd_all = (group_mean - all_mean) / all_sd`` (what uniform random groups give on
    average, up to the group's own share of the neurons); ``all_sd`` over all neurons,
    ``ddof=1``. NaN when ``all_sd`` is 0.
    """

    name: str
    group_mean: float
    matched_mean: float
    all_mean: float
    all_sd: float
    smd_matched: float
    smd_all: float

    def to_dict(self) -> dict[str, Any]:
        return finite_scalars_dict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CovariateBalance:
        floats = ("group_mean", "matched_mean", "all_mean", "all_sd", "smd_matched", "smd_all")
        kw: dict[str, Any] = {f: nan_if_none(d[f]) for f in floats}
        return cls(name=str(d["name"]), **kw)


@dataclass(frozen=True, eq=False)
class MatchedGroups:
    """Random groups matched to a neuron group on quantile-binned covariates.

    Attributes
    ----------
    groups:
        ``int64`` ``(n_groups, |group|)``; column ``j`` holds the controls of ``group[j]``
        (rows are *not* sorted, to keep that pairing).
    group:
        The group's neuron ids, ascending.
    covariate_names:
        Covariates matched on, in priority order (the first is coarsened last).
    n_bins:
        Quantile bins per covariate at full resolution.
    bin_edges:
        Per covariate, the ``n_bins - 1`` inner quantile edges over all neurons.
    levels:
        ``int64`` ``(|group|, n_covariates)``: coarsening level of each member's cell per
        covariate (0: full resolution; ``l``: ``2^l`` adjacent bins merged).
    n_candidates:
        Pool neurons in each member's (final) cell.
    n_coarsened:
        Members whose cell had to be coarsened.
    n_pool:
        Neurons available as controls (all minus the group and ``exclude``).
    balance:
        One :class:`CovariateBalance` per covariate.
    """

    groups: np.ndarray
    group: np.ndarray
    covariate_names: tuple[str, ...]
    n_bins: int
    bin_edges: tuple[np.ndarray, ...]
    levels: np.ndarray
    n_candidates: np.ndarray
    n_coarsened: int
    n_pool: int
    balance: tuple[CovariateBalance, ...]

    def balance_table(self) -> dict[str, dict[str, float]]:
        """``{covariate: {group_mean, matched_mean, all_mean, all_sd, smd_matched, smd_all}}``."""
        return {b.name: {k: v for k, v in vars(b).items() if k != "name"} for b in self.balance}

    def to_dict(self) -> dict[str, Any]:
        return {
            "groups": self.groups.tolist(),
            "group": self.group.tolist(),
            "covariate_names": list(self.covariate_names),
            "n_bins": self.n_bins,
            "bin_edges": [nan_list(e) for e in self.bin_edges],
            "levels": self.levels.tolist(),
            "n_candidates": self.n_candidates.tolist(),
            "n_coarsened": self.n_coarsened,
            "n_pool": self.n_pool,
            "balance": [b.to_dict() for b in self.balance],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MatchedGroups:
        names = tuple(str(n) for n in d["covariate_names"])
        k = len(d["group"])
        return cls(
            groups=frozen(np.asarray(d["groups"], dtype=np.int64).reshape(-1, k)),
            group=frozen(d["group"], dtype=np.int64),
            covariate_names=names,
            n_bins=int(d["n_bins"]),
            bin_edges=tuple(from_nan_list(e) for e in d["bin_edges"]),
            levels=frozen(np.asarray(d["levels"], dtype=np.int64).reshape(k, len(names))),
            n_candidates=frozen(d["n_candidates"], dtype=np.int64),
            n_coarsened=int(d["n_coarsened"]),
            n_pool=int(d["n_pool"]),
            balance=tuple(CovariateBalance.from_dict(b) for b in d["balance"]),
        )


def _quantile_codes(x: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Inner edges ``quantile(x, j/B)`` and codes ``#{edges <= x}`` in ``[0, B)``."""
    edges = np.quantile(x, np.arange(1, n_bins) / n_bins) if n_bins > 1 else np.empty(0)
    codes = np.searchsorted(edges, x, side="right").astype(np.int64)
    return edges, codes


def _validated_covariates(covariates: Mapping[str, Any]) -> tuple[tuple[str, ...], np.ndarray]:
    if not isinstance(covariates, Mapping) or len(covariates) == 0:
        raise ConfigError("covariates must be a non-empty mapping name -> (n_neurons,) array")
    names = tuple(str(k) for k in covariates)
    cols = []
    n: int | None = None
    for name, values in covariates.items():
        try:
            arr = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"covariate {name!r} is not numeric") from err
        if arr.ndim != 1:
            raise ConfigError(f"covariate {name!r} must be 1-D, got shape {arr.shape}")
        if n is None:
            n = arr.size
        elif arr.size != n:
            raise ConfigError(
                f"covariate {name!r} has {arr.size} values, the first covariate has {n}"
            )
        if not np.isfinite(arr).all():
            raise ConfigError(f"covariate {name!r} has NaN or infinite values")
        cols.append(arr)
    x = np.stack(cols, axis=1)
    if x.shape[0] < 2:
        raise ConfigError(f"need covariates of >= 2 neurons, got {x.shape[0]}")
    return names, x


def _validated_ids(ids: Any, n: int, what: str, *, allow_outside: bool) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.size == 0:
        return np.empty(0, dtype=np.int64)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ConfigError(f"{what} must be a 1-D sequence of integers")
    arr = arr.astype(np.int64)
    if allow_outside:
        return arr[(arr >= 0) & (arr < n)]
    if arr.min() < 0 or arr.max() >= n:
        raise ConfigError(f"{what} must lie in [0, {n}) (the covariates' length)")
    return arr


def _cells_intersect(lo: np.ndarray, hi: np.ndarray, m: int) -> np.ndarray:
    """Members whose cells (boxes ``[lo, hi]`` in fine codes) intersect member ``m``'s."""
    return np.all((lo <= hi[m]) & (lo[m] <= hi), axis=1)


def matched_random_groups(
    group_ids: Sequence[int] | np.ndarray,
    covariates: Mapping[str, Any],
    n_groups: int,
    *,
    seed: int | np.random.Generator,
    n_bins: int = 5,
    exclude: Sequence[int] | np.ndarray = (),
) -> MatchedGroups:
    """Random groups matched to ``group_ids`` on quantile-binned covariates.

    See the module docstring for the binning, the coarsening fallback, the draws and the balance
    table.

    Parameters
    ----------
    group_ids:
        The group's neuron ids (indices into the covariate arrays), unique.
    covariates:
        ``name -> (n_neurons,)`` finite values, e.g. ``{"w_out_norm": ..., "act_abs_mean":
        ...}`` from :meth:`NeuronCovariates.columns`; the order is the matching priority.
    n_groups:
        Number of random groups.
    seed:
        Seed or Generator (required).
    n_bins:
        Quantile bins per covariate (``B``); ``B^{#covariates}`` cells at full resolution.
    exclude:
        Further ids never drawn (the group is always excluded); ids outside ``[0, n)`` are
        ignored.

    Raises
    ------
    ConfigError
        Group ids out of range, repeated or empty; covariates of different lengths, not 1-D or
        not finite; ``n_groups < 1``; ``n_bins < 1``; no seed.
    InsufficientDataError
        Fewer neurons left after exclusion than the group has members.
    """
    names, x = _validated_covariates(covariates)
    n, n_cov = x.shape
    group = _validated_ids(group_ids, n, "group_ids", allow_outside=False)
    if group.size == 0:
        raise ConfigError("group_ids is empty")
    if np.unique(group).size != group.size:
        raise ConfigError("group_ids must be unique")
    group = np.sort(group)
    if isinstance(n_groups, bool) or int(n_groups) != n_groups or n_groups < 1:
        raise ConfigError(f"n_groups must be an integer >= 1, got {n_groups}")
    if isinstance(n_bins, bool) or int(n_bins) != n_bins or n_bins < 1:
        raise ConfigError(f"n_bins must be an integer >= 1, got {n_bins}")
    n_groups, n_bins = int(n_groups), int(n_bins)
    rng = require_seed(seed, "matched_random_groups")
    extra = _validated_ids(exclude, n, "exclude", allow_outside=True)

    in_pool = np.ones(n, dtype=bool)
    in_pool[group] = False
    in_pool[extra] = False
    n_pool = int(in_pool.sum())
    size = group.size
    if n_pool < size:
        raise InsufficientDataError(
            f"cannot match {size} neurons from {n_pool} neurons left after exclusion"
        )

    edges: list[np.ndarray] = []
    codes = np.empty((n, n_cov), dtype=np.int64)
    for c in range(n_cov):
        e, codes[:, c] = _quantile_codes(x[:, c], n_bins)
        edges.append(frozen(e))
    max_level = math.ceil(math.log2(n_bins)) if n_bins > 1 else 0
    pool_codes = codes[in_pool]
    pool_ids = np.flatnonzero(in_pool)
    member_codes = codes[group]
    levels = np.zeros((size, n_cov), dtype=np.int64)

    def box(m: int) -> tuple[np.ndarray, np.ndarray]:
        lo = (member_codes[m] >> levels[m]) << levels[m]
        return lo, lo + (np.int64(1) << levels[m]) - 1

    def candidates(m: int) -> np.ndarray:
        lo, hi = box(m)
        inside = np.all((pool_codes >= lo) & (pool_codes <= hi), axis=1)
        return pool_ids[inside]

    # Fixed point: coarsen until every cell holds >= as many candidates as the group members
    # whose cells intersect it (then sequential draws without replacement cannot run out).
    changed = True
    while changed:
        changed = False
        boxes = [box(m) for m in range(size)]
        lo_all = np.stack([b[0] for b in boxes])
        hi_all = np.stack([b[1] for b in boxes])
        for m in range(size):
            while candidates(m).size < int(_cells_intersect(lo_all, hi_all, m).sum()):
                finest = levels[m].min()
                if finest >= max_level:  # cannot happen: the full cell holds n_pool >= size
                    raise InsufficientDataError("matching cells cannot be made large enough")
                c = int(np.flatnonzero(levels[m] == finest)[-1])
                levels[m, c] += 1
                lo_all[m], hi_all[m] = box(m)
                changed = True

    cands = [candidates(m) for m in range(size)]
    n_candidates = np.array([c.size for c in cands], dtype=np.int64)
    n_coarsened = int(np.count_nonzero(levels.any(axis=1)))
    if n_coarsened:
        logger.info(
            "matched groups: %d of %d members needed coarser cells (levels %s)",
            n_coarsened,
            size,
            levels.max(axis=0).tolist(),
        )

    out = np.empty((n_groups, size), dtype=np.int64)
    taken = np.zeros(n, dtype=bool)
    for g in range(n_groups):
        for m in range(size):
            cand = cands[m]
            avail = cand[~taken[cand]]
            pick = int(avail[rng.integers(avail.size)])
            taken[pick] = True
            out[g, m] = pick
        taken[out[g]] = False

    balance = []
    for c, name in enumerate(names):
        col = x[:, c]
        g_mean = float(col[group].mean())
        m_mean = float(col[out].mean())
        a_mean = float(col.mean())
        a_sd = float(col.std(ddof=1))
        scale = a_sd if a_sd > 0.0 else math.nan
        balance.append(
            CovariateBalance(
                name=name,
                group_mean=g_mean,
                matched_mean=m_mean,
                all_mean=a_mean,
                all_sd=a_sd,
                smd_matched=(g_mean - m_mean) / scale,
                smd_all=(g_mean - a_mean) / scale,
            )
        )
    return MatchedGroups(
        groups=frozen(out),
        group=frozen(group),
        covariate_names=names,
        n_bins=n_bins,
        bin_edges=tuple(edges),
        levels=frozen(levels),
        n_candidates=frozen(n_candidates),
        n_coarsened=n_coarsened,
        n_pool=n_pool,
        balance=tuple(balance),
    )
