"""One explicit adapter per architecture family, naming the pieces the analyses need.

The paper (section 2) studies the *neurons* of the final MLP layer: the entries of the hidden
activation vector ``n = phi(W_in x + b_in)`` that the MLP output projection ``W_out`` maps back into
the residual stream. In every supported family these are the **inputs of the MLP output
projection**:

* GPT-2 (``gpt2``): ``transformer.h[l].mlp.c_proj`` input, i.e. post-GELU. ``c_proj`` is a
  ``Conv1D`` whose weight is stored ``(in, out)``, unlike ``nn.Linear`` (``(out, in)``).
* GPT-NeoX / Pythia (``gpt_neox``): ``gpt_neox.layers[l].mlp.dense_4h_to_h`` input.
* Llama family (``llama``, ``mistral``, ``qwen2``, ``olmo``): ``model.layers[l].mlp.down_proj``
  input, i.e. ``act(gate_proj x) * up_proj x`` (gated MLP).
* Qwen 3 (``qwen3``): the Llama layout plus q/k RMSNorms inside the attention module.
* Phi-3 (``phi3``): ``model.layers[l].mlp.down_proj`` input, ``act(gate x) * up x`` where
  ``gate`` / ``up`` are the first / second half of the fused ``gate_up_proj``; attention has a
  fused ``qkv_proj``.
* Gemma 2 / Gemma 3 (``gemma2``, ``gemma3_text``; ``gemma3`` is the multimodal model whose
  decoder is ``model.language_model``) and OLMo 2 (``olmo2``): ``mlp.down_proj`` input as for
  Llama, but the MLP output passes through a *post-MLP norm* (``post_feedforward_layernorm``)
  before it joins the residual stream, so a final-layer neuron no longer moves the final
  residual linearly (:meth:`ModelAdapter.post_mlp_norm`; the ablation handles it exactly, see
  :mod:`raretoken.ablation.postnorm`). Gemma's RMSNorms multiply by ``1 + w``
  (:attr:`NormSpec.unit_offset`), its embeddings are scaled by ``sqrt(d_model)`` inside the
  embedding module, and Gemma 2 soft-caps its logits (:attr:`ModelAdapter.logit_softcap`).

The family classes are defined in :mod:`raretoken.models.families` and re-exported here.

The adapters only *name* modules and weights; they compute nothing. Adapters in the style of
TransformerLens / pyvene were chosen over attribute guessing so that an unsupported layout fails
loudly (:class:`~raretoken.errors.UnsupportedArchitectureError`) instead of silently reading the
wrong tensor.

Families deliberately left out: Gemma 1 (not verified; its pieces are those of Gemma 2 without
the extra norms) and anything else whose module layout differs from the families above.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Literal, NamedTuple

import torch
from torch import nn
from transformers import PreTrainedModel

from ..errors import ConfigError, UnsupportedArchitectureError

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "GPT2Adapter",
    "Gemma2Adapter",
    "Gemma3Adapter",
    "Gemma3TextAdapter",
    "LlamaAdapter",
    "ModelAdapter",
    "ModelDims",
    "NeoXAdapter",
    "NormSpec",
    "Olmo2Adapter",
    "Phi3Adapter",
    "Qwen3Adapter",
    "adapter_for",
    "check_model_type",
]

NormKind = Literal["layernorm", "rmsnorm"]

# Model types that are known and refused on purpose, with the reason shown to the user.
_REFUSED: dict[str, str] = {
    "gemma": "Gemma 1 has not been verified: its (1 + w) RMSNorm is supported for Gemma 2 and 3, "
    "use those",
}


@dataclass(frozen=True)
class ModelDims:
    """Sizes of a decoder-only transformer.

    Attributes
    ----------
    n_layers, d_model, d_mlp:
        Number of blocks, residual width and number of MLP neurons per layer.
    n_heads, n_kv_heads, head_dim:
        Query heads, key/value heads (``< n_heads`` under grouped-query attention) and head width.
    vocab_size:
        Rows of the unembedding (may exceed the tokenizer's vocabulary: padded vocabularies).
    max_positions:
        Longest context the model was configured for (a hard limit only for learned absolute
        position embeddings, GPT-2), or ``None`` if the config does not say.
    """

    n_layers: int
    d_model: int
    d_mlp: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelDims:
        mp = data.get("max_positions")
        return cls(
            n_layers=int(data["n_layers"]),
            d_model=int(data["d_model"]),
            d_mlp=int(data["d_mlp"]),
            n_heads=int(data["n_heads"]),
            n_kv_heads=int(data["n_kv_heads"]),
            head_dim=int(data["head_dim"]),
            vocab_size=int(data["vocab_size"]),
            max_positions=None if mp is None else int(mp),
        )


@dataclass(frozen=True, eq=False)
class NormSpec:
    """The model's final norm as plain tensors (detached from the autograd graph).

    ``layernorm``: ``(x - mean(x)) / sqrt(var(x) + eps) * weight + bias`` (biased variance).
    ``rmsnorm``: ``x / sqrt(mean(x**2) + eps) * weight`` (``bias`` is ``None``).
    A non-parametric norm (OLMo) is represented with ``weight`` = ones and ``bias`` = ``None``.

    ``weight`` is always the gain the norm multiplies by. Gemma's RMSNorm stores a parameter
    ``w`` and multiplies by ``1 + w``: its spec holds ``weight = 1 + w`` (computed in at least
    float32, as transformers does) and ``unit_offset = True`` records that the model's
    parameter is ``weight - 1``.
    """

    kind: NormKind
    weight: torch.Tensor
    bias: torch.Tensor | None
    eps: float
    unit_offset: bool = False

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the norm over the last axis of ``x``; the result has ``x``'s dtype.

        Half-precision inputs are normalised in float32 (as Hugging Face does); float32 and
        float64 inputs are normalised in their own precision. Note that Hugging Face's Llama-family
        RMSNorm always computes in float32, also for float64 models, so at float64 this method is
        *more* precise than the module it describes (differences ~1e-7 relative).
        """
        out_dtype = x.dtype
        work = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        h = x.to(work)
        if self.kind == "layernorm":
            h = h - h.mean(dim=-1, keepdim=True)
        h = h * torch.rsqrt(h.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        h = h * self.weight.to(device=h.device, dtype=work)
        if self.bias is not None:
            h = h + self.bias.to(device=h.device, dtype=work)
        return h.to(out_dtype)


def _module(root: nn.Module, path: str) -> nn.Module:
    """The submodule at dotted ``path``; ``AttributeError`` if missing or not a module."""
    obj: object = root
    for name in path.split("."):
        obj = getattr(obj, name)
    if not isinstance(obj, nn.Module):
        raise AttributeError(f"{path} is not a module")
    return obj


def _module_list(root: nn.Module, path: str) -> nn.ModuleList:
    obj = _module(root, path)
    if not isinstance(obj, nn.ModuleList):
        raise AttributeError(f"{path} is not a ModuleList")
    return obj


def _linear_weight(module: nn.Module, name: str) -> torch.Tensor:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise UnsupportedArchitectureError(f"{name} has no weight tensor")
    return weight


class _ConfigSizes(NamedTuple):
    """The sizes of :class:`ModelDims` that are read from the model config."""

    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    max_positions: int | None


def _max_positions(config: Any) -> int | None:
    mp = getattr(config, "max_position_embeddings", None)
    return None if mp is None else int(mp)


class ModelAdapter(ABC):
    """Names the pieces of one architecture family (see the module docstring).

    Each family's adapter names its modules in the class attributes below (dotted paths from
    the model, or attribute names inside a block / MLP / attention module) and says how to
    read its config sizes (:meth:`_config_sizes`); the methods that find the pieces are shared.

    Layer arguments are Python-style indices: ``-1`` is the final block. Weights are returned
    detached (views sharing the model's storage; do not modify them in place).
    """

    family: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]

    # ----------------------------------------------------------------- layout (per family)
    base_path: ClassVar[str]
    """Path of the decoder stack without the LM head."""
    layers_path: ClassVar[str]
    """Path of the ``ModuleList`` holding the blocks."""
    final_norm_path: ClassVar[str]
    """Path of the final norm."""
    position_embedding_path: ClassVar[str | None] = None
    """Path of a learned absolute position embedding, if any."""
    mlp_name: ClassVar[str] = "mlp"
    """The MLP inside a block."""
    mlp_out_name: ClassVar[str]
    """The MLP output projection inside the MLP (its input is the neuron activations)."""
    mlp_in_names: ClassVar[tuple[tuple[str, str], ...]]
    """``(key, name)`` of the MLP input projections: ``("in", ...)`` or ``("up", ...)`` and
    ``("gate", ...)`` for a gated MLP."""
    attention_name: ClassVar[str]
    """The attention module inside a block."""
    attn_out_name: ClassVar[str]
    """The attention output projection inside the attention module."""
    conv1d_weights: ClassVar[bool] = False
    """Whether projection weights are stored ``(in, out)`` (GPT-2 ``Conv1D``) rather than
    ``(out, in)`` (``nn.Linear``)."""
    post_mlp_norm_name: ClassVar[str | None] = None
    """The norm inside a block applied to the MLP output before it is added to the residual
    stream (Gemma 2/3 and OLMo 2: ``post_feedforward_layernorm``), if any."""
    bos_required: ClassVar[str | None] = None
    """Why the family needs a BOS token at the start of every input (Gemma), or ``None``: the
    ``auto`` BOS policy (:mod:`raretoken.models.bos`) then follows the tokenizer."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model

    @abstractmethod
    def _config_sizes(self) -> _ConfigSizes:
        """Width, head counts and context length from ``self.model.config``."""

    # ----------------------------------------------------------------- pieces
    def base_model(self) -> nn.Module:
        """The decoder stack without the LM head (``transformer`` / ``gpt_neox`` / ``model``)."""
        return _module(self.model, self.base_path)

    def layers_module(self) -> nn.ModuleList:
        """The ``ModuleList`` holding the blocks."""
        return _module_list(self.model, self.layers_path)

    def mlp(self, layer: int) -> nn.Module:
        """The MLP module of block ``layer``."""
        return _module(self._block(layer), self.mlp_name)

    def mlp_out_proj(self, layer: int) -> nn.Module:
        """Module whose ``input[0]`` is the neuron activations ``(..., d_mlp)`` of ``layer``."""
        return _module(self.mlp(layer), self.mlp_out_name)

    def w_out(self, layer: int) -> torch.Tensor:
        """``(d_mlp, d_model)``: row ``i`` is the output weight vector of neuron ``i``."""
        return self._weight(self.mlp_out_proj(layer), self.mlp_out_name).T

    def mlp_in_weights(self, layer: int) -> dict[str, torch.Tensor]:
        """Input weights, each ``(d_mlp, d_model)``: ``{"in"}`` or, gated, ``{"up", "gate"}``."""
        mlp = self.mlp(layer)
        return {key: self._weight(_module(mlp, name), name) for key, name in self.mlp_in_names}

    def attention(self, layer: int) -> nn.Module:
        """The attention module; under eager attention its ``output[1]`` is the probabilities."""
        return _module(self._block(layer), self.attention_name)

    def attn_out_proj(self, layer: int) -> nn.Module:
        """Module whose ``input[0]`` is the head outputs concatenated ``(..., n_heads*head_dim)``."""
        return _module(self.attention(layer), self.attn_out_name)

    def final_norm_module(self) -> nn.Module:
        """The final norm; its ``input[0]`` is the final residual stream."""
        return _module(self.model, self.final_norm_path)

    def position_embedding(self) -> nn.Module | None:
        """Learned absolute position embedding added before block 0 (GPT-2 ``wpe``), if any."""
        if self.position_embedding_path is None:
            return None
        return _module(self.model, self.position_embedding_path)

    @property
    def dims(self) -> ModelDims:
        """Sizes read from the modules (and the config for width, heads and context)."""
        sizes = self._config_sizes()
        return ModelDims(
            n_layers=len(self.layers_module()),
            d_model=sizes.d_model,
            d_mlp=int(self.w_out(0).shape[0]),
            n_heads=sizes.n_heads,
            n_kv_heads=sizes.n_kv_heads,
            head_dim=sizes.head_dim,
            vocab_size=int(self.unembedding()[0].shape[0]),
            max_positions=sizes.max_positions,
        )

    # ----------------------------------------------------------------- layout checks
    def check_layout(self) -> None:
        """Check the family's pieces beyond those every family has (called by
        :func:`adapter_for`); raise :class:`UnsupportedArchitectureError` naming what differs.

        The default checks nothing more.
        """
        return None

    def _layout_error(self, what: str) -> UnsupportedArchitectureError:
        model_type = getattr(self.model.config, "model_type", None)
        return UnsupportedArchitectureError(
            f"model type {model_type!r} ({type(self.model).__name__}) does not have the "
            f"{self.family} module layout: {what}"
        )

    def _check_shape(
        self, layer: int, name: str, module: nn.Module, shape: tuple[int, int]
    ) -> None:
        """Refuse projection ``module`` unless its weight is ``(out, in)`` = ``shape``."""
        got = tuple(self._weight(module, name).shape)
        if got != shape:
            raise self._layout_error(
                f"layer {layer} {name} has weight (out, in) = {got}, expected {shape} from the config"
            )

    # ----------------------------------------------------------------- shared
    def blocks(self) -> Sequence[nn.Module]:
        """The transformer blocks in order."""
        return list(self.layers_module())

    def layer_index(self, layer: int) -> int:
        """Normalise a (possibly negative) layer index; out of range -> :class:`ConfigError`."""
        n = len(self.layers_module())
        idx = int(layer)
        if not -n <= idx < n:
            raise ConfigError(f"layer {layer} is out of range for a model with {n} layers")
        return idx % n

    def _block(self, layer: int) -> nn.Module:
        return self.layers_module()[self.layer_index(layer)]

    def _weight(self, module: nn.Module, name: str) -> torch.Tensor:
        """The detached weight of projection ``module`` as ``(out_features, in_features)``."""
        weight = _linear_weight(module, name).detach()
        return weight.T if self.conv1d_weights else weight

    def final_norm(self) -> NormSpec:
        """The final norm as a :class:`NormSpec`."""
        return self._norm_spec(self.final_norm_module(), "final norm")

    def post_mlp_norm_module(self, layer: int) -> nn.Module | None:
        """The post-MLP norm module of block ``layer`` (``None`` for families without one)."""
        if self.post_mlp_norm_name is None:
            return None
        return _module(self._block(layer), self.post_mlp_norm_name)

    def post_mlp_norm(self, layer: int) -> NormSpec | None:
        """The post-MLP norm of block ``layer`` as a :class:`NormSpec` (``None``: the MLP output
        joins the residual stream directly).

        Raises
        ------
        UnsupportedArchitectureError
            A norm of an unexpected kind, or whose weight is missing or not ``(d_model,)``.
        """
        norm = self.post_mlp_norm_module(layer)
        if norm is None:
            return None
        what = f"layer {self.layer_index(layer)} {self.post_mlp_norm_name}"
        spec = self._norm_spec(norm, what)
        d_model = self._config_sizes().d_model
        if tuple(spec.weight.shape) != (d_model,):
            raise self._layout_error(
                f"{what} has weight shape {tuple(spec.weight.shape)}, expected (d_model,) = "
                f"({d_model},)"
            )
        return spec

    @property
    def logit_softcap(self) -> float | None:
        """``c`` of the final-logit soft-capping ``z -> c tanh(z / c)``, or ``None``."""
        return None

    def _norm_spec(self, norm: nn.Module, what: str) -> NormSpec:
        """Read a LayerNorm / RMSNorm module (``what`` names it in errors)."""
        if isinstance(norm, nn.LayerNorm):
            if norm.weight is None:
                raise self._layout_error(f"{what} is a LayerNorm without affine weight")
            bias = None if norm.bias is None else norm.bias.detach()
            return NormSpec("layernorm", norm.weight.detach(), bias, float(norm.eps))
        eps = getattr(norm, "variance_epsilon", None)
        weight = getattr(norm, "weight", None)
        if eps is not None and isinstance(weight, torch.Tensor):
            return NormSpec("rmsnorm", weight.detach(), None, float(eps))
        if type(norm).__name__ == "OlmoLayerNorm":
            # Non-parametric LayerNorm with eps hard-coded to 1e-5 in transformers.
            d_model = self.dims.d_model
            w_u = self.unembedding()[0]
            ones = torch.ones(d_model, dtype=w_u.dtype, device=w_u.device)
            return NormSpec("layernorm", ones, None, 1e-5)
        raise self._layout_error(f"{what} is an unsupported norm ({type(norm).__name__})")

    def unembedding(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``W_U`` ``(vocab, d_model)`` and ``b_U`` ``(vocab,)`` or ``None``."""
        head = self.model.get_output_embeddings()
        if not isinstance(head, nn.Linear):
            raise UnsupportedArchitectureError("the model has no linear LM head")
        bias = None if head.bias is None else head.bias.detach()
        return head.weight.detach(), bias

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The final hidden states ``(batch, seq, d_model)`` (after the final norm), without
        running the LM head over every position."""
        out = self.base_model()(input_ids=input_ids)
        return out[0] if isinstance(out, tuple) else out.last_hidden_state

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of final hidden states: the LM head, then the soft-capping
        ``c tanh(z / c)`` of :attr:`logit_softcap` where the family has one."""
        head = self.model.get_output_embeddings()
        logits = head(hidden)
        cap = self.logit_softcap
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits


