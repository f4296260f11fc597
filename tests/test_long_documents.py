"""A corpus of a few long documents (a directory of novels) runs end to end.

With one corpus serving both counting and contexts, whole documents were the unit of the
held-out split, so six books gave no held-out text at all ("corpus has no non-empty
documents"). Documents are now split into passages first; the manifest says so.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline_fixtures import tiny_overrides
from raretoken.cli import main
from raretoken.data.heldout import is_heldout
from tiny import TEXT, save_tiny


def _write_novels(root: Path, n_books: int = 6, paragraphs: int = 160) -> Path:
    rng = np.random.default_rng(1)
    words = sorted(set(TEXT.replace("\n", " ").split()))
    rng.shuffle(words)
    p = 1.0 / np.arange(1, len(words) + 1) ** 1.1
    p /= p.sum()
    books = root / "novels"
    books.mkdir()
    for b in range(n_books):
        paras = [" ".join(rng.choice(words, size=60, p=p)) for _ in range(paragraphs)]
        (books / f"book{b + 1}.txt").write_text("\n\n".join(paras) + "\n")
    return books


def test_six_novels_run_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    books = _write_novels(tmp_path)
    sizes = [p.stat().st_size for p in books.iterdir()]
    assert min(sizes) > 40_000  # long documents: several passages each
    # the reported failure: by whole documents, nothing of these six books is held out
    assert not any(is_heldout(f"book{b + 1}.txt", 0.1, 0) for b in range(6))
    model = save_tiny(tmp_path / "model", "gpt2")
    opts = dict(
        tiny_overrides(model, books), heldout_fraction=0.1, sampling="until_rare", n_rare=20
    )
    argv = ["run", "--no-progress", "--skip-analyses", "--out", str(tmp_path / "run"),
            "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    for k, v in opts.items():
        argv += ["--" + k.replace("_", "-"), str(v)]
    assert main(argv) == 0, capsys.readouterr().err
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    split = manifest["identity"]["heldout_split"]
    assert split["unit"] == "passage" and split["fraction"] == 0.1
    assert "passage" in split["method"]
    assert manifest["status"] == "identified"
    assert manifest["stages"]["sampling"]["n_rare_positions"] >= 10
