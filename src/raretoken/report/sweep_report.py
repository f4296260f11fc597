"""``report.html`` of a sweep directory: tasks, failures, the cross-run table, tables, figures.

Reads ``sweep_manifest.json`` (or, without it, ``tasks/*/task.json``), ``sweep.parquet``,
``tables/*.md|csv``, ``figures/*.svg|png`` and ``notes.md``; links each task's own
``tasks/<name>/run/report.html`` when there is one. Does not import :mod:`raretoken.sweep`
(the file names below are the sweep's layout, read from disk).
"""

from __future__ import annotations

import html
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from ..errors import RunDirectoryError
from ..run.manifest import MANIFEST
from ..storage import atomic_write_text
from .figures import collect_figures, figure_html
from .files import read_json, read_text, table_sections
from .markdown import markdown_to_html
from .page import Section, render_page
from .run_report import REPORT, write_run_report
from .tables import html_table, key_value_table

log = logging.getLogger(__name__)

SWEEP_MANIFEST = "sweep_manifest.json"
SWEEP_TABLE = "sweep.parquet"
#: columns of ``sweep.parquet`` shown first (those present), then ``*_verdict``, then the rest
HEADLINE = (
    "task", "model", "revision", "step", "status", "seconds", "n_params", "d_mlp",
    "n_rare_positions", "has_plateau", "plateau_size", "plateau_fraction",
    "plateau_fraction_lo", "plateau_fraction_hi", "kappa", "kappa_lo", "kappa_hi", "group",
    "group_size", "coordination_group", "spatial_group", "spectra_group", "routing_group",
    "group_ablation_group", "specificity_group", "frequency_neurons_group",
)  # fmt: skip
_TASK_SKIP = ("config", "task_dir", "run_dir", "error", "traceback", "analysis")
TRACEBACK_LINES = 40


def _e(x: Any) -> str:
    return html.escape(str(x))


def _inside(root: Path, rel: str) -> Path | None:
    """``root/rel`` when it stays inside ``root`` (a manifest cannot point elsewhere)."""
    p = (root / rel).resolve()
    try:
        p.relative_to(root.resolve())
    except ValueError:
        return None
    return p


def _tasks(sweep_dir: Path, manifest: dict[str, Any] | None) -> list[dict[str, Any]]:
    if manifest and isinstance(manifest.get("tasks"), list):
        return [t for t in manifest["tasks"] if isinstance(t, dict) and "name" in t]
    records = []
    for p in sorted((sweep_dir / "tasks").glob("*/task.json")):
        rec = read_json(p) or {}
        records.append({**rec, "name": rec.get("name", p.parent.name)})
    return sorted(records, key=lambda r: (r.get("index", 0), str(r["name"])))


def _task_paths(sweep_dir: Path, task: dict[str, Any]) -> tuple[Path | None, Path | None]:
    """The task's run directory and traceback file (when inside the sweep directory)."""
    name = str(task["name"])
    run = _inside(sweep_dir, str(task.get("run_dir") or f"tasks/{name}/run"))
    tb_rel = task.get("traceback")
    if tb_rel and "/" not in str(tb_rel):  # task.json records the bare file name
        tb_rel = f"tasks/{name}/{tb_rel}"
    tb = _inside(sweep_dir, str(tb_rel or f"tasks/{name}/traceback.txt"))
    return run, tb


def _link(sweep_dir: Path, path: Path | None, label: str) -> str:
    if path is None or not path.is_file():
        return ""
    rel = path.relative_to(sweep_dir.resolve()).as_posix()
    return f'<a href="{html.escape(rel, quote=True)}">{_e(label)}</a>'


def _task_table(sweep_dir: Path, tasks: list[dict[str, Any]]) -> str:
    extra: list[str] = []
    for t in tasks:
        for k, v in t.items():
            scalar = v is None or isinstance(v, str | int | float | bool)
            if k not in _TASK_SKIP and k not in extra and scalar:
                extra.append(k)
    first = [c for c in ("name", "model", "revision", "status", "seconds") if c in extra]
    columns = first + [c for c in extra if c not in first] + ["error", "report", "traceback"]
    rows = []
    for t in tasks:
        run, tb = _task_paths(sweep_dir, t)
        err = t.get("error")
        err_text = (
            f"{err.get('type', '')}: {err.get('message', '')}" if isinstance(err, dict) else err
        )
        report = _link(sweep_dir, run / REPORT if run else None, "report")
        rows.append({**{k: t.get(k) for k in columns}, "error": err_text or None,
                     "report": report, "traceback": _link(sweep_dir, tb, "traceback")})  # fmt: skip
    return html_table(columns, rows, raw_columns=("report", "traceback"))


