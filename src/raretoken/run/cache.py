"""Content-addressed cache of expensive intermediates, written atomically.

A cache entry's key is the SHA-256 of the canonical JSON of everything that changes it (model
identity and revision, tokenizer, corpus identity and slice, BOS policy, dtype, the stage's
settings, the keys of the entries it was computed from, and :data:`SCHEMA_VERSION`). Entries
are ``.npz`` archives written to a temporary file and renamed into place, so an interrupted run
never leaves a file that a rerun would trust.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1


def default_cache_dir() -> Path:
    env = os.environ.get("RARETOKEN_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "raretoken"


def _canonical(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, list | tuple):
        return [_canonical(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float | int | str | bool) or obj is None:
        return obj
    if isinstance(obj, Path):
        return str(obj)
    return repr(obj)


def cache_key(stage: str, parts: Mapping[str, Any]) -> str:
    """Hex digest identifying ``stage`` computed from ``parts``."""
    payload = json.dumps(
        {"stage": stage, "schema": SCHEMA_VERSION, "parts": _canonical(parts)},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


class ArrayCache:
    """``.npz`` entries under ``root/<stage>/<key>.npz`` (``root=None`` disables caching)."""

    def __init__(self, root: Path | None) -> None:
        self.root = root

    def path(self, stage: str, key: str) -> Path | None:
        return None if self.root is None else self.root / stage / f"{key}.npz"

    def load(self, stage: str, key: str) -> dict[str, np.ndarray] | None:
        p = self.path(stage, key)
        if p is None or not p.exists():
            return None
        try:
            with np.load(p, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError) as exc:  # corrupt entry: recompute
            log.warning("ignoring unreadable cache entry %s (%s)", p, exc)
            return None

    def save(self, stage: str, key: str, arrays: Mapping[str, np.ndarray]) -> None:
        p = self.path(stage, key)
        if p is None:
            return
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp.npz")
        os.close(fd)
        try:
            np.savez(tmp, **dict(arrays))  # type: ignore[arg-type]
            os.replace(tmp, p)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
