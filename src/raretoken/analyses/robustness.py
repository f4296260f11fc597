"""All four analyses for one rare/common split and group, and the robustness sweep.

:func:`analyses_for_split` runs coordination, spatial organisation, weight spectra and (with
a :class:`~raretoken.analyses.routing.RoutingContext`) attention routing for given rare and
common positions and a given neuron group. :func:`robustness_table` loops it over
rare-token percentiles (paper §3.1: "we verified the robustness of our findings across
multiple percentile thresholds") and group definitions (plateau of the re-fitted rank curve,
top-k by Δloss, and the rare-selective neurons — see
:func:`~raretoken.analyses.groups.group_for_split`) and gathers one row per (percentile,
definition).

Seeds: each split's random groups, Louvain runs and routing permutations come from
``np.random.SeedSequence(seed).spawn(3)`` (in that order), so every row of a sweep uses the
same seed streams and a rerun with the same seed reproduces every table. In the sweep,
an analysis that cannot be computed for one split (e.g. routing with fewer than 2
rare-target positions at a low percentile) leaves its columns empty and records the reason
in the row's ``errors``; the other analyses of that row still run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from tqdm.auto import tqdm

from raretoken.errors import ConfigError, RareTokenError

from ._tables import frozen, markdown_table, write_csv
from .claims import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED, verdicts_of
from .coordination import CoordinationResult, coordination_analysis
from .groups import (
    DEFINITIONS,
    NeuronGroup,
    group_for_split,
    random_control_groups,
    split_positions,
)
from .routing import RoutingContext, RoutingResult, routing_analysis
from .spatial import SpatialResult, spatial_analysis
from .spectra import SpectraResult, layer_weights, spectra_analysis

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from raretoken.run.identification import Identification

logger = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_PERCENTILES = (5.0, 10.0, 15.0, 20.0, 25.0)
DEFAULT_DEFINITIONS = ("plateau", "topk", "selective")

_VERDICTS = (SUPPORTED, NOT_SUPPORTED, INCONCLUSIVE)

__all__ = [
    "DEFAULT_DEFINITIONS",
    "DEFAULT_PERCENTILES",
    "RobustnessTable",
    "SplitAnalyses",
    "analyses_for_split",
    "robustness_table",
]


@dataclass(frozen=True, eq=False)
class SplitAnalyses:
    """The analyses of one (split, group).

    Attributes
    ----------
    label:
        Row label (e.g. ``"p15/plateau"``).
    percentile:
        Rare-token percentile of the split, if known.
    group:
        The analysed group.
    n_rare_positions, n_common_positions:
        Scored positions with a rare / common target.
    random_groups:
        ``(n_random, |group|)`` random groups drawn (before skipping undefined ones).
    coordination, spatial, spectra, routing:
        Results (``None`` when not run or failed, see ``errors``).
    errors:
        Analysis name -> one-line reason it was not computed.
    """

    label: str
    percentile: float | None
    group: NeuronGroup
    n_rare_positions: int
    n_common_positions: int
    random_groups: np.ndarray
    coordination: CoordinationResult | None
    spatial: SpatialResult | None
    spectra: SpectraResult | None
    routing: RoutingResult | None
    errors: Mapping[str, str] = field(default_factory=dict)
    seconds: Mapping[str, float] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        """One flat row of the robustness table."""
        r: dict[str, Any] = {
            "label": self.label,
            "percentile": self.percentile,
            "group": self.group.name,
            "definition": self.group.definition,
            "fallback": self.group.fallback,
            "n_neurons": self.group.size,
            "n_rare_positions": self.n_rare_positions,
            "n_common_positions": self.n_common_positions,
        }
        c, s, h, t = self.coordination, self.spatial, self.spectra, self.routing
        r["d_eff_ratio"] = None if c is None else c.observed.ratio
        r["d_eff_ratio_random"] = None if c is None else c.comparison.random_mean
        r["p_d_eff"] = None if c is None else c.comparison.p_value
        r["modularity_q"] = None if s is None else s.observed.q
        r["modularity_q_random"] = None if s is None else s.q_comparison.random_mean
        r["p_q"] = None if s is None else s.q_comparison.p_value
        r["alpha_tail_hill"] = None if h is None else h.observed.alpha
        r["alpha_tail_hill_random"] = None if h is None else h.comparison.random_mean
        r["alpha_pdf_ks"] = (
            None if h is None or not h.observed_ks.fitted else h.observed_ks.alpha_pdf
        )
        r["p_alpha"] = None if h is None else h.comparison.p_value
        r["gini_rare"] = None if t is None else t.gini.grand_mean_rare
        r["gini_common"] = None if t is None else t.gini.grand_mean_common
        r["p_gini"] = None if t is None else t.gini.paired_p
        r["gini_spearman_rho"] = None if t is None else t.gini.spearman_rho
        r["max_single_impact"] = None if t is None else t.single_vs_layer.mean_a
        r["layer_impact"] = None if t is None else t.single_vs_layer.mean_b
        r["p_single_vs_layer"] = None if t is None else t.single_vs_layer.p_permutation
        for claim, verdict in self.verdicts().items():
            r[f"verdict_{claim}"] = verdict
        r["errors"] = "; ".join(f"{k}: {v}" for k, v in self.errors.items()) or None
        return r

    def verdicts(self) -> dict[str, str | None]:
        """The claims' verdicts on this row (rules of :mod:`.claims`; ``None``: not run)."""
        return verdicts_of(self.coordination, self.spatial, self.routing, self.spectra)

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "percentile": self.percentile,
            "group": self.group.to_dict(),
            "n_rare_positions": self.n_rare_positions,
            "n_common_positions": self.n_common_positions,
            "random_groups": self.random_groups.tolist(),
            "coordination": None if self.coordination is None else self.coordination.to_dict(),
            "spatial": None if self.spatial is None else self.spatial.to_dict(),
            "spectra": None if self.spectra is None else self.spectra.to_dict(),
            "routing": None if self.routing is None else self.routing.to_dict(),
            "errors": dict(self.errors),
            "seconds": dict(self.seconds),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SplitAnalyses:
        group = NeuronGroup.from_dict(d["group"])
        pct = d.get("percentile")

        def opt(key: str, make: Callable[[Mapping[str, Any]], T]) -> T | None:
            return None if d.get(key) is None else make(d[key])

        return cls(
            label=str(d["label"]),
            percentile=None if pct is None else float(pct),
            group=group,
            n_rare_positions=int(d["n_rare_positions"]),
            n_common_positions=int(d["n_common_positions"]),
            random_groups=frozen(
                np.asarray(d["random_groups"], dtype=np.int64).reshape(-1, group.size)
            ),
            coordination=opt("coordination", CoordinationResult.from_dict),
            spatial=opt("spatial", SpatialResult.from_dict),
            spectra=opt("spectra", SpectraResult.from_dict),
            routing=opt("routing", RoutingResult.from_dict),
            errors={str(k): str(v) for k, v in d.get("errors", {}).items()},
            seconds={str(k): float(v) for k, v in d.get("seconds", {}).items()},
        )


