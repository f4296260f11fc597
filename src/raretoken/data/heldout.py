"""The held-out split of a corpus that serves both token counting and context sampling.

Held-out documents
------------------
:func:`is_heldout` assigns each document to the held-out part from a hash of
``(seed, doc_id)``: stable, order-independent and streaming-friendly.

Passages
--------
Whole documents are too coarse a unit when a corpus has few, long documents (a directory of
novels, long reports, one large file): six books give an empty held-out part about half the
time at ``heldout_fraction = 0.1``, and otherwise hold out a whole book. :func:`split_passages`
therefore cuts every document longer than :data:`PASSAGE_CHARS` characters into consecutive
passages of at most that many characters, and the split is then drawn per passage
(``doc_id = "<doc_id>#p<k>"``). Short documents pass through unchanged, so a corpus of many
short documents is split exactly as before.

A passage ends, in order of preference, after a blank line, a line end, a sentence end
(``.``, ``!`` or ``?`` followed by whitespace, or a CJK ``。``, ``！`` or ``？``), any
whitespace, or else at ``max_chars`` (a hard cut); the whitespace after a boundary stays with
the passage before it. Passages are packed greedily: the cut is the *last* boundary of the preferred
kind that keeps the passage within ``max_chars``, and a kind of boundary is used only if it
fills at least half of ``max_chars``; only when no boundary of any kind does so is the last
boundary of the most preferred kind taken, wherever it lies (else a hard cut). Passages are
thus at least ``max_chars / 2`` characters long (bar the last one of a document) unless the
text has no whitespace for half a passage, and one document is processed in linear time.
The passages of a document are consecutive slices of its text: concatenated, together with
the whitespace-only pieces that are dropped, they give back the text exactly.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterable, Iterator
from typing import Any

from raretoken.data.corpus import Document
from raretoken.errors import ConfigError

logger = logging.getLogger(__name__)

PASSAGE_CHARS = 8_000
"""Default maximum passage length (characters) of :func:`split_passages`."""

# Boundaries, most preferred first; a passage is cut at the *end* of a match, so that the
# whitespace after a boundary stays with the passage before it.
_BOUNDARIES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("blank line", re.compile(r"\n[^\S\n]*\n\s*")),
    ("line end", re.compile(r"\n\s*")),
    ("sentence end", re.compile(r"[.!?][\"'’”)\]]*\s+|[。！？][」』”’）]*\s*")),
    ("whitespace", re.compile(r"\s+")),
)


# --------------------------------------------------------------------------------------------
# held-out split


def _unit_hash(doc_id: str, seed: int) -> float:
    digest = hashlib.blake2b(f"{int(seed)}\x00{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def _check_fraction(fraction: float) -> None:
    if not 0.0 <= fraction <= 1.0:
        raise ConfigError(f"heldout_fraction must be in [0, 1], got {fraction}")


def is_heldout(doc_id: str, fraction: float, seed: int) -> bool:
    """Whether document ``doc_id`` is in the held-out part (about ``fraction`` of documents).

    The decision is ``blake2b(seed, doc_id) / 2**64 < fraction``: it depends on nothing else,
    so it is stable across runs, orders and corpus sizes, and the held-out part for a larger
    fraction contains the one for a smaller fraction.
    """
    _check_fraction(fraction)
    return _unit_hash(doc_id, seed) < fraction


def select_documents(
    docs: Iterable[Document], *, heldout: bool, heldout_fraction: float, seed: int
) -> Iterator[Document]:
    """Stream the held-out (``heldout=True``) or the remaining documents of ``docs``."""
    _check_fraction(heldout_fraction)
    for doc in docs:
        if (_unit_hash(doc.doc_id, seed) < heldout_fraction) == heldout:
            yield doc


def split_documents(
    docs: Iterable[Document], *, heldout_fraction: float, seed: int
) -> tuple[list[Document], list[Document]]:
    """Split ``docs`` into ``(count_docs, heldout_docs)`` with :func:`is_heldout`.

    Both parts are materialised; use :func:`select_documents` to stream one part.
    """
    _check_fraction(heldout_fraction)
    kept: list[Document] = []
    held: list[Document] = []
    for doc in docs:
        (held if _unit_hash(doc.doc_id, seed) < heldout_fraction else kept).append(doc)
    return kept, held


# --------------------------------------------------------------------------------------------
# passages


def _check_passage_chars(max_chars: int) -> None:
    if max_chars < 1:
        raise ConfigError(f"passage length must be >= 1 character, got {max_chars}")


def _last_boundary_end(pattern: re.Pattern[str], text: str, start: int, stop: int) -> int:
    """End of the last match of ``pattern`` in ``text[start:stop]``, or ``-1``."""
    end = -1
    for match in pattern.finditer(text, start, stop):
        end = match.end()
    return end


def _cut(text: str, start: int, max_chars: int) -> int:
    """Where the passage starting at ``start`` ends (``len(text) - start > max_chars``)."""
    stop = start + max_chars
    min_end = start + max_chars // 2
    fallback = -1
    for _name, pattern in _BOUNDARIES:
        end = _last_boundary_end(pattern, text, start, stop)
        if end >= min_end:
            return end
        if fallback < 0 and end > start:
            fallback = end
    return fallback if fallback > start else stop


def split_passages(docs: Iterable[Document], max_chars: int = PASSAGE_CHARS) -> Iterator[Document]:
    """Stream ``docs`` with every document longer than ``max_chars`` cut into passages.

    A document of at most ``max_chars`` characters is yielded unchanged. A longer one is
    yielded as consecutive passages of at most ``max_chars`` characters with
    ``doc_id = f"{doc.doc_id}#p{k}"`` (``k = 0, 1, ...``), cut preferably after blank lines,
    else after line ends, sentence ends or whitespace, else hard (see the module docstring).
    Whitespace-only pieces are dropped; the passages and the dropped pieces, in order,
    concatenate to the document's text. One document is held in memory at a time.

    Raises
    ------
    ConfigError
        ``max_chars < 1``.
    """
    _check_passage_chars(max_chars)
    return _split_passages(docs, max_chars)


def _split_passages(docs: Iterable[Document], max_chars: int) -> Iterator[Document]:
    for doc in docs:
        text = doc.text
        if len(text) <= max_chars:
            yield doc
            continue
        k = 0
        start = 0
        while start < len(text):
            end = len(text) if len(text) - start <= max_chars else _cut(text, start, max_chars)
            piece = text[start:end]
            if piece.strip():
                yield Document(f"{doc.doc_id}#p{k}", piece)
                k += 1
            else:
                logger.debug(
                    "%s: dropped %d whitespace characters at %d", doc.doc_id, len(piece), start
                )
            start = end
        logger.debug("%s: %d characters cut into %d passages", doc.doc_id, len(text), k)


def heldout_description(fraction: float, seed: int, passage_chars: int | None) -> dict[str, Any]:
    """How the held-out split was drawn, as a JSON-able dict for the run manifest.

    ``passage_chars`` is the ``max_chars`` given to :func:`split_passages`, or ``None`` when
    whole documents were assigned.
    """
    _check_fraction(fraction)
    if passage_chars is None:
        unit = "document"
        method = (
            f"Each document is held out when blake2b(seed, doc_id) / 2**64 < {fraction}, "
            f"with seed {seed}."
        )
    else:
        _check_passage_chars(passage_chars)
        unit = "passage"
        method = (
            f"Documents longer than {passage_chars} characters are cut into passages of at "
            f"most {passage_chars} characters (after blank lines, else line ends, sentence "
            f"ends or whitespace) with ids '<doc_id>#p<k>', and each passage or short document "
            f"is held out when blake2b(seed, id) / 2**64 < {fraction}, with seed {seed}."
        )
    return {
        "unit": unit,
        "passage_chars": passage_chars,
        "fraction": float(fraction),
        "seed": int(seed),
        "method": method,
    }
