"""Rare-token neurons in every MLP layer of a finished run (issue 12, part 1).

>>> from raretoken.run.layers import identify_layers
>>> res = identify_layers("raretoken-runs/demo", "all")          # doctest: +SKIP
>>> [(r.layer, r.values_kind, r.plateau_size) for r in res.layers]  # doctest: +SKIP

For each requested layer below the final one, :func:`~raretoken.ablation.layer.layer_ablation`
screens every neuron (attribution patching) and runs the exact mean ablation for the screen's
``top_k`` neurons (rare and common) plus ``n_random`` seeded others. The three-regime fit
(:func:`~raretoken.stats.regimes.fit_regimes`, the run's settings) is then made on

- the exact mean ``|Δloss|`` on rare targets when every neuron was run exactly
  (``top_k >= d_mlp``): ``values = "exact"``;
- otherwise the ``|screen|`` of the rare targets: ``values = "screen"``, with the screen's
  quality next to it. Screen and exact values are never mixed in one fit.

The final layer is not recomputed: its fit and Δloss are the run's own (``regimes.json``,
``neurons.parquet``; exact, closed form); only its linear screen is computed, to report the
screen's quality against the exact Δloss of every neuron.

With ``analyses=True`` (the default) the four analyses of the paper (§4.2–4.5) run on each
layer's group — its plateau, or the top-k by the fitted values when it has none (the rule of
the run's own analyses) — against ``n_random_groups`` size-matched random groups of the same
layer, seeded per layer (run seed + 300 + layer): d_eff/N and MI-graph modularity on the
layer's activations at the run's uniform sample of positions (captured for all layers in one
forward pass), the Hill α of the layer's weights, and, opt-in (``layer_routing``: about 1.4
forward passes of ``routing_windows`` windows per layer, so off by default), attention routing
through the heads of blocks ``L - 1`` and ``L`` (:mod:`.layers_analyses`,
:mod:`.layers_analyses_stage`). The final layer's row is the run's own
``analyses/analyses.json`` when it exists (computed here otherwise). Settings follow the run's
analyses (weights, positions, τ, MI bins, fallback k).

Each layer's ablation, activations and analyses are cached
(:class:`~raretoken.storage.ArrayCache`, stage ``"layers"``) under the run's sample and
reference windows, the model, the dtype and device, the layer and the settings, so a rerun loads
no model. Outputs (recorded in ``manifest.json`` as stage ``layers``): ``layers/layer_XX.json``,
``layers/layers.csv``, ``layers/screen_quality.csv``, with the analyses
``layers/analyses_XX.json`` and ``layers/analyses.csv``, ``layers/summary.md`` (a section for
``summary.md``), ``figures/depth.png`` / ``.svg`` (plateau size, κ, screen quality and the
analyses' z against random groups per layer).

The stage's files survive a later ``identify``/``analyze_run_dir`` on the same directory while
the identification they were computed from is unchanged (:mod:`.addons`); its section joins
``summary.md`` (:mod:`.summary`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..ablation.layer import LayerAblation, layer_ablation
from ..ablation.layer_inputs import layer_mean_acts
from ..data.sampling import ContextSample
from ..data.scoring import uniform_rows
from ..errors import ConfigError, RunDirectoryError
from ..storage import ArrayCache, cache_key
from .analysis_stage import config_of_run_dir
from .config import RunConfig
from .layers_analyses_stage import LAYER_ROUTING_MAX_WINDOWS, analyse_layers
from .layers_outputs import write_layers
from .layers_results import (
    LayerRegime,
    LayersResult,
    final_layer_regime,
    parse_layers,
    regime_of_ablation,
)
from .manifest import RunDirectory
from .outputs import read_json
from .stages import Stages, open_cache, resolved_device
from .summary import write_summary

log = logging.getLogger(__name__)

__all__ = ["LayerRegime", "LayersResult", "RunInputs", "identify_layers", "parse_layers",
           "run_inputs"]  # fmt: skip

#: Bump when what a layer's cached ablation holds changes.
LAYERS_VERSION = 2


@dataclass(frozen=True, eq=False)
class RunInputs:
    """What the per-layer stage needs of a finished run, rebuilt from the cache."""

    cfg: RunConfig
    stages: Stages
    n_layers: int
    sample: ContextSample
    ref: ContextSample
    sample_key: str
    ref_key: str
    rare_positions: np.ndarray
    common_positions: np.ndarray


def _scored_index(sample: ContextSample, vocab_mask: np.ndarray) -> np.ndarray:
    targets = sample.target_ids[sample.target_mask]
    return np.flatnonzero(np.asarray(vocab_mask, dtype=bool)[targets])


def _config(run_dir: Path) -> RunConfig:
    try:
        return RunConfig(**config_of_run_dir(run_dir))
    except TypeError as exc:
        raise RunDirectoryError(
            f"{run_dir}: its manifest's configuration is unreadable ({exc})"
        ) from exc


def _n_layers(run_dir: Path, st: Stages) -> int:
    """From the manifest's identity (written by identification), else the model's config."""
    m = read_json(run_dir / "manifest.json")
    dims = (m.get("identity") or {}).get("dims") or st.dims
    return int(dims["n_layers"])


def _reuse(stages: Stages | None, cfg: RunConfig) -> Stages | None:
    """``stages`` when it is the run's own (same configuration): its loaded model is reused."""
    return stages if stages is not None and stages.cfg == cfg else None


