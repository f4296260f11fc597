"""Reference implementations by brute force.

* :func:`delta_loss_recompute` re-runs the final norm and the unembedding once per neuron on the
  ablated residual stream: the baseline of the speed benchmark.
* :func:`delta_loss_forward` re-runs the whole model once per neuron with a hook that sets the
  neuron to its mean: the ground truth the fast method is tested against on tiny models.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..models.adapters import ModelAdapter
from ..models.hooks import replace_input
from .inputs import AblationInputs, logits_of
from .postnorm import delta_loss_recompute_general


def _ce(z: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(z, dim=-1) - z.gather(-1, targets[..., None]).squeeze(-1)


def delta_loss_recompute(
    inputs: AblationInputs, neurons: Sequence[int] | torch.Tensor, *, chunk_positions: int = 512
) -> torch.Tensor:
    """``(n_positions, len(neurons))`` signed ``L̃ - L`` by recomputing norm + unembedding
    (and, where the family has them, the post-MLP norm and the soft-capping:
    :func:`raretoken.ablation.postnorm.delta_loss_recompute_general`)."""
    if not inputs.is_affine:
        return delta_loss_recompute_general(inputs, neurons, chunk_positions=chunk_positions)
    idx = [int(i) for i in neurons]
    out = torch.empty(inputs.n_positions, len(idx), dtype=torch.float64)
    for start in range(0, inputs.n_positions, chunk_positions):
        sl = slice(start, start + chunk_positions)
        x = inputs.resid[sl]
        base = _ce(logits_of(x, inputs), inputs.targets[sl])
        for k, i in enumerate(idx):
            delta = (inputs.mean_acts[i] - inputs.acts[sl, i])[:, None]
            ablated = _ce(logits_of(x + delta * inputs.w_out[i], inputs), inputs.targets[sl])
            out[sl, k] = (ablated - base).double().cpu()
    return out


def delta_loss_forward(
    model: nn.Module,
    adapter: ModelAdapter,
    input_ids: torch.Tensor,
    target_mask: torch.Tensor,
    mean_acts: torch.Tensor,
    neurons: Sequence[int],
) -> torch.Tensor:
    """Signed ``L̃ - L`` per scored position and neuron from full hooked forward passes.

    ``input_ids`` is ``(batch, seq)``; position ``j`` predicts ``input_ids[:, j + 1]`` and is
    scored where ``target_mask[:, j]`` (shape ``(batch, seq - 1)``) is true.
    """
    targets = input_ids[:, 1:]

    def losses() -> torch.Tensor:
        with torch.no_grad():
            z = model(input_ids=input_ids).logits[:, :-1]
        return _ce(z, targets)[target_mask]

    base = losses()
    cols = []
    proj = adapter.mlp_out_proj(-1)
    for i in neurons:

        def set_mean(a: torch.Tensor, i: int = int(i)) -> torch.Tensor:
            a = a.clone()
            a[..., i] = mean_acts[i].to(a.dtype)
            return a

        with replace_input(proj, set_mean):
            cols.append(losses() - base)
    return torch.stack(cols, dim=1).double()
