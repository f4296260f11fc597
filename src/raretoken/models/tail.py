"""Re-run only the last blocks of a model on a captured residual stream.

Used where an intervention sits late in the network (e.g. ablating a head of layer ``L-2`` and
reading the final MLP's activations): the residual stream entering block ``start_layer`` is
captured once, and every intervention then re-runs only ``blocks[start_layer:]``.

Method. Instead of re-implementing each family's forward (causal and sliding-window masks,
rotary position embeddings, per-layer attention types, keyword names that differ between
families and transformers versions), the model's own base forward is called with
``inputs_embeds = hidden`` while, for the duration of the call,

* blocks ``0 .. start_layer-1`` are swapped for pass-through modules that return their input,
* a learned absolute position embedding (GPT-2 ``wpe``) is made to output zeros, because the
  captured stream already contains it (``x + 0`` is exact).

Embedding dropout is a no-op in eval mode. The masks, rotary embeddings and per-layer attention
types are therefore computed exactly as in a full forward, and hooks inside the remaining blocks
see exactly what they would see there. The final norm runs as well (it is cheap); the LM head
does not (the unembedding is the expensive part for large vocabularies). Swapping modules
mutates the model temporarily: do not run the same model from several threads.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from .adapters import ModelAdapter

__all__ = ["run_from_layer"]


class _PassThrough(nn.Module):
    """Stands in for a skipped block: returns its hidden-state input unchanged."""

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        x = args[0] if args else kwargs["hidden_states"]
        if not isinstance(x, torch.Tensor):
            raise TypeError("skipped block received no hidden-state tensor")
        return x


def _zeros_like_output(_mod: nn.Module, _args: Any, output: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(output)


def run_from_layer(
    adapter: ModelAdapter,
    hidden: torch.Tensor,
    start_layer: int,
    *,
    position_ids: torch.Tensor | None = None,
    use_cache: bool | None = None,
) -> None:
    """Run ``blocks[start_layer:]`` and the final norm on ``hidden``.

    Parameters
    ----------
    adapter:
        Adapter of the model (in eval mode).
    hidden:
        ``(batch, seq, d_model)`` residual stream entering block ``start_layer``, e.g. captured
        with ``capture_input(adapter.blocks()[start_layer])`` during a full forward.
    start_layer:
        First block to run; negative values count from the end.
    position_ids:
        The position ids the full forward used, if not the default ``arange(seq)``.
    use_cache:
        Passed on to the model only when not ``None``, as in the full forward being mirrored.
        It matters with non-contiguous ``position_ids``: without a cache, transformers 5 reads
        gaps in the position ids as boundaries of packed sequences and masks across them.

    Returns nothing: read results through hooks (``capture_input`` on ``mlp_out_proj(-1)`` or on
    ``final_norm_module()``). No padding mask is supported: every sequence is taken as
    unpadded, as in a full forward without ``attention_mask``. Gradient mode is the caller's.
    """
    start = adapter.layer_index(start_layer)
    d_model = adapter.dims.d_model
    if hidden.ndim != 3 or hidden.shape[-1] != d_model:
        raise ConfigError(
            f"hidden must have shape (batch, seq, {d_model}), got {tuple(hidden.shape)}"
        )
    layers = adapter.layers_module()
    originals = [layers[i] for i in range(start)]
    pos_emb = adapter.position_embedding()
    handle = None
    try:
        for i in range(start):
            layers[i] = _PassThrough()
        if pos_emb is not None:
            handle = pos_emb.register_forward_hook(_zeros_like_output)
        kwargs: dict[str, Any] = {"inputs_embeds": hidden, "position_ids": position_ids}
        if use_cache is not None:
            kwargs["use_cache"] = use_cache
        adapter.base_model()(**kwargs)
    finally:
        if handle is not None:
            handle.remove()
        for i, block in enumerate(originals):
            layers[i] = block
