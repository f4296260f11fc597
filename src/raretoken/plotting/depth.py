"""Depth figure: plateau size, κ and the linear screen's quality against MLP layer.

:class:`DepthDisplay` is built from the stored per-layer table only (the columns of
``layers/layers.csv``, see :mod:`raretoken.run.layers`): :meth:`DepthDisplay.from_columns`
copies them, :meth:`DepthDisplay.plot` draws three panels. Values fitted on exact Δloss and on
the linear screen are drawn as two separate series (different markers, never joined by one
line): they are different estimates and must not read as one curve.
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

__all__ = ["DepthDisplay", "DepthTable"]

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


class DepthDisplay:
    """Three panels against layer: plateau size, κ, screen quality (Spearman and recall).

    Attributes
    ----------
    table:
        The :class:`DepthTable` drawn.
    figure_, axes_:
        Set by :meth:`plot`.
    """

    def __init__(self, table: DepthTable) -> None:
        self.table = table
        self.figure_: Figure | None = None
        self.axes_: tuple[Axes, ...] = ()

    @classmethod
    def from_columns(cls, cols: Mapping[str, Sequence[Any]]) -> DepthDisplay:
        return cls(DepthTable.from_columns(cols))

    def plot(self) -> DepthDisplay:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        t = self.table
        fig = Figure(figsize=(13.0, 3.8))
        FigureCanvasAgg(fig)
        axes = tuple(fig.subplots(1, 3, squeeze=False)[0])
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
        for ax in axes:
            ax.set_xticks(t.layer.tolist())
        fig.suptitle("Rare-token neurons across depth")
        self.figure_, self.axes_ = fig, axes
        return self

    def savefig(self, path_stem: str | Path, *, dpi: int = 150) -> tuple[Path, Path]:
        """Write ``<path_stem>.png`` and ``<path_stem>.svg`` (plotting first if needed)."""
        if self.figure_ is None:
            self.plot()
        assert self.figure_ is not None
        return save_png_svg(self.figure_, path_stem, dpi=dpi)
