"""Tiny random models and a tiny trained tokenizer for fast, offline tests.

Import from tests as ``from tiny import FAMILIES, tiny_model, tiny_tokenizer, save_tiny``.

Models: 3 blocks, ``d_model`` 32, ``d_mlp`` 64, 4 heads (Llama-like: 2 key/value heads, i.e.
grouped-query attention), 128 positions, weights drawn with ``initializer_range`` 0.2 so logits
are far from uniform. Norm weights and biases are randomised too (Hugging Face initialises them
to ones/zeros, which would hide scale/bias mistakes). Randomness is drawn inside
``torch.random.fork_rng`` so the global torch RNG is left untouched.

Besides :data:`FAMILIES`, :func:`tiny_model` builds ``qwen2`` (with sliding-window layers),
``mistral`` (sliding window 8), ``olmo`` (non-parametric LayerNorm) and ``gemma`` (unsupported,
for refusal tests), and the families of :data:`NEW_FAMILIES`: ``qwen3`` (q/k norms, explicit
``head_dim`` 16 so ``n_heads * head_dim != d_model``, sliding window 4 on layers >= 1) and
``phi3`` (fused ``gate_up_proj`` / ``qkv_proj``, partial rotary 0.5 as in Phi-4-mini, sliding
window 8).
"""

from __future__ import annotations

