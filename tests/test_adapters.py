"""Adapters name the right modules and weights: checked against hand-written recomputations."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaModel

from raretoken.errors import ConfigError, UnsupportedArchitectureError
from raretoken.models import (
    SUPPORTED_MODEL_TYPES,
    GPT2Adapter,
    LlamaAdapter,
    ModelDims,
    NeoXAdapter,
    NormSpec,
    adapter_for,
    capture_input,
    check_model_type,
)
from tiny import D_MLP, D_MODEL, MAX_POSITIONS, N_HEADS, N_KV_HEADS, N_LAYERS, tiny_model

EXPECTED_CLASS = {
    "gpt2": GPT2Adapter,
    "neox": NeoXAdapter,
    "llama": LlamaAdapter,
    "qwen2": LlamaAdapter,
    "mistral": LlamaAdapter,
    "olmo": LlamaAdapter,
}


def _act(name: str, x: torch.Tensor) -> torch.Tensor:
    """Independent activation functions (formulas, not HF's ACT2FN)."""
    if name == "gelu_new":  # GPT-2: tanh approximation
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    if name == "gelu":  # exact GELU
        return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))
    if name == "silu":
        return x / (1.0 + torch.exp(-x))
    raise AssertionError(f"no reference for activation {name}")


def _act_name(model: Any) -> str:
    cfg = model.config
    return str(getattr(cfg, "activation_function", None) or cfg.hidden_act)


def test_adapter_for_picks_family(any_family: str) -> None:
    adapter = adapter_for(tiny_model(any_family))
    assert type(adapter) is EXPECTED_CLASS[any_family]
    assert adapter.family == {"gpt2": "gpt2", "neox": "neox"}.get(any_family, "llama")


def test_supported_model_types() -> None:
    assert set(SUPPORTED_MODEL_TYPES) == {
        "gpt2", "gpt_neox", "llama", "mistral", "qwen2", "olmo", "qwen3", "phi3",
        "gemma2", "gemma3", "gemma3_text", "olmo2",
    }  # fmt: skip


def test_dims(family: str) -> None:
    dims = adapter_for(tiny_model(family)).dims
    n_kv = N_KV_HEADS if family == "llama" else N_HEADS
    assert dims == ModelDims(
        n_layers=N_LAYERS,
        d_model=D_MODEL,
        d_mlp=D_MLP,
        n_heads=N_HEADS,
        n_kv_heads=n_kv,
        head_dim=D_MODEL // N_HEADS,
        vocab_size=300,
        max_positions=MAX_POSITIONS,
    )


def test_dims_json_roundtrip() -> None:
    dims = adapter_for(tiny_model("llama", vocab_size=320)).dims
    assert dims.vocab_size == 320
    back = ModelDims.from_dict(json.loads(json.dumps(dims.to_dict())))
    assert back == dims
    no_max = ModelDims.from_dict({**dims.to_dict(), "max_positions": None})
    assert no_max.max_positions is None


def test_gemma_and_unknown_types_refused() -> None:
    with pytest.raises(UnsupportedArchitectureError, match=r"gemma.*\(1 \+ w\)") as info:
        adapter_for(tiny_model("gemma"))
    msg = str(info.value)
    assert "\n" not in msg
    for name in ("gpt2", "gpt_neox", "llama", "mistral", "qwen2", "olmo"):
        assert name in msg
    with pytest.raises(UnsupportedArchitectureError, match="'bert' is not supported"):
        check_model_type("bert")
    with pytest.raises(UnsupportedArchitectureError):
        check_model_type(None)
    assert check_model_type("qwen2") is LlamaAdapter


def test_base_model_without_lm_head_refused() -> None:
    cfg = LlamaConfig(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1,
    )  # fmt: skip
    with pytest.raises(UnsupportedArchitectureError, match="module layout"):
        adapter_for(LlamaModel(cfg))


def test_layer_index() -> None:
    adapter = adapter_for(tiny_model("gpt2"))
    assert adapter.layer_index(-1) == N_LAYERS - 1
    assert adapter.layer_index(-N_LAYERS) == 0
    assert adapter.mlp_out_proj(-1) is adapter.mlp_out_proj(N_LAYERS - 1)
    hf: Any = adapter.model
    assert adapter.blocks()[-1] is hf.transformer.h[-1]
    for bad in (N_LAYERS, -N_LAYERS - 1):
        with pytest.raises(ConfigError, match="out of range"):
            adapter.w_out(bad)


