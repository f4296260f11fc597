"""Files of the per-layer stage (:mod:`.layers`): per-layer JSON, two tables, the depth figure.

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


def write_layers(
    run_dir: Path, regimes: Sequence[LayerRegime], settings: dict[str, Any]
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
    atomic_write_text(run_dir / LAYERS_DIR / "summary.md", layers_summary(regimes))
    written[f"{LAYERS_DIR}/summary.md"] = "per-layer findings as a summary.md section"
    DepthDisplay.from_columns(table).plot().savefig(run_dir / DEPTH_FIGURE)
    for ext in ("png", "svg"):
        written[f"{DEPTH_FIGURE}.{ext}"] = (
            "plateau size, κ and screen quality against MLP layer (exact and screen fits "
            "drawn apart)"
        )
    return written
