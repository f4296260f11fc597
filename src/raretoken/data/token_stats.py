"""Unigram token counts, the frequency elbow and the rare/common split (paper §3.1).

The paper defines rare tokens in two stages: (1) drop the "extremely rare" tokens below the
*elbow* of the frequency distribution, found "using a sliding-window detection method";
(2) among the remaining tokens, those whose unigram frequency is below the 15th percentile are
*rare*, those above it are *common*. This module implements both stages on counts made with
the model's own tokenizer (:func:`count_tokens`): :func:`find_elbow` and
:func:`split_rare_common` (:func:`sweep_percentiles` for the robustness sweep over
percentiles).

A percentile split only means something when the counts separate frequencies: too few
types, counts that take a handful of values (repeated text) or a rare set that is one block
of equal counts make "rare" an artefact of ties. :func:`check_split` (applied by
:func:`split_rare_common` unless ``check=False``) refuses such splits with a message that
says what to change; :func:`diagnose_split` reports the same criteria without raising.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from tqdm.auto import tqdm

from raretoken.data.corpus import Document
from raretoken.errors import (
    ConfigError,
    CorpusError,
    InsufficientDataError,
    NumericalError,
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


# --------------------------------------------------------------------------------------------
# counts


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


# --------------------------------------------------------------------------------------------
# elbow


@dataclass(frozen=True, eq=False)
class Elbow:
    """The frequency elbow of a rank-frequency curve (see :func:`find_elbow`).

    Attributes
    ----------
    count_threshold
        Tokens with a count ``>= count_threshold`` are kept (the count at rank ``rank``).
    rank
        Rank (1-based, non-zero counts sorted in decreasing order) of the elbow.
    method
        ``"local-slope"``.
    params
        The parameters used (``points_per_decade``, ``half_window``, ``steepness``, ``body``,
        ``refine``).
    found
        False when no fall-off was detected; the elbow is then the last rank and the
        threshold the smallest non-zero count (only zero counts are dropped).
    n_types
        Number of ids with a non-zero count on the curve (excluded ids left out).
    body_slope, slope_threshold
        Median local slope over the body region, and ``steepness * body_slope``.
    log_rank, detected_log_rank
        ``log10`` rank of the elbow, and of the first grid point of the steep tail (before
        refinement).
    log_rank_grid, log_count_grid, local_slopes
        The evenly spaced ``log10(rank)`` grid, ``log10(count)`` interpolated on it and the
        local least-squares slope around each grid point (for plots).
    """

    count_threshold: float
    rank: int
    method: str
    params: dict[str, Any]
    found: bool
    n_types: int
    body_slope: float
    slope_threshold: float
    log_rank: float
    detected_log_rank: float
    log_rank_grid: np.ndarray = field(repr=False)
    log_count_grid: np.ndarray = field(repr=False)
    local_slopes: np.ndarray = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (arrays as lists; NaN slopes as ``None``)."""
        return {
            "count_threshold": self.count_threshold,
            "rank": self.rank,
            "method": self.method,
            "params": dict(self.params),
            "found": self.found,
            "n_types": self.n_types,
            "body_slope": self.body_slope,
            "slope_threshold": self.slope_threshold,
            "log_rank": self.log_rank,
            "detected_log_rank": self.detected_log_rank,
            "log_rank_grid": self.log_rank_grid.tolist(),
            "log_count_grid": self.log_count_grid.tolist(),
            "local_slopes": [None if math.isnan(s) else s for s in self.local_slopes.tolist()],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Elbow:
        """Inverse of :meth:`to_dict`."""
        params = dict(data["params"])
        if "body" in params:
            params["body"] = tuple(params["body"])
        return cls(
            count_threshold=float(data["count_threshold"]),
            rank=int(data["rank"]),
            method=str(data["method"]),
            params=params,
            found=bool(data["found"]),
            n_types=int(data["n_types"]),
            body_slope=float(data["body_slope"]),
            slope_threshold=float(data["slope_threshold"]),
            log_rank=float(data["log_rank"]),
            detected_log_rank=float(data["detected_log_rank"]),
            log_rank_grid=np.asarray(data["log_rank_grid"], dtype=np.float64),
            log_count_grid=np.asarray(data["log_count_grid"], dtype=np.float64),
            local_slopes=np.asarray(
                [math.nan if s is None else s for s in data["local_slopes"]], dtype=np.float64
            ),
        )


def _ols_slope(x: np.ndarray, y: np.ndarray) -> float:
    xc = x - x.mean()
    denom = float(xc @ xc)
    return float(xc @ (y - y.mean()) / denom) if denom > 0 else math.nan


def _local_slopes(xg: np.ndarray, yg: np.ndarray, half_window: float) -> np.ndarray:
    slopes = np.full(xg.shape, math.nan)
    tol = 1e-9
    for i, centre in enumerate(xg):
        inside = np.abs(xg - centre) <= half_window + tol
        if np.count_nonzero(inside) >= 3:
            slopes[i] = _ols_slope(xg[inside], yg[inside])
    return slopes


def _hinge_sse(x: np.ndarray, y: np.ndarray, xb: float) -> float:
    design = np.column_stack([np.ones_like(x), x, np.maximum(0.0, x - xb)])
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)
    resid = y - design @ coef
    return float(resid @ resid)


