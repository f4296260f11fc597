"""Bounded memory: capture and ablation streamed in chunks into memory-mapped cache entries,
and the statistics over Δloss read chunk by chunk, with the results of the in-memory code."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import raretoken.run.stages as stages_mod
from pipeline_fixtures import tiny_overrides, tiny_setup
from raretoken.ablation.capture import Capture, capture_sample
from raretoken.ablation.chunks import ablation_chunks, method_step
from raretoken.ablation.exact import delta_loss_exact
from raretoken.ablation.fast import delta_loss_fast
from raretoken.ablation.inputs import inputs_from_adapter
from raretoken.ablation.naive import delta_loss_recompute
from raretoken.data.sampling import ContextSample
from raretoken.data.token_stats import split_rare_common
from raretoken.errors import ConfigError, NumericalError
from raretoken.models.adapters import adapter_for
from raretoken.models.hooks import capture_input
from raretoken.run import identify, make_config
from raretoken.run.identification import _column_mean, _neuron_table
from raretoken.run.stages import Stages
from raretoken.stats.regimes import ColumnSum, RowChunks, bootstrap_regimes
from raretoken.storage import ArrayCache
from tiny import tiny_model

# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("stream")
    model_dir, corpus = tiny_setup(root)
    return root, model_dir, corpus


def _sample(vocab: int, n_windows: int, seq: int = 33, seed: int = 0) -> ContextSample:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(n_windows, seq)).astype(np.int64)
    mask = rng.random((n_windows, seq - 1)) < 0.8  # not every position is scored
    return ContextSample(
        input_ids=ids, target_ids=ids[:, 1:], target_mask=mask,
        doc_ids=tuple("d" for _ in range(n_windows)), offsets=np.arange(n_windows) * seq,
        window_len=seq - 1, bos_policy="none", seed=seed, mode="windows",
        n_stream_tokens=n_windows * seq, stream_fingerprint="test",
    )  # fmt: skip


def _capture_in_memory(
    model: torch.nn.Module, adapter: object, sample: ContextSample, batch_size: int, block: int
) -> dict[str, np.ndarray]:
    """The capture as it was computed before streaming: lists of batches, concatenated."""
    ad = adapter  # type: ignore[assignment]
    mask = torch.from_numpy(sample.target_mask)
    parts: dict[str, list[np.ndarray]] = {"resid": [], "acts": [], "base_loss": [], "block": []}
    for start in range(0, sample.n_windows, batch_size):
        ids = torch.from_numpy(sample.input_ids[start : start + batch_size])
        m = mask[start : start + batch_size]
        with contextlib.ExitStack() as stack:
            got_r = stack.enter_context(capture_input(ad.final_norm_module()))  # type: ignore[attr-defined]
            got_a = stack.enter_context(capture_input(ad.mlp_out_proj(-1)))  # type: ignore[attr-defined]
            got_b = stack.enter_context(capture_input(ad.blocks()[block]))  # type: ignore[attr-defined]
            with torch.no_grad():
                logits = model(input_ids=ids).logits
        parts["acts"].append(got_a[-1][:, :-1][m].float().numpy())
        parts["resid"].append(got_r[-1][:, :-1][m].float().numpy())
        z = logits[:, :-1][m].float()
        tgt = ids[:, 1:][m]
        parts["base_loss"].append(
            (torch.logsumexp(z, -1) - z.gather(1, tgt[:, None]).squeeze(1)).numpy()
        )
        parts["block"].append(got_b[-1].float().numpy())
    out = {k: np.concatenate(v) for k, v in parts.items()}
    out["targets"] = sample.target_ids[sample.target_mask]
    return out


# ---------------------------------------------------------------------------------------------
# Capture
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_capture_written_piecewise_equals_the_in_memory_capture(
    family: str, tmp_path: Path
) -> None:
    model = tiny_model(family)
    adapter = adapter_for(model)
    sample = _sample(model.config.vocab_size, n_windows=7)
    ref = _capture_in_memory(model, adapter, sample, batch_size=3, block=1)
    cache = ArrayCache(tmp_path)
    with cache.writing("capture", "k") as w:
        cap = capture_sample(model, adapter, sample, batch_size=3, block_index=1, allocate=w.array)
        assert isinstance(cap.acts, np.memmap)  # written in place into the entry's files
        w.put("block_index", np.asarray(cap.block_index))
        got = Capture.from_arrays(w.commit(mmap=True))
    assert isinstance(got.acts, np.memmap) and isinstance(got.block_input, np.memmap)
    assert got.block_index == 1
    n_pos = int(sample.target_mask.sum())
    assert got.acts.shape == (n_pos, 64) and got.block_input is not None
    for name, arr in (("acts", got.acts), ("resid", got.resid), ("base_loss", got.base_loss),
                      ("targets", got.targets), ("block", got.block_input)):  # fmt: skip
        assert arr.dtype == ref[name].dtype, name
        np.testing.assert_array_equal(arr, ref[name], err_msg=name)
    # the default allocation (in memory) gives the same arrays; and to/from_arrays round-trips
    mem = capture_sample(model, adapter, sample, batch_size=3, block_index=1)
    assert not isinstance(mem.acts, np.memmap)
    back = Capture.from_arrays(mem.to_arrays())
    for name, arr in got.to_arrays().items():
        np.testing.assert_array_equal(back.to_arrays()[name], arr, err_msg=name)
    # the reference capture keeps the activations only
    only = capture_sample(model, adapter, sample, batch_size=2, acts_only=True)
    np.testing.assert_array_equal(only.acts, ref["acts"])
    assert only.resid.shape == (0,) and only.base_loss.shape == (0,) and only.block_input is None


def test_non_finite_values_in_one_batch_are_counted_and_nothing_is_published(
    tmp_path: Path,
) -> None:
    model = tiny_model("llama")
    adapter = adapter_for(model)
    sample = _sample(model.config.vocab_size, n_windows=6)
    calls = []

    def poison(mod: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        calls.append(1)
        if len(calls) == 2:  # the second batch only
            x = args[0].clone()
            x[0, 0, :3] = float("nan")  # window 0, position 0: scored (mask) or not
            x[1, 2, 0] = float("inf")
            return (x,)
        return args

    mask = sample.target_mask[2:4]
    expected = 3 * int(mask[0, 0]) + int(mask[1, 2])
    assert expected > 0
    cache = ArrayCache(tmp_path)
    handle = adapter.mlp_out_proj(-1).register_forward_pre_hook(poison)
    try:
        with pytest.raises(NumericalError, match=rf"^{expected} NaN/inf values"):
            with cache.writing("capture", "bad") as w:
                capture_sample(model, adapter, sample, batch_size=2, allocate=w.array)
                w.commit(mmap=True)
    finally:
        handle.remove()
    assert cache.load("capture", "bad") is None
    assert not list(tmp_path.rglob("*.npy"))  # the half-written entry was removed


# ---------------------------------------------------------------------------------------------
# Ablation
# ---------------------------------------------------------------------------------------------


def _stage_inputs(st: Stages):  # type: ignore[no-untyped-def]
    counts, _ = st.token_counts()
    split = split_rare_common(counts, percentile=st.cfg.percentile)
    sample, ref, sample_key, ref_key = st.samples(split)
    cap, cap_key = st.capture(sample, sample_key, reference=False)
    ref_cap, ref_cap_key = st.capture(ref, ref_key, reference=True)
    mean_acts = _column_mean(ref_cap.acts).astype(np.float32)
    return cap, mean_acts, cap_key, ref_cap_key


@pytest.mark.parametrize("method", ["fast", "exact", "naive"])
def test_chunked_ablation_equals_one_call_over_all_positions(
    setup: tuple[Path, Path, Path], tmp_path: Path, method: str
) -> None:
    _, model_dir, corpus = setup
    cfg = make_config(overrides=dict(tiny_overrides(model_dir, corpus), n_windows=16,
                                     method=method, scoring="all"))  # fmt: skip
    st = Stages(cfg, ArrayCache(tmp_path / "cache"), progress=False, chunk_positions=200)
    cap, mean_acts, cap_key, ref_key = _stage_inputs(st)
    assert isinstance(cap.acts, np.memmap) and isinstance(cap.resid, np.memmap)
    adapter = st.loaded.adapter
    n_pos = cap.acts.shape[0]
    chunks = [sl for sl, _ in ablation_chunks(adapter, cap, torch.from_numpy(mean_acts), 200,
                                              method, "cpu", torch.float32)]  # fmt: skip
    step = method_step(method, 300, 64)
    assert len(chunks) > 1, "the test needs several chunks"
    assert all((sl.stop - sl.start) % step == 0 for sl in chunks[:-1])
    assert chunks[0].start == 0 and chunks[-1].stop == n_pos
    delta = st.ablation(cap, mean_acts, cap_key, ref_key)
    assert isinstance(delta, np.memmap) and delta.dtype == np.float32

    inputs = inputs_from_adapter(
        adapter,
        torch.from_numpy(np.array(cap.resid)),
        torch.from_numpy(np.array(cap.acts)),
        torch.from_numpy(np.array(cap.targets)),
        torch.from_numpy(mean_acts),
    ).to("cpu", torch.float32)
    if method == "fast":
        whole = delta_loss_fast(inputs, tol=cfg.tol)[0]
    elif method == "exact":
        whole = delta_loss_exact(inputs).float()
    else:
        whole = delta_loss_recompute(inputs, range(inputs.n_neurons)).float()
    np.testing.assert_array_equal(delta, whole.numpy().astype(np.float32))
    # served from the cache: the same values, memory-mapped
    again = st.ablation(cap, mean_acts, cap_key, ref_key)
    assert isinstance(again, np.memmap)
    np.testing.assert_array_equal(again, delta)


# ---------------------------------------------------------------------------------------------
# Statistics over Δloss, chunk by chunk
# ---------------------------------------------------------------------------------------------


def _memmapped(tmp_path: Path, x: np.ndarray) -> np.ndarray:
    np.save(tmp_path / "x.npy", x)
    return np.load(tmp_path / "x.npy", mmap_mode="r")


def _heavy(rng: np.random.Generator, n: int, m: int) -> np.ndarray:
    """float32 values over many orders of magnitude and both signs: rounding shows."""
    scale = 10.0 ** rng.uniform(-6, 3, (n, 1))
    return (rng.standard_normal((n, m)) * scale).astype(np.float32)


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_column_sum_is_the_one_pass_sum_bit_for_bit(chunk: int) -> None:
    x = _heavy(np.random.default_rng(chunk), 333, 41)
    acc = ColumnSum(41)
    for _, block in RowChunks(x, chunk_rows=chunk):
        acc.add(block)
    np.testing.assert_array_equal(acc.total, x.astype(np.float64).sum(axis=0))
    np.testing.assert_array_equal(acc.mean(), x.mean(axis=0, dtype=np.float64))
    assert acc.n_rows == 333


def test_neuron_table_chunked_equals_the_straightforward_means(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = _heavy(rng, 500, 37)
    delta = _memmapped(tmp_path, x)
    rare = np.sort(rng.choice(500, 40, replace=False))
    common = np.setdiff1d(np.arange(500), rare)[::2]
    table = _neuron_table(delta, rare, common, layer=-1, chunk_rows=9)
    d_rare, d_common = x[rare].astype(np.float64), x[common].astype(np.float64)
    np.testing.assert_array_equal(table.delta_rare, np.abs(d_rare).mean(0))
    np.testing.assert_array_equal(table.delta_rare_signed, d_rare.mean(0))
    np.testing.assert_array_equal(table.delta_common, np.abs(d_common).mean(0))
    np.testing.assert_array_equal(table.delta_common_signed, d_common.mean(0))
    np.testing.assert_array_equal(table.neuron_ids, np.arange(37))
    np.testing.assert_array_equal(_column_mean(delta, 11), x.astype(np.float64).mean(0))


def _per_position(rng: np.random.Generator, n_pos: int) -> np.ndarray:
    """A rank curve with an 8-neuron plateau, per position (as in test_regimes)."""
    r = np.arange(1, 301, dtype=float)
    y = -2.0 - 0.7 * np.log10(r / 9)
    y = np.where(r >= 120, -2.0 - 0.7 * np.log10(120 / 9) - 3.0 * np.log10(r / 120), y)
    y[:8] = -1.4 - 0.15 * np.log10(r[:8])
    sign = rng.choice([-1.0, 1.0], (n_pos, r.size))
    return (sign * 10.0**y * rng.exponential(1.0, (n_pos, r.size))).astype(np.float32)


def test_bootstrap_over_row_chunks_matches_the_matrix(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    x = _per_position(rng, 700)
    delta = _memmapped(tmp_path, x)
    rows = np.sort(rng.choice(700, 450, replace=False))
    ids = np.arange(300)
    ref = bootstrap_regimes(np.abs(x[rows]), ids, n_boot=12, seed=3, batch_size=5)
    # one chunk: the same products, bit for bit
    one = bootstrap_regimes(RowChunks(delta, rows, absolute=True, chunk_rows=450), ids,
                            n_boot=12, seed=3, batch_size=5)  # fmt: skip
    assert json.dumps(one.to_dict()) == json.dumps(ref.to_dict())
    assert ref.plateau_existence_rate == 1.0  # the test needs a curve with a plateau
    # several chunks: the same draws and estimate; resample means differ by rounding only
    many = bootstrap_regimes(RowChunks(delta, rows, absolute=True, chunk_rows=64), ids,
                             n_boot=12, seed=3, batch_size=5)  # fmt: skip
    assert json.dumps(many.estimate.to_dict()) == json.dumps(ref.estimate.to_dict())
    np.testing.assert_allclose(many.kappa, ref.kappa, rtol=1e-5)
    np.testing.assert_allclose(many.r_squared, ref.r_squared, rtol=1e-5)
    np.testing.assert_array_equal(many.membership_frequency, ref.membership_frequency)
    np.testing.assert_array_equal(many.plateau_size, ref.plateau_size)
    np.testing.assert_array_equal(many.r1, ref.r1)
    # a different draw would not match: the comparison can fail
    other = bootstrap_regimes(RowChunks(delta, rows, absolute=True, chunk_rows=64), ids,
                              n_boot=12, seed=4, batch_size=5)  # fmt: skip
    assert not np.allclose(other.kappa, ref.kappa, rtol=1e-5)


def test_row_chunks_checks_its_input(tmp_path: Path) -> None:
    x = _per_position(np.random.default_rng(1), 50)
    x[30, 4] = np.nan
    with pytest.raises(NumericalError):
        bootstrap_regimes(RowChunks(_memmapped(tmp_path, x), chunk_rows=8), n_boot=2, seed=0)
    with pytest.raises(ConfigError):
        RowChunks(x, np.array([0, 50]))
    with pytest.raises(ConfigError):
        RowChunks(x[0])
    assert RowChunks(x, np.array([3, 1])).shape == (2, 300)


# ---------------------------------------------------------------------------------------------
# Identification end to end
# ---------------------------------------------------------------------------------------------


def _straightforward_table(delta: np.ndarray, rare: np.ndarray, common: np.ndarray) -> dict:  # type: ignore[type-arg]
    d_rare = np.asarray(delta)[rare].astype(np.float64)
    d_common = np.asarray(delta)[common].astype(np.float64)
    return {
        "delta_rare": np.abs(d_rare).mean(0),
        "delta_rare_signed": d_rare.mean(0),
        "delta_common": np.abs(d_common).mean(0),
        "delta_common_signed": d_common.mean(0),
    }


def test_cached_entries_are_memory_mapped_on_rerun(
    setup: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, model_dir, corpus = setup
    cfg = make_config(overrides=tiny_overrides(model_dir, corpus))
    monkeypatch.setattr(stages_mod, "CHUNK_POSITIONS", 256)  # several chunks in the ablation
    first = identify(cfg, root / "mm1", cache_dir=root / "cache-mm", progress=False)
    for name in ("delta", "acts", "resid", "block_input", "base_loss"):
        assert isinstance(getattr(first, name), np.memmap), name

    def boom(*a: object, **k: object) -> None:
        raise AssertionError("recomputed a cached stage")

    monkeypatch.setattr(stages_mod, "load_model", boom)
    again = identify(cfg, root / "mm2", cache_dir=root / "cache-mm", progress=False)
    for name in ("delta", "acts", "resid", "block_input", "base_loss"):
        arr = getattr(again, name)
        assert isinstance(arr, np.memmap) and not arr.flags.writeable, name
        np.testing.assert_array_equal(arr, getattr(first, name), err_msg=name)
    want = _straightforward_table(again.delta, again.rare_positions, again.common_positions)
    for name, value in want.items():
        np.testing.assert_array_equal(getattr(again.neurons, name), value, err_msg=name)
    assert again.rare_boot is not None and first.rare_boot is not None
    assert json.dumps(again.rare_boot.to_dict()) == json.dumps(first.rare_boot.to_dict())
    # the bootstrap of the whole matrix (the code before streaming) gives the same result
    ref = bootstrap_regimes(np.abs(np.asarray(again.delta)[again.rare_positions]),
                            again.neurons.neuron_ids, n_boot=cfg.n_boot, seed=cfg.seed,
                            clusters=again.position_windows[again.rare_positions])  # fmt: skip
    assert json.dumps(ref.to_dict()) == json.dumps(again.rare_boot.to_dict())


def test_a_run_without_cache_holds_the_same_arrays_in_memory(
    setup: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, model_dir, corpus = setup
    cfg = make_config(overrides=tiny_overrides(model_dir, corpus))
    cached = identify(cfg, tmp_path / "a", cache_dir=tmp_path / "cache", progress=False)
    monkeypatch.setenv("RARETOKEN_CACHE", str(tmp_path / "must-not-exist"))
    monkeypatch.setattr(stages_mod, "CHUNK_POSITIONS", 256)
    res = identify(cfg, tmp_path / "b", no_cache=True, progress=False)
    assert not (tmp_path / "must-not-exist").exists()
    for name in ("delta", "acts", "resid", "block_input", "base_loss"):
        arr = getattr(res, name)
        assert not isinstance(arr, np.memmap), name
        np.testing.assert_array_equal(arr, getattr(cached, name), err_msg=name)
    np.testing.assert_array_equal(res.neurons.delta_rare, cached.neurons.delta_rare)
    np.testing.assert_array_equal(res.rare_fit.plateau_neurons, cached.rare_fit.plateau_neurons)
    assert (tmp_path / "b" / "neurons.parquet").exists()
