"""Files of the per-layer stage (:mod:`.layers`): per-layer JSON, tables, the depth figure.

Every file is written atomically; the figure is drawn from the table written beside it
(:class:`~raretoken.plotting.depth.DepthDisplay`), so it shows what the stored results say.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..storage import atomic_write_json, atomic_write_text
from .outputs import write_csv

if TYPE_CHECKING:
    from .layers_analyses import LayerAnalyses
    from .layers_results import LayerRegime

LAYERS_DIR = "layers"
DEPTH_FIGURE = "figures/depth"
QUALITY_FIELDS = ("k", "n_exact", "n_random", "spearman", "spearman_random", "recall",
                  "est_missed")  # fmt: skip


def _nan(v: Any) -> float:
    return math.nan if v is None else float(v)


def layer_file(layer: int) -> str:
    return f"{LAYERS_DIR}/layer_{layer:02d}.json"


def layers_table(regimes: Sequence[LayerRegime]) -> dict[str, list[Any]]:
    """The columns of ``layers.csv``: one row per layer."""
    cols: dict[str, list[Any]] = {n: [] for n in (
        "layer", "n_neurons", "plateau_size", "kappa", "has_plateau", "values", "source",
        "spearman_rare", "spearman_common", "recall_rare", "recall_common",
        "spearman_random_rare", "spearman_random_common")}  # fmt: skip
    for r in regimes:
        ab = r.ablation
        cols["layer"].append(r.layer)
        cols["n_neurons"].append(r.n_neurons)
        cols["plateau_size"].append("" if r.plateau_size is None else r.plateau_size)
        cols["kappa"].append(_nan(r.kappa))
        cols["has_plateau"].append("" if r.has_plateau is None else r.has_plateau)
        cols["values"].append(r.values_kind)
        cols["source"].append(r.source)
        for name in ("rare", "common"):
            q = None if ab is None else (ab.quality_rare if name == "rare" else ab.quality_common)
            cols[f"spearman_{name}"].append(math.nan if q is None else q.spearman)
            cols[f"recall_{name}"].append(math.nan if q is None else q.recall)
            cols[f"spearman_random_{name}"].append(math.nan if q is None else q.spearman_random)
    return cols


def quality_table(regimes: Sequence[LayerRegime]) -> dict[str, list[Any]]:
    """The columns of ``screen_quality.csv``: one row per (screened layer, target set)."""
    cols: dict[str, list[Any]] = {n: [] for n in ("layer", "targets", *QUALITY_FIELDS)}
    for r in regimes:
        if r.ablation is None:
            continue
        for name, q in (("rare", r.ablation.quality_rare), ("common", r.ablation.quality_common)):
            cols["layer"].append(r.layer)
            cols["targets"].append(name)
            for f in QUALITY_FIELDS:
                v = getattr(q, f)
                cols[f].append(v if f in ("k", "n_exact", "n_random") else float(v))
    return cols


def layers_summary(regimes: Sequence[LayerRegime]) -> str:
    """A ``summary.md`` section: plateau size and κ per layer, with what they were fitted on."""
    lines = [
        "## Rare-token neurons across depth",
        "",
        "| layer | neurons | plateau | κ | fitted on | screen Spearman (rare) | recall (rare) |",
        "|---:|---:|---:|---:|---|---:|---:|",
    ]

    def num(v: float | None, fmt: str) -> str:
        return "–" if v is None or not math.isfinite(v) else format(v, fmt)

    for r in regimes:
        q = None if r.ablation is None else r.ablation.quality_rare
        kind = "exact (run)" if r.source == "run" else r.values_kind
        size = "–" if r.plateau_size is None else str(r.plateau_size)
        lines.append(
            f"| {r.layer} | {r.n_neurons} | {size} | {num(r.kappa, '.3f')} | {kind} | "
            f"{num(None if q is None else q.spearman, '.2f')} | "
            f"{num(None if q is None else q.recall, '.2f')} |"
        )
    lines += ["", "Below the final layer a fit on the screen is a first-order estimate; its "
              "quality against the exact ablation is in `layers/screen_quality.csv`. Figure: "
              "`figures/depth.png`.", ""]  # fmt: skip
    return "\n".join(lines)


#: Columns of ``layers/analyses.csv`` (:meth:`~.layers_analyses.LayerAnalyses.row`).
ANALYSES_FIELDS = (
    "layer", "source", "group", "definition", "fallback", "group_size", "n_random",
    "n_positions", "d_eff_ratio", "d_eff_ratio_random", "z_d_eff", "p_d_eff", "modularity_q",
    "modularity_q_random", "z_q", "p_q", "alpha_tail_hill", "alpha_tail_hill_random", "z_alpha",
    "p_alpha", "routing_windows", "gini_rare", "gini_common", "gini_diff", "p_gini",
    "max_single_impact", "layer_impact", "impact_diff", "p_single_vs_layer",
    "verdict_coordination", "verdict_spatial", "verdict_routing", "verdict_spectra", "errors",
)  # fmt: skip


def analyses_file(layer: int) -> str:
    return f"{LAYERS_DIR}/analyses_{layer:02d}.json"


def analyses_table(analyses: Sequence[LayerAnalyses]) -> dict[str, list[Any]]:
    """The columns of ``analyses.csv``: one row per layer (missing values: ``""``)."""
    cols: dict[str, list[Any]] = {n: [] for n in ANALYSES_FIELDS}
    for a in analyses:
        row = a.row()
        for n in ANALYSES_FIELDS:
            v = row[n]
            cols[n].append("" if v is None else v)
    return cols


def _num(v: Any, f: str = ".3f") -> str:
    if v is None or v == "":
        return "–"
    x = float(v)
    return "–" if not math.isfinite(x) else format(x, f)


def _vs(row: dict[str, Any], obs: str, rnd: str, p: str) -> str:
    if row[obs] is None:
        return "–"
    return f"{_num(row[obs])} vs {_num(row[rnd])} (p {_num(row[p], '.3g')})"


def analyses_summary(analyses: Sequence[LayerAnalyses], settings: dict[str, Any]) -> str:
    """A ``summary.md`` subsection: the four analyses per layer against random groups."""
    n_random = sorted({a.n_random for a in analyses})
    lines = [
        "### The four analyses per layer",
        "",
        f"Each layer's group (its plateau, or the top-k when there is none) against "
        f"{', '.join(map(str, n_random))} size-matched random groups of the same layer: d_eff/N "
        "(one-sided, lower), modularity Q (one-sided, higher), Hill α of the "
        f"{settings.get('weight_name', 'out')!r} weights (one-sided, lower); routing: attention "
        "Gini rare − common (paired t across heads) and largest single-head − whole-layer "
        "impact (paired permutation). " + str(settings.get("routing_note", "")) + ".",
        "",
        "| layer | group | d_eff/N vs random | Q vs random | α_Hill vs random | "
        "Gini rare − common | single − layer impact | source |",
        "|---:|---|---|---|---|---|---|---|",
    ]
    for a in analyses:
        r = a.row()
        group = f"{r['group']} ({r['group_size']})" + (" †" if r["fallback"] else "")
        gini = (
            "–"
            if r["gini_diff"] is None
            else f"{_num(r['gini_diff'])} (p {_num(r['p_gini'], '.3g')})"
        )
        imp = ("–" if r["impact_diff"] is None
               else f"{_num(r['impact_diff'])} (p {_num(r['p_single_vs_layer'], '.3g')})")  # fmt: skip
        src = "run's analyses" if a.source == "run" else "per-layer"
        lines.append(
            f"| {a.layer} | {group} | {_vs(r, 'd_eff_ratio', 'd_eff_ratio_random', 'p_d_eff')} | "
            f"{_vs(r, 'modularity_q', 'modularity_q_random', 'p_q')} | "
            f"{_vs(r, 'alpha_tail_hill', 'alpha_tail_hill_random', 'p_alpha')} | {gini} | "
            f"{imp} | {src} |"
        )
    errs = [f"layer {a.layer}: {a.row()['errors']}" for a in analyses if a.row()["errors"]]
    lines += ["", "† no plateau of two or more neurons: the top-k group (the rule of the run's "
              "analyses). Table: `layers/analyses.csv`; every result: `layers/analyses_XX.json`."]  # fmt: skip
    if errs:
        lines += ["", "Not computed: " + "; ".join(errs) + "."]
    lines.append("")
    return "\n".join(lines)


def write_layers(
    run_dir: Path,
    regimes: Sequence[LayerRegime],
    settings: dict[str, Any],
    analyses: Sequence[LayerAnalyses] | None = None,
) -> dict[str, str]:
    """Write the stage's files into ``run_dir``; return ``{relpath: description}``."""
    from ..plotting.depth import DepthDisplay

    (run_dir / LAYERS_DIR).mkdir(exist_ok=True)
    written: dict[str, str] = {}
    for r in regimes:
        rel = layer_file(r.layer)
        atomic_write_json(run_dir / rel, dict(r.to_dict(), settings=settings))
        written[rel] = f"layer {r.layer}: regime fit on {r.values_kind} values" + (
            "" if r.ablation is None else ", screen and exact ablation, screen quality"
        )
    table = layers_table(regimes)
    write_csv(run_dir / LAYERS_DIR / "layers.csv", table)
    written[f"{LAYERS_DIR}/layers.csv"] = (
        "one row per layer: plateau size, κ, has_plateau, values fitted (exact|screen), "
        "screen quality (Spearman, recall of the exact top-k)"
    )
    write_csv(run_dir / LAYERS_DIR / "screen_quality.csv", quality_table(regimes))
    written[f"{LAYERS_DIR}/screen_quality.csv"] = (
        "screen vs exact per layer and target set: Spearman (all exact / random sample), "
        "recall, estimated missed neurons"
    )
    summary = layers_summary(regimes)
    acols = None
    if analyses:
        an_settings = dict(settings.get("analyses") or {})
        for a in analyses:
            rel = analyses_file(a.layer)
            atomic_write_json(run_dir / rel, dict(a.to_dict(), settings=an_settings))
            how = "the run's own" if a.source == "run" else "per-layer"
            written[rel] = f"layer {a.layer}: the four analyses of its group vs random ({how})"
        acols = analyses_table(analyses)
        write_csv(run_dir / LAYERS_DIR / "analyses.csv", acols)
        written[f"{LAYERS_DIR}/analyses.csv"] = (
            "one row per layer: group, d_eff/N, modularity Q, Hill α vs random groups (value, "
            "random mean, z, p), routing Gini and impact differences when run, verdicts"
        )
        summary += "\n" + analyses_summary(analyses, an_settings)
    atomic_write_text(run_dir / LAYERS_DIR / "summary.md", summary)
    written[f"{LAYERS_DIR}/summary.md"] = "per-layer findings as a summary.md section"
    DepthDisplay.from_columns(table, analyses=acols).plot().savefig(run_dir / DEPTH_FIGURE)
    for ext in ("png", "svg"):
        written[f"{DEPTH_FIGURE}.{ext}"] = (
            "plateau size, κ and screen quality against MLP layer (exact and screen fits "
            "drawn apart)"
            + (
                ""
                if acols is None
                else "; the analyses' z against random groups (filled: p < 0.05)"
            )
        )
    return written
