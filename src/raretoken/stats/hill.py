"""Heavy-tailed weight spectra: Hill estimator with the fix-finger rule (paper §3.2, eq. 9–10,
Figure 2).

Spectrum (eq. 9)
----------------
For a neuron group ``G`` the rows of the MLP weight matrix that belong to its neurons form
``W_G`` of shape ``(|G|, d)`` (which weight matrix, and hence ``d``, is the caller's choice:
the paper calls ``d`` "the hidden dimension"). The correlation matrix is the ``|G| × |G|``
matrix ``Ξ_G = W_G W_G^T / d`` (neuron side, as printed), diagonalised with
:func:`numpy.linalg.eigh` (rounding negatives clipped to 0). Its non-zero eigenvalues equal
those of the ``d × d`` matrix ``W_G^T W_G / d`` used by WeightWatcher, so the side only
matters for the zeros (``|G| - d`` of them when ``|G| > d``, then computed from the smaller
``d × d`` matrix), which :func:`hill_alpha` drops anyway.

Hill estimator (eq. 10)
-----------------------
With the eigenvalues in descending order ``λ_1 >= λ_2 >= ...`` and ``k`` of them in the tail,

    α_Hill = [ (1/k) Σ_{i=1..k} ln(λ_i / λ_k) ]^{-1}                        (eq. 10)

implemented exactly as printed: the threshold is the k-th largest eigenvalue itself (whose
own term is 0), and there is no ``1 +``. This is the tail index of the complementary CDF,
``P(λ > x) ∝ x^{-α}``; WeightWatcher and the ``powerlaw`` package report the density exponent
``1 + k / Σ ln(λ_i / λ_k)`` for the same tail, returned here as :attr:`HillFit.alpha_pdf`
(``= alpha + 1``). Which one the paper's "α < 2" refers to is not stated; both are kept.
Because the threshold is a tail point, ``E[1/α]`` is ``(k - 1) / k`` times the Pareto value,
i.e. ``α`` is inflated by ``k / (k - 1)`` (2 % at ``k = 50``); kept for fidelity to eq. 10.
The asymptotic standard error ``α / √k`` is reported as :attr:`HillFit.alpha_se`.

Choice of k: fix-finger "xmin at the peak" (Yang et al., 2023)
--------------------------------------------------------------
``x_min`` is put at the peak (mode) of the density of ``log10 λ``: a power-law tail starts
where the empirical spectral density stops rising. Two density estimates:

* ``density="kde"`` (default): Gaussian KDE of ``log10 λ`` (Scott's bandwidth), maximised on
  a 1024-point grid. Groups in this analysis have tens to a few hundred eigenvalues, where
  WeightWatcher's 100-bin histogram holds 0–2 values per bin and its argmax is mostly noise;
  the KDE's mode is stable.
* ``density="histogram"``: ``bins`` equal bins of ``log10 λ`` (100 as in WeightWatcher's
  ``fix_fingers="xmin_peak"``), peak at the left edge of the fullest bin. (WeightWatcher then
  searches ``xmin`` up to 1.5× that edge by a KS criterion; here the peak itself is used.
  The KS search, with WeightWatcher's ``fix_fingers`` options, is
  :func:`raretoken.stats.powerlaw_fit.powerlaw_fit`.)

``x_min`` is then the smallest eigenvalue at or above the peak, so ``λ_k = x_min`` is an
actual eigenvalue, and ``k = #{λ >= x_min}``.

Small groups. Eigenvalues ``<= rel_tol · λ_1`` (exact zeros when ``|G| > d``) are dropped
first. At least ``min_k`` (default 5) tail eigenvalues are required: when the peak leaves
fewer (a peak in the far right of a short spectrum), ``k`` falls back to
``min(min_k, #eigenvalues)`` and :attr:`HillFit.fallback` is set. Fewer than 3 positive
eigenvalues, or a tail whose eigenvalues are all equal (``α = ∞``), raise an error.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from scipy.stats import gaussian_kde

from raretoken.errors import ConfigError, InsufficientDataError, NumericalError
from raretoken.stats._common import frozen

logger = logging.getLogger(__name__)

Density = Literal["kde", "histogram"]

__all__ = ["HillFit", "group_spectrum", "hill_alpha"]

_KDE_GRID = 1024


@dataclass(frozen=True, eq=False)
class HillFit:
    """Hill estimate of the tail exponent of one eigenvalue spectrum.

    Attributes
    ----------
    alpha:
        Eq. 10, ``k / Σ_{i<=k} ln(λ_i / λ_k)``: a **tail index** (CCDF exponent);
        ``"alpha_tail_hill"`` in :meth:`to_dict`, also :attr:`alpha_tail`.
    alpha_pdf:
        ``1 + alpha``: the same fit as a **density exponent** (the convention of
        WeightWatcher / ``powerlaw``); ``"alpha_pdf_hill"``. WeightWatcher's own ``alpha``
        (KS choice of ``x_min``) is :func:`raretoken.stats.powerlaw_fit.powerlaw_fit`.
    alpha_se:
        Asymptotic standard error ``alpha / √k`` of the tail index; ``"alpha_tail_hill_se"``.
    k:
        Number of tail eigenvalues.
    x_min:
        ``λ_k``, the smallest tail eigenvalue.
    peak:
        Location (eigenvalue scale) of the density peak, or ``None`` when ``k`` / ``x_min``
        were given.
    rule:
        ``"peak"``, ``"k"`` (given k) or ``"xmin"`` (given threshold).
    density:
        ``"kde"`` / ``"histogram"`` for the peak rule, else ``None``.
    fallback:
        Whether ``k`` was raised to ``min_k`` because the peak left too few tail values.
    n_eigenvalues:
        Positive eigenvalues used (after dropping numerical zeros).
    eigenvalues:
        Those eigenvalues, descending (for ESD plots).
    """

    alpha: float
    alpha_pdf: float
    alpha_se: float
    k: int
    x_min: float
    peak: float | None
    rule: str
    density: str | None
    fallback: bool
    n_eigenvalues: int
    eigenvalues: np.ndarray

    @property
    def alpha_tail(self) -> float:
        """Eq. 10's tail index (alias of :attr:`alpha`, named for its convention)."""
        return self.alpha

    def to_dict(self) -> dict[str, Any]:
        return {
            "alpha_tail_hill": self.alpha,
            "alpha_pdf_hill": self.alpha_pdf,
            "alpha_tail_hill_se": self.alpha_se,
            "k": self.k,
            "x_min": self.x_min,
            "peak": self.peak,
            "rule": self.rule,
            "density": self.density,
            "fallback": self.fallback,
            "n_eigenvalues": self.n_eigenvalues,
            "eigenvalues": self.eigenvalues.tolist(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> HillFit:
        def get(new: str, old: str) -> float:  # old keys: caches written before the rename
            return float(d[new] if new in d else d[old])

        return cls(
            alpha=get("alpha_tail_hill", "alpha"),
            alpha_pdf=get("alpha_pdf_hill", "alpha_pdf"),
            alpha_se=get("alpha_tail_hill_se", "alpha_se"),
            k=int(d["k"]),
            x_min=float(d["x_min"]),
            peak=None if d["peak"] is None else float(d["peak"]),
            rule=str(d["rule"]),
            density=None if d["density"] is None else str(d["density"]),
            fallback=bool(d["fallback"]),
            n_eigenvalues=int(d["n_eigenvalues"]),
            eigenvalues=frozen(np.asarray(d["eigenvalues"], dtype=np.float64)),
        )


def group_spectrum(w: np.ndarray) -> np.ndarray:
    """Eigenvalues of ``Ξ_G = W_G W_G^T / d`` (eq. 9), descending, length ``|G|``.

    Parameters
    ----------
    w:
        ``(group_size, d)`` weight slice: one row per neuron of the group.
    """
    a = np.asarray(w, dtype=np.float64)
    if a.ndim != 2:
        raise ConfigError(f"W must be 2-D (group_size, d), got shape {a.shape}")
    g, d = a.shape
    if g < 2 or d < 1:
        raise InsufficientDataError(f"need >= 2 neurons and >= 1 column, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise NumericalError("weights contain NaN or infinite values")
    if g <= d:
        eig = np.linalg.eigvalsh(a @ a.T / d)
    else:  # rank <= d: the non-zero eigenvalues are those of the smaller d x d matrix
        eig = np.zeros(g)
        eig[:d] = np.linalg.eigvalsh(a.T @ a / d)
    return np.sort(np.maximum(eig, 0.0))[::-1]


def _peak(log_eigs: np.ndarray, density: Density, bins: int) -> float:
    """Location (log10 scale) of the peak of the density of ``log_eigs``."""
    if density == "kde":
        kde = gaussian_kde(log_eigs)
        grid = np.linspace(log_eigs.min(), log_eigs.max(), _KDE_GRID)
        return float(grid[int(np.argmax(kde(grid)))])
    if density == "histogram":
        if bins < 2:
            raise ConfigError(f"bins must be >= 2, got {bins}")
        counts, edges = np.histogram(log_eigs, bins=bins)
        return float(edges[int(np.argmax(counts))])
    raise ConfigError(f"unknown density {density!r}; expected 'kde' or 'histogram'")


def _alpha(desc: np.ndarray, k: int) -> float:
    s = float(np.sum(np.log(desc[:k] / desc[k - 1])))
    if not s > 0.0:
        raise NumericalError(
            f"the {k} tail eigenvalues are all equal; the Hill exponent is infinite"
        )
    return k / s


def hill_alpha(
    eigs: np.ndarray,
    *,
    k: int | None = None,
    xmin: Literal["peak"] | float = "peak",
    density: Density = "kde",
    bins: int = 100,
    min_k: int = 5,
    rel_tol: float = 1e-10,
) -> HillFit:
    """Hill tail exponent of an eigenvalue spectrum (eq. 10) with fix-finger ``x_min``.

    Parameters
    ----------
    eigs:
        Eigenvalues (any order), e.g. from :func:`group_spectrum`.
    k:
        Number of tail eigenvalues; overrides ``xmin`` when given (``2 <= k <= n``).
    xmin:
        ``"peak"`` (fix-finger rule, default) or a threshold: ``k = #{λ >= xmin}``.
    density:
        Density estimate for the peak rule: ``"kde"`` (default) or ``"histogram"``.
    bins:
        Number of bins for ``density="histogram"``.
    min_k:
        Smallest tail size for the peak rule (fallback, see module docstring); ``>= 2``.
    rel_tol:
        Eigenvalues ``<= rel_tol · max`` are treated as zero and dropped.

    Returns
    -------
    HillFit
    """
    e = np.asarray(eigs, dtype=np.float64).ravel()
    if not np.isfinite(e).all():
        raise NumericalError("eigenvalues contain NaN or infinite values")
    if e.size and e.max() <= 0.0:
        raise NumericalError("all eigenvalues are zero or negative")
    if min_k < 2:
        raise ConfigError(f"min_k must be >= 2, got {min_k}")
    if not 0.0 <= rel_tol < 1.0:
        raise ConfigError(f"rel_tol must be in [0, 1), got {rel_tol}")
    desc = np.sort(e[e > rel_tol * (e.max() if e.size else 0.0)])[::-1]
    n = int(desc.size)
    if n < 3:
        raise InsufficientDataError(f"Hill estimator needs >= 3 positive eigenvalues, got {n}")

    peak: float | None = None
    dens: str | None = None
    fallback = False
    if k is not None:
        if not 2 <= k <= n:
            raise ConfigError(f"k must be in [2, {n}] (positive eigenvalues), got {k}")
        kk, rule = int(k), "k"
    elif isinstance(xmin, str):
        if xmin != "peak":
            raise ConfigError(f"xmin must be 'peak' or a number, got {xmin!r}")
        logs = np.log10(desc)
        if np.ptp(logs) == 0.0:
            raise NumericalError("all eigenvalues are equal; the Hill exponent is infinite")
        peak_log = _peak(logs, density, bins)
        peak, dens, rule = float(10.0**peak_log), density, "peak"
        kk = int(np.sum(logs >= peak_log - 1e-12))
        if kk < min_k:
            kk, fallback = min(min_k, n), True
            logger.debug("peak leaves %d tail eigenvalues; falling back to k=%d", kk, kk)
    else:
        thr = float(xmin)
        if not (math.isfinite(thr) and thr > 0.0):
            raise ConfigError(f"xmin must be a positive number, got {xmin}")
        kk, rule = int(np.sum(desc >= thr)), "xmin"
        if kk < 2:
            raise InsufficientDataError(f"only {kk} eigenvalue(s) >= xmin={thr:g}; need >= 2")
    alpha = _alpha(desc, kk)
    return HillFit(
        alpha=alpha,
        alpha_pdf=1.0 + alpha,
        alpha_se=alpha / math.sqrt(kk),
        k=kk,
        x_min=float(desc[kk - 1]),
        peak=peak,
        rule=rule,
        density=dens,
        fallback=fallback,
        n_eigenvalues=n,
        eigenvalues=frozen(desc),
    )
