"""Inputs of the per-layer mean ablation (any MLP layer), checked before any model work.

The windows are ``input_ids`` ``(n_windows, seq)``; position ``j`` of a window predicts
``input_ids[:, j + 1]`` and is *scored* where ``target_mask[:, j]`` (``(n_windows, seq - 1)``)
is true. Scored positions are numbered in ``target_mask`` order (row-major), as in
:class:`raretoken.ablation.capture.Capture`: these numbers (*rows*) are what target sets such as
the rare / common positions of an identification run hold.

The ablation sets a neuron to its mean at *every* position of a window; since the model is
causal, positions after a window's last scored position cannot change any scored loss, so each
batch of windows is cut after its last scored position (:func:`window_batches`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ConfigError, InsufficientDataError
from ..models.adapters import ModelAdapter
from ..models.hooks import capture_input

__all__ = [
    "LayerWindows",
    "WindowBatch",
    "check_mean_acts",
    "check_neurons",
    "check_rows",
    "check_windows",
    "decoder_forward",
    "layer_mean_acts",
    "model_device_dtype",
    "scored_losses",
    "window_batches",
]

ArrayLike = np.ndarray | torch.Tensor


@dataclass(frozen=True, eq=False)
class LayerWindows:
    """Checked windows: ``input_ids`` ``(n_windows, seq)`` int64 and ``target_mask``
    ``(n_windows, seq - 1)`` bool, both on the CPU."""

    input_ids: torch.Tensor
    target_mask: torch.Tensor

    @property
    def n_windows(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def n_scored(self) -> int:
        return int(self.target_mask.sum())


@dataclass(frozen=True, eq=False)
class WindowBatch:
    """Consecutive windows, cut after their last scored position.

    ``input_ids`` ``(W, S)`` on the model's device, ``mask`` ``(W, S)`` (position ``j`` scored),
    ``targets`` ``(n,)`` next-token ids of the scored positions, ``rows`` the slice of the
    scored-position numbers they hold.
    """

    input_ids: torch.Tensor
    mask: torch.Tensor
    targets: torch.Tensor
    rows: slice

    @property
    def n_scored(self) -> int:
        return self.rows.stop - self.rows.start


def _as_tensor(x: ArrayLike) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    arr = np.asarray(x)
    return torch.from_numpy(arr if arr.flags.writeable else arr.copy())


def check_windows(
    adapter: ModelAdapter, input_ids: ArrayLike, target_mask: ArrayLike
) -> LayerWindows:
    """Check shapes, token ids and that some position is scored; one-line errors."""
    ids = _as_tensor(input_ids)
    mask = _as_tensor(target_mask)
    if ids.ndim != 2 or ids.shape[1] < 2:
        raise ConfigError(f"input_ids must be (n_windows, seq >= 2), got {tuple(ids.shape)}")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ConfigError(f"input_ids must hold integer token ids, got {ids.dtype}")
    if tuple(mask.shape) != (ids.shape[0], ids.shape[1] - 1):
        raise ConfigError(
            f"target_mask has shape {tuple(mask.shape)}, expected {(ids.shape[0], ids.shape[1] - 1)}"
        )
    vocab = adapter.dims.vocab_size
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ConfigError(
            f"token ids must lie in [0, {vocab}), got [{int(ids.min())}, {int(ids.max())}]"
        )
    mask = mask.to(torch.bool)
    if not bool(mask.any()):
        raise InsufficientDataError("no scored positions: target_mask is all false")
    return LayerWindows(ids.long(), mask)


def check_mean_acts(adapter: ModelAdapter, layer: int, mean_acts: ArrayLike) -> torch.Tensor:
    """``(d_mlp,)`` finite float64 n̄ of ``layer``; one-line errors."""
    mean = _as_tensor(mean_acts).to(torch.float64)
    d_mlp = int(adapter.w_out(layer).shape[0])
    if tuple(mean.shape) != (d_mlp,):
        raise ConfigError(
            f"mean_acts of layer {layer} has shape {tuple(mean.shape)}, expected ({d_mlp},)"
        )
    if not bool(torch.isfinite(mean).all()):
        raise ConfigError(f"mean_acts of layer {layer} has NaN/inf values")
    return mean


def check_neurons(
    adapter: ModelAdapter, layer: int, neurons: Sequence[int] | ArrayLike
) -> torch.Tensor:
    """Neuron ids of ``layer`` as an int64 tensor; ids outside ``[0, d_mlp)`` -> ConfigError."""
    idx = _as_tensor(
        np.asarray(neurons, dtype=np.int64) if not isinstance(neurons, torch.Tensor) else neurons
    )
    idx = idx.reshape(-1).long()
    d_mlp = int(adapter.w_out(layer).shape[0])
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= d_mlp):
        bad = int(idx[(idx < 0) | (idx >= d_mlp)][0])
        raise ConfigError(f"neuron id {bad} is outside layer {layer} (ids 0..{d_mlp - 1})")
    return idx


def check_rows(rows: Sequence[int] | np.ndarray, n_scored: int, name: str) -> np.ndarray:
    """Unique, non-empty scored-position numbers of a target set; one-line errors."""
    r = np.asarray(rows, dtype=np.int64).reshape(-1)
    if r.size == 0:
        raise InsufficientDataError(f"the {name} target set holds no positions")
    if int(r.min()) < 0 or int(r.max()) >= n_scored:
        raise ConfigError(f"{name} rows must lie in [0, {n_scored}) (the scored positions)")
    if np.unique(r).size != r.size:
        raise ConfigError(f"{name} rows hold duplicates")
    return r


def model_device_dtype(adapter: ModelAdapter) -> tuple[torch.device, torch.dtype]:
    p = next(adapter.model.parameters())
    return p.device, p.dtype


def window_batches(
    win: LayerWindows, batch_windows: int, device: torch.device
) -> Iterator[WindowBatch]:
    """Batches of ``batch_windows`` windows, each cut after its last scored position."""
    if batch_windows < 1:
        raise ConfigError(f"batch_windows must be >= 1, got {batch_windows}")
    row = 0
    for start in range(0, win.n_windows, batch_windows):
        stop = min(win.n_windows, start + batch_windows)
        m = win.target_mask[start:stop]
        cols = m.any(0).nonzero().flatten()
        if cols.numel() == 0:
            continue
        s = int(cols[-1]) + 1  # positions 0..s-1 are needed
        ids = win.input_ids[start:stop]
        mask = m[:, :s]
        targets = ids[:, 1 : s + 1][mask]
        n = int(mask.sum())
        yield WindowBatch(
            ids[:, :s].to(device), mask.to(device), targets.to(device), slice(row, row + n)
        )
        row += n


def decoder_forward(adapter: ModelAdapter, input_ids: torch.Tensor) -> torch.Tensor:
    """Final hidden states (after the final norm) of the decoder, without a KV cache."""
    out = adapter.base_model()(input_ids=input_ids, use_cache=False)
    return out[0] if isinstance(out, tuple) else out.last_hidden_state


def scored_losses(
    adapter: ModelAdapter, hidden: torch.Tensor, targets: torch.Tensor, *, chunk: int = 1024
) -> torch.Tensor:
    """Next-token loss of final hidden states ``(n, d_model)`` (after the final norm), the LM
    head run ``chunk`` positions at a time; in float32 at least."""
    out = []
    for c in range(0, hidden.shape[0], chunk):
        z = adapter.lm_logits(hidden[c : c + chunk])
        z = z.to(torch.promote_types(z.dtype, torch.float32))
        t = targets[c : c + chunk]
        out.append(torch.logsumexp(z, -1) - z.gather(1, t[:, None]).squeeze(1))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


def layer_mean_acts(
    adapter: ModelAdapter,
    input_ids: ArrayLike,
    target_mask: ArrayLike,
    layers: Sequence[int],
    *,
    batch_windows: int = 4,
) -> dict[int, np.ndarray]:
    """n̄ of the neurons of each of ``layers`` from one pass over reference windows.

    Same convention as the final-layer method (:func:`~raretoken.ablation.capture.capture_sample`
    with ``acts_only``, then the column mean): the mean over the scored positions (``[:, :-1]``
    where ``target_mask``), accumulated in float64. Keys are the normalised layer indices.
    """
    win = check_windows(adapter, input_ids, target_mask)
    idx = sorted({adapter.layer_index(layer) for layer in layers})
    device, _ = model_device_dtype(adapter)
    sums = {i: torch.zeros(int(adapter.w_out(i).shape[0]), dtype=torch.float64) for i in idx}
    n = 0
    for start in range(0, win.n_windows, batch_windows):
        ids = win.input_ids[start : start + batch_windows].to(device)
        mask = win.target_mask[start : start + batch_windows].to(device)
        with torch.no_grad(), contextlib.ExitStack() as stack:
            got = {i: stack.enter_context(capture_input(adapter.mlp_out_proj(i))) for i in idx}
            decoder_forward(adapter, ids)
        for i in idx:
            sums[i] += got[i][-1][:, :-1][mask].double().sum(0).cpu()
        n += int(mask.sum())
    return {i: (s / n).numpy() for i, s in sums.items()}
