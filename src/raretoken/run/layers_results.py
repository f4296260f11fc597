"""Per-layer results of :mod:`.layers`: the regime fit of each layer and the values it used.

Built from stored results only (a :class:`~raretoken.ablation.layer.LayerAblation`, or the
run's ``neurons.parquet`` / ``regimes.json`` / ``token_split.json`` for the final layer).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.parquet as pq

from ..ablation.layer import LayerAblation, screen_quality
from ..errors import ConfigError, RareTokenError
from ..stats.regimes import RegimeFit, fit_regimes
from .outputs import read_json

if TYPE_CHECKING:
    from .layers_analyses import LayerAnalyses

log = logging.getLogger(__name__)

__all__ = ["LayerRegime", "LayersResult", "final_layer_regime", "parse_layers",
           "regime_of_ablation"]  # fmt: skip


def parse_layers(spec: str | int | Sequence[int], n_layers: int) -> list[int]:
    """``"all"``, ``"0,3,-1"``, an int or a list of ints -> sorted normalised layer indices.

    Raises :class:`ConfigError` (one line) for an empty list, a non-integer or an index out of
    ``[-n_layers, n_layers)``.
    """
    if isinstance(spec, bool):
        raise ConfigError(f"layers must be 'all' or integers, got {spec!r}")
    if isinstance(spec, str):
        s = spec.strip().lower()
        if s == "all":
            return list(range(n_layers))
        parts = [p.strip() for p in s.split(",")]
        try:
            raw = [int(p) for p in parts]
        except ValueError:
            raise ConfigError(
                f"--layers must be 'all' or a comma-separated list of integers, got {spec!r}"
            ) from None
    elif isinstance(spec, (int, np.integer)):
        raw = [int(spec)]
    else:
        raw = list(spec)
        if any(isinstance(x, bool) or not isinstance(x, (int, np.integer)) for x in raw):
            raise ConfigError(f"layers must be integers, got {spec!r}")
    if not raw:
        raise ConfigError("layers must name at least one layer")
    bad = [x for x in raw if not -n_layers <= x < n_layers]
    if bad:
        raise ConfigError(
            f"layer {bad[0]} is out of range for a model with {n_layers} layers "
            f"(use 0..{n_layers - 1}, negative from the end, or 'all')"
        )
    return sorted({int(x) % n_layers for x in raw})


@dataclass(frozen=True, eq=False)
class LayerRegime:
    """The regime fit of one layer and the values it was made on.

    ``values_kind`` is ``"exact"`` (mean ``|Δloss|`` on rare targets of every neuron) or
    ``"screen"`` (``|screen_rare|``); ``source`` is ``"run"`` for the final layer (the run's
    own closed-form result) and ``"layer_ablation"`` otherwise. ``fit`` is ``None`` when the fit
    failed (``error`` says why).
    """

    layer: int
    source: str
    values_kind: str
    neuron_ids: np.ndarray
    values: np.ndarray
    fit: RegimeFit | None
    error: str | None = None
    ablation: LayerAblation | None = None

    @property
    def n_neurons(self) -> int:
        return int(self.neuron_ids.size)

    @property
    def plateau_size(self) -> int | None:
        return None if self.fit is None else int(self.fit.plateau_size)

    @property
    def kappa(self) -> float | None:
        return None if self.fit is None else float(self.fit.kappa)

    @property
    def has_plateau(self) -> bool | None:
        return None if self.fit is None else bool(self.fit.has_plateau)

    def summary(self) -> dict[str, Any]:
        f = self.fit
        return {
            "values": self.values_kind, "source": self.source, "n_neurons": self.n_neurons,
            "plateau_size": self.plateau_size, "kappa": self.kappa,
            "has_plateau": self.has_plateau,
            "plateau_neurons": None if f is None else f.plateau_neurons.tolist(),
            "r1": None if f is None else f.r1, "r2": None if f is None else f.r2,
            "error": self.error,
        }  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "regime": self.summary(),
            "neuron_ids": self.neuron_ids.tolist(),
            "values": self.values.tolist(),
            "fit": None if self.fit is None else self.fit.to_dict(),
            "ablation": None if self.ablation is None else self.ablation.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerRegime:
        reg = d["regime"]
        return cls(
            layer=int(d["layer"]),
            source=str(reg["source"]),
            values_kind=str(reg["values"]),
            neuron_ids=np.asarray(d["neuron_ids"], dtype=np.int64),
            values=np.asarray(d["values"], dtype=np.float64),
            fit=None if d["fit"] is None else RegimeFit.from_dict(d["fit"]),
            error=reg.get("error"),
            ablation=None if d["ablation"] is None else LayerAblation.from_dict(d["ablation"]),
        )


@dataclass(frozen=True, eq=False)
class LayersResult:
    """The per-layer stage of one run: one :class:`LayerRegime` per requested layer."""

    run_dir: Path
    layers: tuple[LayerRegime, ...]
    settings: dict[str, Any]
    #: relpath -> description of every file written
    written: dict[str, str]
    #: layers whose ablation came from the cache (the final layer never counts)
    cached_layers: tuple[int, ...] = ()
    #: the four analyses per layer (:mod:`.layers_analyses`), when run
    analyses: tuple[LayerAnalyses, ...] = ()
    #: layers whose analyses came from the cache (the run's own final layer never counts)
    cached_analyses: tuple[int, ...] = ()

    def by_layer(self, layer: int) -> LayerRegime:
        for r in self.layers:
            if r.layer == layer:
                return r
        raise KeyError(layer)

    def analyses_of(self, layer: int) -> LayerAnalyses:
        for a in self.analyses:
            if a.layer == layer:
                return a
        raise KeyError(layer)


def _fit(values: np.ndarray, ids: np.ndarray, layer: int) -> tuple[RegimeFit | None, str | None]:
    try:
        return fit_regimes(values, ids), None
    except RareTokenError as exc:  # e.g. too few non-zero values: reported, not fatal
        log.warning("layer %d: no regime fit: %s", layer, exc)
        return None, str(exc).splitlines()[0]


def regime_of_ablation(ab: LayerAblation) -> LayerRegime:
    """Fit on exact ``|Δ|`` when every neuron ran exactly, else on ``|screen_rare|``."""
    ids = np.asarray(ab.neuron_ids, dtype=np.int64)
    if np.array_equal(np.sort(ab.exact_ids), ids):
        values = np.empty(ids.size, dtype=np.float64)
        values[ab.exact_ids] = ab.exact_rare_abs
        kind = "exact"
    else:
        values, kind = np.abs(np.asarray(ab.screen_rare, dtype=np.float64)), "screen"
    fit, err = _fit(values, ids, ab.layer)
    return LayerRegime(ab.layer, "layer_ablation", kind, ids, values, fit, err, ab)


def final_layer_regime(
    run_dir: Path,
    layer: int,
    screen: dict[str, np.ndarray] | None = None,
    quality_k: int = 50,
) -> LayerRegime:
    """The run's own (closed-form, exact) Δloss and fit of the final layer.

    With ``screen`` (``{"rare", "common"}`` of the final layer), its ``ablation`` holds the
    screen and the run's exact Δloss of every neuron, with the screen's quality (no random
    sample: every neuron is exact, so ``spearman_random``/``est_missed`` are NaN).
    """
    fit = RegimeFit.from_dict(read_json(run_dir / "regimes.json")["rare"])
    cols = ["neuron", "delta_rare", "delta_rare_signed", "delta_common", "delta_common_signed"]
    tab = pq.read_table(run_dir / "neurons.parquet", columns=cols)
    c = {n: tab.column(n).to_numpy() for n in cols}
    ids = c["neuron"].astype(np.int64)
    values = c["delta_rare"].astype(np.float64)
    ab = None
    if screen is not None:
        pos = read_json(run_dir / "token_split.json")
        rnd = np.zeros(ids.size, dtype=bool)
        signed = {n: c[f"delta_{n}_signed"].astype(np.float64) for n in ("rare", "common")}
        q = {n: screen_quality(screen[n], ids, signed[n], rnd, quality_k) for n in signed}
        ab = LayerAblation(
            layer=layer, neuron_ids=ids, screen_rare=np.asarray(screen["rare"], np.float64),
            screen_common=np.asarray(screen["common"], np.float64), exact_ids=ids,
            exact_from_random=rnd, exact_rare=signed["rare"], exact_common=signed["common"],
            exact_rare_abs=values, exact_common_abs=c["delta_common"].astype(np.float64),
            n_rare=int(pos["n_rare_positions"]), n_common=int(pos["n_common_positions"]),
            quality_rare=q["rare"], quality_common=q["common"],
            settings={"exact": "closed form (the run's neurons.parquet)", "quality_k": quality_k},
        )  # fmt: skip
    return LayerRegime(layer, "run", "exact", ids, values, fit, None, ab)
