"""The organisational analyses against covariate-matched controls, next to uniform ones.

A group property that merely follows from the plateau neurons being the large-weight or
large-activation neurons of the layer would pass against uniformly drawn random groups. Here
the coordination (``d_eff / N``), spatial (modularity ``Q``) and spectral (``α_Hill``)
statistics of the group are compared also with random groups *matched* to it on

* ``w_out_norm``: the L2 norm of each neuron's output weights (``w_out`` row), and
* ``act_abs_mean``: its mean absolute activation over the scored positions,

by joint quantile bins (:func:`raretoken.stats.matching.matched_random_groups`, coarsened
exact matching in the spirit of Gurnee et al. 2024's baselines; the balance table says how
well it worked). The same statistic functions run on the matched groups as on the uniform
ones, with the same seeds' streams, so the two comparisons differ only in the controls.
Attention routing compares heads, not neuron groups, and has no matched variant.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from raretoken.errors import InsufficientDataError, RareTokenError
from raretoken.stats.baselines import BaselineComparison
from raretoken.stats.matching import CovariateBalance, matched_random_groups

from ._tables import markdown_table, opt_float, write_csv
from .coordination import coordination_analysis
from .groups import NeuronGroup
from .spatial import spatial_analysis
from .spectra import spectra_analysis

if TYPE_CHECKING:
    from raretoken.run.identification import Identification

logger = logging.getLogger(__name__)

__all__ = ["MATCH_COVARIATES", "MatchedControls", "matched_controls", "matching_covariates"]

#: Covariates the controls are matched on, in priority order.
MATCH_COVARIATES: tuple[str, ...] = ("w_out_norm", "act_abs_mean")
T = TypeVar("T")


def matching_covariates(
    acts: np.ndarray, w_out: np.ndarray, chunk: int = 4096
) -> dict[str, np.ndarray]:
    """``w_out_norm`` (row norms of ``(d_mlp, d)`` ``w_out``) and ``act_abs_mean`` (column
    means of ``|acts|``, ``chunk`` rows at a time so a memory map is never read whole)."""
    total = np.zeros(acts.shape[1], dtype=np.float64)
    for i in range(0, acts.shape[0], chunk):
        total += np.abs(np.asarray(acts[i : i + chunk], dtype=np.float64)).sum(axis=0)
    return {
        "w_out_norm": np.linalg.norm(np.asarray(w_out, dtype=np.float64), axis=1),
        "act_abs_mean": total / max(acts.shape[0], 1),
    }


@dataclass(frozen=True, eq=False)
class MatchedControls:
    """The group's statistics against covariate-matched random groups.

    ``coordination``, ``spatial``, ``spectra`` are the comparisons with the matched groups
    (``None`` when that analysis could not run on them; ``errors`` says why).
    """

    group_name: str
    covariates: tuple[str, ...]
    n_groups: int
    n_coarsened: int
    balance: tuple[CovariateBalance, ...]
    coordination: BaselineComparison | None
    spatial: BaselineComparison | None
    spectra: BaselineComparison | None
    errors: Mapping[str, str] = field(default_factory=dict)

    def comparison(self, key: str) -> BaselineComparison | None:
        """The matched comparison behind claim ``key`` (``None`` for routing)."""
        return {"coordination": self.coordination, "spatial": self.spatial,
                "spectra": self.spectra}.get(key)  # fmt: skip

    def to_table(self) -> list[dict[str, Any]]:
        rows = []
        for name, stat in (("coordination", "d_eff/N"), ("spatial", "modularity Q"),
                           ("spectra", "α_Hill")):  # fmt: skip
            c = self.comparison(name)
            rows.append({
                "analysis": name, "statistic": stat,
                "group": None if c is None else opt_float(c.observed),
                "matched_mean": None if c is None else opt_float(c.random_mean),
                "matched_sd": None if c is None else opt_float(c.random_sd),
                "p_value": None if c is None else opt_float(c.p_value),
                "z": None if c is None else opt_float(c.z_score),
                "note": self.errors.get(name, ""),
            })  # fmt: skip
        return rows

    def balance_rows(self) -> list[dict[str, Any]]:
        return [b.to_dict() for b in self.balance]

    def to_markdown(self) -> str:
        head = (
            f"## The {self.group_name} against covariate-matched random groups\n\n"
            f"{self.n_groups} random groups matched to the group on "
            f"{', '.join(self.covariates)} (joint quantile bins; {self.n_coarsened} member(s) "
            "needed coarser bins). Balance (SMD = standardised mean difference to the group; "
            "near 0 is balanced):\n\n"
        )
        bal = markdown_table(self.balance_rows(),
                             ["name", "group_mean", "matched_mean", "all_mean", "smd_matched",
                              "smd_all"])  # fmt: skip
        cols = ["analysis", "statistic", "group", "matched_mean", "matched_sd", "p_value", "z",
                "note"]  # fmt: skip
        return head + bal + "\n" + markdown_table(self.to_table(), cols)

    def to_csv(self, path: Path | str) -> None:
        write_csv(path, self.to_table())

    def to_dict(self) -> dict[str, Any]:
        def cmp(c: BaselineComparison | None) -> dict[str, Any] | None:
            return None if c is None else c.to_dict()

        return {
            "group_name": self.group_name,
            "covariates": list(self.covariates),
            "n_groups": self.n_groups,
            "n_coarsened": self.n_coarsened,
            "balance": self.balance_rows(),
            "coordination": cmp(self.coordination),
            "spatial": cmp(self.spatial),
            "spectra": cmp(self.spectra),
            "errors": dict(self.errors),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MatchedControls:
        def cmp(key: str) -> BaselineComparison | None:
            return None if d.get(key) is None else BaselineComparison.from_dict(d[key])

        return cls(
            group_name=str(d["group_name"]),
            covariates=tuple(str(c) for c in d["covariates"]),
            n_groups=int(d["n_groups"]),
            n_coarsened=int(d["n_coarsened"]),
            balance=tuple(CovariateBalance.from_dict(b) for b in d["balance"]),
            coordination=cmp("coordination"),
            spatial=cmp("spatial"),
            spectra=cmp("spectra"),
            errors={str(k): str(v) for k, v in d.get("errors", {}).items()},
        )


def matched_controls(
    ident: Identification,
    group: NeuronGroup,
    rows: np.ndarray,
    weights: np.ndarray,
    w_out: np.ndarray,
    *,
    n_random: int,
    seed: int,
    weight_name: str = "out",
    coordination_positions: str = "all",
    tau: float = 0.95,
    mi_bins: int | None = None,
    n_bins: int = 5,
) -> MatchedControls:
    """Coordination, spatial and spectral statistics of ``group`` vs matched random groups.

    ``rows`` are the activation rows of the coordination and spatial analyses, ``weights``
    the spectral analysis' weights, ``w_out`` the output weights (for the covariate).
    """
    covs = matching_covariates(ident.acts[ident.uniform_positions], w_out)
    ss_groups, ss_spatial = np.random.SeedSequence([seed, 1]).spawn(2)
    errors: dict[str, str] = {}
    # a covariate that is constant over the layer cannot be matched on: say so, use the rest
    used = {k: covs[k] for k in MATCH_COVARIATES if np.ptp(covs[k][np.isfinite(covs[k])]) > 0}
    for name in MATCH_COVARIATES:
        if name not in used:
            errors[f"covariate {name}"] = "constant over the layer: not matched on"
    try:
        if not used:
            raise InsufficientDataError("every matching covariate is constant over the layer")
        matched = matched_random_groups(
            group.neuron_ids, used, n_random, seed=np.random.default_rng(ss_groups),
            n_bins=n_bins,
        )  # fmt: skip
    except RareTokenError as err:  # e.g. a group too large to match within the layer
        logger.warning("matched controls not possible: %s", err)
        why = f"matched controls not possible: {err}"
        errors.update({name: why for name in ("coordination", "spatial", "spectra")})
        return MatchedControls(
            group_name=group.name, covariates=tuple(used), n_groups=0, n_coarsened=0,
            balance=(), coordination=None, spatial=None, spectra=None, errors=errors,
        )  # fmt: skip
    groups = np.sort(matched.groups, axis=1)

    def attempt(name: str, fn: Callable[[], T]) -> T | None:
        try:
            return fn()
        except RareTokenError as err:
            logger.warning("matched controls: %s skipped: %s", name, err)
            errors[name] = str(err)
            return None

    coord = attempt("coordination", lambda: coordination_analysis(
        rows, group.neuron_ids, groups, group_name=group.name, threshold=tau,
        positions=coordination_positions,
    ))  # fmt: skip
    spat = attempt("spatial", lambda: spatial_analysis(
        rows, group.neuron_ids, groups, seed=np.random.default_rng(ss_spatial),
        group_name=group.name, bins=mi_bins,
    ))  # fmt: skip
    spec = attempt("spectra", lambda: spectra_analysis(
        weights, group.neuron_ids, groups, group_name=group.name, weight_name=weight_name,
    ))  # fmt: skip
    return MatchedControls(
        group_name=group.name,
        covariates=tuple(used),
        n_groups=int(groups.shape[0]),
        n_coarsened=int(matched.n_coarsened),
        balance=tuple(matched.balance),
        coordination=None if coord is None else coord.comparison,
        spatial=None if spat is None else spat.q_comparison,
        spectra=None if spec is None else spec.comparison,
        errors=errors,
    )
