"""Token statistics and context windows keyed by the tokenizer's content (issue 9, part 2).

Checkpoints that share a tokenizer count once and score the same positions; another tokenizer
recounts; counting and drawing windows never read the weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import raretoken.models.loading as loading_mod
import raretoken.run.stages as stages_mod
from pipeline_fixtures import tiny_overrides, write_corpus
from raretoken.data.token_stats import split_rare_common
from raretoken.errors import ConfigError, TokenizerMismatchError
from raretoken.models.loading import (
    ModelSpec,
    TokenizerInfo,
    load_model,
    load_tokenizer,
    model_dims,
    tokenizer_identity,
)
from raretoken.run import identify, make_config
from raretoken.run.stages import Stages, open_cache
from tiny import (
    D_MLP,
    D_MODEL,
    FAMILIES,
    N_HEADS,
    N_LAYERS,
    NEW_FAMILIES,
    save_tiny,
    tiny_model,
    tiny_tokenizer,
)

VOCAB = 300
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _manifest(run: Path) -> dict[str, Any]:
    return json.loads((run / "manifest.json").read_text())


def _copy_without_weights(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for name in WEIGHT_FILES:
        (dst / name).unlink(missing_ok=True)
    return dst


def _drop_last_merge(src: Path, dst: Path) -> Path:
    """``src`` with one merge fewer in its tokenizer (same weights, same vocabulary size)."""
    shutil.copytree(src, dst)
    spec = json.loads((dst / "tokenizer.json").read_text())
    spec["model"]["merges"].pop()
    (dst / "tokenizer.json").write_text(json.dumps(spec))
    return dst


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two checkpoints of one tokenizer (seeds 0 and 1), run one after the other on one cache."""
    root = tmp_path_factory.mktemp("shared")
    corpus = write_corpus(root / "corpus.jsonl")
    a = save_tiny(root / "ckpt-a", "llama", seed=0)
    b = save_tiny(root / "ckpt-b", "llama", seed=1)
    cache = root / "cache"
    res = {}
    for name, path in (("a", a), ("b", b)):
        cfg = make_config(overrides=tiny_overrides(path, corpus))
        res[name] = identify(cfg, root / f"run-{name}", cache_dir=cache, progress=False)
    return {"root": root, "corpus": corpus, "a": a, "b": b, "cache": cache, "res": res}


def test_checkpoints_sharing_a_tokenizer_share_counts_and_positions(world: dict[str, Any]) -> None:
    root = world["root"]
    ma, mb = _manifest(root / "run-a"), _manifest(root / "run-b")
    assert ma["stages"]["token_statistics"]["cached"] is False
    assert ma["stages"]["sampling"]["cached"] is False
    assert mb["stages"]["token_statistics"]["cached"] is True
    assert mb["stages"]["sampling"]["cached"] is True
    assert ma["identity"]["model"] != mb["identity"]["model"]
    assert ma["identity"]["tokenizer"] == mb["identity"]["tokenizer"]
    assert ma["stages"]["token_statistics"]["key"] == mb["stages"]["token_statistics"]["key"]
    assert ma["stages"]["sampling"]["key"] == mb["stages"]["sampling"]["key"]
    # the same scored positions (targets, classes, uniform sample); the model's losses differ
    pa = pq.read_table(root / "run-a" / "positions.parquet").to_pandas()
    pb = pq.read_table(root / "run-b" / "positions.parquet").to_pandas()
    same = ["window", "position", "target_id", "target_token", "class", "uniform_sample"]
    assert len(pa) > 0 and pa[same].equals(pb[same])
    assert not np.allclose(pa["base_loss"], pb["base_loss"])
    ra, rb = world["res"]["a"], world["res"]["b"]
    assert np.array_equal(ra.rare_positions, rb.rare_positions)
    assert np.array_equal(ra.counts.counts, rb.counts.counts)
    # everything from the forward passes on is the model's own
    assert ra.keys["capture"] != rb.keys["capture"]
    assert ra.keys["reference"] != rb.keys["reference"]
    na = pq.read_table(root / "run-a" / "neurons.parquet").to_pandas()
    nb = pq.read_table(root / "run-b" / "neurons.parquet").to_pandas()
    assert not np.allclose(na["delta_rare"], nb["delta_rare"])
    assert not np.array_equal(ra.delta, rb.delta)


