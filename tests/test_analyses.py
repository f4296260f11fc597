"""The organisational analyses (raretoken.analyses): synthetic data with known answers,
model wiring on tiny GPT-2 / NeoX / Llama models, and the suite end to end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from matplotlib.axes import Axes

from pipeline_fixtures import tiny_overrides, tiny_setup
from raretoken.analyses import (
    AnalysisSuite,
    CoordinationResult,
    RoutingResult,
    SpatialResult,
    SpectraResult,
    analyses_for_split,
    attention_gini,
    coordination_analysis,
    evaluate_claims,
    head_ablation,
    plateau_group,
    random_control_groups,
    robustness_table,
    routing_analysis,
    run_analyses,
    spatial_analysis,
    spectra_analysis,
    split_positions,
    topk_group,
    write_analyses,
)
from raretoken.analyses.groups import group_for_split, topk_neurons
from raretoken.analyses.routing import ALL_HEADS
from raretoken.errors import ConfigError, InsufficientDataError, NumericalError
from raretoken.models import adapter_for, capture_input
from raretoken.models.hooks import ablate_heads
from raretoken.plotting.analyses import new_figure
from raretoken.run import Identification, identify, make_config
from raretoken.stats.regimes import fit_regimes
from raretoken.stats.routing import ablation_impact
from tiny import tiny_model

# ---------------------------------------------------------------------------------------------
# Synthetic data with known structure
# ---------------------------------------------------------------------------------------------

N_POS, N_NEURONS = 600, 80
GROUP = np.arange(10, 22)  # 12 neurons


def _acts(seed: int = 0, *, low_rank_group: bool = True, clusters: bool = False) -> np.ndarray:
    """iid N(0,1) neurons; the group is rank-2 + small noise, or 3 clusters of 4 neurons."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(N_POS, N_NEURONS))
    if clusters:
        for c in range(3):
            latent = rng.normal(size=(N_POS, 1))
            cols = GROUP[4 * c : 4 * c + 4]
            a[:, cols] = latent + 0.3 * rng.normal(size=(N_POS, 4))
    elif low_rank_group:
        z = rng.normal(size=(N_POS, 2))
        a[:, GROUP] = z @ rng.normal(size=(2, GROUP.size)) + 0.05 * rng.normal(
            size=(N_POS, GROUP.size)
        )
    return a


