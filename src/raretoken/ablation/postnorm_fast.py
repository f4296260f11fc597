"""The fast moment method of :mod:`.fast` through a post-MLP norm and soft-capped logits.

With :mod:`.postnorm`'s closed form the logit change of a pair is ``Δz = A h + C q + B u``:
two per-position vectors (``h``, ``q``) and one per-neuron vector (``u``), so the moment
expansion of :mod:`.fast` carries over with one more per-position direction.

Uncapped (OLMo 2, Gemma 3): ``g = Δz``; a per-pair constant shift of ``g`` cancels, so ``h``,
``q`` are centred by their mean under ``p`` and ``u`` by its mean over the vocabulary.

Soft-capped (Gemma 2): ``g_v = F_v(Δz_v)`` with ``F_v(Δ) = κ tanh((z_v+Δ)/κ) - κ tanh(z_v/κ)``.
``e^{F_v(Δ)} = Σ_k c_k(v) Δ^k + R_v`` where ``c_k = Y_k(F'_v, ..., F_v^(k)) / k!`` (complete Bell
polynomials of the derivatives at 0, per token: ``F' = σ``, ``F'' = -2στ/κ``,
``F''' = -2σ(1-3τ²)/κ²``, ``F'''' = 8στ(2-3τ²)/κ³``); without capping ``c_k = 1/k!``. So
``Σ_v p_v e^{g_v}`` is a sum of moments ``Σ_v p_v c_k(v) h^a q^b u^m`` with per-position left
weights and per-neuron right factors ``u^m``: nothing in it depends on a pair beyond ``A``,
``C``, ``B``. No centring here (a shift does not commute with ``F``).

As in :mod:`.fast`, the ``K`` most probable tokens (the head) are summed exactly and the tail by
the fourth-order expansion. Computed exactly: every term without ``u`` (per-position moments),
the terms linear in ``u`` up to order 3 (through the low-rank ``u = W_U proj``), and
``u²`` (order 2), ``y u²``, ``u³`` (order 3), ``u⁴`` (order 4) as ``positions × vocab × neurons``
products (``y = A h + C q``). The mixed fourth-order terms are bounded by Hölder's inequality,
the remainder by Lagrange's form ``|R_v| <= e^{max(Δz_v, 0)} Ŷ₅ |Δz_v|⁵ / 120``
(``Ŷ₅ = 1`` uncapped; capped, ``Y₅`` of the bounds ``sup|tanh^(k)| / κ^(k-1)`` of the
derivatives, using ``F <= max(Δ, 0)`` since ``0 < F' <= 1``) with Minkowski's inequality on
``Σ p |Δz|⁵``, and the rounding of low-precision products as in :mod:`.fast`. Pairs whose bound
on the error of the log exceeds ``tol`` are recomputed exactly over the whole vocabulary.

Cost per (position, neuron) pair: five ``vocab``-long products (six soft-capped: ``Σ p u⁴`` for
the bounds) plus six low-rank ones of ``vocab × d_model / d_mlp``, against ``vocab × d_model``
for recomputing the post-MLP norm, the final norm and the unembedding
(``benchmarks/bench_postnorm.py``: 70-90x faster at d_model 512, d_mlp 2048, vocab 32k).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import postnorm
from .fast import FastStats, power_columns
from .inputs import AblationInputs
from .postnorm import Positions, cap_change, directions, pair_scalars, positions
from .postnorm_moments import TailMoments, bell5_bound, expansion_weights, tail_sums
from .scales import logit_offset

log = logging.getLogger(__name__)

__all__ = ["delta_loss_fast_general"]


@dataclass(frozen=True)
class _Block:
    idx: slice
    proj: torch.Tensor  # (d, Nb)
    median: torch.Tensor  # (Nb,) centre subtracted from u (zeros when capped)
    u: torch.Tensor  # (V, Nb)
    u_t: torch.Tensor  # (Nb, V) the same, contiguous by neuron (for the exact fallback)
    u2: torch.Tensor  # (V, Nb)
    u2_low: torch.Tensor  # (V, Nb) in the high-order dtype
    u3: torch.Tensor
    u4: torch.Tensor
    u_max: torch.Tensor  # (Nb,) max |u| over the vocabulary


def _block(
    inputs: AblationInputs, proj_all: torch.Tensor, idx: slice, low: torch.dtype, centre: bool
) -> _Block:
    proj = proj_all[:, idx].contiguous()
    u = inputs.w_u @ proj
    median = u.mean(dim=0) if centre else torch.zeros_like(u[0])
    u = u - median[None, :]
    return _Block(idx, proj, median, u, *power_columns(u, low))


def delta_loss_fast_general(
    inputs: AblationInputs,
    *,
    tol: float = 1e-6,
    head_size: int = 32,
    chunk_positions: int = 256,
    neuron_block: int | None = None,
    memory_budget_bytes: int = 2 << 30,
    progress: Callable[[int], None] | None = None,
    high_order_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, FastStats]:
    """Signed ``L̃ - L`` of every (position, neuron) pair, for inputs with a post-MLP norm
    and/or soft-capped logits (the parameters and result of
    :func:`raretoken.ablation.fast.delta_loss_fast`, which dispatches here)."""
    inputs.validate()
    dirs = directions(inputs)
    capped = inputs.softcap is not None
    c = logit_offset(inputs)
    vocab, n_neu = inputs.w_u.shape[0], inputs.n_neurons
    item = inputs.w_u.element_size()
    if neuron_block is None:
        neuron_block = max(1, min(n_neu, memory_budget_bytes // (5 * vocab * item)))
    if high_order_dtype is None:
        high_order_dtype = torch.bfloat16 if inputs.w_u.dtype == torch.float32 else inputs.w_u.dtype
    out = torch.empty(inputs.n_positions, n_neu, dtype=torch.float32)
    n_fallback = 0
    for b0 in range(0, n_neu, neuron_block):
        idx = slice(b0, min(n_neu, b0 + neuron_block))
        block = _block(inputs, dirs.proj, idx, high_order_dtype, centre=not capped)
        for start in range(0, inputs.n_positions, chunk_positions):
            sl = slice(start, min(inputs.n_positions, start + chunk_positions))
            pos = positions(inputs, sl, c)
            a, cc, b = pair_scalars(inputs, pos, sl, idx, dirs)
            res, nf = _chunk(inputs, pos, block, a, cc, b, sl, tol, head_size)
            out[sl, idx] = res.float().cpu()
            n_fallback += nf
            if progress is not None:
                progress(sl.stop - sl.start)
    stats = FastStats(
        n_pairs=inputs.n_positions * n_neu, n_fallback=n_fallback, tol=tol, head_size=head_size
    )
    log.info("fast ablation (post-norm/soft-cap): %d of %d pairs recomputed exactly",
             n_fallback, stats.n_pairs)  # fmt: skip
    return out, stats


def _g(
    dz: torch.Tensor,
    z: torch.Tensor,
    tau: torch.Tensor | None,
    sigma: torch.Tensor | None,
    cap: float | None,
) -> torch.Tensor:
    """The change of the final logits: ``Δz`` itself, or its soft-capped change."""
    if cap is None or tau is None or sigma is None:
        return dz
    return cap_change(dz, z, tau, sigma, cap)


def _chunk(
    inputs: AblationInputs,
    pos: Positions,
    block: _Block,
    a: torch.Tensor,
    c: torch.Tensor,
    b: torch.Tensor,
    sl: slice,
    tol: float,
    k: int,
) -> tuple[torch.Tensor, int]:
    cap = inputs.softcap
    tgt = inputs.targets[sl]
    p = pos.logp.exp()
    x1, x2 = pos.h, pos.q
    if cap is None:  # centre the per-position directions (the shift cancels)
        x1 = x1 - _rowdot(p, x1)[:, None]
        x2 = None if x2 is None else x2 - _rowdot(p, x2)[:, None]
    dt = p.dtype

    # Head: the k most probable tokens of each position, summed exactly.
    k = min(k, p.shape[1])
    head_sum = torch.zeros_like(a)
    p_tail = p
    if k > 0:
        head_p, head_idx = p.topk(k, dim=-1)
        dz = a.to(dt)[:, None, :] * x1.gather(1, head_idx)[:, :, None]
        dz.addcmul_(b.to(dt)[:, None, :], block.u[head_idx])
        if x2 is not None:
            dz.addcmul_(c.to(dt)[:, None, :], x2.gather(1, head_idx)[:, :, None])
        tau = None if pos.tau is None else pos.tau.gather(1, head_idx)[:, :, None]
        sig = None if pos.sigma is None else pos.sigma.gather(1, head_idx)[:, :, None]
        g = _g(dz, pos.z.gather(1, head_idx)[:, :, None], tau, sig, cap)
        head_sum = torch.bmm(head_p[:, None, :], g.exp_()).squeeze(1).double()
        del g, dz
        p_tail = p.scatter(1, head_idx, 0.0)

    weights = expansion_weights(p_tail, pos.tau, pos.sigma, cap)
    mom = tail_sums(inputs, p_tail, weights, x1, x2, block.proj, block.median, block.u2,
                    block.u2_low, block.u3, block.u4, capped=cap is not None)  # fmt: skip
    total, remainder = _total_and_bound(mom, a, c, b, head_sum, x1, x2, block.u_max, cap, dt)
    slack = total - remainder
    bound = torch.where(slack > 0, remainder / slack.clamp_min(1e-300), math.inf)

    dz_y = a * x1.gather(1, tgt[:, None]).double() + b * block.u[tgt].double()
    if x2 is not None:
        dz_y = dz_y + c * x2.gather(1, tgt[:, None]).double()
    g_y = dz_y
    if cap is not None and pos.tau is not None and pos.sigma is not None:
        col = tgt[:, None]
        g_y = _g(dz_y, pos.z.gather(1, col).double(), pos.tau.gather(1, col).double(),
                 pos.sigma.gather(1, col).double(), cap)  # fmt: skip
    res = torch.log(total.clamp_min(1e-300)) - g_y

    bad = ~(bound <= tol)
    n_bad = int(bad.sum())
    if n_bad:
        _fallback(res, bad, pos, x1, x2, block.u_t, block.u_max, a, b, c, tgt, cap)
    return res, n_bad


def _total_and_bound(
    mom: TailMoments,
    a: torch.Tensor,
    c: torch.Tensor,
    b: torch.Tensor,
    head_sum: torch.Tensor,
    x1: torch.Tensor,
    x2: torch.Tensor | None,
    u_max_n: torch.Tensor,
    cap: float | None,
    dt: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``Σ p e^g`` by the expansion (head included) and the bound on its error, ``(P, Nb)``."""
    wy = mom.y_sums  # wy[k][j]: Σ w_k x1^j x2^(k-j), (P, 1)

    def ypow(k: int, sums: list[torch.Tensor]) -> torch.Tensor:
        """Σ w (A x1 + C x2)^k from per-position sums ``sums[j] = Σ w x1^j x2^(k-j)``."""
        if x2 is None:
            return a**k * sums[k]
        return sum(math.comb(k, j) * a**j * c ** (k - j) * sums[j] for j in range(k + 1))  # type: ignore[return-value]

    lin = mom.lin  # lin[k][j]: Σ w_k x1^j x2^(k-1-j) u, (P, Nb)
    t1 = ypow(1, wy[1]) + b * lin[1][0]
    t2 = ypow(2, wy[2]) + 2 * b * ypow(1, lin[2]) + b * b * mom.e_u2
    e_yu2 = a * mom.e_x1u2 + (0 if mom.e_x2u2 is None else c * mom.e_x2u2)
    t3 = ypow(3, wy[3]) + 3 * b * ypow(2, lin[3]) + 3 * b * b * e_yu2 + b**3 * mom.e_u3
    t4 = ypow(4, wy[4]) + b**4 * mom.e_u4
    total = head_sum + wy[0][0] + t1 + t2 + t3 + t4

    aa, ab, ac = a.abs(), b.abs(), c.abs()
    u4 = mom.u4_abs  # Σ p_tail u^4 (upper bound)
    y4 = ypow(4, mom.p_y4).clamp_min(0)  # Σ p_tail y^4
    k3, k4 = mom.k_max[3], mom.k_max[4]
    dropped = k4 * (
        4 * ab * y4.pow(0.75) * u4.pow(0.25)
        + 6 * b * b * (y4 * u4).sqrt()
        + 4 * ab**3 * y4.pow(0.25) * u4.pow(0.75)
    )
    # Lagrange remainder with Minkowski on Σ p |Δz|^5
    h_hi, h_lo = x1.amax(-1).double()[:, None], x1.amin(-1).double()[:, None]
    u_max = u_max_n.double()[None, :]
    m_pos = torch.where(a > 0, a * h_hi, a * h_lo) + ab * u_max
    fifth_root = aa * mom.p_abs5[0].pow(0.2) + ab * (u_max * u4).pow(0.2)
    if x2 is not None:
        q_hi, q_lo = x2.amax(-1).double()[:, None], x2.amin(-1).double()[:, None]
        m_pos = m_pos + torch.where(c > 0, c * q_hi, c * q_lo)
        fifth_root = fifth_root + ac * mom.p_abs5[1].pow(0.2)
    bell = 1.0 if cap is None else bell5_bound(cap)
    remainder = torch.exp(m_pos.clamp_min(0)) * bell * fifth_root.pow(5) / 120
    # rounding of the low-precision products (eps 0 when they run in the working dtype)
    y2_root = aa * mom.p_x1sq.sqrt()
    if mom.p_x2sq is not None:
        y2_root = y2_root + ac * mom.p_x2sq.sqrt()
    rounding = mom.eps * (
        3 * b * b * k3 * y2_root * u4.sqrt()
        + ab**3 * k3 * u4.pow(0.75) * wy[0][0].clamp_min(0).pow(0.25)
        + b**4 * k4 * u4
    )
    return total, remainder + dropped + rounding


