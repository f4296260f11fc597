"""Files of a run directory: tables (Parquet/CSV/JSON), figures (PNG/SVG), a summary (Markdown).

Every file is written atomically (temporary file + rename) and registered in the manifest
with a one-line description, so ``manifest.json`` doubles as the index of the run.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from scipy.stats import spearmanr

from ..analyses.groups import default_topk
from ..models.bos import BosChoice
from ..plotting.covariates import CovariatesDisplay
from ..plotting.frequency import FrequencyDisplay
from ..plotting.rank_curve import RankCurveDisplay
from ..storage import atomic_write_bytes, atomic_write_json, atomic_write_text
from .manifest import RunDirectory

if TYPE_CHECKING:
    from .identification import Identification


def write_parquet(path: Path, columns: dict[str, Any]) -> None:
    buf = io.BytesIO()
    pq.write_table(pa.table(columns), buf)
    atomic_write_bytes(path, buf.getvalue())


def write_csv(path: Path, columns: dict[str, Any]) -> None:
    names = list(columns)
    rows = zip(*(np.asarray(columns[n]).tolist() for n in names), strict=True)
    lines = [",".join(names)]
    for row in rows:
        lines.append(",".join(_csv_cell(v) for v in row))
    atomic_write_text(path, "\n".join(lines) + "\n")


def _csv_cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    s = str(v)
    return '"' + s.replace('"', '""') + '"' if ("," in s or '"' in s) else s


def write_identification(res: Identification, run: RunDirectory) -> None:
    out = run.path
    n = res.neurons
    plateau = np.isin(n.neuron_ids, res.rare_fit.plateau_neurons)
    rank_rare = np.empty_like(n.neuron_ids)
    rank_rare[np.argsort(-n.delta_rare, kind="stable")] = np.arange(1, len(n.neuron_ids) + 1)
    rank_common = np.empty_like(n.neuron_ids)
    rank_common[np.argsort(-n.delta_common, kind="stable")] = np.arange(1, len(n.neuron_ids) + 1)
    cols: dict[str, Any] = {
        "neuron": n.neuron_ids,
        "delta_rare": n.delta_rare,
        "delta_rare_signed": n.delta_rare_signed,
        "delta_common": n.delta_common,
        "delta_common_signed": n.delta_common_signed,
        "rank_rare": rank_rare,
        "rank_common": rank_common,
        "plateau": plateau,
    }
    if res.rare_boot is not None:
        cols["plateau_bootstrap_frequency"] = res.rare_boot.membership_frequency
    if n.delta_rare_ci is not None:
        cols["delta_rare_lo"], cols["delta_rare_hi"] = n.delta_rare_ci
    covs = n.covariates.columns() if n.covariates is not None else {}
    cols.update(covs)
    write_parquet(out / "neurons.parquet", cols)
    write_csv(out / "neurons.csv", cols)
    run.record_output("neurons", "neurons.parquet",
                      "per final-layer neuron: Δloss on rare/common targets (mean |ΔL| and signed), "
                      "ranks, plateau membership, covariates (weight norms, activation moments, "
                      "vocabulary-projection kurtosis/skew, unigram cosine, null-space fraction; "
                      "also neurons.csv)")  # fmt: skip
    if covs:
        highlight, label = plateau, "plateau"
        if not plateau.any():  # the group the analyses fall back to
            k = default_topk(n.neuron_ids.size)
            highlight = np.isin(n.neuron_ids, np.argsort(-n.delta_rare, kind="stable")[:k])
            label = f"top-{k} by Δloss (no plateau)"
        CovariatesDisplay.from_columns(n.delta_rare, covs, highlight, label).savefig(
            out / "figures" / "covariates"
        )
        run.record_output("fig_covariates", "figures/covariates.png",
                          "rare-target Δloss of every neuron against each covariate, plateau "
                          "highlighted, Spearman ρ per panel (also .svg)")  # fmt: skip

    targets = res.sample.target_ids[res.sample.target_mask]
    win, pos = np.nonzero(res.sample.target_mask)
    rare_m, common_m = res.split.masks()
    klass = np.where(rare_m[targets], "rare", np.where(common_m[targets], "common", "excluded"))
    uniform = np.zeros(targets.size, dtype=bool)
    uniform[res.uniform_positions] = True
    # common targets outside the uniform sample were scored for being rare at the scoring
    # percentile: they are not a sample of the common targets
    klass = np.where((klass == "common") & ~uniform, "common (not sampled)", klass)
    write_parquet(out / "positions.parquet", {
        "window": win, "position": pos, "target_id": targets,
        "target_token": res.token_strings[targets], "class": klass, "base_loss": res.base_loss,
        "uniform_sample": uniform,
    })  # fmt: skip
    run.record_output("positions", "positions.parquet",
                      "every scored position: window, position, target token, class, base loss, "
                      "whether it belongs to the uniform sample of positions (common-target "
                      "statistics use those)")  # fmt: skip

    counts = np.asarray(res.counts.counts)
    tok_class = np.where(rare_m, "rare", np.where(common_m, "common", "excluded"))
    write_parquet(out / "tokens.parquet", {
        "token_id": np.arange(len(counts)), "token": res.token_strings[: len(counts)],
        "count": counts, "class": tok_class,
    })  # fmt: skip
    run.record_output(
        "tokens", "tokens.parquet", "vocabulary: count in the frequency corpus, class"
    )
    atomic_write_json(out / "token_split.json", {
        "counts": res.counts.to_dict(), "split": res.split.to_dict(include_ids=False),
        "sample": res.sample.to_dict(), "scoring": res.scoring.to_dict(),
        "n_rare_positions": len(res.rare_positions), "n_common_positions": len(res.common_positions),
    })  # fmt: skip
    run.record_output("token_split", "token_split.json",
                      "elbow, rare/common thresholds, sample size and rare/common position counts")  # fmt: skip

    regimes = {
        "rare": res.rare_fit.to_dict(),
        "common": res.common_fit.to_dict(),
        "rare_bootstrap": None if res.rare_boot is None else res.rare_boot.to_dict(),
        "common_bootstrap": None if res.common_boot is None else res.common_boot.to_dict(),
    }
    atomic_write_json(out / "regimes.json", regimes)
    run.record_output("regimes", "regimes.json",
                      "three-regime fits (rare and common) with bootstrap intervals")  # fmt: skip

    fig_dir = out / "figures"
    disp = RankCurveDisplay.from_fits(res.rare_fit, res.common_fit).plot()
    disp.savefig(fig_dir / "rank_curve")
    run.record_output("fig_rank_curve", "figures/rank_curve.png",
                      "Figure 1: log-log rank curve of Δloss, rare and common (also .svg)")  # fmt: skip
    FrequencyDisplay.from_split(res.counts, res.split).plot().savefig(fig_dir / "token_frequency")
    run.record_output("fig_token_frequency", "figures/token_frequency.png",
                      "rank-frequency curve with the elbow and the rare threshold (also .svg)")  # fmt: skip

    summary = identification_summary(res)
    atomic_write_text(out / "summary.md", summary)
    run.record_output("summary", "summary.md", "plain-language findings")


def identification_summary(res: Identification) -> str:
    cfg = res.config
    f = res.rare_fit
    fc = res.common_fit
    sp = res.split
    lines = [
        "# raretoken: rare-token neuron identification",
        "",
        f"Model `{cfg.model}`, corpus `{cfg.corpus}` (preset `{cfg.preset}`, seed {cfg.seed}).",
        "",
        "## Tokens",
        f"- {res.counts.n_tokens:,} tokens counted; elbow at count {sp.elbow.count_threshold:g} "
        f"({sp.n_excluded:,} token types excluded).",
        f"- Rare = the {sp.percentile:g}th percentile of retained types (count ≤ {sp.rare_max_count}): "
        f"{sp.n_rare:,} rare and {sp.n_common:,} common types.",
        *_scoring_lines(res),
        _bos_line(res),
        "",
        "## Final-layer neurons (mean ablation, eq. 2–3)",
    ]
    top = np.argsort(-res.neurons.delta_rare)[:5]
    lines.append(
        "- Largest Δloss on rare targets: "
        + ", ".join(f"#{i} ({res.neurons.delta_rare[i]:.3g})" for i in top)
        + "."
    )
    if f.has_plateau:
        lines.append(
            f"- **A plateau exists**: {f.plateau_size} neurons ({100 * f.plateau_size / f.n_neurons:.1f}% "
            f"of {f.n_neurons}) sit above the power law — these are the rare-token neurons."
        )
    else:
        lines.append(
            f"- **No plateau** was detected in the rare-token rank curve (best model: "
            f"{f.best.n_segments} segment(s))."
        )
    lines.append(f"- Power-law exponent κ = {f.kappa:.3f} (rare); κ = {fc.kappa:.3f} (common).")
    if res.rare_boot is not None:
        lines.append(f"- Rare targets: {_lower_first(res.rare_boot.summary())}")
    if res.common_boot is not None:
        lines.append(f"- Common targets: {_lower_first(res.common_boot.summary())}")
    lines.append(
        f"- Common tokens: {'a plateau' if fc.has_plateau else 'no plateau'} "
        f"({fc.best.n_segments} segment(s))."
    )
    lines += _covariate_lines(res)
    lines += ["", "See `figures/rank_curve.png`, `neurons.parquet` and `manifest.json`.", ""]
    return "\n".join(lines)


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


def _covariate_lines(res: Identification, top: int = 3) -> list[str]:
    """The covariates that rank with rare-target Δloss most strongly (Spearman ρ)."""
    covs = res.neurons.covariates
    if covs is None:
        return ["- Per-neuron covariates: not computed (see the manifest's `covariates` stage)."]
    d = res.neurons.delta_rare
    rho: dict[str, float] = {}
    for name, x in covs.columns().items():
        ok = np.isfinite(x) & np.isfinite(d)
        if ok.sum() > 2 and np.ptp(x[ok]) > 0:
            rho[name] = float(spearmanr(x[ok], d[ok]).statistic)
    best = sorted(rho, key=lambda k: -abs(rho[k]))[:top]
    return [
        "- Per-neuron covariates (`neurons.parquet`, `figures/covariates.png`): rare-target "
        "Δloss ranks most closely with "
        + ", ".join(f"{k} (Spearman ρ {rho[k]:+.2f})" for k in best)
        + "."
    ]


def _bos_line(res: Identification) -> str:
    """The windows' BOS policy and why (``auto``: what the model needs), with its warning."""
    choice = getattr(res.stages, "bos", None)
    if not isinstance(choice, BosChoice) or choice.policy != res.sample.bos_policy:
        # no resolution at hand (or a sample drawn otherwise): say what the windows hold
        policy = res.sample.bos_policy
        return f"- BOS: {'prepended to every window' if policy == 'prepend' else 'none'}."
    line = f"- BOS: {choice.describe()}."
    if choice.warning is not None:
        line += f" **Warning**: {choice.warning}."
    return line


