"""Does a rare/common split separate token frequencies? (criteria for the split of §3.1)

A percentile split only means something when the counts separate frequencies: too few
types, counts that take a handful of values (repeated text) or a rare set that is one block
of equal counts make "rare" an artefact of ties. :func:`check_split` (applied by
:func:`raretoken.data.split.split_rare_common` unless ``check=False``) refuses such splits
with a message that says what to change; :func:`diagnose_split` reports the same criteria
without raising (:class:`SplitDiagnostics`). The thresholds are the ``MIN_*``/``MAX_*``
constants, each documented with its reasoning and the values observed on real and test
corpora.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from raretoken.data.counting import TokenCounts
from raretoken.errors import ConfigError, InsufficientDataError

if TYPE_CHECKING:
    from raretoken.data.split import FrequencySplit

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
