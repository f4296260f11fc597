from __future__ import annotations

import json
import math

import numpy as np
import pytest

from raretoken.errors import ConfigError, InsufficientDataError, NumericalError
from raretoken.stats.hill import HillFit, group_spectrum, hill_alpha


def pareto(a: float, n: int, seed: int, scale: float = 1.0) -> np.ndarray:
    """Sample with P(X > x) = (x / scale)^(-a) for x >= scale."""
    return scale * np.random.default_rng(seed).random(n) ** (-1.0 / a)


def test_group_spectrum_matches_eigvalsh() -> None:
    rng = np.random.default_rng(0)
    w = rng.normal(size=(12, 64))
    eig = group_spectrum(w)
    ref = np.sort(np.linalg.eigvalsh(w @ w.T / 64))[::-1]
    np.testing.assert_allclose(eig, ref, rtol=1e-10)
    assert np.all(np.diff(eig) <= 0)
    # more neurons than columns: |G| eigenvalues, the surplus are exact zeros
    wide = group_spectrum(rng.normal(size=(10, 4)))
    assert wide.shape == (10,) and np.all(wide[4:] == 0.0) and np.all(wide[:4] > 0)
    with pytest.raises(InsufficientDataError):
        group_spectrum(np.ones((1, 5)))
    with pytest.raises(ConfigError):
        group_spectrum(np.ones(5))
    with pytest.raises(NumericalError):
        group_spectrum(np.array([[1.0, np.nan], [0.0, 1.0]]))


def test_eq10_known_value() -> None:
    eigs = np.array([1.0, 8.0, 2.0, 4.0, 0.5])
    fit = hill_alpha(eigs, k=4)  # tail 8, 4, 2, 1 -> sum ln = 3 ln2 + 2 ln2 + ln2 + 0
    assert fit.alpha == pytest.approx(4.0 / (6.0 * math.log(2.0)))
    assert fit.alpha_pdf == pytest.approx(fit.alpha + 1.0)
    assert fit.x_min == 1.0 and fit.k == 4 and fit.rule == "k"
    assert fit.alpha_se == pytest.approx(fit.alpha / 2.0)
    by_x = hill_alpha(eigs, xmin=1.0)
    assert by_x.k == 4 and by_x.alpha == fit.alpha and by_x.rule == "xmin"
    assert hill_alpha(eigs, xmin=0.9).k == 4


@pytest.mark.parametrize("a", [0.8, 1.5, 3.0])
@pytest.mark.parametrize("density", ["kde", "histogram"])
def test_pareto_tail_exponent_is_recovered(a: float, density: str) -> None:
    fit = hill_alpha(pareto(a, 3000, seed=int(10 * a)), density=density)  # type: ignore[arg-type]
    assert fit.rule == "peak" and not fit.fallback
    assert fit.k > 1000
    assert fit.alpha == pytest.approx(a, abs=4 * fit.alpha_se)
    assert fit.alpha == pytest.approx(a, rel=0.1)


def test_matches_powerlaw_package_at_same_xmin() -> None:
    powerlaw = pytest.importorskip("powerlaw")
    x = pareto(1.5, 1500, seed=1, scale=0.3)
    fit = hill_alpha(x)
    ref = powerlaw.Fit(x, xmin=fit.x_min, verbose=False)
    assert ref.power_law.alpha == pytest.approx(fit.alpha_pdf, rel=1e-9)


def test_matches_weightwatcher_alpha_for_every_xmin() -> None:
    ww_powerlaw = pytest.importorskip("weightwatcher.WW_powerlaw")
    x = np.sort(pareto(2.0, 400, seed=2))
    ref = ww_powerlaw.WWFit(x)  # alphas[i]: density exponent with xmin = i-th smallest value
    for i in (0, 10, 150, 390):
        ours = hill_alpha(x, k=x.size - i)
        assert ref.alphas[i] == pytest.approx(ours.alpha_pdf, rel=1e-10)


def test_kde_peak_matches_independent_kde() -> None:
    rng = np.random.default_rng(3)
    bulk = 10 ** rng.normal(0.0, 0.05, size=200)
    tail = 10 ** (0.3 + rng.exponential(0.4, size=80))
    eigs = np.concatenate([bulk, tail])
    fit = hill_alpha(eigs)
    logs = np.log10(eigs)
    h = logs.std(ddof=1) * logs.size ** (-1.0 / 5.0)  # Scott's rule
    grid = np.linspace(logs.min(), logs.max(), 1024)
    dens = np.exp(-0.5 * ((grid[:, None] - logs[None, :]) / h) ** 2).sum(axis=1)
    peak = 10 ** grid[np.argmax(dens)]
    assert fit.peak == pytest.approx(peak, rel=1e-9)
    assert abs(math.log10(peak)) < 0.05  # the bulk's mode
    assert fit.x_min == np.min(eigs[eigs >= peak]) and fit.x_min in eigs
    assert fit.k == int(np.sum(eigs >= fit.x_min))
    # histogram variant: WeightWatcher's xmin_peak location (left edge of the fullest bin)
    counts, edges = np.histogram(logs, bins=100)
    hist = hill_alpha(eigs, density="histogram")
    assert hist.peak == pytest.approx(10 ** edges[np.argmax(counts)])
    assert hist.k == int(np.sum(logs >= edges[np.argmax(counts)]))


