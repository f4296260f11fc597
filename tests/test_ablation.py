"""All-neuron mean ablation: fast and exact methods against hooked full forward passes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raretoken.ablation.capture import capture_sample
from raretoken.ablation.exact import delta_loss_exact
from raretoken.ablation.fast import delta_loss_fast
from raretoken.ablation.inputs import AblationInputs, inputs_from_adapter, logits_of
from raretoken.ablation.naive import delta_loss_forward, delta_loss_recompute
from raretoken.data.sampling import ContextSample
from raretoken.errors import NumericalError
from raretoken.models.adapters import adapter_for
from tiny import FAMILIES, tiny_model


def _sample(vocab: int, n_windows: int = 3, seq: int = 33, seed: int = 0) -> ContextSample:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(n_windows, seq)).astype(np.int64)
    mask = np.ones((n_windows, seq - 1), dtype=bool)
    return ContextSample(
        input_ids=ids, target_ids=ids[:, 1:], target_mask=mask,
        doc_ids=tuple("d" for _ in range(n_windows)), offsets=np.arange(n_windows) * seq,
        window_len=seq - 1, bos_policy="none", seed=seed, mode="windows",
        n_stream_tokens=n_windows * seq, stream_fingerprint="test",
    )  # fmt: skip


def _setup(family: str, dtype: torch.dtype = torch.float64, seed: int = 0):
    model = tiny_model(family, seed=seed, dtype=dtype)
    adapter = adapter_for(model)
    sample = _sample(model.config.vocab_size, seed=seed)
    ref = _sample(model.config.vocab_size, seed=seed + 100)
    cap = capture_sample(model, adapter, sample, batch_size=2)
    ref_cap = capture_sample(model, adapter, ref, acts_only=True)
    mean = torch.from_numpy(ref_cap.acts.astype(np.float64).mean(0))
    inputs = inputs_from_adapter(
        adapter,
        torch.from_numpy(cap.resid).to(dtype),
        torch.from_numpy(cap.acts).to(dtype),
        torch.from_numpy(cap.targets),
        mean.to(dtype),
    )
    return model, adapter, sample, cap, inputs


@pytest.mark.parametrize("family", FAMILIES)
def test_capture_matches_model_logits(family: str) -> None:
    model, _, sample, cap, inputs = _setup(family)
    with torch.no_grad():
        z = (
            model(input_ids=torch.from_numpy(sample.input_ids))
            .logits[:, :-1]
            .reshape(-1, model.config.vocab_size)
        )
    # the captured residual (stored float32) reproduces the model's logits through the adapter
    ours = logits_of(inputs.resid, inputs)
    assert torch.allclose(ours, z, atol=1e-4)
    base = torch.logsumexp(z, -1) - z.gather(1, inputs.targets[:, None]).squeeze(1)
    assert np.allclose(cap.base_loss, base.numpy(), atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_fast_and_exact_match_hooked_forward(family: str) -> None:
    model, adapter, sample, cap, _ = _setup(family)
    # Exact float64 reference: re-capture in float64 (capture stores float32)
    with torch.no_grad():
        from raretoken.models.hooks import capture_input

        with (
            capture_input(adapter.final_norm_module()) as rs,
            capture_input(adapter.mlp_out_proj(-1)) as ac,
        ):
            model(input_ids=torch.from_numpy(sample.input_ids))
    mask = torch.from_numpy(sample.target_mask)
    resid = rs[-1][:, :-1][mask]
    acts = ac[-1][:, :-1][mask]
    mean = acts.mean(0) * 0.5 + 0.01  # any reference value works for the identity
    inputs = inputs_from_adapter(adapter, resid, acts, torch.from_numpy(cap.targets), mean)
    neurons = [0, 5, 17, 31, 63]
    truth = delta_loss_forward(
        model, adapter, torch.from_numpy(sample.input_ids), mask, mean, neurons
    )
    fast, stats = delta_loss_fast(inputs, tol=1e-9)
    exact = delta_loss_exact(inputs)
    recompute = delta_loss_recompute(inputs, neurons)
    # Llama's HF RMSNorm computes in float32 even for float64 models; allow for that.
    atol = 1e-5
    assert (fast[:, neurons].double() - truth).abs().max() <= atol
    assert (exact[:, neurons] - truth).abs().max() <= atol
    assert (recompute - truth).abs().max() <= atol
    assert (exact.float() - fast).abs().max() <= 1e-6
    assert stats.n_pairs == inputs.n_positions * inputs.n_neurons


@pytest.mark.parametrize("head_size", [0, 4, 64, 10_000])
def test_fast_bound_holds_for_large_ablations(head_size: int) -> None:
    """Scale activations up so many pairs leave the Taylor regime: the bound must catch them."""
    _, _, _, _, inputs = _setup("llama", seed=3)
    big = AblationInputs(
        resid=inputs.resid, acts=inputs.acts * 20, targets=inputs.targets, w_out=inputs.w_out,
        mean_acts=inputs.mean_acts, norm=inputs.norm, w_u=inputs.w_u, b_u=inputs.b_u,
    )  # fmt: skip
    exact = delta_loss_exact(big)
    for tol in (1e-4, 1e-7):
        fast, stats = delta_loss_fast(big, tol=tol, head_size=head_size)
        assert (fast.double() - exact).abs().max() <= tol + 1e-6
        # with the whole vocabulary in the head nothing is approximated, so nothing falls back
        assert (stats.n_fallback > 0) == (head_size < big.w_u.shape[0])


def test_fast_without_fallback_is_accurate_where_taylor_applies() -> None:
    """With an infinite tolerance nothing falls back; small ablations are still accurate."""
    _, _, _, _, inputs = _setup("gpt2", seed=1)
    small = AblationInputs(
        resid=inputs.resid, acts=inputs.mean_acts + 0.01 * (inputs.acts - inputs.mean_acts),
        targets=inputs.targets, w_out=inputs.w_out, mean_acts=inputs.mean_acts,
        norm=inputs.norm, w_u=inputs.w_u, b_u=inputs.b_u,
    )  # fmt: skip
    fast, stats = delta_loss_fast(small, tol=float("inf"))
    assert stats.n_fallback == 0
    exact = delta_loss_exact(small)
    assert (fast.double() - exact).abs().max() < 1e-6


def test_neuron_blocks_and_chunks_do_not_change_results() -> None:
    _, _, _, _, inputs = _setup("neox", seed=2)
    a, _ = delta_loss_fast(inputs, tol=1e-8)
    b, _ = delta_loss_fast(inputs, tol=1e-8, neuron_block=20, chunk_positions=40)
    assert torch.allclose(a, b, atol=1e-7)


def test_ablating_to_own_value_changes_nothing() -> None:
    _, _, _, _, inputs = _setup("gpt2")
    same = AblationInputs(
        resid=inputs.resid[:4], acts=inputs.acts[:4].clone() * 0 + inputs.mean_acts,
        targets=inputs.targets[:4], w_out=inputs.w_out, mean_acts=inputs.mean_acts,
        norm=inputs.norm, w_u=inputs.w_u, b_u=inputs.b_u,
    )  # fmt: skip
    fast, _ = delta_loss_fast(same)
    assert fast.abs().max() < 1e-9


def test_nan_activations_are_refused() -> None:
    _, _, _, _, inputs = _setup("gpt2")
    acts = inputs.acts.clone()
    acts[0, 0] = float("nan")
    bad = AblationInputs(
        resid=inputs.resid, acts=acts, targets=inputs.targets, w_out=inputs.w_out,
        mean_acts=inputs.mean_acts, norm=inputs.norm, w_u=inputs.w_u, b_u=inputs.b_u,
    )  # fmt: skip
    with pytest.raises(NumericalError):
        delta_loss_fast(bad)


def test_float32_with_bfloat16_high_orders_keeps_the_bound() -> None:
    """float32 inputs use bfloat16 for the 3rd/4th-order products; the bound must cover it."""
    _, _, _, _, inputs = _setup("llama", seed=4)
    big = AblationInputs(
        resid=inputs.resid, acts=inputs.acts * 8, targets=inputs.targets, w_out=inputs.w_out,
        mean_acts=inputs.mean_acts, norm=inputs.norm, w_u=inputs.w_u, b_u=inputs.b_u,
    )  # fmt: skip
    exact = delta_loss_exact(big)
    f32 = big.to("cpu", torch.float32)
    for tol in (1e-3, 1e-4):
        fast, stats = delta_loss_fast(f32, tol=tol, head_size=4)
        assert stats.n_fallback < stats.n_pairs  # the approximation is used somewhere
        # float32 rounding of the inputs themselves is ~1e-6 here
        assert (fast.double() - exact).abs().max() <= tol + 1e-5
