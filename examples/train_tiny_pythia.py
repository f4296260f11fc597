"""Train a tiny Pythia (GPT-NeoX) from scratch on the embedded corpus, saving checkpoints.

The training-dynamics half of the paper runs over Pythia's public checkpoints (``step0``,
``step1``, ``step2``, ``step4``, ..., ``step512``, then every 1,000 steps), which an offline
machine cannot download. This script makes a small stand-in here: a GPT-NeoX model with
Pythia's layout (rotary on a quarter of each head, parallel attention + MLP, untied
unembedding, d_mlp = 4 d_model) trained on raretoken's embedded English corpus, with Hugging
Face checkpoints at log-spaced steps (step 0, 1, 2, 4, ... up to ``--log-until``) and then every
``--save-every`` steps and at the end, each a complete model directory ``OUT/step<k>``
(``save_pretrained`` model and tokenizer) that raretoken loads as it loads any local model::

    .venv/bin/python examples/train_tiny_pythia.py --out runs/tiny-pythia
    .venv/bin/raretoken sweep examples/dynamics_sweep.toml --out runs/dynamics-sweep

Data: the *counting* part of the embedded corpus as raretoken splits it when one corpus
serves both token counting and contexts (passages of at most 8,000 characters, 10 % held out
by a hash of their ids, ``raretoken.data.heldout``). raretoken draws its context windows from
the held-out 10 %, so the contexts it scores were never trained on.

Tokenizer: a byte-level BPE (GPT-NeoX's kind, ``<|endoftext|>`` as BOS/EOS) of
``--vocab-size`` tokens trained on the same counting part. A 4,096-token vocabulary rather than
the embedded SmolLM2 tokenizer's 49,152 keeps the unembedding (and raretoken's all-neuron
ablation, which is positions x vocabulary x neurons) small on a CPU. The identical tokenizer is
saved into every checkpoint, so all checkpoints share token statistics and scored positions.

Determinism: the same arguments give the same tokenizer, batches and initial weights (the seed
drives the batch sampler and the initialisation, drawn inside ``torch.random.fork_rng``), and on
the same machine, thread count and torch version the same weights (CPU kernels are
deterministic; another thread count may change float rounding).

Importable: :func:`train` takes a :class:`TrainConfig` and returns a :class:`TrainResult`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

from raretoken.data.corpus import CorpusSpec, iter_documents
from raretoken.data.heldout import PASSAGE_CHARS, select_documents, split_passages
from raretoken.errors import ConfigError

log = logging.getLogger("train_tiny_pythia")

EOS = "<|endoftext|>"
PAD = "<|padding|>"
SPLIT_SEED = 0  # the seed of raretoken's held-out split of a shared corpus (run/stages.py)


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run (the command-line flags, same names)."""

    out: str = "runs/tiny-pythia"
    steps: int = 600
    seq_len: int = 256
    batch: int = 16
    d_model: int = 128
    layers: int = 2
    heads: int = 4
    vocab_size: int = 4096
    lr: float = 1e-3
    warmup: int = 20
    weight_decay: float = 0.01
    log_until: int = 64
    save_every: int = 150
    seed: int = 0
    device: str = "cpu"
    corpus: str = "embedded"
    heldout_fraction: float = 0.1
    max_chars: int | None = None
    log_every: int = 25

    def validate(self) -> None:
        """One-line :class:`ConfigError` on an impossible setting."""
        for name in ("steps", "seq_len", "batch", "d_model", "layers", "heads", "save_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1")
        if self.d_model % self.heads or (self.d_model // self.heads) % 4:
            raise ConfigError(
                f"--d-model ({self.d_model}) must be a multiple of 4 x the number of heads "
                f"({self.heads}): rotary embeddings cover a quarter of each head"
            )
        if self.vocab_size < 300:
            raise ConfigError("--vocab-size must be >= 300 (256 bytes, specials and merges)")
        if self.lr <= 0 or self.warmup < 0 or self.log_until < 0:
            raise ConfigError("--lr must be > 0, --warmup and --log-until >= 0")
        if not 0 < self.heldout_fraction < 1:
            raise ConfigError("--heldout-fraction must be in (0, 1)")


@dataclass(frozen=True)
class TrainResult:
    """What a training run wrote: checkpoint steps and directories, losses and timings."""

    out: str
    checkpoints: dict[int, str]
    losses: list[float]  # training loss of every step (the batch before the update)
    n_train_tokens: int
    n_params: int
    seconds: float
    seconds_tokenizer: float
    config: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["checkpoints"] = {str(k): v for k, v in self.checkpoints.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainResult:
        d = dict(d)
        d["checkpoints"] = {int(k): v for k, v in d["checkpoints"].items()}
        d["config"] = TrainConfig(**d["config"])
        return cls(**d)


def checkpoint_steps(steps: int, log_until: int = 64, save_every: int = 150) -> list[int]:
    """Steps to save: 0, the powers of two up to ``log_until``, multiples of ``save_every``
    and ``steps`` itself (Pythia's layout: ``step0``, ``step1``, ``step2``, ``step4`` ...
    ``step512``, then every 1,000 steps)."""
    out = {0, steps}
    k = 1
    while k <= min(log_until, steps):
        out.add(k)
        k *= 2
    out.update(range(save_every, steps + 1, save_every))
    return sorted(out)


def training_texts(cfg: TrainConfig) -> Iterator[str]:
    """The counting part of the corpus, as raretoken splits a corpus shared by counts and
    contexts (the held-out part is where raretoken draws its contexts)."""
    docs = select_documents(
        split_passages(iter_documents(CorpusSpec(cfg.corpus, max_chars=cfg.max_chars)),
                       PASSAGE_CHARS),
        heldout=False,
        heldout_fraction=cfg.heldout_fraction,
        seed=SPLIT_SEED,
    )  # fmt: skip
    for doc in docs:
        yield doc.text


def train_tokenizer(texts: Sequence[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE of ``vocab_size`` tokens (``<|endoftext|>`` = 0, ``<|padding|>`` = 1)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=PAD
    )


def token_stream(tokenizer: PreTrainedTokenizerFast, texts: Sequence[str]) -> np.ndarray:
    """All ``texts`` tokenized and joined, each followed by ``<|endoftext|>`` (int64)."""
    eos = int(tokenizer.eos_token_id)
    encoded = tokenizer.backend_tokenizer.encode_batch(list(texts), add_special_tokens=False)
    parts = [np.asarray([*e.ids, eos], dtype=np.int64) for e in encoded]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def build_model(cfg: TrainConfig, tokenizer: PreTrainedTokenizerFast) -> GPTNeoXForCausalLM:
    """A randomly initialised GPT-NeoX in Pythia's layout, drawn from ``cfg.seed``."""
    config = GPTNeoXConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.d_model,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        intermediate_size=4 * cfg.d_model,
        hidden_act="gelu",
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.25,
        },
        max_position_embeddings=cfg.seq_len,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        initializer_range=0.02,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return GPTNeoXForCausalLM(config)


def _lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to 10 % (Pythia's schedule)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(1, cfg.steps - cfg.warmup)
    progress = min(1.0, (step - cfg.warmup) / span)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _save(model: GPTNeoXForCausalLM, tokenizer: PreTrainedTokenizerFast, path: Path) -> None:
    """Write a complete checkpoint directory, aside first so a killed run leaves none half-done."""
    tmp = path.with_name(f".{path.name}.tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(path)


def train(cfg: TrainConfig) -> TrainResult:
    """Train as ``cfg`` says, writing ``cfg.out/step<k>`` checkpoints and ``training.json``.

    Raises
    ------
    ConfigError
        Bad settings, an ``out`` directory holding checkpoints already, or a corpus too
        small for one window.
    """
    cfg.validate()
    out = Path(cfg.out)
    if out.exists() and any(out.glob("step*")):
        raise ConfigError(f"{out} holds checkpoints already; remove it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(cfg.device)
    t0 = time.perf_counter()
    texts = list(training_texts(cfg))
    tokenizer = train_tokenizer(texts, cfg.vocab_size)
    stream = token_stream(tokenizer, texts)
    t_tok = time.perf_counter() - t0
    if len(stream) < cfg.seq_len + 2:
        raise ConfigError(f"the corpus has {len(stream)} tokens, fewer than one window")
    log.info("tokenizer: %d tokens; %d training tokens from %d texts (%.1f s)",
             len(tokenizer), len(stream), len(texts), t_tok)  # fmt: skip

    model = build_model(cfg, tokenizer)
    torch.nn.Module.to(model, device)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "embed" in n]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8,
    )  # fmt: skip
    rng = np.random.default_rng(cfg.seed)
    saves = set(checkpoint_steps(cfg.steps, cfg.log_until, cfg.save_every))
    checkpoints: dict[int, str] = {}
    losses: list[float] = []
    log.info("model: %d layers, d_model %d, d_mlp %d, %d parameters; %d steps of %d x %d tokens",
             cfg.layers, cfg.d_model, 4 * cfg.d_model, n_params, cfg.steps, cfg.batch,
             cfg.seq_len)  # fmt: skip
    t_train = time.perf_counter()
    for step in range(cfg.steps + 1):
        if step in saves:
            model.eval()
            path = out / f"step{step}"
            _save(model, tokenizer, path)
            checkpoints[step] = str(path)
        if step == cfg.steps:
            break
        model.train()
        starts = rng.integers(0, len(stream) - cfg.seq_len - 1, size=cfg.batch)
        batch = np.stack([stream[s : s + cfg.seq_len + 1] for s in starts])
        ids = torch.from_numpy(batch).to(device)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        logits = model(input_ids=ids[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.item()))
        if (step + 1) % cfg.log_every == 0 or step + 1 in saves:
            rate = (step + 1) * cfg.batch * cfg.seq_len / (time.perf_counter() - t_train)
            log.info("step %d/%d  loss %.4f  lr %.2e  %.0f tokens/s",
                     step + 1, cfg.steps, losses[-1], _lr_at(step, cfg), rate)  # fmt: skip
    result = TrainResult(
        out=str(out),
        checkpoints=checkpoints,
        losses=losses,
        n_train_tokens=len(stream),
        n_params=int(n_params),
        seconds=time.perf_counter() - t0,
        seconds_tokenizer=t_tok,
        config=cfg,
    )
    (out / "training.json").write_text(json.dumps(result.to_dict(), indent=1) + "\n")
    log.info("%d checkpoints in %s (%.0f s in all)", len(checkpoints), out, result.seconds)
    return result


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """The :class:`TrainConfig` of the command line (every field is a ``--flag``)."""
    defaults = TrainConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for f in TrainConfig.__dataclass_fields__.values():
        default = getattr(defaults, f.name)
        kind = {"int": int, "float": float, "str": str}[str(f.type).split(" |")[0]]
        p.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=default,
                       help=f"default {default}")  # fmt: skip
    return TrainConfig(**vars(p.parse_args(argv)))


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    try:
        train(parse_args(argv))
    except ConfigError as exc:
        log.error("error: %s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
