"""Unigram token counts over a corpus, made with the model's own tokenizer (paper §3.1).

The rare/common split of the paper rests on unigram frequencies counted with the tokenizer
of the model under study. :func:`count_tokens` counts every vocabulary id over a corpus
(without special tokens, so the counts are those of the text alone) into a
:class:`TokenCounts`; :func:`encode_batch` is the batched tokenization it shares with the
context sampler and :func:`special_token_ids` the ids that are never rare nor common. The
frequency elbow (:mod:`raretoken.data.elbow`) and the split (:mod:`raretoken.data.split`)
work on these counts.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from raretoken.data.corpus import Document
from raretoken.errors import (
    ConfigError,
    CorpusError,
    InsufficientDataError,
    TokenizerMismatchError,
)

logger = logging.getLogger(__name__)

Tokenizer = Any
"""A Hugging Face tokenizer (``tokenizer(texts, add_special_tokens=False)["input_ids"]``)."""

BATCH_MAX_CHARS = 4_000_000
"""A tokenization batch is flushed early once it holds this many characters."""


def encode_batch(tokenizer: Tokenizer, texts: Sequence[str]) -> list[np.ndarray]:
    """Tokenize ``texts`` without special tokens; one int64 array of ids per text.

    Uses the tokenizer's batched call (``tokenizer(texts, add_special_tokens=False)``), which
    the fast (Rust) tokenizers parallelise over the texts.
    """
    if not texts:
        return []
    encoded = tokenizer(
        list(texts), add_special_tokens=False, return_attention_mask=False, verbose=False
    )["input_ids"]
    return [np.asarray(ids, dtype=np.int64) for ids in encoded]


def special_token_ids(tokenizer: Tokenizer, vocab_size: int | None = None) -> tuple[int, ...]:
    """The tokenizer's special token ids (sorted, below ``vocab_size`` when given)."""
    ids = {int(i) for i in getattr(tokenizer, "all_special_ids", ()) if i is not None}
    if vocab_size is not None:
        ids = {i for i in ids if 0 <= i < vocab_size}
    return tuple(sorted(ids))


@dataclass(frozen=True, eq=False)
class TokenCounts:
    """Unigram counts of every vocabulary id over a corpus.

    Attributes
    ----------
    counts
        ``(vocab_size,)`` int64; ``counts[i]`` is the number of occurrences of token id ``i``.
    n_tokens
        Total number of tokens counted (``counts.sum()``).
    n_documents
        Number of documents (fully or, with ``max_tokens``, partly) counted.
    special_ids
        The tokenizer's special token ids (never rare nor common).
    truncated
        Whether counting stopped at ``max_tokens`` before the end of the corpus.
    """

    counts: np.ndarray
    n_tokens: int
    n_documents: int
    special_ids: tuple[int, ...]
    truncated: bool = False

    @property
    def vocab_size(self) -> int:
        """Length of the counts vector."""
        return int(self.counts.shape[0])

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Arrays for :func:`numpy.savez` (no pickled objects)."""
        return {
            "counts": np.asarray(self.counts, dtype=np.int64),
            "n_tokens": np.asarray(self.n_tokens, dtype=np.int64),
            "n_documents": np.asarray(self.n_documents, dtype=np.int64),
            "special_ids": np.asarray(self.special_ids, dtype=np.int64),
            "truncated": np.asarray(self.truncated, dtype=np.bool_),
        }

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> TokenCounts:
        """Inverse of :meth:`to_arrays` (accepts an open ``np.load`` archive)."""
        return cls(
            counts=np.asarray(arrays["counts"], dtype=np.int64),
            n_tokens=int(arrays["n_tokens"]),
            n_documents=int(arrays["n_documents"]),
            special_ids=tuple(int(i) for i in np.asarray(arrays["special_ids"]).ravel()),
            truncated=bool(arrays["truncated"]),
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able summary (the counts vector itself is left out)."""
        return {
            "vocab_size": self.vocab_size,
            "n_tokens": self.n_tokens,
            "n_documents": self.n_documents,
            "n_types_seen": int(np.count_nonzero(self.counts)),
            "special_ids": list(self.special_ids),
            "truncated": self.truncated,
        }


