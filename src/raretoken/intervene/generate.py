"""Greedy generations on a few fixed prompts, before and after an intervention.

Greedy decoding (the arg-max token at every step, ties to the lowest id) is deterministic, so
no seed is needed; every step re-runs the whole sequence (no key/value cache), which is slow
for long texts but exact and short here (``n_tokens`` = 20 by default).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch

from ..models.adapters import ModelAdapter

#: Fixed prompts: plain text with room for a rare continuation.
PROMPTS = (
    "The capital of France is",
    "In 1887, the chemist discovered a new element called",
    "She opened the old book and read the word",
)


#: Makes the hook context of a condition (``None``: the unhooked model).
MakeContext = Callable[[], AbstractContextManager[None] | None]


@dataclass(frozen=True)
class Generation:
    """The greedy continuation of ``prompt`` under ``condition`` (e.g. ``"scale ×0"``)."""

    prompt: str
    condition: str
    text: str


def greedy(
    adapter: ModelAdapter, tokenizer: object, prompt: str, n_tokens: int, device: str = "cpu"
) -> str:
    """The ``n_tokens`` greedy continuation of ``prompt`` (decoded text, prompt excluded)."""
    enc = tokenizer(prompt, return_tensors="pt")  # type: ignore[operator]
    ids = enc["input_ids"].to(device)
    start = int(ids.shape[1])
    if start == 0:
        return ""
    with torch.no_grad():
        for _ in range(n_tokens):
            logits = adapter.model(input_ids=ids).logits[:, -1]
            nxt = torch.argmax(logits, dim=-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    return str(tokenizer.decode(ids[0, start:].tolist()))  # type: ignore[attr-defined]


def generations(
    adapter: ModelAdapter,
    tokenizer: object,
    conditions: Sequence[tuple[str, MakeContext]],
    prompts: Sequence[str] = PROMPTS,
    n_tokens: int = 20,
    device: str = "cpu",
) -> tuple[Generation, ...]:
    """Greedy continuations of every prompt under every ``(label, make_context)`` condition
    (``make_context`` returns the hook context, or ``None`` for the unhooked model)."""
    out = []
    for prompt in prompts:
        for label, make in conditions:
            ctx = make()
            if ctx is None:
                text = greedy(adapter, tokenizer, prompt, n_tokens, device)
            else:
                with ctx:
                    text = greedy(adapter, tokenizer, prompt, n_tokens, device)
            out.append(Generation(prompt=prompt, condition=label, text=text))
    return tuple(out)
