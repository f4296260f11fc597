"""``raretoken intervene RUN_DIR``: scale a final-layer neuron group and measure the effect.

>>> from raretoken.intervene import intervene                    # doctest: +SKIP
>>> res = intervene("raretoken-runs/embedded-demo")               # doctest: +SKIP
>>> res.rows[0].d_rare, res.rows[0].p_rare                         # doctest: +SKIP

Conditions: the group's activations scaled by each factor (``a_i ← f · a_i``), mean ablation
(``a_i ← n̄_i``) and, with ``null_fraction`` set, the null-space variant of each factor
(:mod:`.hooks`). Per condition: mean loss at rare-target and at common-target positions (the
run's classes in ``positions.parquet``; common targets from the uniform sample), their change
vs the unhooked model (factor 1), and the mean probability mass on the rare tokens over the
uniform sample of positions, each with a 95 % window-cluster bootstrap interval
(:func:`raretoken.stats.mean_bootstrap.mean_interval`; the values are shifted to be
non-negative first, which leaves the bootstrap-t interval of a mean unchanged up to the shift).
The same conditions on ``n_random`` random groups of the group's size (drawn from the other
neurons; ``random="matched"``: matched on output-weight norm and mean |activation| via
:func:`raretoken.stats.matching.matched_random_groups`) give the null: the random groups' mean
change and an empirical p = (1 + #{random |Δ| ≥ group |Δ|}) / (1 + n_random).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .._rng import as_generator
from ..errors import ConfigError
from ..stats.matching import matched_random_groups
from ..stats.mean_bootstrap import mean_interval
from ..stats.regime_bootstrap import window_of_rows
from .generate import PROMPTS, Generation, MakeContext, generations
from .hooks import (
    frequent_null_projector,
    null_space_projector,
    scale_group,
    scale_group_null,
    scored_metrics,
)
from .loading import RunFiles, check_group, load_windows, read_run, run_group
from .stage import InterventionStage

log = logging.getLogger(__name__)

INTERVENTION_VERSION = 1
N_BOOT = 1000


@dataclass(frozen=True)
class Condition:
    """One intervention: ``kind`` is ``"scale"``, ``"mean"`` or ``"null"`` (null-space scale)."""

    kind: str
    factor: float

    @property
    def label(self) -> str:
        return "mean ablation" if self.kind == "mean" else f"{self.kind} ×{self.factor:g}"


@dataclass(frozen=True)
class ConditionRow:
    """Metrics of one condition on the group, with intervals and the random-group null."""

    kind: str
    factor: float
    rare_loss: float
    rare_loss_ci: tuple[float, float]
    common_loss: float
    common_loss_ci: tuple[float, float]
    d_rare: float
    d_rare_ci: tuple[float, float]
    d_common: float
    d_common_ci: tuple[float, float]
    rare_mass: float
    rare_mass_ci: tuple[float, float]
    d_rare_mass: float
    #: Mean, over the random groups, of their change of rare / common loss and rare mass.
    random_d_rare: float
    random_d_common: float
    random_d_rare_mass: float
    #: 2.5 / 97.5 % quantiles of the random groups' change of rare loss.
    random_d_rare_band: tuple[float, float]
    #: Empirical p of the group's |Δ rare loss| against the random groups'.
    p_rare: float

    @property
    def label(self) -> str:
        return Condition(self.kind, self.factor).label


@dataclass(frozen=True)
class InterventionResult:
    """Everything :func:`intervene` measured, with its provenance."""

    run_dir: str
    group_name: str
    group_ids: tuple[int, ...]
    factors: tuple[float, ...]
    null_fraction: float | None
    null_space: str
    n_random: int
    random: str
    seed: int
    n_boot: int
    base_rare_loss: float
    base_common_loss: float
    base_rare_mass: float
    n_rare_positions: int
    n_common_positions: int
    rows: tuple[ConditionRow, ...]
    random_groups: tuple[tuple[int, ...], ...] = field(default=())
    #: Greedy continuations of fixed prompts, unhooked and at ``generation_factors``.
    generations: tuple[Generation, ...] = field(default=())
    version: int = INTERVENTION_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InterventionResult:
        d = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        rows = tuple(ConditionRow(**_tupled(r)) for r in d.pop("rows"))
        groups = tuple(tuple(g) for g in d.pop("random_groups", ()))
        gens = tuple(Generation(**g) for g in d.pop("generations", ()))
        return cls(
            **_tupled(d),
            rows=rows,
            random_groups=groups,
            generations=gens,
        )


def _tupled(d: dict[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def _no_hook() -> None:
    return None


def check_factors(factors: Sequence[float]) -> tuple[float, ...]:
    """The factors as floats; :class:`ConfigError` when empty, non-finite or negative."""
    try:
        out = tuple(float(f) for f in factors)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"scale factors must be numbers ({exc})") from exc
    if not out:
        raise ConfigError("give at least one scale factor")
    for f in out:
        if not math.isfinite(f) or f < 0:
            raise ConfigError(f"scale factor {f} must be finite and >= 0")
    return out


def _interval(
    x: np.ndarray, windows: np.ndarray, n_boot: int, seed: int
) -> tuple[float, tuple[float, float]]:
    """Mean of ``x`` with a 95 % window-cluster bootstrap-t interval (shift-equivariant)."""
    shift = float(min(0.0, x.min()))
    res = mean_interval((x - shift)[:, None], windows, n_boot, seed)
    return float(res.mean[0]) + shift, (float(res.lo[0]) + shift, float(res.hi[0]) + shift)


def intervene(
    run_dir: Path | str,
    *,
    factors: Sequence[float] = (0.0, 0.5, 1.5, 2.0),
    neurons: Sequence[int] | None = None,
    mean_ablate: bool = True,
    null_fraction: float | None = 0.05,
    null_space: str = "spectrum",
    n_random: int = 20,
    random: str = "size",
    seed: int = 0,
    cache_dir: Path | str | None = None,
    progress: bool = True,
    write: bool = True,
    generation_factors: Sequence[float] = (0.0, 2.0),
    prompts: Sequence[str] = PROMPTS,
    n_tokens: int = 20,
    n_boot: int = N_BOOT,
) -> InterventionResult:
    """Scale the run's neuron group (or ``neurons``) by ``factors`` and measure (module doc).

    Every input is checked before the model is loaded: a :class:`ConfigError` or
    :class:`~raretoken.errors.RunDirectoryError` with one line. ``null_fraction=None`` skips
    the null-space variant. ``write`` writes ``RUN_DIR/interventions/`` (:mod:`.outputs`) and
    records the stage ``interventions`` in the manifest and its section in ``summary.md``
    (:mod:`.stage`).
    """
    facs = check_factors(factors)
    gen_facs = check_factors(generation_factors) if generation_factors else ()
    if n_boot < 1:
        raise ConfigError(f"n_boot must be >= 1, got {n_boot}")
    if n_tokens < 1:
        raise ConfigError(f"n_tokens must be >= 1, got {n_tokens}")
    if n_random < 0:
        raise ConfigError(f"n_random must be >= 0, got {n_random}")
    if random not in ("size", "matched"):
        raise ConfigError(f"random must be 'size' or 'matched', got {random!r}")
    if null_fraction is not None and not (
        math.isfinite(null_fraction) and 0.0 <= null_fraction <= 1.0
    ):
        raise ConfigError(f"null-space fraction must be in [0, 1], got {null_fraction}")
    if null_space not in ("spectrum", "frequent"):
        raise ConfigError(f"null_space must be 'spectrum' or 'frequent', got {null_space!r}")
    files = read_run(run_dir)
    group = check_group(run_group(files) if neurons is None else neurons, files.n_neurons)
    group_name = files.group_name if neurons is None else "given neurons"
    if n_random and files.n_neurons - group.size < group.size:
        raise ConfigError(f"the layer has too few other neurons for random groups of {group.size}")
    rng = as_generator(seed)
    others = np.setdiff1d(np.arange(files.n_neurons), group)
    if random == "matched" and n_random:
        if len(files.covariates) < 2:
            raise ConfigError("the run has no neuron covariates to match random groups on")
        m = matched_random_groups(group, files.covariates, n_random, seed=rng, exclude=group)
        rand = [np.sort(np.asarray(g, dtype=np.int64)) for g in m.groups]
    else:
        rand = [
            np.sort(rng.choice(others, size=group.size, replace=False)) for _ in range(n_random)
        ]

    info = {
        "group": {"name": group_name, "size": int(group.size)},
        "settings": {"factors": list(facs), "mean_ablate": mean_ablate,
                     "null_fraction": null_fraction, "null_space": null_space,
                     "n_random": len(rand), "random": random, "seed": int(seed),
                     "n_boot": int(n_boot), "generation_factors": list(gen_facs),
                     "n_tokens": int(n_tokens)},
    }  # fmt: skip
    with InterventionStage(files.run_dir, info, record=write) as stage:
        result = _measure(
            files, group, group_name, rand, facs, gen_facs, mean_ablate=mean_ablate,
            null_fraction=null_fraction, null_space=null_space, random=random, seed=seed,
            n_boot=n_boot, prompts=prompts, n_tokens=n_tokens, cache_dir=cache_dir,
            progress=progress,
        )  # fmt: skip
        if write:
            from .outputs import write_interventions

            stage.written(write_interventions(result, files.run_dir))
    return result


def _measure(
    files: RunFiles,
    group: np.ndarray,
    group_name: str,
    rand: list[np.ndarray],
    facs: tuple[float, ...],
    gen_facs: tuple[float, ...],
    *,
    mean_ablate: bool,
    null_fraction: float | None,
    null_space: str,
    random: str,
    seed: int,
    n_boot: int,
    prompts: Sequence[str],
    n_tokens: int,
    cache_dir: Path | str | None,
    progress: bool,
) -> InterventionResult:
    """The model work of :func:`intervene` on checked inputs: every condition on the group
    and the random groups, then the generations."""
    win = files.windows
    rare_rows = np.flatnonzero(files.classes == "rare")
    common_rows = np.flatnonzero((files.classes == "common") & files.uniform)
    unif_rows = np.flatnonzero(files.uniform)
    wind = load_windows(files, cache_dir=cache_dir, progress=progress)
    if not np.array_equal(window_of_rows(wind.sample.target_mask), win):
        raise ConfigError("the rebuilt windows do not match positions.parquet")
    lm = wind.stages.loaded
    adapter = lm.adapter
    device = str(next(lm.model.parameters()).device)
    bs = files.config.batch_size

    conds = [Condition("scale", f) for f in facs]
    if mean_ablate:
        conds.append(Condition("mean", 0.0))
    proj = None
    if null_fraction is not None:
        proj = (
            null_space_projector(adapter, null_fraction)
            if null_space == "spectrum"
            else frequent_null_projector(adapter, files.token_counts, null_fraction)
        )
        conds += [Condition("null", f) for f in facs]

    def measure(ids: np.ndarray | None, c: Condition | None) -> tuple[np.ndarray, np.ndarray]:
        if ids is None or c is None:
            return scored_metrics(adapter, wind.sample, files.rare_token_ids,
                                  batch_size=bs, device=device)  # fmt: skip
        if c.kind == "scale":
            ctx = scale_group(adapter, ids, c.factor)
        elif c.kind == "mean":
            ctx = scale_group(adapter, ids, values=wind.mean_acts[ids])
        else:
            assert proj is not None
            ctx = scale_group_null(adapter, ids, c.factor, proj)
        with ctx:
            return scored_metrics(adapter, wind.sample, files.rare_token_ids,
                                  batch_size=bs, device=device)  # fmt: skip

    base_loss, base_mass = measure(None, None)
    rows = []
    bar = tqdm(total=len(conds) * (1 + len(rand)), desc="interventions", disable=not progress)
    for j, c in enumerate(conds):
        loss, mass = measure(group, c)
        bar.update(1)
        dr = loss[rare_rows] - base_loss[rare_rows]
        dc = loss[common_rows] - base_loss[common_rows]
        rnd = np.zeros((len(rand), 3))
        for r, ids in enumerate(rand):
            rl, rm = measure(ids, c)
            bar.update(1)
            rnd[r] = (
                (rl[rare_rows] - base_loss[rare_rows]).mean(),
                (rl[common_rows] - base_loss[common_rows]).mean(),
                (rm[unif_rows] - base_mass[unif_rows]).mean(),
            )
        s = seed + 10 * j
        rare_l, rare_ci = _interval(loss[rare_rows], win[rare_rows], n_boot, s)
        com_l, com_ci = _interval(loss[common_rows], win[common_rows], n_boot, s + 1)
        d_r, d_r_ci = _interval(dr, win[rare_rows], n_boot, s + 2)
        d_c, d_c_ci = _interval(dc, win[common_rows], n_boot, s + 3)
        ms, ms_ci = _interval(mass[unif_rows], win[unif_rows], n_boot, s + 4)
        has_rand = len(rand) > 0
        rows.append(ConditionRow(
            kind=c.kind, factor=c.factor,
            rare_loss=rare_l, rare_loss_ci=rare_ci, common_loss=com_l, common_loss_ci=com_ci,
            d_rare=d_r, d_rare_ci=d_r_ci, d_common=d_c, d_common_ci=d_c_ci,
            rare_mass=ms, rare_mass_ci=ms_ci,
            d_rare_mass=float((mass[unif_rows] - base_mass[unif_rows]).mean()),
            random_d_rare=float(rnd[:, 0].mean()) if has_rand else math.nan,
            random_d_common=float(rnd[:, 1].mean()) if has_rand else math.nan,
            random_d_rare_mass=float(rnd[:, 2].mean()) if has_rand else math.nan,
            random_d_rare_band=(
                (float(np.quantile(rnd[:, 0], 0.025)), float(np.quantile(rnd[:, 0], 0.975)))
                if has_rand else (math.nan, math.nan)
            ),
            p_rare=float((1 + np.sum(np.abs(rnd[:, 0]) >= abs(d_r))) / (1 + len(rand))),
        ))  # fmt: skip
    bar.close()
    gen_conds: list[tuple[str, MakeContext]] = [("unhooked", _no_hook)]
    gen_conds += [
        (Condition("scale", f).label, partial(scale_group, adapter, group, f)) for f in gen_facs
    ]
    gens = (
        generations(adapter, lm.tokenizer, gen_conds, prompts, n_tokens, device)
        if gen_facs and prompts
        else ()
    )
    result = InterventionResult(
        run_dir=str(files.run_dir),
        group_name=group_name,
        group_ids=tuple(int(i) for i in group),
        factors=facs,
        null_fraction=null_fraction,
        null_space=null_space,
        n_random=len(rand),
        random=random,
        seed=int(seed),
        n_boot=int(n_boot),
        base_rare_loss=float(base_loss[rare_rows].mean()),
        base_common_loss=float(base_loss[common_rows].mean()),
        base_rare_mass=float(base_mass[unif_rows].mean()),
        n_rare_positions=int(rare_rows.size),
        n_common_positions=int(common_rows.size),
        rows=tuple(rows),
        random_groups=tuple(tuple(int(i) for i in g) for g in rand),
        generations=gens,
    )
    return result


def parse_factors(text: str) -> tuple[float, ...]:
    """``"0,0.5,1.5,2"`` -> ``(0.0, 0.5, 1.5, 2.0)`` (checked by :func:`check_factors`)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        values = [float(p) for p in parts]
    except ValueError as exc:
        raise ConfigError(f"scale factors must be numbers separated by commas: {text!r}") from exc
    return check_factors(values)


def parse_neurons(text: str) -> tuple[int, ...]:
    """``"1,2,3"`` -> ``(1, 2, 3)``; the range is checked against the run's layer later."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        ids = tuple(int(p) for p in parts)
    except ValueError as exc:
        raise ConfigError(f"neuron ids must be integers separated by commas: {text!r}") from exc
    if not ids:
        raise ConfigError("give at least one neuron id")
    return ids
