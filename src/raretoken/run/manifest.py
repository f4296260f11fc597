"""The run directory and its versioned manifest (provenance of every result)."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata as md
import json
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import RunDirectoryError
from .cache import SCHEMA_VERSION, atomic_write_json, cache_key

MANIFEST = "manifest.json"
_PACKAGES = (
    "torch", "transformers", "tokenizers", "numpy", "scipy", "networkx", "matplotlib",
    "pyarrow", "gguf", "accelerate",
)  # fmt: skip


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": sys.version.split()[0], "raretoken": __version__}
    for name in _PACKAGES:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> str | None:
    """Commit of the raretoken source checkout (``None`` when installed from a wheel)."""
    src = Path(__file__).resolve().parents[1]
    try:
        res = subprocess.run(
            ["git", "-C", str(src), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=5, check=False,
        )  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5, check=False,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    if res.returncode != 0:
        return None
    return res.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


@dataclass
class RunDirectory:
    """A run directory bound to one configuration.

    Opening a directory whose manifest records a different configuration (or an older schema)
    raises :class:`RunDirectoryError` unless ``overwrite`` is given.
    """

    path: Path
    config: dict[str, Any]
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def run_id(self) -> str:
        return cache_key("run", self.config)[:12]

    @classmethod
    def open(cls, path: Path, config: dict[str, Any], *, overwrite: bool = False) -> RunDirectory:
        run = cls(path=path, config=config)
        mf = path / MANIFEST
        if mf.exists():
            try:
                old = json.loads(mf.read_text())
            except (OSError, json.JSONDecodeError):
                old = {}
            same = old.get("schema_version") == SCHEMA_VERSION and old.get("config") == config
            if not same and not overwrite:
                what = (
                    "an older schema"
                    if old.get("schema_version") != SCHEMA_VERSION
                    else "a run with a different configuration"
                )
                raise RunDirectoryError(
                    f"{path} holds {what}; choose another --out or pass --overwrite"
                )
            if same:
                run.manifest = old
        elif path.exists() and any(path.iterdir()):
            if not overwrite:
                raise RunDirectoryError(
                    f"{path} exists and is not a raretoken run directory; choose another --out"
                )
        path.mkdir(parents=True, exist_ok=True)
        if not run.manifest:
            run.manifest = {
                "schema_version": SCHEMA_VERSION,
                "run_id": run.run_id,
                "created": _now(),
                "config": config,
                "stages": {},
                "outputs": {},
            }
        run.manifest.update(
            {
                "status": "running",
                "updated": _now(),
                "versions": package_versions(),
                "git_commit": git_commit(),
                "platform": platform.platform(),
                "command": sys.argv,
            }
        )
        run.save()
        return run

    def save(self) -> None:
        atomic_write_json(self.path / MANIFEST, self.manifest)

    def record_stage(self, name: str, **info: Any) -> None:
        self.manifest.setdefault("stages", {})[name] = dict(info, finished=_now())
        self.save()

    def record_output(self, name: str, relpath: str, description: str) -> None:
        self.manifest.setdefault("outputs", {})[name] = {"path": relpath, "about": description}

    def set(self, key: str, value: Any) -> None:
        self.manifest[key] = value

    def finish(self) -> None:
        self.manifest["status"] = "complete"
        self.manifest["updated"] = _now()
        self.save()
