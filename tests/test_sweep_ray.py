"""The Ray executor on a real local Ray cluster (2 CPUs): the same numbers as the local
executor, two tasks at once, failures, reuse, worker death, logs, shared work, bad input."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from pipeline_fixtures import sweep_shared, sweep_text, tiny_setup
from raretoken.cli import main
from raretoken.errors import ConfigError
from raretoken.sweep import SweepSpec, load_sweep, parse_sweep, run_sweep
from raretoken.sweep.executors import Job, RayExecutor
from raretoken.sweep.records import TaskResult, iso, run_sharing, shared_work
from raretoken.sweep.tasks import record_failure

ray = pytest.importorskip("ray", reason="the ray extra is not installed")


def _overlap(a: dict[str, Any], b: dict[str, Any]) -> float:
    return min(a["ended_at"], b["ended_at"]) - max(a["started_at"], b["started_at"])


@pytest.fixture(scope="module")
def cluster() -> Iterator[RayExecutor]:
    """One local 2-CPU cluster for the module, started (and shut down) by the executor."""
    with RayExecutor(num_cpus=2) as ex:
        assert ray.is_initialized() and ray.cluster_resources()["CPU"] == 2
        yield ex
    assert not ray.is_initialized()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, cluster: RayExecutor) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("sweep-ray")
    llama, _ = tiny_setup(root, "llama")
    gpt2, _ = tiny_setup(root, "gpt2")
    sweep_file = root / "sweep.toml"
    sweep_file.write_text(sweep_text(["model-llama", "model-gpt2"], **sweep_shared(root)))
    spec = load_sweep(sweep_file)
    local = run_sweep(spec, root / "out-local", cache_dir=root / "cache-local")
    remote = run_sweep(spec, root / "out-ray", executor="ray", max_parallel=2,
                       cache_dir=root / "cache-ray")  # fmt: skip
    return {"root": root, "spec": spec, "file": sweep_file, "local": local, "ray": remote,
            "llama": llama, "gpt2": gpt2}  # fmt: skip


def _manifest(out: Path) -> dict[str, Any]:
    return json.loads((out / "sweep_manifest.json").read_text())


def test_ray_gives_the_numbers_of_the_local_executor(setup: dict[str, Any]) -> None:
    root: Path = setup["root"]
    assert [t.status for t in setup["local"].tasks] == ["complete", "complete"]
    assert [t.status for t in setup["ray"].tasks] == ["complete", "complete"]
    a = pq.read_table(root / "out-local/sweep.parquet")
    b = pq.read_table(root / "out-ray/sweep.parquet")
    assert a.column_names == b.column_names and a.num_rows == 2
    assert "kappa" in a.column_names and any(c.endswith("_p_value") for c in a.column_names)
    for col in a.column_names:
        if col != "seconds":
            assert a.column(col).to_pylist() == b.column(col).to_pylist(), col
    for task in setup["spec"].tasks:
        run_a, run_b = (root / o / "tasks" / task.name / "run" for o in ("out-local", "out-ray"))
        assert pq.read_table(run_a / "neurons.parquet").equals(
            pq.read_table(run_b / "neurons.parquet")
        )
        claims = "analyses/claims.csv"
        assert (run_a / claims).read_text() == (run_b / claims).read_text()


def test_two_workers_run_two_tasks_at_once(setup: dict[str, Any]) -> None:
    root: Path = setup["root"]
    sm = _manifest(root / "out-ray")
    assert (sm["executor"], sm["address"], sm["max_parallel"]) == ("ray", None, 2)
    assert sm["cpus_per_task"] == 1.0 and sm["counts"]["complete"] == 2
    a, b = sm["tasks"]
    assert {a["pid"], b["pid"]}.isdisjoint({os.getpid()}) and a["pid"] != b["pid"]
    assert _overlap(a, b) > 0, (a, b)  # both were running at the same time
    for t in (a, b):
        assert t["ended_at"] > t["started_at"] and t["host"]
        assert (t["started"], t["ended"]) == (iso(t["started_at"]), iso(t["ended_at"]))
        record = json.loads((root / "out-ray" / t["task_dir"] / "task.json").read_text())
        for key in ("started", "ended", "started_at", "ended_at", "host", "pid", "status"):
            assert record[key] == t[key], key
    local = _manifest(root / "out-local")
    assert (local["executor"], local["max_parallel"]) == ("local", 1)
    x, y = local["tasks"]
    assert x["pid"] == y["pid"] == os.getpid() and _overlap(x, y) <= 0  # one after another


def test_each_task_logs_into_its_directory(setup: dict[str, Any]) -> None:
    root: Path = setup["root"]
    for out in ("out-local", "out-ray"):
        for t in _manifest(root / out)["tasks"]:
            text = (root / out / t["log"]).read_text()
            assert f"task {t['name']}: identify + analyze" in text, out
            assert f"pid {t['pid']}" in text and f"task {t['name']}: complete in" in text
            other = next(n for n in ("model-llama", "model-gpt2") if n != t["name"])
            assert f"task {other}:" not in text  # only this task's lines


def test_shared_work_is_read_from_the_run_manifests(setup: dict[str, Any]) -> None:
    root: Path = setup["root"]
    for out in ("out-local", "out-ray"):
        sm = _manifest(root / out)
        expected = []
        for t in sm["tasks"]:
            run = json.loads((root / out / t["run_dir"] / "manifest.json").read_text())
            tok = run.get("identity", {}).get("tokenizer") or {}
            assert t["tokenizer_sha256"] == tok.get("sha256")
            for key, stage in (("token_statistics", "token_statistics"), ("windows", "sampling")):
                flag = run["stages"][stage].get("cached")
                assert t[key] == (None if flag is None else "reused" if flag else "computed")
            expected.append(t)
        assert sm["shared_work"] == shared_work(expected)


def test_parallel_tasks_compute_shared_stages_once_per_tokenizer(setup: dict[str, Any]) -> None:
    """Under Ray the driver computes token statistics and windows before dispatching tasks
    in parallel: each tokenizer's are computed exactly once in the whole sweep."""
    root: Path = setup["root"]
    sm = _manifest(root / "out-ray")
    prepared = sm["prepared_by_driver"]
    assert prepared["failed"] == 0
    tokenizers = sm["shared_work"]["tokenizers"]
    assert tokenizers >= 1
    # the driver computed each tokenizer's once; the parallel tasks only read them
    assert prepared["token_statistics_computed"] == tokenizers
    assert prepared["windows_computed"] == tokenizers
    assert [t["token_statistics"] for t in sm["tasks"]] == ["reused"] * len(sm["tasks"])
    assert [t["windows"] for t in sm["tasks"]] == ["reused"] * len(sm["tasks"])
    assert "prepared_by_driver" not in _manifest(root / "out-local")  # one after another


