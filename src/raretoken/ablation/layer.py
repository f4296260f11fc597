"""Mean ablation of the neurons of any MLP layer: linear screen, exact pass, screen quality.

Below the final layer the closed form of :mod:`.fast` does not apply (an ablation changes
everything downstream), so :func:`layer_ablation`

1. screens every neuron of the layer at once by attribution patching
   (:func:`~.layer_screen.screen_layers`: one forward and one backward pass per target set),
2. runs the exact mean ablation (:func:`~.layer_exact.exact_layer_delta`: batched forward passes
   from the layer's cached output on) for the screen's ``top_k`` neurons (by ``|screen|`` on
   each ``select_by`` target set) plus a seeded random sample of ``n_random`` of the others,
3. and reports how well the screen ranks the exact effects (:class:`ScreenQuality`).

The random sample is a uniform sample of the neurons outside the screen's top-k, so the
statistics computed on it alone (``spearman_random``, ``est_missed``) are unbiased for the
layer; those over every exactly-run neuron are enriched in large effects by construction.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from scipy import stats

from .._rng import SeedLike, as_generator
from ..errors import ConfigError
from ..models.adapters import ModelAdapter
from .layer_exact import exact_layer_delta
from .layer_inputs import ArrayLike, check_mean_acts, check_rows, check_windows
from .layer_screen import screen_layers

log = logging.getLogger(__name__)

__all__ = ["LayerAblation", "ScreenQuality", "layer_ablation", "screen_quality", "top_by_magnitude"]

TARGET_SETS = ("rare", "common")


def _ro(a: Any, dtype: Any) -> np.ndarray:
    out = np.array(a, dtype=dtype, copy=True)
    out.flags.writeable = False
    return out


def _num(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def top_by_magnitude(values: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` ids of largest ``|values|`` (ties: smaller id first), in that order."""
    order = np.lexsort((ids, -np.abs(values)))
    return ids[order[: max(0, k)]]


@dataclass(frozen=True)
class ScreenQuality:
    """How well the linear screen ranks the exact effects of one target set.

    Attributes
    ----------
    k:
        Size of the exact top set looked for.
    n_exact, n_random:
        Neurons run exactly, and how many of them were drawn at random.
    spearman:
        Spearman correlation of screen and exact signed means over every exactly-run neuron
        (NaN with fewer than three or a constant side).
    spearman_random:
        The same over the random sample only (unbiased for the layer).
    recall:
        Fraction of the exact top-``k`` (by ``|exact|`` among the exactly-run neurons) that is
        in the screen's top-``2k`` (by ``|screen|`` among all neurons of the layer).
    est_missed:
        Estimated number of the layer's neurons outside the screen's top-``2k`` whose
        ``|exact|`` reaches the exact top-``k``'s smallest value: the rate in the random sample
        outside the screen's top-``2k`` times the number of such neurons (NaN when the random
        sample has none there).
    """

    k: int
    n_exact: int
    n_random: int
    spearman: float
    spearman_random: float
    recall: float
    est_missed: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "k": self.k, "n_exact": self.n_exact, "n_random": self.n_random,
            "spearman": _num(self.spearman), "spearman_random": _num(self.spearman_random),
            "recall": _num(self.recall), "est_missed": _num(self.est_missed),
        }  # fmt: skip

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ScreenQuality:
        def f(name: str) -> float:
            v = d[name]
            return math.nan if v is None else float(v)

        return cls(
            k=int(d["k"]), n_exact=int(d["n_exact"]), n_random=int(d["n_random"]),
            spearman=f("spearman"), spearman_random=f("spearman_random"), recall=f("recall"),
            est_missed=f("est_missed"),
        )  # fmt: skip


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return float(stats.spearmanr(x, y).statistic)


def screen_quality(
    screen: np.ndarray,
    exact_ids: np.ndarray,
    exact: np.ndarray,
    from_random: np.ndarray,
    k: int,
) -> ScreenQuality:
    """Compare the screen of every neuron with the exact effects of the exactly-run ones.

    ``screen`` is ``(d_mlp,)`` (indexed by neuron id); ``exact_ids``, ``exact`` and
    ``from_random`` (whether each was drawn at random) are ``(n_exact,)``. ``k`` is capped at
    ``n_exact``.
    """
    screen = np.asarray(screen, dtype=np.float64)
    exact_ids = np.asarray(exact_ids, dtype=np.int64)
    exact = np.asarray(exact, dtype=np.float64)
    rnd = np.asarray(from_random, dtype=bool)
    n_exact = int(exact_ids.size)
    if k < 1:
        raise ConfigError(f"the quality's k must be >= 1, got {k}")
    k = min(k, n_exact)
    sc = screen[exact_ids]
    if k == 0:
        return ScreenQuality(0, 0, 0, math.nan, math.nan, math.nan, math.nan)
    all_ids = np.arange(screen.size)
    top2k = np.zeros(screen.size, dtype=bool)
    top2k[top_by_magnitude(screen, all_ids, 2 * k)] = True
    exact_top = top_by_magnitude(exact, exact_ids, k)
    recall = float(top2k[exact_top].mean())
    thr = np.sort(np.abs(exact))[::-1][k - 1]
    out = rnd & ~top2k[exact_ids]
    n_out = int((~top2k).sum())
    est = float((np.abs(exact[out]) >= thr).mean() * n_out) if out.any() else math.nan
    return ScreenQuality(
        k=k,
        n_exact=n_exact,
        n_random=int(rnd.sum()),
        spearman=_spearman(sc, exact),
        spearman_random=_spearman(sc[rnd], exact[rnd]),
        recall=recall,
        est_missed=est,
    )


