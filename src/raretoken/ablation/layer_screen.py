"""Linear screen of the mean ablation of every neuron of one or more MLP layers at once.

Attribution patching: ablating neuron ``i`` of layer ``L`` moves its activation ``a_{s,i}`` at
every position ``s`` to ``n̄_i``. To first order the summed loss over a target set ``T`` of
scored positions changes by

    ``Σ_s (n̄_i - a_{s,i}) ∂(Σ_{t∈T} L_t)/∂a_{s,i}``

(the sum over ``s`` runs over all positions, since a later block's attention carries the
change at ``s`` to every ``t ≥ s``). One forward pass gives ``a`` at every position of every
requested layer, and one backward pass per target set (rare, common) gives the gradient, for
all neurons of all requested layers at once. The screen is the **signed mean** over ``T``:
the first-order estimate of the mean of ``L̃ - L`` over ``T`` (not of the mean of ``|L̃ - L|``:
that would need one backward pass per position).

Cost. The backward passes only compute gradients with respect to activations (the model's
parameters have ``requires_grad`` off; gradients are requested with
:func:`torch.autograd.grad`, so nothing accumulates in ``.grad``) and only from the logits down
to the earliest requested layer. The LM head's gradient is computed once, chunk by chunk, and
shared by the target sets (their positions are disjoint rows of it). Windows are cut after
their last scored position (:func:`~.layer_inputs.window_batches`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from ..models.adapters import ModelAdapter
from ..models.hooks import replace_input
from .layer_inputs import (
    ArrayLike,
    check_mean_acts,
    check_rows,
    check_windows,
    decoder_forward,
    model_device_dtype,
    scored_losses,
    window_batches,
)

__all__ = ["screen_layers"]


def _leaf_recorder(
    store: dict[int, torch.Tensor], layer: int
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Records the activations of ``layer`` as a node of the autograd graph (a new leaf when
    nothing upstream requires gradients, i.e. at the earliest requested layer)."""

    def fn(x: torch.Tensor) -> torch.Tensor:
        y = x if x.requires_grad else x.detach().requires_grad_(True)
        store[layer] = y
        return y

    return fn


def screen_layers(
    adapter: ModelAdapter,
    input_ids: ArrayLike,
    target_mask: ArrayLike,
    mean_acts: Mapping[int, ArrayLike],
    target_rows: Mapping[str, Sequence[int] | np.ndarray],
    *,
    batch_windows: int = 4,
    lm_chunk: int = 1024,
    progress: Callable[[int], None] | None = None,
) -> dict[int, dict[str, np.ndarray]]:
    """First-order mean ``L̃ - L`` over each target set, for every neuron of each layer.

    Parameters
    ----------
    adapter:
        Adapter of the model (eval mode, parameters without gradients).
    input_ids, target_mask:
        Windows and scored positions (see :mod:`.layer_inputs`).
    mean_acts:
        ``{layer: (d_mlp,) n̄}``: the layers to screen and the mean each neuron is ablated to.
    target_rows:
        ``{name: scored-position numbers}``, e.g. ``{"rare": ..., "common": ...}``; one
        backward pass per set and batch of windows.
    batch_windows, lm_chunk:
        Windows per forward/backward pass; positions per step of the LM head.
    progress:
        Called with the number of windows finished after each batch.

    Returns
    -------
    ``{layer (normalised): {name: (d_mlp,) float64}}``.
    """
    win = check_windows(adapter, input_ids, target_mask)
    means = {}
    for layer, m in mean_acts.items():
        li = adapter.layer_index(layer)
        means[li] = check_mean_acts(adapter, li, m)
    sets = {name: check_rows(r, win.n_scored, name) for name, r in target_rows.items()}
    layers = sorted(means)
    device, dtype = model_device_dtype(adapter)
    means_d = {li: m.to(device=device, dtype=dtype) for li, m in means.items()}
    member: dict[str, torch.Tensor] = {}
    for name, rows in sets.items():
        in_set = np.zeros(win.n_scored, dtype=bool)
        in_set[rows] = True
        member[name] = torch.from_numpy(in_set)
    acc = {
        li: {name: torch.zeros(m.numel(), dtype=torch.float64) for name in sets}
        for li, m in means.items()
    }
    for b in window_batches(win, batch_windows, device):
        acts: dict[int, torch.Tensor] = {}
        with contextlib.ExitStack() as stack:
            for li in layers:
                stack.enter_context(
                    replace_input(adapter.mlp_out_proj(li), _leaf_recorder(acts, li))
                )
            with torch.enable_grad():
                hidden = decoder_forward(adapter, b.input_ids)
        g_sel = _lm_head_grad(adapter, hidden[b.mask].detach(), b.targets, lm_chunk)
        inputs = [acts[li] for li in layers]
        for name in sets:
            flag = member[name][b.rows].to(device)
            if not bool(flag.any()):
                continue
            g_out = torch.zeros_like(hidden)
            g_out[b.mask] = g_sel * flag[:, None].to(g_sel.dtype)
            grads = torch.autograd.grad(
                [hidden], inputs, grad_outputs=[g_out], retain_graph=True, allow_unused=True
            )
            for li, a, g in zip(layers, inputs, grads, strict=True):
                if g is None:  # no scored position depends on this layer (cannot happen, causal)
                    continue
                shift = means_d[li].double() - a.detach().double()
                acc[li][name] += (shift * g.double()).sum(dim=(0, 1)).cpu()
        del hidden, acts, inputs
        if progress is not None:
            progress(int(b.input_ids.shape[0]))
    return {
        li: {name: (acc[li][name] / len(rows)).numpy() for name, rows in sets.items()}
        for li in layers
    }


def _lm_head_grad(
    adapter: ModelAdapter, hidden: torch.Tensor, targets: torch.Tensor, chunk: int
) -> torch.Tensor:
    """``∂L_t/∂h_t`` of each position's loss with respect to its final hidden state
    (positions independent: the LM head acts per position), ``chunk`` positions at a time."""
    out = torch.empty_like(hidden)
    with torch.enable_grad():
        for c in range(0, hidden.shape[0], chunk):
            h = hidden[c : c + chunk].detach().requires_grad_(True)
            loss = scored_losses(adapter, h, targets[c : c + chunk], chunk=chunk).sum()
            (out[c : c + chunk],) = torch.autograd.grad(loss, [h])
    return out