def test_shared_work_known_answer(tmp_path: Path) -> None:
    def run(name: str, sha: str | None, stats: bool | None, windows: bool | None) -> Path:
        d = tmp_path / name
        d.mkdir()
        stages: dict[str, Any] = {"token_statistics": {}, "sampling": {}}
        if stats is not None:
            stages["token_statistics"]["cached"] = stats
        if windows is not None:
            stages["sampling"]["cached"] = windows
        identity = {"tokenizer": {"sha256": sha, "vocab_size": 10}} if sha else {}
        (d / "manifest.json").write_text(json.dumps({"identity": identity, "stages": stages}))
        return d

    entries = [run_sharing(run("a", "t1", False, False)), run_sharing(run("b", "t1", True, True)),
               run_sharing(run("c", "t2", False, True)), run_sharing(run("d", None, None, None)),
               run_sharing(tmp_path / "missing")]  # fmt: skip
    assert entries[0] == {"tokenizer_sha256": "t1", "token_statistics": "computed",
                          "windows": "computed"}  # fmt: skip
    assert entries[3] == entries[4] == dict.fromkeys(entries[0])
    assert shared_work(entries) == {"tokenizers": 2, "token_statistics_computed": 2,
                                    "token_statistics_reused": 1, "windows_computed": 1,
                                    "windows_reused": 2}  # fmt: skip


def test_failure_in_a_ray_task_is_recorded_and_the_rerun_reuses(setup: dict[str, Any]) -> None:
    root: Path = setup["root"]
    missing = root / "later-model"
    sweep_file = root / "sweep-fail.toml"
    sweep_file.write_text(sweep_text(["model-llama", str(missing)], **sweep_shared(root)))
    spec = load_sweep(sweep_file)
    out = root / "out-ray-fail"
    res = run_sweep(spec, out, executor="ray", cache_dir=root / "cache-ray")
    assert [t.status for t in res.tasks] == ["complete", "failed"] and not res.ok
    err = res.tasks[1].error
    assert (
        err is not None and err["type"] == "ModelLoadError" and "does not exist" in err["message"]
    )
    assert "Traceback" in (out / "tasks/later-model/traceback.txt").read_text()
    sm = _manifest(out)
    assert sm["counts"] == {"complete": 1, "reused": 0, "failed": 1, "pending": 0}
    assert sm["tasks"][1]["pid"] != os.getpid()  # failed in a worker, recorded there
    assert "ModelLoadError" in (out / "tasks/later-model/log.txt").read_text()

    shutil.copytree(setup["gpt2"], missing)
    kept = (out / "tasks/model-llama/run/manifest.json").read_bytes()
    again = run_sweep(spec, out, executor="ray", cache_dir=root / "cache-ray")
    assert [t.status for t in again.tasks] == ["reused", "complete"] and again.ok
    assert (out / "tasks/model-llama/run/manifest.json").read_bytes() == kept
    assert not (out / "tasks/later-model/traceback.txt").exists()
    sm2 = _manifest(out)
    # a reused task keeps the timings of the attempt that produced it
    assert sm2["tasks"][0]["started_at"] == sm["tasks"][0]["started_at"]


