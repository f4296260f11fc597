"""Fast exact all-neuron mean ablation of the final MLP layer, by matrix multiplication.

For a position with base softmax ``p`` and a neuron ablated to its mean, the logit change is
``g = A h + B u`` (:mod:`.scales`) and the loss change is ``log E_p[e^g] - g_y``. Shifting ``h``
by its mean under ``p`` and ``u`` by a per-neuron constant changes ``g`` by a constant that
cancels, so take ``h' = h - E_p h`` and ``u' = u - med(u)``.

The vocabulary is split per neuron into its ``K`` most extreme logit-direction entries (the
*head*, position-independent) and the rest:

* head: ``Σ_{v∈H_i} p_v e^{g_v}`` summed exactly (``K`` terms per pair);
* rest: ``e^g`` replaced by its third-order Taylor polynomial, whose ``p``-weighted sum needs
  the moments ``E[h'^j u'^m]`` with ``j + m ≤ 3``: six ``positions × vocab × neurons`` matrix
  products for all neurons at once, minus the head's share.

The Taylor remainder of the rest is bounded by ``e^M M² E_rest[g²] / 24`` with
``M = |A| max|h'| + |B| max_{v∉H_i}|u'_v|``; the bound on the error of the log is
``rem / (total - rem)``. Every pair whose bound exceeds ``tol`` is recomputed exactly
(:func:`.exact.pair_delta`), so every returned value is within ``tol`` of exact arithmetic
(up to floating-point rounding of the inputs).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .exact import pair_delta
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
    u3: torch.Tensor  # (V, Nb) u'^3
    u4: torch.Tensor  # (V, Nb) u'^4
    head: torch.Tensor  # (Nb, K) token ids of the head
    u_head: torch.Tensor  # (Nb, K)
    rest_max: torch.Tensor  # (Nb,) max |u'| outside the head


def _prepare_block(
    inputs: AblationInputs, wp: torch.Tensor, idx: slice, head_size: int
) -> _NeuronBlock:
    proj = (wp[idx] * inputs.norm.weight).T.contiguous()
    u = inputs.w_u @ proj
    median = u.median(dim=0).values
    u = u - median[None, :]
    k = min(head_size, u.shape[0])
    top = u.abs().topk(min(k + 1, u.shape[0]), dim=0)
    head = top.indices[:k].T.contiguous()
    if k < u.shape[0]:
        rest_max = top.values[k]
    else:
        rest_max = torch.zeros(u.shape[1], dtype=u.dtype, device=u.device)
    u_head = u.T.gather(1, head)
    u2 = u * u
    return _NeuronBlock(
        idx, wp[idx], proj, median, u, u.T.contiguous(), u2, u2 * u, u2 * u2, head, u_head, rest_max
    )


def delta_loss_fast(
    inputs: AblationInputs,
    *,
    tol: float = 1e-6,
    head_size: int = 64,
    chunk_positions: int = 128,
    neuron_block: int | None = None,
    memory_budget_bytes: int = 2 << 30,
    progress: Callable[[int], None] | None = None,
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
        ``K``, vocabulary entries per neuron summed exactly.
    chunk_positions:
        Positions per step (peak memory grows linearly with it).
    neuron_block, memory_budget_bytes:
        Neurons per block; by default as many as fit three ``vocab × block`` matrices in the
        budget.
    progress:
        Called with the number of positions finished after every step (once per neuron block).

    Returns
    -------
    ``((n_positions, n_neurons) float32 tensor on CPU, FastStats)``
    """
    inputs.validate()
    wp = centered(inputs.w_out, inputs.norm)
    c = logit_offset(inputs)
    vocab, n_neu = inputs.w_u.shape[0], inputs.n_neurons
    item = inputs.w_u.element_size()
    if neuron_block is None:
        neuron_block = max(1, min(n_neu, memory_budget_bytes // (4 * vocab * item)))
    out = torch.empty(inputs.n_positions, n_neu, dtype=torch.float32)
    n_fallback = 0
    for b0 in range(0, n_neu, neuron_block):
        idx = slice(b0, min(n_neu, b0 + neuron_block))
        block = _prepare_block(inputs, wp, idx, head_size)
        for start in range(0, inputs.n_positions, chunk_positions):
            sl = slice(start, min(inputs.n_positions, start + chunk_positions))
            res, nf = _chunk(inputs, block, c, sl, tol)
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
    inputs: AblationInputs, block: _NeuronBlock, c: torch.Tensor, sl: slice, tol: float
) -> tuple[torch.Tensor, int]:
    x = inputs.resid[sl]
    tgt = inputs.targets[sl]
    z = logits_of(x, inputs)
    logp = torch.log_softmax(z, dim=-1)
    p = logp.exp()
    h = z - c
    h = h - (p * h).sum(-1, keepdim=True)  # h' (E_p h' = 0 up to rounding)
    acts = inputs.acts[sl, block.idx]
    a, b = ablation_scalars(x, acts, inputs.mean_acts[block.idx], block.wp, inputs.norm)

    # Moments E_p[h'^j u'^m]. m = 1 through the low-rank factor u = W_U proj; m = 2, 3 full.
    ph = p * h
    ph2 = ph * h
    full: dict[tuple[int, int], torch.Tensor] = {}
    med = block.median.double()[None, :]
    for j, left in enumerate((p, ph, ph2)):
        scalar = left.sum(-1, dtype=torch.float64)[:, None]
        full[(j, 0)] = scalar
        full[(j, 1)] = ((left @ inputs.w_u) @ block.proj).double() - med * scalar
    full[(3, 0)] = (ph2 * h).sum(-1, dtype=torch.float64)[:, None]
    full[(0, 2)] = (p @ block.u2).double()
    full[(0, 3)] = (p @ block.u3).double()
    full[(1, 2)] = (ph @ block.u2).double()
    full[(0, 4)] = (p @ block.u4).double()
    h4 = (ph2 * h * h).sum(-1, dtype=torch.float64)[:, None]  # E_p h'^4 (whole vocabulary)
    full[(4, 0)] = h4
    h5 = (ph2 * h.abs().pow(3)).sum(-1, dtype=torch.float64)[:, None]  # E_p |h'|^5

    # Head: exact sum and its share of every moment.
    a3, b3 = a[..., None], b[..., None]
    p_head = p[:, block.head].double()  # (T, Nb, K)
    h_head = h[:, block.head].double()
    u_head = block.u_head[None].double()
    head_sum = (p_head * torch.exp(a3 * h_head + b3 * u_head)).sum(-1)
    hp = [p_head]
    for _ in range(4):
        hp.append(hp[-1] * h_head)

    def rest(j: int, m: int) -> torch.Tensor:
        share = hp[j] if m == 0 else hp[j] * u_head**m
        return full[(j, m)] - share.sum(-1)

    r02 = rest(0, 2)
    e0 = rest(0, 0)
    e1 = a * rest(1, 0) + b * rest(0, 1)
    e2 = a * a * rest(2, 0) + 2 * a * b * rest(1, 1) + b * b * r02
    e3 = (
        a**3 * rest(3, 0)
        + 3 * a * a * b * rest(2, 1)
        + 3 * a * b * b * rest(1, 2)
        + b**3 * rest(0, 3)
    )
    u4 = rest(0, 4).clamp_min(0)
    e4 = a**4 * rest(4, 0) + b**4 * u4
    total = head_sum + e0 + e1 + e2 / 2 + e3 / 6 + e4 / 24

    # Error bound over the rest of the vocabulary (Hölder for the mixed fourth-order terms left
    # out, Lagrange remainder of the fourth-order Taylor polynomial with Minkowski on E|y|^5).
    aa, ab = a.abs(), b.abs()
    dropped = (
        4 * aa * ab**3 * h4.pow(0.25) * u4.pow(0.75)
        + 6 * a * a * b * b * (h4 * u4).sqrt()
        + 4 * aa**3 * ab * h4.pow(0.75) * u4.pow(0.25)
    ) / 24
    h_hi = h.amax(-1).double()[:, None]
    h_lo = h.amin(-1).double()[:, None]
    rest_max = block.rest_max.double()[None, :]
    m_pos = torch.where(a > 0, a * h_hi, a * h_lo).clamp_min(0) + ab * rest_max
    fifth = (aa * h5.pow(0.2) + ab * (rest_max * u4).pow(0.2)).pow(5)
    remainder = torch.exp(m_pos) * fifth / 120 + dropped
    slack = total - remainder
    bound = torch.where(slack > 0, remainder / slack.clamp_min(1e-300), math.inf)

    g_y = a * h.gather(1, tgt[:, None]).double() + b * block.u[tgt].double()
    res = torch.log(total.clamp_min(1e-300)) - g_y

    bad = ~(bound <= tol)
    n_bad = int(bad.sum())
    if n_bad:
        rows, cols = bad.nonzero(as_tuple=True)
        step = max(1, (1 << 22) // h.shape[1])
        for q in range(0, n_bad, step):
            r, k = rows[q : q + step], cols[q : q + step]
            res[r, k] = pair_delta(logp[r], h[r], block.u_t[k], a[r, k], b[r, k], tgt[r])
    return res, n_bad