# The family classes live in families.py (they import the base class above); re-exported here.
from .families import (  # noqa: E402
    Gemma2Adapter,
    Gemma3Adapter,
    Gemma3TextAdapter,
    GPT2Adapter,
    LlamaAdapter,
    NeoXAdapter,
    Olmo2Adapter,
    Phi3Adapter,
    Qwen3Adapter,
)

_ADAPTERS: tuple[type[ModelAdapter], ...] = (
    GPT2Adapter,
    NeoXAdapter,
    LlamaAdapter,
    Qwen3Adapter,
    Phi3Adapter,
    Gemma2Adapter,
    Gemma3TextAdapter,
    Gemma3Adapter,
    Olmo2Adapter,
)
_BY_MODEL_TYPE: dict[str, type[ModelAdapter]] = {
    mt: cls for cls in _ADAPTERS for mt in cls.model_types
}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(_BY_MODEL_TYPE)


def _supported_text() -> str:
    return "; ".join(f"{cls.family} ({', '.join(cls.model_types)})" for cls in _ADAPTERS)


def check_model_type(model_type: str | None) -> type[ModelAdapter]:
    """The adapter class for a Hugging Face ``config.model_type``.

    Raises
    ------
    UnsupportedArchitectureError
        For unknown or deliberately refused model types; the message names the supported ones.
    """
    cls = _BY_MODEL_TYPE.get(str(model_type))
    if cls is not None:
        return cls
    reason = _REFUSED.get(str(model_type))
    why = f" ({reason})" if reason else ""
    raise UnsupportedArchitectureError(
        f"model type {model_type!r} is not supported{why}; supported families (model types): "
        f"{_supported_text()}"
    )


def adapter_for(model: PreTrainedModel) -> ModelAdapter:
    """The adapter for ``model``, chosen by ``model.config.model_type``.

    The module layout is checked too (a base model without LM head, or a model whose blocks lack
    the expected projections, is refused with :class:`UnsupportedArchitectureError`).
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    cls = check_model_type(model_type)
    adapter = cls(model)
    try:
        layers = adapter.layers_module()
        if len(layers) == 0:
            raise UnsupportedArchitectureError("the model has no transformer blocks")
        adapter.w_out(0)
        adapter.mlp_in_weights(0)
        adapter.attn_out_proj(0)
        adapter.final_norm_module()
        adapter.unembedding()
        adapter.check_layout()
    except AttributeError as exc:
        raise UnsupportedArchitectureError(
            f"model type {model_type!r} ({type(model).__name__}) does not have the "
            f"{cls.family} module layout "
            f"(a causal-LM class with an LM head is required): {exc}"
        ) from exc
    return adapter
