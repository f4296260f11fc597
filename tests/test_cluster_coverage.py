"""Window-cluster bootstraps: per-neuron means (``stats.mean_bootstrap``) and the regime fit
(``stats.regime_bootstrap``). Exactness against brute-force resampling of windows, and the
coverage of the intervals on synthetic data with a known answer (positions of one window
share a random window effect)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from raretoken.errors import ConfigError, InsufficientDataError, NumericalError
from raretoken.stats import (
    MeanInterval,
    RegimeBootstrap,
    RowChunks,
    bootstrap_regimes,
    fit_regimes,
    mean_interval,
    window_of_rows,
)
from raretoken.stats.mean_bootstrap import MIN_WINDOWS_PERCENTILE, MIN_WINDOWS_STUDENTIZED
from test_regimes import three_regime_log10


def _windows(
    rng: np.random.Generator, n_windows: int, n_cols: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``|Δ| = g_w · e`` with a gamma(2) window effect ``g_w`` (mean 1, per window and
    column) and exponential noise ``e`` (mean 1): the true mean is 1; windows hold 1 +
    Poisson(6) rows, so rows of one window are correlated (intra-class correlation 0.25)."""
    win = np.repeat(np.arange(n_windows), 1 + rng.poisson(6.0, n_windows))
    effect = rng.gamma(2.0, 0.5, (n_windows, n_cols))
    return effect[win] * rng.exponential(1.0, (win.size, n_cols)), win


def _coverage(
    n_windows: int, reps: int, method: str, *, by_position: bool = False, seed: int = 0
) -> float:
    """Fraction of ``reps`` independent data sets whose 95 % interval holds the true mean 1."""
    rng = np.random.default_rng(seed)
    hits = 0
    for rep in range(reps):
        x, win = _windows(rng, n_windows)
        units = np.arange(win.size) if by_position else win
        res = mean_interval(x, units, 999, seed=rep, method=method)
        hits += bool(res.lo[0] <= 1.0 <= res.hi[0])
    return hits / reps


# ---------------------------------------------------------------------------------------------
# Coverage (known answer: the mean is 1)
# ---------------------------------------------------------------------------------------------


def test_studentized_window_interval_covers_at_the_nominal_rate_and_positions_do_not() -> None:
    """2000 data sets of 30 windows: the Monte Carlo error of the coverage is ±1 % (2 SE).
    Measured: 94.1 %; resampling positions as if independent: ~78 %."""
    coverage = _coverage(30, 2000, "studentized")
    assert 0.93 <= coverage <= 0.97, coverage
    # the same data resampled by position ignore the window correlation: too narrow
    by_position = _coverage(30, 300, "percentile", by_position=True)
    assert by_position < 0.88, by_position


def test_percentile_interval_needs_many_windows() -> None:
    """Percentile intervals under-cover with few windows (measured 85 % with 10 windows,
    93.4 % with 100) and reach 93–97 % from ~200 windows (measured 94.8 %; 1000 data sets:
    Monte Carlo error ±1.4 %), the documented ``MIN_WINDOWS_PERCENTILE``. On the same data
    sets with 10 windows the studentised interval covers far better (measured 91 %; ~93 % over
    3000 data sets), and from ``MIN_WINDOWS_STUDENTIZED`` = 20 windows 93.5–95 %."""
    assert MIN_WINDOWS_PERCENTILE == 200 and MIN_WINDOWS_STUDENTIZED == 20
    percentile = _coverage(10, 1000, "percentile", seed=2)
    studentized = _coverage(10, 1000, "studentized", seed=2)  # the same data sets and draws
    assert percentile < 0.90, percentile
    assert studentized > percentile + 0.04, (studentized, percentile)
    coverage = _coverage(200, 1000, "percentile", seed=1)
    assert 0.93 <= coverage <= 0.97, coverage


# ---------------------------------------------------------------------------------------------
# Exactness
# ---------------------------------------------------------------------------------------------


