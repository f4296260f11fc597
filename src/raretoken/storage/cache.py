"""Content-addressed cache of expensive intermediates, verified on every read.

Keys
    A cache entry's key is the SHA-256 of the canonical JSON of everything that changes it
    (model identity and revision, tokenizer, corpus identity and slice, BOS policy, dtype, the
    stage's settings, the keys of the entries it was computed from, and
    :data:`SCHEMA_VERSION`).

Entries
    An entry is a directory ``root/<stage>/<key>/`` of ``.npy`` arrays and ``.json``
    documents plus ``entry.json``, which records the size and SHA-256 of every file. It is
    built in a temporary directory beside it and renamed into place only when complete, so an
    interrupted run never leaves an entry that a rerun would trust; when two runs build the
    same entry at once, the first rename wins and the other run keeps its own (identical)
    result.

Verification
    Every read checks the recorded sizes and checksums (streamed, so a large array is never
    read into memory twice) and that the arrays parse. An entry that fails — truncated, a
    flipped byte, an edited number, a missing file — is reported with a warning, discarded and
    recomputed by the caller; it is never used.

Arrays can be read back memory-mapped (``mmap=True``) and written piecewise into memory-mapped
files (:meth:`ArrayCache.writer`), so an entry larger than memory streams through.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib.format import open_memmap

from .stale import is_stale, owner_tag

log = logging.getLogger(__name__)

#: Bump when what an entry holds changes: every key changes with it.
SCHEMA_VERSION = 2
ENTRY_FORMAT = 1
ENTRY_FILE = "entry.json"
_HASH_CHUNK = 1 << 22


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


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DamagedEntry(Exception):
    """An entry that failed verification (internal: the cache discards it)."""


class EntryWriter:
    """Builds one cache entry in a temporary directory; :meth:`commit` publishes it.

    Without a cache root the arrays live in memory and nothing is written.
    """

    def __init__(self, cache: ArrayCache, stage: str, key: str) -> None:
        self.cache = cache
        self.stage = stage
        self.key = key
        self._arrays: dict[str, np.ndarray] = {}
        self._json: dict[str, Any] = {}
        self.tmp: Path | None = None
        if cache.root is not None:
            parent = cache.root / stage
            parent.mkdir(parents=True, exist_ok=True)
            cache.sweep_stale(parent)
            name = f".tmp-{key[:16]}-{owner_tag()}"
            self.tmp = parent / name
            self.tmp.mkdir()

    def array(self, name: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """A writable array to fill piecewise (memory-mapped in the entry when caching)."""
        if self.tmp is None:
            arr = np.zeros(shape, dtype=dtype)
        else:
            arr = open_memmap(self.tmp / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)
        self._arrays[name] = arr
        return arr

    def put(self, name: str, value: np.ndarray) -> None:
        arr = np.asarray(value)
        if arr.dtype == object:
            raise TypeError(f"cache entry {self.stage}/{name}: object arrays cannot be cached")
        if self.tmp is None:
            self._arrays[name] = arr
        else:
            np.save(self.tmp / f"{name}.npy", arr, allow_pickle=False)
            self._arrays[name] = arr

    def put_json(self, name: str, obj: Any) -> None:
        text = json.dumps(obj, sort_keys=True)
        self._json[name] = json.loads(text)
        if self.tmp is not None:
            (self.tmp / f"{name}.json").write_text(text)

    def commit(self, *, mmap: bool = False) -> dict[str, Any]:
        """Publish the entry; returns its arrays and JSON documents by name."""
        if self.tmp is None:
            return {**self._arrays, **self._json}
        for arr in self._arrays.values():
            if isinstance(arr, np.memmap):
                arr.flush()
        files: dict[str, dict[str, Any]] = {}
        for path in sorted(self.tmp.iterdir()):
            _fsync_file(path)
            files[path.name] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
        meta = {"format": ENTRY_FORMAT, "stage": self.stage, "key": self.key, "files": files}
        (self.tmp / ENTRY_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True))
        _fsync_file(self.tmp / ENTRY_FILE)
        final = self.cache.entry_dir(self.stage, self.key)
        assert final is not None
        try:
            os.rename(self.tmp, final)
        except OSError:
            if not final.exists():
                raise
            # another run published the same entry first: keep theirs, drop ours
            log.debug("cache entry %s/%s published concurrently; keeping the first", self.stage,
                      self.key[:12])  # fmt: skip
            self._arrays = {k: np.array(v) for k, v in self._arrays.items()}
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None
            return {**self._arrays, **self._json}
        self.tmp = None
        if not mmap:
            return {**{k: np.array(v) for k, v in self._arrays.items()}, **self._json}
        out: dict[str, Any] = {
            name: np.load(final / f"{name}.npy", mmap_mode="r", allow_pickle=False)
            for name in self._arrays
        }
        return {**out, **self._json}

    def abort(self) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None


class ArrayCache:
    """Verified cache entries under ``root/<stage>/<key>/`` (``root=None`` disables caching)."""

    def __init__(self, root: Path | None) -> None:
        self.root = None if root is None else Path(root).expanduser()

    def entry_dir(self, stage: str, key: str) -> Path | None:
        return None if self.root is None else self.root / stage / key

    # ------------------------------------------------------------------ reading
    def _verified(self, stage: str, key: str) -> Path | None:
        """The entry's directory after verification; ``None`` when absent or damaged."""
        d = self.entry_dir(stage, key)
        if d is None or not d.exists():
            return None
        try:
            self._verify(d, stage, key)
        except DamagedEntry as exc:
            self.discard(stage, key, str(exc))
            return None
        return d

    @staticmethod
    def _verify(d: Path, stage: str, key: str) -> dict[str, Any]:
        try:
            meta = json.loads((d / ENTRY_FILE).read_text())
        except FileNotFoundError:
            raise DamagedEntry(f"no {ENTRY_FILE}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DamagedEntry(f"unreadable {ENTRY_FILE} ({exc})") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("files"), dict):
            raise DamagedEntry(f"malformed {ENTRY_FILE}")
        if (
            meta.get("format") != ENTRY_FORMAT
            or meta.get("key") != key
            or meta.get("stage") != stage
        ):
            raise DamagedEntry(f"{ENTRY_FILE} describes another entry")
        for name, rec in meta["files"].items():
            p = d / name
            try:
                size = p.stat().st_size
            except OSError:
                raise DamagedEntry(f"{name} is missing") from None
            if size != rec.get("bytes"):
                raise DamagedEntry(f"{name} has {size} bytes, {rec.get('bytes')} were written")
            if file_sha256(p) != rec.get("sha256"):
                raise DamagedEntry(f"{name} does not match its checksum")
        return meta

    def load(self, stage: str, key: str, *, mmap: bool = False) -> dict[str, np.ndarray] | None:
        """The entry's arrays, or ``None`` when absent or damaged (then it is discarded)."""
        d = self._verified(stage, key)
        if d is None:
            return None
        out: dict[str, np.ndarray] = {}
        try:
            for p in sorted(d.glob("*.npy")):
                out[p.stem] = np.load(p, mmap_mode="r" if mmap else None, allow_pickle=False)
        except Exception as exc:  # verified bytes that still do not parse: never trust them
            self.discard(stage, key, f"unreadable array ({exc})")
            return None
        return out

    def load_json(self, stage: str, key: str, name: str = "payload") -> Any | None:
        d = self._verified(stage, key)
        if d is None:
            return None
        try:
            return json.loads((d / f"{name}.json").read_text())
        except (OSError, ValueError) as exc:
            self.discard(stage, key, f"unreadable {name}.json ({exc})")
            return None

    # ------------------------------------------------------------------ writing
    def writer(self, stage: str, key: str) -> EntryWriter:
        return EntryWriter(self, stage, key)

    @contextmanager
    def writing(self, stage: str, key: str) -> Iterator[EntryWriter]:
        """``with cache.writing(stage, key) as w: ...; w.commit()`` — aborted on error."""
        w = self.writer(stage, key)
        try:
            yield w
        finally:
            w.abort()

    def save(self, stage: str, key: str, arrays: Mapping[str, np.ndarray]) -> None:
        if self.root is None:
            return
        with self.writing(stage, key) as w:
            for name, arr in arrays.items():
                w.put(name, arr)
            w.commit()

    def save_json(self, stage: str, key: str, obj: Any, name: str = "payload") -> None:
        if self.root is None:
            return
        with self.writing(stage, key) as w:
            w.put_json(name, obj)
            w.commit()

    # ------------------------------------------------------------------ housekeeping
    def discard(self, stage: str, key: str, reason: str) -> None:
        """Report a damaged entry and remove it, so that the caller recomputes it."""
        d = self.entry_dir(stage, key)
        if d is None or not d.exists():
            return
        log.warning("cache entry %s is damaged (%s): discarded, it will be recomputed", d, reason)
        trash = d.parent / f".trash-{key[:16]}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(d, trash)
        except OSError:
            return  # another run discarded it already
        shutil.rmtree(trash, ignore_errors=True)

    def sweep_stale(self, parent: Path) -> None:
        """Remove temporary directories left by killed runs on this host."""
        for p in parent.glob(".tmp-*"):
            if is_stale(p.name.split("-", 2)[-1]):
                shutil.rmtree(p, ignore_errors=True)
        for p in parent.glob(".trash-*"):
            shutil.rmtree(p, ignore_errors=True)
