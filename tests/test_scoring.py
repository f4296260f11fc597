"""Scoring every rare target and a uniform sample of positions (raretoken.data.scoring)."""

from __future__ import annotations

import numpy as np
import pytest

from raretoken.data.sampling import ContextSample
from raretoken.data.scoring import (
    score_rare_and_sample,
    scoring_summary,
    uniform_rows,
)
from raretoken.errors import ConfigError
from raretoken.run.config import make_config
from raretoken.stats.regime_bootstrap import window_of_rows

VOCAB = 50


def _sample(n_windows: int = 20, window_len: int = 64, seed: int = 0, bos: str = "none"):
    rng = np.random.default_rng(seed)
    # Zipf-like targets: ids 40..49 are rare
    p = 1.0 / np.arange(1, VOCAB + 1)
    p /= p.sum()
    extra = 1 if bos == "prepend" else 0
    ids = rng.choice(VOCAB, size=(n_windows, window_len + 1 + extra), p=p).astype(np.int64)
    target_mask = np.ones((n_windows, window_len + extra), dtype=bool)
    if bos == "prepend":
        target_mask[:, 0] = False
    return ContextSample(
        input_ids=ids,
        target_ids=ids[:, 1:].copy(),
        target_mask=target_mask,
        doc_ids=tuple(str(i) for i in range(n_windows)),
        offsets=np.arange(n_windows, dtype=np.int64) * (window_len + 1),
        window_len=window_len,
        bos_policy=bos,
        seed=seed,
        mode="windows",
        n_stream_tokens=n_windows * (window_len + 1),
        stream_fingerprint="x",
    )


def _masks(rare_from: int = 40, common_to: int = 30) -> tuple[np.ndarray, np.ndarray]:
    rare = np.zeros(VOCAB, dtype=bool)
    rare[rare_from:] = True
    common = np.zeros(VOCAB, dtype=bool)
    common[:common_to] = True
    return rare, common


@pytest.mark.parametrize("bos", ["none", "prepend"])
def test_every_rare_target_is_scored_and_the_common_sample_is_capped(bos: str) -> None:
    s = _sample(bos=bos)
    rare, common = _masks()
    out = score_rare_and_sample(s, always_mask=rare, common_mask=common, max_common=150, seed=3)
    flat_t = s.target_ids.ravel()
    window = s.window_mask().ravel()
    scored = out.target_mask.ravel()
    # every window position with a rare target is scored; nothing outside the windows is
    assert np.all(scored[window & rare[flat_t]])
    assert not np.any(scored & ~window)
    uni = out.uniform_mask.ravel()
    assert np.all(scored[uni])
    assert int(np.count_nonzero(uni & common[flat_t])) == 150
    # the other scored positions are exactly the rare ones outside the uniform sample
    assert np.array_equal(scored, uni | (window & rare[flat_t]))
    summary = scoring_summary(out, rare, common)
    assert summary.n_scored == int(scored.sum()) and summary.n_uniform_common == 150
    assert summary.n_window_positions == s.n_windows * s.window_len
    assert summary.n_common_available == int(np.count_nonzero(window & common[flat_t]))
    assert summary.saving > 1


def test_a_cap_above_the_available_common_targets_takes_them_all() -> None:
    s = _sample(n_windows=2)
    rare, common = _masks()
    out = score_rare_and_sample(s, always_mask=rare, common_mask=common, max_common=10**6, seed=0)
    assert np.array_equal(out.uniform_mask, s.target_mask)
    assert np.array_equal(out.target_mask, s.target_mask)


