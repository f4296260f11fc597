"""The CLI: a successful run, and one-line errors (exit code 2, no traceback) on bad input."""

from __future__ import annotations

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
    assert (root / "ok" / "summary.md").exists()


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
