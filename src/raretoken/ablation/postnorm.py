"""Mean ablation of a final-layer neuron through a post-MLP norm and soft-capped logits, exactly.

Gemma 2/3 and OLMo 2 normalise the MLP output ``m`` before it joins the residual stream:
``x = r + P(m)`` with ``P(y) = γ_P ⊙ s_P(y) y' (+ β_P)``, ``y'`` the centred vector (LayerNorm)
or ``y`` itself (RMSNorm), ``s_P(y) = 1 / sqrt(|y'|²/d + ε_P)``. Mean-ablating neuron ``i``
(``δ = n̄_i - n_i``) turns ``m`` into ``m + δ w_i``; with ``s̃_P`` the scale after the ablation,

    P(m + δ w_i) - P(m) = (α - 1) p + β v_i,   α = s̃_P / s_P,   β = s̃_P δ,

where ``p = γ_P ⊙ s_P m'`` (per position) and ``v_i = γ_P ⊙ w'_i`` (per neuron), and
``α = (1 + r_P)^(-1/2)`` with ``r_P = (2δ m'·w'_i + δ²|w'_i|²) / (|m'|² + d ε_P)``: a quadratic in
``δ`` from the three scalars ``|m'|²``, ``m'·w'_i``, ``|w'_i|²``. The final residual then moves
by ``Δx = (α - 1) p + β v_i`` and the final norm's scale by ``s̃/s = (1 + r)^(-1/2)`` with
``r = (2 x'·Δx' + |Δx'|²) / (|x'|² + d ε)``, which needs ``x'·p'``, ``|p'|²`` (per position),
``x'·v'_i``, ``p'·v'_i`` (per pair) and ``|v'_i|²`` (per neuron). So, exactly,

    z̃ = z + A h + C q + B u_i,    A = s̃/s - 1,   C = s̃ (α - 1),   B = s̃ β,

with ``h = z - c`` (``c = W_U β + b_U``), ``q = W_U (γ ⊙ p')`` a second per-position logit
vector and ``u_i = W_U (γ ⊙ v'_i)`` the neuron's logit direction: the affine case of
:mod:`.scales` plus one per-position direction (``C = 0`` without a post-MLP norm, where
``v_i = w_i``). Gemma 2 then soft-caps, ``ζ = κ tanh(z / κ)``, so the change of the final
logits is ``g = κ tanh((z + Δz)/κ) - κ tanh(z/κ)``, evaluated without cancellation as
``g = κ t σ / (1 + τ t)`` with ``τ = tanh(z/κ)``, ``σ = 1 - τ² = sech²(z/κ)``,
``t = tanh(Δz/κ)`` (as the plain difference where ``1 + τ t < 1/4``: :func:`cap_change`). The loss change is ``log Σ_v p_v e^{g_v} - g_y`` (``p`` the base softmax).

:func:`delta_loss_exact_general` evaluates that closed form for every pair (``vocab`` numbers
each, batched); :func:`delta_loss_recompute_general` recomputes the post-MLP norm, the final
norm and the unembedding once per neuron (the reference and the benchmark's baseline).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .inputs import AblationInputs, apply_norm, centered, logits_of, raw_logits, soft_cap
from .scales import logit_offset

__all__ = [
    "CLOSE_DENOMINATOR",
    "Directions",
    "Positions",
    "cap_change",
    "delta_loss_exact_general",
    "delta_loss_recompute_general",
    "directions",
    "pair_scalars",
    "positions",
    "post_output",
]


@dataclass(frozen=True)
class Directions:
    """Per-neuron pieces (all neurons).

    ``wp``: ``(N, d)`` output weights centred for the post-MLP norm (``w'``; ``None`` without
    one). ``v``: ``(N, d)`` the neuron's direction in the final residual, centred for the final
    norm (``v'_i``). ``proj``: ``(d, N)`` with ``u = W_U @ proj`` the logit directions.
    """

    wp: torch.Tensor | None
    v: torch.Tensor
    proj: torch.Tensor


def directions(inputs: AblationInputs) -> Directions:
    """The per-neuron directions of ``inputs`` (see the module docstring)."""
    if inputs.post_norm is None:
        wp = None
        v = centered(inputs.w_out, inputs.norm)
    else:
        wp = centered(inputs.w_out, inputs.post_norm)
        v = centered(wp * inputs.post_norm.weight, inputs.norm)
    return Directions(wp, v, (v * inputs.norm.weight).T.contiguous())


@dataclass(frozen=True)
class Positions:
    """Per-position pieces of a block of positions.

    ``x``: ``(P, d)`` centred final residual, float64. ``p``: ``(P, d)`` centred post-norm output
    without its bias (``p'``), float64, or ``None``. ``m``: ``(P, d)`` centred MLP output
    (``m'``), float64, or ``None``. ``z``: ``(P, V)`` logits before soft-capping, ``h = z - c``;
    ``q``: ``(P, V)`` logit vector of ``p'`` (or ``None``); ``logp``: base log-probabilities
    of the (capped) logits; ``tau``, ``sigma``: ``tanh(z/κ)`` and ``sech²(z/κ)`` (capped only).
    """

    x: torch.Tensor
    p: torch.Tensor | None
    m: torch.Tensor | None
    z: torch.Tensor
    h: torch.Tensor
    q: torch.Tensor | None
    logp: torch.Tensor
    tau: torch.Tensor | None
    sigma: torch.Tensor | None


def positions(inputs: AblationInputs, sl: slice, c: torch.Tensor) -> Positions:
    """The per-position pieces of positions ``sl`` (``c``: the logit offset ``W_U β + b_U``)."""
    x = inputs.resid[sl]
    z = raw_logits(x, inputs)
    x64 = centered(x.double(), inputs.norm)
    p64 = m64 = q = None
    if inputs.post_norm is not None:
        post = inputs.post_norm
        m64 = centered(inputs.acts[sl].double() @ inputs.w_out.double(), post)
        s_p = torch.rsqrt(m64.pow(2).mean(-1, keepdim=True) + post.eps)
        p64 = centered(m64 * s_p * post.weight.double(), inputs.norm)
        q = (p64.to(z.dtype) * inputs.norm.weight) @ inputs.w_u.T
    tau = sigma = None
    if inputs.softcap is not None:
        tau = torch.tanh(z / inputs.softcap)
        sigma = torch.cosh(z / inputs.softcap).pow(-2)
    logp = torch.log_softmax(soft_cap(z, inputs.softcap), dim=-1)
    return Positions(x64, p64, m64, z, z - c, q, logp, tau, sigma)


def pair_scalars(
    inputs: AblationInputs, pos: Positions, sl: slice, idx: torch.Tensor | slice, dirs: Directions
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(A, C, B)`` ``(P, K)`` float64 of the positions ``sl`` and neurons ``idx``."""
    delta = inputs.mean_acts[idx].double()[None, :] - inputs.acts[sl][:, idx].double()
    d = pos.x.shape[-1]
    v = dirs.v[idx].double()
    if pos.m is None or dirs.wp is None or pos.p is None or inputs.post_norm is None:
        am1 = torch.zeros_like(delta)
        beta = delta
    else:
        wp = dirs.wp[idx].double()
        q_p = pos.m.pow(2).sum(-1, keepdim=True) + d * inputs.post_norm.eps
        r_p = (2.0 * delta * (pos.m @ wp.T) + delta.pow(2) * wp.pow(2).sum(-1)[None, :]) / q_p
        am1 = torch.expm1(-0.5 * torch.log1p(r_p))  # α - 1
        beta = torch.rsqrt(q_p / d) * (am1 + 1.0) * delta
    q_f = pos.x.pow(2).sum(-1, keepdim=True) + d * inputs.norm.eps
    num = 2.0 * beta * (pos.x @ v.T) + beta.pow(2) * v.pow(2).sum(-1)[None, :]
    if pos.p is not None:
        xp = (pos.x * pos.p).sum(-1, keepdim=True)
        pp = pos.p.pow(2).sum(-1, keepdim=True)
        num = num + 2.0 * am1 * xp + am1.pow(2) * pp + 2.0 * am1 * beta * (pos.p @ v.T)
    a = torch.expm1(-0.5 * torch.log1p(num / q_f))
    s_tilde = torch.rsqrt(q_f / d) * (a + 1.0)
    return a, s_tilde * am1, s_tilde * beta


#: Below this value of ``1 + τ t`` the soft-capping change is taken as the difference of the
#: two tanh (they are then far apart, so the difference loses nothing).
CLOSE_DENOMINATOR = 0.25


def cap_change(
    dz: torch.Tensor, z: torch.Tensor, tau: torch.Tensor, sigma: torch.Tensor, cap: float
) -> torch.Tensor:
    """``κ tanh((z + Δz)/κ) - κ tanh(z/κ)`` (a new tensor; the others broadcast against ``dz``).

    Evaluated as ``κ t σ / (1 + τ t)`` with ``t = tanh(Δz/κ)``, ``τ = tanh(z/κ)``,
    ``σ = sech²(z/κ)``: no cancellation for small ``Δz``. Where ``1 + τ t`` <
    :data:`CLOSE_DENOMINATOR` (``z`` pressed against the cap and ``Δz`` pulling it far back, where
    ``τ`` rounds to ±1 and the quotient to 0/0) the plain difference is used instead.
    """
    t = torch.tanh(dz / cap)
    den = torch.addcmul(torch.ones_like(t), t, tau)
    close = den < CLOSE_DENOMINATOR
    g = t.mul_(sigma).div_(den).mul_(cap)
    if bool(close.any()):
        g = torch.where(close, (torch.tanh((z + dz) / cap) - tau) * cap, g)
    return g


#: Values per block of the exact closed form's elementwise passes (a few MB: cache-resident).
BLOCK_ELEMENTS = 1 << 18
#: ``exp`` of float32 values below this cannot overflow, even summed over a vocabulary.
SAFE_EXPONENT = 60.0


def delta_loss_exact_general(
    inputs: AblationInputs,
    neurons: torch.Tensor | None = None,
    *,
    chunk_elements: int = 1 << 24,
) -> torch.Tensor:
    """``(n_positions, n_selected)`` exact signed ``L̃ - L`` (float64) for any family.

    The closed form of the module docstring, one pass over the vocabulary per pair: per
    vocabulary entry three multiply-adds, one exponential (and, soft-capped, one tanh and four
    multiply/divides), in blocks of :data:`BLOCK_ELEMENTS` values, against ``d_model``
    multiply-adds for recomputing the unembedding. Positions are processed in the steps of
    :func:`raretoken.ablation.exact.delta_loss_exact` (``chunk_elements // (V N)``).
    """
    inputs.validate()
    dirs = directions(inputs)
    idx = torch.arange(inputs.n_neurons) if neurons is None else torch.as_tensor(neurons)
    idx = idx.to(inputs.w_u.device)
    c = logit_offset(inputs)
    n_pos, vocab = inputs.n_positions, inputs.w_u.shape[0]
    u_t = (inputs.w_u @ dirs.proj[:, idx]).T.contiguous()  # (K, V)
    u_abs = u_t.abs().amax(-1).double()
    dt = u_t.dtype
    cap = inputs.softcap
    out = torch.empty(n_pos, len(idx), dtype=torch.float64)
    per_pos = max(1, chunk_elements // (vocab * max(1, len(idx))))
    step = max(1, BLOCK_ELEMENTS // vocab)
    buf = torch.empty(step, vocab, dtype=dt, device=u_t.device)
    t_buf = torch.empty_like(buf) if cap is not None else buf
    d_buf = torch.empty_like(buf) if cap is not None else buf
    for start in range(0, n_pos, per_pos):
        sl = slice(start, min(n_pos, start + per_pos))
        pos = positions(inputs, sl, c)
        scal = pair_scalars(inputs, pos, sl, idx, dirs)
        a, cc, b = (t.to(dt) for t in scal)
        # |Δz| <= |A| max|h| + |C| max|q| + |B| max|u|; capping only shrinks it
        g_max = scal[0].abs() * pos.h.abs().amax(-1).double()[:, None]
        g_max = g_max + scal[2].abs() * u_abs[None, :]
        if pos.q is not None:
            g_max = g_max + scal[1].abs() * pos.q.abs().amax(-1).double()[:, None]
        safe = (g_max < SAFE_EXPONENT).cpu()
        tgt = inputs.targets[sl].tolist()
        for t in range(pos.z.shape[0]):
            h, logp, y = pos.h[t], pos.logp[t], tgt[t]
            for k0 in range(0, len(idx), step):
                ks = slice(k0, min(len(idx), k0 + step))
                nk = ks.stop - ks.start
                g = torch.mul(u_t[ks], b[t, ks, None], out=buf[:nk])
                g.addcmul_(a[t, ks, None], h[None, :])
                if pos.q is not None:
                    g.addcmul_(cc[t, ks, None], pos.q[t][None, :])
                if cap is not None and pos.tau is not None and pos.sigma is not None:
                    g = _capped(g, t_buf[:nk], d_buf[:nk], pos, t, cap)
                g_y = g[:, y].to(torch.float64, copy=True)
                g.add_(logp[None, :])
                if bool(safe[t, ks].all()):
                    lse = g.exp_().sum(-1).log_()
                else:
                    lse = torch.logsumexp(g, dim=-1)
                out[start + t, ks] = lse.double().cpu() - g_y.cpu()
    return out


def _capped(
    dz: torch.Tensor, t_buf: torch.Tensor, d_buf: torch.Tensor, pos: Positions, t: int, cap: float
) -> torch.Tensor:
    """:func:`cap_change` of ``dz`` at position ``t`` with preallocated buffers."""
    assert pos.tau is not None and pos.sigma is not None
    tau, sigma = pos.tau[t][None, :], pos.sigma[t][None, :]
    tt = torch.div(dz, cap, out=t_buf).tanh_()
    den = torch.mul(tt, tau, out=d_buf).add_(1.0)
    if float(den.min()) < CLOSE_DENOMINATOR:
        return cap_change(dz, pos.z[t][None, :], tau, sigma, cap)
    return tt.mul_(sigma).div_(den).mul_(cap)


def post_output(m: torch.Tensor, inputs: AblationInputs) -> torch.Tensor:
    """The post-MLP norm's output ``P(m)`` (``m`` itself without a post-MLP norm)."""
    return m if inputs.post_norm is None else apply_norm(m, inputs.post_norm)


def _ce(z: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(z, dim=-1) - z.gather(-1, targets[..., None]).squeeze(-1)


def delta_loss_recompute_general(
    inputs: AblationInputs, neurons: Sequence[int] | torch.Tensor, *, chunk_positions: int = 512
) -> torch.Tensor:
    """``(n_positions, len(neurons))`` signed ``L̃ - L`` by recomputing, once per neuron, the
    MLP output's post-norm, the final norm, the unembedding and the soft-capping on
    ``x - P(m) + P(m + δ w_i)``."""
    idx = [int(i) for i in neurons]
    out = torch.empty(inputs.n_positions, len(idx), dtype=torch.float64)
    for start in range(0, inputs.n_positions, chunk_positions):
        sl = slice(start, start + chunk_positions)
        x = inputs.resid[sl]
        tgt = inputs.targets[sl]
        base = _ce(logits_of(x, inputs), tgt)
        m = inputs.acts[sl] @ inputs.w_out
        rest = x - post_output(m, inputs)
        for k, i in enumerate(idx):
            delta = (inputs.mean_acts[i] - inputs.acts[sl, i])[:, None]
            x_new = rest + post_output(m + delta * inputs.w_out[i], inputs)
            out[sl, k] = (_ce(logits_of(x_new, inputs), tgt) - base).double().cpu()
    return out
