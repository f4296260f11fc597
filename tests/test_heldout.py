"""Tests for raretoken.data.heldout (held-out split, passages)."""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator

import pytest

from bpe_fixture import make_docs
from raretoken import data as data_pkg
from raretoken.data import heldout as heldout_mod
from raretoken.data import sampling as sampling_mod
from raretoken.data.corpus import Document
from raretoken.data.heldout import (
    PASSAGE_CHARS,
    heldout_description,
    is_heldout,
    select_documents,
    split_documents,
    split_passages,
)
from raretoken.errors import ConfigError

# ------------------------------------------------------------------ helpers

_WORDS = ["the", "whale", "sea", "Ahab", "ship", "night", "été", "naïve", "字", "storm", "a"]


def _sentence(rng: random.Random) -> str:
    words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 20)))
    return words[0].upper() + words[1:] + rng.choice([".", ".", "!", "?", '."'])


def _paragraph(rng: random.Random, max_sentences: int = 8) -> str:
    return " ".join(_sentence(rng) for _ in range(rng.randint(1, max_sentences)))


def _text(kind: str, rng: random.Random, n_chars: int) -> str:
    """A random text of at least ``n_chars`` characters of the given kind."""
    parts: list[str] = []
    total = 0
    while total < n_chars:
        if kind == "paragraphs":
            part = _paragraph(rng) + rng.choice(["\n\n", "\n\n", "\n \n", "\r\n\r\n", "\n\n\n"])
        elif kind == "lines":
            part = _paragraph(rng, 3) + "\n"
        elif kind == "sentences":
            part = _sentence(rng) + " "
        elif kind == "nospace":
            part = "".join(rng.choice("abcxyzé字.!?") for _ in range(rng.randint(1, 50)))
        elif kind == "messy":
            part = "".join(rng.choice("ab.  \n\n\t") for _ in range(rng.randint(1, 30)))
            if rng.random() < 0.05:
                part += " " * rng.randint(1, 300)
        else:
            raise AssertionError(kind)
        parts.append(part)
        total += len(part)
    return "".join(parts)


def _check_reconstruction(text: str, passages: list[Document]) -> list[str]:
    """Assert that the passages are consecutive slices of ``text`` separated by whitespace.

    Returns the dropped (whitespace-only) pieces; passages + dropped pieces, in order,
    concatenate to ``text``.
    """
    pos = 0
    dropped: list[str] = []
    for p in passages:
        idx = text.find(p.text, pos)
        assert idx >= 0, f"{p.doc_id} is not a slice of the text after position {pos}"
        gap = text[pos:idx]
        assert not gap.strip(), f"non-whitespace text lost before {p.doc_id}: {gap!r}"
        if gap:
            dropped.append(gap)
        pos = idx + len(p.text)
    tail = text[pos:]
    assert not tail.strip(), f"non-whitespace text lost at the end: {tail[:50]!r}"
    if tail:
        dropped.append(tail)
    return dropped


def _books() -> list[Document]:
    """Six 'novels' of about 300,000 characters of paragraphs (the user's corpus)."""
    rng = random.Random(2024)
    return [
        Document(f"novels/book{i}.txt", _text("paragraphs", rng, 300_000)[:300_000])
        for i in range(1, 7)
    ]


# ------------------------------------------------------------------ held-out split


def test_heldout_split_is_stable_and_proportional() -> None:
    ids = [f"doc-{i}" for i in range(20000)]
    held = [i for i in ids if is_heldout(i, 0.1, seed=7)]
    # binomial(20000, 0.1): sd = 42; 5 sd
    assert abs(len(held) - 2000) < 5 * 42
    assert held == [i for i in reversed(ids) if is_heldout(i, 0.1, seed=7)][::-1]
    larger = {i for i in ids if is_heldout(i, 0.3, seed=7)}
    assert set(held) <= larger
    other_seed = {i for i in ids if is_heldout(i, 0.1, seed=8)}
    assert len(other_seed & set(held)) < 400  # independent: about 10 % of 2000
    assert not any(is_heldout(i, 0.0, seed=7) for i in ids[:100])
    assert all(is_heldout(i, 1.0, seed=7) for i in ids[:100])
    for bad in (-0.1, 1.5):
        with pytest.raises(ConfigError):
            is_heldout("x", bad, seed=0)