def _failures(sweep_dir: Path, tasks: list[dict[str, Any]]) -> str:
    parts = []
    for t in tasks:
        if t.get("status") != "failed":
            continue
        _, tb = _task_paths(sweep_dir, t)
        raw = t.get("error")
        err: dict[str, Any] = raw if isinstance(raw, dict) else {}
        text = read_text(tb) if tb is not None and tb.is_file() else None
        body = ""
        if text:
            tail = "\n".join(text.rstrip("\n").split("\n")[-TRACEBACK_LINES:])
            body = (
                f"<details><summary>traceback (last lines)</summary><pre>{_e(tail)}</pre></details>"
            )
        parts.append(
            f"<h3>{_e(t['name'])}</h3><p><strong>{_e(err.get('type', 'error'))}</strong>: "
            f"{_e(err.get('message', ''))} (after {_e(t.get('seconds', '?'))} s)</p>{body}"
        )
    return "\n".join(parts)


def _sweep_table(sweep_dir: Path) -> str:
    path = sweep_dir / SWEEP_TABLE
    if not path.is_file():
        return f'<p class="note">No {SWEEP_TABLE} (rebuild it: <code>raretoken sweep-report</code>).</p>'
    try:
        table = pq.read_table(path)
    except Exception as exc:  # any pyarrow failure: the page says so, the rest is still useful
        return f'<p class="note">{SWEEP_TABLE} could not be read: {_e(exc)}</p>'
    names = table.column_names
    rows = table.to_pylist()
    verdicts = [c for c in names if c.endswith(("_verdict", "_verdict_matched"))]
    head = [c for c in HEADLINE if c in names] + verdicts
    rest = [c for c in names if c not in head]
    return (
        f'<p class="note">{len(rows)} run(s) × {len(names)} column(s); the headline columns '
        f"first, all of them below.</p>{html_table(head, rows)}"
        f"<details><summary>All columns of {SWEEP_TABLE}</summary>"
        f"{html_table(head + rest, rows)}</details>"
    )


def _captions(manifest: dict[str, Any] | None, extra: Mapping[str, str] | None) -> dict[str, str]:
    """Relative path -> description: ``extra`` first, then the manifest's ``outputs``
    (``{name: {"path", "about"}}`` or ``{path: about}``)."""
    out: dict[str, str] = dict(extra or {})
    outputs = (manifest or {}).get("outputs") or {}
    for key, entry in outputs.items() if isinstance(outputs, dict) else ():
        if isinstance(entry, dict) and isinstance(entry.get("path"), str):
            out.setdefault(entry["path"], str(entry.get("about") or ""))
        elif isinstance(entry, str):
            out.setdefault(str(key), entry)
    return out


def _banner(tasks: list[dict[str, Any]], manifest: dict[str, Any] | None) -> tuple[str | None, str]:
    failed = [str(t["name"]) for t in tasks if t.get("status") == "failed"]
    pending = [
        str(t["name"]) for t in tasks if t.get("status") not in ("complete", "reused", "failed")
    ]
    parts, kind = [], "warn"
    if manifest is None:
        parts.append(
            f"No readable {SWEEP_MANIFEST}: the tasks below are read from tasks/*/task.json."
        )
    if failed:
        kind = "error"
        parts.append(
            f"<strong>{len(failed)} of {len(tasks)} task(s) failed</strong>: "
            f"{_e(', '.join(failed))} (see Failures; rerun the sweep to retry them)."
        )
    if pending:
        parts.append(
            f"<strong>{len(pending)} of {len(tasks)} task(s) have not finished</strong>: "
            f"{_e(', '.join(pending))}; the cross-run tables leave them out."
        )
    return (" ".join(parts) or None), kind


