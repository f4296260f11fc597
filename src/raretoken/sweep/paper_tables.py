"""The paper's Tables 1–3 across the runs of a sweep, in the paper's layout (Markdown and CSV).

Rows are the sweep's tasks (``model@revision``) in sweep order; every number comes from the
sweep table (:mod:`raretoken.sweep.table`), itself read from the runs' ``analyses/*.csv``.

* **Table 1** (coordination, §4.2): per task the group, its size N, ``d_eff`` and ``d_eff/N``
  of the group against size-matched random groups (mean ± SD), with the empirical p (one-sided,
  less).
* **Table 2** (attention routing, §4.4): eq.-8 impact of ablating the single head chosen by
  influence ("Single") vs random heads ("Random"), and of the whole layer ("All": eq.-8
  impact; "All, Δnorm": the signed change of the activation norm, the paper's −45 % … −50 %).
  ``*`` marks p < 0.05: on Single the permutation test against random heads, on All the paired
  test of the largest single head against the whole layer.
* **Table 3** (spatial organisation, §4.3): Louvain modularity Q ("Modul.") and mean community
  size ("Comm.") of the group and of random groups (two rows per task); ``*`` marks p < 0.05
  (one-sided, greater).

The group is the plateau when the run found one, otherwise the run's fallback (e.g.
``top-16``): the Group column says which. In Markdown a value a run does not have is "—" (a
failed or missing task, routing not run, ...), never a made-up number; in CSV it is an empty
cell and numbers keep full precision. A task whose model's checkpoints have different
tokenizers is marked "†" (not paired with its other checkpoints).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..analyses._tables import csv_text, fmt, markdown_table

__all__ = ["PaperTable", "paper_tables", "table1", "table2", "table3"]

DASH = "—"
ALPHA = 0.05


@dataclass(frozen=True)
class PaperTable:
    """One table: its Markdown cells and its full-precision CSV rows.

    Attributes
    ----------
    key:
        File stem in ``<sweep>/tables/`` (``table1_coordination``, ...).
    title, caption:
        Heading and the paragraph under it.
    columns, rows:
        Markdown columns and cells (strings; missing values are "—").
    csv_columns, csv_rows:
        CSV columns and values (``None`` for missing).
    """

    key: str
    title: str
    caption: str
    columns: tuple[str, ...]
    rows: tuple[dict[str, str], ...]
    csv_columns: tuple[str, ...]
    csv_rows: tuple[dict[str, Any], ...] = field(default=())

    def to_markdown(self) -> str:
        table = markdown_table(list(self.rows), list(self.columns)) if self.rows else ""
        return f"### {self.title}\n\n{self.caption}\n\n{table or 'No tasks.'}\n"

    def to_csv_text(self) -> str:
        return csv_text(list(self.csv_rows), list(self.csv_columns))

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "title": self.title, "caption": self.caption,
                "columns": list(self.columns), "rows": [dict(r) for r in self.rows],
                "csv_columns": list(self.csv_columns),
                "csv_rows": [dict(r) for r in self.csv_rows]}  # fmt: skip

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PaperTable:
        return cls(key=str(d["key"]), title=str(d["title"]), caption=str(d["caption"]),
                   columns=tuple(d["columns"]), rows=tuple(dict(r) for r in d["rows"]),
                   csv_columns=tuple(d["csv_columns"]),
                   csv_rows=tuple(dict(r) for r in d["csv_rows"]))  # fmt: skip


def cell(v: Any) -> str:
    """A number as the tables show it (3 significant digits), "—" for a missing value."""
    return DASH if v is None else fmt(v)


def _pm(mean: Any, sd: Any) -> str:
    if mean is None:
        return DASH
    return cell(mean) if sd is None else f"{cell(mean)} ± {cell(sd)}"


def _star(value: Any, p: Any) -> str:
    text = cell(value)
    return text + "*" if value is not None and p is not None and p < ALPHA else text


def size_label(n_params: Any) -> str:
    """``124M``, ``1.4B``, "—" when unknown."""
    if n_params is None:
        return DASH
    n = float(n_params)
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(int(n))


def _lead(r: Mapping[str, Any]) -> dict[str, str]:
    """Model, Revision and Size cells; "†" on a model whose checkpoints are not paired."""
    mark = "†" if r.get("tokenizer_paired") is False else ""
    rev = r.get("revision")
    return {"Model": f"{r.get('model_label') or r.get('task')}{mark}",
            "Revision": DASH if rev is None else str(rev), "Size": size_label(r.get("n_params"))}  # fmt: skip


def _note(r: Mapping[str, Any], has: bool, what: str) -> str:
    if r.get("status") != "complete":
        return f"{r.get('status')}" + (f": {r['error']}" if r.get("error") else "")
    return "" if has else f"no {what} in this run"


_CSV_LEAD = ("task", "model_label", "revision", "step", "status", "n_params", "tokenizer_paired")


def _csv_lead(r: Mapping[str, Any]) -> dict[str, Any]:
    return {k: r.get(k) for k in _CSV_LEAD}


def _count(v: Any) -> str:
    return DASH if v is None else str(int(v))


_FOOT = (
    " Rows: the sweep's tasks in order. — : no value (see Note). †: the model's checkpoints "
    "have different tokenizers, so this row is not paired with its other checkpoints."
)


def table1(rows: Sequence[Mapping[str, Any]]) -> PaperTable:
    """Table 1: effective dimensionality d_eff/N of the group vs random groups."""
    md, out = [], []
    for r in rows:
        has = r.get("coordination_group") is not None
        md.append({**_lead(r), "Group": cell(r.get("group")) if has else DASH,
                   "N": _count(r.get("coordination_n_neurons")),
                   "d_eff": _count(r.get("coordination_d_eff")),
                   "d_eff, random": cell(r.get("coordination_random_d_eff_mean")),
                   "Plateau": cell(r.get("coordination_group")),
                   "Random": _pm(r.get("coordination_random_mean"), r.get("coordination_random_sd")),
                   "p": cell(r.get("coordination_p_empirical")),
                   "Note": _note(r, has, "coordination analysis")})  # fmt: skip
        out.append({**_csv_lead(r), "group": r.get("group") if has else None,
                    "n_neurons": r.get("coordination_n_neurons"),
                    "d_eff": r.get("coordination_d_eff"),
                    "d_eff_ratio": r.get("coordination_group"),
                    "random_d_eff_mean": r.get("coordination_random_d_eff_mean"),
                    "random_ratio_mean": r.get("coordination_random_mean"),
                    "random_ratio_sd": r.get("coordination_random_sd"),
                    "p_value_less": r.get("coordination_p_empirical")})  # fmt: skip
    caption = (
        "Effective dimension d_eff (eq. 4) of the group's activations and d_eff/N of the "
        'group ("Plateau": the plateau neurons, or the run\'s fallback group named in Group) '
        "against size-matched random groups (d_eff: mean; d_eff/N: mean ± SD); p: fraction of "
        "random groups with a ratio at most the group's (one-sided, less)." + _FOOT
    )
    return PaperTable(
        "table1_coordination", "Table 1: effective dimensionality across neuron groups", caption,
        ("Model", "Revision", "Size", "Group", "N", "d_eff", "d_eff, random", "Plateau",
         "Random", "p", "Note"),
        tuple(md),
        (*_CSV_LEAD, "group", "n_neurons", "d_eff", "d_eff_ratio", "random_d_eff_mean",
         "random_ratio_mean", "random_ratio_sd", "p_value_less"),
        tuple(out),
    )  # fmt: skip


def table2(rows: Sequence[Mapping[str, Any]]) -> PaperTable:
    """Table 2: head and layer ablation impacts on the group's activations."""
    md, out = [], []
    for r in rows:
        has = r.get("routing_group") is not None or r.get("routing_layer_impact") is not None
        md.append({**_lead(r),
                   "Single": _star(r.get("routing_group"), r.get("routing_p_empirical")),
                   "Random": cell(r.get("routing_random_mean")),
                   "All": _star(r.get("routing_layer_impact"), r.get("routing_p_single_vs_layer")),
                   "All, Δnorm": cell(r.get("routing_layer_change")),
                   "Note": _note(r, has, "routing analysis")})  # fmt: skip
        out.append({**_csv_lead(r), "group": r.get("group") if has else None,
                    "single_top_impact": r.get("routing_group"),
                    "single_random_impact": r.get("routing_random_mean"),
                    "p_top_vs_random": r.get("routing_p_empirical"),
                    "d_top_vs_random": r.get("routing_effect"),
                    "all_heads_impact": r.get("routing_layer_impact"),
                    "all_heads_change": r.get("routing_layer_change"),
                    "max_single_impact": r.get("routing_max_single_impact"),
                    "p_single_vs_layer": r.get("routing_p_single_vs_layer")})  # fmt: skip
    caption = (
        "Impact (eq. 8: relative change of the group's activation vector) of ablating the "
        "single head chosen by influence (Single) vs random heads (Random), and of ablating "
        "every head of a layer (All; All, Δnorm: signed change of the activation norm). "
        "*: p < 0.05 (Single: permutation test against random heads; All: paired test of the "
        "largest single head against the whole layer)." + _FOOT
    )
    return PaperTable(
        "table2_routing", "Table 2: attention ablation effects", caption,
        ("Model", "Revision", "Size", "Single", "Random", "All", "All, Δnorm", "Note"),
        tuple(md),
        (*_CSV_LEAD, "group", "single_top_impact", "single_random_impact", "p_top_vs_random",
         "d_top_vs_random", "all_heads_impact", "all_heads_change", "max_single_impact",
         "p_single_vs_layer"),
        tuple(out),
    )  # fmt: skip


