"""Exact mean ablation of neurons of any MLP layer, many neurons per batched forward pass.

Below the final layer an ablation changes everything downstream, so the closed form of
:mod:`.fast` no longer applies and the remaining blocks must be re-run. Method:

1. One forward pass per batch of windows captures, at every position, the activations ``a`` of
   layer ``L``'s neurons (input of its MLP output projection) and the residual stream ``r``
   leaving block ``L`` (input of block ``L + 1``, or of the final norm when ``L`` is the last).
2. In every supported family the MLP output ``W_out a + b`` is added to the residual stream as it
   is (GPT-2, Llama, Qwen, Phi-3: ``r = h + mlp(norm(h))``; NeoX's parallel residual:
   ``r = h + attn(norm1(h)) + mlp(norm2(h))``), so ablating neuron ``i`` to ``n̄_i`` at every
   position changes ``r`` by exactly ``(n̄_i - a_i) w_i``, ``w_i`` its output weight vector.
3. For a batch of ``k`` neurons the ablated streams are stacked along the batch axis
   (``k × W`` rows) and blocks ``L + 1 ..`` run once on them through the model's own forward
   (:func:`raretoken.models.tail.run_from_layer`: causal and sliding-window masks, rotary or
   learned position embeddings, q/k norms exactly as in a full forward), then the final norm and
   the LM head at the scored positions only. The unablated stream goes through the same path
   for the base loss.

So block ``L`` itself is never re-run, nor anything before it; the cost per neuron is that of
``n_layers - L - 1`` blocks plus the LM head at the scored positions.

Families that normalise the MLP output before adding it (a *post-MLP norm*: Gemma 2/3, OLMo 2)
break step 2. For them (``method="rerun"``, chosen automatically) the input of block ``L`` is
captured instead and block ``L`` re-runs too, with a hook on its MLP output projection that
sets, in the ``j``-th stacked copy of the windows, neuron ``j``'s activation to its mean. The ground truth
(:func:`layer_delta_forward`) re-runs the whole model once per neuron with a hook that sets the
neuron to its mean; the tests check the two agree on tiny models of every family.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch

from ..errors import ConfigError
from ..models.adapters import ModelAdapter
from ..models.hooks import capture_input, replace_input
from ..models.tail import run_from_layer
from .layer_inputs import (
    ArrayLike,
    check_mean_acts,
    check_neurons,
    check_windows,
    decoder_forward,
    model_device_dtype,
    scored_losses,
    window_batches,
)

log = logging.getLogger(__name__)

__all__ = ["exact_layer_delta", "has_post_mlp_norm", "layer_delta_forward"]


Method = Literal["auto", "residual", "rerun"]


def has_post_mlp_norm(adapter: ModelAdapter, layer: int) -> bool:
    """Whether block ``layer`` normalises its MLP output before adding it (Gemma 2/3, OLMo 2):
    then the residual stream does not move linearly with a neuron's activation."""
    getter = getattr(adapter, "post_mlp_norm_module", None)
    return getter is not None and getter(layer) is not None


def _tail_losses(
    adapter: ModelAdapter,
    hidden: torch.Tensor,
    start: int,
    mask: torch.Tensor,
    targets: torch.Tensor,
    lm_chunk: int,
) -> torch.Tensor:
    """Loss at the scored positions of residual streams ``hidden`` entering block ``start``
    (``start == n_layers``: entering the final norm)."""
    norm = adapter.final_norm_module()
    if start < adapter.dims.n_layers:
        with capture_input(norm) as got:
            run_from_layer(adapter, hidden, start, use_cache=False)
        final = got[-1]
    else:
        final = hidden
    return scored_losses(adapter, norm(final[mask]), targets, chunk=lm_chunk)


