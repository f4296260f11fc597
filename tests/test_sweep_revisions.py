"""Revision schedules of sweep files and command-line overrides (no network, no models)."""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from raretoken.errors import ConfigError
from raretoken.run import make_config
from raretoken.sweep import SweepSpec, SweepTask, load_sweep, parse_sweep
from raretoken.sweep.revisions import (
    PYTHIA_FINAL_STEP,
    is_pythia,
    parse_step,
    pythia_steps,
    thin_log,
)

SCHEDULE = pythia_steps()


def _names(spec: SweepSpec) -> list[str]:
    return [t.name for t in spec.tasks]


def _steps(spec: SweepSpec) -> list[int | None]:
    return [t.step for t in spec.tasks]


def _ckpts(root: Path, names: list[str]) -> Path:
    for name in names:
        (root / name).mkdir(parents=True)
    return root


# ------------------------------------------------------------------- the Pythia schedule


def test_pythia_schedule_known_answers() -> None:
    assert len(SCHEDULE) == 154 and len(set(SCHEDULE)) == 154
    assert SCHEDULE[0] == 0 and SCHEDULE[-1] == PYTHIA_FINAL_STEP == 143_000
    assert SCHEDULE[:12] == (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000)
    assert 512 in SCHEDULE and 1000 in SCHEDULE and 768 not in SCHEDULE and 1500 not in SCHEDULE
    assert np.all(np.diff(SCHEDULE[11:]) == 1000)  # step1000 ... step143000, every 1,000


def test_thin_log_known_answer_and_edges() -> None:
    # targets geomspace(1, 143000, 11): 1, 3.28, 10.7, 35.2, 115.5, 378.6, 1241, 4068, 13335,
    # 43711, 143000 -> nearest checkpoints on a log scale (worked by hand)
    assert thin_log(SCHEDULE, 12) == [0, 1, 4, 8, 32, 128, 512, 1000, 4000, 13000, 44000, 143000]
    assert thin_log(SCHEDULE, 2) == [0, 143000]
    assert thin_log(SCHEDULE, 3) == [0, 1, 143000]
    assert thin_log(SCHEDULE, 154) == list(SCHEDULE) == thin_log(SCHEDULE, 500)
    assert thin_log([1, 10, 100, 1000, 10000], 3) == [1, 100, 10000]
    with pytest.raises(ConfigError, match="at least 2"):
        thin_log(SCHEDULE, 1)


def _brute_force(k: int) -> list[int]:
    """Independent: step 0, then for each log-spaced target the nearest checkpoint."""
    pos = np.array(SCHEDULE[1:], dtype=float)
    targets = np.geomspace(1, 143000, k - 1)
    idx = [int(np.argmin(np.abs(np.log(pos) - math.log(t)))) for t in targets]
    return [0, *(int(pos[i]) for i in idx)]


@pytest.mark.parametrize("k", range(2, 155))
def test_thin_log_is_k_distinct_log_spaced_checkpoints(k: int) -> None:
    got = thin_log(SCHEDULE, k)
    assert len(got) == k and got[0] == 0 and got[-1] == 143000
    assert all(a < b for a, b in itertools.pairwise(got))
    assert set(got) <= set(SCHEDULE)
    brute = _brute_force(k)
    if k > 2 and len(set(brute)) == k:  # no two targets share a nearest checkpoint: the same answer
        assert got == brute


def test_parse_step_and_is_pythia() -> None:
    for name in ("step1000", "step-1000", "checkpoint-1000", "checkpoint_1000", "ckpt1000",
                 "iter_1000", "global_step1000", "STEP1000", "run1-step1000",
                 "iteration-1000"):  # fmt: skip
        assert parse_step(name) == 1000, name
    for name in ("main", "v1.0", "step", "steps1000", "step1000a", "", None, "mystep3"):
        assert parse_step(name) is None, name
    assert is_pythia("EleutherAI/pythia-70m") and is_pythia("eleutherai/Pythia-160m-deduped")
    assert not is_pythia("gpt2") and not is_pythia("someone/pythia-70m")


# ------------------------------------------------------------------- expansion in sweep files


