"""Group ablation and frequency-held effects through a post-MLP norm and soft-capped logits.

Closed forms of :mod:`.postnorm` extended to the two other ablation analyses, exact:

* joint ablation of a group ``G`` (:func:`delta_loss_group_general`): ``m`` moves by
  ``Σ_{i∈G} δ_i w_i``, so ``r_P = (2 Σ δ_i m'·w'_i + δᵀ W'W'ᵀ δ) / (|m'|² + d ε_P)`` (the Gram
  matrix of the group's centred output weights), ``Δx = (α - 1) p + Σ β_i v_i`` with
  ``β_i = s̃_P δ_i``, ``|Δx'|²`` from the Gram matrix of the ``v'_i``, and
  ``Δz = A h + C q + Σ B_i u_i``; soft-capping then maps ``Δz`` to ``g`` elementwise;
* total and frequency-held effects (:func:`frequency_effects_general`): ``g`` of each pair
  over the vocabulary, ``s = g·f`` and ``log Σ p e^{g - s f} - (g_y - s f_y)`` for the held one
  (``z̃_held = z̃ - ((z̃ - z)·f) f`` on the model's final, capped, logits).

Both touch ``vocab`` numbers per pair (as the affine versions); the references recompute the
post-MLP norm, the final norm and the unembedding (:func:`delta_loss_group_recompute_general`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from .inputs import AblationInputs, logits_of
from .postnorm import Positions, cap_change, directions, pair_scalars, positions, post_output
from .scales import logit_offset

__all__ = [
    "delta_loss_group_general",
    "delta_loss_group_recompute_general",
    "frequency_effects_general",
]


def delta_loss_group_general(
    inputs: AblationInputs,
    ids_all: torch.Tensor,
    mask_all: torch.Tensor,
    *,
    chunk_positions: int = 16,
    chunk_elements: int = 1 << 21,
    neuron_budget_bytes: int = 512 << 20,
) -> torch.Tensor:
    """``(n_positions, n_groups)`` float64 Δloss of ablating each group jointly; ``ids_all``
    ``(n_groups, k)`` neuron ids padded with a member, ``mask_all`` true on real members (as
    :func:`raretoken.ablation.group.delta_loss_group` prepares them)."""
    n_groups, k = ids_all.shape
    dev = inputs.w_u.device
    vocab = int(inputs.w_u.shape[0])
    dirs = directions(inputs)
    c = logit_offset(inputs)
    out = torch.empty(inputs.n_positions, n_groups, dtype=torch.float64)
    block_groups = max(1, neuron_budget_bytes // max(1, k * vocab * inputs.w_u.element_size()))
    for g0 in range(0, n_groups, block_groups):
        gsl = slice(g0, min(n_groups, g0 + block_groups))
        ids = ids_all[gsl].to(dev)
        mask = mask_all[gsl].to(dev, torch.float64)
        n_g = ids.shape[0]
        v64 = dirs.v[ids].double()  # (G, k, d)
        gram_v = v64 @ v64.transpose(1, 2)
        wp64 = None if dirs.wp is None else dirs.wp[ids].double()
        gram_w = None if wp64 is None else wp64 @ wp64.transpose(1, 2)
        u = (dirs.proj.T[ids.reshape(-1)] @ inputs.w_u.T).reshape(n_g, k, vocab)
        for start in range(0, inputs.n_positions, chunk_positions):
            sl = slice(start, min(inputs.n_positions, start + chunk_positions))
            pos = positions(inputs, sl, c)
            d = pos.x.shape[-1]
            delta = inputs.mean_acts.double()[ids][None] - inputs.acts[sl].double()[:, ids]
            delta = delta * mask[None]  # (P, G, k)
            if pos.m is None or wp64 is None or gram_w is None or inputs.post_norm is None:
                am1 = torch.zeros(delta.shape[:2], dtype=torch.float64, device=delta.device)
                beta = delta
            else:
                q_p = pos.m.pow(2).sum(-1) + d * inputs.post_norm.eps  # (P,)
                mw = torch.einsum("pd,gkd->pgk", pos.m, wp64)
                quad = torch.einsum("pgk,gkl,pgl->pg", delta, gram_w, delta)
                am1 = torch.expm1(-0.5 * torch.log1p((2.0 * (delta * mw).sum(-1) + quad)
                                                     / q_p[:, None]))  # fmt: skip
                beta = (torch.rsqrt(q_p / d)[:, None] * (am1 + 1.0))[..., None] * delta
            q_f = pos.x.pow(2).sum(-1) + d * inputs.norm.eps
            xv = torch.einsum("pd,gkd->pgk", pos.x, v64)
            num = 2.0 * (beta * xv).sum(-1) + torch.einsum("pgk,gkl,pgl->pg", beta, gram_v, beta)
            if pos.p is not None:
                pv = torch.einsum("pd,gkd->pgk", pos.p, v64)
                xp = (pos.x * pos.p).sum(-1)[:, None]
                pp = pos.p.pow(2).sum(-1)[:, None]
                num = num + 2.0 * am1 * xp + am1.pow(2) * pp + 2.0 * am1 * (beta * pv).sum(-1)
            a = torch.expm1(-0.5 * torch.log1p(num / q_f[:, None]))  # (P, G)
            s_t = torch.rsqrt(q_f / d)[:, None] * (a + 1.0)
            cc = s_t * am1
            b = s_t[..., None] * beta  # (P, G, k)
            out[sl, gsl] = _group_lse(inputs, pos, a, cc, b, u, sl, chunk_elements)
    return out


def _group_lse(
    inputs: AblationInputs,
    pos: Positions,
    a: torch.Tensor,
    cc: torch.Tensor,
    b: torch.Tensor,
    u: torch.Tensor,
    sl: slice,
    chunk_elements: int,
) -> torch.Tensor:
    """``(P, G)`` ``log Σ p e^g - g_y`` from the scalars and the groups' directions ``u``."""
    n_p, n_g = a.shape
    vocab = u.shape[-1]
    dt = u.dtype
    tgt = inputs.targets[sl]
    res = torch.empty(n_p, n_g, dtype=torch.float64)
    step = max(1, chunk_elements // max(1, n_p * vocab))
    for j0 in range(0, n_g, step):
        js = slice(j0, min(n_g, j0 + step))
        dz = torch.bmm(b[:, js].transpose(0, 1).to(dt), u[js])  # (G', P, V)
        dz.add_(a[:, js].T.to(dt)[..., None] * pos.h[None])
        if pos.q is not None:
            dz.add_(cc[:, js].T.to(dt)[..., None] * pos.q[None])
        g = dz
        if inputs.softcap is not None and pos.tau is not None and pos.sigma is not None:
            g = cap_change(dz, pos.z[None], pos.tau[None], pos.sigma[None], inputs.softcap)
        lse = torch.logsumexp(g + pos.logp[None], dim=-1)
        g_y = g.gather(2, tgt[None, :, None].expand(g.shape[0], -1, 1)).squeeze(2)
        res[:, js] = (lse - g_y).T.double().cpu()
    return res


def delta_loss_group_recompute_general(
    inputs: AblationInputs, grp: list[np.ndarray], *, chunk_positions: int = 256
) -> torch.Tensor:
    """Reference: Δloss of each group by recomputing the post-MLP norm, the final norm, the
    unembedding and the soft-capping on ``x - P(m) + P(m + Σ δ_i w_i)``."""
    out = torch.empty(inputs.n_positions, len(grp), dtype=torch.float64)
    for start in range(0, inputs.n_positions, chunk_positions):
        sl = slice(start, min(inputs.n_positions, start + chunk_positions))
        x = inputs.resid[sl]
        tgt = inputs.targets[sl][:, None]
        z = logits_of(x, inputs)
        base = torch.logsumexp(z, -1) - z.gather(1, tgt).squeeze(1)
        m = inputs.acts[sl] @ inputs.w_out
        rest = x - post_output(m, inputs)
        for j, g in enumerate(grp):
            ids = torch.from_numpy(g).to(inputs.acts.device)
            delta = inputs.mean_acts[ids][None, :] - inputs.acts[sl][:, ids]
            za = logits_of(rest + post_output(m + delta @ inputs.w_out[ids], inputs), inputs)
            ablated = torch.logsumexp(za, -1) - za.gather(1, tgt).squeeze(1)
            out[sl, j] = (ablated - base).double().cpu()
    return out


def frequency_effects_general(
    inputs: AblationInputs,
    f64: torch.Tensor,
    idx: np.ndarray,
    *,
    neuron_block: int,
    chunk_elements: int,
    progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(total, held)`` ``(n_positions, len(idx))`` float64 for inputs with a post-MLP norm or
    soft-capped logits (checked arguments of
    :func:`raretoken.ablation.frequency.frequency_effects`)."""
    dev = inputs.resid.device
    vocab = int(inputs.w_u.shape[0])
    dirs = directions(inputs)
    c = logit_offset(inputs)
    dt = inputs.w_u.dtype
    f = f64.to(device=dev, dtype=dt)
    n_pos, n_sel = inputs.n_positions, int(idx.size)
    total = np.empty((n_pos, n_sel))
    held = np.empty((n_pos, n_sel))
    pos_block = max(1, chunk_elements // vocab)
    for p0 in range(0, n_pos, pos_block):
        ps = slice(p0, min(n_pos, p0 + pos_block))
        pos = positions(inputs, ps, c)
        tgt = inputs.targets[ps]
        f_y = f64.to(dev)[tgt].double()
        for k0 in range(0, n_sel, neuron_block):
            kt = torch.from_numpy(idx[k0 : k0 + neuron_block]).to(dev)
            u_t = (dirs.proj[:, kt].T @ inputs.w_u.T).contiguous()  # (K, V)
            a, cc, b = pair_scalars(inputs, pos, ps, kt, dirs)
            n_k = len(kt)
            sub = max(1, chunk_elements // max(1, n_k * vocab))
            for q0 in range(0, ps.stop - ps.start, sub):
                qs = slice(q0, min(ps.stop - ps.start, q0 + sub))
                dz = b[qs].to(dt)[..., None] * u_t[None]  # (Q, K, V)
                dz.add_(a[qs].to(dt)[..., None] * pos.h[qs, None, :])
                if pos.q is not None:
                    dz.add_(cc[qs].to(dt)[..., None] * pos.q[qs, None, :])
                g = dz
                if inputs.softcap is not None and pos.tau is not None and pos.sigma is not None:
                    g = cap_change(dz, pos.z[qs, None, :], pos.tau[qs, None, :],
                                   pos.sigma[qs, None, :], inputs.softcap)  # fmt: skip
                lp = pos.logp[qs, None, :]
                y = tgt[qs]
                g_y = g.gather(2, y[:, None, None].expand(-1, n_k, 1)).squeeze(2).double()
                s = (g @ f).double()  # (Q, K): Δζ·f
                tot = torch.logsumexp(g + lp, dim=-1).double() - g_y
                g.sub_(s.to(dt)[..., None] * f[None, None, :])
                hld = torch.logsumexp(g + lp, dim=-1).double() - (g_y - s * f_y[qs, None])
                rows = slice(p0 + qs.start, p0 + qs.stop)
                total[rows, k0 : k0 + n_k] = tot.cpu().numpy()
                held[rows, k0 : k0 + n_k] = hld.cpu().numpy()
            if progress is not None:
                progress(n_k)
    return total, held