def _refine(xg: np.ndarray, yg: np.ndarray, start: int, half_window: float) -> float:
    """Best breakpoint of a continuous two-segment line near grid point ``start``."""
    x0 = xg[start]
    near = (xg >= x0 - 2 * half_window - 1e-9) & (xg <= x0 + 2 * half_window + 1e-9)
    x, y = xg[near], yg[near]
    best_x, best_sse = float(x0), math.inf
    for xb in x[(x >= x0 - half_window - 1e-9) & (x <= x0 + half_window + 1e-9)]:
        if np.count_nonzero(x < xb) < 2 or np.count_nonzero(x > xb) < 2:
            continue
        sse = _hinge_sse(x, y, float(xb))
        if sse < best_sse - 1e-12:
            best_x, best_sse = float(xb), sse
    return best_x


def find_elbow(
    counts: np.ndarray,
    *,
    exclude_ids: Iterable[int] = (),
    points_per_decade: int = 20,
    half_window: float = 0.25,
    steepness: float = 2.0,
    body: tuple[float, float] = (0.2, 0.6),
    refine: bool = True,
) -> Elbow:
    """Find the frequency elbow below which the tail of the rank-frequency curve falls off.

    Method (sliding-window local slopes on the log-log rank-frequency curve):

    1. Sort the non-zero counts (``exclude_ids`` left out) in decreasing order, giving the curve
       ``log10(count)`` against ``log10(rank)``. Tied counts are placed at the right end of
       their block: count ``c`` sits at rank ``R(c)``, the number of types with a count of at
       least ``c`` (the survival function of the type counts). Otherwise the staircase of small
       integer counts (a long run of hapaxes ends every curve) reads as a flattening; with it a
       power law ``R(c) ~ c**(-1/a)`` keeps its slope ``-a`` down to count 1, so a corpus too
       small to reach the end of the vocabulary has no elbow. The curve is resampled by linear
       interpolation on a grid evenly spaced in log-rank (``points_per_decade`` per decade), so
       that every decade weighs the same and the dense high ranks do not dominate.
    2. At every grid point, fit a least-squares line to the grid points within
       ``± half_window`` decades: its slope is the *local slope*.
    3. The *body slope* is the median local slope over the body region, the grid points
       between ``body[0]`` and ``body[1]`` (fractions of the log-rank range). The median
       ignores the flatter head (Zipf-Mandelbrot) and a tail covering less than half the
       region. For natural text it is close to the Zipf exponent, about -1.
    4. A grid point is *steep* when its local slope is below ``steepness * body_slope``
       (twice as steep as the body by default). The tail is the last run of steep grid points
       that reaches the end of the curve, and its first point is the detected elbow. A fall-off
       must last to the end of the curve: a steep stretch that flattens again is not the tail.
    5. With ``refine`` (the default), the elbow moves to the best breakpoint of a continuous
       two-segment line fitted to the grid points within ``± 2 half_window`` of the detected
       point, trying breakpoints within ``± half_window``. This removes the bias of step 4,
       which fires before a sharp break (once enough of the window lies past it).

    The elbow's count threshold is the count at the elbow rank; tokens with a count at least
    that large are kept, so ties at the threshold are all kept even beyond the elbow rank.
    When no grid point is steep at the end of the curve (pure power law), no elbow is found:
    ``found`` is False, the rank is the last one and only zero counts are dropped.

    The paper names only "a sliding-window detection method"; local slopes were chosen over
    maximum curvature or maximum distance to the chord because both of those also react to
    the flat head of a Zipf-Mandelbrot curve and always return a point, even for a pure power
    law.

    Raises
    ------
    ConfigError
        Invalid parameters.
    NumericalError
        Negative or non-finite counts.
    InsufficientDataError
        No non-zero count.
    """
    if points_per_decade < 2:
        raise ConfigError(f"points_per_decade must be >= 2, got {points_per_decade}")
    if not half_window > 0:
        raise ConfigError(f"half_window must be > 0 decades, got {half_window}")
    if not steepness > 1:
        raise ConfigError(f"steepness must be > 1, got {steepness}")
    if not 0 <= body[0] < body[1] <= 1:
        raise ConfigError(f"body must be two fractions 0 <= lo < hi <= 1, got {body}")
    values = np.asarray(counts, dtype=np.float64).ravel()
    if not np.all(np.isfinite(values)) or np.any(values < 0):
        raise NumericalError("token counts must be finite and non-negative")
    keep = np.ones(values.shape, dtype=bool)
    excluded = np.asarray(list(exclude_ids), dtype=np.int64)
    excluded = excluded[(excluded >= 0) & (excluded < values.size)]
    keep[excluded] = False
    nonzero = np.sort(values[keep & (values > 0)])[::-1]
    n_types = int(nonzero.size)
    if n_types == 0:
        raise InsufficientDataError("no token has a non-zero count; cannot find the elbow")
    params: dict[str, Any] = {
        "points_per_decade": points_per_decade,
        "half_window": half_window,
        "steepness": steepness,
        "body": tuple(body),
        "refine": refine,
    }

    # right end of each block of tied counts: rank R(c) = number of types with count >= c
    block_end = np.flatnonzero(np.append(nonzero[1:] != nonzero[:-1], True))
    x = np.log10(block_end + 1.0)
    y = np.log10(nonzero[block_end])
    x_min, x_max = float(x[0]), float(x[-1])
    span = x_max - x_min
    n_grid = max(math.ceil(span * points_per_decade) + 1, 2) if span > 0 else 1
    xg = np.linspace(x_min, x_max, n_grid)
    yg = np.interp(xg, x, y)
    slopes = _local_slopes(xg, yg, half_window)

    lo, hi = x_min + body[0] * span, x_min + body[1] * span
    in_body = (xg >= lo - 1e-9) & (xg <= hi + 1e-9) & ~np.isnan(slopes)
    body_values = slopes[in_body] if np.any(in_body) else slopes[~np.isnan(slopes)]
    body_slope = float(np.median(body_values)) if body_values.size else math.nan
    slope_threshold = steepness * body_slope

    start = n_grid
    if body_values.size and body_slope < 0:
        steep = slopes < slope_threshold  # NaN compares False
        not_steep = np.flatnonzero(~steep)
        start = int(not_steep[-1]) + 1 if not_steep.size else 0
    found = start < n_grid
    if found:
        detected = float(xg[start])
        log_rank = _refine(xg, yg, start, half_window) if refine else detected
        rank = int(np.clip(round(10.0**log_rank), 1, n_types))
    else:
        detected = log_rank = x_max
        rank = n_types
    elbow = Elbow(
        count_threshold=float(nonzero[rank - 1]),
        rank=rank,
        method="local-slope",
        params=params,
        found=found,
        n_types=n_types,
        body_slope=body_slope,
        slope_threshold=slope_threshold,
        log_rank=float(log_rank),
        detected_log_rank=float(detected),
        log_rank_grid=xg,
        log_count_grid=yg,
        local_slopes=slopes,
    )
    logger.info(
        "frequency elbow %s at rank %d of %d (count >= %g kept; body slope %.2f)",
        "found" if found else "not found, keeping all",
        rank,
        n_types,
        elbow.count_threshold,
        body_slope,
    )
    return elbow