def _weights(seed: int = 0, d: int = 64) -> np.ndarray:
    """Gaussian rows; the group's rows have a power-law singular spectrum (heavy tail)."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(N_NEURONS, d))
    u, _ = np.linalg.qr(rng.normal(size=(GROUP.size, GROUP.size)))
    v, _ = np.linalg.qr(rng.normal(size=(d, GROUP.size)))
    s = np.sqrt(d) * np.arange(1, GROUP.size + 1, dtype=np.float64) ** -1.5 * 3.0
    w[GROUP] = (u * s) @ v.T
    return w


def _rgroups(n: int = 30, seed: int = 1) -> np.ndarray:
    return random_control_groups(GROUP, N_NEURONS, n, seed=seed)


def _d_eff_numpy(x: np.ndarray, tau: float = 0.95) -> int:
    """Independent d_eff: SVD of the centred matrix."""
    s = np.linalg.svd(x - x.mean(0), compute_uv=False) ** 2
    return int(np.argmax(np.cumsum(s) / s.sum() >= tau - 1e-12) + 1)


def test_random_control_groups_exclude_the_group_and_are_seeded() -> None:
    a = random_control_groups(GROUP, N_NEURONS, 50, seed=3)
    b = random_control_groups(GROUP, N_NEURONS, 50, seed=3)
    c = random_control_groups(GROUP, N_NEURONS, 50, seed=4)
    assert a.shape == (50, GROUP.size)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert not np.isin(a, GROUP).any()
    assert all(np.unique(row).size == GROUP.size for row in a)


def test_coordination_low_rank_group_is_supported() -> None:
    acts = _acts()
    res = coordination_analysis(acts, GROUP, _rgroups())
    # independent d_eff by SVD, for the group and for every random group
    assert res.observed.d_eff == _d_eff_numpy(acts[:, GROUP]) == 2
    expected = [_d_eff_numpy(acts[:, g]) for g in res.random_groups]
    assert res.random_d_eff.tolist() == expected
    assert res.observed.ratio == pytest.approx(2 / 12)
    assert res.comparison.alternative == "less"
    assert res.comparison.p_value == pytest.approx(1 / 31)  # below every random group
    row = res.to_table()[0]
    assert row["d_eff"] == 2 and row["n_random"] == 30


def test_coordination_wrong_direction_is_not_supported() -> None:
    # every neuron outside the group shares a rank-3 structure; the group is iid
    rng = np.random.default_rng(5)
    acts = rng.normal(size=(N_POS, 3)) @ rng.normal(size=(3, N_NEURONS))
    acts += 0.01 * rng.normal(size=acts.shape)
    acts[:, GROUP] = rng.normal(size=(N_POS, GROUP.size))
    coord = coordination_analysis(acts, GROUP, _rgroups())
    spat = spatial_analysis(acts, GROUP, _rgroups(), seed=0)
    spec = spectra_analysis(_weights(), GROUP, _rgroups())
    claims = evaluate_claims(coord, spat, None, spec)
    assert coord.observed.ratio > coord.comparison.random_mean
    assert claims.verdict("coordination") == "not supported"
    assert claims.verdict("routing") == "inconclusive"  # not run


def test_spatial_clustered_group_has_higher_modularity() -> None:
    acts = _acts(clusters=True)
    res = spatial_analysis(acts, GROUP, _rgroups(), seed=0)
    # Louvain recovers the three planted clusters of 4 neurons
    assert res.observed.n_communities == 3
    assert sorted(res.observed.community_sizes.tolist()) == [4, 4, 4]
    comms = {tuple(c.tolist()) for c in res.observed.communities()}
    assert comms == {tuple(GROUP[4 * c : 4 * c + 4].tolist()) for c in range(3)}
    assert res.observed.q > res.q_comparison.random_mean
    assert res.q_comparison.p_value == pytest.approx(1 / 31)
    assert res.mean_mi > res.mi_comparison.random_mean
    rows = res.to_table()
    assert rows[0]["mean_community_size"] == pytest.approx(4.0)
    assert rows[1]["group"] == "random" and rows[1]["n_groups"] == 30


def test_spectra_heavy_tailed_group_has_lower_alpha() -> None:
    w = _weights()
    res = spectra_analysis(w, GROUP, _rgroups())
    # independent Hill estimate from numpy eigenvalues and the fitted k (eq. 10 as printed)
    eig = np.sort(np.linalg.eigvalsh(w[GROUP] @ w[GROUP].T / w.shape[1]))[::-1]
    k = res.observed.k
    alpha = k / np.sum(np.log(eig[:k] / eig[k - 1]))
    assert res.observed.alpha == pytest.approx(alpha, rel=1e-9)
    assert res.observed.alpha_pdf == pytest.approx(alpha + 1)
    assert res.observed.alpha < res.comparison.random_mean
    assert res.comparison.p_value == pytest.approx(1 / 31)
    assert res.d == 64 and res.random_eigenvalues.shape == (30, GROUP.size)


def test_claims_on_synthetic_data_with_known_answers() -> None:
    acts_lr = _acts()
    coord = coordination_analysis(acts_lr, GROUP, _rgroups())
    spat_clustered = spatial_analysis(_acts(clusters=True), GROUP, _rgroups(), seed=0)
    spat_iid = spatial_analysis(_acts(low_rank_group=False), GROUP, _rgroups(seed=9), seed=0)
    spec = spectra_analysis(_weights(), GROUP, _rgroups())
    claims = evaluate_claims(coord, spat_clustered, None, spec)
    assert claims.verdict("coordination") == "supported"
    assert claims.verdict("spatial") == "not supported"  # significantly more modular
    assert claims.verdict("spectra") == "supported"
    # iid group among iid neurons (fixed data): Q is not significantly higher, the null stands
    assert spat_iid.q_comparison.p_value >= 0.05
    assert evaluate_claims(coord, spat_iid, None, spec).verdict("spatial") == "supported"
    md = claims.to_markdown()
    assert md.count("\n| ") == 5 and "supported" in md  # header + 4 claims
    # too few random groups for p < 0.05: inconclusive whatever the data
    few = coordination_analysis(acts_lr, GROUP, _rgroups(n=5))
    assert evaluate_claims(few, spat_clustered, None, spec).verdict("coordination") == (
        "inconclusive"
    )


def test_analyses_are_deterministic_given_the_seed() -> None:
    acts = _acts(clusters=True)
    a = spatial_analysis(acts, GROUP, _rgroups(), seed=7).to_table()
    b = spatial_analysis(acts, GROUP, _rgroups(), seed=7).to_table()
    assert a == b
    c1 = coordination_analysis(acts, GROUP, _rgroups(seed=2)).to_table()
    c2 = coordination_analysis(acts, GROUP, _rgroups(seed=2)).to_table()
    assert c1 == c2


def test_bad_input_gives_one_line_errors() -> None:
    acts = _acts()
    with pytest.raises(InsufficientDataError, match=">= 2 neurons"):
        coordination_analysis(acts, np.array([3]), np.array([[4], [5]]))
    with pytest.raises(InsufficientDataError, match="at least as many positions"):
        coordination_analysis(acts[:5], GROUP, _rgroups())
    const = acts.copy()
    const[:, GROUP] = 1.0
    for fn in (coordination_analysis, spatial_analysis):
        kw: dict[str, Any] = {"seed": 0} if fn is spatial_analysis else {}
        with pytest.raises(NumericalError) as err:
            fn(const, GROUP, _rgroups(), **kw)
        assert "\n" not in str(err.value) and "plateau" in str(err.value)
    with pytest.raises(ConfigError):
        coordination_analysis(acts, np.array([1, 1, 2]), _rgroups())
    with pytest.raises(ConfigError):
        coordination_analysis(acts, GROUP, _rgroups()[:, :3])


def test_dead_random_neurons_are_skipped_and_counted() -> None:
    acts = _acts()
    dead = np.setdiff1d(np.arange(N_NEURONS), GROUP)[:12]
    acts[:, dead] = 0.0
    groups = np.vstack([dead[None, :], _rgroups(n=10)])
    res = coordination_analysis(acts, GROUP, groups)
    assert res.n_skipped == 1 and res.comparison.n_draws == 10
    assert np.array_equal(res.random_groups, groups[1:])


def test_results_round_trip_through_json_and_plot() -> None:
    acts = _acts(clusters=True)
    results: list[Any] = [
        coordination_analysis(acts, GROUP, _rgroups()),
        spatial_analysis(acts, GROUP, _rgroups(), seed=0),
        spectra_analysis(_weights(), GROUP, _rgroups()),
    ]
    for res in results:
        back = type(res).from_dict(json.loads(json.dumps(res.to_dict())))
        assert back.to_table() == res.to_table()
        assert back.to_markdown() == res.to_markdown()
        _fig, axes = new_figure(1)
        res.plot(axes[0])
        assert axes[0].has_data()
    claims = evaluate_claims(results[0], results[1], None, results[2])
    assert type(claims).from_dict(json.loads(json.dumps(claims.to_dict()))) == claims


def test_csv_has_one_line_per_row(tmp_path: Path) -> None:
    res = spatial_analysis(_acts(clusters=True), GROUP, _rgroups(), seed=0)
    res.to_csv(tmp_path / "t.csv")
    lines = (tmp_path / "t.csv").read_text().splitlines()
    assert len(lines) == 3 and lines[0].startswith("group,n_neurons,modularity_q")


def test_topk_neurons_breaks_ties_by_id() -> None:
    d = np.array([0.5, 2.0, 2.0, 1.0, 2.0])
    assert topk_neurons(d, 2).tolist() == [1, 2]
    assert topk_neurons(d, 4).tolist() == [1, 2, 3, 4]


# ---------------------------------------------------------------------------------------------
# Model wiring on tiny models
# ---------------------------------------------------------------------------------------------


def _capture(model: Any, ids: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Full forward: residual input of block L-2 and final-layer activations."""
    adapter = adapter_for(model)
    start = adapter.dims.n_layers - 2
    with (
        capture_input(adapter.blocks()[start]) as blk,
        capture_input(adapter.mlp_out_proj(-1)) as act,
        torch.no_grad(),
    ):
        model(input_ids=ids)
    return blk[-1].numpy(), act[-1].numpy()


