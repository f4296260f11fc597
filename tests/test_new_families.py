"""Qwen 3 and Phi-3 adapters on tiny random models, checked against hooked forward passes.

Qwen 3 adds q/k RMSNorms to the Llama layout (and here ``n_heads * head_dim != d_model``);
Phi-3 fuses the MLP's gate/up and the attention's q/k/v projections. The tiny models
(:mod:`tiny`) use sliding windows and, for Phi-3, partial rotary embeddings, so the tail runner
has to rebuild per-layer masks and rotary tables exactly as the full forward does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from torch import nn
from transformers import Phi3Config, Phi3ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from pipeline_fixtures import tiny_overrides, tiny_setup
from raretoken.ablation.exact import delta_loss_exact
from raretoken.ablation.fast import delta_loss_fast
from raretoken.ablation.inputs import inputs_from_adapter
from raretoken.ablation.naive import delta_loss_forward, delta_loss_recompute
from raretoken.analyses.spectra import layer_weights
from raretoken.errors import UnsupportedArchitectureError
from raretoken.models.adapters import (
    SUPPORTED_MODEL_TYPES,
    Phi3Adapter,
    Qwen3Adapter,
    adapter_for,
    check_model_type,
)
from raretoken.models.gguf import check_gguf
from raretoken.models.hooks import ablate_heads, attention_patterns, capture_input
from raretoken.models.loading import ModelSpec, load_model
from raretoken.models.tail import run_from_layer
from raretoken.run import identify, make_config
from tiny import (
    D_MLP,
    D_MODEL,
    MAX_POSITIONS,
    N_HEADS,
    N_KV_HEADS,
    N_LAYERS,
    NEW_FAMILIES,
    QWEN3_HEAD_DIM,
    _randomise_norms,
    tiny_model,
)

ADAPTER = {"qwen3": Qwen3Adapter, "phi3": Phi3Adapter}
HEAD_DIM = {"qwen3": QWEN3_HEAD_DIM, "phi3": D_MODEL // N_HEADS}

pytestmark = pytest.mark.parametrize("fam", NEW_FAMILIES)

# GGUF ----------------------------------------------------------------------------------------
# transformers reads only some GGUF keys: for qwen3 not ``attention.key_length`` (head_dim stays
# Qwen3Config's default, 128), for phi3 neither a partial rotary factor nor a sliding window.
# The GGUF round-trip models therefore use those defaults.
_GGUF_VOCAB = 300
_GGUF_ARCH = {"qwen3": gguf.MODEL_ARCH.QWEN3, "phi3": gguf.MODEL_ARCH.PHI3}


def _gguf_source_model(fam: str) -> Any:
    kw: dict[str, Any] = dict(
        vocab_size=_GGUF_VOCAB, hidden_size=D_MODEL, intermediate_size=D_MLP,
        num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS, num_key_value_heads=N_KV_HEADS,
        max_position_embeddings=MAX_POSITIONS, initializer_range=0.2, rms_norm_eps=1e-6,
        bos_token_id=None, eos_token_id=0, pad_token_id=0, tie_word_embeddings=False,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        if fam == "qwen3":
            rope = {"rope_type": "default", "rope_theta": 1e6}
            model: Any = Qwen3ForCausalLM(Qwen3Config(**kw, head_dim=128, rope_parameters=rope))
        else:
            rope = {"rope_type": "default", "rope_theta": 1e4}
            model = Phi3ForCausalLM(Phi3Config(**kw, rope_parameters=rope))
        _randomise_norms(model)
    return model.eval().requires_grad_(False)


def _byte_level_tokens(n: int) -> tuple[list[str], list[str]]:
    """``n`` tokens of a byte-level BPE (GPT-2 byte alphabet, a few merges, padding tokens)."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    codes, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            codes.append(256 + extra)
            extra += 1
    tokens = ["<|endoftext|>", *(chr(c) for c in codes)]
    pairs = [("t", "h"), ("th", "e"), ("a", "n"), ("\u0120", "the"), ("i", "n"), ("e", "r")]
    merges = [f"{a} {b}" for a, b in pairs]
    tokens += [a + b for a, b in pairs]
    tokens += [f"<extra_{i}>" for i in range(n - len(tokens))]
    return tokens, merges