def test_manifest_records_tokenizer_and_dims(world: dict[str, Any]) -> None:
    ident = _manifest(world["root"] / "run-a")["identity"]
    tok = ident["tokenizer"]
    assert set(tok) == {"sha256", "vocab_size", "class"}
    assert tok["vocab_size"] == VOCAB and len(tok["sha256"]) == 64
    assert tok["sha256"] == tokenizer_identity(tiny_tokenizer(VOCAB), VOCAB)["sha256"]
    n_params = sum(p.numel() for p in tiny_model("llama").parameters())  # independent count
    assert ident["dims"] == {"d_model": D_MODEL, "d_mlp": D_MLP, "n_layers": N_LAYERS,
                             "n_heads": N_HEADS, "vocab_size": VOCAB, "n_params": n_params}  # fmt: skip


def _shared_stages(st: Stages) -> tuple[Any, Any]:
    """The counts and main windows of ``st``, as :func:`identify` computes them."""
    counts, _ = st.token_counts()
    cfg = st.cfg
    split = split_rare_common(counts, percentile=cfg.percentile)
    always = split_rare_common(counts, percentile=cfg.score_percentile, check=False)
    return counts, st.samples(split, always)[0]


def test_rerun_loads_neither_tokenizer_nor_model(
    world: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*a: object, **k: object) -> None:
        raise AssertionError("loaded for a cached run")

    monkeypatch.setattr(stages_mod, "load_model", boom)
    monkeypatch.setattr(stages_mod, "load_tokenizer", boom)
    cfg = make_config(overrides=tiny_overrides(world["b"], world["corpus"]))
    st = Stages(cfg, open_cache(world["cache"], False), progress=False)
    _, main = _shared_stages(st)
    assert st.cached == {"token_statistics": True, "sampling": True}
    assert np.array_equal(main.offsets, world["res"]["b"].sample.offsets)
    assert st.dims == _manifest(world["root"] / "run-b")["identity"]["dims"]


def test_another_tokenizer_recounts(world: dict[str, Any]) -> None:
    """The weights of checkpoint a with one merge fewer: another sha, counted anew."""
    other = _drop_last_merge(world["a"], world["root"] / "ckpt-a-other-tok")
    cfg = make_config(overrides=tiny_overrides(other, world["corpus"]))
    st = Stages(cfg, open_cache(world["cache"], False), progress=False)
    counts, _ = _shared_stages(st)
    ident = _manifest(world["root"] / "run-a")["identity"]["tokenizer"]
    assert st.tokenizer_info.vocab_size == VOCAB
    assert st.tokenizer_info.tokenizer["sha256"] != ident["sha256"]
    assert st.cached == {"token_statistics": False, "sampling": False}
    # the token of the dropped merge is never produced any more
    merged = len(json.loads((world["a"] / "tokenizer.json").read_text())["model"]["vocab"]) - 1
    assert world["res"]["a"].counts.counts[merged] > 0 and counts.counts[merged] == 0