# --------------------------------------------------------------------------------------------
# rare / common split


@dataclass(frozen=True, eq=False)
class FrequencySplit:
    """Token ids split into rare, common and excluded (see :func:`split_rare_common`).

    Attributes
    ----------
    percentile
        The percentile (0-100) of retained type counts that separates rare from common.
    rare_threshold
        That percentile's count value (numpy's linear interpolation).
    ties
        How types whose count equals ``rare_threshold`` were assigned (see
        :func:`split_rare_common`).
    rare_max_count
        The largest count of a rare type: rare ids are exactly the retained ids with
        ``count <= rare_max_count``, common ids the retained ids above it.
    elbow
        The frequency elbow used; ids with ``count < elbow.count_threshold`` are excluded.
    rare_ids, common_ids, excluded_ids
        Sorted int64 id arrays partitioning ``range(vocab_size)``. ``excluded_ids`` holds the
        special ids, the ids with zero count and those below the elbow.
    vocab_size
        Size of the vocabulary the ids index.
    n_special, n_zero, n_below_elbow
        How many ids were excluded for each reason (special first, then zero count).
    rare_occurrences, common_occurrences
        Total corpus count of the rare and of the common ids (their share of running text).
    """

    percentile: float
    rare_threshold: float
    ties: str
    rare_max_count: int
    elbow: Elbow
    rare_ids: np.ndarray
    common_ids: np.ndarray
    excluded_ids: np.ndarray
    vocab_size: int
    n_special: int
    n_zero: int
    n_below_elbow: int
    rare_occurrences: int
    common_occurrences: int

    @property
    def n_rare(self) -> int:
        """Number of rare token types."""
        return int(self.rare_ids.size)

    @property
    def n_common(self) -> int:
        """Number of common token types."""
        return int(self.common_ids.size)

    @property
    def n_excluded(self) -> int:
        """Number of excluded token ids."""
        return int(self.excluded_ids.size)

    @property
    def rare_fraction(self) -> float:
        """Fraction of the retained types that are rare (at most ``percentile / 100``)."""
        return self.n_rare / max(self.n_rare + self.n_common, 1)

    def masks(self) -> tuple[np.ndarray, np.ndarray]:
        """Boolean ``(rare, common)`` masks over the vocabulary, each ``(vocab_size,)``."""
        rare = np.zeros(self.vocab_size, dtype=bool)
        common = np.zeros(self.vocab_size, dtype=bool)
        rare[self.rare_ids] = True
        common[self.common_ids] = True
        return rare, common

    def is_rare(self, ids: npt.ArrayLike) -> np.ndarray:
        """Elementwise: whether each id in ``ids`` is rare (any shape)."""
        return np.isin(np.asarray(ids), self.rare_ids)

    def is_common(self, ids: npt.ArrayLike) -> np.ndarray:
        """Elementwise: whether each id in ``ids`` is common (any shape)."""
        return np.isin(np.asarray(ids), self.common_ids)

    def to_dict(self, include_ids: bool = True) -> dict[str, Any]:
        """JSON-able dict; without ``include_ids`` a summary that :meth:`from_dict` refuses."""
        data: dict[str, Any] = {
            "percentile": self.percentile,
            "rare_threshold": self.rare_threshold,
            "ties": self.ties,
            "rare_max_count": self.rare_max_count,
            "vocab_size": self.vocab_size,
            "n_rare": self.n_rare,
            "n_common": self.n_common,
            "n_excluded": self.n_excluded,
            "n_special": self.n_special,
            "n_zero": self.n_zero,
            "n_below_elbow": self.n_below_elbow,
            "rare_fraction": self.rare_fraction,
            "rare_occurrences": self.rare_occurrences,
            "common_occurrences": self.common_occurrences,
            "elbow": self.elbow.to_dict(),
        }
        if include_ids:
            data["rare_ids"] = self.rare_ids.tolist()
            data["common_ids"] = self.common_ids.tolist()
            data["excluded_ids"] = self.excluded_ids.tolist()
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FrequencySplit:
        """Inverse of :meth:`to_dict` (with ``include_ids=True``)."""
        if "rare_ids" not in data:
            raise ConfigError("this frequency split summary has no token ids to rebuild from")
        return cls(
            percentile=float(data["percentile"]),
            rare_threshold=float(data["rare_threshold"]),
            ties=str(data["ties"]),
            rare_max_count=int(data["rare_max_count"]),
            elbow=Elbow.from_dict(data["elbow"]),
            rare_ids=np.asarray(data["rare_ids"], dtype=np.int64),
            common_ids=np.asarray(data["common_ids"], dtype=np.int64),
            excluded_ids=np.asarray(data["excluded_ids"], dtype=np.int64),
            vocab_size=int(data["vocab_size"]),
            n_special=int(data["n_special"]),
            n_zero=int(data["n_zero"]),
            n_below_elbow=int(data["n_below_elbow"]),
            rare_occurrences=int(data["rare_occurrences"]),
            common_occurrences=int(data["common_occurrences"]),
        )


