"""One forward pass over the context windows, keeping what the ablation and analyses need.

Hooks (always removed, see :mod:`raretoken.models.hooks`) record, at every scored position,
the final residual stream (input of the final norm) and the final-layer neuron activations
(input of the MLP output projection); optionally the residual input of an earlier block for
every position, so analyses can re-run only the last layers.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..data.sampling import ContextSample
from ..errors import NumericalError
from ..models.adapters import ModelAdapter
from ..models.hooks import capture_input

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class Capture:
    """Arrays from one pass over a :class:`ContextSample` (positions in ``target_mask`` order).

    Any of them may be a (read-only) :class:`numpy.memmap` of a cache entry: read them in
    slices rather than converting them whole.

    Attributes
    ----------
    resid:
        ``(n_positions, d_model)`` float32 final residual stream.
    acts:
        ``(n_positions, d_mlp)`` float32 final-layer neuron activations.
    targets:
        ``(n_positions,)`` int64 target ids.
    base_loss:
        ``(n_positions,)`` float32 next-token loss of the unablated model.
    block_input:
        ``(n_windows, seq_len, d_model)`` float32 input of block ``block_index`` at every
        position, or ``None``.
    """

    resid: np.ndarray
    acts: np.ndarray
    targets: np.ndarray
    base_loss: np.ndarray
    block_input: np.ndarray | None = None
    block_index: int | None = None

    def to_arrays(self) -> dict[str, np.ndarray]:
        out = {
            "resid": self.resid,
            "acts": self.acts,
            "targets": self.targets,
            "base_loss": self.base_loss,
        }
        if self.block_input is not None:
            out["block_input"] = self.block_input
            out["block_index"] = np.asarray(self.block_index)
        return out

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray]) -> Capture:
        bi = a.get("block_input")
        return cls(
            resid=a["resid"],
            acts=a["acts"],
            targets=a["targets"],
            base_loss=a["base_loss"],
            block_input=bi,
            block_index=None if bi is None else int(a["block_index"]),
        )


#: Allocates one output array: ``allocate(name, shape, dtype)`` (e.g.
#: :meth:`raretoken.storage.EntryWriter.array`, which memory-maps it inside a cache entry).
Allocate = Callable[[str, tuple[int, ...], Any], np.ndarray]


def _in_memory(name: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    return np.empty(shape, dtype=dtype)


def _n_nonfinite(a: np.ndarray) -> int:
    return 0 if np.isfinite(a).all() else int((~np.isfinite(a)).sum())


def capture_sample(
    model: torch.nn.Module,
    adapter: ModelAdapter,
    sample: ContextSample,
    *,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    block_index: int | None = None,
    acts_only: bool = False,
    progress: Callable[[int], None] | None = None,
    allocate: Allocate | None = None,
) -> Capture:
    """Run the model over every window of ``sample`` and capture the final-layer arrays.

    ``acts_only`` keeps just the neuron activations (for the reference sample of n̄).

    The arrays are allocated once, at their final size (the number of scored positions is
    that of ``sample.target_mask``), by ``allocate(name, shape, dtype)`` under the names of
    :meth:`Capture.to_arrays` (default: in memory), and every batch is written straight into
    them: with a cache writer's memory-mapped arrays, memory stays at one batch whatever the
    sample's size. Non-finite values are counted batch by batch and reported at the end.
    """
    alloc = _in_memory if allocate is None else allocate
    norm_mod = adapter.final_norm_module()
    proj = adapter.mlp_out_proj(-1)
    mask_np = np.asarray(sample.target_mask, dtype=bool)
    mask = torch.from_numpy(mask_np)
    scored = sample.target_ids[mask_np]
    n_pos = int(scored.shape[0])
    dims = adapter.dims
    targets = alloc("targets", scored.shape, scored.dtype)
    targets[...] = scored
    acts_out = alloc("acts", (n_pos, dims.d_mlp), np.float32)
    if acts_only:
        resid_out = alloc("resid", (0,), np.float32)
        loss_out = alloc("base_loss", (0,), np.float32)
    else:
        resid_out = alloc("resid", (n_pos, dims.d_model), np.float32)
        loss_out = alloc("base_loss", (n_pos,), np.float32)
    block_mod = adapter.blocks()[block_index] if block_index is not None else None
    block_out = None
    if block_mod is not None and not acts_only:
        block_out = alloc("block_input", (*sample.input_ids.shape, dims.d_model), np.float32)
    bad_acts = bad_resid = 0
    row = 0
    for start in range(0, sample.n_windows, batch_size):
        stop = min(sample.n_windows, start + batch_size)
        ids = torch.from_numpy(sample.input_ids[start:stop]).to(device)
        m = mask[start:stop].to(ids.device)
        with contextlib.ExitStack() as stack:
            got_resid = stack.enter_context(capture_input(norm_mod))
            got_acts = stack.enter_context(capture_input(proj))
            got_block = (
                stack.enter_context(capture_input(block_mod))
                if block_mod is not None and block_out is not None
                else None
            )
            with torch.no_grad():
                # the decoder only; the LM head runs below on the scored positions alone
                hidden = adapter.hidden_states(ids)
        acts = got_acts[-1][:, :-1][m].float().cpu().numpy()
        end = row + acts.shape[0]
        if acts.shape[1:] != acts_out.shape[1:] or end > n_pos:
            raise ValueError(
                f"captured activations of shape {acts.shape} do not fit the "
                f"{acts_out.shape} expected from the model's dimensions and the sample"
            )
        acts_out[row:end] = acts
        bad_acts += _n_nonfinite(acts)
        if not acts_only:
            resid = got_resid[-1][:, :-1][m].float().cpu().numpy()
            resid_out[row:end] = resid
            bad_resid += _n_nonfinite(resid)
            with torch.no_grad():
                z = adapter.lm_logits(hidden[:, :-1][m]).float()
            tgt = ids[:, 1:][m]
            loss = torch.logsumexp(z, -1) - z.gather(1, tgt[:, None]).squeeze(1)
            loss_out[row:end] = loss.cpu().numpy()
            if got_block is not None and block_out is not None:
                block_out[start:stop] = got_block[-1].float().cpu().numpy()
        row = end
        if progress is not None:
            progress(int(ids.shape[0]))
    if row != n_pos:
        raise ValueError(f"captured {row} positions, the sample scores {n_pos}")
    if bad_acts:
        raise NumericalError(
            f"{bad_acts} NaN/inf values in the final-layer activations (try --dtype float32)"
        )
    if bad_resid:
        raise NumericalError("NaN/inf values in the final residual stream (try --dtype float32)")
    return Capture(
        resid=resid_out,
        acts=acts_out,
        targets=targets,
        base_loss=loss_out,
        block_input=block_out,
        block_index=block_index if block_out is not None else None,
    )