def write_tiny_gguf(path: Path, model: Any) -> Path:
    """Write ``model`` (qwen3 or phi3) as a float32 GGUF with a byte-level BPE tokenizer."""
    cfg = model.config
    arch = cfg.model_type
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    tokens, merges = _byte_level_tokens(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([3] + [1] * (len(tokens) - 1))
    w.add_token_merges(merges)
    w.add_eos_token_id(0)
    w.add_pad_token_id(0)
    names = gguf.get_tensor_name_map(_GGUF_ARCH[arch], cfg.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        module, suffix = name.rsplit(".", 1)
        target = names.get_name(module)
        assert target is not None, name
        w.add_tensor(f"{target}.{suffix}", tensor.float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU from its formula (independent of transformers' ACT2FN)."""
    return x / (1.0 + torch.exp(-x))


def _ids(seed: int = 0, batch: int = 3, seq: int = 33) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(3, 300, size=(batch, seq))).long()


def _forward_hooks(model: Any, adapter: Any, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """One full forward; the final residual, final-norm output, block inputs and neurons."""
    normed: list[torch.Tensor] = []
    norm = adapter.final_norm_module()
    handle = norm.register_forward_hook(lambda _m, _a, out: normed.append(out))
    blocks = adapter.blocks()
    try:
        with (
            capture_input(norm) as resid,
            capture_input(blocks[1]) as b1,
            capture_input(blocks[2]) as b2,
            capture_input(adapter.mlp(-1)) as mlp_in,
            capture_input(adapter.mlp_out_proj(-1)) as acts,
        ):
            logits = model(input_ids=ids).logits
    finally:
        handle.remove()
    return {"resid": resid[0], "normed": normed[0], "b1": b1[0], "b2": b2[0],
            "mlp_in": mlp_in[0], "acts": acts[0], "logits": logits}  # fmt: skip


def test_adapter_is_chosen_by_model_type(fam: str) -> None:
    adapter = adapter_for(tiny_model(fam))
    assert type(adapter) is ADAPTER[fam] and adapter.family == fam
    assert check_model_type(fam) is ADAPTER[fam]
    assert fam in SUPPORTED_MODEL_TYPES
    dims = adapter.dims
    assert (dims.n_layers, dims.d_model, dims.d_mlp) == (N_LAYERS, D_MODEL, D_MLP)
    assert (dims.n_heads, dims.n_kv_heads, dims.head_dim) == (N_HEADS, 2, HEAD_DIM[fam])
    assert adapter.final_norm().kind == "rmsnorm"
    assert adapter.position_embedding() is None


def test_in_weights_reproduce_the_neurons(fam: str) -> None:
    """acts == silu(gate x) * (up x), with gate/up from mlp_in_weights (for Phi-3: the halves
    of gate_up_proj in transformers' order); and mlp(x) == acts @ w_out."""
    model = tiny_model(fam)
    adapter = adapter_for(model)
    got = _forward_hooks(model, adapter, _ids())
    x, n = got["mlp_in"], got["acts"]
    w = adapter.mlp_in_weights(-1)
    assert set(w) == {"up", "gate"}
    assert all(v.shape == (D_MLP, D_MODEL) for v in w.values())
    torch.testing.assert_close(n, _silu(x @ w["gate"].T) * (x @ w["up"].T), atol=1e-10, rtol=0)
    swapped = _silu(x @ w["up"].T) * (x @ w["gate"].T)
    assert float((swapped - n).abs().max()) > 1e-2  # the order matters, so the test can fail
    if fam == "phi3":
        fused = model.model.layers[-1].mlp.gate_up_proj.weight
        assert w["gate"].data_ptr() == fused.data_ptr()  # a view: first half = gate
        torch.testing.assert_close(torch.cat([w["gate"], w["up"]]), fused, atol=0, rtol=0)
    for kind in ("gate", "up"):  # what the spectral analysis reads
        np.testing.assert_array_equal(layer_weights(adapter, kind), w[kind].double().numpy())
    out = n @ adapter.w_out(-1)
    mlp_out: list[torch.Tensor] = []
    handle = adapter.mlp(-1).register_forward_hook(lambda _m, _a, o: mlp_out.append(o))
    try:
        model(input_ids=_ids())
    finally:
        handle.remove()
    torch.testing.assert_close(mlp_out[0], out, atol=1e-10, rtol=0)


def test_final_norm_and_unembedding_reproduce_logits(fam: str) -> None:
    model = tiny_model(fam)
    adapter = adapter_for(model)
    got = _forward_hooks(model, adapter, _ids())
    w_u, b_u = adapter.unembedding()
    assert b_u is None
    torch.testing.assert_close(got["normed"] @ w_u.T, got["logits"], atol=1e-12, rtol=0)
    # HF's RMSNorm computes in float32 even for float64 models
    mine = adapter.final_norm().apply(got["resid"]) @ w_u.T
    torch.testing.assert_close(mine, got["logits"], atol=2e-5, rtol=0)


def test_fast_exact_and_naive_match_hooked_forward(fam: str) -> None:
    model = tiny_model(fam)
    adapter = adapter_for(model)
    ids = _ids(seed=5)
    got = _forward_hooks(model, adapter, ids)
    mask = torch.ones(ids.shape[0], ids.shape[1] - 1, dtype=torch.bool)
    mask[0, :4] = False  # some unscored positions
    resid = got["resid"][:, :-1][mask]
    acts = got["acts"][:, :-1][mask]
    mean = _forward_hooks(model, adapter, _ids(seed=6))["acts"].reshape(-1, D_MLP).mean(0)
    inputs = inputs_from_adapter(adapter, resid, acts, ids[:, 1:][mask], mean)
    neurons = [0, 7, 20, 41, 63]
    truth = delta_loss_forward(model, adapter, ids, mask, mean, neurons)
    assert float(truth.abs().max()) > 1e-3  # the ablations do something
    fast, stats = delta_loss_fast(inputs, tol=1e-9)
    exact = delta_loss_exact(inputs)
    naive = delta_loss_recompute(inputs, neurons)
    atol = 1e-5  # HF's float32 RMSNorm inside a float64 model
    assert float((fast[:, neurons].double() - truth).abs().max()) <= atol
    assert float((exact[:, neurons] - truth).abs().max()) <= atol
    assert float((naive - truth).abs().max()) <= atol
    assert float((exact.float() - fast).abs().max()) <= 1e-6
    assert stats.n_pairs == inputs.n_positions * D_MLP


@pytest.mark.parametrize("start", [1, 2, -1])
def test_run_from_layer_reproduces_the_full_forward(fam: str, start: int) -> None:
    """Re-running the last blocks from a captured block input gives the model's own final
    hidden states and neurons (sliding-window masks, q/k norms, fused qkv, partial rotary)."""
    model = tiny_model(fam)
    adapter = adapter_for(model)
    ids = _ids(seed=2)
    full = _forward_hooks(model, adapter, ids)
    hidden = full["b1"] if start == 1 else full["b2"]
    normed: list[torch.Tensor] = []
    handle = adapter.final_norm_module().register_forward_hook(
        lambda _m, _a, out: normed.append(out)
    )
    try:
        with torch.no_grad(), capture_input(adapter.mlp_out_proj(-1)) as acts:
            run_from_layer(adapter, hidden, start)
    finally:
        handle.remove()
    torch.testing.assert_close(normed[0], full["normed"], atol=1e-12, rtol=0)
    torch.testing.assert_close(acts[0], full["acts"], atol=1e-12, rtol=0)
    # the model is restored: a full forward still gives the same logits
    torch.testing.assert_close(model(input_ids=ids).logits, full["logits"], atol=0, rtol=0)


def test_head_ablation_removes_only_that_head(fam: str) -> None:
    """Zeroing head h changes o_proj's output by exactly -W_o[:, h] @ z_h at that layer."""
    model = tiny_model(fam)
    adapter = adapter_for(model)
    ids = _ids(seed=3, batch=2, seq=20)
    layer, head, hd = 1, 2, HEAD_DIM[fam]
    proj = adapter.attn_out_proj(layer)
    assert proj is model.model.layers[layer].self_attn.o_proj

    def run() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        outs: list[torch.Tensor] = []
        h = proj.register_forward_hook(lambda _m, _a, o: outs.append(o))
        try:
            with capture_input(proj) as z:
                logits = model(input_ids=ids).logits
        finally:
            h.remove()
        return z[0], outs[0], logits

    z, y, logits = run()
    assert z.shape[-1] == N_HEADS * hd  # qwen3: 64 != d_model 32
    with ablate_heads(adapter, layer, [head]):
        z2, y2, logits2 = run()
    sl = slice(head * hd, (head + 1) * hd)
    keep = torch.ones(N_HEADS * hd, dtype=torch.bool)
    keep[sl] = False
    torch.testing.assert_close(z2[..., keep], z[..., keep], atol=0, rtol=0)
    assert float(z2[..., sl].abs().max()) == 0.0 and float(z[..., sl].abs().max()) > 1e-3
    w_o: Any = proj.weight
    torch.testing.assert_close(y - y2, z[..., sl] @ w_o[:, sl].T, atol=1e-12, rtol=0)
    assert float((logits2 - logits).abs().max()) > 1e-4
    _, _, logits3 = run()  # the hook is gone
    torch.testing.assert_close(logits3, logits, atol=0, rtol=0)


def test_attention_patterns(fam: str) -> None:
    model = tiny_model(fam)
    adapter = adapter_for(model)
    ids = _ids(seed=4, batch=2, seq=16)
    with attention_patterns(adapter, [1]) as pats:
        model(input_ids=ids)
    p = pats[1][0]
    assert p.shape == (2, N_HEADS, 16, 16)
    torch.testing.assert_close(p.sum(-1), torch.ones(2, N_HEADS, 16, dtype=p.dtype), atol=1e-6,
                               rtol=0)  # fmt: skip
    q, k = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    window = 4 if fam == "qwen3" else 8  # tiny.py's sliding windows (layer 1 slides in both)
    outside = (k > q) | (q - k >= window)
    assert float(p[..., outside].abs().max()) == 0.0


def test_identify_runs_end_to_end(fam: str, tmp_path: Path) -> None:
    model_dir, corpus = tiny_setup(tmp_path, fam)
    cfg = make_config(overrides=tiny_overrides(model_dir, corpus))
    res = identify(cfg, tmp_path / "run", cache_dir=tmp_path / "cache", progress=False)
    assert (tmp_path / "run" / "neurons.parquet").exists()
    assert res.delta.shape[1] == D_MLP and np.isfinite(res.delta).all()
    assert float(np.abs(res.delta).max()) > 0
    assert res.mean_acts.shape == (D_MLP,)
    assert len(res.rare_positions) > 0
    covs = res.neurons.covariates  # read the MLP input weights through the adapter
    assert covs is not None and set(covs.w_in_norm) == {"up", "gate"}
    w_in = adapter_for(tiny_model(fam, dtype=torch.float32)).mlp_in_weights(-1)
    for key, norms in covs.w_in_norm.items():
        np.testing.assert_allclose(norms, w_in[key].double().norm(dim=1).numpy(), rtol=1e-5)


# ------------------------------------------------------------------------- bad layouts
def _refused(model: Any, *patterns: str) -> str:
    with pytest.raises(UnsupportedArchitectureError) as info:
        adapter_for(model)
    msg = str(info.value)
    assert "\n" not in msg
    for pat in patterns:
        assert pat in msg, (pat, msg)
    return msg


def test_mismatched_layouts_are_refused(fam: str) -> None:
    model: Any = tiny_model(fam)
    if fam == "phi3":
        # a fused gate/up projection with an odd number of rows (last layer: all are checked)
        model.model.layers[-1].mlp.gate_up_proj = nn.Linear(D_MODEL, 2 * D_MLP + 1, bias=False)
        _refused(model, "'phi3'", "layer 2 mlp.gate_up_proj", "odd number of output rows (129)")
        bad = Phi3Adapter(model)
        with pytest.raises(UnsupportedArchitectureError, match="odd number"):
            layer_weights(bad, "gate")  # the spectral analysis cannot read a wrong split
        model = tiny_model(fam)
        model.model.layers[0].mlp.gate_up_proj = nn.Linear(D_MODEL, 2 * D_MLP + 2, bias=False)
        _refused(model, "130 output rows, expected 2 * d_mlp = 128")
        model = tiny_model(fam)
        model.config.num_key_value_heads = N_HEADS  # config says 4 kv heads, modules have 2
        _refused(model, "'phi3'", "self_attn.qkv_proj", "(64, 32)", "(96, 32)")
    else:
        model.config.head_dim = 8  # the modules were built with head_dim 16
        _refused(model, "'qwen3'", "q_norm has weight shape (16,)", "(head_dim,) = (8,)")
        model = tiny_model(fam)
        del model.model.layers[1].self_attn.k_norm
        _refused(model, "'qwen3'", "layer 1 attention has no k_norm")
    # a Llama model relabelled as this family lacks the family's modules
    llama: Any = tiny_model("llama")
    llama.config.model_type = fam
    missing = "gate_up_proj" if fam == "phi3" else "q_norm"
    _refused(llama, fam, missing)


def test_gguf_round_trip(fam: str, tmp_path: Path) -> None:
    """A GGUF file of the family loads through load_model with the right adapter, and the
    loaded model computes the source model's logits and neurons (fused/normed pieces intact)."""
    source = _gguf_source_model(fam)
    path = write_tiny_gguf(tmp_path / f"tiny-{fam}.gguf", source)
    assert check_gguf(path) == fam
    loaded = load_model(ModelSpec(source=str(path), dtype="float32"))
    assert type(loaded.adapter) is ADAPTER[fam]
    assert loaded.identity["model_type"] == fam and loaded.identity["kind"] == "gguf"
    ids = _ids(seed=8, batch=2, seq=16)
    want = _forward_hooks(source, adapter_for(source), ids)
    got = _forward_hooks(loaded.model, loaded.adapter, ids)
    for key in ("logits", "acts"):
        torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=0)
    for key, weight in adapter_for(source).mlp_in_weights(-1).items():
        torch.testing.assert_close(loaded.adapter.mlp_in_weights(-1)[key], weight, atol=0, rtol=0)
    assert loaded.adapter.dims.head_dim == (128 if fam == "qwen3" else D_MODEL // N_HEADS)
