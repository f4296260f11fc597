"""Statistics on neuron influence and activations.

Exports are resolved lazily (PEP 562): ``import raretoken.stats`` imports no submodule, and
``raretoken.stats.<name>`` imports the submodule that defines ``<name>`` on first access.
To export a name, add it to ``_EXPORTS`` (name -> submodule) and a
``from .module import name as name`` line to the ``TYPE_CHECKING`` block.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .regimes import PiecewiseLinearFit as PiecewiseLinearFit
    from .regimes import RegimeBootstrap as RegimeBootstrap
    from .regimes import RegimeFit as RegimeFit
    from .regimes import RegimeSettings as RegimeSettings
    from .regimes import SegmentFit as SegmentFit
    from .regimes import bootstrap_regimes as bootstrap_regimes
    from .regimes import fit_regimes as fit_regimes
    from .regimes import segmented_regression as segmented_regression

_EXPORTS: dict[str, str] = {
    # regimes.py: three-regime rank-curve fit (paper eq. 11)
    "PiecewiseLinearFit": "regimes",
    "RegimeBootstrap": "regimes",
    "RegimeFit": "regimes",
    "RegimeSettings": "regimes",
    "SegmentFit": "regimes",
    "bootstrap_regimes": "regimes",
    "fit_regimes": "regimes",
    "segmented_regression": "regimes",
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