def test_counts_and_windows_read_no_weights(
    world: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint without its weight files counts and draws windows (fresh cache; the full
    model must not load), and gets the counts and windows of the complete checkpoint."""
    bare = _copy_without_weights(world["a"], tmp_path / "bare")

    def boom(*a: object, **k: object) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(stages_mod, "load_model", boom)
    cfg = make_config(overrides=tiny_overrides(bare, world["corpus"]))
    st = Stages(cfg, open_cache(tmp_path / "fresh", False), progress=False)
    counts, main = _shared_stages(st)
    assert st.cached == {"token_statistics": False, "sampling": False}
    ra = world["res"]["a"]
    assert np.array_equal(counts.counts, ra.counts.counts)
    assert np.array_equal(main.offsets, ra.sample.offsets)
    assert np.array_equal(main.target_mask, ra.sample.target_mask)
    assert (
        st.tokenizer_info.tokenizer == _manifest(world["root"] / "run-a")["identity"]["tokenizer"]
    )
    assert st.dims == _manifest(world["root"] / "run-a")["identity"]["dims"]


# qwen2 is left out: a saved tiny qwen2 directory loads as Qwen2Tokenizer, which adds a 301st
# token, and is refused by load_model and load_tokenizer alike
@pytest.mark.parametrize("family", [*FAMILIES, "mistral", "olmo", *NEW_FAMILIES])
def test_sizes_from_the_config_match_the_loaded_model(family: str, tmp_path: Path) -> None:
    """The meta-device sizes equal those of the loaded model; the tokenizer too."""
    path = save_tiny(tmp_path / family, family)
    lt = load_tokenizer(ModelSpec(source=str(path)))
    lm = load_model(ModelSpec(source=str(path)))
    assert lt.info.dims == model_dims(lm.adapter)
    assert lt.info.max_positions == lm.adapter.dims.max_positions
    assert lt.info.tokenizer == tokenizer_identity(lm.tokenizer, lm.adapter.dims.vocab_size)


def test_identity_ignores_location_and_call_state_but_not_content(tmp_path: Path) -> None:
    tok = tiny_tokenizer(VOCAB)
    base = tokenizer_identity(tok, VOCAB)
    tok.save_pretrained(tmp_path / "x")
    again = loading_mod.AutoTokenizer.from_pretrained(tmp_path / "x")
    again.backend_tokenizer.enable_padding(length=16)
    again.backend_tokenizer.enable_truncation(max_length=8)
    assert tokenizer_identity(again, VOCAB) == base  # saved, reloaded, padding state set
    assert tokenizer_identity(tok, VOCAB + 4)["sha256"] != base["sha256"]  # padded rows
    again.add_special_tokens({"pad_token": "<s>"})
    assert tokenizer_identity(again, VOCAB)["sha256"] != base["sha256"]  # special tokens map


def test_slow_tokenizer_identity_hashes_its_vocabulary() -> None:
    from transformers import ByT5Tokenizer

    a, b = ByT5Tokenizer(), ByT5Tokenizer()
    assert getattr(a, "backend_tokenizer", None) is None  # the slow path
    ia = tokenizer_identity(a, 384)
    assert ia == tokenizer_identity(b, 384) and ia["class"] == "ByT5Tokenizer"
    assert tokenizer_identity(ByT5Tokenizer(extra_ids=10), 384)["sha256"] != ia["sha256"]


def test_cached_windows_are_refused_for_a_shorter_context(
    world: dict[str, Any], tmp_path: Path
) -> None:
    """Windows shared through the cache still fit each model's context (window_len 64)."""
    short = tmp_path / "short"
    shutil.copytree(world["a"], short)
    cfg_json = json.loads((short / "config.json").read_text())
    cfg_json["max_position_embeddings"] = 32
    (short / "config.json").write_text(json.dumps(cfg_json))
    cfg = make_config(overrides=tiny_overrides(short, world["corpus"]))
    st = Stages(cfg, open_cache(world["cache"], False), progress=False)
    counts, _ = st.token_counts()
    assert st.cached["token_statistics"]
    with pytest.raises(ConfigError, match="more than the model context of 32"):
        st.samples(split_rare_common(counts, percentile=cfg.percentile))


def test_model_whose_tokenizer_is_not_the_keyed_one_is_refused(
    world: dict[str, Any], tmp_path: Path
) -> None:
    cfg = make_config(overrides=tiny_overrides(world["a"], world["corpus"]))
    st = Stages(cfg, open_cache(None, True), progress=False)
    real = st.tokenizer_info
    st.__dict__["tokenizer_info"] = TokenizerInfo(dict(real.tokenizer, sha256="0" * 64),
                                                  real.dims, real.max_positions)  # fmt: skip
    with pytest.raises(TokenizerMismatchError, match="not the one its token statistics"):
        _ = st.loaded


def test_sizes_come_from_the_loaded_model_when_the_config_cannot_build_it(
    world: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loading_mod, "_meta_sizes", lambda config, source: None)
    lt = load_tokenizer(ModelSpec(source=str(world["a"])))
    assert lt.info.dims is None and lt.info.vocab_size == VOCAB
    cfg = make_config(overrides=tiny_overrides(world["a"], world["corpus"]))
    st = Stages(cfg, open_cache(None, True), progress=False)
    st.__dict__["tokenizer_info"] = lt.info
    assert st.dims == _manifest(world["root"] / "run-a")["identity"]["dims"]


def test_gguf_tokenizer_identity_without_weights(tmp_path: Path) -> None:
    """A GGUF file's tokenizer: same sha as the fully loaded model's; another file with the
    same tokenizer and other weights has the same sha."""
    from test_new_families import _gguf_source_model, write_tiny_gguf

    source = _gguf_source_model("qwen3")
    p1 = write_tiny_gguf(tmp_path / "one.gguf", source)
    with torch.no_grad():
        for w in source.parameters():
            w.mul_(1.5)
    p2 = write_tiny_gguf(tmp_path / "two.gguf", source)
    i1 = load_tokenizer(ModelSpec(source=str(p1))).info
    i2 = load_tokenizer(ModelSpec(source=str(p2))).info
    assert i1 == i2
    lm = load_model(ModelSpec(source=str(p1)))
    assert i1.tokenizer == tokenizer_identity(lm.tokenizer, lm.adapter.dims.vocab_size)
    assert i1.dims == model_dims(lm.adapter)
