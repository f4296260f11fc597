"""The rare/common split of the vocabulary (paper §3.1, two-stage filter).

The paper defines rare tokens in two stages: (1) drop the "extremely rare" tokens below the
*elbow* of the frequency distribution (:func:`raretoken.data.elbow.find_elbow`); (2) among
the remaining tokens, those whose unigram frequency is below the 15th percentile are *rare*,
those above it are *common*. :func:`split_rare_common` applies both stages to counts made
with the model's own tokenizer (:func:`raretoken.data.counting.count_tokens`) and returns a
:class:`FrequencySplit`; :func:`sweep_percentiles` is the robustness sweep over percentiles.

Unless ``check=False``, a split that does not separate token frequencies is refused by the
criteria of :mod:`raretoken.data.split_checks`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from raretoken.data.counting import TokenCounts
from raretoken.data.elbow import Elbow, find_elbow
from raretoken.data.split_checks import _diagnose, _ordinal
from raretoken.errors import ConfigError, InsufficientDataError

logger = logging.getLogger(__name__)


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
