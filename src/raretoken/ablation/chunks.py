"""The ablation of a captured sample chunk by chunk of positions (read from memory-mapped arrays).

:func:`ablation_chunks` cuts the captured positions into chunks that are multiples of the
method's own step (:func:`method_step`), so that the values equal those of one call over all
positions; :func:`ablate_chunk` runs the method on one chunk.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from ..models.adapters import ModelAdapter
from .capture import Capture
from .exact import delta_loss_exact
from .fast import delta_loss_fast
from .inputs import AblationInputs, inputs_from_adapter
from .naive import delta_loss_recompute

__all__ = ["ablate_chunk", "ablation_chunks", "method_step"]


def _default(fn: Callable[..., Any], name: str) -> int:
    return int(inspect.signature(fn).parameters[name].default)


#: The defaults that set each method's own step over positions (read from the methods, so
#: that a stage's chunk stays a multiple of it).
_FAST_STEP = _default(delta_loss_fast, "chunk_positions")
_NAIVE_STEP = _default(delta_loss_recompute, "chunk_positions")
_EXACT_ELEMENTS = _default(delta_loss_exact, "chunk_elements")


def method_step(method: str, vocab: int, n_neurons: int) -> int:
    """Positions per step of the ablation method's own loop over positions.

    Every position is computed within one such step, by the same operations whatever the
    total, so a chunk that is a multiple of it gives the values of one call over all positions.
    """
    if method == "fast":
        return _FAST_STEP
    if method == "exact":
        return max(1, _EXACT_ELEMENTS // (vocab * max(1, n_neurons)))
    return _NAIVE_STEP


def ablation_chunks(
    adapter: ModelAdapter,
    cap: Capture,
    mean_acts: torch.Tensor,
    chunk_positions: int,
    method: str,
    device: torch.device | str,
    dtype: torch.dtype,
) -> Iterator[tuple[slice, AblationInputs]]:
    """The ablation inputs of consecutive chunks of positions, read from (memory-mapped) ``cap``.

    Each chunk holds a multiple of the method's step (:func:`method_step`) of positions, at
    least ``chunk_positions`` rounded down (one step when that is smaller than a step).
    """
    n_pos, n_neu = int(cap.acts.shape[0]), int(cap.acts.shape[1])
    step = method_step(method, int(adapter.unembedding()[0].shape[0]), n_neu)
    size = max(1, chunk_positions // step) * step
    # the model's pieces, converted once; each chunk brings its own captured rows
    empty = torch.zeros((0, 1))
    pieces = inputs_from_adapter(adapter, empty, empty, empty.long()[:, 0], mean_acts)
    pieces = pieces.to(device, dtype)
    for start in range(0, max(n_pos, 1), size):  # an empty sample: one (invalid) chunk
        sl = slice(start, min(n_pos, start + size))
        yield (
            sl,
            dataclasses.replace(
                pieces,
                resid=torch.from_numpy(np.array(cap.resid[sl])).to(device=device, dtype=dtype),
                acts=torch.from_numpy(np.array(cap.acts[sl])).to(device=device, dtype=dtype),
                targets=torch.from_numpy(np.array(cap.targets[sl])).long().to(device),
            ),
        )


def ablate_chunk(
    inputs: AblationInputs, method: str, tol: float, progress: Callable[[int], None]
) -> tuple[np.ndarray, int]:
    """``(positions, neurons)`` float32 Δloss of one chunk by ``method``, and the number of
    pairs the fast method recomputed exactly."""
    n_pos = inputs.n_positions
    n_fallback = 0
    if method == "fast":
        delta_t, stats = delta_loss_fast(inputs, tol=tol, progress=progress)
        n_fallback = stats.n_fallback
    elif method == "exact":
        delta_t = delta_loss_exact(inputs).float()
        progress(n_pos)
    else:
        delta_t = delta_loss_recompute(inputs, range(inputs.n_neurons)).float()
        progress(n_pos)
    return delta_t.numpy().astype(np.float32, copy=False), n_fallback
