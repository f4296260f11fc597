"""The arrays an all-neuron mean ablation of the final MLP layer needs.

The final MLP writes straight into the residual stream, so ablating neuron ``i`` of the final
layer to its mean (eq. 2) changes the final residual ``x`` at every position by
``(n̄_i - n_i) w_i`` and nothing upstream. The loss after ablation therefore needs only the final
norm and the unembedding: :class:`AblationInputs` holds exactly those pieces.

Families with a norm after the MLP (Gemma 2/3, OLMo 2: ``post_norm``) change the final
residual by ``P(m + δ w_i) - P(m)`` instead, with ``m = acts @ w_out`` the MLP output; families
that soft-cap their logits (Gemma 2: ``softcap``) apply ``z -> c tanh(z / c)`` after the
unembedding. Both are handled exactly by :mod:`.postnorm`, to which the methods dispatch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from ..errors import (
    ConfigError,
    InsufficientDataError,
    NumericalError,
    UnsupportedArchitectureError,
)
from ..models.adapters import ModelAdapter, NormSpec


@dataclass(frozen=True)
class AblationInputs:
    """Everything the loss change of a final-layer neuron ablation depends on.

    Attributes
    ----------
    resid:
        ``(n_positions, d_model)`` final residual stream (the input of the final norm).
    acts:
        ``(n_positions, d_mlp)`` final-layer neuron activations (input of the MLP output projection).
    targets:
        ``(n_positions,)`` next-token ids scored at each position.
    w_out:
        ``(d_mlp, d_model)`` output weight vector of every neuron.
    mean_acts:
        ``(d_mlp,)`` the mean activation n̄ each neuron is ablated to (eq. 2).
    norm, w_u, b_u:
        Final norm, unembedding ``(vocab, d_model)`` and its bias (or ``None``).
    post_norm:
        The final block's post-MLP norm (``None``: the MLP output joins the residual directly).
        The MLP output is then ``acts @ w_out`` (an output projection without bias).
    softcap:
        ``c`` of the final-logit soft-capping ``z -> c tanh(z / c)``, or ``None``.
    """

    resid: torch.Tensor
    acts: torch.Tensor
    targets: torch.Tensor
    w_out: torch.Tensor
    mean_acts: torch.Tensor
    norm: NormSpec
    w_u: torch.Tensor
    b_u: torch.Tensor | None
    post_norm: NormSpec | None = None
    softcap: float | None = None

    @property
    def is_affine(self) -> bool:
        """Whether the logit change is ``A h + B u_i`` (no post-MLP norm, no soft-capping):
        the case of :mod:`.scales`, :mod:`.fast` and :mod:`.exact`'s own closed forms."""
        return self.post_norm is None and self.softcap is None

    @property
    def n_positions(self) -> int:
        return int(self.resid.shape[0])

    @property
    def n_neurons(self) -> int:
        return int(self.w_out.shape[0])

    def validate(self) -> None:
        """Check shapes and finiteness; raise a one-line error on bad input."""
        n_pos, d_model = self.resid.shape
        if n_pos == 0:
            raise InsufficientDataError("no positions to score: the context sample is empty")
        if self.acts.shape != (n_pos, self.n_neurons):
            raise ValueError(
                f"acts has shape {tuple(self.acts.shape)}, expected {(n_pos, self.n_neurons)}"
            )
        if self.w_out.shape[1] != d_model or self.w_u.shape[1] != d_model:
            raise ValueError("w_out / w_u do not match the residual width")
        if self.targets.shape != (n_pos,):
            raise ValueError("targets must have one id per position")
        for name in ("resid", "acts", "mean_acts"):
            t = getattr(self, name)
            if not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).sum())
                raise NumericalError(f"{bad} NaN/inf values in the captured {name}")
        if self.post_norm is not None and tuple(self.post_norm.weight.shape) != (d_model,):
            raise UnsupportedArchitectureError(
                f"the post-MLP norm has weight shape {tuple(self.post_norm.weight.shape)}, "
                f"expected (d_model,) = ({d_model},)"
            )
        if self.softcap is not None and not (math.isfinite(self.softcap) and self.softcap > 0):
            raise ConfigError(f"softcap must be a positive number, got {self.softcap}")

    def to(self, device: torch.device | str, dtype: torch.dtype) -> AblationInputs:
        def cv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device=device, dtype=dtype)

        def norm_to(n: NormSpec) -> NormSpec:
            return dataclasses.replace(
                n, weight=n.weight.to(device=device, dtype=dtype), bias=cv(n.bias)
            )

        return AblationInputs(
            resid=self.resid.to(device=device, dtype=dtype),
            acts=self.acts.to(device=device, dtype=dtype),
            targets=self.targets.to(device=device),
            w_out=self.w_out.to(device=device, dtype=dtype),
            mean_acts=self.mean_acts.to(device=device, dtype=dtype),
            norm=norm_to(self.norm),
            w_u=self.w_u.to(device=device, dtype=dtype),
            b_u=cv(self.b_u),
            post_norm=None if self.post_norm is None else norm_to(self.post_norm),
            softcap=self.softcap,
        )