def _rowdot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.bmm(x[:, None, :], y[:, :, None]).view(-1)


def _fallback(
    res: torch.Tensor,
    bad: torch.Tensor,
    pos: Positions,
    x1: torch.Tensor,
    x2: torch.Tensor | None,
    u_t: torch.Tensor,
    u_max: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor,
    tgt: torch.Tensor,
    cap: float | None,
    max_elements: int = 1 << 22,
) -> None:
    """Exact log-sum-exp over the whole vocabulary for the flagged pairs, by position.

    ``log Σ_v exp(log p_v + g_v)`` is summed without the max-subtraction pass of ``logsumexp``
    where ``|g| <= |A| max|x1| + |C| max|x2| + |B| max|u|`` (soft-capping only shrinks it)
    keeps the exponentials finite, as in :mod:`.fast`.
    """
    vocab = x1.shape[1]
    step = max(1, max_elements // vocab)
    dt = x1.dtype
    x1_abs = x1.abs().amax(-1).double()
    x2_abs = None if x2 is None else x2.abs().amax(-1).double()
    u_abs = u_max.double()
    for t in bad.any(dim=1).nonzero().flatten().tolist():
        cols = bad[t].nonzero().flatten()
        y = int(tgt[t])
        for q0 in range(0, len(cols), step):
            kk = cols[q0 : q0 + step]
            dz = torch.addcmul(a[t, kk].to(dt)[:, None] * x1[t][None, :],
                               b[t, kk].to(dt)[:, None], u_t.index_select(0, kk))  # fmt: skip
            g_max = a[t, kk].abs() * x1_abs[t] + b[t, kk].abs() * u_abs[kk]
            if x2 is not None and x2_abs is not None:
                dz.addcmul_(c[t, kk].to(dt)[:, None], x2[t][None, :])
                g_max = g_max + c[t, kk].abs() * x2_abs[t]
            tau = None if pos.tau is None else pos.tau[t][None, :]
            sig = None if pos.sigma is None else pos.sigma[t][None, :]
            g = _g(dz, pos.z[t][None, :], tau, sig, cap)
            g_y = g[:, y].to(torch.float64, copy=True)  # g changes in place below
            x = g.add_(pos.logp[t][None, :])
            if bool((g_max < postnorm.SAFE_EXPONENT).all()):
                lse = x.exp_().sum(-1).log_()
            else:
                lse = torch.logsumexp(x, dim=-1)
            res[t, kk] = lse.double() - g_y
