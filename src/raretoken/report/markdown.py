"""A small, safe Markdown-to-HTML converter for the Markdown raretoken writes.

Supported (what ``summary.md``, ``analyses/*.md`` and the sweep tables use): ATX headings
(``#`` … ``######``), paragraphs, ``-``/``*``/``+`` and ``1.`` lists (one level), pipe tables
with a ``|---|`` separator row (``:---:`` alignment), fenced code blocks, and inline
```code```, ``**bold**``, ``*italic*`` and ``[text](relative/link)``.

Everything else is text: every character of the input is HTML-escaped before any markup is
added, so raw HTML in the input (``<script>``) is shown, never interpreted. Links are kept only
when they point inside the report's directory (no scheme, no ``//``); any other link is
written as its text followed by the address in plain text, so a page never refers to the
network.
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping

HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_BULLET = re.compile(r"^\s{0,3}[-*+]\s+(.*)$")
_ORDERED = re.compile(r"^\s{0,3}\d{1,9}[.)]\s+(.*)$")
_SEPARATOR_CELL = re.compile(r"^\s*:?-{1,}:?\s*$")
_FENCE = re.compile(r"^\s{0,3}(```|~~~)")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.DOTALL)
_BOLD = re.compile(r"\*\*(?=\S)(.+?)(?<=\S)\*\*")
_ITALIC = re.compile(r"(?<![*\w])\*(?=[^\s*])(.+?)(?<=[^\s*])\*(?![*\w])")
_LINK = re.compile(r"\[([^\]\n]+)\]\(([^)\s]+)\)")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_MARKUP = re.compile(r"[*`]")
_NUMBER = re.compile(r"^[+-]?(\d[\d,]*\.?\d*|\.\d+)([eE][+-]?\d+)?%?$")


def is_local_href(url: str) -> bool:
    """Whether ``url`` stays inside the report's directory (relative path or ``#anchor``)."""
    u = url.strip()
    return bool(u) and not _SCHEME.match(u) and not u.startswith(("//", "\\\\", "/"))


def _emphasis(text: str) -> str:
    """Bold, italic and links on already-escaped text."""
    text = _BOLD.sub(r"<strong>\1</strong>", text)
    text = _ITALIC.sub(r"<em>\1</em>", text)

    def link(m: re.Match[str]) -> str:
        label, url = m.group(1), html.unescape(m.group(2))
        if is_local_href(url):
            return f'<a href="{html.escape(url, quote=True)}">{label}</a>'
        return f"{label} ({html.escape(url)})"

    return _LINK.sub(link, text)


def inline(text: str, code_links: Mapping[str, str] | None = None) -> str:
    """One line of Markdown inline markup as HTML (escaped).

    ``code_links`` maps the text of a code span (e.g. ``figures/rank_curve.png``) to an
    in-page anchor; such spans become links.
    """
    out: list[str] = []
    pos = 0
    for m in _CODE_SPAN.finditer(text):
        out.append(_emphasis(html.escape(text[pos : m.start()], quote=False)))
        code = m.group(2).strip() if m.group(2).strip() else m.group(2)
        span = f"<code>{html.escape(code, quote=False)}</code>"
        target = (code_links or {}).get(code)
        if target is not None and is_local_href(target):
            span = f'<a href="{html.escape(target, quote=True)}">{span}</a>'
        out.append(span)
        pos = m.end()
    out.append(_emphasis(html.escape(text[pos:], quote=False)))
    return "".join(out)


def split_row(line: str) -> list[str]:
    """The cells of a pipe-table row (``\\|`` is a literal bar; bars inside code are kept)."""
    s = line.strip()
    if s.startswith("|"):
        s = s[1:]
    if s.endswith("|") and not s.endswith("\\|"):
        s = s[:-1]
    cells: list[str] = []
    cur: list[str] = []
    in_code = False
    i = 0
    while i < len(s):
        c = s[i]
        if c == "\\" and i + 1 < len(s) and s[i + 1] == "|":
            cur.append("|")
            i += 2
            continue
        if c == "`":
            in_code = not in_code
        if c == "|" and not in_code:
            cells.append("".join(cur).strip())
            cur = []
        else:
            cur.append(c)
        i += 1
    cells.append("".join(cur).strip())
    return cells


def _is_separator(line: str) -> bool:
    if "-" not in line:
        return False
    cells = split_row(line)
    return bool(cells) and all(_SEPARATOR_CELL.match(c) for c in cells)


