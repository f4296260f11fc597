"""The arrays an all-neuron mean ablation of the final MLP layer needs.

The final MLP writes straight into the residual stream, so ablating neuron ``i`` of the final
layer to its mean (eq. 2) changes the final residual ``x`` at every position by
``(n̄_i - n_i) w_i`` and nothing upstream. The loss after ablation therefore needs only the final
norm and the unembedding: :class:`AblationInputs` holds exactly those pieces.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InsufficientDataError, NumericalError
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
    """

    resid: torch.Tensor
    acts: torch.Tensor
    targets: torch.Tensor
    w_out: torch.Tensor
    mean_acts: torch.Tensor
    norm: NormSpec
    w_u: torch.Tensor
    b_u: torch.Tensor | None

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

    def to(self, device: torch.device | str, dtype: torch.dtype) -> AblationInputs:
        def cv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device=device, dtype=dtype)

        norm = NormSpec(
            kind=self.norm.kind,
            weight=self.norm.weight.to(device=device, dtype=dtype),
            bias=cv(self.norm.bias),
            eps=self.norm.eps,
        )
        b_u = cv(self.b_u)
        return AblationInputs(
            resid=self.resid.to(device=device, dtype=dtype),
            acts=self.acts.to(device=device, dtype=dtype),
            targets=self.targets.to(device=device),
            w_out=self.w_out.to(device=device, dtype=dtype),
            mean_acts=self.mean_acts.to(device=device, dtype=dtype),
            norm=norm,
            w_u=self.w_u.to(device=device, dtype=dtype),
            b_u=b_u,
        )


def inputs_from_adapter(
    adapter: ModelAdapter,
    resid: torch.Tensor,
    acts: torch.Tensor,
    targets: torch.Tensor,
    mean_acts: torch.Tensor,
) -> AblationInputs:
    """Assemble :class:`AblationInputs` from captured arrays and the adapter's named pieces."""
    w_u, b_u = adapter.unembedding()
    return AblationInputs(
        resid=resid,
        acts=acts,
        targets=targets.long(),
        w_out=adapter.w_out(-1).detach(),
        mean_acts=mean_acts,
        norm=adapter.final_norm(),
        w_u=w_u.detach(),
        b_u=None if b_u is None else b_u.detach(),
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


def logits_of(x: torch.Tensor, inputs: AblationInputs) -> torch.Tensor:
    """Logits from final residuals ``x``: unembed(norm(x))."""
    z = apply_norm(x, inputs.norm) @ inputs.w_u.T
    if inputs.b_u is not None:
        z = z + inputs.b_u
    return z