def run_inputs(
    run_dir: Path | str,
    cache: ArrayCache,
    *,
    progress: bool = False,
    stages: Stages | None = None,
) -> RunInputs:
    """The run's windows and rare/common rows, the way identification built them (cached:
    no model is loaded when the run's token statistics and windows are in ``cache``)."""
    run_dir = Path(run_dir)
    cfg = _config(run_dir)
    st = _reuse(stages, cfg) or Stages(cfg, cache, progress=progress)
    n_layers = _n_layers(run_dir, st)
    counts, _ = st.token_counts()
    split, always = st.splits(counts)
    sample, ref, sample_key, ref_key = st.samples(split, always)
    rare_mask, common_mask = split.masks()
    rare = _scored_index(sample, rare_mask)
    common = np.intersect1d(_scored_index(sample, common_mask), uniform_rows(sample))
    return RunInputs(cfg, st, n_layers, sample, ref, sample_key, ref_key, rare, common)


def _key_parts(inp: RunInputs, layer: int) -> dict[str, object]:
    """What every per-layer result depends on: windows, split, model, dtype, device, layer."""
    cfg = inp.cfg
    return {
        "version": LAYERS_VERSION,
        # the rare/common rows follow the token counts, which the windows' key need not hold
        # (e.g. windows drawn without regard to rare tokens and scored everywhere)
        "counts": inp.stages.counts_key(),
        "sample": inp.sample_key,
        "reference": inp.ref_key,
        "percentile": cfg.percentile,
        "model": inp.stages.model_id,
        "dtype": cfg.dtype,
        "device": resolved_device(cfg),
        "layer": layer,
    }


def layer_key(inp: RunInputs, layer: int, top_k: int, n_random: int, quality_k: int) -> str:
    """Cache key of one layer's ablation: everything that changes it."""
    return cache_key(
        "layer_ablation",
        {
            **_key_parts(inp, layer),
            "top_k": top_k,
            "n_random": n_random,
            "seed": inp.cfg.seed + 100 + layer,
            "quality_k": quality_k,
        },
    )


def final_screen_key(inp: RunInputs, layer: int) -> str:
    """Cache key of the final layer's linear screen (compared with the run's exact Δloss)."""
    return cache_key("final_layer_screen", _key_parts(inp, layer))