def _check_percentile(percentile: float) -> float:
    try:
        value = float(percentile)
    except (TypeError, ValueError):
        raise ConfigError(f"percentile must be a number in (0, 100), got {percentile!r}") from None
    if not 0 < value < 100:
        raise ConfigError(f"percentile must be in (0, 100), got {percentile}")
    return value


TiePolicy = Literal["nearest", "below", "at-or-below"]
TIE_POLICIES: tuple[str, ...] = ("nearest", "below", "at-or-below")


# --------------------------------------------------------------------------------------------
# does the split separate frequencies?

MIN_RETAINED_TYPES = 50
"""Fewest token types above the elbow for a percentile split (:func:`check_split`).

The robustness sweep goes down to the 5th percentile; with 50 types that percentile still
rests on 2.5 types, and the default 15th on 7.5. Below that a "percentile" is one or two
types. Observed: the synthetic Zipf corpora of the tests keep 108-160 types, the embedded
corpus 5,000-27,000; 2,000 copies of one sentence keep 5-25.
"""

MIN_DISTINCT_COUNTS = 20
"""Fewest distinct count values among the retained types (:func:`check_split`).

Ties are never split, so a percentile can only fall between two distinct count values.
With ``k`` distinct values the blocks of equal counts hold ``1/k`` of the types on average;
for the sweep's 5-point steps between percentiles to move the boundary at all, the average
block must hold at most 5 % of the types, i.e. ``k >= 20``. Observed: test corpora 68-145,
the embedded corpus 313-1,030 (24 already for a single 1,275-token speech); text repeated
2,000 times: 1-17 (every count is a multiple of the number of copies).
"""

