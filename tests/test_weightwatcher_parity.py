"""Parity with the ``weightwatcher`` package (0.7.x) on whole layers of tiny models.

For every layer WeightWatcher analyses, the eigenvalues are computed here independently
(squared singular values of the module's weight, as WeightWatcher does) and fitted with
:func:`raretoken.stats.powerlaw_fit.powerlaw_fit` with WeightWatcher's candidate set
(``min_tail=2``); ``alpha`` (density exponent), ``xmin``, ``D``, ``sigma``,
``alpha_weighted``, ``lambda_max`` and ``num_pl_spikes`` must agree. Layers with fewer than
20 eigenvalues are left out: WeightWatcher 0.7.7 fits them with a different small-sample
heuristic (``WWFit.fit_powerlaw_smallN``) that is not reproduced.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pytest

from raretoken.stats.powerlaw_fit import MIN_EVALS, powerlaw_fit
from tiny import tiny_model

ww = pytest.importorskip("weightwatcher")

WW_SMALL_N = 20  # weightwatcher.WW_powerlaw.SMALL_N_CUTOFF


@pytest.fixture(autouse=True)
def _quiet_weightwatcher() -> Any:
    logger = logging.getLogger("weightwatcher")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


def _layer_eigenvalues(model: Any, longname: str) -> np.ndarray:
    w = model.get_submodule(longname).weight.detach().double().numpy()
    return np.linalg.svd(w.reshape(w.shape[0], -1), compute_uv=False) ** 2


@pytest.mark.parametrize("family", ["gpt2", "neox", "llama"])
@pytest.mark.parametrize("fix_fingers", [None, "clip_xmax"])
def test_whole_layers_match_weightwatcher(family: str, fix_fingers: str | None) -> None:
    model = tiny_model(family)
    details = ww.WeightWatcher(model=model).analyze(fix_fingers=fix_fingers or False)
    assert (details["status"] == "success").all()
    compared = clipped = 0
    for _, row in details.iterrows():
        eigs = _layer_eigenvalues(model, row["longname"])
        assert eigs.size == row["M"] >= MIN_EVALS
        if row["M"] < WW_SMALL_N:
            continue
        ours = powerlaw_fit(eigs, min_tail=2, fix_fingers=fix_fingers)  # type: ignore[arg-type]
        where = f"{family} {row['longname']}"
        assert ours.fitted, where
        assert ours.lambda_max == pytest.approx(row["lambda_max"], rel=1e-9), where
        assert ours.alpha_pdf == pytest.approx(row["alpha"], rel=1e-9), where
        assert ours.x_min == pytest.approx(row["xmin"], rel=1e-9), where
        assert ours.ks_distance == pytest.approx(row["D"], rel=1e-8), where
        assert ours.alpha_pdf_se == pytest.approx(row["sigma"], rel=1e-9), where
        assert ours.alpha_weighted == pytest.approx(row["alpha_weighted"], rel=1e-9), where
        # WeightWatcher counts the clipped eigenvalues among its power-law spikes
        assert ours.k + ours.n_clipped == row["num_pl_spikes"], where
        if fix_fingers:
            assert max(ours.n_clipped - 1, 0) == row["num_fingers"], where
        compared += 1
        clipped += ours.n_clipped > 0
    assert compared >= 14  # every layer with >= 20 eigenvalues (k/v of llama have 16)
    if fix_fingers and family == "llama":
        assert clipped >= 1  # the clipping branch was exercised on this model


def test_clipped_fit_matches_weightwatcher_function() -> None:
    from weightwatcher.RMT_Util import fit_clipped_powerlaw

    fired = 0
    for seed in range(15):
        x = np.linalg.svd(np.random.default_rng(seed).normal(size=(48, 48)), compute_uv=False)
        eigs = np.sort(x**2)
        ref, num_fingers, _raw = fit_clipped_powerlaw(eigs)
        ours = powerlaw_fit(eigs, min_tail=2, fix_fingers="clip_xmax")
        assert ours.alpha_pdf == pytest.approx(ref.alpha, rel=1e-9)
        assert ours.x_min == pytest.approx(ref.xmin, rel=1e-9)
        assert max(ours.n_clipped - 1, 0) == num_fingers
        fired += ours.n_clipped > 0
    assert fired >= 3


def test_default_min_tail_is_weightwatchers_scan_restricted_to_tails_of_8() -> None:
    """With the default guard (tails of >= 8) the fit is the minimum of WeightWatcher's own
    per-candidate KS distances over those tails; it equals WeightWatcher's fit exactly where
    WeightWatcher's minimum already has >= 8 tail eigenvalues."""
    from weightwatcher.WW_powerlaw import WWFit

    model = tiny_model("llama")
    details = ww.WeightWatcher(model=model).analyze()
    differ = 0
    for _, row in details[details["M"] >= WW_SMALL_N].iterrows():
        eigs = _layer_eigenvalues(model, row["longname"])
        ours = powerlaw_fit(eigs)
        scan = WWFit(eigs)  # alphas[i], Ds[i]: candidate x_min = i-th smallest eigenvalue
        tails = eigs.size - np.arange(scan.Ds.size)
        i = int(np.argmin(np.where(tails >= 8, scan.Ds, np.inf)))
        assert ours.k == tails[i] and ours.x_min == pytest.approx(np.sort(eigs)[i], rel=1e-9)
        assert ours.alpha_pdf == pytest.approx(scan.alphas[i], rel=1e-9)
        if row["num_pl_spikes"] >= 8:
            assert ours.alpha_pdf == pytest.approx(row["alpha"], rel=1e-9)
        else:
            differ += 1
    assert differ >= 1  # measured: 3 of 17 layers have a WeightWatcher tail of < 8
