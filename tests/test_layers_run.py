"""The per-layer stage on a finished tiny run: files, final-layer reuse, exact values, cache,
bad input, the depth figure."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import raretoken.run.stages as stages_mod
from pipeline_fixtures import tiny_overrides, tiny_setup
from raretoken.ablation.layer import screen_quality
from raretoken.ablation.layer_exact import exact_layer_delta
from raretoken.ablation.layer_inputs import layer_mean_acts
from raretoken.errors import ConfigError, RunDirectoryError
from raretoken.models.hooks import replace_input
from raretoken.models.loading import load_model
from raretoken.plotting.depth import SERIES_LABELS, DepthDisplay
from raretoken.run import identify, make_config
from raretoken.run.layers import LayerRegime, identify_layers, parse_layers, run_inputs
from raretoken.run.stages import model_spec
from raretoken.stats.regimes import fit_regimes
from raretoken.storage import ArrayCache

D_MLP, N_LAYERS = 64, 3


def _no_model(*a: object, **k: object) -> None:
    raise AssertionError("the model was loaded")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("layers")
    model_dir, corpus = tiny_setup(root)
    cfg = make_config(overrides=tiny_overrides(model_dir, corpus))
    out, cache = root / "run", root / "cache"
    identify(cfg, out, cache_dir=cache, progress=False)
    res = identify_layers(out, "all", top_k=D_MLP, n_random=0, quality_k=5, cache_dir=cache,
                          progress=False)  # fmt: skip
    return {"root": root, "out": out, "cache": cache, "cfg": cfg, "res": res}


def test_writes_every_file_and_records_the_stage(run: dict[str, Any]) -> None:
    out = run["out"]
    for rel in ("layers/layer_00.json", "layers/layer_01.json", "layers/layer_02.json",
                "layers/layers.csv", "layers/screen_quality.csv", "layers/summary.md",
                "figures/depth.png",
                "figures/depth.svg"):  # fmt: skip
        assert (out / rel).is_file(), rel
    rows = list(csv.DictReader((out / "layers/layers.csv").open()))
    assert [int(r["layer"]) for r in rows] == [0, 1, 2]
    assert [r["values"] for r in rows] == ["exact"] * 3
    assert [r["source"] for r in rows] == ["layer_ablation", "layer_ablation", "run"]
    assert all(int(r["n_neurons"]) == D_MLP for r in rows)
    q = list(csv.DictReader((out / "layers/screen_quality.csv").open()))
    assert [(int(r["layer"]), r["targets"]) for r in q] == [
        (0, "rare"), (0, "common"), (1, "rare"), (1, "common"), (2, "rare"), (2, "common")
    ]  # fmt: skip
    # every neuron ran exactly: the screen's quality is measured on all of them
    assert all(int(r["n_exact"]) == D_MLP for r in q)
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "identified" and "running" not in m
    assert m["stages"]["layers"]["settings"]["top_k"] == D_MLP
    assert m["outputs"]["layers:layers/layers.csv"]["path"] == "layers/layers.csv"
    assert "layers:figures/depth.png" in m["outputs"]
    summary = (out / "layers/summary.md").read_text()
    assert summary.count("| exact") == 3 and "| 2 | 64 |" in summary
    # the per-layer file round-trips
    d = json.loads((out / "layers/layer_01.json").read_text())
    back = LayerRegime.from_dict(d)
    r1 = run["res"].by_layer(1)
    np.testing.assert_array_equal(back.values, r1.values)
    assert back.plateau_size == r1.plateau_size and back.values_kind == "exact"
    assert back.ablation is not None and d["settings"]["quality_k"] == 5


def test_last_layer_is_the_runs_own_result(run: dict[str, Any]) -> None:
    out = run["out"]
    last = run["res"].by_layer(N_LAYERS - 1)
    tab = pq.read_table(out / "neurons.parquet").to_pandas()
    np.testing.assert_array_equal(last.neuron_ids, tab["neuron"].to_numpy())
    np.testing.assert_array_equal(last.values, tab["delta_rare"].to_numpy())
    reg = json.loads((out / "regimes.json").read_text())["rare"]
    assert last.fit is not None
    assert last.fit.plateau_neurons.tolist() == reg["plateau_neurons"]
    assert last.kappa == pytest.approx(reg["kappa"])
    assert last.source == "run"
    # the final layer's screen is compared with the run's exact (closed-form) Δloss
    ab = last.ablation
    assert ab is not None and ab.exact_ids.size == D_MLP and not ab.exact_from_random.any()
    np.testing.assert_array_equal(ab.exact_rare, tab["delta_rare_signed"].to_numpy())
    np.testing.assert_array_equal(ab.exact_common_abs, tab["delta_common"].to_numpy())
    q = screen_quality(ab.screen_rare, ab.exact_ids, ab.exact_rare, ab.exact_from_random, 5)
    assert q.to_dict() == ab.quality_rare.to_dict()
    assert np.isfinite(ab.quality_rare.spearman) and np.isnan(ab.quality_rare.spearman_random)
    assert np.flatnonzero(tab["plateau"].to_numpy()).size == last.plateau_size


def test_layer0_exact_values_equal_an_independent_exact_pass(run: dict[str, Any]) -> None:
    out, cfg = run["out"], run["cfg"]
    inp = run_inputs(out, ArrayCache(run["cache"]))
    # the rebuilt rows are the run's: positions.parquet labels every scored position
    pos = pq.read_table(out / "positions.parquet").to_pandas()
    np.testing.assert_array_equal(inp.rare_positions, np.flatnonzero(pos["class"] == "rare"))
    np.testing.assert_array_equal(inp.common_positions, np.flatnonzero(pos["class"] == "common"))
    ad = load_model(model_spec(cfg)).adapter
    mean = layer_mean_acts(ad, inp.ref.input_ids, inp.ref.target_mask, [0], batch_windows=3)[0]
    delta = exact_layer_delta(ad, inp.sample.input_ids, inp.sample.target_mask, 0,
                              mean.astype(np.float32), np.arange(D_MLP), batch_windows=3,
                              max_rows=16)  # fmt: skip
    want = np.abs(delta[inp.rare_positions]).mean(0)
    got = run["res"].by_layer(0)
    assert got.values_kind == "exact"
    np.testing.assert_allclose(got.values, want, rtol=1e-5, atol=1e-8)
    assert got.fit is not None
    ref_fit = fit_regimes(want)
    assert got.plateau_size == ref_fit.plateau_size
    assert got.kappa == pytest.approx(ref_fit.kappa, rel=1e-4, abs=1e-6)


def test_layer1_matches_a_full_hooked_forward_per_neuron(run: dict[str, Any]) -> None:
    """Brute force: one full forward of the whole model per ablated neuron of layer 1 (which
    has a layer downstream), the neuron's activation set to n̄ at every position."""
    inp = run_inputs(run["out"], ArrayCache(run["cache"]))
    lm = load_model(model_spec(run["cfg"]))
    ad = lm.adapter
    mean = layer_mean_acts(ad, inp.ref.input_ids, inp.ref.target_mask, [1])[1].astype(np.float32)
    ids = torch.as_tensor(inp.sample.input_ids)
    mask = torch.as_tensor(inp.sample.target_mask)
    targets = torch.as_tensor(inp.sample.target_ids)[mask]

    def losses() -> np.ndarray:
        with torch.no_grad():
            logits = lm.model(input_ids=ids).logits[:, :-1][mask].double()
        return torch.nn.functional.cross_entropy(logits, targets, reduction="none").numpy()

    base = losses()
    got = run["res"].by_layer(1)
    for i in (int(np.argmax(got.values)), 7):

        def set_mean(x: torch.Tensor, i: int = i) -> torch.Tensor:
            y = x.clone()
            y[..., i] = float(mean[i])
            return y

        with replace_input(ad.mlp_out_proj(1), set_mean):
            abl = losses()
        want = np.abs(abl - base)[inp.rare_positions].mean()
        assert got.values[i] == pytest.approx(want, rel=1e-4, abs=1e-7)


