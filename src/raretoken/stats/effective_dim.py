"""Effective dimension of a neuron group's activations (paper §3.2, eq. 4, Table 1).

Method
------
The activations of a group of ``N`` neurons over ``n`` context–token positions form a matrix
``A`` of shape ``(n, N)``. The eigenvalues ``λ_1 >= ... >= λ_N`` of its sample covariance
matrix are the PCA variances, and the effective dimension is (eq. 4)

    d_eff = min { d : Σ_{i<=d} λ_i / Σ_{j<=N} λ_j >= τ },   τ = 0.95 by default.

The eigenvalues come from :func:`numpy.linalg.eigh` of the ``N × N`` sample covariance
``X^T X / (n - 1)`` of the centred matrix ``X`` (``O(n N²)``, much cheaper than an SVD of the
tall ``n × N`` matrix; rounding negatives are clipped to 0). Table 1 reports the ratio
``d_eff / N``, returned as :attr:`EffectiveDimension.ratio`.

Choices where the paper is silent
---------------------------------
* ``>=`` as printed in eq. 4 (the prose says "exceeds"; scikit-learn's
  ``PCA(n_components=τ)`` uses ``>``). A relative tolerance of ``1e-12`` absorbs rounding, so a
  cumulative ratio that is exactly ``τ`` on paper counts as reaching it.
* Covariance (not correlation) PCA by default, as the paper speaks of "the activation
  covariance matrix"; ``standardize=True`` gives correlation PCA (each neuron scaled to unit
  variance), which removes the dominance of high-variance neurons.
* Fewer samples than neurons is refused: the covariance then has rank ``< N`` and ``d_eff``
  is capped by the sample size rather than by the neurons' coordination.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from raretoken.errors import ConfigError, InsufficientDataError, NumericalError
from raretoken.stats._common import frozen

logger = logging.getLogger(__name__)

_REL_TOL = 1e-12

__all__ = ["EffectiveDimension", "effective_dimension"]


@dataclass(frozen=True, eq=False)
class EffectiveDimension:
    """PCA effective dimension of one neuron group.

    Attributes
    ----------
    d_eff:
        Smallest number of principal components whose cumulative explained variance ratio is
        ``>= threshold`` (eq. 4).
    group_size:
        Number of neurons ``N`` (columns).
    ratio:
        ``d_eff / group_size`` (the quantity of Table 1).
    explained_variance_ratio:
        ``λ_i / Σ λ`` for components ``i = 1..N`` in descending order (axis: component).
    threshold:
        The variance threshold ``τ``.
    n_samples:
        Number of rows (positions) used.
    centered, standardized:
        Preprocessing used.
    """

    d_eff: int
    group_size: int
    ratio: float
    explained_variance_ratio: np.ndarray
    threshold: float
    n_samples: int
    centered: bool
    standardized: bool

    @property
    def cumulative_variance_ratio(self) -> np.ndarray:
        """Cumulative explained variance ratio per number of components."""
        return np.cumsum(self.explained_variance_ratio)

    def to_dict(self) -> dict[str, Any]:
        return {
            "d_eff": self.d_eff,
            "group_size": self.group_size,
            "ratio": self.ratio,
            "explained_variance_ratio": self.explained_variance_ratio.tolist(),
            "threshold": self.threshold,
            "n_samples": self.n_samples,
            "centered": self.centered,
            "standardized": self.standardized,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EffectiveDimension:
        return cls(
            d_eff=int(d["d_eff"]),
            group_size=int(d["group_size"]),
            ratio=float(d["ratio"]),
            explained_variance_ratio=frozen(
                np.asarray(d["explained_variance_ratio"], dtype=np.float64)
            ),
            threshold=float(d["threshold"]),
            n_samples=int(d["n_samples"]),
            centered=bool(d["centered"]),
            standardized=bool(d["standardized"]),
        )


def effective_dimension(
    acts: np.ndarray,
    *,
    threshold: float = 0.95,
    center: bool = True,
    standardize: bool = False,
) -> EffectiveDimension:
    """Effective dimension of the activations of one neuron group (eq. 4).

    Parameters
    ----------
    acts:
        Activations, shape ``(n_samples, n_neurons)``: one row per context–token position, one
        column per neuron of the group.
    threshold:
        Cumulative explained-variance threshold ``τ`` in ``(0, 1]``.
    center:
        Subtract each neuron's mean (PCA on the covariance). ``False`` analyses the raw second
        moment matrix (uncentred PCA), which is rarely wanted.
    standardize:
        Divide each (centred) neuron by its standard deviation: PCA on the correlation matrix.

    Returns
    -------
    EffectiveDimension

    Raises
    ------
    ConfigError
        ``acts`` not 2-D, or ``threshold`` outside ``(0, 1]``.
    InsufficientDataError
        Fewer than 2 neurons, or fewer samples than neurons.
    NumericalError
        Non-finite activations, zero total variance, or a zero-variance neuron with
        ``standardize=True``.
    """
    a = np.asarray(acts, dtype=np.float64)
    if a.ndim != 2:
        raise ConfigError(f"acts must be 2-D (n_samples, n_neurons), got shape {a.shape}")
    if not (math.isfinite(threshold) and 0.0 < threshold <= 1.0):
        raise ConfigError(f"threshold must be in (0, 1], got {threshold}")
    n, p = a.shape
    if p < 2:
        raise InsufficientDataError(f"effective dimension needs >= 2 neurons, got {p}")
    if n < p:
        raise InsufficientDataError(
            f"effective dimension needs at least as many samples as neurons, got {n} < {p}"
        )
    if not np.isfinite(a).all():
        raise NumericalError("activations contain NaN or infinite values")

    constant = np.ptp(a, axis=0) == 0.0 if center else np.all(a == 0.0, axis=0)
    if constant.all():
        raise NumericalError("activations have zero total variance")
    x = a - a.mean(axis=0) if center else a.copy()
    if standardize:
        if constant.any():
            raise NumericalError(
                f"{int(constant.sum())} neuron(s) have zero variance; cannot standardize"
            )
        x = x / np.sqrt(np.mean(x * x, axis=0))
    cov = x.T @ x / max(n - 1, 1)
    eig = np.clip(np.linalg.eigvalsh(cov)[::-1], 0.0, None)
    total = float(eig.sum())
    evr = eig / total
    cum = np.cumsum(evr)
    d_eff = int(np.searchsorted(cum, threshold * (1.0 - _REL_TOL), side="left")) + 1
    d_eff = min(d_eff, p)
    logger.debug("effective dimension %d of %d neurons over %d samples", d_eff, p, n)
    return EffectiveDimension(
        d_eff=d_eff,
        group_size=p,
        ratio=d_eff / p,
        explained_variance_ratio=frozen(evr),
        threshold=float(threshold),
        n_samples=n,
        centered=bool(center),
        standardized=bool(standardize),
    )
