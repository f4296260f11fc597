"""Are the rare-token neurons token-frequency neurons? (reviewer check after Stolfo et al. 2024)

Stolfo et al. (2024, *Confidence regulation neurons in language models*) find final-layer
*token frequency neurons*: neurons whose ablation mostly moves the logits along the unigram
(log-frequency) direction, shifting the output towards or away from the unigram distribution.
Such a neuron matters more for rare targets than for common ones for a reason unrelated to any
rare-token specialisation, so the plateau could be made of them. This module measures, for every
neuron of the final layer, how much of its mean-ablation loss effect passes through that
direction (:mod:`raretoken.ablation.frequency`: total effect ``Δ``, frequency-held effect
``Δ_held``, mediated fraction ``1 - mean|Δ_held| / mean|Δ|``) on a seeded subsample of at most
``max_positions`` rare-target and ``max_positions`` common-target positions, and compares the
group with the layer.

Statistics (positions: the rare and common subsamples together, ``"all"``)
------------------------------------------------------------------------
* **Group fraction**: the pooled mediated fraction ``1 - Σ_{i∈G} mean|Δ_held,i| / Σ_{i∈G}
  mean|Δ_i|``, i.e. the ``mean|Δ|``-weighted mean of the members' fractions, so that neurons
  with negligible effects (whose fractions are noise) do not dominate. It is compared with the
  same statistic on size-matched random groups of the layer, group excluded
  (:func:`raretoken.analyses.groups.random_control_groups`), one-sided (greater), empirical
  p-value with the +1 correction (:func:`raretoken.stats.baselines.compare_to_random`).
* **Overlap** of the group with the ``|G|`` neurons of largest frequency-direction effect
  ``mean|Δ| - mean|Δ_held|`` (nats; Stolfo et al.'s "TE - DE_freq"), against its exact
  hypergeometric expectation for a random group (:func:`raretoken.stats.specificity.top_overlap`).
  This score grows with a neuron's total effect, so the plateau (large effects by construction)
  tends to overlap it somewhat even without any frequency mechanism: the overlap alone never
  decides the verdict.

Verdict (``α`` = 0.05 by default): **not distinct** when the group fraction is significantly
above random *and* the overlap is significantly above chance; **distinct** when neither is
significant and the group fraction is below 0.5 (most of the group's effect does not pass
through the unigram direction); **inconclusive** otherwise, and whenever the random groups are
too few for an empirical p below ``α``. The per-neuron fractions are also reported on the rare
and the common subsample separately.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from raretoken._rng import as_generator
from raretoken.ablation.frequency import frequency_effects, mediated_fraction, unigram_direction
from raretoken.ablation.inputs import inputs_from_adapter
from raretoken.data.counting import TokenCounts
from raretoken.errors import ConfigError, InsufficientDataError
from raretoken.stats.baselines import BaselineComparison, compare_to_random
from raretoken.stats.specificity import top_overlap

from ._tables import from_nan_list, frozen, markdown_table, nan_list, opt_float, write_csv
from .groups import check_group, random_control_groups

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from raretoken.models.adapters import ModelAdapter

logger = logging.getLogger(__name__)

__all__ = [
    "DISTINCT",
    "INCONCLUSIVE",
    "NOT_DISTINCT",
    "FrequencyNeuronResult",
    "frequency_analysis",
    "frequency_claim",
    "pooled_fraction",
    "sample_positions",
    "summarize_frequency",
]

DISTINCT = "distinct"
NOT_DISTINCT = "not distinct"
INCONCLUSIVE = "inconclusive"
SUBSETS: tuple[str, ...] = ("all", "rare", "common")
AXES: tuple[str, str] = ("subset", "neuron")
#: Above this pooled fraction the group's effect mostly passes through the unigram direction.
MAJORITY = 0.5


def pooled_fraction(mean_abs_total: np.ndarray, mean_abs_held: np.ndarray, ids: Any) -> float:
    """``1 - Σ_G mean|Δ_held| / Σ_G mean|Δ|`` over the neurons ``ids`` (NaN if ``Σ mean|Δ| = 0``)."""
    t = float(np.sum(np.asarray(mean_abs_total)[ids]))
    h = float(np.sum(np.asarray(mean_abs_held)[ids]))
    return 1.0 - h / t if t > 0.0 else math.nan


@dataclass(frozen=True, eq=False)
class FrequencyNeuronResult:
    """Frequency-direction mediation of every final-layer neuron and of one group.

    Attributes
    ----------
    group_name, group_ids:
        The group (ascending neuron ids).
    subsets, axes, n_positions:
        Row labels of the per-neuron arrays (``"all"``, ``"rare"``, ``"common"``), their axis
        names (``("subset", "neuron")``) and the positions averaged in each row.
    mean_abs_total, mean_abs_held, mediated_fraction:
        ``(len(subsets), n_neurons)``: ``mean|Δ|``, ``mean|Δ_held|`` and
        ``1 - mean|Δ_held| / mean|Δ|`` (NaN where ``mean|Δ| = 0`` or the subset is empty).
    fraction_vs_random:
        Pooled group fraction (``"all"`` positions) against random groups, one-sided greater.
    overlap:
        :meth:`raretoken.stats.specificity.TopOverlap.to_dict` of the group with the top-``|G|``
        neurons by ``mean|Δ| - mean|Δ_held|``.
    alpha, verdict, sentence:
        The level, ``"distinct"`` / ``"not distinct"`` / ``"inconclusive"`` and a plain sentence.
    settings:
        Seed, caps, smoothing, random groups dropped and, when given, the largest difference
        of ``Δ`` from the run's own ablation.
    """

    group_name: str
    group_ids: np.ndarray
    subsets: tuple[str, ...]
    n_positions: tuple[int, ...]
    mean_abs_total: np.ndarray
    mean_abs_held: np.ndarray
    mediated_fraction: np.ndarray
    fraction_vs_random: BaselineComparison
    overlap: Mapping[str, Any]
    alpha: float
    verdict: str
    sentence: str
    settings: Mapping[str, Any]
    axes: tuple[str, str] = AXES

    @property
    def n_neurons(self) -> int:
        return int(self.mean_abs_total.shape[1])

    def row(self, subset: str) -> int:
        """Row index of ``subset`` in the per-neuron arrays."""
        if subset not in self.subsets:
            raise ConfigError(f"unknown subset {subset!r}; expected one of {self.subsets}")
        return self.subsets.index(subset)

    @property
    def frequency_effect(self) -> np.ndarray:
        """``mean|Δ| - mean|Δ_held|`` per neuron on all positions (nats)."""
        r = self.row("all")
        return np.asarray(self.mean_abs_total[r] - self.mean_abs_held[r])

    # ------------------------------------------------------------------ tables
    def to_table(self) -> list[dict[str, Any]]:
        cmp, ov = self.fraction_vs_random, self.overlap
        rows: list[dict[str, Any]] = [
            {
                "check": "pooled mediated fraction, all positions",
                "value": f"{cmp.observed:.3g}",
                "random": f"{cmp.random_mean:.3g} ± {cmp.random_sd:.3g} (n={cmp.n_draws})",
                "p_value": opt_float(cmp.p_value),
            },
            {
                "check": f"overlap with the top-{ov['k']} frequency-effect neurons",
                "value": f"{ov['overlap']} of {ov['group_size']}",
                "random": f"{ov['expected']:.3g} expected",
                "p_value": opt_float(ov["p_value"]),
            },
        ]
        everyone = np.arange(self.n_neurons)
        for name, n in zip(self.subsets, self.n_positions, strict=True):
            r = self.row(name)
            g = pooled_fraction(self.mean_abs_total[r], self.mean_abs_held[r], self.group_ids)
            lay = pooled_fraction(self.mean_abs_total[r], self.mean_abs_held[r], everyone)
            rows.append({
                "check": f"pooled mediated fraction, {name} positions (n={n})",
                "value": "n/a" if math.isnan(g) else f"{g:.3g}",
                "random": "n/a" if math.isnan(lay) else f"{lay:.3g} (whole layer)",
                "p_value": None,
            })  # fmt: skip
        return rows

    def to_markdown(self) -> str:
        head = (
            f"## Are the {self.group_name} neurons token-frequency neurons?\n\n"
            f"Share of each neuron's mean-ablation loss effect that passes through the unigram "
            f"(log-frequency) logit direction (Stolfo et al. 2024): 1 - mean|Δ_held| / mean|Δ|, "
            f"Δ_held with the ablated logits' component along the direction held at its "
            f"original value. Verdict: **{self.verdict}**. {self.sentence}\n\n"
        )
        return head + markdown_table(self.to_table(), ["check", "value", "random", "p_value"])

    def to_csv(self, path: Path | str) -> None:
        write_csv(path, self.to_table())

    def to_dict(self) -> dict[str, Any]:
        return {
            "group_name": self.group_name,
            "group_ids": self.group_ids.tolist(),
            "subsets": list(self.subsets),
            "axes": list(self.axes),
            "n_positions": list(self.n_positions),
            "mean_abs_total": nan_list(self.mean_abs_total),
            "mean_abs_held": nan_list(self.mean_abs_held),
            "mediated_fraction": nan_list(self.mediated_fraction),
            "fraction_vs_random": self.fraction_vs_random.to_dict(),
            "overlap": dict(self.overlap),
            "alpha": self.alpha,
            "verdict": self.verdict,
            "sentence": self.sentence,
            "settings": dict(self.settings),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FrequencyNeuronResult:
        return cls(
            group_name=str(d["group_name"]),
            group_ids=frozen(np.asarray(d["group_ids"], dtype=np.int64)),
            subsets=tuple(str(s) for s in d["subsets"]),
            n_positions=tuple(int(n) for n in d["n_positions"]),
            mean_abs_total=from_nan_list(d["mean_abs_total"], ndim=2),
            mean_abs_held=from_nan_list(d["mean_abs_held"], ndim=2),
            mediated_fraction=from_nan_list(d["mediated_fraction"], ndim=2),
            fraction_vs_random=BaselineComparison.from_dict(d["fraction_vs_random"]),
            overlap=dict(d["overlap"]),
            alpha=float(d["alpha"]),
            verdict=str(d["verdict"]),
            sentence=str(d["sentence"]),
            settings=dict(d["settings"]),
            axes=(str(d["axes"][0]), str(d["axes"][1])),
        )

    # ------------------------------------------------------------------ figure
    def plot(self, ax: Axes | None = None) -> Axes:
        """Mediated fraction vs total effect per neuron: layer, group, top frequency neurons."""
        from raretoken.plotting.analyses import new_axes

        ax = ax if ax is not None else new_axes()
        r = self.row("all")
        x, y = self.mean_abs_total[r], self.mediated_fraction[r]
        ok = np.isfinite(y) & (x > 0)
        ax.scatter(x[ok], y[ok], s=4, c="0.7", label="all neurons")
        top = np.asarray(self.overlap["top_ids"], dtype=np.int64)
        top = top[ok[top]]
        ax.scatter(x[top], y[top], s=16, marker="s", facecolors="none",
                   edgecolors="tab:green", label="top frequency-effect")  # fmt: skip
        g = self.group_ids[ok[self.group_ids]]
        ax.scatter(x[g], y[g], s=10, c="tab:red", label=self.group_name)
        ax.axhline(self.fraction_vs_random.observed, color="tab:red", lw=1, ls="--",
                   label=f"{self.group_name} pooled")  # fmt: skip
        ax.axhline(self.fraction_vs_random.random_mean, color="0.3", lw=1, ls=":",
                   label="random groups, mean")  # fmt: skip
        if ok.any():
            ax.set_xscale("log")
        ax.set_xlabel("mean |Δloss| of mean ablation (nats)")
        ax.set_ylabel("mediated fraction 1 - mean|Δ_held| / mean|Δ|")
        ax.set_title(f"unigram-direction mediation: {self.verdict}")
        ax.legend(fontsize=7, loc="best")
        return ax


# ---------------------------------------------------------------------------------- verdict


def _verdict(cmp: BaselineComparison, overlap: Mapping[str, Any], alpha: float) -> tuple[str, str]:
    frac, ov_p = cmp.observed, float(overlap["p_value"])
    if not 1.0 / (cmp.n_draws + 1.0) < alpha:
        return INCONCLUSIVE, (
            f"With {cmp.n_draws} random groups no empirical p-value can fall below α = {alpha:g}."
        )
    high, shared = cmp.p_value < alpha, ov_p < alpha
    if high and shared:
        return NOT_DISTINCT, (
            f"The group's loss effect passes through the unigram direction more than random "
            f"groups' ({frac:.2f} vs {cmp.random_mean:.2f}, p={cmp.p_value:.2g}) and the group "
            f"overlaps the strongest frequency-direction neurons (p={ov_p:.2g}): on this run the "
            "rare-token neurons are not distinct from token-frequency neurons."
        )
    if not high and not shared and frac < MAJORITY:
        return DISTINCT, (
            f"Only {frac:.0%} of the group's loss effect passes through the unigram direction, "
            f"not more than for random groups ({cmp.random_mean:.0%}, p={cmp.p_value:.2g}), and "
            f"the overlap with the strongest frequency-direction neurons is at chance level "
            f"(p={ov_p:.2g}): on this run the rare-token neurons are distinct from "
            "token-frequency neurons."
        )
    return INCONCLUSIVE, (
        f"Mixed evidence: mediated fraction {frac:.2f} vs random {cmp.random_mean:.2f} "
        f"(p={cmp.p_value:.2g}), overlap with the strongest frequency-direction neurons "
        f"p={ov_p:.2g}."
    )


def frequency_claim(res: FrequencyNeuronResult) -> dict[str, Any]:
    """The claims-table row of this check (the shape of ``raretoken.analyses.claims.Claim``)."""
    cmp, ov = res.fraction_vs_random, res.overlap
    verdict = {DISTINCT: "supported", NOT_DISTINCT: "not supported"}.get(res.verdict,
                                                                          "inconclusive")  # fmt: skip
    return {
        "key": "frequency_neurons",
        "claim": "The rare-token neurons are not token-frequency neurons (Stolfo et al. 2024; "
        "reviewer check)",
        "prediction": "the group's loss effect passes through the unigram (log-frequency) logit "
        "direction no more than random groups' does, and the group does not overlap the "
        "neurons of largest frequency-direction effect",
        "finding": f"pooled mediated fraction {cmp.observed:.3g} vs random {cmp.random_mean:.3g} "
        f"± {cmp.random_sd:.3g} (n={cmp.n_draws}, z={cmp.z_score:+.2f}); {ov['overlap']} of "
        f"{ov['group_size']} among the top-{ov['k']} frequency-direction neurons (random: "
        f"{ov['expected']:.3g}, p={ov['p_value']:.3g}); {res.verdict}",
        "test": "empirical p, pooled mediated fraction vs random groups, one-sided (greater); "
        "hypergeometric overlap; rule in raretoken.analyses.frequency",
        "p_value": opt_float(cmp.p_value),
        "p_bh": None,  # filled in when the claims table adjusts its p-values together
        "verdict": verdict,
        "verdict_matched": None,
    }


# ---------------------------------------------------------------------------------- analysis


def sample_positions(
    rare_positions: np.ndarray,
    common_positions: np.ndarray,
    max_positions: int | None,
    seed: int | np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """At most ``max_positions`` rows of each kind, drawn without replacement, ascending."""
    if max_positions is not None and max_positions < 1:
        raise ConfigError(f"max_positions must be >= 1, got {max_positions}")
    rng = as_generator(seed)
    out = []
    for rows in (rare_positions, common_positions):
        r = np.asarray(rows, dtype=np.int64).ravel()
        if max_positions is not None and r.size > max_positions:
            r = rng.choice(r, size=max_positions, replace=False)
        out.append(np.sort(r))
    if out[0].size + out[1].size == 0:
        raise InsufficientDataError("no rare- or common-target positions to ablate")
    return out[0], out[1]


def summarize_frequency(
    total: np.ndarray,
    held: np.ndarray,
    subset_rows: Mapping[str, np.ndarray],
    group_ids: np.ndarray,
    *,
    n_random: int,
    seed: int | np.random.Generator,
    group_name: str = "plateau",
    alpha: float = 0.05,
    settings: Mapping[str, Any] | None = None,
) -> FrequencyNeuronResult:
    """Group statistics from per-(position, neuron) ``Δ`` and ``Δ_held`` (all neurons).

    ``subset_rows`` maps ``"all"``, ``"rare"``, ``"common"`` to rows of ``total``/``held``
    (``"all"`` decides the verdict and must not be empty).
    """
    t, h = np.asarray(total, dtype=np.float64), np.asarray(held, dtype=np.float64)
    if t.ndim != 2 or t.shape != h.shape:
        raise ConfigError(f"total and held must be 2-D of one shape, got {t.shape}, {h.shape}")
    n_neurons = int(t.shape[1])
    ids = np.asarray(group_ids)
    if ids.size > n_neurons:
        raise ConfigError(f"a group of {ids.size} neurons is larger than the layer ({n_neurons})")
    ids = check_group(ids, n_neurons)
    if 2 * ids.size > n_neurons:
        raise InsufficientDataError(
            f"a group of {ids.size} of {n_neurons} neurons leaves too few for size-matched "
            "random groups"
        )
    if not 0.0 < alpha < 1.0:
        raise ConfigError(f"alpha must be in (0, 1), got {alpha}")
    shape = (len(SUBSETS), n_neurons)
    m_t, m_h = np.full(shape, np.nan), np.full(shape, np.nan)
    counts = []
    for r, name in enumerate(SUBSETS):
        rows = np.asarray(subset_rows.get(name, np.zeros(0)), dtype=np.int64)
        counts.append(int(rows.size))
        if rows.size:
            m_t[r], m_h[r] = np.abs(t[rows]).mean(0), np.abs(h[rows]).mean(0)
        elif name == "all":
            raise InsufficientDataError("no positions to average the effects over")
    groups = random_control_groups(ids, n_neurons, n_random, seed=seed)
    rand = np.array([pooled_fraction(m_t[0], m_h[0], g) for g in groups])
    kept = np.isfinite(rand)
    if kept.sum() < 2:
        raise InsufficientDataError("the mediated fraction is undefined on the random groups")
    if not kept.all():
        logger.warning("frequency: %d random groups with no effect dropped", int((~kept).sum()))
    observed = pooled_fraction(m_t[0], m_h[0], ids)
    if math.isnan(observed):
        raise InsufficientDataError(f"the {group_name} neurons have no ablation effect at all")
    cmp = compare_to_random(observed, rand[kept], alternative="greater")
    effect = m_t[0] - m_h[0]
    ov = top_overlap(ids, effect, n_neurons, group_name=group_name,
                     score_name="frequency-direction effect")  # fmt: skip
    verdict, sentence = _verdict(cmp, ov.to_dict(), alpha)
    return FrequencyNeuronResult(
        group_name=group_name,
        group_ids=frozen(ids),
        subsets=SUBSETS,
        n_positions=tuple(counts),
        mean_abs_total=frozen(m_t),
        mean_abs_held=frozen(m_h),
        mediated_fraction=frozen(mediated_fraction(m_t, m_h)),
        fraction_vs_random=cmp,
        overlap=ov.to_dict(),
        alpha=float(alpha),
        verdict=verdict,
        sentence=sentence,
        settings={**dict(settings or {}), "n_random_dropped": int((~kept).sum())},
    )


def frequency_analysis(
    adapter: ModelAdapter,
    mean_acts: np.ndarray | torch.Tensor,
    resid: np.ndarray,
    acts: np.ndarray,
    targets: np.ndarray,
    rare_positions: np.ndarray,
    common_positions: np.ndarray,
    counts: TokenCounts | np.ndarray,
    group_ids: np.ndarray,
    *,
    n_random: int,
    seed: int,
    max_positions: int | None = 256,
    group_name: str = "plateau",
    alpha: float = 0.05,
    pseudo_count: float = 1.0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    reference_delta: np.ndarray | None = None,
    progress: Callable[[int], None] | None = None,
    uniform_positions: np.ndarray | None = None,
) -> FrequencyNeuronResult:
    """Frequency-direction mediation of every final-layer neuron and of ``group_ids``.

    Parameters
    ----------
    adapter, mean_acts:
        The model's adapter (final norm, unembedding, ``w_out`` of the last layer) and the
        ``(d_mlp,)`` mean activations the neurons are ablated to (those of the run).
    resid, acts, targets:
        ``(n_positions, ·)`` captured final residuals, activations and target ids; only the
        sampled rows are read (memory maps are fine).
    rare_positions, common_positions:
        Rows of rare- and common-target positions.
    counts:
        Token counts of the counted corpus (:func:`raretoken.ablation.frequency.unigram_direction`,
        add-``pseudo_count`` smoothing).
    group_ids:
        The group (e.g. the plateau).
    n_random, seed:
        Random groups and the seed of the position subsample and the groups.
    max_positions:
        Cap on the rare and on the common positions each (``None``: all).
    reference_delta:
        The run's own ``(n_positions, d_mlp)`` ablation Δloss (optional): the largest
        difference from it on the sampled rows is recorded in ``settings``.
    uniform_positions:
        Rows of a uniform sample of positions (``Identification.uniform_positions``). Given,
        ``"all"`` (which decides the verdict) is a seeded draw of at most ``max_positions`` of
        them — the general text, as for Stolfo et al.'s frequency neurons — and ``"common"``
        its common-target rows; otherwise ``"all"`` is the rare and common rows together.
    """
    ss_pos, ss_groups = np.random.SeedSequence(int(seed)).spawn(2)
    if uniform_positions is None:
        rare, second = sample_positions(
            rare_positions, common_positions, max_positions, np.random.default_rng(ss_pos)
        )
        common_in_second = np.ones(second.size, dtype=bool)
    else:
        # the second draw is from the uniform sample of positions: it stands for "all"
        # positions (and its common-target rows for the common ones)
        rare, second = sample_positions(
            rare_positions, uniform_positions, max_positions, np.random.default_rng(ss_pos)
        )
        common_in_second = np.isin(second, np.asarray(common_positions, dtype=np.int64))
    rows = np.concatenate([rare, second])
    order = np.argsort(rows, kind="stable")
    sorted_rows = rows[order]  # memory maps read fastest in order
    inv = np.empty_like(order)
    inv[order] = np.arange(order.size)

    def take(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(a[sorted_rows])[inv])

    w_u = adapter.unembedding()[0]
    inputs = inputs_from_adapter(
        adapter, take(resid), take(acts), take(targets).long(),
        torch.as_tensor(np.asarray(mean_acts)),
    ).to(device, dtype)  # fmt: skip
    direction = unigram_direction(counts, int(w_u.shape[0]), pseudo_count=pseudo_count)
    eff = frequency_effects(inputs, direction, progress=progress)
    settings: dict[str, Any] = {
        "seed": int(seed),
        "max_positions": max_positions,
        "pseudo_count": float(pseudo_count),
        "n_random": int(n_random),
        "dtype": str(dtype).replace("torch.", ""),
        "direction": "log(count + pseudo_count) over the vocabulary, centred, unit norm",
    }
    if reference_delta is not None:
        ref = np.asarray(reference_delta[sorted_rows], dtype=np.float64)[inv]
        settings["max_abs_diff_vs_reference"] = float(np.abs(ref - eff.total).max())
    n_r = rare.size
    second_rows = np.arange(n_r, rows.size)
    subsets = {
        "all": second_rows if uniform_positions is not None else np.arange(rows.size),
        "rare": np.arange(n_r),
        "common": second_rows[common_in_second],
    }
    settings["all_positions"] = (
        "a uniform sample of positions"
        if uniform_positions is not None
        else "the rare- and common-target rows together"
    )
    return summarize_frequency(
        eff.total, eff.held, subsets,
        group_ids, n_random=n_random, seed=np.random.default_rng(ss_groups),
        group_name=group_name, alpha=alpha, settings=settings,
    )  # fmt: skip
