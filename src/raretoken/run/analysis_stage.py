"""The analyses as a stage of a run: cached, recorded in the manifest, summarised.

>>> from raretoken.run import AnalysisOptions, analyze, identify, make_config  # doctest: +SKIP
>>> ident = identify(make_config(), "raretoken-runs/demo")                     # doctest: +SKIP
>>> suite = analyze(ident, AnalysisOptions(robustness=True))                   # doctest: +SKIP

:func:`analyze` runs :func:`raretoken.analyses.run_analyses` on an identification (or takes
the result from the cache), writes the tables and figures into the identification's run
directory, records them in its manifest with the analysis settings, and adds the verdicts on
the paper's claims to ``summary.md`` (their section ``analyses/summary.md``, :mod:`.summary`).
:func:`analyze_run_dir` does the same for an existing run directory: it rebuilds the
configuration from the manifest and reruns identification, which the cache makes cheap; the
per-layer results and interventions already in the directory are kept while they were computed
from the same identification (:meth:`~.manifest.RunDirectory.publish`).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._faults import checkpoint
from ..errors import RunDirectoryError
from ..storage import ArrayCache, atomic_write_text, cache_key
from .manifest import MANIFEST, MANIFEST_SCHEMA, RunDirectory
from .stages import open_cache
from .summary import write_summary

if TYPE_CHECKING:
    from ..analyses import AnalysisSuite
    from .config import RunConfig
    from .identification import Identification

log = logging.getLogger(__name__)

#: Bump when the analyses change what they compute: cached suites with an older value are
#: recomputed.
ANALYSES_VERSION = 4
#: The analyses' section of ``summary.md`` (:mod:`.summary`).
ANALYSES_SECTION = "analyses/summary.md"


@dataclass(frozen=True)
class AnalysisOptions:
    """Settings of the analysis stage (``None``: take it from the run's configuration).

    See :func:`raretoken.analyses.run_analyses` for each.
    """

    n_random: int | None = None
    seed: int | None = None
    routing: bool = True
    weight_name: str = "out"
    coordination_positions: str = "all"
    impact_positions: str = "all"
    fallback_k: int | None = None
    tau: float = 0.95
    mi_bins: int | None = None
    robustness: bool = False
    percentiles: tuple[float, ...] = (5.0, 10.0, 15.0, 20.0, 25.0)
    definitions: tuple[str, ...] = ("plateau", "topk", "selective")

    def resolved(self, ident: Identification) -> AnalysisOptions:
        """The options with the run's defaults filled in."""
        return self.resolved_for(ident.config)

    def resolved_for(self, cfg: RunConfig) -> AnalysisOptions:
        """The options with the defaults of the run configuration ``cfg`` filled in."""
        return AnalysisOptions(
            **{
                **asdict(self),
                "n_random": cfg.n_random_groups if self.n_random is None else self.n_random,
                "seed": cfg.seed if self.seed is None else self.seed,
                "percentiles": tuple(float(p) for p in self.percentiles),
                "definitions": tuple(self.definitions),
            }
        )


def analyses_key(ident: Identification, opts: AnalysisOptions) -> str:
    """Cache key of the analyses: the identification's inputs and the analysis settings."""
    return cache_key(
        "analyses",
        {
            "version": ANALYSES_VERSION,
            "identification": ident.keys,
            "percentile": ident.config.percentile,
            "options": asdict(opts),
        },
    )


def _load_cached(cache: ArrayCache, key: str) -> AnalysisSuite | None:
    from ..analyses import AnalysisSuite

    data = cache.load_json("analyses", key)
    if data is None:
        return None
    try:
        return AnalysisSuite.from_dict(data)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        cache.discard("analyses", key, f"does not describe an analysis suite ({exc})")
        return None


def _save_cached(cache: ArrayCache, key: str, suite: AnalysisSuite) -> None:
    from ..analyses._tables import jsonable

    cache.save_json("analyses", key, jsonable(suite.to_dict()))


def analyze(
    ident: Identification,
    options: AnalysisOptions | None = None,
    *,
    cache_dir: Path | str | None = None,
    no_cache: bool = False,
    progress: bool = True,
) -> AnalysisSuite:
    """Run (or load from the cache) the four analyses and write them into the run directory.

    The manifest says ``running`` (stage ``analyses``) while they run, ``complete`` once their
    files are written, and ``failed``/``interrupted`` if they stop; files of an earlier
    analysis run that this one does not produce (e.g. routing with ``routing=False``) are
    removed.
    """
    from ..analyses import run_analyses, write_analyses

    opts = (options or AnalysisOptions()).resolved(ident)
    cache = open_cache(cache_dir, no_cache)
    key = analyses_key(ident, opts)
    run = RunDirectory.open_existing(ident.run_dir, ident.config.to_dict())
    t0 = time.perf_counter()
    run.begin("analyses")
    try:
        checkpoint("analyses")
        suite = _load_cached(cache, key)
        cached = suite is not None
        if suite is None:
            suite = run_analyses(
                ident,
                n_random=opts.n_random,
                seed=opts.seed,
                progress=progress,
                routing=opts.routing,
                weight_name=opts.weight_name,
                coordination_positions=opts.coordination_positions,
                impact_positions=opts.impact_positions,
                fallback_k=opts.fallback_k,
                tau=opts.tau,
                mi_bins=opts.mi_bins,
                robustness=opts.robustness,
                percentiles=opts.percentiles,
                definitions=opts.definitions,
            )
            _save_cached(cache, key, suite)
        else:
            log.info("analyses: reusing the cached result")

        written = write_analyses(suite, ident.run_dir)
        atomic_write_text(ident.run_dir / ANALYSES_SECTION, analyses_summary(suite))
        written[ANALYSES_SECTION] = "the analyses' section of summary.md (claim verdicts)"
        checkpoint("analyses-written")
        run.replace_outputs("analyses:", written)
        write_summary(ident.run_dir, also=("analyses",))
    except BaseException as exc:
        run.stop("analyses", exc)
        raise
    run.end(
        "analyses",
        "complete",
        seconds=round(time.perf_counter() - t0, 3),
        key=key,
        cached=cached,
        options=asdict(opts),
        group={"name": suite.group.name, "size": suite.group.size, "note": suite.group.note},
    )
    from .layers import refresh_after_analyses  # the per-layer stage reads these analyses

    refresh_after_analyses(ident.run_dir, key, cache_dir=cache_dir, no_cache=no_cache,
                           progress=progress)  # fmt: skip
    return suite


def analyses_summary(suite: AnalysisSuite) -> str:
    """The claim verdicts as a section of ``summary.md``."""
    lines = [
        "## Organisation of the rare-token neurons (§4.2–4.5)",
        "",
        f"Each test compares the group with {suite.n_random} size-matched random groups of the "
        f"same layer (seed {suite.seed}).",
        "",
        suite.claims.to_markdown().strip(),
        "",
        "Tables and tests: `analyses/report.md`; figures: "
        + ", ".join(f"`figures/{stem}.png`" for stem in _figure_stems(suite))
        + ".",
        "",
    ]
    return "\n".join(lines)


def _figure_stems(suite: AnalysisSuite) -> list[str]:
    """The analysis figures :func:`raretoken.analyses.write_analyses` writes for ``suite``."""
    optional = {
        "routing": suite.routing,
        "group_ablation": suite.group_ablation,
        "frequency_neurons": suite.frequency,
        "specificity": suite.specificity,
        "robustness": suite.robustness,
    }
    stems = ["coordination", "spatial", "spectra"]
    return stems + [stem for stem, res in optional.items() if res is not None]


def config_of_run_dir(run_dir: Path | str) -> dict[str, Any]:
    """The configuration recorded in a run directory's manifest."""
    mf = Path(run_dir) / MANIFEST
    if not mf.exists():
        raise RunDirectoryError(f"{run_dir} is not a raretoken run directory (no {MANIFEST})")
    try:
        manifest = json.loads(mf.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise RunDirectoryError(f"cannot read {mf}: {exc}") from exc
    if manifest.get("schema_version") != MANIFEST_SCHEMA:
        raise RunDirectoryError(
            f"{run_dir} was written by an older raretoken (schema "
            f"{manifest.get('schema_version')}, this one reads {MANIFEST_SCHEMA}); rerun "
            "`raretoken run` with --overwrite"
        )
    cfg = manifest.get("config")
    if not isinstance(cfg, dict):
        raise RunDirectoryError(f"{mf} records no configuration")
    return cfg


def analyze_run_dir(
    run_dir: Path | str,
    options: AnalysisOptions | None = None,
    *,
    cache_dir: Path | str | None = None,
    no_cache: bool = False,
    progress: bool = True,
) -> AnalysisSuite:
    """Run the analyses on an existing run directory (identification comes from the cache)."""
    from .config import RunConfig
    from .identification import identify

    try:
        cfg = RunConfig(**config_of_run_dir(run_dir))
    except TypeError as exc:
        raise RunDirectoryError(
            f"{run_dir}: its manifest's configuration is unreadable ({exc})"
        ) from exc
    ident = identify(cfg, run_dir, cache_dir=cache_dir, no_cache=no_cache, progress=progress)
    return analyze(ident, options, cache_dir=cache_dir, no_cache=no_cache, progress=progress)