def test_rerun_reads_the_cache_and_loads_no_model(
    run: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stages_mod, "load_model", _no_model)
    again = identify_layers(run["out"], "all", top_k=D_MLP, n_random=0, quality_k=5,
                            cache_dir=run["cache"], progress=False)  # fmt: skip
    assert again.cached_layers == (0, 1)
    for a, b in zip(again.layers, run["res"].layers, strict=True):
        np.testing.assert_array_equal(a.values, b.values)
        assert a.plateau_size == b.plateau_size


def test_screen_regime_below_d_mlp(run: dict[str, Any]) -> None:
    out = run["root"] / "run_screen"
    shutil.copytree(run["out"], out)
    res = identify_layers(out, "1", top_k=4, n_random=3, quality_k=3, cache_dir=run["cache"],
                          progress=False)  # fmt: skip
    (r,) = res.layers
    assert r.layer == 1 and r.values_kind == "screen" and res.cached_layers == ()
    assert r.ablation is not None
    np.testing.assert_array_equal(r.values, np.abs(r.ablation.screen_rare))
    assert 4 <= r.ablation.exact_ids.size <= 2 * 4 + 3
    assert int(r.ablation.exact_from_random.sum()) == 3
    # screen values are not exact values: the all-exact layer 1 of the first run differs
    assert not np.allclose(r.values, run["res"].by_layer(1).values)
    # files of layers this call did not write are gone from the copy (and its manifest)
    assert not (out / "layers/layer_00.json").exists()
    rows = list(csv.DictReader((out / "layers/layers.csv").open()))
    assert [(r_["layer"], r_["values"]) for r_ in rows] == [("1", "screen")]


