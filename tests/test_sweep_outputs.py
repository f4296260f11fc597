"""Cross-run outputs of a sweep (raretoken.sweep.outputs): sweep.parquet, Tables 1–3, Figure 3,
training dynamics, paired checkpoint comparisons and notes.

Two kinds of sweep directory: real tiny runs over three saved checkpoints (step0/step4/step16)
and synthetic run directories whose CSV/JSON files hold chosen numbers, so that the expected
table cells are known exactly.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy import stats

from pipeline_fixtures import tiny_overrides, write_corpus
from raretoken.errors import ConfigError, InsufficientDataError, RunDirectoryError
from raretoken.stats.mean_bootstrap import mean_interval
from raretoken.stats.regime_fit import fit_regimes
from raretoken.sweep import parse_sweep, run_sweep
from raretoken.sweep.figures import DynamicsFigure, RankCurveGrid, dynamics_figures
from raretoken.sweep.outputs import write_sweep_outputs
from raretoken.sweep.pairing import CheckpointComparisons, paired_mean_difference
from raretoken.sweep.paper_tables import PaperTable, paper_tables, size_label
from raretoken.sweep.table import parse_step, sweep_table
from tiny import save_tiny

STEPS = (0, 4, 16)
DYN_REAL = ("plateau_size", "kappa", "d_eff_ratio", "modularity", "alpha_hill")


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _n_panels(svg: Path) -> int:
    root = ET.fromstring(svg.read_bytes())  # valid SVG or it raises
    assert root.tag.endswith("svg")
    return sum(1 for el in root.iter() if str(el.get("id", "")).startswith("axes_"))


# ---------------------------------------------------------------------------------------------
# real tiny runs over saved checkpoints
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("sweep-out")
    for seed, step in enumerate(STEPS):
        save_tiny(root / "ckpts" / f"step{step}", "neox", seed=seed)
    corpus = write_corpus(root / "corpus.jsonl")
    opts = tiny_overrides(root, corpus)
    del opts["model"]
    data = {**opts, "analysis": {"routing": False},
            "models": [{"model": "ckpts", "revisions": ["step*"], "name": "tiny"}]}  # fmt: skip
    spec = parse_sweep(data, root)
    out = root / "out"
    result = run_sweep(spec, out, cache_dir=root / "cache")
    assert result.ok
    # the tokenizer content hash every run records (written here where a run did not record it)
    sha = hashlib.sha256((root / "ckpts/step0/tokenizer.json").read_bytes()).hexdigest()
    for t in spec.tasks:
        path = out / "tasks" / t.name / "run" / "manifest.json"
        manifest = json.loads(path.read_text())
        tokenizer = manifest["identity"].setdefault("tokenizer", {"sha256": sha})
        sha = tokenizer["sha256"]
        path.write_text(json.dumps(manifest))
    written = write_sweep_outputs(out)
    return {"root": root, "out": out, "spec": spec, "written": written, "sha": sha}


def test_real_sweep_table_reads_the_runs(real: dict[str, Any]) -> None:
    out: Path = real["out"]
    rows = pq.read_table(out / "sweep.parquet").to_pylist()
    assert [r["task"] for r in rows] == ["tiny@step0", "tiny@step4", "tiny@step16"]
    assert [r["step"] for r in rows] == list(STEPS)
    for r in rows:
        run = out / r["run_dir"]
        assert r["status"] == "complete" and r["model_label"] == "tiny"
        assert r["d_mlp"] == 64 and (r["n_params"] is None or r["n_params"] > 0)
        assert r["tokenizer_sha256"] == real["sha"] and r["tokenizer_paired"] is True
        assert r["tokenizer_group"] == 1
        regimes = json.loads((run / "regimes.json").read_text())
        assert r["plateau_size"] == len(regimes["rare"]["plateau_neurons"])
        assert r["plateau_fraction"] == r["plateau_size"] / 64
        boot = regimes["rare_bootstrap"]
        assert (r["kappa_lo"], r["kappa_hi"]) == tuple(boot["ci_kappa_basic"])
        assert (r["plateau_size_lo"], r["plateau_size_hi"]) == tuple(boot["ci_plateau_size"])
        assert r["n_regimes_rare"] == regimes["rare"]["model_n_segments"]
        assert r["n_regimes_common"] == regimes["common"]["model_n_segments"]
        coord = _read_csv(run / "analyses/coordination.csv")[0]
        assert r["coordination_group"] == float(coord["d_eff_ratio"])
        assert r["coordination_random_sd"] == float(coord["random_ratio_sd"])
        assert r["coordination_p_empirical"] == float(coord["p_value_less"])
        spatial = _read_csv(run / "analyses/spatial.csv")
        assert r["spatial_random_mean"] == float(spatial[1]["modularity_q"])
        claims = {c["key"]: c for c in _read_csv(run / "analyses/claims.csv")}
        assert r["spectra_verdict"] == claims["spectra"]["verdict"]
        pos = pq.read_table(run / "positions.parquet").to_pylist()
        rare = [p["base_loss"] for p in pos if p["class"] == "rare"]
        assert r["baseline_rare_loss"] == pytest.approx(np.mean(rare), rel=1e-12)
        assert r["routing_group"] is None  # routing was switched off


def test_real_tables_figures_and_pairing(real: dict[str, Any]) -> None:
    out: Path = real["out"]
    written: dict[str, Path] = real["written"]
    for stem in ("table1_coordination", "table2_routing", "table3_spatial", "paired_checkpoints"):
        assert written[f"tables/{stem}.md"].exists() and written[f"tables/{stem}.csv"].exists()
    rows = pq.read_table(out / "sweep.parquet").to_pylist()
    t1 = _read_csv(out / "tables/table1_coordination.csv")
    assert [r["task"] for r in t1] == [r["task"] for r in rows]
    assert [float(r["d_eff_ratio"]) for r in t1] == [r["coordination_group"] for r in rows]
    t2 = (out / "tables/table2_routing.md").read_text()
    assert t2.count("no routing analysis in this run") == 3
    # Figure 3: one panel per run; dynamics: one figure per quantity the runs have
    assert _n_panels(out / "figures/figure3_rank_curves.svg") == 3
    for key in DYN_REAL:
        assert _n_panels(out / f"figures/dynamics_{key}.svg") == 1
        assert (out / f"figures/dynamics_{key}.png").read_bytes()[:4] == b"\x89PNG"
    assert not (out / "figures/dynamics_gini_diff.svg").exists()
    notes = (out / "notes.md").read_text()
    assert "gini_diff' skipped" in notes and "WARNING" not in notes
    # paired checkpoints: the same positions, the difference of the base losses
    pairs = _read_csv(out / "tables/paired_checkpoints.csv")
    assert [(p["task_from"], p["task_to"], p["targets"]) for p in pairs] == [
        ("tiny@step0", "tiny@step4", "rare"), ("tiny@step0", "tiny@step4", "common"),
        ("tiny@step4", "tiny@step16", "rare"), ("tiny@step4", "tiny@step16", "common")]  # fmt: skip
    for p in pairs:
        assert p["paired"] == "true"
        a = pq.read_table(out / f"tasks/{p['task_from']}/run/positions.parquet").to_pylist()
        b = pq.read_table(out / f"tasks/{p['task_to']}/run/positions.parquet").to_pylist()
        la = [x["base_loss"] for x in a if x["class"] == p["targets"]]
        lb = [x["base_loss"] for x in b if x["class"] == p["targets"]]
        assert int(p["n_positions"]) == len(la) == len(lb) > 0
        diff = float(np.mean(np.subtract(lb, la, dtype=np.float64)))
        assert float(p["difference"]) == pytest.approx(diff, rel=1e-9, abs=1e-12)
        assert float(p["lo"]) <= float(p["difference"]) <= float(p["hi"])


def test_real_outputs_are_idempotent(real: dict[str, Any]) -> None:
    out: Path = real["out"]
    before = {rel: p.read_bytes() for rel, p in real["written"].items()}
    again = write_sweep_outputs(out)
    assert set(again) == set(before)
    for rel, p in again.items():
        assert p.read_bytes() == before[rel], rel


def test_partially_failed_sweep(real: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "copy"
    shutil.copytree(real["out"], out)
    task = out / "tasks/tiny@step4"
    shutil.rmtree(task / "run")
    record = json.loads((task / "task.json").read_text())
    record.update(status="failed", error={"type": "ModelLoadError", "message": "gone"})
    (task / "task.json").write_text(json.dumps(record))
    (out / "figures/dynamics_extra.svg").write_text("<svg/>")  # a stale output of ours
    written = write_sweep_outputs(out)
    rows = pq.read_table(out / "sweep.parquet").to_pylist()
    assert [r["status"] for r in rows] == ["complete", "failed", "complete"]
    assert rows[1]["kappa"] is None and rows[1]["error"] == "ModelLoadError: gone"
    assert _n_panels(written["figures/figure3_rank_curves.svg"]) == 2
    md = (out / "tables/table1_coordination.md").read_text()
    line = next(x for x in md.splitlines() if "| step4 |" in x)
    assert line.count("—") >= 7 and "failed: ModelLoadError: gone" in line
    assert "Task `tiny@step4` failed: ModelLoadError: gone" in (out / "notes.md").read_text()
    pairs = _read_csv(out / "tables/paired_checkpoints.csv")
    assert {(p["task_from"], p["task_to"]) for p in pairs} == {("tiny@step0", "tiny@step16")}
    assert not (out / "figures/dynamics_extra.svg").exists()


# ---------------------------------------------------------------------------------------------
# synthetic run directories with chosen numbers
# ---------------------------------------------------------------------------------------------

COORD = ("group,n_neurons,n_positions,positions,d_eff,d_eff_ratio,random_ratio_mean,"
         "random_ratio_sd,random_d_eff_mean,n_random,p_value_less,z_score\n")  # fmt: skip
SPATIAL = ("group,n_neurons,modularity_q,q_sd,n_communities,mean_community_size,mean_mi_nats,"
           "n_groups,p_q_greater,z_q,p_size_two_sided,p_mi_greater\n")  # fmt: skip
ROUTING = ("group,n_heads,gini_rare_mean,gini_rare_sd,gini_common_mean,gini_common_sd,"
           "gini_paired_p,gini_spearman_rho,gini_spearman_p,n_heads_q_lt_0.05,impact_positions,"
           "single_top_impact,single_random_impact,p_top_vs_random,d_top_vs_random,"
           "all_heads_impact,all_heads_change,max_single_impact,p_single_vs_layer,"
           "d_single_vs_layer\n")  # fmt: skip
HEADS = "layer,head,gini_rare,gini_common,cohens_d,q_welch,q_mannwhitney,impact,signed_change\n"


def _curve(plateau: int, n: int = 200) -> np.ndarray:
    r = np.arange(1, n + 1, dtype=float)
    y = -2.0 - 0.7 * np.log10(r / (plateau + 1))
    y = np.where(r >= 120, -2.0 - 0.7 * np.log10(120 / (plateau + 1)) - 3 * np.log10(r / 120), y)
    y[:plateau] = -1.4 - 0.15 * np.log10(r[:plateau])
    return 10.0**y


def _positions(path: Path, rare_loss: list[float], windows: list[int]) -> None:
    n = len(rare_loss)
    pq.write_table(pa.table({
        "window": pa.array([*windows, 0], pa.int64()), "position": pa.array(range(n + 1), pa.int64()),
        "target_id": pa.array([7] * n + [9], pa.int64()), "target_token": ["a"] * n + ["b"],
        "class": ["rare"] * n + ["common"],
        "base_loss": pa.array([*rare_loss, 1.0], pa.float32()),
        "uniform_sample": [False] * n + [True]}), path)  # fmt: skip


def _run(out: Path, name: str, revision: str | None, *, sha: str, files: dict[str, str],
         n_params: int | None = 160_000_000, step: int | None = None,
         rare_loss: list[float] | None = None) -> None:  # fmt: skip
    task = out / "tasks" / name
    run = task / "run"
    (run / "analyses").mkdir(parents=True)
    rec: dict[str, Any] = {"name": name, "model": f"/m/{name}", "revision": revision,
                           "status": "complete", "seconds": 1.5, "error": None}  # fmt: skip
    if step is not None:
        rec["step"] = step
    (task / "task.json").write_text(json.dumps(rec))
    dims = {"d_mlp": 200, "n_params": n_params} if n_params else {}
    (run / "manifest.json").write_text(json.dumps({
        "status": "complete", "identity": {"dims": dims, "tokenizer": {"sha256": sha}},
        "stages": {"analyses": {"group": {"name": "plateau", "size": 5}}}}))  # fmt: skip
    fit = fit_regimes(_curve(5))
    assert fit.has_plateau and fit.plateau_size == 5
    boot = {"ci_plateau_size": [4.0, 8.0], "ci_kappa": [0.6, 0.7], "ci_kappa_basic": [0.65, 0.8],
            "plateau_existence_rate": 0.9}  # fmt: skip
    regimes = {"rare": fit.to_dict(), "common": fit_regimes(_curve(0)).to_dict(),
               "rare_bootstrap": boot}  # fmt: skip
    (run / "regimes.json").write_text(json.dumps(regimes))
    (run / "token_split.json").write_text('{"n_rare_positions": 6, "n_common_positions": 1}')
    _positions(run / "positions.parquet", rare_loss or [2.0] * 6, [0, 0, 1, 1, 2, 2])
    for rel, text in files.items():
        (run / "analyses" / rel).write_text(text)


@pytest.fixture
def synthetic(tmp_path: Path) -> Path:
    out = tmp_path / "sweep"
    a, b = "a" * 64, "b" * 64
    base = {"coordination.csv": COORD + "plateau,12,100,all,9,0.75,0.875,0.05,10.5,100,0.0099,-2.5\n",
            "spatial.csv": SPATIAL + "plateau,12,0.39,,4,10.1,0.02,1,0.03,2.1,0.5,0.1\n"
                           "random,12,0.17,0.021,3,8.1,0.01,100,,,,\n",
            "claims.csv": "key,verdict,p_value\ncoordination,supported,0.0099\n"}  # fmt: skip
    routing = {**base, "routing.csv": ROUTING + "plateau,3,0.34,0.05,0.32,0.04,0.43,0.89,0.01,0,"
               "all,0.3,0.37,0.2,0.5,0.8,-0.5,0.4,0.0001,-3\n",
               "routing_heads.csv": HEADS + "0,0,0.31,0.30,,,,,\n0,1,0.35,0.33,,,,,\n"
               "0,2,0.36,0.33,,,,,\n0,all,,,,,,0.8,-0.5\n"}  # fmt: skip
    _run(out, "pa@step0", "step0", sha=a, files=routing, rare_loss=[2.0, 3.0, 2.5, 2.0, 4.0, 1.0])
    _run(out, "pa@step8", "step8", sha=a, files=base, rare_loss=[1.5, 2.5, 2.0, 1.5, 3.5, 0.5])
    _run(out, "pa@step16", "step16", sha=b, files=base)
    _run(out, "pb@final", "final", sha=a, files=base, n_params=None, step=100)
    fail = out / "tasks/pc@main"
    fail.mkdir(parents=True)
    (fail / "task.json").write_text(json.dumps({"name": "pc@main", "model": "m", "revision": "main",
        "status": "failed", "error": {"type": "ModelLoadError", "message": "no such model"}}))  # fmt: skip
    names = ["pa@step0", "pa@step8", "pa@step16", "pb@final", "pc@main", "pd@main"]
    tasks = [{"name": n, "model": "m", "revision": n.split("@")[1]} for n in names]
    (out / "sweep_manifest.json").write_text(json.dumps({"tasks": tasks}))
    return out


def test_synthetic_tables_reproduce_the_numbers(
    synthetic: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="raretoken.sweep.outputs"):
        write_sweep_outputs(synthetic)
    rows = {r["task"]: r for r in pq.read_table(synthetic / "sweep.parquet").to_pylist()}
    assert [rows[n]["status"] for n in rows] == ["complete"] * 4 + ["failed", "missing"]
    pa0 = rows["pa@step0"]
    assert (pa0["step"], rows["pb@final"]["step"], rows["pc@main"]["step"]) == (0, 100, None)
    assert (pa0["coordination_group"], pa0["coordination_random_mean"]) == (0.75, 0.875)
    assert (pa0["spatial_group"], pa0["spatial_random_sd"], pa0["spatial_effect"]) == (
        0.39,
        0.021,
        2.1,
    )
    assert (pa0["routing_group"], pa0["routing_layer_change"]) == (0.3, -0.5)
    assert (pa0["plateau_size"], pa0["plateau_fraction"], pa0["plateau_fraction_hi"]) == (
        5,
        0.025,
        0.04,
    )
    assert (pa0["kappa_lo"], pa0["kappa_hi"], pa0["kappa_interval"]) == (0.65, 0.8, "basic")
    assert (pa0["n_regimes_rare"], pa0["d_mlp"], pa0["n_params"]) == (3, 200, 160_000_000)
    # Gini difference across heads: 95 % t interval of the three per-head differences
    d = np.array([0.01, 0.02, 0.03])
    lo, hi = stats.t.interval(0.95, 2, loc=d.mean(), scale=stats.sem(d))
    assert pa0["routing_gini_diff"] == pytest.approx(0.02, abs=1e-12)
    assert (pa0["routing_gini_diff_lo"], pa0["routing_gini_diff_hi"]) == pytest.approx((lo, hi))
    # tokenizer groups: pa's checkpoints have two tokenizers -> unpaired, warned, marked
    assert [rows[n]["tokenizer_group"] for n in ("pa@step0", "pa@step16", "pb@final")] == [1, 2, 1]
    assert pa0["tokenizer_paired"] is False and rows["pb@final"]["tokenizer_paired"] is True
    assert any("pa have different tokenizers" in r.getMessage() for r in caplog.records)
    notes = (synthetic / "notes.md").read_text()
    assert "WARNING: the checkpoints of pa have different tokenizers" in notes
    assert "Task `pc@main` failed: ModelLoadError: no such model" in notes
    assert "Task `pd@main` is missing" in notes

    t1 = (synthetic / "tables/table1_coordination.md").read_text().splitlines()
    assert (
        "| pa† | step0 | 160M | plateau | 12 | 9 | 10.5 | 0.750 | 0.875 ± 0.050 | 0.010 |  |" in t1
    )
    assert "| pb | final | — | plateau | 12 | 9 | 10.5 | 0.750 | 0.875 ± 0.050 | 0.010 |  |" in t1
    assert (
        "| pc | main | — | — | — | — | — | — | — | — | failed: ModelLoadError: no such model |"
        in t1
    )
    assert "| pd | main | — | — | — | — | — | — | — | — | missing |" in t1
    csv1 = _read_csv(synthetic / "tables/table1_coordination.csv")
    assert [r["task"] for r in csv1] == list(rows)
    assert (csv1[0]["d_eff_ratio"], csv1[0]["random_ratio_sd"], csv1[4]["d_eff_ratio"]) == (
        "0.75",
        "0.05",
        "",
    )
    t2 = (synthetic / "tables/table2_routing.md").read_text().splitlines()
    assert "| pa† | step0 | 160M | 0.300 | 0.370 | 0.800* | -0.500 |  |" in t2
    assert "| pa† | step8 | 160M | — | — | — | — | no routing analysis in this run |" in t2
    t3 = (synthetic / "tables/table3_spatial.md").read_text().splitlines()
    i = t3.index("| pb | final | — | plateau | 0.390* | 10.1 | 0.030 |  |")
    assert t3[i + 1] == "|  |  |  | random | 0.170 ± 0.021 | 8.1 |  |  |"
    assert [r["row"] for r in _read_csv(synthetic / "tables/table3_spatial.csv")][:2] == [
        "group",
        "random",
    ]

    pairs = _read_csv(synthetic / "tables/paired_checkpoints.csv")
    first = next(p for p in pairs if p["task_to"] == "pa@step8" and p["targets"] == "rare")
    assert first["paired"] == "true" and float(first["difference"]) == pytest.approx(-0.5)
    assert float(first["lo"]) == pytest.approx(-0.5) and float(first["hi"]) == pytest.approx(-0.5)
    second = next(p for p in pairs if p["task_to"] == "pa@step16")
    assert second["paired"] == "false" and "tokenizers differ" in second["note"]
    assert second["difference"] == ""
    # dynamics: pa (3 steps, dotted unpaired) and pb (1 step)
    figs, skipped = dynamics_figures(list(rows.values()))
    kappa = next(f for f in figs if f.key == "kappa")
    assert [(x.model, x.steps, x.paired) for x in kappa.lines] == [
        ("pa", (0, 8, 16), False), ("pb", (100,), True)]  # fmt: skip
    assert DynamicsFigure.from_dict(kappa.to_dict()) == kappa
    assert _n_panels(synthetic / "figures/figure3_rank_curves.svg") == 4
    assert {f.key for f in figs} == {"plateau_size", "kappa", "d_eff_ratio", "modularity",
                                     "gini_diff"} and len(skipped) == 1  # fmt: skip


def test_dynamics_need_two_stepped_tasks(synthetic: Path) -> None:
    (synthetic / "figures").mkdir()
    (synthetic / "figures/dynamics_kappa.svg").write_text("<svg/>")  # from an earlier call
    for name in ("pa@step8", "pa@step16", "pb@final"):
        shutil.rmtree(synthetic / "tasks" / name)
    written = write_sweep_outputs(synthetic)
    assert not any(rel.startswith("figures/dynamics_") for rel in written)
    assert not (synthetic / "figures/dynamics_kappa.svg").exists()
    assert _n_panels(written["figures/figure3_rank_curves.svg"]) == 1
    notes = (synthetic / "notes.md").read_text()
    assert "Training-dynamics figures skipped: 1 complete task(s) have a training step" in notes


def test_paper_tables_and_results_round_trip(synthetic: Path) -> None:
    rows = sweep_table(synthetic).to_pylist()
    for t in paper_tables(rows):
        assert PaperTable.from_dict(t.to_dict()) == t
    grid = RankCurveGrid.from_sweep(synthetic, rows)
    again = RankCurveGrid.from_dict(grid.to_dict())
    assert again.labels == grid.labels and again.rare[0].kappa == grid.rare[0].kappa
    cmp = CheckpointComparisons.from_dict(
        CheckpointComparisons((), 10, 0, 0.95).to_dict())  # fmt: skip
    assert cmp.differences == () and "No model has two" in cmp.to_markdown()
    assert [size_label(x) for x in (None, 124_000_000, 1.4e9, 70_400)] == [
        "—",
        "124M",
        "1.4B",
        "70.4K",
    ]


@pytest.mark.parametrize(
    ("label", "step"),
    [("step0", 0), ("step143000", 143000), ("checkpoint-1000", 1000), ("ckpt_250", 250),
     ("global_step40", 40), ("runs/step12", 12), ("iter-3", 3), ("main", None), (None, None),
     ("v1.0", None), ("stepping", None), ("1000", None), ("mystep5", None)],
)  # fmt: skip
def test_parse_step(label: str | None, step: int | None) -> None:
    assert parse_step(label) == step


def test_not_a_sweep_directory(tmp_path: Path) -> None:
    with pytest.raises(RunDirectoryError, match="not a raretoken sweep directory"):
        write_sweep_outputs(tmp_path)


# ---------------------------------------------------------------------------------------------
# the paired window bootstrap
# ---------------------------------------------------------------------------------------------


def test_paired_difference_agrees_with_mean_interval() -> None:
    rng = np.random.default_rng(3)
    win = np.repeat(np.arange(30), rng.integers(1, 8, 30))
    d = rng.gamma(2.0, 1.0, win.size) + 0.5
    ref = mean_interval(d[:, None], win, 999, 7)
    mean, lo, hi, se = paired_mean_difference(d, win, n_boot=999, seed=7)
    assert (mean, lo, hi, se) == pytest.approx((ref.mean[0], ref.lo[0], ref.hi[0], ref.se[0]))
    # a shift moves the interval with it (no clipping at 0 for differences)
    shifted = paired_mean_difference(d - 10.0, win, n_boot=999, seed=7)
    assert shifted == pytest.approx((mean - 10.0, lo - 10.0, hi - 10.0, se))


def test_paired_difference_coverage_and_errors() -> None:
    rng = np.random.default_rng(11)
    hits = 0
    for _ in range(150):
        win = np.repeat(np.arange(30), 5)
        d = 0.3 + rng.normal(0, 1, 30)[win] * 0.5 + rng.normal(0, 1, win.size)
        _, lo, hi, _ = paired_mean_difference(d, win, n_boot=400, seed=rng)
        hits += lo <= 0.3 <= hi
    assert 0.88 <= hits / 150 <= 0.995
    assert paired_mean_difference([1.0, 1.0], [0, 1], n_boot=5, seed=0) == (1.0, 1.0, 1.0, 0.0)
    with pytest.raises(InsufficientDataError, match=">= 2 windows"):
        paired_mean_difference([1.0, 2.0], [0, 0], n_boot=5, seed=0)
    with pytest.raises(ConfigError, match="one length"):
        paired_mean_difference([1.0, 2.0], [0], n_boot=5, seed=0)
    with pytest.raises(ConfigError, match="non-finite"):
        paired_mean_difference([1.0, float("nan")], [0, 1], n_boot=5, seed=0)
    with pytest.raises(ConfigError, match="explicit seed"):
        paired_mean_difference([1.0, 2.0], [0, 1], n_boot=5, seed=None)  # type: ignore[arg-type]
