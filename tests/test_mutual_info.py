from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest
from scipy.stats import rankdata

from raretoken.errors import ConfigError, InsufficientDataError, NumericalError
from raretoken.stats import mutual_info as mi_mod
from raretoken.stats.mutual_info import (
    MutualInfoMatrix,
    default_bins,
    mutual_information,
    mutual_information_matrix,
    quantile_codes,
)


def gaussian_pair(rho: float, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    y = rho * x + math.sqrt(1.0 - rho * rho) * rng.normal(size=n)
    return x, y


def plugin_mi_reference(a: np.ndarray, b: np.ndarray) -> float:
    """Eq. 5 written out with dictionaries of counts (independent of the module)."""
    n = len(a)
    pa, pb, pab = (
        Counter(a.tolist()),
        Counter(b.tolist()),
        Counter(zip(a.tolist(), b.tolist(), strict=True)),
    )
    return sum(c / n * math.log((c / n) / ((pa[u] / n) * (pb[v] / n))) for (u, v), c in pab.items())


def test_default_bins_rule() -> None:
    assert default_bins(25_000) == 29
    assert default_bins(1000) == 10
    assert default_bins(3) == 2
    with pytest.raises(InsufficientDataError):
        default_bins(0)


def test_quantile_codes_equal_frequency_and_ties() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1000, 3))
    codes = quantile_codes(x, 10)
    for j in range(3):
        np.testing.assert_array_equal(np.bincount(codes[:, j], minlength=10), 100)
        # independent: floor(B * (#values strictly below) / n) from scipy's min-rank
        expected = ((rankdata(x[:, j], method="min") - 1) * 10) // 1000
        np.testing.assert_array_equal(codes[:, j], expected)
    # monotone transforms do not change the codes
    np.testing.assert_array_equal(quantile_codes(np.exp(x), 10), codes)
    # ties (ReLU zeros) share one bin
    relu = np.maximum(rng.normal(size=(1000, 1)) - 0.3, 0.0)
    rc = quantile_codes(relu, 10)[:, 0]
    assert np.unique(rc[relu[:, 0] == 0.0]).size == 1
    expected = ((rankdata(relu[:, 0], method="min") - 1) * 10) // 1000
    np.testing.assert_array_equal(rc, expected)
    with pytest.raises(ConfigError):
        quantile_codes(x, 1)


def test_independent_columns_have_near_zero_mi() -> None:
    rng = np.random.default_rng(1)
    n = 8000
    x = rng.normal(size=(n, 12))
    res = mutual_information_matrix(x)
    b = res.bins
    assert b == 20
    off = res.off_diagonal()
    assert abs(off.mean()) < 1e-3
    assert np.max(np.abs(off)) < 0.01
    # without the correction the plug-in bias (B-1)^2 / (2n) shows up
    raw = mutual_information_matrix(x, bias_correction="none").off_diagonal()
    assert raw.mean() == pytest.approx((b - 1) ** 2 / (2 * n), rel=0.1)


def test_copied_variable_gives_entropy_of_binned_variable() -> None:
    rng = np.random.default_rng(2)
    n, b = 6000, 15  # b divides n: every bin holds n / b values
    x = rng.normal(size=n)
    acts = np.column_stack([x, x, np.exp(x), -x])
    raw = mutual_information_matrix(acts, bins=b, bias_correction="none")
    np.testing.assert_allclose(raw.mi, math.log(b), rtol=1e-12)
    np.testing.assert_allclose(raw.entropy, math.log(b), rtol=1e-12)
    mm = mutual_information_matrix(acts, bins=b)
    # Miller–Madow: + (m_i + m_j - m_ij - 1) / (2n) with m_i = m_j = m_ij = b
    np.testing.assert_allclose(mm.mi, math.log(b) + (b - 1) / (2 * n), rtol=1e-12)


@pytest.mark.parametrize("rho", [0.3, 0.6, 0.9])
def test_gaussian_pair_matches_closed_form(rho: float) -> None:
    x, y = gaussian_pair(rho, 20_000, seed=int(rho * 10))
    truth = -0.5 * math.log(1.0 - rho * rho)
    # binning loses a little dependence (discretisation bias grows with rho)
    assert mutual_information(x, y) == pytest.approx(truth, abs=0.02 + 0.04 * truth)
    assert mutual_information(x, y, method="ksg", seed=0) == pytest.approx(truth, abs=0.02)


def test_plugin_matches_sklearn_on_same_codes() -> None:
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(3)
    latent = rng.normal(size=(3000, 2))
    acts = np.column_stack(
        [latent[:, 0] + rng.normal(size=3000) * s for s in (0.1, 0.5, 1.0, 3.0)]
        + [np.maximum(latent[:, 1], 0.0), rng.normal(size=3000)]
    )
    res = mutual_information_matrix(acts, bias_correction="none")
    codes = quantile_codes(acts, res.bins or 0)
    for i in range(acts.shape[1]):
        for j in range(acts.shape[1]):
            ref = metrics.mutual_info_score(codes[:, i], codes[:, j])
            assert res.mi[i, j] == pytest.approx(ref, abs=1e-12)