def count_tokens(
    docs: Iterable[Document],
    tokenizer: Tokenizer,
    *,
    vocab_size: int,
    batch_size: int = 256,
    progress: bool = True,
    max_tokens: int | None = None,
) -> TokenCounts:
    """Count unigram token occurrences over ``docs`` with ``tokenizer``.

    Documents are tokenized in batches of ``batch_size`` documents (or fewer, once a batch
    holds :data:`BATCH_MAX_CHARS` characters) without special tokens, so counts are those of
    the text alone (no BOS/EOS). With ``max_tokens``, counting stops after exactly that many
    tokens (the last document is counted partly) and ``truncated`` is set.

    Raises
    ------
    ConfigError
        ``vocab_size``, ``batch_size`` or ``max_tokens`` below 1.
    TokenizerMismatchError
        A token id at or above ``vocab_size`` (tokenizer larger than the model's vocabulary).
    CorpusError
        ``docs`` is empty.
    InsufficientDataError
        The documents hold no token at all.
    """
    if vocab_size < 1:
        raise ConfigError(f"vocab_size must be >= 1, got {vocab_size}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if max_tokens is not None and max_tokens < 1:
        raise ConfigError(f"max_tokens must be >= 1, got {max_tokens}")

    counts = np.zeros(vocab_size, dtype=np.int64)
    n_tokens = 0
    n_documents = 0
    truncated = False
    batch: list[str] = []
    batch_chars = 0
    bar = tqdm(
        desc="counting tokens", unit="char", unit_scale=True, disable=not progress, leave=False
    )

    def flush() -> bool:
        """Count the batch; return True when ``max_tokens`` is reached."""
        nonlocal n_tokens, n_documents, truncated
        arrays = encode_batch(tokenizer, batch)
        stop = False
        if max_tokens is not None:
            kept: list[np.ndarray] = []
            room = max_tokens - n_tokens
            for ids in arrays:
                if len(ids) >= room:
                    kept.append(ids[:room])
                    stop = True
                    break
                kept.append(ids)
                room -= len(ids)
            arrays = kept
        flat = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
        if flat.size and (flat.max() >= vocab_size or flat.min() < 0):
            bad = int(flat.max()) if flat.max() >= vocab_size else int(flat.min())
            raise TokenizerMismatchError(
                f"tokenizer produced id {bad}, outside the model vocabulary of size {vocab_size}"
            )
        counts[:] += np.bincount(flat, minlength=vocab_size)
        n_tokens += int(flat.size)
        n_documents += len(arrays)
        bar.update(sum(len(t) for t in batch))
        bar.set_postfix(tokens=n_tokens, refresh=False)
        batch.clear()
        if stop:
            truncated = True
        return stop

    seen_any = False
    try:
        stopped = False
        for doc in docs:
            seen_any = True
            batch.append(doc.text)
            batch_chars += len(doc.text)
            if len(batch) >= batch_size or batch_chars >= BATCH_MAX_CHARS:
                batch_chars = 0
                if flush():
                    stopped = True
                    break
        if not stopped and batch:
            flush()
    finally:
        bar.close()
    if not seen_any:
        raise CorpusError("no documents to count tokens in")
    if n_tokens == 0:
        raise InsufficientDataError(f"the {n_documents} documents hold no tokens")
    result = TokenCounts(
        counts=counts,
        n_tokens=n_tokens,
        n_documents=n_documents,
        special_ids=special_token_ids(tokenizer, vocab_size),
        truncated=truncated,
    )
    logger.info(
        "counted %d tokens (%d types) in %d documents%s",
        n_tokens,
        int(np.count_nonzero(counts)),
        n_documents,
        " (truncated at max_tokens)" if truncated else "",
    )
    return result
