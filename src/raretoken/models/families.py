"""The adapter of each supported architecture family (see :mod:`raretoken.models.adapters`).

Each class names its family's modules in class attributes; the shared machinery, the registry
(:func:`~raretoken.models.adapters.check_model_type`, :func:`~raretoken.models.adapters.adapter_for`)
and the re-exports live in :mod:`raretoken.models.adapters`, which is where these classes should
be imported from.

Families with pieces beyond the common ones check them in :meth:`ModelAdapter.check_layout`
(called by ``adapter_for``), so that a config whose modules disagree with it is refused with one
line naming the model type and what differs:

* Qwen 3 (``qwen3``): the Llama layout plus RMSNorms over the head dimension on queries and keys
  (``self_attn.q_norm`` / ``k_norm``) and an explicit ``head_dim`` (``n_heads * head_dim`` may
  differ from ``d_model``). The norms live inside the attention module, which the analyses always
  run through, so nothing else changes.
* Phi-3 (``phi3``, also Phi-3.5 and Phi-4-mini): the Llama layout with fused projections:
  ``mlp.gate_up_proj`` holds the gate rows then the up rows (transformers' ``Phi3MLP``:
  ``gate, up = gate_up_proj(x).chunk(2, dim=-1)``; ``n = act(gate) * up``), and
  ``self_attn.qkv_proj`` holds the query rows, then the key rows, then the value rows.
* Gemma 2 (``gemma2``), Gemma 3 (``gemma3_text``; ``gemma3``: the multimodal model, whose text
  decoder is ``model.language_model`` and whose sizes are in ``config.text_config``): the Llama
  layout with four RMSNorms per block (``input_layernorm``, ``post_attention_layernorm``,
  ``pre_feedforward_layernorm``, ``post_feedforward_layernorm``), each multiplying by
  ``1 + w``; Gemma 3 adds q/k norms over the head dimension. Gemma 2's ``Gemma2ForCausalLM``
  (and ``Gemma3ForCausalLM`` when its config sets one) soft-caps the logits with
  ``final_logit_softcapping``; ``Gemma3ForConditionalGeneration`` never does. The sliding-window
  layers, the attention-score soft-capping and the ``sqrt(d_model)`` embedding scale live
  inside the modules and the model's own forward, which the analyses always go through.
* OLMo 2 (``olmo2``): the Llama layout without input norms; ``post_attention_layernorm`` and
  ``post_feedforward_layernorm`` normalise the attention and MLP outputs, and ``q_norm`` /
  ``k_norm`` normalise the whole query / key projections (``n_heads * head_dim`` and
  ``n_kv_heads * head_dim`` wide), not each head.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

import torch
from torch import nn

from .adapters import ModelAdapter, NormSpec, _ConfigSizes, _max_positions, _module

__all__ = [
    "GPT2Adapter",
    "Gemma2Adapter",
    "Gemma3Adapter",
    "Gemma3TextAdapter",
    "LlamaAdapter",
    "NeoXAdapter",
    "Olmo2Adapter",
    "Phi3Adapter",
    "Qwen3Adapter",
]


def _gqa_config_sizes(cfg: Any) -> _ConfigSizes:
    """Sizes of a Llama-style config (grouped-query attention, optional explicit ``head_dim``)."""
    d_model = int(cfg.hidden_size)
    n_heads = int(cfg.num_attention_heads)
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    head_dim = getattr(cfg, "head_dim", None) or d_model // n_heads
    return _ConfigSizes(d_model, n_heads, int(n_kv), int(head_dim), _max_positions(cfg))


class GPT2Adapter(ModelAdapter):
    """GPT-2: ``transformer.h[l]`` with ``Conv1D`` projections, ``ln_f`` and a tied LM head."""

    family = "gpt2"
    model_types = ("gpt2",)

    base_path = "transformer"
    layers_path = "transformer.h"
    final_norm_path = "transformer.ln_f"
    position_embedding_path = "transformer.wpe"
    mlp_out_name = "c_proj"
    mlp_in_names = (("in", "c_fc"),)
    attention_name = "attn"
    attn_out_name = "c_proj"
    # Conv1D stores its weight as (in_features, out_features): c_proj's is (d_mlp, d_model).
    conv1d_weights = True

    def _config_sizes(self) -> _ConfigSizes:
        cfg = self.model.config
        d_model = int(cfg.n_embd)
        n_heads = int(cfg.n_head)
        return _ConfigSizes(d_model, n_heads, n_heads, d_model // n_heads, int(cfg.n_positions))


class NeoXAdapter(ModelAdapter):
    """GPT-NeoX / Pythia: ``gpt_neox.layers[l]``, ``final_layer_norm``, untied LM head.

    The LM head is ``embed_out`` in transformers 4.x and ``lm_head`` in 5.x; it is found through
    ``get_output_embeddings()``.
    """

    family = "neox"
    model_types = ("gpt_neox",)

    base_path = "gpt_neox"
    layers_path = "gpt_neox.layers"
    final_norm_path = "gpt_neox.final_layer_norm"
    mlp_out_name = "dense_4h_to_h"
    mlp_in_names = (("in", "dense_h_to_4h"),)
    attention_name = "attention"
    attn_out_name = "dense"

    def _config_sizes(self) -> _ConfigSizes:
        cfg = self.model.config
        d_model = int(cfg.hidden_size)
        n_heads = int(cfg.num_attention_heads)
        return _ConfigSizes(d_model, n_heads, n_heads, d_model // n_heads, _max_positions(cfg))


class LlamaAdapter(ModelAdapter):
    """Llama layout: ``model.layers[l]`` with gated MLP, ``model.norm``, ``lm_head``.

    Also used for Mistral, Qwen2 and OLMo (v1), whose module layout is identical; their
    differences (sliding-window masks, q/k/v biases, non-parametric LayerNorm) live inside the
    modules or the model's own forward, which the analyses always go through.
    """

    family = "llama"
    model_types: ClassVar[tuple[str, ...]] = ("llama", "mistral", "qwen2", "olmo")

    base_path = "model"
    layers_path = "model.layers"
    final_norm_path = "model.norm"
    mlp_out_name = "down_proj"
    mlp_in_names: ClassVar[tuple[tuple[str, str], ...]] = (("up", "up_proj"), ("gate", "gate_proj"))
    attention_name = "self_attn"
    attn_out_name = "o_proj"

    def _config_sizes(self) -> _ConfigSizes:
        return _gqa_config_sizes(self.model.config)


class Qwen3Adapter(LlamaAdapter):
    """Qwen 3: the Llama layout plus ``q_norm`` / ``k_norm`` over the head dimension.

    Checked (:meth:`check_layout`): every block's attention has both norms, each with a weight of
    ``head_dim`` entries, and the query / key / output projections have the widths of the config.
    """

    family = "qwen3"
    model_types = ("qwen3",)

    def check_layout(self) -> None:
        dims = self.dims
        want = {
            "q_proj": (dims.n_heads * dims.head_dim, dims.d_model),
            "k_proj": (dims.n_kv_heads * dims.head_dim, dims.d_model),
            "o_proj": (dims.d_model, dims.n_heads * dims.head_dim),
        }
        for layer in range(dims.n_layers):
            attn = self.attention(layer)
            for name in ("q_norm", "k_norm"):
                norm = getattr(attn, name, None)
                weight = getattr(norm, "weight", None)
                if not isinstance(weight, torch.Tensor):
                    raise self._layout_error(f"layer {layer} attention has no {name} weight")
                if tuple(weight.shape) != (dims.head_dim,):
                    raise self._layout_error(
                        f"layer {layer} {name} has weight shape {tuple(weight.shape)}, expected "
                        f"(head_dim,) = ({dims.head_dim},)"
                    )
            for name, shape in want.items():
                self._check_shape(layer, f"self_attn.{name}", _module(attn, name), shape)


class Phi3Adapter(LlamaAdapter):
    """Phi-3: the Llama layout with fused ``gate_up_proj`` (MLP) and ``qkv_proj`` (attention).

    The neurons are still the input of ``mlp.down_proj``. :meth:`mlp_in_weights` splits the fused
    weight into its gate rows (first half) and up rows (second half), in the order transformers'
    ``Phi3MLP`` uses. Head ablation acts on the input of ``self_attn.o_proj``, as for Llama.
    """

    family = "phi3"
    model_types = ("phi3",)

    mlp_in_names = (("gate_up", "gate_up_proj"),)
    """The fused projection; :meth:`mlp_in_weights` returns its halves as ``up`` and ``gate``."""
    qkv_name = "qkv_proj"

    def mlp_in_weights(self, layer: int) -> dict[str, torch.Tensor]:
        """``{"up", "gate"}``, each ``(d_mlp, d_model)``: the halves of ``gate_up_proj``.

        Raises
        ------
        UnsupportedArchitectureError
            If the fused weight does not have ``2 * d_mlp`` rows (``d_mlp`` = width of
            ``down_proj``'s input).
        """
        name = self.mlp_in_names[0][1]
        fused = self._weight(_module(self.mlp(layer), name), name)
        d_mlp = int(self.w_out(layer).shape[0])
        rows = int(fused.shape[0])
        if rows != 2 * d_mlp:
            what = f"an odd number of output rows ({rows})" if rows % 2 else f"{rows} output rows"
            raise self._layout_error(
                f"layer {self.layer_index(layer)} mlp.{name} has {what}, expected "
                f"2 * d_mlp = {2 * d_mlp} (gate rows, then up rows)"
            )
        return {"up": fused[d_mlp:], "gate": fused[:d_mlp]}

    def check_layout(self) -> None:
        dims = self.dims
        qkv_rows = (dims.n_heads + 2 * dims.n_kv_heads) * dims.head_dim
        for layer in range(dims.n_layers):
            self.mlp_in_weights(layer)
            attn = self.attention(layer)
            self._check_shape(
                layer, f"self_attn.{self.qkv_name}", _module(attn, self.qkv_name),
                (qkv_rows, dims.d_model),
            )  # fmt: skip
            self._check_shape(
                layer, f"self_attn.{self.attn_out_name}", _module(attn, self.attn_out_name),
                (dims.d_model, dims.n_heads * dims.head_dim),
            )  # fmt: skip


class _PostNormAdapter(LlamaAdapter):
    """Llama layout plus the per-block norms of :attr:`block_norm_names` (one of them, the
    post-MLP norm, after the MLP) and q/k norms of the widths :meth:`_qk_norm_widths` gives.

    :meth:`check_layout` checks, in every block, that each norm exists, is of the family's kind
    and has a ``(d_model,)`` weight, that the q/k norms have the expected widths, and that the
    query / key / output projections have the config's widths.
    """

    block_norm_names: ClassVar[tuple[str, ...]]
    post_mlp_norm_name = "post_feedforward_layernorm"

    def _qk_norm_widths(self) -> dict[str, int]:
        """Expected weight length of each q/k norm inside the attention module (none here)."""
        return {}

    def check_layout(self) -> None:
        dims = self.dims
        self.final_norm()  # the final norm is of the family's kind
        want = {
            "q_proj": (dims.n_heads * dims.head_dim, dims.d_model),
            "k_proj": (dims.n_kv_heads * dims.head_dim, dims.d_model),
            "o_proj": (dims.d_model, dims.n_heads * dims.head_dim),
        }
        for layer in range(dims.n_layers):
            block = self._block(layer)
            for name in self.block_norm_names:
                norm = getattr(block, name, None)
                if not isinstance(norm, nn.Module):
                    raise self._layout_error(f"layer {layer} has no {name}")
                spec = self._norm_spec(norm, f"layer {layer} {name}")
                if tuple(spec.weight.shape) != (dims.d_model,):
                    raise self._layout_error(
                        f"layer {layer} {name} has weight shape {tuple(spec.weight.shape)}, "
                        f"expected (d_model,) = ({dims.d_model},)"
                    )
            attn = self.attention(layer)
            for name, width in self._qk_norm_widths().items():
                weight = getattr(getattr(attn, name, None), "weight", None)
                if not isinstance(weight, torch.Tensor):
                    raise self._layout_error(f"layer {layer} attention has no {name} weight")
                if tuple(weight.shape) != (width,):
                    raise self._layout_error(
                        f"layer {layer} self_attn.{name} has weight shape "
                        f"{tuple(weight.shape)}, expected ({width},)"
                    )
            for name, shape in want.items():
                self._check_shape(layer, f"self_attn.{name}", _module(attn, name), shape)


_GEMMA_NORM = re.compile(r"Gemma\d*RMSNorm")


class Gemma2Adapter(_PostNormAdapter):
    """Gemma 2: ``(1 + w)`` RMSNorms (four per block), post-MLP norm, logit soft-capping.

    Every norm is read as a :class:`NormSpec` with ``weight = 1 + w`` (in float32 for
    half-precision models, as transformers computes it) and ``unit_offset = True``; a norm
    module of another class (a model whose config says Gemma but whose modules do not) is
    refused.
    """

    family = "gemma2"
    model_types: ClassVar[tuple[str, ...]] = ("gemma2",)
    bos_required = (
        "Gemma is trained with <bos> opening every sequence (its tokenizer always adds it) and "
        "its predictions degrade badly without it"
    )
    block_norm_names: ClassVar[tuple[str, ...]] = (
        "input_layernorm",
        "post_attention_layernorm",
        "pre_feedforward_layernorm",
        "post_feedforward_layernorm",
    )

    def _text_config(self) -> Any:
        return self.model.config

    def _config_sizes(self) -> _ConfigSizes:
        return _gqa_config_sizes(self._text_config())

    @property
    def logit_softcap(self) -> float | None:
        cap = getattr(self._text_config(), "final_logit_softcapping", None)
        return None if cap is None else float(cap)

    def _norm_spec(self, norm: nn.Module, what: str) -> NormSpec:
        weight = getattr(norm, "weight", None)
        eps = getattr(norm, "eps", None)
        if not _GEMMA_NORM.fullmatch(type(norm).__name__) or eps is None:
            raise self._layout_error(
                f"{what} is a {type(norm).__name__}, expected a Gemma (1 + w) RMSNorm"
            )
        if not isinstance(weight, torch.Tensor):
            raise self._layout_error(f"{what} has no weight")
        w = weight.detach()
        work = torch.float64 if w.dtype == torch.float64 else torch.float32
        return NormSpec("rmsnorm", w.to(work) + 1.0, None, float(eps), unit_offset=True)


class Gemma3TextAdapter(Gemma2Adapter):
    """Gemma 3 text-only models (``Gemma3ForCausalLM``, e.g. gemma-3-1b): Gemma 2's layout plus
    ``q_norm`` / ``k_norm`` of ``head_dim`` entries; soft-capping only where the config sets it
    (released Gemma 3 models do not)."""

    family = "gemma3"
    model_types: ClassVar[tuple[str, ...]] = ("gemma3_text",)

    def _qk_norm_widths(self) -> dict[str, int]:
        head_dim = self.dims.head_dim
        return {"q_norm": head_dim, "k_norm": head_dim}


class Gemma3Adapter(Gemma3TextAdapter):
    """Gemma 3 multimodal models (``Gemma3ForConditionalGeneration``, model type ``gemma3``):
    the text decoder is ``model.language_model``, its sizes are in ``config.text_config``. The
    vision tower is never run (text-only inputs); the LM head does not soft-cap here."""

    model_types: ClassVar[tuple[str, ...]] = ("gemma3",)
    base_path = "model.language_model"
    layers_path = "model.language_model.layers"
    final_norm_path = "model.language_model.norm"

    def _text_config(self) -> Any:
        return self.model.config.text_config

    @property
    def logit_softcap(self) -> float | None:
        return None  # Gemma3ForConditionalGeneration.forward applies no final soft-capping


class Olmo2Adapter(_PostNormAdapter):
    """OLMo 2: norms after attention and after the MLP (plain RMSNorms, ``weight`` gain) and
    q/k norms over the whole projections (``n_heads * head_dim`` / ``n_kv_heads * head_dim``)."""

    family = "olmo2"
    model_types: ClassVar[tuple[str, ...]] = ("olmo2",)
    block_norm_names: ClassVar[tuple[str, ...]] = (
        "post_attention_layernorm",
        "post_feedforward_layernorm",
    )

    def _qk_norm_widths(self) -> dict[str, int]:
        dims = self.dims
        return {"q_norm": dims.n_heads * dims.head_dim, "k_norm": dims.n_kv_heads * dims.head_dim}

    def _norm_spec(self, norm: nn.Module, what: str) -> NormSpec:
        if _GEMMA_NORM.fullmatch(type(norm).__name__) or isinstance(norm, nn.LayerNorm):
            raise self._layout_error(f"{what} is a {type(norm).__name__}, expected an RMSNorm")
        return super()._norm_spec(norm, what)
