"""The four analyses (paper §4.2–4.5) of one MLP layer's rare-token group (issue 12, part 1).

Pure logic on arrays: the model work (activations, weights, routing re-runs) and the cache are
in :mod:`.layers_analyses_stage`.

Group
    :func:`layer_group`: the plateau of the layer's regime fit
    (:class:`~raretoken.run.layers_results.LayerRegime`), or, when it has fewer than two
    neurons or the fit failed, the top-k neurons by the values the fit was made on, with
    ``k = fallback_k`` or :func:`~raretoken.analyses.groups.default_topk` — the rule of
    :func:`~raretoken.analyses.groups.plateau_group` (``fallback=True`` and a note).
Analyses
    :func:`analyses_of_layer` runs coordination (``d_eff / N``, eq. 4), spatial organisation (MI
    graph and Louvain modularity, eqs. 5–6), weight spectra (Hill α of the layer's weights,
    eqs. 9–10) and, when given a :class:`LayerRouting`, attention routing (Gini of the heads of
    the blocks feeding the layer's MLP, head ablations, eqs. 7–8), each against the same
    size-matched random groups of the same layer. Seeds are spawned as in
    :func:`~raretoken.analyses.robustness.analyses_for_split` (random groups, Louvain, routing:
    ``np.random.SeedSequence(seed).spawn(3)``), so for the final layer, with the run's group,
    activations, weights and seed, it gives the run's own results. An analysis that cannot be
    computed (e.g. dead neurons, too few rare positions in the routing windows) is recorded in
    ``errors``; the others still run.
Final layer
    :func:`final_layer_analyses` reads the run's own analyses (``analyses/analyses.json``,
    written by :func:`~raretoken.analyses.suite.write_analyses`) instead of recomputing them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..analyses._tables import frozen
from ..analyses.groups import NeuronGroup, default_topk, topk_neurons
from ..analyses.robustness import SplitAnalyses, four_analyses
from ..analyses.routing import RoutingResult, routing_analysis
from ..analyses.routing_runs import RoutingContext
from ..errors import ConfigError
from .layers_results import LayerRegime
from .outputs import read_json

log = logging.getLogger(__name__)


__all__ = [
    "ANALYSES_FILE",
    "LayerAnalyses",
    "LayerRouting",
    "analyses_of_layer",
    "final_layer_analyses",
    "layer_group",
    "run_analysis_settings",
]

#: The run's own analyses, relative to the run directory.
ANALYSES_FILE = "analyses/analyses.json"

#: Settings of the run's analyses the per-layer analyses follow, with their defaults (those of
#: :func:`~raretoken.analyses.suite.run_analyses`).
DEFAULT_SETTINGS: dict[str, Any] = {
    "weight_name": "out",
    "coordination_positions": "all",
    "impact_positions": "all",
    "fallback_k": None,
    "tau": 0.95,
    "mi_bins": None,
}


def layer_group(regime: LayerRegime, fallback_k: int | None = None) -> NeuronGroup:
    """The layer's plateau, or its top-k by the fitted values (see module docstring)."""
    ids = regime.neuron_ids
    plateau = np.zeros(0, np.int64) if regime.fit is None else regime.fit.plateau_neurons
    plateau = np.sort(np.asarray(plateau, dtype=np.int64))
    if plateau.size >= 2:
        return NeuronGroup("plateau", "plateau", frozen(plateau), layer=regime.layer)
    k = default_topk(ids.size) if fallback_k is None else int(fallback_k)
    if regime.fit is None:
        why = f"no regime fit ({regime.error})"
    else:
        why = "no plateau found" if plateau.size == 0 else "the plateau has a single neuron"
    note = (
        f"{why}; fell back to the top-{k} neurons by rare-token "
        f"{'|screen|' if regime.values_kind == 'screen' else 'Δloss'}"
    )
    log.info("layer %d: %s", regime.layer, note)
    top = topk_neurons(regime.values, k, ids)
    return NeuronGroup(f"top-{k}", "topk", frozen(top), layer=regime.layer, fallback=True,
                       note=note)  # fmt: skip


