"""Model re-runs behind the attention-routing analysis (paper §3.2, §4.4): attention
patterns and head ablations of the two blocks that feed an MLP layer.

The blocks are re-run from the residual stream entering block ``start_layer`` (default: the
one before the target layer; for the final MLP, block ``L-2``, captured during identification
as ``ident.block_input``) with :func:`raretoken.models.tail.run_from_layer`.

* :func:`attention_gini` → :class:`HeadGini`: the Gini coefficient (eq. 7) of every head's
  attention row at every scored query position.
* :func:`head_ablation` → :class:`HeadAblation`: the group's activations in the target MLP
  layer with each single head, and each whole layer's heads, zeroed (eq. 8 follows from its
  norms).
* :class:`RoutingContext`: the model pieces and captured inputs, shared by every group and
  robustness row so the patterns are computed once.

Target layer: by default the final MLP layer (the paper's analysis). With ``target_layer=T``
(per-layer analyses, :mod:`raretoken.run.layers_analyses`) the heads of blocks
``start_layer .. T`` (default ``max(0, T - 1) .. T``) are analysed and the group's activations
are read at MLP layer ``T``. Each re-run stops as soon as it has what it needs (the output of
block ``T`` for the Gini, the input of MLP ``T``'s output projection for the ablations): the
blocks after ``T`` cannot change either, and skipping them makes a re-run for an early layer
cost two blocks instead of the whole tail.

The statistics on these arrays are in :mod:`raretoken.analyses.routing`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from raretoken._rng import as_generator
from raretoken.errors import ConfigError, InsufficientDataError, NumericalError
from raretoken.models.adapters import ModelAdapter
from raretoken.models.hooks import (
    ablate_heads,
    attention_patterns,
    attention_visibility,
    capture_input,
)
from raretoken.models.tail import run_from_layer
from raretoken.stats.regime_bootstrap import window_of_rows
from raretoken.stats.routing import (
    GiniVariant,
    gini,
)

from ._tables import frozen
from .groups import check_group

if TYPE_CHECKING:
    from raretoken.run.identification import Identification

logger = logging.getLogger(__name__)

ALL_HEADS = -1

__all__ = [
    "ALL_HEADS",
    "HeadAblation",
    "HeadGini",
    "RoutingContext",
    "attention_gini",
    "head_ablation",
    "rows_within",
]


# ---------------------------------------------------------------------------------------------
# Running the tail of the model
# ---------------------------------------------------------------------------------------------


def _span(
    adapter: ModelAdapter, start_layer: int | None, target_layer: int | None
) -> tuple[int, int]:
    """``(start, target)``: the first re-run block (default ``max(0, target - 1)``) and the MLP
    layer read (default the final one), normalised; ``start > target`` is refused."""
    target = adapter.layer_index(-1 if target_layer is None else target_layer)
    start = max(0, target - 1) if start_layer is None else adapter.layer_index(start_layer)
    if start > target:
        raise ConfigError(
            f"start_layer {start} is after the target layer {target}: the re-run blocks must "
            "feed the target MLP"
        )
    return start, target


class _StopForward(Exception):
    """Raised by :func:`_stop_at` to end a re-run once what it needs has been recorded."""


def _raise_stop(*_args: object) -> None:
    raise _StopForward


@contextlib.contextmanager
def _stop_at(module: torch.nn.Module, *, before: bool) -> Iterator[None]:
    """End any forward pass when ``module`` is reached (``before``: a pre-hook, registered after
    the caller's own hooks so they run first; else after it ran)."""
    handle = (
        module.register_forward_pre_hook(_raise_stop)
        if before
        else module.register_forward_hook(_raise_stop)
    )
    try:
        yield
    finally:
        handle.remove()


def _rerun(adapter: ModelAdapter, hidden: torch.Tensor, start: int) -> None:
    """:func:`run_from_layer` that treats the stop of :func:`_stop_at` as the normal end."""
    try:
        run_from_layer(adapter, hidden, start)
    except _StopForward:
        pass


def _check_inputs(
    adapter: ModelAdapter, block_input: np.ndarray | None, target_mask: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    if block_input is None:
        raise InsufficientDataError(
            "no residual stream of the last blocks was captured (block_input is None); "
            "rerun identification to capture it"
        )
    bi = np.asarray(block_input)
    mask = np.asarray(target_mask, dtype=bool)
    d_model = adapter.dims.d_model
    if bi.ndim != 3 or bi.shape[2] != d_model:
        raise ConfigError(f"block_input must be (n_windows, seq_len, {d_model}), got {bi.shape}")
    if mask.shape != (bi.shape[0], bi.shape[1] - 1):
        raise ConfigError(
            f"target_mask has shape {mask.shape}, expected {(bi.shape[0], bi.shape[1] - 1)} "
            "for this block_input"
        )
    if not mask.any():
        raise InsufficientDataError("target_mask marks no scored position")
    return bi, mask


def _param(adapter: ModelAdapter) -> torch.Tensor:
    return next(adapter.model.parameters())


def _batches(n: int, size: int) -> list[tuple[int, int]]:
    if size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {size}")
    return [(s, min(n, s + size)) for s in range(0, n, size)]


def _group_acts(
    adapter: ModelAdapter,
    block_input: np.ndarray,
    mask: np.ndarray,
    start: int,
    group: np.ndarray,
    *,
    batch_size: int,
    ablate: tuple[int, list[int]] | None,
    target: int,
) -> np.ndarray:
    """``(n_scored, |G|)`` float64 activations of ``group`` in MLP layer ``target`` after
    re-running blocks ``start .. target``."""
    p = _param(adapter)
    proj = adapter.mlp_out_proj(target)
    cols = torch.as_tensor(group, dtype=torch.long, device=p.device)
    out: list[np.ndarray] = []
    for b0, b1 in _batches(block_input.shape[0], batch_size):
        h = torch.from_numpy(np.array(block_input[b0:b1])).to(device=p.device, dtype=p.dtype)
        m = torch.as_tensor(mask[b0:b1], device=p.device)
        with contextlib.ExitStack() as stack:
            got = stack.enter_context(capture_input(proj))
            if ablate is not None:
                stack.enter_context(ablate_heads(adapter, ablate[0], ablate[1]))
            stack.enter_context(_stop_at(proj, before=True))
            with torch.no_grad():
                _rerun(adapter, h, start)
        acts = got[-1][:, :-1][m].index_select(-1, cols)
        out.append(acts.double().cpu().numpy())
    return np.concatenate(out)


# ---------------------------------------------------------------------------------------------
# Attention Gini per head and position
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class HeadGini:
    """Attention Gini of every head of the re-run blocks at every scored position.

    Attributes
    ----------
    heads:
        ``(n_heads_total, 2)`` ``(layer, head)`` (non-negative layer index), axis 0 of
        :attr:`gini`.
    gini:
        ``(n_heads_total, n_scored)`` Gini of the attention row of each scored query position
        (axis 1: rows of ``ident.acts``); NaN where undefined (fewer than 2 visible keys).
    variant:
        Gini variant (see :func:`raretoken.stats.routing.gini`).
    """

    heads: np.ndarray
    gini: np.ndarray
    variant: str

    @property
    def n_positions(self) -> int:
        return int(self.gini.shape[1])


def attention_gini(
    adapter: ModelAdapter,
    block_input: np.ndarray,
    target_mask: np.ndarray,
    *,
    start_layer: int | None = None,
    batch_size: int = 4,
    variant: GiniVariant = "standard",
    target_layer: int | None = None,
) -> HeadGini:
    """Gini of each head's attention row at each scored position (see module docstring).

    Parameters
    ----------
    adapter:
        Adapter of the model (eval mode).
    block_input:
        ``(n_windows, seq_len, d_model)`` residual stream entering block ``start_layer``.
    target_mask:
        ``(n_windows, seq_len - 1)`` scored positions (``ContextSample.target_mask``); the
        query of scored position ``(w, j)`` is input position ``j`` of window ``w``.
    start_layer:
        First re-run block (default ``max(0, target_layer - 1)``); every re-run block up to
        ``target_layer`` is analysed.
    batch_size:
        Windows per forward pass.
    variant:
        Gini variant.
    target_layer:
        The MLP layer the heads feed (default the final one); the re-run stops after its block.
    """
    bi, mask = _check_inputs(adapter, block_input, target_mask)
    start, target = _span(adapter, start_layer, target_layer)
    layers = list(range(start, target + 1))
    n_heads = adapter.dims.n_heads
    p = _param(adapter)
    seq = bi.shape[1]
    parts: dict[int, list[np.ndarray]] = {layer: [] for layer in layers}
    for b0, b1 in _batches(bi.shape[0], batch_size):
        h = torch.from_numpy(np.array(bi[b0:b1])).to(device=p.device, dtype=p.dtype)  # memmap rows
        with (
            attention_patterns(adapter, layers) as pats,
            attention_visibility(adapter, layers) as visible,
            _stop_at(adapter.blocks()[target], before=False),
            torch.no_grad(),
        ):
            _rerun(adapter, h, start)
        m = mask[b0:b1]
        for layer in layers:
            probs = pats[layer][-1].double().cpu().numpy()  # (b, H, S, S)
            if probs.shape[1] != n_heads or probs.shape[-1] != seq:
                raise NumericalError(
                    f"attention of layer {layer} has shape {probs.shape}, expected "
                    f"(batch, {n_heads}, {seq}, {seq})"
                )
            # the keys each query can see: causal, and the window on sliding layers
            valid = np.broadcast_to(visible[layer][-1].cpu().numpy(), probs.shape)
            g = gini(probs, mask=valid, variant=variant)[:, :, :-1]  # (b, H, S-1)
            parts[layer].append(np.moveaxis(g, 1, 0)[:, m])  # (H, n_scored_in_batch)
    heads = np.asarray([(layer, hh) for layer in layers for hh in range(n_heads)], dtype=np.int64)
    values = np.concatenate([np.concatenate(parts[layer], axis=1) for layer in layers], axis=0)
    return HeadGini(heads=frozen(heads), gini=frozen(values), variant=str(variant))


# ---------------------------------------------------------------------------------------------
# Head ablation
# ---------------------------------------------------------------------------------------------


def _subset(positions: np.ndarray | None, n: int) -> np.ndarray:
    if positions is None:
        return np.arange(n)
    idx = np.asarray(positions, dtype=np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise ConfigError(f"positions must index the {n} scored positions")
    return idx


@dataclass(frozen=True, eq=False)
class HeadAblation:
    """The group's activations under head ablations, as per-position squared norms.

    Attributes
    ----------
    neuron_ids:
        The group (columns whose activations are measured).
    ablations:
        ``(n_ablations, 2)`` ``(layer, head)``; ``head == -1`` (:data:`ALL_HEADS`) means all
        heads of the layer zeroed at once. Axis 0 of :attr:`diff_sq` / :attr:`abl_sq`.
    window:
        ``(n_scored,)`` window of each scored position (axis 1 of the arrays below).
    base_sq:
        ``||a_base[p]||²`` per scored position ``p`` (over the group's neurons).
    diff_sq:
        ``||a_base[p] - a_abl[p]||²`` per ablation and position.
    abl_sq:
        ``||a_abl[p]||²`` per ablation and position.
    baseline_max_abs_diff:
        Largest absolute difference between the re-run baseline and reference activations
        (e.g. ``ident.acts``), or ``None`` when none were given: a wiring check.
    """

    neuron_ids: np.ndarray
    ablations: np.ndarray
    window: np.ndarray
    base_sq: np.ndarray
    diff_sq: np.ndarray
    abl_sq: np.ndarray
    baseline_max_abs_diff: float | None = None

    @property
    def single(self) -> np.ndarray:
        """Indices (into :attr:`ablations`) of the single-head ablations."""
        return np.flatnonzero(self.ablations[:, 1] != ALL_HEADS)

    @property
    def whole_layer(self) -> np.ndarray:
        """Indices (into :attr:`ablations`) of the whole-layer ablations."""
        return np.flatnonzero(self.ablations[:, 1] == ALL_HEADS)

    def _den(self, idx: np.ndarray) -> float:
        den = float(self.base_sq[idx].sum())
        if not den > 0.0:
            raise NumericalError(
                "the group's baseline activations are zero at the chosen positions; "
                "the ablation impact is undefined"
            )
        return den

    def impacts(self, positions: np.ndarray | None = None) -> np.ndarray:
        """Eq. 8 per ablation over ``positions`` (default: all scored positions)."""
        idx = _subset(positions, self.base_sq.size)
        return np.sqrt(self.diff_sq[:, idx].sum(axis=1) / self._den(idx))

    def signed_changes(self, positions: np.ndarray | None = None) -> np.ndarray:
        """``||a_abl|| / ||a_base|| - 1`` per ablation over ``positions``."""
        idx = _subset(positions, self.base_sq.size)
        return np.sqrt(self.abl_sq[:, idx].sum(axis=1) / self._den(idx)) - 1.0

    def window_impacts(
        self, windows: np.ndarray, positions: np.ndarray | None = None
    ) -> np.ndarray:
        """``(n_ablations, len(windows))`` eq. 8 per window (NaN: no or zero baseline)."""
        idx = _subset(positions, self.base_sq.size)
        out = np.full((self.ablations.shape[0], len(windows)), np.nan)
        for j, w in enumerate(np.asarray(windows)):
            sel = idx[self.window[idx] == w]
            den = float(self.base_sq[sel].sum())
            if sel.size and den > 0.0:
                out[:, j] = np.sqrt(self.diff_sq[:, sel].sum(axis=1) / den)
        return out


def head_ablation(
    adapter: ModelAdapter,
    block_input: np.ndarray,
    target_mask: np.ndarray,
    group: np.ndarray,
    *,
    start_layer: int | None = None,
    batch_size: int = 4,
    reference_acts: np.ndarray | None = None,
    progress: bool = False,
    target_layer: int | None = None,
) -> HeadAblation:
    """Ablate every single head and every whole layer of the re-run blocks (eq. 8 inputs).

    Parameters
    ----------
    adapter, block_input, target_mask, start_layer, batch_size, target_layer:
        As in :func:`attention_gini`.
    group:
        Neuron ids of MLP layer ``target_layer`` (default the final one) whose activations are
        measured.
    reference_acts:
        Optional ``(n_scored, |group|)`` activations from the full forward (e.g.
        ``ident.acts[:, group]``) to check the re-run baseline against.
    progress:
        Show a progress bar.
    """
    bi, mask = _check_inputs(adapter, block_input, target_mask)
    start, target = _span(adapter, start_layer, target_layer)
    ids = check_group(group, int(adapter.w_out(target).shape[0]))
    layers = list(range(start, target + 1))
    n_heads = adapter.dims.n_heads
    abls = [(layer, h) for layer in layers for h in range(n_heads)]
    abls += [(layer, ALL_HEADS) for layer in layers]

    def run(ablate: tuple[int, list[int]] | None) -> np.ndarray:
        return _group_acts(
            adapter, bi, mask, start, ids, batch_size=batch_size, ablate=ablate, target=target
        )

    base = run(None)
    dev: float | None = None
    if reference_acts is not None:
        ref = np.asarray(reference_acts, dtype=np.float64)
        if ref.shape != base.shape:
            raise ConfigError(f"reference_acts has shape {ref.shape}, expected {base.shape}")
        dev = float(np.max(np.abs(base - ref))) if base.size else 0.0
        scale = float(np.max(np.abs(ref))) if ref.size else 0.0
        if dev > 1e-2 * max(scale, 1e-12):
            logger.warning(
                "re-run baseline differs from the captured activations by up to %.3g "
                "(activation scale %.3g)", dev, scale,
            )  # fmt: skip
    diff_sq = np.empty((len(abls), base.shape[0]))
    abl_sq = np.empty((len(abls), base.shape[0]))
    for i, (layer, h) in enumerate(tqdm(abls, desc="head ablations", disable=not progress)):
        heads = list(range(n_heads)) if h == ALL_HEADS else [h]
        a = run((layer, heads))
        diff_sq[i] = np.sum((base - a) ** 2, axis=1)
        abl_sq[i] = np.sum(a * a, axis=1)
    window = np.nonzero(mask)[0]
    return HeadAblation(
        neuron_ids=frozen(ids),
        ablations=frozen(np.asarray(abls, dtype=np.int64)),
        window=frozen(window.astype(np.int64)),
        base_sq=frozen(np.sum(base * base, axis=1)),
        diff_sq=frozen(diff_sq),
        abl_sq=frozen(abl_sq),
        baseline_max_abs_diff=dev,
    )


# ---------------------------------------------------------------------------------------------
# Model context (caches the model runs across groups and splits)
# ---------------------------------------------------------------------------------------------


#: Most windows the routing analysis re-runs (each head ablation re-runs the last blocks over
#: every window; see :meth:`RoutingContext.from_identification`).
ROUTING_MAX_WINDOWS = 32


def rows_within(rows: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Indices into sorted ``rows`` of those ``positions`` that are among them (in order)."""
    rows = np.asarray(rows, dtype=np.int64)
    pos = np.asarray(positions, dtype=np.int64)
    if rows.size == 0:
        return np.zeros(0, dtype=np.int64)
    where = np.searchsorted(rows, pos)
    inside = (where < rows.size) & (rows[np.minimum(where, rows.size - 1)] == pos)
    return where[inside].astype(np.int64)


@dataclass(eq=False)
class RoutingContext:
    """What the routing analysis needs from the model, with the model runs cached.

    The Gini array does not depend on the group or the rare/common split, and head ablations
    depend only on the group: :meth:`gini` and :meth:`ablation` compute each once.
    ``target_layer`` (default ``None``: the final MLP) is the MLP layer whose neurons the group
    holds; ``block_input`` must then enter block ``start_layer`` (default
    ``max(0, target_layer - 1)``).
    """

    adapter: ModelAdapter
    block_input: np.ndarray
    target_mask: np.ndarray
    start_layer: int | None = None
    batch_size: int = 4
    reference_acts: np.ndarray | None = None
    progress: bool = False
    _gini: dict[str, HeadGini] = field(default_factory=dict, repr=False)
    _ablations: dict[tuple[int, ...], HeadAblation] = field(default_factory=dict, repr=False)

    #: The windows the head ablations re-run (``None``: all); see :meth:`from_identification`.
    ablation_windows: np.ndarray | None = None
    #: The MLP layer whose neurons are measured (``None``: the final one).
    target_layer: int | None = None
    #: Neuron ids of the columns of ``reference_acts`` when it holds only some neurons
    #: (``None``: column ``i`` is neuron ``i``); a group outside them is not checked.
    reference_columns: np.ndarray | None = None

    @classmethod
    def from_identification(
        cls,
        ident: Identification,
        *,
        progress: bool = False,
        max_windows: int | None = ROUTING_MAX_WINDOWS,
        seed: int | None = None,
    ) -> RoutingContext:
        """Context for an identification run (loads the model if needed).

        The attention Gini is computed over every window (one re-run of the last blocks).
        Each head ablation re-runs them again, so with more than ``max_windows`` windows
        (default :data:`ROUTING_MAX_WINDOWS`; ``None``: all) the ablations use a seeded
        uniform choice of ``max_windows`` of them (seed: ``seed``, default the run's), and
        :attr:`rows` names the scored positions they cover.
        """
        if ident.block_input is None:
            raise InsufficientDataError(
                "the identification has no captured residual stream of the last blocks "
                "(block_input); rerun identification to capture it"
            )
        if max_windows is not None and max_windows < 2:
            raise ConfigError(f"max_windows must be >= 2, got {max_windows}")
        lm = ident.stages.loaded
        mask = np.asarray(ident.sample.target_mask, dtype=bool)
        n_windows = int(mask.shape[0])
        windows = None
        if max_windows is not None and n_windows > max_windows:
            rng = as_generator(int(ident.config.seed if seed is None else seed) + 7)
            windows = np.sort(rng.choice(n_windows, size=max_windows, replace=False))
            logger.info("head ablations on %d of %d windows", max_windows, n_windows)
        return cls(
            adapter=lm.adapter,
            block_input=ident.block_input,
            target_mask=mask,
            batch_size=int(ident.config.batch_size),
            reference_acts=ident.acts,
            progress=progress,
            ablation_windows=windows,
        )

    @property
    def rows(self) -> np.ndarray | None:
        """Rows (scored positions, in order) the head ablations cover; ``None``: all."""
        if self.ablation_windows is None:
            return None
        row_window = window_of_rows(self.target_mask)
        return np.flatnonzero(np.isin(row_window, self.ablation_windows))

    def rows_of(self, positions: np.ndarray) -> np.ndarray:
        """The ablation's rows of those of ``positions`` that lie in its windows."""
        rows = self.rows
        return np.asarray(positions, np.int64) if rows is None else rows_within(rows, positions)

    def gini(self, variant: GiniVariant = "standard") -> HeadGini:
        if variant not in self._gini:
            self._gini[variant] = attention_gini(
                self.adapter,
                self.block_input,
                self.target_mask,
                start_layer=self.start_layer,
                batch_size=self.batch_size,
                variant=variant,
                target_layer=self.target_layer,
            )
        return self._gini[variant]

    def _reference(self, ids: np.ndarray) -> np.ndarray | None:
        """The reference activations of the neurons ``ids`` (``None``: not all available)."""
        if self.reference_acts is None:
            return None
        if self.reference_columns is None:
            return self.reference_acts[:, ids]
        cols = np.asarray(self.reference_columns, dtype=np.int64)
        order = np.argsort(cols, kind="stable")
        where = np.searchsorted(cols, ids, sorter=order)
        where = np.minimum(where, cols.size - 1)
        if cols.size == 0 or not np.array_equal(cols[order[where]], ids):
            return None
        return np.asarray(self.reference_acts)[:, order[where]]

    def ablation(self, group: np.ndarray) -> HeadAblation:
        target = self.adapter.layer_index(-1 if self.target_layer is None else self.target_layer)
        ids = check_group(group, int(self.adapter.w_out(target).shape[0]))
        key = tuple(int(i) for i in ids)
        if key not in self._ablations:
            bi, mask, rows = self.block_input, self.target_mask, self.rows
            ref = self._reference(ids)
            if self.ablation_windows is not None and rows is not None:
                bi = np.asarray(bi[self.ablation_windows])
                mask = mask[self.ablation_windows]
                ref = None if ref is None else np.asarray(ref)[rows]
            self._ablations[key] = head_ablation(
                self.adapter,
                bi,
                mask,
                ids,
                start_layer=self.start_layer,
                batch_size=self.batch_size,
                reference_acts=ref,
                progress=self.progress,
                target_layer=self.target_layer,
            )
        return self._ablations[key]
