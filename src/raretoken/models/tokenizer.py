"""What a run needs to know about a tokenizer, read without the model's weights.

* :func:`tokenizer_identity`: the tokenizer's content hash, the key of the token statistics and
  the context windows (checkpoints and sizes sharing a tokenizer share them).
* :class:`TokenizerInfo`: that identity plus the model's sizes, its model type and the
  tokenizer's BOS token (what the BOS policy of :mod:`raretoken.models.bos` needs), as
  :func:`~raretoken.models.loading.load_tokenizer` reads them.
* :func:`check_tokenizer`: refuse a tokenizer that does not belong to a model.
* :func:`tokenizer_adds_bos`: whether the tokenizer puts its BOS token before every text it
  encodes (``add_bos_token`` or a post-processor template), read by encoding a text.

Loading lives in :mod:`raretoken.models.loading`, which re-exports these names.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..errors import TokenizerMismatchError

__all__ = [
    "MIN_VOCAB_FILL",
    "TOKENIZER_IDENTITY_FORMAT",
    "LoadedTokenizer",
    "TokenizerInfo",
    "check_tokenizer",
    "tokenizer_adds_bos",
    "tokenizer_identity",
]

log = logging.getLogger(__name__)

# A tokenizer with fewer than this fraction of the embedding rows is taken to belong to another
# model. Real models pad their vocabulary by at most a few percent (Pythia 50277/50304, Qwen2
# 151665/151936, Phi-1.5 50295/51200).
MIN_VOCAB_FILL = 0.9

#: Keys of a backend tokenizer's JSON that hold call-time state, not how text is tokenized.
_TOKENIZER_STATE_KEYS = ("truncation", "padding")
#: Version of :func:`tokenizer_identity`'s hashed payload (part of the hash).
TOKENIZER_IDENTITY_FORMAT = 1
#: The text :func:`tokenizer_adds_bos` encodes.
_PROBE_TEXT = "The"


@dataclass(frozen=True)
class TokenizerInfo:
    """What the tokenizer-keyed stages need to know about a model, read without its weights.

    ``tokenizer`` is :func:`tokenizer_identity`; ``dims`` the sizes of
    :func:`~raretoken.models.loading.model_dims` (``None`` when the architecture could not be
    built from the config alone: they are then read once the model loads); ``max_positions``
    the model's context length, if known; ``model_type`` the config's ``model_type``;
    ``bos_token`` / ``bos_token_id`` the tokenizer's BOS token (``None``: it has none) and
    ``adds_bos`` whether the tokenizer puts it before every text it encodes
    (:func:`tokenizer_adds_bos`). The last four decide the ``auto`` BOS policy
    (:func:`raretoken.models.bos.resolve_bos`); none of them is part of :attr:`key`.
    """

    tokenizer: dict[str, Any]
    dims: dict[str, int] | None
    max_positions: int | None
    model_type: str | None = None
    bos_token: str | None = None
    bos_token_id: int | None = None
    adds_bos: bool = False

    @property
    def vocab_size(self) -> int:
        """Embedding rows: the length of the counts arrays."""
        return int(self.tokenizer["vocab_size"])

    @property
    def key(self) -> dict[str, Any]:
        """The part of a cache key that identifies the tokenization (not the class name)."""
        return {"sha256": self.tokenizer["sha256"], "vocab_size": self.vocab_size}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TokenizerInfo:
        mp = data.get("max_positions")
        dims = data.get("dims")
        bos_id = data.get("bos_token_id")
        model_type, bos_token = data.get("model_type"), data.get("bos_token")
        return cls(
            tokenizer=dict(data["tokenizer"]),
            dims=None if dims is None else {k: int(v) for k, v in dims.items()},
            max_positions=None if mp is None else int(mp),
            model_type=None if model_type is None else str(model_type),
            bos_token=None if bos_token is None else str(bos_token),
            bos_token_id=None if bos_id is None else int(bos_id),
            adds_bos=bool(data.get("adds_bos", False)),
        )


@dataclass(frozen=True, eq=False)
class LoadedTokenizer:
    """A tokenizer loaded without its model, with its :class:`TokenizerInfo`."""

    tokenizer: PreTrainedTokenizerBase
    info: TokenizerInfo


def tokenizer_identity(tok: PreTrainedTokenizerBase, vocab_size: int) -> dict[str, Any]:
    """Content identity of ``tok`` for a model with ``vocab_size`` embedding rows.

    ``sha256`` is the SHA-256 of the canonical JSON (sorted keys) of

    * fast tokenizers: the backend tokenizer's serialisation (``backend_tokenizer.to_str()``:
      vocabulary, merges, normaliser, pre-tokeniser, post-processor, decoder, added tokens)
      without its call-time truncation and padding state;
    * other (Python / SentencePiece) tokenizers: the vocabulary (``get_vocab()`` in id order),
      the SHA-256 of each file named in ``vocab_files_names`` (vocab, merges, SentencePiece
      model) that exists, and the SentencePiece model proto when there is one;

    plus the special tokens map and ``vocab_size`` (the counts arrays have one entry per
    embedding row, so a padded vocabulary counts apart). Where the files lie, the tokenizer's
    class and the model's weights are not part of it. Returns ``{"sha256", "vocab_size",
    "class"}``.
    """
    payload: dict[str, Any] = {
        "format": TOKENIZER_IDENTITY_FORMAT,
        "vocab_size": int(vocab_size),
        "special_tokens": json.loads(json.dumps(tok.special_tokens_map, default=str)),
    }
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        for name in _TOKENIZER_STATE_KEYS:
            state.pop(name, None)
        payload["backend"] = state
    else:
        vocab = sorted(tok.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
        payload["vocab"] = [[t, int(i)] for t, i in vocab]
        files: dict[str, str] = {}
        for attr in sorted(getattr(tok, "vocab_files_names", None) or {}):
            path = getattr(tok, attr, None)
            if isinstance(path, str | Path) and Path(path).is_file():
                files[attr] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        payload["files"] = files
        proto = getattr(getattr(tok, "sp_model", None), "serialized_model_proto", None)
        if callable(proto):
            payload["sentencepiece"] = hashlib.sha256(proto()).hexdigest()
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return {
        "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        "vocab_size": int(vocab_size),
        "class": type(tok).__name__,
    }


def tokenizer_adds_bos(tok: PreTrainedTokenizerBase) -> bool:
    """Whether ``tok`` puts its BOS token before a text it encodes with its default settings.

    Read by behaviour, not from attributes: a short text is encoded with and without special
    tokens, and the tokenizer adds a BOS when the first encoding is the BOS id followed by the
    second (an EOS after it is allowed). This covers ``add_bos_token`` (Llama 2, Mistral, Gemma) and post-processor
    templates (Llama 3's ``<|begin_of_text|>``) alike. ``False`` for a tokenizer without a BOS
    token.
    """
    bos_id = getattr(tok, "bos_token_id", None)
    if bos_id is None:
        return False
    with_special = list(tok(_PROBE_TEXT, add_special_tokens=True)["input_ids"])
    plain = list(tok(_PROBE_TEXT, add_special_tokens=False)["input_ids"])
    return (
        len(with_special) > len(plain)
        and with_special[0] == int(bos_id)
        and with_special[1 : 1 + len(plain)] == plain
    )


def check_tokenizer(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> None:
    """Refuse a tokenizer that does not belong to ``model``.

    Raises :class:`TokenizerMismatchError` if the tokenizer can emit ids beyond the embedding
    rows, or if it covers less than ``MIN_VOCAB_FILL`` of them (a vocabulary from another model).
    Disagreeing BOS/EOS ids between tokenizer and config are only logged (instruct models often
    redefine EOS).
    """
    embedding = model.get_input_embeddings()
    weight = getattr(embedding, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise TokenizerMismatchError("the model has no input embedding matrix to check against")
    check_vocab_fits(tokenizer, int(weight.shape[0]))
    for name in ("bos_token_id", "eos_token_id"):
        tok_id = getattr(tokenizer, name, None)
        cfg_id = getattr(model.config, name, None)
        cfg_ids = cfg_id if isinstance(cfg_id, list) else [cfg_id]
        if tok_id is not None and cfg_id is not None and tok_id not in cfg_ids:
            log.warning("tokenizer %s %s differs from the model config's %s", name, tok_id, cfg_id)


def check_vocab_fits(tokenizer: PreTrainedTokenizerBase, rows: int) -> None:
    """The vocabulary checks of :func:`check_tokenizer` against ``rows`` embedding rows."""
    vocab = tokenizer.get_vocab()
    n_tokens = max(len(tokenizer), max(vocab.values(), default=-1) + 1)
    if n_tokens > rows:
        raise TokenizerMismatchError(
            f"the tokenizer has {n_tokens} token ids but the model embeds only {rows}; "
            "tokenizer and model do not belong together"
        )
    if n_tokens < MIN_VOCAB_FILL * rows:
        raise TokenizerMismatchError(
            f"the tokenizer has {n_tokens} tokens, far fewer than the model's {rows} embedding "
            "rows; it is probably from another model"
        )
