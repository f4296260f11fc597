"""The run directory and its versioned manifest (provenance of every result).

Life of a run directory
    Nothing is created until there is a run to record: the inputs are validated and every
    identification stage is computed (or read from the cache) first. The identification's
    files and manifest are then written into a staging directory beside the run directory and
    swapped in (:meth:`RunDirectory.publish`), so the directory always holds exactly one
    run's files: an overwritten run leaves nothing of the earlier one behind, and a run killed
    while writing leaves the previous directory as it was.

Add-on stages
    Stages that extend a finished identification in place (:data:`ADDON_STAGES`: the
    per-layer identification ``layers``, the ``interventions``) record, when they end, the
    identification keys they were computed from (``basis``). Republishing the same run (same
    configuration, e.g. ``raretoken analyze`` or a rerun of ``raretoken run``) carries their
    files, ``stages`` and ``outputs`` entries into the new directory while those keys are
    unchanged, and drops them with a warning otherwise.

Status (``manifest["status"]``) says what has really finished
    ``identified``
        identification finished (all its stages are in ``stages``); no analyses yet.
    ``running``
        a stage is in progress: ``running`` names it, with the process id, host and start
        time. If that process is gone, the run was killed during that stage; everything listed
        in ``stages`` had finished (:func:`read_status` reports it as ``interrupted``).
    ``complete``
        identification and the analyses finished.
    ``failed`` / ``interrupted``
        the stage named in ``error`` stopped with an error / was interrupted (Ctrl-C).
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata as md
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import RunDirectoryError, StorageError
from ..storage import atomic_write_json, cache_key, ensure_writable_dir
from ..storage.stale import is_stale, owner_tag, pid_alive
from .addons import ADDON_STAGES, carry_addons, identification_basis

MANIFEST = "manifest.json"
#: Version of the manifest's layout; a run directory of another version is refused.
MANIFEST_SCHEMA = 2
_PACKAGES = (
    "torch", "transformers", "tokenizers", "numpy", "scipy", "networkx", "matplotlib",
    "pyarrow", "gguf", "accelerate",
)  # fmt: skip
_OUT_HINT = "choose another --out"


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": sys.version.split()[0], "raretoken": __version__}
    for name in _PACKAGES:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def _git(args: list[str], cwd: Path) -> str | None:
    env = dict(os.environ, GIT_OPTIONAL_LOCKS="0")
    try:
        res = subprocess.run(
            ["git", "--no-optional-locks", "-C", str(cwd), *args],
            capture_output=True, text=True, timeout=5, check=False, env=env,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def git_commit() -> str | None:
    """Commit of the raretoken source checkout, ``-dirty`` when it has changes.

    ``None`` unless raretoken runs from its own checkout (an editable install): an installed
    copy inside a user's repository must not report that repository's commit. Git is asked
    with ``--no-optional-locks``, so the user's index is never locked or rewritten.
    """
    here = Path(__file__).resolve()
    top = _git(["rev-parse", "--show-toplevel"], here.parent)
    if not top:
        return None
    root = Path(top)
    try:
        rel = here.relative_to(root)
    except ValueError:
        return None
    if rel.as_posix() != "src/raretoken/run/manifest.py":
        return None
    head = _git(["rev-parse", "HEAD"], root)
    if not head:
        return None
    dirty = _git(["status", "--porcelain", "--untracked-files=no"], root)
    return head + ("-dirty" if dirty else "")


def now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _read_manifest(path: Path) -> dict[str, Any] | None:
    mf = path / MANIFEST
    if not mf.exists():
        return None
    try:
        data = json.loads(mf.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def read_status(path: Path | str) -> str | None:
    """The status of the run directory at ``path`` (``None`` when it is not one).

    ``running`` is reported as ``interrupted`` when the recorded process is gone (same host).
    """
    m = _read_manifest(Path(path))
    if m is None:
        return None
    status = m.get("status")
    info = m.get("running") or {}
    if (
        status == "running"
        and info.get("host") == socket.gethostname()
        and isinstance(info.get("pid"), int)
        and not pid_alive(info["pid"])
    ):
        return "interrupted"
    return status if isinstance(status, str) else None


def _sibling(path: Path, kind: str) -> Path:
    return path.parent / f".{path.name}.{kind}-{owner_tag()}"


def _sweep_siblings(path: Path) -> None:
    """Remove staging/old directories left beside ``path`` by killed runs on this host."""
    for kind in ("staging", "old"):
        prefix = f".{path.name}.{kind}-"
        for p in path.parent.glob(prefix + "*"):
            if is_stale(p.name[len(prefix) :]):
                shutil.rmtree(p, ignore_errors=True)


@dataclass
class RunDirectory:
    """A run directory bound to one configuration (see the module docstring)."""

    path: Path
    config: dict[str, Any]
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def run_id(self) -> str:
        return cache_key("run", self.config)[:12]

    # ------------------------------------------------------------------ before a run
    @staticmethod
    def preflight(path: Path, config: dict[str, Any], *, overwrite: bool = False) -> None:
        """Check, writing nothing, that a run with ``config`` may be written to ``path``.

        Raises :class:`RunDirectoryError` when ``path`` holds another run (unless
        ``overwrite``), an older manifest schema (unless ``overwrite``) or files that are not
        a run directory (always: ``overwrite`` replaces only run directories), and
        :class:`StorageError` when it cannot be written.
        """
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise StorageError(f"run directory {path} cannot be used: it is a file; {_OUT_HINT}")
        # the run is staged beside the directory and renamed into place: its parent is written
        ensure_writable_dir(path.parent, "the parent of the run directory", _OUT_HINT, create=False)
        old = _read_manifest(path)
        if old is not None:
            same_schema = old.get("schema_version") == MANIFEST_SCHEMA
            if (not same_schema or old.get("config") != config) and not overwrite:
                what = (
                    "an older schema" if not same_schema else "a run with a different configuration"
                )
                raise RunDirectoryError(f"{path} holds {what}; {_OUT_HINT} or pass --overwrite")
        elif path.is_dir() and any(path.iterdir()):
            raise RunDirectoryError(
                f"{path} exists and is not a raretoken run directory; {_OUT_HINT} "
                "(--overwrite replaces only run directories)"
            )

    @classmethod
    def publish(
        cls,
        path: Path,
        config: dict[str, Any],
        write: Callable[[RunDirectory], None],
        *,
        stages: Mapping[str, Any],
        info: Mapping[str, Any] | None = None,
        overwrite: bool = False,
    ) -> RunDirectory:
        """Write a run's files with ``write`` into a staging directory, then swap it in.

        When ``path`` holds the same run (same configuration and manifest schema), the
        results of its add-on stages (:data:`ADDON_STAGES`: their files, ``stages`` entries
        and ``outputs`` entries) are copied into the staging directory before ``write`` runs,
        if they were computed from this identification: the keys recorded in the stage's
        ``basis`` (:func:`identification_basis`, stored by :meth:`end`) equal those of
        ``stages``. An add-on computed from other windows or another capture is dropped with
        a warning. Anything else of the old directory (e.g. the analyses) is not carried.
        """
        path = Path(path)
        cls.preflight(path, config, overwrite=overwrite)
        old = _read_manifest(path) or {}
        path.parent.mkdir(parents=True, exist_ok=True)
        _sweep_siblings(path)
        staging = _sibling(path, "staging")
        try:
            staging.mkdir()
        except OSError as exc:
            raise StorageError(f"cannot create {staging}: {exc.strerror}; {_OUT_HINT}") from exc
        run = cls(path=staging, config=config)
        same = old.get("config") == config and old.get("schema_version") == MANIFEST_SCHEMA
        run.manifest = {
            "schema_version": MANIFEST_SCHEMA,
            "run_id": run.run_id,
            "created": old.get("created", now_iso()) if same else now_iso(),
            "updated": now_iso(),
            "status": "identified",
            "config": config,
            "stages": dict(stages),
            "outputs": {},
            "versions": package_versions(),
            "git_commit": git_commit(),
            "platform": platform.platform(),
            "command": sys.argv,
            **dict(info or {}),
        }
        try:
            if same:
                carry_addons(path, old, run)
            write(run)
            run.save()
            if path.exists():
                trash = _sibling(path, "old")
                os.rename(path, trash)
                os.rename(staging, path)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.rename(staging, path)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        run.path = path
        return run

    # ------------------------------------------------------------------ a published run
    @classmethod
    def open_existing(cls, path: Path, config: dict[str, Any]) -> RunDirectory:
        """The published run directory of ``config`` at ``path`` (to add a stage to it)."""
        m = _read_manifest(Path(path))
        if not m:
            raise RunDirectoryError(
                f"{path} is not a raretoken run directory (no readable {MANIFEST})"
            )
        if m.get("schema_version") != MANIFEST_SCHEMA or m.get("config") != config:
            raise RunDirectoryError(f"{path} holds another run; rerun identification first")
        return cls(path=Path(path), config=config, manifest=m)

    def save(self) -> None:
        self.manifest["updated"] = now_iso()
        atomic_write_json(self.path / MANIFEST, self.manifest)

    def record_output(self, name: str, relpath: str, description: str) -> None:
        self.manifest.setdefault("outputs", {})[name] = {"path": relpath, "about": description}

    def set(self, key: str, value: Any) -> None:
        self.manifest[key] = value

    def begin(self, stage: str) -> None:
        """Record that ``stage`` is running in this process (before it writes anything)."""
        self.manifest.pop("error", None)
        self.manifest["status"] = "running"
        self.manifest["running"] = {
            "stage": stage,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": now_iso(),
        }
        self.manifest.get("stages", {}).pop(stage, None)
        self.save()

    def end(self, stage: str, status: str, **info: Any) -> None:
        """Record ``stage`` as finished and the run's status as ``status``.

        An add-on stage (:data:`ADDON_STAGES`) also records, as ``basis``, the keys of the
        identification it was computed from (unless ``info`` gives one): what
        :meth:`publish` checks before carrying its results into a republished run.
        """
        if stage in ADDON_STAGES and "basis" not in info:
            info["basis"] = identification_basis(self.manifest.get("stages") or {})
        self.manifest.pop("running", None)
        self.manifest.setdefault("stages", {})[stage] = dict(info, finished=now_iso())
        self.manifest["status"] = status
        self.save()

    def settled_status(self) -> str:
        """What the finished stages make of the run: ``complete`` with the analyses, else
        ``identified`` (the status an add-on stage leaves behind, finished or not)."""
        return "complete" if "analyses" in (self.manifest.get("stages") or {}) else "identified"

    def stop(self, stage: str, exc: BaseException) -> None:
        """Record that ``stage`` stopped: ``interrupted`` (Ctrl-C) or ``failed``.

        An add-on stage (:data:`ADDON_STAGES`) that stops leaves the run as its finished
        stages make it (:meth:`settled_status`): the error is recorded, with the stage's name,
        but the identification and analyses before it are still whole and usable. Its files
        stay registered (the next run of the stage replaces them) but, with no finished stage
        recorded, neither ``summary.md`` nor the report shows them.
        """
        self.manifest.pop("running", None)
        interrupted = isinstance(exc, KeyboardInterrupt)
        self.manifest["status"] = (
            self.settled_status()
            if stage in ADDON_STAGES
            else "interrupted"
            if interrupted
            else "failed"
        )
        self.manifest["error"] = {
            "stage": stage,
            "type": type(exc).__name__,
            "message": str(exc).splitlines()[0] if str(exc) else "",
        }
        try:
            self.save()
        except OSError:
            pass

    def replace_outputs(self, prefix: str, written: Mapping[str, str]) -> None:
        """Register ``written`` (relpath -> about) under ``prefix``; delete the files that an
        earlier stage of the same kind wrote and this one did not."""
        outputs = self.manifest.setdefault("outputs", {})
        for name in [n for n in outputs if n.startswith(prefix)]:
            rel = outputs.pop(name)["path"]
            if rel not in written:
                (self.path / rel).unlink(missing_ok=True)
        for rel, about in written.items():
            self.record_output(prefix + rel, rel, about)