@dataclass(frozen=True, eq=False)
class LayerAblation:
    """Screen and exact mean-ablation effects of one MLP layer's neurons (signed ``L̃ - L``).

    Attributes
    ----------
    layer:
        Normalised (non-negative) layer index.
    neuron_ids:
        ``(d_mlp,)`` the layer's neuron ids; the axis of ``screen_rare`` / ``screen_common``.
    screen_rare, screen_common:
        ``(d_mlp,)`` first-order estimate of the mean ``L̃ - L`` over the rare / common target
        positions.
    exact_ids:
        ``(n_exact,)`` neurons run exactly: the screen's top-k (by ``|screen|``) of each
        ``select_by`` set in turn (without repeats), then the random sample in increasing id
        order; the axis of the
        ``exact_*`` arrays.
    exact_from_random:
        ``(n_exact,)`` whether each was drawn at random.
    exact_rare, exact_common:
        ``(n_exact,)`` mean ``L̃ - L`` over the rare / common positions.
    exact_rare_abs, exact_common_abs:
        ``(n_exact,)`` mean ``|L̃ - L|`` (the paper's eq. 3 per neuron).
    quality_rare, quality_common:
        :class:`ScreenQuality` of the screen on each target set.
    exact_delta:
        ``(n_scored, n_exact)`` float32 per-position ``L̃ - L`` when asked for (not part of
        :meth:`to_dict`: save it as an array).
    """

    layer: int
    neuron_ids: np.ndarray
    screen_rare: np.ndarray
    screen_common: np.ndarray
    exact_ids: np.ndarray
    exact_from_random: np.ndarray
    exact_rare: np.ndarray
    exact_common: np.ndarray
    exact_rare_abs: np.ndarray
    exact_common_abs: np.ndarray
    n_rare: int
    n_common: int
    quality_rare: ScreenQuality
    quality_common: ScreenQuality
    settings: dict[str, Any] = field(default_factory=dict)
    exact_delta: np.ndarray | None = None

    _ARRAYS: ClassVar[tuple[tuple[str, Any], ...]] = (
        ("neuron_ids", np.int64), ("screen_rare", np.float64), ("screen_common", np.float64),
        ("exact_ids", np.int64), ("exact_from_random", bool), ("exact_rare", np.float64),
        ("exact_common", np.float64), ("exact_rare_abs", np.float64),
        ("exact_common_abs", np.float64),
    )  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"layer": self.layer, "n_rare": self.n_rare, "n_common": self.n_common}
        for name, _ in self._ARRAYS:
            d[name] = np.asarray(getattr(self, name)).tolist()
        d["quality_rare"] = self.quality_rare.to_dict()
        d["quality_common"] = self.quality_common.to_dict()
        d["settings"] = dict(self.settings)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LayerAblation:
        arrays = {name: _ro(d[name], dt) for name, dt in cls._ARRAYS}
        return cls(
            layer=int(d["layer"]),
            n_rare=int(d["n_rare"]),
            n_common=int(d["n_common"]),
            quality_rare=ScreenQuality.from_dict(d["quality_rare"]),
            quality_common=ScreenQuality.from_dict(d["quality_common"]),
            settings=dict(d.get("settings", {})),
            **arrays,
        )


def _check_count(name: str, v: int, low: int) -> int:
    if isinstance(v, bool) or int(v) != v or v < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {v!r}")
    return int(v)


