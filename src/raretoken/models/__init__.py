"""Model adapters, loading, hooks and the tail runner."""

from __future__ import annotations

from .adapters import (
    SUPPORTED_MODEL_TYPES,
    Gemma2Adapter,
    Gemma3Adapter,
    Gemma3TextAdapter,
    GPT2Adapter,
    LlamaAdapter,
    ModelAdapter,
    ModelDims,
    NeoXAdapter,
    NormSpec,
    Olmo2Adapter,
    Phi3Adapter,
    Qwen3Adapter,
    adapter_for,
    check_model_type,
)
from .bos import BosChoice, resolve_bos
from .hooks import (
    ablate_heads,
    attention_patterns,
    attention_visibility,
    capture_input,
    replace_input,
)
from .loading import LoadedModel, ModelSpec, embedded_model_path, load_model
from .tail import run_from_layer

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "BosChoice",
    "GPT2Adapter",
    "Gemma2Adapter",
    "Gemma3Adapter",
    "Gemma3TextAdapter",
    "LlamaAdapter",
    "LoadedModel",
    "ModelAdapter",
    "ModelDims",
    "ModelSpec",
    "NeoXAdapter",
    "NormSpec",
    "Olmo2Adapter",
    "Phi3Adapter",
    "Qwen3Adapter",
    "ablate_heads",
    "adapter_for",
    "attention_patterns",
    "attention_visibility",
    "capture_input",
    "check_model_type",
    "embedded_model_path",
    "load_model",
    "replace_input",
    "resolve_bos",
    "run_from_layer",
]