def test_split_documents_partitions() -> None:
    docs = make_docs(200, seed=3)
    kept, held = split_documents(docs, heldout_fraction=0.25, seed=1)
    assert len(kept) + len(held) == len(docs)
    assert {d.doc_id for d in kept}.isdisjoint({d.doc_id for d in held})
    assert [d.doc_id for d in held] == [d.doc_id for d in docs if is_heldout(d.doc_id, 0.25, 1)]
    assert list(select_documents(iter(docs), heldout=True, heldout_fraction=0.25, seed=1)) == held
    assert list(select_documents(iter(docs), heldout=False, heldout_fraction=0.25, seed=1)) == kept
    with pytest.raises(ConfigError):
        split_documents(docs, heldout_fraction=2.0, seed=1)


def test_hash_is_unchanged_by_the_move() -> None:
    """Known answers: moving the split must not change which documents are held out."""
    ids = [f"doc/{i}" for i in range(12)]
    assert [i for i in ids if is_heldout(i, 0.3, seed=0)] == [
        i for i in ids if heldout_mod._unit_hash(i, 0) < 0.3
    ]
    assert heldout_mod._unit_hash("doc/0", 0) == pytest.approx(_blake2b_unit("0\x00doc/0"))


def _blake2b_unit(key: str) -> float:
    import hashlib

    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def test_moved_names_are_still_exported() -> None:
    for name in ("is_heldout", "select_documents", "split_documents"):
        assert getattr(sampling_mod, name) is getattr(heldout_mod, name)
        assert getattr(data_pkg, name) is getattr(heldout_mod, name)
        assert name in data_pkg.__all__
    for name in ("split_passages", "heldout_description", "PASSAGE_CHARS"):
        assert getattr(data_pkg, name) is getattr(heldout_mod, name)
        assert name in data_pkg.__all__


# ------------------------------------------------------------------ passages: known answers


def _texts(docs: list[Document]) -> list[str]:
    return [d.text for d in docs]


@pytest.mark.parametrize(
    ("text", "max_chars", "expected"),
    [
        # greedy packing at blank lines: two paragraphs per passage, not one
        ("aaa\n\nbbb\n\nccc\n\nddd", 10, ["aaa\n\nbbb\n\n", "ccc\n\nddd"]),
        # a blank line in the second half beats a later line end
        ("aaaa\n\nbb\ncc dd ee", 12, ["aaaa\n\n", "bb\ncc dd ee"]),
        # line ends beat a later sentence end
        ("aaaaa\nbb. cc dd", 10, ["aaaaa\n", "bb. cc dd"]),
        # sentence ends beat a later space
        ("Aa bb. Cc dd ee", 10, ["Aa bb. ", "Cc dd ee"]),
        ("Aa bb. Cc dd. Ee ff.", 14, ["Aa bb. Cc dd. ", "Ee ff."]),
        # whitespace, greedily
        ("abc def ghi jkl", 9, ["abc def ", "ghi jkl"]),
        # no boundary fills half a passage: the last preferred one, rather than a hard cut
        ("ab\n\ncdefghijkl", 10, ["ab\n\n", "cdefghijkl"]),
        ("ab cd. efghijklmn", 10, ["ab cd. ", "efghijklmn"]),
        # ... of the most preferred kind
        ("a\n\nb cdefghijklmn", 12, ["a\n\n", "b ", "cdefghijklmn"]),
        # CJK sentence ends need no space
        ("一二三。四五六。七八", 5, ["一二三。", "四五六。", "七八"]),
        # no whitespace at all: hard cuts
        ("abcdefghij", 4, ["abcd", "efgh", "ij"]),
        ("abcdefghij", 1, list("abcdefghij")),
        # whitespace-only pieces are dropped
        ("abc" + " " * 20 + "def", 8, ["abc     ", "def"]),
        ("  \n\nabcdefgh\n\n \n  ", 6, ["abcdef", "gh\n\n \n"]),
    ],
)
def test_split_passages_known_answers(text: str, max_chars: int, expected: list[str]) -> None:
    out = list(split_passages([Document("d", text)], max_chars))
    assert _texts(out) == expected
    assert [d.doc_id for d in out] == [f"d#p{k}" for k in range(len(expected))]
    _check_reconstruction(text, out)


