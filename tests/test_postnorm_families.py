"""Gemma 2, Gemma 3 and OLMo 2 on tiny random models, checked against hooked forward passes.

These families put a norm after the MLP (``post_feedforward_layernorm``), Gemma multiplies its
norms by ``1 + w`` and Gemma 2 soft-caps its logits (here with ``c = 3``, so that the capping
bends the logits of the tiny model strongly). Every ablation method (fast, exact, naive, group,
frequency) must reproduce the model's own forward pass with the neuron hooked to its mean.
The tiny models have sliding-window and global layers, grouped-query attention, explicit
``head_dim`` (Gemma 3: ``n_heads * head_dim != d_model``), q/k norms (Gemma 3 per head, OLMo 2
over the whole projection) and randomised norm weights.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from torch import nn
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3Config,
    Gemma3ForCausalLM,
    Gemma3ForConditionalGeneration,
    Gemma3TextConfig,
    LlamaForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    SiglipVisionConfig,
)

from pipeline_fixtures import tiny_overrides, write_corpus
from raretoken.ablation import postnorm as postnorm_mod
from raretoken.ablation.exact import delta_loss_exact
from raretoken.ablation.fast import delta_loss_fast
from raretoken.ablation.frequency import frequency_effects, unigram_direction
from raretoken.ablation.group import delta_loss_group, delta_loss_group_recompute
from raretoken.ablation.inputs import AblationInputs, inputs_from_adapter, logits_of
from raretoken.ablation.naive import delta_loss_forward, delta_loss_recompute
from raretoken.ablation.postnorm import post_output
from raretoken.ablation.postnorm_moments import (
    TANH_DERIVATIVE_BOUNDS,
    bell5_bound,
    expansion_weights,
)
from raretoken.errors import ConfigError, UnsupportedArchitectureError
from raretoken.models.adapters import (
    SUPPORTED_MODEL_TYPES,
    Gemma2Adapter,
    Gemma3Adapter,
    Gemma3TextAdapter,
    Olmo2Adapter,
    adapter_for,
    check_model_type,
)
from raretoken.models.gguf import check_gguf
from raretoken.models.hooks import attention_patterns, capture_input, replace_input
from raretoken.models.loading import ModelSpec, load_model
from raretoken.models.tail import run_from_layer
from raretoken.run import identify, make_config
from test_new_families import _byte_level_tokens
from tiny import tiny_tokenizer

FAMS = ("gemma2", "gemma3_text", "gemma3", "olmo2")
ADAPTER = {"gemma2": Gemma2Adapter, "gemma3_text": Gemma3TextAdapter, "gemma3": Gemma3Adapter,
           "olmo2": Olmo2Adapter}  # fmt: skip
D_MODEL, D_MLP, N_LAYERS, N_HEADS, N_KV, VOCAB = 32, 64, 3, 4, 2, 300
HEAD_DIM = {"gemma2": 8, "gemma3_text": 16, "gemma3": 16, "olmo2": 8}
SOFTCAP = 3.0
WINDOW = 4
LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention"]
GROUPS = [np.array([0, 7]), np.array([3, 20, 41, 63]), np.array([5])]


def build(fam: str, *, seed: int = 0, dtype: torch.dtype = torch.float64, **extra: Any) -> Any:
    """A tiny random model of ``fam`` in eval mode; norm weights randomised (Gemma: ``w`` of
    ``1 + w`` drawn around 0, OLMo 2: ``w`` around 1)."""
    kw: dict[str, Any] = dict(
        vocab_size=VOCAB, hidden_size=D_MODEL, intermediate_size=D_MLP,
        num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS, num_key_value_heads=N_KV,
        max_position_embeddings=128, initializer_range=0.2, bos_token_id=1, eos_token_id=2,
        pad_token_id=0,
    )  # fmt: skip
    gemma: dict[str, Any] = dict(
        head_dim=HEAD_DIM[fam], query_pre_attn_scalar=HEAD_DIM[fam], sliding_window=WINDOW,
        layer_types=LAYER_TYPES,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if fam == "gemma2":
            cfg = Gemma2Config(**kw, **gemma, final_logit_softcapping=SOFTCAP,
                               attn_logit_softcapping=5.0)  # fmt: skip
            model: Any = Gemma2ForCausalLM(cfg)
        elif fam == "gemma3_text":
            model = Gemma3ForCausalLM(Gemma3TextConfig(**kw, **gemma, **extra))
        elif fam == "gemma3":
            vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=28, patch_size=14)  # fmt: skip
            model = Gemma3ForConditionalGeneration(Gemma3Config(
                text_config=Gemma3TextConfig(**kw, **gemma), vision_config=vision,
                mm_tokens_per_image=4, image_token_index=299, boi_token_index=298,
                eoi_token_index=297,
            ))  # fmt: skip
        else:
            model = Olmo2ForCausalLM(Olmo2Config(**kw))
        with torch.no_grad():
            for mod in model.modules():
                if "RMSNorm" in type(mod).__name__:
                    offset = 0.0 if "Gemma" in type(mod).__name__ else 1.0
                    mod.weight.copy_(offset + 0.3 * torch.randn_like(mod.weight))
    nn.Module.to(model, dtype)
    return model.eval().requires_grad_(False)


def _ids(seed: int = 0, batch: int = 3, seq: int = 33) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(3, 290, size=(batch, seq))).long()


def _capture(model: Any, adapter: Any, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    post = adapter.post_mlp_norm_module(-1)
    normed: list[torch.Tensor] = []
    handle = post.register_forward_hook(lambda _m, _a, out: normed.append(out))
    try:
        with (
            capture_input(adapter.final_norm_module()) as resid,
            capture_input(adapter.blocks()[1]) as b1,
            capture_input(adapter.mlp_out_proj(-1)) as acts,
            capture_input(post) as mlp_out,
        ):
            logits = model(input_ids=ids).logits
    finally:
        handle.remove()
    return {"resid": resid[0], "b1": b1[0], "acts": acts[0], "mlp_out": mlp_out[0],
            "post_out": normed[0], "logits": logits}  # fmt: skip


def _setup(fam: str) -> tuple[Any, Any, torch.Tensor, torch.Tensor, AblationInputs]:
    """Model, adapter, input ids, scored mask and the ablation inputs of the scored positions."""
    model = build(fam)
    adapter = adapter_for(model)
    ids = _ids(seed=5)
    got = _capture(model, adapter, ids)
    mask = torch.ones(ids.shape[0], ids.shape[1] - 1, dtype=torch.bool)
    mask[0, :4] = False
    mean = _capture(model, adapter, _ids(seed=6))["acts"].reshape(-1, D_MLP).mean(0)
    inputs = inputs_from_adapter(adapter, got["resid"][:, :-1][mask], got["acts"][:, :-1][mask],
                                 ids[:, 1:][mask], mean)  # fmt: skip
    return model, adapter, ids, mask, inputs


def _ce(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(z, -1) - z.gather(-1, y[..., None]).squeeze(-1)


@pytest.mark.parametrize("fam", FAMS)
def test_adapter_and_norms(fam: str) -> None:
    model = build(fam)
    adapter = adapter_for(model)
    assert type(adapter) is ADAPTER[fam] and check_model_type(fam) is ADAPTER[fam]
    assert fam in SUPPORTED_MODEL_TYPES
    dims = adapter.dims
    assert (dims.n_layers, dims.d_model, dims.d_mlp, dims.vocab_size) == (3, 32, 64, VOCAB)
    assert (dims.n_heads, dims.n_kv_heads, dims.head_dim) == (N_HEADS, N_KV, HEAD_DIM[fam])
    assert adapter.logit_softcap == (SOFTCAP if fam == "gemma2" else None)
    got = _capture(model, adapter, _ids())
    post = adapter.post_mlp_norm(-1)
    assert post is not None and post.unit_offset == fam.startswith("gemma")
    raw = adapter.post_mlp_norm_module(-1).weight
    want_gain = raw + 1.0 if post.unit_offset else raw
    torch.testing.assert_close(post.weight, want_gain, atol=0, rtol=0)
    # the specs reproduce the modules (HF normalises in float32, also for float64 models)
    torch.testing.assert_close(post.apply(got["mlp_out"]), got["post_out"], atol=1e-6, rtol=0)
    wrong = dataclasses.replace(post, weight=raw)  # reading w for 1 + w would be caught
    assert (
        fam == "olmo2" or float((wrong.apply(got["mlp_out"]) - got["post_out"]).abs().max()) > 0.1
    )
    torch.testing.assert_close(got["mlp_out"], got["acts"] @ adapter.w_out(-1), atol=1e-12, rtol=0)
    normed = adapter.final_norm().apply(got["resid"])
    torch.testing.assert_close(adapter.lm_logits(normed), got["logits"], atol=1e-5, rtol=0)
    hidden = adapter.hidden_states(_ids())
    torch.testing.assert_close(adapter.lm_logits(hidden), got["logits"], atol=1e-12, rtol=0)
    inputs = inputs_from_adapter(adapter, got["resid"].reshape(-1, D_MODEL),
                                 got["acts"].reshape(-1, D_MLP), _ids().reshape(-1),
                                 torch.zeros(D_MLP, dtype=torch.float64))  # fmt: skip
    torch.testing.assert_close(logits_of(inputs.resid, inputs),
                               got["logits"].reshape(-1, VOCAB), atol=1e-5, rtol=0)  # fmt: skip
    # the final residual is the residual before the MLP plus the post-norm of the MLP output
    rest = inputs.resid - post_output(inputs.acts @ inputs.w_out, inputs)
    assert float((rest - inputs.resid).abs().max()) > 1e-2


@pytest.mark.parametrize("fam", FAMS)
def test_every_method_matches_hooked_forward(fam: str) -> None:
    model, adapter, ids, mask, inputs = _setup(fam)
    neurons = [0, 7, 20, 41, 63]
    truth = delta_loss_forward(model, adapter, ids, mask, inputs.mean_acts, neurons)
    assert float(truth.abs().max()) > 0.1  # the ablations do something
    # rare targets: seen once among the scored targets; common: the others (both present)
    counts = torch.bincount(inputs.targets, minlength=VOCAB)
    rare = counts[inputs.targets] == 1
    assert 0 < int(rare.sum()) < inputs.n_positions
    fast, stats = delta_loss_fast(inputs, tol=1e-9)
    fast_default, stats_default = delta_loss_fast(inputs)
    assert stats_default.fallback_rate < 0.5  # the expansion is used, not only the fallback
    methods = {
        "fast": fast[:, neurons].double(),
        "fast-default": fast_default[:, neurons].double(),
        "exact": delta_loss_exact(inputs)[:, neurons],
        "exact-subset": delta_loss_exact(inputs, torch.tensor(neurons), chunk_elements=3000),
        "naive": delta_loss_recompute(inputs, neurons),
    }
    for name, got in methods.items():
        for rows in (rare, ~rare):  # HF's float32 norms inside a float64 model: ~1e-6
            assert float((got[rows] - truth[rows]).abs().max()) <= 1e-5, name
        assert float((got.mean(0) - truth.mean(0)).abs().max()) <= 1e-5, name
    assert stats.n_pairs == inputs.n_positions * D_MLP


@pytest.mark.parametrize("fam", ["gemma2", "olmo2"])
def test_fast_error_bound_holds(fam: str) -> None:
    """Every pair the expansion keeps is within ``tol`` of the exact closed form (float64;
    the fast result is stored in float32, ~6e-8 relative), and bigger ``tol`` keeps more."""
    *_, inputs = _setup(fam)
    exact = delta_loss_exact(inputs)
    rates = []
    for tol in (1e-2, 1e-3, 1e-4, 1e-5):
        fast, stats = delta_loss_fast(inputs, tol=tol, head_size=4)
        err = (fast.double() - exact).abs() - 1e-7 * exact.abs()
        assert float(err.max()) <= tol, tol
        rates.append(stats.fallback_rate)
    assert rates == sorted(rates) and rates[0] < 0.2
    f32, _ = delta_loss_fast(inputs.to("cpu", torch.float32), tol=1e-5)  # bfloat16 moments
    assert float((f32.double() - exact).abs().max()) <= 2e-5


@pytest.mark.parametrize("fam", ["gemma2", "olmo2"])
def test_large_logits_and_both_summation_paths(fam: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """An unembedding scaled up (Gemma 2: logits pressed against the soft-cap, where τ rounds to
    ±1 and sech² is tiny) and means shifted; the exact form and the fast method's fallback sum
    ``exp`` directly or through ``logsumexp`` (forced both ways): all agree with recomputation."""
    *_, inputs = _setup(fam)
    neurons = [0, 7, 20]
    for scale in (1.0, 100.0):
        big = dataclasses.replace(inputs, w_u=inputs.w_u * scale, mean_acts=inputs.mean_acts + 3)
        ref = delta_loss_recompute(big, neurons)
        assert float(ref.abs().max()) > 0.2
        tol = 1e-7 * max(1.0, float(ref.abs().max()))
        for safe in (0.0, math.inf):  # 0: always logsumexp; inf: always exp and sum
            monkeypatch.setattr(postnorm_mod, "SAFE_EXPONENT", safe)
            fast, _ = delta_loss_fast(big, tol=1e-12)  # (almost) every pair falls back
            for got in (delta_loss_exact(big)[:, neurons], fast[:, neurons].double()):
                assert float((got - ref).abs().max()) <= max(tol, 1e-7 * float(ref.abs().max()))
        f32 = delta_loss_exact(big.to("cpu", torch.float32), torch.tensor(neurons))
        assert float((f32 - ref).abs().max()) <= 1e-4 * max(1.0, float(ref.abs().max()))
    z = logits_of(big.resid, big)
    assert fam != "gemma2" or float((z.abs() > 0.999 * SOFTCAP).float().mean()) > 0.5


@pytest.mark.parametrize("fam", FAMS)
def test_group_ablation_matches_hooked_forward(fam: str) -> None:
    model, adapter, ids, mask, inputs = _setup(fam)
    base = _ce(model(input_ids=ids).logits[:, :-1], ids[:, 1:])[mask]
    truth = []
    for g in GROUPS:
        gt = torch.from_numpy(g)

        def set_mean(a: torch.Tensor, gt: torch.Tensor = gt) -> torch.Tensor:
            a = a.clone()
            a[..., gt] = inputs.mean_acts[gt].to(a.dtype)
            return a

        with replace_input(adapter.mlp_out_proj(-1), set_mean):
            truth.append(_ce(model(input_ids=ids).logits[:, :-1], ids[:, 1:])[mask] - base)
    want = torch.stack(truth, 1).double()
    got = delta_loss_group(inputs, GROUPS, chunk_positions=7, chunk_elements=500)
    assert float((got - want).abs().max()) <= 1e-5
    assert float((delta_loss_group_recompute(inputs, GROUPS) - want).abs().max()) <= 1e-5
    singles = delta_loss_group(inputs, np.arange(D_MLP)[:, None])
    assert float((singles - delta_loss_exact(inputs)).abs().max()) <= 1e-10


@pytest.mark.parametrize("fam", FAMS)
def test_frequency_effects_match_recompute(fam: str) -> None:
    *_, inputs = _setup(fam)
    rng = np.random.default_rng(1)
    f = unigram_direction(rng.integers(0, 5000, size=VOCAB), VOCAB)
    neurons = [0, 7, 31, 63]
    eff = frequency_effects(inputs, f, neurons, neuron_block=3, chunk_elements=4000)
    z = logits_of(inputs.resid, inputs)
    base = _ce(z, inputs.targets)
    m = inputs.acts @ inputs.w_out
    rest = inputs.resid - post_output(m, inputs)
    for k, i in enumerate(neurons):
        delta = (inputs.mean_acts[i] - inputs.acts[:, i])[:, None] * inputs.w_out[i]
        za = logits_of(rest + post_output(m + delta, inputs), inputs)
        zh = za - ((za - z) @ f)[:, None] * f[None, :]
        assert np.abs(eff.total[:, k] - (_ce(za, inputs.targets) - base).numpy()).max() < 1e-10
        assert np.abs(eff.held[:, k] - (_ce(zh, inputs.targets) - base).numpy()).max() < 1e-10
    assert np.abs(eff.total - eff.held).max() > 1e-4
    exact = delta_loss_exact(inputs, torch.tensor(neurons)).numpy()
    assert np.abs(eff.total - exact).max() < 1e-10


@pytest.mark.parametrize("fam", FAMS)
def test_run_from_layer_and_attention_patterns(fam: str) -> None:
    """The tail runner reproduces the full forward (sliding and global layers, per-layer-type
    rotary tables for Gemma 3), and eager patterns respect the sliding window of layer 0/2."""
    model = build(fam)
    adapter = adapter_for(model)
    ids = _ids(seed=2)
    full = _capture(model, adapter, ids)
    with torch.no_grad(), capture_input(adapter.final_norm_module()) as resid, \
            capture_input(adapter.mlp_out_proj(-1)) as acts:  # fmt: skip
        run_from_layer(adapter, full["b1"], 1)
    torch.testing.assert_close(resid[0], full["resid"], atol=1e-12, rtol=0)
    torch.testing.assert_close(acts[0], full["acts"], atol=1e-12, rtol=0)
    torch.testing.assert_close(model(input_ids=ids).logits, full["logits"], atol=0, rtol=0)
    with attention_patterns(adapter, [1, 2]) as pats:
        model(input_ids=ids[:, :16])
    q, k = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    for layer in (1, 2):  # layer 1 global, layer 2 sliding (OLMo 2: both global)
        p = pats[layer][0]
        assert p.shape == (3, N_HEADS, 16, 16)
        outside = k > q
        if layer == 2 and fam != "olmo2":
            outside = outside | (q - k >= WINDOW)
        assert float(p[..., outside].abs().max()) == 0.0
        assert float(p[..., ~outside].min()) > 0.0


# ------------------------------------------------------------------------- bad layouts
def _refused(model: Any, *patterns: str) -> None:
    with pytest.raises(UnsupportedArchitectureError) as info:
        adapter_for(model)
    msg = str(info.value)
    assert "\n" not in msg
    for pat in patterns:
        assert pat in msg, (pat, msg)


@pytest.mark.parametrize("fam", FAMS)
def test_bad_layouts_are_refused(fam: str) -> None:
    model = build(fam)
    del adapter_for(model).blocks()[2].post_feedforward_layernorm.weight
    _refused(model, f"'{fam}'", "layer 2 post_feedforward_layernorm")
    model = build(fam)
    block = adapter_for(model).blocks()[1]
    block.post_feedforward_layernorm.weight = nn.Parameter(torch.ones(D_MODEL + 1))
    _refused(model, f"'{fam}'", "layer 1 post_feedforward_layernorm has weight shape (33,)",
             "(d_model,) = (32,)")  # fmt: skip
    model = build(fam)
    attn = adapter_for(model).blocks()[0].self_attn
    attn.q_norm = nn.Identity() if fam != "gemma2" else attn.q_proj
    if fam == "gemma2":  # no q/k norms: a query projection of the wrong width instead
        attn.q_proj = nn.Linear(D_MODEL, 24, bias=False)
        _refused(model, "'gemma2'", "self_attn.q_proj", "(24, 32)", "(32, 32)")
    else:
        _refused(model, f"'{fam}'", "layer 0 attention has no q_norm weight")
    # a Llama model relabelled as this family lacks its norms (Gemma: and its norm kind)
    llama: Any = LlamaForCausalLM(_llama_config())
    llama.config.model_type = fam
    _refused(llama, f"'{fam}'")
    mod = build(fam)
    adapter_for(mod).mlp_out_proj(-1).bias = nn.Parameter(torch.zeros(D_MODEL))
    with pytest.raises(UnsupportedArchitectureError, match="does not model"):
        inputs_from_adapter(adapter_for(mod), *_dummy())


def _llama_config() -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=D_MODEL, intermediate_size=D_MLP,
                       num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS,
                       num_key_value_heads=N_KV)  # fmt: skip


def _dummy() -> tuple[torch.Tensor, ...]:
    z = torch.zeros(2, D_MODEL)
    return z, torch.zeros(2, D_MLP), torch.zeros(2, dtype=torch.long), torch.zeros(D_MLP)


def test_bad_ablation_inputs_are_refused() -> None:
    *_, inputs = _setup("gemma2")
    post = inputs.post_norm
    assert post is not None
    bad = dataclasses.replace(inputs, post_norm=dataclasses.replace(post, weight=post.weight[:5]))
    with pytest.raises(
        UnsupportedArchitectureError, match=r"post-MLP norm has weight shape \(5,\)"
    ):
        delta_loss_fast(bad)
    for cap in (0.0, -1.0, float("nan")):
        with pytest.raises(ConfigError, match="softcap"):
            delta_loss_exact(dataclasses.replace(inputs, softcap=cap))


# ------------------------------------------------------------------------------- GGUF
# transformers reads only some GGUF keys for Gemma (not query_pre_attn_scalar, the soft-capping
# values, the layer pattern or the local rope base): the source models use those defaults
# (Gemma 2 caps its logits at 30). Norm weights are stored as 1 + w, as llama.cpp writes them
# (transformers' Gemma2TensorProcessor subtracts 1 again).
_GGUF_ARCH = {"gemma2": gguf.MODEL_ARCH.GEMMA2, "gemma3": gguf.MODEL_ARCH.GEMMA3,
              "olmo2": gguf.MODEL_ARCH.OLMO2}  # fmt: skip


def _gguf_source(arch: str) -> Any:
    kw: dict[str, Any] = dict(
        vocab_size=VOCAB, hidden_size=D_MODEL, intermediate_size=D_MLP,
        num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS, num_key_value_heads=N_KV,
        max_position_embeddings=128, initializer_range=0.2, rms_norm_eps=1e-6, bos_token_id=1,
        eos_token_id=0, pad_token_id=0, head_dim=16, sliding_window=WINDOW,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        if arch == "gemma2":
            model: Any = Gemma2ForCausalLM(Gemma2Config(**kw))
        elif arch == "gemma3":
            model = Gemma3ForCausalLM(Gemma3TextConfig(**kw))
        else:
            kw.pop("head_dim"), kw.pop("sliding_window")
            model = Olmo2ForCausalLM(Olmo2Config(**kw, tie_word_embeddings=False))
        with torch.no_grad():
            for mod in model.modules():
                if "RMSNorm" in type(mod).__name__:
                    mod.weight.add_(0.3 * torch.randn_like(mod.weight))
    return model.eval().requires_grad_(False)


def write_gguf(path: Path, model: Any, arch: str) -> Path:
    """``model`` as a float32 GGUF of architecture ``arch`` with a byte-level BPE tokenizer."""
    cfg = model.config
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if arch != "olmo2":
        w.add_sliding_window(cfg.sliding_window)
        w.add_rope_freq_base(10000.0)
    tokens, merges = _byte_level_tokens(cfg.vocab_size)
    n = len(tokens)
    tokens[-3:] = ["<bos>", "<unk>", "<mask>"]  # Gemma's tokenizer class adds them otherwise
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([3] + [1] * (n - 4) + [3, 3, 3])
    w.add_token_merges(merges)
    w.add_eos_token_id(0)
    w.add_pad_token_id(0)
    w.add_bos_token_id(n - 3)
    w.add_unk_token_id(n - 2)
    names = gguf.get_tensor_name_map(_GGUF_ARCH[arch], cfg.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        module, suffix = name.rsplit(".", 1)
        target = names.get_name(module)
        assert target is not None, name
        t = tensor.float()
        if arch != "olmo2" and target.endswith("norm"):
            t = t + 1.0
        w.add_tensor(f"{target}.{suffix}", t.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_gguf_round_trip(arch: str, tmp_path: Path) -> None:
    """A Gemma GGUF loads through load_model (model type gemma2 / gemma3_text) and computes the
    source model's logits, neurons and post-MLP norm; a soft-capped model stays soft-capped."""
    source = _gguf_source(arch)
    path = write_gguf(tmp_path / f"tiny-{arch}.gguf", source, arch)
    model_type = "gemma2" if arch == "gemma2" else "gemma3_text"
    assert check_gguf(path) == model_type
    loaded = load_model(ModelSpec(source=str(path), dtype="float32"))
    assert type(loaded.adapter) is ADAPTER[model_type]
    assert loaded.identity["model_type"] == model_type
    want_adapter = adapter_for(source)
    assert loaded.adapter.logit_softcap == want_adapter.logit_softcap
    assert (want_adapter.logit_softcap is not None) == (arch == "gemma2")
    ids = _ids(seed=8, batch=2, seq=16)
    want = _capture(source, want_adapter, ids)
    got = _capture(loaded.model, loaded.adapter, ids)
    for key in ("logits", "acts", "post_out"):
        torch.testing.assert_close(got[key], want[key], atol=2e-5, rtol=0)
    got_post, want_post = loaded.adapter.post_mlp_norm(-1), want_adapter.post_mlp_norm(-1)
    assert got_post is not None and want_post is not None
    torch.testing.assert_close(got_post.weight, want_post.weight, atol=1e-6, rtol=0)


