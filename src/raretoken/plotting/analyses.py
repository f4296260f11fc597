"""Figures of the organisational analyses (paper Tables 1–3, Figure 2), drawn from arrays.

Every function draws on a given :class:`~matplotlib.axes.Axes` from precomputed arrays and
computes nothing but what is needed to draw (histogram bins, a line through two points).
The result classes in :mod:`raretoken.analyses` call them from their ``plot`` methods.
Figures are made with :func:`new_figure` on an explicit Agg canvas (no ``pyplot`` state) and
turned into file bytes with :func:`figure_bytes`, so that callers can write them atomically.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "figure_bytes",
    "new_figure",
    "plot_baseline_hist",
    "plot_cumulative_variance",
    "plot_gini_scatter",
    "plot_head_impacts",
    "plot_mi_matrix",
    "plot_robustness",
    "plot_spectrum",
]

_GROUP_COLOR = "C3"
_RANDOM_COLOR = "0.6"


def new_figure(
    ncols: int = 1, *, width: float = 5.0, height: float = 4.0
) -> tuple[Figure, list[Axes]]:
    """A figure on an Agg canvas with ``ncols`` side-by-side axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height))
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def new_axes() -> Axes:
    """A single new axes on its own figure."""
    return new_figure(1)[1][0]


def figure_bytes(fig: Figure, fmt: str, *, dpi: int = 150) -> bytes:
    """The figure encoded as ``fmt`` (``"png"``, ``"svg"``)."""
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=dpi, bbox_inches="tight", metadata=_metadata(fmt))
    return buf.getvalue()


def _metadata(fmt: str) -> dict[str, str | None]:
    # drop creation dates so that identical figures give identical files
    if fmt == "svg":
        return {"Date": None}
    if fmt == "pdf":
        return {"CreationDate": None}
    return {}


