"""Power-law tail fits of eigenvalue spectra as WeightWatcher reports them (Clauset et al.).

Two conventions (named in every field and column)
-------------------------------------------------
* **tail index** ``α_tail``: ``P(λ > x) ∝ x^{-α_tail}`` (CCDF exponent). The paper's eq. 10
  (:func:`raretoken.stats.hill.hill_alpha`) is a tail index; fields ``alpha_tail_*``.
* **density exponent** ``α_pdf = 1 + α_tail``: ``p(λ) ∝ λ^{-α_pdf}``, the ``alpha`` of
  WeightWatcher and of the ``powerlaw`` package (HT-SR's α ranges refer to it); ``alpha_pdf_*``.

Fit (Clauset, Shalizi & Newman 2009, "Power-law distributions in empirical data")
----------------------------------------------------------------------------------
With the positive eigenvalues ascending ``x_1 <= ... <= x_N``, every candidate threshold
``x_min = x_i`` with ``n = N - i + 1 >= min_tail`` tail values (and never the largest value
alone) gets the continuous maximum-likelihood exponent

    α_pdf = 1 + n / Σ_{j>=i} ln(x_j / x_min)

and the Kolmogorov–Smirnov distance between the tail's empirical CDF and the fitted
``F(x) = 1 - (x / x_min)^{1 - α_pdf}``,

    D = max_{j=0..n-1} | j / n - F(x_{i+j}) |,

the empirical CDF taken just below each point, as WeightWatcher's ``WWFit`` and the
``powerlaw`` package do (the two-sided supremum would add at most ``1 / n``). The smallest
``D`` wins (the first on ties). Standard error: ``(α_pdf - 1) / √n`` (Clauset et al.;
WeightWatcher's ``sigma``).
``alpha_weighted`` is WeightWatcher's ``α̂ = α_pdf · log10 λ_max`` with ``λ_max`` the largest
eigenvalue of the spectrum given (so it depends on its scale: WeightWatcher uses the squared
singular values of ``W``, not divided by any dimension).

Guards (reported, never a crash or a silent number)
---------------------------------------------------
* fewer than ``min_evals`` (default :data:`MIN_EVALS` = 8, WeightWatcher's
  ``DEFAULT_MIN_EVALS``) positive eigenvalues, or
* no candidate with at least ``min_tail`` tail values (default :data:`MIN_TAIL` = 8,
  WeightWatcher's ``k_min`` of its small-sample fit) — e.g. a ``fix_fingers="xmin_peak"``
  range that leaves too few —

give a :class:`PowerLawFit` with ``fitted=False``, NaN numbers and the ``reason``.
WeightWatcher (>= 0.7) itself searches tails down to 2 values when ``N >= 20``; pass
``min_tail=2`` to reproduce it exactly (tests/test_weightwatcher_parity.py). For ``N < 20``
WeightWatcher 0.7.7 switches to a different, bias-corrected heuristic that is not
reproduced here.

``fix_fingers`` (WeightWatcher's option of the same name)
---------------------------------------------------------
* ``"xmin_peak"``: the peak of the ESD is the left edge of the fullest of 100 equal bins of
  ``log10 λ``; ``x_min`` is searched by KS among the eigenvalues in
  ``[0.95 · peak, 1.5 · peak]`` (WeightWatcher's intended range; its 0.7.7 code passes
  ``log10(0.95 · peak)`` as the lower bound, and its call fails with the default
  ``pl_package`` and with ``powerlaw`` 2.x, so there is no reference to compare with).
* ``"clip_xmax"``: fit all eigenvalues, then drop the ``idx = 2, 3, ..., max_fingers - 1``
  largest and refit; the first refit whose ``α_pdf`` is more than ``finger_thresh`` below
  the first fit's is kept (``n_clipped = idx``; WeightWatcher reports ``num_fingers =
  idx - 1``); the search stops without change at a refit with ``α_pdf <= 2``. As in
  WeightWatcher, ``λ_max`` (and so ``alpha_weighted``) keeps the clipped eigenvalues.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np

from raretoken.errors import ConfigError, NumericalError
from raretoken.stats._common import finite_or_none, from_nan_list, frozen, nan_if_none, nan_list
from raretoken.stats.baselines import BaselineComparison, compare_to_random

__all__ = [
    "CLIP_MIN_ALPHA",
    "FINGER_THRESH",
    "MAX_FINGERS",
    "MIN_EVALS",
    "MIN_TAIL",
    "PEAK_BINS",
    "XMIN_PEAK_RANGE",
    "FixFingers",
    "PowerLawComparison",
    "PowerLawFit",
    "compare_powerlaw_fits",
    "powerlaw_fit",
]

FixFingers = Literal["xmin_peak", "clip_xmax"]

#: Fewest positive eigenvalues fitted (WeightWatcher ``constants.DEFAULT_MIN_EVALS``).
MIN_EVALS = 8
#: Fewest tail values of a candidate ``x_min`` (WeightWatcher ``WWFit.fit_powerlaw_smallN``'s
#: ``k_min``).
MIN_TAIL = 8
#: Bins of ``log10 λ`` for the ``xmin_peak`` peak (WeightWatcher ``fit_powerlaw``).
PEAK_BINS = 100
#: ``x_min`` search range of ``xmin_peak`` as multiples of the peak.
XMIN_PEAK_RANGE = (0.95, 1.5)
#: ``clip_xmax``: WeightWatcher's ``DEFAULT_MAX_FINGERS``, ``DEFAULT_FINGER_THRESH`` and the
#: ``min_alpha`` of ``fit_clipped_powerlaw``.
MAX_FINGERS, FINGER_THRESH, CLIP_MIN_ALPHA = 10, 1.0, 2.0


@dataclass(frozen=True, eq=False)
class PowerLawFit:
    """KS-selected power-law fit of one spectrum (or the reason it was not fitted).

    Attributes
    ----------
    fitted:
        Whether a fit was possible; if not, the numbers are NaN and ``reason`` says why.
    reason:
        ``None`` when fitted.
    alpha_pdf:
        Density exponent ``1 + n / Σ ln(λ_i / x_min)`` (WeightWatcher's ``alpha``).
    alpha_pdf_se:
        ``(alpha_pdf - 1) / √k`` (WeightWatcher's ``sigma``).
    x_min:
        Selected threshold (an eigenvalue).
    k:
        Tail values fitted (``λ >= x_min``, minus clipped ones); 0 when not fitted.
    ks_distance:
        KS distance ``D`` at ``x_min``.
    lambda_max:
        Largest positive eigenvalue (clipped ones included); NaN when there is none.
    alpha_weighted:
        WeightWatcher's ``α̂ = alpha_pdf · log10(lambda_max)``.
    n_eigenvalues:
        Positive eigenvalues (after dropping numerical zeros).
    rule:
        ``"ks"``, ``"xmin_peak"``, ``"clip_xmax"`` or ``"xmin"`` (given threshold).
    min_tail:
        Smallest tail searched.
    peak:
        ESD peak for ``"xmin_peak"``, else ``None``.
    n_clipped:
        Largest eigenvalues dropped by ``"clip_xmax"``.
    """

    fitted: bool
    reason: str | None
    alpha_pdf: float
    alpha_pdf_se: float
    x_min: float
    k: int
    ks_distance: float
    lambda_max: float
    alpha_weighted: float
    n_eigenvalues: int
    rule: str
    min_tail: int
    peak: float | None = None
    n_clipped: int = 0

    @property
    def alpha_tail(self) -> float:
        """Tail index ``alpha_pdf - 1`` (the convention of eq. 10)."""
        return self.alpha_pdf - 1.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "fitted": self.fitted,
            "reason": self.reason,
            "alpha_pdf_ks": finite_or_none(self.alpha_pdf),
            "alpha_pdf_ks_se": finite_or_none(self.alpha_pdf_se),
            "alpha_tail_ks": finite_or_none(self.alpha_tail),
            "x_min": finite_or_none(self.x_min),
            "k": self.k,
            "ks_distance": finite_or_none(self.ks_distance),
            "lambda_max": finite_or_none(self.lambda_max),
            "alpha_weighted": finite_or_none(self.alpha_weighted),
            "n_eigenvalues": self.n_eigenvalues,
            "rule": self.rule,
            "min_tail": self.min_tail,
            "peak": self.peak,
            "n_clipped": self.n_clipped,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PowerLawFit:
        return cls(
            fitted=bool(d["fitted"]),
            reason=None if d["reason"] is None else str(d["reason"]),
            alpha_pdf=nan_if_none(d["alpha_pdf_ks"]),
            alpha_pdf_se=nan_if_none(d["alpha_pdf_ks_se"]),
            x_min=nan_if_none(d["x_min"]),
            k=int(d["k"]),
            ks_distance=nan_if_none(d["ks_distance"]),
            lambda_max=nan_if_none(d["lambda_max"]),
            alpha_weighted=nan_if_none(d["alpha_weighted"]),
            n_eigenvalues=int(d["n_eigenvalues"]),
            rule=str(d["rule"]),
            min_tail=int(d["min_tail"]),
            peak=None if d.get("peak") is None else float(d["peak"]),
            n_clipped=int(d.get("n_clipped", 0)),
        )


def _not_fitted(reason: str, n: int, lam_max: float, rule: str, min_tail: int) -> PowerLawFit:
    nan = math.nan
    return PowerLawFit(False, reason, nan, nan, nan, 0, nan, lam_max, nan, n, rule, min_tail)


def _scan(x: np.ndarray, allowed: np.ndarray) -> tuple[int, float, float] | None:
    """KS scan over the candidate indices ``allowed`` of ascending ``x``: ``(i, α_pdf, D)``
    of the best candidate, or ``None`` when every candidate is degenerate."""
    logs = np.log(x)
    suffix = np.cumsum(logs[::-1])[::-1]  # Σ_{j>=i} ln x_j
    best: tuple[int, float, float] | None = None
    for i in allowed:
        n = x.size - int(i)
        s = float(suffix[i] - n * logs[i])
        if not s > 0.0:
            continue  # all tail values equal: no finite exponent
        alpha = 1.0 + n / s
        cdf = 1.0 - (x[i:] / x[i]) ** (1.0 - alpha)
        d = float(np.max(np.abs(np.arange(n) / n - cdf)))
        if best is None or d < best[2]:
            best = (int(i), alpha, d)
    return best


def _fit_sorted(
    x: np.ndarray, allowed: np.ndarray, lam_max: float, n_all: int, rule: str, min_tail: int
) -> PowerLawFit:
    allowed = allowed[x.size - allowed >= max(min_tail, 2)]
    if allowed.size == 0:
        return _not_fitted(
            f"no x_min candidate leaves >= {min_tail} tail eigenvalues (of {x.size})",
            n_all, lam_max, rule, min_tail,
        )  # fmt: skip
    best = _scan(x, allowed)
    if best is None:
        return _not_fitted(
            "every candidate tail has all-equal eigenvalues", n_all, lam_max, rule, min_tail
        )
    i, alpha, d = best
    k = x.size - i
    return PowerLawFit(
        fitted=True,
        reason=None,
        alpha_pdf=alpha,
        alpha_pdf_se=(alpha - 1.0) / math.sqrt(k),
        x_min=float(x[i]),
        k=k,
        ks_distance=d,
        lambda_max=lam_max,
        alpha_weighted=alpha * math.log10(lam_max),
        n_eigenvalues=n_all,
        rule=rule,
        min_tail=min_tail,
    )


def powerlaw_fit(
    eigs: np.ndarray,
    *,
    xmin: Literal["ks"] | float = "ks",
    fix_fingers: FixFingers | None = None,
    min_tail: int = MIN_TAIL,
    min_evals: int = MIN_EVALS,
    max_fingers: int = MAX_FINGERS,
    finger_thresh: float = FINGER_THRESH,
    bins: int = PEAK_BINS,
    rel_tol: float = 1e-10,
) -> PowerLawFit:
    """Clauset et al. power-law fit of a spectrum with the KS choice of ``x_min``.

    Parameters
    ----------
    eigs:
        Eigenvalues (any order); values ``<= rel_tol · max`` are dropped as zeros.
    xmin:
        ``"ks"`` (search, default) or a threshold: the tail is ``λ >= xmin``.
    fix_fingers:
        ``None`` (default), ``"xmin_peak"`` or ``"clip_xmax"`` (see module docstring);
        only with ``xmin="ks"``.
    min_tail:
        Fewest tail values of a candidate (``>= 2``); ``2`` reproduces WeightWatcher.
    min_evals:
        Fewest positive eigenvalues fitted (``>= 2``).
    max_fingers, finger_thresh:
        ``"clip_xmax"`` settings (WeightWatcher's defaults).
    bins:
        Bins of ``log10 λ`` for the ``"xmin_peak"`` peak.

    Returns
    -------
    PowerLawFit
        ``fitted=False`` with a ``reason`` when the guards fail.

    Raises
    ------
    NumericalError
        Non-finite eigenvalues.
    ConfigError
        Bad settings.
    """
    e = np.asarray(eigs, dtype=np.float64).ravel()
    if not np.isfinite(e).all():
        raise NumericalError("eigenvalues contain NaN or infinite values")
    if min_tail < 2 or min_evals < 2:
        raise ConfigError(f"min_tail and min_evals must be >= 2, got {min_tail}, {min_evals}")
    if not 0.0 <= rel_tol < 1.0:
        raise ConfigError(f"rel_tol must be in [0, 1), got {rel_tol}")
    if fix_fingers not in (None, "xmin_peak", "clip_xmax"):
        raise ConfigError(
            f"fix_fingers must be None, 'xmin_peak' or 'clip_xmax', got {fix_fingers!r}"
        )
    if fix_fingers is not None and not isinstance(xmin, str):
        raise ConfigError("fix_fingers applies to the KS search only (xmin='ks')")
    if isinstance(xmin, str) and xmin != "ks":
        raise ConfigError(f"xmin must be 'ks' or a number, got {xmin!r}")
    if max_fingers < 3 or bins < 2:
        raise ConfigError(f"need max_fingers >= 3 and bins >= 2, got {max_fingers}, {bins}")

    top = float(e.max()) if e.size else 0.0
    x = np.sort(e[e > rel_tol * top]) if top > 0.0 else np.empty(0)
    n = int(x.size)
    lam_max = float(x[-1]) if n else math.nan
    rule = "xmin" if not isinstance(xmin, str) else (fix_fingers or "ks")
    if n < min_evals:
        return _not_fitted(
            f"only {n} positive eigenvalue(s); need >= {min_evals}", n, lam_max, rule, min_tail
        )
    idx = np.arange(n - 1)  # never the largest value alone
    if not isinstance(xmin, str):
        thr = float(xmin)
        if not (math.isfinite(thr) and thr > 0.0):
            raise ConfigError(f"xmin must be a positive number, got {xmin}")
        first = int(np.searchsorted(x, thr, side="left"))
        return _fit_sorted(x, idx[idx == first], lam_max, n, rule, min_tail)
    if fix_fingers == "xmin_peak":
        counts, edges = np.histogram(np.log10(x), bins=bins)
        peak = float(10.0 ** edges[int(np.argmax(counts))])
        lo, hi = XMIN_PEAK_RANGE[0] * peak, XMIN_PEAK_RANGE[1] * peak
        fit = _fit_sorted(x, idx[(x[:-1] >= lo) & (x[:-1] <= hi)], lam_max, n, rule, min_tail)
        return replace(fit, peak=peak)
    fit = _fit_sorted(x, idx, lam_max, n, rule, min_tail)
    if fix_fingers != "clip_xmax" or not fit.fitted:
        return fit
    for clip in range(2, max_fingers):
        if n - clip < min_evals:
            break
        refit = _fit_sorted(x[:-clip], idx[: n - clip - 1], lam_max, n, rule, min_tail)
        if not refit.fitted:
            break
        if refit.alpha_pdf + finger_thresh < fit.alpha_pdf:
            return replace(refit, n_clipped=clip)
        if refit.alpha_pdf <= CLIP_MIN_ALPHA:
            break
    return fit


@dataclass(frozen=True, eq=False)
class PowerLawComparison:
    """KS fit of a group's spectrum against the KS fits of random groups' spectra.

    Attributes
    ----------
    observed:
        The group's fit.
    random_alpha_pdf, random_alpha_weighted, random_k:
        Per random group: ``alpha_pdf``, ``alpha_weighted`` (NaN where not fitted) and the
        tail size (0 where not fitted).
    comparison:
        Group ``alpha_pdf`` vs the fitted random groups, ``alternative="less"`` (heavier
        tail than random); ``None`` when the group was not fitted or fewer than 2 random
        groups were (see ``note``).
    note:
        Why ``comparison`` is missing or rests on fewer random groups, else ``None``.
    """

    observed: PowerLawFit
    random_alpha_pdf: np.ndarray
    random_alpha_weighted: np.ndarray
    random_k: np.ndarray
    comparison: BaselineComparison | None
    note: str | None

    @property
    def n_fitted(self) -> int:
        """Random groups with a fit."""
        return int(np.count_nonzero(self.random_k > 0))

    def to_dict(self) -> dict[str, Any]:
        c = self.comparison
        return {
            "observed": self.observed.to_dict(),
            "random_alpha_pdf_ks": nan_list(self.random_alpha_pdf),
            "random_alpha_weighted": nan_list(self.random_alpha_weighted),
            "random_k_ks": self.random_k.tolist(),
            "comparison_alpha_pdf_ks": None if c is None else c.to_dict(),
            "note": self.note,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PowerLawComparison:
        c = d["comparison_alpha_pdf_ks"]
        return cls(
            observed=PowerLawFit.from_dict(d["observed"]),
            random_alpha_pdf=from_nan_list(d["random_alpha_pdf_ks"]),
            random_alpha_weighted=from_nan_list(d["random_alpha_weighted"]),
            random_k=frozen(np.asarray(d["random_k_ks"], dtype=np.int64)),
            comparison=None if c is None else BaselineComparison.from_dict(c),
            note=None if d["note"] is None else str(d["note"]),
        )


def compare_powerlaw_fits(
    observed: np.ndarray,
    random: Sequence[np.ndarray],
    *,
    label: str = "group",
    scale: float = 1.0,
    **fit_kw: Any,
) -> PowerLawComparison:
    """:func:`powerlaw_fit` of ``scale · observed`` against that of each ``scale · random[i]``.

    Non-finite entries (NaN padding) are dropped first; ``fit_kw`` go to
    :func:`powerlaw_fit`. Fits that are not possible are reported, never raised.
    """

    def fit(eigs: np.ndarray) -> PowerLawFit:
        e = np.asarray(eigs, dtype=np.float64).ravel()
        return powerlaw_fit(scale * e[np.isfinite(e)], **fit_kw)

    obs = fit(observed)
    fits = [fit(e) for e in random]
    ok = np.asarray([f.fitted for f in fits], dtype=bool)
    a = np.asarray([f.alpha_pdf for f in fits], dtype=np.float64)
    comp: BaselineComparison | None = None
    note: str | None = None
    if not obs.fitted:
        note = f"KS fit not possible for the {label}: {obs.reason}"
    elif int(ok.sum()) < 2:
        note = f"KS fit possible on only {int(ok.sum())} of {len(fits)} random groups; need >= 2"
    else:
        comp = compare_to_random(obs.alpha_pdf, a[ok], alternative="less")
        if not ok.all():
            note = f"KS fit not possible on {int((~ok).sum())} of {len(fits)} random groups"
    return PowerLawComparison(
        observed=obs,
        random_alpha_pdf=frozen(a),
        random_alpha_weighted=frozen([f.alpha_weighted for f in fits], dtype=np.float64),
        random_k=frozen([f.k for f in fits], dtype=np.int64),
        comparison=comp,
        note=note,
    )