def _zero_head_output(adapter: Any, layer: int, head: int) -> None:
    proj = adapter.attn_out_proj(layer)
    hd = adapter.dims.head_dim
    sl = slice(head * hd, (head + 1) * hd)
    with torch.no_grad():
        if type(proj).__name__ == "Conv1D":  # GPT-2 stores (in, out)
            proj.weight[sl, :] = 0.0
        else:
            proj.weight[:, sl] = 0.0


@pytest.fixture
def ids() -> torch.Tensor:
    rng = np.random.default_rng(7)
    return torch.from_numpy(rng.integers(3, 300, size=(3, 20))).long()


def test_head_ablation_wiring(family: str, ids: torch.Tensor) -> None:
    model = tiny_model(family)
    adapter = adapter_for(model)
    last = adapter.dims.n_layers - 1
    _zero_head_output(adapter, last, 2)  # head 2 of the final block outputs nothing
    for h in (1, 2, 3):  # block L-2: only head 0 contributes
        _zero_head_output(adapter, last - 1, h)
    block_input, acts = _capture(model, ids)
    mask = np.ones((ids.shape[0], ids.shape[1] - 1), dtype=bool)
    mask[0, :4] = False
    group = np.array([1, 5, 9, 33, 60])
    ref = acts[:, :-1][mask][:, group]
    res = head_ablation(adapter, block_input, mask, group, reference_acts=ref)
    assert res.baseline_max_abs_diff is not None and res.baseline_max_abs_diff < 1e-10
    n_h = adapter.dims.n_heads
    assert res.ablations.shape == (2 * n_h + 2, 2)
    assert res.base_sq.size == mask.sum()
    imp = dict(zip(map(tuple, res.ablations.tolist()), res.impacts(), strict=True))
    assert imp[(last, 2)] < 1e-12  # a head whose output is zero changes nothing
    for h in (1, 2, 3):
        assert imp[(last - 1, h)] < 1e-12
    # zeroing all heads of L-2 = zeroing its only contributing head
    assert imp[(last - 1, ALL_HEADS)] == pytest.approx(imp[(last - 1, 0)], rel=1e-9)
    assert imp[(last - 1, 0)] > 1e-3
    if family == "neox":
        # parallel attention: the final block's attention does not feed its own MLP
        assert imp[(last, ALL_HEADS)] == 0.0
    else:
        assert imp[(last, ALL_HEADS)] > 1e-3
    # eq. 8 against an independent full forward with the head zeroed
    with ablate_heads(adapter, last, [0]), capture_input(adapter.mlp_out_proj(-1)) as got:
        with torch.no_grad():
            model(input_ids=ids)
    abl = got[-1].numpy()[:, :-1][mask][:, group]
    assert imp[(last, 0)] == pytest.approx(ablation_impact(ref, abl), rel=1e-8)
    # per-window impacts agree with the overall impact on a one-window subset
    w1 = np.flatnonzero(res.window == 1)
    assert res.window_impacts(np.array([1]))[:, 0] == pytest.approx(res.impacts(w1))


