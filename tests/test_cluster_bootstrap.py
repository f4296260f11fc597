"""Tests of the window-cluster bootstrap of Δrare / Δcommon (``stats.cluster_bootstrap``)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from raretoken.errors import ConfigError, InsufficientDataError, NumericalError
from raretoken.stats.cluster_bootstrap import RatioInterval, ratio_interval


def _brute_force_ratio(
    rare: np.ndarray,
    common: np.ndarray,
    rc: np.ndarray,
    cc: np.ndarray,
    n_boot: int,
    seed: int,
    level: float,
    paired: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Resample windows, concatenate their rows, take the ratio of the row means."""
    rng = np.random.default_rng(seed)
    if paired:
        clusters = np.union1d(rc, cc)
        draws_r = draws_c = rng.integers(0, clusters.size, size=(n_boot, clusters.size))
        cl_r = cl_c = clusters
    else:
        cl_r, cl_c = np.unique(rc), np.unique(cc)
        draws_r = rng.integers(0, cl_r.size, size=(n_boot, cl_r.size))
        draws_c = rng.integers(0, cl_c.size, size=(n_boot, cl_c.size))
    boots = []
    for b in range(n_boot):
        r_rows = np.concatenate([rare[rc == cl_r[i]] for i in draws_r[b]])
        c_rows = np.concatenate([common[cc == cl_c[i]] for i in draws_c[b]])
        if len(r_rows) and len(c_rows):
            boots.append(r_rows.mean(axis=0) / c_rows.mean(axis=0))
    q = [(1 - level) / 2, (1 + level) / 2]
    lo, hi = np.quantile(np.array(boots), q, axis=0)
    return rare.mean(axis=0) / common.mean(axis=0), lo, hi


