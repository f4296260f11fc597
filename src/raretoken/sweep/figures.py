"""Cross-run figures of a sweep: Figure 3 (every run's rank curves) and training dynamics.

Results own their plots and plotting never recomputes: :class:`RankCurveGrid` holds the
regime fits each run wrote to ``regimes.json`` (drawn with
:class:`~raretoken.plotting.rank_curve.RankCurveDisplay`), :class:`DynamicsFigure` holds
per-model series read from the sweep table (:mod:`raretoken.sweep.table`); their ``plot``
methods only draw.

Training dynamics
-----------------
One figure per quantity of :data:`DYNAMICS`, against the training step (``step`` column), one
line per model (``model_label``). The step axis is logarithmic; when a step 0 is present it
is ``symlog`` with a linear stretch below 1, so step 0 sits at the left edge and steps 1, 2,
4, ... are evenly spaced. Bands: the run's own intervals (plateau size and κ: 95 % window
bootstrap; Gini rare − common: 95 % t interval across heads) and, dashed, the size-matched
random groups' mean ± 1 SD. A model whose checkpoints have different tokenizers is drawn
dotted and labelled "unpaired".
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import InsufficientDataError
from ..stats.regime_results import RegimeFit
from .run_values import read_json

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["DYNAMICS", "DynamicsFigure", "DynamicsLine", "RankCurveGrid", "dynamics_figures"]

#: Lines with more points than this are rasterised inside the SVG (keeps big sweeps small).
_RASTER_POINTS = 500


@dataclass(frozen=True, eq=False)
class RankCurveGrid:
    """Figure 3: every run's rare and common rank curves, one panel per run."""

    labels: tuple[str, ...]
    rare: tuple[RegimeFit, ...]
    common: tuple[RegimeFit | None, ...]
    unreadable: tuple[str, ...] = ()

    @classmethod
    def from_sweep(cls, out_dir: Path | str, rows: Sequence[Mapping[str, Any]]) -> RankCurveGrid:
        """The fits of the complete rows' runs (``<out_dir>/<run_dir>/regimes.json``); runs
        whose file is missing or unreadable are listed in :attr:`unreadable`."""
        labels, rare, common, unreadable = [], [], [], []
        for r in rows:
            if r.get("status") != "complete":
                continue
            regimes = read_json(Path(out_dir) / str(r["run_dir"]) / "regimes.json") or {}
            try:
                fit = RegimeFit.from_dict(regimes["rare"])
                c = regimes.get("common")
                common_fit = RegimeFit.from_dict(c) if isinstance(c, dict) else None
            except (KeyError, TypeError, ValueError):
                unreadable.append(str(r["task"]))
                continue
            labels.append(str(r["task"]))
            rare.append(fit)
            common.append(common_fit)
        return cls(tuple(labels), tuple(rare), tuple(common), tuple(unreadable))

    def to_dict(self) -> dict[str, Any]:
        return {"labels": list(self.labels), "rare": [f.to_dict() for f in self.rare],
                "common": [None if f is None else f.to_dict() for f in self.common],
                "unreadable": list(self.unreadable)}  # fmt: skip

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RankCurveGrid:
        return cls(tuple(d["labels"]), tuple(RegimeFit.from_dict(f) for f in d["rare"]),
                   tuple(None if f is None else RegimeFit.from_dict(f) for f in d["common"]),
                   tuple(d.get("unreadable", ())))  # fmt: skip

    def plot(self, ncols: int | None = None) -> Figure:
        """A figure with one log–log panel per run (rare and common overlaid, plateau shaded);
        ``ncols`` default: one row up to 4 runs, else ``ceil(sqrt(n))`` columns, at most 6."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        from ..plotting.rank_curve import RankCurveDisplay

        n = len(self.labels)
        if n == 0:
            raise InsufficientDataError("no complete run with regime fits to draw")
        if ncols is None:
            ncols = n if n <= 4 else min(6, math.ceil(math.sqrt(n)))
        ncols = max(1, min(ncols, n))
        nrows = math.ceil(n / ncols)
        fig = Figure(figsize=(4.8 * ncols, 3.9 * nrows))
        FigureCanvasAgg(fig)
        axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
        for ax, label, rare, common in zip(axes, self.labels, self.rare, self.common, strict=False):
            RankCurveDisplay.from_fits(rare, common).plot(ax)
            plateau = f"plateau {rare.plateau_size}" if rare.has_plateau else "no plateau"
            ax.set_title(f"{label} ({plateau})", fontsize="medium")
            ax.legend(fontsize="x-small", loc="lower left")
            for line in ax.get_lines():
                if np.size(line.get_xdata()) > _RASTER_POINTS:
                    line.set_rasterized(True)
        for ax in axes[n:]:
            fig.delaxes(ax)
        fig.suptitle("Figure 3: Δloss vs neuron rank of every run (rare and common targets)")
        return fig


@dataclass(frozen=True)
class DynamicsLine:
    """One model's series against the training step (``None``: no value at that step)."""

    model: str
    steps: tuple[int, ...]
    value: tuple[float | None, ...]
    lo: tuple[float | None, ...] | None = None
    hi: tuple[float | None, ...] | None = None
    random_mean: tuple[float | None, ...] | None = None
    random_sd: tuple[float | None, ...] | None = None
    paired: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DynamicsLine:
        data: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**data)


