"""The paper's four organisational claims, judged on one run's analyses.

One row per claim, with what this run found, the p-value of the deciding test and a plain
verdict. Verdict rules (``α = 0.05`` by default):

* **Coordination** (§4.2, Table 1: rare-token neurons have a lower ``d_eff / N`` than
  random) and **heavier tails** (§4.5, Figure 2: lower ``α_Hill`` than random) are
  *difference* claims, tested one-sided against the random groups:
  ``supported`` when ``p < α``; ``not supported`` when the group lies on the other side of
  the random mean (or on it); ``inconclusive`` otherwise (right direction, not significant).
* **No spatial clustering** (§4.3, Table 3: ``Q`` not significantly higher than random) is a
  *null* claim: ``not supported`` when ``Q`` is significantly higher (one-sided ``p < α``),
  else ``supported``.
* **No dedicated routing** (§4.4, Table 2) combines two findings:
  (a) attention concentration at rare- and common-target positions is similar — the paired
  t-test across heads is not significant (``p >= α``) and the per-head means are strongly
  rank-correlated (Spearman ``ρ >= min_rho``, 0.5 by default, with ``p < α``);
  (b) ablating a whole layer changes the group's activations more than even the most
  influential single head of that layer (paired ``p < α``, layer larger).
  ``supported`` when (a) and (b) hold; ``not supported`` when the Gini differs
  significantly with a weak correlation (``ρ < min_rho``), or when the largest single head
  matches or exceeds the whole layer; ``inconclusive`` otherwise. The comparison of heads
  chosen by influence with random heads is reported in the finding but does not enter the
  verdict (the paper reports them "statistically comparable", but some heads mattering more
  than others is expected under either hypothesis). The p-value column holds the paired
  Gini test.

Two reviewer checks come first when the run has them (rules in
:mod:`raretoken.analyses.specificity`): are the neurons rare-*specific* rather than important
for every token, and does the plateau replicate on a disjoint half of the windows.

Each group-vs-random claim (coordination, spatial, spectra) is also judged, with the same
rule, against random groups matched to the group on output-weight norm and mean |activation|
(:mod:`raretoken.analyses.matched`): ``verdict_matched``; the finding says when a verdict
changes under matching.

With fewer than ``1/α - 1`` random groups no empirical p-value can fall below ``α``; such
rows are ``inconclusive`` whatever the data.

Multiple testing: ``p_bh`` is the Benjamini–Hochberg adjusted p-value of each row's test
across all the rows of the table that have one (the run's tests). Verdicts follow the raw
p-value, as the paper's; a ``supported`` difference claim whose adjusted p-value is not below
``α`` says so in its finding.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from raretoken.stats.baselines import BaselineComparison
from raretoken.stats.routing import benjamini_hochberg

from ._tables import markdown_table, opt_float, write_csv
from .coordination import CoordinationResult
from .frequency import FrequencyNeuronResult, frequency_claim
from .group_ablation import GroupAblationResult, group_ablation_claim
from .matched import MatchedControls
from .routing import RoutingResult
from .spatial import SpatialResult
from .specificity import SpecificityResult
from .spectra import SpectraResult

SUPPORTED = "supported"
NOT_SUPPORTED = "not supported"
INCONCLUSIVE = "inconclusive"

__all__ = [
    "INCONCLUSIVE",
    "NOT_SUPPORTED",
    "SUPPORTED",
    "Claim",
    "ClaimsTable",
    "evaluate_claims",
]


@dataclass(frozen=True)
class Claim:
    """One claim of the paper and this run's verdict on it."""

    key: str
    claim: str
    prediction: str
    finding: str
    test: str
    p_value: float | None
    verdict: str
    #: The same rule against covariate-matched random groups (``None``: not assessed).
    verdict_matched: str | None = None
    #: Benjamini–Hochberg adjusted p-value across the table's tests (``None``: no test).
    p_bh: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "claim": self.claim,
            "prediction": self.prediction,
            "finding": self.finding,
            "test": self.test,
            "p_value": opt_float(self.p_value),
            "p_bh": opt_float(self.p_bh),
            "verdict": self.verdict,
            "verdict_matched": self.verdict_matched,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Claim:
        p = d.get("p_value")
        q = d.get("p_bh")
        return cls(
            key=str(d["key"]),
            claim=str(d["claim"]),
            prediction=str(d["prediction"]),
            finding=str(d["finding"]),
            test=str(d["test"]),
            p_value=None if p is None else float(p),
            verdict=str(d["verdict"]),
            verdict_matched=d.get("verdict_matched"),
            p_bh=None if q is None else float(q),
        )


