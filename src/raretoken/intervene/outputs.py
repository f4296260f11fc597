"""Writing an intervention's tables, figure and provenance into ``RUN_DIR/interventions/``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..analyses._tables import csv_text, markdown_table
from ..run.manifest import git_commit, now_iso, package_versions
from ..storage import atomic_write_json, atomic_write_text

if TYPE_CHECKING:
    from .core import InterventionResult

COLUMNS = (
    "condition", "kind", "factor", "rare_loss", "rare_loss_lo", "rare_loss_hi", "common_loss",
    "common_loss_lo", "common_loss_hi", "d_rare", "d_rare_lo", "d_rare_hi", "d_common",
    "d_common_lo", "d_common_hi", "rare_mass", "rare_mass_lo", "rare_mass_hi", "d_rare_mass",
    "random_d_rare", "random_d_rare_lo", "random_d_rare_hi", "random_d_common",
    "random_d_rare_mass", "p_rare",
)  # fmt: skip


def table_rows(res: InterventionResult) -> list[dict[str, Any]]:
    """One flat row per condition (the columns of ``interventions.csv``)."""
    out = []
    for r in res.rows:
        row: dict[str, Any] = {"condition": r.label, "kind": r.kind, "factor": r.factor}
        for name in ("rare_loss", "common_loss", "d_rare", "d_common", "rare_mass"):
            lo, hi = getattr(r, name + "_ci")
            row.update({name: getattr(r, name), name + "_lo": lo, name + "_hi": hi})
        row["d_rare_mass"] = r.d_rare_mass
        row["random_d_rare"] = r.random_d_rare
        row["random_d_rare_lo"], row["random_d_rare_hi"] = r.random_d_rare_band
        row["random_d_common"] = r.random_d_common
        row["random_d_rare_mass"] = r.random_d_rare_mass
        row["p_rare"] = r.p_rare
        out.append(row)
    return out


def to_markdown(res: InterventionResult) -> str:
    cols = ["condition", "d_rare", "d_rare_lo", "d_rare_hi", "d_common", "d_rare_mass",
            "random_d_rare", "p_rare"]  # fmt: skip
    null = (
        f"; null-space variant: {res.null_space!r} definition, fraction {res.null_fraction:g}"
        if res.null_fraction is not None
        else ""
    )
    return "\n".join([
        f"# Interventions on {res.group_name} ({len(res.group_ids)} neurons)",
        "",
        f"Unhooked: rare-target loss {res.base_rare_loss:.4f} ({res.n_rare_positions} "
        f"positions), common-target loss {res.base_common_loss:.4f} "
        f"({res.n_common_positions}), rare-token mass {res.base_rare_mass:.4g}. "
        f"Δ: change vs the unhooked model, 95 % window-bootstrap interval; random: mean over "
        f"{res.n_random} {res.random}-matched random groups, p: empirical p of |Δ rare|"
        f"{null}.",
        "",
        markdown_table(table_rows(res), cols, digits=4).strip(),
        "",
        *_generation_lines(res),
    ])  # fmt: skip


def _num(v: float, fmt: str = "+.4f") -> str:
    return "–" if not math.isfinite(v) else format(v, fmt)


def summary_section(res: InterventionResult) -> str:
    """The interventions' section of ``summary.md`` (``interventions/summary.md``)."""
    n_rand = (
        f"the mean over {res.n_random} random groups of the same size"
        + (" matched on weight norm and activation" if res.random == "matched" else "")
        if res.n_random
        else "no random groups were drawn"
    )
    kinds = {r.kind for r in res.rows}
    done = ["scaled by each factor"] + [text for kind, text in (
        ("mean", "mean-ablated"),
        ("null", "scaled in the unembedding's near-null space only"),
    ) if kind in kinds]  # fmt: skip
    said = done[0] if len(done) == 1 else ", ".join(done[:-1]) + " and " + done[-1]
    lines = [
        f"## Interventions on the rare-token neurons ({res.group_name}, "
        f"{len(res.group_ids)} neurons)",
        "",
        f"The group's activations were {said}. "
        f"Unhooked: rare-target loss {res.base_rare_loss:.4f} ({res.n_rare_positions} "
        f"positions), common-target loss {res.base_common_loss:.4f} "
        f"({res.n_common_positions}). Δ: change of the mean loss vs the unhooked model "
        f"(95 % window-bootstrap interval); random: {n_rand}; p: empirical p of |Δ rare|.",
        "",
        "| condition | Δ rare loss | 95 % interval | Δ common loss | Δ rare-token mass | "
        "random Δ rare | p |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for r in res.rows:
        lo, hi = r.d_rare_ci
        lines.append(
            f"| {r.label} | {_num(r.d_rare)} | [{_num(lo)}, {_num(hi)}] | {_num(r.d_common)} | "
            f"{_num(r.d_rare_mass, '+.3g')} | {_num(r.random_d_rare)} | "
            f"{_num(r.p_rare, '.3g') if res.n_random else '–'} |"
        )
    lines += [
        "",
        "Tables and greedy generations: `interventions/interventions.md`; figure: "
        "`interventions/interventions.png`.",
        "",
    ]
    return "\n".join(lines)


def _cell(text: str) -> str:
    """Text safe in one Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ⏎ ")


def _generation_lines(res: InterventionResult) -> list[str]:
    if not res.generations:
        return []
    rows = [{"prompt": g.prompt, "condition": g.condition, "continuation": _cell(g.text)}
            for g in res.generations]  # fmt: skip
    return ["## Greedy generations", "",
            markdown_table(rows, ["prompt", "condition", "continuation"]).strip(), ""]  # fmt: skip


def plot(res: InterventionResult, stem: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    from ..plotting._save import save_png_svg

    fig = Figure(figsize=(6.5, 4))
    ax = fig.add_subplot(1, 1, 1)
    for kind, color in (("scale", "C0"), ("null", "C2")):
        rows = sorted((r for r in res.rows if r.kind == kind), key=lambda r: r.factor)
        if not rows:
            continue
        x = [1.0] + [r.factor for r in rows]
        order = sorted(range(len(x)), key=lambda i: x[i])
        xs = [x[i] for i in order]
        y = [0.0] + [r.d_rare for r in rows]
        lo = [0.0] + [r.d_rare_ci[0] for r in rows]
        hi = [0.0] + [r.d_rare_ci[1] for r in rows]
        name = "group" if kind == "scale" else "group, null space only"
        ax.errorbar(xs, [y[i] for i in order],
                    yerr=[[y[i] - lo[i] for i in order], [hi[i] - y[i] for i in order]],
                    color=color, marker="o", capsize=3, label=f"{name}: rare targets")  # fmt: skip
        ax.plot(xs, [([0.0] + [r.d_common for r in rows])[i] for i in order], color=color,
                ls="--", marker="s", label=f"{name}: common targets")  # fmt: skip
        if kind == "scale" and res.n_random and not math.isnan(rows[0].random_d_rare):
            blo = [0.0] + [r.random_d_rare_band[0] for r in rows]
            bhi = [0.0] + [r.random_d_rare_band[1] for r in rows]
            ax.fill_between(xs, [blo[i] for i in order], [bhi[i] for i in order], color="0.7",
                            alpha=0.5, label=f"{res.n_random} random groups (95 % band), rare")  # fmt: skip
    ax.axhline(0.0, color="k", lw=0.5)
    ax.set_xlabel("scale factor of the group's activations")
    ax.set_ylabel("Δ mean loss (nats)")
    ax.set_title(f"Scaling {res.group_name} ({len(res.group_ids)} neurons)")
    ax.legend(fontsize=7)
    save_png_svg(fig, stem)


def write_interventions(res: InterventionResult, run_dir: Path | str) -> dict[str, str]:
    """Write ``interventions/interventions.{csv,md,json,png,svg}`` and the section of
    ``summary.md`` (``interventions/summary.md``); returns path -> description."""
    out = Path(run_dir) / "interventions"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "interventions.csv", csv_text(table_rows(res), COLUMNS))
    atomic_write_text(out / "interventions.md", to_markdown(res))
    atomic_write_json(out / "interventions.json", {
        **res.to_dict(),
        "provenance": {"created": now_iso(), "versions": package_versions(),
                       "git_commit": git_commit()},
    })  # fmt: skip
    plot(res, out / "interventions")
    atomic_write_text(out / "summary.md", summary_section(res))
    return {
        "interventions/summary.md": "the interventions' section of summary.md",
        "interventions/interventions.csv": "loss and rare-token mass per intervention",
        "interventions/interventions.md": "the same as a Markdown table",
        "interventions/interventions.json": "InterventionResult with provenance",
        "interventions/interventions.png": "loss change vs scale factor, group vs random",
        "interventions/interventions.svg": "the same figure as SVG",
    }
