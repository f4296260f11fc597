"""Fast exact all-neuron mean ablation of the final MLP layer, by matrix multiplication.

For a position with base softmax ``p`` and a neuron ablated to its mean, the logit change is
``g = A h + B u`` (:mod:`.scales`) and the loss change is ``log E_p[e^g] - g_y``. Shifting ``h``
by its mean under ``p`` and ``u`` by a per-neuron constant changes ``g`` by a constant that
cancels, so take ``h' = h - E_p h`` and ``u' = u - med(u)``.

The vocabulary is split per position into its ``K`` most probable tokens (the *head*) and the
rest (the *tail*, whose probability mass is small):

* head: ``Σ_{v∈H_t} p_v e^{g_v}`` summed exactly (``K`` terms per pair, batched products);
* tail: ``e^g`` replaced by its fourth-order Taylor polynomial. Its ``p``-weighted sum needs the
  moments ``E[h'^j u'^m]``: ``m = 1`` through the low-rank factorisation ``u = W_U P`` and
  ``m = 2, 3, 4`` (and ``j = 1, m = 2``) as ``positions × vocab × neurons`` matrix products for
  all neurons at once, minus the head's share. The mixed fourth-order terms are not computed;
  they are bounded (Hölder).

The remainder is bounded by Lagrange's form ``|e^y - T_4(y)| <= |y|^5 e^{max(y,0)} / 120``
with Minkowski's inequality on ``E_tail|y|^5``, plus the bound on the mixed terms left out. The
bound on the error of the log is ``rem / (total - rem)``; every pair whose bound exceeds ``tol``
is recomputed exactly over the whole vocabulary, so every value is within ``tol`` of exact
arithmetic on the given inputs (up to floating-point rounding, ~1e-6 in float32).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .inputs import AblationInputs, centered, logits_of
from .scales import ablation_scalars, logit_offset

log = logging.getLogger(__name__)

_MOMENTS = ((0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (2, 1))


@dataclass(frozen=True)
class FastStats:
    """Bookkeeping of one fast ablation: how many pairs needed the exact fallback."""

    n_pairs: int
    n_fallback: int
    tol: float
    head_size: int

    @property
    def fallback_rate(self) -> float:
        return self.n_fallback / max(1, self.n_pairs)


@dataclass(frozen=True)
class _NeuronBlock:
    idx: slice  # neuron ids of the block
    wp: torch.Tensor  # (Nb, d) centred output weights
    proj: torch.Tensor  # (d, Nb): u = W_U @ proj (low-rank factor of the logit directions)
    median: torch.Tensor  # (Nb,) centre subtracted from u
    u: torch.Tensor  # (V, Nb) centred logit directions u'
    u_t: torch.Tensor  # (Nb, V) the same, contiguous by neuron (for the exact fallback)
    u2: torch.Tensor  # (V, Nb) u'^2
    u2_low: torch.Tensor  # (V, Nb) u'^2 in the dtype of the high-order products
    u3: torch.Tensor  # (V, Nb) u'^3 (high-order dtype)
    u4: torch.Tensor  # (V, Nb) u'^4 (high-order dtype)
    u_max: torch.Tensor  # (Nb,) max |u'| over the vocabulary


def _prepare_block(
    inputs: AblationInputs, wp: torch.Tensor, idx: slice, low: torch.dtype
) -> _NeuronBlock:
    proj = (wp[idx] * inputs.norm.weight).T.contiguous()
    u = inputs.w_u @ proj
    median = u.mean(dim=0)  # any per-neuron constant works; the mean keeps |u'| small
    u = u - median[None, :]
    return _NeuronBlock(idx, wp[idx], proj, median, u, *power_columns(u, low))


def power_columns(
    u: torch.Tensor, low: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """What a neuron block keeps of its centred logit directions ``u`` ``(V, Nb)``: ``u``
    contiguous by neuron, ``u²``, ``u²``/``u³``/``u⁴`` in the high-order dtype ``low``, and the
    largest ``|u|`` of each neuron (shared with :mod:`.postnorm_fast`)."""
    u2 = u * u
    return (
        u.T.contiguous(), u2, u2.to(low), (u2 * u).to(low), (u2 * u2).to(low),
        torch.maximum(u.amax(0), -u.amin(0)),
    )  # fmt: skip


def delta_loss_fast(
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
    """Signed loss change ``L̃ - L`` for every (position, neuron) pair of the final MLP layer.

    Parameters
    ----------
    inputs:
        Captured arrays and model pieces; matrix products run in ``inputs``' dtype and device
        (float32 by default), all bookkeeping in float64.
    tol:
        Pairs whose proven error bound exceeds ``tol`` are recomputed exactly.
    head_size:
        ``K``, most probable tokens per position summed exactly.
    chunk_positions:
        Positions per step (peak memory grows linearly with it).
    neuron_block, memory_budget_bytes:
        Neurons per block; by default as many as fit three ``vocab × block`` matrices in the
        budget.
    high_order_dtype:
        dtype of the products for the third- and fourth-order moments (and the mixed
        ``A B²`` one). Default: bfloat16 when the inputs are float32 (two to three times as
        fast; its rounding, at most ``2^-8 + 2^-18 + (V-1) 2^-24`` of the sum of absolute
        terms, is added to the error bound), else the inputs' dtype.
    progress:
        Called with the number of positions finished after every step (once per neuron block).

    Returns
    -------
    ``((n_positions, n_neurons) float32 tensor on CPU, FastStats)``

    Inputs with a post-MLP norm or soft-capped logits (Gemma 2/3, OLMo 2) go to
    :func:`raretoken.ablation.postnorm_fast.delta_loss_fast_general` (same parameters and
    steps over positions).
    """
    if not inputs.is_affine:
        from .postnorm_fast import delta_loss_fast_general  # imports FastStats from here

        return delta_loss_fast_general(
            inputs, tol=tol, head_size=head_size, chunk_positions=chunk_positions,
            neuron_block=neuron_block, memory_budget_bytes=memory_budget_bytes,
            progress=progress, high_order_dtype=high_order_dtype,
        )  # fmt: skip
    inputs.validate()
    wp = centered(inputs.w_out, inputs.norm)
    offset = logit_offset(inputs)
    c = offset if bool(offset.any()) else None  # None: no offset to subtract
    vocab, n_neu = inputs.w_u.shape[0], inputs.n_neurons
    item = inputs.w_u.element_size()
    if neuron_block is None:
        neuron_block = max(1, min(n_neu, memory_budget_bytes // (4 * vocab * item)))
    if high_order_dtype is None:
        high_order_dtype = torch.bfloat16 if inputs.w_u.dtype == torch.float32 else inputs.w_u.dtype
    out = torch.empty(inputs.n_positions, n_neu, dtype=torch.float32)
    n_fallback = 0
    for b0 in range(0, n_neu, neuron_block):
        idx = slice(b0, min(n_neu, b0 + neuron_block))
        block = _prepare_block(inputs, wp, idx, high_order_dtype)
        for start in range(0, inputs.n_positions, chunk_positions):
            sl = slice(start, min(inputs.n_positions, start + chunk_positions))
            res, nf = _chunk(inputs, block, c, sl, tol, head_size)
            out[sl, idx] = res.float().cpu()
            n_fallback += nf
            if progress is not None:
                progress(sl.stop - sl.start)
    stats = FastStats(
        n_pairs=inputs.n_positions * n_neu, n_fallback=n_fallback, tol=tol, head_size=head_size
    )
    log.info("fast ablation: %d of %d pairs recomputed exactly", n_fallback, stats.n_pairs)
    return out, stats


def _chunk(
    inputs: AblationInputs,
    block: _NeuronBlock,
    c: torch.Tensor | None,
    sl: slice,
    tol: float,
    k: int,
) -> tuple[torch.Tensor, int]:
    x = inputs.resid[sl]
    tgt = inputs.targets[sl]
    z = logits_of(x, inputs)
    logp = torch.log_softmax(z, dim=-1)
    p = logp.exp()
    h = z if c is None else z.sub_(c)  # in place: z is not needed again
    h.sub_(_rowdot(p, h)[:, None])  # h' (E_p h' = 0 up to rounding)
    acts = inputs.acts[sl, block.idx]
    a, b = ablation_scalars(x, acts, inputs.mean_acts[block.idx], block.wp, inputs.norm)

    # Head: the k most probable tokens of each position, summed exactly.
    k = min(k, p.shape[1])
    dt = p.dtype
    p_tail = p
    head_sum = torch.zeros_like(a)
    if k > 0:
        head_p, head_idx = p.topk(k, dim=-1)
        head_h = h.gather(1, head_idx)
        g = torch.addcmul(
            a.to(dt)[:, None, :] * head_h[:, :, None], b.to(dt)[:, None, :], block.u[head_idx]
        )
        head_sum = torch.bmm(head_p[:, None, :], g.exp_()).squeeze(1).double()
        del g
        p_tail = p.scatter_(1, head_idx, 0.0)  # in place: p is not needed again

    # Moments over the tail, E_tail[h'^j u'^m] = sum over tail tokens of p h'^j u'^m.
    ph = p_tail * h
    ph2 = ph * h
    ph3 = ph2 * h
    mom: dict[tuple[int, int], torch.Tensor] = {}
    med = block.median.double()[None, :]
    for j, left in enumerate((p_tail, ph, ph2)):
        scalar = left.sum(-1).double()[:, None]
        mom[(j, 0)] = scalar
        mom[(j, 1)] = ((left @ inputs.w_u) @ block.proj).double() - med * scalar
    mom[(3, 0)] = ph3.sum(-1).double()[:, None]
    h4 = _rowdot(ph3, h).double()[:, None]
    del ph3
    u2 = (p_tail @ block.u2).double()
    low = block.u3.dtype
    p_low = p_tail.to(low)
    hu2 = (ph.to(low) @ block.u2_low).double()
    u3 = (p_low @ block.u3).double()
    u4 = (p_low @ block.u4).double().clamp_min(0)
    # Rounding of low-precision products: |error| <= eps * (sum of |terms|). In bfloat16 both
    # factors are rounded (2^-9 each), their product is exact in the float32 accumulator, and
    # float32 summation of V terms in any order adds at most (V - 1) 2^-24 (2^-8.4 for V = 49k):
    # eps = 2^-8 + 2^-18 + (V - 1) 2^-24 (< 2^-7 for SmolLM2's 49,152 tokens).
    vocab = p.shape[1]
    low_prec = low not in (torch.float32, torch.float64)
    eps = 2.0**-8 + 2.0**-18 + (vocab - 1) * 2.0**-24 if low_prec else 0.0
    u4 = u4 * (1 + eps)  # an upper bound of the true fourth moment, used in the bounds

    e0 = mom[(0, 0)]
    e1 = a * mom[(1, 0)] + b * mom[(0, 1)]
    e2 = a * a * mom[(2, 0)] + 2 * a * b * mom[(1, 1)] + b * b * u2
    e3 = a**3 * mom[(3, 0)] + 3 * a * a * b * mom[(2, 1)] + 3 * a * b * b * hu2 + b**3 * u3
    e4 = a**4 * h4 + b**4 * u4
    total = head_sum + e0 + e1 + e2 / 2 + e3 / 6 + e4 / 24

    # Error bound over the tail: Cauchy-Schwarz / Hölder for the mixed terms left out
    # (A B² h'u'² of order 3 and all mixed terms of order 4), Lagrange's remainder of the
    # fourth-order polynomial with Minkowski on E|y|^5 (E|u'|^5 <= max|u'| E u'^4, likewise h').
    aa, ab = a.abs(), b.abs()
    dropped = (
        4 * aa * ab**3 * h4.pow(0.25) * u4.pow(0.75)
        + 6 * a * a * b * b * (h4 * u4).sqrt()
        + 4 * aa**3 * ab * h4.pow(0.75) * u4.pow(0.25)
    ) / 24
    h_hi = h.amax(-1).double()[:, None]
    h_lo = h.amin(-1).double()[:, None]
    h5 = torch.maximum(h_hi, -h_lo) * h4  # E_tail |h'|^5 <= max|h'| E_tail h'^4
    u_max = block.u_max.double()[None, :]
    m_pos = torch.where(a > 0, a * h_hi, a * h_lo).clamp_min(0) + ab * u_max
    fifth = (aa * h5.pow(0.2) + ab * (u_max * u4).pow(0.2)).pow(5)
    rounding = eps * (
        ab**3 * (u2.clamp_min(0) * u4).sqrt() / 6
        + b**4 * u4 / 24
        + aa * b * b * (mom[(2, 0)].clamp_min(0) * u4).sqrt() / 2
    )
    remainder = torch.exp(m_pos) * fifth / 120 + dropped + rounding
    slack = total - remainder
    bound = torch.where(slack > 0, remainder / slack.clamp_min(1e-300), math.inf)

    g_y = a * h.gather(1, tgt[:, None]).double() + b * block.u[tgt].double()
    res = torch.log(total.clamp_min(1e-300)) - g_y

    bad = ~(bound <= tol)
    n_bad = int(bad.sum())
    if n_bad:
        _fallback(res, bad, logp, h, block.u_t, block.u_max, a, b, tgt)
    return res, n_bad


def _rowdot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``(x * y).sum(-1)`` row by row, without the product as a temporary."""
    return torch.bmm(x[:, None, :], y[:, :, None]).view(-1)


