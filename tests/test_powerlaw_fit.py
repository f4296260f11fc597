"""KS (Clauset et al.) power-law fits of spectra, WeightWatcher conventions, and their use in
the spectral analysis. Cross-checks: an independent brute-force KS search written here, the
``powerlaw`` package; tests/test_weightwatcher_parity.py compares with WeightWatcher."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from raretoken.analyses.groups import random_control_groups
from raretoken.analyses.spectra import SpectraResult, spectra_analysis
from raretoken.errors import ConfigError, NumericalError
from raretoken.stats.powerlaw_fit import (
    MIN_EVALS,
    MIN_TAIL,
    PowerLawComparison,
    PowerLawFit,
    compare_powerlaw_fits,
    powerlaw_fit,
)


def brute_force(
    values: np.ndarray, min_tail: int, lo: float = 0.0, hi: float = math.inf
) -> tuple[float, float, float, int]:
    """Independent CSN search: ``(alpha_pdf, x_min, D, n_tail)`` by pure-Python loops over
    every candidate ``x_min`` in ``[lo, hi]`` (never the largest value alone)."""
    xs = sorted(float(v) for v in values)
    best: tuple[float, float, float, int] | None = None
    for i in range(len(xs) - 1):
        xm = xs[i]
        tail = xs[i:]
        n = len(tail)
        if n < min_tail or not lo <= xm <= hi:
            continue
        s = sum(math.log(t / xm) for t in tail)
        if s <= 0:
            continue
        a = 1.0 + n / s
        d = max(abs(j / n - (1.0 - (t / xm) ** (1.0 - a))) for j, t in enumerate(tail))
        if best is None or d < best[2]:
            best = (a, xm, d, n)
    assert best is not None
    return best


def planted(seed: int, n_bulk: int = 200, n_tail: int = 200, a_pdf: float = 2.5) -> np.ndarray:
    """Uniform bulk on [0.1, 1) below a Pareto tail with x_min = 1 and density exponent a."""
    rng = np.random.default_rng(seed)
    tail = rng.random(n_tail) ** (-1.0 / (a_pdf - 1.0))
    return rng.permutation(np.concatenate([rng.uniform(0.1, 1.0, n_bulk), tail]))


def test_fixed_xmin_known_values() -> None:
    x = np.array([0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0])
    fit = powerlaw_fit(x, xmin=1.0)
    n, s = 9, math.log(2.0) * sum(range(9))  # ln(2^j / 1), j = 0..8
    assert fit.fitted and fit.rule == "xmin" and fit.k == n and fit.x_min == 1.0
    assert fit.alpha_pdf == pytest.approx(1.0 + n / s, rel=1e-12)
    assert fit.alpha_tail == pytest.approx(n / s, rel=1e-12)
    assert fit.alpha_pdf_se == pytest.approx((fit.alpha_pdf - 1.0) / 3.0, rel=1e-12)
    assert fit.lambda_max == 256.0 and fit.n_eigenvalues == 10
    assert fit.alpha_weighted == pytest.approx(fit.alpha_pdf * math.log10(256.0), rel=1e-12)
    d = max(abs(j / n - (1 - 2.0 ** (j * (1 - fit.alpha_pdf)))) for j in range(n))
    assert fit.ks_distance == pytest.approx(d, rel=1e-12)
    assert powerlaw_fit(x, xmin=0.9).k == 9  # tail = values >= the threshold


@pytest.mark.parametrize("min_tail", [2, 8, 40])
def test_ks_search_matches_brute_force(min_tail: int) -> None:
    rng = np.random.default_rng(min_tail)
    for x in (planted(min_tail, 60, 60), np.linalg.svd(rng.normal(size=(40, 90)), compute_uv=False) ** 2):  # fmt: skip
        fit = powerlaw_fit(x, min_tail=min_tail)
        a, xm, d, n = brute_force(x, min_tail)
        assert fit.fitted and fit.rule == "ks" and fit.k == n and fit.k >= min_tail
        assert fit.x_min == xm
        assert fit.alpha_pdf == pytest.approx(a, rel=1e-10)
        assert fit.ks_distance == pytest.approx(d, rel=1e-10)


def test_scale_changes_only_xmin_and_alpha_weighted() -> None:
    x = planted(3)
    a, b = powerlaw_fit(x), powerlaw_fit(1000.0 * x)
    assert b.k == a.k and b.alpha_pdf == pytest.approx(a.alpha_pdf, rel=1e-9)
    assert b.ks_distance == pytest.approx(a.ks_distance, rel=1e-9)
    assert b.x_min == pytest.approx(1000.0 * a.x_min, rel=1e-12)
    assert b.alpha_weighted == pytest.approx(a.alpha_weighted + 3.0 * a.alpha_pdf, rel=1e-9)


def test_planted_xmin_is_found_and_se_covers_alpha() -> None:
    """200 seeded mixtures (x_min = 1, alpha_pdf = 2.5, 200 tail values): the KS x_min lands
    near 1 and alpha_pdf ± 1.96 SE covers 2.5 at close to the nominal rate."""
    fits = [powerlaw_fit(planted(seed)) for seed in range(200)]
    xmins = np.array([f.x_min for f in fits])
    covered = np.array([abs(f.alpha_pdf - 2.5) <= 1.96 * f.alpha_pdf_se for f in fits])
    assert 0.9 <= float(np.median(xmins)) <= 1.15
    assert np.mean((xmins > 0.85) & (xmins < 1.5)) >= 0.8
    assert 0.85 <= covered.mean() <= 0.99  # measured 0.905
    # the bulk is not a power law: fitting it all in (x_min = 0.1) is far off
    whole = [powerlaw_fit(planted(seed), xmin=0.1).alpha_pdf for seed in range(20)]
    assert np.all(np.abs(np.array(whole) - 2.5) > 0.5)


def test_matches_powerlaw_package() -> None:
    powerlaw = pytest.importorskip("powerlaw")
    for seed in range(3):
        x = planted(seed)
        ours = powerlaw_fit(x, min_tail=2)  # the package searches every tail
        ref = powerlaw.Fit(x, verbose=False)
        assert ours.x_min == pytest.approx(ref.xmin, rel=1e-12)
        assert ours.alpha_pdf == pytest.approx(ref.power_law.alpha, rel=1e-9)
        assert ours.ks_distance == pytest.approx(ref.power_law.D, rel=1e-9)


def test_xmin_peak_searches_near_the_histogram_peak() -> None:
    for seed in (4, 10, 22):  # 10: the 0.95 bound matters; 22: the 1.5 bound matters
        x = planted(seed, 300, 150)
        fit = powerlaw_fit(x, fix_fingers="xmin_peak")
        counts, edges = np.histogram(np.log10(x), bins=100)
        peak = 10 ** edges[np.argmax(counts)]
        assert fit.rule == "xmin_peak" and fit.peak == pytest.approx(peak, rel=1e-12)
        a, xm, _d, n = brute_force(x, MIN_TAIL, 0.95 * peak, 1.5 * peak)
        assert fit.x_min == xm and fit.k == n and 0.95 * peak <= fit.x_min <= 1.5 * peak
        assert fit.alpha_pdf == pytest.approx(a, rel=1e-10)
    # a peak at the top of the spectrum leaves too few tail values: reported, not fitted
    top = np.concatenate([np.linspace(1.0, 2.0, 20), np.full(30, 50.0) + np.arange(30) * 1e-3])
    none = powerlaw_fit(top, fix_fingers="xmin_peak", min_tail=40)
    assert not none.fitted and "40 tail" in str(none.reason) and math.isnan(none.alpha_pdf)


def test_clip_xmax_follows_the_weightwatcher_loop() -> None:
    """Drop the idx = 2..9 largest; keep the first refit whose alpha is > 1 below the first
    fit's, stop at alpha <= 2 (brute force of the same rule)."""
    clipped = 0
    for seed in range(12):
        x = np.sort(np.linalg.svd(np.random.default_rng(seed).normal(size=(48, 48)), compute_uv=False) ** 2)  # fmt: skip
        fit = powerlaw_fit(x, min_tail=2, fix_fingers="clip_xmax")
        first = brute_force(x, 2)
        expect, n_clip = first, 0
        for idx in range(2, 10):
            refit = brute_force(x[:-idx], 2)
            if refit[0] + 1.0 < first[0]:
                expect, n_clip = refit, idx
                break
            if refit[0] <= 2.0:
                break
        assert fit.n_clipped == n_clip and fit.x_min == expect[1] and fit.k == expect[3]
        assert fit.alpha_pdf == pytest.approx(expect[0], rel=1e-10)
        assert fit.lambda_max == x[-1]  # alpha_weighted keeps the clipped eigenvalues
        clipped += n_clip > 0
    assert clipped >= 3  # the rule did fire
    # the alpha <= 2 stop matters here: refits give 3.7, 16.7, 1.85 (stop) ... 1.75 (< 2.8 - 1)
    rng = np.random.default_rng(1411)
    body = np.exp(np.sort(rng.uniform(0.0, 3.5, 50)))
    x = np.concatenate([body, body[-1] * np.exp(1.3 + 0.003 * np.arange(3))])
    alphas = [brute_force(x[: x.size - idx], 2)[0] for idx in (0, 2, 3, 4, 9)]
    assert alphas[1] > 2.0 and alphas[2] > 2.0  # no drop, no stop at idx 2, 3
    assert alphas[3] <= 2.0 and alphas[3] + 1.0 >= alphas[0] and alphas[4] + 1.0 < alphas[0]
    assert powerlaw_fit(x, min_tail=2, fix_fingers="clip_xmax").n_clipped == 0


