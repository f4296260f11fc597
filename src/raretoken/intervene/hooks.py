"""Hooks that change a final-layer neuron group, and the pass that measures their effect.

* :func:`scale_group` sets the group's activations to ``f · a_i`` (or to values, e.g. the
  mean n̄_i: mean ablation) at the input of the MLP output projection.
* :func:`scale_group_null` is the null-space variant: it adds
  ``(f − 1) · a_i · P_null w_i`` to the MLP output, i.e. it scales only the component of each
  neuron's output weight ``w_i`` that lies in the unembedding's near-null space
  (:func:`null_space_projector`). With ``P_null = I`` it equals :func:`scale_group`; with
  ``P_null = 0`` it changes nothing.

Two definitions of the near-null space (``P_null`` is the orthogonal projector onto it):

* ``"spectrum"`` (:func:`null_space_projector`; Stolfo et al. 2024, "Confidence regulation
  neurons in language models", §unembedding null space): with the final norm's gain ``γ``
  folded into the unembedding, ``W = W_U diag(γ)`` (``vocab × d_model``), SVD ``W = U S Vᵀ``:
  the span of the right singular vectors of the ``k = round(fraction · d_model)`` smallest
  singular values. Directions there barely move any logit directly.
* ``"frequent"`` (:func:`frequent_null_projector`; the rare-token authors' code,
  ``Jing-L97/target_neuron_ablation``, ``src/neuron_analyzer/ablation/intervention.py``,
  ``_compute_token_null_space``): the rows of ``W_U`` (no norm folded, as there) of the
  ``int(top_fraction · vocab)`` most frequent tokens, SVD, the fewest leading right singular
  vectors explaining ``variance`` (0.95) of their squared singular values span the frequent
  tokens' space; the null space is its orthogonal complement. Directions there barely move
  the frequent tokens' logits.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data.sampling import ContextSample
from ..errors import ConfigError
from ..models.adapters import ModelAdapter
from ..models.hooks import replace_input

__all__ = [
    "frequent_null_projector",
    "null_space_projector",
    "scale_group",
    "scale_group_null",
    "scored_metrics",
]


@contextmanager
def scale_group(
    adapter: ModelAdapter,
    ids: np.ndarray,
    factor: float | None = None,
    *,
    values: np.ndarray | None = None,
) -> Iterator[None]:
    """Within the block, final-layer neurons ``ids`` output ``factor · a_i`` (or ``values[i]``).

    Exactly one of ``factor`` and ``values`` (one value per listed neuron, e.g. n̄[ids]).
    """
    if (factor is None) == (values is None):
        raise ConfigError("give exactly one of factor and values")
    idx = torch.as_tensor(np.asarray(ids, dtype=np.int64))

    def fn(x: torch.Tensor) -> torch.Tensor:
        y = x.clone()
        if values is not None:
            v = torch.as_tensor(np.asarray(values), dtype=x.dtype, device=x.device)
            y[..., idx] = v.expand_as(y[..., idx])
        else:
            y[..., idx] = x[..., idx] * float(factor)  # type: ignore[arg-type]
        return y

    with replace_input(adapter.mlp_out_proj(-1), fn):
        yield


def null_space_projector(adapter: ModelAdapter, fraction: float) -> torch.Tensor:
    """``(d_model, d_model)`` float64 projector onto the near-null space (module docstring).

    ``fraction`` in ``[0, 1]``: 0 → the zero matrix, 1 → the identity.
    """
    if not (np.isfinite(fraction) and 0.0 <= fraction <= 1.0):
        raise ConfigError(f"null-space fraction must be in [0, 1], got {fraction}")
    w_u = adapter.unembedding()[0].double()
    gamma = getattr(adapter.final_norm(), "weight", None)
    if gamma is not None:
        w_u = w_u * gamma.detach().double()[None, :]
    d = int(w_u.shape[1])
    k = round(fraction * d)
    _, _, vh = torch.linalg.svd(w_u, full_matrices=True)  # singular values descending
    v = vh[d - k :].T if k else vh[:0].T
    return v @ v.T


def frequent_null_projector(
    adapter: ModelAdapter, counts: np.ndarray, top_fraction: float = 0.05, variance: float = 0.95
) -> torch.Tensor:
    """``(d_model, d_model)`` projector onto the complement of the frequent tokens' space
    (module docstring, ``"frequent"``; ``counts``: the run's unigram counts per token id)."""
    w_u = adapter.unembedding()[0].double()
    c = np.zeros(int(w_u.shape[0]))
    n = min(c.size, np.asarray(counts).size)
    c[:n] = np.asarray(counts, dtype=np.float64)[:n]
    top = max(1, int(c.size * top_fraction))
    rows = np.argsort(-c, kind="stable")[:top]
    _, s, vh = torch.linalg.svd(w_u[torch.from_numpy(rows)], full_matrices=True)
    cum = torch.cumsum(s**2, 0) / torch.sum(s**2)
    k = int(torch.searchsorted(cum, torch.tensor(variance, dtype=cum.dtype)).item()) + 1
    v = vh[min(k, vh.shape[0]) :].T
    return v @ v.T


@contextmanager
def scale_group_null(
    adapter: ModelAdapter, ids: np.ndarray, factor: float, projector: torch.Tensor
) -> Iterator[None]:
    """Add ``(factor − 1) · a_i · P_null w_i`` (summed over the group) to the final MLP output."""
    proj = adapter.mlp_out_proj(-1)
    idx = torch.as_tensor(np.asarray(ids, dtype=np.int64))
    w = adapter.w_out(-1).detach()[idx].double()  # (k, d_model)
    w_null = w @ projector.double()  # rows P w_i (P symmetric)
    seen: list[torch.Tensor] = []

    def pre(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen.append(args[0] if args else kwargs["hidden_states"])

    def post(_m: nn.Module, _args: Any, out: torch.Tensor) -> torch.Tensor:
        a = seen.pop()[..., idx]
        add = (float(factor) - 1.0) * (a.double() @ w_null.to(a.device))
        return out + add.to(out.dtype)

    h1 = proj.register_forward_pre_hook(pre, with_kwargs=True)
    h2 = proj.register_forward_hook(post)
    try:
        yield
    finally:
        h1.remove()
        h2.remove()


def scored_metrics(
    adapter: ModelAdapter,
    sample: ContextSample,
    rare_token_ids: np.ndarray,
    *,
    batch_size: int = 4,
    device: str = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """Loss and probability mass on the rare tokens at every scored position (float64).

    Rows follow ``sample.target_mask`` row-major, like the run's captured arrays; the model
    runs under whatever hooks are active.
    """
    mask_np = np.asarray(sample.target_mask, dtype=bool)
    rare = torch.as_tensor(np.asarray(rare_token_ids, dtype=np.int64))
    losses, masses = [], []
    for start in range(0, sample.n_windows, batch_size):
        stop = min(sample.n_windows, start + batch_size)
        ids = torch.from_numpy(sample.input_ids[start:stop]).to(device)
        m = torch.from_numpy(mask_np[start:stop]).to(ids.device)
        with torch.no_grad():
            hidden = adapter.hidden_states(ids)
            z = adapter.lm_logits(hidden[:, :-1][m]).double()
        tgt = ids[:, 1:][m]
        lse = torch.logsumexp(z, -1)
        losses.append((lse - z.gather(1, tgt[:, None]).squeeze(1)).cpu().numpy())
        logp = z - lse[:, None]
        masses.append(torch.exp(logp[:, rare.to(z.device)]).sum(-1).cpu().numpy())
    return np.concatenate(losses), np.concatenate(masses)
