"""Running a sweep's tasks: the local executor (one task after another, in-process).

Layout of a sweep directory::

    <out>/sweep_manifest.json      settings, every task's identity/config/status/timing/failure
    <out>/sweep.parquet            one row per task (see :mod:`raretoken.sweep.table`)
    <out>/tasks/<name>/task.json   the task's identity, config and last outcome
    <out>/tasks/<name>/run/        its run directory, exactly what ``raretoken run`` writes
    <out>/tasks/<name>/traceback.txt   only while the task's last attempt failed

A task whose run directory is ``complete`` with the task's configuration and analysis options
is reused without work; a failed task is recorded and the others go on; rerunning a sweep
therefore retries only what failed or is missing.
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..run import AnalysisOptions, analyze, identify
from ..run.manifest import MANIFEST, now_iso, package_versions, read_status
from ..storage import atomic_write_json, atomic_write_text
from .spec import SweepSpec, SweepTask
from .table import write_sweep_table

log = logging.getLogger(__name__)

SWEEP_MANIFEST = "sweep_manifest.json"
SWEEP_SCHEMA = 1
TASK_FILE = "task.json"
TRACEBACK = "traceback.txt"
EXECUTORS = ("local",)


@dataclass(frozen=True)
class TaskResult:
    """Outcome of one task in one sweep invocation.

    ``status``: ``complete`` (ran now), ``reused`` (already complete) or ``failed``.
    """

    name: str
    model: str
    revision: str | None
    status: str
    seconds: float
    run_dir: str
    error: dict[str, str] | None = None
    traceback: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TaskResult:
        return cls(**d)


@dataclass(frozen=True)
class SweepResult:
    """Every task's outcome, and where the sweep wrote its files."""

    out_dir: str
    tasks: tuple[TaskResult, ...]

    def count(self, status: str) -> int:
        return sum(t.status == status for t in self.tasks)

    @property
    def ok(self) -> bool:
        return self.count("failed") == 0

    def to_dict(self) -> dict[str, Any]:
        return {"out_dir": self.out_dir, "tasks": [t.to_dict() for t in self.tasks]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SweepResult:
        return cls(
            out_dir=str(d["out_dir"]), tasks=tuple(TaskResult.from_dict(t) for t in d["tasks"])
        )


def _json(x: Any) -> Any:
    return json.loads(json.dumps(x))


def resolved_options(options: AnalysisOptions, task: SweepTask) -> dict[str, Any]:
    """The analysis options as the run's manifest records them (``None`` taken from the config)."""
    return _json(asdict(options.resolved_for(task.config)))


def is_done(task: SweepTask, run_dir: Path, options: AnalysisOptions) -> bool:
    """Whether ``run_dir`` holds this task's finished run (same config and analysis options)."""
    if read_status(run_dir) != "complete":
        return False
    try:
        manifest = json.loads((run_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    stage = manifest.get("stages", {}).get("analyses", {})
    return bool(
        manifest.get("config") == _json(task.config.to_dict())
        and stage.get("options") == resolved_options(options, task)
    )


def run_task(
    task: SweepTask,
    task_dir: Path,
    options: AnalysisOptions,
    *,
    index: int = 0,
    cache_dir: Path | str | None = None,
    no_cache: bool = False,
    progress: bool = False,
) -> TaskResult:
    """Identify + analyze one task into ``task_dir/run`` (or reuse it); never raises on failure
    of the task itself (the error is recorded), except for ``KeyboardInterrupt``."""
    run_dir = task_dir / "run"
    tb_file = task_dir / TRACEBACK
    record_file = task_dir / TASK_FILE

    def result(status: str, seconds: float, **failure: Any) -> TaskResult:
        return TaskResult(task.name, task.model, task.revision, status, seconds, str(run_dir),
                          **failure)  # fmt: skip

    if is_done(task, run_dir, options):
        old: dict[str, Any] = {}
        if record_file.exists():
            try:
                old = json.loads(record_file.read_text())
            except (OSError, ValueError):
                old = {}
        seconds = old.get("seconds") if old.get("status") == "complete" else None
        if (old.get("status"), old.get("index"), old.get("config")) != (
            "complete",
            index,
            _json(task.config.to_dict()),
        ):
            _write_record(record_file, task, options, index, "complete", seconds, None)
        log.info("task %s: reusing its complete run directory", task.name)
        return result("reused", float(seconds or 0.0))

    task_dir.mkdir(parents=True, exist_ok=True)
    log.info("task %s: identify + analyze into %s", task.name, run_dir)
    t0 = time.perf_counter()
    try:
        ident = identify(
            task.config, run_dir, cache_dir=cache_dir, no_cache=no_cache, overwrite=True,
            progress=progress,
        )  # fmt: skip
        analyze(ident, options, cache_dir=cache_dir, no_cache=no_cache, progress=progress)
    except Exception as exc:  # recorded; the other tasks go on
        seconds = round(time.perf_counter() - t0, 3)
        message = str(exc).splitlines()[0] if str(exc) else ""
        error = {"type": type(exc).__name__, "message": message}
        atomic_write_text(tb_file, traceback.format_exc())
        _write_record(record_file, task, options, index, "failed", seconds, error)
        log.error("task %s failed after %.1f s: %s: %s", task.name, seconds, error["type"], message)
        return result("failed", seconds, error=error, traceback=str(tb_file))
    seconds = round(time.perf_counter() - t0, 3)
    tb_file.unlink(missing_ok=True)
    _write_record(record_file, task, options, index, "complete", seconds, None)
    return result("complete", seconds)


def _write_record(
    path: Path,
    task: SweepTask,
    options: AnalysisOptions,
    index: int,
    status: str,
    seconds: float | None,
    error: dict[str, str] | None,
) -> None:
    atomic_write_json(path, {
        "schema_version": SWEEP_SCHEMA, "index": index, **task.to_dict(),
        "analysis": resolved_options(options, task), "status": status, "seconds": seconds,
        "error": error, "traceback": TRACEBACK if error else None, "finished": now_iso(),
    })  # fmt: skip


def _write_manifest(out: Path, spec: SweepSpec, results: list[TaskResult], started: str) -> None:
    by_name = {r.name: r for r in results}
    tasks = []
    for t in spec.tasks:
        r = by_name.get(t.name)
        tasks.append({
            **t.to_dict(), "task_dir": f"tasks/{t.name}", "run_dir": f"tasks/{t.name}/run",
            "status": r.status if r else "pending", "seconds": r.seconds if r else None,
            "error": r.error if r else None,
            "traceback": f"tasks/{t.name}/{TRACEBACK}" if r and r.traceback else None,
        })  # fmt: skip
    atomic_write_json(out / SWEEP_MANIFEST, {
        "schema_version": SWEEP_SCHEMA, "source": spec.source, "started": started,
        "updated": now_iso(), "executor": "local", "settings": spec.settings,
        "analysis": asdict(spec.analysis), "versions": package_versions(),
        "counts": {s: sum(x["status"] == s for x in tasks)
                   for s in ("complete", "reused", "failed", "pending")},
        "tasks": tasks,
    })  # fmt: skip


def run_sweep(
    spec: SweepSpec,
    out_dir: Path | str,
    *,
    executor: str = "local",
    cache_dir: Path | str | None = None,
    no_cache: bool = False,
    progress: bool = False,
) -> SweepResult:
    """Run every task of ``spec`` (reusing the complete ones) and write the sweep's files."""
    if executor not in EXECUTORS:
        raise ConfigError(f"unknown executor {executor!r}; choose one of {', '.join(EXECUTORS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = now_iso()
    results: list[TaskResult] = []
    _write_manifest(out, spec, results, started)
    for i, task in enumerate(spec.tasks):
        results.append(run_task(task, out / "tasks" / task.name, spec.analysis, index=i,
                                cache_dir=cache_dir, no_cache=no_cache, progress=progress))  # fmt: skip
        _write_manifest(out, spec, results, started)
    write_sweep_table(out, [t.name for t in spec.tasks])
    return SweepResult(out_dir=str(out), tasks=tuple(results))