def test_hub_pythia_log_is_154_tasks_without_network() -> None:
    data = {"n_boot": 5, "models": [{"model": "EleutherAI/pythia-70m", "revisions": "pythia-log"}]}
    spec = parse_sweep(data)
    assert len(spec.tasks) == 154
    assert _names(spec)[:4] == ["pythia-70m@step0", "pythia-70m@step1", "pythia-70m@step2",
                                "pythia-70m@step4"]  # fmt: skip
    assert _names(spec)[-1] == "pythia-70m@step143000"
    assert _steps(spec) == list(SCHEDULE)
    for task, step in zip(spec.tasks, SCHEDULE, strict=True):
        assert task.revision == f"step{step}" and task.model == "EleutherAI/pythia-70m"
        assert task.config == make_config(overrides={
            "model": "EleutherAI/pythia-70m", "revision": f"step{step}", "n_boot": 5})  # fmt: skip
    assert SweepSpec.from_dict(spec.to_dict()) == spec
    thinned = parse_sweep(
        {"revisions": "pythia-log:12", "models": [{"model": "EleutherAI/pythia-410m"}]}
    )
    assert _steps(thinned) == [0, 1, 4, 8, 32, 128, 512, 1000, 4000, 13000, 44000, 143000]
    assert thinned.tasks[5].config.revision == "step128"


def test_every_n_on_a_local_checkpoint_directory(tmp_path: Path) -> None:
    _ckpts(tmp_path / "ckpts", ["step0", "step1", "step2", "step4", "step100", "step200",
                                "step250", "notes", "step300-old"])  # fmt: skip
    (tmp_path / "ckpts/step7").write_text("a file, not a checkpoint")

    def run(rev: str) -> SweepSpec:
        return parse_sweep({"models": [{"model": "ckpts", "revisions": rev}]}, tmp_path)

    spec = run("every:100")
    assert _names(spec) == ["ckpts@step0", "ckpts@step100", "ckpts@step200", "ckpts@step250"]
    assert _steps(spec) == [0, 100, 200, 250]  # the last checkpoint is always kept
    task = spec.tasks[1]
    assert task.model == str((tmp_path / "ckpts/step100").resolve()) == task.config.model
    assert task.revision == "step100" and task.config.revision is None
    assert _steps(run("every:2")) == [0, 2, 4, 100, 200, 250]
    assert _steps(run("every:100:200")) == [0, 100, 200]
    assert _steps(run("every:100:150")) == [0, 100]
    assert _steps(run("every:1000")) == [0, 250]
    # the glob form keeps working and records steps too (natural order)
    assert _steps(run("step*")) == [0, 1, 2, 4, 100, 200, 250, None]


def test_plain_revisions_of_a_local_directory_are_its_sub_directories(tmp_path: Path) -> None:
    _ckpts(tmp_path / "ckpts", ["step100", "step200"])
    spec = parse_sweep({"models": [{"model": "ckpts", "revisions": ["step200", "step100"]}]},
                       tmp_path)  # fmt: skip
    assert [(t.name, t.step, t.config.revision) for t in spec.tasks] == [
        ("ckpts@step200", 200, None), ("ckpts@step100", 100, None)]  # fmt: skip
    assert spec.tasks[0].config.model == str((tmp_path / "ckpts/step200").resolve())
    for bad in ("main", "../ckpts"):
        with pytest.raises(ConfigError, match=f"has no sub-directory '{re.escape(bad)}'"):
            parse_sweep({"models": [{"model": "ckpts", "revisions": [bad]}]}, tmp_path)


def test_checkpoint_names_and_pythia_log_on_local_directories(tmp_path: Path) -> None:
    _ckpts(tmp_path / "hf", ["checkpoint-500", "checkpoint-1000", "checkpoint-1500"])
    spec = parse_sweep({"models": [{"model": "hf", "revisions": "every:1000"}]}, tmp_path)
    assert _names(spec) == ["hf@checkpoint-1000", "hf@checkpoint-1500"]
    assert _steps(spec) == [1000, 1500]
    _ckpts(tmp_path / "mirror", [f"step{s}" for s in SCHEDULE])
    full = parse_sweep({"models": [{"model": "mirror", "revisions": "pythia-log:5"}]}, tmp_path)
    assert _steps(full) == thin_log(SCHEDULE, 5)
    assert full.tasks[0].config.model == str((tmp_path / "mirror/step0").resolve())
    (tmp_path / "mirror/step4").rmdir()
    with pytest.raises(ConfigError, match=r"1 of the 154 Pythia checkpoints .*step4"):
        parse_sweep({"models": [{"model": "mirror", "revisions": "pythia-log"}]}, tmp_path)


