"""``report.html`` of a run directory: summary, claims, analyses, figures, provenance.

Reads only files of the run directory (``manifest.json``, ``summary.md``,
``analyses/*.md|csv``, ``figures/*.svg|png``, and where they exist ``layers/*.csv`` with
``figures/depth.*`` and ``interventions/*.md|csv|svg|png``); runs nothing. A run that is not
``complete`` gets a banner at the top saying what is missing.
"""

from __future__ import annotations

import dataclasses
import html
import json
import logging
from pathlib import Path
from typing import Any

from ..errors import RunDirectoryError
from ..run.manifest import MANIFEST, read_status
from ..storage import atomic_write_text
from .figures import Figure, anchor_for, collect_figures, figure_html
from .files import read_json, read_text, table_sections
from .markdown import markdown_to_html, split_title
from .page import Section, render_page
from .tables import html_table, key_value_table, read_csv

log = logging.getLogger(__name__)

REPORT = "report.html"
#: files of ``analyses/`` shown elsewhere (claims, summary) or not tables
_NOT_ANALYSES = ("report.md", "claims.md", "claims.csv", "summary.md")
#: figures of ``figures/`` shown in the per-layer section (when ``layers/`` exists)
LAYER_FIGURES = ("depth",)


def _e(x: Any) -> str:
    return html.escape(str(x))


def status_banner(manifest: dict[str, Any], status: str | None) -> tuple[str | None, str]:
    """The banner (HTML) of a run that is not complete, and its kind (``error``/``warn``)."""
    err = manifest.get("error") or {}
    running = manifest.get("running") or {}
    if status == "complete":
        return None, "warn"
    if status == "identified":
        return (
            "<strong>Identification only.</strong> The analyses (§4.2–4.5) and the claim "
            "verdicts have not been run on this run directory "
            "(<code>raretoken analyze RUN_DIR</code>).",
            "warn",
        )
    if status == "running":
        return (
            f"<strong>This run is still running</strong> (stage "
            f"<code>{_e(running.get('stage', '?'))}</code> since {_e(running.get('since', '?'))});"
            " the report shows what had finished when it was written.",
            "warn",
        )
    if status in ("failed", "interrupted"):
        what = "failed" if status == "failed" else "was interrupted"
        detail = ""
        if err:
            detail = (
                f" Stage <code>{_e(err.get('stage', '?'))}</code> stopped: "
                f"{_e(err.get('type', ''))}: {_e(err.get('message', ''))}."
            )
        elif status == "interrupted" and running:
            detail = f" Stage <code>{_e(running.get('stage', '?'))}</code> did not finish."
        return (
            f"<strong>This run is incomplete: it {what}.</strong>{detail} "
            "Only the stages listed under Provenance finished; results below are partial.",
            "error",
        )
    return (
        f"<strong>This run is incomplete</strong> (status {_e(status)}); results below may be "
        "partial.",
        "error",
    )


