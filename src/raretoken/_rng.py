"""Randomness goes through explicit seeds or Generators only (never global state)."""

from __future__ import annotations

import numpy as np

SeedLike = int | np.random.Generator | None


def as_generator(seed: SeedLike) -> np.random.Generator:
    """Return a :class:`numpy.random.Generator` for ``seed``.

    ``None`` is refused on purpose: every random draw in raretoken must be reproducible.
    """
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is None:
        raise ValueError("an explicit seed (int) or numpy Generator is required")
    return np.random.default_rng(int(seed))
