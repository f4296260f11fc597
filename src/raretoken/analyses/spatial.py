"""Spatial organisation: MI graph + Louvain communities (paper §3.2, §4.3, Table 3).

Method
------
For the analysed group and each size-matched random group: the pairwise mutual information
of the neurons' activations over the scored positions
(:func:`raretoken.stats.mutual_info.mutual_information_matrix`, eq. 5; equal-frequency
bins, Miller–Madow corrected, nats) is the weighted adjacency of a neuron graph, whose
Louvain partition and modularity ``Q`` (eq. 6) come from
:func:`raretoken.stats.modularity.louvain_modularity`. Table 3 reports ``Q`` and the mean
community size ("Comm."). Comparisons with the random groups
(:func:`raretoken.stats.baselines.compare_to_random`):

* ``Q``, ``alternative="greater"``: modular organisation predicts a *higher* ``Q`` than
  random; the paper's distributed claim is that it is *not* significantly higher;
* mean community size, two-sided;
* mean off-diagonal MI, ``alternative="greater"``: how strongly the group's neurons depend
  on each other at all (a coordination measure complementary to ``d_eff``).

Choices
-------
* Louvain is randomised: one Generator made from ``seed`` gives, in order, the seeds of the
  group's run and of every random group's run, so a seed fixes every partition.
* The full weighted graph is used (no sparsification, as in the paper); ``sparsify`` /
  ``knn_k`` / ``n_restarts`` are passed through for sensitivity checks.
* Random groups whose graph has no positive edge (e.g. dead neurons: zero MI) are skipped
  and counted. The analysed group's graph must have positive weight.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from raretoken._rng import as_generator
from raretoken.errors import ConfigError, InsufficientDataError, NumericalError
from raretoken.stats.baselines import BaselineComparison, compare_to_random
from raretoken.stats.modularity import ModularityResult, Sparsify, louvain_modularity
from raretoken.stats.mutual_info import MutualInfoMatrix, mutual_information_matrix

from ._tables import frozen, markdown_table, nan_list, write_csv
from .groups import check_group, random_statistics

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

__all__ = ["SpatialResult", "spatial_analysis"]


@dataclass(frozen=True, eq=False)
class SpatialResult:
    """Louvain modularity of the group's MI graph against random groups (Table 3).

    Attributes
    ----------
    group_name, neuron_ids:
        The analysed group.
    mi:
        The group's MI matrix (axes: ``neuron_ids``).
    observed:
        The group's Louvain partition and ``Q``.
    random_groups:
        ``(n_draws, |G|)`` ids of the random groups that gave a value.
    random_q, random_n_communities, random_mean_size, random_mean_mi:
        Per random group (axis: row of ``random_groups``): ``Q``, number of communities, mean
        community size, mean off-diagonal MI (nats).
    q_comparison, size_comparison, mi_comparison:
        Group vs random: ``Q`` (greater), mean community size (two-sided), mean MI (greater).
    n_skipped:
        Random groups without a defined modularity.
    n_positions:
        Rows the MI was estimated on.
    """

    group_name: str
    neuron_ids: np.ndarray
    mi: MutualInfoMatrix
    observed: ModularityResult
    random_groups: np.ndarray
    random_q: np.ndarray
    random_n_communities: np.ndarray
    random_mean_size: np.ndarray
    random_mean_mi: np.ndarray
    q_comparison: BaselineComparison
    size_comparison: BaselineComparison
    mi_comparison: BaselineComparison
    n_skipped: int
    n_positions: int

    @property
    def mean_mi(self) -> float:
        return float(np.mean(self.mi.off_diagonal()))

    # ------------------------------------------------------------------ table
    def to_table(self) -> list[dict[str, Any]]:
        """Table 3: one row for the group, one for the random groups (mean ± SD)."""
        q, s, m = self.q_comparison, self.size_comparison, self.mi_comparison
        o = self.observed
        return [
            {
                "group": self.group_name,
                "n_neurons": o.n_neurons,
                "modularity_q": o.q,
                "q_sd": None,
                "n_communities": float(o.n_communities),
                "mean_community_size": o.mean_community_size,
                "mean_mi_nats": self.mean_mi,
                "n_groups": 1,
                "p_q_greater": q.p_value,
                "z_q": q.z_score,
                "p_size_two_sided": s.p_value,
                "p_mi_greater": m.p_value,
            },
            {
                "group": "random",
                "n_neurons": o.n_neurons,
                "modularity_q": q.random_mean,
                "q_sd": q.random_sd,
                "n_communities": float(np.mean(self.random_n_communities)),
                "mean_community_size": s.random_mean,
                "mean_mi_nats": m.random_mean,
                "n_groups": q.n_draws,
                "p_q_greater": None,
                "z_q": None,
                "p_size_two_sided": None,
                "p_mi_greater": None,
            },
        ]

    def to_markdown(self) -> str:
        head = (
            "### Spatial organisation (Table 3)\n\n"
            f"Louvain modularity Q (eq. 6) of the mutual-information graph (eq. 5, "
            f"{self.mi.bins} equal-frequency bins, {self.mi.bias_correction}, "
            f"{self.n_positions} positions) of the {self.group_name} neurons against "
            f"{self.q_comparison.n_draws} size-matched random groups (random row: mean; "
            "q_sd: SD over random groups). Comm. = mean community size.\n\n"
        )
        return head + markdown_table(self.to_table())

    def to_csv(self, path: Path | str) -> None:
        write_csv(path, self.to_table())

    # ------------------------------------------------------------------ plot
    def plot(self, ax: Axes | None = None) -> Figure:
        """Histogram of the random groups' ``Q`` with the group's ``Q``."""
        from raretoken.plotting.analyses import new_axes, plot_baseline_hist

        ax = new_axes() if ax is None else ax
        plot_baseline_hist(
            ax,
            self.observed.q,
            self.random_q,
            xlabel="Louvain modularity Q",
            group_label=self.group_name,
            p_value=self.q_comparison.p_value,
            title="Modularity of the MI graph",
        )
        return ax.figure  # type: ignore[return-value]

    def plot_mi(self, ax: Axes | None = None) -> Figure:
        """The group's MI matrix ordered by Louvain community."""
        from raretoken.plotting.analyses import new_axes, plot_mi_matrix

        ax = new_axes() if ax is None else ax
        plot_mi_matrix(
            ax,
            self.mi.mi,
            self.observed.labels,
            title=f"{self.group_name}: {self.observed.n_communities} communities, "
            f"Q={self.observed.q:.2f}",
        )
        return ax.figure  # type: ignore[return-value]

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        return {
            "group_name": self.group_name,
            "neuron_ids": self.neuron_ids.tolist(),
            "mi": self.mi.to_dict(),
            "observed": self.observed.to_dict(),
            "random_groups": self.random_groups.tolist(),
            "random_q": nan_list(self.random_q),
            "random_n_communities": self.random_n_communities.tolist(),
            "random_mean_size": nan_list(self.random_mean_size),
            "random_mean_mi": nan_list(self.random_mean_mi),
            "q_comparison": self.q_comparison.to_dict(),
            "size_comparison": self.size_comparison.to_dict(),
            "mi_comparison": self.mi_comparison.to_dict(),
            "n_skipped": self.n_skipped,
            "n_positions": self.n_positions,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SpatialResult:
        n = len(d["neuron_ids"])
        return cls(
            group_name=str(d["group_name"]),
            neuron_ids=frozen(np.asarray(d["neuron_ids"], dtype=np.int64)),
            mi=MutualInfoMatrix.from_dict(d["mi"]),
            observed=ModularityResult.from_dict(d["observed"]),
            random_groups=frozen(np.asarray(d["random_groups"], dtype=np.int64).reshape(-1, n)),
            random_q=frozen(np.asarray(d["random_q"], dtype=np.float64)),
            random_n_communities=frozen(np.asarray(d["random_n_communities"], dtype=np.int64)),
            random_mean_size=frozen(np.asarray(d["random_mean_size"], dtype=np.float64)),
            random_mean_mi=frozen(np.asarray(d["random_mean_mi"], dtype=np.float64)),
            q_comparison=BaselineComparison.from_dict(d["q_comparison"]),
            size_comparison=BaselineComparison.from_dict(d["size_comparison"]),
            mi_comparison=BaselineComparison.from_dict(d["mi_comparison"]),
            n_skipped=int(d["n_skipped"]),
            n_positions=int(d["n_positions"]),
        )


def spatial_analysis(
    acts: np.ndarray,
    group: np.ndarray,
    random_groups: np.ndarray,
    *,
    seed: int | np.random.Generator,
    group_name: str = "plateau",
    bins: int | None = None,
    sparsify: Sparsify = "none",
    knn_k: int = 10,
    n_restarts: int = 1,
) -> SpatialResult:
    """MI-graph modularity of ``acts[:, group]`` against random groups (Table 3).

    Parameters
    ----------
    acts:
        ``(n_positions, n_neurons)`` activations of the layer (rows: positions to use).
    group:
        Neuron ids of the group (>= 2).
    random_groups:
        ``(n_random, |group|)`` size-matched random groups.
    seed:
        Seed or Generator for Louvain (see module docstring).
    group_name:
        Label for tables.
    bins, sparsify, knn_k, n_restarts:
        Passed to the MI estimator and to :func:`louvain_modularity`.

    Raises
    ------
    InsufficientDataError
        Group < 2 neurons or fewer positions than neurons.
    NumericalError
        The group's MI graph has no positive edge (e.g. constant activations).
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
            f"spatial analysis needs at least as many positions as neurons: {a.shape[0]} "
            f"positions for {ids.size} neurons"
        )
    try:
        rng = as_generator(seed)
    except ValueError as err:
        raise ConfigError("spatial_analysis needs an explicit seed") from err

    def graph(cols: np.ndarray) -> tuple[MutualInfoMatrix, ModularityResult]:
        sub = a[:, cols]
        if np.all(np.ptp(sub, axis=0) == 0.0):
            raise NumericalError("activations are constant")
        mi = mutual_information_matrix(sub, neuron_ids=cols, bins=bins)
        mod = louvain_modularity(
            mi, seed=rng, sparsify=sparsify, knn_k=knn_k, n_restarts=n_restarts
        )
        return mi, mod

    try:
        mi, observed = graph(ids)
    except NumericalError as err:
        raise NumericalError(f"{group_name} neurons: {err}; modularity is undefined") from None
    rand, kept = random_statistics(graph, rg, what="modularity")
    q = np.asarray([m.q for _, m in rand], dtype=np.float64)
    n_comm = np.asarray([m.n_communities for _, m in rand], dtype=np.int64)
    size = np.asarray([m.mean_community_size for _, m in rand], dtype=np.float64)
    mean_mi = np.asarray([float(np.mean(x.off_diagonal())) for x, _ in rand], dtype=np.float64)
    q_cmp = compare_to_random(observed.q, q, alternative="greater")
    logger.info(
        "spatial: %s Q=%.3f vs random %.3f ± %.3f (p=%.3g)",
        group_name, observed.q, q_cmp.random_mean, q_cmp.random_sd, q_cmp.p_value,
    )  # fmt: skip
    return SpatialResult(
        group_name=group_name,
        neuron_ids=frozen(ids),
        mi=mi,
        observed=observed,
        random_groups=frozen(rg[kept]),
        random_q=frozen(q),
        random_n_communities=frozen(n_comm),
        random_mean_size=frozen(size),
        random_mean_mi=frozen(mean_mi),
        q_comparison=q_cmp,
        size_comparison=compare_to_random(observed.mean_community_size, size),
        mi_comparison=compare_to_random(
            float(np.mean(mi.off_diagonal())), mean_mi, alternative="greater"
        ),
        n_skipped=int(rg.shape[0] - kept.size),
        n_positions=int(a.shape[0]),
    )
