"""Add-on stages of a run directory (per-layer identification, interventions): kept when the
same run is republished from the same identification, dropped (with a warning) when it changed,
recorded in the manifest, composed into summary.md and shown in report.html; ``--layers`` and
the intervention's inputs checked before any model work."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest

import raretoken.intervene.core as core_mod
import raretoken.run.stages as stages_mod
from pipeline_fixtures import tiny_overrides, tiny_setup
from raretoken.cli import main
from raretoken.intervene import intervene
from raretoken.report import write_run_report
from raretoken.run import AnalysisOptions, analyze_run_dir, identify, make_config
from raretoken.run.addons import ADDON_STAGES, identification_basis
from raretoken.run.layers import identify_layers
from raretoken.run.summary import SECTIONS, compose_summary, write_summary

LAYER_FILES = ("layers/layer_00.json", "layers/layer_02.json", "layers/layers.csv",
               "layers/screen_quality.csv", "layers/summary.md", "figures/depth.png",
               "figures/depth.svg")  # fmt: skip
IV_FILES = ("interventions/interventions.csv", "interventions/interventions.md",
            "interventions/interventions.json", "interventions/interventions.png",
            "interventions/interventions.svg", "interventions/summary.md")  # fmt: skip
HEADINGS = {
    "identification": "# raretoken: rare-token neuron identification",
    "analyses": "## Organisation of the rare-token neurons",
    "layers": "## Rare-token neurons across depth",
    "interventions": "## Interventions on the rare-token neurons",
}


def _manifest(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "manifest.json").read_text())  # type: ignore[no-any-return]


def _snapshot(run_dir: Path, rels: tuple[str, ...]) -> dict[str, bytes]:
    return {rel: (run_dir / rel).read_bytes() for rel in rels}


def _addon_outputs(m: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in m["outputs"].items() if k.startswith(tuple(ADDON_STAGES.values()))}


def _no_model(*a: object, **k: object) -> None:
    raise AssertionError("model work started")


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny identified run with layers 0 and 2 and one intervention (no analyses)."""
    root = tmp_path_factory.mktemp("addons")
    model_dir, corpus = tiny_setup(root)
    cfg = make_config(overrides=tiny_overrides(model_dir, corpus))
    out, cache = root / "run", root / "cache"
    identify(cfg, out, cache_dir=cache, progress=False)
    m0 = _manifest(out)
    identify_layers(out, "0,-1", top_k=8, n_random=2, quality_k=3, cache_dir=cache,
                    progress=False)  # fmt: skip
    intervene(out, neurons=[0, 1, 2], factors=(0.0,), n_random=1, null_fraction=None,
              n_boot=20, generation_factors=(0.0,), prompts=("The cat",), n_tokens=3,
              cache_dir=cache, progress=False)  # fmt: skip
    return {"root": root, "out": out, "cache": cache, "cfg": cfg, "model": model_dir,
            "corpus": corpus, "identified": m0}  # fmt: skip


def _copy(base: dict[str, Any], name: str) -> Path:
    dest = base["root"] / name
    shutil.copytree(base["out"], dest)
    return dest


def test_addon_stages_record_the_identification_they_used(base: dict[str, Any]) -> None:
    m = _manifest(base["out"])
    assert m["status"] == "identified" and "running" not in m and "error" not in m
    want = identification_basis(base["identified"]["stages"])
    assert None not in want.values()
    for name in ("layers", "interventions"):
        assert m["stages"][name]["basis"] == want, name
    iv = m["stages"]["interventions"]
    assert iv["group"] == {"name": "given neurons", "size": 3}
    assert iv["settings"]["factors"] == [0.0] and iv["settings"]["n_random"] == 1
    for rel in IV_FILES:
        assert m["outputs"][f"interventions:{rel}"]["path"] == rel
        assert (base["out"] / rel).stat().st_size > 0, rel


def test_summary_has_every_stage_section(base: dict[str, Any]) -> None:
    out = base["out"]
    text = (out / "summary.md").read_text()
    ident = (out / "identification/summary.md").read_text()
    layers = (out / "layers/summary.md").read_text()
    iv = (out / "interventions/summary.md").read_text()
    assert text == ident + "\n" + layers + "\n" + iv
    assert iv.startswith(HEADINGS["interventions"])
    res = json.loads((out / "interventions/interventions.json").read_text())
    row = res["rows"][0]
    assert [(r["kind"], r["factor"]) for r in res["rows"]] == [("scale", 0.0), ("mean", 0.0)]
    lo, hi = row["d_rare_ci"]
    assert (f"| scale ×0 | {row['d_rare']:+.4f} | [{lo:+.4f}, {hi:+.4f}] | "
            f"{row['d_common']:+.4f} |") in iv  # fmt: skip
    assert "| mean ablation |" in iv and "near-null" not in iv
    assert "over 1 random groups of the same size;" in iv
    assert text.index(HEADINGS["layers"]) < text.index(HEADINGS["interventions"])
    assert (
        _manifest(out)["outputs"]["summary_identification"]["path"] == "identification/summary.md"
    )


