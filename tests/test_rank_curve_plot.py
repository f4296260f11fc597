"""Tests of the Figure-1-style rank-curve display."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import pytest
from matplotlib._pylab_helpers import Gcf
from matplotlib.axes import Axes
from matplotlib.figure import Figure

import raretoken.stats.regimes as regimes
from raretoken.errors import ConfigError
from raretoken.plotting import RankCurveDisplay
from raretoken.stats import RegimeFit, fit_regimes


def _curve(plateau: int, seed: int, n: int = 1536) -> np.ndarray:
    rng = np.random.default_rng(seed)
    r = np.arange(1, n + 1, dtype=float)
    y = -2.4 - 0.8 * np.log10(r / (plateau + 1)) - 2.0 * np.clip(np.log10(r / 300), 0, None) ** 2
    if plateau:
        y[:plateau] = -1.6 - 0.1 * np.log10(r[:plateau])
    return 10.0 ** (y + rng.normal(0, 0.03, n))


@pytest.fixture(scope="module")
def fits() -> tuple[RegimeFit, RegimeFit]:
    rare = fit_regimes(_curve(15, 0))
    common = fit_regimes(_curve(0, 1))
    assert rare.has_plateau and not common.has_plateau
    return rare, common


def _legend(ax: Axes) -> list[str]:
    legend = ax.get_legend()
    assert legend is not None
    return [t.get_text() for t in legend.texts]


def _counts(display: RankCurveDisplay) -> list[tuple[int, int, int]]:
    return [(len(a.lines), len(a.patches), len(_legend(a))) for a in display.axes_]


def _no_fitting(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("the display must not fit")

    monkeypatch.setattr(regimes, "fit_regimes", boom)
    monkeypatch.setattr(regimes, "segmented_regression", boom)


def test_plot_and_savefig_write_png_and_svg(
    fits: tuple[RegimeFit, RegimeFit], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_fitting(monkeypatch)
    rare, common = fits
    display = RankCurveDisplay.from_fits(rare, common).plot()
    png, svg = display.savefig(tmp_path / "sub" / "figure1")
    assert png == tmp_path / "sub" / "figure1.png" and svg.suffix == ".svg"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<svg" in svg.read_text()
    assert Gcf.get_num_fig_managers() == 0  # nothing registered with pyplot
    assert matplotlib.get_backend()  # backend untouched, still resolvable


def test_display_stores_the_fit_arrays(fits: tuple[RegimeFit, RegimeFit]) -> None:
    rare, common = fits
    display = RankCurveDisplay.from_fits(rare, common, rare_label="rare", common_label="common")
    curve = display.curves[0]
    np.testing.assert_array_equal(curve.rank, np.arange(1, rare.n_neurons + 1))
    np.testing.assert_array_equal(curve.delta, rare.delta)
    assert curve.segment_roles == ("plateau", "power law", "rapid decay")
    assert curve.r1 == rare.r1 and curve.plateau_size == rare.plateau_size
    # end points of the power-law line follow eq. 11 with the fitted slope and intercept
    lo, hi = curve.segment_ranks[1]
    assert rare.r2 is not None
    assert (lo, hi) == (rare.r1, rare.r2 - 1)
    d_lo, d_hi = curve.segment_deltas[1]
    assert np.log10(d_hi / d_lo) == pytest.approx(-rare.kappa * np.log10(hi / lo))
    assert display.curves[1].segment_roles[0] == "power law"
    assert display.curves[1].r1 is None


def test_drawn_artists(fits: tuple[RegimeFit, RegimeFit]) -> None:
    rare, common = fits
    display = RankCurveDisplay.from_fits(rare, common).plot()
    assert isinstance(display.figure_, Figure)
    ax_rare, ax_common = display.axes_
    assert ax_rare.get_xscale() == "log" and ax_rare.get_yscale() == "log"
    points = ax_rare.lines[0]
    np.testing.assert_array_equal(points.get_xdata(), np.arange(1, rare.n_neurons + 1))
    np.testing.assert_array_equal(points.get_ydata(), rare.delta)
    labels = _legend(ax_rare)
    assert f"power law, κ = {rare.kappa:.2f}" in labels
    assert f"r1 = {rare.r1}" in labels and f"r2 = {rare.r2}" in labels
    assert f"plateau: {rare.plateau_size} neurons" in labels
    assert len(ax_rare.patches) == 1  # shaded plateau
    assert len(ax_common.patches) == 0  # no plateau for common tokens
    assert ax_rare.get_title() == "(a) rare tokens"


def test_plot_twice_gives_the_same_artists(
    fits: tuple[RegimeFit, RegimeFit], monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_fitting(monkeypatch)
    display = RankCurveDisplay.from_fits(*fits)
    first = _counts(display.plot())
    fig1 = display.figure_
    second = _counts(display.plot())
    assert first == second
    assert display.figure_ is not fig1


def test_overlay_and_explicit_axes(fits: tuple[RegimeFit, RegimeFit]) -> None:
    rare, common = fits
    fig = Figure()
    ax = fig.subplots()
    display = RankCurveDisplay.from_fits(rare, common).plot(ax=ax)
    assert display.axes_ == (ax,) and display.figure_ is fig
    labels = _legend(ax)
    assert f"rare tokens: power law, κ = {rare.kappa:.2f}" in labels
    assert f"common tokens: power law, κ = {common.kappa:.2f}" in labels
    fig2 = Figure()
    axes = fig2.subplots(1, 2)
    assert RankCurveDisplay.from_fits(rare, common).plot(ax=axes).axes_ == tuple(axes)
    with pytest.raises(ConfigError):
        RankCurveDisplay.from_fits(rare, common).plot(ax=[ax])


def test_savefig_plots_when_needed_and_floor_clips(tmp_path: Path) -> None:
    d = _curve(10, 3, n=400)
    d[-5:] = 0.0
    fit = fit_regimes(d)
    display = RankCurveDisplay.from_fits(fit)
    png, svg = display.savefig(tmp_path / "single")
    assert png.exists() and svg.exists()
    assert len(display.axes_) == 1
    assert np.all(display.curves[0].delta[-5:] == fit.floor_value)
