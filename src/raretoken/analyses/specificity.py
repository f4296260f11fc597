"""Reviewer checks on the group itself: are the neurons rare-*specific*, and do they replicate?

Two questions come before any claim about how rare-token neurons are organised:

Rare-specificity
    A neuron whose ablation hurts every prediction is not a *rare-token* neuron. On the group
    (the plateau, or the top-k fallback) this reports

    * the overlap with the same number of neurons with the largest Δloss on *common* targets,
      against its exact hypergeometric expectation for a random group
      (:func:`raretoken.stats.specificity.top_overlap`);
    * a per-neuron selectivity: the residual of ``log10 Δloss_rare`` regressed on
      ``log10 Δloss_common`` over all neurons (:func:`raretoken.stats.specificity.selectivity`;
      positive = more important for rare targets than the neuron's importance for common ones
      predicts), the group's mean residual against size-matched random groups (empirical
      one-sided p), and the Spearman ρ of rare vs common Δloss over all neurons;
    * the ``selective`` group: as many neurons as the group, those with the largest residual
      (:func:`raretoken.stats.specificity.selective_group`; a group definition of the
      robustness sweep too).

    Verdict (``α = 0.05``): *supported* when the group's mean residual is significantly above
    random and at most half of the group is among the top common neurons; *not supported*
    when more than half is, or when the mean residual is at or below the random mean;
    *inconclusive* otherwise.

Replication
    The scored rare-target positions are split by window into two seeded halves, the plateau
    is identified on each, and the overlap (Jaccard against its exact expectation) and the
    Spearman ρ of the two halves' Δloss are reported
    (:func:`raretoken.stats.replication.replicate_plateau`, which states the rule).
    Verdict: *supported* when the plateau replicates by that rule; *not supported* when both
    halves have a plateau that does not, or one half has none while the full sample does;
    *inconclusive* when the full sample has no plateau (the top-k fallback) or there are too
    few windows.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from raretoken.errors import InsufficientDataError
from raretoken.stats._common import frozen
from raretoken.stats.baselines import BaselineComparison, compare_to_random
from raretoken.stats.replication import replicate_plateau
from raretoken.stats.specificity import selective_group, selectivity, top_overlap

from ._tables import markdown_table, opt_float, write_csv
from .groups import NeuronGroup, random_control_groups

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from raretoken.run.identification import Identification

logger = logging.getLogger(__name__)

__all__ = ["SpecificityResult", "analyze_specificity", "window_ids_of_positions"]


def window_ids_of_positions(ident: Identification, positions: np.ndarray) -> np.ndarray:
    """Window index of each scored position (rows of the captured arrays)."""
    return np.asarray(ident.position_windows[np.asarray(positions, dtype=np.int64)], np.int64)


def _num(v: float | None, fmt: str = ".3f") -> str:
    return "n/a" if v is None else format(v, fmt)


@dataclass(frozen=True, eq=False)
class SpecificityResult:
    """Rare-specificity and split-half replication of one group (see the module docstring).

    Per-neuron arrays (``log_rare``, ``log_common``, ``residual``) are indexed by neuron id;
    ``overlap`` and ``replication`` are the ``to_dict()`` of the statistics' results.
    """

    group_name: str
    group_ids: np.ndarray
    selective_ids: np.ndarray
    log_rare: np.ndarray
    log_common: np.ndarray
    residual: np.ndarray
    slope: float
    intercept: float
    r_squared: float
    spearman_rho: float
    residual_vs_random: BaselineComparison
    overlap: Mapping[str, Any]
    replication: Mapping[str, Any] | None
    replication_note: str
    full_sample_has_plateau: bool

    # ------------------------------------------------------------------ verdict inputs
    @property
    def overlap_fraction(self) -> float:
        return float(self.overlap["fraction"])

    @property
    def replicates(self) -> bool | None:
        """``None`` when replication could not be assessed."""
        return None if self.replication is None else bool(self.replication["replicates"])

    # ------------------------------------------------------------------ tables
    def to_table(self) -> list[dict[str, Any]]:
        cmp = self.residual_vs_random
        ov = self.overlap
        rows: list[dict[str, Any]] = [
            {
                "check": "overlap with the top common-Δloss neurons",
                "value": f"{ov['overlap']} of {ov['group_size']} ({100 * ov['fraction']:.0f}%)",
                "random": f"{ov['expected']:.3g} expected",
                "p_value": opt_float(ov["p_value"]),
            },
            {
                "check": "mean selectivity residual (decades)",
                "value": f"{cmp.observed:+.3g}",
                "random": f"{cmp.random_mean:+.3g} ± {cmp.random_sd:.3g} (n={cmp.n_draws})",
                "p_value": opt_float(cmp.p_value),
            },
            {
                "check": "Spearman ρ, rare vs common Δloss (all neurons)",
                "value": f"{self.spearman_rho:.3f}",
                "random": "",
                "p_value": None,
            },
        ]
        rep = self.replication
        if rep is not None and rep.get("jaccard") is not None:
            rows.append(
                {
                    "check": "split-half plateau overlap (Jaccard)",
                    "value": f"{rep['jaccard']:.3f} (sizes {len(rep['plateau_a'])}, "
                    f"{len(rep['plateau_b'])})",
                    "random": f"{rep['expected_jaccard']:.3g} expected",
                    "p_value": opt_float(rep["p_value"]),
                }
            )
        if rep is not None:
            rows.append(
                {
                    "check": "split-half Δloss rank agreement (Spearman ρ)",
                    "value": _num(rep["spearman_rho"]),
                    "random": "",
                    "p_value": opt_float(rep["spearman_p"]),
                }
            )
        return rows

    def to_markdown(self) -> str:
        head = (
            f"## Is the {self.group_name} rare-specific, and does it replicate?\n\n"
            f"{len(self.group_ids)} neurons; the `selective` group (largest residual of log "
            f"Δloss_rare on log Δloss_common, slope {self.slope:.3f}, R² "
            f"{self.r_squared:.3f}) shares {np.intersect1d(self.group_ids, self.selective_ids).size}"
            f" of them. Replication: {self.replication_note}\n\n"
        )
        return head + markdown_table(self.to_table(), ["check", "value", "random", "p_value"])

    def to_csv(self, path: Path | str) -> None:
        write_csv(path, self.to_table())

    def to_dict(self) -> dict[str, Any]:
        def floats(a: np.ndarray) -> list[float | None]:
            return [opt_float(v) for v in np.asarray(a, dtype=np.float64)]

        return {
            "group_name": self.group_name,
            "group_ids": self.group_ids.tolist(),
            "selective_ids": self.selective_ids.tolist(),
            "log_rare": floats(self.log_rare),
            "log_common": floats(self.log_common),
            "residual": floats(self.residual),
            "slope": self.slope,
            "intercept": self.intercept,
            "r_squared": self.r_squared,
            "spearman_rho": self.spearman_rho,
            "residual_vs_random": self.residual_vs_random.to_dict(),
            "overlap": dict(self.overlap),
            "replication": None if self.replication is None else dict(self.replication),
            "replication_note": self.replication_note,
            "full_sample_has_plateau": self.full_sample_has_plateau,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SpecificityResult:
        def arr(key: str) -> np.ndarray:
            return frozen(np.asarray([math.nan if v is None else v for v in d[key]], float))

        return cls(
            group_name=str(d["group_name"]),
            group_ids=frozen(np.asarray(d["group_ids"], dtype=np.int64)),
            selective_ids=frozen(np.asarray(d["selective_ids"], dtype=np.int64)),
            log_rare=arr("log_rare"),
            log_common=arr("log_common"),
            residual=arr("residual"),
            slope=float(d["slope"]),
            intercept=float(d["intercept"]),
            r_squared=float(d["r_squared"]),
            spearman_rho=float(d["spearman_rho"]),
            residual_vs_random=BaselineComparison.from_dict(d["residual_vs_random"]),
            overlap=dict(d["overlap"]),
            replication=None if d["replication"] is None else dict(d["replication"]),
            replication_note=str(d["replication_note"]),
            full_sample_has_plateau=bool(d["full_sample_has_plateau"]),
        )

    # ------------------------------------------------------------------ figure
    def plot(self, ax: Axes | None = None) -> Axes:
        """log Δloss on rare vs common targets, the fitted line, the group and the selective."""
        from raretoken.plotting.analyses import new_axes

        ax = ax if ax is not None else new_axes()
        ax.scatter(self.log_common, self.log_rare, s=4, c="0.7", label="all neurons")
        sel = self.selective_ids
        ax.scatter(self.log_common[sel], self.log_rare[sel], s=14, marker="s",
                   facecolors="none", edgecolors="tab:green", label="selective")  # fmt: skip
        g = self.group_ids
        ax.scatter(self.log_common[g], self.log_rare[g], s=10, c="tab:red",
                   label=self.group_name)  # fmt: skip
        x = np.linspace(np.nanmin(self.log_common), np.nanmax(self.log_common), 50)
        ax.plot(x, self.intercept + self.slope * x, "k--", lw=1, label="fit over all neurons")
        ax.set_xlabel("log10 Δloss, common targets")
        ax.set_ylabel("log10 Δloss, rare targets")
        ax.set_title(f"rare vs common Δloss (ρ = {self.spearman_rho:.2f})")
        ax.legend(fontsize=7, loc="upper left")
        return ax


def analyze_specificity(
    ident: Identification,
    group: NeuronGroup,
    *,
    n_random: int,
    seed: int,
    n_random_replication: int = 1000,
) -> SpecificityResult:
    """Rare-specificity and split-half replication of ``group`` on an identification."""
    n = ident.neurons
    n_neurons = int(n.neuron_ids.size)
    ids = np.asarray(group.neuron_ids, dtype=np.int64)
    ov = top_overlap(ids, n.delta_common, n_neurons, group_name=group.name,
                     score_name="common-target Δloss")  # fmt: skip
    sel = selectivity(n.delta_rare, n.delta_common)
    groups = random_control_groups(ids, n_neurons, n_random, seed=seed)
    random_means = sel.residual[groups].mean(axis=1)
    cmp = compare_to_random(float(sel.residual[ids].mean()), random_means, alternative="greater")
    chosen = selective_group(sel, ids.size)

    rep_dict: Mapping[str, Any] | None = None
    rare = np.asarray(ident.rare_positions, dtype=np.int64)
    try:
        rep = replicate_plateau(
            np.abs(np.asarray(ident.delta[rare], dtype=np.float32)),
            window_ids_of_positions(ident, rare),
            seed,
            n_random=n_random_replication,
        )
        rep_dict = rep.to_dict()
        note = rep.note
    except InsufficientDataError as exc:
        note = f"not assessed ({exc})"
        logger.warning("replication not assessed: %s", exc)
    return SpecificityResult(
        group_name=group.name,
        group_ids=frozen(ids),
        selective_ids=frozen(np.asarray(chosen, dtype=np.int64)),
        log_rare=frozen(np.asarray(sel.log_rare, dtype=np.float64)),
        log_common=frozen(np.asarray(sel.log_common, dtype=np.float64)),
        residual=frozen(np.asarray(sel.residual, dtype=np.float64)),
        slope=float(sel.slope),
        intercept=float(sel.intercept),
        r_squared=float(sel.r_squared),
        spearman_rho=float(sel.spearman_rho),
        residual_vs_random=cmp,
        overlap=ov.to_dict(),
        replication=rep_dict,
        replication_note=note,
        full_sample_has_plateau=bool(ident.rare_fit.has_plateau),
    )
