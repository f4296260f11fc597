"""Context windows for the ablation experiments (paper §3.1: "25,088 tokens" = 49 x 512).

Token stream
------------
Documents are tokenized without special tokens and packed into one stream, each document
followed by a separator token (the tokenizer's EOS unless ``separator_id`` is given), as in
causal-LM pre-training. Reading stops after ``max_tokens`` stream tokens, so a streamed corpus
(C4) is read only that far.

Windows
-------
A window spans ``window_len + 1`` consecutive stream tokens ``t_0 .. t_W``; its scored
targets are ``t_1 .. t_W`` (exactly ``window_len`` next-token predictions, each with at least
one token of context). With ``bos_policy="prepend"`` the model input is
``[BOS, t_0, ..., t_W]``; the target ``t_0`` (predicted from BOS alone) is then masked out,
so both policies score the same tokens and the BOS is never a target.

Windows never overlap. The stream is cut into consecutive tiles of ``window_len + 1`` tokens
starting at a seeded random phase; tiles overlapping an excluded sample are dropped and the
rest are visited in a seeded random order. ``sample_windows`` takes the first ``n_windows``
of them; ``sample_until_rare`` takes as many as needed to hold ``n_rare`` rare-target
positions. Every stream position thus has (nearly) the same chance of being drawn, whatever
the corpus order (the embedded corpus is chronological), and the windows are returned sorted
by stream offset.

Held-out documents
------------------
The split of one corpus into a counting and a held-out part lives in
:mod:`raretoken.data.heldout`; its public functions are re-exported here.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from tqdm.auto import tqdm

from raretoken._rng import as_generator
from raretoken.data.corpus import Document, require_nonempty
from raretoken.data.counting import Tokenizer, encode_batch
from raretoken.data.heldout import is_heldout as is_heldout
from raretoken.data.heldout import select_documents as select_documents
from raretoken.data.heldout import split_documents as split_documents
from raretoken.data.split import FrequencySplit
from raretoken.errors import ConfigError, InsufficientDataError

logger = logging.getLogger(__name__)

BosPolicy = Literal["none", "prepend"]
BOS_POLICIES: tuple[str, ...] = ("none", "prepend")

DEFAULT_MAX_STREAM_TOKENS = 10_000_000
"""Default cap on the token stream read from the corpus (about 40 MB of int32)."""

_ENCODE_BATCH_DOCS = 64


# --------------------------------------------------------------------------------------------
# result


@dataclass(frozen=True, eq=False)
class ContextSample:
    """Non-overlapping token windows and their scored next-token targets.

    Attributes
    ----------
    input_ids
        ``(n_windows, seq_len)`` int64 model inputs; ``seq_len = window_len + 1``, plus one
        with ``bos_policy="prepend"`` (column 0 is then the BOS).
    target_ids
        ``(n_windows, seq_len - 1)`` int64, ``input_ids[:, 1:]``: the logits at input position
        ``j`` predict ``target_ids[:, j]`` (the last input token is only a target).
    target_mask
        ``(n_windows, seq_len - 1)`` bool, the scored positions: ``window_len`` per window
        (all but the first target with a prepended BOS).
    doc_ids
        Per window, the document holding its first stream token.
    offsets
        ``(n_windows,)`` int64 stream offset of each window's first token, increasing.
    window_len, bos_policy, seed, mode
        How the sample was drawn (``mode`` is ``"windows"`` or ``"until_rare"``).
    n_stream_tokens, stream_fingerprint
        Length and BLAKE2 hash of the token stream the windows come from (samples are
        comparable, e.g. for non-overlap, only on the same stream).
    uniform_mask, scoring, max_common
        Which positions are scored (see :mod:`raretoken.data.scoring`): ``scoring="all"``
        scores every window position (``uniform_mask`` is ``None``); ``"rare+common"`` scores
        every rare target and the uniform sample ``uniform_mask`` of positions holding
        ``max_common`` common targets.
    """

    input_ids: np.ndarray
    target_ids: np.ndarray
    target_mask: np.ndarray
    doc_ids: tuple[str, ...]
    offsets: np.ndarray
    window_len: int
    bos_policy: str
    seed: int
    mode: str
    n_stream_tokens: int
    stream_fingerprint: str
    uniform_mask: np.ndarray | None = None
    scoring: str = "all"
    max_common: int | None = None

    def window_mask(self) -> np.ndarray:
        """``(n_windows, seq_len - 1)`` the window's own targets (every position the windows
        could score, whatever :attr:`target_mask` keeps)."""
        mask = np.ones(self.target_ids.shape, dtype=bool)
        if self.bos_policy == "prepend":
            mask[:, 0] = False
        return mask

    def window_positions(self) -> np.ndarray:
        """Flat indices into ``target_ids.ravel()`` of :meth:`window_mask`."""
        return np.flatnonzero(self.window_mask().ravel())

    @property
    def n_windows(self) -> int:
        """Number of windows."""
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        """Length of each input row."""
        return int(self.input_ids.shape[1])

    @property
    def span_len(self) -> int:
        """Stream tokens covered by one window (``window_len + 1``)."""
        return self.window_len + 1

    @property
    def n_positions(self) -> int:
        """Number of scored (window, position) pairs."""
        return int(np.count_nonzero(self.target_mask))

    def positions_where(self, vocab_mask: np.ndarray) -> np.ndarray:
        """Flat indices into ``target_ids.ravel()`` of scored positions whose target is in
        ``vocab_mask`` (a boolean array over the vocabulary, e.g. ``split.masks()[0]``)."""
        mask = np.asarray(vocab_mask, dtype=bool)
        if mask.ndim != 1:
            raise ConfigError("vocab_mask must be a 1-D boolean array over the vocabulary")
        targets = self.target_ids.ravel()
        if targets.size and int(targets.max()) >= mask.size:
            raise ConfigError(
                f"vocab_mask has {mask.size} entries but targets reach id {int(targets.max())}"
            )
        return np.flatnonzero(self.target_mask.ravel() & mask[targets])

    def count_where(self, vocab_mask: np.ndarray) -> int:
        """Number of scored positions whose target is in ``vocab_mask``."""
        return int(self.positions_where(vocab_mask).size)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Arrays for :func:`numpy.savez` (no pickled objects)."""
        return {
            "input_ids": self.input_ids,
            "target_ids": self.target_ids,
            "target_mask": self.target_mask,
            "doc_ids": np.asarray(self.doc_ids, dtype=np.str_),
            "offsets": self.offsets,
            "window_len": np.asarray(self.window_len, dtype=np.int64),
            "bos_policy": np.asarray(self.bos_policy, dtype=np.str_),
            "seed": np.asarray(self.seed, dtype=np.int64),
            "mode": np.asarray(self.mode, dtype=np.str_),
            "n_stream_tokens": np.asarray(self.n_stream_tokens, dtype=np.int64),
            "stream_fingerprint": np.asarray(self.stream_fingerprint, dtype=np.str_),
            "scoring": np.asarray(self.scoring, dtype=np.str_),
            "max_common": np.asarray(-1 if self.max_common is None else self.max_common),
            **({} if self.uniform_mask is None else {"uniform_mask": self.uniform_mask}),
        }

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> ContextSample:
        """Inverse of :meth:`to_arrays` (accepts an open ``np.load`` archive)."""
        return cls(
            input_ids=np.asarray(arrays["input_ids"], dtype=np.int64),
            target_ids=np.asarray(arrays["target_ids"], dtype=np.int64),
            target_mask=np.asarray(arrays["target_mask"], dtype=bool),
            doc_ids=tuple(str(d) for d in np.asarray(arrays["doc_ids"]).ravel()),
            offsets=np.asarray(arrays["offsets"], dtype=np.int64),
            window_len=int(arrays["window_len"]),
            bos_policy=str(arrays["bos_policy"]),
            seed=int(arrays["seed"]),
            mode=str(arrays["mode"]),
            n_stream_tokens=int(arrays["n_stream_tokens"]),
            stream_fingerprint=str(arrays["stream_fingerprint"]),
            uniform_mask=(
                np.asarray(arrays["uniform_mask"], dtype=bool) if "uniform_mask" in arrays else None
            ),
            scoring=str(arrays["scoring"]) if "scoring" in arrays else "all",
            max_common=(
                None
                if "max_common" not in arrays or int(arrays["max_common"]) < 0
                else int(arrays["max_common"])
            ),
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able summary (the token arrays are left out)."""
        return {
            "n_windows": self.n_windows,
            "window_len": self.window_len,
            "seq_len": self.seq_len,
            "n_positions": self.n_positions,
            "bos_policy": self.bos_policy,
            "seed": self.seed,
            "mode": self.mode,
            "n_stream_tokens": self.n_stream_tokens,
            "stream_fingerprint": self.stream_fingerprint,
            "n_documents": len(set(self.doc_ids)),
            "scoring": self.scoring,
            "max_common": self.max_common,
            "n_uniform": (
                self.n_positions
                if self.uniform_mask is None
                else int(np.count_nonzero(self.uniform_mask))
            ),
        }


# --------------------------------------------------------------------------------------------
# stream


@dataclass(frozen=True, eq=False)
class _Stream:
    tokens: np.ndarray  # int32, separators included
    doc_starts: np.ndarray  # int64 start offset of each document
    doc_ids: tuple[str, ...]
    fingerprint: str

    def doc_at(self, offset: int) -> str:
        return self.doc_ids[int(np.searchsorted(self.doc_starts, offset, side="right")) - 1]


def _build_stream(
    docs: Iterable[Document],
    tokenizer: Tokenizer,
    *,
    separator_id: int,
    max_tokens: int,
    progress: bool,
    rare_mask: np.ndarray | None = None,
    n_rare: int = 0,
) -> _Stream:
    """Tokenize ``docs`` into one stream (each document followed by ``separator_id``)."""
    pieces: list[np.ndarray] = []
    starts: list[int] = []
    ids: list[str] = []
    length = 0
    sep = np.asarray([separator_id], dtype=np.int32)
    if rare_mask is None:
        bar = tqdm(
            desc="tokenizing",
            total=max_tokens,
            unit="tok",
            unit_scale=True,
            leave=False,
            disable=not progress,
        )
    else:
        bar = tqdm(
            desc="rare positions", total=n_rare, unit="pos", leave=False, disable=not progress
        )
    rare_seen = 0

    def add(batch: list[Document]) -> bool:
        nonlocal length, rare_seen
        first = len(pieces)
        full = False
        for doc, tokens in zip(
            batch, encode_batch(tokenizer, [d.text for d in batch]), strict=True
        ):
            if tokens.size == 0:
                continue
            piece = np.concatenate([tokens.astype(np.int32), sep])[: max_tokens - length]
            starts.append(length)
            ids.append(doc.doc_id)
            pieces.append(piece)
            length += piece.size
            if length >= max_tokens:
                full = True
                break
        added = pieces[first:]
        if rare_mask is None:
            bar.update(sum(piece.size for piece in added))
        elif added:
            new = np.concatenate(added)
            found = int(np.count_nonzero(rare_mask[new[new < rare_mask.size]]))
            bar.update(min(found, max(n_rare - rare_seen, 0)))
            rare_seen += found
        return full

    try:
        batch: list[Document] = []
        full = False
        for doc in require_nonempty(docs, "the sampling corpus"):
            batch.append(doc)
            if len(batch) >= _ENCODE_BATCH_DOCS:
                full = add(batch)
                batch = []
                if full:
                    break
        if batch and not full:
            add(batch)
    finally:
        bar.close()
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
    digest = hashlib.blake2b(tokens.astype("<i4").tobytes(), digest_size=16).hexdigest()
    logger.info("token stream: %d tokens from %d documents", tokens.size, len(ids))
    return _Stream(tokens, np.asarray(starts, dtype=np.int64), tuple(ids), digest)


def _tiles(n_tokens: int, span: int, phase: int, exclude: ContextSample | None) -> np.ndarray:
    """Start offsets of the non-overlapping tiles at ``phase`` that avoid ``exclude``."""
    starts = np.arange(phase, n_tokens - span + 1, span, dtype=np.int64)
    if exclude is None or exclude.n_windows == 0 or starts.size == 0:
        return starts
    ex = np.sort(exclude.offsets)
    # Excluded windows do not overlap each other, so only the last one starting before a
    # tile's end can reach into it.
    last = np.searchsorted(ex, starts + span, side="left") - 1
    overlaps = (last >= 0) & (ex[np.maximum(last, 0)] + exclude.span_len > starts)
    return starts[~overlaps]


def check_window_settings(
    *, window_len: int, bos_policy: str, max_context: int | None, max_tokens: int
) -> int:
    """Input positions one window needs; :class:`ConfigError` for a bad size or policy, a
    window longer than ``max_context`` or ``max_tokens`` below one window. Both samplers
    check this first; a cached sample is checked against a new model's context with it."""
    if window_len < 1:
        raise ConfigError(f"window_len must be >= 1, got {window_len}")
    if bos_policy not in BOS_POLICIES:
        raise ConfigError(
            f"bos_policy must be one of {', '.join(BOS_POLICIES)}, got {bos_policy!r}"
        )
    seq_len = window_len + 1 + (1 if bos_policy == "prepend" else 0)
    if max_context is not None and seq_len > max_context:
        raise ConfigError(
            f"a window of {window_len} tokens needs {seq_len} input positions"
            f"{' (with BOS)' if bos_policy == 'prepend' else ''}, more than the model "
            f"context of {max_context}"
        )
    if max_tokens < window_len + 1:
        raise ConfigError(f"max_tokens ({max_tokens}) is smaller than one window")
    return seq_len


def _special_id(tokenizer: Tokenizer, given: int | None, attr: str, why: str) -> int:
    value = given if given is not None else getattr(tokenizer, attr, None)
    if value is None:
        raise ConfigError(f"the tokenizer has no {attr.removesuffix('_id')}; {why}")
    return int(value)


@dataclass(frozen=True, eq=False)
class _Draw:
    """A token stream, its usable tiles in seeded random order, and how windows are cut."""

    stream: _Stream
    tiles: np.ndarray  # start offsets of the usable tiles, in the order they are taken
    window_len: int
    bos_policy: str
    bos_id: int | None
    seed: int

    @property
    def span(self) -> int:
        return self.window_len + 1

    def take(self, n_windows: int, mode: str) -> ContextSample:
        """The first ``n_windows`` tiles as a sample (windows sorted by stream offset)."""
        offsets = np.sort(self.tiles[:n_windows].astype(np.int64))
        rows = self.stream.tokens[offsets[:, None] + np.arange(self.span)[None, :]]
        rows = rows.astype(np.int64)
        if self.bos_policy == "prepend":
            assert self.bos_id is not None
            bos = np.full((rows.shape[0], 1), self.bos_id, dtype=np.int64)
            rows = np.concatenate([bos, rows], 1)
        target_ids = rows[:, 1:].copy()
        target_mask = np.ones(target_ids.shape, dtype=bool)
        if self.bos_policy == "prepend":
            target_mask[:, 0] = False
        return ContextSample(
            input_ids=rows,
            target_ids=target_ids,
            target_mask=target_mask,
            doc_ids=tuple(self.stream.doc_at(int(o)) for o in offsets),
            offsets=offsets,
            window_len=self.window_len,
            bos_policy=self.bos_policy,
            seed=int(self.seed),
            mode=mode,
            n_stream_tokens=int(self.stream.tokens.size),
            stream_fingerprint=self.stream.fingerprint,
        )


def _candidate_tiles(
    stream: _Stream, span: int, rng: np.random.Generator, exclude: ContextSample | None
) -> np.ndarray:
    """Usable tile starts in a seeded random order."""
    if exclude is not None and exclude.stream_fingerprint != stream.fingerprint:
        raise ConfigError(
            "exclude_offsets_of was drawn from a different token stream "
            "(other documents, tokenizer, separator or max_tokens)"
        )
    n_tokens = int(stream.tokens.size)
    phase = int(rng.integers(span))
    tiles = _tiles(n_tokens, span, phase, exclude)
    if phase and tiles.size < _tiles(n_tokens, span, 0, exclude).size:
        tiles = _tiles(n_tokens, span, 0, exclude)  # a short stream: keep every possible tile
    return tiles[rng.permutation(tiles.size)]


def _draw(
    docs: Iterable[Document],
    tokenizer: Tokenizer,
    *,
    window_len: int,
    bos_policy: str,
    seed: int,
    max_context: int | None,
    max_tokens: int,
    exclude: ContextSample | None,
    separator_id: int | None,
    bos_id: int | None,
    progress: bool,
    rare_mask: np.ndarray | None = None,
    n_rare: int = 0,
) -> _Draw:
    """Check the settings shared by both samplers, read the stream and order its tiles."""
    check_window_settings(
        window_len=window_len, bos_policy=bos_policy, max_context=max_context, max_tokens=max_tokens
    )
    sep = _special_id(tokenizer, separator_id, "eos_token_id", "pass separator_id")
    bos = (
        _special_id(tokenizer, bos_id, "bos_token_id", "use bos_policy='none' or pass bos_id")
        if bos_policy == "prepend"
        else None
    )
    rng = as_generator(seed)
    stream = _build_stream(
        docs,
        tokenizer,
        separator_id=sep,
        max_tokens=max_tokens,
        progress=progress,
        rare_mask=rare_mask,
        n_rare=n_rare,
    )
    tiles = _candidate_tiles(stream, window_len + 1, rng, exclude)
    return _Draw(stream, tiles, window_len, bos_policy, bos, seed)


def sample_windows(
    docs: Iterable[Document],
    tokenizer: Tokenizer,
    *,
    n_windows: int = 49,
    window_len: int = 512,
    bos_policy: BosPolicy = "none",
    seed: int,
    max_context: int | None = None,
    exclude_offsets_of: ContextSample | None = None,
    max_tokens: int = DEFAULT_MAX_STREAM_TOKENS,
    separator_id: int | None = None,
    bos_id: int | None = None,
    progress: bool = True,
) -> ContextSample:
    """Draw ``n_windows`` non-overlapping windows of ``window_len`` scored targets.

    See the module docstring for the stream, the windows and the draw. With
    ``exclude_offsets_of`` (a sample from the same documents, tokenizer and ``max_tokens``),
    no window overlaps any window of that sample, e.g. for the reference sample of the mean
    activations of eq. (2). ``separator_id`` and ``bos_id`` default to the tokenizer's EOS and
    BOS ids.

    Raises
    ------
    ConfigError
        Invalid sizes or policy, a window longer than ``max_context``, a missing EOS/BOS id,
        or ``exclude_offsets_of`` from another stream.
    CorpusError
        No documents.
    InsufficientDataError
        The stream holds fewer than ``n_windows`` free windows.
    """
    if n_windows < 1:
        raise ConfigError(f"n_windows must be >= 1, got {n_windows}")
    draw = _draw(
        docs,
        tokenizer,
        window_len=window_len,
        bos_policy=bos_policy,
        seed=seed,
        max_context=max_context,
        max_tokens=max_tokens,
        exclude=exclude_offsets_of,
        separator_id=separator_id,
        bos_id=bos_id,
        progress=progress,
    )
    n_tokens, n_tiles = draw.stream.tokens.size, draw.tiles.size
    if n_tiles < n_windows:
        excluded = "" if exclude_offsets_of is None else " outside the excluded sample"
        raise InsufficientDataError(
            f"need {n_windows} windows of {draw.span} tokens but the corpus gave only "
            f"{n_tokens} tokens ({n_tiles} windows{excluded}); "
            "use a larger corpus or fewer/shorter windows"
        )
    sample = draw.take(n_windows, "windows")
    logger.info(
        "sampled %d windows of %d tokens (%d scored positions) from a %d-token stream",
        sample.n_windows,
        window_len,
        sample.n_positions,
        n_tokens,
    )
    return sample


def sample_until_rare(
    docs: Iterable[Document],
    tokenizer: Tokenizer,
    *,
    split: FrequencySplit,
    n_rare: int,
    window_len: int = 512,
    bos_policy: BosPolicy = "none",
    seed: int,
    max_tokens: int = DEFAULT_MAX_STREAM_TOKENS,
    max_context: int | None = None,
    exclude_offsets_of: ContextSample | None = None,
    separator_id: int | None = None,
    bos_id: int | None = None,
    progress: bool = True,
) -> ContextSample:
    """Draw non-overlapping windows until they hold at least ``n_rare`` rare-target positions.

    Windows are the tiles of :func:`sample_windows`, taken in the same seeded random order
    until the scored targets that are rare (``split.rare_ids``) number ``n_rare`` or more;
    the last window may overshoot. The progress bar counts rare positions found while the
    stream (up to ``max_tokens`` tokens) is read.

    Raises
    ------
    ConfigError, CorpusError
        As for :func:`sample_windows`, and ``n_rare`` below 1.
    InsufficientDataError
        The whole stream holds fewer than ``n_rare`` rare positions.
    """
    if n_rare < 1:
        raise ConfigError(f"n_rare must be >= 1, got {n_rare}")
    rare_vocab = split.masks()[0]
    draw = _draw(
        docs,
        tokenizer,
        window_len=window_len,
        bos_policy=bos_policy,
        seed=seed,
        max_context=max_context,
        max_tokens=max_tokens,
        exclude=exclude_offsets_of,
        separator_id=separator_id,
        bos_id=bos_id,
        progress=progress,
        rare_mask=rare_vocab,
        n_rare=n_rare,
    )
    tokens, tiles, span = draw.stream.tokens, draw.tiles, draw.span
    is_rare = np.zeros(tokens.size + 1, dtype=np.int64)
    in_vocab = tokens < rare_vocab.size
    is_rare[1:][in_vocab] = rare_vocab[tokens[in_vocab]]
    cumulative = np.cumsum(is_rare)  # cumulative[i] = rare tokens among tokens[:i]
    per_tile = cumulative[tiles + span] - cumulative[tiles + 1]  # scored targets t_1..t_W
    running = np.cumsum(per_tile)
    found = int(running[-1]) if running.size else 0
    if found < n_rare:
        raise InsufficientDataError(
            f"found {found} rare positions in {tokens.size} tokens ({tiles.size} windows), "
            f"fewer than the {n_rare} requested; use a larger corpus (or a larger "
            "--heldout-fraction), a higher --max-stream-tokens, a smaller --n-rare, or "
            "--sampling windows"
        )
    n_take = int(np.searchsorted(running, n_rare, side="left")) + 1
    sample = draw.take(n_take, "until_rare")
    logger.info(
        "sampled %d windows holding %d rare positions (%d scored positions)",
        sample.n_windows,
        int(running[n_take - 1]),
        sample.n_positions,
    )
    return sample
