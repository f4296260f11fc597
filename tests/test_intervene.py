"""Interventions on a run's neuron group (raretoken.intervene) on a tiny float64 run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pipeline_fixtures import tiny_overrides, tiny_setup
from raretoken.ablation.group import delta_loss_group, row_inputs
from raretoken.errors import ConfigError, RunDirectoryError
from raretoken.intervene import (
    InterventionResult,
    frequent_null_projector,
    intervene,
    null_space_projector,
    parse_factors,
    parse_neurons,
    read_run,
    scale_group,
    scale_group_null,
    scored_metrics,
)
from raretoken.intervene import core as core_mod
from raretoken.intervene.generate import PROMPTS, greedy
from raretoken.intervene.loading import load_windows
from raretoken.run import identify, make_config
from raretoken.run.analysis_stage import AnalysisOptions, analyze
from raretoken.run.identification import Identification


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Identification]:
    root = tmp_path_factory.mktemp("intervene")
    model_dir, corpus = tiny_setup(root)
    cfg = make_config(overrides=dict(tiny_overrides(model_dir, corpus), dtype="float64"))
    ident = identify(cfg, root / "run", cache_dir=root / "cache", progress=False)
    analyze(ident, AnalysisOptions(routing=False), cache_dir=root / "cache", progress=False)
    return root / "run", root / "cache", ident


@pytest.fixture(scope="module")
def loaded(run: tuple[Path, Path, Identification]) -> tuple[Any, Any, Any]:
    run_dir, cache, _ = run
    files = read_run(run_dir)
    win = load_windows(files, cache_dir=cache, progress=False)
    return files, win, win.stages.loaded.adapter


def _metrics(files: Any, win: Any, adapter: Any) -> tuple[np.ndarray, np.ndarray]:
    return scored_metrics(adapter, win.sample, files.rare_token_ids, batch_size=4)


def test_run_group_is_the_analyses_group(run: tuple[Path, Path, Identification]) -> None:
    run_dir, _, _ = run
    group = json.loads((run_dir / "analyses/analyses.json").read_text())["main"]["group"]
    assert read_run(run_dir).group_ids.tolist() == sorted(group["neuron_ids"])


def test_unhooked_pass_reproduces_the_runs_base_loss(
    run: tuple[Path, Path, Identification], loaded: tuple[Any, Any, Any]
) -> None:
    files, win, adapter = loaded
    loss, mass = _metrics(files, win, adapter)
    np.testing.assert_allclose(loss, np.asarray(run[2].base_loss), rtol=0, atol=1e-5)
    assert np.all((mass > 0) & (mass < 1))


def test_factor_one_is_exactly_the_unhooked_model(loaded: tuple[Any, Any, Any]) -> None:
    files, win, adapter = loaded
    base = _metrics(files, win, adapter)
    with scale_group(adapter, files.group_ids, 1.0):
        one = _metrics(files, win, adapter)
    assert np.array_equal(base[0], one[0]) and np.array_equal(base[1], one[1])


def test_factor_zero_on_one_neuron_is_zero_ablation_by_a_manual_hook(
    loaded: tuple[Any, Any, Any],
) -> None:
    files, win, adapter = loaded
    neuron = int(files.group_ids[0])
    with scale_group(adapter, np.array([neuron]), 0.0):
        loss, _ = _metrics(files, win, adapter)

    # independent: a hand-written pre-hook and the full model's logits
    def zero(_m: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0].clone()
        x[..., neuron] = 0
        return (x, *args[1:])

    h = adapter.mlp_out_proj(-1).register_forward_pre_hook(zero)
    try:
        with torch.no_grad():
            ids = torch.from_numpy(win.sample.input_ids)
            logits = adapter.model(input_ids=ids).logits[:, :-1].double()
    finally:
        h.remove()
    m = torch.from_numpy(np.asarray(win.sample.target_mask))
    want = torch.nn.functional.cross_entropy(logits[m], ids[:, 1:][m], reduction="none")
    np.testing.assert_allclose(loss, want.numpy(), rtol=0, atol=1e-9)
    # and it changes something (the test can fail)
    assert not np.allclose(loss, _metrics(files, win, adapter)[0])


def test_mean_ablation_equals_the_closed_form_group_ablation(
    run: tuple[Path, Path, Identification], loaded: tuple[Any, Any, Any]
) -> None:
    ident = run[2]
    files, win, adapter = loaded
    group = files.group_ids
    base, _ = _metrics(files, win, adapter)
    with scale_group(adapter, group, values=win.mean_acts[group]):
        loss, _ = _metrics(files, win, adapter)
    np.testing.assert_array_equal(win.mean_acts, ident.mean_acts)
    src = row_inputs(adapter, ident.resid, ident.acts, np.asarray(ident.sample.target_ids)[
        ident.sample.target_mask], ident.mean_acts, dtype=torch.float64)  # fmt: skip
    closed = delta_loss_group(src(np.arange(loss.size)), [group])[:, 0].numpy()
    np.testing.assert_allclose(loss - base, closed, rtol=0, atol=1e-5)
    assert np.abs(closed).max() > 1e-3


@pytest.mark.parametrize("factor", [0.0, 2.0])
def test_null_space_extremes(loaded: tuple[Any, Any, Any], factor: float) -> None:
    files, win, adapter = loaded
    group = files.group_ids
    base, _ = _metrics(files, win, adapter)
    with scale_group(adapter, group, factor):
        plain, _ = _metrics(files, win, adapter)
    with scale_group_null(adapter, group, factor, null_space_projector(adapter, 1.0)):
        everything, _ = _metrics(files, win, adapter)
    with scale_group_null(adapter, group, factor, null_space_projector(adapter, 0.0)):
        nothing, _ = _metrics(files, win, adapter)
    np.testing.assert_allclose(everything, plain, rtol=0, atol=1e-9)
    np.testing.assert_array_equal(nothing, base)
    assert not np.allclose(plain, base)


def test_null_space_projector_is_the_bottom_singular_space(loaded: tuple[Any, Any, Any]) -> None:
    adapter = loaded[2]
    p = null_space_projector(adapter, 0.25)
    d = p.shape[0]
    k = round(0.25 * d)
    np.testing.assert_allclose(p @ p, p, atol=1e-10)
    assert abs(float(torch.trace(p)) - k) < 1e-8
    w = adapter.unembedding()[0].double() * adapter.final_norm().weight.double()[None]
    s = torch.linalg.svdvals(w)
    # the gain of W on the null space is its smallest singular values
    gain = torch.linalg.matrix_norm(w @ p, ord=2)
    assert abs(float(gain) - float(s[d - k])) < 1e-8


def test_frequent_null_space_is_the_authors_definition(loaded: tuple[Any, Any, Any]) -> None:
    files, _, adapter = loaded
    counts = files.token_counts
    p = frequent_null_projector(adapter, counts, 0.1, 0.9)
    np.testing.assert_allclose(p @ p, p, atol=1e-10)
    # brute force: the frequent tokens' rows, their spectrum, the fewest components >= 90 %
    w = adapter.unembedding()[0].double().numpy()
    top = np.argsort(-counts, kind="stable")[: int(w.shape[0] * 0.1)]
    s = np.linalg.svd(w[top], compute_uv=False)
    k = int(np.flatnonzero(np.cumsum(s**2) / np.sum(s**2) >= 0.9)[0]) + 1
    assert abs(float(torch.trace(p)) - (w.shape[1] - k)) < 1e-8
    kept = np.linalg.norm(w[top] @ p.numpy()) ** 2 / np.linalg.norm(w[top]) ** 2
    assert kept <= 0.1 + 1e-12


def test_intervene_matched_random_groups_and_frequent_null_space(
    run: tuple[Path, Path, Identification],
) -> None:
    run_dir, cache, _ = run
    res = intervene(run_dir, factors=(0.5,), mean_ablate=False, null_space="frequent",
                    random="matched", n_random=2, cache_dir=cache, progress=False,
                    write=False, generation_factors=(), n_boot=50)  # fmt: skip
    assert [(r.kind, r.factor) for r in res.rows] == [("scale", 0.5), ("null", 0.5)]
    assert res.random == "matched" and len(res.random_groups) == 2
    assert all(len(g) == len(res.group_ids) for g in res.random_groups)
    assert all(not set(g) & set(res.group_ids) for g in res.random_groups)


def test_intervene_end_to_end(run: tuple[Path, Path, Identification]) -> None:
    run_dir, cache, _ = run
    res = intervene(run_dir, factors=(0.0, 1.0, 2.0), n_random=3, seed=1, cache_dir=cache,
                    progress=False, n_boot=200, n_tokens=6)  # fmt: skip
    kinds = [(r.kind, r.factor) for r in res.rows]
    assert kinds == [("scale", 0.0), ("scale", 1.0), ("scale", 2.0), ("mean", 0.0),
                     ("null", 0.0), ("null", 1.0), ("null", 2.0)]  # fmt: skip
    for r in res.rows:
        for name in ("rare_loss", "common_loss", "d_rare", "d_common", "rare_mass"):
            lo, hi = getattr(r, name + "_ci")
            assert lo <= getattr(r, name) <= hi
        assert 1 / 4 <= r.p_rare <= 1
    one = res.rows[1]
    assert one.d_rare == one.d_common == one.d_rare_mass == one.random_d_rare == 0.0
    assert one.rare_loss == pytest.approx(res.base_rare_loss, abs=1e-12)
    assert len(res.random_groups) == 3
    assert all(not set(g) & set(res.group_ids) for g in res.random_groups)
    out = run_dir / "interventions"
    for ext in ("csv", "md", "json", "png", "svg"):
        assert (out / f"interventions.{ext}").stat().st_size > 0
    back = InterventionResult.from_dict(json.loads((out / "interventions.json").read_text()))
    assert back == res
    assert len((out / "interventions.csv").read_text().splitlines()) == 1 + len(res.rows)
    # generations: every fixed prompt unhooked and at factors 0 and 2
    assert [g.condition for g in res.generations[:3]] == ["unhooked", "scale ×0", "scale ×2"]
    assert len(res.generations) == 3 * len(PROMPTS)
    assert all(g.text for g in res.generations)
    assert "## Greedy generations" in (out / "interventions.md").read_text()


def test_greedy_generation_matches_transformers_generate(loaded: tuple[Any, Any, Any]) -> None:
    files, win, adapter = loaded
    tok = win.stages.loaded.tokenizer
    prompt = PROMPTS[0]
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = adapter.model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                      pad_token_id=0)  # fmt: skip
    assert greedy(adapter, tok, prompt, 12) == tok.decode(want[0, ids.shape[1] :].tolist())
    with scale_group(adapter, files.group_ids, 1.0):
        assert greedy(adapter, tok, prompt, 12) == greedy(adapter, tok, prompt, 12)


# ------------------------------------------------------------------ bad input


@pytest.fixture
def no_model_work(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*_a: Any, **_k: Any) -> None:
        raise AssertionError("model work started before the input was checked")

    monkeypatch.setattr(core_mod, "load_windows", fail)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"neurons": [0, 10_000]}, "outside the final MLP layer"),
        ({"neurons": [-1]}, "outside the final MLP layer"),
        ({"factors": (0.5, float("nan"))}, "finite"),
        ({"factors": (float("inf"),)}, "finite"),
        ({"factors": (-1.0,)}, ">= 0"),
        ({"factors": ()}, "at least one"),
        ({"null_fraction": 1.5}, "null-space"),
        ({"null_space": "nope"}, "null_space"),
        ({"random": "nope"}, "random"),
        ({"n_random": -1}, "n_random"),
        ({"generation_factors": (float("nan"),)}, "finite"),
        ({"n_tokens": 0}, "n_tokens"),
        ({"n_boot": 0}, "n_boot"),
    ],
)
def test_bad_settings(
    run: tuple[Path, Path, Identification], no_model_work: None, kwargs: Any, match: str
) -> None:
    with pytest.raises(ConfigError, match=match) as err:
        intervene(run[0], progress=False, **kwargs)
    assert "\n" not in str(err.value)


def _copy_run(run_dir: Path, dest: Path, edit: Any) -> Path:
    out = dest / "copy"
    shutil.copytree(run_dir, out)
    mf = out / "manifest.json"
    m = json.loads(mf.read_text())
    edit(m)
    mf.write_text(json.dumps(m))
    return out


def test_run_of_another_model_is_refused(
    run: tuple[Path, Path, Identification], no_model_work: None, tmp_path: Path
) -> None:
    def changed(m: dict[str, Any]) -> None:
        m["identity"]["model"]["files"][0]["mtime_ns"] += 1

    with pytest.raises(RunDirectoryError, match="another model"):
        intervene(_copy_run(run[0], tmp_path, changed), progress=False)


def test_unfinished_run_is_refused(
    run: tuple[Path, Path, Identification], no_model_work: None, tmp_path: Path
) -> None:
    def running(m: dict[str, Any]) -> None:
        m["status"] = "running"

    with pytest.raises(RunDirectoryError, match="not a finished run"):
        intervene(_copy_run(run[0], tmp_path, running), progress=False)
    with pytest.raises(RunDirectoryError, match="not a raretoken run directory"):
        intervene(tmp_path, progress=False)


def test_run_without_analyses_or_plateau_needs_neuron_ids(
    run: tuple[Path, Path, Identification], no_model_work: None, tmp_path: Path
) -> None:
    copy = _copy_run(run[0], tmp_path, lambda m: None)
    shutil.rmtree(copy / "analyses")
    if read_run(run[0]).group_name == "plateau":  # pragma: no cover - tiny runs fall back
        pytest.skip("this tiny run has a plateau")
    with pytest.raises(ConfigError, match="pass the neuron ids"):
        intervene(copy, progress=False)


def test_cli_lists_parse_or_fail_in_one_line() -> None:
    assert parse_factors("0, 0.5,1.5,2") == (0.0, 0.5, 1.5, 2.0)
    assert parse_neurons("3,1,2") == (3, 1, 2)
    for bad, fn in [("0,x", parse_factors), ("", parse_factors), ("nan", parse_factors),
                    ("-1", parse_factors), ("1,a", parse_neurons), ("", parse_neurons)]:  # fmt: skip
        with pytest.raises(ConfigError) as err:
            fn(bad)
        assert "\n" not in str(err.value)


def test_cli_intervene(
    run: tuple[Path, Path, Identification], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from raretoken.cli import main

    run_dir, cache, _ = run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    code = main(["intervene", str(copy), "--factors", "0,2", "--n-random", "2",
                 "--cache-dir", str(cache), "--no-progress"])  # fmt: skip
    assert code == 0
    rows = (copy / "interventions" / "interventions.csv").read_text().splitlines()
    assert len(rows) >= 4  # header, factors 0 and 2, mean ablation (and the null-space rows)
    assert capsys.readouterr().out == (copy / "interventions" / "interventions.md").read_text()
    # recorded as a stage of the run, in its summary and its report
    manifest = json.loads((copy / "manifest.json").read_text())
    assert manifest["status"] == "complete" and "interventions" in manifest["stages"]
    assert "## Interventions on the rare-token neurons" in (copy / "summary.md").read_text()
    assert 'id="interventions-interventions"' in (copy / "report.html").read_text()
    assert main(["intervene", str(copy), "--factors", "0,nan"]) == 2
    assert "finite" in capsys.readouterr().err
