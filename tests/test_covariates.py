from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import scipy.stats
import torch

from raretoken.errors import ConfigError, InsufficientDataError, NumericalError
from raretoken.models.adapters import adapter_for
from raretoken.models.hooks import capture_input
from raretoken.stats.covariates import (
    NeuronCovariates,
    default_null_space_k,
    neuron_covariates,
    unembedding_null_space,
)
from tiny import tiny_model

# ----------------------------------------------------------------------------- helpers


def orthonormal(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.normal(size=(n, k)))
    return q


def reference(
    w_out: np.ndarray,
    gamma: np.ndarray,
    w_u: np.ndarray,
    *,
    layernorm: bool,
    k: int,
    log_freq: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Straightforward implementation: the full (V, d_mlp) projection matrix and a full SVD."""
    w = w_out - w_out.mean(axis=1, keepdims=True) if layernorm else w_out
    p = w_u @ (w * gamma).T
    p = p - p.mean(axis=0)
    out = {
        "vocab_kurtosis": scipy.stats.kurtosis(p, axis=0, fisher=False, bias=True),
        "vocab_skew": scipy.stats.skew(p, axis=0, bias=True),
    }
    if log_freq is not None:
        s = np.isfinite(log_freq)
        out["unigram_cosine"] = np.array(
            [np.corrcoef(p[s, i], log_freq[s])[0, 1] for i in range(p.shape[1])]
        )
    d = w_u.shape[1]
    w_eff = (w_u - w_u.mean(axis=0)) * gamma
    if layernorm:
        w_eff = w_eff @ (np.eye(d) - np.full((d, d), 1.0 / d))
    _, s_vals, vt = np.linalg.svd(w_eff, full_matrices=False)
    if layernorm:  # the mean direction is an exact null direction: not counted
        ones = np.ones(d) / np.sqrt(d)
        assert abs(vt[-1] @ ones) > 1 - 1e-8 and s_vals[-1] < 1e-8 * s_vals[0]
        vt, s_vals = vt[:-1], s_vals[:-1]
    null = vt[-k:]
    out["null_space_fraction"] = ((w @ null.T) ** 2).sum(axis=1) / (w**2).sum(axis=1)
    out["singular_values"] = s_vals
    return out


def small_inputs(seed: int = 0, v: int = 50, d: int = 6, d_mlp: int = 5) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {
        "w_out": rng.normal(size=(d_mlp, d)),
        "w_in": {"in": rng.normal(size=(d_mlp, d))},
        "norm_weight": 1.0 + 0.3 * rng.normal(size=d),
        "W_U": rng.normal(size=(v, d)),
        "acts": rng.normal(size=(20, d_mlp)),
    }


# ------------------------------------------------------------------ covariates: known answers


def test_null_space_known_answer_rmsnorm() -> None:
    rng = np.random.default_rng(0)
    v, d = 40, 6
    # token-side orthonormal columns orthogonal to the all-ones vector (centring leaves them)
    u = np.linalg.qr(np.column_stack([np.ones(v), rng.normal(size=(v, d))]))[0][:, 1:]
    q = orthonormal(rng, d, d)
    s = np.array([10.0, 8.0, 6.0, 4.0, 2.0, 0.5])
    gamma = rng.uniform(0.5, 2.0, size=d)
    # W_eff = (W_U - mean) diag(gamma) = u diag(s) qᵀ, plus a constant row the centring removes
    w_u = (u * s) @ q.T / gamma + np.outer(np.ones(v), rng.normal(size=d))
    w_out = np.stack(
        [3.0 * q[:, -1], q[:, 0], 2.0 * q[:, -1] + q[:, 0], q[:, -2], np.zeros(d)], axis=0
    )
    acts = rng.normal(size=(4, 5))
    cov = neuron_covariates(w_out, {}, gamma, w_u, acts, None, 1, norm_kind="rmsnorm")
    np.testing.assert_allclose(cov.unembed_singular_values, s, rtol=1e-10)
    np.testing.assert_allclose(cov.null_space_fraction[:4], [1.0, 0.0, 0.8, 0.0], atol=1e-12)
    assert np.isnan(cov.null_space_fraction[4])  # zero vector
    assert np.isnan(cov.vocab_kurtosis[4]) and np.isnan(cov.vocab_skew[4])
    np.testing.assert_allclose(cov.w_out_norm, [3.0, 1.0, np.sqrt(5.0), 1.0, 0.0], atol=1e-12)
    cov2 = neuron_covariates(w_out, {}, gamma, w_u, acts, None, 2)
    np.testing.assert_allclose(cov2.null_space_fraction[:4], [1.0, 0.0, 0.8, 1.0], atol=1e-12)
    assert cov2.null_space_k == 2 and cov.null_space_k == 1
    basis, sv = unembedding_null_space(w_u, gamma, k=2)
    np.testing.assert_allclose(basis @ basis.T, q[:, -2:] @ q[:, -2:].T, atol=1e-10)
    np.testing.assert_allclose(sv, s, rtol=1e-10)


def test_null_space_known_answer_layernorm_ignores_the_mean_direction() -> None:
    rng = np.random.default_rng(1)
    v, d = 50, 7
    u = np.linalg.qr(np.column_stack([np.ones(v), rng.normal(size=(v, d - 1))]))[0][:, 1:]
    # residual-side directions orthogonal to the all-ones vector
    q = np.linalg.qr(np.column_stack([np.ones(d), rng.normal(size=(d, d - 1))]))[0][:, 1:]
    s = np.array([9.0, 7.0, 5.0, 3.0, 2.0, 0.1])
    gamma = rng.uniform(0.5, 2.0, size=d)
    w_u = (u * s) @ q.T / gamma
    base = np.stack([q[:, -1], q[:, 0], q[:, -1] + 2.0 * q[:, 1]])
    shifted = base + np.array([[5.0], [-3.0], [0.7]])  # a constant that LayerNorm removes
    acts = rng.normal(size=(4, 3))
    lf = rng.normal(size=v)
    ln = neuron_covariates(shifted, {}, gamma, w_u, acts, lf, 1, norm_kind="layernorm")
    np.testing.assert_allclose(ln.null_space_fraction, [1.0, 0.0, 0.2], atol=1e-12)
    np.testing.assert_allclose(ln.unembed_singular_values, s, rtol=1e-10)
    ref = neuron_covariates(base, {}, gamma, w_u, acts, lf, 1, norm_kind="layernorm")
    for name in ("vocab_kurtosis", "vocab_skew", "unigram_cosine", "null_space_fraction"):
        np.testing.assert_allclose(getattr(ln, name), getattr(ref, name), rtol=1e-9, atol=1e-12)
    assert not np.allclose(ln.w_out_norm, ref.w_out_norm)  # raw norm: not centred
    # without the LayerNorm centring the all-ones component is part of the vector (and the
    # all-ones direction, an exact null direction of this W_U, is the k=1 null space)
    rms = neuron_covariates(shifted, {}, gamma, w_u, acts, lf, 1, norm_kind="rmsnorm")
    assert rms.null_space_fraction[0] == pytest.approx(25 * d / (1 + 25 * d), rel=1e-9)


def test_vocab_moments_match_scipy_and_planted_tails() -> None:
    rng = np.random.default_rng(2)
    v, d = 300, 8
    w_u = rng.standard_t(df=3, size=(v, d))
    w_u[0] = 0.0
    w_u[0, 0] = 60.0  # one token far out along e_0
    gamma = rng.uniform(0.5, 1.5, size=d)
    w_out = rng.normal(size=(6, d))
    w_out[0] = np.eye(d)[0]
    w_out[1] = -2.5 * np.eye(d)[0]
    acts = rng.normal(size=(10, 6))
    cov = neuron_covariates(w_out, {}, gamma, w_u, acts, None, 2, norm_kind="rmsnorm")
    ref = reference(w_out, gamma, w_u, layernorm=False, k=2)
    np.testing.assert_allclose(cov.vocab_kurtosis, ref["vocab_kurtosis"], rtol=1e-10)
    np.testing.assert_allclose(cov.vocab_skew, ref["vocab_skew"], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(cov.null_space_fraction, ref["null_space_fraction"], rtol=1e-9)
    # the planted token makes e_0's projection heavy-tailed and right-skewed; -e_0 mirrors it
    assert cov.vocab_kurtosis[0] > 50 and cov.vocab_skew[0] > 5
    assert cov.vocab_kurtosis[1] == pytest.approx(cov.vocab_kurtosis[0], rel=1e-12)
    assert cov.vocab_skew[1] == pytest.approx(-cov.vocab_skew[0], rel=1e-12)
    # chunking does not change the answer (about 1-3 vocabulary rows per chunk)
    tiny_chunks = neuron_covariates(
        w_out, {}, gamma, w_u, acts, None, 2, norm_kind="rmsnorm", chunk_elements=17
    )
    for name in ("vocab_kurtosis", "vocab_skew", "null_space_fraction"):
        np.testing.assert_allclose(getattr(tiny_chunks, name), getattr(cov, name), rtol=1e-9)


def test_unigram_cosine_planted_direction_and_unseen_tokens() -> None:
    rng = np.random.default_rng(3)
    v, d = 200, 6
    log_freq = np.log(1.0 / np.arange(1, v + 1))  # Zipf
    unseen = rng.choice(v, size=10, replace=False)
    log_freq[unseen] = -np.inf
    seen = np.isfinite(log_freq)
    lc = log_freq[seen] - log_freq[seen].mean()
    w_u = rng.normal(size=(v, d))
    w_u[seen, 0] = 3.0 * log_freq[seen] + 7.0  # the frequency direction on e_0
    w_u[unseen, 0] = 1e3 * rng.normal(size=unseen.size)  # junk the cosine must ignore
    c = rng.normal(size=seen.sum())  # e_1: centred and orthogonal to the frequency direction
    c -= c.mean()
    c -= (c @ lc) / (lc @ lc) * lc
    w_u[seen, 1] = c
    gamma = np.array([2.0, 0.5, 1.0, 1.0, 1.0, 1.0])
    e = np.eye(d)
    w_out = np.stack([e[0], -e[0], e[1], e[0] + e[1], 0.1 * rng.normal(size=d)])
    acts = rng.normal(size=(5, 5))
    cov = neuron_covariates(w_out, {}, gamma, w_u, acts, log_freq, norm_kind="rmsnorm")
    assert cov.unigram_cosine is not None and cov.n_unigram_tokens == v - 10
    a, b = 2.0 * 3.0 * np.linalg.norm(lc), 0.5 * np.linalg.norm(c)
    expected = [1.0, -1.0, 0.0, a / np.hypot(a, b)]
    np.testing.assert_allclose(cov.unigram_cosine[:4], expected, atol=1e-10)
    ref = reference(w_out, gamma, w_u, layernorm=False, k=1, log_freq=log_freq)
    np.testing.assert_allclose(cov.unigram_cosine, ref["unigram_cosine"], atol=1e-10)
    # other junk in the unseen rows: same cosines (the moments use every token and change)
    w_u2 = w_u.copy()
    w_u2[unseen, 0] = -5e2 * rng.normal(size=unseen.size)
    cov2 = neuron_covariates(w_out, {}, gamma, w_u2, acts, log_freq, norm_kind="rmsnorm")
    assert cov2.unigram_cosine is not None
    np.testing.assert_allclose(cov2.unigram_cosine, cov.unigram_cosine, atol=1e-10)
    assert not np.allclose(cov2.vocab_kurtosis[:2], cov.vocab_kurtosis[:2])
    # the log base does not matter
    cov10 = neuron_covariates(w_out, {}, gamma, w_u, acts, log_freq / np.log(10.0))
    assert cov10.unigram_cosine is not None
    np.testing.assert_allclose(cov10.unigram_cosine, cov.unigram_cosine, atol=1e-12)
    no_freq = neuron_covariates(w_out, {}, gamma, w_u, acts)
    assert no_freq.unigram_cosine is None and "unigram_cosine" not in no_freq.columns()
    bad = log_freq.copy()
    bad[0] = np.nan
    with pytest.raises(NumericalError):
        neuron_covariates(w_out, {}, gamma, w_u, acts, bad)
    bad[0] = np.inf
    with pytest.raises(NumericalError):
        neuron_covariates(w_out, {}, gamma, w_u, acts, bad)
    with pytest.raises(ConfigError):
        neuron_covariates(w_out, {}, gamma, w_u, acts, log_freq[:-1])
    one_seen = np.full(v, -np.inf)
    one_seen[0] = -1.0
    with pytest.raises(InsufficientDataError):
        neuron_covariates(w_out, {}, gamma, w_u, acts, one_seen)


def test_activation_moments_chunked_memmap_equals_in_memory(tmp_path: Any) -> None:
    rng = np.random.default_rng(4)
    n, d_mlp = 1001, 7
    acts = rng.normal(size=(n, d_mlp)).astype(np.float32)
    acts[:, 1] = np.maximum(acts[:, 1], 0.0)  # ReLU-like: exact zeros are not positive
    acts[:, 2] = -np.abs(acts[:, 2])
    acts[:, 3] = 0.0
    acts[:, 4] += np.float32(3e4)  # a large offset: the chunked variance must stay accurate
    path = tmp_path / "acts.f32"
    mm = np.memmap(path, dtype=np.float32, mode="w+", shape=(n, d_mlp))
    mm[:] = acts
    mm.flush()
    ro = np.memmap(path, dtype=np.float32, mode="r", shape=(n, d_mlp))
    base = small_inputs(d_mlp=d_mlp)
    base.pop("acts")
    chunked = neuron_covariates(acts=ro, chunk_elements=64 * d_mlp, **base)
    whole = neuron_covariates(acts=acts, **base)
    as_tensor = neuron_covariates(acts=torch.from_numpy(acts), **base)
    a64 = acts.astype(np.float64)
    expected = {
        "act_mean": a64.mean(axis=0),
        "act_abs_mean": np.abs(a64).mean(axis=0),
        "act_var": a64.var(axis=0),
        "act_frac_positive": (a64 > 0).mean(axis=0),
    }
    for name, ref in expected.items():
        for cov in (chunked, whole, as_tensor):
            np.testing.assert_allclose(getattr(cov, name), ref, rtol=1e-10, atol=1e-12)
    assert chunked.n_positions == n
    assert chunked.act_frac_positive[1] < 0.6 and chunked.act_frac_positive[2] == 0.0
    assert chunked.act_var[3] == 0.0 and chunked.act_frac_positive[3] == 0.0
    nan_acts = acts.copy()
    nan_acts[500, 0] = np.nan
    with pytest.raises(NumericalError):
        neuron_covariates(acts=nan_acts, chunk_elements=64 * d_mlp, **base)
    with pytest.raises(InsufficientDataError):
        neuron_covariates(acts=np.empty((0, d_mlp)), **base)


@pytest.mark.parametrize("family", ["gpt2", "neox", "llama"])
def test_tiny_models_match_a_straightforward_implementation(
    family: str, input_ids: torch.Tensor
) -> None:
    model = tiny_model(family)
    adapter = adapter_for(model)
    w_out = adapter.w_out(-1)
    d_mlp, d_model = adapter.dims.d_mlp, adapter.dims.d_model
    assert tuple(w_out.shape) == (d_mlp, d_model)
    w_in = adapter.mlp_in_weights(-1)
    norm = adapter.final_norm()
    w_u, _ = adapter.unembedding()
    with torch.no_grad(), capture_input(adapter.mlp_out_proj(-1)) as captured:
        model(input_ids)
    acts = captured[0].reshape(-1, d_mlp)
    rng = np.random.default_rng(5)
    counts = rng.poisson(3.0, size=w_u.shape[0]).astype(np.float64)
    with np.errstate(divide="ignore"):
        log_freq = np.log(counts / counts.sum())  # zero counts: -inf (unseen)
    assert np.isinf(log_freq).any()
    k = 3
    cov = neuron_covariates(
        w_out, w_in, norm.weight, w_u, acts, log_freq, k, norm_kind=norm.kind, chunk_elements=500
    )
    wo = w_out.numpy()
    gamma = norm.weight.numpy()
    ref = reference(wo, gamma, w_u.numpy(), layernorm=norm.kind == "layernorm", k=k,
                    log_freq=log_freq)  # fmt: skip
    for name in ("vocab_kurtosis", "vocab_skew", "unigram_cosine", "null_space_fraction"):
        np.testing.assert_allclose(getattr(cov, name), ref[name], rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(cov.unembed_singular_values, ref["singular_values"], rtol=1e-8)
    np.testing.assert_allclose(cov.w_out_norm, np.linalg.norm(wo, axis=1), rtol=1e-12)
    expected_names = {"gpt2": {"in"}, "neox": {"in"}, "llama": {"up", "gate"}}[family]
    assert set(cov.w_in_norm) == expected_names
    for name, mat in w_in.items():
        np.testing.assert_allclose(cov.w_in_norm[name], np.linalg.norm(mat.numpy(), axis=1))
        assert f"w_in_norm_{name}" in cov.columns()
    a = acts.numpy()
    np.testing.assert_allclose(cov.act_mean, a.mean(axis=0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(cov.act_var, a.var(axis=0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(cov.act_frac_positive, (a > 0).mean(axis=0))
    assert cov.n_positions == input_ids.numel()

    # The vocabulary projection is the neuron's direct logit effect through the real final
    # norm and LM head: for a residual x orthogonal to (C w) (and centred for a LayerNorm) the
    # norm's scale is stationary, so d logits / d eps = W_U (γ ⊙ C w) / σ(x).
    i = 0
    w = w_out[i]
    cw = w - w.mean() if norm.kind == "layernorm" else w
    x = torch.from_numpy(rng.normal(size=d_model))
    if norm.kind == "layernorm":
        x = x - x.mean()
    x = x - (x @ cw) / (cw @ cw) * cw
    eps = 1e-4
    diff = (norm.apply(x + eps * w) - norm.apply(x - eps * w)) @ w_u.T / (2 * eps)
    diff = diff.numpy() - diff.numpy().mean()
    proj = w_u.numpy() @ (gamma * cw.numpy())
    proj -= proj.mean()
    cosine = diff @ proj / (np.linalg.norm(diff) * np.linalg.norm(proj))
    assert cosine > 1 - 1e-8
    assert scipy.stats.kurtosis(diff, fisher=False) == pytest.approx(
        cov.vocab_kurtosis[i], rel=1e-5
    )


def test_columns_roundtrip_and_read_only() -> None:
    inputs = small_inputs()
    inputs["w_in"] = {"up": np.ones((5, 6)), "gate": 2 * np.ones((5, 6))}
    lf = np.log(np.arange(1.0, 51.0))
    cov = neuron_covariates(**inputs, unigram_log_freq=lf)
    assert list(cov.columns()) == [
        "w_out_norm",
        "w_in_norm_up",
        "w_in_norm_gate",
        "act_mean",
        "act_abs_mean",
        "act_var",
        "act_frac_positive",
        "vocab_kurtosis",
        "vocab_skew",
        "unigram_cosine",
        "null_space_fraction",
    ]
    assert all(col.shape == (5,) for col in cov.columns().values())
    np.testing.assert_allclose(cov.w_in_norm["gate"], 2 * np.sqrt(6.0))
    assert cov.n_neurons == 5 and cov.null_space_k == default_null_space_k(6) == 1
    back = NeuronCovariates.from_dict(json.loads(json.dumps(cov.to_dict())))
    for name, col in cov.columns().items():
        np.testing.assert_array_equal(back.columns()[name], col)
    np.testing.assert_array_equal(back.unembed_singular_values, cov.unembed_singular_values)
    assert back.n_unigram_tokens == 50 and back.norm_kind is None
    with pytest.raises(ValueError):
        cov.w_out_norm[0] = 1.0
    assert default_null_space_k(4096) == 40 and default_null_space_k(576) == 5


def test_covariate_input_errors() -> None:
    good = small_inputs()
    cases: list[tuple[dict[str, Any], type[Exception]]] = [
        ({"w_out": np.ones(6)}, ConfigError),
        ({"w_in": {"in": np.ones((4, 6))}}, ConfigError),
        ({"w_in": {"a-b": np.ones((5, 6))}}, ConfigError),
        ({"norm_weight": np.ones(5)}, ConfigError),
        ({"W_U": np.ones((50, 5))}, ConfigError),
        ({"acts": np.ones((20, 4))}, ConfigError),
        ({"null_fraction_k": 0}, ConfigError),
        ({"null_fraction_k": 6}, ConfigError),
        ({"norm_kind": "batchnorm"}, ConfigError),
        ({"w_out": np.full((5, 6), np.nan)}, NumericalError),
        ({"W_U": np.full((50, 6), np.inf)}, NumericalError),
    ]
    for change, err in cases:
        with pytest.raises(err):
            neuron_covariates(**{**good, **change})
    # LayerNorm leaves d_model - 1 directions: k = d_model - 1 is then out of range too
    with pytest.raises(ConfigError):
        neuron_covariates(**good, null_fraction_k=5, norm_kind="layernorm")
    assert neuron_covariates(**good, null_fraction_k=5).null_space_k == 5