def test_every_n_on_hub_ids() -> None:
    def steps(model: str, rev: str) -> list[int | None]:
        return _steps(parse_sweep({"models": [{"model": model, "revisions": rev}]}))

    tens = steps("EleutherAI/pythia-70m", "every:10000")
    assert tens == [0, *range(10000, 140001, 10000), 143000]
    assert steps("EleutherAI/pythia-70m", "every:2:16") == [0, 2, 4, 8, 16]
    assert steps("EleutherAI/pythia-70m", "every:500:3000") == [0, 1000, 2000, 3000]
    assert steps("org/model", "every:500:2000") == [0, 500, 1000, 1500, 2000]
    assert steps("org/model", "every:300:1000") == [0, 300, 600, 900, 1000]
    spec = parse_sweep({"models": [{"model": "org/model", "revisions": "every:300:1000"}]})
    assert [t.config.revision for t in spec.tasks] == ["step0", "step300", "step600", "step900",
                                                      "step1000"]  # fmt: skip


def test_lists_mix_schedules_and_plain_revisions(tmp_path: Path) -> None:
    data = {"models": [{"model": "EleutherAI/pythia-70m", "revisions": ["pythia-log:3", "main"]}]}
    spec = parse_sweep(data)
    assert _names(spec) == ["pythia-70m@step0", "pythia-70m@step1", "pythia-70m@step143000",
                            "pythia-70m@main"]  # fmt: skip
    assert _steps(spec) == [0, 1, 143000, None]
    # a model without revisions: its step from a local directory's name, none for a hub id
    (tmp_path / "run/step300").mkdir(parents=True)
    plain = parse_sweep({"models": [{"model": "run/step300"}, {"model": "gpt2"}]}, tmp_path)
    assert _steps(plain) == [300, None]
    with pytest.raises(ConfigError, match="duplicate task name 'pythia-70m@step1'"):
        parse_sweep({"models": [{"model": "EleutherAI/pythia-70m",
                                 "revisions": ["pythia-log:3", "step1"]}]})  # fmt: skip


def test_tasks_without_step_from_older_files() -> None:
    task = SweepTask("m@step5", "m", "step5", make_config(overrides={"model": "m"}), step=5)
    assert SweepTask.from_dict(task.to_dict()) == task
    old = task.to_dict()
    del old["step"]
    assert SweepTask.from_dict(old).step is None
    spec = parse_sweep({"models": [{"model": "m"}]})
    old_spec = spec.to_dict()
    del old_spec["overrides"]
    assert SweepSpec.from_dict(old_spec) == spec


@pytest.mark.parametrize(
    ("model", "revisions", "needle"),
    [
        ("EleutherAI/pythia-70m", '"every:0"', "N must be a positive integer, got '0'"),
        ("EleutherAI/pythia-70m", '"every:abc"', "N must be a positive integer, got 'abc'"),
        ("EleutherAI/pythia-70m", '"every:"', 'write "every:N" or "every:N:LAST"'),
        ("EleutherAI/pythia-70m", '"every:5:10:20"', 'write "every:N" or "every:N:LAST"'),
        ("EleutherAI/pythia-70m", '"every:5:x"', "LAST must be a positive integer"),
        ("EleutherAI/pythia-70m", '"pythia-log:1"', "K must be an integer >= 2, got '1'"),
        ("EleutherAI/pythia-70m", '"pythia-log:"', "K must be an integer >= 2, got ''"),
        ("EleutherAI/pythia-70m", '"pythia-log:many"', "K must be an integer >= 2"),
        ("EleutherAI/pythia-70m", '"pythia-lin:5"', "unknown revision schedule 'pythia-lin:5'"),
        ("EleutherAI/pythia-70m", '["main", "evry:5"]', "unknown revision schedule 'evry:5'"),
        ("EleutherAI/pythia-70m", '"main"', "non-empty array of strings, a schedule"),
        ("org/model", '"every:1000"', 'write "every:1000:LAST"'),
        ("model.gguf", '"pythia-log"', "need a hub id or a directory of checkpoint"),
        ("empty", '"every:10"', "no checkpoint directories named like step1000"),
        ("dup", '"every:10"', "both hold step 100"),
        ("late", '"every:10:5"', "no checkpoint in"),
    ],
)
def test_bad_schedules_are_one_line_config_errors(
    tmp_path: Path, model: str, revisions: str, needle: str
) -> None:
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    (tmp_path / "empty/notes").mkdir(parents=True)
    _ckpts(tmp_path / "dup", ["step100", "checkpoint-100"])
    _ckpts(tmp_path / "late", ["step100"])
    path = tmp_path / "sweep.toml"
    path.write_text(f'[[models]]\nmodel = "{model}"\nrevisions = {revisions}\n')
    with pytest.raises(ConfigError) as info:
        load_sweep(path)
    message = str(info.value)
    assert needle in message and "\n" not in message, message
    assert str(path) in message and model in message


