"""Small helpers shared by the statistics modules (private: not part of the public API).

* Result arrays are stored as read-only copies (:func:`frozen`), so a frozen dataclass
  holding them cannot be changed through its arrays.
* JSON has no NaN/inf: non-finite floats are written as ``null`` (:func:`finite_or_none`,
  :func:`nan_list`, :func:`finite_scalars_dict`) and read back as NaN (:func:`nan_if_none`,
  :func:`from_nan_list`).
* Randomness needs an explicit seed or Generator (:func:`require_seed`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import numpy as np

from raretoken._rng import SeedLike, as_generator
from raretoken.errors import ConfigError


def frozen(a: np.ndarray | Sequence[Any], dtype: Any = None) -> np.ndarray:
    """A read-only copy of ``a`` (as ``dtype`` when given)."""
    out = np.array(a, dtype=dtype, copy=True)
    out.flags.writeable = False
    return out


def fmt_number(v: float | None, digits: int = 3) -> str:
    """``v`` for tables: ``n/a`` when missing or not finite, scientific when very small or
    large, else ``digits`` significant digits."""
    if v is None or not math.isfinite(v):
        return "n/a"
    if v != 0.0 and (abs(v) < 10.0 ** -(digits - 1) or abs(v) >= 1e5):
        return f"{v:.{digits - 1}e}"
    return f"{v:.{digits}g}"


def finite_or_none(v: float | None) -> float | None:
    """``v`` as a float, or ``None`` when it is ``None``, NaN or infinite (for JSON)."""
    if v is None:
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def nan_if_none(v: float | None) -> float:
    """Inverse of :func:`finite_or_none`: ``None`` becomes NaN."""
    return math.nan if v is None else float(v)


def nan_list(a: np.ndarray | Sequence[Any]) -> list[Any]:
    """Nested lists of ``a`` (any number of axes; a scalar gives a one-item list) with
    non-finite values as ``None``."""
    arr = np.asarray(a, dtype=np.float64)
    if arr.ndim == 0:
        return [finite_or_none(float(arr))]
    if arr.ndim > 1:
        return [nan_list(row) for row in arr]
    return [finite_or_none(v) for v in arr.tolist()]


def from_nan_list(v: Sequence[Any], ndim: int = 1) -> np.ndarray:
    """Inverse of :func:`nan_list`: a read-only ``float64`` array with ``None`` read as NaN
    (empty input keeps ``ndim`` axes)."""

    def conv(x: Any) -> Any:
        if isinstance(x, list):
            return [conv(y) for y in x]
        return nan_if_none(x)

    out = np.asarray(conv(list(v)), dtype=np.float64)
    if out.size == 0:
        out = out.reshape((0,) * ndim)
    return frozen(out)


def finite_scalars_dict(result: Any) -> dict[str, Any]:
    """``dataclasses.asdict(result)`` with every float field passed through
    :func:`finite_or_none` (for results made of scalars only)."""
    return {
        k: (finite_or_none(v) if isinstance(v, float) else v) for k, v in asdict(result).items()
    }


def require_seed(seed: SeedLike, who: str) -> np.random.Generator:
    """:func:`raretoken._rng.as_generator`, with a missing seed reported as a
    :class:`~raretoken.errors.ConfigError` ``"<who> needs an explicit seed"``."""
    try:
        return as_generator(seed)
    except ValueError as err:
        raise ConfigError(f"{who} needs an explicit seed") from err
