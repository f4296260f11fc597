"""Running a sweep's tasks, under the ``local`` or the ``ray`` executor.

Layout of a sweep directory::

    <out>/sweep_manifest.json      settings, executor, every task's identity/config/status/
                                   timing/host/failure, shared work (see :mod:`.records`)
    <out>/sweep.parquet            one row per task (see :mod:`raretoken.sweep.table`)
    <out>/tasks/<name>/task.json   the task's identity, config and last outcome
    <out>/tasks/<name>/log.txt     the task's log lines (INFO and above), every attempt appended
    <out>/tasks/<name>/run/        its run directory, exactly what ``raretoken run`` writes
    <out>/tasks/<name>/traceback.txt   only while the task's last attempt failed

A task whose run directory is ``complete`` with the task's configuration and analysis options
is reused without work; a failed task is recorded and the others go on; rerunning a sweep
therefore retries only what failed or is missing. The driver rewrites ``sweep_manifest.json``
as each task finishes, so a Ctrl-C or a dead worker loses nothing that finished.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
import traceback
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..report import write_run_report, write_sweep_report
from ..run import AnalysisOptions, analyze, identify
from ..run.identification import prepare_shared
from ..run.manifest import MANIFEST, now_iso, read_status
from ..storage import atomic_write_text
from .executors import EXECUTORS, Job, make_executor
from .outputs import ABOUT, write_sweep_outputs
from .records import (
    LOG_FILE,
    SWEEP_MANIFEST,
    TASK_FILE,
    TRACEBACK,
    SweepResult,
    TaskResult,
    as_json,
    check_sweep_dir,
    iso,
    read_json,
    resolved_options,
    run_sharing,
    write_sweep_manifest,
    write_task_record,
)
from .spec import SweepSpec, SweepTask

__all__ = ["EXECUTORS", "SWEEP_MANIFEST", "SweepResult", "TaskResult", "is_done",
           "record_failure", "run_sweep", "run_task", "task_log", "write_outputs"]  # fmt: skip

log = logging.getLogger(__name__)

_TIMING = ("started", "ended", "started_at", "ended_at", "host", "pid")
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def is_done(task: SweepTask, run_dir: Path, options: AnalysisOptions) -> bool:
    """Whether ``run_dir`` holds this task's finished run (same config and analysis options)."""
    if read_status(run_dir) != "complete":
        return False
    manifest = read_json(run_dir / MANIFEST)
    stage = manifest.get("stages", {}).get("analyses", {})
    return bool(
        manifest.get("config") == as_json(task.config.to_dict())
        and stage.get("options") == resolved_options(options, task)
    )


class _Forward(logging.Handler):
    """Passes records on to ``target``'s handlers (those at or above this handler's level)."""

    def __init__(self, target: logging.Logger, level: int) -> None:
        super().__init__(level)
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        self.target.handle(record)


@contextlib.contextmanager
def task_log(path: Path) -> Iterator[None]:
    """Append the ``raretoken`` loggers' records (INFO and above) to ``path`` inside the block.

    Where the loggers were quieter than INFO (``-q``, or a Ray worker), the extra INFO records
    go to the file only: what reaches the other handlers is unchanged.
    """
    logger = logging.getLogger("raretoken")
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter(_FORMAT))
    level, propagate, effective = logger.level, logger.propagate, logger.getEffectiveLevel()
    forward = None
    if effective > logging.INFO:
        logger.setLevel(logging.INFO)
        if propagate and logger.parent is not None:
            forward = _Forward(logger.parent, effective)
            logger.addHandler(forward)
            logger.propagate = False
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()
        if forward is not None:
            logger.removeHandler(forward)
        logger.setLevel(level)
        logger.propagate = propagate