def _brute_force(
    x: np.ndarray, win: np.ndarray, n_boot: int, seed: int, level: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Draw windows, concatenate their rows, and take means and studentised statistics
    directly (percentile lo/hi, studentised lo/hi)."""
    ids = np.unique(win)
    c = ids.size
    draws = np.random.default_rng(seed).integers(0, c, size=(n_boot, c))
    mean = x.mean(axis=0)

    def se_of(windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows = [x[win == ids[i]] for i in windows]
        m = np.concatenate(rows).mean(axis=0)
        resid = np.array([r.sum(axis=0) - m * len(r) for r in rows])
        n = sum(len(r) for r in rows)
        return m, np.sqrt(c / (c - 1) * (resid**2).sum(axis=0)) / n

    _, se = se_of(np.arange(c))
    means, ts = [], []
    for d in draws:
        m, s = se_of(d)
        means.append(m)
        ts.append((m - mean) / s)
    q = [(1 - level) / 2, (1 + level) / 2]
    p_lo, p_hi = np.quantile(np.array(means), q, axis=0)
    t_lo, t_hi = np.quantile(np.array(ts), q, axis=0)
    return p_lo, p_hi, np.maximum(mean - t_hi * se, 0.0), mean - t_lo * se


def test_mean_interval_equals_brute_force_resampling_of_windows() -> None:
    rng = np.random.default_rng(3)
    x, win = _windows(rng, 9, n_cols=4)
    win = win * 7 + 2  # any integer ids
    p_lo, p_hi, t_lo, t_hi = _brute_force(x, win, 300, 11, 0.9)
    pct = mean_interval(x, win, 300, 11, level=0.9, method="percentile")
    stud = mean_interval(x, win, 300, 11, level=0.9)
    np.testing.assert_allclose(pct.mean, x.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(pct.lo, p_lo, rtol=1e-10)
    np.testing.assert_allclose(pct.hi, p_hi, rtol=1e-10)
    np.testing.assert_allclose(stud.lo, t_lo, rtol=1e-8)
    np.testing.assert_allclose(stud.hi, t_hi, rtol=1e-8)
    assert stud.method == "studentized" and stud.n_clusters == 9 and stud.n_rows == win.size
    mean, lo, hi = stud  # unpacks
    assert np.all(lo <= mean) and np.all(mean <= hi)
    # a different seed draws differently: the comparison can fail
    other = mean_interval(x, win, 300, 12, level=0.9, method="percentile")
    assert not np.allclose(other.lo, p_lo, rtol=1e-10)


def test_mean_interval_reads_row_chunks_and_round_trips(tmp_path) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(4)
    x, win = _windows(rng, 12, n_cols=5)
    signed = np.where(rng.random(x.shape) < 0.5, -x, x).astype(np.float32)
    mm = np.lib.format.open_memmap(tmp_path / "d.npy", mode="w+", dtype=np.float32,
                                   shape=signed.shape)  # fmt: skip
    mm[:] = signed
    rows = np.arange(0, win.size, 2)
    ref = mean_interval(np.abs(signed[rows]), win[rows], 200, 5)
    got = mean_interval(RowChunks(mm, rows, absolute=True, chunk_rows=7), win[rows], 200, 5)
    for a, b in ((got.mean, ref.mean), (got.lo, ref.lo), (got.hi, ref.hi)):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    back = MeanInterval.from_dict(json.loads(json.dumps(ref.to_dict(), allow_nan=False)))
    assert back.to_dict() == ref.to_dict()
    n_windows = np.unique(win[rows]).size
    assert ref.description == (
        f"studentized 95 % intervals, bootstrap over windows ({n_windows} windows, 200 resamples)"
    )


def test_mean_interval_constant_windows_and_errors() -> None:
    x = np.ones((6, 2))
    x[:, 1] = [0.0, 2.0, 0.0, 2.0, 1.0, 1.0]
    win = np.array([0, 0, 1, 1, 2, 2])
    res = mean_interval(x, win, 50, 0)
    assert res.lo[0] == res.hi[0] == 1.0  # every window has mean 1: no spread
    assert res.lo[1] == res.hi[1] == 1.0
    with pytest.raises(ConfigError):
        mean_interval(x, win, 50, 0, method="bca")
    with pytest.raises(ConfigError):
        mean_interval(x, win[:-1], 50, 0)
    with pytest.raises(ConfigError):
        mean_interval(-x, win, 50, 0)
    with pytest.raises(ConfigError):
        mean_interval(x, win, 0, 0)
    with pytest.raises(ConfigError):
        mean_interval(x, win, 50, None)  # type: ignore[arg-type]
    with pytest.raises(InsufficientDataError):
        mean_interval(x, np.zeros(6, dtype=int), 50, 0)
    bad = x.copy()
    bad[2, 1] = np.nan
    with pytest.raises(NumericalError):
        mean_interval(bad, win, 50, 0)


def test_window_of_rows() -> None:
    mask = np.array([[True, False, True], [False, False, False], [False, True, True]])
    np.testing.assert_array_equal(window_of_rows(mask), [0, 0, 2, 2])
    # the k-th scored position (row-major) lies in the window of the k-th True entry
    rng = np.random.default_rng(0)
    big = rng.random((20, 30)) < 0.3
    flat = np.flatnonzero(big.ravel())
    np.testing.assert_array_equal(window_of_rows(big), flat // 30)
    with pytest.raises(ConfigError):
        window_of_rows(big.astype(int))
    with pytest.raises(ConfigError):
        window_of_rows(big.ravel())


# ---------------------------------------------------------------------------------------------
# Bootstrap over windows (cluster bootstrap)
# ---------------------------------------------------------------------------------------------


def _windowed(
    rng: np.random.Generator, n_windows: int, effect: bool = True, kappa: float = 0.7
) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``μ_i · g_wi · e`` on the planted curve ``μ``: ``g`` a gamma(2) window effect per
    window and neuron (or 1), windows of 1 + Poisson(6) rows; window ids are shuffled and
    spaced so that they are neither sorted nor contiguous."""
    mu = 10.0 ** three_regime_log10(300, 8, kappa, r2=120)
    win = np.repeat(np.arange(n_windows), 1 + rng.poisson(6.0, n_windows))
    g = rng.gamma(2.0, 0.5, (n_windows, mu.size)) if effect else np.ones((n_windows, mu.size))
    x = mu * g[win] * rng.exponential(1.0, (win.size, mu.size))
    return x, (rng.permutation(n_windows) * 3 + 10)[win]


def test_window_bootstrap_resample_is_a_window_resample() -> None:
    x, win = _windowed(np.random.default_rng(5), 25)
    boot = bootstrap_regimes(x, n_boot=3, seed=9, clusters=win)
    ids = np.unique(win)
    draws = np.random.default_rng(9).integers(0, ids.size, size=(3, ids.size))
    for b in range(3):
        rows = np.concatenate([x[win == ids[i]] for i in draws[b]])  # brute force
        ref = fit_regimes(rows.mean(axis=0))
        assert boot.kappa[b] == pytest.approx(ref.kappa, abs=1e-9)
        assert boot.plateau_size[b] == ref.plateau_size
        assert boot.r2[b] == ref.r2
    est = fit_regimes(x.mean(axis=0))
    assert json.dumps(boot.estimate.to_dict()) == json.dumps(est.to_dict())
    assert (boot.unit, boot.n_clusters, boot.n_positions) == ("window", 25, win.size)
    assert boot.method == "bootstrap over windows (25 windows, 3 resamples)"
    assert boot.summary().startswith("Bootstrap over windows (25 windows, 3 resamples), 95 %")
    assert boot.caveat is not None and "25 windows" in boot.caveat  # < MIN_WINDOWS
    # a different seed draws other windows: the comparison can fail
    other = bootstrap_regimes(x, n_boot=3, seed=10, clusters=win)
    assert not np.allclose(other.kappa, boot.kappa)


def test_window_bootstrap_batches_chunks_and_one_row_per_window(tmp_path) -> None:  # type: ignore[no-untyped-def]
    x, win = _windowed(np.random.default_rng(6), 60)
    ref = bootstrap_regimes(x, n_boot=12, seed=2, clusters=win)
    assert ref.caveat is None  # >= MIN_WINDOWS windows
    for bs in (1, 5):  # the draws do not depend on the batch size (products round apart)
        got = bootstrap_regimes(x, n_boot=12, seed=2, clusters=win, batch_size=bs)
        np.testing.assert_allclose(got.kappa, ref.kappa, rtol=1e-12)
        np.testing.assert_array_equal(got.r2, ref.r2)
        np.testing.assert_array_equal(got.membership_frequency, ref.membership_frequency)
    # memory-mapped rows of a larger signed matrix, read in chunks
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(x.shape[0] + 40, x.shape[0], replace=False))
    full = np.zeros((x.shape[0] + 40, x.shape[1]))
    full[rows] = np.where(rng.random(x.shape) < 0.5, -x, x)
    mm = np.lib.format.open_memmap(tmp_path / "d.npy", mode="w+", dtype=np.float64,
                                   shape=full.shape)  # fmt: skip
    mm[:] = full
    one = bootstrap_regimes(RowChunks(mm, rows, absolute=True, chunk_rows=10_000), n_boot=12,
                            seed=2, clusters=win)  # fmt: skip
    assert json.dumps(one.to_dict()) == json.dumps(ref.to_dict())  # one chunk: bit for bit
    many = bootstrap_regimes(RowChunks(mm, rows, absolute=True, chunk_rows=37), n_boot=12,
                             seed=2, clusters=win)  # fmt: skip
    np.testing.assert_allclose(many.kappa, ref.kappa, rtol=1e-9)
    np.testing.assert_array_equal(many.plateau_size, ref.plateau_size)
    # one window per row: the same draws as the bootstrap over positions
    pos = bootstrap_regimes(x, n_boot=12, seed=2)
    by_row = bootstrap_regimes(x, n_boot=12, seed=2, clusters=np.arange(x.shape[0]) * 2)
    np.testing.assert_allclose(by_row.kappa, pos.kappa, rtol=1e-9)
    np.testing.assert_array_equal(by_row.plateau_size, pos.plateau_size)
    assert pos.unit == "position" and pos.n_clusters is None
    assert pos.method == f"bootstrap over positions ({x.shape[0]} positions, 12 resamples)"
    assert pos.caveat is not None and "independent" in pos.caveat