def test_attention_gini_matches_an_independent_computation(family: str, ids: torch.Tensor) -> None:
    model = tiny_model(family)
    adapter = adapter_for(model)
    block_input, _ = _capture(model, ids)
    mask = np.ones((ids.shape[0], ids.shape[1] - 1), dtype=bool)
    mask[1, 5] = False
    res = attention_gini(adapter, block_input, mask, batch_size=2)
    n_l, n_h = adapter.dims.n_layers, adapter.dims.n_heads
    assert res.heads.tolist() == [[layer, h] for layer in (n_l - 2, n_l - 1) for h in range(n_h)]
    assert res.gini.shape == (2 * n_h, mask.sum())
    model.set_attn_implementation("eager")
    with torch.no_grad():
        att = model(input_ids=ids, output_attentions=True).attentions
    win, pos = np.nonzero(mask)
    for row in (0, 7, 30, len(win) - 1):
        w, q = int(win[row]), int(pos[row])
        for j, (layer, h) in enumerate(res.heads.tolist()):
            a = att[layer][w, h, q, : q + 1].numpy()
            if a.size < 2:
                assert np.isnan(res.gini[j, row])
                continue
            mad = np.abs(a[:, None] - a[None, :]).sum() / (2 * a.size**2 * a.mean())
            # NeoX / Llama eager attention computes the softmax in float32
            assert res.gini[j, row] == pytest.approx(mad, abs=1e-6)


