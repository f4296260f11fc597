"""Size-matched random neuron groups and the comparison of a statistic against them.

Every organisational statistic of the rare-token (plateau) neurons (effective dimension,
modularity, α_Hill) is judged against the same statistic on random groups of the same size
drawn from the same layer with the plateau neurons excluded (paper §3.2, Tables 1 and 3,
Figure 2).

Method
------
* :func:`random_groups`: each draw is a uniform random subset (without replacement) of
  ``pool \\ exclude`` of the requested size, drawn independently of the other draws (two
  draws may overlap or, for tiny pools, coincide). Rows are sorted ascending. The draws come
  from an explicit seed/Generator only.
* :func:`compare_to_random`: empirical (Monte Carlo) p-values with the ``+1`` correction of
  Davison & Hinkley / Phipson & Smyth, which makes them valid (never 0) when the observed
  group is exchangeable with the random ones:

  - ``"greater"``: ``(1 + #{r >= obs}) / (n + 1)``;
  - ``"less"``: ``(1 + #{r <= obs}) / (n + 1)``;
  - ``"two-sided"``: ``min(1, 2 · min(p_greater, p_less))`` (doubling the smaller tail; it
    does not assume the random distribution is symmetric).

  Effect size: ``z = (obs - mean(r)) / sd(r)`` (``sd`` with ``ddof=1``). With a single
  observed group, Cohen's d against the random groups reduces to this z; for two samples
  use :func:`raretoken.stats.routing.cohens_d`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from raretoken.errors import ConfigError, InsufficientDataError, NumericalError
from raretoken.stats._common import finite_scalars_dict, nan_if_none, require_seed

logger = logging.getLogger(__name__)

Alternative = Literal["two-sided", "less", "greater"]

__all__ = ["BaselineComparison", "compare_to_random", "random_groups"]


def random_groups(
    pool_ids: Sequence[int] | np.ndarray,
    size: int,
    n_draws: int,
    *,
    exclude: Sequence[int] | np.ndarray = (),
    seed: int | np.random.Generator,
) -> np.ndarray:
    """Size-matched random neuron groups.

    Parameters
    ----------
    pool_ids:
        Neuron ids to draw from (e.g. all neurons of the layer); must be unique integers.
    size:
        Neurons per group (the plateau size).
    n_draws:
        Number of groups.
    exclude:
        Ids never drawn (the plateau neurons); ids absent from the pool are ignored.
    seed:
        Seed or Generator.

    Returns
    -------
    np.ndarray
        ``int64`` array ``(n_draws, size)``; row ``i`` is group ``i``, sorted ascending.
    """
    pool = np.asarray(pool_ids)
    if pool.ndim != 1 or not np.issubdtype(pool.dtype, np.integer):
        raise ConfigError("pool_ids must be a 1-D sequence of integers")
    if np.unique(pool).size != pool.size:
        raise ConfigError("pool_ids must be unique")
    if size < 1:
        raise ConfigError(f"group size must be >= 1, got {size}")
    if n_draws < 1:
        raise ConfigError(f"n_draws must be >= 1, got {n_draws}")
    rng = require_seed(seed, "random_groups")
    excl = np.asarray(exclude, dtype=np.int64).ravel()
    avail = pool[~np.isin(pool, excl)].astype(np.int64)
    if avail.size < size:
        raise InsufficientDataError(
            f"cannot draw groups of {size} from {avail.size} neurons left after exclusion"
        )
    out = np.empty((n_draws, size), dtype=np.int64)
    for i in range(n_draws):
        out[i] = np.sort(avail[rng.choice(avail.size, size=size, replace=False)])
    logger.debug("drew %d random groups of %d from %d neurons", n_draws, size, avail.size)
    return out


@dataclass(frozen=True)
class BaselineComparison:
    """An observed statistic against its distribution over random groups.

    Attributes
    ----------
    observed:
        The statistic of the group of interest.
    random_mean, random_sd:
        Mean and SD (``ddof=1``) over the random groups.
    n_draws:
        Number of random groups.
    p_value:
        Empirical p-value with the ``+1`` correction for ``alternative``.
    alternative:
        ``"two-sided"``, ``"less"`` (observed smaller than random) or ``"greater"``.
    z_score:
        ``(observed - random_mean) / random_sd`` (NaN when the SD is 0); equal to Cohen's d
        for a single observed group.
    percentile:
        Fraction of random values below the observed one, ties counted half (0–1).
    """

    observed: float
    random_mean: float
    random_sd: float
    n_draws: int
    p_value: float
    alternative: str
    z_score: float
    percentile: float

    def to_dict(self) -> dict[str, Any]:
        return finite_scalars_dict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BaselineComparison:
        floats = ("observed", "random_mean", "random_sd", "p_value", "z_score", "percentile")
        kw: dict[str, Any] = {name: nan_if_none(d[name]) for name in floats}
        return cls(n_draws=int(d["n_draws"]), alternative=str(d["alternative"]), **kw)


def compare_to_random(
    observed: float,
    random_values: np.ndarray | Sequence[float],
    *,
    alternative: Alternative = "two-sided",
) -> BaselineComparison:
    """Compare an observed statistic with its values on random groups.

    Parameters
    ----------
    observed:
        Statistic of the group of interest (e.g. the plateau's ``d_eff / N``).
    random_values:
        The same statistic on each random group.
    alternative:
        ``"two-sided"``, ``"less"`` or ``"greater"`` (direction of the observed value).

    Returns
    -------
    BaselineComparison
    """
    obs = float(observed)
    r = np.asarray(random_values, dtype=np.float64).ravel()
    if not math.isfinite(obs) or not np.isfinite(r).all():
        raise NumericalError("observed and random values must be finite")
    if r.size < 2:
        raise InsufficientDataError(f"need >= 2 random values, got {r.size}")
    if alternative not in ("two-sided", "less", "greater"):
        raise ConfigError(f"unknown alternative {alternative!r}")
    n = int(r.size)
    p_greater = (1.0 + int(np.count_nonzero(r >= obs))) / (n + 1.0)
    p_less = (1.0 + int(np.count_nonzero(r <= obs))) / (n + 1.0)
    if alternative == "greater":
        p = p_greater
    elif alternative == "less":
        p = p_less
    else:
        p = min(1.0, 2.0 * min(p_greater, p_less))
    mean = float(r.mean())
    sd = float(r.std(ddof=1))
    z = (obs - mean) / sd if sd > 0.0 else math.nan
    pct = (np.count_nonzero(r < obs) + 0.5 * np.count_nonzero(r == obs)) / n
    return BaselineComparison(
        observed=obs,
        random_mean=mean,
        random_sd=sd,
        n_draws=int(n),
        p_value=float(p),
        alternative=alternative,
        z_score=float(z),
        percentile=float(pct),
    )
