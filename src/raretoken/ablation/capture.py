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
) -> Capture:
    """Run the model over every window of ``sample`` and capture the final-layer arrays.

    ``acts_only`` keeps just the neuron activations (for the reference sample of n̄).
    """
    norm_mod = adapter.final_norm_module()
    proj = adapter.mlp_out_proj(-1)
    mask = torch.from_numpy(sample.target_mask)
    resid_parts: list[np.ndarray] = []
    act_parts: list[np.ndarray] = []
    loss_parts: list[np.ndarray] = []
    block_parts: list[np.ndarray] = []
    block_mod = adapter.blocks()[block_index] if block_index is not None else None
    for start in range(0, sample.n_windows, batch_size):
        ids = torch.from_numpy(sample.input_ids[start : start + batch_size]).to(device)
        m = mask[start : start + batch_size]
        with contextlib.ExitStack() as stack:
            got_resid = stack.enter_context(capture_input(norm_mod))
            got_acts = stack.enter_context(capture_input(proj))
            got_block = (
                stack.enter_context(capture_input(block_mod)) if block_mod is not None else None
            )
            with torch.no_grad():
                logits = model(input_ids=ids).logits
        acts = got_acts[-1][:, :-1][m.to(ids.device)]
        act_parts.append(acts.float().cpu().numpy())
        if not acts_only:
            resid = got_resid[-1][:, :-1][m.to(ids.device)]
            resid_parts.append(resid.float().cpu().numpy())
            z = logits[:, :-1][m.to(ids.device)].float()
            tgt = ids[:, 1:][m.to(ids.device)]
            loss = torch.logsumexp(z, -1) - z.gather(1, tgt[:, None]).squeeze(1)
            loss_parts.append(loss.cpu().numpy())
            if got_block is not None:
                block_parts.append(got_block[-1].float().cpu().numpy())
        if progress is not None:
            progress(int(ids.shape[0]))
    acts_np = np.concatenate(act_parts)
    if not np.isfinite(acts_np).all():
        raise NumericalError(
            f"{int((~np.isfinite(acts_np)).sum())} NaN/inf values in the final-layer activations "
            "(try --dtype float32)"
        )
    targets = sample.target_ids[sample.target_mask]
    if acts_only:
        empty = np.zeros((0,), np.float32)
        return Capture(resid=empty, acts=acts_np, targets=targets, base_loss=empty)
    resid_np = np.concatenate(resid_parts)
    if not np.isfinite(resid_np).all():
        raise NumericalError("NaN/inf values in the final residual stream (try --dtype float32)")
    return Capture(
        resid=resid_np,
        acts=acts_np,
        targets=targets,
        base_loss=np.concatenate(loss_parts),
        block_input=np.concatenate(block_parts) if block_parts else None,
        block_index=block_index,
    )
