"""Tests of the split-half replication of the plateau."""

from __future__ import annotations

import functools
import itertools
import json
import math
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from scipy import stats as sps

from raretoken.errors import ConfigError, InsufficientDataError, NumericalError
from raretoken.stats.regimes import fit_regimes
from raretoken.stats.replication import (
    expected_jaccard,
    jaccard,
    replicate_plateau,
    split_windows,
)

# ---------------------------------------------------------------------------------------------
# split_windows
# ---------------------------------------------------------------------------------------------


def test_split_windows_halves_of_windows() -> None:
    rng = np.random.default_rng(0)
    windows = rng.integers(100, 151, 2000)  # 51 windows, unsorted, uneven sizes
    a, b = split_windows(windows, 4)
    assert a.dtype == bool and a.shape == windows.shape
    assert np.array_equal(a, ~b)
    wa, wb = np.unique(windows[a]), np.unique(windows[b])
    assert np.intersect1d(wa, wb).size == 0  # every window entirely in one half
    assert wa.size + wb.size == np.unique(windows).size
    assert (wa.size, wb.size) == (25, 26)
    a2, _ = split_windows(windows, 4)
    np.testing.assert_array_equal(a, a2)
    assert not np.array_equal(a, split_windows(windows, 5)[0])
    a3, _ = split_windows(windows, np.random.default_rng(4))
    np.testing.assert_array_equal(a, a3)


def test_split_windows_two_windows_and_errors() -> None:
    a, _ = split_windows([7, 7, 9], 0)
    assert a.sum() in (1, 2) and set(np.asarray([7, 7, 9])[a]) in ({7}, {9})
    with pytest.raises(InsufficientDataError, match=">= 2 windows"):
        split_windows([3, 3, 3], 0)
    with pytest.raises(InsufficientDataError):
        split_windows(np.array([], dtype=np.int64), 0)
    with pytest.raises(ConfigError, match="integer"):
        split_windows([1.0, 2.0, np.nan], 0)
    with pytest.raises(ConfigError, match="seed"):
        split_windows([1, 2], None)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Jaccard and its expectation
# ---------------------------------------------------------------------------------------------


def test_jaccard_hand_computed() -> None:
    assert jaccard([1, 2, 3], [2, 3, 4]) == pytest.approx(2 / 4)
    assert jaccard([1, 2], [1, 2]) == 1.0
    assert jaccard([1], [2]) == 0.0
    assert jaccard([1, 1, 2], [2]) == pytest.approx(1 / 2)  # duplicates ignored
    assert jaccard([], [5]) == 0.0
    assert math.isnan(jaccard([], []))


def test_expected_jaccard_hand_computed() -> None:
    # n = 4, two random pairs: I = 2 w.p. 1/6 (J = 1), 1 w.p. 4/6 (J = 1/3), 0 w.p. 1/6
    assert expected_jaccard(4, 2, 2) == pytest.approx(7 / 18, rel=1e-12)
    assert expected_jaccard(10, 10, 3) == pytest.approx(3 / 10)  # A is everything
    assert expected_jaccard(10, 0, 3) == 0.0
    assert math.isnan(expected_jaccard(10, 0, 0))


@pytest.mark.parametrize(("n", "a", "b"), [(7, 3, 4), (6, 2, 2), (6, 5, 4), (5, 1, 5), (6, 0, 2)])
def test_expected_jaccard_equals_brute_force_over_all_subsets(n: int, a: int, b: int) -> None:
    total, count = 0.0, 0
    for sa in itertools.combinations(range(n), a):
        for sb in itertools.combinations(range(n), b):
            total += jaccard(sa, sb)
            count += 1
    assert expected_jaccard(n, a, b) == pytest.approx(total / count, rel=1e-12)


def test_expected_jaccard_monte_carlo() -> None:
    n, a, b, draws = 1536, 56, 50, 20000
    rng = np.random.default_rng(12)
    inter = np.array(
        [
            np.intersect1d(rng.choice(n, a, replace=False), rng.choice(n, b, replace=False)).size
            for _ in range(draws)
        ]
    )
    j = inter / (a + b - inter)
    se = j.std(ddof=1) / math.sqrt(draws)
    assert abs(j.mean() - expected_jaccard(n, a, b)) < 4 * se