def test_guards_report_instead_of_fitting() -> None:
    few = powerlaw_fit(np.arange(1.0, MIN_EVALS))  # 7 < 8 eigenvalues
    assert not few.fitted and "need >= 8" in str(few.reason)
    assert few.k == 0 and math.isnan(few.alpha_pdf) and math.isnan(few.alpha_weighted)
    assert few.lambda_max == MIN_EVALS - 1.0
    zeros = powerlaw_fit(np.concatenate([np.zeros(20), np.arange(1.0, 5.0)]))  # zeros dropped
    assert not zeros.fitted and zeros.n_eigenvalues == 4
    empty = powerlaw_fit(np.zeros(10))
    assert not empty.fitted and empty.n_eigenvalues == 0 and math.isnan(empty.lambda_max)
    short = powerlaw_fit(planted(1, 5, 5), min_tail=12)
    assert not short.fitted and "12 tail" in str(short.reason)
    equal = powerlaw_fit(np.full(20, 3.0))
    assert not equal.fitted and "all-equal" in str(equal.reason)
    above = powerlaw_fit(planted(2), xmin=1e6)
    assert not above.fitted
    assert powerlaw_fit(planted(2), xmin=0.01).k == 400  # below everything: all fitted
    for kw in ({"min_tail": 1}, {"min_evals": 1}, {"xmin": "peak"}, {"xmin": -1.0},
               {"fix_fingers": "clip"}, {"fix_fingers": "xmin_peak", "xmin": 1.0},
               {"fix_fingers": "clip_xmax", "max_fingers": 2}, {"rel_tol": 1.0},
               {"fix_fingers": "xmin_peak", "bins": 1}):  # fmt: skip
        with pytest.raises(ConfigError):
            powerlaw_fit(planted(2), **kw)
    with pytest.raises(NumericalError):
        powerlaw_fit(np.array([1.0, np.nan, 2.0]))