def _set_rows(mean: torch.Tensor, sel: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Hook for ``k`` stacked copies of the windows: copy ``j`` gets neuron ``sel[j]`` = n̄."""
    k = int(sel.numel())

    def fn(a: torch.Tensor) -> torch.Tensor:
        out = a.clone(memory_format=torch.contiguous_format)
        view = out.view(k, -1, a.shape[-1])
        index = sel[:, None, None].expand(k, view.shape[1], 1)
        view.scatter_(2, index, mean[sel][:, None, None].expand(k, view.shape[1], 1))
        return out

    return fn


def exact_layer_delta(
    adapter: ModelAdapter,
    input_ids: ArrayLike,
    target_mask: ArrayLike,
    layer: int,
    mean_acts: ArrayLike,
    neurons: Sequence[int] | ArrayLike,
    *,
    batch_windows: int = 4,
    max_rows: int = 64,
    lm_chunk: int = 1024,
    method: Method = "auto",
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Signed ``L̃ - L`` of ablating each of ``neurons`` of MLP layer ``layer`` to its mean.

    Parameters
    ----------
    adapter:
        Adapter of the model (eval mode); the passes run on its device and in its dtype.
    input_ids, target_mask:
        ``(n_windows, seq)`` windows and ``(n_windows, seq - 1)`` scored positions (see
        :mod:`.layer_inputs`).
    layer:
        MLP layer (Python index; ``-1`` is the last).
    mean_acts:
        ``(d_mlp,)`` n̄ of the layer's neurons.
    neurons:
        Neuron ids of the layer to ablate, one at a time.
    batch_windows:
        Windows per captured batch.
    max_rows:
        Rows (windows × neurons) per batched pass of the remaining blocks; memory grows with it.
    lm_chunk:
        Positions per step of the LM head.
    method:
        ``"residual"``: shift the stream leaving block ``layer`` by ``(n̄_i - a_i) w_i`` and run
        the blocks after it; ``"rerun"``: run block ``layer`` itself too, from its captured
        input, with a hook setting the neuron to n̄ (exact for any block, e.g. one with a
        post-MLP norm, at one more block per neuron); ``"auto"``: ``"rerun"`` where the block
        has a post-MLP norm, else ``"residual"``.
    progress:
        Called with the number of (window, neuron) pairs finished after each batched pass.

    Returns
    -------
    ``(n_scored, len(neurons))`` float64, rows in ``target_mask`` order.
    """
    li = adapter.layer_index(layer)
    win = check_windows(adapter, input_ids, target_mask)
    mean = check_mean_acts(adapter, li, mean_acts)
    idx = check_neurons(adapter, li, neurons)
    if max_rows < 1:
        raise ConfigError(f"max_rows must be >= 1, got {max_rows}")
    if method not in ("auto", "residual", "rerun"):
        raise ConfigError(f"method must be auto, residual or rerun, got {method!r}")
    rerun = method == "rerun" or (method == "auto" and has_post_mlp_norm(adapter, li))
    device, dtype = model_device_dtype(adapter)
    out = np.empty((win.n_scored, idx.numel()), dtype=np.float64)
    if idx.numel() == 0:
        return out
    n_layers = adapter.dims.n_layers
    proj = adapter.mlp_out_proj(li)
    if rerun:
        start, entry = li, adapter.blocks()[li]
    else:
        start = li + 1
        entry = adapter.final_norm_module() if start == n_layers else adapter.blocks()[start]
    w_all = adapter.w_out(li).to(device=device, dtype=dtype)
    mean_d = mean.to(device=device, dtype=dtype)
    idx_d = idx.to(device)
    with torch.no_grad():
        for b in window_batches(win, batch_windows, device):
            with capture_input(proj) as got_a, capture_input(entry) as got_h:
                decoder_forward(adapter, b.input_ids)
            acts, hidden = got_a[-1], got_h[-1]
            base = _tail_losses(adapter, hidden, start, b.mask, b.targets, lm_chunk)
            n_w = int(hidden.shape[0])
            per = max(1, max_rows // n_w)
            for n0 in range(0, idx.numel(), per):
                sel = idx_d[n0 : n0 + per]
                k = int(sel.numel())
                hook: contextlib.AbstractContextManager[None]
                if rerun:
                    stacked = hidden[None].expand(k, *hidden.shape)
                    hook = replace_input(proj, _set_rows(mean_d, sel))
                else:
                    shift = (mean_d[sel] - acts[..., sel]).permute(2, 0, 1)  # (k, W, S)
                    stacked = hidden[None] + shift[..., None] * w_all[sel][:, None, None, :]
                    hook = contextlib.nullcontext()
                with hook:
                    losses = _tail_losses(
                        adapter,
                        stacked.reshape(k * n_w, *hidden.shape[1:]),
                        start,
                        b.mask.repeat(k, 1),
                        b.targets.repeat(k),
                        lm_chunk,
                    )
                delta = losses.view(k, -1) - base[None]
                out[b.rows, n0 : n0 + k] = delta.T.double().cpu().numpy()
                if progress is not None:
                    progress(k * n_w)
    return out


def _full_losses(
    adapter: ModelAdapter,
    ids: torch.Tensor,
    mask: torch.Tensor,
    targets: torch.Tensor,
    lm_chunk: int,
) -> torch.Tensor:
    """Loss at the scored positions from a whole forward pass (uncut windows)."""
    with torch.no_grad():
        hidden = decoder_forward(adapter, ids)[:, :-1][mask]
        return scored_losses(adapter, hidden, targets, chunk=lm_chunk)


def layer_delta_forward(
    adapter: ModelAdapter,
    input_ids: ArrayLike,
    target_mask: ArrayLike,
    layer: int,
    mean_acts: ArrayLike,
    neurons: Sequence[int] | ArrayLike,
    *,
    batch_windows: int = 4,
    lm_chunk: int = 1024,
    scale: float = 1.0,
) -> np.ndarray:
    """Ground truth by brute force: one whole hooked forward pass per neuron.

    A hook on layer ``layer``'s MLP output projection replaces neuron ``i``'s activation ``a``
    by ``a + scale (n̄_i - a)`` at every position (``scale = 1``: mean ablation; a small
    ``scale`` gives the finite differences the linear screen is tested against). Windows are
    not cut; the whole model runs on each. Returns ``(n_scored, len(neurons))`` float64.
    """
    li = adapter.layer_index(layer)
    win = check_windows(adapter, input_ids, target_mask)
    mean = check_mean_acts(adapter, li, mean_acts)
    idx = check_neurons(adapter, li, neurons)
    device, dtype = model_device_dtype(adapter)
    proj = adapter.mlp_out_proj(li)
    mean_d = mean.to(device=device, dtype=dtype)
    cols: list[list[torch.Tensor]] = [[] for _ in range(idx.numel())]
    for start in range(0, win.n_windows, batch_windows):
        ids = win.input_ids[start : start + batch_windows].to(device)
        mask = win.target_mask[start : start + batch_windows].to(device)
        targets = ids[:, 1:][mask]

        base = _full_losses(adapter, ids, mask, targets, lm_chunk)
        for k, i in enumerate(idx.tolist()):

            def set_mean(a: torch.Tensor, i: int = i) -> torch.Tensor:
                a = a.clone()
                a[..., i] = a[..., i] + scale * (mean_d[i] - a[..., i])
                return a

            with replace_input(proj, set_mean):
                loss = _full_losses(adapter, ids, mask, targets, lm_chunk)
                cols[k].append((loss - base).double().cpu())
    if idx.numel() == 0:
        return np.empty((win.n_scored, 0), dtype=np.float64)
    return torch.stack([torch.cat(c) for c in cols], dim=1).numpy()