def analyses_for_split(
    ident: Identification,
    rare_positions: np.ndarray,
    common_positions: np.ndarray,
    group: NeuronGroup,
    *,
    n_random: int,
    seed: int,
    weights: np.ndarray | None = None,
    weight_name: str = "out",
    routing: RoutingContext | None = None,
    coordination_positions: str = "all",
    impact_positions: str = "all",
    tau: float = 0.95,
    mi_bins: int | None = None,
    label: str | None = None,
    percentile: float | None = None,
    strict: bool = True,
) -> SplitAnalyses:
    """Run the analyses of one split and group (see the module docstring).

    Parameters
    ----------
    ident:
        The identification (its ``acts`` are the activations analysed).
    rare_positions, common_positions:
        Rows of ``ident.acts`` whose target is rare / common.
    group:
        The neuron group (e.g. :func:`~raretoken.analyses.groups.plateau_group`).
    n_random:
        Size-matched random groups (>= 2; the paper's baselines use 100).
    seed:
        Seed of every random choice.
    weights:
        ``(d_mlp, d)`` layer weights for the spectra (default: ``weight_name`` weights of
        the final layer, read from the model).
    weight_name:
        ``"out"``, ``"in"``, ``"up"`` or ``"gate"`` (see
        :func:`~raretoken.analyses.spectra.layer_weights`).
    routing:
        Model context for the routing analysis; ``None`` skips it.
    coordination_positions:
        ``"all"`` scored positions or ``"rare"`` ones for ``d_eff`` and MI.
    impact_positions:
        ``"all"`` or ``"rare"`` positions for the ablation impact.
    tau:
        Explained-variance threshold ``τ`` of ``d_eff`` (eq. 4).
    mi_bins:
        Equal-frequency bins of the MI estimator (default: its rule,
        :func:`~raretoken.stats.mutual_info.default_bins`).
    label, percentile:
        Row label and percentile recorded in the result.
    strict:
        Raise on the first failing analysis (default); otherwise record the error and go on.
    """
    if coordination_positions not in ("all", "rare"):
        raise ConfigError(
            f"coordination_positions must be 'all' or 'rare', got {coordination_positions!r}"
        )
    rare = np.asarray(rare_positions, dtype=np.int64)
    common = np.asarray(common_positions, dtype=np.int64)
    acts = ident.acts
    rows = acts[ident.uniform_positions] if coordination_positions == "all" else acts[rare]

    def route(ids: np.ndarray, rng: np.random.Generator) -> RoutingResult:
        assert routing is not None
        return routing_analysis(
            routing.gini(), routing.ablation(ids), rare, common, seed=rng,
            group_name=group.name, impact_positions=impact_positions, n_random=n_random,
            uniform_positions=ident.uniform_positions, ablation_rows=routing.rows,
        )  # fmt: skip

    return four_analyses(
        rows,
        group,
        lambda: (
            layer_weights(ident.stages.loaded.adapter, weight_name) if weights is None else weights
        ),
        n_neurons=int(acts.shape[1]),
        n_random=n_random,
        seed=seed,
        weight_name=weight_name,
        routing=route if routing is not None else None,
        coordination_positions=coordination_positions,
        tau=tau,
        mi_bins=mi_bins,
        label=label or group.name,
        percentile=percentile,
        n_rare_positions=int(rare.size),
        n_common_positions=int(common.size),
        strict=strict,
    )