def test_neurons_are_out_proj_inputs(any_family: str, input_ids: torch.Tensor) -> None:
    """acts == phi(W_in x + b_in) (gated for Llama) and mlp(x) == acts @ w_out + b_out."""
    model = tiny_model(any_family)
    adapter = adapter_for(model)
    layer = -1
    mlp: Any = adapter.mlp(layer)
    outputs: list[torch.Tensor] = []
    handle = mlp.register_forward_hook(lambda _m, _a, out: outputs.append(out))
    try:
        with capture_input(mlp) as mlp_in, capture_input(adapter.mlp_out_proj(layer)) as acts:
            model(input_ids)
    finally:
        handle.remove()
    x, n, y = mlp_in[0], acts[0], outputs[0]
    assert n.shape == (*input_ids.shape, D_MLP)
    w_in = adapter.mlp_in_weights(layer)
    act = _act_name(model)
    if adapter.family == "llama":
        assert set(w_in) == {"up", "gate"}
        expected = _act(act, x @ w_in["gate"].T) * (x @ w_in["up"].T)
    else:
        assert set(w_in) == {"in"}
        b_in = (mlp.c_fc if adapter.family == "gpt2" else mlp.dense_h_to_4h).bias
        expected = _act(act, x @ w_in["in"].T + b_in)
    for w in w_in.values():
        assert w.shape == (D_MLP, D_MODEL)
    torch.testing.assert_close(n, expected, atol=1e-10, rtol=0)
    w_out = adapter.w_out(layer)
    assert w_out.shape == (D_MLP, D_MODEL)
    b_out: Any = getattr(adapter.mlp_out_proj(layer), "bias", None)
    y_ref = n @ w_out + (0.0 if b_out is None else b_out)
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=0)


def test_w_out_layout_follows_module_type() -> None:
    """Conv1D stores (in, out) and is returned as is; Linear (out, in) is transposed."""
    gpt2 = adapter_for(tiny_model("gpt2"))
    hf: Any = gpt2.model
    assert gpt2.w_out(0).data_ptr() == hf.transformer.h[0].mlp.c_proj.weight.data_ptr()
    torch.testing.assert_close(gpt2.w_out(0), hf.transformer.h[0].mlp.c_proj.weight)
    llama_model: Any = tiny_model("llama")
    torch.testing.assert_close(
        adapter_for(llama_model).w_out(1), llama_model.model.layers[1].mlp.down_proj.weight.T
    )
    neox_model: Any = tiny_model("neox")
    torch.testing.assert_close(
        adapter_for(neox_model).w_out(2), neox_model.gpt_neox.layers[2].mlp.dense_4h_to_h.weight.T
    )
    assert not gpt2.w_out(0).requires_grad


