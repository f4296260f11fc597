"""Atomic file writes (temporary file + ``fsync`` + rename) and writable-directory checks."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from ..errors import StorageError


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half."""
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


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists():
        if p.parent == p:
            break
        p = p.parent
    return p


def ensure_writable_dir(path: Path, what: str, hint: str, *, create: bool = True) -> Path:
    """Check (and with ``create`` make) a directory we are about to write into.

    Raises :class:`StorageError` with one line naming ``what``, the path, the reason and
    ``hint`` (what to do instead) when ``path`` or one of its parents is a file, or when the
    place cannot be written (permissions, read-only file system). Without ``create`` nothing
    is left behind: the check writes a probe directory into the nearest existing ancestor and
    removes it.
    """
    path = Path(path).expanduser()

    def fail(reason: str) -> StorageError:
        return StorageError(f"{what} {path} cannot be used: {reason}; {hint}")

    base = _nearest_existing(path)
    if base.exists() and not base.is_dir():
        where = "it is a file" if base == path else f"{base} is a file, not a directory"
        raise fail(where)
    try:
        if create:
            path.mkdir(parents=True, exist_ok=True)
            probe = Path(tempfile.mkdtemp(dir=path, prefix=".raretoken-probe-"))
        else:
            probe = Path(tempfile.mkdtemp(dir=base, prefix=".raretoken-probe-"))
        probe.rmdir()
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            reason += " (not writable)"
        raise fail(reason) from exc
    return path
