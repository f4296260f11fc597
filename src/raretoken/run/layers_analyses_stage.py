"""Model work and cache of the per-layer analyses (:mod:`.layers_analyses`).

For each layer of the per-layer stage (:func:`~raretoken.run.layers.identify_layers`):

1. the group (:func:`~.layers_analyses.layer_group`) and its cached analyses, if any (stage
   ``"layers"``, key: the layer's windows, model, dtype and device, the group, ``n_random``, the
   seed, the analyses' settings and the routing windows): a layer found there needs no model;
2. the final layer's row is the run's own (``analyses/analyses.json``) when it exists;
3. for the others, the layer's activations at the run's uniform sample of positions (or its
   rare-target positions, following the run's ``coordination_positions``): one forward pass
   over the sample windows for all layers that lack them
   (:func:`~raretoken.ablation.layer_acts.layer_acts`, written into memory-mapped cache
   entries, one per layer); the layer's weights (:func:`~raretoken.analyses.spectra.
   layer_weights` with ``layer``);
4. with ``routing``, the residual stream entering block ``max(0, L - 1)`` and the group's
   activations in layer ``L`` on ``routing_windows`` seeded windows of the sample (one pass for
   all layers, :func:`~raretoken.ablation.layer_acts.block_inputs`), and a
   :class:`~raretoken.analyses.routing_runs.RoutingContext` with ``target_layer=L``: the heads
   of blocks ``L - 1`` and ``L`` (the blocks whose attention feeds MLP ``L``; the paper's
   ``L-2``, ``L-1`` for the final layer), each re-run stopped at MLP ``L``.

Routing is opt-in: on two CPU cores it costs about as much as the rest of the per-layer stage
(see :data:`LAYER_ROUTING_MAX_WINDOWS`); the final layer's routing is the run's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._rng import as_generator
from ..analyses.routing_runs import RoutingContext, rows_within
from ..analyses.spectra import layer_weights
from ..data.scoring import uniform_rows
from ..errors import ConfigError
from ..stats.regime_bootstrap import window_of_rows
from ..storage import ArrayCache, EntryWriter, cache_key
from .layers_analyses import (
    LayerAnalyses,
    LayerRouting,
    analyses_of_layer,
    final_layer_analyses,
    layer_group,
    run_analysis_settings,
)
from .layers_results import LayerRegime

if TYPE_CHECKING:
    from ..analyses.groups import NeuronGroup
    from ..models.adapters import ModelAdapter
    from .layers import RunInputs

log = logging.getLogger(__name__)

__all__ = ["LAYER_ROUTING_MAX_WINDOWS", "LayersAnalyses", "analyse_layers", "analyses_seed"]

#: Bump when what a layer's cached analyses or activations hold changes.
LAYER_ANALYSES_VERSION = 1
#: Seed of layer ``L``'s analyses: the run's seed + this + ``L``.
SEED_OFFSET = 300
#: Most windows the per-layer routing re-runs (Gini and head ablations alike; seeded choice).
#: Each layer costs ``2 * n_heads + 3`` re-runs of two blocks over them.
LAYER_ROUTING_MAX_WINDOWS = 8


def analyses_seed(seed: int, layer: int) -> int:
    """Seed of the analyses of ``layer`` for a run of seed ``seed``."""
    return int(seed) + SEED_OFFSET + int(layer)


@dataclass(frozen=True, eq=False)
class LayersAnalyses:
    """The per-layer analyses of one call, by layer, and how they were obtained."""

    layers: tuple[LayerAnalyses, ...]
    #: layers whose analyses came from the cache (the run's own final layer never counts)
    cached: tuple[int, ...]
    settings: dict[str, Any]


def _acts_rows(inp: RunInputs, positions: str) -> np.ndarray:
    if positions == "all":
        return np.sort(uniform_rows(inp.sample))
    if positions == "rare":
        return np.sort(np.asarray(inp.rare_positions, dtype=np.int64))
    raise ConfigError(f"coordination_positions must be 'all' or 'rare', got {positions!r}")


def acts_key(parts: Mapping[str, Any], positions: str) -> str:
    """Cache key of one layer's activations at the run's ``positions`` rows."""
    return cache_key(
        "layer_acts", {**parts, "rows": positions, "analyses_version": LAYER_ANALYSES_VERSION}
    )


def analyses_key(
    parts: Mapping[str, Any],
    group: NeuronGroup,
    n_random: int,
    seed: int,
    settings: Mapping[str, Any],
    routing_windows: np.ndarray | None,
) -> str:
    """Cache key of one layer's analyses: everything that changes them."""
    return cache_key(
        "layer_analyses",
        {
            **parts,
            "analyses_version": LAYER_ANALYSES_VERSION,
            "group": group.to_dict(),
            "n_random": n_random,
            "seed": seed,
            "settings": dict(settings),
            "routing_windows": None if routing_windows is None else routing_windows.tolist(),
        },
    )


