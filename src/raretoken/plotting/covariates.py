"""Δloss on rare targets against each per-neuron covariate (one panel per covariate)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy.stats import spearmanr

from ._save import save_png_svg

#: Axis labels of the covariate columns (others are shown by their column name).
LABELS: dict[str, str] = {
    "w_out_norm": "‖w_out‖",
    "w_in_norm_in": "‖w_in‖",
    "w_in_norm_up": "‖w_up‖",
    "w_in_norm_gate": "‖w_gate‖",
    "act_mean": "mean activation",
    "act_abs_mean": "mean |activation|",
    "act_var": "activation variance",
    "act_frac_positive": "fraction of positive activations",
    "vocab_kurtosis": "vocab. projection kurtosis",
    "vocab_skew": "vocab. projection skew",
    "unigram_cosine": "cosine with unigram direction",
    "null_space_fraction": "fraction of ‖w_out‖² in W_U's null space",
}


@dataclass
class CovariatesDisplay:
    """Per-neuron Δloss (rare) and covariates; :meth:`plot` only draws.

    ``spearman`` holds the rank correlation of Δloss with each covariate over all neurons
    (computed once, by :meth:`from_columns`).
    """

    delta_rare: np.ndarray
    covariates: dict[str, np.ndarray]
    highlight: np.ndarray
    highlight_label: str
    spearman: dict[str, float] = field(default_factory=dict)
    figure_: Figure | None = None

    @classmethod
    def from_columns(
        cls,
        delta_rare: np.ndarray,
        covariates: Mapping[str, np.ndarray],
        highlight: np.ndarray,
        highlight_label: str = "plateau",
    ) -> CovariatesDisplay:
        d = np.asarray(delta_rare, dtype=np.float64)
        covs = {k: np.asarray(v, dtype=np.float64) for k, v in covariates.items()}
        rho: dict[str, float] = {}
        for name, x in covs.items():
            ok = np.isfinite(x) & np.isfinite(d)
            if ok.sum() > 2 and np.ptp(x[ok]) > 0:
                rho[name] = float(spearmanr(x[ok], d[ok]).statistic)
            else:
                rho[name] = math.nan
        return cls(d, covs, np.asarray(highlight, dtype=bool), highlight_label, rho)

    def plot(self, ncols: int = 4) -> CovariatesDisplay:
        names = list(self.covariates)
        nrows = max(1, math.ceil(len(names) / ncols))
        fig = Figure(figsize=(3.2 * ncols, 2.8 * nrows))
        FigureCanvasAgg(fig)
        axes = fig.subplots(nrows, ncols, squeeze=False)
        y = np.maximum(self.delta_rare, np.finfo(float).tiny)
        for ax, name in zip(axes.ravel(), names, strict=False):
            x = self.covariates[name]
            ax.scatter(x[~self.highlight], y[~self.highlight], s=3, c="0.6", lw=0,
                       label="other neurons")  # fmt: skip
            ax.scatter(x[self.highlight], y[self.highlight], s=9, c="tab:red", lw=0,
                       label=self.highlight_label)  # fmt: skip
            ax.set_yscale("log")
            ax.set_xlabel(LABELS.get(name, name), fontsize=8)
            ax.set_title(f"Spearman ρ = {self.spearman.get(name, math.nan):.2f}", fontsize=8)
            ax.tick_params(labelsize=7)
        for ax in axes.ravel()[len(names) :]:
            ax.set_visible(False)
        for row in axes:
            row[0].set_ylabel("Δloss (rare targets)", fontsize=8)
        axes[0, 0].legend(fontsize=7, markerscale=2)
        fig.suptitle("Rare-target Δloss of every final-layer neuron against its covariates")
        self.figure_ = fig
        return self

    def savefig(self, stem: Path) -> tuple[Path, Path]:
        """Write ``<stem>.png`` and ``<stem>.svg`` (plotting first if needed)."""
        if self.figure_ is None:
            self.plot()
        assert self.figure_ is not None
        return save_png_svg(self.figure_, stem, dpi=120)
