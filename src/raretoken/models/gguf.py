"""Read and check a GGUF file's header before anything is loaded from it.

:func:`gguf_architecture` reads ``general.architecture`` from the header of a GGUF file
(memory-mapped, no tensor data touched) and checks the header as a whole, so that a truncated
or corrupt file fails with a one-line :class:`~raretoken.errors.ModelLoadError`.
:func:`gguf_model_type` maps the GGUF architecture to the Hugging Face ``model_type``
(:data:`GGUF_MODEL_TYPES`), and :func:`check_gguf` refuses an architecture without adapter or
one the installed transformers cannot read from GGUF. :mod:`raretoken.models.loading` applies
:func:`check_gguf` before transformers is called and re-exports these names.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from pathlib import Path
from typing import Any

import transformers

from ..errors import ModelLoadError, UnsupportedArchitectureError
from .adapters import SUPPORTED_MODEL_TYPES, check_model_type

__all__ = [
    "GGUF_MODEL_TYPES",
    "check_gguf",
    "gguf_architecture",
    "gguf_model_type",
]


def _one_line(exc: BaseException, limit: int = 300) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# GGUF ``general.architecture`` -> Hugging Face ``config.model_type`` where the two differ; every
# other architecture keeps its name ("llama", "gpt2", "qwen2", "mistral", "olmo", "bert", ...).
# Mirrors the renames transformers applies in ``load_gguf_checkpoint``
# (``transformers/modeling_gguf_pytorch_utils.py``, 5.x), plus llama.cpp's "gptneox".
# (transformers also turns a "llama" GGUF whose ``general.name`` is "mistral" into "mistral";
# both are Llama-layout models here, so that case needs no entry.)
GGUF_MODEL_TYPES: dict[str, str] = {
    "gptneox": "gpt_neox",
    "qwen2moe": "qwen2_moe",
    "qwen3moe": "qwen3_moe",
    "gpt-oss": "gpt_oss",
    "minimax-m2": "minimax_m2",
    "gemma3": "gemma3_text",
    "gemma4": "gemma4_text",
    "t5encoder": "t5",
}

_GGUF_VERSIONS = (2, 3)
_GGUF_KEY_ARCH = "general.architecture"
_GGUF_KEY_ALIGN = "general.alignment"


class _GGUFTruncatedError(Exception):
    pass


class _GGUFHeader:
    """Sequential reader of a GGUF header over a memory map (touches only the header pages).

    Layout (GGUF v2/v3): magic ``GGUF``, u32 version, u64 tensor count, u64 metadata count,
    the metadata key/value pairs, the tensor infos (name, u32 n_dims, u64 dims, u32 type,
    u64 offset), padding to ``general.alignment``, then the tensor data. Value types and quant
    block sizes come from the ``gguf`` package.
    """

    def __init__(self, buf: mmap.mmap) -> None:
        import gguf

        self.buf = buf
        self.size = len(buf)
        self.endian = "<"
        self.pos = 0
        vt = gguf.GGUFValueType
        self.string_type = int(vt.STRING)
        self.array_type = int(vt.ARRAY)
        self.scalars: dict[int, str] = {
            int(vt.UINT8): "B",
            int(vt.INT8): "b",
            int(vt.UINT16): "H",
            int(vt.INT16): "h",
            int(vt.UINT32): "I",
            int(vt.INT32): "i",
            int(vt.FLOAT32): "f",
            int(vt.BOOL): "?",
            int(vt.UINT64): "Q",
            int(vt.INT64): "q",
            int(vt.FLOAT64): "d",
        }

    def take(self, n: int) -> int:
        """Advance over ``n`` bytes; return where they start."""
        if n < 0 or self.pos + n > self.size:
            raise _GGUFTruncatedError
        start = self.pos
        self.pos += n
        return start

    def unpack(self, fmt: str) -> Any:
        start = self.take(struct.calcsize(fmt))
        return struct.unpack_from(self.endian + fmt, self.buf, start)[0]

    def string(self) -> bytes:
        n = self.unpack("Q")
        start = self.take(n)
        return bytes(self.buf[start : start + n])

    def value(self, vtype: int, keep: bool) -> Any:
        """Read (``keep``) or skip one metadata value of GGUF value type ``vtype``."""
        if vtype == self.string_type:
            if keep:
                return self.string()
            self.take(self.unpack("Q"))
            return None
        if vtype == self.array_type:
            item_type = self.unpack("I")
            count = self.unpack("Q")
            if item_type in self.scalars:
                self.take(count * struct.calcsize(self.scalars[item_type]))
            else:
                for _ in range(count):
                    self.value(item_type, keep=False)
            return None
        if vtype not in self.scalars:
            raise ValueError(f"unknown metadata value type {vtype}")
        if keep:
            return self.unpack(self.scalars[vtype])
        self.take(struct.calcsize(self.scalars[vtype]))
        return None


def _read_gguf_header(buf: mmap.mmap) -> str | None:
    """``general.architecture`` (``None`` when absent) of a GGUF file, after checking that the
    header parses and that the file is long enough to hold every tensor's data."""
    import gguf

    head = _GGUFHeader(buf)
    if head.unpack("I") != gguf.GGUF_MAGIC:
        raise ValueError("no GGUF magic number at the start")
    version = head.unpack("I")
    if version & 0xFFFF == 0:  # written with the other byte order (as gguf.GGUFReader tells)
        head.endian = ">"
        version = struct.unpack(">I", struct.pack("<I", version))[0]
    if version not in _GGUF_VERSIONS:
        raise ValueError(f"unsupported GGUF version {version}")
    n_tensors = head.unpack("Q")
    n_kv = head.unpack("Q")
    architecture: str | None = None
    alignment = gguf.GGUF_DEFAULT_ALIGNMENT
    arch_key, align_key = _GGUF_KEY_ARCH.encode(), _GGUF_KEY_ALIGN.encode()
    for _ in range(n_kv):
        key = head.string()
        vtype = head.unpack("I")
        value = head.value(vtype, keep=key in (arch_key, align_key))
        if key == arch_key:
            if vtype != head.string_type:
                raise ValueError(f"{_GGUF_KEY_ARCH} is not a string")
            architecture = value.decode("utf-8", errors="replace")
        elif key == align_key:
            if vtype != gguf.GGUFValueType.UINT32 or value <= 0 or value & (value - 1):
                raise ValueError(f"invalid {_GGUF_KEY_ALIGN}")
            alignment = int(value)
    data_end = 0
    for _ in range(n_tensors):
        name = head.string()
        n_dims = head.unpack("I")
        n_elements = math.prod(head.unpack("Q") for _ in range(n_dims))
        qtype = head.unpack("I")
        offset = head.unpack("Q")
        try:
            block_size, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]
        except (ValueError, KeyError):
            raise ValueError(f"tensor {name!r} has unknown data type {qtype}") from None
        data_end = max(data_end, offset + n_elements // block_size * type_size)
    data_start = -(-head.pos // alignment) * alignment
    if data_start + data_end > head.size:
        raise _GGUFTruncatedError
    return architecture


def gguf_architecture(path: str | os.PathLike[str]) -> str:
    """The ``general.architecture`` of a GGUF file (e.g. ``"llama"``), read from its header.

    The file is memory-mapped and only its header is read (no tensor data), so this is cheap even
    for large models. The header is checked as a whole: the magic number, the version, every
    metadata entry and tensor info, and that the file is long enough for the tensor data.

    Raises
    ------
    ModelLoadError
        A missing or unreadable file, a file that is not GGUF, a truncated file, or a GGUF file
        without ``general.architecture``.
    """
    path = Path(path)
    try:
        with path.open("rb") as fh:
            if os.fstat(fh.fileno()).st_size == 0:
                raise ValueError("the file is empty")
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                architecture = _read_gguf_header(buf)
    except _GGUFTruncatedError:
        raise ModelLoadError(
            f"GGUF file {str(path)!r} is truncated or corrupt: it ends before its header or "
            "tensor data does (an interrupted download?)"
        ) from None
    except (OSError, ValueError, OverflowError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{str(path)!r} is not a valid GGUF file: {_one_line(exc)}") from None
    if not architecture:
        raise ModelLoadError(f"GGUF file {str(path)!r} has no {_GGUF_KEY_ARCH} entry")
    return str(architecture)


def gguf_model_type(architecture: str) -> str:
    """The Hugging Face ``model_type`` of a GGUF ``general.architecture`` (see
    :data:`GGUF_MODEL_TYPES`)."""
    return GGUF_MODEL_TYPES.get(architecture, architecture)


def _transformers_gguf_architectures() -> frozenset[str] | None:
    """The GGUF architectures the installed transformers can load (``None`` if unknown)."""
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    except Exception:  # an older/newer transformers without the table: let it decide
        return None
    return frozenset(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"}


def check_gguf(path: Path) -> str:
    """Refuse an unusable GGUF file from its header alone, before anything is loaded; return the
    Hugging Face ``model_type`` of its architecture.

    Raises
    ------
    ModelLoadError
        Not a valid GGUF file (see :func:`gguf_architecture`).
    UnsupportedArchitectureError
        An architecture without adapter, or one transformers cannot read from GGUF.
    """
    architecture = gguf_architecture(path)
    model_type = gguf_model_type(architecture)
    try:
        check_model_type(model_type)
    except UnsupportedArchitectureError as exc:
        raise UnsupportedArchitectureError(
            f"GGUF file {path.name!r} has architecture {architecture!r}: {exc}"
        ) from None
    readable = _transformers_gguf_architectures()
    if readable is not None and architecture not in readable and model_type not in readable:
        named = f" (model type {model_type!r})" if model_type != architecture else ""
        usable = sorted(a for a in readable if gguf_model_type(a) in SUPPORTED_MODEL_TYPES)
        raise UnsupportedArchitectureError(
            f"GGUF file {path.name!r} has architecture {architecture!r}{named}, which "
            f"transformers {transformers.__version__} cannot load from GGUF; use the model's "
            f"Hugging Face checkpoint instead (supported GGUF architectures: {', '.join(usable)})"
        )
    return model_type