def test_fit_and_comparison_round_trip_json() -> None:
    for fit in (powerlaw_fit(planted(5), fix_fingers="xmin_peak"), powerlaw_fit(np.ones(3))):
        back = PowerLawFit.from_dict(json.loads(json.dumps(fit.to_dict())))
        assert back.to_dict() == fit.to_dict()
    keys = [k for k in powerlaw_fit(planted(5)).to_dict() if "alpha" in k]
    assert keys == ["alpha_pdf_ks", "alpha_pdf_ks_se", "alpha_tail_ks", "alpha_weighted"]
    comp = compare_powerlaw_fits(planted(6), [planted(s) for s in range(7, 12)] + [np.ones(3)])
    back_c = PowerLawComparison.from_dict(json.loads(json.dumps(comp.to_dict())))
    assert back_c.to_dict() == comp.to_dict() and comp.n_fitted == 5
    assert comp.comparison is not None and comp.comparison.n_draws == 5
    assert "1 of 6 random groups" in str(comp.note)


def test_comparison_of_a_heavier_group() -> None:
    rng = np.random.default_rng(8)
    heavy = rng.random(300) ** (-1.0 / 0.8)  # alpha_pdf 1.8
    light = [rng.random(300) ** (-1.0 / 2.5) for _ in range(19)]  # alpha_pdf 3.5
    comp = compare_powerlaw_fits(heavy, light, scale=7.0)
    assert comp.comparison is not None and comp.note is None
    assert comp.comparison.p_value == pytest.approx(1 / 20)
    assert comp.observed.alpha_pdf == pytest.approx(powerlaw_fit(heavy).alpha_pdf, rel=1e-9)
    assert comp.observed.x_min == pytest.approx(7.0 * powerlaw_fit(heavy).x_min, rel=1e-12)
    few = compare_powerlaw_fits(np.arange(1.0, 4.0), light, label="plateau neurons")
    assert few.comparison is None and "plateau neurons" in str(few.note)
    one = compare_powerlaw_fits(heavy, [light[0], np.ones(2)])
    assert one.comparison is None and "only 1 of 2" in str(one.note)