@dataclass(frozen=True)
class ClaimsTable:
    """The four claims (rows) with the group they were judged on."""

    claims: tuple[Claim, ...]
    group_name: str
    group_note: str
    alpha: float

    def verdict(self, key: str) -> str:
        for c in self.claims:
            if c.key == key:
                return c.verdict
        raise KeyError(key)

    def to_table(self) -> list[dict[str, Any]]:
        return [c.to_dict() for c in self.claims]

    def to_markdown(self) -> str:
        note = f" ({self.group_note})" if self.group_note else ""
        head = (
            "## The paper's claims on this run\n\n"
            f"Group analysed: {self.group_name}{note}. Verdicts at α = {self.alpha:g}; "
            "the rules are in raretoken.analyses.claims. `p_bh`: Benjamini–Hochberg "
            "adjusted across the table's tests.\n\n"
        )
        cols = ["claim", "prediction", "finding", "test", "p_value", "p_bh", "verdict"]
        if any(c.verdict_matched is not None for c in self.claims):
            cols.append("verdict_matched")
            head += (
                "`verdict_matched`: the same rule against random groups matched to the group "
                "on output-weight norm and mean |activation|.\n\n"
            )
        return head + markdown_table(self.to_table(), cols)

    def to_csv(self, path: Path | str) -> None:
        write_csv(path, self.to_table())

    def to_dict(self) -> dict[str, Any]:
        return {
            "claims": [c.to_dict() for c in self.claims],
            "group_name": self.group_name,
            "group_note": self.group_note,
            "alpha": self.alpha,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ClaimsTable:
        return cls(
            claims=tuple(Claim.from_dict(c) for c in d["claims"]),
            group_name=str(d["group_name"]),
            group_note=str(d["group_note"]),
            alpha=float(d["alpha"]),
        )


def _resolvable(cmp: BaselineComparison, alpha: float) -> bool:
    return 1.0 / (cmp.n_draws + 1.0) < alpha


def _difference_verdict(cmp: BaselineComparison, alpha: float) -> str:
    if not _resolvable(cmp, alpha):
        return INCONCLUSIVE
    if cmp.p_value < alpha:
        return SUPPORTED
    wrong = (
        cmp.observed >= cmp.random_mean
        if cmp.alternative == "less"
        else (cmp.observed <= cmp.random_mean)
    )
    return NOT_SUPPORTED if wrong else INCONCLUSIVE


def _null_verdict(q: BaselineComparison, alpha: float) -> str:
    if not _resolvable(q, alpha):
        return INCONCLUSIVE
    return NOT_SUPPORTED if q.p_value < alpha else SUPPORTED


def _with_matched(
    claim: Claim, matched: MatchedControls | None, alpha: float, *, null: bool = False
) -> Claim:
    """``claim`` with its verdict against matched controls and what that changes."""
    if matched is None:
        return claim
    m = matched.comparison(claim.key)
    if m is None:
        why = matched.errors.get(claim.key, "not computed")
        return replace(claim, finding=f"{claim.finding}; matched controls: {why}",
                       verdict_matched=INCONCLUSIVE)  # fmt: skip
    vm = _null_verdict(m, alpha) if null else _difference_verdict(m, alpha)
    finding = (
        f"{claim.finding}; vs matched controls {m.observed:.3g} vs {m.random_mean:.3g} ± "
        f"{m.random_sd:.3g} (p={m.p_value:.3g})"
    )
    if claim.verdict == SUPPORTED and vm != SUPPORTED:
        finding += " — the finding disappears against matched controls"
    elif claim.verdict != SUPPORTED and vm == SUPPORTED:
        finding += " — supported only against matched controls"
    return replace(claim, finding=finding, verdict_matched=vm)


def _vs(cmp: BaselineComparison, digits: int = 3) -> str:
    return (
        f"{cmp.observed:.{digits}g} vs random {cmp.random_mean:.{digits}g} ± "
        f"{cmp.random_sd:.{digits}g} (n={cmp.n_draws}, z={cmp.z_score:+.2f})"
    )


def _coordination(res: CoordinationResult, alpha: float) -> Claim:
    c = res.comparison
    return Claim(
        key="coordination",
        claim="Rare-token neurons activate in a coordinated way (§4.2, Table 1)",
        prediction="d_eff/N lower than size-matched random groups",
        finding=f"d_eff/N {_vs(c)}",
        test="empirical p, random groups, one-sided (less)",
        p_value=c.p_value,
        verdict=_difference_verdict(c, alpha),
    )


def _spatial(res: SpatialResult, alpha: float) -> Claim:
    q, s = res.q_comparison, res.size_comparison
    if not _resolvable(q, alpha):
        verdict = INCONCLUSIVE
    else:
        verdict = NOT_SUPPORTED if q.p_value < alpha else SUPPORTED
    return Claim(
        key="spatial",
        claim="Rare-token neurons are distributed, not clustered into modules (§4.3, Table 3)",
        prediction="Louvain modularity Q not significantly higher than random groups",
        finding=(f"Q {_vs(q)}; mean community size {s.observed:.3g} vs random {s.random_mean:.3g}"),
        test="empirical p, random groups, one-sided (greater)",
        p_value=q.p_value,
        verdict=verdict,
    )


def _routing(res: RoutingResult | None, alpha: float, min_rho: float) -> Claim:
    claim = "Rare tokens reach the neurons through standard attention, no dedicated routing (§4.4)"
    prediction = (
        "similar attention Gini for rare and common targets with high Spearman ρ across heads; "
        "single-head ablations weaker than whole-layer ablations"
    )
    test = "paired t-test across heads (Gini rare vs common)"
    if res is None:
        return Claim("routing", claim, prediction, "not run (no model)", test, None, INCONCLUSIVE)
    g, t, s = res.gini, res.top_vs_random, res.single_vs_layer
    p_g, rho, p_rho = g.paired_p, g.spearman_rho, g.spearman_p
    finite = math.isfinite(p_g) and math.isfinite(rho) and math.isfinite(p_rho)
    similar = finite and p_g >= alpha and rho >= min_rho and p_rho < alpha
    differs = finite and p_g < alpha and rho < min_rho
    layer_wins = s.mean_difference < 0 and s.p_permutation < alpha
    single_wins = s.mean_difference >= 0
    if similar and layer_wins:
        verdict = SUPPORTED
    elif differs or single_wins:
        verdict = NOT_SUPPORTED
    else:
        verdict = INCONCLUSIVE
    finding = (
        f"Gini rare {g.grand_mean_rare:.3f} ± {g.grand_sd_rare:.3f} vs common "
        f"{g.grand_mean_common:.3f} ± {g.grand_sd_common:.3f} over {g.n_heads} heads, "
        f"Spearman ρ={rho:.2f} (p={p_rho:.2g}), {res.n_heads_differing(alpha)} head(s) differ "
        f"(BH q<{alpha:g}); impact: heads chosen by influence {t.mean_a:.3f} vs random "
        f"{t.mean_b:.3f} (p={t.p_permutation:.2g}), largest single head {s.mean_a:.3f} vs whole "
        f"layer {s.mean_b:.3f} (p={s.p_permutation:.2g}), whole-layer norm change "
        f"{float(res.layer_signed.mean()):+.0%}"
    )
    return Claim("routing", claim, prediction, finding, test, p_g, verdict)


def _spectra(res: SpectraResult, alpha: float) -> Claim:
    c = res.comparison
    return Claim(
        key="spectra",
        claim="Rare-token neurons have heavier-tailed weight spectra (§4.5, Figure 2)",
        prediction="α_Hill (eq. 10) lower than size-matched random groups",
        finding=(
            f"α_Hill {_vs(c)} ({res.weights} weights; α_pdf = 1 + α_Hill = "
            f"{res.observed.alpha_pdf:.3g}){_ks_finding(res)}"
        ),
        test="empirical p, random groups, one-sided (less)",
        p_value=c.p_value,
        verdict=_difference_verdict(c, alpha),
    )


def _ks_finding(res: SpectraResult) -> str:
    """WeightWatcher's density exponent (KS-chosen x_min) next to the paper's Hill tail index."""
    ks = res.observed_ks
    if not ks.fitted:
        return f"; WeightWatcher-style KS fit not possible: {ks.reason}"
    cmp = res.ks_comparison
    vs = "" if cmp is None else f" vs random {cmp.random_mean:.3g} (p={cmp.p_value:.2g})"
    return f"; WeightWatcher-style α_pdf (KS x_min) {ks.alpha_pdf:.3g} ± {ks.alpha_pdf_se:.2g}{vs}"


def _specificity(res: SpecificityResult, alpha: float) -> Claim:
    cmp = res.residual_vs_random
    ov = res.overlap
    frac = res.overlap_fraction
    if frac > 0.5 or cmp.observed <= cmp.random_mean:
        verdict = NOT_SUPPORTED
    elif cmp.p_value < alpha and _resolvable(cmp, alpha):
        verdict = SUPPORTED
    else:
        verdict = INCONCLUSIVE
    return Claim(
        key="specificity",
        claim="The neurons are rare-token neurons, not neurons that matter for every token "
        "(reviewer check)",
        prediction="few of the group among the top common-Δloss neurons; Δloss on rare "
        "targets above what the neurons' common-target Δloss predicts",
        finding=f"{ov['overlap']} of {ov['group_size']} among the top-{ov['k']} common-target "
        f"neurons (random: {ov['expected']:.3g}, p={ov['p_value']:.3g}); mean selectivity "
        f"residual {_vs(cmp)}; Spearman ρ rare vs common Δloss {res.spearman_rho:.2f}",
        test="empirical p, mean selectivity residual vs random groups, one-sided (greater)",
        p_value=opt_float(cmp.p_value),
        verdict=verdict,
    )


def _replication(res: SpecificityResult) -> Claim:
    rep = res.replication
    if not res.full_sample_has_plateau or rep is None:
        verdict = INCONCLUSIVE
    elif rep["replicates"]:
        verdict = SUPPORTED
    else:
        verdict = NOT_SUPPORTED
    p = None if rep is None else rep.get("p_value")
    return Claim(
        key="replication",
        claim="The plateau is a property of the model, found again on independent windows "
        "(reviewer check)",
        prediction="the plateaus of two disjoint halves of the windows overlap well above "
        "random groups of their sizes",
        finding=res.replication_note
        + ("" if res.full_sample_has_plateau else " (the full sample has no plateau)"),
        test="split-half by window; exact hypergeometric p of the overlap; rule in "
        "raretoken.stats.replication",
        p_value=opt_float(p),
        verdict=verdict,
    )


#: Rows whose ``supported`` verdict rests on a p-value below α (difference claims).
_DIFFERENCE_KEYS = frozenset(
    {"coordination", "spectra", "specificity", "replication", "group_ablation"}
)


def with_bh(claims: tuple[Claim, ...], alpha: float) -> tuple[Claim, ...]:
    """``claims`` with ``p_bh``: Benjamini–Hochberg across the rows that have a p-value."""
    ps = [math.nan if c.p_value is None else float(c.p_value) for c in claims]
    qs = benjamini_hochberg(ps)
    out = []
    for c, q in zip(claims, qs, strict=True):
        if not math.isfinite(q):
            out.append(replace(c, p_bh=None))
            continue
        finding = c.finding
        if c.key in _DIFFERENCE_KEYS and c.verdict == SUPPORTED and q >= alpha:
            finding += (
                f" (not significant after Benjamini–Hochberg adjustment across the run's "
                f"{int(np.isfinite(qs).sum())} tests: q={q:.3g})"
            )
        out.append(replace(c, p_bh=float(q), finding=finding))
    return tuple(out)


#: What each reviewer check asks, for the row that says it could not be assessed.
CHECK_CLAIMS: dict[str, str] = {
    "specificity": "The neurons are rare-token neurons, not neurons that matter for every token "
    "(reviewer check)",
    "replication": "The plateau is a property of the model, found again on independent windows "
    "(reviewer check)",
    "frequency_neurons": "The rare-token neurons are not token-frequency neurons (Stolfo et al. "
    "2024; reviewer check)",
    "group_ablation": "Ablated together, the neurons matter for rare targets beyond random "
    "groups (reviewer check: joint ablation)",
}


def _not_assessed(key: str, why: str) -> Claim:
    """The row of a check that could not run on this run, saying why."""
    return Claim(key, CHECK_CLAIMS.get(key, key), "–", f"not assessed: {why}", "–", None,
                 INCONCLUSIVE)  # fmt: skip


def verdicts_of(
    coordination: CoordinationResult | None,
    spatial: SpatialResult | None,
    routing: RoutingResult | None,
    spectra: SpectraResult | None,
    *,
    alpha: float = 0.05,
    min_rho: float = 0.5,
) -> dict[str, str | None]:
    """The verdict of each of the four claims by the rules above (``None``: not run), e.g. for
    every row of the robustness sweep."""
    return {
        "coordination": None
        if coordination is None
        else _coordination(coordination, alpha).verdict,
        "spatial": None if spatial is None else _spatial(spatial, alpha).verdict,
        "routing": None if routing is None else _routing(routing, alpha, min_rho).verdict,
        "spectra": None if spectra is None else _spectra(spectra, alpha).verdict,
    }


def evaluate_claims(
    coordination: CoordinationResult,
    spatial: SpatialResult,
    routing: RoutingResult | None,
    spectra: SpectraResult,
    *,
    specificity: SpecificityResult | None = None,
    matched: MatchedControls | None = None,
    group_ablation: GroupAblationResult | None = None,
    frequency: FrequencyNeuronResult | None = None,
    not_assessed: Mapping[str, str] | None = None,
    group_note: str = "",
    alpha: float = 0.05,
    min_rho: float = 0.5,
) -> ClaimsTable:
    """Judge the four claims (see the module docstring for the rules), and with
    ``specificity`` the two reviewer checks (rules in :mod:`.specificity`).

    ``routing=None`` (no model available) makes the routing row ``inconclusive``. With
    ``matched`` each group-vs-random claim also gets ``verdict_matched``, and its finding says
    when the verdict changes against matched controls.
    """
    extra: tuple[Claim, ...] = ()
    if specificity is not None:
        extra = (_specificity(specificity, alpha), _replication(specificity))
    extra += tuple(_not_assessed(k, why) for k, why in (not_assessed or {}).items())
    if frequency is not None:
        extra += (Claim.from_dict(frequency_claim(frequency)),)
    if group_ablation is not None:
        extra += (Claim.from_dict(group_ablation_claim(group_ablation, alpha)),)
    claims = (
        *extra,
        _with_matched(_coordination(coordination, alpha), matched, alpha),
        _with_matched(_spatial(spatial, alpha), matched, alpha, null=True),
        _routing(routing, alpha, min_rho),
        _with_matched(_spectra(spectra, alpha), matched, alpha),
    )
    return ClaimsTable(
        claims=with_bh(claims, alpha),
        group_name=coordination.group_name,
        group_note=group_note,
        alpha=float(alpha),
    )
