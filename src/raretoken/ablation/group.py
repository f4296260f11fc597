"""Joint mean ablation of groups of final-layer neurons, in closed form.

Ablating a set ``G`` of final-layer neurons to their means adds
``Δx = Σ_{i∈G} δ_i w_i`` (``δ_i = n̄_i - n_i``) to the final residual ``x`` at every position
and changes nothing upstream, so the loss after the ablation needs only the final norm and the
unembedding. With the notation of :mod:`.scales` (``x'``, ``w'`` centred for LayerNorm,
``s`` the norm's scale, ``u_i = W_U (γ ⊙ w'_i)``, ``h = z - c``), exactly,

    z̃ = z + A h + Σ_{i∈G} B_i u_i,   A = s̃/s - 1,   B_i = s̃ δ_i,

where ``s̃`` is the scale after the ablation: ``s̃/s = (1 + r)^(-1/2)`` with
``r = (2 x'·Δx' + |Δx'|²) / (|x'|² + d ε)``. The signed loss change is
``log Σ_v p_v e^{Δz_v} - Δz_y`` (one log-sum-exp over the vocabulary per pair).

Cost per (group, position) pair: about ``vocab × (|G| + 3)`` multiply-adds and ``vocab``
exponentials, against ``vocab × d_model`` for recomputing the norm and the unembedding on the
ablated residual (:func:`delta_loss_group_recompute`, the reference). The base logits and the
logit directions of the neurons in use are computed once per chunk of positions / groups.

Families with a post-MLP norm (Gemma 2/3, OLMo 2) or soft-capped logits (Gemma 2): the same
joint ablation, exact, by :func:`raretoken.ablation.postnorm_group.delta_loss_group_general`
(``δ = Σ δ_i w_i`` enters the post-MLP norm's scale through the same quadratic), to which both
functions here dispatch.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import ConfigError, InsufficientDataError
from .inputs import AblationInputs, centered, inputs_from_adapter, logits_of
from .postnorm_group import delta_loss_group_general, delta_loss_group_recompute_general
from .scales import logit_offset

if TYPE_CHECKING:
    from ..models.adapters import ModelAdapter

log = logging.getLogger(__name__)

__all__ = [
    "RowSource",
    "check_groups",
    "delta_loss_group",
    "delta_loss_group_recompute",
    "row_inputs",
    "select_rows",
]

#: exp(x) of float32 ``x`` below this cannot overflow, even summed over a vocabulary.
_SAFE_EXP = 60.0

#: A function ``rows -> AblationInputs`` of those rows (see :func:`row_inputs`).
RowSource = Callable[[np.ndarray], AblationInputs]
GroupsLike = Sequence[np.ndarray] | Sequence[Sequence[int]] | np.ndarray


def check_groups(groups: GroupsLike, n_neurons: int) -> list[np.ndarray]:
    """Validate neuron groups and return them as ``int64`` arrays (order kept).

    Raises
    ------
    InsufficientDataError
        No group, or an empty group.
    ConfigError
        Non-integer ids, a repeated id within a group, ids outside ``[0, n_neurons)``, or a
        group larger than the layer.
    """
    if isinstance(groups, np.ndarray):
        if groups.ndim != 2:
            raise ConfigError(f"groups must be a 2-D (n_groups, k) array, got {groups.ndim}-D")
        rows: list[np.ndarray] = list(groups)
    else:
        rows = [np.asarray(g) for g in groups]
    if not rows:
        raise InsufficientDataError("no neuron group to ablate")
    out = []
    for j, g in enumerate(rows):
        ids = np.asarray(g)
        if ids.ndim != 1:
            raise ConfigError(f"group {j} must be a 1-D array of neuron ids")
        if ids.size == 0:
            raise InsufficientDataError(f"group {j} is empty")
        if not np.issubdtype(ids.dtype, np.integer):
            raise ConfigError(f"group {j} must hold integer neuron ids, got dtype {ids.dtype}")
        if ids.size > n_neurons:
            raise ConfigError(
                f"group {j} has {ids.size} neurons but the layer has only {n_neurons}"
            )
        if np.unique(ids).size != ids.size:
            raise ConfigError(f"group {j} repeats a neuron id")
        if ids.min() < 0 or ids.max() >= n_neurons:
            raise ConfigError(
                f"group {j}: neuron ids must lie in [0, {n_neurons}), got {ids.min()}..{ids.max()}"
            )
        out.append(ids.astype(np.int64))
    return out


def _padded(groups: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(n_groups, k_max)`` ids (padding: the group's first id) and a validity mask."""
    k = max(g.size for g in groups)
    ids = np.empty((len(groups), k), dtype=np.int64)
    mask = np.zeros((len(groups), k), dtype=bool)
    for j, g in enumerate(groups):
        ids[j, : g.size] = g
        ids[j, g.size :] = g[0]
        mask[j, : g.size] = True
    return torch.from_numpy(ids), torch.from_numpy(mask)


