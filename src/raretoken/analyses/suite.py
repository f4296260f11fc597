"""Run the four organisational analyses on an identification and write their outputs.

>>> from raretoken.run import identify, make_config                       # doctest: +SKIP
>>> from raretoken.analyses import run_analyses, write_analyses           # doctest: +SKIP
>>> ident = identify(make_config(preset="demo"), "raretoken-runs/demo")   # doctest: +SKIP
>>> suite = run_analyses(ident, n_random=100, seed=0)                     # doctest: +SKIP
>>> print(suite.claims.to_markdown())                                     # doctest: +SKIP
>>> write_analyses(suite, ident.run_dir)                                  # doctest: +SKIP

:func:`run_analyses` picks the group (:func:`~raretoken.analyses.groups.plateau_group`: the
plateau neurons, or the top-k neurons by Δloss when the fit found no plateau — recorded in
the group and shown in every report), runs coordination, spatial organisation, routing (needs
the model; loaded lazily) and weight spectra on the identification's rare/common split with
:func:`~raretoken.analyses.robustness.analyses_for_split`, and judges the paper's claims
(:func:`~raretoken.analyses.claims.evaluate_claims`). Optionally it adds the robustness
sweep over percentiles and group definitions.

:func:`write_analyses` writes ``analyses/*.md|csv|json`` and ``figures/*.png|svg`` into a
run directory (atomically) and returns ``{relative path: description}`` for the manifest.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from raretoken.ablation.group import row_inputs
from raretoken.errors import ConfigError, InsufficientDataError, RareTokenError
from raretoken.storage import atomic_write_bytes, atomic_write_json, atomic_write_text

from ._tables import jsonable, write_csv
from .claims import ClaimsTable, evaluate_claims
from .coordination import CoordinationResult
from .frequency import FrequencyNeuronResult, frequency_analysis
from .group_ablation import GroupAblationResult, group_ablation_analysis
from .groups import NeuronGroup, plateau_group
from .matched import MatchedControls, matched_controls
from .robustness import (
    DEFAULT_DEFINITIONS,
    DEFAULT_PERCENTILES,
    RobustnessTable,
    SplitAnalyses,
    analyses_for_split,
    robustness_table,
)
from .routing import RoutingContext, RoutingResult
from .spatial import SpatialResult
from .specificity import SpecificityResult, analyze_specificity
from .spectra import SpectraResult, layer_weights

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from raretoken.run.identification import Identification

logger = logging.getLogger(__name__)

__all__ = ["AnalysisSuite", "run_analyses", "write_analyses"]


@dataclass(frozen=True, eq=False)
class AnalysisSuite:
    """The analyses of one run and the verdicts on the paper's claims.

    Attributes
    ----------
    main:
        Coordination, spatial, spectra and routing results on the identification's split.
    claims:
        One row per claim.
    n_random, seed:
        Random groups per baseline and the seed of every random choice.
    settings:
        Options used (positions, weights, ...).
    robustness:
        The percentile / group-definition sweep, if run.
    specificity:
        Reviewer checks on the group: rare-specificity and split-half replication
        (``None`` when they could not be computed).
    matched:
        Coordination, spatial and spectral statistics against covariate-matched random
        groups (``None`` when not computed).
    group_ablation:
        The group ablated jointly vs size-matched random groups and vs the sum of its
        single-neuron effects (``None`` when not computed).
    frequency:
        The frequency-neuron question (Stolfo et al. 2024): how much of each neuron's effect
        passes through the unigram direction, the group vs random groups (``None`` when not
        computed).
    seconds:
        Wall time per step (not part of any table).
    """

    main: SplitAnalyses
    claims: ClaimsTable
    n_random: int
    seed: int
    settings: Mapping[str, Any]
    robustness: RobustnessTable | None = None
    specificity: SpecificityResult | None = None
    matched: MatchedControls | None = None
    group_ablation: GroupAblationResult | None = None
    frequency: FrequencyNeuronResult | None = None
    seconds: Mapping[str, float] = field(default_factory=dict)

    # ------------------------------------------------------------------ accessors
    @property
    def group(self) -> NeuronGroup:
        return self.main.group

    @property
    def coordination(self) -> CoordinationResult:
        if self.main.coordination is None:
            raise InsufficientDataError("the coordination analysis was not computed")
        return self.main.coordination

    @property
    def spatial(self) -> SpatialResult:
        if self.main.spatial is None:
            raise InsufficientDataError("the spatial analysis was not computed")
        return self.main.spatial

    @property
    def spectra(self) -> SpectraResult:
        if self.main.spectra is None:
            raise InsufficientDataError("the spectral analysis was not computed")
        return self.main.spectra

    @property
    def routing(self) -> RoutingResult | None:
        return self.main.routing

    # ------------------------------------------------------------------ reports
    def to_markdown(self) -> str:
        """Every table of the run in one Markdown document."""
        g = self.group
        intro = (
            "# Organisational analyses of the rare-token neurons\n\n"
            f"Group: **{g.name}** ({g.size} neurons of the final MLP layer"
            + (f"; {g.note}" if g.note else "")
            + f"). Rare/common targets: {self.main.n_rare_positions} / "
            f"{self.main.n_common_positions} scored positions. Baselines: {self.n_random} "
            f"size-matched random groups from the same layer without the group, seed "
            f"{self.seed}.\n\n"
        )
        parts = [intro, self.claims.to_markdown(), "\n"]
        if self.specificity is not None:
            parts += [self.specificity.to_markdown(), "\n"]
        parts += [self.coordination.to_markdown(), "\n"]
        if self.matched is not None:
            parts += [self.matched.to_markdown(), "\n"]
        if self.group_ablation is not None:
            parts += [self.group_ablation.to_markdown(), "\n"]
        if self.frequency is not None:
            parts += [self.frequency.to_markdown(), "\n"]
        parts += [self.spatial.to_markdown(), "\n"]
        if self.routing is not None:
            parts += [self.routing.to_markdown(), "\n"]
        parts.append(self.spectra.to_markdown())
        if self.robustness is not None:
            parts += ["\n", self.robustness.to_markdown()]
        return "".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "main": self.main.to_dict(),
            "claims": self.claims.to_dict(),
            "n_random": self.n_random,
            "seed": self.seed,
            "settings": jsonable(dict(self.settings)),
            "robustness": None if self.robustness is None else self.robustness.to_dict(),
            "specificity": None if self.specificity is None else self.specificity.to_dict(),
            "matched": None if self.matched is None else self.matched.to_dict(),
            "group_ablation": (
                None if self.group_ablation is None else self.group_ablation.to_dict()
            ),
            "frequency": None if self.frequency is None else self.frequency.to_dict(),
            "seconds": dict(self.seconds),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AnalysisSuite:
        rob = d.get("robustness")
        spec = d.get("specificity")
        matched = d.get("matched")
        gab = d.get("group_ablation")
        freq = d.get("frequency")
        return cls(
            main=SplitAnalyses.from_dict(d["main"]),
            claims=ClaimsTable.from_dict(d["claims"]),
            n_random=int(d["n_random"]),
            seed=int(d["seed"]),
            settings=dict(d.get("settings", {})),
            robustness=None if rob is None else RobustnessTable.from_dict(rob),
            specificity=None if spec is None else SpecificityResult.from_dict(spec),
            matched=None if matched is None else MatchedControls.from_dict(matched),
            group_ablation=None if gab is None else GroupAblationResult.from_dict(gab),
            frequency=None if freq is None else FrequencyNeuronResult.from_dict(freq),
            seconds={str(k): float(v) for k, v in d.get("seconds", {}).items()},
        )


def run_analyses(
    ident: Identification,
    *,
    n_random: int | None = None,
    seed: int | None = None,
    progress: bool = True,
    routing: bool = True,
    weight_name: str = "out",
    coordination_positions: str = "all",
    impact_positions: str = "all",
    fallback_k: int | None = None,
    tau: float = 0.95,
    mi_bins: int | None = None,
    robustness: bool = False,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
    definitions: Sequence[str] = DEFAULT_DEFINITIONS,
) -> AnalysisSuite:
    """Run the four analyses and judge the paper's claims.

    Parameters
    ----------
    ident:
        Result of :func:`raretoken.run.identify`.
    n_random:
        Size-matched random groups per baseline (default ``ident.config.n_random_groups``).
    seed:
        Seed of every random choice (default ``ident.config.seed``).
    progress:
        Progress bars for the model runs and the sweep.
    routing:
        Run the attention-routing analysis (re-runs the last two blocks of the model).
    weight_name:
        Weights of the spectral analysis: ``"out"`` (default), ``"in"``, ``"up"``, ``"gate"``.
    coordination_positions:
        ``"all"`` scored positions (default) or ``"rare"`` ones for ``d_eff`` and MI.
    impact_positions:
        ``"all"`` (default) or ``"rare"`` positions for the head-ablation impact.
    fallback_k:
        Size of the top-k group used when no plateau was found (default
        :func:`~raretoken.analyses.groups.default_topk`).
    tau:
        Explained-variance threshold ``τ`` of ``d_eff`` (eq. 4; default 0.95).
    mi_bins:
        Bins of the MI estimator (default: its rule, see :mod:`raretoken.analyses.spatial`).
    robustness:
        Also run the sweep over ``percentiles`` × ``definitions``.
    """
    n_rand = int(ident.config.n_random_groups if n_random is None else n_random)
    sd = int(ident.config.seed if seed is None else seed)
    if n_rand < 2:
        raise ConfigError(f"n_random must be >= 2 for a random baseline, got {n_rand}")
    if not (math.isfinite(tau) and 0.0 < tau <= 1.0):
        raise ConfigError(f"tau (the d_eff variance threshold) must be in (0, 1], got {tau}")
    if mi_bins is not None and mi_bins < 2:
        raise ConfigError(f"mi_bins must be >= 2, got {mi_bins}")
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    group = plateau_group(ident, fallback_k=fallback_k)
    ctx = RoutingContext.from_identification(ident, progress=progress, seed=sd) if routing else None
    main = analyses_for_split(
        ident,
        ident.rare_positions,
        ident.common_positions,
        group,
        n_random=n_rand,
        seed=sd,
        weight_name=weight_name,
        routing=ctx,
        coordination_positions=coordination_positions,
        impact_positions=impact_positions,
        tau=tau,
        mi_bins=mi_bins,
        label=group.name,
        percentile=float(ident.config.percentile),
    )
    seconds.update(main.seconds)
    t = time.perf_counter()
    spec: SpecificityResult | None
    not_assessed: dict[str, str] = {}  # check -> why it could not run (a claims row says so)
    try:
        spec = analyze_specificity(ident, group, n_random=n_rand, seed=sd)
    except InsufficientDataError as exc:
        logger.warning("rare-specificity not assessed: %s", exc)
        spec = None
        not_assessed["specificity"] = not_assessed["replication"] = str(exc)
    seconds["specificity"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    adapter = ident.stages.loaded.adapter
    matched = matched_controls(
        ident,
        group,
        (
            ident.acts[ident.uniform_positions]
            if coordination_positions == "all"
            else ident.acts[ident.rare_positions]
        ),
        layer_weights(adapter, weight_name),
        layer_weights(adapter, "out"),
        n_random=n_rand,
        seed=sd,
        weight_name=weight_name,
        coordination_positions=coordination_positions,
        tau=tau,
        mi_bins=mi_bins,
    )
    seconds["matched"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    gab = _group_ablation(ident, group, n_rand, sd, not_assessed)
    seconds["group_ablation"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    freq = _frequency(ident, group, n_rand, sd, not_assessed)
    seconds["frequency"] = round(time.perf_counter() - t, 3)
    claims = evaluate_claims(
        main.coordination,  # type: ignore[arg-type]  # strict: never None
        main.spatial,  # type: ignore[arg-type]
        main.routing,
        main.spectra,  # type: ignore[arg-type]
        specificity=spec,
        matched=matched,
        group_ablation=gab,
        frequency=freq,
        not_assessed=not_assessed,
        group_note=group.note,
    )
    rob = None
    if robustness:
        t = time.perf_counter()
        rob = robustness_table(
            ident,
            n_random=n_rand,
            seed=sd,
            percentiles=percentiles,
            definitions=definitions,
            k=fallback_k,
            routing=ctx if ctx is not None else False,
            weight_name=weight_name,
            coordination_positions=coordination_positions,
            impact_positions=impact_positions,
            tau=tau,
            mi_bins=mi_bins,
            progress=progress,
        )
        seconds["robustness"] = round(time.perf_counter() - t, 3)
    seconds["total"] = round(time.perf_counter() - t0, 3)
    logger.info("analyses finished in %.1f s", seconds["total"])
    return AnalysisSuite(
        main=main,
        claims=claims,
        n_random=n_rand,
        seed=sd,
        settings={
            "routing": routing,
            "weight_name": weight_name,
            "coordination_positions": coordination_positions,
            "impact_positions": impact_positions,
            "fallback_k": fallback_k,
            "tau": tau,
            "mi_bins": mi_bins,
            "percentile": float(ident.config.percentile),
        },
        robustness=rob,
        specificity=spec,
        matched=matched,
        group_ablation=gab,
        frequency=freq,
        seconds=seconds,
    )


def _compute_dtype(ident: Identification) -> torch.dtype:
    """The dtype the closed-form checks compute in: float64 for a float64 run, else float32."""
    return torch.float64 if ident.config.dtype == "float64" else torch.float32


def _group_ablation(
    ident: Identification,
    group: NeuronGroup,
    n_random: int,
    seed: int,
    not_assessed: dict[str, str],
) -> GroupAblationResult | None:
    """The group ablated jointly (:mod:`.group_ablation`), or ``None`` with the reason logged."""
    dtype = _compute_dtype(ident)
    try:
        src = row_inputs(
            ident.stages.loaded.adapter,
            ident.resid,
            ident.acts,
            ident.sample.target_ids[ident.sample.target_mask],
            ident.mean_acts,
            dtype=dtype,
            device="cpu",
        )
        return group_ablation_analysis(
            src,
            ident.delta,
            group.neuron_ids,
            ident.rare_positions,
            ident.common_positions,
            n_random=n_random,
            seed=seed,
            clusters=ident.position_windows,
            group_name=group.name,
        )
    except RareTokenError as exc:
        logger.warning("group ablation not assessed: %s", exc)
        not_assessed["group_ablation"] = str(exc)
        return None


#: Rare- and common-target positions (each) of the frequency-neuron check: its cost grows
#: with positions x neurons x vocabulary (~40 s for 128 + 128 on SmolLM2, 2 CPU cores).
FREQUENCY_POSITIONS = 128


def _frequency(
    ident: Identification,
    group: NeuronGroup,
    n_random: int,
    seed: int,
    not_assessed: dict[str, str],
) -> FrequencyNeuronResult | None:
    """The frequency-neuron check (:mod:`.frequency`), or ``None`` with the reason logged."""
    cfg = ident.config
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return frequency_analysis(
            ident.stages.loaded.adapter,
            ident.mean_acts,
            ident.resid,
            ident.acts,
            ident.sample.target_ids[ident.sample.target_mask],
            ident.rare_positions,
            ident.common_positions,
            ident.counts,
            group.neuron_ids,
            n_random=n_random,
            seed=seed,
            max_positions=FREQUENCY_POSITIONS,
            group_name=group.name,
            device=device,
            dtype=_compute_dtype(ident),
            reference_delta=ident.delta,
            uniform_positions=ident.uniform_positions,
        )
    except RareTokenError as exc:
        logger.warning("frequency-neuron check not run: %s", exc)
        not_assessed["frequency_neurons"] = str(exc)
        return None


def _write_figure(run_dir: Path, stem: str, fig: Figure) -> list[str]:
    from raretoken.plotting.analyses import figure_bytes

    rels = []
    for fmt in ("png", "svg"):
        rel = f"figures/{stem}.{fmt}"
        atomic_write_bytes(run_dir / rel, figure_bytes(fig, fmt))
        rels.append(rel)
    return rels


def write_analyses(suite: AnalysisSuite, run_dir: Path | str) -> dict[str, str]:
    """Write the tables and figures of ``suite`` into ``run_dir``.

    Returns
    -------
    dict
        Relative path -> one-line description of every file written.
    """
    from raretoken.plotting.analyses import new_figure

    out = Path(run_dir)
    written: dict[str, str] = {}

    def text(rel: str, content: str, about: str) -> None:
        atomic_write_text(out / rel, content)
        written[rel] = about

    def table(stem: str, res: Any, about: str) -> None:
        text(f"analyses/{stem}.md", res.to_markdown(), f"{about} (Markdown)")
        res.to_csv(out / f"analyses/{stem}.csv")
        written[f"analyses/{stem}.csv"] = f"{about} (CSV)"

    def figure(stem: str, fig: Figure, about: str) -> None:
        for rel in _write_figure(out, stem, fig):
            written[rel] = about

    g = suite.group.name
    text("analyses/report.md", suite.to_markdown(), "all analysis tables and claim verdicts")
    table("claims", suite.claims, "the paper's four claims with this run's verdicts")
    table("coordination", suite.coordination, f"Table 1: d_eff/N of the {g} vs random groups")
    table("spatial", suite.spatial, f"Table 3: Louvain modularity of the {g} vs random groups")
    table("spectra", suite.spectra, f"Figure 2 data: α_Hill of the {g} vs random groups")
    if suite.matched is not None:
        table("matched", suite.matched,
              f"coordination, spatial, spectra of the {g} vs covariate-matched random groups")  # fmt: skip
    # the reviewer checks: one table and one single-panel figure each
    checks: tuple[tuple[str, Any, str, str], ...] = (
        ("group_ablation", suite.group_ablation,
         f"the {g} ablated jointly: additivity and vs random groups",
         "joint Δloss of the group vs random groups and its summed single effects"),
        ("frequency_neurons", suite.frequency,
         f"frequency-neuron question: effect of the {g} through the unigram direction",
         "fraction of each neuron's effect mediated by the unigram direction"),
        ("specificity", suite.specificity,
         f"reviewer checks: is the {g} rare-specific, does it replicate",
         "log Δloss rare vs common per neuron: group, selective"),
    )  # fmt: skip
    for stem, res, about, fig_about in checks:
        if res is None:
            continue
        table(stem, res, about)
        fig, axes = new_figure(1, width=5.5)
        res.plot(axes[0])
        figure(stem, fig, fig_about)

    fig, axes = new_figure(2)
    suite.coordination.plot(axes[0])
    suite.coordination.plot_baseline(axes[1])
    figure("coordination", fig, "cumulative explained variance and d_eff/N vs random groups")
    fig, axes = new_figure(2)
    suite.spatial.plot(axes[0])
    suite.spatial.plot_mi(axes[1])
    figure("spatial", fig, "modularity vs random groups and the group's MI matrix")
    fig, axes = new_figure(2)
    suite.spectra.plot(axes[0])
    suite.spectra.plot_alpha(axes[1])
    figure("spectra", fig, "Figure 2: eigenvalue density with Hill tail fit, α vs random")

    routing = suite.routing
    if routing is not None:
        table("routing", routing, "Table 2: attention Gini rare vs common, head ablation impacts")
        write_csv(out / "analyses/routing_heads.csv", routing.head_table())
        written["analyses/routing_heads.csv"] = "per head: Gini rare/common, ablation impact"
        fig, axes = new_figure(2, width=6.0)
        routing.plot(axes[0])
        routing.plot_impacts(axes[1])
        figure("routing", fig, "per-head Gini rare vs common and head/layer ablation impacts")
    if suite.robustness is not None:
        table("robustness", suite.robustness, "analyses across percentiles and group definitions")
        fig, axes = new_figure(1, width=6.0)
        suite.robustness.plot(axes[0])
        figure("robustness", fig, "z-scores vs random groups across percentiles")

    atomic_write_json(out / "analyses/analyses.json", jsonable(suite.to_dict()))
    written["analyses/analyses.json"] = "every analysis result (JSON, AnalysisSuite.from_dict)"
    return written
