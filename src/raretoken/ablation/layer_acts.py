"""Activations and residual streams of any MLP layer from one forward pass over the windows.

Inputs follow :mod:`.layer_inputs` (windows ``input_ids`` ``(n_windows, seq)``, scored positions
``target_mask`` ``(n_windows, seq - 1)``, numbered row-major: the *rows*).

* :func:`layer_acts`: the neuron activations (input of the MLP output projection, the same
  point as the final-layer capture of :mod:`.capture`) of several layers at once, at the scored
  positions, optionally only at some of them (``rows``: e.g. the run's uniform sample of
  positions), written into caller-given arrays when wanted (e.g. memory-mapped cache entries).
* :func:`block_inputs`: the residual stream entering each of several blocks at every position
  of every window (what :func:`raretoken.models.tail.run_from_layer` re-runs from).

Hooks are scoped to context managers (:func:`raretoken.models.hooks.capture_input`), so they are
removed even when a pass fails.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from ..errors import ConfigError, NumericalError
from ..models.adapters import ModelAdapter
from ..models.hooks import capture_input
from .layer_inputs import (
    ArrayLike,
    check_neurons,
    check_windows,
    decoder_forward,
    model_device_dtype,
    window_batches,
)

__all__ = ["block_inputs", "layer_acts"]


def _check_select(rows: Sequence[int] | np.ndarray | None, n_scored: int) -> np.ndarray:
    if rows is None:
        return np.arange(n_scored, dtype=np.int64)
    r = np.asarray(rows, dtype=np.int64).reshape(-1)
    if r.size and (int(r.min()) < 0 or int(r.max()) >= n_scored):
        raise ConfigError(f"rows must lie in [0, {n_scored}) (the scored positions)")
    if r.size > 1 and not bool(np.all(np.diff(r) > 0)):
        raise ConfigError("rows must be strictly increasing (sorted, no duplicates)")
    return r


def layer_acts(
    adapter: ModelAdapter,
    input_ids: ArrayLike,
    target_mask: ArrayLike,
    layers: Sequence[int],
    *,
    rows: Sequence[int] | np.ndarray | None = None,
    batch_windows: int = 4,
    out: Mapping[int, np.ndarray] | None = None,
    columns: Mapping[int, Sequence[int] | np.ndarray] | None = None,
) -> dict[int, np.ndarray]:
    """Float32 activations ``(len(rows), d_mlp)`` of the neurons of each of ``layers``.

    Parameters
    ----------
    adapter, input_ids, target_mask:
        Model and windows (see :mod:`.layer_inputs`).
    layers:
        MLP layers (Python indices); keys of the result are the normalised indices.
    rows:
        Sorted scored-position numbers to keep (default: every scored position).
    batch_windows:
        Windows per forward pass (each batch cut after its last scored position).
    out:
        Optional ``{layer: array (len(rows), d_mlp)}`` to fill (e.g. memory-mapped cache
        arrays); arrays are allocated for the layers it lacks.
    columns:
        Optional ``{layer: neuron ids}``: keep only those neurons of that layer (in that order;
        the array is then ``(len(rows), len(ids))``).

    Raises
    ------
    NumericalError
        NaN/inf activations (a dtype too narrow for the model).
    """
    win = check_windows(adapter, input_ids, target_mask)
    idx = sorted({adapter.layer_index(layer) for layer in layers})
    if not idx:
        raise ConfigError("layers must name at least one layer")
    keep = _check_select(rows, win.n_scored)
    given = {adapter.layer_index(k): v for k, v in (out or {}).items()}
    cols: dict[int, torch.Tensor | None] = {i: None for i in idx}
    for k, v in (columns or {}).items():
        li = adapter.layer_index(k)
        if li not in cols:
            raise ConfigError(f"columns names layer {li}, which is not among the layers {idx}")
        cols[li] = check_neurons(adapter, li, v)
    res: dict[int, np.ndarray] = {}
    for i in idx:
        c = cols[i]
        shape = (keep.size, int(adapter.w_out(i).shape[0]) if c is None else int(c.numel()))
        arr = given.get(i)
        if arr is None:
            arr = np.zeros(shape, dtype=np.float32)
        elif arr.shape != shape:
            raise ConfigError(f"out[{i}] has shape {arr.shape}, expected {shape}")
        res[i] = arr
    device, _ = model_device_dtype(adapter)
    done = 0
    for batch in window_batches(win, batch_windows, device):
        lo = int(np.searchsorted(keep, batch.rows.start))
        hi = int(np.searchsorted(keep, batch.rows.stop))
        if hi == lo:
            continue
        local = torch.as_tensor(keep[lo:hi] - batch.rows.start, device=device)
        with torch.no_grad(), contextlib.ExitStack() as stack:
            got = {i: stack.enter_context(capture_input(adapter.mlp_out_proj(i))) for i in idx}
            decoder_forward(adapter, batch.input_ids)
        for i in idx:
            t = got[i][-1][batch.mask].index_select(0, local)
            c = cols[i]
            if c is not None:
                t = t.index_select(1, c.to(device))
            a = t.float().cpu().numpy()
            if not np.isfinite(a).all():
                raise NumericalError(f"NaN/inf activations in MLP layer {i} (try --dtype float32)")
            res[i][lo:hi] = a
        done += hi - lo
    if done != keep.size:  # window_batches covers every scored position
        raise NumericalError(f"captured {done} of {keep.size} rows")
    return res


def block_inputs(
    adapter: ModelAdapter,
    input_ids: ArrayLike,
    layers: Sequence[int],
    *,
    batch_windows: int = 4,
) -> dict[int, np.ndarray]:
    """The residual stream entering each block of ``layers``, ``(n_windows, seq, d_model)`` at
    every position (keys: normalised layer indices); float32, float64 for a float64 model."""
    ids = torch.as_tensor(np.asarray(input_ids)).long()
    if ids.ndim != 2 or ids.shape[1] < 2:
        raise ConfigError(f"input_ids must be (n_windows, seq >= 2), got {tuple(ids.shape)}")
    if batch_windows < 1:
        raise ConfigError(f"batch_windows must be >= 1, got {batch_windows}")
    idx = sorted({adapter.layer_index(layer) for layer in layers})
    device, _ = model_device_dtype(adapter)
    blocks = adapter.blocks()
    parts: dict[int, list[np.ndarray]] = {i: [] for i in idx}
    for start in range(0, ids.shape[0], batch_windows):
        with torch.no_grad(), contextlib.ExitStack() as stack:
            got = {i: stack.enter_context(capture_input(blocks[i])) for i in idx}
            decoder_forward(adapter, ids[start : start + batch_windows].to(device))
        for i in idx:
            h = got[i][-1]
            parts[i].append((h if h.dtype == torch.float64 else h.float()).cpu().numpy())
    return {i: np.concatenate(p) for i, p in parts.items()}