def _final_resid_and_logits(
    model: Any, input_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    adapter = adapter_for(model)
    norm = adapter.final_norm_module()
    normed: list[torch.Tensor] = []
    handle = norm.register_forward_hook(lambda _m, _a, out: normed.append(out))
    try:
        with capture_input(norm) as resid:
            logits = model(input_ids).logits
    finally:
        handle.remove()
    return resid[0], normed[0], logits


def test_final_norm_and_unembedding_reproduce_logits(
    any_family: str, input_ids: torch.Tensor
) -> None:
    model = tiny_model(any_family)
    adapter = adapter_for(model)
    resid, hf_normed, logits = _final_resid_and_logits(model, input_ids)
    spec = adapter.final_norm()
    w_u, b_u = adapter.unembedding()
    assert w_u.shape == (300, D_MODEL)
    assert b_u is None
    # the unembedding alone is exact
    torch.testing.assert_close(hf_normed @ w_u.T, logits, atol=1e-12, rtol=0)
    mine = spec.apply(resid)
    if spec.kind == "rmsnorm" or any_family == "olmo":
        # HF computes Llama RMSNorm and OLMo's LayerNorm in float32 even for float64 models
        torch.testing.assert_close(mine, hf_normed, atol=2e-6, rtol=0)
        torch.testing.assert_close(mine @ w_u.T, logits, atol=2e-5, rtol=0)
    else:
        torch.testing.assert_close(mine, hf_normed, atol=1e-12, rtol=0)
        torch.testing.assert_close(mine @ w_u.T, logits, atol=1e-10, rtol=0)
    assert float(logits.std()) > 0.5  # non-trivial logits


def test_final_norm_parity_float32(any_family: str, input_ids: torch.Tensor) -> None:
    model = tiny_model(any_family, dtype=torch.float32)
    adapter = adapter_for(model)
    resid, _, logits = _final_resid_and_logits(model, input_ids)
    w_u, _ = adapter.unembedding()
    torch.testing.assert_close(adapter.final_norm().apply(resid) @ w_u.T, logits, atol=1e-4, rtol=0)


def test_norm_spec_reads_the_module() -> None:
    gpt2 = adapter_for(tiny_model("gpt2"))
    spec = gpt2.final_norm()
    ln_f: Any = gpt2.final_norm_module()
    assert spec.kind == "layernorm" and spec.eps == ln_f.eps == gpt2.model.config.layer_norm_epsilon
    assert spec.bias is not None
    torch.testing.assert_close(spec.weight, ln_f.weight)
    torch.testing.assert_close(spec.bias, ln_f.bias)
    assert float((spec.weight - 1).abs().max()) > 0.05  # randomised, so the test can fail
    llama = adapter_for(tiny_model("llama"))
    spec = llama.final_norm()
    assert spec.kind == "rmsnorm" and spec.bias is None
    assert spec.eps == llama.model.config.rms_norm_eps
    neox = adapter_for(tiny_model("neox"))
    assert neox.final_norm().eps == neox.model.config.layer_norm_eps
    olmo = adapter_for(tiny_model("olmo")).final_norm()
    assert olmo.kind == "layernorm" and olmo.bias is None and olmo.eps == 1e-5
    torch.testing.assert_close(olmo.weight, torch.ones(D_MODEL, dtype=torch.float64))


def _np_norm(x: np.ndarray, kind: str, w: np.ndarray, b: np.ndarray | None, eps: float) -> Any:
    if kind == "layernorm":
        mu = x.mean(axis=-1, keepdims=True)
        var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
        y = (x - mu) / np.sqrt(var + eps) * w
    else:
        y = x / np.sqrt((x**2).mean(axis=-1, keepdims=True) + eps) * w
    return y if b is None else y + b


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
def test_norm_spec_apply_matches_numpy(kind: str) -> None:
    rng = np.random.default_rng(7)
    x = rng.normal(2.0, 3.0, size=(5, 7, 16))
    w = rng.normal(1.0, 0.3, size=16)
    b = rng.normal(0.0, 0.3, size=16) if kind == "layernorm" else None
    spec = NormSpec(
        kind,  # type: ignore[arg-type]
        torch.from_numpy(w),
        None if b is None else torch.from_numpy(b),
        1e-5,
    )
    got = spec.apply(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, _np_norm(x, kind, w, b, 1e-5), atol=1e-12, rtol=0)
    if kind == "layernorm":
        ref = nn.functional.layer_norm(
            torch.from_numpy(x), (16,), torch.from_numpy(w), torch.from_numpy(b), 1e-5
        )
        np.testing.assert_allclose(got, ref.numpy(), atol=1e-12, rtol=0)
    half = spec.apply(torch.from_numpy(x).to(torch.bfloat16))
    assert half.dtype == torch.bfloat16
    np.testing.assert_allclose(half.double().numpy(), got, atol=0.1, rtol=0.02)


def test_attention_pieces(family: str, input_ids: torch.Tensor) -> None:
    model = tiny_model(family)
    adapter = adapter_for(model)
    with capture_input(adapter.attn_out_proj(1)) as heads:
        model(input_ids)
    assert heads[0].shape == (*input_ids.shape, N_HEADS * D_MODEL // N_HEADS)
    assert adapter.attn_out_proj(1) in list(adapter.attention(1).modules())
    assert (adapter.position_embedding() is not None) == (family == "gpt2")


def test_unembedding_tied_for_gpt2() -> None:
    adapter = adapter_for(tiny_model("gpt2"))
    w_u, _ = adapter.unembedding()
    hf: Any = adapter.model
    assert w_u.data_ptr() == hf.transformer.wte.weight.data_ptr()
