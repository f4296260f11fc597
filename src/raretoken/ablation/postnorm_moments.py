"""Moments over the tail of the vocabulary for :mod:`.postnorm_fast`.

``w_k = p_tail c_k`` are the weights of the order-``k`` term of ``e^{g}`` (``c_k = 1/k!``
uncapped; for soft-capped logits the per-token Taylor coefficients of ``e^{F_v(Δ)}``, see
:mod:`.postnorm_fast`). :func:`tail_sums` returns every sum the expansion and its error bound
need, for one block of positions and neurons.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .inputs import AblationInputs

__all__ = ["TANH_DERIVATIVE_BOUNDS", "TailMoments", "bell5_bound", "expansion_weights", "tail_sums"]

#: ``sup_x |d^k tanh(x) / dx^k|`` for ``k = 1..5`` (rounded up; checked in the tests).
TANH_DERIVATIVE_BOUNDS = (1.0, 4.0 / (3.0 * math.sqrt(3.0)) + 1e-12, 2.0, 4.08589, 16.0)


def bell5_bound(cap: float) -> float:
    """``Y₅(M₁, M₂/κ, M₃/κ², M₄/κ³, M₅/κ⁴)``: a bound on ``|d⁵ e^F / dΔ⁵| e^{-F}`` for
    ``F(Δ) = κ tanh((z + Δ)/κ) - κ tanh(z/κ)`` (complete Bell polynomial, non-negative
    coefficients, of the bounds ``M_k`` of :data:`TANH_DERIVATIVE_BOUNDS`)."""
    x1, x2, x3, x4, x5 = (m / cap**k for k, m in enumerate(TANH_DERIVATIVE_BOUNDS))
    return (
        x1**5 + 10 * x1**3 * x2 + 15 * x1 * x2**2 + 10 * x1**2 * x3 + 10 * x2 * x3
        + 5 * x1 * x4 + x5
    )  # fmt: skip


Weights = tuple[list[torch.Tensor], dict[int, torch.Tensor], list[float]]


def expansion_weights(
    p_tail: torch.Tensor, tau: torch.Tensor | None, sigma: torch.Tensor | None, cap: float | None
) -> Weights:
    """``([w_0, ..., w_4], {k: max_v |c_k(v)|}, scales)``: the weights ``(P, V)``, a per-position
    bound ``(P, 1)`` float64 on ``|c_k|``, and the factors the sums with ``w_k`` are multiplied
    by: the order-``k`` weights are ``scales[k] * w_k`` (uncapped: every ``w_k`` is ``p_tail``
    itself and ``scales[k] = 1/k!``, so the sums are shared; capped: ``p_tail c_k`` and 1)."""
    n = p_tail.shape[0]
    if cap is None or tau is None or sigma is None:
        ks = [1.0 / math.factorial(k) for k in range(5)]
        k_max = {k: torch.full((n, 1), ks[k], dtype=torch.float64, device=p_tail.device)
                 for k in range(5)}  # fmt: skip
        return [p_tail] * 5, k_max, ks
    f1 = sigma
    f2 = -2.0 * sigma * tau / cap
    tau2 = tau * tau
    f3 = -2.0 * sigma * (1.0 - 3.0 * tau2) / cap**2
    f4 = 8.0 * sigma * tau * (2.0 - 3.0 * tau2) / cap**3
    f1sq = f1 * f1
    coef = [
        torch.ones_like(f1),
        f1,
        (f1sq + f2) / 2,
        (f1sq * f1 + 3 * f1 * f2 + f3) / 6,
        (f1sq * f1sq + 6 * f1sq * f2 + 4 * f1 * f3 + 3 * f2 * f2 + f4) / 24,
    ]
    w = [p_tail if k == 0 else p_tail * coef[k] for k in range(5)]
    k_max = {k: coef[k].abs().amax(-1, keepdim=True).double() for k in range(5)}
    return w, k_max, [1.0] * 5


@dataclass(frozen=True)
class TailMoments:
    """Sums over the tail; ``(P, 1)`` per position or ``(P, Nb)`` per pair, float64.

    ``y_sums[k][j] = Σ w_k x1^j x2^(k-j)``; ``lin[k][j] = Σ w_k x1^j x2^(k-1-j) u`` (``k =
    1..3``); ``e_u2 = Σ w_2 u²``, ``e_x1u2 = Σ w_3 x1 u²``, ``e_x2u2 = Σ w_3 x2 u²``,
    ``e_u3 = Σ w_3 u³``, ``e_u4 = Σ w_4 u⁴``; ``u4_abs``: an upper bound of ``Σ p_tail u⁴``;
    ``p_y4[j] = Σ p_tail x1^j x2^(4-j)``; ``p_abs5 = (Σ p_tail |x1|⁵, Σ p_tail |x2|⁵)``;
    ``p_x1sq``, ``p_x2sq``: ``Σ p_tail x1²``, ``x2²``; ``k_max``: bounds on ``|c_k|``;
    ``eps``: relative rounding of the low-precision products (0 in the working dtype).
    Without ``x2`` only the ``j = k`` entries are non-zero and ``x2`` sums are ``None``/0.
    """

    y_sums: list[list[torch.Tensor]]
    lin: dict[int, list[torch.Tensor]]
    e_u2: torch.Tensor
    e_x1u2: torch.Tensor
    e_x2u2: torch.Tensor | None
    e_u3: torch.Tensor
    e_u4: torch.Tensor
    u4_abs: torch.Tensor
    p_y4: list[torch.Tensor]
    p_abs5: tuple[torch.Tensor, torch.Tensor]
    p_x1sq: torch.Tensor
    p_x2sq: torch.Tensor | None
    k_max: dict[int, torch.Tensor]
    eps: float


def tail_sums(
    inputs: AblationInputs,
    p_tail: torch.Tensor,
    weights: Weights,
    x1: torch.Tensor,
    x2: torch.Tensor | None,
    proj: torch.Tensor,
    median: torch.Tensor,
    u2: torch.Tensor,
    u2_low: torch.Tensor,
    u3: torch.Tensor,
    u4: torch.Tensor,
    *,
    capped: bool,
) -> TailMoments:
    """Every sum of :class:`TailMoments` for one block of positions and neurons.

    The per-position sums come from one batched product of the weight rows
    ``(w_0, ..., w_4, p_tail)`` (one row when they are all ``p_tail``) with the monomials
    ``x1^j x2^l`` (``j + l <= 4``) and ``|x1|⁵``, ``|x2|⁵``.
    """
    w, k_max, scales = weights
    shared = all(t is p_tail for t in w)  # uncapped: one row, scaled afterwards
    n, vocab = p_tail.shape
    dev = p_tail.device
    pairs = [(j, m) for m in range(5 if x2 is not None else 1) for j in range(5 - m)]
    col = {jl: i for i, jl in enumerate(pairs)}
    mono = torch.empty(n, len(pairs) + 2, vocab, dtype=x1.dtype, device=dev)
    x1p = [torch.ones_like(x1), x1]
    for j in range(2, 5):
        x1p.append(torch.mul(x1p[j - 1], x1, out=mono[:, col[(j, 0)]]))
    mono[:, col[(0, 0)]] = 1.0
    mono[:, col[(1, 0)]] = x1
    if x2 is not None:
        x2_l = x2
        for l_pow in range(1, 5):
            if l_pow > 1:
                x2_l = mono[:, col[(0, l_pow)]]
                torch.mul(mono[:, col[(0, l_pow - 1)]], x2, out=x2_l)
            else:
                mono[:, col[(0, 1)]] = x2
            for j in range(1, 5 - l_pow):
                torch.mul(x1p[j], mono[:, col[(0, l_pow)]], out=mono[:, col[(j, l_pow)]])
    torch.mul(x1p[4], x1.abs(), out=mono[:, -2])
    if x2 is not None:
        torch.mul(mono[:, col[(0, 4)]], x2.abs(), out=mono[:, -1])
    else:
        mono[:, -1] = 0.0
    rows = p_tail[:, None, :] if shared else torch.stack([*w, p_tail], dim=1)  # (P, 1|6, V)
    sums = torch.bmm(rows, mono.transpose(1, 2)).double()  # (P, 1|6, n_mono)

    def s(row: int, j: int, l_pow: int) -> torch.Tensor:
        """Σ w_row x1^j x2^l_pow, with row 5 = p_tail (scaled by ``scales``)."""
        if (j, l_pow) not in col:
            return zero
        if shared:
            return sums[:, 0, col[(j, l_pow)], None] * (1.0 if row == 5 else scales[row])
        return sums[:, row, col[(j, l_pow)], None] * (1.0 if row == 5 else scales[row])

    zero = torch.zeros(n, 1, dtype=torch.float64, device=dev)
    y_sums = [[s(k, j, k - j) for j in range(k + 1)] for k in range(5)]
    p_y4 = [s(5, j, 4 - j) for j in range(5)]
    p_x1sq = s(5, 2, 0)
    p_x2sq = None if x2 is None else s(5, 0, 2)
    last = 0 if shared else 5
    abs5 = (sums[:, last, -2, None], sums[:, last, -1, None])

    # terms linear in u (orders 1..3) through the low-rank u = W_U proj - median
    keys = [(k + 1, j) for k in range(3) for j in range(k + 1) if (j, k - j) in col]
    left = torch.empty(len(keys), n, vocab, dtype=x1.dtype, device=dev)
    for i, (k, j) in enumerate(keys):
        torch.mul(w[k], mono[:, col[(j, k - 1 - j)]], out=left[i])
    del mono
    flat = left.view(len(keys) * n, vocab)
    low_rank = ((flat @ inputs.w_u) @ proj).double().view(len(keys), n, -1)
    lin_vals = low_rank - flat.sum(-1).double().view(len(keys), n, 1) * median.double()
    lin: dict[int, list[torch.Tensor]] = {k: [zero] * k for k in (1, 2, 3)}
    for i, (k, j) in enumerate(keys):
        lin[k][j] = lin_vals[i] * scales[k]
    del left, flat

    low = u3.dtype
    low_prec = low not in (torch.float32, torch.float64)
    eps = 2.0**-8 + 2.0**-18 + (vocab - 1) * 2.0**-24 if low_prec else 0.0
    e_u2 = (w[2] @ u2).double() * scales[2]
    e_x1u2 = ((w[3] * x1).to(low) @ u2_low).double() * scales[3]
    e_x2u2 = None if x2 is None else ((w[3] * x2).to(low) @ u2_low).double() * scales[3]
    w3_low = w[3].to(low)
    e_u3 = (w3_low @ u3).double() * scales[3]
    p_u4 = (w[4].to(low) @ u4).double()  # shared: Σ p_tail u⁴
    e_u4 = p_u4 * scales[4]
    if capped and not shared:
        u4_abs = (p_tail.to(low) @ u4).double().clamp_min(0) * (1 + eps)
    else:
        u4_abs = p_u4.clamp_min(0) * (1 + eps)
    return TailMoments(
        y_sums=y_sums, lin=lin, e_u2=e_u2, e_x1u2=e_x1u2, e_x2u2=e_x2u2, e_u3=e_u3, e_u4=e_u4,
        u4_abs=u4_abs, p_y4=p_y4, p_abs5=abs5, p_x1sq=p_x1sq, p_x2sq=p_x2sq,
        k_max=k_max, eps=eps,
    )  # fmt: skip
