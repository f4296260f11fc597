"""Activation coordination (paper §3.2 "Activation Coordination Patterns", §4.2, Table 1).

Method
------
For the analysed group ``G`` (plateau neurons) and each size-matched random group, the
activation matrix ``acts[:, G]`` (rows: context–token positions, columns: neurons) is
reduced by PCA and the effective dimension ``d_eff`` (eq. 4, ``τ = 0.95``) is computed with
:func:`raretoken.stats.effective_dim.effective_dimension`. Table 1 reports
``d_eff / |G|``; the group's ratio is compared with the random ratios by
:func:`raretoken.stats.baselines.compare_to_random` with ``alternative="less"`` (the
distributed-specialization prediction: the group is *more* coordinated than random).

Choices where the paper is silent
---------------------------------
* **Positions.** The paper builds "activation vectors across context–token pairs"; by
  default every scored position is used (``positions="all"``), which measures how the
  neurons co-activate in general. ``positions="rare"`` restricts the rows to rare-target
  positions (the caller passes those rows); it needs at least ``|G|`` of them.
* **Covariance PCA** (not correlation), as the paper speaks of "the activation covariance
  matrix"; ``standardize=True`` switches to correlation PCA.
* Random groups on which ``d_eff`` is undefined (all neurons constant) are skipped and
  counted (:attr:`CoordinationResult.n_skipped`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from raretoken.errors import ConfigError, InsufficientDataError, NumericalError
from raretoken.stats.baselines import BaselineComparison, compare_to_random
from raretoken.stats.effective_dim import EffectiveDimension, effective_dimension

from ._tables import frozen, markdown_table, nan_list, write_csv
from .groups import check_group, random_statistics

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

__all__ = ["CoordinationResult", "coordination_analysis"]


@dataclass(frozen=True, eq=False)
class CoordinationResult:
    """Effective dimension of a group against size-matched random groups (Table 1).

    Attributes
    ----------
    group_name:
        Label of the analysed group.
    neuron_ids:
        The group's neuron ids.
    observed:
        Effective dimension of the group (with its explained-variance spectrum).
    random_groups:
        ``(n_draws, |G|)`` neuron ids of the random groups used (rows: draws that gave a
        value).
    random_d_eff, random_ratio:
        ``d_eff`` and ``d_eff / |G|`` per random group (axis: row of ``random_groups``).
    random_cumulative:
        ``(n_draws, |G|)`` cumulative explained-variance ratio per random group (axis 1:
        number of components), for the figure.
    comparison:
        Group ratio vs random ratios, ``alternative="less"``.
    n_skipped:
        Random groups on which ``d_eff`` was undefined.
    positions:
        Which positions the rows are (``"all"`` scored positions or ``"rare"``).
    """

    group_name: str
    neuron_ids: np.ndarray
    observed: EffectiveDimension
    random_groups: np.ndarray
    random_d_eff: np.ndarray
    random_ratio: np.ndarray
    random_cumulative: np.ndarray
    comparison: BaselineComparison
    n_skipped: int
    positions: str

    # ------------------------------------------------------------------ table
    def to_table(self) -> list[dict[str, Any]]:
        """Table 1 row: the group's ``d_eff / N`` next to the random groups'."""
        c = self.comparison
        return [
            {
                "group": self.group_name,
                "n_neurons": self.observed.group_size,
                "n_positions": self.observed.n_samples,
                "positions": self.positions,
                "d_eff": self.observed.d_eff,
                "d_eff_ratio": self.observed.ratio,
                "random_ratio_mean": c.random_mean,
                "random_ratio_sd": c.random_sd,
                "random_d_eff_mean": float(np.mean(self.random_d_eff)),
                "n_random": c.n_draws,
                "p_value_less": c.p_value,
                "z_score": c.z_score,
            }
        ]

    def to_markdown(self) -> str:
        c = self.comparison
        head = (
            "### Activation coordination (Table 1)\n\n"
            f"Effective dimension (eq. 4, τ = {self.observed.threshold:g}) of the activations "
            f"of {self.observed.group_size} {self.group_name} neurons over "
            f"{self.observed.n_samples} {self.positions} scored positions, against "
            f"{c.n_draws} size-matched random groups; p: fraction of random groups with a "
            "ratio at most the group's (+1 corrected).\n\n"
        )
        return head + markdown_table(self.to_table())

    def to_csv(self, path: Path | str) -> None:
        write_csv(path, self.to_table())

    # ------------------------------------------------------------------ plot
    def plot(self, ax: Axes | None = None) -> Figure:
        """Cumulative explained variance: the group (red) against the random groups (grey)."""
        from raretoken.plotting.analyses import new_axes, plot_cumulative_variance

        ax = new_axes() if ax is None else ax
        plot_cumulative_variance(
            ax,
            self.observed.cumulative_variance_ratio,
            self.random_cumulative,
            self.observed.threshold,
            group_label=f"{self.group_name}: d_eff/N={self.observed.ratio:.2f}",
            title=(
                f"Coordination: d_eff/N {self.observed.ratio:.2f} vs random "
                f"{self.comparison.random_mean:.2f} (p={self.comparison.p_value:.3g})"
            ),
        )
        return ax.figure  # type: ignore[return-value]

    def plot_baseline(self, ax: Axes | None = None) -> Figure:
        """Histogram of the random groups' ``d_eff / N`` with the group's value."""
        from raretoken.plotting.analyses import new_axes, plot_baseline_hist

        ax = new_axes() if ax is None else ax
        plot_baseline_hist(
            ax,
            self.observed.ratio,
            self.random_ratio,
            xlabel="d_eff / N",
            group_label=self.group_name,
            p_value=self.comparison.p_value,
            title="Effective dimension ratio",
        )
        return ax.figure  # type: ignore[return-value]

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        return {
            "group_name": self.group_name,
            "neuron_ids": self.neuron_ids.tolist(),
            "observed": self.observed.to_dict(),
            "random_groups": self.random_groups.tolist(),
            "random_d_eff": self.random_d_eff.tolist(),
            "random_ratio": nan_list(self.random_ratio),
            "random_cumulative": nan_list(self.random_cumulative),
            "comparison": self.comparison.to_dict(),
            "n_skipped": self.n_skipped,
            "positions": self.positions,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CoordinationResult:
        n = len(d["neuron_ids"])
        groups = np.asarray(d["random_groups"], dtype=np.int64).reshape(-1, n)
        cum = np.asarray(d["random_cumulative"], dtype=np.float64).reshape(-1, n)
        return cls(
            group_name=str(d["group_name"]),
            neuron_ids=frozen(np.asarray(d["neuron_ids"], dtype=np.int64)),
            observed=EffectiveDimension.from_dict(d["observed"]),
            random_groups=frozen(groups),
            random_d_eff=frozen(np.asarray(d["random_d_eff"], dtype=np.int64)),
            random_ratio=frozen(np.asarray(d["random_ratio"], dtype=np.float64)),
            random_cumulative=frozen(cum),
            comparison=BaselineComparison.from_dict(d["comparison"]),
            n_skipped=int(d["n_skipped"]),
            positions=str(d["positions"]),
        )


def coordination_analysis(
    acts: np.ndarray,
    group: np.ndarray,
    random_groups: np.ndarray,
    *,
    group_name: str = "plateau",
    threshold: float = 0.95,
    standardize: bool = False,
    positions: str = "all",
) -> CoordinationResult:
    """Effective dimension of ``acts[:, group]`` against ``acts[:, random_group]`` (Table 1).

    Parameters
    ----------
    acts:
        ``(n_positions, n_neurons)`` activations of the whole layer; column ``i`` is neuron
        ``i``. Pass only the rows to use (e.g. rare-target positions).
    group:
        Neuron ids of the group (>= 2).
    random_groups:
        ``(n_random, |group|)`` neuron ids of size-matched random groups.
    group_name:
        Label for tables.
    threshold:
        ``τ`` of eq. 4.
    standardize:
        Correlation PCA instead of covariance PCA.
    positions:
        Label of the rows used (``"all"`` or ``"rare"``), recorded in the result.

    Raises
    ------
    InsufficientDataError
        Group < 2 neurons, or fewer positions than neurons.
    NumericalError
        The group's activations are constant (zero variance).
    """
    a = np.asarray(acts)
    if a.ndim != 2:
        raise ConfigError(f"acts must be 2-D (n_positions, n_neurons), got shape {a.shape}")
    ids = check_group(group, a.shape[1])
    rg = np.asarray(random_groups, dtype=np.int64)
    if rg.ndim != 2 or rg.shape[1] != ids.size:
        raise ConfigError(f"random_groups must have shape (n, {ids.size}), got {rg.shape}")
    if a.shape[0] < ids.size:
        raise InsufficientDataError(
            f"coordination needs at least as many positions as neurons: {a.shape[0]} "
            f"{positions} positions for {ids.size} neurons"
        )

    def d_eff(cols: np.ndarray) -> EffectiveDimension:
        return effective_dimension(a[:, cols], threshold=threshold, standardize=standardize)

    try:
        observed = d_eff(ids)
    except NumericalError as err:
        raise NumericalError(f"{group_name} neurons: {err}") from None
    rand, kept = random_statistics(d_eff, rg, what="effective dimension")
    ratios = np.asarray([r.ratio for r in rand], dtype=np.float64)
    comp = compare_to_random(observed.ratio, ratios, alternative="less")
    logger.info(
        "coordination: %s d_eff/N=%.3f vs random %.3f ± %.3f (p=%.3g)",
        group_name, observed.ratio, comp.random_mean, comp.random_sd, comp.p_value,
    )  # fmt: skip
    return CoordinationResult(
        group_name=group_name,
        neuron_ids=frozen(ids),
        observed=observed,
        random_groups=frozen(rg[kept]),
        random_d_eff=frozen(np.asarray([r.d_eff for r in rand], dtype=np.int64)),
        random_ratio=frozen(ratios),
        random_cumulative=frozen(np.stack([r.cumulative_variance_ratio for r in rand])),
        comparison=comp,
        n_skipped=int(rg.shape[0] - kept.size),
        positions=positions,
    )
