"""Result types of the three-regime rank-curve fit (:mod:`raretoken.stats.regimes`).

:class:`RegimeSettings` holds the parameters of :func:`~raretoken.stats.regimes.fit_regimes`,
:class:`SegmentFit` one candidate segmented fit and :class:`RegimeFit` the regimes read from
them; all round-trip through ``to_dict`` / ``from_dict`` (JSON-safe).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from raretoken.errors import ConfigError

from ._common import finite_or_none, frozen

__all__ = [
    "RegimeFit",
    "RegimeSettings",
    "SegmentFit",
]


@dataclass(frozen=True)
class RegimeSettings:
    """Parameters of :func:`fit_regimes` (see the module docstring for their role)."""

    max_segments: int = 3
    min_segment_points: int = 5
    max_plateau_fraction: float = 0.1
    floor: float = 1e-6
    grid_step: float = 0.01
    min_slope_gap: float = 0.1
    min_plateau_step: float = 0.15

    def validate(self) -> None:
        """Raise :class:`ConfigError` for out-of-range values."""
        if self.max_segments < 1:
            raise ConfigError(f"max_segments must be >= 1, got {self.max_segments}")
        if self.min_segment_points < 3:
            raise ConfigError(f"min_segment_points must be >= 3, got {self.min_segment_points}")
        if not 0.0 < self.max_plateau_fraction <= 1.0:
            raise ConfigError(
                f"max_plateau_fraction must be in (0, 1], got {self.max_plateau_fraction}"
            )
        if not 0.0 < self.floor < 1.0:
            raise ConfigError(f"floor (relative to max Δloss) must be in (0, 1), got {self.floor}")
        if not (math.isfinite(self.grid_step) and 0.0 <= self.grid_step <= 0.5):
            raise ConfigError(f"grid_step must be in [0, 0.5] decades, got {self.grid_step}")
        if not math.isfinite(self.min_slope_gap) or not math.isfinite(self.min_plateau_step):
            raise ConfigError("min_slope_gap and min_plateau_step must be finite")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RegimeSettings:
        return cls(**dict(d))


@dataclass(frozen=True)
class SegmentFit:
    """One candidate segmented fit of the rank curve, in ``(log10 rank, log10 Δ)`` space.

    Attributes
    ----------
    n_segments:
        Number of segments.
    breakpoints:
        1-based ranks at which segments 2..n start (empty for one segment).
    slopes, intercepts:
        Per segment, ``log10 Δ ≈ intercept + slope · log10 rank``.
    rss:
        Residual sum of squares over the grid points.
    bic:
        ``n_points · ln(RSS / n_points) + 3 · n_segments · ln(n_points)``.
    r_squared:
        ``1 - RSS / TSS`` on the grid points.
    n_points:
        Number of grid points fitted.
    """

    n_segments: int
    breakpoints: tuple[int, ...]
    slopes: tuple[float, ...]
    intercepts: tuple[float, ...]
    rss: float
    bic: float
    r_squared: float
    n_points: int

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["breakpoints"] = list(self.breakpoints)
        d["slopes"] = list(self.slopes)
        d["intercepts"] = list(self.intercepts)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SegmentFit:
        return cls(
            n_segments=int(d["n_segments"]),
            breakpoints=tuple(int(v) for v in d["breakpoints"]),
            slopes=tuple(float(v) for v in d["slopes"]),
            intercepts=tuple(float(v) for v in d["intercepts"]),
            rss=float(d["rss"]),
            bic=float(d["bic"]),
            r_squared=float(d["r_squared"]),
            n_points=int(d["n_points"]),
        )


@dataclass(frozen=True, eq=False)
class RegimeFit:
    """Three-regime reading of one rank curve.

    Attributes
    ----------
    neuron_ids:
        Neuron ids in rank order (descending Δloss); rank ``r`` is ``neuron_ids[r - 1]``.
    delta:
        Δloss in rank order (as given, not clipped).
    floor_value:
        Absolute floor, ``settings.floor × max Δ``; ranks with ``Δ <= floor_value`` are not
        fitted.
    n_fitted:
        Number of ranks fitted (those above the floor: ranks ``1..n_fitted``).
    grid_log10_rank, grid_log10_delta:
        The points actually fitted (see :func:`log_rank_grid`).
    candidates:
        Best fit with 1, 2, ... segments (those the grid can hold).
    best:
        The candidate with the lowest BIC.
    model:
        The candidate the regimes are read from: ``best`` when it has a plateau, else the
        candidate with ``min(best.n_segments, 2)`` segments.
    has_plateau:
        Whether the plateau criterion holds for ``best``.
    plateau_neurons:
        Ids of ranks ``< r1`` when ``has_plateau`` (else empty).
    kappa:
        ``-slope`` of the power-law segment of ``model`` (eq. 11).
    power_law_segment:
        Index of that segment in ``model`` (1 with a plateau, else 0).
    r1, r2:
        First rank of the power-law regime when a plateau precedes it; first rank of the
        rapid-decay regime (``None`` when absent).
    plateau_slope_gap, plateau_step:
        For ``best`` with >= 2 segments: ``slope_1 - slope_2``, and the height (decades) of
        the first segment's line above the second's at the last rank of the first segment;
        ``None`` for a one-segment fit.
    settings:
        Parameters used.
    """

    neuron_ids: np.ndarray
    delta: np.ndarray
    floor_value: float
    n_fitted: int
    grid_log10_rank: np.ndarray
    grid_log10_delta: np.ndarray
    candidates: tuple[SegmentFit, ...]
    best: SegmentFit
    model: SegmentFit
    has_plateau: bool
    plateau_neurons: np.ndarray
    kappa: float
    power_law_segment: int
    r1: int | None
    r2: int | None
    plateau_slope_gap: float | None
    plateau_step: float | None
    settings: RegimeSettings

    @property
    def n_neurons(self) -> int:
        return int(self.delta.size)

    @property
    def plateau_size(self) -> int:
        return int(self.plateau_neurons.size)

    @property
    def segment_rank_ranges(self) -> tuple[tuple[int, int], ...]:
        """``(first_rank, last_rank)`` of every segment of :attr:`model` (inclusive).

        With a plateau, the first boundary is the refined ``r1``.
        """
        bps = self.model.breakpoints
        if self.r1 is not None:
            bps = (self.r1, *bps[1:])
        firsts = (1, *bps)
        lasts = (*(b - 1 for b in bps), self.n_fitted)
        return tuple(zip(firsts, lasts, strict=True))

    def to_dict(self) -> dict[str, Any]:
        return {
            "neuron_ids": self.neuron_ids.tolist(),
            "delta": self.delta.tolist(),
            "floor_value": self.floor_value,
            "n_fitted": self.n_fitted,
            "grid_log10_rank": self.grid_log10_rank.tolist(),
            "grid_log10_delta": self.grid_log10_delta.tolist(),
            "candidates": [c.to_dict() for c in self.candidates],
            "best_n_segments": self.best.n_segments,
            "model_n_segments": self.model.n_segments,
            "has_plateau": self.has_plateau,
            "plateau_neurons": self.plateau_neurons.tolist(),
            "kappa": self.kappa,
            "power_law_segment": self.power_law_segment,
            "r1": self.r1,
            "r2": self.r2,
            "plateau_slope_gap": self.plateau_slope_gap,
            "plateau_step": self.plateau_step,
            "settings": self.settings.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RegimeFit:
        candidates = tuple(SegmentFit.from_dict(c) for c in d["candidates"])
        by_n = {c.n_segments: c for c in candidates}
        return cls(
            neuron_ids=frozen(np.asarray(d["neuron_ids"], dtype=np.int64)),
            delta=frozen(np.asarray(d["delta"], dtype=np.float64)),
            floor_value=float(d["floor_value"]),
            n_fitted=int(d["n_fitted"]),
            grid_log10_rank=frozen(np.asarray(d["grid_log10_rank"], dtype=np.float64)),
            grid_log10_delta=frozen(np.asarray(d["grid_log10_delta"], dtype=np.float64)),
            candidates=candidates,
            best=by_n[int(d["best_n_segments"])],
            model=by_n[int(d["model_n_segments"])],
            has_plateau=bool(d["has_plateau"]),
            plateau_neurons=frozen(np.asarray(d["plateau_neurons"], dtype=np.int64)),
            kappa=float(d["kappa"]),
            power_law_segment=int(d["power_law_segment"]),
            r1=None if d["r1"] is None else int(d["r1"]),
            r2=None if d["r2"] is None else int(d["r2"]),
            plateau_slope_gap=finite_or_none(d["plateau_slope_gap"]),
            plateau_step=finite_or_none(d["plateau_step"]),
            settings=RegimeSettings.from_dict(d["settings"]),
        )