@dataclass(frozen=True, eq=False)
class LayerRouting:
    """What the routing analysis of one layer needs: the model context (its Gini array and
    ablations cover ``windows`` of the sample only) and the rare, common and uniform rows
    renumbered into those windows' scored positions."""

    context: RoutingContext
    windows: np.ndarray
    rare: np.ndarray
    common: np.ndarray
    uniform: np.ndarray


@dataclass(frozen=True, eq=False)
class LayerAnalyses:
    """The four analyses of one layer's group against random groups of the same layer.

    Attributes
    ----------
    layer:
        Normalised layer index.
    source:
        ``"run"`` (the run's own ``analyses/analyses.json``, final layer) or ``"layers"``
        (computed by the per-layer stage).
    n_random, seed:
        Random groups per baseline and the seed of every random choice.
    n_positions:
        Rows of the activations analysed (``None`` when unknown).
    routing_windows:
        Windows the routing re-ran (``None``: routing not run).
    analyses:
        The results (:class:`~raretoken.analyses.robustness.SplitAnalyses`: group, random
        groups, the four results or the reasons they are missing, seconds).
    """

    layer: int
    source: str
    n_random: int
    seed: int
    n_positions: int | None
    routing_windows: int | None
    analyses: SplitAnalyses

    @property
    def group(self) -> NeuronGroup:
        return self.analyses.group

    def row(self) -> dict[str, Any]:
        """One row of ``layers/analyses.csv`` (effect sizes: z against the random groups)."""
        a = self.analyses
        base = a.row()
        c, s, h, t = a.coordination, a.spatial, a.spectra, a.routing
        r: dict[str, Any] = {
            "layer": self.layer, "source": self.source, "group": a.group.name,
            "definition": a.group.definition, "fallback": a.group.fallback,
            "group_size": a.group.size, "n_random": self.n_random,
            "n_positions": self.n_positions,
            "d_eff_ratio": base["d_eff_ratio"], "d_eff_ratio_random": base["d_eff_ratio_random"],
            "z_d_eff": None if c is None else _num(c.comparison.z_score),
            "p_d_eff": base["p_d_eff"],
            "modularity_q": base["modularity_q"],
            "modularity_q_random": base["modularity_q_random"],
            "z_q": None if s is None else _num(s.q_comparison.z_score), "p_q": base["p_q"],
            "alpha_tail_hill": base["alpha_tail_hill"],
            "alpha_tail_hill_random": base["alpha_tail_hill_random"],
            "z_alpha": None if h is None else _num(h.comparison.z_score),
            "p_alpha": base["p_alpha"],
            "routing_windows": self.routing_windows,
            "gini_rare": base["gini_rare"], "gini_common": base["gini_common"],
            "gini_diff": None if t is None else _num(
                t.gini.grand_mean_rare - t.gini.grand_mean_common),
            "p_gini": base["p_gini"],
            "max_single_impact": base["max_single_impact"], "layer_impact": base["layer_impact"],
            "impact_diff": None if t is None else _num(t.single_vs_layer.mean_difference),
            "p_single_vs_layer": base["p_single_vs_layer"],
        }  # fmt: skip
        for claim in ("coordination", "spatial", "routing", "spectra"):
            r[f"verdict_{claim}"] = base[f"verdict_{claim}"]
        r["errors"] = base["errors"]
        return r

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "source": self.source,
            "n_random": self.n_random,
            "seed": self.seed,
            "n_positions": self.n_positions,
            "routing_windows": self.routing_windows,
            "analyses": self.analyses.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LayerAnalyses:
        n_pos, rw = d.get("n_positions"), d.get("routing_windows")
        return cls(
            layer=int(d["layer"]),
            source=str(d["source"]),
            n_random=int(d["n_random"]),
            seed=int(d["seed"]),
            n_positions=None if n_pos is None else int(n_pos),
            routing_windows=None if rw is None else int(rw),
            analyses=SplitAnalyses.from_dict(d["analyses"]),
        )