def routing_windows_of(n_windows: int, max_windows: int, seed: int) -> np.ndarray:
    """The windows the per-layer routing re-runs: all, or a seeded uniform choice of
    ``max_windows`` (the seed of the final layer's: the run's seed + 7)."""
    if n_windows <= max_windows:
        return np.arange(n_windows, dtype=np.int64)
    rng = as_generator(int(seed) + 7)
    return np.sort(rng.choice(n_windows, size=max_windows, replace=False)).astype(np.int64)


def _layer_acts(
    inp: RunInputs,
    adapter: ModelAdapter,
    layers: list[int],
    keys: Mapping[int, str],
    rows: np.ndarray,
) -> dict[int, np.ndarray]:
    """Each layer's activations at ``rows``: from the cache, the missing ones from one pass."""
    from ..ablation.layer_acts import layer_acts

    cache = inp.stages.cache
    out: dict[int, np.ndarray] = {}
    for li in layers:
        hit = cache.load("layers", keys[li], mmap=True)
        if hit is None:
            continue
        if "acts" in hit and hit["acts"].shape[0] == rows.size:
            out[li] = hit["acts"]
        else:
            cache.discard("layers", keys[li], f"not the activations of {rows.size} positions")
    todo = [li for li in layers if li not in out]
    if not todo:
        return out
    log.info("capturing the activations of layers %s at %d positions", todo, rows.size)
    writers: dict[int, EntryWriter] = {li: cache.writer("layers", keys[li]) for li in todo}
    try:
        arrays = {
            li: w.array("acts", (rows.size, int(adapter.w_out(li).shape[0])), np.float32)
            for li, w in writers.items()
        }
        layer_acts(adapter, inp.sample.input_ids, inp.sample.target_mask, todo, rows=rows,
                   batch_windows=inp.cfg.batch_size, out=arrays)  # fmt: skip
        for li, w in writers.items():
            out[li] = w.commit(mmap=True)["acts"]
    finally:
        for w in writers.values():
            w.abort()
    return out


def _routings(
    inp: RunInputs,
    adapter: ModelAdapter,
    groups: Mapping[int, NeuronGroup],
    windows: np.ndarray,
) -> dict[int, LayerRouting]:
    """Routing inputs of each layer of ``groups`` on ``windows`` (two passes over them)."""
    from ..ablation.layer_acts import block_inputs, layer_acts

    ids = np.asarray(inp.sample.input_ids)[windows]
    mask = np.asarray(inp.sample.target_mask, dtype=bool)[windows]
    starts = {li: max(0, li - 1) for li in groups}
    bs = int(inp.cfg.batch_size)
    bi = block_inputs(adapter, ids, sorted(set(starts.values())), batch_windows=bs)
    ref = layer_acts(adapter, ids, mask, list(groups), batch_windows=bs,
                     columns={li: g.neuron_ids for li, g in groups.items()})  # fmt: skip
    sub_rows = np.flatnonzero(np.isin(window_of_rows(np.asarray(inp.sample.target_mask)), windows))
    rare = rows_within(sub_rows, inp.rare_positions)
    common = rows_within(sub_rows, inp.common_positions)
    uniform = rows_within(sub_rows, uniform_rows(inp.sample))
    out = {}
    for li, start in starts.items():
        ctx = RoutingContext(adapter=adapter, block_input=bi[start], target_mask=mask,
                             start_layer=start, batch_size=bs, reference_acts=ref[li],
                             target_layer=li,
                             reference_columns=groups[li].neuron_ids)  # fmt: skip
        out[li] = LayerRouting(ctx, windows, rare, common, uniform)
    return out


def _final_note(res: LayerAnalyses | None, wanted: bool) -> str | None:
    if not wanted or res is None:
        return None
    return "the run's analyses/analyses.json" if res.source == "run" else "computed here"


