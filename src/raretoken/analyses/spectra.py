"""Weight spectra: Hill exponent of the group's weight correlations (paper §3.2, §4.5, Fig. 2).

Method
------
``W_G`` (eq. 9) is the slice of an MLP weight matrix belonging to the group's neurons, one
row per neuron. By default it is the **output** weights, ``adapter.w_out(-1)[G]`` of shape
``(|G|, d_model)`` (row ``i`` is the vector neuron ``i`` writes into the residual stream; the
paper's ``w_out^{(i)}`` of eq. 2); ``weights="in"`` (non-gated MLPs), ``"up"`` or
``"gate"`` (gated MLPs) use the input weights of :meth:`ModelAdapter.mlp_in_weights`
instead, also ``(|G|, d_model)``. The eigenvalues of ``Ξ_G = W_G W_G^T / d``
(:func:`raretoken.stats.hill.group_spectrum`) are fitted with the Hill estimator with the
fix-finger "x_min at the density peak" rule (:func:`raretoken.stats.hill.hill_alpha`, KDE
density by default). The same is done for every size-matched random group, and the group's
``α`` is compared with the random ``α`` by
:func:`raretoken.stats.baselines.compare_to_random`, ``alternative="less"`` (HT-SR
prediction: specialised neurons have heavier tails, i.e. lower ``α``).

Which α
-------
:attr:`SpectraResult.observed` holds both ``alpha`` (eq. 10 as printed: the CCDF tail index
``k / Σ ln(λ_i / λ_k)``) and ``alpha_pdf = 1 + alpha`` (the density exponent WeightWatcher
reports; the paper's "α < 2" threshold most likely refers to this one, but it does not say).
Since ``alpha_pdf`` is ``alpha`` shifted by 1, both give the same comparison with random
groups; tables show both.

Small groups: with few eigenvalues (``|G|`` of them) the peak rule may leave fewer than
``min_k`` tail values; ``k`` is then raised to ``min_k`` and the fit flagged ``fallback``
(the table counts such random fits).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from raretoken.errors import ConfigError, NumericalError
from raretoken.stats.baselines import BaselineComparison, compare_to_random
from raretoken.stats.hill import Density, HillFit, group_spectrum, hill_alpha

from ._tables import frozen, markdown_table, nan_list, write_csv
from .groups import check_group, random_statistics

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from raretoken.models.adapters import ModelAdapter

logger = logging.getLogger(__name__)

WEIGHT_KINDS = ("out", "in", "up", "gate")

__all__ = ["WEIGHT_KINDS", "SpectraResult", "layer_weights", "spectra_analysis"]


def layer_weights(adapter: ModelAdapter, which: str = "out", layer: int = -1) -> np.ndarray:
    """``(d_mlp, d_model)`` float64 weights of ``layer``, one row per neuron.

    ``which``: ``"out"`` (output projection, default), ``"in"`` (non-gated input),
    ``"up"`` / ``"gate"`` (gated input).
    """
    if which == "out":
        w = adapter.w_out(layer)
    else:
        inputs = adapter.mlp_in_weights(layer)
        if which not in inputs:
            raise ConfigError(
                f"weights {which!r} do not exist in this model's MLP; choose from "
                f"{['out', *sorted(inputs)]}"
            )
        w = inputs[which]
    return np.asarray(w.detach().to("cpu").double().numpy())


@dataclass(frozen=True, eq=False)
class SpectraResult:
    """Hill exponent of the group's weight spectrum against random groups (Figure 2).

    Attributes
    ----------
    group_name, neuron_ids:
        The analysed group.
    weights:
        Which weights (``"out"``, ``"in"``, ``"up"``, ``"gate"``).
    d:
        Columns of ``W_G`` (the ``d`` of eq. 9).
    observed:
        The group's Hill fit (with its positive eigenvalues, descending).
    random_groups:
        ``(n_draws, |G|)`` ids of the random groups that gave a fit.
    random_alpha, random_k, random_fallback:
        Per random group (axis: row of ``random_groups``): ``α`` (eq. 10), tail size, and
        whether ``k`` fell back to ``min_k``.
    random_eigenvalues:
        ``(n_draws, |G|)`` spectra of the random groups (descending, NaN-padded where
        eigenvalues were dropped as zero), for the figure.
    comparison:
        Group ``α`` vs random ``α``, ``alternative="less"``.
    n_skipped:
        Random groups without a fit.
    """

    group_name: str
    neuron_ids: np.ndarray
    weights: str
    d: int
    observed: HillFit
    random_groups: np.ndarray
    random_alpha: np.ndarray
    random_k: np.ndarray
    random_fallback: np.ndarray
    random_eigenvalues: np.ndarray
    comparison: BaselineComparison
    n_skipped: int

    # ------------------------------------------------------------------ table
    def to_table(self) -> list[dict[str, Any]]:
        """One row for the group, one for the random groups (mean ± SD)."""
        o, c = self.observed, self.comparison
        return [
            {
                "group": self.group_name,
                "weights": self.weights,
                "n_neurons": int(self.neuron_ids.size),
                "alpha_hill": o.alpha,
                "alpha_sd": None,
                "alpha_pdf": o.alpha_pdf,
                "k": float(o.k),
                "k_fallback": float(o.fallback),
                "n_groups": 1,
                "p_alpha_less": c.p_value,
                "z_alpha": c.z_score,
            },
            {
                "group": "random",
                "weights": self.weights,
                "n_neurons": int(self.neuron_ids.size),
                "alpha_hill": c.random_mean,
                "alpha_sd": c.random_sd,
                "alpha_pdf": c.random_mean + 1.0,
                "k": float(np.mean(self.random_k)),
                "k_fallback": float(np.mean(self.random_fallback)),
                "n_groups": c.n_draws,
                "p_alpha_less": None,
                "z_alpha": None,
            },
        ]

    def to_markdown(self) -> str:
        head = (
            "### Weight spectra (Figure 2)\n\n"
            f"Hill exponent (eq. 10, fix-finger x_min at the density peak) of the eigenvalues "
            f"of W_G W_Gᵀ / d (eq. 9) with W_G the {self.weights!r} weights of the "
            f"{self.group_name} neurons (d = {self.d}), against "
            f"{self.comparison.n_draws} size-matched random groups. alpha_hill is eq. 10 as "
            "printed (CCDF exponent); alpha_pdf = 1 + alpha_hill is the density exponent "
            "WeightWatcher reports. k_fallback: fraction of fits whose tail was raised to "
            "the minimum size.\n\n"
        )
        return head + markdown_table(self.to_table())

    def to_csv(self, path: Path | str) -> None:
        write_csv(path, self.to_table())

    # ------------------------------------------------------------------ plot
    def plot(self, ax: Axes | None = None) -> Figure:
        """Figure-2-like ESD of the group (log–log) with its Hill tail fit; random pooled."""
        from raretoken.plotting.analyses import new_axes, plot_spectrum

        ax = new_axes() if ax is None else ax
        o = self.observed
        plot_spectrum(
            ax,
            o.eigenvalues,
            o.x_min,
            o.alpha,
            o.k,
            random_eigenvalues=self.random_eigenvalues,
            group_label=self.group_name,
            title=f"Weight spectrum ({self.weights} weights)",
        )
        return ax.figure  # type: ignore[return-value]

    def plot_alpha(self, ax: Axes | None = None) -> Figure:
        """Histogram of the random groups' ``α_Hill`` with the group's ``α``."""
        from raretoken.plotting.analyses import new_axes, plot_baseline_hist

        ax = new_axes() if ax is None else ax
        plot_baseline_hist(
            ax,
            self.observed.alpha,
            self.random_alpha,
            xlabel="α_Hill (eq. 10)",
            group_label=self.group_name,
            p_value=self.comparison.p_value,
            title="Hill exponent",
        )
        return ax.figure  # type: ignore[return-value]

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        return {
            "group_name": self.group_name,
            "neuron_ids": self.neuron_ids.tolist(),
            "weights": self.weights,
            "d": self.d,
            "observed": self.observed.to_dict(),
            "random_groups": self.random_groups.tolist(),
            "random_alpha": nan_list(self.random_alpha),
            "random_k": self.random_k.tolist(),
            "random_fallback": self.random_fallback.tolist(),
            "random_eigenvalues": nan_list(self.random_eigenvalues),
            "comparison": self.comparison.to_dict(),
            "n_skipped": self.n_skipped,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SpectraResult:
        n = len(d["neuron_ids"])
        eig = np.asarray(
            [[np.nan if v is None else v for v in row] for row in d["random_eigenvalues"]],
            dtype=np.float64,
        ).reshape(-1, n)
        return cls(
            group_name=str(d["group_name"]),
            neuron_ids=frozen(np.asarray(d["neuron_ids"], dtype=np.int64)),
            weights=str(d["weights"]),
            d=int(d["d"]),
            observed=HillFit.from_dict(d["observed"]),
            random_groups=frozen(np.asarray(d["random_groups"], dtype=np.int64).reshape(-1, n)),
            random_alpha=frozen(np.asarray(d["random_alpha"], dtype=np.float64)),
            random_k=frozen(np.asarray(d["random_k"], dtype=np.int64)),
            random_fallback=frozen(np.asarray(d["random_fallback"], dtype=bool)),
            random_eigenvalues=frozen(eig),
            comparison=BaselineComparison.from_dict(d["comparison"]),
            n_skipped=int(d["n_skipped"]),
        )


def spectra_analysis(
    weights: np.ndarray,
    group: np.ndarray,
    random_groups: np.ndarray,
    *,
    group_name: str = "plateau",
    weight_name: str = "out",
    density: Density = "kde",
    min_k: int = 5,
) -> SpectraResult:
    """Hill exponent of ``weights[group]`` against ``weights[random_group]`` (Figure 2).

    Parameters
    ----------
    weights:
        ``(n_neurons, d)`` weight matrix of the layer, row ``i`` = neuron ``i`` (see
        :func:`layer_weights`).
    group, random_groups:
        Neuron ids of the group and ``(n_random, |group|)`` size-matched random groups.
    group_name, weight_name:
        Labels recorded in the result.
    density, min_k:
        Passed to :func:`raretoken.stats.hill.hill_alpha`.

    Raises
    ------
    InsufficientDataError
        Group < 2 neurons, or fewer than 3 positive eigenvalues.
    NumericalError
        Degenerate spectrum (all eigenvalues equal or zero).
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 2:
        raise ConfigError(f"weights must be 2-D (n_neurons, d), got shape {w.shape}")
    ids = check_group(group, w.shape[0])
    rg = np.asarray(random_groups, dtype=np.int64)
    if rg.ndim != 2 or rg.shape[1] != ids.size:
        raise ConfigError(f"random_groups must have shape (n, {ids.size}), got {rg.shape}")

    def fit(rows: np.ndarray) -> HillFit:
        return hill_alpha(group_spectrum(w[rows]), density=density, min_k=min_k)

    try:
        observed = fit(ids)
    except NumericalError as err:
        raise NumericalError(f"{group_name} neurons: {err}") from None
    rand, kept = random_statistics(fit, rg, what="Hill exponent")
    alpha = np.asarray([f.alpha for f in rand], dtype=np.float64)
    eig = np.full((len(rand), ids.size), np.nan)
    for i, f in enumerate(rand):
        eig[i, : f.eigenvalues.size] = f.eigenvalues
    comp = compare_to_random(observed.alpha, alpha, alternative="less")
    logger.info(
        "spectra: %s alpha=%.3f vs random %.3f ± %.3f (p=%.3g)",
        group_name, observed.alpha, comp.random_mean, comp.random_sd, comp.p_value,
    )  # fmt: skip
    return SpectraResult(
        group_name=group_name,
        neuron_ids=frozen(ids),
        weights=weight_name,
        d=int(w.shape[1]),
        observed=observed,
        random_groups=frozen(rg[kept]),
        random_alpha=frozen(alpha),
        random_k=frozen(np.asarray([f.k for f in rand], dtype=np.int64)),
        random_fallback=frozen(np.asarray([f.fallback for f in rand], dtype=bool)),
        random_eigenvalues=frozen(eig),
        comparison=comp,
        n_skipped=int(rg.shape[0] - kept.size),
    )