MAX_RARE_FRACTION_EXCESS = 0.25
"""Most the rare fraction of retained types may exceed ``percentile / 100`` (:func:`check_split`).

When the percentile falls inside a block of equal counts, the ``"nearest"`` tie policy
takes the whole block as rare if "below" would leave no rare type, however large the block
is: 2,000 copies of a sentence put 5 of 8 types (62 %) in "rare" at the 15th percentile,
all with the same count. Past 25 points above the request (40 % of the types at the 15th
percentile) the rare set is decided by one block of equal counts, not by the percentile.
Observed excess, percentiles 5-25: at most 0.01 on the test corpora and 0.09 on the
embedded corpus once its curve has an elbow (0.3M tokens of speeches, or all of
``embedded:wiki``). Smaller slices without an elbow take all hapaxes as rare whatever the
percentile: 29-32 % of the types at 0.4-0.5M tokens of wiki (excess 0.04-0.17 at the 10th-25th
percentile, accepted; 0.24-0.27 at the 5th, refused at 0.4M tokens) and 40-70 % below 0.1M
tokens (refused). Repeated text: 0.36-0.89 of the types in one block.
"""

MIN_COMMON_TO_RARE_RATIO = 1.5
"""Least ratio of the median common count to the largest rare count (:func:`check_split`).

Rare types must be clearly less frequent than the common types, not just one count below
the boundary. For a Zipf law ``count ~ rank**-a`` the type at the ``p``-th percentile of
counts sits at rank ``(1 - p) R`` of the ``R`` retained types and the median common type at
rank ``(1 - p) R / 2``, so the ratio is ``2**a`` at every percentile: 2 for ``a = 1``; 1.5
admits exponents down to ``a = 0.58`` (natural text has ``a`` near 1). Observed,
percentiles 5-25: 1.96-3.4 on the test corpora (Zipf exponent 1, so about 2), 2.9-4.3 on the
embedded corpus; counts that differ by sampling noise only (300 types with Poisson(1000)
counts) give 1.03-1.04.
"""

MIN_RARE_POSITIONS = 10
"""Fewest rare-target positions for the rare-side regime fit (used by the run).

:func:`raretoken.stats.regimes.bootstrap_regimes` resamples the scored positions (it
refuses fewer than 2) and each neuron's Δloss is their mean. ``n`` positions allow only
``C(2n - 1, n)`` distinct bootstrap resamples: 126 for ``n = 5``, below the 100-200
resamples of the presets, so resamples repeat and the intervals are made of copies; for
``n = 10`` there are 92,378 and the most likely resample (every position once) has
probability ``10! / 10**10 = 3.6e-4``. Ten is also the usual lower bound for a percentile
bootstrap of a mean. It is a floor, not a guarantee of precision: the bootstrap intervals
and plateau membership frequencies report how stable the fit is.
"""


def _ordinal(pct: float) -> str:
    text = f"{pct:g}"
    if text.isdigit() and not 11 <= int(text) % 100 <= 13:
        return text + {"1": "st", "2": "nd", "3": "rd"}.get(text[-1], "th")
    return text + "th"


