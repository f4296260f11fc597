"""``summary.md`` of a run directory, composed from every finished stage's section.

Each stage keeps its own section in the run directory, and ``summary.md`` is their
concatenation in the order of :data:`SECTIONS`:

============== ============================== ==============================================
stage          section file                   written by
============== ============================== ==============================================
identification ``identification/summary.md``  :func:`~raretoken.run.identify`
analyses       ``analyses/summary.md``        :func:`~raretoken.run.analyze`
layers         ``layers/summary.md``          :func:`~raretoken.run.identify_layers`
interventions  ``interventions/summary.md``   :func:`~raretoken.intervene.intervene`
============== ============================== ==============================================

A section is included only when its stage is recorded as finished in the manifest (a stage
that failed leaves its old section out). Every stage that writes a section calls
:func:`write_summary` afterwards, so ``summary.md`` always holds all of them.

>>> from raretoken.run.summary import write_summary        # doctest: +SKIP
>>> write_summary("raretoken-runs/embedded-demo")           # doctest: +SKIP
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from ..storage import atomic_write_text
from .manifest import MANIFEST

SUMMARY = "summary.md"
#: (stage, section file) in the order of ``summary.md``; ``identification`` is always first.
SECTIONS: tuple[tuple[str, str], ...] = (
    ("identification", "identification/summary.md"),
    ("analyses", "analyses/summary.md"),
    ("layers", "layers/summary.md"),
    ("interventions", "interventions/summary.md"),
)
IDENTIFICATION_SECTION = SECTIONS[0][1]
#: First line of the analyses' section (:func:`raretoken.run.analysis_stage.analyses_summary`):
#: where the identification's part of a ``summary.md`` written before section files ends.
ANALYSES_HEADING = "## Organisation of the rare-token neurons"


def _finished_stages(run_dir: Path) -> set[str]:
    try:
        m = json.loads((run_dir / MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return set()
    stages = m.get("stages") if isinstance(m, dict) else None
    return set(stages) if isinstance(stages, dict) else set()


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        return None


def _legacy_identification(run_dir: Path, later: list[str]) -> str | None:
    """The identification's part of a ``summary.md`` written before section files existed:
    everything before the first heading of a later section."""
    text = _read(run_dir / SUMMARY)
    if text is None:
        return None
    heads = [ANALYSES_HEADING] + [s.lstrip().splitlines()[0] for s in later if s.strip()]
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if i > 0 and any(line.rstrip("\n").startswith(h) for h in heads):
            return "".join(lines[:i]).rstrip("\n") + "\n"
    return text


def summary_sections(
    run_dir: Path | str, stages: Collection[str] | None = None
) -> list[tuple[str, str]]:
    """``(stage, text)`` of every section that goes into ``summary.md``.

    Parameters
    ----------
    run_dir
        The run directory.
    stages
        The finished stages (default: those recorded in the manifest's ``stages``); a stage
        not among them contributes no section. The identification's section is always taken
        (from a ``summary.md`` written before section files when its file is missing).
    """
    run_dir = Path(run_dir)
    done = _finished_stages(run_dir) if stages is None else set(stages)
    found: dict[str, str] = {}
    for stage, rel in SECTIONS[1:]:
        text = _read(run_dir / rel) if stage in done else None
        if text is not None and text.strip():
            found[stage] = text
    ident = _read(run_dir / IDENTIFICATION_SECTION)
    if ident is None:
        ident = _legacy_identification(run_dir, list(found.values()))
    out = [("identification", ident)] if ident and ident.strip() else []
    return out + [(stage, found[stage]) for stage, _ in SECTIONS[1:] if stage in found]


def compose_summary(run_dir: Path | str, stages: Collection[str] | None = None) -> str:
    """The text of ``summary.md``: the sections of :func:`summary_sections`, one blank line
    between two."""
    return "\n".join(text for _, text in summary_sections(run_dir, stages))


def write_summary(
    run_dir: Path | str,
    *,
    stages: Collection[str] | Mapping[str, Any] | None = None,
    also: Collection[str] = (),
) -> Path:
    """(Re)write ``run_dir/summary.md`` from the sections of the finished stages.

    ``stages``: the finished stages (default: the manifest's); ``also``: stages to include
    as well — the stage that is finishing, not yet recorded in the manifest.
    """
    run_dir = Path(run_dir)
    done = _finished_stages(run_dir) if stages is None else set(stages)
    path = run_dir / SUMMARY
    atomic_write_text(path, compose_summary(run_dir, done | set(also)))
    return path
