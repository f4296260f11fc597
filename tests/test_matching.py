"""Tests of the covariate-matched random groups (:mod:`raretoken.stats.matching`)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from raretoken.errors import ConfigError, InsufficientDataError
from raretoken.stats.baselines import random_groups
from raretoken.stats.matching import MatchedGroups, matched_random_groups


def codes_of(x: np.ndarray, n_bins: int) -> np.ndarray:
    """Independent quantile-bin codes: the number of inner quantile edges <= x."""
    edges = np.quantile(x, np.arange(1, n_bins) / n_bins)
    return (x[:, None] >= edges[None, :]).sum(axis=1)


def check_valid(res: MatchedGroups, n: int, exclude: np.ndarray | None = None) -> None:
    g = res.groups
    exclude = np.empty(0, dtype=np.int64) if exclude is None else exclude
    assert g.dtype == np.int64 and g.shape[1] == res.group.size
    assert ((g >= 0) & (g < n)).all()
    assert not np.isin(g, res.group).any() and not np.isin(g, exclude).any()
    assert all(np.unique(row).size == row.size for row in g)  # no repeats within a group


def test_matched_controls_share_their_members_cells() -> None:
    rng = np.random.default_rng(6)
    n = 3000
    a = rng.lognormal(size=n)
    b = 0.5 * np.log(a) + rng.normal(size=n)
    group = rng.choice(n, size=12, replace=False)
    res = matched_random_groups(group, {"a": a, "b": b}, 200, seed=0, n_bins=4)
    check_valid(res, n)
    assert res.n_coarsened == 0 and not res.levels.any()
    np.testing.assert_array_equal(res.group, np.sort(group))
    for x in (a, b):
        codes = codes_of(x, 4)
        np.testing.assert_array_equal(
            codes[res.groups], np.broadcast_to(codes[res.group], res.groups.shape)
        )
    assert all(np.unique(res.groups[:, j]).size > 50 for j in range(12))  # not one fixed control
    assert res.n_pool == n - 12 and (res.n_candidates > 100).all()


def test_matched_draws_are_uniform_within_the_cell() -> None:
    x = np.arange(200.0)
    res = matched_random_groups([10], {"x": x}, 4950, seed=1, n_bins=2)
    counts = np.bincount(res.groups[:, 0], minlength=200)
    assert counts[100:].sum() == 0  # the other half is never drawn
    cell = np.delete(counts[:100], 10)
    expected = 4950 / 99
    assert counts[10] == 0 and np.abs(cell - expected).max() < 5 * np.sqrt(expected)


def test_matching_removes_a_planted_confound_that_uniform_groups_keep() -> None:
    rng = np.random.default_rng(7)
    n = 2000
    norm = rng.normal(size=n)  # confounder (e.g. output-weight norm)
    act = rng.normal(size=n)
    p = np.exp(1.5 * norm)
    group = rng.choice(n, size=30, replace=False, p=p / p.sum())
    covs = {"w_out_norm": norm, "act_abs_mean": act}
    res = matched_random_groups(group, covs, 300, seed=2, n_bins=10)
    sd = norm.std(ddof=1)
    uniform = random_groups(np.arange(n), 30, 300, exclude=group, seed=3)
    smd_uniform = (norm[group].mean() - norm[uniform].mean()) / sd
    bal = res.balance_table()["w_out_norm"]
    assert smd_uniform > 1.0
    # within-bin differences remain (the group sits in the upper tail of the top bins)
    assert abs(bal["smd_matched"]) < 0.25 * smd_uniform
    assert bal["group_mean"] == pytest.approx(norm[group].mean())
    assert bal["matched_mean"] == pytest.approx(norm[res.groups].mean())
    assert bal["all_mean"] == pytest.approx(norm.mean()) and bal["all_sd"] == pytest.approx(sd)
    assert bal["smd_all"] == pytest.approx((norm[group].mean() - norm.mean()) / sd)
    assert abs(res.balance_table()["act_abs_mean"]["smd_matched"]) < 0.25
    check_valid(res, n)


def test_matched_groups_reproducible_and_serialisable() -> None:
    rng = np.random.default_rng(8)
    cov = {"x": rng.normal(size=500), "y": rng.normal(size=500)}
    a = matched_random_groups([1, 5, 9, 40], cov, 50, seed=11)
    b = matched_random_groups([40, 9, 5, 1], cov, 50, seed=11)
    c = matched_random_groups([1, 5, 9, 40], cov, 50, seed=12)
    np.testing.assert_array_equal(a.groups, b.groups)
    assert not np.array_equal(a.groups, c.groups)
    g1 = matched_random_groups([1, 5], cov, 5, seed=np.random.default_rng(3))
    g2 = matched_random_groups([1, 5], cov, 5, seed=np.random.default_rng(3))
    np.testing.assert_array_equal(g1.groups, g2.groups)
    back = MatchedGroups.from_dict(json.loads(json.dumps(a.to_dict())))
    np.testing.assert_array_equal(back.groups, a.groups)
    np.testing.assert_array_equal(back.levels, a.levels)
    assert back.balance == a.balance and back.covariate_names == ("x", "y")
    for e1, e2 in zip(back.bin_edges, a.bin_edges, strict=True):
        np.testing.assert_array_equal(e1, e2)
    with pytest.raises(ValueError):
        a.groups[0, 0] = 3


def test_coarsening_fallback_follows_the_priority_order() -> None:
    n = 40
    a = np.arange(n, dtype=float)  # quantile bins of 2: ids < 20 and >= 20
    b = (np.arange(n) % 2).astype(float)  # even / odd
    group = np.arange(0, 18, 2)  # 9 even ids < 20: their cell (a<20, even) has 1 candidate
    res = matched_random_groups(group, {"a": a, "b": b}, 100, seed=4, n_bins=2)
    check_valid(res, n)
    assert res.n_coarsened == 9
    np.testing.assert_array_equal(res.levels, np.tile([0, 1], (9, 1)))  # b, listed last, first
    assert (res.groups < 20).all()  # a kept: controls from the same half
    assert (res.n_candidates == 11).all()
    flipped = matched_random_groups(group, {"b": b, "a": a}, 100, seed=4, n_bins=2)
    np.testing.assert_array_equal(flipped.levels, np.tile([0, 1], (9, 1)))
    assert (flipped.groups % 2 == 0).all()  # b kept: even controls, from both halves
    assert (flipped.groups >= 20).any()
    # unchanged with cells large enough
    ok = matched_random_groups([0, 2], {"a": a, "b": b}, 100, seed=4, n_bins=2)
    assert ok.n_coarsened == 0 and ((ok.groups < 20) & (ok.groups % 2 == 0)).all()


def test_matched_groups_never_run_out_of_candidates() -> None:
    """Random small, tied, crowded configurations: every draw stays valid and in its cell."""
    rng = np.random.default_rng(9)
    for trial in range(60):
        n = int(rng.integers(12, 60))
        n_cov = int(rng.integers(1, 4))
        n_bins = int(rng.integers(1, 7))
        cov = {f"c{j}": rng.integers(0, 4, size=n).astype(float) for j in range(n_cov)}
        size = int(rng.integers(1, n // 2 + 1))
        group = rng.choice(n, size=size, replace=False)
        excl = rng.choice(n, size=int(rng.integers(0, n - 2 * size + 1)), replace=False)
        res = matched_random_groups(group, cov, 15, seed=trial, n_bins=n_bins, exclude=excl)
        check_valid(res, n, np.setdiff1d(excl, group))
        for j, x in enumerate(cov.values()):
            codes = codes_of(x, n_bins) if n_bins > 1 else np.zeros(n, dtype=int)
            lvl = res.levels[:, j]
            np.testing.assert_array_equal(
                codes[res.groups] >> lvl, np.broadcast_to(codes[res.group] >> lvl, res.groups.shape)
            )


def test_matched_exclude_and_bad_inputs() -> None:
    x = np.arange(100.0)
    res = matched_random_groups([3, 50], {"x": x}, 40, seed=0, exclude=[*range(0, 20), 500, -1])
    check_valid(res, 100, np.arange(20))
    bad: list[tuple[dict[str, Any], type[Exception]]] = [
        ({"group_ids": [3, 100]}, ConfigError),
        ({"group_ids": [-1]}, ConfigError),
        ({"group_ids": [3, 3]}, ConfigError),
        ({"group_ids": []}, ConfigError),
        ({"group_ids": [1.0, 2.0]}, ConfigError),
        ({"covariates": {"x": x, "y": np.arange(99.0)}}, ConfigError),
        ({"covariates": {"x": np.where(x == 7, np.nan, x)}}, ConfigError),
        ({"covariates": {"x": x.reshape(10, 10)}}, ConfigError),
        ({"covariates": {}}, ConfigError),
        ({"n_groups": 0}, ConfigError),
        ({"n_bins": 0}, ConfigError),
        ({"seed": None}, ConfigError),
        ({"group_ids": list(range(60))}, InsufficientDataError),
        ({"exclude": list(range(3, 100))}, InsufficientDataError),
    ]
    base: dict[str, Any] = {"group_ids": [1, 2], "covariates": {"x": x}, "n_groups": 5, "seed": 0}
    for change, err in bad:
        with pytest.raises(err):
            matched_random_groups(**{**base, **change})
