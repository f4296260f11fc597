"""Every cross-run output of a sweep directory, (re)built from its task directories.

:func:`write_sweep_outputs` writes::

    <sweep>/sweep.parquet                       one row per task (raretoken.sweep.table)
    <sweep>/tables/table1_coordination.md|csv   Table 1: d_eff, d_eff/N group vs random
    <sweep>/tables/table2_routing.md|csv        Table 2: head / layer ablation impacts
    <sweep>/tables/table3_spatial.md|csv        Table 3: modularity Q, community size
    <sweep>/tables/paired_checkpoints.md|csv    paired base-loss change between checkpoints
    <sweep>/figures/figure3_rank_curves.svg|png Figure 3: every run's rank curves
    <sweep>/figures/dynamics_<key>.svg|png      training dynamics (raretoken.sweep.figures)
    <sweep>/notes.md                            warnings: failed tasks, unpaired tokenizers,
                                                skipped figures

It reads only what the runs wrote (nothing is recomputed), works on partially failed sweeps
(a failed or missing task is a row with its status and no numbers) and is idempotent: the same
task directories give the same files, and outputs of an earlier call that no longer apply
(e.g. a dynamics figure now skipped) are removed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import InsufficientDataError
from ..run.outputs import write_parquet
from ..storage import atomic_write_text
from .figures import RankCurveGrid, dynamics_figures
from .pairing import compare_checkpoints, model_sequences
from .paper_tables import paper_tables
from .table import SWEEP_TABLE, sweep_table

log = logging.getLogger(__name__)

__all__ = ["ABOUT", "NOTES", "write_sweep_outputs"]

NOTES = "notes.md"
FIGURE3 = "figures/figure3_rank_curves"
PAIRED = "tables/paired_checkpoints"

#: One-line description of every output (relative path -> text), e.g. for report captions.
ABOUT: dict[str, str] = {
    SWEEP_TABLE: "one row per task: identity, plateau, κ, every analysis vs random, verdicts",
    "tables/table1_coordination.md": "Table 1: d_eff and d_eff/N of the group vs random groups",
    "tables/table2_routing.md": "Table 2: single-head, random-head and whole-layer ablations",
    "tables/table3_spatial.md": "Table 3: modularity Q and mean community size vs random",
    f"{PAIRED}.md": "paired change of the base loss between consecutive checkpoints",
    f"{FIGURE3}.svg": "Figure 3: rank curves (rare and common Δloss) of every run",
    "figures/dynamics_plateau_size.svg": "plateau size against training step",
    "figures/dynamics_kappa.svg": "power-law exponent κ against training step",
    "figures/dynamics_d_eff_ratio.svg": "d_eff/N, group vs random, against training step",
    "figures/dynamics_modularity.svg": "modularity Q, group vs random, against training step",
    "figures/dynamics_alpha_hill.svg": "α_Hill, group vs random, against training step",
    "figures/dynamics_gini_diff.svg": "attention Gini rare − common against training step",
    NOTES: "warnings: failed tasks, unpaired tokenizers, skipped figures",
}


def _figure(out: Path, stem: str, fig: Any, written: dict[str, Path]) -> None:
    import matplotlib

    from ..plotting._save import save_png_svg

    # a fixed salt for the SVG's element ids, so that a rerun writes the same bytes
    with matplotlib.rc_context({"svg.hashsalt": "raretoken-sweep"}):
        png, svg = save_png_svg(fig, out / stem)
    written[f"{stem}.svg"], written[f"{stem}.png"] = svg, png


def _task_notes(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    lines = []
    for r in rows:
        if r["status"] == "failed":
            lines.append(f"- Task `{r['task']}` failed: {r.get('error') or 'no error recorded'} "
                         f"(traceback: `tasks/{r['task']}/traceback.txt`); its rows have no "
                         "numbers.")  # fmt: skip
        elif r["status"] != "complete":
            lines.append(f"- Task `{r['task']}` is {r['status']}: its rows have no numbers.")
    fallback = [str(r["task"]) for r in rows
                if r["status"] == "complete" and r.get("group") not in (None, "plateau")]  # fmt: skip
    if fallback:
        lines.append(f"- No plateau in {len(fallback)} run(s) ({', '.join(fallback)}): their "
                     "analyses use the run's fallback group (Group column of the tables).")  # fmt: skip
    return lines


def _tokenizer_notes(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    lines = []
    shas: dict[int, list[str]] = {}
    for r in rows:
        if r.get("tokenizer_group") is not None:
            shas.setdefault(int(r["tokenizer_group"]), []).append(str(r["task"]))
    sha_of = {r["tokenizer_group"]: r["tokenizer_sha256"] for r in rows
              if r.get("tokenizer_group") is not None}  # fmt: skip
    for g, tasks in sorted(shas.items()):
        lines.append(f"- Tokenizer {g} (sha256 `{str(sha_of[g])[:16]}…`): {', '.join(tasks)}.")
    unknown = [str(r["task"]) for r in rows
               if r["status"] == "complete" and r.get("tokenizer_sha256") is None]  # fmt: skip
    if unknown:
        lines.append(f"- No tokenizer sha256 recorded for {', '.join(unknown)}: these runs "
                     "are not paired with any other.")  # fmt: skip
    for model, seq in model_sequences(rows).items():
        if any(r.get("tokenizer_paired") is False for r in seq):
            groups = ", ".join(f"{r['task']} → tokenizer {r.get('tokenizer_group')}" for r in seq)
            msg = (f"WARNING: the checkpoints of {model} have different tokenizers ({groups}); "
                   "they are not paired: tables mark them † and the dynamics figures draw them "
                   "dotted as 'unpaired'.")  # fmt: skip
            log.warning("%s", msg)
            lines.append(f"- {msg}")
    return lines


def _remove_stale(out: Path, written: Mapping[str, Path]) -> None:
    keep = {p.resolve() for p in written.values()}
    candidates = [*(out / "figures").glob("dynamics_*.*"), *(out / "figures").glob("figure3_*.*")]
    for stem in ("table1_coordination", "table2_routing", "table3_spatial", "paired_checkpoints"):
        candidates += [out / "tables" / f"{stem}.{ext}" for ext in ("md", "csv")]
    for p in candidates:
        if p.suffix in (".svg", ".png", ".md", ".csv") and p.exists() and p.resolve() not in keep:
            p.unlink()


def write_sweep_outputs(
    out_dir: Path | str,
    names: list[str] | None = None,
    *,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict[str, Path]:
    """Write ``sweep.parquet``, ``tables/``, ``figures/`` and ``notes.md`` of a sweep.

    Parameters
    ----------
    out_dir:
        The sweep directory (holds ``tasks/``).
    names:
        Task names in sweep order (default: the sweep manifest's tasks).
    n_boot, seed:
        Resamples and seed of the paired checkpoint comparison's window bootstrap.

    Returns
    -------
    dict
        Relative path (``"tables/table1_coordination.md"``) -> path of every file written.

    Raises
    ------
    RunDirectoryError
        ``out_dir`` is not a sweep directory (no ``tasks/``).
    """
    out = Path(out_dir)
    table = sweep_table(out, names)
    write_parquet(out / SWEEP_TABLE, {c: table.column(c) for c in table.column_names})
    written: dict[str, Path] = {SWEEP_TABLE: out / SWEEP_TABLE}
    rows = table.to_pylist()

    def text(rel: str, content: str) -> None:
        atomic_write_text(out / rel, content)
        written[rel] = out / rel

    for t in paper_tables(rows):
        text(f"tables/{t.key}.md", t.to_markdown())
        text(f"tables/{t.key}.csv", t.to_csv_text())
    comparisons = compare_checkpoints(out, rows, n_boot=n_boot, seed=seed)
    text(f"{PAIRED}.md", comparisons.to_markdown())
    text(f"{PAIRED}.csv", comparisons.to_csv_text())

    figure_notes: list[str] = []
    grid = RankCurveGrid.from_sweep(out, rows)
    if grid.unreadable:
        figure_notes.append("Figure 3 leaves out runs whose regimes.json is missing or "
                            f"unreadable: {', '.join(grid.unreadable)}.")  # fmt: skip
    try:
        _figure(out, FIGURE3, grid.plot(), written)
    except InsufficientDataError as exc:
        figure_notes.append(f"Figure 3 skipped: {exc}.")
    figures, skipped = dynamics_figures(rows)
    figure_notes += skipped
    for f in figures:
        _figure(out, f"figures/dynamics_{f.key}", f.plot(), written)
    for note in figure_notes:
        log.info("%s", note)

    sections = [
        ("Tasks", _task_notes(rows)),
        ("Tokenizers and pairing", _tokenizer_notes(rows)),
        ("Figures", [f"- {n}" for n in figure_notes]),
    ]
    body = [f"# Notes on the sweep in {out.name}\n",
            f"{len(rows)} task(s): " + ", ".join(
                f"{sum(r['status'] == s for r in rows)} {s}"
                for s in dict.fromkeys(r["status"] for r in rows)) + ".\n"]  # fmt: skip
    for title, lines in sections:
        body.append(
            f"## {title}\n\n" + ("\n".join(lines) if lines else "Nothing to report.") + "\n"
        )
    files = [f"- `{rel}`: {ABOUT.get(rel, '')}".rstrip(": ")
             for rel in sorted(written) if not rel.endswith((".csv", ".png"))]  # fmt: skip
    body.append("## Files\n\n" + "\n".join(files) + "\n(each table also as .csv, each figure "
                "also as .png)\n")  # fmt: skip
    text(NOTES, "\n".join(body))
    _remove_stale(out, written)
    return written
