"""Made-up Zipf documents and a small byte-level BPE tokenizer trained on them.

Shared by the data tests; import as ``from bpe_fixture import make_docs, make_tokenizer``.
Both are deterministic (fixed seed, BPE training has no randomness) and offline.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from raretoken.data.corpus import Document


def make_docs(n_docs: int, seed: int) -> list[Document]:
    """Documents of made-up words drawn from a Zipf law (deterministic)."""
    rng = np.random.default_rng(seed)
    syllables = ["ka", "lo", "mi", "ne", "su", "ta", "ri", "vo", "pe", "zu", "bi", "go"]
    words = sorted({"".join(rng.choice(syllables, size=rng.integers(1, 4))) for _ in range(400)})
    p = 1.0 / np.arange(1, len(words) + 1)
    p /= p.sum()
    docs = []
    for i in range(n_docs):
        n = int(rng.integers(20, 80))
        docs.append(Document(f"doc/{i}", " ".join(rng.choice(words, size=n, p=p)) + "."))
    return docs


def make_tokenizer(
    texts: list[str], vocab_size: int = 400, *, eos: bool = True, unk: bool = False
) -> PreTrainedTokenizerFast:
    """A small byte-level BPE tokenizer with BOS ``<s>``, trained on ``texts``.

    ``eos`` declares ``</s>`` as the EOS token; ``unk`` declares ``<|endoftext|>`` as the
    unknown token (byte-level BPE never needs it).
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    kwargs: dict[str, Any] = {}
    if eos:
        kwargs["eos_token"] = "</s>"
    if unk:
        kwargs["unk_token"] = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", **kwargs)
