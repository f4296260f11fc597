"""Tests of the rare-token specificity statistics (top overlap, selectivity)."""

from __future__ import annotations

import dataclasses
import json
import math
from fractions import Fraction

import numpy as np
import pytest
from scipy import stats as sps

from raretoken.errors import ConfigError, InsufficientDataError, NumericalError
from raretoken.stats._common import frozen
from raretoken.stats.specificity import selective_group, selectivity, top_overlap

# ---------------------------------------------------------------------------------------------
# top_overlap
# ---------------------------------------------------------------------------------------------


def test_top_overlap_hand_computed() -> None:
    scores = np.array([0.0, 0.0, 5.0, 9.0, 8.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    res = top_overlap([2, 0, 1], scores)
    assert res.k == 3 and res.group_size == 3 and res.n_neurons == 10
    np.testing.assert_array_equal(res.top_ids, [3, 4, 2])  # rank order
    np.testing.assert_array_equal(res.group_ids, [0, 1, 2])
    np.testing.assert_array_equal(res.overlap_ids, [2])
    assert res.overlap == 1
    assert res.fraction == pytest.approx(1 / 3)
    assert res.expected == pytest.approx(0.9)  # k·|G|/n = 3·3/10
    assert res.expected_fraction == pytest.approx(0.3)
    # hypergeometric variance g·(k/n)·(1-k/n)·(n-g)/(n-1) = 3·0.3·0.7·7/9 = 0.49
    assert res.expected_sd == pytest.approx(0.7)
    # P(X >= 1) = 1 - C(7,3)/C(10,3) = 85/120
    assert res.p_value == pytest.approx(85 / 120, rel=1e-12)
    # an explicit k and n_neurons
    res5 = top_overlap([2, 0, 1], scores, n_neurons=10, k=5)
    # top-5: 3, 4, 2, then the 1.0 ties broken by the lower id: 5, 6
    np.testing.assert_array_equal(res5.top_ids, [3, 4, 2, 5, 6])
    assert res5.overlap == 1 and res5.expected == pytest.approx(1.5)
    # P(X >= 1) with 5 successes, 3 draws = 1 - C(5,3)/C(10,3)
    assert res5.p_value == pytest.approx(1 - 10 / 120, rel=1e-12)


def test_top_overlap_ties_go_to_the_lower_id() -> None:
    res = top_overlap([0, 1], np.ones(6), k=3)
    np.testing.assert_array_equal(res.top_ids, [0, 1, 2])
    assert res.overlap == 2
    res = top_overlap([4, 5], np.ones(6), k=3)
    assert res.overlap == 0 and res.p_value == pytest.approx(1.0)
    # many ties in shuffled order (an unstable sort would pick arbitrary ids among them)
    scores = np.random.default_rng(0).permutation(np.repeat([1.0, 2.0], 200))
    res = top_overlap([0, 1], scores, k=30)
    np.testing.assert_array_equal(res.top_ids, np.flatnonzero(scores == 2.0)[:30])


def test_top_overlap_the_reviewer_example_exact_tail() -> None:
    """47 of 56 plateau neurons among the top-56 common neurons of 1536."""
    n, g, k, shared = 1536, 56, 56, 47
    rng = np.random.default_rng(0)
    perm = rng.permutation(n)
    plateau = perm[:g]
    top = np.concatenate((perm[:shared], perm[g : g + k - shared]))
    scores = rng.uniform(0.0, 1.0, n)
    scores[top] = 2.0 + rng.uniform(0.0, 1.0, k)
    res = top_overlap(plateau, scores, group_name="plateau", score_name="common-token Δloss")
    assert res.overlap == shared
    assert res.expected == pytest.approx(56 * 56 / 1536)
    # exact tail with integer arithmetic: Σ_{i>=47} C(56,i) C(1480,56-i) / C(1536,56)
    tail = Fraction(
        sum(math.comb(k, i) * math.comb(n - k, g - i) for i in range(shared, g + 1)),
        math.comb(n, g),
    )
    assert res.p_value == pytest.approx(float(tail), rel=1e-6)
    assert res.p_value < 1e-50
    text = res.to_markdown()
    assert "47 of the 56 plateau neurons" in text and "common-token Δloss" in text


def test_top_overlap_json_and_frozen_arrays() -> None:
    res = top_overlap([1, 3], [0.1, 0.5, 0.2, 0.9])
    d = json.loads(json.dumps(res.to_dict(), allow_nan=False))
    assert d["overlap"] == 2 and d["top_ids"] == [3, 1]
    with pytest.raises(ValueError):
        res.top_ids[0] = 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.overlap = 5  # type: ignore[misc]


def test_top_overlap_errors() -> None:
    s = np.arange(10.0)
    with pytest.raises(ConfigError, match="k must be"):
        top_overlap([1, 2], s, k=0)
    with pytest.raises(ConfigError, match="k must be"):
        top_overlap([1, 2], s, k=11)
    with pytest.raises(ConfigError, match="n_neurons"):
        top_overlap([1, 2], s, n_neurons=12)
    with pytest.raises(ConfigError, match="repeat"):
        top_overlap([1, 1], s)
    with pytest.raises(ConfigError, match="lie in"):
        top_overlap([1, 10], s)
    with pytest.raises(ConfigError, match="integer"):
        top_overlap([1.0, 2.0], s)
    with pytest.raises(InsufficientDataError, match="empty"):
        top_overlap(np.array([], dtype=np.int64), s)
    with pytest.raises(NumericalError):
        top_overlap([1, 2], np.array([1.0, np.nan, 2.0]))
    with pytest.raises(ConfigError, match="1-D"):
        top_overlap([1, 2], np.ones((3, 3)))


# ---------------------------------------------------------------------------------------------
# selectivity
# ---------------------------------------------------------------------------------------------


def test_selectivity_matches_polyfit_and_scipy() -> None:
    rng = np.random.default_rng(3)
    n = 500
    common = 10.0 ** rng.normal(-3.0, 0.6, n)
    rare = 10.0 ** (0.3 + 0.8 * np.log10(common) + rng.normal(0.0, 0.2, n))
    rare[[5, 17]] = 0.0
    common[[17, 99]] = 0.0
    sel = selectivity(rare, common)
    pos = np.concatenate((rare[rare > 0], common[common > 0]))
    assert sel.eps == pytest.approx(pos.min() / 10.0)
    assert sel.n_floored_rare == 2 and sel.n_floored_common == 2
    assert sel.log_rare[5] == pytest.approx(math.log10(sel.eps))
    lr, lc = np.log10(np.maximum(rare, sel.eps)), np.log10(np.maximum(common, sel.eps))
    slope, intercept = np.polyfit(lc, lr, 1)
    assert sel.slope == pytest.approx(slope, rel=1e-10)
    assert sel.intercept == pytest.approx(intercept, rel=1e-10)
    np.testing.assert_allclose(sel.residual, lr - np.polyval([slope, intercept], lc), atol=1e-10)
    assert sel.r_squared == pytest.approx(np.corrcoef(lc, lr)[0, 1] ** 2, rel=1e-10)
    s = math.sqrt(float(np.sum(sel.residual**2)) / (n - 2))
    assert sel.residual_sd == pytest.approx(s)
    np.testing.assert_allclose(sel.z, sel.residual / s)
    # Spearman: Pearson of the ranks (average ranks for the tied zeros)
    ranks = np.corrcoef(sps.rankdata(rare), sps.rankdata(common))[0, 1]
    assert sel.spearman_rho == pytest.approx(ranks, rel=1e-10)
    assert 0 <= sel.spearman_p < 1e-10
    d = json.loads(json.dumps(sel.to_dict(), allow_nan=False))
    assert d["n_neurons"] == n and len(d["residual"]) == n
    with pytest.raises(ValueError):
        sel.residual[0] = 1.0


def test_selectivity_explicit_eps() -> None:
    sel = selectivity([0.0, 1.0, 2.0, 4.0], [1.0, 0.5, 2.0, 0.0], eps=0.25)
    assert sel.eps == 0.25
    np.testing.assert_allclose(sel.log_rare, np.log10([0.25, 1.0, 2.0, 4.0]))
    np.testing.assert_allclose(sel.log_common, np.log10([1.0, 0.5, 2.0, 0.25]))
    assert sel.n_floored_rare == 1 and sel.n_floored_common == 1


def test_selective_group_recovers_planted_neurons_and_differs_from_topk() -> None:
    rng = np.random.default_rng(11)
    n, k = 2000, 20
    log_common = rng.normal(-3.0, 0.5, n)
    ids = rng.permutation(n)
    selective, generic = ids[:k], ids[k : 2 * k]
    log_common[generic] += 1.5  # important for every token ...
    log_rare = 0.2 + 0.9 * log_common + rng.normal(0.0, 0.1, n)  # ... and on the line
    log_rare[selective] += 1.0  # one decade more rare-token influence than predicted
    rare, common = 10.0**log_rare, 10.0**log_common
    sel = selectivity(rare, common)
    group = selective_group(sel, k)
    np.testing.assert_array_equal(group, np.sort(selective))
    assert group.dtype == np.int64
    assert sel.slope == pytest.approx(0.9, abs=0.05)
    # the top-k by rare Δloss is dominated by the generic neurons ...
    top_rare = top_overlap(generic, rare, k=k)
    assert top_rare.overlap >= k // 2
    # ... which the selective group does not contain; the selective neurons are not among
    # the top common neurons (overlap near the random expectation)
    assert not np.isin(generic, group).any()
    assert top_overlap(group, common).overlap <= 2
    mean_res, mean_z, n_sel = sel.group_summary(selective)
    assert mean_res == pytest.approx(1.0, abs=0.1) and mean_z > 5 and n_sel == k
    assert "20 plateau neurons" in sel.to_markdown(selective)


def test_selective_group_ties_and_k_range() -> None:
    sel = selectivity(np.arange(1.0, 7.0), np.arange(2.0, 8.0))
    tied = dataclasses.replace(sel, residual=frozen([0.0, 1.0, 1.0, 0.5, 1.0, -1.0]))
    np.testing.assert_array_equal(selective_group(tied, 2), [1, 2])
    np.testing.assert_array_equal(selective_group(tied, 4), [1, 2, 3, 4])
    np.testing.assert_array_equal(selective_group(tied, 6), np.arange(6))
    big = selectivity(np.arange(1.0, 401.0), np.arange(2.0, 402.0))
    residual = np.random.default_rng(1).permutation(np.repeat([0.0, 1.0], 200))
    big = dataclasses.replace(big, residual=frozen(residual))
    np.testing.assert_array_equal(selective_group(big, 25), np.flatnonzero(residual == 1.0)[:25])
    with pytest.raises(ConfigError, match="k must be"):
        selective_group(sel, 0)
    with pytest.raises(ConfigError, match="k must be"):
        selective_group(sel, 7)


def test_selectivity_errors() -> None:
    with pytest.raises(ConfigError, match="shape"):
        selectivity([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(NumericalError):
        selectivity([1.0, np.nan, 3.0], [1.0, 2.0, 3.0])
    with pytest.raises(NumericalError):
        selectivity([1.0, 2.0, 3.0], [1.0, np.inf, 3.0])
    with pytest.raises(ConfigError, match=">= 0"):
        selectivity([1.0, -2.0, 3.0], [1.0, 2.0, 3.0])
    with pytest.raises(InsufficientDataError, match=">= 3"):
        selectivity([1.0, 2.0], [1.0, 2.0])
    with pytest.raises(InsufficientDataError, match="positive"):
        selectivity(np.zeros(5), np.zeros(5))
    with pytest.raises(InsufficientDataError, match="spread"):
        selectivity([1.0, 2.0, 3.0], [2.0, 2.0, 2.0])
    with pytest.raises(ConfigError, match="eps"):
        selectivity([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], eps=0.0)
    with pytest.raises(ConfigError, match="1-D"):
        selectivity(np.ones((2, 3)), np.ones((2, 3)))
