from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from scipy import stats

from raretoken.errors import ConfigError, InsufficientDataError, NumericalError
from raretoken.stats.routing import (
    GiniComparison,
    ImpactComparison,
    ablation_impact,
    benjamini_hochberg,
    causal_mask,
    cohens_d,
    compare_head_gini,
    compare_impacts,
    gini,
    relative_norm_change,
)


def gini_mad(x: np.ndarray) -> float:
    """Independent formula: mean absolute difference / (2 mean)."""
    x = np.asarray(x, dtype=np.float64)
    return float(np.abs(x[:, None] - x[None, :]).mean() / (2.0 * x.mean()))


def gini_eq7_literal(alpha: np.ndarray) -> float:
    """Eq. 7 exactly as printed, with the weights normalised to sum 1."""
    a = np.sort(np.asarray(alpha, dtype=np.float64) / np.sum(alpha))
    n = a.size
    return float(1.0 - 2.0 * sum((n + 1 - i) / n * a[i - 1] for i in range(1, n + 1)))


# --------------------------------------------------------------------------------- Gini


@pytest.mark.parametrize("n", [2, 3, 10, 257])
def test_gini_uniform_and_one_hot(n: int) -> None:
    uniform = np.full(n, 1.0 / n)
    one_hot = np.eye(n)[n // 2]
    assert gini(uniform) == pytest.approx(0.0, abs=1e-12)
    assert gini(one_hot) == pytest.approx(1.0 - 1.0 / n)
    assert gini(one_hot, variant="corrected") == pytest.approx(1.0)
    assert gini(uniform, variant="corrected") == pytest.approx(0.0, abs=1e-12)
    # eq. 7 verbatim is shifted by -1/n
    assert gini(uniform, variant="paper") == pytest.approx(-1.0 / n)
    assert gini(one_hot, variant="paper") == pytest.approx(1.0 - 2.0 / n)


def test_gini_known_values_match_independent_formulas() -> None:
    assert gini(np.array([1.0, 2.0, 3.0, 4.0])) == pytest.approx(0.25)  # MAD 1.25 / (2 * 2.5)
    rng = np.random.default_rng(0)
    for n in (2, 5, 31, 200):
        x = rng.dirichlet(np.full(n, 0.3))
        assert gini(x) == pytest.approx(gini_mad(x), abs=1e-12)
        assert gini(x, variant="paper") == pytest.approx(gini_eq7_literal(x), abs=1e-12)
        assert gini(x, variant="corrected") == pytest.approx(gini_mad(x) * n / (n - 1))
        assert gini(7.0 * x) == pytest.approx(gini(x))  # scale invariant


def test_gini_batched_and_axis() -> None:
    rng = np.random.default_rng(1)
    w = rng.dirichlet(np.ones(12), size=(3, 5))  # (heads, queries, keys)
    g = gini(w)
    assert g.shape == (3, 5)
    for h, q in itertools.product(range(3), range(5)):
        assert g[h, q] == pytest.approx(gini_mad(w[h, q]))
    np.testing.assert_allclose(gini(np.moveaxis(w, -1, 0), axis=0), g, atol=1e-12)


def test_gini_causal_rows_use_valid_keys_only() -> None:
    rng = np.random.default_rng(2)
    t = 9
    mask = causal_mask(t)
    raw = rng.random((2, t, t))
    attn = np.where(mask, raw, 0.0)
    attn /= attn.sum(axis=-1, keepdims=True)
    garbage = np.where(mask, attn, 123.0)  # masked entries must be ignored whatever they hold
    g = gini(garbage, mask=mask)
    assert np.isnan(g[:, 0]).all()  # one valid key: undefined
    for h, q in itertools.product(range(2), range(1, t)):
        assert g[h, q] == pytest.approx(gini_mad(attn[h, q, : q + 1]), abs=1e-12)
    # counting masked zeros as keys would inflate early rows
    assert np.all(gini(attn)[:, 1:] > g[:, 1:] - 1e-12)
    # uniform causal attention has Gini 0 in every row
    uniform = np.where(mask, 1.0, 0.0) / np.arange(1, t + 1)[:, None]
    np.testing.assert_allclose(gini(uniform, mask=mask)[1:], 0.0, atol=1e-12)


def test_causal_mask_with_offset() -> None:
    m = causal_mask(2, 4)
    np.testing.assert_array_equal(m, [[1, 1, 1, 0], [1, 1, 1, 1]])
    with pytest.raises(ConfigError):
        causal_mask(5, 3)


def test_gini_errors_and_nan_rows() -> None:
    assert np.isnan(gini(np.zeros(4)))
    with pytest.raises(NumericalError):
        gini(np.array([0.5, -0.1, 0.6]))
    with pytest.raises(NumericalError):
        gini(np.array([0.5, np.nan]))
    with pytest.raises(ConfigError):
        gini(np.ones(3), variant="lorenz")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        gini(np.ones(3), mask=np.ones(3))


# ------------------------------------------------------------------- BH, Cohen's d


def test_benjamini_hochberg_known_and_scipy() -> None:
    q = benjamini_hochberg([0.01, 0.04, 0.03, 0.2])
    np.testing.assert_allclose(q, [0.04, 0.04 * 4 / 3, 0.04 * 4 / 3, 0.2])
    rng = np.random.default_rng(3)
    p = rng.random(50) ** 3
    np.testing.assert_allclose(benjamini_hochberg(p), stats.false_discovery_control(p))
    with_nan = benjamini_hochberg([0.01, np.nan, 0.02])
    assert np.isnan(with_nan[1])
    np.testing.assert_allclose(with_nan[[0, 2]], [0.02, 0.02])
    with pytest.raises(ConfigError):
        benjamini_hochberg([1.5])


def test_cohens_d_known() -> None:
    assert cohens_d([1.0, 2.0, 3.0], [2.0, 3.0, 4.0]) == pytest.approx(-1.0)
    assert math.isnan(cohens_d([1.0, 1.0], [1.0, 1.0]))
    assert math.isnan(cohens_d([1.0], [1.0, 2.0]))


# --------------------------------------------------------------- per-head comparison


def test_compare_head_gini_matches_scipy_and_flags_shifted_head() -> None:
    rng = np.random.default_rng(4)
    heads = [(10, h) for h in range(6)] + [(11, h) for h in range(6)]
    base = np.linspace(0.2, 0.6, 12)  # heads differ, rare and common alike
    rare = [rng.normal(b, 0.05, size=80) for b in base]
    common = [rng.normal(b, 0.05, size=120) for b in base]
    rare[7] = rare[7] + 0.1  # one head concentrates more on rare targets
    rare[3][:5] = np.nan  # NaN rows (first positions) are dropped
    res = compare_head_gini(rare, common, heads)
    assert res.n_heads == 12
    assert res.n_rare[3] == 75 and res.n_common[3] == 120
    for i in range(12):
        r = rare[i][~np.isnan(rare[i])]
        tt = stats.ttest_ind(r, common[i], equal_var=False)
        assert res.t_welch[i] == pytest.approx(tt.statistic)
        assert res.p_welch[i] == pytest.approx(tt.pvalue)
        mw = stats.mannwhitneyu(r, common[i], alternative="two-sided")
        assert res.p_mannwhitney[i] == pytest.approx(mw.pvalue)
        assert res.mean_rare[i] == pytest.approx(r.mean())
    np.testing.assert_allclose(res.q_welch, stats.false_discovery_control(res.p_welch))
    assert res.q_welch[7] < 1e-6
    assert np.sum(res.q_welch < 0.05) <= 2
    assert res.cohens_d[7] > 1.5
    sp = stats.spearmanr(res.mean_rare, res.mean_common)
    assert res.spearman_rho == pytest.approx(sp.statistic) and res.spearman_rho > 0.9
    paired = stats.ttest_rel(res.mean_rare, res.mean_common)
    assert res.paired_p == pytest.approx(paired.pvalue)
    assert res.grand_mean_rare == pytest.approx(np.mean(res.mean_rare))
    assert res.grand_sd_common == pytest.approx(np.std(res.mean_common, ddof=1))
    assert res.heads[7].tolist() == [11, 1]


def test_compare_head_gini_accepts_2d_and_checks_inputs() -> None:
    rng = np.random.default_rng(5)
    rare = rng.random((4, 30))
    common = rng.random((4, 40))
    heads = np.array([[0, 0], [0, 1], [1, 0], [1, 1]])
    res = compare_head_gini(rare, common, heads)
    assert res.mean_rare.shape == (4,)
    with pytest.raises(ConfigError):
        compare_head_gini(rare, common[:3], heads)
    with pytest.raises(ConfigError):
        compare_head_gini(rare, common, [(0, 0), (0, 0), (1, 0), (1, 1)])
    with pytest.raises(InsufficientDataError):
        compare_head_gini(rare[:2], common[:2], heads[:2])
    bad = rare.copy()
    bad[1, 1:] = np.nan
    with pytest.raises(InsufficientDataError):
        compare_head_gini(bad, common, heads)


def test_gini_comparison_round_trip() -> None:
    rng = np.random.default_rng(6)
    res = compare_head_gini(rng.random((3, 10)), rng.random((3, 10)), [(0, 0), (0, 1), (0, 2)])
    back = GiniComparison.from_dict(json.loads(json.dumps(res.to_dict())))
    assert back.to_dict() == res.to_dict()


# ------------------------------------------------------------------------ ablation


def test_ablation_impact_known_values() -> None:
    rng = np.random.default_rng(7)
    base = rng.normal(size=(20, 5))
    assert ablation_impact(base, base) == 0.0
    assert ablation_impact(base, np.zeros_like(base)) == pytest.approx(1.0)
    assert ablation_impact(base, 2.0 * base) == pytest.approx(1.0)
    assert ablation_impact(np.array([[3.0, 4.0]]), np.array([[3.0, 0.0]])) == pytest.approx(0.8)
    # Frobenius over positions x neurons == 2-norm of the flattened matrix
    abl = base + rng.normal(size=base.shape) * 0.1
    flat = np.linalg.norm((base - abl).ravel()) / np.linalg.norm(base.ravel())
    assert ablation_impact(base, abl) == pytest.approx(flat)
    assert relative_norm_change(base, 0.5 * base) == pytest.approx(-0.5)
    assert relative_norm_change(base, base) == pytest.approx(0.0)
    with pytest.raises(NumericalError):
        ablation_impact(np.zeros((2, 2)), np.ones((2, 2)))
    with pytest.raises(ConfigError):
        ablation_impact(np.ones((2, 2)), np.ones((2, 3)))
    with pytest.raises(NumericalError):
        ablation_impact(np.ones(2), np.array([1.0, np.nan]))


def exact_permutation_p(x: np.ndarray, y: np.ndarray) -> float:
    pooled = np.concatenate([x, y])
    obs = abs(x.mean() - y.mean())
    hits = total = 0
    for idx in itertools.combinations(range(pooled.size), x.size):
        sel = np.zeros(pooled.size, dtype=bool)
        sel[list(idx)] = True
        total += 1
        hits += abs(pooled[sel].mean() - pooled[~sel].mean()) >= obs - 1e-12
    return hits / total


def test_compare_impacts_permutation_matches_exact_enumeration() -> None:
    x = np.array([0.31, 0.35, 0.29, 0.40, 0.37])
    y = np.array([0.30, 0.33, 0.28, 0.31, 0.36])
    exact = exact_permutation_p(x, y)  # over all C(10, 5) = 252 splits
    res = compare_impacts(x, y, seed=0, n_permutations=40_000, labels=("top", "random"))
    assert res.p_permutation == pytest.approx(exact, abs=0.01)
    tt = stats.ttest_ind(x, y, equal_var=False)
    assert res.t == pytest.approx(tt.statistic) and res.p_t == pytest.approx(tt.pvalue)
    assert res.cohens_d == pytest.approx(cohens_d(x, y))
    assert res.mean_difference == pytest.approx(x.mean() - y.mean())
    assert (res.label_a, res.label_b) == ("top", "random")


def test_compare_impacts_paired_sign_flip_matches_exact() -> None:
    x = np.array([0.50, 0.42, 0.61, 0.47, 0.55, 0.52])
    y = np.array([0.33, 0.35, 0.30, 0.36, 0.31, 0.50])
    d = x - y
    flips = np.array(list(itertools.product([-1.0, 1.0], repeat=6)))
    exact = np.mean(np.abs((flips * d).mean(axis=1)) >= abs(d.mean()) - 1e-12)
    res = compare_impacts(x, y, seed=1, paired=True, n_permutations=40_000)
    assert res.p_permutation == pytest.approx(exact, abs=0.01)
    assert res.p_t == pytest.approx(stats.ttest_rel(x, y).pvalue)
    assert res.cohens_d == pytest.approx(d.mean() / d.std(ddof=1))
    assert res.paired


def test_compare_impacts_separated_samples_and_reproducibility() -> None:
    rng = np.random.default_rng(8)
    single = rng.normal(0.3, 0.03, size=40)
    layer = rng.normal(0.5, 0.03, size=40)
    res = compare_impacts(single, layer, seed=2, n_permutations=999)
    assert res.p_permutation == pytest.approx(1.0 / 1000.0)  # the +1 correction floor
    assert res.p_t < 1e-20
    again = compare_impacts(single, layer, seed=2, n_permutations=999)
    assert again.to_dict() == res.to_dict()
    back = ImpactComparison.from_dict(json.loads(json.dumps(res.to_dict())))
    assert back.to_dict() == res.to_dict()


def test_compare_impacts_errors() -> None:
    with pytest.raises(InsufficientDataError):
        compare_impacts([0.1], [0.2, 0.3], seed=0)
    with pytest.raises(ConfigError):
        compare_impacts([0.1, 0.2], [0.2, 0.3, 0.4], seed=0, paired=True)
    with pytest.raises(NumericalError):
        compare_impacts([0.1, np.nan], [0.2, 0.3], seed=0)
    with pytest.raises(ConfigError):
        compare_impacts([0.1, 0.2], [0.2, 0.3], seed=None)  # type: ignore[arg-type]