def test_olmo2_gguf_is_refused_with_its_reason(tmp_path: Path) -> None:
    """transformers has no GGUF loader for OLMo 2: one line naming it, before loading."""
    path = write_gguf(tmp_path / "tiny-olmo2.gguf", _gguf_source("olmo2"), "olmo2")
    with pytest.raises(UnsupportedArchitectureError) as info:
        load_model(ModelSpec(source=str(path)))
    msg = str(info.value)
    assert "\n" not in msg
    assert "'tiny-olmo2.gguf' has architecture 'olmo2'" in msg
    assert "cannot load from GGUF" in msg and "gemma2" in msg


# ------------------------------------------------------------------ soft-capping expansion
def _derivatives(fn: Any, x: torch.Tensor, n: int) -> list[torch.Tensor]:
    """``[fn(x), fn'(x), ..., fn^(n)(x)]`` elementwise by repeated autograd (float64)."""
    x = x.clone().requires_grad_(True)
    out = [fn(x)]
    for _ in range(n):
        (d,) = torch.autograd.grad(out[-1].sum(), x, create_graph=True)
        out.append(d)
    return [o.detach() for o in out]


def test_softcap_expansion_constants() -> None:
    """The Taylor weights of e^{F(Δ)} are its derivatives at 0 over k!, the derivative bounds of
    tanh hold, and the bound on the fifth derivative of e^F holds (autograd, float64)."""
    cap = 3.0
    z = torch.linspace(-12.0, 12.0, 97, dtype=torch.float64)
    tau, sigma = torch.tanh(z / cap), torch.cosh(z / cap).pow(-2)
    weights, k_max, scales = expansion_weights(torch.ones(1, 97, dtype=torch.float64), tau[None],
                                       sigma[None], cap)  # fmt: skip
    base = cap * torch.tanh(z / cap)
    derivs = _derivatives(lambda d: torch.exp(cap * torch.tanh((z + d) / cap) - base),
                          torch.zeros(97, dtype=torch.float64), 5)  # fmt: skip
    assert scales == [1.0] * 5
    for k in range(5):
        torch.testing.assert_close(weights[k][0], derivs[k] / math.factorial(k), atol=1e-12, rtol=0)
        assert float(k_max[k]) == pytest.approx(float(weights[k].abs().max()))
    x = torch.linspace(-8, 8, 20001, dtype=torch.float64)
    tanh_d = _derivatives(torch.tanh, x, 5)
    for k, bound in enumerate(TANH_DERIVATIVE_BOUNDS, start=1):
        sup = float(tanh_d[k].abs().max())
        assert sup <= bound < sup * (1 + 1e-4)
    for c in (0.5, 3.0, 30.0):
        zz = torch.linspace(-4 * c, 4 * c, 41, dtype=torch.float64)[:, None]
        dd = torch.linspace(-2.0, 2.0, 41, dtype=torch.float64)[None, :].expand(41, 41)
        f = lambda d, zz=zz, c=c: c * torch.tanh((zz + d) / c) - c * torch.tanh(zz / c)  # noqa: E731
        fifth = _derivatives(lambda d, f=f: torch.exp(f(d)), dd, 5)[5]
        ratio = fifth.abs() / torch.exp(f(dd))
        assert float(ratio.max()) <= bell5_bound(c)
    assert bell5_bound(1e9) == pytest.approx(1.0)