def delta_loss_group(
    inputs: AblationInputs,
    groups: GroupsLike,
    *,
    chunk_positions: int = 16,
    chunk_elements: int = 1 << 21,
    neuron_budget_bytes: int = 512 << 20,
) -> torch.Tensor:
    """Signed ``L̃ - L`` of ablating each group's neurons jointly to their means.

    Parameters
    ----------
    inputs:
        Captured arrays and model pieces; products run in ``inputs``' dtype and device,
        the norm's rescaling ``A`` and the weights ``B`` in float64.
    groups:
        ``(n_groups, k)`` integer array, or a sequence of 1-D id arrays (sizes may differ).
    chunk_positions:
        Positions per step.
    chunk_elements:
        Largest ``groups × positions × vocab`` block of logit changes held at once.
    neuron_budget_bytes:
        Memory for the logit directions ``u_i`` of the neurons of one block of groups
        (``vocab`` numbers per neuron); groups are processed in blocks that fit.

    Returns
    -------
    ``(n_positions, n_groups)`` float64 tensor on CPU.
    """
    inputs.validate()
    if chunk_positions < 1 or chunk_elements < 1:
        raise ConfigError("chunk_positions and chunk_elements must be >= 1")
    grp = check_groups(groups, inputs.n_neurons)
    ids_all, mask_all = _padded(grp)
    if not inputs.is_affine:  # post-MLP norm / soft-capped logits: exact, see .postnorm_group
        return delta_loss_group_general(
            inputs, ids_all, mask_all, chunk_positions=chunk_positions,
            chunk_elements=chunk_elements, neuron_budget_bytes=neuron_budget_bytes,
        )  # fmt: skip
    n_groups, k = ids_all.shape
    vocab = int(inputs.w_u.shape[0])
    out = torch.empty(inputs.n_positions, n_groups, dtype=torch.float64)
    per_group = k * vocab * inputs.w_u.element_size()
    block_groups = max(1, neuron_budget_bytes // max(1, per_group))
    for g0 in range(0, n_groups, block_groups):
        gsl = slice(g0, min(n_groups, g0 + block_groups))
        block = _GroupBlock.build(inputs, ids_all[gsl], mask_all[gsl])
        for start in range(0, inputs.n_positions, chunk_positions):
            sl = slice(start, min(inputs.n_positions, start + chunk_positions))
            step = max(1, chunk_elements // max(1, (sl.stop - sl.start) * vocab))
            out[sl, gsl] = _chunk(inputs, block, sl, step)
    log.debug("joint ablation of %d groups at %d positions", n_groups, inputs.n_positions)
    return out


@dataclass(frozen=True)
class _GroupBlock:
    """The per-group pieces of a block of ``G`` groups padded to ``k`` neurons."""

    ids: torch.Tensor  # (G, k) neuron ids
    mask: torch.Tensor  # (G, k) float64: 1 for a member, 0 for padding
    w64: torch.Tensor  # (G, k, d) centred output weights w', float64
    gram: torch.Tensor  # (G, k, k) w'_i · w'_j, float64
    u: torch.Tensor  # (G, k + 1, V) logit directions u_i and, last, the offset c
    u_abs: torch.Tensor  # (G, k) max_v |u_iv|, float64

    @classmethod
    def build(cls, inputs: AblationInputs, ids: torch.Tensor, mask: torch.Tensor) -> _GroupBlock:
        dev = inputs.w_u.device
        ids = ids.to(dev)
        g, k = ids.shape
        wp = centered(inputs.w_out, inputs.norm)[ids]  # (G, k, d)
        w64 = wp.double()
        u = ((wp * inputs.norm.weight).reshape(g * k, -1) @ inputs.w_u.T).reshape(g, k, -1)
        c = logit_offset(inputs)
        u_ext = torch.cat([u, c.expand(g, 1, -1)], dim=1)
        return cls(
            ids=ids,
            mask=mask.to(dev, torch.float64),
            w64=w64,
            gram=w64 @ w64.transpose(1, 2),
            u=u_ext,
            u_abs=torch.maximum(u.amax(-1), -u.amin(-1)).double(),
        )


def _chunk(
    inputs: AblationInputs, blk: _GroupBlock, sl: slice, groups_per_step: int
) -> torch.Tensor:
    """``(P, G)`` Δloss of the block's groups at the positions ``sl``."""
    x = inputs.resid[sl]
    tgt = inputs.targets[sl]
    z = logits_of(x, inputs)
    h = z - logit_offset(inputs)
    dt = z.dtype
    n_g, k = blk.ids.shape
    # A and B of every (position, group) in float64 (see the module docstring)
    x64 = centered(x.double(), inputs.norm)
    d = x64.shape[-1]
    q = x64.pow(2).sum(-1) + d * inputs.norm.eps  # (P,)
    xw = (x64 @ blk.w64.reshape(n_g * k, d).T).reshape(-1, n_g, k)  # x'·w'_i, (P, G, k)
    delta = inputs.mean_acts.double()[blk.ids][None] - inputs.acts[sl].double()[:, blk.ids]
    delta = delta * blk.mask[None]  # δ_i, zero on padding, (P, G, k)
    quad = torch.einsum("pgk,gkl,pgl->pg", delta, blk.gram, delta)  # |Δx'|²
    r = (2.0 * (delta * xw).sum(-1) + quad) / q[:, None]
    a = torch.expm1(-0.5 * torch.log1p(r)).T  # s̃/s - 1, (G, P)
    s = torch.rsqrt(q / d)
    b = ((a + 1.0) * s[None])[..., None] * delta.permute(1, 0, 2)  # s̃ δ_i, (G, P, k)
    # Δz at the target, from the targets' columns only, in float64
    u_y = blk.u[:, :k, tgt].double()  # (G, k, P)
    h_y = h.gather(1, tgt[:, None]).squeeze(1).double()
    dz_y = (b * u_y.transpose(1, 2)).sum(-1) + a * h_y[None]  # (G, P)
    # log p + Δz = (1 + A) (z - m) + Σ_i B_i u_i - A c + shift, with m = max z and
    # shift = (1 + A) m - logsumexp(z): the first three terms are one batched product (c is
    # the extra row of u) plus one pass over (z - m).
    z64 = z.double()
    m = z64.amax(-1)
    shift = (1.0 + a) * m[None] - torch.logsumexp(z64, -1)[None]  # (G, P)
    zs = (z - m.to(dt)[:, None])[None]
    coef = torch.cat([b, -a[..., None]], dim=-1).to(dt)  # (G, P, k + 1)
    # max_v (log p + Δz) lies in [-log V - |Δz|max, |Δz|max]; exp without a max pass is safe
    # when the shifted range stays inside ±_SAFE_EXP
    h_abs = torch.maximum(h.amax(-1), -h.amin(-1)).double()
    bound = a.abs() * h_abs[None] + (b.abs() * blk.u_abs[:, None, :]).sum(-1)  # >= max |Δz|
    hi, lo = bound - shift, -math.log(z.shape[-1]) - bound - shift
    safe = (hi < _SAFE_EXP) & (lo > -_SAFE_EXP)
    lse = torch.empty_like(dz_y)
    scale = (1.0 + a).to(dt)
    for j0 in range(0, n_g, groups_per_step):
        js = slice(j0, min(n_g, j0 + groups_per_step))
        lx = torch.bmm(coef[js], blk.u[js])  # (G', P, V)
        lx.addcmul_(scale[js, :, None], zs)
        if bool(safe[js].all()):
            lse[js] = lx.exp_().sum(-1).log_().double()
        else:
            lse[js] = torch.logsumexp(lx, dim=-1).double()
    lse += shift
    return (lse - dz_y).T.cpu()


def delta_loss_group_recompute(
    inputs: AblationInputs, groups: GroupsLike, *, chunk_positions: int = 256
) -> torch.Tensor:
    """Reference: the same ``(n_positions, n_groups)`` Δloss by recomputing the final norm and
    the unembedding on the ablated residual ``x + Σ δ_i w_i`` (one logits computation per
    group and position)."""
    inputs.validate()
    grp = check_groups(groups, inputs.n_neurons)
    if not inputs.is_affine:
        return delta_loss_group_recompute_general(inputs, grp, chunk_positions=chunk_positions)
    out = torch.empty(inputs.n_positions, len(grp), dtype=torch.float64)
    for start in range(0, inputs.n_positions, chunk_positions):
        sl = slice(start, min(inputs.n_positions, start + chunk_positions))
        x = inputs.resid[sl]
        tgt = inputs.targets[sl][:, None]
        z = logits_of(x, inputs)
        base = torch.logsumexp(z, -1) - z.gather(1, tgt).squeeze(1)
        for j, g in enumerate(grp):
            ids = torch.from_numpy(g).to(inputs.acts.device)
            delta = inputs.mean_acts[ids][None, :] - inputs.acts[sl][:, ids]
            za = logits_of(x + delta @ inputs.w_out[ids], inputs)
            ablated = torch.logsumexp(za, -1) - za.gather(1, tgt).squeeze(1)
            out[sl, j] = (ablated - base).double().cpu()
    return out


def row_inputs(
    adapter: ModelAdapter,
    resid: np.ndarray,
    acts: np.ndarray,
    targets: np.ndarray,
    mean_acts: np.ndarray,
    *,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> RowSource:
    """A function ``rows -> AblationInputs`` of those rows only (memory maps are read only at
    the rows asked for), with the adapter's final norm, unembedding and output weights."""
    empty = torch.zeros((0, 1))
    mean_t = torch.from_numpy(np.asarray(mean_acts, dtype=np.float64))
    pieces = inputs_from_adapter(adapter, empty, empty, empty.long()[:, 0], mean_t)
    pieces = pieces.to(device, dtype)

    def rows_of(rows: np.ndarray) -> AblationInputs:
        def take(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.array(a[rows]))

        return dataclasses.replace(
            pieces,
            resid=take(resid).to(device=device, dtype=dtype),
            acts=take(acts).to(device=device, dtype=dtype),
            targets=take(targets).long().to(device),
        )

    return rows_of


def select_rows(inputs: AblationInputs | RowSource, rows: np.ndarray) -> AblationInputs:
    """The inputs of ``rows`` only, from full inputs or from a :func:`row_inputs` source."""
    if isinstance(inputs, AblationInputs):
        t = torch.from_numpy(rows).to(inputs.resid.device)
        return dataclasses.replace(
            inputs, resid=inputs.resid[t], acts=inputs.acts[t], targets=inputs.targets[t]
        )
    return inputs(rows)