def _reuse(
    task: SweepTask, run_dir: Path, record_file: Path, options: AnalysisOptions, index: int
) -> TaskResult:
    old = read_json(record_file)
    same = old.get("status") == "complete"
    timing = {k: old.get(k) for k in _TIMING} if same else {}
    res = TaskResult(task.name, task.model, task.revision, "reused",
                     float(old.get("seconds") or 0.0) if same else 0.0, str(run_dir),
                     **timing, **run_sharing(run_dir))  # fmt: skip
    if (old.get("status"), old.get("index"), old.get("config")) != (
        "complete", index, as_json(task.config.to_dict())
    ):  # fmt: skip
        write_task_record(record_file, task, options, index, replace(res, status="complete"))
    log.info("task %s: reusing its complete run directory", task.name)
    return res


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
    of the task itself (the error is recorded), except for ``KeyboardInterrupt``.

    Runs wherever the executor puts it (this process, or a Ray worker): it records its own
    start/end times, host and pid in ``task.json`` and its log lines in ``log.txt``.
    """
    run_dir = task_dir / "run"
    tb_file = task_dir / TRACEBACK
    record_file = task_dir / TASK_FILE
    if is_done(task, run_dir, options):
        reused = _reuse(task, run_dir, record_file, options, index)
        if not (run_dir / "report.html").exists():
            _write_report(run_dir)
        return reused

    task_dir.mkdir(parents=True, exist_ok=True)
    host, pid = socket.gethostname(), os.getpid()
    error: dict[str, str] | None = None
    with task_log(task_dir / LOG_FILE):
        t0, p0 = round(time.time(), 3), time.perf_counter()
        log.info("task %s: identify + analyze into %s (host %s, pid %d)", task.name, run_dir,
                 host, pid)  # fmt: skip
        try:
            ident = identify(
                task.config, run_dir, cache_dir=cache_dir, no_cache=no_cache, overwrite=True,
                progress=progress,
            )  # fmt: skip
            analyze(ident, options, cache_dir=cache_dir, no_cache=no_cache, progress=progress)
        except Exception as exc:  # recorded; the other tasks go on
            message = str(exc).splitlines()[0] if str(exc) else ""
            error = {"type": type(exc).__name__, "message": message}
            atomic_write_text(tb_file, traceback.format_exc())
        _write_report(run_dir)
        t1, seconds = round(time.time(), 3), round(time.perf_counter() - p0, 3)
        if error is not None:
            log.error("task %s failed after %.1f s: %s: %s", task.name, seconds, error["type"],
                      error["message"])  # fmt: skip
        else:
            log.info("task %s: complete in %.1f s", task.name, seconds)
    timing: dict[str, Any] = {"started": iso(t0), "ended": iso(t1), "started_at": t0,
                              "ended_at": t1, "host": host, "pid": pid}  # fmt: skip
    if error is not None:
        res = TaskResult(task.name, task.model, task.revision, "failed", seconds, str(run_dir),
                         error=error, traceback=str(tb_file), **timing)  # fmt: skip
    else:
        tb_file.unlink(missing_ok=True)
        res = TaskResult(task.name, task.model, task.revision, "complete", seconds, str(run_dir),
                         **timing, **run_sharing(run_dir))  # fmt: skip
    write_task_record(record_file, task, options, index, res)
    return res


def record_failure(
    task: SweepTask,
    task_dir: Path,
    options: AnalysisOptions,
    index: int,
    exc: BaseException,
    tb: str,
) -> TaskResult:
    """Record a task that did not return (its worker died, it was cancelled): written by the
    driver, as :func:`run_task` records a task that raised."""
    task_dir.mkdir(parents=True, exist_ok=True)
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    error = {"type": type(exc).__name__, "message": message}
    tb_file = task_dir / TRACEBACK
    atomic_write_text(tb_file, tb)
    with open(task_dir / LOG_FILE, "a", encoding="utf-8") as fh:
        fh.write(f"{now_iso()} ERROR driver: task {task.name} did not finish: "
                 f"{error['type']}: {message}\n")  # fmt: skip
    res = TaskResult(task.name, task.model, task.revision, "failed", 0.0,
                     str(task_dir / "run"), error=error, traceback=str(tb_file))  # fmt: skip
    write_task_record(task_dir / TASK_FILE, task, options, index, res)
    return res


def write_outputs(out_dir: Path | str, names: list[str] | None = None) -> dict[str, Path]:
    """Write the sweep's cross-run outputs from its task directories: ``sweep.parquet``,
    ``tables/``, ``figures/``, ``notes.md`` and ``report.html``.

    The one call site of the cross-run writers (``run_sweep`` and ``raretoken sweep-report``);
    returns the written files by path relative to ``out_dir``.
    """
    written = write_sweep_outputs(out_dir, names)
    written["report.html"] = write_sweep_report(out_dir, captions=ABOUT)
    return written


def _write_report(run_dir: Path) -> None:
    """The run's ``report.html``; a report that cannot be written is a warning, not a failed
    task (the run directory itself is complete)."""
    if not (run_dir / MANIFEST).exists():
        return
    try:
        write_run_report(run_dir)
    except Exception as exc:
        log.warning("could not write %s/report.html: %s: %s", run_dir, type(exc).__name__, exc)


def _prepare_shared(spec: SweepSpec, out: Path, cache: Path | None) -> dict[str, int]:
    """Token statistics and windows of every unfinished task, computed in the driver before
    parallel dispatch, so tasks sharing a tokenizer compute them once (one after another they
    would anyway; at once each would). A task whose inputs fail here is left to fail, and be
    recorded, in its worker."""
    counts = {"token_statistics_computed": 0, "windows_computed": 0, "failed": 0}
    for task in spec.tasks:
        if is_done(task, out / "tasks" / task.name / "run", spec.analysis):
            continue
        try:
            got = prepare_shared(task.config, cache_dir=cache)
        except Exception as exc:  # the task itself will record it
            counts["failed"] += 1
            log.warning("sweep: could not prepare %s's token statistics (%s: %s); its task will "
                        "retry", task.name, type(exc).__name__, exc)  # fmt: skip
            continue
        counts["token_statistics_computed"] += got["token_statistics"] == "computed"
        counts["windows_computed"] += got["windows"] == "computed"
    log.info("sweep: token statistics computed %d times, windows %d times, before dispatch",
             counts["token_statistics_computed"], counts["windows_computed"])  # fmt: skip
    return counts


def run_sweep(
    spec: SweepSpec,
    out_dir: Path | str,
    *,
    executor: str = "local",
    address: str | None = None,
    max_parallel: int | None = None,
    cpus_per_task: float = 1.0,
    max_retries: int = 2,
    num_cpus: int | None = None,
    overwrite: bool = False,
    cache_dir: Path | str | None = None,
    no_cache: bool = False,
    progress: bool = False,
) -> SweepResult:
    """Run every task of ``spec`` (reusing the complete ones) and write the sweep's files.

    ``executor``: ``"local"`` (one task after another in this process) or ``"ray"`` (Ray Core
    tasks; ``address`` of an existing cluster, else a local one with ``num_cpus`` CPUs, default
    all; ``max_parallel`` tasks in flight, default as many as the cluster fits;
    ``cpus_per_task``; ``max_retries`` on worker death). See :mod:`raretoken.sweep.executors`.
    A directory holding another sweep (other settings or analysis options) is refused unless
    ``overwrite``.
    """
    ex = make_executor(executor, address=address, max_parallel=max_parallel,
                       cpus_per_task=cpus_per_task, max_retries=max_retries,
                       num_cpus=num_cpus)  # fmt: skip
    out = Path(out_dir).absolute()  # workers may run elsewhere (another cwd, another node)
    cache = Path(cache_dir).absolute() if cache_dir is not None else None
    check_sweep_dir(out, spec, overwrite=overwrite)
    common = {"options": spec.analysis, "cache_dir": cache, "no_cache": no_cache,
              "progress": progress and ex.name == "local"}  # fmt: skip
    kwargs = [{"task": t, "task_dir": out / "tasks" / t.name, "index": i, **common}
              for i, t in enumerate(spec.tasks)]  # fmt: skip
    jobs = [Job(i, t.name, t.config.device, kwargs[i]) for i, t in enumerate(spec.tasks)]
    results: dict[str, TaskResult] = {}
    started = now_iso()
    with ex:
        ex.check(jobs)  # before anything is written
        out.mkdir(parents=True, exist_ok=True)
        settings = ex.settings()
        if ex.name != "local" and not no_cache:
            settings["prepared_by_driver"] = _prepare_shared(spec, out, cache)
        write_sweep_manifest(out, spec, results, started, settings)
        bar = tqdm(total=len(jobs), desc="sweep", unit="task", disable=not progress)

        def on_result(job: Job, res: TaskResult) -> None:
            results[job.name] = res
            write_sweep_manifest(out, spec, results, started, settings)
            bar.update(1)
            if res.status == "reused":
                how = f"reused (its run took {res.seconds:.1f} s)"
            else:
                how = f"{res.status} in {res.seconds:.1f} s"
                how += f" on {res.host}, pid {res.pid}" if res.host else ""
            log.info("sweep: task %s %s [%d/%d]", job.name, how, len(results), len(jobs))

        def on_error(job: Job, exc: BaseException, tb: str) -> TaskResult:
            return record_failure(spec.tasks[job.index], out / "tasks" / job.name, spec.analysis,
                                  job.index, exc, tb)  # fmt: skip

        try:
            ex.run(run_task, jobs, on_result, on_error)
        finally:
            bar.close()
            write_sweep_manifest(out, spec, results, started, settings)
    write_outputs(out, [t.name for t in spec.tasks])
    return SweepResult(out_dir=str(out_dir), tasks=tuple(results[t.name] for t in spec.tasks))
