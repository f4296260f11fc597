"""Exact loss change of every (position, neuron) pair, one log-sum-exp over the vocabulary each.

``L̃ - L = log Σ_v p_v exp(Δz_v) - Δz_y`` with ``Δz = A h + B u_i`` (see :mod:`.scales`).
This is the closed-form elementwise method: exact, but it touches ``vocab`` numbers per pair, so
it is only a few times faster than recomputing the norm and unembedding. It is the reference
for tests and the fallback of :mod:`.fast` wherever the fast method's error bound is loose.
Families with a post-MLP norm or soft-capped logits use the general closed form of
:mod:`.postnorm` (dispatched by :func:`delta_loss_exact`).
"""

from __future__ import annotations

import torch

from .inputs import AblationInputs, logits_of
from .postnorm import delta_loss_exact_general
from .scales import ablation_scalars, logit_offset, neuron_directions


def pair_delta(
    logp: torch.Tensor,
    h: torch.Tensor,
    u: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    targets: torch.Tensor,
) -> torch.Tensor:
    """Exact ``L̃ - L`` for a batch of pairs, in the dtype of ``logp``.

    Parameters
    ----------
    logp, h:
        ``(P, V)`` base log-probabilities and ``h = z - c`` (any per-row constant shift of ``h``
        cancels) at each pair's position.
    u:
        ``(P, V)`` logit direction of each pair's neuron.
    a, b:
        ``(P,)`` the scalars ``A`` and ``B`` of each pair.
    targets:
        ``(P,)`` target token ids.
    """
    dt = logp.dtype
    dz = a.to(dt)[:, None] * h + b.to(dt)[:, None] * u
    lse = torch.logsumexp(logp + dz, dim=-1)
    return (lse - dz.gather(1, targets[:, None]).squeeze(1)).double()


def delta_loss_exact(
    inputs: AblationInputs,
    neurons: torch.Tensor | None = None,
    *,
    chunk_elements: int = 1 << 24,
) -> torch.Tensor:
    """``(n_positions, n_selected)`` exact signed loss changes ``L̃ - L`` in float64.

    Inputs with a post-MLP norm or soft-capped logits go to
    :func:`raretoken.ablation.postnorm.delta_loss_exact_general` (same steps over positions).
    """
    if not inputs.is_affine:
        return delta_loss_exact_general(inputs, neurons, chunk_elements=chunk_elements)
    wp, u_all = neuron_directions(inputs)
    idx = torch.arange(inputs.n_neurons) if neurons is None else neurons
    c = logit_offset(inputs)
    n_pos, vocab = inputs.n_positions, inputs.w_u.shape[0]
    out = torch.empty(n_pos, len(idx), dtype=torch.float64)
    per_pos = max(1, chunk_elements // (vocab * max(1, len(idx))))
    nb = max(1, chunk_elements // vocab)
    for start in range(0, n_pos, per_pos):
        sl = slice(start, min(n_pos, start + per_pos))
        z = logits_of(inputs.resid[sl], inputs)
        logp = torch.log_softmax(z, dim=-1)
        h = z - c
        a, b = ablation_scalars(
            inputs.resid[sl], inputs.acts[sl][:, idx], inputs.mean_acts[idx], wp[idx], inputs.norm
        )
        tgt = inputs.targets[sl]
        t_n = z.shape[0]
        rows = torch.arange(t_n).repeat_interleave(len(idx))
        cols = torch.arange(len(idx)).repeat(t_n)
        res = torch.empty(rows.numel(), dtype=torch.float64)
        for p0 in range(0, rows.numel(), nb):
            r, k = rows[p0 : p0 + nb], cols[p0 : p0 + nb]
            res[p0 : p0 + nb] = pair_delta(
                logp[r], h[r], u_all[:, idx[k]].T, a[r, k], b[r, k], tgt[r]
            )
        out[sl] = res.view(t_n, len(idx)).cpu()
    return out