def test_short_documents_pass_through_unchanged() -> None:
    docs = [
        Document("a", "x" * 50),
        Document("b", "short"),
        Document("c", "   "),
        Document("d", "para one\n\npara two"),
    ]
    out = list(split_passages(docs, 50))
    assert out == docs
    assert all(o is d for o, d in zip(out, docs, strict=True))
    # the default is PASSAGE_CHARS
    doc = Document("e", "y" * PASSAGE_CHARS)
    assert list(split_passages([doc])) == [doc]
    assert len(list(split_passages([Document("f", "y" * (PASSAGE_CHARS + 1))]))) == 2


def test_passage_ids_and_order() -> None:
    docs = [
        Document("long1", "aa bb cc dd ee ff"),
        Document("short", "tiny"),
        Document("long2#3", "gg hh ii jj"),
    ]
    out = list(split_passages(docs, 6))
    assert [d.doc_id for d in out] == [
        "long1#p0",
        "long1#p1",
        "long1#p2",
        "short",
        "long2#3#p0",
        "long2#3#p1",
    ]
    assert _texts(out) == ["aa bb ", "cc dd ", "ee ff", "tiny", "gg hh ", "ii jj"]


@pytest.mark.parametrize("bad", [0, -1, -8000])
def test_bad_max_chars(bad: int) -> None:
    with pytest.raises(ConfigError, match="passage"):
        split_passages([Document("d", "text")], bad)  # raised on the call, not on iteration
    with pytest.raises(ConfigError):
        list(split_passages([], bad))


def test_split_passages_streams() -> None:
    consumed: list[str] = []

    def gen() -> Iterator[Document]:
        for i in range(3):
            consumed.append(f"d{i}")
            yield Document(f"d{i}", "word " * 10)
        raise AssertionError("read past what was asked for")

    it = split_passages(gen(), 20)
    first = next(it)
    assert first.doc_id == "d0#p0"
    assert consumed == ["d0"]


# ------------------------------------------------------------------ passages: properties