def _check_count(name: str, v: int, low: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {v!r}")
    return int(v)


def refresh_after_analyses(
    run_dir: Path | str,
    analyses_key: str,
    *,
    cache_dir: Path | str | None = None,
    no_cache: bool = False,
    progress: bool = True,
) -> bool:
    """Bring the per-layer analyses' final-layer row up to date after new run analyses.

    The per-layer stage takes the final layer's row from the run's ``analyses/``; when the
    analyses are rerun with other options (their cache key ``analyses_key`` differs from the
    one the stage recorded), the stage is rerun with its recorded settings: everything else
    comes from the cache, so no model is loaded. Without a cache (``no_cache``) it is not
    rerun, and a warning says so. Returns whether it ran.
    """
    run_dir = Path(run_dir)
    info = (read_json(run_dir / "manifest.json").get("stages") or {}).get("layers")
    if not isinstance(info, dict):
        return False
    settings = info.get("settings") or {}
    ana = settings.get("analyses")
    if ana is None or info.get("final_analyses_key") == analyses_key:
        return False
    if no_cache:
        log.warning("%s: layers/ shows the final layer's row of the earlier analyses; rerun "
                    "`raretoken run --layers ...` to update it", run_dir)  # fmt: skip
        return False
    log.info("per-layer stage: updating the final layer's row from the new analyses")
    identify_layers(
        run_dir, settings["layers"], top_k=settings["top_k"], n_random=settings["n_random"],
        quality_k=settings["quality_k"], analyses=True, n_random_groups=ana["n_random"],
        layer_routing=bool(ana["routing"]),
        routing_windows=ana.get("routing_windows") or LAYER_ROUTING_MAX_WINDOWS,
        cache_dir=cache_dir, no_cache=no_cache, progress=progress,
    )  # fmt: skip
    return True


def check_layer_options(
    cfg: RunConfig | None,
    *,
    top_k: int = 100,
    n_random: int = 100,
    quality_k: int = 50,
    analyses: bool = True,
    n_random_groups: int | None = None,
    routing_windows: int = LAYER_ROUTING_MAX_WINDOWS,
) -> tuple[int, int, int, int, int]:
    """The per-layer stage's counts, checked (one-line :class:`ConfigError`) before any work:
    ``(top_k, n_random, quality_k, n_random_groups, routing_windows)``, the random groups
    defaulting to the run's ``n_random_groups`` (``cfg``; ``None``: the arguments alone are
    checked, and the default is returned as 0)."""
    top_k = _check_count("top_k", top_k, 0)
    n_random = _check_count("n_random", n_random, 0)
    quality_k = _check_count("quality_k", quality_k, 1)
    if top_k + n_random == 0:
        raise ConfigError("top_k + n_random must be >= 1: no neuron would be run exactly")
    if n_random_groups is not None:
        n_random_groups = _check_count("n_random_groups", n_random_groups, 2)
    routing_windows = _check_count("routing_windows", routing_windows, 2)
    if cfg is None:
        return top_k, n_random, quality_k, n_random_groups or 0, routing_windows
    n_groups = cfg.n_random_groups if n_random_groups is None else n_random_groups
    if analyses and n_groups < 2:
        raise ConfigError(
            f"the per-layer analyses need n_random_groups >= 2 random groups, the run has "
            f"{n_groups}: pass n_random_groups (--layer-n-random) or analyses=False"
        )
    return top_k, n_random, quality_k, n_groups, routing_windows


def identify_layers(
    run_dir: Path | str,
    layers: str | int | Sequence[int] = "all",
    *,
    top_k: int = 100,
    n_random: int = 100,
    quality_k: int = 50,
    analyses: bool = True,
    n_random_groups: int | None = None,
    layer_routing: bool = False,
    routing_windows: int = LAYER_ROUTING_MAX_WINDOWS,
    cache_dir: Path | str | None = None,
    no_cache: bool = False,
    progress: bool = True,
    stages: Stages | None = None,
) -> LayersResult:
    """Identify rare-token neurons in each of ``layers`` of the finished run at ``run_dir``.

    Parameters
    ----------
    run_dir:
        A run directory written by :func:`~raretoken.run.identify` (its windows are read from
        the cache, or rebuilt from the corpus as identification did).
    layers:
        ``"all"``, a comma-separated string (``"0,5,-1"``), an int or a list of ints (negative:
        from the end). Checked before any model work.
    top_k, n_random, quality_k:
        See :func:`~raretoken.ablation.layer.layer_ablation`; ``top_k >= d_mlp`` runs every
        neuron exactly (and the fit uses exact values).
    analyses:
        Also run the four analyses on each layer's group (:mod:`.layers_analyses`).
    n_random_groups:
        Size-matched random groups per analysis baseline (>= 2; default the run's
        ``n_random_groups``).
    layer_routing:
        Also run attention routing per layer (opt-in: costly on a CPU; the final layer's
        routing is the run's), on ``routing_windows`` (>= 2) seeded windows of the sample.
    cache_dir, no_cache, progress:
        As for :func:`~raretoken.run.identify`.
    stages:
        The run's :class:`~.stages.Stages` when the caller has them (e.g.
        ``identify(...).stages``): its loaded model is reused instead of loaded again.
    """
    run_dir = Path(run_dir)
    opts: dict[str, Any] = {"top_k": top_k, "n_random": n_random, "quality_k": quality_k, "analyses": analyses,
            "n_random_groups": n_random_groups, "routing_windows": routing_windows}  # fmt: skip
    check_layer_options(None, **opts)  # the arguments, before the run directory is read
    cfg = _config(run_dir)
    top_k, n_random, quality_k, n_groups, routing_windows = check_layer_options(cfg, **opts)
    run = RunDirectory.open_existing(run_dir, cfg.to_dict())
    cache = open_cache(cache_dir, no_cache)
    st = _reuse(stages, cfg) or Stages(cfg, cache, progress=progress)
    wanted = parse_layers(layers, _n_layers(run_dir, st))  # before any model work
    t0 = time.perf_counter()
    run.begin("layers")
    try:
        inp = run_inputs(run_dir, cache, progress=progress, stages=st)
        recorded = run.manifest.get("stages", {}).get("sampling", {}).get("key")
        if recorded is not None and recorded != inp.sample_key:
            raise RunDirectoryError(
                f"{run_dir}: the windows rebuilt from its configuration are not the run's "
                "(its corpus or tokenizer changed); rerun `raretoken run` with --overwrite"
            )
        last = inp.n_layers - 1
        keys = {li: layer_key(inp, li, top_k, n_random, quality_k) for li in wanted if li != last}
        ablations: dict[int, LayerAblation] = {}
        for li, key in keys.items():
            hit = cache.load_json("layers", key)
            if hit is not None:
                try:
                    ablations[li] = LayerAblation.from_dict(hit)
                except (KeyError, TypeError, ValueError) as exc:
                    cache.discard("layers", key, f"not a layer ablation ({exc})")
        cached = tuple(sorted(ablations))
        final_screen: dict[str, np.ndarray] | None = None
        fkey = final_screen_key(inp, last)
        if last in wanted:
            hit = cache.load_json("layers", fkey)
            if hit is not None:
                final_screen = {n: np.asarray(hit[n], dtype=np.float64) for n in ("rare", "common")}
        todo = [li for li in keys if li not in ablations]
        extra = [last] if last in wanted and final_screen is None else []
        new, screens = _compute(inp, todo, extra, keys, top_k, n_random, quality_k)
        ablations.update(new)
        if extra:
            final_screen = screens[last]
            cache.save_json("layers", fkey, {n: v.tolist() for n, v in final_screen.items()})
        regimes = tuple(
            final_layer_regime(run_dir, li, final_screen, quality_k)
            if li == last
            else regime_of_ablation(ablations[li])
            for li in wanted
        )
        lay = None
        if analyses:
            parts = {r.layer: _key_parts(inp, r.layer) for r in regimes}
            lay = analyse_layers(inp, run_dir, regimes, parts, n_random=n_groups,
                                 routing=layer_routing, routing_windows=routing_windows)  # fmt: skip
        settings = {"layers": wanted, "top_k": top_k, "n_random": n_random,
                    "quality_k": quality_k, "seed": f"{cfg.seed} + 100 + layer",
                    "regime_fit": "fit_regimes defaults (as the run)",
                    "analyses": None if lay is None else lay.settings}  # fmt: skip
        written = write_layers(run_dir, regimes, settings,
                               analyses=None if lay is None else lay.layers)  # fmt: skip
        run.replace_outputs("layers:", written)
    except BaseException as exc:
        run.stop("layers", exc)
        write_summary(run_dir)  # without the section of a stage that did not finish
        raise
    run.end(
        "layers",
        run.settled_status(),
        seconds=round(time.perf_counter() - t0, 3),
        keys={str(li): k for li, k in keys.items()},
        cached_layers=list(cached),
        cached_analyses=[] if lay is None else list(lay.cached),
        settings=settings,
        # the final layer's row of the analyses is the run's own: which analyses it was
        final_analyses_key=(run.manifest.get("stages") or {}).get("analyses", {}).get("key"),
    )
    write_summary(run_dir)
    return LayersResult(run_dir, regimes, settings, written, cached,
                        analyses=() if lay is None else lay.layers,
                        cached_analyses=() if lay is None else lay.cached)  # fmt: skip


def _compute(
    inp: RunInputs,
    todo: list[int],
    screen_only: list[int],
    keys: dict[int, str],
    top_k: int,
    n_random: int,
    quality_k: int,
) -> tuple[dict[int, LayerAblation], dict[int, dict[str, np.ndarray]]]:
    """Screen ``todo`` and ``screen_only`` in one pass, run the exact ablation of each layer of
    ``todo`` and cache it; return the ablations and the screens."""
    layers = sorted(set(todo) | set(screen_only))
    if not layers:
        return {}, {}
    from ..ablation.layer_screen import screen_layers

    cfg, cache = inp.cfg, inp.stages.cache
    ad = inp.stages.loaded.adapter
    log.info("per-layer screen of layers %s, exact ablation of %s", layers, todo)
    means = {
        li: m.astype(np.float32)
        for li, m in layer_mean_acts(ad, inp.ref.input_ids, inp.ref.target_mask, layers,
                                     batch_windows=cfg.batch_size).items()
    }  # fmt: skip
    sets = {"rare": inp.rare_positions, "common": inp.common_positions}
    screens = screen_layers(ad, inp.sample.input_ids, inp.sample.target_mask, means, sets,
                            batch_windows=max(1, cfg.batch_size // 2))  # fmt: skip
    out = {}
    for li in todo:
        ab = layer_ablation(
            ad, inp.sample.input_ids, inp.sample.target_mask, li, means[li],
            rare_rows=inp.rare_positions, common_rows=inp.common_positions, top_k=top_k,
            n_random=n_random, seed=cfg.seed + 100 + li, quality_k=quality_k,
            screen=screens[li], batch_windows=cfg.batch_size,
        )  # fmt: skip
        cache.save_json("layers", keys[li], ab.to_dict())
        out[li] = ab
    return out, screens