def test_the_uniform_sample_is_uniform_over_positions() -> None:
    """Every position has the same chance to be in the sample, whatever its target: the mean
    inclusion rate of rare, mid and common targets agree over many seeds, and the mean of a
    per-position value over the sampled common targets is unbiased for the windows' mean."""
    s = _sample(n_windows=10, window_len=50, seed=1)
    rare, common = _masks()
    flat_t = s.target_ids.ravel()
    value = np.random.default_rng(9).normal(size=flat_t.size) + flat_t  # depends on the target
    n_seeds = 400
    hits = np.zeros(flat_t.size)
    means = []
    for seed in range(n_seeds):
        out = score_rare_and_sample(s, always_mask=rare, common_mask=common, max_common=60,
                                    seed=seed)  # fmt: skip
        uni = out.uniform_mask.ravel()
        hits += uni
        means.append(value[uni & common[flat_t]].mean())
    rate = hits / n_seeds
    mid = ~rare[flat_t] & ~common[flat_t]
    by_class = [rate[rare[flat_t]].mean(), rate[mid].mean(), rate[common[flat_t]].mean()]
    assert max(by_class) - min(by_class) < 0.03, by_class
    truth = value[common[flat_t]].mean()
    se = np.std(means) / np.sqrt(n_seeds)
    assert abs(np.mean(means) - truth) < 4 * se + 1e-9


def test_rows_helpers_follow_the_capture_order() -> None:
    s = _sample(n_windows=4, window_len=16)
    rare, common = _masks()
    out = score_rare_and_sample(s, always_mask=rare, common_mask=common, max_common=8, seed=0)
    rows_w = window_of_rows(out.target_mask)
    assert rows_w.size == out.n_positions
    assert np.array_equal(rows_w, np.nonzero(out.target_mask)[0])
    uni = uniform_rows(out)
    targets = out.target_ids[out.target_mask]
    assert np.count_nonzero(common[targets[uni]]) == 8
    # an unnarrowed sample: every row is in the uniform sample
    assert np.array_equal(uniform_rows(s), np.arange(s.n_positions))


def test_a_narrowed_sample_round_trips_through_its_arrays() -> None:
    s = _sample(n_windows=3, window_len=16)
    rare, common = _masks()
    out = score_rare_and_sample(s, always_mask=rare, common_mask=common, max_common=5, seed=0)
    back = ContextSample.from_arrays(out.to_arrays())
    assert np.array_equal(back.target_mask, out.target_mask)
    assert np.array_equal(back.uniform_mask, out.uniform_mask)  # type: ignore[arg-type]
    assert back.scoring == "rare+common" and back.max_common == 5
    plain = ContextSample.from_arrays(s.to_arrays())
    assert plain.uniform_mask is None and plain.scoring == "all" and plain.max_common is None
    assert out.to_dict()["n_uniform"] == int(out.uniform_mask.sum())  # type: ignore[union-attr]


def test_bad_scoring_inputs_are_refused() -> None:
    s = _sample(n_windows=2)
    rare, common = _masks()
    with pytest.raises(ConfigError, match="max_common"):
        score_rare_and_sample(s, always_mask=rare, common_mask=common, max_common=0, seed=0)
    with pytest.raises(ConfigError, match="always_mask has 10 entries"):
        score_rare_and_sample(s, always_mask=rare[:10], common_mask=common, max_common=5, seed=0)
    with pytest.raises(ConfigError, match="1-D"):
        score_rare_and_sample(s, always_mask=rare, common_mask=common[None], max_common=5, seed=0)
    out = score_rare_and_sample(s, always_mask=rare, common_mask=common, max_common=5, seed=0)
    with pytest.raises(ConfigError, match="already narrowed"):
        score_rare_and_sample(out, always_mask=rare, common_mask=common, max_common=5, seed=0)


def test_scoring_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="scoring must be one of"):
        make_config(overrides={"scoring": "some"})
    with pytest.raises(ConfigError, match=r"score_percentile .* must be at least"):
        make_config(overrides={"percentile": 20.0, "score_percentile": 10.0})
    with pytest.raises(ConfigError, match="max_common must be >= 1"):
        make_config(overrides={"max_common": 0})
    # with every position scored the scoring percentile does not matter
    cfg = make_config(overrides={"percentile": 20.0, "score_percentile": 10.0, "scoring": "all"})
    assert cfg.scoring == "all"
    demo, paper, literal = (make_config(preset=p) for p in ("demo", "paper", "paper-windows"))
    assert demo.sampling == paper.sampling == "until_rare" and paper.n_rare >= 2000
    assert literal.sampling == "windows" and literal.n_windows == 49 and literal.scoring == "all"