def _small_clustered(rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    rc = np.array([3, 3, 7, 9, 9, 9, 12])  # windows 3, 7, 9, 12 hold rare rows
    cc = np.array([1, 3, 3, 7, 7, 9, 12, 12, 12, 20])  # 1 and 20 hold common rows only
    rare = rng.exponential(1.0, (rc.size, 4))
    common = rng.exponential(1.0, (cc.size, 4))
    return rare, common, rc, cc


@pytest.mark.parametrize("paired", [True, False])
def test_ratio_interval_equals_brute_force_resampling_of_windows(paired: bool) -> None:
    rare, common, rc, cc = _small_clustered(np.random.default_rng(0))
    res = ratio_interval(rare, common, rc, cc, 300, 5, level=0.9, paired=paired)
    ratio, lo, hi = res  # unpacks
    ref_ratio, ref_lo, ref_hi = _brute_force_ratio(rare, common, rc, cc, 300, 5, 0.9, paired)
    np.testing.assert_allclose(ratio, ref_ratio, rtol=1e-12)
    np.testing.assert_allclose(lo, ref_lo, rtol=1e-12)
    np.testing.assert_allclose(hi, ref_hi, rtol=1e-12)
    assert np.all(lo <= ratio) and np.all(ratio <= hi)
    assert res.n_rare_clusters == 4 and res.n_common_clusters == 6
    assert res.n_rare_rows == 7 and res.n_common_rows == 10
    if paired:  # 6 windows, 2 without rare rows: some resamples hold no rare row
        assert res.n_undefined == 300 - len(
            [
                b
                for b in np.random.default_rng(5).integers(0, 6, size=(300, 6))
                if np.isin(b, [1, 2, 3, 4]).any()
            ]
        )
    else:
        assert res.n_undefined == 0


def test_ratio_interval_memmap_in_chunks_equals_in_memory(tmp_path) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(1)
    rare = rng.exponential(1.0, (103, 7)).astype(np.float32)
    common = rng.exponential(2.0, (251, 7)).astype(np.float32)
    rc = np.sort(rng.integers(0, 30, rare.shape[0]))
    cc = rng.integers(0, 30, common.shape[0])  # unsorted windows: chunks see them scattered
    path = tmp_path / "rare.f32"
    mm = np.memmap(path, dtype=np.float32, mode="w+", shape=rare.shape)
    mm[:] = rare
    mm.flush()
    ro = np.memmap(path, dtype=np.float32, mode="r", shape=rare.shape)
    for paired in (True, False):
        ref = ratio_interval(rare, common, rc, cc, 200, 9, paired=paired)
        got = ratio_interval(ro, common, rc, cc, 200, 9, paired=paired, chunk_rows=10)
        for a, b in zip(ref, got, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-12)


def _clustered_data(
    rng: np.random.Generator, n_windows: int = 40, n_neurons: int = 20
) -> tuple[np.ndarray, ...]:
    """Rows whose values share a window factor: rare (common) rows of window w of neuron j
    are ``a_j · v_wj · u_wj · e`` (``b_j · v_wj · u'_wj · e'``) with mean-one log-normal
    window factors ``v`` (shared by both kinds), ``u``, ``u'`` and exponential noise ``e``,
    so the true ratio of the means is ``a_j / b_j``."""

    def lognormal(sigma: float, shape: tuple[int, int]) -> np.ndarray:
        return np.exp(rng.normal(-(sigma**2) / 2, sigma, shape))

    a, b = np.exp(rng.normal(0, 1, n_neurons)), np.exp(rng.normal(0, 1, n_neurons))
    shape = (n_windows, n_neurons)
    v, u_r, u_c = lognormal(0.5, shape), lognormal(0.5, shape), lognormal(0.5, shape)
    rc = np.repeat(np.arange(n_windows), 1 + rng.poisson(4, n_windows))
    cc = np.repeat(np.arange(n_windows), 1 + rng.poisson(12, n_windows))
    rare = a * (v * u_r)[rc] * rng.exponential(1.0, (rc.size, n_neurons))
    common = b * (v * u_c)[cc] * rng.exponential(1.0, (cc.size, n_neurons))
    return rare, common, rc, cc, a / b


def test_ratio_interval_covers_the_true_ratio_at_the_nominal_rate() -> None:
    rng = np.random.default_rng(2024)
    covered, covered_rows, widths, widths_indep = [], [], [], []
    for rep in range(200):
        rare, common, rc, cc, true = _clustered_data(rng)
        res = ratio_interval(rare, common, rc, cc, 200, rep)
        covered.append((res.lo <= true) & (true <= res.hi))
        widths.append(np.log(res.hi / res.lo))
        if rep < 100:
            # the same bootstrap treating every row as its own cluster ignores the window
            # correlation: its intervals are too narrow (shows the test can fail)
            rows = ratio_interval(
                rare, common, np.arange(rc.size), rc.size + np.arange(cc.size), 100, rep
            )
            covered_rows.append((rows.lo <= true) & (true <= rows.hi))
            # independent resampling of the rare and common windows ignores the positive
            # correlation of the two means: wider (conservative)
            indep = ratio_interval(rare, common, rc, cc, 100, rep, paired=False)
            widths_indep.append(np.log(indep.hi / indep.lo))
    coverage = float(np.mean(covered))
    assert 0.90 <= coverage <= 0.99, coverage
    assert float(np.mean(covered_rows)) < 0.86
    assert float(np.mean(widths_indep)) > 1.1 * float(np.mean(widths[:100]))


def test_ratio_interval_json_and_markdown() -> None:
    rare, common, rc, cc = _small_clustered(np.random.default_rng(4))
    common[:, 2] = 0.0  # ratio inf for neuron 2 in every resample
    common[:, 3] = 0.0
    rare[:, 3] = 0.0  # 0/0: no ratio at all for neuron 3
    common[cc != 3, 1] = 0.0  # a third of the resamples of neuron 1 miss window 3: inf
    res = ratio_interval(rare, common, rc, cc, 50, 1)
    assert math.isinf(res.ratio[2]) and math.isinf(res.lo[2]) and math.isinf(res.hi[2])
    assert math.isnan(res.ratio[3]) and math.isnan(res.lo[3]) and math.isnan(res.hi[3])
    assert math.isfinite(res.ratio[1]) and math.isfinite(res.lo[1]) and math.isinf(res.hi[1])
    assert np.all(np.isfinite([res.ratio[0], res.lo[0], res.hi[0]]))
    d = json.loads(json.dumps(res.to_dict(), allow_nan=False))
    assert (
        d["ratio"][2] is None and d["lo"][3] is None and d["n_boot"] == 50 and d["paired"] is True
    )
    assert d["seed"] == 1
    text = res.to_markdown([0, 1])
    assert "| 0 |" in text and "| 1 |" in text and "| 3 |" not in text
    assert isinstance(res, RatioInterval)
    gen = ratio_interval(rare, common, rc, cc, 50, np.random.default_rng(1))
    assert gen.seed is None
    np.testing.assert_array_equal(gen.lo, res.lo)


def test_ratio_interval_errors() -> None:
    rare, common, rc, cc = _small_clustered(np.random.default_rng(0))
    with pytest.raises(ConfigError, match="differ"):
        ratio_interval(rare, common[:, :3], rc, cc, 10, 0)
    with pytest.raises(ConfigError, match="entries"):
        ratio_interval(rare, common, rc[:-1], cc, 10, 0)
    with pytest.raises(ConfigError, match="integer"):
        ratio_interval(rare, common, rc.astype(float), cc, 10, 0)
    with pytest.raises(ConfigError, match="2-D"):
        ratio_interval(rare[:, 0], common, rc, cc, 10, 0)
    with pytest.raises(InsufficientDataError, match=">= 2 windows"):
        ratio_interval(rare, common, np.zeros_like(rc), cc, 10, 0)
    with pytest.raises(InsufficientDataError, match="no rows"):
        ratio_interval(rare[:0], common, rc[:0], cc, 10, 0)
    bad = rare.copy()
    bad[3, 1] = np.nan
    with pytest.raises(NumericalError):
        ratio_interval(bad, common, rc, cc, 10, 0)
    with pytest.raises(ConfigError, match="absolute"):
        ratio_interval(rare, -common, rc, cc, 10, 0)
    with pytest.raises(ConfigError, match="n_boot"):
        ratio_interval(rare, common, rc, cc, 0, 0)
    with pytest.raises(ConfigError, match="level"):
        ratio_interval(rare, common, rc, cc, 10, 0, level=1.0)
    with pytest.raises(ConfigError, match="seed"):
        ratio_interval(rare, common, rc, cc, 10, None)  # type: ignore[arg-type]