@dataclass(frozen=True)
class DynamicsFigure:
    """One quantity against the training step, one line per model."""

    key: str
    title: str
    ylabel: str
    band: str
    lines: tuple[DynamicsLine, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "title": self.title, "ylabel": self.ylabel, "band": self.band,
                "lines": [x.to_dict() for x in self.lines]}  # fmt: skip

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DynamicsFigure:
        return cls(str(d["key"]), str(d["title"]), str(d["ylabel"]), str(d["band"]),
                   tuple(DynamicsLine.from_dict(x) for x in d["lines"]))  # fmt: skip

    def plot(self, ax: Axes | None = None) -> Figure:
        """Draw the lines and bands on ``ax`` (a new figure when ``None``)."""
        from ..plotting.analyses import new_axes

        ax = new_axes() if ax is None else ax
        for k, line in enumerate(self.lines):
            _draw_line(ax, line, f"C{k % 10}")
        steps = [s for line in self.lines for s in line.steps]
        if steps and min(steps) <= 0:
            ax.set_xscale("symlog", linthresh=1.0, linscale=0.4)
            ax.set_xlabel("training step (symlog: 0, then log from 1)")
        else:
            ax.set_xscale("log")
            ax.set_xlabel("training step (log)")
        from matplotlib.ticker import FuncFormatter

        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        distinct = sorted(set(steps))
        if 1 < len(distinct) <= 12:  # few checkpoints: label each (decade ticks would skip them)
            ax.set_xticks(distinct)
        ax.set_ylabel(self.ylabel)
        ax.set_title(f"{self.title}\n{self.band}", fontsize="medium")
        ax.legend(fontsize="x-small", loc="best")
        fig: Any = ax.figure
        return getattr(fig, "figure", None) or fig  # type: ignore[no-any-return]


def _arr(values: Sequence[float | None] | None) -> np.ndarray | None:
    if values is None:
        return None
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def _draw_line(ax: Axes, line: DynamicsLine, color: str) -> None:
    x = np.asarray(line.steps, dtype=np.float64)
    y = np.array([np.nan if v is None else v for v in line.value], dtype=np.float64)
    unpaired = line.paired is False
    label = f"{line.model} (unpaired: tokenizers differ)" if unpaired else line.model
    ax.plot(x, y, linestyle=":" if unpaired else "-", marker="o", markersize=4, color=color,
            label=label)  # fmt: skip
    lo, hi = _arr(line.lo), _arr(line.hi)
    if lo is not None and hi is not None and np.any(np.isfinite(lo) & np.isfinite(hi)):
        ax.fill_between(x, lo, hi, color=color, alpha=0.2, linewidth=0)
    rm, rsd = _arr(line.random_mean), _arr(line.random_sd)
    if rm is not None and np.any(np.isfinite(rm)):
        ax.plot(x, rm, linestyle="--", marker="s", markersize=3, color=color, alpha=0.7,
                label=f"{line.model}: random groups")  # fmt: skip
        if rsd is not None and np.any(np.isfinite(rsd)):
            ax.fill_between(x, rm - rsd, rm + rsd, color=color, alpha=0.08, linewidth=0)


