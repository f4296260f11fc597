"""Depth figure: plateau size, κ, the linear screen's quality and the analyses against layer.

:class:`DepthDisplay` is built from the stored per-layer tables only (the columns of
``layers/layers.csv`` and, when the analyses ran, of ``layers/analyses.csv``; see
:mod:`raretoken.run.layers`): :meth:`DepthDisplay.from_columns` copies them,
:meth:`DepthDisplay.plot` draws three panels, and two more with the analyses: the z-score of
the group against its size-matched random groups for d_eff/N, modularity Q and Hill α, and the
routing differences (Gini rare − common, largest single head − whole layer). A filled marker is
significant at p < 0.05 (each comparison's own test), a hollow one is not. Values fitted on
exact Δloss and on the linear screen are drawn as two separate series (different markers,
never joined by one line): they are different estimates and must not read as one curve.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from raretoken.errors import ConfigError

from ._save import save_png_svg

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["AnalysesDepthTable", "DepthDisplay", "DepthTable"]

VALUE_KINDS = ("exact", "screen")
_MARKERS = {"exact": ("o", "C0"), "screen": ("s", "C1")}
#: Legend label of each kind of fitted values.
SERIES_LABELS = {"exact": "fit on exact mean |Δloss|", "screen": "fit on |linear screen|"}


def _floats(v: Sequence[Any]) -> np.ndarray:
    return np.asarray([math.nan if x is None or x == "" else float(x) for x in v], dtype=float)


@dataclass(frozen=True, eq=False)
class DepthTable:
    """The per-layer numbers the depth figure draws (one entry per layer, by layer)."""

    layer: np.ndarray
    plateau_size: np.ndarray
    kappa: np.ndarray
    values: tuple[str, ...]
    spearman_rare: np.ndarray
    spearman_common: np.ndarray
    recall_rare: np.ndarray
    recall_common: np.ndarray

    @classmethod
    def from_columns(cls, cols: Mapping[str, Sequence[Any]]) -> DepthTable:
        """From the columns of ``layers.csv`` (missing numbers: ``None``/``""``/NaN)."""
        need = ("layer", "plateau_size", "kappa", "values", "spearman_rare",
                "spearman_common", "recall_rare", "recall_common")  # fmt: skip
        missing = [n for n in need if n not in cols]
        if missing:
            raise ConfigError(f"the depth table lacks the columns {missing}")
        layer = np.asarray([int(x) for x in cols["layer"]], dtype=np.int64)
        values = tuple(str(v) for v in cols["values"])
        if bad := sorted(set(values) - set(VALUE_KINDS)):
            raise ConfigError(f"values must be one of {VALUE_KINDS}, got {bad}")
        if len(set(layer.tolist())) != layer.size:
            raise ConfigError("the depth table lists a layer twice")
        order = np.argsort(layer, kind="stable")
        f = {n: _floats(cols[n])[order] for n in need if n not in ("layer", "values")}
        return cls(
            layer=layer[order],
            values=tuple(values[i] for i in order),
            plateau_size=f["plateau_size"],
            kappa=f["kappa"],
            spearman_rare=f["spearman_rare"],
            spearman_common=f["spearman_common"],
            recall_rare=f["recall_rare"],
            recall_common=f["recall_common"],
        )


#: Significance level of the filled markers of the analyses panels.
SIGNIFICANCE = 0.05
#: (column of the effect, column of its p-value, legend label, marker) of each analyses panel.
Z_SERIES = (("z_d_eff", "p_d_eff", "d_eff/N (z)", "o"), ("z_q", "p_q", "modularity Q (z)", "s"),
            ("z_alpha", "p_alpha", "Hill α (z)", "^"))  # fmt: skip
ROUTING_SERIES = (("gini_diff", "p_gini", "Gini rare − common", "D"),
                  ("impact_diff", "p_single_vs_layer", "single − layer impact", "v"))  # fmt: skip


@dataclass(frozen=True, eq=False)
class AnalysesDepthTable:
    """The per-layer analyses the depth figure draws (columns of ``layers/analyses.csv``)."""

    layer: np.ndarray
    values: Mapping[str, np.ndarray]

    @classmethod
    def from_columns(cls, cols: Mapping[str, Sequence[Any]]) -> AnalysesDepthTable:
        need = ["layer", *(c for s in (*Z_SERIES, *ROUTING_SERIES) for c in s[:2])]
        missing = [n for n in need if n not in cols]
        if missing:
            raise ConfigError(f"the analyses table lacks the columns {missing}")
        layer = np.asarray([int(x) for x in cols["layer"]], dtype=np.int64)
        if len(set(layer.tolist())) != layer.size:
            raise ConfigError("the analyses table lists a layer twice")
        order = np.argsort(layer, kind="stable")
        vals = {n: _floats(cols[n])[order] for n in need[1:]}
        return cls(layer=layer[order], values=vals)


def _effects(ax: Axes, t: AnalysesDepthTable, series: Sequence[tuple[str, str, str, str]]) -> bool:
    """Each series as a faint line over the layers and markers, filled where p < 0.05; whether
    anything was drawn."""
    drew = False
    for i, (col, pcol, label, marker) in enumerate(series):
        y, p = t.values[col], t.values[pcol]
        ok = np.isfinite(y)
        if not ok.any():
            continue
        drew = True
        color = f"C{i + 2}"
        ax.plot(t.layer[ok], y[ok], "-", color=color, alpha=0.35, linewidth=1)
        sig = ok & (p < SIGNIFICANCE)
        ax.plot(t.layer[sig], y[sig], marker=marker, color=color, linestyle="none",
                label=f"{label}, p < {SIGNIFICANCE:g}")  # fmt: skip
        ax.plot(t.layer[ok & ~sig], y[ok & ~sig], marker=marker, color=color, linestyle="none",
                markerfacecolor="none", label=f"{label}, n.s.")  # fmt: skip
    ax.axhline(0.0, color="0.6", linewidth=0.8)
    ax.set_xlabel("MLP layer")
    return drew


class DepthDisplay:
    """Three panels against layer: plateau size, κ, screen quality (Spearman and recall).

    Attributes
    ----------
    table:
        The :class:`DepthTable` drawn.
    figure_, axes_:
        Set by :meth:`plot`.
    """

    def __init__(self, table: DepthTable, analyses: AnalysesDepthTable | None = None) -> None:
        self.table = table
        self.analyses = analyses
        self.figure_: Figure | None = None
        self.axes_: tuple[Axes, ...] = ()

    @classmethod
    def from_columns(
        cls,
        cols: Mapping[str, Sequence[Any]],
        analyses: Mapping[str, Sequence[Any]] | None = None,
    ) -> DepthDisplay:
        """From the columns of ``layers.csv`` and, optionally, of ``analyses.csv``."""
        an = None if analyses is None else AnalysesDepthTable.from_columns(analyses)
        return cls(DepthTable.from_columns(cols), an)

    def plot(self) -> DepthDisplay:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        t, an = self.table, self.analyses
        fig = Figure(figsize=(13.0, 3.8 if an is None else 7.6))
        FigureCanvasAgg(fig)
        if an is None:
            axes: tuple[Axes, ...] = tuple(fig.subplots(1, 3, squeeze=False)[0])
        else:
            grid = fig.add_gridspec(2, 3)
            axes = (*(fig.add_subplot(grid[0, i]) for i in range(3)),
                    fig.add_subplot(grid[1, :2]), fig.add_subplot(grid[1, 2]))  # fmt: skip
        kinds = np.asarray(t.values)
        for ax, y, name in ((axes[0], t.plateau_size, "plateau size (neurons)"),
                            (axes[1], t.kappa, "κ (power-law exponent)")):  # fmt: skip
            for kind in VALUE_KINDS:
                sel = kinds == kind
                if sel.any():
                    marker, color = _MARKERS[kind]
                    ax.plot(t.layer[sel], y[sel], marker=marker, color=color, linestyle="none",
                            label=SERIES_LABELS[kind])  # fmt: skip
            ax.set_xlabel("MLP layer")
            ax.set_ylabel(name)
            ax.legend(fontsize=8)
        q = axes[2]
        for y, label, style in ((t.spearman_rare, "Spearman, rare", "-o"),
                                (t.spearman_common, "Spearman, common", "--o"),
                                (t.recall_rare, "recall, rare", "-^"),
                                (t.recall_common, "recall, common", "--^")):  # fmt: skip
            q.plot(t.layer, y, style, label=label)
        q.set_ylim(-1.05, 1.05)
        q.set_xlabel("MLP layer")
        q.set_ylabel("screen vs exact")
        q.legend(fontsize=8, loc="lower left")
        if an is not None:
            z, rt = axes[3], axes[4]
            _effects(z, an, Z_SERIES)
            z.set_ylabel("group vs random groups (z)")
            z.set_title("analyses per layer (filled: p < 0.05)", fontsize=9)
            z.legend(fontsize=7, ncol=3)
            if _effects(rt, an, ROUTING_SERIES):
                rt.legend(fontsize=7)
            else:
                rt.text(0.5, 0.5, "routing not run", transform=rt.transAxes, ha="center")
            rt.set_ylabel("routing difference")
            rt.set_title("attention routing", fontsize=9)
        ticks = _thinned(t.layer if an is None else np.union1d(t.layer, an.layer))
        for ax in axes:
            ax.set_xticks(ticks.tolist())
        fig.suptitle("Rare-token neurons across depth")
        self.figure_, self.axes_ = fig, axes
        return self

    def savefig(self, path_stem: str | Path, *, dpi: int = 150) -> tuple[Path, Path]:
        """Write ``<path_stem>.png`` and ``<path_stem>.svg`` (plotting first if needed)."""
        if self.figure_ is None:
            self.plot()
        assert self.figure_ is not None
        return save_png_svg(self.figure_, path_stem, dpi=dpi)


#: Most layer labels on an axis before they are thinned (they would overlap).
MAX_TICKS = 16


def _thinned(layers: np.ndarray, most: int = MAX_TICKS) -> np.ndarray:
    """The layers to label: all of them up to ``most``, else every k-th (k from 2, 5, 10, ...)
    starting at the first, with the last layer always labelled."""
    layers = np.asarray(layers)
    if layers.size <= most:
        return layers
    for k in (2, 5, 10, 20, 50, 100):
        keep = layers[::k]
        if keep.size < most:
            break
    return np.union1d(keep, layers[-1:])