def test_routing_analysis_on_a_tiny_model(ids: torch.Tensor) -> None:
    model = tiny_model("llama")
    adapter = adapter_for(model)
    block_input, _ = _capture(model, ids)
    mask = np.ones((ids.shape[0], ids.shape[1] - 1), dtype=bool)
    gv = attention_gini(adapter, block_input, mask)
    abl = head_ablation(adapter, block_input, mask, np.arange(8))
    n = int(mask.sum())
    rare, common = np.arange(0, n, 3), np.setdiff1d(np.arange(n), np.arange(0, n, 3))
    res = routing_analysis(gv, abl, rare, common, seed=0, n_permutations=500)
    again = routing_analysis(gv, abl, rare, common, seed=0, n_permutations=500)
    assert res.to_table() == again.to_table()
    assert res.cross_fitted and res.selection_windows.tolist() == [0, 2]
    assert res.evaluation_windows.tolist() == [1]
    assert res.top_heads.size == 3 and not np.isin(res.top_heads, res.random_heads).any()
    # the chosen heads are those of largest impact on the selection windows
    sel = abl.impacts(np.flatnonzero(np.isin(abl.window, [0, 2])))[abl.single]
    assert set(res.top_heads.tolist()) == set(np.argsort(-sel, kind="stable")[:3].tolist())
    # query position 0 of each window has one visible key: no Gini (row 0 is rare; the first
    # rows of windows 1 and 2, rows 19 and 38, are common)
    assert res.gini.n_heads == 8
    assert res.gini.n_rare.tolist() == [rare.size - 1] * 8
    assert res.gini.n_common.tolist() == [common.size - 2] * 8
    assert res.pair_layer.size == 2 * 3  # 2 layers x 3 windows
    with pytest.raises(InsufficientDataError, match=">= 2 rare-target positions"):
        routing_analysis(gv, abl, rare[:1], common, seed=0)
    with pytest.raises(ConfigError, match="n_top"):
        routing_analysis(gv, abl, rare, common, seed=0, n_top=1)
    back = RoutingResult.from_dict(json.loads(json.dumps(res.to_dict())))
    assert back.to_table() == res.to_table() and back.head_table() == res.head_table()
    _fig, axes = new_figure(2)
    res.plot(axes[0])
    res.plot_impacts(axes[1])
    assert all(isinstance(a, Axes) and a.has_data() for a in axes)


# ---------------------------------------------------------------------------------------------
# The suite end to end on a tiny identification
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ident(tmp_path_factory: pytest.TempPathFactory) -> Identification:
    root = tmp_path_factory.mktemp("analyses")
    model_dir, corpus = tiny_setup(root)
    cfg = make_config(overrides=tiny_overrides(model_dir, corpus))
    return identify(cfg, root / "run", cache_dir=root / "cache", progress=False)


def test_groups_of_an_identification(ident: Identification) -> None:
    g = plateau_group(ident)
    plateau = np.sort(ident.rare_fit.plateau_neurons)
    if plateau.size >= 2:
        assert not g.fallback and np.array_equal(g.neuron_ids, plateau)
    else:
        assert g.fallback and "fell back" in g.note
        assert np.array_equal(g.neuron_ids, topk_group(ident).neuron_ids)
    top = topk_group(ident, 5)
    order = np.argsort(-ident.neurons.delta_rare, kind="stable")[:5]
    assert set(top.neuron_ids.tolist()) == set(order.tolist())
    # re-splitting at the run's own percentile reproduces the run's positions and plateau
    rare, common, _ = split_positions(ident, ident.config.percentile)
    assert np.array_equal(rare, ident.rare_positions)
    assert np.array_equal(common, ident.common_positions)
    again = group_for_split(ident, rare, "plateau")
    assert np.array_equal(again.neuron_ids, g.neuron_ids)
    refit = fit_regimes(np.abs(ident.delta[rare]).mean(0), ident.neurons.neuron_ids)
    assert np.array_equal(np.sort(refit.plateau_neurons), plateau)