def table3(rows: Sequence[Mapping[str, Any]]) -> PaperTable:
    """Table 3: Louvain modularity Q and mean community size, group and random rows."""
    md, out = [], []
    for r in rows:
        has = r.get("spatial_group") is not None
        note = _note(r, has, "spatial analysis")
        md.append({**_lead(r), "Group": cell(r.get("group")) if has else DASH,
                   "Modul.": _star(r.get("spatial_group"), r.get("spatial_p_empirical")),
                   "Comm.": cell(r.get("spatial_community_size")),
                   "p": cell(r.get("spatial_p_empirical")), "Note": note})  # fmt: skip
        md.append({"Model": "", "Revision": "", "Size": "", "Group": "random" if has else DASH,
                   "Modul.": _pm(r.get("spatial_random_mean"), r.get("spatial_random_sd")),
                   "Comm.": cell(r.get("spatial_random_community_size")), "p": "",
                   "Note": ""})  # fmt: skip
        lead = _csv_lead(r)
        out.append({**lead, "row": "group", "group": r.get("group") if has else None,
                    "modularity_q": r.get("spatial_group"), "q_sd": None,
                    "mean_community_size": r.get("spatial_community_size"),
                    "n_communities": r.get("spatial_n_communities"),
                    "p_q_greater": r.get("spatial_p_empirical")})  # fmt: skip
        out.append({**lead, "row": "random", "group": "random" if has else None,
                    "modularity_q": r.get("spatial_random_mean"),
                    "q_sd": r.get("spatial_random_sd"),
                    "mean_community_size": r.get("spatial_random_community_size"),
                    "n_communities": r.get("spatial_random_n_communities"),
                    "p_q_greater": None})  # fmt: skip
    caption = (
        "Louvain modularity Q (eq. 6) of the mutual-information graph of the group's neurons "
        "and mean community size (Comm.), against size-matched random groups (mean ± SD; "
        "Comm.: mean). *: p < 0.05 (fraction of random groups with Q at least the group's)." + _FOOT
    )
    return PaperTable(
        "table3_spatial", "Table 3: community detection across models", caption,
        ("Model", "Revision", "Size", "Group", "Modul.", "Comm.", "p", "Note"),
        tuple(md),
        (*_CSV_LEAD, "row", "group", "modularity_q", "q_sd", "mean_community_size",
         "n_communities", "p_q_greater"),
        tuple(out),
    )  # fmt: skip


def paper_tables(rows: Sequence[Mapping[str, Any]]) -> tuple[PaperTable, PaperTable, PaperTable]:
    """Tables 1, 2 and 3 of the sweep table's ``rows`` (``sweep_table(...).to_pylist()``)."""
    return table1(rows), table2(rows), table3(rows)