def test_analyze_keeps_layers_and_interventions(base: dict[str, Any]) -> None:
    out = _copy(base, "analyzed")
    before, files = _manifest(out), _snapshot(out, LAYER_FILES + IV_FILES)
    analyze_run_dir(out, AnalysisOptions(routing=False), cache_dir=base["cache"], progress=False)
    after = _manifest(out)
    assert after["status"] == "complete" and "analyses" in after["stages"]
    assert after["stages"]["interventions"] == before["stages"]["interventions"]
    assert _addon_outputs(after).keys() == _addon_outputs(before).keys()
    # the layers' own results are kept as they were; only the final layer's row of the
    # per-layer analyses is brought up to date: it is now the run's own analyses (from cache)
    unchanged = ("layers/layers.csv", "layers/screen_quality.csv", *IV_FILES)
    assert _snapshot(out, unchanged) == {k: v for k, v in files.items() if k in unchanged}
    for rel in LAYER_FILES[:2]:  # layer_XX.json: the same fit (its settings name the new row)
        assert json.loads((out / rel).read_text())["regime"] == json.loads(files[rel])["regime"]
    lay_b, lay_a = before["stages"]["layers"], after["stages"]["layers"]
    assert lay_b["final_analyses_key"] is None
    assert lay_a["final_analyses_key"] == after["stages"]["analyses"]["key"]
    assert (lay_a["basis"], lay_a["keys"]) == (lay_b["basis"], lay_b["keys"])
    final = json.loads((out / "layers/analyses_02.json").read_text())
    assert final["source"] == "run"
    assert json.loads((base["out"] / "layers/analyses_02.json").read_text())["source"] == "layers"
    # the same analyses again: the per-layer stage is not rerun
    analyze_run_dir(out, AnalysisOptions(routing=False), cache_dir=base["cache"], progress=False)
    assert _manifest(out)["stages"]["layers"] == lay_a
    text = (out / "summary.md").read_text()
    pos = [text.index(HEADINGS[s]) for s, _ in SECTIONS]
    assert pos == sorted(pos) and text == compose_summary(out)
    assert text.endswith((out / "interventions/summary.md").read_text())


def test_rerun_of_identify_keeps_them_and_stays_identified(base: dict[str, Any]) -> None:
    out = _copy(base, "rerun")
    before, files = _manifest(out), _snapshot(out, LAYER_FILES + IV_FILES)
    identify(base["cfg"], out, cache_dir=base["cache"], progress=False)
    after = _manifest(out)
    assert after["status"] == "identified"
    assert {k: after["stages"][k] for k in ADDON_STAGES} == {
        k: before["stages"][k] for k in ADDON_STAGES
    }
    assert _addon_outputs(after) == _addon_outputs(before)
    assert _snapshot(out, LAYER_FILES + IV_FILES) == files
    sections = [(out / rel).read_text() for rel in ("identification/summary.md",
                "layers/summary.md", "interventions/summary.md")]  # fmt: skip
    assert (out / "summary.md").read_text() == "\n".join(sections)
    assert not list(out.parent.glob(f".{out.name}.*"))  # no staging or old directory left


def test_changed_model_files_drop_them_with_a_warning(
    base: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """Same configuration, but the model's files changed: the capture (forward) key differs,
    so the per-layer results and the interventions no longer describe this run."""
    out = _copy(base, "changed")
    extra = base["model"] / "notes.txt"  # part of the model's identity (its files)
    extra.write_text("changed")
    try:
        with caplog.at_level(logging.WARNING, logger="raretoken.run.addons"):
            identify(base["cfg"], out, cache_dir=base["cache"], progress=False)
    finally:
        extra.unlink()
    m = _manifest(out)
    assert not set(ADDON_STAGES) & set(m["stages"]) and not _addon_outputs(m)
    for rel in LAYER_FILES + IV_FILES:
        assert not (out / rel).exists(), rel
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for name in ADDON_STAGES:
        assert any(f"stage {name!r}" in w and "forward key" in w for w in warned), warned
    assert all("sampling key" not in w for w in warned)  # the windows did not change
    text = (out / "summary.md").read_text()
    assert HEADINGS["layers"] not in text and HEADINGS["interventions"] not in text


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda m, d: m["stages"]["layers"]["basis"].update(sampling="0" * 64), "sampling key"),
        (
            lambda m, d: m["stages"]["layers"]["basis"].update(token_statistics="0" * 64),
            "token_statistics key",
        ),
        (lambda m, d: m["stages"]["layers"].pop("basis"), "older raretoken"),
        (lambda m, d: (d / "layers/layers.csv").unlink(), "missing"),
    ],
)
def test_one_invalid_addon_is_dropped_the_other_kept(
    base: dict[str, Any], caplog: pytest.LogCaptureFixture, edit: Any, needle: str
) -> None:
    out = _copy(base, f"edited-{needle.split()[0]}")
    m = _manifest(out)
    edit(m, out)
    (out / "manifest.json").write_text(json.dumps(m))
    with caplog.at_level(logging.WARNING, logger="raretoken.run.addons"):
        identify(base["cfg"], out, cache_dir=base["cache"], progress=False)
    after = _manifest(out)
    assert "layers" not in after["stages"] and "interventions" in after["stages"]
    assert not (out / "layers").exists() and not (out / "figures/depth.svg").exists()
    assert all((out / rel).is_file() for rel in IV_FILES)
    assert any(needle in r.getMessage() and "'layers'" in r.getMessage() for r in caplog.records)
    text = (out / "summary.md").read_text()
    assert HEADINGS["layers"] not in text and HEADINGS["interventions"] in text


