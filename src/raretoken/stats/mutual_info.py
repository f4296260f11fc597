"""Pairwise mutual information between neuron activations (paper §3.2, eq. 5).

The edge weights of the neuron graph of the modularity analysis are the mutual informations

    A_ij = MI(a_i, a_j) = Σ p(a_i, a_j) log [ p(a_i, a_j) / (p(a_i) p(a_j)) ]     (eq. 5)

between the activation columns of neurons ``i`` and ``j`` over the evaluation positions. The
paper writes the discrete sum but does not say how the continuous activations are made
discrete; this module documents its choice. All values are in **nats** (natural log).

Default estimator: equal-frequency binning + plug-in + Miller–Madow
------------------------------------------------------------------
1. **Discretisation, once per column.** Each neuron's activations are cut into ``B``
   equal-frequency (quantile) bins: a value's bin is ``floor(B · r / n)`` where ``r`` is the
   number of values strictly smaller than it. Distinct values therefore fill the bins as
   evenly as possible (exactly ``n/B`` each when ``B`` divides ``n``), and tied values (e.g.
   the exact zeros of a ReLU) always share a bin, which may then hold more than ``n/B``
   values and leave later bins empty. Quantile bins make the estimate invariant to any
   monotone rescaling of a neuron and avoid the near-empty outer bins that equal-width bins
   give heavy-tailed activations.
2. **Number of bins.** ``B = round(n^(1/3))`` (at least 2) unless given: under independence a
   joint cell then expects ``n / B² ≈ n^(1/3)`` samples (29 bins and ~30 per cell for
   ``n = 25 000``), a common compromise between discretisation bias (too few bins lose
   dependence) and small-sample bias (too many cells are empty).
3. **Joint histograms, vectorised.** For a pair of code columns the joint cell is
   ``c_i · B + c_j``; for a fixed ``i`` the codes of all ``j > i`` are offset by ``B²`` per
   column and counted with one :func:`numpy.bincount`, so the whole matrix costs
   ``O(n · N² / 2)`` integer operations and ``N`` bincount calls.
4. **Plug-in + Miller–Madow.** ``MI = H(i) + H(j) - H(i, j)`` with plug-in entropies
   ``H = -Σ (c/n) ln(c/n)``, each corrected by Miller–Madow's ``(m - 1) / (2n)`` where ``m``
   is the number of non-empty cells. The corrected MI is therefore
   ``MI_plugin + (m_i + m_j - m_ij - 1) / (2n)``; it removes the leading ``(B-1)²/(2n)``
   positive bias of the plug-in MI for independent variables, and can be slightly
   *negative* for independent columns (kept as is here; the graph builder of
   :mod:`raretoken.stats.modularity` clips edge weights at 0). ``bias_correction="none"``
   returns the plug-in estimate (equal to :func:`sklearn.metrics.mutual_info_score` on the
   same codes).

The diagonal holds ``MI(a_i, a_i) = H(a_i)``, the (corrected) entropy of the binned column.

Option: Kraskov–Stögbauer–Grassberger (``method="ksg"``)
-------------------------------------------------------
KSG estimator 1 (Kraskov et al., 2004) with ``k`` neighbours in the max-norm:
``MI = ψ(k) + ψ(n) - <ψ(n_x + 1) + ψ(n_y + 1)>``. It is applied to the ranks of each column
(copula transform; MI is invariant to monotone maps) with ties broken at random and a
uniform jitter inside each rank, so that no two distances tie (KSG assumes continuous
data; the jitter preserves the order of distinct values). The randomness needs an explicit
``seed``. KSG costs a k-d tree query per pair (``O(N² n log n)``, roughly 40 ms per pair
for ``n = 25 000``), far slower than binning, and has no diagonal (set to NaN).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from scipy.spatial import cKDTree
from scipy.special import digamma

from raretoken.errors import ConfigError, InsufficientDataError, NumericalError
from raretoken.stats._common import from_nan_list, frozen, nan_list, require_seed

logger = logging.getLogger(__name__)

Method = Literal["binned", "ksg"]
BiasCorrection = Literal["miller_madow", "none"]

__all__ = [
    "MutualInfoMatrix",
    "default_bins",
    "mutual_information",
    "mutual_information_matrix",
    "quantile_codes",
]

# Largest number of int64 cells materialised at once when counting joint histograms.
_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True, eq=False)
class MutualInfoMatrix:
    """Pairwise mutual information (nats) between the neurons of one group.

    Attributes
    ----------
    neuron_ids:
        Neuron id of each row/column (axis 0 and 1 of :attr:`mi`).
    mi:
        Symmetric ``(N, N)`` matrix; ``mi[i, j]`` is the estimated MI between neurons
        ``neuron_ids[i]`` and ``neuron_ids[j]``. Diagonal: entropy of the binned column
        (NaN for KSG).
    entropy:
        Entropy (nats) of each binned column (NaN for KSG).
    method:
        ``"binned"`` or ``"ksg"``.
    bins:
        Number of quantile bins (``None`` for KSG).
    k:
        Number of neighbours (``None`` for binning).
    bias_correction:
        ``"miller_madow"`` or ``"none"`` (binning only; ``"none"`` for KSG).
    n_samples:
        Number of positions used.
    """

    neuron_ids: np.ndarray
    mi: np.ndarray
    entropy: np.ndarray
    method: str
    bins: int | None
    k: int | None
    bias_correction: str
    n_samples: int

    @property
    def n_neurons(self) -> int:
        return int(self.neuron_ids.size)

    def off_diagonal(self) -> np.ndarray:
        """The ``N (N - 1) / 2`` values above the diagonal (row-major order)."""
        iu = np.triu_indices(self.n_neurons, k=1)
        return self.mi[iu]

    def to_dict(self) -> dict[str, Any]:
        return {
            "neuron_ids": self.neuron_ids.tolist(),
            "mi": nan_list(self.mi),
            "entropy": nan_list(self.entropy),
            "method": self.method,
            "bins": self.bins,
            "k": self.k,
            "bias_correction": self.bias_correction,
            "n_samples": self.n_samples,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MutualInfoMatrix:
        return cls(
            neuron_ids=frozen(np.asarray(d["neuron_ids"], dtype=np.int64)),
            mi=frozen(from_nan_list(d["mi"])),
            entropy=frozen(from_nan_list(d["entropy"])),
            method=str(d["method"]),
            bins=None if d["bins"] is None else int(d["bins"]),
            k=None if d["k"] is None else int(d["k"]),
            bias_correction=str(d["bias_correction"]),
            n_samples=int(d["n_samples"]),
        )


def default_bins(n_samples: int) -> int:
    """Default number of equal-frequency bins: ``max(2, round(n ** (1/3)))``."""
    if n_samples < 1:
        raise InsufficientDataError(f"need at least 1 sample, got {n_samples}")
    return max(2, round(n_samples ** (1.0 / 3.0)))


def quantile_codes(acts: np.ndarray, bins: int) -> np.ndarray:
    """Equal-frequency bin index of every value, column by column.

    Parameters
    ----------
    acts:
        ``(n_samples, n_columns)`` finite values.
    bins:
        Number of bins ``B`` (``2 <= B <= n_samples``).

    Returns
    -------
    np.ndarray
        ``int64`` codes in ``[0, B)``, same shape as ``acts``: ``floor(B · r / n)`` with ``r``
        the number of values of the column strictly below the value (ties share a bin).
    """
    a = np.asarray(acts, dtype=np.float64)
    if a.ndim != 2:
        raise ConfigError(f"acts must be 2-D (n_samples, n_neurons), got shape {a.shape}")
    n = a.shape[0]
    if not 2 <= bins <= n:
        raise ConfigError(f"bins must be in [2, n_samples={n}], got {bins}")
    order = np.argsort(a, axis=0, kind="stable")
    sorted_a = np.take_along_axis(a, order, axis=0)
    # rank_below[s] for sorted position s: index of the first element equal to sorted_a[s]
    pos = np.arange(n)[:, None]
    new_value = np.ones_like(sorted_a, dtype=bool)
    new_value[1:] = sorted_a[1:] != sorted_a[:-1]
    first = np.maximum.accumulate(np.where(new_value, pos, 0), axis=0)
    codes_sorted = (first * bins) // n
    codes = np.empty_like(codes_sorted)
    np.put_along_axis(codes, order, codes_sorted, axis=0)
    return codes.astype(np.int64, copy=False)


def _clogc_table(n: int) -> np.ndarray:
    """``c ln c`` for ``c = 0..n`` (``0 ln 0 = 0``), to look up instead of taking logs."""
    c = np.arange(n + 1, dtype=np.float64)
    c[0] = 1.0
    t = c * np.log(c)
    t[0] = 0.0
    return t


def _entropy_from_counts(
    counts: np.ndarray, n: int, table: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Plug-in entropy (nats) and number of non-empty cells along the last axis."""
    h = math.log(n) - table[counts].sum(axis=-1) / n
    m = np.count_nonzero(counts, axis=-1)
    return np.maximum(h, 0.0), m


