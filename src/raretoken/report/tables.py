"""HTML tables of the report: CSV files and row dictionaries, numbers at readable precision.

Every cell is HTML-escaped. Verdict and status cells get a class (``v-supported``,
``v-not-supported``, ``v-inconclusive``, ``v-none``; ``s-ok``, ``s-failed``, ``s-pending``)
that the page's style sheet colours.
"""

from __future__ import annotations

import csv
import html
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

#: rows shown of a table before the rest is left out (with a note saying how many)
MAX_ROWS = 1000

_VERDICTS = {
    "supported": "v-supported",
    "not supported": "v-not-supported",
    "inconclusive": "v-inconclusive",
}
_STATUSES = {
    "complete": "s-ok",
    "reused": "s-ok",
    "failed": "s-failed",
    "interrupted": "s-failed",
    "pending": "s-pending",
    "running": "s-pending",
    "identified": "s-pending",
}

CellClass = Callable[[str, Any], str | None]


def format_number(value: Any) -> str:
    """A cell as text: floats to 3 significant digits (scientific when tiny or huge).

    Integers, booleans and strings that are not numbers are kept as written; ``None`` and
    the empty string become ``–``.
    """
    if value is None or value == "":
        return "–"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        s = value.strip()
        try:
            int(s)
            return s
        except ValueError:
            pass
        try:
            x = float(s)
        except ValueError:
            return value
        if s.lower() in ("inf", "-inf", "+inf", "infinity", "nan", "-nan"):
            return s.lower()
    elif isinstance(value, float):
        x = value
    else:
        return str(value)
    if not math.isfinite(x):
        return str(x)
    if x == 0:
        return "0"
    if abs(x) >= 1e6 or abs(x) < 1e-3:
        return f"{x:.2e}"
    text = f"{x:.3g}"
    return text if "e" not in text else f"{x:.0f}"


def verdict_class(text: str) -> str:
    """CSS class of a verdict cell."""
    return _VERDICTS.get(text.strip().lower(), "v-none")


def status_class(text: str) -> str:
    """CSS class of a run / task status cell."""
    return _STATUSES.get(text.strip().lower(), "s-pending")


def default_cell_class(column: str, value: Any) -> str | None:
    """Colour verdict columns (``verdict``, ``*_verdict``, ``*_verdict_matched``) and status."""
    col = column.lower()
    if col.startswith("verdict") or col.endswith(("_verdict", "_verdict_matched")):
        return verdict_class("" if value is None else str(value))
    if col == "status":
        return status_class("" if value is None else str(value))
    return None


def _is_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def html_table(
    columns: Sequence[str],
    rows: Iterable[Mapping[str, Any]],
    *,
    cell_class: CellClass | None = default_cell_class,
    raw_columns: Iterable[str] = (),
    max_rows: int = MAX_ROWS,
    caption: str | None = None,
    table_class: str | None = None,
) -> str:
    """An HTML ``<table>`` of ``rows`` (dicts) in the order of ``columns``.

    ``raw_columns`` hold cells that are already HTML (built by this package: links);
    every other cell is formatted with :func:`format_number` and escaped.
    """
    raw = set(raw_columns)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body: list[str] = []
    n = 0
    for row in rows:
        n += 1
        if n > max_rows:
            continue
        cells = []
        for c in columns:
            value = row.get(c)
            if c in raw:
                cells.append(f"<td>{value or ''}</td>")
                continue
            text = format_number(value)
            classes = [cls] if cell_class and (cls := cell_class(c, value)) else []
            if _is_numeric(text):
                classes.append("num")
            attr = f' class="{" ".join(classes)}"' if classes else ""
            cells.append(f"<td{attr}>{html.escape(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    note = ""
    if n > max_rows:
        note = f'<p class="note">{n - max_rows} more row(s) not shown (first {max_rows}).</p>'
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    tcls = f' class="{html.escape(table_class, quote=True)}"' if table_class else ""
    return (
        f'<div class="table-wrap"><table{tcls}>{cap}<thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div>{note}"
    )


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Header and rows of a CSV file (UTF-8; a BOM is ignored)."""
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        try:
            header = next(reader)
        except StopIteration:
            return [], []
        rows = []
        for values in reader:
            if not any(v.strip() for v in values):
                continue
            rows.append({h: (values[i] if i < len(values) else "") for i, h in enumerate(header)})
    return header, rows


def csv_table(path: Path, *, max_rows: int = MAX_ROWS, caption: str | None = None) -> str:
    """The CSV file at ``path`` as an HTML table (an empty file says so)."""
    try:
        header, rows = read_csv(path)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        return f'<p class="note">{html.escape(path.name)} could not be read: {html.escape(str(exc))}</p>'
    if not header:
        return f'<p class="note">{html.escape(path.name)} is empty.</p>'
    return html_table(header, rows, max_rows=max_rows, caption=caption)


def key_value_table(items: Mapping[str, Any]) -> str:
    """A two-column table (name, value) of a flat mapping; nested values as compact JSON."""
    rows = []
    for k, v in items.items():
        text = v if isinstance(v, str) else json.dumps(v, ensure_ascii=False, default=str)
        rows.append(
            f'<tr><th scope="row">{html.escape(str(k))}</th><td>{html.escape(text)}</td></tr>'
        )
    return f'<div class="table-wrap"><table class="kv"><tbody>{"".join(rows)}</tbody></table></div>'
