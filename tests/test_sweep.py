"""Sweeps (raretoken.sweep): tasks from sweep.toml, the local executor, reuse, failures, table."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

import raretoken.sweep.tasks as sweep_tasks
from pipeline_fixtures import sweep_shared, sweep_text, tiny_overrides, tiny_setup
from raretoken.cli import main
from raretoken.errors import ConfigError
from raretoken.run import AnalysisOptions, analyze, identify, make_config
from raretoken.sweep import (
    SweepResult,
    SweepSpec,
    load_sweep,
    parse_sweep,
    run_sweep,
    sweep_table,
    write_sweep_table,
)
from raretoken.sweep.tasks import is_done, task_log

ANALYSIS = AnalysisOptions(routing=False)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("sweep")
    llama, corpus = tiny_setup(root, "llama")
    gpt2, _ = tiny_setup(root, "gpt2")
    sweep_file = root / "sweep.toml"
    sweep_file.write_text(sweep_text(["model-llama", "model-gpt2"], **sweep_shared(root)))
    spec = load_sweep(sweep_file)
    result = run_sweep(spec, root / "out", cache_dir=root / "cache")
    return {"root": root, "llama": llama, "gpt2": gpt2, "corpus": corpus, "file": sweep_file,
            "spec": spec, "result": result}  # fmt: skip


def test_tasks_have_the_config_of_raretoken_run(setup: dict[str, Any]) -> None:
    spec: SweepSpec = setup["spec"]
    assert [t.name for t in spec.tasks] == ["model-llama", "model-gpt2"]
    for task, model in zip(spec.tasks, (setup["llama"], setup["gpt2"]), strict=True):
        assert task.config == make_config(overrides=tiny_overrides(model, setup["corpus"]))
        assert task.revision is None
    assert SweepSpec.from_dict(spec.to_dict()) == spec


def test_sweep_writes_what_identify_and_analyze_write(setup: dict[str, Any]) -> None:
    root: Path = setup["root"]
    result: SweepResult = setup["result"]
    assert [t.status for t in result.tasks] == ["complete", "complete"] and result.ok
    assert SweepResult.from_dict(result.to_dict()) == result
    table = pq.read_table(root / "out" / "sweep.parquet").to_pylist()
    for i, task in enumerate(setup["spec"].tasks):
        ref_dir = root / f"ref-{task.name}"
        # the first reference is computed from scratch: the sweep's files are reproducible
        no_cache = i == 0
        ident = identify(task.config, ref_dir, cache_dir=root / "cache", no_cache=no_cache,
                         progress=False)  # fmt: skip
        suite = analyze(ident, ANALYSIS, cache_dir=root / "cache", no_cache=no_cache,
                        progress=False)  # fmt: skip
        run_dir = root / "out" / "tasks" / task.name / "run"
        assert (run_dir / "analyses/claims.csv").read_text() == (
            ref_dir / "analyses/claims.csv"
        ).read_text()
        assert pq.read_table(run_dir / "neurons.parquet").equals(
            pq.read_table(ref_dir / "neurons.parquet")
        )
        manifest = json.loads((run_dir / "manifest.json").read_text())
        assert manifest["status"] == "complete" and manifest["config"] == task.config.to_dict()
        # (d) the table's row holds the same numbers, read independently from the API objects
        row = table[i]
        assert (row["task"], row["status"], row["model"]) == (task.name, "complete", task.model)
        assert row["seconds"] > 0 and row["error"] is None
        assert row["n_rare_positions"] == len(ident.rare_positions)
        assert row["plateau_size"] == ident.rare_fit.plateau_size
        assert row["has_plateau"] == ident.rare_fit.has_plateau
        assert row["kappa"] == pytest.approx(ident.rare_fit.kappa, rel=1e-9)
        assert (row["group"], row["group_size"]) == (suite.group.name, suite.group.size)
        for claim in suite.claims.claims:
            assert row[f"{claim.key}_verdict"] == claim.verdict
            if claim.p_value is None:
                assert row[f"{claim.key}_p_value"] is None
            else:
                assert row[f"{claim.key}_p_value"] == pytest.approx(claim.p_value, rel=1e-5)


def test_rerun_does_no_work(setup: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    root: Path = setup["root"]
    run_manifest = root / "out/tasks/model-llama/run/manifest.json"
    before = run_manifest.read_bytes()

    def boom(*a: object, **k: object) -> None:
        raise AssertionError("identify must not be called for a complete task")

    monkeypatch.setattr(sweep_tasks, "identify", boom)
    again = run_sweep(setup["spec"], root / "out", cache_dir=root / "cache")
    assert [t.status for t in again.tasks] == ["reused", "reused"]
    assert run_manifest.read_bytes() == before
    sm = json.loads((root / "out/sweep_manifest.json").read_text())
    assert [t["status"] for t in sm["tasks"]] == ["reused", "reused"]
    assert sm["counts"]["reused"] == 2 and sm["analysis"]["routing"] is False
    # reuse needs the same config and the same analysis options
    task = setup["spec"].tasks[0]
    run_dir = root / "out/tasks/model-llama/run"
    assert is_done(task, run_dir, ANALYSIS)
    assert not is_done(task, run_dir, AnalysisOptions(routing=False, tau=0.9))
    other = type(task)(task.name, task.model, None, make_config(
        overrides={**tiny_overrides(setup["llama"], setup["corpus"]), "seed": 1}))  # fmt: skip
    assert not is_done(other, run_dir, ANALYSIS)


def test_failed_task_is_recorded_and_retried_alone(
    setup: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    root: Path = setup["root"]
    missing = root / "later-model"
    sweep_file = root / "sweep-fail.toml"
    sweep_file.write_text(sweep_text(["model-llama", str(missing)], **sweep_shared(root)))
    spec = load_sweep(sweep_file)
    out = root / "out-fail"
    res = run_sweep(spec, out, cache_dir=root / "cache")
    assert [t.status for t in res.tasks] == ["complete", "failed"] and not res.ok
    failed = res.tasks[1]
    assert failed.error is not None and failed.error["type"] == "ModelLoadError"
    assert "does not exist" in failed.error["message"]
    tb = out / "tasks/later-model/traceback.txt"
    assert Path(failed.traceback or "") == tb and "Traceback" in tb.read_text()
    record = json.loads((out / "tasks/later-model/task.json").read_text())
    assert record["status"] == "failed" and record["seconds"] >= 0
    sm = json.loads((out / "sweep_manifest.json").read_text())
    assert sm["tasks"][1]["error"]["type"] == "ModelLoadError"
    assert sm["tasks"][1]["traceback"] == "tasks/later-model/traceback.txt"
    rows = pq.read_table(out / "sweep.parquet").to_pylist()
    assert [r["status"] for r in rows] == ["complete", "failed"]
    assert "ModelLoadError" in rows[1]["error"] and rows[1]["kappa"] is None

    shutil.copytree(setup["gpt2"], missing)  # fix the path
    calls: list[str] = []
    real = sweep_tasks.identify

    def counting(cfg: Any, *a: Any, **k: Any) -> Any:
        calls.append(cfg.model)
        return real(cfg, *a, **k)

    monkeypatch.setattr(sweep_tasks, "identify", counting)
    again = run_sweep(spec, out, cache_dir=root / "cache")
    assert calls == [str(missing)]
    assert [t.status for t in again.tasks] == ["reused", "complete"] and again.ok
    assert not tb.exists()
    assert [r["status"] for r in sweep_table(out).to_pylist()] == ["complete", "complete"]


def test_sweep_report_rebuilds_the_table(setup: dict[str, Any]) -> None:
    out: Path = setup["root"] / "out"
    original = pq.read_table(out / "sweep.parquet")
    for col in ("task", "model", "revision", "status", "seconds", "n_rare_positions",
                "plateau_size", "kappa", "coordination_verdict", "coordination_p_value",
                "spectra_verdict", "spatial_p_value"):  # fmt: skip
        assert col in original.column_names, col
    assert original.num_rows == 2
    (out / "sweep.parquet").unlink()
    write_sweep_table(out)
    assert pq.read_table(out / "sweep.parquet").equals(original)
    assert sweep_table(out).equals(original)


def test_revisions_lists_and_checkpoint_globs(tmp_path: Path) -> None:
    ckpts = tmp_path / "ckpts"
    for step in (10, 2, 100):
        (ckpts / f"checkpoint-{step}").mkdir(parents=True)
    (ckpts / "notes.txt").write_text("not a checkpoint")
    data = {
        "revisions": ["main"],
        "n_boot": 5,
        "models": [
            {"model": "EleutherAI/pythia-70m", "revisions": ["step1", "step143000"], "n_rare": 50},
            {"model": "ckpts", "revisions": ["checkpoint-*"]},
            {"model": "EleutherAI/pythia-160m", "name": "p160"},
        ],
    }
    spec = parse_sweep(data, tmp_path)
    names = [t.name for t in spec.tasks]
    assert names == ["pythia-70m@step1", "pythia-70m@step143000", "ckpts@checkpoint-2",
                     "ckpts@checkpoint-10", "ckpts@checkpoint-100", "p160@main"]  # fmt: skip
    hub = spec.tasks[0].config
    assert (hub.model, hub.revision, hub.n_rare, hub.n_boot) == (
        "EleutherAI/pythia-70m", "step1", 50, 5)  # fmt: skip
    ck = spec.tasks[2]
    assert ck.config.model == str((ckpts / "checkpoint-2").resolve()) and ck.config.revision is None
    assert ck.revision == "checkpoint-2"
    assert spec.tasks[5].config.revision == "main" and spec.tasks[5].config.n_rare == 600


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('n_rar = 5\n[[models]]\nmodel = "m"\n', "unknown setting 'n_rar'"),
        ('n_boot = "5"\n[[models]]\nmodel = "m"\n', "'n_boot' must be an integer"),
        ('[[models]]\nmodel = "m"\nwindow_lenn = 3\n', "unknown setting 'window_lenn'"),
        ("n_boot = 5\n", "no models"),
        ("models = []\n", "no models"),
        ('models = ["m"]\n', "array of tables"),
        ("[[models]]\nn_boot = 5\n", "needs model"),
        ('model = "m"\n[[models]]\nmodel = "m"\n', "'model' is not a shared setting"),
        ('[[models]]\nmodel = "m"\nrevision = "x"\n', "revisions = [...]"),
        ('[[models]]\nmodel = "m"\nrevisions = "x"\n', "non-empty array of strings"),
        ('[[models]]\nmodel = "."\nrevisions = ["nothing-*"]\n', "matches no directory"),
        ('[[models]]\nmodel = "hub/model"\nrevisions = ["step*"]\n', "needs a local model"),
        ('[[models]]\nmodel = "a/m"\n[[models]]\nmodel = "b/m"\n', "duplicate task name 'm'"),
        ('percentile = 150.0\n[[models]]\nmodel = "m"\n', "percentile must be in (0, 100)"),
        ('[analysis]\nrouting = "no"\n[[models]]\nmodel = "m"\n', "'routing' must be bool"),
        ('[analysis]\nroute = false\n[[models]]\nmodel = "m"\n', "unknown analysis option"),
        ("[[models]\n", "not valid TOML"),
    ],
)
def test_bad_sweep_files_are_config_errors(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "sweep.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_sweep(path)
    message = str(info.value)
    assert needle in message and "\n" not in message, message
    assert str(path) in message


def test_missing_sweep_file_and_unknown_executor(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="sweep file not found"):
        load_sweep(tmp_path / "nope.toml")
    spec = parse_sweep({"models": [{"model": "m"}]})
    with pytest.raises(ConfigError, match="unknown executor 'dask'; choose one of local, ray"):
        run_sweep(spec, tmp_path / "out", executor="dask")
    with pytest.raises(ConfigError, match=r"--address .* needs the ray executor"):
        run_sweep(spec, tmp_path / "out", address="auto")
    assert not (tmp_path / "out").exists()  # nothing created on a refused sweep


def test_cli_sweep_and_sweep_report(
    setup: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    root: Path = setup["root"]
    out = root / "out-cli"
    argv = ["sweep", str(setup["file"]), "--out", str(out), "--cache-dir", str(root / "cache"),
            "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "model-llama" in printed and "model-gpt2" in printed and "coordination" in printed
    table = pq.read_table(out / "sweep.parquet")
    assert table.column("status").to_pylist() == ["complete", "complete"]
    (out / "sweep.parquet").unlink()
    assert main(["sweep-report", str(out)]) == 0
    assert pq.read_table(out / "sweep.parquet").equals(table)
    assert "model-gpt2" in capsys.readouterr().out
    # a bad sweep file and a directory that is no sweep: one-line errors, exit code 2
    bad = root / "bad.toml"
    bad.write_text("n_boot = 5\n")
    assert main(["sweep", str(bad), "--out", str(root / "out-bad")]) == 2
    assert main(["sweep-report", str(root / "model-llama")]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "no models" in err and "not a raretoken sweep" in err
    assert "Traceback" not in err


def test_cli_sweep_with_a_failed_task_exits_1(
    setup: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    root: Path = setup["root"]
    sweep_file = root / "sweep-cli-fail.toml"
    sweep_file.write_text(sweep_text(["model-llama", str(root / "absent")], **sweep_shared(root)))
    out = root / "out-cli-fail"
    argv = ["sweep", str(sweep_file), "--out", str(out), "--cache-dir", str(root / "cache"),
            "--no-progress"]  # fmt: skip
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "1 of 2 tasks failed" in err


def test_task_log_takes_info_lines_without_changing_the_console(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import logging

    seen: list[str] = []

    class Console(logging.Handler):  # like logging.basicConfig's handler: no level of its own
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    top, pkg = logging.getLogger(), logging.getLogger("raretoken")
    console = Console()
    monkeypatch.setattr(top, "level", logging.WARNING)  # a quiet console (-q)
    top.addHandler(console)
    before = (pkg.level, pkg.propagate, list(pkg.handlers))
    logger = logging.getLogger("raretoken.sweep.test")
    try:
        assert pkg.getEffectiveLevel() == logging.WARNING
        with task_log(tmp_path / "log.txt"):
            logger.info("an info line")
            logger.warning("a warning line")
        logger.info("after the block")
        logger.warning("a second warning")
    finally:
        top.removeHandler(console)
    text = (tmp_path / "log.txt").read_text()
    assert "INFO raretoken.sweep.test: an info line" in text and "a warning line" in text
    assert "after the block" not in text and "a second warning" not in text
    assert seen == ["a warning line", "a second warning"]  # the console is unchanged
    assert (pkg.level, pkg.propagate, list(pkg.handlers)) == before
