"""The analyses against covariate-matched random groups: a finding that only reflects the
group being the high-activation neurons disappears under matching."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from raretoken.analyses.claims import SUPPORTED, Claim, _with_matched
from raretoken.analyses.groups import NeuronGroup
from raretoken.analyses.matched import MatchedControls, matched_controls, matching_covariates
from raretoken.stats.baselines import BaselineComparison


def _confounded(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """300 neurons; the 60 with the largest mean |activation| (an offset, so no variance
    dominates) and output norms share one latent factor (so any group of them is
    'coordinated'); the group is 12 of those 60."""
    rng = np.random.default_rng(seed)
    n_pos, n = 2000, 300
    big = rng.choice(n, 60, replace=False)
    latent = rng.normal(size=(n_pos, 1))
    acts = rng.normal(size=(n_pos, n))
    acts[:, big] = 0.3 * acts[:, big] + latent + 5.0
    scale = np.ones(n)
    scale[big] = 5.0
    w_out = rng.normal(size=(n, 16)) * scale[:, None]
    group = np.sort(rng.choice(big, 12, replace=False))
    return acts.astype(np.float32), w_out, group


def test_matching_covariates_are_norms_and_mean_abs_activations() -> None:
    acts, w_out, _ = _confounded()
    covs = matching_covariates(acts, w_out, chunk=333)
    assert np.allclose(covs["w_out_norm"], np.linalg.norm(w_out, axis=1))
    assert np.allclose(covs["act_abs_mean"], np.abs(acts.astype(np.float64)).mean(0))


def test_a_confounded_finding_disappears_against_matched_controls() -> None:
    from raretoken.analyses.coordination import coordination_analysis
    from raretoken.analyses.groups import random_control_groups

    acts, w_out, ids = _confounded()
    group = NeuronGroup("plateau", "plateau", ids)
    uniform = coordination_analysis(acts, ids, random_control_groups(ids, 300, 50, seed=0),
                                    group_name="plateau")  # fmt: skip
    assert uniform.comparison.p_value < 0.05  # 'coordinated' against uniform random groups
    m = matched_controls(SimpleNamespace(acts=acts, uniform_positions=np.arange(acts.shape[0])), group, acts, w_out, w_out,  # type: ignore[arg-type]
                         n_random=50, seed=0)  # fmt: skip
    assert m.coordination is not None and m.coordination.p_value > 0.05  # not vs matched
    smd = {b.name: b.smd_matched for b in m.balance}
    assert abs(smd["act_abs_mean"]) < 0.5 and abs(smd["w_out_norm"]) < 0.5
    unmatched = {b.name: b.smd_all for b in m.balance}
    assert unmatched["act_abs_mean"] > 1.0  # the group is far from the layer's average
    again = MatchedControls.from_dict(json.loads(json.dumps(m.to_dict())))
    assert again.to_table() == m.to_table()
    assert "matched" in m.to_markdown()
    claim = Claim("coordination", "c", "p", "f", "t", uniform.comparison.p_value, SUPPORTED)
    judged = _with_matched(claim, m, 0.05)
    assert judged.verdict == SUPPORTED and judged.verdict_matched != SUPPORTED
    assert "disappears against matched controls" in judged.finding


def test_matched_controls_are_reproducible_and_exclude_the_group() -> None:
    acts, w_out, ids = _confounded(1)
    group = NeuronGroup("plateau", "plateau", ids)
    ns = SimpleNamespace(acts=acts, uniform_positions=np.arange(acts.shape[0]))
    a = matched_controls(ns, group, acts, w_out, w_out, n_random=20, seed=3)  # type: ignore[arg-type]
    b = matched_controls(ns, group, acts, w_out, w_out, n_random=20, seed=3)  # type: ignore[arg-type]
    assert a.to_dict() == b.to_dict()


@pytest.mark.parametrize(("uniform", "p_matched", "expected"), [
    ("supported", 0.01, None), ("supported", 0.5, "disappears"),
    ("inconclusive", 0.01, "only against matched"),
])  # fmt: skip
def test_verdict_text_under_matching(uniform: str, p_matched: float, expected: str | None) -> None:
    cmp = BaselineComparison(0.5, 0.8, 0.1, 100, p_matched, "less", -3.0, 0.01)
    m = MatchedControls("plateau", ("w_out_norm",), 100, 0, (), cmp, None, cmp)
    judged = _with_matched(Claim("spectra", "c", "p", "f", "t", 0.01, uniform), m, 0.05)
    if expected is None:
        assert judged.finding.endswith(")") and judged.verdict_matched == SUPPORTED
    else:
        assert expected in judged.finding
    spatial = _with_matched(Claim("spatial", "c", "p", "f", "t", 0.5, uniform), m, 0.05, null=True)
    assert spatial.verdict_matched == "inconclusive" and "not computed" in spatial.finding


def test_unmatchable_inputs_are_reported_not_fatal() -> None:
    """A constant covariate is left out (and said so); a group too large to match within the
    layer makes every matched comparison 'not possible' with the reason, never a crash, and
    the claims say so."""
    acts, w_out, ids = _confounded(2)
    group = NeuronGroup("plateau", "plateau", ids)
    flat = np.full_like(acts, 0.5)  # mean |activation| the same for every neuron
    ns = SimpleNamespace(acts=flat, uniform_positions=np.arange(acts.shape[0]))
    m = matched_controls(ns, group, acts, w_out, w_out, n_random=10, seed=0)  # type: ignore[arg-type]
    assert m.covariates == ("w_out_norm",)
    assert "constant over the layer" in m.errors["covariate act_abs_mean"]
    assert m.coordination is not None  # matched on the norms alone

    big = NeuronGroup("plateau", "plateau", np.arange(200))
    ns = SimpleNamespace(acts=acts, uniform_positions=np.arange(acts.shape[0]))
    m = matched_controls(ns, big, acts, w_out, w_out, n_random=10, seed=0)  # type: ignore[arg-type]
    assert m.coordination is None and m.spatial is None and m.spectra is None
    assert "matched controls not possible" in m.errors["coordination"]
    claim = Claim("coordination", "c", "p", "f", "t", 0.01, SUPPORTED)
    judged = _with_matched(claim, m, 0.05)
    assert judged.verdict_matched == "inconclusive" and "not possible" in judged.finding
    assert MatchedControls.from_dict(json.loads(json.dumps(m.to_dict()))).errors == m.errors
    assert "not possible" in m.to_markdown()
