"""Assembly of a self-contained HTML page: style sheet, table of contents, sections.

The page loads nothing: the style sheet is inline, figures are ``data:`` images, there is
no script, and a Content-Security-Policy (``default-src 'none'``) makes the browser refuse
any request the page might still try to make.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass

from .. import __version__

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

STYLE = """
:root { --fg: #1d1f21; --muted: #5f6368; --line: #d9dce0; --bg-alt: #f6f7f9; }
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
  color: var(--fg); margin: 0 auto; max-width: 1180px; padding: 1rem 1.5rem 4rem;
  line-height: 1.45; font-size: 15px; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; }
h2 { font-size: 1.3rem; border-bottom: 1px solid var(--line); padding-bottom: .2rem;
  margin-top: 2.2rem; }
h3 { font-size: 1.1rem; margin-top: 1.6rem; }
h4, h5, h6 { font-size: 1rem; }
.subtitle { color: var(--muted); margin-top: 0; }
code, pre { font-family: ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace;
  font-size: .9em; }
code { background: var(--bg-alt); padding: 0 .2em; border-radius: 3px; }
pre { background: var(--bg-alt); padding: .6rem; overflow-x: auto; white-space: pre-wrap; }
.table-wrap { overflow-x: auto; margin: .6rem 0; }
table { border-collapse: collapse; font-size: .88rem; }
caption { text-align: left; color: var(--muted); padding: .2rem 0; }
th, td { border: 1px solid var(--line); padding: .25rem .5rem; vertical-align: top;
  text-align: left; }
thead th { background: var(--bg-alt); position: sticky; top: 0; }
tbody tr:nth-child(even) { background: #fbfbfc; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
table.kv th { background: var(--bg-alt); font-weight: 600; white-space: nowrap; }
.v-supported { background: #d8f0dc; color: #0f5323; font-weight: 600; }
.v-not-supported { background: #f9dcdc; color: #8a1c1c; font-weight: 600; }
.v-inconclusive { background: #fdf0cf; color: #6d4c00; font-weight: 600; }
.v-supported, .v-not-supported, .v-inconclusive { white-space: nowrap; }
.v-none { color: var(--muted); }
table.claims td:nth-child(-n+4) { min-width: 9em; }
table.claims td:nth-child(3) { min-width: 16em; }
.s-ok { background: #d8f0dc; color: #0f5323; }
.s-failed { background: #f9dcdc; color: #8a1c1c; font-weight: 600; }
.s-pending { background: #eceef1; color: var(--muted); }
.banner { border: 2px solid #b3261e; background: #fde7e5; color: #6b0f0a; padding: .7rem 1rem;
  border-radius: 6px; margin: 1rem 0; }
.banner.warn { border-color: #b07d00; background: #fff4d6; color: #5a4000; }
.note { color: var(--muted); font-size: .9rem; }
nav.toc { background: var(--bg-alt); border: 1px solid var(--line); border-radius: 6px;
  padding: .4rem 1.2rem; margin: 1rem 0; }
nav.toc h2 { border: 0; margin: .4rem 0; font-size: 1.05rem; }
nav.toc ol { margin: .2rem 0; padding-left: 1.3rem; }
figure { margin: 1.2rem 0; border: 1px solid var(--line); border-radius: 6px; padding: .6rem; }
img.figure { display: block; max-width: 100%; height: auto; margin: 0 auto; }
figcaption { font-size: .9rem; margin-top: .4rem; }
figcaption .files, figcaption .files a { color: var(--muted); }
details { margin: .6rem 0; }
details > summary { cursor: pointer; color: #1a4f8b; }
a { color: #1a4f8b; }
footer { margin-top: 3rem; color: var(--muted); font-size: .85rem; }
"""


@dataclass(frozen=True)
class Section:
    """A titled part of the page (``<h2>``), with optional sub-sections (``<h3>``)."""

    title: str
    anchor: str
    body: str
    children: tuple[Section, ...] = ()


def _render(section: Section, level: int) -> str:
    parts = [
        f'<section id="{html.escape(section.anchor, quote=True)}">',
        f"<h{level}>{html.escape(section.title)}</h{level}>",
        section.body,
    ]
    parts += [_render(c, min(level + 1, 6)) for c in section.children]
    parts.append("</section>")
    return "\n".join(parts)


def _toc(sections: Sequence[Section]) -> str:
    def items(secs: Sequence[Section]) -> str:
        out = []
        for s in secs:
            sub = f"<ol>{items(s.children)}</ol>" if s.children else ""
            out.append(
                f'<li><a href="#{html.escape(s.anchor, quote=True)}">{html.escape(s.title)}</a>'
                f"{sub}</li>"
            )
        return "".join(out)

    return f'<nav class="toc"><h2>Contents</h2><ol>{items(sections)}</ol></nav>'


def render_page(
    title: str,
    sections: Sequence[Section],
    *,
    subtitle: str = "",
    banner: str | None = None,
    banner_kind: str = "error",
) -> str:
    """The whole HTML document.

    ``subtitle`` and ``banner`` are HTML fragments (the caller escapes their text);
    ``banner_kind`` is ``error`` (red) or ``warn`` (amber).
    """
    cls = "banner" if banner_kind == "error" else "banner warn"
    top = f'<div class="{cls}" role="alert" id="status-banner">{banner}</div>' if banner else ""
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{STYLE}</style>",
        "</head>",
        "<body>",
        "<header>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="subtitle">{subtitle}</p>' if subtitle else "",
        top,
        "</header>",
        _toc(sections),
        "<main>",
        *(_render(s, 2) for s in sections),
        "</main>",
        f"<footer>Written by raretoken {html.escape(__version__)}; self-contained: "
        "no scripts, fonts or network requests.</footer>",
        "</body>",
        "</html>",
        "",
    ])  # fmt: skip
