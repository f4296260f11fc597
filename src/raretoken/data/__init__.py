"""Corpora, token statistics and context sampling."""

from __future__ import annotations

from raretoken.data.corpus import (
    CorpusSpec,
    Document,
    corpus_identity,
    iter_documents,
    require_nonempty,
)
from raretoken.data.counting import TokenCounts, count_tokens
from raretoken.data.elbow import Elbow, find_elbow
from raretoken.data.heldout import (
    PASSAGE_CHARS,
    heldout_description,
    is_heldout,
    select_documents,
    split_documents,
    split_passages,
)
from raretoken.data.sampling import (
    BosPolicy,
    ContextSample,
    sample_until_rare,
    sample_windows,
)
from raretoken.data.split import FrequencySplit, split_rare_common, sweep_percentiles

__all__ = [
    "PASSAGE_CHARS",
    "BosPolicy",
    "ContextSample",
    "CorpusSpec",
    "Document",
    "Elbow",
    "FrequencySplit",
    "TokenCounts",
    "corpus_identity",
    "count_tokens",
    "find_elbow",
    "heldout_description",
    "is_heldout",
    "iter_documents",
    "require_nonempty",
    "sample_until_rare",
    "sample_windows",
    "select_documents",
    "split_documents",
    "split_passages",
    "split_rare_common",
    "sweep_percentiles",
]
