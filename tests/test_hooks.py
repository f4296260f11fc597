"""Hooks (capture, replace, head ablation, attention patterns) and the tail runner."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from raretoken.errors import ConfigError
from raretoken.models import (
    ModelAdapter,
    ablate_heads,
    adapter_for,
    attention_patterns,
    capture_input,
    replace_input,
    run_from_layer,
)
from tiny import D_MODEL, N_HEADS, N_KV_HEADS, N_LAYERS, tiny_model

HEAD_DIM = D_MODEL // N_HEADS


def _n_hooks(module: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in module.modules())


# ----------------------------------------------------------------- capture / replace


def test_capture_input_records_every_call_and_removes_hook(input_ids: torch.Tensor) -> None:
    model = tiny_model("llama")
    adapter = adapter_for(model)
    proj = adapter.mlp_out_proj(-1)
    with capture_input(proj) as acts:
        model(input_ids)
        model(input_ids[:, :5])
    assert [a.shape for a in acts] == [(2, 24, 64), (2, 5, 64)]
    assert not acts[0].requires_grad
    torch.testing.assert_close(acts[1], acts[0][:, :5])  # causal: a prefix sees the same
    assert _n_hooks(model) == 0


def test_hooks_removed_on_exception(input_ids: torch.Tensor) -> None:
    model = tiny_model("gpt2")
    adapter = adapter_for(model)
    with pytest.raises(RuntimeError, match="boom"), capture_input(adapter.mlp_out_proj(0)):
        raise RuntimeError("boom")

    def explode(x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("inside")

    with (
        pytest.raises(RuntimeError, match="inside"),
        replace_input(adapter.mlp_out_proj(0), explode),
    ):
        model(input_ids)
    with pytest.raises(RuntimeError, match="boom"), ablate_heads(adapter, 0, [1]):
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"), attention_patterns(adapter, [0]):
        raise RuntimeError("boom")
    assert _n_hooks(model) == 0
    assert model.config._attn_implementation == "sdpa"


class _KwModule(nn.Module):
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return 2 * hidden_states


def test_hooks_handle_keyword_first_input() -> None:
    mod = _KwModule()
    x = torch.arange(4.0)
    with capture_input(mod) as seen, replace_input(mod, lambda t: t + 1):
        y = mod(hidden_states=x)
    torch.testing.assert_close(y, 2 * (x + 1))
    torch.testing.assert_close(seen[0], x)  # capture registered first: sees the original


def test_replace_input(family: str, input_ids: torch.Tensor) -> None:
    model = tiny_model(family)
    adapter = adapter_for(model)
    base = model(input_ids).logits
    proj = adapter.mlp_out_proj(-1)
    with replace_input(proj, lambda x: x.clone()):
        same = model(input_ids).logits
    torch.testing.assert_close(same, base, atol=0, rtol=0)
    outputs: list[torch.Tensor] = []
    handle = adapter.mlp(-1).register_forward_hook(lambda _m, _a, out: outputs.append(out))
    try:
        with replace_input(proj, torch.zeros_like):
            changed = model(input_ids).logits
    finally:
        handle.remove()
    # with all neurons zeroed the MLP writes only its output bias
    bias: Any = getattr(proj, "bias", None)
    if bias is None:
        bias = torch.zeros(D_MODEL, dtype=torch.float64)
    torch.testing.assert_close(outputs[0], bias.expand_as(outputs[0]), atol=1e-12, rtol=0)
    assert float((changed - base).abs().max()) > 1e-3


# ----------------------------------------------------------------- head ablation


def test_ablate_heads_zeroes_exactly_those_slices(family: str, input_ids: torch.Tensor) -> None:
    model = tiny_model(family)
    adapter = adapter_for(model)
    layer, heads = 1, [0, 2]
    proj = adapter.attn_out_proj(layer)
    attn_out: list[torch.Tensor] = []
    handle = adapter.attention(layer).register_forward_hook(
        lambda _m, _a, out: attn_out.append(out[0])
    )
    try:
        with capture_input(proj) as clean:
            base_logits = model(input_ids).logits
        with ablate_heads(adapter, layer, heads), capture_input(proj) as ablated:
            abl_logits = model(input_ids).logits
    finally:
        handle.remove()
    x, xa = clean[0], ablated[0]
    for h in range(N_HEADS):
        sl = slice(h * HEAD_DIM, (h + 1) * HEAD_DIM)
        if h in heads:
            assert float(xa[..., sl].abs().max()) == 0.0
            assert float(x[..., sl].abs().max()) > 1e-3
        else:  # same-layer heads are untouched
            torch.testing.assert_close(xa[..., sl], x[..., sl], atol=0, rtol=0)
    # the attention output is the projection of the zeroed concatenation
    manual = x.clone()
    for h in heads:
        manual[..., h * HEAD_DIM : (h + 1) * HEAD_DIM] = 0
    torch.testing.assert_close(attn_out[1], proj(manual), atol=1e-12, rtol=0)
    assert float((abl_logits - base_logits).abs().max()) > 1e-3
    # nothing ablated -> nothing changes
    with ablate_heads(adapter, layer, []):
        torch.testing.assert_close(model(input_ids).logits, base_logits, atol=0, rtol=0)


def test_ablate_heads_rejects_bad_heads() -> None:
    adapter = adapter_for(tiny_model("llama"))
    with pytest.raises(ConfigError, match="head index 4"), ablate_heads(adapter, 0, [1, 4]):
        pass
    with pytest.raises(ConfigError, match="out of range"), ablate_heads(adapter, 9, [0]):
        pass


# ----------------------------------------------------------------- attention patterns


def _causal_softmax(scores: torch.Tensor) -> torch.Tensor:
    q, k = scores.shape[-2:]
    mask = torch.ones(q, k, dtype=torch.bool).triu(1)
    return torch.softmax(scores.masked_fill(mask, -math.inf), dim=-1)


def _gpt2_reference(adapter: ModelAdapter, x: torch.Tensor, layer: int) -> torch.Tensor:
    c_attn: Any = adapter.attention(layer).c_attn
    qkv = x @ c_attn.weight + c_attn.bias  # Conv1D: (in, out)
    q, k, _ = qkv.split(D_MODEL, dim=-1)
    q = q.view(*x.shape[:2], N_HEADS, HEAD_DIM).transpose(1, 2)
    k = k.view(*x.shape[:2], N_HEADS, HEAD_DIM).transpose(1, 2)
    return _causal_softmax(q @ k.transpose(-1, -2) / math.sqrt(HEAD_DIM))


def _rotate(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding, half-split convention, positions 0..seq-1."""
    seq, d = x.shape[-2], x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.arange(seq, dtype=torch.float64)[:, None] * inv[None, :]
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def _llama_reference(adapter: ModelAdapter, x: torch.Tensor, layer: int) -> torch.Tensor:
    attn: Any = adapter.attention(layer)
    theta = float(adapter.model.config.rope_parameters["rope_theta"])
    b, s, _ = x.shape
    q = (x @ attn.q_proj.weight.T).view(b, s, N_HEADS, HEAD_DIM).transpose(1, 2)
    k = (x @ attn.k_proj.weight.T).view(b, s, N_KV_HEADS, HEAD_DIM).transpose(1, 2)
    q, k = _rotate(q, theta), _rotate(k, theta)
    group = N_HEADS // N_KV_HEADS
    k = k[:, [h // group for h in range(N_HEADS)]]  # query head h reads kv head h // group
    return _causal_softmax(q @ k.transpose(-1, -2) / math.sqrt(HEAD_DIM))


def test_attention_patterns_are_causal_distributions(family: str, input_ids: torch.Tensor) -> None:
    model = tiny_model(family)
    adapter = adapter_for(model)
    base = model(input_ids).logits
    with attention_patterns(adapter, [-1, -2]) as pats:
        logits = model(input_ids).logits
        model(input_ids[:, :7])
    assert sorted(pats) == [N_LAYERS - 2, N_LAYERS - 1]
    assert model.config._attn_implementation == "sdpa"
    assert _n_hooks(model) == 0
    for layer in pats:
        p, p_short = pats[layer]
        assert p.shape == (2, N_HEADS, 24, 24) and p_short.shape == (2, N_HEADS, 7, 7)
        # eager softmax runs in float32 for NeoX/Llama
        torch.testing.assert_close(
            p.sum(-1), torch.ones(2, N_HEADS, 24, dtype=p.dtype), atol=1e-6, rtol=0
        )
        assert float(p.triu(1).abs().max()) == 0.0
        assert float(p.min()) >= 0.0
        assert float(p[..., 1:, :].max(dim=-1).values.min()) < 0.999  # not all one-hot
    torch.testing.assert_close(logits, base, atol=1e-5, rtol=0)  # eager ~ sdpa


@pytest.mark.parametrize("fam", ["gpt2", "llama"])
def test_attention_patterns_match_reference(fam: str, input_ids: torch.Tensor) -> None:
    model = tiny_model(fam)
    adapter = adapter_for(model)
    layer = 1
    with (
        attention_patterns(adapter, [layer]) as pats,
        capture_input(adapter.attention(layer)) as xs,
    ):
        model(input_ids)
    ref = (_gpt2_reference if fam == "gpt2" else _llama_reference)(adapter, xs[0], layer)
    torch.testing.assert_close(pats[layer][0], ref, atol=1e-6, rtol=0)


def test_attention_patterns_keep_eager_models_eager(input_ids: torch.Tensor) -> None:
    model = tiny_model("neox")
    model.set_attn_implementation("eager")
    adapter = adapter_for(model)
    with attention_patterns(adapter, [0]) as pats:
        model(input_ids)
    assert len(pats[0]) == 1
    assert model.config._attn_implementation == "eager"


# ----------------------------------------------------------------- tail runner


def _full(
    adapter: ModelAdapter, input_ids: torch.Tensor, start: int, **kw: Any
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with (
        capture_input(adapter.blocks()[start]) as hidden,
        capture_input(adapter.mlp_out_proj(-1)) as acts,
        capture_input(adapter.final_norm_module()) as resid,
    ):
        adapter.model(input_ids, **kw)
    return hidden[0], acts[0], resid[0]


def _tail(
    adapter: ModelAdapter, hidden: torch.Tensor, start: int, **kw: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    with (
        capture_input(adapter.mlp_out_proj(-1)) as acts,
        capture_input(adapter.final_norm_module()) as resid,
    ):
        run_from_layer(adapter, hidden, start, **kw)
    return acts[0], resid[0]


@pytest.mark.parametrize("start", [0, 1, -1])
def test_tail_matches_full_forward(any_family: str, start: int, input_ids: torch.Tensor) -> None:
    model = tiny_model(any_family)
    adapter = adapter_for(model)
    blocks_before = list(adapter.blocks())
    hidden, acts, resid = _full(adapter, input_ids, start)
    t_acts, t_resid = _tail(adapter, hidden, start)
    torch.testing.assert_close(t_acts, acts, atol=1e-8, rtol=0)
    torch.testing.assert_close(t_resid, resid, atol=1e-8, rtol=0)
    assert all(a is b for a, b in zip(adapter.blocks(), blocks_before, strict=True))
    assert _n_hooks(model) == 0


def test_tail_with_head_ablation_matches_full_forward(
    any_family: str, input_ids: torch.Tensor
) -> None:
    """Ablate a head in layer L-2, re-run only the tail: same final-MLP activations."""
    adapter = adapter_for(tiny_model(any_family))
    start = N_LAYERS - 2
    hidden, clean_acts, _ = _full(adapter, input_ids, start)
    with ablate_heads(adapter, start, [1]):
        _, full_acts, _ = _full(adapter, input_ids, start)
        tail_acts, _ = _tail(adapter, hidden, start)
    torch.testing.assert_close(tail_acts, full_acts, atol=1e-8, rtol=0)
    assert float((full_acts - clean_acts).abs().max()) > 1e-3


@pytest.mark.parametrize("use_cache", [None, False])
def test_tail_respects_position_ids(
    any_family: str, use_cache: bool | None, input_ids: torch.Tensor
) -> None:
    adapter = adapter_for(tiny_model(any_family))
    pos = (3 * torch.arange(input_ids.shape[1]) + 1)[None].expand_as(input_ids)  # gaps
    kw: dict[str, Any] = {"position_ids": pos}
    if use_cache is not None:
        kw["use_cache"] = use_cache
    hidden, acts, _ = _full(adapter, input_ids, 1, **kw)
    t_acts, _ = _tail(adapter, hidden, 1, **kw)
    torch.testing.assert_close(t_acts, acts, atol=1e-8, rtol=0)
    if any_family != "gpt2":  # rotary: relative distances enter every block
        default_acts, _ = _tail(adapter, hidden, 1, use_cache=use_cache)
        assert float((default_acts - acts).abs().max()) > 1e-6


def test_tail_restores_model_on_error(input_ids: torch.Tensor) -> None:
    model = tiny_model("gpt2")
    adapter = adapter_for(model)
    blocks_before = list(adapter.blocks())
    hidden, _, _ = _full(adapter, input_ids, 2)

    def explode(x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("inside")

    with (
        pytest.raises(RuntimeError, match="inside"),
        replace_input(adapter.mlp_out_proj(-1), explode),
    ):
        run_from_layer(adapter, hidden, 2)
    assert all(a is b for a, b in zip(adapter.blocks(), blocks_before, strict=True))
    assert _n_hooks(model) == 0
    # the model still computes the same thing as a fresh copy
    torch.testing.assert_close(model(input_ids).logits, tiny_model("gpt2")(input_ids).logits)
    with pytest.raises(ConfigError, match="hidden must have shape"):
        run_from_layer(adapter, hidden[..., :5], 2)
    with pytest.raises(ConfigError, match="out of range"):
        run_from_layer(adapter, hidden, N_LAYERS)
