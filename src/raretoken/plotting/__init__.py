"""Figures (matplotlib, Agg canvas, no pyplot state).

Exports are resolved lazily (PEP 562, see :mod:`raretoken._lazy`) so that
``import raretoken.plotting`` does not import matplotlib. To export a name, add it to
``_EXPORTS`` (name -> submodule) and a ``from .module import name as name`` line to the
``TYPE_CHECKING`` block.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from raretoken._lazy import lazy_exports

if TYPE_CHECKING:
    from .rank_curve import RankCurve as RankCurve
    from .rank_curve import RankCurveDisplay as RankCurveDisplay

_EXPORTS: dict[str, str] = {
    # rank_curve.py: Figure-1-style log-log rank curve with the three-regime fit
    "RankCurve": "rank_curve",
    "RankCurveDisplay": "rank_curve",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
