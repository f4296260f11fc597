"""Neuron groups analysed (plateau, top-k by Δloss), rare/common re-splits, random controls.

Groups
------
* **plateau** (the paper's "rare-token neurons", §4.1): the plateau regime of the rare-token
  Δloss rank curve, ``ident.rare_fit.plateau_neurons``.
* **top-k**: the ``k`` neurons of largest rare-token Δloss (``neurons.delta_rare``, ties
  broken by the lower neuron id). Used for robustness and as the fallback when the fit finds
  no plateau, or a plateau of a single neuron (no group statistic is defined for one neuron).
  The default ``k`` is :func:`default_topk`: 1 % of the layer (the paper's plateau size,
  "around 1 % of total"), but at least :data:`MIN_TOPK` = 10 neurons so that ``d_eff / N``,
  a modularity and a Hill fit have something to work with, and at most half the layer so
  that random controls can still be drawn from the rest.

Neuron ids are the columns of the final-layer activation matrix (``0..d_mlp-1``). Groups are
stored sorted by neuron id.

Re-splitting
------------
:func:`split_positions` re-splits the vocabulary at another percentile with
:func:`raretoken.data.split.split_rare_common` (same counts, same elbow and tie policy
as the identification) and maps it onto the scored positions: row ``i`` of ``ident.acts`` is
rare when its target token is rare. :func:`group_for_split` re-derives a group for such a
split: the plateau of :func:`raretoken.stats.regimes.fit_regimes` on the mean ``|ΔL|`` over
the new rare positions (exactly how identification fits it), or the top-k of that mean.

The sweep itself (:func:`~raretoken.analyses.robustness.analyses_for_split`,
:func:`~raretoken.analyses.robustness.robustness_table`) lives in
:mod:`raretoken.analyses.robustness`, because it imports every analysis and the analyses
import this module.

Random controls
---------------
:func:`random_control_groups` draws size-matched groups from the same layer with the
analysed group excluded (:func:`raretoken.stats.baselines.random_groups`); the same draws
serve every group statistic of one run. :func:`random_statistics` evaluates a statistic on
each draw and skips draws where it is undefined (e.g. only dead neurons: zero variance),
counting them; the comparison then uses the remaining draws.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from raretoken.data.split import FrequencySplit, split_rare_common
from raretoken.errors import ConfigError, InsufficientDataError, NumericalError
from raretoken.stats.baselines import random_groups
from raretoken.stats.regimes import fit_regimes
from raretoken.stats.specificity import selective_group, selectivity

from ._tables import frozen

if TYPE_CHECKING:
    from raretoken.run.identification import Identification

logger = logging.getLogger(__name__)

T = TypeVar("T")

MIN_TOPK = 10
TOPK_FRACTION = 0.01

#: Group definitions of the robustness sweep (see :func:`group_for_split`).
DEFINITIONS: tuple[str, ...] = ("plateau", "topk", "selective")

__all__ = [
    "DEFINITIONS",
    "MIN_TOPK",
    "TOPK_FRACTION",
    "NeuronGroup",
    "check_group",
    "default_topk",
    "group_for_split",
    "plateau_group",
    "random_control_groups",
    "random_statistics",
    "split_positions",
    "topk_group",
    "topk_neurons",
]


@dataclass(frozen=True, eq=False)
class NeuronGroup:
    """A group of final-layer neurons and how it was defined.

    Attributes
    ----------
    name:
        Label used in tables (``"plateau"``, ``"top-16"``).
    definition:
        ``"plateau"`` or ``"topk"``.
    neuron_ids:
        Neuron ids (columns of the activation matrix), ascending.
    layer:
        Layer the neurons belong to (``-1``: final MLP).
    fallback:
        ``True`` when a plateau was asked for but the top-k group is used instead.
    note:
        Why (empty when nothing special happened).
    """

    name: str
    definition: str
    neuron_ids: np.ndarray
    layer: int = -1
    fallback: bool = False
    note: str = ""

    @property
    def size(self) -> int:
        return int(self.neuron_ids.size)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "definition": self.definition,
            "neuron_ids": self.neuron_ids.tolist(),
            "layer": self.layer,
            "fallback": self.fallback,
            "note": self.note,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> NeuronGroup:
        return cls(
            name=str(d["name"]),
            definition=str(d["definition"]),
            neuron_ids=frozen(np.asarray(d["neuron_ids"], dtype=np.int64)),
            layer=int(d["layer"]),
            fallback=bool(d["fallback"]),
            note=str(d["note"]),
        )


def check_group(neuron_ids: np.ndarray | list[int], n_neurons: int) -> np.ndarray:
    """Validate a group of neuron ids and return them sorted (``int64``).

    Raises
    ------
    ConfigError
        Non-integer, duplicated or out-of-range ids.
    InsufficientDataError
        Fewer than 2 neurons.
    """
    ids = np.asarray(neuron_ids)
    if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
        raise ConfigError("a neuron group must be a 1-D array of integer neuron ids")
    if ids.size < 2:
        raise InsufficientDataError(f"a neuron group needs >= 2 neurons, got {ids.size}")
    if np.unique(ids).size != ids.size:
        raise ConfigError("a neuron group must not repeat a neuron id")
    if ids.min() < 0 or ids.max() >= n_neurons:
        raise ConfigError(f"neuron ids must lie in [0, {n_neurons}), got {ids.min()}..{ids.max()}")
    return np.sort(ids.astype(np.int64))


def default_topk(n_neurons: int) -> int:
    """``max(10, ceil(1 % of the layer))``, at most half the layer (see module docstring)."""
    k = max(MIN_TOPK, math.ceil(TOPK_FRACTION * n_neurons))
    return max(2, min(k, n_neurons // 2))


def topk_neurons(delta: np.ndarray, k: int, neuron_ids: np.ndarray | None = None) -> np.ndarray:
    """Ids of the ``k`` largest ``delta`` values (ties: lower id first), ascending."""
    d = np.asarray(delta, dtype=np.float64)
    ids = np.arange(d.size) if neuron_ids is None else np.asarray(neuron_ids)
    if not 2 <= k <= d.size:
        raise ConfigError(f"k must be in [2, {d.size}], got {k}")
    if not np.isfinite(d).all():
        raise NumericalError("Δloss contains NaN or infinite values")
    order = np.lexsort((ids, -d))  # primary: -delta, secondary: id
    return np.sort(ids[order[:k]].astype(np.int64))


def topk_group(ident: Identification, k: int | None = None) -> NeuronGroup:
    """The ``k`` neurons of largest rare-token Δloss (default :func:`default_topk`)."""
    n = ident.neurons
    kk = default_topk(n.neuron_ids.size) if k is None else int(k)
    ids = topk_neurons(n.delta_rare, kk, n.neuron_ids)
    return NeuronGroup(name=f"top-{kk}", definition="topk", neuron_ids=frozen(ids), layer=n.layer)


def _plateau_or_topk(
    plateau: np.ndarray, delta: np.ndarray, neuron_ids: np.ndarray, layer: int, k: int | None
) -> NeuronGroup:
    ids = np.sort(np.asarray(plateau, dtype=np.int64))
    if ids.size >= 2:
        return NeuronGroup(
            name="plateau", definition="plateau", neuron_ids=frozen(ids), layer=layer
        )
    kk = default_topk(neuron_ids.size) if k is None else int(k)
    why = "no plateau found" if ids.size == 0 else "the plateau has a single neuron"
    note = f"{why}; fell back to the top-{kk} neurons by rare-token Δloss"
    logger.warning(note)
    return NeuronGroup(
        name=f"top-{kk}",
        definition="topk",
        neuron_ids=frozen(topk_neurons(delta, kk, neuron_ids)),
        layer=layer,
        fallback=True,
        note=note,
    )


def plateau_group(ident: Identification, *, fallback_k: int | None = None) -> NeuronGroup:
    """The plateau neurons, or the top-k group (with ``fallback=True``) when there are < 2."""
    n = ident.neurons
    return _plateau_or_topk(
        ident.rare_fit.plateau_neurons, n.delta_rare, n.neuron_ids, n.layer, fallback_k
    )


def split_positions(
    ident: Identification, percentile: float
) -> tuple[np.ndarray, np.ndarray, FrequencySplit]:
    """Rare and common scored positions (rows of ``ident.acts``) at another percentile.

    Rare positions are every scored position with a rare target (all of them are scored up to
    the run's ``score_percentile``; a higher percentile is refused with
    :class:`InsufficientDataError`, since its rare targets were only sampled); common positions
    are those of the uniform sample of positions (:mod:`raretoken.data.scoring`).

    Returns
    -------
    rare_positions, common_positions, split
    """
    cfg = ident.config
    if ident.sample.scoring != "all" and percentile > cfg.score_percentile:
        raise InsufficientDataError(
            f"the run scored every rare target up to the {cfg.score_percentile:g}th percentile "
            f"only; rerun identification with --score-percentile {percentile:g} to analyse the "
            f"{percentile:g}th"
        )
    split = split_rare_common(ident.counts, percentile=percentile)
    rare_mask, common_mask = split.masks()
    targets = ident.sample.target_ids[ident.sample.target_mask]
    if targets.size != ident.acts.shape[0]:
        raise ConfigError(
            f"the sample scores {targets.size} positions but acts has {ident.acts.shape[0]} rows"
        )
    common = np.intersect1d(np.flatnonzero(common_mask[targets]), ident.uniform_positions)
    return np.flatnonzero(rare_mask[targets]), common, split


def group_for_split(
    ident: Identification,
    rare_positions: np.ndarray,
    definition: str = "plateau",
    *,
    k: int | None = None,
    common_positions: np.ndarray | None = None,
) -> NeuronGroup:
    """Re-derive a group from the rare positions of a split (see module docstring).

    ``definition="plateau"`` falls back to top-k (``fallback=True``) like
    :func:`plateau_group`. ``"selective"`` (needs ``common_positions``) takes as many neurons
    as the plateau (or top-k fallback) of the split, those with the largest residual of log
    Δloss on rare targets regressed on log Δloss on common targets
    (:func:`raretoken.stats.specificity.selectivity`): the neurons that matter for rare
    targets beyond what their importance for every token predicts.
    """
    rare = np.asarray(rare_positions, dtype=np.int64)
    if rare.size < 1:
        raise InsufficientDataError("the split has no rare-target position")
    n = ident.neurons
    delta = _mean_abs_rows(ident.delta, rare)
    if definition == "topk":
        kk = default_topk(n.neuron_ids.size) if k is None else int(k)
        ids = topk_neurons(delta, kk, n.neuron_ids)
        return NeuronGroup(
            name=f"top-{kk}", definition="topk", neuron_ids=frozen(ids), layer=n.layer
        )
    if definition in ("plateau", "selective"):
        fit = fit_regimes(delta, n.neuron_ids)
        group = _plateau_or_topk(fit.plateau_neurons, delta, n.neuron_ids, n.layer, k)
        if definition == "plateau":
            return group
        if common_positions is None:
            raise ConfigError("the 'selective' group needs the split's common positions")
        common = _mean_abs_rows(ident.delta, np.asarray(common_positions, dtype=np.int64))
        ids = selective_group(selectivity(delta, common), group.size)
        return NeuronGroup(
            name=f"selective-{group.size}",
            definition="selective",
            neuron_ids=frozen(np.sort(n.neuron_ids[ids])),
            layer=n.layer,
            note=f"as many neurons as the {group.name}, most rare-selective",
        )
    raise ConfigError(
        f"unknown group definition {definition!r}; expected one of {', '.join(DEFINITIONS)}"
    )


def _mean_abs_rows(delta: np.ndarray, rows: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Column means of ``|delta[rows]|`` in float64, ``chunk`` rows at a time."""
    total = np.zeros(delta.shape[1], dtype=np.float64)
    for i in range(0, rows.size, chunk):
        total += np.abs(np.asarray(delta[rows[i : i + chunk]], dtype=np.float64)).sum(axis=0)
    return total / max(rows.size, 1)