# --------------------------------------------------------------------- spectral analysis
N_NEURONS, D = 120, 64
GROUP = np.arange(0, 60, 3)  # 20 neurons


def _weights() -> np.ndarray:
    """Gaussian rows; the group's rows have power-law singular values (a heavy tail)."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(N_NEURONS, D))
    u, _ = np.linalg.qr(rng.normal(size=(GROUP.size, GROUP.size)))
    v, _ = np.linalg.qr(rng.normal(size=(D, GROUP.size)))
    w[GROUP] = (u * (8.0 * np.arange(1, GROUP.size + 1) ** -0.8)) @ v.T
    return w


def test_spectra_reports_ks_fit_next_to_hill() -> None:
    w = _weights()
    rg = random_control_groups(GROUP, N_NEURONS, 20, seed=1)
    res = spectra_analysis(w, GROUP, rg)
    # the KS fit runs on the eigenvalues of W_G W_G^T (WeightWatcher's scale)
    ref = powerlaw_fit(np.linalg.svd(w[GROUP], compute_uv=False) ** 2)
    assert res.observed_ks.alpha_pdf == pytest.approx(ref.alpha_pdf, rel=1e-9)
    assert res.observed_ks.x_min == pytest.approx(ref.x_min, rel=1e-9)
    assert res.observed_ks.alpha_weighted == pytest.approx(ref.alpha_weighted, rel=1e-9)
    row_g, row_r = res.to_table()
    assert res.ks_comparison is not None and res.ks_note is None
    assert row_g["p_alpha_pdf_ks_less"] == pytest.approx(1 / 21)  # heavier than all random
    assert row_g["alpha_pdf_ks"] < row_r["alpha_pdf_ks"] and row_r["n_ks_fitted"] == 20
    assert row_r["alpha_pdf_ks"] == pytest.approx(float(np.mean(res.ks.random_alpha_pdf)))
    assert row_g["alpha_pdf_hill"] == pytest.approx(row_g["alpha_tail_hill"] + 1.0)
    # every α column names its convention
    for col in row_g:
        if "alpha" in col:
            assert "tail" in col or "pdf" in col or col.startswith("alpha_weighted"), col
    md = res.to_markdown()
    assert "tail index" in md and "density exponent" in md and "alpha_pdf_ks" in md
    back = SpectraResult.from_dict(json.loads(json.dumps(res.to_dict())))
    assert back.to_table() == res.to_table() and back.to_markdown() == md


def test_spectra_small_group_reports_no_ks_fit() -> None:
    group = GROUP[:6]  # 6 eigenvalues < MIN_EVALS: Hill still runs, KS is reported
    res = spectra_analysis(_weights(), group, random_control_groups(group, N_NEURONS, 10, seed=2))
    assert not res.observed_ks.fitted and res.ks_comparison is None
    assert "plateau neurons" in str(res.ks_note) and "need >= 8" in str(res.ks_note)
    row = res.to_table()[0]
    assert row["alpha_pdf_ks"] is None and row["n_ks_fitted"] == 0
    assert row["p_alpha_pdf_ks_less"] is None and math.isfinite(row["alpha_tail_hill"])
    assert "KS fit: KS fit not possible" in res.to_markdown()


def test_spectra_reads_dicts_written_before_the_ks_fit() -> None:
    res = spectra_analysis(_weights(), GROUP, random_control_groups(GROUP, N_NEURONS, 8, seed=3))
    old = res.to_dict()
    del old["ks"]
    old["random_alpha"] = old.pop("random_alpha_tail_hill")
    old["comparison"] = old.pop("comparison_alpha_tail_hill")
    obs = old["observed"]
    for new, was in (("alpha_tail_hill", "alpha"), ("alpha_pdf_hill", "alpha_pdf"),
                     ("alpha_tail_hill_se", "alpha_se")):  # fmt: skip
        obs[was] = obs.pop(new)
    back = SpectraResult.from_dict(json.loads(json.dumps(old)))
    assert back.to_table() == res.to_table()  # the KS part is recomputed from the spectra