def _scoring_lines(res: Identification) -> list[str]:
    """What was read and scored, and what that cost (issue: score what matters)."""
    sc, sm = res.scoring, res.sample
    read = f"{sm.n_windows:,} windows × {sm.window_len} tokens ({sc.n_window_positions:,} targets)"
    ablation = res.stage_seconds.get("ablation")
    forward = res.stage_seconds.get("forward")
    pairs = sc.n_scored * res.neurons.neuron_ids.size
    cost = f" Ablation: {pairs:,} (position, neuron) pairs."
    if ablation is not None and forward is not None:
        cost += (
            f" In this invocation the forward passes took {forward:.0f} s and the ablation "
            f"{ablation:.0f} s (stages read from the cache take about 0 s)."
        )
    rare = f"**{len(res.rare_positions):,} rare-target positions**"
    if sc.scoring == "all":
        return [
            f"- Read and scored every position of {read}: {rare} and "
            f"{len(res.common_positions):,} common-target positions.{cost}"
        ]
    return [
        f"- Read {read}; scored {sc.n_scored:,} of them ({sc.saving:.1f}× fewer than every "
        f"position): all {rare} (every target rare at the "
        f"{res.config.score_percentile:g}th percentile is scored, {sc.n_always:,} positions) and a "
        f"seeded uniform sample of {sc.n_uniform:,} positions holding "
        f"{len(res.common_positions):,} of the windows' {sc.n_common_available:,} common-target "
        f"positions (`--max-common {sc.max_common}`).{cost}",
    ]


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())
