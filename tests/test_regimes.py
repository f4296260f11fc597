"""Tests of the three-regime rank-curve fit (paper eq. 11) and its bootstrap."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from raretoken.errors import ConfigError, InsufficientDataError, NumericalError
from raretoken.stats import (
    RegimeBootstrap,
    RegimeFit,
    bootstrap_regimes,
    fit_regimes,
    segmented_regression,
)
from raretoken.stats.regimes import log_rank_grid

# ---------------------------------------------------------------------------------------------
# Synthetic curves
# ---------------------------------------------------------------------------------------------


def three_regime_log10(
    n: int, plateau: int, kappa: float, r2: int, *, step: float = 0.6, tail_slope: float = 3.0
) -> np.ndarray:
    """Exact piecewise log10 curve: plateau (slope -0.15, `step` decades above the power law's
    start), power law of slope -kappa from rank plateau+1, straight tail of slope -tail_slope
    from rank r2."""
    r = np.arange(1, n + 1, dtype=float)
    start = plateau + 1
    y = -2.0 - kappa * np.log10(r / start)
    y_r2 = -2.0 - kappa * np.log10(r2 / start)
    y = np.where(r >= r2, y_r2 - tail_slope * np.log10(r / r2), y)
    if plateau:
        y[:plateau] = -2.0 + step - 0.15 * np.log10(r[:plateau])
    return y


def noisy_sorted(y: np.ndarray, noise: float, rng: np.random.Generator) -> np.ndarray:
    """10**(y + N(0, noise)), sorted descending: a rank curve as it is observed."""
    return np.sort(10.0 ** (y + rng.normal(0.0, noise, y.size)))[::-1]


def brute_force(x: np.ndarray, y: np.ndarray, s: int, m: int) -> tuple[tuple[int, ...], float]:
    """Best split of (x, y) into s segments of >= m points by trying every split."""
    n = x.size
    best: tuple[tuple[int, ...], float] = ((), np.inf)
    for cuts in itertools.combinations(range(1, n), s - 1):
        bounds = (0, *cuts, n)
        if min(np.diff(bounds)) < m:
            continue
        rss = 0.0
        for lo, hi in itertools.pairwise(bounds):
            coef = np.polyfit(x[lo:hi], y[lo:hi], 1)
            rss += float(((y[lo:hi] - np.polyval(coef, x[lo:hi])) ** 2).sum())
        if rss < best[1]:
            best = (bounds[:-1], rss)
    return best


# ---------------------------------------------------------------------------------------------
# Exact segmented regression
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("s", [1, 2, 3, 4])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_segmented_regression_matches_brute_force(s: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, m = (22, 3) if s == 4 else (30, 4)
    x = np.sort(rng.uniform(0, 3, n))
    y = np.where(x < 1, 0.0, -(x - 1)) + np.where(x > 2, -2 * (x - 2), 0) + rng.normal(0, 0.1, n)
    fit = segmented_regression(x, y, s, min_segment_points=m)
    starts, rss = brute_force(x, y, s, m)
    assert fit.starts == starts
    assert fit.rss == pytest.approx(rss, rel=1e-9, abs=1e-12)
    for k, lo in enumerate(starts):
        hi = starts[k + 1] if k + 1 < s else n
        slope, icpt = np.polyfit(x[lo:hi], y[lo:hi], 1)
        assert fit.slopes[k] == pytest.approx(slope, rel=1e-9, abs=1e-12)
        assert fit.intercepts[k] == pytest.approx(icpt, rel=1e-9, abs=1e-12)


def test_fit_regimes_breakpoints_match_brute_force_on_small_curve() -> None:
    rng = np.random.default_rng(3)
    y = three_regime_log10(36, plateau=6, kappa=0.8, r2=20, step=0.5) + rng.normal(0, 0.02, 36)
    d = 10.0**y
    fit = fit_regimes(d, grid_step=0.0, min_segment_points=4)
    order = np.argsort(-d, kind="stable")
    x_all = np.log10(np.arange(1, 37.0))
    for cand in fit.candidates:
        starts, rss = brute_force(x_all, np.log10(d[order]), cand.n_segments, 4)
        assert cand.breakpoints == tuple(s + 1 for s in starts[1:])
        assert cand.rss == pytest.approx(rss, rel=1e-9)
    assert fit.best.n_segments == 3
    assert fit.best.breakpoints[0] == 7
    assert fit.best.breakpoints[1] in (20, 21)  # rank 20 lies on both lines


def test_segmented_regression_rejects_bad_input() -> None:
    x = np.linspace(0, 1, 10)
    with pytest.raises(InsufficientDataError):
        segmented_regression(x, x, 3, min_segment_points=4)
    with pytest.raises(ConfigError):
        segmented_regression(x, x, 1, min_segment_points=2)
    with pytest.raises(ConfigError):
        segmented_regression(x, x, 0)
    with pytest.raises(NumericalError):
        segmented_regression(x, np.full(10, np.nan), 1)


def test_log_rank_grid_bins() -> None:
    y = np.arange(100, dtype=float)  # stands in for log10 Δ in rank order
    x, ym, first = log_rank_grid(y, 0.5)
    # log10 rank in [0, .5) -> ranks 1-3, [.5, 1) -> 4-9, [1, 1.5) -> 10-31, [1.5, 2) -> 32-99
    assert first.tolist() == [1, 4, 10, 32, 100]
    groups = [range(1, 4), range(4, 10), range(10, 32), range(32, 100), range(100, 101)]
    np.testing.assert_allclose(x, [np.mean(np.log10(list(g))) for g in groups])
    np.testing.assert_allclose(ym, [np.mean([r - 1 for r in g]) for g in groups])
    x0, y0, f0 = log_rank_grid(y, 0.0)
    np.testing.assert_allclose(x0, np.log10(np.arange(1, 101)))
    np.testing.assert_array_equal(y0, y)
    assert f0.tolist() == list(range(1, 101))


# ---------------------------------------------------------------------------------------------
# Regime recovery
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("plateau", [6, 15, 40])
@pytest.mark.parametrize("kappa", [0.5, 1.0])
def test_recovers_plateau_size_and_kappa(plateau: int, kappa: float) -> None:
    rng = np.random.default_rng(plateau)
    n = 1536
    ids = rng.permutation(n)  # neuron ids in true rank order
    d_sorted = noisy_sorted(three_regime_log10(n, plateau, kappa, r2=400), 0.05, rng)
    shuffle = rng.permutation(n)
    fit = fit_regimes(d_sorted[shuffle], ids[shuffle])
    assert fit.has_plateau
    assert fit.plateau_size == plateau
    assert set(fit.plateau_neurons.tolist()) == set(ids[:plateau].tolist())
    assert fit.r1 == plateau + 1
    assert fit.kappa == pytest.approx(kappa, abs=0.05)
    assert fit.r2 is not None and 330 <= fit.r2 <= 480
    assert fit.best.n_segments == 3
    # the generator puts the plateau's end this far above the power law's line:
    true_step = 0.6 - 0.15 * np.log10(plateau) - kappa * np.log10((plateau + 1) / plateau)
    assert fit.plateau_step == pytest.approx(true_step, abs=0.1)


def test_noise_free_curve_is_recovered_exactly() -> None:
    d = 10.0 ** three_regime_log10(1000, 12, 0.7, r2=250)
    fit = fit_regimes(d, grid_step=0.0)
    assert fit.best.breakpoints[0] == 13
    assert fit.best.breakpoints[1] in (250, 251)  # rank 250 lies on both lines
    assert fit.model is fit.best
    assert fit.kappa == pytest.approx(0.7, abs=1e-9)
    assert fit.best.slopes[0] == pytest.approx(-0.15, abs=1e-9)
    assert fit.best.slopes[2] == pytest.approx(-3.0, abs=1e-9)
    assert fit.plateau_size == 12
    true_step = 0.6 - 0.15 * np.log10(12) - 0.7 * np.log10(13 / 12)
    assert fit.plateau_step == pytest.approx(true_step, abs=1e-9)
    assert fit.best.r_squared == pytest.approx(1.0, abs=1e-12)
    # on the default log grid, a bin straddling r2 mixes both lines: r2 is good to one bin
    binned = fit_regimes(d)
    assert binned.r1 == 13 and binned.kappa == pytest.approx(0.7, abs=0.01)
    assert binned.r2 is not None and abs(np.log10(binned.r2 / 250)) < 0.02


def test_plateau_boundary_is_refined_to_single_ranks() -> None:
    """Plateaus ending inside a multi-rank grid bin are still recovered to the neuron."""
    n = 8192
    moved = 0
    for plateau in (49, 77, 333, 618):
        y = three_regime_log10(n, plateau, 0.8, r2=2500)
        for noise in (0.0, 0.03):
            d = noisy_sorted(y, noise, np.random.default_rng(plateau)) if noise else 10.0**y
            fit = fit_regimes(d)
            assert fit.plateau_size == plateau
            assert fit.segment_rank_ranges[0] == (1, plateau)
            moved += fit.best.breakpoints[0] != fit.r1
    assert moved >= 2  # the grid alone would have been off by up to one bin


@pytest.mark.parametrize("tail", [True, False])
@pytest.mark.parametrize("noise", [0.02, 0.1, 0.3])
def test_pure_power_law_has_no_plateau(tail: bool, noise: float) -> None:
    n = 1536
    for seed in range(5):
        rng = np.random.default_rng(seed)
        y = three_regime_log10(n, 0, 0.6, r2=300 if tail else n + 1)
        fit = fit_regimes(noisy_sorted(y, noise, rng))
        assert not fit.has_plateau
        assert fit.plateau_neurons.size == 0 and fit.r1 is None
        assert fit.model.n_segments == min(fit.best.n_segments, 2)
        if tail and noise <= 0.1:
            assert fit.kappa == pytest.approx(0.6, abs=0.06)
            assert fit.r2 is not None and 200 <= fit.r2 <= 450


def test_saturating_head_is_not_a_plateau() -> None:
    # Zipf-Mandelbrot (r + 20)^-0.8: flat head that lies *below* the power law's extrapolation.
    r = np.arange(1, 2049, dtype=float)
    fit = fit_regimes(1e-2 * (r + 20.0) ** -0.8)
    assert fit.best.n_segments >= 2
    assert fit.plateau_slope_gap is not None and fit.plateau_slope_gap > 0.1  # flatter ...
    assert fit.plateau_step is not None and fit.plateau_step < 0.05  # ... but no step
    assert not fit.has_plateau


def test_large_flat_head_exceeds_max_plateau_fraction() -> None:
    y = three_regime_log10(1000, 150, 0.7, r2=600)
    too_big = fit_regimes(10.0**y)
    assert too_big.has_plateau is False
    # flat and stepped: only the size rule rejects it
    assert too_big.plateau_slope_gap is not None and too_big.plateau_slope_gap > 0.5
    assert too_big.plateau_step is not None and too_big.plateau_step > 0.2
    assert fit_regimes(10.0**y, grid_step=0.0, max_plateau_fraction=0.2).plateau_size == 150


def test_straight_line_is_one_segment() -> None:
    r = np.arange(1, 201, dtype=float)
    exact = fit_regimes(10.0 ** (-1.0 - 1.5 * np.log10(r)))
    assert exact.best.n_segments == 1 and exact.kappa == pytest.approx(1.5, abs=1e-9)
    assert not exact.has_plateau and exact.r2 is None
    for seed in range(10):
        rng = np.random.default_rng(seed)
        y = -1.0 - 1.5 * np.log10(r) + rng.normal(0, 0.0007, r.size)
        assert np.all(np.diff(y) < 0)  # noise too small to reorder: still a straight line
        fit = fit_regimes(10.0**y, grid_step=0.0)
        assert fit.best.n_segments == 1, [c.bic for c in fit.candidates]
        assert fit.kappa == pytest.approx(1.5, abs=0.01)


def test_curve_shaped_like_the_real_one_1536_neurons() -> None:
    """Per-position |ΔL| with exponential noise around a Figure-1-like mean curve."""
    rng = np.random.default_rng(7)
    n, n_pos, plateau = 1536, 2000, 15
    r = np.arange(1, n + 1, dtype=float)
    log_mu = -2.4 - 0.8 * np.log10(r / 16) - 2.0 * np.clip(np.log10(r / 300), 0, None) ** 2
    log_mu[:plateau] = -1.6 + rng.uniform(-0.1, 0.1, plateau)
    log_mu[plateau:] += rng.normal(0, 0.05, n - plateau)  # neuron-to-neuron scatter
    ids = rng.permutation(n)
    per_position = 10.0 ** log_mu[None, :] * rng.exponential(1.0, (n_pos, n))
    fit = fit_regimes(per_position.mean(axis=0), ids)
    assert fit.has_plateau
    assert set(fit.plateau_neurons.tolist()) == set(ids[:plateau].tolist())
    assert fit.kappa == pytest.approx(0.8, abs=0.1)
    assert fit.r2 is not None and 150 <= fit.r2 <= 700


# ---------------------------------------------------------------------------------------------
# Invariances, clipping, errors, serialisation
# ---------------------------------------------------------------------------------------------


def test_scale_and_order_invariance() -> None:
    rng = np.random.default_rng(11)
    d = noisy_sorted(three_regime_log10(800, 10, 0.9, r2=250), 0.05, rng)
    base = fit_regimes(d)
    scaled = fit_regimes(d * 37.0)
    assert scaled.best.breakpoints == base.best.breakpoints
    assert scaled.kappa == pytest.approx(base.kappa, abs=1e-9)
    assert scaled.best.intercepts[0] == pytest.approx(base.best.intercepts[0] + np.log10(37.0))
    perm = rng.permutation(d.size)
    permuted = fit_regimes(d[perm], np.arange(d.size)[perm])
    np.testing.assert_array_equal(permuted.neuron_ids, base.neuron_ids)
    np.testing.assert_array_equal(permuted.plateau_neurons, base.plateau_neurons)


def test_values_at_or_below_the_floor_are_not_fitted() -> None:
    y = three_regime_log10(600, 8, 0.7, r2=200)
    d = 10.0**y
    reference = fit_regimes(d[:-20], grid_step=0.0)
    d[-20:] = 0.0  # dead neurons
    d[-3:] = -1e-9
    d[-25:-20] = 1e-3 * d.max() * 1e-6  # positive but below the relative floor
    fit = fit_regimes(d, grid_step=0.0, floor=1e-6)
    assert fit.floor_value == pytest.approx(1e-6 * d.max())
    assert fit.n_fitted == 575
    assert fit.delta[-1] == -1e-9  # stored as given
    assert fit.segment_rank_ranges[-1][1] == 575
    ref_short = fit_regimes(d[:-25], grid_step=0.0)
    assert fit.best == ref_short.best
    assert fit.plateau_size == 8 and reference.plateau_size == 8


def test_errors() -> None:
    with pytest.raises(NumericalError):
        fit_regimes(np.array([1.0, np.nan, 0.5, 0.1, 0.2, 0.3]))
    with pytest.raises(InsufficientDataError):
        fit_regimes(np.zeros(50))
    with pytest.raises(InsufficientDataError):
        fit_regimes(np.array([3.0, 2.0, 1.0]))
    with pytest.raises(ConfigError):
        fit_regimes(np.ones(20), np.arange(19))
    with pytest.raises(ConfigError):
        fit_regimes(np.ones(20), np.zeros(20, dtype=int))
    with pytest.raises(ConfigError):
        fit_regimes(np.ones(20), max_plateau_fraction=0.0)
    with pytest.raises(ConfigError):
        fit_regimes(np.ones(20), floor=0.0)
    with pytest.raises(ConfigError):
        fit_regimes(np.ones((4, 5)))


def test_only_candidates_the_grid_can_hold() -> None:
    fit = fit_regimes(10.0 ** -np.log10(np.arange(1, 13.0)), grid_step=0.0)
    assert [c.n_segments for c in fit.candidates] == [1, 2]


def test_regime_fit_json_round_trip() -> None:
    rng = np.random.default_rng(5)
    fit = fit_regimes(noisy_sorted(three_regime_log10(500, 9, 0.8, r2=150), 0.05, rng))
    d = json.loads(json.dumps(fit.to_dict()))
    back = RegimeFit.from_dict(d)
    assert back.to_dict() == fit.to_dict()
    assert back.best == fit.best
    assert back.segment_rank_ranges == fit.segment_rank_ranges
    assert fit.segment_rank_ranges[0] == (1, fit.r1 - 1 if fit.r1 else 0)


# ---------------------------------------------------------------------------------------------
# Bootstrap
# ---------------------------------------------------------------------------------------------


def _per_position(rng: np.random.Generator, n_pos: int, kappa: float = 0.7) -> np.ndarray:
    mu = 10.0 ** three_regime_log10(300, 8, kappa, r2=120)
    return mu[None, :] * rng.exponential(1.0, (n_pos, mu.size))


def test_bootstrap_same_seed_same_output_and_json() -> None:
    x = _per_position(np.random.default_rng(0), 200)
    a = bootstrap_regimes(x, n_boot=20, seed=4)
    b = bootstrap_regimes(x, n_boot=20, seed=4, batch_size=3)
    assert json.dumps(a.to_dict()) == json.dumps(b.to_dict())
    c = bootstrap_regimes(x, n_boot=20, seed=5)
    assert not np.array_equal(a.kappa, c.kappa)
    back = RegimeBootstrap.from_dict(json.loads(json.dumps(a.to_dict())))
    assert back.to_dict() == a.to_dict()
    g = bootstrap_regimes(x, n_boot=20, seed=np.random.default_rng(4))
    assert g.seed is None
    np.testing.assert_array_equal(g.kappa, a.kappa)


def test_bootstrap_resample_is_a_row_resample() -> None:
    rng = np.random.default_rng(1)
    x = _per_position(rng, 150)
    boot = bootstrap_regimes(x, n_boot=1, seed=9)
    draw = np.random.default_rng(9).integers(0, 150, size=150)
    ref = fit_regimes(x[draw].mean(axis=0))
    assert boot.kappa[0] == pytest.approx(ref.kappa, abs=1e-9)
    assert boot.plateau_size[0] == ref.plateau_size
    assert boot.r2[0] == ref.r2


def test_bootstrap_membership_and_rates() -> None:
    rng = np.random.default_rng(2)
    x = _per_position(rng, 400)
    ids = rng.permutation(1000)[:300]
    boot = bootstrap_regimes(x, ids, n_boot=40, seed=0)
    np.testing.assert_array_equal(boot.neuron_ids, ids)
    # columns 0..7 carry the plateau in every resample; no other neuron ever does
    np.testing.assert_array_equal(boot.membership_frequency[:8], 1.0)
    np.testing.assert_array_equal(boot.membership_frequency[8:], 0.0)
    assert boot.plateau_existence_rate == 1.0
    assert boot.ci_plateau_size == (8.0, 8.0)
    assert boot.ci_r1 == (9.0, 9.0)
    assert set(boot.estimate.plateau_neurons.tolist()) == set(ids[:8].tolist())
    assert boot.ci_r_squared is not None and 0.9 < boot.ci_r_squared[0] <= 1.0


def test_bootstrap_without_plateau() -> None:
    rng = np.random.default_rng(3)
    mu = 10.0 ** three_regime_log10(300, 0, 0.7, r2=120)
    x = mu[None, :] * rng.exponential(1.0, (300, mu.size))
    boot = bootstrap_regimes(x, n_boot=20, seed=0)
    assert boot.plateau_existence_rate == 0.0
    assert boot.ci_r1 is None
    assert boot.ci_plateau_size == (0.0, 0.0)
    assert np.all(boot.membership_frequency == 0.0)
    assert json.loads(json.dumps(boot.to_dict()))["ci_r1"] is None


def test_bootstrap_ci_covers_true_kappa() -> None:
    """Over 20 synthetic data sets, the 95 % interval should contain κ = 0.7 most of the time
    (percentile intervals with 100 resamples under-cover somewhat; we require >= 70 %)."""
    covered, widths = 0, []
    for rep in range(20):
        rng = np.random.default_rng(100 + rep)
        boot = bootstrap_regimes(_per_position(rng, 200), n_boot=100, seed=rep)
        assert boot.ci_kappa is not None
        lo, hi = boot.ci_kappa
        covered += lo <= 0.7 <= hi
        widths.append(hi - lo)
    assert covered >= 14
    assert 0.01 < float(np.median(widths)) < 0.2


def test_bootstrap_errors() -> None:
    x = _per_position(np.random.default_rng(0), 50)
    with pytest.raises(ConfigError):
        bootstrap_regimes(x[0], seed=0)
    with pytest.raises(ConfigError):
        bootstrap_regimes(x, seed=0, n_boot=0)
    with pytest.raises(ConfigError):
        bootstrap_regimes(x, seed=0, level=1.0)
    with pytest.raises(InsufficientDataError):
        bootstrap_regimes(x[:1], seed=0)
    bad = x.copy()
    bad[3, 3] = np.inf
    with pytest.raises(NumericalError):
        bootstrap_regimes(bad, seed=0)
    with pytest.raises(ValueError):
        bootstrap_regimes(x, seed=None)  # type: ignore[arg-type]