def plot_baseline_hist(
    ax: Axes,
    observed: float,
    random_values: np.ndarray,
    *,
    xlabel: str,
    group_label: str = "group",
    title: str | None = None,
    p_value: float | None = None,
) -> Axes:
    """Histogram of a statistic over random groups with the observed value as a line."""
    r = np.asarray(random_values, dtype=np.float64)
    r = r[np.isfinite(r)]
    lo = min(float(r.min()) if r.size else observed, observed)
    hi = max(float(r.max()) if r.size else observed, observed)
    pad = 0.05 * (hi - lo) if hi > lo else 0.5 * max(abs(hi), 1e-12)
    bins = np.linspace(lo - pad, hi + pad, max(10, min(40, r.size // 3 + 1)))
    ax.hist(r, bins=bins.tolist(), color=_RANDOM_COLOR, label=f"random groups (n={r.size})")
    lab = f"{group_label}: {observed:.3g}"
    if p_value is not None:
        lab += f" (p={p_value:.3g})"
    ax.axvline(observed, color=_GROUP_COLOR, lw=2, label=lab)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("random groups")
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8)
    return ax


def plot_cumulative_variance(
    ax: Axes,
    observed: np.ndarray,
    random: np.ndarray,
    threshold: float,
    *,
    group_label: str = "group",
    title: str | None = None,
) -> Axes:
    """Cumulative explained variance vs number of components, group vs random groups."""
    obs = np.asarray(observed, dtype=np.float64)
    rnd = np.atleast_2d(np.asarray(random, dtype=np.float64))
    x = np.arange(1, obs.size + 1)
    for i, row in enumerate(rnd):
        ax.plot(x[: row.size], row, color=_RANDOM_COLOR, lw=0.5, alpha=0.4,
                label="random groups" if i == 0 else None)  # fmt: skip
    if rnd.size:
        ax.plot(x, rnd.mean(axis=0), color="0.3", lw=1.5, ls="--", label="random mean")
    ax.plot(x, obs, color=_GROUP_COLOR, lw=2, label=group_label)
    ax.axhline(threshold, color="k", lw=0.8, ls=":", label=f"τ = {threshold:g}")
    ax.set_xlabel("principal components")
    ax.set_ylabel("cumulative explained variance")
    ax.set_ylim(0.0, 1.02)
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8, loc="lower right")
    return ax


def plot_mi_matrix(
    ax: Axes, mi: np.ndarray, labels: np.ndarray, *, title: str | None = None
) -> Axes:
    """Off-diagonal MI matrix with nodes ordered by community (lines between communities)."""
    m = np.array(mi, dtype=np.float64)
    np.fill_diagonal(m, np.nan)
    lab = np.asarray(labels)
    order = np.argsort(lab, kind="stable")
    img = ax.imshow(m[np.ix_(order, order)], cmap="viridis", interpolation="nearest")
    ax.figure.colorbar(img, ax=ax, label="mutual information (nats)")
    bounds = np.flatnonzero(np.diff(lab[order])) + 0.5
    for b in bounds:
        ax.axhline(b, color="w", lw=0.8)
        ax.axvline(b, color="w", lw=0.8)
    ax.set_xlabel("neuron (ordered by community)")
    ax.set_ylabel("neuron (ordered by community)")
    if title:
        ax.set_title(title)
    return ax


def plot_spectrum(
    ax: Axes,
    eigenvalues: np.ndarray,
    x_min: float,
    alpha: float,
    k: int,
    *,
    random_eigenvalues: np.ndarray | None = None,
    group_label: str = "group",
    title: str | None = None,
) -> Axes:
    """Figure-2-like empirical spectral density on log–log axes with the Hill tail fit.

    The fitted tail is the Pareto density ``p(λ) ∝ λ^{-(α+1)}`` for ``λ >= x_min``
    (``α`` from eq. 10 is the CCDF exponent), scaled so that it carries the tail's share
    ``k / n`` of the probability mass.
    """
    e = np.asarray(eigenvalues, dtype=np.float64)
    e = e[e > 0]
    pooled = np.empty(0)
    if random_eigenvalues is not None:
        pooled = np.asarray(random_eigenvalues, dtype=np.float64).ravel()
        pooled = pooled[np.isfinite(pooled) & (pooled > 0)]
    allv = np.concatenate([e, pooled]) if pooled.size else e
    bins = np.logspace(np.log10(allv.min()), np.log10(allv.max()), 30)
    if pooled.size:
        ax.hist(pooled, bins=bins.tolist(), density=True, color=_RANDOM_COLOR, alpha=0.7,
                label="random groups (pooled)")  # fmt: skip
    ax.hist(e, bins=bins.tolist(), density=True, histtype="step", color=_GROUP_COLOR, lw=2,
            label=f"{group_label} ESD")  # fmt: skip
    if e.size and np.isfinite(alpha) and x_min > 0:
        xs = np.logspace(np.log10(x_min), np.log10(e.max()), 50)
        share = k / e.size
        dens = share * alpha / x_min * (xs / x_min) ** (-(alpha + 1.0))
        ax.plot(xs, dens, color="k", lw=1.5, ls="--",
                label=f"tail fit α_Hill={alpha:.2f} (k={k})")  # fmt: skip
        ax.axvline(x_min, color="k", lw=0.8, ls=":", label=f"λ_min={x_min:.3g}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("eigenvalue λ of W_G W_Gᵀ / d")
    ax.set_ylabel("density")
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8)
    return ax


def plot_gini_scatter(
    ax: Axes,
    heads: np.ndarray,
    mean_rare: np.ndarray,
    mean_common: np.ndarray,
    *,
    rho: float | None = None,
    title: str | None = None,
) -> Axes:
    """Per-head mean attention Gini at rare- vs common-target positions (one dot per head)."""
    h = np.asarray(heads).reshape(-1, 2)
    r = np.asarray(mean_rare, dtype=np.float64)
    c = np.asarray(mean_common, dtype=np.float64)
    for j, layer in enumerate(np.unique(h[:, 0])):
        sel = h[:, 0] == layer
        ax.scatter(c[sel], r[sel], s=25, color=f"C{j}", label=f"layer {int(layer)} heads")
    finite = np.concatenate([r[np.isfinite(r)], c[np.isfinite(c)]])
    if finite.size:
        lo, hi = float(finite.min()), float(finite.max())
        ax.plot([lo, hi], [lo, hi], color="k", lw=0.8, ls=":", label="rare = common")
    ax.set_xlabel("mean Gini, common-target positions")
    ax.set_ylabel("mean Gini, rare-target positions")
    t = title or "Attention concentration per head"
    if rho is not None and np.isfinite(rho):
        t += f" (Spearman ρ={rho:.2f})"
    ax.set_title(t)
    ax.legend(fontsize=8)
    return ax


def plot_head_impacts(
    ax: Axes,
    head_labels: Sequence[str],
    impacts: np.ndarray,
    selected: np.ndarray,
    layer_labels: Sequence[str],
    layer_impacts: np.ndarray,
    *,
    title: str | None = None,
) -> Axes:
    """Bar chart of eq. 8 impacts: single heads (sorted, selected ones highlighted), layers."""
    imp = np.asarray(impacts, dtype=np.float64)
    sel = np.asarray(selected, dtype=bool)
    order = np.argsort(-imp, kind="stable")
    n = imp.size
    colors = [_GROUP_COLOR if sel[i] else _RANDOM_COLOR for i in order]
    ax.bar(np.arange(n), imp[order], color=colors)
    li = np.asarray(layer_impacts, dtype=np.float64)
    ax.bar(np.arange(n, n + li.size) + 1, li, color="C0")
    ticks = [head_labels[i] for i in order] + list(layer_labels)
    ax.set_xticks(np.concatenate([np.arange(n), np.arange(n, n + li.size) + 1]))
    ax.set_xticklabels(ticks, rotation=90, fontsize=6)
    ax.set_ylabel("Impact = ‖a_base − a_ablated‖ / ‖a_base‖")
    from matplotlib.patches import Patch

    ax.legend(
        handles=[
            Patch(color=_GROUP_COLOR, label="heads chosen by influence"),
            Patch(color=_RANDOM_COLOR, label="other single heads"),
            Patch(color="C0", label="all heads of a layer"),
        ],
        fontsize=8,
    )
    ax.set_title(title or "Head ablation impact on the group's activations")
    return ax


def plot_robustness(
    ax: Axes,
    series: dict[str, tuple[list[float], list[float]]],
    *,
    title: str | None = None,
) -> Axes:
    """z-score against random groups per rare-token percentile, one line per series."""
    stats: list[str] = []
    for label, (xs, ys) in series.items():
        stat = label.split(" (")[0]
        if stat not in stats:
            stats.append(stat)
        x = np.asarray(xs, dtype=np.float64)
        y = np.asarray(ys, dtype=np.float64)
        order = np.argsort(x, kind="stable")
        ls = "-" if "plateau" in label else "--"
        color = f"C{stats.index(stat)}"
        ax.plot(x[order], y[order], marker="o", ls=ls, color=color, label=label)
    ax.axhline(0.0, color="k", lw=0.8)
    for z in (-1.96, 1.96):
        ax.axhline(z, color="0.5", lw=0.6, ls=":")
    ax.set_xlabel("rare-token percentile")
    ax.set_ylabel("z-score vs random groups")
    ax.set_title(title or "Robustness of the group statistics")
    if series:
        ax.legend(fontsize=7)
    return ax
