"""A GGUF file is checked from its header before transformers reads anything."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

import raretoken.models.loading as loading_mod
from raretoken.cli import main
from raretoken.errors import ModelLoadError, UnsupportedArchitectureError
from raretoken.models.loading import (
    ModelSpec,
    check_gguf,
    embedded_model_path,
    gguf_architecture,
    gguf_model_type,
    load_model,
)


def write_gguf(
    path: Path,
    arch: str,
    *,
    tensor: bool = True,
    big_endian: bool = False,
    alignment: int | None = None,
    arch_last: bool = False,
    drop_arch: bool = False,
) -> Path:
    """A tiny GGUF file: some metadata (strings, numbers, arrays) and one small tensor."""
    endian = gguf.GGUFEndian.BIG if big_endian else gguf.GGUFEndian.LITTLE
    w = gguf.GGUFWriter(path, arch, endianess=endian)
    w.add_name("tiny test model")
    w.add_uint32(f"{arch}.block_count", 2)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_bool("test.flag", True)
    w.add_array("tokenizer.ggml.tokens", ["a", "bb", "ccc", "<s>"])
    w.add_array("tokenizer.ggml.scores", [0.0, -1.0, -2.0, -3.0])
    if alignment is not None:
        w.add_custom_alignment(alignment)
    kv = w.kv_data[0]
    if arch_last:
        kv["general.architecture"] = kv.pop("general.architecture")
    if drop_arch:
        del kv["general.architecture"]
    if tensor:
        w.add_tensor("token_embd.weight", np.arange(24, dtype=np.float32).reshape(4, 6))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def no_transformers(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make every transformers loader used by ``load_model`` fail the test if it is called."""
    called: list[str] = []

    def forbid(name: str) -> Any:
        def fail(*args: Any, **kwargs: Any) -> Any:
            called.append(name)
            pytest.fail(f"{name}.from_pretrained was called before the GGUF precheck refused")

        return fail

    for name in ("AutoConfig", "AutoTokenizer", "AutoModelForCausalLM"):
        monkeypatch.setattr(getattr(loading_mod, name), "from_pretrained", forbid(name))
    return called


def _one_line(text: str) -> None:
    assert "\n" not in text.strip()


@pytest.mark.parametrize("arch", ["bert", "mamba"])
def test_unsupported_gguf_refused_before_transformers(
    tmp_path: Path, arch: str, no_transformers: list[str]
) -> None:
    path = write_gguf(tmp_path / f"tiny-{arch}.gguf", arch)
    with pytest.raises(UnsupportedArchitectureError) as info:
        load_model(ModelSpec(source=str(path)))
    msg = str(info.value)
    _one_line(msg)
    assert f"tiny-{arch}.gguf" in msg and f"architecture {arch!r}" in msg
    assert "supported families" in msg and "llama" in msg and "gpt2" in msg
    assert no_transformers == []


def test_unsupported_gguf_inside_a_directory(tmp_path: Path, no_transformers: list[str]) -> None:
    write_gguf(tmp_path / "m.gguf", "bert", tensor=False)
    with pytest.raises(UnsupportedArchitectureError, match=r"'m\.gguf' has architecture 'bert'"):
        load_model(ModelSpec(source=str(tmp_path), gguf_file="m.gguf"))
    assert no_transformers == []


