"""Multiple testing in the claims table: Benjamini–Hochberg across the run's tests."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import false_discovery_control

from raretoken.analyses.claims import (
    INCONCLUSIVE,
    NOT_SUPPORTED,
    SUPPORTED,
    Claim,
    ClaimsTable,
    with_bh,
)


def _claim(key: str, p: float | None, verdict: str = INCONCLUSIVE) -> Claim:
    return Claim(key, f"claim {key}", "prediction", "finding", "test", p, verdict)


def test_bh_adjusted_p_values_agree_with_scipy() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        ps = rng.uniform(0, 0.2, size=6)
        claims = tuple(_claim(f"k{i}", float(p)) for i, p in enumerate(ps))
        got = [c.p_bh for c in with_bh(claims, 0.05)]
        assert np.allclose(got, false_discovery_control(ps, method="bh"))


def test_rows_without_a_test_are_left_out_of_the_adjustment() -> None:
    claims = (_claim("a", 0.01), _claim("routing", None), _claim("b", 0.04))
    out = with_bh(claims, 0.05)
    assert out[1].p_bh is None
    assert np.allclose([out[0].p_bh, out[2].p_bh], false_discovery_control([0.01, 0.04]))


def test_a_supported_claim_that_does_not_survive_bh_says_so() -> None:
    claims = (
        _claim("spectra", 0.04, SUPPORTED),
        _claim("coordination", 0.5, NOT_SUPPORTED),
        _claim("spatial", 0.6, SUPPORTED),  # a null claim: its verdict is not a discovery
    )
    out = with_bh(claims, 0.05)
    assert "not significant after Benjamini–Hochberg" in out[0].finding
    assert "q=0.12" in out[0].finding  # 0.04 x 3 tests / rank 1
    assert "Benjamini" not in out[1].finding and "Benjamini" not in out[2].finding
    strong = with_bh((_claim("spectra", 0.001, SUPPORTED), _claim("spatial", 0.5)), 0.05)
    assert "Benjamini" not in strong[0].finding


def test_p_bh_round_trips_and_is_a_column() -> None:
    table = ClaimsTable(with_bh((_claim("a", 0.01), _claim("b", None)), 0.05), "g", "", 0.05)
    back = ClaimsTable.from_dict(table.to_dict())
    assert back.claims[0].p_bh == pytest.approx(0.01)
    assert back.claims[1].p_bh is None
    assert "p_bh" in table.to_markdown().splitlines()[4]
