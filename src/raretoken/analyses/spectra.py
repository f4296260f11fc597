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

Which α (every column names its convention)
-------------------------------------------
* ``alpha_tail_hill``: eq. 10 as printed, the **tail index** (CCDF exponent)
  ``k / Σ ln(λ_i / λ_k)`` with the fix-finger peak ``x_min``
  (:attr:`SpectraResult.observed`, ``.alpha``); ``alpha_pdf_hill = 1 + alpha_tail_hill`` is
  the same fit as a density exponent. This is the paper's statistic and the one the claim
  (:attr:`SpectraResult.comparison`) is judged on.
* ``alpha_pdf_ks``: what WeightWatcher reports as ``alpha`` — the **density exponent**
  ``1 + n / Σ ln(λ_i / x_min)`` with ``x_min`` chosen by the minimal KS distance (Clauset et
  al.; :func:`raretoken.stats.powerlaw_fit.powerlaw_fit`), with its standard error
  ``alpha_pdf_ks_se = (α - 1) / √n`` and WeightWatcher's ``alpha_weighted = alpha_pdf_ks ·
  log10 λ_max`` (:attr:`SpectraResult.observed_ks`, compared with the random groups in
  :attr:`SpectraResult.ks_comparison`, ``alternative="less"``). The paper's "α < 2"
  threshold most likely refers to a density exponent, but it does not say.

The KS fit is run on ``d · λ``, the eigenvalues of ``W_G W_Gᵀ`` (the squared singular values
of ``W_G``, as WeightWatcher computes them), so ``x_min`` and ``alpha_weighted`` are on
WeightWatcher's scale; the exponents and ``D`` do not depend on the scale. A group or random
group with too few eigenvalues for the KS fit is reported (``ks_note``, ``n_ks_fitted``),
not fitted.

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
from raretoken.stats.powerlaw_fit import (
    MIN_TAIL,
    FixFingers,
    PowerLawComparison,
    PowerLawFit,
    compare_powerlaw_fits,
)

from ._tables import frozen, markdown_table, nan_list, opt_float, write_csv
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


def _mean_sd(v: np.ndarray) -> tuple[float | None, float | None]:
    x = v[np.isfinite(v)]
    if x.size == 0:
        return None, None
    return opt_float(float(x.mean())), opt_float(float(x.std(ddof=1))) if x.size > 1 else None


