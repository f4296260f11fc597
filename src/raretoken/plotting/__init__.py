"""Figures (matplotlib, Agg canvas, no pyplot state).

Exports are resolved lazily (PEP 562) so that ``import raretoken.plotting`` does not import
matplotlib. To export a name, add it to ``_EXPORTS`` (name -> submodule) and a
``from .module import name as name`` line to the ``TYPE_CHECKING`` block.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .rank_curve import RankCurve as RankCurve
    from .rank_curve import RankCurveDisplay as RankCurveDisplay

_EXPORTS: dict[str, str] = {
    # rank_curve.py: Figure-1-style log-log rank curve with the three-regime fit
    "RankCurve": "rank_curve",
    "RankCurveDisplay": "rank_curve",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