@dataclass(frozen=True)
class SplitDiagnostics:
    """Whether a rare/common split separates token frequencies (see :func:`check_split`).

    Attributes
    ----------
    percentile
        The requested percentile.
    n_retained
        Token types above the elbow (rare + common).
    n_distinct_counts
        Distinct count values among them.
    n_rare, n_common
        Sizes of the rare and common sets.
    rare_fraction
        ``n_rare / n_retained``.
    rare_max_count
        Largest count of a rare type (0 when there is none).
    n_rare_max_block
        Rare types whose count equals ``rare_max_count`` (the tie block at the boundary).
    common_median_count
        Median count of the common types (NaN when there is none).
    count_ratio
        ``common_median_count / rare_max_count`` (NaN when undefined).
    count_gcd
        Greatest common divisor of the retained counts (> 1 hints at repeated text).
    truncated
        Whether the counts stopped at ``max_tokens``.
    problems
        One phrase per failed criterion (empty: the split passes).
    """

    percentile: float
    n_retained: int
    n_distinct_counts: int
    n_rare: int
    n_common: int
    rare_fraction: float
    rare_max_count: int
    n_rare_max_block: int
    common_median_count: float
    count_ratio: float
    count_gcd: int
    truncated: bool
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        """True when no criterion failed."""
        return not self.problems

    @property
    def remedy(self) -> str:
        """What to change, for :attr:`message`."""
        corpus = (
            "use a larger or more varied frequency corpus (--freq-corpus, or a larger --corpus)"
        )
        if self.truncated:
            corpus = "raise --max-count-tokens or " + corpus
        corpus_bound = (
            self.n_retained < MIN_RETAINED_TYPES or self.n_distinct_counts < MIN_DISTINCT_COUNTS
        )
        return corpus if corpus_bound else corpus + ", or another --percentile"

    @property
    def message(self) -> str:
        """One line: what is wrong and what to change (empty when :attr:`ok`)."""
        if self.ok:
            return ""
        hint = (
            f" (every count is a multiple of {self.count_gcd}: the same text repeated?)"
            if self.count_gcd > 1
            else ""
        )
        return (
            f"the {_ordinal(self.percentile)}-percentile rare/common split does not separate "
            f"token frequencies: {'; '.join(self.problems)}{hint}. To fix: {self.remedy}"
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (NaN as ``None``), with the criteria's thresholds."""
        data: dict[str, Any] = {
            "percentile": self.percentile,
            "n_retained": self.n_retained,
            "n_distinct_counts": self.n_distinct_counts,
            "n_rare": self.n_rare,
            "n_common": self.n_common,
            "rare_fraction": self.rare_fraction,
            "rare_max_count": self.rare_max_count,
            "n_rare_max_block": self.n_rare_max_block,
            "common_median_count": self.common_median_count,
            "count_ratio": self.count_ratio,
            "count_gcd": self.count_gcd,
            "truncated": self.truncated,
            "problems": list(self.problems),
            "criteria": {
                "min_retained_types": MIN_RETAINED_TYPES,
                "min_distinct_counts": MIN_DISTINCT_COUNTS,
                "max_rare_fraction_excess": MAX_RARE_FRACTION_EXCESS,
                "min_common_to_rare_ratio": MIN_COMMON_TO_RARE_RATIO,
            },
        }
        return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in data.items()}


def _diagnose(
    retained_counts: np.ndarray, is_rare: np.ndarray, pct: float, truncated: bool
) -> SplitDiagnostics:
    """Diagnostics of a split given the retained types' counts and which of them are rare."""
    kept = np.asarray(retained_counts, dtype=np.int64)
    rare_counts = kept[is_rare]
    common_counts = kept[~is_rare]
    n_retained, n_rare, n_common = int(kept.size), int(rare_counts.size), int(common_counts.size)
    distinct = np.unique(kept)
    gcd = int(np.gcd.reduce(distinct)) if distinct.size else 0
    rare_max = int(rare_counts.max()) if n_rare else 0
    block = int(np.count_nonzero(rare_counts == rare_max)) if n_rare else 0
    common_median = float(np.median(common_counts)) if n_common else math.nan
    ratio = common_median / rare_max if n_rare and n_common else math.nan
    fraction = n_rare / max(n_retained, 1)

    problems: list[str] = []
    if n_retained < MIN_RETAINED_TYPES:
        problems.append(
            f"only {n_retained} token types are left above the frequency elbow "
            f"(need at least {MIN_RETAINED_TYPES})"
        )
    if distinct.size < MIN_DISTINCT_COUNTS:
        shown = ", ".join(str(int(c)) for c in distinct[:5]) + (
            ", ..." if distinct.size > 5 else ""
        )
        problems.append(
            f"the counts of the {n_retained} types above the elbow take only {distinct.size} "
            f"distinct value{'s' if distinct.size != 1 else ''} ({shown}; need at least "
            f"{MIN_DISTINCT_COUNTS})"
        )
    if n_rare == 0 or n_common == 0:
        problems.append(f"the split leaves {n_rare} rare and {n_common} common token types")
    else:
        limit = pct / 100.0 + MAX_RARE_FRACTION_EXCESS
        if fraction > limit + 1e-12:
            which = "all" if block == n_rare else f"{block} of them"
            problems.append(
                f"{n_rare} of the {n_retained} types ({fraction:.0%}) would be rare, {which} "
                f"with the same count {rare_max}, because the percentile falls in a block of "
                f"equal counts (at most {limit:.0%} may be rare at the {_ordinal(pct)} percentile)"
            )
        if ratio < MIN_COMMON_TO_RARE_RATIO:
            problems.append(
                f"rare counts are not clearly below the common ones: the median common count "
                f"({common_median:g}) is only {ratio:.2f} times the largest rare count "
                f"({rare_max}; need at least {MIN_COMMON_TO_RARE_RATIO:g} times)"
            )
    return SplitDiagnostics(
        percentile=pct,
        n_retained=n_retained,
        n_distinct_counts=int(distinct.size),
        n_rare=n_rare,
        n_common=n_common,
        rare_fraction=fraction,
        rare_max_count=rare_max,
        n_rare_max_block=block,
        common_median_count=common_median,
        count_ratio=ratio,
        count_gcd=gcd,
        truncated=bool(truncated),
        problems=tuple(problems),
    )