#: ``key: (title, y label, value, lo, hi, random mean, random SD, band description)``.
DYNAMICS: dict[str, tuple[str, str, str, str | None, str | None, str | None, str | None, str]] = {
    "plateau_size": ("Plateau size", "plateau neurons", "plateau_size", "plateau_size_lo",
                     "plateau_size_hi", None, None, "band: 95 % window-bootstrap interval"),
    "kappa": ("Power-law exponent κ (rare targets)", "κ", "kappa", "kappa_lo", "kappa_hi", None,
              None, "band: 95 % window-bootstrap interval (basic)"),
    "d_eff_ratio": ("Coordination d_eff/N", "d_eff / N", "coordination_group", None, None,
                    "coordination_random_mean", "coordination_random_sd",
                    "solid: group; dashed: random groups, mean ± 1 SD"),
    "modularity": ("Modularity Q", "Q", "spatial_group", None, None, "spatial_random_mean",
                   "spatial_random_sd", "solid: group; dashed: random groups, mean ± 1 SD"),
    "alpha_hill": ("α_Hill of the weight spectrum", "α_Hill (tail index)", "spectra_group",
                   None, None, "spectra_random_mean", "spectra_random_sd",
                   "solid: group; dashed: random groups, mean ± 1 SD"),
    "gini_diff": ("Attention Gini, rare − common", "Gini rare − common", "routing_gini_diff",
                  "routing_gini_diff_lo", "routing_gini_diff_hi", None, None,
                  "band: 95 % t interval of the mean per-head difference"),
}  # fmt: skip


def dynamics_figures(
    rows: Sequence[Mapping[str, Any]],
) -> tuple[list[DynamicsFigure], list[str]]:
    """The dynamics figures of the sweep table's ``rows`` and a note for each one skipped.

    Only complete rows with a ``step`` take part; with fewer than 2 of them every figure is
    skipped, and a quantity no such run recorded (e.g. routing switched off) is skipped.
    """
    stepped = [r for r in rows if r.get("status") == "complete" and r.get("step") is not None]
    if len(stepped) < 2:
        return [], [
            f"Training-dynamics figures skipped: {len(stepped)} complete task(s) have a "
            "training step (need at least 2; a step comes from task.json or from revision "
            "labels such as step1000 / checkpoint-1000)."
        ]
    by_model: dict[str, list[Mapping[str, Any]]] = {}
    for r in stepped:
        by_model.setdefault(str(r["model_label"]), []).append(r)
    figures, notes = [], []
    for key, (title, ylabel, col, lo, hi, rm, rsd, band) in DYNAMICS.items():
        lines = []
        for model, seq in by_model.items():
            seq = sorted(seq, key=lambda r: int(r["step"]))

            def get(c: str | None, seq: list[Mapping[str, Any]] = seq) -> Any:
                return None if c is None else tuple(r.get(c) for r in seq)

            pairs = {r.get("tokenizer_paired") for r in seq}
            lines.append(DynamicsLine(
                model=model, steps=tuple(int(r["step"]) for r in seq), value=get(col),
                lo=get(lo), hi=get(hi), random_mean=get(rm), random_sd=get(rsd),
                paired=False if False in pairs else None if None in pairs else True,
            ))  # fmt: skip
        if all(v is None for line in lines for v in line.value):
            notes.append(f"Dynamics figure '{key}' skipped: no run with a step recorded "
                         f"{col} (e.g. the analysis was switched off).")  # fmt: skip
            continue
        figures.append(DynamicsFigure(key, title, ylabel, band, tuple(lines)))
    return figures, notes