def _fallback(
    res: torch.Tensor,
    bad: torch.Tensor,
    logp: torch.Tensor,
    h: torch.Tensor,
    u_t: torch.Tensor,
    u_abs: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    tgt: torch.Tensor,
    max_elements: int = 1 << 22,
) -> None:
    """Exact log-sum-exp for the flagged pairs, grouped by position (rows broadcast).

    ``log Σ_v exp(log p_v + A h_v + B u_v)`` is built in two fused passes and summed without
    the max-subtraction pass of ``logsumexp``: the exponent is at most ``|A| max|h| + |B|
    max|u|``, and rows where that could overflow go through ``logsumexp`` instead.
    """
    vocab = h.shape[1]
    step = max(1, max_elements // vocab)
    dt = logp.dtype
    a_dt, b_dt = a.to(dt), b.to(dt)
    h_abs = torch.maximum(h.amax(-1), -h.amin(-1))
    for t in bad.any(dim=1).nonzero().flatten().tolist():
        cols = bad[t].nonzero().flatten()
        y = int(tgt[t])
        for q in range(0, len(cols), step):
            k = cols[q : q + step]
            ak, bk = a_dt[t, k][:, None], b_dt[t, k][:, None]
            x = torch.addcmul(logp[t][None, :], ak, h[t][None, :]).addcmul_(bk, u_t[k])
            g_y = ak[:, 0] * h[t, y] + bk[:, 0] * u_t[k, y]
            safe = ak[:, 0].abs() * h_abs[t] + bk[:, 0].abs() * u_abs[k] < 60.0
            if bool(safe.all()):
                lse = x.exp_().sum(-1).log_()
            else:
                lse = torch.logsumexp(x, dim=-1)
            res[t, k] = (lse - g_y).double()