def test_a_dead_worker_is_retried_and_then_recorded(tmp_path: Path, cluster: RayExecutor) -> None:
    marker = tmp_path / "attempts"
    marker.mkdir()

    def crash_once(name: str) -> TaskResult:
        import os as _os

        from raretoken.sweep.records import TaskResult as Result

        n = len(list(marker.iterdir()))
        (marker / str(n)).touch()
        if n == 0 or name == "always":
            _os._exit(1)  # the worker process dies
        return Result(name, "m", None, "complete", 0.0, "", pid=_os.getpid())

    got: dict[str, Any] = {}

    def on_error(job: Job, exc: BaseException, tb: str) -> TaskResult:
        got["error"] = (job.name, type(exc).__name__, tb)
        return TaskResult(job.name, "m", None, "failed", 0.0, "")

    jobs = [Job(0, "once", "cpu", {"name": "once"})]
    with RayExecutor(max_retries=1) as ex:
        ex.run(crash_once, jobs, lambda j, r: got.__setitem__(j.name, r), on_error)
    assert got["once"].status == "complete" and len(list(marker.iterdir())) == 2
    with RayExecutor(max_retries=0) as ex:
        ex.run(crash_once, [Job(0, "always", "cpu", {"name": "always"})],
               lambda j, r: got.__setitem__(j.name, r), on_error)  # fmt: skip
    assert got["always"].status == "failed" and got["error"][1] == "WorkerCrashedError"
    assert ray.is_initialized()  # the module's cluster: used, not shut down


def test_record_failure_writes_what_run_task_writes(setup: dict[str, Any], tmp_path: Path) -> None:
    spec: SweepSpec = setup["spec"]
    res = record_failure(spec.tasks[0], tmp_path / "t", spec.analysis, 0,
                         RuntimeError("worker died\nmore"), "Traceback: ...")  # fmt: skip
    assert res.status == "failed" and res.error == {
        "type": "RuntimeError",
        "message": "worker died",
    }
    rec = json.loads((tmp_path / "t/task.json").read_text())
    assert rec["status"] == "failed" and rec["traceback"] == "traceback.txt"
    assert "did not finish: RuntimeError: worker died" in (tmp_path / "t/log.txt").read_text()


def test_resources_of_a_task() -> None:
    ex = RayExecutor(cpus_per_task=2, max_retries=3)
    assert ex.resources(Job(0, "a", "cuda", {})) == {
        "num_cpus": 2.0, "num_gpus": 1, "max_retries": 3, "retry_exceptions": False}  # fmt: skip
    assert ex.resources(Job(0, "a", "cpu", {}))["num_gpus"] == 0
    assert ex.resources(Job(0, "a", "auto", {}))["num_gpus"] == 0


