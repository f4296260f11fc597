"""Figures of a run or sweep directory, embedded in the page as ``data:`` images.

Each figure (one per file stem of ``figures/``: ``rank_curve.svg`` + ``rank_curve.png`` are one
figure) is embedded once, the SVG when there is a well-formed one, else the PNG, as
``<img src="data:image/svg+xml;base64,…">``. Why an ``<img>`` and not ``<svg>`` markup in the
page: an SVG shown through ``<img>`` is its own document, so

* matplotlib's ids (``clip0``, ``p1f088bd86f``, ``DejaVuSans-30`` …), repeated across figures,
  cannot collide, and its global ``<style>`` rule (``*{stroke-linejoin: round}``) cannot leak
  into the page;
* the browser renders it in secure static mode: no script runs and nothing is fetched, even
  from a hostile SVG file;

at the price of a third more bytes (base64) and text that cannot be selected in the page.
"""

from __future__ import annotations

import base64
import html
import logging
import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_EMBED = {".svg": "image/svg+xml", ".png": "image/png"}
_ALSO = re.compile(r"\s*\(also \.\w+\)\s*$")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_PAPER_FIGURE = re.compile(r"^\s*Figure\s+(\d+)")


@dataclass(frozen=True)
class Figure:
    """One figure of a ``figures/`` directory.

    ``path``: the file embedded (``None`` when no file of the stem can be shown);
    ``files``: every file of the stem; ``caption``: its description, if known.
    """

    stem: str
    anchor: str
    path: Path | None
    files: tuple[Path, ...]
    caption: str | None
    problem: str | None = None


def anchor_for(stem: str, prefix: str = "fig-") -> str:
    """An HTML id for a figure stem (letters, digits, ``-`` and ``_`` only)."""
    return prefix + (re.sub(r"[^A-Za-z0-9_-]+", "-", stem).strip("-") or "figure")


def _valid(path: Path) -> str | None:
    """Why ``path`` cannot be embedded, or ``None`` when it can."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    if path.suffix.lower() == ".png":
        return None if data.startswith(_PNG_MAGIC) else "not a PNG file"
    try:
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        return f"not well-formed SVG ({exc})"
    if root.tag.rsplit("}", 1)[-1] != "svg":
        return "not an SVG document"
    return None


def collect_figures(
    fig_dir: Path, captions: Mapping[str, str] | None = None, *, prefix: str = "figures/"
) -> list[Figure]:
    """Every figure of ``fig_dir``: the paper's first (captions "Figure N: …", by N), then
    in the order ``captions`` lists them, then by name.

    ``captions`` maps relative paths (``figures/rank_curve.png``) to descriptions, e.g. the
    ``about`` texts of a run manifest's ``outputs``.
    """
    captions = captions or {}
    if not fig_dir.is_dir():
        return []
    stems: dict[str, list[Path]] = {}
    for p in sorted(fig_dir.iterdir()):
        if p.is_file() and not p.name.startswith("."):
            stems.setdefault(p.stem, []).append(p)
    order: dict[str, tuple[int, int]] = {}
    for i, (rel, about) in enumerate(captions.items()):
        if rel.startswith(prefix):
            m = _PAPER_FIGURE.match(about)
            order.setdefault(Path(rel).stem, (int(m.group(1)) if m else 1_000_000, i))
    last = (1_000_000, len(captions))
    figures: list[Figure] = []
    used: set[str] = set()
    for stem in sorted(stems, key=lambda s: (order.get(s, last), s)):
        files = tuple(stems[stem])
        candidates = [p for ext in _EMBED for p in files if p.suffix.lower() == ext]
        if not candidates:
            continue  # no image of a kind a browser shows inline (e.g. only a PDF)
        chosen, problems = None, []
        for p in candidates:
            why = _valid(p)
            if why is None:
                chosen = p
                break
            problems.append(f"{p.name}: {why}")
            log.warning("figure %s cannot be embedded: %s", p, why)
        caption = next(
            (captions[prefix + p.name] for p in files if prefix + p.name in captions), None
        )
        anchor = anchor_for(stem)
        while anchor in used:
            anchor += "-"
        used.add(anchor)
        figures.append(Figure(
            stem=stem, anchor=anchor, path=chosen, files=files,
            caption=_ALSO.sub("", caption) if caption else None,
            problem="; ".join(problems) or None,
        ))  # fmt: skip
    return figures


def data_uri(path: Path) -> str:
    """The file as a base64 ``data:`` URI (SVG or PNG)."""
    mime = _EMBED[path.suffix.lower()]
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def figure_html(fig: Figure, base: Path) -> str:
    """A ``<figure>`` with the embedded image, its caption and links to its files.

    ``base``: directory the page is written to (links to the files are relative to it).
    """
    name = html.escape(fig.stem)
    caption = html.escape(fig.caption) if fig.caption else ""
    links = ", ".join(
        f'<a href="{html.escape(p.relative_to(base).as_posix(), quote=True)}">'
        f"{html.escape(p.suffix.lstrip('.'))}</a>"
        for p in fig.files
    )
    if fig.path is None:
        body = f'<p class="note">This figure cannot be shown: {html.escape(fig.problem or "")}</p>'
    else:
        body = (
            f'<img class="figure" src="{data_uri(fig.path)}" alt="{html.escape(fig.caption or fig.stem, quote=True)}"'
            f' data-figure="{html.escape(fig.stem, quote=True)}">'
        )
        if fig.problem:
            body += f'<p class="note">{html.escape(fig.problem)}</p>'
    return (
        f'<figure id="{fig.anchor}">{body}<figcaption><strong>{name}</strong>'
        f'{": " + caption if fig.caption else ""} <span class="files">({links})</span>'
        "</figcaption></figure>"
    )