def four_analyses(
    rows: np.ndarray,
    group: NeuronGroup,
    weights: Callable[[], np.ndarray],
    *,
    n_neurons: int,
    n_random: int,
    seed: int,
    weight_name: str = "out",
    routing: Callable[[np.ndarray, np.random.Generator], RoutingResult] | None = None,
    coordination_positions: str = "all",
    tau: float = 0.95,
    mi_bins: int | None = None,
    label: str,
    percentile: float | None = None,
    n_rare_positions: int = 0,
    n_common_positions: int = 0,
    strict: bool = True,
) -> SplitAnalyses:
    """The four analyses of ``group`` against ``n_random`` size-matched random groups.

    The core of :func:`analyses_for_split` (the final layer of a run) and of the per-layer
    analyses (:mod:`raretoken.run.layers_analyses`): d_eff and the MI graph on ``rows``
    (activations, positions × ``n_neurons``), spectra on ``weights()`` (read only when
    needed), routing by ``routing(ids, rng)`` when given. Seeds: ``seed`` spawns the random
    groups', the MI estimator's and routing's generators, in that order. With ``strict`` the
    first failing analysis raises; otherwise its error is recorded and the others run.
    """
    ss_groups, ss_spatial, ss_routing = np.random.SeedSequence(seed).spawn(3)
    rgroups = random_control_groups(
        group, n_neurons, n_random, seed=np.random.default_rng(ss_groups)
    )
    errors: dict[str, str] = {}
    seconds: dict[str, float] = {}

    def attempt(name: str, fn: Callable[[], T]) -> T | None:
        t0 = time.perf_counter()
        try:
            return fn()
        except RareTokenError as err:
            if strict:
                raise
            logger.warning("%s: %s skipped: %s", label, name, err)
            errors[name] = str(err).splitlines()[0] if str(err) else type(err).__name__
            return None
        finally:
            seconds[name] = round(time.perf_counter() - t0, 3)

    ids, name = group.neuron_ids, group.name
    coord = attempt("coordination", lambda: coordination_analysis(
        rows, ids, rgroups, group_name=name, threshold=tau, positions=coordination_positions))  # fmt: skip
    spat = attempt("spatial", lambda: spatial_analysis(
        rows, ids, rgroups, seed=np.random.default_rng(ss_spatial), group_name=name,
        bins=mi_bins))  # fmt: skip
    spec = attempt("spectra", lambda: spectra_analysis(
        weights(), ids, rgroups, group_name=name, weight_name=weight_name))  # fmt: skip
    rout: RoutingResult | None = None
    if routing is not None:
        route = routing
        rout = attempt("routing", lambda: route(ids, np.random.default_rng(ss_routing)))
    return SplitAnalyses(
        label=label,
        percentile=percentile,
        group=group,
        n_rare_positions=int(n_rare_positions),
        n_common_positions=int(n_common_positions),
        random_groups=frozen(rgroups),
        coordination=coord,
        spatial=spat,
        spectra=spec,
        routing=rout,
        errors=errors,
        seconds=seconds,
    )


