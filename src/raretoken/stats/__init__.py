"""Statistics on neuron influence and activations.

Exports are resolved lazily (PEP 562, see :mod:`raretoken._lazy`): ``import raretoken.stats``
imports no submodule, and ``raretoken.stats.<name>`` imports the submodule that defines
``<name>`` on first access. To export a name, add it to ``_EXPORTS`` (name -> submodule) and a
``from .module import name as name`` line to the ``TYPE_CHECKING`` block.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from raretoken._lazy import lazy_exports

if TYPE_CHECKING:
    from .baselines import BaselineComparison as BaselineComparison
    from .baselines import compare_to_random as compare_to_random
    from .baselines import random_groups as random_groups
    from .chunks import ColumnSum as ColumnSum
    from .chunks import RowChunks as RowChunks
    from .cluster_bootstrap import RatioInterval as RatioInterval
    from .cluster_bootstrap import ratio_interval as ratio_interval
    from .covariates import NeuronCovariates as NeuronCovariates
    from .covariates import default_null_space_k as default_null_space_k
    from .covariates import neuron_covariates as neuron_covariates
    from .covariates import unembedding_null_space as unembedding_null_space
    from .effective_dim import EffectiveDimension as EffectiveDimension
    from .effective_dim import effective_dimension as effective_dimension
    from .hill import HillFit as HillFit
    from .hill import group_spectrum as group_spectrum
    from .hill import hill_alpha as hill_alpha
    from .matching import CovariateBalance as CovariateBalance
    from .matching import MatchedGroups as MatchedGroups
    from .matching import matched_random_groups as matched_random_groups
    from .mean_bootstrap import MeanInterval as MeanInterval
    from .mean_bootstrap import mean_interval as mean_interval
    from .modularity import ModularityResult as ModularityResult
    from .modularity import louvain_modularity as louvain_modularity
    from .modularity import mi_graph as mi_graph
    from .modularity import modularity_q as modularity_q
    from .mutual_info import MutualInfoMatrix as MutualInfoMatrix
    from .mutual_info import mutual_information as mutual_information
    from .mutual_info import mutual_information_matrix as mutual_information_matrix
    from .regime_bootstrap import bootstrap_regimes as bootstrap_regimes
    from .regime_bootstrap import window_of_rows as window_of_rows
    from .regime_bootstrap_result import RegimeBootstrap as RegimeBootstrap
    from .regime_fit import fit_regimes as fit_regimes
    from .regime_results import RegimeFit as RegimeFit
    from .regime_results import RegimeSettings as RegimeSettings
    from .regime_results import SegmentFit as SegmentFit
    from .replication import Replication as Replication
    from .replication import expected_jaccard as expected_jaccard
    from .replication import jaccard as jaccard
    from .replication import replicate_plateau as replicate_plateau
    from .replication import split_windows as split_windows
    from .routing import GiniComparison as GiniComparison
    from .routing import ImpactComparison as ImpactComparison
    from .routing import ablation_impact as ablation_impact
    from .routing import benjamini_hochberg as benjamini_hochberg
    from .routing import causal_mask as causal_mask
    from .routing import cohens_d as cohens_d
    from .routing import compare_head_gini as compare_head_gini
    from .routing import compare_impacts as compare_impacts
    from .routing import gini as gini
    from .routing import relative_norm_change as relative_norm_change
    from .segmented import PiecewiseLinearFit as PiecewiseLinearFit
    from .segmented import segmented_regression as segmented_regression
    from .specificity import Selectivity as Selectivity
    from .specificity import TopOverlap as TopOverlap
    from .specificity import selective_group as selective_group
    from .specificity import selectivity as selectivity
    from .specificity import top_overlap as top_overlap

_EXPORTS: dict[str, str] = {
    # three-regime rank-curve fit (paper eq. 11); raretoken.stats.regimes re-exports them all
    "PiecewiseLinearFit": "segmented",
    "segmented_regression": "segmented",
    "RegimeFit": "regime_results",
    "RegimeSettings": "regime_results",
    "SegmentFit": "regime_results",
    "fit_regimes": "regime_fit",
    # regime_bootstrap.py: bootstrap of the regime fit over windows (or positions)
    "RegimeBootstrap": "regime_bootstrap_result",
    "bootstrap_regimes": "regime_bootstrap",
    "window_of_rows": "regime_bootstrap",
    # chunks.py: rows of a (memory-mapped) matrix read in chunks, exact column sums
    "ColumnSum": "chunks",
    "RowChunks": "chunks",
    # effective_dim.py: PCA effective dimension of a neuron group (eq. 4, Table 1)
    "EffectiveDimension": "effective_dim",
    "effective_dimension": "effective_dim",
    # mutual_info.py: pairwise mutual information between neurons (eq. 5)
    "MutualInfoMatrix": "mutual_info",
    "mutual_information_matrix": "mutual_info",
    "mutual_information": "mutual_info",
    # modularity.py: Louvain communities of the MI graph (eq. 6, Table 3)
    "ModularityResult": "modularity",
    "louvain_modularity": "modularity",
    "mi_graph": "modularity",
    "modularity_q": "modularity",
    # routing.py: attention Gini, rare vs common routing, ablation impact (eq. 7-8, Table 2)
    "gini": "routing",
    "causal_mask": "routing",
    "GiniComparison": "routing",
    "compare_head_gini": "routing",
    "ablation_impact": "routing",
    "relative_norm_change": "routing",
    "ImpactComparison": "routing",
    "compare_impacts": "routing",
    "benjamini_hochberg": "routing",
    "cohens_d": "routing",
    # hill.py: heavy-tailed weight spectra, Hill estimator (eq. 9-10, Figure 2)
    "HillFit": "hill",
    "group_spectrum": "hill",
    "hill_alpha": "hill",
    # baselines.py: size-matched random groups and the comparison against them
    "BaselineComparison": "baselines",
    "random_groups": "baselines",
    "compare_to_random": "baselines",
    # covariates.py: per-neuron covariates (weight norms, activation moments, vocabulary
    # projection moments, unigram cosine, unembedding null-space fraction)
    "NeuronCovariates": "covariates",
    "default_null_space_k": "covariates",
    "neuron_covariates": "covariates",
    "unembedding_null_space": "covariates",
    # matching.py: random groups matched to a group on quantile-binned covariates
    "CovariateBalance": "matching",
    "MatchedGroups": "matching",
    "matched_random_groups": "matching",
    # specificity.py: overlap with the top common-token neurons, per-neuron selectivity
    "Selectivity": "specificity",
    "TopOverlap": "specificity",
    "selective_group": "specificity",
    "selectivity": "specificity",
    "top_overlap": "specificity",
    # cluster_bootstrap.py: Δrare / Δcommon with a window-cluster bootstrap interval
    "RatioInterval": "cluster_bootstrap",
    "ratio_interval": "cluster_bootstrap",
    # mean_bootstrap.py: per-neuron mean |Δloss| with a window-cluster bootstrap interval
    "MeanInterval": "mean_bootstrap",
    "mean_interval": "mean_bootstrap",
    # replication.py: split-half replication of the plateau
    "Replication": "replication",
    "expected_jaccard": "replication",
    "jaccard": "replication",
    "replicate_plateau": "replication",
    "split_windows": "replication",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
