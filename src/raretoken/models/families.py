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
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from .adapters import ModelAdapter, _ConfigSizes, _max_positions, _module

__all__ = ["GPT2Adapter", "LlamaAdapter", "NeoXAdapter", "Phi3Adapter", "Qwen3Adapter"]


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
