"""Mean ablation of any MLP layer: exact batched pass, linear screen, screen quality.

* exact per-layer path vs one whole hooked forward pass per neuron, every family, float64;
* linear screen vs central finite differences of a scaled ablation ``a + ε(n̄ - a)``;
* the final layer: equal to the closed-form methods of :mod:`raretoken.ablation.exact` / ``fast``;
* screen-quality statistics on hand-made answers;
* bad input: one-line errors before any model work.

Hugging Face's RMSNorm (and OLMo's LayerNorm) compute in float32 even for float64 models, which
makes finite differences noisy (~1e-7 / ε); where a test needs float64 throughout,
:func:`_native_norms` swaps those forwards for float64 ones on the (test-only) tiny model.
"""

from __future__ import annotations

import json
import types
from typing import Any

import numpy as np
import pytest
import scipy.stats
import torch
from torch import nn

from raretoken.ablation.exact import delta_loss_exact
from raretoken.ablation.fast import delta_loss_fast
from raretoken.ablation.inputs import inputs_from_adapter
from raretoken.ablation.layer import (
    LayerAblation,
    ScreenQuality,
    layer_ablation,
    screen_quality,
    top_by_magnitude,
)
from raretoken.ablation.layer_exact import (
    exact_layer_delta,
    has_post_mlp_norm,
    layer_delta_forward,
)
from raretoken.ablation.layer_inputs import layer_mean_acts
from raretoken.ablation.layer_screen import screen_layers
from raretoken.errors import ConfigError, InsufficientDataError
from raretoken.models.adapters import ModelAdapter, adapter_for
from raretoken.models.hooks import capture_input
from tiny import D_MLP, N_LAYERS, tiny_model

FAMS = ("gpt2", "neox", "llama", "qwen3", "phi3")  # qwen3 and phi3 use sliding windows