def _align(cell: str) -> str | None:
    c = cell.strip()
    if c.startswith(":") and c.endswith(":"):
        return "center"
    if c.endswith(":"):
        return "right"
    if c.startswith(":"):
        return "left"
    return None


def _table(lines: list[str], code_links: Mapping[str, str] | None) -> str:
    header = split_row(lines[0])
    aligns = [_align(c) for c in split_row(lines[1])]
    aligns += [None] * (len(header) - len(aligns))

    def cell(tag: str, text: str, j: int) -> str:
        style = f' style="text-align:{aligns[j]}"' if j < len(aligns) and aligns[j] else ""
        if tag == "td" and not style and _NUMBER.match(text):
            style = ' class="num"'
        return f"<{tag}{style}>{inline(text, code_links)}</{tag}>"

    head = "".join(cell("th", h, j) for j, h in enumerate(header))
    body = []
    for line in lines[2:]:
        cells = split_row(line)[: len(header)]
        cells += [""] * (len(header) - len(cells))
        body.append("<tr>" + "".join(cell("td", c, j) for j, c in enumerate(cells)) + "</tr>")
    return (
        '<div class="table-wrap"><table><thead><tr>' + head + "</tr></thead><tbody>"
        + "".join(body) + "</tbody></table></div>"
    )  # fmt: skip


def markdown_to_html(
    text: str, *, base_level: int = 1, code_links: Mapping[str, str] | None = None
) -> str:
    """Convert the supported Markdown subset to an HTML fragment.

    Parameters
    ----------
    text
        Markdown source.
    base_level
        HTML level of the document's highest heading: with ``base_level=3`` a document
        whose top headings are ``#`` (or ``###``) gets ``<h3>`` for them, lower ones
        follow, capped at ``<h6>``.
    code_links
        Code-span texts to turn into in-page links (see :func:`inline`).
    """
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    levels = [len(m.group(1)) for ln in lines if (m := HEADING.match(ln))]
    shift = base_level - min(levels) if levels else 0
    out: list[str] = []
    para: list[str] = []
    i = 0

    def flush() -> None:
        if para:
            out.append("<p>" + inline(" ".join(s.strip() for s in para), code_links) + "</p>")
            para.clear()

    while i < len(lines):
        line = lines[i]
        if not line.strip():
            flush()
            i += 1
            continue
        if _FENCE.match(line):
            flush()
            fence = _FENCE.match(line).group(1)  # type: ignore[union-attr]
            j = i + 1
            while j < len(lines) and not lines[j].lstrip().startswith(fence):
                j += 1
            out.append("<pre><code>" + html.escape("\n".join(lines[i + 1 : j])) + "</code></pre>")
            i = j + 1
            continue
        if m := HEADING.match(line):
            flush()
            level = min(6, max(1, len(m.group(1)) + shift))
            out.append(f"<h{level}>{inline(m.group(2), code_links)}</h{level}>")
            i += 1
            continue
        if "|" in line and i + 1 < len(lines) and _is_separator(lines[i + 1]):
            flush()
            j = i + 2
            while j < len(lines) and lines[j].strip() and "|" in lines[j]:
                j += 1
            out.append(_table(lines[i:j], code_links))
            i = j
            continue
        for pattern, tag in ((_BULLET, "ul"), (_ORDERED, "ol")):
            if pattern.match(line):
                flush()
                items: list[str] = []
                while i < len(lines) and lines[i].strip():
                    if m := pattern.match(lines[i]):
                        items.append(m.group(1))
                    elif items and lines[i].startswith((" ", "\t")):
                        items[-1] += " " + lines[i].strip()  # continuation line of an item
                    else:
                        break
                    i += 1
                lis = "".join(f"<li>{inline(it, code_links)}</li>" for it in items)
                out.append(f"<{tag}>{lis}</{tag}>")
                break
        else:
            para.append(line)
            i += 1
    flush()
    return "\n".join(out)


def split_title(text: str) -> tuple[str | None, str]:
    """The first heading of a Markdown text (when it comes first) and the rest."""
    lines = text.lstrip("\n").split("\n")
    m = HEADING.match(lines[0]) if lines else None
    if not m:
        return None, text
    return _MARKUP.sub("", m.group(2)).strip(), "\n".join(lines[1:])