def layer_ablation(
    adapter: ModelAdapter,
    input_ids: ArrayLike,
    target_mask: ArrayLike,
    layer: int,
    mean_acts: ArrayLike,
    *,
    rare_rows: Sequence[int] | np.ndarray,
    common_rows: Sequence[int] | np.ndarray,
    top_k: int = 100,
    n_random: int = 100,
    seed: SeedLike = 0,
    quality_k: int = 50,
    select_by: Sequence[str] = TARGET_SETS,
    screen: Mapping[str, np.ndarray] | None = None,
    keep_positions: bool = False,
    batch_windows: int = 4,
    max_rows: int = 64,
    progress: Callable[[str, int], None] | None = None,
) -> LayerAblation:
    """Screen every neuron of MLP layer ``layer``, run the exact ablation for a selection, and
    measure the screen's quality.

    Parameters
    ----------
    adapter, input_ids, target_mask:
        Model and windows (see :mod:`.layer_inputs`).
    layer:
        MLP layer (Python index).
    mean_acts:
        ``(d_mlp,)`` n̄ of the layer (e.g. :func:`~.layer_inputs.layer_mean_acts` of the
        reference windows).
    rare_rows, common_rows:
        Scored-position numbers of the rare and the common targets.
    top_k, n_random, seed:
        The screen's top ``top_k`` neurons by ``|screen|`` on each set of ``select_by`` are run
        exactly (the union: at most ``len(select_by) * top_k``), plus ``n_random`` drawn
        (seeded) from the rest. ``top_k >= d_mlp``: every neuron. Select by both sets (the
        default) for both qualities to be meaningful: a set's exact top-k is looked for among
        the neurons run exactly.
    quality_k:
        ``k`` of :class:`ScreenQuality` (capped at the number run exactly).
    screen:
        ``{"rare": (d_mlp,), "common": (d_mlp,)}`` precomputed by
        :func:`~.layer_screen.screen_layers` (e.g. for all layers in one pass); computed here
        when ``None``.
    keep_positions:
        Keep the per-position exact ``L̃ - L`` (``exact_delta``).
    batch_windows, max_rows:
        Batch sizes of the passes (see :func:`~.layer_exact.exact_layer_delta`).
    progress:
        Called with ``("screen", windows)`` and ``("exact", window-neuron pairs)`` as work
        finishes.
    """
    # every input is checked before any model work
    li = adapter.layer_index(layer)
    win = check_windows(adapter, input_ids, target_mask)
    mean = check_mean_acts(adapter, li, mean_acts)
    d_mlp = int(mean.numel())
    rows = {"rare": check_rows(rare_rows, win.n_scored, "rare"),
            "common": check_rows(common_rows, win.n_scored, "common")}  # fmt: skip
    top_k = _check_count("top_k", top_k, 0)
    n_random = _check_count("n_random", n_random, 0)
    quality_k = _check_count("quality_k", quality_k, 1)
    select = [select_by] if isinstance(select_by, str) else list(select_by)
    if not select or any(name not in TARGET_SETS for name in select):
        raise ConfigError(f"select_by must name some of {TARGET_SETS}, got {select_by!r}")
    if top_k + n_random == 0:
        raise ConfigError("top_k + n_random must be >= 1: no neuron would be run exactly")
    rng = as_generator(seed)
    if screen is not None:
        scr = {}
        for name in TARGET_SETS:
            s = np.asarray(screen.get(name, ()), dtype=np.float64)
            if s.shape != (d_mlp,):
                raise ConfigError(f"screen[{name!r}] must have shape ({d_mlp},), got {s.shape}")
            scr[name] = s
    else:
        scr = screen_layers(
            adapter, win.input_ids, win.target_mask, {li: mean}, rows,
            batch_windows=batch_windows,
            progress=None if progress is None else (lambda n: progress("screen", n)),
        )[li]  # fmt: skip

    ids = np.arange(d_mlp)
    tops = [top_by_magnitude(scr[name], ids, top_k) for name in select]
    top = np.concatenate(tops)
    top = top[np.sort(np.unique(top, return_index=True)[1])]  # first occurrences, in order
    rest = np.setdiff1d(ids, top)
    rnd = np.sort(rng.choice(rest, size=min(n_random, rest.size), replace=False))
    exact_ids = np.concatenate([top, rnd]).astype(np.int64)
    from_random = np.concatenate([np.zeros(top.size, bool), np.ones(rnd.size, bool)])
    log.info(
        "layer %d: exact ablation of %d neurons (%d top, %d random)",
        li,
        exact_ids.size,
        top.size,
        rnd.size,
    )
    delta = exact_layer_delta(
        adapter, win.input_ids, win.target_mask, li, mean, exact_ids,
        batch_windows=batch_windows, max_rows=max_rows,
        progress=None if progress is None else (lambda n: progress("exact", n)),
    )  # fmt: skip
    signed = {n: delta[r].mean(0) for n, r in rows.items()}
    absolute = {n: np.abs(delta[r]).mean(0) for n, r in rows.items()}
    quality = {
        n: screen_quality(scr[n], exact_ids, signed[n], from_random, quality_k) for n in TARGET_SETS
    }
    return LayerAblation(
        layer=li,
        neuron_ids=_ro(ids, np.int64),
        screen_rare=_ro(scr["rare"], np.float64),
        screen_common=_ro(scr["common"], np.float64),
        exact_ids=_ro(exact_ids, np.int64),
        exact_from_random=_ro(from_random, bool),
        exact_rare=_ro(signed["rare"], np.float64),
        exact_common=_ro(signed["common"], np.float64),
        exact_rare_abs=_ro(absolute["rare"], np.float64),
        exact_common_abs=_ro(absolute["common"], np.float64),
        n_rare=int(rows["rare"].size),
        n_common=int(rows["common"].size),
        quality_rare=quality["rare"],
        quality_common=quality["common"],
        settings={
            "top_k": top_k,
            "n_random": n_random,
            "seed": seed if isinstance(seed, int) else None,
            "quality_k": quality_k,
            "select_by": select,
        },
        exact_delta=_ro(delta, np.float32) if keep_positions else None,
    )