def test_window_bootstrap_json_and_old_dicts() -> None:
    x, win = _windowed(np.random.default_rng(7), 30)
    boot = bootstrap_regimes(x, n_boot=10, seed=1, clusters=win)
    d = json.loads(json.dumps(boot.to_dict(), allow_nan=False))
    assert d["unit"] == "window" and d["n_clusters"] == 30 and d["method"] == boot.method
    back = RegimeBootstrap.from_dict(d)
    assert back.to_dict() == boot.to_dict()
    lo, hi = boot.ci_kappa  # type: ignore[misc]
    k = boot.estimate.kappa
    assert boot.ci_kappa_basic == pytest.approx((2 * k - hi, 2 * k - lo))
    # a dict written before the unit was recorded reads as a bootstrap over positions
    old = {key: v for key, v in d.items()
           if key not in ("unit", "n_clusters", "n_positions", "method", "interval",
                          "ci_kappa_basic")}  # fmt: skip
    legacy = RegimeBootstrap.from_dict(old)
    assert (legacy.unit, legacy.n_clusters, legacy.n_positions) == ("position", None, None)
    assert legacy.ci_kappa_basic is None
    assert legacy.method == "bootstrap over positions (10 resamples)"
    assert "(percentile)" in legacy.summary()
    with pytest.raises(ConfigError):
        RegimeBootstrap.from_dict(dict(d, unit="document"))
    with pytest.raises(ConfigError):
        RegimeBootstrap.from_dict(dict(d, n_clusters=None))


