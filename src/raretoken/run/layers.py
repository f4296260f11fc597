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
screen's quality against the exact Δloss of every neuron. Each layer's ablation is cached
(:class:`~raretoken.storage.ArrayCache`, stage ``"layers"``) under the run's sample and
reference windows, the model, the dtype and device, the layer and the settings, so a rerun loads
no model. Outputs (recorded in ``manifest.json`` as stage ``layers``): ``layers/layer_XX.json``,
``layers/layers.csv``, ``layers/screen_quality.csv``, ``layers/summary.md`` (a section for
``summary.md``), ``figures/depth.png`` / ``.svg``.

Note: :func:`~raretoken.run.identify` republishes the whole run directory, so a later
``identify``/``analyze_run_dir`` on the same directory drops ``layers/``: run this stage last.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..ablation.layer import LayerAblation, layer_ablation
from ..ablation.layer_inputs import layer_mean_acts
from ..data.sampling import ContextSample
from ..data.scoring import uniform_rows
from ..errors import ConfigError, RunDirectoryError
from ..storage import ArrayCache, cache_key
from .analysis_stage import config_of_run_dir
from .config import RunConfig
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

log = logging.getLogger(__name__)

__all__ = ["LayerRegime", "LayersResult", "RunInputs", "identify_layers", "parse_layers",
           "run_inputs"]  # fmt: skip

#: Bump when what a layer's cached ablation holds changes.
LAYERS_VERSION = 1


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


def run_inputs(run_dir: Path | str, cache: ArrayCache, *, progress: bool = False) -> RunInputs:
    """The run's windows and rare/common rows, the way identification built them (cached:
    no model is loaded when the run's token statistics and windows are in ``cache``)."""
    run_dir = Path(run_dir)
    cfg = _config(run_dir)
    st = Stages(cfg, cache, progress=progress)
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


def identify_layers(
    run_dir: Path | str,
    layers: str | int | Sequence[int] = "all",
    *,
    top_k: int = 100,
    n_random: int = 100,
    quality_k: int = 50,
    cache_dir: Path | str | None = None,
    no_cache: bool = False,
    progress: bool = True,
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
    cache_dir, no_cache, progress:
        As for :func:`~raretoken.run.identify`.
    """
    run_dir = Path(run_dir)
    top_k = _check_count("top_k", top_k, 0)
    n_random = _check_count("n_random", n_random, 0)
    quality_k = _check_count("quality_k", quality_k, 1)
    if top_k + n_random == 0:
        raise ConfigError("top_k + n_random must be >= 1: no neuron would be run exactly")
    cfg = _config(run_dir)
    run = RunDirectory.open_existing(run_dir, cfg.to_dict())
    cache = open_cache(cache_dir, no_cache)
    st = Stages(cfg, cache, progress=progress)
    wanted = parse_layers(layers, _n_layers(run_dir, st))  # before any model work
    t0 = time.perf_counter()
    prev = run.manifest.get("status")
    run.begin("layers")
    try:
        inp = run_inputs(run_dir, cache, progress=progress)
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
        settings = {"layers": wanted, "top_k": top_k, "n_random": n_random,
                    "quality_k": quality_k, "seed": f"{cfg.seed} + 100 + layer",
                    "regime_fit": "fit_regimes defaults (as the run)"}  # fmt: skip
        written = write_layers(run_dir, regimes, settings)
        run.replace_outputs("layers:", written)
    except BaseException as exc:
        run.stop("layers", exc)
        raise
    run.end(
        "layers",
        prev if prev in ("identified", "complete") else "identified",
        seconds=round(time.perf_counter() - t0, 3),
        keys={str(li): k for li, k in keys.items()},
        cached_layers=list(cached),
        settings=settings,
    )
    return LayersResult(run_dir, regimes, settings, written, cached)


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
