"""Figure-1-style log–log rank curve of neuron influence with its three-regime fit.

:class:`RankCurveDisplay` follows scikit-learn's Display pattern: :meth:`RankCurveDisplay.from_fits`
copies the arrays to draw out of already computed :class:`~raretoken.stats.regimes.RegimeFit`
objects (it never fits), :meth:`RankCurveDisplay.plot` draws them and stores ``figure_`` and
``axes_``, and :meth:`RankCurveDisplay.savefig` writes PNG and SVG.

Figures are built with :class:`matplotlib.figure.Figure` on an explicit Agg canvas, so
nothing is registered with ``pyplot`` (no global figure state; a figure is freed with the
display).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from raretoken.errors import ConfigError

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from raretoken.stats.regimes import RegimeFit

__all__ = ["RankCurve", "RankCurveDisplay"]

_COLORS = ("C0", "C1", "C2", "C3")


@dataclass(frozen=True, eq=False)
class RankCurve:
    """What is drawn for one rank curve (all in data units, ready to plot).

    Attributes
    ----------
    label:
        Legend label of the curve (e.g. ``"rare tokens"``).
    rank:
        Ranks ``1..N``.
    delta:
        Sorted Δloss, raised to the fit's floor so that it can be drawn on a log axis.
    segment_ranks, segment_deltas:
        Per fitted segment, the end points ``(first_rank, last_rank)`` and the fitted Δloss
        there.
    segment_roles:
        ``"plateau"``, ``"power law"`` or ``"rapid decay"`` per segment (of the fit's
        regime model, see :attr:`~raretoken.stats.regimes.RegimeFit.model`).
    kappa:
        Power-law exponent of the power-law segment.
    r1, r2:
        Plateau / rapid-decay breakpoints (``None`` when absent).
    plateau_size:
        Number of plateau neurons (0 without a plateau).
    """

    label: str
    rank: np.ndarray
    delta: np.ndarray
    segment_ranks: tuple[tuple[int, int], ...]
    segment_deltas: tuple[tuple[float, float], ...]
    segment_roles: tuple[str, ...]
    kappa: float
    r1: int | None
    r2: int | None
    plateau_size: int

    @classmethod
    def from_fit(cls, fit: RegimeFit, label: str) -> RankCurve:
        """Copy the drawable arrays out of ``fit`` (evaluates the fitted lines, no fitting)."""
        model = fit.model
        ranges = fit.segment_rank_ranges
        pl = fit.power_law_segment
        seg_deltas = []
        roles = []
        for k, (lo, hi) in enumerate(ranges):
            y = [model.intercepts[k] + model.slopes[k] * np.log10(r) for r in (lo, hi)]
            seg_deltas.append((float(10.0 ** y[0]), float(10.0 ** y[1])))
            if k < pl:
                roles.append("plateau")
            elif k == pl:
                roles.append("power law")
            else:
                roles.append("rapid decay")
        return cls(
            label=label,
            rank=np.arange(1, fit.n_neurons + 1),
            delta=np.maximum(np.asarray(fit.delta, dtype=np.float64), fit.floor_value),
            segment_ranks=ranges,
            segment_deltas=tuple(seg_deltas),
            segment_roles=tuple(roles),
            kappa=fit.kappa,
            r1=fit.r1,
            r2=fit.r2,
            plateau_size=fit.plateau_size,
        )


class RankCurveDisplay:
    """Log–log rank curve(s) of Δloss with fitted segments, plateau and breakpoints.

    Build it with :meth:`from_fits`; the constructor only stores its argument.

    Attributes
    ----------
    curves:
        The :class:`RankCurve` objects to draw (rare first, then common).
    figure_, axes_:
        Set by :meth:`plot`.
    """

    def __init__(self, curves: Sequence[RankCurve]) -> None:
        self.curves: tuple[RankCurve, ...] = tuple(curves)
        self.figure_: Figure | None = None
        self.axes_: tuple[Axes, ...] = ()

    @classmethod
    def from_fits(
        cls,
        rare: RegimeFit,
        common: RegimeFit | None = None,
        *,
        rare_label: str = "rare tokens",
        common_label: str = "common tokens",
    ) -> RankCurveDisplay:
        """Display of already computed fits (Figure 1a and, if given, 1b)."""
        curves = [RankCurve.from_fit(rare, rare_label)]
        if common is not None:
            curves.append(RankCurve.from_fit(common, common_label))
        return cls(curves)

    def plot(self, ax: Axes | Sequence[Axes] | None = None) -> RankCurveDisplay:
        """Draw the curves.

        Parameters
        ----------
        ax:
            ``None``: a new figure with one panel per curve (Figure 1 layout). One Axes: all
            curves overlaid on it. A sequence of Axes: one per curve.

        Returns
        -------
        self
        """
        from matplotlib.axes import Axes as _Axes

        if ax is None:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure

            n = len(self.curves)
            fig = Figure(figsize=(5.0 * n, 4.0), layout="constrained")
            FigureCanvasAgg(fig)
            axes: tuple[Axes, ...] = tuple(fig.subplots(1, n, squeeze=False)[0])
            targets = list(axes)
        elif isinstance(ax, _Axes):
            axes = (ax,)
            targets = [ax] * len(self.curves)
            fig = _root_figure(ax)
        else:
            axes = tuple(np.asarray(ax, dtype=object).ravel())
            if len(axes) != len(self.curves):
                raise ConfigError(f"got {len(axes)} axes for {len(self.curves)} curves")
            targets = list(axes)
            fig = _root_figure(axes[0])
        panel = len(set(map(id, targets))) == len(targets)
        for k, (curve, a) in enumerate(zip(self.curves, targets, strict=True)):
            title = f"({chr(ord('a') + k)}) {curve.label}" if panel else None
            _draw_curve(a, curve, _COLORS[k % len(_COLORS)], title, overlay=not panel)
        for a in axes:
            a.legend(fontsize="small", loc="lower left" if panel else "best")
        self.figure_ = fig
        self.axes_ = axes
        return self

    def savefig(self, path_stem: str | Path, *, dpi: int = 150) -> tuple[Path, Path]:
        """Write ``<path_stem>.png`` and ``<path_stem>.svg`` (plotting first if needed)."""
        if self.figure_ is None:
            self.plot()
        assert self.figure_ is not None
        stem = Path(path_stem)
        stem.parent.mkdir(parents=True, exist_ok=True)
        png = stem.parent / (stem.name + ".png")
        svg = stem.parent / (stem.name + ".svg")
        self.figure_.savefig(png, dpi=dpi, format="png")
        self.figure_.savefig(svg, format="svg", metadata={"Date": None})
        return png, svg


def _root_figure(ax: Axes) -> Figure:
    fig: Any = ax.figure
    return getattr(fig, "figure", None) or fig  # a SubFigure's .figure is its root


def _draw_curve(
    ax: Axes, curve: RankCurve, color: str, title: str | None, *, overlay: bool
) -> None:
    """Points, fitted segments, plateau shading and breakpoints of one curve.

    In overlay mode (several curves on one Axes) the fitted lines take the curve's colour and
    their labels name the curve; otherwise they are black.
    """
    ax.loglog(
        curve.rank,
        curve.delta,
        ".",
        color=color,
        markersize=2.5,
        alpha=0.6,
        label=f"{curve.label} ({curve.rank.size} neurons)",
    )
    styles = {"plateau": ":", "power law": "-", "rapid decay": "--"}
    prefix = f"{curve.label}: " if overlay else ""
    seen: set[str] = set()
    for (lo, hi), (d_lo, d_hi), role in zip(
        curve.segment_ranks, curve.segment_deltas, curve.segment_roles, strict=True
    ):
        label = f"power law, κ = {curve.kappa:.2f}" if role == "power law" else role
        label = "_nolegend_" if role in seen else prefix + label
        seen.add(role)
        ax.plot(
            [lo, hi],
            [d_lo, d_hi],
            styles[role],
            color=color if overlay else "k",
            linewidth=1.5,
            label=label,
        )
    if curve.r1 is not None:
        ax.axvspan(
            1,
            curve.r1,
            color=color,
            alpha=0.15,
            label=f"{prefix}plateau: {curve.plateau_size} neurons",
        )
        ax.axvline(
            curve.r1, color=color, linestyle="-.", linewidth=1, label=f"{prefix}r1 = {curve.r1}"
        )
    if curve.r2 is not None:
        ax.axvline(
            curve.r2, color=color, linestyle=":", linewidth=1, label=f"{prefix}r2 = {curve.r2}"
        )
    ax.set_xlabel("neuron rank")
    ax.set_ylabel("Δloss")
    if title is not None:
        ax.set_title(title)
