"""How a final-layer ablation moves the logits: the two scalars ``A`` and ``B``.

Ablating neuron ``i`` to its mean adds ``δ w_i`` (``δ = n̄_i - n_i``) to the final residual ``x``.
Write ``x'`` and ``w'`` for the centred vectors (LayerNorm) or the vectors themselves (RMSNorm),
``s = 1/sqrt(|x'|²/d + ε)`` for the norm's scale and ``s̃`` for the scale after the ablation.
Then, exactly,

    z̃ = (s̃/s) (z - c) + c + s̃ δ u_i,     u_i = W_U (γ ⊙ w'_i),   c = W_U β + b_U,

so the logit change is ``Δz = A h + B u_i`` with ``h = z - c``, ``A = s̃/s - 1`` and
``B = s̃ δ``: a per-(position, neuron) pair of scalars times two fixed vectors.
"""

from __future__ import annotations

import torch

from ..models.adapters import NormSpec
from .inputs import AblationInputs, centered


def neuron_directions(inputs: AblationInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(w', U)``: centred output weights ``(N, d)`` and logit directions ``(V, N)``."""
    wp = centered(inputs.w_out, inputs.norm)
    u = inputs.w_u @ (wp * inputs.norm.weight).T
    return wp, u


def logit_offset(inputs: AblationInputs) -> torch.Tensor:
    """``c = W_U β + b_U``: the part of the logits the norm's scale does not touch."""
    vocab = inputs.w_u.shape[0]
    c = torch.zeros(vocab, dtype=inputs.w_u.dtype, device=inputs.w_u.device)
    if inputs.norm.bias is not None:
        c = c + inputs.w_u @ inputs.norm.bias
    if inputs.b_u is not None:
        c = c + inputs.b_u
    return c


def ablation_scalars(
    x: torch.Tensor,
    acts: torch.Tensor,
    mean_acts: torch.Tensor,
    wp: torch.Tensor,
    norm: NormSpec,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``A`` and ``B`` of every (position, neuron) pair, computed in float64.

    ``A = s̃/s - 1`` is evaluated as ``expm1(-½ log1p(r))`` with
    ``r = (2δ x'·w' + δ²|w'|²) / (|x'|² + dε)`` so that tiny rescalings keep full precision.
    """
    x64 = centered(x.double(), norm)
    wp64 = wp.double()
    d = x64.shape[-1]
    delta = mean_acts.double()[None, :] - acts.double()
    q = x64.pow(2).sum(-1, keepdim=True) + d * norm.eps
    xw = x64 @ wp64.T
    ww = wp64.pow(2).sum(-1)[None, :]
    r = (2.0 * delta * xw + delta.pow(2) * ww) / q
    a_minus_1 = torch.expm1(-0.5 * torch.log1p(r))
    s = torch.rsqrt(q / d)
    s_tilde = s * (a_minus_1 + 1.0)
    return a_minus_1, s_tilde * delta
