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


def frozen(a: np.ndarray) -> np.ndarray:
    """A read-only copy of ``a``."""
    a = np.array(a, copy=True)
    a.flags.writeable = False
    return a


def finite_or_none(v: float) -> float | None:
    """``v`` as a float, or ``None`` when it is NaN or infinite (for JSON)."""
    return None if not math.isfinite(v) else float(v)


def nan_if_none(v: float | None) -> float:
    """Inverse of :func:`finite_or_none`: ``None`` becomes NaN."""
    return math.nan if v is None else float(v)


def nan_list(a: np.ndarray) -> list[Any]:
    """Nested lists of ``a`` (any number of axes) with non-finite values as ``None``."""
    if a.ndim > 1:
        return [nan_list(row) for row in a]
    return [finite_or_none(v) for v in a.tolist()]


def from_nan_list(v: Sequence[Any]) -> np.ndarray:
    """Inverse of :func:`nan_list`: a ``float64`` array with ``None`` read as NaN."""

    def conv(x: Any) -> Any:
        if isinstance(x, list):
            return [conv(y) for y in x]
        return nan_if_none(x)

    return np.asarray(conv(list(v)), dtype=np.float64)


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