def sweep_report_html(sweep_dir: Path | str, captions: Mapping[str, str] | None = None) -> str:
    """The HTML of a sweep directory's report (see :func:`write_sweep_report`)."""
    sweep_dir = Path(sweep_dir)
    manifest = read_json(sweep_dir / SWEEP_MANIFEST)
    if manifest is None and not (sweep_dir / "tasks").is_dir():
        raise RunDirectoryError(
            f"{sweep_dir} is not a raretoken sweep directory (no {SWEEP_MANIFEST}, no tasks/)"
        )
    tasks = _tasks(sweep_dir, manifest)
    captions = _captions(manifest, captions)
    figures = collect_figures(sweep_dir / "figures", captions)
    tables = table_sections(sweep_dir / "tables", sweep_dir, captions=captions)
    counts: dict[str, int] = {}
    for t in tasks:
        counts[str(t.get("status"))] = counts.get(str(t.get("status")), 0) + 1
    overview = {
        "tasks": len(tasks),
        **{f"tasks {k}": v for k, v in sorted(counts.items())},
        **{k: (manifest or {}).get(k) for k in ("source", "executor", "started", "updated")},
    }
    sections = [
        Section("Overview", "overview", key_value_table(overview)),
        Section("Tasks", "tasks", _task_table(sweep_dir, tasks)),
    ]
    failures = _failures(sweep_dir, tasks)
    if failures:
        sections.append(Section("Failures", "failures", failures))
    sections.append(Section("Runs (sweep.parquet)", "runs", _sweep_table(sweep_dir)))
    sections.append(Section(
        "Tables", "tables", "" if tables else '<p class="note">No tables/ in this sweep.</p>',
        tuple(tables),
    ))  # fmt: skip
    sections.append(Section(
        "Figures", "figures", "" if figures else '<p class="note">No figures/ in this sweep.</p>',
        tuple(Section(f.stem, f.anchor + "-section", figure_html(f, sweep_dir)) for f in figures),
    ))  # fmt: skip
    notes = read_text(sweep_dir / "notes.md")
    if notes is not None:
        sections.append(Section("Notes", "notes", markdown_to_html(notes, base_level=3)))
    prov = [
        key_value_table({k: v for k, v in (manifest or {}).items() if k not in ("tasks", "settings",
                         "analysis", "versions", "counts")}),
        "<details><summary>Shared run settings</summary>",
        key_value_table((manifest or {}).get("settings") or {}),
        "</details><details><summary>Analysis options</summary>",
        key_value_table((manifest or {}).get("analysis") or {}),
        "</details><details><summary>Package versions</summary>",
        key_value_table((manifest or {}).get("versions") or {}),
        "</details>",
    ]  # fmt: skip
    sections.append(Section(
        "Provenance", "provenance",
        "<details><summary>Settings, analysis options, versions</summary>" + "\n".join(prov)
        + "</details>",
    ))  # fmt: skip
    banner, kind = _banner(tasks, manifest)
    subtitle = f"Sweep directory <code>{_e(sweep_dir.name)}</code> · {len(tasks)} task(s)"
    return render_page(
        f"raretoken sweep: {sweep_dir.name}", sections, subtitle=subtitle, banner=banner,
        banner_kind=kind,
    )  # fmt: skip


def write_sweep_report(
    sweep_dir: Path | str,
    *,
    run_reports: bool = False,
    captions: Mapping[str, str] | None = None,
) -> Path:
    """Write ``sweep_dir/report.html``: one self-contained page for the whole sweep.

    Parameters
    ----------
    sweep_dir
        A directory written by ``raretoken sweep``.
    run_reports
        Also (re)write ``report.html`` of every task's run directory that has a manifest, so
        the sweep page links every run.
    captions
        Relative path (``figures/figure3_rank_curves.svg``, ``tables/table1_coordination.md``)
        -> one-line description, shown under the figure / table (e.g.
        ``raretoken.sweep.outputs.ABOUT``; this module does not import the sweep package).
        Captions starting ``Figure N:`` order the figures.

    Raises
    ------
    RunDirectoryError
        ``sweep_dir`` has neither ``sweep_manifest.json`` nor ``tasks/``.
    """
    sweep_dir = Path(sweep_dir)
    if run_reports:
        for task in _tasks(sweep_dir, read_json(sweep_dir / SWEEP_MANIFEST)):
            run, _ = _task_paths(sweep_dir, task)
            if run is not None and (run / MANIFEST).is_file():
                try:
                    write_run_report(run)
                except RunDirectoryError as exc:
                    log.warning("no report for task %s: %s", task["name"], exc)
    text = sweep_report_html(sweep_dir, captions)
    path = sweep_dir / REPORT
    atomic_write_text(path, text)
    log.info("wrote %s (%.1f MB)", path, len(text.encode()) / 1e6)
    return path
