"""Run settings keep their types: wrong-typed TOML or Python values are refused, not coerced."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from raretoken.cli import build_parser, main
from raretoken.errors import ConfigError
from raretoken.run.config import PRESETS, RunConfig, make_config, read_config_file


def toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ("n_windows = 4.7", ["'n_windows'", "4.7", "TOML float", "an integer"]),
        ("n_windows = 4.0", ["'n_windows'", "4.0", "TOML float", "write 4"]),
        ("n_windows = true", ["'n_windows'", "True", "TOML boolean", "an integer"]),
        ("n_windows = '4'", ["'n_windows'", "'4'", "TOML string", "an integer"]),
        ("seed = 1e3", ["'seed'", "1000.0", "TOML float", "write 1000"]),
        ("percentile = true", ["'percentile'", "True", "TOML boolean", "a number"]),
        ("percentile = '15'", ["'percentile'", "'15'", "TOML string", "a number"]),
        ("model = 3", ["'model'", "3", "TOML integer", "a string"]),
        ("corpus = ['a.txt']", ["'corpus'", "['a.txt']", "TOML array", "a string"]),
        ("revision = 143000", ["'revision'", "143000", "TOML integer", "a string (or unset)"]),
        ("max_count_tokens = 1.5e6", ["'max_count_tokens'", "TOML float", "an integer"]),
        ("max_count_tokens = false", ["'max_count_tokens'", "TOML boolean"]),
        ("tol = 2024-01-01", ["'tol'", "TOML date", "a number"]),
        ("preset = 1", ["'preset'", "TOML integer", "a string"]),
    ],
)
def test_wrongly_typed_toml_values_are_refused(tmp_path: Path, line: str, words: list[str]) -> None:
    path = toml(tmp_path, f"[run]\n{line}\n")
    with pytest.raises(ConfigError) as info:
        make_config(config_file=path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg
    for word in words:
        assert word in msg, (word, msg)


def test_top_level_settings_are_checked_too(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'n_windows'.*4\.7.*TOML float"):
        make_config(config_file=toml(tmp_path, "n_windows = 4.7\n"))


def test_well_typed_toml_values_are_kept(tmp_path: Path) -> None:
    path = toml(
        tmp_path,
        'preset = "paper"\n'
        "[run]\n"
        "n_windows = 4\n"
        "percentile = 20\n"  # an integer is a fine float
        "tol = 1e-4\n"
        'model = "gpt2"\n'
        'revision = "main"\n'
        "max_count_tokens = 100_000\n",
    )
    cfg = make_config(config_file=path)
    assert cfg.preset == "paper" and cfg.n_boot == PRESETS["paper"]["n_boot"]
    assert cfg.n_windows == 4 and type(cfg.n_windows) is int
    assert cfg.percentile == 20.0 and type(cfg.percentile) is float
    assert cfg.tol == 1e-4 and cfg.model == "gpt2" and cfg.revision == "main"
    assert cfg.max_count_tokens == 100_000 and cfg.gguf_file is None


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("n_window = 4\n", r"unknown setting 'n_window' \(top level\)"),
        ("[run]\nn_window = 4\n", r"unknown setting 'n_window' \(\[run\]\)"),
        ("[models]\nname = 'gpt2'\n", r"unknown setting 'models' \(top level\)"),
        ("[model]\nname = 'gpt2'\n", r"'model' must be a string.*TOML table"),
        ("run = 5\n", r"'run' must be a table.*TOML integer"),
        ("run = 'demo'\n", r"'run' must be a table.*TOML string"),
        ("seed = 1\n[run]\nseed = 2\n", r"'seed' is given both in \[run\] and at the top level"),
        ("[run]\n[run.inner]\nx = 1\n", r"unknown setting 'inner'"),
    ],
)
def test_bad_toml_layout_is_refused(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        read_config_file(toml(tmp_path, text))


def test_unreadable_config_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        make_config(config_file=tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        make_config(config_file=toml(tmp_path, "n_windows = = 4\n"))


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"n_windows": 4.7}, ["'n_windows'", "4.7", "Python float", "an integer"]),
        ({"n_windows": 4.0}, ["'n_windows'", "write 4"]),
        ({"n_windows": True}, ["'n_windows'", "Python bool"]),
        ({"n_windows": "4"}, ["'n_windows'", "Python str"]),
        ({"percentile": True}, ["'percentile'", "Python bool", "a number"]),
        ({"percentile": "15"}, ["'percentile'", "Python str"]),
        ({"model": 3}, ["'model'", "Python int", "a string"]),
        ({"model": Path("m")}, ["'model'", "Path)", "a string"]),
        ({"revision": 1}, ["'revision'", "a string (or unset)"]),
        ({"no_such_setting": 1}, ["unknown setting 'no_such_setting'"]),
    ],
)
def test_wrongly_typed_python_overrides_are_refused(
    overrides: dict[str, Any], words: list[str]
) -> None:
    with pytest.raises(ConfigError) as info:
        make_config(overrides=overrides)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_well_typed_python_overrides_are_kept() -> None:
    cfg = make_config(
        overrides={
            "n_windows": np.int64(5),  # any integral number
            "percentile": 20,  # an int is a fine float
            "tol": np.float32(1e-3),
            "seed": 3,
            "revision": None,  # None means "not given"
            "model": "gpt2",
        }
    )
    assert cfg.n_windows == 5 and type(cfg.n_windows) is int
    assert cfg.percentile == 20.0 and type(cfg.percentile) is float
    assert type(cfg.tol) is float and cfg.seed == 3 and cfg.revision is None
    assert cfg.model == "gpt2"


def test_overrides_win_over_the_file(tmp_path: Path) -> None:
    path = toml(tmp_path, "[run]\nn_windows = 4\nseed = 9\n")
    cfg = make_config(config_file=path, overrides={"n_windows": 6})
    assert (cfg.n_windows, cfg.seed) == (6, 9)


def _cli_config(argv: list[str]) -> RunConfig:
    """The ``RunConfig`` that ``raretoken run ARGV`` would use (as ``cli._cmd_run`` builds it)."""
    args = build_parser().parse_args(["run", *argv])
    overrides = {f.name: getattr(args, f.name) for f in fields(RunConfig)}
    preset = overrides.pop("preset")
    return make_config(preset=preset, config_file=args.config, overrides=overrides)


def test_cli_flags_still_work(tmp_path: Path) -> None:
    cfg = _cli_config(
        [
            "--n-windows",
            "4",
            "--percentile",
            "20",
            "--tol",
            "1e-4",
            "--model",
            "gpt2",
            "--revision",
            "step143000",
            "--max-count-tokens",
            "1000",
            "--preset",
            "paper",
        ]
    )
    assert (cfg.n_windows, cfg.percentile, cfg.tol) == (4, 20.0, 1e-4)
    assert (cfg.model, cfg.revision, cfg.max_count_tokens, cfg.preset) == (
        "gpt2",
        "step143000",
        1000,
        "paper",
    )
    path = toml(tmp_path, "[run]\nn_windows = 3\nwindow_len = 64\n")
    cfg = _cli_config(["--config", str(path), "--n-windows", "5"])
    assert (cfg.n_windows, cfg.window_len) == (5, 64)


def test_cli_reports_a_wrongly_typed_toml_value_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = toml(tmp_path, "[run]\nn_windows = 4.0\n")
    code = main(["run", "--config", str(path), "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == ConfigError.exit_code
    assert len(err) == 1 and err[0].startswith("error: ") and "write 4" in err[0]


def test_bos_defaults_to_auto_and_is_checked() -> None:
    from raretoken.models.bos import BOS_CHOICES
    from raretoken.run.config import BOS_CHOICES as CONFIG_CHOICES

    assert CONFIG_CHOICES == BOS_CHOICES == ("auto", "none", "prepend")
    assert RunConfig().bos == "auto" and make_config().bos == "auto"
    for preset in PRESETS:
        assert make_config(preset=preset).bos == "auto"
    assert make_config(overrides={"bos": "none"}).bos == "none"
    with pytest.raises(ConfigError) as info:
        make_config(overrides={"bos": "append"})
    msg = str(info.value)
    assert "\n" not in msg and "'auto'" in msg and "'append'" in msg
    assert _cli_config(["--bos", "prepend"]).bos == "prepend"


def test_bos_choices_agree_with_the_resolver() -> None:
    """The configuration's list of BOS settings is the one models.bos resolves."""
    from raretoken.models.bos import BOS_CHOICES as resolved
    from raretoken.run.config import BOS_CHOICES

    assert BOS_CHOICES == resolved