def analyse_layers(
    inp: RunInputs,
    run_dir: Path,
    regimes: Sequence[LayerRegime],
    parts: Mapping[int, Mapping[str, Any]],
    *,
    n_random: int,
    routing: bool = False,
    routing_windows: int = LAYER_ROUTING_MAX_WINDOWS,
) -> LayersAnalyses:
    """The four analyses of each layer of ``regimes`` (see module docstring).

    ``parts`` maps each layer to the cache-key parts of its per-layer results (windows, model,
    dtype, device, layer). The model is loaded only when some layer's analyses are not cached.
    """
    cfg = inp.cfg
    settings = run_analysis_settings(run_dir)
    last = inp.n_layers - 1
    results: dict[int, LayerAnalyses] = {}
    if any(r.layer == last for r in regimes):
        fin = final_layer_analyses(run_dir, last)
        if fin is not None:
            results[last] = fin
    windows = (
        routing_windows_of(int(inp.sample.target_mask.shape[0]), routing_windows, cfg.seed)
        if routing
        else None
    )
    groups: dict[int, NeuronGroup] = {}
    keys: dict[int, str] = {}
    cached: list[int] = []
    cache: ArrayCache = inp.stages.cache
    for r in regimes:
        if r.layer in results:
            continue
        g = groups[r.layer] = layer_group(r, settings["fallback_k"])
        sd = analyses_seed(cfg.seed, r.layer)
        keys[r.layer] = analyses_key(parts[r.layer], g, n_random, sd, settings, windows)
        hit = cache.load_json("layers", keys[r.layer])
        if hit is not None:
            try:
                results[r.layer] = LayerAnalyses.from_dict(hit)
                cached.append(r.layer)
            except (KeyError, TypeError, ValueError) as exc:
                cache.discard("layers", keys[r.layer], f"not layer analyses ({exc})")
    todo = [li for li in groups if li not in results]
    if todo:
        adapter = inp.stages.loaded.adapter
        positions = str(settings["coordination_positions"])
        rows = _acts_rows(inp, positions)
        akeys = {li: acts_key(parts[li], positions) for li in todo}
        acts = _layer_acts(inp, adapter, todo, akeys, rows)
        routings = {}
        if windows is not None:
            t0 = time.perf_counter()
            routings = _routings(inp, adapter, {li: groups[li] for li in todo}, windows)
            log.info("routing inputs of %d layers in %.1f s", len(todo),
                     time.perf_counter() - t0)  # fmt: skip
        for li in todo:
            log.info("layer %d: analyses of the %s (%d neurons)", li, groups[li].name,
                     groups[li].size)  # fmt: skip
            res = analyses_of_layer(
                np.asarray(acts[li]), layer_weights(adapter, settings["weight_name"], li),
                groups[li], layer=li, n_random=n_random, seed=analyses_seed(cfg.seed, li),
                routing=routings.get(li), weight_name=settings["weight_name"],
                coordination_positions=positions, impact_positions=settings["impact_positions"],
                tau=float(settings["tau"]), mi_bins=settings["mi_bins"],
                n_rare_positions=inp.rare_positions.size,
                n_common_positions=inp.common_positions.size, percentile=float(cfg.percentile),
            )  # fmt: skip
            cache.save_json("layers", keys[li], res.to_dict())
            results[li] = res
    out_settings = {
        **settings, "n_random": n_random, "seed": f"{cfg.seed} + {SEED_OFFSET} + layer",
        "routing": bool(routing),
        "routing_windows": None if windows is None else int(windows.size),
        "routing_note": _routing_note(routing, windows, results.get(last)),
        "final_layer": _final_note(results.get(last), any(r.layer == last for r in regimes)),
    }  # fmt: skip
    return LayersAnalyses(
        tuple(results[r.layer] for r in regimes), tuple(sorted(cached)), out_settings
    )


def _routing_note(routing: bool, windows: np.ndarray | None, final: LayerAnalyses | None) -> str:
    """What the per-layer routing covers, and whether the final layer's row has routing."""
    if routing:
        note = f"routing re-runs {0 if windows is None else windows.size} seeded windows per layer"
    else:
        note = "per-layer routing not run (opt-in)"
    if final is not None and final.analyses.routing is not None and final.source == "run":
        return note + "; the final layer's routing is the run's own"
    if final is not None and final.analyses.routing is None:
        return note + "; the final layer has no routing result"
    return note
