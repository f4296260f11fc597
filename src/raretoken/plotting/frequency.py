"""Rank-frequency curve with the elbow and the rare/common threshold."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..data.counting import TokenCounts
from ..data.split import FrequencySplit
from ._save import save_png_svg


@dataclass
class FrequencyDisplay:
    """Stores the sorted counts and thresholds; :meth:`plot` only draws."""

    counts_sorted: np.ndarray
    elbow_count: float
    rare_max_count: int
    percentile: float
    figure_: Figure | None = None

    @classmethod
    def from_split(cls, counts: TokenCounts, split: FrequencySplit) -> FrequencyDisplay:
        c = np.asarray(counts.counts, dtype=np.float64)
        c = np.sort(c[c > 0])[::-1]
        return cls(
            c, float(split.elbow.count_threshold), int(split.rare_max_count), split.percentile
        )

    def plot(self, ax: Axes | None = None) -> FrequencyDisplay:
        if ax is None:
            fig = Figure(figsize=(6, 4))
            FigureCanvasAgg(fig)
            ax = fig.add_subplot()
        ranks = np.arange(1, len(self.counts_sorted) + 1)
        ax.loglog(ranks, self.counts_sorted, color="0.2", lw=1, label="token types")
        ax.axhline(self.elbow_count, color="tab:red", ls="--", lw=1,
                   label=f"elbow: count ≥ {self.elbow_count:g} kept")  # fmt: skip
        ax.axhline(self.rare_max_count + 0.5, color="tab:blue", ls=":", lw=1,
                   label=f"rare: count ≤ {self.rare_max_count} ({self.percentile:g}th pct)")  # fmt: skip
        ax.set_xlabel("rank")
        ax.set_ylabel("count")
        ax.set_title("Token frequencies")
        ax.legend(fontsize=8)
        self.figure_ = ax.figure  # type: ignore[assignment]
        return self

    def savefig(self, stem: Path) -> tuple[Path, Path]:
        """Write ``<stem>.png`` and ``<stem>.svg`` (plotting first if needed)."""
        if self.figure_ is None:
            self.plot()
        assert self.figure_ is not None
        return save_png_svg(self.figure_, stem, dpi=150)