def test_window_bootstrap_errors() -> None:
    x, win = _windowed(np.random.default_rng(8), 10)
    with pytest.raises(ConfigError):
        bootstrap_regimes(x, seed=0, n_boot=2, clusters=win[:-1])
    with pytest.raises(ConfigError):
        bootstrap_regimes(x, seed=0, n_boot=2, clusters=win.astype(float))
    with pytest.raises(InsufficientDataError):
        bootstrap_regimes(x, seed=0, n_boot=2, clusters=np.full(win.size, 4))


def test_window_bootstrap_kappa_interval_follows_the_window_correlation() -> None:
    """With a window effect (intra-window correlation 0.25, ~7 rows per window, design effect
    ~2.5) the window bootstrap's κ interval is wider than the per-position one (measured
    ~1.6×); without a window effect they are alike (measured ~0.85×)."""
    rng = np.random.default_rng(11)
    ratio: dict[bool, list[float]] = {True: [], False: []}
    for rep in range(6):
        for effect in (True, False):
            x, win = _windowed(rng, 50, effect=effect)
            by_win = bootstrap_regimes(x, n_boot=40, seed=rep, clusters=win, grid_step=0.02)
            by_pos = bootstrap_regimes(x, n_boot=40, seed=rep, grid_step=0.02)
            assert by_win.ci_kappa is not None and by_pos.ci_kappa is not None
            ratio[effect].append(
                (by_win.ci_kappa[1] - by_win.ci_kappa[0])
                / (by_pos.ci_kappa[1] - by_pos.ci_kappa[0])
            )
    assert float(np.median(ratio[True])) > 1.3, ratio
    assert 0.7 < float(np.median(ratio[False])) < 1.3, ratio


def test_window_bootstrap_basic_kappa_interval_covers_the_planted_kappa() -> None:
    """Known answer κ = 0.7 with a window effect, 50 windows. Over 100 data sets (100
    resamples) the basic interval by window covered 93 %, the percentile interval 71 % (κ̂ is
    biased upwards by sorting noisy means); see ``stats/regime_bootstrap_result.py``. Here 20
    data sets (40 resamples, a coarser grid for speed; Monte Carlo error ±11 %): the basic
    interval must cover >= 80 % (measured 17/20) and at least as often as the percentile
    interval (15/20)."""
    rng = np.random.default_rng(12)
    basic = percentile = 0
    for rep in range(20):
        x, win = _windowed(rng, 50)
        boot = bootstrap_regimes(x, n_boot=40, seed=rep, clusters=win, grid_step=0.02)
        assert boot.ci_kappa is not None and boot.ci_kappa_basic is not None
        basic += boot.ci_kappa_basic[0] <= 0.7 <= boot.ci_kappa_basic[1]
        percentile += boot.ci_kappa[0] <= 0.7 <= boot.ci_kappa[1]
    assert basic >= 16, (basic, percentile)
    assert percentile <= basic, (basic, percentile)