@dataclass(frozen=True, eq=False)
class RobustnessTable:
    """One row per (percentile, group definition) of the robustness sweep."""

    results: tuple[SplitAnalyses, ...]
    n_random: int
    seed: int
    skipped: Mapping[str, str] = field(default_factory=dict)

    def to_table(self) -> list[dict[str, Any]]:
        return [r.row() for r in self.results]

    def to_markdown(self) -> str:
        head = (
            "### Robustness across rare-token percentiles and group definitions\n\n"
            f"Each row re-splits rare/common targets at the percentile, re-derives the group "
            f"(plateau of the re-fitted Δloss rank curve, or top-k by Δloss) and reruns the "
            f"analyses against {self.n_random} random groups (seed {self.seed}). p-values: "
            "d_eff and α one-sided (less), Q one-sided (greater), Gini paired t across heads, "
            "single vs layer paired permutation.\n\n"
        )
        cols = [
            "percentile", "definition", "group", "fallback", "n_rare_positions", "d_eff_ratio",
            "d_eff_ratio_random", "p_d_eff", "modularity_q", "modularity_q_random", "p_q",
            "alpha_tail_hill", "alpha_tail_hill_random", "p_alpha", "alpha_pdf_ks", "gini_rare", "gini_common", "p_gini",
            "gini_spearman_rho", "p_single_vs_layer", "errors",
        ]  # fmt: skip
        tail = "".join(f"\nSkipped {k}: {v}\n" for k, v in self.skipped.items())
        freq = self.verdict_frequency()
        how_often = (
            "\n#### How often each verdict holds across the rows\n\n"
            "Verdicts by the rules of the claims table (α = 0.05) on every row above.\n\n"
            + markdown_table(freq, ["claim", *_VERDICTS, "not run", "rows"])
        )
        return head + markdown_table(self.to_table(), cols) + tail + how_often

    def verdict_frequency(self) -> list[dict[str, Any]]:
        """Per claim: in how many rows each verdict holds (and in how many it was not run)."""
        out = []
        rows = [r.verdicts() for r in self.results]
        for claim in ("coordination", "spatial", "routing", "spectra"):
            got = [v[claim] for v in rows]
            entry: dict[str, Any] = {"claim": claim}
            for verdict in _VERDICTS:
                entry[verdict] = sum(g == verdict for g in got)
            entry["not run"] = sum(g is None for g in got)
            entry["rows"] = len(got)
            out.append(entry)
        return out

    def to_csv(self, path: Path | str) -> None:
        write_csv(path, self.to_table())

    def plot(self, ax: Axes | None = None) -> Figure:
        """z-scores against random groups of d_eff/N, Q and α per percentile and definition."""
        from raretoken.plotting.analyses import new_axes, plot_robustness

        ax = new_axes() if ax is None else ax
        series: dict[str, tuple[list[float], list[float]]] = {}
        for r in self.results:
            if r.percentile is None:
                continue
            for name, res_cmp in (
                ("d_eff/N", None if r.coordination is None else r.coordination.comparison),
                ("Q", None if r.spatial is None else r.spatial.q_comparison),
                ("α_Hill", None if r.spectra is None else r.spectra.comparison),
            ):
                if res_cmp is None:
                    continue
                xs, ys = series.setdefault(f"{name} ({r.group.definition})", ([], []))
                xs.append(r.percentile)
                ys.append(res_cmp.z_score)
        plot_robustness(ax, series)
        return ax.figure  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        return {
            "results": [r.to_dict() for r in self.results],
            "n_random": self.n_random,
            "seed": self.seed,
            "skipped": dict(self.skipped),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RobustnessTable:
        return cls(
            results=tuple(SplitAnalyses.from_dict(r) for r in d["results"]),
            n_random=int(d["n_random"]),
            seed=int(d["seed"]),
            skipped={str(k): str(v) for k, v in d.get("skipped", {}).items()},
        )


def robustness_table(
    ident: Identification,
    *,
    n_random: int,
    seed: int,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
    definitions: Sequence[str] = DEFAULT_DEFINITIONS,
    k: int | None = None,
    routing: RoutingContext | bool = True,
    weight_name: str = "out",
    coordination_positions: str = "all",
    impact_positions: str = "all",
    tau: float = 0.95,
    mi_bins: int | None = None,
    progress: bool = True,
) -> RobustnessTable:
    """Rerun the analyses across rare-token percentiles and group definitions.

    Parameters
    ----------
    ident:
        The identification.
    n_random, seed:
        As in :func:`analyses_for_split`.
    percentiles:
        Rare-token percentiles (the paper uses 15 and checks others).
    definitions:
        ``"plateau"`` and/or ``"topk"``.
    k:
        Size of the top-k group (default :func:`~raretoken.analyses.groups.default_topk`).
    routing:
        ``True``: build a :class:`RoutingContext` from ``ident`` (model runs are shared by
        all rows; ablations are rerun only for new groups); ``False``: skip routing; or a
        context to reuse.
    weight_name, coordination_positions, impact_positions, tau, mi_bins:
        As in :func:`analyses_for_split`.
    progress:
        Show a progress bar over the rows.
    """
    for d in definitions:
        if d not in DEFINITIONS:
            raise ConfigError(
                f"unknown group definition {d!r}; expected one of {', '.join(DEFINITIONS)}"
            )
    if not percentiles or not definitions:
        raise ConfigError("need at least one percentile and one group definition")
    ctx: RoutingContext | None
    if isinstance(routing, RoutingContext):
        ctx = routing
    elif routing:
        ctx = RoutingContext.from_identification(ident)
    else:
        ctx = None
    weights = layer_weights(ident.stages.loaded.adapter, weight_name)
    jobs = [(float(p), d) for p in percentiles for d in definitions]
    results: list[SplitAnalyses] = []
    skipped: dict[str, str] = {}
    split_cache: dict[float, tuple[np.ndarray, np.ndarray]] = {}
    for pct, definition in tqdm(jobs, desc="robustness", disable=not progress):
        label = f"p{pct:g}/{definition}"
        try:
            if pct not in split_cache:
                split_cache[pct] = split_positions(ident, pct)[:2]
            rare, common = split_cache[pct]
            group = group_for_split(ident, rare, definition, k=k, common_positions=common)
        except RareTokenError as err:
            logger.warning("%s skipped: %s", label, err)
            skipped[label] = str(err)
            continue
        results.append(
            analyses_for_split(
                ident,
                rare,
                common,
                group,
                n_random=n_random,
                seed=seed,
                weights=weights,
                weight_name=weight_name,
                routing=ctx,
                coordination_positions=coordination_positions,
                impact_positions=impact_positions,
                tau=tau,
                mi_bins=mi_bins,
                label=label,
                percentile=pct,
                strict=False,
            )
        )
    return RobustnessTable(
        results=tuple(results), n_random=int(n_random), seed=int(seed), skipped=skipped
    )
