"""Reading a finished run directory for an intervention, and checking it before any model work.

:func:`read_run` reads only files of the run directory (manifest, ``neurons.parquet``,
``positions.parquet``, ``tokens.parquet``, ``analyses/analyses.json``) and refuses a run that is
not finished or whose model files changed since the run; :func:`load_windows` then reloads the
scored windows and the mean activations n̄ through :class:`raretoken.run.stages.Stages` (read
from the cache when the run's cache is still there) and loads the model.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from ..data.sampling import ContextSample
from ..errors import ConfigError, RunDirectoryError
from ..run.analysis_stage import config_of_run_dir
from ..run.config import RunConfig
from ..run.manifest import MANIFEST
from ..run.stages import Stages, open_cache, spec_identity
from ..stats.chunks import RowChunks
from ..stats.regimes import ColumnSum

log = logging.getLogger(__name__)

#: Statuses of a run directory whose identification has finished.
FINISHED = ("identified", "complete")


@dataclass(frozen=True, eq=False)
class RunFiles:
    """What an intervention reads from a run directory (no model loaded)."""

    run_dir: Path
    config: RunConfig
    #: Neuron ids of the run's analysis group (or plateau; empty without either), ascending,
    #: and its label.
    group_ids: np.ndarray
    group_name: str
    n_neurons: int
    #: Per scored position (rows of the capture): window, class ("rare", "common", ...),
    #: target id, whether it is in the uniform sample of positions.
    windows: np.ndarray
    classes: np.ndarray
    target_ids: np.ndarray
    uniform: np.ndarray
    #: Token ids of the rare class and every token's count (``tokens.parquet``).
    rare_token_ids: np.ndarray
    token_counts: np.ndarray
    #: Per-neuron covariates for matched random groups (name -> values), maybe empty.
    covariates: dict[str, np.ndarray]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise RunDirectoryError(f"cannot read {path}: {exc}") from exc


def read_run(run_dir: Path | str) -> RunFiles:
    """Read and check a run directory; raises a one-line error before any model work.

    Raises
    ------
    RunDirectoryError
        Not a run directory, identification not finished, a file missing or unreadable, or
        the model files changed since the run (its identity differs from the manifest's).
    """
    run = Path(run_dir)
    cfg_dict = config_of_run_dir(run)
    manifest = _read_json(run / MANIFEST)
    status = manifest.get("status")
    if status not in FINISHED:
        raise RunDirectoryError(
            f"{run} is not a finished run (status {status!r}); finish it with `raretoken run`"
        )
    try:
        cfg = RunConfig(**cfg_dict)
    except TypeError as exc:
        raise RunDirectoryError(
            f"{run}: its manifest's configuration is unreadable ({exc})"
        ) from exc
    recorded = (manifest.get("identity") or {}).get("model")
    now = spec_identity(cfg)
    if recorded != now:
        raise RunDirectoryError(
            f"{run} was identified with another model: the files of {cfg.model!r} changed "
            "since the run (identity differs from the manifest's); rerun `raretoken run`"
        )
    for name in ("neurons.parquet", "positions.parquet", "tokens.parquet"):
        if not (run / name).exists():
            raise RunDirectoryError(f"{run} has no {name}: rerun `raretoken run`")
    neurons = pq.read_table(run / "neurons.parquet").to_pydict()
    pos = pq.read_table(run / "positions.parquet").to_pydict()
    tokens = pq.read_table(run / "tokens.parquet").to_pydict()
    n_neurons = len(neurons["neuron"])
    group_ids, group_name = _run_group(run, neurons)
    covs = {
        k: np.asarray(neurons[k], dtype=np.float64)
        for k in ("w_out_norm", "act_abs_mean")
        if k in neurons and neurons[k] and None not in neurons[k]
    }
    return RunFiles(
        run_dir=run,
        config=cfg,
        group_ids=group_ids,
        group_name=group_name,
        n_neurons=n_neurons,
        windows=np.asarray(pos["window"], dtype=np.int64),
        classes=np.asarray(pos["class"]),
        target_ids=np.asarray(pos["target_id"], dtype=np.int64),
        uniform=np.asarray(pos["uniform_sample"], dtype=bool),
        rare_token_ids=np.asarray(tokens["token_id"], dtype=np.int64)[
            np.asarray(tokens["class"]) == "rare"
        ],
        token_counts=np.asarray(tokens["count"], dtype=np.int64),
        covariates=covs,
    )


def _run_group(run: Path, neurons: dict[str, list[Any]]) -> tuple[np.ndarray, str]:
    """The analyses' group (``analyses/analyses.json``), else the run's plateau."""
    path = run / "analyses" / "analyses.json"
    if path.exists():
        group = (_read_json(path).get("main") or {}).get("group") or {}
        ids = group.get("neuron_ids")
        if ids:
            return np.sort(np.asarray(ids, dtype=np.int64)), str(group.get("name", "group"))
    plateau = np.flatnonzero(np.asarray(neurons.get("plateau", []), dtype=bool))
    return plateau.astype(np.int64), "plateau"


def run_group(files: RunFiles) -> np.ndarray:
    """The run's own group (:attr:`RunFiles.group_ids`), or :class:`ConfigError` when it has
    neither an analysis group nor a plateau."""
    if files.group_ids.size == 0:
        raise ConfigError(
            f"{files.run_dir} has no analysis group and an empty plateau: pass the neuron ids "
            "(--neurons) or run the analyses first"
        )
    return files.group_ids


def check_group(ids: Any, n_neurons: int) -> np.ndarray:
    """Sorted unique neuron ids of the final layer, or :class:`ConfigError`."""
    arr = np.asarray(ids)
    if arr.ndim != 1 or arr.size == 0:
        raise ConfigError("the neuron group must be a non-empty list of neuron ids")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ConfigError(f"neuron ids must be integers, got {arr.dtype}")
    bad = arr[(arr < 0) | (arr >= n_neurons)]
    if bad.size:
        raise ConfigError(
            f"neuron id {int(bad[0])} is outside the final MLP layer (0..{n_neurons - 1})"
        )
    if np.unique(arr).size != arr.size:
        raise ConfigError("the neuron group lists a neuron id twice")
    return np.sort(arr.astype(np.int64))


@dataclass(frozen=True, eq=False)
class Windows:
    """The run's scored windows and n̄, reloaded through the run's stages (model loaded)."""

    stages: Stages
    sample: ContextSample
    mean_acts: np.ndarray


def load_windows(
    files: RunFiles, *, cache_dir: Path | str | None = None, progress: bool = True
) -> Windows:
    """Rebuild the run's scored windows and n̄ (cached stages when the run's cache is there).

    Raises :class:`RunDirectoryError` when the rebuilt scored positions are not those of
    ``positions.parquet`` (e.g. the corpus changed since the run).
    """
    cfg = files.config
    st = Stages(cfg, open_cache(cache_dir, False), progress=progress)
    st.check_inputs()
    counts, _ = st.token_counts()
    split, always = st.splits(counts)
    sample, ref, _, ref_key = st.samples(split, always)
    targets = sample.target_ids[sample.target_mask]
    if targets.shape != files.target_ids.shape or not np.array_equal(targets, files.target_ids):
        raise RunDirectoryError(
            f"{files.run_dir}: the rebuilt scored positions differ from positions.parquet "
            "(the corpus or tokenizer changed since the run); rerun `raretoken run`"
        )
    ref_cap, _ = st.capture(ref, ref_key, reference=True)
    acc = ColumnSum(int(ref_cap.acts.shape[1]))
    for _, block in RowChunks(ref_cap.acts, chunk_rows=4096):
        acc.add(block)
    return Windows(stages=st, sample=sample, mean_acts=acc.mean().astype(np.float32))