def random_control_groups(
    group: NeuronGroup | np.ndarray,
    n_neurons: int,
    n_random: int,
    *,
    seed: int | np.random.Generator,
) -> np.ndarray:
    """``(n_random, |group|)`` size-matched random groups from the layer, group excluded."""
    ids = group.neuron_ids if isinstance(group, NeuronGroup) else np.asarray(group)
    ids = check_group(ids, n_neurons)
    if n_random < 2:
        raise ConfigError(f"need >= 2 random groups for a baseline, got {n_random}")
    return random_groups(np.arange(n_neurons), ids.size, n_random, exclude=ids, seed=seed)


def random_statistics(
    statistic: Callable[[np.ndarray], T], groups: np.ndarray, *, what: str = "statistic"
) -> tuple[list[T], np.ndarray]:
    """Evaluate ``statistic(group_ids)`` on every row of ``groups``.

    Draws on which the statistic is undefined (:class:`NumericalError` or
    :class:`InsufficientDataError`, e.g. a group of dead neurons) are skipped.

    Returns
    -------
    results, kept
        ``results[i]`` belongs to the draw ``kept[i]`` (row index into ``groups``).

    Raises
    ------
    InsufficientDataError
        Fewer than 2 draws gave a result.
    """
    results: list[T] = []
    kept: list[int] = []
    rows = np.asarray(groups)
    for i, row in enumerate(rows):
        try:
            results.append(statistic(row))
        except (NumericalError, InsufficientDataError) as err:
            logger.debug("random group %d skipped for %s: %s", i, what, err)
            continue
        kept.append(i)
    n_skipped = len(rows) - len(kept)
    if n_skipped:
        logger.warning(
            "%s undefined on %d of %d random groups (skipped)", what, n_skipped, len(rows)
        )
    if len(kept) < 2:
        raise InsufficientDataError(
            f"{what} is defined on only {len(kept)} of {len(rows)} random groups; need >= 2"
        )
    return results, np.asarray(kept, dtype=np.int64)
