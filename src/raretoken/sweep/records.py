"""What a sweep records: task outcomes, ``task.json``, ``sweep_manifest.json`` and shared work.

``sweep_manifest.json`` (rewritten by the driver as each task finishes)::

    schema_version, source, started, updated, executor, address, max_parallel, cpus_per_task,
    max_retries, settings, analysis, versions,
    counts        {"complete", "reused", "failed", "pending"}: number of tasks of each status
    shared_work   {"tokenizers": distinct tokenizer hashes, "token_statistics_computed",
                   "token_statistics_reused", "windows_computed", "windows_reused"}
    tasks         one entry per task: name, model, revision, config, task_dir, run_dir, log,
                  status, seconds, started/ended (ISO) and started_at/ended_at (epoch seconds)
                  of the run, host and pid of the process that ran it, error, traceback,
                  tokenizer_sha256, token_statistics and windows ("computed" / "reused")

Timings, host and pid describe the attempt that produced the task's run directory: for a
``reused`` task, the earlier invocation's (read from its ``task.json``). Shared work is read
from each run's ``manifest.json`` (``identity.tokenizer.sha256`` and the ``cached`` flag of
its ``token_statistics`` and ``sampling`` stages); a run that records none counts as unknown.

A sweep directory belongs to one sweep: its ``settings`` and ``analysis``. Running another
sweep (other settings or analysis options) into it is refused without ``overwrite``; adding
or removing models is the same sweep.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..run import AnalysisOptions
from ..run.manifest import MANIFEST, now_iso, package_versions
from ..storage import atomic_write_json
from .spec import SweepSpec, SweepTask

SWEEP_MANIFEST = "sweep_manifest.json"
SWEEP_SCHEMA = 2
TASK_FILE = "task.json"
TRACEBACK = "traceback.txt"
LOG_FILE = "log.txt"
STATUSES = ("complete", "reused", "failed", "pending")


@dataclass(frozen=True)
class TaskResult:
    """Outcome of one task in one sweep invocation.

    ``status``: ``complete`` (ran now), ``reused`` (already complete) or ``failed``.
    ``started``/``ended`` (ISO 8601, UTC), ``started_at``/``ended_at`` (epoch seconds), ``host``
    and ``pid`` describe the attempt that produced the run (the earlier one for ``reused``).
    ``token_statistics`` / ``windows``: ``"computed"`` or ``"reused"`` (from the cache) as the
    run's manifest records it, ``None`` when it does not say.
    """

    name: str
    model: str
    revision: str | None
    status: str
    seconds: float
    run_dir: str
    error: dict[str, str] | None = None
    traceback: str | None = None
    started: str | None = None
    ended: str | None = None
    started_at: float | None = None
    ended_at: float | None = None
    host: str | None = None
    pid: int | None = None
    tokenizer_sha256: str | None = None
    token_statistics: str | None = None
    windows: str | None = None

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


def as_json(x: Any) -> Any:
    """``x`` as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(x))


def iso(epoch: float) -> str:
    """``epoch`` seconds as ISO 8601 in UTC, to the millisecond."""
    return _dt.datetime.fromtimestamp(epoch, _dt.UTC).isoformat(timespec="milliseconds")


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; ``{}`` when it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def resolved_options(options: AnalysisOptions, task: SweepTask) -> dict[str, Any]:
    """The analysis options as the run's manifest records them (``None`` taken from the config)."""
    return as_json(asdict(options.resolved_for(task.config)))


def _cached(stage: Any) -> str | None:
    flag = stage.get("cached") if isinstance(stage, dict) else None
    return None if not isinstance(flag, bool) else "reused" if flag else "computed"


def run_sharing(run_dir: Path) -> dict[str, Any]:
    """Tokenizer hash and whether token statistics / windows were computed or reused."""
    manifest = read_json(run_dir / MANIFEST)
    tok = (manifest.get("identity") or {}).get("tokenizer")
    stages = manifest.get("stages") or {}
    sha = tok.get("sha256") if isinstance(tok, dict) else None
    return {
        "tokenizer_sha256": sha if isinstance(sha, str) else None,
        "token_statistics": _cached(stages.get("token_statistics")),
        "windows": _cached(stages.get("sampling")),
    }


def shared_work(entries: list[dict[str, Any]]) -> dict[str, int]:
    """Distinct tokenizers and how often token statistics / windows were computed or reused."""
    out = {"tokenizers": len({e["tokenizer_sha256"] for e in entries if e["tokenizer_sha256"]})}
    for key in ("token_statistics", "windows"):
        for how in ("computed", "reused"):
            out[f"{key}_{how}"] = sum(e[key] == how for e in entries)
    return out


def write_task_record(path: Path, task: SweepTask, options: AnalysisOptions, index: int,
                      result: TaskResult) -> None:  # fmt: skip
    """``task.json``: the task's identity, config, analysis options and last outcome."""
    r = result.to_dict()
    atomic_write_json(path, {
        "schema_version": SWEEP_SCHEMA, "index": index, **task.to_dict(),
        "analysis": resolved_options(options, task), "status": result.status,
        "seconds": result.seconds, "error": result.error,
        "traceback": TRACEBACK if result.error else None, "log": LOG_FILE,
        **{k: r[k] for k in ("started", "ended", "started_at", "ended_at", "host", "pid",
                             "tokenizer_sha256", "token_statistics", "windows")},
        "finished": now_iso(),
    })  # fmt: skip


def check_sweep_dir(out: Path, spec: SweepSpec, *, overwrite: bool = False) -> None:
    """Refuse a sweep directory holding another sweep (other settings or analysis options)."""
    path = out / SWEEP_MANIFEST
    if overwrite or not path.exists():
        return
    old = read_json(path)
    if not old:
        raise ConfigError(f"{path} is unreadable; pass --overwrite (overwrite=True) to replace it")
    diffs = [key for key, new in (("settings", spec.settings), ("analysis", asdict(spec.analysis)))
             if old.get(key) != as_json(new)]  # fmt: skip
    if diffs:
        raise ConfigError(
            f"{out} holds another sweep (its {' and '.join(diffs)} differ); choose another "
            "--out or pass --overwrite (overwrite=True) to run this sweep there"
        )


def write_sweep_manifest(
    out: Path,
    spec: SweepSpec,
    results: dict[str, TaskResult],
    started: str,
    executor: dict[str, Any],
) -> None:
    """Write ``sweep_manifest.json`` from the outcomes so far (unfinished tasks: ``pending``)."""
    tasks = []
    for t in spec.tasks:
        r = results.get(t.name)
        d = r.to_dict() if r else {}
        tasks.append({
            **t.to_dict(), "task_dir": f"tasks/{t.name}", "run_dir": f"tasks/{t.name}/run",
            "log": f"tasks/{t.name}/{LOG_FILE}", "status": r.status if r else "pending",
            "seconds": r.seconds if r else None, "error": r.error if r else None,
            "traceback": f"tasks/{t.name}/{TRACEBACK}" if r and r.traceback else None,
            **{k: d.get(k) for k in ("started", "ended", "started_at", "ended_at", "host", "pid",
                                     "tokenizer_sha256", "token_statistics", "windows")},
        })  # fmt: skip
    atomic_write_json(out / SWEEP_MANIFEST, {
        "schema_version": SWEEP_SCHEMA, "source": spec.source, "started": started,
        "updated": now_iso(), **executor, "settings": spec.settings,
        "analysis": asdict(spec.analysis), "versions": package_versions(),
        "counts": {s: sum(x["status"] == s for x in tasks) for s in STATUSES},
        "shared_work": shared_work(tasks), "tasks": tasks,
    })  # fmt: skip