def _num(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def analyses_of_layer(
    acts: np.ndarray,
    weights: np.ndarray,
    group: NeuronGroup,
    *,
    layer: int,
    n_random: int,
    seed: int,
    routing: LayerRouting | None = None,
    weight_name: str = "out",
    coordination_positions: str = "all",
    impact_positions: str = "all",
    tau: float = 0.95,
    mi_bins: int | None = None,
    n_rare_positions: int = 0,
    n_common_positions: int = 0,
    percentile: float | None = None,
) -> LayerAnalyses:
    """The four analyses of ``group`` in one layer (see module docstring).

    Parameters
    ----------
    acts:
        ``(n_positions, d_mlp)`` activations of the layer at the positions to analyse (the
        run's uniform sample of positions, or its rare-target positions).
    weights:
        ``(d_mlp, d)`` weights of the layer for the spectra (one row per neuron).
    group:
        The layer's group (:func:`layer_group`).
    layer, n_random, seed:
        Layer index (recorded), random groups (>= 2) and seed.
    routing:
        Routing inputs; ``None`` skips routing.
    weight_name, coordination_positions, impact_positions, tau, mi_bins:
        As for :func:`~raretoken.analyses.suite.run_analyses` (recorded; the rows passed decide
        the coordination positions).
    n_rare_positions, n_common_positions, percentile:
        Recorded in the result.
    """
    if isinstance(n_random, bool) or int(n_random) != n_random or n_random < 2:
        raise ConfigError(f"n_random must be an integer >= 2 for a random baseline, got {n_random}")
    a = np.asarray(acts)
    w = np.asarray(weights)
    if a.ndim != 2 or w.ndim != 2 or a.shape[1] != w.shape[0]:
        raise ConfigError(
            f"acts (n_positions, d_mlp) and weights (d_mlp, d) disagree: {a.shape}, {w.shape}"
        )
    rout: Callable[[np.ndarray, np.random.Generator], RoutingResult] | None = None
    if routing is not None:
        r = routing

        def rout(ids: np.ndarray, rng: np.random.Generator) -> RoutingResult:
            return routing_analysis(
                r.context.gini(), r.context.ablation(ids), r.rare, r.common, seed=rng,
                group_name=group.name, impact_positions=impact_positions,
                n_random=int(n_random), uniform_positions=r.uniform,
            )  # fmt: skip

    res = four_analyses(
        a, group, lambda: w, n_neurons=int(a.shape[1]), n_random=int(n_random), seed=int(seed),
        weight_name=weight_name, routing=rout, coordination_positions=coordination_positions,
        tau=tau, mi_bins=mi_bins, label=f"layer {layer}", percentile=percentile,
        n_rare_positions=int(n_rare_positions), n_common_positions=int(n_common_positions),
        strict=False,
    )  # fmt: skip
    return LayerAnalyses(
        layer=int(layer),
        source="layers",
        n_random=int(n_random),
        seed=int(seed),
        n_positions=int(a.shape[0]),
        routing_windows=None if routing is None else int(routing.windows.size),
        analyses=res,
    )


def _run_analyses(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / ANALYSES_FILE
    return read_json(path) if path.is_file() else None


def run_analysis_settings(run_dir: Path) -> dict[str, Any]:
    """The settings of the run's own analyses that the per-layer analyses follow (defaults of
    :func:`~raretoken.analyses.suite.run_analyses` where the run has none)."""
    d = _run_analyses(Path(run_dir))
    given = {} if d is None else dict(d.get("settings") or {})
    return {k: given.get(k, v) for k, v in DEFAULT_SETTINGS.items()}


def final_layer_analyses(run_dir: Path | str, layer: int) -> LayerAnalyses | None:
    """The run's own analyses of the final layer (``None`` when it has none)."""
    d = _run_analyses(Path(run_dir))
    if d is None:
        return None
    try:
        main = SplitAnalyses.from_dict(d["main"])
        n_random, seed = int(d["n_random"]), int(d["seed"])
    except (KeyError, TypeError, ValueError) as exc:
        log.warning("%s is unreadable (%s): the final layer's analyses are recomputed",
                    ANALYSES_FILE, exc)  # fmt: skip
        return None
    c, t = main.coordination, main.routing
    windows = None
    if t is not None:
        windows = int(np.union1d(t.selection_windows, t.evaluation_windows).size)
    return LayerAnalyses(
        layer=int(layer),
        source="run",
        n_random=n_random,
        seed=seed,
        n_positions=None if c is None else int(c.observed.n_samples),
        routing_windows=windows,
        analyses=main,
    )
