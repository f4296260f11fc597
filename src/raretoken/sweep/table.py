"""The cross-run table of a sweep (``sweep.parquet``), built from its task directories.

One row per task, in sweep order. Numbers are read from a task's run directory only when it
is ``complete``; other rows hold the status (and, for a failed task, its error) and no
numbers. Nothing is recomputed: every value is one the run wrote, or a mean of values it wrote
(the baseline losses, the Gini difference across heads). Missing values are null.

Columns
-------
Task
    ``task``, ``model_label`` (the task name without ``@<revision>``: one line per model in
    the dynamics figures), ``model`` (what the run loaded), ``revision``, ``step`` (task.json's
    ``step`` when recorded, else parsed from the revision label by :func:`parse_step`),
    ``status``, ``seconds``, ``run_dir``, ``error``.
Model
    ``n_params``, ``d_mlp`` (the run manifest's ``identity["dims"]``; without it ``d_mlp`` is
    the number of rows of ``neurons.parquet`` and ``n_params`` null), ``tokenizer_sha256``
    (``identity["tokenizer"]["sha256"]``), ``tokenizer_group`` (1, 2, ... per distinct sha in
    sweep order), ``tokenizer_paired`` (all complete tasks of the model share one recorded
    sha: true; two shas: false; a sha not recorded: null).
Identification
    ``n_rare_positions``, ``n_common_positions``, ``baseline_rare_loss`` and
    ``baseline_common_loss`` (mean ``base_loss`` of ``positions.parquet`` over the rare /
    common positions), ``has_plateau``, ``plateau_size``, ``plateau_fraction`` (of
    ``d_mlp``), ``plateau_size_lo``/``_hi`` and ``plateau_fraction_lo``/``_hi`` (percentile
    interval of ``regimes.json`` ``rare_bootstrap``), ``plateau_existence_rate`` (fraction of
    resamples with a plateau), ``kappa``, ``kappa_lo``/``_hi`` with ``kappa_interval``
    (``"basic"``: the bias-reflecting interval the bootstrap reports; ``"percentile"`` for
    runs that did not record it), ``n_regimes_rare``/``n_regimes_common`` (segments of the
    regime model), ``has_plateau_common``, ``kappa_common``, ``group``, ``group_size``.
Analyses
    For every analysis ``a`` of :data:`ANALYSES`: ``a_group`` (the group's statistic),
    ``a_random_mean``, ``a_random_sd`` (size-matched random groups), ``a_p_empirical`` (the
    analysis' own p against them) and ``a_effect`` (its effect size):

    ==================  ===============================  =======================  =========
    analysis            statistic (source)               p                        effect
    ==================  ===============================  =======================  =========
    coordination        d_eff/N (coordination.csv)       p_value_less             z
    spatial             modularity Q (spatial.csv)       p_q_greater              z
    spectra             α_Hill tail (spectra.csv)        p_alpha_tail_hill_less   z
    routing             single top-head impact vs        p_top_vs_random          Cohen's d
                        random heads (routing.csv; no
                        random SD recorded)
    group_ablation      joint rare Δloss (rare row)      p_value                  z
    specificity         selectivity residual             residual_vs_random       z
                        (analyses.json)
    frequency_neurons   unigram-mediated fraction        fraction_vs_random       z
                        (analyses.json)
    ==================  ===============================  =======================  =========

    Extras: ``coordination_d_eff``, ``coordination_n_neurons``,
    ``coordination_random_d_eff_mean``; ``spatial_community_size``,
    ``spatial_random_community_size``, ``spatial_n_communities``,
    ``spatial_random_n_communities``; ``routing_gini_rare``, ``routing_gini_common``,
    ``routing_gini_diff`` (rare − common, mean over heads) with ``routing_gini_diff_lo``/``_hi``
    (95 % t interval of the mean per-head difference of ``routing_heads.csv``, the data of the
    run's paired t-test), ``routing_gini_p``, ``routing_gini_rho``, ``routing_layer_impact``
    and ``routing_layer_change`` (whole-layer ablation: eq. 8 impact, signed norm change),
    ``routing_max_single_impact``, ``routing_p_single_vs_layer``,
    ``routing_d_single_vs_layer``; ``group_ablation_ratio`` (joint / sum of singles) with
    ``_lo``/``_hi``; ``<a>_matched_mean``, ``<a>_matched_sd``, ``<a>_matched_p`` for the
    covariate-matched controls of coordination, spatial and spectra (matched.csv).
Claims
    Per claim key of ``analyses/claims.csv`` (:data:`CLAIM_KEYS` always, others as found):
    ``<key>_verdict``, ``<key>_p_value`` (the claim's test), ``<key>_verdict_matched``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pyarrow as pa

from ..errors import RunDirectoryError
from ..run.manifest import MANIFEST, read_status
from ..run.outputs import write_parquet
from .revisions import parse_step
from .run_values import STATS, read_json, run_metrics

SWEEP_TABLE = "sweep.parquet"

#: Analyses with a group statistic against random groups (column prefix).
ANALYSES = ("coordination", "spatial", "spectra", "routing", "group_ablation", "specificity",
            "frequency_neurons")  # fmt: skip
#: Claim keys whose columns every table has (others are added when a run has them).
CLAIM_KEYS = ("specificity", "replication", "frequency_neurons", "group_ablation",
              "coordination", "spatial", "routing", "spectra")  # fmt: skip
_EXTRAS = (
    "coordination_d_eff", "coordination_n_neurons", "coordination_random_d_eff_mean",
    "spatial_community_size", "spatial_random_community_size", "spatial_n_communities",
    "spatial_random_n_communities", "spectra_group_se", "routing_gini_rare",
    "routing_gini_common", "routing_gini_diff", "routing_gini_diff_lo", "routing_gini_diff_hi",
    "routing_gini_p", "routing_gini_rho", "routing_layer_impact", "routing_layer_change",
    "routing_max_single_impact", "routing_p_single_vs_layer", "routing_d_single_vs_layer",
    "group_ablation_ratio", "group_ablation_ratio_lo", "group_ablation_ratio_hi",
    *(f"{a}_matched_{s}" for a in ("coordination", "spatial", "spectra")
      for s in ("mean", "sd", "p")),
)  # fmt: skip
_S, _F, _I, _B = pa.string(), pa.float64(), pa.int64(), pa.bool_()
_TYPES: dict[str, pa.DataType] = {
    "task": _S, "model": _S, "revision": _S, "status": _S, "seconds": _F, "run_dir": _S,
    "error": _S, "n_rare_positions": _I, "has_plateau": _B, "plateau_size": _I, "kappa": _F,
    "group": _S, "group_size": _I,
    "model_label": _S, "step": _I, "n_params": _I, "d_mlp": _I, "tokenizer_sha256": _S,
    "tokenizer_group": _I, "tokenizer_paired": _B, "n_common_positions": _I,
    "baseline_rare_loss": _F, "baseline_common_loss": _F, "plateau_fraction": _F,
    "plateau_size_lo": _F, "plateau_size_hi": _F, "plateau_fraction_lo": _F,
    "plateau_fraction_hi": _F, "plateau_existence_rate": _F, "kappa_lo": _F, "kappa_hi": _F,
    "kappa_interval": _S, "n_regimes_rare": _I, "n_regimes_common": _I,
    "has_plateau_common": _B, "kappa_common": _F,
    **{f"{a}_{s}": _F for a in ANALYSES for s in STATS},
    **dict.fromkeys(_EXTRAS, _F),
}  # fmt: skip


def _task_records(out: Path) -> list[tuple[str, dict[str, Any]]]:
    manifest = read_json(out / "sweep_manifest.json")
    if manifest and isinstance(manifest.get("tasks"), list):
        return [(str(t["name"]), dict(t)) for t in manifest["tasks"]]
    records = []
    for p in (out / "tasks").glob("*/task.json"):
        rec = read_json(p) or {}
        natural = [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", p.parent.name)]
        records.append(((rec.get("index", 0), natural), p.parent.name))
    return [(name, {}) for _, name in sorted(records)]


def model_label(task: str, revision: str | None) -> str:
    """The task name without its ``@<revision>`` suffix."""
    return task.rsplit("@", 1)[0] if revision is not None and "@" in task else task


def _tokenizer_columns(rows: list[dict[str, Any]]) -> None:
    shas: list[str] = []
    for r in rows:
        sha = r.get("tokenizer_sha256")
        if sha is not None and sha not in shas:
            shas.append(sha)
        r["tokenizer_group"] = shas.index(sha) + 1 if sha is not None else None
    by_model: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r["status"] == "complete":
            by_model.setdefault(r["model_label"], []).append(r)
    for group in by_model.values():
        seen = {r.get("tokenizer_sha256") for r in group}
        paired = False if len(seen - {None}) > 1 else None if None in seen else True
        for r in group:
            r["tokenizer_paired"] = paired


def sweep_table(out_dir: Path | str, names: list[str] | None = None) -> pa.Table:
    """The table of the sweep in ``out_dir`` (tasks ``names``, default: the sweep's tasks)."""
    out = Path(out_dir)
    if not (out / "tasks").is_dir():
        raise RunDirectoryError(f"{out} is not a raretoken sweep directory (no tasks/)")
    known = dict(_task_records(out))
    rows: list[dict[str, Any]] = []
    claim_keys: list[str] = list(CLAIM_KEYS)
    for name in names if names is not None else list(known):
        task_dir = out / "tasks" / name
        rec = {**known.get(name, {}), **(read_json(task_dir / "task.json") or {})}
        run_dir = task_dir / "run"
        status = read_status(run_dir) if (run_dir / MANIFEST).exists() else None
        if rec.get("status") == "failed":
            status = "failed"
        error = rec.get("error") or None
        step = rec.get("step")
        row: dict[str, Any] = {
            "task": name, "model": rec.get("model"), "revision": rec.get("revision"),
            "status": status or "missing", "seconds": rec.get("seconds"),
            "run_dir": f"tasks/{name}/run",
            "error": f"{error['type']}: {error['message']}" if error else None,
            "model_label": model_label(name, rec.get("revision")),
            "step": step if isinstance(step, int) and not isinstance(step, bool)
            else parse_step(rec.get("revision")),
        }  # fmt: skip
        if row["status"] == "complete":
            metrics, claims = run_metrics(run_dir)
            row.update(metrics)
            for key, verdict, p in claims:
                if key not in claim_keys:
                    claim_keys.append(key)
                row[f"{key}_verdict"], row[f"{key}_p_value"] = verdict, p
        rows.append(row)
    _tokenizer_columns(rows)
    columns: dict[str, Any] = {
        c: pa.array([r.get(c) for r in rows], type=t) for c, t in _TYPES.items()
    }
    for key in claim_keys:
        columns[f"{key}_verdict"] = pa.array([r.get(f"{key}_verdict") for r in rows], _S)
        columns[f"{key}_p_value"] = pa.array([r.get(f"{key}_p_value") for r in rows], _F)
        columns[f"{key}_verdict_matched"] = pa.array(
            [r.get(f"{key}_verdict_matched") for r in rows], _S
        )
    return pa.table(columns)


def write_sweep_table(out_dir: Path | str, names: list[str] | None = None) -> Path:
    """Build :func:`sweep_table` and write it atomically to ``<out_dir>/sweep.parquet``."""
    out = Path(out_dir)
    table = sweep_table(out, names)
    path = out / SWEEP_TABLE
    write_parquet(path, {name: table.column(name) for name in table.column_names})
    return path


def format_table(table: pa.Table) -> str:
    """A short plain-text view: task, status, seconds, plateau size, kappa, verdicts."""
    cols = ["task", "status", "seconds", "plateau_size", "kappa"]
    cols += [c for c in table.column_names if c.endswith("_verdict")]
    data = {c: table.column(c).to_pylist() for c in cols}

    def cell(v: Any) -> str:
        return "-" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["\t".join(c.removesuffix("_verdict") for c in cols)]
    for i in range(table.num_rows):
        lines.append("\t".join(cell(data[c][i]) for c in cols))
    return "\n".join(lines) + "\n"