def test_run_analyses_end_to_end(ident: Identification, tmp_path: Path) -> None:
    suite = run_analyses(ident, n_random=20, seed=3, progress=False)
    again = run_analyses(ident, n_random=20, seed=3, progress=False)
    assert suite.claims.to_table() == again.claims.to_table()
    for name in ("coordination", "spatial", "spectra", "routing"):
        assert getattr(suite, name).to_table() == getattr(again, name).to_table(), name
    other = run_analyses(ident, n_random=20, seed=4, progress=False, routing=False)
    assert not np.array_equal(other.main.random_groups, suite.main.random_groups)
    assert other.routing is None and other.claims.verdict("routing") == "inconclusive"
    # the frequency check's "all" positions are the uniform sample of positions
    assert suite.frequency is not None and suite.group_ablation is not None
    assert suite.frequency.settings["all_positions"] == "a uniform sample of positions"
    # a check that could not run is a row saying why, not a missing row
    from raretoken.analyses.claims import evaluate_claims

    partial = evaluate_claims(suite.main.coordination, suite.main.spatial, None,  # type: ignore[arg-type]
                              suite.main.spectra, not_assessed={"group_ablation": "no rows"})  # type: ignore[arg-type]  # fmt: skip
    row = next(c for c in partial.claims if c.key == "group_ablation")
    assert row.finding == "not assessed: no rows" and row.verdict == "inconclusive"
    assert row.p_bh is None and "joint ablation" in row.claim
    assert [c.key for c in suite.claims.claims] == [
        "specificity",
        "replication",
        "frequency_neurons",
        "group_ablation",
        "coordination",
        "spatial",
        "routing",
        "spectra",
    ]
    assert isinstance(suite.coordination, CoordinationResult)
    assert isinstance(suite.spatial, SpatialResult)
    assert isinstance(suite.spectra, SpectraResult)
    # the tail re-run of the routing analysis reproduces the captured activations
    assert suite.routing is not None and suite.routing.baseline_max_abs_diff is not None
    assert suite.routing.baseline_max_abs_diff < 1e-4

    written = write_analyses(suite, tmp_path)
    for rel in ("analyses/claims.md", "analyses/coordination.csv", "analyses/spatial.md",
                "analyses/routing.md", "analyses/routing_heads.csv", "analyses/spectra.csv",
                "analyses/report.md", "analyses/analyses.json", "figures/routing.png",
                "figures/spectra.svg", "figures/coordination.png", "figures/spatial.png"):  # fmt: skip
        assert rel in written and (tmp_path / rel).stat().st_size > 0, rel
    assert set(written) == {
        str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()
    }
    back = AnalysisSuite.from_dict(json.loads((tmp_path / "analyses/analyses.json").read_text()))
    assert back.to_markdown() == suite.to_markdown()
    assert (tmp_path / "analyses/claims.md").read_text() == suite.claims.to_markdown()


def test_analyses_for_split_and_robustness(ident: Identification) -> None:
    group = topk_group(ident, 6)
    res = analyses_for_split(
        ident, ident.rare_positions, ident.common_positions, group, n_random=10, seed=0,
        coordination_positions="rare" if ident.rare_positions.size >= 6 else "all",
    )  # fmt: skip
    assert res.routing is None and res.coordination is not None
    assert res.coordination.observed.group_size == 6
    table = robustness_table(
        ident, n_random=10, seed=0, percentiles=(10, 30), routing=False, progress=False
    )
    rows = table.to_table()
    assert len(rows) + len(table.skipped) == 6  # 2 percentiles x plateau, topk, selective
    assert {r["definition"] for r in rows} <= {"plateau", "topk", "selective"}
    again = robustness_table(
        ident, n_random=10, seed=0, percentiles=(10, 30), routing=False, progress=False
    )
    assert again.to_table() == rows
    for r in rows:
        rare, _, _ = split_positions(ident, r["percentile"])
        assert r["n_rare_positions"] == rare.size
    # every row carries the claims' verdicts, and the frequency table counts them
    from raretoken.analyses.claims import verdicts_of

    for res_row, r in zip(table.results, rows, strict=True):
        expected = verdicts_of(res_row.coordination, res_row.spatial, None, res_row.spectra)
        assert r["verdict_coordination"] == expected["coordination"]
        assert r["verdict_spectra"] == expected["spectra"] and r["verdict_routing"] is None
    freq = {f["claim"]: f for f in table.verdict_frequency()}
    for claim in ("coordination", "spatial", "spectra"):
        counted = [r[f"verdict_{claim}"] for r in rows]
        f = freq[claim]
        assert f["rows"] == len(rows)
        assert f["supported"] == counted.count("supported")
        assert f["not supported"] == counted.count("not supported")
        assert f["not run"] == counted.count(None)
    assert freq["routing"]["not run"] == len(rows)
    assert "How often each verdict holds" in table.to_markdown()