def _binned_matrix(
    codes: np.ndarray, bins: int, correction: BiasCorrection
) -> tuple[np.ndarray, np.ndarray]:
    n, p = codes.shape
    b2 = bins * bins
    marg = np.stack([np.bincount(codes[:, i], minlength=bins) for i in range(p)])
    table = _clogc_table(n)
    h, m = _entropy_from_counts(marg, n, table)
    mm = correction == "miller_madow"
    mi = np.zeros((p, p), dtype=np.float64)
    # (N, n) layout: each column's joint histogram is filled by one contiguous run of codes
    codes_t = np.ascontiguousarray(codes.T)
    cols_per_chunk = max(1, _CHUNK_ELEMENTS // max(n, 1))
    for i in range(p - 1):
        base = codes_t[i] * bins
        for j0 in range(i + 1, p, cols_per_chunk):
            j1 = min(p, j0 + cols_per_chunk)
            offsets = np.arange(j1 - j0, dtype=np.int64)[:, None] * b2
            comb = codes_t[j0:j1] + (base + offsets)
            joint = np.bincount(comb.ravel(), minlength=(j1 - j0) * b2).reshape(j1 - j0, b2)
            h_joint, m_joint = _entropy_from_counts(joint, n, table)
            vals = h[i] + h[j0:j1] - h_joint
            if mm:
                vals = vals + (m[i] + m[j0:j1] - m_joint - 1) / (2.0 * n)
            mi[i, j0:j1] = vals
    mi = mi + mi.T
    ent = h + (m - 1) / (2.0 * n) if mm else h
    np.fill_diagonal(mi, ent)
    return mi, ent


def _ksg_pair(u: np.ndarray, v: np.ndarray, k: int) -> float:
    n = u.size
    pts = np.column_stack([u, v])
    tree = cKDTree(pts)
    dist, _ = tree.query(pts, k=k + 1, p=np.inf)
    eps = dist[:, -1]
    us, vs = np.sort(u), np.sort(v)
    # neighbours strictly closer than eps in each marginal, excluding the point itself
    nx = np.searchsorted(us, u + eps, side="left") - np.searchsorted(us, u - eps, side="right")
    ny = np.searchsorted(vs, v + eps, side="left") - np.searchsorted(vs, v - eps, side="right")
    nx = np.maximum(nx - 1, 0)
    ny = np.maximum(ny - 1, 0)
    return float(digamma(k) + digamma(n) - np.mean(digamma(nx + 1) + digamma(ny + 1)))


def _copula(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Ranks in (0, 1) with random tie-breaking and uniform jitter inside each rank."""
    n, p = int(a.shape[0]), int(a.shape[1])
    out = np.empty_like(a)
    for j in range(p):
        order = np.lexsort((rng.random(size=n), a[:, j]))
        ranks = np.empty(n, dtype=np.float64)
        ranks[order] = np.arange(n, dtype=np.float64)
        out[:, j] = (ranks + rng.random(size=n)) / n
    return out


def _check_acts(acts: np.ndarray) -> np.ndarray:
    a = np.asarray(acts, dtype=np.float64)
    if a.ndim != 2:
        raise ConfigError(f"acts must be 2-D (n_samples, n_neurons), got shape {a.shape}")
    if a.shape[1] < 2:
        raise InsufficientDataError(f"mutual information needs >= 2 neurons, got {a.shape[1]}")
    if a.shape[0] < 4:
        raise InsufficientDataError(f"mutual information needs >= 4 samples, got {a.shape[0]}")
    if not np.isfinite(a).all():
        raise NumericalError("activations contain NaN or infinite values")
    return a


def _check_ids(neuron_ids: Sequence[int] | np.ndarray | None, p: int) -> np.ndarray:
    if neuron_ids is None:
        return np.arange(p, dtype=np.int64)
    ids = np.asarray(neuron_ids)
    if ids.shape != (p,) or not np.issubdtype(ids.dtype, np.integer):
        raise ConfigError(f"neuron_ids must be {p} integers, got shape {ids.shape}")
    if np.unique(ids).size != p:
        raise ConfigError("neuron_ids must be unique")
    return ids.astype(np.int64)


def mutual_information_matrix(
    acts: np.ndarray,
    *,
    neuron_ids: Sequence[int] | np.ndarray | None = None,
    method: Method = "binned",
    bins: int | None = None,
    bias_correction: BiasCorrection = "miller_madow",
    k: int = 3,
    seed: int | np.random.Generator | None = None,
) -> MutualInfoMatrix:
    """Pairwise MI matrix (nats) between the activation columns of a neuron group (eq. 5).

    Parameters
    ----------
    acts:
        Activations ``(n_samples, n_neurons)``.
    neuron_ids:
        Labels of the columns (default ``0..N-1``).
    method:
        ``"binned"`` (default; equal-frequency bins, plug-in, optional Miller–Madow) or
        ``"ksg"`` (Kraskov k-NN estimator 1 on the copula; slow, needs ``seed``).
    bins:
        Number of quantile bins for ``"binned"`` (default :func:`default_bins`).
    bias_correction:
        ``"miller_madow"`` (default) or ``"none"`` (plain plug-in), binning only.
    k:
        Neighbours for KSG.
    seed:
        Seed or Generator for KSG's tie-breaking jitter (unused by binning).

    Returns
    -------
    MutualInfoMatrix
    """
    a = _check_acts(acts)
    n, p = a.shape
    ids = _check_ids(neuron_ids, p)
    if method == "binned":
        if bias_correction not in ("miller_madow", "none"):
            raise ConfigError(f"unknown bias_correction {bias_correction!r}")
        b = default_bins(n) if bins is None else int(bins)
        codes = quantile_codes(a, b)
        mi, ent = _binned_matrix(codes, b, bias_correction)
        logger.debug("binned MI matrix: %d neurons, %d samples, %d bins", p, n, b)
        return MutualInfoMatrix(
            neuron_ids=frozen(ids),
            mi=frozen(mi),
            entropy=frozen(ent),
            method="binned",
            bins=b,
            k=None,
            bias_correction=bias_correction,
            n_samples=n,
        )
    if method == "ksg":
        if not 1 <= k < n:
            raise ConfigError(f"k must be in [1, n_samples), got {k}")
        rng = require_seed(seed, "method='ksg'")
        u = _copula(a, rng)
        mi = np.full((p, p), np.nan)
        for i in range(p - 1):
            for j in range(i + 1, p):
                mi[i, j] = mi[j, i] = _ksg_pair(u[:, i], u[:, j], k)
        logger.debug("KSG MI matrix: %d neurons, %d samples, k=%d", p, n, k)
        return MutualInfoMatrix(
            neuron_ids=frozen(ids),
            mi=frozen(mi),
            entropy=frozen(np.full(p, np.nan)),
            method="ksg",
            bins=None,
            k=int(k),
            bias_correction="none",
            n_samples=n,
        )
    raise ConfigError(f"unknown MI method {method!r}; expected 'binned' or 'ksg'")


def mutual_information(
    x: np.ndarray,
    y: np.ndarray,
    *,
    method: Method = "binned",
    bins: int | None = None,
    bias_correction: BiasCorrection = "miller_madow",
    k: int = 3,
    seed: int | np.random.Generator | None = None,
) -> float:
    """MI (nats) between two activation vectors; same estimators as the matrix version."""
    xa = np.asarray(x, dtype=np.float64).ravel()
    ya = np.asarray(y, dtype=np.float64).ravel()
    if xa.size != ya.size:
        raise ConfigError(f"x and y differ in length: {xa.size} vs {ya.size}")
    res = mutual_information_matrix(
        np.column_stack([xa, ya]),
        method=method,
        bins=bins,
        bias_correction=bias_correction,
        k=k,
        seed=seed,
    )
    return float(res.mi[0, 1])