@dataclass(frozen=True, eq=False)
class SpectraResult:
    """Hill and KS exponents of the group's weight spectrum against random groups (Fig. 2).

    Attributes
    ----------
    group_name, neuron_ids:
        The analysed group.
    weights:
        Which weights (``"out"``, ``"in"``, ``"up"``, ``"gate"``).
    d:
        Columns of ``W_G`` (the ``d`` of eq. 9).
    observed:
        The group's Hill fit (eq. 10, tail index; with its positive eigenvalues, descending).
    random_groups:
        ``(n_draws, |G|)`` ids of the random groups that gave a fit.
    random_alpha, random_k, random_fallback:
        Per random group (axis: row of ``random_groups``): Hill tail index ``α_tail`` (eq.
        10), tail size, and whether ``k`` fell back to ``min_k``.
    random_eigenvalues:
        ``(n_draws, |G|)`` spectra of the random groups (descending, NaN-padded where
        eigenvalues were dropped as zero), for the figure.
    comparison:
        Group Hill ``α_tail`` vs random, ``alternative="less"`` (the claim's test).
    n_skipped:
        Random groups without a fit.
    ks:
        KS power-law fits (WeightWatcher's ``alpha``, a density exponent, with its SE and
        ``alpha_weighted``) of ``d · λ`` for the group and each random group (same rows as
        ``random_groups``), and the group-vs-random comparison (``alternative="less"``) or
        the reason it is missing; shortcuts :attr:`observed_ks`, :attr:`ks_comparison`,
        :attr:`ks_note`.
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
    ks: PowerLawComparison

    @property
    def observed_ks(self) -> PowerLawFit:
        """The group's KS fit (``alpha_pdf`` = WeightWatcher's alpha)."""
        return self.ks.observed

    @property
    def ks_comparison(self) -> BaselineComparison | None:
        """Group ``alpha_pdf_ks`` vs random groups (``None`` when not possible)."""
        return self.ks.comparison

    @property
    def ks_note(self) -> str | None:
        """Why the KS comparison is missing or incomplete."""
        return self.ks.note

    # ------------------------------------------------------------------ table
    def to_table(self) -> list[dict[str, Any]]:
        """One row for the group, one for the random groups (mean and SD)."""
        o, c, ks, kc = self.observed, self.comparison, self.observed_ks, self.ks_comparison
        fitted = self.ks.random_k > 0
        a_mean, a_sd = _mean_sd(self.ks.random_alpha_pdf)
        w_mean, w_sd = _mean_sd(self.ks.random_alpha_weighted)
        common = {"weights": self.weights, "n_neurons": int(self.neuron_ids.size)}
        return [
            {
                "group": self.group_name,
                **common,
                "n_groups": 1,
                "alpha_tail_hill": o.alpha,
                "alpha_tail_hill_se": o.alpha_se,
                "alpha_tail_hill_sd": None,
                "alpha_pdf_hill": o.alpha_pdf,
                "k_hill": float(o.k),
                "k_hill_fallback": float(o.fallback),
                "p_alpha_tail_hill_less": c.p_value,
                "z_alpha_tail_hill": c.z_score,
                "n_ks_fitted": int(ks.fitted),
                "alpha_pdf_ks": opt_float(ks.alpha_pdf),
                "alpha_pdf_ks_se": opt_float(ks.alpha_pdf_se),
                "alpha_pdf_ks_sd": None,
                "k_ks": float(ks.k) if ks.fitted else None,
                "ks_distance": opt_float(ks.ks_distance),
                "alpha_weighted": opt_float(ks.alpha_weighted),
                "alpha_weighted_sd": None,
                "p_alpha_pdf_ks_less": None if kc is None else kc.p_value,
                "z_alpha_pdf_ks": None if kc is None else opt_float(kc.z_score),
            },
            {
                "group": "random",
                **common,
                "n_groups": c.n_draws,
                "alpha_tail_hill": c.random_mean,
                "alpha_tail_hill_se": None,
                "alpha_tail_hill_sd": c.random_sd,
                "alpha_pdf_hill": c.random_mean + 1.0,
                "k_hill": float(np.mean(self.random_k)),
                "k_hill_fallback": float(np.mean(self.random_fallback)),
                "p_alpha_tail_hill_less": None,
                "z_alpha_tail_hill": None,
                "n_ks_fitted": int(fitted.sum()),
                "alpha_pdf_ks": a_mean,
                "alpha_pdf_ks_se": None,
                "alpha_pdf_ks_sd": a_sd,
                "k_ks": float(np.mean(self.ks.random_k[fitted])) if fitted.any() else None,
                "ks_distance": None,
                "alpha_weighted": w_mean,
                "alpha_weighted_sd": w_sd,
                "p_alpha_pdf_ks_less": None,
                "z_alpha_pdf_ks": None,
            },
        ]

    def to_markdown(self) -> str:
        ks = self.observed_ks
        rule = {"ks": "minimal KS distance", "xmin_peak": "fix_fingers='xmin_peak'",
                "clip_xmax": "fix_fingers='clip_xmax'"}.get(ks.rule, ks.rule)  # fmt: skip
        head = (
            "### Weight spectra (Figure 2)\n\n"
            f"Eigenvalues λ of W_G W_Gᵀ / d (eq. 9) with W_G the {self.weights!r} weights of the "
            f"{self.group_name} neurons (d = {self.d}), against "
            f"{self.comparison.n_draws} size-matched random groups. Two conventions: "
            "**alpha_tail_*** is a tail index (P(λ > x) ∝ x^-α), **alpha_pdf_*** a density "
            "exponent (p(λ) ∝ λ^-α, = 1 + tail index). alpha_tail_hill: eq. 10 as printed "
            "(Hill, fix-finger x_min at the density peak; the claim is judged on it); "
            "alpha_pdf_hill = 1 + alpha_tail_hill. alpha_pdf_ks: WeightWatcher's alpha, the "
            f"continuous power-law MLE with x_min by {rule} (Clauset et al., tails of >= "
            f"{ks.min_tail} eigenvalues), with its SE (α - 1)/√k_ks; alpha_weighted = "
            "alpha_pdf_ks · log10 λ_max on WeightWatcher's scale (eigenvalues of W_G W_Gᵀ, "
            "i.e. d · λ). k_hill_fallback: fraction of Hill fits whose tail was raised to the "
            "minimum size; n_ks_fitted: fits for which the KS fit was possible.\n\n"
        )
        note = f"\n\nKS fit: {self.ks_note}.\n" if self.ks_note else ""
        return head + markdown_table(self.to_table()) + note

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
        """Histogram of the random groups' Hill tail index with the group's."""
        from raretoken.plotting.analyses import new_axes, plot_baseline_hist

        ax = new_axes() if ax is None else ax
        plot_baseline_hist(
            ax,
            self.observed.alpha,
            self.random_alpha,
            xlabel="α_tail Hill (eq. 10, tail index)",
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
            "random_alpha_tail_hill": nan_list(self.random_alpha),
            "random_k": self.random_k.tolist(),
            "random_fallback": self.random_fallback.tolist(),
            "random_eigenvalues": nan_list(self.random_eigenvalues),
            "comparison_alpha_tail_hill": self.comparison.to_dict(),
            "n_skipped": self.n_skipped,
            "ks": self.ks.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SpectraResult:
        """Inverse of :meth:`to_dict`; dicts written before the KS fit existed (keys
        ``random_alpha``, ``comparison``, no ``observed_ks``) get the KS fit recomputed from
        their stored eigenvalues with the default settings."""
        n = len(d["neuron_ids"])
        eig = np.asarray(
            [[np.nan if v is None else v for v in row] for row in d["random_eigenvalues"]],
            dtype=np.float64,
        ).reshape(-1, n)
        observed = HillFit.from_dict(d["observed"])
        cols = int(d["d"])
        ks = (
            PowerLawComparison.from_dict(d["ks"])
            if "ks" in d
            else compare_powerlaw_fits(
                observed.eigenvalues, list(eig), label=f"{d['group_name']} neurons", scale=cols
            )
        )
        return cls(
            group_name=str(d["group_name"]),
            neuron_ids=frozen(np.asarray(d["neuron_ids"], dtype=np.int64)),
            weights=str(d["weights"]),
            d=cols,
            observed=observed,
            random_groups=frozen(np.asarray(d["random_groups"], dtype=np.int64).reshape(-1, n)),
            random_alpha=frozen(
                np.asarray(d.get("random_alpha_tail_hill", d.get("random_alpha")), dtype=np.float64)
            ),
            random_k=frozen(np.asarray(d["random_k"], dtype=np.int64)),
            random_fallback=frozen(np.asarray(d["random_fallback"], dtype=bool)),
            random_eigenvalues=frozen(eig),
            comparison=BaselineComparison.from_dict(
                d.get("comparison_alpha_tail_hill", d.get("comparison"))
            ),
            n_skipped=int(d["n_skipped"]),
            ks=ks,
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
    fix_fingers: FixFingers | None = None,
    min_tail: int = MIN_TAIL,
) -> SpectraResult:
    """Hill and KS exponents of ``weights[group]`` against ``weights[random_group]`` (Fig. 2).

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
    fix_fingers, min_tail:
        Passed to :func:`raretoken.stats.powerlaw_fit.powerlaw_fit` (the KS fit, run on
        ``d · λ``). A KS fit that is not possible is reported in the result, not raised.

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
    d = int(w.shape[1])
    ks = compare_powerlaw_fits(
        observed.eigenvalues, [f.eigenvalues for f in rand], label=f"{group_name} neurons",
        scale=d, fix_fingers=fix_fingers, min_tail=min_tail,
    )  # fmt: skip
    logger.info(
        "spectra: %s alpha_tail_hill=%.3f vs random %.3f ± %.3f (p=%.3g); alpha_pdf_ks=%.3f",
        group_name, observed.alpha, comp.random_mean, comp.random_sd, comp.p_value,
        ks.observed.alpha_pdf,
    )  # fmt: skip
    if ks.note:
        logger.warning("spectra: %s", ks.note)
    return SpectraResult(
        group_name=group_name,
        neuron_ids=frozen(ids),
        weights=weight_name,
        d=d,
        observed=observed,
        random_groups=frozen(rg[kept]),
        random_alpha=frozen(alpha),
        random_k=frozen(np.asarray([f.k for f in rand], dtype=np.int64)),
        random_fallback=frozen(np.asarray([f.fallback for f in rand], dtype=bool)),
        random_eigenvalues=frozen(eig),
        comparison=comp,
        n_skipped=int(rg.shape[0] - kept.size),
        ks=ks,
    )