def diagnose_split(split: FrequencySplit, counts: TokenCounts) -> SplitDiagnostics:
    """The criteria of :func:`check_split` evaluated on ``split``, without raising.

    Raises
    ------
    ConfigError
        ``counts`` does not cover the split's vocabulary.
    """
    values = np.asarray(counts.counts, dtype=np.int64)
    if values.size != split.vocab_size:
        raise ConfigError(
            f"the counts cover {values.size} ids but the split a vocabulary of {split.vocab_size}"
        )
    ids = np.concatenate([split.rare_ids, split.common_ids])
    is_rare = np.zeros(ids.size, dtype=bool)
    is_rare[: split.rare_ids.size] = True
    return _diagnose(values[ids], is_rare, split.percentile, counts.truncated)


def check_split(split: FrequencySplit, counts: TokenCounts) -> SplitDiagnostics:
    """Refuse a rare/common split that does not separate token frequencies.

    :func:`split_rare_common` applies it by default. The criteria, on the retained types
    (above the elbow), each with its reasoning and the values observed on real and test
    corpora in the constant's documentation:

    - at least :data:`MIN_RETAINED_TYPES` (50) types;
    - at least :data:`MIN_DISTINCT_COUNTS` (20) distinct count values (repeated text has a
      handful: every count is a multiple of the number of copies);
    - a rare set and a common set, both non-empty;
    - a rare fraction of the types at most :data:`MAX_RARE_FRACTION_EXCESS` (0.25) above
      ``percentile / 100`` (a rare set that is one large block of equal counts, not the
      types below the percentile);
    - a median common count at least :data:`MIN_COMMON_TO_RARE_RATIO` (1.5) times the
      largest rare count (rare types clearly less frequent, not one count below the common).

    Real Zipfian text passes with a wide margin (embedded corpus from 0.3M tokens on, every
    percentile 5-25). Too few rare-target *positions* in the context sample is a separate
    check of the run (:data:`MIN_RARE_POSITIONS`).

    Returns
    -------
    SplitDiagnostics
        The diagnostics (all criteria passed), e.g. to record with the run.

    Raises
    ------
    InsufficientDataError
        A criterion failed; the one-line message names every failed criterion and what to
        change (a larger or more varied ``--freq-corpus``, ``--max-count-tokens`` when the
        counts were truncated, another ``--percentile`` when that can help).
    ConfigError
        ``counts`` does not cover the split's vocabulary.
    """
    diagnostics = diagnose_split(split, counts)
    if not diagnostics.ok:
        raise InsufficientDataError(diagnostics.message)
    return diagnostics


