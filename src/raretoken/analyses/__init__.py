"""The four organisational analyses of the rare-token neurons (paper §3.2, §4.2–4.5).

One module per analysis, each a pure function to a frozen result that owns its plots:

* ``coordination.py`` — effective dimension d_eff (eq. 4, Table 1);
* ``spatial.py`` — mutual-information graph and Louvain modularity (eq. 5–6, Table 3);
* ``routing.py`` — attention Gini and head-ablation impact statistics (eq. 7–8, Table 2),
  on the model re-runs of ``routing_runs.py``;
* ``spectra.py`` — Hill α of the weight spectra with the fix-finger x_min (eq. 9–10, Fig. 2);
* ``groups.py`` (plateau, top-k and random groups), ``robustness.py`` (all analyses for one
  split, and the percentile × definition sweep), ``claims.py`` (verdicts on the paper's
  claims), ``suite.py`` (everything in one call, written into a run directory);
* reviewer checks: ``specificity.py`` (is the group rare-specific, does it replicate) and
  ``matched.py`` (the group-vs-random analyses against covariate-matched controls).

Exports are resolved lazily (PEP 562): ``import raretoken.analyses`` imports no submodule
(and no torch / matplotlib), and ``raretoken.analyses.<name>`` imports the submodule that
defines ``<name>`` on first access. To export a name, add it to ``_EXPORTS`` (name ->
submodule) and a ``from .module import name as name`` line to the ``TYPE_CHECKING`` block.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .claims import Claim as Claim
    from .claims import ClaimsTable as ClaimsTable
    from .claims import evaluate_claims as evaluate_claims
    from .coordination import CoordinationResult as CoordinationResult
    from .coordination import coordination_analysis as coordination_analysis
    from .groups import NeuronGroup as NeuronGroup
    from .groups import default_topk as default_topk
    from .groups import group_for_split as group_for_split
    from .groups import plateau_group as plateau_group
    from .groups import random_control_groups as random_control_groups
    from .groups import split_positions as split_positions
    from .groups import topk_group as topk_group
    from .matched import MatchedControls as MatchedControls
    from .matched import matched_controls as matched_controls
    from .robustness import RobustnessTable as RobustnessTable
    from .robustness import SplitAnalyses as SplitAnalyses
    from .robustness import analyses_for_split as analyses_for_split
    from .robustness import robustness_table as robustness_table
    from .routing import RoutingResult as RoutingResult
    from .routing import routing_analysis as routing_analysis
    from .routing_runs import HeadAblation as HeadAblation
    from .routing_runs import HeadGini as HeadGini
    from .routing_runs import RoutingContext as RoutingContext
    from .routing_runs import attention_gini as attention_gini
    from .routing_runs import head_ablation as head_ablation
    from .spatial import SpatialResult as SpatialResult
    from .spatial import spatial_analysis as spatial_analysis
    from .specificity import SpecificityResult as SpecificityResult
    from .specificity import analyze_specificity as analyze_specificity
    from .spectra import SpectraResult as SpectraResult
    from .spectra import layer_weights as layer_weights
    from .spectra import spectra_analysis as spectra_analysis
    from .suite import AnalysisSuite as AnalysisSuite
    from .suite import run_analyses as run_analyses
    from .suite import write_analyses as write_analyses

_EXPORTS: dict[str, str] = {
    "Claim": "claims",
    "ClaimsTable": "claims",
    "evaluate_claims": "claims",
    "CoordinationResult": "coordination",
    "coordination_analysis": "coordination",
    "NeuronGroup": "groups",
    "default_topk": "groups",
    "group_for_split": "groups",
    "plateau_group": "groups",
    "random_control_groups": "groups",
    "split_positions": "groups",
    "topk_group": "groups",
    "MatchedControls": "matched",
    "matched_controls": "matched",
    "SpecificityResult": "specificity",
    "analyze_specificity": "specificity",
    "RobustnessTable": "robustness",
    "SplitAnalyses": "robustness",
    "analyses_for_split": "robustness",
    "robustness_table": "robustness",
    "HeadAblation": "routing_runs",
    "HeadGini": "routing_runs",
    "RoutingContext": "routing_runs",
    "RoutingResult": "routing",
    "attention_gini": "routing_runs",
    "head_ablation": "routing_runs",
    "routing_analysis": "routing",
    "SpatialResult": "spatial",
    "spatial_analysis": "spatial",
    "SpectraResult": "spectra",
    "layer_weights": "spectra",
    "spectra_analysis": "spectra",
    "AnalysisSuite": "suite",
    "run_analyses": "suite",
    "write_analyses": "suite",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
