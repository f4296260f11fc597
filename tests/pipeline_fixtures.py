"""A tiny model directory and a synthetic corpus for end-to-end runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tiny import TEXT, save_tiny


def write_corpus(path: Path, n_docs: int = 400, words_per_doc: int = 120, seed: int = 0) -> Path:
    """Documents of words drawn from a Zipf law over the tiny tokenizer's training words."""
    rng = np.random.default_rng(seed)
    words = sorted(set(TEXT.replace("\n", " ").split()))
    rng.shuffle(words)
    p = 1.0 / np.arange(1, len(words) + 1) ** 1.1
    p /= p.sum()
    with open(path, "w") as fh:
        for i in range(n_docs):
            doc = " ".join(rng.choice(words, size=words_per_doc, p=p))
            fh.write(json.dumps({"id": i, "text": doc}) + "\n")
    return path


def tiny_setup(root: Path, family: str = "llama") -> tuple[Path, Path]:
    model_dir = save_tiny(root / f"model-{family}", family)
    corpus = write_corpus(root / "corpus.jsonl")
    return model_dir, corpus


def tiny_overrides(model_dir: Path, corpus: Path) -> dict[str, object]:
    return {
        "model": str(model_dir),
        "corpus": str(corpus),
        "sampling": "windows",
        "n_windows": 8,
        "window_len": 64,
        "scoring": "rare+common",
        "max_common": 200,
        "reference_windows": 2,
        "heldout_fraction": 0.3,
        "n_boot": 5,
        "n_random_groups": 5,
        "batch_size": 4,
    }


def sweep_text(models: list[str], extra: str = "", **settings: object) -> str:
    """A sweep file: ``settings`` at the top level (JSON spelling of strings and numbers is
    TOML spelling), ``[analysis]`` with routing off plus ``extra``, one ``[[models]]`` each."""
    lines = [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
    lines += ["", "[analysis]", "routing = false", extra, ""]
    for m in models:
        lines += ["[[models]]", f"model = {json.dumps(m)}", ""]
    return "\n".join(lines)


def sweep_shared(root: Path) -> dict[str, object]:
    """The tiny run settings of a sweep, with the corpus relative to the sweep file."""
    opts = tiny_overrides(root / "model-llama", root / "corpus.jsonl")
    del opts["model"]
    opts["corpus"] = "corpus.jsonl"
    return opts