def split_rare_common(
    counts: TokenCounts,
    *,
    percentile: float = 15.0,
    elbow: Elbow | None = None,
    exclude_ids: Iterable[int] = (),
    ties: TiePolicy = "nearest",
    check: bool = True,
) -> FrequencySplit:
    """Split the vocabulary into rare and common tokens (paper §3.1, two-stage filter).

    1. Excluded: the special ids (``counts.special_ids`` and ``exclude_ids``), ids never seen,
       and ids below the elbow (``count < elbow.count_threshold``). The elbow is found with
       :func:`find_elbow` (special ids left out of the curve) unless given.
    2. The *rare threshold* ``t`` is the ``percentile``-th percentile of the counts of the
       retained token types, each type counted once (a type percentile, not weighted by
       occurrences; numpy's linear interpolation). Rare tokens are the retained types below
       ``t``, common tokens the rest ("above" the percentile).

    Ties: counts are small integers in the rare range, so many types share the count ``t``
    and "below the percentile" is ambiguous; ``ties`` decides, never splitting types of equal
    count between the two sets:

    - ``"below"``: rare iff ``count < t`` (the paper's wording taken literally; with few
      distinct counts the rare set can be much smaller than ``percentile`` % or empty);
    - ``"at-or-below"``: rare iff ``count <= t``;
    - ``"nearest"`` (default): whichever of the two gives a rare fraction of retained types
      closer to ``percentile`` %, preferring ``"below"`` on a tie and never a choice that
      leaves the rare or the common set empty when the other does not.

    The achieved fraction is ``FrequencySplit.rare_fraction``; neighbouring percentiles can
    give the same split on a small corpus. When the percentile falls inside a large block of
    equal counts, ``"nearest"`` takes the whole block as rare (e.g. 5 of 8 types, all with
    one count, for 2,000 copies of a sentence): with ``check`` such splits are refused.

    With ``check`` (the default) the split must separate token frequencies, by the criteria
    of :func:`check_split` (enough types and distinct counts above the elbow, a rare set
    not much larger than ``percentile`` %, rare counts clearly below the common ones);
    ``check=False`` returns any split with a rare and a common token (for exploration).

    Raises
    ------
    ConfigError
        ``percentile`` not strictly between 0 and 100, or an unknown ``ties`` policy.
    InsufficientDataError
        No token above the elbow, a split with no rare or no common token, or (with
        ``check``) a split that does not separate frequencies: the message says why and
        what to change.
    """
    pct = _check_percentile(percentile)
    if ties not in TIE_POLICIES:
        raise ConfigError(f"ties must be one of {', '.join(TIE_POLICIES)}, got {ties!r}")
    values = np.asarray(counts.counts, dtype=np.int64)
    vocab_size = values.size
    special = np.zeros(vocab_size, dtype=bool)
    extra = [*counts.special_ids, *exclude_ids]
    special_ids = np.asarray([i for i in extra if 0 <= i < vocab_size], dtype=np.int64)
    special[special_ids] = True
    if elbow is None:
        elbow = find_elbow(values, exclude_ids=special_ids.tolist())
    zero = ~special & (values == 0)
    below_elbow = ~special & ~zero & (values < elbow.count_threshold)
    retained = ~special & ~zero & ~below_elbow
    n_retained = int(retained.sum())
    if n_retained == 0:
        raise InsufficientDataError("no token is left above the frequency elbow")
    rare_threshold = float(np.percentile(values[retained], pct))
    strict = retained & (values < rare_threshold)
    inclusive = retained & (values <= rare_threshold)
    if ties == "below":
        rare = strict
    elif ties == "at-or-below":
        rare = inclusive
    else:
        target = pct / 100.0 * n_retained
        options = [m for m in (strict, inclusive) if 0 < int(m.sum()) < n_retained]
        options = options or [strict, inclusive]
        rare = min(options, key=lambda m: abs(int(m.sum()) - target))
    common = retained & ~rare
    if check:
        diagnostics = _diagnose(values[retained], rare[retained], pct, counts.truncated)
        if not diagnostics.ok:
            raise InsufficientDataError(diagnostics.message)
    if not np.any(rare) or not np.any(common):
        raise InsufficientDataError(
            f"the {_ordinal(pct)}-percentile split leaves {int(rare.sum())} rare and "
            f"{int(common.sum())} common token types; use a larger or more varied frequency "
            "corpus (--freq-corpus) or another --percentile"
        )
    split = FrequencySplit(
        percentile=pct,
        rare_threshold=rare_threshold,
        ties=ties,
        rare_max_count=int(values[rare].max()),
        elbow=elbow,
        rare_ids=np.flatnonzero(rare).astype(np.int64),
        common_ids=np.flatnonzero(common).astype(np.int64),
        excluded_ids=np.flatnonzero(~retained).astype(np.int64),
        vocab_size=int(vocab_size),
        n_special=int(special.sum()),
        n_zero=int(zero.sum()),
        n_below_elbow=int(below_elbow.sum()),
        rare_occurrences=int(values[rare].sum()),
        common_occurrences=int(values[common].sum()),
    )
    logger.info(
        "rare/common split at the %gth percentile (rare: count <= %d): "
        "%d rare, %d common, %d excluded",
        pct,
        split.rare_max_count,
        split.n_rare,
        split.n_common,
        split.n_excluded,
    )
    return split


def sweep_percentiles(
    counts: TokenCounts,
    percentiles: Sequence[float] = (5, 10, 15, 20, 25),
    *,
    elbow: Elbow | None = None,
    exclude_ids: Iterable[int] = (),
    ties: TiePolicy = "nearest",
    check: bool = True,
) -> list[FrequencySplit]:
    """:func:`split_rare_common` at each percentile, sharing one elbow (robustness sweep).

    ``check`` applies :func:`check_split` to every split (on by default; the criteria accept
    every percentile 5-25 on Zipfian corpora, see :data:`MAX_RARE_FRACTION_EXCESS`).
    """
    pcts = [_check_percentile(p) for p in percentiles]
    if not pcts:
        raise ConfigError("at least one percentile is needed")
    extra = list(exclude_ids)
    if elbow is None:
        elbow = find_elbow(counts.counts, exclude_ids=[*counts.special_ids, *extra])
    return [
        split_rare_common(
            counts, percentile=p, elbow=elbow, exclude_ids=extra, ties=ties, check=check
        )
        for p in pcts
    ]
