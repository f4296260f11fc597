"""Report sections from a directory of Markdown and CSV tables (``analyses/``, ``tables/``).

Files are grouped by stem: ``routing.md`` + ``routing.csv`` form one section whose text is
the Markdown (prose and its formatted tables) and whose CSV is the full table, folded in a
``<details>``; a CSV without a Markdown twin is shown open.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from .figures import anchor_for
from .markdown import markdown_to_html, split_title
from .page import Section
from .tables import csv_table, read_csv


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``, or ``None`` when missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def _csv_summary(path: Path) -> str:
    try:
        header, rows = read_csv(path)
    except (OSError, UnicodeDecodeError, ValueError):
        return path.name
    return f"{path.name}: {len(rows)} row(s) × {len(header)} column(s)"


def table_sections(
    directory: Path,
    base: Path,
    *,
    captions: Mapping[str, str] | None = None,
    exclude: Collection[str] = (),
    anchor_prefix: str = "table-",
    code_links: Mapping[str, str] | None = None,
) -> list[Section]:
    """One section per stem of the ``.md``/``.csv`` files of ``directory``.

    Parameters
    ----------
    directory
        Where the files are.
    base
        The page's directory (relative names, as in ``captions``, are relative to it).
    captions
        Relative path → description (a run manifest's ``outputs``); ordered: sections come in
        the order their files appear here, then by name.
    exclude
        File names to leave out (``report.md``, ``claims.csv`` …).
    """
    captions = captions or {}
    if not directory.is_dir():
        return []
    stems: dict[str, dict[str, Path]] = {}
    for p in sorted(directory.iterdir()):
        if p.is_file() and p.suffix in (".md", ".csv") and p.name not in exclude:
            stems.setdefault(p.stem, {})[p.suffix] = p
    rel_dir = directory.relative_to(base).as_posix()
    order: dict[str, int] = {}
    for i, rel in enumerate(captions):
        if rel.startswith(rel_dir + "/"):
            order.setdefault(Path(rel).stem, i)
    sections = []
    for stem in sorted(stems, key=lambda s: (order.get(s, len(order)), s)):
        files = stems[stem]
        md, csv_path = files.get(".md"), files.get(".csv")
        title, parts = None, []
        about = next(
            (captions[f"{rel_dir}/{p.name}"] for p in files.values()
             if f"{rel_dir}/{p.name}" in captions),
            None,
        )  # fmt: skip
        if about:
            about = re.sub(r"\s*\((Markdown|CSV)\)\s*$", "", about)
            parts.append(f'<p class="note">{html.escape(about)}</p>')
        if md is not None:
            text = read_text(md) or ""
            title, rest = split_title(text)
            parts.append(markdown_to_html(rest, base_level=4, code_links=code_links))
        if csv_path is not None:
            table = csv_table(csv_path)
            if md is not None:
                parts.append(
                    f"<details><summary>{html.escape(_csv_summary(csv_path))}</summary>"
                    f"{table}</details>"
                )
            else:
                parts.append(table)
        links = ", ".join(
            f'<a href="{html.escape(p.relative_to(base).as_posix(), quote=True)}">'
            f"{html.escape(p.name)}</a>"
            for p in files.values()
        )
        parts.append(f'<p class="note">Files: {links}</p>')
        sections.append(Section(title or stem, anchor_for(stem, anchor_prefix), "\n".join(parts)))
    return sections