@pytest.mark.parametrize(
    ("spec", "match"),
    [("3", "out of range"), ("-4", "out of range"), ("0,x", "comma-separated"),
     ([], "at least one"), ([True], "integers"), ("", "comma-separated")],
)  # fmt: skip
def test_bad_layers_fail_before_model_work(
    run: dict[str, Any], monkeypatch: pytest.MonkeyPatch, spec: Any, match: str
) -> None:
    monkeypatch.setattr(stages_mod, "load_model", _no_model)
    before = (run["out"] / "manifest.json").read_text()
    with pytest.raises(ConfigError, match=match):
        identify_layers(run["out"], spec, cache_dir=run["cache"], progress=False)
    assert (run["out"] / "manifest.json").read_text() == before


def test_windows_that_are_not_the_runs_are_refused(run: dict[str, Any]) -> None:
    out = run["root"] / "run_moved"
    shutil.copytree(run["out"], out)
    m = json.loads((out / "manifest.json").read_text())
    m["stages"]["sampling"]["key"] = "0" * 64
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(RunDirectoryError, match="not the run's"):
        identify_layers(out, "0", cache_dir=run["cache"], progress=False)
    m = json.loads((out / "manifest.json").read_text())
    # the error is recorded; the run's own results are untouched, so its status stays
    assert m["status"] in ("identified", "complete") and m["error"]["stage"] == "layers"
    assert "layers" not in m["stages"]


def test_bad_counts_fail() -> None:
    with pytest.raises(ConfigError, match="top_k"):
        identify_layers("/nonexistent", "all", top_k=-1)
    with pytest.raises(ConfigError, match="no neuron"):
        identify_layers("/nonexistent", "all", top_k=0, n_random=0)


def test_parse_layers_known_answers() -> None:
    assert parse_layers("all", 4) == [0, 1, 2, 3]
    assert parse_layers(" 2, -1 ,0,2", 4) == [0, 2, 3]
    assert parse_layers(-2, 4) == [2]
    assert parse_layers([np.int64(1), 3], 4) == [1, 3]  # type: ignore[list-item]


def _xs(line: Any) -> list[float]:
    return [float(x) for x in np.asarray(line.get_xdata(), dtype=float)]