def test_gguf_architecture_transformers_cannot_read(
    tmp_path: Path, no_transformers: list[str]
) -> None:
    # GPT-NeoX has an adapter, but transformers has no GGUF loader for llama.cpp's "gptneox".
    readable = loading_mod._transformers_gguf_architectures()
    if readable is None or "gptneox" in readable or "gpt_neox" in readable:
        pytest.skip("this transformers reads gptneox GGUF files")
    path = write_gguf(tmp_path / "neox.gguf", "gptneox")
    assert gguf_model_type("gptneox") == "gpt_neox"
    with pytest.raises(UnsupportedArchitectureError, match="cannot load from GGUF") as info:
        load_model(ModelSpec(source=str(path)))
    _one_line(str(info.value))
    assert no_transformers == []


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"tensor": False},
        {"big_endian": True},
        {"alignment": 64},
        {"arch_last": True},
    ],
)
def test_gguf_architecture_agrees_with_gguf_reader(tmp_path: Path, options: dict[str, Any]) -> None:
    path = write_gguf(tmp_path / "m.gguf", "llama", **options)
    assert gguf_architecture(path) == "llama"
    assert gguf.GGUFReader(path).fields["general.architecture"].contents() == "llama"
    assert check_gguf(path) == "llama"


def test_supported_architectures_pass(tmp_path: Path) -> None:
    for arch in ("llama", "gpt2", "qwen2", "mistral"):
        assert check_gguf(write_gguf(tmp_path / f"{arch}.gguf", arch)) == arch
    assert gguf_model_type("qwen2moe") == "qwen2_moe"
    assert gguf_model_type("gemma3") == "gemma3_text"


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    good = write_gguf(tmp_path / "good.gguf", "llama").read_bytes()
    header_only = write_gguf(tmp_path / "header.gguf", "llama", tensor=False).read_bytes()
    files = {
        "empty": b"",
        "garbage": b"this is not a GGUF file at all\n" * 10,
        "magic only": b"GGUF",
        "bad version": b"GGUF" + (99).to_bytes(4, "little") + bytes(16),
        "cut in metadata": header_only[: len(header_only) // 2],
        "cut in tensor data": good[:-8],
        "huge string length": good[:24] + (2**62).to_bytes(8, "little") + good[32:],
    }
    out = {}
    for name, data in files.items():
        path = tmp_path / (name.replace(" ", "_") + ".gguf")
        path.write_bytes(data)
        out[name] = path
    out["no architecture"] = write_gguf(tmp_path / "noarch.gguf", "llama", drop_arch=True)
    return out


def test_invalid_gguf_files_are_load_errors(tmp_path: Path, no_transformers: list[str]) -> None:
    for name, path in _bad_files(tmp_path).items():
        with pytest.raises(ModelLoadError) as info:
            gguf_architecture(path)
        _one_line(str(info.value))
        assert path.name in str(info.value), name
        with pytest.raises(ModelLoadError):
            load_model(ModelSpec(source=str(path)))
    assert no_transformers == []


def test_missing_file_is_a_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError):
        gguf_architecture(tmp_path / "nope.gguf")


def _run_cli(model: Path, tmp_path: Path) -> int:
    # (nothing is asserted about the run directory: when it is created is not this test's topic)
    return main(
        [
            "run",
            "--model",
            str(model),
            "--out",
            str(tmp_path / "run"),
            "--cache-dir",
            str(tmp_path / "c"),
            "--no-progress",
        ]
    )


def test_cli_refuses_unsupported_gguf_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_transformers: list[str]
) -> None:
    bad = write_gguf(tmp_path / "bert.gguf", "bert")
    code = _run_cli(bad, tmp_path)
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert len(err) == 1 and err[0].startswith("error: ")
    assert "bert.gguf" in err[0] and "'bert'" in err[0]
    assert no_transformers == []


def test_cli_refuses_garbage_gguf_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_transformers: list[str]
) -> None:
    bad = tmp_path / "garbage.gguf"
    bad.write_bytes(b"\x00" * 100)
    code = _run_cli(bad, tmp_path)
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert len(err) == 1 and err[0].startswith("error: ") and "not a valid GGUF" in err[0]
    assert no_transformers == []


@pytest.mark.slow
def test_embedded_model_reads_as_llama_quickly() -> None:
    path = embedded_model_path()
    t = time.perf_counter()
    assert gguf_architecture(path) == "llama"
    assert check_gguf(path) == "llama"
    assert time.perf_counter() - t < 2.0  # header only: gguf.GGUFReader needs ~2.5 s here