def inputs_from_adapter(
    adapter: ModelAdapter,
    resid: torch.Tensor,
    acts: torch.Tensor,
    targets: torch.Tensor,
    mean_acts: torch.Tensor,
) -> AblationInputs:
    """Assemble :class:`AblationInputs` from captured arrays and the adapter's named pieces
    (with the final block's post-MLP norm and the logit soft-capping, where the family has them).

    Raises
    ------
    UnsupportedArchitectureError
        A post-MLP norm after an output projection with a bias (no supported family has one).
    """
    w_u, b_u = adapter.unembedding()
    post_norm = adapter.post_mlp_norm(-1)
    if post_norm is not None and getattr(adapter.mlp_out_proj(-1), "bias", None) is not None:
        raise UnsupportedArchitectureError(
            f"{adapter.family}: the final MLP output projection has a bias before its post-MLP "
            "norm, which the ablation does not model"
        )
    return AblationInputs(
        resid=resid,
        acts=acts,
        targets=targets.long(),
        w_out=adapter.w_out(-1).detach(),
        mean_acts=mean_acts,
        norm=adapter.final_norm(),
        w_u=w_u.detach(),
        b_u=None if b_u is None else b_u.detach(),
        post_norm=post_norm,
        softcap=adapter.logit_softcap,
    )


def centered(x: torch.Tensor, norm: NormSpec) -> torch.Tensor:
    """LayerNorm subtracts the mean over features; RMSNorm does not."""
    if norm.kind == "layernorm":
        return x - x.mean(dim=-1, keepdim=True)
    return x


def apply_norm(x: torch.Tensor, norm: NormSpec) -> torch.Tensor:
    """The final norm, written out (used by the naive method and the parity tests)."""
    xc = centered(x, norm)
    scale = torch.rsqrt(xc.pow(2).mean(dim=-1, keepdim=True) + norm.eps)
    y = xc * scale * norm.weight
    if norm.bias is not None:
        y = y + norm.bias
    return y


def raw_logits(x: torch.Tensor, inputs: AblationInputs) -> torch.Tensor:
    """Logits before any soft-capping from final residuals ``x``: unembed(norm(x))."""
    z = apply_norm(x, inputs.norm) @ inputs.w_u.T
    if inputs.b_u is not None:
        z = z + inputs.b_u
    return z


def soft_cap(z: torch.Tensor, cap: float | None) -> torch.Tensor:
    """``cap * tanh(z / cap)`` (``z`` itself when ``cap`` is ``None``), as transformers does."""
    return z if cap is None else torch.tanh(z / cap) * cap


def logits_of(x: torch.Tensor, inputs: AblationInputs) -> torch.Tensor:
    """The model's logits from final residuals ``x``: soft_cap(unembed(norm(x)))."""
    return soft_cap(raw_logits(x, inputs), inputs.softcap)
