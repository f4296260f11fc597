"""Result of the regime bootstrap (:class:`RegimeBootstrap`) and the coverage of its intervals.

:func:`~raretoken.stats.regime_bootstrap.bootstrap_regimes` fills it; this module holds the
type, its JSON form and its report sentence.

Intervals and their measured coverage
-------------------------------------
Synthetic data with a known answer: 300 neurons on a planted three-regime curve (``κ = 0.7``),
rows ``μ_i · g_wi · e`` with a gamma(2) window effect ``g`` (intra-window correlation 0.25),
windows of 1 + Poisson(6) rows, 100 data sets, 100 resamples, 95 % intervals:

* ``κ̂`` is biased upwards by sorting noisy means (and the bootstrap repeats the bias), so
  percentile intervals of ``κ`` under-cover: by window 57 % (20 windows), 71 % (50), 82 %
  (100); 88 % without a window effect (and ~85 % for independent positions, 200–1000 rows).
  The *basic* interval ``(2κ̂ - q_hi, 2κ̂ - q_lo)`` reflects the bias: by window it covered
  93 % with 50 and 100 windows, 88 % with 20 (:data:`MIN_WINDOWS`); without a window
  effect 93 %. Resampling positions instead gave 61 % (percentile) and 76 % (basic) with 50
  windows. :attr:`RegimeBootstrap.ci_kappa_basic` is the interval to report.
* ``r1``, ``r2``, ``R²`` and the plateau size keep percentile intervals; percentile
  intervals of a *mean* by window needed ~200 windows for 93–97 % on such skewed data (see
  :mod:`raretoken.stats.mean_bootstrap`, whose studentised interval covers from ~20 windows).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from raretoken.errors import ConfigError

from ._common import from_nan_list, frozen, nan_list
from .regime_results import RegimeFit

__all__ = [
    "MIN_WINDOWS",
    "RegimeBootstrap",
]

#: Fewest windows for which the basic 95 % interval of ``κ`` covered >= 93 % in simulations
#: (see the module docstring); below it :attr:`RegimeBootstrap.caveat` says so.
MIN_WINDOWS = 50


def _ci(samples: np.ndarray, level: float) -> tuple[float, float] | None:
    ok = samples[np.isfinite(samples)]
    if ok.size == 0:
        return None
    lo, hi = np.quantile(ok, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return float(lo), float(hi)


def _basic(estimate: float, samples: np.ndarray, level: float) -> tuple[float, float] | None:
    """Basic bootstrap interval ``(2·estimate - q_hi, 2·estimate - q_lo)``."""
    ci = _ci(samples, level)
    return None if ci is None else (2.0 * estimate - ci[1], 2.0 * estimate - ci[0])


def _opt_pair(v: Sequence[float] | None) -> tuple[float, float] | None:
    return None if v is None else (float(v[0]), float(v[1]))


def _opt_int(v: Any) -> int | None:
    return None if v is None else int(v)


@dataclass(frozen=True, eq=False)
class RegimeBootstrap:
    """Bootstrap of :func:`~raretoken.stats.regime_fit.fit_regimes` over windows or positions.

    Attributes
    ----------
    n_boot, seed, level:
        Number of resamples, the int seed (``None`` when a Generator was passed) and the
        confidence level of the percentile intervals.
    estimate:
        Fit on the full data (Δ = column means of ``per_position``).
    neuron_ids:
        Neuron id of every column of ``per_position``.
    membership_frequency:
        Per neuron (aligned with ``neuron_ids``): fraction of resamples in which it is a
        plateau neuron (a resample without a plateau counts as "not a member").
    plateau_existence_rate:
        Fraction of resamples whose fit has a plateau.
    kappa, r1, r2, r_squared, plateau_size:
        Per-resample values (``r1``/``r2`` are NaN where undefined; ``plateau_size`` is 0
        without a plateau; ``r_squared`` is that of the regime model).
    ci_kappa, ci_r1, ci_r2, ci_r_squared, ci_plateau_size:
        Percentile intervals over the resamples where the quantity is defined (``None`` if
        it never is).
    ci_kappa_basic:
        Basic (bias-reflecting) interval of ``κ``, ``(2κ̂ - q_hi, 2κ̂ - q_lo)`` with ``q`` the
        percentile bounds: it corrects the bias of ``κ̂`` that sorting noisy means causes
        (see the module docstring for the measured coverage). ``None`` when read from a result
        written before it was recorded.
    unit:
        What was resampled: ``"window"`` (cluster bootstrap) or ``"position"``.
    n_clusters:
        Number of windows resampled (``None`` for ``unit="position"``).
    n_positions:
        Number of rows (scored positions); ``None`` when read from a result written before
        it was recorded.
    """

    n_boot: int
    seed: int | None
    level: float
    estimate: RegimeFit
    neuron_ids: np.ndarray
    membership_frequency: np.ndarray
    plateau_existence_rate: float
    kappa: np.ndarray
    r1: np.ndarray
    r2: np.ndarray
    r_squared: np.ndarray
    plateau_size: np.ndarray
    ci_kappa: tuple[float, float] | None
    ci_r1: tuple[float, float] | None
    ci_r2: tuple[float, float] | None
    ci_r_squared: tuple[float, float] | None
    ci_plateau_size: tuple[float, float] | None
    ci_kappa_basic: tuple[float, float] | None = None
    unit: str = "position"
    n_clusters: int | None = None
    n_positions: int | None = None

    def __post_init__(self) -> None:
        if self.unit not in ("window", "position"):
            raise ConfigError(f"unit must be 'window' or 'position', got {self.unit!r}")
        if (self.unit == "window") != (self.n_clusters is not None):
            raise ConfigError("n_clusters is given exactly when the unit is 'window'")

    @property
    def method(self) -> str:
        """The resampling, in words: ``"bootstrap over windows (49 windows, 200 resamples)"``
        or ``"bootstrap over positions (812 positions, 200 resamples)"``."""
        if self.unit == "window":
            return f"bootstrap over windows ({self.n_clusters} windows, {self.n_boot} resamples)"
        if self.n_positions is None:
            return f"bootstrap over positions ({self.n_boot} resamples)"
        return f"bootstrap over positions ({self.n_positions} positions, {self.n_boot} resamples)"

    @property
    def caveat(self) -> str | None:
        """Why the intervals may be too narrow, or ``None``: positions resampled as if
        independent, or fewer than :data:`MIN_WINDOWS` windows."""
        if self.unit == "position":
            return (
                "positions were resampled as if independent; positions of one window are "
                "correlated, so the intervals are too narrow"
            )
        assert self.n_clusters is not None
        if self.n_clusters < MIN_WINDOWS:
            return (
                f"only {self.n_clusters} windows: the intervals may be too narrow (95 % "
                f"intervals of κ held the true value >= 93 % of the time from {MIN_WINDOWS} "
                "windows on in simulations, 88 % with 20)"
            )
        return None

    def summary(self) -> str:
        """One sentence for a report, stating the method: ``"Bootstrap over windows (49
        windows, 200 resamples), 95 % intervals: κ [0.61, 0.70] (basic interval; percentile
        [0.62, 0.71]), plateau size [9, 14], plateau found in 97 % of resamples."`` followed by
        the :attr:`caveat`, if any."""

        def pair(ci: tuple[float, float] | None, digits: int) -> str:
            return "n/a" if ci is None else f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"

        if self.ci_kappa_basic is None:
            kappa = f"κ {pair(self.ci_kappa, 3)} (percentile)"
        else:
            kappa = (
                f"κ {pair(self.ci_kappa_basic, 3)} (basic interval; percentile "
                f"{pair(self.ci_kappa, 3)})"
            )
        text = (
            f"{self.method[0].upper()}{self.method[1:]}, {100 * self.level:g} % intervals: "
            f"{kappa}, plateau size {pair(self.ci_plateau_size, 0)}, plateau found in "
            f"{100 * self.plateau_existence_rate:.0f} % of resamples."
        )
        return text if self.caveat is None else f"{text} Caveat: {self.caveat}."

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_boot": self.n_boot,
            "seed": self.seed,
            "level": self.level,
            "unit": self.unit,
            "n_clusters": self.n_clusters,
            "n_positions": self.n_positions,
            "interval": "percentile (ci_*); basic (ci_kappa_basic)",
            "method": self.method,
            "estimate": self.estimate.to_dict(),
            "neuron_ids": self.neuron_ids.tolist(),
            "membership_frequency": self.membership_frequency.tolist(),
            "plateau_existence_rate": self.plateau_existence_rate,
            "kappa": nan_list(self.kappa),
            "r1": nan_list(self.r1),
            "r2": nan_list(self.r2),
            "r_squared": nan_list(self.r_squared),
            "plateau_size": self.plateau_size.tolist(),
            "ci_kappa": None if self.ci_kappa is None else list(self.ci_kappa),
            "ci_r1": None if self.ci_r1 is None else list(self.ci_r1),
            "ci_r2": None if self.ci_r2 is None else list(self.ci_r2),
            "ci_r_squared": None if self.ci_r_squared is None else list(self.ci_r_squared),
            "ci_plateau_size": None if self.ci_plateau_size is None else list(self.ci_plateau_size),
            "ci_kappa_basic": None if self.ci_kappa_basic is None else list(self.ci_kappa_basic),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RegimeBootstrap:
        """Inverse of :meth:`to_dict`; a dict written before ``unit`` was recorded reads as a
        position bootstrap."""
        return cls(
            n_boot=int(d["n_boot"]),
            seed=None if d["seed"] is None else int(d["seed"]),
            level=float(d["level"]),
            estimate=RegimeFit.from_dict(d["estimate"]),
            neuron_ids=frozen(np.asarray(d["neuron_ids"], dtype=np.int64)),
            membership_frequency=frozen(np.asarray(d["membership_frequency"], dtype=float)),
            plateau_existence_rate=float(d["plateau_existence_rate"]),
            kappa=from_nan_list(d["kappa"]),
            r1=from_nan_list(d["r1"]),
            r2=from_nan_list(d["r2"]),
            r_squared=from_nan_list(d["r_squared"]),
            plateau_size=frozen(np.asarray(d["plateau_size"], dtype=np.int64)),
            ci_kappa=_opt_pair(d["ci_kappa"]),
            ci_r1=_opt_pair(d["ci_r1"]),
            ci_r2=_opt_pair(d["ci_r2"]),
            ci_r_squared=_opt_pair(d["ci_r_squared"]),
            ci_plateau_size=_opt_pair(d["ci_plateau_size"]),
            ci_kappa_basic=_opt_pair(d.get("ci_kappa_basic")),
            unit=str(d.get("unit", "position")),
            n_clusters=_opt_int(d.get("n_clusters")),
            n_positions=_opt_int(d.get("n_positions")),
        )