import functools
import string
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import nn
from transformers import (
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OlmoConfig,
    OlmoForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

FAMILIES = ("gpt2", "neox", "llama")
LLAMA_LIKE = ("qwen2", "mistral", "olmo")
NEW_FAMILIES = ("qwen3", "phi3")
ALL_KINDS = (*FAMILIES, *LLAMA_LIKE, "gemma", *NEW_FAMILIES)
QWEN3_HEAD_DIM = 16

N_LAYERS = 3
D_MODEL = 32
D_MLP = 64
N_HEADS = 4
N_KV_HEADS = 2
MAX_POSITIONS = 128
INIT_RANGE = 0.2
UNK, BOS, EOS = 0, 1, 2

TEXT = """\
The river runs past the old mill and under the stone bridge before it reaches the sea.
In the morning the market opens early, and the farmers bring apples, pears, cabbages and
bread to the square. Children run between the stalls while their parents talk about the
weather, the price of flour and the news from the city. A small dog sleeps in the sun by the
fountain, and nobody minds it. When the bells ring at noon, the traders pack their carts and
the square becomes quiet again.
The library on the hill keeps thousands of books about history, mathematics, astronomy and
music. Students come every afternoon to read, to write their essays and to argue about ideas.
The librarian, a patient woman with silver glasses, knows where every volume stands. She says
that a good question is worth more than a quick answer, and that reading slowly is a skill.
Last winter a storm broke the windows of the reading room, and the town paid for new glass.
Trains leave the station every hour. The first one goes north through the forest to the
mountains, where the snow stays until late spring. The second one follows the coast to the
harbour, where fishing boats come back in the evening with nets full of silver fish. Travellers
buy coffee and newspapers, check the timetable twice, and wait on the platform with their bags.
Sometimes a train is late, and the announcer apologises in a calm and careful voice.
Science begins with observation. A scientist measures, records, compares and doubts. She
builds a model, tests it against new data and changes it when the data disagree. Numbers such
as 3, 17, 42 and 1000 appear in her notebook next to sketches of leaves, crystals and clouds.
Rare words like quixotic, ephemeral, zephyr and syzygy appear only once in a long while, but
common words like the, and, of and to appear in almost every sentence we write or speak.
The kitchen smells of onions, garlic and fresh herbs. A pot of soup simmers on the stove while
someone kneads dough for tomorrow. Recipes are passed from grandparents to grandchildren,
written on cards with stains of butter and ink. Cooking, like music, rewards practice,
patience and attention to small details.
In the evening the lamps are lit along the street. Neighbours sit on their steps and share
stories about the day. Somewhere a radio plays an old song, and a window opens to let in the
cool air. The stars appear one by one above the roofs, and the town goes slowly to sleep.
"""


def _randomise_norms(model: nn.Module, scale: float = 0.2) -> None:
    """Replace norm weights by ``1 + scale * N(0, 1)`` and biases by ``scale * N(0, 1)``."""
    with torch.no_grad():
        for mod in model.modules():
            is_norm = isinstance(mod, nn.LayerNorm) or hasattr(mod, "variance_epsilon")
            if not is_norm:
                continue
            weight = getattr(mod, "weight", None)
            bias = getattr(mod, "bias", None)
            if isinstance(weight, torch.Tensor):
                weight.copy_(1.0 + scale * torch.randn_like(weight))
            if isinstance(bias, torch.Tensor):
                bias.copy_(scale * torch.randn_like(bias))


def _build(kind: str, vocab_size: int) -> PreTrainedModel:
    common: dict[str, Any] = {"vocab_size": vocab_size, "bos_token_id": BOS, "eos_token_id": EOS}
    llama_kw: dict[str, Any] = {
        **common,
        "hidden_size": D_MODEL,
        "intermediate_size": D_MLP,
        "num_hidden_layers": N_LAYERS,
        "num_attention_heads": N_HEADS,
        "num_key_value_heads": N_KV_HEADS,
        "max_position_embeddings": MAX_POSITIONS,
        "initializer_range": INIT_RANGE,
        "tie_word_embeddings": False,
    }
    if kind == "gpt2":
        return GPT2LMHeadModel(
            GPT2Config(
                **common,
                n_positions=MAX_POSITIONS,
                n_embd=D_MODEL,
                n_layer=N_LAYERS,
                n_head=N_HEADS,
                n_inner=D_MLP,
                initializer_range=INIT_RANGE,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
            )
        )
    if kind == "neox":
        return GPTNeoXForCausalLM(
            GPTNeoXConfig(
                **common,
                hidden_size=D_MODEL,
                num_hidden_layers=N_LAYERS,
                num_attention_heads=N_HEADS,
                intermediate_size=D_MLP,
                max_position_embeddings=MAX_POSITIONS,
                initializer_range=INIT_RANGE,
                use_parallel_residual=True,
                tie_word_embeddings=False,
            )
        )
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**llama_kw))
    if kind == "qwen2":
        # sliding window 4 on layers >= 1: the tail runner must pick the right mask per layer
        cfg = Qwen2Config(
            **llama_kw, use_sliding_window=True, sliding_window=4, max_window_layers=1
        )
        return Qwen2ForCausalLM(cfg)
    if kind == "mistral":
        return MistralForCausalLM(MistralConfig(**llama_kw, sliding_window=8))
    if kind == "olmo":
        return OlmoForCausalLM(OlmoConfig(**llama_kw))
    if kind == "qwen3":
        q3 = Qwen3Config(
            **llama_kw, head_dim=QWEN3_HEAD_DIM, use_sliding_window=True, sliding_window=4,
            max_window_layers=1,
        )  # fmt: skip
        return Qwen3ForCausalLM(q3)
    if kind == "phi3":
        rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
        phi = Phi3Config(
            **llama_kw, pad_token_id=None, rope_parameters=rope, sliding_window=8,
            original_max_position_embeddings=MAX_POSITIONS,
        )  # fmt: skip
        return Phi3ForCausalLM(phi)
    if kind == "gemma":
        return GemmaForCausalLM(GemmaConfig(**llama_kw, head_dim=D_MODEL // N_HEADS))
    raise ValueError(f"unknown tiny model kind {kind!r}; choose from {ALL_KINDS}")


def tiny_model(
    family: str, *, seed: int = 0, dtype: torch.dtype = torch.float64, vocab_size: int = 300
) -> PreTrainedModel:
    """A random tiny causal LM of ``family`` in eval mode with gradients off."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _build(family, vocab_size)
        _randomise_norms(model)
    nn.Module.to(model, dtype)
    model.eval()
    model.requires_grad_(False)
    return model


@functools.cache
def tiny_tokenizer(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """A BPE tokenizer trained on :data:`TEXT` with ``<unk>``=0, ``<s>``=1, ``</s>``=2.

    Metaspace pre-tokenisation (``▁`` marks word starts) so decoding restores the spaces; the
    printable ASCII characters are always in the alphabet. Cached per process: do not mutate.
    """
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    alphabet = sorted(set(string.ascii_letters + string.digits + string.punctuation))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(TEXT.splitlines(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def save_tiny(path: Path, family: str, **kw: object) -> Path:
    """Save ``tiny_model(family, **kw)`` and a matching tokenizer into directory ``path``."""
    model = tiny_model(family, **kw)  # type: ignore[arg-type]
    vocab_size = int(kw.get("vocab_size", 300))  # type: ignore[call-overload]
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tiny_tokenizer(vocab_size).save_pretrained(path)
    return path
