"""Identification end to end on a tiny model: outputs, cache reuse, run-directory safety."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import raretoken.ablation.chunks as chunks_mod
import raretoken.run.stages as stages_mod
from pipeline_fixtures import tiny_overrides, tiny_setup
from raretoken.errors import ConfigError, RunDirectoryError
from raretoken.run import identify, make_config


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("pipe")
    model_dir, corpus = tiny_setup(root)
    return root, model_dir, corpus


def test_identify_writes_a_complete_run(setup: tuple[Path, Path, Path]) -> None:
    root, model_dir, corpus = setup
    cfg = make_config(overrides=tiny_overrides(model_dir, corpus))
    res = identify(cfg, root / "run", cache_dir=root / "cache", progress=False)
    out = root / "run"
    for name in ("manifest.json", "neurons.parquet", "positions.parquet", "tokens.parquet",
                 "regimes.json", "summary.md", "figures/rank_curve.png", "figures/rank_curve.svg",
                 "token_split.json"):  # fmt: skip
        assert (out / name).exists(), name
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"] == cfg.to_dict()
    assert manifest["versions"]["torch"]
    assert {"token_statistics", "sampling", "forward", "ablation", "regimes"} <= set(
        manifest["stages"]
    )
    table = pq.read_table(out / "neurons.parquet").to_pandas()
    assert len(table) == 64  # d_mlp of the tiny model
    # Δloss columns are the means of |ΔL| over the rare / common positions
    assert np.allclose(
        table["delta_rare"], np.abs(res.delta[res.rare_positions]).mean(0), atol=1e-6
    )
    assert np.allclose(
        table["delta_common"], np.abs(res.delta[res.common_positions]).mean(0), atol=1e-6
    )
    assert manifest["stages"]["sampling"]["n_rare_positions"] == len(res.rare_positions) > 0
    assert res.sample.n_windows == 8 and res.sample.window_len == 64


def test_rerun_reuses_the_cache(
    setup: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, model_dir, corpus = setup
    cfg = make_config(overrides=tiny_overrides(model_dir, corpus))
    first = identify(cfg, root / "run2", cache_dir=root / "cache", progress=False)

    def boom(*a: object, **k: object) -> None:
        raise AssertionError("recomputed a cached stage")

    monkeypatch.setattr(stages_mod, "load_model", boom)
    monkeypatch.setattr(chunks_mod, "delta_loss_fast", boom)
    again = identify(cfg, root / "run2", cache_dir=root / "cache", progress=False)
    assert np.array_equal(first.delta, again.delta)
    assert np.array_equal(first.rare_fit.plateau_neurons, again.rare_fit.plateau_neurons)


def test_changed_setting_is_not_served_stale(
    setup: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, model_dir, corpus = setup
    base = tiny_overrides(model_dir, corpus)
    a = identify(
        make_config(overrides=base), root / "run3a", cache_dir=root / "cache", progress=False
    )
    calls = []
    real = chunks_mod.delta_loss_fast

    def spy(*args: object, **kw: object):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(chunks_mod, "delta_loss_fast", spy)
    b = identify(
        make_config(overrides=dict(base, seed=7)),
        root / "run3b",
        cache_dir=root / "cache",
        progress=False,
    )
    assert calls, "a new seed must recompute the ablation"
    assert not np.array_equal(a.sample.offsets, b.sample.offsets)


def test_run_directory_holding_another_run_is_refused(setup: tuple[Path, Path, Path]) -> None:
    root, model_dir, corpus = setup
    base = tiny_overrides(model_dir, corpus)
    identify(make_config(overrides=base), root / "run4", cache_dir=root / "cache", progress=False)
    with pytest.raises(RunDirectoryError):
        identify(make_config(overrides=dict(base, percentile=20.0)), root / "run4",
                 cache_dir=root / "cache", progress=False)  # fmt: skip


def test_interrupted_stage_leaves_nothing_trusted(
    setup: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, model_dir, corpus = setup
    cfg = make_config(overrides=dict(tiny_overrides(model_dir, corpus), seed=11))

    def interrupted(*a: object, **k: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(chunks_mod, "delta_loss_fast", interrupted)
    with pytest.raises(KeyboardInterrupt):
        identify(cfg, root / "run5", cache_dir=root / "cache5", progress=False)
    assert not list((root / "cache5").glob("ablation/*"))
    assert not list((root / "cache5").rglob("*.tmp*"))
    assert not (root / "run5").exists()  # nothing finished: no run directory to mislead
    assert list((root / "cache5").glob("capture/*/entry.json"))  # finished stages are kept
    monkeypatch.undo()
    identify(cfg, root / "run5", cache_dir=root / "cache5", progress=False)  # resumes
    assert list((root / "cache5").glob("ablation/*/entry.json"))
    assert json.loads((root / "run5" / "manifest.json").read_text())["status"] == "identified"


def test_bad_settings_are_config_errors() -> None:
    with pytest.raises(ConfigError):
        make_config(overrides={"percentile": 150})
    with pytest.raises(ConfigError):
        make_config(overrides={"percentile": 0})
    with pytest.raises(ConfigError):
        make_config(preset="nope")
    with pytest.raises(ConfigError):
        make_config(overrides={"n_windows": "many"})


def test_model_identity_of_the_embedded_model_ignores_where_it_is_installed(
    tmp_path: Path,
) -> None:
    from raretoken.models.loading import embedded_model_path

    ident = stages_mod.spec_identity(make_config())
    gguf = embedded_model_path()
    assert str(gguf.parent) not in json.dumps(ident)  # another venv shares the cache
    assert ident["embedded"]["size"] == gguf.stat().st_size
    assert ident["embedded"]["version"] is not None
    # a local model directory is identified by its files: a changed file changes the identity
    (tmp_path / "config.json").write_text("{}")
    before = stages_mod.spec_identity(make_config(overrides={"model": str(tmp_path)}))
    (tmp_path / "config.json").write_text('{"n_layer": 2}')
    assert stages_mod.spec_identity(make_config(overrides={"model": str(tmp_path)})) != before


def test_scoring_keeps_every_rare_target_and_a_uniform_common_sample(
    setup: tuple[Path, Path, Path],
) -> None:
    """The default scoring: every target rare at ``score_percentile`` scored, the common
    positions of the split drawn from the uniform sample only, the cost stated in the summary;
    ``scoring="all"`` scores every window position and reads all of them as the sample."""
    from raretoken.data.token_stats import split_rare_common

    root, model_dir, corpus = setup
    cfg = make_config(overrides=tiny_overrides(model_dir, corpus))
    res = identify(cfg, root / "run-scoring", cache_dir=root / "cache", progress=False)
    sample = res.sample
    always = split_rare_common(res.counts, percentile=cfg.score_percentile, check=False)
    rare_t = always.masks()[0][sample.target_ids] & sample.window_mask()
    assert np.all(sample.target_mask[rare_t])
    assert sample.target_mask.sum() < sample.window_mask().sum()
    targets = sample.target_ids[sample.target_mask]
    rare_m = res.split.masks()[0]
    assert np.array_equal(res.rare_positions, np.flatnonzero(rare_m[targets]))
    assert np.isin(res.common_positions, res.uniform_positions).all()
    assert res.common_positions.size == min(cfg.max_common, res.scoring.n_common_available)
    positions = pq.read_table(root / "run-scoring" / "positions.parquet").to_pandas()
    assert positions["uniform_sample"].sum() == res.uniform_positions.size
    summary = (root / "run-scoring" / "summary.md").read_text()
    assert f"scored {res.scoring.n_scored:,} of them" in summary
    assert "(position, neuron) pairs" in summary

    full = identify(make_config(overrides=dict(tiny_overrides(model_dir, corpus), scoring="all")),
                    root / "run-scoring-all", cache_dir=root / "cache", progress=False)  # fmt: skip
    assert full.sample.target_mask.sum() == full.sample.window_mask().sum()
    assert np.array_equal(full.uniform_positions, np.arange(full.sample.n_positions))
    # the same windows: the rare rows of the narrowed run are the full run's rare rows
    assert np.allclose(full.delta[full.rare_positions], res.delta[res.rare_positions], atol=1e-6)
    assert "Read and scored every position" in (root / "run-scoring-all" / "summary.md").read_text()


def test_neuron_table_carries_the_covariates(setup: tuple[Path, Path, Path]) -> None:
    """neurons.parquet has the per-neuron covariates, computed over the uniform sample of
    positions (equal to calling the statistics directly), and the covariates figure."""
    from raretoken.models.loading import ModelSpec, load_model
    from raretoken.stats.covariates import neuron_covariates

    root, model_dir, corpus = setup
    cfg = make_config(overrides=tiny_overrides(model_dir, corpus))
    res = identify(cfg, root / "run-covs", cache_dir=root / "cache", progress=False)
    table = pq.read_table(root / "run-covs" / "neurons.parquet").to_pandas()
    for col in ("w_out_norm", "w_in_norm_up", "w_in_norm_gate", "act_mean", "act_var",
                "act_frac_positive", "vocab_kurtosis", "vocab_skew", "unigram_cosine",
                "null_space_fraction"):  # fmt: skip
        assert col in table.columns, col
    adapter = load_model(ModelSpec(source=str(model_dir))).adapter
    norm = adapter.final_norm()
    counts = np.asarray(res.counts.counts, dtype=np.float64)
    with np.errstate(divide="ignore"):
        log_freq = np.log(counts)
    direct = neuron_covariates(
        adapter.w_out(-1).detach(), {k: v.detach() for k, v in adapter.mlp_in_weights(-1).items()},
        norm.weight.detach(), adapter.unembedding()[0],
        np.asarray(res.acts[res.uniform_positions]), log_freq, norm_kind=norm.kind,  # type: ignore[arg-type]
    )  # fmt: skip
    assert np.allclose(table["act_abs_mean"], direct.act_abs_mean)
    assert np.allclose(table["unigram_cosine"], direct.unigram_cosine, equal_nan=True)
    assert (root / "run-covs" / "figures" / "covariates.png").exists()
    summary = (root / "run-covs" / "summary.md").read_text()
    assert "rare-target Δloss ranks most closely with" in summary
    manifest = json.loads((root / "run-covs" / "manifest.json").read_text())
    assert manifest["stages"]["covariates"]["n_positions"] == res.uniform_positions.size
