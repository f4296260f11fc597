"""Attention routing: rare vs common attention concentration and head ablation (paper §3.2,
§4.4, Table 2).

The model re-runs (attention patterns, head ablations) are in
:mod:`raretoken.analyses.routing_runs`; this module holds the statistics and the result.

Both parts look at the attention heads of the blocks that feed the final MLP directly, the
last two (``L-2`` and ``L-1``). They re-run only those blocks from the residual stream
entering block ``L-2`` captured during identification (``ident.block_input``) with
:func:`raretoken.models.tail.run_from_layer`, which keeps masks, rotary embeddings and
parallel attention (NeoX) exactly as in a full forward.

Attention concentration (eq. 7)
-------------------------------
:func:`attention_gini` records the attention probabilities of every head of the re-run
blocks (:func:`raretoken.models.hooks.attention_patterns`; per *query* head under
grouped-query attention) and takes, for each scored position, the Gini coefficient of the
attention row of the query at that position (the position whose logits predict the target)
over the keys the model lets the query see (:func:`raretoken.stats.routing.gini`, textbook
variant by default; causal, and the window on sliding layers:
:func:`raretoken.models.hooks.attention_visibility`).
:func:`routing_analysis` then compares rare-target and common-target query positions head by
head with :func:`raretoken.stats.routing.compare_head_gini` (Welch and Mann–Whitney per head,
Benjamini–Hochberg across heads, Spearman's ρ across heads of the per-head means, paired t
across heads).

Head ablation (eq. 8)
---------------------
:func:`head_ablation` zeroes the output of one head (:func:`raretoken.models.hooks.ablate_heads`)
for every single head of the re-run blocks and, separately, all heads of each block at
once, and records the group's final-layer activations at every scored position. It stores
per-position squared norms, from which ``Impact = ||a_base - a_abl|| / ||a_base||`` (eq. 8,
Frobenius norm over positions × neurons, as :func:`raretoken.stats.routing.ablation_impact`)
and the signed change ``||a_abl|| / ||a_base|| - 1`` (Table 2's "All" drop) follow for any
subset of positions. The baseline is the re-run without ablation (same code path as the
ablations).

Comparisons (:func:`raretoken.stats.routing.compare_impacts`):

* **Heads chosen by influence vs random heads** (Table 2 "Single" vs "Random"). Choosing
  heads by their impact and testing that same impact would be circular, so the choice is
  cross-fitted: the ``n_top`` heads of largest impact on the even-numbered windows are
  chosen, and the impacts compared are those on the odd-numbered windows, against the
  held-out impacts of random heads (up to ``n_random`` heads drawn without replacement, with
  the seed, from the heads not chosen). With a single window the choice is made in-sample and
  :attr:`RoutingResult.cross_fitted` is ``False``. Welch t-test + label permutations.
* **Single head vs whole layer**: for every (layer, window) pair, the largest single-head
  impact in that layer against the impact of ablating the whole layer, paired t-test +
  sign-flip permutations (taking the *largest* head makes the test conservative for the
  claim that single heads matter less than layers).

Positions: impacts use every scored position by default (``impact_positions="all"``);
``"rare"`` restricts them to rare-target positions.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from raretoken._rng import as_generator
from raretoken.errors import ConfigError, InsufficientDataError
from raretoken.stats.routing import (
    GiniComparison,
    ImpactComparison,
    compare_head_gini,
    compare_impacts,
)

from ._tables import from_nan_list, frozen, markdown_table, nan_list, write_csv
from .routing_runs import (
    ALL_HEADS,
    HeadAblation,
    HeadGini,
    RoutingContext,
    attention_gini,
    head_ablation,
    rows_within,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


logger = logging.getLogger(__name__)

__all__ = [
    "ALL_HEADS",
    "HeadAblation",
    "HeadGini",
    "RoutingContext",
    "RoutingResult",
    "attention_gini",
    "head_ablation",
    "routing_analysis",
]


# ---------------------------------------------------------------------------------------------
# The analysis
# ---------------------------------------------------------------------------------------------


def _head_label(layer: int, head: int) -> str:
    return f"L{layer}.all" if head == ALL_HEADS else f"L{layer}.H{head}"


@dataclass(frozen=True, eq=False)
class RoutingResult:
    """Attention routing of rare vs common targets and head ablation (Table 2).

    Attributes
    ----------
    group_name, neuron_ids:
        The group whose activations the ablations are measured on.
    gini:
        Per-head rare vs common Gini comparison (axis: ``gini.heads``).
    n_rare_positions, n_common_positions:
        Query positions in each class.
    impact_positions:
        ``"all"`` or ``"rare"``: positions eq. 8 is computed over.
    single_heads:
        ``(n_single, 2)`` ``(layer, head)`` of the single-head ablations (axis of the
        ``single_*`` arrays).
    single_impact, single_signed:
        Eq. 8 and signed norm change per single head, over all windows.
    layers:
        Layers ablated as a whole (axis of the ``layer_*`` arrays).
    layer_impact, layer_signed:
        Eq. 8 and signed norm change per whole-layer ablation.
    selection_windows, evaluation_windows:
        Windows used to choose the influential heads and to evaluate them.
    cross_fitted:
        Whether the two window sets are disjoint.
    top_heads, random_heads:
        Indices into :attr:`single_heads` of the heads chosen by influence and of the
        random comparison heads.
    top_eval_impact, random_eval_impact:
        Their impacts on the evaluation windows.
    top_vs_random:
        Chosen vs random heads (Welch + permutations).
    pair_layers, pair_windows, pair_max_single, pair_layer:
        The (layer, window) pairs of the single-vs-layer test: largest single-head impact
        in the layer and whole-layer impact in the window.
    single_vs_layer:
        Paired comparison of ``pair_max_single`` vs ``pair_layer``.
    baseline_max_abs_diff:
        Wiring check: largest difference between the re-run baseline activations and the
        captured ones (``None`` when not checked).
    """

    group_name: str
    neuron_ids: np.ndarray
    gini: GiniComparison
    n_rare_positions: int
    n_common_positions: int
    impact_positions: str
    single_heads: np.ndarray
    single_impact: np.ndarray
    single_signed: np.ndarray
    layers: np.ndarray
    layer_impact: np.ndarray
    layer_signed: np.ndarray
    selection_windows: np.ndarray
    evaluation_windows: np.ndarray
    cross_fitted: bool
    top_heads: np.ndarray
    random_heads: np.ndarray
    top_eval_impact: np.ndarray
    random_eval_impact: np.ndarray
    top_vs_random: ImpactComparison
    pair_layers: np.ndarray
    pair_windows: np.ndarray
    pair_max_single: np.ndarray
    pair_layer: np.ndarray
    single_vs_layer: ImpactComparison
    baseline_max_abs_diff: float | None = None

    # ------------------------------------------------------------------ tables
    def n_heads_differing(self, alpha: float = 0.05) -> int:
        """Heads whose rare vs common Gini differs (BH-adjusted Welch q < ``alpha``)."""
        q = self.gini.q_welch
        return int(np.count_nonzero(np.isfinite(q) & (q < alpha)))

    def to_table(self) -> list[dict[str, Any]]:
        """Table 2 (one row) with the attention-concentration comparison alongside."""
        g, t, s = self.gini, self.top_vs_random, self.single_vs_layer
        return [
            {
                "group": self.group_name,
                "n_heads": g.n_heads,
                "gini_rare_mean": g.grand_mean_rare,
                "gini_rare_sd": g.grand_sd_rare,
                "gini_common_mean": g.grand_mean_common,
                "gini_common_sd": g.grand_sd_common,
                "gini_paired_p": g.paired_p,
                "gini_spearman_rho": g.spearman_rho,
                "gini_spearman_p": g.spearman_p,
                "n_heads_q_lt_0.05": self.n_heads_differing(),
                "impact_positions": self.impact_positions,
                "single_top_impact": t.mean_a,
                "single_random_impact": t.mean_b,
                "p_top_vs_random": t.p_permutation,
                "d_top_vs_random": t.cohens_d,
                "all_heads_impact": float(np.mean(self.layer_impact)),
                "all_heads_change": float(np.mean(self.layer_signed)),
                "max_single_impact": float(np.max(self.single_impact)),
                "p_single_vs_layer": s.p_permutation,
                "d_single_vs_layer": s.cohens_d,
            }
        ]

    def head_table(self) -> list[dict[str, Any]]:
        """One row per head: Gini rare/common and single-head ablation impact."""
        g = self.gini
        pos = {(int(a), int(b)): i for i, (a, b) in enumerate(self.single_heads)}
        top = set(self.top_heads.tolist())
        rows = []
        for j, (layer, head) in enumerate(g.heads.tolist()):
            i = pos.get((layer, head))
            rows.append(
                {
                    "layer": layer,
                    "head": head,
                    "gini_rare": float(g.mean_rare[j]),
                    "gini_common": float(g.mean_common[j]),
                    "cohens_d": float(g.cohens_d[j]),
                    "q_welch": float(g.q_welch[j]),
                    "q_mannwhitney": float(g.q_mannwhitney[j]),
                    "impact": None if i is None else float(self.single_impact[i]),
                    "signed_change": None if i is None else float(self.single_signed[i]),
                    "chosen_by_influence": i is not None and i in top,
                }
            )
        for layer, imp, sig in zip(
            self.layers.tolist(), self.layer_impact, self.layer_signed, strict=True
        ):
            rows.append(
                {"layer": layer, "head": "all", "impact": float(imp), "signed_change": float(sig)}
            )
        return rows

    def to_markdown(self) -> str:
        g, t, s = self.gini, self.top_vs_random, self.single_vs_layer
        cf = (
            f"chosen on windows {self.selection_windows.tolist()} and evaluated on windows "
            f"{self.evaluation_windows.tolist()}"
            if self.cross_fitted
            else "chosen and evaluated on the same (single) window"
        )
        head = (
            "### Attention routing (Table 2)\n\n"
            f"Attention Gini (eq. 7) of {g.n_heads} heads of the last two blocks at "
            f"{self.n_rare_positions} rare-target vs {self.n_common_positions} common-target "
            f"query positions: {g.grand_mean_rare:.3f} ± {g.grand_sd_rare:.3f} vs "
            f"{g.grand_mean_common:.3f} ± {g.grand_sd_common:.3f} (mean ± SD across heads, "
            f"paired t p = {g.paired_p:.3g}), Spearman ρ across heads = "
            f"{g.spearman_rho:.3f}; {self.n_heads_differing()} head(s) differ at BH q < 0.05."
            "\n\n"
            f"Head ablation impact (eq. 8) on the {self.neuron_ids.size} {self.group_name} "
            f"neurons at {self.impact_positions} scored positions: {t.n_a} heads chosen by "
            f"influence ({cf}) {t.mean_a:.3f} vs {t.n_b} random heads {t.mean_b:.3f} "
            f"(permutation p = {t.p_permutation:.3g}); largest single head per layer and window "
            f"{s.mean_a:.3f} vs whole layer {s.mean_b:.3f} (paired, p = {s.p_permutation:.3g}); "
            f"whole-layer activation norm change {np.mean(self.layer_signed):+.1%}.\n\n"
        )
        return head + markdown_table(self.to_table())

    def to_csv(self, path: Path | str) -> None:
        write_csv(path, self.to_table())

    # ------------------------------------------------------------------ plots
    def plot(self, ax: Axes | None = None) -> Figure:
        """Per-head mean Gini at rare vs common positions."""
        from raretoken.plotting.analyses import new_axes, plot_gini_scatter

        ax = new_axes() if ax is None else ax
        g = self.gini
        plot_gini_scatter(ax, g.heads, g.mean_rare, g.mean_common, rho=g.spearman_rho)
        return ax.figure  # type: ignore[return-value]

    def plot_impacts(self, ax: Axes | None = None) -> Figure:
        """Eq. 8 impact of every single head (chosen ones highlighted) and of whole layers."""
        from raretoken.plotting.analyses import new_axes, plot_head_impacts

        ax = new_axes() if ax is None else ax
        selected = np.zeros(self.single_heads.shape[0], dtype=bool)
        selected[self.top_heads] = True
        plot_head_impacts(
            ax,
            [_head_label(int(a), int(b)) for a, b in self.single_heads],
            self.single_impact,
            selected,
            [_head_label(int(layer), ALL_HEADS) for layer in self.layers],
            self.layer_impact,
        )
        return ax.figure  # type: ignore[return-value]

    # ------------------------------------------------------------------ JSON
    _INT_ARRAYS = (
        "neuron_ids",
        "single_heads",
        "layers",
        "selection_windows",
        "evaluation_windows",
        "top_heads",
        "random_heads",
        "pair_layers",
        "pair_windows",
    )
    _FLOAT_ARRAYS = (
        "single_impact",
        "single_signed",
        "layer_impact",
        "layer_signed",
        "top_eval_impact",
        "random_eval_impact",
        "pair_max_single",
        "pair_layer",
    )

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "group_name": self.group_name,
            "gini": self.gini.to_dict(),
            "n_rare_positions": self.n_rare_positions,
            "n_common_positions": self.n_common_positions,
            "impact_positions": self.impact_positions,
            "cross_fitted": self.cross_fitted,
            "top_vs_random": self.top_vs_random.to_dict(),
            "single_vs_layer": self.single_vs_layer.to_dict(),
            "baseline_max_abs_diff": self.baseline_max_abs_diff,
        }
        for name in self._INT_ARRAYS:
            d[name] = getattr(self, name).tolist()
        for name in self._FLOAT_ARRAYS:
            d[name] = nan_list(getattr(self, name))
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RoutingResult:
        kw: dict[str, Any] = {
            "group_name": str(d["group_name"]),
            "gini": GiniComparison.from_dict(d["gini"]),
            "n_rare_positions": int(d["n_rare_positions"]),
            "n_common_positions": int(d["n_common_positions"]),
            "impact_positions": str(d["impact_positions"]),
            "cross_fitted": bool(d["cross_fitted"]),
            "top_vs_random": ImpactComparison.from_dict(d["top_vs_random"]),
            "single_vs_layer": ImpactComparison.from_dict(d["single_vs_layer"]),
            "baseline_max_abs_diff": d.get("baseline_max_abs_diff"),
        }
        for name in cls._INT_ARRAYS:
            arr = np.asarray(d[name], dtype=np.int64)
            kw[name] = frozen(arr.reshape(-1, 2) if name == "single_heads" else arr)
        for name in cls._FLOAT_ARRAYS:
            kw[name] = from_nan_list(d[name])
        return cls(**kw)


def _split_windows(windows: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    w = np.unique(windows)
    if w.size < 2:
        return w, w, False
    return w[0::2], w[1::2], True


def routing_analysis(
    gini_values: HeadGini,
    ablation: HeadAblation,
    rare_positions: np.ndarray,
    common_positions: np.ndarray,
    *,
    seed: int | np.random.Generator,
    group_name: str = "plateau",
    impact_positions: str = "all",
    n_top: int = 3,
    n_random: int = 100,
    n_permutations: int = 10_000,
    uniform_positions: np.ndarray | None = None,
    ablation_rows: np.ndarray | None = None,
) -> RoutingResult:
    """Compare rare vs common attention concentration and single-head vs layer ablation.

    Parameters
    ----------
    gini_values:
        Per-head, per-position Gini (:func:`attention_gini`).
    ablation:
        Head ablations measured on the group (:func:`head_ablation`).
    rare_positions, common_positions:
        Rows (scored positions) whose target is rare / common.
    seed:
        Seed or Generator for the random heads and the permutation tests.
    group_name:
        Label for tables.
    impact_positions:
        ``"all"`` scored positions or ``"rare"`` positions for eq. 8.
    n_top:
        Heads chosen by influence (capped so that >= 2 heads remain for the random side).
    n_random:
        Most random comparison heads (drawn without replacement from the others).
    n_permutations:
        Permutations of each impact comparison.
    uniform_positions:
        The rows that stand for "all" positions (the uniform sample of positions when only
        some are scored, see :mod:`raretoken.data.scoring`); default every row.
    ablation_rows:
        When the head ablations cover only some windows (:class:`RoutingContext` with
        ``max_windows``): the rows of the Gini array (scored positions) they cover, in their
        order; the impacts then use those of the impact positions that lie in them.

    Raises
    ------
    InsufficientDataError
        Fewer than 2 rare or common positions with a defined Gini per head, or too few
        heads to compare.
    """
    rare = np.asarray(rare_positions, dtype=np.int64)
    common = np.asarray(common_positions, dtype=np.int64)
    n_pos = gini_values.n_positions
    if ablation_rows is None and n_pos != ablation.base_sq.size:
        raise ConfigError(
            f"the Gini array covers {n_pos} positions but the ablation {ablation.base_sq.size}"
        )
    if ablation_rows is not None and np.asarray(ablation_rows).size != ablation.base_sq.size:
        raise ConfigError(
            f"ablation_rows names {np.asarray(ablation_rows).size} rows but the ablation "
            f"covers {ablation.base_sq.size}"
        )
    for name, idx in (("rare", rare), ("common", common)):
        if idx.size < 2:
            raise InsufficientDataError(
                f"routing needs >= 2 {name}-target positions, got {idx.size}"
            )
        if idx.min() < 0 or idx.max() >= n_pos:
            raise ConfigError(f"{name}_positions must index the {n_pos} scored positions")
    if impact_positions not in ("all", "rare"):
        raise ConfigError(f"impact_positions must be 'all' or 'rare', got {impact_positions!r}")
    rng = as_generator(seed)

    g = gini_values.gini
    gini_cmp = compare_head_gini(
        g[:, rare], g[:, common], gini_values.heads, variant=gini_values.variant
    )

    if impact_positions == "all":
        pos = None if uniform_positions is None else np.asarray(uniform_positions, np.int64)
    else:
        pos = rare
    if ablation_rows is not None:  # the ablation covers some windows only: its own rows
        rows = np.asarray(ablation_rows, dtype=np.int64)
        pos = rows_within(rows, np.arange(n_pos) if pos is None else pos)
    single = ablation.single
    whole = ablation.whole_layer
    heads = ablation.ablations[single]
    layers = ablation.ablations[whole, 0]
    impacts = ablation.impacts(pos)
    signed = ablation.signed_changes(pos)
    if n_top < 2:
        raise ConfigError(f"n_top must be >= 2 (a t-test needs two values), got {n_top}")
    if single.size < 4:
        raise InsufficientDataError(f"need >= 4 single heads to compare, got {single.size}")
    k = min(int(n_top), single.size - 2)

    sel_w, eval_w, cross = _split_windows(ablation.window)
    all_idx = np.arange(ablation.base_sq.size) if pos is None else pos

    def impacts_on(windows: np.ndarray) -> np.ndarray:
        sub = all_idx[np.isin(ablation.window[all_idx], windows)]
        if sub.size == 0:
            raise InsufficientDataError(
                f"no {impact_positions} scored position in windows {windows.tolist()}"
            )
        return ablation.impacts(sub)

    sel_imp = impacts_on(sel_w)[single]
    eval_imp = impacts_on(eval_w)[single]
    order = np.argsort(-sel_imp, kind="stable")
    top = np.sort(order[:k])
    pool = np.sort(order[k:])
    n_r = max(2, min(int(n_random), pool.size))
    rand = np.sort(rng.choice(pool, size=n_r, replace=False))
    top_eval = eval_imp[top]
    rand_eval = eval_imp[rand]
    top_vs_random = compare_impacts(
        top_eval,
        rand_eval,
        seed=rng,
        labels=("chosen_by_influence", "random"),
        n_permutations=n_permutations,
    )

    windows = np.unique(ablation.window)
    win_imp = ablation.window_impacts(windows, pos)  # (n_abl, n_windows)
    p_layers: list[int] = []
    p_windows: list[int] = []
    p_single: list[float] = []
    p_layer: list[float] = []
    for li, layer in zip(whole, layers, strict=True):
        in_layer = single[ablation.ablations[single, 0] == layer]
        for j, w in enumerate(windows):
            lay = win_imp[li, j]
            sing = win_imp[in_layer, j]
            if not np.isfinite(lay) or not np.isfinite(sing).all():
                continue
            p_layers.append(int(layer))
            p_windows.append(int(w))
            p_single.append(float(sing.max()))
            p_layer.append(float(lay))
    single_vs_layer = compare_impacts(
        p_single,
        p_layer,
        seed=rng,
        labels=("max_single_head", "whole_layer"),
        paired=True,
        n_permutations=n_permutations,
    )
    logger.info(
        "routing: Gini rare %.3f vs common %.3f (p=%.3g, rho=%.2f); impact top %.3f vs "
        "random %.3f, max single %.3f vs layer %.3f",
        gini_cmp.grand_mean_rare, gini_cmp.grand_mean_common, gini_cmp.paired_p,
        gini_cmp.spearman_rho, top_vs_random.mean_a, top_vs_random.mean_b,
        single_vs_layer.mean_a, single_vs_layer.mean_b,
    )  # fmt: skip
    return RoutingResult(
        group_name=group_name,
        neuron_ids=frozen(ablation.neuron_ids),
        gini=gini_cmp,
        n_rare_positions=int(rare.size),
        n_common_positions=int(common.size),
        impact_positions=impact_positions,
        single_heads=frozen(heads),
        single_impact=frozen(impacts[single]),
        single_signed=frozen(signed[single]),
        layers=frozen(layers),
        layer_impact=frozen(impacts[whole]),
        layer_signed=frozen(signed[whole]),
        selection_windows=frozen(sel_w),
        evaluation_windows=frozen(eval_w),
        cross_fitted=cross,
        top_heads=frozen(top),
        random_heads=frozen(rand),
        top_eval_impact=frozen(top_eval),
        random_eval_impact=frozen(rand_eval),
        top_vs_random=top_vs_random,
        pair_layers=frozen(np.asarray(p_layers, dtype=np.int64)),
        pair_windows=frozen(np.asarray(p_windows, dtype=np.int64)),
        pair_max_single=frozen(np.asarray(p_single, dtype=np.float64)),
        pair_layer=frozen(np.asarray(p_layer, dtype=np.float64)),
        single_vs_layer=single_vs_layer,
        baseline_max_abs_diff=ablation.baseline_max_abs_diff,
    )
