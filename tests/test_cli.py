"""The CLI: a successful run, and one-line errors (exit code 2, no traceback) on bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pipeline_fixtures import tiny_overrides, tiny_setup
from raretoken.cli import main
from tiny import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("cli")
    model_dir, corpus = tiny_setup(root, "gpt2")
    return root, model_dir, corpus


def _args(model_dir: Path, corpus: Path, root: Path, out: str, /, **extra: object) -> list[str]:
    opts = {**tiny_overrides(model_dir, corpus), **extra}
    argv = ["run", "--no-progress", "--out", str(root / out), "--cache-dir", str(root / "cache")]
    for k, v in opts.items():
        argv += ["--" + k.replace("_", "-"), str(v)]
    return argv


def _one_line_error(capsys: pytest.CaptureFixture[str], code: int, needle: str) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 1, err
    assert needle.lower() in errors[0].lower(), errors[0]
    assert not any("Traceback" in line for line in err)


def test_run_prints_summary(
    setup: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    root, model_dir, corpus = setup
    assert main(_args(model_dir, corpus, root, "ok")) == 0
    out = capsys.readouterr().out
    assert "rare-token neuron identification" in out
    assert (root / "ok" / "summary.md").read_text() == out
    # the analyses ran as a stage: verdicts in the summary, files in the manifest
    assert "Organisation of the rare-token neurons" in out
    for claim in ("coordinated", "clustered", "routing", "heavier-tailed"):
        assert claim.lower() in out.lower(), claim
    manifest = json.loads((root / "ok" / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    stage = manifest["stages"]["analyses"]
    assert stage["cached"] is False and stage["options"]["n_random"] == 5
    outputs = {o["path"] for o in manifest["outputs"].values()}
    for rel in ("analyses/claims.md", "analyses/report.md", "analyses/routing.csv",
                "figures/spectra.png", "summary.md", "neurons.parquet"):  # fmt: skip
        assert rel in outputs and (root / "ok" / rel).stat().st_size > 0, rel
    assert "analyses/robustness.md" not in outputs
    # the summary names exactly the analysis figures that were written
    line = next(x for x in out.splitlines() if x.startswith("Tables and tests:"))
    named = set(re.findall(r"`(figures/[a-z_]+\.png)`", line))
    written = {p for p in outputs if p.startswith("figures/") and p.endswith(".png")}
    written -= {"figures/rank_curve.png", "figures/token_frequency.png", "figures/covariates.png"}
    assert named == written and "figures/group_ablation.png" in named


def test_rerun_takes_the_analyses_from_the_cache(
    setup: tuple[Path, Path, Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root, model_dir, corpus = setup
    assert main(_args(model_dir, corpus, root, "cached")) == 0
    first = capsys.readouterr().out

    def boom(*a: object, **k: object) -> None:
        raise AssertionError("the analyses should come from the cache")

    monkeypatch.setattr("raretoken.analyses.run_analyses", boom)
    assert main(_args(model_dir, corpus, root, "cached")) == 0
    assert capsys.readouterr().out == first
    manifest = json.loads((root / "cached" / "manifest.json").read_text())
    assert manifest["stages"]["analyses"]["cached"] is True


def test_analyze_an_existing_run_directory(
    setup: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    root, model_dir, corpus = setup
    run_dir = root / "later"
    assert main([*_args(model_dir, corpus, root, "later"), "--skip-analyses"]) == 0
    out = capsys.readouterr().out
    assert "Organisation" not in out and not (run_dir / "analyses").exists()
    argv = ["analyze", str(run_dir), "--no-progress", "--cache-dir", str(root / "cache"),
            "--robustness", "--percentiles", "10,20", "--no-routing", "--n-random", "6",
            "--tau", "0.8", "--mi-bins", "3"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "Organisation of the rare-token neurons" in out
    robust = (run_dir / "analyses" / "robustness.csv").read_text().splitlines()
    assert {line.split(",")[0] for line in robust[1:]} == {
        "p10/plateau", "p10/topk", "p10/selective", "p20/plateau", "p20/topk", "p20/selective"
    }  # fmt: skip
    assert not (run_dir / "analyses" / "routing.md").exists()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    opts = manifest["stages"]["analyses"]["options"]
    assert opts["n_random"] == 6 and opts["robustness"] and not opts["routing"]
    assert opts["tau"] == 0.8 and opts["mi_bins"] == 3
    assert "τ = 0.8" in (run_dir / "analyses" / "coordination.md").read_text()
    assert "3 equal-frequency bins" in (run_dir / "analyses" / "spatial.md").read_text()
    for bad, needle in (("--tau=1.5", "tau"), ("--mi-bins=1", "mi_bins")):
        _one_line_error(capsys, main([*argv, bad]), needle)
    assert "analyses/robustness.md" in {o["path"] for o in manifest["outputs"].values()}


def test_analyze_needs_a_run_directory(
    setup: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    root, _, _ = setup
    (root / "not-a-run").mkdir()
    _one_line_error(capsys, main(["analyze", str(root / "not-a-run")]), "not a raretoken run")
    old = root / "old-run"
    old.mkdir()
    (old / "manifest.json").write_text(json.dumps({"schema_version": 0, "config": {}}))
    _one_line_error(capsys, main(["analyze", str(old)]), "older raretoken")


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ({"percentile": 150}, "percentile"),
        ({"percentile": 0}, "percentile"),
        ({"window_len": 500}, "context"),
        ({"corpus": "/nonexistent/corpus.txt"}, "nonexistent"),
        ({"model": "/nonexistent/model-dir"}, "nonexistent"),
        ({"n_windows": 1, "window_len": 4}, "rare"),
        ({"sampling": "sometimes"}, "sampling"),
    ],
)
def test_bad_input_is_a_one_line_error(
    setup: tuple[Path, Path, Path],
    capsys: pytest.CaptureFixture[str],
    extra: dict[str, object],
    needle: str,
) -> None:
    root, model_dir, corpus = setup
    code = main(_args(model_dir, corpus, root, f"bad-{abs(hash(str(extra)))}", **extra))
    _one_line_error(capsys, code, needle)


def test_empty_corpus(setup: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    root, model_dir, _ = setup
    empty = root / "empty.txt"
    empty.write_text("   \n")
    code = main(_args(model_dir, empty, root, "empty"))
    _one_line_error(capsys, code, "")


def test_unsupported_architecture(
    setup: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    root, _, corpus = setup
    gemma = root / "gemma"
    tiny_model("gemma").save_pretrained(gemma)
    tiny_tokenizer().save_pretrained(gemma)
    code = main(_args(gemma, corpus, root, "gemma-run"))
    _one_line_error(capsys, code, "gpt2")


def test_tokenizer_that_does_not_fit_the_model(
    setup: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    root, _, corpus = setup
    small = root / "small-vocab"
    tiny_model("llama", vocab_size=100).save_pretrained(small)
    tiny_tokenizer(300).save_pretrained(small)
    code = main(_args(small, corpus, root, "mismatch"))
    _one_line_error(capsys, code, "tokenizer")


def test_run_directory_of_another_run(
    setup: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    root, model_dir, corpus = setup
    assert main(_args(model_dir, corpus, root, "taken")) == 0
    capsys.readouterr()
    code = main(_args(model_dir, corpus, root, "taken", percentile=25))
    _one_line_error(capsys, code, "different configuration")