def test_cli_sweep_under_ray_with_a_flag_override(
    setup: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    root: Path = setup["root"]
    one = root / "sweep-one.toml"
    one.write_text(sweep_text(["model-llama"], **sweep_shared(root)))
    out = root / "out-cli-ray"
    argv = ["sweep", str(one), "--out", str(out), "--executor", "ray", "--max-parallel", "1",
            "--cache-dir", str(root / "cache-ray"), "--no-progress", "--n-random-groups", "4"]  # fmt: skip
    assert main(argv) == 0
    assert "model-llama" in capsys.readouterr().out
    sm = _manifest(out)
    assert (sm["executor"], sm["max_parallel"], sm["settings"]["n_random_groups"]) == ("ray", 1, 4)
    assert sm["tasks"][0]["config"]["n_random_groups"] == 4
    run = json.loads((out / "tasks/model-llama/run/manifest.json").read_text())
    assert (
        run["config"]["n_random_groups"] == 4
        and run["stages"]["analyses"]["options"]["n_random"] == 4
    )


def _one_line(capsys: pytest.CaptureFixture[str], needle: str) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and needle in err[0], err


def test_unreachable_address_is_a_quick_one_line_error(
    setup: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    root: Path = setup["root"]
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=r"cannot reach the Ray cluster at '127\.0\.0\.1:1'"):
        run_sweep(setup["spec"], root / "out-nowhere", executor="ray", address="127.0.0.1:1")
    assert time.perf_counter() - t0 < 10 and not (root / "out-nowhere").exists()
    with pytest.raises(ConfigError, match="is not 'auto', HOST:PORT"):
        run_sweep(setup["spec"], root / "out-nowhere", executor="ray", address="nohost")
    argv = ["sweep", str(setup["file"]), "--out", str(root / "out-nowhere"), "--executor", "ray",
            "--address", "ray://127.0.0.1:1"]  # fmt: skip
    assert main(argv) == 2
    _one_line(capsys, "cannot reach the Ray cluster at 'ray://127.0.0.1:1'")


def test_ray_address_variable_is_used_and_recorded(
    setup: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """RAY_ADDRESS without --address: Ray would join that cluster, so the executor does so
    openly (checked, named in the error, recorded), never a silent 'local' in the manifest."""
    root: Path = setup["root"]
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    ex = RayExecutor()
    assert (ex.address, ex.settings()["address_source"]) == ("127.0.0.1:1", "RAY_ADDRESS")
    with pytest.raises(ConfigError, match=r"127\.0\.0\.1:1.*comes from RAY_ADDRESS"):
        run_sweep(setup["spec"], root / "out-env", executor="ray")
    assert not (root / "out-env").exists()
    monkeypatch.delenv("RAY_ADDRESS")
    local = RayExecutor().settings()
    assert (local["address"], local["address_source"]) == (None, None)
    assert RayExecutor("auto").settings()["address_source"] == "argument"


def test_ray_not_installed(
    setup: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root: Path = setup["root"]
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'raretoken\[ray\]'"):
        run_sweep(setup["spec"], root / "out-noray", executor="ray")
    argv = ["sweep", str(setup["file"]), "--out", str(root / "out-noray"), "--executor", "ray"]
    assert main(argv) == 2
    _one_line(capsys, "pip install 'raretoken[ray]'")
    assert not (root / "out-noray").exists()


def test_infeasible_resources_and_bad_options(setup: dict[str, Any]) -> None:
    root: Path = setup["root"]
    gpu = parse_sweep({"device": "cuda", "models": [{"model": str(setup["llama"])}]})
    with pytest.raises(ConfigError, match="asks for 1 GPU but the Ray cluster has 0"):
        run_sweep(gpu, root / "out-gpu", executor="ray")
    with pytest.raises(ConfigError, match="asks for 4 CPU but the Ray cluster has 2"):
        run_sweep(gpu, root / "out-gpu", executor="ray", cpus_per_task=4)
    for bad in ({"max_parallel": 0}, {"cpus_per_task": 0}, {"max_retries": -1}):
        with pytest.raises(ConfigError, match="must be"):
            run_sweep(gpu, root / "out-gpu", executor="ray", **bad)  # type: ignore[arg-type]
    assert not (root / "out-gpu").exists()  # refused before anything was written


def test_a_directory_of_another_sweep_is_refused_without_overwrite(
    setup: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    root: Path = setup["root"]
    out = root / "out-local"
    before = _manifest(out)
    text = sweep_text(["model-llama"], **{**sweep_shared(root), "n_boot": 6})
    (root / "other.toml").write_text(text)
    other = load_sweep(root / "other.toml")
    with pytest.raises(ConfigError, match="holds another sweep \\(its settings differ\\)"):
        run_sweep(other, out, cache_dir=root / "cache-local")
    assert _manifest(out) == before  # untouched
    (root / "other2.toml").write_text(
        sweep_text(["model-llama"], "tau = 0.9", **sweep_shared(root))
    )
    with pytest.raises(ConfigError, match="its analysis differ"):
        run_sweep(load_sweep(root / "other2.toml"), out)
    argv = ["sweep", str(root / "other.toml"), "--out", str(out), "--no-progress"]
    assert main(argv) == 2
    _one_line(capsys, "--overwrite")
    # the same sweep with a model fewer: the same sweep (reused)
    fewer = root / "fewer.toml"
    fewer.write_text(sweep_text(["model-llama"], **sweep_shared(root)))
    again = run_sweep(load_sweep(fewer), out, cache_dir=root / "cache-local")
    assert [t.status for t in again.tasks] == ["reused"]
    # overwrite: the other sweep runs there
    res = run_sweep(other, out, cache_dir=root / "cache-local", overwrite=True)
    assert [t.status for t in res.tasks] == ["complete"]
    assert _manifest(out)["settings"]["n_boot"] == 6