def _captions(manifest: dict[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for entry in (manifest.get("outputs") or {}).values():
        if isinstance(entry, dict) and isinstance(entry.get("path"), str):
            out[entry["path"]] = str(entry.get("about") or "")
    return out


def _code_links(
    run_dir: Path, figures: list[Figure], addons: tuple[str, ...] = ("layers", "interventions")
) -> dict[str, str]:
    """Code spans of the Markdown (``figures/x.png``, ``analyses/x.md``) to in-page anchors
    (those of the add-on directories ``addons`` only: the sections the page shows)."""
    links: dict[str, str] = {"manifest.json": "#provenance", "analyses/report.md": "#analyses"}
    for fig in figures:
        for p in fig.files:
            links[p.relative_to(run_dir).as_posix()] = "#" + fig.anchor
    ana = run_dir / "analyses"
    for p in sorted(ana.glob("*.*")) if ana.is_dir() else []:
        if p.suffix in (".md", ".csv") and p.name not in _NOT_ANALYSES:
            links[f"analyses/{p.name}"] = "#" + anchor_for(p.stem, "analysis-")
    links["analyses/claims.csv"] = links["analyses/claims.md"] = "#claims"
    for sub in addons:
        prefix = sub + "-"
        d = run_dir / sub
        for p in sorted(d.glob("*.*")) if d.is_dir() else []:
            if p.suffix in (".md", ".csv") and p.name != "summary.md":
                links[f"{sub}/{p.name}"] = "#" + anchor_for(p.stem, prefix)
    return links


def _interventions_figures(run_dir: Path, captions: dict[str, str]) -> list[Figure]:
    """The figures of ``interventions/`` (anchors apart from those of ``figures/``)."""
    figs = collect_figures(run_dir / "interventions", captions, prefix="interventions/")
    return [dataclasses.replace(f, anchor="interventions-" + f.anchor) for f in figs]


def _layers_section(
    run_dir: Path, figures: list[Figure], captions: dict[str, str], links: dict[str, str]
) -> Section:
    """Per-layer identification (``layers/``): the depth figure and the tables."""
    tables = table_sections(
        run_dir / "layers", run_dir, captions=captions, exclude=("summary.md",),
        anchor_prefix="layers-", code_links=links,
    )  # fmt: skip
    per_layer = sorted((run_dir / "layers").glob("layer_*.json"))
    body = [figure_html(f, run_dir) for f in figures]
    if not figures:
        body.append('<p class="note">No depth figure in this run directory.</p>')
    if per_layer:
        body.append(
            '<p class="note">Each layer\'s fit, screen and exact ablation: '
            + ", ".join(
                f'<a href="{html.escape(p.relative_to(run_dir).as_posix(), quote=True)}">'
                f"{_e(p.name)}</a>"
                for p in per_layer
            )
            + ".</p>"
        )
    return Section("Rare-token neurons across depth", "layers", "\n".join(body), tuple(tables))


def _interventions_section(
    run_dir: Path, figures: list[Figure], captions: dict[str, str], links: dict[str, str]
) -> Section:
    """Interventions on the group (``interventions/``): figure, tables, generations."""
    tables = table_sections(
        run_dir / "interventions", run_dir, captions=captions, exclude=("summary.md",),
        anchor_prefix="interventions-", code_links=links,
    )  # fmt: skip
    body = [figure_html(f, run_dir) for f in figures]
    if not figures and not tables:
        body.append('<p class="note">No intervention results in this run directory.</p>')
    return Section("Interventions", "interventions", "\n".join(body), tuple(tables))


def _claims(run_dir: Path) -> str:
    path = run_dir / "analyses" / "claims.csv"
    if not path.exists():
        return '<p class="note">No claims table: the analyses have not been run.</p>'
    try:
        header, rows = read_csv(path)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return f'<p class="note">analyses/claims.csv could not be read: {_e(exc)}</p>'
    columns = [c for c in header if c != "key"] + (["key"] if "key" in header else [])
    return (
        '<p class="note">Verdicts: <span class="v-supported">supported</span> '
        '<span class="v-inconclusive">inconclusive</span> '
        '<span class="v-not-supported">not supported</span>; the rules are in '
        "<code>raretoken.analyses.claims</code>.</p>"
        + html_table(columns, rows, table_class="claims")
    )


def _stage_table(manifest: dict[str, Any]) -> str:
    rows = []
    for name, info in (manifest.get("stages") or {}).items():
        info = info if isinstance(info, dict) else {}
        rows.append({
            "stage": name, "seconds": info.get("seconds"), "finished": info.get("finished"),
            "cached": info.get("cached"), "key": (info.get("key") or "")[:16] or None,
        })  # fmt: skip
    return html_table(["stage", "seconds", "finished", "cached", "key"], rows)


def _provenance(run_dir: Path, manifest: dict[str, Any], status: str | None) -> str:
    top = {
        k: manifest.get(k)
        for k in ("run_id", "created", "updated", "total_seconds", "git_commit", "platform")
    }
    top = {"status": status, **top}
    if manifest.get("command"):
        top["command"] = " ".join(str(c) for c in manifest["command"])
    if manifest.get("error"):
        top["error"] = manifest["error"]
    outputs = [
        {"file": f'<a href="{html.escape(e["path"], quote=True)}">{_e(e["path"])}</a>',
         "about": e.get("about")}
        for e in (manifest.get("outputs") or {}).values()
        if isinstance(e, dict) and isinstance(e.get("path"), str)
    ]  # fmt: skip
    identity = json.dumps(manifest.get("identity"), indent=1, ensure_ascii=False, default=str)
    parts = [
        key_value_table(top),
        "<h3>Stage timings</h3>",
        _stage_table(manifest),
        "<details><summary>Configuration</summary>",
        key_value_table(manifest.get("config") or {}),
        "</details><details><summary>Package versions</summary>",
        key_value_table(manifest.get("versions") or {}),
        "</details><details><summary>Identity of the model and corpus</summary>",
        f"<pre>{html.escape(identity)}</pre></details>",
        "<details><summary>Files of the run directory</summary>",
        html_table(["file", "about"], outputs, raw_columns=["file"]),
        "</details>",
    ]
    return (
        "<details><summary>Configuration, versions, timings, run id</summary>"
        + "\n".join(parts)
        + "</details>"
    )


def run_report_html(run_dir: Path | str) -> str:
    """The HTML of a run directory's report (see :func:`write_run_report`)."""
    run_dir = Path(run_dir)
    if not (run_dir / MANIFEST).is_file():
        raise RunDirectoryError(f"{run_dir} is not a raretoken run directory (no {MANIFEST})")
    manifest = read_json(run_dir / MANIFEST)
    if manifest is None:
        raise RunDirectoryError(f"{run_dir}/{MANIFEST} cannot be read as a JSON object")
    status = read_status(run_dir)
    captions = _captions(manifest)
    figures = collect_figures(run_dir / "figures", captions)
    # an add-on stage's files are shown only while the manifest records the stage as finished
    # (one that failed or is running may have left half-rewritten files)
    got = manifest.get("stages")
    finished: dict[str, Any] = got if isinstance(got, dict) else {}
    has_layers = "layers" in finished and (run_dir / "layers").is_dir()
    has_interventions = "interventions" in finished and (run_dir / "interventions").is_dir()
    depth = [f for f in figures if has_layers and f.stem in LAYER_FIGURES]
    figures = [f for f in figures if f.stem not in LAYER_FIGURES]
    iv_figures = _interventions_figures(run_dir, captions) if has_interventions else []
    shown = tuple(n for n, has in (("layers", has_layers), ("interventions", has_interventions))
                  if has)  # fmt: skip
    links = _code_links(run_dir, figures + depth + iv_figures, shown)
    analyses = table_sections(
        run_dir / "analyses", run_dir, captions=captions, exclude=_NOT_ANALYSES,
        anchor_prefix="analysis-", code_links=links,
    )  # fmt: skip

    summary_text = read_text(run_dir / "summary.md")
    if summary_text is None:
        summary = '<p class="note">No summary.md in this run directory.</p>'
    else:
        title, rest = split_title(summary_text)
        summary = markdown_to_html(rest if title else summary_text, base_level=3, code_links=links)
    fig_sections = tuple(
        Section(f.stem, f.anchor + "-section", figure_html(f, run_dir)) for f in figures
    )
    sections = [
        Section("Summary", "summary", summary),
        Section("The paper's claims", "claims", _claims(run_dir)),
        Section(
            "Analyses",
            "analyses",
            "" if analyses else '<p class="note">No analysis tables in this run directory.</p>',
            tuple(analyses),
        ),
        *([_layers_section(run_dir, depth, captions, links)] if has_layers else []),
        *(
            [_interventions_section(run_dir, iv_figures, captions, links)]
            if has_interventions
            else []
        ),
        Section(
            "Figures",
            "figures",
            "" if figures else '<p class="note">No figures in this run directory.</p>',
            fig_sections,
        ),
        Section("Provenance", "provenance", _provenance(run_dir, manifest, status)),
    ]
    cfg = manifest.get("config") or {}
    model = cfg.get("model", "?")
    revision = f"@{cfg['revision']}" if cfg.get("revision") else ""
    subtitle = (
        f"Model <code>{_e(model)}{_e(revision)}</code>, corpus <code>{_e(cfg.get('corpus', '?'))}"
        f"</code> (preset <code>{_e(cfg.get('preset', '?'))}</code>, seed {_e(cfg.get('seed', '?'))})"
        f" · run <code>{_e(manifest.get('run_id', '?'))}</code> · status <strong>{_e(status)}"
        f"</strong> · updated {_e(manifest.get('updated', '?'))}"
    )
    banner, kind = status_banner(manifest, status)
    return render_page(
        f"raretoken run: {model}{revision}", sections, subtitle=subtitle, banner=banner,
        banner_kind=kind,
    )  # fmt: skip


def write_run_report(run_dir: Path | str) -> Path:
    """Write ``run_dir/report.html``: one self-contained page for a browser.

    The page holds ``summary.md``, the claims table (``analyses/claims.csv``, verdicts
    coloured), every table of ``analyses/``, the per-layer tables and the depth figure
    (``layers/``), the interventions' tables, figure and generations (``interventions/``),
    every figure of ``figures/`` (inlined) and the manifest's provenance; a run that is not
    complete says so at the top. Nothing in the
    page is fetched from anywhere (see :mod:`raretoken.report.page`).

    Raises
    ------
    RunDirectoryError
        ``run_dir`` has no readable ``manifest.json``.
    """
    run_dir = Path(run_dir)
    text = run_report_html(run_dir)
    path = run_dir / REPORT
    atomic_write_text(path, text)
    log.info("wrote %s (%.1f MB)", path, len(text.encode()) / 1e6)
    return path