# ------------------------------------------------------------------- command-line overrides


def _file(tmp_path: Path) -> Path:
    path = tmp_path / "sweep.toml"
    path.write_text(
        'preset = "paper"\nn_boot = 5\nseed = 1\n'
        '[[models]]\nmodel = "a/m1"\nn_boot = 7\npercentile = 10.0\n'
        '[[models]]\nmodel = "b/m2"\n'
    )
    return path


def test_overrides_win_over_file_and_model_settings(tmp_path: Path) -> None:
    path = _file(tmp_path)
    plain = load_sweep(path)
    assert [t.config.n_boot for t in plain.tasks] == [7, 5]
    assert [t.config.preset for t in plain.tasks] == ["paper", "paper"]
    over: dict[str, Any] = {"n_boot": 3, "preset": "demo", "percentile": 12, "seed": None}
    spec = load_sweep(path, overrides=over)
    for task in spec.tasks:
        cfg = task.config
        assert (cfg.n_boot, cfg.preset, cfg.percentile, cfg.seed) == (3, "demo", 12.0, 1)
        assert cfg.n_rare == 600  # from the overriding preset (the file sets no n_rare)
        assert cfg == make_config(
            preset="demo", overrides={"model": task.model, "n_boot": 3, "seed": 1,
                                      "percentile": 12.0})  # fmt: skip
    assert spec.overrides == {"n_boot": 3, "preset": "demo", "percentile": 12.0}
    assert spec.settings == {"preset": "demo", "n_boot": 3, "seed": 1, "percentile": 12.0}
    assert SweepSpec.from_dict(spec.to_dict()) == spec
    assert load_sweep(path, overrides={}) == plain == load_sweep(path, overrides={"seed": None})


def test_override_paths_are_taken_from_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _file(tmp_path)
    (tmp_path / "cwd").mkdir()
    (tmp_path / "cwd/texts.jsonl").write_text('{"text": "x"}\n')
    monkeypatch.chdir(tmp_path / "cwd")
    spec = load_sweep(path, overrides={"corpus": "texts.jsonl", "freq_corpus": "allenai/c4"})
    assert spec.tasks[0].config.corpus == str((tmp_path / "cwd/texts.jsonl").resolve())
    assert spec.tasks[0].config.freq_corpus == "allenai/c4"


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"n_boot": "5"}, "'n_boot' must be an integer"),
        ({"n_boot": 2.0}, "write 2"),
        ({"percentile": True}, "'percentile' must be a number"),
        ({"n_bot": 5}, "unknown setting 'n_bot'"),
        ({"preset": "papr"}, "unknown preset 'papr'"),
        ({"model": "gpt2"}, "'model' cannot be overridden"),
        ({"revision": "step1"}, "'revision' cannot be overridden"),
        ({"percentile": 150.0}, "percentile must be in (0, 100)"),
        ({"score_percentile": 5.0}, "must be at least the split's percentile"),
    ],
)
def test_bad_overrides_are_one_line_config_errors(
    tmp_path: Path, overrides: dict[str, Any], needle: str
) -> None:
    path = _file(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_sweep(path, overrides=overrides)
    message = str(info.value)
    assert needle in message and "\n" not in message, message
    assert str(path) in message