def test_plugin_and_miller_madow_match_reference_formula() -> None:
    rng = np.random.default_rng(4)
    n = 500
    z = rng.normal(size=(n, 1))
    acts = np.column_stack([z[:, 0], z[:, 0] ** 2 + rng.normal(size=n), rng.normal(size=n)])
    acts[rng.random(n) < 0.3, 1] = 0.0  # add ties
    b = 7
    raw = mutual_information_matrix(acts, bins=b, bias_correction="none")
    mm = mutual_information_matrix(acts, bins=b)
    codes = quantile_codes(acts, b)
    for i in range(3):
        for j in range(3):
            ref = plugin_mi_reference(codes[:, i], codes[:, j])
            assert raw.mi[i, j] == pytest.approx(ref, abs=1e-12)
            m_i = np.unique(codes[:, i]).size
            m_j = np.unique(codes[:, j]).size
            m_ij = len(set(zip(codes[:, i].tolist(), codes[:, j].tolist(), strict=True)))
            if i != j:
                corr = (m_i + m_j - m_ij - 1) / (2 * n)
            else:
                corr = (m_i - 1) / (2 * n)
            assert mm.mi[i, j] == pytest.approx(ref + corr, abs=1e-12)


def test_chunking_does_not_change_result(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(5)
    acts = rng.normal(size=(400, 9)) @ rng.normal(size=(9, 9))
    full = mutual_information_matrix(acts)
    monkeypatch.setattr(mi_mod, "_CHUNK_ELEMENTS", 700)  # one column per chunk
    np.testing.assert_array_equal(mutual_information_matrix(acts).mi, full.mi)


def test_matrix_is_symmetric_labelled_and_ordered_by_dependence() -> None:
    rng = np.random.default_rng(6)
    z = rng.normal(size=5000)
    acts = np.column_stack([z, z + 0.3 * rng.normal(size=5000), rng.normal(size=5000)])
    res = mutual_information_matrix(acts, neuron_ids=[10, 42, 7])
    np.testing.assert_array_equal(res.mi, res.mi.T)
    np.testing.assert_array_equal(res.neuron_ids, [10, 42, 7])
    np.testing.assert_array_equal(np.diag(res.mi), res.entropy)
    assert res.mi[0, 1] > 0.5 > 0.01 > abs(res.mi[0, 2])
    assert res.n_neurons == 3 and res.n_samples == 5000


def test_ksg_matrix_needs_seed_and_is_reproducible() -> None:
    rng = np.random.default_rng(7)
    acts = rng.normal(size=(800, 3))
    acts[:, 1] += acts[:, 0]
    acts[:300, 2] = 0.0  # ties are broken by the seeded jitter
    with pytest.raises(ConfigError):
        mutual_information_matrix(acts, method="ksg")
    a = mutual_information_matrix(acts, method="ksg", seed=3)
    b = mutual_information_matrix(acts, method="ksg", seed=3)
    np.testing.assert_array_equal(a.mi, b.mi)
    assert np.isnan(np.diag(a.mi)).all()
    assert a.mi[0, 1] == pytest.approx(0.5 * math.log(2.0), abs=0.07)  # rho = 1/sqrt(2)


def test_errors() -> None:
    rng = np.random.default_rng(8)
    with pytest.raises(InsufficientDataError):
        mutual_information_matrix(rng.normal(size=(100, 1)))
    with pytest.raises(InsufficientDataError):
        mutual_information_matrix(rng.normal(size=(3, 4)))
    with pytest.raises(ConfigError):
        mutual_information_matrix(rng.normal(size=100))
    with pytest.raises(ConfigError):
        mutual_information_matrix(rng.normal(size=(100, 3)), neuron_ids=[1, 1, 2])
    with pytest.raises(ConfigError):
        mutual_information_matrix(rng.normal(size=(100, 3)), method="kde")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        mutual_information(np.zeros(10), np.zeros(11))
    bad = rng.normal(size=(100, 3))
    bad[0, 0] = np.nan
    with pytest.raises(NumericalError):
        mutual_information_matrix(bad)


def test_round_trip_json() -> None:
    rng = np.random.default_rng(9)
    res = mutual_information_matrix(rng.normal(size=(300, 4)), neuron_ids=[3, 1, 4, 5])
    back = MutualInfoMatrix.from_dict(json.loads(json.dumps(res.to_dict())))
    np.testing.assert_array_equal(back.mi, res.mi)
    np.testing.assert_array_equal(back.neuron_ids, res.neuron_ids)
    assert back.bins == res.bins and back.method == "binned"
    ksg = mutual_information_matrix(rng.normal(size=(100, 2)), method="ksg", seed=1)
    back = MutualInfoMatrix.from_dict(json.loads(json.dumps(ksg.to_dict())))
    assert np.isnan(back.mi[0, 0]) and back.mi[0, 1] == ksg.mi[0, 1]
