from __future__ import annotations

import json
import math

import numpy as np
import pytest

from raretoken.errors import ConfigError, InsufficientDataError, NumericalError
from raretoken.stats.effective_dim import EffectiveDimension, effective_dimension


def exact_spectrum_data(spectrum: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Data whose *sample* covariance has exactly the eigenvalues ``spectrum``.

    Centred orthonormal scores (QR of a centred Gaussian matrix) scaled by ``sqrt(λ (n-1))``
    and rotated by a random orthogonal matrix, plus an arbitrary mean per column.
    """
    rng = np.random.default_rng(seed)
    p = spectrum.size
    z = rng.normal(size=(n, p))
    z -= z.mean(axis=0)
    q, _ = np.linalg.qr(z)
    rot, _ = np.linalg.qr(rng.normal(size=(p, p)))
    x = q * np.sqrt(spectrum * (n - 1)) @ rot.T
    return x + rng.normal(size=p) * 5.0


SPECTRUM = np.array([40.0, 25.0, 15.0, 10.0, 6.0, 2.0, 1.0, 0.5, 0.3, 0.2])  # sums to 100


def test_known_spectrum_exact_d_eff() -> None:
    x = exact_spectrum_data(SPECTRUM, n=500, seed=0)
    res = effective_dimension(x)
    np.testing.assert_allclose(res.explained_variance_ratio, SPECTRUM / 100.0, atol=1e-12)
    # cumulative: .40 .65 .80 .90 .96 .98 .99 ...
    assert res.d_eff == 5
    assert res.group_size == 10
    assert res.ratio == pytest.approx(0.5)
    assert res.n_samples == 500
    assert effective_dimension(x, threshold=0.97).d_eff == 6
    assert effective_dimension(x, threshold=0.5).d_eff == 2
    assert effective_dimension(x, threshold=1.0).d_eff == 10


def test_threshold_reached_exactly_counts_as_reached() -> None:
    # eq. 4 uses ">=": cumulative .90 at d=4 reaches tau=.90 (sklearn's ">" would give 5)
    x = exact_spectrum_data(SPECTRUM, n=300, seed=1)
    assert effective_dimension(x, threshold=0.90).d_eff == 4
    assert effective_dimension(x, threshold=0.80).d_eff == 3


def test_isotropic_group_has_full_dimension() -> None:
    # independent, equal-variance neurons: d_eff = ceil(tau N)
    for p in (4, 20, 37):
        x = exact_spectrum_data(np.ones(p), n=400, seed=p)
        res = effective_dimension(x)
        assert res.d_eff == math.ceil(0.95 * p)


def test_rank_one_group_has_dimension_one() -> None:
    rng = np.random.default_rng(3)
    latent = rng.normal(size=(1000, 1))
    x = latent @ rng.normal(size=(1, 30)) + 1e-4 * rng.normal(size=(1000, 30))
    assert effective_dimension(x).d_eff == 1


def test_matches_numpy_covariance_eigenvalues() -> None:
    rng = np.random.default_rng(4)
    mix = rng.normal(size=(25, 25)) * np.linspace(3, 0.1, 25)
    x = rng.normal(size=(2000, 25)) @ mix
    res = effective_dimension(x)
    lam = np.sort(np.linalg.eigvalsh(np.cov(x, rowvar=False)))[::-1]
    np.testing.assert_allclose(res.explained_variance_ratio, lam / lam.sum(), rtol=1e-9)
    cum = np.cumsum(lam / lam.sum())
    assert res.d_eff == int(np.argmax(cum >= 0.95)) + 1


def test_matches_sklearn_pca() -> None:
    decomposition = pytest.importorskip("sklearn.decomposition")
    rng = np.random.default_rng(5)
    for trial in range(5):
        p = 10 + 7 * trial
        x = rng.normal(size=(3000, p)) @ rng.normal(size=(p, p))
        res = effective_dimension(x)
        pca = decomposition.PCA(n_components=0.95, svd_solver="full").fit(x)
        assert res.d_eff == pca.n_components_
        full = decomposition.PCA(svd_solver="full").fit(x)
        np.testing.assert_allclose(
            res.explained_variance_ratio, full.explained_variance_ratio_, rtol=1e-8, atol=1e-14
        )


def test_invariances() -> None:
    x = exact_spectrum_data(SPECTRUM, n=400, seed=6)
    base = effective_dimension(x)
    perm = np.random.default_rng(0).permutation(10)
    for y in (x[:, perm], 7.5 * x, x + 100.0):
        np.testing.assert_allclose(
            effective_dimension(y).explained_variance_ratio,
            base.explained_variance_ratio,
            atol=1e-10,
        )
        assert effective_dimension(y).d_eff == base.d_eff


def test_standardize_uses_correlation() -> None:
    # independent neurons, one with a huge variance: covariance PCA sees one dimension,
    # correlation PCA sees all four
    rng = np.random.default_rng(8)
    z = rng.normal(size=(200, 4))
    z -= z.mean(axis=0)
    q, _ = np.linalg.qr(z)
    x = q * np.sqrt(np.array([1000.0, 1.0, 1.0, 1.0]) * 199)
    assert effective_dimension(x).d_eff == 1
    res = effective_dimension(x, standardize=True)
    assert res.d_eff == 4
    np.testing.assert_allclose(res.explained_variance_ratio, 0.25, atol=1e-12)
    assert res.standardized


def test_uncentred_option_differs_from_centred() -> None:
    rng = np.random.default_rng(9)
    x = rng.normal(size=(500, 6)) + 50.0
    # a large common mean dominates the raw second-moment matrix
    assert effective_dimension(x, center=False).d_eff == 1
    assert effective_dimension(x).d_eff >= 5


def test_errors() -> None:
    rng = np.random.default_rng(10)
    with pytest.raises(InsufficientDataError):
        effective_dimension(rng.normal(size=(100, 1)))
    with pytest.raises(InsufficientDataError):
        effective_dimension(rng.normal(size=(5, 6)))
    with pytest.raises(ConfigError):
        effective_dimension(rng.normal(size=(100,)))
    with pytest.raises(ConfigError):
        effective_dimension(rng.normal(size=(100, 3)), threshold=0.0)
    with pytest.raises(ConfigError):
        effective_dimension(rng.normal(size=(100, 3)), threshold=1.5)
    x = rng.normal(size=(100, 3))
    x[4, 1] = np.nan
    with pytest.raises(NumericalError):
        effective_dimension(x)
    x[4, 1] = np.inf
    with pytest.raises(NumericalError):
        effective_dimension(x)
    with pytest.raises(NumericalError):
        effective_dimension(np.full((50, 4), 0.1))
    y = rng.normal(size=(50, 4))
    y[:, 2] = 3.0
    assert effective_dimension(y).group_size == 4  # one constant neuron is fine ...
    with pytest.raises(NumericalError):
        effective_dimension(y, standardize=True)  # ... but cannot be standardised


def test_round_trip_json() -> None:
    res = effective_dimension(exact_spectrum_data(SPECTRUM, n=100, seed=11))
    back = EffectiveDimension.from_dict(json.loads(json.dumps(res.to_dict())))
    assert back.d_eff == res.d_eff and back.ratio == res.ratio
    np.testing.assert_array_equal(back.explained_variance_ratio, res.explained_variance_ratio)
    assert not back.explained_variance_ratio.flags.writeable
