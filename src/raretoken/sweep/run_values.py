"""Reading one complete run directory into the numbers of its sweep-table row.

See :mod:`raretoken.sweep.table` for the columns. Every value is one the run wrote (CSV tables
of ``analyses/``, ``regimes.json``, ``token_split.json``, the manifest) or a mean of values it
wrote (baseline losses from ``positions.parquet``, the per-head Gini difference from
``analyses/routing_heads.csv``); a file that is absent leaves its columns null.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..run.manifest import MANIFEST

STATS = ("group", "random_mean", "random_sd", "p_empirical", "effect")


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _float(text: Any) -> float | None:
    if text is None or text == "" or isinstance(text, bool):
        return None
    try:
        f = float(text)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _int(v: Any) -> int | None:
    f = _float(v)
    return None if f is None else int(f)


def _csv(path: Path) -> list[dict[str, str]]:
    try:
        with open(path, newline="") as fh:
            return list(csv.DictReader(fh))
    except OSError:
        return []


def _pair(v: Any) -> tuple[float | None, float | None]:
    if isinstance(v, list | tuple) and len(v) == 2:
        return _float(v[0]), _float(v[1])
    return None, None


def _stats(prefix: str, *values: Any) -> dict[str, Any]:
    """``<prefix>_group, _random_mean, _random_sd, _p_empirical, _effect`` from ``values``."""
    return {f"{prefix}_{s}": _float(v) for s, v in zip(STATS, values, strict=True)}


def _regime_metrics(run_dir: Path, d_mlp: int | None) -> dict[str, Any]:
    regimes = read_json(run_dir / "regimes.json") or {}
    rare, common = regimes.get("rare") or {}, regimes.get("common") or {}
    boot = regimes.get("rare_bootstrap") or {}
    out: dict[str, Any] = {
        "has_plateau": rare.get("has_plateau"), "kappa": rare.get("kappa"),
        "plateau_size": len(rare["plateau_neurons"]) if "plateau_neurons" in rare else None,
        "n_regimes_rare": rare.get("model_n_segments"),
        "n_regimes_common": common.get("model_n_segments"),
        "has_plateau_common": common.get("has_plateau"), "kappa_common": common.get("kappa"),
        "plateau_existence_rate": _float(boot.get("plateau_existence_rate")),
    }  # fmt: skip
    out["plateau_size_lo"], out["plateau_size_hi"] = _pair(boot.get("ci_plateau_size"))
    basic, percentile = boot.get("ci_kappa_basic"), boot.get("ci_kappa")
    out["kappa_lo"], out["kappa_hi"] = _pair(basic or percentile)
    out["kappa_interval"] = "basic" if basic else "percentile" if percentile else None
    for s in ("", "_lo", "_hi"):
        size = out[f"plateau_size{s}"]
        out[f"plateau_fraction{s}"] = size / d_mlp if size is not None and d_mlp else None
    return out


def _baseline_losses(run_dir: Path) -> dict[str, Any]:
    try:
        pos = pq.read_table(run_dir / "positions.parquet", columns=["class", "base_loss"])
    except (OSError, pa.ArrowException):
        return {}
    cls = np.asarray(pos.column("class").to_pylist(), dtype=object)
    loss = pos.column("base_loss").to_numpy(zero_copy_only=False).astype(np.float64)
    out = {}
    for c in ("rare", "common"):
        sel = loss[cls == c]
        out[f"baseline_{c}_loss"] = float(sel.mean()) if sel.size else None
    return out


def _gini_interval(run_dir: Path) -> tuple[float | None, float | None]:
    """95 % t interval of the mean per-head Gini difference (rare − common)."""
    from scipy.stats import t as student_t

    diffs = []
    for r in _csv(run_dir / "analyses" / "routing_heads.csv"):
        a, b = _float(r.get("gini_rare")), _float(r.get("gini_common"))
        if r.get("head") != "all" and a is not None and b is not None:
            diffs.append(a - b)
    if len(diffs) < 2:
        return None, None
    d = np.asarray(diffs)
    half = float(student_t.ppf(0.975, d.size - 1) * d.std(ddof=1) / math.sqrt(d.size))
    return float(d.mean()) - half, float(d.mean()) + half


#: ``(file, row, {column: csv column})``; row: ``"first"``, ``"random"`` (the row whose group is
#: ``random``) or ``"rare"`` (the row whose targets are ``rare``).
_CSV_SOURCES: tuple[tuple[str, str, dict[str, str]], ...] = (
    ("coordination.csv", "first", {
        "coordination_group": "d_eff_ratio", "coordination_random_mean": "random_ratio_mean",
        "coordination_random_sd": "random_ratio_sd", "coordination_p_empirical": "p_value_less",
        "coordination_effect": "z_score", "coordination_d_eff": "d_eff",
        "coordination_n_neurons": "n_neurons",
        "coordination_random_d_eff_mean": "random_d_eff_mean"}),
    ("spatial.csv", "first", {
        "spatial_group": "modularity_q", "spatial_p_empirical": "p_q_greater",
        "spatial_effect": "z_q", "spatial_community_size": "mean_community_size",
        "spatial_n_communities": "n_communities"}),
    ("spatial.csv", "random", {
        "spatial_random_mean": "modularity_q", "spatial_random_sd": "q_sd",
        "spatial_random_community_size": "mean_community_size",
        "spatial_random_n_communities": "n_communities"}),
    ("spectra.csv", "first", {
        "spectra_group": "alpha_tail_hill", "spectra_p_empirical": "p_alpha_tail_hill_less",
        "spectra_effect": "z_alpha_tail_hill", "spectra_group_se": "alpha_tail_hill_se"}),
    ("spectra.csv", "random", {
        "spectra_random_mean": "alpha_tail_hill", "spectra_random_sd": "alpha_tail_hill_sd"}),
    ("routing.csv", "first", {
        "routing_group": "single_top_impact", "routing_random_mean": "single_random_impact",
        "routing_p_empirical": "p_top_vs_random", "routing_effect": "d_top_vs_random",
        "routing_gini_rare": "gini_rare_mean", "routing_gini_common": "gini_common_mean",
        "routing_gini_p": "gini_paired_p", "routing_gini_rho": "gini_spearman_rho",
        "routing_layer_impact": "all_heads_impact", "routing_layer_change": "all_heads_change",
        "routing_max_single_impact": "max_single_impact",
        "routing_p_single_vs_layer": "p_single_vs_layer",
        "routing_d_single_vs_layer": "d_single_vs_layer"}),
    ("group_ablation.csv", "rare", {
        "group_ablation_group": "joint", "group_ablation_random_mean": "random_mean",
        "group_ablation_random_sd": "random_sd", "group_ablation_p_empirical": "p_value",
        "group_ablation_effect": "z", "group_ablation_ratio": "ratio",
        "group_ablation_ratio_lo": "ratio_lo", "group_ablation_ratio_hi": "ratio_hi"}),
)  # fmt: skip
#: Comparisons read from ``analyses/analyses.json`` (their CSV holds formatted text).
_JSON_SOURCES = (("specificity", "specificity", "residual_vs_random"),
                 ("frequency_neurons", "frequency", "fraction_vs_random"))  # fmt: skip


def _pick(rows: list[dict[str, str]], which: str) -> dict[str, str] | None:
    if which == "first":
        return rows[0] if rows else None
    key = "targets" if which == "rare" else "group"
    return next((r for r in rows if r.get(key) == which), None)


def _analysis_metrics(run_dir: Path) -> dict[str, Any]:
    a = run_dir / "analyses"
    out: dict[str, Any] = {}
    for name, which, columns in _CSV_SOURCES:
        row = _pick(_csv(a / name), which)
        if row is not None:
            out |= {col: _float(row.get(src)) for col, src in columns.items()}
    if out.get("routing_gini_rare") is not None and out.get("routing_gini_common") is not None:
        out["routing_gini_diff"] = out["routing_gini_rare"] - out["routing_gini_common"]
        out["routing_gini_diff_lo"], out["routing_gini_diff_hi"] = _gini_interval(run_dir)
    for r in _csv(a / "matched.csv"):
        analysis = r.get("analysis")
        if analysis in ("coordination", "spatial", "spectra"):
            out |= {
                f"{analysis}_matched_{s}": _float(r.get(src))
                for s, src in (("mean", "matched_mean"), ("sd", "matched_sd"), ("p", "p_value"))
            }
    suite = read_json(a / "analyses.json") or {}
    for name, key, cmp in _JSON_SOURCES:
        c = (suite.get(key) or {}).get(cmp)
        if isinstance(c, dict):
            values = (
                c.get(k) for k in ("observed", "random_mean", "random_sd", "p_value", "z_score")
            )
            out |= _stats(name, *values)
    return out


def run_metrics(run_dir: Path) -> tuple[dict[str, Any], list[tuple[str, str, float | None]]]:
    """Numbers of a complete run directory (see the module docstring) and its claims
    ``(key, verdict, p)``."""
    split = read_json(run_dir / "token_split.json") or {}
    manifest = read_json(run_dir / MANIFEST) or {}
    identity = manifest.get("identity") or {}
    dims = identity.get("dims") or {}
    d_mlp = _int(dims.get("d_mlp"))
    if d_mlp is None and (run_dir / "neurons.parquet").exists():
        d_mlp = pq.read_metadata(run_dir / "neurons.parquet").num_rows
    group = manifest.get("stages", {}).get("analyses", {}).get("group") or {}
    metrics: dict[str, Any] = {
        "n_rare_positions": split.get("n_rare_positions"),
        "n_common_positions": split.get("n_common_positions"),
        "group": group.get("name"), "group_size": group.get("size"),
        "n_params": _int(dims.get("n_params")), "d_mlp": d_mlp,
        "tokenizer_sha256": (identity.get("tokenizer") or {}).get("sha256"),
    }  # fmt: skip
    metrics |= _regime_metrics(run_dir, d_mlp)
    metrics |= _baseline_losses(run_dir)
    metrics |= _analysis_metrics(run_dir)
    claims: list[tuple[str, str, float | None]] = []
    for row in _csv(run_dir / "analyses" / "claims.csv"):
        claims.append((row["key"], row["verdict"], _float(row.get("p_value"))))
        metrics[f"{row['key']}_verdict_matched"] = row.get("verdict_matched") or None
    return metrics, claims