# ------------------------------------------------------------------ reviewer checks


def test_specificity_on_an_identification(ident: Identification, tmp_path: Path) -> None:
    from raretoken.analyses.specificity import SpecificityResult, analyze_specificity
    from raretoken.stats.specificity import selectivity

    group = plateau_group(ident)
    spec = analyze_specificity(ident, group, n_random=30, seed=1)
    n = ident.neurons
    sel = selectivity(n.delta_rare, n.delta_common)
    # the selective group: as many neurons as the group, the largest residuals
    assert spec.selective_ids.size == group.size
    worst_kept = sel.residual[spec.selective_ids].min()
    others = np.setdiff1d(n.neuron_ids, spec.selective_ids)
    assert worst_kept >= sel.residual[others].max()
    # the group's mean residual is compared with random groups of its size
    assert spec.residual_vs_random.observed == pytest.approx(sel.residual[group.neuron_ids].mean())
    assert spec.residual_vs_random.n_draws == 30
    # overlap with the top common-Δloss neurons, counted directly
    top_common = np.argsort(-n.delta_common, kind="stable")[: group.size]
    assert spec.overlap["overlap"] == np.intersect1d(top_common, group.neuron_ids).size
    # replication uses the windows of the rare positions
    assert spec.replication is not None
    assert spec.replication["n_rows_a"] + spec.replication["n_rows_b"] == ident.rare_positions.size
    again = SpecificityResult.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again.to_table() == spec.to_table()
    assert "rare-specific" in spec.to_markdown()
    spec.plot()


def _spec(overlap_fraction: float, observed: float, p: float, replicates: bool | None,
          has_plateau: bool = True) -> object:  # fmt: skip
    from raretoken.analyses.specificity import SpecificityResult
    from raretoken.stats.baselines import BaselineComparison

    z = np.zeros(3)
    rep = None if replicates is None else {"replicates": replicates, "p_value": 0.01}
    return SpecificityResult(
        group_name="plateau", group_ids=np.array([0]), selective_ids=np.array([0]),
        log_rare=z, log_common=z, residual=z, slope=1.0, intercept=0.0, r_squared=0.5,
        spearman_rho=0.6,
        residual_vs_random=BaselineComparison(observed, 0.0, 0.1, 100, p, "greater", 1.0, 0.9),
        overlap={"overlap": int(10 * overlap_fraction), "group_size": 10, "k": 10,
                 "expected": 0.1, "p_value": 1e-3, "fraction": overlap_fraction},
        replication=rep, replication_note="note", full_sample_has_plateau=has_plateau,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("overlap", "observed", "p", "verdict"),
    [
        (0.2, 0.5, 0.01, "supported"),
        (0.8, 0.5, 0.01, "not supported"),  # most of the group matters for every token
        (0.2, -0.1, 0.9, "not supported"),  # not more rare-selective than random
        (0.2, 0.1, 0.2, "inconclusive"),
    ],
)
def test_specificity_verdicts(overlap: float, observed: float, p: float, verdict: str) -> None:
    from raretoken.analyses.claims import _specificity

    assert _specificity(_spec(overlap, observed, p, True), 0.05).verdict == verdict  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("replicates", "has_plateau", "verdict"),
    [
        (True, True, "supported"),
        (False, True, "not supported"),
        (None, True, "inconclusive"),
        (False, False, "inconclusive"),
    ],
)
def test_replication_verdicts(replicates: bool | None, has_plateau: bool, verdict: str) -> None:
    from raretoken.analyses.claims import _replication

    res = _spec(0.1, 0.5, 0.01, replicates, has_plateau)
    assert _replication(res).verdict == verdict  # type: ignore[arg-type]


