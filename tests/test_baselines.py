from __future__ import annotations

import json
import math

import numpy as np
import pytest

from raretoken.errors import ConfigError, InsufficientDataError, NumericalError
from raretoken.stats.baselines import BaselineComparison, compare_to_random, random_groups

# ------------------------------------------------------------------------- groups


def test_random_groups_shape_membership_and_exclusion() -> None:
    pool = np.arange(1000, 1200)
    plateau = np.array([1003, 1050, 1100, 1199, 5])  # 5 is not in the pool: ignored
    groups = random_groups(pool, 12, 300, exclude=plateau, seed=0)
    assert groups.shape == (300, 12) and groups.dtype == np.int64
    assert np.all(np.diff(groups, axis=1) > 0)  # sorted, no repeats within a group
    assert np.isin(groups, pool).all()
    assert not np.isin(groups, plateau).any()


def test_random_groups_are_uniform_over_available_neurons() -> None:
    pool = np.arange(50)
    groups = random_groups(pool, 5, 4000, exclude=[0, 1], seed=1)
    counts = np.bincount(groups.ravel(), minlength=50)[2:]
    expected = 4000 * 5 / 48
    # each neuron's count is Binomial(4000, 5/48): within 4 SD
    sd = math.sqrt(4000 * (5 / 48) * (1 - 5 / 48))
    assert np.max(np.abs(counts - expected)) < 4 * sd
    # pairs are also uniform: co-occurrence of two fixed neurons ~ 4000 * C(46,3)/C(48,5)
    both = np.sum(np.isin(groups, [10]).any(axis=1) & np.isin(groups, [20]).any(axis=1))
    p_pair = (5 * 4) / (48 * 47)
    assert abs(both - 4000 * p_pair) < 4 * math.sqrt(4000 * p_pair)


def test_random_groups_reproducible() -> None:
    pool = np.arange(300)
    a = random_groups(pool, 10, 20, exclude=[1, 2], seed=42)
    b = random_groups(pool, 10, 20, exclude=[1, 2], seed=42)
    c = random_groups(pool, 10, 20, exclude=[1, 2], seed=43)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    g1 = np.random.default_rng(7)
    g2 = np.random.default_rng(7)
    np.testing.assert_array_equal(
        random_groups(pool, 4, 3, seed=g1), random_groups(pool, 4, 3, seed=g2)
    )


def test_random_groups_full_pool_and_errors() -> None:
    full = random_groups([5, 3, 9], 3, 2, seed=0)
    np.testing.assert_array_equal(full, [[3, 5, 9], [3, 5, 9]])
    with pytest.raises(InsufficientDataError):
        random_groups(np.arange(10), 8, 1, exclude=[0, 1, 2], seed=0)
    with pytest.raises(ConfigError):
        random_groups([1, 1, 2], 1, 1, seed=0)
    with pytest.raises(ConfigError):
        random_groups(np.arange(10), 0, 1, seed=0)
    with pytest.raises(ConfigError):
        random_groups(np.arange(10), 2, 0, seed=0)
    with pytest.raises(ConfigError):
        random_groups(np.arange(10.0), 2, 1, seed=0)
    with pytest.raises(ConfigError):
        random_groups(np.arange(10), 2, 1, seed=None)  # type: ignore[arg-type]


# --------------------------------------------------------------------- comparison


def test_compare_exact_small_cases() -> None:
    r = np.arange(1.0, 10.0)  # 1..9, mean 5, sd sqrt(7.5)
    res = compare_to_random(8.5, r, alternative="greater")
    assert res.p_value == pytest.approx(2 / 10)
    assert compare_to_random(8.5, r, alternative="less").p_value == pytest.approx(9 / 10)
    assert compare_to_random(8.5, r).p_value == pytest.approx(4 / 10)
    assert compare_to_random(10.0, r, alternative="greater").p_value == pytest.approx(1 / 10)
    assert compare_to_random(0.0, r, alternative="less").p_value == pytest.approx(1 / 10)
    assert compare_to_random(0.0, r).p_value == pytest.approx(2 / 10)
    tie = compare_to_random(5.0, r)
    assert tie.p_value == 1.0 and tie.percentile == pytest.approx(4.5 / 9) and tie.z_score == 0
    assert res.z_score == pytest.approx(3.5 / math.sqrt(7.5))
    assert res.random_mean == 5.0 and res.random_sd == pytest.approx(math.sqrt(7.5))
    assert res.n_draws == 9 and res.percentile == pytest.approx(8 / 9)


def test_p_values_are_uniform_under_the_null() -> None:
    rng = np.random.default_rng(0)
    n_sim, n_rand = 4000, 99
    data = rng.normal(size=(n_sim, n_rand + 1))
    p_g = np.array([compare_to_random(d[0], d[1:], alternative="greater").p_value for d in data])
    p_2 = np.array([compare_to_random(d[0], d[1:]).p_value for d in data])
    # with continuous data, p_greater is exactly uniform on {1/100, ..., 1}
    se = math.sqrt(0.05 * 0.95 / n_sim)
    assert abs(np.mean(p_g <= 0.05) - 0.05) < 4 * se
    for level in (0.1, 0.25, 0.5, 0.9):
        assert abs(np.mean(p_g <= level) - level) < 4 * math.sqrt(level * (1 - level) / n_sim)
    assert abs(np.mean(p_2 <= 0.1) - 0.1) < 4 * math.sqrt(0.09 / n_sim)
    # and the test has power against a shifted observation
    shifted = [compare_to_random(d[0] + 3.0, d[1:], alternative="greater").p_value for d in data]
    assert np.mean(np.array(shifted) <= 0.05) > 0.85


def test_compare_constant_random_values_and_errors() -> None:
    res = compare_to_random(2.0, [1.0, 1.0, 1.0])
    assert math.isnan(res.z_score) and res.p_value == pytest.approx(0.5)
    with pytest.raises(InsufficientDataError):
        compare_to_random(1.0, [1.0])
    with pytest.raises(NumericalError):
        compare_to_random(float("nan"), [1.0, 2.0])
    with pytest.raises(NumericalError):
        compare_to_random(1.0, [1.0, float("inf")])
    with pytest.raises(ConfigError):
        compare_to_random(1.0, [1.0, 2.0], alternative="bigger")  # type: ignore[arg-type]


def test_round_trip_json() -> None:
    res = compare_to_random(0.7, [0.8, 0.9, 0.85, 0.88], alternative="less")
    back = BaselineComparison.from_dict(json.loads(json.dumps(res.to_dict())))
    assert back == res
    nan_case = compare_to_random(2.0, [1.0, 1.0])
    d = json.loads(json.dumps(nan_case.to_dict()))
    assert d["z_score"] is None
    assert math.isnan(BaselineComparison.from_dict(d).z_score)
