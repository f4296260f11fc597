"""Shared test setup: offline Hugging Face, tiny-model fixtures.

The environment variables are set at import time, before any test module imports
``huggingface_hub`` / ``transformers`` (which read them once, on import).
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pytest
import torch

from tiny import FAMILIES, LLAMA_LIKE


@pytest.fixture(params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    """Each of the three adapter families (gpt2, neox, llama)."""
    return str(request.param)


@pytest.fixture(params=(*FAMILIES, *LLAMA_LIKE))
def any_family(request: pytest.FixtureRequest) -> str:
    """The three families plus the Llama-layout model types (qwen2, mistral, olmo)."""
    return str(request.param)


@pytest.fixture
def input_ids() -> torch.Tensor:
    """``(2, 24)`` token ids in ``[3, 300)``, fixed by seed (no special tokens)."""
    rng = np.random.default_rng(1234)
    return torch.from_numpy(rng.integers(3, 300, size=(2, 24))).long()
