"""Tests for raretoken.data.sampling (context windows); the held-out split is in test_heldout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from transformers import PreTrainedTokenizerFast

from bpe_fixture import make_docs, make_tokenizer
from raretoken.data.corpus import Document
from raretoken.data.sampling import (
    ContextSample,
    sample_until_rare,
    sample_windows,
)
from raretoken.data.token_stats import FrequencySplit, count_tokens, split_rare_common
from raretoken.errors import ConfigError, CorpusError, InsufficientDataError

# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def docs() -> list[Document]:
    return make_docs(200, seed=3)


@pytest.fixture(scope="module")
def tokenizer(docs: list[Document]) -> PreTrainedTokenizerFast:
    return make_tokenizer([d.text for d in docs[:80]])


@pytest.fixture(scope="module")
def stream(docs: list[Document], tokenizer: PreTrainedTokenizerFast) -> np.ndarray:
    """The packed stream, built independently: each document followed by EOS."""
    eos = tokenizer.eos_token_id
    return np.concatenate(
        [np.append(tokenizer.encode(d.text, add_special_tokens=False), eos) for d in docs]
    )


@pytest.fixture(scope="module")
def split(docs: list[Document], tokenizer: PreTrainedTokenizerFast) -> FrequencySplit:
    counts = count_tokens(docs, tokenizer, vocab_size=len(tokenizer), progress=False)
    return split_rare_common(counts, percentile=15)


def sample(
    docs: list[Document], tokenizer: PreTrainedTokenizerFast, **kwargs: object
) -> ContextSample:
    args: dict[str, object] = {"n_windows": 6, "window_len": 32, "seed": 0, "progress": False}
    args.update(kwargs)
    return sample_windows(docs, tokenizer, **args)  # type: ignore[arg-type]


# ------------------------------------------------------------------ windows


def test_windows_are_stream_slices(
    docs: list[Document], tokenizer: PreTrainedTokenizerFast, stream: np.ndarray
) -> None:
    s = sample(docs, tokenizer, n_windows=8, window_len=40)
    assert s.input_ids.shape == (8, 41) and s.input_ids.dtype == np.int64
    assert s.n_stream_tokens == stream.size
    for row, offset in zip(s.input_ids, s.offsets, strict=True):
        np.testing.assert_array_equal(row, stream[offset : offset + 41])
    np.testing.assert_array_equal(s.target_ids, s.input_ids[:, 1:])
    assert s.target_mask.all() and s.n_positions == 8 * 40
    assert np.all(np.diff(s.offsets) >= 41)  # sorted, non-overlapping
    assert s.mode == "windows" and s.seed == 0 and s.bos_policy == "none"
    # doc id = document holding the window's first token
    starts = np.cumsum([0] + [len(tokenizer.encode(d.text)) + 1 for d in docs])
    for offset, doc_id in zip(s.offsets, s.doc_ids, strict=True):
        k = int(np.searchsorted(starts, offset, side="right")) - 1
        assert doc_id == docs[k].doc_id


def test_bos_prepend_scores_the_same_targets(
    docs: list[Document], tokenizer: PreTrainedTokenizerFast
) -> None:
    plain = sample(docs, tokenizer, seed=4)
    bos = sample(docs, tokenizer, seed=4, bos_policy="prepend")
    assert bos.input_ids.shape == (6, 34) and bos.target_ids.shape == (6, 33)
    assert np.all(bos.input_ids[:, 0] == tokenizer.bos_token_id)
    np.testing.assert_array_equal(bos.input_ids[:, 1:], plain.input_ids)
    np.testing.assert_array_equal(bos.target_ids, bos.input_ids[:, 1:])
    assert not bos.target_mask[:, 0].any() and bos.target_mask[:, 1:].all()
    assert bos.n_positions == plain.n_positions == 6 * 32
    np.testing.assert_array_equal(bos.target_ids[bos.target_mask], plain.target_ids.ravel())
    assert tokenizer.bos_token_id not in bos.target_ids


def test_seeds(docs: list[Document], tokenizer: PreTrainedTokenizerFast) -> None:
    a = sample(docs, tokenizer, seed=11)
    b = sample(docs, tokenizer, seed=11)
    c = sample(docs, tokenizer, seed=12)
    np.testing.assert_array_equal(a.input_ids, b.input_ids)
    assert a.doc_ids == b.doc_ids
    assert not np.array_equal(a.offsets, c.offsets)
    with pytest.raises(ValueError):
        sample(docs, tokenizer, seed=None)


def test_offsets_cover_the_stream_uniformly(
    docs: list[Document], tokenizer: PreTrainedTokenizerFast, stream: np.ndarray
) -> None:
    offsets = np.concatenate(
        [sample(docs, tokenizer, n_windows=3, window_len=16, seed=s).offsets for s in range(150)]
    )
    usable = stream.size - 17
    result = stats.kstest(offsets / usable, "uniform")
    assert result.pvalue > 1e-3


def test_exclusion_gives_disjoint_samples(
    docs: list[Document], tokenizer: PreTrainedTokenizerFast, stream: np.ndarray
) -> None:
    main = sample(docs, tokenizer, n_windows=40, window_len=50, seed=1)
    for seed in range(1, 12):  # seed 1: same draw as main without the exclusion
        ref = sample(
            docs, tokenizer, n_windows=40, window_len=60, seed=seed, exclude_offsets_of=main
        )
        covered = np.zeros(stream.size, dtype=int)
        for o in main.offsets:
            covered[o : o + main.span_len] += 1
        for o in ref.offsets:
            covered[o : o + ref.span_len] += 1
        assert covered.max() == 1
    with pytest.raises(InsufficientDataError, match="outside the excluded sample"):
        sample(docs, tokenizer, n_windows=stream.size // 51, window_len=50, exclude_offsets_of=main)
    other = sample(docs[:150], tokenizer)
    with pytest.raises(ConfigError, match="different token stream"):
        sample(docs, tokenizer, exclude_offsets_of=other)


def test_window_size_errors(docs: list[Document], tokenizer: PreTrainedTokenizerFast) -> None:
    assert sample(docs, tokenizer, window_len=31, max_context=32).seq_len == 32
    with pytest.raises(ConfigError, match="model context of 32") as info:
        sample(docs, tokenizer, window_len=31, max_context=32, bos_policy="prepend")
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError):
        sample(docs, tokenizer, window_len=0)
    with pytest.raises(ConfigError):
        sample(docs, tokenizer, n_windows=0)
    with pytest.raises(ConfigError):
        sample(docs, tokenizer, bos_policy="append")
    with pytest.raises(ConfigError):
        sample(docs, tokenizer, max_tokens=10)


def test_not_enough_tokens(
    docs: list[Document], tokenizer: PreTrainedTokenizerFast, stream: np.ndarray
) -> None:
    few = docs[:3]
    n_tokens = sum(len(tokenizer.encode(d.text)) + 1 for d in few)
    with pytest.raises(InsufficientDataError, match=f"only {n_tokens} tokens") as info:
        sample(few, tokenizer, n_windows=49, window_len=512)
    assert "\n" not in str(info.value)
    # exactly enough: every tile is used
    n = stream.size // 33
    full = sample(docs, tokenizer, n_windows=n, window_len=32)
    assert full.n_windows == n
    with pytest.raises(InsufficientDataError):
        sample(docs, tokenizer, n_windows=n + 1, window_len=32)
    with pytest.raises(CorpusError):
        sample([], tokenizer)


def test_max_tokens_caps_the_stream(
    docs: list[Document], tokenizer: PreTrainedTokenizerFast, stream: np.ndarray
) -> None:
    s = sample(docs, tokenizer, max_tokens=500, n_windows=5, window_len=32)
    assert s.n_stream_tokens == 500
    assert np.all(s.offsets + s.span_len <= 500)
    for row, offset in zip(s.input_ids, s.offsets, strict=True):
        np.testing.assert_array_equal(row, stream[offset : offset + 33])


def test_separator_and_missing_special_tokens(docs: list[Document]) -> None:
    tok = make_tokenizer([d.text for d in docs[:80]], eos=False)
    assert tok.eos_token_id is None
    with pytest.raises(ConfigError, match="no eos"):
        sample(docs, tok)
    s = sample(docs, tok, separator_id=0, window_len=200, n_windows=10)
    assert (s.input_ids == 0).any()  # documents are separated by the given id
    assert s.stream_fingerprint != sample(docs, tok, separator_id=2).stream_fingerprint


def test_positions_where_matches_loop(
    docs: list[Document], tokenizer: PreTrainedTokenizerFast
) -> None:
    s = sample(docs, tokenizer, bos_policy="prepend", seed=2)
    vocab_mask = np.zeros(len(tokenizer), dtype=bool)
    vocab_mask[::3] = True
    vocab_mask[tokenizer.bos_token_id] = True
    expected = [
        w * s.target_ids.shape[1] + j
        for w in range(s.n_windows)
        for j in range(s.target_ids.shape[1])
        if s.target_mask[w, j] and vocab_mask[s.target_ids[w, j]]
    ]
    assert s.positions_where(vocab_mask).tolist() == expected
    assert s.count_where(vocab_mask) == len(expected)
    with pytest.raises(ConfigError):
        s.positions_where(vocab_mask[:10])


def test_npz_roundtrip(
    docs: list[Document], tokenizer: PreTrainedTokenizerFast, tmp_path: Path
) -> None:
    s = sample(docs, tokenizer, bos_policy="prepend")
    np.savez(tmp_path / "s.npz", allow_pickle=False, **s.to_arrays())
    with np.load(tmp_path / "s.npz", allow_pickle=False) as data:
        back = ContextSample.from_arrays(data)
    for name in ("input_ids", "target_ids", "target_mask", "offsets"):
        np.testing.assert_array_equal(getattr(back, name), getattr(s, name))
    assert back.to_dict() == s.to_dict()
    assert back.doc_ids == s.doc_ids


# ------------------------------------------------------------------ until rare


def test_sample_until_rare(
    docs: list[Document], tokenizer: PreTrainedTokenizerFast, split: FrequencySplit
) -> None:
    rare_vocab = split.masks()[0]
    u = sample_until_rare(
        docs, tokenizer, split=split, n_rare=25, window_len=32, seed=5, progress=False
    )
    assert u.mode == "until_rare"
    found = int(np.sum(split.is_rare(u.target_ids) & u.target_mask))
    assert found == u.count_where(rare_vocab) >= 25
    assert np.all(np.diff(u.offsets) >= 33)
    # the windows are the first ones of the seeded order: one window fewer is not enough
    fewer = sample(docs, tokenizer, n_windows=u.n_windows - 1, window_len=32, seed=5)
    assert set(fewer.offsets.tolist()) < set(u.offsets.tolist())
    assert fewer.count_where(rare_vocab) < 25


def test_sample_until_rare_runs_out(
    docs: list[Document], tokenizer: PreTrainedTokenizerFast, split: FrequencySplit
) -> None:
    with pytest.raises(
        InsufficientDataError, match=r"found \d+ rare positions in 2000 tokens"
    ) as info:
        sample_until_rare(
            docs,
            tokenizer,
            split=split,
            n_rare=10**6,
            window_len=32,
            seed=0,
            max_tokens=2000,
            progress=False,
        )
    assert "--max-stream-tokens" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ConfigError):
        sample_until_rare(docs, tokenizer, split=split, n_rare=0, seed=0, progress=False)


def test_until_rare_with_bos_and_exclusion(
    docs: list[Document], tokenizer: PreTrainedTokenizerFast, split: FrequencySplit
) -> None:
    main = sample(docs, tokenizer, n_windows=20, window_len=32, seed=0)
    u = sample_until_rare(
        docs,
        tokenizer,
        split=split,
        n_rare=10,
        window_len=32,
        bos_policy="prepend",
        seed=1,
        exclude_offsets_of=main,
        progress=False,
    )
    assert np.all(u.input_ids[:, 0] == tokenizer.bos_token_id)
    assert u.count_where(split.masks()[0]) >= 10
    for o in u.offsets:
        assert np.all((main.offsets + 33 <= o) | (o + 33 <= main.offsets))


def test_rare_split_fixture_is_meaningful(split: FrequencySplit) -> None:
    # guard for the tests above: the tiny corpus has both rare and common tokens
    assert split.n_rare > 0 and split.n_common > split.n_rare
    assert split.rare_occurrences > 0