def test_another_configuration_keeps_nothing(base: dict[str, Any]) -> None:
    """--overwrite with another configuration: even though its windows and capture are the
    same (only the bootstrap differs), nothing of the earlier run is kept."""
    out = _copy(base, "other-config")
    cfg = make_config(overrides=dict(tiny_overrides(base["model"], base["corpus"]), n_boot=3))
    identify(cfg, out, cache_dir=base["cache"], overwrite=True, progress=False)
    m = _manifest(out)
    assert identification_basis(m["stages"]) == identification_basis(base["identified"]["stages"])
    assert not set(ADDON_STAGES) & set(m["stages"]) and not _addon_outputs(m)
    assert not (out / "layers").exists() and not (out / "interventions").exists()
    assert not (out / "figures/depth.png").exists()


def test_failed_intervention_is_recorded_and_leaves_its_section_out(
    base: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = _copy(base, "failed-iv")

    def boom(*a: object, **k: object) -> None:
        raise RuntimeError("measurement broke")

    monkeypatch.setattr(core_mod, "scored_metrics", boom)
    with pytest.raises(RuntimeError):
        intervene(out, neurons=[0, 1], factors=(0.0,), n_random=0, null_fraction=None,
                  generation_factors=(), cache_dir=base["cache"], progress=False)  # fmt: skip
    m = _manifest(out)
    # the error is recorded, but the run it extends is still whole: its status is unchanged
    assert m["status"] == "identified" and m["error"]["stage"] == "interventions"
    assert "interventions" not in m["stages"] and "layers" in m["stages"]
    text = (out / "summary.md").read_text()  # rewritten by the failing stage itself
    assert HEADINGS["interventions"] not in text and HEADINGS["layers"] in text
    html = write_run_report(out).read_text()
    assert 'id="interventions"' not in html and 'id="layers"' in html
    monkeypatch.undo()  # the run is still usable: the next intervention runs and is recorded
    intervene(out, neurons=[0, 1], factors=(0.0,), n_random=0, null_fraction=None,
              generation_factors=(), cache_dir=base["cache"], progress=False)  # fmt: skip
    m = _manifest(out)
    assert m["status"] == "identified" and "error" not in m and "interventions" in m["stages"]
    assert HEADINGS["interventions"] in (out / "summary.md").read_text()


def test_failed_layers_stage_keeps_a_complete_run_complete(
    base: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    import raretoken.run.layers as layers_mod

    out = _copy(base, "failed-layers")
    m = _manifest(out)
    m["stages"]["analyses"] = {"finished": "x"}  # as if the analyses had run
    m["status"] = "complete"
    (out / "manifest.json").write_text(json.dumps(m))

    def boom(*a: object, **k: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(layers_mod, "run_inputs", boom)
    with pytest.raises(KeyboardInterrupt):
        identify_layers(out, "0", top_k=2, n_random=0, analyses=False, cache_dir=base["cache"],
                        progress=False)  # fmt: skip
    m = _manifest(out)
    assert m["status"] == "complete" and m["error"]["stage"] == "layers"
    assert m["error"]["type"] == "KeyboardInterrupt" and "layers" not in m["stages"]
    assert HEADINGS["layers"] not in (out / "summary.md").read_text()


def test_summary_composition_known_answers(tmp_path: Path) -> None:
    """Sections of finished stages only, in a fixed order; a summary.md written before
    section files keeps its identification part."""
    (tmp_path / "manifest.json").write_text(json.dumps({"stages": {"sampling": {}, "layers": {},
                                                                   "interventions": {}}}))  # fmt: skip
    for stage, rel in SECTIONS:
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        (tmp_path / rel).write_text(f"{HEADINGS[stage]}\n\n{stage} body\n")
    got = write_summary(tmp_path).read_text()
    assert got == "\n".join(f"{HEADINGS[s]}\n\n{s} body\n" for s in
                            ("identification", "layers", "interventions"))  # fmt: skip
    # the analyses stage finishing now: included before it is recorded
    assert write_summary(tmp_path, also=("analyses",)).read_text().count("analyses body") == 1
    # legacy: no identification section file; summary.md's part before the analyses heading
    (tmp_path / "identification/summary.md").unlink()
    (tmp_path / "summary.md").write_text("# id\n\nold text\n\n" + HEADINGS["analyses"] + "\nold\n")
    got = compose_summary(tmp_path, stages=("layers",))
    assert got == "# id\n\nold text\n" + "\n" + f"{HEADINGS['layers']}\n\nlayers body\n"


def test_report_shows_layers_and_interventions(base: dict[str, Any]) -> None:
    out = base["out"]
    text = write_run_report(out).read_text()
    for anchor in ("layers", "layers-layers", "layers-screen_quality", "interventions",
                   "interventions-interventions", "fig-depth"):  # fmt: skip
        assert f'id="{anchor}"' in text, anchor
    assert text.count('data-figure="depth"') == 1 and 'data-figure="interventions"' in text
    layers_part = text.split('<section id="layers">')[1].split('<section id="interventions">')[0]
    assert 'data-figure="depth"' in layers_part and "layer_02.json" in layers_part
    iv_part = text.split('<section id="interventions">')[1].split('<section id="figures">')[0]
    assert "Greedy generations" in iv_part and "The cat" in iv_part
    assert 'data-figure="interventions"' in iv_part
    # the summary's code spans link to the sections
    assert 'href="#interventions-interventions"><code>interventions/interventions.md' in text


# ------------------------------------------------------------------ checked before model work
def _run_argv(base: dict[str, Any], out: str) -> list[str]:
    argv = ["run", "--no-progress", "--skip-analyses", "--out", str(base["root"] / out),
            "--cache-dir", str(base["cache"])]  # fmt: skip
    for k, v in tiny_overrides(base["model"], base["corpus"]).items():
        argv += ["--" + k.replace("_", "-"), str(v)]
    return argv


def _one_line(capsys: pytest.CaptureFixture[str], code: int, needle: str) -> None:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and err[0].startswith("error:"), err
    assert needle in err[0], err[0]


@pytest.mark.parametrize(
    ("flags", "needle"),
    [(["--layers", "99"], "out of range"), (["--layers", "-4"], "out of range"),
     (["--layers", "0,x"], "comma-separated"), (["--layers", "0", "--layer-top-k", "-1"],
                                                "--layer-top-k"),
     (["--layers", "0", "--layer-random-exact", "-2"], "--layer-random-exact"),
     (["--layers", "0", "--layer-top-k", "0", "--layer-random-exact", "0"], "no neuron"),
     (["--layers", "0", "--layer-n-random", "1"], "n_random_groups must be an integer >= 2"),
     (["--layers", "0", "--layer-routing-windows", "1"], "routing_windows must be")],
)  # fmt: skip
def test_run_checks_layers_before_identification(
    base: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    flags: list[str], needle: str,
) -> None:  # fmt: skip
    monkeypatch.setattr(stages_mod, "load_model", _no_model)
    out = f"bad-layers-{abs(hash(tuple(flags)))}"
    _one_line(capsys, main([*_run_argv(base, out), *flags]), needle)
    assert not (base["root"] / out).exists()  # identification did not run


def test_intervene_inputs_are_checked_before_model_work(
    base: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(core_mod, "load_windows", _no_model)
    out = _copy(base, "iv-bad")
    before = (out / "manifest.json").read_text()
    argv = ["intervene", str(out), "--no-progress", "--cache-dir", str(base["cache"])]
    _one_line(capsys, main([*argv, "--neurons", "0,64"]), "outside the final MLP layer")
    _one_line(capsys, main([*argv, "--neurons", "0,-1"]), "outside the final MLP layer")
    _one_line(capsys, main([*argv, "--neurons", "1,1"]), "twice")
    _one_line(capsys, main([*argv, "--factors", "0,inf"]), "finite")
    _one_line(capsys, main([*argv, "--factors", "nan"]), "finite")
    _one_line(capsys, main([*argv, "--null-fraction", "nan"]), "null-space")
    assert (out / "manifest.json").read_text() == before  # no stage was begun
    m = json.loads(before)
    m["identity"]["model"]["files"][0]["size"] += 1  # identified with other model files
    other = json.dumps(m)
    (out / "manifest.json").write_text(other)
    _one_line(capsys, main([*argv, "--neurons", "0"]), "another model")
    assert (out / "manifest.json").read_text() == other