def test_selective_group_for_a_split(ident: Identification) -> None:
    from raretoken.stats.specificity import selective_group, selectivity

    rare, common = ident.rare_positions, ident.common_positions
    g = group_for_split(ident, rare, "selective", common_positions=common)
    base = group_for_split(ident, rare, "plateau")
    assert g.definition == "selective" and g.size == base.size
    d_rare = np.abs(ident.delta[rare].astype(np.float64)).mean(0)
    d_common = np.abs(ident.delta[common].astype(np.float64)).mean(0)
    expected = np.sort(selective_group(selectivity(d_rare, d_common), base.size))
    assert np.array_equal(g.neuron_ids, expected)
    with pytest.raises(ConfigError, match="common positions"):
        group_for_split(ident, rare, "selective")
    with pytest.raises(ConfigError, match="unknown group definition"):
        group_for_split(ident, rare, "modular")


def test_suite_judges_the_claims_against_matched_controls(ident: Identification) -> None:
    from raretoken.analyses import AnalysisSuite

    suite = run_analyses(ident, n_random=20, seed=3, progress=False, routing=False)
    assert suite.matched is not None and suite.matched.n_groups == 20
    verdicts = {c.key: c.verdict_matched for c in suite.claims.claims}
    for key in ("coordination", "spatial", "spectra"):
        assert verdicts[key] in ("supported", "not supported", "inconclusive"), key
        assert "matched controls" in next(c.finding for c in suite.claims.claims if c.key == key)
    assert verdicts["routing"] is None and verdicts["specificity"] is None
    assert "verdict_matched" in suite.claims.to_markdown()
    again = AnalysisSuite.from_dict(json.loads(json.dumps(suite.to_dict())))
    assert again.claims.to_table() == suite.claims.to_table()
    assert again.matched is not None and again.matched.to_table() == suite.matched.to_table()


def test_routing_on_a_seeded_subset_of_windows(ident: Identification) -> None:
    """With more windows than ``max_windows`` the head ablations use a seeded choice of them
    (the Gini all windows); their rows map onto the identification's, and per-position
    results equal those of the full context at the same rows (windows are independent)."""
    from raretoken.analyses.routing_runs import RoutingContext

    full = RoutingContext.from_identification(ident, max_windows=None)
    sub = RoutingContext.from_identification(ident, max_windows=3)
    n_windows = ident.sample.target_mask.shape[0]
    assert n_windows > 3 and sub.rows is not None and full.rows is None
    assert sub.ablation_windows is not None and sub.ablation_windows.size == 3
    rows = sub.rows
    assert np.array_equal(np.unique(ident.position_windows[rows]), sub.ablation_windows)
    assert np.array_equal(sub.rows_of(rows), np.arange(rows.size))
    outside = np.setdiff1d(np.arange(ident.acts.shape[0]), rows)
    assert sub.rows_of(outside).size == 0
    np.testing.assert_allclose(sub.gini().gini, full.gini().gini, atol=1e-6)
    group = topk_group(ident, 6).neuron_ids
    np.testing.assert_allclose(sub.ablation(group).base_sq, full.ablation(group).base_sq[rows],
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    again = RoutingContext.from_identification(ident, max_windows=3)
    assert np.array_equal(again.rows, rows)  # seeded
    other = RoutingContext.from_identification(ident, max_windows=3, seed=5)
    assert other.ablation_windows is not None
    with pytest.raises(ConfigError, match="max_windows"):
        RoutingContext.from_identification(ident, max_windows=1)
    res = analyses_for_split(ident, ident.rare_positions, ident.common_positions,
                             topk_group(ident, 6), n_random=5, seed=0, routing=sub)  # fmt: skip
    assert res.routing is not None, res.errors
    # the Gini comparison uses every rare position; the impacts those in the 3 windows
    assert res.routing.n_rare_positions == ident.rare_positions.size
