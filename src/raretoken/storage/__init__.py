"""Shared storage below every other package: atomic writes and the verified cache.

* :mod:`.atomic` — files written to a temporary name and renamed into place, so a reader
  never sees half a file;
* :mod:`.cache` — content-addressed cache entries, each a directory of ``.npy`` arrays and
  JSON documents with the SHA-256 of every file recorded at write time and checked on every
  read; a damaged entry is reported, discarded and recomputed, never used.
"""

from __future__ import annotations

from .atomic import atomic_write_bytes, atomic_write_json, atomic_write_text, ensure_writable_dir
from .cache import SCHEMA_VERSION, ArrayCache, EntryWriter, cache_key, default_cache_dir

__all__ = [
    "SCHEMA_VERSION",
    "ArrayCache",
    "EntryWriter",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "cache_key",
    "default_cache_dir",
    "ensure_writable_dir",
]