@pytest.mark.parametrize("fam", ["gemma2", "olmo2"])
def test_identify_runs_end_to_end(fam: str, tmp_path: Path) -> None:
    model_dir = tmp_path / f"model-{fam}"
    build(fam, dtype=torch.float32).save_pretrained(model_dir)
    tiny_tokenizer(VOCAB).save_pretrained(model_dir)
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    cfg = make_config(overrides=tiny_overrides(model_dir, corpus))
    res = identify(cfg, tmp_path / "run", cache_dir=tmp_path / "cache", progress=False)
    assert (tmp_path / "run" / "neurons.parquet").exists()
    assert res.delta.shape[1] == D_MLP and np.isfinite(res.delta).all()
    assert float(np.abs(res.delta).max()) > 0
    # the covariates take a neuron's output direction through the post-MLP norm's gain
    from raretoken.models import ModelSpec, load_model

    adapter = load_model(ModelSpec(source=str(model_dir), dtype="float32")).adapter
    post = adapter.post_mlp_norm(-1)
    assert post is not None
    direction = (adapter.w_out(-1) * post.weight).detach().double().norm(dim=1).numpy()
    norms = np.asarray(res.neurons.covariates.w_out_norm)
    np.testing.assert_allclose(norms, direction, rtol=1e-5)
    raw = adapter.w_out(-1).detach().double().norm(dim=1).numpy()
    assert not np.allclose(norms, raw, rtol=1e-3)
