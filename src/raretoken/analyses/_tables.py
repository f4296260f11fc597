"""Small helpers shared by the analysis results: frozen arrays, JSON-safe numbers, tables.

Tables are lists of flat ``dict`` rows (column name -> number, string, bool or ``None``);
:func:`markdown_table` renders them for humans (numbers rounded) and :func:`csv_text` for
machines (full precision, ``None``/NaN as an empty cell).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from raretoken.stats._common import finite_or_none as opt_float
from raretoken.stats._common import from_nan_list, frozen, nan_list
from raretoken.storage import atomic_write_text

__all__ = [
    "csv_text",
    "fmt",
    "from_nan_list",
    "frozen",
    "jsonable",
    "markdown_table",
    "nan_list",
    "opt_float",
    "write_csv",
]


def jsonable(v: Any) -> Any:
    """``v`` with numpy scalars/arrays turned into Python values and NaN into ``None``."""
    if isinstance(v, Mapping):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, np.ndarray):
        return jsonable(v.tolist())
    if isinstance(v, list | tuple):
        return [jsonable(x) for x in v]
    if isinstance(v, np.bool_ | bool):
        return bool(v)
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, float | np.floating):
        return opt_float(float(v))
    return v


def fmt(v: Any, digits: int = 3) -> str:
    """Human-readable cell: floats to ``digits`` significant digits, ``None``/NaN as ``–``."""
    if v is None:
        return "–"
    if isinstance(v, bool | np.bool_):
        return "yes" if v else "no"
    if isinstance(v, int | np.integer):
        return str(int(v))
    if isinstance(v, float | np.floating):
        f = float(v)
        if not math.isfinite(f):
            return "–"
        if f != 0.0 and (abs(f) < 10.0 ** (-digits) or abs(f) >= 1e6):
            return f"{f:.{max(digits - 1, 1)}e}"
        return f"{f:.{digits}g}" if abs(f) >= 1.0 else f"{f:.{digits}f}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def _columns(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None) -> list[str]:
    if columns is not None:
        return list(columns)
    cols: list[str] = []
    for row in rows:
        cols.extend(c for c in row if c not in cols)
    return cols


def markdown_table(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, digits: int = 3
) -> str:
    """GitHub-flavoured Markdown table of ``rows`` (missing cells shown as ``–``)."""
    cols = _columns(rows, columns)
    if not cols:
        return ""
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(c), digits) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def _csv_cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool | np.bool_):
        return "true" if v else "false"
    if isinstance(v, float | np.floating):
        f = float(v)
        return repr(f) if math.isfinite(f) else ""
    s = str(v)
    if any(ch in s for ch in ',"\n'):
        return '"' + s.replace('"', '""') + '"'
    return s


def csv_text(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """CSV text of ``rows`` (header line first; full float precision)."""
    cols = _columns(rows, columns)
    lines = [",".join(cols)]
    for row in rows:
        lines.append(",".join(_csv_cell(row.get(c)) for c in cols))
    return "\n".join(lines) + "\n"


def write_csv(
    path: Path | str, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None
) -> None:
    """Write :func:`csv_text` atomically to ``path``."""
    atomic_write_text(Path(path), csv_text(rows, columns))