def _native_norms(model: nn.Module) -> nn.Module:
    """Make every RMSNorm / OLMo LayerNorm of a tiny model compute in its own dtype."""

    def rms(self: Any, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (
            x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        )

    def olmo(self: Any, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.layer_norm(x, self.normalized_shape, None, None, eps=1e-5)

    for mod in model.modules():
        if hasattr(mod, "variance_epsilon") and isinstance(
            getattr(mod, "weight", None), torch.Tensor
        ):
            mod.forward = types.MethodType(rms, mod)  # type: ignore[method-assign]
        elif type(mod).__name__ == "OlmoLayerNorm":
            mod.forward = types.MethodType(olmo, mod)  # type: ignore[method-assign]
    return model


def _windows(seed: int = 0, n: int = 3, seq: int = 18) -> tuple[np.ndarray, np.ndarray]:
    """Random windows; some positions unscored, the last two of every window too (so the
    batched passes cut the windows)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 300, size=(n, seq))
    mask = rng.random((n, seq - 1)) < 0.75
    mask[:, -2:] = False
    mask[0, 0] = True
    return ids, mask


def _setup(
    fam: str, native: bool = False, seed: int = 0
) -> tuple[ModelAdapter, np.ndarray, np.ndarray]:
    model = tiny_model(fam, seed=seed)
    if native:
        _native_norms(model)
    ids, mask = _windows(seed)
    return adapter_for(model), ids, mask


def _mean(adapter: ModelAdapter, layer: int, seed: int = 1) -> np.ndarray:
    ids, _ = _windows(seed + 50)
    return layer_mean_acts(adapter, ids, np.ones((ids.shape[0], ids.shape[1] - 1), bool), [layer])[
        adapter.layer_index(layer)
    ]


# ----------------------------------------------------------------- exact pass


@pytest.mark.parametrize("fam", FAMS)
def test_exact_matches_one_hooked_forward_per_neuron(fam: str) -> None:
    adapter, ids, mask = _setup(fam)
    neurons = [0, 9, 31, 40, 63]
    for layer in range(N_LAYERS):
        mean = _mean(adapter, layer)
        # 3 windows in batches of 2, 5 neurons in passes of 2 (max_rows 4 / 2 windows)
        got = exact_layer_delta(
            adapter, ids, mask, layer, mean, neurons, batch_windows=2, max_rows=4
        )
        truth = layer_delta_forward(adapter, ids, mask, layer, mean, neurons, batch_windows=3)
        assert got.shape == (mask.sum(), len(neurons))
        assert np.abs(truth).max() > 1e-3  # the ablations do something
        np.testing.assert_allclose(got, truth, atol=1e-6, rtol=0)


@pytest.mark.parametrize("fam", ["gpt2", "phi3"])
def test_rerun_path_matches_one_hooked_forward_per_neuron(fam: str) -> None:
    """The general path (block L re-run with a hook) agrees with the residual shift."""
    adapter, ids, mask = _setup(fam, seed=1)
    neurons = [2, 30, 61]
    assert not has_post_mlp_norm(adapter, 0)
    for layer in (0, 2):
        mean = _mean(adapter, layer)
        got = exact_layer_delta(
            adapter, ids, mask, layer, mean, neurons, max_rows=4, method="rerun"
        )
        truth = layer_delta_forward(adapter, ids, mask, layer, mean, neurons)
        np.testing.assert_allclose(got, truth, atol=1e-6, rtol=0)


@pytest.mark.parametrize("fam", ["gemma2", "olmo2"])
def test_post_mlp_norm_families_rerun_their_layer(fam: str) -> None:
    """Gemma 2 (post-MLP norm, soft-capped logits, sliding windows) and OLMo 2: the residual
    shift would be wrong there, so ``auto`` re-runs block L; it matches the hooked forward."""
    build = pytest.importorskip("test_postnorm_families").build
    adapter = adapter_for(build(fam))
    ids, mask = _windows(3)
    neurons = [4, 33]
    assert has_post_mlp_norm(adapter, 1)
    for layer in (0, 2):
        mean = _mean(adapter, layer)
        got = exact_layer_delta(adapter, ids, mask, layer, mean, neurons, max_rows=4)
        truth = layer_delta_forward(adapter, ids, mask, layer, mean, neurons)
        np.testing.assert_allclose(got, truth, atol=1e-6, rtol=0)
        wrong = exact_layer_delta(adapter, ids, mask, layer, mean, neurons, method="residual")
        assert np.abs(wrong - truth).max() > 1e-4


@pytest.mark.parametrize("fam", FAMS)
def test_final_layer_equals_closed_form_methods(fam: str) -> None:
    adapter, ids, mask = _setup(fam, native=True)
    model = adapter.model
    mean = _mean(adapter, -1)
    ours = exact_layer_delta(adapter, ids, mask, -1, mean, range(D_MLP), max_rows=64)
    with (
        torch.no_grad(),
        capture_input(adapter.final_norm_module()) as rs,
        capture_input(adapter.mlp_out_proj(-1)) as ac,
    ):
        model(input_ids=torch.from_numpy(ids))
    m = torch.from_numpy(mask)
    targets = torch.from_numpy(ids[:, 1:])[m]
    inputs = inputs_from_adapter(
        adapter, rs[-1][:, :-1][m], ac[-1][:, :-1][m], targets, torch.from_numpy(mean)
    )
    np.testing.assert_allclose(ours, delta_loss_exact(inputs).numpy(), atol=1e-9, rtol=0)
    fast, _ = delta_loss_fast(inputs, tol=1e-9)
    np.testing.assert_allclose(
        ours, fast.double().numpy(), atol=2e-7, rtol=0
    )  # fast returns float32


# ----------------------------------------------------------------- screen


@pytest.mark.parametrize("fam", FAMS)
def test_screen_matches_finite_differences(fam: str) -> None:
    adapter, ids, mask = _setup(fam, native=True, seed=2)
    rows = np.arange(int(mask.sum()))
    sets = {"rare": rows[::3], "common": np.setdiff1d(rows, rows[::3])}
    neurons = [1, 22, 50]
    means = {layer: _mean(adapter, layer) for layer in (0, 1)}
    screen = screen_layers(adapter, ids, mask, means, sets, batch_windows=2)
    eps = 1e-4
    for layer in (0, 1):
        up = layer_delta_forward(adapter, ids, mask, layer, means[layer], neurons, scale=eps)
        down = layer_delta_forward(adapter, ids, mask, layer, means[layer], neurons, scale=-eps)
        fd = (up - down) / (2 * eps)
        for name, r in sets.items():
            est = screen[layer][name][neurons]
            assert np.abs(est).max() > 1e-3
            np.testing.assert_allclose(est, fd[r].mean(0), atol=1e-8, rtol=0)
    # one layer alone gives the same as layers screened together
    alone = screen_layers(adapter, ids, mask, {1: means[1]}, sets, batch_windows=3)
    np.testing.assert_allclose(alone[1]["rare"], screen[1]["rare"], atol=1e-12, rtol=0)


def test_screen_is_additive_over_target_sets_and_batches() -> None:
    """Sums over disjoint target sets add up; the batch size does not change the result."""
    adapter, ids, mask = _setup("neox")
    rows = np.arange(int(mask.sum()))
    a, b = rows[rows % 2 == 0], rows[rows % 2 == 1]
    mean = _mean(adapter, 1)
    one = screen_layers(
        adapter, ids, mask, {1: mean}, {"all": rows, "a": a, "b": b}, batch_windows=1
    )[1]
    three = screen_layers(adapter, ids, mask, {1: mean}, {"all": rows}, batch_windows=3)[1]
    total = (one["a"] * a.size + one["b"] * b.size) / rows.size
    np.testing.assert_allclose(one["all"], total, atol=1e-12, rtol=0)
    np.testing.assert_allclose(one["all"], three["all"], atol=1e-12, rtol=0)


# ----------------------------------------------------------------- quality


def test_screen_quality_known_answers() -> None:
    ids = np.arange(8)
    exact_ids = np.array([0, 1, 2, 5, 6, 7])
    from_random = np.array([False, False, False, True, True, True])
    # perfect screen (equal to the exact values where known, small elsewhere)
    exact = np.array([5.0, -4.0, 3.0, 2.0, 1.0, 0.5])
    screen = np.array([5.0, -4.0, 3.0, 0.1, 0.1, 2.0, 1.0, 0.5])
    q = screen_quality(screen, exact_ids, exact, from_random, k=2)
    assert q.spearman == pytest.approx(1.0) and q.spearman_random == pytest.approx(1.0)
    assert q.recall == 1.0 and q.k == 2 and q.n_exact == 6 and q.n_random == 3
    # screen top-4: 0, 1, 2, 5; random outside it: 6, 7 (|1|, |0.5| < threshold 4)
    assert q.est_missed == 0.0
    # a screen that misses neuron 6, whose exact effect is the second largest
    bad = np.array([5.0, 0.0, 0.2, 3.0, 2.0, 0.3, 0.1, 1.0])
    exact2 = np.array([5.0, -4.0, 3.0, 2.0, 4.5, 0.5])
    q2 = screen_quality(bad, exact_ids, exact2, from_random, k=2)
    # exact top-2 by |.|: 0 (5), 6 (4.5); screen top-4: 0, 3, 4, 7 -> recall 1/2
    assert q2.recall == 0.5
    # random outside the screen's top-4: 5 (2.0), 6 (4.5); threshold 4.5 -> 1/2 of 4 neurons
    assert q2.est_missed == pytest.approx(2.0)
    ranks = scipy.stats.rankdata
    expect = np.corrcoef(ranks(bad[exact_ids]), ranks(exact2))[0, 1]
    assert q2.spearman == pytest.approx(expect)
    # random: screen (0.3, 0.1, 1.0) vs exact (2.0, 4.5, 0.5): ranks (2, 1, 3) vs (2, 3, 1),
    # sum of squared rank differences 8: rho = 1 - 6 * 8 / (3 * 8) = -1
    assert q2.spearman_random == pytest.approx(-1.0)
    assert np.isnan(
        screen_quality(bad, exact_ids[:5], exact2[:5], from_random[:5], 2).spearman_random
    )
    assert list(top_by_magnitude(np.array([1.0, -3.0, 3.0, 0.5]), ids[:4], 3)) == [1, 2, 0]
    assert ScreenQuality.from_dict(json.loads(json.dumps(q2.to_dict()))) == q2


# ----------------------------------------------------------------- top level


@pytest.mark.parametrize("fam", ["gpt2", "qwen3"])
def test_layer_ablation_end_to_end(fam: str) -> None:
    adapter, ids, mask = _setup(fam)
    n = int(mask.sum())
    rare, common = np.arange(0, n, 4), np.setdiff1d(np.arange(n), np.arange(0, n, 4))
    mean = _mean(adapter, 1)
    res = layer_ablation(adapter, ids, mask, 1, mean, rare_rows=rare, common_rows=common,
                         top_k=6, n_random=5, seed=3, quality_k=3, keep_positions=True)  # fmt: skip
    assert res.layer == 1 and res.n_rare == rare.size and res.n_common == common.size
    # the union of both sets' top-6 (rare's first), then 5 at random
    top_r = top_by_magnitude(res.screen_rare, res.neuron_ids, 6)
    top_c = top_by_magnitude(res.screen_common, res.neuron_ids, 6)
    n_top = len(set(top_r) | set(top_c))
    n_ex = n_top + 5
    assert res.exact_ids.size == n_ex and np.unique(res.exact_ids).size == n_ex
    assert list(res.exact_ids[:6]) == list(top_r)
    assert set(res.exact_ids[:n_top]) == set(top_r) | set(top_c)
    assert not res.exact_from_random[:n_top].any() and res.exact_from_random[n_top:].all()
    screen = screen_layers(adapter, ids, mask, {1: mean}, {"rare": rare, "common": common})[1]
    np.testing.assert_allclose(res.screen_common, screen["common"], atol=1e-12, rtol=0)
    truth = layer_delta_forward(adapter, ids, mask, 1, mean, res.exact_ids)
    np.testing.assert_allclose(res.exact_rare, truth[rare].mean(0), atol=1e-9, rtol=0)
    np.testing.assert_allclose(
        res.exact_common_abs, np.abs(truth[common]).mean(0), atol=1e-9, rtol=0
    )
    assert res.exact_delta is not None and res.exact_delta.shape == (n, n_ex)
    # the exact effects of the screen's top neurons dwarf the random ones on average
    assert np.abs(res.exact_rare[:6]).mean() > np.abs(res.exact_rare[res.exact_from_random]).mean()
    assert -1 <= res.quality_rare.spearman <= 1 and 0 <= res.quality_rare.recall <= 1
    back = LayerAblation.from_dict(json.loads(json.dumps(res.to_dict())))
    assert back.to_dict() == res.to_dict()
    # seeded: same seed, same sample; another seed, another sample; precomputed screen reused
    again = layer_ablation(adapter, ids, mask, 1, mean, rare_rows=rare, common_rows=common,
                           top_k=6, n_random=5, seed=3, screen=screen)  # fmt: skip
    np.testing.assert_array_equal(again.exact_ids, res.exact_ids)
    other = layer_ablation(adapter, ids, mask, 1, mean, rare_rows=rare, common_rows=common,
                           top_k=6, n_random=5, seed=4, screen=screen)  # fmt: skip
    assert list(other.exact_ids) != list(res.exact_ids)
    assert list(other.exact_ids[:n_top]) == list(res.exact_ids[:n_top])
    rare_only = layer_ablation(adapter, ids, mask, 1, mean, rare_rows=rare, common_rows=common,
                               top_k=6, n_random=5, seed=3, screen=screen, select_by="rare")  # fmt: skip
    assert rare_only.exact_ids.size == 11 and list(rare_only.exact_ids[:6]) == list(top_r)


def test_mean_acts_follow_the_capture_convention() -> None:
    from raretoken.ablation.capture import capture_sample
    from test_ablation import _sample

    model = tiny_model("llama")
    adapter = adapter_for(model)
    sample = _sample(300, n_windows=3, seq=12)
    cap = capture_sample(model, adapter, sample, acts_only=True)
    got = layer_mean_acts(adapter, sample.input_ids, sample.target_mask, [-1, 0])
    assert sorted(got) == [0, 2]
    np.testing.assert_allclose(got[2], cap.acts.astype(np.float64).mean(0), atol=1e-6, rtol=0)


# ----------------------------------------------------------------- bad input


class _NoForward:
    """Fails the test if the model runs a forward pass."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> None:
        def hook(*_: Any) -> None:
            raise AssertionError("the model ran before the input was checked")

        self.handle = self.model.register_forward_pre_hook(hook)
        self.handles = [m.register_forward_pre_hook(hook) for m in self.model.modules()]

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()
        for h in self.handles:
            h.remove()


def test_bad_input_is_refused_before_model_work() -> None:
    adapter, ids, mask = _setup("llama")
    mean = np.zeros(D_MLP)
    n = int(mask.sum())
    ok: dict[str, Any] = {"rare_rows": [0, 1], "common_rows": [2, 3]}
    cases: list[tuple[type[Exception], str, Any]] = [
        (ConfigError, "out of range", lambda: layer_ablation(adapter, ids, mask, N_LAYERS, mean, **ok)),
        (ConfigError, "out of range", lambda: exact_layer_delta(adapter, ids, mask, -4, mean, [0])),
        (ConfigError, "out of range", lambda: screen_layers(adapter, ids, mask, {7: mean}, {"a": [0]})),
        (ConfigError, "out of range", lambda: layer_mean_acts(adapter, ids, mask, [3])),
        (ConfigError, "outside layer", lambda: exact_layer_delta(adapter, ids, mask, 0, mean, [0, D_MLP])),
        (ConfigError, "outside layer", lambda: layer_delta_forward(adapter, ids, mask, 0, mean, [-1])),
        (ConfigError, "mean_acts", lambda: layer_ablation(adapter, ids, mask, 0, mean[:5], **ok)),
        (ConfigError, "rows must lie", lambda: layer_ablation(adapter, ids, mask, 0, mean, rare_rows=[n], common_rows=[0])),
        (ConfigError, "duplicates", lambda: layer_ablation(adapter, ids, mask, 0, mean, rare_rows=[1, 1], common_rows=[0])),
        (InsufficientDataError, "no positions", lambda: layer_ablation(adapter, ids, mask, 0, mean, rare_rows=[], common_rows=[0])),
        (ConfigError, "top_k", lambda: layer_ablation(adapter, ids, mask, 0, mean, top_k=-1, **ok)),
        (ConfigError, "select_by", lambda: layer_ablation(adapter, ids, mask, 0, mean, select_by="x", **ok)),
        (ConfigError, "screen", lambda: layer_ablation(adapter, ids, mask, 0, mean, screen={"rare": mean}, **ok)),
        (ConfigError, "target_mask", lambda: exact_layer_delta(adapter, ids, mask[:, :-1], 0, mean, [0])),
        (ConfigError, "token ids", lambda: exact_layer_delta(adapter, ids + 300, mask, 0, mean, [0])),
        (InsufficientDataError, "no scored", lambda: exact_layer_delta(adapter, ids, mask & False, 0, mean, [0])),
        (ConfigError, "max_rows", lambda: exact_layer_delta(adapter, ids, mask, 0, mean, [0], max_rows=0)),
        (ConfigError, "NaN", lambda: exact_layer_delta(adapter, ids, mask, 0, mean + np.nan, [0])),
    ]  # fmt: skip
    with _NoForward(adapter.model):
        for exc, match, call in cases:
            with pytest.raises(exc, match=match) as info:
                call()
            assert "\n" not in str(info.value)
