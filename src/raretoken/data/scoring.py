"""Which positions of the drawn windows are scored: every rare target, a sample of the rest.

Rare targets are a fraction of a percent of running text, so scoring every position of the
windows spends almost all of the ablation on common targets. :func:`score_rare_and_sample`
keeps the windows (the model still reads every token of them as context) but scores only

* every position whose target is rare at ``always_mask`` (the rare ids at the *highest*
  percentile any analysis of the run will use, so that a split at a lower percentile still
  finds *all* its rare targets scored), and
* a seeded **uniform** sample ``S`` of the windows' positions, taken in a random order until
  it holds ``max_common`` positions whose target is common at ``common_mask``.

``S`` is a uniform random sample of *all* positions, whatever their target, so for any split
the common-target positions in ``S`` are a uniform sample of that split's common targets, and
statistics over "all positions" (how neurons co-activate in general) read ``S`` alone. The
ablation cost then grows with the number of rare targets, not with the length of the stream.

The narrowed sample is an ordinary :class:`ContextSample` whose ``target_mask`` marks the
scored positions and whose ``uniform_mask`` marks ``S``; with ``scoring="all"`` (every
position scored) ``uniform_mask`` is ``None`` and every scored position belongs to ``S``.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np

from raretoken._rng import as_generator
from raretoken.data.sampling import ContextSample
from raretoken.errors import ConfigError

logger = logging.getLogger(__name__)

SCORING_MODES: tuple[str, ...] = ("rare+common", "all")


@dataclass(frozen=True)
class ScoringSummary:
    """What the scoring kept of the windows (for the summary and the manifest)."""

    scoring: str
    n_window_positions: int
    n_scored: int
    n_always: int
    n_uniform: int
    n_uniform_common: int
    n_common_available: int
    max_common: int | None

    @property
    def saving(self) -> float:
        """Window positions per scored position (the ablation's cost ratio)."""
        return self.n_window_positions / max(1, self.n_scored)

    def to_dict(self) -> dict[str, object]:
        out = dataclasses.asdict(self)
        out["saving"] = round(self.saving, 3)
        return out


def _vocab_lookup(mask: np.ndarray, ids: np.ndarray, name: str) -> np.ndarray:
    m = np.asarray(mask, dtype=bool)
    if m.ndim != 1:
        raise ConfigError(f"{name} must be a 1-D boolean array over the vocabulary")
    if ids.size and int(ids.max()) >= m.size:
        raise ConfigError(f"{name} has {m.size} entries but targets reach id {int(ids.max())}")
    return m[ids]


def score_rare_and_sample(
    sample: ContextSample,
    *,
    always_mask: np.ndarray,
    common_mask: np.ndarray,
    max_common: int,
    seed: int,
) -> ContextSample:
    """``sample`` scoring every ``always_mask`` target and a uniform sample of positions.

    Parameters
    ----------
    sample
        Windows with every position scored (``uniform_mask`` unset).
    always_mask
        Boolean over the vocabulary: targets scored at every occurrence (the rare ids).
    common_mask
        Boolean over the vocabulary: the common ids whose count in the uniform sample is
        capped at ``max_common``.
    max_common
        Common-target positions in the uniform sample (all of them when the windows hold
        fewer).
    seed
        Seed of the uniform sample's order.

    Raises
    ------
    ConfigError
        ``max_common < 1``, masks of the wrong shape, or a sample already narrowed.
    """
    if max_common < 1:
        raise ConfigError(f"max_common must be >= 1, got {max_common}")
    if sample.uniform_mask is not None:
        raise ConfigError("the sample's scored positions were already narrowed")
    flat_mask = np.asarray(sample.target_mask, dtype=bool).ravel()
    flat_targets = sample.target_ids.ravel()
    candidates = np.flatnonzero(flat_mask)
    targets = flat_targets[candidates]
    always = _vocab_lookup(always_mask, targets, "always_mask")
    common = _vocab_lookup(common_mask, targets, "common_mask")
    rng = as_generator(seed)
    order = rng.permutation(candidates.size)
    # take positions in the random order until max_common of them have a common target
    common_in_order = np.cumsum(common[order])
    n_take = int(np.searchsorted(common_in_order, max_common, side="left")) + 1
    n_take = min(n_take, candidates.size)
    in_uniform = np.zeros(candidates.size, dtype=bool)
    in_uniform[order[:n_take]] = True
    keep = always | in_uniform
    new_mask = np.zeros_like(flat_mask)
    new_mask[candidates[keep]] = True
    uniform = np.zeros_like(flat_mask)
    uniform[candidates[in_uniform]] = True
    shape = sample.target_mask.shape
    narrowed = dataclasses.replace(
        sample,
        target_mask=new_mask.reshape(shape),
        uniform_mask=uniform.reshape(shape),
        scoring="rare+common",
        max_common=int(max_common),
    )
    logger.info(
        "scoring %d of %d window positions: %d always-scored (rare) targets and a uniform "
        "sample of %d positions (%d common targets)",
        int(keep.sum()),
        candidates.size,
        int(always.sum()),
        n_take,
        int(common[in_uniform].sum()),
    )
    return narrowed


def scoring_summary(
    sample: ContextSample, always_mask: np.ndarray, common_mask: np.ndarray
) -> ScoringSummary:
    """Counts of what ``sample`` scores (``scoring="all"`` samples included)."""
    n_window = int(sample.n_windows * sample.window_len)
    flat = np.asarray(sample.target_mask, dtype=bool).ravel()
    targets = sample.target_ids.ravel()
    scored = np.flatnonzero(flat)
    uniform = scored if sample.uniform_mask is None else np.flatnonzero(sample.uniform_mask)
    common = np.asarray(common_mask, dtype=bool)
    window_common = int(np.count_nonzero(common[targets[sample.window_positions()]]))
    return ScoringSummary(
        scoring=sample.scoring,
        n_window_positions=n_window,
        n_scored=int(scored.size),
        n_always=int(np.count_nonzero(np.asarray(always_mask, dtype=bool)[targets[scored]])),
        n_uniform=int(uniform.size),
        n_uniform_common=int(np.count_nonzero(common[targets[uniform]])),
        n_common_available=window_common,
        max_common=sample.max_common,
    )


def uniform_rows(sample: ContextSample) -> np.ndarray:
    """Indices of the scored positions (rows of a capture) that belong to the uniform sample."""
    if sample.uniform_mask is None:
        return np.arange(sample.n_positions, dtype=np.int64)
    flat = np.asarray(sample.target_mask, dtype=bool).ravel()
    return np.flatnonzero(np.asarray(sample.uniform_mask, dtype=bool).ravel()[flat])
