"""Identification of rare-token neurons (paper §3.1, §4.1): the Python API behind ``raretoken run``.

>>> from raretoken.run import identify, make_config
>>> result = identify(make_config(preset="demo"), out_dir="raretoken-runs/demo")  # doctest: +SKIP
>>> result.rare_fit.plateau_neurons                                                  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .._faults import checkpoint
from ..data.sampling import ContextSample
from ..data.scoring import ScoringSummary, scoring_summary, uniform_rows
from ..data.split_checks import MIN_RARE_POSITIONS
from ..data.token_stats import FrequencySplit, TokenCounts, split_rare_common
from ..errors import InsufficientDataError, RareTokenError
from ..stats.covariates import NeuronCovariates
from ..stats.mean_bootstrap import mean_interval
from ..stats.regime_bootstrap import window_of_rows
from ..stats.regimes import (
    ColumnSum,
    RegimeBootstrap,
    RegimeFit,
    RowChunks,
    bootstrap_regimes,
    fit_regimes,
)
from ..storage import atomic_write_text
from .config import RunConfig
from .manifest import RunDirectory, now_iso
from .outputs import write_identification
from .stages import Stages, open_cache
from .summary import IDENTIFICATION_SECTION, SUMMARY, write_summary

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class NeuronTable:
    """Per-neuron Δloss of the final MLP layer (eq. 3), one row per neuron id.

    ``delta_rare`` / ``delta_common`` are the mean of ``|L - L̃(i)|`` over the rare / common
    target positions; the ``*_signed`` columns are the mean of ``L̃(i) - L`` (positive: the
    ablation hurts).
    """

    layer: int
    neuron_ids: np.ndarray
    delta_rare: np.ndarray
    delta_rare_signed: np.ndarray
    delta_common: np.ndarray
    delta_common_signed: np.ndarray
    #: 95 % interval of ``delta_rare`` per neuron, bootstrap-t over windows
    #: (:func:`raretoken.stats.mean_bootstrap.mean_interval`), or ``None`` without a bootstrap.
    delta_rare_ci: tuple[np.ndarray, np.ndarray] | None = None
    #: Per-neuron covariates (:mod:`raretoken.stats.covariates`), or ``None`` when they
    #: could not be computed (the reason is logged and in the manifest).
    covariates: NeuronCovariates | None = None


@dataclass(frozen=True, eq=False)
class Identification:
    """Everything the identification stage found, with the arrays the analyses reuse."""

    config: RunConfig
    run_dir: Path
    counts: TokenCounts
    token_strings: np.ndarray
    split: FrequencySplit
    sample: ContextSample
    rare_positions: np.ndarray
    common_positions: np.ndarray
    #: Rows (scored positions) in the uniform sample of positions (every row with
    #: ``scoring="all"``): what statistics over "all positions" read.
    uniform_positions: np.ndarray
    #: The window of every row (for bootstraps by window).
    position_windows: np.ndarray
    scoring: ScoringSummary
    neurons: NeuronTable
    rare_fit: RegimeFit
    common_fit: RegimeFit
    rare_boot: RegimeBootstrap | None
    common_boot: RegimeBootstrap | None
    base_loss: np.ndarray
    resid: np.ndarray
    acts: np.ndarray
    block_input: np.ndarray | None
    delta: np.ndarray
    stages: Stages
    #: The mean activation n̄ each neuron was ablated to (eq. 2), from the reference windows.
    mean_acts: np.ndarray
    #: Cache keys of the stages and the ablation settings: what the analyses' key builds on.
    keys: dict[str, object] = field(default_factory=dict)
    #: Seconds each stage took in this invocation (a stage read from the cache takes ~0).
    stage_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def plateau_neurons(self) -> np.ndarray:
        return self.rare_fit.plateau_neurons


def default_out_dir(cfg: RunConfig) -> Path:
    name = "embedded" if cfg.model == "embedded" else Path(cfg.model.rstrip("/")).name
    return Path("raretoken-runs") / f"{name}-{cfg.preset}"


def prepare_shared(
    cfg: RunConfig, *, cache_dir: Path | str | None = None, progress: bool = False
) -> dict[str, str]:
    """Compute (or find in the cache) the stages a run shares with every run of the same
    tokenizer and corpus — token statistics and context windows — without loading weights.

    A sweep runs this in its driver before dispatching tasks in parallel, so two tasks of one
    tokenizer never count the corpus at the same time. Returns the tokenizer's sha256 and, for
    ``token_statistics`` and ``windows``, ``"computed"`` or ``"reused"``.
    """
    cfg.validate()
    st = Stages(cfg, open_cache(cache_dir, False), progress=progress)
    st.check_inputs()
    counts, _ = st.token_counts()
    split, always = st.splits(counts)
    st.samples(split, always)
    how = {True: "reused", False: "computed"}
    return {
        "tokenizer_sha256": str(st.tokenizer_info.tokenizer["sha256"]),
        "token_statistics": how[st.cached["token_statistics"]],
        "windows": how[st.cached["sampling"]],
    }


def identify(
    cfg: RunConfig,
    out_dir: Path | str | None = None,
    *,
    cache_dir: Path | str | None = None,
    no_cache: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> Identification:
    """Run (or resume from the cache) identification and write its run directory.

    The inputs and the places to write are checked before any work; the run directory is
    written only when identification has finished (see :mod:`.manifest`).
    """
    cfg.validate()
    out = Path(out_dir) if out_dir is not None else default_out_dir(cfg)
    config = cfg.to_dict()
    RunDirectory.preflight(out, config, overwrite=overwrite)
    cache = open_cache(cache_dir, no_cache)
    st = Stages(cfg, cache, progress=progress)
    st.check_inputs()
    t0 = time.perf_counter()
    stages: dict[str, dict[str, object]] = {}

    def timed(name: str, t: float, **info: object) -> None:
        stages[name] = dict(info, seconds=round(time.perf_counter() - t, 3), finished=now_iso())

    checkpoint("token_statistics")
    t = time.perf_counter()
    counts, strings = st.token_counts()
    split = split_rare_common(counts, percentile=cfg.percentile)
    timed(
        "token_statistics",
        t,
        key=st.counts_key(),
        n_tokens=counts.n_tokens,
        cached=st.cached["token_statistics"],
    )

    checkpoint("sampling")
    t = time.perf_counter()
    always = (
        split_rare_common(counts, percentile=cfg.score_percentile, check=False)
        if cfg.scoring == "rare+common"
        else split
    )
    sample, ref, sample_key, ref_key = st.samples(split, always)
    rare_mask, common_mask = split.masks()
    uniform_pos = uniform_rows(sample)
    rare_pos = _scored_index(sample, rare_mask)
    common_pos = np.intersect1d(_scored_index(sample, common_mask), uniform_pos)
    scoring = scoring_summary(sample, always.masks()[0], common_mask)
    timed(
        "sampling",
        t,
        key=sample_key,
        cached=st.cached["sampling"],
        bos=st.bos.to_dict(),
        n_windows=sample.n_windows,
        n_rare_positions=len(rare_pos),
        n_common_positions=len(common_pos),
        scoring=scoring.to_dict(),
    )
    if len(rare_pos) < MIN_RARE_POSITIONS:
        raise InsufficientDataError(
            f"only {len(rare_pos)} rare-target positions in {sample.n_positions} scored tokens "
            f"(the regime fit needs at least {MIN_RARE_POSITIONS}); use --sampling until_rare "
            "with --n-rare, more windows (--n-windows), or a higher --percentile"
        )

    checkpoint("forward")
    t = time.perf_counter()
    cap, cap_key = st.capture(sample, sample_key, reference=False)
    ref_cap, ref_cap_key = st.capture(ref, ref_key, reference=True)
    mean_acts = _column_mean(ref_cap.acts).astype(np.float32)
    timed("forward", t, key=cap_key, reference_key=ref_cap_key)

    checkpoint("ablation")
    t = time.perf_counter()
    delta = st.ablation(cap, mean_acts, cap_key, ref_cap_key)
    timed("ablation", t, method=cfg.method, tol=cfg.tol)

    checkpoint("regimes")
    t = time.perf_counter()
    rows = _chunk_rows(delta)
    neurons = _neuron_table(delta, rare_pos, common_pos, layer=-1, chunk_rows=rows)
    rare_fit = fit_regimes(neurons.delta_rare, neurons.neuron_ids)
    common_fit = fit_regimes(neurons.delta_common, neurons.neuron_ids)
    rare_boot = common_boot = None
    windows = window_of_rows(sample.target_mask)
    if cfg.n_boot > 0:
        # positions of one window are correlated: resample whole windows
        rare_boot = bootstrap_regimes(
            RowChunks(delta, rare_pos, absolute=True, chunk_rows=rows),
            neurons.neuron_ids,
            n_boot=cfg.n_boot,
            seed=cfg.seed,
            clusters=windows[rare_pos],
        )
        common_boot = bootstrap_regimes(
            RowChunks(delta, common_pos, absolute=True, chunk_rows=rows),
            neurons.neuron_ids,
            n_boot=cfg.n_boot,
            seed=cfg.seed + 1,
            clusters=windows[common_pos],
        )
        rare_ci = mean_interval(
            RowChunks(delta, rare_pos, absolute=True, chunk_rows=rows),
            windows[rare_pos],
            cfg.n_boot,
            cfg.seed + 2,
        )
        neurons = dataclasses.replace(neurons, delta_rare_ci=(rare_ci.lo, rare_ci.hi))
    timed("regimes", t, n_boot=cfg.n_boot)

    checkpoint("covariates")
    t = time.perf_counter()
    try:
        covs: NeuronCovariates | None = st.covariates(cap, uniform_pos, counts, cap_key)
        cov_info: dict[str, object] = {"n_positions": len(uniform_pos)}
    except RareTokenError as exc:  # e.g. a constant covariate: reported, not fatal
        log.warning("per-neuron covariates not computed: %s", exc)
        covs, cov_info = None, {"error": str(exc)}
    neurons = dataclasses.replace(neurons, covariates=covs)
    timed("covariates", t, **cov_info)

    result = Identification(
        config=cfg,
        run_dir=out,
        counts=counts,
        token_strings=strings,
        split=split,
        sample=sample,
        rare_positions=rare_pos,
        common_positions=common_pos,
        uniform_positions=uniform_pos,
        position_windows=windows,
        scoring=scoring,
        neurons=neurons,
        rare_fit=rare_fit,
        common_fit=common_fit,
        rare_boot=rare_boot,
        common_boot=common_boot,
        base_loss=cap.base_loss,
        resid=cap.resid,
        acts=cap.acts,
        block_input=cap.block_input,
        delta=delta,
        stages=st,
        mean_acts=mean_acts,
        keys={
            "counts": st.counts_key(),
            "sample": sample_key,
            "capture": cap_key,
            "reference": ref_cap_key,
            "method": cfg.method,
            "tol": cfg.tol,
        },
        stage_seconds={k: float(v["seconds"]) for k, v in stages.items()},  # type: ignore[arg-type]
    )

    def write(run: RunDirectory) -> None:
        write_identification(result, run)
        # summary.md: the identification's section (as write_identification wrote it), then
        # those of the add-on stages that publish carried over from this configuration's run
        (run.path / IDENTIFICATION_SECTION).parent.mkdir(exist_ok=True)
        atomic_write_text(run.path / IDENTIFICATION_SECTION, (run.path / SUMMARY).read_text())
        run.record_output("summary_identification", IDENTIFICATION_SECTION,
                          "the identification's section of summary.md")  # fmt: skip
        write_summary(run.path, stages=run.manifest["stages"])
        checkpoint("publish")

    RunDirectory.publish(
        out,
        config,
        write,
        stages=stages,
        overwrite=overwrite,
        info={
            "identity": {
                "model": st.model_id,
                # token statistics and windows are keyed by the tokenizer's content: runs with
                # the same sha256 (and corpus and settings) scored the same positions
                "tokenizer": st.tokenizer_info.tokenizer,
                "dims": st.dims,
                "corpus": st.context_corpus_id,
                "freq_corpus": st.freq_corpus_id,
                "heldout_split": st.heldout_description,
            },
            "total_seconds": round(time.perf_counter() - t0, 3),
        },
    )
    return result


def _scored_index(sample: ContextSample, vocab_mask: np.ndarray) -> np.ndarray:
    """Indices into the captured (scored) positions whose target is in ``vocab_mask``."""
    targets = sample.target_ids[sample.target_mask]
    return np.flatnonzero(np.asarray(vocab_mask, dtype=bool)[targets])


#: Memory for one chunk of rows (as float64) of the statistics over Δloss and activations,
#: which are read chunk by chunk from their (memory-mapped) arrays.
STAT_CHUNK_BYTES = 16 << 20


def _chunk_rows(x: np.ndarray) -> int:
    """Rows per chunk of the statistics over ``x``'s rows: :data:`STAT_CHUNK_BYTES` of float64."""
    return max(1, STAT_CHUNK_BYTES // (8 * max(1, int(x.shape[1]))))


def _column_mean(x: np.ndarray, chunk_rows: int | None = None) -> np.ndarray:
    """``x.astype(np.float64).mean(0)`` read chunk by chunk (bit for bit the same)."""
    acc = ColumnSum(x.shape[1])
    for _, block in RowChunks(x, chunk_rows=chunk_rows or _chunk_rows(x)):
        acc.add(block)
    return acc.mean()


def _neuron_table(
    delta: np.ndarray,
    rare: np.ndarray,
    common: np.ndarray,
    layer: int,
    *,
    chunk_rows: int | None = None,
) -> NeuronTable:
    """Means of ``|Δ|`` and ``Δ`` over the rare and the common rows of (memory-mapped) ``delta``.

    Read ``chunk_rows`` rows at a time; equal bit for bit to the means over all rows at once
    (see :class:`~raretoken.stats.regimes.ColumnSum`).
    """
    n_neu = int(delta.shape[1])
    chunk_rows = chunk_rows or _chunk_rows(delta)

    def means(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        absolute, signed = ColumnSum(n_neu), ColumnSum(n_neu)
        for _, block in RowChunks(delta, rows, chunk_rows=chunk_rows):
            d = block.astype(np.float64)
            absolute.add(np.abs(d), owned=True)
            signed.add(d, owned=True)
        return absolute.mean(), signed.mean()

    rare_abs, rare_signed = means(rare)
    common_abs, common_signed = means(common)
    return NeuronTable(
        layer=layer,
        neuron_ids=np.arange(n_neu),
        delta_rare=rare_abs,
        delta_rare_signed=rare_signed,
        delta_common=common_abs,
        delta_common_signed=common_signed,
    )