def test_small_group_falls_back_to_min_k() -> None:
    # the fullest histogram bin is the last one and holds 4 < min_k values
    logs = np.concatenate([np.linspace(0.0, 0.9, 20), 1.0 + 1e-4 * np.arange(4)])
    eigs = 10**logs
    counts, _ = np.histogram(logs, bins=10)
    assert np.argmax(counts) == 9 and counts[9] == 4
    fit = hill_alpha(eigs, density="histogram", bins=10, min_k=6)
    assert fit.fallback and fit.k == 6
    assert fit.alpha == pytest.approx(hill_alpha(eigs, k=6).alpha)
    assert not hill_alpha(eigs, density="histogram", bins=10, min_k=4).fallback
    # ordinary small group (tens of eigenvalues): no fallback needed
    small = hill_alpha(group_spectrum(np.random.default_rng(5).normal(size=(30, 512))))
    assert not small.fallback and 5 <= small.k <= 30 and small.n_eigenvalues == 30


def test_zero_eigenvalues_are_dropped() -> None:
    w = np.random.default_rng(6).standard_t(3.0, size=(40, 25))  # rank 25 < 40
    fit = hill_alpha(group_spectrum(w))
    assert fit.n_eigenvalues == 25 and fit.eigenvalues.min() > 0


def test_heavy_tailed_weights_give_lower_alpha_than_gaussian() -> None:
    rng = np.random.default_rng(7)
    gauss = [hill_alpha(group_spectrum(rng.normal(size=(50, 1024)))).alpha for _ in range(3)]
    heavy = [
        hill_alpha(
            group_spectrum(rng.standard_t(2.0, size=(50, 1024)) * rng.pareto(1.5, size=(50, 1)))
        ).alpha
        for _ in range(3)
    ]
    assert max(heavy) < 2.0 < min(gauss)


def test_errors() -> None:
    with pytest.raises(InsufficientDataError):
        hill_alpha(np.array([1.0, 2.0]))
    with pytest.raises(InsufficientDataError):
        hill_alpha(np.array([0.0, 0.0, 1.0, 2.0]))  # zeros dropped: 2 left
    with pytest.raises(NumericalError):
        hill_alpha(np.full(10, 3.0))
    with pytest.raises(NumericalError):
        hill_alpha(np.array([1.0, 2.0, 3.0, 5.0, 5.0, 5.0]), k=3)
    with pytest.raises(NumericalError):
        hill_alpha(np.array([1.0, np.nan, 2.0]))
    with pytest.raises(NumericalError):
        hill_alpha(np.zeros(5))
    eigs = pareto(1.5, 50, seed=8)
    with pytest.raises(ConfigError):
        hill_alpha(eigs, k=1)
    with pytest.raises(ConfigError):
        hill_alpha(eigs, k=51)
    with pytest.raises(ConfigError):
        hill_alpha(eigs, xmin="mid")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        hill_alpha(eigs, xmin=-1.0)
    with pytest.raises(InsufficientDataError):
        hill_alpha(eigs, xmin=float(eigs.max()))
    with pytest.raises(ConfigError):
        hill_alpha(eigs, density="gmm")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        hill_alpha(eigs, min_k=1)


def test_round_trip_json() -> None:
    fit = hill_alpha(pareto(1.2, 200, seed=9))
    back = HillFit.from_dict(json.loads(json.dumps(fit.to_dict())))
    assert back.to_dict() == fit.to_dict()
    given = hill_alpha(pareto(1.2, 200, seed=9), k=20)
    assert HillFit.from_dict(given.to_dict()).peak is None


def test_dict_keys_name_the_convention_and_old_keys_still_load() -> None:
    fit = hill_alpha(pareto(1.2, 200, seed=10))
    d = fit.to_dict()
    assert [k for k in d if "alpha" in k] == [
        "alpha_tail_hill",
        "alpha_pdf_hill",
        "alpha_tail_hill_se",
    ]
    assert d["alpha_tail_hill"] == fit.alpha == fit.alpha_tail
    old = {k: v for k, v in d.items() if "alpha" not in k}
    old.update(alpha=fit.alpha, alpha_pdf=fit.alpha_pdf, alpha_se=fit.alpha_se)
    assert HillFit.from_dict(old).to_dict() == d