@pytest.mark.parametrize("kind", ["paragraphs", "lines", "sentences", "nospace", "messy"])
@pytest.mark.parametrize("max_chars", [1, 2, 7, 60, 500, 3000])
def test_split_passages_properties(kind: str, max_chars: int) -> None:
    rng = random.Random(f"{kind}-{max_chars}")
    for trial in range(6):
        n_chars = rng.choice([max_chars + 1, 3 * max_chars, 20 * max_chars + rng.randint(0, 99)])
        text = _text(kind, rng, min(n_chars, 60_000))
        if len(text) <= max_chars:
            text += "z" * (max_chars + 1 - len(text))
        out = list(split_passages([Document(f"doc{trial}", text)], max_chars))
        assert out, "a text with non-whitespace characters gave no passages"
        assert [d.doc_id for d in out] == [f"doc{trial}#p{k}" for k in range(len(out))]
        assert all(0 < len(d.text) <= max_chars for d in out)
        assert all(d.text.strip() for d in out)
        dropped = _check_reconstruction(text, out)
        if kind in ("paragraphs", "lines", "sentences") and max_chars >= 60:
            # short whitespace runs only: nothing is dropped, the passages are the text
            assert not dropped
            assert "".join(_texts(out)) == text
        if kind == "nospace":
            # hard cuts only: every passage but the last is full
            assert all(len(d.text) == max_chars for d in out[:-1])
            assert "".join(_texts(out)) == text
        if kind != "messy" and max_chars >= 60:
            # greedy packing: no passage but the last is under half full (the words are
            # much shorter than half a passage)
            assert all(len(d.text) >= max_chars // 2 for d in out[:-1])


def test_cuts_land_on_blank_lines() -> None:
    rng = random.Random(5)
    paragraphs = [_paragraph(rng) for _ in range(400)]
    assert max(map(len, paragraphs)) < 1000  # each under half a passage
    text = "\n\n".join(paragraphs)
    out = list(split_passages([Document("book", text)], 2000))
    assert len(out) > 10
    for p in out[:-1]:
        assert p.text.endswith("\n\n"), p.text[-30:]
        assert len(p.text) >= 1000  # packed: several paragraphs per passage
    for p in out:
        assert p.text[0] not in " \n"
    # each passage is a run of whole paragraphs
    assert [q for p in out for q in p.text.strip().split("\n\n")] == paragraphs
    assert len(out) < len(paragraphs) / 2


def test_cuts_land_on_line_ends_without_blank_lines() -> None:
    rng = random.Random(6)
    lines = [_paragraph(rng, 3) for _ in range(300)]
    assert max(map(len, lines)) < 300
    text = "\n".join(lines)
    out = list(split_passages([Document("report", text)], 600))
    assert len(out) > 5
    assert all(p.text.endswith("\n") for p in out[:-1])
    assert [q for p in out for q in p.text.strip().split("\n")] == lines


# ------------------------------------------------------------------ the user's case


def test_six_novels_give_a_heldout_part() -> None:
    books = _books()
    assert all(len(b.text) == 300_000 for b in books)
    # the bug: by whole documents, this corpus has an empty held-out part
    assert not list(select_documents(books, heldout=True, heldout_fraction=0.1, seed=0))

    passages = list(split_passages(books))
    held = list(select_documents(split_passages(books), heldout=True, heldout_fraction=0.1, seed=0))
    kept = list(
        select_documents(split_passages(books), heldout=False, heldout_fraction=0.1, seed=0)
    )
    assert held
    total = sum(len(b.text) for b in books)
    held_chars = sum(len(d.text) for d in held)
    assert 0.05 * total <= held_chars <= 0.15 * total
    # disjoint, and together everything
    held_ids = {d.doc_id for d in held}
    kept_ids = {d.doc_id for d in kept}
    assert held_ids.isdisjoint(kept_ids)
    assert held_ids | kept_ids == {d.doc_id for d in passages}
    assert len(held) + len(kept) == len(passages)
    assert held_chars + sum(len(d.text) for d in kept) == total
    # every book is wholly covered by its passages
    for book in books:
        mine = [d for d in passages if d.doc_id.startswith(book.doc_id + "#p")]
        assert "".join(_texts(mine)) == book.text
    # the held-out passages are spread over the books, not one whole book
    assert len({d.doc_id.split("#")[0] for d in held}) >= 3


# ------------------------------------------------------------------ manifest description


def test_heldout_description() -> None:
    by_passage = heldout_description(0.1, 0, PASSAGE_CHARS)
    assert by_passage["unit"] == "passage"
    assert by_passage["passage_chars"] == PASSAGE_CHARS
    assert by_passage["fraction"] == 0.1
    assert by_passage["seed"] == 0
    assert "8000" in by_passage["method"] and "blake2b" in by_passage["method"]
    assert json.loads(json.dumps(by_passage)) == by_passage

    by_doc = heldout_description(0.25, 3, None)
    assert by_doc["unit"] == "document"
    assert by_doc["passage_chars"] is None
    assert (by_doc["fraction"], by_doc["seed"]) == (0.25, 3)
    assert re.search(r"\bdocument\b", by_doc["method"])
    assert json.loads(json.dumps(by_doc)) == by_doc

    with pytest.raises(ConfigError):
        heldout_description(1.5, 0, None)
    with pytest.raises(ConfigError):
        heldout_description(0.1, 0, 0)
