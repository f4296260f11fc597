"""The cross-run table of a sweep (``sweep.parquet``), built from its task directories.

One row per task: ``task``, ``model``, ``revision``, ``status``, ``seconds``, ``run_dir``,
``error``, ``n_rare_positions``, ``has_plateau``, ``plateau_size``, ``kappa``, ``group``,
``group_size``, and per claim of ``analyses/claims.csv`` the columns ``<claim>_verdict`` and
``<claim>_p_value``. Metrics are read from the run directory only when it is ``complete``.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pyarrow as pa

from ..errors import RunDirectoryError
from ..run.manifest import MANIFEST, read_status
from ..run.outputs import write_parquet

SWEEP_TABLE = "sweep.parquet"

_TYPES: dict[str, pa.DataType] = {
    "task": pa.string(), "model": pa.string(), "revision": pa.string(), "status": pa.string(),
    "seconds": pa.float64(), "run_dir": pa.string(), "error": pa.string(),
    "n_rare_positions": pa.int64(), "has_plateau": pa.bool_(), "plateau_size": pa.int64(),
    "kappa": pa.float64(), "group": pa.string(), "group_size": pa.int64(),
}  # fmt: skip


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _float(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "") else None  # type: ignore[arg-type]
    except ValueError:
        return None


def run_metrics(run_dir: Path) -> tuple[dict[str, Any], list[tuple[str, str, float | None]]]:
    """Headline numbers of a complete run directory and its claims ``(key, verdict, p)``."""
    split = _read_json(run_dir / "token_split.json") or {}
    rare = (_read_json(run_dir / "regimes.json") or {}).get("rare") or {}
    manifest = _read_json(run_dir / MANIFEST) or {}
    group = manifest.get("stages", {}).get("analyses", {}).get("group") or {}
    metrics = {
        "n_rare_positions": split.get("n_rare_positions"),
        "has_plateau": rare.get("has_plateau"),
        "plateau_size": len(rare["plateau_neurons"]) if "plateau_neurons" in rare else None,
        "kappa": rare.get("kappa"),
        "group": group.get("name"),
        "group_size": group.get("size"),
    }
    claims: list[tuple[str, str, float | None]] = []
    path = run_dir / "analyses" / "claims.csv"
    if path.exists():
        with open(path, newline="") as fh:
            for row in csv.DictReader(fh):
                claims.append((row["key"], row["verdict"], _float(row.get("p_value"))))
    return metrics, claims


def _task_names(out: Path) -> list[str]:
    manifest = _read_json(out / "sweep_manifest.json")
    if manifest and isinstance(manifest.get("tasks"), list):
        return [str(t["name"]) for t in manifest["tasks"]]
    records = []
    for p in sorted((out / "tasks").glob("*/task.json")):
        rec = _read_json(p) or {}
        records.append((rec.get("index", 0), p.parent.name))
    return [name for _, name in sorted(records)]


def sweep_table(out_dir: Path | str, names: list[str] | None = None) -> pa.Table:
    """The table of the sweep in ``out_dir`` (tasks ``names``, default: the sweep's tasks)."""
    out = Path(out_dir)
    if not (out / "tasks").is_dir():
        raise RunDirectoryError(f"{out} is not a raretoken sweep directory (no tasks/)")
    rows: list[dict[str, Any]] = []
    claim_keys: list[str] = []
    for name in names if names is not None else _task_names(out):
        task_dir = out / "tasks" / name
        rec = _read_json(task_dir / "task.json") or {}
        run_dir = task_dir / "run"
        status = read_status(run_dir) if (run_dir / MANIFEST).exists() else None
        if rec.get("status") == "failed":
            status = "failed"
        error = rec.get("error") or None
        row: dict[str, Any] = {
            "task": name, "model": rec.get("model"), "revision": rec.get("revision"),
            "status": status or "missing", "seconds": rec.get("seconds"),
            "run_dir": f"tasks/{name}/run",
            "error": f"{error['type']}: {error['message']}" if error else None,
        }  # fmt: skip
        if row["status"] == "complete":
            metrics, claims = run_metrics(run_dir)
            row.update(metrics)
            for key, verdict, p in claims:
                if key not in claim_keys:
                    claim_keys.append(key)
                row[f"{key}_verdict"], row[f"{key}_p_value"] = verdict, p
        rows.append(row)
    columns: dict[str, Any] = {
        c: pa.array([r.get(c) for r in rows], type=t) for c, t in _TYPES.items()
    }
    for key in claim_keys:
        columns[f"{key}_verdict"] = pa.array([r.get(f"{key}_verdict") for r in rows], pa.string())
        columns[f"{key}_p_value"] = pa.array([r.get(f"{key}_p_value") for r in rows], pa.float64())
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
