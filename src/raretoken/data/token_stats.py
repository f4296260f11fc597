"""Compatibility facade for the token statistics of paper §3.1 (counts, elbow, split).

The code now lives in one module per concept:

- :mod:`raretoken.data.counting`: unigram counts with the model's tokenizer
  (:class:`TokenCounts`, :func:`count_tokens`, :func:`encode_batch`, :func:`special_token_ids`);
- :mod:`raretoken.data.elbow`: the frequency elbow (:class:`Elbow`, :func:`find_elbow`);
- :mod:`raretoken.data.split`: the rare/common split (:class:`FrequencySplit`,
  :func:`split_rare_common`, :func:`sweep_percentiles`, the tie policies);
- :mod:`raretoken.data.split_checks`: whether a split separates frequencies
  (:func:`check_split`, :func:`diagnose_split`, :class:`SplitDiagnostics` and the criteria).

Every public name is re-exported here, so ``from raretoken.data.token_stats import X`` keeps
working; new code imports from the modules above.
"""

from __future__ import annotations

from raretoken.data.counting import (
    BATCH_MAX_CHARS,
    TokenCounts,
    Tokenizer,
    count_tokens,
    encode_batch,
    special_token_ids,
)
from raretoken.data.elbow import Elbow, find_elbow
from raretoken.data.split import (
    TIE_POLICIES,
    FrequencySplit,
    TiePolicy,
    split_rare_common,
    sweep_percentiles,
)
from raretoken.data.split_checks import (
    MAX_RARE_FRACTION_EXCESS,
    MIN_COMMON_TO_RARE_RATIO,
    MIN_DISTINCT_COUNTS,
    MIN_RARE_POSITIONS,
    MIN_RETAINED_TYPES,
    SplitDiagnostics,
    check_split,
    diagnose_split,
)

__all__ = [
    "BATCH_MAX_CHARS",
    "MAX_RARE_FRACTION_EXCESS",
    "MIN_COMMON_TO_RARE_RATIO",
    "MIN_DISTINCT_COUNTS",
    "MIN_RARE_POSITIONS",
    "MIN_RETAINED_TYPES",
    "TIE_POLICIES",
    "Elbow",
    "FrequencySplit",
    "SplitDiagnostics",
    "TiePolicy",
    "TokenCounts",
    "Tokenizer",
    "check_split",
    "count_tokens",
    "diagnose_split",
    "encode_batch",
    "find_elbow",
    "special_token_ids",
    "split_rare_common",
    "sweep_percentiles",
]