def test_expected_jaccard_errors() -> None:
    with pytest.raises(ConfigError):
        expected_jaccard(0, 0, 0)
    with pytest.raises(ConfigError):
        expected_jaccard(5, 6, 1)
    with pytest.raises(ConfigError):
        expected_jaccard(5, 1, -1)


# ---------------------------------------------------------------------------------------------
# replicate_plateau
# ---------------------------------------------------------------------------------------------


def _mean_curve(rng: np.random.Generator, n: int, plateau: int) -> np.ndarray:
    """Figure-1-like log10 mean Δloss in rank order: plateau (if any) 0.8 decades above a
    power law that bends into a rapid-decay tail."""
    r = np.arange(1, n + 1, dtype=float)
    log_mu = -2.4 - 0.8 * np.log10(r / 16) - 2.0 * np.clip(np.log10(r / 300), 0, None) ** 2
    if plateau:
        log_mu[:plateau] = -1.6 + rng.uniform(-0.1, 0.1, plateau)
    log_mu[plateau:] += rng.normal(0, 0.05, n - plateau)
    return log_mu


def _rows(
    seed: int, plateau: int, n: int = 1536, n_windows: int = 200, per_window: int = 10
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-position |ΔL| (exponential around the mean curve), window ids, neuron ids in rank
    order of the mean curve."""
    rng = np.random.default_rng(seed)
    ids = rng.permutation(n)
    mu = np.empty(n)
    mu[ids] = 10.0 ** _mean_curve(rng, n, plateau)
    windows = np.repeat(np.arange(n_windows), per_window)
    rows = mu * rng.exponential(1.0, (windows.size, n))
    return rows, windows, ids


def test_planted_plateau_replicates() -> None:
    rows, windows, ids = _rows(1, plateau=15)
    rep = replicate_plateau(rows, windows, seed=3)
    assert rep.has_plateau_a and rep.has_plateau_b
    np.testing.assert_array_equal(rep.plateau_a, np.sort(ids[:15]))
    np.testing.assert_array_equal(rep.plateau_b, np.sort(ids[:15]))
    assert rep.overlap == 15 and rep.jaccard == 1.0
    assert rep.expected_jaccard == pytest.approx(expected_jaccard(1536, 15, 15))
    assert rep.expected_jaccard < 0.01
    assert rep.p_value == pytest.approx(1.0 / math.comb(1536, 15), rel=1e-6)
    assert rep.p_value_empirical == pytest.approx(1.0 / 1001)  # no random pair gets there
    assert rep.random_jaccard_mean == pytest.approx(rep.expected_jaccard, abs=0.005)
    assert rep.spearman_rho > 0.99
    assert rep.significant and rep.replicates
    assert (rep.n_windows_a, rep.n_windows_b) == (100, 100)
    assert (rep.n_rows_a, rep.n_rows_b) == (1000, 1000)
    # the half means are the column means of the rows of each half
    mask_a, _ = split_windows(windows, 3)
    np.testing.assert_allclose(rep.delta_a, rows[mask_a].mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(rep.delta_b, rows[~mask_a].mean(axis=0), rtol=1e-12)
    d = json.loads(json.dumps(rep.to_dict(), allow_nan=False))
    assert d["replicates"] is True and d["jaccard"] == 1.0 and d["seed"] == 3
    assert "**Replicates**" in rep.to_markdown()
    with pytest.raises(ValueError):
        rep.plateau_a[0] = 0


def test_pure_power_law_has_nothing_to_replicate() -> None:
    rows, windows, _ = _rows(2, plateau=0, n=512, n_windows=60)
    rep = replicate_plateau(rows, windows, seed=0)
    assert not rep.has_plateau_a and not rep.has_plateau_b
    assert rep.plateau_a.size == 0 and rep.plateau_b.size == 0
    assert rep.overlap is None and rep.jaccard is None and rep.expected_jaccard is None
    assert rep.p_value is None and rep.p_value_empirical is None
    assert not rep.replicates and not rep.significant
    assert rep.note == "no plateau in either half"
    assert rep.spearman_rho > 0.9  # the ranking itself is reproducible
    d = json.loads(json.dumps(rep.to_dict(), allow_nan=False))
    assert d["jaccard"] is None and d["replicates"] is False
    assert "Does not replicate" in rep.to_markdown()


@pytest.mark.parametrize("first_has_plateau", [True, False])
def test_plateau_in_one_half_only(first_has_plateau: bool) -> None:
    rows, windows, _ = _rows(3, plateau=15, n=512, n_windows=40)
    calls: list[int] = []

    def fit(delta: np.ndarray, ids: np.ndarray) -> Any:
        # half A is fitted first: only one of the two halves gets its plateau
        calls.append(1)
        full = fit_regimes(delta, ids)
        assert full.has_plateau
        if (len(calls) == 1) == first_has_plateau:
            return full
        return SimpleNamespace(has_plateau=False, plateau_neurons=np.empty(0, dtype=np.int64))

    rep = replicate_plateau(rows, windows, seed=0, fit=fit)
    assert len(calls) == 2
    assert rep.has_plateau_a == first_has_plateau and rep.has_plateau_b != first_has_plateau
    assert rep.note == f"no plateau in half {'B' if first_has_plateau else 'A'}"
    assert rep.jaccard is None and rep.overlap is None and not rep.replicates
    assert (rep.plateau_size_a, rep.plateau_size_b) == ((15, 0) if first_has_plateau else (0, 15))


def test_window_driven_plateau_does_not_replicate() -> None:
    """Each of 4 windows inflates its own 10 neurons: each half finds a plateau, made of the
    neurons of the windows it happens to hold, and the two plateaus are disjoint."""
    rng = np.random.default_rng(5)
    n, per_window = 1536, 250
    mu = 10.0 ** _mean_curve(rng, n, 0)
    windows = np.repeat(np.arange(4), per_window)
    rows = mu * rng.exponential(1.0, (windows.size, n))
    boosted = rng.permutation(n)[:40].reshape(4, 10)
    for w in range(4):
        rows[np.ix_(windows == w, boosted[w])] = 10.0**-0.5 * rng.exponential(1.0, (per_window, 10))
    rep = replicate_plateau(rows, windows, seed=0)
    assert rep.has_plateau_a and rep.has_plateau_b
    # each half's plateau: the 20 neurons of its own two windows (and perhaps the top neuron
    # of the power law)
    mask_a, _ = split_windows(windows, 0)
    own_a = boosted[np.unique(windows[mask_a])].ravel()
    own_b = boosted[np.unique(windows[~mask_a])].ravel()
    assert np.isin(own_a, rep.plateau_a).all() and np.isin(own_b, rep.plateau_b).all()
    assert 20 <= rep.plateau_size_a <= 22 and 20 <= rep.plateau_size_b <= 22
    assert rep.overlap is not None and rep.overlap <= 1
    assert rep.jaccard is not None and rep.jaccard < 0.03
    assert rep.p_value is not None and rep.p_value > 0.05
    assert not rep.significant and not rep.replicates
    assert "not above random" in rep.note


def _top_k_fit(k: int) -> Any:
    def fit(delta: np.ndarray, ids: np.ndarray) -> Any:
        return SimpleNamespace(has_plateau=True, plateau_neurons=ids[np.argsort(-delta)[:k]])

    return fit


def test_exact_and_empirical_p_values_agree() -> None:
    # pure noise: the two halves' "plateaus" (top-100 of 300) overlap at random
    rng = np.random.default_rng(8)
    rows = rng.exponential(1.0, (400, 300))
    windows = np.repeat(np.arange(80), 5)
    rep = replicate_plateau(rows, windows, seed=1, fit=_top_k_fit(100), n_random=4000)
    a = b = 100
    assert rep.p_value == pytest.approx(sps.hypergeom(300, a, b).sf(rep.overlap - 1))
    assert 0.01 < rep.p_value < 0.99
    se = math.sqrt(rep.p_value * (1 - rep.p_value) / 4000)
    assert abs(rep.p_value_empirical - rep.p_value) < 4 * se + 1 / 4001
    assert rep.random_jaccard_mean == pytest.approx(expected_jaccard(300, a, b), abs=0.005)


def test_significant_but_small_overlap_does_not_replicate() -> None:
    # 10 neurons always on top; the other 20 of each half's top-30 are noise
    rng = np.random.default_rng(9)
    rows = rng.exponential(1.0, (400, 1000))
    rows[:, :10] += 5.0
    windows = np.repeat(np.arange(80), 5)
    rep = replicate_plateau(rows, windows, seed=2, fit=_top_k_fit(30))
    assert rep.overlap is not None and 10 <= rep.overlap <= 13
    assert rep.jaccard is not None and rep.jaccard < 0.5
    assert rep.significant and rep.p_value is not None and rep.p_value < 1e-10
    assert not rep.replicates
    assert "above random" in rep.note and "small" in rep.note
    relaxed = replicate_plateau(rows, windows, seed=2, fit=_top_k_fit(30), min_jaccard=0.1)
    assert relaxed.replicates


def test_memmap_in_chunks_equals_in_memory(tmp_path) -> None:  # type: ignore[no-untyped-def]
    rows, windows, _ = _rows(4, plateau=12, n=700, n_windows=50, per_window=6)
    rows32 = rows.astype(np.float32)
    path = tmp_path / "rows.f32"
    mm = np.memmap(path, dtype=np.float32, mode="w+", shape=rows32.shape)
    mm[:] = rows32
    mm.flush()
    ro = np.memmap(path, dtype=np.float32, mode="r", shape=rows32.shape)
    fit = functools.partial(fit_regimes, grid_step=0.02)
    ref = replicate_plateau(rows32, windows, seed=6, fit=fit)
    got = replicate_plateau(ro, windows, seed=6, fit=fit, chunk_rows=7)
    np.testing.assert_allclose(got.delta_a, ref.delta_a, rtol=1e-12)
    np.testing.assert_allclose(got.delta_b, ref.delta_b, rtol=1e-12)
    np.testing.assert_array_equal(got.plateau_a, ref.plateau_a)
    np.testing.assert_array_equal(got.plateau_b, ref.plateau_b)
    assert ref.replicates and got.to_dict()["replicates"] is True
    assert got.p_value_empirical == ref.p_value_empirical
    assert got.spearman_rho == pytest.approx(ref.spearman_rho, abs=1e-12)


def test_replicate_plateau_errors() -> None:
    rows = np.random.default_rng(0).exponential(1.0, (20, 30))
    windows = np.repeat(np.arange(4), 5)
    with pytest.raises(ConfigError, match="entries"):
        replicate_plateau(rows, windows[:-1], seed=0)
    with pytest.raises(ConfigError, match="2-D"):
        replicate_plateau(rows[:, 0], windows, seed=0)
    with pytest.raises(InsufficientDataError, match=">= 2 windows"):
        replicate_plateau(rows, np.zeros(20, dtype=np.int64), seed=0)
    with pytest.raises(ConfigError, match="integer"):
        replicate_plateau(rows, windows.astype(float), seed=0)
    bad = rows.copy()
    bad[7, 3] = np.nan
    with pytest.raises(NumericalError):
        replicate_plateau(bad, windows, seed=0)
    with pytest.raises(ConfigError, match="absolute"):
        replicate_plateau(-rows, windows, seed=0)
    with pytest.raises(ConfigError, match="n_random"):
        replicate_plateau(rows, windows, seed=0, n_random=0)
    with pytest.raises(ConfigError, match="alpha"):
        replicate_plateau(rows, windows, seed=0, alpha=0.0)
    with pytest.raises(ConfigError, match="min_jaccard"):
        replicate_plateau(rows, windows, seed=0, min_jaccard=1.5)
    with pytest.raises(ConfigError, match="seed"):
        replicate_plateau(rows, windows, seed=None)  # type: ignore[arg-type]
