"""Paired comparisons of consecutive checkpoints of a model on the positions both scored.

Runs whose tokenizers have the same content hash (``identity["tokenizer"]["sha256"]`` of the
run manifest) count token frequencies once and sample the same windows, so they score the
*same* positions (window, position, target token). Between two consecutive checkpoints of a
model (ordered by training step; by sweep order when a step is missing) this module compares
the loss of the unablated model on those positions, paired position by position.

What is tested, precisely
-------------------------
Statistic: the mean over the rare-target (and, separately, the common-target) positions of
``base_loss(later) − base_loss(earlier)``, with ``base_loss`` the per-position loss of the
unablated model in ``positions.parquet``. Interval: studentised (bootstrap-t) window-cluster
bootstrap of that mean — windows drawn with replacement, as many as observed, all their
positions taken; the standard error is the linearised one of a ratio estimator, exactly as in
:mod:`raretoken.stats.mean_bootstrap` (which covered 93–97 % from 20 windows in simulations)
but without the clipping at 0, since a difference can be negative.

Why the base loss and not the group's Δloss: a run directory stores Δloss only as per-neuron
means over positions (``neurons.parquet``), not per position, so the group's Δloss cannot be
paired position by position; and the groups of two checkpoints are different neurons.

A pair is compared only when both runs record the same tokenizer sha256 *and* their scored
positions are identical; otherwise its row says why it was not paired (never mixed silently).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from ..analyses._tables import csv_text, fmt, markdown_table
from ..errors import ConfigError, InsufficientDataError
from ..stats._common import require_seed
from ..stats.cluster_bootstrap import multiplicities, nanquantile_columns

log = logging.getLogger(__name__)

_KEYS = ("window", "position", "target_id")
_CLASSES = ("rare", "common")


def paired_mean_difference(
    diff: np.ndarray | Sequence[float],
    windows: np.ndarray | Sequence[int],
    *,
    n_boot: int,
    seed: int | np.random.Generator,
    level: float = 0.95,
) -> tuple[float, float, float, float]:
    """Mean of per-position differences with a studentised window-bootstrap interval.

    Parameters
    ----------
    diff:
        Per-position paired differences (any sign).
    windows:
        Window id of every position (the cluster).
    n_boot, seed, level:
        Resamples, int seed or Generator, confidence level in ``(0, 1)``.

    Returns
    -------
    tuple
        ``(mean, lo, hi, se)``; ``lo == hi == mean`` when every window has the same mean.

    Raises
    ------
    ConfigError
        Mismatched lengths, non-finite values, bad settings.
    InsufficientDataError
        Fewer than 2 windows.
    """
    d = np.asarray(diff, dtype=np.float64)
    w_ids = np.asarray(windows)
    if d.ndim != 1 or w_ids.shape != d.shape:
        raise ConfigError(
            f"diff and windows must be 1-D of one length, got {d.shape}, {w_ids.shape}"
        )
    if not np.all(np.isfinite(d)):
        raise ConfigError("diff holds non-finite values")
    if int(n_boot) < 1 or not 0.0 < float(level) < 1.0:
        raise ConfigError(f"need n_boot >= 1 and level in (0, 1), got {n_boot}, {level}")
    uniq, index = np.unique(w_ids, return_inverse=True)
    n_cl = int(uniq.size)
    if n_cl < 2:
        raise InsufficientDataError(f"a bootstrap over windows needs >= 2 windows, got {n_cl}")
    rng = require_seed(seed, "paired_mean_difference")
    sums = np.bincount(index, weights=d, minlength=n_cl)
    counts = np.bincount(index, minlength=n_cl).astype(np.float64)
    n_total = float(counts.sum())
    mean = float(sums.sum() / n_total)
    resid = sums - mean * counts
    inflate = n_cl / (n_cl - 1)
    se = float(np.sqrt(inflate * (resid * resid).sum()) / n_total)
    if se == 0.0:
        return mean, mean, mean, 0.0
    w = multiplicities(rng, n_cl, int(n_boot))
    den = w @ counts
    delta = (w @ resid) / den
    ss = w @ (resid * resid) - 2.0 * delta * (w @ (resid * counts)) + delta**2 * (w @ counts**2)
    se_b = np.sqrt(inflate * np.maximum(ss, 0.0)) / den
    with np.errstate(divide="ignore", invalid="ignore"):
        t = delta / se_b
    q = nanquantile_columns(t[:, None], [(1.0 - level) / 2.0, (1.0 + level) / 2.0])[:, 0]
    return mean, mean - float(q[1]) * se, mean - float(q[0]) * se, se


@dataclass(frozen=True)
class CheckpointDifference:
    """One paired comparison (or why there is none) of two consecutive checkpoints."""

    model: str
    task_from: str
    task_to: str
    step_from: int | None
    step_to: int | None
    targets: str
    paired: bool
    note: str | None = None
    n_positions: int | None = None
    n_windows: int | None = None
    loss_from: float | None = None
    loss_to: float | None = None
    difference: float | None = None
    lo: float | None = None
    hi: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CheckpointDifference:
        return cls(**dict(d))


@dataclass(frozen=True)
class CheckpointComparisons:
    """Every consecutive-checkpoint comparison of a sweep, with the bootstrap settings."""

    differences: tuple[CheckpointDifference, ...]
    n_boot: int
    seed: int
    level: float

    def to_dict(self) -> dict[str, Any]:
        return {"differences": [x.to_dict() for x in self.differences], "n_boot": self.n_boot,
                "seed": self.seed, "level": self.level}  # fmt: skip

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CheckpointComparisons:
        diffs = tuple(CheckpointDifference.from_dict(x) for x in d["differences"])
        return cls(diffs, int(d["n_boot"]), int(d["seed"]), float(d["level"]))

    def to_rows(self) -> list[dict[str, Any]]:
        return [x.to_dict() for x in self.differences]

    def to_csv_text(self) -> str:
        return csv_text(self.to_rows(), list(CheckpointDifference.__dataclass_fields__))

    def to_markdown(self) -> str:
        pct = f"{100 * self.level:g} %"
        head = (
            "### Paired comparison of consecutive checkpoints\n\n"
            "Mean over the scored rare-target (common-target) positions of the unablated "
            "model's loss at the later checkpoint minus the earlier one (`base_loss` of "
            "`positions.parquet`), paired position by position; "
            f"{pct} studentised window-bootstrap interval ({self.n_boot} resamples, seed "
            f"{self.seed}). Compared only when both runs record the same tokenizer sha256 and "
            "scored the identical positions. The group's Δloss is not compared: run "
            "directories keep it only as per-neuron means, not per position.\n\n"
        )
        if not self.differences:
            return head + "No model has two complete checkpoints.\n"
        rows = []
        for x in self.differences:
            ci = "—" if x.lo is None or x.hi is None else f"[{fmt(x.lo)}, {fmt(x.hi)}]"
            rows.append({
                "Model": x.model, "From": x.task_from, "To": x.task_to, "Targets": x.targets,
                "n": _dash(x.n_positions), "Windows": _dash(x.n_windows),
                "Loss from": _dash(x.loss_from), "Loss to": _dash(x.loss_to),
                "Δ (to − from)": _dash(x.difference), f"{pct} CI": ci,
                "Note": x.note or "",
            })  # fmt: skip
        return head + markdown_table(rows)


def _dash(v: Any) -> str:
    return "—" if v is None else fmt(v)


def model_sequences(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """Complete rows per ``model_label`` (first appearance order), ordered by step when every
    one has a step, else in sweep order."""
    by_model: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        if r.get("status") == "complete":
            by_model.setdefault(str(r["model_label"]), []).append(r)
    for seq in by_model.values():
        if all(r.get("step") is not None for r in seq):
            seq.sort(key=lambda r: int(r["step"]))
    return by_model


def _positions(run_dir: Path, targets: str) -> tuple[np.ndarray, np.ndarray]:
    t = pq.read_table(run_dir / "positions.parquet", columns=[*_KEYS, "class", "base_loss"])
    sel = np.asarray(t.column("class").to_pylist(), dtype=object) == targets
    keys = np.stack([t.column(k).to_numpy()[sel] for k in _KEYS], axis=1).astype(np.int64)
    return keys, t.column("base_loss").to_numpy().astype(np.float64)[sel]


def _short(sha: str) -> str:
    return sha[:12] + "…"


def compare_checkpoints(
    out_dir: Path | str,
    rows: Sequence[Mapping[str, Any]],
    *,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> CheckpointComparisons:
    """Paired base-loss differences between consecutive complete checkpoints of each model.

    ``rows`` are the sweep table's rows (:func:`raretoken.sweep.table.sweep_table`); run
    directories are ``<out_dir>/<row["run_dir"]>``.
    """
    out = Path(out_dir)
    diffs: list[CheckpointDifference] = []
    for model, seq in model_sequences(rows).items():
        for a, b in itertools.pairwise(seq):
            sha_a, sha_b = a.get("tokenizer_sha256"), b.get("tokenizer_sha256")
            reason = None
            if sha_a is None or sha_b is None:
                reason = "not paired: tokenizer sha256 not recorded"
            elif sha_a != sha_b:
                reason = f"not paired: tokenizers differ ({_short(sha_a)} vs {_short(sha_b)})"
            for targets in _CLASSES:
                base: dict[str, Any] = {"model": model, "task_from": str(a["task"]), "task_to": str(b["task"]),
                        "step_from": a.get("step"), "step_to": b.get("step"),
                        "targets": targets}  # fmt: skip
                if reason is not None:
                    diffs.append(CheckpointDifference(**base, paired=False, note=reason))
                    continue
                diffs.append(_compare(out / str(a["run_dir"]), out / str(b["run_dir"]), base,
                                      n_boot=n_boot, seed=seed, level=level))  # fmt: skip
    return CheckpointComparisons(tuple(diffs), int(n_boot), int(seed), float(level))


def _compare(
    dir_a: Path, dir_b: Path, base: dict[str, Any], *, n_boot: int, seed: int, level: float
) -> CheckpointDifference:
    try:
        keys_a, loss_a = _positions(dir_a, base["targets"])
        keys_b, loss_b = _positions(dir_b, base["targets"])
    except (OSError, KeyError, ValueError) as exc:
        return CheckpointDifference(**base, paired=False, note=f"not paired: {exc}")
    if keys_a.shape != keys_b.shape or not np.array_equal(keys_a, keys_b):
        log.warning("%s -> %s: same tokenizer but different scored positions", base["task_from"],
                    base["task_to"])  # fmt: skip
        note = f"not paired: scored positions differ ({len(keys_a)} vs {len(keys_b)})"
        return CheckpointDifference(**base, paired=False, note=note)
    n_windows = int(np.unique(keys_a[:, 0]).size)
    found: dict[str, Any] = {"n_positions": int(loss_a.size), "n_windows": n_windows}
    if loss_a.size == 0:
        return CheckpointDifference(**base, paired=True, note="no positions", **found)
    found |= {"loss_from": float(loss_a.mean()), "loss_to": float(loss_b.mean())}
    try:
        mean, lo, hi, _ = paired_mean_difference(
            loss_b - loss_a, keys_a[:, 0], n_boot=n_boot, seed=seed, level=level
        )
    except InsufficientDataError as exc:
        diff = float((loss_b - loss_a).mean())
        return CheckpointDifference(**base, paired=True, note=f"no interval: {exc}",
                                    difference=diff, **found)  # fmt: skip
    return CheckpointDifference(**base, paired=True, difference=mean, lo=lo, hi=hi, **found)