def test_depth_figure_has_one_point_per_layer(run: dict[str, Any]) -> None:
    with (run["out"] / "layers/layers.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    cols = {k: [r[k] for r in rows] for k in rows[0]}
    disp = DepthDisplay.from_columns(cols).plot()
    for ax in disp.axes_:
        for line in ax.get_lines():
            assert len(_xs(line)) <= len(rows)
    for ax in disp.axes_[:2]:
        xs = sorted(x for line in ax.get_lines() for x in _xs(line))
        assert xs == [0, 1, 2]


def test_depth_table_keeps_exact_and_screen_apart() -> None:
    cols: dict[str, list[Any]] = {"layer": [2, 0, 1], "plateau_size": [3, "", 5], "kappa": [0.5, 0.7, "nan"],
            "values": ["exact", "screen", "screen"], "spearman_rare": ["", 0.9, 0.8],
            "spearman_common": ["", 0.5, 0.4], "recall_rare": ["", 1.0, 0.5],
            "recall_common": ["", 0.0, 1.0]}  # fmt: skip
    disp = DepthDisplay.from_columns(cols).plot()
    lines = {ln.get_label(): ln for ln in disp.axes_[0].get_lines()}
    assert _xs(lines[SERIES_LABELS["exact"]]) == [2]
    assert _xs(lines[SERIES_LABELS["screen"]]) == [0, 1]
    np.testing.assert_array_equal(
        np.asarray(lines[SERIES_LABELS["screen"]].get_ydata(), dtype=float), [np.nan, 5.0]
    )
    assert all(ln.get_linestyle() == "None" for ln in disp.axes_[0].get_lines())
    with pytest.raises(ConfigError, match="values"):
        DepthDisplay.from_columns(dict(cols, values=["exact", "both", "screen"]))
    with pytest.raises(ConfigError, match="twice"):
        DepthDisplay.from_columns(dict(cols, layer=[0, 0, 1]))


def test_cli_run_with_layers(run: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    """``raretoken run --layers``: the same windows and cache as the fixture's run, so the
    per-layer results come from the cache; the summary and report gain the depth section."""
    from raretoken.cli import main

    root = run["root"]
    base = ["run", "--no-progress", "--skip-analyses", "--out", str(root / "cli-run"),
            "--cache-dir", str(run["cache"])]  # fmt: skip
    for k, v in tiny_overrides(root / "model-llama", root / "corpus.jsonl").items():
        base += ["--" + k.replace("_", "-"), str(v)]
    assert main([*base, "--layers", "all", "--layer-top-k", str(D_MLP)]) == 0
    out = root / "cli-run"
    assert (out / "layers" / "layers.csv").is_file() and (out / "figures" / "depth.svg").is_file()
    layers_md = (out / "layers" / "summary.md").read_text()
    assert layers_md.strip() and layers_md in (out / "summary.md").read_text()
    assert (out / "report.html").is_file()
    capsys.readouterr()
    assert main([*base, "--overwrite", "--layers", "7"]) == 2
    assert "layer" in capsys.readouterr().err.lower()


def test_the_runs_own_stages_lend_their_loaded_model(
    run: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``identify_layers(..., stages=ident.stages)`` (the CLI after a run) does not load the
    model a second time; stages of another configuration are not used."""
    from raretoken.run.stages import Stages

    out = run["root"] / "run_lend"
    shutil.copytree(run["out"], out)
    st = Stages(run["cfg"], ArrayCache(run["cache"]), progress=False)
    assert st.loaded is not None  # loaded once, here
    monkeypatch.setattr(stages_mod, "load_model", _no_model)
    # settings never run before: the exact pass needs the model
    res = identify_layers(out, "1", top_k=3, n_random=1, quality_k=2, analyses=False,
                          cache_dir=run["cache"], progress=False, stages=st)  # fmt: skip
    assert res.by_layer(1).values_kind == "screen"
    other = Stages(dataclasses.replace(run["cfg"], seed=run["cfg"].seed + 1),
                   ArrayCache(run["cache"]), progress=False)  # fmt: skip
    with pytest.raises(AssertionError, match="the model was loaded"):
        identify_layers(out, "1", top_k=4, n_random=1, quality_k=2, analyses=False,
                        cache_dir=run["cache"], progress=False, stages=other)  # fmt: skip


def test_depth_axis_labels_are_thinned_for_deep_models() -> None:
    from raretoken.plotting.depth import _thinned

    assert _thinned(np.arange(4)).tolist() == [0, 1, 2, 3]
    assert _thinned(np.arange(30)).tolist() == [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24,
                                                26, 28, 29]  # fmt: skip
    assert _thinned(np.arange(48)).tolist() == [0, 5, 10, 15, 20, 25, 30, 35, 40, 45, 47]
    assert _thinned(np.array([0, 5, 31])).tolist() == [0, 5, 31]
